//! A bounded pool of server connections for one (database, user).
//!
//! Checkout takes an idle connection (LIFO, so hot ones stay hot and cold ones age out),
//! else opens one while under `size`, else waits in a FIFO queue until `wait_timeout`.
//! Checkin hands the connection to the oldest waiter, or back to the idle stack. Only
//! checkout and checkin take the pool's lock, never across an `.await`.

mod health;
mod upkeep;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::config::PoolSettings;
use crate::server::{self, ConnectError, ServerConn, Upstream};
use health::Health;

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
#[allow(clippy::large_enum_variant)] // moved once per wait; boxing would allocate per checkout
enum Grant {
    /// A clean connection.
    Conn(ServerConn),
    /// A free slot, already counted in `open`: the waiter opens the connection itself.
    Slot,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
}

struct State {
    /// Idle connections; the last pushed is the first lent.
    idle: Vec<ServerConn>,
    /// Clients waiting, oldest first.
    waiters: VecDeque<Waiter>,
    /// Connections that exist or are being opened: idle + lent + connecting.
    open: u32,
    next_waiter: u64,
    health: Health,
}

/// One pool. Shared by the client sessions that use it (through `Arc`).
pub struct Pool {
    /// Database and user.
    pub key: PoolKey,
    upstream: Upstream,
    settings: ArcSwap<PoolSettings>,
    state: Mutex<State>,
    /// The ParameterStatus set of the first server, shown to clients at login.
    server_params: Mutex<Vec<(String, String)>>,
}

impl Pool {
    /// A new, empty pool; call [`Pool::start_upkeep`] to warm it up and age it.
    pub fn new(key: PoolKey, upstream: Upstream, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            upstream,
            settings: ArcSwap::from_pointee(settings),
            state: Mutex::new(State {
                idle: Vec::new(),
                waiters: VecDeque::new(),
                open: 0,
                next_waiter: 0,
                health: Health::default(),
            }),
            server_params: Mutex::new(Vec::new()),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Where the pool connects.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The server parameters clients are shown at login; empty until a server connected.
    pub fn server_params(&self) -> Vec<(String, String)> {
        self.server_params.lock().clone()
    }

    /// Borrows a server connection for one transaction (or session).
    /// Cancel-safe: a dropped checkout leaves no hole in the queue and loses no connection.
    pub async fn checkout(self: &Arc<Self>) -> Result<ServerConn, CheckoutError> {
        let settings = self.settings();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + settings.wait_timeout;
        let mut stale = Vec::new();
        let step = {
            let mut st = self.state.lock();
            let now = Instant::now();
            let mut found = None;
            while let Some(conn) = st.idle.pop() {
                if conn.retire_at.is_some_and(|t| t <= now) || !conn.looks_alive() {
                    st.open -= 1;
                    stale.push(conn);
                    continue;
                }
                found = Some(conn);
                break;
            }
            match found {
                Some(conn) => Step::Ready(conn),
                None if st.open < settings.size => match st.health.retry_wait(now) {
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
                    st.waiters.push_back(Waiter { id, tx });
                    Step::Wait(id, rx)
                }
            }
        };
        for conn in stale {
            // Its slot was freed above, under the lock.
            debug!(pool = %self.key, server = conn.id, "closing a stale idle server connection");
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
                let rx = guard
                    .rx
                    .as_mut()
                    .expect("receiver is set until the wait ends");
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(grant)) => {
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
                    Ok(Err(_)) | Err(_) => {
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

    /// Opens a connection in a slot already counted in `open`. On failure the slot is freed.
    async fn open_reserved(self: &Arc<Self>) -> Result<ServerConn, CheckoutError> {
        let settings = self.settings();
        // If this future is dropped mid-connect (the client left), the slot comes back.
        let mut reserved = Reserved {
            pool: self,
            armed: true,
        };
        let result = server::connect(&self.upstream, settings.connect_timeout).await;
        reserved.armed = false;
        match result {
            Ok(mut conn) => {
                conn.retire_at = retire_at(settings.max_lifetime);
                {
                    let mut params = self.server_params.lock();
                    if params.is_empty() {
                        params.clone_from(&conn.params);
                    }
                }
                let was_down = self.state.lock().health.up();
                if was_down {
                    info!(pool = %self.key, upstream = %self.upstream, "upstream reachable again");
                }
                debug!(pool = %self.key, server = conn.id, "opened server connection");
                Ok(conn)
            }
            Err(error) => {
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
                    warn!(pool = %self.key, upstream = %self.upstream, %error, "cannot connect to upstream");
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
            upstream: self.upstream.to_string(),
            error,
            retry: if wait.is_zero() {
                String::new()
            } else {
                format!("; next attempt in {} ms", wait.as_millis())
            },
        }
    }

    /// Returns a connection. A dirty one (in a transaction, half-read, broken) or one past
    /// its lifetime is closed instead: a dirty connection never reaches another client.
    pub fn checkin(&self, mut conn: ServerConn) {
        if !conn.is_clean() {
            debug!(pool = %self.key, server = conn.id, status = %char::from(conn.tx_status), "closing a server connection that is not clean");
            return self.release_slot(conn);
        }
        if conn.retire_at.is_some_and(|t| t <= Instant::now()) {
            debug!(pool = %self.key, server = conn.id, "retiring a server connection past max_lifetime");
            return self.release_slot(conn);
        }
        conn.idle_since = Instant::now();
        let mut st = self.state.lock();
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

    /// Closes a connection and frees its slot.
    pub fn release_slot(&self, conn: ServerConn) {
        conn.close();
        let mut st = self.state.lock();
        self.free_slot(&mut st);
    }

    /// Gives a freed slot to the oldest waiter, or lowers the count.
    fn free_slot(&self, st: &mut State) {
        while let Some(waiter) = st.waiters.pop_front() {
            if waiter.tx.send(Grant::Slot).is_ok() {
                return;
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
            self.release_slot(conn);
        }
    }

    /// Starts the background task that warms the pool up to `min_size` and closes
    /// connections idle or alive for too long. It ends when the pool is dropped.
    pub fn start_upkeep(self: &Arc<Self>) {
        tokio::spawn(upkeep::run(Arc::downgrade(self)));
    }
}

#[allow(clippy::large_enum_variant)] // lives on the stack for one checkout
enum Step {
    Ready(ServerConn),
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
