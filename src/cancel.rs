//! Cancel requests. Every client gets a pgmux-made key; a CancelRequest with that key is
//! forwarded, on a fresh connection, to the server that client holds right now, with that
//! server's real key. Unknown keys are ignored, as PostgreSQL does.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use crate::server::{BackendKey, ServerAddr};

/// The server a client holds, as a cancel request needs it.
#[derive(Clone, Debug)]
pub struct CancelTarget {
    /// The server's address.
    pub addr: ServerAddr,
    /// The server's own key.
    pub key: BackendKey,
}

/// What one client publishes: the server it holds, if any. Written by the client task at
/// checkout and release, read by cancel requests.
#[derive(Default)]
struct Slot {
    secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

/// Every live client's cancel key. Shared by the listener and the client tasks.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<i32, Arc<Slot>>>,
}

/// A client's registration; dropping it forgets the key.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    slot: Arc<Slot>,
    process_id: i32,
}

impl CancelRegistry {
    /// Issues a fresh key for a new client.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let secret = rand::random::<i32>();
        let mut clients = self.clients.lock();
        let process_id = loop {
            // Positive, like real process ids; never 0.
            let id = (rand::random::<u32>() >> 1) as i32;
            if id != 0 && !clients.contains_key(&id) {
                break id;
            }
        };
        let slot = Arc::new(Slot {
            secret,
            target: Mutex::new(None),
        });
        clients.insert(process_id, slot.clone());
        CancelHandle {
            registry: self.clone(),
            slot,
            process_id,
        }
    }

    /// Forwards a cancel request for a pgmux key to the server that client holds, if any.
    pub async fn cancel(&self, process_id: i32, secret: i32) {
        let target = {
            let clients = self.clients.lock();
            match clients.get(&process_id) {
                Some(slot) if slot.secret == secret => slot.target.lock().clone(),
                _ => None,
            }
        };
        let Some(target) = target else {
            debug!(process_id, "cancel request for no running query; ignored");
            return;
        };
        forward(target).await;
    }
}

/// Sends a CancelRequest for `target` on a fresh connection to its server. Best effort:
/// failures are logged at debug level, never reported to anyone.
pub async fn forward(target: CancelTarget) {
    let mut packet = BytesMut::new();
    frontend::cancel_request(target.key.process_id, target.key.secret, &mut packet);
    let sent = async {
        let mut stream = target.addr.connect().await?;
        stream.write_all(&packet).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), sent).await {
        Ok(Ok(())) => {
            debug!(server = %target.addr, pid = target.key.process_id, "cancel request forwarded")
        }
        Ok(Err(e)) => debug!(error = %e, "could not forward cancel request"),
        Err(_) => debug!("forwarding a cancel request timed out"),
    }
}

impl CancelHandle {
    /// The key the client was given: (process id, secret).
    pub fn key(&self) -> (i32, i32) {
        (self.process_id, self.slot.secret)
    }

    /// Records which server the client holds now (None when it holds none).
    pub fn set_target(&self, target: Option<CancelTarget>) {
        *self.slot.target.lock() = target;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.clients.lock().remove(&self.process_id);
    }
}
