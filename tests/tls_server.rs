//! TLS from pgmux to PostgreSQL (`server_tls`): real clusters with `ssl = on` and
//! certificates made with rcgen (`common::tls`), pgmux in front, tokio-postgres (plain) as
//! the client.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::tls::{ServerCerts, mutual_cluster, tls_cluster};
use common::{MuxOptions, TestPgmux, TestPostgres, copy_round_trip, eventually};
use tokio_postgres::error::SqlState;

/// `server_tls = "verify-full"` against the CA in the certificates' file `ca_file`.
fn verify_full(ca_file: &str) -> String {
    format!(
        "server_tls = \"verify-full\"\nserver_ca_file = \"{}\"",
        ServerCerts::get().path(ca_file)
    )
}

fn opts(pool_extra: &str) -> MuxOptions {
    MuxOptions::sized(2).with_pool(pool_extra)
}

/// Whether the server sees this connection (pgmux's) as TLS.
async fn ssl_in_use(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The error a client gets when pgmux cannot reach the server: at login or first query.
async fn first_error(mux: &TestPgmux) -> tokio_postgres::Error {
    let client = match mux.try_connect("app", "app", "app_pw").await {
        Ok((client, _task)) => client,
        Err(e) => return e,
    };
    client
        .simple_query("SELECT 1")
        .await
        .expect_err("the server connection must fail")
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

#[tokio::test]
async fn require_encrypts_and_queries_work() {
    let pg = tls_cluster().await;
    let mux = TestPgmux::start(pg, opts("server_tls = \"require\"")).await;
    let client = mux.connect("app", "app").await;
    let row = client
        .query_one("SELECT 1 + $1::int", &[&41])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(ssl_in_use(&client).await);
}

#[tokio::test]
async fn prefer_is_the_default_and_uses_tls_when_offered() {
    let pg = tls_cluster().await;
    let mux = TestPgmux::start(pg, opts("")).await;
    let client = mux.connect("app", "app").await;
    assert!(ssl_in_use(&client).await);
}

#[tokio::test]
async fn verify_full_with_the_right_ca_works() {
    let pg = tls_cluster().await;
    let mux = TestPgmux::start(pg, opts(&verify_full("ca.crt"))).await;
    let client = mux.connect("app", "app").await;
    assert!(ssl_in_use(&client).await);
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_fails_with_08006() {
    let pg = tls_cluster().await;
    let mux = TestPgmux::start(pg, opts(&verify_full("other_ca.crt"))).await;
    let err = first_error(&mux).await;
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");
    let msg = message(&err);
    assert!(msg.contains("server_tls = verify-full"), "{msg}");
    assert!(msg.contains("certificate failed verification"), "{msg}");
    assert!(msg.contains("UnknownIssuer"), "{msg}");
}

#[tokio::test]
async fn verify_full_refuses_a_name_mismatch_and_verify_ca_accepts_it() {
    let pg = mutual_cluster().await;
    let certs = ServerCerts::get();
    let files = format!(
        "server_ca_file = \"{}\"\nserver_cert_file = \"{}\"\nserver_key_file = \"{}\"",
        certs.path("ca.crt"),
        certs.path("pgmux.crt"),
        certs.path("pgmux.key")
    );
    // The server's certificate names db.example.test; pgmux connects to 127.0.0.1.
    let full = TestPgmux::start(pg, opts(&format!("server_tls = \"verify-full\"\n{files}"))).await;
    let err = first_error(&full).await;
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");
    let msg = message(&err);
    assert!(msg.contains("certificate failed verification"), "{msg}");
    assert!(msg.contains("NotValidForName"), "{msg}");

    let ca = TestPgmux::start(pg, opts(&format!("server_tls = \"verify-ca\"\n{files}"))).await;
    let client = ca.connect("app", "app").await;
    assert!(ssl_in_use(&client).await);
}

#[tokio::test]
async fn mutual_tls_sends_the_client_certificate() {
    let pg = mutual_cluster().await;
    let certs = ServerCerts::get();
    let with_cert = format!(
        "server_tls = \"require\"\nserver_cert_file = \"{}\"\nserver_key_file = \"{}\"",
        certs.path("pgmux.crt"),
        certs.path("pgmux.key")
    );
    let mux = TestPgmux::start(pg, opts(&with_cert)).await;
    let client = mux.connect("app", "app").await;
    let row = client
        .query_one(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("/CN=pgmux")
    );

    // Without a certificate the server refuses (PostgreSQL's own 28000, kept).
    let without = TestPgmux::start(pg, opts("server_tls = \"require\"")).await;
    let err = first_error(&without).await;
    let msg = message(&err);
    assert!(
        msg.contains("certificate") || msg.contains("TLS"),
        "unexpected error: {msg}"
    );
}

#[tokio::test]
async fn prefer_falls_back_to_plain_and_require_fails_clearly() {
    let pg = TestPostgres::shared().await; // ssl = off
    let mux = TestPgmux::start(pg, opts("server_tls = \"prefer\"")).await;
    let client = mux.connect("app", "app").await;
    assert!(!ssl_in_use(&client).await);

    let mux = TestPgmux::start(pg, opts("server_tls = \"require\"")).await;
    let err = first_error(&mux).await;
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");
    let msg = message(&err);
    assert!(msg.contains("server_tls = require"), "{msg}");
    assert!(msg.contains("does not accept TLS"), "{msg}");
}

#[tokio::test]
async fn large_rows_and_copy_pass_through_tls() {
    let pg = tls_cluster().await;
    let mux = TestPgmux::start(pg, opts("server_tls = \"require\"")).await;
    let client = mux.connect("app", "app").await;

    // A 10 MB row: many TLS records, rustls' buffers refilled many times.
    let row = client
        .query_one("SELECT repeat('x', 10 * 1024 * 1024) AS big", &[])
        .await
        .unwrap();
    let big: &str = row.get(0);
    assert_eq!(big.len(), 10 * 1024 * 1024);
    assert!(big.bytes().all(|b| b == b'x'));

    // A 10 MB parameter the other way: plaintext queued faster than the socket takes it.
    let sent = "y".repeat(10 * 1024 * 1024);
    let row = client
        .query_one("SELECT length($1::text)", &[&sent])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 10 * 1024 * 1024);

    let copied = copy_round_trip(&client, "tls_copy", 100_000).await;
    assert_eq!((copied.rows_in, copied.lines_out), (100_000, 100_000));
    assert!(ssl_in_use(&client).await);
}

#[tokio::test]
async fn a_cancel_reaches_a_tls_server() {
    let pg = tls_cluster().await;
    let mux = TestPgmux::start(pg, opts(&verify_full("ca.crt"))).await;
    let su = pg.superuser().await;
    let client = Arc::new(mux.connect("app", "app").await);
    let token = client.cancel_token();
    let sleeper = client.clone();
    let sleeping = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await });
    let running = || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.query = 'SELECT pg_sleep(60)' AND a.state = 'active' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    };
    assert!(eventually(Duration::from_secs(10), running).await);
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let slept = sleeping.await.unwrap();
    assert_eq!(slept.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));
    // The connection goes on.
    let row = client.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test]
async fn a_reload_reads_changed_files_and_replaces_the_connections() {
    let pg = tls_cluster().await;
    let certs = ServerCerts::get();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::copy(certs.dir.join("ca.crt"), &ca).unwrap();
    let extra = format!(
        "server_tls = \"verify-full\"\nserver_ca_file = \"{}\"",
        ca.display()
    );
    let mux = TestPgmux::start(
        pg,
        MuxOptions {
            admin: Some(String::new()),
            ..opts(&extra)
        },
    )
    .await;
    let client = mux.connect("app", "app").await;
    assert!(ssl_in_use(&client).await);

    // Same file name, another CA inside: the idle connection is replaced, and the new
    // one is checked against the new file.
    std::fs::copy(certs.dir.join("other_ca.crt"), &ca).unwrap();
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    let changes = reload.json()["changes"].to_string();
    assert!(changes.contains("server_tls"), "{changes}");
    assert!(changes.contains("replacing its connections"), "{changes}");
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");
    assert!(message(&err).contains("UnknownIssuer"), "{err}");

    // The right CA again: the same client goes on.
    std::fs::copy(certs.dir.join("ca.crt"), &ca).unwrap();
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert!(ssl_in_use(&client).await);
}

#[tokio::test]
async fn bad_tls_settings_are_refused_at_load_with_their_place() {
    let certs = ServerCerts::get();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let not_pem = write("not.pem", "hello\n");
    let config = format!(
        r#"[pool]
server_tls = "verify-full"

[databases.a]
server_tls = "sometimes"

[databases.b]
server_ca_file = "{missing}"

[databases.c]
server_ca_file = "{not_pem}"

[databases.d]
server_tls = "require"
server_cert_file = "{cert}"

[users.app]
password = "app_pw"
"#,
        missing = dir.path().join("missing.crt").display(),
        not_pem = not_pem.display(),
        cert = certs.path("pgmux.crt"),
    );
    let path = write("pgmux.toml", &config);
    let err = pgmux::config::Config::load(&path).unwrap_err().to_string();
    let expect = [
        "pgmux.toml:2:14: pool.server_tls: \"verify-full\" checks the server's certificate and needs server_ca_file",
        "pgmux.toml:5:14: databases.a.server_tls: unknown value \"sometimes\"",
        "pgmux.toml:8:18: databases.b.server_ca_file: cannot read",
        "pgmux.toml:11:18: databases.c.server_ca_file:",
        "pgmux.toml:15:20: databases.d.server_cert_file: needs server_key_file",
    ];
    for line in expect {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert_file_named(&err, &not_pem);
}

fn assert_file_named(err: &str, path: &Path) {
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn servers_view_and_show_servers_say_how_each_connection_is_encrypted() {
    let pg = tls_cluster().await;
    let mut opts = opts("server_tls = \"require\"");
    opts.admin = Some(String::new());
    opts.auth_extra = "admin_users = [\"other\"]".to_owned();
    let mux = TestPgmux::start(pg, opts).await;
    let client = mux.connect("app", "app").await;
    client.simple_query("SELECT 1").await.unwrap();
    let body = mux.admin_get("/servers").await.body;
    let servers: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(!servers.is_empty(), "{body}");
    for s in &servers {
        let tls = s["tls"].as_str().unwrap_or_default();
        assert!(tls.starts_with("TLSv1.3/TLS_"), "{body}");
    }
    let console = mux.connect("pgmux", "other").await;
    let rows = console.simple_query("SHOW SERVERS").await.unwrap();
    let shown: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get("tls").unwrap_or_default().to_owned())
            }
            _ => None,
        })
        .collect();
    assert!(
        !shown.is_empty() && shown.iter().all(|t| t.starts_with("TLSv1.3/")),
        "{shown:?}"
    );
}
