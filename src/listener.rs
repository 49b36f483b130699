//! Accepting clients, and stopping (`drain.rs` has the steps): on SIGTERM/SIGINT `/ready`
//! fails and the listeners go on accepting for `drain_delay`; then they close, sessions end
//! between transactions, and after shutdown_timeout the rest are told 57P01.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::client::{self, ClientGuards};
use crate::pooler::Pooler;
use crate::upgrade::state::SessionState;
use crate::workers::Workers;

/// Backlog of a listener bound with `reuse_port` (what `TcpListener::bind` uses).
const BACKLOG: u32 = 1024;

/// Binds a client listener on `addr` (`host:port`); with `reuse_port`, `SO_REUSEPORT` lets
/// other processes (another pgmux, the next version during a rolling restart) bind the same
/// port, and the kernel spreads new connections over them.
pub async fn bind(addr: &str, reuse_port: bool) -> std::io::Result<TcpListener> {
    if !reuse_port {
        return TcpListener::bind(addr).await;
    }
    warn_unmigrated_queue();
    let mut last = None;
    for resolved in tokio::net::lookup_host(addr).await? {
        let socket = if resolved.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let bound = socket
            .set_reuseaddr(true)
            .and_then(|()| socket.set_reuseport(true))
            .and_then(|()| socket.bind(resolved))
            .and_then(|()| socket.listen(BACKLOG));
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// Linux resets the connections still queued on a `SO_REUSEPORT` listener when it closes,
/// unless `net.ipv4.tcp_migrate_req = 1` hands them to another listener of the port. pgmux
/// takes what is queued just before it closes, which leaves a window of microseconds;
/// the setting closes it.
fn warn_unmigrated_queue() {
    let setting = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req");
    if setting.is_ok_and(|v| v.trim() == "0") {
        info!(
            "server.reuse_port: net.ipv4.tcp_migrate_req is 0, so a connection that reaches \
             this listener just as it closes is reset; set it to 1 for rolling restarts \
             (docs/architecture.md, Rolling restarts)"
        );
    }
}

/// Serves clients on `listeners` until pgmux stops: accepts until the drain is over (every
/// accept loop ends on `pooler.stop`), then waits for the sessions. Each client runs on one
/// of `workers`; the wait covers the sessions of all of them.
pub async fn run(pooler: Arc<Pooler>, listeners: Vec<TcpListener>, workers: Arc<Workers>) {
    let clients = pooler.client_tasks.clone();
    tokio::spawn(pooler.clone().forward_stop());
    tokio::spawn(client::park_sweep(pooler.clone()));
    let mut accepting = Vec::new();
    for listener in listeners {
        accepting.push(tokio::spawn(accept(
            listener,
            pooler.clone(),
            clients.clone(),
            workers.clone(),
        )));
    }
    pooler.listening.store(true, Ordering::Relaxed);
    // READY=1 to systemd now that the sockets accept; STOPPING=1 when the drain begins
    // (a signal), or the stop comes without one (the console's SHUTDOWN).
    crate::sd_notify::ready_until(pooler.drain.token(), &pooler.stop).await;
    drain(&pooler, &clients).await;
    pooler.listening.store(false, Ordering::Relaxed);
    for task in accepting {
        let _ = task.await; // each drops its listener: new clients are refused, not left hanging
    }
    clients.close();
    // Clients still waiting for a server are told why they wait now.
    for pool in pooler.pools() {
        pool.drain();
    }
    let grace = pooler.snapshot().config.server.shutdown_timeout;
    info!(
        clients = clients.len(),
        ?grace,
        "shutting down: no longer accepting; sessions end after their transaction"
    );
    if tokio::time::timeout(grace, clients.wait()).await.is_err() {
        warn!(
            left = clients.len(),
            "shutdown_timeout is over: ending the remaining sessions"
        );
        pooler.kill.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), clients.wait()).await;
    }
    for pool in pooler.pools() {
        pool.close_idle();
    }
    info!("pgmux stopped");
}

/// The drain has begun: goes on serving and accepting until its `drain_delay` is over or
/// another signal ends it, then stops (`pooler.stop`).
async fn drain(pooler: &Pooler, clients: &TaskTracker) {
    if let Some(deadline) = pooler.drain.deadline()
        && !pooler.stop.is_cancelled()
    {
        info!(
            clients = clients.len(),
            left = ?deadline.saturating_duration_since(std::time::Instant::now()),
            "draining: /ready answers 503; serving and accepting until drain_delay is over"
        );
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = pooler.stop.cancelled() => {}
        }
    }
    pooler.stop.cancel();
}

async fn accept(
    listener: TcpListener,
    pooler: Arc<Pooler>,
    clients: TaskTracker,
    workers: Arc<Workers>,
) {
    loop {
        let (socket, peer) = tokio::select! {
            // An upgrade's new process accepts on this socket now (upgrade.rs): what the
            // kernel queued is the new process's to take.
            _ = pooler.upgrade.handover.cancelled() => return,
            _ = pooler.stop.cancelled() => {
                // Connections the kernel queued already would be reset when the listener
                // closes: take them, and tell them 57P01 once logged in.
                while let Some((socket, peer)) = queued(&listener) {
                    serve(socket, peer, &pooler, &clients, &workers);
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        serve(socket, peer, &pooler, &clients, &workers);
    }
}

/// Serves a client an upgrade moved in from the old process (`upgrade.rs`) as one of
/// this process's: counted against `max_client_conn` (never refused for it: it is
/// connected already), on the least busy worker thread as an accepted client is, and
/// waited for at shutdown. `server` is the socket of the server connection the client
/// keeps, if it keeps one: taken over on that worker thread, with the client.
pub(crate) fn adopt(
    pooler: &Arc<Pooler>,
    workers: &Workers,
    socket: TcpStream,
    state: SessionState,
    server: Option<std::os::fd::OwnedFd>,
) {
    let count = ClientCount::new(pooler.clone());
    workers.spawn(&pooler.client_tasks, socket, move |socket, load| {
        let pooler = count.pooler.clone();
        client::serve_moved(
            socket,
            pooler,
            state,
            server,
            ClientGuards { count, _load: load },
        )
    });
}

/// A connection already queued on `listener`, without waiting.
fn queued(listener: &TcpListener) -> Option<(TcpStream, std::net::SocketAddr)> {
    match listener.poll_accept(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(accepted)) => Some(accepted),
        Poll::Ready(Err(_)) | Poll::Pending => None,
    }
}

/// Serves one accepted connection in a task of `clients`, on one of `workers`.
fn serve(
    socket: TcpStream,
    peer: std::net::SocketAddr,
    pooler: &Arc<Pooler>,
    clients: &TaskTracker,
    workers: &Workers,
) {
    let max = pooler.snapshot().config.server.max_client_conn;
    let count = ClientCount::new(pooler.clone());
    let admitted = count.before < max;
    workers.spawn(clients, socket, move |socket, load| async move {
        // A client session, or the admin console for an admin who asked for it.
        let pooler = count.pooler.clone();
        let guards = ClientGuards { count, _load: load };
        if let Some(console) = client::serve(socket, peer, pooler.clone(), admitted, guards).await {
            // Boxed: the console's future is large, and unboxed it would size every
            // client's task for its whole life (memory per idle client).
            let guards = console.guards;
            let console =
                crate::admin::console::serve(console.socket, pooler, console.user, console.cbuf);
            Box::pin(console).await;
            drop(guards);
        }
    });
}

/// One client counted against `max_client_conn`, for as long as it is connected (its
/// task, or its place in a parking lot: `client::ClientGuards`): dropping it (however
/// the client ends, a panic included) uncounts the client.
pub struct ClientCount {
    pub(crate) pooler: Arc<Pooler>,
    /// Clients counted before this one.
    before: usize,
}

impl ClientCount {
    fn new(pooler: Arc<Pooler>) -> Self {
        let before = pooler.clients.fetch_add(1, Ordering::Relaxed);
        ClientCount { pooler, before }
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.pooler.clients.fetch_sub(1, Ordering::Relaxed);
    }
}
