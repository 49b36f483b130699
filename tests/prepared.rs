//! Named prepared statements and session settings in transaction mode: they follow the
//! client to whichever server connection it gets, with replies in exactly the order a
//! direct connection gives.

mod common;

use std::collections::HashSet;

use common::raw::{Raw, bind, close, describe, execute, parse, query, sync};
use common::{MuxOptions, TestPgmux, TestPostgres};

#[tokio::test]
async fn tokio_postgres_statements_move_between_servers() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(3).waiting("30s")).await;
    let mut tasks = Vec::new();
    for c in 0..20i32 {
        let client = mux.connect("app", "app").await;
        tasks.push(tokio::spawn(async move {
            // Prepared once, used in 30 later transactions on whatever server comes.
            let add = client
                .prepare("SELECT $1::int + $2::int, pg_backend_pid()")
                .await
                .unwrap();
            let mul = client.prepare("SELECT $1::int * $2::int").await.unwrap();
            let mut pids = HashSet::new();
            for i in 0..30i32 {
                let row = client.query_one(&add, &[&c, &i]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), c + i);
                pids.insert(row.get::<_, i32>(1));
                let row = client.query_one(&mul, &[&c, &i]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), c * i);
            }
            pids.len()
        }));
    }
    let mut moved = false;
    for t in tasks {
        moved |= t.await.unwrap() > 1;
    }
    assert!(
        moved,
        "some client's statements ran on more than one server connection"
    );
}

#[tokio::test]
async fn pgbench_prepared_50_clients_on_pool_of_5() {
    common::pgbench_through_pgmux("prepared").await;
}

#[tokio::test]
async fn settings_follow_each_client_across_a_pool_of_two() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(2).waiting("30s")).await;
    let a = mux.connect("app", "app").await;
    let b = mux.connect("app", "app").await;
    a.batch_execute("SET application_name = 'alpha'; SET TimeZone = 'UTC'")
        .await
        .unwrap();
    // A comment ends the line: replayed on another server, it must not swallow b's RESET.
    a.batch_execute("SET statement_timeout = '11s' -- as in the runbook")
        .await
        .unwrap();
    b.batch_execute("SET application_name = 'beta'")
        .await
        .unwrap();
    b.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    b.batch_execute("SET search_path = pg_catalog, public")
        .await
        .unwrap();
    for _ in 0..50 {
        // A third client holds one server now and then, so a and b trade servers.
        let hog = mux.connect("app", "app").await;
        hog.batch_execute("BEGIN; SELECT 1").await.unwrap();
        check(&a, "alpha", "UTC", "11s", "\"$user\", public").await;
        check(&b, "beta", "Asia/Tokyo", "0", "pg_catalog, public").await;
        hog.batch_execute("COMMIT").await.unwrap();
        check(&b, "beta", "Asia/Tokyo", "0", "pg_catalog, public").await;
        check(&a, "alpha", "UTC", "11s", "\"$user\", public").await;
    }
    // A fresh client gets none of it: the server's defaults.
    let su = pg.superuser().await;
    let default_tz: String = su.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
    let c = mux.connect("app", "app").await;
    check(&c, "", &default_tz, "0", "\"$user\", public").await;
}

/// In a transaction, checks what the client's session shows.
async fn check(c: &tokio_postgres::Client, app: &str, tz: &str, timeout: &str, path: &str) {
    c.batch_execute("BEGIN").await.unwrap();
    let row = c
        .query_one(
            "SELECT current_setting('application_name'), current_setting('TimeZone'), \
             current_setting('statement_timeout'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(row.get::<_, String>(0), app);
    assert_eq!(row.get::<_, String>(1), tz);
    assert_eq!(row.get::<_, String>(2), timeout);
    assert_eq!(row.get::<_, String>(3), path);
}

#[tokio::test]
async fn startup_options_follow_the_client() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(1)).await;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(mux.port)
        .user("app")
        .password("app_pw")
        .dbname("app")
        .application_name("startup-app")
        .options("-c statement_timeout=4321ms -c search_path=pg_catalog");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // Another client uses the only server in between.
    let other = mux.connect("app", "app").await;
    other
        .batch_execute("SET application_name = 'other'")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "startup-app");
    assert_eq!(row.get::<_, String>(1), "4321ms");
    assert_eq!(row.get::<_, String>(2), "pg_catalog");
}

// ---- raw protocol: exact reply order ----

async fn raw_mux(pg: &TestPostgres, size: u32, extra_pool: &str) -> TestPgmux {
    TestPgmux::start(
        pg,
        MuxOptions {
            size,
            wait_timeout: "30s",
            pool_extra: extra_pool.to_owned(),
            ..MuxOptions::default()
        }
        .with_auth_method("trust"),
    )
    .await
}

#[tokio::test]
async fn parse_error_inside_a_pipeline_keeps_postgres_order() {
    let pg = TestPostgres::shared().await;
    let mux = raw_mux(pg, 1, "").await;
    let mut c = Raw::login(&mux).await;
    let replies = c
        .run(&[
            parse("s1", "SELECT 1"),
            bind("s1"),
            execute(),
            parse("s2", "SELEC oops"),
            bind("s2"),
            execute(),
            parse("s3", "SELECT 3"),
            sync(),
        ])
        .await;
    // As PostgreSQL answers: s1 runs, s2's Parse fails, the rest is skipped up to Sync.
    assert_eq!(replies, ["1", "2", "D:1", "C", "E:42601"]);
    // s3 was never prepared (skipped), s2 failed, s1 exists.
    assert_eq!(c.run(&[bind("s3"), execute(), sync()]).await, ["E:26000"]);
    assert_eq!(c.run(&[bind("s2"), execute(), sync()]).await, ["E:26000"]);
    assert_eq!(
        c.run(&[bind("s1"), execute(), sync()]).await,
        ["2", "D:1", "C"]
    );
}

#[tokio::test]
async fn describe_and_close_of_unknown_names() {
    let pg = TestPostgres::shared().await;
    let mux = raw_mux(pg, 1, "").await;
    let mut c = Raw::login(&mux).await;
    assert_eq!(c.run(&[describe("nope"), sync()]).await, ["E:26000"]);
    // PostgreSQL answers CloseComplete for a name it does not know.
    assert_eq!(c.run(&[close("nope"), sync()]).await, ["3"]);
    // A known statement describes as the server would.
    assert_eq!(
        c.run(&[parse("k", "SELECT 1 AS one"), describe("k"), sync()])
            .await,
        ["1", "t", "T"]
    );
}

#[tokio::test]
async fn names_are_per_client_and_reparse_needs_close() {
    let pg = TestPostgres::shared().await;
    let mux = raw_mux(pg, 1, "").await;
    let mut a = Raw::login(&mux).await;
    let mut b = Raw::login(&mux).await;
    // The same name means different statements for two clients sharing one server.
    assert_eq!(a.run(&[parse("q", "SELECT 'a'"), sync()]).await, ["1"]);
    assert_eq!(b.run(&[parse("q", "SELECT 'b'"), sync()]).await, ["1"]);
    assert_eq!(
        a.run(&[bind("q"), execute(), sync()]).await,
        ["2", "D:a", "C"]
    );
    assert_eq!(
        b.run(&[bind("q"), execute(), sync()]).await,
        ["2", "D:b", "C"]
    );
    // Parsing a held name again is 42P05, as in PostgreSQL, and skips to Sync.
    assert_eq!(
        a.run(&[parse("q", "SELECT 'x'"), bind("q"), execute(), sync()])
            .await,
        ["E:42P05"]
    );
    // After Close, the name takes new text.
    assert_eq!(a.run(&[close("q"), sync()]).await, ["3"]);
    assert_eq!(
        a.run(&[parse("q", "SELECT 'new'"), bind("q"), execute(), sync()])
            .await,
        ["1", "2", "D:new", "C"]
    );
    // b's statement is untouched by a's Close.
    assert_eq!(
        b.run(&[bind("q"), execute(), sync()]).await,
        ["2", "D:b", "C"]
    );
    // A statement another client prepared on this server is answered by pgmux.
    assert_eq!(b.run(&[parse("q2", "SELECT 'new'"), sync()]).await, ["1"]);
}

#[tokio::test]
async fn thousand_statements_through_a_cache_of_100() {
    let pg = TestPostgres::shared().await;
    let mux = raw_mux(pg, 2, "max_prepared_statements = 100").await;
    let mut a = Raw::login(&mux).await;
    let mut b = Raw::login(&mux).await;
    for i in 0..1000 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        let name = format!("st{i}");
        let replies = c
            .run(&[
                parse(&name, &format!("SELECT {i}")),
                bind(&name),
                execute(),
                sync(),
            ])
            .await;
        assert_eq!(replies, ["1", "2", format!("D:{i}").as_str(), "C"]);
    }
    // The earliest statements were evicted from the servers; they are re-prepared on use.
    for i in (0..1000).step_by(97) {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        let replies = c.run(&[bind(&format!("st{i}")), execute(), sync()]).await;
        assert_eq!(replies, ["2", format!("D:{i}").as_str(), "C"]);
    }
}

#[tokio::test]
async fn discard_all_forgets_only_this_clients_statements() {
    let pg = TestPostgres::shared().await;
    let mux = raw_mux(pg, 1, "").await;
    let mut a = Raw::login(&mux).await;
    let mut b = Raw::login(&mux).await;
    assert_eq!(a.run(&[parse("d", "SELECT 'a'"), sync()]).await, ["1"]);
    assert_eq!(b.run(&[parse("d", "SELECT 'b'"), sync()]).await, ["1"]);
    assert_eq!(a.run(&[query("DISCARD ALL")]).await, ["C"]);
    assert_eq!(a.run(&[bind("d"), execute(), sync()]).await, ["E:26000"]);
    // b's statement still works (re-prepared: the server's copy went with DISCARD ALL).
    assert_eq!(
        b.run(&[bind("d"), execute(), sync()]).await,
        ["2", "D:b", "C"]
    );
    assert_eq!(b.run(&[query("DEALLOCATE ALL")]).await, ["C"]);
    assert_eq!(b.run(&[bind("d"), execute(), sync()]).await, ["E:26000"]);
}
