//! `GET /metrics`: a Prometheus collector that reads the pools' atomics, the pools' state
//! and the client registry at scrape time. Sessions never wait for a scrape: counters are
//! atomics, and the pool's lock is taken once per pool for a copy of its counts.
//!
//! Names: `pgmux_` prefix, base units (seconds, bytes, ratios), `_total` counters,
//! `_seconds` histograms. Labels: `database` and `user` (the pool), plus a bounded
//! `state`, `class` or `reason` where a family says so; never a client address.

// Metric descriptors are static: the `expect`s allowed below (registering them) fail only
// on a programming error, at the start of every test run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, Registry, TextEncoder};

use super::PortStats;
use crate::auth::FailureReason;
use crate::clients::{ClientState, WaitCause};
use crate::logging;
use crate::pooler::Pooler;
use crate::stats::{BUCKETS, CloseReason, HistogramSnapshot, StateAction, StateKind};

/// One family: name, help, type, labels.
type Family = (
    &'static str,
    &'static str,
    MetricType,
    &'static [&'static str],
);

const POOL: &[&str] = &["database", "user"];
const POOL_STATE: &[&str] = &["database", "user", "state"];
const LIMIT: &[&str] = &["limit", "name"];
const G: MetricType = MetricType::GAUGE;
const C: MetricType = MetricType::COUNTER;
const H: MetricType = MetricType::HISTOGRAM;

/// Every family pgmux exports (besides the `process_*` ones).
const FAMILIES: &[Family] = &[
    (
        "pgmux_build_info",
        "pgmux version, always 1.",
        G,
        &["version"],
    ),
    (
        "pgmux_client_connections",
        "Client TCP connections open now, logging in or logged in.",
        G,
        &[],
    ),
    (
        "pgmux_max_client_connections",
        "server.max_client_conn.",
        G,
        &[],
    ),
    ("pgmux_pools", "Pools (database, user) in use.", G, &[]),
    (
        "pgmux_draining",
        "1 from the first SIGTERM/SIGINT until pgmux exits (/ready answers 503), else 0.",
        G,
        &[],
    ),
    (
        "pgmux_accepting",
        "1 while the client listeners accept connections (through drain_delay too), else 0.",
        G,
        &[],
    ),
    (
        "pgmux_clients_parked",
        "Idle clients parked now: no task of their own, their sockets watched by their worker thread's parking lot (server.park_idle_after).",
        G,
        &[],
    ),
    (
        "pgmux_clients_park_declined_total",
        "Idle clients asked to park that could not (TLS, LISTEN, a server kept); each is asked at most once per park_idle_after.",
        C,
        &[],
    ),
    (
        "pgmux_worker_sessions",
        "Client sessions each worker thread runs now (worker 0 is the main thread); only with worker_threads above 1.",
        G,
        &["worker"],
    ),
    (
        "pgmux_upgrade_in_progress",
        "1 while an upgrade (SIGUSR2, pgmux upgrade) starts a new process or moves clients to it, else 0.",
        G,
        &[],
    ),
    (
        "pgmux_upgrades_total",
        "Upgrades this process started, by result: handed_over (a new process took the sockets) or failed (it did not start or say READY; this one serves on).",
        C,
        &["result"],
    ),
    (
        "pgmux_upgrade_clients_total",
        "Clients in upgrades, by outcome: moved (sent to the new process), closed (57P01: TLS, a server held, LISTEN channels not handed over, or the hand-over failed), received (by this process from its predecessor).",
        C,
        &["outcome"],
    ),
    (
        "pgmux_config_reloads_total",
        "Config reloads, by result (success, failure).",
        C,
        &["result"],
    ),
    (
        "pgmux_config_last_reload_success",
        "1 if the last config reload was applied (or none was tried), 0 if it was refused.",
        G,
        &[],
    ),
    (
        "pgmux_config_last_reload_timestamp_seconds",
        "When the last config reload was tried, Unix time; 0 = never.",
        G,
        &[],
    ),
    (
        "pgmux_login_failures_total",
        "Failed client logins, by reason (bad_password, unknown_user, unknown_database, rejected_by_rule, rate_limited, timeout, protocol, tls).",
        C,
        &["reason"],
    ),
    (
        "pgmux_notify_listening_clients",
        "Clients that LISTEN to at least one channel (fan-out in transaction and statement mode).",
        G,
        &[],
    ),
    (
        "pgmux_notify_channels",
        "Channels the listener connections LISTEN to, over all databases.",
        G,
        &[],
    ),
    (
        "pgmux_notify_queued",
        "Notifications queued for listening clients and not yet written to them, over all clients.",
        G,
        &[],
    ),
    (
        "pgmux_notify_queue_max_depth",
        "The longest queue of notifications of one client now (1024 at most; a full queue that does not drain within a second cuts its client off).",
        G,
        &[],
    ),
    (
        "pgmux_notify_received_total",
        "Notifications the listener connections received.",
        C,
        &[],
    ),
    (
        "pgmux_notify_delivered_total",
        "Notifications queued to listening clients (one per client and notification).",
        C,
        &[],
    ),
    (
        "pgmux_notify_dropped_clients_total",
        "Listening clients disconnected because they did not read their notifications.",
        C,
        &[],
    ),
    (
        "pgmux_notify_listener_reconnects_total",
        "Listener connections lost and opened again; notifications sent in between are lost.",
        C,
        &[],
    ),
    (
        "pgmux_auth_query_lookups_total",
        "Secrets of users not in the config looked up for logins (auth_query), by result (cached, found, not_found, failed).",
        C,
        &["result"],
    ),
    (
        "pgmux_log_write_errors_total",
        "Log lines dropped: stderr refused them (a broken pipe) or was too slow to take them.",
        C,
        &[],
    ),
    (
        "pgmux_session_panics_total",
        "Panics in pgmux (a client session or any other task), each logged with its location.",
        C,
        &[],
    ),
    (
        "pgmux_admin_connections",
        "Connections to the admin HTTP port open now.",
        G,
        &[],
    ),
    (
        "pgmux_admin_max_connections",
        "admin.max_connections.",
        G,
        &[],
    ),
    (
        "pgmux_admin_connections_refused_total",
        "Admin connections answered 503 and closed because admin.max_connections were open.",
        C,
        &[],
    ),
    (
        "pgmux_admin_connections_timed_out_total",
        "Admin connections closed by a limit, by reason (header_timeout, idle_timeout).",
        C,
        &["reason"],
    ),
    (
        "pgmux_limit_in_use",
        "Counted against a limit across pools now, by setting (limit) and database or user (name): server connections open for max_db_connections / max_user_connections, logged-in clients for max_db_client_connections / max_user_client_connections.",
        G,
        LIMIT,
    ),
    (
        "pgmux_limit_max",
        "The value of that limit (0 = unlimited).",
        G,
        LIMIT,
    ),
    (
        "pgmux_limit_waiting_clients",
        "Checkouts queued for a server connection limit across pools (fair FIFO per limit).",
        G,
        LIMIT,
    ),
    (
        "pgmux_limit_refused_total",
        "Checkouts (after wait_timeout) or logins refused with 53300 by that limit.",
        C,
        LIMIT,
    ),
    (
        "pgmux_clients",
        "Logged-in clients by state: idle, active, waiting, idle_in_transaction.",
        G,
        POOL_STATE,
    ),
    (
        "pgmux_pool_waiting_clients",
        "Clients queued for a server connection.",
        G,
        POOL,
    ),
    (
        "pgmux_pool_oldest_wait_seconds",
        "How long the oldest queued client has waited; 0 when none waits.",
        G,
        POOL,
    ),
    (
        "pgmux_servers",
        "Server connections by state: active (lent to a client), idle, connecting.",
        G,
        POOL_STATE,
    ),
    (
        "pgmux_pool_size",
        "Most server connections the pool opens (size).",
        G,
        POOL,
    ),
    (
        "pgmux_pool_min_size",
        "Server connections kept open even when idle (min_size).",
        G,
        POOL,
    ),
    (
        "pgmux_pool_utilization_ratio",
        "Server connections in use (active + connecting) / size.",
        G,
        POOL,
    ),
    (
        "pgmux_pool_paused",
        "1 while an operator paused the pool.",
        G,
        POOL,
    ),
    (
        "pgmux_upstream_up",
        "1 if the pool can reach its upstream (last connect succeeded, or a connection is open).",
        G,
        POOL,
    ),
    (
        "pgmux_upstream_max_connections",
        "The upstream's max_connections, once pgmux asked.",
        G,
        POOL,
    ),
    (
        "pgmux_pinned_clients",
        "Clients that keep their server connection between transactions because of the session state they left on it (session_state = \"pin\").",
        G,
        POOL,
    ),
    (
        "pgmux_session_state_events_total",
        "Session state found on a server at the end of a transaction, by kind and what pgmux did (pin, reset, refuse at max_pinned, follow for settings).",
        C,
        &["database", "user", "kind", "action"],
    ),
    (
        "pgmux_wait_seconds",
        "Time clients waited for a server connection (to a server, or to the wait_timeout error), by the cause when the wait ended: none (an idle server), pool_full, max_db_connections, max_user_connections, upstream_connecting, upstream_backoff, paused, draining.",
        H,
        &["database", "user", "cause"],
    ),
    (
        "pgmux_server_hold_seconds",
        "Time clients held a server connection, lent to given back.",
        H,
        POOL,
    ),
    (
        "pgmux_transaction_duration_seconds",
        "Transactions in transaction and statement mode, from the first message needing a server (wait included) to the server's return.",
        H,
        POOL,
    ),
    (
        "pgmux_queries_total",
        "Query and Sync messages forwarded to servers.",
        C,
        POOL,
    ),
    (
        "pgmux_transactions_total",
        "Server connections given back in transaction and statement mode: one per transaction.",
        C,
        POOL,
    ),
    (
        "pgmux_server_checkouts_total",
        "Server connections lent to clients.",
        C,
        POOL,
    ),
    (
        "pgmux_client_received_bytes_total",
        "Bytes received from clients.",
        C,
        POOL,
    ),
    (
        "pgmux_client_sent_bytes_total",
        "Bytes sent to clients.",
        C,
        POOL,
    ),
    (
        "pgmux_server_errors_total",
        "ErrorResponses from servers, by SQLSTATE class.",
        C,
        &["database", "user", "class"],
    ),
    (
        "pgmux_wait_timeouts_total",
        "Clients that got 53300 after wait_timeout.",
        C,
        POOL,
    ),
    (
        "pgmux_upstream_connect_attempts_total",
        "Attempts to open a server connection.",
        C,
        POOL,
    ),
    (
        "pgmux_upstream_connect_failures_total",
        "Attempts to open a server connection that failed.",
        C,
        POOL,
    ),
    (
        "pgmux_server_connections_closed_total",
        "Server connections closed by pgmux, by reason.",
        C,
        &["database", "user", "reason"],
    ),
    (
        "pgmux_prepared_statement_cache_hits_total",
        "Named prepared statements already prepared on the server.",
        C,
        POOL,
    ),
    (
        "pgmux_prepared_statement_cache_misses_total",
        "Named prepared statements that had to be prepared on the server.",
        C,
        POOL,
    ),
    (
        "pgmux_prepared_statement_cache_evictions_total",
        "Prepared statements closed on a server to stay under max_prepared_statements.",
        C,
        POOL,
    ),
];

/// The registry `/metrics` encodes: pgmux's collector and the process collector
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, ...).
pub struct Metrics {
    registry: Registry,
    /// Scrapes served, and their total time in microseconds (for `bench/`).
    pub scrapes: AtomicU64,
}

impl Metrics {
    /// A registry reading `pooler` (the admin port's own counters stay at 0).
    pub fn new(pooler: &Arc<Pooler>) -> Metrics {
        Metrics::with_port(pooler, Arc::default())
    }

    /// A registry reading `pooler` and the admin port's counters.
    #[allow(clippy::expect_used)] // static names: a bad one fails every test
    pub fn with_port(pooler: &Arc<Pooler>, port: Arc<PortStats>) -> Metrics {
        let registry = Registry::new();
        registry
            .register(Box::new(PoolCollector::new(Arc::downgrade(pooler), port)))
            .expect("pgmux metric names are valid and unique");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("the process collector registers once");
        Metrics {
            registry,
            scrapes: AtomicU64::new(0),
        }
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        self.scrapes.fetch_add(1, Relaxed);
        let families = self.registry.gather();
        let mut out = Vec::with_capacity(64 * 1024);
        // Encoding fails only on a malformed family, which FAMILIES rules out: what was
        // written is served rather than a panic.
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "could not encode every metric");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Reads the pooler at scrape time.
struct PoolCollector {
    pooler: Weak<Pooler>,
    port: Arc<PortStats>,
    descs: Vec<Desc>,
}

impl PoolCollector {
    #[allow(clippy::expect_used)] // static names: a bad one fails every test
    fn new(pooler: Weak<Pooler>, port: Arc<PortStats>) -> PoolCollector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                let labels = labels.iter().map(|l| (*l).to_owned()).collect();
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    labels,
                    Default::default(),
                )
                .expect("valid metric name")
            })
            .collect();
        PoolCollector {
            pooler,
            port,
            descs,
        }
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(pooler) = self.pooler.upgrade() else {
            return Vec::new();
        };
        let mut out = Families::default();
        collect_global(&pooler, &mut out);
        collect_port(&self.port, &pooler, &mut out);
        collect_pools(&pooler, &mut out);
        collect_limits(&pooler, &mut out);
        out.finish()
    }
}

fn collect_global(pooler: &Pooler, out: &mut Families) {
    out.gauge("pgmux_build_info", &[env!("CARGO_PKG_VERSION")], 1.0);
    out.gauge(
        "pgmux_client_connections",
        &[],
        pooler.clients.load(Relaxed) as f64,
    );
    out.gauge("pgmux_clients_parked", &[], crate::client::parked() as f64);
    out.counter(
        "pgmux_clients_park_declined_total",
        &[],
        crate::client::park_declined(),
    );
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    out.gauge("pgmux_draining", &[], flag(pooler.drain.is_begun()));
    out.gauge(
        "pgmux_accepting",
        &[],
        flag(pooler.listening.load(Relaxed) && !pooler.stop.is_cancelled()),
    );
    for (worker, n) in crate::workers::sessions_per_worker()
        .into_iter()
        .enumerate()
    {
        out.gauge("pgmux_worker_sessions", &[&worker.to_string()], n as f64);
    }
    out.gauge(
        "pgmux_upgrade_in_progress",
        &[],
        flag(pooler.upgrade.in_progress()),
    );
    let u = crate::upgrade::stats();
    for (result, n) in [("handed_over", &u.handed_over), ("failed", &u.failed)] {
        out.counter("pgmux_upgrades_total", &[result], n.load(Relaxed));
    }
    for (outcome, n) in [
        ("moved", &u.moved),
        ("closed", &u.closed),
        ("received", &u.received),
    ] {
        out.counter("pgmux_upgrade_clients_total", &[outcome], n.load(Relaxed));
    }
    let config = &pooler.snapshot().config;
    out.gauge(
        "pgmux_max_client_connections",
        &[],
        config.server.max_client_conn as f64,
    );
    let r = &pooler.reloads;
    out.counter(
        "pgmux_config_reloads_total",
        &["success"],
        r.succeeded.load(Relaxed),
    );
    out.counter(
        "pgmux_config_reloads_total",
        &["failure"],
        r.failed.load(Relaxed),
    );
    let ok = if r.last_failed.load(Relaxed) {
        0.0
    } else {
        1.0
    };
    out.gauge("pgmux_config_last_reload_success", &[], ok);
    for reason in FailureReason::ALL {
        out.counter(
            "pgmux_login_failures_total",
            &[reason.as_str()],
            pooler.logins.failures(reason),
        );
    }
    let counts = pooler.notify.counts();
    out.gauge(
        "pgmux_notify_listening_clients",
        &[],
        counts.listening_clients as f64,
    );
    out.gauge("pgmux_notify_channels", &[], counts.channels as f64);
    out.gauge("pgmux_notify_queued", &[], counts.queued as f64);
    out.gauge("pgmux_notify_queue_max_depth", &[], counts.deepest as f64);
    let n = &pooler.notify.stats;
    out.counter("pgmux_notify_received_total", &[], n.received.load(Relaxed));
    out.counter(
        "pgmux_notify_delivered_total",
        &[],
        n.delivered.load(Relaxed),
    );
    out.counter(
        "pgmux_notify_dropped_clients_total",
        &[],
        n.dropped_clients.load(Relaxed),
    );
    out.counter(
        "pgmux_notify_listener_reconnects_total",
        &[],
        n.reconnects.load(Relaxed),
    );
    for outcome in crate::pooler::AuthQueryOutcome::ALL {
        out.counter(
            "pgmux_auth_query_lookups_total",
            &[outcome.as_str()],
            pooler.auth_queries.lookups(outcome),
        );
    }
    out.counter("pgmux_log_write_errors_total", &[], logging::write_errors());
    out.counter("pgmux_session_panics_total", &[], logging::panics());
    out.gauge(
        "pgmux_config_last_reload_timestamp_seconds",
        &[],
        r.last_at.load(Relaxed) as f64,
    );
}

/// What the admin port counts about its own connections.
fn collect_port(port: &PortStats, pooler: &Pooler, out: &mut Families) {
    out.gauge(
        "pgmux_admin_connections",
        &[],
        port.open.load(Relaxed) as f64,
    );
    out.gauge(
        "pgmux_admin_max_connections",
        &[],
        pooler.snapshot().config.admin.max_connections as f64,
    );
    out.counter(
        "pgmux_admin_connections_refused_total",
        &[],
        port.refused.load(Relaxed),
    );
    let timeouts = [
        ("header_timeout", &port.header_timeouts),
        ("idle_timeout", &port.idle_timeouts),
    ];
    for (reason, n) in timeouts {
        out.counter(
            "pgmux_admin_connections_timed_out_total",
            &[reason],
            n.load(Relaxed),
        );
    }
}

fn collect_limits(pooler: &Pooler, out: &mut Families) {
    for l in super::views::limits(pooler) {
        let labels = [l.setting, l.name.as_str()];
        out.gauge("pgmux_limit_in_use", &labels, f64::from(l.in_use));
        out.gauge("pgmux_limit_max", &labels, f64::from(l.limit));
        out.counter("pgmux_limit_refused_total", &labels, l.refused);
        if l.setting.ends_with("_user_connections") || l.setting.ends_with("_db_connections") {
            out.gauge("pgmux_limit_waiting_clients", &labels, l.waiting as f64);
        }
    }
}

fn collect_pools(pooler: &Pooler, out: &mut Families) {
    let pools = pooler.pools();
    out.gauge("pgmux_pools", &[], pools.len() as f64);
    for ((database, user), counts) in pooler.clients_registry.counts() {
        for state in ClientState::ALL {
            let n = counts.get(state as usize).copied().unwrap_or_default() as f64;
            out.gauge("pgmux_clients", &[&database, &user, state.label()], n);
        }
    }
    for pool in pools {
        let v = pool.view();
        let s = &pool.stats;
        let l = [v.key.database.as_str(), v.key.user.as_str()];
        let with = |x: &'static str| [l[0], l[1], x];
        out.gauge("pgmux_pool_waiting_clients", &l, v.waiting as f64);
        let oldest = v.oldest_wait.map_or(0.0, |d| d.as_secs_f64());
        out.gauge("pgmux_pool_oldest_wait_seconds", &l, oldest);
        out.gauge("pgmux_servers", &with("active"), v.active as f64);
        out.gauge("pgmux_servers", &with("idle"), v.idle as f64);
        out.gauge(
            "pgmux_servers",
            &with("connecting"),
            f64::from(v.connecting),
        );
        out.gauge("pgmux_pool_size", &l, f64::from(v.settings.size));
        out.gauge("pgmux_pool_min_size", &l, f64::from(v.settings.min_size));
        out.gauge("pgmux_pool_utilization_ratio", &l, v.utilization() / 100.0);
        out.gauge("pgmux_pool_paused", &l, if v.paused { 1.0 } else { 0.0 });
        out.gauge(
            "pgmux_upstream_up",
            &l,
            if v.reachable() { 1.0 } else { 0.0 },
        );
        if let Some(max) = v.upstream_max_connections {
            out.gauge("pgmux_upstream_max_connections", &l, f64::from(max));
        }
        out.gauge("pgmux_pinned_clients", &l, f64::from(v.pinned));
        for kind in StateKind::ALL {
            for action in StateAction::ALL {
                let row = s.session_state.get(kind as usize);
                let n = row
                    .and_then(|row| row.get(action as usize))
                    .map_or(0, |n| n.load(Relaxed));
                if n > 0 {
                    let labels = [l[0], l[1], kind.as_str(), action.as_str()];
                    out.counter("pgmux_session_state_events_total", &labels, n);
                }
            }
        }
        // `none` (checkouts served at once: every checkout less those that waited) always,
        // so that a pool shows its histogram before anything waited; each cause once it
        // happened. Summed over `cause`, every checkout.
        let mut none = s.wait.snapshot();
        for (cause, h) in WaitCause::ALL.iter().zip(&s.wait_by_cause) {
            let snap = h.snapshot();
            if snap.count == 0 {
                continue;
            }
            for (n, c) in none.cumulative.iter_mut().zip(snap.cumulative) {
                *n = n.saturating_sub(c);
            }
            none.count = none.count.saturating_sub(snap.count);
            none.sum_seconds = (none.sum_seconds - snap.sum_seconds).max(0.0);
            out.histogram("pgmux_wait_seconds", &[l[0], l[1], cause.as_str()], snap);
        }
        out.histogram("pgmux_wait_seconds", &[l[0], l[1], "none"], none);
        out.histogram("pgmux_server_hold_seconds", &l, s.hold.snapshot());
        out.histogram(
            "pgmux_transaction_duration_seconds",
            &l,
            s.transaction.snapshot(),
        );
        let counters: [(&'static str, &AtomicU64); 11] = [
            ("pgmux_queries_total", &s.queries),
            ("pgmux_transactions_total", &s.transactions),
            ("pgmux_server_checkouts_total", &s.checkouts),
            ("pgmux_client_received_bytes_total", &s.bytes_received),
            ("pgmux_client_sent_bytes_total", &s.bytes_sent),
            ("pgmux_wait_timeouts_total", &s.wait_timeouts),
            ("pgmux_upstream_connect_attempts_total", &s.connect_attempts),
            ("pgmux_upstream_connect_failures_total", &s.connect_failures),
            (
                "pgmux_prepared_statement_cache_hits_total",
                &s.prepared_hits,
            ),
            (
                "pgmux_prepared_statement_cache_misses_total",
                &s.prepared_misses,
            ),
            (
                "pgmux_prepared_statement_cache_evictions_total",
                &s.prepared_evictions,
            ),
        ];
        for (name, value) in counters {
            out.counter(name, &l, value.load(Relaxed));
        }
        for (class, n) in s.server_errors.nonzero() {
            out.counter("pgmux_server_errors_total", &with(class), n);
        }
        for reason in CloseReason::ALL {
            let n = s.closed.get(reason as usize).map_or(0, |n| n.load(Relaxed));
            out.counter(
                "pgmux_server_connections_closed_total",
                &with(reason.as_str()),
                n,
            );
        }
    }
}

/// Metrics being gathered, by family name.
#[derive(Default)]
struct Families {
    /// Each family's label names (looked up once) and its metrics.
    by_name: BTreeMap<&'static str, (&'static [&'static str], Vec<Metric>)>,
}

impl Families {
    fn push(&mut self, name: &'static str, values: &[&str], mut metric: Metric) {
        let Some((_, _, _, names)) = family(name) else {
            debug_assert!(false, "{name} is not in FAMILIES");
            return;
        };
        let (labels, metrics) = self
            .by_name
            .entry(name)
            .or_insert_with(|| (names, Vec::new()));
        debug_assert_eq!(labels.len(), values.len(), "{name}");
        let pairs = labels
            .iter()
            .zip(values)
            .map(|(k, v)| {
                let mut pair = LabelPair::default();
                pair.set_name((*k).to_owned());
                pair.set_value((*v).to_owned());
                pair
            })
            .collect();
        metric.set_label(pairs);
        metrics.push(metric);
    }

    fn gauge(&mut self, name: &'static str, labels: &[&str], value: f64) {
        let mut gauge = Gauge::default();
        gauge.set_value(value);
        let mut metric = Metric::default();
        metric.set_gauge(gauge);
        self.push(name, labels, metric);
    }

    fn counter(&mut self, name: &'static str, labels: &[&str], value: u64) {
        let mut counter = Counter::default();
        counter.set_value(value as f64);
        let mut metric = Metric::default();
        metric.set_counter(counter);
        self.push(name, labels, metric);
    }

    fn histogram(&mut self, name: &'static str, labels: &[&str], h: HistogramSnapshot) {
        let buckets = BUCKETS
            .iter()
            .zip(h.cumulative)
            .map(|(bound, count)| {
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(*bound);
                bucket.set_cumulative_count(count);
                bucket
            })
            .collect();
        let mut histogram = Histogram::default();
        histogram.set_bucket(buckets);
        histogram.set_sample_count(h.count);
        histogram.set_sample_sum(h.sum_seconds);
        let mut metric = Metric::default();
        metric.set_histogram(histogram);
        self.push(name, labels, metric);
    }

    fn finish(self) -> Vec<MetricFamily> {
        self.by_name
            .into_iter()
            .filter_map(|(name, (_, metrics))| {
                let (_, help, kind, _) = family(name)?;
                let mut mf = MetricFamily::default();
                mf.set_name(name.to_owned());
                mf.set_help(help.to_owned());
                mf.set_field_type(kind);
                mf.set_metric(metrics);
                Some(mf)
            })
            .collect()
    }
}

/// The family named `name` (every one pushed is in FAMILIES: `push` checks).
fn family(name: &str) -> Option<Family> {
    FAMILIES.iter().find(|f| f.0 == name).copied()
}
