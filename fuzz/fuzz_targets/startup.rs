//! `cargo fuzz run startup`: see `pgmux::fuzz::startup` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzz::startup(data));
