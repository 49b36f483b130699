//! A client's way in: startup negotiation, password check by pgmux itself, and the
//! greeting (ParameterStatus, BackendKeyData, ReadyForQuery).

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;
use tracing::{debug, info, warn};

use super::error::ClientError;
use super::params::{ClientParams, quote_literal};
use super::session::{Session, SessionParts};
use super::stream::ClientStream;
use super::tls::{ALPN_POSTGRESQL, ClientTls};
use crate::auth::rules::{Request, Verdict, decide};
use crate::auth::{
    Credential, FailureReason as Reason, LimitSettings, LockoutScope, LoginGuard, SCRAM_MECHANISM,
    SCRAM_PLUS_MECHANISM, ScramExchange, ScramKeys, Secret,
};
use crate::cancel::CancelTarget;
use crate::config::AuthMethod;
use crate::config::PoolMode;
use crate::logging::Escaped;
use crate::pool::{Greetings, Learnt, Lease, Pool, Reported};
use crate::pooler::{Pooler, Snapshot};
use crate::protocol::startup::{self, MAX_STARTUP_PACKET, Startup, StartupError, StartupPacket};
use crate::protocol::{
    MessageCodec, PgError, ProtocolError, SqlState, read_cstr, read_i32, tag, write,
};
use crate::server::{Quiet, ServerConn, TxStatus};

/// How a login ends early.
pub(super) enum Refusal {
    /// The client left, or only wanted to cancel: nothing to say.
    Gone,
    /// Tell the client this, then close.
    Error(PgError),
    /// Send the client this ErrorResponse of the server's, then close.
    Server(BytesMut),
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

/// A client that passed authentication (its AuthenticationOk is in `out`, unsent), to be
/// greeted by [`greet`].
pub(super) struct Authenticated {
    startup: Startup,
    user: String,
    database: String,
    snapshot: Arc<Snapshot>,
    /// What to send the client next.
    out: BytesMut,
    /// Bytes read from the client and not yet used.
    cbuf: BytesMut,
}

/// Runs the startup and authentication of one client: what the client must do within
/// `client_login_timeout`.
pub(super) async fn authenticate(
    socket: &mut ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    admitted: bool,
) -> Result<Authenticated, Refusal> {
    let result = login(socket, peer, pooler, admitted).await;
    if let Err(Refusal::Error(e)) = &result
        && e.code == SqlState::PROTOCOL_VIOLATION
    {
        // What was broken is in the "login refused" line (debug): this one is for the
        // operator's count.
        info!(%peer, reason = %Reason::Protocol.as_str(), "login failed");
        let limits = pooler.snapshot().config.auth.login_limits();
        count_failure(&pooler.logins, peer, Reason::Protocol, &limits);
    }
    result
}

/// [`authenticate`], whose protocol errors it counts.
async fn login(
    socket: &mut ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    admitted: bool,
) -> Result<Authenticated, Refusal> {
    // Bytes read from the client and not yet used: the startup packets, the password
    // messages, then whatever the session gets to read first.
    let mut cbuf = BytesMut::new();
    let tls = pooler.snapshot().client_tls.clone();
    let startup = read_startup(socket, peer, &mut cbuf, pooler, tls.as_ref()).await?;
    if let Some(tls) = &tls
        && tls.mode().required()
        && socket.tls().is_none()
    {
        info!(%peer, reason = %Reason::Tls.as_str(), "login failed: TLS required");
        let limits = pooler.snapshot().config.auth.login_limits();
        count_failure(&pooler.logins, peer, Reason::Tls, &limits);
        return Err(ClientError::TlsRequired(tls.mode().as_str()).into());
    }
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
    let who = Who {
        peer,
        user: &user,
        database: &database,
        guard: &pooler.logins,
        limits: snapshot.config.auth.login_limits(),
    };
    // A locked-out user (or address) is told so before anything is checked: its attempts
    // are counted (rate_limited), never logged one by one, and extend nothing.
    let now = Instant::now();
    if let Some((scope, left)) = pooler.logins.locked(peer.ip(), &user, &who.limits, now) {
        let limits = &who.limits;
        pooler
            .logins
            .failed(peer.ip(), &user, Reason::RateLimited, limits, now);
        let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        return Err(ClientError::LockedOut { scope, seconds }.into());
    }
    // verify-full: the certificate (checked against client_ca_file in the handshake) must
    // name this user, as PostgreSQL's clientcert=verify-full has it.
    if let (Some(tls), Some(connection)) = (&tls, socket.tls())
        && tls.mode() == crate::config::ClientTlsMode::VerifyFull
    {
        let name = super::tls::peer_common_name(connection);
        if name.as_deref() != Some(user.as_str()) {
            let why = match name {
                Some(name) => format!("the certificate's CN is \"{}\"", Escaped(&name)),
                None => "the certificate has no CN".to_owned(),
            };
            let refused = ClientError::CertificateName {
                user: user.clone(),
                why,
            };
            return Err(who.failed(Reason::Tls, refused));
        }
    }
    let is_console = crate::admin::console::is_console_database(&database);
    let known_database = is_console || snapshot.config.databases.contains_key(&database);
    let known_user = snapshot.config.users.contains_key(&user);
    let mut method = snapshot.config.auth_method_for(&user);
    let rules = &snapshot.config.auth.rules;
    if !rules.is_empty() {
        let request = Request {
            addr: peer.ip().to_canonical(),
            tls: socket.tls().is_some(),
            database: &database,
            user: &user,
        };
        match decide(rules, &request) {
            Verdict::Allow(_, chosen) => method = chosen,
            Verdict::Reject(rule) => {
                let why = match rule {
                    Some(rule) => format!("{} rejects it", rule.source),
                    None => "no rule matches".to_owned(),
                };
                let refused = ClientError::NoAccessRule {
                    host: request.addr.to_string(),
                    user: user.clone(),
                    database: database.clone(),
                    why,
                };
                return Err(who.failed(Reason::RejectedByRule, refused));
            }
        }
    }

    if method == AuthMethod::Cert {
        // The handshake checked the certificate against tls.client_ca_file; it must name
        // this user (PostgreSQL's `cert` method).
        let name = socket.tls().and_then(super::tls::peer_common_name);
        if name.as_deref() != Some(user.as_str()) {
            let why = match (socket.tls(), name) {
                (None, _) => "the connection does not use TLS".to_owned(),
                (Some(_), None) => {
                    "the client sent no certificate (or one without a CN)".to_owned()
                }
                (Some(_), Some(name)) => {
                    format!("the certificate's CN is \"{}\"", Escaped(&name))
                }
            };
            let refused = ClientError::CertificateAuth {
                user: user.clone(),
                why,
            };
            return Err(who.failed(Reason::Tls, refused));
        }
    }
    if method == AuthMethod::Password
        && socket.tls().is_none()
        && !snapshot.config.auth.allow_cleartext_without_tls
    {
        return Err(who.failed(Reason::Tls, ClientError::CleartextNeedsTls));
    }
    if matches!(method, AuthMethod::Trust | AuthMethod::Cert) {
        // Without a password there is nothing to guess: PostgreSQL, too, names what is
        // missing right away when trust lets a client in.
        if !known_user {
            return Err(who.failed(Reason::UnknownUser, ClientError::UnknownUser(user.clone())));
        }
    } else {
        socket.write_all(&out).await?;
        out.clear();
        // An unknown user, or one without a password, runs the same exchange as a real
        // one and fails with the same answer as a wrong password, so that neither the
        // messages nor their timing tell a client which user names exist.
        // A user the config does not list may be in PostgreSQL (auth_query); looked up for
        // every such user, existing or not, so that both cost the same.
        let looked_up = if !known_user && known_database && !is_console {
            let runtime = pooler.runtime();
            pooler
                .auth_queries
                .lookup(&snapshot, runtime, &database, &user)
                .await
        } else {
            None
        };
        let credential = snapshot
            .credentials
            .get(&user)
            .filter(|_| known_user)
            .or(looked_up.as_ref());
        // What a verified login reveals, to log in to PostgreSQL as an auth_query user.
        let (mut keys, mut cleartext) = (None, None);
        let verified = match credential {
            Some(c) if method == AuthMethod::Password => {
                cleartext = cleartext_login(socket, &mut cbuf, c).await?;
                cleartext.is_some()
            }
            None if method == AuthMethod::Password => {
                let mock = mock_md5_credential(&user);
                cleartext_login(socket, &mut cbuf, &mock).await?.is_some()
            }
            // Leaves AuthenticationSASLFinal in `out`, sent with AuthenticationOk below.
            // As PostgreSQL: md5 with a SCRAM verifier stored runs SCRAM.
            Some(c)
                if c.scram().is_some()
                    && (method == AuthMethod::ScramSha256
                        || matches!(c.secret(), Secret::Scram(_))) =>
            {
                let exchange = c.scram().map(|v| ScramExchange::new(v.clone()));
                keys =
                    scram_login(socket, &mut cbuf, &mut out, &user, exchange, tls.as_ref()).await?;
                keys.is_some()
            }
            Some(c) => {
                let md5 = md5_login(socket, &mut cbuf, c).await;
                if looked_up.is_some() && method == AuthMethod::ScramSha256 {
                    md5_instead_of_scram(&user, matches!(md5, Err(Refusal::Gone)));
                }
                md5?
            }
            None if method == AuthMethod::ScramSha256 => {
                let exchange = Some(ScramExchange::mock(&user));
                scram_login(socket, &mut cbuf, &mut out, &user, exchange, tls.as_ref())
                    .await?
                    .is_some()
            }
            None => md5_login(socket, &mut cbuf, &mock_md5_credential(&user)).await?,
        };
        if let Some(found) = &looked_up {
            // The pool of an auth_query user logs in with what this login taught pgmux;
            // a failure asks PostgreSQL again next time (the password may have changed).
            if !verified {
                pooler.auth_queries.login_failed(&database, &user);
            } else if let Some(secret) = crate::pooler::server_secret(found, keys, cleartext) {
                pooler.learn_server_secret(&database, &user, secret);
            }
        }
        let known_user = known_user || looked_up.is_some();
        if !verified || credential.is_none() {
            // The real reason, for the operator: the most basic one that applies.
            let reason = if !known_user {
                Reason::UnknownUser
            } else if !known_database {
                Reason::UnknownDatabase
            } else {
                Reason::BadPassword
            };
            return Err(who.failed(reason, bad_password(&user)));
        }
    }
    // As PostgreSQL: an unknown database is named only to a client that authenticated.
    if !known_database {
        return Err(who.failed(
            Reason::UnknownDatabase,
            ClientError::UnknownDatabase(database.clone()),
        ));
    }
    // Admin console hook: `pgbouncer` / `pgmux` open the console, for auth.admin_users only.
    if crate::admin::console::is_console_database(&database) {
        crate::admin::console::admit(&snapshot.config, &user)?;
        write::auth_ok(&mut out);
        socket.write_all(&out).await?;
        return Err(Refusal::Console { user, cbuf });
    }
    write::auth_ok(&mut out);
    Ok(Authenticated {
        startup,
        user,
        database,
        snapshot,
        out,
        cbuf,
    })
}

/// Greets an authenticated client as PostgreSQL would (ParameterStatus, BackendKeyData,
/// ReadyForQuery) and returns its session. Not under `client_login_timeout`: what it waits
/// for is a server (bounded by `wait_timeout`), not the client.
pub(super) async fn greet(
    socket: &mut ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    client: Authenticated,
) -> Result<Session, Refusal> {
    let Authenticated {
        startup,
        user,
        database,
        snapshot,
        mut out,
        cbuf,
    } = client;
    // DISABLE db, or SHUTDOWN WAIT_FOR_CLIENTS (pooler/admission.rs).
    pooler
        .admission
        .admit(&database)
        .map_err(ClientError::from)?;
    let Some(pool) = pooler.pool(&database, &user) else {
        return Err(ClientError::UnknownDatabase(database).into());
    };
    let pool_settings = pool.settings();
    // max_db_client_connections / max_user_client_connections (pooler/client_caps.rs).
    let client_slot = pooler
        .admit_client(&database, &user, &pool_settings)
        .map_err(ClientError::from)?;
    let mut settings = ClientParams::from_startup(&startup.params);
    // Session mode: the client keeps one server from login to the end, as with PostgreSQL
    // itself; it is greeted by that server and told its real process id.
    let held = if pool_settings.mode == PoolMode::Session {
        Some(hold_server(&pool, &settings).await?)
    } else {
        None
    };
    let params = match &held {
        Some(server) => Some(Arc::new(server.params().to_vec())),
        None => server_greeting(&pool, &settings).await?,
    };
    let params = match params {
        Some(reported) => {
            settings.adopt(&reported);
            reported
        }
        None => pool.server_params(),
    };
    for (name, value) in settings.greeting(&params) {
        write::parameter_status(&mut out, &name, &value);
    }
    let cancel = pooler
        .cancels
        .register(held.as_ref().map(|server| server.key().process_id));
    if let Some(server) = &held {
        cancel.set_target(Some(CancelTarget {
            addr: server.addr().clone(),
            key: server.key(),
        }));
    }
    let (process_id, secret) = cancel.key();
    write::backend_key_data(&mut out, process_id, secret);
    write::ready_for_query(&mut out, b'I');
    socket.write_all(&out).await?;
    debug!(user = %Escaped(&user), database = %Escaped(&database), "client logged in");

    let view = pooler.clients_registry.register(
        peer,
        &database,
        &user,
        startup.get("application_name").unwrap_or_default(),
        socket.tls_description(),
    );
    if let Some(server) = &held {
        view.set_server(Some((server.id(), server.key().process_id)));
    }
    Ok(Session::assemble(
        pooler,
        &snapshot,
        pool,
        SessionParts {
            server: held,
            view,
            params: settings,
            cancel,
            statements: Default::default(),
            cbuf,
            client_slot,
            subscription: None,
        },
    ))
}

/// Session mode: checks out the server the client keeps for its whole session (a login
/// that cannot get one is refused with the checkout's error, as PgBouncer does) and gives
/// it the client's settings, which it may refuse as PostgreSQL refuses them at login.
async fn hold_server(pool: &Arc<Pool>, settings: &ClientParams) -> Result<Lease, Refusal> {
    let mut lease = pool.checkout().await.map_err(ClientError::Checkout)?;
    let Some(sql) = settings.sync_sql(&mut lease) else {
        return Ok(lease);
    };
    let applied = lease.query_quietly(&sql, LOGIN_QUERY_LIMIT).await;
    match applied {
        Ok(Quiet {
            status: Some(TxStatus::Idle),
            error: None,
            ..
        }) => Ok(lease),
        Ok(Quiet {
            error: Some(body), ..
        }) => {
            // The query was rolled back, so the server's record of what was applied to it
            // is wrong now: close it rather than lend it again.
            lease.close();
            let (code, message) = crate::protocol::read::error_fields(&body);
            debug!(pool = %Escaped(&pool.key), code = %Escaped(&code), error = %Escaped(&message), "the server refused the client's settings");
            Err(Refusal::Server(as_fatal(&body)))
        }
        Ok(_) => {
            lease.close();
            Err(ClientError::LoginServerLost(ProtocolError::Malformed(
                "reply to the settings query",
            ))
            .into())
        }
        Err(e) => {
            lease.close();
            Err(ClientError::LoginServerLost(e).into())
        }
    }
}

/// How long pgmux's own queries on a server may take during a login.
const LOGIN_QUERY_LIMIT: Duration = Duration::from_secs(5);

/// The ParameterStatus set a server of `pool` reports with the client's startup settings
/// applied: what PostgreSQL itself would greet the client with, in its own spelling
/// (`UTF8` for `utf8`). Learnt once per set of settings and kept in `pool.greetings`, so
/// a login whose settings are known costs no round trip. A setting the server refuses
/// refuses the login, with the server's own error made FATAL, as PostgreSQL does (learnt
/// too: a client retrying is told the same without a server). `None` when no server could
/// be had and each of the settings is one a server would take (taken before, or the value
/// servers report already: the client is greeted with its own spelling then); other
/// settings wait for a server, and a login that gets none is refused rather than let in
/// with settings its server may refuse.
async fn server_greeting(
    pool: &Arc<Pool>,
    settings: &ClientParams,
) -> Result<Option<Reported>, Refusal> {
    let key = Greetings::key(settings.startup_settings());
    match pool.greetings.get(&key) {
        Some(Learnt::Reported(known)) => return Ok(Some(known)),
        Some(Learnt::Refused(body)) => return Err(Refusal::Server(as_fatal(&body))),
        None => {}
    }
    let vouched = || {
        let defaults = pool.server_params();
        pool.greetings
            .vouched(settings.startup_settings(), &defaults)
    };
    let mut lease = match pool.checkout().await {
        Ok(lease) => lease,
        // The first client of a pool: there is nothing at all to greet it with.
        Err(e) if pool.server_params().is_empty() || !vouched() => {
            return Err(ClientError::Checkout(e).into());
        }
        Err(e) => {
            debug!(pool = %Escaped(&pool.key), error = %e, "no server to learn how it reports the client's settings; greeting with the client's own values");
            return Ok(None);
        }
    };
    match try_settings(&mut lease, settings).await {
        Tried::Reported(reported) => {
            lease.release();
            pool.greetings.insert(key, reported.clone());
            Ok(Some(reported))
        }
        Tried::Refused(body) => {
            lease.release();
            let (code, message) = crate::protocol::read::error_fields(&body);
            debug!(pool = %Escaped(&pool.key), code = %Escaped(&code), error = %Escaped(&message), "the server refused the client's settings");
            let refusal = Refusal::Server(as_fatal(&body));
            pool.greetings.refused(key, &code, body);
            Err(refusal)
        }
        Tried::Failed(e) => {
            lease.close();
            if !vouched() {
                return Err(ClientError::LoginServerLost(e).into());
            }
            debug!(pool = %Escaped(&pool.key), error = %e, "could not try the client's settings on a server; greeting with the client's own values");
            Ok(None)
        }
    }
}

/// What a server made of a client's settings.
enum Tried {
    /// The ParameterStatus set it reported with them.
    Reported(Reported),
    /// The body of the ErrorResponse it refused one with.
    Refused(Vec<u8>),
    /// The connection failed: close it.
    Failed(ProtocolError),
}

/// Applies `settings` to `server` as a new backend would have them (after `RESET ALL`:
/// nothing a previous client left counts) inside a transaction that is rolled back, and
/// reads what the server reported meanwhile. The server is left exactly as it was.
async fn try_settings(server: &mut ServerConn, settings: &ClientParams) -> Tried {
    let mut sql = String::from("BEGIN;RESET ALL;");
    for (name, value) in settings.startup_settings() {
        sql.push_str(&format!(
            "SELECT pg_catalog.set_config({}, {}, false);",
            quote_literal(name),
            quote_literal(value)
        ));
    }
    let tried = match server.query_quietly(&sql, LOGIN_QUERY_LIMIT).await {
        Ok(tried) => tried,
        Err(e) => return Tried::Failed(e),
    };
    // PostgreSQL reports changed values before this ReadyForQuery (14 and later) or as
    // they are set (before 14): either way they are in.
    let reported = Arc::new(server.params().to_vec());
    if !server.run_quietly("ROLLBACK", LOGIN_QUERY_LIMIT).await {
        return Tried::Failed(ProtocolError::Malformed("reply to ROLLBACK"));
    }
    match tried.error {
        Some(body) => Tried::Refused(body),
        None => Tried::Reported(reported),
    }
}

/// A server's ErrorResponse, made FATAL (every other field kept): what PostgreSQL says when
/// it refuses a startup setting.
fn as_fatal(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    write::message(&mut out, tag::ERROR_RESPONSE, |b| {
        for (field, value) in crate::protocol::read::fields(body) {
            b.put_u8(field);
            write::cstr(
                b,
                if matches!(field, b'S' | b'V') {
                    "FATAL"
                } else {
                    value
                },
            );
        }
        b.put_u8(0);
    });
    out
}

/// Reads startup packets until the StartupMessage: a GSSENCRequest is answered `N`, an
/// SSLRequest `S` (then the TLS handshake) when `tls` is on and `N` otherwise, a direct TLS
/// handshake (PostgreSQL 17's `sslnegotiation=direct`) is taken when `tls` is on, and a
/// CancelRequest is forwarded. A client that leaves before its StartupMessage (a close, a
/// Terminate, half a packet, a failed handshake) is let go quietly.
async fn read_startup(
    socket: &mut ClientStream,
    peer: SocketAddr,
    cbuf: &mut BytesMut,
    pooler: &Pooler,
    tls: Option<&ClientTls>,
) -> Result<Startup, Refusal> {
    if let (Some(tls), ClientStream::Tcp(tcp)) = (tls, &*socket) {
        // A TLS record (handshake, 0x16) where a startup packet's length would start:
        // a direct handshake, which must name `postgresql` in ALPN.
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first == [0x16] {
            handshake(socket, peer, pooler, tls).await?;
            let alpn = socket.tls().and_then(|c| c.alpn_protocol());
            if alpn != Some(ALPN_POSTGRESQL) {
                return Err(ClientError::DirectTlsWithoutAlpn.into());
            }
        }
    }
    loop {
        match startup::read_packet(socket, cbuf).await {
            Ok(StartupPacket::SslRequest) if socket.tls().is_some() => {
                return Err(ClientError::SslRequestInTls.into());
            }
            Ok(StartupPacket::SslRequest) => match tls {
                Some(tls) => {
                    socket.write_all(b"S").await?;
                    // What the client sent before reading `S` was not encrypted: it must
                    // not count as sent over TLS (PostgreSQL refuses it the same way).
                    if !cbuf.is_empty() {
                        return Err(ClientError::UnencryptedAfterSsl.into());
                    }
                    handshake(socket, peer, pooler, tls).await?;
                }
                None => socket.write_all(b"N").await?,
            },
            Ok(StartupPacket::GssEncRequest) => socket.write_all(b"N").await?,
            Ok(StartupPacket::Cancel { process_id, secret }) => {
                pooler.cancels.cancel(process_id, secret).await;
                return Err(Refusal::Gone);
            }
            Ok(StartupPacket::Startup(startup)) => return Ok(startup),
            Ok(StartupPacket::Terminate) => {
                // As PostgreSQL and PgBouncer do: no answer, just the close.
                debug!(%peer, "client sent Terminate before its startup packet");
                return Err(Refusal::Gone);
            }
            Err(StartupError::Io(_)) if cbuf.is_empty() => {
                // Monitors and port scanners do this; PostgreSQL does not log it either.
                debug!(%peer, "client closed the connection before its startup packet");
                return Err(Refusal::Gone);
            }
            Err(StartupError::Io(e)) => {
                // PostgreSQL logs "incomplete startup packet" (LOG); not worth a warning.
                debug!(%peer, received = cbuf.len(), error = %e, "incomplete startup packet");
                return Err(Refusal::Gone);
            }
            Err(e) => return Err(ClientError::Startup(e).into()),
        }
    }
}

/// Runs the TLS handshake on a plain client socket. A failed one leaves no one to tell.
async fn handshake(
    socket: &mut ClientStream,
    peer: SocketAddr,
    pooler: &Pooler,
    tls: &ClientTls,
) -> Result<(), Refusal> {
    match socket.start_tls(tls).await {
        Ok(()) => Ok(()),
        Err(e) => {
            info!(%peer, error = %e, reason = %Reason::Tls.as_str(), "login failed");
            let limits = pooler.snapshot().config.auth.login_limits();
            count_failure(&pooler.logins, peer, Reason::Tls, &limits);
            Err(Refusal::Gone)
        }
    }
}

/// Runs one SCRAM exchange (a mock one for an unknown user). `Ok(None)` for a wrong
/// password, else the keys the proof revealed (to log in to PostgreSQL as an auth_query
/// user); a broken message is an error.
async fn scram_login(
    socket: &mut ClientStream,
    cbuf: &mut BytesMut,
    out: &mut BytesMut,
    user: &str,
    exchange: Option<ScramExchange>,
    tls: Option<&ClientTls>,
) -> Result<Option<ScramKeys>, Refusal> {
    let Some(mut exchange) = exchange else {
        return Err(ClientError::Authentication("no SCRAM secret for this user".into()).into());
    };
    // Over TLS, SCRAM-SHA-256-PLUS first (as PostgreSQL offers them), bound to the
    // certificate pgmux showed this client.
    let end_point = match socket.tls() {
        Some(_) => tls.and_then(|t| t.end_point().cloned()),
        None => None,
    };
    let offered: &[&str] = if end_point.is_some() {
        &[SCRAM_PLUS_MECHANISM, SCRAM_MECHANISM]
    } else {
        &[SCRAM_MECHANISM]
    };
    write::auth_sasl(out, offered);
    socket.write_all(out).await?;

    let first = read_password_message(socket, cbuf).await?;
    let malformed = || ClientError::Authentication("malformed SASLInitialResponse".into());
    let (mechanism, rest) = read_cstr(&first).ok_or_else(malformed)?;
    if !offered.contains(&mechanism) {
        return Err(ClientError::Authentication(format!(
            "client selected an invalid SASL mechanism \"{mechanism}\""
        ))
        .into());
    }
    exchange.bind_channel(end_point, mechanism == SCRAM_PLUS_MECHANISM);
    let (len, data) = read_i32(rest).ok_or_else(malformed)?;
    let data = usize::try_from(len)
        .ok()
        .and_then(|n| data.get(..n))
        .ok_or_else(malformed)?;

    let server_first = match exchange.client_first(data) {
        Ok(reply) => reply,
        Err(e) => return auth_outcome(user, e).map(|_| None),
    };
    out.clear();
    write::auth_sasl_step(out, 11, &server_first);
    socket.write_all(out).await?;

    let last = read_password_message(socket, cbuf).await?;
    let server_final = match exchange.client_final(&last) {
        Ok(reply) => reply,
        Err(e) => return auth_outcome(user, e).map(|_| None),
    };
    out.clear();
    write::auth_sasl_step(out, 12, &server_final);
    Ok(exchange.server_keys())
}

/// An auth_query user whose secret is an md5 hash was asked for md5 though SCRAM is the
/// method: say why, and what to do if the client left (it may accept SCRAM only).
fn md5_instead_of_scram(user: &str, client_left: bool) {
    let fix = "set the role's password again in PostgreSQL with password_encryption = \
               'scram-sha-256' (an md5 hash cannot do SCRAM)";
    if client_left {
        info!(user = %Escaped(user), "the secret auth_query returned is an md5 hash, so the client was asked for md5 and left (it may accept SCRAM only): {fix}");
    } else {
        debug!(user = %Escaped(user), "the secret auth_query returned is an md5 hash: the client was asked for md5; {fix}");
    }
}

/// Runs one md5 challenge. `Ok(false)` for a wrong password.
async fn md5_login(
    socket: &mut ClientStream,
    cbuf: &mut BytesMut,
    credential: &Credential,
) -> Result<bool, Refusal> {
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::new();
    write::auth_md5(&mut out, salt);
    socket.write_all(&out).await?;
    let body = read_password_message(socket, cbuf).await?;
    let response = body.strip_suffix(&[0]).unwrap_or(&body);
    Ok(credential.check_md5(salt, response))
}

/// Asks for the password in clear text (the `password` method, over TLS unless allowed
/// otherwise). `Ok(None)` for a wrong password, else the password (lossily UTF-8: pgmux
/// logs in to PostgreSQL with it for an auth_query user).
async fn cleartext_login(
    socket: &mut ClientStream,
    cbuf: &mut BytesMut,
    credential: &Credential,
) -> Result<Option<String>, Refusal> {
    let mut out = BytesMut::new();
    write::auth_cleartext(&mut out);
    socket.write_all(&out).await?;
    let body = read_password_message(socket, cbuf).await?;
    let password = body.strip_suffix(&[0]).unwrap_or(&body);
    Ok(credential
        .check_password(password)
        .then(|| String::from_utf8_lossy(password).into_owned()))
}

/// What an md5 login of an unknown user is checked against: a hash no response matches
/// (md5 of nothing is not 32 zero bytes), at the cost of a real one.
fn mock_md5_credential(user: &str) -> Credential {
    let hash = format!("md5{}", "0".repeat(32));
    let secret = Secret::parse(&hash).unwrap_or(Secret::Md5(hash));
    Credential::new(user, secret)
}

/// Reads one PasswordMessage-family message ('p') and returns its body.
async fn read_password_message(
    socket: &mut ClientStream,
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

/// A failed SCRAM step: a wrong proof is `Ok(false)`, a broken message an error.
fn auth_outcome(user: &str, e: crate::auth::AuthError) -> Result<bool, Refusal> {
    match e {
        crate::auth::AuthError::BadPassword => Ok(false),
        other => {
            debug!(user = %Escaped(user), error = %other, "SCRAM exchange broken off");
            Err(ClientError::Authentication(other.to_string()).into())
        }
    }
}

/// The client a login is about, and where its failures are counted.
struct Who<'a> {
    peer: SocketAddr,
    user: &'a str,
    database: &'a str,
    guard: &'a LoginGuard,
    limits: LimitSettings,
}

impl Who<'_> {
    /// Logs a failed login at info (the reason, never the password), counts it (which
    /// may lock the address out: logged once) and returns the refusal the client gets.
    fn failed(&self, reason: Reason, error: ClientError) -> Refusal {
        info!(
            peer = %self.peer,
            user = %Escaped(self.user),
            database = %Escaped(self.database),
            reason = %reason.as_str(),
            "login failed"
        );
        count_guess(self.guard, self.peer, self.user, reason, &self.limits);
        error.into()
    }
}

/// Counts a failed login of `peer` that names no user (a timeout, a broken client): it
/// guesses nothing, so it locks nothing out.
pub(super) fn count_failure(
    guard: &LoginGuard,
    peer: SocketAddr,
    reason: Reason,
    limits: &LimitSettings,
) {
    count_guess(guard, peer, "", reason, limits);
}

/// Counts a failed login of `user` from `peer`, and logs the lockout it may begin (once
/// per lockout).
fn count_guess(
    guard: &LoginGuard,
    peer: SocketAddr,
    user: &str,
    reason: Reason,
    limits: &LimitSettings,
) {
    let Some(lockout) = guard.failed(peer.ip(), user, reason, limits, Instant::now()) else {
        return;
    };
    let (failures, lockout_secs) = (lockout.failures, lockout.lasts.as_secs_f64());
    match lockout.scope {
        LockoutScope::User => warn!(
            address = %peer.ip(),
            user = %Escaped(user),
            failures,
            lockout_secs,
            "too many failed logins: user locked out from this address (auth.max_login_failures)"
        ),
        LockoutScope::Address => warn!(
            address = %peer.ip(),
            failures,
            lockout_secs,
            "too many failed logins: address locked out for every user (auth.max_login_failures_per_address)"
        ),
    }
}
