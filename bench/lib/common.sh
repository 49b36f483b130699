# shellcheck shell=bash disable=SC2034,SC2154 # globals set by, and for, the scripts that source it
# What bench/run and bench/instructions share: the same throwaway PostgreSQL, the same
# PgBouncer and pgmux configurations (one SCRAM auth file for both), the same way of
# starting and stopping them. Sourced after scripts/pg-harness, from the repository root.
#
# The caller sets, before using what needs them:
#   bench_tag                    the prefix of messages ("bench")
#   work                         the work dir; pg_dir, where PostgreSQL lives ($work/pg)
#   db db_user db_password       the database and its role
#   pool_size max_clients        the poolers' pool and client limits
#   upstream                     how the poolers reach PostgreSQL: tcp or unix
#   pg_ssl                       true: PostgreSQL gets ssl = on (bench_make_certs first); false
#   bench_tls                    the poolers' TLS: plain (none), client (clients to the pooler),
#                                both (also the pooler to PostgreSQL); plain when unset
#   bench_auth                   the poolers' client login: scram-sha-256 (when unset), md5
#                                or trust (then the caller writes $userlist with the password)
# and gets:
#   say note die has stop_pid
#   bench_tools                  psql_bin pgbench_bin pg_version (installing PostgreSQL if root)
#   bench_find_pgbouncer HINT    pgbouncer_bin pgbouncer_version pgbouncer_prepared
#   bench_build_pgmux            mux_bin: $PGMUX_BIN, else `cargo build --release`'s
#   bench_commit                 prints pgmux's commit (+changes when src/ is modified)
#   bench_make_certs             tls_dir, tls_ca, tls_cert, tls_key, tls_key_kind (openssl CLI)
#   bench_start_postgres SCALE   pg_port, pg_sql, verifier, userlist, upstream_host
#   bench_client_env             no PG* settings from outside; PGPASSWORD for the role
#   write_pgbouncer_config DIR PORT, write_pgmux_config DIR PORT
#   bench_launch KIND DIR PORT BIN [WRAPPER...]   launched_pid launched_log
#   bench_wait_listening NAME PID PORT LOG DIR TRIES
#   bench_check_login NAME PORT LOG

say() {
    printf '\n==> %s: %s\n' "${bench_tag:-bench}" "$*"
}
note() {
    printf '%s: %s\n' "${bench_tag:-bench}" "$*"
}
die() {
    printf '\n%s: FAILED: %s\n' "${bench_tag:-bench}" "$*" >&2
    exit 1
}
has() { # has WORD LIST...: whether WORD is in LIST
    local x=$1
    shift
    [[ " $* " == *" $x "* ]]
}

stop_pid() { # stop_pid PID [SECONDS [SIGNAL]]: SIGNAL (TERM), up to SECONDS (5), then KILL
    local pid=$1 seconds=${2:-5} signal=${3:-TERM}
    kill "-$signal" "$pid" 2>/dev/null || return 0
    for _ in $(seq $((seconds * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

bench_tools() {
    pgh_ensure_installed || die "PostgreSQL server binaries and pgbench are needed: $PGH_INSTALL_HINT"
    psql_bin=$(pgh_tool psql)
    pgbench_bin=$(pgh_tool pgbench) || die "pgbench not found: $PGH_INSTALL_HINT"
    pg_version=$("$(pgh_bindir)/postgres" --version | awk '{print $3}')
}

# bench_find_pgbouncer HINT: PgBouncer, installed with apt-get when missing and root; HINT
# says how to do without it.
bench_find_pgbouncer() {
    if ! command -v pgbouncer >/dev/null && [ -x /usr/sbin/pgbouncer ]; then
        PATH=$PATH:/usr/sbin
    fi
    if ! command -v pgbouncer >/dev/null; then
        if pgh_is_root && command -v apt-get >/dev/null; then
            note "PgBouncer not found: installing it with apt-get"
            export DEBIAN_FRONTEND=noninteractive
            { apt-get update -q && apt-get install -y -q --no-install-recommends pgbouncer; } >&2 ||
                die "apt-get install pgbouncer failed"
            PATH=$PATH:/usr/sbin
            # The package may start a system instance (on 6432) where an init system runs:
            # it is not ours to stop, and ours picks a free port anyway.
        else
            die "pgbouncer is not installed: apt-get install -y pgbouncer (as root), or leave it out: $1"
        fi
    fi
    pgbouncer_bin=$(command -v pgbouncer)
    pgbouncer_version=$("$pgbouncer_bin" --version | awk 'NR == 1 {print $2}')
    [ -n "$pgbouncer_version" ] || die "cannot tell PgBouncer's version from '$pgbouncer_bin --version'"
    # PgBouncer tracks protocol-level prepared statements from 1.21 on (max_prepared_statements).
    pgbouncer_prepared=false
    if [ "$(printf '%s\n1.21.0\n' "$pgbouncer_version" | sort -V | head -n1)" = 1.21.0 ]; then
        pgbouncer_prepared=true
    fi
}

bench_build_pgmux() {
    if [ -n "${PGMUX_BIN:-}" ]; then
        mux_bin=$PGMUX_BIN
        [ -x "$mux_bin" ] || die "PGMUX_BIN=$mux_bin is not an executable"
    else
        say "cargo build --release"
        cargo build --release --bin pgmux || die "cargo build --release failed"
        mux_bin=${CARGO_TARGET_DIR:-target}/release/pgmux
        [[ "$mux_bin" == /* ]] || mux_bin=$PWD/$mux_bin
    fi
}

bench_commit() {
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
        commit="$commit+changes"
    fi
    echo "$commit"
}

# bench_make_certs: a throwaway CA and a server certificate for 127.0.0.1 and localhost,
# signed by it, in $work/tls, made with the openssl command line (the bench's tool only:
# pgmux links rustls, never OpenSSL). PostgreSQL, PgBouncer and pgmux all serve this one
# certificate and key. BENCH_TLS_KEY picks the key: ec (P-256, ECDSA signatures, the
# default) or rsa (2048 bits); the handshake's signature is most of a TLS login's cost.
bench_make_certs() {
    tls_key_kind=${BENCH_TLS_KEY:-ec}
    local -a newkey
    case $tls_key_kind in
        ec) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
        rsa) newkey=(-newkey rsa:2048) ;;
        *) die "BENCH_TLS_KEY must be ec or rsa, not \"$tls_key_kind\"" ;;
    esac
    if ! command -v openssl >/dev/null; then
        if pgh_is_root && command -v apt-get >/dev/null; then
            note "openssl (the command line tool, for the TLS scenarios' certificates) not found: installing it with apt-get"
            export DEBIAN_FRONTEND=noninteractive
            { apt-get update -q && apt-get install -y -q --no-install-recommends openssl; } >&2 ||
                die "apt-get install openssl failed"
        fi
        command -v openssl >/dev/null || die "the TLS scenarios need the openssl command line tool: apt-get install -y openssl, or leave them out (-s)"
    fi
    tls_dir=$work/tls
    tls_ca=$tls_dir/ca.crt
    tls_cert=$tls_dir/server.crt
    tls_key=$tls_dir/server.key
    mkdir -p "$tls_dir"
    chmod 755 "$tls_dir"
    {
        openssl req -x509 -new "${newkey[@]}" -nodes -days 2 -subj "/CN=pgmux bench CA" \
            -keyout "$tls_dir/ca.key" -out "$tls_ca" &&
            openssl req -new "${newkey[@]}" -nodes -subj "/CN=localhost" \
                -keyout "$tls_key" -out "$tls_dir/server.csr" &&
            printf '%s\n' "subjectAltName = IP:127.0.0.1, DNS:localhost" "basicConstraints = CA:FALSE" \
                "keyUsage = critical, digitalSignature, keyEncipherment" "extendedKeyUsage = serverAuth" \
                >"$tls_dir/server.ext" &&
            openssl x509 -req -in "$tls_dir/server.csr" -CA "$tls_ca" -CAkey "$tls_dir/ca.key" \
                -CAcreateserial -days 2 -sha256 -extfile "$tls_dir/server.ext" -out "$tls_cert"
    } >"$tls_dir/openssl.log" 2>&1 || {
        cat "$tls_dir/openssl.log" >&2
        die "openssl could not make the bench's certificates"
    }
    chmod 600 "$tls_dir/ca.key" "$tls_key"
    chmod 644 "$tls_ca" "$tls_cert"
    # PostgreSQL wants its key owned by its own user and unreadable to others; PgBouncer (run
    # as that user too) reads the same file; pgmux runs as root here and reads anything.
    if pgh_is_root; then
        chown -R postgres "$tls_dir"
    fi
}

# bench_start_postgres SCALE: PostgreSQL in $pg_dir with the benchmark settings, the role
# $db_user (SCRAM), the database $db initialised by `pgbench -i -s SCALE`, and the auth file
# both poolers read.
bench_start_postgres() {
    local scale=$1
    pg_port=$(pgh_random_port)
    pgh_start "$pg_dir" "$pg_port" || die "PostgreSQL did not start"
    # Direct S5 needs 1000 backends beside the poolers' servers; keep the database in memory and
    # checkpoints out of the runs. fsync is off (scripts/pg-harness): the numbers are about the
    # pooler, not the disk.
    pgh_psql "$pg_dir" "$pg_port" \
        -c "ALTER SYSTEM SET max_connections = 1200" \
        -c "ALTER SYSTEM SET shared_buffers = '512MB'" \
        -c "ALTER SYSTEM SET max_wal_size = '8GB'" \
        -c "ALTER SYSTEM SET checkpoint_timeout = '1h'" \
        -c "ALTER SYSTEM SET log_min_messages = 'warning'" >/dev/null || die "cannot configure PostgreSQL"
    if ${pg_ssl:-false}; then
        # For the TLS scenarios (clients straight to PostgreSQL, and the poolers' servers in
        # S1TT). Plain connections are served as before: pg_hba.conf's `host` line takes both.
        pgh_psql "$pg_dir" "$pg_port" \
            -c "ALTER SYSTEM SET ssl = on" \
            -c "ALTER SYSTEM SET ssl_cert_file = '$tls_cert'" \
            -c "ALTER SYSTEM SET ssl_key_file = '$tls_key'" >/dev/null || die "cannot configure PostgreSQL's TLS"
    fi
    (cd "$pg_dir" && pgh_as_owner "$(pgh_bindir)/pg_ctl" restart -w -t 60 -s -m fast -D "$pg_dir/data" \
        -l "$pg_dir/postgres.log" -o "-p $pg_port") >/dev/null || {
        tail -n 20 "$pg_dir/postgres.log" >&2 || true
        die "PostgreSQL did not restart with the benchmark settings"
    }
    pgh_psql "$pg_dir" "$pg_port" \
        -c "CREATE ROLE $db_user LOGIN PASSWORD '$db_password'" \
        -c "CREATE DATABASE $db OWNER $db_user" || die "cannot create the $db database"
    note "pgbench -i -s $scale"
    "$pgbench_bin" -i -q -s "$scale" -I dtGvp -h "$pg_dir" -p "$pg_port" -U "$db_user" "$db" \
        >"$work/pgbench-init.log" 2>&1 || {
        cat "$work/pgbench-init.log" >&2
        die "pgbench -i failed"
    }
    verifier=$(pg_sql -c "SELECT rolpassword FROM pg_authid WHERE rolname = '$db_user'")
    [[ "$verifier" == SCRAM-SHA-256\$* ]] || die "expected a SCRAM verifier for $db_user, got '$verifier'"
    # The poolers' way to PostgreSQL (clients always come over TCP).
    upstream_host=127.0.0.1
    [ "$upstream" = unix ] && upstream_host=$pg_dir
    # Both poolers read the same PgBouncer-style auth file: the user's SCRAM verifier, as in
    # pg_authid (no password derivation per login in either).
    userlist=$work/userlist.txt
    printf '"%s" "%s"\n' "$db_user" "$verifier" >"$userlist"
    chmod 644 "$userlist"
}

pg_sql() { # psql as the superuser into $db over the Unix socket
    "$psql_bin" -X -q -At -v ON_ERROR_STOP=1 -h "$pg_dir" -p "$pg_port" -U postgres -d "$db" "$@"
}

bench_client_env() {
    unset RUST_LOG # pgmux's default logging, as PgBouncer's: both log each connect and disconnect
    for var in PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGOPTIONS PGPASSFILE PGSERVICE PGSERVICEFILE \
        PGSSLMODE PGREQUIRESSL PGTARGETSESSIONATTRS PGAPPNAME PGTZ PGDATESTYLE PGCLIENTENCODING \
        PGCONNECT_TIMEOUT PGGSSENCMODE; do
        unset "$var"
    done
    export PGPASSWORD=$db_password PGSSLMODE=disable PGGSSENCMODE=disable
}

write_pgbouncer_config() {
    local dir=$1 port=$2
    cat >"$dir/pgbouncer.ini" <<EOF
; written by bench/$(basename "$0")
[databases]
$db = host=$upstream_host port=$pg_port dbname=$db

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = ${bench_auth:-scram-sha-256}
auth_file = $userlist
pool_mode = transaction
default_pool_size = $pool_size
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = $max_clients
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
    if $pgbouncer_prepared; then
        echo "max_prepared_statements = 200" >>"$dir/pgbouncer.ini"
    fi
    case ${bench_tls:-plain} in
        client | both)
            cat >>"$dir/pgbouncer.ini" <<EOF
client_tls_sslmode = require
client_tls_cert_file = $tls_cert
client_tls_key_file = $tls_key
EOF
            ;;
    esac
    if [ "${bench_tls:-plain}" = both ]; then
        echo "server_tls_sslmode = require" >>"$dir/pgbouncer.ini"
    else
        echo "server_tls_sslmode = disable" >>"$dir/pgbouncer.ini" # its default
    fi
}

write_pgmux_config() {
    local dir=$1 port=$2
    cat >"$dir/pgmux.toml" <<EOF
# written by bench/$(basename "$0")
[server]
listen = "127.0.0.1:$port"
max_client_conn = $max_clients
shutdown_timeout = "2s"

[auth]
method = "${bench_auth:-scram-sha-256}"
userlist_file = "$userlist"

[pool]
mode = "transaction"
size = $pool_size
server_tls = "$([ "${bench_tls:-plain}" = both ] && echo require || echo disable)"  # as PgBouncer's server_tls_sslmode

[databases.$db]
host = "$upstream_host"
port = $pg_port
dbname = "$db"

[users.$db_user]
server_password = "$db_password"  # the userlist has only the verifier
EOF
    case ${bench_tls:-plain} in
        client | both)
            cat >>"$dir/pgmux.toml" <<EOF

[tls]
client_tls = "require"
cert_file = "$tls_cert"
key_file = "$tls_key"
EOF
            ;;
    esac
}

# bench_launch KIND DIR PORT BIN [WRAPPER...]: writes the config of KIND (pgbouncer or pgmux)
# into DIR and starts BIN with it in the background, through WRAPPER (a command and its
# arguments, e.g. valgrind) when given. Sets launched_pid and launched_log.
bench_launch() {
    local kind=$1 dir=$2 port=$3 bin=$4
    shift 4
    case "$kind" in
        pgbouncer)
            write_pgbouncer_config "$dir" "$port"
            launched_log=$dir/pgbouncer.log
            if pgh_is_root; then
                # PgBouncer refuses to run as root; setpriv execs, so $! is PgBouncer.
                chown -R postgres "$dir"
                setpriv --reuid=postgres --regid="$(id -g postgres)" --init-groups -- \
                    "$@" "$bin" -q "$dir/pgbouncer.ini" </dev/null >>"$dir/pgbouncer.stderr" 2>&1 &
            else
                "$@" "$bin" -q "$dir/pgbouncer.ini" </dev/null >>"$dir/pgbouncer.stderr" 2>&1 &
            fi
            ;;
        pgmux)
            write_pgmux_config "$dir" "$port"
            launched_log=$dir/pgmux.log
            "$@" "$bin" --config "$dir/pgmux.toml" </dev/null >>"$dir/pgmux.log" 2>&1 &
            ;;
        *) die "bench_launch: no pooler kind '$kind'" ;;
    esac
    launched_pid=$!
}

# bench_wait_listening NAME PID PORT LOG DIR TRIES: until PORT accepts, checking every 0.1 s
# that PID still runs; dies with the end of its logs otherwise.
bench_wait_listening() {
    local name=$1 pid=$2 port=$3 log=$4 dir=$5 tries=$6
    for _ in $(seq "$tries"); do
        pgh_listening "$port" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if ! kill -0 "$pid" 2>/dev/null || ! pgh_listening "$port"; then
        tail -n 20 "$log" "$dir"/*.stderr >&2 2>/dev/null || true
        die "$name did not start listening on 127.0.0.1:$port (log above)"
    fi
}

# bench_check_login NAME PORT LOG: one login and query through the target, or die.
bench_check_login() {
    local name=$1 port=$2 log=$3 answer
    answer=$("$psql_bin" -X -At -h 127.0.0.1 -p "$port" -U "$db_user" -d "$db" \
        -c 'SELECT 41 + 1' 2>&1) || true
    if [ "$answer" != 42 ]; then
        [ -z "$log" ] || tail -n 20 "$log" >&2 || true
        die "cannot log in and query through $name on 127.0.0.1:$port: $answer"
    fi
}
