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

    /// Routes every message read so far. They are framed where they lie in the server's
    /// read buffer: those that go to the client unchanged stay there, a run at its front
    /// that goes to the client in one piece when something else must reach it first (a
    /// swallowed or replaced message, a reply of pgmux's) or when the batch ends. No
    /// buffer is split off and merged again per message.
    pub(super) fn on_server_bytes(&mut self) -> Result<(), End> {
        let Some(server) = self.server.as_deref_mut() else {
            return Ok(());
        };
        let mut batch = Batch {
            buf: server.lend_read_buf(),
            run: 0,
        };
        let routed = self.route_server_messages(&mut batch);
        batch.flush(&mut self.to_client);
        if let Some(server) = self.server.as_deref_mut() {
            server.restore_read_buf(batch.buf);
        }
        match routed? {
            Routed::All => Ok(()),
            Routed::Release => {
                self.release();
                Ok(())
            }
        }
    }

    /// Routes the messages in `batch` until it holds no whole one (or a part of a large
    /// one), or until the transaction is over and the server is to be released.
    fn route_server_messages(&mut self, batch: &mut Batch) -> Result<Routed, End> {
        loop {
            let Some(server) = self.server.as_deref_mut() else {
                return Ok(Routed::All);
            };
            let frame = match server.frame_in(batch.unframed()) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(Routed::All),
                Err(e) => return Err(self.server_lost(e)),
            };
            let len = frame.bytes.len();
            if !frame.starts {
                if self.swallowing {
                    batch.skip(len, &mut self.to_client);
                } else {
                    batch.run += len;
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
            match server.observe(frame) {
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
            let replaced = self.on_statement_reply(frame, done.as_ref());
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
                if matches!(done.entry, Expect::Hidden { .. }) {
                    // Its end may let a held ReadyForQuery through (`verified`): after
                    // what came before it.
                    batch.flush(&mut self.to_client);
                }
                self.finished(done, ready);
            }
            if !forward {
                batch.skip(len, &mut self.to_client);
            } else if ready == Some(TxStatus::Idle) && ends_client_entry && self.verify_due() {
                // The transaction is over: verify its session state first.
                let ready = batch.take(len, &mut self.to_client);
                if let Some(ready) = self.ready_or_verify(ready) {
                    self.to_client.push(ready);
                }
            } else if let Some(replaced) = replaced {
                batch.skip(len, &mut self.to_client);
                self.to_client.push(replaced);
            } else {
                batch.run += len;
            }
            if self.replies.has_due() {
                batch.flush(&mut self.to_client);
                self.take_due_replies();
            }
            if ready.is_some() {
                match self.settled() {
                    Some(TxStatus::Idle)
                        if self.s.mode != PoolMode::Session
                            && !self.pinned()
                            && self.listen_confirm.is_none() =>
                    {
                        return Ok(Routed::Release);
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
        if let Done {
            entry:
                Expect::Client {
                    effect: Effect::None,
                    ..
                },
            skipped,
            ..
        } = &done
            && skipped.is_empty()
        {
            // Most client messages: nothing to do, failed or not (undo has nothing to undo).
            return;
        }
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

/// The server's read buffer, lent by the connection while its messages are routed
/// (`on_server_bytes`). Its first `run` bytes are framed messages (or parts) that go to the
/// client as they are; the next message to frame follows them.
struct Batch {
    buf: BytesMut,
    run: usize,
}

impl Batch {
    /// The bytes not framed yet.
    fn unframed(&self) -> &[u8] {
        self.buf.get(self.run..).unwrap_or_default()
    }

    /// Queues the run for the client.
    fn flush(&mut self, to_client: &mut OutQueue) {
        if self.run > 0 {
            to_client.push(self.buf.split_to(self.run));
            self.run = 0;
        }
    }

    /// Drops the `len` bytes after the run (a message not for the client).
    fn skip(&mut self, len: usize, to_client: &mut OutQueue) {
        self.flush(to_client);
        bytes::Buf::advance(&mut self.buf, len);
    }

    /// Takes the `len` bytes after the run (a message the client gets later or changed).
    fn take(&mut self, len: usize, to_client: &mut OutQueue) -> BytesMut {
        self.flush(to_client);
        self.buf.split_to(len)
    }
}

/// How routing a batch of server messages ended.
enum Routed {
    /// Every whole message (or part) read so far was routed.
    All,
    /// The transaction is over: the server goes back to the pool.
    Release,
}

#[cfg(test)]
mod tests {
    use std::io::{self, IoSlice};

    use bytes::BytesMut;

    use proptest::strategy::Strategy;

    use super::Batch;
    use crate::client::queue::OutQueue;
    use crate::protocol::codec::FIRST_PART;
    use crate::protocol::{Framed, MessageCodec};
    use crate::server::TryWrite;

    /// A socket that takes everything.
    #[derive(Default)]
    struct Sink(Vec<u8>);

    impl TryWrite for Sink {
        fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            bufs.iter().map(|b| self.try_write(b)).sum()
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// What the session does with a message, by tag (the replies queue and the session
    /// state decide it in `route_server_messages`): `S` is swallowed (pgmux's own query,
    /// any size); `R` replaced by pgmux's own message (a DEALLOCATE's tag); `H` held until
    /// the next `Z` (a ReadyForQuery held for a verification); `L` followed by a reply of
    /// pgmux's (a due local reply); anything else forwarded as it is. `R`, `H`, `L` and
    /// `Z` are small (always whole), as the messages they stand for.
    fn expected(messages: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut held = Vec::new();
        for (t, body) in messages {
            let m = msg(*t, body);
            match t {
                b'S' => {}
                b'R' => out.extend(msg(b'C', b"R\0")),
                b'H' => held.extend(m),
                b'Z' => {
                    out.append(&mut held);
                    out.extend(m);
                }
                b'L' => {
                    out.extend(m);
                    out.extend(msg(b'1', b""));
                }
                _ => out.extend(m),
            }
        }
        out.append(&mut held);
        out
    }

    /// The same through `Batch`, the server's bytes arriving in reads of the sizes in
    /// `reads` (repeated), framed by a codec that holds messages up to `max_whole` whole.
    /// Also returns the most bytes the read buffer held.
    fn routed(messages: &[(u8, Vec<u8>)], reads: &[usize], max_whole: usize) -> (Vec<u8>, usize) {
        let stream: Vec<u8> = messages.iter().flat_map(|(t, b)| msg(*t, b)).collect();
        let mut codec = MessageCodec::new(max_whole);
        let mut to_client = OutQueue::default();
        let mut buf = BytesMut::new();
        let mut held: Vec<BytesMut> = Vec::new();
        let mut swallowing = false;
        let mut fed = 0;
        let mut most_buffered = 0;
        for n in reads.iter().cycle() {
            if fed == stream.len() {
                break;
            }
            let n = (*n).min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + n]);
            fed += n;
            most_buffered = most_buffered.max(buf.len());
            let mut batch = Batch { buf, run: 0 };
            while let Framed::Part {
                tag,
                len,
                starts,
                ends,
            } = codec.frame_in(batch.unframed()).unwrap()
            {
                if !starts {
                    if swallowing {
                        batch.skip(len, &mut to_client);
                    } else {
                        batch.run += len;
                    }
                    continue;
                }
                swallowing = tag == b'S';
                assert!(
                    ends || matches!(tag, b'S' | b'D'),
                    "small messages come whole"
                );
                match tag {
                    b'S' => batch.skip(len, &mut to_client),
                    b'R' => {
                        batch.skip(len, &mut to_client);
                        to_client.push(BytesMut::from(&msg(b'C', b"R\0")[..]));
                    }
                    b'H' => held.push(batch.take(len, &mut to_client)),
                    b'Z' => {
                        batch.flush(&mut to_client);
                        for h in held.drain(..) {
                            to_client.push(h);
                        }
                        batch.run += len;
                    }
                    b'L' => {
                        batch.run += len;
                        batch.flush(&mut to_client);
                        to_client.push(BytesMut::from(&msg(b'1', b"")[..]));
                    }
                    _ => batch.run += len,
                }
            }
            batch.flush(&mut to_client);
            buf = batch.buf;
        }
        assert!(buf.is_empty() && !codec.in_message());
        for h in held {
            to_client.push(h);
        }
        let mut sink = Sink::default();
        to_client.write_now(&mut sink).unwrap();
        (sink.0, most_buffered)
    }

    proptest::proptest! {
        /// However the server's bytes are split into reads, the client gets exactly the
        /// bytes the messages one by one give it, the same as with one read; and a large
        /// message streams through instead of being held whole.
        #[test]
        fn batches_give_the_client_the_same_bytes_whatever_the_reads(
            messages in proptest::collection::vec(
                (
                    proptest::sample::select(vec![b'D', b'T', b'C', b'Z', b'S', b'R', b'H', b'L']),
                    proptest::collection::vec(0u8..=255, 0..9000),
                ).prop_map(|(tag, mut body)| {
                    if !matches!(tag, b'S' | b'D') {
                        body.truncate(200);
                    }
                    (tag, body)
                }),
                0..12,
            ),
            max_whole in 0usize..12_000,
            reads in proptest::collection::vec(1usize..5000, 1..20),
        ) {
            let want = expected(&messages);
            let whole = messages.iter().map(|(_, b)| b.len() + 5).sum::<usize>().max(1);
            let (one_read, _) = routed(&messages, &[whole], max_whole);
            proptest::prop_assert_eq!(&one_read, &want);
            let (split, most_buffered) = routed(&messages, &reads, max_whole);
            proptest::prop_assert_eq!(&split, &want);
            // Never more than a whole message's limit plus one read: large ones stream.
            let bound = max_whole.max(FIRST_PART) + reads.iter().max().copied().unwrap_or(0);
            proptest::prop_assert!(most_buffered <= bound, "{} > {}", most_buffered, bound);
        }
    }
}
