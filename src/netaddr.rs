//! Address prefixes: the one place that masks an address to a network and that
//! says how wide a door may be.
//!
//! Doors, ECS prefixes and `--from` policies all reason about "address/len";
//! keeping the bit arithmetic here means one set of edge cases (/0, /32, /128,
//! IPv4-mapped IPv6) instead of three.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The widest IPv6 door: one /64, the prefix a host's privacy addresses rotate in.
/// Every IPv6 door is exactly a /64 (an ECS or bound prefix longer than that widens
/// to it, a shorter one is refused), so doors in the kernel's interval set never
/// overlap; IPv4 doors are always one address.
pub const WIDEST_V6_DOOR: u8 = 64;

/// A network: address with host bits cleared, and its length. Parsed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why an address range cannot be a door.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DoorSizeError {
    #[error("an IPv4 door admits exactly one address (/32)")]
    V4NotHost,
    #[error("an IPv6 door is at most a /64")]
    V6TooWide,
    #[error("IPv4-mapped, Teredo, unspecified, loopback, reserved or multicast addresses never get a door")]
    Reserved,
}

impl Prefix {
    /// `addr/len` with host bits cleared; `len` is clamped to the family's width.
    /// IPv4-mapped IPv6 addresses stay IPv6 (see [`Prefix::door`]).
    pub fn new(addr: IpAddr, len: u8) -> Prefix {
        let len = len.min(if addr.is_ipv4() { 32 } else { 128 });
        Prefix { addr: mask(addr, len), len }
    }

    /// The door for a packet source: the host for IPv4, the /64 for IPv6 (clients
    /// rotate privacy addresses within it). A dual-stack socket's `::ffff:a.b.c.d`
    /// is the IPv4 host it stands for.
    pub fn source_door(ip: IpAddr) -> Prefix {
        match ip.to_canonical() {
            v4 @ IpAddr::V4(_) => Prefix::new(v4, 32),
            v6 => Prefix::new(v6, 64),
        }
    }

    /// Check that this prefix may be a door: one IPv4 address, or an IPv6 /64 (longer
    /// prefixes widen to their /64), outside the ranges where one address stands for
    /// many hosts or for none.
    pub fn door(self) -> Result<Prefix, DoorSizeError> {
        match self.addr {
            IpAddr::V4(a) => {
                if self.len != 32 {
                    return Err(DoorSizeError::V4NotHost);
                }
                // 0/8 "this network", 127/8 loopback, 224/4 multicast, 240/4 reserved and broadcast.
                let first = a.octets()[0];
                if first == 0 || first == 127 || first >= 224 {
                    return Err(DoorSizeError::Reserved);
                }
                Ok(self)
            }
            IpAddr::V6(a) => {
                // ::/8 holds mapped, compatible, loopback and unspecified addresses;
                // a Teredo (2001::/32) /64 is every client of one Teredo server.
                let o = a.octets();
                if o[0] == 0 || a.is_multicast() || o[..4] == [0x20, 0x01, 0, 0] {
                    return Err(DoorSizeError::Reserved);
                }
                if self.len < WIDEST_V6_DOOR {
                    return Err(DoorSizeError::V6TooWide);
                }
                Ok(Prefix::new(self.addr, self.len.min(64)))
            }
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length (named for the `a/len` notation; a prefix is never "empty").
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Does this network contain all of `other`? Different families never match.
    pub fn contains_prefix(&self, other: &Prefix) -> bool {
        contains(self.addr, self.len, other.addr, other.len)
    }

    /// Does this network contain `ip`? An IPv4-mapped address counts as its IPv4 address.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        contains(self.addr, self.len, ip, if ip.is_ipv4() { 32 } else { 128 })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `a.b.c.d/n`, `x::/n`, or a bare address (a host route).
impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Prefix, String> {
        let bad = || format!("{s:?} is not a CIDR such as 198.51.100.0/24 or 2001:db8::/48");
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip.parse::<IpAddr>().map_err(|_| bad())?, len.parse::<u8>().map_err(|_| bad())?),
            None => {
                let ip = s.parse::<IpAddr>().map_err(|_| bad())?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        if len > if ip.is_ipv4() { 32 } else { 128 } {
            return Err(bad());
        }
        Ok(Prefix::new(ip, len))
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Prefix, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Written as its [`Display`](fmt::Display) form, which [`FromStr`] reads back.
impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `ip` with every bit past `len` cleared. `len` is clamped to the family's width.
pub fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let len = u32::from(len.min(32));
            let m = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let len = u32::from(len.min(128));
            let m = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// Does `net/len` contain all of `addr/addr_len`? Different families never match.
pub fn contains(net: IpAddr, len: u8, addr: IpAddr, addr_len: u8) -> bool {
    net.is_ipv4() == addr.is_ipv4() && len <= addr_len && mask(net, len) == mask(addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn masks_at_the_edges() {
        assert_eq!(mask(ip("198.51.100.77"), 24), ip("198.51.100.0"));
        assert_eq!(mask(ip("198.51.100.77"), 32), ip("198.51.100.77"));
        assert_eq!(mask(ip("198.51.100.77"), 0), ip("0.0.0.0"));
        assert_eq!(mask(ip("198.51.100.77"), 99), ip("198.51.100.77"));
        assert_eq!(mask(ip("2001:db8:18::77"), 64), ip("2001:db8:18::"));
        assert_eq!(mask(ip("2001:db8:18::77"), 128), ip("2001:db8:18::77"));
        assert_eq!(mask(ip("2001:db8:18::77"), 0), ip("::"));
    }

    #[test]
    fn door_sizes() {
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        assert_eq!(p("198.51.100.7").door(), Ok(p("198.51.100.7/32")));
        assert_eq!(p("198.51.100.0/24").door(), Err(DoorSizeError::V4NotHost));
        assert_eq!(p("0.0.0.0/0").door(), Err(DoorSizeError::V4NotHost));
        assert_eq!(p("2000::/3").door(), Err(DoorSizeError::V6TooWide));
        assert_eq!(p("2001:db8:18::/55").door(), Err(DoorSizeError::V6TooWide));
        assert_eq!(p("2001:db8:18::/56").door(), Err(DoorSizeError::V6TooWide));
        assert_eq!(p("2001:db8:18::/63").door(), Err(DoorSizeError::V6TooWide));
        assert_eq!(p("2001:db8:18::/64").door(), Ok(p("2001:db8:18::/64")));
        assert_eq!(p("2001:db8:18::77/128").door(), Ok(p("2001:db8:18::/64")));
        assert_eq!(p("::ffff:198.18.0.3/128").door(), Err(DoorSizeError::Reserved));
        assert_eq!(p("::ffff:0.0.0.0/96").door(), Err(DoorSizeError::Reserved));
        assert_eq!(p("::/64").door(), Err(DoorSizeError::Reserved));
        assert_eq!(p("ff02::1/64").door(), Err(DoorSizeError::Reserved));
        assert_eq!(p("2001:0:4136:e378:8000:63bf:3fff:fdd2/128").door(), Err(DoorSizeError::Reserved), "Teredo");
        for v4 in ["127.0.0.1", "0.1.2.3", "240.0.0.1", "255.255.255.255", "224.0.0.1"] {
            assert_eq!(p(v4).door(), Err(DoorSizeError::Reserved), "{v4}");
        }
        assert_eq!(Prefix::source_door(ip("::ffff:198.18.0.2")), p("198.18.0.2/32"));
        assert_eq!(Prefix::source_door(ip("2001:db8:18::2")), p("2001:db8:18::/64"));
        assert!(p("198.18.0.0/15").contains_ip(ip("::ffff:198.19.0.1")));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("garbage".parse::<Prefix>().is_err());
    }

    #[test]
    fn containment() {
        assert!(contains(ip("198.18.0.0"), 15, ip("198.19.1.1"), 32));
        assert!(!contains(ip("198.18.0.0"), 16, ip("198.19.1.1"), 32));
        assert!(!contains(ip("198.18.0.0"), 24, ip("198.18.0.0"), 16), "a wider door is not inside");
        assert!(!contains(ip("10.0.0.0"), 8, ip("::1"), 128));
    }
}
