//! The client messages that name prepared statements, rewritten so that named statements
//! work on whichever server connection the client holds (transaction and statement mode).

use std::sync::Arc;

use bytes::BytesMut;

use super::error::ClientError;
use super::params::{SessionChange, session_change};
use super::replies::{Effect, Kind};
use super::session::{Loop, Skip};
use crate::config::PoolMode;
use crate::logging::Escaped;
use crate::prepared::{Bind, Close, Describe, Parse, Statement, rewrite_bind, rewrite_describe};
use crate::protocol::{Frame, read_cstr, tag, write};

/// Replaces a SQL-level PREPARE in transaction mode: the server raises the error, so the
/// transaction state the client sees is exactly what PostgreSQL would give.
const REFUSE_PREPARE: &str = "DO $pgmux$ BEGIN RAISE EXCEPTION USING \
    ERRCODE = 'feature_not_supported', \
    MESSAGE = 'pgmux: SQL-level PREPARE is not supported in transaction pooling mode', \
    HINT = 'use your driver''s prepared statements (protocol-level, tracked by pgmux), or a pool with mode = \"session\"'; END $pgmux$";

impl Loop<'_> {
    /// Whether named statements are mapped to pgmux's server-side names.
    fn tracks_statements(&self) -> bool {
        self.s.max_prepared > 0 && self.s.mode != PoolMode::Session
    }

    /// A simple Query, watched for the few statements that change session state.
    pub(super) fn query(&mut self, frame: Frame) {
        let change = if frame.is_whole() && self.s.mode != PoolMode::Session {
            session_change(frame.body())
        } else {
            None
        };
        match change {
            Some(SessionChange::Prepare) => {
                let mut refuse = BytesMut::new();
                write::query(&mut refuse, REFUSE_PREPARE);
                self.replies.client(Kind::Query, Effect::None);
                self.to_server.push(refuse);
            }
            Some(SessionChange::Deallocate(name)) if self.tracks_statements() => {
                match self.statements.get(&name).cloned() {
                    Some(statement) => {
                        // Deallocate pgmux's copy on this server; the command tag is the real one.
                        self.ensure_on_server(&statement);
                        let mut sql = BytesMut::new();
                        write::query(&mut sql, &format!("DEALLOCATE {}", statement.server_name));
                        self.replies.client(
                            Kind::Query,
                            Effect::Deallocate {
                                client_name: name,
                                statement,
                            },
                        );
                        self.to_server.push(sql);
                    }
                    None => self.forward(frame, Kind::Query),
                }
            }
            Some(change) => {
                self.replies.client(Kind::Query, Effect::Session(change));
                self.to_server.push(frame.bytes);
            }
            None => self.forward(frame, Kind::Query),
        }
    }

    /// Parse, Bind, Describe, Execute, Close and Flush.
    pub(super) fn extended(&mut self, frame: Frame) {
        let kind = match frame.tag {
            tag::PARSE => Kind::Parse,
            tag::BIND => Kind::Bind,
            tag::DESCRIBE => Kind::Describe,
            tag::EXECUTE => Kind::Execute,
            tag::CLOSE => Kind::Close,
            _ => {
                // Flush: no reply of its own.
                self.to_server.push(frame.bytes);
                return;
            }
        };
        if !self.tracks_statements() {
            return self.forward(frame, kind);
        }
        match kind {
            Kind::Parse => self.parse(frame),
            Kind::Bind => {
                let rewritten = Bind::read(&frame.bytes).and_then(|bind| {
                    let statement = self.statements.get(bind.statement)?.clone();
                    Some((
                        rewrite_bind(&frame.bytes, &bind, &statement.server_name),
                        statement,
                    ))
                });
                match rewritten {
                    Some((message, statement)) => {
                        self.ensure_on_server(&statement);
                        self.replies.client(Kind::Bind, Effect::None);
                        self.to_server.push(message);
                    }
                    None => self.forward(frame, kind),
                }
            }
            Kind::Describe => {
                let statement = Describe::read(frame.body())
                    .filter(|d| d.kind == b'S' && !d.name.is_empty())
                    .and_then(|d| self.statements.get(d.name).cloned());
                match statement {
                    Some(statement) => {
                        self.ensure_on_server(&statement);
                        self.replies.client(Kind::Describe, Effect::None);
                        self.to_server
                            .push(rewrite_describe(tag::DESCRIBE, &statement.server_name));
                    }
                    None => self.forward(frame, kind),
                }
            }
            Kind::Close => {
                let named =
                    Close::read(frame.body()).filter(|c| c.kind == b'S' && !c.name.is_empty());
                match named {
                    Some(close) => {
                        // Other clients may use the server's copy: only this client's name goes.
                        // PostgreSQL answers CloseComplete for unknown names too.
                        let name = close.name.to_owned();
                        self.statements.remove(&name, None);
                        self.reply_locally(BytesMut::from(&[b'3', 0, 0, 0, 4][..]));
                    }
                    None => self.forward(frame, kind),
                }
            }
            _ => self.forward(frame, kind),
        }
    }

    /// Answers a named Parse of an already verified statement without a server. Returns
    /// false when a server is needed.
    pub(super) fn parse_without_server(&mut self, frame: &Frame) -> bool {
        if !self.tracks_statements() || !frame.is_whole() {
            return false;
        }
        let Some(parse) = Parse::read(frame.body()) else {
            return false;
        };
        if parse.name.is_empty() || self.statements.get(parse.name).is_some() {
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

    fn parse(&mut self, frame: Frame) {
        if !frame.is_whole() {
            let name = frame
                .bytes
                .get(5..)
                .and_then(read_cstr)
                .map(|(n, _)| n.is_empty());
            if name == Some(false) {
                self.client_mid_message = false;
                self.skip = Skip::UntilSyncForwarded;
                return self.local_error(ClientError::NamedStatementTooLarge);
            }
            return self.forward(frame, Kind::Parse);
        }
        let Some(parse) = Parse::read(frame.body()) else {
            return self.forward(frame, Kind::Parse); // the server reports the malformed message
        };
        if parse.name.is_empty() {
            return self.forward(frame, Kind::Parse);
        }
        if self.statements.get(parse.name).is_some() {
            self.skip = Skip::UntilSyncForwarded;
            return self.local_error(ClientError::DuplicateStatement(parse.name.to_owned()));
        }
        let statement = self.s.registry.statement(parse.query, &parse.param_types);
        let name = parse.name.to_owned();
        self.s.view.set_query(parse.query.as_bytes());
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
