//! `pgmux import-pgbouncer`: Debian's pgbouncer.ini and a config setting every key of
//! PgBouncer 1.25 convert into TOML that `pgmux check` accepts, every unmapped key is a
//! comment with its reason, %include/auth_file/auth_hba_file are carried, a malformed ini
//! is refused with its line, and an imported config serves a real client.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{TestPostgres, free_port};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/import")
}

use common::pgmux_cli as pgmux;

/// Imports `ini` into `out` and runs `pgmux check` on it; returns the TOML.
fn import_and_check(ini: &Path, out: &Path) -> String {
    let (code, _, stderr) = pgmux(&[
        "import-pgbouncer",
        &ini.to_string_lossy(),
        "--output",
        &out.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let toml = std::fs::read_to_string(out).unwrap();
    let (code, _, stderr) = pgmux(&["check", "--config", &out.to_string_lossy()]);
    assert_eq!(code, 0, "pgmux check refused the import:\n{stderr}\n{toml}");
    toml
}

#[test]
fn debians_pgbouncer_ini_converts_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    // The fixture's auth_file is Debian's absolute path; point it at a userlist of our own
    // (the only change), so that the test does not depend on /etc.
    let userlist = dir.path().join("userlist.txt");
    std::fs::write(&userlist, "\"app\" \"app_pw\"\n").unwrap();
    let text = std::fs::read_to_string(fixtures().join("debian-pgbouncer.ini")).unwrap();
    assert!(text.contains("auth_file = /etc/pgbouncer/userlist.txt"));
    let text = text.replace(
        "auth_file = /etc/pgbouncer/userlist.txt",
        &format!("auth_file = {}", userlist.display()),
    );
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(&ini, text).unwrap();
    let toml = import_and_check(&ini, &dir.path().join("pgmux.toml"));
    assert!(toml.contains("listen = [\"localhost:6432\"]"), "{toml}");
    assert!(toml.contains("method = \"md5\""), "{toml}");
    assert!(
        toml.contains(&format!("userlist_file = \"{}\"", userlist.display())),
        "{toml}"
    );
    // PgBouncer's default pool mode, not pgmux's.
    assert!(toml.contains("mode = \"session\""), "{toml}");
    for key in ["logfile", "pidfile", "unix_socket_dir"] {
        assert!(
            toml.contains(&format!("# not imported: {key} = ")),
            "{key}: {toml}"
        );
    }
}

#[test]
fn every_pgbouncer_key_is_mapped_or_commented_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "all-keys.ini",
        "all-keys-extra.ini",
        "userlist.txt",
        "hba.conf",
    ] {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).unwrap();
    }
    let ca = common::tls::Ca::new("import test CA");
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
    for name in ["server", "client"] {
        let (cert, key) = ca.issue(name, &["localhost"]);
        std::fs::write(dir.path().join(format!("{name}.crt")), cert).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), key).unwrap();
    }
    let toml = import_and_check(
        &dir.path().join("all-keys.ini"),
        &dir.path().join("out.toml"),
    );

    let mapped = [
        "listen = [\"127.0.0.1:6543\"]",
        "max_client_conn = 500",
        "mode = \"transaction\"",
        "size = 25",
        "min_size = 2",
        "max_db_connections = 50",
        "max_db_client_connections = 400",
        "max_user_connections = 40",
        "max_user_client_connections = 300",
        "max_prepared_statements = 100",
        "method = \"scram-sha-256\"",
        "auth_user = \"pgmux_auth\"",
        "auth_dbname = \"app\"",
        "admin_users = [\"admin\", \"pgmux_auth\"]",
        "log_connections = true",
        "server_reset_query = \"DISCARD ALL\"",
        "max_lifetime = \"3600s\"",
        "idle_timeout = \"600s\"",
        "connect_timeout = \"15s\"",
        "client_login_timeout = \"60s\"",
        "query_timeout = \"0\"",
        "wait_timeout = \"120s\"",
        "idle_transaction_timeout = \"0\"",
        "client_tls = \"require\"",
        "cert_file = \"server.crt\"",
        "key_file = \"server.key\"",
        "client_ca_file = \"ca.crt\"",
        "server_tls = \"verify-full\"",
        "server_ca_file = \"ca.crt\"",
        "server_cert_file = \"client.crt\"",
        "server_key_file = \"client.key\"",
        "tcp_keepalive = true",
        "reuse_port = false",
        "tcp_keepcnt = 5",
        "tcp_keepidle = \"30s\"",
        "tcp_keepintvl = \"10s\"",
        "tcp_user_timeout = \"30000ms\"",
        "wait_notice_after = \"5s\"",
        "max_lifetime = \"1800s\"",
        "auth_query = \"SELECT usename, passwd FROM pg_shadow WHERE usename=$1\"",
    ];
    for line in mapped {
        assert!(toml.contains(line), "missing `{line}`:\n{toml}");
    }
    let commented = [
        "logfile",
        "pidfile",
        "unix_socket_dir",
        "unix_socket_mode",
        "unix_socket_group",
        "user",
        "reserve_pool_size",
        "reserve_pool_timeout",
        "server_round_robin",
        "track_extra_parameters",
        "ignore_startup_parameters",
        "peer_id",
        "disable_pqexec",
        "application_name_add_host",
        "conffile",
        "service_name",
        "job_name",
        "stats_period",
        "scram_iterations",
        "auth_ident_file",
        "auth_ldap_options",
        "syslog",
        "syslog_ident",
        "syslog_facility",
        "log_disconnections",
        "log_pooler_errors",
        "log_stats",
        "verbose",
        "stats_users",
        "server_reset_query_always",
        "server_check_delay",
        "server_check_query",
        "server_fast_close",
        "server_login_retry",
        "autodb_idle_timeout",
        "dns_max_ttl",
        "dns_nxdomain_ttl",
        "dns_zone_check_period",
        "resolv_conf",
        "cancel_wait_timeout",
        "client_idle_timeout",
        "transaction_timeout",
        "suspend_timeout",
        "client_tls_protocols",
        "client_tls_ciphers",
        "client_tls13_ciphers",
        "client_tls_ecdhcurve",
        "client_tls_dheparams",
        "server_tls_protocols",
        "server_tls_ciphers",
        "server_tls13_ciphers",
        "max_packet_size",
        "listen_backlog",
        "sbuf_loopcnt",
        "tcp_defer_accept",
        "tcp_socket_buffer",
        // From the %include, and connection-string and user parameters.
        "pkt_buf",
        "connect_query",
        "client_encoding",
        "datestyle",
        "timezone",
        "application_name",
        "load_balance_hosts",
        "reserve_pool",
    ];
    for key in commented {
        let found = toml
            .lines()
            .find(|l| l.starts_with(&format!("# not imported: {key} = ")));
        let line = found.unwrap_or_else(|| panic!("`{key}` is not commented:\n{toml}"));
        // Each comment says where the key was and why it is left out.
        let (_, reason) = line.split_once("): ").expect("a reason after the origin");
        assert!(reason.len() > 10, "{line}");
        assert!(line.contains(".ini:"), "{line}");
    }
    // The included file's max_client_conn = 1 is overridden by the later line.
    assert!(!toml.contains("max_client_conn = 1 "), "{toml}");
    // auth_file and auth_hba_file are carried, relative to the ini.
    let userlist = dir.path().join("userlist.txt");
    let hba = dir.path().join("hba.conf");
    assert!(
        toml.contains(&format!("userlist_file = \"{}\"", userlist.display())),
        "{toml}"
    );
    assert!(
        toml.contains(&format!("hba_file = \"{}\"", hba.display())),
        "{toml}"
    );
    // Databases, users, peers and the fallback database.
    assert!(toml.contains("[databases.\"app\"]"), "{toml}");
    assert!(
        toml.contains("[databases.\"reports\"]\nhost = \"/var/run/postgresql\""),
        "{toml}"
    );
    assert!(
        toml.contains("# not imported: [databases] * = host=127.0.0.1"),
        "{toml}"
    );
    assert!(
        toml.contains("[users.\"app\"]\nmode = \"session\""),
        "{toml}"
    );
    assert!(toml.contains("# not imported: [peers] 1 = "), "{toml}");
    // pgmux check sees the users of the userlist.
    let (_, stdout, _) = pgmux(&[
        "check",
        "--config",
        &dir.path().join("out.toml").to_string_lossy(),
    ]);
    assert!(stdout.contains("pgmux_auth"), "{stdout}");
}

/// Where PgBouncer documents a key: `[pgbouncer]` settings, `[databases]` connection-string
/// parameters, `[users]` parameters, `[peers]` connection-string parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KeySection {
    Pgbouncer,
    Databases,
    Users,
    Peers,
}

/// The keys of tests/import/pgbouncer-1.25-keys.txt, transcribed from PgBouncer 1.25.2's
/// doc/config.md (its header cites the tag, commit and lines).
fn documented_keys() -> Vec<(KeySection, String)> {
    let text = std::fs::read_to_string(fixtures().join("pgbouncer-1.25-keys.txt")).unwrap();
    let keys: Vec<(KeySection, String)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut words = l.split_whitespace();
            let section = match words.next() {
                Some("pgbouncer") => KeySection::Pgbouncer,
                Some("databases") => KeySection::Databases,
                Some("users") => KeySection::Users,
                Some("peers") => KeySection::Peers,
                other => panic!("bad section {other:?} in `{l}`"),
            };
            let key = words.next().expect("a key after the section");
            let line: usize = words
                .next()
                .and_then(|n| n.parse().ok())
                .expect("its line in config.md");
            assert!(line > 0, "{l}");
            (section, key.to_owned())
        })
        .collect();
    // The transcription itself: config.md 1.25.2 has 99 [pgbouncer] settings, 20 [databases]
    // parameters (+ the alias reserve_pool), 9 [users] and 3 [peers] parameters.
    let count = |s: KeySection| keys.iter().filter(|(k, _)| *k == s).count();
    assert_eq!(count(KeySection::Pgbouncer), 99);
    assert_eq!(count(KeySection::Databases), 21);
    assert_eq!(count(KeySection::Users), 9);
    assert_eq!(count(KeySection::Peers), 3);
    keys
}

/// What the importer did with `key` of `section` in `toml`: `Ok(how)` if it mapped it or
/// listed it with a reason of its own, `Err` if it did neither (or only called it unknown).
fn disposition(toml: &str, section: KeySection, key: &str) -> Result<String, String> {
    let mut current = KeySection::Pgbouncer;
    for line in toml.lines() {
        if line.starts_with("[databases.") {
            current = KeySection::Databases;
        } else if line.starts_with("[users.") {
            current = KeySection::Users;
        } else if line.starts_with('[') {
            current = KeySection::Pgbouncer;
        }
        if let Some(peer) = line.strip_prefix("# not imported: [peers] ") {
            if section == KeySection::Peers && peer.contains(&format!(" {key}=")) {
                return Ok(line.to_owned());
            }
            continue;
        }
        if current != section {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# not imported: ") {
            if rest.starts_with(&format!("{key} = ")) {
                let (_, reason) = rest.split_once("): ").ok_or(line)?;
                if reason.starts_with("unknown") || reason.len() < 10 {
                    return Err(format!("only called unknown: {line}"));
                }
                return Ok(line.to_owned());
            }
        } else if !line.starts_with('#')
            && let Some((_, source)) = line.split_once("    # ")
            && let Some((names, _)) = source.split_once(" (")
            && names.split(", ").any(|n| n == key)
        {
            return Ok(line.to_owned());
        }
    }
    Err("neither mapped nor listed".to_owned())
}

#[test]
fn every_key_documented_in_pgbouncer_1_25_is_mapped_or_listed() {
    let keys = documented_keys();
    // The fixture sets every documented key...
    let ini: String = ["all-keys.ini", "all-keys-extra.ini"]
        .iter()
        .map(|f| std::fs::read_to_string(fixtures().join(f)).unwrap())
        .collect();
    let connstrs = |name: &str| -> Vec<String> {
        ini.lines()
            .filter(|l| l.starts_with(&format!("{name} = ")))
            .map(|l| format!(" {}", l.split_once(" = ").unwrap().1))
            .collect()
    };
    for (section, key) in &keys {
        let set = match section {
            KeySection::Pgbouncer => ini.lines().any(|l| l.starts_with(&format!("{key} = "))),
            KeySection::Databases => ["app", "reports"]
                .iter()
                .any(|db| connstrs(db).iter().any(|c| c.contains(&format!(" {key}=")))),
            KeySection::Users => connstrs("app")
                .iter()
                .any(|c| c.contains(&format!(" {key}="))),
            KeySection::Peers => connstrs("1")
                .iter()
                .any(|c| c.contains(&format!(" {key}="))),
        };
        assert!(set, "all-keys.ini does not set {section:?} {key}");
    }
    // ...and the importer maps each one, or lists it with its reason.
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "all-keys.ini",
        "all-keys-extra.ini",
        "userlist.txt",
        "hba.conf",
    ] {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).unwrap();
    }
    let (code, toml, stderr) = pgmux(&[
        "import-pgbouncer",
        &dir.path().join("all-keys.ini").to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let missing: Vec<String> = keys
        .iter()
        .filter_map(|(section, key)| {
            disposition(&toml, *section, key)
                .err()
                .map(|why| format!("{section:?} {key}: {why}"))
        })
        .collect();
    assert!(missing.is_empty(), "{missing:#?}\n{toml}");
    // The check itself: a key no importer knows is caught.
    assert!(disposition(&toml, KeySection::Pgbouncer, "no_such_key").is_err());
    assert!(disposition(&toml, KeySection::Users, "dbname").is_err());
}

#[test]
fn pgbouncer_semantics_that_differ_are_converted() {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("p.ini");
    std::fs::write(
        &ini,
        "[databases]\nonce = host=127.0.0.1 server_lifetime=0\n\
         abstract = host=@pgsock\n\
         [pgbouncer]\nlisten_addr = *\nserver_lifetime = 0\nquery_wait_timeout = 3\n\
         query_wait_notify = 5\ntcp_keepcnt = 500\ntcp_keepidle = 40000\n\
         auth_user = pgmux_auth\n",
    )
    .unwrap();
    let (code, toml, stderr) = pgmux(&["import-pgbouncer", &ini.to_string_lossy()]);
    assert_eq!(code, 0, "{stderr}");
    // server_lifetime 0 is "use once" in PgBouncer, "unlimited" in pgmux.
    assert_eq!(toml.matches("max_lifetime = \"1ns\"").count(), 2, "{toml}");
    // A notice after the wait has timed out would never be sent.
    assert!(!toml.contains("wait_notice_after"), "{toml}");
    assert!(
        toml.contains("# not imported: query_wait_notify = 5"),
        "{toml}"
    );
    // Beyond the kernel's limits: commented, not written for pgmux check to refuse.
    assert!(toml.contains("# not imported: tcp_keepcnt = 500"), "{toml}");
    assert!(
        toml.contains("# not imported: tcp_keepidle = 40000"),
        "{toml}"
    );
    // `*` is IPv4 and IPv6 in PgBouncer.
    assert!(toml.contains("listen = [\"0.0.0.0:6432\"]"), "{toml}");
    assert!(toml.contains("# not imported: listen_addr = * "), "{toml}");
    // An abstract-namespace socket cannot be reached.
    assert!(
        toml.contains("# not imported: [databases] abstract = host=@pgsock"),
        "{toml}"
    );
    assert!(!toml.contains("[databases.\"abstract\"]"), "{toml}");
    // auth_user without auth_query: PgBouncer 1.25's query, not pgmux's.
    assert!(
        toml.contains("FROM pg_authid WHERE rolname=$1 AND rolcanlogin"),
        "{toml}"
    );
    // auth_type unset: PgBouncer's md5 default is explained.
    assert!(
        toml.contains("# not imported: auth_type =  (not set): PgBouncer's default is md5"),
        "{toml}"
    );
}

#[test]
fn md5_with_scram_secrets_logs_those_users_in_with_scram() {
    // Debian's pgbouncer.ini says auth_type = md5; a userlist copied from a PostgreSQL 14+
    // pg_authid holds SCRAM verifiers, which PgBouncer then checks with SCRAM.
    let dir = tempfile::tempdir().unwrap();
    let userlist = dir.path().join("userlist.txt");
    std::fs::write(
        &userlist,
        concat!(
            "\"app\" \"SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:JgKqUx6b7CnTV+T6ot4Dyyd5+pKMg8EeGOHn6LvBm9k=\"\n",
            "\"say \"\"hi\"\"\" \"SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:JgKqUx6b7CnTV+T6ot4Dyyd5+pKMg8EeGOHn6LvBm9k=\"\n",
            "\"old\" \"md5a3556571e93b0d20722ba62be61e8c2d\"\n",
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(fixtures().join("debian-pgbouncer.ini")).unwrap();
    let text = text.replace(
        "auth_file = /etc/pgbouncer/userlist.txt",
        &format!("auth_file = {}", userlist.display()),
    );
    let text = text.replace("[users]\n", "[users]\napp = pool_mode=transaction\n");
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(&ini, text).unwrap();
    let toml = import_and_check(&ini, &dir.path().join("pgmux.toml"));
    assert!(toml.contains("method = \"md5\""), "{toml}");
    assert!(
        toml.contains("[users.\"app\"]\nauth_method = \"scram-sha-256\""),
        "{toml}"
    );
    assert_eq!(toml.matches("[users.\"app\"]").count(), 1, "{toml}");
    assert!(
        toml.contains("[users.'say \"hi\"']\nauth_method = \"scram-sha-256\""),
        "{toml}"
    );
    assert!(!toml.contains("[users.\"old\"]"), "{toml}");
}

#[test]
fn includes_are_relative_to_the_including_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    std::fs::write(
        dir.path().join("main.ini"),
        "[pgbouncer]\nlisten_addr = 127.0.0.1\n%include conf.d/pools.ini\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("conf.d/pools.ini"),
        "default_pool_size = 33\n%include more.ini\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("conf.d/more.ini"),
        "[databases]\nx = dbname=y\n",
    )
    .unwrap();
    let toml = import_and_check(&dir.path().join("main.ini"), &dir.path().join("out.toml"));
    assert!(
        toml.contains("size = 33    # default_pool_size ("),
        "{toml}"
    );
    assert!(toml.contains("conf.d/pools.ini:1)"), "{toml}");
    assert!(toml.contains("[databases.\"x\"]"), "{toml}");
}

#[test]
fn unreadable_or_malformed_ini_exits_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.ini");
    let (code, stdout, stderr) = pgmux(&["import-pgbouncer", &missing.to_string_lossy()]);
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    assert!(stderr.contains("nope.ini: cannot read"), "{stderr}");

    let bad = dir.path().join("bad.ini");
    std::fs::write(
        &bad,
        "[pgbouncer]\nlisten_port = 6432\nthis is not a setting\n",
    )
    .unwrap();
    let (code, _, stderr) = pgmux(&["import-pgbouncer", &bad.to_string_lossy()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("bad.ini:3: expected `key = value`"),
        "{stderr}"
    );

    // An include loop stops, naming where it was included from.
    let looped = dir.path().join("loop.ini");
    std::fs::write(&looped, "[pgbouncer]\n%include loop.ini\n").unwrap();
    let (code, _, stderr) = pgmux(&["import-pgbouncer", &looped.to_string_lossy()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("nested more than"), "{stderr}");
    assert!(stderr.contains("loop.ini:2"), "{stderr}");
}

/// pgmux running an imported config; killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_imported_config_serves_a_client() {
    let pg = TestPostgres::shared().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("userlist.txt"), "\"app\" \"app_pw\"\n").unwrap();
    let ini = dir.path().join("pgbouncer.ini");
    let out = dir.path().join("pgmux.toml");
    // Retry on another port if someone takes ours between the probe and pgmux's bind.
    for _ in 0..5 {
        let port = free_port();
        std::fs::write(
            &ini,
            format!(
                "[databases]\napp = host=127.0.0.1 port={} dbname=app\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n\
                 auth_file = userlist.txt\npool_mode = transaction\ndefault_pool_size = 2\n\
                 logfile = /var/log/pgbouncer.log\n",
                pg.port
            ),
        )
        .unwrap();
        import_and_check(&ini, &out);
        let child = Command::new(env!("CARGO_BIN_EXE_pgmux"))
            .args(["--config", &out.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgmux starts");
        let mut running = Running(child);
        let url = format!("host=127.0.0.1 port={port} dbname=app user=app password=app_pw");
        // Wait until it listens (or exits: the port was taken); a pgmux that does neither
        // within 600 tries is a failure, not a hang.
        for attempt in 0.. {
            if let Some(_status) = running.0.try_wait().unwrap() {
                break;
            }
            assert!(attempt < 600, "pgmux neither listens nor exits");
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    let row = client
                        .query_one("SELECT 40 + 2, current_database()", &[])
                        .await
                        .unwrap();
                    assert_eq!(row.get::<_, i32>(0), 42);
                    assert_eq!(row.get::<_, String>(1), "app");
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        let mut stderr = String::new();
        use std::io::Read;
        running
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(stderr.contains("cannot listen"), "pgmux exited:\n{stderr}");
    }
    panic!("pgmux could not listen: ports kept being taken");
}
