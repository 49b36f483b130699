//! A throwaway PostgreSQL cluster: initdb into a temp dir, `postgres` on a free port of
//! 127.0.0.1 plus a unix socket in that dir, SCRAM users `app` and `other`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::watchdog::{Watchdog, sh_quote};
use super::{clean_pg_env, free_port, log_tail};

/// The superuser initdb creates (`-U postgres`), whatever the OS user; it logs in without
/// a password over the unix socket, and with this password over TCP.
pub const SUPERUSER: &str = "postgres";
/// The superuser's password, for TCP.
pub const SUPERUSER_PASSWORD: &str = "postgres";

const INSTALL_HINT: &str = "apt-get install -y postgresql (or set PGMUX_PG_BINDIR)";

/// TLS for a test cluster: `ssl = on` with this certificate and key (PEM), optionally
/// `hostssl`-only TCP and a client certificate checked against `client_ca_pem`
/// (`clientcert=verify-ca` in pg_hba.conf).
#[derive(Clone, Debug, Default)]
pub struct PgSsl {
    pub cert_pem: String,
    pub key_pem: String,
    /// TCP clients must use TLS (`hostssl`); else `host` takes both.
    pub hostssl_only: bool,
    /// Set: `ssl_ca_file` and `clientcert=verify-ca` on the TCP line.
    pub client_ca_pem: Option<String>,
}

/// A PostgreSQL cluster owned by one test (`start`) or by one test binary (`shared`).
///
/// Dropping it stops the server (immediate) and removes its files; if the test process dies
/// without dropping it, a watchdog does the same.
pub struct TestPostgres {
    /// The TCP port on 127.0.0.1; the same across `stop`/`restart`.
    pub port: u16,
    cluster: Arc<Cluster>,
    cleanup: Option<Watchdog>,
}

impl TestPostgres {
    /// Creates and starts a new cluster with roles `app`/`app_pw` and `other`/`other_pw`
    /// and database `app` owned by `app`. Panics with an install hint if the PostgreSQL
    /// server binaries are missing, or with the server log if it cannot start.
    pub async fn start() -> TestPostgres {
        Self::start_with(None).await
    }

    /// Like [`TestPostgres::start`], with TLS as `ssl` says.
    pub async fn start_with_ssl(ssl: PgSsl) -> TestPostgres {
        Self::start_with(Some(ssl)).await
    }

    async fn start_with(ssl: Option<PgSsl>) -> TestPostgres {
        let cluster = tokio::task::spawn_blocking(Cluster::create)
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let cluster = Arc::new(cluster);
        // Armed before anything runs in the dir, so that a panic below cleans up too.
        let cleanup = Watchdog::spawn(&cluster.cleanup_script(), &cluster.root);
        let mut pg = TestPostgres {
            port: 0,
            cluster: cluster.clone(),
            cleanup: Some(cleanup),
        };
        pg.port = tokio::task::spawn_blocking(move || {
            cluster.initdb(ssl.as_ref());
            cluster.start_on_a_free_port()
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        pg.create_roles().await;
        pg
    }

    /// One cluster per test binary, started by the first test that asks and stopped when
    /// the process exits. It depends on no tokio runtime staying alive (each
    /// `#[tokio::test]` has its own), so any test may use it.
    pub async fn shared() -> &'static TestPostgres {
        static SHARED: tokio::sync::OnceCell<TestPostgres> = tokio::sync::OnceCell::const_new();
        SHARED.get_or_init(TestPostgres::start).await
    }

    /// The directory with the PostgreSQL binaries (and psql and pgbench, normally).
    pub fn bin_dir(&self) -> &Path {
        &self.cluster.bin_dir
    }

    /// The cluster's temp dir: `data/`, `postgres.log` and the unix socket.
    pub fn dir(&self) -> &Path {
        &self.cluster.root
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.cluster.log()).unwrap_or_default()
    }

    /// Stops the server (`pg_ctl stop -m fast`), keeping its data; see `restart`.
    pub async fn stop(&self) {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop("fast"))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            .unwrap_or_else(|e| panic!("stopping PostgreSQL: {e}"));
    }

    /// Starts the server again on the same port, waiting until it accepts connections.
    pub async fn restart(&self) {
        let cluster = self.cluster.clone();
        let port = self.port;
        tokio::task::spawn_blocking(move || {
            // Only someone else's socket on our port can stop this; wait for it to go.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match cluster.start_at(port) {
                    Ok(()) => return,
                    Err(e) if e.port_in_use && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("restarting PostgreSQL on port {port}: {}", e.detail),
                }
            }
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    /// A superuser connection to database `app`, over the unix socket. Its connection
    /// task runs on the calling test's runtime.
    pub async fn superuser(&self) -> tokio_postgres::Client {
        self.superuser_on("app").await
    }

    /// A superuser connection to `database`, over the unix socket.
    pub async fn superuser_on(&self, database: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.cluster.root)
            .port(self.port)
            .user(SUPERUSER)
            .dbname(database)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("superuser connection to {database} failed: {e}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// `postgresql://user:password@127.0.0.1:port/database` straight to PostgreSQL.
    pub fn url(&self, database: &str, user: &str) -> String {
        let password = super::password_for(user);
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    async fn create_roles(&self) {
        let su = self.superuser_on("postgres").await;
        // One statement per message: CREATE DATABASE refuses an implicit transaction.
        let statements = [
            format!("ALTER ROLE {SUPERUSER} PASSWORD '{SUPERUSER_PASSWORD}'"),
            "CREATE ROLE app LOGIN PASSWORD 'app_pw'".to_string(),
            "CREATE ROLE other LOGIN PASSWORD 'other_pw'".to_string(),
            "CREATE DATABASE app OWNER app".to_string(),
        ];
        for sql in statements {
            su.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let su = self.superuser_on("app").await;
        su.batch_execute("GRANT ALL ON SCHEMA public TO other")
            .await
            .unwrap_or_else(|e| panic!("granting schema public to other: {e}"));
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log ({}), last lines ---\n{}",
                self.cluster.log().display(),
                log_tail(&self.log(), 40)
            );
        }
        // The watchdog's script: pg_ctl stop -m immediate, then rm -rf the dir.
        drop(self.cleanup.take());
    }
}

/// Why `pg_ctl start` failed.
struct StartError {
    port_in_use: bool,
    detail: String,
}

/// The files and binaries of one cluster; blocking operations, run off the runtime.
struct Cluster {
    bin_dir: PathBuf,
    /// Temp dir owned by the OS user that runs PostgreSQL.
    root: PathBuf,
    /// Root runs PostgreSQL as the `postgres` OS user, which initdb and postgres require.
    as_postgres_user: bool,
}

impl Cluster {
    /// Finds the binaries and makes the temp dir (owned by `postgres` when root).
    fn create() -> Cluster {
        let bin_dir = server_bin_dir()
            .unwrap_or_else(|| panic!("PostgreSQL server binaries not found: {INSTALL_HINT}"));
        let as_postgres_user = running_as_root();
        if as_postgres_user && !succeeds(Command::new("id").args(["-u", "postgres"])) {
            panic!(
                "running the tests as root needs the `postgres` OS user to run PostgreSQL \
                 ({INSTALL_HINT} creates it), or run them as a normal user"
            );
        }
        // Always under /tmp: world-traversable for the postgres user, and short enough for
        // a unix socket path (108 bytes).
        let root = tempfile::Builder::new()
            .prefix("pgmux-pg-")
            .tempdir_in(Path::new("/tmp"))
            .expect("a temp dir in /tmp")
            .keep();
        if as_postgres_user {
            let chown = Command::new("chown").arg("postgres").arg(&root).output();
            let ok = chown.as_ref().is_ok_and(|o| o.status.success());
            if !ok {
                let _ = fs::remove_dir_all(&root);
                panic!("chown postgres {}: {chown:?}", root.display());
            }
        }
        Cluster {
            bin_dir,
            root,
            as_postgres_user,
        }
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// A command for one of the PostgreSQL binaries, as the right OS user.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin_dir.join(program);
        let mut cmd = if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(exe);
            cmd
        } else {
            Command::new(exe)
        };
        // The postgres user may not be able to enter the test's working directory.
        cmd.current_dir(&self.root).stdin(Stdio::null());
        clean_pg_env(&mut cmd);
        cmd
    }

    /// The shell lines the watchdog runs: stop the server if running, remove the dir.
    fn cleanup_script(&self) -> String {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let run_as = if self.as_postgres_user {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let data = sh_quote(&self.data().to_string_lossy());
        format!(
            "if [ -f {data}/postmaster.pid ]; then {run_as}{pg_ctl} stop -D {data} -m immediate -w -t 30 -s; fi\n\
             rm -rf {root}",
            pg_ctl = sh_quote(&pg_ctl.to_string_lossy()),
            root = sh_quote(&self.root.to_string_lossy()),
        )
    }

    /// initdb (fast: no fsync, trust), then the test settings and pg_hba.conf (and TLS).
    fn initdb(&self, ssl: Option<&PgSsl>) {
        let data = self.data();
        let out = self
            .command("initdb")
            .args([
                "--no-sync",
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--no-locale",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .output();
        check("initdb", &out).unwrap_or_else(|e| panic!("{e}"));

        let settings = format!(
            "\n# pgmux tests\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             max_connections = 200\n\
             max_prepared_transactions = 10\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 32MB\n\
             lc_messages = 'C'\n",
            self.root.display()
        );
        append(&data.join("postgresql.conf"), &settings);
        let mut hba = "host all all 127.0.0.1/32 scram-sha-256\n".to_owned();
        if let Some(ssl) = ssl {
            self.write_private(&data.join("server.crt"), &ssl.cert_pem);
            self.write_private(&data.join("server.key"), &ssl.key_pem);
            let mut conf =
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n".to_owned();
            let connection = if ssl.hostssl_only { "hostssl" } else { "host" };
            hba = format!("{connection} all all 127.0.0.1/32 scram-sha-256");
            if let Some(ca) = &ssl.client_ca_pem {
                self.write_private(&data.join("client_ca.crt"), ca);
                conf.push_str("ssl_ca_file = 'client_ca.crt'\n");
                hba.push_str(" clientcert=verify-ca");
            }
            hba.push('\n');
            append(&data.join("postgresql.conf"), &conf);
        }
        // Overwriting keeps the file's owner (postgres when root).
        fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{hba}"),
        )
        .expect("pg_hba.conf is writable");
    }

    /// Writes a file in the data dir that only the server's OS user may read (PostgreSQL
    /// refuses a key file others can read).
    fn write_private(&self, path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        if self.as_postgres_user {
            let chown = Command::new("chown").arg("postgres").arg(path).output();
            check("chown postgres", &chown).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Starts the server on a free port, retrying when another process takes the port
    /// between our probe and postgres' bind.
    fn start_on_a_free_port(&self) -> u16 {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match self.start_at(port) {
                Ok(()) => return port,
                Err(e) if e.port_in_use => last = e.detail,
                Err(e) => panic!("PostgreSQL did not start: {}", e.detail),
            }
        }
        panic!("PostgreSQL did not start: ports kept being taken: {last}");
    }

    /// `pg_ctl start -w` on `port`: returns once the server accepts connections.
    fn start_at(&self, port: u16) -> Result<(), StartError> {
        let log = self.log();
        let log_before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = self
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-s", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!("-p {port}"))
            .output();
        match check("pg_ctl start", &out) {
            Ok(()) => Ok(()),
            Err(e) => {
                let all = fs::read(&log).unwrap_or_default();
                let new = all.get(log_before as usize..).unwrap_or(&all);
                let new = String::from_utf8_lossy(new);
                Err(StartError {
                    port_in_use: new.contains("already in use"),
                    detail: format!("{e}\n--- server log ---\n{}", log_tail(&new, 40)),
                })
            }
        }
    }

    /// `pg_ctl stop -w -m mode`.
    fn stop(&self, mode: &str) -> Result<(), String> {
        let out = self
            .command("pg_ctl")
            .args(["stop", "-w", "-t", "60", "-s", "-m", mode, "-D"])
            .arg(self.data())
            .output();
        check("pg_ctl stop", &out)
    }
}

/// Where `postgres`, `initdb` and `pg_ctl` are: `$PGMUX_PG_BINDIR`, else PATH, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`. Found once per process.
pub fn server_bin_dir() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND.get_or_init(find_server_bin_dir).clone()
}

fn find_server_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PGMUX_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(
            has_server(&dir),
            "PGMUX_PG_BINDIR={} has no postgres, initdb and pg_ctl",
            dir.display()
        );
        return Some(dir);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
            // Often a symlink (/usr/local/bin/postgres): its real dir has psql and pgbench.
            let real = fs::canonicalize(dir.join("postgres"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            for candidate in real.into_iter().chain([dir]) {
                if has_server(&candidate) {
                    return Some(candidate);
                }
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn has_server(dir: &Path) -> bool {
    ["postgres", "initdb", "pg_ctl"]
        .iter()
        .all(|bin| dir.join(bin).is_file())
}

/// Whether this process runs as root (`id -u` is 0).
pub fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Ok if the command ran and succeeded; else what it printed.
fn check(what: &str, out: &std::io::Result<Output>) -> Result<(), String> {
    match out {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{what} did not run: {e}")),
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("appending to {}: {e}", path.display()));
}
