//! The untagged packets a client connection begins with: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage; and a Terminate message in their place.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{read_cstr, read_i32};

/// PostgreSQL refuses startup packets above this size; so do we.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// The first four bytes of a Terminate message ('X', then its length 4). Read as a
/// startup packet length it is 1476395008, far above [`MAX_STARTUP_PACKET`], so it
/// cannot be the start of a real packet.
const TERMINATE_START: [u8; 4] = [b'X', 0, 0, 0];

/// The first packet a client sent.
#[derive(Debug)]
pub enum StartupPacket {
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption.
    GssEncRequest,
    /// Cancel the query running for this key.
    Cancel { process_id: i32, secret: i32 },
    /// A protocol 3.x StartupMessage.
    Startup(Startup),
    /// Not a packet: a Terminate message ('X', length 4) where a packet should be. A client
    /// closed while it was still connecting (node-postgres does); PostgreSQL and PgBouncer
    /// close without a word, and so does pgmux.
    Terminate,
}

/// A StartupMessage: protocol minor version and parameters in the order sent.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    /// The 3.x minor version the client asked for.
    pub minor: u16,
    /// Every parameter, `_pq_.` options included.
    pub params: Vec<(String, String)>,
}

impl Startup {
    /// The value of a parameter, if sent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a startup packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Length below 8 or above [`MAX_STARTUP_PACKET`].
    #[error("invalid startup packet length {0}")]
    BadLength(usize),
    /// A protocol major version other than 3.
    #[error("unsupported frontend protocol {0}.{1}: pgmux speaks 3.0")]
    UnsupportedProtocol(u16, u16),
    /// The parameters were not NUL-terminated pairs.
    #[error("malformed startup packet")]
    Malformed,
    /// The socket failed or closed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one startup packet through `buf`, which keeps whatever the client sent after it.
/// Reads take what the socket has (one read for a whole packet, usually), never more than
/// [`MAX_STARTUP_PACKET`] ahead. Not cancel-safe (use it under a timeout that ends the
/// session).
pub async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<StartupPacket, StartupError> {
    loop {
        if let Some(header) = buf.first_chunk::<4>() {
            let len = u32::from_be_bytes(*header) as usize;
            if *header == TERMINATE_START {
                // One more byte tells a Terminate from a bad length.
                match buf.get(4) {
                    Some(4) => {
                        let _ = buf.split_to(5);
                        return Ok(StartupPacket::Terminate);
                    }
                    Some(_) => return Err(StartupError::BadLength(len)),
                    None => buf.reserve(1),
                }
            } else if !(8..=MAX_STARTUP_PACKET).contains(&len) {
                return Err(StartupError::BadLength(len));
            } else if buf.len() >= len {
                let packet = buf.split_to(len);
                return parse_packet(packet.get(4..).unwrap_or_default());
            } else {
                buf.reserve(len - buf.len());
            }
        } else {
            buf.reserve(READ_AHEAD);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}

/// Room for a first read: a typical startup packet, whole.
const READ_AHEAD: usize = 512;

/// Parses a startup packet body (after its length).
pub fn parse_packet(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let (code, rest) = read_i32(body).ok_or(StartupError::Malformed)?;
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            let (process_id, rest) = read_i32(rest).ok_or(StartupError::Malformed)?;
            let (secret, _) = read_i32(rest).ok_or(StartupError::Malformed)?;
            Ok(StartupPacket::Cancel { process_id, secret })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol(major, minor));
            }
            // As PostgreSQL reads it: name/value pairs up to an empty name, which must be
            // the last byte ("invalid startup packet layout" otherwise).
            let mut params = Vec::new();
            let mut rest = rest;
            loop {
                match rest {
                    [0] => break,
                    [] | [0, ..] => return Err(StartupError::Malformed),
                    _ => {
                        let (name, after) = read_cstr(rest).ok_or(StartupError::Malformed)?;
                        let (value, after) = read_cstr(after).ok_or(StartupError::Malformed)?;
                        params.push((name.to_owned(), value.to_owned()));
                        rest = after;
                    }
                }
            }
            Ok(StartupPacket::Startup(Startup { minor, params }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_parameters() {
        let mut body = 196608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0database\0db\0\0");
        let StartupPacket::Startup(s) = parse_packet(&body).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(
            (s.minor, s.get("user"), s.get("database")),
            (0, Some("app"), Some("db"))
        );
    }

    #[test]
    fn rejects_bad_packets() {
        let mut body = (2i32 << 16).to_be_bytes().to_vec();
        body.extend_from_slice(b"\0");
        assert!(matches!(
            parse_packet(&body),
            Err(StartupError::UnsupportedProtocol(2, 0))
        ));
        let mut body = 196608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app");
        assert!(matches!(parse_packet(&body), Err(StartupError::Malformed)));
        assert!(matches!(
            parse_packet(&[1, 2]),
            Err(StartupError::Malformed)
        ));
        // Found by fuzzing: an empty name ends the parameters, and only at the last byte.
        for layout in [&b"user\0app\0"[..], b"\0x\0y\0\0", b"user\0app\0\0\0", b""] {
            let mut body = 196608i32.to_be_bytes().to_vec();
            body.extend_from_slice(layout);
            assert!(
                matches!(parse_packet(&body), Err(StartupError::Malformed)),
                "{layout:?}"
            );
        }
    }

    #[test]
    fn a_terminate_in_place_of_a_packet_is_told_apart_from_a_bad_length() {
        let read = |bytes: &'static [u8]| {
            let mut reader = bytes;
            let mut buf = BytesMut::new();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(read_packet(&mut reader, &mut buf))
        };
        assert!(matches!(read(b"X\0\0\0\x04"), Ok(StartupPacket::Terminate)));
        assert!(matches!(
            read(b"X\0\0\0\x05\0"),
            Err(StartupError::BadLength(1476395008))
        ));
        // The client closed after the first four bytes: it is gone, nothing to say.
        assert!(matches!(read(b"X\0\0\0"), Err(StartupError::Io(_))));
    }

    proptest::proptest! {
        /// A StartupMessage read in reads of any size gives back its parameters, and the
        /// bytes after it stay in the buffer for the session.
        #[test]
        fn startup_packets_read_back(
            minor in 0u16..8,
            params in proptest::collection::vec(("[^\0]{1,12}", "[^\0]{0,12}"), 0..6),
            after in proptest::collection::vec(0u8..=255, 0..40),
            read in 1usize..64,
        ) {
            let mut body = ((3u32 << 16) | u32::from(minor)).to_be_bytes().to_vec();
            for (name, value) in &params {
                body.extend_from_slice(name.as_bytes());
                body.push(0);
                body.extend_from_slice(value.as_bytes());
                body.push(0);
            }
            body.push(0);
            let mut stream = (body.len() as u32 + 4).to_be_bytes().to_vec();
            stream.extend_from_slice(&body);
            stream.extend_from_slice(&after);
            let chunks: Vec<std::io::Result<bytes::Bytes>> = stream
                .chunks(read)
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            let mut reader = tokio_util::io::StreamReader::new(futures_util::stream::iter(chunks));
            let mut buf = BytesMut::new();
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let packet = runtime.block_on(read_packet(&mut reader, &mut buf)).unwrap();
            let StartupPacket::Startup(s) = packet else {
                panic!("not a StartupMessage: {packet:?}");
            };
            proptest::prop_assert_eq!(s.minor, minor);
            proptest::prop_assert_eq!(s.params, params);
            proptest::prop_assert!(after.starts_with(&buf));
        }
    }
}
