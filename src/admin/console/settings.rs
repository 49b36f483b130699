//! SHOW CONFIG and SET. SHOW CONFIG has PgBouncer's columns (`key`, `value`, `default`,
//! `changeable`); its rows are first the PgBouncer settings pgmux has an equivalent of,
//! under PgBouncer's names and units (seconds, 0/1), then every pgmux setting as
//! `section.key` in the config file's own spelling. `changeable` is `yes` for the
//! settings SET changes live.
//!
//! `SET key = value` takes either name. The change is made on a copy of the config in
//! force, checked with the rules a config file is checked with, and applied as a reload
//! applies a new file (`Pooler::apply_config`): a refused value changes nothing, pools get
//! new sizes and timeouts in place, and nobody is dropped. A later RELOAD (or SIGHUP)
//! reads the file again and so undoes a SET, as in PgBouncer.

use std::collections::HashMap;
use std::time::Duration;

use super::rows::{Rows, Type, text};
use crate::client::ClientError;
use crate::config::{Config, PoolMode};
use crate::protocol::PgError;

/// How a setting's value is written and read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Count,
    Duration,
    Bool,
    Mode,
    Text,
}

/// A setting SET changes live: pgmux's key, PgBouncer's name for it if it has one.
struct Live {
    key: &'static str,
    pgbouncer: &'static [&'static str],
    kind: Kind,
}

const LIVE: &[Live] = &[
    live("server.max_client_conn", &["max_client_conn"], Kind::Count),
    live(
        "server.client_login_timeout",
        &["client_login_timeout"],
        Kind::Duration,
    ),
    live("server.shutdown_timeout", &[], Kind::Duration),
    live("pool.size", &["default_pool_size"], Kind::Count),
    live("pool.min_size", &["min_pool_size"], Kind::Count),
    live("pool.mode", &["pool_mode"], Kind::Mode),
    live("pool.wait_timeout", &["query_wait_timeout"], Kind::Duration),
    live(
        "pool.idle_timeout",
        &["server_idle_timeout"],
        Kind::Duration,
    ),
    live("pool.max_lifetime", &["server_lifetime"], Kind::Duration),
    live(
        "pool.connect_timeout",
        &["server_connect_timeout"],
        Kind::Duration,
    ),
    live(
        "pool.idle_transaction_timeout",
        &["idle_transaction_timeout"],
        Kind::Duration,
    ),
    live("pool.query_timeout", &["query_timeout"], Kind::Duration),
    live(
        "pool.server_reset_query",
        &["server_reset_query"],
        Kind::Text,
    ),
    live(
        "pool.max_prepared_statements",
        &["max_prepared_statements"],
        Kind::Count,
    ),
    live(
        "pool.max_db_connections",
        &["max_db_connections"],
        Kind::Count,
    ),
    live(
        "pool.max_user_connections",
        &["max_user_connections"],
        Kind::Count,
    ),
    live(
        "pool.max_db_client_connections",
        &["max_db_client_connections"],
        Kind::Count,
    ),
    live(
        "pool.max_user_client_connections",
        &["max_user_client_connections"],
        Kind::Count,
    ),
    live(
        "admin.log_connections",
        &["log_connections", "log_disconnections"],
        Kind::Bool,
    ),
    live("admin.log_slow_waits", &[], Kind::Duration),
];

const fn live(key: &'static str, pgbouncer: &'static [&'static str], kind: Kind) -> Live {
    Live {
        key,
        pgbouncer,
        kind,
    }
}

/// PgBouncer's `stats_period`, fixed in pgmux.
const STATS_PERIOD_SECONDS: &str = "60";

/// SHOW CONFIG.
pub fn show(config: &Config) -> Rows {
    let defaults = Config::default();
    let mut rows = Rows::new(&[
        ("key", Type::Text),
        ("value", Type::Text),
        ("default", Type::Text),
        ("changeable", Type::Text),
    ]);
    // PgBouncer's names first, in its units.
    for setting in LIVE {
        for name in setting.pgbouncer {
            rows.rows.push(vec![
                text(*name),
                text(pgbouncer_value(config, setting)),
                text(pgbouncer_value(&defaults, setting)),
                text("yes"),
            ]);
        }
    }
    let (host, port) = listen_addr_and_port(config);
    let (default_host, default_port) = listen_addr_and_port(&defaults);
    let fixed = [
        ("listen_addr", host, default_host),
        ("listen_port", port, default_port),
        (
            "admin_users",
            config.auth.admin_users.join(","),
            String::new(),
        ),
        (
            "auth_type",
            config.auth.method.as_str().to_owned(),
            defaults.auth.method.as_str().to_owned(),
        ),
        (
            "stats_period",
            STATS_PERIOD_SECONDS.to_owned(),
            STATS_PERIOD_SECONDS.to_owned(),
        ),
    ];
    for (key, value, default) in fixed {
        rows.rows
            .push(vec![text(key), text(value), text(default), text("no")]);
    }
    // Then pgmux's own keys.
    let default_of: HashMap<String, String> = settings_of(&defaults).into_iter().collect();
    for (key, value) in settings_of(config) {
        let default = default_of.get(&key).cloned().unwrap_or_default();
        let changeable = LIVE.iter().any(|l| l.key == key);
        rows.rows.push(vec![
            text(key),
            text(value),
            text(default),
            text(if changeable { "yes" } else { "no" }),
        ]);
    }
    rows
}

/// The first listen address' host(s) and port, as PgBouncer's `listen_addr` and
/// `listen_port`.
fn listen_addr_and_port(config: &Config) -> (String, String) {
    let hosts: Vec<String> = config
        .server
        .listen
        .iter()
        .map(|a| super::rows::split_addr(a).0)
        .collect();
    let port = config
        .server
        .listen
        .first()
        .map(|a| super::rows::split_addr(a).1)
        .unwrap_or_default();
    (hosts.join(","), port)
}

/// `section.key = value` pairs of the global sections, read back from the masked TOML.
pub fn settings_of(config: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    for line in config.masked().lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        if !matches!(section.as_str(), "server" | "auth" | "admin" | "pool") {
            continue;
        }
        if let Some((key, value)) = line.split_once(" = ") {
            let value = value.trim_matches('"').to_owned();
            out.push((format!("{section}.{key}"), value));
        }
    }
    out
}

/// A live setting's value in PgBouncer's units: whole or fractional seconds, 0/1.
fn pgbouncer_value(config: &Config, setting: &Live) -> String {
    let value = read(config, setting.key);
    match value {
        Value::Duration(d) => seconds(d),
        Value::Bool(b) => u8::from(b).to_string(),
        Value::Count(n) => n.to_string(),
        Value::Mode(m) => m.as_str().to_owned(),
        Value::Text(s) => s,
    }
}

fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}", d.as_secs_f64())
    }
}

/// A setting's value, typed.
#[derive(Debug, PartialEq)]
enum Value {
    Count(u64),
    Duration(Duration),
    Bool(bool),
    Mode(PoolMode),
    Text(String),
}

fn read(c: &Config, key: &str) -> Value {
    let p = &c.pool;
    match key {
        "server.max_client_conn" => Value::Count(c.server.max_client_conn as u64),
        "server.client_login_timeout" => Value::Duration(c.server.client_login_timeout),
        "server.shutdown_timeout" => Value::Duration(c.server.shutdown_timeout),
        "pool.size" => Value::Count(p.size.into()),
        "pool.min_size" => Value::Count(p.min_size.into()),
        "pool.mode" => Value::Mode(p.mode),
        "pool.wait_timeout" => Value::Duration(p.wait_timeout),
        "pool.idle_timeout" => Value::Duration(p.idle_timeout),
        "pool.max_lifetime" => Value::Duration(p.max_lifetime),
        "pool.connect_timeout" => Value::Duration(p.connect_timeout),
        "pool.idle_transaction_timeout" => Value::Duration(p.idle_transaction_timeout),
        "pool.query_timeout" => Value::Duration(p.query_timeout),
        "pool.server_reset_query" => Value::Text(p.server_reset_query.clone()),
        "pool.max_prepared_statements" => Value::Count(p.max_prepared_statements.into()),
        "pool.max_db_connections" => Value::Count(p.limits.max_db_connections.into()),
        "pool.max_user_connections" => Value::Count(p.limits.max_user_connections.into()),
        "pool.max_db_client_connections" => Value::Count(p.limits.max_db_client_connections.into()),
        "pool.max_user_client_connections" => {
            Value::Count(p.limits.max_user_client_connections.into())
        }
        "admin.log_connections" => Value::Bool(c.admin.log_connections),
        "admin.log_slow_waits" => Value::Duration(c.admin.log_slow_waits),
        // Every key of LIVE is above; the unit test walks them.
        _ => Value::Text(String::new()),
    }
}

fn write(c: &mut Config, key: &str, value: Value) -> Result<(), String> {
    let p = &mut c.pool;
    let count32 = |n: u64| u32::try_from(n).map_err(|_| format!("{n} is too large"));
    match (key, value) {
        ("server.max_client_conn", Value::Count(n)) => {
            c.server.max_client_conn = usize::try_from(n).map_err(|_| "too large".to_owned())?
        }
        ("server.client_login_timeout", Value::Duration(d)) => c.server.client_login_timeout = d,
        ("server.shutdown_timeout", Value::Duration(d)) => c.server.shutdown_timeout = d,
        ("pool.size", Value::Count(n)) => p.size = count32(n)?,
        ("pool.min_size", Value::Count(n)) => p.min_size = count32(n)?,
        ("pool.mode", Value::Mode(m)) => p.mode = m,
        ("pool.wait_timeout", Value::Duration(d)) => p.wait_timeout = d,
        ("pool.idle_timeout", Value::Duration(d)) => p.idle_timeout = d,
        ("pool.max_lifetime", Value::Duration(d)) => p.max_lifetime = d,
        ("pool.connect_timeout", Value::Duration(d)) => p.connect_timeout = d,
        ("pool.idle_transaction_timeout", Value::Duration(d)) => p.idle_transaction_timeout = d,
        ("pool.query_timeout", Value::Duration(d)) => p.query_timeout = d,
        ("pool.server_reset_query", Value::Text(s)) => p.server_reset_query = s,
        ("pool.max_prepared_statements", Value::Count(n)) => {
            p.max_prepared_statements = count32(n)?
        }
        ("pool.max_db_connections", Value::Count(n)) => p.limits.max_db_connections = count32(n)?,
        ("pool.max_user_connections", Value::Count(n)) => {
            p.limits.max_user_connections = count32(n)?
        }
        ("pool.max_db_client_connections", Value::Count(n)) => {
            p.limits.max_db_client_connections = count32(n)?
        }
        ("pool.max_user_client_connections", Value::Count(n)) => {
            p.limits.max_user_client_connections = count32(n)?
        }
        ("admin.log_connections", Value::Bool(b)) => c.admin.log_connections = b,
        ("admin.log_slow_waits", Value::Duration(d)) => c.admin.log_slow_waits = d,
        (key, _) => return Err(format!("{key} cannot be set")),
    }
    Ok(())
}

/// A `SET` the console parsed: the pgmux key and its new value.
#[derive(Debug, PartialEq)]
pub struct Change {
    /// pgmux's key (`pool.size`), whichever name the operator used.
    pub key: &'static str,
    value: Value,
    /// The value as the operator wrote it, unquoted (for the log and the notice).
    pub written: String,
}

/// Parses the `key = value` (or `key TO value`) after `SET`.
pub fn parse(assignment: &str) -> Result<Change, PgError> {
    let (name, raw) = split_assignment(assignment)
        .ok_or_else(|| ClientError::ConsoleUnknownCommand(format!("SET {assignment}")).error())?;
    let lower = name.to_ascii_lowercase();
    let (live, pgbouncer_name) = if let Some(l) = LIVE.iter().find(|l| l.key == lower) {
        (l, false)
    } else if let Some(l) = LIVE.iter().find(|l| l.pgbouncer.contains(&lower.as_str())) {
        (l, true)
    } else if settings_of(&Config::default())
        .iter()
        .any(|(k, _)| *k == lower)
        || [
            "listen_addr",
            "listen_port",
            "admin_users",
            "auth_type",
            "stats_period",
        ]
        .contains(&lower.as_str())
    {
        return Err(ClientError::ConsoleSettingNotLive(name.to_owned()).error());
    } else {
        return Err(ClientError::ConsoleUnknownSetting(name.to_owned()).error());
    };
    let written = unquote(raw);
    let refuse = |why: String| ClientError::ConsoleSetRefused(format!("{name}: {why}")).error();
    let value = match live.kind {
        Kind::Count => Value::Count(
            written
                .parse::<u64>()
                .map_err(|_| refuse(format!("\"{written}\" is not a whole number")))?,
        ),
        Kind::Duration => Value::Duration(duration(&written, pgbouncer_name).map_err(refuse)?),
        Kind::Bool => Value::Bool(match written.to_ascii_lowercase().as_str() {
            "1" | "on" | "true" | "yes" => true,
            "0" | "off" | "false" | "no" => false,
            _ => return Err(refuse(format!("\"{written}\" is not 0 or 1"))),
        }),
        Kind::Mode => Value::Mode(match written.to_ascii_lowercase().as_str() {
            "session" => PoolMode::Session,
            "transaction" => PoolMode::Transaction,
            "statement" => PoolMode::Statement,
            _ => {
                return Err(refuse(format!(
                    "\"{written}\" is not session, transaction or statement"
                )));
            }
        }),
        Kind::Text => Value::Text(written.clone()),
    };
    Ok(Change {
        key: live.key,
        value,
        written,
    })
}

/// A duration as SET takes it: `0`, pgmux's `"5s"`, `"250ms"`, or for PgBouncer's names a
/// bare number of seconds, as PgBouncer takes it.
fn duration(written: &str, seconds_by_default: bool) -> Result<Duration, String> {
    let w = written.trim();
    if w == "0" {
        return Ok(Duration::ZERO);
    }
    if seconds_by_default && let Ok(s) = w.parse::<f64>() {
        return Duration::try_from_secs_f64(s).map_err(|_| format!("\"{w}\" is not a duration"));
    }
    if w.starts_with('-') {
        return Err("must not be negative".to_owned());
    }
    humantime::parse_duration(w)
        .map_err(|e| format!("invalid duration \"{w}\": {e}; write e.g. \"250ms\" or \"5s\""))
}

/// `key = value` or `key TO value`.
fn split_assignment(s: &str) -> Option<(&str, &str)> {
    if let Some((k, v)) = s.split_once('=') {
        let k = k.trim();
        return (!k.is_empty() && !k.contains(char::is_whitespace)).then_some((k, v.trim()));
    }
    let mut words = s.splitn(3, char::is_whitespace);
    let (k, to, v) = (words.next()?, words.next()?, words.next()?);
    to.eq_ignore_ascii_case("to").then_some((k, v.trim()))
}

/// A value without its quotes: `'it''s'` is `it's`, `"x"` is `x`.
fn unquote(raw: &str) -> String {
    let raw = raw.trim();
    if let Some(inner) = raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return inner.replace("''", "'");
    }
    if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return inner.to_owned();
    }
    raw.to_owned()
}

/// `config` with `change` made, checked as a config file is; every problem otherwise.
pub fn changed(config: &Config, change: Change) -> Result<Config, String> {
    let mut edited = config.clone();
    write(&mut edited, change.key, change.value).map_err(|e| format!("{}: {e}", change.key))?;
    edited.checked("SET").map_err(|e| {
        let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        problems.join("; ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_key_reads_and_writes() {
        let mut config = Config::default();
        for l in LIVE {
            let value = read(&config, l.key);
            write(&mut config, l.key, value).unwrap_or_else(|e| panic!("{}: {e}", l.key));
            assert!(
                settings_of(&Config::default())
                    .iter()
                    .any(|(k, _)| k == l.key),
                "{} is no key of the config file",
                l.key
            );
        }
    }

    #[test]
    fn set_takes_either_name_and_pgbouncer_units() {
        let c = parse("default_pool_size = 7").expect("parses");
        assert_eq!((c.key, &c.value), ("pool.size", &Value::Count(7)));
        let c = parse("server_idle_timeout = 600").expect("parses");
        assert_eq!(c.value, Value::Duration(Duration::from_secs(600)));
        let c = parse("pool.wait_timeout = '250ms'").expect("parses");
        assert_eq!(c.value, Value::Duration(Duration::from_millis(250)));
        let c = parse("server_reset_query TO 'SELECT ''x'''").expect("parses");
        assert_eq!(c.value, Value::Text("SELECT 'x'".into()));
        let c = parse("log_connections = 0").expect("parses");
        assert_eq!(c.value, Value::Bool(false));
        assert!(parse("pool.wait_timeout = 5").is_err()); // pgmux's names need a unit
        assert!(parse("nonsense = 1").is_err());
        assert!(parse("server.listen = '0.0.0.0:1'").is_err());
        assert!(parse("pool.size = many").is_err());
    }

    #[test]
    fn a_change_is_checked_like_a_file() {
        let config = Config::default();
        let ok = changed(&config, parse("pool.size = 5").expect("parses")).expect("valid");
        assert_eq!(ok.pool.size, 5);
        assert!(changed(&config, parse("pool.size = 0").expect("parses")).is_err());
        assert!(changed(&config, parse("pool.min_size = 99").expect("parses")).is_err());
    }
}
