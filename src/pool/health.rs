//! Whether a pool's upstream answers, and when to try again after it did not.
//!
//! Every failed connect counts, whatever its cause: nothing listening, a timeout, or
//! PostgreSQL refusing the login with its own error (53300 at `max_connections`, 57P03
//! while it starts). While down, the pool tries again after 100 ms, doubling up to 5 s
//! (+-25 % jitter); a checkout meanwhile gets the last error at once instead of adding an
//! attempt, so a full or dead server sees about one attempt per period from each pool (a
//! client and the pool's upkeep may both take a due one).

use std::time::{Duration, Instant};

use crate::server::ConnectError;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Upstream health as seen by connect attempts.
#[derive(Default)]
pub(super) enum Health {
    /// The last attempt succeeded (or none was made).
    #[default]
    Up,
    /// Attempts fail; the next one waits until `retry_at`.
    Down {
        failures: u32,
        error: ConnectError,
        retry_at: Instant,
    },
}

impl Health {
    /// Records a failed attempt; backs off exponentially with jitter, up to a cap.
    /// Returns true when this is the first failure (the state changed).
    pub(super) fn failed(&mut self, error: &ConnectError, now: Instant) -> bool {
        let failures = match self {
            Health::Up => 0,
            Health::Down { failures, .. } => *failures,
        };
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << failures.min(10))
            .min(MAX_BACKOFF);
        // +-25 % jitter, so pools do not retry in lockstep.
        let backoff = backoff.mul_f64(0.75 + rand::random::<f64>() * 0.5);
        *self = Health::Down {
            failures: failures + 1,
            error: error.clone(),
            retry_at: now + backoff,
        };
        failures == 0
    }

    /// Records a success; returns true when the upstream was down before.
    pub(super) fn up(&mut self) -> bool {
        let was_down = matches!(self, Health::Down { .. });
        *self = Health::Up;
        was_down
    }

    /// How long until the next attempt is allowed, if one must wait.
    pub(super) fn retry_wait(&self, now: Instant) -> Option<Duration> {
        match self {
            Health::Down { retry_at, .. } if *retry_at > now => Some(*retry_at - now),
            _ => None,
        }
    }

    /// The error of the last failed attempt while down.
    pub(super) fn last_error(&self) -> Option<&ConnectError> {
        match self {
            Health::Down { error, .. } => Some(error),
            Health::Up => None,
        }
    }

    /// Whether the last attempt failed.
    #[allow(dead_code)] // read by the admin views
    pub(super) fn is_down(&self) -> bool {
        matches!(self, Health::Down { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> ConnectError {
        ConnectError::Server {
            code: "53300".into(),
            message: "sorry, too many clients already".into(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let now = Instant::now();
        let mut health = Health::default();
        assert_eq!(health.retry_wait(now), None);
        assert!(
            health.failed(&refused(), now),
            "the first failure changes the state"
        );
        for failures in 1..=12u32 {
            let wait = health.retry_wait(now).expect("waits after a failure");
            let nominal = FIRST_BACKOFF
                .saturating_mul(1 << (failures - 1).min(10))
                .min(MAX_BACKOFF);
            assert!(
                wait >= nominal.mul_f64(0.75) && wait <= nominal.mul_f64(1.25),
                "failure {failures}: waits {wait:?}, nominal {nominal:?}"
            );
            assert!(!health.failed(&refused(), now));
        }
        assert_eq!(
            health.last_error().and_then(ConnectError::server_code),
            Some("53300")
        );
        // Once the wait is over an attempt may go; a success forgets the failures.
        assert_eq!(health.retry_wait(now + MAX_BACKOFF * 2), None);
        assert!(health.up());
        assert!(!health.is_down());
        assert!(health.failed(&refused(), now));
        assert!(health.retry_wait(now).expect("waits") <= FIRST_BACKOFF.mul_f64(1.25));
    }
}
