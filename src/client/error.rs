//! Every error pgmux itself tells a client, in one place: its SQLSTATE, its message (the
//! `Display`, after `pgmux: `) and the hint that names what to change. Callers choose the
//! severity: [`ClientError::fatal`] when pgmux closes the connection after it,
//! [`ClientError::error`] when the session goes on.

use std::time::Duration;

use crate::auth::LockoutScope;
use crate::clients::WaitCause;
use crate::pool::{BudgetKind, CheckoutError};
use crate::protocol::startup::{MAX_STARTUP_PACKET, StartupError};
use crate::protocol::{PgError, ProtocolError, SqlState};
use crate::server::ConnectError;

/// What pgmux tells a client, when it is pgmux's own word and not the server's.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // Login.
    #[error("too many clients: max_client_conn ({max}) reached")]
    TooManyClients { max: usize },
    #[error(
        "too many clients for {kind} \"{name}\": {setting} ({limit}) reached",
        kind = kind.as_str(), setting = client_setting(*kind)
    )]
    ClientLimit {
        kind: BudgetKind,
        name: String,
        limit: u32,
    },
    #[error("replication connections are not supported through pgmux")]
    Replication,
    #[error("no user name in the startup packet")]
    NoUser,
    #[error("no such database \"{0}\"")]
    UnknownDatabase(String),
    #[error("database does not allow connections: {0}")]
    DatabaseDisabled(String),
    #[error("no such user \"{0}\"")]
    UnknownUser(String),
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    #[error("too many failed logins {}; try again in {seconds} s", locked_out_whom(*scope))]
    LockedOut { scope: LockoutScope, seconds: u64 },
    #[error(
        "no access rule allows host \"{host}\", user \"{user}\", database \"{database}\" ({why})"
    )]
    NoAccessRule {
        host: String,
        user: String,
        database: String,
        /// "rule 3 rejects it", "hba_file line 12 rejects it" or "no rule matches".
        why: String,
    },
    #[error("{0}")]
    Startup(StartupError),
    #[error("TLS required: this pgmux accepts only encrypted connections (tls.client_tls = {0})")]
    TlsRequired(&'static str),
    #[error("received unencrypted data after SSL request")]
    UnencryptedAfterSsl,
    #[error("SSL negotiation was already done on this connection")]
    SslRequestInTls,
    #[error("received direct SSL connection request without ALPN protocol negotiation extension")]
    DirectTlsWithoutAlpn,
    #[error(
        "certificate validation (tls.client_tls = verify-full) failed for user \"{user}\": {why}"
    )]
    CertificateName { user: String, why: String },
    #[error("certificate authentication failed for user \"{user}\": {why}")]
    CertificateAuth { user: String, why: String },
    #[error("cleartext password authentication needs TLS")]
    CleartextNeedsTls,
    #[error("canceling authentication: no login within {0:?} (client_login_timeout)")]
    LoginTimeout(Duration),
    #[error("{0}")]
    Authentication(String),

    // No server to be had.
    #[error("{0}")]
    Checkout(CheckoutError),

    // The session.
    #[error("{0}")]
    Protocol(ProtocolError),
    #[error("terminating connection: pgmux is shutting down")]
    ShuttingDown,
    /// An upgrade could not carry this session to the new process (TLS, session mode,
    /// state pinned to a server, LISTEN, or the hand-over failed).
    #[error("terminating connection: pgmux is being upgraded and cannot move this session ({0})")]
    Upgrading(&'static str),
    #[error(
        "terminating connection due to administrator command (KILL on the pgmux admin console)"
    )]
    KilledByAdmin,
    #[error("terminating connection: its database or user was removed from the pgmux config")]
    PoolRemoved,
    #[error(
        "terminating connection: idle in transaction for longer than {0:?} (idle_transaction_timeout)"
    )]
    IdleInTransaction(Duration),
    #[error(
        "terminating connection: the server sent nothing for {0:?} while the client waited for it (query_timeout); the query was cancelled and the server connection closed"
    )]
    QueryTimeout(Duration),
    #[error(
        "terminating connection: the client sent nothing for {0:?} in the middle of a message (partial_message_timeout)"
    )]
    PartialMessage(Duration),
    #[error("lost the server connection in the middle of a transaction: {0}")]
    ServerLost(ProtocolError),
    #[error("lost the server connection while logging in: {0}")]
    LoginServerLost(ProtocolError),
    #[error("transaction blocks are not allowed in statement pooling mode")]
    TransactionInStatementMode,
    #[error("a named prepared statement larger than 1 MB is not supported")]
    NamedStatementTooLarge,
    #[error("prepared statement \"{0}\" already exists")]
    DuplicateStatement(String),
    #[error(
        "this client already holds {0} named prepared statements (server.statement_registry_size)"
    )]
    TooManyStatements(usize),
    #[error(
        "{kinds} would pin this client's server connection, but {limit} servers of this pool are pinned already (max_pinned); it was discarded"
    )]
    PinLimit { kinds: String, limit: u32 },
    #[error(
        "terminating connection: idle for longer than {0:?} while its session state pins a server connection (pinned_idle_timeout)"
    )]
    PinnedIdle(Duration),
    #[error(
        "terminating connection: {0} notifications waited for this client, which did not read them"
    )]
    NotifyOverflow(usize),
    #[error(
        "could not LISTEN: the listener connection to the database did not confirm within {0:?}"
    )]
    ListenerUnavailable(Duration),
    #[error(
        "internal error in pgmux; the session was closed (any open transaction was rolled back)"
    )]
    Internal,

    // The admin console (`admin/console.rs`).
    #[error("user \"{0}\" may not use the admin console")]
    NotAdmin(String),
    #[error("admin console commands must be shorter than 64 KiB")]
    ConsoleCommandTooLong,
    #[error("the admin console speaks the simple query protocol only")]
    ConsoleExtendedProtocol,
    #[error("unknown admin console command: {0}")]
    ConsoleUnknownCommand(String),
    #[error("unknown setting \"{0}\" (SHOW CONFIG lists them)")]
    ConsoleUnknownSetting(String),
    #[error("{0} takes effect only after a restart: change it in the config file")]
    ConsoleSettingNotLive(String),
    #[error("SET refused, nothing changed: {0}")]
    ConsoleSetRefused(String),
    #[error("no such client: {0}")]
    ConsoleNoSuchClient(String),
    #[error("reload refused, nothing changed:\n{0}")]
    ReloadRefused(String),
    #[error("reload failed: {0}")]
    ReloadFailed(String),
}

impl ClientError {
    /// The SQLSTATE the client reads.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            Self::TooManyClients { .. } | Self::ClientLimit { .. } => {
                SqlState::TOO_MANY_CONNECTIONS
            }
            Self::Replication | Self::TransactionInStatementMode => SqlState::FEATURE_NOT_SUPPORTED,
            Self::NoUser
            | Self::UnknownUser(_)
            | Self::LockedOut { .. }
            | Self::TlsRequired(_)
            | Self::CertificateName { .. }
            | Self::CertificateAuth { .. }
            | Self::CleartextNeedsTls
            | Self::NoAccessRule { .. } => SqlState::INVALID_AUTHORIZATION,
            Self::UnknownDatabase(_) => SqlState::INVALID_CATALOG_NAME,
            Self::NotAdmin(_) => SqlState::INVALID_AUTHORIZATION,
            Self::ConsoleCommandTooLong => SqlState::PROTOCOL_VIOLATION,
            Self::ConsoleExtendedProtocol => SqlState::FEATURE_NOT_SUPPORTED,
            Self::ConsoleUnknownCommand(_) => SqlState::SYNTAX_ERROR,
            Self::ConsoleUnknownSetting(_) | Self::ConsoleNoSuchClient(_) => {
                SqlState::UNDEFINED_OBJECT
            }
            Self::ConsoleSettingNotLive(_) => SqlState::CANT_CHANGE_RUNTIME_PARAM,
            Self::ConsoleSetRefused(_) => SqlState::INVALID_PARAMETER_VALUE,
            Self::DatabaseDisabled(_) => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            Self::ReloadRefused(_) | Self::ReloadFailed(_) => SqlState::CONFIG_FILE_ERROR,
            Self::BadPassword(_) => SqlState::INVALID_PASSWORD,
            Self::Startup(StartupError::UnsupportedProtocol(..)) => SqlState::FEATURE_NOT_SUPPORTED,
            Self::Startup(_)
            | Self::UnencryptedAfterSsl
            | Self::SslRequestInTls
            | Self::DirectTlsWithoutAlpn
            | Self::Authentication(_)
            | Self::Protocol(_)
            | Self::PartialMessage(_) => SqlState::PROTOCOL_VIOLATION,
            Self::LoginTimeout(_) => SqlState::QUERY_CANCELED,
            Self::Checkout(CheckoutError::Timeout { .. } | CheckoutError::Limit { .. }) => {
                SqlState::TOO_MANY_CONNECTIONS
            }
            // PostgreSQL itself refused pgmux's login: keep what it means.
            Self::Checkout(CheckoutError::Upstream { error, .. })
                if error.server_code().is_some() =>
            {
                match error.server_code() {
                    Some("53300") => SqlState::TOO_MANY_CONNECTIONS,
                    Some("57P03") => SqlState::CANNOT_CONNECT_NOW,
                    _ => SqlState::CONNECTION_REJECTED,
                }
            }
            Self::Checkout(CheckoutError::Upstream { .. })
            | Self::QueryTimeout(_)
            | Self::ServerLost(_)
            | Self::LoginServerLost(_) => SqlState::CONNECTION_FAILURE,
            Self::ShuttingDown | Self::KilledByAdmin | Self::PoolRemoved | Self::Upgrading(_) => {
                SqlState::ADMIN_SHUTDOWN
            }
            Self::IdleInTransaction(_) => SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
            Self::NamedStatementTooLarge | Self::TooManyStatements(_) => {
                SqlState::PROGRAM_LIMIT_EXCEEDED
            }
            Self::DuplicateStatement(_) => SqlState::DUPLICATE_PREPARED_STATEMENT,
            Self::PinLimit { .. } => SqlState::CONFIGURATION_LIMIT_EXCEEDED,
            Self::PinnedIdle(_) => SqlState::IDLE_SESSION_TIMEOUT,
            Self::Internal => SqlState::INTERNAL_ERROR,
            Self::NotifyOverflow(_) => SqlState::PROGRAM_LIMIT_EXCEEDED,
            Self::ListenerUnavailable(_) => SqlState::CONNECTION_FAILURE,
        }
    }

    /// What to change, when pgmux can say.
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            Self::TooManyClients { .. } => {
                "raise server.max_client_conn, or use fewer client connections"
            }
            Self::ClientLimit { kind, name, .. } => {
                let setting = client_setting(*kind);
                let section = match kind {
                    BudgetKind::Database => "databases",
                    BudgetKind::User => "users",
                };
                return Some(format!(
                    "raise {section}.{name}.{setting} or pool.{setting} (0 = unlimited), or use fewer client connections"
                ));
            }
            Self::Replication => "connect to PostgreSQL directly for replication",
            Self::Upgrading(_) => "reconnect: the new pgmux process accepts new connections",
            Self::TlsRequired(_) => "connect with TLS (libpq: sslmode=require or stricter)",
            Self::CertificateAuth { .. } => {
                "connect over TLS with a certificate signed by tls.client_ca_file whose common name (CN) is the user name"
            }
            Self::CleartextNeedsTls => {
                "connect with TLS (sslmode=require), use scram-sha-256, or set auth.allow_cleartext_without_tls = true"
            }
            Self::CertificateName { .. } => {
                "log in as the user the client certificate's common name (CN) names, or use tls.client_tls = verify-ca"
            }
            Self::LockedOut { scope, .. } => match scope {
                LockoutScope::User => {
                    "check the password the client uses; the limit is auth.max_login_failures within auth.login_failure_window, the lockout auth.login_lockout"
                }
                LockoutScope::Address => {
                    "check the user names and passwords clients at this address use; the limit is auth.max_login_failures_per_address within auth.login_failure_window, the lockout auth.login_lockout"
                }
            },
            Self::UnknownDatabase(db) => {
                return Some(format!("add [databases.{db}] to the pgmux config"));
            }
            Self::UnknownUser(user) => {
                return Some(format!(
                    "add [users.{user}] to the pgmux config or its userlist file"
                ));
            }
            Self::Startup(StartupError::BadLength(_)) => {
                return Some(format!(
                    "a startup packet must be 8 to {MAX_STARTUP_PACKET} bytes"
                ));
            }
            Self::Checkout(CheckoutError::Timeout {
                cause: WaitCause::Draining,
                ..
            }) => "reconnect: pgmux is shutting down, or a reload removed this pool",
            Self::Checkout(CheckoutError::Timeout {
                cause: WaitCause::UpstreamConnecting | WaitCause::UpstreamBackoff,
                ..
            }) => {
                "check that the PostgreSQL server is up and answers within pool.connect_timeout; pgmux retries on the next query"
            }
            Self::Checkout(CheckoutError::Timeout { pool, .. }) => {
                return Some(format!(
                    "raise the pool size (pool.size, or databases.{}.size) or pool.wait_timeout, or make transactions shorter",
                    pool.database
                ));
            }
            Self::Checkout(CheckoutError::Limit { kind, name, .. }) => {
                let (setting, section) = match kind {
                    BudgetKind::Database => ("max_db_connections", format!("databases.{name}")),
                    BudgetKind::User => ("max_user_connections", format!("users.{name}")),
                };
                return Some(format!(
                    "raise {setting} ({section}.{setting}, or pool.{setting}; 0 = unlimited), \
                     or make transactions shorter"
                ));
            }
            Self::Checkout(CheckoutError::Upstream {
                error: ConnectError::SecretChanged { .. },
                ..
            }) => "log in again with the new password: pgmux then logs in to PostgreSQL with it",
            Self::Checkout(CheckoutError::Upstream {
                error: ConnectError::SecretMismatch { .. },
                ..
            }) => {
                "ask the operator: pg_hba.conf and the role's stored password must agree (docs/security.md, auth_query)"
            }
            Self::Checkout(CheckoutError::Upstream { error, .. }) => match error.server_code() {
                Some("53300") => {
                    "PostgreSQL reached its max_connections: lower the pool sizes of pgmux (and of other clients of the server), or raise max_connections; pgmux retries on the next query"
                }
                Some("57P03") => {
                    "PostgreSQL is starting up or shutting down; pgmux retries on the next query"
                }
                Some(_) => {
                    "PostgreSQL refused pgmux's login: check the server credentials pgmux uses (users.NAME.server_password) and pg_hba.conf"
                }
                None => {
                    "check that the PostgreSQL server is up and reachable; pgmux retries on the next query"
                }
            },
            Self::ShuttingDown => "pgmux is stopping or restarting: reconnect",
            Self::PoolRemoved => "reconnect; the pool no longer exists after the last reload",
            Self::IdleInTransaction(_) => {
                "commit or roll back sooner, or raise pool.idle_transaction_timeout"
            }
            Self::QueryTimeout(_) => {
                "the transaction did not complete; check the network to PostgreSQL, or raise pool.query_timeout above the longest query"
            }
            Self::ServerLost(_) => "the transaction did not complete; reconnect and retry it",
            Self::LoginServerLost(_) => "reconnect",
            Self::TransactionInStatementMode => {
                "use autocommit statements, or a pool with mode = \"transaction\""
            }
            Self::NamedStatementTooLarge => "use the unnamed statement for very large queries",
            Self::TooManyStatements(_) => {
                "close (deallocate) statements the client no longer uses, or raise server.statement_registry_size"
            }
            Self::PinLimit { .. } => {
                "keep session state inside the transaction (SET LOCAL, ON COMMIT DROP, pg_advisory_xact_lock), raise pool.max_pinned, or use session_state = \"reset\" or mode = \"session\""
            }
            Self::PinnedIdle(_) => {
                "drop the session state when done with it (DISCARD ALL), or raise pool.pinned_idle_timeout"
            }
            Self::Internal => "reconnect; please report this with pgmux's log",
            Self::NotifyOverflow(_) => {
                "read notifications as they come (a listening connection must keep reading), then reconnect and LISTEN again"
            }
            Self::NotAdmin(_) => "list the user in auth.admin_users",
            Self::ConsoleExtendedProtocol => "use psql, or your driver's simple query mode",
            Self::ConsoleUnknownCommand(_) => "SHOW HELP lists the commands",
            Self::DatabaseDisabled(_) => {
                "an operator ran DISABLE on the admin console; ENABLE lets clients in again"
            }
            Self::ReloadRefused(_) => {
                "fix the problems listed (pgmux check shows them) and reload again"
            }
            _ => return None,
        };
        Some(hint.to_owned())
    }

    /// The ErrorResponse for a client whose session goes on.
    pub fn error(&self) -> PgError {
        self.with_hint(PgError::error(self.sqlstate(), self.to_string()))
    }

    /// The ErrorResponse for a client pgmux disconnects after it.
    pub fn fatal(&self) -> PgError {
        self.with_hint(PgError::fatal(self.sqlstate(), self.to_string()))
    }

    /// More about the error, when pgmux can say: why a checkout waited until it failed.
    pub fn detail(&self) -> Option<String> {
        match self {
            Self::Checkout(CheckoutError::Timeout { cause, .. }) => {
                Some(format!("wait cause: {}", cause.as_str()))
            }
            Self::Checkout(CheckoutError::Limit { kind, .. }) => {
                Some(format!("wait cause: {}", kind.setting()))
            }
            _ => None,
        }
    }

    fn with_hint(&self, err: PgError) -> PgError {
        let err = match self.detail() {
            Some(detail) => err.with_detail(detail),
            None => err,
        };
        match self.hint() {
            Some(hint) => err.with_hint(hint),
            None => err,
        }
    }
}

/// The setting that caps clients per database or per user.
fn client_setting(kind: BudgetKind) -> &'static str {
    match kind {
        BudgetKind::Database => "max_db_client_connections",
        BudgetKind::User => "max_user_client_connections",
    }
}

/// Whom a lockout refuses, as the client is told.
fn locked_out_whom(scope: LockoutScope) -> &'static str {
    match scope {
        LockoutScope::User => "for this user from this address",
        LockoutScope::Address => "from this address",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_own_code_and_says_what_to_change() {
        let e = ClientError::IdleInTransaction(Duration::from_secs(5));
        assert_eq!(e.sqlstate(), SqlState::IDLE_IN_TRANSACTION_TIMEOUT);
        assert!(e.to_string().contains("idle_transaction_timeout"));
        assert!(e.hint().unwrap().contains("pool.idle_transaction_timeout"));
        let e = ClientError::Startup(StartupError::UnsupportedProtocol(2, 0));
        assert_eq!(e.sqlstate(), SqlState::FEATURE_NOT_SUPPORTED);
        assert_eq!(ClientError::Internal.sqlstate(), SqlState::INTERNAL_ERROR);
    }

    #[test]
    fn the_admin_consoles_errors_are_built_here_too() {
        let e = ClientError::NotAdmin("bob".into());
        assert_eq!(e.sqlstate(), SqlState::INVALID_AUTHORIZATION);
        assert_eq!(e.to_string(), "user \"bob\" may not use the admin console");
        assert_eq!(
            e.hint().as_deref(),
            Some("list the user in auth.admin_users")
        );
        let e = ClientError::ConsoleUnknownCommand("FLY".into());
        assert_eq!(e.sqlstate(), SqlState::SYNTAX_ERROR);
        assert_eq!(e.hint().as_deref(), Some("SHOW HELP lists the commands"));
        let e = ClientError::ConsoleExtendedProtocol;
        assert_eq!(e.sqlstate(), SqlState::FEATURE_NOT_SUPPORTED);
        let e = ClientError::ReloadRefused("t.toml:1:1: x: y".into());
        assert_eq!(e.sqlstate(), SqlState::CONFIG_FILE_ERROR);
        assert!(
            e.to_string()
                .ends_with("nothing changed:\nt.toml:1:1: x: y")
        );
        assert_eq!(
            ClientError::ConsoleCommandTooLong.sqlstate(),
            SqlState::PROTOCOL_VIOLATION
        );
    }
}
