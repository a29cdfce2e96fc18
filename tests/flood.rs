//! Floods must not stop a knock. An attacker relays look-alike knock names (the
//! shape of a real bound knock: valid kind byte, random content) through the same
//! recursive resolver the user knocks through — so the server sees one source for
//! both — and at the same time floods the server directly with well-formed random
//! tokens. The user's bound knock through that resolver, and then a plain knock at
//! the user's next element, must still open; the attacker stays out.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nxknock::token::{ELEMENT_LEN, Element, Token};

const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A bound-IPv4-shaped label: format-2 kind byte, random content, no valid tags.
fn lookalike() -> String {
    let mut b = vec![0x21u8];
    b.extend((0..34).map(|_| rand::random::<u8>()));
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = String::new();
    for byte in b {
        bits = (bits << 8) | u32::from(byte);
        n += 8;
        while n >= 5 {
            n -= 5;
            out.push(B32[((bits >> n) & 31) as usize] as char);
        }
    }
    if n > 0 {
        out.push(B32[((bits << (5 - n)) & 31) as usize] as char);
    }
    out
}

fn random_plain() -> String {
    let e: [u8; ELEMENT_LEN] = rand::random();
    Token::Plain(Element(e)).to_label()
}

/// A minimal query for `<label>.<zone>` A with recursion desired.
fn query(id: u16, label: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.push(label.len() as u8);
    q.extend_from_slice(label.as_bytes());
    for part in ZONE.split('.') {
        q.push(part.len() as u8);
        q.extend_from_slice(part.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Send queries made by `make` to `to` until `stop`, at most `max` of them or for
/// `within`; `per_ms` queries a millisecond at most (0: as fast as the socket takes them).
#[allow(clippy::too_many_arguments)]
fn flood(
    sock: UdpSocket,
    to: SocketAddr,
    make: fn() -> String,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    max: u64,
    within: Duration,
    per_ms: u64,
) {
    let started = Instant::now();
    let mut i = 0u64;
    while i < max && started.elapsed() < within && !stop.load(Ordering::Relaxed) {
        if per_ms > 0 && i >= per_ms * started.elapsed().as_millis() as u64 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let _ = sock.send_to(&query(i as u16, &make()), to);
        i += 1;
        sent.store(i, Ordering::Relaxed);
    }
}

fn out_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn knocks_open_through_a_flooded_shared_resolver_and_a_direct_flood() {
    if !require_root("knocks_open_through_a_flooded_shared_resolver_and_a_direct_flood") {
        return;
    }
    let mut s = Setup::new("flood", "nftables", 2);
    s.lab.add_host("res", RESOLVER.parse().unwrap(), "2001:db8:18::4".parse().unwrap()).unwrap();
    let _u = s.unbound("res", RESOLVER, &UnboundOpts::default());
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let plain_names = s.otp(&cred, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let (via_resolver, direct) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let resolver: SocketAddr = format!("{RESOLVER}:53").parse().unwrap();
    let server: SocketAddr = format!("{SERVER}:53").parse().unwrap();
    let within = Duration::from_secs(20);
    // Through the resolver at what it can relay (unbound here forwards ~25k q/s; past
    // that it drops queries itself, the user's among them, which is not ours to fix);
    // straight at the server as fast as the attacker can send.
    let floods = [
        (resolver, lookalike as fn() -> String, via_resolver.clone(), 20),
        (server, lookalike as fn() -> String, direct.clone(), 0),
        (server, random_plain as fn() -> String, direct.clone(), 0),
    ]
    .map(|(to, make, sent, per_ms)| {
        let sock = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || flood(sock, to, make, stop, sent, 2_000_000, within, per_ms))
    });
    std::thread::sleep(Duration::from_millis(500));
    let flooding = || floods.iter().all(|f| !f.is_finished());
    assert!(flooding() && via_resolver.load(Ordering::Relaxed) > 1000, "the flood is under way");

    // A bound knock through the resolver the flood goes through.
    let out = s
        .lab
        .client
        .cmd(BIN)
        .args([
            "knock",
            "--credential",
            cred.to_str().unwrap(),
            "--resolver",
            RESOLVER,
            "--ip",
            CLIENT,
            "--attempts",
            "10",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("the bound knock opens during the flood");
    assert!(echo_works(&mut conn));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the attacker stays out");
    assert!(flooding(), "the door opened while the flood was still running");

    // Then a plain knock at the user's next element, straight to the flooded server.
    assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(8)), "the bound door expires first");
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", "+tries=5", &plain_names[0]]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    connect_soon(&s.lab.client, ssh_addr()).expect("the plain next-element knock opens during the flood");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the attacker stays out");
    assert!(flooding(), "the door opened while the flood was still running");

    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.join().unwrap();
    }
    let status = s.daemon.terminate(Duration::from_secs(10)).expect("the daemon stops on SIGTERM");
    assert!(status.success(), "{status}");
    let log = s.daemon.log_text();
    let totals = log.lines().find(|l| l.contains("dns totals")).unwrap_or_else(|| panic!("no totals:\n{log}"));
    let field = |name: &str| -> u64 {
        totals
            .split(&format!("{name}="))
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // The server really was flooded, through the resolver and directly, and the look-alikes
    // never reached the verifier.
    assert!(field("lookalikes") > 1000, "{totals}");
    assert!(field("knocks_queued") > 1000, "{totals}");
    eprintln!(
        "flood: {} queries via the resolver, {} direct; daemon: {totals}",
        via_resolver.load(Ordering::Relaxed),
        direct.load(Ordering::Relaxed)
    );
}
