//! Review (attacker's eye) of the port-sequence listener, end to end: the real
//! daemon capturing in the server namespace, nftables, and a real TCP connect at
//! the end. Needs root; under `CI=true` the test fails rather than skip.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use nxknock::config::PcapConfig;
use nxknock::direct::{Direct, send_sequence};

const SEQ: &str = "40000-40999";

fn out_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn syns(ns: &Netns, ports: &[u16]) {
    let server: IpAddr = SERVER.parse().unwrap();
    ns.enter(|| send_sequence(server, ports, Direct::TcpSequence)).expect("send SYNs");
}

fn ports_of(cred: &Path) -> Vec<u16> {
    let out = nx(&["otp", "--credential", cred.to_str().unwrap(), "--via", "tcp"], &[]);
    assert!(out.status.success(), "otp --via tcp: {}", out_text(&out));
    let line = String::from_utf8(out.stdout).unwrap();
    line.split_whitespace().map(|p| p.parse().expect("a port")).collect()
}

/// One SYN of the user's 18 is lost on the way. The listener then waits
/// FINISH_IDLE (300 ms) to recover it from the parity digit. An observer who saw
/// the other 17 — it needs to drop nothing, only to watch — knows the whole
/// element (the missing digit follows from the parity), sends the complete
/// sequence from its own address inside that window, and the element opens for
/// it; the user's recovered sequence is then a replay.
#[test]
fn review_one_lost_syn_does_not_hand_the_sequence_to_an_observer() {
    if !require_root("review_one_lost_syn_does_not_hand_the_sequence_to_an_observer") {
        return;
    }
    let p = PcapConfig { sequence_ports: Some(SEQ.to_owned()), ..PcapConfig::default() };
    let s = Setup::with("revseq", config("nftables", 30).pcap(p));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("erin", &[]);
    let ports = ports_of(&cred);
    assert_eq!(ports.len(), 18);

    // The user's sequence with its fifth SYN lost; the observer saw the rest.
    let mut sent = ports.clone();
    sent.remove(4);
    syns(&s.lab.client, &sent);
    syns(&s.lab.attacker, &ports);
    std::thread::sleep(Duration::from_millis(800));
    let attacker = try_connect(&s.lab.attacker, ssh_addr()).is_ok();
    let user = try_connect(&s.lab.client, ssh_addr()).is_ok();
    assert!(
        !attacker && user,
        "attacker got in: {attacker}, user got in: {user}\n{}",
        s.daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("door") || l.contains("refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
