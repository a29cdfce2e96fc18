//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay
//! test (`tests/fuzz_corpus.rs`): each takes arbitrary bytes and must neither panic
//! nor break its invariant. A crash found by a fuzzer becomes a file in
//! `fuzz/corpus/<target>/` (replayed by every test run) and a regression test named
//! after it.

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use crate::capture::assemble::Assembler;
use crate::capture::packet::{self, L4, Link};
use crate::dns::fast::Differential;
use crate::token::{SequenceCode, Token};

/// A knock label: decoding never panics, and what decodes encodes back to the
/// same label (case aside): one meaning per label.
pub fn token(data: &[u8]) {
    if let Ok(t) = Token::parse(data) {
        assert_eq!(t.to_label().as_bytes(), data.to_ascii_lowercase().as_slice(), "label round trip");
    }
}

/// A captured frame under every link type, then its ports through a sequence
/// assembler: nothing panics, memory stays bounded.
pub fn frame(data: &[u8]) {
    static CODE: LazyLock<SequenceCode> = LazyLock::new(|| SequenceCode::parse("40000-40999").expect("range"));
    for link in [Link::Ethernet, Link::LinuxSll, Link::Raw] {
        let _ = packet::parse(link, data);
    }
    let mut a = Assembler::new(*CODE);
    let t = Instant::now();
    for (i, pair) in data.chunks(3).enumerate() {
        let port = 40000 + u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) % 1000;
        let src = std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, *pair.get(2).unwrap_or(&0) % 4));
        let _ = a.add(src, if i % 2 == 0 { L4::Syn } else { L4::Udp }, port, t + Duration::from_millis(i as u64));
    }
    let _ = a.sweep(t + Duration::from_secs(1));
}

/// A DNS datagram through both answer paths: neither panics, and where the fast
/// path answers, its bytes are hickory's.
pub fn dns(data: &[u8]) {
    static DIFF: LazyLock<Differential> = LazyLock::new(|| {
        let zone_file = concat!(env!("CARGO_MANIFEST_DIR"), "/zones/knock.example.com.zone");
        Differential::new(crate::dns::Zone::load(Path::new(zone_file), None).expect("the shipped zone loads"))
    });
    if let Err(e) = DIFF.check(data) {
        panic!("{e}");
    }
}

/// An operator's config: parsing never panics, whatever the bytes.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(text, Path::new("/fuzz/nxknock.toml"));
    }
}

/// A zone file's text: parsing (hickory's parser, then our rules) never panics.
/// (An `$INCLUDE` of an absolute path is read like the parser always would; the
/// fuzzer only ever finds files that exist, read only.)
pub fn zone(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::dns::Zone::parse(text.to_owned(), Path::new("/nonexistent/fuzz.zone"), None);
    }
}

/// A credential file's text: parsing never panics.
pub fn credential(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::credential::Credential::parse(text, Path::new("/fuzz/user.cred"));
    }
}

/// One fuzz target: bytes in, a panic when something is wrong.
pub type Target = fn(&[u8]);

/// All targets by name, for the replay test.
pub const TARGETS: [(&str, Target); 6] =
    [("token", token), ("frame", frame), ("dns", dns), ("config", config), ("zone", zone), ("credential", credential)];
