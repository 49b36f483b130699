//! Session state in transaction mode (issue 10): whatever a client leaves on its server
//! (temporary tables, advisory locks, holdable cursors, LISTEN, SQL-level prepared
//! statements, settings) never reaches another client. Under `session_state = "pin"` the
//! client keeps its server; under `"reset"` the state is discarded and the client told;
//! settings changed inside transactions or by `set_config` follow the client.
//!
//! Most tests use a pool of one server and two clients: the second client gets the very
//! server the first one used (the same backend pid), and must find it clean.

mod common;

use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

/// One session state kind: the SQL that makes it, and the SQL that ends it.
struct Kind {
    name: &'static str,
    make: &'static str,
    drop: &'static str,
}

/// Kinds that pin or are reset. LISTEN is not one: the listener connection of the
/// database takes it over (tests/notify.rs).
const KINDS: [Kind; 4] = [
    Kind {
        name: "temp_table",
        make: "CREATE TEMP TABLE scratch AS SELECT 1 AS x",
        drop: "DROP TABLE scratch",
    },
    Kind {
        name: "advisory_lock",
        make: "SELECT pg_advisory_lock(4242)",
        drop: "SELECT pg_advisory_unlock(4242)",
    },
    Kind {
        name: "cursor",
        make: "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        drop: "CLOSE held",
    },
    Kind {
        name: "prepared_statement",
        make: "PREPARE sql_level(int) AS SELECT $1 + 1",
        drop: "DEALLOCATE sql_level",
    },
];

/// How much session state of any kind the client's server holds.
const STATE_COUNT: &str = "SELECT \
    (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) \
    + (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) \
    + (SELECT count(*) FROM pg_cursors) \
    + (SELECT count(*) FROM pg_listening_channels()) \
    + (SELECT count(*) FROM pg_prepared_statements WHERE from_sql)";

async fn scalar(client: &Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

async fn pid(client: &Client) -> String {
    scalar(client, "SELECT pg_backend_pid()").await
}

/// A client whose notices are collected (tokio-postgres hands them to the connection).
async fn connect_with_notices(
    mux: &TestPgmux,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(mux.port)
        .user("app")
        .password(common::password_for("app"))
        .dbname("app");
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(AsyncMessage::Notice(notice)) = message {
                let _ = tx.send(notice.message().to_owned());
            }
        }
    });
    (client, rx)
}

fn pool_of_one(policy: &str, extra: &str) -> MuxOptions {
    MuxOptions {
        pool_extra: format!("session_state = \"{policy}\"\n{extra}"),
        admin: Some(String::new()),
        ..MuxOptions::sized(1).waiting("2s")
    }
}

/// The one client `/clients` shows with session state.
async fn client_state(mux: &TestPgmux) -> Option<serde_json::Value> {
    let clients = mux.admin_get("/clients").await.json();
    clients
        .as_array()
        .unwrap()
        .iter()
        .find_map(|c| c.get("session_state").filter(|s| !s.is_null()).cloned())
}

#[tokio::test]
async fn each_kind_pins_its_client_and_never_reaches_another() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, pool_of_one("pin", "max_pinned = 1")).await;
    for kind in &KINDS {
        let a = mux.connect("app", "app").await;
        a.batch_execute(kind.make).await.unwrap();
        let pinned_pid = pid(&a).await;
        // Kept across transactions: the same server, the state still there.
        for _ in 0..3 {
            assert_eq!(pid(&a).await, pinned_pid, "{}", kind.name);
            assert_ne!(scalar(&a, STATE_COUNT).await, "0", "{}", kind.name);
        }
        let state = client_state(&mux).await.expect("a pinned client");
        assert_eq!(state["action"], "pin", "{}", kind.name);
        assert_eq!(state["pinned"], true);
        assert_eq!(state["kinds"][0], kind.name);
        assert!(
            kind.make.starts_with(state["statement"].as_str().unwrap()),
            "{state}"
        );
        let pools = mux.admin_get("/pools").await.json();
        assert_eq!(pools[0]["pinned"], 1);

        // Ending the state gives the server back: another client gets it, clean.
        a.batch_execute(kind.drop).await.unwrap();
        let b = mux.connect("app", "app").await;
        assert_eq!(pid(&b).await, pinned_pid, "{}", kind.name);
        assert_eq!(scalar(&b, STATE_COUNT).await, "0", "{}", kind.name);

        // Made again, and the client leaves: the next client finds the server clean.
        a.batch_execute(kind.make).await.unwrap();
        drop(a);
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                b.simple_query(STATE_COUNT).await.is_ok()
            })
            .await
        );
        assert_eq!(pid(&b).await, pinned_pid, "{}", kind.name);
        assert_eq!(scalar(&b, STATE_COUNT).await, "0", "{}", kind.name);
    }
    let metrics = mux.admin_get("/metrics").await.body;
    for kind in &KINDS {
        let line = format!(
            "pgmux_session_state_events_total{{database=\"app\",user=\"app\",kind=\"{}\",action=\"pin\"}} 2",
            kind.name
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    assert!(metrics.contains("pgmux_pinned_clients{database=\"app\",user=\"app\"} 0"));
    assert!(
        mux.stderr_log()
            .contains("session state pins the client to its server connection")
    );
}

#[tokio::test]
async fn a_pinned_client_holds_its_server_from_others() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, pool_of_one("pin", "max_pinned = 1")).await;
    let a = mux.connect("app", "app").await;
    a.batch_execute("CREATE TEMP TABLE mine(x int)")
        .await
        .unwrap();
    let b = mux.connect("app", "app").await;
    // The only server is pinned: the other client waits, then gets 53300.
    let err = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    a.batch_execute("INSERT INTO mine VALUES (1)")
        .await
        .unwrap();
    a.batch_execute("DISCARD ALL").await.unwrap();
    // DISCARD ALL dropped the table: the server is free again.
    assert_eq!(scalar(&b, STATE_COUNT).await, "0");
}

#[tokio::test]
async fn reset_discards_the_state_and_tells_the_client() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, pool_of_one("reset", "")).await;
    let b = mux.connect("app", "app").await;
    for kind in &KINDS {
        let (a, mut notices) = connect_with_notices(&mux).await;
        let a_pid = pid(&a).await;
        a.batch_execute(kind.make).await.unwrap();
        let notice = tokio::time::timeout(Duration::from_secs(10), notices.recv())
            .await
            .expect("a notice within 10 s")
            .expect("a notice");
        assert!(notice.contains("discarded session state"), "{notice}");
        // Gone for the client that made it, and for the next one on that server.
        assert_eq!(scalar(&a, STATE_COUNT).await, "0", "{}", kind.name);
        assert_eq!(pid(&b).await, a_pid);
        assert_eq!(scalar(&b, STATE_COUNT).await, "0", "{}", kind.name);
        let state = client_state(&mux).await.expect("a reset shows in /clients");
        assert_eq!(state["action"], "reset");
        assert_eq!(state["pinned"], false);
    }
    let metrics = mux.admin_get("/metrics").await.body;
    assert!(metrics.contains(
        "pgmux_session_state_events_total{database=\"app\",user=\"app\",kind=\"cursor\",action=\"reset\"} 1"
    ));
}

#[tokio::test]
async fn beyond_max_pinned_the_statement_fails_and_its_state_is_gone() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        pool_extra: "max_pinned = 1".into(),
        admin: Some(String::new()),
        ..MuxOptions::sized(2)
    };
    let mux = TestPgmux::start(pg, opts).await;
    let a = mux.connect("app", "app").await;
    a.batch_execute("SELECT pg_advisory_lock(1001)")
        .await
        .unwrap();
    let c = mux.connect("app", "app").await;
    let err = c
        .batch_execute("CREATE TEMP TABLE t(x int)")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::CONFIGURATION_LIMIT_EXCEEDED);
    assert!(db.message().contains("max_pinned"), "{}", db.message());
    assert!(db.message().contains("temporary table"), "{}", db.message());
    // The session goes on, without the state.
    assert_eq!(scalar(&c, STATE_COUNT).await, "0");
    let metrics = mux.admin_get("/metrics").await.body;
    assert!(metrics.contains(
        "pgmux_session_state_events_total{database=\"app\",user=\"app\",kind=\"temp_table\",action=\"refuse\"} 1"
    ));
}

#[tokio::test]
async fn a_pinned_client_idle_too_long_is_disconnected() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        pool_of_one("pin", "max_pinned = 1\npinned_idle_timeout = \"1s\""),
    )
    .await;
    let a = mux.connect("app", "app").await;
    a.batch_execute("SELECT pg_advisory_lock(77)")
        .await
        .unwrap();
    let b = mux.connect("app", "app").await;
    // Once the pinned client is gone, the server is the other client's, clean.
    assert!(
        common::eventually(Duration::from_secs(20), || async {
            b.simple_query("SELECT 1").await.is_ok()
        })
        .await
    );
    assert_eq!(scalar(&b, STATE_COUNT).await, "0");
    assert!(a.simple_query("SELECT 1").await.is_err());
    assert!(mux.stderr_log().contains("pinned_idle_timeout"));
}

#[tokio::test]
async fn settings_changed_in_transactions_follow_the_client() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, pool_of_one("pin", "")).await;
    let a = mux.connect("app", "app").await;
    let b = mux.connect("app", "app").await;
    let default = scalar(&b, "SHOW work_mem").await;
    // (statement, work_mem the client then has)
    let steps: [(&str, &str); 9] = [
        ("BEGIN; SET work_mem = '5MB'; COMMIT", "5MB"),
        ("BEGIN; SET work_mem = '6MB'; ROLLBACK", "5MB"),
        (
            "BEGIN; SAVEPOINT s; SET work_mem = '7MB'; ROLLBACK TO s; COMMIT",
            "5MB",
        ),
        ("SELECT set_config('work_mem', '8MB', false)", "8MB"),
        ("SELECT set_config('work_mem', '9MB', true)", "8MB"),
        ("SET work_mem = '10MB'; SELECT 1", "10MB"),
        (
            "DO $$ BEGIN PERFORM set_config('work_mem', '11MB', false); END $$",
            "11MB",
        ),
        ("BEGIN; RESET work_mem; COMMIT", &default),
        ("BEGIN; SET LOCAL work_mem = '12MB'; COMMIT", &default),
    ];
    for (sql, expected) in steps {
        a.batch_execute(sql).await.unwrap();
        assert_eq!(scalar(&a, "SHOW work_mem").await, expected, "after {sql}");
        // The other client, on the same server, never sees it.
        assert_eq!(scalar(&b, "SHOW work_mem").await, default, "after {sql}");
        assert_eq!(scalar(&a, "SHOW work_mem").await, expected, "after {sql}");
    }
    // The extended protocol too.
    a.execute("SET statement_timeout = '42s'", &[])
        .await
        .unwrap();
    assert_eq!(scalar(&b, "SHOW statement_timeout").await, "0");
    assert_eq!(scalar(&a, "SHOW statement_timeout").await, "42s");
    // Settings never pin.
    let pools = mux.admin_get("/pools").await.json();
    assert_eq!(pools[0]["pinned"], 0);
}

#[tokio::test]
async fn state_made_by_the_extended_protocol_or_in_a_function_is_found() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, pool_of_one("reset", "")).await;
    let b = mux.connect("app", "app").await;
    let a = mux.connect("app", "app").await;
    let a_pid = pid(&a).await;
    // Parse/Bind/Execute of the unnamed statement, then of a named one (twice: the second
    // time its Parse is answered by pgmux, and the Bind alone is the trigger).
    a.execute("CREATE TEMP TABLE ext(x int)", &[])
        .await
        .unwrap();
    assert_eq!(scalar(&b, STATE_COUNT).await, "0");
    let lock = a.prepare("SELECT pg_advisory_lock($1)").await.unwrap();
    for key in [2001i64, 2002] {
        a.query(&lock, &[&key]).await.unwrap();
        assert_eq!(pid(&b).await, a_pid);
        assert_eq!(scalar(&b, STATE_COUNT).await, "0");
    }
    // A DO block and a procedure.
    a.batch_execute("DO $$ BEGIN CREATE TEMP TABLE in_do(x int); END $$")
        .await
        .unwrap();
    assert_eq!(scalar(&b, STATE_COUNT).await, "0");
    a.batch_execute(
        "CREATE OR REPLACE PROCEDURE pgmux_lock_proc() LANGUAGE sql AS $$ SELECT pg_advisory_lock(77) $$",
    )
    .await
    .unwrap();
    a.batch_execute("CALL pgmux_lock_proc()").await.unwrap();
    assert_eq!(scalar(&b, STATE_COUNT).await, "0");
}

#[tokio::test]
async fn sql_level_prepare_and_two_phase_commit_work_in_transaction_mode() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, pool_of_one("pin", "max_pinned = 1")).await;
    let a = mux.connect("app", "app").await;
    a.batch_execute("PREPARE plus_one(int) AS SELECT $1 + 1")
        .await
        .unwrap();
    assert_eq!(scalar(&a, "EXECUTE plus_one(41)").await, "42");
    a.batch_execute("DEALLOCATE plus_one").await.unwrap();
    // No longer pinned: another client gets the server.
    let b = mux.connect("app", "app").await;
    assert_eq!(scalar(&b, STATE_COUNT).await, "0");

    // pgmux's own statement names are reserved.
    let err = a
        .batch_execute("PREPARE pgmux_s1 AS SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::RESERVED_NAME), "{err}");
    assert_eq!(scalar(&a, "SELECT 1").await, "1");

    // Two-phase commit: PREPARE TRANSACTION ends the transaction, the server goes back.
    a.batch_execute(
        "CREATE TABLE IF NOT EXISTS tpc_rows(x int); \
         BEGIN; INSERT INTO tpc_rows VALUES (1); PREPARE TRANSACTION 'pgmux_tpc_1'",
    )
    .await
    .unwrap();
    assert_eq!(
        scalar(
            &b,
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'pgmux_tpc_1'"
        )
        .await,
        "1"
    );
    b.batch_execute("COMMIT PREPARED 'pgmux_tpc_1'")
        .await
        .unwrap();
    a.batch_execute("BEGIN; INSERT INTO tpc_rows VALUES (2); PREPARE TRANSACTION 'pgmux_tpc_2'")
        .await
        .unwrap();
    a.batch_execute("ROLLBACK PREPARED 'pgmux_tpc_2'")
        .await
        .unwrap();
    assert_eq!(scalar(&b, "SELECT sum(x) FROM tpc_rows").await, "1");
    b.batch_execute("DROP TABLE tpc_rows").await.unwrap();
}

#[tokio::test]
async fn state_made_by_a_plain_function_is_found_when_every_transaction_is_checked() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        pool_of_one("pin", "max_pinned = 1\nsession_state_check = \"always\""),
    )
    .await;
    let a = mux.connect("app", "app").await;
    // No trigger word in the call: only the check after every transaction sees it.
    a.batch_execute(
        "CREATE OR REPLACE FUNCTION pgmux_hidden_state() RETURNS int LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_advisory_lock(3003); RETURN 1; END $$",
    )
    .await
    .unwrap();
    assert_eq!(scalar(&a, "SELECT pgmux_hidden_state()").await, "1");
    let state = client_state(&mux).await.expect("a pinned client");
    assert_eq!(state["kinds"][0], "advisory_lock");
    assert_eq!(state["statement"], "SELECT pgmux_hidden_state()");
    a.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    let b = mux.connect("app", "app").await;
    assert_eq!(scalar(&b, STATE_COUNT).await, "0");
}
