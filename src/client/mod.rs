//! One client connection, from its first byte to its last: [`login`] negotiates the
//! startup and checks the password, then [`session::Session`] runs the transaction loop.

mod login;
pub(crate) mod params;
mod queue;
mod replies;
mod session;
mod statements;

pub use queue::OutQueue;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::pooler::Pooler;
use crate::protocol::{PgError, SqlState};

/// Serves one client connection to the end. `admitted` is false when max_client_conn was
/// reached: the client is told so (53300) once it has sent its startup packet.
pub async fn serve(mut socket: TcpStream, peer: SocketAddr, pooler: Arc<Pooler>, admitted: bool) {
    let _ = socket.set_nodelay(true);
    let started = std::time::Instant::now();
    let limit = pooler.snapshot().config.server.client_login_timeout;
    let outcome = tokio::time::timeout(limit, login::login(&mut socket, &pooler, admitted)).await;
    let session = match outcome {
        Ok(Ok(session)) => session,
        Ok(Err(login::Refusal::Gone)) => return, // a cancel request, or a client that left
        Ok(Err(login::Refusal::Console { user, cbuf })) => {
            return crate::admin::console::serve(socket, pooler, user, cbuf).await;
        }
        Ok(Err(login::Refusal::Error(err))) => {
            debug!(%peer, %err, "login refused");
            return refuse(socket, &err).await;
        }
        Err(_) => {
            let err = PgError::fatal(
                SqlState::QUERY_CANCELED,
                format!(
                    "canceling authentication: no login within {limit:?} (client_login_timeout)"
                ),
            );
            debug!(%peer, "login timed out");
            return refuse(socket, &err).await;
        }
    };
    let pool = session.pool.key.clone();
    let log = pooler.snapshot().config.admin.log_connections;
    if log {
        info!(%peer, %pool, "client connected");
    }
    // The session hands the socket back: its byte counts come from the kernel, then it closes.
    let socket = session.run(socket).await;
    let traffic = crate::stats::tcp_traffic(&socket).unwrap_or_default();
    drop(socket);
    let duration_ms = started.elapsed().as_millis() as u64;
    if log {
        info!(%peer, %pool, duration_ms, bytes_received = traffic.received, bytes_sent = traffic.sent, "client disconnected");
    } else {
        debug!(%peer, %pool, duration_ms, "client disconnected");
    }
}

/// Sends a fatal error and closes: never a bare reset.
async fn refuse(mut socket: TcpStream, err: &PgError) {
    let mut buf = BytesMut::new();
    err.write(&mut buf);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        socket.write_all(&buf).await?;
        socket.shutdown().await
    })
    .await;
}
