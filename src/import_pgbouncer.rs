//! `pgmux import-pgbouncer`: reads a PgBouncer ini (with its `%include`s) and writes the
//! equivalent pgmux TOML. Every setting pgmux has is mapped; every other one is written as
//! a comment naming it, its value and why it was not carried, never dropped in silence.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// PgBouncer 1.25's `auth_query` default (src/main.c, tag pgbouncer_1_25_2).
const PGBOUNCER_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname=$1 AND rolcanlogin";

/// The most `tcp_keepidle`/`tcp_keepintvl` seconds and `tcp_keepcnt` probes pgmux (Linux) takes.
const MAX_KEEPALIVE_SECS: u64 = 32767;
const MAX_KEEPCNT: u64 = 127;

/// `%include` nesting deeper than this is taken for a loop.
const MAX_INCLUDE_DEPTH: usize = 10;

/// One `key = value` of the ini, with where it was written.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    value: String,
    origin: String,
}

/// The ini as PgBouncer reads it: later values of a key replace earlier ones.
#[derive(Debug, Default)]
struct Ini {
    databases: Vec<Entry>,
    users: Vec<Entry>,
    pgbouncer: Vec<Entry>,
    peers: Vec<Entry>,
}

#[derive(Clone, Copy)]
enum Section {
    None,
    Databases,
    Users,
    Pgbouncer,
    Peers,
}

impl Ini {
    fn push(&mut self, section: Section, entry: Entry) {
        let list = match section {
            Section::Databases => &mut self.databases,
            Section::Users => &mut self.users,
            Section::Pgbouncer => &mut self.pgbouncer,
            Section::Peers => &mut self.peers,
            Section::None => return,
        };
        list.retain(|e| e.key != entry.key);
        list.push(entry);
    }

    fn get(&self, key: &str) -> Option<&Entry> {
        self.pgbouncer.iter().find(|e| e.key == key)
    }
}

/// Reads `path` and its includes; errors name the file and line.
fn read_ini(path: &Path) -> Result<Ini, String> {
    let mut ini = Ini::default();
    let mut section = Section::None;
    read_into(path, &mut ini, &mut section, 0)?;
    Ok(ini)
}

fn read_into(
    path: &Path,
    ini: &mut Ini,
    section: &mut Section,
    depth: usize,
) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse_into(&text, path, ini, section, depth)
}

fn parse_into(
    text: &str,
    path: &Path,
    ini: &mut Ini,
    section: &mut Section,
    depth: usize,
) -> Result<(), String> {
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let at = || format!("{}:{line_no}", path.display());
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("%include") {
            let target = rest.trim();
            if target.is_empty() {
                return Err(format!("{}: %include without a file", at()));
            }
            if depth >= MAX_INCLUDE_DEPTH {
                return Err(format!(
                    "{}: %include nested more than {MAX_INCLUDE_DEPTH} deep (a loop?)",
                    at()
                ));
            }
            let target = relative_to(path, target);
            read_into(&target, ini, section, depth + 1)
                .map_err(|e| format!("{e}\n  included from {}", at()))?;
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let Some(name) = name.strip_suffix(']') else {
                return Err(format!("{}: expected `[section]`, found `{line}`", at()));
            };
            *section = match name.trim().to_ascii_lowercase().as_str() {
                "databases" => Section::Databases,
                "users" => Section::Users,
                "pgbouncer" => Section::Pgbouncer,
                "peers" => Section::Peers,
                other => {
                    return Err(format!(
                        "{}: unknown section [{other}] (PgBouncer has [databases], [users], [peers], [pgbouncer])",
                        at()
                    ));
                }
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("{}: expected `key = value`, found `{line}`", at()));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{}: a `= value` without a key", at()));
        }
        if let Section::None = section {
            return Err(format!("{}: `{key}` before any [section]", at()));
        }
        // Database and user names keep their case; setting names do not.
        let key = match section {
            Section::Databases | Section::Users | Section::Peers => key.to_owned(),
            _ => key.to_ascii_lowercase(),
        };
        ini.push(
            *section,
            Entry {
                key,
                value: value.trim().to_owned(),
                origin: at(),
            },
        );
    }
    Ok(())
}

/// `target` as PgBouncer finds it: relative paths from the directory of `from`.
fn relative_to(from: &Path, target: &str) -> PathBuf {
    let target = Path::new(target);
    if target.is_absolute() {
        return target.to_path_buf();
    }
    from.parent().unwrap_or(Path::new(".")).join(target)
}

/// Splits a libpq-style `key=value key='quoted value'` string.
fn parse_connstr(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("expected `=` after `{key}`"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quote in the value of `{key}`")),
                    Some('\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                        value.push('\'');
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("unterminated quote in the value of `{key}`")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.to_ascii_lowercase(), value));
    }
}

/// `text` fit for a TOML comment, which may hold no control character but tab.
fn comment_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// PgBouncer seconds (possibly fractional, or with a unit such as `10s`/`500ms`) as a
/// pgmux duration.
fn duration(value: &str) -> Option<String> {
    millis(value).map(|ms| {
        if ms == 0 {
            "0".to_owned()
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    })
}

/// PgBouncer seconds (as [`duration`] reads them) in milliseconds.
fn millis(value: &str) -> Option<u64> {
    let v = value.trim();
    let (number, scale_ms) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("min") {
        (n, 60_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (v, 1000.0)
    };
    let n: f64 = number.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    Some((n * scale_ms).round() as u64)
}

fn integer(value: &str) -> Option<u64> {
    value.trim().parse().ok()
}

fn boolean(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

fn mode(value: &str) -> Option<&'static str> {
    match value.trim().to_ascii_lowercase().as_str() {
        "session" => Some("session"),
        "transaction" => Some("transaction"),
        "statement" => Some("statement"),
        _ => None,
    }
}

fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// One TOML table being written: its settings and the comments about what was not carried.
#[derive(Default)]
struct Table {
    lines: Vec<String>,
}

impl Table {
    fn set(&mut self, key: &str, value: String, from: &Entry) {
        self.lines.push(format!(
            "{key} = {value}    # {} ({})",
            comment_safe(&from.key),
            comment_safe(&from.origin)
        ));
    }

    fn set_default(&mut self, key: &str, value: String, why: &str) {
        self.lines.push(format!("{key} = {value}    # {why}"));
    }

    fn note(&mut self, key: &str, value: &str, origin: &str, reason: &str) {
        self.lines.push(format!(
            "# not imported: {} = {} ({}): {reason}",
            comment_safe(key),
            comment_safe(value),
            comment_safe(origin)
        ));
    }

    fn skip(&mut self, e: &Entry, reason: &str) {
        self.note(&e.key, &e.value, &e.origin, reason);
    }

    fn bad(&mut self, e: &Entry, what: &str) {
        self.note(
            &e.key,
            &e.value,
            &e.origin,
            &format!("not a valid {what}; pgmux's default is kept"),
        );
    }
}

/// Why each PgBouncer setting pgmux has no equivalent for is left out.
fn unmapped_reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "logfile" => "pgmux logs to stderr (journald, docker logs); redirect it there",
        "pidfile" => "pgmux does not daemonize; run it under systemd or a container runtime",
        "syslog" | "syslog_ident" | "syslog_facility" => {
            "pgmux logs to stderr only; let journald or the runtime forward it to syslog"
        }
        "unix_socket_dir" | "unix_socket_mode" | "unix_socket_group" => {
            "pgmux listens on TCP only (no Unix socket for clients); servers on a Unix socket are reached with `host = \"/dir\"` per database"
        }
        "user" => "pgmux does not switch users; start it as the right user (systemd User=)",
        "conffile" | "service_name" | "job_name" => {
            "pgmux has no such setting (the config path is --config)"
        }
        "reserve_pool_size" | "reserve_pool_timeout" | "reserve_pool" => {
            "pgmux has no reserve pool; raise the pool size instead"
        }
        "server_round_robin" => {
            "pgmux always reuses the most recently released idle server connection (LIFO); there is no switch"
        }
        "track_extra_parameters" => {
            "pgmux tracks the parameters PostgreSQL reports (ParameterStatus) itself"
        }
        "ignore_startup_parameters" => {
            "pgmux has no such list; try the clients' startup parameters against pgmux before switching"
        }
        "peer_id" => "pgmux has no peering; cancel requests must reach the pgmux the client is on",
        "disable_pqexec" => "pgmux has no such switch; multi-statement simple queries are served",
        "application_name_add_host" => "pgmux keeps the client's application_name unchanged",
        "stats_period" => {
            "pgmux's SHOW STATS averages use a fixed 60 s period (PgBouncer's default); /metrics has counters and histograms (Prometheus computes rates)"
        }
        "scram_iterations" => {
            "pgmux uses the iteration count of each stored verifier (4096 for plain passwords)"
        }
        "auth_ident_file" => "pgmux has no ident/peer authentication (no Unix socket)",
        "auth_ldap_options" => "pgmux has no LDAP authentication",
        "stats_users" => {
            "pgmux has no read-only console role; add them to auth.admin_users if they may use the console"
        }
        "log_pooler_errors" => "pgmux has no switch for this; its log level is set with RUST_LOG",
        "log_stats" => "pgmux has no periodic stats line; scrape /metrics on the admin port",
        "verbose" => "set the log level with RUST_LOG (e.g. RUST_LOG=debug)",
        "server_reset_query_always" => {
            "pgmux runs server_reset_query in session mode only; transaction mode cleans session state itself (pool.session_state)"
        }
        "server_check_delay" | "server_check_query" => {
            "pgmux does not probe idle servers with a query; tcp_keepalive and query_timeout notice dead ones"
        }
        "server_fast_close" => {
            "no switch: after a reload that changes a database, pgmux closes its old server connections as soon as they are idle"
        }
        "server_login_retry" => {
            "pgmux retries failed server connects with its own backoff; not configurable"
        }
        "autodb_idle_timeout" => "pgmux has no automatic (`*`) databases",
        "dns_max_ttl" | "dns_nxdomain_ttl" | "dns_zone_check_period" | "resolv_conf" => {
            "pgmux resolves host names through the system resolver at each connect"
        }
        "cancel_wait_timeout" => "pgmux forwards cancel requests at once; no separate timeout",
        "client_idle_timeout" => {
            "pgmux has no idle-client timeout (pool.pinned_idle_timeout covers pinned clients only)"
        }
        "transaction_timeout" => {
            "pgmux has no transaction length limit; use PostgreSQL's transaction_timeout (17+) or statement_timeout"
        }
        "suspend_timeout" => "pgmux has no online restart (SUSPEND / -R)",
        "listen_backlog" | "sbuf_loopcnt" | "tcp_defer_accept" | "tcp_socket_buffer"
        | "pkt_buf" => "a low-level socket knob pgmux does not expose",
        "client_tls_protocols"
        | "client_tls_ciphers"
        | "client_tls13_ciphers"
        | "client_tls_ecdhcurve"
        | "client_tls_dheparams" => {
            "pgmux uses rustls' safe defaults: TLS 1.2 and 1.3 with its own cipher suites and curves"
        }
        "server_tls_protocols" | "server_tls_ciphers" | "server_tls13_ciphers" => {
            "pgmux uses rustls' safe defaults: TLS 1.2 and 1.3 with its own cipher suites"
        }
        "max_packet_size" => {
            "outside pgmux's range for server.max_message_size (1024 to 1073741824)"
        }
        _ => return None,
    })
}

/// Converts the ini at `path` into pgmux TOML.
pub fn convert(path: &Path) -> Result<String, String> {
    let ini = read_ini(path)?;
    Ok(render(&ini, path))
}

fn render(ini: &Ini, path: &Path) -> String {
    let mut server = Table::default();
    let mut auth = Table::default();
    let mut pool = Table::default();
    let mut tls = Table::default();
    let mut admin = Table::default();
    let mut other = Table::default();

    // Where clients connect.
    let port = ini.get("listen_port");
    let port_value = match port {
        Some(p) => match integer(&p.value) {
            Some(n) if (1..=65535).contains(&n) => n,
            _ => {
                server.bad(p, "port");
                6432
            }
        },
        None => 6432,
    };
    match ini.get("listen_addr") {
        Some(a) if !list(&a.value).is_empty() => {
            let addrs: Vec<String> = list(&a.value)
                .into_iter()
                .map(|h| {
                    let h = if h == "*" { "0.0.0.0".to_owned() } else { h };
                    if h.contains(':') && !h.starts_with('[') {
                        format!("[{h}]:{port_value}")
                    } else {
                        format!("{h}:{port_value}")
                    }
                })
                .collect();
            let values: Vec<String> = addrs.iter().map(|a| q(a)).collect();
            let mut from = a.clone();
            from.key = "listen_addr, listen_port".to_owned();
            server.set("listen", format!("[{}]", values.join(", ")), &from);
            if list(&a.value).iter().any(|h| h == "*") {
                server.note(
                    "listen_addr",
                    &a.value,
                    &a.origin,
                    "`*` is every IPv4 and IPv6 address in PgBouncer, 0.0.0.0 (IPv4 only) here; add the IPv6 addresses clients use to server.listen",
                );
            }
        }
        other_addr => {
            let origin = other_addr.map_or("not set", |a| a.origin.as_str());
            server.note(
                "listen_addr",
                other_addr.map_or("", |a| a.value.as_str()),
                origin,
                "PgBouncer then takes Unix-socket clients only; pgmux has no Unix socket, so it listens on localhost",
            );
            server.set_default(
                "listen",
                q(&format!("127.0.0.1:{port_value}")),
                "localhost, on listen_port",
            );
        }
    }
    // PgBouncer's defaults where pgmux's differ, so that the switch changes nothing.
    let mut defaults: Vec<(&str, &Entry)> = Vec::new();
    let pg_default = |key: &str, value: &str| Entry {
        key: key.to_owned(),
        value: value.to_owned(),
        origin: "PgBouncer's default".to_owned(),
    };
    let implied = [
        pg_default("max_client_conn", "100"),
        pg_default("pool_mode", "session"),
        pg_default("query_wait_timeout", "120"),
        pg_default("server_connect_timeout", "15"),
        pg_default("client_login_timeout", "60"),
        pg_default("tcp_keepidle", "0"),
        pg_default("tcp_keepintvl", "0"),
        pg_default("tcp_keepcnt", "0"),
        pg_default("query_wait_notify", "5"),
    ];
    // PgBouncer serves no client TLS without client_tls_sslmode; pgmux would prefer it
    // once cert_file is set.
    let tls_default = pg_default("client_tls_sslmode", "disable");
    let tls_implied = ini
        .get("client_tls_cert_file")
        .is_some()
        .then_some(&tls_default);
    // pgmux's auth_query reads pg_shadow; PgBouncer 1.25's also refuses expired passwords
    // and roles that cannot log in.
    let query_default = pg_default("auth_query", PGBOUNCER_AUTH_QUERY);
    let auth_user_anywhere = ini.get("auth_user").is_some()
        || ini.databases.iter().any(|d| {
            parse_connstr(&d.value).is_ok_and(|p| p.iter().any(|(k, _)| k == "auth_user"))
        });
    let query_implied = auth_user_anywhere.then_some(&query_default);
    for d in implied.iter().chain(tls_implied).chain(query_implied) {
        if ini.get(&d.key).is_none() {
            defaults.push((d.key.as_str(), d));
        }
    }
    if ini.get("auth_type").is_none() {
        auth.note(
            "auth_type",
            "",
            "not set",
            "PgBouncer's default is md5; pgmux's scram-sha-256 is kept: md5 hashes in the userlist still log in with md5, SCRAM verifiers with SCRAM (as PgBouncer does), plain-text passwords with SCRAM instead of md5",
        );
    }
    let settings = ini
        .pgbouncer
        .iter()
        .map(|e| (e.key.as_str(), e))
        .chain(defaults);

    // The wait pgmux will allow, for query_wait_notify: PgBouncer's 120 s if unset, pgmux's
    // 5 s if the ini's cannot be carried (0 or invalid).
    let wait_ms = match ini.get("query_wait_timeout") {
        None => 120_000,
        Some(e) => millis(&e.value).filter(|&ms| ms > 0).unwrap_or(5_000),
    };
    let mut client_tls_mode: Option<&Entry> = None;
    for (key, e) in settings {
        let v = e.value.as_str();
        match key {
            "listen_addr" | "listen_port" => {}
            "max_client_conn" => match integer(v) {
                Some(n) if n >= 1 => server.set("max_client_conn", n.to_string(), e),
                _ => server.bad(e, "connection count (at least 1)"),
            },
            "client_login_timeout" => match duration(v) {
                Some(d) if d != "0" => server.set("client_login_timeout", q(&d), e),
                Some(_) => server.skip(e, "0 (no limit) has no pgmux equivalent; pgmux's 15s is kept"),
                None => server.bad(e, "duration"),
            },
            "so_reuseport" => match boolean(v) {
                Some(b) => server.set("reuse_port", b.to_string(), e),
                None => server.bad(e, "boolean"),
            },
            "max_packet_size" => match integer(v) {
                Some(n) if (1024..=1_073_741_824).contains(&n) => {
                    server.set("max_message_size", n.to_string(), e)
                }
                _ => server.skip(e, unmapped_reason(key).unwrap_or_default()),
            },
            "pool_mode" => match mode(v) {
                Some(m) => pool.set("mode", q(m), e),
                None => pool.bad(e, "pool mode"),
            },
            "default_pool_size" => match integer(v) {
                Some(n) if n >= 1 => pool.set("size", n.to_string(), e),
                _ => pool.bad(e, "pool size (at least 1)"),
            },
            "min_pool_size" => match integer(v) {
                Some(n) => pool.set("min_size", n.to_string(), e),
                None => pool.bad(e, "number"),
            },
            "query_wait_timeout" => match duration(v) {
                Some(d) if d != "0" => pool.set("wait_timeout", q(&d), e),
                Some(_) => pool.skip(e, "0 (wait forever) has no pgmux equivalent: wait_timeout must be above 0; pgmux's 5s is kept"),
                None => pool.bad(e, "duration"),
            },
            "server_connect_timeout" => match duration(v) {
                Some(d) if d != "0" => pool.set("connect_timeout", q(&d), e),
                Some(_) => pool.skip(e, "0 (no limit) has no pgmux equivalent; pgmux's 5s is kept"),
                None => pool.bad(e, "duration"),
            },
            "server_lifetime" => lifetime(&mut pool, e),
            "query_wait_notify" => match millis(v) {
                Some(0) => pool.set("wait_notice_after", q("0"), e),
                Some(ms) if ms >= wait_ms => pool.skip(
                    e,
                    "at or above the wait timeout, so no waiting client would see it; pgmux's default (no NOTICE) is kept",
                ),
                Some(_) => pool.set("wait_notice_after", q(&duration(v).unwrap_or_default()), e),
                None => pool.bad(e, "duration"),
            },
            "server_idle_timeout" | "idle_transaction_timeout" | "query_timeout" => {
                let target = match key {
                    "server_idle_timeout" => "idle_timeout",
                    other => other,
                };
                match duration(v) {
                    Some(d) => pool.set(target, q(&d), e),
                    None => pool.bad(e, "duration"),
                }
            }
            // Whole seconds in both (PgBouncer reads an integer).
            "tcp_keepidle" | "tcp_keepintvl" => match integer(v) {
                Some(0) => pool.set(key, q("0"), e),
                Some(n) if n <= MAX_KEEPALIVE_SECS => pool.set(key, q(&format!("{n}s")), e),
                Some(_) => pool.skip(e, "above the kernel's limit of 32767 s, which pgmux refuses; pgmux's default is kept"),
                None => pool.bad(e, "number of seconds"),
            },
            "tcp_keepcnt" => match integer(v) {
                Some(n) if n <= MAX_KEEPCNT => pool.set(key, n.to_string(), e),
                Some(_) => pool.skip(e, "above the kernel's limit of 127 probes, which pgmux refuses; pgmux's default is kept"),
                None => pool.bad(e, "number"),
            },
            "tcp_user_timeout" => match integer(v) {
                Some(0) => pool.set("tcp_user_timeout", q("0"), e),
                Some(ms) => pool.set("tcp_user_timeout", q(&format!("{ms}ms")), e),
                None => pool.bad(e, "number of milliseconds"),
            },
            "tcp_keepalive" => match boolean(v) {
                Some(b) => pool.set("tcp_keepalive", b.to_string(), e),
                None => pool.bad(e, "boolean"),
            },
            "max_prepared_statements" | "max_db_connections"
            | "max_user_connections" | "max_db_client_connections"
            | "max_user_client_connections" => match integer(v) {
                Some(n) => pool.set(key, n.to_string(), e),
                None => pool.bad(e, "number"),
            },
            "server_reset_query" => pool.set("server_reset_query", q(v), e),
            "server_tls_sslmode" => match v.to_ascii_lowercase().as_str() {
                m @ ("disable" | "prefer" | "require" | "verify-ca" | "verify-full") => {
                    pool.set("server_tls", q(m), e)
                }
                "allow" => {
                    pool.set("server_tls", q("disable"), e);
                    pool.skip(e, "pgmux has no `allow` (plain first, TLS only if the server insists); written as `disable`");
                }
                _ => pool.bad(e, "sslmode"),
            },
            "server_tls_ca_file" => pool.set("server_ca_file", q(v), e),
            "server_tls_cert_file" => pool.set("server_cert_file", q(v), e),
            "server_tls_key_file" => pool.set("server_key_file", q(v), e),
            "client_tls_sslmode" => client_tls_mode = Some(e),
            "client_tls_cert_file" => tls.set("cert_file", q(v), e),
            "client_tls_key_file" => tls.set("key_file", q(v), e),
            "client_tls_ca_file" => tls.set("client_ca_file", q(v), e),
            "auth_type" => match v.to_ascii_lowercase().as_str() {
                m @ ("md5" | "scram-sha-256" | "trust" | "cert") => auth.set("method", q(m), e),
                "plain" => auth.set("method", q("password"), e),
                "any" => {
                    auth.set("method", q("trust"), e);
                    auth.skip(e, "pgmux has no `any` (no check of the user name at all); written as `trust`: the user must still exist");
                }
                "hba" => auth.skip(
                    e,
                    "pgmux reads the rules of auth_hba_file (auth.hba_file), which then decide the method; auth.method is for users no rule names",
                ),
                _ => auth.skip(e, "pgmux has no such method (it has scram-sha-256, md5, password, cert, trust)"),
            },
            "auth_file" => auth.set(
                "userlist_file",
                q(&relative_to(path, v).to_string_lossy()),
                e,
            ),
            "auth_hba_file" => auth.set(
                "hba_file",
                q(&relative_to(path, v).to_string_lossy()),
                e,
            ),
            "auth_user" | "auth_query" | "auth_dbname" => auth.set(key, q(v), e),
            "admin_users" => {
                let users: Vec<String> = list(v).iter().map(|u| q(u)).collect();
                auth.set("admin_users", format!("[{}]", users.join(", ")), e);
            }
            "log_connections" | "log_disconnections" => {
                let on = |k: &str| {
                    ini.get(k).and_then(|e| boolean(&e.value)).unwrap_or(true)
                };
                // One pgmux switch for both: written once, at the first of the two.
                let first = if ini.get("log_connections").is_some() {
                    "log_connections"
                } else {
                    "log_disconnections"
                };
                if key == first {
                    let mut from = e.clone();
                    from.key = "log_connections, log_disconnections".to_owned();
                    admin.set(
                        "log_connections",
                        (on("log_connections") || on("log_disconnections")).to_string(),
                        &from,
                    );
                }
                if on("log_connections") != on("log_disconnections") && !on(key) {
                    admin.skip(e, "pgmux logs logins and disconnections together (admin.log_connections); on if either was");
                }
            }
            _ => match unmapped_reason(key) {
                Some(reason) => other.skip(e, reason),
                None => other.skip(e, "unknown to this importer (not in PgBouncer 1.25's config.md)"),
            },
        }
    }
    if let Some(e) = client_tls_mode {
        match e.value.to_ascii_lowercase().as_str() {
            m @ ("disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full") => {
                tls.set("client_tls", q(m), e)
            }
            _ => tls.bad(e, "sslmode"),
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# pgmux configuration imported from PgBouncer's {} by `pgmux import-pgbouncer`.\n\
         # Each setting names the PgBouncer setting (and file:line) it came from; settings\n\
         # pgmux has no equivalent for are kept below as `# not imported:` comments with the reason.\n\
         # Check it with `pgmux check --config FILE`.",
        path.display()
    );
    write_table(&mut out, "server", &server);
    write_table(&mut out, "auth", &auth);
    write_table(&mut out, "pool", &pool);
    if !tls.lines.is_empty() {
        write_table(&mut out, "tls", &tls);
    }
    if !admin.lines.is_empty() {
        write_table(&mut out, "admin", &admin);
    }
    if !other.lines.is_empty() {
        out.push_str("\n# PgBouncer settings with no pgmux equivalent\n");
        for line in &other.lines {
            out.push_str(line);
            out.push('\n');
        }
    }
    for e in &ini.peers {
        let _ = writeln!(
            out,
            "\n# not imported: [peers] {} = {} ({}): pgmux has no peering; cancel requests must reach the pgmux the client is on",
            comment_safe(&e.key),
            comment_safe(&e.value),
            comment_safe(&e.origin)
        );
    }
    let socket_dir = ini
        .get("unix_socket_dir")
        .map(|e| e.value.clone())
        .filter(|d| d.starts_with('/'))
        .unwrap_or_else(|| "/tmp".to_owned());
    for e in &ini.databases {
        out.push('\n');
        database(&mut out, e, &socket_dir);
    }
    // PgBouncer's md5 logs a user whose secret is a SCRAM verifier in with SCRAM; pgmux's
    // md5 refuses such a user, so each of them gets its own scram-sha-256.
    let md5 = ini
        .get("auth_type")
        .is_some_and(|e| e.value.eq_ignore_ascii_case("md5"));
    let mut scram = match ini.get("auth_file") {
        Some(f) if md5 => scram_users(&relative_to(path, &f.value)),
        _ => Vec::new(),
    };
    for e in &ini.users {
        out.push('\n');
        let is_scram = scram.contains(&e.key);
        scram.retain(|u| *u != e.key);
        user(&mut out, e, is_scram);
    }
    for name in scram {
        let _ = writeln!(out, "\n[users.{}]", q(&name));
        out.push_str(SCRAM_USER_LINE);
        out.push('\n');
    }
    out
}

/// `server_lifetime` as `max_lifetime`. PgBouncer's 0 means "use each connection once",
/// pgmux's "unlimited": 0 becomes 1 ns, so each connection is closed when it comes back.
fn lifetime(t: &mut Table, e: &Entry) {
    match millis(&e.value) {
        Some(0) => {
            t.set("max_lifetime", q("1ns"), e);
            t.skip(e, "0 means \"use each server connection once\" in PgBouncer but \"unlimited\" in pgmux; written as 1ns, which closes each connection when it is given back");
        }
        Some(_) => t.set(
            "max_lifetime",
            q(&duration(&e.value).unwrap_or_default()),
            e,
        ),
        None => t.bad(e, "duration"),
    }
}

fn write_table(out: &mut String, name: &str, table: &Table) {
    let _ = writeln!(out, "\n[{name}]");
    for line in &table.lines {
        out.push_str(line);
        out.push('\n');
    }
}

fn database(out: &mut String, e: &Entry, socket_dir: &str) {
    if e.key == "*" {
        let _ = writeln!(
            out,
            "# not imported: [databases] * = {} ({}): pgmux has no fallback database; list each database clients use",
            comment_safe(&e.value),
            comment_safe(&e.origin)
        );
        return;
    }
    let params = match parse_connstr(&e.value) {
        Ok(p) => p,
        Err(why) => {
            let _ = writeln!(
                out,
                "# not imported: [databases] {} = {} ({}): {why}",
                comment_safe(&e.key),
                comment_safe(&e.value),
                comment_safe(&e.origin)
            );
            return;
        }
    };
    let mut t = Table::default();
    let mut host_set = false;
    for (key, value) in &params {
        let from = Entry {
            key: key.clone(),
            value: value.clone(),
            origin: e.origin.clone(),
        };
        match key.as_str() {
            "host" if value.starts_with('@') => {
                let _ = writeln!(
                    out,
                    "# not imported: [databases] {} = {} ({}): host {} is a Unix socket in the abstract namespace, which pgmux cannot reach (use a socket directory or TCP)",
                    comment_safe(&e.key),
                    comment_safe(&e.value),
                    comment_safe(&e.origin),
                    comment_safe(value)
                );
                return;
            }
            "host" => {
                let hosts = list(value);
                if let Some(h) = hosts.first() {
                    t.set("host", q(h), &from);
                    host_set = true;
                }
                if hosts.len() > 1 {
                    t.skip(&from, "pgmux connects to one host per database; only the first is used");
                }
            }
            "port" => match integer(value) {
                Some(n) if (1..=65535).contains(&n) => t.set("port", n.to_string(), &from),
                _ => t.bad(&from, "port"),
            },
            "dbname" | "user" | "password" | "auth_user" | "auth_query" | "auth_dbname" => {
                t.set(key, q(value), &from)
            }
            "pool_size" => match integer(value) {
                Some(n) if n >= 1 => t.set("size", n.to_string(), &from),
                _ => t.bad(&from, "pool size"),
            },
            "min_pool_size" => match integer(value) {
                Some(n) => t.set("min_size", n.to_string(), &from),
                None => t.bad(&from, "number"),
            },
            "pool_mode" => match mode(value) {
                Some(m) => t.set("mode", q(m), &from),
                None => t.bad(&from, "pool mode"),
            },
            "max_db_connections" | "max_db_client_connections" => match integer(value) {
                Some(n) => t.set(key, n.to_string(), &from),
                None => t.bad(&from, "number"),
            },
            "server_lifetime" => lifetime(&mut t, &from),
            "client_encoding" | "datestyle" | "timezone" | "application_name" => t.skip(
                &from,
                "pgmux does not set server parameters per database; set them on the role or database in PostgreSQL (ALTER DATABASE ... SET)",
            ),
            "connect_query" => t.skip(&from, "pgmux runs no query on new server connections; use ALTER ROLE/DATABASE ... SET"),
            "load_balance_hosts" => t.skip(&from, "pgmux connects to one host per database"),
            "reserve_pool" | "reserve_pool_size" => t.skip(&from, "pgmux has no reserve pool; raise size instead"),
            _ => t.skip(&from, "unknown connection-string parameter"),
        }
    }
    if !host_set {
        t.set_default(
            "host",
            q(socket_dir),
            "no host: PgBouncer's Unix socket directory (unix_socket_dir)",
        );
    }
    let _ = writeln!(out, "[databases.{}]", q(&e.key));
    for line in &t.lines {
        out.push_str(line);
        out.push('\n');
    }
}

/// Written for a userlist user with a SCRAM verifier when auth_type is md5.
const SCRAM_USER_LINE: &str = "auth_method = \"scram-sha-256\"    # auth_type = md5 and a SCRAM secret in auth_file: PgBouncer logs this user in with SCRAM";

/// The users of a PgBouncer userlist whose secret is a SCRAM verifier. An unreadable file
/// gives none: `pgmux check` reports it at `auth.userlist_file`.
fn scram_users(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let Some((name, rest)) = quoted(line) else {
            continue;
        };
        if let Some((secret, _)) = quoted(rest.trim_start())
            && secret.starts_with("SCRAM-SHA-256$")
            && !found.contains(&name)
        {
            found.push(name);
        }
    }
    found
}

/// A `"..."` string at the start of `text` (`""` stands for `"`), and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let rest = text.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            value.push(c);
        } else if rest[i + 1..].starts_with('"') {
            value.push('"');
            chars.next();
        } else {
            return Some((value, &rest[i + 1..]));
        }
    }
    None
}

fn user(out: &mut String, e: &Entry, scram: bool) {
    let mut t = Table::default();
    if scram {
        t.lines.push(SCRAM_USER_LINE.to_owned());
    }
    match parse_connstr(&e.value) {
        Ok(params) => {
            for (key, value) in &params {
                let from = Entry {
                    key: key.clone(),
                    value: value.clone(),
                    origin: e.origin.clone(),
                };
                match key.as_str() {
                    "pool_mode" => match mode(value) {
                        Some(m) => t.set("mode", q(m), &from),
                        None => t.bad(&from, "pool mode"),
                    },
                    "pool_size" => match integer(value) {
                        Some(n) if n >= 1 => t.set("size", n.to_string(), &from),
                        _ => t.bad(&from, "pool size"),
                    },
                    "max_user_connections" | "max_user_client_connections" => {
                        match integer(value) {
                            Some(n) => t.set(key, n.to_string(), &from),
                            None => t.bad(&from, "number"),
                        }
                    }
                    "reserve_pool" | "reserve_pool_size" => {
                        t.skip(&from, "pgmux has no reserve pool; raise size instead")
                    }
                    "query_timeout" | "idle_transaction_timeout" => t.skip(
                        &from,
                        "pgmux sets this per database or in [pool], not per user",
                    ),
                    "client_idle_timeout" | "transaction_timeout" => t.skip(
                        &from,
                        unmapped_reason(key).expect("listed in unmapped_reason"),
                    ),
                    _ => t.skip(&from, "unknown user parameter"),
                }
            }
        }
        Err(why) => t.note(&e.key, &e.value, &e.origin, &why),
    }
    let _ = writeln!(out, "[users.{}]", q(&e.key));
    for line in &t.lines {
        out.push_str(line);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Ini, String> {
        let mut ini = Ini::default();
        let mut section = Section::None;
        parse_into(text, Path::new("t.ini"), &mut ini, &mut section, 0)?;
        Ok(ini)
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let err = parse("[pgbouncer]\nlisten_port = 1\nnonsense\n").unwrap_err();
        assert!(err.contains("t.ini:3"), "{err}");
        let err = parse("listen_port = 1\n").unwrap_err();
        assert!(
            err.contains("t.ini:1") && err.contains("before any"),
            "{err}"
        );
        let err = parse("[bogus]\n").unwrap_err();
        assert!(err.contains("unknown section"), "{err}");
        let err = parse("[pgbouncer\n").unwrap_err();
        assert!(err.contains("t.ini:1"), "{err}");
    }

    #[test]
    fn later_values_replace_earlier_ones() {
        let ini = parse("[pgbouncer]\nlisten_port = 1\nLISTEN_PORT = 2\n").unwrap();
        assert_eq!(ini.get("listen_port").unwrap().value, "2");
        assert_eq!(ini.pgbouncer.len(), 1);
    }

    #[test]
    fn connection_strings_with_quotes() {
        let p = parse_connstr("host=db port=5433 connect_query='SELECT ''a'' \\' x'  user = u")
            .unwrap();
        assert_eq!(
            p,
            vec![
                ("host".into(), "db".into()),
                ("port".into(), "5433".into()),
                ("connect_query".into(), "SELECT 'a' ' x".into()),
                ("user".into(), "u".into()),
            ]
        );
        assert!(parse_connstr("host").is_err());
        assert!(parse_connstr("password='open").is_err());
        assert_eq!(parse_connstr("").unwrap(), vec![]);
    }

    #[test]
    fn userlist_lines_for_scram_users() {
        assert_eq!(
            quoted(r#""a ""b"" c" rest"#),
            Some((r#"a "b" c"#.to_owned(), " rest"))
        );
        assert_eq!(quoted(r#""open"#), None);
        assert_eq!(quoted("bare"), None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("userlist.txt");
        std::fs::write(
            &file,
            "; \"c\" \"SCRAM-SHA-256$x\"\n\"s\" \"SCRAM-SHA-256$4096:a$b:c\"\n\"m\" \"md5abc\"\n\"half\n\"\u{e9}\" \"SCRAM-SHA-256$\" x\n\"s\" \"SCRAM-SHA-256$again\"\n",
        )
        .unwrap();
        assert_eq!(
            scram_users(&file),
            vec!["s".to_owned(), "\u{e9}".to_owned()]
        );
        assert!(scram_users(&dir.path().join("missing.txt")).is_empty());
    }

    #[test]
    fn durations_from_seconds() {
        assert_eq!(duration("600").as_deref(), Some("600s"));
        assert_eq!(duration("0.5").as_deref(), Some("500ms"));
        assert_eq!(duration("0").as_deref(), Some("0"));
        assert_eq!(duration("250ms").as_deref(), Some("250ms"));
        assert_eq!(duration("-1"), None);
        assert_eq!(duration("soon"), None);
    }

    #[test]
    fn listen_addresses_and_defaults() {
        let ini = parse("[pgbouncer]\nlisten_addr = *, ::1\nlisten_port = 7000\n").unwrap();
        let out = render(&ini, Path::new("/etc/p.ini"));
        assert!(
            out.contains(r#"listen = ["0.0.0.0:7000", "[::1]:7000"]"#),
            "{out}"
        );
        // PgBouncer's defaults where pgmux's differ.
        assert!(out.contains("mode = \"session\""), "{out}");
        assert!(out.contains("max_client_conn = 100"), "{out}");
        assert!(out.contains("wait_timeout = \"120s\""), "{out}");
        assert!(!out.contains("[tls]"), "{out}");
        let ini = parse("[pgbouncer]\nclient_tls_cert_file = a.crt\n").unwrap();
        let out = render(&ini, Path::new("p.ini"));
        assert!(out.contains("client_tls = \"disable\""), "{out}");
    }

    #[test]
    fn every_unmapped_setting_is_a_comment_with_its_value() {
        let ini = parse("[pgbouncer]\nlisten_addr = 127.0.0.1\nlogfile = /var/log/x.log\nfrobnicate = 3\n[peers]\n1 = host=a\n").unwrap();
        let out = render(&ini, Path::new("p.ini"));
        assert!(
            out.contains(
                "# not imported: logfile = /var/log/x.log (t.ini:3): pgmux logs to stderr"
            ),
            "{out}"
        );
        assert!(
            out.contains("# not imported: frobnicate = 3 (t.ini:4): unknown"),
            "{out}"
        );
        assert!(out.contains("[peers] 1 = host=a"), "{out}");
    }

    #[test]
    fn control_characters_stay_out_of_comments() {
        let ini = parse(
            "[pgbouncer]\nlogfile = a\rb\u{7}\n[databases]\nx = host=h\u{1b} junk\n* = \u{7}\n",
        )
        .unwrap();
        let out = render(&ini, Path::new("p.ini"));
        toml::from_str::<toml::Value>(&out).expect("valid TOML");
    }

    #[test]
    fn databases_and_users() {
        let ini = parse(
            "[databases]\napp = host=h1,h2 port=5433 dbname=real pool_size=7 pool_mode=statement timezone=UTC\nlocal =\n* = host=x\n\
             [users]\nbob = pool_mode=session max_user_connections=3 query_timeout=5\n\
             [pgbouncer]\nunix_socket_dir = /run/pg\n",
        )
        .unwrap();
        let out = render(&ini, Path::new("p.ini"));
        assert!(out.contains("[databases.\"app\"]\nhost = \"h1\""), "{out}");
        assert!(out.contains("port = 5433"), "{out}");
        assert!(out.contains("size = 7"), "{out}");
        assert!(out.contains("mode = \"statement\""), "{out}");
        assert!(out.contains("# not imported: timezone = UTC"), "{out}");
        assert!(out.contains("# not imported: host = h1,h2"), "{out}");
        assert!(
            out.contains("[databases.\"local\"]\nhost = \"/run/pg\""),
            "{out}"
        );
        assert!(
            out.contains("# not imported: [databases] * = host=x"),
            "{out}"
        );
        assert!(out.contains("[users.\"bob\"]\nmode = \"session\""), "{out}");
        assert!(out.contains("max_user_connections = 3"), "{out}");
        assert!(out.contains("# not imported: query_timeout = 5"), "{out}");
        toml::from_str::<toml::Value>(&out).expect("valid TOML");
    }
}
