//! `cargo fuzz run config`: see `pgmux::fuzz::config` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux::fuzz::config(data));
