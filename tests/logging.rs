//! Logging can never break pgmux: with stderr a pipe whose reader is gone, or one nobody
//! reads, clients keep working, the lost lines are counted, and SIGTERM / SIGINT / SIGHUP
//! still work; a user name with a newline cannot forge a log line.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{MuxOptions, TestPgmux, TestPostgres, free_port, http_request};
// The harness's cleanup shell, for the pgmux these tests start themselves (their stderr
// is a pipe, not the harness's log file).
use common::watchdog::Watchdog;
use prometheus_parse::{Scrape, Value};

/// How long pgmux gets to start, or to stop after a signal (a bound against hangs only).
const LIMIT: Duration = Duration::from_secs(60);

/// pgmux started with its stderr a pipe that this test holds the reading end of.
struct PipedPgmux {
    child: Child,
    stderr: Option<ChildStderr>,
    port: u16,
    admin_port: u16,
    watchdog: Watchdog,
    _dir: tempfile::TempDir,
}

impl PipedPgmux {
    /// Starts pgmux with `RUST_LOG=rust_log` and reads its stderr until it listens.
    async fn start(pg: &TestPostgres, opts: MuxOptions, rust_log: &str) -> PipedPgmux {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-piped-")
            .tempdir()
            .expect("a temp dir");
        let config = dir.path().join("pgmux.toml");
        for _ in 0..5 {
            let (port, admin_port) = (free_port(), free_port());
            let text = TestPgmux::config_toml_with_admin(pg, &opts, port, Some(admin_port));
            std::fs::write(&config, text).expect("config written");
            let mut child = Command::new(env!("CARGO_BIN_EXE_pgmux"))
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", rust_log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("pgmux starts");
            let watchdog = Watchdog::spawn(&format!("kill -KILL {}", child.id()), dir.path());
            let stderr = child.stderr.take().expect("piped stderr");
            let (stderr, seen) = tokio::task::spawn_blocking(move || read_until_listening(stderr))
                .await
                .expect("the reader ends");
            if seen.contains("listening for clients") {
                return PipedPgmux {
                    child,
                    stderr: Some(stderr),
                    port,
                    admin_port,
                    watchdog,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(seen.contains("in use"), "pgmux did not start:\n{seen}");
        }
        panic!("pgmux could not listen: ports kept being taken");
    }

    /// Closes the reading end of pgmux's stderr: its next log line meets a broken pipe.
    fn close_stderr(&mut self) {
        drop(self.stderr.take());
    }

    async fn connect(&self) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("app")
            .password("app_pw")
            .dbname("app")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("a client connects through pgmux");
        tokio::spawn(connection);
        client
    }

    async fn metric(&self, name: &str) -> f64 {
        let response = http_request(self.admin_port, "GET", "/metrics", None).await;
        assert_eq!(response.status, 200, "{}", response.body);
        metric(&response.body, name)
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for pgmux to exit (up to LIMIT, against hangs); its exit status.
    async fn exit_status(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.watchdog.disarm();
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for PipedPgmux {
    fn drop(&mut self) {
        self.watchdog.disarm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads stderr lines until pgmux listens for clients, or exits; returns the pipe and
/// what was read.
fn read_until_listening(stderr: ChildStderr) -> (ChildStderr, String) {
    let mut reader = BufReader::new(stderr);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                seen.push_str(&line);
                if line.contains("listening for clients") {
                    break;
                }
            }
        }
    }
    (reader.into_inner(), seen)
}

/// The value of an unlabelled counter or gauge in a `/metrics` body.
fn metric(body: &str, name: &str) -> f64 {
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("metrics parse");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn with_admin() -> MuxOptions {
    MuxOptions {
        size: 2,
        admin: Some(String::new()),
        ..MuxOptions::default()
    }
}

/// Runs `n` queries on `client`, each checked; counts them in `done`.
async fn queries(client: tokio_postgres::Client, n: usize, done: Arc<AtomicUsize>) {
    for i in 0..n {
        let value = i32::try_from(i).expect("small");
        let row = client
            .query_one("SELECT $1::int", &[&value])
            .await
            .expect("a query through pgmux");
        assert_eq!(row.get::<_, i32>(0), value);
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_broken_stderr_pipe_breaks_nothing_and_signals_still_work() {
    let pg = TestPostgres::shared().await;
    let mut mux = PipedPgmux::start(pg, with_admin(), "pgmux=debug").await;

    // Clients at work while the reader of pgmux's stderr goes away.
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let client = mux.connect().await;
        workers.push(tokio::spawn(queries(client, 300, done.clone())));
    }
    while done.load(Ordering::Relaxed) < 40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mux.close_stderr();
    for worker in workers {
        worker.await.expect("every query of every client succeeded");
    }
    assert_eq!(done.load(Ordering::Relaxed), 1200);

    // New clients log in (and are logged: connected, logged in) on a broken pipe.
    for i in 0..10 {
        let client = mux.connect().await;
        let row = client.query_one("SELECT $1::int", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
    assert!(mux.metric("pgmux_log_write_errors_total").await > 0.0);
    assert_eq!(mux.metric("pgmux_session_panics_total").await, 0.0);

    // SIGHUP still reloads (and logs that it did, into the broken pipe).
    mux.signal("HUP");
    let deadline = Instant::now() + LIMIT;
    loop {
        let response = http_request(mux.admin_port, "GET", "/metrics", None).await;
        let body = response.body;
        let reloaded = body
            .lines()
            .any(|l| l == "pgmux_config_reloads_total{result=\"success\"} 1");
        if reloaded {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload:\n{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM still stops pgmux, cleanly.
    mux.signal("TERM");
    let status = mux.exit_status().await.expect("pgmux exits after SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_stderr_nobody_reads_never_stalls_clients_and_sigint_still_works() {
    let pg = TestPostgres::shared().await;
    // Trace level: several lines per query, so the pipe (64 KiB) and then pgmux's own
    // queue fill up while this test holds the pipe and never reads it.
    let mux = PipedPgmux::start(pg, with_admin(), "pgmux=trace").await;
    let mut mux = mux;
    let done = Arc::new(AtomicUsize::new(0));
    let mut rounds = 0;
    while mux.metric("pgmux_log_write_errors_total").await == 0.0 {
        rounds += 1;
        assert!(
            rounds <= 100,
            "100 000 queries logged at trace level, none dropped"
        );
        let mut workers = Vec::new();
        for _ in 0..4 {
            let client = mux.connect().await;
            workers.push(tokio::spawn(queries(client, 250, done.clone())));
        }
        for worker in workers {
            worker.await.expect("every query succeeded");
        }
    }
    assert_eq!(done.load(Ordering::Relaxed), rounds * 1000);
    // Still serving with the pipe full.
    let client = mux.connect().await;
    client.simple_query("SELECT 1").await.unwrap();

    mux.signal("INT");
    let status = mux.exit_status().await.expect("pgmux exits after SIGINT");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_newline_in_a_user_name_forges_no_log_line() {
    let pg = TestPostgres::shared().await;
    // A configured user whose name carries a forged log line, on a database that logs in
    // upstream as app: its login, pool and server connection are all logged.
    let forged = "2030-01-01T00:00:00.000000Z ERROR pgmux: FORGED";
    let extra = format!(
        "[databases.forge]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\n\
         user = \"app\"\npassword = \"app_pw\"\n\n\
         [users.\"x\\n{forged}-1\"]\npassword = \"pw\"\n",
        pg.port
    );
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            extra,
            ..MuxOptions::default()
        },
    )
    .await;
    let configured = format!("x\n{forged}-1");
    let (client, _task) = mux
        .try_connect("forge", &configured, "pw")
        .await
        .expect("the configured user logs in");
    client.simple_query("SELECT 1").await.unwrap();
    // An unknown user: refused like a wrong password, and the failure is logged.
    let unknown = format!("y\n{forged}-2\r\n{forged}-3");
    let Err(err) = mux.try_connect("app", &unknown, "pw").await else {
        panic!("an unknown user logged in");
    };
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );

    // The log is written by pgmux's log thread: wait until both attempts are in it.
    let deadline = Instant::now() + LIMIT;
    let log = loop {
        let log = mux.stderr_log();
        if log.contains("FORGED-1") && log.contains("FORGED-3") {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "the logins were not logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for line in log.lines() {
        assert!(!line.starts_with("2030-"), "a forged log line:\n{log}");
        if line.contains("FORGED") {
            assert!(line.contains("\\n2030-01-01"), "not escaped: {line}");
        }
    }
    assert!(
        log.lines()
            .any(|l| l.contains("client logged in") && l.contains("FORGED-1")),
        "{log}"
    );
}
