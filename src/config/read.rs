//! Reading one TOML value as the type a key wants, and naming unknown keys.
//!
//! Each reader records where the value is, reports a value of the wrong kind at its line and
//! column, and returns `None` for it; the caller keeps the default and carries on.

use std::ops::Range;
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::load::{Key, Value, Walker};
use super::report::join_key;

impl Walker<'_> {
    /// `listen`: a string or an array of strings; each element's place is `path[i]`.
    pub(super) fn listen(&mut self, path: &str, value: &Value<'_>) -> Option<Vec<String>> {
        match value.get_ref() {
            DeValue::String(_) => self.string(path, value).map(|s| vec![s]),
            DeValue::Array(_) => self.strings(path, value),
            _ => {
                self.mark(path, value.span());
                self.wrong_type(path, value, "a string or an array of strings");
                None
            }
        }
    }

    pub(super) fn strings(&mut self, path: &str, value: &Value<'_>) -> Option<Vec<String>> {
        self.mark(path, value.span());
        let Some(items) = value.get_ref().as_array() else {
            self.wrong_type(path, value, "an array of strings");
            return None;
        };
        let strings: Vec<Option<String>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.string(&format!("{path}[{i}]"), item))
            .collect();
        // Every bad element is reported; any one of them rejects the list.
        strings.into_iter().collect()
    }

    pub(super) fn table<'v, 'i>(
        &mut self,
        path: &str,
        value: &'v Value<'i>,
    ) -> Option<&'v DeTable<'i>> {
        self.mark(path, value.span());
        let table = value.get_ref().as_table();
        if table.is_none() {
            self.wrong_type(path, value, "a table");
        }
        table
    }

    pub(super) fn string(&mut self, path: &str, value: &Value<'_>) -> Option<String> {
        self.mark(path, value.span());
        let s = value.get_ref().as_str();
        if s.is_none() {
            self.wrong_type(path, value, "a string");
        }
        s.map(str::to_owned)
    }

    pub(super) fn boolean(&mut self, path: &str, value: &Value<'_>) -> Option<bool> {
        self.mark(path, value.span());
        let b = value.get_ref().as_bool();
        if b.is_none() {
            self.wrong_type(path, value, "a boolean");
        }
        b
    }

    /// A non-negative integer up to `max`.
    pub(super) fn unsigned(&mut self, path: &str, value: &Value<'_>, max: u64) -> Option<u64> {
        self.mark(path, value.span());
        let Some(int) = value.get_ref().as_integer() else {
            self.wrong_type(path, value, "an integer");
            return None;
        };
        let parsed = i128::from_str_radix(int.as_str(), int.radix()).ok();
        match parsed {
            Some(n) if n < 0 => self.problem(path, value.span(), "must not be negative"),
            Some(n) => match u64::try_from(n) {
                Ok(n) if n <= max => return Some(n),
                _ => self.problem(path, value.span(), format!("is too large (at most {max})")),
            },
            None => self.problem(path, value.span(), "is not a valid integer"),
        }
        None
    }

    /// `worker_threads`: an integer from 1 to 1024, or `"auto"`.
    pub(super) fn worker_threads(
        &mut self,
        path: &str,
        value: &Value<'_>,
    ) -> Option<super::WorkerThreads> {
        if let DeValue::String(s) = value.get_ref() {
            self.mark(path, value.span());
            if s.as_ref() == "auto" {
                return Some(super::WorkerThreads::Auto);
            }
            let msg = format!("unknown value \"{s}\"; expected \"auto\" or an integer");
            self.problem(path, value.span(), msg);
            return None;
        }
        match self.unsigned(path, value, 1024)? {
            0 => {
                self.problem(path, value.span(), "must be at least 1 (or \"auto\")");
                None
            }
            n => n.try_into().ok().map(super::WorkerThreads::Count),
        }
    }

    /// A human duration string such as `"5s"`; a bare `0` is accepted too.
    pub(super) fn duration(&mut self, path: &str, value: &Value<'_>) -> Option<Duration> {
        self.mark(path, value.span());
        const HINT: &str = "write e.g. \"250ms\", \"5s\", \"10m\", \"1h\" or \"0\"";
        match value.get_ref() {
            DeValue::String(s) => {
                if s.trim_start().starts_with('-') {
                    self.problem(path, value.span(), "must not be negative");
                    return None;
                }
                match humantime::parse_duration(s) {
                    Ok(d) => return Some(d),
                    Err(e) => {
                        let msg = format!("invalid duration \"{s}\": {e}; {HINT}");
                        self.problem(path, value.span(), msg);
                    }
                }
            }
            DeValue::Integer(i) if i.as_str() == "0" => return Some(Duration::ZERO),
            DeValue::Integer(i) => {
                let msg = format!("a duration needs a unit: write \"{i}s\" or \"{i}ms\"");
                self.problem(path, value.span(), msg);
            }
            _ => self.wrong_type(path, value, "a duration string"),
        }
        None
    }

    /// One of the `options`, by name.
    pub(super) fn choice<T: Copy>(
        &mut self,
        path: &str,
        value: &Value<'_>,
        options: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(path, value)?;
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == s) {
            return Some(*v);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let msg = format!(
            "unknown value \"{s}\"; expected one of {}",
            names.join(", ")
        );
        self.problem(path, value.span(), msg);
        None
    }

    pub(super) fn unknown(&mut self, path: &str, key: &Key<'_>, known: &[&str]) {
        let name = key.get_ref();
        let mut msg = String::from("unknown key");
        if let Some(close) = closest(name, known) {
            msg.push_str(&format!(" (did you mean `{close}`?)"));
        } else {
            msg.push_str(&format!("; expected one of: {}", known.join(", ")));
        }
        self.problem(&join_key(path, name), key.span(), msg);
    }

    pub(super) fn wrong_type(&mut self, path: &str, value: &Value<'_>, expected: &str) {
        let found = value.get_ref().type_str();
        let msg = format!("expected {expected}, found {}", article(found));
        self.problem(path, value.span(), msg);
    }

    pub(super) fn problem(&mut self, path: &str, span: Range<usize>, message: impl Into<String>) {
        let problem = self.source.place(span.start).problem(path, message);
        self.report.push(problem);
    }

    /// Remembers where `path`'s value is, for validation messages.
    pub(super) fn mark(&mut self, path: &str, span: Range<usize>) {
        self.places
            .entry(path.to_owned())
            .or_insert_with(|| self.source.place(span.start));
    }
}

fn article(type_name: &str) -> String {
    match type_name {
        "integer" | "array" => format!("an {type_name}"),
        _ => format!("a {type_name}"),
    }
}

/// The known key closest to a misspelt one, if any is close.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The Levenshtein distance between `a` and `b`, in characters: one row of the table at a
/// time (`prev` the row above, `row` the one being filled).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut row = Vec::with_capacity(prev.len());
        row.push(i + 1);
        // prev[j] (diagonal), prev[j + 1] (above), row[j] (left) for each cb = b[j].
        for ((cb, diagonal), above) in b.iter().zip(&prev).zip(prev.iter().skip(1)) {
            let left = row.last().copied().unwrap_or(i + 1);
            let cost = (above + 1)
                .min(left + 1)
                .min(diagonal + usize::from(ca != *cb));
            row.push(cost);
        }
        prev = row;
    }
    prev.last().copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_characters() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("size", ""), 4);
        assert_eq!(edit_distance("", "size"), 4);
        assert_eq!(edit_distance("wait_timout", "wait_timeout"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("é", "e"), 1);
        assert_eq!(edit_distance("flaw", "lawn"), 2);
    }
}
