//! Failed logins: why each failed (a bounded set of reasons, for logs and metrics).

/// Why a login failed. A bounded set: each is a `reason` label of
/// `pgmux_login_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// A wrong password (or a known user without one).
    BadPassword,
    /// A user pgmux does not know.
    UnknownUser,
    /// A database pgmux does not know (told only after authentication).
    UnknownDatabase,
}

impl FailureReason {
    /// The label value and the word in the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadPassword => "bad_password",
            Self::UnknownUser => "unknown_user",
            Self::UnknownDatabase => "unknown_database",
        }
    }
}
