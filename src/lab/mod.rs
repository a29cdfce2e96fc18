//! Throwaway network namespaces: the test harness and the stage of `nxknock demo`.
//!
//! A firewall can only be tested by sending real packets through it, and that
//! must never touch the machine's own firewall or interfaces. A [`Lab`] is
//! four fresh network namespaces: `server`, `client` and `attacker`, each with
//! one interface `eth0` plugged into a bridge that lives in a fourth namespace.
//! Every veth is created *inside* the bridge namespace and its peer moved
//! straight into a host namespace, so nothing ever appears in the root
//! namespace and interface names cannot collide between labs. Dropping the
//! lab (also while unwinding from a failed assertion) deletes all of it.
//!
//! Code runs "on" a host through [`Netns::enter`], which runs a closure on a
//! thread that has joined the namespace: sockets it creates stay in that
//! namespace, and processes it spawns (`nft`, `iptables`) start there too, so
//! the door backends need no namespace awareness beyond opening their netlink
//! socket from the calling thread (`firewall/nfnl.rs`).
//!
//! All of this needs root; [`require_root`] decides whether a test skips or fails.
//!
//! What runs on the stage is here too, once for the demo, the tests and the
//! benchmark: [`config`] builds the daemon's config as typed values,
//! [`daemon`] runs the real `nxknock serve` on a host, [`unbound`] a real
//! recursive resolver, [`process`] what every such daemon has in common (log,
//! readiness, killed on drop), [`postgres`] a throwaway PostgreSQL cluster,
//! [`dig`] asks with the stock tool, and
//! [`interrupt`] lets Ctrl-C tear it all down through the Drop guards.

pub mod config;
pub mod daemon;
pub mod dig;
pub mod interrupt;
pub mod knotd;
pub mod postgres;
pub mod process;
pub mod unbound;

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// The one interface of every host namespace.
pub const IFACE: &str = "eth0";

pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ATTACKER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);
pub const ATTACKER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 3);
/// Prefix lengths of the lab addresses above.
pub const V4_PREFIX_LEN: u8 = 24;
pub const V6_PREFIX_LEN: u8 = 64;

/// Every host also routes these on-link, so a test can give a host an extra
/// address from another subnet (an attacker outside the client's /64, a
/// resolver elsewhere) and everyone reaches it over the shared bridge with
/// plain ARP/NDP, without any router.
const ONLINK_V4: &str = "198.18.0.0/15";
const ONLINK_V6: &str = "2001:db8::/32";

/// Whether a test that needs root may run. As root: `true`. Otherwise the
/// test is skipped (`false`) with a loud message, unless the environment
/// variable `CI` is set to anything non-empty: there a skipped firewall test
/// would be a silent hole in the coverage, so it panics instead.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    match root_policy(root, ci) {
        RootPolicy::Run => true,
        RootPolicy::Fail => {
            panic!("{test} needs root and network namespaces, and CI is set: refusing to skip")
        }
        RootPolicy::Skip => {
            // Through the handle, not eprintln!: the test harness captures
            // the print macros of passing tests, which would hide the skip.
            use std::io::Write;
            let _ = writeln!(
                io::stderr(),
                "\n**************** SKIPPED (not root): {test} needs root and network namespaces; \
                 set CI=true to make this a failure ****************\n"
            );
            false
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RootPolicy {
    Run,
    Skip,
    Fail,
}

/// The decision of [`require_root`], apart so it can be tested as root.
fn root_policy(root: bool, ci: bool) -> RootPolicy {
    match (root, ci) {
        (true, _) => RootPolicy::Run,
        (false, false) => RootPolicy::Skip,
        (false, true) => RootPolicy::Fail,
    }
}

/// A named network namespace (`ip netns`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with `lo` up. A leftover of the same name
    /// (from a test run that was killed) is deleted first, so reruns start
    /// clean instead of failing with "File exists".
    pub fn new(name: &str) -> io::Result<Netns> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad netns name {name:?}")));
        }
        if Path::new(NETNS_DIR).join(name).exists() {
            tracing::warn!(netns = name, "deleting leftover namespace");
            let _ = run_checked(Command::new("ip").args(["netns", "del", name]));
        }
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        // From here on, Drop cleans up if anything fails.
        let ns = Netns { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `args[0] args[1..]` inside the namespace and returns its stdout;
    /// a non-zero exit is an error carrying stderr.
    pub fn run(&self, args: &[&str]) -> io::Result<String> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "Netns::run needs a program"))?;
        let out = run_checked(self.cmd(program).args(rest))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <ns> args…`: configures the namespace without entering it.
    fn ip(&self, args: &[&str]) -> io::Result<()> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns
    /// its result. Sockets made there belong to the namespace for good;
    /// children spawned there start in it. A panic in `f` is re-raised here.
    ///
    /// Fails (without running `f`) if the namespace cannot be joined, so `f`
    /// never runs by accident in the root namespace, where it could change
    /// the host's own firewall.
    pub fn try_enter<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let handle = File::open(Path::new(NETNS_DIR).join(&self.name))?;
        std::thread::scope(|s| {
            let thread =
                std::thread::Builder::new().name(format!("netns-{}", self.name)).spawn_scoped(s, move || {
                    // SAFETY: `handle` is an open namespace file, and joining a
                    // network namespace affects only the calling thread, which
                    // is this fresh one and ends with the closure.
                    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    drop(handle);
                    Ok(f())
                })?;
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// [`Netns::try_enter`] for callers that cannot go on without the
    /// namespace (tests, demo): panics if it cannot be joined.
    pub fn enter<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        self.try_enter(f).unwrap_or_else(|e| panic!("cannot enter network namespace {}: {e}", self.name))
    }

    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.try_enter(|| TcpListener::bind(addr))?
    }

    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.try_enter(|| TcpStream::connect_timeout(&addr, timeout))?
    }

    /// Connects from a chosen local address, for hosts with several (the
    /// IPv6 /64 door tests).
    pub fn tcp_connect_from(&self, src: IpAddr, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        use socket2::{Domain, Protocol, Socket, Type};
        self.try_enter(|| {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            sock.bind(&SocketAddr::new(src, 0).into())?;
            sock.connect_timeout(&addr.into(), timeout)?;
            Ok(sock.into())
        })?
    }

    pub fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.try_enter(|| UdpSocket::bind(addr))?
    }

    /// Adds another address to `eth0` (IPv6 without duplicate address
    /// detection, so it is usable at once).
    pub fn add_addr(&self, addr: IpAddr, prefix_len: u8) -> io::Result<()> {
        let cidr = format!("{addr}/{prefix_len}");
        let mut args = vec!["addr", "add", &cidr, "dev", IFACE];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        self.ip(&args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!(netns = %self.name, cause = %e, "cannot delete namespace");
        }
    }
}

/// Runs a command to completion; non-zero exit is an error with stderr.
fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Server, client and attacker on one bridged link (see the module docs).
///
/// Addresses: [`SERVER_V4`]/[`CLIENT_V4`]/[`ATTACKER_V4`] in 198.18.0.0/24 and
/// [`SERVER_V6`]/[`CLIENT_V6`]/[`ATTACKER_V6`] in 2001:db8:18::/64. Note that
/// client and attacker share that /64; a test of /64 doors gives the attacker
/// an address from another /64.
#[derive(Debug)]
pub struct Lab {
    pub server: Netns,
    pub client: Netns,
    pub attacker: Netns,
    /// Hosts added with [`Lab::add_host`].
    extra: Vec<Netns>,
    /// Holds the bridge `br0`. Declared last so it is dropped last.
    bridge: Netns,
    prefix: String,
}

impl Lab {
    /// Builds the lab in namespaces `<prefix>-srv`, `-cli`, `-atk` and `-br`.
    /// Give concurrent labs (parallel tests) distinct prefixes.
    pub fn new(prefix: &str) -> io::Result<Lab> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if prefix.is_empty() || prefix.len() > 20 || !prefix.chars().all(valid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("lab prefix {prefix:?}: use 1-20 of [A-Za-z0-9_-]"),
            ));
        }
        let bridge = Netns::new(&format!("{prefix}-br"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        // If a host fails, the namespaces made so far drop here and vanish.
        let server = attach(&bridge, prefix, "srv", SERVER_V4, SERVER_V6)?;
        let client = attach(&bridge, prefix, "cli", CLIENT_V4, CLIENT_V6)?;
        let attacker = attach(&bridge, prefix, "atk", ATTACKER_V4, ATTACKER_V6)?;
        tracing::debug!(prefix, "lab ready");
        Ok(Lab { server, client, attacker, extra: Vec::new(), bridge, prefix: prefix.to_owned() })
    }

    /// Adds a host `<prefix>-<name>` on the same link with `v4`/24 and
    /// `v6`/64 (e.g. a recursive resolver). `name` is also its bridge port's
    /// interface name, hence at most 15 characters.
    pub fn add_host(&mut self, name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> io::Result<&Netns> {
        if name.is_empty() || name.len() > 15 || name == "br0" || self.host(name).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("host name {name:?}: must be new, not br0, 1-15 characters"),
            ));
        }
        let ns = attach(&self.bridge, &self.prefix, name, v4, v6)?;
        self.extra.push(ns);
        Ok(self.extra.last().expect("just pushed"))
    }

    /// A host by its short name (`srv`, `cli`, `atk`, or one added).
    pub fn host(&self, name: &str) -> Option<&Netns> {
        let full = format!("{}-{name}", self.prefix);
        [&self.server, &self.client, &self.attacker].into_iter().chain(&self.extra).find(|ns| ns.name == full)
    }

    /// The namespace holding the bridge (for `tcpdump -i br0`).
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }
}

/// Creates host namespace `<prefix>-<name>` and plugs it into `br0`: the
/// veth is made inside the bridge namespace (port named `<name>`) and its
/// peer, `eth0`, moved straight into the host.
fn attach(bridge: &Netns, prefix: &str, name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> io::Result<Netns> {
    let ns = Netns::new(&format!("{prefix}-{name}"))?;
    bridge.ip(&["link", "add", name, "type", "veth", "peer", "name", IFACE, "netns", &ns.name])?;
    bridge.ip(&["link", "set", name, "master", "br0", "up"])?;
    ns.add_addr(IpAddr::V4(v4), V4_PREFIX_LEN)?;
    ns.add_addr(IpAddr::V6(v6), V6_PREFIX_LEN)?;
    ns.ip(&["link", "set", IFACE, "up"])?;
    ns.ip(&["route", "add", ONLINK_V4, "dev", IFACE])?;
    ns.ip(&["-6", "route", "add", ONLINK_V6, "dev", IFACE])?;
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_policy_skips_only_outside_ci() {
        assert_eq!(root_policy(true, false), RootPolicy::Run);
        assert_eq!(root_policy(true, true), RootPolicy::Run);
        assert_eq!(root_policy(false, false), RootPolicy::Skip);
        assert_eq!(root_policy(false, true), RootPolicy::Fail);
    }
}
