//! Parked clients: an idle client without a task.
//!
//! A transaction-mode client idle between transactions holds no server and nothing in
//! flight, yet its task (the running session, about 1.8 KB) and its socket's tokio
//! registration (256 bytes) cost more than everything else it holds. After
//! `server.park_idle_after`, [`sweep`] raises [`Alert::PARK`] on its registry entry; the
//! session, if it can park (plain TCP, no server, no LISTEN, nothing buffered: see
//! `Loop::can_park`), ends its loop and its task gives a [`Parked`] record (the session,
//! the socket out of tokio's reactor, what the task held) to its worker thread's
//! [`Lot`], then ends.
//!
//! Each worker thread has one lot (made at its first parked client): an epoll instance
//! of its own, watched by one task through `AsyncFd`, and the records. A parked socket is
//! registered level-triggered for input and hang-up; when it fires (the client's next
//! query, or its close) the record leaves the lot and a new task (tracked by
//! `client_tasks`, on this thread) runs the session again from where it stopped. What the
//! pooler tells a session (stop, kill, a removed pool, an upgrade) reaches a parked one
//! through its alert: the lot registers one waker of its own on each parked entry's
//! [`Alert`], and when that waker fires it looks for the records with a flag other than
//! PARK and resumes them, and their sessions handle the flag as an idle session does.
//!
//! A resumed session costs one task spawn and one epoll registration; none of this is on
//! the path of a transaction (the sweep reads the registry; nothing is checked per
//! message).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, warn};

use super::ClientGuards;
use super::session::Session;
use crate::clients::Alert;
use crate::pooler::Pooler;

/// Clients parked now, across threads (`pgmux_clients_parked`).
static PARKED: AtomicUsize = AtomicUsize::new(0);
/// Times a session was asked to park and could not (`pgmux_clients_park_declined_total`).
static DECLINED: AtomicU64 = AtomicU64::new(0);

/// How many clients are parked now.
pub fn parked() -> usize {
    PARKED.load(Ordering::Relaxed)
}

/// How many times an idle session was asked to park and could not (TLS, LISTEN, a kept
/// server): each such client is asked at most once per `park_idle_after`.
pub fn declined() -> u64 {
    DECLINED.load(Ordering::Relaxed)
}

/// Counts a session that was asked to park and could not.
pub(super) fn count_declined() {
    DECLINED.fetch_add(1, Ordering::Relaxed);
}

/// Raises [`Alert::PARK`] on the clients idle for `server.park_idle_after`, every
/// `min(1s, park_idle_after / 4)`, until pgmux stops. Reads the config each round: a
/// reload applies at the next. One per process, on the main runtime.
///
/// Once [`TRIM_EVERY`] more clients are parked than at the last look, it gives the memory
/// their tasks freed back to the system (`malloc_trim`): clients that logged in together
/// freed their tasks together, in pages no new task may need soon.
pub async fn sweep(pooler: Arc<Pooler>) {
    let mut trimmed_at = 0;
    loop {
        let after = pooler.snapshot().config.server.park_idle_after;
        let period = if after.is_zero() {
            Duration::from_secs(1)
        } else {
            pooler.clients_registry.ask_to_park(after);
            (after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
        };
        let now_parked = parked();
        if now_parked >= trimmed_at + TRIM_EVERY {
            trimmed_at = now_parked;
            // Off the runtime: it walks the heap (milliseconds for 100 000 clients).
            let _ = tokio::task::spawn_blocking(give_back_freed_memory).await;
        } else if now_parked < trimmed_at {
            trimmed_at = now_parked;
        }
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = pooler.stop.cancelled() => return,
        }
    }
}

/// Clients parked since the last `malloc_trim` that make the sweep call it again.
const TRIM_EVERY: usize = 1024;

/// Returns the free pages of every malloc arena to the system (glibc).
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory malloc holds free; any pad is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A parked client: everything its task held, without the task.
pub(super) struct Parked {
    pub session: Session,
    /// The socket, out of tokio's reactor (no `ScheduledIo`).
    pub socket: std::net::TcpStream,
    /// When the client connected (for the "client disconnected" line).
    pub started: Instant,
    /// Its place under max_client_conn and on its worker thread.
    pub guards: ClientGuards,
    /// Keeps `client_tasks` from counting it gone (the drain at shutdown waits for it).
    pub token: TaskTrackerToken,
}

/// One worker thread's parking lot.
struct Lot {
    /// The lot's own epoll instance, in which parked sockets are registered.
    epoll: AsyncFd<OwnedFd>,
    records: Mutex<Records>,
    /// Fired by an alert raised on a parked client's entry.
    alerted: Arc<Alerted>,
    /// The waker registered on each parked entry's alert (`alerted` as a waker).
    alert_waker: Waker,
}

#[derive(Default)]
struct Records {
    next: u64,
    parked: HashMap<u64, Box<Parked>>,
}

/// What the alert waker of a lot sets.
#[derive(Default)]
struct Alerted {
    raised: AtomicBool,
    lot_task: AtomicWaker,
}

impl Wake for Alerted {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raised.store(true, Ordering::Release);
        self.lot_task.wake();
    }
}

thread_local! {
    /// This thread's lot, made at the first client parked on it. Weak: the lot task owns
    /// it, and it goes with the thread's runtime.
    static LOT: std::cell::RefCell<Weak<Lot>> = const { std::cell::RefCell::new(Weak::new()) };
}

/// Parks `record` in this thread's lot; must be called on a tokio runtime (the client's
/// worker thread). Gives it back if it cannot be parked (no epoll instance, the socket
/// cannot be registered): the caller resumes it at once.
pub(super) fn park(record: Box<Parked>) -> Result<(), Box<Parked>> {
    let lot = match this_thread_lot() {
        Ok(lot) => lot,
        Err(e) => {
            warn!(error = %e, "cannot make this thread's parking lot; clients stay unparked");
            return Err(record);
        }
    };
    let mut records = lot.records.lock();
    let key = records.next;
    records.next = key.wrapping_add(1);
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: key,
    };
    // SAFETY: both descriptors are open (the lot owns the epoll one, `record` the socket),
    // and `event` is a valid epoll_event.
    let added = unsafe {
        libc::epoll_ctl(
            lot.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            record.socket.as_raw_fd(),
            &mut event,
        )
    };
    if added < 0 {
        let e = std::io::Error::last_os_error();
        warn!(error = %e, "cannot watch a parked client's socket; it stays unparked");
        return Err(record);
    }
    // From now on an alert raised on the client wakes the lot; one raised before is seen
    // here (the lot scans at once).
    let alert = record.session.view.alert();
    let pending = alert.poll(&mut Context::from_waker(&lot.alert_waker));
    if matches!(pending, Poll::Ready(flags) if flags & !Alert::PARK != 0) {
        lot.alert_waker.wake_by_ref();
    }
    records.parked.insert(key, record);
    PARKED.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// This thread's lot; made (and its task spawned on this thread's runtime) on first use.
fn this_thread_lot() -> std::io::Result<Arc<Lot>> {
    LOT.with(|cell| {
        if let Some(lot) = cell.borrow().upgrade() {
            return Ok(lot);
        }
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else; the `AsyncFd` owns
        // it (an `OwnedFd`) until it is dropped.
        let epoll = unsafe {
            let owned = OwnedFd::from_raw_fd(fd);
            AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        let alerted = Arc::new(Alerted::default());
        let lot = Arc::new(Lot {
            epoll,
            records: Mutex::default(),
            alert_waker: Waker::from(alerted.clone()),
            alerted,
        });
        *cell.borrow_mut() = Arc::downgrade(&lot);
        tokio::spawn(run(lot.clone()));
        Ok(lot)
    })
}

enum Wakeup<'a> {
    Alerted,
    Readable(tokio::io::unix::AsyncFdReadyGuard<'a, OwnedFd>),
}

/// The lot's task: resumes the clients whose sockets are readable (or closed), and those
/// an alert other than PARK was raised on.
async fn run(lot: Arc<Lot>) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        let wakeup = std::future::poll_fn(|cx| {
            lot.alerted.lot_task.register(cx.waker());
            if lot.alerted.raised.swap(false, Ordering::AcqRel) {
                return Poll::Ready(Ok(Wakeup::Alerted));
            }
            lot.epoll.poll_read_ready(cx).map_ok(Wakeup::Readable)
        })
        .await;
        match wakeup {
            Ok(Wakeup::Alerted) => lot.resume_alerted(),
            Ok(Wakeup::Readable(mut guard)) => {
                // SAFETY: `events` is writable for its length; the epoll fd is open.
                let n = unsafe {
                    libc::epoll_wait(
                        lot.epoll.as_raw_fd(),
                        events.as_mut_ptr(),
                        events.len() as i32,
                        0,
                    )
                };
                if n <= 0 {
                    // Nothing more (or EINTR: the next poll looks again).
                    guard.clear_ready();
                    continue;
                }
                for event in events.iter().take(n as usize) {
                    let key = event.u64;
                    lot.resume(key);
                }
            }
            Err(e) => {
                // Never seen from an epoll instance; resume everyone rather than spin.
                warn!(error = %e, "a parking lot cannot wait; resuming its clients");
                let keys: Vec<u64> = lot.records.lock().parked.keys().copied().collect();
                for key in keys {
                    lot.resume(key);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl Lot {
    /// Resumes every client with an alert other than PARK; the others keep the lot's
    /// waker on their alert.
    fn resume_alerted(&self) {
        let mut woken = Vec::new();
        {
            let records = self.records.lock();
            let mut cx = Context::from_waker(&self.alert_waker);
            for (key, record) in &records.parked {
                if let Poll::Ready(flags) = record.session.view.alert().poll(&mut cx)
                    && flags & !Alert::PARK != 0
                {
                    woken.push(*key);
                }
            }
        }
        for key in woken {
            self.resume(key);
        }
    }

    /// Takes the client `key` out of the lot and runs its session again in a new task.
    fn resume(&self, key: u64) {
        let record = {
            let mut records = self.records.lock();
            let Some(record) = records.parked.remove(&key) else {
                return;
            };
            // The table keeps no more room than twice what it holds, after a crowd left.
            let (len, room) = (records.parked.len(), records.parked.capacity());
            if room > 64 && len * 4 < room {
                records.parked.shrink_to(len * 2);
            }
            record
        };
        PARKED.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: both descriptors are open; a null event is allowed for EPOLL_CTL_DEL.
        let deleted = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                record.socket.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        if deleted < 0 {
            debug!(error = %std::io::Error::last_os_error(), "a parked socket was not in its lot");
        }
        let tracker = record.token.task_tracker().clone();
        tracker.spawn(super::resume(record));
    }
}
