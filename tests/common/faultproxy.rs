//! A fault-injecting TCP proxy for the tests, run on the test's runtime: pgmux connects to
//! it (the database's `port` is the proxy's) and it forwards each connection, a *link*, to
//! PostgreSQL. On command, for one link or all, it stalls (stops forwarding both ways and
//! keeps the sockets open), slows each chunk by a delay, cuts (closes both sides with a
//! FIN) or resets (closes with SO_LINGER 0, an RST); it can refuse new connections (its
//! listener closes, so connecting is refused by the kernel) and resume.
//!
//! Commands take effect when they return: a stalled link forwards no byte read after
//! `stall`, and `cut` returns once the proxy closed its sockets and the kernel moved
//! pgmux's end out of ESTABLISHED (it has seen the FIN or RST).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a command waits for the proxy (or the kernel) to carry it out.
const COMMAND_LIMIT: Duration = Duration::from_secs(10);

/// Which links a command applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Every link open now; `stall` and `slow` also apply to links opened later, until
    /// `resume`.
    All,
    /// The link with this id (see [`FaultProxy::links`]).
    One(u64),
}

/// What a link does with the bytes it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Read nothing more, forward nothing more, keep both sockets open.
    Stall,
    /// Forward each chunk after this delay.
    Slow(Duration),
    /// Close both sides: with an RST when `reset`, else with a FIN.
    Cut {
        reset: bool,
    },
}

/// A running proxy; dropping it stops it and closes every link.
pub struct FaultProxy {
    /// The port on 127.0.0.1 that pgmux connects to.
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    table: Mutex<Table>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    /// Bytes forwarded from PostgreSQL to pgmux, all links together.
    to_pgmux: AtomicU64,
    /// Bumped whenever a link ends.
    ended: watch::Sender<u64>,
    /// Whether new connections are refused (set by commands).
    refuse: watch::Sender<bool>,
    /// Whether the listener is open (set by the acceptor).
    listening: watch::Sender<bool>,
}

/// The open links, and the mode a new one starts in.
struct Table {
    open: BTreeMap<u64, Link>,
    new_mode: Mode,
}

struct Link {
    mode: watch::Sender<Mode>,
    /// pgmux's end of the link, as the proxy sees it.
    peer: SocketAddr,
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 that forwards to `127.0.0.1:upstream_port`.
    pub async fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy binds a free port");
        let port = listener.local_addr().expect("a bound address").port();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            table: Mutex::new(Table {
                open: BTreeMap::new(),
                new_mode: Mode::Forward,
            }),
            next_id: AtomicU64::new(1),
            accepted: AtomicU64::new(0),
            to_pgmux: AtomicU64::new(0),
            ended: watch::channel(0).0,
            refuse: watch::channel(false).0,
            listening: watch::channel(true).0,
        });
        let acceptor = tokio::spawn(accept_loop(listener, port, shared.clone()));
        FaultProxy {
            port,
            shared,
            acceptor,
        }
    }

    /// Connections accepted since the start (connection attempts that reached the proxy).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Relaxed)
    }

    /// Bytes forwarded from PostgreSQL to pgmux so far, all links together.
    pub fn bytes_to_pgmux(&self) -> u64 {
        self.shared.to_pgmux.load(Relaxed)
    }

    /// Links open now.
    pub fn carried(&self) -> usize {
        self.shared.table.lock().expect("table lock").open.len()
    }

    /// The ids of the links open now, oldest first.
    pub fn links(&self) -> Vec<u64> {
        self.shared
            .table
            .lock()
            .expect("table lock")
            .open
            .keys()
            .copied()
            .collect()
    }

    /// Stops forwarding in both directions; the sockets stay open.
    pub fn stall(&self, which: Links) {
        self.set(which, Mode::Stall);
    }

    /// Forwards each chunk, both ways, only after `delay`.
    pub fn slow(&self, which: Links, delay: Duration) {
        self.set(which, Mode::Slow(delay));
    }

    /// Closes both sides of the links with a FIN; returns once they are closed and pgmux's
    /// ends have left ESTABLISHED.
    pub async fn cut(&self, which: Links) {
        self.close(which, false).await;
    }

    /// Closes both sides of the links with an RST (SO_LINGER 0); returns as `cut` does.
    pub async fn reset(&self, which: Links) {
        self.close(which, true).await;
    }

    /// Closes the listener: new connections are refused until `resume`. Links open now
    /// keep forwarding.
    pub async fn refuse(&self) {
        self.shared.refuse.send_replace(true);
        self.wait_listening(false).await;
    }

    /// Forwards normally on every link again and accepts new connections.
    pub async fn resume(&self) {
        self.set(Links::All, Mode::Forward);
        self.shared.refuse.send_replace(false);
        self.wait_listening(true).await;
    }

    fn set(&self, which: Links, mode: Mode) {
        let mut links = self.shared.table.lock().expect("table lock");
        if which == Links::All && matches!(mode, Mode::Forward | Mode::Stall | Mode::Slow(_)) {
            links.new_mode = mode;
        }
        for (id, link) in links.open.iter() {
            if which == Links::All || which == Links::One(*id) {
                link.mode.send_replace(mode);
            }
        }
    }

    async fn close(&self, which: Links, reset: bool) {
        let targets: Vec<(u64, SocketAddr)> = {
            let links = self.shared.table.lock().expect("table lock");
            links
                .open
                .iter()
                .filter(|(id, _)| which == Links::All || which == Links::One(**id))
                .map(|(id, link)| (*id, link.peer))
                .collect()
        };
        self.set(which, Mode::Cut { reset });
        let mut ended = self.shared.ended.subscribe();
        let deadline = Instant::now() + COMMAND_LIMIT;
        loop {
            let open = {
                let links = self.shared.table.lock().expect("table lock");
                targets.iter().any(|(id, _)| links.open.contains_key(id))
            };
            if !open {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, ended.changed())
                .await
                .expect("the proxy closes cut links")
                .expect("the proxy is running");
        }
        // The kernel delivers the FIN or RST on its own schedule: wait until pgmux's end
        // of each link is no longer ESTABLISHED, so that pgmux can see it.
        for (_, peer) in targets {
            while established(peer.port(), self.port) {
                assert!(
                    Instant::now() < deadline,
                    "pgmux's socket {peer} stays ESTABLISHED after the cut"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    async fn wait_listening(&self, want: bool) {
        let mut listening = self.shared.listening.subscribe();
        tokio::time::timeout(COMMAND_LIMIT, listening.wait_for(|l| *l == want))
            .await
            .expect("the proxy's listener follows the command")
            .expect("the proxy is running");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        // Each link ends when its mode sender goes.
        self.shared.table.lock().expect("table lock").open.clear();
    }
}

/// Accepts links until aborted; closes and reopens the listener on `refuse` and `resume`.
async fn accept_loop(listener: TcpListener, port: u16, shared: Arc<Shared>) {
    let mut refuse = shared.refuse.subscribe();
    let mut listener = Some(listener);
    loop {
        let Some(open) = &listener else {
            let _ = refuse.wait_for(|r| !*r).await;
            listener = Some(rebind(port).await);
            shared.listening.send_replace(true);
            continue;
        };
        tokio::select! {
            accepted = open.accept() => match accepted {
                Ok((client, peer)) => {
                    shared.accepted.fetch_add(1, Relaxed);
                    start_link(&shared, client, peer);
                }
                Err(e) => panic!("the proxy's accept failed: {e}"),
            },
            _ = refuse.wait_for(|r| *r) => {
                listener = None;
                shared.listening.send_replace(false);
            }
        }
    }
}

/// Binds the proxy's port again. Another socket may hold it for a moment (an outgoing
/// connection that happened to get it as its local port): retry until it is free.
async fn rebind(port: u16) -> TcpListener {
    let deadline = Instant::now() + COMMAND_LIMIT;
    loop {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        let bound = socket
            .bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .and_then(|()| socket.listen(1024));
        match bound {
            Ok(listener) => return listener,
            Err(e) if Instant::now() < deadline => {
                eprintln!("faultproxy: rebinding port {port}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the proxy cannot listen on port {port} again: {e}"),
        }
    }
}

fn start_link(shared: &Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    let id = shared.next_id.fetch_add(1, Relaxed);
    let rx = {
        let mut links = shared.table.lock().expect("table lock");
        let (mode, rx) = watch::channel(links.new_mode);
        links.open.insert(id, Link { mode, peer });
        rx
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        // Whatever ends the link, it leaves the table.
        let _gone = LinkGone {
            shared: &shared,
            id,
        };
        match TcpStream::connect(shared.upstream).await {
            Ok(upstream) => run_link(client, upstream, rx, &shared.to_pgmux).await,
            // PostgreSQL is not there: pgmux sees its connection closed.
            Err(_) => drop(client),
        }
    });
}

struct LinkGone<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for LinkGone<'_> {
    fn drop(&mut self) {
        self.shared
            .table
            .lock()
            .expect("table lock")
            .open
            .remove(&self.id);
        self.shared.ended.send_modify(|n| *n += 1);
    }
}

/// Forwards both ways until both directions end or the link is cut.
async fn run_link(
    mut client: TcpStream,
    mut upstream: TcpStream,
    mode: watch::Receiver<Mode>,
    to_pgmux: &AtomicU64,
) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let reset = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let both = async {
            tokio::join!(
                pump(client_read, upstream_write, mode.clone(), None),
                pump(upstream_read, client_write, mode.clone(), Some(to_pgmux)),
            )
        };
        tokio::select! {
            _ = both => None,
            reset = cut(mode.clone()) => Some(reset),
        }
    };
    if reset == Some(true) {
        zero_linger(&client);
        zero_linger(&upstream);
    }
    // Dropping both streams closes both sides.
}

/// One direction. It reads only while forwarding (a stalled link leaves the bytes in the
/// sender's kernel buffers, as a hung peer would) and holds a chunk it read when a stall
/// began meanwhile.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut mode: watch::Receiver<Mode>,
    count: Option<&AtomicU64>,
) -> io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if flowing(&mut mode).await.is_none() {
            return Ok(());
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let Some(delay) = flowing(&mut mode).await else {
            return Ok(());
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        to.write_all(&buf[..n]).await?;
        if let Some(count) = count {
            count.fetch_add(n as u64, Relaxed);
        }
    }
}

/// Waits while the link is stalled; then the delay to apply, or `None` once it is cut.
async fn flowing(mode: &mut watch::Receiver<Mode>) -> Option<Duration> {
    loop {
        match *mode.borrow_and_update() {
            Mode::Forward => return Some(Duration::ZERO),
            Mode::Slow(delay) => return Some(delay),
            Mode::Cut { .. } => return None,
            Mode::Stall => {}
        }
        mode.changed().await.ok()?;
    }
}

/// Resolves when the link is cut, with whether to reset. A dropped proxy cuts with a FIN.
async fn cut(mut mode: watch::Receiver<Mode>) -> bool {
    loop {
        if let Mode::Cut { reset } = *mode.borrow_and_update() {
            return reset;
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

/// SO_LINGER with a zero timeout: closing the socket sends an RST instead of a FIN.
fn zero_linger(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a live socket, and a `linger` struct with its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Whether a TCP socket from 127.0.0.1:`local_port` to 127.0.0.1:`remote_port` is
/// ESTABLISHED, per /proc/net/tcp.
fn established(local_port: u16, remote_port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
    let port_of = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).any(|line| {
        // sl local_address rem_address st ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3
            && port_of(fields[1]) == Some(local_port)
            && port_of(fields[2]) == Some(remote_port)
            && fields[3] == "01"
    })
}
