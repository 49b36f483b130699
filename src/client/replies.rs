//! What the server will answer, in order, and who each answer is for.
//!
//! Every message the session sends to the server that produces a reply gets an entry here,
//! and so does every reply pgmux gives itself in its place (a ParseComplete for a statement
//! the server already holds). Server messages are matched to the front entry, which says
//! whether they go to the client or are swallowed (pgmux's own Parse and Close), so the
//! client sees exactly the order a direct connection would give, errors included.

use std::sync::Arc;

use bytes::BytesMut;

use super::deque::InlineDeque;
use super::params::SessionChange;
use crate::prepared::Statement;

/// Which message an entry stands for, and so which reply ends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

impl Kind {
    /// Whether a message with `tag` is the last reply to this one.
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Describe => matches!(tag, b'T' | b'n'),
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Close => tag == b'3',
            Kind::Sync | Kind::Query | Kind::FunctionCall => tag == b'Z',
        }
    }

    /// Whether an ErrorResponse ends it (extended-protocol messages) and makes the server
    /// skip everything up to the next Sync.
    fn ends_on_error(self) -> bool {
        !matches!(self, Kind::Sync | Kind::Query | Kind::FunctionCall)
    }
}

/// Bookkeeping to do when an entry's replies are in (or never come).
#[derive(Debug)]
pub enum Effect {
    None,
    /// A Parse preparing `statement` on the server: if it fails or is skipped, the server
    /// does not hold it, and a client Parse (`client_name`) did not create its name.
    Prepare {
        statement: Arc<Statement>,
        client_name: Option<String>,
    },
    /// pgmux's Close of an evicted statement: if skipped, the server still holds it.
    Evict(Arc<Statement>),
    /// A client Query that changes session state if it succeeds outside a transaction.
    Session(SessionChange),
    /// pgmux's query of the session state the server holds (`client/state.rs`).
    VerifyState,
    /// pgmux's query that discards a client's session state: if it fails, the server's
    /// state is unknown and it must not be lent again.
    ResetState,
    /// A client's SQL-level DEALLOCATE of its statement `client_name`: the server runs a
    /// statement that does nothing in its place (its copy stays for other clients), whose
    /// command tag the client reads as DEALLOCATE.
    Deallocate {
        client_name: String,
        statement: Arc<Statement>,
    },
    /// A client's Bind or Describe of `statement`, renamed to pgmux's server-side name:
    /// its error may say the server lost the statement, or that its result type changed.
    Uses(Arc<Statement>),
    /// pgmux's own `DEALLOCATE ALL` of a server whose record of statements was unsure;
    /// the record was cleared when it was sent.
    DeallocateAll,
}

/// One expected reply sequence.
#[derive(Debug)]
pub enum Expect {
    /// A client message: replies go to the client.
    Client {
        kind: Kind,
        effect: Effect,
        failed: bool,
    },
    /// pgmux's own message: replies are swallowed, except a failed Parse's error, which is
    /// the client's error too (its Bind cannot run).
    Hidden { kind: Kind, effect: Effect },
    /// A reply pgmux gives itself at this point in the stream.
    Local(BytesMut),
    /// No reply: the client ended a COPY IN here (CopyDone or CopyFail) before pgmux saw
    /// the server start it. Syncs before this mark reach the server during COPY IN and are
    /// ignored; those after it are answered.
    CopyEnd,
}

/// What to do with one server message.
pub enum Route {
    Forward,
    Swallow,
}

/// The queue. Owned by the client session. One entry (a simple Query, the usual case)
/// needs no heap block; an idle session's queue holds none.
#[derive(Default, Debug)]
pub struct Replies {
    queue: InlineDeque<Expect>,
}

impl Replies {
    /// How many entries are outstanding.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The entry the next server message belongs to.
    pub fn front(&self) -> Option<&Expect> {
        self.queue.iter().find(|e| !matches!(e, Expect::CopyEnd))
    }

    /// Whether every entry behind the one the last server message belonged to is a Sync,
    /// so that no message sent after it can name a statement. `ended`: that message ended
    /// its entry, which is already off the queue.
    pub fn only_syncs_behind(&self, ended: bool) -> bool {
        let mut owner_seen = ended;
        self.queue.iter().all(|e| match e {
            Expect::CopyEnd => true,
            _ if !owner_seen => {
                owner_seen = true;
                true
            }
            Expect::Client {
                kind: Kind::Sync, ..
            }
            | Expect::Hidden {
                kind: Kind::Sync, ..
            } => true,
            _ => false,
        })
    }

    /// Expects the replies to a client message.
    pub fn client(&mut self, kind: Kind, effect: Effect) {
        self.queue.push_back(Expect::Client {
            kind,
            effect,
            failed: false,
        });
    }

    /// Expects the replies to pgmux's own message.
    pub fn hidden(&mut self, kind: Kind, effect: Effect) {
        self.queue.push_back(Expect::Hidden { kind, effect });
    }

    /// Queues a reply pgmux gives itself.
    pub fn local(&mut self, reply: BytesMut) {
        self.queue.push_back(Expect::Local(reply));
    }

    /// The client sent CopyDone or CopyFail before pgmux knew the server was in COPY IN.
    pub fn copy_end(&mut self) {
        // With nothing outstanding, no COPY can be starting: a stray message, ignored by
        // the server as by PostgreSQL.
        if !self.queue.is_empty() {
            self.queue.push_back(Expect::CopyEnd);
        }
    }

    /// The server entered COPY IN mode, in which it ignores Sync until the client's
    /// CopyDone or CopyFail: the Syncs queued behind the COPY's own message up to that
    /// point get no ReadyForQuery. Returns whether the client already ended the COPY
    /// (then the server reads Syncs again once it reaches the end).
    pub fn copy_in_started(&mut self) -> bool {
        let Some(end) = self
            .queue
            .iter()
            .skip(1)
            .position(|e| matches!(e, Expect::CopyEnd))
            .map(|at| at + 1)
        else {
            // Every Sync queued so far arrives during COPY IN.
            let mut first = true;
            self.queue
                .retain(|e| std::mem::take(&mut first) || !is_client_sync(e));
            return false;
        };
        let mut at = 0;
        self.queue.retain(|e| {
            let keep = at == 0 || (at > end) || (at < end && !is_client_sync(e));
            at += 1;
            keep
        });
        true
    }

    /// Whether [`Replies::take_due`] has something to do.
    pub fn has_due(&self) -> bool {
        matches!(self.queue.front(), Some(Expect::Local(_) | Expect::CopyEnd))
    }

    /// Local replies now at the front: they are due. Copy ends that reach the front are
    /// dropped: the COPY they ended never started (or already ended).
    pub fn take_due(&mut self, mut emit: impl FnMut(BytesMut)) {
        loop {
            match self.queue.front() {
                Some(Expect::Local(_)) => {
                    if let Some(Expect::Local(reply)) = self.queue.pop_front() {
                        emit(reply);
                    }
                }
                Some(Expect::CopyEnd) => {
                    self.queue.pop_front();
                }
                _ => return,
            }
        }
    }

    /// Routes the start of a server message with `tag`. Returns the route and, when the
    /// message ends the front entry, that entry (with whether it failed) for its effects,
    /// and the entries the server will skip because of an error.
    pub fn route(&mut self, tag: u8) -> (Route, Option<Done>) {
        let is_error = tag == b'E';
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front();
        }
        let Some(front) = self.queue.front_mut() else {
            // Nothing expected (an asynchronous message): the client's.
            return (Route::Forward, None);
        };
        let (kind, route) = match front {
            Expect::Client { kind, failed, .. } => {
                if is_error {
                    *failed = true;
                }
                (*kind, Route::Forward)
            }
            Expect::Hidden { kind, .. } => {
                let route = if is_error && *kind == Kind::Parse {
                    Route::Forward
                } else {
                    Route::Swallow
                };
                (*kind, route)
            }
            // Local replies and copy ends are taken off the front as soon as they reach it
            // (take_due, below): never seen here.
            Expect::Local(_) | Expect::CopyEnd => (Kind::Sync, Route::Forward),
        };
        // Asynchronous messages belong to no entry. (The session decides itself whether a
        // ParameterStatus reaches the client.)
        if matches!(tag, b'N' | b'A' | b'S') {
            return (route, None);
        }
        let ends = kind.ends_with(tag) || (is_error && kind.ends_on_error());
        if !ends {
            return (route, None);
        }
        let Some(entry) = self.queue.pop_front() else {
            return (route, None);
        };
        let mut skipped = Vec::new();
        if is_error && kind.ends_on_error() {
            // The server ignores everything up to the next Sync.
            while let Some(next) = self.queue.front() {
                let is_sync = matches!(
                    next,
                    Expect::Client {
                        kind: Kind::Sync,
                        ..
                    } | Expect::Hidden {
                        kind: Kind::Sync,
                        ..
                    }
                );
                if is_sync {
                    break;
                }
                skipped.extend(self.queue.pop_front());
            }
        }
        (
            route,
            Some(Done {
                entry,
                failed: is_error,
                skipped,
            }),
        )
    }
}

fn is_client_sync(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Client {
            kind: Kind::Sync,
            ..
        }
    )
}

/// An entry whose replies are all in.
pub struct Done {
    /// The entry.
    pub entry: Expect,
    /// It ended with an ErrorResponse.
    pub failed: bool,
    /// Entries the server skipped because of that error (no replies will come for them).
    pub skipped: Vec<Expect>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_replies_wait_their_turn() {
        let mut r = Replies::default();
        r.client(Kind::Bind, Effect::None);
        r.local(BytesMut::from(&b"1"[..]));
        r.client(Kind::Sync, Effect::None);
        let mut due = Vec::new();
        r.take_due(|b| due.push(b));
        assert!(due.is_empty(), "behind the Bind");
        let (_, done) = r.route(b'2');
        assert!(done.is_some());
        r.take_due(|b| due.push(b));
        assert_eq!(due.len(), 1);
    }

    #[test]
    fn an_error_skips_to_sync() {
        let mut r = Replies::default();
        r.client(Kind::Parse, Effect::None);
        r.client(Kind::Bind, Effect::None);
        r.local(BytesMut::from(&b"3"[..]));
        r.client(Kind::Sync, Effect::None);
        let (_, done) = r.route(b'E');
        let done = done.unwrap();
        assert!(done.failed);
        assert_eq!(
            done.skipped.len(),
            2,
            "the Bind and the local reply are skipped"
        );
        let (_, done) = r.route(b'Z');
        assert!(done.is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn only_syncs_behind_the_entry_of_the_last_message() {
        let mut r = Replies::default();
        r.client(Kind::Query, Effect::None);
        assert!(r.only_syncs_behind(false), "the Query itself is the owner");
        r.client(Kind::Sync, Effect::None);
        assert!(r.only_syncs_behind(false));
        r.local(BytesMut::from(&b"1"[..]));
        assert!(
            !r.only_syncs_behind(false),
            "a Parse answered by pgmux behind it"
        );

        let mut r = Replies::default();
        r.client(Kind::Execute, Effect::None);
        r.client(Kind::Sync, Effect::None);
        assert!(matches!(
            r.front(),
            Some(Expect::Client {
                kind: Kind::Execute,
                ..
            })
        ));
        let (_, done) = r.route(b'C');
        assert!(done.is_some(), "CommandComplete ends an Execute");
        assert!(r.only_syncs_behind(true));
        r.client(Kind::Bind, Effect::None);
        assert!(!r.only_syncs_behind(true));
    }

    #[test]
    fn hidden_replies_are_swallowed_but_a_failed_parse_is_not() {
        let mut r = Replies::default();
        r.hidden(Kind::Parse, Effect::None);
        assert!(matches!(r.route(b'1').0, Route::Swallow));
        r.hidden(Kind::Parse, Effect::None);
        assert!(matches!(r.route(b'E').0, Route::Forward));
    }
}
