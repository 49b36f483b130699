//! Worker threads for `server.worker_threads` above 1: one current-thread tokio runtime
//! per thread, each running the client sessions it was given from start to end.
//!
//! The main thread's runtime is worker 0: it accepts, runs the pools' upkeep and the
//! signal watcher, and serves sessions too. Each accepted client goes to the worker with
//! the fewest sessions and never moves: a session's messages are read, forwarded and
//! answered on one thread, with no work stealing and no cross-thread wakeups of its own,
//! as with one thread. What the threads share is what makes the limits exact: the pools
//! (a lock, a FIFO queue of oneshot senders, budgets), the client count, the stop tokens.
//! Those are `Send + Sync` and runtime-agnostic. A server connection belongs to the thread
//! that opened it (its socket is registered with that thread's reactor); checkout prefers
//! an idle one of the session's own thread, and moves one from another thread to the
//! session's reactor (`ServerConn::rehome`), so that its reads do not wake two threads.
//!
//! With one thread there are no workers and sessions are spawned as before.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

thread_local! {
    /// The worker this thread is: 0 for the main thread (and any other), i for worker i.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Whether worker threads were started: set once, before any session runs.
static SEVERAL: AtomicBool = AtomicBool::new(false);

/// The sessions each worker runs now, for `/metrics` (the first `Workers::start`'s).
static LOAD: OnceLock<Arc<[AtomicUsize]>> = OnceLock::new();

/// Sessions each worker thread runs now, worker 0 first; empty with one thread (sessions
/// are not counted per thread then).
pub fn sessions_per_worker() -> Vec<usize> {
    match LOAD.get() {
        Some(load) if several() => load.iter().map(|n| n.load(Relaxed)).collect(),
        _ => Vec::new(),
    }
}

/// The worker the calling thread is (0 for the main thread).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Whether sessions run on several threads (`server.worker_threads` above 1). With one,
/// the pools skip what only matters between threads.
pub fn several() -> bool {
    SEVERAL.load(Relaxed)
}

/// The extra worker threads, owned by `main`; dropped (after [`Workers::stop`]) when
/// pgmux exits.
pub struct Workers {
    /// The runtimes of workers 1.. (worker 0, the main runtime, is the caller's).
    handles: Vec<Handle>,
    /// Sessions each worker runs now, worker 0 first.
    load: Arc<[AtomicUsize]>,
    threads: Vec<JoinHandle<()>>,
    exit: CancellationToken,
}

impl Workers {
    /// Starts `threads - 1` worker threads beside the caller's runtime; none for 1.
    pub fn start(threads: usize) -> io::Result<Workers> {
        let exit = CancellationToken::new();
        let mut handles = Vec::new();
        let mut started = Vec::new();
        for i in 1..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let exit = exit.clone();
            let thread = std::thread::Builder::new()
                .name(format!("pgmux-worker-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(i));
                    runtime.block_on(exit.cancelled())
                })?;
            started.push(thread);
        }
        let load: Arc<[AtomicUsize]> = (0..threads.max(1)).map(|_| AtomicUsize::new(0)).collect();
        if !handles.is_empty() {
            let _ = LOAD.set(load.clone());
            SEVERAL.store(true, Relaxed);
        }
        Ok(Workers {
            handles,
            load,
            threads: started,
            exit,
        })
    }

    /// Threads that serve sessions, the caller's included.
    pub fn count(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `session` with `socket` on the worker with the fewest sessions, tracked by
    /// `clients`; `session` gets the socket and its place on the worker (`None` with one
    /// thread), to hold for as long as the client is connected. Must be called on worker 0's runtime (the accepting one, which also
    /// receives the clients an upgrade moves in).
    pub fn spawn<F, Fut>(&self, clients: &TaskTracker, socket: TcpStream, session: F)
    where
        F: FnOnce(TcpStream, Option<Load>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() {
            clients.spawn(session(socket, None));
            return;
        }
        let worker = self.least_busy();
        let load = Load::enter(self.load.clone(), worker);
        let Some(handle) = worker.checked_sub(1).and_then(|i| self.handles.get(i)) else {
            clients.spawn(session(socket, Some(load)));
            return;
        };
        // The socket leaves this runtime's reactor and joins the worker's: its reads and
        // writes then wake the session on its own thread.
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                warn!(error = %e, "cannot hand a client connection to a worker thread");
                return;
            }
        };
        clients.spawn_on(
            async move {
                match TcpStream::from_std(socket) {
                    Ok(socket) => session(socket, Some(load)).await,
                    Err(e) => warn!(error = %e, "a worker thread cannot take a client connection"),
                }
            },
            handle,
        );
    }

    fn least_busy(&self) -> usize {
        let mut best = (usize::MAX, 0);
        for (i, load) in self.load.iter().enumerate() {
            let n = load.load(Relaxed);
            if n < best.0 {
                best = (n, i);
            }
        }
        best.1
    }

    /// Stops the worker threads (after the drain: their sessions are over) and waits for
    /// them; a session still running on one is dropped, closing its sockets.
    pub fn stop(self) {
        self.exit.cancel();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// One session counted on its worker for as long as its client is connected (its task,
/// or its place in the worker's parking lot).
pub struct Load {
    load: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Load {
    fn enter(load: Arc<[AtomicUsize]>, worker: usize) -> Load {
        if let Some(n) = load.get(worker) {
            n.fetch_add(1, Relaxed);
        }
        Load { load, worker }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(n) = self.load.get(self.worker) {
            n.fetch_sub(1, Relaxed);
        }
    }
}
