//! LISTEN/NOTIFY in transaction mode, by fan-out: real tokio-postgres clients on a pool
//! smaller than the listeners, against a real PostgreSQL.

mod common;

use std::time::Duration;

use common::{MuxOptions, TestPgmux, TestPostgres, password_for};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};

/// A client whose notifications arrive on a channel.
struct Listener {
    client: Client,
    notes: mpsc::UnboundedReceiver<Notification>,
}

impl Listener {
    async fn connect(mux: &TestPgmux) -> Listener {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(mux.port)
            .user("app")
            .password(password_for("app"))
            .dbname("app");
        let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        let (tx, notes) = mpsc::unbounded_channel();
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n);
                }
            }
        });
        Listener { client, notes }
    }

    async fn next(&mut self) -> Notification {
        tokio::time::timeout(Duration::from_secs(10), self.notes.recv())
            .await
            .expect("no notification within 10 s")
            .expect("the connection ended")
    }

    /// Asserts that nothing arrives within a short while.
    async fn nothing(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.notes.recv()).await;
        assert!(got.is_err(), "unexpected notification: {got:?}");
    }
}

/// Sends NOTIFY through pgmux; returns the process id of the server that sent it.
async fn notify(client: &Client, channel: &str, payload: &str) -> i32 {
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), pg_notify($1, $2)::text",
            &[&channel, &payload],
        )
        .await
        .unwrap();
    row.get(0)
}

fn opts() -> MuxOptions {
    MuxOptions {
        admin: Some(String::new()),
        ..MuxOptions::sized(2)
    }
}

#[tokio::test]
async fn listeners_get_notifications_with_the_senders_pid_on_a_small_pool() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, opts()).await;
    let mut a = Listener::connect(&mux).await;
    let mut b = Listener::connect(&mux).await;
    a.client.batch_execute("LISTEN jobs").await.unwrap();
    b.client.batch_execute("LISTEN \"Jobs\"").await.unwrap();
    let sender = mux.connect("app", "app").await;

    let pid = notify(&sender, "jobs", "hello").await;
    let n = a.next().await;
    assert_eq!(
        (n.channel(), n.payload(), n.process_id()),
        ("jobs", "hello", pid)
    );
    b.nothing().await;
    notify(&sender, "Jobs", "upper").await;
    assert_eq!(b.next().await.payload(), "upper");
    a.nothing().await;

    // Self-notification: the listener's own NOTIFY comes back to it.
    let own = notify(&a.client, "jobs", "self").await;
    let n = a.next().await;
    assert_eq!((n.payload(), n.process_id()), ("self", own));

    // No pooled server listens: the pool's servers are clean.
    let rows = sender
        .query("SELECT pg_listening_channels()", &[])
        .await
        .unwrap();
    assert!(rows.is_empty());

    // UNLISTEN stops delivery.
    a.client.batch_execute("UNLISTEN jobs").await.unwrap();
    notify(&sender, "jobs", "after").await;
    a.nothing().await;

    let clients = mux.admin_get("/clients").await.body;
    assert!(clients.contains("\"channels\":[\"Jobs\"]"), "{clients}");
    let metrics = mux.admin_get("/metrics").await.body;
    assert!(
        metrics.contains("pgmux_notify_listening_clients 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pgmux_notify_channels 1"), "{metrics}");
    assert!(metrics.contains("pgmux_notify_queued 0"), "{metrics}");
    let servers = mux.admin_get("/servers").await.body;
    assert!(
        servers.contains("\"state\":\"listener\"") && servers.contains("LISTEN (1 channels)"),
        "{servers}"
    );
}

#[tokio::test]
async fn a_listen_inside_a_transaction_counts_only_if_it_commits() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, opts()).await;
    let mut l = Listener::connect(&mux).await;
    let sender = mux.connect("app", "app").await;

    l.client
        .batch_execute("BEGIN; LISTEN rolled; ROLLBACK")
        .await
        .unwrap();
    l.client.batch_execute("BEGIN").await.unwrap();
    l.client.batch_execute("LISTEN kept").await.unwrap();
    l.client.batch_execute("SAVEPOINT s").await.unwrap();
    l.client.batch_execute("LISTEN undone").await.unwrap();
    l.client
        .batch_execute("ROLLBACK TO SAVEPOINT s")
        .await
        .unwrap();
    l.client.batch_execute("COMMIT").await.unwrap();

    for channel in ["rolled", "undone", "kept"] {
        notify(&sender, channel, channel).await;
    }
    assert_eq!(l.next().await.payload(), "kept");
    l.nothing().await;

    // The extended protocol, and a function that LISTENs, go through the server too.
    l.client.execute("LISTEN extended", &[]).await.unwrap();
    l.client
        .batch_execute("DO $$BEGIN EXECUTE 'LISTEN from_do'; END$$")
        .await
        .unwrap();
    notify(&sender, "extended", "e").await;
    notify(&sender, "from_do", "d").await;
    let mut got = vec![
        l.next().await.payload().to_owned(),
        l.next().await.payload().to_owned(),
    ];
    got.sort();
    assert_eq!(got, ["d", "e"]);
    let rows = sender
        .query("SELECT pg_listening_channels()", &[])
        .await
        .unwrap();
    assert!(rows.is_empty(), "a pooled server still listens");

    // UNLISTEN in a transaction counts when it commits, as in PostgreSQL.
    l.client
        .batch_execute("BEGIN; UNLISTEN from_do; ROLLBACK")
        .await
        .unwrap();
    notify(&sender, "from_do", "kept").await;
    assert_eq!(l.next().await.payload(), "kept");
    l.client.batch_execute("BEGIN").await.unwrap();
    l.client.batch_execute("UNLISTEN from_do").await.unwrap();
    // Inside its transaction the client gets nothing; after the commit the channel is
    // no longer listened to, so what came meanwhile is not delivered (as in PostgreSQL).
    notify(&sender, "from_do", "not yet").await;
    l.nothing().await;
    l.client.batch_execute("COMMIT").await.unwrap();
    notify(&sender, "from_do", "gone").await;
    l.nothing().await;
    l.client.batch_execute("LISTEN from_do").await.unwrap();

    // UNLISTEN by the extended protocol (as pgjdbc sends it) stops delivery too.
    l.client.execute("UNLISTEN extended", &[]).await.unwrap();
    notify(&sender, "extended", "gone").await;
    notify(&sender, "from_do", "still").await;
    assert_eq!(l.next().await.payload(), "still");
}

#[tokio::test]
async fn two_hundred_listeners_share_one_listener_connection() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, opts()).await;
    let mut listeners = Vec::new();
    for _ in 0..200 {
        let l = Listener::connect(&mux).await;
        l.client.batch_execute("LISTEN fanout").await.unwrap();
        listeners.push(l);
    }
    let sender = mux.connect("app", "app").await;
    let pid = notify(&sender, "fanout", "all").await;
    for l in &mut listeners {
        let n = l.next().await;
        assert_eq!((n.payload(), n.process_id()), ("all", pid));
    }
    // The server connections are the pool's (2 at most) and one listener connection, not
    // 200 (counted in /servers: other tests share the cluster).
    let servers = mux.admin_get("/servers").await.json();
    let servers = servers.as_array().unwrap();
    let listeners = servers.iter().filter(|s| s["state"] == "listener").count();
    assert_eq!(listeners, 1, "{servers:?}");
    assert!(servers.len() <= 3, "{servers:?}");
    let admin = pg.superuser().await;
    let row = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&servers
                .iter()
                .filter_map(|s| s["pid"].as_i64().map(|p| p as i32))
                .collect::<Vec<i32>>()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0) as usize, servers.len());
}

#[tokio::test]
async fn large_payloads_arrive_whole_and_in_order() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, opts()).await;
    let mut l = Listener::connect(&mux).await;
    l.client.batch_execute("LISTEN ordered").await.unwrap();
    let sender = mux.connect("app", "app").await;
    let big = "x".repeat(7999);
    notify(&sender, "ordered", &big).await;
    assert_eq!(l.next().await.payload(), big);
    sender
        .batch_execute(
            "BEGIN; SELECT pg_notify('ordered', i::text) FROM generate_series(1, 100) i; COMMIT",
        )
        .await
        .unwrap();
    for i in 1..=100 {
        assert_eq!(l.next().await.payload(), i.to_string());
    }
}

#[tokio::test]
async fn a_killed_listener_connection_is_reopened_and_listens_again() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, opts()).await;
    let mut l = Listener::connect(&mux).await;
    l.client.batch_execute("LISTEN survive").await.unwrap();
    let sender = mux.connect("app", "app").await;
    notify(&sender, "survive", "before").await;
    assert_eq!(l.next().await.payload(), "before");

    // This pgmux's listener connection (other tests share the cluster).
    let servers = mux.admin_get("/servers").await.json();
    let pid = servers
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "listener")
        .and_then(|s| s["pid"].as_i64())
        .expect("a listener connection in /servers") as i32;
    let admin = pg.superuser().await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // The listener connection comes back and LISTENs again; until then NOTIFYs are lost
    // (counted as a gap), so send until one arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut arrived = false;
    while !arrived && std::time::Instant::now() < deadline {
        notify(&sender, "survive", "after").await;
        arrived = tokio::time::timeout(Duration::from_millis(200), l.notes.recv())
            .await
            .is_ok_and(|n| n.is_some_and(|n| n.payload() == "after"));
    }
    assert!(
        arrived,
        "no notification after the listener connection was killed"
    );
    let metrics = mux.admin_get("/metrics").await.body;
    assert!(
        metrics.contains("pgmux_notify_listener_reconnects_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_listener_that_never_reads_is_cut_off_and_costs_the_others_nothing() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            auth_method: "trust",
            ..opts()
        },
    )
    .await;
    let mut stuck = common::raw::Raw::login(&mux).await;
    assert_eq!(
        stuck.run(&[common::raw::query("LISTEN flood")]).await,
        ["C"]
    );
    let mut reader = Listener::connect(&mux).await;
    reader.client.batch_execute("LISTEN flood").await.unwrap();

    // About 32 MB of notifications: more than the stuck client's queue, pgmux's output
    // bound and the socket buffers hold.
    let sender = mux.connect("app", "app").await;
    sender
        .batch_execute(
            "SELECT pg_notify('flood', i || repeat('x', 7990)) FROM generate_series(1, 4000) i",
        )
        .await
        .unwrap();
    for i in 1..=4000 {
        let n = reader.next().await;
        assert!(
            n.payload().starts_with(&format!("{i}x")),
            "out of order at {i}"
        );
    }
    let cut = common::eventually(Duration::from_secs(10), || async {
        mux.admin_get("/metrics")
            .await
            .body
            .contains("pgmux_notify_dropped_clients_total 1")
    })
    .await;
    assert!(cut, "the stuck listener was not cut off");
    // Its connection ends: what it did not read, then the close.
    let mut sink = vec![0u8; 1 << 20];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        while stuck.s.read(&mut sink).await.unwrap_or(0) > 0 {}
    })
    .await;
    assert!(
        closed.is_ok(),
        "the stuck listener's connection stayed open"
    );
}
