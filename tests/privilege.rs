//! Least privilege, read from `/proc`: once started, every thread of the daemon
//! holds only CAP_NET_ADMIN, CAP_NET_BIND_SERVICE and CAP_NET_RAW (effective,
//! permitted, inheritable, ambient and bounding sets) with `no_new_privs`; a hook
//! runs with no capability at all; and the daemon still opens doors, answers and
//! blocks (the nft child it runs keeps CAP_NET_ADMIN). Needs root; under `CI=true`
//! the test fails rather than skip.

mod common;

use std::time::Duration;

use common::*;
use nxknock::config::PcapConfig;

/// CAP_NET_BIND_SERVICE (10) | CAP_NET_ADMIN (12) | CAP_NET_RAW (13).
const KEPT: u64 = (1 << 10) | (1 << 12) | (1 << 13);

fn field(status: &str, name: &str) -> u64 {
    let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {status}"));
    let value = line.split_whitespace().nth(1).unwrap();
    if name == "NoNewPrivs:" { value.parse().unwrap() } else { u64::from_str_radix(value, 16).unwrap() }
}

/// Two bad datagrams from the attacker (`block_after = 2`): the block reaches the
/// kernel through `nft`, a child that must keep CAP_NET_ADMIN.
fn assert_a_block_reaches_the_kernel(s: &Setup) {
    let sock = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    for _ in 0..2 {
        sock.send_to(b"garbage", (SERVER, 62201)).unwrap();
    }
    let mut listed = String::new();
    let blocked = wait_until(Duration::from_secs(5), || {
        listed = String::from_utf8_lossy(&s.nx_server(&["doors", "--blocked"]).stdout).into_owned();
        listed.contains(ATTACKER)
    });
    assert!(blocked, "the block reached the kernel: {listed}\n{}", s.daemon.log_text());
}

#[test]
fn the_daemon_keeps_three_capabilities_and_hooks_none() {
    if !require_root("the_daemon_keeps_three_capabilities_and_hooks_none") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hook.status");
    let hook = format!("cat /proc/self/status > {}", out.display());
    let o = config("nftables", 30)
        .services([ServiceConfig { hook: Some(vec!["/bin/sh".into(), "-c".into(), hook]), ..ssh() }])
        .pcap(PcapConfig { udp_port: Some(62201), block_after: 2, ..PcapConfig::default() });
    let s = Setup::with("privdrop", o);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    assert!(s.daemon.log_text().contains("privileges reduced"), "{}", s.daemon.log_text());

    // Every thread: the three capabilities, nothing else, and no_new_privs.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", s.daemon.pid())).unwrap();
    let mut threads = 0;
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let name = status.lines().next().unwrap().to_owned();
        for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
            assert_eq!(field(&status, set), KEPT, "{name}: {set} {:#x}", field(&status, set));
        }
        assert_eq!(field(&status, "NoNewPrivs:"), 1, "{name}: no_new_privs");
        threads += 1;
    }
    assert!(threads >= 4, "all of the daemon's threads were read ({threads})");

    // It still works: a knock opens (netlink), the hook runs, and a block reaches
    // the kernel through `nft` (a child that keeps CAP_NET_ADMIN).
    let cred = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &cred);
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "doors still open");
    let hook = wait_for_file(&out, Duration::from_secs(5)).expect("the hook ran");
    for set in ["CapEff:", "CapPrm:", "CapAmb:", "CapInh:"] {
        assert_eq!(field(&hook, set), 0, "the hook holds no capability: {set}");
    }
    assert_a_block_reaches_the_kernel(&s);
}

/// `[daemon] user`: the daemon becomes an unprivileged user once started (keeping
/// the three capabilities), so neither it nor its hooks are uid 0 any more: the
/// hook cannot read the database, while the daemon still spends elements in it
/// (through the descriptors it opened as root) and still opens doors and blocks.
#[test]
fn the_daemon_can_run_as_an_unprivileged_user() {
    if !require_root("the_daemon_can_run_as_an_unprivileged_user") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = dir.path().join("hook.out");
    // The database in a private directory of root's; the hook's output beside it.
    let db_dir = dir.path().join("db");
    std::fs::create_dir(&db_dir).unwrap();
    std::fs::set_permissions(&db_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let db = db_dir.join("nxknock.db");
    let hook = format!("{{ id -u; head -c 15 {} || echo unreadable; }} > {} 2>&1", db.display(), out.display());
    let mut o = config("nftables", 30)
        .store(&db)
        .services([ServiceConfig { hook: Some(vec!["/bin/sh".into(), "-c".into(), hook]), ..ssh() }])
        .pcap(PcapConfig { udp_port: Some(62201), block_after: 2, ..PcapConfig::default() });
    o.config_mut().daemon = Some(nxknock::config::DaemonConfig { user: "nobody".into() });
    let s = Setup::with("privuser", o);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    for task in std::fs::read_dir(format!("/proc/{}/task", s.daemon.pid())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_owned();
        assert!(uid.split_whitespace().skip(1).all(|u| u == "65534"), "every thread runs as nobody: {uid}");
        assert_eq!(field(&status, "CapEff:"), KEPT, "{status}");
    }
    // Still spends elements and opens doors, and still blocks through nft.
    let cred = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &cred);
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "doors still open: {}", s.daemon.log_text());
    assert_a_block_reaches_the_kernel(&s);
    // The hook ran as nobody and could not read the database.
    let hook = wait_for_file(&out, Duration::from_secs(5)).expect("the hook ran");
    assert!(hook.starts_with("65534\n"), "the hook runs as nobody: {hook}");
    assert!(!hook.contains("SQLite format"), "the hook cannot read the database: {hook}");
}
