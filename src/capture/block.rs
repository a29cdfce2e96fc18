//! The block list: sources that keep sending bad direct knocks are ignored for a
//! while, and dropped in the kernel at the knock ports (Pasmal's intrusion response).
//!
//! Only *direct* knocks count ([`crate::knock::Via::is_direct`]): a UDP datagram or a
//! port sequence came from its sender's own address. A DNS knock's source is often a
//! resolver shared by many users, so DNS never blocks anyone.
//!
//! The promise "nobody can stop the knocker" shapes the rest (ARCHITECTURE.md,
//! "The block list"): a block never closes or hides a door (the kernel checks doors
//! first), and it never stops a *bound* knock — those carry a MAC and open for the
//! embedded address, so a spoofer who gets a victim's address blocked gains nothing.
//! A blocked source's port sequences are ignored: that is what stops a walker, and
//! sequence knocks, like plain ones, are documented as jammable by a spoofer.
//!
//! Written by the capture thread (payloads that are no knock) and the verify thread
//! (knocks the verifier refused); read by the capture thread; the kernel side is
//! applied by the verify thread, which owns the firewall.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::netaddr::Prefix;

/// Strikes older than this are forgotten.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at once, in strikes and in blocks each; past this, new sources
/// are neither counted nor blocked, so spoofed floods cannot grow memory.
const MAX_TRACKED: usize = 65_536;

/// One entry of the block list, for `nxknock doors` and the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The source: one IPv4 address or one IPv6 /64.
    pub prefix: Prefix,
    pub until: Instant,
}

#[derive(Default)]
struct State {
    strikes: HashMap<Prefix, (u32, Instant)>,
    blocked: HashMap<Prefix, Instant>,
    swept: Option<Instant>,
    /// (start of this second, lines written in it, blocks not logged since the last line)
    logged: (Option<Instant>, u32, u64),
}

/// "source blocked" lines a second at most.
const LOG_PER_SECOND: u32 = 10;

/// New blocks for the kernel, in the order they were made.
pub type KernelBlocks = std::sync::mpsc::Receiver<(Prefix, Duration)>;

/// Blocks waiting for the kernel; past this they stay in nxknock only (the kernel
/// side is the cosmetic half: the listener already ignores the source).
const KERNEL_QUEUE: usize = 1024;

pub struct Blocklist {
    after: u32,
    length: Duration,
    state: Mutex<State>,
    kernel: std::sync::mpsc::SyncSender<(Prefix, Duration)>,
}

impl Blocklist {
    /// Block a source after `after` strikes within [`STRIKE_WINDOW`], for `length`.
    /// `after = 0` never blocks.
    /// The receiver gets every new block, for the kernel.
    pub fn new(after: u32, length: Duration) -> (Blocklist, KernelBlocks) {
        let (kernel, rx) = std::sync::mpsc::sync_channel(KERNEL_QUEUE);
        (Blocklist { after, length, state: Mutex::new(State::default()), kernel }, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One bad direct knock from `src`. True when this strike blocked it.
    pub fn strike(&self, src: IpAddr, now: Instant) -> bool {
        if self.after == 0 {
            return false;
        }
        let key = Prefix::source_door(src);
        let mut s = self.lock();
        if s.blocked.get(&key).is_some_and(|until| *until > now) {
            return false;
        }
        // Both tables are bounded, and swept at most once a second: a sweep walks a
        // whole table, and spoofed sources must not make every strike pay for one.
        if (s.strikes.len() >= MAX_TRACKED || s.blocked.len() >= MAX_TRACKED)
            && s.swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            s.strikes.retain(|_, (_, first)| now.duration_since(*first) < STRIKE_WINDOW);
            s.blocked.retain(|_, until| *until > now);
            s.swept = Some(now);
        }
        if s.strikes.len() >= MAX_TRACKED && !s.strikes.contains_key(&key) {
            return false;
        }
        let entry = s.strikes.entry(key).or_insert((0, now));
        if now.duration_since(entry.1) >= STRIKE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        if entry.0 < self.after || s.blocked.len() >= MAX_TRACKED {
            return false;
        }
        s.strikes.remove(&key);
        s.blocked.insert(key, now + self.length);
        let _ = self.kernel.try_send((key, self.length));
        // One line a block, but not a flood of lines: past LOG_PER_SECOND in a second
        // they are counted and summed up with the next line that is written.
        if s.logged.0.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            s.logged = (Some(now), 0, s.logged.2);
        }
        if s.logged.1 < LOG_PER_SECOND {
            let unlogged = std::mem::take(&mut s.logged.2);
            s.logged.1 += 1;
            tracing::warn!(source = %key, strikes = self.after, seconds = self.length.as_secs(), also_blocked_unlogged = unlogged, "source blocked: repeated bad direct knocks");
        } else {
            s.logged.2 += 1;
        }
        true
    }

    pub fn is_blocked(&self, src: IpAddr, now: Instant) -> bool {
        let s = self.lock();
        !s.blocked.is_empty() && s.blocked.get(&Prefix::source_door(src)).is_some_and(|until| *until > now)
    }

    /// Current blocks.
    pub fn list(&self, now: Instant) -> Vec<Block> {
        let s = self.lock();
        s.blocked.iter().filter(|(_, u)| **u > now).map(|(p, u)| Block { prefix: *p, until: *u }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_n_strikes_within_the_window_and_lifts() {
        let (b, kernel) = Blocklist::new(3, Duration::from_secs(10));
        let src: IpAddr = "198.18.0.9".parse().unwrap();
        let t = Instant::now();
        assert!(!b.strike(src, t));
        assert!(!b.strike(src, t));
        assert!(!b.is_blocked(src, t));
        assert!(b.strike(src, t));
        assert!(b.is_blocked(src, t + Duration::from_secs(9)));
        assert!(!b.is_blocked(src, t + Duration::from_secs(10)));
        assert_eq!(kernel.try_iter().collect::<Vec<_>>(), vec![(Prefix::source_door(src), Duration::from_secs(10))]);
        assert_eq!(b.list(t).len(), 1);
    }

    #[test]
    fn old_strikes_are_forgotten_and_v6_counts_per_64() {
        let (b, _kernel) = Blocklist::new(2, Duration::from_secs(10));
        let t = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        assert!(!b.strike(a, t));
        assert!(!b.strike(c, t + STRIKE_WINDOW), "the first strike expired");
        assert!(b.strike(a, t + STRIKE_WINDOW), "same /64");
        assert!(b.is_blocked("2001:db8:1:2::77".parse().unwrap(), t + STRIKE_WINDOW));
        assert!(!b.is_blocked("2001:db8:1:3::1".parse().unwrap(), t + STRIKE_WINDOW));
    }

    /// Review: MAX_TRACKED bounds the strikes table only. Every source that reaches
    /// `after` strikes moves to `blocked`, which nothing bounds: a spoofed flood (one
    /// datagram per fake source with `block_after = 1`, three with the default) grows
    /// it for as long as `block_seconds` lasts, and every new block walks the whole map
    /// (`blocked.retain`) under the lock the capture thread needs for each packet.
    #[test]
    fn spoofed_sources_cannot_grow_the_block_list_without_bound() {
        let (b, _kernel) = Blocklist::new(1, Duration::from_secs(600));
        let t = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 1_000) {
            b.strike(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t);
        }
        let blocked = b.list(t).len();
        assert!(blocked <= MAX_TRACKED, "{blocked} blocks held at once, more than MAX_TRACKED = {MAX_TRACKED}");
    }

    #[test]
    fn zero_never_blocks() {
        let (b, _kernel) = Blocklist::new(0, Duration::from_secs(10));
        let t = Instant::now();
        assert!((0..100).all(|_| !b.strike("198.18.0.9".parse().unwrap(), t)));
    }
}
