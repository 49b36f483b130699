//! One connection to a PostgreSQL server: opened and authenticated by [`connect`], then
//! owned by the pool while idle or by one client session during a transaction.

mod connect;
mod stream;

pub use connect::{ConnectError, Upstream, connect, error_fields};
pub use stream::{ServerAddr, ServerStream, TryWrite};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

use crate::prepared::ServerStatements;
use crate::protocol::{MessageCodec, ProtocolError, tag, write};

/// The key PostgreSQL gave this connection, needed to cancel its queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendKey {
    /// The backend's process id.
    pub process_id: i32,
    /// The secret that goes with it.
    pub secret: i32,
}

/// How a session setting is applied to a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettingValue {
    /// A value as text, as in a startup packet or ParameterStatus: `set_config(name, text)`.
    Text(String),
    /// A value as SQL, as the client wrote it after `SET name =`: replayed verbatim.
    Sql(String),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The most read buffer an idle connection keeps.
const READ_BUF_KEPT: usize = 64 * 1024;

/// An authenticated server connection. Owned by exactly one party at a time.
#[derive(Debug)]
pub struct ServerConn {
    /// The socket. The client session reads and writes it directly while it holds the connection.
    pub stream: ServerStream,
    /// Bytes read from the server and not yet handled.
    pub read_buf: BytesMut,
    /// Frames server messages; tracks a large message still streaming through.
    pub codec: MessageCodec,
    /// ParameterStatus values the server reported, in the order first seen.
    pub params: Vec<(String, String)>,
    /// Its cancel key.
    pub key: BackendKey,
    /// Where it is connected (cancel requests go there).
    pub addr: ServerAddr,
    /// A process-wide id, for logs.
    pub id: u64,
    /// When it was opened.
    pub created: Instant,
    /// When it last went idle.
    pub idle_since: Instant,
    /// The transaction status of the last ReadyForQuery: `I`, `T` or `E`.
    pub tx_status: u8,
    /// Set when its state is unknown (an error mid-message, a client gone mid-query):
    /// such a connection is closed, never reused.
    pub broken: bool,
    /// When the pool retires it (max_lifetime with jitter), if ever.
    pub retire_at: Option<Instant>,
    /// ParameterStatus values as the server reported them right after login.
    pub initial_params: Vec<(String, String)>,
    /// Whether some reported parameter differs from its value in `initial_params`.
    pub drifted: bool,
    /// Settings the server does not report that clients had applied to it, by lowercase name.
    pub applied: Vec<(String, SettingValue)>,
    /// Named prepared statements it holds.
    pub prepared: ServerStatements,
}

impl ServerConn {
    fn new(stream: ServerStream, addr: ServerAddr) -> Self {
        let now = Instant::now();
        ServerConn {
            stream,
            read_buf: BytesMut::with_capacity(8 * 1024),
            codec: MessageCodec::default(),
            params: Vec::new(),
            key: BackendKey {
                process_id: 0,
                secret: 0,
            },
            addr,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            created: now,
            idle_since: now,
            tx_status: b'I',
            broken: false,
            retire_at: None,
            initial_params: Vec::new(),
            drifted: false,
            applied: Vec::new(),
            prepared: ServerStatements::default(),
        }
    }

    /// Whether it can go back to the pool: idle, outside a transaction, nothing half-read.
    pub fn is_clean(&self) -> bool {
        !self.broken
            && self.tx_status == b'I'
            && self.read_buf.is_empty()
            && !self.codec.in_message()
    }

    /// Marks it unusable: whatever happens to it next, the pool closes it.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Records a ParameterStatus the server sent.
    pub fn set_param(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == name) {
            Some(slot) if slot.1 == value => return,
            Some(slot) => value.clone_into(&mut slot.1),
            None => self.params.push((name.to_owned(), value.to_owned())),
        }
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

    /// A setting applied to it that the server does not report.
    pub fn applied(&self, lower_name: &str) -> Option<&SettingValue> {
        self.applied
            .iter()
            .find(|(k, _)| k == lower_name)
            .map(|(_, v)| v)
    }

    /// Records (or with `None` forgets) a setting applied to it.
    pub fn set_applied(&mut self, lower_name: &str, value: Option<SettingValue>) {
        self.applied.retain(|(k, _)| k != lower_name);
        if let Some(value) = value {
            self.applied.push((lower_name.to_owned(), value));
        }
    }

    /// Names of the settings applied to it.
    pub fn applied_names(&self) -> Vec<String> {
        self.applied.iter().map(|(k, _)| k.clone()).collect()
    }

    /// The value of a parameter the server reported.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the idle socket still looks usable: no EOF and no unexpected bytes (such as
    /// the FATAL a server sends when it shuts down). Never blocks.
    pub fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }

    /// Runs `sql` with the simple protocol and reads up to its ReadyForQuery, dropping the
    /// replies. Returns the final transaction status; an ErrorResponse counts as failure.
    /// Used for ROLLBACK and reset queries on a connection no client is using.
    pub async fn run_quietly(&mut self, sql: &str, limit: Duration) -> Result<u8, ProtocolError> {
        let mut out = BytesMut::new();
        write::query(&mut out, sql);
        let work = async {
            self.stream.write_all(&out).await?;
            let mut failed = false;
            loop {
                while let Some(frame) = self.codec.decode(&mut self.read_buf)? {
                    match frame.tag {
                        tag::ERROR_RESPONSE => failed = true,
                        tag::PARAMETER_STATUS if frame.is_whole() => {
                            if let Some((k, v)) = parse_parameter_status(frame.body()) {
                                self.set_param(k, v);
                            }
                        }
                        tag::READY_FOR_QUERY if frame.is_whole() => {
                            let status = frame.body().first().copied().unwrap_or(b'E');
                            self.tx_status = status;
                            if failed {
                                return Err(ProtocolError::Malformed(
                                    "error reply to a reset query",
                                ));
                            }
                            return Ok(status);
                        }
                        _ => {}
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

    /// Drops a read buffer that a big result grew (sessions read up to 256 KiB at a time):
    /// an idle connection keeps no large buffer.
    pub fn shrink_read_buffer(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > READ_BUF_KEPT {
            self.read_buf = BytesMut::new();
        }
    }

    /// Says goodbye to the server and drops the socket. Never blocks.
    pub fn close(self) {
        let mut out = BytesMut::new();
        write::terminate(&mut out);
        let _ = self.stream.try_write(&out);
    }
}

/// Splits a ParameterStatus body into name and value.
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = crate::protocol::read_cstr(body)?;
    let (value, _) = crate::protocol::read_cstr(rest)?;
    Some((name, value))
}
