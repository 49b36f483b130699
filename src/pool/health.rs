//! Whether a pool's upstream answers, and when to try again after it did not.

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
