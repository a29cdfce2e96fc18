//! No secret in any log at any level: the daemon runs at `--log trace` through every
//! kind of knock (plain, bound, close, whoami, UDP, port sequence, replays, garbage),
//! and its whole log is then searched for every token sent and every key of the
//! credential — in base32, hex, upper and lower case. Needs root; under `CI=true`
//! the test fails rather than skip.

mod common;

use std::time::Duration;

use common::*;
use nxknock::config::PcapConfig;

fn out_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn no_token_seed_or_key_reaches_the_log_even_at_trace() {
    if !require_root("no_token_seed_or_key_reaches_the_log_even_at_trace") {
        return;
    }
    let pcap =
        PcapConfig { udp_port: Some(62201), sequence_ports: Some("61000-61999".into()), ..PcapConfig::default() };
    let cfg = config("nftables", 30).whoami(true).pcap(pcap);
    let lab = Lab::new("secrets").expect("lab");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("nxknock.toml");
    cfg.write(&path).unwrap();
    let log = tmp.path().join("serve.log");
    let daemon = Serve::new(BIN, &path, log.clone()).log_filter("trace").start(&lab.server).expect("serve at trace");
    let _svc = echo_service(&lab.server, &format!("{SERVER}:22"));

    let cred = tmp.path().join("alice.cred");
    let c = path.to_str().unwrap();
    let out = nx(&["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", c, "--server", SERVER], &[]);
    assert!(out.status.success(), "{}", out_text(&out));
    let cred_s = cred.to_str().unwrap();

    let mut sent: Vec<String> = Vec::new();
    // Plain knocks with dig, each twice (a repeat), one from the attacker (a replay).
    let names = String::from_utf8(nx(&["otp", "--credential", cred_s, "--count", "3"], &[]).stdout).unwrap();
    for name in names.lines() {
        for ns in [&lab.client, &lab.client, &lab.attacker] {
            let _ = nxknock::lab::dig::Dig::run(ns, &[&format!("@{SERVER}"), "+norec", "+tries=1", name]);
        }
        sent.push(name.split('.').next().unwrap().to_owned());
    }
    // Bound names by hand (recorded), and the client's own knocks: bound, whoami, close, UDP, sequence.
    let bound = String::from_utf8(nx(&["otp", "--credential", cred_s, "--ip", CLIENT], &[]).stdout).unwrap();
    let bound = bound.lines().next().unwrap().to_owned();
    let _ = nxknock::lab::dig::Dig::run(&lab.client, &[&format!("@{SERVER}"), "+norec", &bound]);
    sent.push(bound.split('.').next().unwrap().to_owned());
    for args in [
        vec!["--ip", CLIENT],
        vec!["--ip", "auto"],
        vec!["--ip", CLIENT, "--close"],
        vec!["--via", "udp", "--ip", CLIENT],
        vec!["--via", "tcp"],
    ] {
        let out = lab
            .client
            .cmd(BIN)
            .args(["knock", "--credential", cred_s])
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(out.status.success(), "knock {args:?}: {}", out_text(&out));
    }
    let udp =
        String::from_utf8(nx(&["otp", "--credential", cred_s, "--via", "udp", "--ip", CLIENT], &[]).stdout).unwrap();
    let udp = udp.trim().to_owned();
    let sock = lab.attacker.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    sock.send_to(udp.as_bytes(), (SERVER, 62201)).unwrap();
    sock.send_to(b"garbage that is no knock", (SERVER, 62201)).unwrap();
    sent.push(udp);
    assert!(connect_soon(&lab.client, ssh_addr()).is_ok(), "the knocks opened");
    std::thread::sleep(Duration::from_millis(500));
    drop(daemon);

    let text = std::fs::read_to_string(&log).unwrap().to_lowercase();
    assert!(text.contains("trace") && text.contains("door opened"), "the log is at trace and saw the knocks");
    for token in &sent {
        assert!(!text.contains(&token.to_lowercase()), "a token reached the log: {token}");
        // Any 20-character run of it (a plain element's length) is as bad.
        let t = token.to_lowercase();
        for start in (0..t.len().saturating_sub(20)).step_by(7) {
            assert!(!text.contains(&t[start..start + 20]), "part of a token reached the log: {token}");
        }
    }
    let cred_text: toml::Table = toml::from_str(&std::fs::read_to_string(&cred).unwrap()).unwrap();
    for key in ["seed", "mac_key", "zone_key"] {
        let hex = cred_text[key].as_str().unwrap().to_lowercase();
        let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).unwrap();
        let b32 = data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase();
        let b64 = data_encoding::BASE64.encode(&bytes).to_lowercase();
        for form in [&hex, &b32, &b64] {
            assert!(!text.contains(&form[..16]), "the credential's {key} reached the log");
        }
    }
}
