//! What the admin console switches on clients, PgBouncer's way: databases that refuse new
//! logins (`DISABLE db` / `ENABLE db`), a kill switch per logged-in client (`KILL`,
//! `KILL_CLIENT id`), and a drain that refuses every new login while the clients there
//! are leave on their own (`SHUTDOWN WAIT_FOR_CLIENTS`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::client::ClientError;
use crate::clients::{Alert, ClientRegistry};

/// Owned by the [`Pooler`](super::Pooler) (`pooler.admission`); read at each login, changed
/// by the console.
#[derive(Default)]
pub struct Admission {
    /// Databases that refuse new logins.
    disabled: Mutex<BTreeSet<String>>,
    /// Set once by `SHUTDOWN WAIT_FOR_CLIENTS`: every new login is refused.
    draining: AtomicBool,
    /// The kill switch of every logged-in client, by its registry id.
    switches: Arc<Mutex<HashMap<u64, CancellationToken>>>,
}

/// A session's kill switch: its token fires on `KILL`/`KILL_CLIENT` of this client, and
/// whenever `parent` (the pooler's kill token) fires. Dropping it forgets the client.
pub struct KillSwitch {
    id: u64,
    token: CancellationToken,
    switches: Arc<Mutex<HashMap<u64, CancellationToken>>>,
}

impl KillSwitch {
    /// The token the session watches.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for KillSwitch {
    fn drop(&mut self) {
        self.switches.lock().remove(&self.id);
    }
}

/// Why a login was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// The database is disabled (55000).
    Disabled(String),
    /// pgmux drains for a shutdown (57P01).
    Draining,
}

impl From<Closed> for ClientError {
    fn from(closed: Closed) -> Self {
        match closed {
            Closed::Disabled(database) => ClientError::DatabaseDisabled(database),
            Closed::Draining => ClientError::ShuttingDown,
        }
    }
}

impl Admission {
    /// Whether a new login to `database` may go on: not while the database is disabled,
    /// nor while pgmux drains for a shutdown.
    pub fn admit(&self, database: &str) -> Result<(), Closed> {
        if self.draining.load(Relaxed) {
            return Err(Closed::Draining);
        }
        if self.disabled.lock().contains(database) {
            return Err(Closed::Disabled(database.to_owned()));
        }
        Ok(())
    }

    /// `DISABLE db` (true) or `ENABLE db` (false); returns whether that changed anything.
    pub fn set_disabled(&self, database: &str, disabled: bool) -> bool {
        let mut set = self.disabled.lock();
        if disabled {
            set.insert(database.to_owned())
        } else {
            set.remove(database)
        }
    }

    /// Whether `database` refuses new logins.
    pub fn is_disabled(&self, database: &str) -> bool {
        self.disabled.lock().contains(database)
    }

    /// Refuses every new login from now on.
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Whether pgmux drains for a shutdown.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Arms the kill switch of client `id`, a child of `parent`.
    pub fn arm(&self, id: u64, parent: &CancellationToken) -> KillSwitch {
        let token = parent.child_token();
        self.switches.lock().insert(id, token.clone());
        KillSwitch {
            id,
            token,
            switches: self.switches.clone(),
        }
    }

    /// Fires the kill switch of each client in `ids` (which ends a wait for a server) and
    /// raises [`Alert::KILL`] on its registry entry (which ends its session loop); returns
    /// how many were still there.
    pub fn kill(&self, registry: &ClientRegistry, ids: impl IntoIterator<Item = u64>) -> usize {
        let switches = self.switches.lock();
        let mut killed = 0;
        for id in ids {
            if let Some(token) = switches.get(&id) {
                token.cancel();
            }
            if registry.raise_on(id, Alert::KILL) {
                killed += 1;
            }
        }
        killed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_fire_alone_or_with_their_parent_and_go_when_dropped() {
        let admission = Admission::default();
        let registry = Arc::new(ClientRegistry::default());
        let peer = "127.0.0.1:1".parse().expect("an address");
        let one = registry.register(peer, "app", "u", "", None);
        let two = registry.register(peer, "app", "u", "", None);
        let parent = CancellationToken::new();
        let a = admission.arm(one.id(), &parent);
        let b = admission.arm(two.id(), &parent);
        assert_eq!(admission.kill(&registry, [one.id(), 999]), 1);
        assert!(a.token().is_cancelled());
        assert!(!b.token().is_cancelled());
        parent.cancel();
        assert!(b.token().is_cancelled());
        drop(a);
        drop(one);
        assert_eq!(admission.kill(&registry, [1]), 0);
    }

    #[test]
    fn disabled_databases_and_the_drain_refuse_logins() {
        let admission = Admission::default();
        assert!(admission.admit("app").is_ok());
        assert!(admission.set_disabled("app", true));
        assert!(!admission.set_disabled("app", true));
        assert_eq!(admission.admit("app"), Err(Closed::Disabled("app".into())));
        assert!(admission.admit("other").is_ok());
        assert!(admission.set_disabled("app", false));
        admission.drain();
        assert_eq!(admission.admit("other"), Err(Closed::Draining));
    }
}
