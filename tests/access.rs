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
