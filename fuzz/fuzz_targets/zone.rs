#![no_main]
//! See `nxknock::fuzzing::zone`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nxknock::fuzzing::zone(data));
