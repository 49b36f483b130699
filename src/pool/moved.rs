//! Server connections that cross an upgrade with the client that keeps them (session mode,
//! or pinned by session state; `crate::upgrade`): the old process lets go of one without
//! closing it, and the new one takes it in as if it had lent it to that client.

use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use super::{Lease, Lent, PinGuard, Pool};
use crate::server::ServerConn;

impl Pool {
    /// Takes in a server connection an old process handed over with the client that holds
    /// it: counted in `open` and in the pool's budgets (`max_db_connections`,
    /// `max_user_connections`) and shown lent to that client, as if this pool had lent it.
    /// Never refused: when that makes more than the pool's size or a budget's limit (a
    /// config with lower limits), it is accepted anyway, like the connections of a pool
    /// that a reload shrank, and closes when its client gives it back.
    pub fn adopt(self: &Arc<Self>, conn: Box<ServerConn>) -> Lease {
        let now = Instant::now();
        {
            let mut st = self.state.lock();
            st.open += 1;
            for budget in &st.budgets {
                budget.add_used(1);
            }
            st.lent.push(Lent {
                id: conn.id(),
                pid: conn.key().process_id,
                tls: None,
                created: conn.created(),
                wanted: now,
                since: now,
            });
            let demand = st.demand();
            st.demand.checkout(now, demand);
        }
        {
            let mut params = self.server_params.lock();
            if params.is_empty() {
                *params = Arc::new(conn.params().to_vec());
            }
        }
        info!(
            pool = %self.key,
            server = conn.id(),
            pid = conn.key().process_id,
            "server connection moved in by an upgrade with its client"
        );
        Lease::new(conn, self.clone())
    }

    /// A place among the pinned servers for a client an upgrade moved in pinned: taken even
    /// beyond `max_pinned` (the server is pinned already); the count comes down as pins end.
    pub fn pin_moved(self: &Arc<Self>) -> PinGuard {
        self.pinned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PinGuard { pool: self.clone() }
    }

    /// Forgets a lent connection that went to the new process with its client: its slot
    /// is freed and its socket closed here without a Terminate (the new process holds the
    /// same socket, so PostgreSQL sees no close).
    pub(super) fn handed_off(&self, conn: Box<ServerConn>) {
        info!(
            pool = %self.key,
            server = conn.id(),
            pid = conn.key().process_id,
            "server connection handed over to the new process with its client"
        );
        let id = conn.id();
        // ServerConn has no Drop: this closes only this process's descriptor.
        drop(conn);
        let mut st = self.state.lock();
        if let Some(at) = st.lent.iter().position(|l| l.id == id) {
            st.lent.swap_remove(at);
        }
        self.free_slot(&mut st);
    }
}
