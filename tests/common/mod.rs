//! The integration test harness: a throwaway PostgreSQL (`TestPostgres`), the pgmux binary
//! in front of it (`TestPgmux`), a fault-injecting proxy to put between them
//! (`FaultProxy`), and helpers for psql, pgbench and memory checks.
//!
//! Each tests/*.rs is its own crate that includes this module with `mod common;`, and
//! each uses a different part of it.
// Every test binary compiles this whole module but uses only some helpers, so the rest
// would warn as dead code (or as unused re-exports) in that binary.
#![allow(dead_code, unused_imports)]

mod faultproxy;
mod http;
mod pgmux;
mod postgres;
pub mod raw;
pub mod tls;
pub mod watchdog;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use faultproxy::{FaultProxy, Links};
pub use http::{Http, request as http_request};
pub use pgmux::{MuxOptions, TestPgmux};
pub use postgres::{
    PgSsl, SUPERUSER, SUPERUSER_PASSWORD, TestPostgres, running_as_root, server_bin_dir,
};

/// The password of each test role, as created by `TestPostgres` and configured in pgmux;
/// empty for any other user.
pub fn password_for(user: &str) -> &'static str {
    match user {
        "app" => "app_pw",
        "other" => "other_pw",
        SUPERUSER => SUPERUSER_PASSWORD,
        _ => "",
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).
/// Callers retry when someone else takes it before they bind.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Runs the pgmux binary with `args` (no `PGMUX_CONFIG` from the environment) and returns
/// (exit code, stdout, stderr). Integration tests only, as [`TestPgmux`].
pub fn pgmux_cli(args: &[&str]) -> (i32, String, String) {
    let Some(exe) = option_env!("CARGO_BIN_EXE_pgmux") else {
        panic!("no pgmux binary: cargo builds it for integration tests only");
    };
    let out = Command::new(exe)
        .args(args)
        .env_remove("PGMUX_CONFIG")
        .output()
        .expect("pgmux runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `sql` with psql against `url` (stop on the first error, no psqlrc).
/// Returns (success, stdout, stderr).
pub fn run_psql(bin_dir: &Path, url: &str, sql: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = client_tool(bin_dir, "psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("psql did not start: {e}"));
    // Statements on stdin, not -c: psql then runs and prints them one by one.
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(sql.as_bytes())
        .expect("sql written to psql");
    drop(stdin);
    let out = child.wait_with_output().expect("psql finished");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs pgbench with `args` (put the connection URL last, as the database name).
pub fn run_pgbench(bin_dir: &Path, args: &[&str]) -> Output {
    client_tool(bin_dir, "pgbench")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("pgbench did not start: {e}"))
}

/// The resident set size of a process in KiB (VmRSS in /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// A client program from `bin_dir`, else from PATH, with the libpq environment cleared
/// so that only the URL decides where it connects.
fn client_tool(bin_dir: &Path, name: &str) -> Command {
    let in_bin_dir = bin_dir.join(name);
    let program: PathBuf = if in_bin_dir.is_file() {
        in_bin_dir
    } else {
        PathBuf::from(name)
    };
    let mut cmd = Command::new(program);
    clean_pg_env(&mut cmd);
    cmd.env("PGCONNECT_TIMEOUT", "10");
    cmd
}

/// Removes the libpq variables a developer's shell may set (PGHOST, PGPASSWORD, ...).
fn clean_pg_env(cmd: &mut Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGDATA",
        "PGSSLMODE",
        "PGREQUIRESSL",
        "PGTARGETSESSIONATTRS",
    ] {
        cmd.env_remove(var);
    }
}

/// The last `n` lines of `text`.
fn log_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `pgbench -M protocol` with 50 clients on a pool of 5 through pgmux, on a database of
/// its own: asserts 2000/2000 transactions and none failed.
pub async fn pgbench_through_pgmux(protocol: &str) {
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
    let init = run_pgbench(pg.bin_dir(), &["-i", "-q", "-s", "1", &url]);
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = run_pgbench(
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

/// Polls `check` every 100 ms until it says true or `limit` passes; returns whether it did.
/// For outcomes that take effect asynchronously (a backend that exits, a connection that
/// closes), asserted by what is observed, never by how long it took.
pub async fn eventually<F, Fut>(limit: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// What [`copy_round_trip`] moved: rows copied in, and lines and bytes copied out.
#[derive(Debug, PartialEq, Eq)]
pub struct Copied {
    pub rows_in: u64,
    pub lines_out: usize,
    pub bytes_out: usize,
}

/// Makes table `table(id int, note text)` afresh, copies `rows` rows into it with
/// `COPY FROM STDIN` (in chunks of about 64 KiB), then reads it back with
/// `COPY TO STDOUT`.
pub async fn copy_round_trip(client: &tokio_postgres::Client, table: &str, rows: u32) -> Copied {
    use futures_util::{SinkExt, StreamExt, pin_mut};
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table}(id int, note text)"
        ))
        .await
        .unwrap();
    let sink = client
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..rows {
        chunk.push_str(&format!("{i}\trow number {i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    let rows_in = sink.finish().await.unwrap();

    let stream = client
        .copy_out(&format!("COPY {table} TO STDOUT"))
        .await
        .unwrap();
    pin_mut!(stream);
    let (mut lines_out, mut bytes_out) = (0, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        lines_out += chunk.iter().filter(|&&b| b == b'\n').count();
        bytes_out += chunk.len();
    }
    Copied {
        rows_in,
        lines_out,
        bytes_out,
    }
}

/// Asserts that `SELECT 1` on `client` answers 1.
pub async fn answers_select_1(client: &tokio_postgres::Client) {
    let row = client.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// The value of the first counter, gauge or untyped sample named `name` with these labels
/// (and any others) in a parsed `/metrics`.
pub fn metric_sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    metric_values(scrape, name, labels).next()
}

/// Every counter, gauge or untyped value named `name` with these labels (and any others).
pub fn metric_values<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .filter(move |s| s.metric == name)
        .filter(move |s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .filter_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// `/metrics` text, parsed.
pub fn parse_metrics(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("metrics parse")
}

/// The rows of a simple query.
pub fn rows(
    messages: &[tokio_postgres::SimpleQueryMessage],
) -> Vec<&tokio_postgres::SimpleQueryRow> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .collect()
}

/// The value of `column` in the row of the console's SHOW `show` whose `key` column is
/// `value`.
pub async fn show_lookup(
    console: &tokio_postgres::Client,
    show: &str,
    key: (&str, &str),
    column: &str,
) -> Option<String> {
    let messages = console.simple_query(&format!("SHOW {show}")).await.unwrap();
    rows(&messages)
        .into_iter()
        .find(|r| r.get(key.0) == Some(key.1))
        .and_then(|r| r.get(column).map(str::to_owned))
}
