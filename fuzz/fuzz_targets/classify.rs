//! `cargo fuzz run classify`: see `pgmux::fuzz::classify` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzz::classify(data));
