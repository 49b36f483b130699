//! SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS: PgBouncer's per-database totals
//! since start and averages over its `stats_period` (60 s), from the pools' counters.
//!
//! PgBouncer keeps, per pool, the totals at the last two ticks of `stats_period`; an
//! average is the change from the older of the two to now, divided by the time since
//! that tick (per second for counts and bytes, per transaction, query or assignment for
//! times). pgmux does the same per database: [`tick_stats_period`] takes the totals every
//! 60 s into [`StatsPeriod`].

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::rows::{Rows, Type, int, text};
use crate::pooler::Pooler;

/// PgBouncer's default `stats_period`.
pub const STATS_PERIOD: Duration = Duration::from_secs(60);

/// One database's counters, PgBouncer's names; times in microseconds.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct Totals {
    pub server_assignment_count: u64,
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub client_parse_count: u64,
    pub server_parse_count: u64,
    pub bind_count: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.server_assignment_count += o.server_assignment_count;
        self.xact_count += o.xact_count;
        self.query_count += o.query_count;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_time += o.xact_time;
        self.query_time += o.query_time;
        self.wait_time += o.wait_time;
        self.client_parse_count += o.client_parse_count;
        self.server_parse_count += o.server_parse_count;
        self.bind_count += o.bind_count;
    }

    /// The eleven values in PgBouncer's column order.
    fn values(&self) -> [u64; 11] {
        [
            self.server_assignment_count,
            self.xact_count,
            self.query_count,
            self.received,
            self.sent,
            self.xact_time,
            self.query_time,
            self.wait_time,
            self.client_parse_count,
            self.server_parse_count,
            self.bind_count,
        ]
    }

    /// The averages from `old` (taken `elapsed` ago) to `self`, as PgBouncer computes
    /// them: counts and bytes per second, times per transaction, query and assignment.
    fn average_since(&self, old: &Totals, elapsed: Duration) -> Totals {
        let us = micros_at_least_one(elapsed);
        let per_second =
            |now: u64, then: u64| now.saturating_sub(then).saturating_mul(1_000_000) / us;
        let per = |time_now: u64, time_then: u64, n: u64| {
            time_now
                .saturating_sub(time_then)
                .checked_div(n)
                .unwrap_or(0)
        };
        let xacts = self.xact_count.saturating_sub(old.xact_count);
        let queries = self.query_count.saturating_sub(old.query_count);
        let assignments = self
            .server_assignment_count
            .saturating_sub(old.server_assignment_count);
        Totals {
            server_assignment_count: per_second(
                self.server_assignment_count,
                old.server_assignment_count,
            ),
            xact_count: per_second(self.xact_count, old.xact_count),
            query_count: per_second(self.query_count, old.query_count),
            received: per_second(self.received, old.received),
            sent: per_second(self.sent, old.sent),
            xact_time: per(self.xact_time, old.xact_time, xacts),
            query_time: per(self.query_time, old.query_time, queries),
            wait_time: per(self.wait_time, old.wait_time, assignments),
            client_parse_count: per_second(self.client_parse_count, old.client_parse_count),
            server_parse_count: per_second(self.server_parse_count, old.server_parse_count),
            bind_count: per_second(self.bind_count, old.bind_count),
        }
    }
}

fn micros_at_least_one(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// The totals at the last two ticks of the stats period. Owned by the pooler
/// (`pooler.stats_period`); the tick task writes it, the console reads it.
pub struct StatsPeriod {
    ticks: Mutex<Ticks>,
}

struct Ticks {
    /// The tick before the last: averages are taken from here.
    older: (Instant, BTreeMap<String, Totals>),
    /// The last tick.
    newer: (Instant, BTreeMap<String, Totals>),
}

impl Default for StatsPeriod {
    fn default() -> Self {
        // Before the first tick, averages run from start, from zero.
        let start = Instant::now();
        StatsPeriod {
            ticks: Mutex::new(Ticks {
                older: (start, BTreeMap::new()),
                newer: (start, BTreeMap::new()),
            }),
        }
    }
}

impl StatsPeriod {
    /// A tick: `now` becomes the newer totals, the newer ones the older.
    fn tick(&self, now: BTreeMap<String, Totals>) {
        let mut t = self.ticks.lock();
        t.older = std::mem::replace(&mut t.newer, (Instant::now(), now));
    }

    /// The older tick's totals of `database`, and how long ago that tick was.
    fn older(&self, database: Option<&str>) -> (Totals, Duration) {
        let t = self.ticks.lock();
        let totals = match database {
            Some(db) => t.older.1.get(db).copied().unwrap_or_default(),
            None => t.older.1.values().fold(Totals::default(), |mut sum, x| {
                sum.add(x);
                sum
            }),
        };
        (totals, t.older.0.elapsed())
    }
}

/// Starts the task that ticks `pooler.stats_period` every [`STATS_PERIOD`], on the
/// runtime that serves clients; it ends with the pooler (or its stop).
pub fn tick_stats_period(pooler: &Arc<Pooler>) {
    let weak: Weak<Pooler> = Arc::downgrade(pooler);
    let stop = pooler.stop.clone();
    pooler.runtime().spawn(async move {
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + STATS_PERIOD, STATS_PERIOD);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let Some(pooler) = weak.upgrade() else {
                return;
            };
            pooler.stats_period.tick(by_database(&pooler));
        }
    });
}

/// Every database's totals now, summed over its pools.
pub fn by_database(pooler: &Pooler) -> BTreeMap<String, Totals> {
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    for pool in pooler.pools() {
        let s = &pool.stats;
        let t = Totals {
            server_assignment_count: s.checkouts.load(Relaxed),
            xact_count: s.transactions.load(Relaxed),
            query_count: s.queries.load(Relaxed),
            received: s.bytes_received.load(Relaxed),
            sent: s.bytes_sent.load(Relaxed),
            // Time servers were lent to clients: in transaction mode, the transactions.
            xact_time: seconds_to_micros(s.hold.snapshot().sum_seconds),
            // Not measured by pgmux: PgBouncer's neutral value.
            query_time: 0,
            wait_time: seconds_to_micros(s.wait.snapshot().sum_seconds),
            client_parse_count: 0,
            server_parse_count: s.prepared_misses.load(Relaxed),
            bind_count: 0,
        };
        out.entry(pool.key.database.clone()).or_default().add(&t);
    }
    out
}

fn seconds_to_micros(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        (s * 1e6) as u64
    } else {
        0
    }
}

const TOTAL_NAMES: [&str; 11] = [
    "total_server_assignment_count",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_client_parse_count",
    "total_server_parse_count",
    "total_bind_count",
];

const AVG_NAMES: [&str; 11] = [
    "avg_server_assignment_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
];

/// SHOW STATS_TOTALS names its columns without `total_` (PgBouncer's src/stats.c).
const PLAIN_NAMES: [&str; 11] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
];

/// SHOW STATS_AVERAGES: the plain names but for the last three (PgBouncer's src/stats.c).
const AVERAGES_NAMES: [&str; 11] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
];

/// Which of the stats commands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    /// SHOW STATS: totals, then averages.
    Stats,
    /// SHOW STATS_TOTALS.
    Totals,
    /// SHOW STATS_AVERAGES.
    Averages,
}

/// SHOW STATS, STATS_TOTALS or STATS_AVERAGES: one row per database with pools.
pub fn per_database(pooler: &Pooler, which: Which) -> Rows {
    let mut columns = vec![("database", Type::Text)];
    let names: Vec<&'static str> = match which {
        Which::Stats => TOTAL_NAMES
            .iter()
            .chain(AVG_NAMES.iter())
            .copied()
            .collect(),
        Which::Totals => PLAIN_NAMES.to_vec(),
        Which::Averages => AVERAGES_NAMES.to_vec(),
    };
    columns.extend(names.into_iter().map(|n| (n, Type::Numeric)));
    let mut rows = Rows::new(&columns);
    for (db, now) in by_database(pooler) {
        let (old, elapsed) = pooler.stats_period.older(Some(&db));
        let avg = now.average_since(&old, elapsed);
        let values: Vec<u64> = match which {
            Which::Stats => now.values().into_iter().chain(avg.values()).collect(),
            Which::Totals => now.values().to_vec(),
            Which::Averages => avg.values().to_vec(),
        };
        let mut row = vec![text(db)];
        row.extend(values.into_iter().map(int));
        rows.rows.push(row);
    }
    rows
}

/// SHOW TOTALS: SHOW STATS over every database, one `name`, `value` row each.
pub fn totals(pooler: &Pooler) -> Rows {
    let now = by_database(pooler)
        .values()
        .fold(Totals::default(), |mut sum, x| {
            sum.add(x);
            sum
        });
    let (old, elapsed) = pooler.stats_period.older(None);
    let avg = now.average_since(&old, elapsed);
    let mut rows = Rows::new(&[("name", Type::Text), ("value", Type::Numeric)]);
    let all = TOTAL_NAMES
        .iter()
        .zip(now.values())
        .chain(AVG_NAMES.iter().zip(avg.values()));
    for (name, value) in all {
        rows.rows.push(vec![text(*name), int(value)]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_pgbouncers() {
        let old = Totals {
            xact_count: 10,
            xact_time: 1_000,
            query_count: 20,
            received: 1_000,
            ..Totals::default()
        };
        let now = Totals {
            xact_count: 70,
            xact_time: 61_000,
            query_count: 20,
            received: 7_000,
            ..Totals::default()
        };
        let avg = now.average_since(&old, Duration::from_secs(60));
        assert_eq!(avg.xact_count, 1); // per second
        assert_eq!(avg.xact_time, 1_000); // microseconds per transaction
        assert_eq!(avg.received, 100); // bytes per second
        assert_eq!(avg.query_count, 0);
        assert_eq!(avg.query_time, 0); // no query in the period: no division by zero
        // A counter that went down (its pool was removed) gives 0, not a wrap.
        assert_eq!(old.average_since(&now, Duration::from_secs(1)).received, 0);
    }
}
