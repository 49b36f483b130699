//! Draining for rolling deploys (`server.drain_delay`, `server.reuse_port`): on SIGTERM
//! `/ready` fails at once while pgmux goes on serving and accepting; then every client is
//! told 57P01 right after its transaction, and pgmux exits. And a rolling restart of three
//! pgmux processes sharing one port fails no transaction.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Error};

/// A bound against hangs, never a measure.
const PATIENCE: Duration = Duration::from_secs(60);

/// A client of pgmux on `port`, and its connection task, which ends with what ended the
/// connection (pgmux's FATAL error, if it sent one).
async fn connect(port: u16) -> Result<(Client, JoinHandle<Result<(), Error>>), Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("app")
        .password("app_pw")
        .dbname("app")
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    Ok((client, tokio::spawn(connection)))
}

/// Waits for a connection task to end and returns the error pgmux closed it with.
async fn closed_with(connection: JoinHandle<Result<(), Error>>) -> Error {
    let ended = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("pgmux closes the connection")
        .expect("the connection task ran");
    ended.expect_err("pgmux said why it closed the connection")
}

/// Asserts that `err` is pgmux's 57P01 with its hint to reconnect.
fn assert_told_to_reconnect(err: &Error) {
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    let hint = err.as_db_error().and_then(|e| e.hint()).unwrap_or_default();
    assert!(hint.contains("reconnect"), "hint: {hint}");
}

/// `/ready`'s status and body.
async fn ready(mux: &TestPgmux) -> (u16, serde_json::Value) {
    let http = mux.admin_get("/ready").await;
    (http.status, http.json())
}

/// The value of the unlabelled gauge `name` in `/metrics`.
async fn gauge(mux: &TestPgmux, name: &str) -> String {
    let body = mux.admin_get("/metrics").await.body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
        .to_owned()
}

fn draining(drain_delay: &str) -> MuxOptions {
    MuxOptions {
        server_extra: format!("drain_delay = \"{drain_delay}\""),
        admin: Some(String::new()),
        ..MuxOptions::default()
    }
}

async fn fresh_table(pg: &TestPostgres, table: &str) {
    let su = pg.superuser().await;
    su.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table}(client int, n int); \
         GRANT ALL ON {table} TO app"
    ))
    .await
    .unwrap();
}

async fn rows(pg: &TestPostgres, table: &str) -> i64 {
    let su = pg.superuser().await;
    su.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn sigterm_drains_and_a_second_signal_ends_the_delay() {
    let pg = TestPostgres::shared().await;
    fresh_table(pg, "drain_hurry").await;
    let mut mux = TestPgmux::start(pg, draining("1h")).await;
    assert_eq!(ready(&mux).await.0, 200);
    assert_eq!(gauge(&mux, "pgmux_draining").await, "0");
    let (busy, busy_conn) = connect(mux.port).await.unwrap();
    let (idle, idle_conn) = connect(mux.port).await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO drain_hurry VALUES (1, 1)")
        .await
        .unwrap();

    mux.signal("TERM");
    // /ready fails at once, saying why...
    let failing = || async { ready(&mux).await.0 == 503 };
    assert!(eventually(PATIENCE, failing).await, "/ready answers 503");
    let (_, body) = ready(&mux).await;
    assert_eq!(body["draining"], true, "{body}");
    let reason = body["reasons"][0].as_str().unwrap_or_default();
    assert!(reason.starts_with("draining"), "{body}");
    assert_eq!(gauge(&mux, "pgmux_draining").await, "1");
    assert_eq!(gauge(&mux, "pgmux_accepting").await, "1");
    // ... while pgmux goes on serving everyone, and accepting new clients.
    let (late, _late_conn) = connect(mux.port).await.expect("accepted while draining");
    common::answers_select_1(&late).await;
    common::answers_select_1(&idle).await;
    busy.batch_execute("INSERT INTO drain_hurry VALUES (1, 2)")
        .await
        .unwrap();

    // A second signal ends the delay: idle clients are told 57P01 at once, new ones refused.
    mux.signal("TERM");
    assert_told_to_reconnect(&closed_with(idle_conn).await);
    let refused = || async { connect(mux.port).await.is_err() };
    assert!(eventually(PATIENCE, refused).await, "new clients refused");
    assert_eq!(gauge(&mux, "pgmux_accepting").await, "0");
    assert_eq!(ready(&mux).await.0, 503);
    // The transaction finishes, then its client is told 57P01 too.
    busy.batch_execute("INSERT INTO drain_hurry VALUES (1, 3); COMMIT")
        .await
        .unwrap();
    assert_told_to_reconnect(&closed_with(busy_conn).await);
    assert!(mux.wait_exit(PATIENCE).await, "pgmux exited");
    assert_eq!(rows(pg, "drain_hurry").await, 3);
    let log = mux.stderr_log();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("ending the drain now"), "{log}");
    assert!(log.contains("pgmux stopped"), "{log}");
}

#[tokio::test]
async fn after_drain_delay_clients_end_after_their_transaction() {
    let pg = TestPostgres::shared().await;
    fresh_table(pg, "drain_delay").await;
    let mut mux = TestPgmux::start(pg, draining("1s")).await;
    let (busy, busy_conn) = connect(mux.port).await.unwrap();
    let (_idle, idle_conn) = connect(mux.port).await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO drain_delay VALUES (1, 1)")
        .await
        .unwrap();

    mux.signal("TERM");
    let failing = || async { ready(&mux).await.0 == 503 };
    assert!(eventually(PATIENCE, failing).await, "/ready answers 503");
    // Once drain_delay is over, the idle client is told 57P01; the busy one finishes first.
    assert_told_to_reconnect(&closed_with(idle_conn).await);
    busy.batch_execute("INSERT INTO drain_delay VALUES (1, 2); COMMIT")
        .await
        .unwrap();
    assert_told_to_reconnect(&closed_with(busy_conn).await);
    assert!(mux.wait_exit(PATIENCE).await, "pgmux exited");
    assert_eq!(rows(pg, "drain_delay").await, 2);
}

/// What the clients of the rolling restart counted.
#[derive(Default)]
struct Counts {
    /// Transactions committed.
    committed: AtomicU64,
    /// Connections made (the first of each client included).
    connects: AtomicU64,
    /// Connection attempts that failed (refused or reset before login ended).
    connect_errors: AtomicU64,
    /// The distinct errors of those attempts, to tell a reset from a timeout.
    connect_error_kinds: Mutex<BTreeSet<String>>,
    /// A connection found closed (57P01) between transactions, before the next began.
    closed_between: AtomicU64,
    /// `BEGIN` answered with 57P01 (or a closed connection): pgmux ended the session
    /// between transactions just as the client began the next; nothing of it ran.
    refused_at_begin: AtomicU64,
    /// Transactions that began and did not commit. Must stay 0.
    failed: AtomicU64,
}

/// How one attempt at a transaction ended.
enum Outcome {
    Committed,
    /// Nothing ran: reconnect and try again.
    NotBegun,
    Failed(Error),
}

/// BEGIN, an INSERT and a SELECT with parameters (extended protocol), COMMIT.
async fn transaction(client: &Client, id: i32, n: i32) -> Outcome {
    if let Err(e) = client.batch_execute("BEGIN").await {
        return if e.code() == Some(&SqlState::ADMIN_SHUTDOWN) || e.is_closed() {
            Outcome::NotBegun
        } else {
            Outcome::Failed(e)
        };
    }
    let work = async {
        client
            .execute("INSERT INTO drain_rolling VALUES ($1, $2)", &[&id, &n])
            .await?;
        client
            .query_one(
                "SELECT count(*) FROM drain_rolling WHERE client = $1",
                &[&id],
            )
            .await?;
        client.batch_execute("COMMIT").await
    };
    match work.await {
        Ok(()) => Outcome::Committed,
        Err(e) => Outcome::Failed(e),
    }
}

/// A client that runs transactions in a loop until `done`, and reconnects when pgmux ends
/// its session, or after every transaction with `per_transaction` (as `pgbench -C`); what
/// it sees goes to `counts`, the failures' messages to the return value.
async fn client_loop(
    port: u16,
    id: i32,
    per_transaction: bool,
    done: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut n = 0;
    while !done.load(Relaxed) {
        let client = match connect(port).await {
            Ok((client, _connection)) => client,
            Err(e) => {
                counts.connect_errors.fetch_add(1, Relaxed);
                let kind = format!("{e}: {:?}", std::error::Error::source(&e));
                counts.connect_error_kinds.lock().unwrap().insert(kind);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        counts.connects.fetch_add(1, Relaxed);
        while !done.load(Relaxed) {
            if client.is_closed() {
                counts.closed_between.fetch_add(1, Relaxed);
                break;
            }
            n += 1;
            match transaction(&client, id, n).await {
                Outcome::Committed => {
                    counts.committed.fetch_add(1, Relaxed);
                    if per_transaction {
                        break;
                    }
                }
                Outcome::NotBegun => {
                    counts.refused_at_begin.fetch_add(1, Relaxed);
                    break;
                }
                Outcome::Failed(e) => {
                    counts.failed.fetch_add(1, Relaxed);
                    failures.push(format!("client {id}, transaction {n}: {e:?}"));
                    break;
                }
            }
        }
    }
    failures
}

/// Three pgmux processes on one port (`reuse_port`), clients running transactions through
/// them, and each process in turn stopped with SIGTERM and started again: no transaction
/// fails, and every committed one is in the table.
///
/// Without a load balancer the kernel, not `/ready`, picks the process for a new
/// connection; one that reaches a process as it closes its listener is reset unless
/// `net.ipv4.tcp_migrate_req = 1` (left as the host has it: such a reset is a failed
/// connect, counted apart, never a failed transaction).
#[tokio::test]
async fn rolling_restart_of_three_processes_on_one_port_fails_no_transaction() {
    // Clients that keep their connection, and clients that connect for each transaction
    // (these reach every process's accept queue all along the restarts).
    const CLIENTS: i32 = 6;
    const PER_TRANSACTION: i32 = 2;
    let pg = TestPostgres::shared().await;
    fresh_table(pg, "drain_rolling").await;
    let opts = MuxOptions {
        size: 3,
        wait_timeout: "30s",
        // Cheap logins: the per-transaction clients log in all the time.
        auth_method: "trust",
        server_extra: "reuse_port = true\ndrain_delay = \"1s\"".into(),
        ..MuxOptions::default()
    };
    let port = common::free_port();
    let mut muxes = Vec::new();
    for _ in 0..3 {
        muxes.push(TestPgmux::start_on(pg, opts.clone(), port).await);
    }
    let done = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let clients: Vec<_> = (0..CLIENTS + PER_TRANSACTION)
        .map(|id| {
            let per_transaction = id >= CLIENTS;
            let (done, counts) = (done.clone(), counts.clone());
            tokio::spawn(client_loop(port, id, per_transaction, done, counts))
        })
        .collect();
    let progress = |at_least: u64| {
        let counts = counts.clone();
        move || {
            let counts = counts.clone();
            async move { counts.committed.load(Relaxed) >= at_least }
        }
    };
    assert!(
        eventually(PATIENCE, progress(300)).await,
        "transactions run"
    );

    for (i, slot) in muxes.iter_mut().enumerate() {
        let before = counts.committed.load(Relaxed);
        slot.signal("TERM");
        assert!(
            slot.wait_exit(PATIENCE).await,
            "pgmux {i} exited after SIGTERM"
        );
        let log = slot.stderr_log();
        assert!(log.contains("pgmux stopped"), "{log}");
        *slot = TestPgmux::start_on(pg, opts.clone(), port).await;
        // The clients go on through the restart, and after it.
        assert!(
            eventually(PATIENCE, progress(before + 300)).await,
            "transactions go on after restarting pgmux {i}"
        );
    }
    done.store(true, Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.expect("client task"));
    }
    let c = &counts;
    let committed = c.committed.load(Relaxed);
    eprintln!(
        "rolling restart of 3 processes, {CLIENTS} clients + {PER_TRANSACTION} connecting for \
         each transaction: {committed} transactions committed, \
         {} failed; {} connects, {} failed connects, {} sessions closed between transactions, \
         {} BEGINs answered 57P01 (nothing ran; retried on a new connection); \
         connect errors: {:?}",
        c.failed.load(Relaxed),
        c.connects.load(Relaxed),
        c.connect_errors.load(Relaxed),
        c.closed_between.load(Relaxed),
        c.refused_at_begin.load(Relaxed),
        c.connect_error_kinds.lock().unwrap(),
    );
    assert!(
        failures.is_empty(),
        "failed transactions:\n{}",
        failures.join("\n")
    );
    assert_eq!(c.failed.load(Relaxed), 0);
    // Every commit the clients saw is there, and nothing else.
    assert_eq!(rows(pg, "drain_rolling").await, committed as i64);
    // Each restart sent the draining process's clients elsewhere.
    assert!(
        c.connects.load(Relaxed) > CLIENTS as u64,
        "clients reconnected"
    );
}

/// Without `reuse_port`, a second pgmux cannot take a port in use; with it on both, it can.
#[tokio::test]
async fn reuse_port_lets_processes_share_a_port() {
    let pg = TestPostgres::shared().await;
    let shared = MuxOptions {
        server_extra: "reuse_port = true".into(),
        ..MuxOptions::default()
    };
    let port = common::free_port();
    let first = TestPgmux::start_on(pg, shared.clone(), port).await;
    let second = TestPgmux::start_on(pg, shared, port).await;
    for mux in [&first, &second] {
        assert_eq!(mux.port, port);
        mux.still_serving().await;
    }
    let config = tempfile::NamedTempFile::new().unwrap();
    let alone = TestPgmux::config_toml(pg, &MuxOptions::default(), port);
    std::fs::write(config.path(), alone).unwrap();
    let mut alone = std::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .arg("--config")
        .arg(config.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgmux starts");
    let exited = || {
        let exited = matches!(alone.try_wait(), Ok(Some(_)));
        async move { exited }
    };
    let refused = eventually(PATIENCE, exited).await;
    if !refused {
        let _ = alone.kill();
    }
    let out = alone.wait_with_output().expect("pgmux reaped");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        refused,
        "pgmux without reuse_port took a shared port:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
}
