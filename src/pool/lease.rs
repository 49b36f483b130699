//! A server connection lent to one client: the only way a connection leaves the pool.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use super::Pool;
use crate::server::ServerConn;

/// A server connection lent by [`Pool::checkout`]. It owns the connection: [`Lease::release`]
/// gives it back (the pool keeps it when it is clean, closes it otherwise); dropping the
/// lease any other way (an error path, a panicking session, a cancelled future) closes the
/// connection and frees its slot, because its state is unknown then. So no path can leak a
/// slot or hand a dirty server to the next client.
pub struct Lease {
    /// Always `Some` until `release`, `close` or drop consume it.
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
}

impl Lease {
    pub(super) fn new(conn: Box<ServerConn>, pool: Arc<Pool>) -> Self {
        Lease {
            conn: Some(conn),
            pool,
        }
    }

    /// Gives the connection back to its pool (which closes it if it is not clean).
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }

    /// Closes the connection and frees its slot.
    pub fn close(mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.mark_broken();
            self.pool.checkin(conn);
        }
    }

    /// The connection went to a new process with its client (an upgrade): this process
    /// forgets it without closing it (`moved.rs`).
    pub fn hand_off(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.handed_off(conn);
        }
    }

    /// The pool it came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Deref for Lease {
    type Target = ServerConn;

    #[allow(clippy::expect_used)] // an invariant: only the consuming methods take it
    fn deref(&self) -> &ServerConn {
        self.conn.as_deref().expect("a lease holds its connection")
    }
}

impl DerefMut for Lease {
    #[allow(clippy::expect_used)] // an invariant: only the consuming methods take it
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_deref_mut()
            .expect("a lease holds its connection")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Not given back on purpose: whatever was in flight, the state is unknown.
            conn.mark_broken();
            self.pool.checkin(conn);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool.key)
            .field("conn", &self.conn.as_ref().map(|c| c.id()))
            .finish()
    }
}
