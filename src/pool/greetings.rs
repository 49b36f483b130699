//! What a server of the pool makes of a client's startup settings: the ParameterStatus set
//! the client is greeted with, in the server's own spelling (`UTF8` for `utf8`, `ISO, MDY`
//! for `iso, mdy`, `application_name` cut to 63 bytes), or the error it refused them with
//! (`42704 unrecognized configuration parameter`, `22023 invalid value`).
//!
//! Learnt from a server at the login of the first client with those settings
//! (`client/login.rs` asks one), then kept here, so that the logins that follow cost no
//! round trip, and a client retrying with a setting PostgreSQL refuses is told
//! PostgreSQL's own error even when no server is free. Bounded: a pool whose clients all
//! send different settings (a unique `application_name` each) keeps only the last few.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

/// At most this many sets of settings are remembered per pool.
const MAX_ENTRIES: usize = 128;

/// At most this many single settings a server took are remembered per pool.
const MAX_ACCEPTED: usize = 1024;

/// A ParameterStatus set, as (name, value) in the order the server first reported them.
pub type Reported = Arc<Vec<(String, String)>>;

/// What a server made of a set of startup settings.
#[derive(Clone, Debug)]
pub enum Learnt {
    /// It took them, and reported this.
    Reported(Reported),
    /// It refused one with this ErrorResponse body (a class 22 or 42 error: the same
    /// settings are refused the same way every time).
    Refused(Arc<Vec<u8>>),
}

/// The greeting learnt for each set of client settings. Owned by the pool; shared by the
/// logins of its clients (a short lock, never across an `.await`).
#[derive(Default)]
pub struct Greetings {
    /// By [`Greetings::key`].
    known: Mutex<HashMap<String, Learnt>>,
    /// Single settings (lowercase name, value, as in a key) that a server took as part of
    /// a set it reported: a new set made only of these needs no server to vouch for it.
    accepted: Mutex<HashSet<String>>,
}

impl Greetings {
    /// The key of a set of settings, (lowercase name, value) each: the same for the same
    /// settings in any order.
    pub fn key<'a>(settings: impl Iterator<Item = (&'a str, &'a str)>) -> String {
        let mut settings: Vec<(&str, &str)> = settings.collect();
        settings.sort_unstable();
        let mut key = String::new();
        for (name, value) in settings {
            key.push_str(&pair(name, value));
        }
        key
    }

    /// What a server made of these settings, if learnt.
    pub fn get(&self, key: &str) -> Option<Learnt> {
        self.known.lock().get(key).cloned()
    }

    /// Remembers what a server reported for these settings, and each of them as taken.
    /// When full, one entry (any) makes room.
    pub fn insert(&self, key: String, reported: Reported) {
        {
            let mut accepted = self.accepted.lock();
            // A key is `name\0value\0` pairs: each pair taken is remembered alone.
            let mut fields = key.split_terminator('\0');
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                let one = pair(name, value);
                if accepted.len() >= MAX_ACCEPTED
                    && !accepted.contains(&one)
                    && let Some(old) = accepted.iter().next().cloned()
                {
                    accepted.remove(&old);
                }
                accepted.insert(one);
            }
        }
        self.remember(key, Learnt::Reported(reported));
    }

    /// Remembers that a server refused these settings with `error` (an ErrorResponse
    /// body), if the refusal is one the same settings always get: a value or a name the
    /// server does not take (SQLSTATE class 22 or 42), not a passing failure.
    pub fn refused(&self, key: String, code: &str, error: Vec<u8>) {
        if code.starts_with("22") || code.starts_with("42") {
            self.remember(key, Learnt::Refused(Arc::new(error)));
        }
    }

    fn remember(&self, key: String, learnt: Learnt) {
        let mut known = self.known.lock();
        if known.len() >= MAX_ENTRIES
            && !known.contains_key(&key)
            && let Some(old) = known.keys().next().cloned()
        {
            known.remove(&old);
        }
        known.insert(key, learnt);
    }

    /// Whether a server would take each of these settings: one took it before, as part of
    /// some set; or it is the value servers of the pool report already (`defaults`, their
    /// ParameterStatus at login: `client_encoding=UTF8`); or the setting is one PostgreSQL
    /// never refuses (`application_name`, which it only cleans up). A client with such
    /// settings may be greeted with its own values when no server is free to check the
    /// set; any other must wait for a server's word.
    pub fn vouched<'a>(
        &self,
        mut settings: impl Iterator<Item = (&'a str, &'a str)>,
        defaults: &[(String, String)],
    ) -> bool {
        let accepted = self.accepted.lock();
        settings.all(|(name, value)| {
            name == "application_name"
                || accepted.contains(&pair(name, value))
                || defaults
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value)
        })
    }

    /// Forgets everything (the pool points at another upstream).
    pub fn clear(&self) {
        self.known.lock().clear();
        self.accepted.lock().clear();
    }
}

/// One setting as it is written in a key.
fn pair(name: &str, value: &str) -> String {
    // Neither can hold a NUL: they came from a startup packet's C strings.
    format!("{name}\0{value}\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_settings_in_any_order_share_a_key_and_the_cache_stays_bounded() {
        let a = Greetings::key([("timezone", "utc"), ("application_name", "x")].into_iter());
        let b = Greetings::key([("application_name", "x"), ("timezone", "utc")].into_iter());
        assert_eq!(a, b);
        assert_ne!(a, Greetings::key([("timezone", "utc")].into_iter()));

        let greetings = Greetings::default();
        for i in 0..MAX_ENTRIES * 2 {
            greetings.insert(format!("k{i}"), Arc::default());
        }
        assert_eq!(greetings.known.lock().len(), MAX_ENTRIES);
        let last = format!("k{}", MAX_ENTRIES * 2 - 1);
        assert!(greetings.get(&last).is_some());
        greetings.clear();
        assert!(greetings.get(&last).is_none());
    }

    #[test]
    fn settings_a_server_took_vouch_for_new_sets_of_them() {
        let greetings = Greetings::default();
        let utf8 = [("client_encoding", "utf8"), ("application_name", "a")];
        let none = &[];
        assert!(!greetings.vouched(utf8.into_iter(), none));
        greetings.insert(Greetings::key(utf8.into_iter()), Arc::default());
        // Another application name with a setting taken before: vouched for.
        let again = [("application_name", "b"), ("client_encoding", "utf8")];
        assert!(greetings.vouched(again.into_iter(), none));
        let other = [("client_encoding", "latin1")];
        assert!(!greetings.vouched(other.into_iter(), none));
        assert!(greetings.vouched([("application_name", "any")].into_iter(), none));
        // The value servers report already.
        let defaults = [("DateStyle".to_owned(), "ISO, MDY".to_owned())];
        assert!(greetings.vouched([("datestyle", "ISO, MDY")].into_iter(), &defaults));
        assert!(!greetings.vouched([("datestyle", "German")].into_iter(), &defaults));

        // Refusals are remembered only when the same settings always get them.
        let bogus = Greetings::key([("bogus", "1")].into_iter());
        greetings.refused(bogus.clone(), "57014", b"x".to_vec());
        assert!(greetings.get(&bogus).is_none());
        greetings.refused(bogus.clone(), "42704", b"x".to_vec());
        assert!(matches!(greetings.get(&bogus), Some(Learnt::Refused(_))));
        assert!(!greetings.vouched([("bogus", "1")].into_iter(), none));

        for i in 0..MAX_ACCEPTED * 2 {
            let value = i.to_string();
            let key = Greetings::key([("x", value.as_str())].into_iter());
            greetings.insert(key, Arc::default());
        }
        assert_eq!(greetings.accepted.lock().len(), MAX_ACCEPTED);
        greetings.clear();
        assert!(!greetings.vouched(again.into_iter(), none));
    }
}
