//! The test harness itself: the throwaway PostgreSQL, its roles, stop and restart, cleanup,
//! the client tools, and the config it writes for pgmux.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio_postgres::error::SqlState;

/// Connects straight to PostgreSQL over TCP with a password.
async fn connect_tcp(
    pg: &TestPostgres,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.port)
        .user(user)
        .password(password)
        .dbname("app")
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Polls until `path` is gone, up to `limit`.
async fn gone_within(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

#[tokio::test]
async fn superuser_reaches_database_app_with_the_test_settings() {
    let pg = TestPostgres::shared().await;
    let su = pg.superuser().await;
    let row = su
        .query_one(
            "SELECT 1, current_database(), current_setting('max_connections'),
                    current_setting('password_encryption'), current_setting('listen_addresses')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, &str>(1), "app");
    assert_eq!(row.get::<_, &str>(2), "200");
    assert_eq!(row.get::<_, &str>(3), "scram-sha-256");
    assert_eq!(row.get::<_, &str>(4), "127.0.0.1");
}

#[tokio::test]
async fn app_and_other_log_in_with_scram_over_tcp() {
    let pg = TestPostgres::shared().await;
    let app = connect_tcp(pg, "app", "app_pw").await.unwrap();
    let row = app
        .query_one(
            "SELECT current_user::text, d.datdba::regrole::text
             FROM pg_database d WHERE d.datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "app");
    assert_eq!(row.get::<_, &str>(1), "app", "database app is owned by app");

    let other = connect_tcp(pg, "other", "other_pw").await.unwrap();
    other
        .batch_execute("CREATE TABLE IF NOT EXISTS other_can_create(x int)")
        .await
        .expect("other may use schema public");

    let su = pg.superuser().await;
    let method: String = su
        .query_one(
            "SELECT left(rolpassword, 13) FROM pg_authid WHERE rolname = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        method, "SCRAM-SHA-256",
        "passwords are stored as SCRAM verifiers"
    );

    let err = connect_tcp(pg, "app", "wrong").await.expect_err("refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
}

#[tokio::test]
async fn stop_then_restart_on_the_same_port_keeps_the_data() {
    let pg = TestPostgres::start().await;
    let port = pg.port;
    let app = connect_tcp(&pg, "app", "app_pw").await.unwrap();
    app.batch_execute("CREATE TABLE survives(x int); INSERT INTO survives VALUES (7)")
        .await
        .unwrap();
    drop(app);

    pg.stop().await;
    assert!(connect_tcp(&pg, "app", "app_pw").await.is_err(), "stopped");

    pg.restart().await;
    assert_eq!(pg.port, port);
    let app = connect_tcp(&pg, "app", "app_pw").await.unwrap();
    let x: i32 = app
        .query_one("SELECT x FROM survives", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 7);
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_its_files() {
    let pg = TestPostgres::start().await;
    let dir = pg.dir().to_path_buf();
    let port = pg.port;
    assert!(dir.join("data/postmaster.pid").exists());
    drop(pg);
    assert!(!dir.exists(), "{} removed", dir.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn shared_is_one_cluster_per_binary() {
    let a = TestPostgres::shared().await;
    let b = TestPostgres::shared().await;
    assert!(std::ptr::eq(a, b));
}

/// Run by `shared_cluster_goes_away_when_the_process_dies`, in a child process.
/// Does nothing unless PGMUX_HARNESS_CHILD is set (by the test below).
#[tokio::test]
async fn child_starts_the_shared_cluster_and_dies() {
    if std::env::var_os("PGMUX_HARNESS_CHILD").is_none() {
        return;
    }
    let pg = TestPostgres::shared().await;
    println!("CLUSTER {} {}", pg.port, pg.dir().display());
    // No destructors, as when a test binary is killed.
    std::process::exit(3);
}

#[tokio::test]
async fn shared_cluster_goes_away_when_the_process_dies() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_starts_the_shared_cluster_and_dies",
            "--nocapture",
        ])
        .env("PGMUX_HARNESS_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CLUSTER "))
        .unwrap_or_else(|| {
            panic!(
                "child printed no cluster:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (port, dir) = line.split_once(' ').unwrap();
    let dir = Path::new(dir);
    assert!(
        gone_within(dir, Duration::from_secs(20)).await,
        "{} removed",
        dir.display()
    );
    let port: u16 = port.parse().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server stopped"
    );
}

#[tokio::test]
async fn psql_and_pgbench_run_against_the_cluster() {
    let pg = TestPostgres::shared().await;
    let url = pg.url("app", "app");
    let (ok, out, err) = common::run_psql(
        pg.bin_dir(),
        &url,
        "SELECT 40 + 2 AS answer; SELECT 'second';",
    );
    assert!(ok, "psql failed: {err}");
    assert!(out.contains("42") && out.contains("second"), "{out}");

    let (ok, _, err) = common::run_psql(pg.bin_dir(), &url, "SELECT 1/0; SELECT 'not reached';");
    assert!(!ok && err.contains("division by zero"), "{err}");

    pg.superuser()
        .await
        .batch_execute("CREATE DATABASE harness_bench OWNER app")
        .await
        .unwrap();
    let url = pg.url("harness_bench", "app");
    let init = common::run_pgbench(pg.bin_dir(), &["-i", "-q", "-s", "1", &url]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = common::run_pgbench(pg.bin_dir(), &["-c", "4", "-t", "20", "-n", &url]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("number of transactions actually processed: 80"),
        "{stdout}"
    );
}

#[test]
fn rss_of_this_process_is_read() {
    assert!(common::rss_kib(std::process::id()) > 0);
}

/// The generated config is what pgmux accepts (`pgmux check`): the harness's side of the
/// config contract.
#[tokio::test]
async fn generated_config_passes_pgmux_check() {
    let pg = TestPostgres::shared().await;
    let variants = [
        MuxOptions::default(),
        MuxOptions {
            mode: "session",
            size: 1,
            min_size: 1,
            wait_timeout: "300ms",
            idle_transaction_timeout: "500ms",
            max_client_conn: 2,
            extra: format!(
                "[databases.extra]\nhost = \"127.0.0.1\"\nport = {}\n",
                pg.port
            ),
            ..MuxOptions::default()
        }
        .with_auth_method("md5")
        .with_login_timeout("500ms"),
        MuxOptions::default().with_auth_method("trust"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for opts in variants {
        let config = TestPgmux::config_toml(pg, &opts, common::free_port());
        let path = dir.path().join("pgmux.toml");
        std::fs::write(&path, &config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pgmux check refused:\n{config}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
