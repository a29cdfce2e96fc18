//! One-time hash chains (RFC 2289 / COK style) over SHA-256.
//!
//! Every hash carries a version tag and a purpose, so elements of one chain can
//! never be confused with MACs, service ids or another version's chain. Each
//! step also hashes the zone, so a chain enrolled for one zone is useless
//! against another.
//!
//! A user has two independent chains, one per [`Form`]. The bound form carries
//! its element in clear inside the label, so whoever relays a bound knock learns
//! that element; if the same element also worked as a plain knock (which opens
//! for whoever sends it) the relay could steal the door. Each form therefore
//! derives its own chain from the seed and steps it with its own tag: an element
//! of one chain, stepped with the other chain's function, never reaches a verifier
//! (see ARCHITECTURE.md, "Two chains per user").

use sha2::{Digest, Sha256};

/// Bytes per chain element: 96 bits (≥ 80 bits keeps a guess hopeless; see ARCHITECTURE.md, "The token").
pub const ELEMENT_LEN: usize = 12;

/// Which wire form a chain serves. The numeric value is stored in the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Form {
    /// Bare elements for `dig` and printed lists; open for the address the server sees.
    Plain = 0,
    /// Elements inside MAC'd bound labels; open for the embedded address.
    Bound = 1,
}

impl Form {
    pub const ALL: [Form; 2] = [Form::Plain, Form::Bound];

    pub fn as_str(self) -> &'static str {
        match self {
            Form::Plain => "plain",
            Form::Bound => "bound",
        }
    }

    /// Index into per-form arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    fn seed_tag(self) -> &'static [u8] {
        match self {
            Form::Plain => b"nxknock/v2/seed/plain\0",
            Form::Bound => b"nxknock/v2/seed/bound\0",
        }
    }

    fn step_tag(self) -> &'static [u8] {
        match self {
            Form::Plain => b"nxknock/v2/step/plain\0",
            Form::Bound => b"nxknock/v2/step/bound\0",
        }
    }
}

/// One chain element. Compared in constant time only where it matters (the
/// verifier index is a hash map keyed by the *hash* of untrusted input, so
/// timing of the map probe reveals nothing about stored verifiers).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Element(pub [u8; ELEMENT_LEN]);

impl std::fmt::Debug for Element {
    // Never print an element: an unspent one is a live credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Element(..)")
    }
}

impl Element {
    pub fn from_slice(b: &[u8]) -> Option<Element> {
        Some(Element(b.try_into().ok()?))
    }
    pub fn as_bytes(&self) -> &[u8; ELEMENT_LEN] {
        &self.0
    }
}

/// The zone a chain belongs to, canonicalised once (lowercase, no trailing dot),
/// because every chain step and every MAC hashes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneId(String);

impl ZoneId {
    pub fn new(zone: &str) -> ZoneId {
        ZoneId(zone.trim_end_matches('.').to_ascii_lowercase())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client's 256-bit chain seed. Only the client ever holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed(pub [u8; 32]);

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(..)")
    }
}

impl Seed {
    pub fn random() -> Seed {
        let mut b = [0u8; 32];
        rand::fill(&mut b);
        Seed(b)
    }

    /// `x0` of the chain for `form`.
    pub fn first(&self, form: Form) -> Element {
        truncate(Sha256::new().chain_update(form.seed_tag()).chain_update(self.0).finalize().as_slice())
    }

    /// `x(j)` of the chain for `form`: `j` steps from `x0`. Costs `j` hashes; a
    /// client computes this once per knock.
    pub fn element(&self, zone: &ZoneId, form: Form, j: u64) -> Element {
        walk(zone, form, self.first(form), j)
    }
}

/// `n` steps down the chain from `x`: `x(j)` gives `x(j + n)`.
pub fn walk(zone: &ZoneId, form: Form, mut x: Element, n: u64) -> Element {
    for _ in 0..n {
        x = step(zone, form, &x);
    }
    x
}

/// `x(j+1) = H(tag(form) ‖ zone ‖ x(j))`, truncated to [`ELEMENT_LEN`].
pub fn step(zone: &ZoneId, form: Form, x: &Element) -> Element {
    let mut h = Sha256::new();
    h.update(form.step_tag());
    h.update((zone.0.len() as u8).to_be_bytes());
    h.update(zone.0.as_bytes());
    h.update(x.0);
    truncate(h.finalize().as_slice())
}

fn truncate(digest: &[u8]) -> Element {
    let mut e = [0u8; ELEMENT_LEN];
    e.copy_from_slice(&digest[..ELEMENT_LEN]);
    Element(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stepping_an_element_reaches_the_next_one() {
        let zone = ZoneId::new("Knock.Example.COM.");
        assert_eq!(zone.as_str(), "knock.example.com");
        let seed = Seed([7; 32]);
        for form in Form::ALL {
            let x5 = seed.element(&zone, form, 5);
            assert_eq!(step(&zone, form, &seed.element(&zone, form, 4)), x5);
            assert_ne!(seed.element(&zone, form, 4), x5);
        }
    }

    #[test]
    fn chains_differ_by_zone_and_seed() {
        let a = ZoneId::new("a.example");
        let b = ZoneId::new("b.example");
        let seed = Seed([1; 32]);
        assert_ne!(seed.element(&a, Form::Bound, 3), seed.element(&b, Form::Bound, 3));
        assert_ne!(seed.element(&a, Form::Bound, 3), Seed([2; 32]).element(&a, Form::Bound, 3));
    }

    #[test]
    fn the_two_forms_are_independent_chains() {
        let zone = ZoneId::new("knock.example.com");
        let seed = Seed([9; 32]);
        let plain: Vec<_> = (0..64).map(|j| seed.element(&zone, Form::Plain, j)).collect();
        // No bound element, stepped by either step function up to 64 times, lands on the plain chain.
        for j in 0..64 {
            let b = seed.element(&zone, Form::Bound, j);
            assert!(!plain.contains(&b));
            let (mut p, mut q) = (b, b);
            for _ in 0..64 {
                p = step(&zone, Form::Plain, &p);
                q = step(&zone, Form::Bound, &q);
                assert!(!plain.contains(&p) && !plain.contains(&q));
            }
        }
    }

    #[test]
    fn debug_never_prints_secrets() {
        let s = format!("{:?} {:?}", Seed([0xab; 32]), Element([0xcd; ELEMENT_LEN]));
        assert!(!s.contains("171") && !s.contains("ab") && !s.contains("205"), "{s}");
    }
}
