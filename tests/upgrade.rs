//! Zero-downtime upgrade (`pgmux upgrade`, SIGUSR2): clients move to the new process at
//! their next quiet point with their settings, prepared statements and cancel key, and
//! notice nothing; the new process is the same binary, as a real upgrade would start.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use tokio_postgres::error::SqlState;

const WORKERS: usize = 8;
const UPGRADES: usize = 3;

/// What one worker did: transactions committed, and every error it saw.
struct Worked {
    committed: u64,
    errors: Vec<String>,
}

/// A client that runs transactions with its own prepared statements and session settings
/// until told to stop, checking after each that its settings are still its own.
async fn worker(
    mux_port_client: tokio_postgres::Client,
    id: i32,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Worked {
    let client = mux_port_client;
    let mut errors = Vec::new();
    let name = format!("worker{id}");
    let setup = async {
        client
            .batch_execute(&format!("SET application_name = '{name}'"))
            .await?;
        client
            .batch_execute("SET search_path = upgrade_schema, public")
            .await?;
        let insert = client
            .prepare("INSERT INTO upgrade_log (worker, n) VALUES ($1, $2)")
            .await?;
        let settings = client
            .prepare("SELECT current_setting('application_name'), current_setting('search_path')")
            .await?;
        Ok::<_, tokio_postgres::Error>((insert, settings))
    };
    let (insert, settings) = match setup.await {
        Ok(prepared) => prepared,
        Err(e) => {
            return Worked {
                committed: 0,
                errors: vec![format!("setup: {e}")],
            };
        }
    };
    let mut committed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = committed as i32 + 1;
        let transaction = async {
            client.batch_execute("BEGIN").await?;
            client.execute(&insert, &[&id, &n]).await?;
            let row = client.query_one(&settings, &[]).await?;
            client.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>((row.get::<_, String>(0), row.get::<_, String>(1)))
        };
        match transaction.await {
            Ok((app, path)) => {
                if app != name || path != "upgrade_schema, public" {
                    errors.push(format!("settings lost: {app:?}, {path:?}"));
                }
                committed += 1;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                errors.push(format!("{e} ({:?})", e.code()));
                if client.is_closed() {
                    break;
                }
            }
        }
    }
    Worked { committed, errors }
}

/// Whether every worker commits a few more transactions (within 30 s).
async fn all_progress(progress: &[Arc<AtomicU64>]) -> bool {
    let before: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    let before = &before;
    eventually(Duration::from_secs(30), || async move {
        progress
            .iter()
            .zip(before)
            .all(|(p, b)| p.load(Ordering::Relaxed) > *b + 5)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_run_through_three_upgrades_without_an_error_or_a_reconnect() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, MuxOptions::sized(4)).await;
    let first_pid = mux.pid();
    let admin = mux.connect("app", "app").await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS upgrade_log; CREATE TABLE upgrade_log (worker int, n int)",
        )
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let mut progress = Vec::new();
    let mut connections = Vec::new();
    for id in 0..WORKERS {
        let (client, connection) = mux
            .try_connect("app", "app", common::password_for("app"))
            .await
            .unwrap();
        let made = Arc::new(AtomicU64::new(0));
        progress.push(made.clone());
        connections.push(connection);
        workers.push(tokio::spawn(worker(client, id as i32, made, stop.clone())));
    }
    let mut pids = vec![first_pid];
    for _ in 0..UPGRADES {
        // Every worker runs transactions before the upgrade and after it.
        assert!(
            all_progress(&progress).await,
            "workers stalled before an upgrade"
        );
        pids.push(mux.upgrade().await);
    }
    assert!(
        all_progress(&progress).await,
        "workers stalled after the last upgrade"
    );
    // No reconnect: every client's first connection is still open (a worker's
    // client closes it when the worker returns).
    assert!(
        connections.iter().all(|c| !c.is_finished()),
        "a connection closed"
    );
    stop.store(true, Ordering::Relaxed);
    let mut committed = 0;
    let mut errors = Vec::new();
    for w in workers {
        let worked = w.await.unwrap();
        committed += worked.committed;
        errors.extend(worked.errors);
    }
    assert!(errors.is_empty(), "errors: {errors:?}");
    // The admin client moved too (it was idle), and every commit is in.
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM upgrade_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as u64, committed);
    eprintln!(
        "upgrade test: {UPGRADES} upgrades (pids {pids:?}), {WORKERS} clients, {committed} transactions, {} errors, 0 reconnects",
        errors.len()
    );
    let log = mux.stderr_log();
    assert_eq!(
        log.matches("upgrade: clients handed over; this process stops")
            .count(),
        UPGRADES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_a_transaction_finishes_it_on_the_old_process_then_moves() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, MuxOptions::sized(2)).await;
    let old = mux.pid();
    let client = mux.connect("app", "app").await;
    client
        .batch_execute("DROP TABLE IF EXISTS upgrade_tx; CREATE TABLE upgrade_tx (n int)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO upgrade_tx VALUES (1)")
        .await
        .unwrap();
    let new = mux.request_upgrade().await;
    // The old process waits for this transaction: it cannot have exited.
    assert!(mux.alive(old), "the old process left a transaction behind");
    client
        .batch_execute("INSERT INTO upgrade_tx VALUES (2); COMMIT")
        .await
        .unwrap();
    mux.wait_gone(old).await;
    // Now on the new process, same connection.
    let n: i64 = client
        .query_one("SELECT count(*) FROM upgrade_tx", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    assert!(mux.alive(new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_reaches_the_query_of_a_moved_client() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, MuxOptions::sized(2)).await;
    let client = mux.connect("app", "app").await;
    let cancel = client.cancel_token();
    mux.upgrade().await;
    // The key it was given by the first process, sent to the port the new one serves.
    let sleeping = tokio::spawn(async move {
        client
            .simple_query("SELECT pg_sleep(60) /* upgrade cancel */")
            .await
    });
    let watcher = pg.superuser_on("app").await;
    let watcher = &watcher;
    assert!(
        eventually(Duration::from_secs(20), || async move {
            let rows = watcher
                .query(
                    "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%upgrade cancel%' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            !rows.is_empty()
        })
        .await
    );
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeping.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_cannot_start_leaves_the_old_one_serving() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::sized(2)).await;
    let client = mux.connect("app", "app").await;
    let config = std::fs::read_to_string(&mux.config_path).unwrap();
    // The new process reads the config again: this one it refuses.
    std::fs::write(
        &mux.config_path,
        format!("{config}\n[server]\nbroken = 1\n"),
    )
    .unwrap();
    mux.signal("USR2");
    let watched = &mux;
    assert!(
        eventually(Duration::from_secs(30), || async move {
            watched
                .stderr_log()
                .contains("upgrade given up: this process keeps serving")
        })
        .await,
        "{}",
        mux.stderr_log()
    );
    std::fs::write(&mux.config_path, config).unwrap();
    common::answers_select_1(&client).await;
    mux.still_serving().await;
    // A later upgrade may try again.
    let mut mux = mux;
    mux.upgrade().await;
    common::answers_select_1(&client).await;
}

/// The pool `app/app` as the admin port's `/pools` shows it.
async fn app_pool(mux: &TestPgmux) -> serde_json::Value {
    let pools = mux.admin_get("/pools").await.json();
    pools
        .as_array()
        .and_then(|pools| {
            pools
                .iter()
                .find(|p| p["database"] == "app" && p["user"] == "app")
        })
        .cloned()
        .unwrap_or_else(|| panic!("no pool app/app in {pools}"))
}

/// The backend process id the client's queries run on.
async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Whether backend `pid` holds an advisory lock (seen from another connection).
async fn holds_advisory_lock(pg: &TestPostgres, pid: i32) -> bool {
    let watcher = pg.superuser_on("app").await;
    let row = watcher
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            &[&pid],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) == 1
}

/// Runs a long pg_sleep on `client` marked with `mark`, cancels it with the client's
/// cancel key once it runs, and returns the error the query ended with.
async fn cancelled_sleep(
    pg: &TestPostgres,
    client: Arc<tokio_postgres::Client>,
    mark: &'static str,
) -> tokio_postgres::Error {
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        client
            .simple_query(&format!("SELECT pg_sleep(60) /* {mark} */"))
            .await
    });
    let watcher = pg.superuser_on("app").await;
    let watcher = &watcher;
    let pattern = format!("%{mark}%");
    let pattern = &pattern;
    assert!(
        eventually(Duration::from_secs(20), || async move {
            let rows = watcher
                .query(
                    "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1 AND pid <> pg_backend_pid()",
                    &[pattern],
                )
                .await
                .unwrap();
            !rows.is_empty()
        })
        .await,
        "the sleep never ran"
    );
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    sleeping.await.unwrap().unwrap_err()
}

/// A session-mode client keeps its server: it moves with it, through two upgrades, and
/// sees nothing: the same backend, its temporary table, its advisory lock, its cancel key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_client_moves_with_its_server_through_two_upgrades() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        mode: "session",
        admin: Some(String::new()),
        ..MuxOptions::sized(2)
    };
    let mut mux = TestPgmux::start(pg, opts).await;
    let (client, connection) = mux
        .try_connect("app", "app", common::password_for("app"))
        .await
        .unwrap();
    let client = Arc::new(client);
    client
        .batch_execute(
            "CREATE TEMP TABLE moved_session (n int); INSERT INTO moved_session VALUES (7); \
             SELECT pg_advisory_lock(4711)",
        )
        .await
        .unwrap();
    let pid = backend_pid(&client).await;
    for _ in 0..2 {
        let old = mux.pid();
        let new = mux.upgrade().await;
        assert_ne!(old, new);
        assert_eq!(backend_pid(&client).await, pid, "another backend");
        let n: i32 = client
            .query_one("SELECT n FROM moved_session", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 7);
        assert!(holds_advisory_lock(pg, pid).await, "the lock was lost");
        let pool = app_pool(&mux).await;
        assert_eq!(
            (pool["active"].as_u64(), pool["idle"].as_u64()),
            (Some(1), Some(0)),
            "{pool}"
        );
        let servers = mux.admin_get("/servers").await.json();
        assert!(
            servers
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["pid"] == pid)),
            "{servers}"
        );
    }
    let err = cancelled_sleep(pg, client.clone(), "moved session cancel").await;
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    assert_eq!(backend_pid(&client).await, pid);
    assert!(!connection.is_finished(), "the connection closed");
    // At its close, the server goes back to the pool (reset) as one this process opened.
    drop(client);
    let watched = &mux;
    assert!(
        eventually(Duration::from_secs(20), || async move {
            let pool = app_pool(watched).await;
            pool["active"] == 0 && pool["idle"] == 1
        })
        .await,
        "{}",
        app_pool(&mux).await
    );
    assert!(
        !holds_advisory_lock(pg, pid).await,
        "DISCARD ALL left the lock"
    );
}

/// Transaction mode: clients pinned by a temporary table and by an advisory lock move with
/// their servers, through two upgrades; the second to a config with a smaller pool and
/// server budget, which takes them anyway and closes the extra one when it is given back.
/// Two worker threads: each moved client, and the server with it, lands on one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_clients_move_with_their_servers_and_unpin_in_the_new_process() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        admin: Some(String::new()),
        server_extra: "worker_threads = 2".into(),
        pool_extra: "max_db_connections = 4".to_owned(),
        ..MuxOptions::sized(4)
    };
    let mut mux = TestPgmux::start(pg, opts.clone()).await;
    let temp = Arc::new(mux.connect("app", "app").await);
    let lock = Arc::new(mux.connect("app", "app").await);
    temp.batch_execute("CREATE TEMP TABLE moved_pin (n int); INSERT INTO moved_pin VALUES (3)")
        .await
        .unwrap();
    lock.batch_execute("SELECT pg_advisory_lock(4712)")
        .await
        .unwrap();
    let temp_pid = backend_pid(&temp).await;
    let lock_pid = backend_pid(&lock).await;
    assert_ne!(temp_pid, lock_pid);
    // A statement registered first (`pgmux_s1`) by a client that leaves, then one prepared
    // on the pinned server (`pgmux_s2` there). The new process names the latter
    // `pgmux_s1` and its next new statement `pgmux_s2`, which the moved server holds with
    // another text: it must be closed there before it is prepared.
    let other = mux.connect("app", "app").await;
    other.prepare("SELECT 'other'::text").await.unwrap();
    drop(other);
    let watched = &mux;
    assert!(
        eventually(Duration::from_secs(20), || async move {
            let clients = watched.admin_get("/clients").await.json();
            clients.as_array().is_some_and(|c| c.len() == 2)
        })
        .await
    );
    let pinned_statement = temp.prepare("SELECT n + $1 FROM moved_pin").await.unwrap();
    for round in 0..2 {
        if round == 1 {
            let smaller = MuxOptions {
                pool_extra: "max_db_connections = 1".to_owned(),
                ..MuxOptions {
                    size: 1,
                    ..opts.clone()
                }
            };
            mux.rewrite_config(pg, &smaller);
        }
        mux.upgrade().await;
        assert_eq!(backend_pid(&temp).await, temp_pid, "another backend");
        assert_eq!(backend_pid(&lock).await, lock_pid, "another backend");
        let n: i32 = temp
            .query_one("SELECT n FROM moved_pin", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3);
        let n: i32 = temp
            .query_one(&pinned_statement, &[&1])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 4);
        let fresh = format!("SELECT n * {} FROM moved_pin", round + 2);
        let n: i32 = temp.query_one(&fresh, &[]).await.unwrap().get(0);
        assert_eq!(n, 3 * (round + 2));
        let fresh = temp.prepare(&fresh).await.unwrap();
        let n: i32 = temp.query_one(&fresh, &[]).await.unwrap().get(0);
        assert_eq!(n, 3 * (round + 2));
        assert!(holds_advisory_lock(pg, lock_pid).await, "the lock was lost");
        let pool = app_pool(&mux).await;
        assert_eq!(pool["active"], 2, "{pool}");
        assert_eq!(pool["pinned"], 2, "{pool}");
        let budget = &pool["limits"][0];
        assert_eq!(budget["setting"], "max_db_connections", "{pool}");
        assert_eq!(budget["in_use"], 2, "{pool}");
    }
    let err = cancelled_sleep(pg, temp.clone(), "moved pin cancel").await;
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    assert_eq!(backend_pid(&temp).await, temp_pid);
    // State gone: each unpins and gives its server back; the pool of 1 keeps one.
    temp.batch_execute("DISCARD ALL").await.unwrap();
    lock.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    let watched = &mux;
    assert!(
        eventually(Duration::from_secs(20), || async move {
            let pool = app_pool(watched).await;
            pool["pinned"] == 0 && pool["active"] == 0 && pool["idle"] == 1
        })
        .await,
        "{}",
        app_pool(&mux).await
    );
    let budget = &app_pool(&mux).await["limits"][0];
    assert_eq!(budget["in_use"], 1, "{budget}");
    common::answers_select_1(&temp).await;
    common::answers_select_1(&lock).await;
}

/// `pinned_idle_timeout` applies to a client moved in pinned: the new process (started
/// with the limit, which the old one did not have) ends it when it stays idle, and its
/// server goes back to the pool, reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_idle_timeout_ends_a_client_moved_in_pinned() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        admin: Some(String::new()),
        ..MuxOptions::sized(2)
    };
    let mut mux = TestPgmux::start(pg, opts.clone()).await;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(mux.port)
        .user("app")
        .password(common::password_for("app"))
        .dbname("app");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    client
        .batch_execute("CREATE TEMP TABLE moved_idle (n int)")
        .await
        .unwrap();
    let pid = backend_pid(&client).await;
    // Only the new process reads this: the old one is not reloaded.
    mux.rewrite_config(pg, &opts.with_pool("pinned_idle_timeout = \"1s\""));
    mux.upgrade().await;
    let closed = connection.await.unwrap().unwrap_err();
    assert_eq!(
        closed.code(),
        Some(&SqlState::IDLE_SESSION_TIMEOUT),
        "{closed}"
    );
    let watched = &mux;
    assert!(
        eventually(Duration::from_secs(20), || async move {
            let pool = app_pool(watched).await;
            pool["pinned"] == 0 && pool["active"] == 0 && pool["idle"] == 1
        })
        .await,
        "{}",
        app_pool(&mux).await
    );
    // Reset and kept, not closed: the same backend is idle in the pool.
    let servers = mux.admin_get("/servers").await.json();
    assert!(
        servers
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["pid"] == pid)),
        "{servers}"
    );
}

/// A client that keeps a server pgmux talks TLS to cannot move (the session keys stay in
/// the old process): it gets 57P01 and a hint right away (between transactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeping_a_tls_server_gets_57p01_and_reconnects() {
    let pg = common::tls::tls_cluster().await;
    let opts = MuxOptions {
        mode: "session",
        ..MuxOptions::sized(2).with_pool("server_tls = \"require\"")
    };
    let mut mux = TestPgmux::start(pg, opts).await;
    let old = mux.pid();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(mux.port)
        .user("app")
        .password(common::password_for("app"))
        .dbname("app");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    // The connection's own outcome: the FATAL pgmux sends between transactions.
    let connection = tokio::spawn(connection);
    common::answers_select_1(&client).await;
    mux.request_upgrade().await;
    let closed = connection.await.unwrap().unwrap_err();
    assert_eq!(closed.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{closed}");
    let said = closed.as_db_error().expect("a FATAL from pgmux");
    assert!(said.message().contains("TLS"), "{said:?}");
    assert!(
        said.hint().is_some_and(|h| h.contains("reconnect")),
        "{said:?}"
    );
    mux.wait_gone(old).await;
    mux.still_serving().await;
}

/// pgbench (prepared protocol, transactions of two statements) started right before each
/// of three upgrades: every transaction it counts succeeds, none fails, none reconnects
/// (pgbench counts a lost connection as a failed client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_three_upgrades() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, MuxOptions::sized(4)).await;
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        "\\set v random(1, 1000)\nBEGIN;\nSELECT :v;\nSELECT :v + 1;\nEND;\n",
    )
    .unwrap();
    let url = mux.url("app", "app");
    let mut processed = 0;
    for _ in 0..UPGRADES {
        let (bin, url, script) = (
            pg.bin_dir().to_owned(),
            url.clone(),
            script.path().display().to_string(),
        );
        let bench = tokio::task::spawn_blocking(move || {
            let args = [
                "-n", "-c", "4", "-j", "2", "-t", "400", "-M", "prepared", "-f", &script, &url,
            ];
            common::run_pgbench(&bin, &args)
        });
        mux.upgrade().await;
        let run = bench.await.unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "pgbench failed: {stderr}\n{stdout}");
        assert!(
            stdout.contains("number of transactions actually processed: 1600/1600"),
            "{stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{stdout}"
        );
        processed += 1600;
    }
    eprintln!("pgbench through {UPGRADES} upgrades: {processed} transactions, 0 failed");
}

/// A client whose query runs on the old process when the new one takes over: its cancel
/// request reaches the new process, which passes it back to the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_reaches_a_query_still_running_on_the_old_process() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, MuxOptions::sized(2)).await;
    let old = mux.pid();
    let client = Arc::new(mux.connect("app", "app").await);
    let cancel = client.cancel_token();
    let running = client.clone();
    let sleeping = tokio::spawn(async move {
        running
            .simple_query("SELECT pg_sleep(60) /* upgrade old cancel */")
            .await
    });
    let watcher = pg.superuser_on("app").await;
    let watcher = &watcher;
    let started = || async move {
        let rows = watcher
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%upgrade old cancel%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        !rows.is_empty()
    };
    assert!(eventually(Duration::from_secs(20), started).await);
    mux.request_upgrade().await;
    // The query holds a server on the old process: it cannot have moved.
    assert!(mux.alive(old));
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeping.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    mux.wait_gone(old).await;
    common::answers_select_1(&client).await;
}

/// What upgrades did is on `/metrics`, and runs on from process to process (the admin
/// port moves with the rest). (A client closed instead of moved is counted in
/// tests/tls_client.rs: TLS clients cannot move.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_counts_are_on_metrics_across_processes() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        admin: Some(String::new()),
        ..MuxOptions::sized(2)
    };
    let mut mux = TestPgmux::start(pg, opts).await;
    let upgrades = |result| [("result", result)];
    let clients = |outcome| [("outcome", outcome)];
    assert_eq!(
        mux.metric("pgmux_upgrades_total", &upgrades("handed_over"))
            .await,
        Some(0.0)
    );
    assert_eq!(
        mux.metric("pgmux_upgrade_in_progress", &[]).await,
        Some(0.0)
    );
    let idle = mux.connect("app", "app").await;
    for round in 1..=2 {
        mux.upgrade().await;
        common::answers_select_1(&idle).await;
        // The old process's counts come with its last record, which the new process may
        // read a moment after the old one exited.
        let n = f64::from(round);
        let counts = || async {
            [
                mux.metric("pgmux_upgrades_total", &upgrades("handed_over"))
                    .await,
                mux.metric("pgmux_upgrades_total", &upgrades("failed"))
                    .await,
                mux.metric("pgmux_upgrade_clients_total", &clients("moved"))
                    .await,
                mux.metric("pgmux_upgrade_clients_total", &clients("received"))
                    .await,
                mux.metric("pgmux_upgrade_clients_total", &clients("closed"))
                    .await,
                mux.metric("pgmux_upgrade_in_progress", &[]).await,
            ]
        };
        let expected = [n, 0.0, n, n, 0.0, 0.0].map(Some);
        let settled = eventually(Duration::from_secs(10), || async {
            counts().await == expected
        })
        .await;
        assert!(settled, "round {round}: {:?}", counts().await);
    }
}

/// A client that LISTENs moves too, and gets every notification exactly once and in
/// order: a producer straight on PostgreSQL NOTIFYs numbered payloads without a pause
/// through two upgrades; each listener must see 0, 1, 2, ... on each of its channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_clients_move_and_miss_no_notification() {
    use futures_util::StreamExt;
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, MuxOptions::sized(3)).await;
    let mut listeners = Vec::new();
    for channels in [&["moving_a"][..], &["moving_a", "moving_b"][..]] {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(mux.port)
            .user("app")
            .password(common::password_for("app"))
            .dbname("app");
        let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        let (tx, notes) = tokio::sync::mpsc::unbounded_channel();
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let ended = tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                    }
                    Ok(_) => {}
                    Err(e) => return Some(e.to_string()),
                }
            }
            None
        });
        for channel in channels {
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .unwrap();
        }
        listeners.push((client, notes, ended, channels));
    }
    let producer = pg.superuser_on("app").await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let producing = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                producer
                    .batch_execute(&format!("NOTIFY moving_a, '{n}'; NOTIFY moving_b, '{n}'"))
                    .await
                    .unwrap();
                n += 1;
                sent.store(n, Ordering::Relaxed);
            }
            producer
                .batch_execute("NOTIFY moving_a, 'end'; NOTIFY moving_b, 'end'")
                .await
                .unwrap();
            n
        })
    };
    let wait_sent = |at_least: u64| {
        let sent = sent.clone();
        async move {
            assert!(
                eventually(Duration::from_secs(30), || async {
                    sent.load(Ordering::Relaxed) >= at_least
                })
                .await,
                "the producer stalled"
            );
        }
    };
    wait_sent(50).await;
    for _ in 0..2 {
        mux.upgrade().await;
        let now = sent.load(Ordering::Relaxed);
        wait_sent(now + 50).await;
    }
    stop.store(true, Ordering::Relaxed);
    let total = producing.await.unwrap();
    for (client, mut notes, ended, channels) in listeners {
        let mut next = std::collections::HashMap::new();
        let mut ends = 0;
        while ends < channels.len() {
            let (channel, payload) = tokio::time::timeout(Duration::from_secs(30), notes.recv())
                .await
                .expect("a notification within 30 s")
                .expect("the listener's connection is open");
            assert!(channels.contains(&channel.as_str()), "{channel}");
            let expected = next.entry(channel.clone()).or_insert(0u64);
            if payload == "end" {
                assert_eq!(
                    *expected, total,
                    "{channel}: notifications missing at the end"
                );
                ends += 1;
                continue;
            }
            assert_eq!(
                payload,
                expected.to_string(),
                "{channel}: out of order, lost or twice"
            );
            *expected += 1;
        }
        // Same connection all along.
        common::answers_select_1(&client).await;
        assert!(!ended.is_finished(), "{:?}", ended.await);
    }
    let log = mux.stderr_log();
    assert!(!log.contains("cannot move this session"), "{log}");
    eprintln!(
        "{total} notifications on each of 2 channels through 2 upgrades: none lost, none twice"
    );
}

/// With worker threads, the clients an upgrade moves in are spread over the threads as
/// accepted ones are, not all left on the thread that receives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_clients_are_spread_over_the_worker_threads() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        admin: Some(String::new()),
        server_extra: "worker_threads = 2".into(),
        ..MuxOptions::sized(2)
    };
    let mut mux = TestPgmux::start(pg, opts).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(mux.connect("app", "app").await);
    }
    let spread = [Some(2.0), Some(2.0)];
    assert!(
        eventually(Duration::from_secs(10), || async {
            per_worker(&mux).await == spread
        })
        .await,
        "before the upgrade: {:?}",
        per_worker(&mux).await
    );
    mux.upgrade().await;
    for client in &clients {
        common::answers_select_1(client).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            per_worker(&mux).await == spread
        })
        .await,
        "after the upgrade: {:?}",
        per_worker(&mux).await
    );
}

/// Sessions on worker 0 and worker 1, from `/metrics`.
async fn per_worker(mux: &TestPgmux) -> [Option<f64>; 2] {
    [
        mux.metric("pgmux_worker_sessions", &[("worker", "0")])
            .await,
        mux.metric("pgmux_worker_sessions", &[("worker", "1")])
            .await,
    ]
}
