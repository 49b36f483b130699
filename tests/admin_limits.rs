//! The admin HTTP port cannot be abused: idle sockets beyond `admin.max_connections` are
//! answered 503 and closed and never starve the client port of file descriptors, idle
//! connections are closed after `idle_timeout`, slow headers after `header_timeout`, and
//! the port runs on a thread of its own.

mod common;

use std::time::{Duration, Instant};

use common::{MuxOptions, TestPgmux, TestPostgres, http_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

/// A bound against hangs, never a measured time.
const LIMIT: Duration = Duration::from_secs(60);

fn with_admin(lines: &str) -> MuxOptions {
    MuxOptions {
        size: 2,
        admin: Some(lines.to_owned()),
        ..MuxOptions::default()
    }
}

/// Sets pgmux's limit of open files (soft and hard).
fn limit_open_files(pid: u32, n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    let pid = libc::pid_t::try_from(pid).expect("a pid");
    // SAFETY: prlimit with a valid rlimit and no old-limit output.
    let done = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// A `/metrics` sample with these labels.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    common::metric_sample(&common::parse_metrics(body), name, labels)
        .unwrap_or_else(|| panic!("no {name}{labels:?} in /metrics"))
}

/// `/metrics`, retried while the port is full (503) right after connections were closed.
async fn metrics(mux: &TestPgmux) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let response = mux.admin_get("/metrics").await;
        if response.status == 200 {
            return response.body;
        }
        assert_eq!(response.status, 503, "{}", response.body);
        assert!(Instant::now() < deadline, "the admin port stayed full");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens `n` admin connections that send nothing. Each one's reading half runs in a task
/// that reports (index, everything read until the close) on the channel; the writing
/// halves are returned.
async fn open_idle(
    port: u16,
    n: usize,
) -> (
    Vec<OwnedWriteHalf>,
    mpsc::UnboundedReceiver<(usize, String)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut writers = Vec::new();
    for i in 0..n {
        let socket = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the admin port accepts the TCP connection");
        let (mut reader, writer) = socket.into_split();
        writers.push(writer);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = reader.read_to_end(&mut got).await; // a reset counts as a close too
            let _ = tx.send((i, String::from_utf8_lossy(&got).into_owned()));
        });
    }
    (writers, rx)
}

/// The next `n` closed connections from `open_idle`'s channel.
async fn closed(
    rx: &mut mpsc::UnboundedReceiver<(usize, String)>,
    n: usize,
) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(LIMIT, rx.recv()).await;
        let got = next
            .unwrap_or_else(|_| panic!("only {} of {n} connections were closed", out.len()))
            .expect("the readers are alive");
        out.push(got);
    }
    out
}

#[tokio::test]
async fn idle_admin_sockets_beyond_the_cap_are_refused_and_clients_are_still_served() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        with_admin("max_connections = 20\nidle_timeout = \"10m\"\n"),
    )
    .await;
    let port = mux.admin_port.expect("an admin port");
    // Few file descriptors, as on a default system: 300 held admin sockets would take all.
    limit_open_files(mux.pid(), 256);

    let (mut writers, mut rx) = open_idle(port, 300).await;
    // The 280 beyond the cap are answered 503 and closed; the 20 others stay open.
    let refused = closed(&mut rx, 280).await;
    for (_, response) in &refused {
        assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
        assert!(
            response.contains("admin.max_connections (20)"),
            "{response}"
        );
    }
    assert!(open_files(mux.pid()) < 256);

    // With 300 admin sockets connected, the client port accepts and serves.
    let mut clients = Vec::new();
    for i in 0..10 {
        let client = mux.connect("app", "app").await;
        let row = client.query_one("SELECT $1::int", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
        clients.push(client);
    }

    // The 20 held ones are real connections: each is answered.
    let refused_ids: Vec<usize> = refused.iter().map(|(i, _)| *i).collect();
    for (i, writer) in writers.iter_mut().enumerate() {
        if !refused_ids.contains(&i) {
            let request = "GET /health HTTP/1.1\r\nHost: pgmux\r\nConnection: close\r\n\r\n";
            writer.write_all(request.as_bytes()).await.unwrap();
        }
    }
    for (_, response) in closed(&mut rx, 20).await {
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(response.ends_with("ok\n"), "{response}");
    }

    let body = metrics(&mux).await;
    assert!(sample(&body, "pgmux_admin_connections_refused_total", &[]) >= 280.0);
    assert_eq!(sample(&body, "pgmux_admin_connections", &[]), 1.0);
    assert_eq!(sample(&body, "pgmux_admin_max_connections", &[]), 20.0);
}

#[tokio::test]
async fn idle_connections_are_closed_after_idle_timeout_but_a_long_answer_is_not() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        with_admin("idle_timeout = \"1s\"\nheader_timeout = \"1h\"\n"),
    )
    .await;
    let port = mux.admin_port.expect("an admin port");

    // Five that never say anything, and one kept alive after a request.
    let (mut writers, mut rx) = open_idle(port, 6).await;
    let request = "GET /health HTTP/1.1\r\nHost: pgmux\r\n\r\n";
    writers[5].write_all(request.as_bytes()).await.unwrap();
    let mut ended = closed(&mut rx, 6).await;
    ended.sort();
    for (i, read) in &ended[..5] {
        assert_eq!(read, "", "connection {i} got an answer it did not ask for");
    }
    let (_, kept_alive) = &ended[5];
    assert!(kept_alive.starts_with("HTTP/1.1 200 "), "{kept_alive}");
    assert!(kept_alive.ends_with("ok\n"), "{kept_alive}");

    // A handler that takes longer than idle_timeout is not cut: pause waits for the
    // running transaction.
    let client = mux.connect("app", "app").await;
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pausing = tokio::spawn(http_request(port, "POST", "/pools/app/app/pause", None));
    tokio::time::sleep(Duration::from_millis(2500)).await; // longer than idle_timeout
    client.batch_execute("COMMIT").await.unwrap();
    let paused = pausing.await.unwrap();
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["drained"], true, "{}", paused.body);
    assert_eq!(mux.admin_post("/pools/app/app/resume").await.status, 200);

    let body = metrics(&mux).await;
    let timed_out = "pgmux_admin_connections_timed_out_total";
    assert!(sample(&body, timed_out, &[("reason", "idle_timeout")]) >= 6.0);
    assert_eq!(
        sample(&body, timed_out, &[("reason", "header_timeout")]),
        0.0
    );
}

#[tokio::test]
async fn headers_sent_slowly_are_cut_off_after_header_timeout() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        with_admin("header_timeout = \"1s\"\nidle_timeout = \"1h\"\n"),
    )
    .await;
    let port = mux.admin_port.expect("an admin port");

    let socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    writer
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: pgmux\r\nX-Slow: ")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let reading = reader.read_to_end(&mut answer);
    tokio::pin!(reading);
    // One byte every 100 ms, never the end of the headers: bytes keep arriving, so only
    // the header timeout can end this (idle_timeout is an hour).
    let mut sent = 0;
    let cut = loop {
        tokio::select! {
            _ = &mut reading => break true,
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if writer.write_all(b"a").await.is_err() {
                    break true;
                }
                sent += 1;
                if sent > 600 {
                    break false;
                }
            }
        }
    };
    assert!(cut, "60 s of headers were accepted");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    let body = metrics(&mux).await;
    let timed_out = "pgmux_admin_connections_timed_out_total";
    assert_eq!(
        sample(&body, timed_out, &[("reason", "header_timeout")]),
        1.0
    );
}

#[tokio::test]
async fn the_admin_port_and_the_log_have_threads_of_their_own() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, with_admin("")).await;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", mux.pid()))
        .expect("/proc/PID/task")
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    assert!(threads.iter().any(|t| t == "pgmux-admin"), "{threads:?}");
    assert!(threads.iter().any(|t| t == "pgmux-log"), "{threads:?}");
    // And it answers from there, reload included.
    assert_eq!(mux.admin_get("/health").await.body, "ok\n");
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
}
