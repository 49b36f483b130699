//! What the admin console switches on clients, PgBouncer's way: databases that refuse new
//! logins (`DISABLE db` / `ENABLE db`), and a drain that refuses every new login while the
//! clients there leave on their own (`SHUTDOWN WAIT_FOR_CLIENTS`). `KILL` and
//! `KILL_CLIENT id` raise [`Alert::KILL`](crate::clients::Alert) on the clients' registry
//! entries: a session watches that flag in its loop and while it waits for a server.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::client::ClientError;

/// Owned by the [`Pooler`](super::Pooler) (`pooler.admission`); read at each login, changed
/// by the console.
#[derive(Default)]
pub struct Admission {
    /// Databases that refuse new logins.
    disabled: Mutex<BTreeSet<String>>,
    /// Set once by `SHUTDOWN WAIT_FOR_CLIENTS`: every new login is refused.
    draining: AtomicBool,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
