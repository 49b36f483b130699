//! A pool as operators see it: counts, health, utilization and status, recent demand, and
//! its server connections. Read under the pool's lock in one short critical section; the
//! admin port turns it into JSON, console rows and metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::window::DemandSummary;
use super::{Pool, PoolKey};
use crate::config::PoolSettings;
use crate::server::Upstream;

/// Utilization below this percent is `normal`.
pub const WARNING_PERCENT: f64 = 70.0;
/// Utilization below this percent (and at or above [`WARNING_PERCENT`]) is `warning`.
pub const CRITICAL_PERCENT: f64 = 90.0;

/// How loaded a pool is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Below 70 % of `size` in use.
    Normal = 0,
    /// 70 % to 90 %.
    Warning = 1,
    /// 90 % or more, or clients are waiting.
    Critical = 2,
}

impl Status {
    /// `normal`, `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Normal => "normal",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    pub(super) fn from_u8(v: u8) -> Status {
        match v {
            0 => Status::Normal,
            1 => Status::Warning,
            _ => Status::Critical,
        }
    }

    /// The status of `percent` utilization with `waiting` clients.
    pub fn of(percent: f64, waiting: usize) -> Status {
        if waiting > 0 || percent >= CRITICAL_PERCENT {
            Status::Critical
        } else if percent >= WARNING_PERCENT {
            Status::Warning
        } else {
            Status::Normal
        }
    }
}

/// One pool, as of one moment.
#[derive(Clone, Debug)]
pub struct PoolView {
    /// Database and user.
    pub key: PoolKey,
    /// The settings in force.
    pub settings: Arc<PoolSettings>,
    /// Where it connects.
    pub upstream: Arc<Upstream>,
    /// Connections open or being opened.
    pub open: u32,
    /// Lent to clients.
    pub active: usize,
    /// Idle in the pool.
    pub idle: usize,
    /// Being opened.
    pub connecting: u32,
    /// Clients waiting for a server.
    pub waiting: usize,
    /// How long the oldest waiter has waited.
    pub oldest_wait: Option<Duration>,
    /// Paused by an operator.
    pub paused: bool,
    /// The last connect error while the upstream is unreachable; `None` when it is up.
    pub upstream_error: Option<String>,
    /// The upstream's `max_connections`, once pgmux asked.
    pub upstream_max_connections: Option<u32>,
    /// Demand over the last five minutes.
    pub demand: DemandSummary,
    /// Counted since the pool was created.
    pub wait_timeouts_total: u64,
    /// Servers held by pinned clients.
    pub pinned: u32,
}

impl PoolView {
    /// Servers in use (lent or being opened) as a percent of `size`.
    pub fn utilization(&self) -> f64 {
        let size = self.settings.size.max(1);
        let in_use = self.open as usize - self.idle.min(self.open as usize);
        in_use as f64 * 100.0 / f64::from(size)
    }

    /// `normal` / `warning` / `critical`, from utilization and waiting clients.
    pub fn status(&self) -> Status {
        Status::of(self.utilization(), self.waiting)
    }

    /// Whether the pool can serve: its upstream answers, or it still holds a connection.
    pub fn reachable(&self) -> bool {
        self.upstream_error.is_none() || self.open > self.connecting
    }
}

/// What a server connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerState {
    /// Lent to a client.
    Active,
    /// Idle in the pool.
    Idle,
}

impl ServerState {
    /// `active` or `idle`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Active => "active",
            ServerState::Idle => "idle",
        }
    }
}

/// One server connection, as of one moment.
#[derive(Clone, Debug)]
pub struct ServerView {
    /// `ServerConn.id`.
    pub id: u64,
    /// The backend's process id.
    pub pid: i32,
    /// How it is encrypted, if it is.
    pub tls: Option<Arc<str>>,
    /// Active or idle.
    pub state: ServerState,
    /// Time since it was opened.
    pub age: Duration,
    /// Active: time since it was lent. Idle: time since it went idle.
    pub in_state: Duration,
}

impl Pool {
    /// The pool as of now.
    pub fn view(&self) -> PoolView {
        let now = Instant::now();
        let st = self.state.lock();
        let max = self.upstream_max_connections.load(Relaxed);
        PoolView {
            key: self.key.clone(),
            settings: self.settings(),
            upstream: self.upstream(),
            open: st.open,
            active: st.lent.len(),
            idle: st.idle.len(),
            connecting: self.connecting.load(Relaxed),
            waiting: st.waiters.len(),
            oldest_wait: st.waiters.front().map(|w| now - w.since),
            paused: st.paused,
            upstream_error: st.health.last_error().map(ToString::to_string),
            upstream_max_connections: (max > 0).then_some(max),
            demand: st
                .demand
                .summary(now, st.lent.iter().map(|l| now - l.since)),
            wait_timeouts_total: self.stats.wait_timeouts.load(Relaxed),
            pinned: self.pinned(),
        }
    }

    /// Every server connection: lent ones (longest held first), then idle ones.
    pub fn servers(&self) -> Vec<ServerView> {
        let now = Instant::now();
        let st = self.state.lock();
        let mut out: Vec<ServerView> = st
            .lent
            .iter()
            .map(|l| ServerView {
                id: l.id,
                pid: l.pid,
                tls: l.tls.clone(),
                state: ServerState::Active,
                age: now - l.created,
                in_state: now - l.since,
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.in_state));
        out.extend(st.idle.iter().rev().map(|c| ServerView {
            id: c.id(),
            pid: c.key().process_id,
            tls: c.tls().cloned(),
            state: ServerState::Idle,
            age: now - c.created(),
            in_state: now.saturating_duration_since(c.idle_since()),
        }));
        out
    }
}
