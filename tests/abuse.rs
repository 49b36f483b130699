//! Broken and hostile clients: every bad input becomes a PostgreSQL error for the client
//! that sent it, and costs other clients nothing (no leaked slot, no dirty server, no
//! unbounded memory, no stolen cancel).

mod common;

use std::time::Duration;

use common::raw::{Raw, error_fields, msg, parse, query, sync};
use common::{MuxOptions, TestPgmux, TestPostgres, eventually, rss_kib};
use tokio::io::AsyncWriteExt;
use tokio_postgres::error::SqlState;

/// Options for a pool of one with trust logins (raw sockets log in without a password).
fn one_server() -> MuxOptions {
    MuxOptions {
        size: 1,
        wait_timeout: "3s",
        auth_method: "trust",
        ..MuxOptions::default()
    }
}

/// Reads until the server closes the socket (or `limit` passes); returns every message.
async fn read_to_close(raw: &mut Raw, limit: Duration) -> Vec<(u8, Vec<u8>)> {
    common::raw::read_messages(&mut raw.s, limit).await
}

/// The first ErrorResponse's (severity, SQLSTATE, message).
fn fatal_of(messages: &[(u8, Vec<u8>)]) -> (String, String, String) {
    let (_, body) = messages
        .iter()
        .find(|(t, _)| *t == b'E')
        .unwrap_or_else(|| panic!("an ErrorResponse, got {messages:?}"));
    let severity = body
        .split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"S"))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    let (code, message) = error_fields(body);
    (severity, code, message)
}

/// The pool still lends its only server, clean: no transaction open, no leftover setting.
async fn pool_is_healthy(mux: &TestPgmux) {
    let client = mux.connect("app", "app").await;
    // A simple Query outside a transaction starts one: then now() = statement_timestamp().
    let rows = client
        .simple_query("SELECT now() = statement_timestamp(), current_setting('work_mem')")
        .await
        .unwrap_or_else(|e| panic!("the pool still serves: {e:?}"));
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    assert_eq!(
        row.get(0),
        Some("t"),
        "the server is not inside a transaction"
    );
    assert_eq!(row.get(1), Some("4MB"), "no setting left behind");
}

#[tokio::test]
async fn text_pasted_from_a_document_is_an_error_not_a_lost_server() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, one_server()).await;
    let client = mux.connect("app", "app").await;
    // More times than the pool has servers and max_client_conn has room: nothing leaks.
    for sql in [
        "SET TimeZone ‘UTC’",
        "SET x €",
        "SET x tö 1",
        "SET TimeZone ‘UTC’",
    ] {
        let err = client.simple_query(sql).await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{sql}: {err}");
    }
    common::answers_select_1(&client).await;
    pool_is_healthy(&mux).await;
}

#[tokio::test]
async fn a_panicking_session_tells_its_client_and_frees_everything() {
    let pg = TestPostgres::shared().await;
    let trigger = "SELECT 'pgmux test: panic here'";
    let mut mux = TestPgmux::start(
        pg,
        MuxOptions {
            max_client_conn: 2,
            env: vec![("PGMUX_TEST_PANIC_ON", trigger.to_owned())],
            ..one_server()
        },
    )
    .await;
    mux.expect_panics = true;
    // Each panics while holding the only server, inside a transaction, with a client slot.
    for _ in 0..4 {
        let client = connect_when_a_slot_is_free(&mux).await;
        client
            .batch_execute("BEGIN; CREATE TEMP TABLE t (x int)")
            .await
            .unwrap();
        let err = client.simple_query(trigger).await.unwrap_err();
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("an ErrorResponse: {err:?}"));
        assert_eq!(db.code(), &SqlState::INTERNAL_ERROR, "{db}");
        assert!(db.message().contains("internal error"), "{}", db.message());
    }
    // Slots and the server came back; the server that was mid-transaction was closed.
    let a = connect_when_a_slot_is_free(&mux).await;
    let b = connect_when_a_slot_is_free(&mux).await;
    for client in [&a, &b] {
        let row = client
            .query_one("SELECT count(*) FROM pg_tables WHERE tablename = 't'", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 0, "no temp table survives");
    }
    drop((a, b));
    assert!(mux.stderr_log().contains("injected by PGMUX_TEST_PANIC_ON"));
}

/// Connects once a client slot is free: a closed session gives its slot back as soon as its
/// task ends, which may be a moment after the client saw the error. A slot that never comes
/// back fails the test.
async fn connect_when_a_slot_is_free(mux: &TestPgmux) -> tokio_postgres::Client {
    for _ in 0..50 {
        match mux.try_connect("app", "app", "app_pw").await {
            Ok((client, _)) => return client,
            Err(e) => assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("a client slot was never given back");
}

#[tokio::test]
async fn unknown_message_types_never_reach_a_server() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, one_server()).await;
    for garbage in [b'y', b'p', 0u8, 0xff] {
        let mut raw = Raw::login(&mux).await;
        // Behind a Query that holds the only server: the server must not see it.
        let mut bytes = query("SELECT pg_sleep(0.05)");
        bytes.extend(msg(garbage, b"junk"));
        raw.s.write_all(&bytes).await.unwrap();
        let messages = read_to_close(&mut raw, Duration::from_secs(5)).await;
        let (severity, code, message) = fatal_of(
            &messages
                .into_iter()
                .filter(|(t, b)| *t == b'E' && error_fields(b).0 == "08P01")
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            (severity.as_str(), code.as_str()),
            ("FATAL", "08P01"),
            "{message}"
        );
        assert!(message.contains("invalid message type"), "{message}");
        pool_is_healthy(&mux).await;
    }
}

#[tokio::test]
async fn copy_messages_outside_copy_are_ignored_like_postgresql() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, one_server()).await;
    let mut raw = Raw::login(&mux).await;
    let mut bytes = msg(b'd', b"stray row\n");
    bytes.extend(msg(b'c', b""));
    bytes.extend(query("SELECT 7"));
    assert_eq!(raw.run(&[bytes]).await, ["T", "D:7", "C"]);
}

#[tokio::test]
async fn messages_over_max_message_size_are_refused() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            server_extra: "max_message_size = 65536".into(),
            ..one_server()
        },
    )
    .await;
    let mut raw = Raw::login(&mux).await;
    let big = format!("SELECT '{}'", "x".repeat(100_000));
    raw.s.write_all(&query(&big)).await.unwrap();
    let (severity, code, message) =
        fatal_of(&read_to_close(&mut raw, Duration::from_secs(5)).await);
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "08P01"));
    assert!(message.contains("max_message_size"), "{message}");
    // A length no message can have, at the default limit too.
    let mut raw = Raw::login(&mux).await;
    raw.s
        .write_all(&[b'Q', 0xff, 0xff, 0xff, 0xf0])
        .await
        .unwrap();
    let (_, code, _) = fatal_of(&read_to_close(&mut raw, Duration::from_secs(5)).await);
    assert_eq!(code, "08P01");
    pool_is_healthy(&mux).await;
}

#[tokio::test]
async fn a_half_sent_message_has_a_deadline() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            server_extra: "partial_message_timeout = \"300ms\"".into(),
            ..one_server()
        },
    )
    .await;
    // Half a Query, while holding nothing; then half a message behind BEGIN.
    let mut idle = Raw::login(&mux).await;
    let half = query("SELECT 'never finished'");
    idle.s.write_all(&half[..10]).await.unwrap();
    let mut holding = Raw::login(&mux).await;
    assert_eq!(holding.run(&[query("BEGIN")]).await, ["C"]);
    holding.s.write_all(&half[..10]).await.unwrap();
    for raw in [&mut idle, &mut holding] {
        let (severity, code, message) = fatal_of(&read_to_close(raw, Duration::from_secs(5)).await);
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "08P01"));
        assert!(message.contains("partial_message_timeout"), "{message}");
    }
    pool_is_healthy(&mux).await;
}

#[tokio::test]
async fn parse_and_flush_without_sync_counts_as_held() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            idle_transaction_timeout: "300ms",
            ..one_server()
        },
    )
    .await;
    let mut raw = Raw::login(&mux).await;
    let mut bytes = parse("", "SELECT 1");
    bytes.extend(msg(b'H', b""));
    raw.s.write_all(&bytes).await.unwrap();
    let (_, code, message) = fatal_of(&read_to_close(&mut raw, Duration::from_secs(5)).await);
    assert_eq!(code, "25P03", "{message}");
    pool_is_healthy(&mux).await;
}

#[tokio::test]
async fn query_timeout_cancels_a_silent_server() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            pool_extra: "query_timeout = \"1s\"".into(),
            ..one_server()
        },
    )
    .await;
    let client = mux.connect("app", "app").await;
    let err = client
        .simple_query("SELECT pg_sleep(30) /* abuse: silent server */")
        .await
        .unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("an ErrorResponse: {err:?}"));
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    assert!(db.message().contains("query_timeout"), "{}", db.message());
    // The backend was cancelled, not left sleeping for 30 s.
    let su = pg.superuser().await;
    let gone = eventually(Duration::from_secs(5), || async {
        let row = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%abuse: silent server%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 0
    })
    .await;
    assert!(
        gone,
        "the silent query was cancelled and its backend closed"
    );
    pool_is_healthy(&mux).await;
}

/// What a client that never reads would send: 100 MB.
const UNREAD: usize = 100 << 20;

/// Sends Syncs without reading anything until pgmux stops taking them (a write waits 2 s)
/// or `UNREAD` bytes went; returns how many bytes went.
async fn syncs_taken(raw: &mut Raw) -> usize {
    let chunk: Vec<u8> = std::iter::repeat_n(sync(), 20_000).flatten().collect();
    let mut sent = 0;
    while sent < UNREAD {
        match tokio::time::timeout(Duration::from_secs(2), raw.s.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break, // pgmux stopped reading: the kernel buffers are full
        }
    }
    sent
}

#[tokio::test]
async fn a_client_that_does_not_read_stops_being_read() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, one_server()).await;
    pool_is_healthy(&mux).await;
    let before = rss_kib(mux.pid());
    // Syncs, answered by pgmux itself, never read: 100 MB if pgmux kept taking them.
    let mut raw = Raw::login(&mux).await;
    let sent = syncs_taken(&mut raw).await;
    let during = rss_kib(mux.pid());
    assert!(
        sent < UNREAD,
        "pgmux kept reading a client that does not read"
    );
    assert!(
        during < before + 20 * 1024,
        "RSS {before} KiB -> {during} KiB after {sent} bytes of unread Syncs"
    );
    // Pipelined Syncs with a server held, never read, are bounded too.
    let mut raw2 = Raw::login(&mux).await;
    raw2.s.write_all(&query("BEGIN")).await.unwrap();
    let sent2 = syncs_taken(&mut raw2).await;
    assert!(
        sent2 < UNREAD,
        "pgmux kept reading a client that holds a server and does not read"
    );
    let held = rss_kib(mux.pid());
    eprintln!(
        "unread Syncs: {sent} bytes taken without a server, {sent2} with one; RSS {before} -> {during} -> {held} KiB"
    );
    assert!(
        held < before + 40 * 1024,
        "RSS {before} KiB -> {held} KiB after {sent2} bytes of pipelined Syncs"
    );
    drop(raw);
    drop(raw2);
    pool_is_healthy(&mux).await;
}

#[tokio::test]
async fn a_cancel_never_reaches_another_clients_query() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, one_server()).await;
    let canceller = mux.connect("app", "app").await;
    let victim = mux.connect("app", "app").await;
    let token = canceller.cancel_token();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The canceller runs tiny queries and cancels right after each: its cancels race the
    // hand-over of the only server to the victim.
    let cancelling = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut own_cancelled = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let run = canceller.simple_query("SELECT pg_sleep(0.001)");
                let cancel = token.cancel_query(tokio_postgres::NoTls);
                let (ran, _) = tokio::join!(run, cancel);
                if ran.is_err() {
                    own_cancelled += 1;
                }
            }
            own_cancelled
        })
    };
    let mut victim_runs = 0;
    for _ in 0..300 {
        match victim.simple_query("SELECT pg_sleep(0.002)").await {
            Ok(_) => victim_runs += 1,
            Err(e) => panic!("the victim's query was cancelled by another client: {e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let own = cancelling.await.unwrap();
    assert_eq!(victim_runs, 300);
    eprintln!("canceller cancelled {own} of its own queries");
}

#[tokio::test]
async fn the_statement_registry_is_bounded() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            server_extra: "statement_registry_size = 100".into(),
            ..one_server()
        },
    )
    .await;
    let mut raw = Raw::login(&mux).await;
    pool_is_healthy(&mux).await;
    let before = rss_kib(mux.pid());
    // 20 000 distinct statements of 1 KB, each closed after use.
    let pad = "x".repeat(1000);
    for batch in 0..200 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            let name = format!("s{batch}_{i}");
            bytes.extend(parse(
                &name,
                &format!("SELECT {batch} * 1000 + {i}, '{pad}'"),
            ));
            bytes.extend(common::raw::close(&name));
        }
        bytes.extend(sync());
        let replies = raw.run(&[bytes]).await;
        assert!(replies.iter().all(|r| r == "1" || r == "3"), "{replies:?}");
    }
    let after = rss_kib(mux.pid());
    eprintln!("20 000 distinct statements: RSS {before} -> {after} KiB");
    // Kept whole, 20 000 statements of 1 KB would be over 20 MB.
    assert!(
        after < before + 10 * 1024,
        "RSS {before} KiB -> {after} KiB"
    );
    // And a statement still works after all that.
    let mut bytes = parse("again", "SELECT 42");
    bytes.extend(common::raw::bind("again"));
    bytes.extend(common::raw::execute());
    bytes.extend(sync());
    assert_eq!(raw.run(&[bytes]).await, ["1", "2", "D:42", "C"]);
    // A client that keeps every name is bounded too: past the cap, 54000, and it goes on.
    let mut keeper = Raw::login(&mux).await;
    let mut bytes = Vec::new();
    for i in 0..100 {
        bytes.extend(parse(&format!("k{i}"), &format!("SELECT {i}")));
    }
    bytes.extend(sync());
    assert_eq!(
        keeper.run(&[bytes]).await,
        vec!["1"; 99].into_iter().chain(["1"]).collect::<Vec<_>>()
    );
    let mut bytes = parse("one_too_many", "SELECT 'x'");
    bytes.extend(sync());
    assert_eq!(keeper.run(&[bytes]).await, ["E:54000"]);
    let mut bytes = common::raw::close("k0");
    bytes.extend(parse("one_too_many", "SELECT 'x'"));
    bytes.extend(sync());
    assert_eq!(keeper.run(&[bytes]).await, ["3", "1"]);
}

#[tokio::test]
async fn closing_a_statement_takes_no_server() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, one_server().waiting("1s")).await;
    let mut raw = Raw::login(&mux).await;
    let mut bytes = parse("s1", "SELECT 1");
    bytes.extend(sync());
    assert_eq!(raw.run(&[bytes]).await, ["1"]);
    // The only server is held by another client's transaction.
    let holder = mux.connect("app", "app").await;
    holder.batch_execute("BEGIN").await.unwrap();
    // Drivers close statements in the background (tokio-postgres on drop): no wait, no 53300.
    let mut bytes = common::raw::close("s1");
    bytes.extend(sync());
    assert_eq!(raw.run(&[bytes]).await, ["3"]);
    holder.batch_execute("COMMIT").await.unwrap();
}
