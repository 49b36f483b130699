//! pgmux behaves as PostgreSQL itself where a client can tell: how a connection that
//! leaves before its startup packet is closed, the values in ParameterStatus, and (in
//! session mode) the backend process id a client is given.

mod common;

use std::time::Duration;

use common::raw::{read_messages, startup_packet};
use common::{MuxOptions, TestPgmux, TestPostgres, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
