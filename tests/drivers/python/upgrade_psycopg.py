"""psycopg 3 as an upgrade worker (tests/drivers/upgrade; what it does: upgrade_common.py).

The prepared statements are psycopg's own `execute(..., prepare=True)` (named server
statements, _pg3_N), the transactions `conn.transaction()` blocks on an autocommit
connection, the backend pid `conn.info.backend_pid`, the cancel `conn.cancel_safe()` from
another thread while the main one waits for a pg_sleep(30).

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE; the
cancel check's watching connection uses PGMUX_DRIVER_UPGRADE_WATCH_DB (default
PGDATABASE). Exits 0 when every result was right, 1 otherwise.
"""

import os
import sys
import threading
import time

import psycopg

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

NAME = "psycopg"
APP = app_name(NAME)
TABLE = table(NAME)
INSERT = f"INSERT INTO {TABLE} (n) VALUES (%s)"
CHECK = (
    f"SELECT count(*), current_setting('application_name'), current_setting('statement_timeout')"
    f" FROM {TABLE} WHERE n <= %s"
)


def expect(conn, n, where):
    got = conn.execute(CHECK, (n,), prepare=True).fetchone()
    check(got == (n, APP, STATEMENT_TIMEOUT), f"{where}: CHECK({n}) gave {got}, expected {(n, APP, STATEMENT_TIMEOUT)}")


def cancel_check(conn):
    """The driver's cancel of a running pg_sleep(30) must end it with 57014."""
    watch_db = os.environ.get("PGMUX_DRIVER_UPGRADE_WATCH_DB") or os.environ["PGDATABASE"]
    watcher_failed = []
    done = threading.Event()

    def watch_and_cancel():
        try:
            with psycopg.connect(dbname=watch_db, autocommit=True, connect_timeout=30) as watcher:
                deadline = time.monotonic() + WAIT
                while watcher.execute(active_query_sql(NAME)).fetchone()[0] == 0:
                    check(not done.is_set(), "the pg_sleep ended before it was cancelled")
                    check(time.monotonic() < deadline, f"the pg_sleep did not start within {WAIT}s")
                    time.sleep(0.05)
            conn.cancel_safe()
        except Exception as e:  # reported by the main thread
            watcher_failed.append(e)

    thread = threading.Thread(target=watch_and_cancel)
    thread.start()
    try:
        conn.execute(f"SELECT pg_sleep(30) /* {marker(NAME)} */")
    except psycopg.Error as e:
        done.set()
        thread.join()
        check(not watcher_failed, f"cancelling: {watcher_failed}")
        check(e.sqlstate == "57014", f"the cancelled pg_sleep gave {e.sqlstate} {e}, expected 57014")
        return
    done.set()
    thread.join()
    raise AssertionError(f"the pg_sleep was not cancelled {watcher_failed}")


def main():
    progress = Progress(NAME)
    conn = psycopg.connect(autocommit=True, connect_timeout=30)
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(f"CREATE TABLE {TABLE} (n int)")
    conn.execute(f"SET application_name = '{APP}'")
    conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
    expect(conn, 0, "before the loop")
    pid = conn.info.backend_pid
    progress.write()

    while not progress.stopped():
        n = progress.transactions + 1
        try:
            with conn.transaction():
                conn.execute(INSERT, (n,), prepare=True)
                expect(conn, n, "in a transaction")
            progress.transactions = n
            expect(conn, n, "single statement")
        except Exception as e:  # counted: the test fails on any error
            progress.error(e)
            if conn.broken or conn.closed:
                print(f"{NAME}: FAILED: the connection broke: {progress.errors[-1]}")
                return 1
            if len(progress.errors) >= MAX_ERRORS:
                break
        progress.write()

    if progress.errors:
        return progress.report("")
    try:
        check(not (conn.broken or conn.closed), "the connection is closed")
        check(conn.info.backend_pid == pid, f"backend pid {conn.info.backend_pid}, was {pid}")
        expect(conn, progress.transactions, "at the end")
        check(conn.execute("SHOW application_name").fetchone()[0] == APP, "application_name lost")
        check(conn.execute("SHOW statement_timeout").fetchone()[0] == STATEMENT_TIMEOUT, "statement_timeout lost")
        reported = conn.info.parameter_status("application_name")
        check(reported == APP, f"the application_name last reported to psycopg is {reported!r}")
        cancel_check(conn)
        expect(conn, progress.transactions, "after the cancel")
        check(conn.info.backend_pid == pid, "backend pid changed by the cancel")
    except Exception as e:  # reported as the test's failure
        print(f"{NAME}: FAILED: end checks: {type(e).__name__}: {e}")
        return 1
    finally:
        conn.close()
    return progress.report(
        f"one connection, backend pid {pid} all along; application_name, statement_timeout and the "
        "prepared statements kept; a cancel after the upgrades gave 57014"
    )


if __name__ == "__main__":
    sys.exit(main())
