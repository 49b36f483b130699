//! Named prepared statements across pooled server connections.
//!
//! Drivers prepare a statement once and use it in later transactions, which land on other
//! server connections. pgmux registers every named Parse globally by (query text, parameter
//! types) under a server-side name (`pgmux_s42`), maps each client's own name to it
//! ([`ClientStatements`]), and remembers which server connection holds which statements
//! ([`ServerStatements`], a bounded LRU). The session rewrites names and prepares a
//! statement on the server it holds when that server lacks it.

mod message;

pub use message::{Bind, Close, Describe, Parse, rewrite_bind, rewrite_describe};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

/// One distinct statement (query text and parameter types), shared by every client that
/// prepared it under whatever name.
#[derive(Debug)]
pub struct Statement {
    /// Process-wide id; the server-side name is derived from it.
    pub id: u64,
    /// The name pgmux gives it on servers.
    pub server_name: String,
    /// A complete Parse message that prepares it under `server_name`.
    pub parse: Bytes,
    /// Some server accepted it: a client's Parse of it may be answered without a server.
    pub verified: AtomicBool,
    /// A server refused to run it because DDL changed its result type (PostgreSQL's
    /// `0A000 cached plan must not change result type`): that ErrorResponse, whole. Set
    /// once; the registry forgot the statement then, so a new Parse of its text gets a new
    /// statement, and every later use of this one gets this error, as on a direct
    /// connection until the client prepares again.
    pub result_changed: OnceLock<Bytes>,
    /// Its text may make session state no command tag shows (`client/state.rs`): each
    /// execution is a trigger.
    pub may_change_state: bool,
}

/// Query text and parameter type OIDs.
type StatementKey = (Box<str>, Box<[u32]>);

/// Statements registered; what a client, a server connection or a reply in flight holds
/// keeps its entry alive.
#[derive(Default)]
struct Entries {
    by_key: HashMap<StatementKey, Arc<Statement>>,
    /// Above this many entries, the next registration sweeps out unused ones.
    sweep_above: usize,
}

/// Every statement clients prepared, by (query, parameter types). Shared by all pools;
/// touched only when a client sends a named Parse. Bounded: beyond `capacity`, statements
/// that no client, no server connection and no reply in flight holds are forgotten (a
/// client that prepares a million distinct texts does not grow pgmux for ever).
pub struct Registry {
    entries: Mutex<Entries>,
    capacity: AtomicUsize,
    next_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(10_000)
    }
}

impl Statement {
    /// Its query text and parameter types, as the client's Parse gave them.
    pub fn text_and_types(&self) -> Option<(&str, Vec<u32>)> {
        let parse = message::Parse::read(self.parse.get(5..)?)?;
        Some((parse.query, parse.param_types))
    }
}

impl Registry {
    /// A registry that keeps about `capacity` unused statements at most.
    pub fn new(capacity: usize) -> Self {
        Registry {
            entries: Mutex::new(Entries {
                by_key: HashMap::new(),
                sweep_above: capacity,
            }),
            capacity: AtomicUsize::new(capacity),
            next_id: AtomicU64::new(0),
        }
    }

    /// How many unused statements it keeps at most; also the most named statements one
    /// client may hold at once.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// A new capacity (config reload); applies from the next registration.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
        self.entries.lock().sweep_above = capacity;
    }

    /// The statement for this query and these parameter types, registered on first use.
    pub fn statement(&self, query: &str, param_types: &[u32]) -> Arc<Statement> {
        let mut entries = self.entries.lock();
        if let Some(found) = entries.by_key.get(&(query.into(), param_types.into())) {
            return found.clone();
        }
        if entries.by_key.len() >= entries.sweep_above {
            // Only the registry's own reference left: nobody can name it any more.
            entries.by_key.retain(|_, s| Arc::strong_count(s) > 1);
            // Sweep again only after a quarter of the capacity more: when everything is in
            // use, registrations stay cheap instead of sweeping every time.
            let capacity = self.capacity.load(Ordering::Relaxed);
            entries.sweep_above = capacity.max(entries.by_key.len() + capacity / 4 + 1);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let server_name = format!("pgmux_s{id}");
        let statement = Arc::new(Statement {
            id,
            parse: parse_message(&server_name, query, param_types),
            server_name,
            verified: AtomicBool::new(false),
            result_changed: OnceLock::new(),
            may_change_state: crate::client::state::text_may_change_state(query.as_bytes()),
        });
        entries
            .by_key
            .insert((query.into(), param_types.into()), statement.clone());
        statement
    }

    /// Forgets `statement` (its result type changed), so that the next Parse of its text
    /// and parameter types registers a new statement under a new server-side name. Those
    /// who hold it keep it.
    pub fn forget(&self, statement: &Statement) {
        let Some(parse) = statement.parse.get(5..).and_then(message::Parse::read) else {
            return;
        };
        let key: StatementKey = (parse.query.into(), parse.param_types.into());
        let mut entries = self.entries.lock();
        if entries
            .by_key
            .get(&key)
            .is_some_and(|found| found.id == statement.id)
        {
            entries.by_key.remove(&key);
        }
    }

    /// How many distinct statements are registered.
    pub fn len(&self) -> usize {
        self.entries.lock().by_key.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A complete Parse message.
pub fn parse_message(name: &str, query: &str, param_types: &[u32]) -> Bytes {
    let mut buf = BytesMut::with_capacity(query.len() + name.len() + 16);
    buf.put_u8(b'P');
    buf.put_i32(0);
    buf.put_slice(name.as_bytes());
    buf.put_u8(0);
    buf.put_slice(query.as_bytes());
    buf.put_u8(0);
    buf.put_i16(param_types.len() as i16);
    for oid in param_types {
        buf.put_u32(*oid);
    }
    let len = (buf.len() - 1) as i32;
    if let Some(header) = buf.get_mut(1..5) {
        header.copy_from_slice(&len.to_be_bytes());
    }
    buf.freeze()
}

/// One client's statement names. Owned by the client session.
#[derive(Default, Debug)]
pub struct ClientStatements {
    by_name: HashMap<String, Arc<Statement>>,
}

impl ClientStatements {
    /// The statement the client knows as `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        self.by_name.get(name)
    }

    /// Records that the client prepared `name`.
    pub fn insert(&mut self, name: &str, statement: Arc<Statement>) {
        self.by_name.insert(name.to_owned(), statement);
    }

    /// Forgets `name` (Close, or a Parse that failed). Only if it still maps to `id`, when given.
    pub fn remove(&mut self, name: &str, id: Option<u64>) {
        if id.is_none_or(|id| self.by_name.get(name).is_some_and(|s| s.id == id)) {
            self.by_name.remove(name);
        }
    }

    /// Every (name, statement) the client holds.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Statement>)> {
        self.by_name.iter().map(|(name, s)| (name.as_str(), s))
    }

    /// Forgets everything (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    /// How many names the client holds.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The statements one server connection holds, bounded, least recently used first out.
/// Owned by the server connection.
///
/// What it records is surely on the server. It can also be *unsure*: a client deallocated
/// statements pgmux cannot name (a `DEALLOCATE` in a multi-statement Query or by the
/// extended protocol), so the server may lack some it recorded, which were forgotten, and
/// may still hold others it no longer records. Then a statement not recorded is closed
/// before it is prepared (Close of an unknown name succeeds, so that is right either way),
/// and the next checkout deallocates them all and starts over ([`ServerStatements::clear`]).
#[derive(Debug, Default)]
pub struct ServerStatements {
    held: HashMap<u64, (u64, Arc<Statement>)>,
    tick: u64,
    unsure: bool,
}

impl ServerStatements {
    /// Whether the server surely holds it; marks it used.
    pub fn touch(&mut self, statement: &Statement) -> bool {
        self.tick += 1;
        match self.held.get_mut(&statement.id) {
            Some((used, _)) => {
                *used = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records that the server holds it (a Parse was sent). Returns the least recently used
    /// statement to close when that makes more than `max`.
    pub fn insert(&mut self, statement: Arc<Statement>, max: usize) -> Option<Arc<Statement>> {
        self.tick += 1;
        self.held.insert(statement.id, (self.tick, statement));
        if self.held.len() <= max {
            return None;
        }
        let oldest = self
            .held
            .iter()
            .min_by_key(|(_, (used, _))| *used)
            .map(|(id, _)| *id)?;
        self.held.remove(&oldest).map(|(_, s)| s)
    }

    /// Records that the server does not hold it (its Parse failed, or it was closed).
    pub fn remove(&mut self, id: u64) {
        self.held.remove(&id);
    }

    /// The server holds none of pgmux's statements (it ran DISCARD ALL or DEALLOCATE ALL
    /// and nothing was sent after it): the record is empty and sure again.
    pub fn clear(&mut self) {
        self.held.clear();
        self.unsure = false;
    }

    /// The server may have lost any of the statements recorded, and may still hold any
    /// of them: none is recorded, and the record is unsure until the next [`clear`].
    ///
    /// [`clear`]: ServerStatements::clear
    pub fn distrust(&mut self) {
        self.held.clear();
        self.unsure = true;
    }

    /// Whether the server may hold statements that are not recorded: one must be closed
    /// before it is prepared.
    pub fn is_unsure(&self) -> bool {
        self.unsure
    }

    /// The statements it holds (an upgrade carries them).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Statement>> {
        self.held.values().map(|(_, statement)| statement)
    }

    /// How many it holds.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_and_types_share_a_statement() {
        let registry = Registry::default();
        let a = registry.statement("SELECT $1", &[23]);
        let b = registry.statement("SELECT $1", &[23]);
        let c = registry.statement("SELECT $1", &[25]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.id, c.id);
        assert_eq!(&a.parse[..1], b"P");
        assert!(a.server_name.starts_with("pgmux_s"));
    }

    #[test]
    fn unused_statements_are_forgotten_beyond_the_capacity() {
        let registry = Registry::new(100);
        let kept = registry.statement("SELECT 'kept'", &[]);
        for i in 0..10_000 {
            registry.statement(&format!("SELECT {i}"), &[]);
        }
        assert!(registry.len() <= 126, "bounded: {}", registry.len());
        let again = registry.statement("SELECT 'kept'", &[]);
        assert!(
            Arc::ptr_eq(&kept, &again),
            "a statement in use is never forgotten"
        );
        let held: Vec<_> = (0..1_000)
            .map(|i| registry.statement(&format!("SELECT 'held' || {i}"), &[]))
            .collect();
        assert!(registry.len() >= held.len(), "statements in use stay");
    }

    #[test]
    fn a_forgotten_statement_is_registered_again_under_a_new_name() {
        let registry = Registry::default();
        let old = registry.statement("SELECT * FROM t", &[23]);
        registry.forget(&old);
        let new = registry.statement("SELECT * FROM t", &[23]);
        assert_ne!(old.server_name, new.server_name);
        // Forgetting the old one again leaves the new one registered.
        registry.forget(&old);
        let again = registry.statement("SELECT * FROM t", &[23]);
        assert!(Arc::ptr_eq(&new, &again));
    }

    #[test]
    fn an_unsure_record_is_empty_until_cleared() {
        let registry = Registry::default();
        let s = registry.statement("SELECT 1", &[]);
        let mut held = ServerStatements::default();
        held.insert(s.clone(), 10);
        held.distrust();
        assert!(held.is_unsure() && held.is_empty());
        assert!(!held.touch(&s), "not surely held any more");
        held.insert(s.clone(), 10);
        assert!(held.touch(&s) && held.is_unsure(), "prepared again: held");
        held.clear();
        assert!(!held.is_unsure() && held.is_empty());
    }

    #[test]
    fn server_statements_evict_least_recently_used() {
        let registry = Registry::default();
        let s: Vec<_> = (0..3)
            .map(|i| registry.statement(&format!("SELECT {i}"), &[]))
            .collect();
        let mut held = ServerStatements::default();
        assert!(held.insert(s[0].clone(), 2).is_none());
        assert!(held.insert(s[1].clone(), 2).is_none());
        assert!(held.touch(&s[0]));
        let evicted = held.insert(s[2].clone(), 2).expect("one evicted");
        assert_eq!(evicted.id, s[1].id);
        assert!(!held.touch(&s[1]));
        assert_eq!(held.len(), 2);
    }
}
