//! A minimal PostgreSQL-protocol responder (issue 14): it answers pgbench's `-S` queries
//! (simple, extended and prepared protocol) and what pgmux sends a server (DISCARD ALL,
//! SET, RESET, DEALLOCATE, BEGIN/COMMIT) without a database behind it, so that a pooler in
//! front of it, not PostgreSQL, is the bottleneck (bench/scaling).
//!
//!   cargo run --release --example responder -- --port 7432 --threads 1
//!
//! Trust authentication (AuthenticationOk for every user and database), no TLS (it answers
//! `N` to SSLRequest and GSSENCRequest), CancelRequest is ignored. Every query gets a
//! plausible result from its text alone:
//!
//! - `... abalance ...` (pgbench -S): one row, `abalance int4`, `0`;
//! - `... count(...) ...` (pgbench's scale probe): one row, `count int8`, `1`;
//! - any other `SELECT`/`SHOW`/`VALUES`: one row, one `int4` column, `1`;
//! - anything else: a CommandComplete with the statement's leading words as its tag
//!   (`SET`, `DISCARD ALL`, `BEGIN`, ...), and the transaction status follows
//!   BEGIN/COMMIT/ROLLBACK.
//!
//! It reads what the socket holds, answers every complete message into one buffer and
//! writes it once: a pipelined Bind/Describe/Execute/Sync costs one read and one write.

use std::collections::HashMap;

use bytes::{Buf, BufMut, BytesMut};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    /// Worker threads (a multi-thread runtime; 1: a current-thread one).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const INT4: u32 = 23;
const INT8: u32 = 20;
const CHAR: u32 = 18;

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let runtime = builder.enable_all().build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
        eprintln!("responder: listening on {}:{}", args.host, args.port);
        loop {
            let (socket, _) = listener.accept().await?;
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let _ = serve(socket).await;
            });
        }
    })
}

/// A result column: its name, type and the value of the one row (`None`: NULL).
type Column = (&'static str, u32, Option<i64>);

const ABALANCE: &[Column] = &[("abalance", INT4, Some(0))];
const COUNT: &[Column] = &[("count", INT8, Some(1))];
/// pgbench's probe of pgbench_accounts: found in the first schema, not partitioned.
const PARTITIONS: &[Column] = &[
    ("n", INT4, Some(1)),
    ("partstrat", CHAR, None),
    ("count", INT8, Some(0)),
];
const ONE: &[Column] = &[("?column?", INT4, Some(1))];

/// What a query answers: one row of these columns, or a bare command tag.
#[derive(Clone)]
enum Answer {
    Row(&'static [Column]),
    Command(String),
}

impl Answer {
    fn of(sql: &str) -> Answer {
        let lower = sql.trim().trim_end_matches(';').trim().to_ascii_lowercase();
        let first = lower.split_whitespace().next().unwrap_or("");
        if lower.contains("abalance") {
            return Answer::Row(ABALANCE);
        }
        if lower.contains("partstrat") {
            return Answer::Row(PARTITIONS);
        }
        if lower.contains("count(") {
            return Answer::Row(COUNT);
        }
        match first {
            "select" | "show" | "values" => Answer::Row(ONE),
            "" => Answer::Command(String::new()),
            "discard" | "reset" | "deallocate" | "close" | "set" => {
                // The tag PostgreSQL gives: DISCARD ALL, RESET, DEALLOCATE ALL, SET.
                let words: Vec<&str> = lower.split_whitespace().take(2).collect();
                let tag = match first {
                    "discard" | "deallocate" if words.get(1) == Some(&"all") => {
                        format!("{} ALL", first.to_ascii_uppercase())
                    }
                    _ => first.to_ascii_uppercase(),
                };
                Answer::Command(tag)
            }
            "start" | "begin" => Answer::Command("BEGIN".into()),
            "end" | "commit" => Answer::Command("COMMIT".into()),
            "abort" | "rollback" => Answer::Command("ROLLBACK".into()),
            other => Answer::Command(other.to_ascii_uppercase()),
        }
    }

    fn transaction(&self, status: u8) -> u8 {
        match self {
            Answer::Command(tag) if tag == "BEGIN" => b'T',
            Answer::Command(tag) if tag == "COMMIT" || tag == "ROLLBACK" => b'I',
            _ => status,
        }
    }
}

/// A prepared statement: its answer and its parameter count.
#[derive(Clone)]
struct Statement {
    answer: Answer,
    params: Vec<u32>,
}

/// A bound portal: its statement and whether its one column comes back in binary.
#[derive(Clone)]
struct Portal {
    statement: Statement,
    binary: bool,
}

struct Session {
    out: BytesMut,
    status: u8,
    statements: HashMap<Vec<u8>, Statement>,
    portals: HashMap<Vec<u8>, Portal>,
    /// After an error in the extended protocol: skip to Sync.
    failed: bool,
}

async fn serve(mut socket: TcpStream) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(8192);
    // The startup phase: SSLRequest/GSSENCRequest get `N`, then the StartupMessage.
    loop {
        while buf.len() < 8 || buf.len() < be32(&buf[..4]) as usize {
            if socket.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let len = be32(&buf[..4]) as usize;
        if !(8..=10_000).contains(&len) {
            return Ok(());
        }
        let code = be32(&buf[4..8]) as i32;
        buf.advance(len);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => socket.write_all(b"N").await?,
            CANCEL_REQUEST => return Ok(()),
            _ => break,
        }
    }
    let mut s = Session {
        out: BytesMut::with_capacity(8192),
        status: b'I',
        statements: HashMap::new(),
        portals: HashMap::new(),
        failed: false,
    };
    message(&mut s.out, b'R', |b| b.put_i32(0));
    for (name, value) in [
        ("server_version", "16.0 (pgmux bench responder)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("IntervalStyle", "postgres"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("is_superuser", "off"),
        ("application_name", ""),
    ] {
        message(&mut s.out, b'S', |b| {
            cstr(b, name.as_bytes());
            cstr(b, value.as_bytes());
        });
    }
    let pid = std::process::id() as i32 ^ (rand_key() as i32);
    message(&mut s.out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(rand_key() as i32);
    });
    ready(&mut s);
    socket.write_all(&s.out).await?;
    s.out.clear();
    loop {
        while buf.len() >= 5 {
            let len = be32(&buf[1..5]) as usize;
            if len < 4 {
                return Ok(());
            }
            if buf.len() < len + 1 {
                break;
            }
            let tag = buf[0];
            let frame = buf.split_to(len + 1);
            if !answer(&mut s, tag, &frame[5..]) {
                socket.write_all(&s.out).await?;
                return Ok(());
            }
        }
        if !s.out.is_empty() {
            socket.write_all(&s.out).await?;
            s.out.clear();
        }
        if socket.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Answers one message into `s.out`; false on Terminate.
fn answer(s: &mut Session, tag: u8, body: &[u8]) -> bool {
    if s.failed && tag != b'S' && tag != b'Q' {
        return tag != b'X';
    }
    match tag {
        b'Q' => {
            let sql = String::from_utf8_lossy(until_nul(body));
            let statements: Vec<&str> = sql.split(';').filter(|q| !q.trim().is_empty()).collect();
            if statements.is_empty() {
                message(&mut s.out, b'I', |_| {});
            }
            for q in statements {
                let a = Answer::of(q);
                if let Answer::Row(columns) = &a {
                    row_description(&mut s.out, columns, false);
                }
                execute(&mut s.out, &a, false);
                s.status = a.transaction(s.status);
            }
            s.failed = false;
            ready(s);
        }
        b'P' => {
            let mut r = body;
            let name = take_cstr(&mut r).to_vec();
            let sql = String::from_utf8_lossy(take_cstr(&mut r)).into_owned();
            let declared = if r.len() >= 2 { r.get_i16() } else { 0 };
            let mut params = Vec::new();
            for _ in 0..declared.max(0) {
                if r.len() < 4 {
                    break;
                }
                params.push(r.get_u32());
            }
            // Undeclared parameters ($1 .. $n in the text) are int4, as pgbench's are.
            let used = (1..=99)
                .take_while(|i| sql.contains(&format!("${i}")))
                .count();
            while params.len() < used {
                params.push(INT4);
            }
            for p in &mut params {
                if *p == 0 {
                    *p = INT4;
                }
            }
            let statement = Statement {
                answer: Answer::of(&sql),
                params,
            };
            s.statements.insert(name, statement);
            message(&mut s.out, b'1', |_| {});
        }
        b'B' => {
            let mut r = body;
            let portal = take_cstr(&mut r).to_vec();
            let name = take_cstr(&mut r);
            let Some(statement) = s.statements.get(name).cloned() else {
                return error(s, "26000", "prepared statement does not exist");
            };
            // Skip the parameter formats and values; read the result formats.
            let skip = |r: &mut &[u8]| -> Option<()> {
                let n = read_i16(r)?;
                for _ in 0..n {
                    read_i16(r)?;
                }
                let n = read_i16(r)?;
                for _ in 0..n {
                    let len = read_i32(r)?;
                    if len > 0 {
                        if r.len() < len as usize {
                            return None;
                        }
                        r.advance(len as usize);
                    }
                }
                Some(())
            };
            if skip(&mut r).is_none() {
                return error(s, "08P01", "malformed Bind");
            }
            let binary = read_i16(&mut r).unwrap_or(0) > 0 && read_i16(&mut r).unwrap_or(0) == 1;
            s.portals.insert(portal, Portal { statement, binary });
            message(&mut s.out, b'2', |_| {});
        }
        b'D' => {
            let kind = body.first().copied().unwrap_or(0);
            let name = until_nul(body.get(1..).unwrap_or(&[]));
            let (answer, params, binary) = if kind == b'S' {
                match s.statements.get(name) {
                    Some(st) => (st.answer.clone(), Some(st.params.clone()), false),
                    None => return error(s, "26000", "prepared statement does not exist"),
                }
            } else {
                match s.portals.get(name) {
                    Some(p) => (p.statement.answer.clone(), None, p.binary),
                    None => return error(s, "34000", "portal does not exist"),
                }
            };
            if let Some(params) = params {
                message(&mut s.out, b't', |b| {
                    b.put_i16(params.len() as i16);
                    for p in &params {
                        b.put_u32(*p);
                    }
                });
            }
            match answer {
                Answer::Row(columns) => row_description(&mut s.out, columns, binary),
                Answer::Command(_) => message(&mut s.out, b'n', |_| {}),
            }
        }
        b'E' => {
            let name = until_nul(body);
            let Some(portal) = s.portals.get(name) else {
                return error(s, "34000", "portal does not exist");
            };
            let a = portal.statement.answer.clone();
            execute(&mut s.out, &a, portal.binary);
            s.status = a.transaction(s.status);
            if name.is_empty() {
                s.portals.remove(name);
            }
        }
        b'C' => {
            let kind = body.first().copied().unwrap_or(0);
            let name = until_nul(body.get(1..).unwrap_or(&[]));
            if kind == b'S' {
                s.statements.remove(name);
            } else {
                s.portals.remove(name);
            }
            message(&mut s.out, b'3', |_| {});
        }
        b'S' => {
            s.failed = false;
            s.portals.retain(|name, _| !name.is_empty());
            ready(s);
        }
        b'H' => {}
        b'X' => return false,
        _ => return error(s, "08P01", "unsupported message"),
    }
    true
}

/// An ErrorResponse; in the extended protocol the rest up to Sync is skipped.
fn error(s: &mut Session, code: &str, text: &str) -> bool {
    message(&mut s.out, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, b"ERROR");
        b.put_u8(b'C');
        cstr(b, code.as_bytes());
        b.put_u8(b'M');
        cstr(b, text.as_bytes());
        b.put_u8(0);
    });
    if s.status == b'T' {
        s.status = b'E';
    }
    s.failed = true;
    true
}

fn ready(s: &mut Session) {
    let status = s.status;
    message(&mut s.out, b'Z', |b| b.put_u8(status));
}

fn row_description(out: &mut BytesMut, columns: &[Column], binary: bool) {
    message(out, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for (name, oid, _) in columns {
            cstr(b, name.as_bytes());
            b.put_u32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(*oid);
            b.put_i16(width(*oid));
            b.put_i32(-1); // type modifier
            b.put_i16(binary as i16);
        }
    });
}

fn width(oid: u32) -> i16 {
    match oid {
        INT8 => 8,
        CHAR => 1,
        _ => 4,
    }
}

/// The DataRow (if any) and CommandComplete of one execution.
fn execute(out: &mut BytesMut, answer: &Answer, binary: bool) {
    match answer {
        Answer::Row(columns) => {
            message(out, b'D', |b| {
                b.put_i16(columns.len() as i16);
                for (_, oid, value) in columns.iter() {
                    match (binary, *oid, value) {
                        (_, _, None) => b.put_i32(-1),
                        (true, INT8, Some(v)) => {
                            b.put_i32(8);
                            b.put_i64(*v);
                        }
                        (true, _, Some(v)) => {
                            b.put_i32(4);
                            b.put_i32(*v as i32);
                        }
                        (false, _, Some(v)) => {
                            let text = v.to_string();
                            b.put_i32(text.len() as i32);
                            b.put_slice(text.as_bytes());
                        }
                    }
                }
            });
            message(out, b'C', |b| cstr(b, b"SELECT 1"));
        }
        Answer::Command(tag) if tag.is_empty() => message(out, b'I', |_| {}),
        Answer::Command(tag) => message(out, b'C', |b| cstr(b, tag.as_bytes())),
    }
}

/// Appends one backend message: tag, length, and what `body` writes.
fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(b: &mut BytesMut, s: &[u8]) {
    b.put_slice(s);
    b.put_u8(0);
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn until_nul(b: &[u8]) -> &[u8] {
    match memchr::memchr(0, b) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn take_cstr<'a>(r: &mut &'a [u8]) -> &'a [u8] {
    let s = until_nul(r);
    *r = r.get(s.len() + 1..).unwrap_or(&[]);
    s
}

fn read_i16(r: &mut &[u8]) -> Option<i16> {
    (r.len() >= 2).then(|| r.get_i16())
}

fn read_i32(r: &mut &[u8]) -> Option<i32> {
    (r.len() >= 4).then(|| r.get_i32())
}

/// A cancel key: not secret here, only distinct per connection.
fn rand_key() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    static NEXT: AtomicU32 = AtomicU32::new(0x5eed);
    NEXT.fetch_add(0x9e37_79b9, Relaxed)
}
