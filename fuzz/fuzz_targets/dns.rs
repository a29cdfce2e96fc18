#![no_main]
//! See `nxknock::fuzzing::dns`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nxknock::fuzzing::dns(data));
