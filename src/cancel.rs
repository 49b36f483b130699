//! Cancel requests. Every client gets a key with a pgmux-made secret; a CancelRequest with
//! that key is forwarded, on a fresh connection, to the server that client holds right
//! now, with that server's real key. Unknown keys are ignored, as PostgreSQL does.
//!
//! The process id in the key is made up too in transaction and statement mode, where a
//! client has no server of its own; in session mode it is the real one of the server the
//! client keeps, as PostgreSQL gives it. Real ids repeat across upstream servers, so a key
//! is the pair (process id, secret).
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
    /// The server's address, shared with its connection: every client's slot has room
    /// for a target, and a whole `ServerAddr` would be 184 bytes of it.
    pub addr: Arc<ServerAddr>,
    /// The server's own key.
    pub key: BackendKey,
}

/// What one client publishes: the server it holds, if any. Written by the client task at
/// checkout and release, read by cancel requests.
#[derive(Default)]
struct Slot {
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

/// A cancel key as a client holds it: (process id, secret).
type Key = (i32, i32);

/// Every live client's cancel key. Shared by the listener and the client tasks.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<Key, Arc<Slot>>>,
    /// During an upgrade, in the new process: where a key this process does not know goes
    /// (the old process, whose client may not have moved yet; `upgrade.rs`).
    elsewhere: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Key>>>,
}

/// A client's registration; dropping it forgets the key.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    slot: Arc<Slot>,
    key: Key,
}

impl CancelRegistry {
    /// Issues a fresh key for a new client: with `process_id` (the real one of the server
    /// a session-mode client keeps) or a made-up one, and a random secret.
    pub fn register(self: &Arc<Self>, process_id: Option<i32>) -> CancelHandle {
        let mut clients = self.clients.lock();
        let key = loop {
            // Made-up ids are positive, like real process ids, and never 0.
            let id = process_id.unwrap_or_else(|| (rand::random::<u32>() >> 1) as i32);
            let key = (id, rand::random::<i32>());
            if (process_id.is_some() || id != 0) && !clients.contains_key(&key) {
                break key;
            }
        };
        let slot = Arc::new(Slot::default());
        clients.insert(key, slot.clone());
        CancelHandle {
            registry: self.clone(),
            slot,
            key,
        }
    }

    /// Registers a key issued by the process this one took over from (an upgrade moved
    /// its client here), so that the client's cancel requests keep working. `None` if a
    /// client of this process already has it.
    pub fn adopt(self: &Arc<Self>, key: (i32, i32)) -> Option<CancelHandle> {
        let mut clients = self.clients.lock();
        if clients.contains_key(&key) {
            return None;
        }
        let slot = Arc::new(Slot::default());
        clients.insert(key, slot.clone());
        Some(CancelHandle {
            registry: self.clone(),
            slot,
            key,
        })
    }

    /// Sends cancel requests with keys this process does not know to `to` (or no longer,
    /// with `None`): during an upgrade, the old process may still serve that client.
    pub fn pass_unknown_to(&self, to: Option<tokio::sync::mpsc::UnboundedSender<(i32, i32)>>) {
        *self.elsewhere.lock() = to;
    }

    /// Forwards a cancel request for a pgmux key to the server that client holds, if any.
    pub async fn cancel(&self, process_id: i32, secret: i32) {
        let slot = self.clients.lock().get(&(process_id, secret)).cloned();
        let Some(slot) = slot else {
            let elsewhere = self.elsewhere.lock().clone();
            if let Some(old) = elsewhere
                && old.send((process_id, secret)).is_ok()
            {
                debug!(
                    process_id,
                    "cancel request for a client not moved yet: passed to the old process"
                );
                return;
            }
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
        self.key
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
        self.registry.clients.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_of_servers_with_the_same_process_id_keep_keys_of_their_own() {
        let registry = Arc::new(CancelRegistry::default());
        // Two upstream servers may both have a backend 4242.
        let a = registry.register(Some(4242));
        let b = registry.register(Some(4242));
        assert_eq!((a.key().0, b.key().0), (4242, 4242));
        assert_ne!(a.key(), b.key());
        let made_up = registry.register(None);
        assert!(made_up.key().0 > 0);
        drop(a);
        let clients = registry.clients.lock();
        assert_eq!(clients.len(), 2);
        assert!(clients.contains_key(&b.key()));
    }
}
