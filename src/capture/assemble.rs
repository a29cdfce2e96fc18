//! Partial port sequences, one per source, until they complete or time out.
//!
//! Every packet names its position ([`SequenceCode`]), so the assembler just fills
//! slots: a retransmitted SYN fills its slot again with the same digit, a reordered
//! pair fills two slots in the other order, and another host's packets go to that
//! host's own partial. A slot that gets a *different* digit takes the newer one (the
//! user started over). A sequence is complete when every slot is filled, or when
//! all but one are and nothing came for [`FINISH_IDLE`] (one lost packet, recovered
//! from the parity digit). A partial older than [`TIMEOUT`] is forgotten.
//!
//! That recovery must not hand the sequence to an observer: one who saw the other
//! packets knows the missing digit too, and could send the whole sequence from its
//! own address while the user's partial waits. So a complete sequence that another
//! source began first and is one packet short of is a copy ([`Step::Copied`]): the
//! element goes to the source that began first.
//!
//! Memory is bounded: past [`MAX_SOURCES`] partials the oldest is evicted, so
//! spoofed sources cannot grow the table, and evicting the oldest (not refusing the
//! newest) keeps a user's few-millisecond sequence from being crowded out.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::packet::L4;
use crate::token::{Element, SequenceCode};

/// A sequence must complete within this time of its first packet.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// With one packet missing, the sequence is finished this long after its last packet.
pub const FINISH_IDLE: Duration = Duration::from_millis(300);
/// Partial sequences kept at once.
pub const MAX_SOURCES: usize = 4096;

/// What one packet (or a sweep) made of a source's sequence.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Pending,
    /// A complete sequence: the element it carries.
    Done(Element),
    /// A complete sequence whose parity does not add up, or no element.
    Bad,
    /// A complete sequence that another source began first and is one packet short
    /// of: a copy made by someone who saw the original (whose lost packet the parity
    /// digit gives away). The original's source gets the element; the copy nothing.
    Copied {
        original: IpAddr,
        via: L4,
        element: Element,
    },
}

type Key = (IpAddr, L4);

struct Partial {
    digits: Vec<Option<u32>>,
    filled: usize,
    first: Instant,
    last: Instant,
}

pub struct Assembler {
    code: SequenceCode,
    partial: HashMap<Key, Partial>,
    /// Keys in the order their partial began, for eviction (stale entries skipped).
    order: VecDeque<(Key, Instant)>,
}

impl Assembler {
    pub fn new(code: SequenceCode) -> Assembler {
        Assembler { code, partial: HashMap::new(), order: VecDeque::new() }
    }

    pub fn code(&self) -> &SequenceCode {
        &self.code
    }

    /// A packet from `src` to `port` of the sequence range.
    pub fn add(&mut self, src: IpAddr, l4: L4, port: u16, now: Instant) -> Step {
        let Some((pos, digit)) = self.code.decode_port(port) else { return Step::Pending };
        let key = (src, l4);
        if self.partial.get(&key).is_some_and(|p| now.duration_since(p.first) > TIMEOUT) {
            self.partial.remove(&key);
        }
        if !self.partial.contains_key(&key) {
            self.make_room();
            let len = self.code.len();
            self.partial.insert(key, Partial { digits: vec![None; len], filled: 0, first: now, last: now });
            self.order.push_back((key, now));
        }
        let p = self.partial.get_mut(&key).expect("inserted above");
        if p.digits[pos].is_none() {
            p.filled += 1;
        }
        p.digits[pos] = Some(digit);
        p.last = now;
        if p.filled == self.code.len() {
            let p = self.partial.remove(&key).expect("present");
            let step = self.finish(&p);
            if let Step::Done(element) = step {
                if let Some(original) = self.began_first(&element, p.first) {
                    self.partial.remove(&original);
                    return Step::Copied { original: original.0, via: original.1, element };
                }
            }
            return step;
        }
        Step::Pending
    }

    /// Another source's partial that began no later than `began` and recovers to
    /// `element` with its one missing packet (see [`Step::Copied`]).
    fn began_first(&self, element: &Element, began: Instant) -> Option<Key> {
        let len = self.code.len();
        self.partial
            .iter()
            .filter(|(_, p)| p.filled + 1 == len && p.first <= began)
            .find(|(_, p)| self.code.assemble(&p.digits).as_ref() == Some(element))
            .map(|(k, _)| *k)
    }

    /// Finish sequences missing one packet that went quiet, forget timed-out ones.
    pub fn sweep(&mut self, now: Instant) -> Vec<(IpAddr, L4, Step)> {
        let mut done = Vec::new();
        let len = self.code.len();
        let mut finished = Vec::new();
        self.partial.retain(|key, p| {
            if now.duration_since(p.first) > TIMEOUT {
                return false;
            }
            if p.filled + 1 == len && now.duration_since(p.last) >= FINISH_IDLE {
                finished.push((*key, p.digits.clone()));
                return false;
            }
            true
        });
        for ((src, l4), digits) in finished {
            let step = self.code.assemble(&digits).map_or(Step::Bad, Step::Done);
            done.push((src, l4, step));
        }
        // Drop eviction entries of partials that are gone or were begun again.
        while let Some((key, began)) = self.order.front() {
            if self.partial.get(key).is_some_and(|p| p.first == *began) {
                break;
            }
            self.order.pop_front();
        }
        done
    }

    pub fn len(&self) -> usize {
        self.partial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    fn finish(&self, p: &Partial) -> Step {
        self.code.assemble(&p.digits).map_or(Step::Bad, Step::Done)
    }

    fn make_room(&mut self) {
        while self.partial.len() >= MAX_SOURCES {
            let Some((key, began)) = self.order.pop_front() else { return };
            if self.partial.get(&key).is_some_and(|p| p.first == began) {
                self.partial.remove(&key);
            }
        }
        if self.order.len() > 4 * MAX_SOURCES {
            let live = &self.partial;
            self.order.retain(|(k, began)| live.get(k).is_some_and(|p| p.first == *began));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::ELEMENT_LEN;

    fn setup() -> (Assembler, Element, Vec<u16>) {
        let code = SequenceCode::parse("40000-40999").unwrap();
        let e = Element::from_slice(&[0x3c; ELEMENT_LEN]).unwrap();
        let ports = code.encode(&e);
        (Assembler::new(code), e, ports)
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 2));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 3));

    #[test]
    fn duplicates_reordering_and_other_hosts_in_between() {
        let (mut a, e, ports) = setup();
        let t = Instant::now();
        let mut steps = Vec::new();
        let mut order: Vec<u16> = ports.clone();
        order.swap(3, 4);
        for (i, p) in order.iter().enumerate() {
            steps.push(a.add(A, L4::Syn, *p, t));
            if i == 5 {
                // A retransmitted SYN and a stranger's packets between ours.
                steps.push(a.add(A, L4::Syn, ports[2], t));
                steps.push(a.add(B, L4::Syn, 40007, t));
                steps.push(a.add(A, L4::Udp, 40011, t));
            }
        }
        assert_eq!(steps.last(), Some(&Step::Done(e)));
        assert!(steps[..steps.len() - 1].iter().all(|s| *s == Step::Pending));
        assert_eq!(a.len(), 2, "the stranger's and the UDP partials remain");
    }

    #[test]
    fn one_lost_packet_finishes_after_a_quiet_spell() {
        let (mut a, e, ports) = setup();
        let t = Instant::now();
        for p in ports.iter().skip(1) {
            assert_eq!(a.add(A, L4::Syn, *p, t), Step::Pending);
        }
        assert!(a.sweep(t + FINISH_IDLE / 2).is_empty());
        assert_eq!(a.sweep(t + FINISH_IDLE), vec![(A, L4::Syn, Step::Done(e))]);
        assert!(a.is_empty());
    }

    #[test]
    fn partials_time_out_and_a_new_start_overwrites() {
        let (mut a, e, ports) = setup();
        let t = Instant::now();
        for p in &ports[..10] {
            a.add(A, L4::Syn, *p, t);
        }
        assert!(a.sweep(t + TIMEOUT + Duration::from_millis(1)).is_empty());
        assert!(a.is_empty(), "timed out");
        // A stale digit in slot 3 is overwritten by the new sequence.
        let stale = if ports[3] > 40000 + 3 * 55 { ports[3] - 1 } else { ports[3] + 1 };
        a.add(A, L4::Syn, stale, t);
        let last = ports.iter().map(|p| a.add(A, L4::Syn, *p, t)).last().unwrap();
        assert_eq!(last, Step::Done(e));
    }

    #[test]
    fn a_copy_completed_while_the_original_is_one_short_goes_to_the_original() {
        let (mut a, e, ports) = setup();
        let t = Instant::now();
        // The user's sequence loses one packet; the observer sends all of it, later.
        for p in ports.iter().skip(1) {
            assert_eq!(a.add(A, L4::Syn, *p, t), Step::Pending);
        }
        let later = t + Duration::from_millis(5);
        let last = ports.iter().map(|p| a.add(B, L4::Syn, *p, later)).last().unwrap();
        assert_eq!(last, Step::Copied { original: A, via: L4::Syn, element: e });
        assert!(a.is_empty(), "both partials are done with");
    }

    #[test]
    fn a_wrong_complete_sequence_is_bad() {
        let (mut a, _, ports) = setup();
        let t = Instant::now();
        let mut wrong = ports.clone();
        wrong[0] = if wrong[0] > 40000 { wrong[0] - 1 } else { wrong[0] + 1 };
        let last = wrong.iter().map(|p| a.add(A, L4::Syn, *p, t)).last().unwrap();
        assert_eq!(last, Step::Bad);
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_goes_first() {
        let (mut a, e, ports) = setup();
        let t = Instant::now();
        a.add(A, L4::Syn, ports[0], t);
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let src = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            a.add(src, L4::Syn, 40000, t + Duration::from_millis(1));
        }
        assert_eq!(a.len(), MAX_SOURCES);
        // A was evicted; a fresh sequence from A still completes.
        let last = ports.iter().map(|p| a.add(A, L4::Syn, *p, t)).last().unwrap();
        assert_eq!(last, Step::Done(e));
    }
}
