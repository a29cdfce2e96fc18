//! Least privilege, read from `/proc`: once started, every thread of the daemon
//! holds only CAP_NET_ADMIN, CAP_NET_BIND_SERVICE and CAP_NET_RAW (effective,
//! permitted, inheritable, ambient and bounding sets) with `no_new_privs`; a hook
//! runs with no capability at all; and the daemon still opens doors, answers and
//! blocks (the nft child it runs keeps CAP_NET_ADMIN). Needs root; under `CI=true`
//! the test fails rather than skip.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nxknock::config::PcapConfig;

/// CAP_NET_BIND_SERVICE (10) | CAP_NET_ADMIN (12) | CAP_NET_RAW (13).
const KEPT: u64 = (1 << 10) | (1 << 12) | (1 << 13);

fn field(status: &str, name: &str) -> u64 {
    let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {status}"));
    let value = line.split_whitespace().nth(1).unwrap();
    if name == "NoNewPrivs:" { value.parse().unwrap() } else { u64::from_str_radix(value, 16).unwrap() }
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while !out.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let hook = std::fs::read_to_string(&out).expect("the hook ran");
    for set in ["CapEff:", "CapPrm:", "CapAmb:", "CapInh:"] {
        assert_eq!(field(&hook, set), 0, "the hook holds no capability: {set}");
    }
    let sock = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    for _ in 0..2 {
        sock.send_to(b"garbage", (SERVER, 62201)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut listed = String::new();
    while Instant::now() < deadline && !listed.contains(ATTACKER) {
        listed = String::from_utf8_lossy(&s.nx_server(&["doors", "--blocked"]).stdout).into_owned();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(listed.contains(ATTACKER), "the block reached the kernel: {listed}\n{}", s.daemon.log_text());
}
