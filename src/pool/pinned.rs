//! Servers held by pinned clients: a client that left session state on its server keeps
//! it between transactions (`session_state = "pin"`), and at most `max_pinned` servers of
//! a pool may be held that way, so pins never starve the pool.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::Pool;

/// One pinned client's place in its pool's count; dropping it gives the place back, however
/// the session ends.
pub struct PinGuard {
    pub(super) pool: Arc<Pool>,
}

impl Pool {
    /// Takes a place among the pool's pinned servers, if fewer than `limit` are taken.
    pub fn try_pin(self: &Arc<Self>, limit: u32) -> Option<PinGuard> {
        self.pinned
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| PinGuard { pool: self.clone() })
    }

    /// How many servers pinned clients hold now.
    pub fn pinned(&self) -> u32 {
        self.pinned.load(Relaxed)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.pool.pinned.fetch_sub(1, Relaxed);
    }
}
