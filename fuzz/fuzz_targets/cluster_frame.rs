//! Fuzz target: see [`corvid_fuzz::cluster_frame`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corvid_fuzz::cluster_frame(data));
