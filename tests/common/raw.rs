//! The wire protocol by hand, for tests that need exact bytes: malformed input, pipelines,
//! and the precise order of replies.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::TestPgmux;

/// A plain TCP connection to pgmux's client port, nothing sent yet.
pub async fn connect(mux: &TestPgmux) -> TcpStream {
    TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap()
}

/// Sends an SSLRequest on `s` and asserts that pgmux declines it (`N`).
pub async fn ssl_request_declined(s: &mut TcpStream) {
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
}

/// Sends `bytes` on a new connection and returns the (SQLSTATE, message) of the first
/// ErrorResponse pgmux answers (panics if none comes within 5 s).
pub async fn refusal(mux: &TestPgmux, bytes: &[u8]) -> (String, String) {
    let mut s = connect(mux).await;
    s.write_all(bytes).await.unwrap();
    first_error(&read_messages(&mut s, Duration::from_secs(5)).await).expect("an error")
}

/// One tagged message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A StartupMessage for protocol 3.`minor` with these parameters.
pub fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = ((3u32 << 16) | minor as u32).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// Parse with a statement name and query text, no parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

/// Bind of `statement` to the unnamed portal, no parameters.
pub fn bind(statement: &str) -> Vec<u8> {
    msg(b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes())
}

/// Execute of the unnamed portal, all rows.
pub fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

/// Sync.
pub fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

/// Describe of statement `name`.
pub fn describe(name: &str) -> Vec<u8> {
    msg(b'D', format!("S{name}\0").as_bytes())
}

/// Close of statement `name`.
pub fn close(name: &str) -> Vec<u8> {
    msg(b'C', format!("S{name}\0").as_bytes())
}

/// A simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', format!("{sql}\0").as_bytes())
}

/// Reads tagged messages until EOF or `limit`; returns (tag, body) pairs.
pub async fn read_messages(stream: &mut TcpStream, limit: Duration) -> Vec<(u8, Vec<u8>)> {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    split_messages(&raw).0
}

/// Whole messages at the start of `raw`, and how many bytes they took.
fn split_messages(raw: &[u8]) -> (Vec<(u8, Vec<u8>)>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while raw.len() - at >= 5 {
        let len = u32::from_be_bytes([raw[at + 1], raw[at + 2], raw[at + 3], raw[at + 4]]) as usize;
        if raw.len() - at < 1 + len {
            break;
        }
        out.push((raw[at], raw[at + 5..at + 1 + len].to_vec()));
        at += 1 + len;
    }
    (out, at)
}

/// The SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
            Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// The SQLSTATE and message of the first ErrorResponse.
pub fn first_error(messages: &[(u8, Vec<u8>)]) -> Option<(String, String)> {
    let (_, body) = messages.iter().find(|(t, _)| *t == b'E')?;
    Some(error_fields(body))
}

/// A client on a raw socket, logged in (trust) and reading replies message by message.
pub struct Raw {
    /// The socket.
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Wraps a socket that is already past (or not yet at) login.
    pub fn from_stream(s: TcpStream) -> Raw {
        Raw { s, buf: Vec::new() }
    }

    /// Connects to pgmux (which must use `trust`) as `app` on database `app`.
    pub async fn login(mux: &TestPgmux) -> Raw {
        Raw::login_with(mux, 0, &[("user", "app"), ("database", "app")])
            .await
            .0
    }

    /// Connects with a startup packet of protocol 3.`minor` and these parameters; returns
    /// the client and every message up to the first ReadyForQuery, as (tag, body).
    pub async fn login_with(
        mux: &TestPgmux,
        minor: u16,
        params: &[(&str, &str)],
    ) -> (Raw, Vec<(u8, Vec<u8>)>) {
        let mut s = TcpStream::connect(("127.0.0.1", mux.port)).await.unwrap();
        s.write_all(&startup_packet(minor, params)).await.unwrap();
        let mut raw = Raw { s, buf: Vec::new() };
        let greeting = raw.messages_until_ready().await;
        (raw, greeting)
    }

    /// Sends `messages` and returns the replies up to ReadyForQuery, each shown as its tag,
    /// an ErrorResponse as `E:<sqlstate>`, a DataRow as `D:<first column>`; ParameterStatus,
    /// NoticeResponse and the like are left out.
    pub async fn run(&mut self, messages: &[Vec<u8>]) -> Vec<String> {
        self.s.write_all(&messages.concat()).await.unwrap();
        let mut out = Vec::new();
        for (tag, body) in self.messages_until_ready().await {
            let shown = match tag {
                b'E' => format!("E:{}", error_fields(&body).0),
                b'D' => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                    format!("D:{}", String::from_utf8_lossy(&body[6..6 + len]))
                }
                b'Z' | b'S' | b'K' | b'R' | b'N' => continue,
                other => char::from(other).to_string(),
            };
            out.push(shown);
        }
        out
    }

    /// Reads up to and including a ReadyForQuery; panics if none comes within 10 s.
    pub async fn messages_until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (messages, _) = split_messages(&self.buf);
            let mut used = 0;
            for (tag, body) in messages {
                used += 5 + body.len();
                let ready = tag == b'Z';
                out.push((tag, body));
                if ready {
                    // Keep what came after it for the next call.
                    self.buf.drain(..used);
                    return out;
                }
            }
            self.buf.drain(..used);
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(n > 0, "connection closed; so far {out:?}");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until `needle` has been seen in the raw bytes (for replies without a
    /// ReadyForQuery, such as results after a Flush).
    pub async fn read_until(&mut self, needle: &[u8]) -> Vec<u8> {
        let mut seen = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 4096];
        while !seen.windows(needle.len()).any(|w| w == needle) {
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(
                n > 0,
                "closed; got so far {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&chunk[..n]);
        }
        seen
    }
}
