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
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::DnsUdp => "dns/udp",
            Via::DnsTcp => "dns/tcp",
        }
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
