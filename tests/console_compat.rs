//! The admin console against PgBouncer 1.25: every SHOW's columns (names, order, types),
//! what a stock exporter reads, and the commands operators script (KILL, KILL_CLIENT,
//! DISABLE/ENABLE, WAIT_CLOSE, SHUTDOWN, SET), end to end with the PostgreSQL the harness
//! starts.

mod common;

use std::time::Duration;

use common::raw::{Raw, error_fields, msg};
use common::{MuxOptions, TestPgmux, TestPostgres, eventually, run_psql, show_lookup as lookup};
use tokio_postgres::error::SqlState;

/// pgmux with `other` as its admin user and `opts`.
async fn start_with(pg: &TestPostgres, opts: MuxOptions) -> TestPgmux {
    let opts = MuxOptions {
        auth_extra: "admin_users = [\"other\"]".to_owned(),
        ..opts
    };
    TestPgmux::start(pg, opts).await
}

async fn start(pg: &TestPostgres) -> TestPgmux {
    start_with(pg, MuxOptions::default()).await
}

/// A column's type OID from PgBouncer's type letters (src/pktbuf.c,
/// `pktbuf_write_RowDescription`): `s` and `T` text, `i` int4, `q` int8, `N` numeric,
/// `b` bytea.
fn oid(letter: char) -> u32 {
    match letter {
        's' | 'T' => 25,
        'i' => 23,
        'q' => 20,
        'N' => 1700,
        'b' => 17,
        other => panic!("no PgBouncer type letter {other}"),
    }
}

/// PgBouncer 1.25's SHOW commands: the columns doc/usage.md lists for each (PgBouncer tag
/// pgbouncer_1_25_2, commit 515b6284d273bfd62d1b7e3931ccdce41f9bfe7b, "Admin console" >
/// "Show commands"), in the order PgBouncer sends them, and the type letters it declares
/// them with in src/admin.c and src/stats.c of the same tag. Where usage.md says less
/// than the wire, the comment says what was taken from the source.
const PGBOUNCER_SHOWS: &[(&str, &[&str], &str)] = &[
    // usage.md lists total_xact_count first; PgBouncer sends total_server_assignment_count
    // first (src/stats.c): the wire order is below, usage.md's set is checked separately.
    (
        "STATS",
        &[
            "database",
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
        ],
        "sNNNNNNNNNNNNNNNNNNNNNN",
    ),
    // usage.md: "Subset of SHOW STATS showing the total values"; the names are
    // src/stats.c's, without the total_ prefix.
    (
        "STATS_TOTALS",
        &[
            "database",
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
        ],
        "sNNNNNNNNNNN",
    ),
    // usage.md: "Subset of SHOW STATS showing the average values"; names from src/stats.c.
    (
        "STATS_AVERAGES",
        &[
            "database",
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
        ],
        "sNNNNNNNNNNN",
    ),
    // usage.md: "Like SHOW STATS but aggregated across all databases" (name, value rows).
    ("TOTALS", &["name", "value"], "sN"),
    (
        "SERVERS",
        &[
            "type",
            "user",
            "database",
            "replication",
            "state",
            "addr",
            "port",
            "local_addr",
            "local_port",
            "connect_time",
            "request_time",
            "wait",
            "wait_us",
            "close_needed",
            "ptr",
            "link",
            "remote_pid",
            "tls",
            "application_name",
            "prepared_statements",
            "id",
        ],
        "ssssssisiTTiiississii",
    ),
    (
        "CLIENTS",
        &[
            "type",
            "user",
            "database",
            "replication",
            "state",
            "addr",
            "port",
            "local_addr",
            "local_port",
            "connect_time",
            "request_time",
            "wait",
            "wait_us",
            "close_needed",
            "ptr",
            "link",
            "remote_pid",
            "tls",
            "application_name",
            "prepared_statements",
            "id",
        ],
        "ssssssisiTTiiississii",
    ),
    (
        "POOLS",
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "load_balance_hosts",
        ],
        "ssiiiiiiiiiiiiiss",
    ),
    (
        "PEER_POOLS",
        &[
            "peer_id",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active_cancel",
            "sv_login",
        ],
        "iiiii",
    ),
    // LISTS has rows, not columns (its rows are checked below).
    ("LISTS", &["list", "items"], "si"),
    (
        "USERS",
        &[
            "name",
            "pool_size",
            "reserve_pool_size",
            "pool_mode",
            "max_user_connections",
            "current_connections",
            "max_user_client_connections",
            "current_client_connections",
        ],
        "ssssiiii",
    ),
    (
        "DATABASES",
        &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool_size",
            "server_lifetime",
            "pool_mode",
            "load_balance_hosts",
            "max_connections",
            "current_connections",
            "max_client_connections",
            "current_client_connections",
            "paused",
            "disabled",
        ],
        "ssissiiiissiiiiii",
    ),
    ("PEERS", &["peer_id", "host", "port", "pool_size"], "isii"),
    (
        "FDS",
        &[
            "fd",
            "task",
            "user",
            "database",
            "addr",
            "port",
            "cancel",
            "link",
            "client_encoding",
            "std_strings",
            "datestyle",
            "timezone",
            "password",
            "scram_client_key",
            "scram_server_key",
        ],
        "issssiqisssssbb",
    ),
    // usage.md: "the information shown under SHOW CLIENTS and SHOW SERVERS as well as
    // other more low-level information"; the low-level columns are src/admin.c's.
    (
        "SOCKETS",
        &[
            "type",
            "user",
            "database",
            "replication",
            "state",
            "addr",
            "port",
            "local_addr",
            "local_port",
            "connect_time",
            "request_time",
            "wait",
            "wait_us",
            "close_needed",
            "ptr",
            "link",
            "remote_pid",
            "tls",
            "application_name",
            "prepared_statements",
            "id",
            "recv_pos",
            "pkt_pos",
            "pkt_remain",
            "send_pos",
            "send_remain",
            "pkt_avail",
            "send_avail",
        ],
        "ssssssisiTTiiississiiiiiiiii",
    ),
    ("CONFIG", &["key", "value", "default", "changeable"], "ssss"),
    // usage.md: "information presented is subject to change"; columns from src/admin.c.
    (
        "MEM",
        &["name", "size", "used", "free", "memtotal"],
        "siiii",
    ),
    ("DNS_HOSTS", &["hostname", "ttl", "addrs"], "sqs"),
    ("DNS_ZONES", &["zonename", "serial", "count"], "sqi"),
    ("VERSION", &["version"], "s"),
    // usage.md: "Current states are active, paused and suspended" (key, value rows).
    ("STATE", &["key", "value"], "ss"),
];

/// SHOW STATS' columns in usage.md's own order (it differs from the wire's, see above).
const STATS_IN_USAGE_MD: &[&str] = &[
    "database",
    "total_xact_count",
    "total_query_count",
    "total_server_assignment_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_client_parse_count",
    "total_server_parse_count",
    "total_bind_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_server_assignment_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
];

/// SHOW LISTS' rows: usage.md lists databases, users, pools, free_clients, used_clients,
/// login_clients, free_servers, used_servers, dns_names, dns_zones, dns_queries,
/// dns_pending; PgBouncer also sends peers and peer_pools (src/admin.c), in this order.
const LISTS_ROWS: &[&str] = &[
    "databases",
    "users",
    "peers",
    "pools",
    "peer_pools",
    "free_clients",
    "used_clients",
    "login_clients",
    "free_servers",
    "used_servers",
    "dns_names",
    "dns_zones",
    "dns_queries",
    "dns_pending",
];

/// One result set read off the wire: columns with their type OIDs, rows as text.
struct Result {
    columns: Vec<(String, u32)>,
    rows: Vec<Vec<Option<String>>>,
}

impl Result {
    fn names(&self) -> Vec<&str> {
        self.columns.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(n, _)| n == name)
    }
}

/// Runs `sql` (one command) on a raw console connection; panics on an ErrorResponse.
async fn raw_query(raw: &mut Raw, sql: &str) -> Result {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    raw.s.write_all(&msg(b'Q', &body)).await.unwrap();
    let mut result = Result {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for (tag, body) in raw.messages_until_ready().await {
        match tag {
            b'T' => result.columns = row_description(&body),
            b'D' => result.rows.push(data_row(&body)),
            b'E' => panic!("{sql}: {:?}", error_fields(&body)),
            _ => {}
        }
    }
    result
}

use tokio::io::AsyncWriteExt;

fn row_description(body: &[u8]) -> Vec<(String, u32)> {
    let n = u16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let end = at + body[at..].iter().position(|b| *b == 0).unwrap();
        let name = String::from_utf8(body[at..end].to_vec()).unwrap();
        at = end + 1 + 4 + 2; // table oid, column number
        let oid = u32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4 + 2 + 4 + 2; // type oid, length, modifier, format
        out.push((name, oid));
    }
    out
}

fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let n = u16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            let len = len as usize;
            out.push(Some(
                String::from_utf8(body[at..at + len].to_vec()).unwrap(),
            ));
            at += len;
        }
    }
    out
}

/// A console connection on a raw socket (pgmux must use `trust`).
async fn raw_console(mux: &TestPgmux) -> Raw {
    let (raw, greeting) =
        Raw::login_with(mux, 0, &[("user", "other"), ("database", "pgbouncer")]).await;
    assert!(
        greeting.iter().all(|(tag, _)| *tag != b'E'),
        "console login refused"
    );
    raw
}

/// pgmux on trust with a client of `app` holding a server and some traffic behind it.
async fn busy_trust_mux(pg: &TestPostgres) -> (TestPgmux, tokio_postgres::Client) {
    let mux = start_with(pg, MuxOptions::default().with_auth_method("trust")).await;
    let app = mux.connect("app", "app").await;
    for _ in 0..5 {
        app.simple_query("SELECT 1").await.unwrap();
    }
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    (mux, app)
}

#[tokio::test]
async fn every_show_has_pgbouncers_columns_in_order_with_its_types() {
    let pg = TestPostgres::shared().await;
    let (mux, app) = busy_trust_mux(pg).await;
    let mut console = raw_console(&mux).await;

    for (show, columns, types) in PGBOUNCER_SHOWS {
        assert_eq!(columns.len(), types.len(), "the table for SHOW {show}");
        let result = raw_query(&mut console, &format!("SHOW {show}")).await;
        let got = result.names();
        assert!(
            got.len() >= columns.len(),
            "SHOW {show}: {got:?} lacks PgBouncer's {columns:?}"
        );
        // PgBouncer's columns first, in its order; pgmux's own may follow.
        assert_eq!(&got[..columns.len()], *columns, "SHOW {show}");
        for ((name, got_oid), letter) in result.columns.iter().zip(types.chars()) {
            assert_eq!(*got_oid, oid(letter), "SHOW {show}: type of {name}");
        }
        for row in &result.rows {
            assert_eq!(row.len(), got.len(), "SHOW {show}: a row's width");
        }
    }

    // SHOW STATS has usage.md's columns, whatever the order usage.md wrote them in.
    let stats = raw_query(&mut console, "SHOW STATS").await;
    let mut wire: Vec<&str> = stats.names();
    let mut usage: Vec<&str> = STATS_IN_USAGE_MD.to_vec();
    wire.sort_unstable();
    usage.sort_unstable();
    assert_eq!(wire, usage);

    // SHOW LISTS' rows, all of PgBouncer's in its order, each a count.
    let lists = raw_query(&mut console, "SHOW LISTS").await;
    let names: Vec<&str> = lists
        .rows
        .iter()
        .map(|r| r[0].as_deref().unwrap())
        .collect();
    assert_eq!(names, LISTS_ROWS);

    // SHOW STATE: PgBouncer's three rows first.
    let state = raw_query(&mut console, "SHOW STATE").await;
    let keys: Vec<&str> = state
        .rows
        .iter()
        .map(|r| r[0].as_deref().unwrap())
        .collect();
    assert_eq!(&keys[..3], ["active", "paused", "suspended"]);
    app.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn values_are_in_pgbouncers_units() {
    let pg = TestPostgres::shared().await;
    let (mux, app) = busy_trust_mux(pg).await;
    tokio::time::sleep(Duration::from_millis(20)).await; // the transaction holds a while
    app.batch_execute("COMMIT").await.unwrap();
    let mut console = raw_console(&mux).await;

    let stats = raw_query(&mut console, "SHOW STATS").await;
    let row = stats
        .rows
        .iter()
        .find(|r| r[0].as_deref() == Some("app"))
        .expect("a row for app");
    let get = |name: &str| -> u64 {
        let i = stats.column(name).unwrap();
        row[i].as_deref().unwrap().parse().unwrap()
    };
    assert!(
        get("total_xact_count") >= 6,
        "5 SELECTs and one BEGIN..COMMIT"
    );
    assert!(get("total_query_count") >= 6);
    assert!(get("total_server_assignment_count") >= 6);
    // Microseconds: the transaction alone held its server for 20 ms.
    assert!(
        get("total_xact_time") >= 20_000,
        "{}",
        get("total_xact_time")
    );
    // Averages over the stats period: per transaction, in microseconds.
    assert!(get("avg_xact_time") > 0);
    assert!(get("total_received") > 0 && get("total_sent") > 0);

    let totals = raw_query(&mut console, "SHOW STATS_TOTALS").await;
    let i = totals.column("xact_count").unwrap();
    let app_totals = totals
        .rows
        .iter()
        .find(|r| r[0].as_deref() == Some("app"))
        .unwrap();
    assert_eq!(
        app_totals[i].as_deref().unwrap().parse::<u64>().unwrap(),
        get("total_xact_count")
    );

    // Timestamps as PgBouncer writes them.
    let clients = raw_query(&mut console, "SHOW CLIENTS").await;
    let at = clients.column("connect_time").unwrap();
    let t = clients.rows[0][at].as_deref().unwrap();
    assert!(
        t.ends_with(" UTC") && t.len() == "2026-01-01 00:00:00 UTC".len(),
        "{t}"
    );
    let state = clients.column("state").unwrap();
    assert_eq!(clients.rows[0][state].as_deref(), Some("idle"));
}

/// prometheus-community/pgbouncer_exporter v0.12.1 (commit 6918f4e7, collector.go): the
/// queries it runs, in the order it runs them, and the columns it reads from each.
#[tokio::test]
async fn pgbouncer_exporter_reads_everything_it_needs() {
    let pg = TestPostgres::shared().await;
    let (mux, app) = busy_trust_mux(pg).await;
    let mut console = raw_console(&mux).await;

    // getDB pings with this.
    raw_query(&mut console, "SHOW STATS").await;

    // queryVersion: exactly one column, "version".
    let version = raw_query(&mut console, "SHOW VERSION;").await;
    assert_eq!(version.names(), ["version"]);
    assert_eq!(version.rows.len(), 1);

    // queryShowLists: (list, items) rows; items parsed with strconv.ParseFloat.
    let lists = raw_query(&mut console, "SHOW LISTS;").await;
    assert_eq!(lists.names(), ["list", "items"]);
    for row in &lists.rows {
        let items = row[1].as_deref().unwrap();
        items.parse::<f64>().unwrap_or_else(|_| panic!("{row:?}"));
    }

    // queryShowConfig: 3 or 4 columns; the values of max_client_conn and
    // max_user_connections parsed with strconv.ParseFloat.
    let config = raw_query(&mut console, "SHOW CONFIG;").await;
    assert_eq!(config.names(), ["key", "value", "default", "changeable"]);
    for key in ["max_client_conn", "max_user_connections"] {
        let row = config
            .rows
            .iter()
            .find(|r| r[0].as_deref() == Some(key))
            .unwrap_or_else(|| panic!("SHOW CONFIG has no {key}"));
        row[1].as_deref().unwrap().parse::<f64>().unwrap();
    }

    // queryShowClients: database, user, state required; application_name optional.
    let clients = raw_query(&mut console, "SHOW CLIENTS;").await;
    for column in ["database", "user", "state", "application_name"] {
        assert!(
            clients.column(column).is_some(),
            "SHOW CLIENTS lacks {column}"
        );
    }
    assert!(!clients.rows.is_empty());

    // queryNamespaceMappings: `SHOW <namespace>;` and the metricMaps columns. Labels are
    // read as text; gauges and counters with dbToFloat64 (int64, float64, or text that
    // strconv.ParseFloat takes; NULL is NaN). Columns PgBouncer 1.25 no longer has
    // (databases.reserve_pool, stats_totals.requests) are left out, as by the exporter.
    let namespaces: &[(&str, &[&str], &[&str])] = &[
        (
            "databases",
            &[
                "name",
                "host",
                "port",
                "database",
                "force_user",
                "pool_mode",
            ],
            &[
                "pool_size",
                "reserve_pool_size",
                "max_connections",
                "current_connections",
                "paused",
                "disabled",
            ],
        ),
        (
            "stats_totals",
            &["database"],
            &[
                "query_count",
                "query_time",
                "bytes_received",
                "bytes_sent",
                "wait_time",
                "xact_count",
                "xact_time",
                "client_parse_count",
                "server_parse_count",
                "bind_count",
                "server_assignment_count",
            ],
        ),
        (
            "pools",
            &["database", "user"],
            &[
                "cl_active",
                "cl_active_cancel_req",
                "cl_waiting",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
            ],
        ),
    ];
    for (namespace, labels, numbers) in namespaces {
        let result = raw_query(&mut console, &format!("SHOW {namespace};")).await;
        assert!(!result.rows.is_empty(), "SHOW {namespace} has no rows");
        for label in *labels {
            let i = result
                .column(label)
                .unwrap_or_else(|| panic!("SHOW {namespace} lacks {label}"));
            let oid = result.columns[i].1;
            assert!(
                oid == 25 || oid == 23,
                "SHOW {namespace}.{label}: type {oid}"
            );
        }
        for number in *numbers {
            let i = result
                .column(number)
                .unwrap_or_else(|| panic!("SHOW {namespace} lacks {number}"));
            let oid = result.columns[i].1;
            assert!(
                [20, 23, 1700].contains(&oid),
                "SHOW {namespace}.{number}: type {oid} is no number"
            );
            for row in &result.rows {
                if let Some(v) = &row[i] {
                    v.parse::<f64>()
                        .unwrap_or_else(|_| panic!("SHOW {namespace}.{number} = {v:?}"));
                }
            }
        }
    }
    app.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn kill_ends_every_session_of_the_database_until_resume() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let idle = mux.connect("app", "app").await;
    idle.simple_query("SELECT 1").await.unwrap();
    let in_tx = mux.connect("app", "app").await;
    in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let console = mux.connect("pgbouncer", "other").await;

    console.simple_query("KILL app").await.unwrap();
    for client in [&idle, &in_tx] {
        let err = client.simple_query("SELECT 1").await.unwrap_err();
        assert!(
            err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
            "{err}"
        );
    }
    // Its servers are closed: the backend of the open transaction is gone too.
    let no_servers = eventually(Duration::from_secs(5), || async {
        lookup(&console, "SERVERS", ("database", "app"), "id")
            .await
            .is_none()
    })
    .await;
    assert!(no_servers, "servers of app left after KILL");
    assert_eq!(
        lookup(&console, "DATABASES", ("name", "app"), "paused")
            .await
            .as_deref(),
        Some("1")
    );

    // A new client waits until RESUME.
    let late = mux.connect("app", "app").await;
    let held = tokio::spawn(async move { late.simple_query("SELECT 1").await.map(|_| late) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "served while killed");
    console.simple_query("RESUME app").await.unwrap();
    held.await.unwrap().expect("served after RESUME");

    let err = console.simple_query("KILL nosuchdb").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
}

#[tokio::test]
async fn kill_client_ends_that_client_only() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let victim = mux.connect("app", "app").await;
    victim
        .batch_execute("SET application_name = 'victim'")
        .await
        .unwrap();
    let bystander = mux.connect("app", "app").await;
    bystander.simple_query("SELECT 1").await.unwrap();
    let console = mux.connect("pgbouncer", "other").await;

    let id = lookup(&console, "CLIENTS", ("application_name", "victim"), "id")
        .await
        .expect("the victim in SHOW CLIENTS");
    console
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let err = victim.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "{err}"
    );
    if let Some(db) = err.as_db_error() {
        // Told why, not that pgmux is shutting down.
        assert!(db.message().contains("administrator command"), "{db:?}");
    }
    bystander.simple_query("SELECT 1").await.unwrap();
    let gone = eventually(Duration::from_secs(5), || async {
        lookup(&console, "CLIENTS", ("id", &id), "id")
            .await
            .is_none()
    })
    .await;
    assert!(gone, "client {id} still listed");

    for bad in ["KILL_CLIENT 999999", "KILL_CLIENT x"] {
        let err = console.simple_query(bad).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::UNDEFINED_OBJECT),
            "{bad}: {err}"
        );
    }
}

/// KILL_CLIENT reaches a client while it waits for a server (here: its pool paused), not
/// only between transactions.
#[tokio::test]
async fn kill_client_ends_a_client_waiting_for_a_server() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let console = mux.connect("pgbouncer", "other").await;
    let waiter = mux.connect("app", "app").await;
    waiter
        .batch_execute("SET application_name = 'waiter'")
        .await
        .unwrap();
    console.simple_query("PAUSE app").await.unwrap();
    let held = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    let waiting = eventually(Duration::from_secs(5), || async {
        lookup(&console, "CLIENTS", ("application_name", "waiter"), "state")
            .await
            .as_deref()
            == Some("waiting")
    })
    .await;
    assert!(waiting, "the client never waited for a server");
    let id = lookup(&console, "CLIENTS", ("application_name", "waiter"), "id")
        .await
        .expect("the waiter in SHOW CLIENTS");
    console
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("KILL_CLIENT did not end the wait")
        .unwrap()
        .expect_err("served while paused and killed");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse before the close");
    assert_eq!(db.code(), &SqlState::ADMIN_SHUTDOWN, "{db:?}");
    assert!(db.message().contains("administrator command"), "{db:?}");
    console.simple_query("RESUME app").await.unwrap();
}

#[tokio::test]
async fn disable_refuses_new_clients_and_enable_lets_them_in() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let before = mux.connect("app", "app").await;
    let console = mux.connect("pgbouncer", "other").await;

    console.simple_query("DISABLE app").await.unwrap();
    let err = mux
        .try_connect("app", "app", common::password_for("app"))
        .await
        .expect_err("app is disabled");
    assert_eq!(
        err.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{err}"
    );
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(
        message.contains("does not allow connections: app"),
        "{err:?}"
    );
    // Clients already in keep working.
    before.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        lookup(&console, "DATABASES", ("name", "app"), "disabled")
            .await
            .as_deref(),
        Some("1")
    );

    console.simple_query("ENABLE app").await.unwrap();
    mux.still_serving().await;
    assert_eq!(
        lookup(&console, "DATABASES", ("name", "app"), "disabled")
            .await
            .as_deref(),
        Some("0")
    );
    let err = console.simple_query("DISABLE").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");
}

#[tokio::test]
async fn wait_close_returns_once_reconnected_servers_are_closed() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    app.batch_execute("BEGIN").await.unwrap();
    let pid_before: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let console = mux.connect("pgbouncer", "other").await;

    console.simple_query("RECONNECT app").await.unwrap();
    assert_eq!(
        lookup(&console, "SERVERS", ("database", "app"), "close_needed")
            .await
            .as_deref(),
        Some("1")
    );
    let waiter = mux.connect("pgmux", "other").await;
    let waiting = tokio::spawn(async move { waiter.simple_query("WAIT_CLOSE app").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "WAIT_CLOSE returned with the server still open"
    );

    app.batch_execute("COMMIT").await.unwrap(); // given back, and closed
    waiting.await.unwrap().expect("WAIT_CLOSE answers");
    let pid_after: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid_before, pid_after, "a new server after RECONNECT");
    // Nothing marked: it returns at once.
    console.simple_query("WAIT_CLOSE").await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_the_process() {
    let pg = TestPostgres::shared().await;
    let mut mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let console = mux.connect("pgbouncer", "other").await;
    // The console may be closed before its answer is read: either is fine.
    let _ = console.simple_query("SHUTDOWN").await;
    assert!(
        mux.wait_exit(Duration::from_secs(10)).await,
        "pgmux still runs"
    );
    assert!(app.simple_query("SELECT 1").await.is_err());
}

#[tokio::test]
async fn shutdown_wait_for_servers_lets_the_transaction_finish() {
    let pg = TestPostgres::shared().await;
    // The harness' config gives transactions shutdown_timeout = 30s to finish.
    let mut mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let console = mux.connect("pgbouncer", "other").await;
    let _ = console.simple_query("SHUTDOWN WAIT_FOR_SERVERS").await;
    // The transaction runs to its end.
    app.simple_query("SELECT 2").await.unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    assert!(
        mux.wait_exit(Duration::from_secs(10)).await,
        "pgmux still runs"
    );
}

#[tokio::test]
async fn shutdown_wait_for_clients_waits_for_the_last_client() {
    let pg = TestPostgres::shared().await;
    let mut mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    let console = mux.connect("pgbouncer", "other").await;
    console
        .simple_query("SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .unwrap();

    // New logins are refused; the client already in goes on, across transactions.
    let err = mux
        .try_connect("app", "app", common::password_for("app"))
        .await
        .expect_err("no new logins while draining");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    for _ in 0..3 {
        app.simple_query("SELECT 1").await.unwrap();
    }
    assert!(
        !mux.wait_exit(Duration::from_millis(300)).await,
        "exited with a client in"
    );
    assert_eq!(
        lookup(&console, "STATE", ("key", "shutting_down"), "value")
            .await
            .as_deref(),
        Some("yes")
    );

    drop(app);
    assert!(
        mux.wait_exit(Duration::from_secs(10)).await,
        "pgmux still runs"
    );
}

#[tokio::test]
async fn set_changes_behaviour_live_and_refuses_bad_values() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let console = mux.connect("pgbouncer", "other").await;
    let holder = mux.connect("app", "app").await;
    let waiter = mux.connect("app", "app").await;

    // PgBouncer's names and units, and pgmux's own.
    console
        .simple_query("SET default_pool_size = 1")
        .await
        .unwrap();
    console
        .simple_query("SET pool.wait_timeout = '300ms'")
        .await
        .unwrap();
    assert_eq!(
        lookup(&console, "CONFIG", ("key", "default_pool_size"), "value")
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        lookup(&console, "CONFIG", ("key", "query_wait_timeout"), "value")
            .await
            .as_deref(),
        Some("0.3")
    );
    assert_eq!(
        lookup(&console, "CONFIG", ("key", "pool.size"), "changeable")
            .await
            .as_deref(),
        Some("yes")
    );

    // One server now, and a short wait: the second client is refused with 53300.
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    waiter.simple_query("SELECT 1").await.unwrap();

    // Refused values change nothing.
    let refused = [
        (
            "SET default_pool_size = 0",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        ("SET pool.min_size = 5", SqlState::INVALID_PARAMETER_VALUE),
        (
            "SET pool_mode = sometimes",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
        (
            "SET server.listen = '0.0.0.0:1'",
            SqlState::CANT_CHANGE_RUNTIME_PARAM,
        ),
        ("SET no_such_thing = 1", SqlState::UNDEFINED_OBJECT),
    ];
    for (sql, code) in refused {
        let err = console.simple_query(sql).await.unwrap_err();
        assert_eq!(err.code(), Some(&code), "{sql}: {err}");
    }
    assert_eq!(
        lookup(&console, "CONFIG", ("key", "pool.size"), "value")
            .await
            .as_deref(),
        Some("1")
    );
    assert!(mux.stderr_log().contains("SET on the admin console"));
}

#[tokio::test]
async fn psql_drives_the_new_commands() {
    let pg = TestPostgres::shared().await;
    let mux = start(pg).await;
    let app = mux.connect("app", "app").await;
    app.simple_query("SELECT 1").await.unwrap();
    let (ok, out, err) = run_psql(
        pg.bin_dir(),
        &mux.url("pgbouncer", "other"),
        "SHOW STATS_TOTALS;\nSHOW STATS_AVERAGES;\nSHOW TOTALS;\nSHOW STATE;\nSHOW MEM;\n\
         SHOW SOCKETS;\nSET server_reset_query = 'DISCARD ALL; SELECT 1';\nSHOW CONFIG;\n\
         DISABLE app;\nENABLE app;\nRECONNECT app;\nWAIT_CLOSE app;\nSHOW HELP;\n",
    );
    assert!(ok, "psql failed: {err}\n{out}");
    assert!(out.contains("xact_count"), "{out}");
    assert!(out.contains("suspended"), "{out}");
    assert!(out.contains("DISCARD ALL; SELECT 1"), "{out}");
}
