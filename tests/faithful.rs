//! pgmux behaves as PostgreSQL itself where a client can tell: how a connection that
//! leaves before its startup packet is closed, the values in ParameterStatus, and (in
//! session mode) the backend process id a client is given.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::raw::{Raw, connect, query, refusal, ssl_request_declined, startup_packet};
use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::error::SqlState;

/// Reads until the peer closes; returns what it sent. Panics if it does not close in 10 s.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the connection was closed")
        .expect("a clean close, not a reset");
    got
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
    let mut s = connect(&mux).await;
    s.write_all(b"X\0\0\0\x04").await.unwrap();
    assert_eq!(
        read_to_close(&mut s).await,
        b"",
        "no answer, only the close"
    );

    // The same after an SSLRequest that was declined.
    let mut s = connect(&mux).await;
    ssl_request_declined(&mut s).await;
    s.write_all(b"X\0\0\0\x04").await.unwrap();
    assert_eq!(read_to_close(&mut s).await, b"");

    // An 'X' that is not a Terminate is still a bad length, refused as before.
    let (code, message) = refusal(&mux, b"X\0\0\0\x07abc").await;
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
    // The refusal is logged by the same thread, maybe a moment later.
    assert!(
        eventually(
            Duration::from_secs(5),
            log_has("invalid startup packet length")
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
    mux.still_serving().await;
}

#[tokio::test]
async fn a_client_that_leaves_before_or_during_its_startup_packet_is_let_go_quietly() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;

    // Nothing at all (monitors, port scanners), half a length word, half a packet.
    drop(connect(&mux).await);
    for partial in [&[0u8, 0][..], &startup_packet(0, &[("user", "app")])[..12]] {
        let mut s = connect(&mux).await;
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
    mux.still_serving().await;
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
    greeting(connect(mux).await, settings).await
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

/// Startup settings PostgreSQL refuses at login, as a name it does not know (42704) or a
/// value it does not take (22023), in a parameter of their own or inside `options`.
const REFUSED: [&[(&str, &str)]; 4] = [
    &[("options", "-c bogus_param=1")],
    &[("bogus_param", "1")],
    &[("DateStyle", "garbage")],
    &[("application_name", "x"), ("options", "--bogus-param=1")],
];

/// What a client sees of a refusal: severity and SQLSTATE.
fn refused_with(greeting: &Greeting) -> (&str, &str) {
    match greeting {
        Greeting::Refused(severity, code, _) => (severity, code),
        Greeting::Greeted(_) => panic!("greeted: {greeting:?}"),
    }
}

#[tokio::test]
async fn refused_startup_settings_get_postgresqls_own_fatal_in_every_mode() {
    let pg = TestPostgres::shared().await;
    for mode in ["transaction", "session"] {
        let opts = MuxOptions {
            mode,
            size: 1,
            wait_timeout: "5s",
            ..MuxOptions::default().with_auth_method("trust")
        };
        let mux = TestPgmux::start(pg, opts).await;
        let pid_before = {
            let client = mux.connect("app", "app").await;
            let row = client.query_one("SELECT pg_backend_pid()", &[]).await;
            row.unwrap().get::<_, i32>(0)
        };
        for settings in REFUSED {
            let direct = direct_greeting(pg, settings).await;
            let expected = if settings.iter().any(|(n, _)| *n == "DateStyle") {
                "22023"
            } else {
                "42704"
            };
            assert_eq!(refused_with(&direct), ("FATAL", expected), "{direct:?}");
            // Twice: the second is told the same, from what pgmux learnt at the first.
            for _ in 0..2 {
                let through = mux_greeting(&mux, settings).await;
                assert_eq!(through, direct, "{mode}: {settings:?}");
            }
        }
        // The only server slot was given back, and the server kept none of the settings.
        let client = mux.connect("app", "app").await;
        let row = client
            .query_one(
                "SELECT pg_backend_pid(), current_setting('DateStyle'), \
                 current_setting('bogus_param', true), current_setting('application_name')",
                &[],
            )
            .await
            .unwrap();
        let datestyle: &str = row.get(1);
        assert_eq!(datestyle, "ISO, MDY", "{mode}");
        assert_eq!(row.get::<_, Option<&str>>(2), None, "{mode}");
        assert_eq!(row.get::<_, &str>(3), "", "{mode}");
        if mode == "transaction" {
            // Checked on a server without closing it.
            assert_eq!(row.get::<_, i32>(0), pid_before);
        }
    }
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
    let euc = [("client_encoding", "euc-jp")];
    assert_eq!(
        mux_greeting(&mux, &euc).await.param("client_encoding"),
        "EUC_JP"
    );
    let bogus = [("bogus_param", "1")];
    let refused = mux_greeting(&mux, &bogus).await;
    assert_eq!(refused_with(&refused), ("FATAL", "42704"));

    // The only server is held inside a transaction.
    let holder = mux.connect("app", "app").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    // Settings pgmux has seen: greeted at once, in the server's spelling, no server needed;
    // refused settings are told PostgreSQL's own error again.
    assert_eq!(
        mux_greeting(&mux, &utf8).await.param("client_encoding"),
        "UTF8"
    );
    assert_eq!(mux_greeting(&mux, &bogus).await, refused);

    // Settings no server has checked, and none free within wait_timeout: refused with
    // pgmux's 53300 rather than let in with settings its server might refuse.
    for unchecked in [
        &[("client_encoding", "latin1")][..],
        &[("options", "-c other_bogus=1")],
        &[("DateStyle", "garbage")],
    ] {
        let got = mux_greeting(&mux, unchecked).await;
        assert_eq!(refused_with(&got), ("FATAL", "53300"), "{unchecked:?}");
    }

    // A new set of settings that servers have each taken before (and an application
    // name, which PostgreSQL never refuses) needs no server: the client's own spelling.
    let mut s = connect(&mux).await;
    let euc = [("client_encoding", "euc-jp"), ("application_name", "new")];
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

    // Once a server is free, settings never seen are checked by it: PostgreSQL's word.
    let got = mux_greeting(&mux, &[("DateStyle", "garbage")]).await;
    assert_eq!(refused_with(&got), ("FATAL", "22023"));
    let log = mux.stderr_log();
    assert!(!log.contains("a hidden query of pgmux's"), "{log}");
}

/// The whole messages in `raw`, as (tag, body).
fn messages(raw: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while raw.len() - at >= 5 {
        let len = u32::from_be_bytes(raw[at + 1..at + 5].try_into().unwrap()) as usize;
        if raw.len() - at < 1 + len {
            break;
        }
        out.push((raw[at], raw[at + 5..at + 1 + len].to_vec()));
        at += 1 + len;
    }
    out
}

/// The first letter of an ErrorResponse's severity (`F` for FATAL, `E` for ERROR).
fn severity(body: &[u8]) -> u8 {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"V"))
        .and_then(|v| v.first().copied())
        .unwrap_or(0)
}

/// The process id a greeting's BackendKeyData carries.
fn backend_pid(greeting: &[(u8, Vec<u8>)]) -> i32 {
    let (_, body) = greeting
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .expect("a BackendKeyData");
    i32::from_be_bytes(body[..4].try_into().unwrap())
}

fn session_mode(size: u32) -> MuxOptions {
    MuxOptions {
        mode: "session",
        size,
        wait_timeout: "300ms",
        ..MuxOptions::default().with_auth_method("trust")
    }
}

#[tokio::test]
async fn session_mode_tells_the_client_its_real_backend_pid() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, session_mode(1)).await;
    let (mut c, greeted) = Raw::login_with(&mux, 0, &[("user", "app"), ("database", "app")]).await;
    let pid = backend_pid(&greeted);
    assert_eq!(
        c.run(&[query("SELECT pg_backend_pid()")]).await,
        ["T", &format!("D:{pid}"), "C"]
    );

    // A notification's sender is the same process, as the client's own id says.
    c.s.write_all(&query("LISTEN faithful; NOTIFY faithful, 'hi'"))
        .await
        .unwrap();
    let replies = c.messages_until_ready().await;
    let (_, notification) = replies
        .iter()
        .find(|(tag, _)| *tag == b'A')
        .expect("a NotificationResponse");
    assert_eq!(
        i32::from_be_bytes(notification[..4].try_into().unwrap()),
        pid
    );
    assert!(notification[4..].starts_with(b"faithful\0hi\0"));

    // The only server is this client's until it leaves: another login is refused with
    // the checkout's error, FATAL, as PgBouncer does.
    match mux_greeting(&mux, &[]).await {
        Greeting::Refused(severity, code, _) => {
            assert_eq!((&*severity, &*code), ("FATAL", "53300"))
        }
        other => panic!("{other:?}"),
    }
    drop(c);

    // A session-mode login is greeted by its own server, exactly as PostgreSQL greets it,
    // and refused as PostgreSQL refuses it.
    for settings in [
        &[("client_encoding", "euc-jp"), ("TimeZone", "utc")][..],
        &[("DateStyle", "nonsense")],
    ] {
        let direct = direct_greeting(pg, settings).await;
        let mut through = mux_greeting(&mux, settings).await;
        for _ in 0..50 {
            // The previous session's server may still be on its way back.
            if !matches!(&through, Greeting::Refused(_, code, _) if code == "53300") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            through = mux_greeting(&mux, settings).await;
        }
        assert_eq!(through, direct, "{settings:?}");
    }
}

async fn pid_of(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn session_mode_terminate_and_cancel_reach_the_clients_backend() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            mode: "session",
            size: 2,
            ..MuxOptions::default().with_auth_method("trust")
        },
    )
    .await;
    let su = pg.superuser().await;

    // Cancel: the key the client holds (the real process id, pgmux's secret) stops its
    // query, and the session goes on on the same backend.
    let client = mux.connect("app", "app").await;
    let pid = pid_of(&client).await;
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let slept = client.simple_query("SELECT pg_sleep(60)").await;
        (client, slept)
    });
    let running = || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE pid = $1 AND query = 'SELECT pg_sleep(60)' AND state = 'active'",
            &[&pid],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    };
    assert!(eventually(Duration::from_secs(10), running).await);
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (client, slept) = sleeping.await.unwrap();
    assert_eq!(slept.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));
    assert_eq!(pid_of(&client).await, pid);

    // pg_terminate_backend of the id the client knows ends its session with PostgreSQL's
    // own 57P01, as it would directly. PostgreSQL itself sometimes closes without sending
    // it (seen directly too, about one time in ten): then pgmux says it lost the server.
    let mut told_57p01 = 0;
    let mut victim_pids = Vec::new();
    for _ in 0..10 {
        let (mut victim, greeted) =
            Raw::login_with(&mux, 0, &[("user", "app"), ("database", "app")]).await;
        let victim_pid = backend_pid(&greeted);
        victim_pids.push(victim_pid);
        let terminated: bool = su
            .query_one("SELECT pg_terminate_backend($1)", &[&victim_pid])
            .await
            .unwrap()
            .get(0);
        assert!(terminated);
        let rest = read_to_close(&mut victim.s).await;
        let codes: Vec<(u8, String)> = messages(&rest)
            .into_iter()
            .filter(|(tag, _)| *tag == b'E')
            .map(|(_, body)| (severity(&body), common::raw::error_fields(&body).0))
            .collect();
        match codes.first() {
            Some((b'F', code)) if code == "57P01" => {
                // The server's FATAL is the last word, as directly: none of pgmux's after it.
                assert_eq!(codes.len(), 1, "{codes:?}");
                told_57p01 += 1;
            }
            Some((b'F', code)) if code == "08006" => {}
            _ => panic!("{codes:?}"),
        }
        if told_57p01 == 3 {
            break;
        }
    }
    assert!(told_57p01 > 0, "PostgreSQL's 57P01 reached the client");
    // The other session never noticed; its server's slot was given to the next login.
    assert_eq!(pid_of(&client).await, pid);
    let next = mux.connect("app", "app").await;
    assert!(!victim_pids.contains(&pid_of(&next).await));
}
