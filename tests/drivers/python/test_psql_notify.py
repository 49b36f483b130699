"""LISTEN/NOTIFY with psql through pgmux: 10 psql sessions LISTEN (a pool of 2 in
transaction mode) and read what psql prints,

    Asynchronous notification "chan" with payload "..." received from server process with PID N.

which it does after a command, for what arrived until then: each session runs `SELECT 1`
until it has printed every notification it must get. A sender psql sends the
notifications.

Checks (notify_common.py): 50 notifications from one transaction arrive in order, with
payloads of 0 to 7999 bytes intact, on every listener; each carries the process id that
pg_backend_pid() gave in the sender's transaction; a listener receives its own NOTIFY;
after UNLISTEN nothing arrives on that channel. psql has no way to show the BackendKeyData
pid, so the other tests check that the pid is not it.

This program only feeds psql (PGMUX_DRIVER_PSQL, else `psql` on PATH) its statements on
stdin and reads its output: psql itself speaks to pgmux (simple Queries).

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
Exits 0 when every result was right, 1 otherwise.
"""

import os
import re
import subprocess
import sys
import time

from notify_common import (
    LISTENERS,
    WAIT,
    Failed,
    burst,
    check,
    expect_sequence,
)

PSQL = os.environ.get("PGMUX_DRIVER_PSQL") or "psql"
JOBS = "psql_jobs"
MARKER = "psql_marker"
# What the session echoes after each batch of statements: its output up to here is theirs.
DONE = "@@ psql test: done @@"
NOTE = re.compile(
    r'Asynchronous notification "(?P<channel>[^"]*)"(?: with payload "(?P<payload>.*)")? '
    r"received from server process with PID (?P<pid>\d+)\."
)


class Psql:
    """One psql session, fed on stdin."""

    def __init__(self, name):
        self.name = name
        self.proc = subprocess.Popen(
            [PSQL, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.notes = []  # (channel, payload, pid) as psql printed them, in order
        self.taken = 0  # how many of them receive() returned

    def run(self, sql):
        """Runs statements; returns the lines psql printed that are not notifications."""
        self.proc.stdin.write(f"{sql}\n\\echo {DONE}\n")
        self.proc.stdin.flush()
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if line == "":
                raise Failed(f"{self.name}: psql ended (exit status {self.proc.wait()}): {lines[-5:]}")
            line = line.rstrip("\n")
            if line == DONE:
                return lines
            note = NOTE.fullmatch(line)
            if note:
                self.notes.append((note["channel"], note["payload"] or "", int(note["pid"])))
            else:
                lines.append(line)

    def receive(self, count):
        """The next `count` notifications psql printed (fewer if they do not come within
        WAIT s): runs `SELECT 1` until it printed them."""
        deadline = time.monotonic() + WAIT
        while len(self.notes) < self.taken + count and time.monotonic() < deadline:
            self.run("SELECT 1;")
            if len(self.notes) < self.taken + count:
                time.sleep(0.02)
        got = self.notes[self.taken : self.taken + count]
        self.taken += len(got)
        return got

    def send(self, notes):
        """Sends (channel, payload) pairs in one transaction; returns its pg_backend_pid()."""
        sql = ["BEGIN;", "SELECT pg_backend_pid();"]
        sql += [f"SELECT pg_notify('{channel}', '{text}');" for channel, text in notes]
        sql.append("COMMIT;")
        lines = self.run("\n".join(sql))
        return int(lines[0])

    def close(self):
        self.proc.stdin.close()
        check(self.proc.wait() == 0, f"{self.name}: psql exited with {self.proc.returncode}")


def run():
    listeners = [Psql(f"listener {i}") for i in range(LISTENERS)]
    try:
        for conn in listeners:
            conn.run(f"LISTEN {JOBS};")
        listeners[1].run(f"LISTEN {MARKER};")

        sender = Psql("sender")
        listeners.append(sender)
        payloads = burst()
        pid = sender.send([(JOBS, p) for p in payloads])

        # Self-notification: listener 0's own NOTIFY, in a transaction, comes back to it.
        lines = listeners[0].run(f"BEGIN;\nSELECT pg_backend_pid();\nNOTIFY {JOBS}, 'self';\nCOMMIT;")
        own = int(lines[0])

        expected = [(JOBS, p, pid) for p in payloads] + [(JOBS, "self", own)]
        for i in range(LISTENERS):
            expect_sequence(f"listener {i}", listeners[i].receive(len(expected)), expected)

        listeners[1].run(f"UNLISTEN {JOBS};")
        last = sender.send([(JOBS, "after unlisten"), (MARKER, "end")])
        for i in range(LISTENERS):
            if i == 1:
                got = listeners[1].receive(1)
                expect_sequence("listener 1 after UNLISTEN", got, [(MARKER, "end", last)])
            else:
                expect_sequence(f"listener {i}", listeners[i].receive(1), [(JOBS, "after unlisten", last)])
        for conn in listeners:
            conn.close()
        version = subprocess.run([PSQL, "--version"], capture_output=True, text=True).stdout.split()[2]
    finally:
        for conn in listeners:
            if conn.proc.poll() is None:
                conn.proc.kill()
                conn.proc.wait()
    return (
        f"psql {version}: {LISTENERS} sessions printed {len(payloads)} notifications "
        f"(0 to {max(map(len, payloads))} bytes) in order with the sender's server pid, and their own; "
        "nothing after UNLISTEN"
    )


def main():
    try:
        print(run())
    except Failed as e:
        print(f"psql_notify: FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
