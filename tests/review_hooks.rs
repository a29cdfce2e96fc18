//! Review (attacker's eye): what a hook inherits from the daemon besides
//! capabilities. `tests/privilege.rs` shows the hook holds no capability; this
//! looks at what it can still reach: descriptors the daemon opened while it was
//! privileged (the capture listener's AF_PACKET socket), and the secret database,
//! which a process with no capability but uid 0 still owns. Needs root; under
//! `CI=true` the test fails rather than skip.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nxknock::config::PcapConfig;

#[test]
fn review_a_hook_inherits_no_capture_socket_and_cannot_read_the_database() {
    if !require_root("review_a_hook_inherits_no_capture_socket_and_cannot_read_the_database") {
        return;
    }
    let mine = tempfile::tempdir().unwrap();
    let out = mine.path().join("hook.out");
    let db = mine.path().join("review.db");
    let script = format!(
        "exec > {out}.tmp 2>&1; echo uid=$(id -u); echo ---fds; ls -l /proc/$$/fd; echo ---packet; \
         cat /proc/net/packet; echo ---db; head -c 15 {db} && echo; echo ---end; mv {out}.tmp {out}",
        out = out.display(),
        db = db.display()
    );
    let o = config("nftables", 30)
        .store(&db)
        .services([ServiceConfig { hook: Some(vec!["/bin/sh".into(), "-c".into(), script]), ..ssh() }])
        .pcap(PcapConfig { udp_port: Some(62201), ..PcapConfig::default() });
    let s = Setup::with("revhook", o);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &cred);
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "the door opened");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !out.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&out).expect("the hook ran");
    let section = |name: &str| {
        let start = text.find(&format!("---{name}\n")).unwrap_or_else(|| panic!("{name} in {text}")) + name.len() + 4;
        text[start..].split("---").next().unwrap().to_owned()
    };
    // Inodes of every AF_PACKET socket in the server's namespace (last column).
    let packet_inodes: Vec<String> =
        section("packet").lines().skip(1).filter_map(|l| l.split_whitespace().last().map(str::to_owned)).collect();
    assert!(!packet_inodes.is_empty(), "the capture listener has a packet socket: {text}");
    let mut problems = Vec::new();
    for inode in &packet_inodes {
        if section("fds").contains(&format!("socket:[{inode}]")) {
            problems.push(format!(
                "the hook holds the daemon's AF_PACKET socket (inode {inode}): it can read every packet without CAP_NET_RAW"
            ));
        }
    }
    if section("db").contains("SQLite format") {
        problems.push("the hook (uid 0, no capability) reads the secret database (MAC keys, verifiers)".to_owned());
    }
    assert!(problems.is_empty(), "{}\n\nhook output:\n{text}", problems.join("\n"));
}
