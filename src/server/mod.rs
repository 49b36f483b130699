//! One connection to a PostgreSQL server: opened and authenticated by [`connect`], then
//! owned by the pool while idle or by one client session during a transaction.

mod carry;
mod connect;
mod lookup;
mod stream;
mod tls;
mod tls_io;

pub use connect::{ConnectError, IoError, ServerSecret, Upstream, connect};
pub use lookup::LookupReply;
pub use stream::{ServerAddr, ServerStream, TryWrite};
pub use tls::TlsConnector;
pub use tls_io::{RawSocket, TlsIo};

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::codec::Decoder;
use tokio_util::io::poll_read_buf;

use crate::prepared::ServerStatements;
use crate::protocol::read::parse_parameter_status;
use crate::protocol::{Frame, FrameRef, Framed, MessageCodec, ProtocolError, tag, write};

/// The key PostgreSQL gave this connection, needed to cancel its queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendKey {
    /// The backend's process id.
    pub process_id: i32,
    /// The secret that goes with it.
    pub secret: i32,
}

/// How a session setting is applied to a server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SettingValue {
    /// A value as text, as in a startup packet or ParameterStatus: `set_config(name, text)`.
    Text(String),
    /// A value as SQL, as the client wrote it after `SET name =`: replayed verbatim.
    Sql(String),
}

/// A server's transaction status, as its last ReadyForQuery said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (queries are refused until it ends).
    Failed,
}

impl TxStatus {
    /// The status a ReadyForQuery body starts with; `None` for any other byte.
    pub fn from_byte(byte: u8) -> Option<TxStatus> {
        match byte {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    /// The byte on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// What a whole server message means, once [`ServerConn::observe`] has noted it.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerEvent<'f> {
    /// ReadyForQuery: the server finished a Query, Sync or FunctionCall.
    Ready(TxStatus),
    /// ParameterStatus: a reported setting has this value now.
    Parameter { name: &'f str, value: &'f str },
    /// Anything else: the connection has nothing to note.
    Other,
}

/// What a query pgmux ran for itself left behind ([`ServerConn::query_quietly`]).
#[derive(Debug, Default)]
pub struct Quiet {
    /// The transaction status after it, if it finished.
    pub status: Option<TxStatus>,
    /// The first column of the last row, as text.
    pub value: Option<String>,
    /// It answered with an ErrorResponse.
    pub failed: bool,
    /// The body of the first ErrorResponse, if any.
    pub error: Option<Vec<u8>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The most read buffer an idle connection keeps.
const READ_BUF_KEPT: usize = 64 * 1024;

/// An authenticated server connection. Owned by exactly one party at a time: the pool
/// while it is idle, or the client session that holds its [`crate::pool::Lease`]. It reads
/// and interprets its own messages ([`ServerConn::next_frame`], [`ServerConn::observe`]);
/// the holder writes through [`ServerConn::stream`].
#[derive(Debug)]
pub struct ServerConn {
    stream: ServerStream,
    /// Bytes read from the server and not yet framed.
    read_buf: BytesMut,
    /// Frames server messages; tracks a large message still streaming through.
    codec: MessageCodec,
    /// ParameterStatus values the server reported, in the order first seen.
    params: Vec<(String, String)>,
    key: BackendKey,
    /// Shared with the cancel slot of the client that holds it: a checkout copies a
    /// pointer, and a client's slot stays small (memory per idle client).
    addr: Arc<ServerAddr>,
    id: u64,
    created: Instant,
    idle_since: Instant,
    tx_status: TxStatus,
    /// Its state is unknown (an error mid-message, a client gone mid-query): never reused.
    broken: bool,
    retire_at: Option<Instant>,
    /// ParameterStatus values as the server reported them right after login.
    initial_params: Vec<(String, String)>,
    /// Whether some reported parameter differs from its value in `initial_params`.
    drifted: bool,
    /// Settings the server does not report that clients had applied to it, by lowercase name.
    applied: Vec<(String, SettingValue)>,
    /// The settings stamp ([`crate::client::params`]) of the last client whose settings
    /// this server was found to have, unchanged since: 0 after any change to `params` or
    /// `applied`. A checkout by a client with that stamp needs no comparison.
    settings_stamp: u64,
    /// Named prepared statements it holds.
    prepared: ServerStatements,
    /// How it is encrypted (`TLSv1.3/TLS_AES_256_GCM_SHA384`), for the views; `None`:
    /// plain. Made once, when connected.
    tls: Option<Arc<str>>,
    /// The worker thread whose reactor its socket is registered with (`workers.rs`).
    home: usize,
}

impl ServerConn {
    fn new(stream: ServerStream, addr: ServerAddr) -> Self {
        let now = Instant::now();
        let tls = match &stream {
            ServerStream::Tls(s) => Some(Arc::from(s.describe())),
            _ => None,
        };
        ServerConn {
            tls,
            stream,
            read_buf: BytesMut::with_capacity(8 * 1024),
            codec: MessageCodec::default(),
            params: Vec::new(),
            key: BackendKey {
                process_id: 0,
                secret: 0,
            },
            addr: Arc::new(addr),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            created: now,
            idle_since: now,
            tx_status: TxStatus::Idle,
            broken: false,
            retire_at: None,
            initial_params: Vec::new(),
            drifted: false,
            applied: Vec::new(),
            settings_stamp: 0,
            prepared: ServerStatements::default(),
            home: crate::workers::current(),
        }
    }

    /// The worker thread whose reactor its socket is registered with.
    pub fn home(&self) -> usize {
        self.home
    }

    /// Moves the socket to the calling worker thread's reactor when it is registered with
    /// another one (worker threads only: two epoll_ctl calls, instead of a wakeup of the
    /// other thread at every read). A TLS connection stays where it is (still correct,
    /// only dearer). On an error the socket is gone and the connection with it.
    pub fn rehome(self: Box<Self>) -> io::Result<Box<Self>> {
        let here = crate::workers::current();
        if self.home == here || matches!(self.stream, ServerStream::Tls(_)) {
            return Ok(self);
        }
        // ServerConn has no Drop: its stream moves out and back in.
        let mut conn = *self;
        conn.stream = match conn.stream {
            ServerStream::Tcp(s) => ServerStream::Tcp(TcpStream::from_std(s.into_std()?)?),
            ServerStream::Unix(s) => ServerStream::Unix(UnixStream::from_std(s.into_std()?)?),
            tls @ ServerStream::Tls(_) => tls,
        };
        conn.home = here;
        Ok(Box::new(conn))
    }

    /// How it is encrypted, if it is (for the views).
    pub fn tls(&self) -> Option<&Arc<str>> {
        self.tls.as_ref()
    }

    /// A process-wide id, for logs and the admin views.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The key PostgreSQL gave it (its backend process id and cancel secret).
    pub fn key(&self) -> BackendKey {
        self.key
    }

    /// Where it is connected (cancel requests go there).
    pub fn addr(&self) -> &Arc<ServerAddr> {
        &self.addr
    }

    /// When it was opened.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// When it last went back to the pool.
    pub fn idle_since(&self) -> Instant {
        self.idle_since
    }

    /// Notes that it went idle now, and drops a read buffer that a big result grew
    /// (sessions read up to 256 KiB at a time): an idle connection keeps no large buffer.
    pub fn went_idle(&mut self, now: Instant) {
        self.idle_since = now;
        if self.read_buf.is_empty() && self.read_buf.capacity() > READ_BUF_KEPT {
            self.read_buf = BytesMut::new();
        }
    }

    /// When the pool retires it (max_lifetime with jitter), if ever.
    pub fn retire_at(&self) -> Option<Instant> {
        self.retire_at
    }

    /// Sets when the pool retires it.
    pub fn set_retire_at(&mut self, at: Option<Instant>) {
        self.retire_at = at;
    }

    /// The transaction status its last ReadyForQuery reported.
    pub fn tx_status(&self) -> TxStatus {
        self.tx_status
    }

    /// Whether it was marked unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks it unusable: whatever happens to it next, the pool closes it.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Whether it can go back to the pool: idle, outside a transaction, nothing half-read.
    pub fn is_clean(&self) -> bool {
        !self.broken && self.tx_status == TxStatus::Idle && !self.has_unread()
    }

    /// Whether bytes were read that no one has handled yet (or a message is half through).
    pub fn has_unread(&self) -> bool {
        !self.read_buf.is_empty() || self.codec.in_message()
    }

    /// The socket.
    pub fn stream(&self) -> &ServerStream {
        &self.stream
    }

    /// The socket, for the holder's writes (a TLS stream encrypts into its own buffer).
    pub fn stream_mut(&mut self) -> &mut ServerStream {
        &mut self.stream
    }

    /// Reads what the server sent into the connection's buffer, reserving `reserve` bytes
    /// first. A short read marks the socket drained, so the next wait costs no syscall.
    pub fn poll_read(&mut self, cx: &mut Context<'_>, reserve: usize) -> Poll<io::Result<usize>> {
        self.read_buf.reserve(reserve);
        poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read_buf)
    }

    /// The next message (or part of a large one) read so far, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        self.codec.decode(&mut self.read_buf)
    }

    /// Lends the read buffer, with what was read and not yet framed, to a holder that
    /// frames it in place ([`ServerConn::frame_in`]) and splits off or drops what it
    /// handled. It must come back ([`ServerConn::restore_read_buf`]) before the
    /// connection is read again or given back: until then it looks as if nothing were
    /// unread.
    pub fn lend_read_buf(&mut self) -> BytesMut {
        std::mem::take(&mut self.read_buf)
    }

    /// Takes back the read buffer lent by [`ServerConn::lend_read_buf`], with the bytes
    /// the holder did not consume.
    pub fn restore_read_buf(&mut self, buf: BytesMut) {
        self.read_buf = buf;
    }

    /// The next message (or part of a large one) at the start of `bytes`, which must
    /// follow the last one framed (from the lent read buffer); the holder then consumes
    /// its bytes. `None`: not enough yet (the session's reads reserve room themselves).
    pub fn frame_in<'b>(&mut self, bytes: &'b [u8]) -> Result<Option<FrameRef<'b>>, ProtocolError> {
        match self.codec.frame_in(bytes)? {
            Framed::Part {
                tag,
                len,
                starts,
                ends,
            } => Ok(Some(FrameRef {
                tag,
                bytes: bytes.get(..len).unwrap_or_default(),
                starts,
                ends,
            })),
            Framed::Incomplete { .. } => Ok(None),
        }
    }

    /// Notes what a server message changes about the connection (its transaction status,
    /// its reported settings) and says what it was.
    #[inline]
    pub fn observe<'f>(&mut self, frame: FrameRef<'f>) -> Result<ServerEvent<'f>, ProtocolError> {
        // Inlined: most messages are neither, and this runs for every one.
        if !frame.is_whole() {
            return Ok(ServerEvent::Other);
        }
        match frame.tag {
            tag::READY_FOR_QUERY => {
                let status = frame
                    .body()
                    .first()
                    .copied()
                    .and_then(TxStatus::from_byte)
                    .ok_or(ProtocolError::Malformed("ReadyForQuery"))?;
                self.tx_status = status;
                Ok(ServerEvent::Ready(status))
            }
            tag::PARAMETER_STATUS => self.observe_parameter(frame.body()),
            _ => Ok(ServerEvent::Other),
        }
    }

    /// A ParameterStatus (rare): kept out of [`ServerConn::observe`], which is inlined.
    #[inline(never)]
    fn observe_parameter<'f>(&mut self, body: &'f [u8]) -> Result<ServerEvent<'f>, ProtocolError> {
        match parse_parameter_status(body) {
            Some((name, value)) => {
                self.set_param(name, value);
                Ok(ServerEvent::Parameter { name, value })
            }
            None => Err(ProtocolError::Malformed("ParameterStatus")),
        }
    }

    /// The named prepared statements it holds.
    pub fn prepared(&mut self) -> &mut ServerStatements {
        &mut self.prepared
    }

    /// The ParameterStatus values it reported, in the order first seen.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// Records a ParameterStatus the server sent.
    fn set_param(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == name) {
            Some(slot) if slot.1 == value => return,
            Some(slot) => value.clone_into(&mut slot.1),
            None => self.params.push((name.to_owned(), value.to_owned())),
        }
        self.settings_stamp = 0;
        // Rare (a SET of a reported parameter): recount, so checkouts need not.
        self.drifted = self.params.iter().any(|(k, v)| {
            self.initial_params
                .iter()
                .any(|(ik, iv)| ik == k && iv != v)
        });
    }

    /// The value of a reported parameter, by name in any case.
    pub fn param_ci(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of a parameter the server reported.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reported parameters whose value changed since login: (name, value at login).
    pub fn drifted_params(&self) -> impl Iterator<Item = (&str, &str)> {
        let drifted = if self.drifted {
            self.initial_params.as_slice()
        } else {
            &[]
        };
        drifted
            .iter()
            .filter(|(name, initial)| self.param(name).is_some_and(|now| now != initial))
            .map(|(name, initial)| (name.as_str(), initial.as_str()))
    }

    /// A setting applied to it that the server does not report.
    pub fn applied(&self, lower_name: &str) -> Option<&SettingValue> {
        self.applied
            .iter()
            .find(|(k, _)| k == lower_name)
            .map(|(_, v)| v)
    }

    /// Records (or with `None` forgets) a setting applied to it.
    pub fn set_applied(&mut self, lower_name: &str, value: Option<SettingValue>) {
        self.settings_stamp = 0;
        self.applied.retain(|(k, _)| k != lower_name);
        if let Some(value) = value {
            self.applied.push((lower_name.to_owned(), value));
        }
    }

    /// The settings stamp it was last found in line with (0: none, or changed since).
    pub fn settings_stamp(&self) -> u64 {
        self.settings_stamp
    }

    /// Records that it has exactly the settings of the clients stamped `stamp`.
    pub fn set_settings_stamp(&mut self, stamp: u64) {
        self.settings_stamp = stamp;
    }

    /// The lowercase names of the settings applied to it, without allocating.
    pub fn applied_settings(&self) -> impl Iterator<Item = &str> {
        self.applied.iter().map(|(k, _)| k.as_str())
    }

    /// Names of the settings applied to it.
    pub fn applied_names(&self) -> Vec<String> {
        self.applied.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Forgets every applied setting (RESET ALL, DISCARD ALL).
    pub fn clear_applied(&mut self) {
        self.settings_stamp = 0;
        self.applied.clear();
    }

    /// Whether the idle socket still looks usable: no EOF and no unexpected bytes (such as
    /// the FATAL a server sends when it shuts down). Never blocks.
    pub fn looks_alive(&self) -> bool {
        self.stream.is_quiet()
    }

    /// Runs `sql`, a query of pgmux's own (ROLLBACK, a reset query, `SHOW`), with the simple
    /// protocol on a connection no client is using, and reads up to its ReadyForQuery within
    /// `limit`, keeping only what [`Quiet`] says. An I/O or protocol failure or the time
    /// limit is an error; the connection must then be closed.
    pub async fn query_quietly(
        &mut self,
        sql: &str,
        limit: Duration,
    ) -> Result<Quiet, ProtocolError> {
        let mut out = BytesMut::new();
        write::query(&mut out, sql);
        let work = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await?; // TLS: the ciphertext may still wait in rustls
            let mut quiet = Quiet::default();
            loop {
                while let Some(frame) = self.next_frame()? {
                    if !frame.is_whole() {
                        return Err(ProtocolError::Malformed(
                            "oversized reply to pgmux's own query",
                        ));
                    }
                    match frame.tag {
                        tag::ERROR_RESPONSE => {
                            quiet.failed = true;
                            quiet.error.get_or_insert_with(|| frame.body().to_vec());
                        }
                        tag::DATA_ROW => quiet.value = first_column(frame.body()),
                        _ => {}
                    }
                    if let ServerEvent::Ready(status) = self.observe(frame.as_ref())? {
                        quiet.status = Some(status);
                        return Ok(quiet);
                    }
                }
                if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            }
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
    }

    /// Runs a query of pgmux's own for cleanup; true when it succeeded and left the server
    /// idle outside a transaction (otherwise the connection must be closed).
    pub async fn run_quietly(&mut self, sql: &str, limit: Duration) -> bool {
        matches!(
            self.query_quietly(sql, limit).await,
            Ok(Quiet {
                status: Some(TxStatus::Idle),
                failed: false,
                ..
            })
        )
    }

    /// Says goodbye to the server and drops the socket. Never blocks.
    pub fn close(mut self) {
        let mut out = BytesMut::new();
        write::terminate(&mut out);
        let _ = self.stream.try_write(&out);
        if let ServerStream::Tls(s) = &mut self.stream {
            s.close_now();
        }
    }
}

/// The first column of a DataRow body, as text (NULL and binary values are `None`).
fn first_column(body: &[u8]) -> Option<String> {
    let (len, rest) = crate::protocol::read_i32(body.get(2..)?)?;
    let len = usize::try_from(len).ok()?;
    Some(String::from_utf8_lossy(rest.get(..len)?).into_owned())
}
