//! Caps on clients logged in per database and per user (`max_db_client_connections`,
//! `max_user_client_connections`, as in PgBouncer), checked at login.
//!
//! A client is counted only against the caps in force when it logged in (0 = no cap,
//! and then no lock is taken); its [`ClientSlot`] gives its place back when the session
//! ends, so a reload that lowers a cap refuses new clients until enough have left.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::Pooler;
use crate::client::ClientError;
use crate::config::PoolSettings;
use crate::pool::BudgetKind;

/// Counts per (database or user, name).
#[derive(Default)]
pub(super) struct ClientCaps {
    counts: Mutex<HashMap<(BudgetKind, String), Count>>,
}

#[derive(Default)]
struct Count {
    /// The cap last applied at a login; 0 = none.
    limit: u32,
    /// Clients counted now.
    connected: u32,
    /// Logins refused with 53300, since start.
    refused: u64,
}

/// One client's place under the caps; given back when dropped (with the session).
pub struct ClientSlot {
    pooler: Arc<Pooler>,
    keys: Vec<(BudgetKind, String)>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.pooler.client_caps.counts.lock();
        for key in &self.keys {
            if let Some(count) = counts.get_mut(key) {
                count.connected = count.connected.saturating_sub(1);
            }
        }
    }
}

/// A login refused by a cap (53300, see [`ClientError::ClientLimit`]).
#[derive(Debug)]
pub struct CapReached {
    /// Database or user.
    pub kind: BudgetKind,
    /// Its name.
    pub name: String,
    /// The cap.
    pub limit: u32,
}

impl From<CapReached> for ClientError {
    fn from(c: CapReached) -> Self {
        ClientError::ClientLimit {
            kind: c.kind,
            name: c.name,
            limit: c.limit,
        }
    }
}

/// What the views and metrics show of one cap.
#[derive(Clone, Debug)]
pub struct ClientCapView {
    /// Database or user.
    pub kind: BudgetKind,
    /// Its name.
    pub name: String,
    /// The cap at the last login; 0 = none.
    pub limit: u32,
    /// Clients counted now.
    pub connected: u32,
    /// Logins refused with 53300, since start.
    pub refused: u64,
}

impl Pooler {
    /// Counts a client logging in to `database` as `user` under the caps of `settings`,
    /// or refuses it with 53300 naming the cap. `None` when no cap applies.
    pub fn admit_client(
        self: &Arc<Self>,
        database: &str,
        user: &str,
        settings: &PoolSettings,
    ) -> Result<Option<ClientSlot>, CapReached> {
        let caps = [
            (
                BudgetKind::Database,
                database,
                settings.limits.max_db_client_connections,
            ),
            (
                BudgetKind::User,
                user,
                settings.limits.max_user_client_connections,
            ),
        ];
        if caps.iter().all(|(_, _, limit)| *limit == 0) {
            return Ok(None);
        }
        let mut counts = self.client_caps.counts.lock();
        for (kind, name, limit) in caps {
            if limit == 0 {
                continue;
            }
            let count = counts.entry((kind, name.to_owned())).or_default();
            count.limit = limit;
            if count.connected >= limit {
                count.refused += 1;
                return Err(CapReached {
                    kind,
                    name: name.to_owned(),
                    limit,
                });
            }
        }
        let mut keys = Vec::new();
        for (kind, name, limit) in caps {
            if limit > 0 {
                let key = (kind, name.to_owned());
                if let Some(count) = counts.get_mut(&key) {
                    count.connected += 1;
                }
                keys.push(key);
            }
        }
        Ok(Some(ClientSlot {
            pooler: self.clone(),
            keys,
        }))
    }

    /// Every client cap seen at a login, for the views and metrics.
    pub fn client_caps(&self) -> Vec<ClientCapView> {
        let counts = self.client_caps.counts.lock();
        let mut out: Vec<ClientCapView> = counts
            .iter()
            .map(|((kind, name), c)| ClientCapView {
                kind: *kind,
                name: name.clone(),
                limit: c.limit,
                connected: c.connected,
                refused: c.refused,
            })
            .collect();
        out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        out
    }
}
