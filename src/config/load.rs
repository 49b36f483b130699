//! Walks the spanned TOML document into a [`Config`], checking every key.
//!
//! serde would stop at the first bad key; walking the document by hand lets one run report
//! every unknown key and bad value, each at its line and column.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::env::{self, OffsetMap};
use super::report::{Place, Places, Report, join_key};
use super::{
    AdminSection, AuthMethod, AuthSection, Config, ConfigError, Database, PemFile, PoolMode,
    PoolOverrides, Problem, ServerSection, SessionStatePolicy, User, client_tls, server_tls,
    userlist, validate,
};

/// Parses `text` (named `origin`), resolving a relative `auth.userlist_file` against `base`.
/// Warnings go to `tracing`.
pub(super) fn build(
    text: &str,
    origin: &str,
    base: &Path,
    env_var: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let (result, warnings) = analyze(text, origin, base, env_var);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    result
}

/// [`build`], returning the warnings instead of logging them.
pub(super) fn analyze(
    text: &str,
    origin: &str,
    base: &Path,
    env_var: &dyn Fn(&str) -> Option<String>,
) -> (Result<Config, ConfigError>, Vec<Problem>) {
    let substituted = env::substitute(text, env_var);
    let source = Source {
        origin,
        text,
        map: substituted.map,
    };
    let mut report = Report::new(origin);
    for p in substituted.problems {
        report.primary(source.place_original(p.offset).problem(&p.key, p.message));
    }
    let (doc, errors) = DeTable::parse_recoverable(&substituted.text);
    for e in errors {
        let problem = match e.span() {
            Some(span) => source.place(span.start).problem("", e.message()),
            None => Problem::general(origin, "", e.message()),
        };
        report.primary(problem);
    }

    let mut walker = Walker {
        source: &source,
        report: &mut report,
        places: Places::new(),
    };
    let mut config = walker.root(doc.get_ref());
    let mut places = walker.places;

    userlist::merge(&mut config, base, &mut places, &mut report);
    super::access::merge_hba(&mut config, base, &places, &mut report);
    server_tls::load_files(&mut config, base, &places, &mut report);
    client_tls::load_files(&mut config.tls, base, &places, &mut report);
    validate::normalize(&mut config);
    let warnings = validate::check(&config, &places, &mut report);
    server_tls::check(&config, &places, &mut report);
    client_tls::check(&config.tls, &places, &mut report);
    (report.finish(config), warnings)
}

/// Checks a config edited in memory (the console's `SET`) with the rules a load applies;
/// `origin` names it in the problems. Files are not read again.
pub(super) fn check(config: Config, origin: &str) -> Result<Config, ConfigError> {
    let mut report = Report::new(origin);
    let places = Places::new();
    let _warnings = validate::check(&config, &places, &mut report);
    server_tls::check(&config, &places, &mut report);
    client_tls::check(&config.tls, &places, &mut report);
    report.finish(config)
}

/// The file as written, and how the parsed (substituted) text maps back to it.
pub(super) struct Source<'a> {
    origin: &'a str,
    text: &'a str,
    map: OffsetMap,
}

impl Source<'_> {
    /// The place of an offset in the parsed text.
    pub fn place(&self, parsed: usize) -> Place {
        self.place_original(self.map.to_original(parsed))
    }

    fn place_original(&self, offset: usize) -> Place {
        Place::in_text(self.origin, self.text, offset)
    }
}

const SECTIONS: &[&str] = &[
    "server",
    "auth",
    "admin",
    "tls",
    "pool",
    "databases",
    "users",
];
const SERVER_KEYS: &[&str] = &[
    "listen",
    "max_client_conn",
    "client_login_timeout",
    "shutdown_timeout",
    "drain_delay",
    "reuse_port",
    "max_message_size",
    "partial_message_timeout",
    "park_idle_after",
    "statement_registry_size",
    "worker_threads",
    "pid_file",
    "upgrade_socket",
    "upgrade_timeout",
];
const AUTH_KEYS: &[&str] = &[
    "method",
    "userlist_file",
    "admin_users",
    "max_login_failures",
    "max_login_failures_per_address",
    "login_failure_window",
    "login_lockout",
    "rules",
    "hba_file",
    "allow_cleartext_without_tls",
    "auth_user",
    "auth_query",
    "auth_dbname",
    "auth_cache_ttl",
    "auth_negative_cache_ttl",
];
const ADMIN_KEYS: &[&str] = &[
    "listen",
    "token",
    "allow_no_token",
    "log_connections",
    "log_slow_waits",
    "header_timeout",
    "idle_timeout",
    "max_connections",
];
/// The keys of `[pool]`, also accepted in `[databases.NAME]`.
pub(super) const POOL_KEYS: &[&str] = &[
    "mode",
    "size",
    "min_size",
    "wait_timeout",
    "wait_notice_after",
    "idle_timeout",
    "max_lifetime",
    "connect_timeout",
    "idle_transaction_timeout",
    "query_timeout",
    "server_reset_query",
    "max_prepared_statements",
    "tcp_keepalive",
    "tcp_keepidle",
    "tcp_keepintvl",
    "tcp_keepcnt",
    "tcp_user_timeout",
    "session_state",
    "session_state_check",
    "max_pinned",
    "pinned_idle_timeout",
    "server_tls",
    "server_ca_file",
    "server_cert_file",
    "server_key_file",
    "max_db_connections",
    "max_db_client_connections",
];
/// Keys of `[pool]` only: defaults for `[users.NAME]`.
const POOL_ONLY_KEYS: &[&str] = &["max_user_connections", "max_user_client_connections"];
const DATABASE_KEYS: &[&str] = &[
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "auth_user",
    "auth_query",
    "auth_dbname",
];
const USER_KEYS: &[&str] = &[
    "password",
    "server_password",
    "auth_method",
    "mode",
    "size",
    "wait_timeout",
    "max_user_connections",
    "max_user_client_connections",
];
const AUTH_METHODS: &[(&str, AuthMethod)] = &[
    ("scram-sha-256", AuthMethod::ScramSha256),
    ("md5", AuthMethod::Md5),
    ("trust", AuthMethod::Trust),
    ("password", AuthMethod::Password),
    ("cert", AuthMethod::Cert),
];
const SESSION_STATE_POLICIES: &[(&str, SessionStatePolicy)] = &[
    ("pin", SessionStatePolicy::Pin),
    ("reset", SessionStatePolicy::Reset),
];
/// `session_state_check`: whether every transaction is verified.
const SESSION_STATE_CHECKS: &[(&str, bool)] = &[("triggers", false), ("always", true)];
const POOL_MODES: &[(&str, PoolMode)] = &[
    ("session", PoolMode::Session),
    ("transaction", PoolMode::Transaction),
    ("statement", PoolMode::Statement),
];

/// A value with its span in the parsed text.
pub(super) type Value<'i> = Spanned<DeValue<'i>>;
/// A key with its span in the parsed text.
pub(super) type Key<'i> = Spanned<Cow<'i, str>>;

/// Turns the document into a [`Config`], reporting into `report` as it goes.
pub(super) struct Walker<'a> {
    pub source: &'a Source<'a>,
    pub report: &'a mut Report,
    pub places: Places,
}

impl Walker<'_> {
    fn root(&mut self, doc: &DeTable<'_>) -> Config {
        let mut config = Config::default();
        for (key, value) in doc {
            let name = key.get_ref().as_ref();
            let Some(table) = self.section(name, key, value, SECTIONS) else {
                continue;
            };
            match name {
                "server" => self.server(table, &mut config.server),
                "auth" => self.auth(table, &mut config.auth),
                "admin" => self.admin(table, &mut config.admin),
                "tls" => self.tls(table, &mut config.tls),
                "pool" => {
                    let mut overrides = PoolOverrides::default();
                    for (key, value) in table {
                        if !self.pool_key("pool", key, value, &mut overrides)
                            && !self.user_default_key(key, value, &mut overrides)
                        {
                            let known: Vec<&str> =
                                POOL_KEYS.iter().chain(POOL_ONLY_KEYS).copied().collect();
                            self.unknown("pool", key, &known);
                        }
                    }
                    config.pool.apply(&overrides);
                }
                "databases" => {
                    for (key, value) in table {
                        let path = join_key("databases", key.get_ref());
                        if let Some(t) = self.named_table(&path, key, value) {
                            let db = self.database(&path, t);
                            config.databases.insert(key.get_ref().to_string(), db);
                        }
                    }
                }
                _ => {
                    for (key, value) in table {
                        let path = join_key("users", key.get_ref());
                        if let Some(t) = self.named_table(&path, key, value) {
                            let user = self.user(&path, t);
                            config.users.insert(key.get_ref().to_string(), user);
                        }
                    }
                }
            }
        }
        config
    }

    /// A known top-level section as a table; reports an unknown one or a non-table.
    fn section<'v, 'i>(
        &mut self,
        name: &str,
        key: &Key<'i>,
        value: &'v Value<'i>,
        known: &[&str],
    ) -> Option<&'v DeTable<'i>> {
        if !known.contains(&name) {
            self.unknown("", key, known);
            return None;
        }
        self.table(name, value)
    }

    /// `[databases.NAME]` or `[users.NAME]`: a table with a non-empty name.
    fn named_table<'v, 'i>(
        &mut self,
        path: &str,
        key: &Key<'i>,
        value: &'v Value<'i>,
    ) -> Option<&'v DeTable<'i>> {
        self.mark(path, key.span());
        if key.get_ref().is_empty() {
            self.problem(path, key.span(), "the name must not be empty");
        }
        self.table(path, value)
    }

    fn server(&mut self, table: &DeTable<'_>, server: &mut ServerSection) {
        for (key, value) in table {
            let path = join_key("server", key.get_ref());
            match key.get_ref().as_ref() {
                "listen" => set(&mut server.listen, self.listen(&path, value)),
                "max_client_conn" => {
                    let n = self.unsigned(&path, value, u64::MAX);
                    set(
                        &mut server.max_client_conn,
                        n.and_then(|n| n.try_into().ok()),
                    );
                }
                "client_login_timeout" => {
                    let d = self.duration(&path, value);
                    set(&mut server.client_login_timeout, d);
                }
                "shutdown_timeout" => {
                    let d = self.duration(&path, value);
                    set(&mut server.shutdown_timeout, d);
                }
                "drain_delay" => {
                    let d = self.duration(&path, value);
                    set(&mut server.drain_delay, d);
                }
                "reuse_port" => set(&mut server.reuse_port, self.boolean(&path, value)),
                "max_message_size" => {
                    let max = crate::protocol::codec::MAX_MESSAGE_LEN as u64;
                    let n = self.unsigned(&path, value, max);
                    let n = n.and_then(|n| match n {
                        0..1024 => {
                            self.problem(&path, value.span(), "must be at least 1024 bytes");
                            None
                        }
                        n => n.try_into().ok(),
                    });
                    set(&mut server.max_message_size, n);
                }
                "partial_message_timeout" => {
                    let d = self.duration(&path, value);
                    set(&mut server.partial_message_timeout, d);
                }
                "park_idle_after" => {
                    let d = self.duration(&path, value);
                    set(&mut server.park_idle_after, d);
                }
                "statement_registry_size" => {
                    let n = self.unsigned(&path, value, u32::MAX.into());
                    set(
                        &mut server.statement_registry_size,
                        n.and_then(|n| n.try_into().ok()),
                    );
                }
                "worker_threads" => {
                    let n = self.worker_threads(&path, value);
                    set(&mut server.worker_threads, n);
                }
                "pid_file" => server.pid_file = self.string(&path, value).map(PathBuf::from),
                "upgrade_socket" => {
                    server.upgrade_socket = self.string(&path, value).map(PathBuf::from);
                }
                "upgrade_timeout" => {
                    let d = self.duration(&path, value);
                    set(&mut server.upgrade_timeout, d);
                }
                _ => self.unknown("server", key, SERVER_KEYS),
            }
        }
    }

    fn auth(&mut self, table: &DeTable<'_>, auth: &mut AuthSection) {
        for (key, value) in table {
            let path = join_key("auth", key.get_ref());
            match key.get_ref().as_ref() {
                "method" => set(&mut auth.method, self.choice(&path, value, AUTH_METHODS)),
                "userlist_file" => {
                    auth.userlist_file = self.string(&path, value).map(PathBuf::from);
                }
                "admin_users" => set(&mut auth.admin_users, self.strings(&path, value)),
                "max_login_failures" => {
                    let n = self.unsigned(&path, value, u32::MAX.into());
                    set(
                        &mut auth.max_login_failures,
                        n.and_then(|n| n.try_into().ok()),
                    );
                }
                "max_login_failures_per_address" => {
                    let n = self.unsigned(&path, value, u32::MAX.into());
                    let n = n.and_then(|n| u32::try_from(n).ok()).map(Some);
                    set(&mut auth.max_login_failures_per_address, n);
                }
                "login_failure_window" => {
                    set(&mut auth.login_failure_window, self.duration(&path, value));
                }
                "login_lockout" => set(&mut auth.login_lockout, self.duration(&path, value)),
                "rules" => auth.rules = self.access_rules(&path, value),
                "hba_file" => auth.hba_file = self.string(&path, value).map(PathBuf::from),
                "allow_cleartext_without_tls" => set(
                    &mut auth.allow_cleartext_without_tls,
                    self.boolean(&path, value),
                ),
                "auth_user" => auth.auth_user = self.string(&path, value),
                "auth_query" => set(&mut auth.auth_query, self.string(&path, value)),
                "auth_dbname" => auth.auth_dbname = self.string(&path, value),
                "auth_cache_ttl" => set(&mut auth.auth_cache_ttl, self.duration(&path, value)),
                "auth_negative_cache_ttl" => {
                    let d = self.duration(&path, value);
                    set(&mut auth.auth_negative_cache_ttl, d);
                }
                _ => self.unknown("auth", key, AUTH_KEYS),
            }
        }
    }

    fn admin(&mut self, table: &DeTable<'_>, admin: &mut AdminSection) {
        for (key, value) in table {
            let path = join_key("admin", key.get_ref());
            match key.get_ref().as_ref() {
                "listen" => admin.listen = self.string(&path, value),
                "token" => admin.token = self.string(&path, value),
                "allow_no_token" => set(&mut admin.allow_no_token, self.boolean(&path, value)),
                "log_connections" => {
                    set(&mut admin.log_connections, self.boolean(&path, value));
                }
                "log_slow_waits" => set(&mut admin.log_slow_waits, self.duration(&path, value)),
                "header_timeout" => set(&mut admin.header_timeout, self.duration(&path, value)),
                "idle_timeout" => set(&mut admin.idle_timeout, self.duration(&path, value)),
                "max_connections" => {
                    let n = self.unsigned(&path, value, u32::MAX.into());
                    set(
                        &mut admin.max_connections,
                        n.and_then(|n| n.try_into().ok()),
                    );
                }
                _ => self.unknown("admin", key, ADMIN_KEYS),
            }
        }
    }

    fn database(&mut self, path: &str, table: &DeTable<'_>) -> Database {
        let mut db = Database::default();
        for (key, value) in table {
            let p = join_key(path, key.get_ref());
            match key.get_ref().as_ref() {
                "host" => set(&mut db.host, self.string(&p, value)),
                "port" => {
                    let port = self.unsigned(&p, value, u16::MAX.into());
                    set(&mut db.port, port.and_then(|n| n.try_into().ok()));
                }
                "dbname" => db.dbname = self.string(&p, value),
                "user" => db.user = self.string(&p, value),
                "password" => db.password = self.string(&p, value),
                "auth_user" => db.auth_user = self.string(&p, value),
                "auth_query" => db.auth_query = self.string(&p, value),
                "auth_dbname" => db.auth_dbname = self.string(&p, value),
                _ => {
                    if !self.pool_key(path, key, value, &mut db.overrides) {
                        let known: Vec<&str> =
                            DATABASE_KEYS.iter().chain(POOL_KEYS).copied().collect();
                        self.unknown(path, key, &known);
                    }
                }
            }
        }
        db
    }

    fn user(&mut self, path: &str, table: &DeTable<'_>) -> User {
        let mut user = User::default();
        for (key, value) in table {
            let p = join_key(path, key.get_ref());
            match key.get_ref().as_ref() {
                "password" => user.password = self.string(&p, value),
                "server_password" => user.server_password = self.string(&p, value),
                "auth_method" => user.auth_method = self.choice(&p, value, AUTH_METHODS),
                "mode" => user.mode = self.choice(&p, value, POOL_MODES),
                "size" => user.size = as_u32(self.unsigned(&p, value, u32::MAX.into())),
                "wait_timeout" => user.wait_timeout = self.duration(&p, value),
                "max_user_connections" => {
                    user.max_user_connections = as_u32(self.unsigned(&p, value, u32::MAX.into()));
                }
                "max_user_client_connections" => {
                    user.max_user_client_connections =
                        as_u32(self.unsigned(&p, value, u32::MAX.into()));
                }
                _ => self.unknown(path, key, USER_KEYS),
            }
        }
        user
    }

    /// Reads `key` into `o` if it is a pool setting; false if it is not one.
    fn pool_key(
        &mut self,
        path: &str,
        key: &Key<'_>,
        value: &Value<'_>,
        o: &mut PoolOverrides,
    ) -> bool {
        let p = join_key(path, key.get_ref());
        let u32_max = u32::MAX.into();
        let as_u32 = |n: Option<u64>| n.and_then(|n| u32::try_from(n).ok());
        match key.get_ref().as_ref() {
            "mode" => o.mode = self.choice(&p, value, POOL_MODES),
            "size" => o.size = as_u32(self.unsigned(&p, value, u32_max)),
            "min_size" => o.min_size = as_u32(self.unsigned(&p, value, u32_max)),
            "wait_timeout" => o.wait_timeout = self.duration(&p, value),
            "wait_notice_after" => o.wait_notice_after = self.duration(&p, value),
            "idle_timeout" => o.idle_timeout = self.duration(&p, value),
            "max_lifetime" => o.max_lifetime = self.duration(&p, value),
            "connect_timeout" => o.connect_timeout = self.duration(&p, value),
            "idle_transaction_timeout" => o.idle_transaction_timeout = self.duration(&p, value),
            "query_timeout" => o.query_timeout = self.duration(&p, value),
            "server_reset_query" => o.server_reset_query = self.string(&p, value),
            "max_prepared_statements" => {
                o.max_prepared_statements = as_u32(self.unsigned(&p, value, u32_max))
            }
            "tcp_keepalive" => o.tcp_keepalive = self.boolean(&p, value),
            "tcp_keepidle" => o.tcp_keepidle = self.duration(&p, value),
            "tcp_keepintvl" => o.tcp_keepintvl = self.duration(&p, value),
            // The kernel's limit (MAX_TCP_KEEPCNT).
            "tcp_keepcnt" => o.tcp_keepcnt = as_u32(self.unsigned(&p, value, 127)),
            "tcp_user_timeout" => o.tcp_user_timeout = self.duration(&p, value),
            "session_state" => o.session_state = self.choice(&p, value, SESSION_STATE_POLICIES),
            "session_state_check" => {
                o.verify_every_transaction = self.choice(&p, value, SESSION_STATE_CHECKS)
            }
            "max_pinned" => o.max_pinned = as_u32(self.unsigned(&p, value, u32_max)),
            "pinned_idle_timeout" => o.pinned_idle_timeout = self.duration(&p, value),
            "server_tls" => o.server_tls = self.choice(&p, value, server_tls::SERVER_TLS_MODES),
            "server_ca_file" => {
                o.server_ca_file = self.string(&p, value).map(|f| PemFile::named(&f))
            }
            "server_cert_file" => {
                o.server_cert_file = self.string(&p, value).map(|f| PemFile::named(&f))
            }
            "server_key_file" => {
                o.server_key_file = self.string(&p, value).map(|f| PemFile::named(&f))
            }
            "max_db_connections" => {
                o.max_db_connections = as_u32(self.unsigned(&p, value, u32_max))
            }
            "max_db_client_connections" => {
                o.max_db_client_connections = as_u32(self.unsigned(&p, value, u32_max))
            }
            _ => return false,
        }
        true
    }

    /// Reads a `[pool]`-only key (a default of `[users.NAME]`) into `o`; false if it is not one.
    fn user_default_key(
        &mut self,
        key: &Key<'_>,
        value: &Value<'_>,
        o: &mut PoolOverrides,
    ) -> bool {
        let p = join_key("pool", key.get_ref());
        let n = match key.get_ref().as_ref() {
            "max_user_connections" | "max_user_client_connections" => {
                as_u32(self.unsigned(&p, value, u32::MAX.into()))
            }
            _ => return false,
        };
        match key.get_ref().as_ref() {
            "max_user_connections" => o.max_user_connections = n,
            _ => o.max_user_client_connections = n,
        }
        true
    }
}

/// A number read as u64 that fits a u32.
fn as_u32(n: Option<u64>) -> Option<u32> {
    n.and_then(|n| u32::try_from(n).ok())
}

/// Overwrites `target` if the value was read.
fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *target = v;
    }
}
