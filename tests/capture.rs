//! The capture listener end to end: UDP single-packet knocks, port-sequence
//! knocks, passive DNS beside knotd, and the block list — each with the real
//! daemon capturing with libpcap in the server namespace, a real firewall backend
//! and real TCP connections at the end that fail for the attacker and succeed for
//! the user. Needs root; under `CI=true` the tests fail rather than skip.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use nxknock::config::PcapConfig;
use nxknock::direct::{Direct, send_sequence};

const UDP_PORT: u16 = 62201;
const SEQ: &str = "61000-61999";

fn out_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn server_ip() -> IpAddr {
    SERVER.parse().unwrap()
}

fn pcap(udp: bool, seq: bool) -> PcapConfig {
    PcapConfig {
        udp_port: udp.then_some(UDP_PORT),
        sequence_ports: seq.then(|| SEQ.to_owned()),
        ..PcapConfig::default()
    }
}

/// One datagram with exactly `payload` from `ns` to the server's UDP knock port.
fn send_datagram(ns: &Netns, payload: &[u8]) {
    let sock = ns.udp_bind("0.0.0.0:0".parse().unwrap()).expect("udp socket");
    sock.send_to(payload, SocketAddr::new(server_ip(), UDP_PORT)).expect("send datagram");
}

/// SYNs from `ns` to `ports`, in the given order (non-blocking connects, abandoned).
fn syns(ns: &Netns, ports: &[u16]) {
    ns.enter(|| send_sequence(server_ip(), ports, Direct::TcpSequence)).expect("send SYNs");
}

/// `nxknock otp --via V [extra]`: one line, reserved in the credential.
fn otp_line(cred: &Path, via: &str, extra: &[&str]) -> String {
    let out = nx(&["otp", "--credential", cred.to_str().unwrap(), "--via", via], extra);
    assert!(out.status.success(), "otp --via {via}: {}", out_text(&out));
    String::from_utf8(out.stdout).unwrap().lines().next().expect("one line").to_owned()
}

fn ports_of(line: &str) -> Vec<u16> {
    line.split_whitespace().map(|p| p.parse().expect("a port")).collect()
}

/// The sources the kernel blocks (`nxknock doors --blocked --json`).
fn blocked(s: &Setup) -> Vec<String> {
    let out = s.nx_server(&["doors", "--blocked", "--json"]);
    assert!(out.status.success(), "doors --blocked: {}", out_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v.as_array().unwrap().iter().map(|e| e["source"].as_str().unwrap().to_owned()).collect()
}

fn wait_log(s: &Setup, needle: &str) -> bool {
    wait_until(Duration::from_secs(5), || s.daemon.log_text().contains(needle))
}

#[test]
fn udp_knock_opens_for_the_embedded_address_and_its_replay_opens_nothing() {
    if !require_root("udp_knock_opens_for_the_embedded_address_and_its_replay_opens_nothing") {
        return;
    }
    let s = Setup::with("capudp", config("nftables", 30).pcap(pcap(true, false)));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "guarded before any knock");

    // The attacker sees the user's datagram and sends it first: it opens for the
    // user's address only. Then the user's own copy is a repeat.
    let label = otp_line(&cred, "udp", &["--ip", CLIENT]);
    send_datagram(&s.lab.attacker, label.as_bytes());
    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("the door opens for the embedded address");
    assert!(echo_works(&mut conn));
    send_datagram(&s.lab.client, format!("{label}\n").as_bytes());
    send_datagram(&s.lab.attacker, label.as_bytes());

    // A stolen plain name in a datagram, garbage, a look-alike: nothing opens.
    let plain = s.otp(&cred, 1).remove(0);
    send_datagram(&s.lab.attacker, plain.split('.').next().unwrap().as_bytes());
    send_datagram(&s.lab.attacker, b"not a knock at all");
    let mut lookalike = label.clone().into_bytes();
    lookalike[30] = if lookalike[30] == b'a' { b'b' } else { b'a' };
    send_datagram(&s.lab.attacker, &lookalike);
    assert!(wait_log(&s, "reason=\"plain-over-udp\""), "the plain datagram is refused by name");
    std::thread::sleep(Duration::from_millis(300));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the attacker never gets in");

    // `nxknock knock --via udp` (port from the credential) for the user's next knock.
    let out = s.knock(&s.lab.client, &cred, &["--via", "udp", "--ip", CLIENT]);
    assert!(out.status.success(), "knock --via udp: {}", out_text(&out));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok());
    let log = s.daemon.log_text();
    assert!(log.contains("via=udp") && log.contains("door opened"), "{log}");
    assert!(!log.contains(&label), "the token never reaches the log");
}

#[test]
fn tcp_sequence_survives_duplicates_strangers_and_reordering_and_never_replays() {
    if !require_root("tcp_sequence_survives_duplicates_strangers_and_reordering_and_never_replays") {
        return;
    }
    let s = Setup::with("capseq", config("iptables", 3).pcap(pcap(false, true)));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("bob", &[]);

    // By hand, from the printed sequence: a retransmitted SYN, a stranger's SYN in
    // between, and a swapped pair.
    let ports = ports_of(&otp_line(&cred, "tcp", &[]));
    assert_eq!(ports.len(), 18);
    syns(&s.lab.client, &ports[..6]);
    syns(&s.lab.client, &[ports[2]]);
    syns(&s.lab.attacker, &[61444]);
    syns(&s.lab.client, &[ports[7], ports[6]]);
    syns(&s.lab.client, &ports[8..]);
    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("the sequence opens for the client");
    assert!(echo_works(&mut conn));

    // The attacker saw every SYN and replays the sequence from its own address.
    syns(&s.lab.attacker, &ports);
    std::thread::sleep(Duration::from_millis(400));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "a replayed sequence opens nothing");
    assert!(wait_log(&s, "via=tcp-seq"), "the replay reached the verifier");

    // The client with `nxknock knock --via tcp` and `--via udp-seq`.
    for via in ["tcp", "udp-seq"] {
        assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(6)), "door closes before the next knock");
        let out = s.knock(&s.lab.client, &cred, &["--via", via]);
        assert!(out.status.success(), "knock --via {via}: {}", out_text(&out));
        assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "--via {via} opens");
        assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    }
}

#[test]
fn passive_dns_beside_knotd_opens_on_a_dig_knock_and_ignores_its_replay() {
    if !require_root("passive_dns_beside_knotd_opens_on_a_dig_knock_and_ignores_its_replay") {
        return;
    }
    let passive = PcapConfig { passive_dns: true, ..PcapConfig::default() };
    let s = Setup::with("cappas", config("nftables", 30).listen(Vec::<SocketAddr>::new()).pcap(passive));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _knotd = nxknock::lab::knotd::start(&s.lab.server, &s.dir).expect("knotd answers");
    let cred = s.add_user("carol", &[]);

    let name = s.otp(&cred, 1).remove(0);
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN", "knotd answers the knock: {}", d.text);
    assert!(d.text.contains("flags: qr aa"), "{}", d.text);
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "the passive knock opens");

    // The attacker replays the same name: knotd answers it, nxknock opens nothing.
    let d = dig(&s.lab.attacker, &[&format!("@{SERVER}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN");
    assert!(wait_log(&s, "via=dns/passive"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "a replayed passive knock opens nothing");

    // A bound knock with the client: knotd's authoritative NXDOMAIN satisfies it.
    let out = s.knock(&s.lab.client, &cred, &["--ip", CLIENT]);
    assert!(out.status.success(), "knock through knotd: {}", out_text(&out));
    assert!(wait_log(&s, "door opened"));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
}

fn block_list_story(prefix: &str, backend: &str) {
    let p = PcapConfig { block_after: 3, block_seconds: 3, ..pcap(true, true) };
    let s = Setup::with(prefix, config(backend, 2).pcap(p));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("dave", &[]);

    // Three bad datagrams: blocked, in nxknock and in the kernel.
    for _ in 0..3 {
        send_datagram(&s.lab.client, b"garbage");
    }
    assert!(
        wait_until(Duration::from_secs(3), || blocked(&s).contains(&format!("{CLIENT}/32"))),
        "the source is blocked in the kernel: {:?}",
        blocked(&s)
    );
    assert!(wait_log(&s, "source blocked"));

    // While blocked, its sequence knocks are ignored...
    let out = s.knock(&s.lab.client, &cred, &["--via", "tcp"]);
    assert!(out.status.success(), "{}", out_text(&out));
    std::thread::sleep(Duration::from_millis(500));
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "a blocked source's sequence opens nothing");

    // ...but a bound knock still opens: a block never stops the knocker.
    let out = s.knock(&s.lab.client, &cred, &["--via", "udp", "--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "bound knocks pass the block list");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());

    // The block lifts after its time; then a sequence opens again.
    assert!(
        wait_until(Duration::from_secs(6), || blocked(&s).is_empty()),
        "the kernel block expires: {:?}",
        blocked(&s)
    );
    assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(200));
    let out = s.knock(&s.lab.client, &cred, &["--via", "tcp"]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "after the block, sequences open again");
    // DNS knocks never count towards a block.
    assert!(blocked(&s).is_empty());
}

#[test]
fn block_list_engages_and_lifts_nftables() {
    if !require_root("block_list_engages_and_lifts_nftables") {
        return;
    }
    block_list_story("capblk4", "nftables");
}

#[test]
fn block_list_engages_and_lifts_iptables() {
    if !require_root("block_list_engages_and_lifts_iptables") {
        return;
    }
    block_list_story("capblki", "iptables");
}

#[test]
fn a_missing_interface_is_a_clear_start_up_error() {
    if !require_root("a_missing_interface_is_a_clear_start_up_error") {
        return;
    }
    let lab = Lab::new("capnoif").expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let p = PcapConfig { interfaces: vec!["nosuch0".into()], ..pcap(true, false) };
    let cfg = dir.path().join("nxknock.toml");
    config("nftables", 30).pcap(p).write(&cfg).unwrap();
    let out = lab.server.cmd(BIN).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let text = out_text(&out);
    assert!(!out.status.success());
    assert!(text.contains("nosuch0") && text.contains("CAP_NET_RAW"), "{text}");
    let tables = lab.server.run(&["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("nxknock"), "no guard left behind: {tables}");
}
