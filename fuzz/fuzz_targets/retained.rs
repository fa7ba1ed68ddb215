//! Fuzz target: see [`corvid_fuzz::retained`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corvid_fuzz::retained(data));
