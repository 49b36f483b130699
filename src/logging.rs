//! pgmux's log output, built so that logging can never break pgmux.
//!
//! - [`LogWriter`], the `tracing` writer: a log line is queued in memory and written to
//!   stderr by a thread of its own. A session, the signal task or the admin port only
//!   ever takes a short lock to queue a line; a line that does not fit in the queue (the
//!   reader of stderr is slow or stuck) or that the kernel refuses (the pipe broke, as when
//!   `scripts/quickstart` is stopped with Ctrl-C) is dropped and counted
//!   ([`write_errors`], `pgmux_log_write_errors_total`). Never a panic, never a wait on
//!   the pipe.
//! - One event is one line: the writer escapes every line break and control character
//!   inside an event (`\n`, `\r`, `\x1b`, ...), whatever field or call site it came
//!   from, so that a user name with a newline cannot forge a log line. ESC is kept only
//!   when stderr is a terminal and the colours are pgmux's own.
//! - [`Escaped`]: text from a client (a user or database name, `application_name`, a
//!   query, an error quoting them) is wrapped at the call site as well, which also
//!   escapes backslashes and the Unicode line separators and direction overrides.
//! - [`install_panic_hook`]: a panic is logged once through `tracing` with its location
//!   and counted ([`panics`], `pgmux_session_panics_total`), instead of Rust's default
//!   print to stderr (which may itself fail).
//!
//! The two counters are process-wide statics on purpose: there is one stderr and one
//! panic hook per process, and both are installed before any pooler exists.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::panic::{Location, PanicHookInfo};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing_subscriber::fmt::MakeWriter;

/// Log lines dropped: the queue was full, or stderr refused them.
static WRITE_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Panics seen by the hook (or reported with [`record_panic`]).
static PANICS: AtomicU64 = AtomicU64::new(0);

/// At most this many bytes of log lines wait for stderr. About 4 000 typical lines: enough
/// for a burst while the reader catches up, small enough not to matter when it never does.
const QUEUE_BYTES: usize = 1 << 20;

/// Log lines dropped since the process started (`pgmux_log_write_errors_total`).
pub fn write_errors() -> u64 {
    WRITE_ERRORS.load(Relaxed)
}

/// Panics since the process started (`pgmux_session_panics_total`).
pub fn panics() -> u64 {
    PANICS.load(Relaxed)
}

/// Shows text from outside (a client, a server, a panic message) with its control
/// characters escaped: `\n`, `\r`, `\t`, `\\`, and `\u{..}` for the other control
/// characters and the Unicode line separators and direction overrides. Wrap any
/// client-provided value that reaches a log field: `user = %Escaped(&user)`.
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{}", self.0)
    }
}

impl<T: fmt::Display> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Passes text through to the formatter, escaping as it goes (no allocation).
struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0; // start of the run of characters not yet written
        for (at, c) in s.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            self.0.write_str(s.get(plain..at).unwrap_or_default())?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                '\\' => self.0.write_str("\\\\")?,
                other => write!(self.0, "\\u{{{:x}}}", u32::from(other))?,
            }
            plain = at + c.len_utf8();
        }
        self.0.write_str(s.get(plain..).unwrap_or_default())
    }
}

/// Control characters (C0, DEL, C1), the backslash (so that an escape in the output is
/// always pgmux's), Unicode line and paragraph separators, and the bidirectional
/// overrides that make a terminal show text in another order than it is.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The `tracing` writer: queues each line for the stderr thread; see the module docs.
/// Cloning it shares the queue.
#[derive(Clone)]
pub struct LogWriter {
    queue: Arc<Queue>,
    /// ESC passes (the formatter's colours); otherwise it is escaped like any control.
    colours: bool,
}

struct Queue {
    pending: Mutex<Pending>,
    /// Signalled when a line is queued (the stderr thread waits on it).
    queued: Condvar,
    /// Signalled when the stderr thread has written all it took (for [`LogWriter::flush`]).
    written: Condvar,
}

#[derive(Default)]
struct Pending {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The stderr thread is writing lines it took from the queue.
    writing: bool,
    /// No stderr thread: every line is dropped and counted.
    no_thread: bool,
}

impl LogWriter {
    /// Starts the thread that writes queued lines to stderr (file descriptor 2); `colours`
    /// says whether the formatter writes ANSI colours (stderr is a terminal). If pgmux
    /// was started with descriptor 2 closed, it is first pointed at /dev/null, so that the
    /// first socket pgmux opens cannot take that number and receive the log.
    pub fn stderr(colours: bool) -> LogWriter {
        keep_stderr_taken();
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            queued: Condvar::new(),
            written: Condvar::new(),
        });
        let writer = queue.clone();
        let started = std::thread::Builder::new()
            .name("pgmux-log".to_owned())
            .spawn(move || write_lines(&writer));
        if let Err(e) = started {
            queue.pending.lock().no_thread = true;
            // Said once, directly; if stderr fails too there is nobody to tell.
            let _ = writeln!(io::stderr(), "pgmux: no log thread ({e}): logs are dropped");
        }
        LogWriter { queue, colours }
    }

    /// Queues one event's line, escaped; drops and counts it when the queue is full.
    fn push(&self, event: &[u8]) {
        let line = one_line(event, self.colours);
        let mut pending = self.queue.pending.lock();
        if pending.no_thread || pending.bytes + line.len() > QUEUE_BYTES {
            drop(pending);
            WRITE_ERRORS.fetch_add(1, Relaxed);
            return;
        }
        pending.bytes += line.len();
        pending.lines.push_back(line);
        drop(pending);
        self.queue.queued.notify_one();
    }

    /// Waits until every queued line has been written (or dropped), up to `limit`; for
    /// the last lines before the process exits. Returns whether the queue emptied.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut pending = self.queue.pending.lock();
        while !pending.no_thread && (pending.writing || !pending.lines.is_empty()) {
            if self
                .queue
                .written
                .wait_until(&mut pending, deadline)
                .timed_out()
            {
                return false;
            }
        }
        true
    }
}

/// `event` as exactly one line: its final newline kept, every other line break and
/// control character escaped (`\n`, `\r`, `\xNN`; C1 controls as `\u{NN}`). Tabs stay;
/// ESC stays when `colours`.
fn one_line(event: &[u8], colours: bool) -> Vec<u8> {
    let (body, newline) = match event.strip_suffix(b"\n") {
        Some(body) => (body, true),
        None => (event, false),
    };
    let control = |b: u8| (b < 0x20 && b != b'\t' && !(colours && b == 0x1b)) || b == 0x7f;
    // C1 controls are U+0080..U+009F: 0xC2 then 0x80..=0x9F in UTF-8.
    let c1 = |w: &[u8]| matches!(w, [0xc2, 0x80..=0x9f]);
    if !body.iter().any(|&b| control(b)) && !body.windows(2).any(c1) {
        return event.to_vec();
    }
    let mut out = Vec::with_capacity(event.len() + 16);
    let mut bytes = body.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b if control(b) => {
                let _ = write!(out, "\\x{b:02x}");
            }
            0xc2 if matches!(bytes.peek(), Some(0x80..=0x9f)) => {
                let low = bytes.next().unwrap_or_default();
                let _ = write!(out, "\\u{{{:x}}}", u32::from(low));
            }
            b => out.push(b),
        }
    }
    if newline {
        out.push(b'\n');
    }
    out
}

/// Points descriptor 2 at /dev/null if it is closed.
fn keep_stderr_taken() {
    // SAFETY: fcntl(F_GETFD) only reads the descriptor's flags.
    if unsafe { libc::fcntl(2, libc::F_GETFD) } != -1 {
        return;
    }
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto a closed descriptor; `null` stays owned by its File.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
    }
}

/// The stderr thread: takes every queued line at once, writes them, and counts those
/// stderr refused. It may block on a full pipe; only this thread waits then.
fn write_lines(queue: &Queue) {
    // Written through the raw descriptor, not `io::stderr()`: that one pretends a closed
    // descriptor (EBADF) accepted everything, and we want to count what is lost.
    // ManuallyDrop: descriptor 2 stays open when this handle goes.
    // SAFETY: descriptor 2 is open for the life of the process (or EBADF is reported).
    let mut stderr = ManuallyDrop::new(unsafe { File::from_raw_fd(2) });
    loop {
        let lines = {
            let mut pending = queue.pending.lock();
            pending.writing = false;
            queue.written.notify_all();
            while pending.lines.is_empty() {
                queue.queued.wait(&mut pending);
            }
            pending.writing = true;
            pending.bytes = 0;
            std::mem::take(&mut pending.lines)
        };
        for line in lines {
            if stderr.write_all(&line).is_err() {
                WRITE_ERRORS.fetch_add(1, Relaxed);
            }
        }
    }
}

/// What `tracing` writes one event through; each `write` is queued as it comes.
pub struct LineWriter<'a> {
    log: &'a LogWriter,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.log.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter { log: self }
    }
}

/// Replaces Rust's panic message on stderr with one `tracing` error line, `panicked at
/// FILE:LINE:COLUMN: MESSAGE` (the test harness looks for `panicked at`), and counts
/// the panic. Unwinding then goes on as usual: a panicking task ends, pgmux does not.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info: &PanicHookInfo<'_>| {
        record_panic(info.location(), panic_message(info.payload()));
    }));
}

/// Logs a panic and counts it. The hook calls this for every panic; call it yourself
/// only for a panic the hook did not see, or it is counted twice.
pub fn record_panic(location: Option<&Location<'_>>, message: &str) {
    PANICS.fetch_add(1, Relaxed);
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("unnamed");
    match location {
        Some(at) => tracing::error!(
            target: "pgmux::panic",
            thread,
            "panicked at {}:{}:{}: {}",
            Escaped(at.file()),
            at.line(),
            at.column(),
            Escaped(message)
        ),
        None => tracing::error!(
            target: "pgmux::panic",
            thread,
            "panicked at an unknown place: {}",
            Escaped(message)
        ),
    }
}

/// The message of a panic payload (`panic!("...")` gives a `&str` or a `String`), for
/// the hook and for code that catches a panic (`catch_unwind`) and reports it.
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic without a message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_neutralises_line_breaks_and_terminal_controls() {
        let forged =
            "app\n2026-01-01T00:00:00Z  INFO pgmux: forged\r\t\u{1b}[31m\\x\u{2028}\u{202e}é€";
        assert_eq!(
            Escaped(forged).to_string(),
            "app\\n2026-01-01T00:00:00Z  INFO pgmux: forged\\r\\t\\u{1b}[31m\\\\x\\u{2028}\\u{202e}é€"
        );
        assert_eq!(Escaped("plain name").to_string(), "plain name");
        assert_eq!(format!("{:?}", Escaped("a\nb")), "a\\nb");
        // Any Display value: an error that quotes a client's text.
        let err = io::Error::other("no such user \"x\ny\"");
        assert_eq!(Escaped(&err).to_string(), "no such user \"x\\ny\"");
    }

    #[test]
    fn an_event_is_always_one_line() {
        let event = b"2026 DEBUG pgmux: login refused err=no such user \"x\n2026  INFO forged\r\"\x1b[2J\xc2\x9b\x7f\tend\n";
        let line = one_line(event, false);
        assert_eq!(
            String::from_utf8_lossy(&line),
            "2026 DEBUG pgmux: login refused err=no such user \"x\\n2026  INFO forged\\r\"\\x1b[2J\\u{9b}\\x7f\tend\n"
        );
        // On a terminal the formatter's colours stay; line breaks never do.
        let coloured = one_line(b"\x1b[32mINFO\x1b[0m a\nb\n", true);
        assert_eq!(coloured, b"\x1b[32mINFO\x1b[0m a\\nb\n");
        // The common case is a plain copy; text that is not UTF-8 passes through.
        assert_eq!(
            one_line(b"plain \xff\xc3\xa9\n", false),
            b"plain \xff\xc3\xa9\n"
        );
        assert_eq!(one_line(b"no newline\n\n", false), b"no newline\\n\n");
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let s: Box<dyn Any + Send> = Box::new("static");
        let owned: Box<dyn Any + Send> = Box::new(String::from("owned"));
        let other: Box<dyn Any + Send> = Box::new(7_u8);
        assert_eq!(panic_message(s.as_ref()), "static");
        assert_eq!(panic_message(owned.as_ref()), "owned");
        assert_eq!(panic_message(other.as_ref()), "(a panic without a message)");
    }

    /// A `tracing` writer into memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn explode() {
        panic!("boom in {}", "a\nb");
    }

    #[test]
    fn the_hook_logs_a_panic_once_with_its_location_and_counts_it() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish();
        let before = panics();
        let previous = std::panic::take_hook();
        install_panic_hook();
        let caught =
            tracing::subscriber::with_default(subscriber, || std::panic::catch_unwind(explode));
        std::panic::set_hook(previous);
        assert!(caught.is_err());
        assert_eq!(panics(), before + 1);
        let log = String::from_utf8_lossy(&captured.0.lock()).into_owned();
        assert_eq!(log.matches("panicked at").count(), 1, "{log}");
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains(" ERROR pgmux::panic: panicked at src/logging.rs:"),
            "{log}"
        );
        assert!(log.contains(": boom in a\\nb"), "{log}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A writer whose thread never runs: the queue fills, then lines are dropped.
        let log = LogWriter {
            queue: Arc::new(Queue {
                pending: Mutex::new(Pending::default()),
                queued: Condvar::new(),
                written: Condvar::new(),
            }),
            colours: false,
        };
        let before = write_errors();
        let line = vec![b'x'; 1000];
        for _ in 0..(QUEUE_BYTES / line.len() + 10) {
            log.make_writer().write_all(&line).expect("never fails");
        }
        assert!(write_errors() >= before + 10);
        assert!(log.queue.pending.lock().bytes <= QUEUE_BYTES);
        assert!(
            !log.flush(Duration::from_millis(10)),
            "nothing writes the queue"
        );
    }
}
