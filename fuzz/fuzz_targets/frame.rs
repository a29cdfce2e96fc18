#![no_main]
//! See `nxknock::fuzzing::frame`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nxknock::fuzzing::frame(data));
