//! The end of a session's hold on a server: a server lost under the client, or a client
//! gone while holding one (made clean for the next client, or closed).

use super::*;

impl Loop<'_> {
    pub(super) fn server_lost(&mut self, error: ProtocolError) -> End {
        if let Some(server) = self.server.as_mut() {
            server.mark_broken();
        }
        if self.server_ended {
            // The client read the server's own FATAL: the close follows, as directly.
            return End::ClientGone;
        }
        End::fatal(ClientError::ServerLost(error))
    }

    /// The client is gone: make the server clean for the next client, or close it.
    pub(super) async fn finish_server(&mut self) {
        let settled = self.settled();
        let Some(mut conn) = self.server.take() else {
            return;
        };
        self.s.cancel.set_target(None);
        self.s.view.set_server(None);
        if settled.is_none() || conn.has_unread() {
            if !self.replies.is_empty() && !conn.is_broken() {
                // A query may still run: cancel it so the backend does not work for no one.
                let target = CancelTarget {
                    addr: conn.addr().clone(),
                    key: conn.key(),
                };
                tokio::spawn(cancel::forward(target));
            }
            return conn.close();
        }
        if conn.tx_status() != TxStatus::Idle && !conn.is_broken() {
            debug!(pool = %self.s.pool.key, server = conn.id(), "client left inside a transaction: rolling back");
            if !conn.run_quietly("ROLLBACK", CLEANUP_LIMIT).await {
                return conn.close();
            }
        }
        if let Some((reset, statements_gone)) = self.pinned_reset_sql()
            && !conn.is_broken()
        {
            // A pinned client left: its state goes with it, not to the next client.
            if !conn.run_quietly(&reset, CLEANUP_LIMIT).await {
                return conn.close();
            }
            if statements_gone {
                conn.prepared().clear();
            }
        }
        if self.s.mode == PoolMode::Session
            && !self.s.settings.server_reset_query.is_empty()
            && !conn.is_broken()
        {
            let reset = self.s.settings.server_reset_query.clone();
            if !conn.run_quietly(&reset, CLEANUP_LIMIT).await {
                return conn.close();
            }
            // DISCARD ALL drops prepared statements and settings; whatever the reset query
            // was, assume the worst.
            conn.prepared().clear();
            conn.clear_applied();
        }
        self.s.cancel.settled().await;
        conn.release();
    }
}
