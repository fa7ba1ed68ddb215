//! Fuzz target: see [`corvid_fuzz::topic_router`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corvid_fuzz::topic_router(data));
