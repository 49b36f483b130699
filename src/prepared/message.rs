//! Reading and rewriting the extended-protocol messages that name statements.

use bytes::{BufMut, BytesMut};

use crate::protocol::{read_cstr, read_i32};

/// A Parse message's fields.
pub struct Parse<'a> {
    /// Statement name; empty for the unnamed statement.
    pub name: &'a str,
    /// Query text.
    pub query: &'a str,
    /// Parameter type OIDs (0 = unspecified).
    pub param_types: Vec<u32>,
}

impl<'a> Parse<'a> {
    /// Reads a Parse body.
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (name, rest) = read_cstr(body)?;
        let (query, rest) = read_cstr(rest)?;
        let (count, mut rest) = rest.split_first_chunk::<2>()?;
        let count = i16::from_be_bytes(*count);
        let mut param_types = Vec::with_capacity(count.max(0) as usize);
        for _ in 0..count {
            let (oid, after) = read_i32(rest)?;
            param_types.push(oid as u32);
            rest = after;
        }
        Some(Parse {
            name,
            query,
            param_types,
        })
    }
}

/// The start of a Bind message: portal and statement names.
pub struct Bind<'a> {
    /// Destination portal.
    pub portal: &'a str,
    /// Source statement; empty for the unnamed statement.
    pub statement: &'a str,
    /// Offset in the message (header included) where the rest of the body starts.
    pub rest_at: usize,
}

impl<'a> Bind<'a> {
    /// Reads the names at the start of a Bind message (`message` includes the header; only
    /// its first bytes are needed, so this works on the first part of a large Bind).
    pub fn read(message: &'a [u8]) -> Option<Self> {
        let body = message.get(5..)?;
        let (portal, rest) = read_cstr(body)?;
        let (statement, rest) = read_cstr(rest)?;
        Some(Bind {
            portal,
            statement,
            rest_at: message.len() - rest.len(),
        })
    }
}

/// A Describe message: `S` statement or `P` portal, and its name.
pub struct Describe<'a> {
    /// `S` or `P`.
    pub kind: u8,
    /// The name.
    pub name: &'a str,
}

impl<'a> Describe<'a> {
    /// Reads a Describe body.
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (&kind, rest) = body.split_first()?;
        let (name, _) = read_cstr(rest)?;
        Some(Describe { kind, name })
    }
}

/// A Close message: same shape as Describe.
pub type Close<'a> = Describe<'a>;

/// A Bind (or its first part) naming `server_name` instead of the client's statement name.
/// The length in the header accounts for the whole message, so a large Bind's other parts
/// follow unchanged.
pub fn rewrite_bind(message: &[u8], bind: &Bind<'_>, server_name: &str) -> BytesMut {
    let old_len = message
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_be_bytes(b) as usize);
    let new_len = (old_len + server_name.len()).saturating_sub(bind.statement.len());
    let mut out = BytesMut::with_capacity(message.len() + server_name.len());
    out.put_u8(b'B');
    out.put_u32(new_len as u32);
    out.put_slice(bind.portal.as_bytes());
    out.put_u8(0);
    out.put_slice(server_name.as_bytes());
    out.put_u8(0);
    out.put_slice(message.get(bind.rest_at..).unwrap_or_default());
    out
}

/// A Describe or Close (`tag`) of statement `server_name`.
pub fn rewrite_describe(tag: u8, server_name: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(server_name.len() + 7);
    out.put_u8(tag);
    out.put_u32((server_name.len() + 6) as u32);
    out.put_u8(b'S');
    out.put_slice(server_name.as_bytes());
    out.put_u8(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_rewrite_keeps_the_rest_and_fixes_the_length() {
        let mut msg = vec![b'B', 0, 0, 0, 0];
        msg.extend_from_slice(b"p1\0s1\0\0\0\0\x01\0\0\0\x011\0\0");
        let len = (msg.len() - 1) as u32;
        msg[1..5].copy_from_slice(&len.to_be_bytes());
        let bind = Bind::read(&msg).unwrap();
        assert_eq!((bind.portal, bind.statement), ("p1", "s1"));
        let out = rewrite_bind(&msg, &bind, "pgmux_s7");
        let new_len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(new_len + 1, out.len());
        assert!(out.ends_with(b"\0\0\0\x01\0\0\0\x011\0\0"));
        assert_eq!(Bind::read(&out).unwrap().statement, "pgmux_s7");
    }

    #[test]
    fn parse_fields() {
        let body = b"name\0SELECT $1\0\0\x01\0\0\0\x17";
        let p = Parse::read(body).unwrap();
        assert_eq!(
            (p.name, p.query, p.param_types),
            ("name", "SELECT $1", vec![23])
        );
        assert!(Parse::read(b"name\0SELECT").is_none());
    }
}
