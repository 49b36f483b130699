"""psycopg 3 through pgmux with prepare_threshold=0: every query is prepared server-side under
a name psycopg picks per connection (_pg3_0, _pg3_1, ...), from 20 threads at once, each with
its own connection, on a pool of 3 server connections. Also executemany (pipelined) and
transaction blocks, one of them rolled back.

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
With PGMUX_DRIVER_TLS_CA (a CA's PEM file), every connection uses sslmode=verify-full with
that CA as sslrootcert, to the host name localhost (at the address PGHOST), and
channel_binding=require (SCRAM-SHA-256-PLUS); the run is shorter (10 rounds), and a plain
connection must be refused first (libpq does not report the SQLSTATE of a failed login: its
message is checked). With PGMUX_DRIVER_TLS_DIRECT=1 as well, one connection uses
sslnegotiation=direct (PostgreSQL 17's direct TLS handshake).
Exits 0 when every result was right, 1 otherwise.
"""

import os
import sys
import threading

import psycopg

TLS_CA = os.environ.get("PGMUX_DRIVER_TLS_CA")
TLS_DIRECT = bool(os.environ.get("PGMUX_DRIVER_TLS_DIRECT"))
CLIENTS = 20
ROUNDS = 10 if TLS_CA else 30
TABLE = "drivers_psycopg"
ADD = "SELECT %s::int + %s::int"
TAG = "SELECT %s::text || ':' || %s::int"
INSERT = f"INSERT INTO {TABLE} (client, round, k) VALUES (%s, %s, %s)"
COUNT = f"SELECT count(*) FROM {TABLE} WHERE client = %s AND round = %s"


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def connect(**kwargs):
    if TLS_CA:
        kwargs = {
            "sslmode": "verify-full",
            "sslrootcert": TLS_CA,
            "channel_binding": "require",
            # The certificate's DNS name, checked by verify-full; the address to connect to.
            "host": "localhost",
            "hostaddr": os.environ["PGHOST"],
            **kwargs,
        }
    conn = psycopg.connect(prepare_threshold=0, autocommit=True, connect_timeout=30, **kwargs)
    if TLS_CA and kwargs["sslmode"] != "disable":
        check(conn.pgconn.ssl_in_use, "the connection is not encrypted")
    return conn


def tls_checks():
    """Over TLS: a plain connection is refused; returns a line saying what was checked."""
    try:
        connect(sslmode="disable", channel_binding="disable").close()
    except psycopg.OperationalError as e:
        message = str(e)
        # pgmux's client_tls = require, or PostgreSQL's pg_hba.conf with `hostnossl ... reject`.
        check(
            "TLS required" in message or "no encryption" in message,
            f"a plain connection was refused for another reason: {message}",
        )
        refused = "a plain connection refused (" + message[message.find("FATAL:") :].splitlines()[0] + ")"
    else:
        raise AssertionError("a plain connection was accepted")
    if not TLS_DIRECT:
        return refused
    with connect(sslnegotiation="direct") as conn:
        check(one(conn, "SELECT %s::int + 1", (41,)) == 42, "query over sslnegotiation=direct")
    return f"{refused}; sslnegotiation=direct works"


def one(conn, query, params):
    return conn.execute(query, params).fetchone()[0]


def client(i):
    """Runs client i's rounds; returns the backend pids its transactions ran on."""
    pids = set()
    with connect() as conn:
        # Odd clients run their queries in the other order first, so that the names psycopg
        # picks stand for different queries on different clients.
        first = [(ADD, (1, 2), 3), (TAG, ("x", 1), "x:1")]
        for query, params, expected in first if i % 2 == 0 else reversed(first):
            got = one(conn, query, params)
            check(got == expected, f"first {query!r} gave {got!r}")

        for n in range(ROUNDS):
            got = one(conn, ADD, (i, n))
            check(got == i + n, f"round {n}: {i} + {n} gave {got!r}")
            got = one(conn, TAG, (f"c{i}", n))
            check(got == f"c{i}:{n}", f"round {n}: tag gave {got!r}")

            with conn.cursor() as cur:
                cur.executemany(INSERT, [(i, n, k) for k in range(3)])

            with conn.transaction():
                pids.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
                conn.execute(INSERT, (i, n, 3))
                got = one(conn, COUNT, (i, n))
                check(got == 4, f"round {n}: {got!r} rows inside the transaction, expected 4")
                got = one(conn, ADD, (n, 100))
                check(got == n + 100, f"round {n}: {n} + 100 in a transaction gave {got!r}")

            if n % 10 == 9:
                with conn.transaction():
                    conn.execute(INSERT, (i, n, 99))
                    got = one(conn, COUNT, (i, n))
                    check(got == 5, f"round {n}: {got!r} rows before rollback, expected 5")
                    raise psycopg.Rollback()
                got = one(conn, COUNT, (i, n))
                check(got == 4, f"round {n}: {got!r} rows after rollback, expected 4")
    return pids


def main():
    tls = None
    if TLS_CA:
        try:
            tls = tls_checks()
        except Exception as e:  # reported as the test's failure
            print(f"psycopg: FAILED: TLS checks: {type(e).__name__}: {e}")
            return 1
    with connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (client int, round int, k int)")

    errors = {}
    pids = {}

    def run(i):
        try:
            pids[i] = client(i)
        except Exception as e:  # reported below, per client
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, error in sorted(errors.items())[:5]:
        print(f"psycopg: client {i}: {type(error).__name__}: {error}")
    if errors:
        print(f"psycopg: FAILED: {len(errors)} of {CLIENTS} clients (the first 5 shown)")
        return 1
    if os.environ.get("PGMUX_DRIVER_EXPECT_MOVES") and max(len(p) for p in pids.values()) < 2:
        print("psycopg: FAILED: each client ran on one server connection only: nothing moved")
        return 1

    with connect() as conn:
        got = conn.execute(
            f"SELECT client, count(*), sum(k) FROM {TABLE} GROUP BY client ORDER BY client"
        ).fetchall()
        conn.execute(f"DROP TABLE {TABLE}")
    expected = [(i, ROUNDS * 4, ROUNDS * (0 + 1 + 2 + 3)) for i in range(CLIENTS)]
    if got != expected:
        print(f"psycopg: FAILED: rows per client (client, rows, sum of k) were {got}, expected {expected}")
        return 1
    print(
        f"psycopg {psycopg.__version__}: {CLIENTS} clients x {ROUNDS} rounds, all results right; "
        f"{len(set().union(*pids.values()))} server connections, up to {max(len(p) for p in pids.values())} per client"
        + (f"; over TLS (verify-full, channel_binding=require): {tls}" if tls else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
