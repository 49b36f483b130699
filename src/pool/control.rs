//! What operators do to a pool: pause and resume it (upstream maintenance), replace its
//! connections (after a failover or a password change), and apply new settings on reload
//! without dropping anyone.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tracing::info;

use super::{Grant, Pool};
use crate::config::PoolSettings;
use crate::server::{ServerConn, Upstream};
use crate::stats::CloseReason;

/// How often [`Pool::wait_idle`] looks.
const POLL: Duration = Duration::from_millis(20);

impl Pool {
    /// Pauses the pool: clients that need a server wait (without a deadline) until
    /// [`Pool::resume`]; servers are closed as they are given back, idle ones at once, so
    /// that the upstream can restart. Running transactions finish undisturbed.
    pub fn pause(&self) {
        let idle = {
            let mut st = self.state.lock();
            if st.paused {
                return;
            }
            st.paused = true;
            st.refresh_waiters(self.is_draining());
            std::mem::take(&mut st.idle)
        };
        info!(pool = %self.key, "pool paused");
        for conn in idle {
            self.close(conn, CloseReason::Pause);
        }
    }

    /// Whether the pool is paused.
    pub fn is_paused(&self) -> bool {
        self.state.lock().paused
    }

    /// Waits until no server is lent or being opened, up to `limit`; returns whether that
    /// happened (a paused pool is then fully drained).
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let busy = {
                let st = self.state.lock();
                !st.lent.is_empty() || self.connecting.load(Relaxed) > 0
            };
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Resumes a paused pool: the clients it held get servers, oldest first, and their
    /// wait_timeout starts again from now.
    pub fn resume(&self) {
        {
            let mut st = self.state.lock();
            if !st.paused {
                return;
            }
            st.paused = false;
            st.resumed_at = Some(Instant::now());
            st.refresh_waiters(self.is_draining());
        }
        info!(pool = %self.key, "pool resumed");
        self.grant_free_slots();
    }

    /// Replaces every server connection as soon as it is idle: idle ones now, lent ones
    /// when given back. New connections are opened on demand.
    pub fn reconnect(&self) {
        let idle = {
            let mut st = self.state.lock();
            st.replace_before = Some(Instant::now());
            std::mem::take(&mut st.idle)
        };
        info!(pool = %self.key, idle = idle.len(), "replacing every server connection");
        self.asked_max_connections.store(false, Relaxed);
        for conn in idle {
            self.close(conn, CloseReason::Reconnect);
        }
    }

    /// The server connections marked to close when next idle (PgBouncer's
    /// `close_needed`): opened before the last [`Pool::reconnect`] (the console's
    /// RECONNECT, KILL, or an upstream changed by a reload).
    pub fn close_needed(&self) -> Vec<u64> {
        let st = self.state.lock();
        let Some(before) = st.replace_before else {
            return Vec::new();
        };
        let lent = st.lent.iter().filter(|l| l.created < before).map(|l| l.id);
        let idle = st
            .idle
            .iter()
            .filter(|c| c.created() < before)
            .map(|c| c.id());
        lent.chain(idle).collect()
    }

    /// Waits until no server connection is marked to close (the console's WAIT_CLOSE).
    /// Cancel-safe: it only looks.
    pub async fn wait_close(&self) {
        while !self.close_needed().is_empty() {
            tokio::time::sleep(POLL).await;
        }
    }

    /// Applies settings from a reload. A bigger size lets waiting clients through at once;
    /// a smaller one closes idle extras now and lent extras when given back. Timeouts
    /// apply to waits that start from now on.
    pub fn apply_settings(&self, settings: PoolSettings) {
        let old = self.settings.swap(Arc::new(settings));
        let new = self.settings.load();
        if new.size > old.size {
            self.grant_free_slots();
        } else if new.size < old.size {
            let extra: Vec<Box<ServerConn>> = {
                let mut st = self.state.lock();
                let over = (st.open.saturating_sub(new.size) as usize).min(st.idle.len());
                // The oldest idle connections sit at the bottom of the stack.
                st.idle.drain(..over).collect()
            };
            for conn in extra {
                self.close(conn, CloseReason::Resize);
            }
        }
    }

    /// Points the pool at a new upstream (host, port, database or login changed on
    /// reload) and replaces the connections to the old one.
    pub fn set_upstream(&self, upstream: Upstream) {
        self.upstream.store(Arc::new(upstream));
        *self.server_params.lock() = Arc::default();
        self.greetings.clear();
        self.upstream_max_connections.store(0, Relaxed);
        // A new place, or new TLS settings, gets a fresh try at once: the old upstream's
        // failures (and their back-off) say nothing about it.
        self.state.lock().health.up();
        self.reconnect();
    }

    /// Marks the pool as removed by a reload: it keeps serving the clients it has, stops
    /// its upkeep, and closes its idle servers now.
    pub fn retire(&self) {
        self.retired.cancel();
        self.drain();
        let idle = std::mem::take(&mut self.state.lock().idle);
        for conn in idle {
            self.close(conn, CloseReason::Shutdown);
        }
    }

    /// Hands free slots (up to `size`) to waiters, oldest first; each opens its connection.
    fn grant_free_slots(&self) {
        let size = self.settings.load().size;
        let mut st = self.state.lock();
        while !st.paused && st.open < size && !st.waiters.is_empty() {
            // A limit shared with other pools may be what stops it now.
            if st.reserve(false).is_err() {
                break;
            }
            let Some(waiter) = st.waiters.pop_front() else {
                break;
            };
            if waiter.tx.send(Grant::Slot).is_err() {
                // It gave up meanwhile; the slot was never taken.
                st.unreserve();
            }
        }
    }
}
