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
///
/// `bind` must have been read from `message`; the codec guarantees that the length in its
/// header covers the names. Should either not hold, the result is still a message (with a
/// length the server refuses), never a panic.
pub fn rewrite_bind(message: &[u8], bind: &Bind<'_>, server_name: &str) -> BytesMut {
    let old_len = message
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_be_bytes(b) as usize);
    let new_len = (old_len + server_name.len()).saturating_sub(bind.statement.len());
    let mut out = BytesMut::with_capacity(message.len() + server_name.len());
    out.put_u8(b'B');
    out.put_u32(u32::try_from(new_len).unwrap_or(u32::MAX));
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

    fn bind_message(portal: &str, statement: &str, rest: &[u8]) -> Vec<u8> {
        let mut body = format!("{portal}\0{statement}\0").into_bytes();
        body.extend_from_slice(rest);
        let mut msg = vec![b'B'];
        msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    proptest::proptest! {
        /// Parse's fields read back as written.
        #[test]
        fn parse_reads_back(
            name in "[^\0]{0,20}",
            query in "[^\0]{0,100}",
            oids in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..10),
        ) {
            let mut body = format!("{name}\0{query}\0").into_bytes();
            body.extend_from_slice(&(oids.len() as i16).to_be_bytes());
            for oid in &oids {
                body.extend_from_slice(&oid.to_be_bytes());
            }
            let p = Parse::read(&body).unwrap();
            proptest::prop_assert_eq!((p.name, p.query, p.param_types), (name.as_str(), query.as_str(), oids));
        }

        /// A rewritten Bind names the server's statement, keeps the portal and every byte
        /// after the names, and its length counts every byte; a first part of a large Bind
        /// grows its length by the same amount as its bytes.
        #[test]
        fn bind_rewrite_reads_back(
            portal in "[^\0]{0,12}",
            statement in "[^\0]{0,30}",
            rest in proptest::collection::vec(0u8..=255, 0..200),
            server_name in "[a-z0-9_]{0,30}",
            cut in 0usize..200,
        ) {
            let msg = bind_message(&portal, &statement, &rest);
            let bind = Bind::read(&msg).unwrap();
            let out = rewrite_bind(&msg, &bind, &server_name);
            let again = Bind::read(&out).unwrap();
            proptest::prop_assert_eq!((again.portal, again.statement), (portal.as_str(), server_name.as_str()));
            proptest::prop_assert_eq!(&out[again.rest_at..], &rest[..]);
            let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
            proptest::prop_assert_eq!(len + 1, out.len());

            // A first part: the header still counts the whole message, rewritten.
            let part = &msg[..bind.rest_at + cut.min(rest.len())];
            let bind = Bind::read(part).unwrap();
            let first = rewrite_bind(part, &bind, &server_name);
            proptest::prop_assert_eq!(&first[..], &out[..first.len()]);
        }

        /// A rewritten Describe or Close reads back as a statement of the new name.
        #[test]
        fn describe_rewrite_reads_back(name in "[^\0]{0,40}", close in proptest::prelude::any::<bool>()) {
            let tag = if close { b'C' } else { b'D' };
            let out = rewrite_describe(tag, &name);
            let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
            proptest::prop_assert_eq!((out[0], len + 1), (tag, out.len()));
            let d = Describe::read(&out[5..]).unwrap();
            proptest::prop_assert_eq!((d.kind, d.name), (b'S', name.as_str()));
        }
    }
}
