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

async fn pgbench_through_pgmux(protocol: &str) {
    let pg = TestPostgres::shared().await;
    let scale_db = format!("bench_{protocol}");
    let su = pg.superuser().await;
    su.batch_execute(&format!("DROP DATABASE IF EXISTS {scale_db}"))
        .await
        .unwrap();
    su.batch_execute(&format!("CREATE DATABASE {scale_db} OWNER app"))
        .await
        .unwrap();
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            size: 5,
            wait_timeout: "60s",
            extra: format!(
                "[databases.{scale_db}]\nhost = \"127.0.0.1\"\nport = {}\n",
                pg.port
            ),
            ..MuxOptions::default()
        },
    )
    .await;
    let url = mux.url(&scale_db, "app");
    let init = common::run_pgbench(pg.bin_dir(), &["-i", "-q", "-s", "1", &url]);
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = common::run_pgbench(
        pg.bin_dir(),
        &[
            "-c", "50", "-j", "2", "-t", "40", "-M", protocol, "-n", &url,
        ],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "pgbench failed: {stderr}\n{stdout}");
    assert!(
        stdout.contains("number of transactions actually processed: 2000/2000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
}

#[tokio::test]
async fn pgbench_simple_50_clients_on_pool_of_5() {
    pgbench_through_pgmux("simple").await;
}

#[tokio::test]
async fn pgbench_extended_50_clients_on_pool_of_5() {
    pgbench_through_pgmux("extended").await;
}
