//! Pool modes and session lifetimes: session and statement modes, pipelining, Flush,
//! idle_transaction_timeout, graceful shutdown.

mod common;

use std::time::Duration;

use common::raw::{Raw, bind, execute, msg, parse, sync};
use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use tokio::io::AsyncWriteExt;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn session_mode_keeps_the_server_and_resets_it() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            mode: "session",
            size: 1,
            wait_timeout: "300ms",
            ..MuxOptions::default()
        },
    )
    .await;
    let a = mux.connect("app", "app").await;
    a.batch_execute("SET statement_timeout = '77s'")
        .await
        .unwrap();
    let t: String = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, "77s", "a session-level SET sticks in session mode");

    // The only server is held for a's whole session, from its login: another login
    // waits for it and is refused when none comes.
    let err = mux
        .try_connect("app", "app", "app_pw")
        .await
        .expect_err("no server for a second session");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));

    drop(a);
    let mut got = None;
    for _ in 0..50 {
        if let Ok((b, _conn)) = mux.try_connect("app", "app", "app_pw").await {
            let row = b.query_one("SHOW statement_timeout", &[]).await.unwrap();
            got = Some(row.get::<_, String>(0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        got.as_deref(),
        Some("0"),
        "DISCARD ALL ran before the server was reused"
    );
}

#[tokio::test]
async fn statement_mode_refuses_transaction_blocks() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            mode: "statement",
            size: 1,
            ..MuxOptions::default()
        },
    )
    .await;
    let client = mux.connect("app", "app").await;
    assert_eq!(
        client
            .query_one("SELECT 9", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        9
    );
    let err = client.batch_execute("BEGIN").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{err}");
    // The server went back clean: another client uses it outside any transaction.
    let other = mux.connect("app", "app").await;
    // One simple Query is its own transaction: it starts with the statement.
    let in_tx = other
        .simple_query("SELECT now() = statement_timestamp()")
        .await
        .unwrap()
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
    assert!(in_tx);
}

#[tokio::test]
async fn pipelined_queries_on_a_small_pool() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(1).waiting("30s")).await;
    let mut tasks = Vec::new();
    for c in 0..10i32 {
        let client = mux.connect("app", "app").await;
        tasks.push(tokio::spawn(async move {
            // tokio-postgres pipelines concurrent queries on one connection.
            let queries = (0..20i32).map(|i| {
                let client = &client;
                async move {
                    let row = client
                        .query_one("SELECT $1::int * 1000 + $2::int", &[&c, &i])
                        .await
                        .unwrap();
                    assert_eq!(row.get::<_, i32>(0), c * 1000 + i);
                }
            });
            futures_util::future::join_all(queries).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn flush_without_sync_keeps_the_server() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions::sized(1)
            .waiting("300ms")
            .with_auth_method("trust"),
    )
    .await;
    let mut c = Raw::login(&mux).await;
    // Parse, Bind, Execute, Flush: results come back, no Sync yet.
    let batch = [
        parse("", "SELECT 'flushed'"),
        bind(""),
        execute(),
        msg(b'H', b""),
    ];
    c.s.write_all(&batch.concat()).await.unwrap();
    c.read_until(b"flushed").await;

    // The server is still held: another client must wait (and time out).
    let other = mux.connect("app", "app").await;
    let err = other.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));

    // Sync ends it; the server goes back and the other client gets it.
    c.s.write_all(&sync()).await.unwrap();
    c.read_until(b"Z\0\0\0\x05I").await;
    common::answers_select_1(&other).await;
}

#[tokio::test]
async fn idle_in_transaction_timeout_gives_25p03_and_frees_the_server() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            size: 1,
            wait_timeout: "10s",
            idle_transaction_timeout: "500ms",
            ..MuxOptions::default()
        },
    )
    .await;
    let (idle, conn) = mux.try_connect("app", "app", "app_pw").await.unwrap();
    idle.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Another client waits for the only server; it gets it once pgmux cuts the idle one off.
    let other = mux.connect("app", "app").await;
    let row = other.query_one("SELECT 3", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.is_closed() || err.code() == Some(&SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT),
        "{err}"
    );
    // The connection task saw the 25P03 before the close.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("connection ended");
    drop(ended);
    // Lines reach the file through pgmux's log thread: wait for it.
    let logged = || async { mux.stderr_log().contains("idle in transaction") };
    assert!(
        common::eventually(Duration::from_secs(5), logged).await,
        "pgmux logged why"
    );
}

#[tokio::test]
async fn sigterm_lets_transactions_finish_then_says_57p01() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;
    let idle = mux.connect("app", "app").await;
    let busy = mux.connect("app", "app").await;
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();

    mux.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The client inside a transaction finishes it.
    busy.batch_execute("SELECT 2; COMMIT").await.unwrap();
    // Between transactions, clients are told why the session ends.
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "{err}"
    );
    // New clients are refused.
    assert!(mux.try_connect("app", "app", "app_pw").await.is_err());
    assert!(mux.stderr_log().contains("shutting down"));
}

#[tokio::test]
async fn after_shutdown_timeout_the_rest_get_57p01() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(
        pg,
        MuxOptions {
            server_extra: "shutdown_timeout = \"500ms\"".into(),
            ..MuxOptions::default()
        },
    )
    .await;
    let stuck = mux.connect("app", "app").await;
    stuck.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let stuck = std::sync::Arc::new(stuck);
    let sleeping = stuck.clone();
    let running = tokio::spawn(async move { sleeping.simple_query("SELECT pg_sleep(60)").await });
    let admin = pg.superuser().await;
    let busy = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'";
    let started = eventually(Duration::from_secs(10), || async {
        admin.query_one(busy, &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    assert!(started, "the query runs on the server");
    mux.signal("TERM");
    // The transaction never ends by itself; pgmux ends it after the grace period. The
    // query in flight is answered 57P01 by its session (woken by the kill in the middle
    // of a query), not merely cut off when the process exits.
    assert!(mux.wait_exit(Duration::from_secs(10)).await, "pgmux exited");
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    let log = mux.stderr_log();
    assert!(log.contains("shutdown_timeout is over"), "{log}");
    assert!(log.contains("pgmux stopped"), "{log}");
}

#[tokio::test]
async fn idle_server_connections_close_after_idle_timeout() {
    let pg = TestPostgres::start().await;
    let mux = TestPgmux::start(
        &pg,
        MuxOptions {
            size: 3,
            pool_extra: "idle_timeout = \"1s\"".into(),
            ..MuxOptions::default()
        },
    )
    .await;
    let client = mux.connect("app", "app").await;
    client.query_one("SELECT 1", &[]).await.unwrap();
    let su = pg.superuser().await;
    let count = || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    assert_eq!(count().await, 1);
    let mut closed = false;
    for _ in 0..50 {
        if count().await == 0 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        closed,
        "the idle server connection was closed after idle_timeout"
    );
    // And a new one opens on demand.
    assert_eq!(
        client
            .query_one("SELECT 4", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        4
    );
}

#[tokio::test]
async fn min_size_warms_the_pool_up() {
    let pg = TestPostgres::start().await;
    let mux = TestPgmux::start(
        &pg,
        MuxOptions {
            size: 4,
            min_size: 3,
            ..MuxOptions::default()
        },
    )
    .await;
    // The pool exists from the first login; upkeep then opens up to min_size.
    let client = mux.connect("app", "app").await;
    let su = pg.superuser().await;
    let mut warm = 0;
    for _ in 0..50 {
        warm = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if warm == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(warm, 3);
    common::answers_select_1(&client).await;
}
