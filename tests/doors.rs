//! Door lifecycle end to end (issue: "Door lifecycle that fails closed"):
//! kernel expiry after SIGKILL, restart reconciliation, one daemon per table,
//! single-use doors, close knocks, per-user policy, IPv6, hooks, SIGTERM and
//! uninstall. Real daemon, real backends, real TCP in namespaces.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

fn out_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Wait (bounded) for `needle` in the daemon log.
fn wait_log(s: &Setup, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if s.daemon.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The door as the backend's own tool lists it (`nft list set`, `ipset list`).
fn tool_entry(s: &Setup, backend: &str) -> Option<String> {
    let (listing, entry) = match backend {
        "nftables" => (
            s.lab.server.run(&["nft", "list", "set", "inet", "nxknock", "doors4"]),
            format!("{CLIENT} . tcp . 22 timeout"),
        ),
        _ => (s.lab.server.run(&["ipset", "list", "nxknock-doors4"]), format!("{CLIENT},tcp:22 timeout")),
    };
    let listing = listing.unwrap();
    let at = listing.find(&entry)?;
    Some(listing[at..].lines().next().unwrap().to_owned())
}

fn sigkill_story(prefix: &str, backend: &'static str) {
    let mut s = Setup::new(prefix, backend, 5);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &cred);
    let mut held = connect_soon(&s.lab.client, ssh_addr()).expect("door opens");
    let opened = Instant::now();
    s.daemon.kill();
    // The daemon is dead: the door is still open for its window, the guard still drops others.
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "guard must hold while the daemon is down");
    if opened.elapsed() < Duration::from_secs(3) {
        assert!(try_connect(&s.lab.client, ssh_addr()).is_ok(), "door stays open for its window");
        // The kernel holds it with its own timeout, and `nxknock doors` still lists it.
        let entry = tool_entry(&s, backend).expect("the kernel set holds the door after SIGKILL");
        assert!(entry.contains(if backend == "nftables" { "timeout 5s" } else { "timeout" }), "{entry}");
        let listing = out_text(&s.nx_server(&["doors"]));
        assert!(listing.contains("alice") && listing.contains(&format!("{CLIENT}/32")), "{listing}");
    }
    assert!(
        wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(8)),
        "door must close in the kernel without the daemon"
    );
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    assert_eq!(tool_entry(&s, backend), None, "the kernel removed the door");
    assert!(echo_works(&mut held), "established connection continues");
}

#[test]
fn sigkill_during_open_door_nftables() {
    if !require_root("sigkill_during_open_door_nftables") {
        return;
    }
    sigkill_story("dkillnft", "nftables");
}

#[test]
fn sigkill_during_open_door_iptables() {
    if !require_root("sigkill_during_open_door_iptables") {
        return;
    }
    sigkill_story("dkillipt", "iptables");
}

fn restart_story(prefix: &str, backend: &'static str) {
    let mut s = Setup::new(prefix, backend, 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &cred);
    connect_soon(&s.lab.client, ssh_addr()).expect("door opens");
    assert!(wait_log(&s, "nxknock::doors: door opened"), "door recorded");

    // An operator's own table/chain must survive everything we do.
    let srv = &s.lab.server;
    match backend {
        "nftables" => {
            srv.run(&["nft", "add", "table", "inet", "operator"]).unwrap();
            srv.run(&["nft", "add", "chain", "inet", "operator", "mine"]).unwrap();
            // A stranger's door smuggled into our set while we were running.
            srv.run(&["nft", "add", "element", "inet", "nxknock", "doors4", "{ 198.18.0.3 . tcp . 22 timeout 60s }"])
                .unwrap();
        }
        _ => {
            srv.run(&["iptables", "-N", "OPERATOR"]).unwrap();
            srv.run(&["ipset", "add", "nxknock-doors4", "198.18.0.3,tcp:22", "timeout", "60"]).unwrap();
        }
    }
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_ok(), "the smuggled element works before the restart");

    s.restart();
    assert!(s.daemon.log_text().contains("adopted open door"), "{}", s.daemon.log_text());
    assert!(s.daemon.log_text().contains("removed a door no live record accounts for"), "{}", s.daemon.log_text());
    assert!(try_connect(&s.lab.client, ssh_addr()).is_ok(), "recorded door adopted across the restart");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "unrecorded door removed at restart");
    let srv = &s.lab.server;
    match backend {
        "nftables" => {
            assert!(srv.run(&["nft", "list", "chain", "inet", "operator", "mine"]).is_ok(), "operator table untouched")
        }
        _ => assert!(srv.run(&["iptables", "-L", "OPERATOR", "-n"]).is_ok(), "operator chain untouched"),
    }
    let listing = out_text(&s.nx_server(&["doors"]));
    assert!(listing.contains("alice") && listing.contains(&format!("{CLIENT}/32")), "{listing}");
}

#[test]
fn restart_adopts_and_cleans_nftables() {
    if !require_root("restart_adopts_and_cleans_nftables") {
        return;
    }
    restart_story("drstnft", "nftables");
}

#[test]
fn restart_adopts_and_cleans_iptables() {
    if !require_root("restart_adopts_and_cleans_iptables") {
        return;
    }
    restart_story("drstipt", "iptables");
}

#[test]
fn second_daemon_refuses_to_share_the_table() {
    if !require_root("second_daemon_refuses_to_share_the_table") {
        return;
    }
    let s = Setup::new("dtwo", "nftables", 30);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("second.toml");
    config("nftables", 30).listen([format!("{SERVER}:5353").parse().unwrap()]).write(&cfg).unwrap();
    let out = s
        .lab
        .server
        .cmd(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second daemon must not start");
    assert!(out_text(&out).contains("another nxknock daemon"), "{}", out_text(&out));
}

#[test]
fn sigterm_keeps_the_guard_and_uninstall_removes_it() {
    if !require_root("sigterm_keeps_the_guard_and_uninstall_removes_it") {
        return;
    }
    let mut s = Setup::new("dterm", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    // Refused while the daemon runs: it would leave the daemon guarding nothing.
    let out = s.nx_server(&["uninstall-firewall"]);
    assert!(!out.status.success() && out_text(&out).contains("stop `nxknock serve` first"), "{}", out_text(&out));
    let st = s.daemon.terminate(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(st.success(), "clean exit on SIGTERM: {st}");
    assert!(s.lab.server.run(&["nft", "list", "table", "inet", "nxknock"]).is_ok(), "guard table stays");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "guard still drops after SIGTERM");
    let out = s.nx_server(&["uninstall-firewall"]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(s.lab.server.run(&["nft", "list", "table", "inet", "nxknock"]).is_err(), "table removed");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_ok(), "port reachable once nxknock is uninstalled");
}

#[test]
fn single_use_door_admits_one_connection() {
    if !require_root("single_use_door_admits_one_connection") {
        return;
    }
    for (prefix, backend) in [("donceN", "nftables"), ("donceI", "iptables")] {
        let o = config(backend, 30).services([ServiceConfig { single_use: true, ..ssh() }]);
        let s = Setup::with(prefix, o);
        let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
        let cred = s.add_user("alice", &[]);
        s.dig_knock(&s.lab.client, &cred);
        let mut first = connect_soon(&s.lab.client, ssh_addr()).expect("first connection admitted");
        assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "{backend}: second new connection must be dropped");
        assert!(echo_works(&mut first), "{backend}: the admitted connection continues");
        let listing = out_text(&s.nx_server(&["doors"]));
        assert!(!listing.contains(CLIENT), "{backend}: consumed door is gone: {listing}");
    }
}

#[test]
fn close_knock_ends_the_users_doors_at_once() {
    if !require_root("close_knock_ends_the_users_doors_at_once") {
        return;
    }
    let s = Setup::new("dclose", "nftables", 60);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let out = s.knock(&s.lab.client, &cred, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    let mut held = connect_soon(&s.lab.client, ssh_addr()).expect("door opens");
    // No waiting for the log: a door the kernel admits through was recorded before it
    // opened, so `doors --json` names its user the moment the door works.
    let json = out_text(&s.nx_server(&["doors", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("doors --json is JSON");
    let d = &v.as_array().unwrap()[0];
    assert_eq!(d["user"], "alice");
    assert_eq!(d["service"], "ssh");
    assert_eq!(d["via"], "dns/udp");
    assert_eq!(d["addr"], CLIENT);
    assert!(d["seconds_left"].as_u64().unwrap() > 50, "{json}");

    let out = s.knock(&s.lab.client, &cred, &["--ip", CLIENT, "--close"]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(wait_log(&s, "door closed by close knock"), "{}", s.daemon.log_text());
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "closed at once, long before open_seconds");
    assert!(echo_works(&mut held), "the established connection is not cut");
    let json = out_text(&s.nx_server(&["doors", "--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json).unwrap(), serde_json::json!([]));
}

#[test]
fn policy_refusals_open_nothing() {
    if !require_root("policy_refusals_open_nothing") {
        return;
    }
    let o = config("nftables", 30).service(ServiceConfig::new("web", Proto::Tcp, 80));
    let s = Setup::with("dpolicy", o);
    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _web = echo_service(&s.lab.server, &format!("{SERVER}:80"));
    let web: SocketAddr = format!("{SERVER}:80").parse().unwrap();

    // Allowed networks: a valid knock from outside them opens nothing.
    let outsider = s.add_user("outsider", &["--from", "203.0.113.0/24"]);
    s.dig_knock(&s.lab.client, &outsider);
    assert!(wait_log(&s, "outside the user's --from networks"), "{}", s.daemon.log_text());
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err());
    assert!(try_connect(&s.lab.client, web).is_err());

    // Allowed services: asking for ssh with a web-only user opens nothing; all → web only.
    let webonly = s.add_user("webonly", &["--service", "web"]);
    // The client refuses to ask for it (exit 5) ...
    let out = s.knock(&s.lab.client, &webonly, &["--ip", CLIENT, "--service", "ssh"]);
    assert_eq!(out.status.code(), Some(5), "{}", out_text(&out));
    // ... and so does `otp`; the server refuses a bound name that asks anyway (made
    // here from a copy of the credential whose list of services was edited: the
    // list only informs the client), and spends nothing.
    let out = nx(&["otp", "--credential", webonly.to_str().unwrap(), "--ip", CLIENT, "--service", "ssh"], &[]);
    assert_eq!(out.status.code(), Some(5), "{}", out_text(&out));
    let edited = webonly.with_extension("edited");
    let text = std::fs::read_to_string(&webonly).unwrap();
    assert!(text.contains("services = [\"web\"]"), "{text}");
    std::fs::write(&edited, text.replace("services = [\"web\"]", "services = []")).unwrap();
    std::fs::set_permissions(&edited, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = nx(&["otp", "--credential", edited.to_str().unwrap(), "--ip", CLIENT, "--service", "ssh"], &[]);
    assert!(out.status.success(), "{}", out_text(&out));
    let name = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    assert!(wait_log(&s, "no permitted service"), "{}", s.daemon.log_text());
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err());
    s.dig_knock(&s.lab.client, &webonly);
    connect_soon(&s.lab.client, web).expect("web-only user opens web");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "but not ssh");

    // Maximum open time: the door closes after the user's limit, not the service's 30 s.
    let brief = s.add_user("brief", &["--max-open", "2", "--service", "ssh"]);
    s.dig_knock(&s.lab.attacker, &brief);
    connect_soon(&s.lab.attacker, ssh_addr()).expect("brief user's door opens");
    assert!(wait_closed(&s.lab.attacker, ssh_addr(), Duration::from_secs(6)), "closes after --max-open");
}

#[test]
fn ipv6_knocks_open_ipv6_doors() {
    if !require_root("ipv6_knocks_open_ipv6_doors") {
        return;
    }
    let server6 = "2001:db8:18::1";
    let ssh6: SocketAddr = format!("[{server6}]:22").parse().unwrap();
    for (prefix, backend) in [("dv6nft", "nftables"), ("dv6ipt", "iptables")] {
        let o = config(backend, 30).also_listen(format!("[{server6}]:53").parse().unwrap());
        let s = Setup::with(prefix, o);
        let _svc = echo_service(&s.lab.server, &format!("[{server6}]:22"));
        // An attacker address in another /64.
        let far: IpAddr = "2001:db8:19::3".parse().unwrap();
        s.lab.attacker.add_addr(far, 64).unwrap();
        let cred = s.add_user("alice", &[]);
        assert!(s.lab.client.tcp_connect(ssh6, Duration::from_millis(400)).is_err(), "{backend}: closed before knock");

        // Plain knock over IPv6 with dig: the door is the client's /64.
        let name = s.otp(&cred, 1).remove(0);
        let d = dig(&s.lab.client, &[&format!("@{server6}"), "+norec", &name, "AAAA"]);
        assert_eq!((d.status.as_str(), d.aa), ("NXDOMAIN", true), "{}", d.text);
        let mut ok = false;
        for _ in 0..5 {
            if s.lab.client.tcp_connect(ssh6, Duration::from_millis(300)).is_ok() {
                ok = true;
                break;
            }
        }
        assert!(ok, "{backend}: IPv6 door opens for the client");
        assert!(
            s.lab.attacker.tcp_connect_from(far, ssh6, Duration::from_millis(400)).is_err(),
            "{backend}: other /64 dropped"
        );
        let listing = out_text(&s.nx_server(&["doors"]));
        assert!(listing.contains("2001:db8:18::/64"), "{backend}: {listing}");
    }
}

#[test]
fn bound_ipv6_knock_over_ipv4_opens_the_embedded_prefix() {
    if !require_root("bound_ipv6_knock_over_ipv4_opens_the_embedded_prefix") {
        return;
    }
    let s = Setup::new("dv6bound", "nftables", 30);
    let server6 = "2001:db8:18::1";
    let ssh6: SocketAddr = format!("[{server6}]:22").parse().unwrap();
    let _svc = echo_service(&s.lab.server, &format!("[{server6}]:22"));
    let other: IpAddr = "2001:db8:18::99".parse().unwrap();
    s.lab.client.add_addr(other, 64).unwrap();
    let cred = s.add_user("alice", &[]);
    let out = s.knock(&s.lab.attacker, &cred, &["--ip", "2001:db8:18::2"]);
    assert!(out.status.success(), "{}", out_text(&out));
    let mut ok = false;
    for _ in 0..5 {
        if s.lab.client.tcp_connect_from(other, ssh6, Duration::from_millis(300)).is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "any address of the embedded /64 is admitted");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "not the IPv4 sender");
}

#[test]
fn hooks_run_with_the_doors_fields_and_failures_change_nothing() {
    if !require_root("hooks_run_with_the_doors_fields_and_failures_change_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("hook.out");
    let hook = |args: &[&str]| Some(args.iter().map(|a| a.to_string()).collect());
    let echo = format!("echo \"$0 $NXKNOCK_USER $NXKNOCK_VIA\" >> {}", out_file.display());
    let fields = "{event} {addr}/{prefix} {service} {proto} {port} {seconds}";
    let o = config("nftables", 30).services([
        ServiceConfig { hook: hook(&["/bin/sh", "-c", &echo, fields]), ..ssh() },
        ServiceConfig { hook: hook(&["/bin/false"]), ..ServiceConfig::new("web", Proto::Tcp, 80) },
        ServiceConfig {
            hook: hook(&["/bin/sleep", "60"]),
            hook_timeout_seconds: 1,
            ..ServiceConfig::new("alt", Proto::Tcp, 8080)
        },
    ]);
    let s = Setup::with("dhook", o);
    let _a = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _b = echo_service(&s.lab.server, &format!("{SERVER}:80"));
    let _c = echo_service(&s.lab.server, &format!("{SERVER}:8080"));
    let cred = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &cred);
    connect_soon(&s.lab.client, ssh_addr()).expect("ssh door opens");
    connect_soon(&s.lab.client, format!("{SERVER}:80").parse().unwrap()).expect("failing hook changes nothing");
    assert!(wait_log(&s, "hook failed"), "{}", s.daemon.log_text());
    assert!(wait_log(&s, "hook timed out"), "{}", s.daemon.log_text());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !out_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert_eq!(got.trim(), format!("open {CLIENT}/32 ssh tcp 22 30 alice dns/udp"));
    assert!(try_connect(&s.lab.client, format!("{SERVER}:8080").parse().unwrap()).is_ok(), "slow hook changes nothing");
}

/// The `field` (`latency_us`: packet receipt → door in the kernel;
/// `firewall_us`: the backend's share) of each "door opened" line that has it.
fn open_field(log: &str, field: &str) -> Vec<u64> {
    let key = format!("{field}=");
    log.lines()
        .filter(|l| l.contains("door opened"))
        .filter_map(|l| l.split(&key).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

fn open_latencies(log: &str) -> Vec<u64> {
    open_field(log, "latency_us")
}

/// "median m (min a, max b)" of `v`, or "-" if empty.
fn spread(mut v: Vec<u64>) -> String {
    v.sort_unstable();
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => format!("median {} (min {lo}, max {hi})", v[v.len() / 2]),
        _ => "-".into(),
    }
}

/// Knocks `KNOCKS` times with fresh names and checks that the daemon ran no
/// firewall tool for any of them: after start-up (guard, reconcile) doors go
/// over netlink. The exec module logs every command it runs ("firewall
/// command", debug), and the test daemon logs nxknock at debug. Prints the
/// median knock-to-open latency for information; asserts no timing.
fn knocks_spawn_nothing(prefix: &str, backend: &'static str) {
    const KNOCKS: usize = 20;
    let s = Setup::new(prefix, backend, 30);
    let cred = s.add_user("alice", &[]);
    let names = s.otp(&cred, KNOCKS as u64);
    // The daemon notices the new user (and re-checks its doors once, with the tool);
    // from then on only knocks happen.
    std::thread::sleep(Duration::from_millis(600));
    let before_knocks = s.daemon.log_text().len();
    for (i, name) in names.iter().enumerate() {
        let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", name]);
        assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
        let deadline = Instant::now() + Duration::from_secs(5);
        while open_latencies(&s.daemon.log_text()).len() <= i {
            assert!(Instant::now() < deadline, "{backend}: knock {i} opened no door:\n{}", s.daemon.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let log = s.daemon.log_text();
    let lat = open_latencies(&log);
    assert_eq!(lat.len(), KNOCKS, "{log}");
    eprintln!(
        "{backend}: {KNOCKS} knocks: latency_us {}; verified_us {}; firewall_us {}",
        spread(lat),
        spread(open_field(&log, "verified_us")),
        spread(open_field(&log, "firewall_us"))
    );
    let queued: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("knock picked up"))
        .filter_map(|l| l.split("queued_us=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    eprintln!("{backend}: queued_us (packet received → verifier picks the knock up) {}", spread(queued));
    let (start_up, knocks) = log.split_at(before_knocks);
    assert!(start_up.contains("firewall command"), "the exec module's debug log is not in the daemon log:\n{log}");
    let spawned: Vec<&str> = knocks.lines().filter(|l| l.contains("firewall command")).collect();
    assert!(spawned.is_empty(), "{backend}: knocks ran firewall tools:\n{}", spawned.join("\n"));
}

#[test]
fn knocks_spawn_no_process_nftables() {
    if !require_root("knocks_spawn_no_process_nftables") {
        return;
    }
    knocks_spawn_nothing("dspawnN", "nftables");
}

#[test]
fn knocks_spawn_no_process_iptables() {
    if !require_root("knocks_spawn_no_process_iptables") {
        return;
    }
    knocks_spawn_nothing("dspawnI", "iptables");
}
