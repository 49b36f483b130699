//! The admin port's connections. They run on a thread and a current-thread runtime of
//! their own, so that an admin request (a `/clients` of thousands of entries, a scrape)
//! never takes time from the thread that serves clients. And they are bounded, so that
//! idle or slow admin connections cannot take the file descriptors clients need:
//!
//! - at most `admin.max_connections` are open; one more is answered `503` and closed at
//!   once, before it costs anything but the accept;
//! - a request's headers must arrive within `admin.header_timeout` of its first byte;
//! - a connection with no request being answered for `admin.idle_timeout` is closed:
//!   keep-alive between requests, a client that connects and says nothing, and one that
//!   does not read its response.
//!
//! The limits are read from the config snapshot at each accept, so a reload applies them
//! to new connections.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, warn};

use crate::config::AdminSection;
use crate::pooler::Pooler;

/// How long the accept loop rests after a failed accept (usually: no file descriptor).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the admin port counts about its own connections, for `/metrics`.
#[derive(Default)]
pub struct PortStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections answered 503 because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed because their headers took longer than `header_timeout`.
    pub header_timeouts: AtomicU64,
    /// Connections closed after `idle_timeout` without a request being answered.
    pub idle_timeouts: AtomicU64,
}

/// Starts the admin port on a thread of its own (`pgmux-admin`) with its own
/// current-thread runtime, serving `listener` until the process ends.
pub fn start(listener: std::net::TcpListener, pooler: Arc<Pooler>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("pgmux-admin".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, pooler).await,
                    Err(e) => error!(error = %e, "the admin port cannot start"),
                }
            });
        })?;
    Ok(())
}

/// Accepts admin connections on `listener` and serves each on the current runtime.
pub async fn serve(listener: TcpListener, pooler: Arc<Pooler>) {
    let stats = Arc::new(PortStats::default());
    let app = super::router(pooler.clone(), stats.clone());
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                warn!(error = %e, "admin port: accept failed");
                sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let limits = Limits::of(&pooler.snapshot().config.admin);
        match Slot::take(&stats, limits.max_connections) {
            Some(slot) => {
                tokio::spawn(connection(socket, app.clone(), limits, slot));
            }
            None => {
                stats.refused.fetch_add(1, Relaxed);
                debug!(
                    max = limits.max_connections,
                    "admin port: connection refused"
                );
                refuse(socket, limits.max_connections);
            }
        }
    }
}

/// The admin section's limits, as they were when a connection was accepted.
#[derive(Clone, Copy)]
struct Limits {
    header: Duration,
    idle: Duration,
    max_connections: usize,
}

impl Limits {
    fn of(admin: &AdminSection) -> Limits {
        Limits {
            header: admin.header_timeout,
            idle: admin.idle_timeout,
            max_connections: admin.max_connections,
        }
    }
}

/// One of the `max_connections` places, held by a connection's task; dropping it frees it.
struct Slot {
    stats: Arc<PortStats>,
}

impl Slot {
    fn take(stats: &Arc<PortStats>, max: usize) -> Option<Slot> {
        let taken = stats
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1));
        taken.ok().map(|_| Slot {
            stats: stats.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Relaxed);
    }
}

/// Answers 503 without waiting and closes. What the client already sent is read first
/// (once, without waiting), so that the close is a FIN the client reads the answer before,
/// not a reset that may discard it.
fn refuse(socket: TcpStream, max: usize) {
    let body = format!(
        "{{\"error\":\"too many admin connections: admin.max_connections ({max}) are open\"}}\n"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut sent_so_far = [0u8; 2048];
    let _ = socket.try_read(&mut sent_so_far);
    let _ = socket.try_write(response.as_bytes());
}

/// Serves one admin connection (HTTP/1.1, keep-alive) until the client closes it or a
/// limit closes it; `_slot` is given back when it ends.
async fn connection(socket: TcpStream, app: Router, limits: Limits, slot: Slot) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        socket,
        activity: activity.clone(),
    });
    let service = Tracked {
        app: TowerToHyperService::new(app),
        activity: activity.clone(),
    };
    // hyper's own header timeout runs from when it starts waiting for a request, idle
    // time included: ours (below) starts at the request's first byte instead.
    let served = http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::select! {
        ended = served => {
            if let Err(e) = ended {
                debug!(error = %e, "admin connection ended");
            }
        }
        why = activity.expired(limits) => {
            let counter = match why {
                Expiry::Header => &slot.stats.header_timeouts,
                Expiry::Idle => &slot.stats.idle_timeouts,
            };
            counter.fetch_add(1, Relaxed);
            debug!(reason = why.as_str(), "admin connection closed");
        }
    }
}

/// Where a connection is between requests; what decides which limit applies.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// No request being read or answered since then: `idle_timeout` runs.
    Idle(Instant),
    /// A request's first bytes arrived then: `header_timeout` runs.
    Head(Instant),
    /// A handler is answering: no limit (pause waits for transactions, a scrape may be big).
    Busy,
}

/// Why a connection was closed by a limit.
#[derive(Clone, Copy)]
enum Expiry {
    Header,
    Idle,
}

impl Expiry {
    fn as_str(self) -> &'static str {
        match self {
            Expiry::Header => "header_timeout",
            Expiry::Idle => "idle_timeout",
        }
    }
}

/// A connection's phase, shared by its socket (reads), its service (requests) and the
/// timer that closes it.
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock() = phase;
        // notify_one keeps a permit when the timer is not waiting yet: no change is missed.
        self.changed.notify_one();
    }

    /// Bytes arrived: an idle connection starts a request.
    fn received(&self) {
        let mut phase = self.phase.lock();
        if matches!(*phase, Phase::Idle(_)) {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }

    /// A request reached its handler; idle again when the guard goes.
    fn busy(self: &Arc<Self>) -> BusyGuard {
        self.set(Phase::Busy);
        BusyGuard(self.clone())
    }

    /// Completes when the limit of the current phase is over.
    async fn expired(&self, limits: Limits) -> Expiry {
        loop {
            let phase = *self.phase.lock();
            let (deadline, why) = match phase {
                Phase::Idle(since) => (since + limits.idle, Expiry::Idle),
                Phase::Head(since) => (since + limits.header, Expiry::Header),
                Phase::Busy => {
                    self.changed.notified().await;
                    continue;
                }
            };
            tokio::select! {
                () = self.changed.notified() => {}
                () = sleep_until(deadline) => {
                    if *self.phase.lock() == phase {
                        return why;
                    }
                }
            }
        }
    }
}

/// Marks the connection idle when a handler's answer is ready (or the request dropped).
struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set(Phase::Idle(Instant::now()));
    }
}

/// The router as hyper's service, marking each request busy while its handler runs.
struct Tracked {
    app: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<Incoming>) -> Answer {
        let busy = self.activity.busy();
        let answer = self.app.call(request);
        Box::pin(async move {
            let response = answer.await;
            drop(busy);
            response
        })
    }
}

/// The connection's socket, noting when bytes arrive.
struct Watched {
    socket: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.socket).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}
