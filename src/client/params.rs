//! Session parameters that follow a client across server connections.
//!
//! A client's settings come from its startup packet, from ParameterStatus the server sends
//! while the client holds it (a `SET application_name` outside a transaction), and from
//! standalone `SET name = value` queries for parameters the server does not report (such
//! as `search_path` before PostgreSQL 18, or `statement_timeout`). On checkout, the session
//! brings the server in line with one hidden query ([`ClientParams::sync_sql`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use crate::server::{ServerConn, SettingValue as Value};

/// Parameters the server reports that no `SET` can change.
const READ_ONLY_REPORTED: &[&str] = &[
    "is_superuser",
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "in_hot_standby",
];

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// One client's settings and what it has been told. Owned by the client session.
#[derive(Debug, Default)]
pub struct ClientParams {
    /// (lowercase name, name as written, value) the client wants on its server. Shared
    /// by the clients that logged in with the same settings ([`shared`]), copied by one
    /// that changes its own (memory per idle client).
    wants: Arc<Wants>,
    /// (name, value) as the client was greeted with: the pool's, shared by its clients.
    greeted: Arc<Vec<(String, String)>>,
    /// (name, value) reported to the client since, where it differs from `greeted`.
    seen: Vec<(String, String)>,
    /// What `wants` holds, as a number ([`stamp_of`]); 0 until asked after a change.
    /// (Atomic only to be shared read-only across an await; no other thread writes it.)
    stamp: AtomicU64,
}

impl ClientParams {
    /// The settings of a startup packet: every parameter but user/database/replication and
    /// `_pq_.` options, plus `-c name=value` / `--name=value` inside `options`.
    pub fn from_startup(params: &[(String, String)]) -> Self {
        let mut me = ClientParams::default();
        for (name, value) in params {
            if name == "options" {
                for (n, v) in parse_options(value) {
                    me.want(&n, Value::Text(v));
                }
            } else if !NOT_SETTINGS.contains(&name.as_str()) && !name.starts_with("_pq_.") {
                me.want(name, Value::Text(value.clone()));
            }
        }
        // A client that names no application gets PostgreSQL's default, not the name the
        // previous client of its server left there.
        if !me.wants.iter().any(|(l, _, _)| l == "application_name") {
            me.want("application_name", Value::Text(String::new()));
        }
        me.wants = shared(me.wants);
        me
    }

    /// What an upgrade carries to the new process: the settings wanted (name as written,
    /// value), the greeting and what was reported since ([`ClientParams::from_parts`]).
    #[allow(clippy::type_complexity)] // three plain lists, named by the caller
    pub(crate) fn parts(
        &self,
    ) -> (
        Vec<(String, Value)>,
        Vec<(String, String)>,
        Vec<(String, String)>,
    ) {
        let wants = self
            .wants
            .iter()
            .map(|(_, name, value)| (name.clone(), value.clone()))
            .collect();
        (wants, self.greeted.to_vec(), self.seen.clone())
    }

    /// A client's settings rebuilt from [`ClientParams::parts`] (in the new process of an
    /// upgrade).
    pub(crate) fn from_parts(
        wants: Vec<(String, Value)>,
        greeted: Vec<(String, String)>,
        seen: Vec<(String, String)>,
    ) -> Self {
        let mut me = ClientParams {
            greeted: Arc::new(greeted),
            seen,
            ..ClientParams::default()
        };
        for (name, value) in wants {
            me.want(&name, value);
        }
        me.wants = shared(me.wants);
        me
    }

    fn want(&mut self, name: &str, value: Value) {
        let lower = name.to_ascii_lowercase();
        let wants = Arc::make_mut(&mut self.wants);
        match wants.iter_mut().find(|(l, _, _)| *l == lower) {
            Some(slot) if slot.2 == value => return,
            Some(slot) => slot.2 = value,
            None => wants.push((lower, name.to_owned(), value)),
        }
        self.stamp.store(0, Relaxed);
    }

    /// Stops wanting `name` (after `RESET name`).
    pub fn forget(&mut self, name: &str) {
        let lower = name.to_ascii_lowercase();
        if self.wants.iter().any(|(l, _, _)| *l == lower) {
            Arc::make_mut(&mut self.wants).retain(|(l, _, _)| *l != lower);
            self.stamp.store(0, Relaxed);
        }
    }

    /// The number that stands for what this client wants ([`stamp_of`]).
    fn stamp(&self) -> u64 {
        match self.stamp.load(Relaxed) {
            0 => {
                let stamp = stamp_of(&self.wants);
                self.stamp.store(stamp, Relaxed);
                stamp
            }
            stamp => stamp,
        }
    }

    /// Records a `SET name = sql` the client ran outside a transaction.
    pub fn set_sql(&mut self, name: &str, sql: &str) {
        self.want(name, Value::Sql(sql.to_owned()));
    }

    /// The settings the client asked for as text (its startup packet, `options`), as
    /// (lowercase name, value): what a server is asked to check and spell at login.
    pub fn startup_settings(&self) -> impl Iterator<Item = (&str, &str)> {
        self.wants
            .iter()
            .filter_map(|(lower, _, value)| match value {
                Value::Text(text) => Some((lower.as_str(), text.as_str())),
                Value::Sql(_) => None,
            })
    }

    /// Takes the server's spelling of the values the client asked for (`UTF8` for
    /// `utf8`) from the ParameterStatus set a server reported with them applied.
    pub fn adopt(&mut self, reported: &[(String, String)]) {
        for (name, value) in reported {
            let differs = |(lower, _, v): &(String, String, Value)| {
                lower.eq_ignore_ascii_case(name) && matches!(v, Value::Text(text) if text != value)
            };
            if !self.wants.iter().any(differs) {
                continue;
            }
            if let Some(slot) = Arc::make_mut(&mut self.wants)
                .iter_mut()
                .find(|slot| differs(slot))
            {
                slot.2 = Value::Text(value.clone());
                self.stamp.store(0, Relaxed);
            }
        }
    }

    /// Follows the settings a verification found the session changed on `server` (name,
    /// value as `current_setting` shows it), for parameters the server does not report:
    /// they become the client's, as a standalone `SET` does, and those the client wanted
    /// that the session no longer has are forgotten. Returns whether anything changed.
    pub fn follow(&mut self, found: &[(String, String)], server: &mut ServerConn) -> bool {
        let mut changed = false;
        for (name, value) in found {
            if server.param_ci(name).is_some() {
                continue; // reported: ParameterStatus keeps it exact
            }
            let lower = name.to_ascii_lowercase();
            let value = Value::Text(value.clone());
            let known = self
                .wants
                .iter()
                .any(|(l, _, v)| *l == lower && *v == value);
            if !known {
                changed = true;
                self.want(name, value.clone());
            }
            server.set_applied(&lower, Some(value));
        }
        let gone: Vec<String> = self
            .wants
            .iter()
            .filter(|(lower, _, _)| {
                server.param_ci(lower).is_none()
                    && !found.iter().any(|(n, _)| n.eq_ignore_ascii_case(lower))
            })
            .map(|(lower, _, _)| lower.clone())
            .collect();
        for lower in gone {
            changed = true;
            self.forget(&lower);
            server.set_applied(&lower, None);
        }
        changed
    }

    /// The ParameterStatus set for the login greeting: the server's, with the client's own
    /// values over them. Remembered as what the client has seen.
    pub fn greeting(
        &mut self,
        server_params: &Arc<Vec<(String, String)>>,
    ) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(server_params.len());
        self.greeted = server_params.clone();
        for (name, value) in server_params.iter() {
            let lower = name.to_ascii_lowercase();
            let value = match self.wants.iter().find(|(l, _, _)| *l == lower) {
                Some((_, _, Value::Text(mine))) => {
                    if mine != value {
                        self.seen.push((name.clone(), mine.clone()));
                    }
                    mine.clone()
                }
                _ => value.clone(),
            };
            out.push((name.clone(), value));
        }
        out
    }

    /// A ParameterStatus from the server the client holds. `ours` says whether it came from
    /// the client's own statements (then the client wants the new value) or from pgmux's
    /// hidden sync (then it only normalizes a value the client already wants). Returns
    /// whether to forward it: only when it differs from what the client was last told.
    pub fn reported(&mut self, name: &str, value: &str, ours: bool) -> bool {
        let lower = name.to_ascii_lowercase();
        let wanted = self.wants.iter().any(|(l, _, _)| *l == lower);
        if ours || wanted {
            self.want(name, Value::Text(value.to_owned()));
        }
        if let Some((_, seen)) = self.seen.iter_mut().find(|(n, _)| n == name) {
            if seen == value {
                return false;
            }
            value.clone_into(seen);
            return true;
        }
        if self.greeted.iter().any(|(n, v)| n == name && v == value) {
            return false;
        }
        self.seen.push((name.to_owned(), value.to_owned()));
        true
    }

    /// The hidden query that gives `server` this client's settings, if any differ; updates
    /// the server's record of what was applied to it.
    pub fn sync_sql(&self, server: &mut ServerConn) -> Option<String> {
        // Called at every checkout. The server was last found in line with clients that
        // want exactly this, and nothing changed on it since: nothing to compare.
        let stamp = self.stamp();
        if server.settings_stamp() == stamp {
            return None;
        }
        // Else compare without allocating; build SQL only on a change.
        let mut sql = String::new();
        for (lower, name, value) in self.wants.iter() {
            let same = match (server.param_ci(lower), value) {
                (Some(reported), Value::Text(text)) => reported == text,
                (Some(_), Value::Sql(_)) => false,
                (None, _) => server.applied(lower) == Some(value),
            };
            if same {
                continue;
            }
            push_set(&mut sql, name, value);
            if server.param_ci(lower).is_none() {
                server.set_applied(lower, Some(value.clone()));
            }
        }
        // Settings a previous client left that this one does not want.
        if server
            .applied_settings()
            .any(|lower| !self.wants.iter().any(|(l, _, _)| l == lower))
        {
            for lower in server.applied_names() {
                if !self.wants.iter().any(|(l, _, _)| *l == lower) {
                    sql.push_str(&format!("RESET {};", quote_ident(&lower)));
                    server.set_applied(&lower, None);
                }
            }
        }
        let mut restore = Vec::new();
        for (name, initial) in server.drifted_params() {
            // Read-only: it follows others (is_superuser follows role) and cannot be set.
            if READ_ONLY_REPORTED
                .iter()
                .any(|r| r.eq_ignore_ascii_case(name))
            {
                continue;
            }
            if !self
                .wants
                .iter()
                .any(|(l, _, _)| l.eq_ignore_ascii_case(name))
            {
                restore.push((name.to_owned(), Value::Text(initial.to_owned())));
            }
        }
        for (name, value) in restore {
            push_set(&mut sql, &name, &value);
        }
        if sql.is_empty() {
            // Nothing was recorded on the server above (each change comes with SQL).
            server.set_settings_stamp(stamp);
            return None;
        }
        Some(sql)
    }
}

/// What a client wants: (lowercase name, name as written, value).
type Wants = Vec<(String, String, Value)>;

/// The same settings as `wants`, shared with the other clients that logged in with them
/// (most clients of a pool send the same startup packet), without spare room. Looked up
/// at login, not per transaction; past [`STAMPS_KEPT`] distinct live sets, not shared.
fn shared(mut wants: Arc<Wants>) -> Arc<Wants> {
    static SHARED: Mutex<Option<HashMap<Wants, Weak<Wants>>>> = Mutex::new(None);
    let mut known = SHARED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let known = known.get_or_insert_with(HashMap::new);
    if let Some(same) = known.get(&*wants).and_then(Weak::upgrade) {
        return same;
    }
    if known.len() >= STAMPS_KEPT {
        known.retain(|_, live| live.strong_count() > 0);
        if known.len() >= STAMPS_KEPT {
            return wants;
        }
    }
    Arc::make_mut(&mut wants).shrink_to_fit();
    known.insert((*wants).clone(), Arc::downgrade(&wants));
    wants
}

/// Distinct settings that get a stamp of their own; past this, each client that changes
/// its settings gets a new stamp (correct, only not shared with look-alikes).
const STAMPS_KEPT: usize = 4096;

/// Settings (lowercase name, value) sorted by name, and their stamp.
type Stamps = HashMap<Vec<(String, Value)>, u64>;

/// A number for a set of wanted settings (names and values, in any order): clients that
/// want the same get the same number, so a server that was in line with one of them is
/// known to be in line with the others without comparing text. Never 0. Looked up when a
/// client's settings change (login, SET), not per transaction.
fn stamp_of(wants: &[(String, String, Value)]) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    static KNOWN: Mutex<Option<Stamps>> = Mutex::new(None);
    let mut key: Vec<(String, Value)> = wants
        .iter()
        .map(|(lower, _, value)| (lower.clone(), value.clone()))
        .collect();
    key.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut known = KNOWN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let known = known.get_or_insert_with(HashMap::new);
    if let Some(stamp) = known.get(&key) {
        return *stamp;
    }
    let stamp = NEXT.fetch_add(1, Relaxed);
    if known.len() < STAMPS_KEPT {
        known.insert(key, stamp);
    }
    stamp
}

fn push_set(sql: &mut String, name: &str, value: &Value) {
    match value {
        Value::Text(text) => sql.push_str(&format!(
            "SELECT pg_catalog.set_config({}, {}, false);",
            quote_literal(name),
            quote_literal(text)
        )),
        // The client's own text ran alone as `SET name = raw`; it may end in a `--`
        // comment, which must not swallow the statements that follow it here.
        Value::Sql(raw) => sql.push_str(&format!("SET {name} = {raw}\n;")),
    }
}

/// A string literal that reads the same whatever standard_conforming_strings says.
pub(crate) fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A setting name as a quoted identifier. Always quoted: a bare `all`, `select` or `1x`
/// would read as a keyword or a syntax error (`RESET all` resets everything).
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `-c name=value` and `--name=value` settings in a startup `options` string.
pub(crate) fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut escaped = false;
    for c in options.chars() {
        if escaped {
            word.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c.is_whitespace() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(w) = iter.next() {
        let setting = if w == "-c" {
            iter.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("-c").map(str::to_owned)
        };
        // `-c =x` names nothing (PostgreSQL refuses it); there is nothing to follow.
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('='))
            && !name.is_empty()
        {
            out.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    out
}

/// What a standalone simple Query does to session settings, when pgmux can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// `SET [SESSION] name = value` / `SET name TO value`.
    Set { name: String, sql: String },
    /// `RESET name`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`: settings and prepared statements are gone.
    DiscardAll,
    /// `DEALLOCATE ALL`.
    DeallocateAll,
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate(String),
    /// SQL-level `PREPARE name ...` (not `PREPARE TRANSACTION`): it passes; only a name
    /// of pgmux's own form is refused.
    Prepare(String),
}

/// Recognizes the few statements that change session state, when a Query holds one alone.
pub fn session_change(query: &[u8]) -> Option<SessionChange> {
    // Every Query passes here: most start with another word, and leave without allocating.
    let start = query.iter().position(|b| !b.is_ascii_whitespace())?;
    let word = query.get(start..)?;
    let word = word.split(|b| !b.is_ascii_alphabetic()).next()?;
    const FIRST_WORDS: [&[u8]; 5] = [b"SET", b"RESET", b"DISCARD", b"DEALLOCATE", b"PREPARE"];
    if !FIRST_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
        return None;
    }
    let text = std::str::from_utf8(query).ok()?;
    let text = text
        .trim_end_matches('\0')
        .trim()
        .trim_end_matches(';')
        .trim_end();
    let mut words = text.split_whitespace();
    let first = words.next()?.to_ascii_uppercase();
    let second = words.next().map(str::to_ascii_uppercase);
    match first.as_str() {
        "DISCARD" if second.as_deref() == Some("ALL") => return Some(SessionChange::DiscardAll),
        "PREPARE" if second.as_deref() == Some("TRANSACTION") => return None,
        "PREPARE" => {
            // The name ends at a space, `(` or `AS`.
            let name = text.split_whitespace().nth(1)?;
            let name = name.split('(').next().unwrap_or(name);
            return Some(SessionChange::Prepare(unquote(name)));
        }
        _ => {}
    }
    if text.contains(';') {
        return None; // several statements: not tracked
    }
    match (first.as_str(), second.as_deref()) {
        ("DEALLOCATE", Some("ALL")) => Some(SessionChange::DeallocateAll),
        // `DEALLOCATE PREPARE ALL` is `DEALLOCATE ALL`; `DEALLOCATE prepare` names a statement.
        ("DEALLOCATE", Some("PREPARE")) => match words.next() {
            Some(n) if n.eq_ignore_ascii_case("ALL") => Some(SessionChange::DeallocateAll),
            Some(n) => Some(SessionChange::Deallocate(unquote(n))),
            None => Some(SessionChange::Deallocate("prepare".into())),
        },
        ("DEALLOCATE", Some(_)) => text
            .split_whitespace()
            .nth(1)
            .map(|n| SessionChange::Deallocate(unquote(n))),
        ("RESET", Some("ALL")) => Some(SessionChange::ResetAll),
        ("RESET", Some(_)) => text
            .split_whitespace()
            .nth(1)
            .map(|n| SessionChange::Reset(n.to_owned())),
        ("SET", Some(_)) => parse_set(text),
        _ => None,
    }
}

fn unquote(name: &str) -> String {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    }
}

/// `SET [SESSION] name {=|TO} value`; not SET LOCAL, TRANSACTION, ROLE, TIME ZONE...
/// The text is the client's: every cut is made with `strip_prefix` or `split_at_checked`,
/// never a byte index that could fall inside a character.
fn parse_set(text: &str) -> Option<SessionChange> {
    let rest = strip_word(text, "set")?.trim_start();
    let rest = strip_word(rest, "session").map_or(rest, str::trim_start);
    let name_end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(rest.len());
    let (name, after) = rest.split_at_checked(name_end)?;
    let upper = name.to_ascii_uppercase();
    if name.is_empty()
        || [
            "LOCAL",
            "TRANSACTION",
            "ROLE",
            "TIME",
            "SESSION",
            "CONSTRAINTS",
        ]
        .contains(&upper.as_str())
    {
        return None;
    }
    let after = after.trim_start();
    let value = match after.strip_prefix('=') {
        Some(value) => value,
        None => strip_word(after, "to")?,
    };
    let value = value.trim();
    (!value.is_empty()).then(|| SessionChange::Set {
        name: name.to_owned(),
        sql: value.to_owned(),
    })
}

/// `text` after its first word when that word is `word` (any case) followed by a space.
fn strip_word<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let (head, rest) = text.split_at_checked(word.len())?;
    (head.eq_ignore_ascii_case(word) && rest.starts_with(char::is_whitespace)).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_settings_get_the_same_stamp_in_any_order() {
        let a = ClientParams::from_startup(&[
            ("application_name".into(), "app".into()),
            ("DateStyle".into(), "ISO".into()),
        ]);
        let b = ClientParams::from_startup(&[
            ("datestyle".into(), "ISO".into()),
            ("application_name".into(), "app".into()),
        ]);
        let mut c = ClientParams::from_startup(&[("application_name".into(), "app".into())]);
        assert_eq!(a.stamp(), b.stamp());
        assert_ne!(a.stamp(), c.stamp());
        assert_ne!(c.stamp(), 0);
        c.set_sql("DateStyle", "'ISO'");
        assert_ne!(a.stamp(), c.stamp(), "SQL and text values differ");
        c.want("DateStyle", Value::Text("ISO".into()));
        assert_eq!(a.stamp(), c.stamp());
        c.forget("datestyle");
        assert_ne!(a.stamp(), c.stamp());
    }

    #[test]
    fn clients_with_the_same_startup_settings_share_them_until_one_changes() {
        let startup = [
            ("application_name".to_owned(), "shared-test".to_owned()),
            ("DateStyle".to_owned(), "ISO".to_owned()),
        ];
        let mut a = ClientParams::from_startup(&startup);
        let b = ClientParams::from_startup(&startup);
        assert!(Arc::ptr_eq(&a.wants, &b.wants), "one copy for both");
        assert_eq!(a.wants.capacity(), a.wants.len(), "no spare room");
        a.set_sql("search_path", "app");
        assert!(!Arc::ptr_eq(&a.wants, &b.wants), "a change is a's own");
        assert_eq!(b.wants.len(), 2);
        assert_eq!(a.wants.len(), 3);
        a.forget("search_path");
        a.adopt(&[("datestyle".into(), "ISO, MDY".into())]);
        assert!(
            matches!(&b.wants[1].2, Value::Text(v) if v == "ISO"),
            "b keeps its value"
        );
        assert_eq!(a.stamp(), stamp_of(&a.wants));
        // Settings nobody holds any more are not kept alive by the table.
        drop((a, b));
        let c = ClientParams::from_startup(&startup);
        assert_eq!(Arc::strong_count(&c.wants), 1);
    }

    #[test]
    fn options_settings() {
        assert_eq!(
            parse_options("-c statement_timeout=5s --search-path=a,b -cwork_mem=4MB"),
            vec![
                ("statement_timeout".into(), "5s".into()),
                ("search_path".into(), "a,b".into()),
                ("work_mem".into(), "4MB".into())
            ]
        );
    }

    #[test]
    fn session_changes() {
        assert_eq!(
            session_change(b"SET search_path TO app, public\0"),
            Some(SessionChange::Set {
                name: "search_path".into(),
                sql: "app, public".into()
            })
        );
        assert_eq!(
            session_change(b"set session statement_timeout = '5s';\0"),
            Some(SessionChange::Set {
                name: "statement_timeout".into(),
                sql: "'5s'".into()
            })
        );
        assert_eq!(session_change(b"SET LOCAL x = 1\0"), None);
        assert_eq!(session_change(b"SET x = 1; SELECT 1\0"), None);
        assert_eq!(session_change(b"SELECT 1\0"), None);
        assert_eq!(session_change(b"SETTINGS\0"), None);
        assert_eq!(session_change(b"  \n\0"), None);
        assert_eq!(
            session_change(b" \n\tReSeT\tALL;\0"),
            Some(SessionChange::ResetAll)
        );
        // SQL-level PREPARE passes (the verification judges it), PREPARE TRANSACTION too.
        assert_eq!(
            session_change(b"prepare p(int) as select $1\0"),
            Some(SessionChange::Prepare("p".into()))
        );
        assert_eq!(
            session_change(b"PREPARE \"Pgmux_s1\" AS SELECT 1\0"),
            Some(SessionChange::Prepare("Pgmux_s1".into()))
        );
        assert_eq!(session_change(b"PREPARE TRANSACTION 'x'\0"), None);
        assert_eq!(
            session_change(b"DISCARD ALL\0"),
            Some(SessionChange::DiscardAll)
        );
        assert_eq!(
            session_change(b"DEALLOCATE PREPARE \"S_1\"\0"),
            Some(SessionChange::Deallocate("S_1".into()))
        );
        assert_eq!(
            session_change(b"deallocate all\0"),
            Some(SessionChange::DeallocateAll)
        );
        assert_eq!(
            session_change(b"DEALLOCATE PREPARE all;\0"),
            Some(SessionChange::DeallocateAll)
        );
        assert_eq!(
            session_change(b"DEALLOCATE prepare\0"),
            Some(SessionChange::Deallocate("prepare".into()))
        );
        assert_eq!(
            session_change(b"DEALLOCATE PGMUX_S1\0"),
            Some(SessionChange::Deallocate("pgmux_s1".into()))
        );
        assert_eq!(
            session_change(b"RESET search_path\0"),
            Some(SessionChange::Reset("search_path".into()))
        );
    }

    #[test]
    fn text_from_a_document_is_not_a_panic() {
        // Curly quotes and other multi-byte characters where ASCII is expected.
        for query in [
            "SET TimeZone \u{2018}UTC\u{2019}\0",
            "SET x \u{20ac}\0",
            "SET \u{e9}t\u{e9} = 1\0",
            "SET session\u{a0}x = 1\0",
            "SET x t\u{f6} 1\0",
            "RESET \u{2018}x\0",
            "DEALLOCATE \u{2018}\0",
        ] {
            let _ = session_change(query.as_bytes());
        }
        assert_eq!(
            session_change("SET TimeZone \u{2018}UTC\u{2019}\0".as_bytes()),
            None
        );
    }

    #[test]
    fn literals_are_quoted_safely() {
        assert_eq!(quote_literal("it's a \\ b"), "E'it''s a \\\\ b'");
        // The classify fuzz target found an empty name left bare; so are keywords (`RESET all`).
        assert_eq!(quote_ident("all"), "\"all\"");
        assert_eq!(quote_ident("a.b\"c"), "\"a.b\"\"c\"");
    }

    #[test]
    fn a_replayed_set_ends_its_own_comment() {
        let mut sql = String::new();
        push_set(
            &mut sql,
            "statement_timeout",
            &Value::Sql("5000 -- 5 s".into()),
        );
        push_set(&mut sql, "search_path", &Value::Sql("app".into()));
        assert_eq!(
            sql,
            "SET statement_timeout = 5000 -- 5 s\n;SET search_path = app\n;"
        );
    }

    #[test]
    fn options_without_a_name_are_ignored() {
        assert_eq!(parse_options("-c =x --=y"), vec![]);
    }

    #[test]
    fn greeting_shows_the_clients_own_values() {
        let mut p = ClientParams::from_startup(&[
            ("user".into(), "app".into()),
            ("application_name".into(), "alpha".into()),
        ]);
        let shown = p.greeting(&Arc::new(vec![
            ("application_name".into(), "pgmux".into()),
            ("TimeZone".into(), "UTC".into()),
        ]));
        assert_eq!(shown[0].1, "alpha");
        assert!(!p.reported("application_name", "alpha", false));
        assert!(p.reported("TimeZone", "Asia/Tokyo", true));
    }

    /// Words `parse_set` refuses as setting names.
    const NOT_NAMES: [&str; 6] = [
        "local",
        "transaction",
        "role",
        "time",
        "session",
        "constraints",
    ];

    proptest::proptest! {
        /// No text, however broken, makes the classifier panic.
        #[test]
        fn session_change_never_panics(text in proptest::prelude::any::<String>(), set in proptest::prelude::any::<bool>()) {
            let text = if set { format!("SET {text}") } else { text };
            let _ = session_change(text.as_bytes());
            let _ = session_change(format!("{text}\0").as_bytes());
        }

        /// `SET [SESSION] name {=|TO} value` in any case and spacing, with or without a
        /// final `;`, is recognized with the client's exact value text; `RESET name` too.
        #[test]
        fn set_forms_are_recognised(
            set in "[sS][eE][tT]",
            session in proptest::option::of("[sS][eE][sS][sS][iI][oO][nN][ \t\n]{1,3}"),
            name in "[a-zA-Z_][a-zA-Z0-9_]{0,15}(\\.[a-z_][a-z0-9_]{0,10})?",
            to in proptest::prelude::any::<bool>(),
            value in "'[^';\0]{0,20}'|[0-9]{1,6}(ms|s|MB)?|[a-z_]{1,10}|-?[0-9]+\\.[0-9]+",
            spaces in proptest::collection::vec("[ \t\r\n]{0,3}", 4),
            end in "(;[ \n]*)?",
        ) {
            proptest::prop_assume!(!NOT_NAMES.contains(&name.to_ascii_lowercase().as_str()));
            let ws = |i: usize| if spaces[i].is_empty() { " " } else { spaces[i].as_str() };
            let sep = if to { format!("{}TO{}", ws(1), ws(2)) } else { format!("{}={}", spaces[1], spaces[2]) };
            let query = format!(
                "{}{set}{}{}{name}{sep}{value}{}{end}\0",
                spaces[0], ws(3), session.unwrap_or_default(), spaces[3]
            );
            proptest::prop_assert_eq!(
                session_change(query.as_bytes()),
                Some(SessionChange::Set { name: name.clone(), sql: value }),
                "{:?}", query
            );
            if !name.eq_ignore_ascii_case("all") {
                let reset = format!("{}reset {name}{end}\0", spaces[0]);
                proptest::prop_assert_eq!(session_change(reset.as_bytes()), Some(SessionChange::Reset(name)));
            }
        }

        /// A quoted literal reads back, by PostgreSQL's escape-string rules, as the text
        /// (tests/fuzz_corpus.rs has PostgreSQL itself read them).
        #[test]
        fn quoted_literals_read_back(text in "[^\0]{0,40}") {
            proptest::prop_assert_eq!(crate::fuzz::unquote_literal(&quote_literal(&text)), Some(text));
        }

        /// A quoted name reads back, by PostgreSQL's identifier rules, as the name.
        #[test]
        fn quoted_names_read_back(name in "[^\0]{1,40}") {
            proptest::prop_assert_eq!(crate::fuzz::unquote_ident(&quote_ident(&name)), Some(name));
        }

        /// `-c name=value` and `--name=value`, with spaces and backslashes escaped as libpq
        /// does, read back as the settings.
        #[test]
        fn options_read_back(
            settings in proptest::collection::vec(("[a-z_][a-z0-9_.]{0,12}", "[^\0]{0,12}", proptest::prelude::any::<bool>()), 0..5),
        ) {
            let escape = |s: &str| {
                let mut out = String::new();
                for c in s.chars() {
                    if c == '\\' || c.is_whitespace() {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out
            };
            let words: Vec<String> = settings
                .iter()
                .map(|(n, v, long)| if *long { format!("--{n}={}", escape(v)) } else { format!("-c {n}={}", escape(v)) })
                .collect();
            let expected: Vec<(String, String)> =
                settings.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect();
            proptest::prop_assert_eq!(parse_options(&words.join(" ")), expected);
        }
    }
}
