//! Checks across keys: refuses nonsense, warns about risky values.
//!
//! Runs on the parsed [`Config`]; problems are placed at the key they concern through the
//! [`Places`] the walker recorded.

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::report::{Places, Report, join_key};
use super::{AuthMethod, Config, PoolMode, PoolOverrides, PoolSettings, Problem};
use crate::auth::rules::RuleMethod;

/// PostgreSQL's default `max_connections`; a bigger pool is likely to be refused upstream.
const UPSTREAM_DEFAULT_MAX_CONNECTIONS: u32 = 100;

/// Why an empty password is refused (in `[users]`, a userlist file, or a `${VAR}` that is
/// set but empty): PostgreSQL never accepts one, and PgBouncer refuses it too.
const EMPTY_PASSWORD: &str = "must not be empty: PostgreSQL and PgBouncer refuse empty \
     passwords (a ${VAR} that is set but empty counts); set a password, or remove the key";

/// The kinds of secret a user's `password` can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// The password itself.
    Plain,
    /// `md5` followed by 32 hex digits: md5(password || user).
    Md5,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as in `pg_authid`.
    Scram,
}

impl SecretKind {
    /// What kind of secret `secret` is, or why it is a malformed SCRAM verifier.
    pub fn of(secret: &str) -> Result<SecretKind, String> {
        if let Some(verifier) = secret.strip_prefix("SCRAM-SHA-256$") {
            return check_scram(verifier).map(|()| SecretKind::Scram);
        }
        // Like the auth module: `md5` + 32 characters is meant as a hash, so non-hex is a typo.
        if let Some(hex) = secret.strip_prefix("md5")
            && hex.len() == 32
        {
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("\"md5\" followed by 32 characters must be an md5 hash, \
                            but they are not hex digits"
                    .to_owned());
            }
            return Ok(SecretKind::Md5);
        }
        Ok(SecretKind::Plain)
    }
}

fn check_scram(verifier: &str) -> Result<(), String> {
    const SHAPE: &str = "malformed SCRAM verifier: expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>";
    let shape = || SHAPE.to_owned();
    let (params, keys) = verifier.split_once('$').ok_or_else(shape)?;
    let (iterations, salt) = params.split_once(':').ok_or_else(shape)?;
    let (stored, server) = keys.split_once(':').ok_or_else(shape)?;
    match iterations.parse::<u32>() {
        Ok(n) if n > 0 => {}
        _ => {
            return Err(format!(
                "{SHAPE} (iterations \"{iterations}\" is not a positive integer)"
            ));
        }
    }
    match BASE64.decode(salt) {
        Ok(bytes) if !bytes.is_empty() => {}
        _ => return Err(format!("{SHAPE} (the salt is not base64)")),
    }
    for (name, key) in [("StoredKey", stored), ("ServerKey", server)] {
        match BASE64.decode(key) {
            Ok(bytes) if bytes.len() == 32 => {}
            _ => return Err(format!("{SHAPE} ({name} is not 32 bytes of base64)")),
        }
    }
    Ok(())
}

/// Lowercases the hex of `md5…` secrets, so that comparing with a computed hash works.
pub(super) fn normalize(config: &mut Config) {
    for user in config.users.values_mut() {
        if let Some(password) = &mut user.password
            && SecretKind::of(password) == Ok(SecretKind::Md5)
        {
            password.make_ascii_lowercase();
        }
    }
}

/// Pushes every problem into `report`; returns the warnings (the caller logs them).
pub(super) fn check(config: &Config, places: &Places, report: &mut Report) -> Vec<Problem> {
    let mut c = Checker {
        places,
        report,
        warnings: Vec::new(),
    };
    c.server(config);
    c.auth(config);
    c.admin(config);
    c.pool("pool", &config.pool, &PoolOverrides::default(), true);
    if config.databases.is_empty() {
        c.warn(
            "databases",
            "no [databases] configured: every client will be refused",
        );
    }
    for (name, db) in &config.databases {
        let path = join_key("databases", name);
        if db.host.is_empty() {
            c.error(&join_key(&path, "host"), "must not be empty");
        }
        if db.port == 0 {
            c.error(&join_key(&path, "port"), "must not be 0");
        }
        let mut settings = config.pool.clone();
        settings.apply(&db.overrides);
        c.pool(&path, &settings, &db.overrides, false);
    }
    c.users(config);
    c.warnings
}

struct Checker<'a> {
    places: &'a Places,
    report: &'a mut Report,
    warnings: Vec<Problem>,
}

impl Checker<'_> {
    fn server(&mut self, config: &Config) {
        let server = &config.server;
        if server.listen.is_empty() {
            self.error("server.listen", "needs at least one address");
        }
        for (i, addr) in server.listen.iter().enumerate() {
            if !is_listen_address(addr) {
                let msg = format!("\"{addr}\" is not an address: expected host:port");
                self.error_at("server.listen", &format!("server.listen[{i}]"), msg);
            }
        }
        if server.max_client_conn == 0 {
            self.error("server.max_client_conn", "must be at least 1");
        }
        if config.auth.method == AuthMethod::Trust {
            let open = server.listen.iter().any(|a| !is_loopback(a));
            let msg = if open {
                "trust: clients log in without a password, and pgmux listens beyond localhost"
            } else {
                "trust: clients log in without a password"
            };
            self.warn("auth.method", msg);
        }
    }

    fn auth(&mut self, config: &Config) {
        let auth = &config.auth;
        // `cert` checks the client certificate, which pgmux asks for only with a CA to
        // check it against.
        if config.tls.client_ca_file.is_none() {
            let msg = "cert needs tls.client_ca_file (and tls.cert_file, tls.key_file): client certificates are checked against it";
            if auth.method == AuthMethod::Cert {
                self.error("auth.method", msg);
            }
            for (name, user) in &config.users {
                if user.auth_method == Some(AuthMethod::Cert) {
                    self.error(&join_key(&join_key("users", name), "auth_method"), msg);
                }
            }
            if let Some(rule) = auth
                .rules
                .iter()
                .find(|r| r.method == RuleMethod::Login(AuthMethod::Cert))
            {
                let key = if auth.hba_file.is_some() {
                    "auth.hba_file"
                } else {
                    "auth.rules"
                };
                self.error(key, format!("{}: {msg}", rule.source));
            }
        }
        for rule in &auth.rules {
            if rule.method == RuleMethod::Login(AuthMethod::Trust) {
                let key = if auth.hba_file.is_some() {
                    "auth.hba_file"
                } else {
                    "auth.rules"
                };
                let msg = format!(
                    "{}: trust lets its clients log in without a password",
                    rule.source
                );
                self.warn(key, msg);
            }
        }
        self.auth_query(config);
        if auth.max_login_failures > 0 || auth.max_login_failures_per_address() > 0 {
            for (key, d) in [
                ("auth.login_failure_window", auth.login_failure_window),
                ("auth.login_lockout", auth.login_lockout),
            ] {
                if d.is_zero() {
                    self.error(
                        key,
                        "must be above 0 (set auth.max_login_failures = 0 and auth.max_login_failures_per_address = 0 to turn the limit off)",
                    );
                }
            }
        }
        let per_address = auth.max_login_failures_per_address();
        if per_address > 0 && per_address < auth.max_login_failures {
            self.warn(
                "auth.max_login_failures_per_address",
                format!(
                    "{per_address} is below auth.max_login_failures ({}): the address-wide lockout comes first, and one user's typos lock out every user of the address",
                    auth.max_login_failures
                ),
            );
        }
    }

    /// `auth_user`, `auth_query`, `auth_dbname` in `[auth]` and each database.
    fn auth_query(&mut self, config: &Config) {
        let mut places = vec![(
            "auth".to_owned(),
            config.auth.auth_user.as_deref(),
            Some(config.auth.auth_query.as_str()),
            config.auth.auth_dbname.as_deref(),
        )];
        for (name, db) in &config.databases {
            let path = join_key("databases", name);
            places.push((
                path,
                db.auth_user.as_deref(),
                db.auth_query.as_deref(),
                db.auth_dbname.as_deref(),
            ));
        }
        for (path, user, query, dbname) in places {
            if let Some(user) = user {
                let key = join_key(&path, "auth_user");
                if user.is_empty() {
                    self.error(&key, "must not be empty");
                } else if !config.users.contains_key(user) {
                    let msg = format!(
                        "\"{user}\" is not in [users] (or auth.userlist_file): pgmux logs in \
                         to PostgreSQL as this role to run auth_query and needs its password \
                         there (add [users.{user}] password = \"...\")"
                    );
                    self.error(&key, msg);
                }
            }
            if let Some(query) = query
                && !query.contains("$1")
            {
                let msg = "must take the user name as $1 (e.g. \"SELECT usename, passwd \
                           FROM pg_shadow WHERE usename = $1\")";
                self.error(&join_key(&path, "auth_query"), msg);
            }
            if let Some(dbname) = dbname
                && !config.databases.contains_key(dbname)
            {
                let msg = format!(
                    "\"{dbname}\" is not in [databases]: auth_query runs in a database \
                     pgmux knows (add [databases.{dbname}], or remove the key to run it in \
                     the database the client asks for)"
                );
                self.error(&join_key(&path, "auth_dbname"), msg);
            }
        }
    }

    fn admin(&mut self, config: &Config) {
        let admin = &config.admin;
        if let Some(addr) = &admin.listen {
            if !is_listen_address(addr) {
                let msg = format!("\"{addr}\" is not an address: expected host:port");
                self.error("admin.listen", msg);
            } else if admin.token.is_none() && !is_loopback(addr) {
                // Anyone who reaches an open admin port can reload, pause, and read client
                // addresses and query text: refused unless explicitly allowed.
                if !admin.unprotected_on(addr) {
                    self.warn(
                        "admin.listen",
                        "the admin port listens beyond localhost without admin.token \
                         (admin.allow_no_token = true): anyone who reaches it can reload, \
                         pause and read client addresses and queries",
                    );
                } else {
                    self.error(
                        "admin.listen",
                        format!(
                            "\"{addr}\" is beyond localhost and admin.token is not set: anyone \
                             who reaches it could reload, pause and read client addresses and \
                             queries. Set admin.token (e.g. token = \"${{PGMUX_ADMIN_TOKEN}}\"), \
                             listen on 127.0.0.1, or set admin.allow_no_token = true"
                        ),
                    );
                }
            }
        }
        if admin.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            self.error(
                "admin.token",
                "must not be empty (remove the key to disable the token)",
            );
        }
        // Each of these is what keeps the admin port from being held open by idle or slow
        // connections: none can be switched off.
        if admin.header_timeout.is_zero() {
            self.error("admin.header_timeout", "must be above 0");
        }
        if admin.idle_timeout.is_zero() {
            self.error("admin.idle_timeout", "must be above 0");
        }
        if admin.max_connections == 0 {
            self.error("admin.max_connections", "must be at least 1");
        }
    }

    /// Checks `settings` at `path`; for a database (`all` false) only what it overrides,
    /// so that a bad `[pool]` is reported once, not once per database.
    fn pool(&mut self, path: &str, s: &PoolSettings, o: &PoolOverrides, all: bool) {
        let key = |name: &str| join_key(path, name);
        if s.size == 0 && (all || o.size.is_some()) {
            self.error(&key("size"), "must be at least 1");
        }
        if s.min_size > s.size && (all || o.min_size.is_some()) {
            let msg = format!("must not exceed size ({})", s.size);
            self.error(&key("min_size"), msg);
        } else if s.min_size > s.size && o.size.is_some() {
            let msg = format!("must not be below min_size ({})", s.min_size);
            self.error(&key("size"), msg);
        }
        if let Some(most) = s.max_pinned
            && most > s.size
            && (all || o.max_pinned.is_some() || o.size.is_some())
        {
            let msg = format!(
                "must not exceed size ({}): pins would starve the pool",
                s.size
            );
            self.error(&key("max_pinned"), msg);
        }
        if s.wait_timeout.is_zero() && (all || o.wait_timeout.is_some()) {
            let msg = "must be above 0 (clients would fail without waiting)";
            self.error(&key("wait_timeout"), msg);
        }
        let notice_set = all || o.wait_notice_after.is_some() || o.wait_timeout.is_some();
        if !s.wait_notice_after.is_zero() && s.wait_notice_after >= s.wait_timeout && notice_set {
            let msg = format!(
                "{} is not below wait_timeout ({}): only clients held by a pause would get the notice",
                humantime::format_duration(s.wait_notice_after),
                humantime::format_duration(s.wait_timeout)
            );
            self.warn(&key("wait_notice_after"), msg);
        }
        if s.connect_timeout.is_zero() && (all || o.connect_timeout.is_some()) {
            self.error(&key("connect_timeout"), "must be above 0");
        }
        if s.size > UPSTREAM_DEFAULT_MAX_CONNECTIONS && (all || o.size.is_some()) {
            let msg = format!(
                "{} is above PostgreSQL's default max_connections ({UPSTREAM_DEFAULT_MAX_CONNECTIONS}); \
                 make sure the server allows that many",
                s.size
            );
            self.warn(&key("size"), msg);
        }
        // The kernel takes keepalive times in whole seconds, up to MAX_TCP_KEEPIDLE.
        let keepalive_times = [
            ("tcp_keepidle", s.tcp.keepidle, o.tcp_keepidle.is_some()),
            ("tcp_keepintvl", s.tcp.keepintvl, o.tcp_keepintvl.is_some()),
        ];
        for (name, d, set) in keepalive_times {
            if (all || set) && (d.subsec_nanos() != 0 || d.as_secs() > 32_767) {
                let msg = "must be whole seconds, at most 32767s (\"0\" = the system's default)";
                self.error(&key(name), msg);
            }
        }
        if (all || o.tcp_user_timeout.is_some())
            && s.tcp.user_timeout.as_millis() > i32::MAX as u128
        {
            let msg = "must be at most 2147483647ms (the kernel counts milliseconds in an int)";
            self.error(&key("tcp_user_timeout"), msg);
        }
        let reset_set = all || o.server_reset_query.is_some() || o.mode.is_some();
        if s.mode == PoolMode::Session && s.server_reset_query.trim().is_empty() && reset_set {
            let msg = "empty in session mode: one client's session state reaches the next";
            self.warn(&key("server_reset_query"), msg);
        }
    }

    fn users(&mut self, config: &Config) {
        for (name, user) in &config.users {
            let path = join_key("users", name);
            if user.size == Some(0) {
                self.error(&join_key(&path, "size"), "must be at least 1");
            }
            if user.wait_timeout.is_some_and(|d| d.is_zero()) {
                let msg = "must be above 0 (clients would fail without waiting)";
                self.error(&join_key(&path, "wait_timeout"), msg);
            }
            let method = config.auth_method_for(name);
            let password_key = join_key(&path, "password");
            if user.password.as_deref() == Some("") {
                self.error(&password_key, EMPTY_PASSWORD);
            }
            let kind = match user.password.as_deref().map(SecretKind::of) {
                Some(Ok(kind)) => Some(kind),
                Some(Err(why)) => {
                    self.error(&password_key, why);
                    None
                }
                None => None,
            };
            let method_key = if user.auth_method.is_some() {
                join_key(&path, "auth_method")
            } else {
                "auth.method".to_owned()
            };
            match (method, kind) {
                (AuthMethod::Md5, Some(SecretKind::Scram)) => {
                    let msg = format!(
                        "is a SCRAM verifier, which md5 login cannot check (method from \
                         {method_key}): give the plain password or an md5 hash, or use \
                         scram-sha-256"
                    );
                    self.error(&password_key, msg);
                }
                (AuthMethod::ScramSha256, Some(SecretKind::Md5)) => {
                    // Like PgBouncer: SCRAM cannot be checked against an md5 hash, so the
                    // client is asked for md5 instead.
                    let msg = format!(
                        "is an md5 hash: this user logs in with md5, not scram-sha-256 (method \
                         from {method_key})"
                    );
                    self.warn(&password_key, msg);
                }
                _ => {}
            }
            if user.password.is_none() && !matches!(method, AuthMethod::Trust | AuthMethod::Cert) {
                let msg = format!(
                    "no password, and {} needs one: this user cannot log in",
                    method.as_str()
                );
                self.warn(&path, msg);
            }
            if user.auth_method == Some(AuthMethod::Trust) {
                self.warn(
                    &join_key(&path, "auth_method"),
                    "trust: logs in without a password",
                );
            }
            if user.server_password.as_deref() == Some("") {
                self.error(&join_key(&path, "server_password"), EMPTY_PASSWORD);
            } else if let Some(server_password) = &user.server_password
                && SecretKind::of(server_password) != Ok(SecretKind::Plain)
            {
                let msg = "must be the plain password pgmux sends to the server, not a hash";
                self.error(&join_key(&path, "server_password"), msg);
            }
        }
    }

    fn error(&mut self, key: &str, message: impl Into<String>) {
        self.report.at(self.places, key, message);
    }

    /// A problem about `key`, placed at `place_key` (an array element) if known.
    fn error_at(&mut self, key: &str, place_key: &str, message: String) {
        match self.places.get(place_key).or_else(|| self.places.get(key)) {
            Some(place) => self.report.push(place.problem(key, message)),
            None => self.report.at(self.places, key, message),
        }
    }

    fn warn(&mut self, key: &str, message: impl Into<String>) {
        let warning = match self.places.get(key) {
            Some(place) => place.problem(key, message),
            None => Problem::general(self.report.origin(), key, message),
        };
        self.warnings.push(warning);
    }
}

/// `host:port`: a socket address, or a host name with a port.
fn is_listen_address(addr: &str) -> bool {
    if addr.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains([':', ' ', '/']) && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

pub(super) fn is_loopback(addr: &str) -> bool {
    match addr.parse::<SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => addr.starts_with("localhost:"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORED: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn secret_kinds() {
        let scram = format!("SCRAM-SHA-256$4096:c2FsdA==${STORED}:{STORED}");
        assert_eq!(SecretKind::of(&scram), Ok(SecretKind::Scram));
        let md5 = "md5a3556571e93b0d20722ba62be61e8c2d";
        assert_eq!(SecretKind::of(md5), Ok(SecretKind::Md5));
        assert_eq!(SecretKind::of("md5 is my password"), Ok(SecretKind::Plain));
        assert!(SecretKind::of("md5a3556571e93b0d20722ba62be61e8c2z").is_err());
        assert_eq!(SecretKind::of("hunter2"), Ok(SecretKind::Plain));
        for bad in [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$0:c2FsdA==$a:b",
            "SCRAM-SHA-256$4096:!!$a:b",
            &format!("SCRAM-SHA-256$4096:c2FsdA==$c2FsdA==:{STORED}"),
        ] {
            assert!(SecretKind::of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        for good in [
            "127.0.0.1:6432",
            "[::1]:6432",
            "localhost:6432",
            "0.0.0.0:0",
            "db.example:1",
        ] {
            assert!(is_listen_address(good), "{good}");
        }
        for bad in [
            "127.0.0.1",
            "localhost",
            ":6432",
            "host:port",
            "::1:x",
            "a b:1",
        ] {
            assert!(!is_listen_address(bad), "{bad}");
        }
    }
}
