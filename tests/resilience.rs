//! Failures around pgmux: the upstream restarts or goes away, a server connection dies
//! under a client. Clients get clear errors and recover without restarting pgmux.

mod common;

use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn postgres_restart_under_pgmux_clients_recover() {
    let pg = TestPostgres::start().await;
    let mux = TestPgmux::start(&pg, MuxOptions::default()).await;
    let client = mux.connect("app", "app").await;
    common::answers_select_1(&client).await;

    pg.stop().await;
    // While it is down: a clear 08006 naming the upstream, quickly, not a hang.
    let started = std::time::Instant::now();
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("an ErrorResponse, not a dropped socket: {err:?}"));
    // 08006 once PostgreSQL is gone; 57P03 (PostgreSQL's own "shutting down", kept as it
    // is) when pgmux's last attempt reached it while it was stopping: both clear.
    let clear = [SqlState::CONNECTION_FAILURE, SqlState::CANNOT_CONNECT_NOW];
    assert!(clear.contains(db.code()), "{db:?}");
    assert!(db.message().contains("127.0.0.1"), "{}", db.message());

    pg.restart().await;
    // The same client session recovers once PostgreSQL is back.
    let mut recovered = false;
    for _ in 0..100 {
        match client.query_one("SELECT 2", &[]).await {
            Ok(row) => {
                assert_eq!(row.get::<_, i32>(0), 2);
                recovered = true;
                break;
            }
            Err(e) => assert!(e.code().is_some_and(|c| clear.contains(c)), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "client recovered without restarting pgmux");
    // New clients too.
    let fresh = mux.connect("app", "app").await;
    assert_eq!(
        fresh
            .query_one("SELECT 3", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );
}

#[tokio::test]
async fn server_killed_mid_transaction_gives_08006_and_is_replaced() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(1)).await;
    let victim = mux.connect("app", "app").await;
    victim.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    let su = pg.superuser().await;
    su.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();

    let err = victim.simple_query("SELECT 1").await.unwrap_err();
    if let Some(db) = err.as_db_error() {
        // PostgreSQL's own FATAL may arrive first; otherwise pgmux's 08006.
        assert!(
            [SqlState::ADMIN_SHUTDOWN, SqlState::CONNECTION_FAILURE].contains(db.code()),
            "{db:?}"
        );
    }
    // The pool replaced the server: another client works on a new one.
    let other = mux.connect("app", "app").await;
    let new_pid: i32 = other
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid, new_pid);
}

#[tokio::test]
async fn upstream_down_from_the_start_gives_08006_at_login() {
    let pg = TestPostgres::start().await;
    let mux = TestPgmux::start(&pg, MuxOptions::default()).await;
    pg.stop().await;
    let started = std::time::Instant::now();
    let err = mux
        .try_connect("app", "app", "app_pw")
        .await
        .expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(4));
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    assert!(
        db.message().contains("cannot connect to upstream"),
        "{}",
        db.message()
    );
}
