//! Session state a client may leave on its server in transaction and statement mode, found
//! exactly and cheaply.
//!
//! While forwarding, pgmux only looks for triggers: a CommandComplete tag of a command that
//! can make or drop state ([`tag_may_change_state`]), or a word in a Query or Parse text
//! that no tag shows ([`text_may_change_state`]: `TEMP`, `advisory`, `set_config`). When
//! one fired, the session runs [`VERIFY_SQL`] on the same server before it lets it go: the
//! catalog is the truth, so savepoints, rollbacks, multi-statement queries, the extended
//! protocol and functions called by name are all judged right. [`Found`] reads its rows;
//! `session/state.rs` pins the client to its server or resets the state.

use crate::stats::StateKind;

/// The hidden query that says what session state the server holds now: one row per setting
/// the session changed (name, value), and one row (kind, NULL) per kind of other state.
pub const VERIFY_SQL: &str = "SELECT s.name, pg_catalog.current_setting(s.name) \
     FROM pg_catalog.pg_settings s WHERE s.source = 'session' \
 UNION ALL SELECT 'temp_table', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_class \
     WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
 UNION ALL SELECT 'advisory_lock', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_locks \
     WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
 UNION ALL SELECT 'cursor', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_cursors) \
 UNION ALL SELECT 'listen', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) \
 UNION ALL SELECT 'listen ' || c, NULL FROM pg_catalog.pg_listening_channels() c \
 UNION ALL SELECT 'prepared_statement', NULL WHERE EXISTS \
     (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql)";

/// Kinds of state other than settings, as a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub fn insert(&mut self, kind: StateKind) {
        self.0 |= 1 << kind as u8;
    }

    pub fn contains(self, kind: StateKind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn remove(&mut self, kind: StateKind) {
        self.0 &= !(1 << kind as u8);
    }

    pub fn iter(self) -> impl Iterator<Item = StateKind> {
        StateKind::ALL
            .into_iter()
            .filter(move |k| self.contains(*k))
    }

    /// "a temporary table and LISTEN", for messages.
    pub fn describe(self) -> String {
        let words: Vec<&str> = self.iter().map(StateKind::describe).collect();
        match words.split_last() {
            Some((last, [])) => (*last).to_owned(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => "session state".to_owned(),
        }
    }

    /// `temp_table,listen`, for logs and views.
    pub fn labels(self) -> String {
        let words: Vec<&str> = self.iter().map(StateKind::as_str).collect();
        words.join(",")
    }

    /// Reads [`Kinds::labels`] back (an upgrade carries a pin's kinds so); `None` when a
    /// word is not a kind.
    pub fn from_labels(labels: &str) -> Option<Kinds> {
        let mut kinds = Kinds::default();
        for word in labels.split(',').filter(|w| !w.is_empty()) {
            kinds.insert(StateKind::ALL.into_iter().find(|k| k.as_str() == word)?);
        }
        Some(kinds)
    }

    /// The statements that discard these kinds of state (`session_state = "reset"`).
    /// SQL-level prepared statements go with `DEALLOCATE ALL`, which takes pgmux's own too:
    /// the caller forgets that the server holds them.
    pub fn reset_sql(self) -> String {
        let mut sql = String::new();
        for kind in self.iter() {
            sql.push_str(match kind {
                StateKind::TempTable => "DISCARD TEMP;",
                StateKind::AdvisoryLock => "SELECT pg_catalog.pg_advisory_unlock_all();",
                StateKind::Cursor => "CLOSE ALL;",
                StateKind::Listen => "UNLISTEN *;",
                StateKind::PreparedStatement => "DEALLOCATE ALL;",
                StateKind::Setting => "",
            });
        }
        sql
    }
}

/// What [`VERIFY_SQL`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Kinds of state that pin or are reset.
    pub kinds: Kinds,
    /// Settings the session changed: (name, value as `current_setting` shows it).
    pub settings: Vec<(String, String)>,
    /// The channels the session LISTENs to.
    pub channels: Vec<String>,
}

impl Found {
    /// Reads one DataRow body of [`VERIFY_SQL`]'s result; rows that do not parse are
    /// ignored (the server wrote them; nothing there can be trusted less than a row).
    pub fn add_row(&mut self, body: &[u8]) {
        let mut columns = crate::protocol::read::data_row(body);
        let (Some(Some(name)), Some(value)) = (columns.next(), columns.next()) else {
            return;
        };
        let Ok(name) = std::str::from_utf8(name) else {
            return;
        };
        match value {
            Some(value) => {
                if let Ok(value) = std::str::from_utf8(value) {
                    self.settings.push((name.to_owned(), value.to_owned()));
                }
            }
            None => {
                if let Some(channel) = name.strip_prefix("listen ") {
                    self.channels.push(channel.to_owned());
                } else if let Some(kind) = StateKind::ALL.into_iter().find(|k| k.as_str() == name) {
                    self.kinds.insert(kind);
                }
            }
        }
    }
}

/// Whether a CommandComplete tag is of a command that can make or drop session state:
/// `SET`, `RESET`, `CREATE`/`DROP` (a temporary object), `DECLARE`/`CLOSE` (a cursor),
/// `LISTEN`/`UNLISTEN`, `PREPARE`/`DEALLOCATE`, `DISCARD`, `DO` and `CALL` (code that may
/// do any of these). Every statement's tag passes here: the first byte rules out most.
pub fn tag_may_change_state(tag: &[u8]) -> bool {
    // The tag's first word, then a space or the terminating NUL (or the end).
    let is = |word: &[u8]| {
        tag.strip_prefix(word)
            .is_some_and(|rest| matches!(rest.first(), None | Some(b' ' | 0)))
    };
    match tag.first() {
        Some(b'S') => is(b"SET"),
        Some(b'R') => is(b"RESET"),
        Some(b'C') => is(b"CREATE") || is(b"CLOSE") || is(b"CALL"),
        Some(b'D') => {
            is(b"DROP") || is(b"DECLARE") || is(b"DEALLOCATE") || is(b"DISCARD") || is(b"DO")
        }
        Some(b'L') => is(b"LISTEN"),
        Some(b'U') => is(b"UNLISTEN"),
        Some(b'P') => is(b"PREPARE"),
        _ => false,
    }
}

/// Whether a Query or Parse text may make state that its tag does not show: the word `TEMP`
/// or `TEMPORARY` or a `pg_temp` name (`CREATE TEMP TABLE .. AS` and `SELECT .. INTO TEMP`
/// end with `SELECT n`), `advisory` (`pg_advisory_lock`) or `set_config` (unless it sets
/// a value for the transaction only), in any case. Every Query passes here, so it does
/// not look at every byte: a SIMD search finds the letters that are rare in SQL and
/// anchor each word (the `p` of `temp`, the `v` of `advisory`, the `f` of `set_config`),
/// in either case, and only there is the word checked.
pub fn text_may_change_state(text: &[u8]) -> bool {
    let at = |anchor: usize| {
        let start = match text.get(anchor).map(|b| b | 0x20) {
            Some(b'p') => anchor.checked_sub(3),
            Some(b'v') => anchor.checked_sub(2),
            Some(b'f') => anchor.checked_sub(7),
            _ => None,
        };
        start.is_some_and(|start| word_at(text, start))
    };
    memchr::memchr3_iter(b'p', b'v', b'f', text).any(at)
        || memchr::memchr3_iter(b'P', b'V', b'F', text).any(at)
}

/// Whether a trigger word starts at `i` (its first four bytes matched, case aside).
fn word_at(text: &[u8], i: usize) -> bool {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    let lower_at = |i: usize, word: &[u8]| {
        text.get(i..i + word.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(word))
    };
    if lower_at(i, b"temp") {
        let before = i.checked_sub(1).and_then(|j| text.get(j)).copied();
        let word_start = before.is_none_or(|b| !ident(b))
            || (before == Some(b'_') && i >= 3 && lower_at(i - 3, b"pg_"));
        let mut end = i + 4;
        if lower_at(end, b"orary") {
            end += 5;
        }
        let word_end = text.get(end).is_none_or(|&b| !ident(b) || b == b'_');
        return word_start && word_end;
    }
    if lower_at(i, b"advisory") {
        return true;
    }
    lower_at(i, b"set_config") && !is_local_set_config(text.get(i + 10..))
}

/// Whether a `set_config` call (`after` starts right after the name) says `true` as its
/// last argument, literally: a setting for the transaction only (PostgREST and row-level
/// security setups make one in every transaction), which needs no verification. Anything
/// else, or anything this cannot read, is not.
fn is_local_set_config(after: Option<&[u8]>) -> bool {
    let Some(after) = after else {
        return false;
    };
    let mut rest = after.trim_ascii_start();
    let Some(args) = rest.strip_prefix(b"(") else {
        return false;
    };
    rest = args;
    let mut depth = 0usize;
    let mut quoted = false;
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'\'' => quoted = !quoted,
            _ if quoted => {}
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b')' => {
                let last = rest.get(..i).unwrap_or_default().trim_ascii_end();
                let token_start = last
                    .iter()
                    .rposition(|c| !c.is_ascii_alphabetic())
                    .map_or(0, |p| p + 1);
                let token = last.get(token_start..).unwrap_or_default();
                let before = last.get(..token_start).unwrap_or_default().trim_ascii_end();
                return token.eq_ignore_ascii_case(b"true") && before.ends_with(b",");
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_that_may_change_state() {
        for tag in [
            &b"SET\0"[..],
            b"RESET\0",
            b"CREATE TABLE\0",
            b"DROP TABLE\0",
            b"DECLARE CURSOR\0",
            b"CLOSE CURSOR ALL\0",
            b"LISTEN\0",
            b"UNLISTEN\0",
            b"PREPARE\0",
            b"DEALLOCATE ALL\0",
            b"DISCARD TEMP\0",
            b"DO\0",
            b"CALL\0",
        ] {
            assert!(tag_may_change_state(tag), "{tag:?}");
        }
        for tag in [
            &b"SELECT 1\0"[..],
            b"INSERT 0 1\0",
            b"UPDATE 3\0",
            b"BEGIN\0",
            b"COMMIT\0",
            b"ROLLBACK\0",
            b"FETCH 5\0",
            b"COPY 10\0",
            b"SETTINGS\0",
            b"\0",
            b"",
        ] {
            assert!(!tag_may_change_state(tag), "{tag:?}");
        }
    }

    #[test]
    fn texts_that_may_change_state() {
        for text in [
            "CREATE TEMP TABLE t AS SELECT 1",
            "create temporary table t(x int)",
            "SELECT 1 INTO TEMP t",
            "select * from pg_temp.t",
            "SELECT * FROM pg_temp_3.t",
            "SELECT pg_advisory_lock(1)",
            "select PG_TRY_ADVISORY_LOCK(1)",
            "SELECT set_config('work_mem', '64MB', false)",
            "SELECT set_config('work_mem', '64MB', $3)",
            "SELECT set_config('a.b', 'true', is_local)",
            "SELECT set_config('a.b', x, true), set_config('c.d', y, false)",
            "SELECT set_config('a.b', 'x', true",
            "SELECT set_config",
            "CREATE\tTEMP\nTABLE x(y int)",
            "temp",
        ] {
            assert!(text_may_change_state(text.as_bytes()), "{text}");
        }
        for text in [
            "SELECT * FROM attempts",
            "SELECT temperature FROM readings",
            "SELECT * FROM template_x",
            "SELECT contemp FROM t",
            "SELECT 1",
            "",
            "SELECT 'tempé'",
            "select set_config('search_path', $1, true), set_config('role', $2, TRUE)",
            "SELECT set_config('request.jwt.claims', '{\"a\": \"(x\"}', true)",
            "SELECT pg_catalog.set_config ( 'x.y', lower('A'),true )",
        ] {
            assert!(!text_may_change_state(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn kinds_read_as_words_and_statements() {
        let mut kinds = Kinds::default();
        assert!(kinds.is_empty());
        kinds.insert(StateKind::Listen);
        kinds.insert(StateKind::TempTable);
        assert_eq!(kinds.describe(), "a temporary table and LISTEN");
        assert_eq!(kinds.labels(), "temp_table,listen");
        assert_eq!(kinds.reset_sql(), "DISCARD TEMP;UNLISTEN *;");
        assert_eq!(Kinds::from_labels(&kinds.labels()), Some(kinds));
        assert_eq!(Kinds::from_labels(""), Some(Kinds::default()));
        assert_eq!(Kinds::from_labels("temp_table,mystery"), None);
        kinds.insert(StateKind::AdvisoryLock);
        assert_eq!(
            kinds.describe(),
            "a temporary table, a session advisory lock and LISTEN"
        );
    }

    proptest::proptest! {
        /// The rolling-window scan finds exactly what checking every position would.
        #[test]
        fn the_fast_scan_is_exact(
            parts in proptest::collection::vec(
                "temp|TEMPORARY|pg_temp|advisory|set_config\\('x', 'y', (true|false)\\)|[a-z_ ]{0,6}|[\\x00-\\xff]{0,3}",
                0..8,
            ),
        ) {
            let text = parts.concat();
            let text = text.as_bytes();
            let everywhere = (0..text.len()).any(|i| word_at(text, i));
            proptest::prop_assert_eq!(text_may_change_state(text), everywhere);
        }

        /// No text, however broken, makes the trigger scan panic.
        #[test]
        fn trigger_scans_never_panic(text in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = text_may_change_state(&text);
            let _ = tag_may_change_state(&text);
            Found::default().add_row(&text);
        }
    }
}
