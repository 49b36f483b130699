"""What the LISTEN/NOTIFY driver tests share: the notifications they send and what each
listening client must receive, in order.

Every test runs LISTENERS clients that LISTEN to one channel (on a pool of 2 in
transaction mode), and a sender that, in one transaction, notes its pg_backend_pid() and
sends BURST notifications whose payloads grow from 0 to 7999 bytes (PostgreSQL's limit:
a payload must be shorter than 8000 bytes). A notification that should not arrive (after
an UNLISTEN, or to a LISTEN rolled back) is always followed by one on a channel the client
does listen to, so "nothing arrived" is read from the order of what did, without waiting
for a while.
"""

import os

LISTENERS = 10
BURST = 50
MAX_PAYLOAD = 7999
# How long a client waits for what it must receive before the test fails.
WAIT = 30.0
# Through pgmux in transaction mode: the BackendKeyData pid is pgmux's own, never the pid
# of a server; directly and in session mode it is the server's.
EXPECT_MOVES = bool(os.environ.get("PGMUX_DRIVER_EXPECT_MOVES"))

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def payload(i):
    """The payload of the burst's notification i: from 0 bytes (i = 0) to 7999 (the last)."""
    length = i * MAX_PAYLOAD // (BURST - 1)
    return "".join(_ALPHABET[(i * 31 + k * 7) % len(_ALPHABET)] for k in range(length))


def burst():
    return [payload(i) for i in range(BURST)]


class Failed(AssertionError):
    pass


def check(ok, what):
    if not ok:
        raise Failed(what)


def show(note):
    """(channel, payload, pid) with a long payload shortened, for messages."""
    channel, text, pid = note
    if len(text) > 40:
        text = f"{text[:20]}...({len(text)} bytes)"
    return (channel, text, pid)


def expect_sequence(who, got, expected):
    """got and expected: lists of (channel, payload, pid), in the order they arrived."""
    for k, (g, e) in enumerate(zip(got, expected)):
        check(g == e, f"{who}: notification {k} was {show(g)}, expected {show(e)}")
    check(
        len(got) == len(expected),
        f"{who}: {len(got)} notifications, expected {len(expected)}"
        + (f"; the first missing: {show(expected[len(got)])}" if len(got) < len(expected) else ""),
    )


def check_sender_pid(who, notified_pid, key_pid):
    """A notification carries the pid of the server that ran the NOTIFY; through pgmux in
    transaction mode that is not the BackendKeyData pid the client was given."""
    if EXPECT_MOVES:
        check(
            notified_pid != key_pid,
            f"{who}: the sender's server pid {notified_pid} equals its BackendKeyData pid",
        )
    else:
        check(
            notified_pid == key_pid,
            f"{who}: the sender's server pid {notified_pid} is not its BackendKeyData pid {key_pid}",
        )
