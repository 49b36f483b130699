//! Limits across pools against a real PostgreSQL: `max_user_connections` and
//! `max_db_connections` shared by the pools of a user or database (one FIFO queue, budget
//! freed by another pool's idle connection), 53300 naming the limit after `wait_timeout`,
//! client caps at login, per-user `size` and `wait_timeout`, what `/pools` and `/metrics`
//! show, and a reload that changes a limit.

mod common;

use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use serde_json::Value as Json;
use tokio_postgres::error::SqlState;

/// A bound against hangs, never a measured time.
const LIMIT: Duration = Duration::from_secs(30);

/// A second client-facing database, `app2`, on the same PostgreSQL database: its pools
/// are other pools of the same users.
fn with_app2(pg: &TestPostgres) -> String {
    format!(
        "[databases.app2]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n",
        pg.port
    )
}

fn options(pg: &TestPostgres, pool_extra: &str, wait_timeout: &'static str) -> MuxOptions {
    MuxOptions {
        size: 4,
        wait_timeout,
        pool_extra: pool_extra.to_owned(),
        extra: with_app2(pg),
        admin: Some(String::new()),
        ..MuxOptions::default()
    }
}

/// The limits `/pools` shows for the pool (database, user).
async fn pool_limits(mux: &TestPgmux, database: &str, user: &str) -> Vec<Json> {
    let pools = mux.admin_get("/pools").await.json();
    let pool = pools
        .as_array()
        .expect("an array")
        .iter()
        .find(|p| p["database"] == database && p["user"] == user)
        .unwrap_or_else(|| panic!("no pool {database}/{user} in {pools}"))
        .clone();
    pool["limits"].as_array().expect("limits").clone()
}

/// The `/pools` entry of one limit of a pool.
async fn limit_of(mux: &TestPgmux, database: &str, user: &str, setting: &str) -> Json {
    pool_limits(mux, database, user)
        .await
        .into_iter()
        .find(|l| l["setting"] == setting)
        .unwrap_or_else(|| panic!("no {setting} on {database}/{user}"))
}

/// Waits until `n` checkouts wait for `setting` on the pool (database, user).
async fn until_waiting(mux: &TestPgmux, database: &str, user: &str, setting: &str, n: u64) {
    let waiting = eventually(LIMIT, || async {
        limit_of(mux, database, user, setting).await["waiting"] == n
    })
    .await;
    assert!(waiting, "{n} waiting for {setting} on {database}/{user}");
}

#[tokio::test]
async fn pools_of_one_user_share_max_user_connections_in_one_queue() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, "max_user_connections = 1", "20s")).await;
    let a = mux.connect("app", "app").await;
    let b = mux.connect("app2", "app").await;
    // Another user is not limited by app's budget.
    let other = mux.connect("app2", "other").await;

    a.batch_execute("BEGIN").await.unwrap(); // holds app's only server connection
    let waiter = tokio::spawn(async move {
        let row = b.query_one("SELECT 2", &[]).await;
        (b, row.map(|r| r.get::<_, i32>(0)))
    });
    until_waiting(&mux, "app2", "app", "max_user_connections", 1).await;
    let budget = limit_of(&mux, "app", "app", "max_user_connections").await;
    assert_eq!(budget["limit"], 1, "{budget}");
    assert_eq!(budget["in_use"], 1, "{budget}");
    let row = other.query_one("SELECT 3", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);

    // The transaction ends: app's connection is closed to give the budget to app2's waiter.
    a.batch_execute("COMMIT").await.unwrap();
    let (b, row) = tokio::time::timeout(LIMIT, waiter).await.unwrap().unwrap();
    assert_eq!(row.unwrap(), 2);

    // Now app2 keeps the budget in an idle connection: app's next checkout closes it and
    // goes on.
    let row = a.query_one("SELECT 4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 4);
    let row = b.query_one("SELECT 5", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 5);
    let in_use = mux
        .metric(
            "pgmux_limit_in_use",
            &[("limit", "max_user_connections"), ("name", "app")],
        )
        .await;
    assert_eq!(in_use, Some(1.0));
    let max = mux
        .metric(
            "pgmux_limit_max",
            &[("limit", "max_user_connections"), ("name", "app")],
        )
        .await;
    assert_eq!(max, Some(1.0));
}

#[tokio::test]
async fn waiters_of_a_database_budget_get_53300_naming_it_then_go_on() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, "max_db_connections = 1", "300ms")).await;
    let a = mux.connect("app", "app").await;
    let b = mux.connect("app", "other").await;

    a.batch_execute("BEGIN").await.unwrap();
    let err = b.simple_query("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS, "{db:?}");
    assert!(
        db.message()
            .contains("max_db_connections (1) reached for database \"app\""),
        "{}",
        db.message()
    );
    assert!(
        db.hint()
            .is_some_and(|h| h.contains("databases.app.max_db_connections")),
        "{db:?}"
    );
    let refused = mux
        .metric(
            "pgmux_limit_refused_total",
            &[("limit", "max_db_connections"), ("name", "app")],
        )
        .await;
    assert_eq!(refused, Some(1.0));
    let limit = limit_of(&mux, "app", "other", "max_db_connections").await;
    assert_eq!(limit["refused"], 1, "{limit}");

    // The session stays usable once the budget is free again.
    a.batch_execute("COMMIT").await.unwrap();
    let row = b.query_one("SELECT 6", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 6);
}

#[tokio::test]
async fn client_caps_refuse_logins_with_53300_naming_the_setting() {
    let pg = TestPostgres::shared().await;
    let caps = "max_db_client_connections = 2\nmax_user_client_connections = 1";
    let mux = TestPgmux::start(pg, options(pg, caps, "5s")).await;
    let first = mux.connect("app", "app").await;

    // app is logged in once already.
    let err = mux
        .try_connect("app2", "app", "app_pw")
        .await
        .expect_err("refused");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS, "{db:?}");
    assert!(
        db.message()
            .contains("too many clients for user \"app\": max_user_client_connections (1)"),
        "{}",
        db.message()
    );
    assert!(
        db.hint()
            .is_some_and(|h| h.contains("users.app.max_user_client_connections")),
        "{db:?}"
    );

    // Database app has room for one more client, of another user; then it is full.
    let second = mux.connect("app", "other").await;
    let third = mux.try_connect("app", "other", "other_pw").await;
    let err = third.expect_err("refused");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert!(
        db.message()
            .contains("too many clients for database \"app\": max_db_client_connections (2)"),
        "{}",
        db.message()
    );
    let shown = limit_of(&mux, "app", "app", "max_db_client_connections").await;
    assert_eq!(shown["in_use"], 2, "{shown}");
    assert_eq!(shown["refused"], 1, "{shown}");

    // A client that leaves gives its place back.
    drop(first);
    let row = second.query_one("SELECT 9", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 9);
    let back = eventually(LIMIT, || async {
        mux.try_connect("app2", "app", "app_pw").await.is_ok()
    })
    .await;
    assert!(back, "app may log in again once its first client left");
    let refused = mux
        .metric(
            "pgmux_limit_refused_total",
            &[("limit", "max_user_client_connections"), ("name", "app")],
        )
        .await;
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
}

#[tokio::test]
async fn per_user_size_and_wait_timeout_and_a_reloaded_limit() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, "max_user_connections = 1", "20s")).await;
    let a = mux.connect("app", "app").await;
    let b = mux.connect("app2", "app").await;

    // A reload that raises the limit lets the waiter through at once.
    a.batch_execute("BEGIN").await.unwrap();
    let waiter = tokio::spawn(async move {
        let row = b.query_one("SELECT 7", &[]).await;
        (b, row.map(|r| r.get::<_, i32>(0)))
    });
    until_waiting(&mux, "app2", "app", "max_user_connections", 1).await;
    let text = std::fs::read_to_string(&mux.config_path).unwrap();
    let raised = text.replace("max_user_connections = 1", "max_user_connections = 2");
    std::fs::write(&mux.config_path, &raised).unwrap();
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert!(
        reload.body.contains("max_user_connections 1 -> 2"),
        "{}",
        reload.body
    );
    let (b, row) = tokio::time::timeout(LIMIT, waiter).await.unwrap().unwrap();
    assert_eq!(row.unwrap(), 7);
    assert_eq!(
        limit_of(&mux, "app", "app", "max_user_connections").await["limit"],
        2
    );
    a.batch_execute("COMMIT").await.unwrap();

    // Per-user size and wait_timeout, over [pool]'s; the limit removed.
    let per_user = raised.replace("max_user_connections = 2\n", "").replace(
        "[users.app]\npassword = \"app_pw\"\n",
        "[users.app]\npassword = \"app_pw\"\nsize = 1\nwait_timeout = \"300ms\"\n",
    );
    std::fs::write(&mux.config_path, &per_user).unwrap();
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    let pools = mux.admin_get("/pools").await.json();
    let size_of = |database: &str, user: &str| {
        pools
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["database"] == database && p["user"] == user)
            .map(|p| p["size"].clone())
    };
    assert_eq!(size_of("app", "app"), Some(Json::from(1)), "{pools}");
    assert!(pool_limits(&mux, "app", "app").await.is_empty());

    a.batch_execute("BEGIN").await.unwrap(); // app's only connection in pool app
    let c = mux.connect("app", "app").await;
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS, "{db:?}");
    assert!(
        db.message().contains("(size 1, 1 in use"),
        "{}",
        db.message()
    );
    a.batch_execute("COMMIT").await.unwrap();
    let row = b.query_one("SELECT 8", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 8);
}

#[tokio::test]
async fn many_clients_across_pools_all_finish_and_the_counts_add_up() {
    let pg = TestPostgres::shared().await;
    let limits = "max_db_connections = 3\nmax_user_connections = 2";
    let mux = TestPgmux::start(pg, options(pg, limits, "30s")).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let database = if i % 2 == 0 { "app" } else { "app2" };
        let user = if i % 4 < 2 { "app" } else { "other" };
        let client = mux.connect(database, user).await;
        tasks.push(tokio::spawn(async move {
            for n in 0..20 {
                let tx = format!("BEGIN; SELECT {n}; COMMIT");
                client.batch_execute(&tx).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        let done = tokio::time::timeout(LIMIT, task)
            .await
            .expect("no deadlock");
        done.unwrap().expect("every transaction served");
    }
    // Each budget counts exactly the connections its pools have open, within its limit.
    let pools = mux.admin_get("/pools").await.json();
    let open = |field: &str, name: &str| -> u64 {
        pools
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p[field] == name)
            .map(|p| {
                ["active", "idle", "connecting"]
                    .iter()
                    .map(|k| p[*k].as_u64().unwrap())
                    .sum::<u64>()
            })
            .sum()
    };
    for (setting, field, name, limit) in [
        ("max_user_connections", "user", "app", 2),
        ("max_user_connections", "user", "other", 2),
        ("max_db_connections", "database", "app", 3),
        ("max_db_connections", "database", "app2", 3),
    ] {
        let (database, user) = if field == "user" {
            ("app", name)
        } else {
            (name, "app")
        };
        let shown = limit_of(&mux, database, user, setting).await;
        assert_eq!(
            shown["in_use"],
            open(field, name),
            "{setting} {name}: {shown}"
        );
        assert!(shown["in_use"].as_u64().unwrap() <= limit, "{shown}");
        assert_eq!(shown["waiting"], 0, "{shown}");
    }
}
