//! Attacker end-to-end tests: one test per attack path, each against the real
//! daemon in its own namespace lab, each ending in real TCP connections that
//! must FAIL for the attacker and SUCCEED for the legitimate user.
//!
//! The attacker lives in `s.lab.attacker` (198.18.0.3, 2001:db8:18::3); the
//! legitimate user in `s.lab.client` (198.18.0.2, 2001:db8:18::2). Queries the
//! attacker crafts are built here byte by byte (tiny encoder below) so the
//! tests control every field: EDNS Client Subnet family, prefix, address.
//! Needs root; under `CI=true` the tests fail rather than skip.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const SERVER6: &str = "2001:db8:18::1";
const CLIENT6: &str = "2001:db8:18::2";
const ATTACKER6: &str = "2001:db8:18::3";
/// An attacker address outside the client's /64 and /56.
const ATTACKER6_FAR: &str = "2001:db8:99::3";

fn out_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ssh6_addr() -> SocketAddr {
    format!("[{SERVER6}]:22").parse().unwrap()
}

fn server53() -> SocketAddr {
    format!("{SERVER}:53").parse().unwrap()
}

/// `nxknock knock --credential C --server SERVER_ARG ARGS…` run inside `ns`.
fn knock_via(ns: &Netns, cred: &Path, server: &str, args: &[&str]) -> Output {
    ns.cmd(BIN)
        .args(["knock", "--credential", cred.to_str().unwrap(), "--server", server])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// `nxknock otp --credential C --ip IP`: one bound name, not sent.
fn otp_bound(cred: &Path, ip: &str) -> String {
    let out = nx(&["otp", "--credential", cred.to_str().unwrap(), "--ip", ip], &[]);
    assert!(out.status.success(), "otp --ip: {}", out_text(&out));
    String::from_utf8(out.stdout).unwrap().lines().next().expect("one bound name").to_owned()
}

/// Wait (bounded) until the daemon log holds `needle`.
fn wait_log(s: &Setup, needle: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if s.daemon.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The daemon's open doors (`nxknock doors --json`, run in the server namespace).
fn doors(s: &Setup) -> Vec<serde_json::Value> {
    let out = s.nx_server(&["doors", "--json"]);
    assert!(out.status.success(), "doors --json: {}", out_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doors --json is not JSON ({e}): {}", out_text(&out)));
    v.as_array().expect("doors --json is an array").clone()
}

fn door_net(d: &serde_json::Value) -> (IpAddr, u8) {
    let addr: IpAddr = d["addr"].as_str().expect("door addr").parse().expect("door addr is an IP");
    let len = d["prefix_len"].as_u64().expect("door prefix_len") as u8;
    (addr, len)
}

/// Does the door `net/len` admit `ip`?
fn door_admits(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32)) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len.min(128)) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// No door wider than one IPv4 address or an IPv6 /64, and none admitting any of `never`.
fn assert_doors_narrow_and_not_for(s: &Setup, never: &[&str], when: &str) {
    for d in doors(s) {
        let (net, len) = door_net(&d);
        let min = if net.is_ipv4() { 32 } else { 64 };
        assert!(len >= min, "{when}: door {net}/{len} is wider than /{min}: {d}");
        for ip in never {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!door_admits(net, len, ip), "{when}: door {net}/{len} admits {ip}: {d}");
        }
    }
}

// ---------------------------------------------------------------------------
// A tiny DNS wire encoder: exactly the bytes an attacker chooses.

fn encode_name(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        assert!(!label.is_empty() && label.len() < 64, "label {label:?}");
        v.push(label.len() as u8);
        v.extend_from_slice(label.as_bytes());
    }
    v.push(0);
    v
}

const QTYPE_A: u16 = 1;
const QTYPE_TXT: u16 = 16;

/// A query with RD clear (`+norec`) and, optionally, an EDNS Client Subnet option
/// carrying `addr/prefix` exactly as given (family from the address type, so an
/// IPv4-mapped IPv6 address goes out as family 2 with 16 address bytes).
fn dns_query(id: u16, name: &str, qtype: u16, ecs: Option<(IpAddr, u8)>) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x00, 0x00]); // QR=0 opcode=0 RD=0
    q.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    q.extend_from_slice(&0u16.to_be_bytes()); // ANCOUNT
    q.extend_from_slice(&0u16.to_be_bytes()); // NSCOUNT
    q.extend_from_slice(&(ecs.is_some() as u16).to_be_bytes()); // ARCOUNT
    q.extend_from_slice(&encode_name(name));
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    if let Some((addr, prefix)) = ecs {
        let (family, bytes): (u16, Vec<u8>) = match addr {
            IpAddr::V4(a) => (1, a.octets().to_vec()),
            IpAddr::V6(a) => (2, a.octets().to_vec()),
        };
        let n = (prefix as usize).div_ceil(8).min(bytes.len());
        let mut a = bytes[..n].to_vec();
        if prefix % 8 != 0 && n > 0 {
            a[n - 1] &= 0xffu8 << (8 - prefix % 8);
        }
        let mut opt = Vec::new();
        opt.extend_from_slice(&8u16.to_be_bytes()); // option code: ECS
        opt.extend_from_slice(&((4 + a.len()) as u16).to_be_bytes());
        opt.extend_from_slice(&family.to_be_bytes());
        opt.push(prefix);
        opt.push(0); // scope prefix
        opt.extend_from_slice(&a);
        q.push(0); // root owner
        q.extend_from_slice(&41u16.to_be_bytes()); // OPT
        q.extend_from_slice(&1232u16.to_be_bytes()); // UDP payload size
        q.extend_from_slice(&0u32.to_be_bytes()); // ext rcode, version, flags
        q.extend_from_slice(&(opt.len() as u16).to_be_bytes());
        q.extend_from_slice(&opt);
    }
    q
}

fn rcode(resp: &[u8]) -> u8 {
    resp[3] & 0x0f
}

/// Send `q` on `sock` to `to` and wait (bounded) for the answer with the same ID.
fn ask(sock: &UdpSocket, to: SocketAddr, q: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(q, to).ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
            .ok()?;
        let Ok((n, _)) = sock.recv_from(&mut buf) else { return None };
        if n >= 12 && buf[..2] == q[..2] {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// One plain knock from `ns` to the server (optionally with ECS); asserts the NXDOMAIN.
fn plain_knock_raw(ns: &Netns, name: &str, ecs: Option<(IpAddr, u8)>, id: u16) {
    let sock = ns.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let resp = ask(&sock, server53(), &dns_query(id, name, QTYPE_A, ecs))
        .unwrap_or_else(|| panic!("no answer to {name} with ECS {ecs:?}"));
    assert_eq!(rcode(&resp), 3, "knock {name} with ECS {ecs:?} must get NXDOMAIN");
}

// ---------------------------------------------------------------------------
// 1. Pieces of a bound label replayed as plain knocks.

const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

fn label_bits(label: &str) -> Vec<bool> {
    let mut bits = Vec::new();
    for c in label.bytes() {
        let v = B32
            .iter()
            .position(|&b| b == c.to_ascii_lowercase())
            .unwrap_or_else(|| panic!("{c:?} is not base32 in {label}")) as u8;
        for i in (0..5).rev() {
            bits.push(v >> i & 1 == 1);
        }
    }
    bits
}

/// 96 bits (a chain element) as a canonical plain label: 20 base32 chars, 4 zero pad bits.
fn plain_label_from_bits(bits: &[bool]) -> String {
    assert_eq!(bits.len(), 96);
    let mut padded = bits.to_vec();
    padded.extend([false; 4]);
    padded.chunks(5).map(|c| B32[c.iter().fold(0usize, |a, &b| a << 1 | b as usize)] as char).collect()
}

/// Every plain label an attacker can cut from `label`: each 20-character
/// substring as it stands, and each 96-bit window of the decoded bits at every
/// bit offset, re-encoded canonically (an element stored at any byte or bit
/// position of the bound form is among these).
fn plain_candidates(label: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut push = |l: String| {
        if seen.insert(l.clone()) {
            out.push(l);
        }
    };
    for i in 0..=label.len() - 20 {
        push(label[i..i + 20].to_ascii_lowercase());
    }
    let bits = label_bits(label);
    for o in 0..=bits.len() - 96 {
        push(plain_label_from_bits(&bits[o..o + 96]));
    }
    out
}

fn bound_substrings_story(prefix: &str, backend: &'static str, bound_for: &str) {
    // Every probe must be verified, not shed by the per-source limiter.
    let o = config(backend, 30).knocks_per_source(0).plain(PlainPolicy::Source);
    let s = Setup::with(prefix, o);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _svc6 = echo_service(&s.lab.server, &format!("[{SERVER6}]:22"));
    s.lab.attacker.add_addr(ATTACKER6_FAR.parse().unwrap(), 64).unwrap();
    let alice = s.add_user("alice", &[]);
    let v6 = bound_for.parse::<IpAddr>().unwrap().is_ipv6();
    let legit_addr = if v6 { ssh6_addr() } else { ssh_addr() };

    // One bound name for the client, seen by the attacker before it is used.
    let bound = otp_bound(&alice, bound_for);
    let label = bound.split('.').next().unwrap().to_owned();
    assert!(bound.ends_with(ZONE), "{bound}");
    let candidates = plain_candidates(&label);
    assert!(candidates.len() > 100, "{} candidates from a {}-char label", candidates.len(), label.len());

    let sock = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let mut answered = 0;
    for (i, c) in candidates.iter().enumerate() {
        let q = dns_query(0x4000 + i as u16, &format!("{c}.{ZONE}"), QTYPE_A, None);
        if let Some(r) = ask(&sock, server53(), &q) {
            assert_eq!(rcode(&r), 3, "candidate {c}: NXDOMAIN like any knock");
            answered += 1;
        }
    }
    assert_eq!(answered, candidates.len(), "every probe was answered (the daemon survived them)");
    std::thread::sleep(Duration::from_millis(500));

    assert!(
        try_connect(&s.lab.attacker, ssh_addr()).is_err(),
        "a piece of a bound label opened a door for the attacker (IPv4)"
    );
    assert!(
        s.lab.attacker.tcp_connect_from(ATTACKER6.parse().unwrap(), ssh6_addr(), Duration::from_millis(400)).is_err(),
        "a piece of a bound label opened a door for the attacker (IPv6)"
    );
    assert!(try_connect(&s.lab.client, legit_addr).is_err(), "nothing is open before the real knock");
    let open = doors(&s);
    assert!(open.is_empty(), "no probe may open any door: {open:?}\n{}", s.daemon.log_text());

    // The real bound name, sent by the client: it still works (nothing was spent).
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &bound, "A"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    let mut conn = connect_soon(&s.lab.client, legit_addr).unwrap_or_else(|e| {
        panic!("the bound knock opens for the client after the probes: {e}\n{}", s.daemon.log_text())
    });
    assert!(echo_works(&mut conn));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the attacker still cannot connect (IPv4)");
    let far = s.lab.attacker.tcp_connect_from(ATTACKER6_FAR.parse().unwrap(), ssh6_addr(), Duration::from_millis(400));
    assert!(far.is_err(), "the attacker outside the client's prefix cannot connect (IPv6)");
    assert_doors_narrow_and_not_for(&s, &[ATTACKER, ATTACKER6_FAR], "after the real knock");
    // The contract's wire lengths (checked last: behaviour first).
    assert_eq!(label.len(), if v6 { 63 } else { 56 }, "bound label length for {bound_for}: {label}");
}

#[test]
fn bound_substrings_never_open_as_plain() {
    if !require_root("bound_substrings_never_open_as_plain") {
        return;
    }
    bound_substrings_story("atkbsub", "nftables", CLIENT);
}

#[test]
fn bound_substrings_never_open_as_plain_iptables() {
    if !require_root("bound_substrings_never_open_as_plain_iptables") {
        return;
    }
    bound_substrings_story("atkbsubi", "iptables", CLIENT);
}

#[test]
fn bound_v6_substrings_never_open_as_plain() {
    if !require_root("bound_v6_substrings_never_open_as_plain") {
        return;
    }
    bound_substrings_story("atkbsub6", "nftables", CLIENT6);
}

// ---------------------------------------------------------------------------
// 2. EDNS Client Subnet: never wider than /32 or /64, only from trusted sources.

/// The attacker cannot connect over IPv4 nor IPv6.
fn attacker_shut_out(s: &Setup, when: &str) {
    assert!(
        try_connect(&s.lab.attacker, ssh_addr()).is_err(),
        "{when}: attacker connected over IPv4\n{}",
        s.daemon.log_text()
    );
    let v6 = s.lab.attacker.tcp_connect_from(ATTACKER6.parse().unwrap(), ssh6_addr(), Duration::from_millis(400));
    assert!(v6.is_err(), "{when}: attacker connected over IPv6\n{}", s.daemon.log_text());
}

#[test]
fn ecs_cannot_widen_a_door() {
    if !require_root("ecs_cannot_widen_a_door") {
        return;
    }
    // The worst case: the attacker is a trusted ECS source (a resolver it controls).
    let trusted = [CLIENT, ATTACKER].map(|a| format!("{a}/32").parse().unwrap());
    let o = config("nftables", 30).plain(PlainPolicy::Ecs).ecs_from(trusted);
    let s = Setup::with("atkecs", o);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _svc6 = echo_service(&s.lab.server, &format!("[{SERVER6}]:22"));
    let alice = s.add_user("alice", &[]);
    let names = s.otp(&alice, 5);

    let ip = |a: &str| a.parse::<IpAddr>().unwrap();
    let mapped: IpAddr = IpAddr::V6("::ffff:198.18.0.3".parse::<Ipv6Addr>().unwrap());
    let attempts: [(IpAddr, u8, &str); 5] = [
        (ip("2000::"), 3, "2000::/3"),
        (ip("0.0.0.0"), 0, "0.0.0.0/0"),
        (mapped, 128, "::ffff:198.18.0.3/128 (IPv4-mapped)"),
        (ip("198.18.0.0"), 24, "198.18.0.0/24"),
        (ip("2001:db8:18::"), 48, "2001:db8:18::/48"),
    ];
    for (i, (addr, len, what)) in attempts.iter().enumerate() {
        plain_knock_raw(&s.lab.attacker, &names[i], Some((*addr, *len)), 0x5000 + i as u16);
        std::thread::sleep(Duration::from_millis(300));
        attacker_shut_out(&s, &format!("plain knock with ECS {what}"));
        assert_doors_narrow_and_not_for(&s, &[ATTACKER, ATTACKER6], &format!("after ECS {what}"));
    }
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "no refused knock opened anything for the client either");

    // The client, a trusted ECS source, sends the FIRST name with its own /32:
    // none of the refusals above may have spent it (or any later name).
    plain_knock_raw(&s.lab.client, &names[0], Some((ip(CLIENT), 32)), 0x5100);
    let mut conn = connect_soon(&s.lab.client, ssh_addr())
        .unwrap_or_else(|e| panic!("the first name still opens with ECS {CLIENT}/32: {e}\n{}", s.daemon.log_text()));
    assert!(echo_works(&mut conn));
    attacker_shut_out(&s, "after the client's knock");
    let open = doors(&s);
    assert!(open.iter().any(|d| door_net(d) == (ip(CLIENT), 32)), "the door is exactly {CLIENT}/32: {open:?}");
    assert_doors_narrow_and_not_for(&s, &[ATTACKER, ATTACKER6], "after the client's knock");
}

#[test]
fn ecs_from_untrusted_source_is_ignored() {
    if !require_root("ecs_from_untrusted_source_is_ignored") {
        return;
    }
    // plain = "ecs" believing only a resolver that takes no part here (an empty
    // ecs_from with plain = "ecs" is a config error): ECS from the client or the
    // attacker is trusted from nobody.
    let o = config("nftables", 30).plain(PlainPolicy::Ecs).ecs_from([format!("{RESOLVER}/32").parse().unwrap()]);
    let s = Setup::with("atkecsun", o);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _svc6 = echo_service(&s.lab.server, &format!("[{SERVER6}]:22"));
    let alice = s.add_user("alice", &[]);
    let names = s.otp(&alice, 3);
    let ip = |a: &str| a.parse::<IpAddr>().unwrap();

    // The attacker claims its own /32, then the client's: neither may count.
    plain_knock_raw(&s.lab.attacker, &names[0], Some((ip(ATTACKER), 32)), 0x6000);
    plain_knock_raw(&s.lab.attacker, &names[1], Some((ip(CLIENT), 32)), 0x6001);
    // The client's own ECS is not trusted either (it is not in ecs_from).
    plain_knock_raw(&s.lab.client, &names[2], Some((ip(CLIENT), 32)), 0x6002);
    std::thread::sleep(Duration::from_millis(400));
    attacker_shut_out(&s, "untrusted ECS");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "untrusted ECS opened for the client");
    let open = doors(&s);
    assert!(open.is_empty(), "untrusted ECS opened doors: {open:?}\n{}", s.daemon.log_text());

    // The legitimate way still works: a bound knock for the client's address.
    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("bound knock opens for the client");
    assert!(echo_works(&mut conn));
    attacker_shut_out(&s, "after the client's bound knock");
}

// ---------------------------------------------------------------------------
// 3. A forged or replayed whoami answer must not steer the client's knock.

#[derive(Clone)]
enum FakeMode {
    /// Answer every TXT query with one TXT record of these strings; relay
    /// everything else (the knock) to the real server.
    Forge(Vec<Vec<u8>>),
    /// Relay TXT queries to the real server (from the attacker's address) and keep
    /// the genuine answer; answer everything else NXDOMAIN without relaying.
    Capture,
    /// Answer TXT queries with the captured genuine answer, rewritten onto the new
    /// query's ID and name; relay everything else to the real server.
    Replay,
}

#[derive(Default)]
struct FakeCounts {
    txt: usize,
    other: usize,
    captured: Option<Vec<u8>>,
    captured_qname: Option<String>,
}

/// A fake nameserver at the attacker's address, port 53, on a thread.
struct FakeDns {
    mode: Arc<Mutex<FakeMode>>,
    counts: Arc<Mutex<FakeCounts>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn question_end(q: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let l = *q.get(i)? as usize;
        if l == 0 {
            return Some(i + 1);
        }
        if l & 0xc0 != 0 {
            return None;
        }
        i += 1 + l;
    }
}

fn qname_of(q: &[u8]) -> Option<String> {
    let end = question_end(q)?;
    let mut i = 12;
    let mut labels = Vec::new();
    while i < end - 1 {
        let l = q[i] as usize;
        labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + l]).into_owned());
        i += 1 + l;
    }
    Some(labels.join("."))
}

/// An answer to `q` (question copied, AA set) with `rcode` and optional TXT strings.
fn fake_answer(q: &[u8], rcode: u8, txt: Option<&[Vec<u8>]>) -> Option<Vec<u8>> {
    let qend = question_end(q)? + 4;
    if q.len() < qend {
        return None;
    }
    let mut r = Vec::new();
    r.extend_from_slice(&q[..2]);
    r.push(0x84 | (q[2] & 0x01)); // QR, AA, RD copied
    r.push(rcode);
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(txt.is_some() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..qend]);
    if let Some(strings) = txt {
        let rdata: Vec<u8> =
            strings.iter().flat_map(|s| std::iter::once(s.len() as u8).chain(s.iter().copied())).collect();
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&QTYPE_TXT.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    Some(r)
}

/// The captured genuine answer, moved onto query `q`: its ID and question, and
/// every record owned by the captured name re-owned by the new one.
fn replayed_answer(captured: &[u8], old_qname: &str, q: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::op::Message;
    use hickory_proto::rr::Name;
    let mut m = Message::from_vec(captured).ok()?;
    let query = Message::from_vec(q).ok()?;
    let old = Name::from_ascii(format!("{old_qname}.")).ok()?;
    let new = query.queries.first()?.name().clone();
    m.metadata.id = query.metadata.id;
    m.queries = query.queries.clone();
    for r in m.answers.iter_mut().chain(m.authorities.iter_mut()).chain(m.additionals.iter_mut()) {
        if r.name == old {
            r.name = new.clone();
        }
    }
    m.to_vec().ok()
}

impl FakeDns {
    fn start(ns: &Netns, mode: FakeMode) -> FakeDns {
        let sock = ns.udp_bind(format!("{ATTACKER}:53").parse().unwrap()).expect("fake DNS binds 198.18.0.3:53");
        let upstream = ns.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let counts = Arc::new(Mutex::new(FakeCounts::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, c, st) = (mode.clone(), counts.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: a test never runs this long.
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                let q = buf[..n].to_vec();
                let Some(qend) = question_end(&q) else { continue };
                if q.len() < qend + 4 {
                    continue;
                }
                let qtype = u16::from_be_bytes([q[qend], q[qend + 1]]);
                let mode = m.lock().unwrap().clone();
                let relay = |q: &[u8]| ask(&upstream, server53(), q);
                let answer = if qtype == QTYPE_TXT {
                    c.lock().unwrap().txt += 1;
                    match mode {
                        FakeMode::Forge(strings) => fake_answer(&q, 0, Some(&strings)),
                        FakeMode::Capture => {
                            let a = relay(&q);
                            let mut c = c.lock().unwrap();
                            c.captured = a.clone();
                            c.captured_qname = qname_of(&q);
                            a
                        }
                        FakeMode::Replay => {
                            let c = c.lock().unwrap();
                            match (&c.captured, &c.captured_qname) {
                                (Some(a), Some(old)) => replayed_answer(a, old, &q),
                                _ => None,
                            }
                        }
                    }
                } else {
                    c.lock().unwrap().other += 1;
                    match mode {
                        FakeMode::Capture => fake_answer(&q, 3, None),
                        _ => relay(&q),
                    }
                };
                if let Some(a) = answer {
                    let _ = sock.send_to(&a, from);
                }
            }
        });
        FakeDns { mode, counts, stop, thread: Some(thread) }
    }

    fn set_mode(&self, mode: FakeMode) {
        *self.mode.lock().unwrap() = mode;
        let mut c = self.counts.lock().unwrap();
        c.txt = 0;
        c.other = 0;
    }

    /// (TXT queries seen, other queries seen) since the last `set_mode`.
    fn counts(&self) -> (usize, usize) {
        let c = self.counts.lock().unwrap();
        (c.txt, c.other)
    }

    fn captured(&self) -> bool {
        self.counts.lock().unwrap().captured.is_some()
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `--ip auto` against the fake must fail on whoami and send no knock.
fn assert_refused_whoami(s: &Setup, fake: &FakeDns, alice: &Path, what: &str) {
    let out = knock_via(&s.lab.client, alice, ATTACKER, &["--ip", "auto", "--attempts", "1"]);
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    let (txt, other) = fake.counts();
    assert!(
        txt >= 1,
        "{what}: the client never asked the fake for whoami (test would prove nothing): {}",
        out_text(&out)
    );
    assert!(!out.status.success(), "{what}: the client accepted the answer and knocked: {}", out_text(&out));
    assert!(err.contains("whoami"), "{what}: stderr must say whoami: {}", out_text(&out));
    assert_eq!(other, 0, "{what}: the client sent a knock after a bad whoami answer");
    std::thread::sleep(Duration::from_millis(300));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "{what}: a door opened for the attacker");
    assert_doors_narrow_and_not_for(s, &[ATTACKER, ATTACKER6], what);
}

#[test]
fn forged_whoami_answer_is_refused() {
    if !require_root("forged_whoami_answer_is_refused") {
        return;
    }
    let s = Setup::with("atkwho", config("nftables", 30).whoami(true));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    let fake = FakeDns::start(&s.lab.attacker, FakeMode::Capture);

    // A plain TXT naming the attacker, with no MAC at all.
    fake.set_mode(FakeMode::Forge(vec![ATTACKER.as_bytes().to_vec()]));
    assert_refused_whoami(&s, &fake, &alice, "forged TXT \"198.18.0.3\"");
    // The attacker's address plus 32 hex characters of garbage where a MAC might go.
    fake.set_mode(FakeMode::Forge(vec![ATTACKER.as_bytes().to_vec(), b"0123456789abcdef0123456789abcdef".to_vec()]));
    assert_refused_whoami(&s, &fake, &alice, "forged TXT \"198.18.0.3\" + 32 hex");

    // A genuine answer naming the attacker's address, captured for the client's
    // earlier nonce (the fake relays one whoami from its own address and keeps the
    // answer; that run's knock is swallowed), replayed for a new nonce.
    fake.set_mode(FakeMode::Capture);
    let cap = knock_via(&s.lab.client, &alice, ATTACKER, &["--ip", "auto", "--attempts", "1"]);
    assert!(fake.captured(), "capture run got no genuine whoami answer from the server: {}", out_text(&cap));
    fake.set_mode(FakeMode::Replay);
    assert_refused_whoami(&s, &fake, &alice, "genuine answer replayed for another nonce");
    drop(fake);

    // The real thing: ask the real server, which sees the client.
    let out = s.knock(&s.lab.client, &alice, &["--ip", "auto"]);
    assert!(out.status.success(), "real --ip auto knock: {}", out_text(&out));
    let mut conn = connect_soon(&s.lab.client, ssh_addr())
        .unwrap_or_else(|e| panic!("--ip auto opens for the client: {e}\n{}", s.daemon.log_text()));
    assert!(echo_works(&mut conn));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "not for the attacker");
    let open = doors(&s);
    assert!(open.iter().any(|d| door_net(d) == (CLIENT.parse().unwrap(), 32)), "{open:?}");
}

// ---------------------------------------------------------------------------
// 4. Another user's close knock for the same address.

#[test]
fn another_users_close_knock_leaves_the_door_open() {
    if !require_root("another_users_close_knock_leaves_the_door_open") {
        return;
    }
    let s = Setup::new("atkclose", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    let bob = s.add_user("bob", &[]);

    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("alice's door opens");
    assert!(wait_log(&s, "door opened", Duration::from_secs(2)), "{}", s.daemon.log_text());

    // Bob (a valid user, on the attacker's host) asks to close alice's address.
    let out = s.knock(&s.lab.attacker, &bob, &["--ip", CLIENT, "--close"]);
    assert!(out.status.success(), "bob's close knock is answered: {}", out_text(&out));
    std::thread::sleep(Duration::from_millis(300));
    let mut conn = try_connect(&s.lab.client, ssh_addr())
        .unwrap_or_else(|e| panic!("bob's close knock closed alice's door: {e}\n{}", s.daemon.log_text()));
    assert!(echo_works(&mut conn));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the attacker cannot connect");
    let open = doors(&s);
    assert!(
        open.iter().any(|d| d["user"] == "alice" && door_net(d) == (CLIENT.parse().unwrap(), 32)),
        "alice's door is still listed as hers: {open:?}"
    );

    // Alice's own close knock does close it.
    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT, "--close"]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(2)), "alice's own close knock closes her door");
    assert!(echo_works(&mut conn), "the established connection is not cut");
}

// ---------------------------------------------------------------------------
// 5. Revocation closes the user's doors in the running daemon.

/// The daemon keeps a user's record from one knock to the next; a policy narrowed
/// meanwhile (`user set`, another process) still binds the very next knock. A thief
/// with a copy of alice's credential knocks for their own address right after alice
/// is restricted to hers: nothing opens for the thief, and the refused element is
/// not spent — alice's own next knock, with that same element, opens.
#[test]
fn a_narrowed_policy_binds_the_very_next_knock() {
    if !require_root("a_narrowed_policy_binds_the_very_next_knock") {
        return;
    }
    let s = Setup::new("atknarrow", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("alice's door opens");

    let thief = alice.with_extension("stolen");
    std::fs::copy(&alice, &thief).unwrap();
    let out = s.nx_server(&["user", "set", "alice", "--from", &format!("{CLIENT}/32")]);
    assert!(out.status.success(), "user set: {}", out_text(&out));
    let out = s.knock(&s.lab.attacker, &thief, &["--ip", ATTACKER]);
    assert!(out.status.success(), "the knock is answered as always: {}", out_text(&out));
    assert!(wait_log(&s, "outside the user's --from networks", Duration::from_secs(3)), "{}", s.daemon.log_text());
    attacker_shut_out(&s, "after alice was restricted to her address");

    // The refused element is alice's next one, unspent: her own knock with it opens.
    let out = s.nx_server(&["doors", "close", "--user", "alice"]);
    assert!(out.status.success(), "doors close: {}", out_text(&out));
    assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(3)), "alice's door did not close");
    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("alice's next knock opens");
    assert!(echo_works(&mut conn));
    attacker_shut_out(&s, "after alice's own knock");
}

#[test]
fn revoke_closes_the_users_doors_at_once() {
    if !require_root("revoke_closes_the_users_doors_at_once") {
        return;
    }
    let mut s = Setup::new("atkrevoke", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    let bob = s.add_user("bob", &[]);

    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    let out = s.knock(&s.lab.attacker, &bob, &["--ip", ATTACKER]);
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("alice's door opens");
    connect_soon(&s.lab.attacker, ssh_addr()).expect("bob's door opens");

    let out = s.nx_server(&["user", "revoke", "alice"]);
    assert!(out.status.success(), "revoke: {}", out_text(&out));
    let revoked_at = Instant::now();
    assert!(
        wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(2)),
        "alice's door still admits her {:?} after revoke (open_seconds is 30)\n{}",
        revoked_at.elapsed(),
        s.daemon.log_text()
    );
    try_connect(&s.lab.attacker, ssh_addr()).expect("bob's door is untouched by alice's revocation");

    // Her next knock opens nothing.
    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT]);
    assert!(out.status.success(), "the knock is answered as always: {}", out_text(&out));
    std::thread::sleep(Duration::from_millis(400));
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "a revoked user's knock opened a door");
    assert!(doors(&s).iter().all(|d| d["user"] != "alice"), "{:?}", doors(&s));

    // A restarted daemon does not bring her door back, and keeps bob's.
    s.restart();
    assert!(
        try_connect(&s.lab.client, ssh_addr()).is_err(),
        "alice's door came back after a restart\n{}",
        s.daemon.log_text()
    );
    let mut conn = try_connect(&s.lab.attacker, ssh_addr()).expect("bob's door is adopted across the restart");
    assert!(echo_works(&mut conn));
    let open = doors(&s);
    assert!(open.iter().all(|d| d["user"] != "alice"), "{open:?}");
    assert!(open.iter().any(|d| d["user"] == "bob"), "{open:?}");
}

/// Another enrolled user (bob, whose doors last at most 1 s) knocks for alice's
/// address: the kernel keeps one element per address and port, and it must keep
/// the latest expiry of the users who opened it, so bob cannot cut alice's door short.
#[test]
fn another_users_short_door_does_not_cut_a_longer_one() {
    if !require_root("another_users_short_door_does_not_cut_a_longer_one") {
        return;
    }
    let s = Setup::new("atkshort", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    let bob = s.add_user("bob", &["--max-open", "1"]);
    let out = s.knock(&s.lab.client, &alice, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("alice's door opens");
    let out = s.knock(&s.lab.attacker, &bob, &["--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(wait_log(&s, "user=bob", Duration::from_secs(2)), "{}", s.daemon.log_text());
    std::thread::sleep(Duration::from_millis(2500));
    let mut conn = try_connect(&s.lab.client, ssh_addr()).expect("alice's 30 s door outlives bob's 1 s one");
    assert!(echo_works(&mut conn));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "bob's knock was for alice's address, not his");
}

/// Amplification: a forged source floods the zone's ordinary questions (the SOA at
/// the apex) over UDP. The answers to that source network are capped at the RRL
/// rate; every second answer over it is truncated (TC, no records) so a real client
/// would retry over TCP. Knock answers are never limited, and TCP still answers.
#[test]
fn the_server_is_no_amplifier() {
    if !require_root("the_server_is_no_amplifier") {
        return;
    }
    let s = Setup::with("atkrrl", config("nftables", 30));
    let sock = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    const SENT: u16 = 200;
    for id in 0..SENT {
        sock.send_to(&dns_query(id, ZONE, 6, None), server53()).unwrap();
    }
    let (mut full, mut truncated, mut bytes) = (0usize, 0usize, 0usize);
    let mut buf = [0u8; 4096];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        bytes += n;
        if buf[2] & 0x02 != 0 {
            assert_eq!(&buf[6..12], &[0, 0, 0, 0, 0, 0], "a truncated answer carries no records");
            truncated += 1;
        } else {
            full += 1;
        }
    }
    // The default budget: 20 a second per /24, a burst of 20.
    assert!((20..=30).contains(&full), "full answers to one network are capped: {full} of {SENT}");
    assert!((60..=100).contains(&truncated), "every second answer over the rate slips: {truncated}");
    assert!(bytes < usize::from(SENT) * 40, "far fewer bytes out than a flood of SOAs would draw: {bytes}");
    // Knock answers from the same network are not limited...
    let mut answered = 0;
    for id in 0..50u16 {
        let name = format!("{}.{ZONE}", "a".repeat(20 + usize::from(id % 5)));
        sock.send_to(&dns_query(1000 + id, &name, QTYPE_A, None), server53()).unwrap();
        if sock.recv_from(&mut buf).is_ok_and(|(n, _)| n > 12 && rcode(&buf[..n]) == 3) {
            answered += 1;
        }
    }
    assert_eq!(answered, 50, "every knock is answered NXDOMAIN");
    // ...and a real client gets its SOA over TCP.
    let d = dig(&s.lab.attacker, &[&format!("@{SERVER}"), "+tcp", "+norec", ZONE, "SOA"]);
    assert_eq!(d.status, "NOERROR", "{}", d.text);
}
