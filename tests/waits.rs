//! Every wait explained, against a real PostgreSQL: each cause (a full pool, a database
//! cap, an upstream being connected to or backing off, a pause, a drain) produced for
//! real and seen where the brief wants it: `/clients` (`wait_cause`, `wait_detail`), the
//! `cause` label of `pgmux_wait_seconds`, the 53300 error, and the NOTICE the waiting
//! client itself receives after `wait_notice_after`.

mod common;

use std::time::Duration;

use common::{FaultProxy, Links, MuxOptions, TestPgmux, TestPostgres, eventually, password_for};
use futures_util::StreamExt;
use prometheus_parse::Scrape;
use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_postgres::error::{DbError, SqlState};
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

/// A bound against hangs, never a measured time.
const LIMIT: Duration = Duration::from_secs(30);

/// A client of `mux` with this application_name, and the NOTICEs it receives.
async fn connect(
    port: u16,
    database: &str,
    user: &str,
    app: &str,
) -> (Client, mpsc::UnboundedReceiver<DbError>) {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password_for(user))
        .dbname(database)
        .application_name(app)
        .connect_timeout(Duration::from_secs(10));
    let (client, mut connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting as {user} to {database}: {e}"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notice(notice)) => {
                    let _ = tx.send(notice);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

/// The `/clients` entry of the client with this application_name once its `wait_cause`
/// is `cause`.
async fn waiting_as(mux: &TestPgmux, app: &str, cause: &str) -> Json {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let clients = mux.admin_get("/clients").await.json();
        let me = clients.as_array().and_then(|all| {
            all.iter()
                .find(|c| c["application_name"] == app && c["wait_cause"] == cause)
        });
        if let Some(me) = me {
            assert_eq!(me["state"], "waiting", "{me}");
            return me.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{app} never waited for {cause}: {clients}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The count of `pgmux_wait_seconds` for the pool (database, user) and `cause`.
async fn waits_for(mux: &TestPgmux, database: &str, user: &str, cause: &str) -> f64 {
    let body = mux.admin_get("/metrics").await.body;
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("metrics parse");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "pgmux_wait_seconds_count")
        .filter(|s| {
            s.labels.get("database") == Some(database)
                && s.labels.get("user") == Some(user)
                && s.labels.get("cause") == Some(cause)
        })
        .find_map(|s| match s.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
}

/// The next NOTICE that names `cause`.
async fn notice_naming(notices: &mut mpsc::UnboundedReceiver<DbError>, cause: &str) -> String {
    loop {
        let notice = tokio::time::timeout(LIMIT, notices.recv())
            .await
            .unwrap_or_else(|_| panic!("no NOTICE naming {cause}"))
            .expect("the connection task is alive");
        if notice.message().contains(cause) {
            assert_eq!(notice.severity(), "NOTICE");
            return notice.message().to_owned();
        }
    }
}

fn databases(pg: &TestPostgres, proxy_port: Option<u16>) -> String {
    let mut out = format!(
        "[databases.quick]\nhost = \"127.0.0.1\"\nport = {p}\ndbname = \"app\"\nwait_timeout = \"300ms\"\n\n\
         [databases.capped]\nhost = \"127.0.0.1\"\nport = {p}\ndbname = \"app\"\nsize = 4\nmax_db_connections = 1\n\n",
        p = pg.port
    );
    if let Some(port) = proxy_port {
        out.push_str(&format!(
            "[databases.proxied]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"app\"\nsize = 2\nconnect_timeout = \"60s\"\nidle_timeout = \"1s\"\n\n"
        ));
    }
    out
}

fn options(pg: &TestPostgres, proxy_port: Option<u16>) -> MuxOptions {
    MuxOptions {
        size: 1,
        wait_timeout: "60s",
        pool_extra: "wait_notice_after = \"200ms\"\n".to_owned(),
        extra: databases(pg, proxy_port),
        admin: Some(String::new()),
        auth_extra: "admin_users = [\"other\"]".to_owned(),
        ..MuxOptions::default()
    }
}

#[tokio::test]
async fn a_full_pool_names_its_holders_everywhere() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, None)).await;
    let (holder, _) = connect(mux.port, "app", "app", "the_holder").await;
    let (waiter, mut notices) = connect(mux.port, "app", "app", "the_waiter").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let query = tokio::spawn(async move {
        let row = waiter.query_one("SELECT 2", &[]).await;
        (waiter, row.map(|r| r.get::<_, i32>(0)))
    });
    let me = waiting_as(&mux, "the_waiter", "pool_full").await;
    let detail = me["wait_detail"].as_str().expect("a detail");
    assert!(detail.contains("pool full (size 1, 1 in use"), "{detail}");
    assert!(detail.contains("\"the_holder\""), "{detail}");
    // SHOW CLIENTS has it after PgBouncer's columns.
    let console = mux.connect("pgbouncer", "other").await;
    let rows = console.simple_query("SHOW CLIENTS").await.unwrap();
    let waiter = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get("application_name") == Some("the_waiter") => {
                Some((
                    r.get("wait_cause").map(str::to_owned),
                    r.get("wait_detail").map(str::to_owned),
                ))
            }
            _ => None,
        })
        .expect("the waiter in SHOW CLIENTS");
    assert_eq!(waiter.0.as_deref(), Some("pool_full"));
    assert!(waiter.1.is_some_and(|d| d.contains("\"the_holder\"")));
    // The waiting client hears it too, while it waits.
    let notice = notice_naming(&mut notices, "pool_full").await;
    assert!(notice.contains("the_holder"), "{notice}");
    assert!(notice.contains("size 1"), "{notice}");

    holder.batch_execute("COMMIT").await.unwrap();
    let (_waiter, answer) = query.await.expect("the query task");
    assert_eq!(answer.expect("served once the holder committed"), 2);
    // No longer waiting: no cause.
    let clients = mux.admin_get("/clients").await.json();
    for c in clients.as_array().expect("clients") {
        assert!(c["wait_cause"].is_null(), "{c}");
    }
    assert!(waits_for(&mux, "app", "app", "pool_full").await >= 1.0);
    assert!(waits_for(&mux, "app", "app", "none").await >= 1.0);
}

#[tokio::test]
async fn a_wait_that_times_out_says_why_in_the_53300() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, None)).await;
    let (holder, _) = connect(mux.port, "quick", "app", "slow_report").await;
    let (waiter, _) = connect(mux.port, "quick", "app", "impatient").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    let db = err.as_db_error().expect("an ErrorResponse");
    assert!(
        db.message().contains("pool full (size 1, 1 in use"),
        "{db:?}"
    );
    assert!(db.message().contains("\"slow_report\""), "{db:?}");
    assert_eq!(db.detail(), Some("wait cause: pool_full"));
    assert!(waits_for(&mux, "quick", "app", "pool_full").await >= 1.0);

    // Same connection, served once the holder is done.
    holder.batch_execute("COMMIT").await.unwrap();
    waiter.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_database_cap_is_the_cause_not_the_pool() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, None)).await;
    let (holder, _) = connect(mux.port, "capped", "app", "cap_holder").await;
    let (waiter, mut notices) = connect(mux.port, "capped", "other", "cap_waiter").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let query = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    let me = waiting_as(&mux, "cap_waiter", "max_db_connections").await;
    let detail = me["wait_detail"].as_str().expect("a detail");
    assert!(
        detail.contains("max_db_connections (1) reached for database \"capped\""),
        "{detail}"
    );
    let notice = notice_naming(&mut notices, "max_db_connections").await;
    assert!(notice.contains("capped"), "{notice}");

    holder.batch_execute("COMMIT").await.unwrap();
    query.await.expect("the query task").expect("served");
    assert!(waits_for(&mux, "capped", "other", "max_db_connections").await >= 1.0);
}

#[tokio::test]
async fn a_pause_is_the_cause_until_resume() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, None)).await;
    let (waiter, mut notices) = connect(mux.port, "app", "app", "paused_one").await;
    waiter.simple_query("SELECT 1").await.unwrap();
    let paused = mux.admin_post("/pools/app/app/pause").await;
    assert_eq!(paused.status, 200, "{}", paused.body);

    let query = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    let me = waiting_as(&mux, "paused_one", "paused").await;
    assert!(
        me["wait_detail"]
            .as_str()
            .is_some_and(|d| d.contains("paused by an operator")),
        "{me}"
    );
    let notice = notice_naming(&mut notices, "paused").await;
    assert!(notice.contains("resumed"), "{notice}");

    let resumed = mux.admin_post("/pools/app/app/resume").await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    query
        .await
        .expect("the query task")
        .expect("served after resume");
    assert!(waits_for(&mux, "app", "app", "paused").await >= 1.0);
}

#[tokio::test]
async fn an_upstream_being_opened_then_backing_off_is_the_cause_with_its_error() {
    let pg = TestPostgres::shared().await;
    let proxy = FaultProxy::start(pg.port).await;
    let mux = TestPgmux::start(pg, options(pg, Some(proxy.port))).await;
    // The same settings: one server learns the greeting for both, and the waiter must
    // open the second one.
    let (holder, _) = connect(mux.port, "proxied", "app", "up").await;
    let (waiter, mut notices) = connect(mux.port, "proxied", "app", "up").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Any other server (the greeting's, upkeep's) goes idle and closes after idle_timeout:
    // then the waiter must open one.
    let only_the_holders = eventually(LIMIT, || async {
        let pools = mux.admin_get("/pools").await.json();
        pools.as_array().is_some_and(|all| {
            all.iter().any(|p| {
                p["database"] == "proxied"
                    && p["user"] == "app"
                    && p["idle"] == 0
                    && p["active"] == 1
            })
        })
    })
    .await;
    assert!(only_the_holders);
    let links = proxy.links().len();

    // New links are accepted and then hang: the waiter's connection is being opened.
    proxy.stall(Links::All);
    let query = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    let me = waiting_as(&mux, "up", "upstream_connecting").await;
    assert!(
        me["wait_detail"]
            .as_str()
            .is_some_and(|d| d.contains("opening a server connection to 127.0.0.1:")),
        "{me}"
    );
    let notice = notice_naming(&mut notices, "upstream_connecting").await;
    assert!(notice.contains("opening a server connection"), "{notice}");

    // The upstream goes away: that attempt fails, later ones are refused; the waiter
    // waits on for the holder's server, backing off, and says what the upstream said.
    assert!(eventually(LIMIT, || async { proxy.links().len() > links }).await);
    proxy.refuse().await;
    let newest = *proxy.links().last().expect("the stalled link");
    proxy.cut(Links::One(newest)).await;
    let me = waiting_as(&mux, "up", "upstream_backoff").await;
    let detail = me["wait_detail"].as_str().expect("a detail");
    assert!(detail.contains("unreachable: "), "{detail}");

    proxy.resume().await;
    holder.batch_execute("COMMIT").await.unwrap();
    query
        .await
        .expect("the query task")
        .expect("served by the holder's server");
    assert!(waits_for(&mux, "proxied", "app", "upstream_backoff").await >= 1.0);
}

#[tokio::test]
async fn a_shutdown_drains_and_the_waiters_say_so() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, options(pg, None)).await;
    let (holder, _) = connect(mux.port, "app", "app", "last_holder").await;
    let (waiter, _) = connect(mux.port, "app", "app", "last_waiter").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let query = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    waiting_as(&mux, "last_waiter", "pool_full").await;

    mux.signal("TERM");
    let me = waiting_as(&mux, "last_waiter", "draining").await;
    assert!(
        me["wait_detail"]
            .as_str()
            .is_some_and(|d| d.contains("shutting down")),
        "{me}"
    );
    // The running transaction finishes, and its server serves the waiter before pgmux
    // stops.
    holder.batch_execute("COMMIT").await.unwrap();
    query
        .await
        .expect("the query task")
        .expect("served while draining");
    assert!(mux.wait_exit(LIMIT).await, "pgmux stopped");
}

/// The `/pools` entry of (database, user), if listed.
async fn pool_entry(mux: &TestPgmux, database: &str, user: &str) -> Option<Json> {
    let pools = mux.admin_get("/pools").await.json();
    pools.as_array().and_then(|all| {
        all.iter()
            .find(|p| p["database"] == database && p["user"] == user)
            .cloned()
    })
}

#[tokio::test]
async fn configured_pools_are_listed_at_zero_before_any_client() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, None)).await;
    // Every database of the config with every user of the config.
    for (database, user) in [("app", "app"), ("app", "other"), ("capped", "other")] {
        let pool = pool_entry(&mux, database, user)
            .await
            .unwrap_or_else(|| panic!("{database}/{user} is not listed"));
        assert_eq!(pool["active"], 0, "{pool}");
        assert_eq!(pool["idle"], 0, "{pool}");
        assert_eq!(pool["waiting"], 0, "{pool}");
        assert_eq!(pool["size"], if database == "capped" { 4 } else { 1 });
        assert_eq!(pool["advice"]["peak_demand"], 0, "{pool}");
    }
    let body = mux.admin_get("/metrics").await.body;
    assert!(
        body.contains("pgmux_pool_size{database=\"app\",user=\"other\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("pgmux_wait_seconds_count{database=\"app\",user=\"other\",cause=\"none\"} 0"),
        "{body}"
    );
    // Nobody connected: no server was opened for them.
    assert!(
        mux.admin_get("/servers")
            .await
            .json()
            .as_array()
            .is_some_and(Vec::is_empty)
    );
}

/// The `/servers` entry of the server held by the client with this application_name,
/// once its state is `state`.
async fn server_in_state(mux: &TestPgmux, app: &str, state: &str) -> Json {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let servers = mux.admin_get("/servers").await.json();
        let found = servers.as_array().and_then(|all| {
            all.iter()
                .find(|s| s["client"]["application_name"] == app && s["state"] == state)
                .cloned()
        });
        if let Some(server) = found {
            return server;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no server of {app} in state {state}: {servers}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn servers_say_idle_in_transaction_and_advice_counts_open_transactions() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, options(pg, None)).await;
    let (client, _) = connect(mux.port, "app", "app", "sits_in_tx").await;
    for _ in 0..50 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    // A query that runs until the lock is released: `active`.
    let locker = pg.superuser().await;
    locker
        .simple_query("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let running = tokio::spawn(async move {
        client
            .simple_query("BEGIN; SELECT pg_advisory_xact_lock(4242)")
            .await
            .map(|_| client)
    });
    let server = server_in_state(&mux, "sits_in_tx", "active").await;
    assert!(
        server["query"]
            .as_str()
            .is_some_and(|q| q.contains("pg_advisory_xact_lock"))
    );
    locker
        .simple_query("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    let client = running
        .await
        .expect("the query task")
        .expect("the lock came");

    // The transaction stays open: `idle in transaction`, as pg_stat_activity says.
    let server = server_in_state(&mux, "sits_in_tx", "idle in transaction").await;
    assert_eq!(server["in_transaction"], true, "{server}");
    // 50 short transactions and one still open: the open one counts for as long as it
    // has run, so the mean hold grows past what the short ones alone give.
    let grown = eventually(LIMIT, || async {
        let pool = pool_entry(&mux, "app", "app").await.expect("app/app");
        pool["advice"]["mean_hold_ms"]
            .as_f64()
            .is_some_and(|ms| ms >= 20.0)
    })
    .await;
    assert!(grown, "{:?}", pool_entry(&mux, "app", "app").await);
    client.simple_query("COMMIT").await.unwrap();
}
