//! Tests of the whole path: text in, `Config` or every problem out.

use std::path::Path;
use std::time::Duration;

use super::*;

const STORED: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn scram() -> String {
    format!("SCRAM-SHA-256$4096:c2FsdA==${STORED}:{STORED}")
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with_env(text, "t.toml", &no_env)
}

fn parse_ok(text: &str) -> Config {
    parse(text).unwrap_or_else(|e| panic!("unexpected problems:\n{e}"))
}

/// Every problem, one `Display` line each.
fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn empty_file_gives_the_defaults() {
    let c = parse_ok("");
    assert_eq!(c.server.listen, ["127.0.0.1:6432"]);
    assert_eq!(c.server.max_client_conn, 10_000);
    assert_eq!(c.server.client_login_timeout, Duration::from_secs(15));
    assert_eq!(c.server.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.server.drain_delay, Duration::ZERO);
    assert!(!c.server.reuse_port);
    assert_eq!(c.server.worker_threads, 1);
    assert_eq!(c.auth.method, AuthMethod::ScramSha256);
    assert_eq!(c.auth.userlist_file, None);
    assert!(c.auth.admin_users.is_empty());
    let p = &c.pool;
    assert_eq!(p.mode, PoolMode::Transaction);
    assert_eq!((p.size, p.min_size), (20, 0));
    assert_eq!(p.wait_timeout, Duration::from_secs(5));
    assert_eq!(p.idle_timeout, Duration::from_secs(600));
    assert_eq!(p.max_lifetime, Duration::from_secs(3600));
    assert_eq!(p.connect_timeout, Duration::from_secs(5));
    assert_eq!(p.idle_transaction_timeout, Duration::ZERO);
    assert_eq!(p.server_reset_query, "DISCARD ALL");
    assert!(c.databases.is_empty() && c.users.is_empty());
}

#[test]
fn every_key_is_read() {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:6432", "[::1]:6432"]
max_client_conn = 500
client_login_timeout = "3s"
shutdown_timeout = "1m"
drain_delay = "15s"
reuse_port = true
worker_threads = 4

[auth]
method = "md5"
admin_users = ["admin"]

[pool]
mode = "session"
size = 10
min_size = 2
wait_timeout = "250ms"
idle_timeout = 0
max_lifetime = "0s"
connect_timeout = "2s"
idle_transaction_timeout = "30s"
server_reset_query = ""

[databases.app]
host = "db.internal"
port = 6543
dbname = "app_prod"
user = "svc"
password = "pw"
mode = "transaction"
size = 0x10
min_size = 1
wait_timeout = "1s"
idle_timeout = "1m"
max_lifetime = "2h"
connect_timeout = "1s"
idle_transaction_timeout = "5s"
server_reset_query = "RESET ALL"

[databases."odd.name"]

[users.alice]
password = "md5A3556571E93B0D20722BA62BE61E8C2D"
server_password = "plain"
auth_method = "md5"
mode = "statement"

[users.bob]
password = "{}"
auth_method = "scram-sha-256"
"#,
        scram()
    );
    let c = parse_ok(&text);
    assert_eq!(c.server.listen, ["127.0.0.1:6432", "[::1]:6432"]);
    assert_eq!(c.server.max_client_conn, 500);
    assert_eq!(c.server.shutdown_timeout, Duration::from_secs(60));
    assert_eq!(c.server.drain_delay, Duration::from_secs(15));
    assert!(c.server.reuse_port);
    assert_eq!(c.server.worker_threads, 4);
    assert_eq!(c.auth.method, AuthMethod::Md5);
    assert_eq!(c.auth.admin_users, ["admin"]);
    assert_eq!(c.pool.mode, PoolMode::Session);
    assert_eq!(c.pool.wait_timeout, Duration::from_millis(250));
    assert_eq!(c.pool.idle_timeout, Duration::ZERO);
    assert_eq!(c.pool.server_reset_query, "");
    let app = &c.databases["app"];
    assert_eq!((app.host.as_str(), app.port), ("db.internal", 6543));
    assert_eq!(app.upstream_dbname("app"), "app_prod");
    assert_eq!(app.user.as_deref(), Some("svc"));
    assert_eq!(app.password.as_deref(), Some("pw"));
    assert_eq!(app.overrides.size, Some(16));
    assert_eq!(app.overrides.max_lifetime, Some(Duration::from_secs(7200)));
    assert_eq!(
        app.overrides.server_reset_query.as_deref(),
        Some("RESET ALL")
    );
    assert_eq!(
        c.databases["odd.name"].upstream_dbname("odd.name"),
        "odd.name"
    );
    let alice = &c.users["alice"];
    // md5 hex is lowercased, so it compares equal to a computed hash.
    assert_eq!(
        alice.password.as_deref(),
        Some("md5a3556571e93b0d20722ba62be61e8c2d")
    );
    assert_eq!(alice.server_password.as_deref(), Some("plain"));
    assert_eq!(alice.mode, Some(PoolMode::Statement));
    assert_eq!(c.auth_method_for("alice"), AuthMethod::Md5);
    assert_eq!(c.auth_method_for("bob"), AuthMethod::ScramSha256);
    assert_eq!(c.auth_method_for("nobody"), AuthMethod::Md5);
}

#[test]
fn listen_accepts_a_single_string() {
    let c = parse_ok("[server]\nlisten = \"localhost:7000\"\n");
    assert_eq!(c.server.listen, ["localhost:7000"]);
}

#[test]
fn unknown_keys_are_placed() {
    let text = "[pool]\nwait_timout = \"5s\"\n\n[metrics]\nlisten = \"x\"\n[databases.app]\n  sise = 3\n  flavour = 1\n";
    assert_eq!(
        problems(text),
        [
            "t.toml:2:1: pool.wait_timout: unknown key (did you mean `wait_timeout`?)",
            "t.toml:4:2: metrics: unknown key; expected one of: server, auth, admin, tls, pool, databases, users",
            "t.toml:7:3: databases.app.sise: unknown key (did you mean `size`?)",
            "t.toml:8:3: databases.app.flavour: unknown key; expected one of: host, port, dbname, \
             user, password, auth_user, auth_query, auth_dbname, mode, size, min_size, wait_timeout, wait_notice_after, idle_timeout, max_lifetime, \
             connect_timeout, idle_transaction_timeout, query_timeout, server_reset_query, \
             max_prepared_statements, tcp_keepalive, tcp_keepidle, tcp_keepintvl, tcp_keepcnt, \
             tcp_user_timeout, session_state, session_state_check, max_pinned, \
             pinned_idle_timeout, server_tls, server_ca_file, server_cert_file, server_key_file, \
             max_db_connections, max_db_client_connections",
        ]
    );
}

#[test]
fn limits_across_pools_and_per_user_overrides() {
    let text = "[pool]\nmax_db_connections = 10\nmax_user_connections = 4\n\
                max_user_client_connections = 50\n\
                [databases.app]\nmax_db_connections = 6\nmax_db_client_connections = 100\n\
                [databases.other]\n\
                [users.alice]\nsize = 3\nwait_timeout = \"250ms\"\nmax_user_connections = 2\n\
                [users.bob]\n";
    let c = parse_ok(text);
    let alice = c.pool_settings("app", "alice").expect("app exists");
    assert_eq!(alice.size, 3);
    assert_eq!(alice.wait_timeout, Duration::from_millis(250));
    assert_eq!(
        alice.limits,
        Limits {
            max_db_connections: 6,
            max_user_connections: 2,
            max_db_client_connections: 100,
            max_user_client_connections: 50,
        }
    );
    let bob = c.pool_settings("other", "bob").expect("other exists");
    assert_eq!(bob.size, 20);
    assert_eq!(bob.limits.max_db_connections, 10);
    assert_eq!(bob.limits.max_user_connections, 4);
    assert_eq!(bob.limits.max_db_client_connections, 0);
    // What `pgmux check` prints loads again to the same config.
    assert_eq!(
        parse_ok(&c.masked().replace("********", "x")).users["alice"].size,
        Some(3)
    );

    let found = problems(
        "[databases.app]\nmax_user_connections = 1\n[users.a]\nsize = 0\nwait_timeout = \"0\"\n",
    );
    assert!(
        found[0].starts_with("t.toml:2:1: databases.app.max_user_connections: unknown key"),
        "{found:?}"
    );
    assert_eq!(
        found[1..],
        [
            "t.toml:4:8: users.a.size: must be at least 1",
            "t.toml:5:16: users.a.wait_timeout: must be above 0 (clients would fail without waiting)",
        ]
    );
}

#[test]
fn bad_values_are_placed() {
    let text = r#"[server]
listen = [6432]
max_client_conn = -1
client_login_timeout = 15
shutdown_timeout = "-3s"
worker_threads = 0
[auth]
method = "pasword"
admin_users = "admin"
[pool]
size = "20"
min_size = 1.5
wait_timeout = "5 parsecs"
idle_timeout = true
mode = "sessions"
[databases.app]
port = 70000
[users.alice]
mode = 1
[users.bob]
"#;
    let got = problems(text);
    let expected = [
        "t.toml:2:11: server.listen[0]: expected a string, found an integer",
        "t.toml:3:19: server.max_client_conn: must not be negative",
        "t.toml:4:24: server.client_login_timeout: a duration needs a unit: write \"15s\" or \"15ms\"",
        "t.toml:5:20: server.shutdown_timeout: must not be negative",
        "t.toml:6:18: server.worker_threads: must be at least 1",
        "t.toml:8:10: auth.method: unknown value \"pasword\"; expected one of \"scram-sha-256\", \"md5\", \"trust\", \"password\", \"cert\"",
        "t.toml:9:15: auth.admin_users: expected an array of strings, found a string",
        "t.toml:11:8: pool.size: expected an integer, found a string",
        "t.toml:12:12: pool.min_size: expected an integer, found a float",
        "t.toml:13:16: pool.wait_timeout: invalid duration \"5 parsecs\": unknown time unit \"parsecs\", \
         supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few \
         variations); write e.g. \"250ms\", \"5s\", \"10m\", \"1h\" or \"0\"",
        "t.toml:14:16: pool.idle_timeout: expected a duration string, found a boolean",
        "t.toml:15:8: pool.mode: unknown value \"sessions\"; expected one of \"session\", \"transaction\", \"statement\"",
        "t.toml:17:8: databases.app.port: is too large (at most 65535)",
        "t.toml:19:8: users.alice.mode: expected a string, found an integer",
    ];
    assert_eq!(got, expected);
}

#[test]
fn validation_problems_are_all_reported() {
    let text = format!(
        r#"[server]
listen = ["127.0.0.1", "localhost:6432"]
max_client_conn = 0
[pool]
size = 0
min_size = 3
wait_timeout = "0s"
connect_timeout = 0
[databases.app]
port = 0
host = ""
[databases.big]
min_size = 30
[databases.small]
size = 2
[users.alice]
password = "SCRAM-SHA-256$4096:c2FsdA==$short:short"
[users.bob]
password = "{}"
auth_method = "md5"
[users.carol]
password = "md5a3556571e93b0d20722ba62be61e8c2d"
server_password = "{}"
"#,
        scram(),
        scram()
    );
    let got = problems(&text);
    let expected = [
        "t.toml:2:11: server.listen: \"127.0.0.1\" is not an address: expected host:port",
        "t.toml:3:19: server.max_client_conn: must be at least 1",
        "t.toml:5:8: pool.size: must be at least 1",
        "t.toml:6:12: pool.min_size: must not exceed size (0)",
        "t.toml:7:16: pool.wait_timeout: must be above 0 (clients would fail without waiting)",
        "t.toml:8:19: pool.connect_timeout: must be above 0",
        "t.toml:10:8: databases.app.port: must not be 0",
        "t.toml:11:8: databases.app.host: must not be empty",
        "t.toml:13:12: databases.big.min_size: must not exceed size (0)",
        "t.toml:15:8: databases.small.size: must not be below min_size (3)",
        "t.toml:17:12: users.alice.password: malformed SCRAM verifier: expected \
         SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (StoredKey is not 32 bytes of base64)",
        "t.toml:19:12: users.bob.password: is a SCRAM verifier, which md5 login cannot check \
         (method from users.bob.auth_method): give the plain password or an md5 hash, or use \
         scram-sha-256",
        "t.toml:23:19: users.carol.server_password: must be the plain password pgmux sends to the \
         server, not a hash",
    ];
    assert_eq!(got, expected);
}

#[test]
fn empty_listen_and_empty_names_are_problems() {
    let text = "[server]\nlisten = []\n[databases.\"\"]\n";
    assert_eq!(
        problems(text),
        [
            "t.toml:2:10: server.listen: needs at least one address",
            "t.toml:3:12: databases.\"\": the name must not be empty",
        ]
    );
}

#[test]
fn syntax_errors_come_with_the_other_problems() {
    let text = "[pool]\nsize = \nmin_size = \"x\"\nwait_timeout = \"5s\nmode = \"x\"\n";
    let got = problems(text);
    assert_eq!(got.len(), 4, "{got:#?}");
    assert!(got[0].starts_with("t.toml:2:8: "), "{got:#?}");
    assert_eq!(
        got[1],
        "t.toml:3:12: pool.min_size: expected an integer, found a string"
    );
    assert!(got[2].starts_with("t.toml:4:"), "{got:#?}");
    assert!(
        got[3].starts_with("t.toml:5:8: pool.mode: unknown value"),
        "{got:#?}"
    );
}

#[test]
fn env_interpolation_fills_numbers_and_strings() {
    let env = |name: &str| match name {
        "POOL_SIZE" => Some("42".to_owned()),
        "APP_PASSWORD" => Some("s3cr\"et".to_owned()),
        _ => None,
    };
    let text = r#"
[pool]
size = ${POOL_SIZE:-20}
min_size = ${MIN:-2}   # ${NOT_SUBSTITUTED} in a comment
wait_timeout = "${WAIT:-7s}"
server_reset_query = "$${literal}"
[databases.app]
password = "${APP_PASSWORD}"
"#;
    let c = Config::parse_with_env(text, "t.toml", &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((c.pool.size, c.pool.min_size), (42, 2));
    assert_eq!(c.pool.wait_timeout, Duration::from_secs(7));
    assert_eq!(c.pool.server_reset_query, "${literal}");
    assert_eq!(c.databases["app"].password.as_deref(), Some("s3cr\"et"));
}

#[test]
fn missing_env_var_is_placed_and_hides_its_consequences() {
    let text = "[pool]\nsize = ${POOL_SIZE}\n[databases.app]\npassword = \"${APP_PASSWORD}\"\n\
                host = \"${DB_HOST:-db}\" ; port = 1\n";
    let got = problems(text);
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(
        got[0],
        "t.toml:2:8: pool.size: environment variable POOL_SIZE is not set \
         (write ${POOL_SIZE:-default} for a default)"
    );
    assert!(
        got[1]
            .starts_with("t.toml:4:13: databases.app.password: environment variable APP_PASSWORD")
    );
    // A problem after a substituted value is placed in the original columns.
    assert!(got[2].starts_with("t.toml:5:25: unexpected"), "{got:#?}");
}

#[test]
fn pool_settings_merge_database_then_user() {
    let text = r#"
[pool]
size = 10
idle_timeout = "1m"
[databases.app]
size = 30
mode = "session"
server_reset_query = "RESET ALL"
[databases.plain]
[users.batch]
mode = "statement"
[users.web]
"#;
    let c = parse_ok(text);
    let app = c.pool_settings("app", "web").expect("app is configured");
    assert_eq!(app.size, 30);
    assert_eq!(app.mode, PoolMode::Session);
    assert_eq!(app.idle_timeout, Duration::from_secs(60));
    assert_eq!(app.server_reset_query, "RESET ALL");
    let batch = c.pool_settings("app", "batch").expect("app is configured");
    assert_eq!((batch.mode, batch.size), (PoolMode::Statement, 30));
    assert_eq!(
        c.pool_settings("plain", "unknown-user"),
        Some(c.pool.clone())
    );
    assert_eq!(c.pool_settings("nope", "web"), None);
}

#[test]
fn masked_hides_secrets_and_parses_back() {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:6432", "localhost:7000"]
[auth]
admin_users = ["root"]
[admin]
listen = "127.0.0.1:9930"
token = "admin-secret"
log_connections = false
log_slow_waits = "250ms"
[pool]
mode = "session"
wait_timeout = "1m 30s"
idle_transaction_timeout = "250ms"
server_reset_query = "SELECT '$${{x}}'"
[databases.app]
user = "svc"
password = "db-secret"
size = 3
[databases."we\"ird.name"]
dbname = "w"
[users.alice]
password = "alice-secret"
server_password = "upstream-secret"
mode = "transaction"
[users.bob]
password = "{}"
"#,
        scram()
    );
    let c = parse_ok(&text);
    let masked = c.masked();
    for secret in [
        "db-secret",
        "alice-secret",
        "upstream-secret",
        "admin-secret",
        STORED,
    ] {
        assert!(!masked.contains(secret), "{secret} leaked:\n{masked}");
    }
    let again = parse(&masked).unwrap_or_else(|e| panic!("{e}\n{masked}"));
    assert_eq!(again.server, c.server);
    assert_eq!(again.auth, c.auth);
    assert_eq!(again.admin.listen, c.admin.listen);
    assert_eq!(again.admin.token.as_deref(), Some(MASK));
    assert!(!again.admin.log_connections);
    assert_eq!(again.admin.log_slow_waits, Duration::from_millis(250));
    assert_eq!(again.pool, c.pool);
    assert_eq!(again.pool.server_reset_query, "SELECT '${x}'");
    let mut expected = c.clone();
    for db in expected.databases.values_mut() {
        db.password = db.password.as_ref().map(|_| MASK.to_owned());
    }
    for user in expected.users.values_mut() {
        user.password = user.password.as_ref().map(|_| MASK.to_owned());
        user.server_password = user.server_password.as_ref().map(|_| MASK.to_owned());
    }
    assert_eq!(again.databases, expected.databases);
    assert_eq!(again.users, expected.users);
    assert_eq!(again.masked(), masked);
}

#[test]
fn debug_masks_secrets() {
    let c = parse_ok(
        "[databases.app]\npassword = \"db-secret\"\n[users.a]\npassword = \"pw1\"\nserver_password = \"pw2\"\n",
    );
    let debug = format!("{c:?}");
    for secret in ["db-secret", "pw1", "pw2"] {
        assert!(!debug.contains(secret), "{debug}");
    }
    assert!(debug.contains(MASK));
}

#[test]
fn userlist_is_merged_relative_to_the_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let userlist = "; PgBouncer userlist\n\"alice\" \"from-file\"\n\"bob\" \"bob-secret\"\n\"carol\" \"carol-secret\"\n";
    std::fs::write(dir.path().join("userlist.txt"), userlist).expect("write userlist");
    let config = r#"
[auth]
userlist_file = "userlist.txt"
[users.alice]
password = "from-config"
[users.carol]
mode = "session"
"#;
    let path = dir.path().join("pgmux.toml");
    std::fs::write(&path, config).expect("write config");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.auth.userlist_file.as_deref(),
        Some(dir.path().join("userlist.txt").as_path())
    );
    assert_eq!(c.users["alice"].password.as_deref(), Some("from-config"));
    assert_eq!(c.users["bob"].password.as_deref(), Some("bob-secret"));
    let carol = &c.users["carol"];
    assert_eq!(carol.password.as_deref(), Some("carol-secret"));
    assert_eq!(carol.mode, Some(PoolMode::Session));
}

#[test]
fn userlist_problems_name_the_userlist() {
    let dir = tempfile::tempdir().expect("temp dir");
    let list = dir.path().join("users.txt");
    let text = "\"alice\" \"SCRAM-SHA-256$1:x\"\n\"bob\" \"ok\"\nbroken\n";
    std::fs::write(&list, text).expect("write userlist");
    let config = format!("[auth]\nuserlist_file = \"{}\"\n", list.display());
    let list = list.display();
    let got = problems(&config);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got[0].starts_with(&format!(
        "{list}:1:9: users.alice.password: malformed SCRAM"
    )));
    assert_eq!(
        got[1],
        format!("{list}:3:1: expected `\"user\" \"secret\"`")
    );

    let missing = "[auth]\nuserlist_file = \"/nonexistent/pgmux-users.txt\"\n";
    let got = problems(missing);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].starts_with(
            "t.toml:2:17: auth.userlist_file: cannot read /nonexistent/pgmux-users.txt: "
        ),
        "{got:#?}"
    );
}

#[test]
fn unreadable_config_has_no_line() {
    let err = Config::load(Path::new("/nonexistent/pgmux.toml")).expect_err("no such file");
    let text = err.to_string();
    assert!(
        text.starts_with("/nonexistent/pgmux.toml: cannot read: "),
        "{text}"
    );
}

#[test]
fn warnings_do_not_fail() {
    let text = "[auth]\nmethod = \"trust\"\n[server]\nlisten = \"0.0.0.0:6432\"\n\
                [pool]\nsize = 500\nmode = \"session\"\nserver_reset_query = \"\"\n[databases.app]\n";
    let (result, warnings) = load::analyze(text, "t.toml", Path::new(""), &no_env);
    assert_eq!(result.map(|c| c.pool.size).ok(), Some(500));
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "t.toml:2:10: auth.method: trust: clients log in without a password, and pgmux \
             listens beyond localhost",
            "t.toml:6:8: pool.size: 500 is above PostgreSQL's default max_connections (100); \
             make sure the server allows that many",
            "t.toml:8:22: pool.server_reset_query: empty in session mode: one client's session \
             state reaches the next",
        ]
    );
    let text = "[users.a]\n[users.b]\npassword = \"md5a3556571e93b0d20722ba62be61e8c2d\"\n";
    let (_, warnings) = load::analyze(text, "t.toml", Path::new(""), &no_env);
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "t.toml: databases: no [databases] configured: every client will be refused",
            "t.toml:1:8: users.a: no password, and scram-sha-256 needs one: this user cannot log in",
            "t.toml:3:12: users.b.password: is an md5 hash: this user logs in with md5, not \
             scram-sha-256 (method from auth.method)",
        ]
    );
}

#[test]
fn example_config_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgmux.toml");
    let text = std::fs::read_to_string(path).expect("the example config is readable");
    // Its secrets have no default: without them it does not load.
    let err = Config::parse_with_env(&text, path, &no_env).expect_err("secrets are required");
    for var in ["PGMUX_ADMIN_TOKEN", "PGMUX_POSTGRES_PASSWORD"] {
        assert!(err.to_string().contains(var), "{err}");
    }
    let env = |name: &str| name.ends_with("_TOKEN") || name.ends_with("_PASSWORD");
    let env = |name: &str| env(name).then(|| "s3cret".to_owned());
    let c = Config::parse_with_env(&text, path, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.server.listen, ["127.0.0.1:6432"]);
    assert_eq!(c.databases["app"].upstream_dbname("app"), "app");
    assert_eq!(c.databases["postgres"].port, 5432);
    assert!(c.users["postgres"].password.is_some());
}

#[test]
fn admin_section() {
    let c = parse_ok("");
    assert_eq!(c.admin, AdminSection::default());
    assert_eq!(c.admin.listen, None);
    assert!(c.admin.log_connections);
    let c = parse_ok(
        "[admin]\nlisten = \"127.0.0.1:9930\"\ntoken = \"t0ken\"\nlog_slow_waits = \"0\"\n",
    );
    assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:9930"));
    assert_eq!(c.admin.token.as_deref(), Some("t0ken"));
    assert_eq!(c.admin.log_slow_waits, Duration::ZERO);
    assert!(!format!("{c:?}").contains("t0ken"));
    assert_eq!(
        problems(
            "[admin]\nlisten = \"nowhere\"\ntoken = \"\"\nlog_connections = \"yes\"\nport = 1\n"
        ),
        [
            "t.toml:2:10: admin.listen: \"nowhere\" is not an address: expected host:port",
            "t.toml:3:9: admin.token: must not be empty (remove the key to disable the token)",
            "t.toml:4:19: admin.log_connections: expected a boolean, found a string",
            "t.toml:5:1: admin.port: unknown key; expected one of: listen, token, allow_no_token, log_connections, log_slow_waits, header_timeout, idle_timeout, max_connections",
        ]
    );
}

#[test]
fn open_admin_port_needs_a_token_or_an_explicit_allow() {
    let open = "[admin]\nlisten = \"0.0.0.0:9930\"\n";
    let found = problems(open);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("t.toml:2:10: admin.listen: \"0.0.0.0:9930\" is beyond localhost")
            && found[0].contains("admin.allow_no_token = true"),
        "{found:?}"
    );
    assert!(parse(&format!("{open}token = \"t0ken\"\n")).is_ok());
    let allowed = format!("{open}allow_no_token = true\n");
    let (result, warnings) = load::analyze(&allowed, "t.toml", Path::new(""), &no_env);
    assert!(result.expect("allowed explicitly").admin.allow_no_token);
    assert!(
        warnings[0]
            .to_string()
            .contains("admin.allow_no_token = true"),
        "{warnings:?}"
    );
    for local in ["127.0.0.1:9930", "[::1]:9930", "localhost:9930"] {
        let text = format!("[admin]\nlisten = \"{local}\"\n");
        assert!(parse(&text).is_ok(), "{local}");
    }
}

#[test]
fn admin_port_limits() {
    let c = parse_ok("");
    assert_eq!(c.admin.header_timeout, Duration::from_secs(10));
    assert_eq!(c.admin.idle_timeout, Duration::from_secs(75));
    assert_eq!(c.admin.max_connections, 64);
    let c =
        parse_ok("[admin]\nheader_timeout = \"2s\"\nidle_timeout = \"30s\"\nmax_connections = 8\n");
    assert_eq!(c.admin.header_timeout, Duration::from_secs(2));
    assert_eq!(c.admin.idle_timeout, Duration::from_secs(30));
    assert_eq!(c.admin.max_connections, 8);
    let shown = c.masked();
    assert!(shown.contains("header_timeout = \"2s\""), "{shown}");
    assert!(shown.contains("max_connections = 8"), "{shown}");
    assert_eq!(
        problems("[admin]\nheader_timeout = \"0\"\nidle_timeout = \"0s\"\nmax_connections = 0\n"),
        [
            "t.toml:2:18: admin.header_timeout: must be above 0",
            "t.toml:3:16: admin.idle_timeout: must be above 0",
            "t.toml:4:19: admin.max_connections: must be at least 1",
        ]
    );
}

#[test]
fn tcp_options_of_server_sockets() {
    let c = parse_ok("[databases.app]\n");
    assert_eq!(c.pool.tcp, TcpOptions::default());
    assert!(c.pool.tcp.keepalive);

    let c = parse_ok(
        "[pool]\ntcp_keepalive = true\ntcp_keepidle = \"30s\"\ntcp_keepintvl = \"5s\"\n\
         tcp_keepcnt = 3\ntcp_user_timeout = \"20s\"\n\
         [databases.app]\n[databases.far]\ntcp_keepidle = \"2m\"\ntcp_user_timeout = \"1m\"\n\
         [databases.plain]\ntcp_keepalive = false\n",
    );
    let app = c.pool_settings("app", "u").unwrap().tcp;
    assert_eq!(
        app,
        TcpOptions {
            keepalive: true,
            keepidle: Duration::from_secs(30),
            keepintvl: Duration::from_secs(5),
            keepcnt: 3,
            user_timeout: Duration::from_secs(20),
        }
    );
    let far = c.pool_settings("far", "u").unwrap().tcp;
    assert_eq!(far.keepidle, Duration::from_secs(120));
    assert_eq!(far.user_timeout, Duration::from_secs(60));
    assert_eq!(far.keepcnt, 3, "inherited from [pool]");
    assert!(!c.pool_settings("plain", "u").unwrap().tcp.keepalive);
    let again = parse_ok(&c.masked());
    assert_eq!(again.pool_settings("far", "u").unwrap().tcp, far);

    assert_eq!(
        problems(
            "[pool]\ntcp_keepidle = \"1500ms\"\ntcp_keepcnt = 128\n\
             [databases.app]\ntcp_keepintvl = \"10h\"\ntcp_user_timeout = \"30d\"\ntcp_keepalive = 1\n"
        ),
        [
            "t.toml:2:16: pool.tcp_keepidle: must be whole seconds, at most 32767s (\"0\" = the system's default)",
            "t.toml:3:15: pool.tcp_keepcnt: is too large (at most 127)",
            "t.toml:5:17: databases.app.tcp_keepintvl: must be whole seconds, at most 32767s (\"0\" = the system's default)",
            "t.toml:6:20: databases.app.tcp_user_timeout: must be at most 2147483647ms (the kernel counts milliseconds in an int)",
            "t.toml:7:17: databases.app.tcp_keepalive: expected a boolean, found an integer",
        ]
    );
}

#[test]
fn empty_passwords_are_refused_where_they_are() {
    let env = |name: &str| (name == "EMPTY").then(String::new);
    let text = "[users.a]\npassword = \"\"\n\n[users.b]\npassword = \"${EMPTY}\"\n\n\
                [users.c]\npassword = \"pw\"\nserver_password = \"\"\n";
    let err = Config::parse_with_env(text, "t.toml", &env).unwrap_err();
    let shown: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    let why = "must not be empty: PostgreSQL and PgBouncer refuse empty passwords (a ${VAR} \
               that is set but empty counts); set a password, or remove the key";
    assert_eq!(
        shown,
        [
            format!("t.toml:2:12: users.a.password: {why}"),
            format!("t.toml:5:12: users.b.password: {why}"),
            format!("t.toml:9:19: users.c.server_password: {why}"),
        ]
    );

    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("userlist.txt");
    std::fs::write(&list, "\"ok\" \"pw\"\n\"d\" \"\"\n").unwrap();
    let text = format!("[auth]\nuserlist_file = {:?}\n", list.display().to_string());
    let err = Config::parse(&text, "t.toml").unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.contains("userlist.txt:2:5: users.d.password: must not be empty"),
        "{shown}"
    );
}

#[test]
fn login_limit_keys() {
    let c = parse_ok("");
    assert_eq!(c.auth.max_login_failures, 10);
    assert_eq!(c.auth.login_failure_window, Duration::from_secs(60));
    assert_eq!(c.auth.login_lockout, Duration::from_secs(60));
    let c = parse_ok("[auth]\nmax_login_failures = 0\nlogin_lockout = \"0\"\n");
    assert_eq!(c.auth.max_login_failures, 0);
    let shown = c.masked();
    assert!(shown.contains("max_login_failures = 0"), "{shown}");
    assert_eq!(parse_ok(&shown).auth, c.auth);
    assert_eq!(
        problems("[auth]\nlogin_lockout = \"0\"\n"),
        [
            "t.toml:2:17: auth.login_lockout: must be above 0 (set auth.max_login_failures = 0 and auth.max_login_failures_per_address = 0 to turn the limit off)"
        ]
    );
}

#[test]
fn the_address_wide_limit_defaults_to_ten_times_the_per_user_one() {
    let c = parse_ok("[auth]\nmax_login_failures = 4\n");
    assert_eq!(c.auth.max_login_failures_per_address, None);
    assert_eq!(c.auth.login_limits().max_per_address, 40);
    let shown = c.masked();
    assert!(
        shown.contains("# max_login_failures_per_address = 40 (10 x max_login_failures)"),
        "{shown}"
    );
    assert_eq!(parse_ok(&shown).auth, c.auth);

    let c = parse_ok("[auth]\nmax_login_failures = 0\nmax_login_failures_per_address = 7\n");
    assert_eq!(c.auth.login_limits().max_failures, 0);
    assert_eq!(c.auth.login_limits().max_per_address, 7);
    assert_eq!(parse_ok(&c.masked()).auth, c.auth);
    let c = parse_ok("[auth]\nmax_login_failures_per_address = 0\n");
    assert_eq!(c.auth.login_limits().max_per_address, 0);

    // Only the per-user limit on, and windows of 0 with only the address-wide one on.
    assert_eq!(
        problems(
            "[auth]\nmax_login_failures = 0\nmax_login_failures_per_address = 5\nlogin_lockout = \"0\"\n"
        ),
        [
            "t.toml:4:17: auth.login_lockout: must be above 0 (set auth.max_login_failures = 0 and auth.max_login_failures_per_address = 0 to turn the limit off)"
        ]
    );
    assert_eq!(
        problems("[auth]\nmax_login_failures_per_address = -1\n").len(),
        1
    );

    // Below the per-user limit: allowed, with a warning that says what it does.
    let text = "[auth]\nmax_login_failures = 5\nmax_login_failures_per_address = 3\n\
                [databases.app]\n";
    let (result, warnings) = load::analyze(text, "t.toml", Path::new(""), &no_env);
    assert_eq!(
        result.map(|c| c.auth.login_limits().max_per_address).ok(),
        Some(3)
    );
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "t.toml:3:34: auth.max_login_failures_per_address: 3 is below auth.max_login_failures (5): the address-wide lockout comes first, and one user's typos lock out every user of the address"
        ]
    );
}

#[test]
fn access_rules_in_toml() {
    use crate::auth::rules::{Addresses, ConnType, Names, RuleMethod};
    let text = "[auth]\nmethod = \"md5\"\n\n[[auth.rules]]\ntype = \"hostnossl\"\n\
                database = [\"app\", \"b\"]\nuser = \"alice\"\naddress = \"10.0.0.0/8\"\n\
                method = \"scram-sha-256\"\n\n[[auth.rules]]\nmethod = \"reject\"\n";
    let c = parse_ok(text);
    assert_eq!(c.auth.rules.len(), 2);
    let r = &c.auth.rules[0];
    assert_eq!(r.conn, ConnType::HostNoSsl);
    assert_eq!(r.databases, Names::List(vec!["app".into(), "b".into()]));
    assert_eq!(r.users, Names::List(vec!["alice".into()]));
    assert_eq!(r.method, RuleMethod::Login(AuthMethod::ScramSha256));
    assert_eq!(r.source, "rule 1");
    let r = &c.auth.rules[1];
    assert_eq!(
        (r.conn, &r.databases, r.addresses),
        (ConnType::All, &Names::All, Addresses::All)
    );
    // pgmux check's output reads back as the same rules.
    assert_eq!(parse_ok(&c.masked()).auth, c.auth);

    assert_eq!(
        problems(
            "[[auth.rules]]\ntype = \"local\"\nmethod = \"peer\"\n\n[[auth.rules]]\n\
             address = \"10.0.0.0/33\"\nuser = []\nmethod = \"md5\"\nfoo = 1\n\n\
             [[auth.rules]]\nuser = \"x\"\n"
        ),
        [
            "t.toml:2:8: auth.rules[0].type: unknown value \"local\"; expected one of \"host\", \"hostssl\", \"hostnossl\", \"all\"",
            "t.toml:3:10: auth.rules[0].method: unknown value \"peer\"; expected one of \"scram-sha-256\", \"md5\", \"trust\", \"reject\"",
            "t.toml:6:11: auth.rules[1].address: \"10.0.0.0/33\": the prefix length must be a number from 0 to 32",
            "t.toml:9:1: auth.rules[1].foo: unknown key; expected one of: type, database, user, address, method",
            "t.toml:11:1: auth.rules[2]: needs a method (scram-sha-256, md5, password, cert, trust or reject)",
        ]
    );
}

#[test]
fn hba_file_rules_and_their_problems() {
    let dir = tempfile::tempdir().unwrap();
    let hba = dir.path().join("pg_hba.conf");
    std::fs::write(&hba, "local all all peer\nhost all all 10.0.0.0/8 md5\n").unwrap();
    let text = format!("[auth]\nhba_file = {:?}\n", hba.display().to_string());
    let c = parse_ok(&text);
    assert_eq!(c.auth.rules.len(), 1);
    assert_eq!(c.auth.rules[0].source, "hba_file line 2");
    let shown = c.masked();
    assert!(
        shown.contains("hba_file = ") && !shown.contains("[[auth.rules]]"),
        "{shown}"
    );

    std::fs::write(
        &hba,
        "host all all 10.0.0.0/8 md5\nhost all all 10.0.0.0/8 cert\n",
    )
    .unwrap();
    let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
    assert!(
        err.contains("hba_file line 2: cert needs tls.client_ca_file"),
        "{err}"
    );
    let both = format!("{text}\n[[auth.rules]]\nmethod = \"md5\"\n");
    let err = Config::parse(&both, "t.toml").unwrap_err().to_string();
    assert!(
        err.contains("set either auth.hba_file or [[auth.rules]], not both"),
        "{err}"
    );
}

#[test]
fn auth_query_keys() {
    let c = parse_ok(
        "[auth]\nauth_user = \"pgmux_auth\"\nauth_cache_ttl = \"10m\"\n\
         auth_negative_cache_ttl = \"1s\"\n\
         [databases.app]\n[databases.meta]\n\
         [databases.other]\nauth_dbname = \"meta\"\nauth_query = \"SELECT * FROM lookup($1)\"\n\
         [users.pgmux_auth]\npassword = \"pw\"\n",
    );
    assert_eq!(c.auth.auth_cache_ttl, std::time::Duration::from_secs(600));
    assert_eq!(
        c.auth.auth_negative_cache_ttl,
        std::time::Duration::from_secs(1)
    );
    let app = c.auth_query_for("app").unwrap();
    assert_eq!(
        (app.user, app.query, app.database),
        ("pgmux_auth", super::DEFAULT_AUTH_QUERY, "app")
    );
    let other = c.auth_query_for("other").unwrap();
    assert_eq!(
        (other.query, other.database),
        ("SELECT * FROM lookup($1)", "meta")
    );
    assert!(c.auth_query_for("nowhere").is_none());
    assert!(
        parse_ok("[databases.app]\n")
            .auth_query_for("app")
            .is_none()
    );
    // `pgmux check` prints what parses back to the same.
    let again = parse_ok(&c.masked().replace("********", "pw"));
    assert_eq!(again.auth, c.auth);
    assert_eq!(
        again.databases["other"].auth_query,
        c.databases["other"].auth_query
    );
}

#[test]
fn auth_query_mistakes_are_placed() {
    let text = "[auth]\nauth_user = \"nobody\"\nauth_query = \"SELECT 1\"\n\
                auth_dbname = \"missing\"\n[databases.app]\nauth_user = \"\"\n";
    assert_eq!(
        problems(text),
        [
            "t.toml:2:13: auth.auth_user: \"nobody\" is not in [users] (or auth.userlist_file): \
             pgmux logs in to PostgreSQL as this role to run auth_query and needs its password \
             there (add [users.nobody] password = \"...\")",
            "t.toml:3:14: auth.auth_query: must take the user name as $1 (e.g. \"SELECT \
             usename, passwd FROM pg_shadow WHERE usename = $1\")",
            "t.toml:4:15: auth.auth_dbname: \"missing\" is not in [databases]: auth_query runs \
             in a database pgmux knows (add [databases.missing], or remove the key to run it in \
             the database the client asks for)",
            "t.toml:6:13: databases.app.auth_user: must not be empty",
        ]
    );
}

#[test]
fn wait_notice_after_is_read_merged_and_checked() {
    let text = "[pool]\nwait_notice_after = \"250ms\"\n\
                [databases.app]\n[databases.slow]\nwait_notice_after = \"0\"\n\
                [databases.late]\nwait_timeout = \"1s\"\nwait_notice_after = \"2s\"\n";
    let (result, warnings) = load::analyze(text, "t.toml", Path::new(""), &no_env);
    let config = result.expect("warnings only");
    let notice = |db: &str| {
        config
            .pool_settings(db, "u")
            .expect("configured")
            .wait_notice_after
    };
    assert_eq!(notice("app"), Duration::from_millis(250));
    assert_eq!(notice("slow"), Duration::ZERO);
    assert_eq!(notice("late"), Duration::from_secs(2));
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "t.toml:8:21: databases.late.wait_notice_after: 2s is not below wait_timeout (1s): \
          only clients held by a pause would get the notice"
        ]
    );
    // Off by default.
    assert_eq!(parse_ok("").pool.wait_notice_after, Duration::ZERO);
    let bad = problems("[pool]\nwait_notice_after = \"soon\"\n");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("pool.wait_notice_after"), "{bad:?}");
}
