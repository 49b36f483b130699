//! What a server of the pool reports to a client with a given set of startup settings: the
//! ParameterStatus set the client is greeted with, in the server's own spelling (`UTF8`
//! for `utf8`, `ISO, MDY` for `iso, mdy`, `application_name` cut to 63 bytes).
//!
//! Learnt from a server at the login of the first client with those settings
//! (`client/login.rs` asks one), then kept here, so that the logins that follow cost no
//! round trip. Bounded: a pool whose clients all send different settings (a unique
//! `application_name` each) keeps only the last few.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// At most this many sets of settings are remembered per pool.
const MAX_ENTRIES: usize = 128;

/// A ParameterStatus set, as (name, value) in the order the server first reported them.
pub type Reported = Arc<Vec<(String, String)>>;

/// The greeting learnt for each set of client settings. Owned by the pool; shared by the
/// logins of its clients (a short lock, never across an `.await`).
#[derive(Default)]
pub struct Greetings {
    /// By [`Greetings::key`].
    known: Mutex<HashMap<String, Reported>>,
}

impl Greetings {
    /// The key of a set of settings, (lowercase name, value) each: the same for the same
    /// settings in any order.
    pub fn key<'a>(settings: impl Iterator<Item = (&'a str, &'a str)>) -> String {
        let mut settings: Vec<(&str, &str)> = settings.collect();
        settings.sort_unstable();
        let mut key = String::new();
        for (name, value) in settings {
            // Neither can hold a NUL: they came from a startup packet's C strings.
            key.push_str(name);
            key.push('\0');
            key.push_str(value);
            key.push('\0');
        }
        key
    }

    /// What a server reported for these settings, if learnt.
    pub fn get(&self, key: &str) -> Option<Reported> {
        self.known.lock().get(key).cloned()
    }

    /// Remembers what a server reported for these settings. When full, one entry (any)
    /// makes room.
    pub fn insert(&self, key: String, reported: Reported) {
        let mut known = self.known.lock();
        if known.len() >= MAX_ENTRIES
            && !known.contains_key(&key)
            && let Some(old) = known.keys().next().cloned()
        {
            known.remove(&old);
        }
        known.insert(key, reported);
    }

    /// Forgets everything (the pool points at another upstream).
    pub fn clear(&self) {
        self.known.lock().clear();
    }
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
}
