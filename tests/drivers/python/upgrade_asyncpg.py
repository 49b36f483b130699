"""asyncpg as an upgrade worker (tests/drivers/upgrade; what it does: upgrade_common.py).

The prepared statement is asyncpg's own `conn.prepare()` (a named server statement,
__asyncpg_stmt_N__), the transactions `conn.transaction()` blocks, the backend pid
`conn.get_server_pid()`. asyncpg has no public call that cancels and then shows the
57014: cancelling the task of a query sends the CancelRequest and swallows the answer.
So the cancel check sends it with the function asyncpg itself uses for that
(connect_utils._cancel) and the key the connection holds, and the running query must
raise QueryCanceledError.

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE; the
cancel check's watching connection uses PGMUX_DRIVER_UPGRADE_WATCH_DB (default
PGDATABASE). Exits 0 when every result was right, 1 otherwise.
"""

import asyncio
import os
import sys

import asyncpg
from asyncpg import connect_utils

from upgrade_common import (
    MAX_ERRORS,
    STATEMENT_TIMEOUT,
    WAIT,
    Progress,
    active_query_sql,
    app_name,
    check,
    marker,
    table,
)

NAME = "asyncpg"
APP = app_name(NAME)
TABLE = table(NAME)
INSERT = f"INSERT INTO {TABLE} (n) VALUES ($1)"
CHECK = (
    f"SELECT count(*), current_setting('application_name'), current_setting('statement_timeout')"
    f" FROM {TABLE} WHERE n <= $1"
)


def expect(row, n, where):
    got = (row[0], row[1], row[2])
    check(got == (n, APP, STATEMENT_TIMEOUT), f"{where}: CHECK({n}) gave {got}, expected {(n, APP, STATEMENT_TIMEOUT)}")


async def cancel_check(conn):
    """The driver's cancel of a running pg_sleep(30) must end it with 57014."""
    sleeping = asyncio.create_task(conn.fetchval(f"SELECT pg_sleep(30) /* {marker(NAME)} */"))
    watch_db = os.environ.get("PGMUX_DRIVER_UPGRADE_WATCH_DB") or os.environ["PGDATABASE"]
    watcher = await asyncpg.connect(database=watch_db, timeout=30)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while await watcher.fetchval(active_query_sql(NAME)) == 0:
            check(not sleeping.done(), "the pg_sleep ended before it was cancelled")
            check(loop.time() < deadline, f"the pg_sleep did not start within {WAIT}s")
            await asyncio.sleep(0.05)
    finally:
        await watcher.close()
    await connect_utils._cancel(
        loop=loop,
        addr=conn._addr,
        params=conn._params,
        backend_pid=conn.get_server_pid(),
        backend_secret=conn._protocol.backend_secret,
    )
    try:
        await sleeping
    except asyncpg.PostgresError as e:
        check(e.sqlstate == "57014", f"the cancelled pg_sleep gave {e.sqlstate} {e}, expected 57014")
        return
    raise AssertionError("the pg_sleep was not cancelled")


async def main():
    progress = Progress(NAME)
    conn = await asyncpg.connect(timeout=30, command_timeout=60)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (n int)")
    await conn.execute(f"SET application_name = '{APP}'")
    await conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
    check_stmt = await conn.prepare(CHECK)
    pid = conn.get_server_pid()
    progress.write()

    while not progress.stopped():
        n = progress.transactions + 1
        try:
            async with conn.transaction():
                await conn.execute(INSERT, n)
                expect(await check_stmt.fetchrow(n), n, "in a transaction")
            progress.transactions = n
            expect(await check_stmt.fetchrow(n), n, "single statement")
        except Exception as e:  # counted: the test fails on any error
            progress.error(e)
            if conn.is_closed():
                print(f"{NAME}: FAILED: the connection broke: {progress.errors[-1]}")
                return 1
            if len(progress.errors) >= MAX_ERRORS:
                break
        progress.write()

    if progress.errors:
        return progress.report("")
    try:
        check(not conn.is_closed(), "the connection is closed")
        check(conn.get_server_pid() == pid, f"backend pid {conn.get_server_pid()}, was {pid}")
        expect(await check_stmt.fetchrow(progress.transactions), progress.transactions, "at the end")
        check(await conn.fetchval("SHOW application_name") == APP, "application_name lost")
        check(await conn.fetchval("SHOW statement_timeout") == STATEMENT_TIMEOUT, "statement_timeout lost")
        reported = conn.get_settings().application_name
        check(reported == APP, f"the application_name last reported to asyncpg is {reported!r}")
        await cancel_check(conn)
        expect(await check_stmt.fetchrow(progress.transactions), progress.transactions, "after the cancel")
        check(conn.get_server_pid() == pid, "backend pid changed by the cancel")
    except Exception as e:  # reported as the test's failure
        print(f"{NAME}: FAILED: end checks: {type(e).__name__}: {e}")
        return 1
    finally:
        await conn.close()
    return progress.report(
        f"one connection, backend pid {pid} all along; application_name, statement_timeout and the "
        "prepared statement kept; a cancel after the upgrades gave 57014"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
