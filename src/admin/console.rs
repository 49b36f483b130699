//! The PgBouncer-style admin console on the client port: `psql -p 6432 -U admin pgbouncer`
//! (the database name `pgmux` works too). Only `auth.admin_users` may use it.
//!
//! It speaks the simple query protocol only: `SHOW POOLS | CLIENTS | SERVERS | STATS |
//! DATABASES | USERS | LISTS | CONFIG | VERSION | HELP`, `RELOAD`, and `PAUSE`, `RESUME`,
//! `RECONNECT` with an optional database name. Results use PgBouncer's column names where
//! they mean the same, so dashboards and exporters written for PgBouncer keep working;
//! pgmux-only columns come after them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::protocol::write::{cstr, message};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;
use tracing::{debug, info};

use super::views;
use crate::client::ClientError;
use crate::clients::ClientState;
use crate::config::Config;
use crate::logging::Escaped;
use crate::pool::Pool;
use crate::pooler::Pooler;
use crate::protocol::{MessageCodec, PgError, ProtocolError, read_cstr, tag, write};

/// The database names that open the console instead of a pool.
pub const CONSOLE_DATABASES: [&str; 2] = ["pgbouncer", "pgmux"];

/// Whether a client asking for `database` wants the console. These names need no
/// `[databases]` entry.
pub fn is_console_database(database: &str) -> bool {
    CONSOLE_DATABASES.contains(&database)
}

/// Refuses (28000) a user not listed in `auth.admin_users`.
pub fn admit(config: &Config, user: &str) -> Result<(), PgError> {
    if config.auth.admin_users.iter().any(|u| u == user) {
        return Ok(());
    }
    Err(ClientError::NotAdmin(user.to_owned()).fatal())
}

/// Serves the console to a client that pgmux authenticated and sent AuthenticationOk.
/// `cbuf` holds any bytes read after the login. Ends when the client leaves or pgmux stops.
pub async fn serve(
    mut socket: crate::client::ClientStream,
    pooler: Arc<Pooler>,
    user: String,
    mut cbuf: BytesMut,
) {
    let peer = socket.tcp().and_then(|s| s.peer_addr().ok());
    info!(?peer, user = %Escaped(&user), "admin console connected");
    let mut out = BytesMut::new();
    greet(&mut out);
    if socket.write_all(&out).await.is_err() {
        return;
    }
    let mut console = Console {
        pooler,
        skip_until_sync: false,
    };
    let mut codec = MessageCodec::default();
    loop {
        out.clear();
        let mut done = false;
        loop {
            let frame = match codec.decode(&mut cbuf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    ClientError::Protocol(e).fatal().write(&mut out);
                    done = true;
                    break;
                }
            };
            if !frame.is_whole() {
                ClientError::ConsoleCommandTooLong.fatal().write(&mut out);
                done = true;
                break;
            }
            if frame.tag == tag::TERMINATE {
                done = true;
                break;
            }
            console.message(frame.tag, frame.body(), &mut out).await;
        }
        if !out.is_empty() && socket.write_all(&out).await.is_err() {
            break;
        }
        if done {
            break;
        }
        cbuf.reserve(8 * 1024);
        let read = tokio::select! {
            read = socket.read_buf(&mut cbuf) => read,
            _ = console.pooler.stop.cancelled() => {
                let mut bye = BytesMut::new();
                ClientError::ShuttingDown.fatal().write(&mut bye);
                let _ = socket.write_all(&bye).await;
                break;
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = socket.shutdown().await;
    info!(?peer, user = %Escaped(&user), "admin console disconnected");
}

/// The ParameterStatus set, a BackendKeyData and ReadyForQuery.
fn greet(out: &mut BytesMut) {
    let version = format!("16.0 (pgmux {})", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgmux"),
    ] {
        write::parameter_status(out, name, value);
    }
    // The console runs nothing a CancelRequest could stop; the key only completes the greeting.
    write::backend_key_data(out, 0, rand::random());
    write::ready_for_query(out, b'I');
}

struct Console {
    pooler: Arc<Pooler>,
    /// After refusing an extended-protocol message, drop messages up to the next Sync.
    skip_until_sync: bool,
}

/// A result set: column names and types, then rows of text values (`None` = NULL).
struct Rows {
    columns: Vec<(&'static str, Type)>,
    rows: Vec<Vec<Option<String>>>,
}

/// The columns PgBouncer's SHOW CLIENTS and SHOW SERVERS share, in its order.
const LINK_COLUMNS: &[(&str, Type)] = &[
    ("type", Type::Text),
    ("user", Type::Text),
    ("database", Type::Text),
    ("state", Type::Text),
    ("addr", Type::Text),
    ("port", Type::Int),
    ("connect_time", Type::Text),
    ("request_time", Type::Text),
    ("wait", Type::Int),
    ("wait_us", Type::Int),
    ("link", Type::Text),
    ("remote_pid", Type::Int),
    ("tls", Type::Text),
    ("application_name", Type::Text),
    ("id", Type::Int),
];

#[derive(Clone, Copy)]
enum Type {
    Text,
    Int,
    Float,
}

impl Console {
    async fn message(&mut self, t: u8, body: &[u8], out: &mut BytesMut) {
        match t {
            tag::QUERY => {
                let sql = read_cstr(body).map(|(s, _)| s).unwrap_or_default();
                self.query(sql, out).await;
                write::ready_for_query(out, b'I');
            }
            tag::SYNC => {
                self.skip_until_sync = false;
                write::ready_for_query(out, b'I');
            }
            tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::FLUSH
            | tag::FUNCTION_CALL => {
                if !self.skip_until_sync {
                    ClientError::ConsoleExtendedProtocol.error().write(out);
                }
                if t == tag::FUNCTION_CALL {
                    write::ready_for_query(out, b'I');
                } else {
                    self.skip_until_sync = true;
                }
            }
            other => {
                let unknown = ProtocolError::UnknownType { byte: other };
                ClientError::Protocol(unknown).error().write(out);
            }
        }
    }

    /// Answers every `;`-separated command of one Query message.
    async fn query(&mut self, sql: &str, out: &mut BytesMut) {
        let commands: Vec<&str> = sql
            .split(';')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if commands.is_empty() {
            empty_query(out);
            return;
        }
        for command in commands {
            debug!(command = %Escaped(command), "admin console command");
            if let Err(e) = self.command(command, out).await {
                e.write(out);
                return; // like a server: an error ends the rest of the Query
            }
        }
    }

    async fn command(&mut self, command: &str, out: &mut BytesMut) -> Result<(), PgError> {
        let words: Vec<&str> = command.split_whitespace().collect();
        let verb = words
            .first()
            .map(|w| w.to_ascii_uppercase())
            .unwrap_or_default();
        let arg = words.get(1).map(|w| w.trim_matches('"'));
        match (verb.as_str(), words.len()) {
            ("SHOW", 2) => {
                let what = words
                    .get(1)
                    .map(|w| w.to_ascii_uppercase())
                    .unwrap_or_default();
                let rows = match what.as_str() {
                    "POOLS" => self.pools(),
                    "CLIENTS" => self.clients(),
                    "SERVERS" => self.servers(),
                    "STATS" => self.stats(),
                    "DATABASES" => self.databases(),
                    "USERS" => self.users(),
                    "LISTS" => self.lists(),
                    "CONFIG" => self.config(),
                    "VERSION" => Rows {
                        columns: vec![("version", Type::Text)],
                        rows: vec![vec![Some(format!("pgmux {}", env!("CARGO_PKG_VERSION")))]],
                    },
                    "HELP" => {
                        notice(out, HELP);
                        complete(out, "SHOW");
                        return Ok(());
                    }
                    _ => return Err(unknown(command)),
                };
                rows.write(out);
                complete(out, "SHOW");
            }
            ("RELOAD", 1) => {
                let pooler = self.pooler.clone();
                let result = tokio::task::spawn_blocking(move || pooler.reload())
                    .await
                    .map_err(|e| ClientError::ReloadFailed(e.to_string()).error())?;
                match result {
                    Ok(changes) => {
                        let text = if changes.is_empty() {
                            "config reloaded: nothing changed".to_owned()
                        } else {
                            format!("config reloaded:\n{}", changes.join("\n"))
                        };
                        notice(out, &text);
                        complete(out, "RELOAD");
                    }
                    Err(e) => {
                        let problems = e.problems().join("\n");
                        return Err(ClientError::ReloadRefused(problems).error());
                    }
                }
            }
            ("PAUSE" | "RESUME" | "RECONNECT", 1 | 2) => {
                let pools = self.matching(arg)?;
                match verb.as_str() {
                    "PAUSE" => {
                        let waits = pools.iter().map(|p| super::pause(p));
                        let drained = futures_util::future::join_all(waits).await;
                        let busy: usize = pools
                            .iter()
                            .zip(drained)
                            .filter(|(_, done)| !done)
                            .map(|(p, _)| p.view().active)
                            .sum();
                        if busy > 0 {
                            notice(
                                out,
                                &format!(
                                    "paused; {busy} transactions still running: new ones wait until RESUME"
                                ),
                            );
                        }
                    }
                    "RESUME" => pools.iter().for_each(|p| p.resume()),
                    _ => pools.iter().for_each(|p| p.reconnect()),
                }
                info!(command = %Escaped(command), pools = pools.len(), "admin console action");
                complete(out, &verb);
            }
            _ => return Err(unknown(command)),
        }
        Ok(())
    }

    /// The pools of `database`, or every pool. A configured database with no pool yet
    /// matches nothing; an unknown one is an error.
    fn matching(&self, database: Option<&str>) -> Result<Vec<Arc<Pool>>, PgError> {
        let pools = self.pooler.pools();
        let Some(db) = database else {
            return Ok(pools);
        };
        if !self.pooler.snapshot().config.databases.contains_key(db) {
            return Err(ClientError::UnknownDatabase(db.to_owned()).error());
        }
        Ok(pools.into_iter().filter(|p| p.key.database == db).collect())
    }

    fn pools(&self) -> Rows {
        let clients = self.pooler.clients_registry.counts();
        let columns = vec![
            ("database", Type::Text),
            ("user", Type::Text),
            ("cl_active", Type::Int),
            ("cl_waiting", Type::Int),
            ("cl_active_cancel_req", Type::Int),
            ("cl_waiting_cancel_req", Type::Int),
            ("sv_active", Type::Int),
            ("sv_active_cancel", Type::Int),
            ("sv_being_canceled", Type::Int),
            ("sv_idle", Type::Int),
            ("sv_used", Type::Int),
            ("sv_tested", Type::Int),
            ("sv_login", Type::Int),
            ("maxwait", Type::Int),
            ("maxwait_us", Type::Int),
            ("pool_mode", Type::Text),
            ("pool_size", Type::Int),
            ("utilization_percent", Type::Float),
            ("status", Type::Text),
            ("paused", Type::Int),
        ];
        let rows = views::pools(&self.pooler)
            .into_iter()
            .map(|p| {
                let key = (p.database.clone(), p.user.clone());
                let counts = clients.get(&key).copied().unwrap_or_default();
                let logged_in: u64 = counts.iter().sum();
                let waiting = counts
                    .get(ClientState::Waiting as usize)
                    .copied()
                    .unwrap_or_default()
                    .max(p.waiting as u64);
                let wait = Duration::from_millis(p.oldest_wait_ms);
                vec![
                    Some(p.database),
                    Some(p.user),
                    int(logged_in.saturating_sub(waiting)),
                    int(waiting),
                    int(0),
                    int(0),
                    int(p.active),
                    int(0),
                    int(0),
                    int(p.idle),
                    int(0),
                    int(0),
                    int(p.connecting),
                    int(wait.as_secs()),
                    int(wait.subsec_micros()),
                    Some(p.mode.to_owned()),
                    int(p.size),
                    Some(p.utilization_percent.to_string()),
                    Some(p.status.to_owned()),
                    int(u8::from(p.paused)),
                ]
            })
            .collect();
        Rows { columns, rows }
    }

    fn clients(&self) -> Rows {
        let mut columns = LINK_COLUMNS.to_vec();
        columns.extend([
            ("activity", Type::Text),
            ("activity_ms", Type::Int),
            ("in_transaction", Type::Text),
            ("query", Type::Text),
            ("session_state", Type::Text),
            ("session_state_statement", Type::Text),
        ]);
        let rows = views::clients(&self.pooler)
            .into_iter()
            .map(|c| {
                let waiting = c.state == ClientState::Waiting.as_str();
                let wait = Duration::from_millis(if waiting { c.state_ms } else { 0 });
                let (addr, port) = split_addr(&c.addr);
                vec![
                    Some("C".to_owned()),
                    Some(c.user),
                    Some(c.database),
                    Some(if waiting { "waiting" } else { "active" }.to_owned()),
                    Some(addr),
                    Some(port),
                    Some(timestamp_ago(c.connected_ms)),
                    Some(timestamp_ago(c.state_ms)),
                    int(wait.as_secs()),
                    int(wait.subsec_micros()),
                    c.server.as_ref().map(|s| s.id.to_string()),
                    int(0),
                    Some(c.tls.as_deref().unwrap_or_default().to_owned()),
                    Some(c.application_name),
                    int(c.id),
                    Some(c.state.to_owned()),
                    int(c.state_ms),
                    Some(c.in_transaction.to_string()),
                    c.query,
                    c.session_state.as_ref().map(|e| {
                        let now = if e.pinned { " (pinned)" } else { "" };
                        format!("{} {}{now}", e.action, e.kinds.join(","))
                    }),
                    c.session_state.map(|e| e.statement),
                ]
            })
            .collect();
        Rows { columns, rows }
    }

    fn servers(&self) -> Rows {
        let mut columns = LINK_COLUMNS.to_vec();
        columns.extend([
            ("held_ms", Type::Int),
            ("in_transaction", Type::Text),
            ("query", Type::Text),
        ]);
        let rows = views::servers(&self.pooler)
            .into_iter()
            .map(|s| {
                let (addr, port) = split_addr(&s.upstream);
                let in_state = s.held_ms.or(s.idle_ms).unwrap_or(0);
                vec![
                    Some("S".to_owned()),
                    Some(s.user),
                    Some(s.database),
                    Some(s.state.to_owned()),
                    Some(addr),
                    Some(port),
                    Some(timestamp_ago(s.age_ms)),
                    Some(timestamp_ago(in_state)),
                    int(0),
                    int(0),
                    s.client.as_ref().map(|c| c.id.to_string()),
                    int(s.pid),
                    Some(s.tls.unwrap_or_default()),
                    s.client.map(|c| c.application_name),
                    int(s.id),
                    s.held_ms.map(|ms| ms.to_string()),
                    Some(s.in_transaction.to_string()),
                    s.query,
                ]
            })
            .collect();
        Rows { columns, rows }
    }

    /// Totals per database (summed over its users), as PgBouncer's SHOW STATS.
    fn stats(&self) -> Rows {
        #[derive(Default)]
        struct Totals {
            assignments: u64,
            xacts: u64,
            queries: u64,
            received: u64,
            sent: u64,
            xact_us: f64,
            wait_us: f64,
        }
        let mut by_db: HashMap<String, Totals> = HashMap::new();
        for pool in self.pooler.pools() {
            use std::sync::atomic::Ordering::Relaxed;
            let s = &pool.stats;
            let t = by_db.entry(pool.key.database.clone()).or_default();
            t.assignments += s.checkouts.load(Relaxed);
            t.xacts += s.transactions.load(Relaxed);
            t.queries += s.queries.load(Relaxed);
            t.received += s.bytes_received.load(Relaxed);
            t.sent += s.bytes_sent.load(Relaxed);
            t.xact_us += s.transaction.snapshot().sum_seconds * 1e6;
            t.wait_us += s.wait.snapshot().sum_seconds * 1e6;
        }
        let mut dbs: Vec<(String, Totals)> = by_db.into_iter().collect();
        dbs.sort_by(|a, b| a.0.cmp(&b.0));
        let columns = vec![
            ("database", Type::Text),
            ("total_server_assignment_count", Type::Int),
            ("total_xact_count", Type::Int),
            ("total_query_count", Type::Int),
            ("total_received", Type::Int),
            ("total_sent", Type::Int),
            ("total_xact_time", Type::Int),
            ("total_wait_time", Type::Int),
        ];
        let rows = dbs
            .into_iter()
            .map(|(db, t)| {
                vec![
                    Some(db),
                    int(t.assignments),
                    int(t.xacts),
                    int(t.queries),
                    int(t.received),
                    int(t.sent),
                    int(t.xact_us as u64),
                    int(t.wait_us as u64),
                ]
            })
            .collect();
        Rows { columns, rows }
    }

    fn databases(&self) -> Rows {
        let snapshot = self.pooler.snapshot();
        let pools = self.pooler.pools();
        let columns = vec![
            ("name", Type::Text),
            ("host", Type::Text),
            ("port", Type::Int),
            ("database", Type::Text),
            ("force_user", Type::Text),
            ("pool_size", Type::Int),
            ("min_pool_size", Type::Int),
            ("reserve_pool", Type::Int),
            ("pool_mode", Type::Text),
            ("max_connections", Type::Int),
            ("current_connections", Type::Int),
            ("paused", Type::Int),
            ("disabled", Type::Int),
        ];
        let rows = snapshot
            .config
            .databases
            .iter()
            .map(|(name, db)| {
                let mut settings = snapshot.config.pool.clone();
                settings.apply(&db.overrides);
                let mine: Vec<&Arc<Pool>> =
                    pools.iter().filter(|p| p.key.database == *name).collect();
                let open: u32 = mine.iter().map(|p| p.counts().0).sum();
                let paused = !mine.is_empty() && mine.iter().all(|p| p.is_paused());
                vec![
                    Some(name.clone()),
                    Some(db.host.clone()),
                    int(db.port),
                    Some(db.upstream_dbname(name).to_owned()),
                    db.user.clone(),
                    int(settings.size),
                    int(settings.min_size),
                    int(0),
                    Some(settings.mode.as_str().to_owned()),
                    int(0),
                    int(open),
                    int(u8::from(paused)),
                    int(0),
                ]
            })
            .collect();
        Rows { columns, rows }
    }

    fn users(&self) -> Rows {
        let snapshot = self.pooler.snapshot();
        let rows = snapshot
            .config
            .users
            .iter()
            .map(|(name, user)| vec![Some(name.clone()), user.mode.map(|m| m.as_str().to_owned())])
            .collect();
        Rows {
            columns: vec![("name", Type::Text), ("pool_mode", Type::Text)],
            rows,
        }
    }

    fn lists(&self) -> Rows {
        let snapshot = self.pooler.snapshot();
        let pools = self.pooler.pools();
        let (mut idle, mut active) = (0usize, 0usize);
        for p in &pools {
            let v = p.view();
            idle += v.idle;
            active += v.active;
        }
        let logged_in = self.pooler.clients_registry.len();
        let connections = self
            .pooler
            .clients
            .load(std::sync::atomic::Ordering::Relaxed);
        let items = [
            ("databases", snapshot.config.databases.len()),
            ("users", snapshot.config.users.len()),
            ("pools", pools.len()),
            ("used_clients", logged_in),
            ("login_clients", connections.saturating_sub(logged_in)),
            ("free_servers", idle),
            ("used_servers", active),
        ];
        Rows {
            columns: vec![("list", Type::Text), ("items", Type::Int)],
            rows: items
                .iter()
                .map(|(name, n)| vec![Some((*name).to_owned()), int(*n)])
                .collect(),
        }
    }

    /// `[server]`, `[auth]`, `[admin]` and `[pool]` keys, secrets masked.
    fn config(&self) -> Rows {
        let current = settings_of(&self.pooler.snapshot().config);
        let defaults: HashMap<String, String> =
            settings_of(&Config::default()).into_iter().collect();
        let rows = current
            .into_iter()
            .map(|(key, value)| {
                let restart = key == "server.listen" || key == "admin.listen";
                let default = defaults.get(&key).cloned().unwrap_or_default();
                let changeable = if restart { "no" } else { "yes" };
                vec![
                    Some(key),
                    Some(value),
                    Some(default),
                    Some(changeable.to_owned()),
                ]
            })
            .collect();
        Rows {
            columns: vec![
                ("key", Type::Text),
                ("value", Type::Text),
                ("default", Type::Text),
                ("changeable", Type::Text),
            ],
            rows,
        }
    }
}

/// `section.key = value` pairs of the global sections, read back from the masked TOML.
fn settings_of(config: &Config) -> Vec<(String, String)> {
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

const HELP: &str = "pgmux admin console commands:
  SHOW POOLS | CLIENTS | SERVERS | STATS | DATABASES | USERS | LISTS | CONFIG | VERSION | HELP
  RELOAD                 read the config file again (nothing changes if it has problems)
  PAUSE [db]             finish running transactions, hold new ones, close server connections
  RESUME [db]            let held clients through
  RECONNECT [db]         replace every server connection once it is idle";

fn unknown(command: &str) -> PgError {
    ClientError::ConsoleUnknownCommand(command.to_owned()).error()
}

fn int(n: impl ToString) -> Option<String> {
    Some(n.to_string())
}

/// `host`, `port` from `host:port` (or `[v6]:port`).
fn split_addr(addr: &str) -> (String, String) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.trim_matches(['[', ']']).to_owned(), port.to_owned()),
        None => (addr.to_owned(), "0".to_owned()),
    }
}

/// The wall-clock time `ms` milliseconds ago, RFC 3339 in UTC.
fn timestamp_ago(ms: u64) -> String {
    let at = SystemTime::now()
        .checked_sub(Duration::from_millis(ms))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_seconds(at).to_string()
}

impl Rows {
    fn write(&self, out: &mut BytesMut) {
        message(out, b'T', |b| {
            b.put_i16(self.columns.len() as i16);
            for (name, ty) in &self.columns {
                cstr(b, name);
                b.put_i32(0); // table oid
                b.put_i16(0); // column number
                let (oid, len) = match ty {
                    Type::Text => (25, -1),
                    Type::Int => (20, 8),
                    Type::Float => (701, 8),
                };
                b.put_i32(oid);
                b.put_i16(len);
                b.put_i32(-1); // type modifier
                b.put_i16(0); // text format
            }
        });
        for row in &self.rows {
            message(out, b'D', |b| {
                b.put_i16(row.len() as i16);
                for value in row {
                    match value {
                        Some(v) => {
                            b.put_i32(v.len() as i32);
                            b.put_slice(v.as_bytes());
                        }
                        None => b.put_i32(-1),
                    }
                }
            });
        }
    }
}

fn complete(out: &mut BytesMut, tag: &str) {
    message(out, b'C', |b| cstr(b, tag));
}

fn empty_query(out: &mut BytesMut) {
    message(out, b'I', |_| {});
}

fn notice(out: &mut BytesMut, text: &str) {
    message(out, b'N', |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "00000"),
            (b'M', text),
        ] {
            b.put_u8(field);
            cstr(b, value);
        }
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rows_are_masked_and_flat() {
        let config = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:9930\"\ntoken = \"s3cret\"\n[pool]\nsize = 7\n",
            "t.toml",
        )
        .expect("valid");
        let settings = settings_of(&config);
        let get = |k: &str| {
            settings
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("pool.size"), Some("7"));
        assert_eq!(get("admin.listen"), Some("127.0.0.1:9930"));
        assert_eq!(get("admin.token"), Some(crate::config::MASK));
        assert!(settings.iter().all(|(_, v)| !v.contains("s3cret")));
    }

    #[test]
    fn addresses_split() {
        assert_eq!(
            split_addr("127.0.0.1:5432"),
            ("127.0.0.1".into(), "5432".into())
        );
        assert_eq!(split_addr("[::1]:6432"), ("::1".into(), "6432".into()));
    }
}
