//! pgmux behaves as PostgreSQL itself where a client can tell: how a connection that
//! leaves before its startup packet is closed, the values in ParameterStatus, and (in
//! session mode) the backend process id a client is given.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::raw::{read_messages, startup_packet};
use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

async fn raw(mux: &TestPgmux) -> TcpStream {
    TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap()
}

/// Reads until the peer closes; returns what it sent. Panics if it does not close in 10 s.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the connection was closed")
        .expect("a clean close, not a reset");
    got
}

async fn still_serving(mux: &TestPgmux) {
    let client = mux.connect("app", "app").await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// Lines of pgmux's log at WARN or ERROR level.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

#[tokio::test]
async fn terminate_before_the_startup_packet_is_a_quiet_close() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;

    // node-postgres, closed while it connects: Terminate ('X', length 4) comes first.
    let mut s = raw(&mux).await;
    s.write_all(b"X\0\0\0\x04").await.unwrap();
    assert_eq!(
        read_to_close(&mut s).await,
        b"",
        "no answer, only the close"
    );

    // The same after an SSLRequest that was declined.
    let mut s = raw(&mux).await;
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(b"X\0\0\0\x04").await.unwrap();
    assert_eq!(read_to_close(&mut s).await, b"");

    // An 'X' that is not a Terminate is still a bad length, refused as before.
    let mut s = raw(&mux).await;
    s.write_all(b"X\0\0\0\x07abc").await.unwrap();
    let messages = read_messages(&mut s, Duration::from_secs(5)).await;
    let (code, message) = common::raw::first_error(&messages).expect("an error");
    assert_eq!(code, "08P01", "{message}");

    let log_has = |needle: &'static str| {
        let mux = &mux;
        move || async move { mux.stderr_log().contains(needle) }
    };
    assert!(
        eventually(
            Duration::from_secs(5),
            log_has("client sent Terminate before its startup packet")
        )
        .await
    );
    let log = mux.stderr_log();
    assert_eq!(
        log.matches("invalid startup packet length 1476395008")
            .count(),
        1,
        "only the 'X' that was no Terminate is refused:\n{log}"
    );
    assert!(warnings(&log).is_empty(), "{log}");
    still_serving(&mux).await;
}

#[tokio::test]
async fn a_client_that_leaves_before_or_during_its_startup_packet_is_let_go_quietly() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;

    // Nothing at all (monitors, port scanners), half a length word, half a packet.
    drop(raw(&mux).await);
    for partial in [&[0u8, 0][..], &startup_packet(0, &[("user", "app")])[..12]] {
        let mut s = raw(&mux).await;
        s.write_all(partial).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(
            read_to_close(&mut s).await,
            b"",
            "no answer to a client that left"
        );
    }

    let log_has = |needle: &'static str, times: usize| {
        let mux = &mux;
        move || async move { mux.stderr_log().matches(needle).count() == times }
    };
    // As PostgreSQL: no word about an empty connection, "incomplete startup packet" for
    // the others (PostgreSQL logs it at LOG; pgmux at debug).
    assert!(
        eventually(
            Duration::from_secs(5),
            log_has("client closed the connection before its startup packet", 1)
        )
        .await
    );
    assert!(
        eventually(
            Duration::from_secs(5),
            log_has("incomplete startup packet", 2)
        )
        .await
    );
    let log = mux.stderr_log();
    assert!(warnings(&log).is_empty(), "{log}");
    still_serving(&mux).await;
}

/// Startup parameters besides user and database.
type Settings<'a> = Vec<(&'a str, &'a str)>;

/// How a login ended, as a client sees it: the ParameterStatus set it was greeted with,
/// or the error (severity, SQLSTATE, message) it was refused with.
#[derive(Debug, PartialEq, Eq)]
enum Greeting {
    Greeted(BTreeMap<String, String>),
    Refused(String, String, String),
}

impl Greeting {
    fn param(&self, name: &str) -> &str {
        match self {
            Greeting::Greeted(params) => params
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in {params:?}")),
            Greeting::Refused(..) => panic!("refused: {self:?}"),
        }
    }
}

/// Sends a StartupMessage with these settings (as user `app` on database `app`, which
/// needs no password on this socket) and reads up to ReadyForQuery or an error.
async fn greeting<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    settings: &[(&str, &str)],
) -> Greeting {
    let mut params = vec![("user", "app"), ("database", "app")];
    params.extend_from_slice(settings);
    s.write_all(&startup_packet(0, &params)).await.unwrap();
    let mut got = Vec::new();
    let mut reported = BTreeMap::new();
    loop {
        let mut at = 0;
        while got.len() - at >= 5 {
            let len = u32::from_be_bytes(got[at + 1..at + 5].try_into().unwrap()) as usize;
            if got.len() - at < 1 + len {
                break;
            }
            let (tag, body) = (got[at], &got[at + 5..at + 1 + len]);
            at += 1 + len;
            match tag {
                b'S' => {
                    let mut parts = body.split(|&b| b == 0);
                    let name = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
                    let value = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
                    reported.insert(name, value);
                }
                b'Z' => return Greeting::Greeted(reported),
                b'E' => {
                    let mut severity = String::new();
                    for field in body.split(|&b| b == 0) {
                        if field.first() == Some(&b'V') {
                            severity = String::from_utf8_lossy(&field[1..]).into_owned();
                        }
                    }
                    let (code, message) = common::raw::error_fields(body);
                    return Greeting::Refused(severity, code, message);
                }
                _ => {}
            }
        }
        got.drain(..at);
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("a greeting in time")
            .unwrap();
        assert!(n > 0, "closed before ReadyForQuery or an error");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// The greeting PostgreSQL itself gives these settings (over its unix socket).
async fn direct_greeting(pg: &TestPostgres, settings: &[(&str, &str)]) -> Greeting {
    let path = pg.dir().join(format!(".s.PGSQL.{}", pg.port));
    greeting(UnixStream::connect(path).await.unwrap(), settings).await
}

/// The greeting pgmux gives them.
async fn mux_greeting(mux: &TestPgmux, settings: &[(&str, &str)]) -> Greeting {
    greeting(raw(mux).await, settings).await
}

#[tokio::test]
async fn parameter_status_carries_the_servers_spelling_of_the_clients_settings() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default().with_auth_method("trust")).await;
    let long_name = "a".repeat(70);
    let cases: Vec<(Settings, &str, &str)> = vec![
        (vec![], "client_encoding", "UTF8"),
        (vec![("client_encoding", "utf8")], "client_encoding", "UTF8"),
        (
            vec![("client_encoding", "euc-jp")],
            "client_encoding",
            "EUC_JP",
        ),
        (vec![("DateStyle", "iso, mdy")], "DateStyle", "ISO, MDY"),
        (vec![("datestyle", "german")], "DateStyle", "German, DMY"),
        (vec![("TimeZone", "utc")], "TimeZone", "UTC"),
        (
            vec![("application_name", &long_name)],
            "application_name",
            &long_name[..63],
        ),
        (
            vec![("standard_conforming_strings", "true")],
            "standard_conforming_strings",
            "on",
        ),
        (
            vec![("intervalstyle", "SQL_STANDARD")],
            "IntervalStyle",
            "sql_standard",
        ),
        (
            vec![
                ("options", "-c timezone=utc -c work_mem=8MB"),
                ("application_name", "x"),
            ],
            "TimeZone",
            "UTC",
        ),
    ];
    for (settings, name, expected) in &cases {
        let direct = direct_greeting(pg, settings).await;
        assert_eq!(direct.param(name), *expected, "PostgreSQL, {settings:?}");
        // Twice: the second login is answered from what pgmux learnt at the first.
        for _ in 0..2 {
            let through = mux_greeting(&mux, settings).await;
            assert_eq!(through, direct, "{settings:?}");
        }
    }
}

#[tokio::test]
async fn a_setting_the_server_refuses_refuses_the_login_as_postgresql_does() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            size: 1,
            ..MuxOptions::default().with_auth_method("trust")
        },
    )
    .await;
    let server_pid = || async {
        let client = mux.connect("app", "app").await;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        pid
    };
    let before = server_pid().await;
    for settings in [
        &[("client_encoding", "nonsense")][..],
        &[
            ("application_name", "left behind?"),
            ("options", "-c work_mem=bogus"),
        ],
        &[("no_such_setting", "1")],
        &[("server_version", "1")],
    ] {
        let direct = direct_greeting(pg, settings).await;
        assert!(
            matches!(&direct, Greeting::Refused(s, ..) if s == "FATAL"),
            "{direct:?}"
        );
        assert_eq!(mux_greeting(&mux, settings).await, direct, "{settings:?}");
    }
    // The server that tried them kept nothing and was not closed for it.
    assert_eq!(server_pid().await, before);
    let client = mux.connect("app", "app").await;
    let row = client
        .query_one(
            "SELECT current_setting('application_name'), current_setting('work_mem')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, &str>(0), row.get::<_, &str>(1)), ("", "4MB"));
}

#[tokio::test]
async fn known_settings_need_no_server_at_login_and_unknown_ones_wait_for_one() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions::sized(1)
            .waiting("300ms")
            .with_auth_method("trust"),
    )
    .await;
    let utf8 = [("client_encoding", "utf8")];
    assert_eq!(
        mux_greeting(&mux, &utf8).await.param("client_encoding"),
        "UTF8"
    );

    // The only server is held inside a transaction.
    let holder = mux.connect("app", "app").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    // Settings pgmux has seen: greeted at once, in the server's spelling, no server needed.
    assert_eq!(
        mux_greeting(&mux, &utf8).await.param("client_encoding"),
        "UTF8"
    );

    // New settings and no server within wait_timeout: the client's own spelling, as before.
    let mut s = raw(&mux).await;
    let euc = [("client_encoding", "euc-jp")];
    assert_eq!(
        greeting(&mut s, &euc).await.param("client_encoding"),
        "euc-jp"
    );
    let logged = || async {
        mux.stderr_log()
            .contains("no server to learn how it reports the client's settings")
    };
    assert!(eventually(Duration::from_secs(5), logged).await);
    holder.batch_execute("COMMIT").await.unwrap();
    // Its first query gets a server with its settings, and the server's spelling with it.
    let mut c = common::raw::Raw::from_stream(s);
    c.s.write_all(&common::raw::query("SELECT 1"))
        .await
        .unwrap();
    let replies = c.messages_until_ready().await;
    let told: Vec<String> = replies
        .iter()
        .filter(|(tag, _)| *tag == b'S')
        .map(|(_, body)| String::from_utf8_lossy(body).into_owned())
        .collect();
    assert_eq!(told, ["client_encoding\0EUC_JP\0"]);
}
