"""asyncpg through pgmux: its statement cache, explicit prepared statements, executemany and
transaction blocks, from 20 connections at once on a pool of 3 server connections.

asyncpg names every statement it prepares (__asyncpg_stmt_1__, ...) per connection, so in
transaction mode the same name means different statements on different clients, and a
client's statements must follow it to whichever server connection it gets next.

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
With PGMUX_DRIVER_TLS_CA (a CA's PEM file), every connection uses TLS with an SSLContext that
checks the certificate against that CA and PGHOST against its names; the run is shorter
(10 rounds), and a plain connection must be refused with SQLSTATE 28000 first. With
PGMUX_DRIVER_TLS_DIRECT=1 as well, one connection uses the direct TLS handshake
(direct_tls=True, ALPN postgresql) of PostgreSQL 17.
Exits 0 when every result was right, 1 otherwise.
"""

import asyncio
import os
import ssl
import sys

import asyncpg

TLS_CA = os.environ.get("PGMUX_DRIVER_TLS_CA")
TLS_DIRECT = bool(os.environ.get("PGMUX_DRIVER_TLS_DIRECT"))
CLIENTS = 20
ROUNDS = 10 if TLS_CA else 30
TABLE = "drivers_asyncpg"
INSERT = f"INSERT INTO {TABLE} (client, round, k) VALUES ($1, $2, $3)"
COUNT = f"SELECT count(*) FROM {TABLE} WHERE client = $1 AND round = $2"


class Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def tls_context():
    """Verifies the server's chain against TLS_CA and its names against the host."""
    context = ssl.create_default_context(cafile=TLS_CA)
    check(context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname, "context verifies")
    # For the direct handshake, which must name the protocol; harmless after SSLRequest.
    context.set_alpn_protocols(["postgresql"])
    return context


async def connect(**kwargs):
    if TLS_CA:
        kwargs.setdefault("ssl", tls_context())
    return await asyncpg.connect(timeout=30, command_timeout=60, **kwargs)


async def tls_checks():
    """Over TLS: a plain connection gets 28000; returns a line saying what was checked."""
    try:
        conn = await asyncpg.connect(timeout=30, ssl=False)
    except asyncpg.PostgresError as e:
        check(e.sqlstate == "28000", f"a plain connection got {e.sqlstate} {e}, expected 28000")
        refused = f"a plain connection refused with 28000 ({str(e).splitlines()[0]})"
    else:
        await conn.close()
        raise AssertionError("a plain connection was accepted")
    if not TLS_DIRECT:
        return refused
    conn = await connect(direct_tls=True)
    try:
        check(await conn.fetchval("SELECT $1::int + 1", 41) == 42, "query over direct TLS")
    finally:
        await conn.close()
    return f"{refused}; direct TLS handshake (ALPN postgresql) works"


async def client(i):
    """Runs client i's rounds; returns the backend pids its transactions ran on."""
    pids = set()
    conn = await connect()
    try:
        # Odd clients prepare in the other order, so that the names asyncpg picks stand for
        # different queries on different clients.
        if i % 2:
            mul = await conn.prepare("SELECT $1::int * $2::int")
            check(await conn.fetchval("SELECT $1::int + $2::int", 1, 2) == 3, "first add")
        else:
            check(await conn.fetchval("SELECT $1::int + $2::int", 1, 2) == 3, "first add")
            mul = await conn.prepare("SELECT $1::int * $2::int")

        for n in range(ROUNDS):
            got = await conn.fetchval("SELECT $1::int + $2::int", i, n)
            check(got == i + n, f"round {n}: {i} + {n} gave {got!r}")
            got = await mul.fetchval(i, n)
            check(got == i * n, f"round {n}: prepared {i} * {n} gave {got!r}")

            await conn.executemany(INSERT, [(i, n, k) for k in range(3)])

            async with conn.transaction():
                pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
                await conn.execute(INSERT, i, n, 3)
                got = await conn.fetchval(COUNT, i, n)
                check(got == 4, f"round {n}: {got!r} rows inside the transaction, expected 4")
                got = await mul.fetchval(n, 7)
                check(got == n * 7, f"round {n}: prepared {n} * 7 in a transaction gave {got!r}")

            if n % 10 == 9:
                try:
                    async with conn.transaction():
                        await conn.execute(INSERT, i, n, 99)
                        got = await conn.fetchval(COUNT, i, n)
                        check(got == 5, f"round {n}: {got!r} rows before rollback, expected 5")
                        raise Rollback()
                except Rollback:
                    pass
                got = await conn.fetchval(COUNT, i, n)
                check(got == 4, f"round {n}: {got!r} rows after rollback, expected 4")
    finally:
        await conn.close()
    return pids


async def main():
    tls = None
    if TLS_CA:
        try:
            tls = await tls_checks()
        except Exception as e:  # reported as the test's failure
            print(f"asyncpg: FAILED: TLS checks: {type(e).__name__}: {e}")
            return 1
    conn = await connect()
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.execute(f"CREATE TABLE {TABLE} (client int, round int, k int)")
    finally:
        await conn.close()

    results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), return_exceptions=True)
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    for i, error in failed[:5]:
        print(f"asyncpg: client {i}: {type(error).__name__}: {str(error).splitlines()[0]}")
    if failed:
        print(f"asyncpg: FAILED: {len(failed)} of {CLIENTS} clients (the first 5 shown)")
        return 1
    if os.environ.get("PGMUX_DRIVER_EXPECT_MOVES") and max(len(p) for p in results) < 2:
        print("asyncpg: FAILED: each client ran on one server connection only: nothing moved")
        return 1

    conn = await connect()
    try:
        rows = await conn.fetch(
            f"SELECT client, count(*) AS rows, sum(k) AS ks FROM {TABLE} GROUP BY client ORDER BY client"
        )
        await conn.execute(f"DROP TABLE {TABLE}")
    finally:
        await conn.close()
    expected = [(i, ROUNDS * 4, ROUNDS * (0 + 1 + 2 + 3)) for i in range(CLIENTS)]
    got = [(r["client"], r["rows"], r["ks"]) for r in rows]
    if got != expected:
        print(f"asyncpg: FAILED: rows per client (client, rows, sum of k) were {got}, expected {expected}")
        return 1
    print(
        f"asyncpg {asyncpg.__version__}: {CLIENTS} clients x {ROUNDS} rounds, all results right; "
        f"{len(set().union(*results))} server connections, up to {max(len(p) for p in results)} per client"
        + (f"; over TLS verified against the CA; {tls}" if tls else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
