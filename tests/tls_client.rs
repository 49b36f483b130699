//! TLS between clients and pgmux (`[tls]`): certificates made here with rcgen, real
//! clients (tokio-postgres over rustls, psql over libpq's OpenSSL, raw sockets for what
//! drivers never send) against pgmux in front of a plain PostgreSQL.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::raw::startup_packet;
use common::tls::{Binding, Ca, Rustls, cert_dir};
use common::{MuxOptions, TestPgmux, TestPostgres, password_for, run_psql};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding, SslMode, SslNegotiation};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// The certificates of this test binary: a CA, pgmux's certificate for 127.0.0.1 and
/// localhost, and client certificates for the users `app` and `other`.
struct Certs {
    dir: PathBuf,
    ca: Ca,
}

impl Certs {
    fn get() -> &'static Certs {
        static CERTS: std::sync::OnceLock<Certs> = std::sync::OnceLock::new();
        CERTS.get_or_init(|| {
            let dir = cert_dir("pgmux-client-tls-");
            let ca = Ca::new("pgmux test CA");
            std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
            let (cert, key) = ca.issue("pgmux", &["localhost", "127.0.0.1"]);
            std::fs::write(dir.join("pgmux.crt"), cert).unwrap();
            std::fs::write(dir.join("pgmux.key"), key).unwrap();
            for user in ["app", "other"] {
                let (cert, key) = ca.issue(user, &[]);
                std::fs::write(dir.join(format!("{user}.crt")), cert).unwrap();
                std::fs::write(dir.join(format!("{user}.key")), key).unwrap();
            }
            Certs { dir, ca }
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap()
    }

    /// A connector that checks pgmux's certificate against the CA.
    fn client(&self) -> Rustls {
        Rustls::verifying(&self.ca.pem())
    }

    /// A connector that also presents `user`'s client certificate.
    fn client_as(&self, user: &str) -> Rustls {
        Rustls::with_client_cert(
            &self.ca.pem(),
            &self.read(&format!("{user}.crt")),
            &self.read(&format!("{user}.key")),
        )
    }
}

/// `[tls]` with pgmux's certificate and these extra lines (`client_tls = ...`).
fn tls_opts(lines: &str) -> MuxOptions {
    let certs = Certs::get();
    MuxOptions {
        extra: format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{lines}\n",
            certs.path("pgmux.crt"),
            certs.path("pgmux.key"),
        ),
        admin: Some(String::new()),
        ..MuxOptions::sized(2)
    }
}

/// A tokio-postgres config for `user` on pgmux, TLS as `mode` says.
fn config(mux: &TestPgmux, user: &str, mode: SslMode) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .port(mux.port)
        .user(user)
        .password(password_for(user))
        .dbname("app")
        .ssl_mode(mode)
        .connect_timeout(Duration::from_secs(10));
    config
}

/// Connects with `tls`; the connection task runs on the caller's runtime.
async fn connect(
    config: &tokio_postgres::Config,
    tls: Rustls,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn select_one(client: &tokio_postgres::Client) {
    let row = client.query_one("SELECT 1 + $1::int", &[&1]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}

/// A plain client's refusal: (SQLSTATE, message).
async fn plain_refused(mux: &TestPgmux) -> (String, String) {
    let err = mux
        .try_connect("app", "app", "app_pw")
        .await
        .map(drop)
        .expect_err("a plain client must be refused");
    code_and_message(&err)
}

/// A refused TLS login: (SQLSTATE, message).
async fn refused_with(config: &tokio_postgres::Config, tls: Rustls) -> (String, String) {
    let err = connect(config, tls)
        .await
        .map(drop)
        .expect_err("the login must be refused");
    code_and_message(&err)
}

/// `user` over TLS (pgmux's certificate checked), with one query run.
async fn tls_client(mux: &TestPgmux, user: &str) -> tokio_postgres::Client {
    let client = connect(&config(mux, user, SslMode::Require), Certs::get().client())
        .await
        .unwrap_or_else(|e| panic!("{user} over TLS: {e}"));
    select_one(&client).await;
    client
}

fn code_and_message(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
        None => (String::new(), e.to_string()),
    }
}

/// The `tls` field of every client in `/clients`.
async fn clients_tls(mux: &TestPgmux) -> Vec<serde_json::Value> {
    let body = mux.admin_get("/clients").await.body;
    let clients: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    clients.into_iter().map(|c| c["tls"].clone()).collect()
}

#[tokio::test]
async fn require_refuses_plain_clients_and_serves_tls_ones() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, tls_opts("client_tls = \"require\"")).await;

    // A plain client is refused before authentication.
    let (code, message) = plain_refused(&mux).await;
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("TLS required"), "{message}");

    // TLS with pgmux's certificate checked by name and CA.
    let _client = tls_client(&mux, "app").await;
    let tls = clients_tls(&mux).await;
    assert_eq!(tls.len(), 1, "{tls:?}");
    let shown = tls[0].as_str().unwrap_or_default();
    assert!(shown.starts_with("TLSv1.3/TLS_"), "{shown}");

    // The failure is counted under its reason.
    let metrics = mux.admin_get("/metrics").await.body;
    assert!(
        metrics.contains("pgmux_login_failures_total{reason=\"tls\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn prefer_is_the_default_with_a_certificate_and_serves_both() {
    let pg = TestPostgres::shared().await;
    let mut opts = tls_opts("");
    opts.auth_extra = "admin_users = [\"other\"]".to_owned();
    let mux = TestPgmux::start(pg, opts).await;
    let plain = mux.connect("app", "app").await;
    select_one(&plain).await;
    let _tls = tls_client(&mux, "app").await;
    let mut shown = clients_tls(&mux).await;
    shown.sort_by_key(|v| v.is_null());
    assert!(shown[0].is_string() && shown[1].is_null(), "{shown:?}");

    // SHOW CLIENTS has PgBouncer's tls column, empty for the plain client.
    let console = mux.connect("pgmux", "other").await;
    let rows = console.simple_query("SHOW CLIENTS").await.unwrap();
    let mut column: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get("tls").unwrap_or_default().to_owned())
            }
            _ => None,
        })
        .collect();
    column.sort();
    assert_eq!(column.len(), 2, "{column:?}");
    assert!(
        column[0].is_empty() && column[1].starts_with("TLSv1.3/"),
        "{column:?}"
    );
}

#[tokio::test]
async fn psql_connects_with_require_and_verify_full() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, tls_opts("client_tls = \"require\"")).await;
    let certs = Certs::get();
    for (host, mode) in [("127.0.0.1", "require"), ("localhost", "verify-full")] {
        let url = format!(
            "postgresql://app:app_pw@{host}:{}/app?sslmode={mode}&sslrootcert={}",
            mux.port,
            certs.path("ca.crt")
        );
        let (ok, out, err) = run_psql(
            pg.bin_dir(),
            &url,
            "SELECT ssl FROM pg_stat_ssl LIMIT 0;\nSELECT 'over tls';",
        );
        assert!(ok, "psql sslmode={mode}: {err}");
        assert!(out.contains("over tls"), "{out}");
    }
    // verify-full against a name the certificate does not have fails in the client.
    let url = format!(
        "postgresql://app:app_pw@127.0.0.2:{}/app?sslmode=verify-full&sslrootcert={}",
        mux.port,
        certs.path("ca.crt")
    );
    let (ok, _, _) = run_psql(pg.bin_dir(), &url, "SELECT 1;");
    assert!(
        !ok,
        "verify-full must refuse a certificate without the name"
    );
}

#[tokio::test]
async fn direct_tls_handshake_with_alpn() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, tls_opts("client_tls = \"require\"")).await;
    let mut config = config(&mux, "app", SslMode::Require);
    config.ssl_negotiation(SslNegotiation::Direct);
    let client = connect(&config, Certs::get().client()).await.unwrap();
    select_one(&client).await;

    // Without ALPN, a direct handshake is refused over TLS, as PostgreSQL 17 does.
    let tcp = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(Rustls::without_alpn(&Certs::get().ca.pem()).config());
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(&startup_packet(0, &[("user", "app"), ("database", "app")]))
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut reply)).await;
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("08P01") && text.contains("ALPN"), "{text}");
}

#[tokio::test]
async fn scram_sha_256_plus_binds_to_the_certificate() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, tls_opts("client_tls = \"require\"")).await;
    let mut config = config(&mux, "app", SslMode::Require);
    config.channel_binding(ChannelBinding::Require);
    // tokio-postgres picks SCRAM-SHA-256-PLUS when offered and it has binding data.
    let client = connect(&config, Certs::get().client()).await.unwrap();
    select_one(&client).await;

    // A man in the middle (binding data of another certificate) fails.
    let wrong = Certs::get().client().binding(Binding::Wrong);
    let (code, message) = refused_with(&config, wrong).await;
    assert_eq!(code, "08P01", "{message}");

    // A client without binding data still logs in with SCRAM-SHA-256 when it may.
    let mut prefer = config.clone();
    prefer.channel_binding(ChannelBinding::Prefer);
    let off = Certs::get().client().binding(Binding::Off);
    let client = connect(&prefer, off).await.unwrap();
    select_one(&client).await;
}

#[tokio::test]
async fn a_plus_downgrade_is_refused() {
    // A client that can bind says "y" (it thinks the server cannot) although pgmux
    // offered SCRAM-SHA-256-PLUS: someone removed it from the offer on the way.
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, tls_opts("client_tls = \"require\"")).await;
    let tcp = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
    let mut tls = raw_tls_after_ssl_request(tcp).await;
    tls.write_all(&startup_packet(0, &[("user", "app"), ("database", "app")]))
        .await
        .unwrap();
    let offered = read_message(&mut tls).await;
    assert_eq!(offered.0, b'R');
    let text = String::from_utf8_lossy(&offered.1);
    assert!(text.contains("SCRAM-SHA-256-PLUS"), "{text}");
    let first = b"y,,n=,r=abcdefghijklmnopqrstuvwx";
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first);
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    tls.write_all(&msg).await.unwrap();
    let (tag, body) = read_message(&mut tls).await;
    assert_eq!(tag, b'E');
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("08P01") && text.contains("channel binding"),
        "{text}"
    );
}

/// SSLRequest on `tcp`, `S`, and a TLS handshake that checks pgmux's certificate.
async fn raw_tls_after_ssl_request(
    mut tcp: TcpStream,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut request = 8i32.to_be_bytes().to_vec();
    request.extend_from_slice(&80_877_103i32.to_be_bytes());
    tcp.write_all(&request).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let connector = tokio_rustls::TlsConnector::from(Certs::get().client().config());
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// One backend message: (tag, body).
async fn read_message<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let tag = s.read_u8().await.unwrap();
    let len = s.read_i32().await.unwrap();
    let mut body = vec![0u8; (len - 4) as usize];
    s.read_exact(&mut body).await.unwrap();
    (tag, body)
}

#[tokio::test]
async fn unencrypted_bytes_after_ssl_request_are_refused() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, tls_opts("")).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
    // SSLRequest and a plain startup packet in one write: the startup packet was not
    // encrypted, so it must not be taken as if it had come over TLS.
    let mut bytes = 8i32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&80_877_103i32.to_be_bytes());
    bytes.extend_from_slice(&startup_packet(0, &[("user", "app"), ("database", "app")]));
    tcp.write_all(&bytes).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let (tag, body) = read_message(&mut tcp).await;
    assert_eq!(tag, b'E');
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("08P01") && text.contains("unencrypted data after SSL request"),
        "{text}"
    );
}

#[tokio::test]
async fn client_certificates_verify_ca_and_verify_full() {
    let pg = TestPostgres::shared().await;
    let certs = Certs::get();
    let ca_line = format!("client_ca_file = \"{}\"", certs.path("ca.crt"));

    let mux = TestPgmux::start(
        pg,
        tls_opts(&format!("client_tls = \"verify-ca\"\n{ca_line}")),
    )
    .await;
    // Any certificate of the CA: other's certificate logs in as app.
    let client = connect(
        &config(&mux, "app", SslMode::Require),
        certs.client_as("other"),
    )
    .await
    .unwrap();
    select_one(&client).await;
    // No certificate: the handshake fails.
    assert!(
        connect(&config(&mux, "app", SslMode::Require), certs.client())
            .await
            .is_err()
    );

    let mux = TestPgmux::start(
        pg,
        tls_opts(&format!("client_tls = \"verify-full\"\n{ca_line}")),
    )
    .await;
    let client = connect(
        &config(&mux, "app", SslMode::Require),
        certs.client_as("app"),
    )
    .await
    .unwrap();
    select_one(&client).await;
    let err = connect(
        &config(&mux, "app", SslMode::Require),
        certs.client_as("other"),
    )
    .await
    .map(drop)
    .expect_err("the certificate names another user");
    let (code, message) = code_and_message(&err);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("CN is \"other\""), "{message}");
}

#[tokio::test]
async fn hostssl_and_hostnossl_rules_see_the_encryption() {
    let pg = TestPostgres::shared().await;
    let mut opts = tls_opts("");
    opts.auth_extra = r#"
[[auth.rules]]
type = "hostnossl"
user = "other"
method = "reject"

[[auth.rules]]
type = "hostssl"
address = "127.0.0.1/32"
method = "scram-sha-256"
"#
    .to_owned();
    let mux = TestPgmux::start(pg, opts).await;
    // Plain: no hostssl rule matches app, and other is rejected.
    let err = mux.try_connect("app", "app", "app_pw").await.err().unwrap();
    assert_eq!(code_and_message(&err).0, "28000");
    // TLS: app logs in; other is not rejected by hostnossl and logs in as well.
    for user in ["app", "other"] {
        let client = connect(&config(&mux, user, SslMode::Require), Certs::get().client())
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        select_one(&client).await;
    }
}

#[tokio::test]
async fn a_reload_with_a_new_certificate_drops_no_client() {
    let pg = TestPostgres::shared().await;
    let certs = Certs::get();
    // pgmux reads its own copy of the files, which the test then replaces.
    let dir = cert_dir("pgmux-reload-tls-");
    std::fs::copy(certs.dir.join("pgmux.crt"), dir.join("pgmux.crt")).unwrap();
    std::fs::copy(certs.dir.join("pgmux.key"), dir.join("pgmux.key")).unwrap();
    let mut opts = tls_opts("client_tls = \"require\"");
    opts.extra = format!(
        "[tls]\nclient_tls = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("pgmux.crt").display(),
        dir.join("pgmux.key").display()
    );
    let mux = TestPgmux::start(pg, opts).await;
    let before = certs.client();
    let cfg = config(&mux, "app", SslMode::Require);

    // Eight clients query in a loop over TLS through the reload.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = connect(&cfg, before.clone()).await.unwrap();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.query_one("SELECT 1", &[]).await.unwrap();
                done += 1;
            }
            done
        }));
    }

    let (cert, key) = certs.ca.issue("pgmux renewed", &["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("pgmux.crt"), &cert).unwrap();
    std::fs::write(dir.join("pgmux.key"), key).unwrap();
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);

    // A new client sees the new certificate.
    let after = certs.client();
    let client = connect(&cfg, after.clone()).await.unwrap();
    select_one(&client).await;
    let seen = after.seen.lock().unwrap().clone();
    let renewed = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    assert_eq!(seen.last().map(Vec::as_slice), Some(renewed.as_ref()));

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        let done = worker.await.expect("a client failed through the reload");
        assert!(done > 0);
    }
}

#[tokio::test]
async fn config_errors_name_the_key() {
    let certs = Certs::get();
    let cases = [
        (
            "[tls]\nclient_tls = \"require\"\n".to_owned(),
            "tls.client_tls",
        ),
        (
            format!(
                "[tls]\nclient_tls = \"verify-ca\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                certs.path("pgmux.crt"),
                certs.path("pgmux.key")
            ),
            "client_ca_file",
        ),
        (
            format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                certs.path("pgmux.crt"),
                certs.path("ca.crt")
            ),
            "tls.key_file",
        ),
    ];
    for (toml, key) in cases {
        let dir = cert_dir("pgmux-tls-check-");
        let path = dir.join("pgmux.toml");
        let text = format!(
            "[databases.app]\nhost = \"127.0.0.1\"\nport = 5432\n[users.app]\npassword = \"pw\"\n{toml}"
        );
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{toml}");
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}

#[tokio::test]
async fn cleartext_passwords_only_over_tls() {
    let pg = TestPostgres::shared().await;
    let mux = TestPgmux::start(pg, tls_opts("").with_auth_method("password")).await;
    let (code, message) = plain_refused(&mux).await;
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("needs TLS"), "{message}");

    let _client = tls_client(&mux, "app").await;
    let mut wrong = config(&mux, "app", SslMode::Require);
    wrong.password("nope");
    let err = connect(&wrong, Certs::get().client())
        .await
        .map(drop)
        .expect_err("a wrong cleartext password");
    assert_eq!(code_and_message(&err).0, "28P01");

    // Allowed explicitly, over plain TCP too.
    let mut opts = tls_opts("").with_auth_method("password");
    opts.auth_extra = "allow_cleartext_without_tls = true".to_owned();
    let mux = TestPgmux::start(pg, opts).await;
    select_one(&mux.connect("app", "app").await).await;
}

#[tokio::test]
async fn the_cert_method_logs_in_by_certificate_name() {
    let pg = TestPostgres::shared().await;
    let certs = Certs::get();
    let mut opts = tls_opts(&format!("client_ca_file = \"{}\"", certs.path("ca.crt")));
    opts.auth_extra = r#"
[[auth.rules]]
type = "hostssl"
user = "app"
method = "cert"

[[auth.rules]]
method = "scram-sha-256"
"#
    .to_owned();
    let mux = TestPgmux::start(pg, opts).await;

    // app's certificate: no password needed (a wrong one is never asked for).
    let mut no_password = config(&mux, "app", SslMode::Require);
    no_password.password("not asked");
    let client = connect(&no_password, certs.client_as("app")).await.unwrap();
    select_one(&client).await;

    // Another user's certificate, or none (certificates are optional in prefer mode).
    for tls in [certs.client_as("other"), certs.client()] {
        let (code, message) = refused_with(&config(&mux, "app", SslMode::Require), tls).await;
        assert_eq!(code, "28000", "{message}");
        assert!(
            message.contains("certificate authentication failed"),
            "{message}"
        );
    }
    // Users under the other rule log in with their password, with or without a certificate.
    let client = connect(&config(&mux, "other", SslMode::Require), certs.client())
        .await
        .unwrap();
    select_one(&client).await;
}

/// An upgrade cannot carry a TLS session (rustls cannot import its keys into a new
/// process): the client finishes its transaction on the old process, then gets 57P01 with
/// a hint to reconnect, and its reconnect reaches the new process (docs/upgrades.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_closes_a_tls_client_after_its_transaction_with_57p01() {
    let pg = TestPostgres::shared().await;
    let mut mux = TestPgmux::start(pg, tls_opts("")).await;
    let old = mux.pid();
    let config = config(&mux, "app", SslMode::Require);
    let (client, connection) = config.connect(Certs::get().client()).await.unwrap();
    let connection = tokio::spawn(connection);
    client.batch_execute("BEGIN").await.unwrap();
    mux.request_upgrade().await;
    select_one(&client).await;
    client.batch_execute("COMMIT").await.unwrap();
    let closed = connection.await.unwrap().unwrap_err();
    let said = closed.as_db_error().expect("a FATAL from pgmux");
    assert_eq!(said.code().code(), "57P01", "{said:?}");
    assert!(said.message().contains("TLS"), "{said:?}");
    assert!(
        said.hint().is_some_and(|h| h.contains("reconnect")),
        "{said:?}"
    );
    mux.wait_gone(old).await;
    let again = connect(&config, Certs::get().client()).await.unwrap();
    select_one(&again).await;
    // The old process counted it, and its counts came over with its last record.
    let closed = [("outcome", "closed")];
    let counted = common::eventually(std::time::Duration::from_secs(10), || async {
        mux.metric("pgmux_upgrade_clients_total", &closed).await == Some(1.0)
    })
    .await;
    assert!(
        counted,
        "{:?}",
        mux.metric("pgmux_upgrade_clients_total", &closed).await
    );
}
