//! The operator's side of a running daemon (issue "Operator and user experience"):
//! SIGHUP reloads, systemd readiness, refused-knock logging, metrics, and a start-up
//! that fails cleanly. Real daemon, real nftables, real TCP in namespaces.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn out_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Wait (bounded) until `needle` appears `n` times in the daemon log.
fn wait_log_n(d: &Daemon, needle: &str, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if d.log_text().matches(needle).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn hup(d: &Daemon) {
    let st = std::process::Command::new("kill").args(["-HUP", &d.pid().to_string()]).status().unwrap();
    assert!(st.success(), "kill -HUP");
}

fn addr(port: u16) -> SocketAddr {
    format!("{SERVER}:{port}").parse().unwrap()
}

/// Every datagram systemd would have received, until none comes for `quiet`.
fn notifications(sock: &UnixDatagram, quiet: Duration) -> Vec<String> {
    sock.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 512];
    let mut out = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

/// Restart `s`'s daemon on its own config with `NOTIFY_SOCKET` set, at the default
/// log level (info), the way systemd runs it.
fn restart_as_systemd_would(s: &mut Setup, notify: Option<&Path>) {
    s.daemon.kill();
    let mut serve = Serve::new(BIN, s.daemon.config.clone(), s.dir.join("serve-info.log"));
    if let Some(p) = notify {
        serve = serve.env("NOTIFY_SOCKET", p.to_str().unwrap());
    }
    s.daemon = serve.start(&s.lab.server).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Service A (ssh) is guarded, a door is open; the config gains service B (alt,
/// tcp/2222) and SIGHUP applies it: the old door still admits, B is guarded and a
/// knock opens it. Then a file that does not parse, and one that breaks a rule, are
/// refused with the reason in the log, and the daemon goes on with the config it had.
#[test]
fn sighup_reload_adds_a_service_keeps_open_doors_and_refuses_broken_configs() {
    if !require_root("sighup_reload_adds_a_service_keeps_open_doors_and_refuses_broken_configs") {
        return;
    }
    let mut s = Setup::with("oprld", config("nftables", 120));
    let notify_path = s.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    restart_as_systemd_would(&mut s, Some(&notify_path));
    let ready = notifications(&notify, Duration::from_millis(500));
    assert!(ready.iter().any(|m| m.contains("READY=1")), "READY=1 once serving: {ready:?}");

    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _alt = echo_service(&s.lab.server, &format!("{SERVER}:2222"));
    let alice = s.add_user("alice", &[]);
    let bob = s.add_user("bob", &[]);
    assert!(try_connect(&s.lab.attacker, addr(2222)).is_ok(), "control: 2222 is not guarded yet");
    let spent = s.otp(&alice, 1).remove(0);
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &spent]);
    assert_eq!(d.status, "NXDOMAIN");
    let mut held = connect_soon(&s.lab.client, addr(22)).expect("door for ssh opens");

    // Add service B and reload.
    s.config = s.config.clone().service(ServiceConfig::new("alt", Proto::Tcp, 2222));
    s.config.write(&s.daemon.config).unwrap();
    hup(&s.daemon);
    assert!(wait_log_n(&s.daemon, "SIGHUP: config reloaded", 1), "{}", s.daemon.log_text());
    let around = notifications(&notify, Duration::from_millis(300));
    assert!(
        around.len() >= 2 && around[0].starts_with("RELOADING=1\nMONOTONIC_USEC=") && around[1].contains("READY=1"),
        "RELOADING=1 then READY=1 around the reload: {around:?}"
    );
    assert!(try_connect(&s.lab.client, addr(22)).is_ok(), "the door opened before the reload still admits");
    assert!(echo_works(&mut held), "the connection made before the reload continues");
    assert!(try_connect(&s.lab.attacker, addr(2222)).is_err(), "the new service is guarded");
    s.dig_knock(&s.lab.client, &alice);
    connect_soon(&s.lab.client, addr(2222)).expect("a knock after the reload opens the new service");
    assert!(try_connect(&s.lab.attacker, addr(22)).is_err(), "and nothing for anyone else");
    // A reload forgets nothing: the element spent before it opens nothing now.
    let d = dig(&s.lab.attacker, &[&format!("@{SERVER}"), "+norec", &spent]);
    assert_eq!(d.status, "NXDOMAIN");
    std::thread::sleep(Duration::from_millis(300));
    assert!(try_connect(&s.lab.attacker, addr(22)).is_err(), "a spent element replayed after a reload opens nothing");
    assert!(try_connect(&s.lab.attacker, addr(2222)).is_err());

    // A file that does not parse: refused, the reason logged, the daemon goes on.
    let good = std::fs::read_to_string(&s.daemon.config).unwrap();
    std::fs::write(&s.daemon.config, "[dns\nlisten = [").unwrap();
    hup(&s.daemon);
    assert!(wait_log_n(&s.daemon, "reload refused", 1), "{}", s.daemon.log_text());
    let log = s.daemon.log_text();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(line.contains(s.daemon.config.to_str().unwrap()) && line.contains("TOML parse error"), "{line}");
    assert!(s.daemon.is_running(), "a broken config must not stop the daemon");

    // One that breaks a rule (port 0): refused by name.
    std::fs::write(&s.daemon.config, good.replace("port = 2222", "port = 0")).unwrap();
    hup(&s.daemon);
    assert!(wait_log_n(&s.daemon, "reload refused", 2), "{}", s.daemon.log_text());
    assert!(s.daemon.log_text().contains("service[1].port"), "{}", s.daemon.log_text());
    assert!(s.daemon.is_running());

    // Still opening with the config it had (ssh and alt): bob knocks from the third host.
    s.dig_knock(&s.lab.attacker, &bob);
    connect_soon(&s.lab.attacker, addr(2222)).expect("still opens with the last good config");
    assert!(try_connect(&s.lab.client, addr(22)).is_ok(), "alice's door survived two refused reloads");
    let metrics_reloads = s.daemon.log_text().matches("SIGHUP: config reloaded").count();
    assert_eq!(metrics_reloads, 1, "only the good file was applied");
}

fn scrape(s: &Setup, port: u16) -> String {
    let out = s
        .lab
        .server
        .cmd("curl")
        .args(["-sS", "--fail", "--max-time", "5", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", out_text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The value of one sample (`name{labels}`), 0 if absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A replayed knock is logged at the default level with `reason="replay"`; random
/// tokens are summed up instead of a line each; neither token ever reaches the log;
/// and `/metrics` (scraped with curl) counts all of it.
#[test]
fn refused_knocks_are_logged_by_reason_and_counted_in_metrics() {
    if !require_root("refused_knocks_are_logged_by_reason_and_counted_in_metrics") {
        return;
    }
    let mut b = config("nftables", 30).raw("[metrics]\nlisten = \"127.0.0.1:9153\"\n[log]\nsummary_seconds = 1\n");
    b.config_mut().token.grace_seconds = 1;
    let mut s = Setup::with("opmet", b);
    restart_as_systemd_would(&mut s, None);
    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);

    let before = scrape(&s, 9153);
    assert_eq!(sample(&before, "nxknock_knocks_total{result=\"open\"}"), 0.0, "{before}");
    assert!(before.contains("# TYPE nxknock_door_latency_seconds histogram"), "{before}");

    let name = s.otp(&alice, 1).remove(0);
    let token = name.split('.').next().unwrap().to_owned();
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN");
    connect_soon(&s.lab.client, ssh_addr()).expect("door opens");
    // Past the grace period the same name is a replay.
    std::thread::sleep(Duration::from_millis(2100));
    let d = dig(&s.lab.attacker, &[&format!("@{SERVER}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN", "a replay gets the same answer");
    assert!(wait_log_n(&s.daemon, "reason=\"replay\"", 1), "{}", s.daemon.log_text());
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the replay opened nothing");

    // Garbage from the internet: a few well-formed random tokens.
    let mut garbage = Vec::new();
    for _ in 0..3 {
        let e = nxknock::token::Element(rand::random());
        let label = nxknock::token::Token::Plain(e).to_label();
        dig(&s.lab.attacker, &[&format!("@{SERVER}"), "+norec", &format!("{label}.{ZONE}")]);
        garbage.push(label);
    }
    assert!(wait_log_n(&s.daemon, "knocks refused without a log line each", 1), "{}", s.daemon.log_text());

    let log = s.daemon.log_text();
    let replay = log.lines().find(|l| l.contains("reason=\"replay\"")).unwrap();
    assert!(replay.contains("INFO") && replay.contains("user=alice"), "{replay}");
    assert!(!log.contains("reason=\"unknown\""), "random tokens get no line each at info: {log}");
    let summary = log.lines().find(|l| l.contains("knocks refused without a log line each")).unwrap();
    assert!(summary.contains("INFO") && summary.contains("unknown=3"), "{summary}");
    let lower = log.to_ascii_lowercase();
    for t in std::iter::once(&token).chain(&garbage) {
        assert!(!lower.contains(&t.to_ascii_lowercase()), "a token reached the log: {t}\n{log}");
    }

    let after = scrape(&s, 9153);
    assert_eq!(sample(&after, "nxknock_knocks_total{result=\"open\"}"), 1.0, "{after}");
    assert_eq!(sample(&after, "nxknock_knocks_refused_total{reason=\"replay\"}"), 1.0, "{after}");
    assert_eq!(sample(&after, "nxknock_knocks_refused_total{reason=\"unknown\"}"), 3.0, "{after}");
    assert_eq!(sample(&after, "nxknock_door_latency_seconds_count"), 1.0, "{after}");
    assert!(sample(&after, "nxknock_queries_total") >= 5.0, "{after}");
    assert!(sample(&after, "nxknock_doors_open") >= 1.0, "{after}");
    // Nothing but /metrics, and only from this host.
    let other = s
        .lab
        .server
        .cmd("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9153/"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(other.stdout).unwrap(), "404");
    let remote = s
        .lab
        .client
        .cmd("curl")
        .args(["-sS", "--max-time", "2", &format!("http://{SERVER}:9153/metrics")])
        .output()
        .unwrap();
    assert!(!remote.status.success(), "metrics listen on loopback only");
}

/// `serve` binds before it installs the guard: an address it cannot bind stops it
/// with nothing left in the firewall.
#[test]
fn serve_that_cannot_bind_leaves_no_guard() {
    if !require_root("serve_that_cannot_bind_leaves_no_guard") {
        return;
    }
    let ns = Netns::new("opbind-srv").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nxknock.toml");
    ConfigBuilder::new(BackendKind::Nftables).listen(["203.0.113.9:53".parse().unwrap()]).write(&cfg).unwrap();
    let out = ns.cmd(BIN).args(["serve", "--config", cfg.to_str().unwrap()]).env_remove("RUST_LOG").output().unwrap();
    let t = out_text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("203.0.113.9:53") && t.contains("nothing was installed"), "{t}");
    assert!(ns.run(&["nft", "list", "table", "inet", "nxknock"]).is_err(), "a guard was left behind: {t}");
    // check-config says so too.
    let check = ns.cmd(BIN).args(["check-config", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!check.status.success() && out_text(&check).contains("cannot bind 203.0.113.9:53"), "{}", out_text(&check));
}

fn nx_ok(s: &Setup, args: &[&str]) -> String {
    let out = s.nx_server(args);
    assert!(out.status.success(), "{args:?}: {}", out_text(&out));
    out_text(&out)
}

/// The operator's door and user commands against a running daemon: `doors close
/// --user`, `doors close --address`, `user set --service`, `user delete` (which
/// closes the user's doors and frees the name).
#[test]
fn doors_close_user_set_and_user_delete_act_on_a_running_daemon() {
    if !require_root("doors_close_user_set_and_user_delete_act_on_a_running_daemon") {
        return;
    }
    let mut s = Setup::with("opusr", config("nftables", 120).service(ServiceConfig::new("alt", Proto::Tcp, 2222)));
    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _alt = echo_service(&s.lab.server, &format!("{SERVER}:2222"));
    let alice = s.add_user("alice", &[]);
    let bob = s.add_user("bob", &[]);
    s.dig_knock(&s.lab.client, &alice);
    s.dig_knock(&s.lab.attacker, &bob);
    connect_soon(&s.lab.client, addr(22)).expect("alice's door");
    connect_soon(&s.lab.attacker, addr(22)).expect("bob's door");

    let said = nx_ok(&s, &["doors", "close", "--user", "alice"]);
    assert!(said.contains("closed 2 door record(s) of alice"), "{said}");
    assert!(wait_closed(&s.lab.client, addr(22), Duration::from_secs(3)), "alice's door closes");
    assert!(try_connect(&s.lab.attacker, addr(22)).is_ok(), "bob's door stays");
    nx_ok(&s, &["doors", "close", "--address", ATTACKER]);
    assert!(wait_closed(&s.lab.attacker, addr(22), Duration::from_secs(3)), "the door for bob's address closes");

    nx_ok(&s, &["user", "set", "alice", "--service", "alt"]);
    s.dig_knock(&s.lab.client, &alice);
    connect_soon(&s.lab.client, addr(2222)).expect("alice may open alt");
    assert!(try_connect(&s.lab.client, addr(22)).is_err(), "but no longer ssh");

    nx_ok(&s, &["user", "delete", "alice"]);
    assert!(wait_closed(&s.lab.client, addr(2222), Duration::from_secs(3)), "a deleted user's doors close");
    s.dig_knock(&s.lab.client, &alice);
    std::thread::sleep(Duration::from_millis(300));
    assert!(try_connect(&s.lab.client, addr(2222)).is_err(), "a deleted user's knock opens nothing");
    assert!(!nx_ok(&s, &["user", "list"]).contains("alice"));
    let again = s.dir.join("alice2.cred");
    nx_ok(&s, &["user", "add", "alice", "--out", again.to_str().unwrap()]);
    s.dig_knock(&s.lab.client, &again);
    connect_soon(&s.lab.client, addr(22)).expect("the name was free again");

    let st = nx_ok(&s, &["status"]);
    assert!(st.contains("daemon:  running") && st.contains("users:   2 active, 0 revoked"), "{st}");
    s.daemon.kill();
    let st = s.nx_server(&["status"]);
    assert_eq!(st.status.code(), Some(3), "{}", out_text(&st));
    assert!(out_text(&st).contains("daemon:  not running"), "{}", out_text(&st));
    // Without a daemon, `doors close` takes the door out of the kernel itself.
    assert!(try_connect(&s.lab.client, addr(22)).is_ok(), "the door outlives the daemon");
    let said = nx_ok(&s, &["doors", "close", "--user", "alice"]);
    assert!(said.contains("no daemon is running: removed 2 kernel door(s)"), "{said}");
    assert!(try_connect(&s.lab.client, addr(22)).is_err(), "closed without a daemon");
}

/// The `none` backend opens nothing in the kernel, but `nxknock doors` lists what it
/// recorded.
#[test]
fn doors_lists_records_of_the_none_backend() {
    if !require_root("doors_lists_records_of_the_none_backend") {
        return;
    }
    let s = Setup::new("opnone", "none", 60);
    let alice = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &alice);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut listing = String::new();
    while Instant::now() < deadline && !listing.contains("alice") {
        listing = nx_ok(&s, &["doors"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        listing.contains("alice") && listing.contains(&format!("{CLIENT}/32")) && listing.contains("ssh"),
        "{listing}"
    );
}

/// `[firewall] always_allow`: a management host reaches the guarded port without a
/// knock; everyone else still needs one. Removing it and reloading (SIGHUP, nftables)
/// closes that way in again.
fn always_allow_story(prefix: &str, backend: &str) {
    let mgmt = "198.18.0.9";
    let b = config(backend, 30).raw(&format!("[firewall]\nalways_allow = [\"{mgmt}/32\", \"2001:db8:99::/48\"]"));
    let mut s = Setup::with(prefix, b);
    s.lab.add_host("mgmt", mgmt.parse().unwrap(), "2001:db8:18::9".parse().unwrap()).expect("add the management host");
    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let m = s.lab.host("mgmt").unwrap();
    let mut held = try_connect(m, ssh_addr()).expect("the management host needs no knock");
    assert!(echo_works(&mut held));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "anyone else is still dropped");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "the user too, before knocking");
    let alice = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &alice);
    connect_soon(&s.lab.client, ssh_addr()).expect("a knock still opens");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());

    if backend == "nftables" {
        s.config = s.config.clone().raw("[firewall]\nalways_allow = []");
        s.config.write(&s.daemon.config).unwrap();
        hup(&s.daemon);
        assert!(wait_log_n(&s.daemon, "SIGHUP: config reloaded", 1), "{}", s.daemon.log_text());
        let m = s.lab.host("mgmt").unwrap();
        assert!(try_connect(m, ssh_addr()).is_err(), "no longer allowed after the reload");
        assert!(echo_works(&mut held), "its established connection continues");
        assert!(try_connect(&s.lab.client, ssh_addr()).is_ok(), "the user's door survived the reload");
    }
}

#[test]
fn always_allow_admits_the_management_network_nftables() {
    if !require_root("always_allow_admits_the_management_network_nftables") {
        return;
    }
    always_allow_story("opallnft", "nftables");
}

#[test]
fn always_allow_admits_the_management_network_iptables() {
    if !require_root("always_allow_admits_the_management_network_iptables") {
        return;
    }
    always_allow_story("opallipt", "iptables");
}

/// `[log] format = "json"`: every line the daemon writes is one JSON object, with
/// the event's fields as fields (a log shipper needs no regex).
#[test]
fn json_log_is_one_object_a_line() {
    if !require_root("json_log_is_one_object_a_line") {
        return;
    }
    let s = Setup::with("opjson", config("nftables", 30).raw("[log]\nformat = \"json\""));
    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &alice);
    connect_soon(&s.lab.client, ssh_addr()).expect("door opens");
    assert!(wait_log_n(&s.daemon, "door opened", 1), "{}", s.daemon.log_text());
    let log = s.daemon.log_text();
    let events: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let opened = events
        .iter()
        .find(|e| e["fields"]["message"] == "door opened" && e["target"] == "nxknock::doors")
        .expect("the door-opened event");
    assert_eq!(opened["fields"]["user"], "alice", "{opened}");
    assert_eq!(opened["level"], "INFO", "{opened}");
}

/// The attacker captured one of alice's knocks and replays it in a loop to fill
/// the log (or hide something in it): past a few lines a second the replays are
/// only counted and summed up, the log stays small, and alice still gets in while
/// the attacker does not.
#[test]
fn a_replay_loop_cannot_flood_the_log() {
    if !require_root("a_replay_loop_cannot_flood_the_log") {
        return;
    }
    let mut b = config("nftables", 30).raw("[log]\nsummary_seconds = 1\n");
    b.config_mut().token.grace_seconds = 1;
    let mut s = Setup::with("opflood", b);
    restart_as_systemd_would(&mut s, None);
    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    let names = s.otp(&alice, 2);
    dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &names[0]]);
    connect_soon(&s.lab.client, ssh_addr()).expect("alice's door");
    // Past the grace period (whole seconds in the store), a copy is a replay.
    std::thread::sleep(Duration::from_millis(2100));

    let sock = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let started = Instant::now();
    for i in 0..2000u16 {
        let _ = sock.send_to(&a_query(i, &names[0]), format!("{SERVER}:53"));
    }
    assert!(wait_log_n(&s.daemon, "knocks refused without a log line each", 1), "{}", s.daemon.log_text());
    std::thread::sleep(Duration::from_millis(1200)); // the rest of the summary
    let log = s.daemon.log_text();
    let lines = log.lines().filter(|l| l.contains("reason=\"replay\"")).count();
    let seconds = started.elapsed().as_secs() as usize + 1;
    assert!(lines >= 1 && lines <= 20 * (seconds + 1), "{lines} replay lines in {seconds} s");
    let counted: u64 = log
        .lines()
        .filter(|l| l.contains("knocks refused without a log line each"))
        .filter_map(|l| l.split("replay=").nth(1))
        .map(|v| v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(counted > 0, "the replays past the limit are counted: {log}");
    assert!(log.len() < 200_000, "the log stayed small: {} bytes", log.len());

    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the replays opened nothing");
    dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &names[1]]);
    assert!(s.daemon.is_running());
    connect_soon(&s.lab.client, ssh_addr()).expect("alice's next knock opens");
}
