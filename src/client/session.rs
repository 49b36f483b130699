//! One logged-in client: the transaction loop.
//!
//! The session reads client messages, checks a server out of the pool on the first
//! message of a transaction, forwards both directions, and gives the server back when
//! every Query/Sync/FunctionCall it forwarded has been answered by a ReadyForQuery and the
//! last one said `I` (transaction mode). Reads and writes are non-blocking on both sockets
//! from one task, so neither direction can stall the other, and per-direction buffers are
//! bounded: a large message streams through in pieces.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::queue::OutQueue;
use crate::cancel::{self, CancelHandle, CancelTarget};
use crate::config::PoolMode;
use crate::pool::{CheckoutError, Pool};
use crate::protocol::{Frame, MessageCodec, PgError, ProtocolError, SqlState, tag, write};
use crate::server::{ServerConn, parse_parameter_status};

/// Stop reading a peer while this much waits to be written to the other side.
const HIGH_WATER: usize = 256 * 1024;
/// Bytes reserved for one read from a client / a server.
const CLIENT_READ: usize = 8 * 1024;
const SERVER_READ: usize = 32 * 1024;
/// How long cleanup may take on a server whose client left (ROLLBACK, reset query).
const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

/// Messages dropped after an error pgmux answered itself.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Skip {
    No,
    /// The rest of a large message whose start was refused.
    RestOfMessage,
    /// Extended-protocol messages up to the next Sync, as a server does after an error.
    UntilSync,
}

/// Why the loop ended.
enum End {
    /// The client left (EOF, reset, or Terminate).
    ClientGone,
    /// Tell the client this, then close.
    Fatal(PgError),
}

enum Event {
    ServerReadable,
    ClientReadable,
    Writable,
    IdleInTransaction,
    Stop,
    Kill,
}

/// Everything a logged-in client needs but its socket; built by login.
pub struct Session {
    pub(super) pool: Arc<Pool>,
    pub(super) mode: PoolMode,
    pub(super) idle_transaction_timeout: Duration,
    pub(super) reset_query: String,
    pub(super) cancel: CancelHandle,
    /// Stop between transactions (graceful shutdown).
    pub(super) stop: CancellationToken,
    /// Stop now (the grace period is over).
    pub(super) kill: CancellationToken,
    /// Bytes read from the client and not yet framed.
    pub(super) cbuf: BytesMut,
}

struct Loop {
    s: Session,
    client: TcpStream,
    codec: MessageCodec,
    to_client: OutQueue,
    to_server: OutQueue,
    server: Option<ServerConn>,
    /// Query, Sync and FunctionCall messages forwarded and not yet answered by ReadyForQuery.
    pending: u32,
    /// Extended-protocol messages forwarded since the last Sync.
    unsynced: bool,
    /// The start of a client message went to the server, its end not yet.
    client_mid_message: bool,
    skip: Skip,
    last_activity: Instant,
}

impl Session {
    /// Serves the client until it leaves or the pooler stops; then cleans up the server
    /// it held, if any.
    pub async fn run(self, client: TcpStream) {
        let mut l = Loop {
            s: self,
            client,
            codec: MessageCodec::default(),
            to_client: OutQueue::default(),
            to_server: OutQueue::default(),
            server: None,
            pending: 0,
            unsynced: false,
            client_mid_message: false,
            skip: Skip::No,
            last_activity: Instant::now(),
        };
        let end = match l.on_client_bytes().await {
            Ok(()) => l.serve().await,
            Err(end) => end,
        };
        if let End::Fatal(err) = &end {
            debug!(pool = %l.s.pool.key, %err, "closing client session");
            let mut buf = BytesMut::new();
            err.write(&mut buf);
            l.to_client.push(buf);
        }
        // Flush what the client is owed (the error above, or results), briefly.
        let _ =
            tokio::time::timeout(Duration::from_secs(1), l.to_client.write_all(&l.client)).await;
        l.finish_server().await;
    }
}

impl Loop {
    async fn serve(&mut self) -> End {
        loop {
            if self.to_client.write_now(&self.client).is_err() {
                return End::ClientGone;
            }
            if let Some(server) = &self.server
                && let Err(e) = self.to_server.write_now(&server.stream)
            {
                return self.server_lost(e.into());
            }
            let server = self.server.as_ref().map(|s| &s.stream);
            let read_server = server.is_some() && self.to_client.len() < HIGH_WATER;
            let read_client = self.to_server.len() < HIGH_WATER;
            let write_server = server.is_some() && !self.to_server.is_empty();
            let idle_deadline = self.idle_transaction_deadline();
            // Session mode holds a server between transactions too: it may stop then.
            let between_transactions = self.to_client.is_empty()
                && self.server.as_ref().is_none_or(|s| {
                    s.tx_status == b'I'
                        && self.pending == 0
                        && !self.unsynced
                        && !self.client_mid_message
                });
            let event = tokio::select! {
                biased;
                _ = self.s.kill.cancelled() => Event::Kill,
                _ = ready(server, Interest::READABLE), if read_server => Event::ServerReadable,
                _ = self.client.ready(Interest::READABLE), if read_client => Event::ClientReadable,
                _ = self.client.writable(), if !self.to_client.is_empty() => Event::Writable,
                _ = ready(server, Interest::WRITABLE), if write_server => Event::Writable,
                _ = sleep_until(idle_deadline), if idle_deadline.is_some() => Event::IdleInTransaction,
                _ = self.s.stop.cancelled(), if between_transactions => Event::Stop,
            };
            let result = match event {
                Event::ServerReadable => self.read_server(),
                Event::ClientReadable => self.read_client().await,
                Event::Writable => Ok(()),
                Event::IdleInTransaction => {
                    let limit = self.s.idle_transaction_timeout;
                    Err(End::Fatal(
                        PgError::fatal(
                            SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
                            format!("terminating connection: idle in transaction for longer than {limit:?} (idle_transaction_timeout)"),
                        )
                        .with_hint("commit or roll back sooner, or raise pool.idle_transaction_timeout"),
                    ))
                }
                Event::Stop | Event::Kill => Err(End::Fatal(PgError::fatal(
                    SqlState::ADMIN_SHUTDOWN,
                    "terminating connection: pgmux is shutting down",
                ))),
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// When an idle-in-transaction client is cut off, if a limit is set and it applies now.
    fn idle_transaction_deadline(&self) -> Option<Instant> {
        let server = self.server.as_ref()?;
        let limit = self.s.idle_transaction_timeout;
        let idle_in_transaction =
            self.pending == 0 && server.tx_status != b'I' && !self.client_mid_message;
        (idle_in_transaction && !limit.is_zero()).then(|| self.last_activity + limit)
    }

    fn read_server(&mut self) -> Result<(), End> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        server.read_buf.reserve(SERVER_READ);
        match server.stream.try_read_buf(&mut server.read_buf) {
            Ok(0) => Err(self.server_lost(io::Error::from(io::ErrorKind::UnexpectedEof).into())),
            Ok(_) => {
                self.last_activity = Instant::now();
                self.on_server_bytes()
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(self.server_lost(e.into())),
        }
    }

    fn on_server_bytes(&mut self) -> Result<(), End> {
        loop {
            let Some(server) = self.server.as_mut() else {
                return Ok(());
            };
            let frame = match server.codec.decode(&mut server.read_buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.server_lost(e)),
            };
            let mut ready = None;
            if frame.is_whole() {
                match frame.tag {
                    tag::READY_FOR_QUERY => ready = frame.body().first().copied(),
                    tag::PARAMETER_STATUS => {
                        if let Some((name, value)) = parse_parameter_status(frame.body()) {
                            server.set_param(name, value);
                        }
                    }
                    _ => {}
                }
            }
            if ready.is_some_and(|status| status != b'I') && self.s.mode == PoolMode::Statement {
                // The statement opened a transaction block: refuse it before the client
                // sees ReadyForQuery, so the statement itself reports the error.
                server.tx_status = ready.unwrap_or(b'T');
                self.pending = 0;
                return Err(End::Fatal(
                    PgError::fatal(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "transaction blocks are not allowed in statement pooling mode",
                    )
                    .with_hint("use autocommit statements, or a pool with mode = \"transaction\""),
                ));
            }
            self.to_client.push(frame.bytes);
            if let Some(status) = ready {
                server.tx_status = status;
                self.pending = self.pending.saturating_sub(1);
                if self.pending == 0 && !self.unsynced && !self.client_mid_message {
                    self.transaction_done(status);
                }
            }
        }
    }

    /// Every message forwarded has been answered: maybe give the server back.
    fn transaction_done(&mut self, status: u8) {
        // Statement mode never sees `T` or `E` here: those are refused as they arrive.
        if self.s.mode != PoolMode::Session && status == b'I' {
            self.release();
        }
    }

    /// Returns the server to the pool.
    fn release(&mut self) {
        if let Some(mut conn) = self.server.take() {
            self.s.cancel.set_target(None);
            if !self.to_server.is_empty() {
                // Bytes for a server we no longer hold: its state is unknown.
                conn.broken = true;
                self.to_server.clear();
            }
            self.s.pool.checkin(conn);
        }
    }

    async fn read_client(&mut self) -> Result<(), End> {
        self.s.cbuf.reserve(CLIENT_READ);
        match self.client.try_read_buf(&mut self.s.cbuf) {
            Ok(0) => Err(End::ClientGone),
            Ok(_) => {
                self.last_activity = Instant::now();
                self.on_client_bytes().await
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(End::ClientGone),
        }
    }

    async fn on_client_bytes(&mut self) -> Result<(), End> {
        loop {
            let frame = match self.codec.decode(&mut self.s.cbuf) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(ProtocolError::Io(_)) => return Err(End::ClientGone),
                Err(e) => {
                    return Err(End::Fatal(PgError::fatal(
                        SqlState::PROTOCOL_VIOLATION,
                        e.to_string(),
                    )));
                }
            };
            self.on_client_frame(frame).await?;
        }
    }

    async fn on_client_frame(&mut self, frame: Frame) -> Result<(), End> {
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
        if t == tag::TERMINATE {
            return Err(End::ClientGone);
        }
        if self.skip == Skip::UntilSync {
            if t == tag::SYNC {
                self.skip = Skip::No;
                self.answer_ready();
            }
            return Ok(());
        }
        if self.server.is_none() {
            match t {
                // Nothing is pending without a server: answer locally, no checkout.
                tag::SYNC => {
                    self.answer_ready();
                    return Ok(());
                }
                tag::FLUSH => return Ok(()),
                _ => {}
            }
            if let Err(err) = self.checkout().await? {
                let mut buf = BytesMut::new();
                err.write(&mut buf);
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
        match t {
            tag::QUERY | tag::FUNCTION_CALL | tag::SYNC => {
                self.pending += 1;
                self.unsynced = false;
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE | tag::FLUSH => {
                self.unsynced = true
            }
            _ => {}
        }
        self.client_mid_message = !frame.ends;
        self.to_server.push(frame.bytes);
        Ok(())
    }

    /// ReadyForQuery(I) from pgmux itself, for a client that holds no server.
    fn answer_ready(&mut self) {
        let mut buf = BytesMut::new();
        write::ready_for_query(&mut buf, b'I');
        self.to_client.push(buf);
    }

    /// Checks a server out for this client. While it waits, it notices a client that
    /// leaves (the wait is dropped: no hole in the queue). The outer error ends the
    /// session; the inner one is answered and the session goes on.
    async fn checkout(&mut self) -> Result<Result<(), PgError>, End> {
        let pool = self.s.pool.clone();
        let checkout = pool.checkout();
        tokio::pin!(checkout);
        let result = loop {
            let room = self.s.cbuf.len() < HIGH_WATER;
            tokio::select! {
                result = &mut checkout => break result,
                _ = self.s.kill.cancelled() => return Err(End::Fatal(PgError::fatal(
                    SqlState::ADMIN_SHUTDOWN,
                    "terminating connection: pgmux is shutting down",
                ))),
                _ = self.client.ready(Interest::READABLE), if room => {
                    self.s.cbuf.reserve(CLIENT_READ);
                    match self.client.try_read_buf(&mut self.s.cbuf) {
                        Ok(0) => return Err(End::ClientGone),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Err(End::ClientGone),
                    }
                }
            }
        };
        match result {
            Ok(conn) => {
                self.s.cancel.set_target(Some(CancelTarget {
                    addr: conn.addr,
                    key: conn.key,
                }));
                self.server = Some(conn);
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(checkout_error(&e))),
        }
    }

    fn server_lost(&mut self, error: ProtocolError) -> End {
        if let Some(server) = self.server.as_mut() {
            server.broken = true;
        }
        End::Fatal(
            PgError::fatal(
                SqlState::CONNECTION_FAILURE,
                format!("lost the server connection in the middle of a transaction: {error}"),
            )
            .with_hint("the transaction did not complete; reconnect and retry it"),
        )
    }

    /// The client is gone: make the server clean for the next client, or close it.
    async fn finish_server(&mut self) {
        let Some(mut conn) = self.server.take() else {
            return;
        };
        self.s.cancel.set_target(None);
        let quiet = self.pending == 0
            && !self.unsynced
            && !self.client_mid_message
            && self.to_server.is_empty()
            && conn.read_buf.is_empty()
            && !conn.codec.in_message();
        if !quiet {
            if self.pending > 0 && !conn.broken {
                // A query may still run: cancel it so the backend does not work for no one.
                let target = CancelTarget {
                    addr: conn.addr,
                    key: conn.key,
                };
                tokio::spawn(cancel::forward(target));
            }
            conn.broken = true;
            return self.s.pool.checkin(conn);
        }
        if conn.tx_status != b'I' && !conn.broken {
            debug!(pool = %self.s.pool.key, server = conn.id, "client left inside a transaction: rolling back");
            if !matches!(conn.run_quietly("ROLLBACK", CLEANUP_LIMIT).await, Ok(b'I')) {
                conn.broken = true;
            }
        }
        if self.s.mode == PoolMode::Session && !self.s.reset_query.is_empty() && !conn.broken {
            let reset = self.s.reset_query.clone();
            if !matches!(conn.run_quietly(&reset, CLEANUP_LIMIT).await, Ok(b'I')) {
                conn.broken = true;
            }
        }
        self.s.pool.checkin(conn);
    }
}

/// What the client is told when no server could be had. The session stays usable.
fn checkout_error(e: &CheckoutError) -> PgError {
    match e {
        CheckoutError::Timeout { pool, .. } => PgError::error(SqlState::TOO_MANY_CONNECTIONS, e.to_string())
            .with_hint(format!(
                "raise the pool size (pool.size, or databases.{}.size) or pool.wait_timeout, or make transactions shorter",
                pool.database
            )),
        CheckoutError::Upstream { .. } => PgError::error(SqlState::CONNECTION_FAILURE, e.to_string())
            .with_hint("check that the PostgreSQL server is up and reachable; pgmux retries on the next query"),
    }
}

/// Waits until `stream` is ready for `interest`; never returns when there is no stream.
async fn ready(stream: Option<&TcpStream>, interest: Interest) {
    match stream {
        Some(s) => {
            let _ = s.ready(interest).await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
