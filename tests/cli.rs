//! The operator and user surface, run as the real binary (no root needed).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use nxknock::firewall::BackendKind;
use nxknock::lab::config::ConfigBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_nxknock");

fn nx(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `nxknock.toml` in `dir`: `backend`, listening on 127.0.0.1:0, database `db.sqlite`,
/// with `raw` TOML merged over it (see `ConfigBuilder::raw`).
fn write_config(dir: &Path, backend: BackendKind, raw: &str) -> String {
    let cfg = dir.join("nxknock.toml");
    local_config(backend, "db.sqlite").raw(raw).write(&cfg).unwrap();
    cfg.to_str().unwrap().to_owned()
}

fn local_config(backend: BackendKind, store: &str) -> ConfigBuilder {
    ConfigBuilder::new(backend).listen(["127.0.0.1:0".parse().unwrap()]).store(store)
}

#[test]
fn unknown_config_key_is_named_and_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "[firewall]\nopen_secs = 5");
    let out = nx(&["serve", "--config", &cfg]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("nxknock.toml") && t.contains("open_secs"), "{t}");
}

#[test]
fn serve_refuses_to_start_when_the_firewall_cannot_be_set_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::Nftables, "");
    let out = Command::new(BIN)
        .args(["serve", "--config", &cfg])
        .env("PATH", dir.path()) // no nft here
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success(), "must not serve without a guard");
    let t = text(&out);
    assert!(t.contains("guard") && t.contains("nft"), "{t}");
    assert!(!t.contains("nxknock serving"), "{t}");
}

#[test]
fn user_add_writes_a_private_credential_and_prints_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let cred = dir.path().join("alice.cred");
    let out =
        nx(&["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", &cfg, "--from", "198.18.0.0/15"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(dir.path().join("db.sqlite")).unwrap().permissions().mode() & 0o777, 0o600);
    let file = std::fs::read_to_string(&cred).unwrap();
    let secret = |key: &str| file.lines().find(|l| l.starts_with(key)).unwrap().split('"').nth(1).unwrap().to_owned();
    let (seed, key) = (secret("seed"), secret("mac_key"));
    assert_eq!(seed.len(), 64);
    let t = text(&out);
    assert!(!t.contains(&seed) && !t.contains(&key), "secret printed: {t}");
    // The server database never holds the seed.
    let db = std::fs::read(dir.path().join("db.sqlite")).unwrap();
    let seed_bytes = data_encoding::HEXLOWER.decode(seed.as_bytes()).unwrap();
    assert!(!db.windows(32).any(|w| w == seed_bytes.as_slice()), "seed found in the database");

    // Adding the same user, or overwriting a credential, is refused.
    let again = nx(&["user", "add", "alice", "--out", dir.path().join("x").to_str().unwrap(), "--config", &cfg]);
    assert!(!again.status.success() && text(&again).contains("already exists"), "{}", text(&again));
    let over = nx(&["user", "add", "bob", "--out", cred.to_str().unwrap(), "--config", &cfg]);
    assert!(!over.status.success() && text(&over).contains("refusing to overwrite"), "{}", text(&over));
    assert_eq!(std::fs::read_to_string(&cred).unwrap(), file, "credential untouched");

    let list = nx(&["user", "list", "--config", &cfg]);
    assert!(text(&list).contains("alice") && text(&list).contains("198.18.0.0/15"), "{}", text(&list));
}

#[test]
fn otp_never_hands_out_a_name_twice_and_refuses_readable_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let cred = dir.path().join("c");
    let c = cred.to_str().unwrap();
    assert!(nx(&["user", "add", "alice", "--out", c, "--config", &cfg, "--chain-len", "5"]).status.success());
    let a = String::from_utf8(nx(&["otp", "--credential", c, "--count", "3"]).stdout).unwrap();
    let b = String::from_utf8(nx(&["otp", "--credential", c, "--count", "2"]).stdout).unwrap();
    let all: Vec<&str> = a.lines().chain(b.lines()).collect();
    assert_eq!(all.len(), 5);
    let mut uniq = all.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 5, "{all:?}");
    assert!(all.iter().all(|n| n.ends_with(".knock.example.com") && n.split('.').next().unwrap().len() == 20));
    let done = nx(&["otp", "--credential", c]);
    assert!(!done.status.success() && text(&done).contains("rekey"), "{}", text(&done));

    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = nx(&["otp", "--credential", c]);
    assert!(!out.status.success() && text(&out).contains("chmod 600"), "{}", text(&out));
}

/// `otp --ip … --service X` refuses a service the credential may not open, as
/// `knock` does, before it takes an element: nothing is used up.
#[test]
fn otp_bound_refuses_a_service_the_credential_may_not_open_and_spends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let cred = dir.path().join("c");
    let c = cred.to_str().unwrap();
    assert!(nx(&["user", "add", "alice", "--out", c, "--config", &cfg, "--service", "ssh"]).status.success());
    let before = std::fs::read(&cred).unwrap();
    let out = nx(&["otp", "--credential", c, "--ip", "198.18.0.2", "--service", "web"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("\"web\"") && text(&out).contains("ssh"), "{}", text(&out));
    assert_eq!(std::fs::read(&cred).unwrap(), before, "the credential moved on");
    let ok = nx(&["otp", "--credential", c, "--ip", "198.18.0.2", "--service", "ssh"]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert_ne!(std::fs::read(&cred).unwrap(), before);
}

#[test]
fn knock_without_an_address_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let cred = dir.path().join("c");
    assert!(nx(&["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", &cfg]).status.success());
    let out = nx(&["knock", "--credential", cred.to_str().unwrap(), "--server", "127.0.0.1"]);
    assert!(!out.status.success() && text(&out).contains("--ip"), "{}", text(&out));
}

#[test]
fn corrupt_database_is_refused_and_not_modified() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let db = dir.path().join("db.sqlite");
    let junk = vec![0x5au8; 8192];
    std::fs::write(&db, &junk).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = nx(&["serve", "--config", &cfg]);
    assert!(!out.status.success());
    assert!(text(&out).contains("db.sqlite"), "{}", text(&out));
    assert_eq!(std::fs::read(&db).unwrap(), junk);
}

/// A config like [`write_config`]'s, in file `cfg_name`, with the database at `store` (relative to `dir`).
fn write_store_config(dir: &Path, cfg_name: &str, store: &str) -> String {
    let cfg = dir.join(cfg_name);
    local_config(BackendKind::None, store).write(&cfg).unwrap();
    cfg.to_str().unwrap().to_owned()
}

/// Everything a refused store command must leave as it was: the database's
/// bytes, mode and owner, and every entry (name, mode, owner) of the directories.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    db: Vec<u8>,
    db_meta: (u32, u32, u32),
    dirs: Vec<(String, u32, u32)>,
}

fn snapshot(db: &Path, dirs: &[&Path]) -> Snapshot {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(db).unwrap();
    let mut entries = Vec::new();
    for d in dirs {
        let dm = std::fs::symlink_metadata(d).unwrap();
        entries.push((d.display().to_string(), dm.mode(), dm.uid()));
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let em = std::fs::symlink_metadata(e.path()).unwrap();
            entries.push((e.path().display().to_string(), em.mode(), em.uid()));
        }
    }
    entries.sort();
    Snapshot { db: std::fs::read(db).unwrap(), db_meta: (m.mode(), m.uid(), m.gid()), dirs: entries }
}

/// `user list` and `user add` on a store that must be refused: both fail, name
/// one of `paths` (the configured or the real path), write no credential, change nothing.
fn assert_store_refused(
    cfg: &str,
    dir: &Path,
    paths: &[String],
    before: &Snapshot,
    db: &Path,
    dirs: &[&Path],
    what: &str,
) {
    let cred = dir.join(format!("bob-{}.cred", what.len()));
    for args in [
        vec!["user", "list", "--config", cfg],
        vec!["user", "add", "bob", "--out", cred.to_str().unwrap(), "--config", cfg],
    ] {
        let out = nx(&args);
        let t = text(&out);
        assert!(!out.status.success(), "{what}: `{}` must be refused: {t}", args[..2].join(" "));
        assert!(
            paths.iter().any(|p| t.contains(p.as_str())),
            "{what}: the message must name the path ({paths:?}): {t}"
        );
        assert!(!cred.exists(), "{what}: a credential was written");
        assert_eq!(&snapshot(db, dirs), before, "{what}: `{}` changed the store", args[..2].join(" "));
    }
}

#[test]
fn user_add_refuses_unsafe_names() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let long = "a".repeat(65);
    let cred = dir.path().join("bad.cred");
    for bad in
        ["-alice", "--", ".alice", "..", ".", "a/b", "../evil", "/abs", "al ice", " alice", "alice ", "", long.as_str()]
    {
        // After `--` so clap hands even a leading '-' to the name check.
        let out = nx(&["user", "add", "--out", cred.to_str().unwrap(), "--config", &cfg, "--", bad]);
        assert!(!out.status.success(), "user name {bad:?} must be refused: {}", text(&out));
        assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty(), "{bad:?}: say why");
        assert!(!cred.exists(), "{bad:?}: no credential may be written");
    }
    let list = nx(&["user", "list", "--config", &cfg]);
    assert!(list.status.success(), "{}", text(&list));
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 1, "no user was enrolled: {}", text(&list));
    // The edges of the rule are accepted: exactly 64 characters, '.' and '-' inside a name.
    let max = "b".repeat(64);
    for good in [max.as_str(), "alice.smith-2"] {
        let c = dir.path().join(format!("{}.cred", good.len()));
        let out = nx(&["user", "add", good, "--out", c.to_str().unwrap(), "--config", &cfg]);
        assert!(out.status.success(), "{good:?} is a fine name: {}", text(&out));
    }
}

#[test]
fn store_refuses_a_database_reached_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let real_cfg = write_store_config(dir.path(), "real.toml", "real/db.sqlite");
    let alice = dir.path().join("alice.cred");
    let out = nx(&["user", "add", "alice", "--out", alice.to_str().unwrap(), "--config", &real_cfg]);
    assert!(out.status.success(), "{}", text(&out));
    let real_db = dir.path().join("real/db.sqlite");
    let link = dir.path().join("link.sqlite");
    std::os::unix::fs::symlink(&real_db, &link).unwrap();
    let link_cfg = write_store_config(dir.path(), "link.toml", "link.sqlite");
    let real_dir = dir.path().join("real");
    let dirs = [dir.path(), real_dir.as_path()];
    let before = snapshot(&real_db, &dirs);
    let paths = [link.display().to_string(), real_db.display().to_string()];
    assert_store_refused(&link_cfg, dir.path(), &paths, &before, &real_db, &dirs, "symlinked database");
    // Control: the same database at its real path is fine.
    let list = nx(&["user", "list", "--config", &real_cfg]);
    assert!(list.status.success() && text(&list).contains("alice"), "{}", text(&list));
}

#[test]
fn store_refuses_a_database_owned_by_another_user() {
    if !nxknock::lab::require_root("store_refuses_a_database_owned_by_another_user") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let alice = dir.path().join("alice.cred");
    let out = nx(&["user", "add", "alice", "--out", alice.to_str().unwrap(), "--config", &cfg]);
    assert!(out.status.success(), "{}", text(&out));
    let db = dir.path().join("db.sqlite");
    std::os::unix::fs::chown(&db, Some(65534), Some(65534)).unwrap();
    let dirs = [dir.path()];
    let before = snapshot(&db, &dirs);
    assert_store_refused(
        &cfg,
        dir.path(),
        &[db.display().to_string()],
        &before,
        &db,
        &dirs,
        "database owned by uid 65534",
    );
    // Control: owned by us again, it opens.
    std::os::unix::fs::chown(&db, Some(0), Some(0)).unwrap();
    let list = nx(&["user", "list", "--config", &cfg]);
    assert!(list.status.success() && text(&list).contains("alice"), "{}", text(&list));
}

#[test]
fn store_refuses_a_database_directory_writable_by_others() {
    for mode in [0o777, 0o770] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_store_config(dir.path(), "nxknock.toml", "state/db.sqlite");
        let alice = dir.path().join("alice.cred");
        let out = nx(&["user", "add", "alice", "--out", alice.to_str().unwrap(), "--config", &cfg]);
        assert!(out.status.success(), "{}", text(&out));
        let state = dir.path().join("state");
        let db = state.join("db.sqlite");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
        let dirs = [dir.path(), state.as_path()];
        let before = snapshot(&db, &dirs);
        // The directory's path is part of the database's, so either names it.
        let what = format!("database directory mode {mode:o}");
        assert_store_refused(&cfg, dir.path(), &[state.display().to_string()], &before, &db, &dirs, &what);
        // Control: a private directory again, and it opens.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let list = nx(&["user", "list", "--config", &cfg]);
        assert!(list.status.success() && text(&list).contains("alice"), "{}", text(&list));
    }
}

/// A `user add` whose credential cannot be written leaves no user behind: the same
/// name can be added again at once.
#[test]
fn failed_user_add_leaves_no_half_user() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), BackendKind::None, "");
    let nowhere = dir.path().join("no/such/dir/alice.cred");
    let out = nx(&["user", "add", "alice", "--out", nowhere.to_str().unwrap(), "--config", &cfg]);
    assert!(!out.status.success() && text(&out).contains("not added"), "{}", text(&out));
    let list = nx(&["user", "list", "--config", &cfg]);
    assert!(!text(&list).contains("alice"), "{}", text(&list));
    let cred = dir.path().join("alice.cred");
    let again = nx(&["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", &cfg]);
    assert!(again.status.success(), "re-adding must work: {}", text(&again));
    // `user set` changes the policy by name; `user delete` removes the user for good.
    let set = nx(&["user", "set", "alice", "--from", "198.18.0.0/15", "--max-open", "10", "--config", &cfg]);
    assert!(set.status.success(), "{}", text(&set));
    let list = text(&nx(&["user", "list", "--config", &cfg]));
    assert!(list.contains("198.18.0.0/15"), "{list}");
    let bad = nx(&["user", "set", "alice", "--service", "nosuch", "--config", &cfg]);
    assert!(!bad.status.success() && text(&bad).contains("nosuch"), "{}", text(&bad));
    let del = nx(&["user", "delete", "alice", "--config", &cfg]);
    assert!(del.status.success(), "{}", text(&del));
    assert!(!text(&nx(&["user", "list", "--config", &cfg])).contains("alice"));
    let gone = nx(&["user", "delete", "alice", "--config", &cfg]);
    assert!(!gone.status.success() && text(&gone).contains("no such user"), "{}", text(&gone));
}

/// Each cause once: an OS error is not repeated after the message that names it.
#[test]
fn errors_say_their_cause_once() {
    let out = nx(&["user", "list", "--config", "/nonexistent/nxknock.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/nxknock.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}
