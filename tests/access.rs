//! Who may log in, and what a refused client learns: no enumeration of users or
//! databases, access rules and hba files, the failed-login limiter and its metrics, and
//! empty passwords refused at load. Real clients (tokio-postgres, psql) through pgmux.

mod common;

use std::time::Duration;

use common::raw::startup_packet;
use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// Tries a login; returns the SQLSTATE and message of the refusal (panics if it succeeds).
async fn refused(mux: &TestPgmux, database: &str, user: &str, password: &str) -> (String, String) {
    match mux.try_connect(database, user, password).await {
        Ok(_) => panic!("{user} logged in to {database}"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("no ErrorResponse: {e}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

/// The first message pgmux answers a startup packet with: its tag and, for an
/// Authentication message, its code.
async fn first_reply(mux: &TestPgmux, database: &str, user: &str) -> (u8, i32) {
    let mut s = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
    let packet = startup_packet(0, &[("user", user), ("database", database)]);
    s.write_all(&packet).await.unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.unwrap();
    let code = i32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    (head[0], code)
}

/// Waits until pgmux's log (written by its log thread) contains `needle`.
async fn logged(mux: &TestPgmux, needle: &str) -> String {
    let found = || async { mux.stderr_log().contains(needle) };
    assert!(
        common::eventually(Duration::from_secs(5), found).await,
        "not logged: {needle}\n{}",
        mux.stderr_log()
    );
    mux.stderr_log()
}

#[tokio::test]
async fn unknown_user_and_database_look_like_a_wrong_password() {
    let pg = TestPostgres::shared().await;
    for method in ["scram-sha-256", "md5"] {
        let mux = TestPgmux::start(pg, MuxOptions::default().with_auth_method(method)).await;
        let shape =
            |user: &str| format!("pgmux: password authentication failed for user \"{user}\"");

        let wrong = refused(&mux, "app", "app", "wrong").await;
        let unknown_user = refused(&mux, "app", "nobody", "wrong").await;
        let unknown_db = refused(&mux, "nodb", "app", "wrong").await;
        let both = refused(&mux, "nodb", "nobody", "x").await;
        assert_eq!(wrong, ("28P01".to_owned(), shape("app")), "{method}");
        assert_eq!(
            unknown_user,
            ("28P01".to_owned(), shape("nobody")),
            "{method}"
        );
        assert_eq!(unknown_db, ("28P01".to_owned(), shape("app")), "{method}");
        assert_eq!(both, ("28P01".to_owned(), shape("nobody")), "{method}");

        // The same exchange: an unknown user is asked for a password exactly as a known
        // one (AuthenticationSASL = 10, AuthenticationMD5Password = 5).
        let asked = if method == "md5" { 5 } else { 10 };
        assert_eq!(first_reply(&mux, "app", "app").await, (b'R', asked));
        assert_eq!(first_reply(&mux, "app", "nobody").await, (b'R', asked));
        assert_eq!(first_reply(&mux, "nodb", "app").await, (b'R', asked));

        // Only a client that authenticated learns that the database does not exist, as
        // with PostgreSQL.
        let (code, message) = refused(&mux, "nodb", "app", "app_pw").await;
        assert_eq!(code, "3D000", "{message}");

        // psql shows the same line for each.
        let bin = pg.bin_dir();
        for (db, user) in [("app", "app"), ("app", "nobody"), ("nodb", "other")] {
            let url = format!("postgresql://{user}:bad@127.0.0.1:{}/{db}", mux.port);
            let (ok, _, stderr) = common::run_psql(bin, &url, "SELECT 1");
            assert!(!ok);
            assert!(stderr.contains(&shape(user)), "{stderr}");
        }

        // Operators see the real reason; the password never.
        let log = logged(&mux, "reason=unknown_database").await;
        assert!(log.contains("reason=unknown_user"), "{log}");
        assert!(log.contains("reason=bad_password"), "{log}");
        assert!(!log.contains("app_pw") && !log.contains("wrong"), "{log}");
        mux.connect("app", "app")
            .await
            .simple_query("SELECT 1")
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn trust_names_the_unknown_database_after_authentication() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default().with_auth_method("trust")).await;
    let err = mux.try_connect("nodb", "app", "").await.expect_err("no db");
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    let err = mux
        .try_connect("app", "nobody", "")
        .await
        .expect_err("no user");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
}

/// `pgmux_login_failures_total{reason}` from `/metrics`.
async fn failures(mux: &TestPgmux, reason: &str) -> u64 {
    let metrics = mux.admin_get("/metrics").await.body;
    let series = format!("pgmux_login_failures_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_limiter_locks_out_a_user_from_an_address_then_the_address_once_each() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        auth_extra: "max_login_failures = 3\nmax_login_failures_per_address = 6\n\
                     login_failure_window = \"1m\"\nlogin_lockout = \"3s\"\n"
            .to_owned(),
        admin: Some(String::new()),
        ..MuxOptions::default().with_login_timeout("2s")
    };
    let mux = TestPgmux::start(pg, opts).await;
    for _ in 0..3 {
        let (code, _) = refused(&mux, "app", "app", "guess").await;
        assert_eq!(code, "28P01");
    }
    // app is locked out from this address: even the right password is refused, and told
    // why...
    for _ in 0..2 {
        let (code, message) = refused(&mux, "app", "app", "app_pw").await;
        assert_eq!(code, "28000");
        assert!(
            message.starts_with(
                "pgmux: too many failed logins for this user from this address; try again in "
            ),
            "{message}"
        );
    }
    let bin = pg.bin_dir();
    let (ok, _, stderr) = common::run_psql(bin, &mux.url("app", "app"), "SELECT 1");
    assert!(!ok && stderr.contains("too many failed logins"), "{stderr}");
    // ... while another user of the same address (a sidecar, a NAT) logs in as usual.
    let (other, _conn) = mux.try_connect("app", "other", "other_pw").await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();

    // Guesses across user names (unknown ones too) reach the address-wide ceiling: 3 for
    // app above, 3 here. Then every user of the address is refused.
    for user in ["nobody1", "nobody2", "nobody3"] {
        let (code, _) = refused(&mux, "app", user, "guess").await;
        assert_eq!(code, "28P01");
    }
    let (code, message) = refused(&mux, "app", "other", "other_pw").await;
    assert_eq!(code, "28000");
    assert!(
        message.starts_with("pgmux: too many failed logins from this address; try again in "),
        "{message}"
    );
    // The session that logged in before the lockout goes on.
    other.simple_query("SELECT 1").await.unwrap();

    assert_eq!(failures(&mux, "bad_password").await, 3);
    assert_eq!(failures(&mux, "unknown_user").await, 3);
    assert_eq!(failures(&mux, "rate_limited").await, 4);

    // Both back after the lockout; the attempts in between did not extend it.
    for (user, password) in [("app", "app_pw"), ("other", "other_pw")] {
        let back = || async { mux.try_connect("app", user, password).await.is_ok() };
        assert!(common::eventually(Duration::from_secs(15), back).await);
    }
    let log = logged(&mux, "address locked out for every user").await;
    let lockouts = log.matches("user locked out from this address").count();
    assert_eq!(lockouts, 1, "{log}");
    let lockouts = log.matches("address locked out for every user").count();
    assert_eq!(lockouts, 1, "{log}");
    assert_eq!(log.matches("reason=rate_limited").count(), 0, "{log}");

    // A broken startup packet and a client that never logs in are counted too.
    let mut s = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
    s.write_all(&[0, 0, 0, 2, 0, 0, 0, 0]).await.unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply).await;
    assert_eq!(reply.first(), Some(&b'E'));
    let mut idle = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
    let mut reply = Vec::new();
    let _ = idle.read_to_end(&mut reply).await;
    assert_eq!(reply.first(), Some(&b'E'));
    assert_eq!(failures(&mux, "protocol").await, 1);
    assert_eq!(failures(&mux, "timeout").await, 1);
    assert_eq!(failures(&mux, "rejected_by_rule").await, 0);
    assert_eq!(failures(&mux, "unknown_database").await, 0);
}

/// Rules in the TOML: reject by address, no match, and a method chosen per rule.
const RULES: &str = r#"
[[auth.rules]]
user = "other"
address = "127.0.0.1"
method = "reject"

[[auth.rules]]
type = "hostssl"
method = "trust"

[[auth.rules]]
database = ["app", "x"]
user = "app"
address = "10.0.0.0/8"
method = "trust"

[[auth.rules]]
type = "hostnossl"
database = ["app", "x"]
user = "app"
address = "127.0.0.0/8"
method = "md5"
"#;

/// After a reload: app by trust, other by SCRAM, both from anywhere on IPv4.
const RULES_AFTER: &str = r#"
[[auth.rules]]
user = "app"
address = "0.0.0.0/0"
method = "trust"

[[auth.rules]]
type = "host"
user = ["other"]
address = "all"
method = "scram-sha-256"
"#;

#[tokio::test]
async fn access_rules_allow_reject_and_choose_the_method() {
    let pg = TestPostgres::shared().await;
    let mut opts = MuxOptions {
        auth_extra: RULES.to_owned(),
        admin: Some(String::new()),
        ..MuxOptions::default()
    };
    let mux = TestPgmux::start(pg, opts.clone()).await;

    // Rule 1 rejects other from 127.0.0.1, before any password is asked.
    let (code, message) = refused(&mux, "app", "other", "other_pw").await;
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        "pgmux: no access rule allows host \"127.0.0.1\", user \"other\", database \"app\" (rule 1 rejects it)"
    );
    assert_eq!(first_reply(&mux, "app", "other").await.0, b'E');
    // hostssl never matches a plain connection, 10.0.0.0/8 not 127.0.0.1: rule 4 asks
    // app for md5 although auth.method is scram-sha-256.
    assert_eq!(first_reply(&mux, "app", "app").await, (b'R', 5));
    let app = mux.connect("app", "app").await;
    app.simple_query("SELECT 1").await.unwrap();
    let (code, _) = refused(&mux, "app", "app", "wrong").await;
    assert_eq!(code, "28P01");
    // No rule matches: named as such.
    let (code, message) = refused(&mux, "app", "nobody", "x").await;
    assert_eq!(code, "28000");
    assert!(
        message.ends_with("database \"app\" (no rule matches)"),
        "{message}"
    );
    let bin = pg.bin_dir();
    let (ok, _, stderr) = common::run_psql(bin, &mux.url("app", "other"), "SELECT 1");
    assert!(!ok && stderr.contains("(rule 1 rejects it)"), "{stderr}");
    assert_eq!(failures(&mux, "rejected_by_rule").await, 4);
    let log = logged(&mux, "reason=rejected_by_rule").await;
    assert!(!log.contains("other_pw"), "{log}");

    // A reload applies new rules to new logins; the logged-in client stays.
    opts.auth_extra = RULES_AFTER.to_owned();
    mux.rewrite_config(pg, &opts);
    mux.signal("HUP");
    let trusted = || async { first_reply(&mux, "app", "app").await == (b'R', 0) };
    assert!(common::eventually(Duration::from_secs(10), trusted).await);
    let (client, _task) = mux.try_connect("app", "app", "anything").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(first_reply(&mux, "app", "other").await, (b'R', 10));
    mux.connect("app", "other")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    app.simple_query("SELECT 2").await.unwrap();
}

#[tokio::test]
async fn hba_file_lines_decide_as_pg_hba_conf() {
    let pg = TestPostgres::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let hba = dir.path().join("pg_hba.conf");
    std::fs::write(
        &hba,
        "# TYPE DATABASE USER ADDRESS METHOD\n\
         local   all   all                    peer\n\
         host    all   other  127.0.0.1  255.255.255.255  reject\n\
         hostssl all   all    all                         trust\n\
         host    app   app    127.0.0.0/8                 trust\n\
         host    all   all    ::1/128                     md5\n",
    )
    .unwrap();
    let opts = MuxOptions {
        auth_extra: format!("hba_file = {:?}\n", hba.display().to_string()),
        ..MuxOptions::default()
    };
    let mux = TestPgmux::start(pg, opts).await;
    let (code, message) = refused(&mux, "app", "other", "other_pw").await;
    assert_eq!(code, "28000");
    assert!(
        message.ends_with("(hba_file line 3 rejects it)"),
        "{message}"
    );
    assert_eq!(first_reply(&mux, "app", "app").await, (b'R', 0));
    let (client, _task) = mux.try_connect("app", "app", "").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    // ::1/128 does not match 127.0.0.1, and line 5 is for database app only.
    let (code, message) = refused(&mux, "nodb", "app", "app_pw").await;
    assert_eq!(code, "28000");
    assert!(message.ends_with("(no rule matches)"), "{message}");

    // pgmux check names the file, line and column of each problem.
    std::fs::write(
        &hba,
        "host all all 10.0.0.0/8 md5\nhost all all db.example.com md5\nhost all all all ident\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .args(["check", "--config", &mux.config_path.to_string_lossy()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("pg_hba.conf:2:14: \"db.example.com\" is not an IP address"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pg_hba.conf:3:18: unsupported method \"ident\""),
        "{stderr}"
    );
}
