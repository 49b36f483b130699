//! Transaction pooling end to end: real PostgreSQL, real drivers, pools smaller than the
//! number of clients.

mod common;

use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn simple_and_extended_queries() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;
    let client = mux.connect("app", "app").await;

    let rows = client
        .simple_query("SELECT 1 AS one, 'two' AS two")
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    assert_eq!(row.get("one"), Some("1"));
    assert_eq!(row.get("two"), Some("two"));

    let row = client
        .query_one("SELECT $1::int + 1, $2::text", &[&41i32, &"hello"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "hello");

    // An error inside the extended protocol leaves the session usable.
    let err = client.query_one("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let row = client.query_one("SELECT 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[tokio::test]
async fn two_hundred_clients_share_a_pool_of_two() {
    // Its own cluster, so that counting server connections sees only this test's.
    let pg = &TestPostgres::start().await;
    // Several worker threads (the default is one): sessions, the pool and its servers are
    // shared between threads here.
    let opts = MuxOptions {
        server_extra: "worker_threads = 4".into(),
        ..MuxOptions::sized(2).waiting("60s")
    };
    let mux = TestPgmux::start(pg, opts).await;
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let client = mux.connect("app", "app").await;
        tasks.push(tokio::spawn(async move {
            for j in 0..5i32 {
                let tx_sum: i32 = {
                    client.batch_execute("BEGIN").await.unwrap();
                    let row = client
                        .query_one("SELECT $1::int + $2::int", &[&i, &j])
                        .await
                        .unwrap();
                    client.batch_execute("COMMIT").await.unwrap();
                    row.get(0)
                };
                assert_eq!(tx_sum, i + j);
            }
        }));
    }
    let workers = std::fs::read_dir(format!("/proc/{}/task", mux.pid()))
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.starts_with("pgmux-worker-"))
        })
        .count();
    // The main thread is the first of the four (src/workers.rs).
    assert_eq!(
        workers, 3,
        "worker_threads = 4 runs three more worker threads"
    );
    for t in tasks {
        t.await.unwrap();
    }
    // Never more than two server connections were used.
    let su = pg.superuser().await;
    let row = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, i64>(0) <= 2,
        "at most pool size server connections"
    );
}

#[tokio::test]
async fn wait_timeout_gives_53300_and_the_session_stays_usable() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(1).waiting("300ms")).await;
    let holder = mux.connect("app", "app").await;
    let waiter = mux.connect("app", "app").await;

    holder.batch_execute("BEGIN").await.unwrap(); // pins the only server
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS);
    assert!(
        db.message().starts_with("pgmux: pool app/app"),
        "{}",
        db.message()
    );
    assert!(
        db.message().contains("size 1, 1 in use"),
        "{}",
        db.message()
    );
    assert!(
        db.hint().unwrap_or_default().contains("size"),
        "{:?}",
        db.hint()
    );

    // The extended protocol gets the same error and the same recovery.
    let err = waiter
        .query_one("SELECT $1::int", &[&1i32])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));

    holder.batch_execute("COMMIT").await.unwrap();
    let row = waiter.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1); // same connection, no reconnect
}

#[tokio::test]
async fn session_state_inside_a_transaction_does_not_leak() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(1)).await;
    let a = mux.connect("app", "app").await;
    let b = mux.connect("app", "app").await;

    a.batch_execute(
        "BEGIN; SET LOCAL statement_timeout = '1234s'; \
         CREATE TEMP TABLE leak_check(x int) ON COMMIT DROP; INSERT INTO leak_check VALUES (1)",
    )
    .await
    .unwrap();
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute("COMMIT").await.unwrap();

    // b gets the same (only) server connection, and sees none of it.
    let pid_b: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid_a, pid_b, "pool of one: same server connection");
    let timeout: String = b
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "0");
    let err = b
        .simple_query("SELECT * FROM leak_check")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
}

#[tokio::test]
async fn client_killed_mid_transaction_commits_nothing() {
    let pg = TestPostgres::shared().await;
    let su = pg.superuser().await;
    su.batch_execute(
        "CREATE TABLE IF NOT EXISTS killed_tx(note text); GRANT ALL ON killed_tx TO app",
    )
    .await
    .unwrap();
    let mux = TestPgmux::start(pg, MuxOptions::sized(1)).await;
    {
        let (client, conn) = mux.try_connect("app", "app", "app_pw").await.unwrap();
        client
            .batch_execute("BEGIN; INSERT INTO killed_tx VALUES ('must not commit')")
            .await
            .unwrap();
        conn.abort(); // the socket closes with the transaction open
        let _ = conn.await;
    }
    let next = mux.connect("app", "app").await;
    // The next client gets a clean server (the pool has only one), outside a transaction.
    let rows = next
        .query(
            "SELECT count(*) FROM killed_tx WHERE note = 'must not commit'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 0);
    // Outside a transaction, a statement's transaction starts with it.
    // One simple Query is its own transaction: it starts with the statement.
    let fresh = next
        .simple_query("SELECT now() = statement_timestamp()")
        .await
        .unwrap()
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
    assert!(
        fresh,
        "the server was not left inside the killed client's transaction"
    );
}

#[tokio::test]
async fn cancel_reaches_the_running_query() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;
    let client = mux.connect("app", "app").await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (result, started.elapsed(), client)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, took, client) = sleeper.await.unwrap();
    assert_eq!(result.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));
    assert!(
        took < Duration::from_secs(20),
        "cancelled long before pg_sleep ended"
    );
    // The session goes on.
    assert_eq!(
        client
            .query_one("SELECT 5", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        5
    );

    // Cancelling a client that runs nothing does nothing to it. tokio-postgres does not
    // wait for the cancel connection to close (libpq does): pgmux may read the request
    // after the next query started, and then cancels it, as PostgreSQL itself would.
    // So the query waits until pgmux has handled the request.
    let idle = mux.connect("app", "app").await;
    idle.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let handled = common::eventually(Duration::from_secs(10), || async {
        mux.stderr_log()
            .contains("cancel request for no running query; ignored")
    })
    .await;
    assert!(handled, "pgmux handled the cancel request");
    assert_eq!(
        idle.query_one("SELECT 6", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        6
    );
}

#[tokio::test]
async fn copy_in_and_out_100k_rows() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(1)).await;
    let client = mux.connect("app", "app").await;
    let copied = common::copy_round_trip(&client, "copy_rows", 100_000).await;
    assert_eq!((copied.rows_in, copied.lines_out), (100_000, 100_000));
    assert!(copied.bytes_out > 1_000_000);
    let sum: i64 = client
        .query_one("SELECT sum(id)::bigint FROM copy_rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, (0..100_000i64).sum::<i64>());
}

#[tokio::test]
async fn fifty_megabyte_value_round_trips_with_bounded_memory() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;
    let client = mux.connect("app", "app").await;
    let before = common::rss_kib(mux.pid());

    let big = "x".repeat(50 * 1024 * 1024);
    // 50 MB up as a parameter, and back as a row.
    let row = client
        .query_one("SELECT length($1::text), $1::text", &[&big])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 50 * 1024 * 1024);
    assert!(row.get::<_, &str>(1) == big, "the value came back intact");
    // 50 MB as one simple Query message.
    let sql = format!("SELECT length('{big}')");
    let rows = client.simple_query(&sql).await.unwrap();
    assert!(rows.iter().any(|m| matches!(m,
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("52428800"))));

    let after = common::rss_kib(mux.pid());
    assert!(
        after < before + 20 * 1024,
        "pgmux RSS grew from {before} KiB to {after} KiB while 150 MB passed through"
    );
}

#[tokio::test]
async fn client_killed_mid_copy_leaves_no_dirty_server() {
    use futures_util::SinkExt;
    let pg = TestPostgres::shared().await;
    let su = pg.superuser().await;
    su.batch_execute(
        "CREATE TABLE IF NOT EXISTS killed_copy(n int); GRANT ALL ON killed_copy TO app",
    )
    .await
    .unwrap();
    let mux = TestPgmux::start(pg, MuxOptions::sized(1)).await;
    {
        let (client, conn) = mux.try_connect("app", "app", "app_pw").await.unwrap();
        let sink = client.copy_in("COPY killed_copy FROM STDIN").await.unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
            .await
            .unwrap();
        sink.flush().await.unwrap();
        conn.abort(); // gone in the middle of COPY
        let _ = conn.await;
    }
    // The only server was closed or cleaned: the next client works, and nothing was copied.
    let next = mux.connect("app", "app").await;
    let n: i64 = next
        .query_one("SELECT count(*) FROM killed_copy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    next.batch_execute("BEGIN; INSERT INTO killed_copy VALUES (9); ROLLBACK")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_directory_host_connects_over_the_unix_socket() {
    let pg = TestPostgres::shared().await;
    // As in libpq and PgBouncer: a host starting with '/' is the socket's directory.
    let opts = MuxOptions {
        extra: format!(
            "[databases.viasocket]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\n\
             [databases.nosocket]\nhost = \"/nonexistent\"\nport = {}\ndbname = \"app\"\n",
            pg.dir().display(),
            pg.port,
            pg.port
        ),
        ..MuxOptions::sized(1)
    };
    let mux = TestPgmux::start(pg, opts).await;
    let client = mux.connect("viasocket", "app").await;
    // PostgreSQL reports no client address for a Unix-socket connection.
    let row = client
        .query_one("SELECT inet_client_addr() IS NULL, current_database()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the server connection is not TCP");
    assert_eq!(row.get::<_, String>(1), "app");

    // Cancel requests reach the server over the socket too.
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("the cancel ended pg_sleep")
        .unwrap();
    assert_eq!(result.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));

    // A directory without the socket is an upstream failure that names the socket file.
    let err = tokio_postgres::connect(&mux.url("nosocket", "app"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("no server behind /nonexistent");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    assert!(
        db.message()
            .contains(&format!("/nonexistent/.s.PGSQL.{}", pg.port)),
        "{}",
        db.message()
    );
}
