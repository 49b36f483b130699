"""LISTEN/NOTIFY with psycopg 3 through pgmux: conn.notifies() on 10 autocommit listeners
(a pool of 2 in transaction mode), a LISTEN in a transaction that commits (it counts) and
one in a transaction that rolls back (it must not), and UNLISTEN.

Checks (notify_common.py): 50 notifications from one transaction arrive in order, with
payloads of 0 to 7999 bytes intact, on every listener; each carries the process id that
pg_backend_pid() gave in the sender's transaction (through pgmux in transaction mode, not
the sender's BackendKeyData pid); a listener receives its own NOTIFY; after UNLISTEN, and
after a rolled-back LISTEN, nothing arrives on that channel; after a rolled-back UNLISTEN
notifications still arrive.

psycopg sends a Query without parameters by the simple protocol, so LISTEN and UNLISTEN
here are simple Queries; the pg_notify() calls have parameters (extended protocol).

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
Exits 0 when every result was right, 1 otherwise.
"""

import sys
import time

import psycopg

from notify_common import (
    LISTENERS,
    WAIT,
    Failed,
    burst,
    check,
    check_sender_pid,
    expect_sequence,
)

JOBS = "psycopg_jobs"
TX = "psycopg_tx"
MARKER = "psycopg_marker"


def connect(autocommit=True):
    return psycopg.connect(autocommit=autocommit, connect_timeout=30)


def receive(conn, count):
    """The next `count` notifications of conn, as (channel, payload, pid); fewer if they do
    not come within WAIT seconds."""
    got = []
    deadline = time.monotonic() + WAIT
    while len(got) < count and time.monotonic() < deadline:
        for n in conn.notifies(timeout=deadline - time.monotonic(), stop_after=count - len(got)):
            got.append((n.channel, n.payload, n.pid))
    return got


def send(sender, notes):
    """Sends (channel, payload) pairs in one transaction; returns its pg_backend_pid()."""
    with sender.transaction():
        pid = sender.execute("SELECT pg_backend_pid()").fetchone()[0]
        for channel, text in notes:
            sender.execute("SELECT pg_notify(%s, %s)", (channel, text))
    return pid


def run():
    listeners = [connect() for _ in range(LISTENERS)]
    for conn in listeners:
        conn.execute(f"LISTEN {JOBS}")
    listeners[1].execute(f"LISTEN {MARKER}")

    # A LISTEN in a transaction that commits counts from the commit on.
    committed = connect(autocommit=False)
    committed.execute(f"LISTEN {TX}")
    committed.commit()
    # One that rolls back does not; a later one that commits does.
    rolled_back = connect(autocommit=False)
    rolled_back.execute(f"LISTEN {TX}")
    rolled_back.rollback()
    rolled_back.execute(f"LISTEN {MARKER}")
    rolled_back.commit()

    sender = connect()
    payloads = burst()
    pid = send(sender, [(JOBS, p) for p in payloads])
    check_sender_pid("sender", pid, sender.info.backend_pid)

    # Self-notification: listener 0's own NOTIFY, in a transaction, comes back to it.
    with listeners[0].transaction():
        own = listeners[0].execute("SELECT pg_backend_pid()").fetchone()[0]
        listeners[0].execute(f"NOTIFY {JOBS}, 'self'")
    check_sender_pid("listener 0", own, listeners[0].info.backend_pid)

    expected = [(JOBS, p, pid) for p in payloads] + [(JOBS, "self", own)]
    for i, conn in enumerate(listeners):
        expect_sequence(f"listener {i}", receive(conn, len(expected)), expected)

    listeners[1].execute(f"UNLISTEN {JOBS}")
    # An UNLISTEN in a transaction that rolls back does not count.
    committed.execute(f"UNLISTEN {TX}")
    committed.rollback()
    last = send(sender, [(JOBS, "after unlisten"), (TX, "tx"), (MARKER, "end")])
    for i, conn in enumerate(listeners):
        if i == 1:
            expect_sequence("listener 1 after UNLISTEN", receive(conn, 1), [(MARKER, "end", last)])
        else:
            expect_sequence(f"listener {i}", receive(conn, 1), [(JOBS, "after unlisten", last)])
    expect_sequence("LISTEN in a committed transaction", receive(committed, 1), [(TX, "tx", last)])
    expect_sequence("LISTEN in a rolled-back transaction", receive(rolled_back, 1), [(MARKER, "end", last)])

    for conn in listeners + [committed, rolled_back, sender]:
        conn.close()
    return (
        f"psycopg {psycopg.__version__}: {LISTENERS} listeners got {len(payloads)} notifications "
        f"(0 to {max(map(len, payloads))} bytes) in order with the sender's server pid, and their own; "
        "UNLISTEN and a rolled-back LISTEN stop delivery, a committed one starts it, a rolled-back UNLISTEN "
        "does not stop it"
    )


def main():
    try:
        print(run())
    except Failed as e:
        print(f"psycopg_notify: FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
