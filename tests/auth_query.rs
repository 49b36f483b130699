//! Users that live in PostgreSQL, not in pgmux's config (`auth_user` / `auth_query`): their
//! SCRAM verifier or md5 hash is looked up, the client is checked against it, and pgmux logs
//! in to PostgreSQL as them with the keys the client's proof revealed (or the md5 hash),
//! never knowing the password. Real PostgreSQL, real tokio-postgres clients.

mod common;

use std::time::Duration;

use common::raw::startup_packet;
use common::{MuxOptions, TestPgmux, TestPostgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs each statement as the superuser.
async fn as_superuser(pg: &TestPostgres, statements: &[String]) {
    let admin = pg.superuser().await;
    for sql in statements {
        admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Creates the lookup role `auth` (password `auth_pw`), a superuser when `superuser`.
fn auth_role(auth: &str, superuser: bool) -> String {
    let su = if superuser {
        "SUPERUSER"
    } else {
        "NOSUPERUSER"
    };
    format!("CREATE ROLE {auth} LOGIN {su} PASSWORD 'auth_pw'")
}

/// Options with `auth_user = auth` (listed in `[users]` with its password), `auth_lines`
/// added to `[auth]`, and an admin port.
fn options(auth: &str, auth_lines: &str) -> MuxOptions {
    MuxOptions {
        auth_extra: format!("auth_user = \"{auth}\"\n{auth_lines}"),
        extra: format!("[users.{auth}]\npassword = \"auth_pw\"\n"),
        admin: Some(String::new()),
        ..MuxOptions::default()
    }
}

/// pgmux started with [`options`].
async fn start(pg: &TestPostgres, auth: &str, auth_lines: &str) -> TestPgmux {
    TestPgmux::start(pg, options(auth, auth_lines)).await
}

/// Logs in and returns `current_user` as PostgreSQL sees it, from a transaction.
async fn whoami(mux: &TestPgmux, user: &str, password: &str) -> String {
    let (client, _task) = mux
        .try_connect("app", user, password)
        .await
        .unwrap_or_else(|e| panic!("{user} could not log in: {e}\n{}", mux.stderr_log()));
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}\n{}", mux.stderr_log()));
    row.get(0)
}

/// Tries a login; returns the SQLSTATE and message of the refusal (panics if it succeeds).
async fn refused(mux: &TestPgmux, user: &str, password: &str) -> (String, String) {
    match mux.try_connect("app", user, password).await {
        Ok(_) => panic!("{user} logged in with \"{password}\""),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("no ErrorResponse: {e}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

/// Waits until pgmux's log contains `needle`, and returns the log.
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
async fn scram_user_from_postgres_logs_in_and_survives_reload() {
    let pg = TestPostgres::shared().await;
    as_superuser(
        pg,
        &[
            auth_role("aq_auth1", true),
            "CREATE ROLE aq_alice LOGIN PASSWORD 'alice_pw'".into(),
        ],
    )
    .await;
    let mux = start(pg, "aq_auth1", "admin_users = [\"other\"]\n").await;

    // Transaction mode: every statement may run on another server connection, each one
    // opened by pgmux as aq_alice with the keys from her proof.
    let (client, _task) = mux
        .try_connect("app", "aq_alice", "alice_pw")
        .await
        .unwrap();
    for _ in 0..3 {
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "aq_alice");
    }
    client
        .batch_execute("BEGIN; CREATE TEMP TABLE t (x int); ROLLBACK")
        .await
        .unwrap();
    assert_eq!(whoami(&mux, "aq_alice", "alice_pw").await, "aq_alice");

    // A pool like any other: in /pools, and kept across a reload.
    let pools = mux.admin_get("/pools").await;
    assert!(pools.body.contains("aq_alice"), "{}", pools.body);
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "aq_alice");
    assert_eq!(whoami(&mux, "aq_alice", "alice_pw").await, "aq_alice");
    let pools = mux.admin_get("/pools").await;
    assert!(pools.body.contains("aq_alice"), "{}", pools.body);
    let console = mux.connect("pgbouncer", "other").await;
    let shown = console.simple_query("SHOW POOLS").await.unwrap();
    let listed = shown.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get("user") == Some("aq_alice"),
        _ => false,
    });
    assert!(listed, "SHOW POOLS has no aq_alice row");
    let metrics = mux.admin_get("/metrics").await;
    assert!(
        metrics.body.contains("user=\"aq_alice\""),
        "{}",
        metrics.body
    );
    // Never the password or the keys in the log.
    assert!(!mux.stderr_log().contains("alice_pw"));
}

#[tokio::test]
async fn md5_user_from_postgres_logs_in_with_md5() {
    let pg = TestPostgres::shared().await;
    // pg_hba.conf asks every TCP login for scram-sha-256, which an md5 password cannot
    // answer: let this role use md5 (a line in front, then a reload of PostgreSQL).
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "SET password_encryption = 'md5'; CREATE ROLE aq_dave LOGIN PASSWORD 'dave_pw'; \
             RESET password_encryption;",
        )
        .await
        .unwrap();
    let hba: String = admin
        .query_one("SELECT pg_read_file(current_setting('hba_file'))", &[])
        .await
        .unwrap()
        .get(0);
    let hba = format!("host all aq_dave 127.0.0.1/32 md5\n{hba}");
    // COPY takes no parameters: the lines as literals, one row each.
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let lines: Vec<String> = hba.lines().map(quote).collect();
    let path: String = admin
        .query_one("SELECT current_setting('hba_file')", &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!(
            "COPY (SELECT unnest(ARRAY[{}]::text[])) TO {}",
            lines.join(","),
            quote(&path)
        ))
        .await
        .unwrap_or_else(|e| panic!("rewriting pg_hba.conf: {e}"));
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let direct = || async {
        let url = format!("postgresql://aq_dave:dave_pw@127.0.0.1:{}/app", pg.port);
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_ok()
    };
    assert!(
        common::eventually(Duration::from_secs(10), direct).await,
        "PostgreSQL did not take the md5 line of pg_hba.conf"
    );
    admin
        .batch_execute(&auth_role("aq_auth2", true))
        .await
        .unwrap();

    let mux = start(pg, "aq_auth2", "").await;
    assert_eq!(whoami(&mux, "aq_dave", "dave_pw").await, "aq_dave");
    assert_eq!(whoami(&mux, "aq_dave", "dave_pw").await, "aq_dave");
    let (code, _) = refused(&mux, "aq_dave", "wrong").await;
    assert_eq!(code, "28P01");
    // SCRAM is the method, yet an md5 secret can only do md5: the log says why.
    logged(&mux, "md5 hash: the client was asked for md5").await;

    // A client that accepts SCRAM only (libpq's require_auth=scram-sha-256) is asked for
    // md5 and leaves: the log names the cause and the fix.
    let mut raw = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
    let packet = startup_packet(0, &[("user", "aq_dave"), ("database", "app")]);
    raw.write_all(&packet).await.unwrap();
    let mut head = [0u8; 9];
    raw.read_exact(&mut head).await.unwrap();
    let code = i32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    assert_eq!((head[0], code), (b'R', 5), "AuthenticationMD5Password");
    drop(raw);
    let log = logged(&mux, "asked for md5 and left").await;
    assert!(log.contains("password_encryption"), "{log}");
}

#[tokio::test]
async fn unknown_user_and_wrong_password_get_28p01() {
    let pg = TestPostgres::shared().await;
    as_superuser(
        pg,
        &[
            auth_role("aq_auth3", true),
            "CREATE ROLE aq_bob LOGIN PASSWORD 'bob_pw'".into(),
        ],
    )
    .await;
    let mux = start(pg, "aq_auth3", "").await;

    let wrong = refused(&mux, "aq_bob", "nope").await;
    let unknown = refused(&mux, "aq_nobody", "nope").await;
    assert_eq!(wrong.0, "28P01");
    assert_eq!(unknown.0, "28P01");
    // The same message shape: nothing tells an unknown user from a wrong password.
    assert_eq!(
        wrong.1.replace("aq_bob", "X"),
        unknown.1.replace("aq_nobody", "X")
    );
    // Asked again, still refused (the answer is cached, not asked of PostgreSQL).
    assert_eq!(refused(&mux, "aq_nobody", "nope").await.0, "28P01");
    let metrics = mux.admin_get("/metrics").await.body;
    for line in [
        "pgmux_auth_query_lookups_total{result=\"found\"} 1",
        "pgmux_auth_query_lookups_total{result=\"not_found\"} 1",
        "pgmux_auth_query_lookups_total{result=\"cached\"} 1",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    // A role without a password, or one that cannot log in, is refused the same way.
    as_superuser(pg, &["CREATE ROLE aq_nopass LOGIN".into()]).await;
    assert_eq!(refused(&mux, "aq_nopass", "").await.0, "28P01");
    assert_eq!(whoami(&mux, "aq_bob", "bob_pw").await, "aq_bob");
}

#[tokio::test]
async fn password_changed_in_postgres_while_pgmux_runs() {
    let pg = TestPostgres::shared().await;
    as_superuser(
        pg,
        &[
            auth_role("aq_auth4", true),
            "CREATE ROLE aq_carol LOGIN PASSWORD 'old_pw'".into(),
        ],
    )
    .await;
    // A long cache, and no pause between a failed login and the next lookup.
    let mux = start(
        pg,
        "aq_auth4",
        "auth_cache_ttl = \"1h\"\nauth_negative_cache_ttl = \"0s\"\n",
    )
    .await;
    let (early, _early_task) = mux.try_connect("app", "aq_carol", "old_pw").await.unwrap();
    early.batch_execute("SELECT 1").await.unwrap();

    as_superuser(pg, &["ALTER ROLE aq_carol PASSWORD 'new_pw'".into()]).await;
    // The pool must open a connection with the keys of the old password: it says why
    // it cannot, and what will fix it.
    let replaced = mux.admin_post("/pools/app/aq_carol/reconnect").await;
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    let err = early.batch_execute("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert!(
        db.message()
            .contains("changed in PostgreSQL since its client logged in"),
        "{err:?}"
    );
    assert!(
        db.hint().unwrap_or_default().contains("log in again"),
        "{err:?}"
    );

    // The cached secret is the old one: the new password fails once, which makes pgmux
    // ask PostgreSQL again; the next try logs in with the new keys.
    assert_eq!(refused(&mux, "aq_carol", "new_pw").await.0, "28P01");
    assert_eq!(whoami(&mux, "aq_carol", "new_pw").await, "aq_carol");
    logged(&mux, "the user's secret changed in PostgreSQL").await;
    assert_eq!(refused(&mux, "aq_carol", "old_pw").await.0, "28P01");
    // New server connections log in with the new keys.
    let (a, _ta) = mux.try_connect("app", "aq_carol", "new_pw").await.unwrap();
    let (b, _tb) = mux.try_connect("app", "aq_carol", "new_pw").await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap(); // a second server connection, opened now
    let row = b.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "aq_carol");
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("COMMIT").await.unwrap();
    // The client that logged in before the change works again: its pool has the new keys.
    let row = early
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "aq_carol");
}

#[tokio::test]
async fn auth_user_without_privilege_is_a_clean_28p01_and_an_actionable_log() {
    let pg = TestPostgres::shared().await;
    as_superuser(
        pg,
        &[
            auth_role("aq_auth5", false),
            "CREATE ROLE aq_erin LOGIN PASSWORD 'erin_pw'".into(),
        ],
    )
    .await;
    let mux = start(
        pg,
        "aq_auth5",
        "auth_query = \"SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1\"\n",
    )
    .await;
    let (code, message) = refused(&mux, "aq_erin", "erin_pw").await;
    assert_eq!(code, "28P01");
    assert!(
        !message.contains("42501") && !message.contains("pg_authid"),
        "{message}"
    );
    let log = logged(&mux, "SQLSTATE 42501").await;
    assert!(log.contains("SECURITY DEFINER"), "{log}");
}

#[tokio::test]
async fn security_definer_function_as_auth_query() {
    let pg = TestPostgres::shared().await;
    // The set-up docs/security.md gives: a role that can run one function, which reads
    // pg_shadow as its (superuser) owner.
    as_superuser(
        pg,
        &[
            auth_role("aq_auth6", false),
            "CREATE ROLE aq_frank LOGIN PASSWORD 'frank_pw'".into(),
            "CREATE SCHEMA IF NOT EXISTS aq_pgmux".into(),
            "CREATE OR REPLACE FUNCTION aq_pgmux.lookup(i_username text, \
                 OUT usename name, OUT passwd text) RETURNS record AS $$ \
                 SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = i_username \
             $$ LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
                .into(),
            "REVOKE ALL ON FUNCTION aq_pgmux.lookup(text) FROM PUBLIC".into(),
            "GRANT USAGE ON SCHEMA aq_pgmux TO aq_auth6".into(),
            "GRANT EXECUTE ON FUNCTION aq_pgmux.lookup(text) TO aq_auth6".into(),
        ],
    )
    .await;
    let mux = start(
        pg,
        "aq_auth6",
        "auth_query = \"SELECT usename, passwd FROM aq_pgmux.lookup($1)\"\n",
    )
    .await;
    assert_eq!(whoami(&mux, "aq_frank", "frank_pw").await, "aq_frank");
    assert_eq!(refused(&mux, "aq_frank", "nope").await.0, "28P01");
    // Unknown: the function returns one row of NULLs.
    assert_eq!(refused(&mux, "aq_ghost", "nope").await.0, "28P01");
}

#[tokio::test]
async fn toml_users_and_auth_query_users_mix() {
    let pg = TestPostgres::shared().await;
    as_superuser(
        pg,
        &[
            auth_role("aq_auth7", true),
            "CREATE ROLE aq_gina LOGIN PASSWORD 'gina_pw'".into(),
        ],
    )
    .await;
    let mux = start(pg, "aq_auth7", "").await;
    // app is in the TOML (app_pw); aq_gina only in PostgreSQL. Both at once.
    let (app, _t1) = mux.try_connect("app", "app", "app_pw").await.unwrap();
    let (gina, _t2) = mux.try_connect("app", "aq_gina", "gina_pw").await.unwrap();
    for _ in 0..2 {
        let a: String = app
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        let g: String = gina
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!((a.as_str(), g.as_str()), ("app", "aq_gina"));
    }
    // A TOML user is never looked up: its config password is the one that counts.
    assert_eq!(refused(&mux, "app", "gina_pw").await.0, "28P01");
    assert!(!mux.stderr_log().contains("auth_query lookup failed"));
}

#[tokio::test]
async fn a_reload_without_auth_query_retires_its_pools() {
    let pg = TestPostgres::shared().await;
    as_superuser(
        pg,
        &[
            auth_role("aq_auth8", true),
            "CREATE ROLE aq_hana LOGIN PASSWORD 'hana_pw'".into(),
        ],
    )
    .await;
    let mux = start(pg, "aq_auth8", "").await;
    let (hana, _task) = mux.try_connect("app", "aq_hana", "hana_pw").await.unwrap();
    hana.batch_execute("SELECT 1").await.unwrap();

    // The same file without auth_user: aq_hana is nobody to pgmux now.
    let mut opts = options("aq_auth8", "");
    opts.auth_extra = String::new();
    mux.rewrite_config(pg, &opts);
    let reload = mux.admin_post("/reload").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    let pools = mux.admin_get("/pools").await;
    assert!(!pools.body.contains("aq_hana"), "{}", pools.body);
    assert_eq!(refused(&mux, "aq_hana", "hana_pw").await.0, "28P01");
    // As for any removed pool, its session ends between transactions (57P01).
    assert!(hana.batch_execute("SELECT 1").await.is_err());
}

#[tokio::test]
async fn cleartext_login_of_an_auth_query_user_logs_in_with_the_password() {
    let pg = TestPostgres::shared().await;
    as_superuser(
        pg,
        &[
            auth_role("aq_auth9", true),
            "CREATE ROLE aq_ivan LOGIN PASSWORD 'ivan_pw'".into(),
        ],
    )
    .await;
    let mut opts = options("aq_auth9", "allow_cleartext_without_tls = true\n");
    opts.auth_method = "password";
    let mux = TestPgmux::start(pg, opts).await;
    assert_eq!(whoami(&mux, "aq_ivan", "ivan_pw").await, "aq_ivan");
    assert_eq!(refused(&mux, "aq_ivan", "nope").await.0, "28P01");
    assert_eq!(refused(&mux, "aq_nobody", "nope").await.0, "28P01");
}
