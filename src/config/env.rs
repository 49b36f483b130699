//! `${VAR}` substitution on the raw file, before TOML parsing.
//!
//! Textual, so it works for numbers (`size = ${POOL_SIZE:-20}`) as well as strings, but
//! aware of TOML's lexical context: inside `"..."` the value is escaped so it arrives
//! byte for byte; inside `'...'` a value that cannot be written there is a problem; in
//! comments nothing is touched. A value never adds a line, so line numbers stay true, and
//! [`OffsetMap`] maps parser offsets back to the original columns.

use super::report::join_key;

/// The file after substitution.
pub(super) struct Substituted {
    /// The text the TOML parser reads.
    pub text: String,
    /// Maps offsets in `text` back to offsets in the original.
    pub map: OffsetMap,
    /// Unset variables and the like, at offsets in the original text.
    pub problems: Vec<EnvProblem>,
}

/// A substitution problem at `offset` (into the original text).
pub(super) struct EnvProblem {
    pub offset: usize,
    pub key: String,
    pub message: String,
}

/// Byte offsets of the substituted text, back to the original.
#[derive(Default)]
pub(super) struct OffsetMap {
    edits: Vec<Edit>,
}

/// `original[old_start..old_end]` became `text[new_start..new_end]`.
struct Edit {
    new_start: usize,
    new_end: usize,
    old_start: usize,
    old_end: usize,
}

impl OffsetMap {
    /// The original offset of `offset`; inside a substituted value, the `${` it came from.
    pub fn to_original(&self, offset: usize) -> usize {
        let mut original = offset;
        for e in &self.edits {
            if offset < e.new_start {
                break;
            }
            if offset < e.new_end {
                return e.old_start;
            }
            original = offset - e.new_end + e.old_end;
        }
        original
    }
}

/// Where in the TOML grammar the scanner is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    Bare,
    Basic,
    MultiBasic,
    Literal,
    MultiLiteral,
    Comment,
}

/// Replaces `${VAR}` and `${VAR:-default}` (default when unset or empty) using `env`, and
/// `$${` by a literal `${`, everywhere except in comments.
pub(super) fn substitute(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Substituted {
    let mut s = Scanner {
        text,
        out: String::with_capacity(text.len()),
        copied: 0,
        map: OffsetMap::default(),
        problems: Vec::new(),
        table: String::new(),
        line_key: None,
    };
    s.run(env);
    s.out.push_str(text.get(s.copied..).unwrap_or_default());
    Substituted {
        text: s.out,
        map: s.map,
        problems: s.problems,
    }
}

struct Scanner<'t> {
    text: &'t str,
    out: String,
    /// `text[..copied]` is already in `out`, substituted.
    copied: usize,
    map: OffsetMap,
    problems: Vec<EnvProblem>,
    /// The last `[table]` header, and the key on the current line, for messages.
    table: String,
    line_key: Option<String>,
}

impl Scanner<'_> {
    fn run(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        let bytes = self.text.as_bytes();
        let mut ctx = Context::Bare;
        let mut i = 0;
        self.line_started(0);
        // Every index we act at holds an ASCII byte, so it is on a char boundary.
        while let Some(rest) = bytes.get(i..) {
            let Some(&b) = rest.first() else {
                break;
            };
            if ctx != Context::Comment && rest.starts_with(b"$${") {
                self.replace(i, i + 3, "${");
                i += 3;
                continue;
            }
            if ctx != Context::Comment && rest.starts_with(b"${") {
                i = self.reference(i, ctx, env);
                continue;
            }
            let (next, step) = match (ctx, b) {
                (Context::Comment, b'\n') => (Context::Bare, 1),
                (Context::Bare, b'#') => (Context::Comment, 1),
                (Context::Bare, b'"') if rest.starts_with(b"\"\"\"") => (Context::MultiBasic, 3),
                (Context::Bare, b'"') => (Context::Basic, 1),
                (Context::Bare, b'\'') if rest.starts_with(b"'''") => (Context::MultiLiteral, 3),
                (Context::Bare, b'\'') => (Context::Literal, 1),
                (Context::Basic | Context::MultiBasic, b'\\') => (ctx, 2), // skip the escaped char
                (Context::Basic, b'"' | b'\n') => (Context::Bare, 1),
                (Context::MultiBasic, b'"') if rest.starts_with(b"\"\"\"") => (Context::Bare, 3),
                (Context::Literal, b'\'' | b'\n') => (Context::Bare, 1),
                (Context::MultiLiteral, b'\'') if rest.starts_with(b"'''") => (Context::Bare, 3),
                _ => (ctx, 1),
            };
            ctx = next;
            i += step;
            if b == b'\n' && ctx == Context::Bare {
                self.line_started(i);
            }
        }
    }

    /// Substitutes the `${...}` at `start`; returns where scanning goes on.
    fn reference(
        &mut self,
        start: usize,
        ctx: Context,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> usize {
        // `${` then the rest of its line: the reference must close on it.
        let line = self.text.get(start..).unwrap_or_default();
        let line = line.split_once('\n').map_or(line, |(line, _)| line);
        let Some((inner, _)) = line.get(2..).and_then(|after| after.split_once('}')) else {
            self.problem(
                start,
                "`${` without a closing `}` (write `$${` for a literal `${`)",
            );
            return start + 2;
        };
        let close = start + 2 + inner.len();
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if !is_var_name(name) {
            let msg = format!("`${{{inner}}}`: `{name}` is not a variable name");
            self.problem(start, &msg);
            return close + 1;
        }
        let value = match (env(name), default) {
            (Some(v), Some(d)) if v.is_empty() => Some(d.to_owned()),
            (Some(v), _) => Some(v),
            (None, d) => d.map(str::to_owned),
        };
        let Some(value) = value else {
            let msg = format!(
                "environment variable {name} is not set (write ${{{name}:-default}} for a default)"
            );
            self.problem(start, &msg);
            // Keep the document parseable; errors on this line are not reported again.
            let placeholder = if ctx == Context::Bare { "\"\"" } else { "" };
            self.replace(start, close + 1, placeholder);
            return close + 1;
        };
        match render(&value, ctx) {
            Ok(rendered) => self.replace(start, close + 1, &rendered),
            Err(why) => {
                let msg = format!("the value of {name} {why}");
                self.problem(start, &msg);
                self.replace(start, close + 1, "");
            }
        }
        close + 1
    }

    fn replace(&mut self, start: usize, end: usize, with: &str) {
        self.out
            .push_str(self.text.get(self.copied..start).unwrap_or_default());
        let new_start = self.out.len();
        self.out.push_str(with);
        self.map.edits.push(Edit {
            new_start,
            new_end: self.out.len(),
            old_start: start,
            old_end: end,
        });
        self.copied = end;
    }

    /// Notes the table header or key on the line starting at `at`, for messages.
    fn line_started(&mut self, at: usize) {
        let rest = self.text.get(at..).unwrap_or_default();
        let line = rest.lines().next().unwrap_or_default().trim();
        self.line_key = None;
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            let name = header.split_once(']').map_or(header, |(name, _)| name);
            self.table = name.trim().to_owned();
        } else if let Some((key, _)) = line.split_once('=') {
            self.line_key = Some(key.trim().to_owned());
        }
    }

    fn problem(&mut self, offset: usize, message: &str) {
        let key = match &self.line_key {
            Some(key) => join_key(&self.table, key),
            None => self.table.clone(),
        };
        self.problems.push(EnvProblem {
            offset,
            key,
            message: message.to_owned(),
        });
    }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `value` as it must be written in context `ctx`, or why it cannot be.
fn render(value: &str, ctx: Context) -> Result<String, &'static str> {
    let breaks_line = value.contains(['\n', '\r']);
    match ctx {
        Context::Basic | Context::MultiBasic => {
            let mut out = String::with_capacity(value.len());
            escape_basic(value, &mut out);
            Ok(out)
        }
        Context::Literal | Context::MultiLiteral if breaks_line || value.contains('\'') => {
            Err("has a ' or a line break, which a '...' string cannot hold; use \"...\"")
        }
        Context::Bare if breaks_line => {
            Err("has a line break; outside a \"...\" string a value must fit on its line")
        }
        _ => Ok(value.to_owned()),
    }
}

/// Appends `s` escaped for a TOML basic string (`"..."`), on one line.
pub(super) fn escape_basic(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SIZE" => Some("30".into()),
            "PASS" => Some(r#"p"a\ss"#.into()),
            "EMPTY" => Some(String::new()),
            "QUOTE" => Some("it's".into()),
            "LINES" => Some("a\nb".into()),
            _ => None,
        }
    }

    fn run(text: &str) -> Substituted {
        substitute(text, &env)
    }

    #[test]
    fn bare_and_string_values() {
        let s = run("size = ${SIZE}\npassword = \"${PASS}\"\n");
        assert_eq!(s.text, "size = 30\npassword = \"p\\\"a\\\\ss\"\n");
        assert!(s.problems.is_empty());
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let s = run("a = ${NOPE:-7}\nb = \"${EMPTY:-x}\"\nc = \"${EMPTY}\"\nd = ${SIZE:-1}");
        assert_eq!(s.text, "a = 7\nb = \"x\"\nc = \"\"\nd = 30");
    }

    #[test]
    fn escapes_and_comments_are_left_alone() {
        let text = "# uses ${NOPE} here\nq = \"$${HOME}\" # ${NOPE} too\nr = '$5'\n";
        let s = run(text);
        assert!(s.problems.is_empty());
        assert_eq!(
            s.text,
            "# uses ${NOPE} here\nq = \"${HOME}\" # ${NOPE} too\nr = '$5'\n"
        );
    }

    #[test]
    fn hash_inside_a_string_is_not_a_comment() {
        let s = run("a = \"#${SIZE}\"\nb = \"\"\"\nx # ${SIZE}\n\"\"\"\n");
        assert_eq!(s.text, "a = \"#30\"\nb = \"\"\"\nx # 30\n\"\"\"\n");
    }

    #[test]
    fn unset_variable_is_a_problem_with_its_place_and_key() {
        let text = "[pool]\nsize = 1\nwait_timeout = \"${WAIT}\"\n";
        let s = run(text);
        assert_eq!(s.problems.len(), 1);
        let p = &s.problems[0];
        assert_eq!(p.offset, text.find("${WAIT}").expect("in text"));
        assert_eq!(p.key, "pool.wait_timeout");
        assert!(p.message.contains("WAIT is not set"), "{}", p.message);
    }

    #[test]
    fn values_that_do_not_fit_are_problems() {
        let s = run("a = '${QUOTE}'\nb = ${LINES}\nc = \"${LINES}\"\nd = ${1X}\ne = ${OPEN\n");
        let messages: Vec<_> = s.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert!(messages[0].contains("'...' string"));
        assert!(messages[1].contains("line break"));
        assert!(messages[2].contains("not a variable name"));
        assert!(messages[3].contains("without a closing"));
        assert!(s.text.contains("c = \"a\\nb\""));
    }

    #[test]
    fn offsets_map_back_to_the_original() {
        let text = "a = ${SIZE:-1} # x\nb = \"${PASS}\" ?";
        let s = run(text);
        let m = &s.map;
        let after = s.text.find('#').expect("comment kept");
        assert_eq!(m.to_original(after), text.find('#').expect("in text"));
        let bad = s.text.find('?').expect("kept");
        assert_eq!(m.to_original(bad), text.find('?').expect("in text"));
        // Inside a substituted value: the `${` it came from.
        assert_eq!(m.to_original(5), 4);
    }
}
