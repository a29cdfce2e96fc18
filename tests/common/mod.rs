//! What the end-to-end tests share beyond the library's lab (`nxknock::lab`:
//! namespaces, the config builder, `nxknock serve`, unbound, dig): a [`Setup`]
//! that panics instead of returning errors, the user's commands, connection
//! checks, and names as strings. Each test builds its own lab (own namespace
//! names) so tests run in parallel; everything is torn down by Drop guards.
// Each test crate uses a different part of this module.
#![allow(dead_code, unused_imports)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use nxknock::config::{PlainPolicy, ServiceConfig};
pub use nxknock::firewall::{BackendKind, Proto};
pub use nxknock::lab::config::{ConfigBuilder, ZONE, ssh};
pub use nxknock::lab::daemon::{Daemon, Serve};
pub use nxknock::lab::dig::Dig;
pub use nxknock::lab::unbound::{Unbound, UnboundOpts};
pub use nxknock::lab::{Lab, Netns, require_root};

pub const BIN: &str = env!("CARGO_BIN_EXE_nxknock");
pub const SERVER: &str = "198.18.0.1";
pub const CLIENT: &str = "198.18.0.2";
pub const ATTACKER: &str = "198.18.0.3";
pub const RESOLVER: &str = "198.18.0.4";
pub const RESOLVER2: &str = "198.18.0.5";

/// Everything a test needs: the lab, a temp dir with config/zone/db, a daemon.
pub struct Setup {
    pub daemon: Daemon,
    pub lab: Lab,
    /// What the daemon's config file was written from.
    pub config: ConfigBuilder,
    /// The temp dir: config, zone, database, logs, credentials.
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The tests' config: backend by name (as the tests print it), doors open `open_seconds`.
pub fn config(backend: &str, open_seconds: u64) -> ConfigBuilder {
    let kind = match backend {
        "nftables" => BackendKind::Nftables,
        "iptables" => BackendKind::Iptables,
        "none" => BackendKind::None,
        other => panic!("no backend {other:?}"),
    };
    ConfigBuilder::new(kind).open_seconds(open_seconds)
}

impl Setup {
    /// Lab + config + daemon started and answering.
    pub fn new(prefix: &str, backend: &str, open_seconds: u64) -> Setup {
        Setup::with(prefix, config(backend, open_seconds))
    }

    pub fn with(prefix: &str, config: ConfigBuilder) -> Setup {
        let lab = Lab::new(prefix).expect("create lab namespaces");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let path = dir.join("nxknock.toml");
        config.write(&path).expect("write the config");
        let daemon = start_daemon(&lab.server, &dir, &path);
        Setup { daemon, lab, config, dir, _tmp: tmp }
    }

    /// Rewrite the config with `change` and restart the daemon on it (same database).
    pub fn reconfigure(&mut self, change: impl FnOnce(ConfigBuilder) -> ConfigBuilder) {
        self.config = change(self.config.clone());
        self.config.write(&self.daemon.config).expect("write the config");
        self.restart();
    }

    /// `nxknock user add NAME`; returns the credential path.
    pub fn add_user(&self, name: &str, args: &[&str]) -> PathBuf {
        let cred = self.dir.join(format!("{name}.cred"));
        let config = self.daemon.config.to_str().unwrap();
        let out = nx(&["user", "add", name, "--out", cred.to_str().unwrap(), "--config", config], args);
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
        self.daemon = start_daemon(&self.lab.server, &self.dir, &self.daemon.config.clone());
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

    /// unbound on lab host `host` (added by the test), listening on `listen`.
    pub fn unbound(&self, host: &str, listen: &str, o: &UnboundOpts) -> Unbound {
        let ns = self.lab.host(host).expect("resolver host");
        let dir = self.dir.join(format!("unbound-{host}"));
        Unbound::start(ns, listen.parse().unwrap(), &dir, o).unwrap_or_else(|e| panic!("start unbound: {e:#}"))
    }
}

/// `nxknock serve` on `config` in `ns`, debug-logging to a new `serve-N.log` in `dir`.
pub fn start_daemon(ns: &Netns, dir: &Path, config: &Path) -> Daemon {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    Serve::new(BIN, config, dir.join(format!("serve-{n}.log")))
        .log_filter("nxknock=debug,nxknock::server=trace,info")
        .start(ns)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Run the nxknock binary on the host (for commands that only touch files).
pub fn nx(args: &[&str], extra: &[&str]) -> Output {
    Command::new(BIN).args(args).args(extra).env_remove("RUST_LOG").output().expect("run nxknock")
}

/// Run `dig` inside `ns`.
pub fn dig(ns: &Netns, args: &[&str]) -> Dig {
    Dig::run(ns, args).expect("run dig")
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

/// A DNS query for `name` (type A, class IN, no recursion) with `id`, as bytes.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// xorshift64*: reproducible pseudo-randomness from a printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Wait (bounded) until `cond` holds, looking every 50 ms, and once more at the end.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// What a hook (or any other program) wrote to `path`: waits (bounded) for the file,
/// gives the writer a moment to finish, and reads it whole; `None` if it never came.
pub fn wait_for_file(path: &Path, within: Duration) -> Option<String> {
    if !wait_until(within, || path.exists()) {
        return None;
    }
    std::thread::sleep(Duration::from_millis(100));
    std::fs::read_to_string(path).ok()
}
