//! `knock --ip auto`: ask the nameserver which address it sees, and believe the
//! answer only if the server proves it knows this user's MAC key.
//!
//! An unauthenticated answer could come from anyone on the path, who would then
//! get the client to sign a bound knock for *their* address. So:
//!
//! * the query is `<label>.whoami.<zone>` TXT, `label = base32(nonce(16) ‖ id(4))`,
//!   where `id` is the user's number XORed with a pad derived from the zone key
//!   and the nonce: outsiders learn nothing (no name, no stable number on the wire);
//! * the answer is one TXT record with two strings, the address and
//!   `hex(HMAC-SHA256(K_user, "nxknock/v2/whoami" ‖ zone ‖ nonce ‖ address)[..16])`;
//! * the client checks the tag over *its* nonce: a forged, altered or replayed
//!   answer fails loudly and no knock is sent.
//!
//! Enrolled users know the zone key and can decrypt the user number of someone
//! else's query, but cannot make the tag, which needs that user's MAC key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use data_encoding::HEXLOWER;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::token::ZoneId;
use crate::token::form::BASE32;

pub const NONCE_LEN: usize = 16;
/// Characters of the query label: base32 of nonce and encrypted id.
pub const LABEL_LEN: usize = 32;
const TAG_LEN: usize = 16;
const PAD_TAG: &[u8] = b"nxknock/v2/whoami-id\0";
const ANSWER_TAG: &[u8] = b"nxknock/v2/whoami\0";

/// A whoami question as the client made it (keep it to check the answer).
#[derive(Clone, Debug)]
pub struct Question {
    pub nonce: [u8; NONCE_LEN],
    pub label: String,
}

fn keyed(key: &[u8], tag: &[u8], zone: &ZoneId) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(tag);
    m.update(&[zone.as_str().len() as u8]);
    m.update(zone.as_str().as_bytes());
    m
}

fn pad(zone_key: &[u8], zone: &ZoneId, nonce: &[u8; NONCE_LEN]) -> [u8; 4] {
    let mut m = keyed(zone_key, PAD_TAG, zone);
    m.update(nonce);
    let d = m.finalize().into_bytes();
    [d[0], d[1], d[2], d[3]]
}

fn answer_tag(mac_key: &[u8], zone: &ZoneId, nonce: &[u8; NONCE_LEN], addr: &str) -> Hmac<Sha256> {
    let mut m = keyed(mac_key, ANSWER_TAG, zone);
    m.update(nonce);
    m.update(addr.as_bytes());
    m
}

/// Client: a fresh question for user `id`.
pub fn question(zone_key: &[u8], zone: &ZoneId, id: u32) -> Question {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    let p = pad(zone_key, zone, &nonce);
    let mut bytes = nonce.to_vec();
    bytes.extend(id.to_be_bytes().iter().zip(p).map(|(a, b)| a ^ b));
    Question { nonce, label: BASE32.encode(&bytes) }
}

/// Server: the nonce and user number a query label carries, if it is one.
pub fn parse_label(label: &[u8], zone_key: &[u8], zone: &ZoneId) -> Option<([u8; NONCE_LEN], u32)> {
    if label.len() != LABEL_LEN {
        return None;
    }
    let bytes = BASE32.decode(label).ok()?;
    let nonce: [u8; NONCE_LEN] = bytes.get(..NONCE_LEN)?.try_into().ok()?;
    let enc: [u8; 4] = bytes.get(NONCE_LEN..)?.try_into().ok()?;
    let p = pad(zone_key, zone, &nonce);
    Some((nonce, u32::from_be_bytes([enc[0] ^ p[0], enc[1] ^ p[1], enc[2] ^ p[2], enc[3] ^ p[3]])))
}

/// Server: answers for questions it will not vouch for (an unknown user, or a nonce
/// already answered) have the same shape as genuine ones, with a tag under a
/// secret only this process knows: no client accepts them, and nobody learns
/// which user numbers exist or that a question was replayed.
pub fn decoy(secret: &[u8], zone: &ZoneId, nonce: &[u8; NONCE_LEN], seen: IpAddr) -> [String; 2] {
    answer(secret, zone, nonce, seen)
}

/// Server: the TXT strings that answer `nonce` for a user with `mac_key`.
pub fn answer(mac_key: &[u8], zone: &ZoneId, nonce: &[u8; NONCE_LEN], seen: IpAddr) -> [String; 2] {
    let addr = seen.to_canonical().to_string();
    let tag = answer_tag(mac_key, zone, nonce, &addr).finalize().into_bytes();
    [addr.clone(), HEXLOWER.encode(&tag[..TAG_LEN])]
}

/// Why a whoami answer is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhoamiError {
    #[error("the answer carries no authentication tag (a forged answer, or a server without this user)")]
    NoTag,
    #[error("the answer's tag does not verify for this query (forged, altered or replayed)")]
    BadTag,
    #[error("the answer's address {0:?} is not an IP address")]
    BadAddress(String),
}

/// Client: check an answer's TXT strings against the question; the address if genuine.
pub fn check(mac_key: &[u8], zone: &ZoneId, q: &Question, strings: &[String]) -> Result<IpAddr, WhoamiError> {
    let [addr, tag] = strings else { return Err(WhoamiError::NoTag) };
    let tag = HEXLOWER.decode(tag.as_bytes()).map_err(|_| WhoamiError::BadTag)?;
    if tag.len() != TAG_LEN {
        return Err(WhoamiError::BadTag);
    }
    answer_tag(mac_key, zone, &q.nonce, addr).verify_truncated_left(&tag).map_err(|_| WhoamiError::BadTag)?;
    addr.parse().map_err(|_| WhoamiError::BadAddress(addr.clone()))
}

/// Nonces answered recently, so each question gets one genuine answer: a copy
/// relayed from another address after the original gets a decoy.
pub struct Nonces {
    seen: Mutex<HashMap<[u8; NONCE_LEN], Instant>>,
    keep: Duration,
    max: usize,
}

impl Nonces {
    pub fn new(keep: Duration, max: usize) -> Nonces {
        Nonces { seen: Mutex::new(HashMap::new()), keep, max }
    }

    /// True the first time `nonce` is offered within `keep`.
    pub fn first(&self, nonce: &[u8; NONCE_LEN], now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= self.max {
            let keep = self.keep;
            seen.retain(|_, at| now.duration_since(*at) < keep);
            if seen.len() >= self.max {
                // Full of fresh nonces (a flood): refuse new ones rather than forget old ones.
                return false;
            }
        }
        match seen.get(nonce) {
            Some(at) if now.duration_since(*at) < self.keep => false,
            _ => {
                seen.insert(*nonce, now);
                true
            }
        }
    }
}

/// The MAC keys the DNS listener needs to answer whoami, by user number.
/// Written by the verifier when it (re)loads users; read by the DNS threads.
#[derive(Default)]
pub struct KeyTable {
    keys: RwLock<HashMap<u32, Vec<u8>>>,
}

impl KeyTable {
    pub fn replace(&self, keys: HashMap<u32, Vec<u8>>) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    pub fn get(&self, id: u32) -> Option<Vec<u8>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_nonce_is_answered_once_within_its_time() {
        let n = Nonces::new(Duration::from_secs(60), 3);
        let t = Instant::now();
        assert!(n.first(&[1; NONCE_LEN], t));
        assert!(!n.first(&[1; NONCE_LEN], t), "the same question again");
        assert!(n.first(&[2; NONCE_LEN], t) && n.first(&[3; NONCE_LEN], t));
        assert!(!n.first(&[4; NONCE_LEN], t), "full of fresh nonces: refuse");
        let later = t + Duration::from_secs(61);
        assert!(n.first(&[4; NONCE_LEN], later), "old ones are forgotten");
    }

    fn zone() -> ZoneId {
        ZoneId::new("knock.example.com")
    }

    #[test]
    fn genuine_answer_checks_and_forgeries_do_not() {
        let zk = [3u8; 16];
        let q = question(&zk, &zone(), 42);
        assert_eq!(q.label.len(), LABEL_LEN);
        let (nonce, id) = parse_label(q.label.to_ascii_uppercase().as_bytes(), &zk, &zone()).unwrap();
        assert_eq!((nonce, id), (q.nonce, 42));
        let seen: IpAddr = "198.18.0.2".parse().unwrap();
        let a = answer(b"alice-key", &zone(), &nonce, seen);
        assert_eq!(check(b"alice-key", &zone(), &q, &a), Ok(seen));
        // The attacker's address without a tag, with garbage, or with a tag for another address.
        assert_eq!(check(b"alice-key", &zone(), &q, &["198.18.0.3".into()]), Err(WhoamiError::NoTag));
        assert_eq!(check(b"alice-key", &zone(), &q, &["198.18.0.3".into(), "00".repeat(16)]), Err(WhoamiError::BadTag));
        assert_eq!(check(b"alice-key", &zone(), &q, &["198.18.0.3".into(), a[1].clone()]), Err(WhoamiError::BadTag));
        // Another user's key (an enrolled attacker) cannot answer for alice.
        let forged = answer(b"mallory-key", &zone(), &nonce, "198.18.0.3".parse().unwrap());
        assert_eq!(check(b"alice-key", &zone(), &q, &forged), Err(WhoamiError::BadTag));
        // A genuine answer to another question is a replay.
        let q2 = question(&zk, &zone(), 42);
        assert_eq!(check(b"alice-key", &zone(), &q2, &a), Err(WhoamiError::BadTag));
        // A decoy looks like an answer but never checks.
        let d = decoy(b"process secret", &zone(), &nonce, seen);
        assert_eq!((d[0].as_str(), d[1].len()), ("198.18.0.2", 32));
        assert_eq!(check(b"alice-key", &zone(), &q, &d), Err(WhoamiError::BadTag));
        // Without the zone key the id is not recoverable.
        assert_ne!(parse_label(q.label.as_bytes(), &[4u8; 16], &zone()).map(|x| x.1), Some(42));
    }
}
