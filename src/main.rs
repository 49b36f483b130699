//! The pgmux daemon: command line, logging, signals and wiring. Nothing else.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use pgmux::config::Config;
use pgmux::drain::Step;
use pgmux::logging::{self, LogWriter};
use pgmux::pooler::Pooler;
use pgmux::workers::Workers;

mod import_pgbouncer;

/// How long the last log lines get to reach stderr when pgmux exits.
const LOG_FLUSH: Duration = Duration::from_secs(1);
/// How long the signal watcher waits before it starts again after a panic.
const SIGNAL_RESTART: Duration = Duration::from_millis(100);

/// A PostgreSQL connection pooler: many client sessions on a few server connections.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The TOML config file.
    #[arg(
        long,
        short,
        global = true,
        env = "PGMUX_CONFIG",
        default_value = "config/pgmux.toml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print it as pgmux sees it, secrets masked.
    Check,
    /// Convert a PgBouncer config (pgbouncer.ini) into pgmux TOML.
    ImportPgbouncer {
        /// The pgbouncer.ini to read (its %include files, auth_file and auth_hba_file are
        /// found relative to it).
        ini: PathBuf,
        /// Write the TOML here instead of to stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Upgrade the running pgmux without dropping anyone: sends SIGUSR2 to the process the
    /// pid file names (server.pid_file) and waits until a new process has taken over.
    Upgrade,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_logging(cli.log_format);
    logging::install_panic_hook();
    let code = run_cli(cli);
    log.flush(LOG_FLUSH);
    code
}

fn run_cli(cli: Cli) -> ExitCode {
    // What pgmux prints itself goes through write!, not (e)println!: those panic when the
    // terminal or pipe is gone (`pgmux check | head -1`).
    if let Some(Command::ImportPgbouncer { ini, output }) = &cli.command {
        return import(ini, output.as_deref());
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            let path = cli.config.display();
            let _ = writeln!(std::io::stderr(), "pgmux: invalid config {path}:\n{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Upgrade) = cli.command {
        return match pgmux::upgrade::request(&config.server) {
            Ok(done) => {
                let _ = writeln!(std::io::stderr(), "pgmux: {done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "pgmux: upgrade failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Check) = cli.command {
        let _ = writeln!(std::io::stdout(), "{}", config.masked());
        let path = cli.config.display();
        let _ = writeln!(std::io::stderr(), "pgmux: {path} is valid");
        return ExitCode::SUCCESS;
    }
    // One current-thread runtime per worker thread, this one included (workers.rs): a
    // session stays on one thread, so each costs what it costs with one thread (no work
    // stealing, no cross-thread wakeups of its own), and the pools stay shared.
    let threads = config.server.worker_threads.resolve();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let workers = match Workers::start(threads) {
        Ok(workers) => Arc::new(workers),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "pgmux: cannot start {threads} worker threads: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(config, cli.config, workers.clone()));
    if let Some(workers) = Arc::into_inner(workers) {
        workers.stop();
    }
    code
}

/// `pgmux import-pgbouncer`: needs no pgmux config, only the ini.
fn import(ini: &std::path::Path, output: Option<&std::path::Path>) -> ExitCode {
    let toml = match import_pgbouncer::convert(ini) {
        Ok(toml) => toml,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "pgmux: cannot import {}:\n{e}",
                ini.display()
            );
            return ExitCode::from(2);
        }
    };
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &toml) {
                let _ = writeln!(
                    std::io::stderr(),
                    "pgmux: cannot write {}: {e}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            let _ = writeln!(
                std::io::stderr(),
                "pgmux: wrote {}; check it with `pgmux check --config {}`",
                path.display(),
                path.display()
            );
        }
        None => {
            if std::io::stdout().write_all(toml.as_bytes()).is_err() {
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

async fn run(config: Config, path: PathBuf, workers: Arc<Workers>) -> ExitCode {
    // SIGUSR2's default action ends the process: take it over before the pid file tells
    // `pgmux upgrade` whom to send it to. (The handler stays installed for the process.)
    let _ = signal(SignalKind::user_defined2());
    // Started by an upgrade: the old process's listening sockets, instead of binding.
    let mut inherited = match pgmux::upgrade::inherit().await {
        Ok(inherited) => inherited,
        Err(e) => {
            error!(error = %e, "cannot take over from the old process");
            return ExitCode::FAILURE;
        }
    };
    if inherited.is_some()
        && let Some(notifier) = pgmux::sd_notify::global()
    {
        notifier.started_by_upgrade();
    }
    let mut take = |name: String| inherited.as_mut().and_then(|i| i.take(&name));
    // The admin port first: once clients can connect, it answers too. Bound here, so
    // that a port in use stops pgmux; served on a thread of its own (admin::start).
    let admin = match &config.admin.listen {
        Some(addr) if let Some(listener) = take(format!("admin {addr}")) => Some(listener),
        Some(addr) => match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                info!(%addr, "admin port listening (metrics, health, pools, reload)");
                Some(listener)
            }
            Err(e) => {
                error!(%addr, error = %e, "cannot listen on the admin port");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let client_addrs = config.server.listen.clone();
    let server = config.server.clone();
    let admin_addr = config.admin.listen.clone();
    let pooler = match Pooler::new(config) {
        Ok(pooler) => pooler,
        Err(e) => {
            error!(error = %e, "invalid config");
            return ExitCode::from(2);
        }
    };
    pooler.set_config_path(path);
    pooler.upgrade.remember_command();
    if let (Some(listener), Some(addr)) = (&admin, &admin_addr) {
        pooler
            .upgrade
            .keep_listener(format!("admin {addr}"), listener);
    }
    if let Some(listener) = admin
        && let Err(e) = pgmux::admin::start(listener, pooler.clone())
    {
        error!(error = %e, "cannot start the admin port");
        return ExitCode::FAILURE;
    }
    let reuse_port = pooler.snapshot().config.server.reuse_port;
    let mut listeners = Vec::new();
    for addr in &client_addrs {
        let name = format!("client {addr}");
        let bound = match take(name.clone()) {
            Some(listener) => tokio::net::TcpListener::from_std(listener),
            None => pgmux::listener::bind(addr, reuse_port).await,
        };
        match bound {
            Ok(listener) => {
                info!(%addr, "listening for clients");
                pooler.upgrade.keep_listener(name, &listener);
                listeners.push(listener);
            }
            Err(e) => {
                error!(%addr, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(inherited) = inherited {
        if let Err(e) = inherited.serve(pooler.clone(), workers.clone()).await {
            error!(error = %e, "cannot take over from the old process");
            return ExitCode::FAILURE;
        }
        info!("upgrade: this process took over the listening sockets");
    }
    tokio::spawn(keep_watching_signals(pooler.clone()));
    tokio::spawn(pgmux::upgrade::Upgrade::close_copies_at_stop(
        pooler.clone(),
    ));
    pgmux::upgrade::write_pid_file(&server);
    if workers.count() > 1 {
        info!(
            threads = workers.count(),
            "serving sessions on worker threads"
        );
    }
    pgmux::listener::run(pooler, listeners, workers).await;
    pgmux::upgrade::remove_pid_file(&server);
    ExitCode::SUCCESS
}

/// Runs the signal watcher, and starts it again should it ever panic: whatever else goes
/// wrong, SIGTERM and SIGINT must still stop pgmux. (The panic is logged by the hook.)
async fn keep_watching_signals(pooler: Arc<Pooler>) {
    loop {
        match tokio::spawn(watch_signals(pooler.clone())).await {
            Err(e) if e.is_panic() => {
                error!("the signal watcher panicked: starting it again");
                tokio::time::sleep(SIGNAL_RESTART).await;
            }
            _ => return,
        }
    }
}

async fn watch_signals(pooler: Arc<Pooler>) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined2()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    loop {
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                info!("SIGHUP: reloading the config");
                let reloading = pooler.clone();
                // Reading the file and deriving SCRAM keys is blocking work; the outcome is logged.
                let _ = tokio::task::spawn_blocking(move || reloading.reload()).await;
                continue;
            }
            _ = usr2.recv() => {
                info!("SIGUSR2: upgrading to a new process");
                tokio::spawn(pgmux::upgrade::start(pooler.clone()));
                continue;
            }
        };
        // Each signal takes the next step out (drain.rs); the listener logs the drain's.
        match pooler.step_out() {
            Step::Drain(delay) => info!(signal, ?delay, "shutting down: draining"),
            Step::Stop => info!(signal, "another signal: ending the drain now"),
            Step::Kill => info!(signal, "another signal: ending every session now"),
        }
    }
}

/// Logs to stderr through [`LogWriter`] (queued, never blocking, never panicking);
/// returns the writer so that `main` can flush it before exiting.
fn init_logging(format: LogFormat) -> LogWriter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or journal gets plain text.
    let colours = std::io::stderr().is_terminal();
    let log = LogWriter::stderr(colours);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(log.clone());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    log
}
