"""What the upgrade workers share (tests/drivers/upgrade runs them, one per driver, while it
upgrades pgmux three times): the statements, the session settings, the progress file and
the stop file.

Each worker holds ONE connection for its whole run. It sets APP_NAME and STATEMENT_TIMEOUT
with plain SETs, prepares CHECK the driver's own way, notes the backend pid the driver was
given (pgmux's cancel key), then loops until DIR/stop exists: a transaction (BEGIN; INSERT
row n; CHECK, which must count n rows and show both settings; COMMIT), then CHECK again as
a single statement. After each loop it writes "TRANSACTIONS ERRORS" to DIR/NAME.progress
(through a rename), which the script reads. Any exception is an error; a broken connection
ends the worker at once. At the end it checks that the connection, the settings, the
prepared statement and the backend pid are the ones it started with, and that the driver's
cancel of a pg_sleep(30) gives 57014.
"""

import os

STATEMENT_TIMEOUT = "41s"
# How long the cancel check waits for its pg_sleep to show up in pg_stat_activity.
WAIT = 20.0
# A worker fails at once if it sees this many errors (the rest would say the same).
MAX_ERRORS = 20


def app_name(name):
    return f"drvupg_{name}"


def table(name):
    return f"drivers_upgrade_{name}"


def marker(name):
    """The comment that marks the query the cancel check cancels."""
    return f"drvupg cancel {name}"


def active_query_sql(name):
    """Counts the running pg_sleep of the cancel check (not this query itself)."""
    return (
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        f"AND query LIKE '%{marker(name)}%' AND query NOT LIKE '%pg_stat_activity%'"
    )


def check(ok, what):
    if not ok:
        raise AssertionError(what)


class Progress:
    """DIR/NAME.progress, "TRANSACTIONS ERRORS", and the stop file DIR/stop."""

    def __init__(self, name):
        self.name = name
        self.dir = os.environ["PGMUX_DRIVER_UPGRADE_DIR"]
        self.path = os.path.join(self.dir, f"{name}.progress")
        self.stop_path = os.path.join(self.dir, "stop")
        self.transactions = 0
        self.errors = []

    def write(self):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.transactions} {len(self.errors)}\n")
        os.replace(tmp, self.path)

    def stopped(self):
        return os.path.exists(self.stop_path)

    def error(self, e):
        self.errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        self.write()

    def report(self, extra):
        """Prints the worker's result line and returns its exit status."""
        for e in self.errors[:5]:
            print(f"{self.name}: error: {e}")
        if not self.transactions:
            print(f"{self.name}: FAILED: no transaction committed")
            return 1
        if self.errors:
            print(
                f"{self.name}: FAILED: {len(self.errors)} errors in {self.transactions} transactions"
                " (the first 5 shown)"
            )
            return 1
        print(f"{self.name}: {self.transactions} transactions, 0 errors, 0 reconnects; {extra}")
        return 0
