//! `cargo fuzz run messages`: see `pgmux::fuzz::messages` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzz::messages(data));
