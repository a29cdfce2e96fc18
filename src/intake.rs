//! The queues between the listeners and the verifier (ARCHITECTURE.md, "Verification").
//!
//! A knock that passed the listener's checks goes to one of two bounded queues:
//! - **main**: knocks within their source's budget (per IPv4 address or IPv6 /64):
//!   [`PLAIN_PER_SOURCE`] plain knocks a second, and [`BOUND_PER_SOURCE`] bound ones
//!   (outsiders cannot make the zone's admission tag, but every enrolled user — and
//!   a revoked one — can);
//! - **overflow**: knocks over their source's budget.
//!
//! The verifier always takes from main first. So a flood of well-formed plain tokens
//! from one source (or through one resolver) fills only the overflow queue, and a
//! user's knock from anywhere else — or any bound knock — still finds room in main
//! and is checked at once. Both queues are bounded; when one is full, the knock is
//! dropped and counted (its answer has already gone, identical to every other).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use crate::knock::Knock;
use crate::limit::SourceLimiter;
use crate::token::Token;

/// Plain knocks a second from one source network that go to the main queue
/// (bursts of twice that); more is not an error, it only waits behind main.
pub const PLAIN_PER_SOURCE: u32 = 200;
/// Bound knocks a second from one source network that go to the main queue (bursts
/// of twice that): a resolver relays many users' knocks, an insider's flood stops here.
pub const BOUND_PER_SOURCE: u32 = 250;
/// While the overflow queue may hold knocks, an idle verifier looks at it this often.
const OVERFLOW_POLL: Duration = Duration::from_millis(5);

/// Why a knock was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Main,
    Overflow,
    /// The verifier is gone (shutting down).
    Closed,
}

/// Each form's per-source budget for the main queue.
struct Budgets {
    plain: SourceLimiter,
    bound: SourceLimiter,
}

/// The listeners' end (cloned into every listener thread).
#[derive(Clone)]
pub struct IntakeSender {
    main: SyncSender<Knock>,
    /// `None`: everything goes to main (tests, tools).
    overflow: Option<(SyncSender<Knock>, Arc<Budgets>)>,
    /// Knocks put in the overflow queue so far (the receiver's hint to look there).
    overflowed: Arc<AtomicU64>,
}

impl From<SyncSender<Knock>> for IntakeSender {
    /// One queue, no budget.
    fn from(main: SyncSender<Knock>) -> IntakeSender {
        IntakeSender { main, overflow: None, overflowed: Arc::default() }
    }
}

/// The verifier's end.
pub struct IntakeReceiver {
    main: Receiver<Knock>,
    overflow: Option<Receiver<Knock>>,
    overflowed: Arc<AtomicU64>,
    /// Knocks taken from the overflow queue so far.
    taken: AtomicU64,
}

/// Two queues of `main` and `overflow` knocks at most.
pub fn channel(main: usize, overflow: usize) -> (IntakeSender, IntakeReceiver) {
    let (mtx, mrx) = sync_channel(main);
    let (otx, orx) = sync_channel(overflow);
    let limiter = Arc::new(Budgets {
        plain: SourceLimiter::new(PLAIN_PER_SOURCE, 2 * PLAIN_PER_SOURCE),
        bound: SourceLimiter::new(BOUND_PER_SOURCE, 2 * BOUND_PER_SOURCE),
    });
    let overflowed = Arc::new(AtomicU64::new(0));
    (
        IntakeSender { main: mtx, overflow: Some((otx, limiter)), overflowed: overflowed.clone() },
        IntakeReceiver { main: mrx, overflow: Some(orx), overflowed, taken: AtomicU64::new(0) },
    )
}

impl IntakeSender {
    pub fn send(&self, knock: Knock) -> Result<(), Full> {
        let to_main = match (&knock.token, &self.overflow) {
            (_, None) => true,
            (Token::Plain(_), Some((_, b))) => b.plain.admit(knock.seen_from, knock.received),
            (Token::Bound(_), Some((_, b))) => b.bound.admit(knock.seen_from, knock.received),
        };
        let (queue, full) = match (&self.overflow, to_main) {
            (Some((overflow, _)), false) => (overflow, Full::Overflow),
            _ => (&self.main, Full::Main),
        };
        queue.try_send(knock).map_err(|e| match e {
            TrySendError::Full(_) => full,
            TrySendError::Disconnected(_) => Full::Closed,
        })?;
        if full == Full::Overflow {
            self.overflowed.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }
}

impl IntakeReceiver {
    /// The next knock, main first; `Err(true)` once every sender is gone.
    pub fn try_recv(&self) -> Result<Knock, bool> {
        match self.main.try_recv() {
            Ok(k) => return Ok(k),
            Err(TryRecvError::Disconnected) => return Err(true),
            Err(TryRecvError::Empty) => {}
        }
        match self.overflow.as_ref().map(Receiver::try_recv) {
            Some(Ok(k)) => {
                self.taken.fetch_add(1, Ordering::Relaxed);
                Ok(k)
            }
            _ => Err(false),
        }
    }

    /// Wait up to `timeout` for a knock, main first. `Err(true)` once every sender is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Knock, bool> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_recv() {
                Ok(k) => return Ok(k),
                Err(true) => return Err(true),
                Err(false) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(false);
            }
            // Block on main; while the overflow queue may hold knocks, look there
            // every OVERFLOW_POLL. (One pushed during a full wait waits for it: at
            // most `timeout`, and only over-budget plain knocks ever go there.)
            let pending = self.overflowed.load(Ordering::Acquire) > self.taken.load(Ordering::Relaxed);
            let wait = if pending { left.min(OVERFLOW_POLL) } else { left };
            match self.main.recv_timeout(wait) {
                Ok(k) => return Ok(k),
                Err(RecvTimeoutError::Disconnected) => return Err(true),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knock::Via;
    use crate::token::{ELEMENT_LEN, Element};

    fn plain(from: &str, n: u8) -> Knock {
        Knock {
            token: Token::Plain(Element::from_slice(&[n; ELEMENT_LEN]).unwrap()),
            seen_from: from.parse().unwrap(),
            via: Via::DnsUdp,
            ecs: None,
            received: Instant::now(),
        }
    }

    #[test]
    fn a_flooding_source_fills_only_the_overflow_and_others_go_first() {
        let (tx, rx) = channel(1000, 100);
        let mut dropped = 0;
        for i in 0..2000u32 {
            if tx.send(plain("198.51.100.9", i as u8)).is_err() {
                dropped += 1;
            }
        }
        // Its burst went to main, then the overflow filled, then the rest was dropped.
        assert_eq!(dropped, 2000 - 2 * PLAIN_PER_SOURCE as usize - 100);
        assert!(tx.send(plain("198.18.0.2", 7)).is_ok(), "another source still finds room in main");
        let mut from_user_at = None;
        for i in 0.. {
            match rx.try_recv() {
                Ok(k) if k.seen_from.to_string() == "198.18.0.2" => from_user_at = Some(i),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert_eq!(from_user_at, Some(2 * PLAIN_PER_SOURCE as usize), "main is served before overflow");
    }

    /// Review: bound knocks skip the per-source budget because "outsiders cannot make
    /// the admission tag". Every enrolled user can (the tag is zone-wide; a revoked
    /// user keeps it too), so one source of admitted bound look-alikes fills main
    /// and everyone else's knocks, bound or plain, are dropped. SECURITY.md says
    /// "per-source limits still apply" to such look-alikes; at the intake they do not.
    #[test]
    fn one_source_of_admitted_bound_look_alikes_cannot_fill_main() {
        use crate::token::{Bound, BoundAddr, BoundKnock, ZoneId, ZoneKey};
        let (tx, _rx) = channel(1000, 100);
        let zone = ZoneId::new("knock.example.");
        let zone_key = ZoneKey::new(&[7; 32], &zone);
        let look_alike = |n: u32| {
            let element = Element::from_slice(&[n.to_be_bytes(), [0; 4], [0; 4]].concat()).unwrap();
            let addr = BoundAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 9));
            let b = BoundKnock { element, addr, service: 0, time: 0, close: false };
            Knock {
                token: Token::Bound(Bound::sign(&[9; 32], &zone_key, &zone, b)),
                seen_from: "198.51.100.9".parse().unwrap(),
                via: Via::DnsUdp,
                ecs: None,
                received: Instant::now(),
            }
        };
        for i in 0..2000u32 {
            let _ = tx.send(look_alike(i));
        }
        assert!(tx.send(plain("198.18.0.2", 7)).is_ok(), "another source still finds room in main");
    }

    #[test]
    fn a_single_queue_takes_everything_in_order() {
        let (tx, rx) = sync_channel(4);
        let tx = IntakeSender::from(tx);
        let rx = IntakeReceiver { main: rx, overflow: None, overflowed: Arc::default(), taken: AtomicU64::new(0) };
        assert!((0..4).all(|i| tx.send(plain("198.51.100.9", i)).is_ok()));
        assert_eq!(tx.send(plain("198.51.100.9", 9)), Err(Full::Main));
        assert!(rx.recv_timeout(Duration::from_millis(10)).is_ok());
    }
}
