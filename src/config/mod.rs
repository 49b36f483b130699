//! The pgmux configuration: what it listens on, how clients log in, and which pools exist.
//!
//! [`Config::load`] reads a TOML file in four steps, each in its own file:
//! `env` substitutes `${VAR}` references, `load` and `read` walk the spanned TOML document
//! into a [`Config`] (every key checked, none skipped), `userlist` adds the users of
//! `auth.userlist_file`, and `validate` refuses nonsense and warns about risky values.
//! Every problem found along the way is collected, so one run reports them all, each with
//! its file, line and column. See `docs/configuration.md` for the user-facing reference.
//!
//! A `Config` is plain data, owned by whoever loaded it; a reload builds a new one and a
//! reload that fails changes nothing.

mod access;
mod client_tls;
mod env;
mod load;
mod masked;
mod read;
mod report;
mod server_tls;
mod userlist;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client_tls::{ClientTlsMode, TlsSection};
pub use server_tls::{PemFile, ServerTlsMode, ServerTlsSettings};

/// The whole configuration, with every default filled in.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `[server]`: where clients connect.
    pub server: ServerSection,
    /// `[auth]`: how clients prove who they are.
    pub auth: AuthSection,
    /// `[admin]`: the HTTP admin port and what pgmux logs about its clients and pools.
    pub admin: AdminSection,
    /// `[tls]`: TLS between clients and pgmux.
    pub tls: TlsSection,
    /// `[pool]`: pool settings for every database that does not override them.
    pub pool: PoolSettings,
    /// `[databases.NAME]`: the databases clients may ask for, by the name they ask for.
    pub databases: BTreeMap<String, Database>,
    /// `[users.NAME]` plus the entries of `auth.userlist_file` (`[users]` wins on conflict).
    pub users: BTreeMap<String, User>,
}

/// `[server]`: the client-facing side of pgmux.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSection {
    /// Addresses to listen on, `host:port` each. TOML: a string or an array of strings.
    pub listen: Vec<String>,
    /// Client connections accepted at once; more are refused.
    pub max_client_conn: usize,
    /// Time a client has to finish startup and authentication.
    pub client_login_timeout: Duration,
    /// Time clients get to finish their transactions on shutdown.
    pub shutdown_timeout: Duration,
    /// On SIGTERM/SIGINT, how long pgmux goes on serving and accepting while `/ready`
    /// answers 503 (time for a load balancer to stop sending it clients), before it stops
    /// accepting and ends sessions between transactions. 0 (the default): at once.
    pub drain_delay: Duration,
    /// Set `SO_REUSEPORT` on the client listeners, so that several pgmux processes can
    /// listen on one port (rolling restarts, one process per core). Read at start only.
    pub reuse_port: bool,
    /// Largest client message accepted, in bytes (PostgreSQL's own limit is 1 GB); a
    /// larger one gets `08P01` and the connection is closed.
    pub max_message_size: usize,
    /// A client that stops sending in the middle of a message for this long gets `08P01`
    /// and is disconnected (a half-sent message holds memory, and perhaps a server).
    pub partial_message_timeout: Duration,
    /// A transaction-mode client idle this long, holding nothing, is parked: its task
    /// ends and its socket waits in its worker thread's parking lot (`client/park.rs`)
    /// until it sends again. Zero = never.
    pub park_idle_after: Duration,
    /// Distinct named statements pgmux remembers across all clients; beyond it, those no
    /// client and no server connection holds are forgotten.
    pub statement_registry_size: usize,
    /// Threads that run client sessions. 1 (the default) runs everything on one thread,
    /// which costs the least CPU per transaction; more spread sessions over that many
    /// threads (for a pooler that saturates one core), `auto` one per core pgmux may use.
    /// Read at start only.
    pub worker_threads: WorkerThreads,
    /// Where pgmux writes its process id at start, for `pgmux upgrade` (docs/upgrades.md).
    /// Default: `/tmp/pgmux-PORT.pid`, PORT the first `listen` address's.
    pub pid_file: Option<PathBuf>,
    /// The Unix socket an upgrade hands the listening sockets and the clients over on
    /// (mode 0600). Default: the pid file's path with `.upgrade.sock` in place of `.pid`.
    pub upgrade_socket: Option<PathBuf>,
    /// How long a new process gets to take the listening sockets and say it is ready
    /// before the upgrade is given up (the old process keeps serving).
    pub upgrade_timeout: Duration,
}

/// `server.worker_threads`: a count, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerThreads {
    /// One per core pgmux may use (`std::thread::available_parallelism`: the CPU
    /// affinity mask and the cgroup's CPU quota count).
    Auto,
    /// This many, at least 1.
    Count(usize),
}

impl WorkerThreads {
    /// The number of threads to run: `Auto` resolved for this process now.
    pub fn resolve(self) -> usize {
        match self {
            WorkerThreads::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
            WorkerThreads::Count(n) => n.max(1),
        }
    }
}

impl std::fmt::Display for WorkerThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerThreads::Auto => f.write_str("\"auto\""),
            WorkerThreads::Count(n) => write!(f, "{n}"),
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:6432".to_owned()],
            max_client_conn: 10_000,
            client_login_timeout: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            reuse_port: false,
            max_message_size: crate::protocol::codec::MAX_MESSAGE_LEN,
            partial_message_timeout: Duration::from_secs(30),
            park_idle_after: Duration::from_secs(5),
            statement_registry_size: 10_000,
            worker_threads: WorkerThreads::Count(1),
            pid_file: None,
            upgrade_socket: None,
            upgrade_timeout: Duration::from_secs(30),
        }
    }
}

/// `[admin]`: the HTTP admin port (metrics, health, views, reload) and logging knobs.
#[derive(Clone, PartialEq)]
pub struct AdminSection {
    /// `host:port` of the admin HTTP port; `None` = no admin port.
    pub listen: Option<String>,
    /// When set, every admin endpoint but `/health` and `/ready` needs
    /// `Authorization: Bearer <token>`. A secret: masked in `Debug` and [`Config::masked`].
    pub token: Option<String>,
    /// Lets `listen` be beyond loopback without `token` (a trusted network, or a proxy in
    /// front that authenticates). Off by default: such a config is refused at load.
    pub allow_no_token: bool,
    /// Log one line per client connect and disconnect (with duration and bytes).
    pub log_connections: bool,
    /// Log a warning when a client waited longer than this for a server; 0 = never.
    pub log_slow_waits: Duration,
    /// An admin connection that started a request gets this long to send its headers.
    pub header_timeout: Duration,
    /// An admin connection with no request being answered for this long is closed.
    pub idle_timeout: Duration,
    /// Admin connections open at once; more are answered 503 and closed at once.
    pub max_connections: usize,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: None,
            token: None,
            allow_no_token: false,
            log_connections: true,
            log_slow_waits: Duration::from_secs(1),
            header_timeout: Duration::from_secs(10),
            // Longer than Prometheus' default scrape interval (1 min): a scraper keeps its
            // connection between scrapes.
            idle_timeout: Duration::from_secs(75),
            max_connections: 64,
        }
    }
}

impl AdminSection {
    /// Whether an admin port on `listen` would answer anyone who reaches it: beyond
    /// loopback, no token, and not explicitly allowed. Such a config is refused at load;
    /// a reload checks it against the address bound at start, which it cannot change.
    pub fn unprotected_on(&self, listen: &str) -> bool {
        self.token.is_none() && !self.allow_no_token && !validate::is_loopback(listen)
    }
}

impl fmt::Debug for AdminSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSection")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| MASK))
            .field("allow_no_token", &self.allow_no_token)
            .field("log_connections", &self.log_connections)
            .field("log_slow_waits", &self.log_slow_waits)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// `[auth]`: how clients log in to pgmux.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthSection {
    /// The login method for users without their own `auth_method`.
    pub method: AuthMethod,
    /// A PgBouncer-style `"user" "secret"` file. After loading, relative paths are already
    /// resolved against the config file's directory (or the working directory for
    /// [`Config::parse`]).
    pub userlist_file: Option<PathBuf>,
    /// Users allowed on the admin console.
    pub admin_users: Vec<String>,
    /// Failed logins (password guesses) of one user from one address within
    /// `login_failure_window` that lock that user out from that address for
    /// `login_lockout`; 0 = no limit.
    pub max_login_failures: u32,
    /// Failed logins from one address across all user names within `login_failure_window`
    /// that lock the whole address out; `None` = 10 x `max_login_failures`, 0 = no limit.
    pub max_login_failures_per_address: Option<u32>,
    /// The span over which an address's failed logins are counted.
    pub login_failure_window: Duration,
    /// How long a locked-out address is refused.
    pub login_lockout: Duration,
    /// Access rules, evaluated in order before authentication (first match wins, no match
    /// rejects): the `[[auth.rules]]` tables, or the lines of `hba_file`. Empty = every
    /// client may try to log in (no rules configured).
    pub rules: Vec<AccessRule>,
    /// A pg_hba.conf-format file the rules are read from (resolved like `userlist_file`);
    /// read again at every reload.
    pub hba_file: Option<PathBuf>,
    /// Lets the `password` method (cleartext) run over plain TCP; off: it needs TLS.
    pub allow_cleartext_without_tls: bool,
    /// The role pgmux runs `auth_query` as, for users not listed in the config (PgBouncer's
    /// `auth_user`); `None` = no auth_query. Its password comes from `[users.NAME]`.
    /// A database's own `auth_user` overrides it.
    pub auth_user: Option<String>,
    /// The query that returns a user's name and secret (`pg_authid` form), with the user
    /// name as `$1` (extended protocol, never interpolated).
    pub auth_query: String,
    /// The database (a `[databases]` name) `auth_query` runs in; `None` = the one the
    /// client asked for.
    pub auth_dbname: Option<String>,
    /// How long a secret `auth_query` found is used without asking again.
    pub auth_cache_ttl: Duration,
    /// How long "no such user" is remembered, and the least time between two lookups of a
    /// user whose logins fail (a wrong password typed in a loop costs PostgreSQL one query
    /// per this interval at most).
    pub auth_negative_cache_ttl: Duration,
}

/// PgBouncer's default `auth_query`.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

/// Where and how the secret of a user not listed in the config is looked up, for one
/// database: `[auth]`'s `auth_*` keys with the database's own over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthQuery<'a> {
    /// The role the query runs as.
    pub user: &'a str,
    /// The query, with the user name as `$1`.
    pub query: &'a str,
    /// The `[databases]` name it runs in.
    pub database: &'a str,
}

pub use crate::auth::rules::AccessRule;

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            method: AuthMethod::default(),
            userlist_file: None,
            admin_users: Vec::new(),
            max_login_failures: 10,
            max_login_failures_per_address: None,
            login_failure_window: Duration::from_secs(60),
            login_lockout: Duration::from_secs(60),
            rules: Vec::new(),
            hba_file: None,
            allow_cleartext_without_tls: false,
            auth_user: None,
            auth_query: DEFAULT_AUTH_QUERY.to_owned(),
            auth_dbname: None,
            auth_cache_ttl: Duration::from_secs(60),
            auth_negative_cache_ttl: Duration::from_secs(5),
        }
    }
}

impl AuthSection {
    /// The address-wide limit in force: as set, or 10 x `max_login_failures`.
    pub fn max_login_failures_per_address(&self) -> u32 {
        let default = || self.max_login_failures.saturating_mul(10);
        self.max_login_failures_per_address.unwrap_or_else(default)
    }

    /// The failed-login limiter's settings.
    pub fn login_limits(&self) -> crate::auth::LimitSettings {
        crate::auth::LimitSettings {
            max_failures: self.max_login_failures,
            max_per_address: self.max_login_failures_per_address(),
            window: self.login_failure_window,
            lockout: self.login_lockout,
        }
    }
}

/// How a client proves its identity. TOML: `"scram-sha-256" | "md5" | "trust"`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum AuthMethod {
    /// SCRAM-SHA-256: works with plain and SCRAM secrets.
    #[default]
    ScramSha256,
    /// MD5: works with plain and `md5…` secrets, not with SCRAM verifiers.
    Md5,
    /// No password at all.
    Trust,
    /// The password in clear text (AuthenticationCleartextPassword), checked against any
    /// kind of secret. Only over TLS unless `auth.allow_cleartext_without_tls`.
    Password,
    /// A client certificate (checked against `tls.client_ca_file` in the TLS handshake)
    /// whose common name is the user name; no password.
    Cert,
}

impl AuthMethod {
    /// The spelling used in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScramSha256 => "scram-sha-256",
            Self::Md5 => "md5",
            Self::Trust => "trust",
            Self::Password => "password",
            Self::Cert => "cert",
        }
    }
}

/// What pgmux does when a client leaves session state on its server in transaction or
/// statement mode (a temporary table, an advisory lock, a holdable cursor, LISTEN, a
/// SQL-level prepared statement). TOML: `"pin" | "reset"`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum SessionStatePolicy {
    /// The client keeps that server until the state is gone or it disconnects.
    #[default]
    Pin,
    /// The state is discarded before the server goes back, and the client told so.
    Reset,
}

impl SessionStatePolicy {
    /// The spelling used in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pin => "pin",
            Self::Reset => "reset",
        }
    }
}

/// When a server connection goes back to the pool. TOML: `"session" | "transaction" | "statement"`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum PoolMode {
    /// When the client disconnects.
    Session,
    /// When a transaction ends.
    #[default]
    Transaction,
    /// After every statement; multi-statement transactions are refused.
    Statement,
}

impl PoolMode {
    /// The spelling used in the TOML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
            Self::Statement => "statement",
        }
    }
}

/// The settings of one pool: `[pool]`, then a database's overrides, then a user's mode.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSettings {
    /// When a server connection is returned to the pool.
    pub mode: PoolMode,
    /// Most server connections the pool opens; at least 1.
    pub size: u32,
    /// Server connections kept open even when idle; at most `size`.
    pub min_size: u32,
    /// How long a client waits for a server connection before it gets an error; above 0.
    pub wait_timeout: Duration,
    /// A client still waiting for a server after this long gets a NOTICE saying why
    /// (the wait's cause and its numbers), once per wait; 0 = never.
    pub wait_notice_after: Duration,
    /// Idle server connections are closed after this long; 0 = never.
    pub idle_timeout: Duration,
    /// Server connections are closed after this long (once idle); 0 = unlimited.
    pub max_lifetime: Duration,
    /// Time to connect and log in to the server; above 0.
    pub connect_timeout: Duration,
    /// A client idle inside a transaction this long is disconnected; 0 = disabled.
    pub idle_transaction_timeout: Duration,
    /// A server that sends nothing for this long while a client waits for its answer is
    /// cancelled and closed, and the client gets `08006`; 0 = disabled (PgBouncer's
    /// `query_timeout`; set it a little above the server's `statement_timeout`).
    pub query_timeout: Duration,
    /// Run before a session-mode server connection is reused; `""` = none.
    pub server_reset_query: String,
    /// Named prepared statements kept per server connection (least recently used are
    /// closed beyond it); 0 = do not track prepared statements (they pass through as sent).
    pub max_prepared_statements: u32,
    /// TCP options of the sockets to the server (`tcp_*` keys).
    pub tcp: TcpOptions,
    /// What to do with session state a client leaves on its server (transaction and
    /// statement mode).
    pub session_state: SessionStatePolicy,
    /// Verify the session state after every transaction, not only after a trigger:
    /// for applications whose own functions make state (`session_state_check = "always"`).
    pub verify_every_transaction: bool,
    /// Most servers that pinned clients may hold; `None` = half of `size`, rounded down.
    pub max_pinned: Option<u32>,
    /// A pinned client idle this long is disconnected; 0 = never.
    pub pinned_idle_timeout: Duration,
    /// TLS to the servers (`server_tls`, `server_ca_file`, `server_cert_file`,
    /// `server_key_file`).
    pub server_tls: ServerTlsSettings,
    /// Limits across pools (`max_db_*`, `max_user_*`; 0 = unlimited).
    pub limits: Limits,
}

/// Limits shared by several pools, under PgBouncer's names; 0 = unlimited. The `max_db_*`
/// ones come from `[pool]` and `[databases.NAME]`, the `max_user_*` ones from `[pool]` and
/// `[users.NAME]`. Counted across every pool of that database or user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Server connections open to a database, all its pools together.
    pub max_db_connections: u32,
    /// Server connections open for a user, all their pools together.
    pub max_user_connections: u32,
    /// Clients logged in to a database.
    pub max_db_client_connections: u32,
    /// Clients logged in as a user.
    pub max_user_client_connections: u32,
}

/// TCP options pgmux sets on its sockets to PostgreSQL, under PgBouncer's key names.
/// Keepalive probes find a server that vanished while its connection was quiet (idle in
/// the pool, or running a long query); the user timeout drops a connection whose sent
/// data stays unacknowledged. A zero leaves the system's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// `tcp_keepalive`: send keepalive probes on quiet connections.
    pub keepalive: bool,
    /// `tcp_keepidle`: quiet time before the first probe (whole seconds).
    pub keepidle: Duration,
    /// `tcp_keepintvl`: time between unanswered probes (whole seconds).
    pub keepintvl: Duration,
    /// `tcp_keepcnt`: unanswered probes after which the connection is dropped.
    pub keepcnt: u32,
    /// `tcp_user_timeout`: data sent and unacknowledged this long drops the connection.
    pub user_timeout: Duration,
}

impl Default for TcpOptions {
    /// Keepalive on, and a dead peer of a quiet connection noticed within two minutes
    /// (60 s + 6 x 10 s) instead of the system's two hours and more.
    fn default() -> Self {
        Self {
            keepalive: true,
            keepidle: Duration::from_secs(60),
            keepintvl: Duration::from_secs(10),
            keepcnt: 6,
            user_timeout: Duration::ZERO,
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            mode: PoolMode::Transaction,
            size: 20,
            min_size: 0,
            wait_timeout: Duration::from_secs(5),
            wait_notice_after: Duration::ZERO,
            idle_timeout: Duration::from_secs(10 * 60),
            max_lifetime: Duration::from_secs(60 * 60),
            connect_timeout: Duration::from_secs(5),
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            server_reset_query: "DISCARD ALL".to_owned(),
            max_prepared_statements: 200,
            tcp: TcpOptions::default(),
            session_state: SessionStatePolicy::Pin,
            verify_every_transaction: false,
            max_pinned: None,
            pinned_idle_timeout: Duration::from_secs(60),
            server_tls: ServerTlsSettings::default(),
            limits: Limits::default(),
        }
    }
}

impl PoolSettings {
    /// Replaces every setting that `overrides` sets.
    pub fn apply(&mut self, o: &PoolOverrides) {
        self.mode = o.mode.unwrap_or(self.mode);
        self.size = o.size.unwrap_or(self.size);
        self.min_size = o.min_size.unwrap_or(self.min_size);
        self.wait_timeout = o.wait_timeout.unwrap_or(self.wait_timeout);
        self.wait_notice_after = o.wait_notice_after.unwrap_or(self.wait_notice_after);
        self.idle_timeout = o.idle_timeout.unwrap_or(self.idle_timeout);
        self.max_lifetime = o.max_lifetime.unwrap_or(self.max_lifetime);
        self.connect_timeout = o.connect_timeout.unwrap_or(self.connect_timeout);
        self.idle_transaction_timeout = o
            .idle_transaction_timeout
            .unwrap_or(self.idle_transaction_timeout);
        self.query_timeout = o.query_timeout.unwrap_or(self.query_timeout);
        if let Some(query) = &o.server_reset_query {
            self.server_reset_query.clone_from(query);
        }
        self.max_prepared_statements = o
            .max_prepared_statements
            .unwrap_or(self.max_prepared_statements);
        let tcp = &mut self.tcp;
        tcp.keepalive = o.tcp_keepalive.unwrap_or(tcp.keepalive);
        tcp.keepidle = o.tcp_keepidle.unwrap_or(tcp.keepidle);
        tcp.keepintvl = o.tcp_keepintvl.unwrap_or(tcp.keepintvl);
        tcp.keepcnt = o.tcp_keepcnt.unwrap_or(tcp.keepcnt);
        tcp.user_timeout = o.tcp_user_timeout.unwrap_or(tcp.user_timeout);
        self.session_state = o.session_state.unwrap_or(self.session_state);
        self.verify_every_transaction = o
            .verify_every_transaction
            .unwrap_or(self.verify_every_transaction);
        if o.max_pinned.is_some() {
            self.max_pinned = o.max_pinned;
        }
        self.pinned_idle_timeout = o.pinned_idle_timeout.unwrap_or(self.pinned_idle_timeout);
        self.server_tls.apply(o);
        let limits = &mut self.limits;
        limits.max_db_connections = o.max_db_connections.unwrap_or(limits.max_db_connections);
        limits.max_db_client_connections = o
            .max_db_client_connections
            .unwrap_or(limits.max_db_client_connections);
        limits.max_user_connections = o
            .max_user_connections
            .unwrap_or(limits.max_user_connections);
        limits.max_user_client_connections = o
            .max_user_client_connections
            .unwrap_or(limits.max_user_client_connections);
    }

    /// How many servers pinned clients may hold: `max_pinned`, or half the pool.
    pub fn pinned_limit(&self) -> u32 {
        self.max_pinned.unwrap_or(self.size / 2)
    }
}

/// Per-database pool settings, written as plain keys in `[databases.NAME]`; `None` = inherit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolOverrides {
    /// See [`PoolSettings::mode`].
    pub mode: Option<PoolMode>,
    /// See [`PoolSettings::size`].
    pub size: Option<u32>,
    /// See [`PoolSettings::min_size`].
    pub min_size: Option<u32>,
    /// See [`PoolSettings::wait_timeout`].
    pub wait_timeout: Option<Duration>,
    /// See [`PoolSettings::wait_notice_after`].
    pub wait_notice_after: Option<Duration>,
    /// See [`PoolSettings::idle_timeout`].
    pub idle_timeout: Option<Duration>,
    /// See [`PoolSettings::max_lifetime`].
    pub max_lifetime: Option<Duration>,
    /// See [`PoolSettings::connect_timeout`].
    pub connect_timeout: Option<Duration>,
    /// See [`PoolSettings::idle_transaction_timeout`].
    pub idle_transaction_timeout: Option<Duration>,
    /// See [`PoolSettings::query_timeout`].
    pub query_timeout: Option<Duration>,
    /// See [`PoolSettings::server_reset_query`].
    pub server_reset_query: Option<String>,
    /// See [`PoolSettings::max_prepared_statements`].
    pub max_prepared_statements: Option<u32>,
    /// See [`TcpOptions::keepalive`].
    pub tcp_keepalive: Option<bool>,
    /// See [`TcpOptions::keepidle`].
    pub tcp_keepidle: Option<Duration>,
    /// See [`TcpOptions::keepintvl`].
    pub tcp_keepintvl: Option<Duration>,
    /// See [`TcpOptions::keepcnt`].
    pub tcp_keepcnt: Option<u32>,
    /// See [`TcpOptions::user_timeout`].
    pub tcp_user_timeout: Option<Duration>,
    /// See [`PoolSettings::session_state`].
    pub session_state: Option<SessionStatePolicy>,
    /// See [`PoolSettings::verify_every_transaction`] (`session_state_check`).
    pub verify_every_transaction: Option<bool>,
    /// See [`PoolSettings::max_pinned`].
    pub max_pinned: Option<u32>,
    /// See [`PoolSettings::pinned_idle_timeout`].
    pub pinned_idle_timeout: Option<Duration>,
    /// See [`ServerTlsSettings::mode`].
    pub server_tls: Option<ServerTlsMode>,
    /// See [`ServerTlsSettings::ca_file`].
    pub server_ca_file: Option<PemFile>,
    /// See [`ServerTlsSettings::cert_file`].
    pub server_cert_file: Option<PemFile>,
    /// See [`ServerTlsSettings::key_file`].
    pub server_key_file: Option<PemFile>,
    /// See [`Limits::max_db_connections`] (`[pool]` and databases).
    pub max_db_connections: Option<u32>,
    /// See [`Limits::max_db_client_connections`] (`[pool]` and databases).
    pub max_db_client_connections: Option<u32>,
    /// See [`Limits::max_user_connections`] (`[pool]` only; users have their own key).
    pub max_user_connections: Option<u32>,
    /// See [`Limits::max_user_client_connections`] (`[pool]` only).
    pub max_user_client_connections: Option<u32>,
}

/// `[databases.NAME]`: where the database a client asks for by `NAME` lives.
#[derive(Clone, PartialEq)]
pub struct Database {
    /// Server host name or address.
    pub host: String,
    /// Server port; never 0.
    pub port: u16,
    /// The real database name; `None` = the `[databases.NAME]` key.
    pub dbname: Option<String>,
    /// Connect to the server as this user instead of the client's user.
    pub user: Option<String>,
    /// Plain-text password for `user`. A secret: masked in `Debug` and [`Config::masked`].
    pub password: Option<String>,
    /// This database's `auth_user`, over `[auth]`'s.
    pub auth_user: Option<String>,
    /// This database's `auth_query`, over `[auth]`'s.
    pub auth_query: Option<String>,
    /// This database's `auth_dbname`, over `[auth]`'s.
    pub auth_dbname: Option<String>,
    /// This database's pool settings, over `[pool]`.
    pub overrides: PoolOverrides,
}

impl Default for Database {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 5432,
            dbname: None,
            user: None,
            password: None,
            auth_user: None,
            auth_query: None,
            auth_dbname: None,
            overrides: PoolOverrides::default(),
        }
    }
}

impl Database {
    /// The database name to send to the server for the client-facing name `key`.
    pub fn upstream_dbname<'a>(&'a self, key: &'a str) -> &'a str {
        self.dbname.as_deref().unwrap_or(key)
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| MASK))
            .field("auth_user", &self.auth_user)
            .field("auth_query", &self.auth_query)
            .field("auth_dbname", &self.auth_dbname)
            .field("overrides", &self.overrides)
            .finish()
    }
}

/// `[users.NAME]` or a userlist entry: one user's secret and overrides.
#[derive(Clone, Default, PartialEq)]
pub struct User {
    /// Plain text, `md5<32 hex>` or `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    /// A secret: masked in `Debug` and [`Config::masked`].
    pub password: Option<String>,
    /// Plain password pgmux sends upstream when `password` is a hash. A secret.
    pub server_password: Option<String>,
    /// This user's login method instead of `auth.method`.
    pub auth_method: Option<AuthMethod>,
    /// This user's pool mode, over the database's and `[pool]`'s.
    pub mode: Option<PoolMode>,
    /// This user's pool size (for each of their pools), over the database's and `[pool]`'s.
    pub size: Option<u32>,
    /// This user's wait_timeout, over the database's and `[pool]`'s.
    pub wait_timeout: Option<Duration>,
    /// Server connections across this user's pools, over `[pool] max_user_connections`.
    pub max_user_connections: Option<u32>,
    /// Clients logged in as this user, over `[pool] max_user_client_connections`.
    pub max_user_client_connections: Option<u32>,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("password", &self.password.as_ref().map(|_| MASK))
            .field(
                "server_password",
                &self.server_password.as_ref().map(|_| MASK),
            )
            .field("auth_method", &self.auth_method)
            .field("mode", &self.mode)
            .field("size", &self.size)
            .field("wait_timeout", &self.wait_timeout)
            .field("max_user_connections", &self.max_user_connections)
            .field(
                "max_user_client_connections",
                &self.max_user_client_connections,
            )
            .finish()
    }
}

/// What every secret is replaced with in `Debug` output and [`Config::masked`].
pub const MASK: &str = "********";

impl Config {
    /// Reads `path`, substitutes `${VAR}` from the environment, parses, loads the userlist
    /// (relative to the file's directory) and validates. Warnings go to `tracing`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![Problem::general(&origin, "", format!("cannot read: {e}"))],
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        load::build(&text, &origin, base, &env_var)
    }

    /// Like [`Config::load`] from a string; `origin` names it in messages and a relative
    /// `auth.userlist_file` is taken relative to the working directory.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        load::build(text, origin, Path::new(""), &env_var)
    }

    /// Like [`Config::parse`], with `${VAR}` looked up by `env` instead of the process
    /// environment (for tests, or a caller with its own variables).
    pub fn parse_with_env(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        load::build(text, origin, Path::new(""), env)
    }

    /// The settings of the pool for `database` and `user`: `[pool]`, then the database's
    /// overrides, then the user's `mode`, `size`, `wait_timeout` and `max_user_*` limits.
    /// `None` if the database is not configured.
    pub fn pool_settings(&self, database: &str, user: &str) -> Option<PoolSettings> {
        let db = self.databases.get(database)?;
        let mut settings = self.pool.clone();
        settings.apply(&db.overrides);
        if let Some(u) = self.users.get(user) {
            settings.mode = u.mode.unwrap_or(settings.mode);
            settings.size = u.size.unwrap_or(settings.size);
            settings.wait_timeout = u.wait_timeout.unwrap_or(settings.wait_timeout);
            let limits = &mut settings.limits;
            limits.max_user_connections = u
                .max_user_connections
                .unwrap_or(limits.max_user_connections);
            limits.max_user_client_connections = u
                .max_user_client_connections
                .unwrap_or(limits.max_user_client_connections);
        }
        Some(settings)
    }

    /// How users of `database` that the config does not list are looked up: `None` when
    /// neither the database nor `[auth]` sets `auth_user`, or the database is unknown.
    pub fn auth_query_for<'a>(&'a self, database: &'a str) -> Option<AuthQuery<'a>> {
        let db = self.databases.get(database)?;
        let user = db.auth_user.as_deref().or(self.auth.auth_user.as_deref())?;
        Some(AuthQuery {
            user,
            query: db.auth_query.as_deref().unwrap_or(&self.auth.auth_query),
            database: db
                .auth_dbname
                .as_deref()
                .or(self.auth.auth_dbname.as_deref())
                .unwrap_or(database),
        })
    }

    /// The login method for `user`: their own `auth_method`, else `auth.method`.
    pub fn auth_method_for(&self, user: &str) -> AuthMethod {
        self.users
            .get(user)
            .and_then(|u| u.auth_method)
            .unwrap_or(self.auth.method)
    }

    /// Checks a config changed in memory (the console's `SET`) with the rules a file
    /// load applies, and returns it; `origin` names it in the problems.
    pub fn checked(self, origin: &str) -> Result<Config, ConfigError> {
        load::check(self, origin)
    }

    /// The effective configuration (defaults filled in) as TOML that [`Config::parse`]
    /// accepts again, with every password replaced by [`MASK`]. What `pgmux check` prints.
    pub fn masked(&self) -> String {
        masked::render(self)
    }
}

/// The `(user, secret, line)` entries of a userlist file's text (`auth.userlist_file`) and its
/// problems, `origin` naming it in them. For the fuzz targets and tests; loading a config
/// merges the userlist itself.
pub(crate) fn parse_userlist(
    text: &str,
    origin: &str,
) -> (Vec<(String, String, usize)>, Vec<Problem>) {
    let (entries, problems) = userlist::parse(text, origin);
    let entries = entries
        .into_iter()
        .map(|e| (e.name, e.secret, e.place.line))
        .collect();
    (entries, problems)
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Every problem found in a configuration, each with where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    /// In file order for one file; never empty.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// One problem: `{origin}:{line}:{column}: {key}: {message}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file (or the `origin` given to [`Config::parse`]) the problem is in.
    pub origin: String,
    /// The key path, e.g. `pool.wait_timeout` or `databases.app.size`; empty if none applies.
    pub key: String,
    /// 1-based line in `origin`, if the problem has a place.
    pub line: Option<usize>,
    /// 1-based column (in characters) in `origin`, if the problem has a place.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// A problem with no place in a file, such as an I/O error.
    pub fn general(origin: &str, key: &str, message: impl Into<String>) -> Self {
        Self {
            origin: origin.to_owned(),
            key: key.to_owned(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.origin)?;
        if let Some(line) = self.line {
            write!(f, "{line}:")?;
            if let Some(column) = self.column {
                write!(f, "{column}:")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, " {}:", self.key)?;
        }
        write!(f, " {}", self.message)
    }
}
