//! Fuzz targets: the parsers that read what clients and config files send, each fed
//! arbitrary bytes and checked against what must hold whatever the input.
//!
//! `cargo fuzz` runs them from `fuzz/fuzz_targets/` (coverage-guided, nightly), and
//! `cargo test` replays every committed corpus file through them (`tests/fuzz_corpus.rs`),
//! so the same code is the fuzz target and a regression test. A broken invariant panics,
//! which libFuzzer reports as a crash with the input that caused it. The session target,
//! which needs a real PostgreSQL, lives in `fuzz/session.rs`.
//!
//! Not part of pgmux's interface: hidden from the docs, used by nothing else.

// Asserting is the point here: a panic is how a target reports a broken invariant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::Decoder;

use crate::auth::{AuthError, ScramExchange, ScramVerifier, Secret};
use crate::client::params::{
    ClientParams, SessionChange, parse_options, quote_ident, quote_literal, session_change,
};
use crate::config::{self, Config};
use crate::prepared::{Bind, Describe, Parse, rewrite_bind, rewrite_describe};
use crate::protocol::codec::{FIRST_PART, MAX_MESSAGE_LEN};
use crate::protocol::startup::{self, StartupError, StartupPacket};
use crate::protocol::{MessageCodec, ProtocolError, read_cstr, write};

/// A fuzz target: takes any bytes, panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// The pure targets by name, for the corpus replay (`session` is separate).
pub const TARGETS: [(&str, Target); 5] = [
    ("startup", startup),
    ("scram", scram),
    ("classify", classify),
    ("config", config),
    ("messages", messages),
];

// ---------------------------------------------------------------------------------------
// startup

/// `startup`: the first byte sets how many bytes each socket read returns (1 to 255), the
/// rest is what the client sends. The packets are read as `client/login.rs` reads them
/// (SSLRequest and GSSENCRequest answered, then the next packet, until a StartupMessage,
/// a CancelRequest or an error), and:
///
/// - reading in small reads gives exactly what parsing the whole packet gives;
/// - the bytes consumed are whole packets; an error leaves what it says (a bad length, or
///   the end of the input before a whole packet);
/// - an accepted StartupMessage is written back to exactly the bytes received;
/// - the client's settings (startup parameters and `options`) and the greeting built from
///   them hold together, and NegotiateProtocolVersion for its `_pq_.` options frames.
pub fn startup(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut reader = Chunked {
        data: stream,
        pos: 0,
        chunk: usize::from(chunk).max(1),
    };
    let mut buf = BytesMut::new();
    let mut consumed = 0;
    loop {
        let result = poll_now(startup::read_packet(&mut reader, &mut buf));
        let end = reader.pos - buf.len();
        let packet = &stream[consumed..end];
        match result {
            Ok(StartupPacket::Terminate) => {
                assert_eq!(packet, b"X\0\0\0\x04", "a Terminate is exactly its 5 bytes");
                return;
            }
            Ok(parsed) => {
                let len = u32::from_be_bytes(packet[..4].try_into().unwrap()) as usize;
                assert_eq!(len, packet.len(), "a packet is exactly its length");
                let whole = startup::parse_packet(&packet[4..]).expect("parses whole too");
                assert_eq!(format!("{parsed:?}"), format!("{whole:?}"));
                match parsed {
                    // Bytes after the code are ignored, as PostgreSQL does.
                    StartupPacket::SslRequest | StartupPacket::GssEncRequest => {}
                    StartupPacket::Cancel { .. } | StartupPacket::Terminate => return,
                    StartupPacket::Startup(s) => {
                        assert_eq!(build_startup_body(&s), &packet[4..], "round trip");
                        login_settings(&s);
                        return;
                    }
                }
            }
            Err(StartupError::BadLength(len)) => {
                assert!(!(8..=startup::MAX_STARTUP_PACKET).contains(&len));
                assert_eq!(end, consumed, "nothing consumed by a refused packet");
                let header = stream[consumed..].first_chunk::<4>().unwrap();
                assert_eq!(u32::from_be_bytes(*header) as usize, len);
                return;
            }
            Err(StartupError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                assert_eq!(reader.pos, stream.len(), "only the end of input is an EOF");
                let rest = &stream[consumed..];
                let need = rest
                    .first_chunk::<4>()
                    .map_or(4, |h| u32::from_be_bytes(*h) as usize);
                assert!(rest.len() < need, "EOF before a whole packet");
                return;
            }
            Err(StartupError::Malformed | StartupError::UnsupportedProtocol(..)) => return,
        }
        consumed = end;
    }
}

/// The body of a StartupMessage (after its length) with these fields.
fn build_startup_body(s: &startup::Startup) -> Vec<u8> {
    let mut body = ((3u32 << 16) | u32::from(s.minor)).to_be_bytes().to_vec();
    for (name, value) in &s.params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

/// What login does with an accepted StartupMessage's parameters.
fn login_settings(s: &startup::Startup) {
    for (name, _) in &s.params {
        assert!(!name.is_empty(), "an empty name ends the parameters");
    }
    let unknown: Vec<String> = s
        .params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    let mut out = BytesMut::new();
    write::negotiate_protocol_version(&mut out, 0, &unknown);
    let frame = MessageCodec::default()
        .decode(&mut out)
        .expect("NegotiateProtocolVersion frames")
        .expect("whole");
    assert!(frame.is_whole() && out.is_empty());
    let body = frame.body();
    assert_eq!(&body[4..8], &(unknown.len() as i32).to_be_bytes());
    let mut rest = &body[8..];
    for name in &unknown {
        let (read, after) = read_cstr(rest).expect("each option name");
        assert_eq!(read, name);
        rest = after;
    }
    assert!(rest.is_empty());

    let server = server_params();
    let mut params = ClientParams::from_startup(&s.params);
    let greeting = params.greeting(server);
    let names: Vec<&str> = greeting.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<&str> = server.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, expected, "the greeting has the server's parameters");
    for (name, value) in &greeting {
        // The client has just been told this value: the same report is not news.
        assert!(!params.reported(name, value, false), "{name}={value:?}");
    }
}

/// What a PostgreSQL 16 reports at login, as a pool learns it.
fn server_params() -> &'static Arc<Vec<(String, String)>> {
    static PARAMS: OnceLock<Arc<Vec<(String, String)>>> = OnceLock::new();
    PARAMS.get_or_init(|| {
        let pairs = [
            ("application_name", ""),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("default_transaction_read_only", "off"),
            ("in_hot_standby", "off"),
            ("integer_datetimes", "on"),
            ("IntervalStyle", "postgres"),
            ("is_superuser", "off"),
            ("server_encoding", "UTF8"),
            ("server_version", "16.4"),
            ("session_authorization", "app"),
            ("standard_conforming_strings", "on"),
            ("TimeZone", "UTC"),
        ];
        Arc::new(
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        )
    })
}

/// A socket that has `data` and returns at most `chunk` bytes per read, never pending.
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .chunk
            .min(self.data.len() - self.pos)
            .min(buf.remaining());
        let at = self.pos;
        buf.put_slice(&self.data[at..at + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future whose I/O never waits (a [`Chunked`] reader) to completion.
fn poll_now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a read that cannot wait waited"),
    }
}

// ---------------------------------------------------------------------------------------
// scram

/// The RFC 7677 example: password "pencil", this salt and iteration count, and the
/// server nonce its messages use (so the RFC's client messages log in).
const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const PASSWORD: &str = "pencil";

/// `scram`: the server side of SCRAM-SHA-256 against a real verifier (RFC 7677's). The
/// first byte picks the client, the rest is split at its first NUL into the
/// client-first-message and what follows:
///
/// - `0`: an arbitrary client-final-message. If pgmux accepts it, its proof is the one only
///   the password gives (recomputed here from the password, independently of pgmux's code)
///   and the server signature is right.
/// - `1`: an honest client: what follows is the client-final-message without its proof
///   (empty: the canonical one), and the right proof is appended. A wrong password is never
///   what pgmux answers; the canonical message always logs in.
/// - `2`: the same honest client with a wrong password, and `3`: any message against the
///   mock exchange pgmux runs for unknown users. Neither ever logs in.
///
/// A verifier in PostgreSQL's text form taken from the input parses back to itself.
pub fn scram(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (first, last) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], Some(&rest[at + 1..])),
        None => (rest, None),
    };
    if let Ok(text) = std::str::from_utf8(rest)
        && let Ok(v) = ScramVerifier::parse(text)
    {
        let again = ScramVerifier::parse(&v.to_string()).expect("Display parses back");
        assert_eq!(again.to_string(), v.to_string());
    }
    match mode % 4 {
        0 => {
            let mut ex = rfc_exchange();
            let Ok(server_first) = ex.client_first(first) else {
                return after_error(&mut ex, first);
            };
            let Some(last) = last else { return };
            match ex.client_final(last) {
                Ok(server_final) => {
                    let oracle = Oracle::new(first, &server_first, last, PASSWORD)
                        .expect("an accepted exchange is well formed");
                    assert_eq!(oracle.sent_proof, oracle.proof, "accepted a wrong proof");
                    assert_eq!(server_final, oracle.server_final());
                }
                Err(_) => after_error(&mut ex, last),
            }
        }
        1 | 2 => {
            let password = if mode % 4 == 1 { PASSWORD } else { "pencil!" };
            let mut ex = rfc_exchange();
            let Ok(server_first) = ex.client_first(first) else {
                return;
            };
            let canonical = last.is_none_or(<[u8]>::is_empty);
            let without_proof = match last {
                Some(last) if !last.is_empty() => last.to_vec(),
                _ => canonical_final(first, &server_first),
            };
            let proof = Oracle::proof_for(first, &server_first, &without_proof, password);
            let mut message = without_proof;
            message.extend_from_slice(b",p=");
            message.extend_from_slice(STANDARD.encode(proof).as_bytes());
            match ex.client_final(&message) {
                Ok(server_final) => {
                    assert_eq!(password, PASSWORD, "logged in with a wrong password");
                    let oracle = Oracle::new(first, &server_first, &message, PASSWORD).unwrap();
                    assert_eq!(server_final, oracle.server_final());
                }
                Err(AuthError::BadPassword) if password == PASSWORD => {
                    panic!("the right proof was refused as a wrong password")
                }
                Err(e) => assert!(
                    !canonical || password != PASSWORD,
                    "a canonical client-final-message was refused: {e}"
                ),
            }
        }
        _ => {
            let mut ex = ScramExchange::mock("nobody");
            if ex.client_first(first).is_ok() {
                let last = last.unwrap_or_default();
                assert!(
                    ex.client_final(last).is_err(),
                    "the mock exchange logged in"
                );
            }
        }
    }
}

/// Once an exchange failed, every later step fails too.
fn after_error(ex: &mut ScramExchange, data: &[u8]) {
    assert!(ex.client_first(data).is_err());
    assert!(ex.client_final(data).is_err());
}

fn rfc_exchange() -> ScramExchange {
    static VERIFIER: OnceLock<ScramVerifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| {
        let salt = STANDARD.decode(RFC_SALT).unwrap();
        ScramVerifier::from_password(PASSWORD, &salt, 4096)
    });
    ScramExchange::with_server_nonce(verifier.clone(), RFC_SERVER_NONCE.to_owned(), false)
}

/// `c=<base64 of the GS2 header>,r=<nonce from server-first>`.
fn canonical_final(first: &[u8], server_first: &[u8]) -> Vec<u8> {
    let header = &first[..3]; // accepted: "n,," or "y,,"
    let server_first = std::str::from_utf8(server_first).unwrap();
    let nonce = server_first
        .strip_prefix("r=")
        .and_then(|s| s.split(',').next())
        .unwrap();
    format!("c={},r={nonce}", STANDARD.encode(header)).into_bytes()
}

/// SCRAM-SHA-256 computed from the password, straight from RFC 5802, to check pgmux's
/// verdicts against.
struct Oracle {
    auth_message: Vec<u8>,
    server_key: [u8; 32],
    proof: [u8; 32],
    sent_proof: Vec<u8>,
}

impl Oracle {
    /// `None` if the messages do not have the shape RFC 5802 gives them.
    fn new(first: &[u8], server_first: &[u8], last: &[u8], password: &str) -> Option<Oracle> {
        let at = last.windows(3).rposition(|w| w == b",p=")?;
        let without_proof = &last[..at];
        let sent_proof = STANDARD.decode(&last[at + 3..]).ok()?;
        let auth_message = auth_message(first, server_first, without_proof)?;
        let (client_key, server_key) = keys(password);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, &auth_message);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        Some(Oracle {
            auth_message,
            server_key,
            proof,
            sent_proof,
        })
    }

    fn proof_for(first: &[u8], server_first: &[u8], without_proof: &[u8], pw: &str) -> [u8; 32] {
        let mut last = without_proof.to_vec();
        last.extend_from_slice(b",p=");
        Oracle::new(first, server_first, &last, pw)
            .map(|o| o.proof)
            .unwrap_or([0; 32])
    }

    fn server_final(&self) -> Vec<u8> {
        let signature = hmac(&self.server_key, &self.auth_message);
        format!("v={}", STANDARD.encode(signature)).into_bytes()
    }
}

/// client-first-message-bare "," server-first-message "," client-final-without-proof.
fn auth_message(first: &[u8], server_first: &[u8], without_proof: &[u8]) -> Option<Vec<u8>> {
    // The bare message follows the GS2 header "<flag>,<authzid>,".
    let header_end = first
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b',')
        .nth(1)?
        .0;
    let mut out = first[header_end + 1..].to_vec();
    out.push(b',');
    out.extend_from_slice(server_first);
    out.push(b',');
    out.extend_from_slice(without_proof);
    Some(out)
}

/// ClientKey and ServerKey of the RFC salt and iteration count for `password`.
fn keys(password: &str) -> ([u8; 32], [u8; 32]) {
    static RIGHT: OnceLock<([u8; 32], [u8; 32])> = OnceLock::new();
    static WRONG: OnceLock<([u8; 32], [u8; 32])> = OnceLock::new();
    let derive = || {
        let salt = STANDARD.decode(RFC_SALT).unwrap();
        let salted = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password.as_bytes(), &salt, 4096);
        (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"))
    };
    let cell = if password == PASSWORD { &RIGHT } else { &WRONG };
    *cell.get_or_init(derive)
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

// ---------------------------------------------------------------------------------------
// classify

/// `classify`: a simple Query's text as the session loop inspects it
/// (`client/params.rs::session_change`, which `client/statements.rs` calls for every Query),
/// the same text as a startup `options` string, and the quoting pgmux uses to replay
/// settings:
///
/// - a recognized `SET` has a plain name and a value of the client's own text, one
///   statement (no `;`), never empty; `RESET`/`DEALLOCATE` names come from the text;
/// - leading whitespace does not change the verdict;
/// - `quote_literal` and `quote_ident` read back, by PostgreSQL's rules, as the text.
pub fn classify(data: &[u8]) {
    let change = session_change(data);
    if let Some(change) = &change {
        let text = String::from_utf8_lossy(data);
        match change {
            SessionChange::Set { name, sql } => {
                assert!(!name.is_empty());
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                );
                assert!(!sql.is_empty() && sql.trim() == sql && !sql.contains(';'));
                assert!(text.contains(name.as_str()) && text.contains(sql.as_str()));
            }
            SessionChange::Reset(name) => assert!(text.contains(name.as_str())),
            _ => {}
        }
    }
    let mut padded = b" \t\n".to_vec();
    padded.extend_from_slice(data);
    assert_eq!(session_change(&padded), change, "leading whitespace");

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (name, _) in parse_options(text) {
        assert!(!name.contains('-'), "options names use _ for -");
    }
    let mut params = ClientParams::from_startup(&[("options".into(), text.into())]);
    let _ = params.greeting(server_params());
    if !text.contains('\0') {
        assert_eq!(unquote_literal(&quote_literal(text)).as_deref(), Some(text));
        if !text.is_empty() {
            let ident = quote_ident(text);
            assert_eq!(unquote_ident(&ident).as_deref(), Some(text), "{ident}");
        }
    }
}

/// How pgmux quotes a setting's value in the SQL it sends (`client/params.rs`), for
/// tests/fuzz_corpus.rs to have PostgreSQL read it back.
pub fn quote_setting_value(value: &str) -> String {
    quote_literal(value)
}

/// How pgmux quotes a setting's name in the SQL it sends (`client/params.rs`).
pub fn quote_setting_name(name: &str) -> String {
    quote_ident(name)
}

/// The value of an escape string constant `E'...'`, by PostgreSQL's rules for the escapes
/// `quote_literal` writes (`''` and `\\`); `None` if it is not one.
pub fn unquote_literal(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix("E'")?.strip_suffix('\'')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' if chars.next()? == '\'' => out.push('\''),
            '\\' => match chars.next()? {
                c @ ('\\' | '\'') => out.push(c),
                _ => return None, // quote_literal writes no other escape
            },
            '\'' => return None, // a lone quote would end the literal
            c => out.push(c),
        }
    }
    Some(out)
}

/// The name a SQL identifier stands for: a `"..."` one with `""` for `"`, or a bare one of
/// the characters PostgreSQL reads as they are (lowercase letters, digits, `_`, and `.`
/// between the parts of a qualified setting name). `None` if PostgreSQL would read it as
/// something else.
pub fn unquote_ident(ident: &str) -> Option<String> {
    if let Some(inner) = ident.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        if inner.is_empty() || inner.replace("\"\"", "").contains('"') {
            return None;
        }
        return Some(inner.replace("\"\"", "\""));
    }
    let bare = !ident.is_empty()
        && ident.split('.').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    bare.then(|| ident.to_owned())
}

// ---------------------------------------------------------------------------------------
// config

/// `config`: the text before the first NUL is a config file, read with `${VAR}`
/// interpolation from a fixed environment; the text after it is a userlist file.
///
/// - a config that loads prints (`Config::masked`, what `pgmux check` shows) as TOML that
///   loads again and prints the same;
/// - every problem has a place inside the text;
/// - userlist entries are unique, non-empty names, and written back in the file's own
///   quoting they read back the same.
///
/// A config naming `userlist_file` is not loaded: it would read that path from the disk.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, userlist) = text.split_once('\0').unwrap_or((text, ""));
    if !toml.contains("userlist") {
        check_config(toml);
    }
    check_userlist(userlist);
}

fn fuzz_env(name: &str) -> Option<String> {
    let value = match name {
        "SIZE" => "7",
        "EMPTY" => "",
        "HOST" => "127.0.0.1",
        "QUOTE" => "it's",
        "LINES" => "a\nb",
        "PASS" => "p\"a\\ss",
        "UNICODE" => "\u{e9}\u{20ac}\u{2018}x\u{2019}",
        "CONTROL" => "\u{1}\t\u{7f}",
        "DOLLAR" => "${SIZE}",
        "DURATION" => "1m 30s",
        _ => return None,
    };
    Some(value.to_owned())
}

fn check_config(toml: &str) {
    match Config::parse_with_env(toml, "fuzz.toml", &fuzz_env) {
        Ok(c) => {
            let masked = c.masked();
            let again = Config::parse_with_env(&masked, "masked.toml", &|_| None)
                .unwrap_or_else(|e| panic!("masked config does not load: {e}\n{masked}"));
            assert_eq!(again.masked(), masked, "masked config changes on reload");
            for (name, user) in &c.users {
                if let Some(password) = &user.password {
                    // Validation accepted it: it must make a secret.
                    assert!(Secret::parse(password).is_ok(), "users.{name}.password");
                }
            }
            for db in c.databases.keys() {
                for user in c.users.keys() {
                    assert!(c.pool_settings(db, user).is_some());
                }
            }
        }
        Err(e) => {
            assert!(!e.problems.is_empty());
            let lines = toml.split('\n').count();
            for p in &e.problems {
                if let Some(line) = p.line {
                    assert!((1..=lines).contains(&line), "{p}");
                    assert!(p.column.is_some_and(|c| c >= 1), "{p}");
                }
            }
            let _ = e.to_string();
        }
    }
}

fn check_userlist(text: &str) {
    let (entries, problems) = config::parse_userlist(text, "userlist.txt");
    let lines = text.lines().count();
    let mut names = std::collections::BTreeSet::new();
    let mut written = String::new();
    for (name, secret, line) in &entries {
        assert!(!name.is_empty() && names.insert(name.clone()), "{name}");
        assert!((1..=lines).contains(line));
        let field = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        written.push_str(&format!("{} {}\n", field(name), field(secret)));
    }
    for p in &problems {
        assert!(p.line.is_some_and(|l| (1..=lines).contains(&l)), "{p}");
    }
    let (again, problems) = config::parse_userlist(&written, "again.txt");
    assert!(problems.is_empty(), "{problems:?}\n{written}");
    let pairs = |e: &[(String, String, usize)]| -> Vec<(String, String)> {
        e.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect()
    };
    assert_eq!(pairs(&again), pairs(&entries));
}

// ---------------------------------------------------------------------------------------
// messages

/// `messages`: a client's byte stream through the message codec and the readers and
/// rewriters of the prepared-statement messages. The first byte sets the codec's
/// whole-message limit (in KiB, at least [`FIRST_PART`]), the second how many bytes
/// arrive per read.
///
/// - the frames, parts included, are exactly the bytes received, in order: joined, they are
///   the messages a codec without a limit gives, and what is left is a message still
///   incomplete (or the bytes after a bad length);
/// - the codec holds at most what its limit allows before it starts streaming;
/// - Parse, Bind, Describe and Close read back to their bytes, and a rewritten Bind,
///   Describe or Close reads back with the new name, the rest of the message untouched and
///   a length that counts every byte.
pub fn messages(data: &[u8]) {
    let [limit, chunk, stream @ ..] = data else {
        return;
    };
    // The readers take any bytes without panicking, framed or not.
    let _ = (Parse::read(stream), Describe::read(stream));
    if let Some(bind) = Bind::read(stream) {
        let _ = rewrite_bind(stream, &bind, "pgmux_s1");
    }
    let max_whole = (usize::from(*limit) * 1024).max(FIRST_PART);
    let chunk = usize::from(*chunk).max(1) * 16;

    // The reference, framed here by the protocol's rule: every message whole.
    let mut reference = Vec::new();
    let mut at = 0;
    let reference_error = loop {
        let Some(header) = stream.get(at..).and_then(|s| s.first_chunk::<5>()) else {
            break false;
        };
        let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            break true;
        }
        match stream.get(at..at + 1 + len) {
            Some(message) => reference.push(message.to_vec()),
            None => break false,
        }
        at += 1 + len;
    };
    let reference_end = at;

    // As a session reads it: `chunk` bytes at a time.
    let mut codec = MessageCodec::new(max_whole);
    let mut buf = BytesMut::new();
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut open: Option<Vec<u8>> = None;
    let mut fed = 0;
    let mut error = None;
    'reading: while fed < stream.len() {
        let n = chunk.min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.bytes.is_empty());
                    if frame.starts {
                        assert!(open.is_none(), "a message starts inside another");
                        assert_eq!(frame.tag, frame.bytes[0]);
                        inspect(&frame.bytes, frame.is_whole());
                        open = Some(Vec::new());
                    }
                    let message = open.as_mut().expect("a part follows its start");
                    message.extend_from_slice(&frame.bytes);
                    if frame.ends {
                        messages.push(open.take().expect("open"));
                    }
                    assert_eq!(codec.in_message(), open.is_some());
                }
                Ok(None) => {
                    assert!(
                        codec.in_message() || buf.len() < max_whole,
                        "held {} bytes whole with a limit of {max_whole}",
                        buf.len()
                    );
                    break;
                }
                Err(e) => {
                    error = Some(e);
                    break 'reading;
                }
            }
        }
    }
    assert_eq!(messages, reference, "the frames join into the messages");
    assert_eq!(error.is_some(), reference_error, "{error:?}");
    if let Some(e) = error {
        let refused = match e {
            ProtocolError::BadLength { len, .. } => len < 4,
            ProtocolError::TooLarge { len, max, .. } => len > max && max == MAX_MESSAGE_LEN,
            _ => false,
        };
        assert!(refused && open.is_none(), "{e}");
        assert_eq!(
            &buf[..],
            &stream[reference_end..fed],
            "stops at the bad header"
        );
    } else {
        let open = open.unwrap_or_default();
        let mut rest = open;
        rest.extend_from_slice(&buf);
        assert_eq!(
            rest,
            &stream[reference_end..],
            "what is left is the last message"
        );
    }
}

/// Reads a client message as `client/statements.rs` does, and checks the rewrites.
fn inspect(message: &[u8], is_whole: bool) {
    let body = &message[5..];
    let header_len = u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
    match message[0] {
        b'P' if is_whole => {
            let Some(parse) = Parse::read(body) else {
                return;
            };
            let count = i16::from_be_bytes([
                body[parse.name.len() + parse.query.len() + 2],
                body[parse.name.len() + parse.query.len() + 3],
            ]);
            if count >= 0 {
                let mut again = Vec::new();
                again.extend_from_slice(parse.name.as_bytes());
                again.push(0);
                again.extend_from_slice(parse.query.as_bytes());
                again.push(0);
                again.extend_from_slice(&count.to_be_bytes());
                for oid in &parse.param_types {
                    again.extend_from_slice(&oid.to_be_bytes());
                }
                assert_eq!(&body[..again.len()], again, "Parse reads back");
                assert_eq!(parse.param_types.len(), count as usize);
            }
        }
        b'B' => {
            let Some(bind) = Bind::read(message) else {
                return;
            };
            for server_name in ["", "pgmux_s1", bind.statement, "pgmux_s123456789012345"] {
                let out = rewrite_bind(message, &bind, server_name);
                let again = Bind::read(&out).expect("a rewritten Bind reads");
                assert_eq!((again.portal, again.statement), (bind.portal, server_name));
                assert_eq!(&out[again.rest_at..], &message[bind.rest_at..]);
                let out_len = u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize;
                // Whole: the length counts every byte; a first part: the same growth.
                assert_eq!(
                    out_len as i64 - header_len as i64,
                    out.len() as i64 - message.len() as i64
                );
            }
        }
        tag @ (b'D' | b'C') if is_whole => {
            let Some(described) = Describe::read(body) else {
                return;
            };
            assert_eq!(described.kind, body[0]);
            assert_eq!(described.name.as_bytes(), &body[1..=described.name.len()]);
            let mut out = rewrite_describe(tag, described.name);
            let frame = MessageCodec::default()
                .decode(&mut out)
                .expect("a rewritten Describe frames")
                .expect("whole");
            assert!(out.is_empty() && frame.tag == tag);
            let again = Describe::read(frame.body()).expect("reads");
            assert_eq!((again.kind, again.name), (b'S', described.name));
        }
        _ => {}
    }
}

/// A message with this tag and body, its length filled in.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
    out.to_vec()
}
