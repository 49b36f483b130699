//! Session state a client leaves on its server (transaction and statement mode): triggers
//! noted while forwarding, the hidden verification before the server goes back, and then a
//! pin or a reset (`pool.session_state`). The triggers and the query are in
//! `client/state.rs`; this file is what the loop does with them.
//!
//! The client's ReadyForQuery that ends a transaction in which a trigger fired is held
//! while pgmux asks the server what state it holds, so the client never runs ahead of the
//! decision: under `pin` it keeps its server, under `reset` it reads a NOTICE saying what
//! was discarded, and when `max_pinned` servers are pinned already the statement gets an
//! error, all before that ReadyForQuery.

use std::time::{SystemTime, UNIX_EPOCH};

use tracing::info;

use super::*;
use crate::client::state::{Found, Kinds, VERIFY_SQL, tag_may_change_state, text_may_change_state};
use crate::clients::StateEvent;
use crate::config::SessionStatePolicy;
use crate::pool::PinGuard;
use crate::prepared::Parse;
use crate::protocol::PgError;
use crate::stats::{StateAction, StateKind};

/// What a session knows of the state it may have left on its server. Small and inline;
/// the rest is boxed and made on the first trigger, so an idle session stays small.
#[derive(Default)]
pub(in crate::client) struct StateWatch {
    /// A trigger fired since the server was last verified.
    triggered: bool,
    /// The unnamed statement's text had a trigger: each Bind of it fires it again.
    unnamed_triggers: bool,
    /// A standalone SET or RESET that pgmux follows itself is in flight: its tag is no
    /// trigger.
    pub(in crate::client) followed: bool,
    work: Option<Box<Work>>,
}

#[derive(Default)]
struct Work {
    /// The statement that fired the last trigger (at most 200 bytes).
    cause: String,
    /// The verification's rows so far, while it runs.
    found: Option<Found>,
    /// The client's ReadyForQuery, held until the verification is done.
    held_ready: Option<BytesMut>,
    /// The client keeps its server between transactions for this state.
    pin: Option<Pin>,
}

struct Pin {
    kinds: Kinds,
    /// The pool's count of pinned servers; dropping it gives the place back.
    _place: PinGuard,
}

/// A client an upgrade moved in pinned to the server that came with it: why, and its place
/// among the pool's pinned servers.
pub(in crate::client) struct MovedPin {
    pub kinds: Kinds,
    pub place: PinGuard,
}

impl StateWatch {
    /// The watch of a client moved in pinned: pinned as it was on the old process.
    pub(super) fn moved_in(pin: MovedPin) -> StateWatch {
        StateWatch {
            work: Some(Box::new(Work {
                pin: Some(Pin {
                    kinds: pin.kinds,
                    _place: pin.place,
                }),
                ..Work::default()
            })),
            ..StateWatch::default()
        }
    }
}

impl Loop<'_> {
    /// Whether this session watches for session state (transaction and statement mode).
    fn watches_state(&self) -> bool {
        self.s.mode != PoolMode::Session
    }

    /// Why the client keeps its server between transactions, if it is pinned.
    pub(super) fn pin_kinds(&self) -> Option<Kinds> {
        self.state
            .work
            .as_ref()
            .and_then(|work| work.pin.as_ref())
            .map(|pin| pin.kinds)
    }

    /// Whether the session knows of no state on any server (nothing triggered, nothing
    /// followed, no pin): it may park (`client/park.rs`) and resume with a fresh watch.
    pub(super) fn state_is_blank(&self) -> bool {
        let w = &self.state;
        !w.triggered && !w.unnamed_triggers && !w.followed && w.work.is_none()
    }

    /// Whether the client keeps its server between transactions.
    pub(super) fn pinned(&self) -> bool {
        self.state
            .work
            .as_ref()
            .is_some_and(|work| work.pin.is_some())
    }

    /// A trigger fired: the server is verified before it goes back. `cause` is the
    /// statement's text when the caller has it, else the client's current query is taken.
    fn state_trigger(&mut self, cause: Option<&[u8]>) {
        self.state.triggered = true;
        let cause = match cause {
            Some(text) => {
                let text = text.strip_suffix(&[0]).unwrap_or(text);
                let end = text.len().min(crate::clients::QUERY_TEXT_MAX);
                String::from_utf8_lossy(text.get(..end).unwrap_or_default()).into_owned()
            }
            None => self.s.view.query(),
        };
        self.state.work.get_or_insert_default().cause = cause;
    }

    /// A client Query: its text may make state that no command tag shows.
    pub(super) fn watch_query(&mut self, frame: &Frame) {
        if !self.watches_state() {
            return;
        }
        // A Query too large to hold whole is not scanned: verify to be sure.
        if !frame.is_whole() || text_may_change_state(frame.body()) {
            self.state_trigger(Some(frame.body()));
        }
    }

    /// A client Parse: a statement whose text may make state fires at each Bind too.
    pub(super) fn watch_parse(&mut self, parse: Option<&Parse<'_>>) {
        if !self.watches_state() {
            return;
        }
        let Some(parse) = parse else {
            // Too large to hold whole, or malformed (the server will say so).
            return self.state_trigger(None);
        };
        let hit = text_may_change_state(parse.query.as_bytes());
        if parse.name.is_empty() {
            self.state.unnamed_triggers = hit;
        }
        if hit {
            self.state_trigger(Some(parse.query.as_bytes()));
        }
    }

    /// A client Bind: of the unnamed statement, or of a named one pgmux tracks (`named`
    /// says whether its text had a trigger).
    pub(in crate::client) fn watch_bind(&mut self, named: Option<bool>) {
        if !self.watches_state() {
            return;
        }
        if named.unwrap_or(self.state.unnamed_triggers) {
            self.state_trigger(None);
        }
    }

    /// A CommandComplete going to the client.
    pub(super) fn watch_tag(&mut self, tag: &[u8]) {
        if !self.watches_state() || !tag_may_change_state(tag) {
            return;
        }
        if self.state.followed && matches!(tag, b"SET\0" | b"RESET\0") {
            // pgmux follows this one itself (a standalone SET or RESET).
            self.state.followed = false;
            return;
        }
        self.state_trigger(None);
    }

    /// The ReadyForQuery that ends a client's transaction: returned to be sent now, or
    /// held while the server is asked what state the transaction left.
    pub(super) fn ready_or_verify(&mut self, ready: BytesMut) -> Option<BytesMut> {
        if !self.verify_due() {
            return Some(ready);
        }
        if !self.state.triggered {
            // Verified for `session_state_check = "always"`: the last query is the suspect.
            let cause = self.s.view.query();
            self.state.work.get_or_insert_default().cause = cause;
        }
        self.state.triggered = false;
        let work = self.state.work.get_or_insert_default();
        work.held_ready = Some(ready);
        work.found = Some(Found::default());
        let mut query = BytesMut::new();
        write::query(&mut query, VERIFY_SQL);
        self.to_server.push(query);
        self.replies.hidden(Kind::Query, Effect::VerifyState);
        None
    }

    /// Whether the ReadyForQuery that ends a client's transaction now is held for a
    /// verification ([`Loop::ready_or_verify`]).
    pub(super) fn verify_due(&self) -> bool {
        let due = self.state.triggered || (self.s.verify_always && self.watches_state());
        due && self.settled() == Some(TxStatus::Idle)
    }

    /// A DataRow of the verification (hidden replies, while it runs).
    pub(super) fn verification_row(&mut self, body: &[u8]) {
        if let Some(found) = self.state.work.as_mut().and_then(|w| w.found.as_mut()) {
            found.add_row(body);
        }
    }

    /// The verification is done: follow the settings, then pin, reset or refuse, then let
    /// the client have its ReadyForQuery.
    pub(super) fn verified(&mut self, failed: bool) {
        let Some(work) = self.state.work.as_mut() else {
            return;
        };
        let found = work.found.take();
        let held = work.held_ready.take();
        let cause = std::mem::take(&mut work.cause);
        match found {
            Some(found) if !failed => self.judge(found, cause),
            _ => {
                // The state is unknown: the server must not be lent again.
                warn!(pool = %Escaped(&self.s.pool.key), "could not verify the session state of a server; it will be closed");
                if let Some(server) = self.server.as_mut() {
                    server.mark_broken();
                }
                if let Some(work) = self.state.work.as_mut() {
                    work.pin = None;
                }
            }
        }
        if let Some(ready) = held {
            match self.listen_confirm.as_deref_mut() {
                Some(wait) => wait.ready = Some(ready),
                None => self.to_client.push(ready),
            }
        }
    }

    fn judge(&mut self, found: Found, cause: String) {
        let Some(server) = self.server.as_deref_mut() else {
            return;
        };
        if self.s.params.follow(&found.settings, server) {
            self.s
                .pool
                .stats
                .session_state(StateKind::Setting, StateAction::Follow);
        }
        let mut kinds = found.kinds;
        if !found.channels.is_empty() {
            // LISTEN never pins: the database's listener connection takes it over.
            self.adopt_listens(&found.channels);
            kinds.remove(StateKind::Listen);
        }
        let pinned = self.state.work.as_ref().and_then(|w| w.pin.as_ref());
        if kinds.is_empty() {
            if pinned.is_some() {
                debug!(pool = %Escaped(&self.s.pool.key), "session state gone: the client no longer pins its server");
                if let Some(work) = self.state.work.as_mut() {
                    work.pin = None;
                }
                self.s.view.set_session_state(None);
            }
            return;
        }
        if let Some(pin) = self.state.work.as_mut().and_then(|w| w.pin.as_mut()) {
            // Pinned already: the state may have grown, the pin stays.
            pin.kinds = kinds;
            return;
        }
        let settings = self.s.pool.settings();
        let action = match self.s.state_policy {
            SessionStatePolicy::Pin => match self.s.pool.try_pin(settings.pinned_limit()) {
                Some(place) => {
                    // pinned_idle_timeout counts from now (the clock is read for it only
                    // while pinned).
                    self.last_activity = Instant::now();
                    if let Some(work) = self.state.work.as_mut() {
                        work.pin = Some(Pin {
                            kinds,
                            _place: place,
                        });
                    }
                    info!(
                        pool = %Escaped(&self.s.pool.key),
                        client = %self.s.view.peer(),
                        application_name = %Escaped(&self.s.view.application_name()),
                        state = kinds.labels(),
                        statement = %Escaped(&cause),
                        "session state pins the client to its server connection"
                    );
                    StateAction::Pin
                }
                None => {
                    self.reset_state(kinds);
                    let error = ClientError::PinLimit {
                        kinds: capitalized(&kinds.describe()),
                        limit: settings.pinned_limit(),
                    };
                    let mut buf = BytesMut::new();
                    error.error().write(&mut buf);
                    self.to_client.push(buf);
                    StateAction::Refuse
                }
            },
            SessionStatePolicy::Reset => {
                self.reset_state(kinds);
                let notice = PgError::notice(format!(
                    "discarded session state this transaction left on its server connection: {} (pool.session_state = \"reset\")",
                    kinds.describe()
                ))
                .with_hint("in transaction pooling, session state does not outlive its transaction; keep it inside the transaction, or use session_state = \"pin\" or mode = \"session\"");
                let mut buf = BytesMut::new();
                notice.write(&mut buf);
                self.to_client.push(buf);
                StateAction::Reset
            }
        };
        for kind in kinds.iter() {
            self.s.pool.stats.session_state(kind, action);
        }
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.s.view.set_session_state(Some(StateEvent {
            action: action.as_str(),
            pinned: action == StateAction::Pin,
            kinds: kinds.labels(),
            statement: cause,
            at,
        }));
    }

    /// The channels a transaction LISTENed to on its server become the client's own: the
    /// database's listener connection takes them over (`notify.rs`) and the server
    /// forgets them (a hidden `UNLISTEN *`) before it goes back. PostgreSQL's own catalog
    /// said which ones committed, so a LISTEN rolled back (or in a failed implicit
    /// transaction, or a rolled-back savepoint) was never adopted.
    fn adopt_listens(&mut self, channels: &[String]) {
        let sub = self.subscribed();
        for channel in channels {
            sub.listen(channel);
        }
        self.show_channels();
        // The client's ReadyForQuery (and the server) wait until the listener connection
        // LISTENs too: no notification committed after the client's LISTEN is lost. The
        // server, still listening meanwhile, forwards what it gets.
        let limit = self.s.pool.settings().connect_timeout + LISTEN_CONFIRM_EXTRA;
        self.listen_confirm = Some(Box::new(ListenConfirm {
            ready: None,
            deadline: Instant::now() + limit,
            limit,
        }));
    }

    /// The listener connection LISTENs to the adopted channels (or did not in time): the
    /// server forgets them and the client gets its ReadyForQuery.
    pub(super) fn listen_confirmed(&mut self, confirmed: bool) {
        let Some(wait) = self.listen_confirm.take() else {
            return;
        };
        if !confirmed {
            if let Some(sub) = self.subscription.as_deref_mut() {
                sub.drop_unconfirmed();
            }
            self.show_channels();
            let mut buf = BytesMut::new();
            ClientError::ListenerUnavailable(wait.limit)
                .error()
                .write(&mut buf);
            self.to_client.push(buf);
        }
        let mut query = BytesMut::new();
        write::query(&mut query, "UNLISTEN *");
        self.to_server.push(query);
        self.replies.hidden(Kind::Query, Effect::ResetState);
        if let Some(ready) = wait.ready {
            self.to_client.push(ready);
        }
    }

    /// The client's subscriptions, made on first need.
    pub(super) fn subscribed(&mut self) -> &mut crate::notify::Subscription {
        let (notify, pool, key) = (&self.s.notify, &self.s.pool, self.s.cancel.key());
        self.subscription
            .get_or_insert_with(|| Box::new(notify.subscribe(&pool.key, &pool.upstream(), key)))
    }

    /// Shows the client's channels in `/clients`.
    pub(super) fn show_channels(&mut self) {
        let channels: Vec<String> = self
            .subscription
            .as_ref()
            .map(|s| s.channels().map(str::to_owned).collect())
            .unwrap_or_default();
        self.s.view.set_channels(channels);
    }

    /// A simple Query that is only a LISTEN or UNLISTEN (`notify::parse_listen`), from a
    /// client that holds no server: answered by pgmux, with no server at all (outside a
    /// transaction it takes effect at once, as in PostgreSQL). An UNLISTEN from a client
    /// inside a transaction is applied as it goes to the server. False: not such a
    /// Query, or session mode (where the client's own server LISTENs).
    pub(super) async fn listen_locally(&mut self, frame: &Frame) -> bool {
        if !self.watches_state() || !frame.is_whole() {
            return false;
        }
        let Some(command) = crate::notify::parse_listen(frame.body()) else {
            return false;
        };
        let tag = match &command {
            crate::notify::ListenCommand::Listen(_) => "LISTEN",
            _ => "UNLISTEN",
        };
        match command {
            crate::notify::ListenCommand::Listen(channel) if self.server.is_none() => {
                let limit = self.s.pool.settings().connect_timeout + LISTEN_CONFIRM_EXTRA;
                if !self.subscribed().listen_confirmed(&channel, limit).await {
                    self.s.view.set_query(frame.body());
                    let mut buf = BytesMut::new();
                    ClientError::ListenerUnavailable(limit)
                        .error()
                        .write(&mut buf);
                    write::ready_for_query(&mut buf, b'I');
                    self.to_client.push(buf);
                    return true;
                }
            }
            // Inside a transaction the server runs it (in order, with its errors); the
            // catalog then says whether it committed.
            crate::notify::ListenCommand::Listen(_) => return false,
            // With a server held, it counts when its transaction commits.
            unlisten if self.server.is_some() => {
                self.pend_unlisten(unlisten);
                return false; // a no-op on the server, answered by it in its turn
            }
            crate::notify::ListenCommand::Unlisten(channel) => {
                if let Some(sub) = self.subscription.as_deref_mut() {
                    sub.unlisten(&channel);
                }
            }
            crate::notify::ListenCommand::UnlistenAll => {
                if let Some(sub) = self.subscription.as_deref_mut() {
                    sub.unlisten_all();
                }
            }
        }
        self.show_channels();
        self.s.view.set_query(frame.body());
        let mut buf = BytesMut::new();
        write::command_complete(&mut buf, tag);
        write::ready_for_query(&mut buf, b'I');
        self.to_client.push(buf);
        true
    }

    /// A Parse of `UNLISTEN name` / `UNLISTEN *` from a listening client (pgjdbc sends them
    /// by the extended protocol): applied as it goes; the server, which listens to
    /// nothing, runs it as a no-op.
    pub(super) fn unlisten_by_parse(&mut self, parse: Option<&Parse<'_>>) {
        if self.subscription.is_none() {
            return;
        }
        let Some(parse) = parse else {
            return;
        };
        match crate::notify::parse_listen(parse.query.as_bytes()) {
            Some(crate::notify::ListenCommand::Listen(_)) | None => {}
            Some(unlisten) => self.pend_unlisten(unlisten),
        }
    }

    /// An UNLISTEN that goes to the client's server: it counts when its transaction
    /// commits (the server listens to nothing, so its catalog cannot say).
    fn pend_unlisten(&mut self, unlisten: crate::notify::ListenCommand) {
        let pending = &mut self.pending_unlisten;
        if pending.commands.is_empty() {
            pending.outcome = Outcome::Open;
        }
        pending.commands.push(unlisten);
    }

    /// A CommandComplete (`Some(tag)`) or an ErrorResponse (`None`) going to the client,
    /// while an UNLISTEN waits for its transaction's end: what decides the end.
    pub(super) fn unlisten_outcome(&mut self, tag: Option<&[u8]>) {
        let pending = &mut self.pending_unlisten;
        if pending.commands.is_empty() {
            return;
        }
        pending.outcome = match tag {
            Some(t) if t.starts_with(b"COMMIT") => Outcome::Committed,
            Some(t) if t.starts_with(b"ROLLBACK") => Outcome::RolledBack,
            Some(_) => Outcome::Open,
            None => Outcome::Failed,
        };
    }

    /// The client's ReadyForQuery says its transaction is over: pending UNLISTENs count
    /// if it committed (`COMMIT`, or statements that ran without an error outside a
    /// block), not if it was rolled back or failed.
    pub(super) fn unlisten_at_transaction_end(&mut self) {
        let pending = std::mem::take(&mut self.pending_unlisten);
        if pending.commands.is_empty() {
            return;
        }
        let counts = matches!(pending.outcome, Outcome::Committed | Outcome::Open);
        if let (true, Some(sub)) = (counts, self.subscription.as_deref_mut()) {
            for command in pending.commands {
                match command {
                    crate::notify::ListenCommand::Unlisten(channel) => sub.unlisten(&channel),
                    crate::notify::ListenCommand::UnlistenAll => sub.unlisten_all(),
                    crate::notify::ListenCommand::Listen(_) => {}
                }
            }
            self.show_channels();
        }
    }

    /// Discards `kinds` of state on the server, with a hidden query before it goes back.
    fn reset_state(&mut self, kinds: Kinds) {
        if kinds.contains(StateKind::PreparedStatement)
            && let Some(server) = self.server.as_mut()
        {
            // DEALLOCATE ALL takes pgmux's statements too: they are prepared again on demand.
            server.prepared().clear();
        }
        let mut query = BytesMut::new();
        write::query(&mut query, &kinds.reset_sql());
        self.to_server.push(query);
        self.replies.hidden(Kind::Query, Effect::ResetState);
    }

    /// The statements that discard the state a pinned client leaves, for cleanup when it
    /// disconnects; `None` when it pins nothing.
    pub(super) fn pinned_reset_sql(&self) -> Option<(String, bool)> {
        let pin = self.state.work.as_ref()?.pin.as_ref()?;
        Some((
            pin.kinds.reset_sql(),
            pin.kinds.contains(StateKind::PreparedStatement),
        ))
    }
}

/// UNLISTENs sent to the client's server, waiting for the end of their transaction.
#[derive(Default)]
pub(in crate::client) struct PendingUnlisten {
    commands: Vec<crate::notify::ListenCommand>,
    outcome: Outcome,
}

impl PendingUnlisten {
    /// Whether none waits.
    pub(super) fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

/// How the transaction of a pending UNLISTEN looks so far: what the last CommandComplete
/// or ErrorResponse to the client said.
#[derive(Default, Clone, Copy)]
enum Outcome {
    /// Statements ran (an implicit transaction commits like this).
    #[default]
    Open,
    Committed,
    RolledBack,
    Failed,
}

/// A client's ReadyForQuery held until the listener connection LISTENs to the channels
/// its transaction LISTENed to.
pub(in crate::client) struct ListenConfirm {
    ready: Option<BytesMut>,
    pub(super) deadline: Instant,
    limit: Duration,
}

/// How much longer than `connect_timeout` a LISTEN waits for the listener connection.
const LISTEN_CONFIRM_EXTRA: Duration = Duration::from_secs(5);

/// "A temporary table" from "a temporary table".
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
