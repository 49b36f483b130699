//! Client authentication that pgmux does itself: it plays the server's part of SCRAM-SHA-256
//! (RFC 5802 / RFC 7677, as PostgreSQL does it) and of md5, against its own user list.
//!
//! Nothing here touches a socket. The client session reads the protocol messages and calls in:
//!
//! - [`Secret`] is what the config stores for a user (plain password, md5 hash, SCRAM verifier).
//! - [`Credential`] is that secret prepared once per config load and shared (`Arc`) by every login
//!   of the user, so that a login storm never pays a PBKDF2 per login.
//! - [`ScramExchange`] is one SCRAM login, owned by the client task for its duration.
//!   [`ScramExchange::mock`] runs the same exchange for an unknown user and always fails, so that
//!   a client cannot tell "no such user" from "wrong password".
//! - [`Credential::check_md5`] checks an md5 `PasswordMessage`.
//! - [`ScramClient`] logs in to PostgreSQL with the [`ScramKeys`] a verified exchange
//!   recovered ([`ScramExchange::server_keys`]), for users whose secret came from
//!   `auth_query`: pgmux never learns their password.
//! - [`rules`] decides, before authentication, whether a client may log in and with which
//!   method; [`hba`] reads those rules from a `pg_hba.conf`-format file.
//! - [`LoginGuard`] counts failed logins by reason and locks out an address that fails too
//!   often ([`limiter`]).
//!
//! Secrets never appear in `Debug` output or in errors.

mod credential;
pub mod hba;
pub mod limiter;
mod md5;
pub mod rules;
mod scram;
mod scram_client;
mod secret;

pub use credential::Credential;
pub use limiter::{FailureReason, LimitSettings, LockoutScope, LoginGuard};
pub use md5::{md5_hash, md5_response};
pub use scram::{SCRAM_MECHANISM, SCRAM_PLUS_MECHANISM, ScramExchange};
pub use scram_client::{ScramClient, ScramClientError, ScramKeys};
pub use secret::{ScramVerifier, Secret};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Why an authentication step failed. The client task maps it to what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password (or an unknown user, which must look the same). SQLSTATE 28P01.
    #[error("password authentication failed")]
    BadPassword,
    /// The client broke the authentication protocol; the message says how. SQLSTATE 08P01.
    /// It never quotes the client's bytes.
    #[error("malformed authentication message: {0}")]
    Malformed(String),
    /// A stored secret (from the config or a userlist file) is not well formed; the message says
    /// which part, never the secret itself.
    #[error("invalid stored secret: {0}")]
    InvalidSecret(String),
}

impl AuthError {
    pub(crate) fn malformed(what: &str) -> AuthError {
        AuthError::Malformed(what.to_owned())
    }
}

/// HMAC-SHA-256 of the concatenation of `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    #[allow(clippy::expect_used)] // HMAC takes keys of any length: this cannot fail
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Compares two secrets in time that depends only on their (public) length.
fn ct_eq<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the loop into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_compares() {
        assert!(ct_eq(&[1, 2, 3], &[1, 2, 3]));
        assert!(!ct_eq(&[1, 2, 3], &[1, 2, 4]));
        assert!(ct_eq::<0>(&[], &[]));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
