//! What `/pools`, `/clients`, `/servers` and `/ready` show, built from the pools' views
//! and the client registry. The console's SHOW commands use the same data.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;

use crate::clients::{ClientInfo, ClientState};
use crate::pool::{BudgetKind, PoolView, ServerState, WINDOW_SECONDS};
use crate::pooler::Pooler;

/// One pool in `/pools`.
#[derive(Serialize, Debug, Clone)]
pub struct PoolJson {
    pub database: String,
    pub user: String,
    pub mode: &'static str,
    pub size: u32,
    pub min_size: u32,
    /// Server connections lent to clients.
    pub active: usize,
    pub idle: usize,
    pub connecting: u32,
    /// Clients waiting for a server.
    pub waiting: usize,
    pub oldest_wait_ms: u64,
    pub utilization_percent: f64,
    /// `normal` (< 70 %), `warning` (< 90 %), `critical` (or clients waiting).
    pub status: &'static str,
    pub paused: bool,
    /// `host:port`.
    pub upstream: String,
    pub upstream_reachable: bool,
    /// The last connect error while the upstream is unreachable.
    pub upstream_error: Option<String>,
    pub wait_timeouts_last_minute: u64,
    pub wait_timeouts_total: u64,
    /// Servers held by clients pinned by their session state, and the most allowed.
    pub pinned: u32,
    pub max_pinned: u32,
    /// The limits across pools this pool counts in (`max_db_connections`, ...); empty
    /// when none is set.
    pub limits: Vec<LimitJson>,
    pub advice: Advice,
}

/// A limit shared by every pool of a database or user, as `/pools` shows it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LimitJson {
    /// The setting: `max_db_connections`, `max_user_connections`,
    /// `max_db_client_connections` or `max_user_client_connections`.
    pub setting: &'static str,
    /// The database or user it counts.
    pub name: String,
    pub limit: u32,
    /// Server connections open (or clients logged in) counted against it now.
    pub in_use: u32,
    /// Checkouts waiting for it now (server limits only).
    pub waiting: usize,
    /// Checkouts or logins refused with 53300 because of it, since start.
    pub refused: u64,
}

/// Every limit across pools in force: server connection budgets, then client caps.
pub fn limits(pooler: &Pooler) -> Vec<LimitJson> {
    let budgets = pooler.budgets().into_iter().map(|b| {
        let v = b.view();
        LimitJson {
            setting: v.kind.setting(),
            name: v.name,
            limit: v.limit,
            in_use: v.used,
            waiting: v.waiting,
            refused: v.refused,
        }
    });
    let caps = pooler.client_caps().into_iter().map(|c| LimitJson {
        setting: match c.kind {
            BudgetKind::Database => "max_db_client_connections",
            BudgetKind::User => "max_user_client_connections",
        },
        name: c.name,
        limit: c.limit,
        in_use: c.connected,
        waiting: 0,
        refused: c.refused,
    });
    budgets.chain(caps).collect()
}

/// Sizing advice from the last five minutes of demand.
#[derive(Serialize, Debug, Clone)]
pub struct Advice {
    /// Seconds of history the advice is based on (at most 300).
    pub window_seconds: u64,
    /// Most servers wanted at once (held + waiting) in any second.
    pub peak_demand: u32,
    /// 95th percentile of the per-second peaks.
    pub p95_demand: u32,
    /// Servers lent per second.
    pub arrival_rate_per_second: f64,
    /// Mean time a server was held.
    pub mean_hold_ms: f64,
    /// Little's law: arrival rate x mean hold time = servers busy on average.
    pub littles_law_servers: f64,
    /// The size that would have avoided every wait in the window.
    pub suggested_size: u32,
    /// The upstream's `max_connections`, once known.
    pub upstream_max_connections: Option<u32>,
    /// Sum of the sizes of every pool on the same upstream (host:port).
    pub upstream_pools_size: u32,
    /// `max_connections` less that sum; negative when the pools may open more than allowed.
    pub upstream_headroom: Option<i64>,
    /// The advice in words.
    pub summary: String,
}

/// Every pool, by database then user.
pub fn pools(pooler: &Pooler) -> Vec<PoolJson> {
    let mut views: Vec<PoolView> = pooler.pools().iter().map(|p| p.view()).collect();
    views.sort_by(|a, b| a.key.cmp(&b.key));
    let all_limits = limits(pooler);
    let limits_of = |v: &PoolView| -> Vec<LimitJson> {
        let database = ["max_db_connections", "max_db_client_connections"];
        all_limits
            .iter()
            .filter(|l| {
                let name = if database.contains(&l.setting) {
                    &v.key.database
                } else {
                    &v.key.user
                };
                l.name == *name
            })
            .filter(|l| {
                let s = &v.settings.limits;
                match l.setting {
                    "max_db_connections" => s.max_db_connections > 0,
                    "max_user_connections" => s.max_user_connections > 0,
                    "max_db_client_connections" => s.max_db_client_connections > 0,
                    _ => s.max_user_client_connections > 0,
                }
            })
            .cloned()
            .collect()
    };
    // Sizes per upstream, for the headroom.
    let mut per_upstream: HashMap<String, u32> = HashMap::new();
    for v in &views {
        *per_upstream.entry(v.upstream.to_string()).or_default() += v.settings.size;
    }
    views
        .iter()
        .map(|v| {
            let upstream = v.upstream.to_string();
            let pools_size = per_upstream.get(&upstream).copied().unwrap_or(0);
            PoolJson {
                database: v.key.database.clone(),
                user: v.key.user.clone(),
                mode: v.settings.mode.as_str(),
                size: v.settings.size,
                min_size: v.settings.min_size,
                active: v.active,
                idle: v.idle,
                connecting: v.connecting,
                waiting: v.waiting,
                oldest_wait_ms: millis(v.oldest_wait.unwrap_or_default()),
                utilization_percent: (v.utilization() * 10.0).round() / 10.0,
                status: v.status().as_str(),
                paused: v.paused,
                upstream,
                upstream_reachable: v.reachable(),
                upstream_error: v.upstream_error.clone(),
                wait_timeouts_last_minute: v.demand.timeouts_last_minute,
                wait_timeouts_total: v.wait_timeouts_total,
                pinned: v.pinned,
                max_pinned: v.settings.pinned_limit(),
                limits: limits_of(v),
                advice: advice(v, pools_size),
            }
        })
        .collect()
}

fn advice(v: &PoolView, pools_size: u32) -> Advice {
    let d = &v.demand;
    let size = v.settings.size;
    let littles = d.littles_law();
    let needed = d.peak.max(littles.ceil() as u32);
    let suggested = needed.max(v.settings.min_size).max(1);
    let headroom = v
        .upstream_max_connections
        .map(|max| i64::from(max) - i64::from(pools_size));
    let window = humantime::format_duration(Duration::from_secs(d.seconds));
    let mut summary = if d.seconds == 0 {
        "no demand observed yet".to_owned()
    } else if suggested > size {
        format!(
            "raise size from {size} to {suggested}: up to {} clients wanted a server at once in the last {window} (p95 {}), {} gave up waiting in the last minute",
            d.peak, d.p95, d.timeouts_last_minute
        )
    } else if d.seconds >= 60 && suggested < size / 2 {
        format!(
            "size {size} is more than this load needs: at most {} servers were wanted at once in the last {window} (p95 {}); {suggested} would do",
            d.peak, d.p95
        )
    } else {
        format!(
            "size {size} fits: at most {} servers were wanted at once in the last {window} (p95 {})",
            d.peak, d.p95
        )
    };
    if let (Some(max), Some(room)) = (v.upstream_max_connections, headroom) {
        let more = i64::from(suggested) - i64::from(size);
        if room < 0 {
            summary.push_str(&format!(
                "; the pools on {} may open {pools_size} connections but its max_connections is {max}",
                v.upstream
            ));
        } else if more > room {
            summary.push_str(&format!(
                "; but {} has room for only {room} more connections (max_connections {max}, pools on it may open {pools_size}): raise max_connections or make transactions shorter",
                v.upstream
            ));
        }
    }
    Advice {
        window_seconds: d.seconds.min(WINDOW_SECONDS as u64),
        peak_demand: d.peak,
        p95_demand: d.p95,
        arrival_rate_per_second: round3(d.arrival_rate),
        mean_hold_ms: round3(d.mean_hold.as_secs_f64() * 1000.0),
        littles_law_servers: round3(littles),
        suggested_size: suggested,
        upstream_max_connections: v.upstream_max_connections,
        upstream_pools_size: pools_size,
        upstream_headroom: headroom,
        summary,
    }
}

/// One client in `/clients`.
#[derive(Serialize, Debug, Clone)]
pub struct ClientJson {
    pub id: u64,
    pub addr: String,
    pub database: String,
    pub user: String,
    pub application_name: String,
    /// How the connection is encrypted (`TLSv1.3/TLS_AES_256_GCM_SHA384`); null: plain.
    pub tls: Option<String>,
    /// The channels it LISTENs to (served by the database's listener connection).
    pub channels: Vec<String>,
    /// idle, active, waiting, idle in transaction.
    pub state: &'static str,
    /// How long it has been in `state`.
    pub state_ms: u64,
    /// Why it waits for a server, while it does: pool_full, max_db_connections,
    /// max_user_connections, upstream_connecting, upstream_backoff, paused, draining.
    pub wait_cause: Option<&'static str>,
    /// The cause in words, with its numbers (the pool's size and longest holders, the
    /// limit, the upstream's last error).
    pub wait_detail: Option<String>,
    pub connected_ms: u64,
    pub in_transaction: bool,
    /// The server connection it holds.
    pub server: Option<HeldServer>,
    /// Its current (or last) query, at most 200 bytes.
    pub query: Option<String>,
    /// What pgmux last did about session state it left on its server.
    pub session_state: Option<SessionStateJson>,
}

/// Session state a client left on its server (transaction and statement mode).
#[derive(Serialize, Debug, Clone)]
pub struct SessionStateJson {
    /// `pin`, `reset` or `refuse`.
    pub action: &'static str,
    /// Whether the client holds its server for it now.
    pub pinned: bool,
    /// `temp_table`, `advisory_lock`, `cursor`, `listen`, `prepared_statement`.
    pub kinds: Vec<String>,
    /// The statement that made it, at most 200 bytes.
    pub statement: String,
    /// When, as Unix time in seconds.
    pub at: u64,
}

/// The server a client holds.
#[derive(Serialize, Debug, Clone)]
pub struct HeldServer {
    pub id: u64,
    pub pid: i32,
    pub held_ms: u64,
}

/// Every client; those holding a server first, longest held first, then by time in state.
pub fn clients(pooler: &Pooler) -> Vec<ClientJson> {
    let mut all = pooler.clients_registry.snapshot();
    all.sort_by(|a, b| {
        let held = |c: &ClientInfo| c.server.map(|s| s.held);
        held(b)
            .cmp(&held(a))
            .then_with(|| b.in_state.cmp(&a.in_state))
    });
    let pools = pooler.pools();
    let explain = |c: &ClientInfo| {
        let cause = c.wait_cause?;
        let pool = pools
            .iter()
            .find(|p| p.key.database == c.database && p.key.user == c.user)?;
        Some(pool.explain(cause))
    };
    all.iter().map(|c| client_json(c, explain(c))).collect()
}

fn client_json(c: &ClientInfo, wait_detail: Option<String>) -> ClientJson {
    ClientJson {
        id: c.id,
        addr: c.peer.to_string(),
        database: c.database.clone(),
        user: c.user.clone(),
        application_name: c.application_name.clone(),
        tls: c.tls.as_deref().map(str::to_owned),
        channels: c.channels.clone(),
        state: c.state.as_str(),
        state_ms: millis(c.in_state),
        wait_cause: c.wait_cause.map(|w| w.as_str()),
        wait_detail,
        connected_ms: millis(c.connected),
        in_transaction: c.in_transaction,
        server: c.server.map(|s| HeldServer {
            id: s.id,
            pid: s.pid,
            held_ms: millis(s.held),
        }),
        query: (!c.query.is_empty()).then(|| c.query.clone()),
        session_state: c.session_state.as_ref().map(|e| SessionStateJson {
            action: e.action,
            pinned: e.pinned,
            kinds: e.kinds.split(',').map(str::to_owned).collect(),
            statement: e.statement.clone(),
            at: e.at,
        }),
    }
}

/// One server connection in `/servers`.
#[derive(Serialize, Debug, Clone)]
pub struct ServerJson {
    pub id: u64,
    pub pid: i32,
    pub database: String,
    pub user: String,
    /// `host:port`.
    pub upstream: String,
    /// How the connection to PostgreSQL is encrypted; null: plain.
    pub tls: Option<String>,
    /// As PostgreSQL would say it: active (a query runs), idle in transaction (its client
    /// sits in an open transaction), idle (in the pool, or held by a session-mode client
    /// between transactions), or listener (the LISTEN/NOTIFY connection of a database,
    /// outside the pools).
    pub state: &'static str,
    /// Time since it was opened.
    pub age_ms: u64,
    /// Active: how long its client has held it.
    pub held_ms: Option<u64>,
    /// Idle: how long it has been idle.
    pub idle_ms: Option<u64>,
    /// The client holding it.
    pub client: Option<HoldingClient>,
    /// The client's current query, at most 200 bytes, if it is running one or in a
    /// transaction.
    pub query: Option<String>,
    pub in_transaction: bool,
}

/// The client holding a server.
#[derive(Serialize, Debug, Clone)]
pub struct HoldingClient {
    pub id: u64,
    pub addr: String,
    pub application_name: String,
    pub state: &'static str,
}

/// Every server connection of every pool; active ones first, longest held first.
pub fn servers(pooler: &Pooler) -> Vec<ServerJson> {
    let clients = pooler.clients_registry.snapshot();
    let by_server: HashMap<u64, &ClientInfo> = clients
        .iter()
        .filter_map(|c| c.server.map(|s| (s.id, c)))
        .collect();
    let mut out = Vec::new();
    for pool in pooler.pools() {
        let upstream = pool.upstream().to_string();
        for s in pool.servers() {
            let client = by_server.get(&s.id).copied();
            let active = s.state == ServerState::Active;
            // As PostgreSQL's pg_stat_activity says it: a lent server whose client sits in
            // an open transaction is `idle in transaction`, not `active`.
            let state = match client.map(|c| c.state) {
                _ if !active => s.state.as_str(),
                Some(ClientState::IdleInTransaction) => ClientState::IdleInTransaction.as_str(),
                Some(ClientState::Idle) => ClientState::Idle.as_str(),
                _ => s.state.as_str(),
            };
            let busy = client.is_some_and(|c| c.in_transaction || c.state == ClientState::Active);
            out.push(ServerJson {
                id: s.id,
                pid: s.pid,
                database: pool.key.database.clone(),
                user: pool.key.user.clone(),
                upstream: upstream.clone(),
                tls: s.tls.as_deref().map(str::to_owned),
                state,
                age_ms: millis(s.age),
                held_ms: active.then(|| millis(s.in_state)),
                idle_ms: (!active).then(|| millis(s.in_state)),
                client: client.map(|c| HoldingClient {
                    id: c.id,
                    addr: c.peer.to_string(),
                    application_name: c.application_name.clone(),
                    state: c.state.as_str(),
                }),
                query: client
                    .filter(|c| busy && !c.query.is_empty())
                    .map(|c| c.query.clone()),
                in_transaction: client.is_some_and(|c| c.in_transaction),
            });
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.held_ms));
    // LISTEN/NOTIFY listener connections: outside the pools, after them.
    for l in pooler.notify.listeners() {
        out.push(ServerJson {
            id: 0,
            pid: l.pid,
            database: l.database,
            user: l.user,
            upstream: l.upstream,
            tls: None,
            state: "listener",
            age_ms: 0,
            held_ms: None,
            idle_ms: None,
            client: None,
            query: Some(format!("LISTEN ({} channels)", l.channels)),
            in_transaction: false,
        });
    }
    out
}

/// `Ok` when pgmux can serve: its listener accepts and every pool reaches its upstream
/// or holds a live connection. Otherwise every reason.
pub fn readiness(pooler: &Pooler) -> Result<(), Vec<String>> {
    let mut reasons = Vec::new();
    if pooler.stop.is_cancelled() {
        reasons.push(
            "draining: pgmux is shutting down; no longer accepting, sessions end after their transaction"
                .to_owned(),
        );
    } else if let Some(deadline) = pooler.drain.deadline() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        reasons.push(format!(
            "draining: pgmux is shutting down; still serving, and accepting for {} more (server.drain_delay)",
            humantime::format_duration(Duration::from_millis(millis(left)))
        ));
    } else if !pooler.listening.load(Relaxed) {
        reasons.push("the client listener is not accepting connections".to_owned());
    }
    let mut views: Vec<PoolView> = pooler.pools().iter().map(|p| p.view()).collect();
    views.sort_by(|a, b| a.key.cmp(&b.key));
    for v in views {
        if !v.reachable() {
            reasons.push(format!(
                "pool {}: upstream {} unreachable and no connection open: {}",
                v.key,
                v.upstream,
                v.upstream_error.as_deref().unwrap_or("unknown error")
            ));
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
