//! One captured frame → what the knock listener needs from it, or nothing.
//!
//! Headers are sliced by `etherparse` (no copies, no allocation); anything it
//! cannot slice, IP fragments, and TCP segments other than a bare SYN are
//! dropped here. This is the only code that sees raw capture bytes, so it is
//! what the fuzz target and the hostile-frame tests exercise.

use std::net::IpAddr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// Link-layer framing of a capture handle, as libpcap reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Ethernet,
    /// Linux "cooked" capture (`any`), version 1.
    LinuxSll,
    /// No link header: the frame starts with the IP header.
    Raw,
}

impl Link {
    /// From a libpcap DLT number; `None` for framings we do not read.
    pub fn from_dlt(dlt: i32) -> Option<Link> {
        match dlt {
            1 => Some(Link::Ethernet),
            113 => Some(Link::LinuxSll),
            12 | 14 | 101 => Some(Link::Raw),
            _ => None,
        }
    }
}

/// The transport of a captured packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    /// A TCP segment with SYN and without ACK: a connection attempt.
    Syn,
    Udp,
}

/// What a knock listener reads from one packet.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen<'a> {
    pub src: IpAddr,
    pub l4: L4,
    pub dst_port: u16,
    /// UDP payload (empty for a SYN).
    pub payload: &'a [u8],
}

/// Slice `frame`; `None` for anything that is not an unfragmented IPv4/IPv6 UDP
/// datagram or TCP SYN.
pub fn parse(link: Link, frame: &[u8]) -> Option<Seen<'_>> {
    let sliced = match link {
        Link::Ethernet => SlicedPacket::from_ethernet(frame),
        Link::LinuxSll => SlicedPacket::from_linux_sll(frame),
        Link::Raw => SlicedPacket::from_ip(frame),
    }
    .ok()?;
    let src = match sliced.net.as_ref()? {
        NetSlice::Ipv4(v4) => IpAddr::V4(v4.header().source_addr()),
        NetSlice::Ipv6(v6) => IpAddr::V6(v6.header().source_addr()),
        NetSlice::Arp(_) => return None,
    };
    match sliced.transport? {
        TransportSlice::Udp(u) => Some(Seen { src, l4: L4::Udp, dst_port: u.destination_port(), payload: u.payload() }),
        TransportSlice::Tcp(t) if t.syn() && !t.ack() && !t.rst() && !t.fin() => {
            Some(Seen { src, l4: L4::Syn, dst_port: t.destination_port(), payload: &[] })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn udp4(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64).udp(5555, 62201);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn tcp6(syn: bool, ack: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], [0; 16], 64)
            .tcp(40000, 40123, 1, 64240);
        if syn {
            b = b.syn();
        }
        if ack {
            b = b.ack(7);
        }
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    }

    #[test]
    fn reads_udp_and_bare_syns_only() {
        let f = udp4(b"hello");
        let s = parse(Link::Ethernet, &f).unwrap();
        assert_eq!(s, Seen { src: "198.18.0.2".parse().unwrap(), l4: L4::Udp, dst_port: 62201, payload: b"hello" });
        let f = tcp6(true, false);
        let s = parse(Link::Raw, &f).unwrap();
        assert_eq!((s.src, s.l4, s.dst_port), ("2001:db8::2".parse().unwrap(), L4::Syn, 40123));
        assert_eq!(parse(Link::Raw, &tcp6(true, true)), None, "SYN-ACK is not a knock");
        assert_eq!(parse(Link::Raw, &tcp6(false, true)), None, "mid-stream segment is not a knock");
    }

    #[test]
    fn garbage_and_truncated_frames_are_nothing() {
        let f = udp4(b"payload");
        for cut in 0..f.len() - b"payload".len() {
            assert_eq!(parse(Link::Ethernet, &f[..cut]), None, "cut at {cut}");
        }
        for link in [Link::Ethernet, Link::LinuxSll, Link::Raw] {
            assert_eq!(parse(link, &[]), None);
            assert_eq!(parse(link, &[0xff; 64]), None);
        }
    }
}
