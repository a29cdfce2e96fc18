//! The user's side without a network (no root needed): client profiles and their
//! refusals, the credential's counter under concurrent use, man pages and shell
//! completions, all through the real binary. The namespace tests of `connect`,
//! profiles and host names are in `tests/connect.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nxknock::firewall::BackendKind;
use nxknock::lab::config::ConfigBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_nxknock");

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A home of its own: `HOME` is `home`, no `XDG_CONFIG_HOME`, so the profile file
/// is `home/.config/nxknock/client.toml`.
fn nx_home(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// A backend-less config in `dir` and a credential for alice; returns the credential.
fn enrol(dir: &Path, chain_len: u64) -> PathBuf {
    let cfg = dir.join("nxknock.toml");
    ConfigBuilder::new(BackendKind::None)
        .listen(["127.0.0.1:0".parse().unwrap()])
        .store("db.sqlite")
        .write(&cfg)
        .unwrap();
    let cred = dir.join("alice.cred");
    let out = Command::new(BIN)
        .args(["user", "add", "alice", "--out", cred.to_str().unwrap(), "--config", cfg.to_str().unwrap()])
        .args(["--chain-len", &chain_len.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    cred
}

fn write_profile(path: &Path, body: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn used_plain(cred: &Path) -> u64 {
    let body = std::fs::read_to_string(cred).unwrap();
    let line = body.lines().find(|l| l.starts_with("used_plain")).unwrap();
    line.split('=').nth(1).unwrap().trim().parse().unwrap()
}

#[test]
fn otp_takes_the_credential_from_the_default_profile_and_flags_override_it() {
    let home = tempfile::tempdir().unwrap();
    let cred = enrol(home.path(), 50);
    let other = home.path().join("bob.cred");
    std::fs::copy(&cred, &other).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = home.path().join(".config/nxknock/client.toml");
    // A relative credential path is relative to the profile file's directory.
    write_profile(
        &file,
        "default = \"work\"\n[profile.work]\ncredential = \"~/alice.cred\"\n\
         [profile.spare]\ncredential = \"../../bob.cred\"\n",
        0o600,
    );
    let out = nx_home(home.path(), &["otp", "--count", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    assert_eq!((used_plain(&cred), used_plain(&other)), (2, 0));
    let out = nx_home(home.path(), &["otp", "--profile", "spare"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!((used_plain(&cred), used_plain(&other)), (2, 1));
    // --credential wins over the profile (and needs no profile file at all).
    let out = nx_home(home.path(), &["otp", "--profile", "work", "--credential", other.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!((used_plain(&cred), used_plain(&other)), (2, 2));

    // XDG_CONFIG_HOME, when set, is where the file is looked for.
    let xdg = tempfile::tempdir().unwrap();
    write_profile(
        &xdg.path().join("nxknock/client.toml"),
        &format!("default = \"x\"\n[profile.x]\ncredential = \"{}\"\n", other.display()),
        0o600,
    );
    let out =
        Command::new(BIN).arg("otp").env("HOME", home.path()).env("XDG_CONFIG_HOME", xdg.path()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!((used_plain(&cred), used_plain(&other)), (2, 3));
}

#[test]
fn bad_profiles_are_refused_with_the_file_and_the_fix_and_spend_nothing() {
    let home = tempfile::tempdir().unwrap();
    let cred = enrol(home.path(), 50);
    let file = home.path().join(".config/nxknock/client.toml");

    // No credential anywhere: say what to do.
    let out = nx_home(home.path(), &["knock", "--server", "127.0.0.1", "--ip", "127.0.0.1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--credential") && text(&out).contains("client.toml"), "{}", text(&out));

    let good = format!("default = \"w\"\n[profile.w]\ncredential = \"{}\"\n", cred.display());
    for (body, mode, expect) in [
        // Readable by others: refused with the chmod advice.
        (good.clone(), 0o644, vec!["client.toml", "chmod 600"]),
        (good.clone(), 0o620, vec!["chmod 600"]),
        // An unknown key is named, with the file.
        (good.replace("credential", "credentail"), 0o600, vec!["client.toml", "credentail"]),
        (format!("{good}resolvr = \"system\"\n"), 0o600, vec!["client.toml", "resolvr"]),
        // A default that names no profile, a profile that does not exist.
        (good.replace("default = \"w\"", "default = \"v\""), 0o600, vec!["[profile.v]"]),
        // No credential in the profile.
        ("default = \"w\"\n[profile.w]\nip = \"auto\"\n".to_owned(), 0o600, vec!["credential"]),
    ] {
        write_profile(&file, &body, mode);
        for args in [&["otp"][..], &["knock", "--server", "127.0.0.1", "--ip", "127.0.0.1"], &["connect", "h", "22"]] {
            let out = nx_home(home.path(), args);
            assert_eq!(out.status.code(), Some(1), "{args:?} with {body:?} {mode:o}: {}", text(&out));
            for e in &expect {
                assert!(text(&out).contains(e), "{args:?} with {body:?} {mode:o}: no {e:?} in {}", text(&out));
            }
        }
    }
    write_profile(&file, &good, 0o600);
    let out = nx_home(home.path(), &["otp", "--profile", "nosuch"]);
    assert!(!out.status.success() && text(&out).contains("nosuch") && text(&out).contains('w'), "{}", text(&out));
    assert_eq!(used_plain(&cred), 0, "no refused command may spend an element");
}

/// Several `otp` processes at once on one credential: the counter is read and
/// advanced under a lock, so no name is ever printed twice.
#[test]
fn concurrent_otp_processes_never_print_the_same_name_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cred = enrol(dir.path(), 1000);
    let c = cred.to_str().unwrap();
    let (procs, rounds, count) = (6, 3, 20);
    let children: Vec<_> = (0..procs)
        .map(|_| {
            let c = c.to_owned();
            std::thread::spawn(move || {
                (0..rounds)
                    .flat_map(|_| {
                        let out =
                            Command::new(BIN).args(["otp", "--credential", &c, "--count", "20"]).output().unwrap();
                        assert!(out.status.success(), "{}", text(&out));
                        String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let names: Vec<String> = children.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let distinct: std::collections::HashSet<&String> = names.iter().collect();
    assert_eq!(names.len(), procs * rounds * count);
    assert_eq!(distinct.len(), names.len(), "a name was printed twice");
    assert_eq!(used_plain(&cred), (procs * rounds * count) as u64);
    assert_eq!(std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["knock", "connect", "profile", "credential"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");

    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out = Command::new(BIN).args(["man", "--out", man.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(out.stdout.is_empty(), "man writes files, not stdout");
    for page in ["nxknock.1", "nxknock-knock.1", "nxknock-connect.1", "nxknock-otp.1", "nxknock-user-add.1"] {
        let body = std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(body.contains("\n.TH ") || body.starts_with(".TH "), "{page} is not a man page:\n{body}");
        assert!(body.contains(".SH NAME") && body.contains(".SH OPTIONS"), "{page}:\n{body}");
    }
    let connect = std::fs::read_to_string(man.join("nxknock-connect.1")).unwrap();
    assert!(connect.contains("ProxyCommand") && connect.contains("profile"), "{connect}");
    // Rendered by the real man formatter, when there is one.
    if Path::new("/usr/bin/groff").exists() {
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(man.join("nxknock-connect.1"))
            .output()
            .unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "{}", text(&out));
    }
}
