//! `auth.hba_file`: access rules in `pg_hba.conf` format, as PgBouncer reads them, for
//! teams that migrate with their file.
//!
//! ```text
//! # TYPE     DATABASE   USER        ADDRESS          [MASK]         METHOD
//! local      all        all                                         peer      (ignored)
//! host       app,b      alice       10.0.0.0/8                      scram-sha-256
//! hostnossl  all        all         192.168.0.0      255.255.0.0    md5
//! host       sameuser   all         all                             reject
//! ```
//!
//! Supported: `host`, `hostssl` (never matches until pgmux offers client TLS),
//! `hostnossl`; `all`, `sameuser`, `replication` (matches nothing: pgmux refuses
//! replication) and names, comma-separated, `"quoted"` to be taken literally; addresses as
//! CIDR, address and mask, or `all`; methods `scram-sha-256`, `md5`, `trust`, `reject`.
//! Everything else (`@file`, `+group`, host names, `password`, `cert`, options) is an error
//! that says why, so that a file never means less than it says.

use std::net::IpAddr;

use super::rules::{AccessRule, Addresses, Cidr, ConnType, Names, RuleMethod};

/// A problem in the file: 1-based line and column (in characters), and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HbaProblem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column of the field concerned.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// One comma-separated item of a field.
#[derive(Debug)]
struct Item {
    text: String,
    quoted: bool,
}

/// One whitespace-separated field and the column it starts at.
#[derive(Debug)]
struct Field {
    items: Vec<Item>,
    column: usize,
}

/// The rules of a pg_hba.conf-format text, each with `source` = `hba_file line N`, and
/// every problem found (a line with a problem gives no rule).
pub fn parse(text: &str) -> (Vec<AccessRule>, Vec<HbaProblem>) {
    let mut rules = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let fields = match tokenize(line) {
            Ok(fields) => fields,
            Err((column, message)) => {
                problems.push(HbaProblem {
                    line: number,
                    column,
                    message,
                });
                continue;
            }
        };
        match parse_line(&fields, number) {
            Ok(Some(rule)) => rules.push(rule),
            Ok(None) => {}
            Err((column, message)) => problems.push(HbaProblem {
                line: number,
                column,
                message,
            }),
        }
    }
    (rules, problems)
}

type LineError = (usize, String);

/// Splits a line into fields of comma-separated items; `#` outside quotes ends it.
fn tokenize(line: &str) -> Result<Vec<Field>, LineError> {
    let chars: Vec<char> = line.chars().collect();
    let mut fields = Vec::new();
    let mut i = 0;
    loop {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        match chars.get(i) {
            None | Some('#') => return Ok(fields),
            Some(_) => {}
        }
        let column = i + 1;
        let mut items = Vec::new();
        loop {
            let mut text = String::new();
            let mut quoted = false;
            while let Some(&c) = chars.get(i) {
                if c == '"' {
                    let start = i + 1;
                    i += 1;
                    loop {
                        match chars.get(i) {
                            None => return Err((start, "unterminated quoted string".to_owned())),
                            Some('"') => break,
                            Some(&q) => text.push(q),
                        }
                        i += 1;
                    }
                    quoted = true;
                    i += 1;
                } else if c.is_whitespace() || c == ',' || c == '#' {
                    break;
                } else {
                    text.push(c);
                    i += 1;
                }
            }
            items.push(Item { text, quoted });
            if chars.get(i) == Some(&',') {
                i += 1;
                // A list may go on after whitespace: "a, b".
                while chars.get(i).is_some_and(|c| c.is_whitespace()) {
                    i += 1;
                }
                continue;
            }
            break;
        }
        fields.push(Field { items, column });
    }
}

fn parse_line(fields: &[Field], number: usize) -> Result<Option<AccessRule>, LineError> {
    let Some(kind) = fields.first() else {
        return Ok(None);
    };
    let kind_word = single(kind, "connection type")?;
    let conn = match kind_word {
        "local" => return Ok(None), // pgmux has no Unix socket: PgBouncer ignores these too
        "hostgssenc" | "hostnogssenc" => {
            return Err((kind.column, format!("\"{kind_word}\": pgmux does not offer GSSAPI encryption; use host, hostssl or hostnossl")));
        }
        other => ConnType::parse(other)
            .filter(|c| *c != ConnType::All)
            .ok_or_else(|| {
                (
                    kind.column,
                    format!("unknown connection type \"{other}\": expected local, host, hostssl or hostnossl"),
                )
            })?,
    };
    let field = |n: usize, what: &str| {
        fields.get(n).ok_or_else(|| {
            let column = fields.last().map_or(1, |f| f.column);
            (column, format!("end of line before the {what} field"))
        })
    };
    let databases = names(field(1, "database")?, true)?;
    let users = names(field(2, "user")?, false)?;
    let address = field(3, "address")?;
    let address_word = single(address, "address")?;
    let (addresses, next) = if address_word == "all" && !address.items.iter().any(|i| i.quoted) {
        (Addresses::All, 4)
    } else if matches!(address_word, "samehost" | "samenet") {
        let msg = format!("\"{address_word}\" is not supported: write the network as CIDR");
        return Err((address.column, msg));
    } else if address_word.contains('/') {
        let net = Cidr::parse(address_word).map_err(|e| (address.column, e))?;
        (Addresses::Net(net), 4)
    } else if let Ok(addr) = address_word.parse::<IpAddr>() {
        let mask_field = field(4, "mask")?;
        let mask = single(mask_field, "mask")?.parse::<IpAddr>().map_err(|_| {
            (
                mask_field.column,
                "expected an IP mask after the address".to_owned(),
            )
        })?;
        let net = Cidr::with_mask(addr, mask).map_err(|e| (mask_field.column, e))?;
        (Addresses::Net(net), 5)
    } else {
        let msg = format!(
            "\"{address_word}\" is not an IP address or CIDR network (host names are not supported)"
        );
        return Err((address.column, msg));
    };
    let method_field = field(next, "method")?;
    let method_word = single(method_field, "method")?;
    let method = RuleMethod::parse(method_word).ok_or_else(|| {
        (
            method_field.column,
            format!(
                "unsupported method \"{method_word}\": expected scram-sha-256, md5, password, cert, trust or reject"
            ),
        )
    })?;
    if let Some(option) = fields.get(next + 1) {
        return Err((
            option.column,
            "authentication options are not supported".to_owned(),
        ));
    }
    Ok(Some(AccessRule {
        conn,
        databases,
        users,
        addresses,
        method,
        source: format!("hba_file line {number}"),
    }))
}

/// A field that must be one item.
fn single<'f>(field: &'f Field, what: &str) -> Result<&'f str, LineError> {
    match field.items.as_slice() {
        [item] => Ok(item.text.as_str()),
        _ => Err((
            field.column,
            format!("the {what} must be a single value, not a list"),
        )),
    }
}

/// A database (`database` true) or user field.
fn names(field: &Field, database: bool) -> Result<Names, LineError> {
    let mut list = Vec::new();
    for item in &field.items {
        let text = item.text.as_str();
        if item.quoted {
            list.push(item.text.clone());
            continue;
        }
        match text {
            "all" => return Ok(Names::All),
            "sameuser" if database => return Ok(Names::SameUser),
            // pgmux refuses replication connections: the keyword matches nothing.
            "replication" if database => {}
            "samerole" | "samegroup" if database => {
                return Err((
                    field.column,
                    format!("\"{text}\" is not supported: list the databases"),
                ));
            }
            _ if text.starts_with('@') => {
                return Err((
                    field.column,
                    format!("\"{text}\": @file includes are not supported: list the names"),
                ));
            }
            _ if text.starts_with('+') && !database => {
                return Err((
                    field.column,
                    format!("\"{text}\": group membership is not supported: list the users"),
                ));
            }
            "" => return Err((field.column, "empty name".to_owned())),
            _ => list.push(item.text.clone()),
        }
    }
    Ok(Names::List(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthMethod;
    use proptest::prelude::*;

    fn one(line: &str) -> Result<AccessRule, String> {
        let (rules, problems) = parse(line);
        match (rules.as_slice(), problems.as_slice()) {
            ([rule], []) => Ok(rule.clone()),
            ([], [p]) => Err(format!("{}: {}", p.column, p.message)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_pgbouncer_style_lines() {
        let text = "# comment\n\nlocal all all peer\n\
                    host app,\"all\" alice,bob 10.0.0.0/8 scram-sha-256 # why\n\
                    hostnossl all all 192.168.0.0 255.255.0.0 md5\n\
                    hostssl sameuser all ::1/128 trust\n\
                    host replication all all reject\n";
        let (rules, problems) = parse(text);
        assert_eq!(problems, []);
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0].source, "hba_file line 4");
        assert_eq!(rules[0].conn, ConnType::Host);
        assert_eq!(
            rules[0].databases,
            Names::List(vec!["app".into(), "all".into()])
        );
        assert_eq!(
            rules[0].users,
            Names::List(vec!["alice".into(), "bob".into()])
        );
        assert_eq!(rules[0].method, RuleMethod::Login(AuthMethod::ScramSha256));
        assert_eq!(
            rules[1].addresses,
            Addresses::Net(Cidr::parse("192.168.0.0/16").unwrap())
        );
        assert_eq!(rules[1].conn, ConnType::HostNoSsl);
        assert_eq!(rules[2].databases, Names::SameUser);
        assert_eq!(rules[2].conn, ConnType::HostSsl);
        assert_eq!(rules[3].databases, Names::List(vec![]));
        assert_eq!(rules[3].method, RuleMethod::Reject);
        let spaced = one("host  app, b  all  all  md5").unwrap();
        assert_eq!(
            spaced.databases,
            Names::List(vec!["app".into(), "b".into()])
        );
    }

    #[test]
    fn every_unsupported_thing_says_why_and_where() {
        // (line, the word the problem is placed at, the message's start)
        let cases = [
            (
                "host all all 10.0.0.0/8 ident",
                "ident",
                "unsupported method \"ident\"",
            ),
            (
                "host all all db.example.com md5",
                "db.",
                "\"db.example.com\" is not an IP address",
            ),
            (
                "host all all samenet md5",
                "samenet",
                "\"samenet\" is not supported",
            ),
            ("host @dbs all all md5", "@dbs", "\"@dbs\": @file includes"),
            (
                "host all +admins all md5",
                "+admins",
                "\"+admins\": group membership",
            ),
            ("host all all 10.0.0.1 md5", "md5", "expected an IP mask"),
            (
                "host all all 10.0.0.1 255.0.255.0 md5",
                "255.",
                "the mask 255.0.255.0 is not contiguous",
            ),
            (
                "host all all 10.0.0.0/40 md5",
                "10.",
                "\"10.0.0.0/40\": the prefix length",
            ),
            (
                "host all all all md5 clientcert=verify-full",
                "clientcert",
                "authentication options are not supported",
            ),
            (
                "hots all all all md5",
                "hots",
                "unknown connection type \"hots\"",
            ),
            (
                "host all users",
                "users",
                "end of line before the address field",
            ),
            (
                "host \"app all all all md5",
                "\"app",
                "unterminated quoted string",
            ),
            (
                "hostgssenc all all all md5",
                "hostgssenc",
                "\"hostgssenc\": pgmux does not offer GSSAPI",
            ),
        ];
        for (line, at, expected) in cases {
            let column = line.find(at).unwrap() + 1;
            let got = one(line).unwrap_err();
            assert!(
                got.starts_with(&format!("{column}: {expected}")),
                "{line}: {got}"
            );
        }
        let (rules, problems) = parse("host all all all md5\nhost all all x md5\n");
        assert_eq!(rules.len(), 1);
        assert_eq!(problems[0].line, 2);
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_hba_like_lines(
            words in proptest::collection::vec(
                prop_oneof![
                    Just("host".to_owned()), Just("all".to_owned()), Just("\"".to_owned()),
                    Just(",".to_owned()), Just("10.0.0.0/8".to_owned()), Just("md5".to_owned()),
                    Just("255.255.0.0".to_owned()), Just("#".to_owned()), "[a-z0-9.:/,@+\"]{0,12}",
                ],
                0..10,
            )
        ) {
            let _ = parse(&words.join(" "));
        }
    }
}
