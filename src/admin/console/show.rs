//! The SHOW commands but the stats ones (`stats.rs`) and CONFIG (`settings.rs`): PgBouncer
//! 1.25's columns, in its order and with its types, then pgmux's own columns. What each
//! column means for pgmux is in docs/migrating-from-pgbouncer.md.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::rows::{Rows, Type, int, secs_and_micros, split_addr, text, timestamp_ago};
use crate::admin::views::{self, ClientJson, ServerJson};
use crate::clients::ClientState;
use crate::pooler::Pooler;

/// SHOW POOLS, PgBouncer's 17 columns.
pub const POOLS: &[(&str, Type)] = &[
    ("database", Type::Text),
    ("user", Type::Text),
    ("cl_active", Type::Int4),
    ("cl_waiting", Type::Int4),
    ("cl_active_cancel_req", Type::Int4),
    ("cl_waiting_cancel_req", Type::Int4),
    ("sv_active", Type::Int4),
    ("sv_active_cancel", Type::Int4),
    ("sv_being_canceled", Type::Int4),
    ("sv_idle", Type::Int4),
    ("sv_used", Type::Int4),
    ("sv_tested", Type::Int4),
    ("sv_login", Type::Int4),
    ("maxwait", Type::Int4),
    ("maxwait_us", Type::Int4),
    ("pool_mode", Type::Text),
    ("load_balance_hosts", Type::Text),
];

/// pgmux's columns after SHOW POOLS' own.
const POOLS_PGMUX: &[(&str, Type)] = &[
    ("pool_size", Type::Int4),
    ("utilization_percent", Type::Float8),
    ("status", Type::Text),
    ("paused", Type::Int4),
];

/// The columns PgBouncer's SHOW CLIENTS and SHOW SERVERS share, in its order.
pub const SOCKETS: &[(&str, Type)] = &[
    ("type", Type::Text),
    ("user", Type::Text),
    ("database", Type::Text),
    ("replication", Type::Text),
    ("state", Type::Text),
    ("addr", Type::Text),
    ("port", Type::Int4),
    ("local_addr", Type::Text),
    ("local_port", Type::Int4),
    ("connect_time", Type::Text),
    ("request_time", Type::Text),
    ("wait", Type::Int4),
    ("wait_us", Type::Int4),
    ("close_needed", Type::Int4),
    ("ptr", Type::Text),
    ("link", Type::Text),
    ("remote_pid", Type::Int4),
    ("tls", Type::Text),
    ("application_name", Type::Text),
    ("prepared_statements", Type::Int4),
    ("id", Type::Int4),
];

/// SHOW SOCKETS adds these low-level buffer columns (PgBouncer's debug columns).
const SOCKETS_DEBUG: &[(&str, Type)] = &[
    ("recv_pos", Type::Int4),
    ("pkt_pos", Type::Int4),
    ("pkt_remain", Type::Int4),
    ("send_pos", Type::Int4),
    ("send_remain", Type::Int4),
    ("pkt_avail", Type::Int4),
    ("send_avail", Type::Int4),
];

/// pgmux's columns after SHOW CLIENTS' own.
const CLIENTS_PGMUX: &[(&str, Type)] = &[
    ("activity", Type::Text),
    ("activity_ms", Type::Int8),
    ("in_transaction", Type::Text),
    ("query", Type::Text),
    ("session_state", Type::Text),
    ("session_state_statement", Type::Text),
    ("wait_cause", Type::Text),
    ("wait_detail", Type::Text),
];

/// pgmux's columns after SHOW SERVERS' own.
const SERVERS_PGMUX: &[(&str, Type)] = &[
    ("held_ms", Type::Int8),
    ("in_transaction", Type::Text),
    ("query", Type::Text),
    ("role", Type::Text),
];

/// SHOW DATABASES, PgBouncer's 17 columns.
pub const DATABASES: &[(&str, Type)] = &[
    ("name", Type::Text),
    ("host", Type::Text),
    ("port", Type::Int4),
    ("database", Type::Text),
    ("force_user", Type::Text),
    ("pool_size", Type::Int4),
    ("min_pool_size", Type::Int4),
    ("reserve_pool_size", Type::Int4),
    ("server_lifetime", Type::Int4),
    ("pool_mode", Type::Text),
    ("load_balance_hosts", Type::Text),
    ("max_connections", Type::Int4),
    ("current_connections", Type::Int4),
    ("max_client_connections", Type::Int4),
    ("current_client_connections", Type::Int4),
    ("paused", Type::Int4),
    ("disabled", Type::Int4),
];

/// SHOW USERS, PgBouncer's 8 columns (its `pool_size` and `reserve_pool_size` are text).
pub const USERS: &[(&str, Type)] = &[
    ("name", Type::Text),
    ("pool_size", Type::Text),
    ("reserve_pool_size", Type::Text),
    ("pool_mode", Type::Text),
    ("max_user_connections", Type::Int4),
    ("current_connections", Type::Int4),
    ("max_user_client_connections", Type::Int4),
    ("current_client_connections", Type::Int4),
];

/// SHOW MEM.
pub const MEM: &[(&str, Type)] = &[
    ("name", Type::Text),
    ("size", Type::Int4),
    ("used", Type::Int4),
    ("free", Type::Int4),
    ("memtotal", Type::Int4),
];

/// SHOW FDS.
pub const FDS: &[(&str, Type)] = &[
    ("fd", Type::Int4),
    ("task", Type::Text),
    ("user", Type::Text),
    ("database", Type::Text),
    ("addr", Type::Text),
    ("port", Type::Int4),
    ("cancel", Type::Int8),
    ("link", Type::Int4),
    ("client_encoding", Type::Text),
    ("std_strings", Type::Text),
    ("datestyle", Type::Text),
    ("timezone", Type::Text),
    ("password", Type::Text),
    ("scram_client_key", Type::Bytea),
    ("scram_server_key", Type::Bytea),
];

/// SHOW PEERS.
pub const PEERS: &[(&str, Type)] = &[
    ("peer_id", Type::Int4),
    ("host", Type::Text),
    ("port", Type::Int4),
    ("pool_size", Type::Int4),
];

/// SHOW PEER_POOLS.
pub const PEER_POOLS: &[(&str, Type)] = &[
    ("peer_id", Type::Int4),
    ("cl_active_cancel_req", Type::Int4),
    ("cl_waiting_cancel_req", Type::Int4),
    ("sv_active_cancel", Type::Int4),
    ("sv_login", Type::Int4),
];

/// SHOW DNS_HOSTS.
pub const DNS_HOSTS: &[(&str, Type)] = &[
    ("hostname", Type::Text),
    ("ttl", Type::Int8),
    ("addrs", Type::Text),
];

/// SHOW DNS_ZONES.
pub const DNS_ZONES: &[(&str, Type)] = &[
    ("zonename", Type::Text),
    ("serial", Type::Int8),
    ("count", Type::Int4),
];

/// `SHOW what` for the commands of this file; `None` if `what` is none of them.
pub fn show(pooler: &Pooler, what: &str) -> Option<Rows> {
    Some(match what {
        "POOLS" => pools(pooler),
        "CLIENTS" => clients(pooler),
        "SERVERS" => servers(pooler),
        "SOCKETS" => sockets(pooler, false),
        "ACTIVE_SOCKETS" => sockets(pooler, true),
        "DATABASES" => databases(pooler),
        "USERS" => users(pooler),
        "LISTS" => lists(pooler),
        "STATE" => state(pooler),
        // pgmux has no slab allocator, no fd passing, no peers and no DNS cache of its own:
        // PgBouncer's columns, no rows.
        "MEM" => Rows::new(MEM),
        "FDS" => Rows::new(FDS),
        "PEERS" => Rows::new(PEERS),
        "PEER_POOLS" => Rows::new(PEER_POOLS),
        "DNS_HOSTS" => Rows::new(DNS_HOSTS),
        "DNS_ZONES" => Rows::new(DNS_ZONES),
        "VERSION" => {
            let mut rows = Rows::new(&[("version", Type::Text)]);
            rows.rows
                .push(vec![text(format!("pgmux {}", env!("CARGO_PKG_VERSION")))]);
            rows
        }
        _ => return None,
    })
}

fn pools(pooler: &Pooler) -> Rows {
    let clients = pooler.clients_registry.counts();
    let mut rows = Rows::new(&[POOLS, POOLS_PGMUX].concat());
    for p in views::pools(pooler) {
        let key = (p.database.clone(), p.user.clone());
        let counts = clients.get(&key).copied().unwrap_or_default();
        let logged_in: u64 = counts.iter().sum();
        let waiting = counts
            .get(ClientState::Waiting as usize)
            .copied()
            .unwrap_or_default()
            .max(p.waiting as u64);
        let (maxwait, maxwait_us) = secs_and_micros(Duration::from_millis(p.oldest_wait_ms));
        rows.rows.push(vec![
            text(p.database),
            text(p.user),
            // PgBouncer's cl_active: linked to a server, or idle with nothing to run.
            int(logged_in.saturating_sub(waiting)),
            int(waiting),
            int(0),
            int(0),
            int(p.active),
            int(0),
            int(0),
            int(p.idle),
            int(0),
            int(0),
            int(p.connecting),
            maxwait,
            maxwait_us,
            text(p.mode),
            None,
            int(p.size),
            text(p.utilization_percent.to_string()),
            text(p.status),
            int(u8::from(p.paused)),
        ]);
    }
    rows
}

/// PgBouncer's `ptr` of a client or server: pgmux has no object addresses, so the kind
/// and id, which `link` then names too.
fn ptr(kind: &str, id: u64) -> String {
    format!("{kind}:{id}")
}

/// A client's PgBouncer columns; `state` overrides its state (SHOW SOCKETS' names).
fn client_row(c: &ClientJson, state: Option<&str>) -> Vec<Option<String>> {
    let waiting = c.state == ClientState::Waiting.as_str();
    let wait = Duration::from_millis(if waiting { c.state_ms } else { 0 });
    let (wait, wait_us) = secs_and_micros(wait);
    let (addr, port) = split_addr(&c.addr);
    let pgbouncer_state = if waiting {
        "waiting"
    } else if c.server.is_some() {
        "active"
    } else {
        "idle"
    };
    vec![
        text("C"),
        text(&c.user),
        text(&c.database),
        text("none"),
        text(state.unwrap_or(pgbouncer_state)),
        text(addr),
        text(port),
        text(""),
        int(0),
        text(timestamp_ago(Duration::from_millis(c.connected_ms))),
        text(timestamp_ago(Duration::from_millis(c.state_ms))),
        wait,
        wait_us,
        int(0),
        text(ptr("client", c.id)),
        text(
            c.server
                .as_ref()
                .map(|s| ptr("server", s.id))
                .unwrap_or_default(),
        ),
        int(0),
        text(c.tls.as_deref().unwrap_or_default()),
        text(&c.application_name),
        int(0),
        int(c.id),
    ]
}

/// A server's PgBouncer columns; `state` overrides its state (SHOW SOCKETS' names).
fn server_row(s: &ServerJson, close_needed: bool, state: Option<&str>) -> Vec<Option<String>> {
    let (addr, port) = split_addr(&s.upstream);
    let in_state = s.held_ms.or(s.idle_ms).unwrap_or(0);
    // A LISTEN/NOTIFY listener connection serves clients all the time: active.
    let pgbouncer_state = if s.state == "idle" { "idle" } else { "active" };
    vec![
        text("S"),
        text(&s.user),
        text(&s.database),
        text("none"),
        text(state.unwrap_or(pgbouncer_state)),
        text(addr),
        text(port),
        text(""),
        int(0),
        text(timestamp_ago(Duration::from_millis(s.age_ms))),
        text(timestamp_ago(Duration::from_millis(in_state))),
        int(0),
        int(0),
        int(u8::from(close_needed)),
        text(ptr("server", s.id)),
        text(
            s.client
                .as_ref()
                .map(|c| ptr("client", c.id))
                .unwrap_or_default(),
        ),
        int(s.pid),
        text(s.tls.as_deref().unwrap_or_default()),
        text(
            s.client
                .as_ref()
                .map(|c| c.application_name.as_str())
                .unwrap_or_default(),
        ),
        int(0),
        int(s.id),
    ]
}

/// The ids of every server marked to close when next idle.
fn close_needed(pooler: &Pooler) -> HashSet<u64> {
    pooler
        .pools()
        .iter()
        .flat_map(|p| p.close_needed())
        .collect()
}

fn clients(pooler: &Pooler) -> Rows {
    let mut rows = Rows::new(&[SOCKETS, CLIENTS_PGMUX].concat());
    for c in views::clients(pooler) {
        let mut row = client_row(&c, None);
        row.extend([
            text(c.state),
            int(c.state_ms),
            text(c.in_transaction.to_string()),
            c.query.clone(),
            c.session_state.as_ref().map(|e| {
                let now = if e.pinned { " (pinned)" } else { "" };
                format!("{} {}{now}", e.action, e.kinds.join(","))
            }),
            c.session_state.map(|e| e.statement),
            c.wait_cause.map(str::to_owned),
            c.wait_detail,
        ]);
        rows.rows.push(row);
    }
    rows
}

fn servers(pooler: &Pooler) -> Rows {
    let closing = close_needed(pooler);
    let mut rows = Rows::new(&[SOCKETS, SERVERS_PGMUX].concat());
    for s in views::servers(pooler) {
        let listener = s.state == "listener";
        let mut row = server_row(&s, closing.contains(&s.id), None);
        row.extend([
            s.held_ms.map(|ms| ms.to_string()),
            text(s.in_transaction.to_string()),
            s.query,
            text(if listener { "listener" } else { "pool" }),
        ]);
        rows.rows.push(row);
    }
    rows
}

/// SHOW SOCKETS (every client and server) or ACTIVE_SOCKETS (those with a transfer
/// under way: waiting clients and clients and servers linked to each other), with
/// PgBouncer's state names (`cl_active`, `sv_idle`...) and buffer columns at 0.
fn sockets(pooler: &Pooler, active_only: bool) -> Rows {
    let closing = close_needed(pooler);
    let mut rows = Rows::new(&[SOCKETS, SOCKETS_DEBUG].concat());
    let debug = || std::iter::repeat_n(int(0), SOCKETS_DEBUG.len());
    for c in views::clients(pooler) {
        let waiting = c.state == ClientState::Waiting.as_str();
        if active_only && !waiting && c.server.is_none() {
            continue;
        }
        let state = if waiting { "cl_waiting" } else { "cl_active" };
        let mut row = client_row(&c, Some(state));
        row.extend(debug());
        rows.rows.push(row);
    }
    for s in views::servers(pooler) {
        let idle = s.state == "idle";
        if active_only && idle {
            continue;
        }
        let state = if idle { "sv_idle" } else { "sv_active" };
        let mut row = server_row(&s, closing.contains(&s.id), Some(state));
        row.extend(debug());
        rows.rows.push(row);
    }
    rows
}

/// Clients logged in, per database and per user.
fn clients_by(pooler: &Pooler) -> (HashMap<String, u64>, HashMap<String, u64>) {
    let mut by_db: HashMap<String, u64> = HashMap::new();
    let mut by_user: HashMap<String, u64> = HashMap::new();
    for ((db, user), counts) in pooler.clients_registry.counts() {
        let n: u64 = counts.iter().sum();
        *by_db.entry(db).or_default() += n;
        *by_user.entry(user).or_default() += n;
    }
    (by_db, by_user)
}

/// Server connections open (and being opened), per database and per user.
fn servers_by(pooler: &Pooler) -> (HashMap<String, u64>, HashMap<String, u64>) {
    let mut by_db: HashMap<String, u64> = HashMap::new();
    let mut by_user: HashMap<String, u64> = HashMap::new();
    for p in pooler.pools() {
        let open = u64::from(p.counts().0);
        *by_db.entry(p.key.database.clone()).or_default() += open;
        *by_user.entry(p.key.user.clone()).or_default() += open;
    }
    (by_db, by_user)
}

fn databases(pooler: &Pooler) -> Rows {
    let snapshot = pooler.snapshot();
    let pools = pooler.pools();
    let (clients, _) = clients_by(pooler);
    let (servers, _) = servers_by(pooler);
    let mut rows = Rows::new(DATABASES);
    for (name, db) in &snapshot.config.databases {
        let mut settings = snapshot.config.pool.clone();
        settings.apply(&db.overrides);
        let mine: Vec<_> = pools.iter().filter(|p| p.key.database == *name).collect();
        let paused = !mine.is_empty() && mine.iter().all(|p| p.is_paused());
        let count = |m: &HashMap<String, u64>| m.get(name).copied().unwrap_or(0);
        rows.rows.push(vec![
            text(name),
            text(&db.host),
            int(db.port),
            text(db.upstream_dbname(name)),
            db.user.clone(),
            int(settings.size),
            int(settings.min_size),
            int(0),
            int(settings.max_lifetime.as_secs()),
            db.overrides.mode.map(|m| m.as_str().to_owned()),
            None,
            int(settings.limits.max_db_connections),
            int(count(&servers)),
            int(settings.limits.max_db_client_connections),
            int(count(&clients)),
            int(u8::from(paused)),
            int(u8::from(pooler.admission.is_disabled(name))),
        ]);
    }
    rows
}

fn users(pooler: &Pooler) -> Rows {
    let snapshot = pooler.snapshot();
    let (_, clients) = clients_by(pooler);
    let (_, servers) = servers_by(pooler);
    let limits = snapshot.config.pool.limits;
    let mut rows = Rows::new(USERS);
    for (name, user) in &snapshot.config.users {
        let count = |m: &HashMap<String, u64>| m.get(name).copied().unwrap_or(0);
        rows.rows.push(vec![
            text(name),
            user.size.map(|n| n.to_string()),
            None,
            user.mode.map(|m| m.as_str().to_owned()),
            int(user
                .max_user_connections
                .unwrap_or(limits.max_user_connections)),
            int(count(&servers)),
            int(user
                .max_user_client_connections
                .unwrap_or(limits.max_user_client_connections)),
            int(count(&clients)),
        ]);
    }
    rows
}

/// SHOW LISTS: one row per list, as PgBouncer.
fn lists(pooler: &Pooler) -> Rows {
    let snapshot = pooler.snapshot();
    let pools = pooler.pools();
    let servers: u64 = pools.iter().map(|p| u64::from(p.counts().0)).sum();
    let logged_in = pooler.clients_registry.len();
    let connections = pooler.clients.load(std::sync::atomic::Ordering::Relaxed);
    let items: [(&str, u64); 14] = [
        ("databases", snapshot.config.databases.len() as u64),
        ("users", snapshot.config.users.len() as u64),
        ("peers", 0),
        ("pools", pools.len() as u64),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", connections as u64),
        (
            "login_clients",
            connections.saturating_sub(logged_in) as u64,
        ),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    let mut rows = Rows::new(&[("list", Type::Text), ("items", Type::Int4)]);
    for (name, n) in items {
        rows.rows.push(vec![text(name), int(n)]);
    }
    rows
}

/// SHOW STATE: PgBouncer's three rows (paused: every pool is), then pgmux's.
fn state(pooler: &Pooler) -> Rows {
    let pools = pooler.pools();
    let paused = !pools.is_empty() && pools.iter().all(|p| p.is_paused());
    let yes = |b: bool| text(if b { "yes" } else { "no" });
    let mut rows = Rows::new(&[("key", Type::Text), ("value", Type::Text)]);
    rows.rows.push(vec![text("active"), yes(!paused)]);
    rows.rows.push(vec![text("paused"), yes(paused)]);
    rows.rows.push(vec![text("suspended"), yes(false)]);
    let draining = pooler.admission.is_draining() || pooler.stop.is_cancelled();
    rows.rows.push(vec![text("shutting_down"), yes(draining)]);
    rows
}
