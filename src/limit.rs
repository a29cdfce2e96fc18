//! Per-source admission to the verify queue.
//!
//! Verifying a well-formed random token costs up to `window` hashes, so a flood
//! of them from one place could fill the bounded verify queue and crowd out a
//! legitimate knock from somewhere else. Every source network (an IPv4 address
//! or an IPv6 /64, so one host cannot dodge the limit by rotating through its /64) gets
//! a token bucket; a knock over its budget is answered exactly like any other
//! (the answer has already gone) but is not verified, only counted.
//!
//! The table is sharded to keep lock contention off the DNS hot path and
//! bounded in size: when a shard is full, buckets that have refilled completely
//! (idle sources) are forgotten first, and if none has, the shard is cleared —
//! which can only ever *admit* more, never block a legitimate source for long.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::netaddr;

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
    shards: Vec<Mutex<HashMap<IpAddr, Bucket>>>,
}

impl SourceLimiter {
    /// `rate` knocks per second per source network, with bursts up to `burst`.
    pub fn new(rate: u32, burst: u32) -> SourceLimiter {
        SourceLimiter {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The network a source is accounted to.
    fn key(ip: IpAddr) -> IpAddr {
        let ip = ip.to_canonical();
        netaddr::mask(ip, if ip.is_ipv4() { 32 } else { 64 })
    }

    /// May a knock from `src` be verified now?
    pub fn admit(&self, src: IpAddr, now: Instant) -> bool {
        let key = Self::key(src);
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
