//! Named prepared statements stay consistent whatever clients do, in transaction mode:
//! a client's DEALLOCATE or DISCARD ALL, by any protocol, in or out of a transaction, takes
//! only that client's own statements and never a server-side statement another client
//! relies on; after DDL that changes a statement's result type, the client gets
//! PostgreSQL's error exactly as directly until it prepares again, and then it works on
//! every server.
//!
//! The replies expected below are what PostgreSQL 15 answers on a direct connection.

mod common;

use std::collections::HashSet;

use common::raw::{Raw, bind, close, describe, execute, first_error, parse, query, sync};
use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;

async fn mux_of(pg: &TestPostgres, size: u32) -> TestPgmux {
    TestPgmux::start(
        pg,
        MuxOptions {
            size,
            wait_timeout: "30s",
            ..MuxOptions::default()
        }
        .with_auth_method("trust"),
    )
    .await
}

/// Two raw clients on a pool of one server: B prepared `b1`, A prepared `a1`; the server
/// holds both, B's as `pgmux_s1`.
async fn two_clients(pg: &TestPostgres) -> (TestPgmux, Raw, Raw) {
    let mux = mux_of(pg, 1).await;
    let (a, b) = two_clients_of(&mux).await;
    (mux, a, b)
}

async fn two_clients_of(mux: &TestPgmux) -> (Raw, Raw) {
    let mut b = Raw::login(mux).await;
    let mut a = Raw::login(mux).await;
    assert_eq!(
        b.run(&[parse("b1", "SELECT 'b1'"), bind("b1"), execute(), sync()])
            .await,
        ["1", "2", "D:b1", "C"]
    );
    assert_eq!(
        a.run(&[parse("a1", "SELECT 'a1'"), bind("a1"), execute(), sync()])
            .await,
        ["1", "2", "D:a1", "C"]
    );
    let held = "SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT ''b1'''";
    assert_eq!(
        a.run(&[query(held)]).await,
        ["T", "D:pgmux_s1", "C"],
        "B's statement is on the one server as pgmux_s1"
    );
    (a, b)
}

/// What A still has after its statements: `a1` (true) or nothing.
async fn check_after(label: &str, a: &mut Raw, b: &mut Raw, a_keeps: bool) {
    // B's statement works, on the same server, whatever A did.
    assert_eq!(
        b.run(&[bind("b1"), execute(), sync()]).await,
        ["2", "D:b1", "C"],
        "{label}: B's statement"
    );
    let a1 = a.run(&[bind("a1"), execute(), sync()]).await;
    if a_keeps {
        assert_eq!(a1, ["2", "D:a1", "C"], "{label}: A keeps a1");
    } else {
        assert_eq!(a1, ["E:26000"], "{label}: A's a1 is gone");
        // The name is free again.
        assert_eq!(
            a.run(&[
                parse("a1", "SELECT 'a1 again'"),
                bind("a1"),
                execute(),
                sync()
            ])
            .await,
            ["1", "2", "D:a1 again", "C"],
            "{label}: A prepares a1 again"
        );
    }
    // A prepares new statements, B's text among them, and B does too.
    assert_eq!(
        a.run(&[parse("a2", "SELECT 'b1'"), bind("a2"), execute(), sync()])
            .await,
        ["1", "2", "D:b1", "C"],
        "{label}: A's new statement"
    );
    assert_eq!(
        b.run(&[parse("b2", "SELECT 'b2'"), bind("b2"), execute(), sync()])
            .await,
        ["1", "2", "D:b2", "C"],
        "{label}: B's new statement"
    );
    assert_eq!(
        b.run(&[bind("b1"), execute(), bind("b2"), execute(), sync()])
            .await,
        ["2", "D:b1", "C", "2", "D:b2", "C"],
        "{label}: B's statements, again"
    );
    // For the next check.
    assert_eq!(a.run(&[close("a2"), sync()]).await, ["3"]);
    assert_eq!(b.run(&[close("b2"), sync()]).await, ["3"]);
}

/// One thing client A does: messages sent in one write, and the replies up to the next
/// ReadyForQuery.
type Step = (Vec<Vec<u8>>, Vec<&'static str>);

fn step(messages: Vec<Vec<u8>>, replies: &[&'static str]) -> Step {
    (messages, replies.to_vec())
}

fn simple(sql: &str, replies: &[&'static str]) -> Step {
    step(vec![query(sql)], replies)
}

/// Parse, Bind, Execute and Sync of `sql` as the unnamed statement.
fn extended(sql: &str, replies: &[&'static str]) -> Step {
    step(vec![parse("", sql), bind(""), execute(), sync()], replies)
}

async fn run_case(pg: &TestPostgres, label: &str, steps: Vec<Step>, a_keeps: bool) {
    let (_mux, mut a, mut b) = two_clients(pg).await;
    for (messages, replies) in steps {
        assert_eq!(a.run(&messages).await, replies, "{label}");
    }
    check_after(label, &mut a, &mut b, a_keeps).await;
}

#[tokio::test]
async fn deallocate_all_and_discard_all_take_only_the_clients_own_statements() {
    let pg = TestPostgres::shared().await;
    let cases: Vec<(&str, Vec<Step>, bool)> = vec![
        (
            "DEALLOCATE ALL",
            vec![simple("DEALLOCATE ALL", &["C"])],
            false,
        ),
        ("DISCARD ALL", vec![simple("discard all;", &["C"])], false),
        (
            "DEALLOCATE PREPARE ALL",
            vec![simple("DEALLOCATE PREPARE ALL", &["C"])],
            false,
        ),
        (
            "extended DEALLOCATE ALL",
            vec![extended("DEALLOCATE ALL", &["1", "2", "C"])],
            false,
        ),
        (
            "extended DISCARD ALL",
            vec![extended("DISCARD ALL", &["1", "2", "C"])],
            false,
        ),
        (
            "DEALLOCATE ALL in a committed transaction",
            vec![
                simple("BEGIN", &["C"]),
                simple("DEALLOCATE ALL", &["C"]),
                simple("COMMIT", &["C"]),
            ],
            false,
        ),
        (
            // DEALLOCATE is not transactional: a rollback does not bring them back.
            "DEALLOCATE ALL in a rolled-back transaction",
            vec![
                simple("BEGIN", &["C"]),
                simple("DEALLOCATE ALL", &["C"]),
                simple("ROLLBACK", &["C"]),
            ],
            false,
        ),
        (
            "extended DEALLOCATE ALL in a rolled-back transaction",
            vec![
                simple("BEGIN", &["C"]),
                extended("DEALLOCATE ALL", &["1", "2", "C"]),
                simple("ROLLBACK", &["C"]),
            ],
            false,
        ),
        (
            "DEALLOCATE ALL after an error",
            vec![
                simple("BEGIN", &["C"]),
                simple("SELECT 1/0", &["E:22012"]),
                simple("DEALLOCATE ALL", &["E:25P02"]),
                extended("DEALLOCATE ALL", &["E:25P02"]),
                simple("ROLLBACK", &["C"]),
            ],
            true,
        ),
        (
            "DISCARD ALL in a transaction block",
            vec![
                simple("BEGIN", &["C"]),
                simple("DISCARD ALL", &["E:25001"]),
                simple("ROLLBACK", &["C"]),
            ],
            true,
        ),
        (
            "DEALLOCATE ALL in a multi-statement Query",
            vec![simple("SELECT 1; DEALLOCATE ALL", &["T", "D:1", "C", "C"])],
            false,
        ),
        (
            "a transaction block in one Query",
            vec![simple("BEGIN; DEALLOCATE ALL; ROLLBACK", &["C", "C", "C"])],
            false,
        ),
        (
            "DISCARD ALL in a multi-statement Query",
            vec![simple(
                "SELECT 1; DISCARD ALL",
                &["T", "D:1", "C", "E:25001"],
            )],
            true,
        ),
    ];
    for (label, steps, a_keeps) in cases {
        run_case(pg, label, steps, a_keeps).await;
    }
}

#[tokio::test]
async fn deallocate_of_the_clients_own_statement_by_name() {
    let pg = TestPostgres::shared().await;
    let cases: Vec<(&str, Vec<Step>, bool)> = vec![
        (
            "DEALLOCATE a1",
            vec![simple("DEALLOCATE a1", &["C"])],
            false,
        ),
        (
            "DEALLOCATE PREPARE a1",
            vec![simple("deallocate prepare A1;", &["C"])],
            false,
        ),
        (
            "extended DEALLOCATE a1",
            vec![extended("DEALLOCATE a1", &["1", "2", "C"])],
            false,
        ),
        (
            "DEALLOCATE a1 in a rolled-back transaction",
            vec![
                simple("BEGIN", &["C"]),
                simple("DEALLOCATE a1", &["C"]),
                simple("ROLLBACK", &["C"]),
            ],
            false,
        ),
        (
            "DEALLOCATE a1 after an error",
            vec![
                simple("BEGIN", &["C"]),
                simple("SELECT 1/0", &["E:22012"]),
                simple("DEALLOCATE a1", &["E:25P02"]),
                simple("ROLLBACK", &["C"]),
            ],
            true,
        ),
        (
            "DEALLOCATE of a name A does not have",
            vec![simple("DEALLOCATE nope", &["E:26000"])],
            true,
        ),
    ];
    for (label, steps, a_keeps) in cases {
        run_case(pg, label, steps, a_keeps).await;
    }
}

#[tokio::test]
async fn deallocate_of_another_clients_server_side_name_is_26000() {
    let pg = TestPostgres::shared().await;
    let cases: Vec<(&str, Vec<Step>, bool)> = vec![
        (
            "DEALLOCATE pgmux_s1",
            vec![simple("DEALLOCATE pgmux_s1", &["E:26000"])],
            true,
        ),
        (
            "DEALLOCATE PREPARE PGMUX_S1",
            vec![simple("DEALLOCATE PREPARE PGMUX_S1", &["E:26000"])],
            true,
        ),
        (
            // The error aborts the transaction, as PostgreSQL's own does.
            "DEALLOCATE pgmux_s1 in a transaction",
            vec![
                simple("BEGIN", &["C"]),
                simple("DEALLOCATE pgmux_s1", &["E:26000"]),
                simple("SELECT 1", &["E:25P02"]),
                simple("ROLLBACK", &["C"]),
            ],
            true,
        ),
        (
            "extended DEALLOCATE pgmux_s1",
            vec![extended("DEALLOCATE pgmux_s1", &["1", "2", "E:26000"])],
            true,
        ),
    ];
    for (label, steps, a_keeps) in cases {
        run_case(pg, label, steps, a_keeps).await;
    }

    // PostgreSQL's message, word for word.
    let (_mux, mut a, _b) = two_clients(pg).await;
    a.s.write_all(&query("DEALLOCATE pgmux_s1")).await.unwrap();
    let replies = a.messages_until_ready().await;
    let (code, message) = first_error(&replies).expect("an error");
    assert_eq!(code, "26000");
    assert_eq!(message, "prepared statement \"pgmux_s1\" does not exist");
}

/// Forms pgmux does not rewrite reach the server, which then deallocates B's statement:
/// the command tag tells pgmux, which prepares B's statement again before B uses it.
#[tokio::test]
async fn deallocate_that_reaches_the_server_never_breaks_another_client() {
    let pg = TestPostgres::shared().await;
    let cases: Vec<(&str, Vec<Step>, bool)> = vec![
        (
            "DEALLOCATE pgmux_s1 in a multi-statement Query",
            vec![simple(
                "SELECT 1; DEALLOCATE pgmux_s1",
                &["T", "D:1", "C", "C"],
            )],
            true,
        ),
        (
            "DEALLOCATE pgmux_s1 behind a comment",
            vec![simple("/* hi */ DEALLOCATE pgmux_s1", &["C"])],
            true,
        ),
        (
            "DEALLOCATE pgmux_s1 as a named statement",
            vec![step(
                vec![
                    parse("d", "DEALLOCATE pgmux_s1"),
                    bind("d"),
                    execute(),
                    sync(),
                ],
                &["1", "2", "C"],
            )],
            true,
        ),
        (
            "DEALLOCATE pgmux_s1 in a transaction, then more of A's statements",
            vec![
                simple("BEGIN", &["C"]),
                simple("SELECT 2; DEALLOCATE pgmux_s1", &["T", "D:2", "C", "C"]),
                step(
                    vec![
                        parse("b1_too", "SELECT 'b1'"),
                        bind("b1_too"),
                        execute(),
                        bind("a1"),
                        execute(),
                        sync(),
                    ],
                    &["1", "2", "D:b1", "C", "2", "D:a1", "C"],
                ),
                simple("COMMIT", &["C"]),
            ],
            true,
        ),
    ];
    for (label, steps, a_keeps) in cases {
        run_case(pg, label, steps, a_keeps).await;
    }
}

/// SQL-level statements live on the server the client is pinned to: their names reach it.
#[tokio::test]
async fn deallocate_of_sql_level_statements_reaches_the_server() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            size: 1,
            wait_timeout: "30s",
            pool_extra: "max_pinned = 1".to_owned(),
            ..MuxOptions::default()
        }
        .with_auth_method("trust"),
    )
    .await;
    let (mut a, mut b) = two_clients_of(&mux).await;
    assert_eq!(a.run(&[query("PREPARE p AS SELECT 'p'")]).await, ["C"]);
    assert_eq!(a.run(&[query("EXECUTE p")]).await, ["T", "D:p", "C"]);
    assert_eq!(a.run(&[query("DEALLOCATE p")]).await, ["C"]);
    assert_eq!(a.run(&[query("EXECUTE p")]).await, ["E:26000"]);
    check_after("DEALLOCATE p", &mut a, &mut b, true).await;

    assert_eq!(a.run(&[query("PREPARE q AS SELECT 'q'")]).await, ["C"]);
    assert_eq!(
        a.run(&[
            parse("", "DEALLOCATE PREPARE q"),
            bind(""),
            execute(),
            sync()
        ])
        .await,
        ["1", "2", "C"]
    );
    assert_eq!(a.run(&[query("EXECUTE q")]).await, ["E:26000"]);
    check_after("extended DEALLOCATE q", &mut a, &mut b, true).await;

    assert_eq!(a.run(&[query("PREPARE r AS SELECT 'r'")]).await, ["C"]);
    assert_eq!(a.run(&[query("DEALLOCATE ALL")]).await, ["C"]);
    assert_eq!(a.run(&[query("EXECUTE r")]).await, ["E:26000"]);
    check_after("DEALLOCATE ALL after PREPARE", &mut a, &mut b, false).await;
}

/// A DEALLOCATE pgmux cannot see (inside a function or DO block) costs the next client of
/// that server one error, after which pgmux prepares its statements again.
#[tokio::test]
async fn deallocate_inside_a_do_block_costs_one_error() {
    let pg = TestPostgres::shared().await;
    let (_mux, mut a, mut b) = two_clients(pg).await;
    assert_eq!(
        a.run(&[query("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")])
            .await,
        ["C"]
    );
    assert_eq!(b.run(&[bind("b1"), execute(), sync()]).await, ["E:26000"]);
    assert_eq!(
        b.run(&[bind("b1"), execute(), sync()]).await,
        ["2", "D:b1", "C"]
    );
    assert_eq!(
        a.run(&[bind("a1"), execute(), sync()]).await,
        ["2", "D:a1", "C"]
    );
}

/// A client that pipelines statements behind its DEALLOCATE ALL: they are prepared again
/// on the server, and B's statements are untouched.
#[tokio::test]
async fn statements_pipelined_behind_deallocate_all() {
    let pg = TestPostgres::shared().await;
    let (_mux, mut a, mut b) = two_clients(pg).await;
    let replies = a
        .run(&[
            query("DEALLOCATE ALL"),
            parse("p", "SELECT 'b1'"),
            bind("p"),
            execute(),
            sync(),
        ])
        .await;
    assert_eq!(replies, ["C"]);
    assert_eq!(a.run(&[]).await, ["1", "2", "D:b1", "C"]);
    check_after("pipelined", &mut a, &mut b, false).await;
}

// ---- DDL that changes a statement's result type ----

/// What a client sees: a row count and column count, or the error's SQLSTATE and message.
async fn outcome(c: &Client, statement: &tokio_postgres::Statement) -> String {
    match c.query(statement, &[]).await {
        Ok(rows) => format!(
            "{} rows of {} columns",
            rows.len(),
            statement.columns().len()
        ),
        Err(e) => {
            let db = e.as_db_error().expect("an ErrorResponse");
            format!("{}: {}", db.code().code(), db.message())
        }
    }
}

/// Prepares, changes the table under the statement, and tries again, in and out of a
/// transaction; then prepares again. Returns what the client saw at each step.
async fn result_type_story(c: &Client, su: &Client, table: &str) -> Vec<String> {
    su.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table}(a int); \
         INSERT INTO {table} VALUES (1); GRANT ALL ON {table} TO app"
    ))
    .await
    .unwrap();
    let sql = format!("SELECT * FROM {table}");
    let mut seen = Vec::new();
    let old = c.prepare(&sql).await.unwrap();
    seen.push(outcome(c, &old).await);
    su.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN b int"))
        .await
        .unwrap();
    seen.push(outcome(c, &old).await);
    seen.push(outcome(c, &old).await);
    c.batch_execute("BEGIN").await.unwrap();
    seen.push(outcome(c, &old).await);
    let after = c.batch_execute("SELECT 1").await.unwrap_err();
    seen.push(format!("then {:?}", after.code().map(|c| c.code())));
    c.batch_execute("ROLLBACK").await.unwrap();
    let new = c.prepare(&sql).await.unwrap();
    seen.push(outcome(c, &new).await);
    seen.push(outcome(c, &new).await);
    seen.push(outcome(c, &old).await);
    seen
}

#[tokio::test]
async fn result_type_change_is_reported_as_directly_then_recovers() {
    let pg = TestPostgres::shared().await;
    let su = pg.superuser().await;
    let (direct, conn) = tokio_postgres::connect(&pg.url("app", "app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let expected = result_type_story(&direct, &su, "rt_direct").await;
    assert_eq!(
        expected,
        [
            "1 rows of 1 columns",
            "0A000: cached plan must not change result type",
            "0A000: cached plan must not change result type",
            "0A000: cached plan must not change result type",
            "then Some(\"25P02\")",
            "1 rows of 2 columns",
            "1 rows of 2 columns",
            "0A000: cached plan must not change result type",
        ],
        "PostgreSQL itself"
    );
    let mux = TestPgmux::start(pg, MuxOptions::sized(1).waiting("30s")).await;
    let c = mux.connect("app", "app").await;
    assert_eq!(result_type_story(&c, &su, "rt_one").await, expected);
}

/// Holds both servers of a pool of two (each client in a transaction, the first to begin
/// gets the server given back last) and runs `statement` as `c` on the one `c` holds.
/// Returns the outcome, the statement that followed it in the transaction, and the server.
async fn on_the_server_of(
    c: &Client,
    other: &Client,
    c_first: bool,
    statement: &tokio_postgres::Statement,
) -> (String, String, i32) {
    let (first, second) = if c_first { (c, other) } else { (other, c) };
    first.batch_execute("BEGIN").await.unwrap();
    second.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let seen = outcome(c, statement).await;
    let then = match c.simple_query("SELECT 1").await {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.code().map_or("?", |c| c.code()).to_owned(),
    };
    // Given back in the order that makes the other one first next time.
    second.batch_execute("ROLLBACK").await.unwrap();
    first.batch_execute("ROLLBACK").await.unwrap();
    (seen, then, pid)
}

#[tokio::test]
async fn result_type_change_on_a_pool_of_two() {
    let pg = TestPostgres::shared().await;
    let su = pg.superuser().await;
    su.batch_execute(
        "DROP TABLE IF EXISTS rt_two; CREATE TABLE rt_two(a int); \
         INSERT INTO rt_two VALUES (1); GRANT ALL ON rt_two TO app",
    )
    .await
    .unwrap();
    let mux = TestPgmux::start(pg, MuxOptions::sized(2).waiting("30s")).await;
    let a = mux.connect("app", "app").await;
    let hog = mux.connect("app", "app").await;
    // Prepared before the DDL by a client that never runs it until after.
    let late = mux.connect("app", "app").await;
    let sql = "SELECT * FROM rt_two";
    let old = a.prepare(sql).await.unwrap();
    let late_old = late.prepare(sql).await.unwrap();

    let mut servers = HashSet::new();
    for c_first in [true, false] {
        let (seen, then, pid) = on_the_server_of(&a, &hog, c_first, &old).await;
        assert_eq!(
            (seen.as_str(), then.as_str()),
            ("1 rows of 1 columns", "ok")
        );
        servers.insert(pid);
    }
    assert_eq!(servers.len(), 2, "the statement ran on both servers");

    su.batch_execute("ALTER TABLE rt_two ADD COLUMN b int")
        .await
        .unwrap();
    // On both servers, as on a direct connection: the error, and the transaction failed.
    for c_first in [true, false, true] {
        let (seen, then, _) = on_the_server_of(&a, &hog, c_first, &old).await;
        assert_eq!(
            (seen.as_str(), then.as_str()),
            ("0A000: cached plan must not change result type", "25P02")
        );
    }
    assert_eq!(
        outcome(&late, &late_old).await,
        "0A000: cached plan must not change result type"
    );

    // Prepared again, it works on both servers, for every client.
    let new = a.prepare(sql).await.unwrap();
    let late_new = late.prepare(sql).await.unwrap();
    let mut servers = HashSet::new();
    for c_first in [true, false, true, false] {
        let (seen, then, pid) = on_the_server_of(&a, &hog, c_first, &new).await;
        assert_eq!(
            (seen.as_str(), then.as_str()),
            ("1 rows of 2 columns", "ok")
        );
        servers.insert(pid);
    }
    assert_eq!(servers.len(), 2, "the new statement ran on both servers");
    assert_eq!(outcome(&late, &late_new).await, "1 rows of 2 columns");
    let fresh = mux.connect("app", "app").await;
    let st = fresh.prepare(sql).await.unwrap();
    assert_eq!(outcome(&fresh, &st).await, "1 rows of 2 columns");
}

/// The raw protocol: which message carries the error, and a Close and Parse of the same
/// name recovers, as directly.
#[tokio::test]
async fn result_type_change_raw_protocol() {
    let pg = TestPostgres::shared().await;
    let su = pg.superuser().await;
    su.batch_execute(
        "DROP TABLE IF EXISTS rt_raw; CREATE TABLE rt_raw(a int); GRANT ALL ON rt_raw TO app",
    )
    .await
    .unwrap();
    let mux = mux_of(pg, 1).await;
    let mut c = Raw::login(&mux).await;
    assert_eq!(
        c.run(&[
            parse("s", "SELECT * FROM rt_raw"),
            bind("s"),
            execute(),
            sync()
        ])
        .await,
        ["1", "2", "C"]
    );
    su.batch_execute("ALTER TABLE rt_raw ADD COLUMN b int")
        .await
        .unwrap();
    // PostgreSQL sends the parameter description, then the error; pgmux, when it
    // answers for the server later, only the error.
    assert_eq!(c.run(&[describe("s"), sync()]).await, ["t", "E:0A000"]);
    assert_eq!(c.run(&[bind("s"), execute(), sync()]).await, ["E:0A000"]);
    assert_eq!(c.run(&[bind("s"), execute(), sync()]).await, ["E:0A000"]);
    assert_eq!(c.run(&[describe("s"), sync()]).await, ["E:0A000"]);
    // In a transaction block the error fails it; in a failed one, 25P02 comes first.
    assert_eq!(c.run(&[query("BEGIN")]).await, ["C"]);
    assert_eq!(c.run(&[bind("s"), execute(), sync()]).await, ["E:0A000"]);
    assert_eq!(c.run(&[query("SELECT 1")]).await, ["E:25P02"]);
    assert_eq!(c.run(&[bind("s"), execute(), sync()]).await, ["E:25P02"]);
    assert_eq!(c.run(&[query("ROLLBACK")]).await, ["C"]);
    assert_eq!(
        c.run(&[
            close("s"),
            parse("s", "SELECT * FROM rt_raw"),
            bind("s"),
            execute(),
            sync()
        ])
        .await,
        ["3", "1", "2", "C"]
    );
}
