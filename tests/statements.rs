//! Named prepared statements stay consistent whatever clients do, in transaction mode:
//! a client's DEALLOCATE or DISCARD ALL, by any protocol, in or out of a transaction, takes
//! only that client's own statements and never a server-side statement another client
//! relies on.
//!
//! The replies expected below are what PostgreSQL 15 answers on a direct connection.

mod common;

use common::raw::{Raw, bind, execute, first_error, parse, query, sync};
use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio::io::AsyncWriteExt;

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
    let mut b = Raw::login(&mux).await;
    let mut a = Raw::login(&mux).await;
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
    (mux, a, b)
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
