//! Cancel requests. Every client gets a pgmux-made key; a CancelRequest with that key is
//! forwarded, on a fresh connection, to the server that client holds right now, with that
//! server's real key. Unknown keys are ignored, as PostgreSQL does.
//!
//! A cancel must never reach a server after it went to another client. So the session
//! gives a server back only once no cancel of its client is on the way
//! ([`CancelHandle::set_target`] says so, [`CancelHandle::settled`] waits): a cancel that
//! arrives when the server is idle is dropped by PostgreSQL itself.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
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
    target: Mutex<Target>,
    /// Woken when the last cancel on the way is delivered.
    settled: Notify,
}

#[derive(Default)]
struct Target {
    server: Option<CancelTarget>,
    /// Cancel requests for `server` (or the one before it) still being delivered.
    in_flight: u32,
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
            ..Slot::default()
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
        let slot = {
            let clients = self.clients.lock();
            match clients.get(&process_id) {
                Some(slot) if slot.secret == secret => Some(slot.clone()),
                _ => None,
            }
        };
        let Some(slot) = slot else {
            debug!(process_id, "cancel request with an unknown key; ignored");
            return;
        };
        let target = {
            let mut t = slot.target.lock();
            let server = t.server.clone();
            if server.is_some() {
                t.in_flight += 1;
            }
            server
        };
        let Some(target) = target else {
            debug!(process_id, "cancel request for no running query; ignored");
            return;
        };
        forward(target).await;
        let mut t = slot.target.lock();
        t.in_flight -= 1;
        if t.in_flight == 0 {
            slot.settled.notify_waiters();
        }
    }
}

/// Sends a CancelRequest for `target` on a fresh connection to its server, and waits until
/// the server closes that connection (it has then signalled the backend). Best effort:
/// failures are logged at debug level, never reported to anyone.
pub async fn forward(target: CancelTarget) {
    let mut packet = BytesMut::new();
    frontend::cancel_request(target.key.process_id, target.key.secret, &mut packet);
    let sent = async {
        let mut stream = target.addr.connect().await?;
        stream.write_all(&packet).await?;
        stream.shutdown().await?;
        let mut rest = [0u8; 64];
        while stream.read(&mut rest).await? > 0 {}
        Ok::<(), std::io::Error>(())
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

    /// Records which server the client holds now (None when it holds none). Returns whether
    /// a cancel for the server held until now is still on the way: then that server must
    /// not go to another client before [`CancelHandle::settled`].
    pub fn set_target(&self, target: Option<CancelTarget>) -> bool {
        let mut t = self.slot.target.lock();
        t.server = target;
        t.in_flight > 0
    }

    /// Resolves once no cancel request of this client is on the way.
    pub fn settled(&self) -> impl Future<Output = ()> + Send + 'static {
        let slot = self.slot.clone();
        async move {
            loop {
                // Registered before the check: a wakeup in between is not lost.
                let woken = slot.settled.notified();
                if slot.target.lock().in_flight == 0 {
                    return;
                }
                woken.await;
            }
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.clients.lock().remove(&self.process_id);
    }
}
