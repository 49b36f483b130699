//! Several worker threads, one set of limits (issue 14), against a real PostgreSQL: with
//! `worker_threads` above 1 (sessions spread over threads, each staying on its own), a pool
//! of size N never has more than N servers, its waiters are served in the order they came
//! whatever thread runs them, `max_client_conn` is exact, `"auto"` starts one thread per
//! core, and a shutdown drains the sessions of every thread.

mod common;

use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use serde_json::Value as Json;
use tokio_postgres::error::SqlState;

/// A bound against hangs, never a measured time.
const LIMIT: Duration = Duration::from_secs(30);

/// Two worker threads, a pool of `size`, long waits, the admin port for `/pools`.
fn two_threads(size: u32) -> MuxOptions {
    MuxOptions {
        server_extra: "worker_threads = 2".into(),
        admin: Some(String::new()),
        ..MuxOptions::sized(size).waiting("60s")
    }
}

/// The `/pools` entry of app/app.
async fn app_pool(mux: &TestPgmux) -> Json {
    let pools = mux.admin_get("/pools").await.json();
    pools
        .as_array()
        .and_then(|pools| {
            pools
                .iter()
                .find(|p| p["database"] == "app" && p["user"] == "app")
                .cloned()
        })
        .unwrap_or_else(|| panic!("no pool app/app in {pools}"))
}

/// Until `/pools` shows `n` clients waiting for a server of app/app.
async fn until_waiting(mux: &TestPgmux, n: u64) {
    let seen = eventually(LIMIT, || async { app_pool(mux).await["waiting"] == n }).await;
    assert!(seen, "{n} waiting: {}", app_pool(mux).await);
}

/// Server connections of the role `app` that PostgreSQL has now.
async fn app_backends(su: &tokio_postgres::Client) -> i64 {
    su.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Names of pgmux's threads that are worker threads beside the main one.
fn worker_threads(mux: &TestPgmux) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", mux.pid()))
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.starts_with("pgmux-worker-"))
        })
        .count()
}

#[tokio::test]
async fn a_pool_of_three_never_lends_more_than_three_servers_across_threads() {
    // Its own cluster, so that pg_stat_activity shows only this test's servers.
    let pg = TestPostgres::start().await;
    let mux = TestPgmux::start(&pg, two_threads(3)).await;
    assert_eq!(
        worker_threads(&mux),
        1,
        "worker_threads = 2: the main one and one more"
    );
    let su = pg.superuser().await;
    // Eight clients, which pgmux spreads over both threads (each to the one with fewer
    // sessions), each opening a transaction: three get a server, five wait.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..8 {
        let client = mux.connect("app", "app").await;
        let done = done_tx.clone();
        tokio::spawn(async move {
            client.batch_execute("BEGIN; SELECT 1").await.unwrap();
            done.send((i, client)).unwrap();
        });
    }
    let mut holding = Vec::new();
    for _ in 0..3 {
        holding.push(done_rx.recv().await.unwrap());
    }
    until_waiting(&mux, 5).await;
    assert_eq!(app_backends(&su).await, 3);
    // Each commit hands its server to one waiter, which opens its transaction on it.
    let mut served = 3;
    while let Some((_, client)) = holding.pop() {
        client.batch_execute("COMMIT").await.unwrap();
        if served < 8 {
            holding.push(done_rx.recv().await.unwrap());
            served += 1;
            until_waiting(&mux, 8 - served).await;
        }
        assert!(
            app_backends(&su).await <= 3,
            "more servers than the pool's size"
        );
        let pool = app_pool(&mux).await;
        let open: u64 = ["active", "idle", "connecting"]
            .iter()
            .map(|k| pool[k].as_u64().unwrap())
            .sum();
        assert!(open <= 3, "{pool}");
    }
    assert_eq!(served, 8);
    assert_eq!(app_backends(&su).await, 3);
}

#[tokio::test]
async fn waiters_on_different_threads_are_served_in_the_order_they_came() {
    let pg = TestPostgres::start().await;
    let su = pg.superuser_on("app").await;
    su.batch_execute("CREATE SEQUENCE served; GRANT USAGE ON SEQUENCE served TO app")
        .await
        .unwrap();
    let mux = TestPgmux::start(&pg, two_threads(1)).await;
    // The only server, held in a transaction.
    let holder = mux.connect("app", "app").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Six clients, alternating between the two threads (pgmux gives each new session to
    // the thread with fewer), queue one after the other: each is in the queue before the
    // next asks.
    let mut waiters = Vec::new();
    for i in 0..6u64 {
        let client = mux.connect("app", "app").await;
        // One message, so one checkout (query_one would prepare first, and its Bind
        // would queue again behind the others).
        waiters.push(tokio::spawn(async move {
            let messages = client
                .simple_query("SELECT nextval('served')")
                .await
                .unwrap();
            messages
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                    _ => None,
                })
                .expect("a row")
                .parse::<i64>()
                .unwrap()
        }));
        until_waiting(&mux, i + 1).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    // The one server goes from waiter to waiter: the sequence numbers their turns.
    let mut turns = Vec::new();
    for w in waiters {
        turns.push(w.await.unwrap());
    }
    assert_eq!(turns, [1, 2, 3, 4, 5, 6], "first come, first served");
}

#[tokio::test]
async fn max_client_conn_is_exact_across_threads() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            max_client_conn: 4,
            ..two_threads(2)
        },
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = mux.connect("app", "app").await;
        common::answers_select_1(&client).await;
        clients.push(client);
    }
    // Many at once, from both threads' point of view: every one is refused.
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let mux_port = mux.port;
        attempts.push(tokio::spawn(async move {
            let mut config = tokio_postgres::Config::new();
            config
                .host("127.0.0.1")
                .port(mux_port)
                .user("app")
                .password(common::password_for("app"))
                .dbname("app")
                .connect_timeout(LIMIT);
            config.connect(tokio_postgres::NoTls).await.map(|_| ())
        }));
    }
    for attempt in attempts {
        let err = attempt.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    }
    // One leaves: exactly one more gets in.
    drop(clients.pop());
    // (Refused clients count until their sessions end: the freed slot may take a moment.)
    let mut admitted = None;
    for _ in 0..300 {
        match mux
            .try_connect("app", "app", common::password_for("app"))
            .await
        {
            Ok(client) => {
                admitted = Some(client);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(
        admitted.is_some(),
        "a slot freed by a client that left is given again"
    );
    let err = mux
        .try_connect("app", "app", common::password_for("app"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    for client in &clients {
        common::answers_select_1(client).await;
    }
}

#[tokio::test]
async fn auto_runs_one_thread_per_core_and_a_shutdown_drains_every_thread() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(
        pg,
        MuxOptions {
            server_extra: "worker_threads = \"auto\"".into(),
            ..MuxOptions::sized(4)
        },
    )
    .await;
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        worker_threads(&mux),
        cores - 1,
        "one per core, the main thread one of them"
    );
    // One client in a transaction on each thread (each new session goes to the thread
    // with the fewest), and an idle one.
    let mut busy = Vec::new();
    for _ in 0..cores {
        let client = mux.connect("app", "app").await;
        client.batch_execute("BEGIN; SELECT 1").await.unwrap();
        busy.push(client);
    }
    mux.signal("TERM");
    let refused = eventually(LIMIT, || async {
        mux.try_connect("app", "app", common::password_for("app"))
            .await
            .is_err()
    })
    .await;
    assert!(refused, "the listeners close on SIGTERM");
    // Every thread's transaction finishes; then pgmux ends the sessions and exits.
    for client in &busy {
        client.batch_execute("SELECT 2; COMMIT").await.unwrap();
    }
    assert!(mux.wait_exit(LIMIT).await, "pgmux exited after the drain");
    let log = mux.stderr_log();
    assert!(log.contains("pgmux stopped"), "{log}");
    assert!(!log.contains("shutdown_timeout is over"), "{log}");
}
