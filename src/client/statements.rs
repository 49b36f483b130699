//! The client messages that name prepared statements, rewritten so that named statements
//! work on whichever server connection the client holds (transaction and statement mode).
//! What the server's replies say about the statements it holds is in `from_server.rs`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::error::ClientError;
use super::params::{SessionChange, session_change};
use super::replies::{Effect, Kind};
use super::session::{Loop, Skip};
use crate::config::PoolMode;
use crate::logging::Escaped;
use crate::prepared::{
    Bind, Close, Describe, Parse, Statement, parse_message, rewrite_bind, rewrite_describe,
};
use crate::protocol::{Frame, read_cstr, tag, write};
use crate::server::TxStatus;

mod from_server;

/// Sent in place of a client's `DEALLOCATE name` of one of its statements: it does nothing,
/// and fails only where DEALLOCATE would (in a failed transaction).
const DEALLOCATE_IN_PLACE: &str = "DO $pgmux$ BEGIN END $pgmux$";

/// A Bind that fails on any server: it names the unnamed statement and ends before its
/// parameter formats (`26000` without an unnamed statement, `08P01` with one). Sent where a
/// client's Bind must fail as PostgreSQL would fail it, so that the server skips to the
/// next Sync and a transaction block fails, exactly as on a direct connection.
const FAILING_BIND: [u8; 7] = [b'B', 0, 0, 0, 6, 0, 0];

/// Whether `name` has the form of pgmux's own server-side statement names (`pgmux_s42`).
fn is_server_name(name: &str) -> bool {
    name.strip_prefix("pgmux_s")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A Query that makes the server raise `errcode` with `message` about `name`, one of
/// pgmux's own server-side names (only digits after the prefix: safe to quote), so that the
/// error and the transaction state the client sees are PostgreSQL's own.
fn server_raises(name: &str, errcode: &str, message: &str) -> String {
    debug_assert!(
        is_server_name(name),
        "only digits after the prefix: safe to quote"
    );
    format!(
        "DO $pgmux$ BEGIN RAISE EXCEPTION USING ERRCODE = '{errcode}', \
         MESSAGE = '{message}'; END $pgmux$"
    )
}

/// A DEALLOCATE of `name`, a server-side name of pgmux's that this client does not have:
/// PostgreSQL's own error for it, instead of deallocating a statement other clients use.
fn refuse_deallocate(name: &str) -> String {
    let message = format!("prepared statement \"{name}\" does not exist");
    server_raises(name, "invalid_sql_statement_name", &message)
}

/// A SQL-level PREPARE of a name of pgmux's own form: `42939 reserved_name`.
fn refuse_reserved_name(name: &str) -> String {
    let message = format!(
        "pgmux: prepared statement name \"{name}\" is reserved for pgmux''s own statements"
    );
    server_raises(name, "reserved_name", &message)
}

/// What the session does with one client message that may name a prepared statement or
/// change session state. Decided from the message and the client's names alone
/// ([`Loop::rewrite_query`], [`Loop::rewrite_extended`]); carried out by [`Loop::apply`],
/// the one place that changes the session's queues and maps.
pub(super) enum Rewrite {
    /// Send it as it came, expecting the replies of `Kind` (`None`: it has none, Flush).
    Forward(Option<Kind>),
    /// Send it as it came: a Query that changes session state if it succeeds outside a
    /// transaction.
    Watch(SessionChange),
    /// Send `message` in its place, expecting `kind`'s replies with `effect`; it names no
    /// statement.
    Replaced {
        message: BytesMut,
        kind: Kind,
        effect: Effect,
    },
    /// Send `message` in its place, expecting `kind`'s replies with `effect`; the server
    /// must hold `statement` first.
    Renamed {
        message: BytesMut,
        kind: Kind,
        effect: Effect,
        statement: Arc<Statement>,
    },
    /// The client's Parse of `statement` as `name`: prepared on the server, or answered
    /// here when the server already holds it.
    Parse {
        name: String,
        statement: Arc<Statement>,
    },
    /// The client's Close of its statement `name`: only its name goes; answered here.
    Close(String),
    /// An unnamed Parse of `DEALLOCATE client_name`, one of the client's statements: the
    /// name goes, and `message` (a Parse of `DEALLOCATE` of pgmux's copy) in its place.
    DeallocateByParse {
        message: BytesMut,
        client_name: String,
        statement: Arc<Statement>,
    },
    /// A Bind or Describe of a statement whose result type changed: the client gets the
    /// server's error (`ErrorResponse`, whole) in its place, and the server a Bind that
    /// fails, so that it skips to Sync as PostgreSQL does after that error.
    ResultTypeChanged(Bytes),
    /// Refused here: the error in its turn, then everything up to the next Sync is skipped.
    Refuse(ClientError),
}

impl Loop<'_> {
    /// Whether named statements are mapped to pgmux's server-side names.
    fn tracks_statements(&self) -> bool {
        self.s.max_prepared > 0 && self.s.mode != PoolMode::Session
    }

    /// A simple Query, watched for the few statements that change session state.
    pub(super) fn rewrite_query(&self, frame: &Frame) -> Rewrite {
        let change = if frame.is_whole() && self.s.mode != PoolMode::Session {
            session_change(frame.body())
        } else {
            None
        };
        match change {
            Some(SessionChange::Deallocate(name)) if self.tracks_statements() => {
                match self.statements.get(&name).cloned() {
                    // Only the client's name goes, as for a Close: the server's copy stays
                    // for other clients. The server runs a statement that does nothing
                    // (so that the transaction state is PostgreSQL's own), whose command
                    // tag becomes DEALLOCATE (on_statement_reply).
                    Some(statement) => {
                        let mut message = BytesMut::new();
                        write::query(&mut message, DEALLOCATE_IN_PLACE);
                        Rewrite::Replaced {
                            message,
                            kind: Kind::Query,
                            effect: Effect::Deallocate {
                                client_name: name,
                                statement,
                            },
                        }
                    }
                    // Another client's statement, on this server or not: the client gets
                    // what PostgreSQL answers for a name it does not have.
                    None if is_server_name(&name) => {
                        let mut message = BytesMut::new();
                        write::query(&mut message, &refuse_deallocate(&name));
                        Rewrite::Replaced {
                            message,
                            kind: Kind::Query,
                            effect: Effect::None,
                        }
                    }
                    // A SQL-level statement's name, or none: the server answers.
                    None => Rewrite::Watch(SessionChange::Deallocate(name)),
                }
            }
            // pgmux's own names are reserved: such a statement would collide with them.
            Some(SessionChange::Prepare(name)) if is_server_name(&name) => {
                let mut message = BytesMut::new();
                write::query(&mut message, &refuse_reserved_name(&name));
                Rewrite::Replaced {
                    message,
                    kind: Kind::Query,
                    effect: Effect::None,
                }
            }
            Some(SessionChange::Prepare(_)) => Rewrite::Forward(Some(Kind::Query)),
            Some(change) => Rewrite::Watch(change),
            None => Rewrite::Forward(Some(Kind::Query)),
        }
    }

    /// Parse, Bind, Describe, Execute, Close and Flush.
    pub(super) fn rewrite_extended(&self, frame: &Frame) -> Rewrite {
        let kind = match frame.tag {
            tag::PARSE => Kind::Parse,
            tag::BIND => Kind::Bind,
            tag::DESCRIBE => Kind::Describe,
            tag::EXECUTE => Kind::Execute,
            tag::CLOSE => Kind::Close,
            _ => return Rewrite::Forward(None), // Flush: no reply of its own
        };
        if !self.tracks_statements() {
            return Rewrite::Forward(Some(kind));
        }
        // In a failed transaction PostgreSQL refuses the Bind with 25P02 first: the server
        // says so.
        let failed = self
            .server
            .as_ref()
            .is_some_and(|s| s.tx_status() == TxStatus::Failed);
        let result_changed = |s: &Statement| s.result_changed.get().filter(|_| !failed).cloned();
        let renamed = match kind {
            Kind::Parse => return self.rewrite_parse(frame, whole_parse(frame).as_ref()),
            Kind::Bind => Bind::read(&frame.bytes).and_then(|bind| {
                let statement = self.statements.get(bind.statement)?.clone();
                Some(match result_changed(&statement) {
                    Some(error) => Rewrite::ResultTypeChanged(error),
                    None => Rewrite::Renamed {
                        message: rewrite_bind(&frame.bytes, &bind, &statement.server_name),
                        kind,
                        effect: Effect::Uses(statement.clone()),
                        statement,
                    },
                })
            }),
            Kind::Describe => Describe::read(frame.body())
                .filter(|d| d.kind == b'S' && !d.name.is_empty())
                .and_then(|d| self.statements.get(d.name).cloned())
                .map(|statement| match result_changed(&statement) {
                    Some(error) => Rewrite::ResultTypeChanged(error),
                    None => Rewrite::Renamed {
                        message: rewrite_describe(tag::DESCRIBE, &statement.server_name),
                        kind,
                        effect: Effect::Uses(statement.clone()),
                        statement,
                    },
                }),
            // Other clients may use the server's copy: only this client's name goes.
            Kind::Close => Close::read(frame.body())
                .filter(|c| c.kind == b'S' && !c.name.is_empty())
                .map(|c| Rewrite::Close(c.name.to_owned())),
            _ => None,
        };
        renamed.unwrap_or(Rewrite::Forward(Some(kind)))
    }

    /// A Parse; `parse`: the message read ([`whole_parse`]).
    pub(super) fn rewrite_parse(&self, frame: &Frame, parse: Option<&Parse<'_>>) -> Rewrite {
        if !self.tracks_statements() {
            return Rewrite::Forward(Some(Kind::Parse));
        }
        if !frame.is_whole() {
            let named = frame
                .bytes
                .get(5..)
                .and_then(read_cstr)
                .is_some_and(|(n, _)| !n.is_empty());
            return if named {
                Rewrite::Refuse(ClientError::NamedStatementTooLarge)
            } else {
                Rewrite::Forward(Some(Kind::Parse))
            };
        }
        // A malformed Parse goes to the server, which reports it.
        match parse {
            Some(parse) if !parse.name.is_empty() => {
                if self.statements.get(parse.name).is_some() {
                    return Rewrite::Refuse(ClientError::DuplicateStatement(parse.name.to_owned()));
                }
                // Each name holds its statement in pgmux's memory: bounded per client.
                let most = self.s.registry.capacity();
                if self.statements.len() >= most {
                    return Rewrite::Refuse(ClientError::TooManyStatements(most));
                }
                Rewrite::Parse {
                    name: parse.name.to_owned(),
                    statement: self.s.registry.statement(parse.query, &parse.param_types),
                }
            }
            Some(parse) => self.rewrite_unnamed_parse(parse),
            None => Rewrite::Forward(Some(Kind::Parse)),
        }
    }

    /// An unnamed Parse: drivers send `DEALLOCATE name` this way (psycopg in pipeline
    /// mode). A name of the client's is pgmux's; another client's goes no further.
    /// (A named statement of that text, which no driver makes, reaches the server as it
    /// came: its command tag then makes the server's record unsure.)
    fn rewrite_unnamed_parse(&self, parse: &Parse<'_>) -> Rewrite {
        let Some(SessionChange::Deallocate(name)) = session_change(parse.query.as_bytes()) else {
            return Rewrite::Forward(Some(Kind::Parse));
        };
        let instead = |sql: &str| BytesMut::from(&parse_message("", sql, &parse.param_types)[..]);
        match self.statements.get(&name) {
            Some(statement) => Rewrite::DeallocateByParse {
                message: instead(&format!("DEALLOCATE {}", statement.server_name)),
                client_name: name,
                statement: statement.clone(),
            },
            None if is_server_name(&name) => Rewrite::Replaced {
                message: instead(&refuse_deallocate(&name)),
                kind: Kind::Parse,
                effect: Effect::None,
            },
            None => Rewrite::Forward(Some(Kind::Parse)),
        }
    }

    /// Carries out what was decided for `frame`.
    pub(super) fn apply(&mut self, frame: Frame, rewrite: Rewrite) {
        match rewrite {
            Rewrite::Forward(Some(kind)) => {
                if kind == Kind::Bind {
                    // The unnamed statement (or one pgmux does not track).
                    self.watch_bind(None);
                }
                self.forward(frame, kind)
            }
            Rewrite::Forward(None) => self.to_server.push(frame.bytes),
            Rewrite::Watch(change) => {
                if matches!(
                    change,
                    SessionChange::Set { .. } | SessionChange::Reset(_) | SessionChange::ResetAll
                ) {
                    self.state.followed = true;
                }
                if matches!(
                    change,
                    SessionChange::DeallocateAll | SessionChange::DiscardAll
                ) && self.tracks_statements()
                    && let Some(server) = self.server.as_mut()
                {
                    // Until its command tag says it failed or ran (on_statement_reply),
                    // statements used behind it in a pipeline are closed and prepared again.
                    server.prepared().distrust();
                }
                self.replies.client(Kind::Query, Effect::Session(change));
                self.to_server.push(frame.bytes);
            }
            Rewrite::Replaced {
                message,
                kind,
                effect,
            } => {
                self.replies.client(kind, effect);
                self.to_server.push(message);
            }
            Rewrite::Renamed {
                message,
                kind,
                effect,
                statement,
            } => {
                if kind == Kind::Bind {
                    self.watch_bind(Some(statement.may_change_state));
                }
                self.ensure_on_server(&statement);
                self.replies.client(kind, effect);
                self.to_server.push(message);
            }
            Rewrite::Parse { name, statement } => {
                if let Some(parse) = Parse::read(frame.body()) {
                    self.s.view.set_query(parse.query.as_bytes());
                }
                self.prepare(name, statement);
            }
            Rewrite::Close(name) => self.apply_close(&name),
            Rewrite::DeallocateByParse {
                message,
                client_name,
                statement,
            } => {
                // PostgreSQL forgets the name when the statement runs; pgmux, now. Its
                // command tag makes the server's record unsure (on_statement_reply).
                self.statements.remove(&client_name, Some(statement.id));
                self.ensure_on_server(&statement);
                self.replies.client(Kind::Parse, Effect::None);
                self.to_server.push(message);
            }
            Rewrite::ResultTypeChanged(error) => {
                // Nothing of the client's message goes to the server: the rest of a large
                // Bind is dropped.
                self.client_mid_message = false;
                if !frame.ends {
                    self.skip = Skip::RestOfMessage;
                }
                self.reply_locally(BytesMut::from(&error[..]));
                self.replies.hidden(Kind::Bind, Effect::None);
                self.to_server.push(BytesMut::from(&FAILING_BIND[..]));
            }
            Rewrite::Refuse(error) => {
                // Nothing of this message went to the server; its other parts are dropped.
                self.client_mid_message = false;
                self.skip = Skip::UntilSyncForwarded;
                self.local_error(error);
            }
        }
    }

    /// Answers a Close of a named statement without a server (only the client's name goes).
    /// Returns false when the message needs a server (a portal, the unnamed statement).
    pub(super) fn close_without_server(&mut self, frame: &Frame) -> bool {
        if !self.tracks_statements() || !frame.is_whole() {
            return false;
        }
        match Close::read(frame.body()).filter(|c| c.kind == b'S' && !c.name.is_empty()) {
            Some(close) => {
                let name = close.name.to_owned();
                self.apply_close(&name);
                true
            }
            None => false,
        }
    }

    /// Answers a named Parse of an already verified statement without a server. Returns
    /// false when a server is needed.
    pub(super) fn parse_without_server(&mut self, frame: &Frame) -> bool {
        // The unnamed statement (the name is the first string) always needs a server:
        // known before the query text is read.
        if !self.tracks_statements() || !frame.is_whole() || frame.body().first() == Some(&0) {
            return false;
        }
        let Some(parse) = Parse::read(frame.body()) else {
            return false;
        };
        if parse.name.is_empty()
            || self.statements.get(parse.name).is_some()
            || self.statements.len() >= self.s.registry.capacity()
        {
            return false;
        }
        let statement = self.s.registry.statement(parse.query, &parse.param_types);
        if !statement
            .verified
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return false;
        }
        self.statements.insert(parse.name, statement);
        self.s.pool.stats.prepared_hit();
        self.reply_locally(BytesMut::from(&[b'1', 0, 0, 0, 4][..]));
        true
    }

    /// The client's Close of its statement `name`: the name goes, the server's copy stays
    /// (other clients may use it). PostgreSQL answers CloseComplete for unknown names too.
    fn apply_close(&mut self, name: &str) {
        self.statements.remove(name, None);
        self.reply_locally(BytesMut::from(&[b'3', 0, 0, 0, 4][..]));
    }

    /// The client's Parse of `statement` as `name`: answered here when the server holds it,
    /// else prepared there (its ParseComplete is the client's).
    fn prepare(&mut self, name: String, statement: Arc<Statement>) {
        self.statements.insert(&name, statement.clone());
        // Extended messages reach here only with a server held (checked out first).
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if server.prepared().touch(&statement) {
            self.s.pool.stats.prepared_hit();
            tracing::trace!(
                client_name = %Escaped(&name),
                server_name = statement.server_name,
                "prepared statement already on this server"
            );
            return self.reply_locally(BytesMut::from(&[b'1', 0, 0, 0, 4][..]));
        }
        self.s.pool.stats.prepared_miss();
        self.make_room(&statement);
        self.close_if_unsure(&statement);
        tracing::debug!(
            client_name = %Escaped(&name),
            server_name = statement.server_name,
            "preparing statement"
        );
        self.replies.client(
            Kind::Parse,
            Effect::Prepare {
                statement: statement.clone(),
                client_name: Some(name),
            },
        );
        self.to_server.push(BytesMut::from(&statement.parse[..]));
    }

    /// Makes sure the server holds `statement` before a message that names it: if it does
    /// not, pgmux prepares it there first and swallows the ParseComplete.
    fn ensure_on_server(&mut self, statement: &Arc<Statement>) {
        // Extended messages reach here only with a server held (checked out first).
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if server.prepared().touch(statement) {
            self.s.pool.stats.prepared_hit();
            return;
        }
        self.s.pool.stats.prepared_miss();
        tracing::debug!(
            server_name = statement.server_name,
            "re-preparing statement on this server"
        );
        self.make_room(statement);
        self.close_if_unsure(statement);
        self.replies.hidden(
            Kind::Parse,
            Effect::Prepare {
                statement: statement.clone(),
                client_name: None,
            },
        );
        self.to_server.push(BytesMut::from(&statement.parse[..]));
    }

    /// Records that the server will hold `statement`; closes the least recently used one
    /// when that makes too many.
    fn make_room(&mut self, statement: &Arc<Statement>) {
        // Extended messages reach here only with a server held (checked out first).
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if let Some(evicted) = server
            .prepared()
            .insert(statement.clone(), self.s.max_prepared)
        {
            self.s.pool.stats.prepared_eviction();
            tracing::debug!(
                server_name = evicted.server_name,
                "closing least recently used statement"
            );
            self.to_server
                .push(rewrite_describe(tag::CLOSE, &evicted.server_name));
            self.replies.hidden(Kind::Close, Effect::Evict(evicted));
        }
    }

    /// Before a Parse of `statement`: when the server's record is unsure, the server may
    /// hold it without its being recorded, and the Parse would fail. Closing it first is
    /// right either way (PostgreSQL closes unknown names quietly).
    fn close_if_unsure(&mut self, statement: &Statement) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if server.prepared().is_unsure() {
            self.to_server
                .push(rewrite_describe(tag::CLOSE, &statement.server_name));
            self.replies.hidden(Kind::Close, Effect::None);
        }
    }

    /// A reply pgmux gives itself, in its place in the stream.
    fn reply_locally(&mut self, reply: BytesMut) {
        self.replies.local(reply);
        self.take_due_replies();
    }

    fn local_error(&mut self, error: ClientError) {
        let mut buf = BytesMut::new();
        error.error().write(&mut buf);
        self.reply_locally(buf);
    }
}

/// A Parse message held whole, read; `None` when it is too large to hold whole or
/// malformed.
pub(super) fn whole_parse(frame: &Frame) -> Option<Parse<'_>> {
    frame
        .is_whole()
        .then(|| Parse::read(frame.body()))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert!(is_server_name("pgmux_s1") && is_server_name("pgmux_s42"));
        for name in [
            "pgmux_s",
            "pgmux_sx",
            "pgmux_s1'",
            "PGMUX_S1",
            "pgmux_1",
            "s1",
        ] {
            assert!(!is_server_name(name), "{name}");
        }
        assert!(
            refuse_deallocate("pgmux_s7")
                .contains("prepared statement \"pgmux_s7\" does not exist")
        );
    }
}
