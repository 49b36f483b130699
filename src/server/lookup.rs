//! pgmux's own parameterised query on a server connection: `auth_query`, with the user name
//! as `$1` through the extended protocol (Parse, Bind, Execute, Sync), never spliced into
//! the SQL text.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ServerConn, ServerEvent};
use crate::protocol::read::error_fields;
use crate::protocol::{ProtocolError, read_i32, tag};

/// Rows beyond this many are an error: a lookup by user name returns one.
const MAX_ROWS: usize = 2;

/// What a lookup query returned.
#[derive(Debug, Default)]
pub struct LookupReply {
    /// The first two columns of each row, as text (`None` for NULL).
    pub rows: Vec<(Option<String>, Option<String>)>,
    /// The server's error, as (SQLSTATE, message), if the query failed.
    pub error: Option<(String, String)>,
}

impl ServerConn {
    /// Runs `sql` with `param` as its only parameter (text), on a connection no client
    /// uses, and reads up to ReadyForQuery within `limit`. An I/O or protocol failure or the
    /// time limit is an error; the connection must then be closed.
    pub async fn lookup(
        &mut self,
        sql: &str,
        param: &str,
        limit: Duration,
    ) -> Result<LookupReply, ProtocolError> {
        let mut out = BytesMut::new();
        let malformed = |_| ProtocolError::Malformed("auth_query or user name contains NUL");
        frontend::parse("", sql, [], &mut out).map_err(malformed)?;
        frontend::bind(
            "",
            "",
            [0], // text
            [param],
            |value, buf| {
                buf.extend_from_slice(value.as_bytes());
                Ok(IsNull::No)
            },
            [0],
            &mut out,
        )
        .map_err(|_| ProtocolError::Malformed("user name"))?;
        // One more row than allowed, to notice a query that returns several.
        let max_rows = i32::try_from(MAX_ROWS + 1).unwrap_or(i32::MAX);
        frontend::execute("", max_rows, &mut out).map_err(malformed)?;
        frontend::sync(&mut out);
        let work = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await?; // TLS: the ciphertext may still wait in rustls
            let mut reply = LookupReply::default();
            loop {
                while let Some(frame) = self.next_frame()? {
                    if !frame.is_whole() {
                        return Err(ProtocolError::Malformed("oversized reply to auth_query"));
                    }
                    match frame.tag {
                        tag::ERROR_RESPONSE if reply.error.is_none() => {
                            reply.error = Some(error_fields(frame.body()));
                        }
                        tag::DATA_ROW if reply.rows.len() <= MAX_ROWS => {
                            let row = two_columns(frame.body())
                                .ok_or(ProtocolError::Malformed("DataRow"))?;
                            reply.rows.push(row);
                        }
                        _ => {}
                    }
                    if let ServerEvent::Ready(_) = self.observe(frame.as_ref())? {
                        return Ok(reply);
                    }
                }
                if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            }
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
    }
}

/// The first two columns of a DataRow body (fewer columns read as NULL).
fn two_columns(body: &[u8]) -> Option<(Option<String>, Option<String>)> {
    let count = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut rest = body.get(2..)?;
    let mut values = [None, None];
    for value in values.iter_mut().take(usize::from(count)) {
        let (len, after) = read_i32(rest)?;
        if len < 0 {
            rest = after;
            continue;
        }
        let len = usize::try_from(len).ok()?;
        *value = Some(String::from_utf8_lossy(after.get(..len)?).into_owned());
        rest = after.get(len..)?;
    }
    let [a, b] = values;
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rows_are_read() {
        // 2 columns: "alice", NULL.
        let body = [
            0, 2, 0, 0, 0, 5, b'a', b'l', b'i', b'c', b'e', 0xff, 0xff, 0xff, 0xff,
        ];
        assert_eq!(two_columns(&body), Some((Some("alice".into()), None)));
        assert_eq!(two_columns(&[0, 0]), Some((None, None)));
        assert_eq!(two_columns(&[0, 1, 0, 0, 0, 9, b'x']), None);
        assert_eq!(two_columns(&[0]), None);
    }
}
