//! `cargo fuzz run session`: client bytes through pgmux and a real PostgreSQL; see
//! `fuzz/session.rs` for what it checks.
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../session.rs"]
mod session;

libfuzzer_sys::fuzz_target!(|data: &[u8]| session::run(data));
