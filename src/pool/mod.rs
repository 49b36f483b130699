//! A bounded pool of server connections for one (database, user).
//!
//! Checkout takes an idle connection (LIFO, so hot ones stay hot and cold ones age out),
//! else opens one while under `size`, else waits in a FIFO queue until `wait_timeout`.
//! Checkin hands the connection to the oldest waiter, or back to the idle stack. Only
//! checkout and checkin take the pool's lock, never across an `.await`.
//!
//! With `max_db_connections` / `max_user_connections`, opening also takes a unit of a
//! budget shared with other pools (`budget.rs`); a checkout that finds one spent waits in
//! its pool's queue and in the budget's FIFO queue, whichever serves it first. Lock
//! order: the pool's lock, then budgets; never one pool's lock under another's.
//!
//! Operators act on a pool through `control.rs` (pause, resume, reconnect, new settings
//! on reload) and read it through `view.rs`; `window.rs` keeps its recent demand.

mod budget;
mod control;
mod greetings;
mod health;
mod lease;
mod moved;
mod pinned;
mod upkeep;
mod view;
mod wait;
mod window;

pub use budget::{Budget, BudgetKind, BudgetView};
pub use greetings::{Greetings, Learnt, Reported};
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

use crate::clients::{ClientHandle, ClientRegistry, WaitCause};
use crate::config::{PoolMode, PoolSettings};
use crate::server::{self, ConnectError, ServerConn, Upstream};
use crate::stats::{CloseReason, PoolStats};
use health::Health;
use wait::{Cells, Watch, budget_cause};
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
    /// No server came within `waited`, for `cause` (explained in `why`).
    #[error("pool {pool}: no server connection within {waited:?}: {why}")]
    Timeout {
        pool: PoolKey,
        waited: Duration,
        cause: WaitCause,
        /// [`Pool::explain`] of the cause when the wait ended.
        why: String,
    },
    /// A limit shared with other pools (`max_db_connections`, `max_user_connections`)
    /// stayed reached for `waited`.
    #[error(
        "pool {pool}: no server connection within {waited:?}: {setting} ({limit}) reached for {kind} \"{name}\" across its pools ({waiting} waiting)",
        setting = kind.setting(), kind = kind.as_str()
    )]
    Limit {
        pool: PoolKey,
        waited: Duration,
        kind: BudgetKind,
        name: String,
        limit: u32,
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
    /// What it waits for, a pause or a drain aside (`wait.rs`).
    base: WaitCause,
    /// Where its cause is written.
    cells: Cells,
}

/// A server connection lent to a client: what the views show and checkin measures.
#[derive(Clone)]
struct Lent {
    id: u64,
    pid: i32,
    /// See [`ServerConn::tls`].
    tls: Option<Arc<str>>,
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
    /// Limits shared with other pools (`budget.rs`); empty, and never locked, without
    /// `max_db_connections` / `max_user_connections`.
    budgets: Vec<Arc<Budget>>,
}

impl State {
    /// Records `conn` as lent at `now` to a client that wanted it at `wanted`.
    fn lend(&mut self, conn: &ServerConn, wanted: Instant, now: Instant) {
        self.lent.push(Lent {
            id: conn.id(),
            pid: conn.key().process_id,
            tls: conn.tls().cloned(),
            created: conn.created(),
            wanted,
            since: now,
        });
        let demand = self.demand();
        self.demand.checkout(now, demand);
    }

    /// The idle connection to lend next, unless paused; idle ones past their lifetime, to
    /// be replaced or found dead on the way go to `stale` (their slots freed here; the
    /// caller closes them outside the lock).
    #[allow(clippy::vec_box)] // connections move boxed, as in `idle`
    fn pop_idle(
        &mut self,
        now: Instant,
        stale: &mut Vec<Box<ServerConn>>,
    ) -> Option<Box<ServerConn>> {
        if crate::workers::several() {
            self.own_thread_first();
        }
        while !self.paused
            && let Some(conn) = self.idle.pop()
        {
            if conn.retire_at().is_some_and(|t| t <= now)
                || self.replace_before.is_some_and(|t| conn.created() < t)
                || !conn.looks_alive()
            {
                self.unreserve();
                stale.push(conn);
                continue;
            }
            return Some(conn);
        }
        None
    }

    /// With worker threads: brings the most recently idle connection of the calling
    /// thread to the top of the stack, so that a session reuses a socket its own reactor
    /// watches when there is one (else `ServerConn::rehome` moves one).
    fn own_thread_first(&mut self) {
        let here = crate::workers::current();
        let found = self.idle.iter().rposition(|c| c.home() == here);
        if let (Some(at), Some(top)) = (found, self.idle.len().checked_sub(1)) {
            self.idle.swap(at, top);
        }
    }

    /// A new waiter id.
    fn next_waiter_id(&mut self) -> u64 {
        let id = self.next_waiter;
        self.next_waiter += 1;
        id
    }

    /// Counts one more connection in `open`, with a unit of each budget; `Err` names a
    /// spent budget (`woken`: a waiter whose turn came, see `Budget::take_all`).
    fn reserve(&mut self, woken: bool) -> Result<(), Arc<Budget>> {
        if !self.budgets.is_empty() {
            Budget::take_all(&self.budgets, woken)?;
        }
        self.open += 1;
        Ok(())
    }

    /// Counts one connection less in `open`, and gives its budget units back.
    fn unreserve(&mut self) {
        self.open -= 1;
        if !self.budgets.is_empty() {
            Budget::give_back_all(&self.budgets, 1);
        }
    }

    /// Whether a connection coming back idle should close to serve another pool's
    /// waiter (or to get under a lowered limit).
    fn budget_wants(&self) -> bool {
        !self.budgets.is_empty() && self.budgets.iter().any(|b| b.wanted())
    }

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
    /// pgmux stops, or the pool was removed: waiters are told they wait for a drain.
    draining: AtomicBool,
    /// The client registry, to name the clients a full pool waits for (`wait.rs`).
    clients: std::sync::OnceLock<Arc<ClientRegistry>>,
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
                budgets: Vec::new(),
            }),
            server_params: Mutex::new(Arc::new(Vec::new())),
            greetings: Greetings::default(),
            connecting: AtomicU32::new(0),
            slow_wait: AtomicU64::new(0),
            upstream_max_connections: AtomicU32::new(0),
            asked_max_connections: AtomicBool::new(false),
            logged_status: std::sync::atomic::AtomicU8::new(Status::Normal as u8),
            retired: CancellationToken::new(),
            draining: AtomicBool::new(false),
            clients: std::sync::OnceLock::new(),
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
        self.checkout_for(None).await
    }

    /// [`Pool::checkout`] for a logged-in client: while it waits, its registry entry says
    /// why ([`WaitCause`]). Cancel-safe, like `checkout`.
    pub async fn checkout_for(
        self: &Arc<Self>,
        client: Option<&ClientHandle>,
    ) -> Result<Lease, CheckoutError> {
        let wanted = Instant::now();
        let mut watch = Watch::new(client);
        let mut result = self.take(wanted, &mut watch).await;
        // One thread: one branch. (A match moving `result` costs every checkout a copy.)
        if crate::workers::several() {
            result = match result {
                Ok(conn) => self.moved_here(conn, wanted, &mut watch).await,
                failed => failed,
            };
        }
        let cause = watch.cause();
        // Served at once from the idle list (no wait, no connect): no second clock read.
        let (now, waited) = if cause.is_none() && !crate::workers::several() {
            (wanted, Duration::ZERO)
        } else {
            let now = Instant::now();
            (now, now - wanted)
        };
        drop(watch);
        match &result {
            Ok(conn) => self.lent(conn, cause, wanted, now),
            Err(CheckoutError::Timeout { .. }) => {
                self.stats.wait_timeouts.fetch_add(1, Relaxed);
                self.stats.waited(cause, waited);
                let mut st = self.state.lock();
                let demand = st.demand();
                st.demand.timeout(now, demand);
            }
            Err(CheckoutError::Limit { .. }) => {
                self.stats.wait_timeouts.fetch_add(1, Relaxed);
                self.stats.waited(cause, waited);
            }
            // A wait that ended on the upstream's error counts; failing at once does not.
            Err(CheckoutError::Upstream { .. }) => {
                if cause.is_some() {
                    self.stats.waited(cause, waited);
                }
            }
        }
        let slow = self.slow_wait.load(Relaxed);
        if slow > 0 && waited.as_nanos() >= u128::from(slow) {
            let (open, idle, waiting) = self.counts();
            let outcome = if result.is_ok() { "server" } else { "error" };
            warn!(
                pool = %self.key,
                waited_ms = waited.as_millis() as u64,
                outcome,
                cause = cause.map_or("none", WaitCause::as_str),
                size = self.settings().size,
                open,
                idle,
                waiting,
                "a client waited long for a server connection"
            );
        }
        result.map(|conn| Lease::new(conn, self.clone()))
    }

    /// [`Pool::checkout_for`] when an idle connection is there now, without a future or a
    /// wait: most checkouts of a pool that keeps up. `None` when none is (or one could not
    /// move to this thread): then wait with `checkout_for`. The same accounting as a
    /// checkout served at once by it.
    pub fn checkout_now(self: &Arc<Self>) -> Option<Lease> {
        let now = Instant::now();
        let several = crate::workers::several();
        let mut stale = Vec::new();
        let conn = {
            let mut st = self.state.lock();
            let conn = st.pop_idle(now, &mut stale);
            // One thread: lent under the same lock (no move to wait for).
            if let Some(conn) = &conn
                && !several
            {
                st.lend(conn, now, now);
            }
            conn
        };
        if !stale.is_empty() {
            self.close_stale(stale);
        }
        let mut conn = conn?;
        if several {
            conn = match conn.rehome() {
                Ok(conn) => conn,
                Err(e) => {
                    self.lost_in_move(e);
                    return None;
                }
            };
            self.state.lock().lend(&conn, now, now);
        }
        self.stats.checkouts.fetch_add(1, Relaxed);
        self.stats.waited(None, Duration::ZERO);
        Some(Lease::new(conn, self.clone()))
    }

    /// Records `conn` as lent now (`now`) to a client that wanted it at `wanted` and waited
    /// for `cause`, if it waited.
    fn lent(&self, conn: &ServerConn, cause: Option<WaitCause>, wanted: Instant, now: Instant) {
        self.stats.checkouts.fetch_add(1, Relaxed);
        self.stats.waited(cause, now - wanted);
        self.state.lock().lend(conn, wanted, now);
    }

    /// With worker threads: `conn` with its socket on this thread's reactor; should the
    /// socket be lost in the move, its slot is freed and another connection taken (a new
    /// one opens on this thread and needs no move).
    async fn moved_here(
        self: &Arc<Self>,
        mut conn: Box<ServerConn>,
        wanted: Instant,
        watch: &mut Watch<'_>,
    ) -> Result<Box<ServerConn>, CheckoutError> {
        loop {
            match conn.rehome() {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    self.lost_in_move(e);
                    // Boxed: this rare path does not grow every checkout's future.
                    conn = Box::pin(self.take(wanted, watch)).await?;
                }
            }
        }
    }

    /// Checkout proper: an idle connection, a new one, or a place in the queue.
    async fn take(
        self: &Arc<Self>,
        started: Instant,
        watch: &mut Watch<'_>,
    ) -> Result<Box<ServerConn>, CheckoutError> {
        let settings = self.settings();
        let mut deadline = tokio::time::Instant::from_std(started + settings.wait_timeout);
        let mut stale = Vec::new();
        let step = {
            let mut st = self.state.lock();
            let now = started;
            match st.pop_idle(now, &mut stale) {
                Some(conn) => Step::Ready(conn),
                None if !st.paused && st.open < settings.size => match st.health.retry_wait(now) {
                    // The upstream is down: fail at once, unless servers lent now may come
                    // back; then wait for one in the queue, as in a full pool.
                    Some(wait) if st.lent.is_empty() => Step::Down(wait),
                    Some(_) => {
                        let (id, rx) =
                            self.enqueue(&mut st, now, WaitCause::UpstreamBackoff, watch);
                        Step::Wait(id, rx, None)
                    }
                    None => match st.reserve(false) {
                        Ok(()) => Step::Connect,
                        // A limit shared with other pools: wait for its turn too.
                        Err(budget) => {
                            let cause = budget_cause(budget.kind);
                            let (id, rx) = self.enqueue(&mut st, now, cause, watch);
                            Step::Wait(id, rx, Some(BudgetWait::new(budget, false)))
                        }
                    },
                },
                None => {
                    let (id, rx) = self.enqueue(&mut st, now, WaitCause::PoolFull, watch);
                    Step::Wait(id, rx, None)
                }
            }
        };
        self.close_stale(stale);
        let (id, rx, mut blocked) = match step {
            Step::Ready(conn) => return Ok(conn),
            Step::Connect => {
                watch.set(WaitCause::UpstreamConnecting);
                let failed = match self.open_reserved().await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => e,
                };
                let id = self.state.lock().next_waiter_id();
                match self.wait_on(id, started, watch) {
                    Some(Rewait::Idle(conn)) => return Ok(conn),
                    Some(Rewait::Queued(rx)) => (id, rx, None),
                    None => return Err(failed),
                }
            }
            Step::Down(wait) => return Err(self.upstream_error(wait)),
            Step::Wait(id, rx, blocked) => (id, rx, blocked),
        };
        if let Some(b) = &blocked {
            self.free_budget_elsewhere(&b.budget);
        }
        let mut guard = WaitGuard {
            pool: self,
            id,
            rx: Some(rx),
        };
        loop {
            let next = loop {
                let Some(rx) = guard.rx.as_mut() else {
                    break None; // set until the wait ends: unreachable
                };
                let turn = async {
                    match blocked.as_mut() {
                        Some(b) => (&mut b.rx).await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let event = tokio::select! {
                    received = rx => Event::Granted(received.ok()),
                    turn = turn => Event::Turn(turn),
                    () = tokio::time::sleep_until(deadline) => Event::Deadline,
                };
                match event {
                    Event::Granted(grant) => break grant,
                    Event::Turn(true) => {
                        if self.take_turn(&mut guard, &mut blocked, &settings) {
                            break Some(Grant::Slot);
                        }
                    }
                    // The budget was detached by a reload: an ordinary waiter now.
                    Event::Turn(false) => {
                        blocked = None;
                        self.rebase(guard.id, WaitCause::PoolFull);
                    }
                    Event::Deadline => match self.held_until(settings.wait_timeout) {
                        Some(until) => deadline = tokio::time::Instant::from_std(until),
                        None => break None,
                    },
                }
            };
            let failed = match next {
                Some(Grant::Conn(conn)) => {
                    guard.rx = None;
                    return Ok(conn);
                }
                Some(Grant::Slot) => {
                    guard.rx = None;
                    let down = {
                        let mut st = self.state.lock();
                        let wait = st.health.retry_wait(Instant::now());
                        match wait {
                            // The upstream is down and no lent server will come back: pass
                            // the slot on (the next waiter fails fast too) and fail fast.
                            Some(_) if st.lent.is_empty() && st.idle.is_empty() => {
                                self.free_slot(&mut st);
                            }
                            // Down, but a server may come back: give the slot up.
                            Some(_) => st.unreserve(),
                            None => {}
                        }
                        wait
                    };
                    match down {
                        Some(wait) => self.upstream_error(wait),
                        None => {
                            watch.set(WaitCause::UpstreamConnecting);
                            match self.open_reserved().await {
                                Ok(conn) => return Ok(conn),
                                Err(e) => e,
                            }
                        }
                    }
                }
                // The pool never drops a waiter's sender without sending; treat it as a timeout.
                None => {
                    drop(guard);
                    return Err(self.wait_failed(started, watch.cause(), blocked));
                }
            };
            // No server from the grant: wait on, first in line, while one may come back.
            match self.wait_on(guard.id, started, watch) {
                Some(Rewait::Idle(conn)) => return Ok(conn),
                Some(Rewait::Queued(rx)) => guard.rx = Some(rx),
                None => return Err(failed),
            }
        }
    }

    /// Why a wait ended without a server: the upstream is down (its last error: 08006, or
    /// PostgreSQL's own refusal), a limit across pools (53300 naming it), or the pool's own
    /// wait_timeout (53300).
    fn wait_failed(
        &self,
        started: Instant,
        cause: Option<WaitCause>,
        blocked: Option<BudgetWait>,
    ) -> CheckoutError {
        let st = self.state.lock();
        // Down (the next attempt due or not): what the upstream said tells more than the
        // time waited for a lent server that did not come back.
        if st.health.last_error().is_some() {
            let wait = st.health.retry_wait(Instant::now()).unwrap_or_default();
            drop(st);
            return self.upstream_error(wait);
        }
        if let Some(b) = blocked {
            drop(st);
            let budget = b.budget.clone();
            drop(b); // out of its queue before it is counted
            budget.refused.fetch_add(1, Relaxed);
            let view = budget.view();
            return CheckoutError::Limit {
                pool: self.key.clone(),
                waited: started.elapsed(),
                kind: view.kind,
                name: view.name,
                limit: view.limit,
                waiting: view.waiting,
            };
        }
        drop(st);
        let cause = cause.unwrap_or(WaitCause::PoolFull);
        CheckoutError::Timeout {
            pool: self.key.clone(),
            waited: started.elapsed(),
            cause,
            why: self.explain(cause),
        }
    }

    /// Gives the queued waiter `id` a new base cause (what it waits for now).
    fn rebase(&self, id: u64, base: WaitCause) {
        let mut st = self.state.lock();
        let draining = self.is_draining();
        let effective = st.effective(base, draining);
        if let Some(w) = st.waiters.iter_mut().find(|w| w.id == id) {
            w.base = base;
            w.cells.set(effective);
        }
    }

    /// For checkout `id` that got no server from a connect attempt or a slot (the upstream
    /// is down): a connection that came back idle meanwhile; else, while servers of this
    /// pool are lent (one may come back before wait_timeout), a place at the front of the
    /// queue (it has waited longest); else `None`: fail now.
    fn wait_on(&self, id: u64, since: Instant, watch: &mut Watch<'_>) -> Option<Rewait> {
        let mut stale = Vec::new();
        let rewait = {
            let mut st = self.state.lock();
            match st.pop_idle(Instant::now(), &mut stale) {
                Some(conn) => Some(Rewait::Idle(conn)),
                None if st.lent.is_empty() => None,
                None => {
                    let (tx, rx) = oneshot::channel();
                    let base = WaitCause::UpstreamBackoff;
                    let cells = watch.cells();
                    cells.set(st.effective(base, self.is_draining()));
                    st.waiters.push_front(Waiter {
                        id,
                        tx,
                        since,
                        base,
                        cells,
                    });
                    Some(Rewait::Queued(rx))
                }
            }
        };
        self.close_stale(stale);
        rewait
    }

    /// Closes idle connections found unfit by [`State::pop_idle`] (their slots are freed).
    #[allow(clippy::vec_box)] // connections move boxed, as in `idle`
    fn close_stale(&self, stale: Vec<Box<ServerConn>>) {
        for conn in stale {
            self.log_close(&conn, CloseReason::ServerGone);
            conn.close();
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

    /// Queues a checkout in this pool (under its lock), waiting for `base`.
    fn enqueue(
        &self,
        st: &mut State,
        now: Instant,
        base: WaitCause,
        watch: &mut Watch<'_>,
    ) -> (u64, oneshot::Receiver<Grant>) {
        let id = st.next_waiter_id();
        let (tx, rx) = oneshot::channel();
        let cells = watch.cells();
        cells.set(st.effective(base, self.is_draining()));
        st.waiters.push_back(Waiter {
            id,
            tx,
            since: now,
            base,
            cells,
        });
        let demand = st.demand();
        st.demand.demand(now, demand);
        (id, rx)
    }

    /// A budget's turn came for the waiter `guard`: true if it took a slot (and left the
    /// queue), to open its connection. Otherwise it waits on, in the queue of the budget
    /// still spent (keeping its turn), or as an ordinary waiter of this pool, and a turn
    /// it does not use passes to the next waiter of that budget.
    fn take_turn(
        &self,
        guard: &mut WaitGuard<'_>,
        blocked: &mut Option<BudgetWait>,
        settings: &PoolSettings,
    ) -> bool {
        let Some(b) = blocked.take() else {
            return false;
        };
        let mut st = self.state.lock();
        let Some(at) = st.waiters.iter().position(|w| w.id == guard.id) else {
            // The pool granted it meanwhile: the grant is in its channel.
            drop(st);
            b.pass_turn();
            return false;
        };
        if st.paused || st.open >= settings.size {
            drop(st);
            b.pass_turn();
            return false;
        }
        match st.reserve(true) {
            Ok(()) => {
                st.waiters.remove(at);
                guard.rx = None;
                true
            }
            Err(budget) => {
                let base = budget_cause(budget.kind);
                let effective = st.effective(base, self.is_draining());
                if let Some(w) = st.waiters.get_mut(at) {
                    w.base = base;
                    w.cells.set(effective);
                }
                *blocked = Some(BudgetWait::new(budget, true));
                drop(st);
                // Its turn at a budget other than the spent one goes to the next there.
                b.pass_turn();
                false
            }
        }
    }

    /// Closes one idle connection of another pool under `budget`, so that its unit goes
    /// to the oldest waiter of the budget (PgBouncer does the same).
    fn free_budget_elsewhere(&self, budget: &Budget) {
        for other in budget.others(self) {
            let idle = {
                let mut st = other.state.lock();
                // The oldest idle connection sits at the bottom of the stack.
                (!st.idle.is_empty()).then(|| st.idle.remove(0))
            };
            if let Some(conn) = idle {
                other.close(conn, CloseReason::Limit);
                return;
            }
        }
    }

    /// Attaches the budgets (limits across pools) this pool counts in, detaching the
    /// ones it no longer does; the connections it has open are moved along.
    pub fn set_budgets(self: &Arc<Self>, budgets: Vec<Arc<Budget>>) {
        let me = Arc::downgrade(self);
        let mut st = self.state.lock();
        for old in &st.budgets {
            if !budgets.iter().any(|b| Arc::ptr_eq(b, old)) {
                Budget::give_back_all(std::slice::from_ref(old), st.open);
                old.part(&me);
            }
        }
        for new in &budgets {
            if !st.budgets.iter().any(|b| Arc::ptr_eq(b, new)) {
                new.add_used(st.open);
                new.join(me.clone());
            }
        }
        st.budgets = budgets;
    }

    /// The budgets this pool counts in, for the views.
    pub fn budgets(&self) -> Vec<Arc<Budget>> {
        self.state.lock().budgets.clone()
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
                let was_down = {
                    let mut st = self.state.lock();
                    let was_down = st.health.up();
                    if was_down {
                        st.rebase_waiters(self.is_draining(), |base| {
                            (base == WaitCause::UpstreamBackoff).then_some(WaitCause::PoolFull)
                        });
                    }
                    was_down
                };
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
                    st.rebase_waiters(self.is_draining(), |base| {
                        matches!(base, WaitCause::PoolFull | WaitCause::UpstreamConnecting)
                            .then_some(WaitCause::UpstreamBackoff)
                    });
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
                let held = now - lent.since;
                let demand = st.demand();
                st.demand.returned(now, demand, held);
                Some((lent, held))
            }
            None => None,
        };
        if let Some((lent, held)) = lent {
            // Atomics only: cheap enough under the lock.
            self.stats.hold.observe(held);
            if settings.mode != PoolMode::Session {
                self.stats.transactions.fetch_add(1, Relaxed);
                self.stats.transaction.observe(now - lent.wanted);
            }
        }
        // A connection closed here frees its slot under this lock: a checkin right behind
        // this one must count without it (two connections given back at once to a pool
        // above its size, or a budget above its limit, would otherwise both close).
        if let Some(reason) = st.must_close(&conn, now, settings.size) {
            self.free_slot(&mut st);
            drop(st);
            if reason == CloseReason::Dirty {
                debug!(pool = %self.key, server = conn.id(), status = ?conn.tx_status(), broken = conn.is_broken(), "server connection given back not clean");
            }
            return self.close_freed(conn, reason);
        }
        if st.waiters.is_empty() && st.budget_wants() {
            self.free_slot(&mut st);
            drop(st);
            return self.close_freed(conn, CloseReason::Limit);
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

    /// Closes a connection whose slot is freed already, for `reason` (logged and counted).
    fn close_freed(&self, conn: Box<ServerConn>, reason: CloseReason) {
        self.log_close(&conn, reason);
        conn.close();
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

    /// A connection whose socket could not move to another thread's reactor (it is gone):
    /// counted as closed by the server side, its slot freed.
    fn lost_in_move(&self, e: std::io::Error) {
        self.stats.closed(CloseReason::ServerGone);
        warn!(pool = %self.key, error = %e, "server connection lost moving to another thread");
        let mut st = self.state.lock();
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
        st.unreserve();
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
        let st = self.state.get_mut();
        for conn in st.idle.drain(..) {
            conn.close();
        }
        if !st.budgets.is_empty() {
            Budget::give_back_all(&st.budgets, st.open);
        }
    }
}

enum Step {
    Ready(Box<ServerConn>),
    Connect,
    Down(Duration),
    /// Queued in the pool; also in a budget's queue when that limit is what blocks it.
    Wait(u64, oneshot::Receiver<Grant>, Option<BudgetWait>),
}

/// How a checkout that got no server from its turn goes on.
enum Rewait {
    /// A connection came back idle meanwhile.
    Idle(Box<ServerConn>),
    /// Back in the queue, first in line.
    Queued(oneshot::Receiver<Grant>),
}

/// What ended one round of a wait.
enum Event {
    Granted(Option<Grant>),
    /// A budget's turn came (true), or the budget went away (false).
    Turn(bool),
    Deadline,
}

/// A checkout's place in a budget's queue; leaves it when dropped.
struct BudgetWait {
    budget: Arc<Budget>,
    id: u64,
    rx: oneshot::Receiver<()>,
}

impl BudgetWait {
    fn new(budget: Arc<Budget>, front: bool) -> BudgetWait {
        let (id, rx) = budget.enqueue(front);
        BudgetWait { budget, id, rx }
    }

    /// Gives a turn received and not used to the next waiter of the budget.
    fn pass_turn(self) {
        self.budget.pass_turn();
    }
}

impl Drop for BudgetWait {
    fn drop(&mut self) {
        self.budget.leave(self.id, &mut self.rx);
    }
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
