// pgjdbc through pgmux with prepareThreshold=1: every PreparedStatement becomes a named
// server statement (S_1, S_2, ... per connection) on its first use. 20 threads, each with its
// own connection, on a pool of 3 server connections; each reuses its PreparedStatements 30
// times with autocommit on, plus explicit transactions, one of them rolled back.
//
// Odd threads prepare their statements in the other order, so the names pgjdbc picks stand
// for different queries on different connections.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
// With PGMUX_DRIVER_TLS_CA (a CA's PEM file), every connection uses pgjdbc's own TLS
// (LibPQFactory) with sslmode=verify-full and that file as sslrootcert (the chain and the
// address PGHOST checked against the certificate); the run is shorter (10 rounds), and a
// plain connection (sslmode=disable) must be refused with SQLSTATE 28000 first.
// Exits 0 when every result was right, 1 otherwise.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentSkipListMap;

public class PgjdbcTest {
    static final String TLS_CA = System.getenv("PGMUX_DRIVER_TLS_CA");
    static final boolean TLS = TLS_CA != null && !TLS_CA.isEmpty();
    static final int CLIENTS = 20;
    static final int ROUNDS = TLS ? 10 : 30;
    static final String TABLE = "drivers_pgjdbc";

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null || value.isEmpty()) {
            throw new IllegalStateException(name + " is not set");
        }
        return value;
    }

    static Connection connect() throws SQLException {
        return connect(TLS);
    }

    static Connection connect(boolean tls) throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST") + ":" + env("PGPORT") + "/" + env("PGDATABASE")
                + "?prepareThreshold=1&connectTimeout=30&socketTimeout=60";
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER"));
        props.setProperty("password", env("PGPASSWORD"));
        if (tls) {
            props.setProperty("sslmode", "verify-full");
            props.setProperty("sslrootcert", TLS_CA);
        } else {
            props.setProperty("sslmode", "disable");
        }
        return DriverManager.getConnection(url, props);
    }

    /** Over TLS: a plain connection gets 28000; returns a line saying what was checked. */
    static String tlsChecks() {
        try (Connection conn = connect(false)) {
            throw new AssertionError("a plain connection was accepted");
        } catch (SQLException e) {
            check("28000".equals(e.getSQLState()),
                    "a plain connection got " + e.getSQLState() + " " + e.getMessage() + ", expected 28000");
            return "a plain connection refused with 28000 (" + e.getMessage().lines().findFirst().orElse("") + ")";
        }
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    static long one(PreparedStatement ps, Object... params) throws SQLException {
        for (int p = 0; p < params.length; p++) {
            ps.setObject(p + 1, params[p]);
        }
        try (ResultSet rs = ps.executeQuery()) {
            check(rs.next(), "no row from " + ps);
            long value = rs.getLong(1);
            check(!rs.next(), "more than one row from " + ps);
            return value;
        }
    }

    /** Runs client i's rounds; returns the backend pids its transactions ran on. */
    static Set<Long> runClient(int i) throws SQLException {
        Set<Long> pids = new HashSet<>();
        try (Connection conn = connect()) {
            check(conn.getAutoCommit(), "autocommit is on");
            PreparedStatement add;
            PreparedStatement mul;
            if (i % 2 == 0) {
                add = conn.prepareStatement("SELECT ?::int + ?::int");
                check(one(add, 1, 2) == 3, "first add");
                mul = conn.prepareStatement("SELECT ?::int * ?::int");
                check(one(mul, 2, 3) == 6, "first mul");
            } else {
                mul = conn.prepareStatement("SELECT ?::int * ?::int");
                check(one(mul, 2, 3) == 6, "first mul");
                add = conn.prepareStatement("SELECT ?::int + ?::int");
                check(one(add, 1, 2) == 3, "first add");
            }
            PreparedStatement insert = conn.prepareStatement(
                    "INSERT INTO " + TABLE + " (client, round, k) VALUES (?, ?, ?)");
            PreparedStatement count = conn.prepareStatement(
                    "SELECT count(*) FROM " + TABLE + " WHERE client = ? AND round = ?");
            PreparedStatement pid = conn.prepareStatement("SELECT pg_backend_pid()");

            for (int n = 0; n < ROUNDS; n++) {
                long got = one(add, i, n);
                check(got == i + n, "round " + n + ": " + i + " + " + n + " gave " + got);
                got = one(mul, i, n);
                check(got == (long) i * n, "round " + n + ": " + i + " * " + n + " gave " + got);

                if (n % 5 == 4) {
                    conn.setAutoCommit(false);
                    pids.add(one(pid));
                    for (int k = 0; k < 2; k++) {
                        insert.setInt(1, i);
                        insert.setInt(2, n);
                        insert.setInt(3, k);
                        check(insert.executeUpdate() == 1, "round " + n + ": insert");
                    }
                    got = one(count, i, n);
                    check(got == 2, "round " + n + ": " + got + " rows inside the transaction, expected 2");
                    conn.commit();

                    insert.setInt(1, i);
                    insert.setInt(2, n);
                    insert.setInt(3, 99);
                    insert.executeUpdate();
                    got = one(count, i, n);
                    check(got == 3, "round " + n + ": " + got + " rows before rollback, expected 3");
                    conn.rollback();
                    conn.setAutoCommit(true);
                    got = one(count, i, n);
                    check(got == 2, "round " + n + ": " + got + " rows after rollback, expected 2");
                }
            }
        }
        return pids;
    }

    public static void main(String[] args) throws Exception {
        String tls = null;
        if (TLS) {
            try {
                tls = tlsChecks();
            } catch (Throwable e) {
                System.out.println("pgjdbc: FAILED: TLS checks: " + e);
                System.exit(1);
            }
        }
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            st.execute("DROP TABLE IF EXISTS " + TABLE);
            st.execute("CREATE TABLE " + TABLE + " (client int, round int, k int)");
        }

        ConcurrentSkipListMap<Integer, Throwable> errors = new ConcurrentSkipListMap<>();
        Map<Integer, Set<Long>> pids = new ConcurrentHashMap<>();
        List<Thread> threads = new ArrayList<>();
        for (int i = 0; i < CLIENTS; i++) {
            final int client = i;
            Thread t = new Thread(() -> {
                try {
                    pids.put(client, runClient(client));
                } catch (Throwable e) {
                    errors.put(client, e);
                }
            });
            t.start();
            threads.add(t);
        }
        for (Thread t : threads) {
            t.join();
        }
        errors.entrySet().stream().limit(5).forEach(
                e -> System.out.println("pgjdbc: client " + e.getKey() + ": " + e.getValue()));
        if (!errors.isEmpty()) {
            System.out.println("pgjdbc: FAILED: " + errors.size() + " of " + CLIENTS + " clients (the first 5 shown)");
            System.exit(1);
        }
        int mostPerClient = pids.values().stream().mapToInt(Set::size).max().orElse(0);
        if (System.getenv("PGMUX_DRIVER_EXPECT_MOVES") != null && mostPerClient < 2) {
            System.out.println("pgjdbc: FAILED: each client ran on one server connection only: nothing moved");
            System.exit(1);
        }

        StringBuilder got = new StringBuilder();
        StringBuilder expected = new StringBuilder();
        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            try (ResultSet rs = st.executeQuery("SELECT client, count(*), sum(k) FROM " + TABLE
                    + " GROUP BY client ORDER BY client")) {
                while (rs.next()) {
                    got.append("(" + rs.getInt(1) + ", " + rs.getLong(2) + ", " + rs.getLong(3) + ") ");
                }
            }
            st.execute("DROP TABLE " + TABLE);
        }
        int transactions = ROUNDS / 5;
        for (int i = 0; i < CLIENTS; i++) {
            expected.append("(" + i + ", " + transactions * 2 + ", " + transactions + ") ");
        }
        if (!got.toString().equals(expected.toString())) {
            System.out.println("pgjdbc: FAILED: rows per client (client, rows, sum of k) were " + got
                    + "expected " + expected);
            System.exit(1);
        }
        String version = DriverManager.getDriver("jdbc:postgresql:").getMajorVersion() + "."
                + DriverManager.getDriver("jdbc:postgresql:").getMinorVersion();
        Set<Long> servers = new HashSet<>();
        pids.values().forEach(servers::addAll);
        System.out.println("pgjdbc " + version + ": " + CLIENTS + " clients x " + ROUNDS
                + " rounds, all results right; " + servers.size() + " server connections, up to "
                + mostPerClient + " per client"
                + (tls != null ? "; over TLS (verify-full, sslrootcert in PEM): " + tls : ""));
    }
}
