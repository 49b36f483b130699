//! A bounded pool of server connections for one (database, user).
//!
//! Checkout takes an idle connection (LIFO, so hot ones stay hot and cold ones age out),
//! else opens one while under `size`, else waits in a FIFO queue until `wait_timeout`.
//! Checkin hands the connection to the oldest waiter, or back to the idle stack. Only
//! checkout and checkin take the pool's lock, never across an `.await`.
//!
//! Operators act on a pool through `control.rs` (pause, resume, reconnect, new settings
//! on reload) and read it through `view.rs`; `window.rs` keeps its recent demand.

mod control;
mod greetings;
mod health;
mod lease;
mod pinned;
mod upkeep;
mod view;
mod window;

pub use greetings::{Greetings, Reported};
pub use lease::Lease;
pub use pinned::PinGuard;
pub use view::{PoolView, ServerState, ServerView, Status};
pub use window::{DemandSummary, WINDOW_SECONDS};

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{PoolMode, PoolSettings};
use crate::server::{self, ConnectError, ServerConn, Upstream};
use crate::stats::{CloseReason, PoolStats};
use health::Health;
use window::Window;

/// What a pool is for: the database name the client asked for, and the user.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Database name as clients ask for it.
    pub database: String,
    /// User name as clients log in.
    pub user: String,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.database, self.user)
    }
}

/// Why a checkout failed. Both leave the client session usable.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Every connection stayed busy for `waited`.
    #[error(
        "pool {pool}: no server connection within {waited:?} (size {size}, {in_use} in use, {waiting} waiting)"
    )]
    Timeout {
        pool: PoolKey,
        waited: Duration,
        size: u32,
        in_use: usize,
        waiting: usize,
    },
    /// The upstream cannot be reached.
    #[error("pool {pool}: cannot connect to upstream {upstream}: {error}{retry}")]
    Upstream {
        pool: PoolKey,
        upstream: String,
        error: ConnectError,
        /// Said when pgmux waits before it tries again.
        retry: String,
    },
}

/// What a waiter is handed.
enum Grant {
    /// A clean connection.
    Conn(Box<ServerConn>),
    /// A free slot, already counted in `open`: the waiter opens the connection itself.
    Slot,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
    /// When it started waiting (for the oldest wait in the views).
    since: Instant,
}

/// A server connection lent to a client: what the views show and checkin measures.
#[derive(Clone, Copy)]
struct Lent {
    id: u64,
    pid: i32,
    created: Instant,
    /// When the client asked for a server (its wait included).
    wanted: Instant,
    /// When it got it.
    since: Instant,
}

struct State {
    /// Idle connections; the last pushed is the first lent. Boxed, like everywhere: a
    /// connection moves between the pool and sessions as a pointer, and a session holding
    /// none stays small.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
    /// Clients waiting, oldest first.
    waiters: VecDeque<Waiter>,
    /// Connections that exist or are being opened: idle + lent + connecting.
    open: u32,
    next_waiter: u64,
    health: Health,
    /// Connections lent to clients now.
    lent: Vec<Lent>,
    /// Paused by an operator: nothing is lent or opened; waiters wait without a deadline.
    paused: bool,
    /// When the pool was last resumed: waiters that were held get a fresh wait_timeout.
    resumed_at: Option<Instant>,
    /// Connections opened before this are replaced as soon as they are idle (reconnect).
    replace_before: Option<Instant>,
    demand: Window,
}

impl State {
    /// Servers wanted now: held by clients or being opened, plus clients waiting.
    fn demand(&self) -> u32 {
        let in_use = (self.open as usize).saturating_sub(self.idle.len());
        u32::try_from(in_use + self.waiters.len()).unwrap_or(u32::MAX)
    }

    /// Whether `conn` must not be lent again, and why.
    fn must_close(&self, conn: &ServerConn, now: Instant, size: u32) -> Option<CloseReason> {
        if !conn.is_clean() {
            Some(CloseReason::Dirty)
        } else if conn.retire_at().is_some_and(|t| t <= now) {
            Some(CloseReason::MaxLifetime)
        } else if self.paused {
            Some(CloseReason::Pause)
        } else if self.replace_before.is_some_and(|t| conn.created() < t) {
            Some(CloseReason::Reconnect)
        } else if self.open > size {
            Some(CloseReason::Resize)
        } else {
            None
        }
    }
}

/// One pool. Shared by the client sessions that use it (through `Arc`).
pub struct Pool {
    /// Database and user.
    pub key: PoolKey,
    /// Counters and histograms, bumped by sessions and the pool, read by the admin port.
    pub stats: PoolStats,
    upstream: ArcSwap<Upstream>,
    settings: ArcSwap<PoolSettings>,
    state: Mutex<State>,
    /// The ParameterStatus set of the first server, shown to clients at login.
    server_params: Mutex<Arc<Vec<(String, String)>>>,
    /// What a server reports for each set of client settings, learnt at login.
    pub greetings: Greetings,
    /// Connections being opened now.
    connecting: AtomicU32,
    /// Servers held by pinned clients (`pinned.rs`).
    pinned: AtomicU32,
    /// Waits at least this long are logged (nanoseconds; 0 = never).
    slow_wait: AtomicU64,
    /// The upstream's `max_connections` (0 = not known yet) and whether it was asked.
    upstream_max_connections: AtomicU32,
    asked_max_connections: AtomicBool,
    /// The status last logged, as `Status as u8`.
    logged_status: std::sync::atomic::AtomicU8,
    /// Cancelled when a reload removed the pool: it takes no new clients and closes when
    /// the last one leaves.
    retired: CancellationToken,
}

impl Pool {
    /// A new, empty pool; call [`Pool::start_upkeep`] to warm it up and age it.
    pub fn new(key: PoolKey, upstream: Upstream, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            stats: PoolStats::default(),
            upstream: ArcSwap::from_pointee(upstream),
            settings: ArcSwap::from_pointee(settings),
            state: Mutex::new(State {
                idle: Vec::new(),
                waiters: VecDeque::new(),
                open: 0,
                next_waiter: 0,
                health: Health::default(),
                lent: Vec::new(),
                paused: false,
                resumed_at: None,
                replace_before: None,
                demand: Window::new(),
            }),
            server_params: Mutex::new(Arc::new(Vec::new())),
            greetings: Greetings::default(),
            connecting: AtomicU32::new(0),
            slow_wait: AtomicU64::new(0),
            upstream_max_connections: AtomicU32::new(0),
            asked_max_connections: AtomicBool::new(false),
            logged_status: std::sync::atomic::AtomicU8::new(Status::Normal as u8),
            retired: CancellationToken::new(),
            pinned: AtomicU32::new(0),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Where the pool connects.
    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream.load_full()
    }

    /// The server parameters clients are shown at login; empty until a server connected.
    pub fn server_params(&self) -> Arc<Vec<(String, String)>> {
        self.server_params.lock().clone()
    }

    /// Logs a warning when a client waits at least `limit` for a server; zero = never.
    pub fn set_slow_wait(&self, limit: Duration) {
        let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
        self.slow_wait.store(nanos, Relaxed);
    }

    /// Cancelled once a reload removed this pool. A session may end between transactions
    /// when it fires; until then the pool keeps serving the clients it has.
    pub fn retired(&self) -> CancellationToken {
        self.retired.clone()
    }

    /// Borrows a server connection for one transaction (or session).
    /// Cancel-safe: a dropped checkout leaves no hole in the queue and loses no connection.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, CheckoutError> {
        let wanted = Instant::now();
        let result = self.take(wanted).await;
        let now = Instant::now();
        let waited = now - wanted;
        match &result {
            Ok(conn) => {
                self.stats.checkouts.fetch_add(1, Relaxed);
                self.stats.wait.observe(waited);
                let mut st = self.state.lock();
                st.lent.push(Lent {
                    id: conn.id(),
                    pid: conn.key().process_id,
                    created: conn.created(),
                    wanted,
                    since: now,
                });
                let demand = st.demand();
                st.demand.checkout(now, demand);
            }
            Err(CheckoutError::Timeout { .. }) => {
                self.stats.wait_timeouts.fetch_add(1, Relaxed);
                self.stats.wait.observe(waited);
                let mut st = self.state.lock();
                let demand = st.demand();
                st.demand.timeout(now, demand);
            }
            Err(CheckoutError::Upstream { .. }) => {}
        }
        let slow = self.slow_wait.load(Relaxed);
        if slow > 0 && waited.as_nanos() >= u128::from(slow) {
            let (open, idle, waiting) = self.counts();
            let outcome = if result.is_ok() { "server" } else { "error" };
            warn!(
                pool = %self.key,
                waited_ms = waited.as_millis() as u64,
                outcome,
                size = self.settings().size,
                open,
                idle,
                waiting,
                "a client waited long for a server connection"
            );
        }
        result.map(|conn| Lease::new(conn, self.clone()))
    }

    /// Checkout proper: an idle connection, a new one, or a place in the queue.
    async fn take(self: &Arc<Self>, started: Instant) -> Result<Box<ServerConn>, CheckoutError> {
        let settings = self.settings();
        let mut deadline = tokio::time::Instant::from_std(started + settings.wait_timeout);
        let mut stale = Vec::new();
        let step = {
            let mut st = self.state.lock();
            let now = started;
            let mut found = None;
            while !st.paused
                && let Some(conn) = st.idle.pop()
            {
                if conn.retire_at().is_some_and(|t| t <= now)
                    || st.replace_before.is_some_and(|t| conn.created() < t)
                    || !conn.looks_alive()
                {
                    st.open -= 1;
                    stale.push(conn);
                    continue;
                }
                found = Some(conn);
                break;
            }
            match found {
                Some(conn) => Step::Ready(conn),
                None if !st.paused && st.open < settings.size => match st.health.retry_wait(now) {
                    Some(wait) => Step::Down(wait),
                    None => {
                        st.open += 1;
                        Step::Connect
                    }
                },
                None => {
                    let id = st.next_waiter;
                    st.next_waiter += 1;
                    let (tx, rx) = oneshot::channel();
                    st.waiters.push_back(Waiter { id, tx, since: now });
                    let demand = st.demand();
                    st.demand.demand(now, demand);
                    Step::Wait(id, rx)
                }
            }
        };
        for conn in stale {
            // Its slot was freed above, under the lock.
            self.log_close(&conn, CloseReason::ServerGone);
            conn.close();
        }
        match step {
            Step::Ready(conn) => Ok(conn),
            Step::Connect => self.open_reserved().await,
            Step::Down(wait) => Err(self.upstream_error(wait)),
            Step::Wait(id, rx) => {
                let mut guard = WaitGuard {
                    pool: self,
                    id,
                    rx: Some(rx),
                };
                let granted = loop {
                    let Some(rx) = guard.rx.as_mut() else {
                        break None; // set until the wait ends: unreachable
                    };
                    match tokio::time::timeout_at(deadline, rx).await {
                        Ok(received) => break received.ok(),
                        Err(_) => match self.held_until(settings.wait_timeout) {
                            Some(until) => deadline = tokio::time::Instant::from_std(until),
                            None => break None,
                        },
                    }
                };
                match granted {
                    Some(grant) => {
                        guard.rx = None;
                        match grant {
                            Grant::Conn(conn) => Ok(conn),
                            Grant::Slot => {
                                let down = {
                                    let mut st = self.state.lock();
                                    let wait = st.health.retry_wait(Instant::now());
                                    if wait.is_some() {
                                        // The upstream is down: pass the slot on and fail fast.
                                        self.free_slot(&mut st);
                                    }
                                    wait
                                };
                                match down {
                                    Some(wait) => Err(self.upstream_error(wait)),
                                    None => self.open_reserved().await,
                                }
                            }
                        }
                    }
                    // The pool never drops a waiter's sender without sending; treat it as a timeout.
                    None => {
                        drop(guard);
                        let st = self.state.lock();
                        if let Some(wait) = st.health.retry_wait(Instant::now()) {
                            drop(st);
                            return Err(self.upstream_error(wait));
                        }
                        Err(CheckoutError::Timeout {
                            pool: self.key.clone(),
                            waited: started.elapsed(),
                            size: settings.size,
                            in_use: (st.open as usize).saturating_sub(st.idle.len()),
                            waiting: st.waiters.len(),
                        })
                    }
                }
            }
        }
    }

    /// A waiter whose wait_timeout passed keeps waiting while the pool is paused, and gets
    /// a fresh wait_timeout from the moment it was resumed: a pause never times clients out.
    fn held_until(&self, wait_timeout: Duration) -> Option<Instant> {
        let st = self.state.lock();
        let now = Instant::now();
        if st.paused {
            return Some(now + wait_timeout);
        }
        st.resumed_at
            .map(|at| at + wait_timeout)
            .filter(|until| *until > now)
    }

    /// Opens a connection in a slot already counted in `open`. On failure the slot is freed.
    async fn open_reserved(self: &Arc<Self>) -> Result<Box<ServerConn>, CheckoutError> {
        let settings = self.settings();
        let upstream = self.upstream();
        // If this future is dropped mid-connect (the client left), the slot comes back.
        let mut reserved = Reserved {
            pool: self,
            armed: true,
        };
        self.connecting.fetch_add(1, Relaxed);
        self.stats.connect_attempts.fetch_add(1, Relaxed);
        // Boxed: the login state machine is large and rare; kept out of every session future.
        let result = Box::pin(server::connect(&upstream, settings.connect_timeout)).await;
        reserved.armed = false;
        self.connecting.fetch_sub(1, Relaxed);
        match result {
            Ok(mut conn) => {
                conn.set_retire_at(retire_at(settings.max_lifetime));
                {
                    let mut params = self.server_params.lock();
                    if params.is_empty() {
                        *params = Arc::new(conn.params().to_vec());
                    }
                }
                let was_down = self.state.lock().health.up();
                if was_down {
                    info!(pool = %self.key, upstream = %upstream, "upstream reachable again");
                }
                info!(
                    pool = %self.key,
                    server = conn.id(),
                    pid = conn.key().process_id,
                    upstream = %upstream,
                    "server connection opened"
                );
                Ok(conn)
            }
            Err(error) => {
                self.stats.connect_failures.fetch_add(1, Relaxed);
                let (first, wait) = {
                    let mut st = self.state.lock();
                    let first = st.health.failed(&error, Instant::now());
                    self.free_slot(&mut st);
                    (
                        first,
                        st.health.retry_wait(Instant::now()).unwrap_or_default(),
                    )
                };
                if first {
                    warn!(pool = %self.key, upstream = %upstream, %error, "cannot connect to upstream");
                } else {
                    debug!(pool = %self.key, %error, "connect attempt failed again");
                }
                Err(self.upstream_error(wait))
            }
        }
    }

    fn upstream_error(&self, wait: Duration) -> CheckoutError {
        let st = self.state.lock();
        let error = st
            .health
            .last_error()
            .cloned()
            .unwrap_or_else(|| ConnectError::Io("unknown error".into()));
        CheckoutError::Upstream {
            pool: self.key.clone(),
            upstream: self.upstream().to_string(),
            error,
            retry: if wait.is_zero() {
                String::new()
            } else {
                format!("; next attempt in {} ms", wait.as_millis())
            },
        }
    }

    /// Returns a connection. A dirty one (in a transaction, half-read, broken), one past
    /// its lifetime, one to replace (reconnect) or one too many (the pool shrank, or is
    /// paused) is closed instead: a dirty connection never reaches another client.
    pub fn checkin(&self, mut conn: Box<ServerConn>) {
        let settings = self.settings();
        let now = Instant::now();
        let mut st = self.state.lock();
        let lent = match st.lent.iter().position(|l| l.id == conn.id()) {
            Some(at) => {
                let lent = st.lent.swap_remove(at);
                let demand = st.demand();
                st.demand.returned(now, demand, now - lent.since);
                Some(lent)
            }
            None => None,
        };
        if let Some(lent) = lent {
            // Atomics only: cheap enough under the lock.
            self.stats.hold.observe(now - lent.since);
            if settings.mode != PoolMode::Session {
                self.stats.transactions.fetch_add(1, Relaxed);
                self.stats.transaction.observe(now - lent.wanted);
            }
        }
        if let Some(reason) = st.must_close(&conn, now, settings.size) {
            drop(st);
            if reason == CloseReason::Dirty {
                debug!(pool = %self.key, server = conn.id(), status = ?conn.tx_status(), broken = conn.is_broken(), "server connection given back not clean");
            }
            return self.close(conn, reason);
        }
        conn.went_idle(now);
        while let Some(waiter) = st.waiters.pop_front() {
            match waiter.tx.send(Grant::Conn(conn)) {
                Ok(()) => return,
                // That waiter gave up; try the next one.
                Err(Grant::Conn(back)) => conn = back,
                Err(Grant::Slot) => unreachable!("sent a connection"),
            }
        }
        st.idle.push(conn);
    }

    /// Closes a connection for `reason` (logged and counted) and frees its slot.
    fn close(&self, conn: Box<ServerConn>, reason: CloseReason) {
        let id = conn.id();
        self.log_close(&conn, reason);
        conn.close();
        let mut st = self.state.lock();
        // A lent connection closed without a checkin (release_slot from a session).
        if let Some(at) = st.lent.iter().position(|l| l.id == id) {
            st.lent.swap_remove(at);
        }
        self.free_slot(&mut st);
    }

    fn log_close(&self, conn: &ServerConn, reason: CloseReason) {
        self.stats.closed(reason);
        info!(
            pool = %self.key,
            server = conn.id(),
            pid = conn.key().process_id,
            reason = reason.as_str(),
            age_s = conn.created().elapsed().as_secs(),
            "server connection closed"
        );
    }

    /// Gives a freed slot to the oldest waiter, or lowers the count. A paused pool, or one
    /// above its size (it shrank), keeps the slot closed.
    fn free_slot(&self, st: &mut State) {
        if !st.paused && st.open <= self.settings.load().size {
            while let Some(waiter) = st.waiters.pop_front() {
                if waiter.tx.send(Grant::Slot).is_ok() {
                    return;
                }
            }
        }
        st.open -= 1;
    }

    /// Counts for messages and the admin views: (open, idle, waiting).
    pub fn counts(&self) -> (u32, usize, usize) {
        let st = self.state.lock();
        (st.open, st.idle.len(), st.waiters.len())
    }

    /// Closes every idle connection (at shutdown).
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut self.state.lock().idle);
        for conn in idle {
            self.close(conn, CloseReason::Shutdown);
        }
    }

    /// Starts the background task that warms the pool up to `min_size` and closes
    /// connections idle or alive for too long, on `runtime` (the one serving clients, even
    /// when the pool is created from another thread). It ends when the pool is dropped.
    pub fn start_upkeep(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        runtime.spawn(upkeep::run(Arc::downgrade(self)));
    }
}

impl Drop for Pool {
    /// A pool removed by a reload goes when its last client leaves: say goodbye to the
    /// servers it still keeps idle.
    fn drop(&mut self) {
        for conn in self.state.get_mut().idle.drain(..) {
            conn.close();
        }
    }
}

enum Step {
    Ready(Box<ServerConn>),
    Connect,
    Down(Duration),
    Wait(u64, oneshot::Receiver<Grant>),
}

/// A slot counted in `open` for a connection being opened; freed if the opening is abandoned.
struct Reserved<'a> {
    pool: &'a Pool,
    armed: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.connecting.fetch_sub(1, Relaxed);
            let mut st = self.pool.state.lock();
            self.pool.free_slot(&mut st);
        }
    }
}

/// Removes a waiter that stops waiting (timeout or its client went away). If a grant was
/// already sent, passes it on, so no connection or slot is lost.
struct WaitGuard<'a> {
    pool: &'a Pool,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut st = self.pool.state.lock();
        if let Some(at) = st.waiters.iter().position(|w| w.id == self.id) {
            st.waiters.remove(at);
            return;
        }
        // Already granted: the sender held the lock while sending, so it is in the channel.
        match rx.try_recv() {
            Ok(Grant::Conn(conn)) => {
                drop(st);
                self.pool.checkin(conn);
            }
            Ok(Grant::Slot) => self.pool.free_slot(&mut st),
            Err(_) => {}
        }
    }
}

/// When a new connection retires: max_lifetime less up to 10 % jitter, so connections
/// opened together do not all close together.
fn retire_at(max_lifetime: Duration) -> Option<Instant> {
    if max_lifetime.is_zero() {
        return None;
    }
    let jitter = max_lifetime.mul_f64(rand::random::<f64>() * 0.1);
    Some(Instant::now() + max_lifetime - jitter)
}
