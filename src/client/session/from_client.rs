//! What the client sends: framing, refusing what a server must never see, answering what
//! needs no server, checking one out for the rest, and forwarding.

use super::*;
use crate::client::statements::whole_parse;

impl Loop<'_> {
    pub(super) async fn on_client_read(&mut self, read: io::Result<usize>) -> Result<(), End> {
        match read {
            Ok(0) | Err(_) => Err(End::ClientGone),
            Ok(n) => {
                // Read buffers grow for clients that send much and shrink back for idle ones.
                self.client_read = if n * 2 >= self.client_read {
                    (self.client_read * 2).min(MAX_CLIENT_READ)
                } else {
                    (self.client_read / 2).max(MIN_CLIENT_READ)
                };
                self.s.pool.stats.bytes_from_client(n);
                self.on_client_bytes().await?;
                self.touch();
                if self.s.cbuf.is_empty() {
                    // Frames keep what they need of the buffer; an idle client keeps none.
                    // Back to the thread's kept buffers, for the next read to take its room
                    // back once those frames are written (`read_buffers.rs`).
                    crate::client::read_buffers::give(std::mem::take(&mut self.s.cbuf));
                }
                Ok(())
            }
        }
    }

    pub(super) async fn on_client_bytes(&mut self) -> Result<(), End> {
        loop {
            let frame = match self.codec.decode(&mut self.s.cbuf) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(ProtocolError::Io(_)) => return Err(End::ClientGone),
                Err(e) => return Err(End::fatal(ClientError::Protocol(e))),
            };
            self.on_client_frame(frame).await?;
        }
    }

    pub(super) async fn on_client_frame(&mut self, frame: Frame) -> Result<(), End> {
        if !frame.starts {
            // The rest of a large message.
            if self.skip != Skip::No {
                if frame.ends && self.skip == Skip::RestOfMessage {
                    self.skip = Skip::No;
                }
                return Ok(());
            }
            self.client_mid_message = !frame.ends;
            self.to_server.push(frame.bytes);
            return Ok(());
        }
        if self.skip == Skip::RestOfMessage {
            self.skip = Skip::No;
        }
        let t = frame.tag;
        tracing::trace!(tag = ?char::from(t), "client message");
        match t {
            tag::TERMINATE => return Err(End::ClientGone),
            tag::QUERY
            | tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::SYNC
            | tag::FLUSH
            | tag::FUNCTION_CALL => {}
            // Outside COPY, PostgreSQL ignores these: without a server there is no COPY.
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL if self.server.is_none() => {
                if !frame.ends {
                    self.skip = Skip::RestOfMessage;
                }
                return Ok(());
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
            // Never forwarded: the server would end the connection with a FATAL that the
            // next client of that server would read.
            byte => {
                return Err(End::fatal(ClientError::Protocol(
                    ProtocolError::UnknownType { byte },
                )));
            }
        }
        if matches!(self.skip, Skip::UntilSync | Skip::UntilSyncForwarded) {
            if t != tag::SYNC {
                return Ok(());
            }
            let answer_here = self.skip == Skip::UntilSync;
            self.skip = Skip::No;
            if answer_here {
                self.answer_ready();
                return Ok(());
            }
        }
        if self.server.is_none() {
            match t {
                // Nothing is pending without a server: answer locally, no checkout.
                tag::SYNC => {
                    self.answer_ready();
                    return Ok(());
                }
                tag::FLUSH => return Ok(()),
                // A statement some server already accepted needs no server to be prepared:
                // it is prepared on whichever server runs it. This keeps a client that
                // prepares synchronously (libpq's PQprepare) from waiting on the pool.
                tag::PARSE if self.parse_without_server(&frame) => return Ok(()),
                // Closing one of its statements only forgets the client's name: drivers
                // close statements in the background (tokio-postgres on drop), and that must
                // not take a server from the pool.
                tag::CLOSE if self.close_without_server(&frame) => return Ok(()),
                tag::QUERY
                    if crate::notify::may_be_listen(frame.body())
                        && Box::pin(self.listen_locally(&frame)).await =>
                {
                    return Ok(());
                }
                _ => {}
            }
            // An idle server there now needs no future; a checkout that may wait is boxed:
            // it is large, and an idle session should not carry its room (memory per idle
            // client).
            let checked = match self.s.pool.checkout_now() {
                Some(lease) => {
                    self.take_server(lease);
                    Ok(())
                }
                None => Box::pin(self.checkout()).await?,
            };
            if let Err(err) = checked {
                let mut buf = BytesMut::new();
                err.error().write(&mut buf);
                self.to_client.push(buf);
                if matches!(t, tag::QUERY | tag::FUNCTION_CALL) {
                    self.answer_ready();
                    if !frame.ends {
                        self.skip = Skip::RestOfMessage;
                    }
                } else {
                    self.skip = Skip::UntilSync;
                }
                return Ok(());
            }
        }
        self.client_mid_message = !frame.ends;
        self.s.view.set_state(ClientState::Active);
        if self.copy_in {
            // The server answers none of these until COPY ends.
            if matches!(t, tag::COPY_DONE | tag::COPY_FAIL) {
                self.copy_in = false;
            }
            if matches!(
                t,
                tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL | tag::SYNC | tag::FLUSH
            ) {
                self.to_server.push(frame.bytes);
                return Ok(());
            }
        }
        match t {
            tag::QUERY => {
                #[cfg(debug_assertions)]
                injected_fault::panic_if_asked(frame.body());
                if self.subscription.is_some() && crate::notify::may_be_listen(frame.body()) {
                    // An UNLISTEN inside a transaction: it counts when that commits.
                    Box::pin(self.listen_locally(&frame)).await;
                }
                self.unsynced = false;
                self.s.pool.stats.query();
                self.s.view.set_query(frame.body());
                self.watch_query(&frame);
                let rewrite = self.rewrite_query(&frame);
                self.apply(frame, rewrite);
            }
            tag::SYNC => {
                self.unsynced = false;
                self.s.pool.stats.query();
                self.forward(frame, Kind::Sync);
            }
            tag::FUNCTION_CALL => {
                self.unsynced = false;
                self.forward(frame, Kind::FunctionCall);
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FLUSH => {
                self.unsynced = true;
                let rewrite = if t == tag::PARSE {
                    // Read once for all that look at it.
                    let parse = whole_parse(&frame);
                    self.watch_parse(parse.as_ref());
                    self.unlisten_by_parse(parse.as_ref());
                    self.rewrite_parse(&frame, parse.as_ref())
                } else {
                    self.rewrite_extended(&frame)
                };
                self.apply(frame, rewrite);
            }
            tag::COPY_DONE | tag::COPY_FAIL => {
                // Sent before pgmux saw the server start the COPY (pipelined): the Syncs
                // before this point will be ignored by the server, those after answered.
                self.replies.copy_end();
                self.to_server.push(frame.bytes);
            }
            _ => self.to_server.push(frame.bytes),
        }
        Ok(())
    }

    /// Forwards a client message as is, expecting its replies.
    pub(in crate::client) fn forward(&mut self, frame: Frame, kind: Kind) {
        self.replies.client(kind, Effect::None);
        self.to_server.push(frame.bytes);
    }

    /// Sends the replies pgmux gives itself that are now due.
    pub(in crate::client) fn take_due_replies(&mut self) {
        let to_client = &mut self.to_client;
        self.replies.take_due(|reply| to_client.push(reply));
    }

    /// ReadyForQuery(I) from pgmux itself, for a client that holds no server.
    pub(super) fn answer_ready(&mut self) {
        let mut buf = BytesMut::new();
        write::ready_for_query(&mut buf, b'I');
        self.to_client.push(buf);
    }

    /// Checks a server out for this client and gives it the client's settings. While it
    /// waits, it notices a client that leaves (the wait is dropped: no hole in the queue),
    /// and after `wait_notice_after` tells the client why it waits (a NOTICE).
    /// The outer error ends the session; the inner one is answered and the session goes on.
    pub(super) async fn checkout(&mut self) -> Result<Result<(), ClientError>, End> {
        let pool = self.s.pool.clone();
        self.s.view.set_state(ClientState::Waiting);
        // Set when the checkout is first found waiting: a checkout served at once reads
        // no clock and no setting for the notice.
        let mut notice_at = None;
        let mut noticed = false;
        let result = {
            let checkout = pool.checkout_for(Some(&self.s.view));
            tokio::pin!(checkout);
            loop {
                // A notice the socket did not take at once goes out as it becomes writable.
                if self.to_client.write_now(&mut *self.client).is_err() {
                    return Err(End::ClientGone);
                }
                let room = self.s.cbuf.len() < HIGH_WATER;
                let writing = !self.to_client.is_empty() || self.client.wants_write();
                tokio::select! {
                    biased;
                    result = &mut checkout => break result,
                    () = std::future::poll_fn(|cx| self.s.view.alert().poll_raised(cx, Alert::KILL)) => return Err(End::fatal(self.s.killed())),
                    () = notice_due(&pool, &mut notice_at), if !noticed => {
                        noticed = true;
                        if let Some(cause) = self.s.view.wait_cause() {
                            let text = format!(
                                "waiting for a server connection of pool {} ({}): {}",
                                pool.key,
                                cause.as_str(),
                                pool.explain(cause)
                            );
                            let mut buf = BytesMut::new();
                            crate::protocol::PgError::notice(text).write(&mut buf);
                            self.to_client.push(buf);
                        }
                    }
                    ready = client_ready(self.client, &mut self.s.cbuf, room, writing) => match ready {
                        ClientReady::Writable => {}
                        ClientReady::Read(Ok(0)) => return Err(End::ClientGone),
                        ClientReady::Read(Ok(_)) => {}
                        ClientReady::Read(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                        ClientReady::Read(Err(_)) => return Err(End::ClientGone),
                    },
                }
            }
        };
        match result {
            Ok(conn) => {
                self.take_server(conn);
                Ok(Ok(()))
            }
            Err(e) => {
                self.s.view.set_state(ClientState::Idle);
                Ok(Err(ClientError::Checkout(e)))
            }
        }
    }

    /// Takes the server a checkout gave for the client's transaction.
    fn take_server(&mut self, mut conn: Lease) {
        self.s.cancel.set_target(Some(CancelTarget {
            addr: conn.addr().clone(),
            key: conn.key(),
        }));
        self.s
            .view
            .set_server(Some((conn.id(), conn.key().process_id)));
        self.s.view.set_state(ClientState::Active);
        if let Some(sql) = self.s.params.sync_sql(&mut conn) {
            debug!(pool = %Escaped(&self.s.pool.key), server = conn.id(), sql = %Escaped(&sql), "restoring the client's settings");
            let mut query = BytesMut::new();
            write::query(&mut query, &sql);
            self.to_server.push(query);
            self.replies.hidden(Kind::Query, Effect::None);
        }
        self.reset_unsure_statements(&mut conn);
        self.server = Some(conn);
    }
}

/// Resolves once the checkout has waited `wait_notice_after` (never when it is 0). The
/// first poll, which happens only once the checkout is found waiting, fixes the moment.
async fn notice_due(pool: &Pool, at: &mut Option<tokio::time::Instant>) {
    let deadline = match *at {
        Some(deadline) => deadline,
        None => {
            let after = pool.settings().wait_notice_after;
            if after.is_zero() {
                return std::future::pending().await;
            }
            *at.insert(tokio::time::Instant::now() + after)
        }
    };
    tokio::time::sleep_until(deadline).await;
}

/// What a waiting checkout's client socket is ready for.
enum ClientReady {
    /// It read (the result of the read).
    Read(io::Result<usize>),
    /// It takes more of what waits for it (or failed: the next write says).
    Writable,
}

/// Reads what the client sent into `cbuf` once it is readable (TLS: once rustls holds
/// plaintext), reserving room only then, if `read`; resolves once it is writable, if
/// `write`.
async fn client_ready(
    client: &mut ClientStream,
    cbuf: &mut BytesMut,
    read: bool,
    write: bool,
) -> ClientReady {
    std::future::poll_fn(|cx| {
        if write && client.poll_write_ready(cx).is_ready() {
            return Poll::Ready(ClientReady::Writable);
        }
        if !read {
            return Poll::Pending;
        }
        match client.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(ClientReady::Read(Err(e))),
            Poll::Pending => return Poll::Pending,
        }
        cbuf.reserve(CLIENT_READ);
        tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *client), cx, cbuf)
            .map(ClientReady::Read)
    })
    .await
}
