#![no_main]
//! See `nxknock::fuzzing::credential`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nxknock::fuzzing::credential(data));
