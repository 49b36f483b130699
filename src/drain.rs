//! The way out of pgmux, step by step. The first SIGTERM/SIGINT begins the drain: `/ready`
//! answers 503 while pgmux goes on serving and accepting for `server.drain_delay` (time
//! for a load balancer to stop sending it clients); then it stops: the listeners close and
//! sessions end between transactions with 57P01 (`pooler.stop`); after
//! `shutdown_timeout` the rest are ended too (`pooler.kill`). Each further signal takes
//! the next step at once. The listener (`listener.rs`) times the steps.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::pooler::Pooler;

/// The drain before a stop: begun once, never undone. Owned by the pooler, read by the
/// listener, the readiness probe and the metrics.
#[derive(Default)]
pub struct Drain {
    /// Cancelled when the drain begins.
    begun: CancellationToken,
    /// When accepting stops: the drain's start plus the `drain_delay` in force then.
    until: OnceLock<Instant>,
}

/// "Never", for a `drain_delay` too long to add to a clock reading (tokio's choice too).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

impl Drain {
    /// Whether the drain has begun (pgmux is on its way out).
    pub fn is_begun(&self) -> bool {
        self.begun.is_cancelled()
    }

    /// The token cancelled when the drain begins (cancel-safe to wait on).
    pub fn token(&self) -> &CancellationToken {
        &self.begun
    }

    /// When accepting stops: the drain's start plus its `drain_delay`. `None` before the
    /// drain.
    pub fn deadline(&self) -> Option<Instant> {
        self.until.get().copied()
    }

    /// Begins the drain with `delay`; false if it had begun already.
    fn begin(&self, delay: Duration) -> bool {
        let now = Instant::now();
        let until = now
            .checked_add(delay)
            .or_else(|| now.checked_add(FAR_FUTURE))
            .unwrap_or(now);
        if self.until.set(until).is_err() {
            return false;
        }
        self.begun.cancel();
        true
    }
}

/// What a stop signal did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The drain began; accepting stops after this `drain_delay` (at once when zero).
    Drain(Duration),
    /// Accepting stopped; sessions end between transactions.
    Stop,
    /// Every session ends now.
    Kill,
}

impl Pooler {
    /// Takes the next step out for a SIGTERM/SIGINT: the drain (with the `drain_delay` in
    /// force), else the stop, else the kill. Returns the step taken.
    pub fn step_out(&self) -> Step {
        let delay = self.snapshot().config.server.drain_delay;
        if self.drain.begin(delay) {
            if delay.is_zero() {
                // Nothing to wait for: no window in which a second signal would still find
                // the listeners open.
                self.stop.cancel();
            }
            return Step::Drain(delay);
        }
        if !self.stop.is_cancelled() {
            self.stop.cancel();
            return Step::Stop;
        }
        self.kill.cancel();
        Step::Kill
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pooler(drain_delay: Duration) -> std::sync::Arc<Pooler> {
        let mut config = Config::default();
        config.server.drain_delay = drain_delay;
        Pooler::new(config).expect("a pooler for the default config")
    }

    #[tokio::test]
    async fn each_signal_takes_the_next_step() {
        let p = pooler(Duration::from_secs(10));
        assert!(!p.drain.is_begun() && p.drain.deadline().is_none());
        assert_eq!(p.step_out(), Step::Drain(Duration::from_secs(10)));
        assert!(p.drain.is_begun() && !p.stop.is_cancelled());
        assert!(p.drain.deadline().is_some());
        assert_eq!(p.step_out(), Step::Stop);
        assert!(p.stop.is_cancelled() && !p.kill.is_cancelled());
        assert_eq!(p.step_out(), Step::Kill);
        assert!(p.kill.is_cancelled());
        assert_eq!(p.step_out(), Step::Kill);
    }

    #[tokio::test]
    async fn a_drain_delay_beyond_the_clock_means_until_the_next_signal() {
        let p = pooler(Duration::MAX);
        assert_eq!(p.step_out(), Step::Drain(Duration::MAX));
        let deadline = p.drain.deadline().expect("begun");
        assert!(deadline > Instant::now() + Duration::from_secs(86_400 * 365));
        assert_eq!(p.step_out(), Step::Stop);
    }

    #[tokio::test]
    async fn without_drain_delay_the_first_signal_stops_and_the_second_kills() {
        let p = pooler(Duration::ZERO);
        assert_eq!(p.step_out(), Step::Drain(Duration::ZERO));
        assert!(p.drain.is_begun() && p.stop.is_cancelled() && !p.kill.is_cancelled());
        assert_eq!(p.step_out(), Step::Kill);
    }
}
