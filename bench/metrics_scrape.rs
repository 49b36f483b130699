//! How long a `/metrics` scrape (and the JSON views) take with many pools and clients.
//!
//!   cargo run --release --example metrics_scrape -- [POOLS] [CLIENTS] [SCRAPES]
//!
//! Builds a pooler in-process with POOLS pools (default 100, one database each) and
//! CLIENTS registered clients (default 5000) spread over them in every state, with every
//! counter and histogram non-zero so that each series is written; then renders `/metrics`
//! SCRAPES times (default 200) and prints the time per scrape, its size and series count,
//! and the time of `/pools`, `/clients` and `/servers`. No PostgreSQL is needed: a scrape
//! reads pgmux's own state, never the upstream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgmux::admin::metrics::Metrics;
use pgmux::admin::views;
use pgmux::clients::ClientState;
use pgmux::config::Config;
use pgmux::pooler::Pooler;

#[tokio::main]
async fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let pools = args.next().unwrap_or(100);
    let clients = args.next().unwrap_or(5000);
    let scrapes = args.next().unwrap_or(200);

    let mut text = String::from("[pool]\nsize = 20\n");
    for i in 0..pools {
        text.push_str(&format!(
            "[databases.db{i}]\nhost = \"127.0.0.1\"\nport = 5432\ndbname = \"app\"\n"
        ));
    }
    text.push_str("[users.app]\npassword = \"bench\"\n");
    let config = Config::parse(&text, "bench").expect("a valid config");
    let pooler = Pooler::new(config).expect("a pooler");

    for i in 0..pools {
        let pool = pooler.pool(&format!("db{i}"), "app").expect("a pool");
        let s = &pool.stats;
        for n in 0..100u64 {
            s.query();
            s.bytes_from_client(100);
            s.bytes_to_client(1000);
            s.prepared_hit();
            s.wait.observe(Duration::from_micros(50 * n));
            s.hold.observe(Duration::from_micros(300 * n));
            s.transaction.observe(Duration::from_micros(400 * n));
        }
        s.server_error(b"42P01");
        s.server_error(b"23505");
    }
    let addr: SocketAddr = "127.0.0.1:40000".parse().expect("an address");
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let h = pooler.clients_registry.register(
                addr,
                &format!("db{}", c % pools),
                "app",
                "bench",
                None,
            );
            h.set_state(ClientState::ALL[c % 4]);
            h.set_query(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1");
            h
        })
        .collect();

    let metrics = Metrics::new(&pooler);
    let body = metrics.render();
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let mut times = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let started = Instant::now();
        let body = metrics.render();
        times.push(started.elapsed());
        std::hint::black_box(body);
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / scrapes as u32;
    println!(
        "/metrics with {pools} pools and {} clients: {} bytes, {series} series",
        handles.len(),
        body.len()
    );
    println!(
        "  per scrape over {scrapes}: mean {mean:?}, p50 {:?}, p99 {:?}, max {:?}",
        times[scrapes / 2],
        times[scrapes * 99 / 100],
        times[scrapes - 1]
    );
    for (name, run) in [
        (
            "/pools",
            &(|| serde_json::to_string(&views::pools(&pooler)).map(|s| s.len()))
                as &dyn Fn() -> serde_json::Result<usize>,
        ),
        ("/clients", &|| {
            serde_json::to_string(&views::clients(&pooler)).map(|s| s.len())
        }),
        ("/servers", &|| {
            serde_json::to_string(&views::servers(&pooler)).map(|s| s.len())
        }),
    ] {
        let started = Instant::now();
        let mut size = 0;
        for _ in 0..20 {
            size = run().expect("JSON");
        }
        println!(
            "  {name}: {:?} per request, {size} bytes",
            started.elapsed() / 20
        );
    }
}
