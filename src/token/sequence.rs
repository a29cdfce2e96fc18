//! The port-sequence form of a knock: one element of the user's *plain* chain
//! spread over connection attempts to a range of closed ports.
//!
//! Each packet carries its own position, so order does not matter:
//! `port = lo + position × symbols + digit`. The element (96 bits) is written in
//! base `symbols` as `digits` digits, most significant first, followed by one parity
//! digit (the digits' sum mod `symbols`). The range is cut into `digits + 1`
//! equal slices, one per position, with the fewest positions that still carry 96
//! bits: a 1000-port range gives 17 data digits in base 55 plus parity, 18 packets.
//!
//! Why this shape (ARCHITECTURE.md, "Port sequences"):
//! - a retransmitted or duplicated SYN lands on the same port and says the same
//!   thing again; a reordered pair is harmless; packets of other hosts never mix in
//!   (the listener keeps one partial sequence per source);
//! - one lost packet is recovered from the parity digit, and a complete sequence
//!   whose parity does not add up is refused;
//! - it is never replayable: it *is* a chain element, spent on first use.
//!
//! The client needs no privileges: `connect()` or `sendto()` to each port in turn.

use super::chain::{ELEMENT_LEN, Element};

/// Fewest ports a sequence range may have (below this no code carries 96 bits in a
/// sane number of packets).
pub const MIN_RANGE: u32 = 256;
const ELEMENT_BITS: u32 = (ELEMENT_LEN * 8) as u32;
const MAX_POSITIONS: u32 = 64;

/// The code over one port range, as both the client and the listener derive it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceCode {
    lo: u16,
    hi: u16,
    /// Data digits (positions 0..digits); position `digits` holds the parity.
    digits: u32,
    /// The base: ports per position.
    symbols: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error("sequence port range {0}-{1} is empty or reversed")]
    Reversed(u16, u16),
    #[error("sequence port range {lo}-{hi} has {ports} ports; at least {MIN_RANGE} are needed to carry a knock")]
    TooSmall { lo: u16, hi: u16, ports: u32 },
    #[error("sequence ports must be written LO-HI (for example \"40000-40999\"), not {0:?}")]
    Syntax(String),
}

impl SequenceCode {
    /// The code over `lo..=hi`.
    pub fn new(lo: u16, hi: u16) -> Result<SequenceCode, SequenceError> {
        if hi < lo {
            return Err(SequenceError::Reversed(lo, hi));
        }
        let ports = u32::from(hi) - u32::from(lo) + 1;
        if ports < MIN_RANGE {
            return Err(SequenceError::TooSmall { lo, hi, ports });
        }
        for digits in 1..=MAX_POSITIONS {
            let symbols = ports / (digits + 1);
            if symbols >= 2 && f64::from(symbols).log2() * f64::from(digits) >= f64::from(ELEMENT_BITS) {
                return Ok(SequenceCode { lo, hi, digits, symbols });
            }
        }
        Err(SequenceError::TooSmall { lo, hi, ports })
    }

    /// Parse `"LO-HI"`.
    pub fn parse(range: &str) -> Result<SequenceCode, SequenceError> {
        let bad = || SequenceError::Syntax(range.to_owned());
        let (lo, hi) = range.split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        SequenceCode::new(lo, hi)
    }

    pub fn range(&self) -> (u16, u16) {
        (self.lo, self.hi)
    }

    /// Packets in one sequence (data digits and the parity digit).
    pub fn len(&self) -> usize {
        self.digits as usize + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The ports to knock at, in position order.
    pub fn encode(&self, element: &Element) -> Vec<u16> {
        let mut value = element_value(element);
        let mut digits = vec![0u32; self.digits as usize];
        for d in digits.iter_mut().rev() {
            *d = (value % u128::from(self.symbols)) as u32;
            value /= u128::from(self.symbols);
        }
        let parity = digits.iter().sum::<u32>() % self.symbols;
        digits.push(parity);
        digits.iter().enumerate().map(|(pos, d)| self.port(pos as u32, *d)).collect()
    }

    fn port(&self, pos: u32, digit: u32) -> u16 {
        (u32::from(self.lo) + pos * self.symbols + digit) as u16
    }

    /// Which position and digit a port stands for; `None` for ports of the range
    /// that no position uses (the remainder at its top) and ports outside it.
    pub fn decode_port(&self, port: u16) -> Option<(usize, u32)> {
        let off = u32::from(port).checked_sub(u32::from(self.lo))?;
        let pos = off / self.symbols;
        (port <= self.hi && pos <= self.digits).then_some((pos as usize, off % self.symbols))
    }

    /// The element, from the digits received so far (indexed by position). Needs
    /// every position, or all but one (recovered from the others through the
    /// parity digit). `None` when too many are missing, the parity disagrees, or
    /// the value does not fit an element.
    pub fn assemble(&self, got: &[Option<u32>]) -> Option<Element> {
        if got.len() != self.len() {
            return None;
        }
        let missing: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_none()).collect();
        let s = self.symbols;
        let mut digits: Vec<u32> = got.iter().map(|d| d.unwrap_or(0)).collect();
        if digits.iter().any(|&d| d >= s) {
            return None;
        }
        let data_sum = |d: &[u32]| d[..self.digits as usize].iter().sum::<u32>() % s;
        match missing.as_slice() {
            [] => {
                if data_sum(&digits) != digits[self.digits as usize] {
                    return None;
                }
            }
            [only] if *only == self.digits as usize => {}
            [only] => {
                // parity = sum of data digits, so the missing one is what the rest lacks.
                let parity = digits[self.digits as usize];
                let rest = data_sum(&digits);
                digits[*only] = (parity + s - rest) % s;
            }
            _ => return None,
        }
        let mut value: u128 = 0;
        for &d in &digits[..self.digits as usize] {
            value = value.checked_mul(u128::from(s))?.checked_add(u128::from(d))?;
        }
        if value >> ELEMENT_BITS != 0 {
            return None;
        }
        Element::from_slice(&value.to_be_bytes()[16 - ELEMENT_LEN..])
    }
}

fn element_value(element: &Element) -> u128 {
    let mut b = [0u8; 16];
    b[16 - ELEMENT_LEN..].copy_from_slice(element.as_bytes());
    u128::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(fill: u8) -> Element {
        Element::from_slice(&[fill; ELEMENT_LEN]).unwrap()
    }

    fn received(code: &SequenceCode, ports: &[u16]) -> Vec<Option<u32>> {
        let mut got = vec![None; code.len()];
        for &p in ports {
            let (pos, d) = code.decode_port(p).expect("port of the code");
            got[pos] = Some(d);
        }
        got
    }

    #[test]
    fn a_thousand_ports_take_eighteen_packets() {
        let c = SequenceCode::parse("40000-40999").unwrap();
        assert_eq!((c.digits, c.symbols, c.len()), (17, 55, 18));
        assert_eq!(SequenceCode::parse("1000-1255").unwrap().len(), 36);
        assert!(matches!(SequenceCode::parse("1000-1254"), Err(SequenceError::TooSmall { .. })));
        assert!(matches!(SequenceCode::parse("2000-1000"), Err(SequenceError::Reversed(..))));
        assert!(matches!(SequenceCode::parse("40000"), Err(SequenceError::Syntax(_))));
        assert!(SequenceCode::parse("0-65535").unwrap().len() < 10);
    }

    #[test]
    fn round_trips_in_any_order_with_duplicates_and_one_loss() {
        let c = SequenceCode::parse("40000-40999").unwrap();
        for fill in [0u8, 1, 0x5a, 0xff] {
            let e = el(fill);
            let ports = c.encode(&e);
            assert_eq!(ports.len(), 18);
            assert!(ports.iter().all(|p| (40000..=40999).contains(p)));
            assert_eq!(c.assemble(&received(&c, &ports)), Some(e));
            let mut shuffled = ports.clone();
            shuffled.reverse();
            shuffled.extend_from_slice(&ports[3..6]);
            assert_eq!(c.assemble(&received(&c, &shuffled)), Some(e));
            for lost in 0..ports.len() {
                let mut fewer = ports.clone();
                fewer.remove(lost);
                assert_eq!(c.assemble(&received(&c, &fewer)), Some(e), "lost position {lost}");
            }
            let mut two_lost = ports.clone();
            two_lost.drain(2..4);
            assert_eq!(c.assemble(&received(&c, &two_lost)), None);
        }
    }

    #[test]
    fn a_wrong_digit_is_caught_by_the_parity() {
        let c = SequenceCode::parse("40000-40999").unwrap();
        let ports = c.encode(&el(7));
        let mut got = received(&c, &ports);
        got[4] = Some((got[4].unwrap() + 1) % 55);
        assert_eq!(c.assemble(&got), None);
    }

    #[test]
    fn ports_outside_the_code_mean_nothing() {
        let c = SequenceCode::parse("40000-40999").unwrap();
        assert_eq!(c.decode_port(39999), None);
        assert_eq!(c.decode_port(41000), None);
        // 18 × 55 = 990: the top ten ports of the range belong to no position.
        assert_eq!(c.decode_port(40990), None);
        assert_eq!(c.decode_port(40989), Some((17, 54)));
        // All-maximum digits are beyond 2^96: never an element.
        let max: Vec<Option<u32>> = (0..18).map(|i| Some(if i < 17 { 54 } else { (54 * 17) % 55 })).collect();
        assert_eq!(c.assemble(&max), None);
    }
}
