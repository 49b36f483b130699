//! A sliding window of the pool's demand, one slot per second over the last five minutes:
//! how many servers clients wanted at once (held + waiting), arrivals, hold times and
//! wait timeouts. It lives in the pool's state and is updated under the pool's lock, on
//! paths that take it anyway; the upkeep tick touches it twice a second so that quiet
//! seconds are recorded too. `/pools` reads it for utilization history and sizing advice.

use std::time::{Duration, Instant};

/// Seconds the window covers.
pub const WINDOW_SECONDS: usize = 300;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Which second this slot holds (seconds since the window's epoch, plus one; 0 = empty).
    second: u64,
    /// Most servers wanted at once: held by clients plus clients waiting.
    peak_demand: u32,
    /// Servers lent to clients.
    checkouts: u32,
    /// Servers given back, and how long they had been held in total.
    returns: u32,
    hold_nanos: u64,
    /// Clients that gave up waiting (53300).
    timeouts: u32,
}

/// The last [`WINDOW_SECONDS`] seconds of demand.
pub(super) struct Window {
    epoch: Instant,
    slots: Vec<Slot>,
    /// The second last looked up (its number, start and end): a lookup within it compares
    /// instants instead of subtracting them (two per transaction).
    current: Option<(u64, Instant, Instant)>,
}

/// What the window says about the pool's recent demand.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DemandSummary {
    /// Seconds with data (up to [`WINDOW_SECONDS`]).
    pub seconds: u64,
    /// Most servers wanted at once (held + waiting) in any second of the window.
    pub peak: u32,
    /// The 95th percentile of the per-second peaks.
    pub p95: u32,
    /// Servers lent per second, on average.
    pub arrival_rate: f64,
    /// Mean time a server was held.
    pub mean_hold: Duration,
    /// Wait timeouts in the last 60 seconds.
    pub timeouts_last_minute: u64,
}

impl DemandSummary {
    /// Little's law: mean servers busy = arrival rate x mean hold time.
    pub fn littles_law(&self) -> f64 {
        self.arrival_rate * self.mean_hold.as_secs_f64()
    }
}

impl Window {
    pub(super) fn new() -> Window {
        Window {
            epoch: Instant::now(),
            slots: vec![Slot::default(); WINDOW_SECONDS],
            current: None,
        }
    }

    /// The slot of the second `now` falls in, emptied if it held an older second. A fresh
    /// slot starts at the demand of the moment, so that a second in which nothing changed
    /// still shows the servers held through it.
    fn slot(&mut self, now: Instant, demand: u32) -> &mut Slot {
        let second = match self.current {
            Some((second, starts, ends)) if starts <= now && now < ends => second,
            _ => {
                let since = now.saturating_duration_since(self.epoch).as_secs();
                let starts = self.epoch + Duration::from_secs(since);
                self.current = Some((since + 1, starts, starts + Duration::from_secs(1)));
                since + 1
            }
        };
        let at = (second % WINDOW_SECONDS as u64) as usize;
        #[allow(clippy::indexing_slicing)] // `at` < WINDOW_SECONDS, the array's length
        let slot = &mut self.slots[at];
        if slot.second != second {
            *slot = Slot {
                second,
                peak_demand: demand,
                ..Slot::default()
            };
        }
        slot.peak_demand = slot.peak_demand.max(demand);
        slot
    }

    /// Records the current demand (servers held + clients waiting).
    pub(super) fn demand(&mut self, now: Instant, demand: u32) {
        self.slot(now, demand);
    }

    /// A server was lent; `demand` is the demand after it.
    pub(super) fn checkout(&mut self, now: Instant, demand: u32) {
        self.slot(now, demand).checkouts += 1;
    }

    /// A server held for `held` came back.
    pub(super) fn returned(&mut self, now: Instant, demand: u32, held: Duration) {
        let slot = self.slot(now, demand);
        slot.returns += 1;
        slot.hold_nanos = slot
            .hold_nanos
            .saturating_add(u64::try_from(held.as_nanos()).unwrap_or(u64::MAX));
    }

    /// A client gave up waiting.
    pub(super) fn timeout(&mut self, now: Instant, demand: u32) {
        self.slot(now, demand).timeouts += 1;
    }

    /// Most servers wanted at once over the last `seconds` seconds (this one included).
    pub(super) fn recent_peak(&self, now: Instant, seconds: u64) -> u32 {
        let current = now.saturating_duration_since(self.epoch).as_secs() + 1;
        let oldest = current.saturating_sub(seconds.saturating_sub(1));
        self.slots
            .iter()
            .filter(|s| s.second != 0 && s.second >= oldest && s.second <= current)
            .map(|s| s.peak_demand)
            .max()
            .unwrap_or(0)
    }

    /// The window as of `now`, with the servers `held` now (how long each has been held):
    /// a transaction still open counts in the mean hold time for as long as it has run, so
    /// that one held open for seconds is not hidden until it ends.
    pub(super) fn summary(
        &self,
        now: Instant,
        held: impl Iterator<Item = Duration>,
    ) -> DemandSummary {
        let current = now.saturating_duration_since(self.epoch).as_secs() + 1;
        let oldest = current.saturating_sub(WINDOW_SECONDS as u64 - 1);
        let live: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.second != 0 && s.second >= oldest && s.second <= current)
            .collect();
        if live.is_empty() {
            return DemandSummary::default();
        }
        let mut peaks: Vec<u32> = live.iter().map(|s| s.peak_demand).collect();
        peaks.sort_unstable();
        // Nearest rank: the smallest value with at least 95 % of the seconds at or below it.
        let rank = (peaks.len() * 95).div_ceil(100).max(1);
        let checkouts: u64 = live.iter().map(|s| u64::from(s.checkouts)).sum();
        let mut returns: u64 = live.iter().map(|s| u64::from(s.returns)).sum();
        let mut hold: u64 = live.iter().map(|s| s.hold_nanos).sum();
        for d in held {
            returns += 1;
            hold = hold.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        }
        let minute = current.saturating_sub(59);
        let seconds = (current - live.iter().map(|s| s.second).min().unwrap_or(current)) + 1;
        DemandSummary {
            seconds,
            peak: peaks.last().copied().unwrap_or(0),
            p95: peaks.get(rank - 1).copied().unwrap_or(0),
            arrival_rate: checkouts as f64 / seconds as f64,
            mean_hold: Duration::from_nanos(hold.checked_div(returns).unwrap_or(0)),
            timeouts_last_minute: live
                .iter()
                .filter(|s| s.second >= minute)
                .map(|s| u64::from(s.timeouts))
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_rates_and_old_seconds_fall_out() {
        let mut w = Window::new();
        let t0 = w.epoch;
        for s in 0..100u64 {
            let now = t0 + Duration::from_secs(s);
            // 1 server busy every second, 10 wanted in five of them.
            w.demand(now, 1);
            if s % 20 == 0 {
                w.demand(now, 10);
            }
            w.checkout(now, 1);
            w.returned(now, 1, Duration::from_millis(200));
        }
        assert_eq!(w.recent_peak(t0 + Duration::from_secs(99), 20), 10); // second 80
        assert_eq!(w.recent_peak(t0 + Duration::from_secs(99), 19), 1);
        w.timeout(t0 + Duration::from_secs(99), 10);
        let s = w.summary(t0 + Duration::from_secs(99), std::iter::empty());
        assert_eq!(s.seconds, 100);
        assert_eq!((s.peak, s.p95), (10, 10));
        assert!((s.arrival_rate - 1.0).abs() < 1e-9);
        assert_eq!(s.mean_hold, Duration::from_millis(200));
        assert!((s.littles_law() - 0.2).abs() < 1e-9);
        assert_eq!(s.timeouts_last_minute, 1);

        // Ten minutes later with one quiet sample: the old seconds are gone.
        let later = t0 + Duration::from_secs(700);
        w.demand(later, 2);
        let s = w.summary(later, std::iter::empty());
        assert_eq!(
            (s.seconds, s.peak, s.p95, s.timeouts_last_minute),
            (1, 2, 2, 0)
        );
    }

    #[test]
    fn a_transaction_still_open_counts_in_the_mean_hold() {
        let mut w = Window::new();
        let t0 = w.epoch;
        // 1000 transactions of 1 us, and one held open for 2 s so far.
        for _ in 0..1000 {
            w.checkout(t0, 1);
            w.returned(t0, 1, Duration::from_micros(1));
        }
        w.checkout(t0, 1);
        let now = t0 + Duration::from_secs(2);
        let finished_only = w.summary(now, std::iter::empty());
        assert_eq!(finished_only.mean_hold, Duration::from_micros(1));
        let s = w.summary(now, std::iter::once(Duration::from_secs(2)));
        // (1000 x 1 us + 2 s) / 1001
        assert_eq!(s.mean_hold, Duration::from_nanos(2_001_000_000 / 1001));
        assert!(s.mean_hold > Duration::from_millis(1));
    }

    #[test]
    fn p95_ignores_rare_spikes() {
        let mut w = Window::new();
        let t0 = w.epoch;
        for s in 0..200u64 {
            w.demand(t0 + Duration::from_secs(s), if s < 4 { 50 } else { 3 });
        }
        let s = w.summary(t0 + Duration::from_secs(199), std::iter::empty());
        assert_eq!((s.peak, s.p95), (50, 3));
    }
}
