//! The compact verifier index: every active chain's current verifier → which
//! user's which chain, in 16 bytes a chain (32 a user, under 64 with the table's
//! slack at any size), so a million users fit in tens of megabytes and load fast.
//!
//! Open addressing with linear probing over one flat array. Verifiers are SHA-256
//! outputs, already uniformly random, so their first eight bytes are the hash: no
//! hashing per probe, and an attacker who picks lookups cannot pick where the
//! table's entries sit (they are verifiers the attacker does not know). The array
//! is sized for a load of at most [`MAX_LOAD`], using multiply-shift range
//! reduction rather than a power of two, so it never wastes half its memory.

use crate::token::{ELEMENT_LEN, Element, Form};

/// Highest share of occupied buckets before the table grows.
const MAX_LOAD: f64 = 0.80;
/// Buckets per entry right after a build or a growth.
const SLACK: f64 = 1.0 / 0.70;
const EMPTY: u32 = u32::MAX;

/// Which chain a verifier ends: a user id (below 2^31) and the form in the low bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainRef {
    pub user: i64,
    pub form: Form,
}

impl ChainRef {
    fn pack(self) -> u32 {
        ((self.user as u32) << 1) | self.form as u32
    }

    fn unpack(v: u32) -> ChainRef {
        ChainRef { user: i64::from(v >> 1), form: if v & 1 == 0 { Form::Plain } else { Form::Bound } }
    }

    /// Ids the index can hold (SQLite row ids start at 1 and grow by one).
    pub fn fits(user: i64) -> bool {
        (1..i64::from(EMPTY >> 1)).contains(&user)
    }
}

/// A verifier's first eight bytes: already uniformly random.
fn hash(key: &Element) -> u64 {
    u64::from_le_bytes(key.0[..8].try_into().expect("8 bytes"))
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Bucket {
    key: [u8; ELEMENT_LEN],
    val: u32,
}

const VACANT: Bucket = Bucket { key: [0; ELEMENT_LEN], val: EMPTY };

pub struct Index {
    buckets: Vec<Bucket>,
    len: usize,
}

impl Index {
    /// An index sized for `expected` entries.
    pub fn with_capacity(expected: usize) -> Index {
        let n = ((expected.max(8) as f64) * SLACK).ceil() as usize;
        Index { buckets: vec![VACANT; n], len: 0 }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    /// An index of `entries` (keys unique), placed in the order of their home
    /// buckets so the build writes the array front to back instead of jumping
    /// around it (at a million users, about half the time of inserting in scan order).
    pub fn build(mut entries: Vec<(Element, ChainRef)>) -> Index {
        let mut idx = Index::with_capacity(entries.len());
        // The home bucket grows with the hash, so sorting by hash sorts by home. Two
        // halves sort on two threads, then merge as they are placed.
        let mid = entries.len() / 2;
        let (a, b) = entries.split_at_mut(mid);
        std::thread::scope(|s| {
            s.spawn(|| a.sort_unstable_by_key(|(k, _)| hash(k)));
            b.sort_unstable_by_key(|(k, _)| hash(k));
        });
        let (mut i, mut j) = (0, mid);
        while i < mid || j < entries.len() {
            let take_a = j == entries.len() || (i < mid && hash(&entries[i].0) <= hash(&entries[j].0));
            let next = if take_a { &mut i } else { &mut j };
            let (k, c) = entries[*next];
            *next += 1;
            idx.insert(k, c);
        }
        idx
    }

    /// Bytes of RAM the table holds.
    pub fn bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<Bucket>()
    }

    fn home(&self, key: &Element) -> usize {
        ((u128::from(hash(key)) * self.buckets.len() as u128) >> 64) as usize
    }

    fn slot(&self, key: &Element) -> Result<usize, usize> {
        let n = self.buckets.len();
        let mut i = self.home(key);
        loop {
            let b = &self.buckets[i];
            if b.val == EMPTY {
                return Err(i);
            }
            if b.key == key.0 {
                return Ok(i);
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    pub fn get(&self, key: &Element) -> Option<ChainRef> {
        self.slot(key).ok().map(|i| ChainRef::unpack(self.buckets[i].val))
    }

    /// Insert or replace. Panics only if `chain.user` does not [`ChainRef::fits`].
    pub fn insert(&mut self, key: Element, chain: ChainRef) {
        assert!(ChainRef::fits(chain.user), "user id {} out of the index's range", chain.user);
        if (self.len + 1) as f64 > self.buckets.len() as f64 * MAX_LOAD {
            self.grow();
        }
        match self.slot(&key) {
            Ok(i) => self.buckets[i].val = chain.pack(),
            Err(i) => {
                self.buckets[i] = Bucket { key: key.0, val: chain.pack() };
                self.len += 1;
            }
        }
    }

    /// Remove `key` (backward-shift deletion keeps every probe run unbroken).
    pub fn remove(&mut self, key: &Element) -> Option<ChainRef> {
        let mut hole = self.slot(key).ok()?;
        let found = ChainRef::unpack(self.buckets[hole].val);
        let n = self.buckets.len();
        let mut i = hole;
        loop {
            i = if i + 1 == n { 0 } else { i + 1 };
            let b = self.buckets[i];
            if b.val == EMPTY {
                break;
            }
            let home = self.home(&Element(b.key));
            // Move `b` into the hole unless its home lies cyclically in (hole, i].
            let stays = if hole <= i { hole < home && home <= i } else { hole < home || home <= i };
            if !stays {
                self.buckets[hole] = b;
                hole = i;
            }
        }
        self.buckets[hole] = VACANT;
        self.len -= 1;
        Some(found)
    }

    fn grow(&mut self) {
        let old = std::mem::replace(
            &mut self.buckets,
            vec![VACANT; ((self.len.max(8) * 2) as f64 * SLACK / 1.4).ceil() as usize],
        );
        self.len = 0;
        for b in old.into_iter().filter(|b| b.val != EMPTY) {
            let i = self.slot(&Element(b.key)).expect_err("keys are unique");
            self.buckets[i] = b;
            self.len += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn key(i: u64) -> Element {
        use sha2::{Digest, Sha256};
        Element(Sha256::digest(i.to_le_bytes())[..ELEMENT_LEN].try_into().unwrap())
    }

    #[test]
    fn behaves_like_a_map_through_inserts_removals_and_growth() {
        let mut idx = Index::with_capacity(10);
        let mut model = HashMap::new();
        for i in 0..20_000u64 {
            let c = ChainRef { user: (i % 5000 + 1) as i64, form: if i % 2 == 0 { Form::Plain } else { Form::Bound } };
            idx.insert(key(i), c);
            model.insert(key(i), c);
            if i % 3 == 0 {
                let k = key(i / 2);
                assert_eq!(idx.remove(&k), model.remove(&k), "remove {i}");
            }
        }
        assert_eq!(idx.len(), model.len());
        for i in 0..20_000u64 {
            assert_eq!(idx.get(&key(i)), model.get(&key(i)).copied(), "get {i}");
        }
        assert_eq!(idx.get(&key(99_999)), None);
        assert!(idx.bytes() <= 16 * model.len() * 2, "{} bytes for {} entries", idx.bytes(), model.len());
    }

    #[test]
    fn build_places_every_entry() {
        let entries: Vec<_> =
            (0..50_000u64).map(|i| (key(i), ChainRef { user: (i + 1) as i64, form: Form::Bound })).collect();
        let idx = Index::build(entries.clone());
        assert_eq!(idx.len(), entries.len());
        for (k, c) in entries {
            assert_eq!(idx.get(&k), Some(c));
        }
    }

    #[test]
    fn a_built_table_costs_under_32_bytes_an_entry() {
        let n = 100_000;
        let mut idx = Index::with_capacity(n);
        for i in 0..n as u64 {
            idx.insert(key(i), ChainRef { user: 1, form: Form::Plain });
        }
        assert_eq!(idx.len(), n);
        assert!(idx.bytes() / n < 32, "{} bytes an entry", idx.bytes() / n);
    }
}
