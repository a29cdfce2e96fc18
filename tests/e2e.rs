//! End-to-end: the real daemon in a namespace lab, knocked with real `dig` and
//! the real client, doors checked with real TCP connections. Needs root; under
//! `CI=true` these tests fail rather than skip when they cannot run.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

/// The core story, run against one firewall backend.
fn knock_story(prefix: &str, backend: &'static str) {
    let s = Setup::new(prefix, backend, 3);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);

    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "port 22 must be closed before a knock");

    let name = s.otp(&cred, 1).remove(0);
    assert!(name.ends_with(ZONE), "{name}");
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &name, "A"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    assert!(d.aa, "answer must be authoritative:\n{}", d.text);

    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("client connects after a valid knock");
    assert!(echo_works(&mut conn));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the door is for the client only");

    // The attacker replays the same name: same answer, no door.
    let d = dig(&s.lab.attacker, &[&format!("@{SERVER}"), "+norec", &name, "A"]);
    assert_eq!((d.status.as_str(), d.aa), ("NXDOMAIN", true), "{}", d.text);
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "a replayed name must open nothing");

    // The door closes by itself; the connection made during the window stays up.
    assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(8)), "door must expire after open_seconds");
    assert!(echo_works(&mut conn), "an established connection survives the door's expiry");
    let log = s.daemon.log_text();
    assert!(log.contains("door opened"), "{log}");
    assert!(!log.contains(name.split('.').next().unwrap()), "the token must never be logged:\n{log}");
}

#[test]
fn dns_knock_opens_door_nftables() {
    if !require_root("dns_knock_opens_door_nftables") {
        return;
    }
    knock_story("e2enft", "nftables");
}

#[test]
fn dns_knock_opens_door_iptables() {
    if !require_root("dns_knock_opens_door_iptables") {
        return;
    }
    knock_story("e2eipt", "iptables");
}

/// Send one raw query with a fixed ID from inside `ns`; return the answer bytes.
fn raw_query(ns: &Netns, name: &str, id: u16) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let bytes = msg.to_vec().unwrap();
    let sock: UdpSocket = ns.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&bytes, format!("{SERVER}:53")).unwrap();
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf).expect("answer");
    buf[..n].to_vec()
}

/// Blank the knock label inside an answer so answers to different labels compare.
fn normalise(answer: &[u8], label: &str) -> Vec<u8> {
    let mut a = answer.to_vec();
    assert_eq!(a[12] as usize, label.len(), "question echoed first");
    assert_eq!(&a[13..13 + label.len()], label.as_bytes(), "question echoed in its exact case");
    a[13..13 + label.len()].fill(b'x');
    a
}

#[test]
fn valid_and_invalid_knocks_get_identical_answers_and_only_valid_opens() {
    if !require_root("valid_and_invalid_knocks_get_identical_answers_and_only_valid_opens") {
        return;
    }
    let s = Setup::new("e2eident", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let alice = s.add_user("alice", &[]);
    let mallory = s.add_user("mallory", &[]);
    let revoked_name = s.otp(&mallory, 1).remove(0);
    let out = nx(&["user", "revoke", "mallory", "--config", s.daemon.config.to_str().unwrap()], &[]);
    assert!(out.status.success());

    // Invalid knocks from the attacker: random label, revoked user's token, garbage packets.
    let random = format!("abcdefghijklmnopqrst.{ZONE}");
    let a_random = raw_query(&s.lab.attacker, &random, 0x1111);
    let a_revoked = raw_query(&s.lab.attacker, &revoked_name, 0x1111);
    let garbage = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    for junk in [
        &b"\x00"[..],
        &[0xffu8; 12][..],
        &[0x41u8; 600][..],
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc",
    ] {
        garbage.send_to(junk, format!("{SERVER}:53")).unwrap();
    }
    // Valid knock from the client, in mixed case as a 0x20 resolver would send it.
    let valid = s.otp(&alice, 1).remove(0);
    let (vlabel, vrest) = valid.split_once('.').unwrap();
    let mixed = format!("{}.{}", vlabel.to_ascii_uppercase(), vrest);
    let a_valid = raw_query(&s.lab.client, &mixed, 0x1111);
    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("valid mixed-case knock opens");
    // The same token replayed by the attacker (spent): same answer, nothing opens.
    let a_spent = raw_query(&s.lab.attacker, &valid, 0x1111);

    let label = |n: &str| n.split('.').next().unwrap().to_owned();
    let reference = normalise(&a_valid, &label(&mixed));
    assert_eq!(normalise(&a_random, &label(&random)), reference, "random label answered differently");
    assert_eq!(normalise(&a_revoked, &label(&revoked_name)), reference, "revoked user's knock answered differently");
    assert_eq!(normalise(&a_spent, &label(&valid)), reference, "spent token answered differently");
    let m = Message::from_vec(&a_valid).unwrap();
    assert_eq!(m.metadata.response_code, hickory_proto::op::ResponseCode::NXDomain);
    assert!(m.metadata.authoritative);
    assert_eq!(m.authorities.len(), 1, "SOA in authority");
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);

    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "no invalid knock may open a door");
    assert!(echo_works(&mut conn));
    // Static names are still served with AA, over UDP and TCP; the daemon survived the garbage.
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &format!("ns1.{ZONE}"), "A"]);
    assert!(d.status == "NOERROR" && d.aa && d.text.contains(SERVER), "{}", d.text);
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", "+tcp", &random, "TXT"]);
    assert!(d.status == "NXDOMAIN" && d.aa, "{}", d.text);
    let doors = s.nx_server(&["doors"]);
    let listing = String::from_utf8_lossy(&doors.stdout);
    assert!(listing.contains(&format!("{CLIENT}/32")), "{listing}");
    assert!(!listing.contains(ATTACKER), "{listing}");
}

#[test]
fn bound_knock_opens_the_embedded_address() {
    if !require_root("bound_knock_opens_the_embedded_address") {
        return;
    }
    let s = Setup::new("e2ebound", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &["--service", "ssh"]);
    // Sent from the attacker's host (as a resolver would relay it), bound to the client:
    // the server sees the attacker's address but must open for the embedded one.
    let out = s
        .lab
        .attacker
        .cmd(BIN)
        .args(["knock", "--credential", cred.to_str().unwrap(), "--server", SERVER, "--ip", CLIENT, "--service", "ssh"])
        .output()
        .unwrap();
    assert!(out.status.success(), "knock: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Non-Existent Domain"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut conn = connect_soon(&s.lab.client, ssh_addr()).expect("door opens for the embedded address");
    assert!(echo_works(&mut conn));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "not for the address that sent the query");

    // Doorman's `run`: knock, wait for the door with fast connect retries, then run a program.
    let out = s
        .lab
        .client
        .cmd(BIN)
        .args(["knock", "--credential", cred.to_str().unwrap(), "--server", SERVER, "--ip", CLIENT])
        .args(["--wait", &format!("{SERVER}:22"), "--", "/bin/echo", "ran after the door opened"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("door open:"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ran after the door opened");
}

#[test]
fn spent_token_stays_spent_after_sigkill_and_restart() {
    if !require_root("spent_token_stays_spent_after_sigkill_and_restart") {
        return;
    }
    let mut s = Setup::new("e2ekill", "nftables", 2);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let names = s.otp(&cred, 2);
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &names[0]]);
    assert_eq!(d.status, "NXDOMAIN");
    connect_soon(&s.lab.client, ssh_addr()).expect("first knock opens");

    s.restart(); // SIGKILL, then start again on the same database
    assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(6)), "door expires in the kernel");
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &names[0]]);
    assert_eq!(d.status, "NXDOMAIN");
    std::thread::sleep(Duration::from_millis(500));
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "a spent token must not open after a restart");
    // The chain still works with the next element.
    dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &names[1]]);
    connect_soon(&s.lab.client, ssh_addr()).expect("next element opens after the restart");
}

#[test]
fn a_flood_from_one_source_cannot_crowd_out_another() {
    if !require_root("a_flood_from_one_source_cannot_crowd_out_another") {
        return;
    }
    let s = Setup::new("e2eflood", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    // 3000 well-formed random tokens from the attacker, as fast as it can send them:
    // each would cost the verifier a full window of hashes.
    let sock = s.lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let started = std::time::Instant::now();
    for i in 0..3000u16 {
        let e = nxknock::token::Element(rand::random());
        let name = format!("{}.{ZONE}", nxknock::token::Token::Plain(e).to_label());
        let mut msg = Message::new(i, MessageType::Query, OpCode::Query);
        msg.add_query(Query::query(Name::from_ascii(&name).unwrap(), RecordType::A));
        let _ = sock.send_to(&msg.to_vec().unwrap(), format!("{SERVER}:53"));
    }
    // The legitimate knock from another source is verified and opens at once.
    s.dig_knock(&s.lab.client, &cred);
    connect_soon(&s.lab.client, ssh_addr()).expect("legitimate knock opens during the flood");
    std::thread::sleep(Duration::from_millis(500));
    // At most the burst (100) plus 50/s of the attacker's tokens were verified.
    let verified = s.daemon.log_text().matches("reason=\"unknown\"").count();
    let budget = 100 + (started.elapsed().as_secs_f64() * 50.0).ceil() as usize;
    assert!(verified <= budget, "{verified} garbage knocks verified, budget {budget}");
    assert!(verified >= 50, "the limiter admits the burst ({verified})");
}

/// `nxknock knock` exits 0 only on the knock zone's NXDOMAIN: 3 when nothing answers,
/// 4 when the answer is not the knock zone's (here: REFUSED for another zone), 5 for a
/// service the credential may not open (refused before anything is sent).
#[test]
fn knock_exit_codes_say_what_happened() {
    if !require_root("knock_exit_codes_say_what_happened") {
        return;
    }
    let s = Setup::new("e2eexit", "nftables", 30);
    let cred = s.add_user("alice", &[]);
    let code = |o: &std::process::Output| o.status.code();
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let ok = s.knock(&s.lab.client, &cred, &["--ip", CLIENT]);
    assert_eq!(code(&ok), Some(0), "{}", text(&ok));

    // Nothing listens for DNS on the attacker host.
    let silent = s
        .lab
        .client
        .cmd(BIN)
        .args(["knock", "--credential", cred.to_str().unwrap(), "--server", ATTACKER, "--ip", CLIENT])
        .args(["--attempts", "1"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(code(&silent), Some(3), "{}", text(&silent));
    assert!(text(&silent).contains("no answer"), "{}", text(&silent));

    let unknown = s.knock(&s.lab.client, &cred, &["--ip", CLIENT, "--service", "nosuch"]);
    assert_eq!(code(&unknown), Some(5), "{}", text(&unknown));
    assert!(text(&unknown).contains("nosuch") && text(&unknown).contains("ssh"), "{}", text(&unknown));

    // A credential for another zone: our server refuses names outside its zone.
    let other = s.dir.join("other.cred");
    let body =
        std::fs::read_to_string(&cred).unwrap().replace(&format!("zone = \"{ZONE}\""), "zone = \"other.example\"");
    std::fs::write(&other, body).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let wrong = s.knock(&s.lab.client, &other, &["--ip", CLIENT]);
    assert_eq!(code(&wrong), Some(4), "{}", text(&wrong));
    assert!(text(&wrong).contains("REFUSED") || text(&wrong).contains("Refused"), "{}", text(&wrong));
}
