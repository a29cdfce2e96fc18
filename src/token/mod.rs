//! The knock protocol: one-time hash chains and their two wire forms.
//!
//! * [`chain`] — S/KEY-style chains: `x0 = H(seed)`, `x(j+1) = H(zone ‖ x(j))`.
//!   The server keeps only `x(n)`; knock *i* reveals `x(n−i)`, so a stolen
//!   database cannot knock, and a spent element never verifies again.
//! * [`form`] — how an element travels as one DNS label: the *plain* form (the
//!   bare element, 20 base32 chars, works with `dig` and a printed list) and the
//!   *bound* form (element + address + service + time + HMAC tag, ≤ 63 chars,
//!   opens for the embedded address so a knock through a resolver works).
//!
//! Labels are checked for length and alphabet before any decoding or hashing
//! (cheap check before parse), and decoded into typed values.

pub mod chain;
pub mod form;
pub mod sequence;

pub use chain::{ELEMENT_LEN, Element, Form, Seed, ZoneId};
pub use form::{Bound, BoundAddr, BoundKnock, Token, TokenError, ZONE_KEY_LEN, ZoneKey, service_id};
pub use sequence::{SequenceCode, SequenceError};
