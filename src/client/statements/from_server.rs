//! What the server's replies say about the statements it holds: the command tags of
//! DEALLOCATE and DISCARD ALL, whoever sent them and however, and the errors that reveal a
//! wrong record or a statement whose result type DDL changed. Also the checkout of a
//! server whose record became unsure.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::client::params::SessionChange;
use crate::client::replies::{Done, Effect, Expect, Kind};
use crate::client::session::Loop;
use crate::pool::Lease;
use crate::prepared::Statement;
use crate::protocol::{FrameRef, read, tag, write};

/// CommandComplete, from a server (the same byte as a client's Close).
const COMMAND_COMPLETE: u8 = b'C';

/// PostgreSQL's message when DDL changed the result type of a prepared statement (SQLSTATE
/// 0A000, from `RevalidateCachedQuery`), on the Bind or the Describe of that statement.
const RESULT_TYPE_CHANGED: &str = "cached plan must not change result type";

/// What a server's reply says about the statements it holds.
enum News {
    /// Every statement of the server session is gone (DEALLOCATE ALL, DISCARD ALL), by a
    /// message of the client's (`client`) or one pgmux sent.
    AllGone { client: bool },
    /// The record is wrong or may be: a DEALLOCATE pgmux cannot name, a Bind of a
    /// statement the server lacks, a Parse of one it already holds.
    Unsure,
    /// DDL changed this statement's result type.
    ResultTypeChanged(Arc<Statement>),
}

impl Loop<'_> {
    /// A server just checked out: if its record of statements is unsure, deallocate them
    /// all before anything else (replies swallowed), so that the record is empty and sure.
    /// The server is idle, so that cannot fail; it holds no client's SQL-level statement
    /// (those never leave their client's session).
    pub(in crate::client) fn reset_unsure_statements(&mut self, conn: &mut Lease) {
        if !conn.prepared().is_unsure() {
            return;
        }
        tracing::debug!(
            server = conn.id(),
            "deallocating the statements of a server whose record is unsure"
        );
        conn.prepared().clear();
        let mut query = BytesMut::new();
        write::query(&mut query, "DEALLOCATE ALL");
        self.to_server.push(query);
        self.replies.hidden(Kind::Query, Effect::DeallocateAll);
    }

    /// What a server's reply says about the statements it holds, before its entry's
    /// bookkeeping (`done`: the entry it ended, if it did). Called for every server
    /// message, from one place in `session/from_server.rs`; looks only at CommandComplete
    /// and ErrorResponse.
    ///
    /// The command tag is the truth: `DEALLOCATE ALL` or `DISCARD ALL`, whoever sent it,
    /// by whatever protocol, in or out of a transaction block (DEALLOCATE is not
    /// transactional), means the server holds none of pgmux's statements any more; a
    /// `DEALLOCATE` that pgmux did not make itself may have removed any of them. Errors
    /// reveal a record that was wrong (a Bind of a statement the server lacks, a Parse of
    /// one it holds) and statements whose result type DDL changed.
    ///
    /// Returns the message the client gets in its place, if it is not the server's.
    pub(in crate::client) fn on_statement_reply(
        &mut self,
        frame: FrameRef<'_>,
        done: Option<&Done>,
    ) -> Option<BytesMut> {
        if !matches!(frame.tag, COMMAND_COMPLETE | tag::ERROR_RESPONSE)
            || !frame.is_whole()
            || !self.tracks_statements()
        {
            return None;
        }
        let owner = match done {
            Some(done) => Some(&done.entry),
            None => self.replies.front(),
        };
        let owner = owner?;
        if frame.tag == COMMAND_COMPLETE
            && matches!(
                owner,
                Expect::Client {
                    effect: Effect::Deallocate { .. },
                    ..
                }
            )
        {
            // DEALLOCATE_IN_PLACE ran in place of the client's DEALLOCATE: its tag.
            let mut tag = BytesMut::new();
            write::message(&mut tag, COMMAND_COMPLETE, |b| write::cstr(b, "DEALLOCATE"));
            return Some(tag);
        }
        let news = if frame.tag == COMMAND_COMPLETE {
            deallocation(frame.body(), owner)
        } else {
            statement_error(frame.body(), owner)
        };
        match news {
            None => {}
            Some(News::AllGone { client }) => {
                if client {
                    // As PostgreSQL forgets them for a direct client.
                    self.statements.clear();
                }
                // Statements prepared after it (pipelined) are on the server, unrecorded.
                let exact = self.replies.only_syncs_behind(done.is_some());
                if let Some(server) = self.server.as_mut() {
                    tracing::debug!(
                        server = server.id(),
                        exact,
                        "the server deallocated all statements"
                    );
                    if exact {
                        server.prepared().clear();
                    } else {
                        server.prepared().distrust();
                    }
                }
            }
            Some(News::Unsure) => {
                if let Some(server) = self.server.as_mut() {
                    tracing::debug!(
                        server = server.id(),
                        "the server's statements are not what pgmux recorded"
                    );
                    server.prepared().distrust();
                }
            }
            Some(News::ResultTypeChanged(statement)) => {
                tracing::debug!(
                    server_name = statement.server_name,
                    "result type changed: the statement is forgotten"
                );
                let _ = statement
                    .result_changed
                    .set(Bytes::copy_from_slice(frame.bytes));
                self.s.registry.forget(&statement);
            }
        }
        None
    }
}

/// What a CommandComplete (its body: the tag) says, for the entry it belongs to.
fn deallocation(body: &[u8], owner: &Expect) -> Option<News> {
    let tag = body.strip_suffix(&[0]).unwrap_or(body);
    match tag {
        b"DEALLOCATE ALL" | b"DISCARD ALL" => match owner {
            // pgmux's own, on checkout: the record was cleared when it was sent.
            Expect::Hidden {
                effect: Effect::DeallocateAll,
                ..
            } => None,
            Expect::Hidden { .. } => Some(News::AllGone { client: false }),
            _ => Some(News::AllGone { client: true }),
        },
        b"DEALLOCATE" => match owner {
            // A client's standalone DEALLOCATE of a name that is not pgmux's.
            Expect::Client {
                effect: Effect::Session(SessionChange::Deallocate(_)),
                ..
            } => None,
            // In a multi-statement Query or by the extended protocol: any statement.
            _ => Some(News::Unsure),
        },
        _ => None,
    }
}

/// What an ErrorResponse (its body) says, for the entry it belongs to.
fn statement_error(body: &[u8], owner: &Expect) -> Option<News> {
    let (mut code, mut message, mut routine) = ("", "", "");
    for (field, value) in read::fields(body) {
        match field {
            b'C' => code = value,
            b'M' => message = value,
            b'R' => routine = value,
            _ => {}
        }
    }
    match owner {
        Expect::Client {
            kind: Kind::Bind | Kind::Describe,
            effect: Effect::Uses(statement),
            ..
        } => match code {
            // The routine too: the message is translated when lc_messages is not English.
            "0A000" if message == RESULT_TYPE_CHANGED || routine == "RevalidateCachedQuery" => {
                Some(News::ResultTypeChanged(statement.clone()))
            }
            // pgmux prepared it there or recorded it there: someone deallocated it.
            "26000" => {
                tracing::debug!(
                    server_name = statement.server_name,
                    "the server lacks a statement pgmux recorded"
                );
                Some(News::Unsure)
            }
            _ => None,
        },
        Expect::Client {
            kind: Kind::Parse,
            effect: Effect::Prepare { .. },
            ..
        }
        | Expect::Hidden {
            kind: Kind::Parse,
            effect: Effect::Prepare { .. },
        } if code == "42P05" => Some(News::Unsure),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepared::Registry;

    fn client(kind: Kind, effect: Effect) -> Expect {
        Expect::Client {
            kind,
            effect,
            failed: false,
        }
    }

    fn error(code: &str, message: &str, routine: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', "ERROR"),
            (b'C', code),
            (b'M', message),
            (b'R', routine),
        ] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn command_tags() {
        let query = client(Kind::Query, Effect::None);
        let all = |tag: &[u8], owner: &Expect| {
            matches!(
                deallocation(tag, owner),
                Some(News::AllGone { client: true })
            )
        };
        assert!(all(b"DEALLOCATE ALL\0", &query));
        assert!(all(b"DISCARD ALL\0", &client(Kind::Execute, Effect::None)));
        let own = Expect::Hidden {
            kind: Kind::Query,
            effect: Effect::DeallocateAll,
        };
        assert!(
            deallocation(b"DEALLOCATE ALL\0", &own).is_none(),
            "pgmux's own"
        );
        assert!(matches!(
            deallocation(b"DEALLOCATE\0", &query),
            Some(News::Unsure)
        ));
        let sql_level = client(
            Kind::Query,
            Effect::Session(SessionChange::Deallocate("p".into())),
        );
        assert!(deallocation(b"DEALLOCATE\0", &sql_level).is_none());
        for tag in [
            &b"SELECT 1\0"[..],
            b"DISCARD PLANS\0",
            b"DO\0",
            b"DEALLOCATE",
        ] {
            assert!(
                !matches!(deallocation(tag, &query), Some(News::AllGone { .. })),
                "{tag:?}"
            );
        }
    }

    #[test]
    fn errors_that_say_something_about_statements() {
        let registry = Registry::default();
        let statement = registry.statement("SELECT * FROM t", &[]);
        let bind = client(Kind::Bind, Effect::Uses(statement.clone()));
        let changed = |body: &[u8], owner: &Expect| {
            matches!(
                statement_error(body, owner),
                Some(News::ResultTypeChanged(_))
            )
        };
        assert!(changed(
            &error("0A000", RESULT_TYPE_CHANGED, "RevalidateCachedQuery"),
            &bind
        ));
        // Translated messages: the routine says it.
        assert!(changed(
            &error(
                "0A000",
                "le plan en cache ne doit pas modifier le type en résultat",
                "RevalidateCachedQuery"
            ),
            &client(Kind::Describe, Effect::Uses(statement.clone()))
        ));
        assert!(!changed(
            &error("0A000", "something else", "elsewhere"),
            &bind
        ));
        assert!(!changed(
            &error("0A000", RESULT_TYPE_CHANGED, "RevalidateCachedQuery"),
            &client(Kind::Bind, Effect::None)
        ));
        assert!(matches!(
            statement_error(&error("26000", "gone", "FetchPreparedStatement"), &bind),
            Some(News::Unsure)
        ));
        let parse = Expect::Hidden {
            kind: Kind::Parse,
            effect: Effect::Prepare {
                statement,
                client_name: None,
            },
        };
        assert!(matches!(
            statement_error(&error("42P05", "exists", "StorePreparedStatement"), &parse),
            Some(News::Unsure)
        ));
        assert!(statement_error(&error("42601", "syntax", "scanner_yyerror"), &parse).is_none());
        assert!(statement_error(b"\0", &bind).is_none(), "no fields");
        assert!(statement_error(b"C0A0", &bind).is_none(), "malformed");
    }
}
