//! Accepting clients, and stopping: on SIGTERM/SIGINT the listeners close, sessions end
//! between transactions, and after shutdown_timeout the rest are told 57P01.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::client;
use crate::pooler::Pooler;
use crate::upgrade::state::SessionState;

/// Serves clients on `listeners` until the pooler's stop token fires, then drains.
pub async fn run(pooler: Arc<Pooler>, listeners: Vec<TcpListener>) {
    let clients = pooler.client_tasks.clone();
    tokio::spawn(pooler.clone().forward_stop());
    let mut accepting = Vec::new();
    for listener in listeners {
        accepting.push(tokio::spawn(accept(
            listener,
            pooler.clone(),
            clients.clone(),
        )));
    }
    pooler.listening.store(true, Ordering::Relaxed);
    // READY=1 to systemd now that the sockets accept; STOPPING=1 when the stop comes.
    crate::sd_notify::ready_until(&pooler.stop).await;
    pooler.listening.store(false, Ordering::Relaxed);
    for task in accepting {
        let _ = task.await; // each drops its listener: new clients are refused, not left hanging
    }
    clients.close();
    let grace = pooler.snapshot().config.server.shutdown_timeout;
    info!(
        clients = clients.len(),
        ?grace,
        "shutting down: waiting for running transactions"
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

async fn accept(listener: TcpListener, pooler: Arc<Pooler>, clients: TaskTracker) {
    loop {
        let (socket, peer) = tokio::select! {
            _ = pooler.stop.cancelled() => return,
            // An upgrade's new process accepts on this socket now (upgrade.rs).
            _ = pooler.upgrade.handover.cancelled() => return,
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
        let max = pooler.snapshot().config.server.max_client_conn;
        let counted = ClientCount::new(pooler.clone());
        let admitted = counted.before < max;
        clients.spawn(async move {
            // A client session, or the admin console for an admin who asked for it.
            let pooler = counted.pooler.clone();
            if let Some(console) = client::serve(socket, peer, pooler.clone(), admitted).await {
                crate::admin::console::serve(console.socket, pooler, console.user, console.cbuf)
                    .await;
            }
            drop(counted);
        });
    }
}

/// Serves a client an upgrade moved in from the old process (`upgrade.rs`) as one of
/// this process's: counted against `max_client_conn` (never refused for it: it is
/// connected already) and waited for at shutdown.
pub(crate) fn adopt(pooler: &Arc<Pooler>, socket: TcpStream, state: SessionState) {
    let counted = ClientCount::new(pooler.clone());
    pooler.client_tasks.spawn(async move {
        client::serve_moved(socket, counted.pooler.clone(), state).await;
        drop(counted);
    });
}

/// One client counted against `max_client_conn`, for as long as its task lives: dropping
/// it (however the task ends, a panic included) uncounts the client.
struct ClientCount {
    pooler: Arc<Pooler>,
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
