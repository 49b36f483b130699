//! Idle clients bench (issue 15, item 3): the pooler's memory per logged-in, idle client.
//!
//!   cargo run --release --example idle_clients -- --port 6432 --user bench --dbname bench \
//!       -n 100000 --pooler-pid PID
//!
//! Opens N client connections to the pooler, each from one of several source addresses
//! (127.0.0.1, 127.0.0.2, ..., `--per-source` connections each, bound before the connect)
//! so that the connections fit in the kernel's ephemeral port range. Each one completes the
//! startup, authentication (trust, cleartext or md5; SCRAM is refused here: 4096 PBKDF2
//! iterations per login would make 100 000 logins take minutes) and one `SELECT 1`, then
//! stays idle: this process keeps only its socket, no task and no buffer.
//!
//! The pooler's memory (`--pooler-pid`: VmRSS and RssAnon from /proc/PID/status; Rss, Pss
//! and Anonymous from /proc/PID/smaps_rollup) is read before the first connection, once
//! `--warm` percent of the clients are idle, and once all of them are, each after
//! `--settle` seconds. Then every connection is checked for being still open with nothing
//! unexpected to read, and a sample (`--ping-sample`, spread over all of them) must answer
//! another `SELECT 1`. Prints one JSON object on stdout (the numbers, `per_client_bytes`
//! and `marginal_bytes`: the difference between the warm and the full stage divided by the
//! clients in between, free of fixed costs such as the pool's server connections) and a
//! summary on stderr.
//!
//! With `--hold`, it then keeps the connections open until its stdin closes (bench/idle
//! uses this to stop a profiled pooler while the clients are connected). Exits 1 when a
//! login failed or a connection was lost.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// The pooler's IPv4 address.
    #[arg(long, default_value = "127.0.0.1")]
    host: Ipv4Addr,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    user: String,
    #[arg(long, env = "PGPASSWORD", default_value = "")]
    password: String,
    #[arg(long)]
    dbname: String,
    /// Idle clients.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    clients: usize,
    /// Connections per source address (127.0.0.1, then 127.0.0.2, ...); below the
    /// ephemeral port range's size (/proc/sys/net/ipv4/ip_local_port_range), which
    /// connect() draws from per source address and destination.
    #[arg(long, default_value_t = 20_000)]
    per_source: usize,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Percent of the clients opened first, for the marginal cost per client.
    #[arg(long, default_value_t = 10)]
    warm: usize,
    /// Seconds to wait before each memory reading.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// Connections that run a second `SELECT 1` at the end.
    #[arg(long, default_value_t = 500)]
    ping_sample: usize,
    /// The pooler's process id: its memory.
    #[arg(long)]
    pooler_pid: Option<u32>,
    /// LISTEN clients: after its `SELECT 1` each client LISTENs to one of this many
    /// channels (`idle_<i mod K>`), so that the memory of idle listening clients is
    /// measured; 0 (the default): no LISTEN.
    #[arg(long, default_value_t = 0)]
    listen: usize,
    /// Keep the connections open after the report until stdin closes.
    #[arg(long)]
    hold: bool,
}

/// A pooler's memory at one moment, in KiB.
#[derive(Clone, Copy, Default)]
struct Mem {
    vm_rss: u64,
    rss_anon: u64,
    rollup_rss: u64,
    rollup_pss: u64,
    rollup_anon: u64,
}

impl Mem {
    fn read(pid: Option<u32>) -> Option<Mem> {
        let pid = pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        Some(Mem {
            vm_rss: field_kib(&status, "VmRSS:")?,
            rss_anon: field_kib(&status, "RssAnon:")?,
            rollup_rss: field_kib(&rollup, "Rss:")?,
            rollup_pss: field_kib(&rollup, "Pss:")?,
            rollup_anon: field_kib(&rollup, "Anonymous:")?,
        })
    }

    fn to_json(self) -> serde_json::Value {
        json!({
            "vm_rss_kib": self.vm_rss, "rss_anon_kib": self.rss_anon,
            "smaps_rss_kib": self.rollup_rss, "smaps_pss_kib": self.rollup_pss,
            "smaps_anonymous_kib": self.rollup_anon,
        })
    }
}

fn field_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.get(key.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes per client between two readings, VmRSS.
fn per_client(from: Option<Mem>, to: Option<Mem>, clients: usize) -> Option<f64> {
    let (from, to) = (from?, to?);
    (clients > 0).then(|| (to.vm_rss as f64 - from.vm_rss as f64) * 1024.0 / clients as f64)
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let ok = runtime.block_on(run(args));
    std::process::exit(if ok { 0 } else { 1 });
}

async fn run(args: Args) -> bool {
    let before = Mem::read(args.pooler_pid);
    let warm_n = (args.clients * args.warm.min(100) / 100).min(args.clients);
    let sources = args.clients.div_ceil(args.per_source.max(1)).max(1);
    if sources > 254 {
        eprintln!("idle_clients: {sources} source addresses needed; raise --per-source");
        return false;
    }
    let started = Instant::now();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut streams: Vec<TcpStream> = Vec::with_capacity(args.clients);

    let warm = open(&args, 0..warm_n, &mut streams, &mut failures).await;
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let at_warm = Mem::read(args.pooler_pid);
    let rest = open(&args, warm_n..args.clients, &mut streams, &mut failures).await;
    let login_s = started.elapsed().as_secs_f64() - args.settle as f64;
    eprintln!(
        "idle_clients: {} of {} clients idle after {login_s:.1}s of logins ({} + {}), from {sources} source address(es)",
        streams.len(),
        args.clients,
        warm,
        rest
    );
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let at_full = Mem::read(args.pooler_pid);

    // Still open, nothing unexpected sent to them, and a sample answers.
    let mut closed = 0usize;
    let mut unexpected = 0usize;
    let mut probe = [0u8; 64];
    for s in &streams {
        match s.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok(0) | Err(_) => closed += 1,
            Ok(_) => unexpected += 1,
        }
    }
    let step = (streams.len() / args.ping_sample.max(1)).max(1);
    let mut pinged = 0usize;
    let mut ping_failures = 0usize;
    for s in streams.iter_mut().step_by(step).take(args.ping_sample) {
        pinged += 1;
        if let Err(e) = select_1(s).await {
            ping_failures += 1;
            *failures.entry(format!("ping: {e}")).or_default() += 1;
        }
    }

    let mem = |m: Option<Mem>| m.map_or(serde_json::Value::Null, Mem::to_json);
    let n = streams.len();
    let report = json!({
        "clients": args.clients,
        "logged_in": n,
        "source_addresses": sources,
        "login_s": login_s,
        "warm_clients": warm,
        "closed": closed,
        "unexpected_data": unexpected,
        "pinged": pinged,
        "ping_failures": ping_failures,
        "failures": failures,
        "before": mem(before),
        "warm": mem(at_warm),
        "idle": mem(at_full),
        "per_client_bytes": per_client(before, at_full, n),
        "marginal_bytes": per_client(at_warm, at_full, n.saturating_sub(warm)),
        "per_client_smaps_anonymous_bytes": before.zip(at_full).filter(|_| n > 0).map(|(b, a)|
            (a.rollup_anon as f64 - b.rollup_anon as f64) * 1024.0 / n as f64),
    });
    println!("{report}");
    if let (Some(b), Some(a)) = (before, at_full) {
        eprintln!(
            "idle_clients: pooler VmRSS {} KiB before, {} KiB with {n} idle clients: {:.0} bytes per client (marginal {:.0})",
            b.vm_rss,
            a.vm_rss,
            per_client(before, at_full, n).unwrap_or(0.0),
            per_client(at_warm, at_full, n.saturating_sub(warm)).unwrap_or(0.0),
        );
    }
    eprintln!(
        "idle_clients: {closed} closed, {unexpected} with unexpected data, {ping_failures} of {pinged} pings failed"
    );
    for (e, count) in &failures {
        eprintln!("idle_clients: {count} x {e}");
    }
    let ok = failures.is_empty() && closed == 0 && unexpected == 0 && n == args.clients;
    if args.hold {
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 256];
        while matches!(stdin.read(&mut sink).await, Ok(k) if k > 0) {}
    }
    drop(streams);
    ok
}

/// Logs in the clients of `range` (at most `concurrency` at once) and keeps their sockets.
async fn open(
    args: &Args,
    range: std::ops::Range<usize>,
    streams: &mut Vec<TcpStream>,
    failures: &mut BTreeMap<String, usize>,
) -> usize {
    let mut logins = futures_util::stream::iter(range)
        .map(|i| login(args, i))
        .buffer_unordered(args.concurrency.max(1));
    let mut opened = 0;
    while let Some(done) = logins.next().await {
        match done {
            Ok(s) => {
                streams.push(s);
                opened += 1;
            }
            Err(e) => *failures.entry(e).or_default() += 1,
        }
    }
    opened
}

/// One client: connected from its source address, logged in, one `SELECT 1`.
async fn login(args: &Args, i: usize) -> Result<TcpStream, String> {
    let source = Ipv4Addr::new(127, 0, 0, (i / args.per_source.max(1) + 1) as u8);
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    // The port is picked at connect() for the whole 4-tuple, not at bind() among the ports
    // free for every destination: bind(port 0) takes the even half of the ephemeral range
    // first, and once that is used up each bind scans the rest for milliseconds, holding
    // up every login in flight on this one thread (pooler login timeouts at ~14 000).
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `on`, an int that lives across the call, on our own socket.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(format!(
            "IP_BIND_ADDRESS_NO_PORT: {}",
            std::io::Error::last_os_error()
        ));
    }
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let mut s = socket
        .connect(SocketAddr::new(IpAddr::V4(args.host), args.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;

    let mut params = BytesMut::new();
    for (k, v) in [
        ("user", args.user.as_str()),
        ("database", args.dbname.as_str()),
        ("application_name", "bench-idle"),
    ] {
        params.put_slice(k.as_bytes());
        params.put_u8(0);
        params.put_slice(v.as_bytes());
        params.put_u8(0);
    }
    params.put_u8(0);
    let mut startup = BytesMut::with_capacity(params.len() + 8);
    startup.put_u32(params.len() as u32 + 8);
    startup.put_u32(196_608); // protocol 3.0
    startup.put_slice(&params);
    write(&mut s, &startup).await?;

    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let (tag, body) = next_message(&mut s, &mut buf).await?;
        match tag {
            b'R' => {
                let code = body
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                match code {
                    Some(0) => {}
                    Some(3) => {
                        let mut p = args.password.clone().into_bytes();
                        p.push(0);
                        write(&mut s, &message(b'p', &p)).await?;
                    }
                    Some(5) => {
                        let salt: [u8; 4] = body
                            .get(4..8)
                            .and_then(|b| b.try_into().ok())
                            .ok_or("md5 request without a salt")?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            args.user.as_bytes(),
                            args.password.as_bytes(),
                            salt,
                        );
                        let mut p = hash.into_bytes();
                        p.push(0);
                        write(&mut s, &message(b'p', &p)).await?;
                    }
                    Some(10) => {
                        return Err(
                            "the pooler asks for SASL (SCRAM): use md5, password or trust".into(),
                        );
                    }
                    other => return Err(format!("authentication request {other:?} not supported")),
                }
            }
            b'E' => return Err(format!("login: {}", error_text(&body))),
            b'Z' => break,
            _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
        }
    }
    select_1(&mut s).await?;
    if args.listen > 0 {
        listen(&mut s, i % args.listen).await?;
    }
    Ok(s)
}

/// `LISTEN idle_<channel>`: its CommandComplete, then ReadyForQuery.
async fn listen(s: &mut TcpStream, channel: usize) -> Result<(), String> {
    let query = format!("LISTEN idle_{channel}\0");
    write(s, &message(b'Q', query.as_bytes())).await?;
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let (tag, body) = next_message(s, &mut buf).await?;
        match tag {
            b'E' => return Err(format!("LISTEN: {}", error_text(&body))),
            b'Z' => return Ok(()),
            _ => {}
        }
    }
}

/// `SELECT 1` on an idle connection: one DataRow `1`, then ReadyForQuery.
async fn select_1(s: &mut TcpStream) -> Result<(), String> {
    write(s, &message(b'Q', b"SELECT 1\0")).await?;
    let mut buf = BytesMut::with_capacity(256);
    let mut row = false;
    loop {
        let (tag, body) = next_message(s, &mut buf).await?;
        match tag {
            b'D' => row = body.as_ref() == b"\x00\x01\x00\x00\x00\x011",
            b'E' => return Err(format!("SELECT 1: {}", error_text(&body))),
            b'Z' if row => return Ok(()),
            b'Z' => return Err("SELECT 1: no row 1".into()),
            _ => {}
        }
    }
}

fn message(tag: u8, body: &[u8]) -> BytesMut {
    let mut m = BytesMut::with_capacity(body.len() + 5);
    m.put_u8(tag);
    m.put_u32(body.len() as u32 + 4);
    m.put_slice(body);
    m
}

async fn write(s: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    s.write_all(bytes).await.map_err(|e| format!("write: {e}"))
}

async fn next_message(s: &mut TcpStream, buf: &mut BytesMut) -> Result<(u8, BytesMut), String> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len < 4 {
                return Err(format!("bad message length {len}"));
            }
            if buf.len() > len {
                let tag = buf[0];
                let mut m = buf.split_to(len + 1);
                m.advance(5);
                return Ok((tag, m));
            }
        }
        match s.read_buf(buf).await {
            Ok(0) => return Err("the pooler closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// "SEVERITY SQLSTATE: message" of an ErrorResponse.
fn error_text(body: &[u8]) -> String {
    let mut fields: BTreeMap<u8, String> = BTreeMap::new();
    for part in body.split(|b| *b == 0) {
        if let Some((&k, v)) = part.split_first() {
            fields.insert(k, String::from_utf8_lossy(v).into_owned());
        }
    }
    let get = |k: u8| fields.get(&k).map_or("?", String::as_str);
    format!("{} {}: {}", get(b'S'), get(b'C'), get(b'M'))
}
