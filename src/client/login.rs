//! A client's way in: startup negotiation, password check by pgmux itself, and the
//! greeting (ParameterStatus, BackendKeyData, ReadyForQuery).

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;
use tracing::debug;

use super::error::ClientError;
use super::params::ClientParams;
use super::session::{Limits, Session};
use crate::auth::{Credential, SCRAM_MECHANISM, ScramExchange};
use crate::config::AuthMethod;
use crate::logging::Escaped;
use crate::pooler::Pooler;
use crate::protocol::startup::{self, MAX_STARTUP_PACKET, Startup, StartupError, StartupPacket};
use crate::protocol::{MessageCodec, PgError, read_cstr, read_i32, tag, write};

/// How a login ends early.
pub(super) enum Refusal {
    /// The client left, or only wanted to cancel: nothing to say.
    Gone,
    /// Tell the client this, then close.
    Error(PgError),
    /// Not a refusal: an admin asked for the admin console (`crate::admin::console`),
    /// which takes the socket after AuthenticationOk, with the bytes read so far.
    Console { user: String, cbuf: BytesMut },
}

impl From<std::io::Error> for Refusal {
    fn from(_: std::io::Error) -> Self {
        Refusal::Gone
    }
}

impl From<PgError> for Refusal {
    fn from(e: PgError) -> Self {
        Refusal::Error(e)
    }
}

impl From<ClientError> for Refusal {
    fn from(e: ClientError) -> Self {
        Refusal::Error(e.fatal())
    }
}

/// Runs the startup and authentication of one client. Returns the session to run.
pub(super) async fn login(
    socket: &mut TcpStream,
    pooler: &Arc<Pooler>,
    admitted: bool,
) -> Result<Session, Refusal> {
    // Bytes read from the client and not yet used: the startup packets, the password
    // messages, then whatever the session gets to read first.
    let mut cbuf = BytesMut::new();
    let startup = read_startup(socket, &mut cbuf, pooler).await?;
    if !admitted {
        let max = pooler.snapshot().config.server.max_client_conn;
        return Err(ClientError::TooManyClients { max }.into());
    }
    if startup
        .get("replication")
        .is_some_and(|v| !matches!(v, "false" | "off" | "no" | "0"))
    {
        return Err(ClientError::Replication.into());
    }
    let mut out = BytesMut::new();
    let unknown: Vec<String> = startup
        .params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if startup.minor > 0 || !unknown.is_empty() {
        write::negotiate_protocol_version(&mut out, 0, &unknown);
    }

    let user = startup.get("user").unwrap_or_default().to_owned();
    if user.is_empty() {
        return Err(ClientError::NoUser.into());
    }
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_owned();

    let snapshot = pooler.snapshot();
    if !snapshot.config.databases.contains_key(&database)
        && !crate::admin::console::is_console_database(&database)
    {
        return Err(ClientError::UnknownDatabase(database).into());
    }
    if !snapshot.config.users.contains_key(&user) {
        return Err(ClientError::UnknownUser(user).into());
    }

    let method = snapshot.config.auth_method_for(&user);
    if method != AuthMethod::Trust {
        let Some(credential) = snapshot.credentials.get(&user) else {
            return Err(bad_password(&user).into());
        };
        let scram = method == AuthMethod::ScramSha256 && credential.scram().is_some();
        socket.write_all(&out).await?;
        out.clear();
        if scram {
            // Leaves AuthenticationSASLFinal in `out`, sent with AuthenticationOk below.
            scram_login(socket, &mut cbuf, &mut out, &user, credential).await?;
        } else {
            md5_login(socket, &mut cbuf, &user, credential).await?;
        }
    }
    // Admin console hook: `pgbouncer` / `pgmux` open the console, for auth.admin_users only.
    if crate::admin::console::is_console_database(&database) {
        crate::admin::console::admit(&snapshot.config, &user)?;
        write::auth_ok(&mut out);
        socket.write_all(&out).await?;
        return Err(Refusal::Console { user, cbuf });
    }
    write::auth_ok(&mut out);

    let Some(pool) = pooler.pool(&database, &user) else {
        return Err(ClientError::UnknownDatabase(database).into());
    };
    let mut params = pool.server_params();
    if params.is_empty() {
        // The first client of a pool: learn what the server reports from a real connection.
        match pool.checkout().await {
            Ok(lease) => lease.release(),
            Err(e) => {
                return Err(ClientError::Checkout(e).into());
            }
        }
        params = pool.server_params();
    }
    let mut settings = ClientParams::from_startup(&startup.params);
    for (name, value) in settings.greeting(&params) {
        write::parameter_status(&mut out, &name, &value);
    }
    let cancel = pooler.cancels.register();
    let (process_id, secret) = cancel.key();
    write::backend_key_data(&mut out, process_id, secret);
    write::ready_for_query(&mut out, b'I');
    socket.write_all(&out).await?;
    debug!(user = %Escaped(&user), database = %Escaped(&database), "client logged in");

    let pool_settings = pool.settings();
    let peer = socket.peer_addr()?;
    let view = pooler.clients_registry.register(
        peer,
        &database,
        &user,
        startup.get("application_name").unwrap_or_default(),
    );
    Ok(Session {
        view,
        mode: pool_settings.mode,
        limits: Limits {
            idle_transaction: pool_settings.idle_transaction_timeout,
            query: pool_settings.query_timeout,
            partial_message: snapshot.config.server.partial_message_timeout,
            pinned_idle: pool_settings.pinned_idle_timeout,
        },
        state_policy: pool_settings.session_state,
        max_message_size: snapshot.config.server.max_message_size,
        reset_query: pool_settings.server_reset_query.clone(),
        max_prepared: pool_settings.max_prepared_statements as usize,
        registry: pooler.statements.clone(),
        params: settings,
        pool,
        cancel,
        stop: pooler.stop.clone(),
        kill: pooler.kill.clone(),
        cbuf,
    })
}

/// Reads startup packets until the StartupMessage, answering SSL and GSSAPI requests
/// with `N` and forwarding a CancelRequest.
async fn read_startup(
    socket: &mut TcpStream,
    cbuf: &mut BytesMut,
    pooler: &Pooler,
) -> Result<Startup, Refusal> {
    loop {
        match startup::read_packet(socket, cbuf).await {
            Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
                socket.write_all(b"N").await?;
            }
            Ok(StartupPacket::Cancel { process_id, secret }) => {
                pooler.cancels.cancel(process_id, secret).await;
                return Err(Refusal::Gone);
            }
            Ok(StartupPacket::Startup(startup)) => return Ok(startup),
            Err(StartupError::Io(_)) => return Err(Refusal::Gone),
            Err(e) => return Err(ClientError::Startup(e).into()),
        }
    }
}

async fn scram_login(
    socket: &mut TcpStream,
    cbuf: &mut BytesMut,
    out: &mut BytesMut,
    user: &str,
    credential: &Credential,
) -> Result<(), Refusal> {
    let Some(verifier) = credential.scram() else {
        return Err(ClientError::Authentication("no SCRAM secret for this user".into()).into());
    };
    write::auth_sasl(out, &[SCRAM_MECHANISM]);
    socket.write_all(out).await?;

    let first = read_password_message(socket, cbuf).await?;
    let malformed = || ClientError::Authentication("malformed SASLInitialResponse".into());
    let (mechanism, rest) = read_cstr(&first).ok_or_else(malformed)?;
    if mechanism != SCRAM_MECHANISM {
        return Err(ClientError::Authentication(format!(
            "client selected an invalid SASL mechanism \"{mechanism}\""
        ))
        .into());
    }
    let (len, data) = read_i32(rest).ok_or_else(malformed)?;
    let data = usize::try_from(len)
        .ok()
        .and_then(|n| data.get(..n))
        .ok_or_else(malformed)?;

    let mut exchange = ScramExchange::new(verifier.clone());
    let server_first = exchange
        .client_first(data)
        .map_err(|e| auth_refusal(user, e))?;
    out.clear();
    write::auth_sasl_step(out, 11, &server_first);
    socket.write_all(out).await?;

    let last = read_password_message(socket, cbuf).await?;
    let server_final = exchange
        .client_final(&last)
        .map_err(|e| auth_refusal(user, e))?;
    out.clear();
    write::auth_sasl_step(out, 12, &server_final);
    Ok(())
}

async fn md5_login(
    socket: &mut TcpStream,
    cbuf: &mut BytesMut,
    user: &str,
    credential: &Credential,
) -> Result<(), Refusal> {
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::new();
    write::auth_md5(&mut out, salt);
    socket.write_all(&out).await?;
    let body = read_password_message(socket, cbuf).await?;
    let response = body.strip_suffix(&[0]).unwrap_or(&body);
    if credential.check_md5(salt, response) {
        Ok(())
    } else {
        Err(bad_password(user).into())
    }
}

/// Reads one PasswordMessage-family message ('p') and returns its body.
async fn read_password_message(
    socket: &mut TcpStream,
    cbuf: &mut BytesMut,
) -> Result<BytesMut, Refusal> {
    let mut codec = MessageCodec::new(MAX_STARTUP_PACKET);
    loop {
        match codec.decode(cbuf) {
            Ok(Some(frame)) if frame.is_whole() && frame.tag == tag::PASSWORD => {
                let mut bytes = frame.bytes;
                return Ok(bytes.split_off(5));
            }
            Ok(Some(frame)) => {
                return Err(ClientError::Authentication(format!(
                    "expected a password response, got message type '{}'",
                    char::from(frame.tag).escape_default()
                ))
                .into());
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e).into()),
        }
        // Room for a whole SCRAM message in one read.
        cbuf.reserve(512);
        if socket.read_buf(cbuf).await? == 0 {
            return Err(Refusal::Gone);
        }
    }
}

fn bad_password(user: &str) -> ClientError {
    ClientError::BadPassword(user.to_owned())
}

fn auth_refusal(user: &str, e: crate::auth::AuthError) -> Refusal {
    match e {
        crate::auth::AuthError::BadPassword => bad_password(user).into(),
        other => ClientError::Authentication(other.to_string()).into(),
    }
}
