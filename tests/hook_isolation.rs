//! What a hook inherits from the daemon besides capabilities (`tests/privilege.rs`
//! shows it holds none): no descriptor the daemon opened while it was privileged —
//! in particular not the capture listener's raw packet socket. (That a hook still
//! runs as uid 0 and can read root's files is a documented limit, SECURITY.md.)
//! Needs root; under `CI=true` the test fails rather than skip.

mod common;

use std::time::Duration;

use common::*;
use nxknock::config::PcapConfig;

/// Start a daemon with `[pcap]` and a hook, knock, and return what the hook saw.
fn hook_output(prefix: &str) -> String {
    let mine = tempfile::tempdir().unwrap();
    let out = mine.path().join("hook.out");
    let db = mine.path().join("review.db");
    let script = format!(
        "exec > {out}.tmp 2>&1; echo uid=$(id -u); grep Cap /proc/$$/status; echo ==fds; ls -l /proc/$$/fd; echo ==packet; \
         cat /proc/net/packet; echo ==db; head -c 15 {db} && echo; echo ==end; mv {out}.tmp {out}",
        out = out.display(),
        db = db.display()
    );
    let o = config("nftables", 30)
        .store(&db)
        .services([ServiceConfig { hook: Some(vec!["/bin/sh".into(), "-c".into(), script]), ..ssh() }])
        .pcap(PcapConfig { udp_port: Some(62201), ..PcapConfig::default() });
    let s = Setup::with(prefix, o);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    s.dig_knock(&s.lab.client, &cred);
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "the door opened");
    wait_for_file(&out, Duration::from_secs(5)).expect("the hook ran")
}

fn section(text: &str, name: &str) -> String {
    let start = text.find(&format!("=={name}\n")).unwrap_or_else(|| panic!("{name} in {text}")) + name.len() + 3;
    text[start..].split("==").next().unwrap().to_owned()
}

#[test]
fn a_hook_inherits_no_capture_socket() {
    if !require_root("a_hook_inherits_no_capture_socket") {
        return;
    }
    let text = hook_output("revhooka");
    // Inodes of every AF_PACKET socket in the server's namespace (last column).
    let packet_inodes: Vec<String> = section(&text, "packet")
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    assert!(!packet_inodes.is_empty(), "the capture listener has a packet socket: {text}");
    for inode in &packet_inodes {
        assert!(
            !section(&text, "fds").contains(&format!("socket:[{inode}]")),
            "the hook holds the daemon's AF_PACKET socket (inode {inode}): it can read every packet on the \
             interface without CAP_NET_RAW\n\nhook output:\n{text}"
        );
    }
    // Nor anything else the daemon opened: the hook's shell holds only its standard
    // descriptors (stdout and stderr redirected to its own file).
    let listing = section(&text, "fds");
    let fds: Vec<&str> = listing.lines().filter(|l| l.contains(" -> ")).collect();
    // `ls -l` lines end in "FD -> TARGET": the word before the arrow is the descriptor.
    let fd_of = |l: &str| l.split(" -> ").next().and_then(|h| h.split_whitespace().last()).unwrap_or("").to_owned();
    assert!(fds.iter().any(|l| fd_of(l) == "1"), "the listing was read: {listing}");
    let extra: Vec<&&str> = fds.iter().filter(|l| !["0", "1", "2"].contains(&fd_of(l).as_str())).collect();
    assert!(extra.is_empty(), "the hook inherited descriptors beyond 0, 1, 2: {extra:?}\n\nhook output:\n{text}");
}
