//! The pooler as a whole: the config snapshot in force, the credentials derived from it,
//! the pools, the cancel keys, and the tokens that stop it. Shared by every task.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::auth::{Credential, Secret};
use crate::cancel::CancelRegistry;
use crate::clients::{Alert, ClientRegistry};
use crate::config::{Config, PoolSettings};
use crate::pool::{Budget, BudgetKind, Pool, PoolKey};
use crate::prepared::Registry;
use crate::server::{ServerSecret, TlsConnector, Upstream};

mod admission;
mod auth_query;
mod client_caps;
mod reload;

pub use admission::Admission;
pub use auth_query::{AuthQueries, Outcome as AuthQueryOutcome, server_secret};
pub use client_caps::{CapReached, ClientCapView, ClientSlot};
pub use reload::{ReloadError, ReloadStats};

/// A config and what is derived from it once (SCRAM keys of plain passwords).
pub struct Snapshot {
    /// The config as loaded and validated.
    pub config: Config,
    /// Per user, what client logins are checked against.
    pub credentials: HashMap<String, Arc<Credential>>,
    /// Per database, how its pools open TLS to the server (built from the files the
    /// config read, once per load).
    server_tls: HashMap<String, TlsConnector>,
    /// How clients may use TLS (`[tls]`), built from the files this load read: clients
    /// that connect after a reload get the new certificate. `None`: TLS is off.
    pub client_tls: Option<crate::client::ClientTls>,
}

impl Snapshot {
    /// Derives credentials from a validated config.
    pub fn new(config: Config) -> Result<Snapshot, String> {
        let mut credentials = HashMap::new();
        for (name, user) in &config.users {
            if let Some(password) = &user.password {
                let secret =
                    Secret::parse(password).map_err(|e| format!("users.{name}.password: {e}"))?;
                credentials.insert(name.clone(), Arc::new(Credential::new(name, secret)));
            }
        }
        let mut server_tls = HashMap::new();
        for name in config.databases.keys() {
            let mut settings = config.pool.server_tls.clone();
            if let Some(db) = config.databases.get(name) {
                settings.apply(&db.overrides);
            }
            let tls = TlsConnector::new(&settings)
                .map_err(|(key, e)| format!("databases.{name}.{key}: {e}"))?;
            server_tls.insert(name.clone(), tls);
        }
        let client_tls = crate::client::ClientTls::new(&config.tls)
            .map_err(|(key, e)| format!("tls.{key}: {e}"))?;
        Ok(Snapshot {
            config,
            credentials,
            server_tls,
            client_tls,
        })
    }

    /// Where a pool for (database, user) connects, and as whom. None if the database is unknown.
    pub fn upstream(&self, database: &str, user: &str) -> Option<Upstream> {
        let db = self.config.databases.get(database)?;
        let (login, secret) = match &db.user {
            Some(login) => (
                login.clone(),
                db.password.clone().or_else(|| self.server_password(login)),
            ),
            None => (user.to_owned(), self.server_password(user)),
        };
        Some(Upstream {
            host: db.host.clone(),
            port: db.port,
            dbname: db.dbname.clone().unwrap_or_else(|| database.to_owned()),
            user: login,
            secret: secret.map(ServerSecret::Password),
            tcp: self
                .config
                .pool_settings(database, user)
                .map(|s| s.tcp)
                .unwrap_or_default(),
            tls: self.server_tls.get(database).cloned().unwrap_or_default(),
        })
    }

    /// The plain password pgmux logs in to servers with, for `user`.
    fn server_password(&self, user: &str) -> Option<String> {
        let entry = self.config.users.get(user)?;
        if let Some(p) = &entry.server_password {
            return Some(p.clone());
        }
        self.credentials
            .get(user)
            .and_then(|c| c.plain_password().map(str::to_owned))
    }
}

/// The running pooler.
pub struct Pooler {
    snapshot: ArcSwap<Snapshot>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Cancel keys of live clients.
    pub cancels: Arc<CancelRegistry>,
    /// Every named prepared statement clients prepared, shared by all pools.
    pub statements: Arc<Registry>,
    /// Clients connected now (for max_client_conn).
    pub clients: AtomicUsize,
    /// Who is logged in and what they do (the admin views).
    pub clients_registry: Arc<ClientRegistry>,
    /// Whether the client listeners accept connections (readiness).
    pub listening: AtomicBool,
    /// Outcomes of config reloads (metrics).
    pub reloads: ReloadStats,
    /// Limits shared by pools (`max_db_connections`, `max_user_connections`), by what
    /// they cap. Taken after `pools`, never while a pool's or a budget's lock is held.
    budgets: Mutex<HashMap<(BudgetKind, String), Arc<Budget>>>,
    /// Clients logged in per database and per user, counted only while
    /// `max_db_client_connections` / `max_user_client_connections` apply to them.
    client_caps: client_caps::ClientCaps,
    /// `admin.listen` at start: the address main binds, which a reload cannot change.
    admin_listen: Option<String>,
    /// Failed logins by reason, and the addresses locked out after too many.
    pub logins: crate::auth::LoginGuard,
    /// LISTEN/NOTIFY fan-out: a listener connection per database.
    pub notify: Arc<crate::notify::Notify>,
    /// Users looked up with `auth_query`, and what their logins taught pgmux.
    pub auth_queries: AuthQueries,
    /// The file reloads read again; set by main.
    config_path: Mutex<Option<PathBuf>>,
    /// One reload at a time.
    reloading: Mutex<()>,
    /// Begun by the first SIGTERM/SIGINT: `/ready` fails, serving goes on for
    /// `drain_delay` (`drain.rs`).
    pub drain: crate::drain::Drain,
    /// Databases refusing logins and the shutdown drain (the console's DISABLE and
    /// SHUTDOWN WAIT_FOR_CLIENTS).
    pub admission: Admission,
    /// Per-database totals at the last two ticks of PgBouncer's `stats_period`, for the
    /// console's averages.
    pub stats_period: crate::admin::console::StatsPeriod,
    /// Cancelled when the drain is over (or by a second signal): stop accepting, end
    /// sessions between transactions.
    pub stop: CancellationToken,
    /// Cancelled when the grace period is over: end every session now.
    pub kill: CancellationToken,
    /// A zero-downtime upgrade to a new process (`upgrade.rs`), when one runs.
    pub upgrade: crate::upgrade::Upgrade,
    /// Every client's task: those the listener accepted and those an upgrade moved in.
    /// Shutdown waits for them.
    pub client_tasks: tokio_util::task::TaskTracker,
    /// The runtime that serves clients. Pools start their upkeep there, and the admin
    /// port (on a thread and runtime of its own) runs what changes the pools there too.
    runtime: Handle,
}

impl Pooler {
    /// A pooler serving `config`. Call it inside the runtime that serves clients: that is
    /// where every pool's background work runs, whichever thread later asks for a pool.
    pub fn new(config: Config) -> Result<Arc<Pooler>, String> {
        let runtime = Handle::try_current()
            .map_err(|_| "the pooler must be created inside the tokio runtime".to_owned())?;
        let statements = Registry::new(config.server.statement_registry_size);
        let admin_listen = config.admin.listen.clone();
        let pooler = Arc::new(Pooler {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)?),
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::new(CancelRegistry::default()),
            statements: Arc::new(statements),
            clients: AtomicUsize::new(0),
            clients_registry: Arc::new(ClientRegistry::default()),
            listening: AtomicBool::new(false),
            reloads: ReloadStats::default(),
            budgets: Mutex::new(HashMap::new()),
            client_caps: client_caps::ClientCaps::default(),
            admin_listen,
            logins: crate::auth::LoginGuard::default(),
            notify: Arc::default(),
            auth_queries: AuthQueries::default(),
            config_path: Mutex::new(None),
            reloading: Mutex::new(()),
            drain: crate::drain::Drain::default(),
            admission: Admission::default(),
            stats_period: Default::default(),
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            upgrade: crate::upgrade::Upgrade::default(),
            client_tasks: tokio_util::task::TaskTracker::new(),
            runtime,
        });
        pooler.create_configured_pools();
        crate::admin::console::tick_stats_period(&pooler);
        Ok(pooler)
    }

    /// Creates the pool of every configured (database, user) that does not exist yet:
    /// each database of `[databases]` with each user of `[users]` (a database with a fixed
    /// `user` too: its pools are still one per client user). Operators see them, at zero,
    /// before the first client; `min_size` warms them up from the start. Users looked up
    /// with `auth_query` get theirs at their first login, as pgmux cannot list them.
    pub fn create_configured_pools(&self) {
        let snapshot = self.snapshot();
        for database in snapshot.config.databases.keys() {
            for user in snapshot.config.users.keys() {
                let _ = self.pool(database, user);
            }
        }
    }

    /// The runtime that serves clients (see the field).
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// The config snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The pool for (database, user), created on first use (at start and on reload for
    /// configured users, see [`Pooler::create_configured_pools`]). None if the database is
    /// unknown.
    pub fn pool(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        let key = PoolKey {
            database: database.to_owned(),
            user: user.to_owned(),
        };
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get(&key) {
            return Some(pool.clone());
        }
        let snapshot = self.snapshot();
        let settings = snapshot.config.pool_settings(database, user)?;
        let upstream = self.upstream(&snapshot, database, user)?;
        let budgets = self.budgets_for(database, user, &settings);
        let pool = Pool::new(key.clone(), upstream, settings);
        if !budgets.is_empty() {
            pool.set_budgets(budgets);
        }
        pool.set_slow_wait(snapshot.config.admin.log_slow_waits);
        pool.set_clients(self.clients_registry.clone());
        if self.stop.is_cancelled() {
            pool.drain();
        }
        pool.start_upkeep(&self.runtime);
        pools.insert(key, pool.clone());
        Some(pool)
    }

    /// Where the pool for (database, user) connects: [`Snapshot::upstream`], and for a
    /// user the config does not list (an `auth_query` user), the secret a login of theirs
    /// taught pgmux. A user listed in the config wins.
    fn upstream(&self, snapshot: &Snapshot, database: &str, user: &str) -> Option<Upstream> {
        let mut upstream = snapshot.upstream(database, user)?;
        let db = snapshot.config.databases.get(database)?;
        if db.user.is_none()
            && !snapshot.config.users.contains_key(user)
            && snapshot.config.auth_query_for(database).is_some()
        {
            upstream.secret = self.auth_queries.learnt(database, user);
        }
        Some(upstream)
    }

    /// Whether a pool for (database, user) may exist under `snapshot`: the user is listed,
    /// or the database looks users up with `auth_query` and a login of this one succeeded.
    fn serves(&self, snapshot: &Snapshot, database: &str, user: &str) -> bool {
        snapshot.config.users.contains_key(user)
            || (snapshot.config.auth_query_for(database).is_some()
                && self.auth_queries.learnt(database, user).is_some())
    }

    /// A login of `user` to `database` (an `auth_query` user) succeeded with `secret`:
    /// their pool logs in to PostgreSQL with it from now on. A changed secret (the password
    /// changed in PostgreSQL) replaces the pool's connections.
    pub fn learn_server_secret(&self, database: &str, user: &str, secret: ServerSecret) {
        if !self.auth_queries.learn(database, user, secret) {
            return;
        }
        let key = PoolKey {
            database: database.to_owned(),
            user: user.to_owned(),
        };
        let pool = self.pools.lock().get(&key).cloned();
        if let Some(pool) = pool {
            let snapshot = self.snapshot();
            if let Some(upstream) = self.upstream(&snapshot, database, user)
                && *pool.upstream() != upstream
            {
                pool.set_upstream(upstream);
            }
        }
    }

    /// The budgets a pool for (database, user) with `settings` counts in, created on
    /// first use, their limits set from `settings`. Empty without limits.
    fn budgets_for(&self, database: &str, user: &str, settings: &PoolSettings) -> Vec<Arc<Budget>> {
        let limits = [
            (
                BudgetKind::Database,
                database,
                settings.limits.max_db_connections,
            ),
            (BudgetKind::User, user, settings.limits.max_user_connections),
        ];
        if limits.iter().all(|(_, _, limit)| *limit == 0) {
            return Vec::new();
        }
        let mut all = self.budgets.lock();
        let mut out = Vec::new();
        for (kind, name, limit) in limits {
            if limit == 0 {
                continue;
            }
            let budget = all
                .entry((kind, name.to_owned()))
                .or_insert_with(|| Budget::new(kind, name, limit));
            if budget.limit() != limit {
                budget.set_limit(limit);
            }
            out.push(budget.clone());
        }
        out
    }

    /// Every limit across pools in force, for the views and metrics.
    pub fn budgets(&self) -> Vec<Arc<Budget>> {
        let mut all: Vec<_> = self.budgets.lock().values().cloned().collect();
        all.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        all
    }

    /// Raises [`Alert::STOP`] and [`Alert::KILL`] on every session when `stop` and `kill`
    /// fire (a session that logs in later sees the tokens themselves). Runs until both did.
    pub async fn forward_stop(self: Arc<Self>) {
        let stop = async {
            self.stop.cancelled().await;
            self.clients_registry.raise(Alert::STOP, |_, _| true);
        };
        let kill = async {
            self.kill.cancelled().await;
            self.clients_registry.raise(Alert::KILL, |_, _| true);
        };
        futures_util::future::join(stop, kill).await;
    }

    /// Every pool, for shutdown and the admin views.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().values().cloned().collect()
    }
}
