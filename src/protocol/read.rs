//! The few backend messages pgmux reads the inside of (besides ReadyForQuery's status
//! byte, read by `server::ServerConn::observe`).

/// Splits a ParameterStatus body into name and value.
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = super::read_cstr(body)?;
    let (value, _) = super::read_cstr(rest)?;
    Some((name, value))
}

/// The fields of an ErrorResponse or NoticeResponse body, up to the first malformed one.
pub fn fields(body: &[u8]) -> impl Iterator<Item = (u8, &str)> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&field, after) = rest.split_first()?;
        if field == 0 {
            return None;
        }
        let (value, after) = super::read_cstr(after)?;
        rest = after;
        Some((field, value))
    })
}

/// The SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for (field, value) in fields(body) {
        match field {
            b'C' => code = value.to_owned(),
            b'M' => message = value.to_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// The columns of a DataRow body: `Some(bytes)`, or `None` for NULL; ends early at the
/// first malformed column.
pub fn data_row(body: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    let (count, mut rest) = match body.split_first_chunk::<2>() {
        Some((count, rest)) => (u16::from_be_bytes(*count), rest),
        None => (0, &[][..]),
    };
    (0..count).map_while(move |_| {
        let (len, after) = super::read_i32(rest)?;
        if len < 0 {
            rest = after;
            return Some(None);
        }
        let (value, after) = after.split_at_checked(usize::try_from(len).ok()?)?;
        rest = after;
        Some(Some(value))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_rows_read_values_and_nulls() {
        let body = [0, 2, 0, 0, 0, 2, b'h', b'i', 0xff, 0xff, 0xff, 0xff];
        let columns: Vec<_> = super::data_row(&body).collect();
        assert_eq!(columns, vec![Some(&b"hi"[..]), None]);
        // Claims three columns, holds one and a half.
        let short = [0, 3, 0, 0, 0, 1, b'x', 0, 0, 0, 9, b'y'];
        assert_eq!(super::data_row(&short).count(), 1);
        assert_eq!(super::data_row(&[]).count(), 0);
    }
}
