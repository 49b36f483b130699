//! The server side of one SCRAM-SHA-256 exchange (RFC 5802, RFC 7677), as PostgreSQL does it.
//!
//! ```text
//! client-first  n,,n=<ignored>,r=<client nonce>          SASLInitialResponse
//! server-first  r=<client nonce><server nonce>,s=<salt>,i=<iterations>
//!                                                        AuthenticationSASLContinue
//! client-final  c=biws,r=<both nonces>,p=<proof>         SASLResponse
//! server-final  v=<server signature>                     AuthenticationSASLFinal
//! ```
//!
//! Over TLS, SCRAM-SHA-256-PLUS is offered too: the client then sends
//! `p=tls-server-end-point,,` and binds its proof to pgmux's certificate (c= carries the
//! header and the certificate's hash), so that a man in the middle with another
//! certificate cannot relay the exchange.

use std::sync::Arc;
use std::{mem, str};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::{AuthError, ScramVerifier, ct_eq, hmac_sha256};

/// The SASL mechanism pgmux always offers in AuthenticationSASL.
pub const SCRAM_MECHANISM: &str = "SCRAM-SHA-256";

/// The mechanism with channel binding, offered over TLS (first, as PostgreSQL does).
pub const SCRAM_PLUS_MECHANISM: &str = "SCRAM-SHA-256-PLUS";

/// The one channel binding type PostgreSQL (and pgmux) supports.
const END_POINT: &str = "tls-server-end-point";

/// Random bytes in the server's part of the nonce (PostgreSQL's SCRAM_RAW_NONCE_LEN).
const SERVER_NONCE_LEN: usize = 18;

/// One SCRAM-SHA-256 login, server side. Owned by the client task for the exchange; holds its
/// own copy of the verifier (two 32-byte keys and a salt), so it borrows nothing.
///
/// Call [`client_first`](Self::client_first) then [`client_final`](Self::client_final), once
/// each. After any error the exchange is over: every later call fails with
/// [`AuthError::Malformed`].
#[derive(Debug)]
pub struct ScramExchange {
    verifier: ScramVerifier,
    /// A mock exchange for an unknown user: runs every step, then always fails.
    doomed: bool,
    server_nonce: String,
    binding: Binding,
    state: State,
}

/// Channel binding, as the mechanisms offered and the one chosen settle it.
#[derive(Debug, Clone, Default)]
enum Binding {
    /// SCRAM-SHA-256-PLUS was not offered (no TLS): a client that could bind says `y`.
    #[default]
    NotOffered,
    /// It was offered and the client chose SCRAM-SHA-256: `y` would then mean that
    /// someone removed PLUS from the offer on the way (a downgrade).
    Declined,
    /// The client chose SCRAM-SHA-256-PLUS: c= must carry this `tls-server-end-point`
    /// data after the GS2 header.
    Bound(Arc<[u8]>),
}

#[derive(Debug)]
enum State {
    Initial,
    SaltSent {
        /// "n,," or "y,,", which c= must echo in base64.
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        /// Client nonce followed by server nonce.
        nonce: String,
    },
    Done,
}

impl ScramExchange {
    /// Starts an exchange against `verifier` (clone it out of the shared [`super::Credential`]).
    pub fn new(verifier: ScramVerifier) -> Self {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        rand::fill(&mut raw[..]);
        // 18 bytes make 24 base64 characters without padding: printable, and never a comma.
        Self::with_server_nonce(verifier, STANDARD.encode(raw), false)
    }

    /// Starts an exchange for a user that does not exist. It behaves exactly like a real one,
    /// computing the proof and all, and then fails with [`AuthError::BadPassword`], so that a
    /// client can tell an unknown user from a wrong password neither by the messages nor by
    /// their timing (PostgreSQL's mock authentication).
    pub fn mock(user: &str) -> Self {
        let mut exchange = Self::new(ScramVerifier::mock(user));
        exchange.doomed = true;
        exchange
    }

    pub(crate) fn with_server_nonce(
        verifier: ScramVerifier,
        server_nonce: String,
        doomed: bool,
    ) -> Self {
        ScramExchange {
            verifier,
            doomed,
            server_nonce,
            binding: Binding::NotOffered,
            state: State::Initial,
        }
    }

    /// Says what was offered and chosen, before [`Self::client_first`]: `end_point` is the
    /// channel binding data when SCRAM-SHA-256-PLUS was offered, `plus` whether the client
    /// chose it.
    pub fn bind_channel(&mut self, end_point: Option<Arc<[u8]>>, plus: bool) {
        self.binding = match (end_point, plus) {
            (Some(data), true) => Binding::Bound(data),
            (Some(_), false) => Binding::Declined,
            (None, _) => Binding::NotOffered,
        };
    }

    /// Reads the client-first-message (the data of SASLInitialResponse, after the mechanism name
    /// and the length) and returns the server-first-message, to send in
    /// AuthenticationSASLContinue.
    pub fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        let State::Initial = mem::replace(&mut self.state, State::Done) else {
            return Err(AuthError::malformed(
                "unexpected SCRAM client-first-message",
            ));
        };
        let message = str::from_utf8(data)
            .map_err(|_| AuthError::malformed("SCRAM client-first-message is not UTF-8"))?;
        let (gs2_header, bare) = split_gs2_header(message)?;
        self.check_binding_flag(gs2_header)?;
        let client_nonce = parse_client_first_bare(bare)?;

        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        let reply = server_first.clone().into_bytes();
        self.state = State::SaltSent {
            gs2_header: gs2_header.to_owned(),
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
        };
        Ok(reply)
    }

    /// Reads the client-final-message (the body of SASLResponse) and checks the client's proof.
    ///
    /// Returns the server-final-message (`v=<ServerSignature>`) to send in
    /// AuthenticationSASLFinal, [`AuthError::BadPassword`] for a wrong proof (or a mock
    /// exchange), [`AuthError::Malformed`] for a message that breaks the protocol.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        let State::SaltSent {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = mem::replace(&mut self.state, State::Done)
        else {
            return Err(AuthError::malformed(
                "unexpected SCRAM client-final-message",
            ));
        };
        let message = str::from_utf8(data)
            .map_err(|_| AuthError::malformed("SCRAM client-final-message is not UTF-8"))?;
        let last = parse_client_final(message)?;

        // c= is the GS2 header, flag included (a client that said "y" in the first message
        // cannot say "n" now), followed by the channel binding data when bound.
        let mut expected = gs2_header.clone().into_bytes();
        if let Binding::Bound(data) = &self.binding {
            expected.extend_from_slice(data);
        }
        if last.channel_binding != STANDARD.encode(&expected) {
            return Err(AuthError::malformed(
                "SCRAM channel binding (c=) does not match the GS2 header",
            ));
        }
        if last.nonce != nonce {
            return Err(AuthError::malformed("SCRAM nonce does not match"));
        }

        let auth_message = format!("{client_first_bare},{server_first},{}", last.without_proof);
        let v = &self.verifier;
        let client_signature = hmac_sha256(&v.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = last.proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        // The proof is checked even in a mock exchange, so that both take the same time.
        if !ct_eq(&stored_key, &v.stored_key) || self.doomed {
            return Err(AuthError::BadPassword);
        }
        let server_signature = hmac_sha256(&v.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

impl ScramExchange {
    /// Checks the GS2 header's channel-binding flag against what was offered and chosen,
    /// with PostgreSQL's words for each mismatch.
    fn check_binding_flag(&self, gs2_header: &str) -> Result<(), AuthError> {
        let bound = matches!(self.binding, Binding::Bound(_));
        match gs2_header.as_bytes().first() {
            Some(b'n') if bound => Err(AuthError::malformed(
                "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data",
            )),
            Some(b'y') if bound => Err(AuthError::malformed(
                "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data",
            )),
            Some(b'y') if matches!(self.binding, Binding::Declined) => Err(AuthError::malformed(
                "SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, though pgmux offered SCRAM-SHA-256-PLUS",
            )),
            Some(b'p') if !bound => Err(AuthError::malformed(
                "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data",
            )),
            Some(b'p') => {
                let name = gs2_header
                    .strip_prefix("p=")
                    .and_then(|r| r.split(',').next())
                    .unwrap_or_default();
                if name == END_POINT {
                    Ok(())
                } else {
                    Err(AuthError::Malformed(format!(
                        "unsupported SCRAM channel-binding type \"{name}\""
                    )))
                }
            }
            _ => Ok(()),
        }
    }
}

/// Splits the GS2 header ("n,," or "y,,") from the client-first-message-bare.
fn split_gs2_header(message: &str) -> Result<(&str, &str), AuthError> {
    let rest = match message.as_bytes().first() {
        // The flag is judged against what was offered by `check_binding_flag`.
        Some(b'n' | b'y') => message.get(1..).unwrap_or_default(),
        Some(b'p') => {
            let rest = message.get(1..).unwrap_or_default();
            let name_end = rest.find(',').unwrap_or(rest.len());
            rest.get(name_end..).unwrap_or_default()
        }
        _ => {
            return Err(AuthError::malformed(
                "SCRAM client-first-message must start with a channel-binding flag",
            ));
        }
    };
    let rest = rest
        .strip_prefix(',')
        .ok_or_else(|| AuthError::malformed("expected ',' after the SCRAM channel-binding flag"))?;
    if rest.starts_with("a=") {
        return Err(AuthError::malformed(
            "SCRAM authorization identity (a=) is not supported",
        ));
    }
    let bare = rest
        .strip_prefix(',')
        .ok_or_else(|| AuthError::malformed("expected ',' after the SCRAM GS2 header"))?;
    // The header keeps its trailing ',' (the channel binding check compares it whole).
    let header = message
        .strip_suffix(bare)
        .ok_or_else(|| AuthError::malformed("SCRAM GS2 header"))?;
    Ok((header, bare))
}

/// Reads `n=<user>,r=<nonce>[,<extension>...]` and returns the client nonce. The user name is
/// ignored, as PostgreSQL does: the startup packet already named the user.
fn parse_client_first_bare(bare: &str) -> Result<&str, AuthError> {
    if bare.starts_with("m=") {
        return Err(AuthError::malformed(
            "the client requires an unsupported SCRAM extension (m=)",
        ));
    }
    let mut attrs = bare.split(',');
    attribute(attrs.next(), 'n', "SCRAM client-first-message")?;
    let nonce = attribute(attrs.next(), 'r', "SCRAM client-first-message")?;
    if nonce.is_empty() || !nonce.bytes().all(is_printable) {
        return Err(AuthError::malformed(
            "SCRAM client nonce is empty or not printable",
        ));
    }
    for ext in attrs {
        any_attribute(ext, "SCRAM client-first-message")?;
    }
    Ok(nonce)
}

/// The parts of a client-final-message.
struct ClientFinal<'a> {
    channel_binding: &'a str,
    nonce: &'a str,
    /// Everything before ",p=", which is part of the AuthMessage.
    without_proof: &'a str,
    proof: [u8; 32],
}

/// Reads `c=<b64>,r=<nonce>[,<extension>...],p=<b64 proof>`.
fn parse_client_final(message: &str) -> Result<ClientFinal<'_>, AuthError> {
    const WHAT: &str = "SCRAM client-final-message";
    let mut attrs = message.split(',');
    let channel_binding = attribute(attrs.next(), 'c', WHAT)?;
    let nonce = attribute(attrs.next(), 'r', WHAT)?;
    let proof = loop {
        let attr = attrs
            .next()
            .ok_or_else(|| AuthError::malformed("SCRAM client-final-message has no proof (p=)"))?;
        if let Some(proof) = attr.strip_prefix("p=") {
            break proof;
        }
        any_attribute(attr, WHAT)?;
    };
    if attrs.next().is_some() {
        return Err(AuthError::malformed(
            "garbage after the proof in SCRAM client-final-message",
        ));
    }
    let without_proof = message
        .strip_suffix(proof)
        .and_then(|m| m.strip_suffix(",p="))
        .ok_or_else(|| AuthError::malformed("SCRAM client-final-message"))?;
    let proof = STANDARD
        .decode(proof)
        .ok()
        .and_then(|p| <[u8; 32]>::try_from(p).ok())
        .ok_or_else(|| AuthError::malformed("SCRAM proof (p=) is not 32 bytes of base64"))?;
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof,
    })
}

/// The value of attribute `name` ("name=value"), which must come next.
fn attribute<'a>(attr: Option<&'a str>, name: char, what: &str) -> Result<&'a str, AuthError> {
    attr.and_then(|a| a.strip_prefix(name))
        .and_then(|a| a.strip_prefix('='))
        .ok_or_else(|| AuthError::Malformed(format!("expected attribute {name}= in {what}")))
}

/// An attribute we ignore (an extension): a letter, '=', a value.
fn any_attribute(attr: &str, what: &str) -> Result<(), AuthError> {
    match attr.as_bytes() {
        [name, b'=', ..] if name.is_ascii_alphabetic() => Ok(()),
        _ => Err(AuthError::Malformed(format!(
            "expected an attribute (letter=value) in {what}"
        ))),
    }
}

/// RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

#[cfg(test)]
#[path = "scram_tests.rs"]
mod tests;
