//! Faults between pgmux and a real PostgreSQL, injected by a proxy in the test process
//! (`common::FaultProxy`): the link cut or reset in the middle of a transaction or while
//! idle in the pool, PostgreSQL at `max_connections`, a slow link, an upstream that
//! refuses connections or stalls in the middle of a result. Each test checks what the client is told (SQLSTATE and message)
//! and then that nothing was damaged: no partial transaction committed, no committed row
//! lost, no server reused in a transaction or with a leftover setting, no server
//! connection leaked, and pgmux's RSS back near where it started.

mod common;

use std::time::{Duration, Instant};

use common::{FaultProxy, Links, MuxOptions, SUPERUSER, TestPgmux, TestPostgres, rss_kib};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The database clients ask pgmux for; pgmux reaches it through the proxy.
const DB: &str = "faulty";
/// How long a test waits for something that must happen (a backend to exit, a pool to
/// recover) before it fails. Waiting, not timing: the test goes on as soon as it happened.
const PATIENCE: Duration = Duration::from_secs(30);
/// How far pgmux's RSS may end above where it started.
const RSS_SLACK_KIB: u64 = 4 * 1024;

/// A client connection to pgmux whose connection task reports how it ended: an error
/// PostgreSQL-style (pgmux's FATAL) arrives there when no query was running.
struct Watched {
    client: Client,
    ended: JoinHandle<Result<(), tokio_postgres::Error>>,
}

/// PostgreSQL, the proxy in front of it, and pgmux in front of the proxy.
struct Rig<'a> {
    pg: &'a TestPostgres,
    proxy: FaultProxy,
    mux: TestPgmux,
    /// The real database behind [`DB`], one per test, so that checks see this test's
    /// servers only.
    dbname: String,
    /// The pool size.
    size: u32,
    rss_start: u64,
}

impl<'a> Rig<'a> {
    /// A fresh database `dbname` with an empty table `ledger(n int primary key)`, the
    /// proxy, and pgmux with `opts` whose database [`DB`] goes through the proxy. One
    /// client logs in and queries first, so that the RSS baseline includes what pgmux
    /// allocates once (the first server connection, the first SCRAM exchange).
    async fn start(pg: &'a TestPostgres, dbname: &str, mut opts: MuxOptions) -> Rig<'a> {
        let su = pg.superuser_on("postgres").await;
        su.batch_execute(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
            .await
            .unwrap();
        su.batch_execute(&format!("CREATE DATABASE {dbname} OWNER app"))
            .await
            .unwrap();
        let su = pg.superuser_on(dbname).await;
        su.batch_execute("CREATE TABLE ledger(n int PRIMARY KEY); GRANT ALL ON ledger TO app")
            .await
            .unwrap();

        let proxy = FaultProxy::start(pg.port).await;
        opts.extra.push_str(&format!(
            "[databases.{DB}]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{dbname}\"\n",
            proxy.port
        ));
        let size = opts.size;
        let mux = TestPgmux::start(pg, opts).await;
        let mut rig = Rig {
            pg,
            proxy,
            mux,
            dbname: dbname.to_owned(),
            size,
            rss_start: 0,
        };
        let warm = rig.client().await;
        assert_eq!(count(&warm).await, 0);
        drop(warm);
        rig.rss_start = rss_kib(rig.mux.pid());
        rig
    }

    /// [`Rig::start`], then a client that commits rows 1 to `rows`.
    async fn seeded(
        pg: &'a TestPostgres,
        dbname: &str,
        opts: MuxOptions,
        rows: i32,
    ) -> (Rig<'a>, Client) {
        let rig = Rig::start(pg, dbname, opts).await;
        let c = rig.client().await;
        commit_rows(&c, 1, rows).await;
        (rig, c)
    }

    /// Clients that each hold one of the servers pgmux has now, in a transaction that
    /// inserted a row of its own (`first_row`, then the next ones): a checkout after this
    /// needs a new server.
    async fn hold_every_server(&self, first_row: usize) -> Vec<Client> {
        let mut holders = Vec::new();
        while holders.len() < self.proxy.carried() {
            let holder = self.client().await;
            let n = first_row + holders.len();
            holder
                .batch_execute(&format!("BEGIN; INSERT INTO ledger VALUES ({n})"))
                .await
                .unwrap();
            holders.push(holder);
        }
        holders
    }

    /// A client of [`DB`] through pgmux; panics if it cannot log in.
    async fn client(&self) -> Client {
        self.watched().await.client
    }

    /// A client of [`DB`] through pgmux whose connection task can be awaited.
    async fn watched(&self) -> Watched {
        self.try_watched()
            .await
            .unwrap_or_else(|e| panic!("logging in to pgmux: {e}"))
    }

    async fn try_watched(&self) -> Result<Watched, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.mux.port)
            .user("app")
            .password("app_pw")
            .dbname(DB)
            .connect_timeout(PATIENCE);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        Ok(Watched {
            client,
            ended: tokio::spawn(connection),
        })
    }

    /// A superuser connection straight to this test's database (not through pgmux).
    async fn superuser(&self) -> Client {
        self.pg.superuser_on(&self.dbname).await
    }

    /// Waits until backend `pid` has exited.
    async fn backend_gone(&self, pid: i32) {
        let su = self.superuser().await;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let row = su
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "backend {pid} did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What must hold after any fault, once it is over:
    /// - the table has exactly `committed` rows (nothing partial committed, nothing lost);
    /// - no server of this database is left in a transaction or running a query;
    /// - every server the pool lends (all `size` at once) starts outside a transaction and
    ///   without the test's marker setting;
    /// - the proxy carries no more connections than the pool may hold (none leaked);
    /// - pgmux's RSS is within [`RSS_SLACK_KIB`] of where it started.
    async fn assert_healthy(&self, test: &str, committed: i64) {
        let su = self.superuser().await;
        assert_eq!(count(&su).await, committed, "committed rows");

        // Backends cut off by the fault may take a moment to notice and exit.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let busy: i64 = su
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND usename = 'app' AND state <> 'idle'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if busy == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{busy} server(s) stay in a transaction or busy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Every server at once: each in a transaction block of its own client. In one
        // simple Query, now() (the transaction's start) equals statement_timestamp() only
        // if this BEGIN started the transaction.
        let mut clients = Vec::new();
        for _ in 0..self.size {
            let c = self.client().await;
            let rows = c
                .simple_query(
                    "BEGIN; SELECT now() = statement_timestamp(), \
                     coalesce(current_setting('faults.marker', true), ''), pg_backend_pid()",
                )
                .await
                .unwrap();
            let row = first_row(&rows);
            assert_eq!(
                row.get(0),
                Some("t"),
                "a server was lent inside a transaction"
            );
            assert_eq!(row.get(1), Some(""), "a server kept a client's setting");
            clients.push((c, row.get(2).map(str::to_owned)));
        }
        let pids: std::collections::BTreeSet<_> = clients.iter().map(|(_, p)| p).collect();
        assert_eq!(pids.len(), clients.len(), "each client had its own server");
        for (c, _) in &clients {
            c.batch_execute("ROLLBACK").await.unwrap();
        }
        drop(clients);
        let carried = self.proxy.carried();
        assert!(
            carried <= self.size as usize,
            "{carried} server connections through the proxy, pool size {}",
            self.size
        );

        let rss = rss_kib(self.mux.pid());
        eprintln!(
            "{test}: pgmux RSS {} KiB at the start, {rss} KiB after the fault",
            self.rss_start
        );
        assert!(
            rss <= self.rss_start + RSS_SLACK_KIB,
            "pgmux RSS grew from {} KiB to {rss} KiB",
            self.rss_start
        );
    }
}

// Around a fault the tests use simple queries only: after an extended query,
// tokio-postgres closes its statement in the background, and that request would race the
// fault (and take a FATAL meant for the next step).

/// The rows of `ledger`.
async fn count(c: &Client) -> i64 {
    try_count(c).await.unwrap()
}

async fn try_count(c: &Client) -> Result<i64, tokio_postgres::Error> {
    let rows = c.simple_query("SELECT count(*) FROM ledger").await?;
    Ok(first_row(&rows)
        .get(0)
        .and_then(|n| n.parse().ok())
        .expect("a count"))
}

/// Inserts `from..=to` into `ledger` (committed unless the client is in a transaction).
async fn commit_rows(c: &Client, from: i32, to: i32) {
    c.batch_execute(&format!(
        "INSERT INTO ledger SELECT generate_series({from}, {to})"
    ))
    .await
    .unwrap();
}

fn first_row(messages: &[SimpleQueryMessage]) -> &tokio_postgres::SimpleQueryRow {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row")
}

/// The ErrorResponse in `err`; panics if the connection just dropped instead.
fn db_error(err: &tokio_postgres::Error) -> &tokio_postgres::error::DbError {
    err.as_db_error()
        .unwrap_or_else(|| panic!("an ErrorResponse, not a dropped connection: {err:?}"))
}

/// The backend pid of a client's server, inside its transaction. A simple query: an
/// extended one leaves tokio-postgres closing its statement in the background, a request
/// that would take the FATAL a test waits for.
async fn backend_pid(c: &Client) -> i32 {
    let rows = c.simple_query("SELECT pg_backend_pid()").await.unwrap();
    first_row(&rows)
        .get(0)
        .and_then(|pid| pid.parse().ok())
        .expect("a pid")
}

/// Waits until backend `pid` runs a query that starts with `prefix`.
async fn running(su: &Client, pid: i32, prefix: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let row = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid = $1 AND state = 'active' AND starts_with(query, $2)",
                &[&pid, &prefix],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} never ran {prefix}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn link_cut_mid_statement_gives_08006_and_commits_nothing() {
    let pg = TestPostgres::shared().await;
    let (rig, holder) = Rig::seeded(pg, "faults_cut_statement", MuxOptions::sized(2), 100).await;

    // A transaction with rows of its own and a setting, then a long statement. The
    // backend checks its socket every 100 ms while it sleeps, so it notices the cut.
    holder
        .batch_execute(
            "BEGIN; INSERT INTO ledger SELECT generate_series(101, 150); \
             SET faults.marker = 'dirty'; SET LOCAL client_connection_check_interval = '100ms'",
        )
        .await
        .unwrap();
    let pid = backend_pid(&holder).await;
    let su = rig.superuser().await;
    let sleeping = tokio::spawn(async move {
        let result = holder.simple_query("SELECT pg_sleep(600)").await;
        (holder, result)
    });
    running(&su, pid, "SELECT pg_sleep").await;

    rig.proxy.cut(Links::All).await;

    let (holder, result) = sleeping.await.unwrap();
    let err = result.expect_err("the statement fails when its server is lost");
    assert_lost_mid_transaction(&err, "cut mid-statement");
    assert!(
        holder.simple_query("SELECT 1").await.is_err(),
        "pgmux ended the session with its FATAL"
    );
    rig.backend_gone(pid).await;

    // The pool healed: the next client works, on a new server.
    let next = rig.client().await;
    next.batch_execute("BEGIN").await.unwrap();
    assert_ne!(backend_pid(&next).await, pid);
    assert_eq!(count(&next).await, 100);
    next.batch_execute("COMMIT").await.unwrap();
    commit_rows(&next, 101, 110).await;
    rig.assert_healthy("link_cut_mid_statement", 110).await;
}

#[tokio::test]
async fn link_reset_while_idle_in_transaction_gives_08006_and_commits_nothing() {
    let pg = TestPostgres::shared().await;
    let rig = Rig::start(pg, "faults_reset_idle_tx", MuxOptions::sized(2)).await;
    let holder = rig.watched().await;
    commit_rows(&holder.client, 1, 40).await;
    holder
        .client
        .batch_execute(
            "BEGIN; INSERT INTO ledger SELECT generate_series(41, 80); SET faults.marker = 'dirty'",
        )
        .await
        .unwrap();
    let pid = backend_pid(&holder.client).await;

    // RST on both sides while the client sits idle in its transaction.
    rig.proxy.reset(Links::All).await;

    // pgmux tells the client at once, with no query running: the FATAL ends the
    // connection, and the next query finds it closed.
    let ended = tokio::time::timeout(PATIENCE, holder.ended)
        .await
        .expect("pgmux ends the session")
        .unwrap();
    let err = ended.expect_err("the session ends with an error");
    assert_lost_mid_transaction(&err, "reset idle in transaction");
    assert!(holder.client.simple_query("COMMIT").await.is_err());
    rig.backend_gone(pid).await;

    let next = rig.client().await;
    assert_eq!(count(&next).await, 40);
    commit_rows(&next, 41, 50).await;
    rig.assert_healthy("link_reset_idle_in_transaction", 50)
        .await;
}

/// The timers of the ESTABLISHED TCP sockets connected to 127.0.0.1:`port` (pgmux's server
/// sockets, when `port` is the proxy's), per /proc/net/tcp: the kind (2 = keepalive) and
/// the clock ticks (USER_HZ, 100 a second) until it fires.
fn timers_of_sockets_to(port: u16) -> Vec<(u8, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when ...
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields.get(2)?.rsplit_once(':')?.1;
            if u16::from_str_radix(remote_port, 16).ok()? != port || *fields.get(3)? != "01" {
                return None;
            }
            let (kind, when) = fields.get(5)?.split_once(':')?;
            Some((
                u8::from_str_radix(kind, 16).ok()?,
                u64::from_str_radix(when, 16).ok()?,
            ))
        })
        .collect()
}

#[tokio::test]
async fn links_cut_and_reset_while_idle_in_the_pool_are_replaced_without_an_error() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions::sized(2).with_pool("tcp_keepidle = \"7s\"");
    let rig = Rig::start(pg, "faults_idle_pool", opts).await;
    // Two servers in the pool: two clients in transactions at once, then both idle.
    let a = rig.client().await;
    let b = rig.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let old = [backend_pid(&a).await, backend_pid(&b).await];
    a.batch_execute("INSERT INTO ledger VALUES (1); COMMIT")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO ledger VALUES (2); COMMIT")
        .await
        .unwrap();
    assert_eq!(rig.proxy.carried(), 2);
    // pgmux's idle server sockets run the keepalive timer, due within tcp_keepidle (the
    // system's default would be 2 hours, pgmux's 60 s).
    let timers = timers_of_sockets_to(rig.proxy.port);
    assert_eq!(timers.len(), 2, "{timers:?}");
    assert!(
        timers
            .iter()
            .all(|&(kind, ticks)| kind == 2 && ticks <= 700),
        "keepalive timers (kind 2) due within 7 s: {timers:?}"
    );

    // One link ends with a FIN, the other with an RST, while both servers are idle.
    let links = rig.proxy.links();
    rig.proxy.cut(Links::One(links[0])).await;
    rig.proxy.reset(Links::One(links[1])).await;

    // Both clients get working servers, new ones, with no error.
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let new = [backend_pid(&a).await, backend_pid(&b).await];
    for pid in new {
        assert!(!old.contains(&pid), "a dead server was lent again");
    }
    a.batch_execute("INSERT INTO ledger VALUES (3); COMMIT")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO ledger VALUES (4); COMMIT")
        .await
        .unwrap();
    for pid in old {
        rig.backend_gone(pid).await;
    }
    rig.assert_healthy("idle_links_cut_and_reset", 4).await;
}

/// The fewest milliseconds from the first attempt to the `n`-th (1-based) that one pool's
/// backoff allows: 100 ms doubling up to 5 s, each less up to 25 % of jitter.
fn earliest_attempt_ms(n: u32) -> u64 {
    (0..n.saturating_sub(1))
        .map(|k| (100u64 << k.min(10)).min(5_000) * 3 / 4)
        .sum()
}

#[tokio::test]
async fn postgres_at_max_connections_gives_its_53300_and_pgmux_backs_off() {
    // A cluster of its own, with room for 10 connections.
    let pg = TestPostgres::start().await;
    let su = pg.superuser_on("postgres").await;
    su.batch_execute("ALTER SYSTEM SET max_connections = 10")
        .await
        .unwrap();
    drop(su);
    pg.stop().await;
    pg.restart().await;

    // A query that needs a new server waits this long for a lent one (the holders' below)
    // before it is told PostgreSQL's refusal.
    let opts = MuxOptions::sized(3).waiting("200ms");
    let (rig, waiter) = Rig::seeded(&pg, "faults_full", opts, 10).await;
    // Every server pgmux has is held in a transaction (one, unless the warm-up raced a
    // second one open), so the waiter will need a new one.
    let holders = rig.hold_every_server(11).await;
    assert!(
        holders.len() < 3,
        "room in the pool for the waiter's server"
    );

    // Fill every slot left, the superuser's reserved ones too, over the Unix socket.
    let mut fillers = Vec::new();
    loop {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(pg.dir())
            .port(pg.port)
            .user(SUPERUSER)
            .dbname("postgres");
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                fillers.push(client);
            }
            Err(e) => {
                assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
                break;
            }
        }
        assert!(fillers.len() < 10, "max_connections = 10 was not applied");
    }

    // The waiter needs a second server: PostgreSQL's refusal reaches it, clearly (once no
    // held server came back within wait_timeout).
    let attempts_before = rig.proxy.accepted();
    let started = Instant::now();
    let mut queries = 0;
    let mut first = None;
    while queries < 60 {
        let err = rig_query_error(&waiter).await;
        let db = db_error(&err);
        assert_eq!(
            db.code(),
            &SqlState::TOO_MANY_CONNECTIONS,
            "{}",
            db.message()
        );
        assert!(
            db.message().contains("sorry, too many clients already")
                && db.message().contains("SQLSTATE 53300")
                && db
                    .message()
                    .contains(&format!("upstream 127.0.0.1:{}", rig.proxy.port)),
            "{}",
            db.message()
        );
        first.get_or_insert_with(|| format!("{} {}", db.code().code(), db.message()));
        queries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let attempts = rig.proxy.accepted() - attempts_before;
    eprintln!(
        "max_connections: {} ({queries} queries in {elapsed:?}, {attempts} connection attempts)",
        first.unwrap_or_default()
    );
    // Without a backoff each query would try. With it, one pool tries at most as often as
    // its schedule allows; the client and the pool's upkeep may both take a due attempt.
    let scheduled = (1..=queries)
        .take_while(|&n| u128::from(earliest_attempt_ms(n)) <= elapsed.as_millis())
        .count() as u64;
    assert!(
        attempts <= 2 * scheduled,
        "{attempts} connection attempts in {elapsed:?}: the backoff allows {scheduled}"
    );

    // Slots free up: the waiter recovers without reconnecting, on a new server (the
    // holders still hold theirs).
    drop(fillers);
    let full = |e: &tokio_postgres::Error| {
        assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    };
    let n = count_once_served(&waiter, full).await;
    assert_eq!(n, 10, "the holders' rows are not committed yet");
    // The clients that held a server all along were not disturbed.
    for holder in &holders {
        holder.batch_execute("COMMIT").await.unwrap();
    }
    let committed = 10 + holders.len() as i64;
    assert_eq!(count(&waiter).await, committed);
    drop(holders);
    drop(waiter);
    // Every filler's backend gone, so that the pool can open all its servers again.
    let su = rig.superuser().await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let others: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[&SUPERUSER],
            )
            .await
            .unwrap()
            .get(0);
        if others == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{others} fillers stay connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.assert_healthy("max_connections", committed).await;
}

/// Asserts that `err` is pgmux's 08006 for a server lost in the middle of a transaction,
/// and shows it (`what` names the fault).
fn assert_lost_mid_transaction(err: &tokio_postgres::Error, what: &str) {
    let db = db_error(err);
    eprintln!("{what}: {} {}", db.code().code(), db.message());
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    assert!(
        db.message()
            .contains("lost the server connection in the middle of a transaction"),
        "{}",
        db.message()
    );
}

/// The rows of `ledger` once `c` is served again: each failed try goes to `check`, and
/// the test fails if it is not served within [`PATIENCE`].
async fn count_once_served(c: &Client, check: impl Fn(&tokio_postgres::Error)) -> i64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match try_count(c).await {
            Ok(n) => return n,
            Err(e) => {
                check(&e);
                assert!(Instant::now() < deadline, "pgmux did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The error of one query that must fail.
async fn rig_query_error(c: &Client) -> tokio_postgres::Error {
    c.simple_query("SELECT 1")
        .await
        .expect_err("no server can be had")
}

#[tokio::test]
async fn slow_link_delays_but_keeps_results_intact() {
    let pg = TestPostgres::shared().await;
    let rig = Rig::start(pg, "faults_slow", MuxOptions::sized(2)).await;
    // Every chunk, both ways, on every link, now and new, waits 20 ms.
    rig.proxy.slow(Links::All, Duration::from_millis(20));

    let c = rig.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    let insert = c.prepare("INSERT INTO ledger VALUES ($1)").await.unwrap();
    for n in 1..=20 {
        c.execute(&insert, &[&n]).await.unwrap();
    }
    commit_rows(&c, 21, 2000).await;
    c.batch_execute("COMMIT").await.unwrap();

    // About 1 MB back, in many chunks, compared with the same query straight to PostgreSQL.
    let sql = "SELECT n, md5(n::text) || repeat('.', 20) FROM ledger ORDER BY n";
    let through: Vec<(i32, String)> = c
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let direct: Vec<(i32, String)> = rig
        .superuser()
        .await
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(through.len(), 2000);
    assert!(through == direct, "the result came through intact");
    let big = c
        .simple_query("SELECT string_agg(md5(n::text), '') FROM generate_series(1, 30000) n")
        .await
        .unwrap();
    assert_eq!(first_row(&big).get(0).map(str::len), Some(30000 * 32));

    // A client logging in now gets a new, slow, server too.
    let late = rig.client().await;
    late.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(count(&late).await, 2000);
    late.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    eprintln!(
        "slow link: {} bytes reached pgmux through {} connections",
        rig.proxy.bytes_to_pgmux(),
        rig.proxy.accepted()
    );

    rig.proxy.resume().await;
    rig.assert_healthy("slow_link", 2000).await;
}

#[tokio::test]
async fn upstream_refusing_connections_gives_08006_naming_it_then_recovers() {
    let pg = TestPostgres::shared().await;
    // A refusal must not be confused with a timeout: connecting may take long.
    let opts = MuxOptions::sized(2).with_pool("connect_timeout = \"60s\"");
    let (rig, c) = Rig::seeded(pg, "faults_refused", opts, 25).await;

    // PostgreSQL "goes away": its connections close and new ones are refused.
    rig.proxy.refuse().await;
    rig.proxy.cut(Links::All).await;

    let upstream = format!("upstream 127.0.0.1:{}", rig.proxy.port);
    let check = |err: &tokio_postgres::Error| {
        let db = db_error(err);
        assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{}", db.message());
        assert!(db.message().contains(&upstream), "{}", db.message());
        assert!(
            db.message().contains("Connection refused"),
            "refused, not timed out: {}",
            db.message()
        );
        format!("{} {}", db.code().code(), db.message())
    };
    let started = Instant::now();
    let seen = check(&c.simple_query("SELECT 1").await.unwrap_err());
    eprintln!("refused: {seen} (after {:?})", started.elapsed());
    for _ in 0..5 {
        check(&c.simple_query("SELECT 1").await.unwrap_err());
    }
    // A new client is told the same, at login or at its first query.
    match rig.try_watched().await {
        Ok(late) => {
            check(&late.client.simple_query("SELECT 1").await.unwrap_err());
        }
        Err(e) => {
            check(&e);
        }
    }

    rig.proxy.resume().await;
    // The same session recovers once connections are accepted again.
    let refused = |e: &tokio_postgres::Error| {
        check(e);
    };
    assert_eq!(count_once_served(&c, refused).await, 25);
    commit_rows(&c, 26, 30).await;
    rig.assert_healthy("upstream_refusing", 30).await;
}

#[tokio::test]
async fn upstream_stalled_mid_result_gives_08006_naming_query_timeout() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions::sized(1).with_pool("query_timeout = \"2s\"");
    let (rig, c) = Rig::seeded(pg, "faults_stall", opts, 30).await;
    c.batch_execute(
        "BEGIN; INSERT INTO ledger SELECT generate_series(31, 60); SET faults.marker = 'dirty'",
    )
    .await
    .unwrap();
    let pid = backend_pid(&c).await;
    let links = rig.proxy.links();
    assert_eq!(links.len(), 1, "the pool's only server");

    // A result that keeps coming: a 16 KB row every 10 ms, each sent as it is made.
    let before = rig.proxy.bytes_to_pgmux();
    let streaming = tokio::spawn(async move {
        let result = c
            .simple_query(
                "SELECT n, repeat('x', 16384), pg_sleep(0.01) FROM generate_series(1, 3000) n",
            )
            .await;
        (c, result)
    });
    // Part of it has reached pgmux: then the upstream stops sending (and reading).
    let deadline = Instant::now() + PATIENCE;
    while rig.proxy.bytes_to_pgmux() < before + 256 * 1024 {
        assert!(Instant::now() < deadline, "the result did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rig.proxy.stall(Links::One(links[0]));

    let (c, result) = streaming.await.unwrap();
    let err = result.expect_err("the stalled query fails");
    let db = db_error(&err);
    eprintln!("stalled mid-result: {} {}", db.code().code(), db.message());
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    assert!(db.message().contains("(query_timeout)"), "{}", db.message());
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "the session ended"
    );

    // The stalled link kept PostgreSQL's socket open; once it flows again the backend
    // learns that pgmux closed its end, and goes.
    rig.proxy.resume().await;
    rig.backend_gone(pid).await;
    rig.assert_healthy("upstream_stalled_mid_result", 30).await;
}

/// Clients of [`DB`] waiting for a server, from `/metrics`.
async fn waiting(rig: &Rig<'_>) -> f64 {
    let metrics = rig.mux.admin_get("/metrics").await.body;
    metrics
        .lines()
        .filter(|l| l.starts_with("pgmux_pool_waiting_clients{"))
        .find(|l| l.contains(&format!("database=\"{DB}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn upstream_down_a_checkout_waits_for_a_lent_server_and_fails_fast_when_none_is_lent() {
    let pg = TestPostgres::shared().await;
    let opts = MuxOptions {
        // A checkout that waited when nothing can come back would hang the test here (and
        // its watchdog would end it), not pass.
        wait_timeout: "10m",
        admin: Some(String::new()),
        ..MuxOptions::sized(3).with_pool("connect_timeout = \"60s\"")
    };
    let rig = Rig::start(pg, "faults_lent", opts).await;
    let waiter = rig.client().await;
    // Every server pgmux has is held in a transaction (one, unless upkeep borrowed it
    // meanwhile and a second was opened), so the waiter needs a new one.
    let holders = rig.hold_every_server(1).await;
    assert!(
        holders.len() < 3,
        "room in the pool for the waiter's server"
    );

    // PostgreSQL stops accepting connections; the holders' links keep working. The pool
    // has a free slot, but its connect attempt is refused: the waiter waits for a lent
    // server instead of failing.
    rig.proxy.refuse().await;
    let query = tokio::spawn(async move {
        let n = try_count(&waiter).await;
        (waiter, n)
    });
    let queued = || async { waiting(&rig).await >= 1.0 };
    assert!(common::eventually(PATIENCE, queued).await, "no waiter");
    let log = rig.mux.stderr_log();
    assert!(log.contains("cannot connect to upstream"), "{log}");
    holders[0].batch_execute("COMMIT").await.unwrap();
    let (waiter, n) = query.await.unwrap();
    assert_eq!(
        n.unwrap(),
        1,
        "the waiter got the server the holder gave back"
    );

    // Still down, and with every server held again the next checkout (which finds the
    // pool down, or tries again and is refused) waits too.
    holders[0]
        .batch_execute("BEGIN; INSERT INTO ledger VALUES (10)")
        .await
        .unwrap();
    let query = tokio::spawn(async move {
        let n = try_count(&waiter).await;
        (waiter, n)
    });
    assert!(common::eventually(PATIENCE, queued).await, "no waiter");
    holders[0].batch_execute("COMMIT").await.unwrap();
    let (waiter, n) = query.await.unwrap();
    assert_eq!(n.unwrap(), 2);

    // Nothing lent, and the idle servers' links cut: the upstream is down and nothing can
    // come back, so the checkout fails at once (not after wait_timeout), naming it.
    for holder in &holders[1..] {
        holder.batch_execute("ROLLBACK").await.unwrap();
    }
    rig.proxy.cut(Links::All).await;
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    let db = db_error(&err);
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{}", db.message());
    let upstream = format!("upstream 127.0.0.1:{}", rig.proxy.port);
    assert!(db.message().contains(&upstream), "{}", db.message());
    assert_eq!(waiting(&rig).await, 0.0);

    rig.proxy.resume().await;
    let back = || async { try_count(&waiter).await.is_ok() };
    assert!(
        common::eventually(PATIENCE, back).await,
        "pgmux did not recover"
    );
    drop((holders, waiter));
    rig.assert_healthy("down_pool_lent", 2).await;
}
