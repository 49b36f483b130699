//! One logged-in client: the transaction loop.
//!
//! The session reads client messages, checks a server out of the pool on the first
//! message of a transaction, forwards both directions, and gives the server back when
//! every message it sent has been answered ([`Replies`] is empty), nothing is left
//! unsynced, and the last ReadyForQuery said `I` (transaction mode). Reads and writes are
//! non-blocking on both sockets from one task, so neither direction can stall the other,
//! and per-direction buffers are bounded: a large message streams through in pieces.
//!
//! Named prepared statements and session settings follow the client across servers: see
//! [`crate::prepared`] and [`super::params`]; [`super::statements`] rewrites the messages.
//!
//! This file holds the loop and its limits; `from_server.rs` handles what the server
//! sends, `from_client.rs` what the client sends (and checkout), `cleanup.rs` what happens
//! to the server when the session ends.

mod cleanup;
mod from_client;
mod from_server;
mod state;

pub(in crate::client) use state::MovedPin;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::{Instant, Sleep};
use tokio_util::codec::Decoder;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::error::ClientError;
use super::params::{ClientParams, SessionChange};
use super::queue::OutQueue;
use super::replies::{Done, Effect, Expect, Kind, Replies, Route};
use super::stream::ClientStream;
use crate::cancel::{self, CancelHandle, CancelTarget};
use crate::clients::{Alert, ClientHandle, ClientState};
use crate::config::{PoolMode, SessionStatePolicy};
use crate::logging::Escaped;
use crate::pool::{Lease, Pool};
use crate::prepared::{ClientStatements, Registry};
use crate::protocol::{Frame, MessageCodec, ProtocolError, tag, write};
use crate::server::{ServerEvent, SettingValue, TxStatus};
use crate::upgrade::Departing;
use crate::upgrade::state::{Hold, PreparedState, SessionState};

/// Stop reading a peer while this much waits to be written to either side: replies pgmux
/// makes itself count like forwarded ones, so a client that does not read stops being read.
const HIGH_WATER: usize = 256 * 1024;
/// Stop reading the client while this many replies are expected from the server (pipelined
/// messages are bounded by count too, not only by bytes).
const MAX_PENDING_REPLIES: usize = 16 * 1024;
/// Bytes reserved for one read from a client (adapted between these bounds) / a server.
const MIN_CLIENT_READ: usize = 1024;
const MAX_CLIENT_READ: usize = 64 * 1024;
const CLIENT_READ: usize = 8 * 1024;
const SERVER_READ: usize = 32 * 1024;
const MAX_SERVER_READ: usize = 256 * 1024;
/// Client messages up to this size are held whole (a named Parse must be); larger ones stream.
pub(super) const CLIENT_MAX_WHOLE: usize = 1024 * 1024;
/// How long cleanup may take on a server whose client left (ROLLBACK, reset query).
const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

/// Client messages dropped after an error pgmux answered itself.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Skip {
    No,
    /// The rest of a large message whose start was refused.
    RestOfMessage,
    /// Extended-protocol messages up to the next Sync, which pgmux answers (no server held).
    UntilSync,
    /// Extended-protocol messages up to the next Sync, which goes to the server held.
    UntilSyncForwarded,
}

/// Why the loop ended.
enum End {
    /// The client left (EOF, reset, or Terminate).
    ClientGone,
    /// An upgrade: the client is quiet and goes to the new process (`crate::upgrade`).
    Move,
    /// Tell the client this, then close. (Boxed: the loop returns it from every step.)
    Fatal(Box<ClientError>),
    /// Idle for `park_idle_after` with nothing held or in flight: the session goes to its
    /// thread's parking lot without a task (`client/park.rs`).
    Park,
}

/// How [`Session::run`] ended.
pub(in crate::client) enum Ended {
    /// The session is over: the client left or was told why it is closed.
    Closed,
    /// An upgrade moves the client: its state, and the server it keeps.
    Moved(Box<Departing>),
    /// Idle: the session waits in the parking lot, and runs again when the client sends.
    Parked(Box<ParkedSession>),
}

impl End {
    fn fatal(err: ClientError) -> End {
        End::Fatal(Box::new(err))
    }
}

/// The time limits a session enforces, from the config at login ([`Session::limits`]).
/// Zero = no limit.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// `pool.idle_transaction_timeout`: a server held while the client sends nothing.
    pub idle_transaction: Duration,
    /// `pool.query_timeout`: a server that sends nothing while the client waits for it.
    pub query: Duration,
    /// `server.partial_message_timeout`: a client silent in the middle of a message.
    pub partial_message: Duration,
    /// `pool.pinned_idle_timeout`: a pinned client that sends nothing between transactions.
    pub pinned_idle: Duration,
}

/// Which limit a deadline enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timeout {
    IdleInTransaction,
    Query,
    PartialMessage,
    PinnedIdle,
    /// The listener connection did not confirm a transaction's LISTENs in time.
    ListenConfirm,
}

enum Event {
    ServerRead(io::Result<usize>),
    ClientRead(io::Result<usize>),
    Writable,
    /// The next NotificationResponse for a listening client (`None`: it was cut off).
    Notification(Option<bytes::Bytes>),
    /// The listener connection LISTENs to what the client's transaction LISTENed to.
    ListenConfirmed,
    Deadline(Timeout),
    /// An upgrade reached this client at a quiet point: move it, or close it.
    Upgrade(Option<&'static str>),
    Stop,
    Kill,
    Retired,
    /// The sweep asked this idle session to park ([`Alert::PARK`]).
    Park,
}

/// Everything a logged-in client needs but its socket; built by login.
pub struct Session {
    pub(super) pool: Arc<Pool>,
    /// The server held from login (session mode), if any.
    pub(super) server: Option<Lease>,
    pub(super) mode: PoolMode,
    /// The pool's settings the client logged in under (its limits, the reset query),
    /// shared with the pool: a session keeps copies only of the few read per message.
    pub(super) settings: Arc<crate::config::PoolSettings>,
    /// `server.partial_message_timeout`.
    pub(super) partial_message: Duration,
    /// `server.max_message_size`.
    pub(super) max_message_size: usize,
    pub(super) max_prepared: usize,
    /// `pool.session_state`: what to do with session state a transaction leaves.
    pub(super) state_policy: SessionStatePolicy,
    /// `pool.session_state_check = "always"`: verify after every transaction.
    pub(super) verify_always: bool,
    pub(super) registry: Arc<Registry>,
    pub(super) params: ClientParams,
    pub(super) cancel: CancelHandle,
    /// What the admin views show of this client.
    pub(super) view: ClientHandle,
    /// Stop between transactions (graceful shutdown).
    pub(super) stop: CancellationToken,
    /// Stop now: the grace period is over (the pooler's kill token). The console's KILL
    /// and KILL_CLIENT, and this token once it fires, raise [`Alert::KILL`] on the
    /// session's registry entry.
    pub(super) kill: CancellationToken,
    /// Fired when an upgrade's new process took over: move at the next quiet point.
    pub(super) upgrade: CancellationToken,
    /// Named prepared statements the client already has (moved in by an upgrade).
    pub(super) statements: ClientStatements,
    /// Bytes read from the client and not yet framed.
    pub(super) cbuf: BytesMut,
    /// Its place under the client caps, if any applies; given back with the session.
    pub(super) _client_slot: Option<crate::pooler::ClientSlot>,
    /// LISTEN/NOTIFY fan-out (`notify.rs`), for a client that LISTENs.
    pub(super) notify: Arc<crate::notify::Notify>,
    /// The subscription an upgrade moved in with the client (its LISTENs).
    pub(super) subscription: Option<Box<crate::notify::Subscription>>,
}

/// What a parked client keeps of its session (`client/park.rs`): the [`Session`] without
/// what it cannot hold while parked (a server, a subscription, buffered bytes) and without
/// the pooler's shared handles, which [`ParkedSession::resume`] takes from the pooler
/// again (memory per idle client: about 100 bytes less for each parked client).
pub(in crate::client) struct ParkedSession {
    pool: Arc<Pool>,
    mode: PoolMode,
    settings: Arc<crate::config::PoolSettings>,
    partial_message: Duration,
    max_message_size: usize,
    max_prepared: usize,
    state_policy: SessionStatePolicy,
    verify_always: bool,
    params: ClientParams,
    cancel: CancelHandle,
    pub(in crate::client) view: ClientHandle,
    statements: ClientStatements,
    client_slot: Option<crate::pooler::ClientSlot>,
}

impl Session {
    /// The session, parked: nothing is held or buffered (`Loop::can_park`).
    fn parked(self) -> ParkedSession {
        debug_assert!(self.server.is_none() && self.subscription.is_none() && self.cbuf.is_empty());
        ParkedSession {
            pool: self.pool,
            mode: self.mode,
            settings: self.settings,
            partial_message: self.partial_message,
            max_message_size: self.max_message_size,
            max_prepared: self.max_prepared,
            state_policy: self.state_policy,
            verify_always: self.verify_always,
            params: self.params,
            cancel: self.cancel,
            view: self.view,
            statements: self.statements,
            client_slot: self._client_slot,
        }
    }
}

impl ParkedSession {
    /// The session again, with the pooler's shared handles, to run when the client sends.
    pub(in crate::client) fn resume(self, pooler: &crate::pooler::Pooler) -> Session {
        Session {
            pool: self.pool,
            server: None,
            mode: self.mode,
            settings: self.settings,
            partial_message: self.partial_message,
            max_message_size: self.max_message_size,
            max_prepared: self.max_prepared,
            state_policy: self.state_policy,
            verify_always: self.verify_always,
            registry: pooler.statements.clone(),
            params: self.params,
            cancel: self.cancel,
            view: self.view,
            stop: pooler.stop.clone(),
            kill: pooler.kill.clone(),
            upgrade: pooler.upgrade.handover.clone(),
            statements: self.statements,
            cbuf: BytesMut::new(),
            _client_slot: self.client_slot,
            notify: pooler.notify.clone(),
            subscription: None,
        }
    }
}

pub(super) struct Loop<'c> {
    pub(super) s: Session,
    client: &'c mut ClientStream,
    codec: MessageCodec,
    to_client: OutQueue,
    pub(super) to_server: OutQueue,
    pub(super) server: Option<Lease>,
    pub(super) replies: Replies,
    pub(super) statements: ClientStatements,
    /// Session state the client may have left on its server (`state.rs`).
    pub(super) state: state::StateWatch,
    /// Extended-protocol messages forwarded since the last Sync.
    unsynced: bool,
    /// The start of a client message went to the server, its end not yet.
    pub(super) client_mid_message: bool,
    /// The server message streaming through now is swallowed (pgmux's own query).
    swallowing: bool,
    /// The server is in COPY IN mode: it ignores the client's Sync and Flush.
    copy_in: bool,
    /// The server sent the client a FATAL error: its close is expected.
    pub(super) server_ended: bool,
    pub(super) skip: Skip,
    /// When either peer last sent bytes; read only while a limit is set.
    last_activity: Instant,
    /// How much to reserve for the next client read / server read.
    client_read: usize,
    server_read: usize,
    /// Fires when a time limit is reached; made on first need.
    timer: Option<Pin<Box<Sleep>>>,
    /// The channels the client LISTENs to and its queue of notifications; made at its
    /// first LISTEN (transaction and statement mode).
    pub(super) subscription: Option<Box<crate::notify::Subscription>>,
    /// A transaction's LISTENs wait for the listener connection (`state.rs`).
    pub(super) listen_confirm: Option<Box<state::ListenConfirm>>,
    /// UNLISTENs that count when their transaction commits.
    pub(super) pending_unlisten: state::PendingUnlisten,
}

/// What differs between a client that logged in here (`login.rs`) and one an upgrade moved
/// in (`adopt.rs`); [`Session::assemble`] takes the rest from the pooler and the pool.
pub(in crate::client) struct SessionParts {
    pub server: Option<Lease>,
    pub view: ClientHandle,
    pub params: ClientParams,
    pub cancel: CancelHandle,
    pub statements: ClientStatements,
    pub cbuf: BytesMut,
    pub client_slot: Option<crate::pooler::ClientSlot>,
    pub subscription: Option<Box<crate::notify::Subscription>>,
}

impl Session {
    /// A session of `pool` with its limits and policies from the pool's settings and
    /// `snapshot` (the config the client logged in under).
    pub(in crate::client) fn assemble(
        pooler: &crate::pooler::Pooler,
        snapshot: &crate::pooler::Snapshot,
        pool: Arc<Pool>,
        parts: SessionParts,
    ) -> Session {
        let settings = pool.settings();
        let server = &snapshot.config.server;
        Session {
            server: parts.server,
            view: parts.view,
            mode: settings.mode,
            partial_message: server.partial_message_timeout,
            state_policy: settings.session_state,
            verify_always: settings.verify_every_transaction,
            max_message_size: server.max_message_size,
            max_prepared: settings.max_prepared_statements as usize,
            settings,
            registry: pooler.statements.clone(),
            params: parts.params,
            pool,
            cancel: parts.cancel,
            stop: pooler.stop.clone(),
            kill: pooler.kill.clone(),
            upgrade: pooler.upgrade.handover.clone(),
            statements: parts.statements,
            cbuf: parts.cbuf,
            _client_slot: parts.client_slot,
            notify: pooler.notify.clone(),
            subscription: parts.subscription,
        }
    }
}

impl Session {
    /// Serves the client until it leaves or the pooler stops; then cleans up the server
    /// it held, if any. The socket stays the caller's (the future gives it back at the
    /// end): if the session panics, the caller can still tell the client. Resolves to the
    /// session's state (and the server it keeps, if any) when an upgrade moves the client
    /// to the new process (the caller hands the socket over with it). `pin`: the client
    /// was moved in pinned to `self.server`. `resumed`: the session was parked and runs
    /// again (`client/park.rs`). Resolves to [`Ended::Parked`] with the session when it
    /// parks.
    ///
    /// Not an `async fn`: the session is moved into the loop here, before the future
    /// exists, so the future holds it once. An `async fn` would also keep its argument
    /// (and the argument's rebinding) for the client's whole life, dead: 2 x 328 bytes
    /// per idle client (memory per idle client, docs/performance.md).
    pub fn run<'c>(
        mut self,
        client: &'c mut ClientStream,
        pin: Option<Box<MovedPin>>,
        resumed: bool,
    ) -> impl Future<Output = (Ended, &'c mut ClientStream)> + Send + 'c {
        if resumed {
            self.view.alert().clear(Alert::PARK);
        }
        let server = self.server.take();
        let statements = std::mem::take(&mut self.statements);
        let subscription = self.subscription.take();
        let codec = MessageCodec::new(CLIENT_MAX_WHOLE).with_max_len(self.max_message_size);
        let mut l = Loop {
            s: self,
            client,
            codec,
            to_client: OutQueue::default(),
            to_server: OutQueue::default(),
            server,
            replies: Replies::default(),
            statements,
            state: pin
                .map(|pin| state::StateWatch::moved_in(*pin))
                .unwrap_or_default(),
            unsynced: false,
            client_mid_message: false,
            swallowing: false,
            copy_in: false,
            server_ended: false,
            skip: Skip::No,
            last_activity: Instant::now(),
            client_read: MIN_CLIENT_READ,
            server_read: SERVER_READ,
            timer: None,
            subscription,
            listen_confirm: None,
            pending_unlisten: state::PendingUnlisten::default(),
        };
        async move {
            let end = match l.on_client_bytes().await {
                Ok(()) => l.serve(resumed).await,
                Err(end) => end,
            };
            if let End::Park = end {
                // Nothing is in flight (`can_park`): what the loop took goes back into
                // the session, which is all a parked client keeps.
                l.s.statements = std::mem::take(&mut l.statements);
                l.s.cbuf = BytesMut::new();
                return (Ended::Parked(Box::new(l.s.parked())), l.client);
            }
            if let End::Move = end {
                // Quiet: nothing buffered either way, and no server held but one the
                // client keeps between transactions, idle (upgrade_step).
                let state = l.moving_state();
                let server = l.server.take();
                if server.is_some() {
                    // No cancel of this client may reach the server once it has moved.
                    l.s.cancel.set_target(None);
                    l.s.cancel.settled().await;
                }
                return (
                    Ended::Moved(Box::new(Departing { state, server })),
                    l.client,
                );
            }
            if let End::Fatal(err) = &end {
                debug!(pool = %Escaped(&l.s.pool.key), err = %Escaped(&err), "closing client session");
                let mut buf = BytesMut::new();
                err.fatal().write(&mut buf);
                l.to_client.push(buf);
            }
            // Flush what the client is owed (the error above, or results), briefly.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                l.to_client.write_all(&mut *l.client),
            )
            .await;
            Box::pin(l.finish_server()).await;
            (Ended::Closed, l.client)
        }
    }
}

impl Session {
    /// The time limits this session enforces.
    pub(super) fn limits(&self) -> Limits {
        let settings = &*self.settings;
        Limits {
            idle_transaction: settings.idle_transaction_timeout,
            query: settings.query_timeout,
            partial_message: self.partial_message,
            pinned_idle: settings.pinned_idle_timeout,
        }
    }

    /// Why [`Alert::KILL`] was raised: a shutdown (the stop came first), or the console's
    /// KILL or KILL_CLIENT of this client.
    pub(super) fn killed(&self) -> ClientError {
        if self.stop.is_cancelled() {
            ClientError::ShuttingDown
        } else {
            ClientError::KilledByAdmin
        }
    }
}

impl Loop<'_> {
    async fn serve(&mut self, resumed: bool) -> End {
        // Stop, kill and a reload that removes this pool come as flags on the session's
        // alert (clients.rs), raised when the tokens fire; one that fired before this
        // session registered is seen here.
        let alert = self.s.view.alert();
        for (fired, flag) in [
            (self.s.stop.is_cancelled(), Alert::STOP),
            (self.s.kill.is_cancelled(), Alert::KILL),
            (self.s.pool.retired().is_cancelled(), Alert::RETIRED),
            (self.s.upgrade.is_cancelled(), Alert::MOVE),
        ] {
            if fired {
                alert.raise(flag);
            }
        }
        // A client whose login was under way when the stop came was accepted before the
        // listeners closed: it gets its first transaction (bounded by shutdown_timeout)
        // instead of a 57P01 for the BEGIN it sends right after logging in. (Not a parked
        // one that runs again: it had its transactions.)
        let mut first_is_due = self.s.stop.is_cancelled() && !resumed;
        loop {
            if self.server.is_some() {
                first_is_due = false;
            }
            if self.to_client.write_now(&mut *self.client).is_err() {
                return End::ClientGone;
            }
            if let Some(server) = &mut self.server
                && let Err(e) = self.to_server.write_now(server.stream_mut())
            {
                return self.server_lost(e.into());
            }
            let read_server = self.server.is_some() && self.to_client.len() < HIGH_WATER;
            let read_client = self.to_server.len() < HIGH_WATER
                && self.to_client.len() < HIGH_WATER
                && self.replies.len() < MAX_PENDING_REPLIES;
            // TLS: ciphertext accepted earlier may still wait for the socket.
            let write_server = self
                .server
                .as_ref()
                .is_some_and(|s| !self.to_server.is_empty() || s.stream().wants_write());
            // TLS: ciphertext accepted earlier may still wait for the socket.
            let write_client = !self.to_client.is_empty() || self.client.wants_write();
            // Notifications go to the client between transactions, as PostgreSQL sends
            // them, and only while it reads what it is sent.
            let deliver = self.subscription.is_some()
                && self.to_client.len() < HIGH_WATER
                && self.settled() == Some(TxStatus::Idle);
            let deadline = self.deadline();
            // Session mode holds a server between transactions too: it may stop then.
            let between_transactions =
                self.to_client.is_empty() && self.settled() == Some(TxStatus::Idle);
            // Only once an upgrade asked (MOVE): no cost per turn otherwise. A MOVE raised
            // after this look wakes the poll below, which comes round to look again.
            let move_checked = between_transactions && self.s.view.alert().is_raised(Alert::MOVE);
            let upgrade_step = if move_checked {
                self.upgrade_step()
            } else {
                None
            };
            // One hand-written poll instead of `select!`: no futures to build and drop each
            // turn, and an idle session stays small (memory per idle client).
            let event = std::future::poll_fn(|cx| {
                let alerts = match self.s.view.alert().poll(cx) {
                    Poll::Ready(flags) => flags,
                    Poll::Pending => 0,
                };
                if alerts & Alert::KILL != 0 {
                    return Poll::Ready(Event::Kill);
                }
                if read_server
                    && let Some(s) = self.server.as_deref_mut()
                    && let Poll::Ready(read) = s.poll_read(cx, self.server_read)
                {
                    return Poll::Ready(Event::ServerRead(read));
                }
                if read_client && self.client.poll_read_ready(cx).is_ready() {
                    // The buffer is taken only now, from the thread's kept ones, and given
                    // back once emptied (`read_buffers.rs`): an idle client holds none.
                    if self.s.cbuf.capacity() == 0 {
                        self.s.cbuf = crate::client::read_buffers::take();
                    }
                    self.s.cbuf.reserve(self.client_read);
                    let read = poll_read_buf(Pin::new(&mut *self.client), cx, &mut self.s.cbuf);
                    if let Poll::Ready(read) = read {
                        return Poll::Ready(Event::ClientRead(read));
                    }
                    if self.s.cbuf.is_empty() {
                        crate::client::read_buffers::give(std::mem::take(&mut self.s.cbuf));
                    }
                }
                if self.listen_confirm.is_some()
                    && let Some(sub) = self.subscription.as_deref()
                    && sub.poll_confirmed(cx).is_ready()
                {
                    return Poll::Ready(Event::ListenConfirmed);
                }
                if deliver
                    && let Some(sub) = self.subscription.as_deref_mut()
                    && let Poll::Ready(next) = sub.poll_next(cx)
                {
                    return Poll::Ready(Event::Notification(next));
                }
                if write_client && self.client.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(Event::Writable);
                }
                if write_server
                    && let Some(s) = self.server.as_deref_mut()
                    && s.stream_mut().poll_write_ready(cx).is_ready()
                {
                    return Poll::Ready(Event::Writable);
                }
                match deadline {
                    Some((deadline, which)) => {
                        let timer = self
                            .timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        if timer.deadline() != deadline {
                            timer.as_mut().reset(deadline);
                        }
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Event::Deadline(which));
                        }
                    }
                    None => self.timer = None,
                }
                if between_transactions {
                    if alerts & Alert::STOP != 0 && !first_is_due {
                        return Poll::Ready(Event::Stop);
                    }
                    if alerts & Alert::RETIRED != 0 {
                        return Poll::Ready(Event::Retired);
                    }
                    if alerts & Alert::MOVE != 0 {
                        if let Some(step) = upgrade_step {
                            return Poll::Ready(Event::Upgrade(step));
                        }
                        if !move_checked {
                            return Poll::Ready(Event::Writable); // look again, now
                        }
                    }
                    if alerts & Alert::PARK != 0 {
                        return Poll::Ready(Event::Park);
                    }
                }
                Poll::Pending
            })
            .await;
            let result = match event {
                Event::ServerRead(read) => self.on_server_read(read),
                Event::ClientRead(read) => self.on_client_read(read).await,
                Event::Writable => Ok(()),
                Event::Notification(Some(first)) => {
                    self.deliver_notifications(first);
                    Ok(())
                }
                Event::ListenConfirmed => {
                    self.listen_confirmed(true);
                    Ok(())
                }
                Event::Notification(None) => Err(End::fatal(ClientError::NotifyOverflow(
                    crate::notify::CLIENT_QUEUE,
                ))),
                Event::Deadline(Timeout::ListenConfirm) => {
                    self.listen_confirmed(false);
                    Ok(())
                }
                Event::Deadline(which) => Err(End::fatal(self.timed_out(which))),
                // Raised for every client of the removed pool's (database, user): this
                // one may be on the pool that replaced it.
                Event::Retired if !self.s.pool.retired().is_cancelled() => {
                    self.s.view.alert().clear(Alert::RETIRED);
                    Ok(())
                }
                Event::Retired => Err(End::fatal(ClientError::PoolRemoved)),
                Event::Stop => Err(End::fatal(ClientError::ShuttingDown)),
                Event::Kill => Err(End::fatal(self.s.killed())),
                Event::Park if self.can_park() => Err(End::Park),
                Event::Park => {
                    // Not asked again before another park_idle_after (clients.rs).
                    debug!(pool = %Escaped(&self.s.pool.key), "idle client cannot park");
                    self.s.view.decline_park();
                    super::park::count_declined();
                    Ok(())
                }
                Event::Upgrade(None) => Err(End::Move),
                Event::Upgrade(Some(why)) => {
                    crate::upgrade::count_closed();
                    Err(End::fatal(ClientError::Upgrading(why)))
                }
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Queues `first` and every notification already waiting (up to the output bound) for
    /// the client in one buffer: a backlog goes out in one write, not one per
    /// notification. One for a channel UNLISTENed since it was queued is left out, as
    /// PostgreSQL checks at delivery.
    fn deliver_notifications(&mut self, first: bytes::Bytes) {
        let Some(sub) = self.subscription.as_deref_mut() else {
            return;
        };
        let mut batch = BytesMut::new();
        let mut next = Some(first);
        while let Some(message) = next {
            if sub.wants(&message) {
                batch.extend_from_slice(&message);
            }
            if self.to_client.len() + batch.len() >= HIGH_WATER {
                break;
            }
            next = sub.try_next();
        }
        // Empty: only an upgrade's wake-up (`notify.rs`, `Handover`), nothing to send.
        if !batch.is_empty() {
            self.to_client.push(batch);
        }
    }

    /// The transaction status once nothing is in flight between the client and its
    /// server (every message answered, nothing half-sent, unsynced or left to write):
    /// `Some(Idle)` means the transaction is over and the server may go back to the pool.
    /// `None` while something is in flight; `Some(Idle)` when no server is held.
    fn settled(&self) -> Option<TxStatus> {
        let Some(server) = &self.server else {
            return Some(TxStatus::Idle);
        };
        let quiet = self.replies.is_empty()
            && !self.unsynced
            && !self.client_mid_message
            && self.to_server.is_empty();
        quiet.then(|| server.tx_status())
    }

    /// Between transactions, during an upgrade: `Some(None)` when the client can move now
    /// (no server held but one it keeps, idle with nothing unread, nothing read and not
    /// yet handled, no message half-read or skipped, no LISTEN or UNLISTEN waiting),
    /// `Some(Some(why))` when it can never move and is closed now, `None` when it should
    /// wait (a server not yet given back).
    fn upgrade_step(&self) -> Option<Option<&'static str>> {
        if self.client.tls().is_some() {
            return Some(Some("TLS session keys cannot be carried"));
        }
        if let Some(sub) = self.subscription.as_deref() {
            // Moves with its channels once the hand-over marker has come through and its
            // queue is empty (notify.rs, `Handover`); woken by a MOVE raised then.
            match sub.upgrade_step() {
                crate::notify::MoveStep::Close(why) => return Some(Some(why)),
                crate::notify::MoveStep::Wait => return None,
                crate::notify::MoveStep::Move => {}
            }
        }
        let keeps = self.s.mode == PoolMode::Session || self.pinned();
        let server_quiet = match self.server.as_deref() {
            None => true,
            Some(server) if keeps => {
                if server.tls().is_some() {
                    return Some(Some("its server connection is encrypted (TLS)"));
                }
                server.tx_status() == TxStatus::Idle
                    && !server.has_unread()
                    && !server.stream().wants_write()
                    && self.replies.is_empty()
                    && self.to_server.is_empty()
            }
            Some(_) => false,
        };
        let quiet = server_quiet
            && self.s.cbuf.is_empty()
            && !self.codec.in_message()
            && !self.client_mid_message
            && !self.unsynced
            && self.skip == Skip::No
            && self.listen_confirm.is_none()
            && self.pending_unlisten.is_empty();
        quiet.then_some(None)
    }

    /// Whether the session can park now (`client/park.rs`): transaction or statement mode,
    /// plain TCP, no server held, no LISTEN, no state known on a server, nothing buffered,
    /// half-read, unanswered or skipped, and no alert but PARK.
    fn can_park(&self) -> bool {
        self.s.mode != PoolMode::Session
            && self.server.is_none()
            && matches!(*self.client, ClientStream::Tcp(_))
            && self.subscription.is_none()
            && self.listen_confirm.is_none()
            && self.pending_unlisten.is_empty()
            && self.s.cbuf.is_empty()
            && !self.codec.in_message()
            && !self.client_mid_message
            && self.to_client.is_empty()
            && self.to_server.is_empty()
            && self.replies.is_empty()
            && self.skip == Skip::No
            && !self.unsynced
            && !self.copy_in
            && self.state_is_blank()
            && !self.s.view.alert().is_raised(!Alert::PARK)
    }

    /// What the new process needs to go on serving this client (`crate::upgrade`).
    fn moving_state(&self) -> SessionState {
        let (wants, greeted, seen) = self.s.params.parts();
        let application_name = wants
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("application_name"))
            .and_then(|(_, value)| match value {
                SettingValue::Text(text) => Some(text.clone()),
                SettingValue::Sql(_) => None,
            })
            .unwrap_or_default();
        let statements = self
            .statements
            .iter()
            .filter_map(|(name, statement)| {
                let (query, param_types) = statement.text_and_types()?;
                Some(PreparedState {
                    name: name.to_owned(),
                    query: query.to_owned(),
                    param_types,
                })
            })
            .collect();
        let hold = match self.pin_kinds() {
            Some(kinds) => Hold::Pinned(kinds),
            None => Hold::Session,
        };
        SessionState {
            database: self.s.pool.key.database.clone(),
            user: self.s.pool.key.user.clone(),
            application_name,
            cancel_key: self.s.cancel.key(),
            wants,
            greeted,
            seen,
            statements,
            channels: self
                .subscription
                .as_deref()
                .map(|sub| sub.channels().map(str::to_owned).collect())
                .unwrap_or_default(),
            // upgrade_step let only a plain connection through.
            server: self.server.as_deref().and_then(|s| s.carried(hold).ok()),
        }
    }

    /// Notes activity, for the time limits (no clock read when none is set).
    /// Called after bytes were handled, so that the clock is read only when a limit can
    /// apply now (a client mid-message, or a server held with a limit set): with the
    /// default config, a transaction reads no clock.
    fn touch(&mut self) {
        let limits = &self.s.limits();
        let holding = self.server.is_some()
            && (!limits.query.is_zero()
                || !limits.idle_transaction.is_zero()
                || (!limits.pinned_idle.is_zero() && self.pinned()));
        let mid_message = !limits.partial_message.is_zero()
            && (self.client_mid_message || self.codec.in_message() || !self.s.cbuf.is_empty());
        if holding || mid_message {
            self.last_activity = Instant::now();
        }
    }

    /// The time limit that applies now, if one is set, and when it is reached:
    /// - the client stopped in the middle of a message: `partial_message_timeout`;
    /// - the client waits for the server's answer: `query_timeout` (not while pgmux itself
    ///   stops reading the server because the client does not read its results);
    /// - the client holds a server and owes it the next message (inside a transaction, or
    ///   after Parse/Bind/Flush without Sync): `idle_transaction_timeout`.
    fn deadline(&self) -> Option<(Instant, Timeout)> {
        let limits = &self.s.limits();
        if let Some(wait) = &self.listen_confirm {
            return Some((wait.deadline, Timeout::ListenConfirm));
        }
        let mid_message =
            self.client_mid_message || self.codec.in_message() || !self.s.cbuf.is_empty();
        if mid_message && !limits.partial_message.is_zero() {
            return Some((
                self.last_activity + limits.partial_message,
                Timeout::PartialMessage,
            ));
        }
        let server = self.server.as_ref()?;
        if !self.replies.is_empty() || !self.to_server.is_empty() {
            let waiting_on_server = self.to_client.len() < HIGH_WATER;
            return (waiting_on_server && !limits.query.is_zero())
                .then(|| (self.last_activity + limits.query, Timeout::Query));
        }
        let owes_server = server.tx_status() != TxStatus::Idle || self.unsynced;
        if owes_server {
            return (!limits.idle_transaction.is_zero()).then(|| {
                (
                    self.last_activity + limits.idle_transaction,
                    Timeout::IdleInTransaction,
                )
            });
        }
        (self.pinned() && !limits.pinned_idle.is_zero())
            .then(|| (self.last_activity + limits.pinned_idle, Timeout::PinnedIdle))
    }

    /// What the client is told when a time limit ends its session.
    fn timed_out(&self, which: Timeout) -> ClientError {
        let limits = &self.s.limits();
        match which {
            Timeout::IdleInTransaction => ClientError::IdleInTransaction(limits.idle_transaction),
            Timeout::Query => ClientError::QueryTimeout(limits.query),
            Timeout::PartialMessage => ClientError::PartialMessage(limits.partial_message),
            Timeout::PinnedIdle => ClientError::PinnedIdle(limits.pinned_idle),
            Timeout::ListenConfirm => ClientError::ListenerUnavailable(Duration::ZERO),
        }
    }
}

/// Debug builds only (tests): `PGMUX_TEST_PANIC_ON=<query text>` in pgmux's environment makes
/// a session panic on a Query with exactly that text, so that tests can prove a panicking
/// session is contained (XX000 to its client, its server and slot given back). Release
/// builds have no such code.
#[cfg(debug_assertions)]
mod injected_fault {
    use std::sync::OnceLock;

    static TRIGGER: OnceLock<Option<Vec<u8>>> = OnceLock::new();

    pub(super) fn panic_if_asked(query: &[u8]) {
        let trigger = TRIGGER.get_or_init(|| {
            std::env::var("PGMUX_TEST_PANIC_ON").ok().map(|t| {
                let mut t = t.into_bytes();
                t.push(0);
                t
            })
        });
        if trigger.as_deref() == Some(query) {
            panic!("injected by PGMUX_TEST_PANIC_ON");
        }
    }
}
