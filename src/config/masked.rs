//! [`Config::masked`]: the effective configuration as TOML, secrets replaced by [`MASK`].

use std::fmt::Write as _;
use std::time::Duration;

use super::report::join_key;
use super::{Config, MASK, PoolOverrides, PoolSettings, env};

/// Renders `config` as TOML that parses back to the same configuration, except that
/// every password reads [`MASK`].
pub(super) fn render(config: &Config) -> String {
    let mut out = String::from("# pgmux effective configuration; secrets are masked.\n");
    let server = &config.server;
    out.push_str("\n[server]\n");
    let listen: Vec<String> = server.listen.iter().map(|a| quote(a)).collect();
    line(&mut out, "listen", &format!("[{}]", listen.join(", ")));
    line(
        &mut out,
        "max_client_conn",
        &server.max_client_conn.to_string(),
    );
    line(
        &mut out,
        "client_login_timeout",
        &duration(server.client_login_timeout),
    );
    line(
        &mut out,
        "shutdown_timeout",
        &duration(server.shutdown_timeout),
    );
    line(&mut out, "drain_delay", &duration(server.drain_delay));
    line(&mut out, "reuse_port", &server.reuse_port.to_string());
    line(
        &mut out,
        "max_message_size",
        &server.max_message_size.to_string(),
    );
    line(
        &mut out,
        "partial_message_timeout",
        &duration(server.partial_message_timeout),
    );
    line(
        &mut out,
        "park_idle_after",
        &duration(server.park_idle_after),
    );
    line(
        &mut out,
        "statement_registry_size",
        &server.statement_registry_size.to_string(),
    );
    line(
        &mut out,
        "worker_threads",
        &server.worker_threads.to_string(),
    );
    if let Some(file) = &server.pid_file {
        line(&mut out, "pid_file", &quote(&file.to_string_lossy()));
    }
    if let Some(file) = &server.upgrade_socket {
        line(&mut out, "upgrade_socket", &quote(&file.to_string_lossy()));
    }
    line(
        &mut out,
        "upgrade_timeout",
        &duration(server.upgrade_timeout),
    );

    let auth = &config.auth;
    out.push_str("\n[auth]\n");
    line(&mut out, "method", &quote(auth.method.as_str()));
    if let Some(file) = &auth.userlist_file {
        line(&mut out, "userlist_file", &quote(&file.to_string_lossy()));
    }
    let admins: Vec<String> = auth.admin_users.iter().map(|u| quote(u)).collect();
    line(&mut out, "admin_users", &format!("[{}]", admins.join(", ")));
    line(
        &mut out,
        "max_login_failures",
        &auth.max_login_failures.to_string(),
    );
    let per_address = auth.max_login_failures_per_address().to_string();
    match auth.max_login_failures_per_address {
        Some(_) => line(&mut out, "max_login_failures_per_address", &per_address),
        // Unset, it follows max_login_failures: shown, but left unset on a reload of this.
        None => line(
            &mut out,
            "# max_login_failures_per_address",
            &format!("{per_address} (10 x max_login_failures)"),
        ),
    }
    line(
        &mut out,
        "login_failure_window",
        &duration(auth.login_failure_window),
    );
    line(&mut out, "login_lockout", &duration(auth.login_lockout));
    line(
        &mut out,
        "allow_cleartext_without_tls",
        &auth.allow_cleartext_without_tls.to_string(),
    );
    optional(&mut out, "auth_user", auth.auth_user.as_deref());
    line(&mut out, "auth_query", &quote(&auth.auth_query));
    optional(&mut out, "auth_dbname", auth.auth_dbname.as_deref());
    line(&mut out, "auth_cache_ttl", &duration(auth.auth_cache_ttl));
    line(
        &mut out,
        "auth_negative_cache_ttl",
        &duration(auth.auth_negative_cache_ttl),
    );
    match &auth.hba_file {
        Some(file) => line(&mut out, "hba_file", &quote(&file.to_string_lossy())),
        None => {
            for rule in &auth.rules {
                out.push_str(&super::access::render_rule(rule));
            }
        }
    }

    let admin = &config.admin;
    out.push_str("\n[admin]\n");
    optional(&mut out, "listen", admin.listen.as_deref());
    optional(&mut out, "token", admin.token.as_ref().map(|_| MASK));
    line(
        &mut out,
        "allow_no_token",
        &admin.allow_no_token.to_string(),
    );
    line(
        &mut out,
        "log_connections",
        &admin.log_connections.to_string(),
    );
    line(&mut out, "log_slow_waits", &duration(admin.log_slow_waits));
    line(&mut out, "header_timeout", &duration(admin.header_timeout));
    line(&mut out, "idle_timeout", &duration(admin.idle_timeout));
    line(
        &mut out,
        "max_connections",
        &admin.max_connections.to_string(),
    );

    let tls = &config.tls;
    out.push_str("\n[tls]\n");
    line(&mut out, "client_tls", &quote(tls.client_tls.as_str()));
    let files = [
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
        ("client_ca_file", &tls.client_ca_file),
    ];
    for (key, file) in files {
        let path = file.as_ref().map(|f| f.path.to_string_lossy());
        optional(&mut out, key, path.as_deref());
    }

    out.push_str("\n[pool]\n");
    pool(&mut out, &full(&config.pool));

    for (name, db) in &config.databases {
        let _ = writeln!(out, "\n[{}]", header("databases", name));
        line(&mut out, "host", &quote(&db.host));
        line(&mut out, "port", &db.port.to_string());
        optional(&mut out, "dbname", db.dbname.as_deref());
        optional(&mut out, "user", db.user.as_deref());
        optional(&mut out, "password", db.password.as_ref().map(|_| MASK));
        optional(&mut out, "auth_user", db.auth_user.as_deref());
        optional(&mut out, "auth_query", db.auth_query.as_deref());
        optional(&mut out, "auth_dbname", db.auth_dbname.as_deref());
        pool(&mut out, &db.overrides);
    }

    for (name, user) in &config.users {
        let _ = writeln!(out, "\n[{}]", header("users", name));
        optional(&mut out, "password", user.password.as_ref().map(|_| MASK));
        let server_password = user.server_password.as_ref().map(|_| MASK);
        optional(&mut out, "server_password", server_password);
        optional(
            &mut out,
            "auth_method",
            user.auth_method.map(|m| m.as_str()),
        );
        optional(&mut out, "mode", user.mode.map(|m| m.as_str()));
        if let Some(n) = user.size {
            line(&mut out, "size", &n.to_string());
        }
        if let Some(d) = user.wait_timeout {
            line(&mut out, "wait_timeout", &duration(d));
        }
        let limits = [
            ("max_user_connections", user.max_user_connections),
            (
                "max_user_client_connections",
                user.max_user_client_connections,
            ),
        ];
        for (key, n) in limits {
            if let Some(n) = n {
                line(&mut out, key, &n.to_string());
            }
        }
    }
    out
}

/// Every setting of `s`, as overrides, so that one function renders both.
fn full(s: &PoolSettings) -> PoolOverrides {
    PoolOverrides {
        mode: Some(s.mode),
        size: Some(s.size),
        min_size: Some(s.min_size),
        wait_timeout: Some(s.wait_timeout),
        wait_notice_after: Some(s.wait_notice_after),
        idle_timeout: Some(s.idle_timeout),
        max_lifetime: Some(s.max_lifetime),
        connect_timeout: Some(s.connect_timeout),
        idle_transaction_timeout: Some(s.idle_transaction_timeout),
        query_timeout: Some(s.query_timeout),
        server_reset_query: Some(s.server_reset_query.clone()),
        max_prepared_statements: Some(s.max_prepared_statements),
        tcp_keepalive: Some(s.tcp.keepalive),
        tcp_keepidle: Some(s.tcp.keepidle),
        tcp_keepintvl: Some(s.tcp.keepintvl),
        tcp_keepcnt: Some(s.tcp.keepcnt),
        tcp_user_timeout: Some(s.tcp.user_timeout),
        session_state: Some(s.session_state),
        verify_every_transaction: Some(s.verify_every_transaction),
        // Unset means half of each pool's own size: shown only when set.
        max_pinned: s.max_pinned,
        pinned_idle_timeout: Some(s.pinned_idle_timeout),
        server_tls: Some(s.server_tls.mode),
        server_ca_file: s.server_tls.ca_file.clone(),
        server_cert_file: s.server_tls.cert_file.clone(),
        server_key_file: s.server_tls.key_file.clone(),
        max_db_connections: Some(s.limits.max_db_connections),
        max_db_client_connections: Some(s.limits.max_db_client_connections),
        max_user_connections: Some(s.limits.max_user_connections),
        max_user_client_connections: Some(s.limits.max_user_client_connections),
    }
}

/// The pool settings that `o` sets, in [`PoolSettings`] order.
fn pool(out: &mut String, o: &PoolOverrides) {
    optional(out, "mode", o.mode.map(|m| m.as_str()));
    let mut number = |key: &str, n: Option<u32>| {
        if let Some(n) = n {
            line(out, key, &n.to_string());
        }
    };
    number("size", o.size);
    number("min_size", o.min_size);
    number("max_prepared_statements", o.max_prepared_statements);
    let durations = [
        ("wait_timeout", o.wait_timeout),
        ("wait_notice_after", o.wait_notice_after),
        ("idle_timeout", o.idle_timeout),
        ("max_lifetime", o.max_lifetime),
        ("connect_timeout", o.connect_timeout),
        ("idle_transaction_timeout", o.idle_transaction_timeout),
        ("query_timeout", o.query_timeout),
    ];
    for (key, d) in durations {
        if let Some(d) = d {
            line(out, key, &duration(d));
        }
    }
    optional(out, "server_reset_query", o.server_reset_query.as_deref());
    if let Some(on) = o.tcp_keepalive {
        line(out, "tcp_keepalive", &on.to_string());
    }
    let tcp = [
        ("tcp_keepidle", o.tcp_keepidle),
        ("tcp_keepintvl", o.tcp_keepintvl),
    ];
    for (key, d) in tcp {
        if let Some(d) = d {
            line(out, key, &duration(d));
        }
    }
    if let Some(n) = o.tcp_keepcnt {
        line(out, "tcp_keepcnt", &n.to_string());
    }
    if let Some(d) = o.tcp_user_timeout {
        line(out, "tcp_user_timeout", &duration(d));
    }
    optional(out, "session_state", o.session_state.map(|p| p.as_str()));
    optional(
        out,
        "session_state_check",
        o.verify_every_transaction
            .map(|always| if always { "always" } else { "triggers" }),
    );
    if let Some(n) = o.max_pinned {
        line(out, "max_pinned", &n.to_string());
    }
    if let Some(d) = o.pinned_idle_timeout {
        line(out, "pinned_idle_timeout", &duration(d));
    }
    optional(out, "server_tls", o.server_tls.map(|m| m.as_str()));
    let files = [
        ("server_ca_file", &o.server_ca_file),
        ("server_cert_file", &o.server_cert_file),
        ("server_key_file", &o.server_key_file),
    ];
    for (key, file) in files {
        let path = file.as_ref().map(|f| f.path.to_string_lossy());
        optional(out, key, path.as_deref());
    }
    let limits = [
        ("max_db_connections", o.max_db_connections),
        ("max_db_client_connections", o.max_db_client_connections),
        ("max_user_connections", o.max_user_connections),
        ("max_user_client_connections", o.max_user_client_connections),
    ];
    for (key, n) in limits {
        if let Some(n) = n {
            line(out, key, &n.to_string());
        }
    }
}

fn line(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "{key} = {value}");
}

/// `key = "value"` if there is a value.
fn optional(out: &mut String, key: &str, value: Option<&str>) {
    if let Some(value) = value {
        line(out, key, &quote(value));
    }
}

fn duration(d: Duration) -> String {
    quote(&humantime::format_duration(d).to_string())
}

/// `section.name` for a table header. `${` is escaped so that parsing does not substitute.
fn header(section: &str, name: &str) -> String {
    join_key(section, name).replace("${", "$${")
}

/// A TOML basic string, on one line, `${` escaped so that parsing does not substitute.
pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    env::escape_basic(s, &mut out);
    out.push('"');
    out.replace("${", "$${")
}
