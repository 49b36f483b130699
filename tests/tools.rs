//! Real client tools through pgmux: psql and pgbench.

mod common;

use common::{MuxOptions, TestPgmux, TestPostgres};

#[tokio::test]
async fn psql_runs_queries_through_pgmux() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;
    let (ok, out, err) = common::run_psql(
        pg.bin_dir(),
        &mux.url("app", "app"),
        "SELECT 40 + 2 AS answer; BEGIN; SELECT 'in tx'; COMMIT;",
    );
    assert!(ok, "psql failed: {err}");
    assert!(out.contains("42"), "{out}");
    assert!(out.contains("in tx"), "{out}");
}

#[tokio::test]
async fn pgbench_simple_50_clients_on_pool_of_5() {
    common::pgbench_through_pgmux("simple").await;
}

#[tokio::test]
async fn pgbench_extended_50_clients_on_pool_of_5() {
    common::pgbench_through_pgmux("extended").await;
}
