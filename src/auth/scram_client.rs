//! The client side of SCRAM-SHA-256 without the password: pgmux logging in to PostgreSQL as a
//! user whose secret came from `auth_query`, with the ClientKey recovered from that user's own
//! login to pgmux (see [`super::ScramExchange::server_keys`]).
//!
//! ```text
//! client-first  n,,n=,r=<client nonce>
//! server-first  r=<both nonces>,s=<salt>,i=<iterations>   salt and count must be the known ones
//! client-final  c=biws,r=<both nonces>,p=<ClientKey XOR HMAC(H(ClientKey), AuthMessage)>
//! server-final  v=<HMAC(ServerKey, AuthMessage)>
//! ```
//!
//! No PBKDF2 runs here: the keys are what the salted password would give.

use std::{fmt, str};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::{ct_eq, hmac_sha256};

/// Random bytes in pgmux's part of the nonce.
const CLIENT_NONCE_LEN: usize = 18;

/// The keys a SCRAM login needs in place of the password: PostgreSQL's salt and iteration
/// count from the verifier, the ClientKey recovered from a client's proof, and the ServerKey
/// of the verifier (to check the server's signature). As secret as the password itself:
/// `Debug` hides the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// PBKDF2 iteration count of the verifier.
    pub iterations: u32,
    /// PBKDF2 salt of the verifier.
    pub salt: Vec<u8>,
    /// `HMAC(SaltedPassword, "Client Key")`.
    pub client_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramKeys")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

/// Why a SCRAM login with keys failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramClientError {
    /// The server's salt or iteration count is not the one of the verifier the keys came
    /// from: the role's password changed in PostgreSQL since.
    #[error("the server's SCRAM salt differs from the verifier pgmux knows")]
    SaltChanged,
    /// The server broke the SCRAM protocol; the message says how.
    #[error("malformed SCRAM {0}")]
    Malformed(&'static str),
    /// The server's signature is wrong: it does not know this verifier.
    #[error("the server's SCRAM signature is wrong")]
    BadServerSignature,
    /// The server sent `e=<reason>`.
    #[error("the server ended SCRAM with error \"{0}\"")]
    Server(String),
}

/// One SCRAM-SHA-256 login to a server, client side, with [`ScramKeys`]. Call
/// [`client_first`](Self::client_first), [`server_first`](Self::server_first),
/// [`server_final`](Self::server_final) in that order.
pub struct ScramClient {
    keys: ScramKeys,
    client_first_bare: String,
    nonce: String,
    /// AuthMessage, once the server-first-message is in.
    auth_message: Option<String>,
}

impl ScramClient {
    /// Starts a login with `keys` and a random nonce.
    pub fn new(keys: ScramKeys) -> Self {
        let mut raw = [0u8; CLIENT_NONCE_LEN];
        rand::fill(&mut raw[..]);
        // 18 bytes: 24 base64 characters without padding, printable and comma-free.
        Self::with_nonce(keys, STANDARD.encode(raw))
    }

    fn with_nonce(keys: ScramKeys, nonce: String) -> Self {
        ScramClient {
            keys,
            // PostgreSQL ignores the user name here (the startup packet named it).
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            auth_message: None,
        }
    }

    /// The client-first-message, for SASLInitialResponse.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Reads the server-first-message (AuthenticationSASLContinue) and returns the
    /// client-final-message (SASLResponse).
    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramClientError> {
        const WHAT: &str = "server-first-message";
        let message = str::from_utf8(data).map_err(|_| ScramClientError::Malformed(WHAT))?;
        let mut attrs = message.split(',');
        let nonce = value(attrs.next(), "r=").ok_or(ScramClientError::Malformed(WHAT))?;
        let salt = value(attrs.next(), "s=").ok_or(ScramClientError::Malformed(WHAT))?;
        let iterations = value(attrs.next(), "i=").ok_or(ScramClientError::Malformed(WHAT))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramClientError::Malformed("server nonce"));
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| ScramClientError::Malformed("salt"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramClientError::Malformed("iteration count"))?;
        if salt != self.keys.salt || iterations != self.keys.iterations {
            return Err(ScramClientError::SaltChanged);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{message},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let signature = hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
        let mut proof = self.keys.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message (AuthenticationSASLFinal).
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), ScramClientError> {
        let auth_message = self
            .auth_message
            .take()
            .ok_or(ScramClientError::Malformed("message order"))?;
        let message = str::from_utf8(data)
            .map_err(|_| ScramClientError::Malformed("server-final-message"))?;
        if let Some(error) = message.strip_prefix("e=") {
            return Err(ScramClientError::Server(error.to_owned()));
        }
        let given = message
            .split(',')
            .next()
            .and_then(|v| v.strip_prefix("v="))
            .and_then(|v| STANDARD.decode(v).ok())
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or(ScramClientError::Malformed("server-final-message"))?;
        let expected = hmac_sha256(&self.keys.server_key, &[auth_message.as_bytes()]);
        if ct_eq(&given, &expected) {
            Ok(())
        } else {
            Err(ScramClientError::BadServerSignature)
        }
    }
}

fn value<'a>(attr: Option<&'a str>, prefix: &str) -> Option<&'a str> {
    attr?.strip_prefix(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ScramExchange, ScramVerifier};

    /// Keys of `password` under `verifier`'s salt, from the password (RFC 5802), to check
    /// that the keys recovered from a proof are the real ones.
    fn keys_from_password(password: &str, v: &ScramVerifier) -> ScramKeys {
        let salted =
            pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password.as_bytes(), &v.salt, v.iterations);
        ScramKeys {
            iterations: v.iterations,
            salt: v.salt.clone(),
            client_key: hmac_sha256(&salted, &[b"Client Key"]),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }

    /// A password client (postgres-protocol's) logs in to pgmux's server side; the keys
    /// recovered from its proof then log in to the same verifier, as pgmux does to PostgreSQL.
    #[test]
    fn keys_recovered_from_a_proof_log_in() {
        let verifier = ScramVerifier::generate("hunter2");
        let mut server = ScramExchange::new(verifier.clone());
        let mut client = postgres_protocol::authentication::sasl::ScramSha256::new(
            b"hunter2",
            postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
        );
        let first = server.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        let last = server.client_final(client.message()).unwrap();
        client.finish(&last).unwrap();
        let keys = server
            .server_keys()
            .expect("a verified exchange knows the keys");
        assert!(keys == keys_from_password("hunter2", &verifier));

        let mut server = ScramExchange::new(verifier);
        let mut pgmux = ScramClient::new(keys);
        let first = server.client_first(&pgmux.client_first()).unwrap();
        let last = server
            .client_final(&pgmux.server_first(&first).unwrap())
            .unwrap();
        pgmux.server_final(&last).unwrap();
    }

    #[test]
    fn a_changed_password_is_named() {
        let old = ScramVerifier::generate("old");
        let new = ScramVerifier::generate("new");
        let mut server = ScramExchange::new(new);
        let mut pgmux = ScramClient::new(keys_from_password("old", &old));
        let first = server.client_first(&pgmux.client_first()).unwrap();
        assert_eq!(
            pgmux.server_first(&first),
            Err(ScramClientError::SaltChanged)
        );
    }

    #[test]
    fn a_wrong_server_signature_is_refused() {
        let v = ScramVerifier::generate("pw");
        let mut keys = keys_from_password("pw", &v);
        let mut server = ScramExchange::new(v);
        let mut pgmux = ScramClient::new(keys.clone());
        let first = server.client_first(&pgmux.client_first()).unwrap();
        let last = server
            .client_final(&pgmux.server_first(&first).unwrap())
            .unwrap();
        keys.server_key[0] ^= 1;
        pgmux.keys = keys;
        assert_eq!(
            pgmux.server_final(&last),
            Err(ScramClientError::BadServerSignature)
        );
        assert_eq!(
            pgmux.server_final(b"v=AAAA"),
            Err(ScramClientError::Malformed("message order"))
        );
    }

    #[test]
    fn malformed_server_messages_are_errors() {
        let v = ScramVerifier::generate("pw");
        for bad in [
            &b""[..],
            b"r=",
            b"r=xyz,s=AAAA,i=4096",
            b"\xff",
            b"s=AAAA,r=x,i=1",
        ] {
            let mut pgmux = ScramClient::with_nonce(keys_from_password("pw", &v), "abc".into());
            assert!(
                matches!(pgmux.server_first(bad), Err(ScramClientError::Malformed(_))),
                "{bad:?}"
            );
        }
        let mut pgmux = ScramClient::with_nonce(keys_from_password("pw", &v), "abc".into());
        // The server must add to the nonce.
        assert!(pgmux.server_first(b"r=abc,s=AAAA,i=4096").is_err());
    }

    proptest::proptest! {
        /// Whatever a server sends, the client answers or errs, never panics, and never
        /// accepts a server-final it did not compute.
        #[test]
        fn any_server_message_is_an_answer_or_an_error(
            first in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            last in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
        ) {
            let keys = ScramKeys {
                iterations: 4096,
                salt: vec![1; 16],
                client_key: [7; 32],
                server_key: [9; 32],
            };
            let mut pgmux = ScramClient::with_nonce(keys, "abc".into());
            let _ = pgmux.server_first(&first);
            proptest::prop_assert!(pgmux.server_final(&last).is_err());
        }
    }
}
