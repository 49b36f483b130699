//! The PgBouncer-style admin console on the client port: `psql -p 6432 -U admin pgbouncer`
//! (the database name `pgmux` works too). Only `auth.admin_users` may use it.
//!
//! It speaks the simple query protocol only, and answers PgBouncer 1.25's commands with
//! its columns, in its order and with its types (PgBouncer's doc/usage.md, checked against
//! its src/admin.c and src/stats.c at tag pgbouncer_1_25_2), so that dashboards, scripts
//! and exporters written for PgBouncer keep working; pgmux's own columns come after
//! PgBouncer's. `show.rs` and `stats.rs` answer SHOW, `settings.rs` SHOW CONFIG and SET,
//! `commands.rs` what changes something; `rows.rs` writes result sets.

mod commands;
mod rows;
mod settings;
mod show;
mod stats;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;
use tracing::{debug, info};

use crate::client::ClientError;
use crate::config::Config;
use crate::logging::Escaped;
use crate::pooler::Pooler;
use crate::protocol::{MessageCodec, PgError, ProtocolError, read_cstr, tag, write};
use commands::Shutdown;
use rows::{complete, empty_query, notice};
pub use stats::{STATS_PERIOD, StatsPeriod, tick_stats_period};

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
        let commands = split_commands(sql);
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
        let pooler = &self.pooler;
        match (verb.as_str(), words.len()) {
            ("SHOW", 2) => {
                let what = arg.map(|w| w.to_ascii_uppercase()).unwrap_or_default();
                let rows = match what.as_str() {
                    "STATS" => stats::per_database(pooler, stats::Which::Stats),
                    "STATS_TOTALS" => stats::per_database(pooler, stats::Which::Totals),
                    "STATS_AVERAGES" => stats::per_database(pooler, stats::Which::Averages),
                    "TOTALS" => stats::totals(pooler),
                    "CONFIG" => settings::show(&pooler.snapshot().config),
                    "HELP" => {
                        notice(out, HELP);
                        complete(out, "SHOW");
                        return Ok(());
                    }
                    other => show::show(pooler, other).ok_or_else(|| unknown(command))?,
                };
                rows.write(out);
                complete(out, "SHOW");
            }
            ("RELOAD", 1) => commands::reload(pooler, out).await?,
            ("SET", n) if n > 1 => {
                let assignment = command
                    .trim_start()
                    .get(3..)
                    .map(str::trim)
                    .unwrap_or_default();
                commands::set(pooler, assignment, out).await?;
            }
            ("PAUSE", 1 | 2) => commands::pause(pooler, arg, out).await?,
            ("RESUME", 1 | 2) => commands::resume(pooler, arg, out)?,
            ("RECONNECT", 1 | 2) => commands::reconnect(pooler, arg, out)?,
            ("KILL", 1 | 2) => commands::kill(pooler, arg, out)?,
            ("KILL_CLIENT", 2) => commands::kill_client(pooler, arg.unwrap_or_default(), out)?,
            ("DISABLE", 2) => commands::disable(pooler, arg.unwrap_or_default(), true, out)?,
            ("ENABLE", 2) => commands::disable(pooler, arg.unwrap_or_default(), false, out)?,
            ("WAIT_CLOSE", 1 | 2) => commands::wait_close(pooler, arg, out).await?,
            ("SHUTDOWN", 1 | 2) => {
                let how = match arg.map(|a| a.to_ascii_uppercase()).as_deref() {
                    None => Shutdown::Now,
                    Some("WAIT_FOR_SERVERS") => Shutdown::WaitForServers,
                    Some("WAIT_FOR_CLIENTS") => Shutdown::WaitForClients,
                    Some(_) => return Err(unknown(command)),
                };
                commands::shutdown(pooler, how, out);
            }
            _ => return Err(unknown(command)),
        }
        Ok(())
    }
}

/// The commands of a Query: split at `;` outside single and double quotes, trimmed,
/// empty ones dropped.
fn split_commands(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quote: Option<char> = None;
    let mut start = 0;
    for (i, ch) in sql.char_indices() {
        match (quote, ch) {
            (None, '\'' | '"') => quote = Some(ch),
            (Some(q), c) if c == q => quote = None,
            (None, ';') => {
                out.push(sql.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(sql.get(start..).unwrap_or_default());
    out.into_iter()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

const HELP: &str = "pgmux admin console commands (PgBouncer's):
  SHOW POOLS | CLIENTS | SERVERS | STATS | STATS_TOTALS | STATS_AVERAGES | TOTALS
  SHOW DATABASES | USERS | LISTS | CONFIG | STATE | MEM | SOCKETS | ACTIVE_SOCKETS
  SHOW FDS | PEERS | PEER_POOLS | DNS_HOSTS | DNS_ZONES | VERSION | HELP
  SET key = value        change a setting live (SHOW CONFIG: changeable = yes)
  RELOAD                 read the config file again (nothing changes if it has problems)
  PAUSE [db]             finish running transactions, hold new ones, close server connections
  RESUME [db]            let held clients through (after PAUSE or KILL)
  RECONNECT [db]         replace every server connection once it is idle
  WAIT_CLOSE [db]        wait until the servers RECONNECT (or a reload) marked are closed
  KILL [db]              end every client and server connection now; pause until RESUME
  KILL_CLIENT id         end one client now (the id of SHOW CLIENTS)
  DISABLE db / ENABLE db refuse new logins to db / let them in again
  SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]
                         stop now / when transactions end / when every client has left";

fn unknown(command: &str) -> PgError {
    ClientError::ConsoleUnknownCommand(command.to_owned()).error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_outside_quotes() {
        assert_eq!(
            split_commands(" SHOW POOLS; SET server_reset_query = 'DISCARD ALL; SELECT 1' ;;"),
            [
                "SHOW POOLS",
                "SET server_reset_query = 'DISCARD ALL; SELECT 1'"
            ]
        );
        assert!(split_commands(" ; ").is_empty());
        // An unclosed quote keeps the rest in one command (refused later, not a panic).
        assert_eq!(split_commands("SET a = 'x;y"), ["SET a = 'x;y"]);
    }

    #[test]
    fn config_rows_are_masked() {
        let config = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:9930\"\ntoken = \"s3cret\"\n[pool]\nsize = 7\n",
            "t.toml",
        )
        .expect("valid");
        let rows = settings::show(&config);
        let get = |k: &str| {
            rows.rows
                .iter()
                .find(|r| r.first().and_then(|v| v.as_deref()) == Some(k))
                .and_then(|r| r.get(1).cloned().flatten())
        };
        assert_eq!(get("pool.size").as_deref(), Some("7"));
        assert_eq!(get("default_pool_size").as_deref(), Some("7"));
        assert_eq!(get("admin.token").as_deref(), Some(crate::config::MASK));
        assert!(
            rows.rows
                .iter()
                .flatten()
                .all(|v| !v.as_deref().unwrap_or_default().contains("s3cret"))
        );
    }
}
