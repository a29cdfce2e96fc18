//! Wire forms of a knock: one DNS label, lowercase base32 without padding.
//!
//! | form        | bytes                                                                  | chars |
//! |-------------|------------------------------------------------------------------------|-------|
//! | plain       | `element(12)`                                                          | 20    |
//! | bound IPv4  | `kind(1) element(12) addr(4) service(2) time(4) tag(10) admit(2)`      | 56    |
//! | bound IPv6  | `kind(1) element(12) prefix64(8) service(2) time(4) tag(10) admit(2)`  | 63    |
//!
//! `kind` is `0x20 | family` (format 2; family 1 = IPv4, 2 = IPv6), plus
//! [`KIND_CLOSE`] for a close knock. `tag = HMAC-SHA256(K_user, "nxknock/v2/bound" ‖
//! zone ‖ bytes before the tag)` truncated to 80 bits: only the user can make it.
//! `admit = HMAC-SHA256(K_zone, "nxknock/v2/admit" ‖ zone ‖ bytes before it)`
//! truncated to 16 bits, under the zone-wide key every credential holds: it lets
//! the server drop look-alike labels from outsiders before any chain walk (a flood
//! filter, not an authenticator — see ARCHITECTURE.md).
//!
//! A plain element and a bound element come from different chains
//! ([`super::chain::Form`]), so the element inside a bound label is useless as a
//! plain knock. The form is told apart by length alone, so a label is rejected on
//! length and alphabet before anything else. Decoding is case-insensitive because
//! resolvers randomise the 0x20 bit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use data_encoding::{Encoding, Specification};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::chain::{ELEMENT_LEN, Element, Form, ZoneId};
use crate::netaddr::Prefix;

pub const PLAIN_LEN: usize = 20;
pub const BOUND4_LEN: usize = 56;
pub const BOUND6_LEN: usize = 63;
const TAG_LEN: usize = 10;
const ADMIT_LEN: usize = 2;
/// Bytes of the zone-wide admission key ([`ZoneKey`]).
pub const ZONE_KEY_LEN: usize = 16;
const KIND_VERSION: u8 = 0x20;
const KIND_V4: u8 = 0x01;
const KIND_V6: u8 = 0x02;
/// Set in `kind` when the knock asks to close the user's doors.
pub const KIND_CLOSE: u8 = 0x04;
const MAC_TAG: &[u8] = b"nxknock/v2/bound\0";
const ADMIT_TAG: &[u8] = b"nxknock/v2/admit\0";
const SERVICE_TAG: &[u8] = b"nxknock/v1/service\0";

/// Lowercase RFC 4648 base32, no padding; uppercase accepted on decode.
pub(crate) static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.translate.from.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    spec.translate.to.push_str("abcdefghijklmnopqrstuvwxyz");
    spec.encoding().expect("static base32 specification is valid")
});

/// The zone-wide admission key: every credential of the zone holds it, outsiders
/// do not. The HMAC state is keyed once, so a check costs two SHA-256 blocks.
#[derive(Clone)]
pub struct ZoneKey {
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for ZoneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZoneKey(..)")
    }
}

impl ZoneKey {
    pub fn new(key: &[u8], zone: &ZoneId) -> ZoneKey {
        let mut keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
        keyed.update(ADMIT_TAG);
        keyed.update(&[zone.as_str().len() as u8]);
        keyed.update(zone.as_str().as_bytes());
        ZoneKey { keyed }
    }

    fn admit(&self, body: &[u8]) -> [u8; ADMIT_LEN] {
        let mut m = self.keyed.clone();
        m.update(body);
        let d = m.finalize().into_bytes();
        [d[0], d[1]]
    }
}

/// Why a label is not a knock. None of these is ever shown to the sender: every
/// knock-shaped name gets the same NXDOMAIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("label length {0} matches no knock form")]
    Length(usize),
    #[error("label has a character outside base32")]
    Alphabet,
    #[error("label is not canonical base32")]
    Encoding,
    #[error("unknown version/kind byte {0:#04x}")]
    Kind(u8),
    #[error("MAC does not verify")]
    Mac,
    #[error("admission tag does not verify (not made with this zone's key)")]
    Admission,
    #[error("token time is {0} s away from now, beyond the allowed age")]
    TooOld(i64),
}

/// The address a bound knock asks the door to admit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundAddr {
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address: the door admits the whole /64.
    V6Prefix([u8; 8]),
}

impl BoundAddr {
    /// From a client address; an IPv6 address is cut to its /64.
    pub fn from_ip(ip: IpAddr) -> BoundAddr {
        match ip {
            IpAddr::V4(a) => BoundAddr::V4(a),
            IpAddr::V6(a) => {
                let mut p = [0u8; 8];
                p.copy_from_slice(&a.octets()[..8]);
                BoundAddr::V6Prefix(p)
            }
        }
    }

    /// The network the door admits: the IPv4 host, or the IPv6 /64.
    pub fn to_prefix(self) -> Prefix {
        match self {
            BoundAddr::V4(a) => Prefix::new(IpAddr::V4(a), 32),
            BoundAddr::V6Prefix(p) => {
                let mut o = [0u8; 16];
                o[..8].copy_from_slice(&p);
                Prefix::new(IpAddr::V6(Ipv6Addr::from(o)), 64)
            }
        }
    }
}

/// A bound knock: opens for the embedded address, signed with the user's MAC key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub element: Element,
    pub addr: BoundAddr,
    /// [`service_id`] of the requested service; 0 asks for every permitted service.
    pub service: u16,
    /// Unix seconds when the client made the knock.
    pub time: u32,
    pub close: bool,
    tag: [u8; TAG_LEN],
    admit: [u8; ADMIT_LEN],
}

/// What a bound knock says, before it is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundKnock {
    /// An element of the user's *bound* chain.
    pub element: Element,
    pub addr: BoundAddr,
    /// [`service_id`] of the requested service; 0 asks for every permitted service.
    pub service: u16,
    /// Unix seconds when the client made the knock.
    pub time: u32,
    pub close: bool,
}

/// A decoded knock label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    Plain(Element),
    Bound(Bound),
}

impl Token {
    /// Cheap check, then decode. Rejects on length and alphabet before decoding.
    pub fn parse(label: &[u8]) -> Result<Token, TokenError> {
        match label.len() {
            PLAIN_LEN | BOUND4_LEN | BOUND6_LEN => {}
            n => return Err(TokenError::Length(n)),
        }
        if !label.iter().all(|c| c.is_ascii_alphabetic() || (b'2'..=b'7').contains(c)) {
            return Err(TokenError::Alphabet);
        }
        let bytes = BASE32.decode(label).map_err(|_| TokenError::Encoding)?;
        if label.len() == PLAIN_LEN {
            return Ok(Token::Plain(Element::from_slice(&bytes).ok_or(TokenError::Encoding)?));
        }
        Bound::decode(&bytes).map(Token::Bound)
    }

    pub fn element(&self) -> &Element {
        match self {
            Token::Plain(e) => e,
            Token::Bound(b) => &b.element,
        }
    }

    /// The chain this token's element must come from.
    pub fn form(&self) -> Form {
        match self {
            Token::Plain(_) => Form::Plain,
            Token::Bound(_) => Form::Bound,
        }
    }

    /// The DNS label for this token.
    pub fn to_label(&self) -> String {
        match self {
            Token::Plain(e) => BASE32.encode(e.as_bytes()),
            Token::Bound(b) => BASE32.encode(&b.encode()),
        }
    }
}

impl Bound {
    /// Build and sign a bound knock: the user's tag, then the zone's admission tag.
    pub fn sign(key: &[u8], zone_key: &ZoneKey, zone: &ZoneId, knock: BoundKnock) -> Bound {
        let BoundKnock { element, addr, service, time, close } = knock;
        let mut b = Bound { element, addr, service, time, close, tag: [0; TAG_LEN], admit: [0; ADMIT_LEN] };
        let bytes = b.encode();
        let body = &bytes[..bytes.len() - TAG_LEN - ADMIT_LEN];
        let full = mac(key, zone, body).finalize().into_bytes();
        b.tag.copy_from_slice(&full[..TAG_LEN]);
        let bytes = b.encode();
        b.admit = zone_key.admit(&bytes[..bytes.len() - ADMIT_LEN]);
        b
    }

    /// Check the zone-wide admission tag: one keyed hash, no chain walk. Not secret
    /// from enrolled users, so it filters floods and proves nothing about the user.
    pub fn check_admission(&self, zone_key: &ZoneKey) -> Result<(), TokenError> {
        let bytes = self.encode();
        let want = zone_key.admit(&bytes[..bytes.len() - ADMIT_LEN]);
        // Not a secret comparison (the admission tag only filters), but constant time costs nothing.
        let diff = want.iter().zip(self.admit).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff == 0 { Ok(()) } else { Err(TokenError::Admission) }
    }

    /// Check the user's tag in constant time.
    pub fn verify_mac(&self, key: &[u8], zone: &ZoneId) -> Result<(), TokenError> {
        let bytes = self.encode();
        let body = &bytes[..bytes.len() - TAG_LEN - ADMIT_LEN];
        mac(key, zone, body).verify_truncated_left(&self.tag).map_err(|_| TokenError::Mac)
    }

    /// Accept only tokens made within `max_age_secs` of `now` (either side, for clock skew).
    pub fn check_age(&self, now: u64, max_age_secs: u64) -> Result<(), TokenError> {
        let delta = now as i64 - self.time as i64;
        if delta.unsigned_abs() > max_age_secs {
            return Err(TokenError::TooOld(delta));
        }
        Ok(())
    }

    fn kind(&self) -> u8 {
        let fam = match self.addr {
            BoundAddr::V4(_) => KIND_V4,
            BoundAddr::V6Prefix(_) => KIND_V6,
        };
        KIND_VERSION | fam | if self.close { KIND_CLOSE } else { 0 }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(39);
        v.push(self.kind());
        v.extend_from_slice(self.element.as_bytes());
        match self.addr {
            BoundAddr::V4(a) => v.extend_from_slice(&a.octets()),
            BoundAddr::V6Prefix(p) => v.extend_from_slice(&p),
        }
        v.extend_from_slice(&self.service.to_be_bytes());
        v.extend_from_slice(&self.time.to_be_bytes());
        v.extend_from_slice(&self.tag);
        v.extend_from_slice(&self.admit);
        v
    }

    fn decode(bytes: &[u8]) -> Result<Bound, TokenError> {
        let kind = *bytes.first().ok_or(TokenError::Encoding)?;
        if kind & 0xf0 != KIND_VERSION || kind & !(0xf0 | KIND_CLOSE | 0x03) != 0 {
            return Err(TokenError::Kind(kind));
        }
        let addr_len = match (kind & 0x03, bytes.len()) {
            (KIND_V4, 35) => 4,
            (KIND_V6, 39) => 8,
            _ => return Err(TokenError::Kind(kind)),
        };
        let (element, rest) = bytes[1..].split_at(ELEMENT_LEN);
        let (addr, rest) = rest.split_at(addr_len);
        let (service, rest) = rest.split_at(2);
        let (time, rest) = rest.split_at(4);
        let (tag, admit) = rest.split_at(TAG_LEN);
        let addr = if addr_len == 4 {
            BoundAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
        } else {
            BoundAddr::V6Prefix(addr.try_into().map_err(|_| TokenError::Encoding)?)
        };
        Ok(Bound {
            element: Element::from_slice(element).ok_or(TokenError::Encoding)?,
            addr,
            service: u16::from_be_bytes([service[0], service[1]]),
            time: u32::from_be_bytes([time[0], time[1], time[2], time[3]]),
            close: kind & KIND_CLOSE != 0,
            tag: tag.try_into().map_err(|_| TokenError::Encoding)?,
            admit: admit.try_into().map_err(|_| TokenError::Encoding)?,
        })
    }
}

fn mac(key: &[u8], zone: &ZoneId, body: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(MAC_TAG);
    m.update(&[zone.as_str().len() as u8]);
    m.update(zone.as_str().as_bytes());
    m.update(body);
    m
}

/// 16-bit id of a service name as carried in a bound knock; never 0 (0 means "all").
pub fn service_id(name: &str) -> u16 {
    let d = Sha256::new().chain_update(SERVICE_TAG).chain_update(name.as_bytes()).finalize();
    match u16::from_be_bytes([d[0], d[1]]) {
        0 => 1,
        id => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Seed;

    fn zone() -> ZoneId {
        ZoneId::new("knock.example.com")
    }

    fn zk() -> ZoneKey {
        ZoneKey::new(b"zone-key-16bytes", &zone())
    }

    fn bound(addr: IpAddr, time: u32) -> Bound {
        let e = Seed([3; 32]).element(&zone(), Form::Bound, 9);
        let knock =
            BoundKnock { element: e, addr: BoundAddr::from_ip(addr), service: service_id("ssh"), time, close: false };
        Bound::sign(b"k-user", &zk(), &zone(), knock)
    }

    #[test]
    fn plain_round_trip_is_20_lowercase_chars() {
        let t = Token::Plain(Seed([1; 32]).element(&zone(), Form::Plain, 2));
        let label = t.to_label();
        assert_eq!(label.len(), PLAIN_LEN);
        assert!(label.bytes().all(|c| !c.is_ascii_uppercase()));
        assert_eq!(Token::parse(label.as_bytes()).unwrap(), t);
    }

    #[test]
    fn decoding_is_case_insensitive() {
        let t = Token::Bound(bound("198.18.0.2".parse().unwrap(), 1_000));
        let label = t.to_label();
        let mixed: String =
            label.chars().enumerate().map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c }).collect();
        assert_eq!(Token::parse(mixed.as_bytes()).unwrap(), t);
    }

    #[test]
    fn bound_v4_and_v6_round_trip_within_one_label() {
        for (ip, len) in [("198.18.0.2", BOUND4_LEN), ("2001:db8:18::2", BOUND6_LEN)] {
            let b = bound(ip.parse().unwrap(), 1_700_000_000);
            let label = Token::Bound(b.clone()).to_label();
            assert_eq!(label.len(), len);
            assert!(label.len() <= 63);
            let Token::Bound(back) = Token::parse(label.as_bytes()).unwrap() else { panic!() };
            assert_eq!(back, b);
            back.verify_mac(b"k-user", &zone()).unwrap();
            back.check_admission(&zk()).unwrap();
            assert_eq!(back.check_admission(&ZoneKey::new(b"another-zone-key", &zone())), Err(TokenError::Admission));
        }
        let Token::Bound(v6) =
            Token::parse(Token::Bound(bound("2001:db8:18::2".parse().unwrap(), 5)).to_label().as_bytes()).unwrap()
        else {
            panic!()
        };
        assert_eq!(v6.addr.to_prefix(), "2001:db8:18::/64".parse().unwrap());
    }

    #[test]
    fn wrong_length_and_bad_base32_are_rejected_before_decoding() {
        assert_eq!(Token::parse(b"abc"), Err(TokenError::Length(3)));
        assert_eq!(Token::parse(&[b'a'; 64]), Err(TokenError::Length(64)));
        assert_eq!(Token::parse(&[b'a'; 57]), Err(TokenError::Length(57)));
        assert_eq!(Token::parse(b"aaaaaaaaaaaaaaaaaaa1"), Err(TokenError::Alphabet));
        assert_eq!(Token::parse(b"aaaaaaaaaaaaaaaaaaa-"), Err(TokenError::Alphabet));
        // 20 chars carry 100 bits; the last 4 must be zero in canonical base32.
        assert_eq!(Token::parse(b"aaaaaaaaaaaaaaaaaaa7"), Err(TokenError::Encoding));
    }

    #[test]
    fn tampered_or_foreign_mac_is_rejected() {
        let b = bound("198.18.0.2".parse().unwrap(), 1_000);
        assert_eq!(b.verify_mac(b"other-key", &zone()), Err(TokenError::Mac));
        assert_eq!(b.verify_mac(b"k-user", &ZoneId::new("other.zone")), Err(TokenError::Mac));
        // Rebinding to another address keeps the old tag: must fail.
        let mut rebound = b.clone();
        rebound.addr = BoundAddr::V4("198.18.0.3".parse().unwrap());
        assert_eq!(rebound.verify_mac(b"k-user", &zone()), Err(TokenError::Mac));
        // Flip one character anywhere in the label: it fails to decode, or fails the MAC
        // (or, past the tag, the admission check).
        let label = Token::Bound(b).to_label();
        for i in 0..label.len() {
            let mut l = label.clone().into_bytes();
            l[i] = if l[i] == b'a' { b'b' } else { b'a' };
            match Token::parse(&l) {
                Ok(Token::Bound(x)) => {
                    assert!(x.verify_mac(b"k-user", &zone()).is_err() || x.check_admission(&zk()).is_err(), "pos {i}")
                }
                Ok(Token::Plain(_)) => panic!("length changed"),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn too_old_and_future_tokens_are_rejected() {
        let b = bound("198.18.0.2".parse().unwrap(), 10_000);
        b.check_age(10_000, 120).unwrap();
        b.check_age(10_120, 120).unwrap();
        b.check_age(9_880, 120).unwrap();
        assert_eq!(b.check_age(10_121, 120), Err(TokenError::TooOld(121)));
        assert_eq!(b.check_age(9_000, 120), Err(TokenError::TooOld(-1000)));
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let b = bound("198.18.0.2".parse().unwrap(), 1);
        let mut bytes = b.encode();
        bytes[0] = 0x11;
        let label = BASE32.encode(&bytes);
        assert_eq!(Token::parse(label.as_bytes()), Err(TokenError::Kind(0x11)));
        bytes[0] = 0x22; // v6 kind on a v4-sized body
        assert_eq!(Token::parse(BASE32.encode(&bytes).as_bytes()), Err(TokenError::Kind(0x22)));
    }

    #[test]
    fn random_labels_never_panic_and_rarely_decode() {
        // Cheap fuzzing: every length up to 63, random bytes and random base32.
        let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let mut bound_ok = 0;
        let mut admitted = 0;
        for i in 0..20_000usize {
            let len = i % 64;
            let label: Vec<u8> = (0..len)
                .map(|_| {
                    if i % 3 == 0 {
                        rand::random::<u8>()
                    } else {
                        alphabet[rand::random::<u8>() as usize % alphabet.len()]
                    }
                })
                .collect();
            if let Ok(Token::Bound(b)) = Token::parse(&label) {
                bound_ok += 1;
                assert!(b.verify_mac(b"k-user", &zone()).is_err(), "a random label must not carry a valid MAC");
                if b.check_admission(&zk()).is_ok() {
                    admitted += 1;
                }
            }
        }
        // A random 53/60-char label decodes only if its kind byte happens to be valid.
        assert!(bound_ok < 2_000, "{bound_ok}");
        // ... and passes the 16-bit admission check about once in 65536.
        assert!(admitted <= 2, "{admitted} of {bound_ok} random bound labels passed admission");
    }

    #[test]
    fn service_ids_are_stable_and_never_zero() {
        assert_eq!(service_id("ssh"), service_id("ssh"));
        assert_ne!(service_id("ssh"), service_id("https"));
        assert_ne!(service_id("ssh"), 0);
    }
}
