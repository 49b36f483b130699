//! Cleanup that outlives the test process.
//!
//! Statics are never dropped and a killed test runs no destructors, yet a PostgreSQL
//! cluster or a pgmux started by a test must not outlive it. A `Watchdog` is a small `sh`
//! blocked reading a pipe whose only writer is this process: the kernel closes that pipe
//! when the process exits for any reason (even SIGKILL), and the shell then runs its script.
//! Rust opens every pipe with O_CLOEXEC, so no other child inherits the writing end.

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

/// A shell that runs a cleanup script once this process closes its stdin: on drop, or at
/// process exit. Owned by the `TestPostgres` or `TestPgmux` whose processes it cleans up.
pub struct Watchdog {
    shell: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts `sh` in `cwd`, waiting to run `script`. It ignores the terminal's signals
    /// (Ctrl-C reaches the whole process group) so that it survives to clean up.
    pub fn spawn(script: &str, cwd: &Path) -> Watchdog {
        let full = format!("trap '' INT HUP QUIT TERM\nread _line\n{script}\n");
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(full)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            // Not our stdout: whoever reads the test output must not wait for this shell.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh starts (needed for test cleanup)");
        let pipe = shell.stdin.take();
        Watchdog { shell, pipe }
    }

    /// Kills the shell so that its script never runs; use before the script would act on
    /// something already gone (a reaped pid could be reused).
    pub fn disarm(&mut self) {
        let _ = self.shell.kill();
    }
}

impl Drop for Watchdog {
    /// Runs the script now (unless disarmed) and waits for it.
    fn drop(&mut self) {
        drop(self.pipe.take());
        let _ = self.shell.wait();
    }
}

/// Quotes `s` for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
