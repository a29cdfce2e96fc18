//! Attacks on the port-sequence listener, end to end: the real
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

const SEQ: &str = "61000-61999";

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
fn one_lost_syn_does_not_hand_the_sequence_to_an_observer() {
    if !require_root("one_lost_syn_does_not_hand_the_sequence_to_an_observer") {
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

/// The element a plain name carries, as the port sequence anyone can compute from
/// it (the code is public: the range is in every credential and on the wire).
fn as_sequence(name: &str) -> Vec<u16> {
    use nxknock::token::{SequenceCode, Token};
    let label = name.split('.').next().unwrap();
    let Ok(Token::Plain(element)) = Token::parse(label.as_bytes()) else { panic!("{name} is a plain knock") };
    SequenceCode::parse(SEQ).unwrap().encode(&element)
}

/// `[token] plain = "off"` is SECURITY.md's answer to "an on-path party resends a
/// plain knock from its own address". With sequences on, a plain name the server
/// refused (`plain-off`, nothing spent) stays live: whoever saw it on the way —
/// the relaying resolver included — sends it as a port sequence from its own
/// address, and the door opens for them.
#[test]
fn a_plain_name_refused_under_plain_off_cannot_open_as_a_sequence() {
    if !require_root("a_plain_name_refused_under_plain_off_cannot_open_as_a_sequence") {
        return;
    }
    let p = PcapConfig { sequence_ports: Some(SEQ.to_owned()), ..PcapConfig::default() };
    let s = Setup::with("revoff", config("nftables", 30).plain(PlainPolicy::Off).pcap(p));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("frank", &[]);

    // The user knocks with a bare name; plain = off refuses it without spending.
    let name = s.otp(&cred, 1).remove(0);
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.daemon.log_text().contains("plain-off"), "the plain knock was refused by policy");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "plain = off: nothing opened");

    // Whoever saw the name sends it as a SYN sequence from its own address.
    syns(&s.lab.attacker, &as_sequence(&name));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        try_connect(&s.lab.attacker, ssh_addr()).is_err(),
        "a name refused under plain = off opened for the attacker as a sequence:\n{}",
        s.daemon.log_text().lines().filter(|l| l.contains("door opened")).collect::<Vec<_>>().join("\n")
    );
}

/// The UDP knock port refuses a bare element (`plain-over-udp`) without spending
/// it, "because a bare element would open for whoever races a copy of the
/// datagram". With sequences on, the copy still opens: the observer re-sends the
/// element as a port sequence from its own address.
#[test]
fn a_plain_element_refused_over_udp_cannot_open_as_a_sequence() {
    if !require_root("a_plain_element_refused_over_udp_cannot_open_as_a_sequence") {
        return;
    }
    let p = PcapConfig { udp_port: Some(62201), sequence_ports: Some(SEQ.to_owned()), ..PcapConfig::default() };
    let s = Setup::with("revpudp", config("nftables", 30).pcap(p));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("gina", &[]);

    // The user sends a plain name's label to the UDP port (`echo LABEL > /dev/udp/...`).
    let name = s.otp(&cred, 1).remove(0);
    let sock = s.lab.client.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    sock.send_to(format!("{}\n", name.split('.').next().unwrap()).as_bytes(), (SERVER, 62201)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.daemon.log_text().contains("plain-over-udp"), "refused by name");

    // The observer who saw the datagram sends the element as a sequence.
    syns(&s.lab.attacker, &as_sequence(&name));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        try_connect(&s.lab.attacker, ssh_addr()).is_err(),
        "a plain element refused over UDP opened for the attacker as a sequence:\n{}",
        s.daemon.log_text().lines().filter(|l| l.contains("door opened")).collect::<Vec<_>>().join("\n")
    );
}

/// Replies to the server's own outbound UDP land on its ephemeral ports; knock
/// ports inside that range would count them as bad knocks and block the hosts the
/// server talks to (its resolver, say). So such a range is refused at start-up,
/// naming the sysctl, with nothing installed; outside it, the replies are no knocks.
#[test]
fn replies_to_the_servers_own_traffic_are_no_knocks() {
    if !require_root("replies_to_the_servers_own_traffic_are_no_knocks") {
        return;
    }
    let p = PcapConfig { sequence_ports: Some(SEQ.to_owned()), block_after: 2, ..PcapConfig::default() };
    {
        let lab = Lab::new("revephin").expect("lab");
        let out = lab.server.cmd("sysctl").args(["-qw", "net.ipv4.ip_local_port_range=61000 61999"]).output().unwrap();
        assert!(out.status.success(), "{}", out_text(&out));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("nxknock.toml");
        config("nftables", 30).pcap(p.clone()).write(&cfg).unwrap();
        let out = lab.server.cmd(BIN).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
        let text = out_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("ip_local_port_range") && text.contains("61000-61999"), "{text}");
        assert!(!lab.server.run(&["nft", "list", "tables"]).unwrap().contains("nxknock"), "nothing installed");
    }
    let s = Setup::with("reveph", config("nftables", 30).pcap(p));
    // A service the server talks to (its resolver, say), answering every datagram.
    let echo = s.lab.attacker.udp_bind(format!("{ATTACKER}:7777").parse().unwrap()).unwrap();
    echo.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let responder = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    for _ in 0..400 {
        let sock = s.lab.server.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
        sock.send_to(b"query", (ATTACKER, 7777)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    responder.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let log = s.daemon.log_text();
    assert!(
        !log.contains("source blocked"),
        "the host the server itself talked to was blocked:\n{}",
        log.lines().filter(|l| l.contains("blocked")).collect::<Vec<_>>().join("\n")
    );
}
