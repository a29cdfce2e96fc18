//! The value that flows from a listener to the verifier.
//!
//! Listeners build a [`Knock`] from what they saw on the wire (no I/O, no
//! database); everything after this point works on typed values.

use std::net::IpAddr;
use std::time::Instant;

use crate::netaddr::Prefix;
use crate::token::Token;

/// How a knock reached us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    DnsUdp,
    DnsTcp,
    /// A DNS query to another nameserver on this host, read from the wire (pcap).
    DnsPassive,
    /// One UDP datagram carrying a bound label to the knock port (pcap).
    Udp,
    /// A port sequence of TCP SYNs (pcap).
    TcpSequence,
    /// A port sequence of UDP datagrams (pcap).
    UdpSequence,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::DnsUdp => "dns/udp",
            Via::DnsTcp => "dns/tcp",
            Via::DnsPassive => "dns/passive",
            Via::Udp => "udp",
            Via::TcpSequence => "tcp-seq",
            Via::UdpSequence => "udp-seq",
        }
    }

    /// Sent straight to this host, so the packet source is the sender's own
    /// address (or its NAT's): no resolver in between. Only these knocks feed the
    /// block list; a DNS knock's source may be a resolver that many users share.
    pub fn is_direct(self) -> bool {
        matches!(self, Via::Udp | Via::TcpSequence | Via::UdpSequence)
    }

    /// A port sequence: the bare element of the plain chain, spread over ports.
    pub fn is_sequence(self) -> bool {
        matches!(self, Via::TcpSequence | Via::UdpSequence)
    }
}

/// One knock-shaped query whose label decoded as a token.
#[derive(Clone, Debug)]
pub struct Knock {
    pub token: Token,
    /// The source address of the packet (a resolver's, when the knock came through one).
    pub seen_from: IpAddr,
    pub via: Via,
    /// EDNS Client Subnet the resolver forwarded, if any: a claim, checked by the verifier.
    pub ecs: Option<Prefix>,
    pub received: Instant,
}
