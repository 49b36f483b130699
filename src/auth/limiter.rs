//! Failed logins: why each failed (a bounded set of reasons, counted for `/metrics`), and
//! the limiter that locks out a user from an address, or a whole address, after too many
//! of them.
//!
//! One [`LoginGuard`] lives in the pooler for the life of the process; its settings come
//! from the config in force at each login, so a reload changes them for the next one.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Why a login failed. A bounded set: each is a `reason` label of
/// `pgmux_login_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// A wrong password (or a known user without one).
    BadPassword,
    /// A user pgmux does not know.
    UnknownUser,
    /// A database pgmux does not know (told only after authentication).
    UnknownDatabase,
    /// An access rule rejects the client, or none matches it.
    RejectedByRule,
    /// The address is locked out after too many failures.
    RateLimited,
    /// No login within `server.client_login_timeout`.
    Timeout,
    /// The client broke the protocol during its login.
    Protocol,
    /// The TLS handshake failed, or the client did not use TLS where it is required.
    Tls,
}

impl FailureReason {
    /// Every reason, in the order of their counters.
    pub const ALL: [FailureReason; 8] = [
        Self::BadPassword,
        Self::UnknownUser,
        Self::UnknownDatabase,
        Self::RejectedByRule,
        Self::RateLimited,
        Self::Timeout,
        Self::Protocol,
        Self::Tls,
    ];

    /// The label value and the word in the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadPassword => "bad_password",
            Self::UnknownUser => "unknown_user",
            Self::UnknownDatabase => "unknown_database",
            Self::RejectedByRule => "rejected_by_rule",
            Self::RateLimited => "rate_limited",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::Tls => "tls",
        }
    }

    /// Whether the failure was a guess at a password (or at a name): only those count
    /// toward a lockout. A timeout or a broken client guessed nothing, and a rule's answer
    /// does not change with retries.
    fn is_guess(self) -> bool {
        matches!(
            self,
            Self::BadPassword | Self::UnknownUser | Self::UnknownDatabase
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The limiter's settings (`[auth] max_login_failures`, `max_login_failures_per_address`,
/// `login_failure_window`, `login_lockout`), read from the config at each login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// Failures of one user from one address within `window` that lock that user out from
    /// that address; 0 = no per-user limit.
    pub max_failures: u32,
    /// Failures from one address across all user names (unknown ones too) within `window`
    /// that lock the whole address out; 0 = no address-wide limit.
    pub max_per_address: u32,
    /// The span failures are counted over, from the first one.
    pub window: Duration,
    /// How long a lockout lasts.
    pub lockout: Duration,
}

impl LimitSettings {
    fn enabled(&self) -> bool {
        (self.max_failures > 0 || self.max_per_address > 0)
            && !self.window.is_zero()
            && !self.lockout.is_zero()
    }
}

/// Entries each of the limiter's two tables (per user and address, per address) holds at
/// most; beyond it stale entries are swept, then the oldest forgotten, so that a flood of
/// addresses or user names costs bounded memory (under 200 bytes an entry).
pub const MAX_TRACKED: usize = 10_000;

/// The bytes of a user name the limiter keys on: PostgreSQL truncates a startup packet's
/// user name to `NAMEDATALEN - 1` bytes too, and this bounds each entry's size.
const USER_KEY_LEN: usize = 63;

/// Counts failed logins by reason and locks out a user from an address, or a whole
/// address, that fails too often. Shared by every client task; each call takes a short
/// lock, never across an `.await`.
#[derive(Debug, Default)]
pub struct LoginGuard {
    counts: [AtomicU64; FailureReason::ALL.len()],
    tables: Mutex<Tables>,
}

/// Failures per (address, user name): what a lockout of one user keys on; and per address:
/// the ceiling against guessing across many user names.
#[derive(Debug, Default)]
struct Tables {
    users: HashMap<(IpAddr, Box<str>), Entry>,
    addresses: HashMap<IpAddr, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Failures in the window that started at `since`.
    failures: u32,
    since: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry {
            failures: 0,
            since: now,
            locked_until: None,
        }
    }

    /// Whether the entry still matters at `now`: a lockout running, or a window open.
    fn live(&self, now: Instant, s: &LimitSettings) -> bool {
        self.locked_until.is_some_and(|t| t > now) || now.duration_since(self.since) < s.window
    }

    /// How long the lockout still lasts at `now`, if one runs.
    fn left(&self, now: Instant) -> Option<Duration> {
        self.locked_until?
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
    }

    /// Counts one failure against `max` (0 = no limit); returns the failures that begin a
    /// lockout now. A failure during a lockout (a login that began before it) counts for
    /// nothing and extends nothing.
    fn count(&mut self, max: u32, s: &LimitSettings, now: Instant) -> Option<u32> {
        if self.locked_until.is_some_and(|t| t > now) {
            return None;
        }
        if now.duration_since(self.since) >= s.window {
            self.failures = 0;
            self.since = now;
        }
        self.failures = self.failures.saturating_add(1);
        if max == 0 || self.failures < max {
            return None;
        }
        let failures = self.failures;
        self.failures = 0;
        self.since = now;
        self.locked_until = Some(now + s.lockout);
        Some(failures)
    }
}

/// What a lockout refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockoutScope {
    /// One user name from one address (`auth.max_login_failures`): other users of the
    /// address still log in.
    User,
    /// Every user from the address (`auth.max_login_failures_per_address`).
    Address,
}

/// A lockout that has just begun (to be logged once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    /// Whom it refuses.
    pub scope: LockoutScope,
    /// The failures that caused it.
    pub failures: u32,
    /// How long it lasts.
    pub lasts: Duration,
}

impl LoginGuard {
    /// Failed logins so far for `reason`.
    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.counts
            .get(reason.index())
            .map_or(0, |n| n.load(Relaxed))
    }

    /// If `user` from `addr` is locked out at `now` (the whole address, or that user from
    /// it), which lockout and how long it still lasts.
    pub fn locked(
        &self,
        addr: IpAddr,
        user: &str,
        s: &LimitSettings,
        now: Instant,
    ) -> Option<(LockoutScope, Duration)> {
        if !s.enabled() {
            return None;
        }
        let addr = key(addr);
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(left) = tables.addresses.get(&addr).and_then(|e| e.left(now)) {
            return Some((LockoutScope::Address, left));
        }
        let left = tables.users.get(&(addr, user_key(user)))?.left(now)?;
        Some((LockoutScope::User, left))
    }

    /// Counts a failed login of `user` from `addr`; if it was a guess, counts it for that
    /// user from that address and for the address as a whole, and returns the lockout it
    /// begins, if any (which the caller logs: one line per lockout, never one per attempt;
    /// when both begin at once, the address-wide one, which covers the other).
    pub fn failed(
        &self,
        addr: IpAddr,
        user: &str,
        reason: FailureReason,
        s: &LimitSettings,
        now: Instant,
    ) -> Option<Lockout> {
        if let Some(n) = self.counts.get(reason.index()) {
            n.fetch_add(1, Relaxed);
        }
        if !s.enabled() || !reason.is_guess() {
            return None;
        }
        let addr = key(addr);
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let address = entry(&mut tables.addresses, addr, now, s).count(s.max_per_address, s, now);
        let user =
            entry(&mut tables.users, (addr, user_key(user)), now, s).count(s.max_failures, s, now);
        let (scope, failures) = match (address, user) {
            (Some(n), _) => (LockoutScope::Address, n),
            (None, Some(n)) => (LockoutScope::User, n),
            (None, None) => return None,
        };
        Some(Lockout {
            scope,
            failures,
            lasts: s.lockout,
        })
    }

    /// Entries remembered now, (per user and address, per address) (for tests).
    pub fn tracked(&self) -> (usize, usize) {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        (tables.users.len(), tables.addresses.len())
    }
}

/// The entry for `k`, made room for and created if new.
fn entry<'t, K: Eq + Hash + Clone>(
    table: &'t mut HashMap<K, Entry>,
    k: K,
    now: Instant,
    s: &LimitSettings,
) -> &'t mut Entry {
    if !table.contains_key(&k) && table.len() >= MAX_TRACKED {
        evict(table, now, s);
    }
    table.entry(k).or_insert_with(|| Entry::new(now))
}

/// Makes room for one entry: drops every entry that no longer matters, and if all still
/// do, the one whose window began first.
fn evict<K: Eq + Hash + Clone>(table: &mut HashMap<K, Entry>, now: Instant, s: &LimitSettings) {
    table.retain(|_, e| e.live(now, s));
    if table.len() < MAX_TRACKED {
        return;
    }
    let oldest = table
        .iter()
        .min_by_key(|(_, e)| e.since)
        .map(|(k, _)| k.clone());
    if let Some(k) = oldest {
        table.remove(&k);
    }
}

/// The address the limiter counts for a client: IPv4 as is, IPv4-mapped IPv6 as IPv4,
/// other IPv6 by its /64 (one host usually holds a whole /64, and could otherwise
/// change address at every attempt).
fn key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The user name as the limiter keys it: its first [`USER_KEY_LEN`] bytes, cut at a
/// character boundary.
fn user_key(user: &str) -> Box<str> {
    let mut end = user.len().min(USER_KEY_LEN);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    user.get(..end).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureReason::{BadPassword, UnknownUser};

    const S: LimitSettings = LimitSettings {
        max_failures: 3,
        max_per_address: 5,
        window: Duration::from_secs(60),
        lockout: Duration::from_secs(30),
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn locks_out_one_user_from_one_address_and_recovers() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        assert_eq!(g.failed(a, "app", BadPassword, &S, t0), None);
        assert_eq!(g.failed(a, "app", BadPassword, &S, t0), None);
        assert_eq!(g.locked(a, "app", &S, t0), None);
        let lockout = g.failed(a, "app", BadPassword, &S, t0 + secs(1));
        let expected = Lockout {
            scope: LockoutScope::User,
            failures: 3,
            lasts: secs(30),
        };
        assert_eq!(lockout, Some(expected));
        let t1 = t0 + secs(11);
        assert_eq!(
            g.locked(a, "app", &S, t1),
            Some((LockoutScope::User, secs(20)))
        );
        // Another user of the same address, and the same user elsewhere, are not refused.
        assert_eq!(g.locked(a, "other", &S, t1), None);
        assert_eq!(g.locked(ip("10.0.0.2"), "app", &S, t1), None);
        // More failures while locked out start no new lockout (and log nothing).
        assert_eq!(g.failed(a, "app", BadPassword, &S, t1), None);
        assert_eq!(g.locked(a, "app", &S, t0 + secs(31)), None);
        assert_eq!(g.failures(BadPassword), 4);
    }

    #[test]
    fn guesses_across_user_names_lock_out_the_whole_address() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        for user in ["a", "b", "c", "d"] {
            assert_eq!(g.failed(a, user, UnknownUser, &S, t0), None);
        }
        let lockout = g.failed(a, "e", BadPassword, &S, t0);
        let expected = Lockout {
            scope: LockoutScope::Address,
            failures: 5,
            lasts: secs(30),
        };
        assert_eq!(lockout, Some(expected));
        let t1 = t0 + secs(1);
        assert_eq!(
            g.locked(a, "app", &S, t1),
            Some((LockoutScope::Address, secs(29)))
        );
        assert_eq!(g.locked(ip("10.0.0.2"), "app", &S, t1), None);
        // Failures during it count for nothing: it ends on time.
        assert_eq!(g.failed(a, "f", UnknownUser, &S, t1), None);
        assert_eq!(g.locked(a, "app", &S, t0 + secs(30)), None);
    }

    #[test]
    fn when_both_limits_are_reached_at_once_the_address_wide_lockout_is_told() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        let s = LimitSettings {
            max_per_address: 3,
            ..S
        };
        g.failed(a, "app", BadPassword, &s, t0);
        g.failed(a, "app", BadPassword, &s, t0);
        let lockout = g.failed(a, "app", BadPassword, &s, t0).unwrap();
        assert_eq!(lockout.scope, LockoutScope::Address);
        assert_eq!(
            g.locked(a, "x", &s, t0),
            Some((LockoutScope::Address, secs(30)))
        );
    }

    #[test]
    fn each_limit_can_be_off() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        let per_user_only = LimitSettings {
            max_per_address: 0,
            ..S
        };
        for user in ["a", "b", "c", "d", "e", "f", "g"] {
            assert_eq!(g.failed(a, user, UnknownUser, &per_user_only, t0), None);
        }
        assert_eq!(g.locked(a, "h", &per_user_only, t0), None);
        let per_address_only = LimitSettings {
            max_failures: 0,
            ..S
        };
        let b = ip("10.0.0.2");
        for _ in 0..4 {
            assert_eq!(g.failed(b, "app", BadPassword, &per_address_only, t0), None);
        }
        let lockout = g.failed(b, "app", BadPassword, &per_address_only, t0);
        assert_eq!(lockout.map(|l| l.scope), Some(LockoutScope::Address));
    }

    #[test]
    fn the_window_forgets_old_failures_and_only_guesses_count() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        g.failed(a, "app", BadPassword, &S, t0);
        g.failed(a, "app", BadPassword, &S, t0);
        let later = t0 + secs(61);
        assert_eq!(g.failed(a, "app", BadPassword, &S, later), None);
        for reason in [
            FailureReason::Timeout,
            FailureReason::Protocol,
            FailureReason::RejectedByRule,
            FailureReason::RateLimited,
        ] {
            assert_eq!(g.failed(a, "app", reason, &S, later), None);
        }
        assert_eq!(g.locked(a, "app", &S, later), None);
        assert_eq!(g.failures(FailureReason::Timeout), 1);
    }

    #[test]
    fn off_when_both_maxima_are_zero() {
        let g = LoginGuard::default();
        let off = LimitSettings {
            max_failures: 0,
            max_per_address: 0,
            ..S
        };
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(g.failed(ip("10.0.0.1"), "app", BadPassword, &off, t0), None);
        }
        assert_eq!(g.tracked(), (0, 0));
        assert_eq!(g.failures(BadPassword), 10);
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        g.failed(ip("2001:db8::1"), "app", BadPassword, &S, t0);
        g.failed(ip("2001:db8::2"), "app", BadPassword, &S, t0);
        g.failed(ip("2001:db8:0:0:ffff::3"), "app", BadPassword, &S, t0);
        assert!(g.locked(ip("2001:db8::99"), "app", &S, t0).is_some());
        assert!(g.locked(ip("2001:db8:0:1::1"), "app", &S, t0).is_none());
        assert_eq!(key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn user_names_are_keyed_by_their_first_63_bytes() {
        let long = "é".repeat(40); // 80 bytes: cut at a character boundary
        assert_eq!(user_key(&long).len(), 62);
        assert_eq!(user_key("app").as_ref(), "app");
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        let name = "x".repeat(100);
        for _ in 0..3 {
            g.failed(a, &name, BadPassword, &S, t0);
        }
        assert!(g.locked(a, &"x".repeat(70), &S, t0).is_some());
    }

    #[test]
    fn the_tables_are_bounded() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let extra = 500;
        for i in 0..(MAX_TRACKED as u32 + extra) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let at = t0 + Duration::from_millis(i.into());
            g.failed(a, &format!("user{i}"), BadPassword, &S, at);
        }
        assert_eq!(g.tracked(), (MAX_TRACKED, MAX_TRACKED));
        // One address spraying user names fills only the per-user table.
        let sprayer = ip("192.168.0.1");
        let s = LimitSettings {
            max_per_address: 0,
            ..S
        };
        for i in 0..extra {
            g.failed(sprayer, &format!("spray{i}"), UnknownUser, &s, t0 + secs(1));
        }
        assert_eq!(g.tracked(), (MAX_TRACKED, MAX_TRACKED));
        // The oldest went first; the newest is remembered.
        let newest = IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000 + MAX_TRACKED as u32 + extra - 1,
        ));
        let user = format!("user{}", MAX_TRACKED as u32 + extra - 1);
        let at = t0 + secs(20);
        g.failed(newest, &user, BadPassword, &S, at);
        g.failed(newest, &user, BadPassword, &S, at);
        assert!(g.locked(newest, &user, &S, at).is_some());
    }
}
