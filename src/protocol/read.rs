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
