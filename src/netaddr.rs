//! Address prefixes: the one place that masks an address to a network.
//!
//! Doors, ECS prefixes and `--from` policies all reason about "address/len";
//! keeping the bit arithmetic here means one set of edge cases (/0, /32, /128,
//! IPv4-mapped IPv6) instead of three.

use std::net::IpAddr;

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
    fn containment() {
        assert!(contains(ip("198.18.0.0"), 15, ip("198.19.1.1"), 32));
        assert!(!contains(ip("198.18.0.0"), 16, ip("198.19.1.1"), 32));
        assert!(!contains(ip("198.18.0.0"), 24, ip("198.18.0.0"), 16), "a wider door is not inside");
        assert!(!contains(ip("10.0.0.0"), 8, ip("::1"), 128));
    }
}
