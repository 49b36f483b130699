//! SQLSTATE codes pgmux sends. Each situation has its own code so apps can decide to retry.

use std::fmt;

/// A five-character SQLSTATE code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SqlState(&'static str);

impl SqlState {
    /// 00000: a notice that reports no problem.
    pub const SUCCESSFUL_COMPLETION: SqlState = SqlState("00000");
    /// 53400: a configured limit was reached (`max_pinned`).
    pub const CONFIGURATION_LIMIT_EXCEEDED: SqlState = SqlState("53400");
    /// 57P05: idle longer than a session limit (`pinned_idle_timeout`).
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
    /// 08P01: malformed or oversized message.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    /// 08006: upstream unreachable, or lost in the middle of a transaction.
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    /// 0A000: a feature pgmux (or this pool mode) does not support.
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    /// 28000: unknown user, or a login that is not allowed.
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    /// 28P01: wrong password.
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    /// 3D000: unknown database.
    pub const INVALID_CATALOG_NAME: SqlState = SqlState("3D000");
    /// 53300: a connection limit was reached (clients, or no server within wait_timeout).
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    /// 25P03: idle in transaction for longer than idle_transaction_timeout.
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState("25P03");
    /// 57P01: pgmux is shutting down.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    /// 08004: the server refused the connection (its own error is in the message).
    pub const CONNECTION_REJECTED: SqlState = SqlState("08004");
    /// 57P03: the server is starting up or shutting down and takes no logins now.
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");

    /// 57014: login took longer than client_login_timeout.
    pub const QUERY_CANCELED: SqlState = SqlState("57014");

    /// 42P05: a client prepared a statement name it already holds.
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState("42P05");
    /// 54000: a limit of pgmux's was exceeded.
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");

    /// 42601: a command the admin console does not know.
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    /// 55000: a database disabled with the console's `DISABLE` takes no logins.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    /// 42704: a console `SET` of an unknown setting, or `KILL_CLIENT` of an unknown id.
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    /// 22023: a console `SET` value the setting does not take.
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    /// 55P02: a console `SET` of a setting that changes only with a restart.
    pub const CANT_CHANGE_RUNTIME_PARAM: SqlState = SqlState("55P02");
    /// F0000: a config reload found problems in the file (nothing changed).
    pub const CONFIG_FILE_ERROR: SqlState = SqlState("F0000");

    /// XX000: a bug in pgmux ended the session (the panic is logged with its location).
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");

    /// The code as sent on the wire.
    pub fn code(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}
