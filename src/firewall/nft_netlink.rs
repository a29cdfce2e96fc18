//! Door set elements over netlink: the nf_tables messages `nft add element` /
//! `nft delete element` send, for our sets in table `inet nxknock`.
//!
//! Captured from nft 1.0.6 (`strace -e sendmsg -xx nft add element …`) and
//! matched here attribute for attribute. One transaction is one batch:
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN                       (nfgenmsg res_id = NFNL_SUBSYS_NFTABLES)
//! NFT_MSG_NEWSETELEM  NLM_F_CREATE           (nfgenmsg family NFPROTO_INET)
//!     NFTA_SET_ELEM_LIST_TABLE    "nxknock"
//!     NFTA_SET_ELEM_LIST_SET      "doors4"
//!     NFTA_SET_ELEM_LIST_ELEMENTS
//!         NFTA_LIST_ELEM
//!             NFTA_SET_ELEM_TIMEOUT   u64, milliseconds, big-endian
//!             NFTA_SET_ELEM_KEY       { NFTA_DATA_VALUE key }
//!             NFTA_SET_ELEM_KEY_END   { NFTA_DATA_VALUE end of range }   (interval set only)
//! NFT_MSG_DELSETELEM                         (the same, without a timeout)
//! NFNL_MSG_BATCH_END
//! ```
//!
//! A concatenated key is each field in a 32-bit register of its own, in
//! network byte order, padded with zeros: `ipv4_addr . inet_proto .
//! inet_service` is 4 + 4 + 4 = 12 bytes (`c6120002 06000000 00160000` for
//! 198.18.0.2 . tcp . 22), the IPv6 form 16 + 4 + 4. The interval set
//! `doors6` (`flags interval` on a concatenation: the kernel's pipapo set)
//! takes a range: the key is the prefix's first address, `KEY_END` its last,
//! with the same protocol and port — no interval-end flag elements, which
//! nft sends only for intervals of a single field.
//!
//! nft 1.0.6 also sends `NFTA_SET_ELEM_LIST_SET_ID`, which matters only for a
//! set created in the same batch; ours exist, and the kernel looks them up by
//! name. Unlike nft, every command asks for an acknowledgement.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_core::{DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList, SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

use super::nfnl::{Answer, NfnlSocket, errno_text};
use super::{FirewallError, Proto};

/// `NFNL_SUBSYS_NFTABLES` (linux/netfilter/nfnetlink.h): a batch header's
/// `res_id` names the subsystem the batch is for.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFTA_DATA_VALUE` (linux/netfilter/nf_tables.h), the one attribute of a
/// `NFTA_SET_ELEM_KEY_END`.
const NFTA_DATA_VALUE: u16 = 1;

/// A set element's key: a single value, or a range (interval sets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Element {
    key: Vec<u8>,
    key_end: Option<Vec<u8>>,
}

/// `addr . proto . port`, each field padded to 32 bits.
fn concat(addr: IpAddr, proto: Proto, port: u16) -> Vec<u8> {
    let mut key = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let proto = match proto {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    };
    key.extend_from_slice(&[proto, 0, 0, 0]);
    let [hi, lo] = port.to_be_bytes();
    key.extend_from_slice(&[hi, lo, 0, 0]);
    key
}

impl Element {
    /// One address, for the hash sets (`doors4`, `doors6host`, `once*`).
    pub(crate) fn single(addr: IpAddr, proto: Proto, port: u16) -> Element {
        Element { key: concat(addr, proto, port), key_end: None }
    }

    /// Every address of `net`/`len`, for the interval set `doors6`. `net`
    /// must have its host bits cleared (as [`super::Door::network`] gives it).
    pub(crate) fn prefix(net: IpAddr, len: u8, proto: Proto, port: u16) -> Element {
        let last = match net {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
            }
        };
        Element { key: concat(net, proto, port), key_end: Some(concat(last, proto, port)) }
    }
}

/// One change in a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    /// `add element` with its own timeout (milliseconds on the wire; never 0,
    /// which would mean none).
    Add { set: &'a str, elem: &'a Element, timeout: Duration },
    /// `delete element`; refused (`ENOENT`) if the element is not there.
    Delete { set: &'a str, elem: &'a Element },
}

impl Change<'_> {
    fn set(&self) -> &str {
        match self {
            Change::Add { set, .. } | Change::Delete { set, .. } => set,
        }
    }

    fn op(&self) -> &'static str {
        match self {
            Change::Add { .. } => "add element",
            Change::Delete { .. } => "delete element",
        }
    }

    fn message(&self, table: &str) -> NetlinkMessage<NetfilterMessage> {
        let (elem, timeout) = match self {
            Change::Add { elem, timeout, .. } => (elem, Some(timeout)),
            Change::Delete { elem, .. } => (elem, None),
        };
        let mut attrs = Vec::new();
        if let Some(t) = timeout {
            let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1);
            attrs.push(SetElementAttribute::Timeout(ms));
        }
        attrs.push(SetElementAttribute::Key(DataAttribute::Value(elem.key.clone())));
        if let Some(end) = &elem.key_end {
            attrs.push(SetElementAttribute::KeyEnd(vec![DefaultNla::new(NFTA_DATA_VALUE, end.clone())]));
        }
        let body = SetElementMessage {
            attributes: vec![
                SetElementList::Table(table.to_owned()),
                SetElementList::Set(self.set().to_owned()),
                SetElementList::Elements(vec![ListAttribute::Element(attrs)]),
            ],
        };
        let (inner, flags) = match self {
            Change::Add { .. } => (NfTablesMessage::NewSetElement(body), NLM_F_CREATE),
            Change::Delete { .. } => (NfTablesMessage::DeleteSetElement(body), 0),
        };
        let header = NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0);
        let mut msg = NetlinkMessage::from(NetfilterMessage::new(header, inner));
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        msg
    }
}

/// `changes` to sets of `inet <table>` as one batch: BEGIN, the changes, END.
fn batch(table: &str, changes: &[Change]) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let control = |m: ControlMessage| {
        let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES);
        let mut msg = NetlinkMessage::from(NetfilterMessage::new(header, m));
        msg.header.flags = NLM_F_REQUEST;
        msg
    };
    let mut msgs = vec![control(ControlMessage::BatchBegin)];
    msgs.extend(changes.iter().map(|c| c.message(table)));
    msgs.push(control(ControlMessage::BatchEnd));
    msgs
}

/// Applies `changes` to sets of table `inet <table>` in one transaction: all
/// of them or none. A refusal names the first change the kernel refused.
pub(crate) fn apply(sock: &NfnlSocket, table: &str, changes: &[Change]) -> Result<(), FirewallError> {
    let Some(first) = changes.first() else {
        return Ok(());
    };
    let answers = sock.exchange(batch(table, changes)).map_err(|source| FirewallError::NetlinkSocket {
        op: first.op(),
        set: first.set().to_owned(),
        source,
    })?;
    // answers[0] and the last are the batch header and trailer.
    for (i, answer) in answers.iter().enumerate() {
        if let Answer::Refused(errno) = *answer {
            let change = changes.get(i.wrapping_sub(1)).unwrap_or(first);
            return Err(FirewallError::Netlink {
                op: if i == 0 { "commit a batch" } else { change.op() },
                set: change.set().to_owned(),
                errno,
                reason: errno_text(errno),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The element attribute of `nft add element inet nxknock doors4
    /// { 198.18.0.2 . tcp . 22 timeout 30000ms }` as nft 1.0.6 sent it
    /// (NFTA_SET_ELEM_LIST_ELEMENTS' payload).
    const NFT_DOORS4: &[u8] = b"\x24\x00\x01\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\x75\x30\x14\x00\x01\x80\x10\x00\x01\x00\xc6\x12\x00\x02\x06\x00\x00\x00\x00\x16\x00\x00";
    /// `nft add element inet nxknock doors6 { 2001:db8:18::/64 . tcp . 22 timeout 30000ms }`.
    const NFT_DOORS6: &[u8] = b"\x50\x00\x01\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\x75\x30\x20\x00\x01\x80\x1c\x00\x01\x00\x20\x01\x0d\xb8\x00\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x06\x00\x00\x00\x00\x16\x00\x00\x20\x00\x0a\x80\x1c\x00\x01\x00\x20\x01\x0d\xb8\x00\x18\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\x06\x00\x00\x00\x00\x16\x00\x00";
    /// `nft delete element inet nxknock doors6 { 2001:db8:18::/64 . tcp . 22 }`.
    const NFT_DEL_DOORS6: &[u8] = b"\x44\x00\x01\x80\x20\x00\x01\x80\x1c\x00\x01\x00\x20\x01\x0d\xb8\x00\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x06\x00\x00\x00\x00\x16\x00\x00\x20\x00\x0a\x80\x1c\x00\x01\x00\x20\x01\x0d\xb8\x00\x18\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\x06\x00\x00\x00\x00\x16\x00\x00";
    /// `nft add element inet nxknock doors6host { 2001:db8:18::5 . udp . 53 timeout 2s }`.
    const NFT_DOORS6HOST: &[u8] = b"\x30\x00\x01\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\x07\xd0\x20\x00\x01\x80\x1c\x00\x01\x00\x20\x01\x0d\xb8\x00\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05\x11\x00\x00\x00\x00\x35\x00\x00";

    /// Serializes `change` and returns (nlmsg_type, nlmsg_flags, nfgen
    /// family, table, set, elements payload).
    fn wire(change: &Change) -> (u16, u16, u8, Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut msgs = batch("nxknock", std::slice::from_ref(change));
        assert_eq!(msgs.len(), 3);
        let mut bytes = Vec::new();
        for m in &mut msgs {
            m.finalize();
            let at = bytes.len();
            bytes.resize(at + m.buffer_len(), 0);
            m.serialize(&mut bytes[at..]);
        }
        // BEGIN: 20 bytes, type NFNL_MSG_BATCH_BEGIN (16), res_id 10 (big-endian).
        assert_eq!(&bytes[..20], b"\x14\x00\x00\x00\x10\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0a");
        let len = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
        let msg = &bytes[20..20 + len];
        // END follows, type NFNL_MSG_BATCH_END (17).
        assert_eq!(&bytes[20 + len..20 + len + 6], b"\x14\x00\x00\x00\x11\x00");
        let ty = u16::from_le_bytes([msg[4], msg[5]]);
        let flags = u16::from_le_bytes([msg[6], msg[7]]);
        let mut attrs = Vec::new();
        let mut at = 20;
        while at < msg.len() {
            let l = u16::from_le_bytes([msg[at], msg[at + 1]]) as usize;
            attrs.push(msg[at + 4..at + l].to_vec());
            at += l.next_multiple_of(4);
        }
        assert_eq!(attrs.len(), 3, "table, set, elements");
        (ty, flags, msg[16], attrs[0].clone(), attrs[1].clone(), attrs[2].clone())
    }

    #[test]
    fn elements_are_what_nft_sends() {
        let host = Element::single("198.18.0.2".parse().unwrap(), Proto::Tcp, 22);
        assert_eq!(host.key, b"\xc6\x12\x00\x02\x06\x00\x00\x00\x00\x16\x00\x00");
        let add = Change::Add { set: "doors4", elem: &host, timeout: Duration::from_secs(30) };
        let (ty, flags, family, table, set, elems) = wire(&add);
        // NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM; REQUEST | ACK | CREATE.
        assert_eq!((ty, flags, family), (0x0a0c, 0x0405, 1));
        assert_eq!((&table[..], &set[..]), (&b"nxknock\0"[..], &b"doors4\0"[..]));
        assert_eq!(elems, NFT_DOORS4);

        let net = Element::prefix("2001:db8:18::".parse().unwrap(), 64, Proto::Tcp, 22);
        let add = Change::Add { set: "doors6", elem: &net, timeout: Duration::from_secs(30) };
        assert_eq!(wire(&add).5, NFT_DOORS6);
        let del = Change::Delete { set: "doors6", elem: &net };
        let (ty, flags, ..) = wire(&del);
        // NFT_MSG_DELSETELEM; REQUEST | ACK.
        assert_eq!((ty, flags), (0x0a0e, 0x0005));
        assert_eq!(wire(&del).5, NFT_DEL_DOORS6);

        let host6 = Element::single("2001:db8:18::5".parse().unwrap(), Proto::Udp, 53);
        let add = Change::Add { set: "doors6host", elem: &host6, timeout: Duration::from_secs(2) };
        assert_eq!(wire(&add).5, NFT_DOORS6HOST);
    }

    #[test]
    fn ranges_cover_the_prefix() {
        let e = Element::prefix("2001:db8:18::".parse().unwrap(), 56, Proto::Udp, 53);
        assert_eq!(
            &e.key_end.as_ref().unwrap()[..16],
            &"2001:db8:18:ff:ffff:ffff:ffff:ffff".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        let e = Element::prefix("198.18.0.0".parse().unwrap(), 24, Proto::Udp, 53);
        assert_eq!(e.key_end.unwrap(), b"\xc6\x12\x00\xff\x11\x00\x00\x00\x00\x35\x00\x00");
        // A zero timeout would mean "no timeout": the wire never carries it.
        let host = Element::single("198.18.0.2".parse().unwrap(), Proto::Tcp, 22);
        let add = Change::Add { set: "doors4", elem: &host, timeout: Duration::ZERO };
        assert_eq!(&wire(&add).5[8..16], b"\x00\x00\x00\x00\x00\x00\x00\x01");
    }
}
