//! The PgBouncer-style admin console on the client port: psql and tokio-postgres against
//! `pgbouncer` / `pgmux`, admins only, simple query protocol only.

mod common;

use common::{MuxOptions, TestPgmux, TestPostgres, rows, run_psql};
use tokio_postgres::error::SqlState;

/// pgmux with `other` as its admin user.
async fn start(pg: &TestPostgres) -> TestPgmux {
    let opts = MuxOptions {
        auth_extra: "admin_users = [\"other\"]".to_owned(),
        ..MuxOptions::default()
    };
    TestPgmux::start(pg, opts).await
}

#[tokio::test]
async fn psql_show_pools_and_friends() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    app.simple_query("SELECT 1").await.unwrap();

    let (ok, out, err) = run_psql(
        pg.bin_dir(),
        &mux.url("pgbouncer", "other"),
        "SHOW POOLS;\nSHOW VERSION;\n",
    );
    assert!(ok, "psql failed: {err}");
    let header = out.lines().next().unwrap_or_default();
    for column in [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "maxwait",
        "pool_mode",
    ] {
        assert!(header.contains(column), "{column} missing in:\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("app ") && l.contains("transaction")),
        "{out}"
    );
    assert!(out.contains("pgmux "), "{out}");

    // The other name works too, and every SHOW answers.
    for show in [
        "CLIENTS",
        "SERVERS",
        "STATS",
        "DATABASES",
        "USERS",
        "LISTS",
        "CONFIG",
        "HELP",
    ] {
        let (ok, out, err) = run_psql(
            pg.bin_dir(),
            &mux.url("pgmux", "other"),
            &format!("SHOW {show};"),
        );
        assert!(ok, "SHOW {show}: {err}\n{out}");
    }
}

#[tokio::test]
async fn rows_match_what_pgmux_does() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let console = mux.connect("pgbouncer", "other").await;

    let pools = console.simple_query("SHOW POOLS").await.unwrap();
    let pool = rows(&pools)
        .into_iter()
        .find(|r| r.get("database") == Some("app"))
        .expect("an app row");
    assert_eq!(pool.get("user"), Some("app"));
    assert_eq!(pool.get("sv_active"), Some("1"));
    assert_eq!(pool.get("cl_waiting"), Some("0"));
    assert_eq!(pool.get("pool_mode"), Some("transaction"));

    let servers = console.simple_query("SHOW SERVERS").await.unwrap();
    let server = rows(&servers)[0];
    assert_eq!(server.get("type"), Some("S"));
    // Its client sits in an open transaction: PgBouncer's `state` says `active` (linked to
    // a client); pgmux's `activity` says it as PostgreSQL does (issue 13, item 4).
    assert_eq!(server.get("state"), Some("active"));
    assert_eq!(server.get("activity"), Some("idle in transaction"));
    assert_eq!(server.get("addr"), Some("127.0.0.1"));
    assert_eq!(server.get("port"), Some(pg.port.to_string().as_str()));

    let stats = console.simple_query("SHOW STATS").await.unwrap();
    let app_stats = rows(&stats)
        .into_iter()
        .find(|r| r.get("database") == Some("app"))
        .expect("app stats");
    assert!(app_stats.get("total_xact_count").is_some());

    let config = console.simple_query("SHOW CONFIG").await.unwrap();
    let size = rows(&config)
        .into_iter()
        .find(|r| r.get("key") == Some("pool.size"))
        .expect("pool.size");
    assert_eq!(size.get("value"), Some("2"));
    assert_eq!(size.get("default"), Some("20"));

    // Several commands in one Query are answered in order.
    let both = console
        .simple_query("SHOW VERSION; SHOW LISTS")
        .await
        .unwrap();
    assert!(rows(&both).len() > 1);
    app.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn only_admins_unknown_commands_and_extended_protocol() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;

    let err = mux
        .try_connect("pgbouncer", "app", "app_pw")
        .await
        .expect_err("app is no admin");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    // A wrong password is still a wrong password.
    let err = mux
        .try_connect("pgbouncer", "other", "nope")
        .await
        .expect_err("wrong password");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    let console = mux.connect("pgbouncer", "other").await;
    let err = console.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");
    let err = console.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");
    // The extended protocol is refused, and the session goes on.
    let err = console.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{err}");
    let version = console.simple_query("SHOW VERSION").await.unwrap();
    assert!(
        rows(&version)[0]
            .get("version")
            .unwrap_or_default()
            .starts_with("pgmux")
    );
}

#[tokio::test]
async fn pause_resume_reconnect_and_reload() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    app.simple_query("SELECT 1").await.unwrap();
    let console = mux.connect("pgmux", "other").await;

    console.simple_query("PAUSE app").await.unwrap();
    let pools = console.simple_query("SHOW POOLS").await.unwrap();
    assert_eq!(rows(&pools)[0].get("paused"), Some("1"));
    let held = tokio::spawn(async move { app.simple_query("SELECT 1").await.map(|_| app) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "held while paused");
    console.simple_query("RESUME app").await.unwrap();
    let app = held.await.unwrap().expect("released without an error");

    console.simple_query("RECONNECT").await.unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let err = console.simple_query("PAUSE nosuchdb").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");

    console.simple_query("RELOAD").await.unwrap();
    std::fs::write(&mux.config_path, "[pool]\nsize = -1\n").unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert!(db.message().contains("pool.size"), "{}", db.message());
    // Nothing changed: the pool still serves.
    app.simple_query("SELECT 1").await.unwrap();
}
