//! `nxknock connect` as ssh's ProxyCommand against a real OpenSSH server behind
//! the guard, client profiles and host names in a namespace lab, and what
//! `connect` exits with when it cannot get in. Needs root; under `CI=true`
//! these tests fail rather than skip.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use nxknock::lab::process::Process;

fn out_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// OpenSSH's sshd on the server's port 22 with its own throwaway host key and
/// config; root logs in with the key at `key`. Killed on drop.
struct Sshd {
    process: Process,
    /// The user's private key.
    key: PathBuf,
}

impl Sshd {
    fn start(ns: &Netns, dir: &Path) -> Sshd {
        let dir = dir.join("sshd");
        std::fs::create_dir_all(&dir).unwrap();
        // sshd refuses to start without its privilege separation directory, which
        // the package's service would create at boot.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let (host_key, key) = (dir.join("host_key"), dir.join("id_user"));
        for k in [&host_key, &key] {
            let out = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "nxknock-test", "-f"])
                .arg(k)
                .output()
                .expect("run ssh-keygen (scripts/deps installs openssh-client)");
            assert!(out.status.success(), "ssh-keygen: {}", out_text(&out));
        }
        std::fs::copy(dir.join("id_user.pub"), dir.join("authorized_keys")).unwrap();
        let conf = dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress {SERVER}:22\nHostKey {hk}\nPidFile none\nUsePAM no\nStrictModes no\n\
                 AuthorizedKeysFile {ak}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUseDNS no\nLogLevel VERBOSE\n",
                hk = host_key.display(),
                ak = dir.join("authorized_keys").display()
            ),
        )
        .unwrap();
        let mut cmd = ns.cmd("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"]).arg(&conf);
        let mut process = Process::spawn("sshd", &mut cmd, &dir.join("sshd.log"))
            .expect("start sshd (scripts/deps installs openssh-server)");
        process
            .wait_ready(Duration::from_secs(10), |p| p.log_text().contains("Server listening on"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        Sshd { process, key }
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// `ssh root@dest remote` from `ns` with `config` (`/dev/null` or an ssh_config),
/// no host key checks, the test's key, bounded by `timeout`; `env` for the
/// ProxyCommand (HOME for a client profile).
fn run_ssh(ns: &Netns, sshd: &Sshd, config: &str, opts: &[&str], dest: &str, env: &[(&str, &Path)]) -> Output {
    let mut c = ns.cmd("timeout");
    c.args(["30", "ssh", "-F", config, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=3", "-o", "IdentitiesOnly=yes"])
        .arg("-i")
        .arg(&sshd.key)
        .args(opts)
        .args([&format!("root@{dest}"), "echo", "ok"])
        .stdin(Stdio::null())
        .env_remove("RUST_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn proxy(cred: &Path, extra: &str) -> String {
    format!("ProxyCommand={BIN} connect --credential {} --server {SERVER} --ip {CLIENT}{extra} %h %p", cred.display())
}

fn said_ok(o: &Output) -> bool {
    o.status.success() && String::from_utf8_lossy(&o.stdout) == "ok\n"
}

#[test]
fn ssh_through_connect_gets_in_and_nothing_else_does() {
    if !require_root("ssh_through_connect_gets_in_and_nothing_else_does") {
        return;
    }
    let s = Setup::new("conssh", "nftables", 30);
    let sshd = Sshd::start(&s.lab.server, &s.dir);
    let cred = s.add_user("alice", &["--service", "ssh"]);

    let plain = run_ssh(&s.lab.client, &sshd, "/dev/null", &[], SERVER, &[]);
    assert!(!plain.status.success() && !said_ok(&plain), "ssh without a knock must not connect: {}", out_text(&plain));

    let via = run_ssh(&s.lab.client, &sshd, "/dev/null", &["-o", &proxy(&cred, "")], SERVER, &[]);
    assert!(said_ok(&via), "ssh through `nxknock connect`: {}\nsshd:\n{}", out_text(&via), sshd.log_text());
    assert!(sshd.log_text().contains("Accepted publickey for root"), "{}", sshd.log_text());
    assert!(s.daemon.log_text().contains("door opened"), "{}", s.daemon.log_text());

    // The door is the client's: the attacker's ssh, with or without its own
    // ProxyCommand knocking nothing, does not get through.
    let attacker = run_ssh(&s.lab.attacker, &sshd, "/dev/null", &[], SERVER, &[]);
    assert!(!attacker.status.success() && !said_ok(&attacker), "{}", out_text(&attacker));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    // While the client's own door is open, plain ssh from the client works too.
    assert!(said_ok(&run_ssh(&s.lab.client, &sshd, "/dev/null", &[], SERVER, &[])));
}

#[test]
fn connect_does_not_spend_a_single_use_door_on_a_probe() {
    if !require_root("connect_does_not_spend_a_single_use_door_on_a_probe") {
        return;
    }
    let s = Setup::with("cononce", config("nftables", 30).services([ServiceConfig { single_use: true, ..ssh() }]));
    let sshd = Sshd::start(&s.lab.server, &s.dir);
    let cred = s.add_user("alice", &[]);

    let via = run_ssh(&s.lab.client, &sshd, "/dev/null", &["-o", &proxy(&cred, " --service ssh")], SERVER, &[]);
    assert!(said_ok(&via), "ssh through `connect` on a single-use door: {}\n{}", out_text(&via), sshd.log_text());
    // That one connection used the door up: nothing else gets in.
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "a single-use door admits one connection");
    let again = run_ssh(&s.lab.client, &sshd, "/dev/null", &[], SERVER, &[]);
    assert!(!again.status.success(), "{}", out_text(&again));

    // What `connect` avoids: a knock whose --wait probe connects first spends
    // the door, and the program it then runs cannot get in.
    let mut knock = s.lab.client.cmd(BIN);
    knock
        .args(["knock", "--credential", cred.to_str().unwrap(), "--server", SERVER, "--ip", CLIENT])
        .args(["--wait", &format!("{SERVER}:22"), "--"])
        .args(["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-i"])
        .arg(&sshd.key)
        .args([&format!("root@{SERVER}"), "echo", "ok"]);
    let probed = knock.stdin(Stdio::null()).output().unwrap();
    assert!(!said_ok(&probed), "the probe must have spent the door: {}", out_text(&probed));

    // And `connect` again, with a new knock, gets in again.
    let via = run_ssh(&s.lab.client, &sshd, "/dev/null", &["-o", &proxy(&cred, "")], SERVER, &[]);
    assert!(said_ok(&via), "{}", out_text(&via));
}

/// Files under `/etc/netns/<ns>/`, which `ip netns exec` shows a program in
/// place of those in /etc: here `hosts` (names for the lab) and a `resolv.conf`
/// that fails at once (nothing listens on 127.0.0.1:53 there). Removed on drop.
struct NetnsEtc(PathBuf);

impl NetnsEtc {
    fn new(ns: &Netns, hosts: &str) -> NetnsEtc {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}")).unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n").unwrap();
        NetnsEtc(dir)
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn used_bound(cred: &Path) -> u64 {
    let body = std::fs::read_to_string(cred).unwrap();
    body.lines().find(|l| l.starts_with("used_bound")).unwrap().split('=').nth(1).unwrap().trim().parse().unwrap()
}

#[test]
fn a_profile_and_host_names_are_all_a_knock_needs() {
    if !require_root("a_profile_and_host_names_are_all_a_knock_needs") {
        return;
    }
    let s = Setup::new("conprof", "nftables", 30);
    let _etc = NetnsEtc::new(&s.lab.client, &format!("{SERVER} nxknock-ns.lab door.lab\n"));
    let sshd = Sshd::start(&s.lab.server, &s.dir);
    let cred = s.add_user("alice", &["--service", "ssh"]);
    let home = s.dir.join("home");
    let profile = home.join(".config/nxknock/client.toml");
    std::fs::create_dir_all(profile.parent().unwrap()).unwrap();
    std::fs::write(
        &profile,
        format!(
            "default = \"lab\"\n[profile.lab]\ncredential = \"{}\"\nserver = \"nxknock-ns.lab\"\nip = \"{CLIENT}\"\n\
             service = \"ssh\"\n",
            cred.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&profile, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let nx_home = |ns: &Netns, args: &[&str]| {
        ns.cmd(BIN).args(args).env("HOME", &home).env_remove("XDG_CONFIG_HOME").env_remove("RUST_LOG").output().unwrap()
    };

    // A name that does not resolve is an error that names it, and spends nothing.
    let before = used_bound(&cred);
    for args in [
        &["knock", "--server", "no-such.lab"][..],
        &["knock", "--wait", "no-such.lab:22"],
        &["connect", "no-such.lab", "22"],
    ] {
        let out = nx_home(&s.lab.client, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out_text(&out));
        assert!(out_text(&out).contains("no-such.lab"), "{args:?}: {}", out_text(&out));
        assert!(out.stdout.is_empty());
    }
    assert_eq!(used_bound(&cred), before, "an unresolvable name must not spend a knock");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "nothing opened yet");

    // ssh's own config, as the README shows it: nothing on the command line but the host.
    let ssh_config = s.dir.join("ssh_config");
    std::fs::write(&ssh_config, format!("Host door.lab\n    ProxyCommand {BIN} connect %h %p\n")).unwrap();
    let via = run_ssh(&s.lab.client, &sshd, ssh_config.to_str().unwrap(), &[], "door.lab", &[("HOME", &home)]);
    assert!(said_ok(&via), "ssh door.lab through the profile: {}\n{}", out_text(&via), sshd.log_text());
    assert_eq!(used_bound(&cred), before + 1, "one knock");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err(), "the door is the client's");

    // `knock` with nothing but the profile, and --wait by name.
    let out = nx_home(&s.lab.client, &["knock", "--wait", "door.lab:22"]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(out_text(&out).contains(&format!("knocked for {CLIENT}")) && out_text(&out).contains("door open"));
    // A flag overrides the profile: the same knock through a "server" that does not answer.
    let out = nx_home(&s.lab.client, &["knock", "--server", ATTACKER, "--attempts", "1"]);
    assert_eq!(out.status.code(), Some(3), "{}", out_text(&out));

    // A credential that records its server by name needs only --ip.
    let named = s.dir.join("named.cred");
    let config = s.daemon.config.to_str().unwrap();
    let out = nx(
        &["user", "add", "bob", "--out", named.to_str().unwrap(), "--server", "nxknock-ns.lab:53", "--config", config],
        &[],
    );
    assert!(out.status.success(), "{}", out_text(&out));
    let out = s
        .lab
        .client
        .cmd(BIN)
        .args(["knock", "--credential", named.to_str().unwrap(), "--ip", CLIENT])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    // The answer leaves before the door is opened and logged: wait (bounded) for the log.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !s.daemon.log_text().contains("door opened user=bob") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.daemon.log_text().contains("door opened user=bob"), "{}", s.daemon.log_text());
}

#[test]
fn connect_relays_to_the_end_and_says_why_it_could_not_get_in() {
    if !require_root("connect_relays_to_the_end_and_says_why_it_could_not_get_in") {
        return;
    }
    let web = ServiceConfig::new("web", Proto::Tcp, 80);
    let s = Setup::with("conexit", config("nftables", 30).services([ssh(), web]));
    let _ssh = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let _web = echo_service(&s.lab.server, &format!("{SERVER}:80"));
    let _ssh6 = echo_service(&s.lab.server, &format!("[{}]:22", nxknock::lab::SERVER_V6));
    let cred = s.add_user("alice", &[]);
    let connect = |extra: &[&str], host_port: [&str; 2], input: &[u8]| {
        let mut child = s
            .lab
            .client
            .cmd("timeout")
            .args(["20", BIN, "connect", "--credential", cred.to_str().unwrap()])
            .args(if extra.contains(&"--server") { &[][..] } else { &["--server", SERVER][..] })
            .args(if extra.contains(&"--ip") { &[][..] } else { &["--ip", CLIENT][..] })
            .args(extra)
            .args(host_port)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap(); // and closed: the end of our input
        child.wait_with_output().unwrap()
    };

    // The echo server answers until our end of input reaches it as a half-close,
    // then closes; connect passes every byte back and exits 0 only then.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = connect(&["--service", "ssh"], [SERVER, "22"], &data);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == data, "relayed {} of {} bytes back", out.stdout.len(), data.len());
    assert!(out.stderr.is_empty(), "connect is quiet on success: {}", String::from_utf8_lossy(&out.stderr));

    // Over IPv6, the host given as ssh gives %h: a bare address.
    let v6 = nxknock::lab::CLIENT_V6.to_string();
    let out = connect(&["--ip", &v6], [&nxknock::lab::SERVER_V6.to_string(), "22"], b"over six");
    assert_eq!(out.status.code(), Some(0), "{}", out_text(&out));
    assert_eq!(out.stdout, b"over six");

    // A door for ssh does not admit port 80: 6, after the bounded retries.
    let out = connect(&["--service", "ssh"], [SERVER, "80"], b"x");
    assert_eq!(out.status.code(), Some(6), "{}", out_text(&out));
    assert!(out_text(&out).contains("did not accept a connection"), "{}", out_text(&out));
    assert!(out.stdout.is_empty(), "diagnostics never go to stdout");
    // Knock failures keep their codes, and nothing is connected or printed.
    let out = connect(&["--service", "nosuch"], [SERVER, "22"], b"x");
    assert_eq!(out.status.code(), Some(5), "{}", out_text(&out));
    assert!(out.stdout.is_empty());
    let out = connect(&["--server", ATTACKER, "--attempts", "1"], [SERVER, "22"], b"x");
    assert_eq!(out.status.code(), Some(3), "{}", out_text(&out));
    assert!(out.stdout.is_empty());
    assert!(try_connect(&s.lab.attacker, format!("{SERVER}:80").parse().unwrap()).is_err());
}
