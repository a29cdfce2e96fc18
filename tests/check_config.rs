//! `nxknock check-config` runs every check `serve` would and lists every problem,
//! with file:line where it can; read-only commands never create state. The real
//! binary, no root needed.

use std::path::Path;
use std::process::{Command, Output};

use nxknock::firewall::BackendKind;
use nxknock::lab::config::{ConfigBuilder, ZONE_FILE};

const BIN: &str = env!("CARGO_BIN_EXE_nxknock");

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn check(cfg: &Path, path_env: Option<&str>) -> Output {
    let mut c = Command::new(BIN);
    c.args(["check-config", "--config", cfg.to_str().unwrap()]).env_remove("RUST_LOG");
    if let Some(p) = path_env {
        c.env("PATH", p);
    }
    c.output().unwrap()
}

fn base() -> ConfigBuilder {
    ConfigBuilder::new(BackendKind::None).listen(["127.0.0.1:0".parse().unwrap()]).store("state/db.sqlite")
}

/// One bad config: how to make it, and what check-config must say about it.
struct Case {
    what: &'static str,
    config: ConfigBuilder,
    /// Applied to the directory after the config and zone are written.
    setup: fn(&Path),
    /// Every one of these must be in the output.
    says: &'static [&'static str],
    /// Exit status 0 (only warnings) or not.
    ok: bool,
}

fn nothing(_: &Path) {}

#[test]
fn check_config_catches_each_bad_config_with_its_message() {
    // The first port of this machine's ephemeral range (serve refuses knock ports there).
    let eph: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let cases = [
        Case {
            what: "unknown key",
            config: base().raw("[firewall]\nopen_secs = 5"),
            setup: nothing,
            says: &["open_secs"],
            ok: false,
        },
        Case {
            what: "two broken rules, both listed with their lines",
            config: base().raw("[token]\nwindow = 0").open_seconds(0),
            setup: nothing,
            says: &["firewall.open_seconds", "token.window", "nxknock.toml:", "2 errors"],
            ok: false,
        },
        Case {
            what: "service port 0 and a duplicate name",
            config: base()
                .service(nxknock::config::ServiceConfig::new("web", nxknock::firewall::Proto::Tcp, 0))
                .service(nxknock::config::ServiceConfig::new("ssh", nxknock::firewall::Proto::Tcp, 2222)),
            setup: nothing,
            says: &["service[1].port", "service[2].name", "twice", "2 errors"],
            ok: false,
        },
        Case {
            what: "metrics on a public address",
            config: base().raw("[metrics]\nlisten = \"0.0.0.0:9153\""),
            setup: nothing,
            says: &["metrics.listen", "loopback", "allow_remote"],
            ok: false,
        },
        Case {
            what: "always_allow everyone",
            config: base().raw("[firewall]\nalways_allow = [\"0.0.0.0/0\"]"),
            setup: nothing,
            says: &["firewall.always_allow", "everyone"],
            ok: false,
        },
        Case {
            what: "listen address not on this host",
            config: base().listen(["203.0.113.9:53".parse().unwrap()]),
            setup: nothing,
            says: &["dns.listen", "cannot bind 203.0.113.9:53"],
            ok: false,
        },
        Case {
            what: "zone file missing",
            config: base(),
            setup: |d| std::fs::remove_file(d.join(ZONE_FILE)).unwrap(),
            says: &["cannot read zone file", ZONE_FILE],
            ok: false,
        },
        Case {
            what: "zone syntax error, with its line",
            config: base(),
            setup: |d| append(&d.join(ZONE_FILE), "www IN BOGUS 1.2.3.4\n"),
            says: &["zone file", ".zone:17:", "BOGUS"],
            ok: false,
        },
        Case {
            what: "zone without SOA",
            config: base(),
            setup: |d| {
                let soa = |l: &&str| l.contains("IN SOA") || l.trim_start().starts_with(|c: char| c.is_ascii_digit());
                edit(&d.join(ZONE_FILE), |z| z.lines().filter(|l| !soa(l)).collect::<Vec<_>>().join("\n") + "\n")
            },
            says: &["SOA"],
            ok: false,
        },
        Case {
            what: "negative TTL and no NS: warnings only",
            config: base(),
            setup: |d| {
                edit(&d.join(ZONE_FILE), |z| {
                    z.replace("            0 )", "            300 )").replace("@    IN NS", ";")
                })
            },
            says: &["warning:", "negative TTL", "is 300", "no NS record", ": ok ("],
            ok: true,
        },
        Case {
            what: "database reached through a symlink",
            config: base().store("link.sqlite"),
            setup: |d| {
                std::fs::write(d.join("real.sqlite"), b"").unwrap();
                std::os::unix::fs::symlink(d.join("real.sqlite"), d.join("link.sqlite")).unwrap();
            },
            says: &["store.path", "symlink"],
            ok: false,
        },
        Case {
            what: "sequence ports inside the kernel's ephemeral range",
            config: base().pcap(nxknock::config::PcapConfig {
                sequence_ports: Some(format!("{eph}-{}", eph + 999)),
                ..Default::default()
            }),
            setup: nothing,
            says: &["sequence_ports", "ip_local_port_range"],
            ok: false,
        },
        Case {
            what: "hook program missing",
            config: base()
                .raw("[[service]]\nname = \"web\"\nproto = \"tcp\"\nport = 80\nhook = [\"/nonexistent/prog\"]"),
            setup: nothing,
            says: &["service", "hook", "/nonexistent/prog", "not an executable"],
            ok: false,
        },
    ];
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("nxknock.toml");
        case.config.write(&cfg).unwrap();
        (case.setup)(dir.path());
        let out = check(&cfg, None);
        let t = text(&out);
        assert_eq!(out.status.success(), case.ok, "{}: exit status: {t}", case.what);
        for needle in case.says {
            assert!(t.contains(needle), "{}: must say {needle:?}: {t}", case.what);
        }
        assert!(!dir.path().join("state").exists(), "{}: check-config created the database directory", case.what);
    }
}

#[test]
fn check_config_lists_errors_of_every_kind_at_once_and_finds_a_missing_firewall_tool() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nxknock.toml");
    ConfigBuilder::new(BackendKind::Nftables)
        .listen(["203.0.113.9:53".parse().unwrap()])
        .open_seconds(0)
        .write(&cfg)
        .unwrap();
    append(&dir.path().join(ZONE_FILE), "www IN BOGUS 1.2.3.4\n");
    let out = check(&cfg, Some(dir.path().to_str().unwrap())); // no nft in this PATH
    let t = text(&out);
    assert!(!out.status.success());
    for needle in ["firewall.open_seconds", "BOGUS", "cannot bind 203.0.113.9:53", "`nft` is not in PATH", "4 errors"] {
        assert!(t.contains(needle), "must say {needle:?}: {t}");
    }
    // The good config passes and says what it serves.
    let good = dir.path().join("good.toml");
    base().write(&good).unwrap();
    let out = check(&good, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(": ok (zone knock.example.com., 1 services)"), "{}", text(&out));
}

/// `user list`, `doors`, `user revoke` on a database that does not exist: a clear
/// error naming it, and no file or directory created.
#[test]
fn read_only_commands_create_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nxknock.toml");
    base().write(&cfg).unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    for args in [vec!["user", "list"], vec!["doors"], vec!["doors", "--json"], vec!["user", "revoke", "alice"]] {
        let out = Command::new(BIN)
            .args(&args)
            .args(["--config", cfg.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let t = text(&out);
        assert!(!out.status.success(), "{args:?} must fail: {t}");
        assert!(t.contains("state/db.sqlite") && t.contains("does not exist"), "{args:?}: {t}");
        let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(after, before, "{args:?} created something");
    }
    // An empty file where the database should be is not made into one by a reader.
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let db = dir.path().join("state/db.sqlite");
    std::fs::write(&db, b"").unwrap();
    let out = Command::new(BIN).args(["user", "list", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("is empty"), "{}", text(&out));
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "user list wrote into the empty file");
}

fn append(p: &Path, line: &str) {
    edit(p, |z| format!("{z}{line}"));
}

fn edit(p: &Path, f: impl FnOnce(String) -> String) {
    let z = std::fs::read_to_string(p).unwrap();
    std::fs::write(p, f(z)).unwrap();
}

/// The shipped unit: readiness through sd_notify, reload by SIGHUP, three
/// capabilities and nothing else; and `systemd-analyze verify` accepts it (where
/// installed), with the binary path pointed at the one under test.
#[test]
fn systemd_unit_is_valid_and_asks_for_little() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/systemd/nxknock.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW",
        "ProtectSystem=strict",
        "StateDirectory=nxknock",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit must say {line:?}");
    }
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: unit syntax not verified");
        return;
    };
    assert!(probe.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nxknock.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/nxknock", BIN)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "systemd-analyze verify: {}", text(&out));
}
