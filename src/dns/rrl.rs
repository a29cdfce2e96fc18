//! Response rate limiting for the zone's ordinary answers, so the server cannot be
//! turned into an amplifier against a forged source (knot's RRL is the model).
//!
//! Only UDP answers from the zone (SOA, NS, glue, static records, refusals) are
//! limited, per source network (IPv4 /24, IPv6 /56), with a token bucket. Past
//! the budget, every `slip`-th answer is sent *truncated* (TC, no records: a real
//! client retries over TCP, which a forged source cannot) and the others are
//! dropped. Knock answers are never limited here: they are small (a spoofer gains
//! little), identical for valid and invalid knocks, and a knock behind a busy shared
//! resolver must still be answered. Memory is bounded: past [`MAX_TRACKED`]
//! networks, idle buckets are swept and new networks share one overflow bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Source networks tracked at once.
pub const MAX_TRACKED: usize = 65_536;

/// What to do with one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Send it truncated: header and question only, TC set.
    Slip,
    Drop,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    /// Answers over budget so far (for the slip count).
    over: u64,
}

#[derive(Default)]
struct State {
    buckets: HashMap<(IpAddr, u8), Bucket>,
    /// When idle buckets were last swept (at most once a second: a sweep walks
    /// every bucket, and spoofed sources must not make each answer pay for one).
    swept: Option<Instant>,
}

pub struct Rrl {
    rate: f64,
    slip: u64,
    state: Mutex<State>,
}

impl Rrl {
    /// `rate` answers a second per network (bursts of as many), every `slip`-th
    /// answer over it truncated (0: drop all).
    pub fn new(rate: u32, slip: u32) -> Rrl {
        Rrl { rate: f64::from(rate), slip: u64::from(slip), state: Mutex::new(State::default()) }
    }

    fn key(src: IpAddr) -> (IpAddr, u8) {
        match src.to_canonical() {
            IpAddr::V4(a) => (IpAddr::V4((u32::from(a) & 0xffff_ff00).into()), 24),
            IpAddr::V6(a) => (IpAddr::V6((u128::from(a) & !((1u128 << 72) - 1)).into()), 56),
        }
    }

    pub fn check(&self, src: IpAddr, now: Instant) -> Verdict {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { buckets, swept } = &mut *state;
        let mut key = Rrl::key(src);
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&key) {
            if swept.is_none_or(|at| now.duration_since(at).as_secs() >= 1) {
                let rate = self.rate;
                buckets.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < rate);
                *swept = Some(now);
            }
            if buckets.len() >= MAX_TRACKED {
                key = (IpAddr::V4(0.into()), 0); // everyone new shares one budget
            }
        }
        let b = buckets.entry(key).or_insert(Bucket { tokens: self.rate, last: now, over: 0 });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.rate).min(self.rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Send;
        }
        b.over += 1;
        if self.slip > 0 && b.over % self.slip == 0 { Verdict::Slip } else { Verdict::Drop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_network_gets_its_rate_then_slips_and_drops() {
        let rrl = Rrl::new(10, 2);
        let t = Instant::now();
        let a: IpAddr = "198.18.0.7".parse().unwrap();
        let verdicts: Vec<Verdict> = (0..20).map(|_| rrl.check(a, t)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Send));
        assert_eq!(&verdicts[10..14], &[Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]);
        // The same /24 shares the budget; another /24 has its own.
        assert_ne!(rrl.check("198.18.0.200".parse().unwrap(), t), Verdict::Send);
        assert_eq!(rrl.check("198.18.1.7".parse().unwrap(), t), Verdict::Send);
        // A second later the budget is back.
        assert_eq!(rrl.check(a, t + Duration::from_secs(1)), Verdict::Send);
    }

    #[test]
    fn v6_counts_per_56_and_slip_zero_drops_all() {
        let rrl = Rrl::new(1, 0);
        let t = Instant::now();
        assert_eq!(rrl.check("2001:db8:1:100::1".parse().unwrap(), t), Verdict::Send);
        assert_eq!(rrl.check("2001:db8:1:1ff::9".parse().unwrap(), t), Verdict::Drop);
        assert_eq!(rrl.check("2001:db8:1:200::1".parse().unwrap(), t), Verdict::Send);
    }

    #[test]
    fn memory_is_bounded_under_spoofed_sources() {
        let rrl = Rrl::new(5, 2);
        let t = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            rrl.check(IpAddr::V4((i << 8).into()), t);
        }
        assert!(rrl.state.lock().unwrap().buckets.len() <= MAX_TRACKED + 1);
    }
}
