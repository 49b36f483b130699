//! The admin HTTP port against a real PostgreSQL: metrics that parse and move under a
//! known load, readiness that follows the upstream, the pools / servers views, reload
//! without dropping anyone, pause / resume / reconnect, and the bearer token.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Http, MuxOptions, TestPgmux, TestPostgres};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;
use tokio_postgres::error::SqlState;

/// Options with an admin port (no token) and `size`.
fn with_admin(size: u32) -> MuxOptions {
    MuxOptions {
        size,
        admin: Some(String::new()),
        ..MuxOptions::default()
    }
}

/// `/metrics`, parsed by a Prometheus text parser.
struct Metrics(Scrape);

impl Metrics {
    async fn scrape(mux: &TestPgmux) -> Metrics {
        let response = mux.admin_get("/metrics").await;
        assert_eq!(response.status, 200, "{}", response.body);
        let content_type = response.header("content-type").unwrap_or_default();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        let lines = response.body.lines().map(|l| Ok(l.to_owned()));
        Metrics(Scrape::parse(lines).expect("the Prometheus text format"))
    }

    /// The value of a counter, gauge or untyped sample with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        common::metric_sample(&self.0, name, labels)
    }

    /// The sum of every counter, gauge or untyped sample with these labels (and any
    /// others): what `sum by` over the remaining labels gives.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        common::metric_values(&self.0, name, labels).sum()
    }

    /// `value`, panicking with the family's samples when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| {
            let family: Vec<_> = self
                .0
                .samples
                .iter()
                .filter(|s| s.metric.starts_with(name))
                .collect();
            panic!("no sample {name}{labels:?}; family: {family:#?}")
        })
    }

    /// The buckets of a histogram, (upper bound, cumulative count), +Inf last.
    fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .find_map(|s| match &s.value {
                Value::Histogram(h) => Some(h.iter().map(|b| (b.less_than, b.count)).collect()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name}{labels:?}"))
    }
}

const APP: [(&str, &str); 2] = [("database", "app"), ("user", "app")];

/// Polls `check` every 50 ms until it returns Some, for up to `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `/pools` entry for app/app.
async fn app_pool(mux: &TestPgmux) -> Json {
    let response = mux.admin_get("/pools").await;
    assert_eq!(response.status, 200, "{}", response.body);
    response
        .json()
        .as_array()
        .and_then(|pools| {
            pools
                .iter()
                .find(|p| p["database"] == "app" && p["user"] == "app")
                .cloned()
        })
        .unwrap_or_else(|| panic!("no app/app pool in {}", response.body))
}

#[tokio::test]
async fn metrics_parse_and_move_under_load() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            // Long enough that the 18 waiters are still waiting when a loaded machine
            // gets to scrape them.
            wait_timeout: "3s",
            ..with_admin(2)
        },
    )
    .await;
    let first = mux.connect("app", "app").await;
    first.simple_query("SELECT 1").await.unwrap();

    let before = Metrics::scrape(&mux).await;
    assert_eq!(before.get("pgmux_pool_size", &APP), 2.0);
    assert_eq!(before.get("pgmux_pool_waiting_clients", &APP), 0.0);
    assert_eq!(before.get("pgmux_wait_timeouts_total", &APP), 0.0);
    assert!(before.get("pgmux_upstream_up", &APP) == 1.0);
    assert!(before.get("pgmux_upstream_connect_attempts_total", &APP) >= 1.0);
    assert!(before.get("process_resident_memory_bytes", &[]) > 0.0);
    assert!(before.value("process_open_fds", &[]).is_some());
    assert_eq!(before.get("pgmux_config_last_reload_success", &[]), 1.0);
    // Summed over `cause`, as a dashboard's `sum by (database, user)` does.
    let waits_before = before.sum("pgmux_wait_seconds_count", &APP);
    // Never a client address among the labels.
    for sample in &before.0.samples {
        for key in ["addr", "address", "client", "peer"] {
            assert!(sample.labels.get(key).is_none(), "{sample:?}");
        }
    }

    // Two holders pin both servers; 18 more clients queue behind them and time out.
    let holders = [
        mux.connect("app", "app").await,
        mux.connect("app", "app").await,
    ];
    for h in &holders {
        h.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    let mut queued = Vec::new();
    for _ in 0..18 {
        queued.push(mux.connect("app", "app").await);
    }
    let mut waiters = Vec::new();
    for client in queued {
        waiters.push(tokio::spawn(async move {
            let err = client.simple_query("SELECT 1").await.unwrap_err();
            assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
            client
        }));
    }
    let waiting = [("database", "app"), ("user", "app"), ("state", "waiting")];
    let loaded = eventually(Duration::from_secs(5), "18 waiting clients", || async {
        let m = Metrics::scrape(&mux).await;
        // The pool's queue and the sessions' own state (in the registry), in one scrape.
        (m.get("pgmux_pool_waiting_clients", &APP) >= 18.0
            && m.get("pgmux_clients", &waiting) >= 18.0)
            .then_some(m)
    })
    .await;
    let active = [("database", "app"), ("user", "app"), ("state", "active")];
    assert_eq!(loaded.get("pgmux_servers", &active), 2.0);
    assert_eq!(loaded.get("pgmux_pool_utilization_ratio", &APP), 1.0);
    assert!(loaded.get("pgmux_pool_oldest_wait_seconds", &APP) > 0.0);
    // The session reports its state to the registry.
    assert!(loaded.get("pgmux_clients", &waiting) >= 18.0);

    let mut clients = Vec::new();
    for w in waiters {
        clients.push(w.await.unwrap());
    }
    for h in &holders {
        h.batch_execute("COMMIT").await.unwrap();
    }
    for c in &clients {
        c.simple_query("SELECT 1").await.unwrap();
    }

    let after = Metrics::scrape(&mux).await;
    assert_eq!(after.get("pgmux_pool_waiting_clients", &APP), 0.0);
    assert_eq!(after.get("pgmux_wait_timeouts_total", &APP), 18.0);
    let waits = after.sum("pgmux_wait_seconds_count", &APP);
    assert!(
        waits >= waits_before + 18.0 + 18.0,
        "{waits_before} -> {waits}"
    );
    // Every timeout waited about wait_timeout: they sit above the 0.5 s bucket.
    let full = [APP[0], APP[1], ("cause", "pool_full")];
    let buckets = after.buckets("pgmux_wait_seconds", &full);
    let at_half_second = buckets.iter().find(|(le, _)| *le == 0.5).map(|b| b.1);
    let total = buckets.last().map(|b| b.1).unwrap_or_default();
    assert!(
        total - at_half_second.unwrap_or(total) >= 18.0,
        "{buckets:?}"
    );
    assert!(after.get("pgmux_wait_seconds_sum", &full) >= 18.0 * 0.7);
    assert!(after.sum("pgmux_wait_seconds_sum", &APP) >= 18.0 * 0.7);
    assert!(after.get("pgmux_transactions_total", &APP) >= 21.0);
    assert!(after.get("pgmux_server_hold_seconds_count", &APP) >= 21.0);
    assert!(after.get("pgmux_transaction_duration_seconds_count", &APP) >= 21.0);
    assert!(after.get("pgmux_queries_total", &APP) >= 21.0);
    assert!(after.get("pgmux_client_received_bytes_total", &APP) > 0.0);
    assert!(after.get("pgmux_client_sent_bytes_total", &APP) > 0.0);

    // A server error is counted by SQLSTATE class.
    first
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    let errors = Metrics::scrape(&mux).await;
    let class = [("database", "app"), ("user", "app"), ("class", "42")];
    assert_eq!(errors.get("pgmux_server_errors_total", &class), 1.0);
}

#[tokio::test]
async fn ready_follows_the_upstream() {
    let pg = TestPostgres::start().await;
    let mux = TestPgmux::start(&pg, with_admin(2)).await;
    let client = mux.connect("app", "app").await;
    client.simple_query("SELECT 1").await.unwrap();
    let ready = mux.admin_get("/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);

    pg.stop().await;
    let down = eventually(Duration::from_secs(10), "/ready to say 503", || async {
        let r = mux.admin_get("/ready").await;
        (r.status == 503).then_some(r)
    })
    .await;
    let reasons = down.json()["reasons"].to_string();
    assert!(
        reasons.contains("app/app") && reasons.contains("unreachable"),
        "{reasons}"
    );
    // Liveness is not readiness: the process still serves.
    assert_eq!(mux.admin_get("/health").await.status, 200);
    let m = Metrics::scrape(&mux).await;
    assert_eq!(m.get("pgmux_upstream_up", &APP), 0.0);
    assert!(m.get("pgmux_upstream_connect_failures_total", &APP) >= 1.0);

    pg.restart().await;
    eventually(
        Duration::from_secs(15),
        "/ready to say 200 again",
        || async { (mux.admin_get("/ready").await.status == 200).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn pools_show_utilization_status_and_advice() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, with_admin(2)).await;
    let first = mux.connect("app", "app").await;
    first.simple_query("SELECT 1").await.unwrap();
    let idle = app_pool(&mux).await;
    assert_eq!(idle["size"], 2);
    assert_eq!(idle["mode"], "transaction");
    assert_eq!(idle["utilization_percent"], 0.0);
    assert_eq!(idle["status"], "normal");
    // Once a connection sat idle, upkeep asked the upstream its max_connections.
    let known = eventually(Duration::from_secs(5), "max_connections", || async {
        let pool = app_pool(&mux).await;
        pool["advice"]["upstream_max_connections"]
            .as_u64()
            .map(|_| pool)
    })
    .await;
    assert_eq!(known["advice"]["upstream_max_connections"], 200);
    // Every configured pool counts from the start: app/app and app/other, size 2 each.
    assert_eq!(known["advice"]["upstream_pools_size"], 4);
    assert_eq!(known["advice"]["upstream_headroom"], 196);

    // One of two servers busy: 50 %.
    first.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let half = app_pool(&mux).await;
    assert_eq!(half["active"], 1);
    assert_eq!(half["utilization_percent"], 50.0);
    assert_eq!(half["status"], "normal");

    // Both busy and three more wanting one: critical, and the advice says 5.
    let second = mux.connect("app", "app").await;
    second.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let c = mux.connect("app", "app").await;
        waiters.push(tokio::spawn(async move {
            c.simple_query("SELECT 1").await.map(|_| ())
        }));
    }
    let busy = eventually(Duration::from_secs(5), "3 waiting", || async {
        let pool = app_pool(&mux).await;
        (pool["waiting"] == 3).then_some(pool)
    })
    .await;
    assert_eq!(busy["utilization_percent"], 100.0);
    assert_eq!(busy["status"], "critical");
    assert!(busy["oldest_wait_ms"].as_u64().is_some());
    let advice = &busy["advice"];
    assert_eq!(advice["peak_demand"], 5, "{advice}");
    assert_eq!(advice["suggested_size"], 5, "{advice}");
    let summary = advice["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("raise size from 2 to 5"), "{summary}");

    first.batch_execute("COMMIT").await.unwrap();
    second.batch_execute("COMMIT").await.unwrap();
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    let after = app_pool(&mux).await;
    assert_eq!(after["waiting"], 0);
    assert_eq!(after["wait_timeouts_last_minute"], 0);
    // The peak stays in the window.
    assert_eq!(after["advice"]["peak_demand"], 5);
    assert!(
        after["advice"]["arrival_rate_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
}

#[tokio::test]
async fn servers_and_clients_name_the_long_holder() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, with_admin(2)).await;
    let holder = mux.connect("app", "app").await;
    let other = mux.connect("app", "app").await;
    other.simple_query("SELECT 1").await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let row = holder
        .query_one("SELECT pg_backend_pid() AS long_holder", &[])
        .await
        .unwrap();
    let pid: i32 = row.get(0);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let servers = mux.admin_get("/servers").await;
    assert_eq!(servers.status, 200);
    let servers = servers.json();
    let first = &servers[0];
    // Its client sits in an open transaction: said as pg_stat_activity says it.
    assert_eq!(first["state"], "idle in transaction", "{servers:#}");
    assert_eq!(first["pid"], pid);
    assert!(first["held_ms"].as_u64().unwrap_or(0) >= 3000, "{first}");
    assert!(first["age_ms"].as_u64().unwrap_or(0) >= 3000, "{first}");
    assert_eq!(first["database"], "app");
    assert_eq!(first["in_transaction"], true, "{first}");
    let query = first["query"].as_str().unwrap_or_default();
    assert!(query.contains("long_holder"), "{first}");
    assert!(
        first["client"]["addr"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:")
    );
    // Idle servers come after the active one.
    assert!(
        servers
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .all(|s| s["state"] == "idle")
    );

    let clients = mux.admin_get("/clients").await.json();
    let top = &clients[0];
    assert_eq!(top["state"], "idle in transaction", "{clients:#}");
    assert_eq!(top["server"]["pid"], pid);
    // The client view keeps time with the coarse clock: within one kernel tick (<= 10 ms).
    assert!(
        top["server"]["held_ms"].as_u64().unwrap_or(0) >= 2990,
        "{top}"
    );
    assert_eq!(clients.as_array().unwrap().len(), 2);
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn reload_grows_the_pool_under_load_and_refuses_a_bad_file() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        wait_timeout: "30s",
        ..with_admin(2)
    };
    let mux = TestPgmux::start(pg, opts.clone()).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = mux.connect("app", "app").await;
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                client.simple_query("SELECT pg_sleep(0.02)").await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app_pool(&mux).await["active"].as_u64().map(|n| n <= 2),
        Some(true)
    );

    mux.rewrite_config(
        pg,
        &MuxOptions {
            size: 10,
            ..opts.clone()
        },
    );
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    let changes = reload.json()["changes"].to_string();
    assert!(changes.contains("pool app/app: size 2 -> 10"), "{changes}");
    let grown = eventually(
        Duration::from_secs(5),
        "more than 2 servers busy",
        || async {
            let pool = app_pool(&mux).await;
            (pool["active"].as_u64().unwrap_or(0) > 2).then_some(pool)
        },
    )
    .await;
    assert_eq!(grown["size"], 10);

    // A bad file changes nothing and says why, with the line.
    let good = std::fs::read_to_string(&mux.config_path).unwrap();
    std::fs::write(
        &mux.config_path,
        good.replace("size = 10", "size = \"ten\""),
    )
    .unwrap();
    let bad = mux.admin_post("/reload").await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    let errors = bad.json()["errors"].to_string();
    assert!(
        errors.contains("pool.size") && errors.contains("expected an integer"),
        "{errors}"
    );
    assert_eq!(app_pool(&mux).await["size"], 10);
    let m = Metrics::scrape(&mux).await;
    assert_eq!(
        m.get("pgmux_config_reloads_total", &[("result", "failure")]),
        1.0
    );
    assert_eq!(
        m.get("pgmux_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(m.get("pgmux_config_last_reload_success", &[]), 0.0);

    // SIGHUP reloads too: shrink back to 3 with everyone still running.
    mux.rewrite_config(pg, &MuxOptions { size: 3, ..opts });
    mux.signal("HUP");
    eventually(Duration::from_secs(5), "size 3 after SIGHUP", || async {
        (app_pool(&mux).await["size"] == 3).then_some(())
    })
    .await;
    let before = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        done.load(Ordering::Relaxed) > before,
        "clients keep running"
    );

    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap().expect("no client saw an error");
    }
    let pool = app_pool(&mux).await;
    assert!(
        pool["active"].as_u64().unwrap_or(99) + pool["idle"].as_u64().unwrap_or(99) <= 3,
        "{pool}"
    );
    assert!(mux.stderr_log().contains("config reloaded"));
}

#[tokio::test]
async fn pause_holds_clients_and_resume_lets_them_through() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            // After the resume, the five waiters get this long for two connections to
            // open and serve them: ample even on a loaded 2-core CI machine (1 s was not).
            wait_timeout: "3s",
            ..with_admin(2)
        },
    )
    .await;
    let running = mux.connect("app", "app").await;
    running.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Pause waits for the running transaction.
    let pause = {
        let port = mux.admin_port.unwrap();
        tokio::spawn(async move {
            common::http_request(port, "POST", "/pools/app/app/pause", None).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "pause waits for running transactions");
    running.batch_execute("COMMIT").await.unwrap();
    let paused = pause.await.unwrap();
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["drained"], true);

    let mut held = Vec::new();
    for _ in 0..5 {
        let c = mux.connect("app", "app").await;
        held.push(tokio::spawn(async move {
            c.simple_query("SELECT 1").await.map(|_| ())
        }));
    }
    // Longer than wait_timeout: a pause does not time anyone out.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "paused clients are held"
    );
    let pool = app_pool(&mux).await;
    assert_eq!(pool["paused"], true);
    assert_eq!(pool["waiting"], 5);
    assert_eq!(
        pool["active"].as_u64().unwrap_or(9) + pool["idle"].as_u64().unwrap_or(9),
        0
    );

    let resumed = mux.admin_post("/pools/app/app/resume").await;
    assert_eq!(resumed.status, 200);
    for h in held {
        h.await.unwrap().expect("released without an error");
    }
    assert_eq!(app_pool(&mux).await["paused"], false);
}

#[tokio::test]
async fn reconnect_replaces_servers_and_unknown_pools_are_404() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, with_admin(1)).await;
    let client = mux.connect("app", "app").await;
    let pid = |c: tokio_postgres::Row| c.get::<_, i32>(0);
    let before = pid(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap());
    let r = mux.admin_post("/pools/app/app/reconnect").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let after = pid(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap());
    assert_ne!(before, after, "a new server connection");
    let m = Metrics::scrape(&mux).await;
    let reason = [
        ("database", "app"),
        ("user", "app"),
        ("reason", "reconnect"),
    ];
    assert_eq!(m.get("pgmux_server_connections_closed_total", &reason), 1.0);

    assert_eq!(mux.admin_post("/pools/nope/app/pause").await.status, 404);
    assert_eq!(mux.admin_post("/pools/app/app/explode").await.status, 404);
}

#[tokio::test]
async fn the_token_guards_everything_but_health_and_ready() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            admin: Some("token = \"s3cret\"".to_owned()),
            ..MuxOptions::default()
        },
    )
    .await;
    for path in ["/metrics", "/pools", "/clients", "/servers", "/"] {
        let none = mux.admin("GET", path, None).await;
        assert_eq!(none.status, 401, "{path}");
        assert!(none.header("www-authenticate").is_some());
        assert_eq!(
            mux.admin("GET", path, Some("wrong")).await.status,
            401,
            "{path}"
        );
        let ok: Http = mux.admin("GET", path, Some("s3cret")).await;
        assert_eq!(ok.status, 200, "{path}: {}", ok.body);
    }
    assert_eq!(mux.admin("POST", "/reload", None).await.status, 401);
    assert_eq!(
        mux.admin("POST", "/reload", Some("s3cret")).await.status,
        200
    );
    assert_eq!(mux.admin_get("/health").await.status, 200);
    assert_eq!(mux.admin_get("/ready").await.status, 200);
}

#[tokio::test]
async fn a_removed_database_ends_its_sessions_between_transactions() {
    let pg = TestPostgres::shared().await;
    let extra = format!(
        "[databases.gone]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n",
        pg.port
    );
    let opts = MuxOptions {
        extra: extra.clone(),
        ..MuxOptions::default()
    };
    let mux = TestPgmux::start(pg, opts.clone()).await;
    let doomed = mux.connect("gone", "app").await;
    let kept = mux.connect("app", "app").await;
    doomed.batch_execute("BEGIN; SELECT 1").await.unwrap();

    mux.rewrite_config(
        pg,
        &MuxOptions {
            extra: String::new(),
            ..opts
        },
    );
    mux.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The running transaction finishes; then the session ends with 57P01.
    doomed.batch_execute("SELECT 2; COMMIT").await.unwrap();
    let err = doomed.simple_query("SELECT 3").await.unwrap_err();
    assert!(
        err.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "{err}"
    );
    // Other pools are untouched, and the removed database is refused to new clients.
    assert_eq!(
        kept.query_one("SELECT 4", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        4
    );
    let refused = mux
        .try_connect("gone", "app", "app_pw")
        .await
        .expect_err("removed");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME)
    );
}

/// A checkout served at once from the idle servers (`Pool::checkout_now`, no future) is
/// counted as every checkout is: lent, waited for no time, held, a transaction, and shown
/// holding its server while it does.
#[tokio::test]
async fn checkouts_served_at_once_are_counted_like_any_other() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, with_admin(2)).await;
    let client = mux.connect("app", "app").await;
    client.simple_query("SELECT 1").await.unwrap(); // the pool's first server opens
    let count = |m: &Metrics, name: &str, labels: &[(&str, &str)]| {
        m.0.samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .find_map(|s| match &s.value {
                Value::Histogram(h) => h.last().map(|b| b.count),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name}{labels:?}"))
    };
    let none = [("database", "app"), ("user", "app"), ("cause", "none")];
    let before = Metrics::scrape(&mux).await;
    for _ in 0..25 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    client
        .batch_execute("BEGIN; SELECT pg_backend_pid()")
        .await
        .unwrap();
    let held = app_pool(&mux).await;
    let after = Metrics::scrape(&mux).await;
    client.batch_execute("COMMIT").await.unwrap();
    let delta = |name: &str| after.get(name, &APP) - before.get(name, &APP);
    assert_eq!(delta("pgmux_server_checkouts_total"), 26.0);
    assert_eq!(
        count(&after, "pgmux_wait_seconds", &none) - count(&before, "pgmux_wait_seconds", &none),
        26.0,
        "every one served at once"
    );
    assert_eq!(
        count(&after, "pgmux_server_hold_seconds", &APP)
            - count(&before, "pgmux_server_hold_seconds", &APP),
        25.0,
        "the 25 given back; the open transaction holds its server"
    );
    assert_eq!(after.get("pgmux_pool_waiting_clients", &APP), 0.0);
    assert_eq!(
        held["active"].as_u64(),
        Some(1),
        "the lent server shown: {held:#}"
    );
}
