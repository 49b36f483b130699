//! The messages pgmux itself writes: to clients (authentication, errors, ReadyForQuery)
//! and the few it sends to servers on its own account. Each appends to a `BytesMut`.

use bytes::{BufMut, BytesMut};

use super::SqlState;

/// Appends a tagged message whose body `body` writes; fills in the length.
pub fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    if let Some(header) = buf.get_mut(at..at + 4) {
        header.copy_from_slice(&len.to_be_bytes());
    }
}

/// Appends a NUL-terminated string (a NUL inside is dropped).
pub fn cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; nothing we send contains one on purpose.
    buf.put_slice(s.replace('\0', "").as_bytes());
    buf.put_u8(0);
}

/// How bad an error is: `Error` ends the current statement, `Fatal` the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
    /// Not an error: a NoticeResponse the session goes on after.
    Notice,
}

/// An error pgmux reports to a client, with what it should change.
#[derive(Clone, Debug)]
pub struct PgError {
    /// Error or Fatal.
    pub severity: Severity,
    /// The SQLSTATE.
    pub code: SqlState,
    /// The message, without the `pgmux: ` prefix (added on the wire).
    pub message: String,
    /// More about it, if anything (why a wait ended without a server).
    pub detail: Option<String>,
    /// What to do about it, if anything (often the setting to change).
    pub hint: Option<String>,
}

impl PgError {
    /// A statement-level error.
    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Error,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A session-ending error.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Fatal,
            ..PgError::error(code, message)
        }
    }

    /// A notice: information, not an error.
    pub fn notice(message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Notice,
            ..PgError::error(SqlState::SUCCESSFUL_COMPLETION, message)
        }
    }

    /// Adds a detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Appends this error as an ErrorResponse.
    pub fn write(&self, buf: &mut BytesMut) {
        let (tag, severity) = match self.severity {
            Severity::Error => (b'E', "ERROR"),
            Severity::Fatal => (b'E', "FATAL"),
            Severity::Notice => (b'N', "NOTICE"),
        };
        message(buf, tag, |b| {
            for field in [b'S', b'V'] {
                b.put_u8(field);
                cstr(b, severity);
            }
            b.put_u8(b'C');
            cstr(b, self.code.code());
            b.put_u8(b'M');
            cstr(b, &format!("pgmux: {}", self.message));
            if let Some(detail) = &self.detail {
                b.put_u8(b'D');
                cstr(b, detail);
            }
            if let Some(hint) = &self.hint {
                b.put_u8(b'H');
                cstr(b, hint);
            }
            b.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// ReadyForQuery with transaction status `I`, `T` or `E`.
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    message(buf, b'Z', |b| b.put_u8(status));
}

/// AuthenticationOk.
pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

/// CommandComplete with this tag.
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| cstr(b, tag));
}

/// AuthenticationCleartextPassword.
pub fn auth_cleartext(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(3));
}

/// AuthenticationMD5Password with its salt.
pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

/// AuthenticationSASL offering `mechanisms`.
pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m);
        }
        b.put_u8(0);
    });
}

/// AuthenticationSASLContinue (11) or AuthenticationSASLFinal (12) carrying `data`.
pub fn auth_sasl_step(buf: &mut BytesMut, code: i32, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

/// BackendKeyData.
pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret: i32) {
    message(buf, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret);
    });
}

/// NegotiateProtocolVersion: the newest 3.x minor we speak and the options we ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unrecognized: &[String]) {
    message(buf, b'v', |b| {
        b.put_i32(minor);
        b.put_i32(unrecognized.len() as i32);
        for option in unrecognized {
            cstr(b, option);
        }
    });
}

/// A simple Query (sent to servers for ROLLBACK, reset queries and checks).
pub fn query(buf: &mut BytesMut, sql: &str) {
    message(buf, b'Q', |b| cstr(b, sql));
}

/// Terminate, sent to a server pgmux is closing.
pub fn terminate(buf: &mut BytesMut) {
    message(buf, b'X', |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_has_fields_and_length() {
        let mut buf = BytesMut::new();
        PgError::error(SqlState::TOO_MANY_CONNECTIONS, "pool full")
            .with_hint("raise size")
            .write(&mut buf);
        assert_eq!(buf[0], b'E');
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("C53300\0"));
        assert!(text.contains("Mpgmux: pool full\0"));
        assert!(text.contains("Hraise size\0"));
        assert_eq!(buf[buf.len() - 1], 0);
    }

    #[test]
    fn ready_for_query_is_six_bytes() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, b'I');
        assert_eq!(&buf[..], b"Z\0\0\0\x05I");
    }
}
