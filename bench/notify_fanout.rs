//! LISTEN/NOTIFY fan-out bench (issue 12): many listening clients, one sender at a fixed
//! rate, the delivery latency of every notification each listener receives.
//!
//!   cargo run --release --example notify_fanout -- --port 6432 --user bench --dbname bench \
//!       --listeners 1000 --channels 1 --rate 200 --seconds 20 --pooler-pid PID --pg-pid PID
//!
//! Opens LISTENERS connections (tokio-postgres, a multi-thread runtime), each `LISTEN`ing
//! to one of CHANNELS channels (`bench_0` .. ; listener i takes channel i % CHANNELS), then
//! from its own thread and connection sends RATE x SECONDS `NOTIFY bench_c, 'seq t'` (the
//! notification seq goes to channel seq % CHANNELS) on a fixed schedule, one after the other;
//! `t` is the time the NOTIFY was written, in nanoseconds of this process's monotonic clock.
//! A listener takes the time each notification reaches it (when tokio-postgres hands it
//! over): the difference is its delivery latency, which includes the sender's NOTIFY
//! through the target, PostgreSQL's commit and signal, the target's fan-out and this
//! process's own scheduling. Every listener must get every notification of its channel,
//! once, in order.
//!
//! Around the sending (from the first NOTIFY to the last delivery) it reads the CPU time of
//! the pooler (`--pooler-pid`, utime + stime of every thread), of PostgreSQL (`--pg-pid`,
//! the postmaster: it and all its children) and of itself (getrusage), and it samples the
//! pooler's RSS. Prints one JSON object on stdout, a summary on stderr; exits 1 when a
//! notification was lost, duplicated or out of order, or a connection failed.

// serde_json::json! of about 50 fields.
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    user: String,
    #[arg(long, env = "PGPASSWORD", default_value = "")]
    password: String,
    #[arg(long)]
    dbname: String,
    /// Listening connections.
    #[arg(long, default_value_t = 1000)]
    listeners: usize,
    /// Channels; listener i LISTENs to channel i % CHANNELS.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// NOTIFYs per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Seconds to wait after the last NOTIFY for the last deliveries.
    #[arg(long, default_value_t = 15)]
    drain: u64,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// The pooler's process id: its CPU time and RSS.
    #[arg(long)]
    pooler_pid: Option<u32>,
    /// PostgreSQL's postmaster process id: the CPU time and memory of it and its children.
    #[arg(long)]
    pg_pid: Option<u32>,
    /// Worker threads of the listeners' runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// This process's clock: payload times are nanoseconds since this instant.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What one listener saw.
#[derive(Default)]
struct Heard {
    received: u64,
    /// Notifications of its channel that it should receive.
    expected: u64,
    out_of_order: u64,
    foreign: u64,
    latencies_ns: Vec<u64>,
    error: Option<String>,
}

/// Shared by the listeners: deliveries so far, and per notification the latest arrival.
struct Tally {
    delivered: AtomicU64,
    slowest_ns: Vec<AtomicU64>,
}

fn main() {
    let args = Args::parse();
    now_ns();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let ok = runtime.block_on(run(args));
    std::process::exit(if ok { 0 } else { 1 });
}

fn conninfo(a: &Args, app: &str) -> String {
    format!(
        "host={} port={} user={} password={} dbname={} application_name={app}",
        a.host, a.port, a.user, a.password, a.dbname
    )
}

async fn run(args: Args) -> bool {
    let total = u64::from(args.rate) * u64::from(args.seconds);
    let channels = args.channels.max(1);
    let tally = Arc::new(Tally {
        delivered: AtomicU64::new(0),
        slowest_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
    });
    // Notification k goes to channel k % channels.
    let expected_per_channel =
        move |c: usize| total / channels as u64 + u64::from((c as u64) < total % channels as u64);
    let expected: u64 = (0..args.listeners)
        .map(|i| expected_per_channel(i % channels))
        .sum();

    let pooler_rss_before = args.pooler_pid.and_then(rss_kib);
    let pg_pss_before = args.pg_pid.map(pg_pss_kib);

    // The listeners: logged in and LISTENing, each connection driven by its own task.
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let login_started = Instant::now();
    let mut logins = tokio::task::JoinSet::new();
    for i in 0..args.listeners {
        let info = conninfo(&args, "bench-listen");
        let gate = gate.clone();
        let stop = stop.clone();
        let tally = tally.clone();
        let expected = expected_per_channel(i % channels);
        logins.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("the gate stays open");
            let (client, mut conn) = tokio_postgres::connect(&info, NoTls)
                .await
                .map_err(|e| format!("login: {e}"))?;
            let channel = format!("bench_{}", i % channels);
            let mine = channel.clone();
            let listener = tokio::spawn(async move {
                let mut heard = Heard {
                    expected,
                    ..Heard::default()
                };
                let mut last_seq: Option<u64> = None;
                let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                loop {
                    let message = tokio::select! {
                        _ = stop.cancelled() => break,
                        m = messages.next() => m,
                    };
                    match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            let at = now_ns();
                            let mut parts = n.payload().split(' ');
                            let seq = parts.next().and_then(|s| s.parse::<u64>().ok());
                            let sent = parts.next().and_then(|s| s.parse::<u64>().ok());
                            let (Some(seq), Some(sent)) = (seq, sent) else {
                                heard.foreign += 1;
                                continue;
                            };
                            if n.channel() != mine {
                                heard.foreign += 1;
                                continue;
                            }
                            if last_seq.is_some_and(|l| seq <= l) {
                                heard.out_of_order += 1;
                            }
                            last_seq = Some(seq);
                            heard.received += 1;
                            let latency = at.saturating_sub(sent);
                            heard.latencies_ns.push(latency);
                            if let Some(slot) = tally.slowest_ns.get(seq as usize) {
                                slot.fetch_max(latency, Relaxed);
                            }
                            tally.delivered.fetch_add(1, Relaxed);
                        }
                        Some(Ok(_)) => {} // notices
                        Some(Err(e)) => {
                            heard.error = Some(e.to_string());
                            break;
                        }
                        None => {
                            heard.error = Some("the connection closed".into());
                            break;
                        }
                    }
                }
                heard
            });
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .map_err(|e| format!("LISTEN: {e}"))?;
            Ok::<_, String>((client, listener))
        });
    }
    let mut clients = Vec::with_capacity(args.listeners);
    let mut listeners = Vec::with_capacity(args.listeners);
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = logins.join_next().await {
        match done.expect("a login task does not panic") {
            Ok((client, listener)) => {
                clients.push(client);
                listeners.push(listener);
            }
            Err(e) => *failures.entry(e).or_default() += 1,
        }
    }
    let login_s = login_started.elapsed().as_secs_f64();
    eprintln!(
        "notify_fanout: {} of {} listeners LISTENing after {login_s:.2}s",
        listeners.len(),
        args.listeners
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pooler_rss_idle = args.pooler_pid.and_then(rss_kib);
    let pg_pss_idle = args.pg_pid.map(pg_pss_kib);

    // The pooler's peak RSS while notifications flow.
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(pooler_rss_idle.unwrap_or(0)));
    let sampler = args.pooler_pid.map(|pid| {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        std::thread::spawn(move || {
            while sampling.load(Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    peak.fetch_max(kib, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });

    // The sender, on its own thread and runtime, so that the listeners' work does not
    // delay its schedule.
    let info = conninfo(&args, "bench-notify");
    let (rate, seconds) = (args.rate, args.seconds);
    let cpu0 = Cpu::read(&args);
    let sender = std::thread::spawn(move || send(&info, rate, seconds, channels));
    let sent = sender.join().expect("the sender does not panic");
    let sent_done = Instant::now();
    let drain_limit = Duration::from_secs(args.drain);
    while tally.delivered.load(Relaxed) < expected && sent_done.elapsed() < drain_limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu1 = Cpu::read(&args);
    let drained_s = sent_done.elapsed().as_secs_f64();
    sampling.store(false, Relaxed);
    if let Some(s) = sampler {
        s.join().expect("the sampler does not panic");
    }
    stop.cancel();

    let mut all: Vec<u64> = Vec::with_capacity(expected as usize);
    let (mut received, mut out_of_order, mut foreign, mut short) = (0u64, 0u64, 0u64, 0usize);
    for listener in listeners {
        let mut heard = listener.await.expect("a listener does not panic");
        received += heard.received;
        out_of_order += heard.out_of_order;
        foreign += heard.foreign;
        if heard.received != heard.expected {
            short += 1;
        }
        if let Some(e) = heard.error.take() {
            *failures.entry(format!("listener: {e}")).or_default() += 1;
        }
        all.append(&mut heard.latencies_ns);
    }
    drop(clients);
    all.sort_unstable();
    let mut rtts = sent.rtts_ns.clone();
    rtts.sort_unstable();
    let mut slowest: Vec<u64> = tally
        .slowest_ns
        .iter()
        .map(|a| a.load(Relaxed))
        .filter(|v| *v > 0)
        .collect();
    // Per second of sending: the worst "every listener has it" time, to see a backlog
    // build up and drain.
    let per_second: Vec<f64> = tally
        .slowest_ns
        .chunks(args.rate.max(1) as usize)
        .map(|c| c.iter().map(|a| a.load(Relaxed)).max().unwrap_or(0) as f64 / 1e6)
        .collect();
    slowest.sort_unstable();

    let window_s = (sent.elapsed_s + drained_s).max(1e-9);
    let pooler_cpu_s = match (cpu0.pooler_ticks, cpu1.pooler_ticks) {
        (Some(a), Some(b)) => Some((b - a) as f64 / cpu0.clk_tck),
        _ => None,
    };
    let pg_cpu_s = match (cpu0.pg_ticks, cpu1.pg_ticks) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / cpu0.clk_tck),
        _ => None,
    };
    let client_cpu_s = cpu1.self_s - cpu0.self_s;
    let per_notification_us = |cpu: Option<f64>| cpu.map(|c| c * 1e6 / (received.max(1) as f64));
    let ms = |ns: Option<u64>| ns.map(|v| v as f64 / 1e6);
    let result = serde_json::json!({
        "listeners": args.listeners,
        "listening": logged_in(&failures, args.listeners),
        "channels": channels,
        "rate": args.rate,
        "seconds": args.seconds,
        "login_s": login_s,
        "notifies_sent": sent.sent,
        "notify_errors": sent.errors,
        "send_s": sent.elapsed_s,
        "send_rate_achieved": sent.sent as f64 / sent.elapsed_s.max(1e-9),
        "notify_rtt_ms_p50": ms(pct(&rtts, 50.0)),
        "notify_rtt_ms_p99": ms(pct(&rtts, 99.0)),
        "notify_rtt_ms_max": ms(rtts.last().copied()),
        "send_late_ms_max": sent.late_ns_max as f64 / 1e6,
        "drain_s": drained_s,
        "expected": expected,
        "delivered": received,
        // Listeners that did not get exactly their channel's notifications.
        "listeners_short": short,
        "out_of_order": out_of_order,
        "foreign": foreign,
        "latency_ms_p50": ms(pct(&all, 50.0)),
        "latency_ms_p90": ms(pct(&all, 90.0)),
        "latency_ms_p99": ms(pct(&all, 99.0)),
        "latency_ms_p999": ms(pct(&all, 99.9)),
        "latency_ms_max": ms(all.last().copied()),
        "all_listeners_ms_p50": ms(pct(&slowest, 50.0)),
        "all_listeners_ms_p99": ms(pct(&slowest, 99.0)),
        "all_listeners_ms_max_per_second": per_second,
        "window_s": window_s,
        "pooler_cpu_s": pooler_cpu_s,
        "pooler_cpu_us_per_notification": per_notification_us(pooler_cpu_s),
        "pooler_cpu_share": pooler_cpu_s.map(|c| c / window_s),
        "pg_cpu_s": pg_cpu_s,
        "pg_cpu_us_per_notification": per_notification_us(pg_cpu_s),
        "client_cpu_s": client_cpu_s,
        "client_cpu_us_per_notification": client_cpu_s * 1e6 / (received.max(1) as f64),
        "pooler_rss_kib_before": pooler_rss_before,
        "pooler_rss_kib_listening": pooler_rss_idle,
        "pooler_rss_kib_peak": args.pooler_pid.map(|_| peak.load(Relaxed)),
        "pg_pss_kib_before": pg_pss_before,
        "pg_pss_kib_listening": pg_pss_idle,
        "failures": failures,
    });
    println!("{result}");
    let good = received == expected
        && out_of_order == 0
        && foreign == 0
        && sent.errors == 0
        && failures.is_empty()
        && short == 0;
    eprintln!(
        "notify_fanout: delivered {received} of {expected}; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; pooler CPU {} us per notification; {}",
        ms(pct(&all, 50.0)).unwrap_or(f64::NAN),
        ms(pct(&all, 99.0)).unwrap_or(f64::NAN),
        ms(all.last().copied()).unwrap_or(f64::NAN),
        per_notification_us(pooler_cpu_s).map_or("-".into(), |v| format!("{v:.3}")),
        if good { "ok" } else { "FAILED" }
    );
    good
}

/// Listeners that logged in and LISTENed: those whose failure was not at the start.
fn logged_in(failures: &BTreeMap<String, usize>, n: usize) -> usize {
    n - failures
        .iter()
        .filter(|(k, _)| !k.starts_with("listener:"))
        .map(|(_, v)| *v)
        .sum::<usize>()
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

struct Sent {
    sent: u64,
    errors: u64,
    elapsed_s: f64,
    rtts_ns: Vec<u64>,
    late_ns_max: u64,
}

/// RATE x SECONDS NOTIFYs on a fixed schedule, each after the previous one returned (when
/// one is late, the next ones follow at once until the schedule is met again).
fn send(info: &str, rate: u32, seconds: u32, channels: usize) -> Sent {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the sender's runtime");
    runtime.block_on(async move {
        let total = u64::from(rate) * u64::from(seconds);
        let (client, conn) = tokio_postgres::connect(info, NoTls)
            .await
            .expect("the sender logs in");
        tokio::spawn(conn);
        let mut out = Sent {
            sent: 0,
            errors: 0,
            elapsed_s: 0.0,
            rtts_ns: Vec::with_capacity(total as usize),
            late_ns_max: 0,
        };
        let start = tokio::time::Instant::now();
        let period = Duration::from_secs(1) / rate;
        for seq in 0..total {
            let due = start + period * (seq as u32);
            tokio::time::sleep_until(due).await;
            out.late_ns_max = out
                .late_ns_max
                .max(tokio::time::Instant::now().duration_since(due).as_nanos() as u64);
            let t = now_ns();
            let sql = format!("NOTIFY bench_{}, '{seq} {t}'", seq as usize % channels);
            match client.batch_execute(&sql).await {
                Ok(()) => out.sent += 1,
                Err(e) => {
                    out.errors += 1;
                    eprintln!("notify_fanout: NOTIFY failed: {e}");
                }
            }
            out.rtts_ns.push(now_ns() - t);
        }
        out.elapsed_s = start.elapsed().as_secs_f64();
        out
    })
}

/// CPU time so far: the pooler's, PostgreSQL's (in clock ticks) and this process's.
struct Cpu {
    pooler_ticks: Option<u64>,
    pg_ticks: Option<u64>,
    self_s: f64,
    clk_tck: f64,
}

impl Cpu {
    fn read(args: &Args) -> Cpu {
        // SAFETY: sysconf and getrusage only write the value they return / the struct given.
        let clk_tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Cpu {
            pooler_ticks: args.pooler_pid.and_then(cpu_ticks),
            pg_ticks: args
                .pg_pid
                .map(|pid| family(pid).into_iter().filter_map(cpu_ticks).sum()),
            self_s: tv(usage.ru_utime) + tv(usage.ru_stime),
            clk_tck,
        }
    }
}

/// The fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_owned).collect())
}

/// utime + stime of a process (every thread), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A process and its children.
fn family(parent: u32) -> Vec<u32> {
    let mut pids = vec![parent];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if stat_fields(pid)
                .and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
                .is_some_and(|ppid| ppid == parent)
            {
                pids.push(pid);
            }
        }
    }
    pids
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// The proportional set size of PostgreSQL (the postmaster and its children), in KiB:
/// shared memory counted once over all of them.
fn pg_pss_kib(postmaster: u32) -> u64 {
    family(postmaster)
        .into_iter()
        .filter_map(|pid| status_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:"))
        .sum()
}

fn status_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}
