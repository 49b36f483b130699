//! `auth.userlist_file`: PgBouncer's `"user" "secret"` file, merged into `[users]`.
//!
//! One user a line: two double-quoted fields, a `""` inside a field stands for one `"`, and
//! the rest of the line is ignored (as PgBouncer does). Blank lines and lines starting with
//! `;` or `#` are comments.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry as MapEntry;
use std::path::Path;

use super::report::{Place, Places, Report, join_key};
use super::{Config, Problem, User};

/// One `"user" "secret"` line.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub name: String,
    pub secret: String,
    /// Where the secret is.
    pub place: Place,
}

/// Reads the userlist named by `config.auth.userlist_file` (resolved against `base`, and
/// stored resolved) into `config.users`. A user in `[users]` keeps its own fields; the
/// userlist only fills in a missing `password`.
pub(super) fn merge(config: &mut Config, base: &Path, places: &mut Places, report: &mut Report) {
    let Some(file) = &config.auth.userlist_file else {
        return;
    };
    let path = base.join(file);
    config.auth.userlist_file = Some(path.clone());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            let msg = format!("cannot read {}: {e}", path.display());
            report.at(places, "auth.userlist_file", msg);
            return;
        }
    };
    let (entries, problems) = parse(&text, &path.display().to_string());
    for problem in problems {
        report.push(problem);
    }
    for entry in entries {
        let key = join_key(&join_key("users", &entry.name), "password");
        match config.users.entry(entry.name) {
            MapEntry::Vacant(slot) => {
                slot.insert(User {
                    password: Some(entry.secret),
                    ..User::default()
                });
            }
            MapEntry::Occupied(mut slot) => {
                let user = slot.get_mut();
                if user.password.is_some() {
                    continue; // [users] wins
                }
                user.password = Some(entry.secret);
            }
        }
        places.insert(key, entry.place);
    }
}

/// The entries of a userlist named `origin`, and its problems.
pub(super) fn parse(text: &str, origin: &str) -> (Vec<Entry>, Vec<Problem>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let place = |column: usize| Place {
            origin: origin.to_owned(),
            line: line_no,
            column,
        };
        let rest = line.trim_start();
        let indent = line.len() - rest.len();
        if rest.is_empty() || rest.starts_with([';', '#']) {
            continue;
        }
        let column = |byte: usize| line.get(..byte).map_or(0, |s| s.chars().count()) + 1;
        let Some((name, after_name)) = quoted(rest) else {
            let msg = "expected `\"user\" \"secret\"`";
            problems.push(place(column(indent)).problem("", msg));
            continue;
        };
        let at_secret = after_name.trim_start();
        let secret_at = line.len() - at_secret.len();
        let Some((secret, _ignored)) = quoted(at_secret) else {
            let msg = format!("user \"{name}\": expected a quoted secret after the user name");
            problems.push(place(column(secret_at)).problem("", msg));
            continue;
        };
        if name.is_empty() {
            problems.push(place(column(indent)).problem("", "the user name must not be empty"));
            continue;
        }
        if let Some(first) = first_line.insert(name.clone(), line_no) {
            let msg = format!("user \"{name}\" is listed twice (first on line {first})");
            problems.push(place(column(indent)).problem("", msg));
            continue;
        }
        entries.push(Entry {
            name,
            secret,
            place: place(column(secret_at)),
        });
    }
    (entries, problems)
}

/// A `"..."` field at the start of `s` (with `""` as an escaped `"`), and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut rest = s.strip_prefix('"')?;
    let mut field = String::new();
    loop {
        let (part, after) = rest.split_once('"')?;
        field.push_str(part);
        rest = after;
        match rest.strip_prefix('"') {
            Some(after) => {
                field.push('"');
                rest = after;
            }
            None => return Some((field, rest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbouncer_format() {
        let text = "; comment\n# another\n\n\"alice\" \"secret\"\n  \"bob\"   \"md5a1b2\" extra ignored\n\"q\"\"uote\" \"x\"\"y\"\n";
        let (entries, problems) = parse(text, "users.txt");
        assert!(problems.is_empty(), "{problems:?}");
        let got: Vec<_> = entries
            .iter()
            .map(|e| {
                (
                    e.name.as_str(),
                    e.secret.as_str(),
                    e.place.line,
                    e.place.column,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("alice", "secret", 4, 9),
                ("bob", "md5a1b2", 5, 11),
                ("q\"uote", "x\"y", 6, 11),
            ]
        );
    }

    #[test]
    fn problems_name_the_file_and_line() {
        let text =
            "\"alice\" \"a\"\nalice secret\n\"bob\"\n\"carol\" \"unterminated\n\"alice\" \"b\"\n";
        let (entries, problems) = parse(text, "users.txt");
        assert_eq!(entries.len(), 1);
        let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "users.txt:2:1: expected `\"user\" \"secret\"`",
                "users.txt:3:6: user \"bob\": expected a quoted secret after the user name",
                "users.txt:4:9: user \"carol\": expected a quoted secret after the user name",
                "users.txt:5:1: user \"alice\" is listed twice (first on line 1)",
            ]
        );
    }
}
