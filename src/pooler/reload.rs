//! Reloading the config (SIGHUP, `POST /reload`, the console's `RELOAD`): read the file
//! again, validate, then swap the snapshot and reconcile the pools in one step. A file
//! with problems changes nothing. Nobody is dropped: pools get their new sizes in place,
//! new databases and users appear for new logins, removed pools keep serving the clients
//! they have and close when those leave.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use tracing::{error, info};

use super::{Pooler, Snapshot};
use crate::clients::Alert;
use crate::config::{Config, PoolSettings};

/// Outcomes of reloads, for `/metrics`.
#[derive(Default)]
pub struct ReloadStats {
    /// Reloads applied.
    pub succeeded: AtomicU64,
    /// Reloads refused (the file had problems).
    pub failed: AtomicU64,
    /// Whether the last reload was applied (true before any reload).
    pub last_failed: AtomicBool,
    /// When the last reload was tried, in seconds since the Unix epoch; 0 = never.
    pub last_at: AtomicU64,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// pgmux was not started from a file.
    #[error("no config file to reload")]
    NoFile,
    /// The file has problems; each is one line, `file:line:column: key: message`.
    #[error("invalid config:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl ReloadError {
    /// Every problem, one a line.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ReloadError::NoFile => vec![self.to_string()],
            ReloadError::Invalid(problems) => problems.clone(),
        }
    }
}

impl Pooler {
    /// Sets the file that reloads read.
    pub fn set_config_path(&self, path: PathBuf) {
        *self.config_path.lock() = Some(path);
    }

    /// The file that reloads read, if any.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_path.lock().clone()
    }

    /// Reads the config file again and applies it; returns what changed, one line each.
    /// On error nothing changed, and every problem is in the error (and the log).
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
        let _one_at_a_time = self.reloading.lock();
        // RELOADING=1 to systemd now, READY=1 when this returns, applied or refused.
        let _systemd = crate::sd_notify::reloading();
        let result = self.load_and_apply();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.reloads.last_at.store(now.as_secs(), Relaxed);
        match &result {
            Ok(changes) => {
                self.reloads.succeeded.fetch_add(1, Relaxed);
                self.reloads.last_failed.store(false, Relaxed);
                if changes.is_empty() {
                    info!("config reloaded: nothing changed");
                }
                for change in changes {
                    info!(change = %change, "config reloaded");
                }
            }
            Err(e) => {
                self.reloads.failed.fetch_add(1, Relaxed);
                self.reloads.last_failed.store(true, Relaxed);
                for problem in e.problems() {
                    error!(%problem, "config reload refused: nothing changed");
                }
            }
        }
        result
    }

    /// Changes the config in force with `edit` (the console's `SET`) and applies the
    /// result as a reload applies a file: under the same lock, so that a reload cannot
    /// slip in between, and logged. `edit` checks what it returns with the rules of a
    /// file; its error changes nothing. Returns what changed.
    pub fn apply_config(
        &self,
        edit: impl FnOnce(&Config) -> Result<Config, String>,
    ) -> Result<Vec<String>, ReloadError> {
        let _one_at_a_time = self.reloading.lock();
        let config = edit(&self.snapshot().config).map_err(|e| ReloadError::Invalid(vec![e]))?;
        let snapshot = Snapshot::new(config).map_err(|e| ReloadError::Invalid(vec![e]))?;
        let changes = self.apply(snapshot);
        for change in &changes {
            info!(change = %change, "config changed by SET on the admin console");
        }
        Ok(changes)
    }

    fn load_and_apply(&self) -> Result<Vec<String>, ReloadError> {
        let path = self.config_path().ok_or(ReloadError::NoFile)?;
        let config = Config::load(&path).map_err(|e| {
            ReloadError::Invalid(e.problems.iter().map(ToString::to_string).collect())
        })?;
        // The admin port keeps the address it was bound to at start: a new file must
        // still protect that one, whatever its own admin.listen says.
        if let Some(bound) = &self.admin_listen
            && config.admin.unprotected_on(bound)
        {
            return Err(ReloadError::Invalid(vec![format!(
                "{}: admin.token: the admin port listens on \"{bound}\", beyond localhost: \
                 removing admin.token needs admin.allow_no_token = true (or a restart with a \
                 local admin.listen)",
                path.display()
            )]));
        }
        let snapshot = Snapshot::new(config).map_err(|e| ReloadError::Invalid(vec![e]))?;
        Ok(self.apply(snapshot))
    }

    /// Swaps in `snapshot` and reconciles the pools; returns what changed.
    pub fn apply(&self, snapshot: Snapshot) -> Vec<String> {
        let old = self.snapshot();
        let mut changes = config_changes(&old.config, &snapshot.config);
        // Under the pools lock, so that no pool is created from the old snapshot meanwhile.
        let mut pools = self.pools.lock();
        self.statements
            .set_capacity(snapshot.config.server.statement_registry_size);
        self.snapshot.store(Arc::new(snapshot));
        let new = self.snapshot();
        let slow_wait = new.config.admin.log_slow_waits;
        pools.retain(|key, pool| {
            let (db, user) = (key.database.as_str(), key.user.as_str());
            let settings = new.config.pool_settings(db, user);
            let upstream = self.upstream(&new, db, user);
            let (Some(settings), Some(upstream), true) =
                (settings, upstream, self.serves(&new, db, user))
            else {
                changes.push(format!(
                    "pool {key} removed: it serves its current clients until they leave"
                ));
                pool.retire();
                self.clients_registry
                    .raise(Alert::RETIRED, |d, u| d == db && u == user);
                return false;
            };
            if *pool.upstream() != upstream {
                changes.push(format!(
                    "pool {key}: upstream changed to {upstream:?}; replacing its connections"
                ));
                pool.set_upstream(upstream);
            }
            let budgets = self.budgets_for(db, user, &settings);
            if !budgets.is_empty() || !pool.budgets().is_empty() {
                pool.set_budgets(budgets);
            }
            let current = pool.settings();
            if *current != settings {
                let what = settings_changes(&current, &settings).join(", ");
                changes.push(format!("pool {key}: {what}"));
                pool.apply_settings(settings);
            }
            pool.set_slow_wait(slow_wait);
            true
        });
        drop(pools);
        // Pools of databases and users the new config adds are listed from now on.
        self.create_configured_pools();
        self.auth_queries.reset();
        // Limits no pool counts in any more (set to 0, or their pools gone).
        self.budgets
            .lock()
            .retain(|_, budget| Arc::strong_count(budget) > 1);
        changes
    }
}

/// What changed between two configs, outside the pools themselves.
fn config_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let restart = "takes effect after a restart";
    if old.server.listen != new.server.listen {
        out.push(format!(
            "server.listen {:?} -> {:?}: {restart}",
            old.server.listen, new.server.listen
        ));
    }
    if old.admin.listen != new.admin.listen {
        out.push(format!(
            "admin.listen {:?} -> {:?}: {restart}",
            old.admin.listen, new.admin.listen
        ));
    }
    if old.admin.token != new.admin.token {
        out.push("admin.token changed".to_owned());
    }
    let s = (&old.server, &new.server);
    if s.0.worker_threads != s.1.worker_threads {
        let (a, b) = (s.0.worker_threads, s.1.worker_threads);
        out.push(format!("server.worker_threads {a} -> {b}: {restart}"));
    }
    if s.0.reuse_port != s.1.reuse_port {
        let (a, b) = (s.0.reuse_port, s.1.reuse_port);
        out.push(format!("server.reuse_port {a} -> {b}: {restart}"));
    }
    if s.0.drain_delay != s.1.drain_delay {
        let (a, b) = (s.0.drain_delay, s.1.drain_delay);
        out.push(format!(
            "server.drain_delay {} -> {}: applies to the next shutdown",
            human(a),
            human(b)
        ));
    }
    if s.0.max_client_conn != s.1.max_client_conn {
        let (a, b) = (s.0.max_client_conn, s.1.max_client_conn);
        out.push(format!("server.max_client_conn {a} -> {b}"));
    }
    if s.0.client_login_timeout != s.1.client_login_timeout {
        let (a, b) = (s.0.client_login_timeout, s.1.client_login_timeout);
        out.push(format!(
            "server.client_login_timeout {} -> {}",
            human(a),
            human(b)
        ));
    }
    if s.0.shutdown_timeout != s.1.shutdown_timeout {
        let (a, b) = (s.0.shutdown_timeout, s.1.shutdown_timeout);
        out.push(format!(
            "server.shutdown_timeout {} -> {}",
            human(a),
            human(b)
        ));
    }
    if old.auth != new.auth {
        out.push("[auth] changed: applies to new logins".to_owned());
    }
    if old.admin.log_connections != new.admin.log_connections
        || old.admin.log_slow_waits != new.admin.log_slow_waits
    {
        out.push("[admin] logging settings changed".to_owned());
    }
    if (
        old.admin.header_timeout,
        old.admin.idle_timeout,
        old.admin.max_connections,
    ) != (
        new.admin.header_timeout,
        new.admin.idle_timeout,
        new.admin.max_connections,
    ) {
        out.push("[admin] connection limits changed: apply to new admin connections".to_owned());
    }
    if old.pool != new.pool {
        let what = settings_changes(&old.pool, &new.pool).join(", ");
        out.push(format!("[pool] {what}"));
    }
    for (name, db) in &new.databases {
        match old.databases.get(name) {
            None => out.push(format!("databases.{name} added")),
            Some(before) if before != db => out.push(format!("databases.{name} changed")),
            Some(_) => {}
        }
    }
    for name in old.databases.keys() {
        if !new.databases.contains_key(name) {
            out.push(format!("databases.{name} removed"));
        }
    }
    for (name, user) in &new.users {
        match old.users.get(name) {
            None => out.push(format!("users.{name} added")),
            Some(before) if before != user => {
                out.push(format!("users.{name} changed: applies to new logins"))
            }
            Some(_) => {}
        }
    }
    for name in old.users.keys() {
        if !new.users.contains_key(name) {
            out.push(format!("users.{name} removed"));
        }
    }
    out
}

/// `size 2 -> 10`-style lines for every pool setting that differs.
fn settings_changes(old: &PoolSettings, new: &PoolSettings) -> Vec<String> {
    let mut out = Vec::new();
    let mut num = |key: &str, a: u32, b: u32| {
        if a != b {
            out.push(format!("{key} {a} -> {b}"));
        }
    };
    num("size", old.size, new.size);
    num("min_size", old.min_size, new.min_size);
    num(
        "max_prepared_statements",
        old.max_prepared_statements,
        new.max_prepared_statements,
    );
    let (a, b) = (old.limits, new.limits);
    num(
        "max_db_connections",
        a.max_db_connections,
        b.max_db_connections,
    );
    num(
        "max_user_connections",
        a.max_user_connections,
        b.max_user_connections,
    );
    num(
        "max_db_client_connections",
        a.max_db_client_connections,
        b.max_db_client_connections,
    );
    num(
        "max_user_client_connections",
        a.max_user_client_connections,
        b.max_user_client_connections,
    );
    if old.max_pinned != new.max_pinned {
        num("max_pinned", old.pinned_limit(), new.pinned_limit());
    }
    if old.verify_every_transaction != new.verify_every_transaction {
        let name = |always| if always { "always" } else { "triggers" };
        let (a, b) = (
            name(old.verify_every_transaction),
            name(new.verify_every_transaction),
        );
        out.push(format!("session_state_check {a} -> {b} (for new clients)"));
    }
    if old.session_state != new.session_state {
        let (a, b) = (old.session_state.as_str(), new.session_state.as_str());
        out.push(format!("session_state {a} -> {b} (for new clients)"));
    }
    if old.server_tls != new.server_tls {
        let (a, b) = (old.server_tls.mode.as_str(), new.server_tls.mode.as_str());
        out.push(format!(
            "server_tls {a} -> {b} or its files changed (new server connections; idle ones are replaced)"
        ));
    }
    if old.mode != new.mode {
        let (a, b) = (old.mode.as_str(), new.mode.as_str());
        out.push(format!("mode {a} -> {b} (for new clients)"));
    }
    let durations = [
        ("wait_timeout", old.wait_timeout, new.wait_timeout),
        (
            "wait_notice_after",
            old.wait_notice_after,
            new.wait_notice_after,
        ),
        ("idle_timeout", old.idle_timeout, new.idle_timeout),
        ("max_lifetime", old.max_lifetime, new.max_lifetime),
        ("connect_timeout", old.connect_timeout, new.connect_timeout),
        (
            "idle_transaction_timeout",
            old.idle_transaction_timeout,
            new.idle_transaction_timeout,
        ),
        (
            "pinned_idle_timeout",
            old.pinned_idle_timeout,
            new.pinned_idle_timeout,
        ),
    ];
    for (key, a, b) in durations {
        if a != b {
            out.push(format!("{key} {} -> {}", human(a), human(b)));
        }
    }
    if old.server_reset_query != new.server_reset_query {
        out.push(format!(
            "server_reset_query {:?} -> {:?}",
            old.server_reset_query, new.server_reset_query
        ));
    }
    if out.is_empty() && old != new {
        out.push("settings changed".to_owned());
    }
    out
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "t.toml").expect("a valid config")
    }

    #[test]
    fn changes_are_described() {
        let old = config(
            "[pool]\nsize = 2\n[databases.app]\n[databases.gone]\n[users.a]\npassword = \"x\"\n",
        );
        let new = config(
            "[pool]\nsize = 10\nwait_timeout = \"2s\"\n[databases.app]\nport = 5433\n[databases.new]\n[users.a]\npassword = \"y\"\n[users.b]\npassword = \"z\"\n",
        );
        assert_eq!(
            config_changes(&old, &new),
            [
                "[pool] size 2 -> 10, wait_timeout 5s -> 2s",
                "databases.app changed",
                "databases.new added",
                "databases.gone removed",
                "users.a changed: applies to new logins",
                "users.b added",
            ]
        );
    }

    #[test]
    fn drain_delay_reloads_and_reuse_port_waits_for_a_restart() {
        let old = config("[server]\ndrain_delay = \"5s\"\n");
        let new = config("[server]\ndrain_delay = \"15s\"\nreuse_port = true\n");
        assert_eq!(
            config_changes(&old, &new),
            [
                "server.reuse_port false -> true: takes effect after a restart",
                "server.drain_delay 5s -> 15s: applies to the next shutdown",
            ]
        );
    }
}
