//! The PostgreSQL wire protocol, as far as a pooler needs it.
//!
//! [`codec`] frames messages without parsing them; [`startup`] reads the untagged packets a
//! connection begins with; [`write`] builds the few messages pgmux itself sends to clients;
//! [`sqlstate`] names the error codes clients see.

pub mod codec;
pub mod read;
pub mod sqlstate;
pub mod startup;
pub mod write;

pub use codec::{Frame, FrameRef, Framed, MessageCodec, ProtocolError};
pub use sqlstate::SqlState;
pub use write::PgError;

/// Message tags pgmux looks at. Everything else is forwarded untouched.
pub mod tag {
    // Frontend (client -> server).
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const EXECUTE: u8 = b'E';
    pub const DESCRIBE: u8 = b'D';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';

    // Backend (server -> client).
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Reads a NUL-terminated string at the start of `buf`; returns it and the rest.
pub fn read_cstr(buf: &[u8]) -> Option<(&str, &[u8])> {
    // Names are short, query texts long: a byte loop for the first bytes, then SIMD.
    let head = buf.get(..16).unwrap_or(buf);
    let end = match head.iter().position(|&b| b == 0) {
        Some(end) => end,
        None => head.len() + memchr::memchr(0, buf.get(head.len()..)?)?,
    };
    let (s, rest) = buf.split_at_checked(end)?;
    let s = std::str::from_utf8(s).ok()?;
    Some((s, rest.get(1..)?))
}

/// Reads a big-endian i32 at the start of `buf`; returns it and the rest.
pub fn read_i32(buf: &[u8]) -> Option<(i32, &[u8])> {
    let (head, rest) = buf.split_first_chunk::<4>()?;
    Some((i32::from_be_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::read_cstr;

    proptest::proptest! {
        /// The string ends at the first NUL wherever it is (in the first 16 bytes, looked
        /// at one by one, or after them, searched); no NUL, or bytes that are not UTF-8:
        /// `None`.
        #[test]
        fn read_cstr_stops_at_the_first_nul(
            // Mostly ASCII, some UTF-8 (é) and some bytes that are never UTF-8.
            bytes in proptest::collection::vec(
                proptest::sample::select(vec![b'a', b'b', b'c', b'_', b'1', 0xc3, 0xa9, 0xff]),
                0..80,
            ),
            nul_at in proptest::option::of(0usize..80),
        ) {
            let mut bytes = bytes;
            if let Some(at) = nul_at.filter(|&at| at < bytes.len()) {
                bytes[at] = 0;
            }
            let want = bytes.iter().position(|&b| b == 0).and_then(|end| {
                let s = std::str::from_utf8(&bytes[..end]).ok()?;
                Some((s, &bytes[end + 1..]))
            });
            proptest::prop_assert_eq!(read_cstr(&bytes), want);
        }
    }
}
