//! The pgmux binary under test: a generated config, a free port, its log in a temp dir.

use std::fs::{self, File};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::watchdog::Watchdog;
use super::{TestPostgres, free_port, log_tail, password_for};

/// How long pgmux gets to listen after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings for the config `TestPgmux` writes. Durations are pgmux duration strings.
#[derive(Clone, Debug)]
pub struct MuxOptions {
    /// `[pool] mode`: session | transaction | statement.
    pub mode: &'static str,
    /// `[pool] size`.
    pub size: u32,
    /// `[pool] min_size`.
    pub min_size: u32,
    /// `[pool] wait_timeout`.
    pub wait_timeout: &'static str,
    /// `[pool] idle_transaction_timeout`.
    pub idle_transaction_timeout: &'static str,
    /// `[server] max_client_conn`.
    pub max_client_conn: usize,
    /// `[server] client_login_timeout`.
    pub client_login_timeout: &'static str,
    /// `[auth] method`: scram-sha-256 | md5 | trust.
    pub auth_method: &'static str,
    /// Raw TOML lines added to `[server]`, e.g. `shutdown_timeout = "1s"`.
    pub server_extra: String,
    /// Raw TOML lines added to `[auth]`, e.g. `admin_users = ["other"]`.
    pub auth_extra: String,
    /// Raw TOML lines added to `[pool]`, e.g. `idle_timeout = "1s"` (replacing the default line).
    pub pool_extra: String,
    /// Raw TOML appended at the end of the file, e.g. more `[databases.x]` tables.
    pub extra: String,
    /// `Some(lines)`: start the admin HTTP port on a free port (`[admin] listen`), with
    /// these raw TOML lines added to `[admin]` (e.g. `token = "t"`). `None`: no admin port.
    pub admin: Option<String>,
    /// Environment variables for the pgmux process (e.g. `PGMUX_TEST_PANIC_ON`).
    pub env: Vec<(&'static str, String)>,
}

impl Default for MuxOptions {
    fn default() -> Self {
        MuxOptions {
            mode: "transaction",
            size: 2,
            min_size: 0,
            wait_timeout: "5s",
            idle_transaction_timeout: "0s",
            max_client_conn: 10_000,
            client_login_timeout: "15s",
            auth_method: "scram-sha-256",
            server_extra: String::new(),
            auth_extra: String::new(),
            pool_extra: String::new(),
            extra: String::new(),
            admin: None,
            env: Vec::new(),
        }
    }
}

impl MuxOptions {
    /// The defaults with a pool of `size` server connections.
    pub fn sized(size: u32) -> Self {
        MuxOptions {
            size,
            ..MuxOptions::default()
        }
    }

    /// These options with `[pool] wait_timeout = timeout`.
    pub fn waiting(mut self, timeout: &'static str) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// These options with `[auth] method = method`.
    pub fn with_auth_method(mut self, method: &'static str) -> Self {
        self.auth_method = method;
        self
    }

    /// These options with raw TOML `lines` added to `[pool]`, e.g. `query_timeout = "2s"`.
    pub fn with_pool(mut self, lines: &str) -> Self {
        self.pool_extra = lines.to_owned();
        self
    }

    /// These options with `[server] client_login_timeout = timeout`.
    pub fn with_login_timeout(mut self, timeout: &'static str) -> Self {
        self.client_login_timeout = timeout;
        self
    }
}

/// A running pgmux (`CARGO_BIN_EXE_pgmux`) in front of a `TestPostgres`, logging at
/// `pgmux=debug` (unless `RUST_LOG` is set) to a file. Dropping it kills the process; so
/// does a watchdog if the test process dies first.
pub struct TestPgmux {
    /// The client port on 127.0.0.1.
    pub port: u16,
    /// The config file it was started with; rewrite it and `signal("HUP")` to reload.
    pub config_path: PathBuf,
    /// The admin HTTP port on 127.0.0.1, when `MuxOptions::admin` asked for one.
    pub admin_port: Option<u16>,
    /// Set by a test that makes pgmux panic on purpose: its log may then say so.
    pub expect_panics: bool,
    process: Process,
    /// The process serving now, after upgrades (`upgrade`); `None`: the one started.
    upgraded: Option<u32>,
    /// Kill the processes upgrades started, when the test ends.
    successors: Vec<Watchdog>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestPgmux {
    /// The handle of a pgmux `process` that listens on `port`, its files in `dir`.
    fn listening(
        port: u16,
        admin_port: Option<u16>,
        process: Process,
        dir: tempfile::TempDir,
    ) -> TestPgmux {
        TestPgmux {
            port,
            config_path: dir.path().join("pgmux.toml"),
            admin_port,
            expect_panics: false,
            process,
            upgraded: None,
            successors: Vec::new(),
            log_path: dir.path().join("pgmux.log"),
            _dir: dir,
        }
    }

    /// Writes a config for `pg` and starts pgmux on a free port; returns once it listens.
    /// Panics with pgmux's output if it exits or does not listen within 10 s.
    pub async fn start(pg: &TestPostgres, opts: MuxOptions) -> TestPgmux {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-mux-")
            .tempdir()
            .expect("a temp dir for pgmux");
        let config_path = dir.path().join("pgmux.toml");
        let log_path = dir.path().join("pgmux.log");
        for _ in 0..5 {
            let port = free_port();
            let admin_port = opts.admin.as_ref().map(|_| free_port());
            let text = Self::config_toml_with_admin(pg, &opts, port, admin_port);
            fs::write(&config_path, with_pid_file(&text, &config_path)).expect("config written");
            let mut process = Process::spawn(&config_path, &log_path, dir.path(), &opts.env);
            match process.wait_listening(port, &log_path).await {
                Ready::Listening => {
                    return TestPgmux::listening(port, admin_port, process, dir);
                }
                // Another process took the port between our probe and pgmux's bind.
                Ready::PortTaken => continue,
            }
        }
        panic!(
            "pgmux could not listen: ports kept being taken\n{}",
            read_log(&log_path)
        );
    }

    /// Starts pgmux on the given client `port` (and an admin port of its own if `opts` asks
    /// for one), for processes that share a port with `[server] reuse_port = true`;
    /// returns once it listens. Panics if the port stays taken or pgmux does not listen.
    pub async fn start_on(pg: &TestPostgres, opts: MuxOptions, port: u16) -> TestPgmux {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-mux-")
            .tempdir()
            .expect("a temp dir for pgmux");
        let config_path = dir.path().join("pgmux.toml");
        let log_path = dir.path().join("pgmux.log");
        // Only the admin port is picked here: a retry picks another one.
        for _ in 0..5 {
            let admin_port = opts.admin.as_ref().map(|_| free_port());
            let text = Self::config_toml_with_admin(pg, &opts, port, admin_port);
            fs::write(&config_path, with_pid_file(&text, &config_path)).expect("config written");
            let mut process = Process::spawn(&config_path, &log_path, dir.path(), &opts.env);
            if let Ready::Listening = process.wait_listening(port, &log_path).await {
                return TestPgmux::listening(port, admin_port, process, dir);
            }
        }
        panic!(
            "pgmux could not listen on {port}: in use (without reuse_port?)\n{}",
            read_log(&log_path)
        );
    }

    /// The config `start` writes for `pg`, listening on `port`, with the admin port on
    /// `admin_port` (and `opts.admin`'s lines) if given.
    pub fn config_toml_with_admin(
        pg: &TestPostgres,
        opts: &MuxOptions,
        port: u16,
        admin_port: Option<u16>,
    ) -> String {
        let mut text = Self::config_toml(pg, opts, port);
        if let Some(admin_port) = admin_port {
            let lines = opts.admin.as_deref().unwrap_or_default();
            text.push_str(&format!(
                "\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{lines}\n"
            ));
        }
        text
    }

    /// Rewrites the config file for `opts`, keeping the ports; follow with
    /// `signal("HUP")` or `POST /reload`.
    pub fn rewrite_config(&self, pg: &TestPostgres, opts: &MuxOptions) {
        let text = Self::config_toml_with_admin(pg, opts, self.port, self.admin_port);
        fs::write(&self.config_path, with_pid_file(&text, &self.config_path))
            .expect("config rewritten");
    }

    /// Sends an HTTP request to the admin port (with `Authorization: Bearer token` if
    /// given); panics if pgmux has no admin port.
    pub async fn admin(&self, method: &str, path: &str, token: Option<&str>) -> super::Http {
        let port = self.admin_port.expect("started with MuxOptions::admin");
        super::http::request(port, method, path, token).await
    }

    /// `GET path` on the admin port, without a token.
    pub async fn admin_get(&self, path: &str) -> super::Http {
        self.admin("GET", path, None).await
    }

    /// A `/metrics` sample with these labels, if present (no token).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let body = self.admin_get("/metrics").await.body;
        super::metric_sample(&super::parse_metrics(&body), name, labels)
    }

    /// `POST path` on the admin port, without a token.
    pub async fn admin_post(&self, path: &str) -> super::Http {
        self.admin("POST", path, None).await
    }

    /// The config `start` writes for `pg`, listening on `port` (no admin port).
    pub fn config_toml(pg: &TestPostgres, opts: &MuxOptions, port: u16) -> String {
        // A key given in pool_extra/server_extra replaces the default line for it.
        let keep = |line: &&str, extra: &str| {
            let key = line.split('=').next().unwrap_or_default().trim();
            key.is_empty()
                || !extra
                    .lines()
                    .any(|l| l.split('=').next().unwrap_or_default().trim() == key)
        };
        let text = format!(
            r#"[server]
listen = "127.0.0.1:{port}"
max_client_conn = {max_client_conn}
client_login_timeout = "{client_login_timeout}"
shutdown_timeout = "30s"
{server_extra}
[auth]
method = "{auth_method}"
{auth_extra}

[pool]
mode = "{mode}"
size = {size}
min_size = {min_size}
wait_timeout = "{wait_timeout}"
idle_timeout = "10m"
max_lifetime = "1h"
connect_timeout = "5s"
idle_transaction_timeout = "{idle_transaction_timeout}"
{pool_extra}
[databases.app]
host = "127.0.0.1"
port = {pg_port}
dbname = "app"

[users.app]
password = "app_pw"

[users.other]
password = "other_pw"

{extra}
"#,
            max_client_conn = opts.max_client_conn,
            client_login_timeout = opts.client_login_timeout,
            auth_method = opts.auth_method,
            mode = opts.mode,
            size = opts.size,
            min_size = opts.min_size,
            wait_timeout = opts.wait_timeout,
            idle_transaction_timeout = opts.idle_transaction_timeout,
            pg_port = pg.port,
            server_extra = opts.server_extra,
            auth_extra = opts.auth_extra,
            pool_extra = opts.pool_extra,
            extra = opts.extra,
        );
        let mut section = String::new();
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with('[') {
                section = line.to_owned();
            }
            let extra = match section.as_str() {
                "[server]" => &opts.server_extra,
                "[pool]" => &opts.pool_extra,
                _ => "",
            };
            let is_extra_line = extra.lines().any(|l| l == line);
            if is_extra_line || keep(&line, extra) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Connects as `user` (password from `password_for`) to `database`; panics on failure.
    pub async fn connect(&self, database: &str, user: &str) -> tokio_postgres::Client {
        match self.try_connect(database, user, password_for(user)).await {
            Ok((client, _connection)) => client,
            Err(e) => panic!("connecting to pgmux as {user} to {database}: {e}"),
        }
    }

    /// Whether pgmux still serves a new client: `app` logs in to `app` and `SELECT 1`
    /// answers 1 (panics otherwise).
    pub async fn still_serving(&self) {
        let client = self.connect("app", "app").await;
        super::answers_select_1(&client).await;
    }

    /// Connects with this password. The connection task is spawned on the caller's runtime;
    /// its handle ends when the connection closes (abort it to drop the socket).
    pub async fn try_connect(
        &self,
        database: &str,
        user: &str,
        password: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(database)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok((client, task))
    }

    /// `postgresql://user:password@127.0.0.1:port/database`, for psql and pgbench.
    pub fn url(&self, database: &str, user: &str) -> String {
        let password = password_for(user);
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// What pgmux wrote to stdout and stderr so far.
    pub fn stderr_log(&self) -> String {
        read_log(&self.log_path)
    }

    /// pgmux's process id: the process serving now (after `upgrade`, the newest).
    pub fn pid(&self) -> u32 {
        self.upgraded.unwrap_or_else(|| self.process.child.id())
    }

    /// The pid file pgmux writes (`server.pid_file`, in the test's temp dir).
    pub fn pid_file(&self) -> PathBuf {
        pid_file_of(&self.config_path)
    }

    /// Runs `pgmux upgrade` (which waits until a new process took over; panics if it
    /// fails), then waits until the old process has exited, every client moved. Returns
    /// the new process's id; it is killed when the test ends.
    pub async fn upgrade(&mut self) -> u32 {
        let old = self.pid();
        let new = self.request_upgrade().await;
        self.wait_gone(old).await;
        new
    }

    /// Runs `pgmux upgrade` (which waits until a new process took over; panics if it
    /// fails) and returns the new process's id, which is the one `pid` names from now on
    /// and is killed when the test ends. The old one may still finish transactions.
    pub async fn request_upgrade(&mut self) -> u32 {
        let old = self.pid();
        let config = self.config_path.display().to_string();
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            super::pgmux_cli(&["upgrade", "--config", &config])
        })
        .await
        .expect("pgmux upgrade ran");
        assert_eq!(
            code,
            0,
            "pgmux upgrade failed:\n{out}{err}\n{}",
            self.stderr_log()
        );
        let new: u32 = fs::read_to_string(self.pid_file())
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid in the pid file");
        assert_ne!(new, old, "{err}");
        let dir = self.config_path.parent().expect("a temp dir").to_owned();
        self.successors
            .push(Watchdog::spawn(&format!("kill -KILL {new}"), &dir));
        self.upgraded = Some(new);
        new
    }

    /// Waits until process `pid` (the one started, or one an upgrade started) has exited.
    pub async fn wait_gone(&mut self, pid: u32) {
        loop {
            if pid == self.process.child.id() {
                if let Ok(Some(_)) = self.process.child.try_wait() {
                    return;
                }
            } else {
                // Not our child: gone, or a zombie waiting for its reaper.
                match fs::read_to_string(format!("/proc/{pid}/stat")) {
                    Err(_) => return,
                    Ok(stat)
                        if stat
                            .rsplit(')')
                            .next()
                            .is_some_and(|r| r.trim_start().starts_with('Z')) =>
                    {
                        return;
                    }
                    Ok(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether process `pid` still runs (not exited, not a zombie).
    pub fn alive(&mut self, pid: u32) -> bool {
        if pid == self.process.child.id() {
            return matches!(self.process.child.try_wait(), Ok(None));
        }
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    }

    /// Sends a signal by name (`"TERM"`, `"HUP"`, `"INT"`) with `kill -s`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -s {sig} {} failed", self.pid());
    }

    /// Waits (polling) until pgmux exits, up to `limit`; returns whether it did.
    pub async fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.process.child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Drop for TestPgmux {
    fn drop(&mut self) {
        let log = self.stderr_log();
        if !std::thread::panicking() && !self.expect_panics && log.contains("panicked at") {
            panic!("pgmux panicked during the test:\n{}", log_tail(&log, 60));
        }
        if std::thread::panicking() {
            eprintln!(
                "--- pgmux log ({}), last lines ---\n{}",
                self.log_path.display(),
                log_tail(&self.stderr_log(), 60)
            );
        }
    }
}

/// How a start attempt ended.
enum Ready {
    Listening,
    PortTaken,
}

/// The pgmux child and its watchdog; dropping it kills pgmux.
struct Process {
    child: Child,
    watchdog: Watchdog,
}

impl Process {
    fn spawn(config: &Path, log_path: &Path, dir: &Path, env: &[(&str, String)]) -> Process {
        let log = File::create(log_path).expect("pgmux log file");
        // Cargo sets this for integration tests only; the fuzz crate, which includes this
        // harness too, runs pgmux in its own process and never gets here.
        let Some(exe) = option_env!("CARGO_BIN_EXE_pgmux") else {
            panic!("no pgmux binary: cargo builds it for integration tests only");
        };
        let mut cmd = Command::new(exe);
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "pgmux=debug");
        }
        let child = cmd.spawn().expect("the pgmux binary starts");
        let watchdog = Watchdog::spawn(&format!("kill -KILL {}", child.id()), dir);
        Process { child, watchdog }
    }

    /// Polls until pgmux listens on `port`; panics if it exits for another reason than
    /// the port being taken, or takes too long.
    async fn wait_listening(&mut self, port: u16, log_path: &Path) -> Ready {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid = self.child.id();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = read_log(log_path);
                if log.contains("in use") {
                    return Ready::PortTaken;
                }
                panic!("pgmux exited ({status}) before listening on 127.0.0.1:{port}:\n{log}");
            }
            if listening(pid, port) {
                return Ready::Listening;
            }
            if Instant::now() > deadline {
                panic!(
                    "pgmux did not listen on 127.0.0.1:{port} within {START_TIMEOUT:?}:\n{}",
                    read_log(log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Disarm first: once pgmux is reaped its pid may be reused.
        self.watchdog.disarm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` has a socket listening on TCP `port`. On Linux this reads /proc, so no
/// probe connection reaches pgmux (a probe would count against max_client_conn) and a
/// stranger's socket on the port is not mistaken for pgmux; elsewhere it connects.
fn listening(pid: u32, port: u16) -> bool {
    let tables = ["/proc/net/tcp", "/proc/net/tcp6"].map(fs::read_to_string);
    if tables.iter().all(Result::is_err) {
        return TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        )
        .is_ok();
    }
    let inodes: Vec<String> = tables
        .iter()
        .flatten()
        .flat_map(|table| table.lines().skip(1))
        .filter_map(|line| {
            // sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening = *fields.get(3)? == "0A";
            let inode = fields.get(9)?;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .any(|link| {
            inodes
                .iter()
                .any(|inode| link.as_os_str() == inode.as_str())
        })
}

/// The pid file of the pgmux whose config is `config`: next to it.
fn pid_file_of(config: &Path) -> PathBuf {
    config.with_file_name("pgmux.pid")
}

/// `text` with `pid_file` set in its `[server]` section, next to the config file.
fn with_pid_file(text: &str, config: &Path) -> String {
    if text.contains("\npid_file") {
        return text.to_owned();
    }
    let line = format!(
        "[server]\npid_file = \"{}\"\n",
        pid_file_of(config).display()
    );
    text.replacen("[server]\n", &line, 1)
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}
