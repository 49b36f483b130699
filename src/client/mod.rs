//! One client connection, from its first byte to its last: [`login`] negotiates the
//! startup and checks the password, then [`session::Session`] runs the transaction loop.

mod adopt;
mod deque;
mod error;
mod login;
pub(crate) mod params;
mod park;
mod queue;
mod read_buffers;
mod replies;
mod session;
pub(crate) mod state;
mod statements;
mod stream;
mod tls;

pub use error::ClientError;
pub use park::{declined as park_declined, parked, sweep as park_sweep};
pub use queue::OutQueue;
pub use stream::ClientStream;
pub use tls::{ClientTls, ClientTlsIo};

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::logging::Escaped;
use crate::pooler::Pooler;
use crate::protocol::PgError;
use crate::upgrade::Departing;
use crate::upgrade::state::SessionState;

/// A client that logged in to the admin console instead of a database: the listener hands
/// it to [`crate::admin::console`], so the data path never runs admin code.
pub struct ConsoleLogin {
    /// The socket, after AuthenticationOk.
    pub socket: ClientStream,
    /// The user who logged in.
    pub user: String,
    /// What the client sent after its login, not yet read by anyone.
    pub cbuf: BytesMut,
    /// Its place under max_client_conn and on its worker thread, held to the end.
    pub guards: ClientGuards,
}

/// What a client's task holds for the client's whole life besides its session: dropped
/// (however the task ends, a panic included) it gives those places back. It goes with the
/// client into the parking lot (`park.rs`) and into the task that resumes it.
pub struct ClientGuards {
    /// Its place under `max_client_conn`.
    pub count: crate::listener::ClientCount,
    /// Its place on its worker thread (`None` with one thread).
    pub _load: Option<crate::workers::Load>,
}

/// Serves one client connection to the end, unless it asked for the admin console (then
/// it is returned). `admitted` is false when max_client_conn was reached: the client is
/// told so (53300) once it has sent its startup packet.
///
/// A panic anywhere in the client's login or session is caught here: the client is told
/// `XX000` before the close, the session's guards have already given back what it held
/// (its server lease, its cancel key, its registry entry), and pgmux keeps serving.
///
/// Not an `async fn`, like the others on a session's way here: what a client task holds
/// for the client's whole life is stored once in its future (memory per idle client).
pub fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    pooler: Arc<Pooler>,
    admitted: bool,
    guards: ClientGuards,
) -> impl Future<Output = Option<ConsoleLogin>> + Send {
    let _ = tcp.set_nodelay(true);
    let mut socket = ClientStream::Tcp(tcp);
    async move {
        let served = AssertUnwindSafe(serve_socket(&mut socket, peer, &pooler, admitted))
            .catch_unwind()
            .await;
        finish(socket, peer, &pooler, served, guards).await
    }
}

/// Serves a client an upgrade moved in from the old process (`crate::upgrade`): its
/// session is rebuilt from `state`, with no login and no greeting, and runs to the end
/// (or moves on at the next upgrade) as [`serve`] runs one.
///
/// `server` is the socket of the server connection the client keeps between transactions
/// (session mode, or pinned by session state), which moved with it.
pub fn serve_moved(
    tcp: TcpStream,
    pooler: Arc<Pooler>,
    state: Box<SessionState>,
    server: Option<std::os::fd::OwnedFd>,
    guards: ClientGuards,
) -> impl Future<Output = ()> + Send {
    let peer = tcp.peer_addr();
    let _ = tcp.set_nodelay(true);
    // Adopted now, before the future exists (on the worker thread the client runs on: the
    // server's socket joins its reactor): neither the state nor a copy of the session is
    // kept in the client's task for its whole life (memory per idle client). Boxed: the
    // future holds it until it starts. A panic here is contained as one in the session.
    let adopted = peer.as_ref().ok().map(|peer| {
        let adopt = AssertUnwindSafe(|| adopt::session(&pooler, *peer, *state, server));
        Box::new(std::panic::catch_unwind(adopt))
    });
    async move {
        let (Ok(peer), Some(adopted)) = (peer, adopted) else {
            return; // the client left on the way (the server's socket closes with `server`)
        };
        let mut socket = ClientStream::Tcp(tcp);
        let served = AssertUnwindSafe(async {
            // The session is scoped to the block whose value is awaited: it is moved into
            // the running future, and no dead copy of it stays in this one (see
            // `serve_socket`); the future holds only the box it came in.
            {
                let (session, pin) = match *adopted {
                    Ok(Ok(adopted)) => adopted,
                    Ok(Err(err)) => {
                        info!(%peer, err = %Escaped(&err), "a client moved in by an upgrade cannot be served");
                        refuse_on(&mut socket, &err.fatal()).await;
                        return Served::Done;
                    }
                    // Logged by the panic hook already; the client is told XX000 (`finish`).
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                debug!(%peer, pool = %Escaped(&session.pool.key), "client moved in by an upgrade");
                let started = std::time::Instant::now();
                run_session(&mut socket, peer, &pooler, session, pin, started, false)
            }
            .await
        })
        .catch_unwind()
        .await;
        let _ = finish(socket, peer, &pooler, served, guards).await;
    }
}

/// Runs a parked client's session again (`park.rs`: the client sent, left, or was told
/// something), on this thread's reactor, to its end as [`serve`] runs one: its
/// disconnection is logged with the time since it connected, and it may park again.
fn resume(parked: Box<park::Parked>) -> impl Future<Output = ()> + Send {
    let pooler = parked.guards.count.pooler.clone();
    let peer = parked.session.view.peer();
    async move {
        let mut socket = ClientStream::Gone;
        let mut guards = None;
        let served = AssertUnwindSafe(async {
            // The record is taken apart in this block only, whose value is awaited: the
            // session moves into the running future and the record's box is freed (no
            // dead copy of either for the client's whole life).
            {
                let parked = parked;
                let park::Parked {
                    session,
                    socket: std,
                    started,
                    guards: held,
                    token: _,
                } = *parked;
                guards = Some(held);
                match TcpStream::from_std(std) {
                    Ok(tcp) => socket = ClientStream::Tcp(tcp),
                    Err(e) => {
                        warn!(%peer, error = %e, "a parked client cannot be resumed");
                        return Served::Done;
                    }
                }
                let session = session.resume(&pooler);
                run_session(&mut socket, peer, &pooler, session, None, started, true)
            }
            .await
        })
        .catch_unwind()
        .await;
        if let Some(guards) = guards {
            let _ = finish(socket, peer, &pooler, served, guards).await;
        }
    }
}

/// How a client's login and session ended.
enum Served {
    Done,
    /// The client logged in to the admin console: its user and the bytes read after it.
    Console(String, BytesMut),
    /// An upgrade moves the client: its socket goes to the new process with this state
    /// (and the server it keeps, if any).
    Moved(Box<Departing>),
    /// The session went idle and parks (`park.rs`); the client connected at this time.
    Parked(Box<session::ParkedSession>, std::time::Instant),
}

/// What happens to the socket once the login and session are over.
async fn finish(
    socket: ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    served: std::thread::Result<Served>,
    guards: ClientGuards,
) -> Option<ConsoleLogin> {
    match served {
        Ok(Served::Console(user, cbuf)) => Some(ConsoleLogin {
            socket,
            user,
            cbuf,
            guards,
        }),
        Ok(Served::Done) => None,
        Ok(Served::Parked(session, started)) => {
            park_socket(socket, peer, pooler, *session, started, guards);
            None
        }
        Ok(Served::Moved(departing)) => {
            let ClientStream::Tcp(tcp) = socket else {
                // upgrade_step closes TLS clients instead of moving them.
                crate::upgrade::count_closed();
                refuse(socket, &ClientError::Upgrading("TLS").fatal()).await;
                return None;
            };
            // Boxed, as everything only some clients reach at their end: it would size every
            // client's task for its whole life (memory per idle client).
            if let Err((tcp, why)) = Box::pin(pooler.upgrade.hand_over(tcp, *departing)).await {
                info!(%peer, why = %why, "could not hand the client over to the new process");
                crate::upgrade::count_closed();
                if let Some(tcp) = tcp {
                    let err = ClientError::Upgrading("the hand-over failed");
                    refuse(ClientStream::Tcp(tcp), &err.fatal()).await;
                }
            }
            None
        }
        Err(_) => {
            // The panic hook has logged where; the client learns that it was pgmux's fault.
            warn!(%peer, "client session ended by an internal error");
            refuse(socket, &ClientError::Internal.fatal()).await;
            None
        }
    }
}

/// Hands a parked session and its socket to this thread's parking lot (`park.rs`); the
/// task ends after this. Resumed at once if the lot cannot take it.
fn park_socket(
    socket: ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    session: session::ParkedSession,
    started: std::time::Instant,
    guards: ClientGuards,
) {
    // `can_park` let only a plain socket through.
    let ClientStream::Tcp(tcp) = socket else {
        return;
    };
    // Out of tokio's reactor: a parked socket has no registration there.
    let socket = match tcp.into_std() {
        Ok(socket) => socket,
        Err(e) => {
            warn!(%peer, error = %e, "cannot take a parked client's socket out of the reactor");
            return;
        }
    };
    let record = Box::new(park::Parked {
        session,
        socket,
        started,
        guards,
        token: pooler.client_tasks.token(),
    });
    if let Err(record) = park::park(record) {
        // Not asked again before another park_idle_after.
        record.session.view.decline_park();
        pooler.client_tasks.spawn(resume(record));
    }
}

/// Login and session on a borrowed socket.
async fn serve_socket(
    socket: &mut ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    admitted: bool,
) -> Served {
    let started = std::time::Instant::now();
    // The session is a local of this block only, whose value (the running session) is
    // awaited: a local that lived on across that await would be a dead copy of the session
    // in every client task for the client's whole life (a moved-from local keeps its room
    // until its scope ends).
    {
        // Boxed: the login's future (its time limit, the refusals it writes) is larger
        // than the session's, and dead once the client is in.
        let session = match Box::pin(log_in(socket, peer, pooler, admitted)).await {
            Ok(session) => session,
            Err(served) => return served,
        };
        run_session(socket, peer, pooler, session, None, started, false)
    }
    .await
}

/// The login: the session, or how the client was served instead (refused, gone, or the
/// admin console).
async fn log_in(
    socket: &mut ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    admitted: bool,
) -> Result<session::Session, Served> {
    let limit = pooler.snapshot().config.server.client_login_timeout;
    // The login's futures are boxed: they are large (SCRAM, TLS, the server's greeting)
    // and dead once the client is in, and unboxed they would size the future of every
    // client task for its whole life (memory per idle client, docs/performance.md).
    let authenticated = Box::pin(login::authenticate(socket, peer, pooler, admitted));
    let outcome = match tokio::time::timeout(limit, authenticated).await {
        Ok(Ok(client)) => Box::pin(login::greet(socket, peer, pooler, client)).await,
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => {
            let reason = crate::auth::FailureReason::Timeout;
            info!(%peer, reason = %reason.as_str(), "login failed");
            let limits = pooler.snapshot().config.auth.login_limits();
            login::count_failure(&pooler.logins, peer, reason, &limits);
            refuse_on(socket, &ClientError::LoginTimeout(limit).fatal()).await;
            return Err(Served::Done);
        }
    };
    match outcome {
        Ok(session) => Ok(session),
        Err(login::Refusal::Gone) => Err(Served::Done), // a cancel request, or a client that left
        Err(login::Refusal::Console { user, cbuf }) => Err(Served::Console(user, cbuf)),
        Err(login::Refusal::Error(err)) => {
            debug!(%peer, err = %Escaped(&err), "login refused");
            refuse_on(socket, &err).await;
            Err(Served::Done)
        }
        Err(login::Refusal::Server(err)) => {
            debug!(%peer, "login refused with the server's error");
            send_and_close(socket, &err).await;
            Err(Served::Done)
        }
    }
}

/// Runs a logged-in (or moved-in, or `resumed` from the parking lot) session to its end
/// or until it parks, and logs it. Not an `async fn`:
/// the session goes into its running future here, and is held there only
/// ([`session::Session::run`]); what is done after it is a second future, made then.
fn run_session<'a>(
    socket: &'a mut ClientStream,
    peer: SocketAddr,
    pooler: &Arc<Pooler>,
    session: session::Session,
    pin: Option<Box<session::MovedPin>>,
    started: std::time::Instant,
    resumed: bool,
) -> impl Future<Output = Served> + Send + 'a {
    // The pool, not a copy of its key (two strings): kept to the end for the log lines.
    let pool = session.pool.clone();
    let log = pooler.snapshot().config.admin.log_connections;
    if log && !resumed {
        info!(%peer, pool = %Escaped(&pool.key), "client connected");
    }
    session.run(socket, pin, resumed).then(move |(ended, socket)| async move {
        let pool = &pool.key;
        match ended {
            session::Ended::Closed => {}
            session::Ended::Moved(departing) => {
                debug!(%peer, pool = %Escaped(&pool), "client moves to the new process");
                return Served::Moved(departing);
            }
            session::Ended::Parked(session) => return Served::Parked(session, started),
        }
        close_gently(socket).await;
        // Byte counts come from the kernel.
        let traffic = socket
            .tcp()
            .and_then(crate::stats::tcp_traffic)
            .unwrap_or_default();
        let duration_ms = started.elapsed().as_millis() as u64;
        if log {
            info!(%peer, pool = %Escaped(&pool), duration_ms, bytes_received = traffic.received, bytes_sent = traffic.sent, "client disconnected");
        } else {
            debug!(%peer, pool = %Escaped(&pool), duration_ms, "client disconnected");
        }
        Served::Done
    })
}

/// Sends a fatal error and closes: never a bare reset.
async fn refuse(mut socket: ClientStream, err: &PgError) {
    refuse_on(&mut socket, err).await;
}

/// Sends a fatal error and shuts the socket down.
async fn refuse_on(socket: &mut ClientStream, err: &PgError) {
    let mut buf = BytesMut::new();
    err.write(&mut buf);
    send_and_close(socket, &buf).await;
}

/// Sends these bytes (a fatal ErrorResponse) and shuts the socket down.
async fn send_and_close(socket: &mut ClientStream, bytes: &[u8]) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), socket.write_all(bytes)).await;
    close_gently(socket).await;
}

/// Shuts the sending side and reads what the client still sends (briefly) before the
/// socket is dropped: closing with unread input makes the kernel send a reset, which may
/// destroy the error pgmux just wrote before the client reads it.
async fn close_gently(socket: &mut ClientStream) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        socket.shutdown().await?;
        // Small: this buffer is part of every client task's future (memory per idle client).
        let mut sink = [0u8; 64];
        while socket.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}
