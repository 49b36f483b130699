//! The way in: authentication, bad input on raw sockets, limits. Every refusal is a real
//! ErrorResponse with the right SQLSTATE, and pgmux keeps serving others.

mod common;

use std::time::Duration;

use common::raw::{
    Raw, connect, first_error, read_messages, refusal, ssl_request_declined, startup_packet,
};
use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio::io::AsyncWriteExt;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn wrong_password_unknown_user_and_unknown_database() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;

    let err = mux
        .try_connect("app", "app", "wrong")
        .await
        .expect_err("refused");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD);
    assert!(db.message().starts_with("pgmux: "), "{}", db.message());

    let err = mux
        .try_connect("app", "nobody", "x")
        .await
        .expect_err("refused");
    // Told exactly what a wrong password is told: user names cannot be enumerated.
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    assert!(err.as_db_error().unwrap().message().contains("nobody"));

    let err = mux
        .try_connect("nodb", "app", "app_pw")
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME));
    assert!(err.as_db_error().unwrap().message().contains("nodb"));

    mux.still_serving().await;
    // Lines reach the file through pgmux's log thread: wait for the last one.
    let connected = || async { mux.stderr_log().contains("client connected") };
    assert!(common::eventually(Duration::from_secs(5), connected).await);
    // The password never shows up in pgmux's logs.
    let log = mux.stderr_log();
    assert!(!log.contains("app_pw"));
    // A log file gets plain text: colours are for terminals only.
    assert!(
        log.contains("client connected") && !log.contains('\x1b'),
        "{log}"
    );
}

#[tokio::test]
async fn md5_and_trust_methods() {
    let pg = TestPostgres::shared().await;
    let md5 = TestPgmux::start(
        pg,
        MuxOptions {
            extra: String::new(),
            ..MuxOptions::default()
        }
        .with_auth_method("md5"),
    )
    .await;
    md5.still_serving().await;
    let err = md5
        .try_connect("app", "app", "nope")
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));

    let trust = TestPgmux::start(pg, MuxOptions::default().with_auth_method("trust")).await;
    let (client, _conn) = trust.try_connect("app", "app", "anything").await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test]
async fn oversized_and_malformed_startup_packets() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;

    // Length above 10 000 bytes.
    let mut oversized = 20_000u32.to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 64]);
    assert_eq!(refusal(&mux, &oversized).await.0, "08P01");

    // Length below the minimum.
    assert_eq!(refusal(&mux, &2u32.to_be_bytes()).await.0, "08P01");

    // Parameters that are not NUL-terminated pairs.
    let mut body = (3u32 << 16).to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app");
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    assert_eq!(refusal(&mux, &packet).await.0, "08P01");

    // Protocol 2.0.
    let mut packet = 9u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&(2u32 << 16).to_be_bytes());
    packet.push(0);
    assert_eq!(refusal(&mux, &packet).await.0, "0A000");

    mux.still_serving().await;
}

#[tokio::test]
async fn garbage_after_login_gets_08p01() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default().with_auth_method("trust")).await;
    let mut c = Raw::login(&mux).await;
    // A message with an impossible length.
    c.s.write_all(&[b'Q', 0, 0, 0, 1, b'x']).await.unwrap();
    let messages = read_messages(&mut c.s, Duration::from_secs(5)).await;
    let (code, message) = first_error(&messages).expect("an error");
    assert_eq!(code, "08P01", "{message}");
    mux.still_serving().await;
}

#[tokio::test]
async fn ssl_request_is_declined_and_protocol_minor_negotiated() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default().with_auth_method("trust")).await;
    let mut s = connect(&mux).await;
    // SSLRequest: 'N', then a 3.2 startup with an unknown _pq_ option.
    ssl_request_declined(&mut s).await;
    s.write_all(&startup_packet(
        2,
        &[("user", "app"), ("database", "app"), ("_pq_.future", "1")],
    ))
    .await
    .unwrap();
    let mut c = Raw::from_stream(s);
    let seen = c.read_until(b"Z\0\0\0\x05I").await;
    assert_eq!(seen[0], b'v', "NegotiateProtocolVersion comes first");
    assert_eq!(
        &seen[5..9],
        &0u32.to_be_bytes(),
        "newest minor we speak is 0"
    );
    assert!(seen.windows(11).any(|w| w == b"_pq_.future"));
}

#[tokio::test]
async fn replication_connections_are_refused() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default().with_auth_method("trust")).await;
    let mut s = connect(&mux).await;
    s.write_all(&startup_packet(
        0,
        &[
            ("user", "app"),
            ("database", "app"),
            ("replication", "database"),
        ],
    ))
    .await
    .unwrap();
    let (code, message) =
        first_error(&read_messages(&mut s, Duration::from_secs(5)).await).expect("an error");
    assert_eq!(code, "0A000");
    assert!(message.contains("replication"), "{message}");
}

#[tokio::test]
async fn max_client_conn_gives_53300() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            max_client_conn: 2,
            ..MuxOptions::default()
        },
    )
    .await;
    let a = mux.connect("app", "app").await;
    let _b = mux.connect("app", "app").await;
    let err = mux
        .try_connect("app", "app", "app_pw")
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("max_client_conn")
    );
    drop(a);
    // A slot frees when a client leaves.
    let mut ok = false;
    for _ in 0..50 {
        if mux.try_connect("app", "app", "app_pw").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a client got in after another left");
}

#[tokio::test]
async fn client_login_timeout_closes_silent_clients() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            extra: String::new(),
            ..MuxOptions::default()
        }
        // Long enough for the SCRAM login of `still_serving` on a loaded machine.
        .with_login_timeout("2s"),
    )
    .await;
    let mut s = connect(&mux).await;
    // Say nothing: pgmux must close us with an error, not hang.
    let messages = read_messages(&mut s, Duration::from_secs(10)).await;
    let (code, message) = first_error(&messages).expect("an error before close");
    assert_eq!(code, "57014", "{message}");
    mux.still_serving().await;
}

#[tokio::test]
async fn unknown_cancel_keys_are_ignored() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, MuxOptions::default()).await;
    let mut s = connect(&mux).await;
    let mut packet = 16u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80877102u32.to_be_bytes());
    packet.extend_from_slice(&12345i32.to_be_bytes());
    packet.extend_from_slice(&678i32.to_be_bytes());
    s.write_all(&packet).await.unwrap();
    let messages = read_messages(&mut s, Duration::from_secs(5)).await;
    assert!(messages.is_empty(), "a cancel request gets no answer");
    mux.still_serving().await;
}
