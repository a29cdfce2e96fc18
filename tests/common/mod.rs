//! Shared end-to-end harness: a real `nxknock serve` inside a namespace of a [`Lab`],
//! real `dig`, real TCP connections. Each test builds its own lab (own namespace
//! names) so tests run in parallel; everything is torn down by Drop guards.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use nxknock::lab::{Lab, Netns, require_root};

pub const BIN: &str = env!("CARGO_BIN_EXE_nxknock");
pub const SERVER: &str = "198.18.0.1";
pub const CLIENT: &str = "198.18.0.2";
pub const ATTACKER: &str = "198.18.0.3";
pub const ZONE: &str = "knock.example.com";

/// A running daemon in the lab's server namespace; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    ns: String,
}

/// Everything a test needs: the lab, a temp dir with config/zone/db, a daemon.
pub struct Setup {
    pub daemon: Daemon,
    pub lab: Lab,
    _tmp: tempfile::TempDir,
}

pub const SSH_SERVICE: &str = "[[service]]\nname = \"ssh\"\nproto = \"tcp\"\nport = 22\n";

/// What a test's daemon config varies.
#[derive(Clone)]
pub struct Opts {
    pub backend: &'static str,
    pub open_seconds: u64,
    /// `[[service]]` tables (default: ssh on tcp/22).
    pub services: String,
    /// DNS listen addresses (default: the server's IPv4 address, port 53).
    pub listen: Vec<String>,
    /// Raw TOML lines added inside `[dns]` (e.g. `whoami = true`).
    pub dns_extra: String,
    /// Raw TOML appended after everything else (e.g. a `[token]` table).
    pub extra: String,
}

impl Opts {
    pub fn new(backend: &'static str, open_seconds: u64) -> Opts {
        Opts {
            backend,
            open_seconds,
            services: SSH_SERVICE.into(),
            listen: vec![format!("{SERVER}:53")],
            dns_extra: String::new(),
            extra: String::new(),
        }
    }
}

pub fn config_text(dir: &Path, o: &Opts) -> String {
    format!(
        r#"[dns]
zone_file = "{zone}"
listen = [{listen}]
{dns_extra}
[store]
path = "{db}"
[firewall]
backend = "{backend}"
open_seconds = {open_seconds}
{services}
{extra}
"#,
        zone = Path::new(env!("CARGO_MANIFEST_DIR")).join("zones/knock.example.com.zone").display(),
        db = dir.join("nxknock.db").display(),
        listen = o.listen.iter().map(|l| format!("\"{l}\"")).collect::<Vec<_>>().join(", "),
        backend = o.backend,
        open_seconds = o.open_seconds,
        services = o.services,
        dns_extra = o.dns_extra,
        extra = o.extra,
    )
}

impl Setup {
    /// Lab + config + daemon started and answering.
    pub fn new(prefix: &str, backend: &'static str, open_seconds: u64) -> Setup {
        Setup::with(prefix, Opts::new(backend, open_seconds))
    }

    pub fn with(prefix: &str, opts: Opts) -> Setup {
        let lab = Lab::new(prefix).expect("create lab namespaces");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let config = dir.join("nxknock.toml");
        std::fs::write(&config, config_text(&dir, &opts)).unwrap();
        let daemon = Daemon::start(&lab.server, &dir, &config);
        Setup { daemon, lab, _tmp: tmp }
    }

    /// `nxknock user add NAME`; returns the credential path.
    pub fn add_user(&self, name: &str, args: &[&str]) -> PathBuf {
        let cred = self.daemon.dir.join(format!("{name}.cred"));
        let out = nx(&["user", "add", name, "--out", cred.to_str().unwrap(), "--config", self.daemon.config.to_str().unwrap()], args);
        assert!(out.status.success(), "user add: {}", String::from_utf8_lossy(&out.stderr));
        cred
    }

    pub fn otp(&self, cred: &Path, count: u64) -> Vec<String> {
        let out = nx(&["otp", "--credential", cred.to_str().unwrap(), "--count", &count.to_string()], &[]);
        assert!(out.status.success(), "otp: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
    }

    pub fn restart(&mut self) {
        self.daemon.kill();
        self.start_again();
    }

    /// Start a new daemon on the same config and database (after kill/terminate).
    pub fn start_again(&mut self) {
        self.daemon = Daemon::start(&self.lab.server, &self.daemon.dir.clone(), &self.daemon.config.clone());
    }

    /// Run nxknock inside the server namespace (doors, uninstall-firewall, …).
    pub fn nx_server(&self, args: &[&str]) -> Output {
        let mut a = args.to_vec();
        a.extend(["--config", self.daemon.config.to_str().unwrap()]);
        self.lab.server.cmd(BIN).args(&a).env_remove("RUST_LOG").output().unwrap()
    }

    /// `nxknock knock` from `ns` straight to the server.
    pub fn knock(&self, ns: &Netns, cred: &Path, extra: &[&str]) -> Output {
        ns.cmd(BIN)
            .args(["knock", "--credential", cred.to_str().unwrap(), "--server", SERVER])
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// Knock with `dig` for the next OTP name; asserts the NXDOMAIN.
    pub fn dig_knock(&self, ns: &Netns, cred: &Path) {
        let name = self.otp(cred, 1).remove(0);
        let d = dig(ns, &[&format!("@{SERVER}"), "+norec", &name]);
        assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    }
}

/// Run the nxknock binary on the host (for commands that only touch files).
pub fn nx(args: &[&str], extra: &[&str]) -> Output {
    Command::new(BIN).args(args).args(extra).env_remove("RUST_LOG").output().expect("run nxknock")
}

impl Daemon {
    pub fn start(ns: &Netns, dir: &Path, config: &Path) -> Daemon {
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("serve-{n}.log"));
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = ns
            .cmd(BIN)
            .args(["serve", "--log", "nxknock=debug,info", "--config", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn nxknock serve");
        let mut d = Daemon { child: Some(child), dir: dir.to_owned(), config: config.to_owned(), log, ns: ns.name().to_owned() };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.log_text().contains("nxknock serving") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nxknock serve exited with {status}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nxknock serve not ready after 20 s:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!("daemon did not exit within 10 s of SIGTERM");
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parsed essentials of a dig answer.
#[derive(Debug)]
pub struct Dig {
    pub status: String,
    pub aa: bool,
    pub text: String,
}

/// Run `dig` inside `ns`.
pub fn dig(ns: &Netns, args: &[&str]) -> Dig {
    let out = ns.cmd("dig").args(["+time=2", "+tries=2"]).args(args).output().expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO-ANSWER")
        .to_owned();
    let aa = text.lines().any(|l| l.starts_with(";; flags:") && l.split(';').nth(2).is_some_and(|f| f.split_whitespace().any(|w| w == "aa")));
    Dig { status, aa, text }
}

/// A TCP service on the server's port 22 that echoes what it reads.
pub fn echo_service(ns: &Netns, addr: &str) -> TcpListener {
    let l = ns.tcp_listen(addr.parse().unwrap()).expect("listen on server port");
    let l2 = l.try_clone().unwrap();
    std::thread::spawn(move || {
        for s in l2.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    l
}

pub fn ssh_addr() -> SocketAddr {
    format!("{SERVER}:22").parse().unwrap()
}

/// One connection attempt with a short timeout (a dropped SYN just times out).
pub fn try_connect(ns: &Netns, addr: SocketAddr) -> std::io::Result<TcpStream> {
    ns.tcp_connect(addr, Duration::from_millis(400))
}

/// Connect, retrying briefly: the door opens a moment after the NXDOMAIN leaves.
pub fn connect_soon(ns: &Netns, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut last = None;
    for _ in 0..5 {
        match ns.tcp_connect(addr, Duration::from_millis(300)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap())
}

/// Round-trip bytes over an established connection.
pub fn echo_works(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
}

/// Wait (bounded) until new connections from `ns` are refused again.
pub fn wait_closed(ns: &Netns, addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if try_connect(ns, addr).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

pub const RESOLVER: &str = "198.18.0.4";
pub const RESOLVER2: &str = "198.18.0.5";

/// A real unbound in its own lab host, with a stub zone for the knock zone
/// pointing at the nxknock server. Killed on drop.
pub struct Unbound {
    child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Knobs the resolver tests turn.
#[derive(Clone, Default)]
pub struct UnboundOpts {
    pub qname_minimisation: bool,
    pub caps_for_id: bool,
    /// Send EDNS Client Subnet (/32) to the server.
    pub ecs: bool,
    /// Talk to the server over TCP only.
    pub tcp_upstream: bool,
    /// Extra stub addresses (a second nameserver of the zone).
    pub extra_stub: Vec<String>,
}

impl Unbound {
    pub fn start(ns: &Netns, listen: &str, o: &UnboundOpts) -> Unbound {
        let dir = tempfile::tempdir().unwrap();
        let yn = |b: bool| if b { "yes" } else { "no" };
        let mut stubs = format!("    stub-addr: {SERVER}\n");
        for s in &o.extra_stub {
            stubs.push_str(&format!("    stub-addr: {s}\n"));
        }
        let ecs = if o.ecs {
            format!(
                "    module-config: \"subnetcache iterator\"\n    send-client-subnet: {SERVER}\n{}    max-client-subnet-ipv4: 32\n    client-subnet-always-forward: yes\n",
                o.extra_stub.iter().map(|s| format!("    send-client-subnet: {s}\n")).collect::<String>()
            )
        } else {
            "    module-config: \"iterator\"\n".to_owned()
        };
        let conf = format!(
            "server:\n    interface: {listen}\n    port: 53\n    access-control: 198.18.0.0/15 allow\n    do-daemonize: no\n\
             \x20   username: \"\"\n    chroot: \"\"\n    directory: \"{dir}\"\n    pidfile: \"\"\n    use-syslog: no\n\
             \x20   logfile: \"\"\n    verbosity: 1\n    num-threads: 1\n    do-ip6: no\n    do-not-query-localhost: no\n\
             \x20   qname-minimisation: {qm}\n    use-caps-for-id: {caps}\n    tcp-upstream: {tcp}\n\
             \x20   harden-referral-path: no\n    domain-insecure: \"{ZONE}\"\n{ecs}\
             stub-zone:\n    name: \"{ZONE}\"\n{stubs}",
            dir = dir.path().display(),
            qm = yn(o.qname_minimisation),
            caps = yn(o.caps_for_id),
            tcp = yn(o.tcp_upstream),
        );
        let cfg = dir.path().join("unbound.conf");
        std::fs::write(&cfg, conf).unwrap();
        let log = dir.path().join("unbound.log");
        let child = ns
            .cmd("unbound")
            .args(["-d", "-c", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start unbound (apt-get install unbound)");
        let mut u = Unbound { child: Some(child), log, _dir: dir };
        // Ready when it answers a static name of the zone through the stub.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let d = dig(ns, &[&format!("@{listen}"), &format!("ns1.{ZONE}"), "A", "+time=1", "+tries=1"]);
            if d.status == "NOERROR" {
                break;
            }
            if let Some(st) = u.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("unbound exited with {st}: {}", std::fs::read_to_string(&u.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "unbound not answering: {}", std::fs::read_to_string(&u.log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(100));
        }
        u
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Make `ns` unable to reach the server's DNS directly: only a resolver path is left.
pub fn block_direct_dns(ns: &Netns) {
    for cmd in [
        vec!["nft", "add", "table", "inet", "nodirect"],
        vec!["nft", "add", "chain", "inet", "nodirect", "out", "{ type filter hook output priority 0; }"],
        vec!["nft", "add", "rule", "inet", "nodirect", "out", "ip", "daddr", SERVER, "udp", "dport", "53", "drop"],
        vec!["nft", "add", "rule", "inet", "nodirect", "out", "ip", "daddr", SERVER, "tcp", "dport", "53", "drop"],
    ] {
        ns.run(&cmd).expect("block direct DNS");
    }
}
