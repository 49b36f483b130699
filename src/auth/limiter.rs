//! Failed logins: why each failed (a bounded set of reasons, counted for `/metrics`), and
//! the per-address limiter that locks out an address after too many of them.
//!
//! One [`LoginGuard`] lives in the pooler for the life of the process; its settings come
//! from the config in force at each login, so a reload changes them for the next one.

use std::collections::HashMap;
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

/// The limiter's settings (`[auth] max_login_failures`, `login_failure_window`,
/// `login_lockout`), read from the config at each login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// Failures within `window` that lock the address out; 0 = no limiter.
    pub max_failures: u32,
    /// The span failures are counted over, from the first one.
    pub window: Duration,
    /// How long a locked-out address is refused.
    pub lockout: Duration,
}

impl LimitSettings {
    fn enabled(&self) -> bool {
        self.max_failures > 0 && !self.window.is_zero() && !self.lockout.is_zero()
    }
}

/// Addresses the limiter remembers at most; beyond it the stalest is forgotten, so that a
/// flood of addresses costs bounded memory (about 64 bytes each).
pub const MAX_TRACKED: usize = 10_000;

/// Counts failed logins by reason and locks out addresses that fail too often. Shared by
/// every client task; each call takes a short lock, never across an `.await`.
#[derive(Debug, Default)]
pub struct LoginGuard {
    counts: [AtomicU64; FailureReason::ALL.len()],
    table: Mutex<HashMap<IpAddr, Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Failures in the window that started at `since`.
    failures: u32,
    since: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    /// Whether the entry still matters at `now`: a lockout running, or a window open.
    fn live(&self, now: Instant, s: &LimitSettings) -> bool {
        self.locked_until.is_some_and(|t| t > now) || now.duration_since(self.since) < s.window
    }
}

/// A lockout that has just begun (to be logged once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
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

    /// If `addr` is locked out at `now`, how long it still is.
    pub fn locked(&self, addr: IpAddr, s: &LimitSettings, now: Instant) -> Option<Duration> {
        if !s.enabled() {
            return None;
        }
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let until = table.get(&key(addr))?.locked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Counts a failed login of `addr`; if it was a guess and it completes
    /// `max_failures` within the window, locks the address out and returns the lockout
    /// (which the caller logs: one line per lockout, never one per attempt).
    pub fn failed(
        &self,
        addr: IpAddr,
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
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let addr = key(addr);
        if !table.contains_key(&addr) && table.len() >= MAX_TRACKED {
            evict(&mut table, now, s);
        }
        let entry = table.entry(addr).or_insert(Entry {
            failures: 0,
            since: now,
            locked_until: None,
        });
        if entry.locked_until.is_some_and(|t| t > now) {
            return None; // already locked out (a login that began before the lockout)
        }
        if now.duration_since(entry.since) >= s.window {
            entry.failures = 0;
            entry.since = now;
        }
        entry.failures += 1;
        if entry.failures < s.max_failures {
            return None;
        }
        let failures = entry.failures;
        entry.failures = 0;
        entry.since = now;
        entry.locked_until = Some(now + s.lockout);
        Some(Lockout {
            failures,
            lasts: s.lockout,
        })
    }

    /// Addresses remembered now (for tests).
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Makes room for one entry: drops every entry that no longer matters, and if all still
/// do, the one whose window began first.
fn evict(table: &mut HashMap<IpAddr, Entry>, now: Instant, s: &LimitSettings) {
    table.retain(|_, e| e.live(now, s));
    if table.len() < MAX_TRACKED {
        return;
    }
    let oldest = table.iter().min_by_key(|(_, e)| e.since).map(|(a, _)| *a);
    if let Some(addr) = oldest {
        table.remove(&addr);
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

#[cfg(test)]
mod tests {
    use super::*;

    const S: LimitSettings = LimitSettings {
        max_failures: 3,
        window: Duration::from_secs(60),
        lockout: Duration::from_secs(30),
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn locks_out_after_max_failures_in_the_window_and_recovers() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        assert_eq!(g.failed(a, FailureReason::BadPassword, &S, t0), None);
        assert_eq!(g.failed(a, FailureReason::UnknownUser, &S, t0), None);
        assert_eq!(g.locked(a, &S, t0), None);
        let lockout = g.failed(
            a,
            FailureReason::BadPassword,
            &S,
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            lockout,
            Some(Lockout {
                failures: 3,
                lasts: Duration::from_secs(30)
            })
        );
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(g.locked(a, &S, t1), Some(Duration::from_secs(20)));
        // More failures while locked out start no new lockout (and log nothing).
        assert_eq!(g.failed(a, FailureReason::BadPassword, &S, t1), None);
        assert_eq!(g.locked(ip("10.0.0.2"), &S, t1), None);
        assert_eq!(g.locked(a, &S, t0 + Duration::from_secs(31)), None);
        assert_eq!(g.failures(FailureReason::BadPassword), 3);
        assert_eq!(g.failures(FailureReason::UnknownUser), 1);
    }

    #[test]
    fn the_window_forgets_old_failures_and_only_guesses_count() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        g.failed(a, FailureReason::BadPassword, &S, t0);
        g.failed(a, FailureReason::BadPassword, &S, t0);
        let later = t0 + Duration::from_secs(61);
        assert_eq!(g.failed(a, FailureReason::BadPassword, &S, later), None);
        for reason in [
            FailureReason::Timeout,
            FailureReason::Protocol,
            FailureReason::RejectedByRule,
            FailureReason::RateLimited,
        ] {
            assert_eq!(g.failed(a, reason, &S, later), None);
        }
        assert_eq!(g.locked(a, &S, later), None);
        assert_eq!(g.failures(FailureReason::Timeout), 1);
    }

    #[test]
    fn off_when_max_is_zero() {
        let g = LoginGuard::default();
        let off = LimitSettings {
            max_failures: 0,
            ..S
        };
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                g.failed(ip("10.0.0.1"), FailureReason::BadPassword, &off, t0),
                None
            );
        }
        assert_eq!(g.tracked(), 0);
        assert_eq!(g.failures(FailureReason::BadPassword), 10);
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        g.failed(ip("2001:db8::1"), FailureReason::BadPassword, &S, t0);
        g.failed(ip("2001:db8::2"), FailureReason::BadPassword, &S, t0);
        g.failed(
            ip("2001:db8:0:0:ffff::3"),
            FailureReason::BadPassword,
            &S,
            t0,
        );
        assert!(g.locked(ip("2001:db8::99"), &S, t0).is_some());
        assert!(g.locked(ip("2001:db8:0:1::1"), &S, t0).is_none());
        assert_eq!(key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn the_table_is_bounded() {
        let g = LoginGuard::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            g.failed(
                a,
                FailureReason::BadPassword,
                &S,
                t0 + Duration::from_millis(i.into()),
            );
        }
        assert_eq!(g.tracked(), MAX_TRACKED);
        // The oldest went first; the newest is remembered.
        let newest = IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000 + MAX_TRACKED as u32 + 499,
        ));
        g.failed(
            newest,
            FailureReason::BadPassword,
            &S,
            t0 + Duration::from_secs(20),
        );
        g.failed(
            newest,
            FailureReason::BadPassword,
            &S,
            t0 + Duration::from_secs(20),
        );
        assert!(g.locked(newest, &S, t0 + Duration::from_secs(20)).is_some());
    }
}
