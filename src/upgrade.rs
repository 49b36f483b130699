//! Zero-downtime upgrade: a new pgmux process takes over the listening sockets and every
//! client, and the old one exits; no connection attempt is refused and no client sees an
//! error or a reconnect. See docs/upgrades.md.
//!
//! SIGUSR2 (or `pgmux upgrade`, which sends it) makes the old process:
//! 1. listen on a Unix socket (`server.upgrade_socket`, mode 0600) and start the new
//!    binary (the path this one was started from, same arguments) with
//!    `PGMUX_UPGRADE_SOCKET` naming it;
//! 2. accept the new process's connection (its process id checked with SO_PEERCRED) and
//!    send it the listening sockets (SCM_RIGHTS);
//! 3. wait for its READY (`server.upgrade_timeout`; failing that, kill it and go on
//!    serving), then stop accepting ([`Upgrade::handover`]: the sockets stay open in the
//!    new process, so no connection attempt is lost), send the new process the listening
//!    clients' channels (`crate::notify`, `Handover`: a marker NOTIFY splits the
//!    notifications between the two processes) and raise [`Alert::MOVE`] on every
//!    session;
//! 4. each session, at its next quiet point (between transactions, nothing buffered
//!    either way, no server held unless the client keeps one), sends its socket and its
//!    [`SessionState`] through [`Upgrade::hand_over`] (a listening one once the marker
//!    came through and its queue is empty); a client that keeps its server between
//!    transactions (session mode, or pinned by session state) sends that server's socket
//!    in the same record, with the server's state, and the new process adopts it into the
//!    client's pool ([`crate::pool::Pool::adopt`]). One that cannot move (TLS to the
//!    client or to its kept server, LISTEN channels changed meanwhile) is closed right
//!    after its transaction with 57P01 and a hint;
//! 5. exit once no client is left, or after `shutdown_timeout`.
//!
//! The new process ([`inherit`]) uses the sockets instead of binding, says READY, and
//! serves each client it receives from its state ([`crate::client::serve_moved`]).

pub mod state;
mod wire;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clients::Alert;
use crate::config::ServerSection;
use crate::pooler::Pooler;
use state::SessionState;

/// The environment variable that tells a new process where its predecessor waits.
pub const SOCKET_ENV: &str = "PGMUX_UPGRADE_SOCKET";
/// How often the old process looks whether its clients are gone.
const POLL: Duration = Duration::from_millis(50);

/// The upgrade state of a running pgmux. Owned by the [`Pooler`].
#[derive(Default)]
pub struct Upgrade {
    /// Cancelled once a new process accepts on the listening sockets: the accept loops
    /// end and every session moves at its next quiet point.
    pub handover: CancellationToken,
    /// An upgrade is under way (a second SIGUSR2 is ignored).
    running: AtomicBool,
    /// Copies of the listening sockets, by name (`client ADDR`, `admin ADDR`), to send
    /// to a new process; closed at the hand-over.
    listeners: Mutex<Vec<(String, OwnedFd)>>,
    /// The binary this process was started from and its arguments.
    command: Mutex<Option<(PathBuf, Vec<OsString>)>>,
    /// Where sessions send themselves once the new process is ready.
    outbox: Mutex<Option<mpsc::UnboundedSender<Moving>>>,
    /// In a new process: clients still arrive from the old one. This process does not
    /// finish an upgrade of its own before they all did.
    receiving: AtomicBool,
}

/// Counts of what upgrades did in this process (`pgmux_upgrades_total`,
/// `pgmux_upgrade_clients_total`): one set per process, as an upgrade replaces the
/// process. The old process's counts are scraped while its clients move; the new process
/// counts what it received.
pub struct UpgradeStats {
    /// Upgrades that handed this process's sockets to a new one.
    pub handed_over: AtomicU64,
    /// Upgrades given up (the new process did not start or say READY): this one serves on.
    pub failed: AtomicU64,
    /// Clients sent to the new process.
    pub moved: AtomicU64,
    /// Clients closed with 57P01 instead (TLS, a server held, LISTEN channels not handed
    /// over, the hand-over failed).
    pub closed: AtomicU64,
    /// Clients received from the old process (in the new one).
    pub received: AtomicU64,
}

static STATS: UpgradeStats = UpgradeStats {
    handed_over: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    moved: AtomicU64::new(0),
    closed: AtomicU64::new(0),
    received: AtomicU64::new(0),
};

/// This process's upgrade counts.
pub fn stats() -> &'static UpgradeStats {
    &STATS
}

/// Counts a client closed with 57P01 because it could not move.
pub fn count_closed() {
    STATS.closed.fetch_add(1, Ordering::Relaxed);
}

impl UpgradeStats {
    fn fields(&self) -> [&AtomicU64; 5] {
        [
            &self.handed_over,
            &self.failed,
            &self.moved,
            &self.closed,
            &self.received,
        ]
    }

    /// The counts, for the new process to carry on from (the END record's payload): the
    /// counters then run on across upgrades, as one service seen on one admin port.
    fn encode(&self) -> Vec<u8> {
        let fields = self.fields();
        fields
            .iter()
            .flat_map(|n| n.load(Ordering::Relaxed).to_be_bytes())
            .collect()
    }

    /// Adds the predecessor's counts. A payload of another size (an older pgmux sends
    /// none) adds nothing.
    fn add_encoded(&self, payload: &[u8]) {
        let fields = self.fields();
        if payload.len() != fields.len() * 8 {
            return;
        }
        for (field, bytes) in fields.iter().zip(payload.chunks_exact(8)) {
            let mut n = [0u8; 8];
            n.copy_from_slice(bytes);
            field.fetch_add(u64::from_be_bytes(n), Ordering::Relaxed);
        }
    }
}

/// One client on its way to the new process.
struct Moving {
    socket: OwnedFd,
    /// A copy of the socket of the server it keeps, if any.
    server: Option<OwnedFd>,
    state: Vec<u8>,
    /// The socket back if it could not be sent.
    sent: oneshot::Sender<Result<(), (OwnedFd, String)>>,
}

impl Upgrade {
    /// An upgrade is under way: a new process is starting or clients are moving.
    pub fn in_progress(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Records the binary and arguments to start a new process with: the executable path
    /// as it is now (a binary replaced at that path later is the one started).
    pub fn remember_command(&self) {
        let exe = std::env::current_exe().ok();
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        *self.command.lock() = exe.map(|exe| (exe, args));
    }

    /// Keeps a copy of a listening socket under `name`, to hand to a new process.
    pub fn keep_listener(&self, name: String, socket: impl AsFd) {
        match socket.as_fd().try_clone_to_owned() {
            Ok(fd) => self.listeners.lock().push((name, fd)),
            Err(e) => warn!(error = %e, "cannot keep a copy of a listening socket for upgrades"),
        }
    }

    /// Closes the copies of the listening sockets once pgmux stops accepting (shutdown):
    /// a copy kept open would leave the port listening with nobody accepting, and new
    /// clients hanging instead of refused.
    pub async fn close_copies_at_stop(pooler: Arc<Pooler>) {
        pooler.stop.cancelled().await;
        pooler.upgrade.listeners.lock().clear();
    }

    /// Sends a quiet client to the new process: its socket, its state, and the server it
    /// keeps, if any (`departing.server`; `departing.state.server` describes it). On
    /// success that server is forgotten here without a close (the new process uses the
    /// same socket); on failure it is closed, and the client's socket comes back when it
    /// still can (with why), for the caller to tell the client.
    pub async fn hand_over(
        &self,
        tcp: TcpStream,
        departing: Departing,
    ) -> Result<(), (Option<TcpStream>, String)> {
        let Departing { state, server } = departing;
        let outbox = self.outbox.lock().clone();
        let Some(outbox) = outbox else {
            return Err((Some(tcp), "no new process takes clients".into()));
        };
        if server.is_some() != state.server.is_some() {
            return Err((Some(tcp), "its server connection cannot be carried".into()));
        }
        let encoded = match state.encode() {
            Ok(encoded) => encoded,
            Err(e) => return Err((Some(tcp), e.to_string())),
        };
        let server_socket = match server
            .as_deref()
            .map(crate::server::ServerConn::socket_copy)
        {
            None => None,
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) => return Err((Some(tcp), format!("its server's socket: {e}"))),
        };
        let socket: OwnedFd = match tcp.into_std() {
            Ok(std) => std.into(),
            Err(e) => return Err((None, e.to_string())),
        };
        let (sent, result) = oneshot::channel();
        let moving = Moving {
            socket,
            server: server_socket,
            state: encoded,
            sent,
        };
        if let Err(back) = outbox.send(moving) {
            return Err((tcp_from(back.0.socket), "the new process is gone".into()));
        }
        match result.await {
            Ok(Ok(())) => {
                if let Some(lease) = server {
                    lease.hand_off();
                }
                Ok(())
            }
            Ok(Err((fd, why))) => Err((tcp_from(fd), why)),
            Err(_) => Err((None, "the hand-over stopped".into())),
        }
    }
}

/// A client leaving at its quiet point: its state, and the server connection it keeps
/// between transactions, if any (session mode, or pinned by session state).
pub struct Departing {
    pub state: SessionState,
    pub server: Option<crate::pool::Lease>,
}

/// A tokio socket again, from a descriptor that could not be sent.
fn tcp_from(fd: OwnedFd) -> Option<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true).ok()?;
    TcpStream::from_std(std).ok()
}

/// Where the pid file is: `server.pid_file`, else `/tmp/pgmux-PORT.pid` with the port of
/// the first listen address (one per instance on a host, found again by `pgmux upgrade`
/// from the same config).
pub fn pid_path(server: &ServerSection) -> PathBuf {
    server.pid_file.clone().unwrap_or_else(|| {
        let port = server
            .listen
            .first()
            .and_then(|addr| addr.rsplit(':').next())
            .filter(|port| port.bytes().all(|b| b.is_ascii_digit()))
            .unwrap_or("6432");
        PathBuf::from(format!("/tmp/pgmux-{port}.pid"))
    })
}

/// Where the old process listens for its successor: `server.upgrade_socket`, else the pid
/// file's path ending in `.upgrade.sock`.
pub fn socket_path(server: &ServerSection) -> PathBuf {
    server
        .upgrade_socket
        .clone()
        .unwrap_or_else(|| pid_path(server).with_extension("upgrade.sock"))
}

/// Writes this process's id to the pid file (through a temporary file and a rename, so
/// that a reader never sees half of it). A failure is logged: SIGUSR2 works without it.
pub fn write_pid_file(server: &ServerSection) {
    let path = pid_path(server);
    let temp = path.with_extension(format!("pid.{}", std::process::id()));
    let written = std::fs::write(&temp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&temp, &path));
    match written {
        Ok(()) => debug!(path = %path.display(), "pid file written"),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            warn!(path = %path.display(), error = %e, "cannot write the pid file (`pgmux upgrade` needs it; SIGUSR2 works without)");
        }
    }
}

/// Removes the pid file if it still names this process (after an upgrade it names the
/// new one, and stays).
pub fn remove_pid_file(server: &ServerSection) {
    let path = pid_path(server);
    if read_pid(&path).ok() == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(&path);
    }
}

fn read_pid(path: &Path) -> io::Result<i32> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse()
        .ok()
        .filter(|pid: &i32| *pid > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a process id"))
}

/// `pgmux upgrade`: sends SIGUSR2 to the process the pid file names and waits until a new
/// process has taken over (its id in the pid file, alive). Returns what to print.
pub fn request(server: &ServerSection) -> Result<String, String> {
    let path = pid_path(server);
    let shown = path.display();
    let meta = std::fs::metadata(&path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{shown} belongs to another user: not signalling it"
        ));
    }
    let old = read_pid(&path).map_err(|e| format!("{shown}: {e}"))?;
    // SAFETY: kill has no memory preconditions; a wrong pid is an error, reported.
    if unsafe { libc::kill(old, libc::SIGUSR2) } != 0 {
        let e = io::Error::last_os_error();
        return Err(format!("cannot signal process {old} (from {shown}): {e}"));
    }
    let limit = server.upgrade_timeout + Duration::from_secs(5);
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(POLL);
        match read_pid(&path) {
            // SAFETY: signal 0 only checks that the process exists.
            Ok(new) if new != old && unsafe { libc::kill(new, 0) } == 0 => {
                return Ok(format!(
                    "process {new} took over from process {old}; {old} exits once its clients have moved"
                ));
            }
            _ => {}
        }
    }
    Err(format!(
        "no new process took over from process {old} within {limit:?}: see its log (it keeps serving)"
    ))
}

/// Starts an upgrade (SIGUSR2) and runs it to its end: either this process hands
/// everything over and stops, or the upgrade is given up (logged) and it keeps serving.
pub async fn start(pooler: Arc<Pooler>) {
    let upgrade = &pooler.upgrade;
    if pooler.stop.is_cancelled() {
        info!("pgmux is stopping: SIGUSR2 ignored");
        return;
    }
    if upgrade.running.swap(true, Ordering::SeqCst) {
        info!("an upgrade is already under way: SIGUSR2 ignored");
        return;
    }
    let server = pooler.snapshot().config.server.clone();
    match launch(upgrade, &server).await {
        Ok((link, pid)) => {
            STATS.handed_over.fetch_add(1, Ordering::Relaxed);
            // systemd follows the new process from now on, and hears nothing more
            // from this one (not even STOPPING=1: the service is not stopping).
            if let Some(notifier) = crate::sd_notify::global() {
                notifier.hand_over(pid);
            }
            move_clients(&pooler, link, &server).await
        }
        Err(why) => {
            error!(why = %why, "upgrade given up: this process keeps serving");
            STATS.failed.fetch_add(1, Ordering::Relaxed);
            upgrade.running.store(false, Ordering::SeqCst);
        }
    }
}

/// Removes a file when dropped (the upgrade socket's path: the connection outlives it).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Steps 1 to 3: the new process started, connected, given the listening sockets, and
/// ready: the link to it and its process id. On any failure it is killed and the reason
/// returned.
async fn launch(upgrade: &Upgrade, server: &ServerSection) -> Result<(UnixStream, u32), String> {
    let Some((exe, args)) = upgrade.command.lock().clone() else {
        return Err("the path of this binary is unknown".into());
    };
    let mut names = String::new();
    let mut fds = Vec::new();
    for (name, fd) in upgrade.listeners.lock().iter() {
        let copy = fd
            .try_clone()
            .map_err(|e| format!("cannot copy a listening socket: {e}"))?;
        names.push_str(name);
        names.push('\n');
        fds.push(copy);
    }
    let path = socket_path(server);
    match std::fs::symlink_metadata(&path) {
        // A socket left by a process that died mid-upgrade: ours to replace.
        Ok(meta) if meta.file_type().is_socket() => {
            let _ = std::fs::remove_file(&path);
        }
        Ok(_) => return Err(format!("{} exists and is not a socket", path.display())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let _remove = RemoveOnDrop(path.clone());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
    let mut child = std::process::Command::new(&exe)
        .args(&args)
        .env(SOCKET_ENV, &path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let child_id = child.id();
    let pid = child_id as i32;
    info!(pid, exe = %exe.display(), "upgrade: new process started");
    let limit = server.upgrade_timeout;
    let handshake = async {
        let mut link = loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (link, _) = accepted.map_err(|e| format!("accept on the upgrade socket: {e}"))?;
                    match wire::peer_pid(&link) {
                        Ok(peer) if peer == pid => break link,
                        _ => warn!("upgrade socket: a connection from another process closed"),
                    }
                }
                _ = tokio::time::sleep(POLL) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("the new process exited ({status}) before it connected"));
                    }
                }
            }
        };
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        wire::send(&mut link, wire::LISTENERS, names.as_bytes(), &raw)
            .await
            .map_err(|e| format!("sending the listening sockets: {e}"))?;
        drop(fds);
        match wire::recv(&mut link).await {
            Ok(Some(record)) if record.kind == wire::READY => Ok(link),
            Ok(Some(_)) => Err("the new process sent something else than READY".to_owned()),
            Ok(None) => Err("the new process left before it was ready (see its log)".to_owned()),
            Err(e) => Err(format!("waiting for READY: {e}")),
        }
    };
    let outcome = match tokio::time::timeout(limit, handshake).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!(
            "the new process did not say it was ready within {limit:?} (server.upgrade_timeout)"
        )),
    };
    if outcome.is_err() {
        // It may hold the listening sockets: it must not serve beside this process.
        let _ = child.kill();
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }
    outcome.map(|link| (link, child_id))
}

/// Steps 3 to 5: stop accepting, move every client at its quiet point, then stop.
async fn move_clients(pooler: &Arc<Pooler>, mut link: UnixStream, server: &ServerSection) {
    let limit = server.shutdown_timeout;
    let upgrade = &pooler.upgrade;
    upgrade.handover.cancel();
    upgrade.listeners.lock().clear();
    // Listening clients: the new process subscribes them before they come, and a marker
    // NOTIFY splits the notifications between the two processes (notify.rs, `Handover`).
    let marker = format!("pgmux_upgrade_{:016x}", rand::random::<u64>());
    let plans = pooler
        .notify
        .plan_handover(&marker, server.upgrade_timeout)
        .await;
    let mut sent_plans = 0;
    for plan in &plans {
        let sent = match state::encode_plan(plan) {
            Ok(payload) => wire::send(&mut link, wire::LISTEN_PLAN, &payload, &[])
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match sent {
            Ok(()) => {
                info!(database = %crate::logging::Escaped(&plan.database), clients = plan.clients.len(), "upgrade: listening clients to hand over");
                sent_plans += 1;
            }
            Err(e) => warn!(error = %e, "upgrade: cannot send the LISTEN hand-over plan"),
        }
    }
    let mut markers_due = !plans.is_empty();
    if sent_plans < plans.len() {
        pooler.notify.abandon_handover();
        markers_due = false;
    }
    let markers_deadline = tokio::time::Instant::now() + server.upgrade_timeout;
    let (outbox, mut queue) = mpsc::unbounded_channel::<Moving>();
    *upgrade.outbox.lock() = Some(outbox);
    pooler.clients_registry.raise(Alert::MOVE, |_, _| true);
    info!(
        clients = pooler.clients.load(Ordering::Relaxed),
        "upgrade: the new process accepts; clients move at their next quiet point"
    );
    // Cancel requests the new process receives for clients still here come back.
    match duplicate(&link) {
        Ok(reader) => {
            tokio::spawn(pass_back_cancels(reader, pooler.clone()));
        }
        Err(e) => {
            warn!(error = %e, "upgrade: cancel requests for clients not moved yet will be ignored")
        }
    }
    let deadline = tokio::time::Instant::now() + limit;
    let (mut moved, mut failed) = (0u64, 0u64);
    let mut broken = false;
    loop {
        tokio::select! {
            Some(moving) = queue.recv() => {
                let sent = if broken {
                    Err("the link to the new process broke".to_owned())
                } else {
                    let mut fds = vec![moving.socket.as_raw_fd()];
                    fds.extend(moving.server.as_ref().map(AsRawFd::as_raw_fd));
                    wire::send(&mut link, wire::CLIENT, &moving.state, &fds)
                        .await
                        .map_err(|e| e.to_string())
                };
                match sent {
                    Ok(()) => {
                        moved += 1;
                        STATS.moved.fetch_add(1, Ordering::Relaxed);
                        let _ = moving.sent.send(Ok(()));
                    }
                    Err(why) => {
                        broken = true;
                        failed += 1;
                        let _ = moving.sent.send(Err((moving.socket, why)));
                    }
                }
            }
            _ = tokio::time::sleep(POLL) => {}
        }
        if markers_due
            && !pooler.notify.markers_seen()
            && tokio::time::Instant::now() >= markers_deadline
        {
            // The listening clients still waiting for it are closed instead of moved.
            warn!(
                "upgrade: the LISTEN/NOTIFY hand-over marker did not come through in time; listening clients are closed instead of moved"
            );
            pooler.notify.abandon_handover();
            markers_due = false;
        }
        let arriving = upgrade.receiving.load(Ordering::SeqCst);
        if pooler.clients.load(Ordering::Relaxed) == 0 && queue.is_empty() && !arriving {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                left = pooler.clients.load(Ordering::Relaxed),
                "upgrade: shutdown_timeout is over; ending the clients that did not move"
            );
            break;
        }
    }
    *upgrade.outbox.lock() = None;
    queue.close();
    while let Ok(moving) = queue.try_recv() {
        let _ = moving
            .sent
            .send(Err((moving.socket, "the upgrade ended".into())));
    }
    let _ = wire::send(&mut link, wire::END, &STATS.encode(), &[]).await;
    drop(link);
    info!(
        moved,
        failed, "upgrade: clients handed over; this process stops"
    );
    // The way out of a shutdown (drain.rs), without its drain_delay: nothing is accepted
    // here any more.
    if !matches!(pooler.step_out(), crate::drain::Step::Drain(delay) if delay.is_zero()) {
        pooler.stop.cancel();
    }
}

/// The listening sockets a new process received from its predecessor, and the link on
/// which its clients follow.
pub struct Inherited {
    link: UnixStream,
    listeners: Vec<(String, OwnedFd)>,
}

/// In a process started by an upgrade (`PGMUX_UPGRADE_SOCKET` set): connects to the old
/// process and receives its listening sockets. `Ok(None)` in a process started normally.
pub async fn inherit() -> Result<Option<Inherited>, String> {
    let Some(path) = std::env::var_os(SOCKET_ENV) else {
        return Ok(None);
    };
    let shown = Path::new(&path).display().to_string();
    let mut link = UnixStream::connect(&path)
        .await
        .map_err(|e| format!("cannot connect to {shown}: {e}"))?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    match wire::peer_pid(&link) {
        Ok(peer) if peer == parent => {}
        _ => {
            return Err(format!(
                "{shown} is not served by the process that started this one"
            ));
        }
    }
    let record = tokio::time::timeout(Duration::from_secs(30), wire::recv(&mut link))
        .await
        .map_err(|_| "the old process sent no listening sockets".to_owned())?
        .map_err(|e| format!("receiving the listening sockets: {e}"))?;
    let Some(record) = record.filter(|r| r.kind == wire::LISTENERS) else {
        return Err("the old process sent no listening sockets".into());
    };
    let names = String::from_utf8(record.payload).map_err(|_| "bad socket names".to_owned())?;
    let names: Vec<String> = names.lines().map(str::to_owned).collect();
    if names.len() != record.fds.len() {
        return Err("socket names and sockets do not match".into());
    }
    info!(
        sockets = names.len(),
        "upgrade: received the listening sockets"
    );
    Ok(Some(Inherited {
        link,
        listeners: names.into_iter().zip(record.fds).collect(),
    }))
}

impl Inherited {
    /// The listening socket named `name` (`client ADDR`, `admin ADDR`), if the old process
    /// sent one: this process accepts on it instead of binding.
    pub fn take(&mut self, name: &str) -> Option<std::net::TcpListener> {
        let at = self.listeners.iter().position(|(n, _)| n == name)?;
        let (_, fd) = self.listeners.swap_remove(at);
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// Tells the old process that this one accepts (it then stops), and serves the clients
    /// it sends from now on. Sockets this config does not listen on any more close here.
    pub async fn serve(
        mut self,
        pooler: Arc<Pooler>,
        workers: Arc<crate::workers::Workers>,
    ) -> Result<(), String> {
        self.listeners.clear();
        let writer = duplicate(&self.link).map_err(|e| format!("upgrade link: {e}"))?;
        wire::send(&mut self.link, wire::READY, b"", &[])
            .await
            .map_err(|e| format!("cannot tell the old process this one is ready: {e}"))?;
        pooler.upgrade.receiving.store(true, Ordering::SeqCst);
        let (cancels, unknown) = mpsc::unbounded_channel();
        pooler.cancels.pass_unknown_to(Some(cancels));
        tokio::spawn(send_cancels(writer, unknown));
        tokio::spawn(receive_clients(self.link, pooler, workers));
        Ok(())
    }
}

/// Serves every client the old process sends, until it says END or closes the link.
async fn receive_clients(
    mut link: UnixStream,
    pooler: Arc<Pooler>,
    workers: Arc<crate::workers::Workers>,
) {
    let mut moved = 0u64;
    loop {
        let record = match wire::recv(&mut link).await {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "upgrade: the link to the old process failed");
                break;
            }
        };
        if record.kind == wire::LISTEN_PLAN {
            prepare_listeners(&pooler, &record.payload);
            continue;
        }
        if record.kind == wire::END {
            STATS.add_encoded(&record.payload);
            break;
        }
        // The client's socket, then the socket of the server it keeps, if any.
        let mut fds = record.fds.into_iter();
        let (wire::CLIENT, Some(fd), server_socket, None) =
            (record.kind, fds.next(), fds.next(), fds.next())
        else {
            warn!(
                kind = record.kind,
                "upgrade: an unexpected record from the old process ignored"
            );
            continue;
        };
        let std = std::net::TcpStream::from(fd);
        let Some(tcp) = std
            .set_nonblocking(true)
            .ok()
            .and_then(|()| TcpStream::from_std(std).ok())
        else {
            continue;
        };
        match SessionState::decode(&record.payload) {
            Ok(state) if state.server.is_some() != server_socket.is_some() => {
                warn!(
                    "upgrade: a client's record and the sockets sent with it do not match; closing it"
                );
                count_closed();
                tokio::spawn(tell_and_close(tcp));
            }
            Ok(state) => {
                moved += 1;
                STATS.received.fetch_add(1, Ordering::Relaxed);
                crate::listener::adopt(&pooler, &workers, tcp, state, server_socket);
            }
            Err(e) => {
                warn!(error = %e, "upgrade: a client's session could not be read; closing it");
                count_closed();
                tokio::spawn(tell_and_close(tcp));
            }
        }
    }
    pooler.cancels.pass_unknown_to(None);
    pooler.notify.end_handover();
    pooler.upgrade.receiving.store(false, Ordering::SeqCst);
    info!(
        moved,
        "upgrade: the old process has handed over its clients"
    );
}

/// New process: subscribes the listening clients of one database before they come, and
/// NOTIFYs the hand-over marker once its listener connection LISTENs to their channels.
fn prepare_listeners(pooler: &Arc<Pooler>, payload: &[u8]) {
    let plan = match state::decode_plan(payload) {
        Ok(plan) => plan,
        Err(e) => {
            warn!(error = %e, "upgrade: a LISTEN hand-over plan could not be read; those clients will be closed");
            return;
        }
    };
    let Some(pool) = pooler.pool(&plan.database, &plan.user) else {
        warn!(database = %crate::logging::Escaped(&plan.database), "upgrade: no pool for the listening clients of this database; they will be closed");
        return;
    };
    let limit = pooler.snapshot().config.server.upgrade_timeout;
    let due = pooler.notify.prepare_handover(plan, &pool.upstream());
    tokio::spawn(due.notify_when_listening(limit));
}

/// A second handle on the link, for the direction the other handle does not use.
fn duplicate(link: &UnixStream) -> io::Result<UnixStream> {
    let fd = link.as_fd().try_clone_to_owned()?;
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

/// New process: sends the old one the cancel requests with keys it does not know, until
/// every client has arrived.
async fn send_cancels(mut link: UnixStream, mut unknown: mpsc::UnboundedReceiver<(i32, i32)>) {
    while let Some((process_id, secret)) = unknown.recv().await {
        let mut key = Vec::with_capacity(8);
        key.extend_from_slice(&process_id.to_be_bytes());
        key.extend_from_slice(&secret.to_be_bytes());
        if wire::send(&mut link, wire::CANCEL, &key, &[])
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Old process: forwards the cancel requests the new one passes back, for clients that
/// have not moved yet (a query running, a transaction open).
async fn pass_back_cancels(mut link: UnixStream, pooler: Arc<Pooler>) {
    while let Ok(Some(record)) = wire::recv(&mut link).await {
        let (wire::CANCEL, &[a, b, c, d, e, f, g, h]) = (record.kind, &record.payload[..]) else {
            continue;
        };
        let process_id = i32::from_be_bytes([a, b, c, d]);
        let secret = i32::from_be_bytes([e, f, g, h]);
        let pooler = pooler.clone();
        tokio::spawn(async move { pooler.cancels.cancel(process_id, secret).await });
    }
}

/// A client whose session could not be carried: 57P01 and a hint, then the close.
async fn tell_and_close(mut tcp: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let err = crate::client::ClientError::Upgrading("its session could not be read");
    let mut buf = bytes::BytesMut::new();
    err.fatal().write(&mut buf);
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&buf)).await;
    let _ = tcp.shutdown().await;
}
