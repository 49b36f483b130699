//! What the server sends: routed to the client or swallowed (replies.rs), the bookkeeping
//! each finished reply implies, and giving the server back when the transaction is over.

use super::*;

impl Loop<'_> {
    pub(super) fn on_server_read(&mut self, read: io::Result<usize>) -> Result<(), End> {
        match read {
            Ok(0) => Err(self.server_lost(io::Error::from(io::ErrorKind::UnexpectedEof).into())),
            Ok(n) => {
                // Big results (large rows, COPY OUT) are read in bigger pieces: fewer
                // system calls per megabyte. Small answers shrink the reads back.
                self.server_read = if n * 2 >= self.server_read {
                    (self.server_read * 2).min(MAX_SERVER_READ)
                } else {
                    (self.server_read / 2).max(SERVER_READ)
                };
                self.s.pool.stats.bytes_to_client(n);
                let handled = self.on_server_bytes();
                self.touch();
                handled
            }
            Err(e) => Err(self.server_lost(e.into())),
        }
    }

    pub(super) fn on_server_bytes(&mut self) -> Result<(), End> {
        loop {
            let Some(server) = self.server.as_deref_mut() else {
                return Ok(());
            };
            let mut frame = match server.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.server_lost(e)),
            };
            if !frame.starts {
                if !self.swallowing {
                    self.to_client.push(frame.bytes);
                }
                continue;
            }
            if frame.tag == tag::ERROR_RESPONSE {
                // An error ends COPY IN mode: the server reads Sync again.
                self.copy_in = false;
            }
            let (route, done) = self.replies.route(frame.tag);
            tracing::trace!(tag = ?char::from(frame.tag), swallowed = matches!(route, Route::Swallow), ends = done.is_some(), "server message");
            self.swallowing = matches!(route, Route::Swallow);
            let hidden = self.swallowing;
            let mut forward = !self.swallowing;
            let mut ready = None;
            match server.observe(&frame) {
                Ok(ServerEvent::Ready(status)) => ready = Some(status),
                Ok(ServerEvent::Parameter { name, value }) => {
                    forward = self.s.params.reported(name, value, !hidden);
                    if name == "application_name" {
                        self.s.view.set_application_name(value);
                    }
                }
                Ok(ServerEvent::Other) => {}
                Err(e) => return Err(self.server_lost(e)),
            }
            self.on_statement_reply(&mut frame, done.as_ref());
            if frame.is_whole() {
                match frame.tag {
                    tag::COMMAND_COMPLETE if !hidden => {
                        self.watch_tag(frame.body());
                        self.unlisten_outcome(Some(frame.body()));
                    }
                    tag::DATA_ROW if hidden => self.verification_row(frame.body()),
                    tag::COPY_IN_RESPONSE => {
                        // Unless the client already sent CopyDone/CopyFail (pipelined).
                        self.copy_in = !self.replies.copy_in_started();
                    }
                    tag::ERROR_RESPONSE if !hidden => {
                        self.unlisten_outcome(None);
                        let (code, _) = crate::protocol::read::error_fields(frame.body());
                        self.s.pool.stats.server_error(code.as_bytes());
                        // A FATAL (pg_terminate_backend, a server shutting down) is the
                        // server's last word to the client: its close needs none of pgmux's.
                        self.server_ended |= crate::protocol::read::fields(frame.body())
                            .any(|(f, v)| f == b'V' && matches!(v, "FATAL" | "PANIC"));
                    }
                    tag::ERROR_RESPONSE if done.is_none() => {
                        let (code, message) = crate::protocol::read::error_fields(frame.body());
                        warn!(pool = %Escaped(&self.s.pool.key), code = %Escaped(&code), error = %Escaped(&message), "a hidden query of pgmux's (settings, session state) failed");
                    }
                    _ => {}
                }
            }
            if ready == Some(TxStatus::Idle) && !hidden {
                self.unlisten_at_transaction_end();
            }
            if let Some(status) = ready
                && status != TxStatus::Idle
                && !hidden
                && self.s.mode == PoolMode::Statement
            {
                // The statement opened a transaction block: refuse it before the client
                // sees ReadyForQuery, so the statement itself reports the error.
                return Err(End::fatal(ClientError::TransactionInStatementMode));
            }
            let ends_client_entry = done.is_some() && !hidden;
            if let Some(done) = done {
                self.swallowing = false;
                self.finished(done, ready);
            }
            if forward {
                let bytes = match ready {
                    // The transaction is over: verify its session state first if need be.
                    Some(TxStatus::Idle) if ends_client_entry => self.ready_or_verify(frame.bytes),
                    _ => Some(frame.bytes),
                };
                if let Some(bytes) = bytes {
                    self.to_client.push(bytes);
                }
            }
            self.take_due_replies();
            if ready.is_some() {
                match self.settled() {
                    Some(TxStatus::Idle)
                        if self.s.mode != PoolMode::Session
                            && !self.pinned()
                            && self.listen_confirm.is_none() =>
                    {
                        self.release()
                    }
                    Some(TxStatus::Idle) => self.s.view.set_state(ClientState::Idle),
                    Some(_) => self.s.view.set_state(ClientState::IdleInTransaction),
                    None => {}
                }
            }
        }
    }

    /// Bookkeeping for an entry whose replies are all in, and for those the server skipped.
    pub(super) fn finished(&mut self, done: Done, ready: Option<TxStatus>) {
        let Done {
            entry,
            failed,
            skipped,
        } = done;
        match entry {
            Expect::Hidden {
                effect: Effect::VerifyState,
                ..
            } => self.verified(failed),
            Expect::Client { effect, .. } | Expect::Hidden { effect, .. } if failed => {
                if matches!(effect, Effect::Session(_)) {
                    self.state.followed = false;
                }
                self.undo(effect)
            }
            Expect::Client {
                effect: Effect::Prepare { statement, .. },
                ..
            }
            | Expect::Hidden {
                effect: Effect::Prepare { statement, .. },
                ..
            } => statement
                .verified
                .store(true, std::sync::atomic::Ordering::Relaxed),
            Expect::Client {
                effect: Effect::Session(change),
                kind: Kind::Query,
                failed: false,
            } if ready == Some(TxStatus::Idle) => {
                self.state.followed = false;
                self.apply_session_change(change)
            }
            Expect::Client {
                effect:
                    Effect::Deallocate {
                        client_name,
                        statement,
                    },
                failed: false,
                ..
            } => self.statements.remove(&client_name, Some(statement.id)),
            _ => {}
        }
        for entry in skipped {
            match entry {
                Expect::Client { effect, .. } | Expect::Hidden { effect, .. } => self.undo(effect),
                Expect::Local(_) | Expect::CopyEnd => {} // the server would have skipped it too
            }
        }
    }

    /// A message that was meant to change state failed or was skipped.
    pub(super) fn undo(&mut self, effect: Effect) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        match effect {
            Effect::Prepare {
                statement,
                client_name,
            } => {
                server.prepared().remove(statement.id);
                if let Some(name) = client_name {
                    self.statements.remove(&name, Some(statement.id));
                }
            }
            Effect::Evict(statement) => {
                // Still on the server: keep knowing it (may exceed the bound by one).
                server.prepared().insert(statement, usize::MAX);
            }
            Effect::ResetState => {
                // Whatever is left on it is unknown: it is closed when given back.
                warn!(pool = %Escaped(&self.s.pool.key), "discarding a client's session state failed; the server will be closed");
                server.mark_broken();
            }
            Effect::VerifyState
            | Effect::Deallocate { .. }
            | Effect::Uses(_)
            | Effect::DeallocateAll
            | Effect::Session(_)
            | Effect::None => {}
        }
    }

    /// A client's standalone statement succeeded outside a transaction.
    pub(super) fn apply_session_change(&mut self, change: SessionChange) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        match change {
            SessionChange::Set { name, sql } => {
                if server.param_ci(&name).is_none() {
                    self.s.params.set_sql(&name, &sql);
                    server.set_applied(&name.to_ascii_lowercase(), Some(SettingValue::Sql(sql)));
                }
            }
            SessionChange::Reset(name) => {
                if server.param_ci(&name).is_none() {
                    self.s.params.forget(&name);
                    server.set_applied(&name.to_ascii_lowercase(), None);
                }
            }
            SessionChange::ResetAll => {
                for name in server.applied_names() {
                    self.s.params.forget(&name);
                }
                server.clear_applied();
            }
            SessionChange::DiscardAll => {
                for name in server.applied_names() {
                    self.s.params.forget(&name);
                }
                server.clear_applied();
            }
            // Statements: their command tags said it (on_statement_reply).
            SessionChange::DeallocateAll
            | SessionChange::Deallocate(_)
            | SessionChange::Prepare(_) => {}
        }
    }

    /// Returns the server to the pool.
    pub(super) fn release(&mut self) {
        if let Some(lease) = self.server.take() {
            let cancel_on_the_way = self.s.cancel.set_target(None);
            self.s.view.set_server(None);
            self.s.view.set_state(ClientState::Idle);
            if !self.to_server.is_empty() {
                // Bytes for a server we no longer hold: its state is unknown.
                self.to_server.clear();
                return lease.close();
            }
            if cancel_on_the_way {
                // The cancel must hit this server while it is idle, not the next client's
                // query: the server waits for it outside the pool.
                let settled = self.s.cancel.settled();
                tokio::spawn(async move {
                    settled.await;
                    lease.release();
                });
                return;
            }
            lease.release();
        }
    }
}
