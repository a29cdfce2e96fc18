//! The operator and user surface, run as the real binary (no root needed).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_nxknock");

fn nx(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write_config(dir: &Path, backend: &str, extra: &str) -> String {
    let zone = Path::new(env!("CARGO_MANIFEST_DIR")).join("zones/knock.example.com.zone");
    let cfg = dir.join("nxknock.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dns]\nzone_file = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n[store]\npath = \"db.sqlite\"\n[firewall]\nbackend = \"{backend}\"\n{extra}\n[[service]]\nname = \"ssh\"\nproto = \"tcp\"\nport = 22\n",
            zone.display()
        ),
    )
    .unwrap();
    cfg.to_str().unwrap().to_owned()
}

#[test]
fn unknown_config_key_is_named_and_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "none", "open_secs = 5");
    let out = nx(&["serve", "--config", &cfg]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("nxknock.toml") && t.contains("open_secs"), "{t}");
}

#[test]
fn serve_refuses_to_start_when_the_firewall_cannot_be_set_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "nftables", "");
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
    let cfg = write_config(dir.path(), "none", "");
    let cred = dir.path().join("alice.cred");
    let out = nx(&["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", &cfg, "--from", "198.18.0.0/15"]);
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
    let cfg = write_config(dir.path(), "none", "");
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

#[test]
fn knock_without_an_address_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "none", "");
    let cred = dir.path().join("c");
    assert!(nx(&["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", &cfg]).status.success());
    let out = nx(&["knock", "--credential", cred.to_str().unwrap(), "--server", "127.0.0.1"]);
    assert!(!out.status.success() && text(&out).contains("--ip"), "{}", text(&out));
}

#[test]
fn corrupt_database_is_refused_and_not_modified() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "none", "");
    let db = dir.path().join("db.sqlite");
    let junk = vec![0x5au8; 8192];
    std::fs::write(&db, &junk).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = nx(&["serve", "--config", &cfg]);
    assert!(!out.status.success());
    assert!(text(&out).contains("db.sqlite"), "{}", text(&out));
    assert_eq!(std::fs::read(&db).unwrap(), junk);
}
