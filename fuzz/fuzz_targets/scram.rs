//! `cargo fuzz run scram`: see `pgmux::fuzz::scram` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzz::scram(data));
