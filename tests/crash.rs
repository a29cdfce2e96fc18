//! Crash safety: SIGKILL the daemon at random moments while valid knocks and their
//! replays stream in, fifty times, then check what must hold whatever the timing:
//! no chain position accepted twice, the database intact, the guard in place after
//! every kill, no door in the kernel longer than its time, and the user still able
//! to knock while the attacker's replays never open. Needs root; under `CI=true`
//! the test fails rather than skip.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

const ROUNDS: usize = 50;
const OPEN_SECONDS: u64 = 2;

fn socket_in(ns: &Netns) -> UdpSocket {
    ns.udp_bind("0.0.0.0:0".parse().unwrap()).expect("udp socket")
}

fn guard_present(s: &Setup) -> bool {
    s.lab.server.run(&["nft", "list", "chain", "inet", "nxknock", "input"]).is_ok_and(|t| t.contains("drop"))
}

/// `(set, seconds left)` for every door element the kernel holds.
fn kernel_doors(s: &Setup) -> Vec<(String, u64)> {
    let json = s.lab.server.run(&["nft", "-j", "list", "table", "inet", "nxknock"]).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
    let mut out = Vec::new();
    for set in v["nftables"].as_array().into_iter().flatten().filter_map(|i| i.get("set")) {
        let name = set["name"].as_str().unwrap_or("").to_owned();
        if !(name.starts_with("doors") || name.starts_with("once")) {
            continue;
        }
        for e in set["elem"].as_array().into_iter().flatten() {
            out.push((name.clone(), e["elem"]["expires"].as_u64().unwrap_or(0)));
        }
    }
    out
}

#[test]
fn sigkill_at_random_moments_never_accepts_an_element_twice() {
    if !require_root("sigkill_at_random_moments_never_accepts_an_element_twice") {
        return;
    }
    let mut s = Setup::new("crashloop", "nftables", OPEN_SECONDS);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("erin", &[]);
    let names = s.otp(&cred, (ROUNDS * 4) as u64);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("crash loop seed {seed:#x}");
    let mut rng = Rng(seed);
    let server: SocketAddr = format!("{SERVER}:53").parse().unwrap();
    let (client, attacker) = (socket_in(&s.lab.client), socket_in(&s.lab.attacker));
    let started = Instant::now();

    for (round, batch) in names.chunks(4).enumerate() {
        // Four valid knocks, each sent twice by the user and replayed by the attacker,
        // on a thread, while the daemon is killed at a random moment.
        let (c, a) = (client.try_clone().unwrap(), attacker.try_clone().unwrap());
        let batch: Vec<String> = batch.to_vec();
        let sender = std::thread::spawn(move || {
            for (i, name) in batch.iter().enumerate() {
                let q = a_query(i as u16, name);
                let _ = c.send_to(&q, server);
                std::thread::sleep(Duration::from_millis(2));
                let _ = c.send_to(&q, server);
                let _ = a.send_to(&q, server);
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        std::thread::sleep(Duration::from_millis(rng.next() % 30));
        s.daemon.kill();
        sender.join().unwrap();
        assert!(guard_present(&s), "round {round}: the guard is in place after SIGKILL");
        assert!(
            kernel_doors(&s).iter().all(|(_, left)| *left <= OPEN_SECONDS),
            "round {round}: no door outlives its time: {:?}",
            kernel_doors(&s)
        );
        s.start_again();
    }
    println!("{ROUNDS} kills in {:.1} s", started.elapsed().as_secs_f64());

    // Every position of the plain chain was accepted at most once, over all runs.
    let mut spent: HashMap<String, usize> = HashMap::new();
    for entry in std::fs::read_dir(&s.dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("serve-") {
            for line in std::fs::read_to_string(&path).unwrap().lines().filter(|l| l.contains("element spent")) {
                let pos = line.split_whitespace().find(|w| w.starts_with("position=")).expect("position").to_owned();
                *spent.entry(pos).or_default() += 1;
            }
        }
    }
    println!("{} positions accepted", spent.len());
    let twice: Vec<_> = spent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "positions accepted twice: {twice:?}");
    assert!(spent.len() >= ROUNDS / 2, "the loop must accept knocks to mean anything: {} accepted", spent.len());

    // The database is intact; the replays never opened for the attacker; the user can still knock.
    s.daemon.kill();
    let db = s.dir.join(nxknock::lab::config::STORE_FILE);
    assert_eq!(nxknock::store::SqliteStore::check_integrity_of(&db).unwrap(), None, "integrity_check");
    assert!(
        wait_until(Duration::from_secs(OPEN_SECONDS + 2), || kernel_doors(&s).is_empty()),
        "with the daemon dead, every door expires in the kernel: {:?}",
        kernel_doors(&s)
    );
    s.start_again();
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the attacker never holds a door");
    s.dig_knock(&s.lab.client, &cred);
    assert!(connect_soon(&s.lab.client, ssh_addr()).is_ok(), "the user still gets in after the crashes");
}
