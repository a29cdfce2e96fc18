//! ipset entries over netlink: the messages `ipset add -exist SET ENTRY
//! timeout N` and `ipset del -exist SET ENTRY` send, for our `nxknock-*` sets.
//!
//! No permissively licensed crate speaks ipset, so the few messages are
//! written here from linux/netfilter/ipset/ip_set.h and matched byte for byte
//! against what ipset 7.17 sends (`strace -e sendmsg -xx ipset add …`):
//!
//! ```text
//! NFNL_SUBSYS_IPSET << 8 | IPSET_CMD_ADD (or _DEL), NLM_F_REQUEST | NLM_F_ACK
//!   nfgenmsg: family NFPROTO_IPV4 (ipset always sends it; the set has its own), version 0
//!   IPSET_ATTR_PROTOCOL  u8 7
//!   IPSET_ATTR_SETNAME   "nxknock-doors4\0"
//!   IPSET_ATTR_DATA (nested)
//!     IPSET_ATTR_IP (nested) { IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER  4 bytes }
//!                                (IPADDR_IPV6, 16 bytes, for inet6 sets)
//!     IPSET_ATTR_CIDR      u8                   hash:net,port sets only
//!     IPSET_ATTR_PORT      | NET_BYTEORDER  u16 big-endian
//!     IPSET_ATTR_TIMEOUT   | NET_BYTEORDER  u32 big-endian, seconds   (add only)
//!     IPSET_ATTR_PROTO     u8 (6 tcp, 17 udp)
//!     IPSET_ATTR_LINENO    | NET_BYTEORDER  u32 0 (a restore line number; ipset sends it)
//! ```
//!
//! `-exist` is the absence of `NLM_F_EXCL`: adding an entry that exists then
//! replaces its timeout, and deleting one that does not is no error. A set
//! that does not exist is refused with `ENOENT`. The tool first asks for the
//! protocol version and the set's type (`IPSET_CMD_PROTOCOL`,
//! `IPSET_CMD_HEADER`); nxknock created the sets, so it knows both.

use std::net::IpAddr;

use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, Nla,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily, NetfilterSubsystem,
};

use super::nfnl::{Answer, NfnlSocket, errno_text};
use super::{FirewallError, Proto};

/// `NFNL_SUBSYS_IPSET` (linux/netfilter/nfnetlink.h).
const NFNL_SUBSYS_IPSET: u8 = 6;
/// `IPSET_PROTOCOL`: the protocol version this module speaks (ip_set.h; the
/// kernel accepts `IPSET_PROTOCOL_MIN` 6 and up).
const IPSET_PROTOCOL: u8 = 7;
/// Commands (`enum ipset_cmd`).
const IPSET_CMD_ADD: u8 = 9;
const IPSET_CMD_DEL: u8 = 10;
/// Command-level attributes (`IPSET_ATTR_*`, first enum of ip_set.h).
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
/// Attributes inside `IPSET_ATTR_DATA` (the "CADT" enum).
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_CIDR: u16 = 3;
const IPSET_ATTR_PORT: u16 = 4;
const IPSET_ATTR_TIMEOUT: u16 = 6;
const IPSET_ATTR_PROTO: u16 = 7;
const IPSET_ATTR_LINENO: u16 = 9;
/// Inside `IPSET_ATTR_IP`.
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;

/// One entry of an `ip,port` or `net,port` set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub addr: IpAddr,
    /// The prefix length, for `hash:net,port` sets; `None` for `hash:ip,port`.
    pub cidr: Option<u8>,
    pub proto: Proto,
    pub port: u16,
}

/// What to do with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Add, or refresh, with this many seconds to live (never 0: "forever").
    Add { timeout_secs: u32 },
    /// Delete if present.
    Del,
}

/// One attribute inside `IPSET_ATTR_DATA`.
enum Data {
    Ip(IpAddr),
    Cidr(u8),
    Port(u16),
    Timeout(u32),
    Proto(u8),
    Lineno(u32),
}

impl Data {
    /// The `IPSET_ATTR_IP` nest's one attribute.
    fn ip(addr: IpAddr) -> DefaultNla {
        match addr {
            IpAddr::V4(a) => DefaultNla::new(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, a.octets().to_vec()),
            IpAddr::V6(a) => DefaultNla::new(IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, a.octets().to_vec()),
        }
    }
}

impl Nla for Data {
    fn value_len(&self) -> usize {
        match self {
            Data::Ip(a) => Data::ip(*a).buffer_len(),
            Data::Cidr(_) | Data::Proto(_) => 1,
            Data::Port(_) => 2,
            Data::Timeout(_) | Data::Lineno(_) => 4,
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Data::Ip(_) => IPSET_ATTR_IP | NLA_F_NESTED,
            Data::Cidr(_) => IPSET_ATTR_CIDR,
            Data::Port(_) => IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER,
            Data::Timeout(_) => IPSET_ATTR_TIMEOUT | NLA_F_NET_BYTEORDER,
            Data::Proto(_) => IPSET_ATTR_PROTO,
            Data::Lineno(_) => IPSET_ATTR_LINENO | NLA_F_NET_BYTEORDER,
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Data::Ip(a) => Data::ip(*a).emit(buf),
            Data::Cidr(v) | Data::Proto(v) => buf[0] = *v,
            Data::Port(v) => buf.copy_from_slice(&v.to_be_bytes()),
            Data::Timeout(v) | Data::Lineno(v) => buf.copy_from_slice(&v.to_be_bytes()),
        }
    }
}

fn op(cmd: Command) -> &'static str {
    match cmd {
        Command::Add { .. } => "add entry",
        Command::Del => "delete entry",
    }
}

/// The request for `cmd` on `entry` in `set`.
fn message(cmd: Command, set: &str, entry: &Entry) -> NetlinkMessage<NetfilterMessage> {
    let mut data = vec![Data::Ip(entry.addr)];
    if let Some(cidr) = entry.cidr {
        data.push(Data::Cidr(cidr));
    }
    data.push(Data::Port(entry.port));
    if let Command::Add { timeout_secs } = cmd {
        data.push(Data::Timeout(timeout_secs.max(1)));
    }
    data.push(Data::Proto(match entry.proto {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    }));
    data.push(Data::Lineno(0));
    let mut nested = vec![0; data.as_slice().buffer_len()];
    data.as_slice().emit(&mut nested);
    let mut name = set.as_bytes().to_vec();
    name.push(0);
    let inner = NetfilterMessageInner::Other {
        subsys: NetfilterSubsystem::Other(NFNL_SUBSYS_IPSET),
        message_type: match cmd {
            Command::Add { .. } => IPSET_CMD_ADD,
            Command::Del => IPSET_CMD_DEL,
        },
        attributes: vec![
            DefaultNla::new(IPSET_ATTR_PROTOCOL, vec![IPSET_PROTOCOL]),
            DefaultNla::new(IPSET_ATTR_SETNAME, name),
            DefaultNla::new(IPSET_ATTR_DATA | NLA_F_NESTED, nested),
        ],
    };
    let header = NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0);
    let mut msg = NetlinkMessage::from(NetfilterMessage::new(header, inner));
    // No NLM_F_EXCL: `-exist`.
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    msg
}

/// Runs `cmd` on `entry` in ipset `set`.
pub(crate) fn apply(sock: &NfnlSocket, cmd: Command, set: &str, entry: &Entry) -> Result<(), FirewallError> {
    let answers = sock.exchange(vec![message(cmd, set, entry)]).map_err(|source| FirewallError::NetlinkSocket {
        op: op(cmd),
        set: set.to_owned(),
        source,
    })?;
    match answers.first() {
        Some(Answer::Refused(errno)) => {
            Err(FirewallError::Netlink { op: op(cmd), set: set.to_owned(), errno: *errno, reason: reason(*errno) })
        }
        _ => Ok(()),
    }
}

/// ipset's own error codes (`IPSET_ERR_*`, above 4096) as the tool words
/// them, the rest as `strerror`.
fn reason(errno: i32) -> String {
    let text = match errno {
        4097 => "kernel and nxknock speak different ipset protocol versions (IPSET_ERR_PROTOCOL)",
        4102 => "the set is of another type (IPSET_ERR_TYPE_MISMATCH)",
        4103 => "the entry already exists (IPSET_ERR_EXIST)",
        4104 => "invalid prefix length (IPSET_ERR_INVALID_CIDR)",
        4106 => "the set is of another address family (IPSET_ERR_INVALID_FAMILY)",
        4107 => "the set has no timeout support (IPSET_ERR_TIMEOUT)",
        4109 | 4110 => "invalid address for the set's family (IPSET_ERR_IPADDR_IPV4/6)",
        4352 => "the set is full (IPSET_ERR_HASH_FULL): raise maxelem",
        4354 | 4355 => "invalid or missing protocol (IPSET_ERR_INVALID_PROTO)",
        e if e >= 4096 => return format!("ipset error {e}"),
        _ => return errno_text(errno),
    };
    text.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(mut msg: NetlinkMessage<NetfilterMessage>) -> Vec<u8> {
        msg.header.sequence_number = 0;
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        out
    }

    /// nlmsghdr (length, type, flags; sequence number 0, port 0) and
    /// nfgenmsg (NFPROTO_IPV4, version 0, res_id 0) as ipset sends them.
    fn head(len: u8, cmd: u8) -> Vec<u8> {
        let mut h = vec![len, 0, 0, 0, cmd, NFNL_SUBSYS_IPSET, 0x05, 0x00];
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&[2, 0, 0, 0]);
        h
    }

    /// The bytes after the headers, from `strace -xx ipset …` (ipset 7.17).
    const ADD_DOORS4: &[u8] = b"\x05\x00\x01\x00\x07\x00\x00\x00\x13\x00\x02\x00nxknock-doors4\x00\x00\x30\x00\x07\x80\x0c\x00\x01\x80\x08\x00\x01\x40\xc6\x12\x00\x02\x06\x00\x04\x40\x00\x16\x00\x00\x08\x00\x06\x40\x00\x00\x00\x1e\x05\x00\x07\x00\x06\x00\x00\x00\x08\x00\x09\x40\x00\x00\x00\x00";
    const DEL_DOORS4: &[u8] = b"\x05\x00\x01\x00\x07\x00\x00\x00\x13\x00\x02\x00nxknock-doors4\x00\x00\x28\x00\x07\x80\x0c\x00\x01\x80\x08\x00\x01\x40\xc6\x12\x00\x02\x06\x00\x04\x40\x00\x16\x00\x00\x05\x00\x07\x00\x06\x00\x00\x00\x08\x00\x09\x40\x00\x00\x00\x00";
    const ADD_DOORS6_NET: &[u8] = b"\x05\x00\x01\x00\x07\x00\x00\x00\x13\x00\x02\x00nxknock-doors6\x00\x00\x44\x00\x07\x80\x18\x00\x01\x80\x14\x00\x02\x40\x20\x01\x0d\xb8\x00\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05\x00\x03\x00\x40\x00\x00\x00\x06\x00\x04\x40\x00\x35\x00\x00\x08\x00\x06\x40\x00\x00\x00\x07\x05\x00\x07\x00\x11\x00\x00\x00\x08\x00\x09\x40\x00\x00\x00\x00";
    const ADD_ONCE6HOST: &[u8] = b"\x05\x00\x01\x00\x07\x00\x00\x00\x16\x00\x02\x00nxknock-once6host\x00\x00\x00\x3c\x00\x07\x80\x18\x00\x01\x80\x14\x00\x02\x40\x20\x01\x0d\xb8\x00\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07\x06\x00\x04\x40\x00\x16\x00\x00\x08\x00\x06\x40\x00\x00\x00\x07\x05\x00\x07\x00\x06\x00\x00\x00\x08\x00\x09\x40\x00\x00\x00\x00";

    fn expect(len: u8, cmd: u8, body: &[u8]) -> Vec<u8> {
        let mut v = head(len, cmd);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn messages_are_what_ipset_sends() {
        let v4 = Entry { addr: "198.18.0.2".parse().unwrap(), cidr: None, proto: Proto::Tcp, port: 22 };
        let add = message(Command::Add { timeout_secs: 30 }, "nxknock-doors4", &v4);
        assert_eq!(bytes(add), expect(96, IPSET_CMD_ADD, ADD_DOORS4));
        let del = message(Command::Del, "nxknock-doors4", &v4);
        assert_eq!(bytes(del), expect(88, IPSET_CMD_DEL, DEL_DOORS4));
        let net = Entry { addr: "2001:db8:18::".parse().unwrap(), cidr: Some(64), proto: Proto::Udp, port: 53 };
        let add = message(Command::Add { timeout_secs: 7 }, "nxknock-doors6", &net);
        assert_eq!(bytes(add), expect(116, IPSET_CMD_ADD, ADD_DOORS6_NET));
        let host = Entry { addr: "2001:db8:18::7".parse().unwrap(), cidr: None, proto: Proto::Tcp, port: 22 };
        let add = message(Command::Add { timeout_secs: 7 }, "nxknock-once6host", &host);
        assert_eq!(bytes(add), expect(112, IPSET_CMD_ADD, ADD_ONCE6HOST));
    }

    #[test]
    fn a_zero_timeout_never_reaches_the_kernel() {
        let v4 = Entry { addr: "198.18.0.2".parse().unwrap(), cidr: None, proto: Proto::Udp, port: 53 };
        let b = bytes(message(Command::Add { timeout_secs: 0 }, "nxknock-doors4", &v4));
        // IPSET_ATTR_TIMEOUT | NET_BYTEORDER, then the value 1.
        let at = b.windows(4).position(|w| w == b"\x08\x00\x06\x40").unwrap();
        assert_eq!(&b[at + 4..at + 8], b"\x00\x00\x00\x01");
    }

    #[test]
    fn errors_read_like_ipset() {
        assert!(reason(4352).contains("full"));
        assert_eq!(reason(libc::ENOENT), "No such file or directory");
        assert_eq!(reason(4200), "ipset error 4200");
    }
}
