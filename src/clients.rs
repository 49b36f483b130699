//! Who is connected and what they do: the live client registry behind `/clients`,
//! `/servers`, `SHOW CLIENTS` and `SHOW SERVERS`.
//!
//! Each logged-in client session owns a [`ClientHandle`] and writes its state there as it
//! changes: atomics, plus a tiny lock around the current query text that only the session
//! and an admin read ever take. An entry is small (memory per idle client): the query text
//! takes the room its longest query needed (at most [`QUERY_TEXT_MAX`]), and what few
//! clients have (channels, session state found) is boxed when they first have it. The admin port reads every entry when asked; the session
//! never waits for it. Dropping the handle removes the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU8, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

/// The longest query text kept per client, in bytes.
pub const QUERY_TEXT_MAX: usize = 200;
/// Registry shards: registration and removal of unrelated clients rarely meet on a lock.
const SHARDS: usize = 16;

/// What a client is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientState {
    /// Between transactions, holding no server (transaction mode), or an idle session.
    Idle,
    /// A query or transaction is running on a server.
    Active,
    /// Waiting for a server connection.
    Waiting,
    /// Holds a server inside a transaction and sends nothing.
    IdleInTransaction,
}

impl ClientState {
    /// Every state, in discriminant order.
    pub const ALL: [ClientState; 4] = [
        ClientState::Idle,
        ClientState::Active,
        ClientState::Waiting,
        ClientState::IdleInTransaction,
    ];

    /// The name shown in views, as PostgreSQL's `pg_stat_activity.state` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Active => "active",
            ClientState::Waiting => "waiting",
            ClientState::IdleInTransaction => "idle in transaction",
        }
    }

    /// A name usable as a Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            ClientState::IdleInTransaction => "idle_in_transaction",
            other => other.as_str(),
        }
    }

    fn from_u8(v: u8) -> ClientState {
        ClientState::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(ClientState::Idle)
    }
}

/// Why a client waits for a server connection. Recorded only when a checkout finds no
/// idle server (never on the path that gets one at once), and kept up to date by the pool
/// while the client waits: an operator's PAUSE turns every waiter of the pool `Paused`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaitCause {
    /// Every server of the pool is lent (`size` reached).
    PoolFull = 1,
    /// `max_db_connections` is reached across the database's pools.
    DatabaseCap,
    /// `max_user_connections` is reached across the user's pools.
    UserCap,
    /// A server connection is being opened for this client.
    UpstreamConnecting,
    /// The upstream refused or did not answer; pgmux backs off before trying again.
    UpstreamBackoff,
    /// An operator paused the pool (admin `pause`, console `PAUSE`).
    Paused,
    /// pgmux is shutting down, or a reload removed the pool: it only finishes what runs.
    Draining,
}

impl WaitCause {
    /// Every cause, in discriminant order (from 1).
    pub const ALL: [WaitCause; 7] = [
        WaitCause::PoolFull,
        WaitCause::DatabaseCap,
        WaitCause::UserCap,
        WaitCause::UpstreamConnecting,
        WaitCause::UpstreamBackoff,
        WaitCause::Paused,
        WaitCause::Draining,
    ];

    /// The name in views, in the `cause` label of `pgmux_wait_seconds` and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitCause::PoolFull => "pool_full",
            WaitCause::DatabaseCap => "max_db_connections",
            WaitCause::UserCap => "max_user_connections",
            WaitCause::UpstreamConnecting => "upstream_connecting",
            WaitCause::UpstreamBackoff => "upstream_backoff",
            WaitCause::Paused => "paused",
            WaitCause::Draining => "draining",
        }
    }

    /// The cause stored as `u8` (0: none).
    pub fn from_u8(v: u8) -> Option<WaitCause> {
        WaitCause::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }
}

/// Where the pool writes a waiting client's cause: its registry entry. Cloned into the
/// pool's queue only when the client waits.
#[derive(Clone)]
pub struct WaitCell(Arc<Entry>);

impl WaitCell {
    /// Records the cause (`None`: no longer waiting).
    pub fn set(&self, cause: Option<WaitCause>) {
        self.0
            .wait_cause
            .store(cause.map_or(0, |c| c as u8), Relaxed);
    }
}

/// One client's entry. Written by its session through [`ClientHandle`], read by admins.
struct Entry {
    id: u64,
    peer: SocketAddr,
    /// The database and user it logged in with: one copy per pair, shared by its clients.
    names: Arc<Names>,
    connected: Instant,
    application_name: Mutex<String>,
    /// How the client's connection is encrypted (`TLSv1.3/...`); `None`: plain.
    tls: Option<Arc<str>>,
    /// The channels it LISTENs to and the last session state found: made at the first.
    rare: Mutex<Option<Box<Rare>>>,
    state: AtomicU8,
    /// Nanoseconds after the registry's epoch when `state` last changed.
    state_since: AtomicU64,
    /// When (as `state_since`) the session last declined to park ([`Alert::PARK`]): the
    /// sweep asks it again only `park_idle_after` later.
    park_declined: AtomicU64,
    /// Set by IdleInTransaction, cleared by Idle: whether an Active client is inside a
    /// transaction block.
    in_transaction: AtomicBool,
    /// Why it waits, as `WaitCause as u8`; 0 when it does not.
    wait_cause: AtomicU8,
    /// The held server's id, 0 for none; its backend pid; since when (epoch nanoseconds).
    server_id: AtomicU64,
    server_pid: AtomicI32,
    server_since: AtomicU64,
    /// The first [`QUERY_TEXT_MAX`] bytes of the current (or last) query. Its room grows
    /// to the longest text kept and stays: no allocation per query once grown.
    query: Mutex<Vec<u8>>,
    alert: Alert,
}

/// What an entry holds for few clients, boxed once one has it.
#[derive(Default)]
struct Rare {
    /// The channels it LISTENs to (fan-out).
    channels: Vec<String>,
    /// The last time pgmux found session state this client left on its server. Written
    /// only on those events.
    session_state: Option<StateEvent>,
}

/// What the pooler tells a session to do ([`Alert::STOP`], [`Alert::KILL`],
/// [`Alert::RETIRED`]): a flag and a wake-up. The session checks it at each turn of its
/// loop with two atomic loads instead of polling a cancellation future per event (each
/// poll of one takes a lock); the pooler raises it on every session when the event comes.
#[derive(Default)]
pub struct Alert {
    flags: AtomicU8,
    waker: AtomicWaker,
}

impl Alert {
    /// Stop between transactions (graceful shutdown).
    pub const STOP: u8 = 1;
    /// Stop now (shutdown_timeout is over, or a second signal).
    pub const KILL: u8 = 2;
    /// A reload removed a pool this client may be on: it checks whether it is its own.
    pub const RETIRED: u8 = 4;
    /// An upgrade: hand the client over to the new process at its next quiet point
    /// (`upgrade.rs`), or close it then if it cannot move.
    pub const MOVE: u8 = 8;
    /// Idle for `server.park_idle_after`: park between transactions if the session can
    /// (`client/park.rs`). Stays raised while the client is parked, so that the sweep
    /// skips it.
    pub const PARK: u8 = 16;

    /// Sets `flag` and wakes the session.
    pub fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Release);
        self.waker.wake();
    }

    /// Whether `flag` is raised now (one atomic load; registers no waker).
    pub fn is_raised(&self, flag: u8) -> bool {
        self.flags.load(Acquire) & flag != 0
    }

    /// Clears `flag` (a [`Alert::RETIRED`] meant for another pool).
    pub fn clear(&self, flag: u8) {
        self.flags.fetch_and(!flag, Relaxed);
    }

    /// Ready once `flag` is raised (the session's wait for a server watches KILL so).
    pub fn poll_raised(&self, cx: &mut Context<'_>, flag: u8) -> Poll<()> {
        match self.poll(cx) {
            Poll::Ready(flags) if flags & flag != 0 => Poll::Ready(()),
            _ => Poll::Pending,
        }
    }

    /// The flags raised, or `Pending`; either way the task's waker is registered for the
    /// next flag (a session that has STOP but is inside a transaction must still wake
    /// for KILL).
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<u8> {
        self.waker.register(cx.waker());
        match self.flags.load(Acquire) {
            0 => Poll::Pending,
            flags => Poll::Ready(flags),
        }
    }
}

/// Every logged-in client. Shared (`Arc`) by the pooler, the sessions and the admin port.
pub struct ClientRegistry {
    /// [`coarse_nanos`] when the registry was made.
    epoch: u64,
    next_id: AtomicU64,
    shards: [Mutex<HashMap<u64, Arc<Entry>>>; SHARDS],
    /// The (database, user) pairs of the clients, each stored once ([`Names`]).
    names: Mutex<NameTable>,
}

/// A (database, user) pair as clients logged in with it.
type Names = (String, String);

/// The pairs in use; a pair no client holds any more is swept out when the table has
/// doubled since the last sweep.
#[derive(Default)]
struct NameTable {
    pairs: HashMap<Names, std::sync::Weak<Names>>,
    sweep_at: usize,
}

impl Default for ClientRegistry {
    fn default() -> Self {
        ClientRegistry {
            epoch: coarse_nanos(),
            next_id: AtomicU64::new(1),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            names: Mutex::default(),
        }
    }
}

/// A session's entry in the registry; dropping it removes the client. Every method takes
/// `&self`, touches only atomics (or the entry's own query lock) and never allocates,
/// except [`ClientHandle::set_application_name`].
pub struct ClientHandle {
    entry: Arc<Entry>,
    registry: Arc<ClientRegistry>,
}

impl ClientRegistry {
    /// Adds a logged-in client, idle and holding no server.
    pub fn register(
        self: &Arc<Self>,
        peer: SocketAddr,
        database: &str,
        user: &str,
        application_name: &str,
        tls: Option<Arc<str>>,
    ) -> ClientHandle {
        let id = self.next_id.fetch_add(1, Relaxed);
        let entry = Arc::new(Entry {
            id,
            peer,
            names: self.names(database, user),
            connected: Instant::now(),
            application_name: Mutex::new(application_name.to_owned()),
            tls,
            rare: Mutex::new(None),
            state: AtomicU8::new(ClientState::Idle as u8),
            state_since: AtomicU64::new(self.now()),
            park_declined: AtomicU64::new(0),
            in_transaction: AtomicBool::new(false),
            wait_cause: AtomicU8::new(0),
            server_id: AtomicU64::new(0),
            server_pid: AtomicI32::new(0),
            server_since: AtomicU64::new(0),
            query: Mutex::new(Vec::new()),
            alert: Alert::default(),
        });
        self.shard(id).lock().insert(id, entry.clone());
        ClientHandle {
            entry,
            registry: self.clone(),
        }
    }

    /// How many clients are registered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no client is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Clients per (database, user) and state, indexed by `ClientState as usize`.
    pub fn counts(&self) -> HashMap<(String, String), [u64; 4]> {
        let entries = self.entries();
        let mut by_pool: HashMap<(&str, &str), [u64; 4]> = HashMap::new();
        for e in &entries {
            let state = usize::from(e.state.load(Relaxed)).min(3);
            let counts = by_pool.entry((&e.names.0, &e.names.1)).or_default();
            if let Some(n) = counts.get_mut(state) {
                *n += 1;
            }
        }
        by_pool
            .into_iter()
            .map(|((d, u), counts)| ((d.to_owned(), u.to_owned()), counts))
            .collect()
    }

    /// Every entry; each shard is locked only while its entries are cloned (`Arc`s).
    fn entries(&self) -> Vec<Arc<Entry>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            out.extend(shard.lock().values().cloned());
        }
        out
    }

    /// A copy of every client's entry, as of now.
    pub fn snapshot(&self) -> Vec<ClientInfo> {
        let entries = self.entries();
        let now = self.now();
        entries.iter().map(|e| self.info(e, now)).collect()
    }

    fn info(&self, e: &Entry, now: u64) -> ClientInfo {
        let since = |t: u64| Duration::from_nanos(now.saturating_sub(t));
        let server_id = e.server_id.load(Relaxed);
        let query = String::from_utf8_lossy(&e.query.lock()).into_owned();
        let (channels, session_state) = match e.rare.lock().as_deref() {
            Some(rare) => (rare.channels.clone(), rare.session_state.clone()),
            None => (Vec::new(), None),
        };
        ClientInfo {
            id: e.id,
            peer: e.peer,
            database: e.names.0.clone(),
            user: e.names.1.clone(),
            application_name: e.application_name.lock().clone(),
            tls: e.tls.clone(),
            channels,
            state: ClientState::from_u8(e.state.load(Relaxed)),
            in_state: since(e.state_since.load(Relaxed)),
            in_transaction: e.in_transaction.load(Relaxed),
            wait_cause: WaitCause::from_u8(e.wait_cause.load(Relaxed)),
            connected: e.connected.elapsed(),
            session_state,
            server: (server_id != 0).then(|| ServerLink {
                id: server_id,
                pid: e.server_pid.load(Relaxed),
                held: since(e.server_since.load(Relaxed)),
            }),
            query,
        }
    }

    /// The clients of (database, user) holding a server, longest held first, at most `n`:
    /// whom a full pool waits for. Walks every entry: for waits, never for a checkout.
    pub fn longest_holders(&self, database: &str, user: &str, n: usize) -> Vec<Holder> {
        let now = self.now();
        let mut out: Vec<Holder> = self
            .entries()
            .iter()
            .filter(|e| e.names.0 == database && e.names.1 == user)
            .filter(|e| e.server_id.load(Relaxed) != 0)
            .map(|e| Holder {
                client: e.id,
                application_name: e.application_name.lock().clone(),
                held: Duration::from_nanos(now.saturating_sub(e.server_since.load(Relaxed))),
            })
            .collect();
        out.sort_by_key(|h| std::cmp::Reverse(h.held));
        out.truncate(n);
        out
    }

    /// Raises `flag` on every client for which `whom(database, user)` holds.
    pub fn raise(&self, flag: u8, whom: impl Fn(&str, &str) -> bool) {
        for shard in &self.shards {
            for e in shard.lock().values() {
                if whom(&e.names.0, &e.names.1) {
                    e.alert.raise(flag);
                }
            }
        }
    }

    /// Raises [`Alert::PARK`] on every client idle for at least `after` (since its state
    /// last changed, and since it last declined to park), holding no server, that has not
    /// been asked yet: the
    /// sweep of `client/park.rs`, every `min(1s, after / 4)`. Returns how many were asked.
    pub fn ask_to_park(&self, after: Duration) -> usize {
        let now = self.now();
        let after = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        let mut asked = 0;
        for shard in &self.shards {
            for e in shard.lock().values() {
                // One that keeps a server (session mode, pinned) cannot park: not asked.
                if e.state.load(Relaxed) != ClientState::Idle as u8
                    || e.server_id.load(Relaxed) != 0
                    || e.alert.is_raised(Alert::PARK)
                {
                    continue;
                }
                let since = e
                    .state_since
                    .load(Relaxed)
                    .max(e.park_declined.load(Relaxed));
                if now.saturating_sub(since) >= after {
                    e.alert.raise(Alert::PARK);
                    asked += 1;
                }
            }
        }
        asked
    }

    /// Raises `flag` on each client of `ids` (the console's KILL and KILL_CLIENT); returns
    /// how many were registered.
    pub fn raise_on(&self, ids: impl IntoIterator<Item = u64>, flag: u8) -> usize {
        let mut raised = 0;
        for id in ids {
            let entry = self.shard(id).lock().get(&id).cloned();
            if let Some(e) = entry {
                e.alert.raise(flag);
                raised += 1;
            }
        }
        raised
    }

    /// The shared copy of (database, user): most clients share a pool's pair (memory
    /// per idle client). At login only.
    fn names(&self, database: &str, user: &str) -> Arc<Names> {
        let key = (database.to_owned(), user.to_owned());
        let mut table = self.names.lock();
        if let Some(names) = table.pairs.get(&key).and_then(std::sync::Weak::upgrade) {
            return names;
        }
        if table.pairs.len() >= table.sweep_at {
            table.pairs.retain(|_, live| live.strong_count() > 0);
            table.sweep_at = (table.pairs.len() * 2).max(64);
        }
        let names = Arc::new(key.clone());
        table.pairs.insert(key, Arc::downgrade(&names));
        names
    }

    #[allow(clippy::indexing_slicing)] // id % SHARDS < SHARDS, the array's length
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Entry>>> {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// Nanoseconds since the registry was created, from the coarse clock: state changes
    /// happen several times per transaction, and the views show milliseconds at best.
    fn now(&self) -> u64 {
        coarse_nanos().saturating_sub(self.epoch)
    }
}

impl ClientHandle {
    /// Where the pool records why this client waits (see [`WaitCause`]).
    pub fn wait_cell(&self) -> WaitCell {
        WaitCell(self.entry.clone())
    }

    /// Why the client waits now, if it does.
    pub fn wait_cause(&self) -> Option<WaitCause> {
        WaitCause::from_u8(self.entry.wait_cause.load(Relaxed))
    }

    /// The client's id in the registry (as shown in the views).
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    /// What the pooler tells this session ([`ClientRegistry::raise`]).
    pub fn alert(&self) -> &Alert {
        &self.entry.alert
    }

    /// The session cannot park now (TLS, LISTEN, a server kept): clears [`Alert::PARK`]
    /// and keeps the sweep from asking again before another `park_idle_after`.
    pub fn decline_park(&self) {
        self.entry.park_declined.store(self.registry.now(), Relaxed);
        self.entry.alert.clear(Alert::PARK);
    }

    /// Records what the client does now. Setting the state it already has keeps the time
    /// it entered that state.
    pub fn set_state(&self, state: ClientState) {
        let e = &self.entry;
        match state {
            ClientState::IdleInTransaction => e.in_transaction.store(true, Relaxed),
            ClientState::Idle => e.in_transaction.store(false, Relaxed),
            ClientState::Active | ClientState::Waiting => {}
        }
        if e.state.swap(state as u8, Relaxed) != state as u8 {
            e.state_since.store(self.registry.now(), Relaxed);
        }
    }

    /// Records the server the client holds: `(ServerConn.id, backend pid)`, or none.
    pub fn set_server(&self, server: Option<(u64, i32)>) {
        let e = &self.entry;
        match server {
            Some((id, pid)) => {
                e.server_pid.store(pid, Relaxed);
                e.server_since.store(self.registry.now(), Relaxed);
                e.server_id.store(id, Relaxed);
            }
            None => e.server_id.store(0, Relaxed),
        }
    }

    /// Records the text of the current Query or Parse; the first [`QUERY_TEXT_MAX`] bytes
    /// are kept (a trailing NUL is dropped). Copies into the entry's buffer, which
    /// allocates only to grow (at most to [`QUERY_TEXT_MAX`]).
    pub fn set_query(&self, sql: &[u8]) {
        let sql = sql.strip_suffix(&[0]).unwrap_or(sql);
        let kept = sql.get(..QUERY_TEXT_MAX).unwrap_or(sql);
        let mut q = self.entry.query.lock();
        q.clear();
        q.extend_from_slice(kept);
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.entry.peer
    }

    /// The client's `application_name` now.
    pub fn application_name(&self) -> String {
        self.entry.application_name.lock().clone()
    }

    /// The current query text (as [`ClientHandle::set_query`] kept it).
    pub fn query(&self) -> String {
        String::from_utf8_lossy(&self.entry.query.lock()).into_owned()
    }

    /// Records the channels the client LISTENs to now.
    pub fn set_channels(&self, channels: Vec<String>) {
        let mut rare = self.entry.rare.lock();
        if channels.is_empty() && rare.is_none() {
            return;
        }
        rare.get_or_insert_default().channels = channels;
    }

    /// Records what pgmux did about session state this client left on its server.
    pub fn set_session_state(&self, event: Option<StateEvent>) {
        let mut rare = self.entry.rare.lock();
        if event.is_none() && rare.is_none() {
            return;
        }
        rare.get_or_insert_default().session_state = event;
    }

    /// Records a new `application_name` (the client ran `SET application_name`).
    pub fn set_application_name(&self, name: &str) {
        let mut current = self.entry.application_name.lock();
        if *current != name {
            name.clone_into(&mut current);
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.registry
            .shard(self.entry.id)
            .lock()
            .remove(&self.entry.id);
    }
}

/// A copy of one client's entry.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// Registry id.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The database it asked for.
    pub database: String,
    /// The user it logged in as.
    pub user: String,
    /// Its `application_name`.
    pub application_name: String,
    /// How its connection is encrypted, if it is.
    pub tls: Option<Arc<str>>,
    /// The channels it LISTENs to.
    pub channels: Vec<String>,
    /// What it does.
    pub state: ClientState,
    /// For how long it has been in `state`.
    pub in_state: Duration,
    /// Whether it is inside a transaction block (as far as its states tell).
    pub in_transaction: bool,
    /// Why it waits for a server, while it does.
    pub wait_cause: Option<WaitCause>,
    /// For how long it has been connected.
    pub connected: Duration,
    /// The server it holds.
    pub server: Option<ServerLink>,
    /// The text of its current (or last) query, at most [`QUERY_TEXT_MAX`] bytes.
    pub query: String,
    /// What pgmux last did about session state it left on its server, if anything.
    pub session_state: Option<StateEvent>,
}

/// A client holding a server, as a waiter's explanation names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Registry id.
    pub client: u64,
    /// Its `application_name` ("" when it set none).
    pub application_name: String,
    /// For how long it has held its server.
    pub held: Duration,
}

/// Session state pgmux found on a client's server, and what it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateEvent {
    /// `pin`, `reset` or `refuse` ([`crate::stats::StateAction`]).
    pub action: &'static str,
    /// Whether the client still holds its server for it (pinned now).
    pub pinned: bool,
    /// The kinds of state, comma-separated (`temp_table,listen`).
    pub kinds: String,
    /// The statement that made it, at most [`QUERY_TEXT_MAX`] bytes.
    pub statement: String,
    /// When, as Unix time in seconds.
    pub at: u64,
}

/// The server connection a client holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLink {
    /// `ServerConn.id`.
    pub id: u64,
    /// The backend's process id.
    pub pid: i32,
    /// For how long the client has held it.
    pub held: Duration,
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the time of the last tick (a few ms resolution),
/// read from memory without touching the hardware clock.
fn coarse_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:5000".parse().expect("an address")
    }

    #[test]
    fn register_update_and_drop() {
        let registry = Arc::new(ClientRegistry::default());
        let a = registry.register(peer(), "app", "alice", "psql", None);
        let b = registry.register(peer(), "app", "bob", "", None);
        assert_eq!(registry.len(), 2);
        a.set_state(ClientState::Active);
        a.set_server(Some((7, 4242)));
        a.set_query(&[b'x'; 500]);
        a.set_application_name("worker");
        let all = registry.snapshot();
        let info = all.iter().find(|c| c.id == a.id()).expect("alice is there");
        assert_eq!(info.state, ClientState::Active);
        assert_eq!(info.server.map(|s| (s.id, s.pid)), Some((7, 4242)));
        assert_eq!(info.query.len(), QUERY_TEXT_MAX);
        assert_eq!(info.application_name, "worker");
        assert!(!info.in_transaction);
        a.set_state(ClientState::IdleInTransaction);
        a.set_state(ClientState::Active);
        let counts = registry.counts();
        assert_eq!(counts[&("app".into(), "alice".into())][1], 1);
        assert_eq!(counts[&("app".into(), "bob".into())][0], 1);
        let info = registry.snapshot().into_iter().find(|c| c.id == a.id());
        assert!(info.expect("alice").in_transaction);
        drop(b);
        assert_eq!(registry.len(), 1);
        drop(a);
        assert!(registry.is_empty());
    }

    #[test]
    fn clients_of_one_pool_share_its_names_and_unused_names_are_swept() {
        let registry = Arc::new(ClientRegistry::default());
        let a = registry.register(peer(), "app", "alice", "", None);
        let b = registry.register(peer(), "app", "alice", "", None);
        let c = registry.register(peer(), "app", "bob", "", None);
        assert!(Arc::ptr_eq(&a.entry.names, &b.entry.names));
        assert!(!Arc::ptr_eq(&a.entry.names, &c.entry.names));
        assert_eq!(*c.entry.names, ("app".to_owned(), "bob".to_owned()));
        drop((a, b, c));
        for i in 0..200 {
            drop(registry.register(peer(), "app", &format!("user{i}"), "", None));
        }
        let kept = registry.names.lock().pairs.len();
        assert!(kept <= 128, "{kept} pairs kept for no client");
    }

    #[test]
    fn the_sweep_asks_an_idle_client_without_a_server_once_per_period() {
        let registry = Arc::new(ClientRegistry::default());
        let idle = registry.register(peer(), "app", "alice", "", None);
        let holding = registry.register(peer(), "app", "alice", "", None);
        holding.set_server(Some((1, 4242)));
        let active = registry.register(peer(), "app", "alice", "", None);
        active.set_state(ClientState::Active);
        assert_eq!(
            registry.ask_to_park(Duration::from_secs(3600)),
            0,
            "too soon"
        );
        assert_eq!(registry.ask_to_park(Duration::ZERO), 1);
        assert!(idle.alert().is_raised(Alert::PARK));
        assert!(!holding.alert().is_raised(Alert::PARK));
        assert!(!active.alert().is_raised(Alert::PARK));
        assert_eq!(registry.ask_to_park(Duration::ZERO), 0, "asked once");
        idle.decline_park();
        assert!(!idle.alert().is_raised(Alert::PARK));
        // Idle for long, but declined just now: not asked before another period.
        assert_eq!(registry.ask_to_park(Duration::from_secs(3600)), 0);
        assert_eq!(registry.ask_to_park(Duration::ZERO), 1);
    }

    #[test]
    fn query_text_drops_the_trailing_nul() {
        let registry = Arc::new(ClientRegistry::default());
        let c = registry.register(peer(), "app", "alice", "", None);
        c.set_query(b"SELECT 1\0");
        assert_eq!(registry.snapshot()[0].query, "SELECT 1");
    }

    #[test]
    fn a_query_text_keeps_its_room_and_rare_parts_are_made_on_first_use() {
        let registry = Arc::new(ClientRegistry::default());
        let c = registry.register(peer(), "app", "alice", "", None);
        c.set_query(b"SELECT 1 + 1");
        c.set_query(b"SELECT 2");
        assert_eq!(c.query(), "SELECT 2");
        let room = c.entry.query.lock().capacity();
        c.set_query(b"SELECT 3");
        assert_eq!(
            c.entry.query.lock().capacity(),
            room,
            "no new room per query"
        );
        c.set_channels(Vec::new());
        c.set_session_state(None);
        assert!(
            c.entry.rare.lock().is_none(),
            "nothing to record, nothing made"
        );
        c.set_channels(vec!["jobs".to_owned()]);
        let event = StateEvent {
            action: "pin",
            pinned: true,
            kinds: "temp_table".to_owned(),
            statement: "CREATE TEMP TABLE t ()".to_owned(),
            at: 1,
        };
        c.set_session_state(Some(event.clone()));
        let info = registry.snapshot().remove(0);
        assert_eq!(info.channels, ["jobs"]);
        assert_eq!(info.session_state, Some(event));
        c.set_channels(Vec::new());
        c.set_session_state(None);
        let info = registry.snapshot().remove(0);
        assert!(info.channels.is_empty() && info.session_state.is_none());
    }
}
