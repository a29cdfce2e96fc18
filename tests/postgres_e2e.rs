//! Two nameservers sharing one PostgreSQL database (issue: "Several nameservers
//! and a fleet of protected hosts, sharing state in PostgreSQL"), in namespaces:
//! nameservers on `srv` (198.18.0.1) and `ns2` (198.18.0.11), the database on
//! `db` (198.18.0.40), the user on `cli`, the attacker on `atk`. Real
//! `nxknock serve` twice, a real cluster, real dig, nftables and TCP.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use nxknock::lab::postgres::Postgres;

const NS2: &str = "198.18.0.11";
const DB: &str = "198.18.0.40";

fn out_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// One nameserver's config: listening on `addr`, storing in the shared database.
fn write_config(dir: &Path, name: &str, addr: &str, url: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("nxknock.toml");
    config("nftables", 30).listen([format!("{addr}:53").parse().unwrap()]).store_url(url).write(&path).unwrap();
    path
}

/// A bound knock name for the client's address, not sent.
fn otp_bound(cred: &Path) -> String {
    let out = nx(&["otp", "--credential", cred.to_str().unwrap(), "--ip", CLIENT], &[]);
    assert!(out.status.success(), "otp --ip: {}", out_text(&out));
    String::from_utf8(out.stdout).unwrap().lines().next().expect("one bound name").to_owned()
}

fn knock_at(ns: &Netns, server: &str, name: &str) {
    let d = dig(ns, &[&format!("@{server}"), "+norec", "+tries=1", "+time=2", name]);
    assert_eq!(d.status, "NXDOMAIN", "the knock is answered like any other name: {}", d.text);
}

fn count(d: &Daemon, needle: &str) -> usize {
    d.log_text().matches(needle).count()
}

/// Every thread of `pid`: no capability beyond CAP_NET_ADMIN, CAP_NET_BIND_SERVICE
/// and CAP_NET_RAW, and no_new_privs.
fn assert_threads_restricted(pid: u32) {
    const KEPT: u64 = (1 << 10) | (1 << 12) | (1 << 13);
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(1).unwrap().to_owned()
        };
        let name = status.lines().next().unwrap().to_owned();
        for set in ["CapEff:", "CapPrm:", "CapAmb:"] {
            let v = u64::from_str_radix(&field(set), 16).unwrap();
            assert_eq!(v & !KEPT, 0, "{name}: {set} {v:#x}");
        }
        assert_eq!(field("NoNewPrivs:"), "1", "{name}: no_new_privs");
        threads += 1;
    }
    assert!(threads >= 2, "{threads} threads read");
}

fn ssh_on(host: &str) -> SocketAddr {
    format!("{host}:22").parse().unwrap()
}

#[test]
fn two_nameservers_share_one_postgres_database() {
    if !require_root("two_nameservers_share_one_postgres_database") {
        return;
    }
    let mut lab = Lab::new("pgtwo").expect("lab");
    lab.add_host("ns2", NS2.parse().unwrap(), "2001:db8:18::11".parse().unwrap()).unwrap();
    lab.add_host("db", DB.parse().unwrap(), "2001:db8:18::40".parse().unwrap()).unwrap();
    let ns2 = lab.host("ns2").unwrap();
    let pg = Postgres::start("pgtwo", Some((lab.host("db").unwrap(), DB.parse().unwrap())))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = pg.url();
    let (c1, c2) = (write_config(dir, "ns1", SERVER, &url), write_config(dir, "ns2", NS2, &url));
    let mut d1 = start_daemon(&lab.server, &dir.join("ns1"), &c1);
    let mut d2 = start_daemon(ns2, &dir.join("ns2"), &c2);
    let _svc1 = echo_service(&lab.server, &format!("{SERVER}:22"));
    let _svc2 = echo_service(ns2, &format!("{NS2}:22"));
    // Enrolled through one nameserver's config (the database is reachable from the lab only).
    let cred = dir.join("alice.cred");
    let out = lab
        .server
        .cmd(BIN)
        .args(["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", c1.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "user add: {}", out_text(&out));

    // 1. The same bound knock at both nameservers at the same instant: accepted once.
    let name = otp_bound(&cred);
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for server in [SERVER, NS2] {
            let (name, barrier, client) = (&name, &barrier, &lab.client);
            s.spawn(move || {
                barrier.wait();
                knock_at(client, server, name);
            });
        }
    });
    assert!(
        wait_until(Duration::from_secs(5), || count(&d1, "door opened user=") + count(&d2, "door opened user=") == 1),
        "one door opened\n--- ns1:\n{}\n--- ns2:\n{}",
        d1.log_text(),
        d2.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || count(&d1, "repeat of an accepted knock")
            + count(&d2, "repeat of an accepted knock")
            == 1),
        "the other nameserver treats it as a repeat\n--- ns1:\n{}\n--- ns2:\n{}",
        d1.log_text(),
        d2.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&d1, "element spent") + count(&d2, "element spent"), 1, "spent exactly once");
    assert_eq!(count(&d1, "door opened user=") + count(&d2, "door opened user="), 1, "still one door");
    let winner = if count(&d1, "door opened user=") == 1 { SERVER } else { NS2 };
    let loser = if winner == SERVER { NS2 } else { SERVER };
    assert!(connect_soon(&lab.client, ssh_on(winner)).is_ok(), "the door is open on the accepting nameserver");
    assert!(try_connect(&lab.client, ssh_on(loser)).is_err(), "and on no other host");
    assert!(try_connect(&lab.attacker, ssh_on(winner)).is_err(), "the attacker stays out");

    // 2. Each nameserver's index follows the other's advances (LISTEN/NOTIFY): the
    // next knocks alternate and each opens where it arrives; a replay at the other fails.
    let before = (count(&d1, "door opened user="), count(&d2, "door opened user="));
    let loads = count(&d1, "verifier index loaded");
    let n2 = otp_bound(&cred);
    knock_at(&lab.client, NS2, &n2);
    assert!(
        wait_until(Duration::from_secs(5), || count(&d2, "door opened user=") == before.1 + 1),
        "{}",
        d2.log_text()
    );
    let n1 = otp_bound(&cred);
    knock_at(&lab.client, SERVER, &n1);
    assert!(
        wait_until(Duration::from_secs(5), || count(&d1, "door opened user=") == before.0 + 1),
        "{}",
        d1.log_text()
    );
    assert_eq!(
        count(&d1, "verifier index loaded"),
        loads,
        "ns1 followed ns2's chain move from the notification alone, without reloading its index"
    );
    // The element ns2 accepted, replayed at ns1 after the grace period would be a
    // replay; within it, a repeat: either way no door.
    knock_at(&lab.attacker, SERVER, &n2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&d1, "door opened user="), before.0 + 1, "a spent element opens nothing at the other nameserver");
    assert!(try_connect(&lab.attacker, ssh_on(SERVER)).is_err(), "the attacker replaying stays out");

    // 3. A killed nameserver leaves the other one working.
    d1.kill();
    let opened2 = count(&d2, "door opened user=");
    knock_at(&lab.client, NS2, &otp_bound(&cred));
    assert!(wait_until(Duration::from_secs(5), || count(&d2, "door opened user=") == opened2 + 1), "{}", d2.log_text());

    // 3b. A partition: the database host drops everything silently (no RST, no
    // answer). The nameserver must not hang on it: within seconds the store fails,
    // nothing opens, and once the path is back the next knock opens again.
    let db = lab.host("db").unwrap();
    for rule in [
        vec!["nft", "add", "table", "inet", "partition"],
        vec!["nft", "add", "chain", "inet", "partition", "in", "{ type filter hook input priority 0; policy drop; }"],
    ] {
        db.run(&rule).expect("partition the database host");
    }
    let (failed, opened) = (count(&d2, "fail closed"), count(&d2, "door opened user="));
    knock_at(&lab.client, NS2, &otp_bound(&cred));
    assert!(
        wait_until(Duration::from_secs(15), || count(&d2, "fail closed") > failed),
        "a silent database is noticed and fails closed within seconds: {}",
        d2.log_text()
    );
    assert_eq!(count(&d2, "door opened user="), opened, "nothing opens while the database is unreachable");
    db.run(&["nft", "delete", "table", "inet", "partition"]).expect("heal the partition");
    let healed = wait_until(Duration::from_secs(20), || {
        knock_at(&lab.client, NS2, &otp_bound(&cred));
        wait_until(Duration::from_millis(1500), || count(&d2, "door opened user=") == opened + 1)
    });
    assert!(healed, "a knock opens again once the database answers\n{}", d2.log_text());
    let opened2 = opened2 + 1;

    // 4. The database stops: knocks are still answered, nothing opens, no crash.
    pg.stop().unwrap();
    let failed = count(&d2, "fail closed");
    knock_at(&lab.client, NS2, &otp_bound(&cred));
    assert!(
        wait_until(Duration::from_secs(5), || count(&d2, "fail closed") > failed),
        "refused, fail closed: {}",
        d2.log_text()
    );
    assert_eq!(count(&d2, "door opened user="), opened2 + 1, "nothing opens while the database is down");
    assert!(d2.is_running(), "the nameserver keeps running");
    // 5. The database is back: the next knock opens, without restarting nxknock.
    pg.start_again().unwrap();
    let back = wait_until(Duration::from_secs(15), || {
        knock_at(&lab.client, NS2, &otp_bound(&cred));
        wait_until(Duration::from_millis(1500), || count(&d2, "door opened user=") == opened2 + 2)
    });
    assert!(back, "a knock opens again once the database is back\n{}", d2.log_text());
    assert!(d2.is_running());
    drop(d1);
}

const BASTION: &str = "198.18.0.20";

/// A nameserver config whose only openable service lives on the agent host "bastion".
fn write_ns_config(dir: &Path, name: &str, addr: &str, url: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("nxknock.toml");
    config("nftables", 30)
        .listen([format!("{addr}:53").parse().unwrap()])
        .store_url(url)
        .service(ServiceConfig { hosts: vec!["bastion".into()], ..ServiceConfig::new("bastion", Proto::Tcp, 2222) })
        .write(&path)
        .unwrap();
    path
}

fn write_agent_config(dir: &Path, url: &str) -> PathBuf {
    let d = dir.join("agent");
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nname = \"bastion\"\n\n[store]\nurl = \"{url}\"\n\n[firewall]\nbackend = \"nftables\"\nopen_seconds = 30\n\n\
             [[service]]\nname = \"bastion\"\nproto = \"tcp\"\nport = 2222\nhosts = [\"bastion\"]\n\n\
             [[service]]\nname = \"elsewhere\"\nproto = \"tcp\"\nport = 8080\nhosts = [\"other\"]\n"
        ),
    )
    .unwrap();
    path
}

fn start_agent(ns: &Netns, dir: &Path, config: &Path) -> Daemon {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    Serve::new(BIN, config, dir.join(format!("agent-{n}.log")))
        .agent()
        .log_filter("nxknock=debug,info")
        .start(ns)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn agent_opens_doors_granted_at_either_nameserver_on_its_host_only() {
    if !require_root("agent_opens_doors_granted_at_either_nameserver_on_its_host_only") {
        return;
    }
    let mut lab = Lab::new("pgagt").expect("lab");
    lab.add_host("ns2", NS2.parse().unwrap(), "2001:db8:18::11".parse().unwrap()).unwrap();
    lab.add_host("db", DB.parse().unwrap(), "2001:db8:18::40".parse().unwrap()).unwrap();
    lab.add_host("bast", BASTION.parse().unwrap(), "2001:db8:18::20".parse().unwrap()).unwrap();
    let (ns2, bast) = (lab.host("ns2").unwrap(), lab.host("bast").unwrap());
    let pg = Postgres::start("pgagt", Some((lab.host("db").unwrap(), DB.parse().unwrap())))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = pg.url();
    let (c1, c2) = (write_ns_config(dir, "ns1", SERVER, &url), write_ns_config(dir, "ns2", NS2, &url));
    let ca = write_agent_config(dir, &url);
    let d1 = start_daemon(&lab.server, &dir.join("ns1"), &c1);
    let d2 = start_daemon(ns2, &dir.join("ns2"), &c2);
    let mut agent = start_agent(bast, &dir.join("agent"), &ca);
    let _svc = echo_service(bast, &format!("{BASTION}:2222"));
    let _local = echo_service(&lab.server, &format!("{SERVER}:22"));
    let bastion: SocketAddr = format!("{BASTION}:2222").parse().unwrap();
    assert!(try_connect(&lab.client, bastion).is_err(), "the agent's guard is up before any knock");
    let cred = dir.join("alice.cred");
    let nx_in = |args: &[&str]| {
        let out = lab.server.cmd(BIN).args(args).args(["--config", c1.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", out_text(&out));
        out
    };
    nx_in(&["user", "add", "alice", "--service", "bastion", "--out", cred.to_str().unwrap()]);

    // A knock at either nameserver opens the door on the bastion, and nowhere else.
    let opened = |a: &Daemon| count(a, "door opened user=");
    for (i, server) in [SERVER, NS2].into_iter().enumerate() {
        if i > 0 {
            // The first door goes away (and the next grant is of a later second), so
            // only the second grant can let the client in.
            bast.run(&["nft", "flush", "set", "inet", "nxknock", "doors4"]).unwrap();
            assert!(try_connect(&lab.client, bastion).is_err(), "no door after the flush");
            std::thread::sleep(Duration::from_millis(1100));
        }
        knock_at(&lab.client, server, &otp_bound(&cred));
        assert!(
            wait_until(Duration::from_secs(5), || opened(&agent) == i + 1),
            "the agent opens the door granted at {server}\n--- agent:\n{}\n--- ns1:\n{}\n--- ns2:\n{}",
            agent.log_text(),
            d1.log_text(),
            d2.log_text()
        );
        let mut s = connect_soon(&lab.client, bastion).expect("the client reaches the bastion");
        assert!(echo_works(&mut s));
        assert!(try_connect(&lab.attacker, bastion).is_err(), "the attacker does not");
    }
    for d in [&d1, &d2] {
        assert_eq!(count(d, "door opened user="), 0, "no nameserver opened a door of its own");
        assert!(count(d, "door granted") >= 1 || d.log_text().contains("repeat"), "{}", d.log_text());
    }
    let set = lab.server.run(&["nft", "list", "set", "inet", "nxknock", "doors4"]).unwrap();
    assert!(!set.contains(CLIENT), "the nameserver's kernel holds no door for the client: {set}");
    assert!(try_connect(&lab.client, ssh_on(SERVER)).is_err(), "the nameserver's own ssh stays guarded");
    let agent_set = bast.run(&["nft", "list", "set", "inet", "nxknock", "doors4"]).unwrap();
    assert!(agent_set.contains(&format!("{CLIENT} . tcp . 2222")), "{agent_set}");

    // Least privilege holds with the database threads too: every thread of a
    // nameserver and of the agent keeps the network capabilities only.
    for p in [&d1, &d2, &agent] {
        assert_threads_restricted(p.pid());
    }

    // A grant made while the agent is down opens when it starts (reconcile from the database).
    agent.kill();
    bast.run(&["nft", "flush", "set", "inet", "nxknock", "doors4"]).unwrap();
    assert!(try_connect(&lab.client, bastion).is_err(), "no door after the flush");
    knock_at(&lab.client, NS2, &otp_bound(&cred));
    assert!(wait_until(Duration::from_secs(5), || count(&d2, "door granted") >= 2), "{}", d2.log_text());
    let agent = start_agent(bast, &dir.join("agent"), &ca);
    assert!(connect_soon(&lab.client, bastion).is_ok(), "reconciled at start:\n{}", agent.log_text());

    // Revoking the user closes the door on the bastion too.
    nx_in(&["user", "revoke", "alice"]);
    assert!(
        wait_closed(&lab.client, bastion, Duration::from_secs(5)),
        "a revoked user's door closes on the agent host\n{}",
        agent.log_text()
    );
    // A config whose services do not name this agent is refused with the key named.
    let bad = dir.join("agent").join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&ca).unwrap().replace("name = \"bastion\"\n\n[store]", "name = \"nobody\"\n\n[store]"),
    )
    .unwrap();
    let out = nx(&["agent", "--config", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success() && out_text(&out).contains("service"), "{}", out_text(&out));
}

#[test]
fn postgres_over_tls_checks_the_server_certificate() {
    if !require_root("postgres_over_tls_checks_the_server_certificate") {
        return;
    }
    let mut lab = Lab::new("pgtls").expect("lab");
    lab.add_host("db", DB.parse().unwrap(), "2001:db8:18::40".parse().unwrap()).unwrap();
    let pg = Postgres::start_with("pgtls", Some((lab.host("db").unwrap(), DB.parse().unwrap())), true)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = pg.ca_file();
    let run = |name: &str, url: &str, args: &[&str]| {
        let cfg = write_config(dir, name, SERVER, url);
        let out = lab.server.cmd(BIN).args(args).args(["--config", cfg.to_str().unwrap()]).output().unwrap();
        (out.status.success(), out_text(&out))
    };
    let tls = format!("{}?sslmode=verify-full&sslrootcert={}", pg.url(), ca.display());
    let cred = dir.join("alice.cred");
    let (ok, text) = run("tls", &tls, &["user", "add", "alice", "--out", cred.to_str().unwrap()]);
    assert!(ok, "user add over TLS: {text}");
    let (ok, text) = run("tls", &tls, &["user", "list"]);
    assert!(ok && text.contains("alice"), "{text}");
    // The server refuses clear connections from the lab: the ones above were TLS.
    let (ok, text) = run("clear", &pg.url(), &["user", "list"]);
    assert!(!ok && text.contains("no encryption"), "a clear connection is refused: {text}");
    // A server whose certificate does not chain to the named CA is not talked to.
    let other = dir.join("other-ca.pem");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-keyout", dir.join("other.key").to_str().unwrap(), "-out", other.to_str().unwrap()])
        .args(["-days", "1", "-subj", "/CN=someone else"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let wrong = format!("{}?sslmode=require&sslrootcert={}", pg.url(), other.display());
    let (ok, text) = run("wrong", &wrong, &["user", "list"]);
    assert!(!ok && text.to_lowercase().contains("certificate"), "an unknown CA is refused: {text}");
    let (ok, text) =
        run("missing", &format!("{}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", pg.url()), &["user", "list"]);
    assert!(!ok && text.contains("/nonexistent/ca.pem"), "a missing CA file is named: {text}");
}
