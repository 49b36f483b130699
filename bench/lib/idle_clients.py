#!/usr/bin/env python3
"""Holds N idle, authenticated PostgreSQL client connections open (bench/run, scenario S8).

    idle_clients.py --host 127.0.0.1 --port 6432 --user bench --password pw --dbname bench -n 10000

Speaks the wire protocol itself (asyncio, no driver): StartupMessage, then SCRAM-SHA-256,
md5, cleartext or trust, up to the first ReadyForQuery. Each connection then stays idle.

Talks to bench/run over stdin/stdout, one line each:
  stdout `READY <open> <seconds>`  once every connection is logged in
  stdout `FAILED <open> <seconds> <message>`  when some could not log in; the others stay open
                                      until stdin closes (then it exits 1)
  stdin  `CHECK`                   -> stdout `ALIVE <open> <pinged> <ping_failures>`: how many
                                      connections the pooler has not closed, and a `SELECT 1`
                                      on a sample of them (spread over the whole set)
  stdin  EOF                       -> every connection is closed (Terminate) and it exits 0

The SCRAM salted password is computed once per (salt, iterations), as a real application's
connection pool would not, but the pooler's side of each login is the same: this keeps the
client from dominating the 2 cores while the pooler is measured.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import resource
import struct
import sys
import time

PROTOCOL_3 = 196608


def msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


class LoginError(Exception):
    pass


class Scram:
    """SCRAM-SHA-256 client side (RFC 5802/7677), no channel binding."""

    cache: dict = {}

    def __init__(self, password: str):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = "n=,r=" + self.nonce

    def first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def final(self, server_first: str) -> bytes:
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        nonce, salt, iterations = attrs["r"], attrs["s"], int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise LoginError("SCRAM: server nonce does not extend the client nonce")
        key = (self.password, salt, iterations)
        keys = Scram.cache.get(key)
        if keys is None:
            salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(salt), iterations)
            client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
            keys = (client_key, hashlib.sha256(client_key).digest())
            Scram.cache[key] = keys
        client_key, stored_key = keys
        without_proof = "c=biws,r=" + nonce
        auth_message = ",".join((self.first_bare, server_first, without_proof)).encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        return (without_proof + ",p=" + base64.b64encode(proof).decode()).encode()


def error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '?')}: {fields.get('M', '')}"


async def read_msg(reader):
    header = await reader.readexactly(5)
    tag, length = header[:1], struct.unpack("!I", header[1:])[0]
    body = await reader.readexactly(length - 4)
    return tag, body


async def login(args):
    reader, writer = await asyncio.open_connection(args.host, args.port)
    params = b"user\0" + args.user.encode() + b"\0database\0" + args.dbname.encode() + b"\0"
    params += b"application_name\0bench-idle\0\0"
    writer.write(struct.pack("!II", len(params) + 8, PROTOCOL_3) + params)
    scram = None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            raise LoginError(error_text(body))
        if tag == b"Z":
            return reader, writer
        if tag != b"R":
            continue  # ParameterStatus, BackendKeyData, NoticeResponse
        code = struct.unpack("!I", body[:4])[0]
        if code == 0:  # AuthenticationOk
            continue
        if code == 3:  # cleartext
            writer.write(msg(b"p", args.password.encode() + b"\0"))
        elif code == 5:  # md5
            inner = hashlib.md5(args.password.encode() + args.user.encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
            writer.write(msg(b"p", b"md5" + outer.encode() + b"\0"))
        elif code == 10:  # SASL
            mechanisms = body[4:].split(b"\0")
            if b"SCRAM-SHA-256" not in mechanisms:
                raise LoginError(f"no SCRAM-SHA-256 among {mechanisms}")
            scram = Scram(args.password)
            first = scram.first()
            writer.write(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first))
        elif code == 11:  # SASLContinue
            writer.write(msg(b"p", scram.final(body[4:].decode())))
        elif code == 12:  # SASLFinal
            continue
        else:
            raise LoginError(f"unsupported authentication request {code}")
        await writer.drain()


async def ping(reader, writer) -> bool:
    writer.write(msg(b"Q", b"SELECT 1\0"))
    await writer.drain()
    ok = False
    while True:
        tag, body = await read_msg(reader)
        if tag == b"D":
            ok = body == struct.pack("!HI", 1, 1) + b"1"
        elif tag == b"E":
            print(f"bench-idle: SELECT 1 failed: {error_text(body)}", file=sys.stderr)
        elif tag == b"Z":
            return ok


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", default=os.environ.get("PGPASSWORD", ""))
    parser.add_argument("--dbname", required=True)
    parser.add_argument("-n", "--clients", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=200, help="logins in flight at once")
    parser.add_argument("--ping-sample", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=120.0, help="for all the logins")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.clients + 64
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            print(f"FAILED 0 0 ulimit -n is {hard} (hard); {need} needed for {args.clients} clients", flush=True)
            return 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    conns = []
    semaphore = asyncio.Semaphore(args.concurrency)
    failures = []

    async def one():
        async with semaphore:
            try:
                conns.append(await login(args))
            except (OSError, asyncio.IncompleteReadError, LoginError) as e:
                failures.append(f"{type(e).__name__}: {e}")

    started = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(args.clients))), args.timeout)
    except asyncio.TimeoutError:
        failures.append(f"timeout: only {len(conns)} of {args.clients} logged in after {args.timeout:.0f}s")
    elapsed = time.monotonic() - started
    if failures:
        # The open ones stay open until stdin closes, so that the pooler can be measured.
        kinds = sorted(set(failures))
        print(
            f"FAILED {len(conns)} {elapsed:.2f} {len(failures)} of {args.clients} logins failed: "
            + "; ".join(kinds[:3]),
            flush=True,
        )
    else:
        print(f"READY {len(conns)} {elapsed:.2f}", flush=True)

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        line = await stdin.readline()
        if not line:
            break
        if line.strip() == b"CHECK":
            # A connection the pooler closed (or wrote to) has EOF or data waiting.
            alive = [c for c in conns if not c[0].at_eof() and not c[0]._buffer]
            step = max(1, len(alive) // max(1, args.ping_sample))
            sample = alive[::step][: args.ping_sample]
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(ping(r, w) for r, w in sample), return_exceptions=True), 30
                )
                bad = sum(1 for r in results if r is not True)
            except asyncio.TimeoutError:
                bad = len(sample)  # no answer within 30 s
            print(f"ALIVE {len(alive)} {len(sample)} {bad}", flush=True)

    for _, writer in conns:
        try:
            writer.write(msg(b"X", b""))
            writer.close()
        except OSError:
            pass
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
