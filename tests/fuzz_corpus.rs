//! Every committed fuzz corpus file (`fuzz/corpus/<target>/`) replayed through its target,
//! on stable Rust: the fuzz targets' invariants as ordinary regression tests. The session
//! target runs against this binary's own PostgreSQL and in-process pgmux (`fuzz/session.rs`).

mod common;
#[path = "../fuzz/session.rs"]
mod session;

use std::path::PathBuf;

use common::TestPostgres;
use proptest::test_runner::{Config, TestRunner};

/// The files of `fuzz/corpus/<target>/`; panics if there are none.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the {target} corpus {}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (path, data)
        })
        .collect();
    assert!(
        !files.is_empty(),
        "the {target} corpus {} is empty",
        dir.display()
    );
    files.sort();
    files
}

/// Runs every file of the corpus through `target`, naming the file that fails.
fn replay(target: &str, run: fn(&[u8])) {
    for (path, data) in corpus(target) {
        let result = std::panic::catch_unwind(|| run(&data));
        if let Err(panic) = result {
            eprintln!("fuzz corpus file {} failed", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn every_target_has_a_corpus() {
    for target in pgmux::fuzz::TARGETS
        .map(|(name, _)| name)
        .iter()
        .chain(&["session"])
    {
        assert!(!corpus(target).is_empty());
    }
}

#[test]
fn startup_corpus() {
    replay("startup", pgmux::fuzz::startup);
}

#[test]
fn scram_corpus() {
    replay("scram", pgmux::fuzz::scram);
}

#[test]
fn classify_corpus() {
    replay("classify", pgmux::fuzz::classify);
}

#[test]
fn config_corpus() {
    replay("config", pgmux::fuzz::config);
}

#[test]
fn messages_corpus() {
    replay("messages", pgmux::fuzz::messages);
}

#[test]
fn session_corpus() {
    replay("session", session::run);
}

/// pgmux's quoting of the settings it replays, read back by PostgreSQL itself: a value
/// (with `standard_conforming_strings` on and off) and a name (as a column alias) come
/// back exactly.
#[test]
fn postgres_reads_pgmux_quoting_back() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let client = runtime.block_on(async { TestPostgres::shared().await.superuser().await });
    let mut runner = TestRunner::new(Config {
        cases: 300,
        ..Config::default()
    });
    // Names are at most 63 bytes in PostgreSQL: 15 characters of up to 4 bytes.
    let strategy = ("[^\0]{0,40}", "[^\0]{1,15}");
    let outcome = runner.run(&strategy, |(value, name)| {
        for conforming in ["on", "off"] {
            let sql = format!(
                "SET standard_conforming_strings = {conforming}; SELECT {} AS {}",
                pgmux::fuzz::quote_setting_value(&value),
                pgmux::fuzz::quote_setting_name(&name)
            );
            let messages = runtime
                .block_on(client.simple_query(&sql))
                .unwrap_or_else(|e| panic!("{sql:?}: {e}"));
            let row = messages
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                })
                .expect("a row");
            proptest::prop_assert_eq!(row.get(0), Some(value.as_str()), "{}", sql);
            proptest::prop_assert_eq!(row.columns()[0].name(), name.as_str(), "{}", sql);
        }
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
