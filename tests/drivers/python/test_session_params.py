"""Session parameters through pgmux: client A sets application_name and TimeZone, client B
sets other values, and they run 50 transactions each, interleaved, on a pool of 2 server
connections (run it against a pool of size 2). Each must always see its own values, with
SHOW, current_setting(), a TimeZone-dependent result and the ParameterStatus the driver
was sent.

Every round one client opens a transaction and, while it holds its server connection, the
other runs a whole transaction on the second one, so both clients use both connections.
Midway both clients change their values; a SET rolled back with its transaction must leave
the old value.

psycopg is used with prepare_threshold=None (nothing prepared server-side) so that this
test is about session parameters only.

Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
Exits 0 when every result was right, 1 otherwise.
"""

import os
import sys

import psycopg

ROUNDS = 50

# What 2024-01-01 00:00 UTC looks like, as an hour, in each time zone used.
HOUR_OF_MIDNIGHT_UTC = {"UTC": "00", "Asia/Tokyo": "09", "America/New_York": "19", "Europe/Paris": "01"}


class Client:
    def __init__(self, name, app, tz):
        self.name = name
        self.conn = psycopg.connect(prepare_threshold=None, autocommit=True, connect_timeout=30)
        self.pids = set()  # the backends its transactions ran on
        self.set(app, tz)

    def set(self, app, tz):
        # Outside any transaction: each SET is a transaction of its own.
        self.conn.execute(f"SET application_name = '{app}'")
        self.conn.execute(f"SET TimeZone = '{tz}'")
        self.app, self.tz = app, tz

    def note_backend(self):
        self.pids.add(self.one("SELECT pg_backend_pid()"))

    def one(self, query):
        return self.conn.execute(query).fetchone()[0]

    def expect(self, what, got, expected):
        if got != expected:
            raise AssertionError(f"client {self.name}: {what} was {got!r}, expected {expected!r}")

    def check_app(self, where):
        self.expect(f"{where}: SHOW application_name", self.one("SHOW application_name"), self.app)
        self.expect(
            f"{where}: current_setting('application_name')",
            self.one("SELECT current_setting('application_name')"),
            self.app,
        )

    def check_tz(self, where):
        self.expect(f"{where}: SHOW TimeZone", self.one("SHOW TimeZone"), self.tz)
        self.expect(f"{where}: current_setting('TimeZone')", self.one("SELECT current_setting('TimeZone')"), self.tz)
        self.expect(
            f"{where}: the hour of 2024-01-01 00:00 UTC",
            self.one("SELECT to_char(timestamptz '2024-01-01 00:00:00+00', 'HH24')"),
            HOUR_OF_MIDNIGHT_UTC[self.tz],
        )

    def check_reported(self, where):
        info = self.conn.info
        self.expect(f"{where}: ParameterStatus application_name", info.parameter_status("application_name"), self.app)
        self.expect(f"{where}: ParameterStatus TimeZone", info.parameter_status("TimeZone"), self.tz)

    def transaction(self, where):
        with self.conn.transaction():
            self.note_backend()
            self.check_app(where)
            self.check_tz(where)


def round_trip(r, first, second):
    where = f"round {r}"
    with first.conn.transaction():
        first.note_backend()
        first.check_app(f"{where}, transaction holding a server")
        # `first` holds one server connection, so this runs on the other.
        second.transaction(f"{where}, transaction while {first.name} holds a server")
        first.check_tz(f"{where}, transaction holding a server")
    second.check_app(f"{where}, outside a transaction")
    first.check_tz(f"{where}, outside a transaction")
    first.check_reported(where)
    second.check_reported(where)


def main():
    a = Client("A", "alpha", "UTC")
    b = Client("B", "beta", "Asia/Tokyo")
    try:
        for r in range(ROUNDS):
            if r == ROUNDS // 2:
                a.set("alpha-2", "America/New_York")
                b.set("beta-2", "Europe/Paris")
            if r == ROUNDS // 2 + 5:
                # A SET inside a transaction that is rolled back is undone.
                with b.conn.transaction():
                    b.conn.execute("SET application_name = 'beta-rolled-back'")
                    b.conn.execute("SET TimeZone = 'UTC'")
                    b.expect("SET inside a transaction", b.one("SHOW application_name"), "beta-rolled-back")
                    raise psycopg.Rollback()
            first, second = (a, b) if r % 2 == 0 else (b, a)
            round_trip(r, first, second)
    except (AssertionError, psycopg.Error) as e:
        print(f"session parameters: FAILED: {type(e).__name__}: {e}")
        return 1
    finally:
        a.conn.close()
        b.conn.close()
    if os.environ.get("PGMUX_DRIVER_EXPECT_MOVES") and (len(a.pids) < 2 or len(b.pids) < 2):
        print(f"session parameters: FAILED: A ran on backends {a.pids} and B on {b.pids}: expected both to use both")
        return 1
    print(
        f"session parameters: 2 clients x {ROUNDS} interleaved transactions, each saw its own values; "
        f"{len(a.pids | b.pids)} server connections"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
