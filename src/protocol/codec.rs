//! Framing of tagged protocol messages, without parsing them.
//!
//! The decoder reads the 5-byte header (tag, length) and hands back the message as it
//! arrived: a [`Frame`] whose bytes are split off the read buffer (no copy). A message
//! larger than `max_whole` is not buffered whole: it comes out in parts as its bytes
//! arrive, so a 100 MB DataRow costs a pooler no more than one read buffer.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Largest length the protocol allows in a message header (PostgreSQL caps at 1 GB).
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// The least a large message's first part holds (header and leading fields).
pub const FIRST_PART: usize = 4096;

/// How much of a message the codec buffers whole by default before it streams it.
pub const DEFAULT_MAX_WHOLE: usize = 64 * 1024;

/// A protocol violation by the peer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The length in a message header is impossible.
    #[error("invalid message length {len} for message type '{tag}'", tag = char::from(*.tag))]
    BadLength { tag: u8, len: usize },
    /// The length in a message header is above the configured limit.
    #[error("message type '{tag}' of {len} bytes is larger than max_message_size ({max} bytes)", tag = char::from(*.tag))]
    TooLarge { tag: u8, len: usize, max: usize },
    /// A message type that is not allowed here.
    #[error("invalid message type '{tag}' (byte {byte})", tag = char::from(*.byte).escape_default(), byte = *.byte)]
    UnknownType { byte: u8 },
    /// A message body did not have the fields its type requires.
    #[error("malformed {0} message")]
    Malformed(&'static str),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One message, or one part of a large one, exactly as received.
#[derive(Debug)]
pub struct Frame {
    /// The message type.
    pub tag: u8,
    /// The raw bytes: header included when `starts`.
    pub bytes: BytesMut,
    /// These bytes begin the message (they hold its header).
    pub starts: bool,
    /// These bytes end the message.
    pub ends: bool,
}

impl Frame {
    /// Whether the frame holds a whole message (header and complete body).
    pub fn is_whole(&self) -> bool {
        self.starts && self.ends
    }

    /// The body of a whole message (after the 5-byte header). Empty for parts.
    pub fn body(&self) -> &[u8] {
        if self.is_whole() {
            self.bytes.get(5..).unwrap_or_default()
        } else {
            &[]
        }
    }
}

/// One message, or one part of a large one, framed where it lies in a read buffer (not
/// split off it): [`MessageCodec::frame_in`]. What a [`Frame`] says, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct FrameRef<'b> {
    /// The message type.
    pub tag: u8,
    /// The raw bytes: header included when `starts`.
    pub bytes: &'b [u8],
    /// These bytes begin the message (they hold its header).
    pub starts: bool,
    /// These bytes end the message.
    pub ends: bool,
}

impl<'b> FrameRef<'b> {
    /// Whether the frame holds a whole message (header and complete body).
    pub fn is_whole(&self) -> bool {
        self.starts && self.ends
    }

    /// The body of a whole message (after the 5-byte header). Empty for parts.
    pub fn body(&self) -> &'b [u8] {
        if self.is_whole() {
            self.bytes.get(5..).unwrap_or_default()
        } else {
            &[]
        }
    }
}

impl Frame {
    /// The same frame, borrowed.
    pub fn as_ref(&self) -> FrameRef<'_> {
        FrameRef {
            tag: self.tag,
            bytes: &self.bytes,
            starts: self.starts,
            ends: self.ends,
        }
    }
}

/// What [`MessageCodec::frame_in`] found at the start of the bytes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framed {
    /// The next message or part: the first `len` bytes.
    Part {
        tag: u8,
        len: usize,
        starts: bool,
        ends: bool,
    },
    /// Not enough bytes yet: `reserve` more would let the next part through (0: any).
    Incomplete { reserve: usize },
}

/// Frames tagged messages. Cancel-safe: all state lives in the codec and the buffer.
#[derive(Debug)]
pub struct MessageCodec {
    max_whole: usize,
    /// Largest message accepted (length field + tag).
    max_len: usize,
    /// Tag and bytes still to come of a message being streamed in parts.
    streaming: Option<(u8, usize)>,
}

impl MessageCodec {
    /// A codec that buffers messages up to `max_whole` bytes and streams larger ones.
    pub fn new(max_whole: usize) -> Self {
        MessageCodec {
            max_whole: max_whole.max(FIRST_PART),
            max_len: MAX_MESSAGE_LEN,
            streaming: None,
        }
    }

    /// Refuses messages larger than `max_len` bytes (at most [`MAX_MESSAGE_LEN`]).
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len.min(MAX_MESSAGE_LEN);
        self
    }

    /// Whether a message is only partly through (its header went by, its end did not).
    pub fn in_message(&self) -> bool {
        self.streaming.is_some()
    }
}

impl Default for MessageCodec {
    fn default() -> Self {
        MessageCodec::new(DEFAULT_MAX_WHOLE)
    }
}

impl MessageCodec {
    /// Frames the next message (or part of a large one) at the start of `src`, without
    /// splitting it off: the caller consumes the `len` bytes of a [`Framed::Part`] before
    /// it frames again (the codec counts them as read). The same rules as
    /// [`Decoder::decode`], which is built on it.
    pub fn frame_in(&mut self, src: &[u8]) -> Result<Framed, ProtocolError> {
        if let Some((tag, remaining)) = self.streaming {
            if src.is_empty() {
                return Ok(Framed::Incomplete { reserve: 0 });
            }
            let n = remaining.min(src.len());
            let ends = n == remaining;
            self.streaming = if ends {
                None
            } else {
                Some((tag, remaining - n))
            };
            return Ok(Framed::Part {
                tag,
                len: n,
                starts: false,
                ends,
            });
        }
        let Some(header) = src.first_chunk::<5>() else {
            return Ok(Framed::Incomplete { reserve: 0 });
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 {
            return Err(ProtocolError::BadLength { tag, len });
        }
        if len > self.max_len {
            return Err(ProtocolError::TooLarge {
                tag,
                len,
                max: self.max_len,
            });
        }
        let total = 1 + len;
        if src.len() >= total {
            return Ok(Framed::Part {
                tag,
                len: total,
                starts: true,
                ends: true,
            });
        }
        if total <= self.max_whole {
            return Ok(Framed::Incomplete {
                reserve: total - src.len(),
            });
        }
        if src.len() < FIRST_PART {
            // The first part carries the names at the start of a Bind or Parse.
            return Ok(Framed::Incomplete {
                reserve: FIRST_PART - src.len(),
            });
        }
        // Too large to hold: pass on what we have and stream the rest.
        let n = src.len();
        self.streaming = Some((tag, total - n));
        Ok(Framed::Part {
            tag,
            len: n,
            starts: true,
            ends: false,
        })
    }
}

impl Decoder for MessageCodec {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        match self.frame_in(src)? {
            Framed::Part {
                tag,
                len,
                starts,
                ends,
            } => Ok(Some(Frame {
                tag,
                bytes: src.split_to(len),
                starts,
                ends,
            })),
            Framed::Incomplete { reserve } => {
                if reserve > 0 {
                    src.reserve(reserve);
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn whole_messages_come_out_one_by_one() {
        let mut codec = MessageCodec::default();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&msg(b'Q', b"select 1\0"));
        buf.extend_from_slice(&msg(b'S', b""));
        let a = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            (a.tag, a.is_whole(), a.body()),
            (b'Q', true, &b"select 1\0"[..])
        );
        let b = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!((b.tag, b.is_whole(), b.body().len()), (b'S', true, 0));
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn incomplete_small_message_waits() {
        let mut codec = MessageCodec::default();
        let full = msg(b'Q', b"select 1\0");
        let mut buf = BytesMut::from(&full[..7]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&full[7..]);
        assert!(codec.decode(&mut buf).unwrap().unwrap().is_whole());
    }

    #[test]
    fn large_message_streams_in_parts() {
        let mut codec = MessageCodec::new(16);
        let full = msg(b'D', &[7u8; 10_000]);
        let mut buf = BytesMut::from(&full[..40]);
        assert!(
            codec.decode(&mut buf).unwrap().is_none(),
            "waits for a first part"
        );
        buf.extend_from_slice(&full[40..FIRST_PART + 100]);
        let first = codec.decode(&mut buf).unwrap().unwrap();
        assert!(first.starts && !first.ends && first.bytes.len() == FIRST_PART + 100);
        assert!(codec.in_message());
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&full[FIRST_PART + 100..]);
        buf.extend_from_slice(&msg(b'Z', b"I"));
        let rest = codec.decode(&mut buf).unwrap().unwrap();
        assert!(!rest.starts && rest.ends && rest.bytes.len() == full.len() - FIRST_PART - 100);
        let z = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!((z.tag, z.body()), (b'Z', &b"I"[..]));
    }

    #[test]
    fn impossible_lengths_are_errors() {
        let mut codec = MessageCodec::default();
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(ProtocolError::BadLength { len: 3, .. })
        ));
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(codec.decode(&mut buf).is_err());
    }

    proptest::proptest! {
        /// However the bytes arrive and whatever the limit, the frames join into exactly
        /// the messages sent, and nothing is left over.
        #[test]
        fn frames_join_into_the_messages_whatever_the_reads(
            messages in proptest::collection::vec(
                (proptest::prelude::any::<u8>(), proptest::collection::vec(0u8..=255, 0..9000)),
                0..8,
            ),
            max_whole in 0usize..20_000,
            reads in proptest::collection::vec(1usize..5000, 1..20),
        ) {
            let sent: Vec<Vec<u8>> = messages.iter().map(|(t, b)| msg(*t, b)).collect();
            let stream = sent.concat();
            let mut codec = MessageCodec::new(max_whole);
            let mut buf = BytesMut::new();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut open: Option<Vec<u8>> = None;
            let mut fed = 0;
            for n in reads.iter().cycle() {
                if fed == stream.len() {
                    break;
                }
                let n = (*n).min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
                while let Some(frame) = codec.decode(&mut buf).unwrap() {
                    let mut message = if frame.starts { Vec::new() } else { open.take().unwrap() };
                    message.extend_from_slice(&frame.bytes);
                    if frame.ends {
                        got.push(message);
                    } else {
                        open = Some(message);
                    }
                }
            }
            proptest::prop_assert_eq!(got, sent);
            proptest::prop_assert!(buf.is_empty() && open.is_none() && !codec.in_message());
        }
    }
}
