//! Stored secrets: what the config holds for a user, and the SCRAM-SHA-256 verifier.

use std::fmt;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::md5::MD5_LEN;
use super::{AuthError, hmac_sha256};

/// PBKDF2 iterations for verifiers pgmux derives itself (PostgreSQL's default).
pub(crate) const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length for verifiers pgmux derives itself (PostgreSQL's default).
pub(crate) const DEFAULT_SALT_LEN: usize = 16;

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

/// What pgmux stores for a user, parsed from the config or a userlist file.
///
/// `Debug` shows the kind of secret, never the secret.
#[derive(Clone)]
pub enum Secret {
    /// A cleartext password: allows every method, and logging in to the upstream server.
    Plain(String),
    /// `"md5"` + 32 lowercase hex digits: `md5(password + user)`, as in `pg_authid`.
    Md5(String),
    /// A SCRAM-SHA-256 verifier, as in `pg_authid`.
    Scram(ScramVerifier),
}

impl Secret {
    /// Recognises the secret the way PostgreSQL does: `"md5<32 hex>"` is an md5 hash,
    /// `"SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>"` a SCRAM verifier,
    /// anything else a plain password.
    ///
    /// Errors with [`AuthError::InvalidSecret`] only for a string that looks like a hash but
    /// is broken: it starts with `SCRAM-SHA-256$`, or is `md5` + 32 characters that are not hex.
    /// Hex digits are lowercased.
    pub fn parse(s: &str) -> Result<Secret, AuthError> {
        if s.starts_with(SCRAM_PREFIX) {
            return ScramVerifier::parse(s).map(Secret::Scram);
        }
        if let Some(hex) = s.strip_prefix("md5")
            && s.len() == MD5_LEN
        {
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(AuthError::InvalidSecret(
                    "\"md5\" followed by 32 characters must be an md5 hash, but they are not hex"
                        .to_owned(),
                ));
            }
            return Ok(Secret::Md5(s.to_ascii_lowercase()));
        }
        Ok(Secret::Plain(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(..)"),
            Secret::Md5(_) => f.write_str("Secret::Md5(..)"),
            Secret::Scram(v) => write!(f, "Secret::Scram({v:?})"),
        }
    }
}

/// A SCRAM-SHA-256 verifier: what the server needs to check a SCRAM login without knowing the
/// password. Its `Display` is PostgreSQL's `pg_authid` form; `Debug` hides the keys.
///
/// The keys are as good as the password against pgmux itself (with a captured exchange), so
/// they must be kept as secret as one.
#[derive(Clone)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: Vec<u8>,
    /// `SHA-256(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses PostgreSQL's form `SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>`.
    /// The error names the broken part, never the verifier.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let invalid =
            |what: &str| AuthError::InvalidSecret(format!("SCRAM-SHA-256 verifier: {what}"));
        let rest = s
            .strip_prefix(SCRAM_PREFIX)
            .ok_or_else(|| invalid("does not start with \"SCRAM-SHA-256$\""))?;
        let (iter_salt, keys) = rest
            .split_once('$')
            .ok_or_else(|| invalid("expected <iterations>:<salt>$<StoredKey>:<ServerKey>"))?;
        let (iterations, salt) = iter_salt
            .split_once(':')
            .ok_or_else(|| invalid("expected <iterations>:<salt> after \"SCRAM-SHA-256$\""))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or_else(|| invalid("expected <StoredKey>:<ServerKey> after the salt"))?;

        let iterations = Some(iterations)
            .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|&i| i > 0)
            .ok_or_else(|| invalid("iteration count is not a positive 32-bit number"))?;
        let salt = STANDARD
            .decode(salt)
            .ok()
            .filter(|salt| !salt.is_empty())
            .ok_or_else(|| invalid("salt is not non-empty base64"))?;
        let key = |b64: &str, name: &str| -> Result<[u8; 32], AuthError> {
            let bytes = STANDARD.decode(b64).ok();
            bytes
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| invalid(&format!("{name} is not 32 bytes of base64")))
        };
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key(stored_key, "StoredKey")?,
            server_key: key(server_key, "ServerKey")?,
        })
    }

    /// Derives the verifier for `password` with PBKDF2-HMAC-SHA-256.
    ///
    /// Costs `iterations` HMACs: call it once per user per config load, never per login.
    ///
    /// PostgreSQL runs the password through SASLprep (RFC 4013) first when it can. For an ASCII
    /// password SASLprep changes nothing (PostgreSQL skips it too), so the result is exactly
    /// PostgreSQL's. A non-ASCII password is used as raw UTF-8, which matches PostgreSQL only
    /// when SASLprep would leave it unchanged (e.g. NFC text without special spaces or
    /// invisible characters); [`ScramVerifier::generate`] has no such gap.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        Self::from_prepared(password.as_bytes(), salt, iterations)
    }

    /// Derives a verifier for `password` with a random 16-byte salt and 4096 iterations, as
    /// PostgreSQL does for `CREATE ROLE ... PASSWORD`, SASLprep included.
    ///
    /// Costs a PBKDF2: call it once per user per config load, never per login.
    pub fn generate(password: &str) -> Self {
        if password.is_ascii() {
            let mut salt = [0u8; DEFAULT_SALT_LEN];
            rand::fill(&mut salt[..]);
            return Self::from_prepared(password.as_bytes(), &salt, DEFAULT_ITERATIONS);
        }
        // SASLprep needs Unicode tables that postgres-protocol has (via `stringprep`) and pgmux
        // does not; its verifier generator applies SASLprep exactly as PostgreSQL does.
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        #[allow(clippy::expect_used)] // our own verifier, not outside input
        Self::parse(&verifier).expect("postgres-protocol writes well-formed SCRAM verifiers")
    }

    /// A verifier for a user that does not exist, to run a SCRAM exchange that looks like a real
    /// one and fails (PostgreSQL's "mock authentication"). Prefer [`super::ScramExchange::mock`],
    /// which also guarantees the failure.
    ///
    /// The salt is the same for the same user name for the life of the process (a client that
    /// retries must not see it change), and unpredictable without a process secret, so it cannot
    /// be told from a real user's. The keys are random.
    pub fn mock(user: &str) -> Self {
        // Fixed for the process lifetime and never mutated after it is drawn; PostgreSQL keeps
        // the equivalent (mock_auth_nonce) in pg_control. Salts derived from plain passwords
        // change at every config load anyway, so a per-process key gives nothing away.
        static MOCK_KEY: OnceLock<[u8; 32]> = OnceLock::new();
        let key = MOCK_KEY.get_or_init(|| {
            let mut key = [0u8; 32];
            rand::fill(&mut key[..]);
            key
        });
        let salt = hmac_sha256(key, &[user.as_bytes()])[..DEFAULT_SALT_LEN].to_vec();
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::fill(&mut stored_key[..]);
        rand::fill(&mut server_key[..]);
        ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt,
            stored_key,
            server_key,
        }
    }

    /// Whether `password` (the bytes of a cleartext PasswordMessage) matches this verifier.
    /// Costs a PBKDF2, as in PostgreSQL.
    pub(crate) fn matches_password(&self, password: &[u8]) -> bool {
        // Same preparation as from_password: exact for ASCII, raw bytes otherwise.
        let derived = Self::from_prepared(password, &self.salt, self.iterations);
        super::ct_eq(&derived.stored_key, &self.stored_key)
    }

    fn from_prepared(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let salted: [u8; 32] = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }
}

impl fmt::Display for ScramVerifier {
    /// PostgreSQL's `pg_authid` form, which [`ScramVerifier::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // From a PostgreSQL 15 pg_authid, password_encryption = scram-sha-256:
    // CREATE ROLE alice PASSWORD 'secret'.
    const ALICE: &str = "SCRAM-SHA-256$4096:ypwpmSYq3YBbgU+BP2cevA==$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=";
    // CREATE ROLE carol PASSWORD 'café' (NFC: SASLprep leaves it unchanged).
    const CAROL: &str = "SCRAM-SHA-256$4096:LE9dh5LjyBkkrOvhNy/ApA==$4zKi+VXsTNAvwQoBY3uGtdW5/eUA3oXDKFVWx4//CZA=:XwscMJs5ZqHauT5cbTo8rTQmr+c4a0nvdsyY6qtPaVg=";
    // CREATE ROLE erin PASSWORD U&'\2168' (ROMAN NUMERAL NINE, which SASLprep maps to "IX").
    const ERIN: &str = "SCRAM-SHA-256$4096:24mbupXxd72ft+rm/L0mnw==$90BMHB/Bqp7oxwyu4+TqZIiNsRz9MADuGJ4aZ3UNf04=:D7D8BC1N5+vXnDTheSy2EWIYRCgfGvMfvgMPeQNInsM=";

    #[test]
    fn postgres_verifier_round_trips() {
        for s in [ALICE, CAROL, ERIN] {
            let v = ScramVerifier::parse(s).unwrap();
            assert_eq!(v.iterations, 4096);
            assert_eq!(v.salt.len(), 16);
            assert_eq!(v.to_string(), s);
        }
    }

    #[test]
    fn from_password_matches_postgres() {
        for (s, password) in [(ALICE, "secret"), (CAROL, "café")] {
            let v = ScramVerifier::parse(s).unwrap();
            let derived = ScramVerifier::from_password(password, &v.salt, v.iterations);
            assert_eq!(derived.to_string(), s);
            assert!(v.matches_password(password.as_bytes()));
            assert!(!v.matches_password(b"wrong"));
        }
    }

    #[test]
    fn generate_applies_saslprep() {
        // PostgreSQL's verifier for U+2168 is the one for "IX", not for the raw character.
        let erin = ScramVerifier::parse(ERIN).unwrap();
        assert!(erin.matches_password(b"IX"));
        let generated = ScramVerifier::generate("\u{2168}");
        assert!(generated.matches_password(b"IX"));
        assert_eq!(generated.iterations, DEFAULT_ITERATIONS);
        assert_eq!(generated.salt.len(), DEFAULT_SALT_LEN);

        let ascii = ScramVerifier::generate("secret");
        assert!(ascii.matches_password(b"secret"));
        assert_eq!(ascii.salt.len(), DEFAULT_SALT_LEN);
        assert_ne!(ascii.salt, ScramVerifier::generate("secret").salt);
    }

    #[test]
    fn mock_salt_is_stable_per_user() {
        let a = ScramVerifier::mock("nobody");
        let b = ScramVerifier::mock("nobody");
        assert_eq!(a.salt, b.salt);
        assert_eq!(a.salt.len(), DEFAULT_SALT_LEN);
        assert_ne!(a.salt, ScramVerifier::mock("somebody").salt);
        assert_ne!(a.stored_key, b.stored_key);
    }

    #[test]
    fn secret_kinds() {
        assert!(matches!(Secret::parse("hunter2"), Ok(Secret::Plain(p)) if p == "hunter2"));
        assert!(matches!(Secret::parse(""), Ok(Secret::Plain(p)) if p.is_empty()));
        assert!(matches!(Secret::parse("md5sum"), Ok(Secret::Plain(_))));
        assert!(matches!(
            Secret::parse("md53175BCE1D3201D16594CEBF9D7EB3F9D"),
            Ok(Secret::Md5(h)) if h == "md53175bce1d3201d16594cebf9d7eb3f9d"
        ));
        assert!(matches!(Secret::parse(ALICE), Ok(Secret::Scram(_))));
        assert!(matches!(
            Secret::parse("md5zz75bce1d3201d16594cebf9d7eb3f9d"),
            Err(AuthError::InvalidSecret(_))
        ));
    }

    #[test]
    fn malformed_verifiers_are_rejected() {
        let bad = [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$4096:c2FsdA==$",
            "SCRAM-SHA-256$0:ypwpmSYq3YBbgU+BP2cevA==$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=",
            "SCRAM-SHA-256$+4096:ypwpmSYq3YBbgU+BP2cevA==$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=",
            "SCRAM-SHA-256$99999999999:ypwpmSYq3YBbgU+BP2cevA==$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=",
            "SCRAM-SHA-256$4096:$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=",
            "SCRAM-SHA-256$4096:!!!$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=",
            // StoredKey 31 bytes.
            "SCRAM-SHA-256$4096:ypwpmSYq3YBbgU+BP2cevA==$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsg==:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=",
            // ServerKey with trailing garbage.
            "SCRAM-SHA-256$4096:ypwpmSYq3YBbgU+BP2cevA==$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=:x",
        ];
        for s in bad {
            let err = Secret::parse(s).unwrap_err();
            assert!(matches!(err, AuthError::InvalidSecret(_)), "{s}");
            // The error names the broken part, never the keys.
            assert!(!err.to_string().contains("P/wOfVTK"), "{err}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let shown = format!(
            "{:?} {:?} {:?}",
            Secret::parse("hunter2").unwrap(),
            Secret::parse("md53175bce1d3201d16594cebf9d7eb3f9d").unwrap(),
            Secret::parse(ALICE).unwrap()
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("3175bce"), "{shown}");
        assert!(
            !shown.contains("ypwpm") && !shown.contains("P/wOf"),
            "{shown}"
        );
    }
}
