#![no_main]
//! See `nxknock::fuzzing::config`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nxknock::fuzzing::config(data));
