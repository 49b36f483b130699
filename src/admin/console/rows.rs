//! Result sets as the console sends them: a RowDescription with PgBouncer's column types,
//! DataRows of text values, and the small messages around them.

use std::time::{Duration, SystemTime};

use bytes::{BufMut, BytesMut};

use crate::protocol::write::{cstr, message};

/// A column's type, as PgBouncer declares it (`src/pktbuf.c` of PgBouncer 1.25: `i` int4,
/// `q` int8, `N` numeric, `b` bytea, `s` and `T` text; `Float8` is pgmux's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Text,
    Int4,
    Int8,
    Numeric,
    Float8,
    Bytea,
}

impl Type {
    /// The type's OID and length in a RowDescription.
    pub fn oid_and_len(self) -> (i32, i16) {
        match self {
            Type::Text => (25, -1),
            Type::Int4 => (23, 4),
            Type::Int8 => (20, 8),
            Type::Numeric => (1700, -1),
            Type::Float8 => (701, 8),
            Type::Bytea => (17, -1),
        }
    }
}

/// A result set: column names and types, then rows of text values (`None` = NULL).
pub struct Rows {
    pub columns: Vec<(&'static str, Type)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Rows {
    /// A result set with these columns and no rows yet.
    pub fn new(columns: &[(&'static str, Type)]) -> Rows {
        Rows {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends RowDescription and one DataRow per row to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        message(out, b'T', |b| {
            b.put_i16(self.columns.len() as i16);
            for (name, ty) in &self.columns {
                cstr(b, name);
                b.put_i32(0); // table oid
                b.put_i16(0); // column number
                let (oid, len) = ty.oid_and_len();
                b.put_i32(oid);
                b.put_i16(len);
                b.put_i32(-1); // type modifier
                b.put_i16(0); // text format
            }
        });
        for row in &self.rows {
            message(out, b'D', |b| {
                b.put_i16(row.len() as i16);
                for value in row {
                    match value {
                        Some(v) => {
                            b.put_i32(v.len() as i32);
                            b.put_slice(v.as_bytes());
                        }
                        None => b.put_i32(-1),
                    }
                }
            });
        }
    }
}

/// CommandComplete with `tag`.
pub fn complete(out: &mut BytesMut, tag: &str) {
    message(out, b'C', |b| cstr(b, tag));
}

/// EmptyQueryResponse.
pub fn empty_query(out: &mut BytesMut) {
    message(out, b'I', |_| {});
}

/// A NoticeResponse (00000) saying `text`.
pub fn notice(out: &mut BytesMut, text: &str) {
    message(out, b'N', |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "00000"),
            (b'M', text),
        ] {
            b.put_u8(field);
            cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// A number as a value.
pub fn int(n: impl ToString) -> Option<String> {
    Some(n.to_string())
}

/// A text value.
pub fn text(s: impl Into<String>) -> Option<String> {
    Some(s.into())
}

/// `host`, `port` from `host:port` (or `[v6]:port`).
pub fn split_addr(addr: &str) -> (String, String) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.trim_matches(['[', ']']).to_owned(), port.to_owned()),
        None => (addr.to_owned(), "0".to_owned()),
    }
}

/// The wall-clock time `ago` before now as PgBouncer writes timestamps
/// (`2026-11-30 12:00:00 UTC`); pgmux always writes UTC.
pub fn timestamp_ago(ago: Duration) -> String {
    let at = SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // RFC 3339 `2026-11-30T12:00:00Z`, respelt.
    let rfc = humantime::format_rfc3339_seconds(at).to_string();
    format!("{} UTC", rfc.replace('T', " ").trim_end_matches('Z'))
}

/// A duration in whole seconds and the microseconds past them (PgBouncer's `wait` and
/// `wait_us`, `maxwait` and `maxwait_us`).
pub fn secs_and_micros(d: Duration) -> (Option<String>, Option<String>) {
    (int(d.as_secs()), int(d.subsec_micros()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split() {
        assert_eq!(
            split_addr("127.0.0.1:5432"),
            ("127.0.0.1".into(), "5432".into())
        );
        assert_eq!(split_addr("[::1]:6432"), ("::1".into(), "6432".into()));
    }

    #[test]
    fn timestamps_look_like_pgbouncers() {
        let t = timestamp_ago(Duration::ZERO);
        assert_eq!(t.len(), "2026-11-30 12:00:00 UTC".len(), "{t}");
        assert!(
            t.ends_with(" UTC") && t.as_bytes().get(10) == Some(&b' '),
            "{t}"
        );
    }
}
