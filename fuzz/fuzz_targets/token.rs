#![no_main]
//! See `nxknock::fuzzing::token`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nxknock::fuzzing::token(data));
