"""LISTEN/NOTIFY with asyncpg through pgmux: add_listener on 10 connections (a pool of 2 in
transaction mode), then remove_listener.

Checks (notify_common.py): 50 notifications from one transaction reach every listener's
callback in order, with payloads of 0 to 7999 bytes intact; each carries the process id
that pg_backend_pid() gave in the sender's transaction (through pgmux in transaction mode,
not the sender's BackendKeyData pid, get_server_pid()); a listener receives its own NOTIFY;
after remove_listener nothing arrives on that channel, neither to a callback nor on the
wire (a Connection subclass records every NotificationResponse asyncpg reads: asyncpg
itself drops one for a channel without a callback).

asyncpg sends LISTEN and UNLISTEN with the extended protocol (conn.fetch: Parse, Bind,
Execute, Sync), never as a simple Query.

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
Exits 0 when every result was right, 1 otherwise.
"""

import asyncio
import sys

import asyncpg

from notify_common import (
    LISTENERS,
    WAIT,
    Failed,
    burst,
    check_sender_pid,
    expect_sequence,
)

JOBS = "asyncpg_jobs"
MARKER = "asyncpg_marker"


class Recorded(asyncpg.Connection):
    """Records every notification read from the wire, whether or not a callback wants it."""

    def _process_notification(self, pid, channel, payload):
        self.wire.put_nowait((channel, payload, pid))
        super()._process_notification(pid, channel, payload)


async def connect():
    conn = await asyncpg.connect(timeout=30, command_timeout=60, connection_class=Recorded)
    conn.wire = asyncio.Queue()
    conn.heard = asyncio.Queue()  # what its callbacks got
    return conn


def callback(conn, pid, channel, payload):
    conn.heard.put_nowait((channel, payload, pid))


async def receive(queue, count):
    """The next `count` notifications of a queue; fewer if they do not come within WAIT s."""
    got = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while len(got) < count:
        try:
            got.append(await asyncio.wait_for(queue.get(), deadline - loop.time()))
        except asyncio.TimeoutError:
            break
    return got


async def send(sender, notes):
    """Sends (channel, payload) pairs in one transaction; returns its pg_backend_pid()."""
    async with sender.transaction():
        pid = await sender.fetchval("SELECT pg_backend_pid()")
        for channel, text in notes:
            await sender.execute("SELECT pg_notify($1, $2)", channel, text)
    return pid


async def run():
    listeners = [await connect() for _ in range(LISTENERS)]
    for conn in listeners:
        await conn.add_listener(JOBS, callback)
    await listeners[1].add_listener(MARKER, callback)

    sender = await connect()
    payloads = burst()
    pid = await send(sender, [(JOBS, p) for p in payloads])
    check_sender_pid("sender", pid, sender.get_server_pid())

    # Self-notification: listener 0's own NOTIFY, in a transaction, comes back to it.
    async with listeners[0].transaction():
        own = await listeners[0].fetchval("SELECT pg_backend_pid()")
        await listeners[0].execute(f"NOTIFY {JOBS}, 'self'")
    check_sender_pid("listener 0", own, listeners[0].get_server_pid())

    expected = [(JOBS, p, pid) for p in payloads] + [(JOBS, "self", own)]
    for i, conn in enumerate(listeners):
        expect_sequence(f"listener {i}", await receive(conn.heard, len(expected)), expected)
        expect_sequence(f"listener {i} (on the wire)", await receive(conn.wire, len(expected)), expected)

    await listeners[1].remove_listener(JOBS, callback)
    last = await send(sender, [(JOBS, "after remove_listener"), (MARKER, "end")])
    for i, conn in enumerate(listeners):
        if i == 1:
            end = [(MARKER, "end", last)]
            expect_sequence("listener 1 after remove_listener", await receive(conn.heard, 1), end)
            expect_sequence("listener 1 after remove_listener (on the wire)", await receive(conn.wire, 1), end)
        else:
            after = [(JOBS, "after remove_listener", last)]
            expect_sequence(f"listener {i}", await receive(conn.heard, 1), after)

    for conn in listeners + [sender]:
        await conn.close()
    return (
        f"asyncpg {asyncpg.__version__}: {LISTENERS} listeners' callbacks got {len(payloads)} notifications "
        f"(0 to {max(map(len, payloads))} bytes) in order with the sender's server pid, and their own; "
        "nothing after remove_listener, on the wire either"
    )


async def main():
    try:
        print(await run())
    except Failed as e:
        print(f"asyncpg_notify: FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
