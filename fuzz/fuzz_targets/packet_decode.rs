//! Fuzz target: see [`corvid_fuzz::packet_decode`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corvid_fuzz::packet_decode(data));
