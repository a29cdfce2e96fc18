//! The PostgreSQL store (issue: "Several nameservers and a fleet of protected
//! hosts, sharing state in PostgreSQL") against a real, throwaway cluster
//! (`nxknock::lab::postgres`: initdb + pg_ctl as the postgres user): the Store
//! contract, the compare-and-advance raced by many connections, notifications of
//! other writers, reconnecting after the database restarts, the user commands,
//! and config errors. The namespace tests with two nameservers are in
//! `tests/postgres_e2e.rs`.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use nxknock::config::StoreUrl;
use nxknock::lab::postgres::Postgres;
use nxknock::store::{DoorRecord, Enrolment, PgStore, Store, StoreError};
use nxknock::token::{Element, Form};

fn enrol(name: &str, v: u8) -> Enrolment {
    Enrolment {
        name: name.into(),
        verifiers: [Element([v; 12]), Element([v.wrapping_add(100); 12])],
        chain_len: 100,
        mac_key: vec![9; 32],
        services: vec!["ssh".into()],
        from: vec![],
        max_open: None,
    }
}

fn door(user: &str, t: u64) -> DoorRecord {
    DoorRecord {
        user: user.into(),
        service: "ssh".into(),
        addr: "198.18.0.2".parse().unwrap(),
        prefix_len: 32,
        proto: Proto::Tcp,
        port: 22,
        via: "dns/udp".into(),
        single_use: false,
        opened_at: t,
        expires_at: t + 30,
        host: String::new(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn postgres_store_keeps_the_contract_and_advances_exactly_once() {
    if !require_root("postgres_store_keeps_the_contract_and_advances_exactly_once") {
        return;
    }
    let pg = Postgres::start("store", None).unwrap_or_else(|e| panic!("{e:#}"));
    let url = StoreUrl::new(pg.url());

    // A command that only reads refuses an empty database instead of creating a schema.
    let e = PgStore::open(&url, false).err().expect("no schema yet").to_string();
    assert!(e.contains("no nxknock schema"), "{e}");
    let mut s = PgStore::open(&url, true).unwrap();
    assert_eq!(pg.psql("SELECT max(version) FROM schema_version").unwrap(), "2");
    // A second open (another nameserver) neither migrates again nor changes the zone key.
    let key = s.zone_key().unwrap();
    assert_eq!(PgStore::open(&url, true).unwrap().zone_key().unwrap(), key, "zone key is stable");
    assert_eq!(pg.psql("SELECT count(*) FROM schema_version").unwrap(), "2");

    let id = s.add_user(&enrol("alice", 1)).unwrap();
    assert!(matches!(s.add_user(&enrol("alice", 5)), Err(StoreError::UserExists(_))));
    assert!(matches!(s.add_user(&enrol("-rf", 6)), Err(StoreError::BadUserName(_))));
    // Bulk enrolment is all or nothing.
    assert!(
        matches!(s.add_users(&[enrol("d", 40), enrol("alice", 41)]), Err(StoreError::UserExists(n)) if n == "alice")
    );
    assert_eq!(s.list_users().unwrap().len(), 1);

    // Compare-and-advance: exactly once per chain, forms kept apart.
    assert!(s.spend(id, Form::Plain, &Element([1; 12]), &Element([2; 12]), 1, &[], None).unwrap());
    assert!(!s.spend(id, Form::Plain, &Element([1; 12]), &Element([3; 12]), 2, &[], None).unwrap());
    assert!(!s.spend(id, Form::Bound, &Element([2; 12]), &Element([4; 12]), 1, &[], None).unwrap());
    let u = s.user(id).unwrap().unwrap();
    assert_eq!((u.chain(Form::Plain).verifier, u.chain(Form::Plain).counter), (Element([2; 12]), 1));
    assert_eq!(u.chain(Form::Bound).verifier, Element([101; 12]));
    let mut seen = Vec::new();
    s.active_verifiers(&mut |user, form, v| seen.push((user, form, v))).unwrap();
    seen.sort_by_key(|(_, f, _)| f.index());
    assert_eq!(seen, vec![(id, Form::Plain, Element([2; 12])), (id, Form::Bound, Element([101; 12]))]);

    // Many connections race for the same element: exactly one wins.
    const RACERS: usize = 8;
    let barrier = Arc::new(Barrier::new(RACERS));
    let wins: usize = (0..RACERS)
        .map(|i| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut s = PgStore::open(&url, false).unwrap();
                barrier.wait();
                s.spend(id, Form::Plain, &Element([2; 12]), &Element([50 + i as u8; 12]), 2, &[], None).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| usize::from(h.join().unwrap()))
        .sum();
    assert_eq!(wins, 1, "exactly one of {RACERS} concurrent advances of one element wins");

    // Door records, revoke, rekey.
    let t = now();
    let carol = s.add_user(&enrol("carol", 2)).unwrap();
    // A spend commits the element and its door records together.
    assert!(s.spend(id, Form::Bound, &Element([101; 12]), &Element([5; 12]), 1, &[door("alice", t)], None).unwrap());
    assert!(s.spend(carol, Form::Plain, &Element([2; 12]), &Element([3; 12]), 1, &[door("carol", t)], None).unwrap());
    assert_eq!(s.live_doors(t).unwrap().len(), 2);
    assert!(s.revoke("alice").unwrap());
    assert!(!s.revoke("alice").unwrap());
    assert!(matches!(s.revoke("nobody"), Err(StoreError::NoSuchUser(_))));
    assert_eq!(s.live_doors(t).unwrap(), vec![door("carol", t)], "revoke closes the user's door records");
    assert!(
        !s.spend(id, Form::Bound, &Element([5; 12]), &Element([6; 12]), 2, &[door("alice", t)], None).unwrap(),
        "revoked: no advance, no door recorded"
    );
    assert_eq!(s.live_doors(t).unwrap(), vec![door("carol", t)]);
    assert_eq!(s.revoked_users().unwrap(), vec!["alice".to_owned()]);
    assert_eq!(s.active_users().unwrap().len(), 1);
    assert_eq!(s.rekey(&enrol("alice", 7)).unwrap(), id);
    assert!(s.spend(id, Form::Plain, &Element([7; 12]), &Element([8; 12]), 1, &[], None).unwrap());
    s.close_door("carol", &door("carol", t).key()).unwrap();
    assert!(s.live_doors(t).unwrap().is_empty());
    s.set_policy("carol", &[], &["198.18.0.0/24".into()], Some(60)).unwrap();
    let carol = s.list_users().unwrap().into_iter().find(|u| u.name == "carol").unwrap();
    assert_eq!((carol.services.len(), carol.from.clone(), carol.max_open), (0, vec!["198.18.0.0/24".into()], Some(60)));
    // A spend on a revision the row has left (a policy changed since, even within
    // the same second) writes nothing; on the current one it goes through.
    let before = s.user(carol.id).unwrap().unwrap();
    s.set_policy("carol", &[], &[], None).unwrap();
    let after = s.user(carol.id).unwrap().unwrap();
    assert!(after.revision > before.revision, "{} -> {}", before.revision, after.revision);
    let v = after.chain(Form::Plain).verifier;
    assert!(!s.spend(carol.id, Form::Plain, &v, &Element([90; 12]), 1, &[], Some(before.revision)).unwrap());
    assert!(s.spend(carol.id, Form::Plain, &v, &Element([90; 12]), 1, &[], Some(after.revision)).unwrap());
    s.delete_user("carol").unwrap();
    assert!(matches!(s.delete_user("carol"), Err(StoreError::NoSuchUser(_))));
}

/// A revoke that commits while a knock is being spent must not leave the revoked
/// user a door: the spend waits for the revoke's lock on the user's row and then
/// spends and records nothing (found by review: under READ COMMITTED the door
/// records went in after a revoke that had not seen them).
#[test]
fn a_revoke_during_a_spend_leaves_no_door() {
    if !require_root("a_revoke_during_a_spend_leaves_no_door") {
        return;
    }
    let pg = Postgres::start("revoke-race", None).unwrap_or_else(|e| panic!("{e:#}"));
    let url = StoreUrl::new(pg.url());
    let mut s = PgStore::open(&url, true).unwrap();
    let id = s.add_user(&enrol("mallory", 1)).unwrap();
    // The revoke, by hand and held open: the same row lock `user revoke` takes.
    let mut admin = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let mut revoke = admin.transaction().unwrap();
    revoke.query_one("SELECT revoked FROM users WHERE id = $1 FOR UPDATE", &[&id]).unwrap();
    revoke.execute("UPDATE users SET revoked = 1 WHERE id = $1", &[&id]).unwrap();
    let t = now();
    let knock = std::thread::spawn(move || {
        s.spend(id, Form::Plain, &Element([1; 12]), &Element([2; 12]), 1, &[door("mallory", t)], None).unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!knock.is_finished(), "the spend went ahead of an uncommitted revoke of the same user");
    revoke.commit().unwrap();
    assert!(!knock.join().unwrap(), "a user revoked meanwhile spent an element");
    let doors = pg.psql("SELECT count(*) FROM doors WHERE user_name = 'mallory'").unwrap();
    assert_eq!(doors, "0", "a user revoked meanwhile got a door record");
}

#[test]
fn postgres_notifies_other_writers_and_survives_a_database_restart() {
    if !require_root("postgres_notifies_other_writers_and_survives_a_database_restart") {
        return;
    }
    let pg = Postgres::start("notify", None).unwrap_or_else(|e| panic!("{e:#}"));
    let url = StoreUrl::new(pg.url());
    let mut a = PgStore::open(&url, true).unwrap();
    let mut b = PgStore::open(&url, true).unwrap();
    assert!(!a.changed_elsewhere().unwrap());
    // Our own writes are not "elsewhere".
    let id = a.add_user(&enrol("alice", 1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!a.changed_elsewhere().unwrap(), "a's own write does not count as another writer's");
    assert!(b.changed_elsewhere().unwrap(), "b hears a's user add");
    assert!(!b.changed_elsewhere().unwrap());
    assert!(b.spend(id, Form::Plain, &Element([1; 12]), &Element([2; 12]), 1, &[], None).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(a.changed_elsewhere().unwrap(), "a hears b's advance");

    // The database goes away: every call fails (closed), nothing is accepted.
    pg.stop().unwrap();
    assert!(a.spend(id, Form::Plain, &Element([2; 12]), &Element([3; 12]), 2, &[], None).is_err());
    assert!(a.active_users().is_err());
    pg.start_again().unwrap();
    // Back: the store connects again by itself (at most a second later) and asks
    // for a reload, since notifications sent meanwhile were lost.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let changed = loop {
        // While not connected: "nothing new" or the failed attempt's error.
        match a.changed_elsewhere() {
            Ok(true) => break true,
            _ if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(200)),
            _ => break false,
        }
    };
    assert!(changed, "a reconnect tells the caller to reload");
    // Nothing was lost and nothing is accepted twice across the restart.
    assert!(!a.spend(id, Form::Plain, &Element([1; 12]), &Element([9; 12]), 1, &[], None).unwrap());
    assert!(a.spend(id, Form::Plain, &Element([2; 12]), &Element([3; 12]), 2, &[], None).unwrap());
    assert_eq!(a.user(id).unwrap().unwrap().chain(Form::Plain).counter, 2);
}

#[test]
fn postgres_user_commands_and_config_errors() {
    if !require_root("postgres_user_commands_and_config_errors") {
        return;
    }
    let pg = Postgres::start("cli", None).unwrap_or_else(|e| panic!("{e:#}"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    nxknock::lab::config::write_zone(dir).unwrap();
    let cfg = config("none", 30).store_url(&pg.url());
    let path = dir.join("nxknock.toml");
    cfg.write(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("url = ") && !text.contains("path = \"\""), "{text}");
    let c = path.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = nx(args, &["--config", c]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = run(&["user", "list"]);
    assert!(!ok && text.contains("no nxknock schema"), "user list creates nothing: {text}");
    let cred = dir.join("alice.cred");
    let (ok, text) = run(&["user", "add", "alice", "--out", cred.to_str().unwrap()]);
    assert!(ok, "{text}");
    let (ok, text) = run(&["user", "add", "alice", "--out", dir.join("again.cred").to_str().unwrap()]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let (ok, text) = run(&["user", "list"]);
    assert!(ok && text.contains("alice") && text.contains("active"), "{text}");
    let (ok, text) = run(&["user", "revoke", "alice"]);
    assert!(ok && text.contains("revoked alice"), "{text}");
    let (_, text) = run(&["user", "list"]);
    assert!(text.contains("revoked"), "{text}");
    let (ok, text) = run(&["user", "rekey", "alice", "--out", dir.join("alice2.cred").to_str().unwrap()]);
    assert!(ok, "{text}");
    let (_, text) = run(&["user", "list"]);
    assert!(text.contains("active"), "{text}");
    let (ok, text) = run(&["store", "upgrade"]);
    assert!(ok && text.contains("current"), "{text}");
    // A database of schema 1 (before door grants) is migrated, data kept.
    pg.psql(
        "DROP TRIGGER doors_grant ON doors; DROP FUNCTION nxknock_grant(); DROP INDEX doors_host;
         DELETE FROM schema_version WHERE version = 2",
    )
    .unwrap();
    let (ok, text) = run(&["store", "upgrade"]);
    assert!(ok && text.contains("schema 1 -> 2"), "{text}");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_trigger WHERE tgname = 'doors_grant'").unwrap(), "1");
    // A database newer than this nxknock is refused by name, not used.
    pg.psql("INSERT INTO schema_version VALUES (99, 0)").unwrap();
    let (ok, text) = run(&["user", "list"]);
    assert!(!ok && text.contains("schema version 99 is newer"), "{text}");
    pg.psql("DELETE FROM schema_version WHERE version = 99").unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM users").unwrap(), "1");

    // Config errors name the key; a password never shows.
    let write = |store: &str| {
        let t = text_with_store(&std::fs::read_to_string(&path).unwrap(), store);
        let p = dir.join("bad.toml");
        std::fs::write(&p, t).unwrap();
        let out = nx(&["user", "list", "--config", p.to_str().unwrap()], &[]);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = write("path = \"db\"\nurl = \"postgres://u:hunter2@db/x\"\n");
    assert!(code != Some(0) && err.contains("store.url") && err.contains("not both"), "{err}");
    assert!(!err.contains("hunter2"), "the password never shows: {err}");
    let (code, err) = write("url = \"postgres://u:hunter2@db/x?sslmode=bogus\"\n");
    assert!(code != Some(0) && err.contains("store.url") && err.contains("verify-full"), "{err}");
    assert!(!err.contains("hunter2"), "the password never shows: {err}");
    let (code, err) = write("url = \"postgres://u:hunter2@db/x?sslrootcert=/ca.pem\"\n");
    assert!(code != Some(0) && err.contains("store.url") && err.contains("sslrootcert needs"), "{err}");
    assert!(!err.contains("hunter2"), "the password never shows: {err}");
    let (code, err) = write("");
    assert!(code != Some(0) && err.contains("store.path"), "{err}");
    let (code, err) = write("url = \"mysql://db/x\"\n");
    assert!(code != Some(0) && err.contains("store.url"), "{err}");
    // Services on other hosts need the shared database.
    let sqlite = dir.join("sqlite.toml");
    config("none", 30)
        .service(nxknock::config::ServiceConfig {
            hosts: vec!["bastion".into()],
            ..ServiceConfig::new("b", Proto::Tcp, 2222)
        })
        .write(&sqlite)
        .unwrap();
    let out = nx(&["user", "list", "--config", sqlite.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("service[1].hosts") && err.contains("[store] url"), "{err}");
}

/// `text` with its `[store]` table's body replaced by `body`.
fn text_with_store(text: &str, body: &str) -> String {
    let start = text.find("[store]\n").expect("a [store] table") + "[store]\n".len();
    let end = text[start..].find("\n[").map_or(text.len(), |i| start + i + 1);
    format!("{}{body}{}", &text[..start], &text[end..])
}
