//! Door backends: the only code that touches the kernel firewall.
//!
//! A *guard* drops new connections to every guarded service; a *door* is a
//! kernel set element `(address, proto, port)` with a timeout that lets one
//! source through the guard. Because the timeout lives in the kernel, a door
//! closes on time even if the daemon is killed: the design fails closed.
//!
//! Backends know nothing of tokens or users; they receive a [`Door`] and make
//! the kernel admit it. Every backend owns exactly one table/chain of its own
//! and never touches anything else.

use std::net::IpAddr;
use std::time::Duration;

use crate::netaddr::Prefix;

mod exec;
mod ipset_netlink;
mod iptables;
mod nfnl;
mod nft_netlink;
mod nftables;
mod none;

pub use iptables::IptablesBackend;
pub use nftables::NftablesBackend;
pub use none::NoneBackend;

/// Transport protocol of a guarded service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What identifies a door in the kernel: one element per network, protocol and
/// port, shared by every user who opened it. Doors, kernel listings and door
/// records compare by this key, never by strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DoorKey {
    pub prefix: Prefix,
    pub proto: Proto,
    pub port: u16,
}

impl std::fmt::Display for DoorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.prefix, self.proto, self.port)
    }
}

/// A service the guard protects: new connections to `proto/port` are dropped
/// unless a door admits their source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guarded {
    pub proto: Proto,
    pub port: u16,
}

/// One door: admit new connections from `addr` (an IPv4 host, or an IPv6
/// /`prefix_len` prefix) to `proto/port` for `open_for`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Door {
    pub addr: IpAddr,
    /// 32 for an IPv4 host; 64 for an IPv6 /64 (128 for an IPv6 host).
    pub prefix_len: u8,
    pub proto: Proto,
    pub port: u16,
    pub open_for: Duration,
    /// Doorman's narrowing: the first new connection admitted consumes the door
    /// (in the kernel), so further new connections from the address are dropped.
    /// Possible for IPv4 hosts, IPv6 hosts and IPv6 /64s; backends refuse other
    /// shapes with [`FirewallError::Unsupported`].
    pub single_use: bool,
}

impl Door {
    /// The kernel key of this door.
    pub fn key(&self) -> DoorKey {
        DoorKey { prefix: Prefix::new(self.addr, self.prefix_len), proto: self.proto, port: self.port }
    }

    /// The network this door admits, as `(address with host bits cleared,
    /// prefix length)`, or why no backend should install it.
    ///
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack DNS
    /// socket reports for an IPv4 client) becomes the IPv4 address, because
    /// the client's packets will arrive as IPv4. Host bits are cleared so a
    /// /64 door for `2001:db8::5` and one for `2001:db8::7` are the same door.
    pub fn network(&self) -> Result<(IpAddr, u8), FirewallError> {
        let (addr, len) = match self.addr {
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) if self.prefix_len >= 96 => (IpAddr::V4(v4), self.prefix_len - 96),
                _ => (self.addr, self.prefix_len),
            },
            IpAddr::V4(_) => (self.addr, self.prefix_len),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // A zero-length prefix would open the service to the whole Internet.
        if len == 0 || len > max {
            return Err(FirewallError::InvalidDoor(format!("prefix /{len} for {addr} (must be 1..={max})")));
        }
        if self.port == 0 {
            return Err(FirewallError::InvalidDoor("port 0".into()));
        }
        let masked = crate::netaddr::mask(addr, len);
        Ok((masked, len))
    }

    /// [`Door::network`] plus a check of `open_for`. A zero timeout is
    /// refused because both nft and ipset read "timeout 0" as *no* timeout:
    /// the door would never close.
    pub(crate) fn checked(&self) -> Result<(IpAddr, u8), FirewallError> {
        if self.open_for.is_zero() {
            return Err(FirewallError::InvalidDoor("open_for is zero".into()));
        }
        self.network()
    }
}

/// Where a door goes, given the place an ordinary door of its shape lives
/// (`plain`) and the place a single-use one does (`once`; `None` if this
/// shape cannot be single-use): the destination, and the other place, which
/// the door must leave so that it is only ever of the kind last asked for.
pub(crate) fn by_kind<T>(door: &Door, plain: T, once: Option<T>) -> Result<(T, Option<T>), FirewallError> {
    if !door.single_use {
        return Ok((plain, once));
    }
    match once {
        Some(once) => Ok((once, Some(plain))),
        None => Err(FirewallError::Unsupported(format!(
            "single-use door for {}/{}: single-use doors are IPv4 hosts, IPv6 hosts or IPv6 /64s",
            door.addr, door.prefix_len
        ))),
    }
}

/// A door as the kernel currently holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenDoor {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub proto: Proto,
    pub port: u16,
    /// Time left before the kernel removes the door.
    pub expires_in: Duration,
    /// A single-use door (not yet consumed).
    pub single_use: bool,
}

impl OpenDoor {
    /// The kernel key of this door.
    pub fn key(&self) -> DoorKey {
        DoorKey { prefix: Prefix::new(self.addr, self.prefix_len), proto: self.proto, port: self.port }
    }
}

/// Errors from a door backend. The message names the command that failed and
/// what it printed, because the usual cause is a missing tool or privilege;
/// a netlink failure names the set and the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirewallError {
    #[error("cannot run `{cmd}`: {source} (is it installed and are we root?)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command { cmd: String, status: String, stderr: String },
    #[error("unexpected output from `{cmd}`: {detail}")]
    Parse { cmd: String, detail: String },
    /// The kernel refused a door change sent over netlink. `errno` is its
    /// answer: an errno, or one of ipset's own codes (above 4096).
    #[error("kernel refused to {op} in set `{set}`: {reason} (errno {errno})")]
    Netlink { op: &'static str, set: String, errno: i32, reason: String },
    /// The netlink socket failed (cannot be opened, send or receive failed,
    /// no answer in time), so whether the change was made is unknown.
    #[error("netlink socket failed to {op} in set `{set}`: {source}")]
    NetlinkSocket {
        op: &'static str,
        set: String,
        #[source]
        source: std::io::Error,
    },
    #[error("door not supported by this backend: {0}")]
    Unsupported(String),
    /// The door itself makes no sense (zero timeout, bad prefix length); a
    /// bug in the caller, not in the firewall.
    #[error("invalid door: {0}")]
    InvalidDoor(String),
}

/// A firewall backend. Implementations must be idempotent: installing the
/// guard twice, or opening a door that is already open, is not an error
/// (re-opening refreshes the timeout).
pub trait DoorBackend: Send + Sync {
    /// Short name for logs ("nftables", "iptables", "none").
    fn name(&self) -> &'static str;
    /// Create (or re-create) our own table/chain and the guard for `services`.
    /// Called once at start-up; `serve` refuses to start if this fails.
    fn install_guard(&self, services: &[Guarded]) -> Result<(), FirewallError>;
    /// Admit `door` until its timeout expires in the kernel.
    fn open(&self, door: &Door) -> Result<(), FirewallError>;
    /// Remove a door before its timeout (close knock, revocation), whether
    /// it is open as a single-use door or not.
    fn close(&self, door: &Door) -> Result<(), FirewallError>;
    /// Doors the kernel currently holds.
    fn list(&self) -> Result<Vec<OpenDoor>, FirewallError>;
    /// Remove our table/chain and sets entirely (operator is uninstalling).
    fn uninstall(&self) -> Result<(), FirewallError>;
    /// The knock ports (inclusive ranges) that blocked sources may not reach.
    /// Called after [`DoorBackend::install_guard`] when the capture listener is on.
    fn set_knock_ports(&self, _ports: &[(u16, u16)]) -> Result<(), FirewallError> {
        Ok(())
    }
    /// Drop `source`'s packets to the knock ports until `length` expires in the
    /// kernel (the block list). Never touches doors: the guard checks them first.
    fn block(&self, _source: Prefix, _length: Duration) -> Result<(), FirewallError> {
        Ok(())
    }
    /// Blocks the kernel holds, with their time left.
    fn blocked(&self) -> Result<Vec<(Prefix, Duration)>, FirewallError> {
        Ok(Vec::new())
    }
}

/// Which backend the config selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Nftables,
    Iptables,
    None,
}

/// Build the configured backend.
pub fn backend(kind: BackendKind) -> Box<dyn DoorBackend> {
    backend_allowing(kind, &[])
}

/// Build the configured backend whose guard never drops `always_allow` sources.
pub fn backend_allowing(kind: BackendKind, always_allow: &[Prefix]) -> Box<dyn DoorBackend> {
    match kind {
        BackendKind::Nftables => Box::new(NftablesBackend::new().always_allow(always_allow)),
        BackendKind::Iptables => Box::new(IptablesBackend::new().always_allow(always_allow)),
        BackendKind::None => Box::new(NoneBackend),
    }
}
