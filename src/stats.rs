//! Per-pool counters and histograms: plain atomics bumped on the hot path (client sessions,
//! checkout, checkin), read by the admin port at scrape time. Nothing here locks, and
//! nothing allocates after the pool is created.
//!
//! Every counter only grows, from the pool's creation; Prometheus computes rates. A pool
//! removed by a reload takes its counters with it (they vanish from `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::clients::WaitCause;

/// The counters of one pool. Owned by the [`Pool`](crate::pool::Pool) (`pool.stats`); the
/// session and the pool bump them, the admin port reads them.
#[derive(Default)]
pub struct PoolStats {
    /// Query and Sync messages forwarded to a server.
    pub queries: AtomicU64,
    /// Server connections given back by a client in transaction or statement mode: one per
    /// transaction (or statement) that used a server.
    pub transactions: AtomicU64,
    /// Server connections lent to clients.
    pub checkouts: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// Clients that waited `wait_timeout` and got 53300.
    pub wait_timeouts: AtomicU64,
    /// Attempts to open a server connection.
    pub connect_attempts: AtomicU64,
    /// Attempts that failed.
    pub connect_failures: AtomicU64,
    /// Server connections closed, by reason.
    pub closed: [AtomicU64; CloseReason::ALL.len()],
    /// Named prepared statements found already prepared on the server.
    pub prepared_hits: AtomicU64,
    /// Named prepared statements that had to be prepared on the server.
    pub prepared_misses: AtomicU64,
    /// Named prepared statements closed on a server to stay under the limit.
    pub prepared_evictions: AtomicU64,
    /// ErrorResponses from servers, by SQLSTATE class.
    pub server_errors: ErrorClasses,
    /// Session state found on a server at the end of a transaction, by kind and what
    /// pgmux did about it.
    pub session_state: [[AtomicU64; StateAction::ALL.len()]; StateKind::ALL.len()],
    /// How long clients waited for a server connection (checkout start to a server, or
    /// to the 53300 timeout), every checkout.
    pub wait: Histogram,
    /// The same for checkouts that waited, by the cause when the wait ended (index
    /// `WaitCause as usize - 1`). A checkout served at once is only in `wait`.
    pub wait_by_cause: [Histogram; WaitCause::ALL.len()],
    /// How long clients held a server connection (lent to given back), every mode.
    pub hold: Histogram,
    /// Transactions in transaction and statement mode, as the client sees them: from the
    /// first message that needed a server (its wait included) to the server's return.
    pub transaction: Histogram,
}

impl PoolStats {
    /// A checkout that took `waited`, having waited for `cause` (`None`: it did not wait).
    pub fn waited(&self, cause: Option<WaitCause>, waited: Duration) {
        self.wait.observe(waited);
        if let Some(c) = cause
            && let Some(h) = self.wait_by_cause.get(c as usize - 1)
        {
            h.observe(waited);
        }
    }

    /// One Query or Sync forwarded to a server.
    pub fn query(&self) {
        self.queries.fetch_add(1, Relaxed);
    }

    /// `n` bytes read from a client.
    pub fn bytes_from_client(&self, n: usize) {
        self.bytes_received.fetch_add(n as u64, Relaxed);
    }

    /// `n` bytes written to a client.
    pub fn bytes_to_client(&self, n: usize) {
        self.bytes_sent.fetch_add(n as u64, Relaxed);
    }

    /// An ErrorResponse from a server; `sqlstate` is its code (only the class, the first
    /// two characters, is kept).
    pub fn server_error(&self, sqlstate: &[u8]) {
        self.server_errors.count(sqlstate);
    }

    /// A named prepared statement that was already prepared on the server.
    pub fn prepared_hit(&self) {
        self.prepared_hits.fetch_add(1, Relaxed);
    }

    /// A named prepared statement that had to be prepared on the server.
    pub fn prepared_miss(&self) {
        self.prepared_misses.fetch_add(1, Relaxed);
    }

    /// A prepared statement closed on a server to make room.
    pub fn prepared_eviction(&self) {
        self.prepared_evictions.fetch_add(1, Relaxed);
    }

    /// Session state of `kind` found, and `action` taken.
    pub fn session_state(&self, kind: StateKind, action: StateAction) {
        let row = self.session_state.get(kind as usize);
        if let Some(n) = row.and_then(|row| row.get(action as usize)) {
            n.fetch_add(1, Relaxed);
        }
    }

    /// A server connection closed for `reason`.
    pub fn closed(&self, reason: CloseReason) {
        if let Some(n) = self.closed.get(reason as usize) {
            n.fetch_add(1, Relaxed);
        }
    }
}

/// Why pgmux closed a server connection. Bounded: a metric label and a log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Idle longer than `idle_timeout`.
    IdleTimeout,
    /// Older than `max_lifetime`.
    MaxLifetime,
    /// The server closed it, or sent something unasked while idle (a shutdown FATAL).
    ServerGone,
    /// Given back in an unknown or unfinished state (client left mid-query, broken).
    Dirty,
    /// Replaced after `reconnect` (admin) or an upstream change on reload.
    Reconnect,
    /// The pool is paused (admin `pause`).
    Pause,
    /// The pool shrank on reload.
    Resize,
    /// pgmux is stopping, or the pool was removed.
    Shutdown,
    /// Closed while idle to give its place to a waiter of another pool under the same
    /// `max_db_connections` / `max_user_connections` (or a lowered limit).
    Limit,
}

impl CloseReason {
    /// Every reason, in discriminant order.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::IdleTimeout,
        CloseReason::MaxLifetime,
        CloseReason::ServerGone,
        CloseReason::Dirty,
        CloseReason::Reconnect,
        CloseReason::Pause,
        CloseReason::Resize,
        CloseReason::Shutdown,
        CloseReason::Limit,
    ];

    /// The label value and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::ServerGone => "server_gone",
            CloseReason::Dirty => "dirty",
            CloseReason::Reconnect => "reconnect",
            CloseReason::Pause => "pause",
            CloseReason::Resize => "resize",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Limit => "limit",
        }
    }
}

/// Kinds of session state a client can leave on a server (transaction and statement mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// A temporary table, view, sequence or function (`pg_my_temp_schema()`).
    TempTable,
    /// A session-level advisory lock (`pg_locks`).
    AdvisoryLock,
    /// A cursor declared `WITH HOLD` (`pg_cursors`).
    Cursor,
    /// `LISTEN` on a channel (`pg_listening_channels()`).
    Listen,
    /// A SQL-level `PREPARE` (`pg_prepared_statements`).
    PreparedStatement,
    /// A setting changed inside a transaction or with `set_config` (it follows the client).
    Setting,
}

impl StateKind {
    /// Every kind, in discriminant order.
    pub const ALL: [StateKind; 6] = [
        StateKind::TempTable,
        StateKind::AdvisoryLock,
        StateKind::Cursor,
        StateKind::Listen,
        StateKind::PreparedStatement,
        StateKind::Setting,
    ];

    /// The label value, and the name shown in views and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::TempTable => "temp_table",
            StateKind::AdvisoryLock => "advisory_lock",
            StateKind::Cursor => "cursor",
            StateKind::Listen => "listen",
            StateKind::PreparedStatement => "prepared_statement",
            StateKind::Setting => "setting",
        }
    }

    /// Words for people: "a temporary table".
    pub fn describe(self) -> &'static str {
        match self {
            StateKind::TempTable => "a temporary table",
            StateKind::AdvisoryLock => "a session advisory lock",
            StateKind::Cursor => "a cursor WITH HOLD",
            StateKind::Listen => "LISTEN",
            StateKind::PreparedStatement => "a SQL-level prepared statement",
            StateKind::Setting => "a setting",
        }
    }
}

/// What pgmux did about session state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateAction {
    /// The client keeps its server (`session_state = "pin"`).
    Pin,
    /// The state was discarded and the client told (`session_state = "reset"`).
    Reset,
    /// `max_pinned` servers were pinned already: the state was discarded and the statement
    /// got an error.
    Refuse,
    /// A setting now follows the client from server to server.
    Follow,
}

impl StateAction {
    /// Every action, in discriminant order.
    pub const ALL: [StateAction; 4] = [
        StateAction::Pin,
        StateAction::Reset,
        StateAction::Refuse,
        StateAction::Follow,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StateAction::Pin => "pin",
            StateAction::Reset => "reset",
            StateAction::Refuse => "refuse",
            StateAction::Follow => "follow",
        }
    }
}

/// The SQLSTATE classes PostgreSQL defines (Appendix A of its manual); anything else
/// counts as `other`, so the label stays bounded whatever a server sends.
pub const SQLSTATE_CLASSES: [&str; 43] = [
    "00", "01", "02", "03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "22", "23",
    "24", "25", "26", "27", "28", "2B", "2D", "2F", "34", "38", "39", "3B", "3D", "3F", "40", "42",
    "44", "53", "54", "55", "57", "58", "72", "F0", "HV", "P0", "XX",
];

/// Error counts by SQLSTATE class: one slot per entry of [`SQLSTATE_CLASSES`], then `other`.
pub struct ErrorClasses([AtomicU64; SQLSTATE_CLASSES.len() + 1]);

impl Default for ErrorClasses {
    fn default() -> Self {
        ErrorClasses(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl ErrorClasses {
    fn count(&self, sqlstate: &[u8]) {
        let class = sqlstate.get(..2).unwrap_or_default();
        let slot = SQLSTATE_CLASSES
            .iter()
            .position(|c| c.as_bytes().eq_ignore_ascii_case(class))
            .unwrap_or(SQLSTATE_CLASSES.len());
        if let Some(n) = self.0.get(slot) {
            n.fetch_add(1, Relaxed);
        }
    }

    /// (class, count) for every class seen at least once; `other` last.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        SQLSTATE_CLASSES
            .iter()
            .copied()
            .chain(std::iter::once("other"))
            .zip(self.0.iter())
            .map(|(class, n)| (class, n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
    }
}

/// Upper bounds of the histogram buckets, in seconds: 0.5 ms to 5 min.
pub const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

// Evaluated at compile time: an index out of bounds would fail the build, not pgmux.
#[allow(clippy::indexing_slicing)]
const fn bucket_nanos() -> [u64; BUCKETS.len()] {
    let mut out = [0; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        out[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
}

const BUCKET_NANOS: [u64; BUCKETS.len()] = bucket_nanos();

/// A latency histogram with the fixed [`BUCKETS`]: one atomic per bucket (not cumulative;
/// cumulated when read) and the sum in nanoseconds.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

/// What a [`Histogram`] held when it was read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations at or below each of [`BUCKETS`] (cumulative, as Prometheus wants).
    pub cumulative: [u64; BUCKETS.len()],
    /// Every observation.
    pub count: u64,
    /// Their sum in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // First bucket whose bound is >= the value (buckets are "less or equal").
        let slot = BUCKET_NANOS.partition_point(|&bound| bound < nanos);
        if let Some(n) = self.counts.get(slot) {
            n.fetch_add(1, Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// The counts so far. Not one atomic snapshot: an observation racing with the read may
    /// be in the count and not yet in the sum, which Prometheus tolerates.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0; BUCKETS.len()];
        let mut running = 0;
        for (c, n) in cumulative.iter_mut().zip(&self.counts) {
            running += n.load(Relaxed);
            *c = running;
        }
        // The last count is the +Inf bucket, beyond every bound.
        let beyond = self.counts.last().map_or(0, |n| n.load(Relaxed));
        let count = running + beyond;
        HistogramSnapshot {
            cumulative,
            count,
            sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// Bytes a TCP socket has received and had acknowledged by its peer, as the kernel counts
/// them (Linux `TCP_INFO`); for the disconnect log line, at no cost to the data path.
/// `None` where the kernel does not say.
#[cfg(target_os = "linux")]
pub fn tcp_traffic(socket: &impl std::os::fd::AsRawFd) -> Option<TcpTraffic> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is a live socket borrowed for the call; getsockopt writes at most
    // `len` bytes into `info`, a plain C struct that zeroed memory already makes valid.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    if rc != 0 || (len as usize) < needed {
        return None;
    }
    // SAFETY: zero-initialised above and filled in by the kernel.
    let info = unsafe { info.assume_init() };
    Some(TcpTraffic {
        received: info.tcpi_bytes_received,
        sent: info.tcpi_bytes_acked,
    })
}

/// See the Linux version.
#[cfg(not(target_os = "linux"))]
pub fn tcp_traffic(_socket: &impl std::os::fd::AsRawFd) -> Option<TcpTraffic> {
    None
}

/// Bytes through one TCP connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTraffic {
    /// Bytes received from the peer.
    pub received: u64,
    /// Bytes sent and acknowledged by the peer.
    pub sent: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_less_or_equal_and_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // exactly the first bound
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(1000)); // above every bound: only in the count
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[2], 1); // 2.5 ms
        assert_eq!(s.cumulative[3], 2); // 5 ms
        assert_eq!(s.cumulative[BUCKETS.len() - 1], 2);
        assert!((s.sum_seconds - 1000.0035).abs() < 1e-6);
    }

    #[test]
    fn errors_by_class() {
        let stats = PoolStats::default();
        stats.server_error(b"42P01");
        stats.server_error(b"42601");
        stats.server_error(b"0a000");
        stats.server_error(b"ZZ999");
        stats.server_error(b"");
        let seen: Vec<_> = stats.server_errors.nonzero().collect();
        assert_eq!(seen, [("0A", 1), ("42", 2), ("other", 2)]);
    }
}
