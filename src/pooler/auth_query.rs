//! Users that the config does not list, looked up in PostgreSQL with `auth_query` (PgBouncer's
//! `auth_user` / `auth_query` / `auth_dbname`).
//!
//! A client logs in as a user pgmux does not know: pgmux asks PostgreSQL for that user's
//! secret (`pg_authid` form: a SCRAM verifier or an md5 hash) through a small pool of its own
//! (two connections as `auth_user`, not in `/pools` and never counted against a limit),
//! checks the client's password against it, and remembers what the login taught it to log in
//! to PostgreSQL as that user: the ClientKey of the SCRAM proof (with the verifier's
//! ServerKey, salt and iteration count), or the md5 hash. The user's pool then opens its
//! connections with those, without ever knowing the password.
//!
//! Answers are cached: a secret found for `auth_cache_ttl`, "no such user" (and a lookup that
//! failed) for `auth_negative_cache_ttl`. A login that fails with a cached secret marks it,
//! and the next login asks PostgreSQL again (so a password changed in PostgreSQL works at the
//! next try), but not sooner than `auth_negative_cache_ttl` after the last lookup (so a wrong
//! password typed in a loop does not hammer PostgreSQL).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{info, warn};

use super::Snapshot;
use crate::auth::{Credential, Secret};
use crate::config::{AuthQuery, PoolMode};
use crate::logging::Escaped;
use crate::pool::{Pool, PoolKey};
use crate::server::{LookupReply, ServerSecret};

/// Server connections of each auth_query pool.
const AUTH_POOL_SIZE: u32 = 2;
/// How long the query may take.
const QUERY_LIMIT: Duration = Duration::from_secs(5);
/// Users remembered at most (found and not found together); beyond it, expired answers
/// are dropped, then "not found" ones, and a new answer is not kept.
const MAX_CACHED: usize = 10_000;

/// The cache, the auth_query pools, and what logins taught pgmux. Owned by the
/// [`super::Pooler`]; every method takes its locks briefly, never across `.await`.
#[derive(Default)]
pub struct AuthQueries {
    /// By (database, user): the last answer.
    cache: Mutex<HashMap<(String, String), Cached>>,
    /// By (auth database, auth_user): the pool that runs the query.
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    /// By (database, user): what that user's pool logs in to PostgreSQL with.
    learnt: Mutex<HashMap<(String, String), ServerSecret>>,
    /// Lookups by outcome, indexed by `Outcome as usize` (the order of [`Outcome::ALL`]).
    outcomes: [AtomicU64; 4],
}

/// How a lookup was answered (`pgmux_auth_query_lookups_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the cache, without asking PostgreSQL.
    Cached,
    /// PostgreSQL returned the user's secret.
    Found,
    /// PostgreSQL has no such user (or no password for it).
    NotFound,
    /// The query failed (privilege, a broken query, PostgreSQL unreachable).
    Failed,
}

impl Outcome {
    /// Every outcome, in metric order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Cached,
        Outcome::Found,
        Outcome::NotFound,
        Outcome::Failed,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Found => "found",
            Outcome::NotFound => "not_found",
            Outcome::Failed => "failed",
        }
    }
}

struct Cached {
    /// `None`: no such user (or the lookup failed).
    credential: Option<Arc<Credential>>,
    fetched: Instant,
    /// A login failed with this secret since it was fetched.
    failed: bool,
}

/// Why a lookup found nothing usable: logged for the operator, never told the client (who
/// gets the same 28P01 as for a wrong password).
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error(
        "auth_query in database \"{database}\" as \"{auth_user}\" failed: {message} (SQLSTATE 42501): auth_user may not read the secrets; run auth_query as a superuser role, or create a SECURITY DEFINER function (docs/security.md) and set auth_query to call it"
    )]
    Privilege {
        database: String,
        auth_user: String,
        message: String,
    },
    #[error(
        "auth_query in database \"{database}\" as \"{auth_user}\" failed: {message} (SQLSTATE {code}): fix auth_query (or auth_dbname, if the function lives in another database)"
    )]
    Query {
        database: String,
        auth_user: String,
        code: String,
        message: String,
    },
    #[error("auth_query returned {0} rows for one user name: it must return at most one")]
    TooManyRows(usize),
    #[error(
        "auth_query returned a secret pgmux cannot read ({0}): it must return pg_authid's rolpassword (a SCRAM-SHA-256 verifier or an md5 hash)"
    )]
    BadSecret(String),
    #[error("cannot run auth_query: {0}")]
    Server(String),
}

impl AuthQueries {
    /// The secret of `user` for logins to `database`, from the cache or from PostgreSQL.
    /// `None` when the database has no auth_query, the user does not exist (or has no
    /// password), or the lookup failed (logged with its cause and fix).
    pub async fn lookup(
        &self,
        snapshot: &Snapshot,
        runtime: &tokio::runtime::Handle,
        database: &str,
        user: &str,
    ) -> Option<Arc<Credential>> {
        let query = snapshot.config.auth_query_for(database)?;
        let auth = &snapshot.config.auth;
        let key = (database.to_owned(), user.to_owned());
        let previous = {
            let cache = self.cache.lock();
            match cache.get(&key) {
                Some(c) => {
                    let age = c.fetched.elapsed();
                    let fresh = match (&c.credential, c.failed) {
                        (Some(_), false) => age < auth.auth_cache_ttl,
                        _ => age < auth.auth_negative_cache_ttl,
                    };
                    if fresh {
                        self.count(Outcome::Cached);
                        return c.credential.clone();
                    }
                    c.credential.clone()
                }
                None => None,
            }
        };
        let fetched = match self.fetch(snapshot, runtime, query, user).await {
            Ok(found) => {
                self.count(match found {
                    Some(_) => Outcome::Found,
                    None => Outcome::NotFound,
                });
                found
            }
            Err(e) => {
                self.count(Outcome::Failed);
                warn!(database = %Escaped(database), user = %Escaped(user), error = %e, "auth_query lookup failed: the client is refused as with a wrong password");
                None
            }
        };
        if let (Some(old), Some(new)) = (&previous, &fetched)
            && !same_secret(old.secret(), new.secret())
        {
            info!(database = %Escaped(database), user = %Escaped(user), "auth_query: the user's secret changed in PostgreSQL; using the new one");
        }
        self.remember(
            key,
            fetched.clone(),
            auth.auth_cache_ttl.max(auth.auth_negative_cache_ttl),
        );
        fetched
    }

    /// Lookups answered with `outcome` since start.
    pub fn lookups(&self, outcome: Outcome) -> u64 {
        self.outcomes
            .get(outcome as usize)
            .map_or(0, |n| n.load(Relaxed))
    }

    fn count(&self, outcome: Outcome) {
        if let Some(n) = self.outcomes.get(outcome as usize) {
            n.fetch_add(1, Relaxed);
        }
    }

    /// A login of `user` to `database` failed with the cached secret: the next login asks
    /// PostgreSQL again (no sooner than `auth_negative_cache_ttl` after the last lookup).
    pub fn login_failed(&self, database: &str, user: &str) {
        if let Some(c) = self
            .cache
            .lock()
            .get_mut(&(database.to_owned(), user.to_owned()))
        {
            c.failed = true;
        }
    }

    /// What a successful login taught pgmux to log in to PostgreSQL as `user`; returns
    /// true when it differs from what was known (the pool must use the new one).
    pub fn learn(&self, database: &str, user: &str, secret: ServerSecret) -> bool {
        let key = (database.to_owned(), user.to_owned());
        let mut learnt = self.learnt.lock();
        if learnt.get(&key) == Some(&secret) {
            return false;
        }
        learnt.insert(key, secret);
        true
    }

    /// What `user`'s pool for `database` logs in with, if a login taught it.
    pub fn learnt(&self, database: &str, user: &str) -> Option<ServerSecret> {
        self.learnt
            .lock()
            .get(&(database.to_owned(), user.to_owned()))
            .cloned()
    }

    /// After a reload: the auth_query settings or the databases may have changed, so the
    /// pools that ran the query close and every answer is asked again. What logins taught
    /// stays (the pools of those users keep working).
    pub fn reset(&self) {
        for (_, pool) in self.pools.lock().drain() {
            pool.retire();
        }
        self.cache.lock().clear();
    }

    fn remember(&self, key: (String, String), credential: Option<Arc<Credential>>, keep: Duration) {
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED && !cache.contains_key(&key) {
            cache.retain(|_, c| c.fetched.elapsed() < keep);
            if cache.len() >= MAX_CACHED {
                cache.retain(|_, c| c.credential.is_some());
            }
            if cache.len() >= MAX_CACHED {
                return;
            }
        }
        cache.insert(
            key,
            Cached {
                credential,
                fetched: Instant::now(),
                failed: false,
            },
        );
    }

    async fn fetch(
        &self,
        snapshot: &Snapshot,
        runtime: &tokio::runtime::Handle,
        query: AuthQuery<'_>,
        user: &str,
    ) -> Result<Option<Arc<Credential>>, LookupError> {
        let pool = self.pool(snapshot, runtime, query).ok_or_else(|| {
            LookupError::Server(format!(
                "auth_dbname \"{}\" is not in [databases]",
                query.database
            ))
        })?;
        let mut lease = pool
            .checkout()
            .await
            .map_err(|e| LookupError::Server(e.to_string()))?;
        let reply = match lease.lookup(query.query, user, QUERY_LIMIT).await {
            Ok(reply) => {
                lease.release();
                reply
            }
            Err(e) => {
                lease.close();
                return Err(LookupError::Server(e.to_string()));
            }
        };
        let LookupReply { rows, error } = reply;
        if let Some((code, message)) = error {
            let (database, auth_user) = (query.database.to_owned(), query.user.to_owned());
            return Err(if code == "42501" {
                LookupError::Privilege {
                    database,
                    auth_user,
                    message,
                }
            } else {
                LookupError::Query {
                    database,
                    auth_user,
                    code,
                    message,
                }
            });
        }
        match rows.as_slice() {
            [] => Ok(None),
            // A role without a password (NULL) cannot log in with one.
            [(_, None)] => Ok(None),
            [(_, Some(secret))] => {
                let secret =
                    Secret::parse(secret).map_err(|e| LookupError::BadSecret(e.to_string()))?;
                if matches!(secret, Secret::Plain(ref p) if p.is_empty()) {
                    return Ok(None);
                }
                // A plain password derives a SCRAM verifier (a PBKDF2): off the session thread.
                let user = user.to_owned();
                let credential =
                    tokio::task::spawn_blocking(move || Credential::new(&user, secret))
                        .await
                        .map_err(|e| LookupError::Server(e.to_string()))?;
                Ok(Some(Arc::new(credential)))
            }
            more => Err(LookupError::TooManyRows(more.len())),
        }
    }

    /// The pool that runs `query`, created on first use.
    fn pool(
        &self,
        snapshot: &Snapshot,
        runtime: &tokio::runtime::Handle,
        query: AuthQuery<'_>,
    ) -> Option<Arc<Pool>> {
        let key = (query.database.to_owned(), query.user.to_owned());
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get(&key) {
            return Some(pool.clone());
        }
        let mut settings = snapshot.config.pool_settings(query.database, query.user)?;
        settings.mode = PoolMode::Transaction;
        settings.size = AUTH_POOL_SIZE;
        settings.min_size = 0;
        settings.max_prepared_statements = 0;
        settings.limits = Default::default();
        let mut upstream = snapshot.upstream(query.database, query.user)?;
        // auth_user itself, whatever user the database forces for clients.
        upstream.user = query.user.to_owned();
        upstream.secret = snapshot
            .server_password(query.user)
            .map(ServerSecret::Password);
        let pool = Pool::new(
            PoolKey {
                database: query.database.to_owned(),
                user: query.user.to_owned(),
            },
            upstream,
            settings,
        );
        pool.start_upkeep(runtime);
        pools.insert(key, pool.clone());
        Some(pool)
    }
}

/// Whether two secrets are the same stored secret.
fn same_secret(a: &Secret, b: &Secret) -> bool {
    match (a, b) {
        (Secret::Plain(a), Secret::Plain(b)) | (Secret::Md5(a), Secret::Md5(b)) => a == b,
        (Secret::Scram(a), Secret::Scram(b)) => a.to_string() == b.to_string(),
        _ => false,
    }
}

/// What a verified login with `credential` lets pgmux log in to PostgreSQL with: the
/// password if the secret is one, or if the client sent it in clear (the `password`
/// method); else the md5 hash, or the SCRAM keys the client's proof revealed.
pub fn server_secret(
    credential: &Credential,
    scram: Option<crate::auth::ScramKeys>,
    cleartext: Option<String>,
) -> Option<ServerSecret> {
    if let Some(password) = cleartext {
        return Some(ServerSecret::Password(password));
    }
    match credential.secret() {
        Secret::Plain(password) => Some(ServerSecret::Password(password.clone())),
        Secret::Md5(hash) => Some(ServerSecret::Md5(hash.clone())),
        Secret::Scram(_) => scram.map(ServerSecret::Scram),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A config whose database points at a port nothing listens on: a lookup that reached
    /// PostgreSQL would fail (and log), so an answer proves the cache gave it.
    fn snapshot(auth_lines: &str) -> Snapshot {
        let text = format!(
            "[auth]\nauth_user = \"look\"\n{auth_lines}\n[databases.app]\nport = 1\n\
             connect_timeout = \"1s\"\n[users.look]\npassword = \"pw\"\n"
        );
        Snapshot::new(Config::parse(&text, "t.toml").unwrap()).unwrap()
    }

    fn credential(user: &str) -> Arc<Credential> {
        let secret = Secret::parse(&crate::auth::md5_hash(user, "pw")).unwrap();
        Arc::new(Credential::new(user, secret))
    }

    fn key(user: &str) -> (String, String) {
        ("app".to_owned(), user.to_owned())
    }

    #[tokio::test]
    async fn cached_answers_are_used_until_they_expire() {
        let snap = snapshot("auth_cache_ttl = \"1h\"\nauth_negative_cache_ttl = \"1h\"");
        let rt = tokio::runtime::Handle::current();
        let aq = AuthQueries::default();
        aq.remember(
            key("alice"),
            Some(credential("alice")),
            Duration::from_secs(3600),
        );
        aq.remember(key("nobody"), None, Duration::from_secs(3600));
        let found = aq.lookup(&snap, &rt, "app", "alice").await;
        assert_eq!(found.map(|c| c.user().to_owned()), Some("alice".to_owned()));
        let before = aq.cache.lock()[&key("nobody")].fetched;
        assert!(aq.lookup(&snap, &rt, "app", "nobody").await.is_none());
        assert_eq!(aq.cache.lock()[&key("nobody")].fetched, before);

        // A failed login keeps the secret within auth_negative_cache_ttl: no new lookup.
        aq.login_failed("app", "alice");
        assert!(aq.lookup(&snap, &rt, "app", "alice").await.is_some());
        // Databases without auth_query never look up.
        assert!(aq.lookup(&snap, &rt, "other", "alice").await.is_none());
        assert_eq!(aq.lookups(Outcome::Cached), 3);
        assert_eq!(aq.lookups(Outcome::Failed), 0);
    }

    #[tokio::test]
    async fn a_failed_login_asks_again_after_the_negative_ttl() {
        let snap = snapshot("auth_cache_ttl = \"1h\"\nauth_negative_cache_ttl = \"0s\"");
        let rt = tokio::runtime::Handle::current();
        let aq = AuthQueries::default();
        aq.remember(
            key("alice"),
            Some(credential("alice")),
            Duration::from_secs(3600),
        );
        aq.login_failed("app", "alice");
        // Asked again: nothing listens, so the lookup fails and nothing is found.
        assert!(aq.lookup(&snap, &rt, "app", "alice").await.is_none());
        let c = &aq.cache.lock()[&key("alice")];
        assert!(c.credential.is_none() && !c.failed);
        assert_eq!(aq.lookups(Outcome::Failed), 1);
    }

    #[test]
    fn the_cache_is_bounded() {
        let aq = AuthQueries::default();
        let keep = Duration::from_secs(3600);
        for i in 0..MAX_CACHED {
            aq.remember(key(&format!("u{i}")), Some(credential("u")), keep);
        }
        aq.remember(key("one_more"), None, keep);
        assert_eq!(aq.cache.lock().len(), MAX_CACHED);
        assert!(!aq.cache.lock().contains_key(&key("one_more")));
        // Not-found answers give way first.
        aq.cache.lock().remove(&key("u0"));
        aq.remember(key("nobody"), None, keep);
        aq.remember(key("found"), Some(credential("found")), keep);
        let cache = aq.cache.lock();
        assert!(cache.contains_key(&key("found")) && !cache.contains_key(&key("nobody")));
    }

    #[test]
    fn learning_the_same_secret_changes_nothing() {
        let aq = AuthQueries::default();
        let md5 = || ServerSecret::Md5(crate::auth::md5_hash("a", "pw"));
        assert!(aq.learn("app", "a", md5()));
        assert!(!aq.learn("app", "a", md5()));
        assert!(aq.learn("app", "a", ServerSecret::Password("pw".into())));
        assert_eq!(
            aq.learnt("app", "a"),
            Some(ServerSecret::Password("pw".into()))
        );
        assert_eq!(aq.learnt("app", "b"), None);
    }
}
