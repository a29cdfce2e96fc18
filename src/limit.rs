//! Fair shares of the verifier's expensive work: the deep walks.
//!
//! Every knock first gets the cheap check ([`crate::verify::Verifier::verify_quick`]:
//! one hash finds a user's next element), which a flood cannot make expensive. Only
//! what that check cannot decide — random tokens, or knocks that skipped elements —
//! needs a walk of up to `window` hashes, and those wait in a [`DeepQueue`] served
//! round-robin by source *lane* (source network and knock form), each lane with a
//! token bucket. So a flood from one place, or through one resolver, shares only its
//! own lane's budget, and never delays a next-element knock from anywhere.
//!
//! A source network is an IPv4 address or an IPv6 /64 (so one host cannot dodge the
//! limit by rotating through its /64). Over-budget knocks were answered exactly like
//! any other (the answer has already gone); they are only counted.
//!
//! The table is sharded to keep lock contention off the DNS hot path and
//! bounded in size: when a shard is full, buckets that have refilled completely
//! (idle sources) are forgotten first, and if none has, the shard is cleared —
//! which can only ever *admit* more, never block a legitimate source for long.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::netaddr;
use crate::token::Form;

const SHARDS: usize = 16;
const MAX_PER_SHARD: usize = 4096;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct SourceLimiter {
    rate: f64,
    burst: f64,
    /// Account IPv4 sources by /24 and IPv6 by /48 instead of /32 and /64.
    wide: bool,
    shards: Vec<Mutex<HashMap<IpAddr, Bucket>>>,
}

impl SourceLimiter {
    /// `rate` knocks per second per source network, with bursts up to `burst`.
    pub fn new(rate: u32, burst: u32) -> SourceLimiter {
        SourceLimiter {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            wide: false,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Account sources by their wider network (IPv4 /24, IPv6 /48).
    pub fn wide(mut self) -> SourceLimiter {
        self.wide = true;
        self
    }

    /// The network a source is accounted to (a lane of the deep queue).
    fn key(ip: IpAddr) -> IpAddr {
        let ip = ip.to_canonical();
        netaddr::mask(ip, if ip.is_ipv4() { 32 } else { 64 })
    }

    fn key_of(&self, ip: IpAddr) -> IpAddr {
        let ip = ip.to_canonical();
        match (self.wide, ip.is_ipv4()) {
            (false, _) => Self::key(ip),
            (true, true) => netaddr::mask(ip, 24),
            (true, false) => netaddr::mask(ip, 48),
        }
    }

    /// May a knock from `src` be verified now?
    pub fn admit(&self, src: IpAddr, now: Instant) -> bool {
        let key = self.key_of(src);
        let shard = match key {
            IpAddr::V4(a) => a.octets()[3] as usize ^ a.octets()[2] as usize,
            IpAddr::V6(a) => a.octets()[7] as usize ^ a.octets()[5] as usize,
        } % SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_PER_SHARD && !map.contains_key(&key) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
            if map.len() >= MAX_PER_SHARD {
                map.clear();
            }
        }
        let b = map.entry(key).or_insert(Bucket { tokens: self.burst, last: now });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One lane of the deep queue: where knocks came from, and which form they are.
type Lane = (IpAddr, Form);

/// Knocks waiting for a deep walk, served one lane at a time in turn.
pub struct DeepQueue<T> {
    lanes: HashMap<Lane, VecDeque<T>>,
    /// Lanes with waiting knocks, in serving order.
    turn: VecDeque<Lane>,
    len: usize,
    /// Per lane: walks per second and burst; `None`: no budget (tests, benchmarks).
    budget: Option<[SourceLimiter; 2]>,
    /// Per wider network (IPv4 /24, IPv6 /48), four lanes' worth: one holder of many
    /// addresses cannot fill the queue with one lane per address.
    wide: Option<SourceLimiter>,
    max_len: usize,
    max_per_lane: usize,
}

/// Why [`DeepQueue::push`] did not keep a knock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// The lane spent its budget of walks.
    OverBudget,
    /// The lane, or the whole queue, is full.
    Full,
}

impl<T> DeepQueue<T> {
    /// `rate` walks per second per lane (bursts of twice that; 0 = no budget), at
    /// most `max_len` knocks waiting, `max_per_lane` of them from one lane.
    pub fn new(rate: u32, max_len: usize, max_per_lane: usize) -> DeepQueue<T> {
        let budget = (rate > 0).then(|| [0, 1].map(|_| SourceLimiter::new(rate, rate.saturating_mul(2))));
        let wide = (rate > 0).then(|| SourceLimiter::new(rate.saturating_mul(4), rate.saturating_mul(8)).wide());
        DeepQueue { lanes: HashMap::new(), turn: VecDeque::new(), len: 0, budget, wide, max_len, max_per_lane }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A new walk budget (config reload); the lanes' buckets start full again and
    /// the knocks waiting stay queued.
    pub fn set_rate(&mut self, rate: u32) {
        let fresh = DeepQueue::<T>::new(rate, self.max_len, self.max_per_lane);
        (self.budget, self.wide) = (fresh.budget, fresh.wide);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Queue a knock from `src` for a deep walk, if its lane has budget and room.
    pub fn push(&mut self, src: IpAddr, form: Form, item: T, now: Instant) -> Result<(), Shed> {
        if let Some(b) = &self.budget {
            if !b[form.index()].admit(src, now) {
                return Err(Shed::OverBudget);
            }
        }
        if let Some(w) = &self.wide {
            if !w.admit(src, now) {
                return Err(Shed::OverBudget);
            }
        }
        let lane = (SourceLimiter::key(src), form);
        let q = self.lanes.entry(lane).or_default();
        if q.len() >= self.max_per_lane || self.len >= self.max_len {
            return Err(Shed::Full);
        }
        if q.is_empty() {
            self.turn.push_back(lane);
        }
        q.push_back(item);
        self.len += 1;
        Ok(())
    }

    /// The next knock, from the lane whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        let lane = self.turn.pop_front()?;
        let q = self.lanes.get_mut(&lane)?;
        let item = q.pop_front();
        if q.is_empty() {
            self.lanes.remove(&lane);
        } else {
            self.turn.push_back(lane);
        }
        self.len -= usize::from(item.is_some());
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flooding_network_is_limited_and_others_are_not() {
        let l = SourceLimiter::new(10, 20);
        let t = Instant::now();
        let flood: IpAddr = "203.0.113.9".parse().unwrap();
        let admitted = (0..1000).filter(|_| l.admit(flood, t)).count();
        assert_eq!(admitted, 20, "burst only");
        assert!(l.admit("203.0.113.10".parse().unwrap(), t), "another source is unaffected");
        // Refills at `rate`.
        let later = t + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| l.admit(flood, later)).count(), 5);
    }

    #[test]
    fn the_deep_queue_serves_lanes_in_turn_within_their_budgets() {
        let t = Instant::now();
        let flood: IpAddr = "198.18.0.4".parse().unwrap();
        let user: IpAddr = "198.51.100.2".parse().unwrap();
        let mut q = DeepQueue::new(10, 1000, 50);
        let shed = (0..100).filter(|i| q.push(flood, Form::Plain, *i, t).is_err()).count();
        assert_eq!(shed, 80, "a burst of 20, then over budget");
        q.push(user, Form::Plain, 1000, t).unwrap();
        // The same resolver's bound lane is its own lane.
        q.push(flood, Form::Bound, 2000, t).unwrap();
        assert_eq!(q.len(), 22);
        assert_eq!((q.pop(), q.pop(), q.pop()), (Some(0), Some(1000), Some(2000)), "one from each lane in turn");
        assert_eq!(std::iter::from_fn(|| q.pop()).count(), 19);
        assert!(q.is_empty());
        let mut small = DeepQueue::new(0, 3, 2);
        assert!(small.push(flood, Form::Plain, 1, t).is_ok() && small.push(flood, Form::Plain, 2, t).is_ok());
        assert_eq!(small.push(flood, Form::Plain, 3, t), Err(Shed::Full));
        assert!(small.push(user, Form::Plain, 4, t).is_ok());
        assert_eq!(small.push(user, Form::Bound, 5, t), Err(Shed::Full));
    }

    #[test]
    fn one_network_cannot_fill_the_deep_queue_through_many_lanes() {
        let t = Instant::now();
        let mut q = DeepQueue::new(50, 4096, 256);
        // One knock from each of 4096 /64s of one /48.
        let kept = (0..4096u16)
            .filter(|i| {
                let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x77, *i, 0, 0, 0, 1));
                q.push(ip, Form::Plain, 0, t).is_ok()
            })
            .count();
        assert_eq!(kept, 400, "the /48's burst");
        assert!(q.push("2001:db8:18::2".parse().unwrap(), Form::Plain, 1, t).is_ok(), "a user elsewhere still gets in");
    }

    #[test]
    fn ipv6_sources_share_their_64_and_the_table_stays_bounded() {
        let l = SourceLimiter::new(1, 1);
        let t = Instant::now();
        assert!(l.admit("2001:db8:1:2::1".parse().unwrap(), t));
        assert!(!l.admit("2001:db8:1:2:ffff::9".parse().unwrap(), t));
        assert!(l.admit("2001:db8:1:3::1".parse().unwrap(), t));
        for i in 0..(SHARDS * MAX_PER_SHARD + 10) as u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(i));
            l.admit(ip, t);
        }
        let total: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= SHARDS * MAX_PER_SHARD, "{total}");
    }
}
