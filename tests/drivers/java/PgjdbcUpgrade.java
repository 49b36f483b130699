// pgjdbc as an upgrade worker (tests/drivers/upgrade; what it does:
// python/upgrade_common.py). ONE Connection all along, with prepareThreshold=1: its two
// PreparedStatements are named server statements (S_1, S_2) from their first use. The
// transactions are setAutoCommit(false) ... commit(), the single statements run with
// autocommit on, the backend pid is PGConnection.getBackendPID(), the cancel
// Statement.cancel() from another thread while a pg_sleep(30) runs.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE; the
// cancel check's watching connection uses PGMUX_DRIVER_UPGRADE_WATCH_DB (default
// PGDATABASE); progress goes to PGMUX_DRIVER_UPGRADE_DIR/pgjdbc.progress, and the loop
// stops when PGMUX_DRIVER_UPGRADE_DIR/stop exists.
// Exits 0 when every result was right, 1 otherwise.

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicReference;

import org.postgresql.PGConnection;

public class PgjdbcUpgrade {
    static final String NAME = "pgjdbc";
    static final String APP = "drvupg_" + NAME;
    static final String STATEMENT_TIMEOUT = "41s";
    static final String TABLE = "drivers_upgrade_" + NAME;
    static final String MARKER = "drvupg cancel " + NAME;
    static final long WAIT_MS = 20000;
    static final int MAX_ERRORS = 20;

    static int transactions = 0;
    static final List<String> errors = new ArrayList<>();
    static Path progress;
    static Path stop;

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null || value.isEmpty()) {
            throw new IllegalStateException(name + " is not set");
        }
        return value;
    }

    static Connection connect(String database) throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST") + ":" + env("PGPORT") + "/" + database
                + "?prepareThreshold=1&connectTimeout=30&socketTimeout=60&sslmode=disable";
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER"));
        props.setProperty("password", env("PGPASSWORD"));
        return DriverManager.getConnection(url, props);
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    static void writeProgress() throws Exception {
        Path tmp = progress.resolveSibling(progress.getFileName() + ".tmp");
        Files.writeString(tmp, transactions + " " + errors.size() + "\n");
        Files.move(tmp, progress, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
    }

    static void expect(PreparedStatement checkStmt, int n, String where) throws SQLException {
        checkStmt.setInt(1, n);
        try (ResultSet rs = checkStmt.executeQuery()) {
            check(rs.next(), where + ": CHECK gave no row");
            String got = rs.getInt(1) + ", " + rs.getString(2) + ", " + rs.getString(3);
            String want = n + ", " + APP + ", " + STATEMENT_TIMEOUT;
            check(got.equals(want), where + ": CHECK(" + n + ") gave " + got + ", expected " + want);
        }
    }

    static String show(Connection conn, String setting) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SHOW " + setting)) {
            rs.next();
            return rs.getString(1);
        }
    }

    /** The driver's cancel of a running pg_sleep(30) must end it with 57014. */
    static void cancelCheck(Connection conn) throws Exception {
        String watchDb = System.getenv("PGMUX_DRIVER_UPGRADE_WATCH_DB");
        if (watchDb == null || watchDb.isEmpty()) {
            watchDb = env("PGDATABASE");
        }
        AtomicReference<Throwable> outcome = new AtomicReference<>();
        try (Statement sleeping = conn.createStatement()) {
            Thread runner = new Thread(() -> {
                try (ResultSet rs = sleeping.executeQuery("SELECT pg_sleep(30) /* " + MARKER + " */")) {
                    outcome.set(new AssertionError("the pg_sleep was not cancelled"));
                } catch (Throwable e) {
                    outcome.set(e);
                }
            });
            runner.start();
            try (Connection watcher = connect(watchDb);
                    Statement st = watcher.createStatement()) {
                long deadline = System.currentTimeMillis() + WAIT_MS;
                for (;;) {
                    try (ResultSet rs = st.executeQuery("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                            + "AND query LIKE '%" + MARKER + "%' AND query NOT LIKE '%pg_stat_activity%'")) {
                        rs.next();
                        if (rs.getInt(1) > 0) {
                            break;
                        }
                    }
                    check(runner.isAlive(), "the pg_sleep ended before it was cancelled: " + outcome.get());
                    check(System.currentTimeMillis() < deadline, "the pg_sleep did not start within " + WAIT_MS + " ms");
                    Thread.sleep(50);
                }
            }
            sleeping.cancel();
            runner.join();
        }
        Throwable e = outcome.get();
        check(e instanceof SQLException, "the cancelled pg_sleep gave " + e);
        String state = ((SQLException) e).getSQLState();
        check("57014".equals(state), "the cancelled pg_sleep gave " + state + " " + e.getMessage() + ", expected 57014");
    }

    static int run() throws Exception {
        String dir = env("PGMUX_DRIVER_UPGRADE_DIR");
        progress = Path.of(dir, NAME + ".progress");
        stop = Path.of(dir, "stop");
        Connection conn = connect(env("PGDATABASE"));
        try (Statement st = conn.createStatement()) {
            st.execute("DROP TABLE IF EXISTS " + TABLE);
            st.execute("CREATE TABLE " + TABLE + " (n int)");
            st.execute("SET application_name = '" + APP + "'");
            st.execute("SET statement_timeout = '" + STATEMENT_TIMEOUT + "'");
        }
        PreparedStatement insert = conn.prepareStatement("INSERT INTO " + TABLE + " (n) VALUES (?)");
        PreparedStatement checkStmt = conn.prepareStatement("SELECT count(*), current_setting('application_name'), "
                + "current_setting('statement_timeout') FROM " + TABLE + " WHERE n <= ?");
        expect(checkStmt, 0, "before the loop");
        int pid = conn.unwrap(PGConnection.class).getBackendPID();
        writeProgress();

        while (!Files.exists(stop)) {
            int n = transactions + 1;
            try {
                conn.setAutoCommit(false);
                insert.setInt(1, n);
                check(insert.executeUpdate() == 1, "INSERT did not insert one row");
                expect(checkStmt, n, "in a transaction");
                conn.commit();
                transactions = n;
                conn.setAutoCommit(true);
                expect(checkStmt, n, "single statement");
            } catch (Exception e) {
                errors.add(e.getClass().getSimpleName() + ": " + e.getMessage());
                writeProgress();
                if (conn.isClosed()) {
                    System.out.println(NAME + ": FAILED: the connection broke: " + errors.get(errors.size() - 1));
                    return 1;
                }
                try {
                    if (!conn.getAutoCommit()) {
                        conn.rollback();
                    }
                    conn.setAutoCommit(true);
                } catch (SQLException r) {
                    errors.add("rollback: " + r.getMessage());
                }
                if (errors.size() >= MAX_ERRORS) {
                    break;
                }
            }
            writeProgress();
        }

        if (!errors.isEmpty()) {
            for (String e : errors.subList(0, Math.min(5, errors.size()))) {
                System.out.println(NAME + ": error: " + e);
            }
            System.out.println(NAME + ": FAILED: " + errors.size() + " errors in " + transactions
                    + " transactions (the first 5 shown)");
            return 1;
        }
        try {
            check(transactions > 0, "no transaction committed");
            check(!conn.isClosed(), "the connection is closed");
            int now = conn.unwrap(PGConnection.class).getBackendPID();
            check(now == pid, "backend pid " + now + ", was " + pid);
            expect(checkStmt, transactions, "at the end");
            check(APP.equals(show(conn, "application_name")), "application_name lost");
            check(STATEMENT_TIMEOUT.equals(show(conn, "statement_timeout")), "statement_timeout lost");
            String reported = conn.unwrap(PGConnection.class).getParameterStatus("application_name");
            check(APP.equals(reported), "the application_name last reported to pgjdbc is " + reported);
            cancelCheck(conn);
            expect(checkStmt, transactions, "after the cancel");
            check(conn.unwrap(PGConnection.class).getBackendPID() == pid, "backend pid changed by the cancel");
        } catch (Throwable e) {
            System.out.println(NAME + ": FAILED: end checks: " + e);
            return 1;
        } finally {
            conn.close();
        }
        System.out.println(NAME + ": " + transactions + " transactions, 0 errors, 0 reconnects; one connection, "
                + "backend pid " + pid + " all along; application_name, statement_timeout and the prepared "
                + "statements kept; a cancel after the upgrades gave 57014");
        return 0;
    }

    public static void main(String[] args) throws Exception {
        int status;
        try {
            status = run();
        } catch (Throwable e) {
            System.out.println(NAME + ": FAILED: " + e);
            status = 1;
        }
        System.exit(status);
    }
}
