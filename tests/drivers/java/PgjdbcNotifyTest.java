// LISTEN/NOTIFY with pgjdbc through pgmux: PGConnection.getNotifications(timeout) on 10
// connections (a pool of 2 in transaction mode), LISTEN then UNLISTEN.
//
// Checks, as the Python tests' notify_common.py: 50 notifications from one transaction
// arrive in order, with payloads of 0 to 7999 bytes intact, on every listener; each carries
// the process id that pg_backend_pid() gave in the sender's transaction (through pgmux in
// transaction mode, not the sender's BackendKeyData pid, PGConnection.getBackendPID()); a
// listener receives its own NOTIFY; after UNLISTEN nothing arrives on that channel (the next
// notification is one sent after it, on a channel the connection still listens to).
//
// pgjdbc sends every statement, LISTEN and UNLISTEN included, with the extended protocol
// (Parse, Bind, Describe, Execute, Sync), never as a simple Query.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
// Exits 0 when every result was right, 1 otherwise.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public class PgjdbcNotifyTest {
    static final int LISTENERS = 10;
    static final int BURST = 50;
    static final int MAX_PAYLOAD = 7999;
    static final long WAIT_MS = 30000;
    static final boolean EXPECT_MOVES = System.getenv("PGMUX_DRIVER_EXPECT_MOVES") != null;
    static final String JOBS = "pgjdbc_jobs";
    static final String MARKER = "pgjdbc_marker";
    static final String ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

    /** A notification: channel, payload, sender's process id. */
    record Note(String channel, String payload, int pid) {
        @Override
        public String toString() {
            String shown = payload.length() > 40
                    ? payload.substring(0, 20) + "...(" + payload.length() + " bytes)" : payload;
            return "(" + channel + ", " + shown + ", " + pid + ")";
        }
    }

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null || value.isEmpty()) {
            throw new IllegalStateException(name + " is not set");
        }
        return value;
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST") + ":" + env("PGPORT") + "/" + env("PGDATABASE")
                + "?connectTimeout=30&socketTimeout=60&sslmode=disable";
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

    /** The payload of the burst's notification i: from 0 bytes (i = 0) to 7999 (the last). */
    static String payload(int i) {
        int length = i * MAX_PAYLOAD / (BURST - 1);
        StringBuilder text = new StringBuilder(length);
        for (int k = 0; k < length; k++) {
            text.append(ALPHABET.charAt((i * 31 + k * 7) % ALPHABET.length()));
        }
        return text.toString();
    }

    /** The next `count` notifications of conn; fewer if they do not come within WAIT_MS. */
    static List<Note> receive(Connection conn, int count) throws SQLException {
        List<Note> got = new ArrayList<>();
        long deadline = System.currentTimeMillis() + WAIT_MS;
        PGConnection pg = conn.unwrap(PGConnection.class);
        while (got.size() < count) {
            long left = deadline - System.currentTimeMillis();
            if (left <= 0) {
                break;
            }
            PGNotification[] notes = pg.getNotifications((int) left);
            if (notes != null) {
                for (PGNotification n : notes) {
                    got.add(new Note(n.getName(), n.getParameter(), n.getPID()));
                }
            }
        }
        return got;
    }

    static void expectSequence(String who, List<Note> got, List<Note> expected) {
        for (int k = 0; k < Math.min(got.size(), expected.size()); k++) {
            check(Objects.equals(got.get(k), expected.get(k)),
                    who + ": notification " + k + " was " + got.get(k) + ", expected " + expected.get(k));
        }
        check(got.size() == expected.size(), who + ": " + got.size() + " notifications, expected "
                + expected.size() + (got.size() < expected.size() ? "; the first missing: " + expected.get(got.size()) : ""));
    }

    static void checkSenderPid(String who, int notifiedPid, int keyPid) {
        if (EXPECT_MOVES) {
            check(notifiedPid != keyPid, who + ": the sender's server pid " + notifiedPid
                    + " equals its BackendKeyData pid");
        } else {
            check(notifiedPid == keyPid, who + ": the sender's server pid " + notifiedPid
                    + " is not its BackendKeyData pid " + keyPid);
        }
    }

    static int backendPid(Connection conn) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT pg_backend_pid()")) {
            check(rs.next(), "a row from pg_backend_pid()");
            return rs.getInt(1);
        }
    }

    /** Sends (channel, payload) pairs in one transaction; returns its pg_backend_pid(). */
    static int send(Connection sender, List<String[]> notes) throws SQLException {
        sender.setAutoCommit(false);
        int pid = backendPid(sender);
        try (PreparedStatement ps = sender.prepareStatement("SELECT pg_notify(?, ?)")) {
            for (String[] note : notes) {
                ps.setString(1, note[0]);
                ps.setString(2, note[1]);
                ps.executeQuery().close();
            }
        }
        sender.commit();
        sender.setAutoCommit(true);
        return pid;
    }

    static void execute(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute(sql);
        }
    }

    static String run() throws SQLException {
        List<Connection> listeners = new ArrayList<>();
        for (int i = 0; i < LISTENERS; i++) {
            listeners.add(connect());
        }
        for (Connection conn : listeners) {
            execute(conn, "LISTEN " + JOBS);
        }
        execute(listeners.get(1), "LISTEN " + MARKER);

        Connection sender = connect();
        List<String[]> burst = new ArrayList<>();
        List<Note> expected = new ArrayList<>();
        for (int i = 0; i < BURST; i++) {
            burst.add(new String[] {JOBS, payload(i)});
        }
        int pid = send(sender, burst);
        checkSenderPid("sender", pid, sender.unwrap(PGConnection.class).getBackendPID());

        // Self-notification: listener 0's own NOTIFY, in a transaction, comes back to it.
        Connection first = listeners.get(0);
        first.setAutoCommit(false);
        int own = backendPid(first);
        execute(first, "NOTIFY " + JOBS + ", 'self'");
        first.commit();
        first.setAutoCommit(true);
        checkSenderPid("listener 0", own, first.unwrap(PGConnection.class).getBackendPID());

        for (String[] note : burst) {
            expected.add(new Note(JOBS, note[1], pid));
        }
        expected.add(new Note(JOBS, "self", own));
        for (int i = 0; i < LISTENERS; i++) {
            expectSequence("listener " + i, receive(listeners.get(i), expected.size()), expected);
        }

        execute(listeners.get(1), "UNLISTEN " + JOBS);
        int last = send(sender, List.of(new String[] {JOBS, "after unlisten"}, new String[] {MARKER, "end"}));
        for (int i = 0; i < LISTENERS; i++) {
            if (i == 1) {
                expectSequence("listener 1 after UNLISTEN (sent by the extended protocol)",
                        receive(listeners.get(1), 1), List.of(new Note(MARKER, "end", last)));
            } else {
                expectSequence("listener " + i, receive(listeners.get(i), 1),
                        List.of(new Note(JOBS, "after unlisten", last)));
            }
        }

        for (Connection conn : listeners) {
            conn.close();
        }
        sender.close();
        String version = DriverManager.getDriver("jdbc:postgresql:").getMajorVersion() + "."
                + DriverManager.getDriver("jdbc:postgresql:").getMinorVersion();
        return "pgjdbc " + version + ": " + LISTENERS + " listeners got " + BURST + " notifications (0 to "
                + MAX_PAYLOAD + " bytes) in order with the sender's server pid, and their own; nothing after UNLISTEN";
    }

    public static void main(String[] args) throws Exception {
        try {
            System.out.println(run());
        } catch (AssertionError e) {
            System.out.println("pgjdbc_notify: FAILED: " + e.getMessage());
            System.exit(1);
        }
    }
}
