//! The `session` fuzz target: arbitrary client bytes through pgmux and a real PostgreSQL.
//!
//! Shared by `fuzz/fuzz_targets/session.rs` (libFuzzer) and `tests/fuzz_corpus.rs` (the
//! corpus replayed by `cargo test`); both include `tests/common` as `crate::common`.
//!
//! One PostgreSQL (`TestPostgres`) and one pgmux per process, started by the first input.
//! pgmux runs in this process, on its own thread and runtime, exactly as `main.rs` wires it
//! (config, `Pooler`, `listener::run`): so libFuzzer sees the coverage of the session code
//! and a panic in any session task aborts the fuzzer (under `cargo test`, a panic hook
//! counts it). Every pool has one server connection, so a leaked one shows at once.
//!
//! Input: the first byte is the mode, the rest the client's bytes.
//!
//! - bits 0-1 pick the database: `fuzz_tx` (transaction mode), `fuzz_session`,
//!   `fuzz_statement`, or 3: a login, where the bytes are everything the client sends from
//!   its first byte (startup packet, SSLRequest, password messages, ...) to pgmux, which
//!   also knows a SCRAM user `scram` and an md5 user `md5` (password `pencil` both);
//! - bit 2 (not for logins): 0 sends the bytes raw after a trust login and then closes the
//!   sending side; 1 reads them as messages, `[tag][u16 body length][body]`, lengths framed
//!   here, followed by `Sync, Query A, Sync, Query "ROLLBACK; B"`, and waits for B's
//!   answer.
//!
//! After each input, whatever it did:
//!
//! - pgmux answered in bounded time: raw bytes, then the client's EOF, end in a close; a
//!   framed run gets B's answer (after A's, if A's came) or a close whose last message is an
//!   ErrorResponse (unless the client sent Terminate); nothing follows B's ReadyForQuery;
//! - everything pgmux sent frames as backend messages;
//! - for each pool the input used, a new client logs in, gets its `SELECT` answered (not
//!   53300: the one server connection came back), on a server outside any transaction with
//!   the settings its greeting reported; in session mode also without temp tables,
//!   session-level settings, prepared statements, cursors, LISTEN or advisory locks;
//! - nothing in the process panicked.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::TestPostgres;
use crate::common::raw::msg;

/// The pgmux databases, one per pool mode, each with one server connection.
const DATABASES: [&str; 3] = ["fuzz_tx", "fuzz_session", "fuzz_statement"];
/// How long pgmux has to answer (longer than the role's statement_timeout).
const ANSWER_LIMIT: Duration = Duration::from_secs(10);
/// Input beyond this is ignored (libFuzzer's inputs are far smaller).
const MAX_INPUT: usize = 1 << 16;
/// Replies beyond this are not read (a query can generate any amount).
const MAX_REPLY: usize = 16 << 20;
const PROBE_A: &str = "pgmux-fuzz-probe-a";
const PROBE_B: &str = "pgmux-fuzz-probe-b";

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Runs one input; panics when an invariant breaks (see the module docs).
pub fn run(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let bytes = &bytes[..bytes.len().min(MAX_INPUT)];
    let port = pgmux_port();
    let panics = PANICS.load(Ordering::SeqCst);
    let used: &[&str] = match usize::from(mode & 3) {
        3 => {
            send_and_close(port, None, bytes);
            &DATABASES
        }
        i => {
            let database = &DATABASES[i..=i];
            if mode & 4 == 0 {
                send_and_close(port, Some(database[0]), bytes);
            } else {
                send_framed(port, database[0], bytes);
            }
            database
        }
    };
    for database in used {
        check_clean(port, database);
    }
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics,
        "pgmux panicked while serving this input (the panic message is above)"
    );
}

/// Raw bytes (after a login to `database`, or from the first byte), then EOF; pgmux must
/// close, and what it sent must frame.
fn send_and_close(port: u16, database: Option<&str>, bytes: &[u8]) {
    let mut conn = match database {
        Some(database) => Conn::login(port, database, "pgmux_fuzz").0,
        None => Conn::connect(port),
    };
    let reply = conn.exchange(bytes, true, |_| false);
    if database.is_some() {
        frames(&reply.bytes).unwrap_or_else(|e| panic!("pgmux sent {e}"));
    }
    assert!(
        reply.end != End::Limit,
        "pgmux did not close within {ANSWER_LIMIT:?} of the client's EOF"
    );
}

/// Messages framed here, then the probes; pgmux must answer B or close with an error.
fn send_framed(port: u16, database: &str, bytes: &[u8]) {
    let (mut conn, _) = Conn::login(port, database, "pgmux_fuzz");
    let mut out = Vec::new();
    let mut terminates = false;
    let mut rest = bytes;
    while let Some((&tag, after)) = rest.split_first() {
        let (len, after) = match after {
            [a, b, after @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), after),
            _ => (after.len(), &[][..]),
        };
        let (body, after) = after.split_at(len.min(after.len()));
        terminates |= tag == b'X';
        out.extend_from_slice(&msg(tag, body));
        rest = after;
    }
    // A ends whatever extended-protocol error or COPY the input left; B also a failed
    // transaction, where a plain SELECT would not answer.
    for sql in [
        format!("SELECT '{PROBE_A}'"),
        format!("ROLLBACK; SELECT '{PROBE_B}'"),
    ] {
        out.extend_from_slice(&msg(b'S', b""));
        out.extend_from_slice(&msg(b'Q', format!("{sql}\0").as_bytes()));
    }
    let mentions_probe = contains(bytes, b"pgmux-fuzz-probe");
    let reply = conn.exchange(&out, false, |messages| answered(messages).is_some());
    let messages = frames(&reply.bytes).unwrap_or_else(|e| panic!("pgmux sent {e}"));
    match answered(&messages) {
        Some(b_end) => {
            if !mentions_probe {
                let a = position_of_row(&messages, PROBE_A);
                let b = position_of_row(&messages, PROBE_B);
                assert!(a.is_none_or(|a| Some(a) < b), "probe A answered after B");
                let after = &messages[b_end + 1..];
                // Notices, notifications and parameter changes may come at any time.
                assert!(
                    after.iter().all(|(t, _)| matches!(t, b'N' | b'A' | b'S')),
                    "replies after the last ReadyForQuery: {:?}",
                    tags(after)
                );
            }
            // Leave as a client does; pgmux closes.
            let bye = conn.exchange(&msg(b'X', b""), true, |_| false);
            assert!(bye.end != End::Limit, "pgmux did not close after Terminate");
        }
        None => match reply.end {
            End::Limit => panic!(
                "no answer to the probe and no close within {ANSWER_LIMIT:?}; got {:?}",
                tags(&messages)
            ),
            End::Closed if !terminates && !mentions_probe => {
                let last = messages.last().map(|(t, _)| *t);
                assert_eq!(
                    last,
                    Some(b'E'),
                    "pgmux closed without an ErrorResponse; it sent {:?}",
                    tags(&messages)
                );
            }
            // A reset can drop what was in flight; a flood is not read to its end.
            End::Closed | End::Reset | End::TooMuch => {}
            End::Done => unreachable!("done means answered"),
        },
    }
}

/// A new client of `database` gets a clean server: the one connection of its pool came
/// back, outside any transaction, with the settings the greeting reported.
fn check_clean(port: u16, database: &str) {
    let (mut conn, greeting) = Conn::login(port, database, "pgmux_fuzz_check");
    let sql = "SELECT now() = statement_timestamp(), current_setting('application_name'), \
        (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
        (SELECT count(*) FROM pg_settings WHERE source = 'session' AND name <> 'application_name'), \
        (SELECT count(*) FROM pg_prepared_statements), (SELECT count(*) FROM pg_cursors), \
        (SELECT count(*) FROM pg_listening_channels()), \
        (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'), \
        current_setting('DateStyle'), current_setting('IntervalStyle'), \
        current_setting('TimeZone'), current_setting('client_encoding'), \
        current_setting('standard_conforming_strings')";
    let query = msg(b'Q', format!("{sql}\0").as_bytes());
    let reply = conn.exchange(&query, false, |m| m.last().is_some_and(|(t, _)| *t == b'Z'));
    let messages = frames(&reply.bytes).unwrap_or_else(|e| panic!("pgmux sent {e}"));
    if let Some((_, error)) = messages.iter().find(|(t, _)| *t == b'E') {
        panic!(
            "a new client of {database} got an error: {}",
            String::from_utf8_lossy(error)
        );
    }
    let row = messages
        .iter()
        .find(|(t, _)| *t == b'D')
        .map(|(_, body)| data_row(body))
        .unwrap_or_else(|| panic!("no row for the check of {database}: {:?}", tags(&messages)));
    let status = messages
        .last()
        .and_then(|(t, b)| (*t == b'Z').then(|| b.first()));
    assert_eq!(
        status.flatten(),
        Some(&b'I'),
        "{database}: not idle after the check"
    );
    let col = |i: usize| row.get(i).map(String::as_str).unwrap_or_default();
    assert_eq!(
        col(0),
        "t",
        "{database}: the server was inside a transaction"
    );
    assert_eq!(col(1), "pgmux_fuzz_check", "{database}: application_name");
    let reported = [
        (8, "DateStyle"),
        (9, "IntervalStyle"),
        (10, "TimeZone"),
        (11, "client_encoding"),
        (12, "standard_conforming_strings"),
    ];
    for (i, name) in reported {
        if let Some((_, value)) = greeting.iter().find(|(n, _)| n == name) {
            assert_eq!(
                col(i),
                value,
                "{database}: {name} differs from the greeting"
            );
        }
    }
    if database == "fuzz_session" {
        let left = [
            "temp tables",
            "session-level settings",
            "prepared statements",
            "cursors",
            "LISTEN channels",
            "advisory locks",
        ];
        for (i, what) in left.iter().enumerate() {
            assert_eq!(
                col(i + 2),
                "0",
                "{database}: {what} left by the previous client"
            );
        }
    }
    let _ = conn.exchange(&msg(b'X', b""), true, |_| false);
}

/// How an exchange ended.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum End {
    /// `done` said so.
    Done,
    /// pgmux closed the connection.
    Closed,
    /// The connection was reset (what was in flight may be lost).
    Reset,
    /// [`ANSWER_LIMIT`] passed.
    Limit,
    /// More than [`MAX_REPLY`] bytes came.
    TooMuch,
}

struct Reply {
    bytes: Vec<u8>,
    end: End,
}

/// A client socket to pgmux.
struct Conn {
    stream: TcpStream,
}

impl Conn {
    fn connect(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("pgmux is not accepting connections: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Conn { stream }
    }

    /// Logs in as `other` (trust) and returns the greeting's parameters.
    fn login(port: u16, database: &str, app: &str) -> (Conn, Vec<(String, String)>) {
        let mut conn = Conn::connect(port);
        let startup = crate::common::raw::startup_packet(
            0,
            &[
                ("user", "other"),
                ("database", database),
                ("application_name", app),
            ],
        );
        let reply = conn.exchange(&startup, false, |m| {
            m.last().is_some_and(|(t, _)| matches!(t, b'Z' | b'E'))
        });
        let messages = frames(&reply.bytes).unwrap_or_else(|e| panic!("pgmux sent {e}"));
        match messages.last() {
            Some((b'Z', _)) => {}
            Some((b'E', body)) => panic!(
                "login to {database} refused: {}",
                String::from_utf8_lossy(body)
            ),
            _ => panic!("login to {database}: no ReadyForQuery ({:?})", reply.end),
        }
        let params = messages
            .iter()
            .filter(|(t, _)| *t == b'S')
            .filter_map(|(_, body)| {
                let mut parts = body.split(|&b| b == 0);
                let name = String::from_utf8_lossy(parts.next()?).into_owned();
                let value = String::from_utf8_lossy(parts.next()?).into_owned();
                Some((name, value))
            })
            .collect();
        (conn, params)
    }

    /// Sends `bytes` (from another thread, so that a pgmux that stops reading while its
    /// replies wait cannot block us) and reads until `done(whole messages so far)`, a
    /// close, a reset, too much or [`ANSWER_LIMIT`]. `close_after` shuts the sending side
    /// down once `bytes` are sent.
    fn exchange(
        &mut self,
        bytes: &[u8],
        close_after: bool,
        done: impl Fn(&[(u8, &[u8])]) -> bool,
    ) -> Reply {
        let deadline = Instant::now() + ANSWER_LIMIT;
        let mut writer = self.stream.try_clone().expect("a second handle");
        writer
            .set_write_timeout(Some(ANSWER_LIMIT))
            .expect("timeout");
        let mut got = Vec::new();
        // (tag, start, end) of each whole message in `got`, and where the next one starts.
        let mut whole: Vec<(u8, usize, usize)> = Vec::new();
        let mut parsed = 0;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                // pgmux may close first (an error ends the session): not ours to judge here.
                let _ = writer.write_all(bytes);
                if close_after {
                    let _ = writer.shutdown(Shutdown::Write);
                }
            });
            let mut buf = vec![0u8; 64 * 1024];
            let end = loop {
                let before = whole.len();
                while let Some(header) = got.get(parsed..).and_then(|b| b.first_chunk::<5>()) {
                    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    let end = parsed + 1 + len.max(4) as usize;
                    if end > got.len() {
                        break;
                    }
                    whole.push((header[0], parsed + 5, end));
                    parsed = end;
                }
                if whole.len() > before {
                    let messages: Vec<(u8, &[u8])> =
                        whole.iter().map(|&(t, a, b)| (t, &got[a..b])).collect();
                    if done(&messages) {
                        break End::Done;
                    }
                }
                if got.len() > MAX_REPLY {
                    break End::TooMuch;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break End::Limit;
                }
                self.stream.set_read_timeout(Some(left)).expect("timeout");
                match self.stream.read(&mut buf) {
                    Ok(0) => break End::Closed,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted
                                | io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break End::Reset,
                }
            };
            if matches!(end, End::Limit | End::TooMuch) {
                // Unblocks the writer if pgmux stopped reading.
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            Reply { bytes: got, end }
        })
    }
}

/// `bytes` as backend messages (a partial last one is dropped: the reading stopped), or
/// what is wrong with them.
fn frames(bytes: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let mut messages = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..).and_then(|b| b.first_chunk::<5>()) {
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 || !tag.is_ascii_alphanumeric() {
            return Err(format!(
                "a bad message header {header:?} after {:?}",
                tags(&messages)
            ));
        }
        let Some(body) = bytes.get(at + 5..at + 1 + len) else {
            break;
        };
        messages.push((tag, body));
        at += 1 + len;
    }
    Ok(messages)
}

/// The index of the ReadyForQuery that follows probe B's row.
fn answered(messages: &[(u8, &[u8])]) -> Option<usize> {
    let row = position_of_row(messages, PROBE_B)?;
    messages[row..]
        .iter()
        .position(|(t, _)| *t == b'Z')
        .map(|i| row + i)
}

fn position_of_row(messages: &[(u8, &[u8])], probe: &str) -> Option<usize> {
    messages
        .iter()
        .position(|(t, body)| *t == b'D' && contains(body, probe.as_bytes()))
}

fn tags(messages: &[(u8, &[u8])]) -> String {
    messages.iter().map(|(t, _)| char::from(*t)).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The text columns of a DataRow.
fn data_row(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = body.get(2..).unwrap_or_default();
    while let Some((len, after)) = rest.split_first_chunk::<4>() {
        let len = i32::from_be_bytes(*len);
        let Ok(n) = usize::try_from(len) else {
            out.push(String::new()); // NULL
            rest = after;
            continue;
        };
        let value = after.get(..n).unwrap_or_default();
        out.push(String::from_utf8_lossy(value).into_owned());
        rest = after.get(n..).unwrap_or_default();
    }
    out
}

/// The port of this process's pgmux, started (with its PostgreSQL) on the first call.
fn pgmux_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(start)
}

fn start() -> u16 {
    // A session task's panic is caught by tokio; count every panic in the process.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let (ready, port) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("pgmux".into())
        .spawn(move || {
            // As main.rs builds it for the default worker_threads = 1.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(async move {
                // Kept alive while pgmux runs; its watchdog stops it when the process exits.
                let pg = TestPostgres::start().await;
                let su = pg.superuser().await;
                // Whatever a fuzz input runs ends in time; a reset role setting is no news.
                su.batch_execute("ALTER ROLE other SET statement_timeout = '2s'")
                    .await
                    .expect("role setting");
                let text = config_toml(&pg);
                let config = pgmux::config::Config::parse_with_env(&text, "fuzz.toml", &|_| None)
                    .unwrap_or_else(|e| panic!("fuzz config: {e}\n{text}"));
                let pooler = pgmux::pooler::Pooler::new(config).expect("a pooler");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("a port for pgmux");
                let addr = listener.local_addr().expect("its address");
                ready.send(addr.port()).expect("the fuzz target waits");
                let workers = pgmux::workers::Workers::start(1).expect("no worker threads");
                pgmux::listener::run(pooler, vec![listener], std::sync::Arc::new(workers)).await;
                drop(pg);
            });
        })
        .expect("the pgmux thread");
    port.recv_timeout(Duration::from_secs(120))
        .expect("PostgreSQL and pgmux started")
}

/// pgmux's config: three databases (one per mode) on PostgreSQL's Unix socket, where
/// pg_hba trusts everyone (so an input that changes a password breaks nothing), all as
/// role `other`; pools of one; `other` logs in to pgmux by trust.
fn config_toml(pg: &TestPostgres) -> String {
    let mut text = String::from(
        r#"[server]
listen = "127.0.0.1:0"
client_login_timeout = "5s"
shutdown_timeout = "1s"

[auth]
method = "scram-sha-256"
# The fuzzed clients fail logins by design, all from 127.0.0.1: a lockout would refuse the
# harness's own checks from that address (the limiter has its tests in tests/access.rs).
max_login_failures = 0

[pool]
size = 1
wait_timeout = "10s"
connect_timeout = "5s"

[users.other]
password = "other_pw"
auth_method = "trust"

[users.scram]
password = "pencil"

[users.md5]
password = "pencil"
auth_method = "md5"
"#,
    );
    let modes = ["transaction", "session", "statement"];
    for (name, mode) in DATABASES.iter().zip(modes) {
        text.push_str(&format!(
            "\n[databases.{name}]\nhost = \"{}\"\nport = {}\ndbname = \"app\"\nuser = \"other\"\nmode = \"{mode}\"\n",
            pg.dir().display(),
            pg.port
        ));
    }
    text
}
