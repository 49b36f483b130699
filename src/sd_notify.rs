//! Telling systemd how pgmux is doing, for a `Type=notify` unit (deploy/systemd/):
//! `READY=1` once the client listeners accept, `RELOADING=1` then `READY=1` around a config
//! reload, `STOPPING=1` when shutdown begins. At an upgrade the old process sends
//! `MAINPID=` with the new one's id and falls silent; the new one leaves out its first
//! `READY=1` (systemd does not know it yet, and the service stays ready throughout). Each
//! is one datagram to the Unix socket named by `$NOTIFY_SOCKET` (sd_notify(3)); without
//! that variable every call here does nothing.
//! A send never blocks and never fails pgmux: if the socket is gone or full, pgmux logs it
//! once at debug and goes on.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The variable systemd sets for a `Type=notify` service.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The socket systemd reads this process's state from. One per process (see [`global`]);
/// shared by every task, sends are non-blocking.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// Set at the first failed send, so that a vanished socket is logged once.
    failed: AtomicBool,
    /// Set once `STOPPING=1` went out: a reload that ends later must not say `READY=1`.
    stopping: AtomicBool,
    /// Set once an upgrade handed the service to a new process (`MAINPID=`): this process
    /// says nothing more.
    handed_over: AtomicBool,
    /// Set in a process started by an upgrade: its predecessor tells systemd it is ready
    /// (with its `MAINPID=`), so the first `READY=1`, sent before systemd knows this
    /// process, is left out.
    successor: AtomicBool,
}

impl Notifier {
    /// A notifier for a `$NOTIFY_SOCKET` value: an absolute path, or `@name` for a socket in
    /// the abstract namespace (Linux). Other forms (`vsock:`) are refused.
    pub fn new(value: &OsStr) -> io::Result<Notifier> {
        let bytes = value.as_bytes();
        let addr = if let Some(name) = bytes.strip_prefix(b"@") {
            abstract_addr(name)?
        } else if bytes.starts_with(b"/") {
            SocketAddr::from_pathname(value)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only a path or an @abstract socket is supported",
            ));
        };
        let socket = UnixDatagram::unbound()?;
        // A full socket buffer drops the message instead of stalling the runtime.
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            socket,
            addr,
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            successor: AtomicBool::new(false),
        })
    }

    /// Sends `READY=1`: pgmux serves clients (again, after a reload).
    pub fn ready(&self) {
        if !self.stopping.load(Relaxed) {
            self.send("READY=1");
        }
    }

    /// Sends `RELOADING=1` with the monotonic time, as `Type=notify-reload` requires; the
    /// guard sends `READY=1` when dropped, whatever the reload's outcome.
    pub fn reloading(&self) -> Reloading<'_> {
        if !self.stopping.load(Relaxed) {
            self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        }
        Reloading(Some(self))
    }

    /// Sends `STOPPING=1`; no `READY=1` follows it.
    pub fn stopping(&self) {
        self.stopping.store(true, Relaxed);
        self.send("STOPPING=1");
    }

    /// An upgrade's new process (`pid`) took over: `MAINPID=pid`, so that systemd follows
    /// it (allowed with `NotifyAccess=main`, as this is the main process until then), and
    /// nothing more from this one: its exit is not the service stopping.
    pub fn hand_over(&self, pid: u32) {
        self.send(&format!("MAINPID={pid}"));
        self.handed_over.store(true, Relaxed);
    }

    /// Marks this process as started by an upgrade (see `successor`).
    pub fn started_by_upgrade(&self) {
        self.successor.store(true, Relaxed);
    }

    fn send(&self, state: &str) {
        if self.handed_over.load(Relaxed) {
            return;
        }
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr)
            && !self.failed.swap(true, Relaxed)
        {
            debug!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET); going on without it");
        }
    }
}

/// A config reload in progress; dropping it tells systemd pgmux is ready again.
#[must_use = "READY=1 is sent when the guard is dropped"]
pub struct Reloading<'a>(Option<&'a Notifier>);

impl Drop for Reloading<'_> {
    fn drop(&mut self) {
        if let Some(notifier) = self.0 {
            notifier.ready();
        }
    }
}

/// The notifier for `$NOTIFY_SOCKET`, made at the first call; `None` when the variable is
/// unset or empty (not run by systemd) or names a socket pgmux cannot use.
pub fn global() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| {
            let value = std::env::var_os(NOTIFY_SOCKET).filter(|v| !v.is_empty())?;
            Notifier::new(&value)
                .map_err(|e| debug!(error = %e, socket = ?value, "cannot use $NOTIFY_SOCKET"))
                .ok()
        })
        .as_ref()
}

/// Sends `READY=1`, waits for `drain` or `stop`, then sends `STOPPING=1`. Called by the listener once
/// its sockets accept. Cancel-safe (dropping it only skips `STOPPING=1`).
pub async fn ready_until(drain: &CancellationToken, stop: &CancellationToken) {
    if let Some(notifier) = global()
        && !notifier.successor.load(Relaxed)
    {
        notifier.ready();
    }
    tokio::select! {
        _ = drain.cancelled() => {}
        _ = stop.cancelled() => {}
    }
    if let Some(notifier) = global() {
        notifier.stopping();
    }
}

/// Sends `RELOADING=1` now and `READY=1` when the returned guard is dropped (nothing
/// without `$NOTIFY_SOCKET`).
pub fn reloading() -> Reloading<'static> {
    match global() {
        Some(notifier) => notifier.reloading(),
        None => Reloading(None),
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist on Linux only",
    ))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the OS knows.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bound receiver in a temp dir, and a notifier pointed at it.
    fn pair() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let notifier = Notifier::new(path.as_os_str()).unwrap();
        (dir, receiver, notifier)
    }

    /// Every datagram waiting on `receiver`.
    fn received(receiver: &UnixDatagram) -> Vec<String> {
        let mut buf = [0u8; 256];
        let mut out = Vec::new();
        while let Ok(n) = receiver.recv(&mut buf) {
            out.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn ready_reloading_and_stopping_arrive_in_order() {
        let (_dir, receiver, notifier) = pair();
        notifier.ready();
        drop(notifier.reloading());
        notifier.stopping();
        let got = received(&receiver);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], "READY=1");
        let usec = got[1]
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("not a RELOADING message: {:?}", got[1]));
        assert!(usec.parse::<u64>().unwrap() > 0);
        assert_eq!(got[2..], ["READY=1", "STOPPING=1"]);
    }

    #[test]
    fn nothing_says_ready_after_stopping() {
        let (_dir, receiver, notifier) = pair();
        let reload = notifier.reloading();
        notifier.stopping();
        drop(reload);
        notifier.ready();
        let got = received(&receiver);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[1], "STOPPING=1");
    }

    #[test]
    fn abstract_socket() {
        let name = format!("pgmux-sd-notify-test-{}", std::process::id());
        let addr = abstract_addr(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.ready();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_vanished_socket_is_noted_once_and_never_fails() {
        let (dir, receiver, notifier) = pair();
        drop(receiver);
        drop(dir);
        notifier.ready();
        assert!(notifier.failed.load(Relaxed));
        notifier.ready();
        drop(notifier.reloading());
        notifier.stopping();
    }

    #[test]
    fn a_full_socket_never_blocks() {
        let (_dir, _receiver, notifier) = pair();
        // Never read: the receiver's queue fills, and sends fail at once instead of waiting.
        for _ in 0..10_000 {
            notifier.ready();
        }
        assert!(notifier.failed.load(Relaxed));
    }

    #[test]
    fn other_socket_forms_are_refused() {
        for value in ["vsock:2:1234", "relative/path"] {
            let result = Notifier::new(OsStr::new(value));
            assert!(result.is_err(), "{value} accepted");
        }
    }
}
