//! The pool's background upkeep, twice a second: close idle connections that are dead,
//! idle past `idle_timeout` (never below `min_size`) or alive past `max_lifetime`; probe an
//! upstream that went away so that readiness and metrics notice without a client; warm up
//! to `min_size`; ask the upstream its `max_connections` once; record the demand of quiet
//! seconds; log changes of status.

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::view::Status;
use super::{Lent, Pool};
use crate::server::ServerConn;
use crate::stats::CloseReason;

/// How often upkeep looks at the pool.
const PERIOD: Duration = Duration::from_millis(500);
/// How long the `SHOW max_connections` round trip may take.
const ASK_LIMIT: Duration = Duration::from_secs(2);
/// The logged status looks at the peak demand over this many seconds.
const STATUS_SECONDS: u64 = 10;
/// Runs until the pool is dropped or retired.
pub(super) async fn run(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.retired.is_cancelled() {
            return;
        }
        let lost = close_expired(&pool);
        probe(&pool, lost).await;
        warm_up(&pool).await;
        ask_max_connections(&pool).await;
        record(&pool);
    }
}

/// Closes idle connections that are dead or expired; returns whether dead ones were found.
fn close_expired(pool: &Pool) -> bool {
    let settings = pool.settings();
    let now = Instant::now();
    let expired = {
        let mut st = pool.state.lock();
        let mut keep_open = st.open;
        let mut expired = Vec::new();
        // Oldest idle first: they sit at the bottom of the LIFO stack.
        let mut i = 0;
        while let Some(conn) = st.idle.get(i) {
            let reason = if !conn.looks_alive() {
                Some(CloseReason::ServerGone)
            } else if conn.retire_at().is_some_and(|t| t <= now) {
                Some(CloseReason::MaxLifetime)
            } else if !settings.idle_timeout.is_zero()
                && now.duration_since(conn.idle_since()) >= settings.idle_timeout
                && keep_open > settings.min_size
            {
                Some(CloseReason::IdleTimeout)
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    expired.push((st.idle.remove(i), reason));
                    keep_open -= 1;
                }
                None => i += 1,
            }
        }
        expired
    };
    let mut lost = false;
    for (conn, reason) in expired {
        lost |= reason == CloseReason::ServerGone;
        pool.close(conn, reason);
    }
    lost
}

/// Opens one connection when the upstream may have gone (idle connections died) or is
/// known down and due for another attempt, so that health reflects the upstream even
/// when no client asks. A success stays idle in the pool.
async fn probe(pool: &Arc<Pool>, lost: bool) {
    let due = {
        let mut st = pool.state.lock();
        let now = Instant::now();
        let down = st.health.last_error().is_some();
        let want = (lost && st.idle.is_empty()) || down;
        let allowed = !st.paused && st.open < pool.settings().size;
        // A spent limit across pools leaves the probe to the pools that have the budget.
        want && allowed && st.health.retry_wait(now).is_none() && st.reserve(false).is_ok()
    };
    if due && let Ok(conn) = pool.open_reserved().await {
        pool.checkin(conn);
    }
}

async fn warm_up(pool: &Arc<Pool>) {
    let settings = pool.settings();
    loop {
        {
            let mut st = pool.state.lock();
            if st.paused
                || st.open >= settings.min_size
                || st.open >= settings.size
                || st.health.retry_wait(Instant::now()).is_some()
            {
                return;
            }
            // Warming up never waits for a limit shared with other pools.
            if st.reserve(false).is_err() {
                return;
            }
        }
        match pool.open_reserved().await {
            Ok(conn) => pool.checkin(conn),
            Err(_) => return,
        }
    }
}

/// Asks the upstream its `max_connections` once, on an idle connection borrowed for one
/// round trip (never on a client's path), for the sizing advice in `/pools`.
async fn ask_max_connections(pool: &Arc<Pool>) {
    if pool.asked_max_connections.load(Relaxed) {
        return;
    }
    let conn = {
        let mut st = pool.state.lock();
        if st.paused {
            return;
        }
        let Some(conn) = st.idle.pop() else {
            return;
        };
        // Shown as lent while pgmux uses it, so that every open connection is accounted for.
        let now = Instant::now();
        st.lent.push(Lent {
            id: conn.id(),
            pid: conn.key().process_id,
            tls: conn.tls().cloned(),
            created: conn.created(),
            wanted: now,
            since: now,
        });
        conn
    };
    pool.asked_max_connections.store(true, Relaxed);
    let mut conn = conn;
    let answer = tokio::time::timeout(ASK_LIMIT, show(&mut conn, "max_connections")).await;
    match answer {
        Ok(Some(value)) => match value.trim().parse::<u32>() {
            Ok(n) => {
                pool.upstream_max_connections.store(n, Relaxed);
                debug!(pool = %pool.key, max_connections = n, "upstream max_connections");
            }
            Err(_) => debug!(pool = %pool.key, value, "unexpected max_connections"),
        },
        Ok(None) => conn.mark_broken(),
        Err(_) => {
            conn.mark_broken();
            debug!(pool = %pool.key, "SHOW max_connections did not answer in time");
        }
    }
    // Not a client's transaction: keep it out of the hold time and transaction counts.
    {
        let mut st = pool.state.lock();
        if let Some(at) = st.lent.iter().position(|l| l.id == conn.id()) {
            st.lent.swap_remove(at);
        }
    }
    pool.checkin(conn);
}

/// Runs `SHOW name` and returns the value; `None` if the connection misbehaved (it is
/// then closed). An ErrorResponse leaves the connection usable and returns an empty value.
async fn show(conn: &mut ServerConn, name: &str) -> Option<String> {
    let quiet = conn
        .query_quietly(&format!("SHOW {name}"), ASK_LIMIT)
        .await
        .ok()?;
    quiet.status?;
    Some(quiet.value.unwrap_or_default())
}

/// Records the demand of the moment (so quiet seconds count) and logs a change of status.
/// The logged status follows the peak demand of the last [`STATUS_SECONDS`], so that a pool
/// hovering around a threshold does not log twice a second.
fn record(pool: &Pool) {
    let now = Instant::now();
    let (peak, waiting) = {
        let mut st = pool.state.lock();
        let demand = st.demand();
        st.demand.demand(now, demand);
        (st.demand.recent_peak(now, STATUS_SECONDS), st.waiters.len())
    };
    let size = pool.settings().size.max(1);
    let percent = f64::from(peak) * 100.0 / f64::from(size);
    let status = Status::of(percent.min(100.0), waiting);
    let before = Status::from_u8(pool.logged_status.swap(status as u8, Relaxed));
    if status == before {
        return;
    }
    let percent = percent.round() as u64;
    let s = status.as_str();
    match status {
        Status::Normal => {
            info!(pool = %pool.key, status = s, peak_demand = peak, size, waiting, "pool load back to normal")
        }
        _ if status > before => {
            warn!(pool = %pool.key, status = s, peak_demand = peak, demand_percent = percent, size, waiting, "pool under pressure")
        }
        _ => {
            info!(pool = %pool.key, status = s, peak_demand = peak, demand_percent = percent, size, waiting, "pool load easing")
        }
    }
}
