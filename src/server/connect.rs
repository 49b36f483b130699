//! Opening a server connection: TCP connect, TLS if the pool's `server_tls` asks for it,
//! StartupMessage, authentication with whatever
//! the server asks for, then ParameterStatus and BackendKeyData up to ReadyForQuery.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

use super::tls::{Negotiated, TlsConnector};
use super::{BackendKey, ServerAddr, ServerConn, ServerStream};
use crate::auth::{ScramClient, ScramClientError, ScramKeys, md5_response};
use crate::config::TcpOptions;
use crate::protocol::read::{fields, parse_parameter_status};
use crate::protocol::{Frame, ProtocolError, read_i32, tag};

/// Where and as whom a pool connects.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or address, or the directory of PostgreSQL's Unix socket (`/...`).
    pub host: String,
    /// TCP port, or the number in the Unix socket's name (`.s.PGSQL.<port>`).
    pub port: u16,
    /// The database on the server.
    pub dbname: String,
    /// The role to log in as.
    pub user: String,
    /// What pgmux answers the server's authentication request with; `None` = nothing
    /// known (a server that asks gets no answer, and the pool says why).
    pub secret: Option<ServerSecret>,
    /// Keepalive and user timeout of the TCP socket (the pool's `tcp_*` settings).
    pub tcp: TcpOptions,
    /// TLS to the server (the pool's `server_tls*` settings); never over a Unix socket.
    pub tls: TlsConnector,
}

/// What pgmux proves a user's identity to PostgreSQL with.
#[derive(Clone, PartialEq, Eq)]
pub enum ServerSecret {
    /// The password (from the config): answers every method.
    Password(String),
    /// SCRAM keys recovered from a client's login (`auth_query` with a SCRAM verifier):
    /// answers SCRAM-SHA-256 only.
    Scram(ScramKeys),
    /// The md5 hash as PostgreSQL stores it (`auth_query` with an md5 secret): answers md5
    /// only.
    Md5(String),
}

impl ServerSecret {
    /// What kind of secret it is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerSecret::Password(_) => "password",
            ServerSecret::Scram(_) => "SCRAM keys",
            ServerSecret::Md5(_) => "md5 hash",
        }
    }
}

impl std::fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerSecret::{}(..)", self.kind())
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password stays out of logs.
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

impl std::fmt::Display for Upstream {
    /// `host:port`, or the Unix socket's path when the host is a directory.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match super::ServerAddr::unix_socket(&self.host, self.port) {
            Some(path) => write!(f, "{}", path.display()),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// Why a server connection could not be opened. The pool keeps a clone of the last one
/// while the upstream is down (its health), so every cause is cheap to clone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The socket failed: connection refused, host unreachable, reset during login.
    #[error("{0}")]
    Io(IoError),
    /// The server closed the connection during login without an ErrorResponse.
    #[error("the server closed the connection during login")]
    Closed,
    /// No answer within connect_timeout.
    #[error("no answer within {0:?} (connect_timeout)")]
    Timeout(Duration),
    /// PostgreSQL refused the login with an ErrorResponse: 53300 when it reached
    /// `max_connections`, 57P03 while it starts or stops, 28P01 for a wrong password,
    /// 3D000 for a missing database. Its SQLSTATE and text are kept for the client.
    #[error("PostgreSQL refused the login: {message} (SQLSTATE {code})")]
    Server {
        /// The SQLSTATE, five characters as PostgreSQL sent it.
        code: String,
        /// Its primary message.
        message: String,
        /// Its DETAIL, if any.
        detail: Option<String>,
        /// Its HINT, if any.
        hint: Option<String>,
    },
    /// The server asks for a password and none is configured for the user.
    #[error(
        "server asks for a password for user \"{user}\" and none is configured (users.{user}.password or server_password)"
    )]
    NoPassword {
        /// The user pgmux logs in as.
        user: String,
    },
    /// The server asks for a method the secret pgmux has for the user cannot answer (SCRAM
    /// keys or an md5 hash from `auth_query`, never the password).
    #[error(
        "PostgreSQL asks for {asked} authentication of user \"{user}\", which pgmux cannot answer with the {have} it has from auth_query: {fix}"
    )]
    SecretMismatch {
        /// The user pgmux logs in as.
        user: String,
        /// The method the server asked for.
        asked: &'static str,
        /// What pgmux has ([`ServerSecret::kind`]).
        have: &'static str,
        /// What the operator can do.
        fix: &'static str,
    },
    /// The SCRAM verifier PostgreSQL uses now is not the one the keys came from: the
    /// user's password changed since its last login to pgmux.
    #[error(
        "the password of user \"{user}\" changed in PostgreSQL since its client logged in to pgmux: the next login of \"{user}\" brings new keys"
    )]
    SecretChanged {
        /// The user pgmux logs in as.
        user: String,
    },
    /// The server asks for an authentication method pgmux does not implement (the code of
    /// its Authentication message).
    #[error("server asks for authentication method {0}, which pgmux does not support")]
    UnsupportedAuth(i32),
    /// The server offers SASL without SCRAM-SHA-256.
    #[error("server offers no SASL mechanism pgmux supports (it speaks SCRAM-SHA-256)")]
    NoScram,
    /// The SCRAM exchange failed (a wrong server proof, a malformed server message).
    #[error("SCRAM: {0}")]
    Scram(IoError),
    /// The server broke the protocol during login.
    #[error("protocol error: {0}")]
    Protocol(Arc<ProtocolError>),
    /// TLS could not be set up as `server_tls` asks: the server refused it, or the
    /// handshake or the certificate check failed. The message names the setting.
    #[error("{0}")]
    Tls(Arc<str>),
}

impl ConnectError {
    /// The SQLSTATE PostgreSQL refused the login with, when it did.
    pub fn server_code(&self) -> Option<&str> {
        match self {
            ConnectError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An I/O error that can be cloned (shared), keeping its kind and OS error.
#[derive(Debug, Clone)]
pub struct IoError(Arc<std::io::Error>);

impl IoError {
    /// What kind of failure it was (`ConnectionRefused`, `ConnectionReset`, ...).
    pub fn kind(&self) -> std::io::ErrorKind {
        self.0.kind()
    }
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError(Arc::new(e))
    }
}

impl From<&str> for IoError {
    /// A failure pgmux describes itself (kind `Other`).
    fn from(message: &str) -> Self {
        std::io::Error::other(message.to_owned()).into()
    }
}

impl From<std::io::Error> for ConnectError {
    fn from(e: std::io::Error) -> Self {
        ConnectError::Io(e.into())
    }
}

impl From<ProtocolError> for ConnectError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Io(e) => e.into(),
            other => ConnectError::Protocol(Arc::new(other)),
        }
    }
}

/// Opens and authenticates a connection to `upstream` within `limit`. Cancel-safe: a
/// dropped future just drops the socket.
pub async fn connect(
    upstream: &Upstream,
    limit: Duration,
) -> Result<Box<ServerConn>, ConnectError> {
    match tokio::time::timeout(limit, connect_inner(upstream)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout(limit)),
    }
}

async fn connect_inner(upstream: &Upstream) -> Result<Box<ServerConn>, ConnectError> {
    let (stream, addr) =
        ServerStream::connect(&upstream.host, upstream.port, &upstream.tcp).await?;
    let (stream, addr) = match (stream, addr) {
        (ServerStream::Tcp(tcp), ServerAddr::Tcp(peer)) => {
            match upstream.tls.negotiate(tcp, &upstream.host).await {
                Ok(Negotiated::Plain(tcp)) => (ServerStream::Tcp(tcp), ServerAddr::Tcp(peer)),
                Ok(Negotiated::Tls(io)) => {
                    let addr = ServerAddr::Tls {
                        addr: peer,
                        host: upstream.host.as_str().into(),
                        tls: upstream.tls.clone(),
                    };
                    (ServerStream::Tls(io), addr)
                }
                Err(message) => return Err(ConnectError::Tls(message.into())),
            }
        }
        // A Unix socket: never TLS, as libpq.
        unix => unix,
    };
    let mut conn = Box::new(ServerConn::new(stream, addr));

    let mut out = BytesMut::new();
    let params = [
        ("user", upstream.user.as_str()),
        ("database", upstream.dbname.as_str()),
        ("client_encoding", "UTF8"),
        ("application_name", "pgmux"),
    ];
    frontend::startup_message(params.iter().copied(), &mut out)?;
    conn.stream.write_all(&out).await?;
    conn.stream.flush().await?; // TLS: rustls may hold the ciphertext

    let mut scram: Option<Scram> = None;
    loop {
        let frame = next_message(&mut conn).await?;
        let body = frame.body();
        match frame.tag {
            tag::AUTHENTICATION => {
                let (code, rest) =
                    read_i32(body).ok_or(ProtocolError::Malformed("Authentication"))?;
                out.clear();
                match code {
                    0 => {}
                    3 => {
                        let password = password(upstream, "cleartext password")?;
                        frontend::password_message(password.as_bytes(), &mut out)?;
                    }
                    5 => {
                        let salt: [u8; 4] = rest
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or(ProtocolError::Malformed("AuthenticationMD5Password"))?;
                        let hash = match secret(upstream)? {
                            ServerSecret::Password(password) => {
                                md5_hash(upstream.user.as_bytes(), password.as_bytes(), salt)
                            }
                            ServerSecret::Md5(stored) => {
                                let hex = stored.strip_prefix("md5").unwrap_or(stored);
                                String::from_utf8_lossy(&md5_response(hex, salt)).into_owned()
                            }
                            ServerSecret::Scram(_) => {
                                return Err(mismatch(
                                    upstream,
                                    "md5",
                                    "auth_query returned a SCRAM verifier but PostgreSQL holds an md5 hash for this role: make auth_query return pg_authid's own secret",
                                ));
                            }
                        };
                        frontend::password_message(hash.as_bytes(), &mut out)?;
                    }
                    10 => {
                        let offers_scram = rest
                            .split(|&b| b == 0)
                            .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(ConnectError::NoScram);
                        }
                        let exchange = match secret(upstream)? {
                            ServerSecret::Password(password) => {
                                Scram::Password(sasl::ScramSha256::new(
                                    password.as_bytes(),
                                    sasl::ChannelBinding::unsupported(),
                                ))
                            }
                            ServerSecret::Scram(keys) => {
                                Scram::Keys(ScramClient::new(keys.clone()))
                            }
                            ServerSecret::Md5(_) => {
                                return Err(mismatch(
                                    upstream,
                                    "SCRAM-SHA-256",
                                    "the role has an md5 password but pg_hba.conf asks for scram-sha-256: set the role's password again with password_encryption = scram-sha-256, or use md5 in pg_hba.conf for it",
                                ));
                            }
                        };
                        let first = match &exchange {
                            Scram::Password(e) => e.message().to_vec(),
                            Scram::Keys(c) => c.client_first(),
                        };
                        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, &first, &mut out)?;
                        scram = Some(exchange);
                    }
                    11 | 12 => {
                        let exchange = scram
                            .take()
                            .ok_or(ProtocolError::Malformed("SASL step before SASL start"))?;
                        let scram_error = |e: std::io::Error| ConnectError::Scram(e.into());
                        match (exchange, code) {
                            (Scram::Password(exchange), 11) => {
                                // The salted password takes PBKDF2 (4096 rounds or more,
                                // about a millisecond): off the thread that runs the sessions.
                                let server_first = rest.to_vec();
                                let step = tokio::task::spawn_blocking(move || {
                                    let mut exchange = exchange;
                                    exchange.update(&server_first).map(|()| exchange)
                                });
                                let exchange = step
                                    .await
                                    .map_err(|e| scram_error(std::io::Error::other(e)))?
                                    .map_err(scram_error)?;
                                frontend::sasl_response(exchange.message(), &mut out)?;
                                scram = Some(Scram::Password(exchange));
                            }
                            (Scram::Password(mut exchange), _) => {
                                exchange.finish(rest).map_err(scram_error)?;
                            }
                            (Scram::Keys(mut client), 11) => {
                                let last = client
                                    .server_first(rest)
                                    .map_err(|e| keys_error(upstream, e))?;
                                frontend::sasl_response(&last, &mut out)?;
                                scram = Some(Scram::Keys(client));
                            }
                            (Scram::Keys(mut client), _) => {
                                client
                                    .server_final(rest)
                                    .map_err(|e| keys_error(upstream, e))?;
                            }
                        }
                    }
                    other => return Err(ConnectError::UnsupportedAuth(other)),
                }
                if !out.is_empty() {
                    conn.stream.write_all(&out).await?;
                    conn.stream.flush().await?;
                }
            }
            tag::PARAMETER_STATUS => {
                if let Some((name, value)) = parse_parameter_status(body) {
                    conn.set_param(name, value);
                }
            }
            tag::BACKEND_KEY_DATA => {
                let (process_id, rest) =
                    read_i32(body).ok_or(ProtocolError::Malformed("BackendKeyData"))?;
                let (secret, _) =
                    read_i32(rest).ok_or(ProtocolError::Malformed("BackendKeyData"))?;
                conn.key = BackendKey { process_id, secret };
            }
            tag::ERROR_RESPONSE => return Err(refusal(body)),
            tag::READY_FOR_QUERY => {
                conn.tx_status = body
                    .first()
                    .copied()
                    .and_then(super::TxStatus::from_byte)
                    .ok_or(ProtocolError::Malformed("ReadyForQuery"))?;
                conn.initial_params = conn.params.clone();
                return Ok(conn);
            }
            // NoticeResponse and NegotiateProtocolVersion need no answer.
            _ => {}
        }
    }
}

/// One SCRAM login in progress: with the password, or with keys from a client's login.
enum Scram {
    Password(sasl::ScramSha256),
    Keys(ScramClient),
}

fn secret(upstream: &Upstream) -> Result<&ServerSecret, ConnectError> {
    upstream
        .secret
        .as_ref()
        .ok_or_else(|| ConnectError::NoPassword {
            user: upstream.user.clone(),
        })
}

/// The password, for a server that asks for it in clear text.
fn password<'a>(upstream: &'a Upstream, asked: &'static str) -> Result<&'a str, ConnectError> {
    match secret(upstream)? {
        ServerSecret::Password(password) => Ok(password),
        _ => Err(mismatch(
            upstream,
            asked,
            "pg_hba.conf must ask for scram-sha-256 or md5 for users from auth_query (pgmux never learns their password)",
        )),
    }
}

fn mismatch(upstream: &Upstream, asked: &'static str, fix: &'static str) -> ConnectError {
    ConnectError::SecretMismatch {
        user: upstream.user.clone(),
        asked,
        have: upstream
            .secret
            .as_ref()
            .map_or("nothing", ServerSecret::kind),
        fix,
    }
}

/// A failed SCRAM login with keys: a changed salt means a changed password.
fn keys_error(upstream: &Upstream, e: ScramClientError) -> ConnectError {
    match e {
        ScramClientError::SaltChanged => ConnectError::SecretChanged {
            user: upstream.user.clone(),
        },
        other => ConnectError::Scram(other.to_string().as_str().into()),
    }
}

/// Reads one whole message during login, when messages are small.
async fn next_message(conn: &mut ServerConn) -> Result<Frame, ConnectError> {
    loop {
        if let Some(frame) = conn.codec.decode(&mut conn.read_buf)? {
            if !frame.is_whole() {
                return Err(ProtocolError::Malformed("oversized login").into());
            }
            return Ok(frame);
        }
        if conn.stream.read_buf(&mut conn.read_buf).await? == 0 {
            return Err(ConnectError::Closed);
        }
    }
}

/// The ErrorResponse PostgreSQL refused a login with, as a [`ConnectError::Server`].
fn refusal(body: &[u8]) -> ConnectError {
    let (mut code, mut message) = (String::new(), String::new());
    let (mut detail, mut hint) = (None, None);
    for (field, value) in fields(body) {
        match field {
            b'C' => code = value.to_owned(),
            b'M' => message = value.to_owned(),
            b'D' => detail = Some(value.to_owned()),
            b'H' => hint = Some(value.to_owned()),
            _ => {}
        }
    }
    ConnectError::Server {
        code,
        message,
        detail,
        hint,
    }
}
