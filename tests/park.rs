//! Parked clients (`server.park_idle_after`, `src/client/park.rs`): an idle
//! transaction-mode client leaves its task and waits in its worker thread's parking lot;
//! it resumes with its settings and prepared statements when it sends, and whatever the
//! pooler tells sessions (shutdown, KILL_CLIENT, an upgrade) reaches it while parked.

mod common;

use std::time::{Duration, Instant};

use common::raw::Raw;
use common::tls::{Ca, Rustls, cert_dir};
use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Error};

/// A bound against hangs, never a measure.
const PATIENCE: Duration = Duration::from_secs(60);
/// `park_idle_after` in these tests.
const PARK_AFTER: Duration = Duration::from_millis(200);

/// Options that park clients idle for 200 ms, with the admin port and `other` as the
/// console's admin.
fn parking(size: u32) -> MuxOptions {
    MuxOptions {
        server_extra: "park_idle_after = \"200ms\"".to_owned(),
        auth_extra: "admin_users = [\"other\"]".to_owned(),
        admin: Some(String::new()),
        ..MuxOptions::sized(size)
    }
}

/// `pgmux_clients_parked` now.
async fn parked(mux: &TestPgmux) -> f64 {
    mux.metric("pgmux_clients_parked", &[])
        .await
        .unwrap_or(-1.0)
}

/// Waits until exactly `n` clients are parked.
async fn wait_parked(mux: &TestPgmux, n: usize) {
    let reached = eventually(PATIENCE, || async { parked(mux).await == n as f64 }).await;
    assert!(
        reached,
        "{} parked, not {n}\n{}",
        parked(mux).await,
        mux.stderr_log()
    );
}

/// A client of `mux` as `app`, and its connection task, which ends with what ended the
/// connection (pgmux's FATAL error, if it sent one).
async fn connect(mux: &TestPgmux) -> (Client, JoinHandle<Result<(), Error>>) {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(mux.port)
        .user("app")
        .password("app_pw")
        .dbname("app")
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    (client, tokio::spawn(connection))
}

/// Waits for a connection task to end and returns the error pgmux closed it with.
async fn closed_with(connection: JoinHandle<Result<(), Error>>) -> Error {
    let ended = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("pgmux closes the connection")
        .expect("the connection task ran");
    ended.expect_err("pgmux said why it closed the connection")
}

/// The value of `column` in the row of the console's SHOW CLIENTS whose
/// `application_name` is `name`.
async fn client_column(console: &Client, name: &str, column: &str) -> Option<String> {
    common::show_lookup(console, "CLIENTS", ("application_name", name), column).await
}

/// A client named `name` with a prepared statement that adds `n`.
async fn named_client(mux: &TestPgmux, name: &str) -> (Client, tokio_postgres::Statement) {
    let client = mux.connect("app", "app").await;
    client
        .batch_execute(&format!("SET application_name = '{name}'"))
        .await
        .unwrap();
    let add = client.prepare("SELECT $1::int + 100").await.unwrap();
    (client, add)
}

/// What the client sees of itself: its prepared statement's answer and its
/// application_name.
async fn check(client: &Client, add: &tokio_postgres::Statement, name: &str) {
    let sum: i32 = client.query_one(add, &[&1]).await.unwrap().get(0);
    assert_eq!(sum, 101);
    let shown: String = client
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, name);
}

#[tokio::test]
async fn idle_clients_park_and_resume_with_their_settings_and_statements() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, parking(6)).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        let name = format!("parked{i}");
        let (client, add) = named_client(&mux, &name).await;
        clients.push((client, add, name));
    }
    wait_parked(&mux, 4).await;
    let console = mux.connect("pgbouncer", "other").await;
    // A parked client is shown idle.
    assert_eq!(
        client_column(&console, "parked0", "state").await.as_deref(),
        Some("idle")
    );
    for (client, add, name) in &clients {
        check(client, add, name).await;
        // In a transaction, holding a server: this one cannot park again.
        client.batch_execute("BEGIN").await.unwrap();
    }
    wait_parked(&mux, 0).await;
    for (client, add, name) in &clients {
        client.batch_execute("COMMIT").await.unwrap();
        check(client, add, name).await;
    }
    wait_parked(&mux, 4).await;
    for (client, add, name) in &clients {
        check(client, add, name).await;
    }
}

#[tokio::test]
async fn a_parked_client_that_leaves_frees_its_place_at_once() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            max_client_conn: 2,
            ..parking(2)
        },
    )
    .await;
    let (first, _) = named_client(&mux, "leaving").await;
    let (second, add) = named_client(&mux, "staying").await;
    wait_parked(&mux, 2).await;
    let err = mux
        .try_connect("app", "app", "app_pw")
        .await
        .expect_err("max_client_conn is reached");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");

    drop(first);
    wait_parked(&mux, 1).await;
    let gone = eventually(PATIENCE, || async {
        mux.metric("pgmux_client_connections", &[]).await == Some(1.0)
    })
    .await;
    assert!(gone, "the parked client that left is still counted");
    let idle = mux
        .metric(
            "pgmux_clients",
            &[("database", "app"), ("user", "app"), ("state", "idle")],
        )
        .await;
    assert_eq!(idle, Some(1.0), "the registry entry is gone");
    // Its place under max_client_conn is free.
    let third = mux.connect("app", "app").await;
    common::answers_select_1(&third).await;
    check(&second, &add, "staying").await;
}

#[tokio::test]
async fn sigterm_tells_parked_clients_57p01_and_pgmux_exits() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, parking(2)).await;
    let mut connections = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (client, connection) = connect(&mux).await;
        client.simple_query("SELECT 1").await.unwrap();
        clients.push(client);
        connections.push(connection);
    }
    wait_parked(&mux, 3).await;
    mux.signal("TERM");
    for connection in connections {
        let err = closed_with(connection).await;
        assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    }
    // shutdown_timeout is 30 s: the parked clients did not hold the exit for it.
    assert!(
        mux.wait_exit(Duration::from_secs(20)).await,
        "{}",
        mux.stderr_log()
    );
}

#[tokio::test]
async fn kill_client_reaches_a_parked_client() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, parking(2)).await;
    let (victim, connection) = connect(&mux).await;
    victim
        .batch_execute("SET application_name = 'victim'")
        .await
        .unwrap();
    let (bystander, add) = named_client(&mux, "bystander").await;
    wait_parked(&mux, 2).await;
    let console = mux.connect("pgbouncer", "other").await;
    let id = client_column(&console, "victim", "id")
        .await
        .expect("the victim in SHOW CLIENTS");
    console
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let err = closed_with(connection).await;
    let db = err.as_db_error().expect("told why");
    assert_eq!(db.code(), &SqlState::ADMIN_SHUTDOWN, "{db:?}");
    assert!(db.message().contains("administrator command"), "{db:?}");
    wait_parked(&mux, 1).await;
    check(&bystander, &add, "bystander").await;
}

#[tokio::test]
async fn clients_parked_on_two_worker_threads_resume() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        server_extra: "park_idle_after = \"200ms\"\nworker_threads = 2".to_owned(),
        ..parking(4)
    };
    let mux = TestPgmux::start(pg, opts).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let name = format!("threaded{i}");
        let (client, add) = named_client(&mux, &name).await;
        clients.push((client, add, name));
    }
    wait_parked(&mux, 6).await;
    for worker in ["0", "1"] {
        let sessions = mux
            .metric("pgmux_worker_sessions", &[("worker", worker)])
            .await;
        assert_eq!(sessions, Some(3.0), "worker {worker}");
    }
    for (client, add, name) in &clients {
        check(client, add, name).await;
    }
    wait_parked(&mux, 6).await;
    for (client, add, name) in &clients {
        check(client, add, name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_clients_move_through_an_upgrade() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, parking(2)).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let name = format!("moving{i}");
        let (client, add) = named_client(&mux, &name).await;
        clients.push((client, add, name));
    }
    wait_parked(&mux, 3).await;
    let old = mux.pid();
    let new = mux.upgrade().await;
    assert_ne!(old, new);
    for (client, add, name) in &clients {
        check(client, add, name).await;
    }
    // They park in the new process too, and come back from it.
    wait_parked(&mux, 3).await;
    for (client, add, name) in &clients {
        check(client, add, name).await;
    }
}

#[tokio::test]
async fn tls_and_listening_clients_are_not_parked_nor_asked_every_sweep() {
    let pg = TestPostgres::shared().await;
    let dir = cert_dir("pgmux-park-tls-");
    let ca = Ca::new("pgmux park test CA");
    let (cert, key) = ca.issue("pgmux", &["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("pgmux.crt"), cert).unwrap();
    std::fs::write(dir.join("pgmux.key"), key).unwrap();
    let opts = MuxOptions {
        extra: format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.join("pgmux.crt").display(),
            dir.join("pgmux.key").display(),
        ),
        ..parking(3)
    };
    let mux = TestPgmux::start(pg, opts).await;

    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .port(mux.port)
        .user("app")
        .password("app_pw")
        .dbname("app")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(10));
    let (tls, connection) = config.connect(Rustls::verifying(&ca.pem())).await.unwrap();
    tokio::spawn(connection);
    common::answers_select_1(&tls).await;

    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(mux.port)
        .user("app")
        .password("app_pw")
        .dbname("app");
    let (listener, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = notified.send(n.payload().to_owned());
            }
        }
    });
    listener.batch_execute("LISTEN park_jobs").await.unwrap();

    // A plain idle client parks: the sweep runs and asks the others too.
    let plain = mux.connect("app", "app").await;
    common::answers_select_1(&plain).await;
    let started = Instant::now();
    wait_parked(&mux, 1).await;
    // Many sweeps (one every 50 ms) while both stay idle.
    tokio::time::sleep(PARK_AFTER * 10).await;
    assert_eq!(parked(&mux).await, 1.0, "only the plain client is parked");
    let declined = mux
        .metric("pgmux_clients_park_declined_total", &[])
        .await
        .unwrap_or(0.0);
    // Each is asked at most once per park_idle_after (plus the first time), however
    // many sweeps ran: a bound from the time that passed, never a speed.
    let elapsed = started.elapsed().as_secs_f64();
    let bound = 2.0 * (elapsed / PARK_AFTER.as_secs_f64() + 2.0);
    assert!(declined >= 2.0, "{declined} declines: were they asked?");
    assert!(declined <= bound, "{declined} declines in {elapsed:.2}s");

    common::answers_select_1(&tls).await;
    plain
        .batch_execute("NOTIFY park_jobs, 'hello'")
        .await
        .unwrap();
    let payload = tokio::time::timeout(PATIENCE, notifications.recv())
        .await
        .expect("the listener is notified");
    assert_eq!(payload.as_deref(), Some("hello"));
    common::answers_select_1(&listener).await;
}

#[tokio::test]
async fn a_parked_client_that_sends_byte_by_byte_is_served() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, parking(2).with_auth_method("trust")).await;
    let mut raw = Raw::login(&mux).await;
    assert_eq!(
        raw.run(&[common::raw::query("SELECT 1")]).await,
        ["T", "D:1", "C"]
    );
    wait_parked(&mux, 1).await;
    let query = common::raw::query("SELECT 41 + 1");
    for byte in &query {
        raw.s.write_all(&[*byte]).await.unwrap();
        raw.s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(raw.run(&[]).await, ["T", "D:42", "C"]);
    // Parks again, and is served again.
    wait_parked(&mux, 1).await;
    assert_eq!(
        raw.run(&[common::raw::query("SELECT 2")]).await,
        ["T", "D:2", "C"]
    );
}
