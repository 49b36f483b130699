//! A user's secret, prepared once per config load for every login of that user.

use std::fmt;

use sha2::{Digest, Sha256};

use super::md5::{MD5_LEN, md5_hash_bytes, md5_response};
use super::{ScramVerifier, Secret, ct_eq};

/// One user's secret, prepared when the config is loaded and shared (`Arc`) by every login of
/// that user until the next load. Immutable, so logins never contend on it.
///
/// Preparing costs one PBKDF2 for a plain password (its SCRAM verifier); everything a login
/// needs afterwards is cheap.
#[derive(Clone)]
pub struct Credential {
    user: String,
    secret: Secret,
    /// The verifier derived from a plain password; `None` for the other kinds of secret.
    derived: Option<ScramVerifier>,
}

impl Credential {
    /// Prepares `secret` for `user`. For a plain password this derives the SCRAM verifier
    /// (PBKDF2, 4096 iterations, random 16-byte salt, SASLprep as PostgreSQL does), so it takes
    /// a few milliseconds: call it at config load, never per login.
    pub fn new(user: &str, secret: Secret) -> Credential {
        let derived = match &secret {
            Secret::Plain(password) => Some(ScramVerifier::generate(password)),
            Secret::Md5(_) | Secret::Scram(_) => None,
        };
        Credential {
            user: user.to_owned(),
            secret,
            derived,
        }
    }

    /// The user name this credential belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The secret as configured.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The SCRAM verifier for this user: the stored one, or the one derived from the plain
    /// password. `None` for an md5 secret, which cannot do SCRAM.
    pub fn scram(&self) -> Option<&ScramVerifier> {
        match &self.secret {
            Secret::Scram(v) => Some(v),
            Secret::Plain(_) => self.derived.as_ref(),
            Secret::Md5(_) => None,
        }
    }

    /// Checks the body of an md5 PasswordMessage (`"md5" + 32 hex`, without the trailing NUL)
    /// against the 4-byte `salt` sent in AuthenticationMD5Password. Constant-time.
    ///
    /// Works for plain and md5 secrets; always `false` for a SCRAM verifier.
    pub fn check_md5(&self, salt: [u8; 4], response: &[u8]) -> bool {
        let stored = match &self.secret {
            Secret::Plain(password) => md5_hash_bytes(&self.user, password.as_bytes()),
            Secret::Md5(hash) => hash.clone(),
            Secret::Scram(_) => return false,
        };
        let Some(stored_hex) = stored.strip_prefix("md5") else {
            return false;
        };
        let Ok(response) = <&[u8; MD5_LEN]>::try_from(response) else {
            return false; // the length of a well-formed response is public
        };
        ct_eq(&md5_response(stored_hex, salt), response)
    }

    /// Checks a cleartext PasswordMessage body (without the trailing NUL), for the `password`
    /// method. Works for every kind of secret; costs a PBKDF2 for a SCRAM verifier, as in
    /// PostgreSQL. Constant-time for plain and md5 secrets.
    pub fn check_password(&self, password: &[u8]) -> bool {
        match &self.secret {
            Secret::Plain(stored) => {
                // Hash both sides so that the comparison does not reveal the stored length.
                let stored: [u8; 32] = Sha256::digest(stored.as_bytes()).into();
                let given: [u8; 32] = Sha256::digest(password).into();
                ct_eq(&stored, &given)
            }
            Secret::Md5(stored) => {
                let given = md5_hash_bytes(&self.user, password);
                match (
                    <&[u8; MD5_LEN]>::try_from(stored.as_bytes()),
                    <&[u8; MD5_LEN]>::try_from(given.as_bytes()),
                ) {
                    (Ok(stored), Ok(given)) => ct_eq(stored, given),
                    _ => false,
                }
            }
            Secret::Scram(v) => v.matches_password(password),
        }
    }

    /// The cleartext password, if the secret is one: pgmux needs it to log in to a server that
    /// asks for SCRAM or cleartext.
    pub fn plain_password(&self) -> Option<&str> {
        match &self.secret {
            Secret::Plain(password) => Some(password),
            Secret::Md5(_) | Secret::Scram(_) => None,
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::md5_hash;

    const SALT: [u8; 4] = [1, 2, 3, 4];
    // md5 challenge response for user "postgres", password "postgres", SALT (Python hashlib).
    const RESPONSE: &[u8] = b"md568be9ed08db75f318087ab337aaea044";

    fn cred(secret: &str) -> Credential {
        Credential::new("postgres", Secret::parse(secret).unwrap())
    }

    #[test]
    fn md5_check_plain_and_md5() {
        for c in [cred("postgres"), cred(&md5_hash("postgres", "postgres"))] {
            assert!(c.check_md5(SALT, RESPONSE), "{c:?}");
            assert!(!c.check_md5([4, 3, 2, 1], RESPONSE));
            assert!(!c.check_md5(SALT, b"md568be9ed08db75f318087ab337aaea045"));
            assert!(!c.check_md5(SALT, b""));
            assert!(!c.check_md5(SALT, b"md5"));
            assert!(!c.check_md5(SALT, &[0xff; 35]));
            // With the trailing NUL the body is one byte too long.
            assert!(!c.check_md5(SALT, b"md568be9ed08db75f318087ab337aaea044\0"));
        }
        let scram = Credential::new(
            "postgres",
            Secret::Scram(ScramVerifier::generate("postgres")),
        );
        assert!(!scram.check_md5(SALT, RESPONSE));
    }

    #[test]
    fn plain_password_derives_scram_once() {
        let c = cred("hunter2");
        assert_eq!(c.plain_password(), Some("hunter2"));
        let v = c.scram().expect("a plain password can do SCRAM");
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt.len(), 16);
        // Same verifier every time: derived at construction, not per call.
        assert_eq!(c.scram().unwrap().to_string(), v.to_string());
        assert!(v.matches_password(b"hunter2"));

        assert!(cred(&md5_hash("postgres", "x")).scram().is_none());
        assert!(cred(&md5_hash("postgres", "x")).plain_password().is_none());
    }

    #[test]
    fn cleartext_check_every_kind() {
        let secrets = [
            "postgres".to_owned(),
            md5_hash("postgres", "postgres"),
            ScramVerifier::generate("postgres").to_string(),
        ];
        for s in &secrets {
            let c = cred(s);
            assert!(c.check_password(b"postgres"), "{c:?}");
            assert!(!c.check_password(b"postgre"), "{c:?}");
            assert!(!c.check_password(b""), "{c:?}");
            assert!(!c.check_password(&[0xff, 0xfe]), "{c:?}");
        }
    }

    #[test]
    fn debug_hides_password() {
        let shown = format!("{:?}", cred("hunter2"));
        assert!(
            shown.contains("postgres") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
