//! Running under systemd (`Type=notify`, deploy/systemd/pgmux.service): the real pgmux
//! binary is started with `$NOTIFY_SOCKET` on a datagram socket this test binds, in front
//! of a real PostgreSQL, and must report READY=1, RELOADING=1/READY=1 and STOPPING=1.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio::net::UnixDatagram;

/// How long a state message may take before the test gives up (a hang guard only).
const MESSAGE_LIMIT: Duration = Duration::from_secs(30);

/// The socket systemd would listen on, bound by the test.
struct FakeSystemd {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeSystemd {
    fn bind() -> FakeSystemd {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-systemd-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        FakeSystemd {
            socket,
            path,
            _dir: dir,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("NOTIFY_SOCKET", self.path.display().to_string())]
    }

    /// The next state message pgmux sent.
    async fn next(&self) -> String {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(MESSAGE_LIMIT, self.socket.recv(&mut buf))
            .await
            .expect("pgmux sent a state message")
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Asserts the next message is `RELOADING=1` with a monotonic timestamp.
    async fn expect_reloading(&self) {
        let message = self.next().await;
        let usec = message
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("expected RELOADING=1, got {message:?}"));
        assert!(usec.parse::<u64>().unwrap() > 0, "{message:?}");
    }
}

#[tokio::test]
async fn ready_reloading_and_stopping_reach_notify_socket() {
    let pg = TestPostgres::shared().await;
    let systemd = FakeSystemd::bind();
    let opts = MuxOptions {
        admin: Some("token = \"systemd-test\"".to_owned()),
        env: systemd.env(),
        ..MuxOptions::default()
    };
    let mut mux = TestPgmux::start(pg, opts.clone()).await;

    // READY=1 means a client can log in: right after it, one does.
    assert_eq!(systemd.next().await, "READY=1");
    mux.still_serving().await;

    // SIGHUP: an applied reload is bracketed by RELOADING=1 and READY=1.
    mux.rewrite_config(
        pg,
        &MuxOptions {
            size: 3,
            ..opts.clone()
        },
    );
    mux.signal("HUP");
    systemd.expect_reloading().await;
    assert_eq!(systemd.next().await, "READY=1");
    mux.still_serving().await;

    // A refused reload (a broken file) leaves pgmux serving the old config: READY=1 again.
    std::fs::write(&mux.config_path, "[pool\nsize = ").unwrap();
    mux.signal("HUP");
    systemd.expect_reloading().await;
    assert_eq!(systemd.next().await, "READY=1");
    // The log is written by a thread of its own: the line may trail the datagram.
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            mux.stderr_log().contains("config reload refused")
        })
        .await
    );
    mux.still_serving().await;

    // POST /reload goes the same way.
    mux.rewrite_config(pg, &opts);
    let reply = mux.admin("POST", "/reload", Some("systemd-test")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    systemd.expect_reloading().await;
    assert_eq!(systemd.next().await, "READY=1");

    // SIGTERM: STOPPING=1, then pgmux exits.
    mux.signal("TERM");
    assert_eq!(systemd.next().await, "STOPPING=1");
    assert!(mux.wait_exit(Duration::from_secs(30)).await, "pgmux exited");
}

#[tokio::test]
async fn a_vanished_notify_socket_changes_nothing() {
    let pg = TestPostgres::shared().await;
    let systemd = FakeSystemd::bind();
    let env = systemd.env();
    drop(systemd); // the socket file goes with its temp dir
    let mut mux = TestPgmux::start(
        pg,
        MuxOptions {
            env,
            ..MuxOptions::default()
        },
    )
    .await;
    mux.still_serving().await;
    mux.signal("HUP");
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            mux.stderr_log().contains("config reloaded")
        })
        .await
    );
    mux.still_serving().await;
    mux.signal("TERM");
    assert!(mux.wait_exit(Duration::from_secs(30)).await, "pgmux exited");
    // pgmux exited, so its log thread had written everything it ever will.
    let log = mux.stderr_log();
    assert!(log.contains("pgmux stopped"), "{log}");
    // READY=1, RELOADING=1, READY=1 and STOPPING=1 all failed; the log says so once.
    assert_eq!(log.matches("cannot notify systemd").count(), 1, "{log}");
}

/// An upgrade (`pgmux upgrade`): the old process tells systemd the new one's id
/// (`MAINPID=`) and says nothing more, not even STOPPING=1 as it exits (the service is not
/// stopping); the new one does not repeat READY=1 (systemd would refuse a message from a
/// process it does not know yet), and is the one that says STOPPING=1 at its SIGTERM.
#[tokio::test]
async fn an_upgrade_hands_systemd_the_new_process() {
    let pg = TestPostgres::shared().await;
    let systemd = FakeSystemd::bind();
    let opts = MuxOptions {
        env: systemd.env(),
        ..MuxOptions::default()
    };
    let mut mux = TestPgmux::start(pg, opts).await;
    assert_eq!(systemd.next().await, "READY=1");
    let client = mux.connect("app", "app").await;
    let old = mux.pid();
    let new = mux.upgrade().await;
    assert_ne!(new, old);
    assert_eq!(systemd.next().await, format!("MAINPID={new}"));
    // Nothing else: the old process has exited (`upgrade` waited for it), so whatever it
    // sent is in the socket now, and so is a READY=1 the new one would have sent before
    // it told the old one it was ready.
    let mut buf = [0u8; 512];
    match systemd.socket.try_recv(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!(
            "unexpected state message: {:?}",
            other.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        ),
    }
    // The client moved with the rest; new ones log in to the new process.
    common::answers_select_1(&client).await;
    mux.still_serving().await;
    mux.signal("TERM");
    assert_eq!(systemd.next().await, "STOPPING=1");
}
