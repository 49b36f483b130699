//! Where problems are: places in files, key paths, and the collected report.

use std::collections::{BTreeMap, BTreeSet};

use super::{Config, ConfigError, Problem, env};

/// Where each key's value is: key path -> place. Validation reports problems there.
pub(super) type Places = BTreeMap<String, Place>;

/// A position in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Place {
    pub origin: String,
    pub line: usize,
    pub column: usize,
}

impl Place {
    /// `key: message` at this place.
    pub fn problem(&self, key: &str, message: impl Into<String>) -> Problem {
        Problem {
            origin: self.origin.clone(),
            key: key.to_owned(),
            line: Some(self.line),
            column: Some(self.column),
            message: message.into(),
        }
    }

    /// The 1-based line and column of byte `offset` in `text`.
    pub fn in_text(origin: &str, text: &str, offset: usize) -> Place {
        // The characters that end by `offset` (an offset inside one counts as its start).
        let before = text
            .char_indices()
            .take_while(|(at, c)| at + c.len_utf8() <= offset);
        let (mut line, mut column) = (1, 1);
        for (_, c) in before {
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        Place {
            origin: origin.to_owned(),
            line,
            column,
        }
    }
}

/// Collects problems. A syntax or substitution problem hides the others on its line: they
/// are its consequences (a missing `${VAR}` reads as `""`, a broken value as anything).
pub(super) struct Report {
    origin: String,
    problems: Vec<Problem>,
    broken_lines: BTreeSet<usize>,
}

impl Report {
    pub fn new(origin: &str) -> Self {
        Self {
            origin: origin.to_owned(),
            problems: Vec::new(),
            broken_lines: BTreeSet::new(),
        }
    }

    /// Adds a syntax or substitution problem: later problems on its line are dropped.
    pub fn primary(&mut self, problem: Problem) {
        if let Some(line) = problem.line {
            self.broken_lines.insert(line);
        }
        self.problems.push(problem);
    }

    /// The name of the config file.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Adds a problem unless it is on a line already known to be broken.
    pub fn push(&mut self, problem: Problem) {
        let hidden = problem.origin == self.origin
            && problem.line.is_some_and(|l| self.broken_lines.contains(&l));
        if !hidden {
            self.problems.push(problem);
        }
    }

    /// A problem at `key`'s place if known, else without a place.
    pub fn at(&mut self, places: &Places, key: &str, message: impl Into<String>) {
        let problem = match places.get(key) {
            Some(place) => place.problem(key, message),
            None => Problem::general(&self.origin, key, message),
        };
        self.push(problem);
    }

    /// `config` if no problem was found, else every problem in file order.
    pub fn finish(mut self, config: Config) -> Result<Config, ConfigError> {
        if self.problems.is_empty() {
            return Ok(config);
        }
        // This file first, then others (the userlist), each in file order.
        let main = self.origin;
        self.problems
            .sort_by_key(|p| (p.origin != main, p.line.unwrap_or(0), p.column.unwrap_or(0)));
        Err(ConfigError {
            problems: self.problems,
        })
    }
}

/// `path.key`, quoting `key` when it is not a bare TOML key.
pub(super) fn join_key(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_owned()
    } else {
        let mut quoted = String::from("\"");
        env::escape_basic(key, &mut quoted);
        quoted.push('"');
        quoted
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::Place;

    #[test]
    fn places_count_characters_and_never_split_one() {
        let text = "a = 1\nbé = \"x\"\n";
        let at = |offset| {
            let p = Place::in_text("t", text, offset);
            (p.line, p.column)
        };
        assert_eq!(at(0), (1, 1));
        assert_eq!(at(4), (1, 5));
        assert_eq!(at(6), (2, 1));
        // Inside `é` (bytes 7 and 8): its start.
        assert_eq!(at(8), (2, 2));
        assert_eq!(at(9), (2, 3));
        assert_eq!(at(1000), (3, 1));
    }
}
