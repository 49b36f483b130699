//! The pool's background upkeep: warm up to `min_size`, close connections idle past
//! `idle_timeout` (never below `min_size`) or alive past `max_lifetime`.

use std::sync::Weak;
use std::time::{Duration, Instant};

use tracing::debug;

use super::Pool;

/// How often upkeep looks at the pool.
const PERIOD: Duration = Duration::from_millis(500);

/// Runs until the pool is dropped.
pub(super) async fn run(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        close_expired(&pool);
        warm_up(&pool).await;
    }
}

fn close_expired(pool: &Pool) {
    let settings = pool.settings();
    let now = Instant::now();
    let expired = {
        let mut st = pool.state.lock();
        let mut keep_open = st.open;
        let mut expired = Vec::new();
        // Oldest idle first: they sit at the bottom of the LIFO stack.
        let mut i = 0;
        while i < st.idle.len() {
            let conn = &st.idle[i];
            let retired = conn.retire_at.is_some_and(|t| t <= now);
            let idle_too_long = !settings.idle_timeout.is_zero()
                && now.duration_since(conn.idle_since) >= settings.idle_timeout
                && keep_open > settings.min_size;
            if retired || idle_too_long {
                expired.push(st.idle.remove(i));
                keep_open -= 1;
            } else {
                i += 1;
            }
        }
        expired
    };
    for conn in expired {
        debug!(pool = %pool.key, server = conn.id, "closing idle server connection (idle_timeout or max_lifetime)");
        pool.release_slot(conn);
    }
}

async fn warm_up(pool: &std::sync::Arc<Pool>) {
    let settings = pool.settings();
    loop {
        {
            let mut st = pool.state.lock();
            if st.open >= settings.min_size
                || st.open >= settings.size
                || st.health.retry_wait(Instant::now()).is_some()
            {
                return;
            }
            st.open += 1;
        }
        match pool.open_reserved().await {
            Ok(conn) => pool.checkin(conn),
            Err(_) => return,
        }
    }
}
