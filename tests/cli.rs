//! The command line: `pgmux check`, `--version`, and config errors as a user sees them;
//! the refusal of an admin port open beyond localhost without a token, at start and reload.

mod common;

use std::process::Command;

use common::{MuxOptions, TestPgmux, TestPostgres, free_port, http_request};

use common::pgmux_cli as pgmux;

fn write_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgmux.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_string_lossy().into_owned();
    (dir, path)
}

#[test]
fn check_prints_the_effective_config_with_secrets_masked() {
    let (_dir, path) = write_config(
        "[databases.app]\nport = 5432\n\n[users.app]\npassword = \"very-secret-pw\"\n",
    );
    let (code, stdout, stderr) = pgmux(&["check", "--config", &path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("very-secret-pw"), "{stdout}");
    assert!(stdout.contains("********"), "{stdout}");
    // Defaults are filled in.
    assert!(stdout.contains("wait_timeout = \"5s\""), "{stdout}");
    assert!(stdout.contains("mode = \"transaction\""), "{stdout}");
}

#[test]
fn config_errors_name_every_key_with_its_line() {
    let (_dir, path) = write_config(
        "[server]\nlisten = \"127.0.0.1:6432\"\n\n[pool]\nsize = 0\nwait_timout = \"5s\"\nidle_timeout = \"soon\"\n",
    );
    let (code, _stdout, stderr) = pgmux(&["check", "--config", &path]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(":5:") && stderr.contains("pool.size"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":6:") && stderr.contains("pool.wait_timout"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":7:") && stderr.contains("pool.idle_timeout"),
        "{stderr}"
    );

    // Running (not just checking) refuses the same file the same way.
    let (code, _stdout, stderr) = pgmux(&["--config", &path]);
    assert_eq!(code, 2);
    assert!(stderr.contains("pool.wait_timout"), "{stderr}");
}

#[test]
fn env_interpolation_feeds_sizes_and_secrets() {
    let (_dir, path) = write_config(
        "[pool]\nsize = ${PGMUX_TEST_SIZE:-7}\n\n[databases.app]\n\n[users.app]\npassword = \"${PGMUX_TEST_MISSING}\"\n",
    );
    let (code, _stdout, stderr) = pgmux(&["check", "--config", &path]);
    assert_eq!(code, 2, "an unset variable is an error");
    assert!(stderr.contains("PGMUX_TEST_MISSING"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .args(["check", "--config", &path])
        .env("PGMUX_TEST_MISSING", "from-env")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("size = 7"), "{stdout}");
}

#[test]
fn shipped_example_config_is_valid_with_its_secrets_set() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgmux.toml");
    let run = |vars: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pgmux"))
            .args(["check", "--config", path])
            .env_remove("PGMUX_ADMIN_TOKEN")
            .env_remove("PGMUX_POSTGRES_PASSWORD")
            .envs(vars.iter().copied())
            .output()
            .expect("pgmux runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    // No fallback secrets: each missing variable is named.
    let (code, _, stderr) = run(&[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("PGMUX_ADMIN_TOKEN"), "{stderr}");
    assert!(stderr.contains("PGMUX_POSTGRES_PASSWORD"), "{stderr}");

    let secrets = [
        ("PGMUX_ADMIN_TOKEN", "t0ken-from-env"),
        ("PGMUX_POSTGRES_PASSWORD", "pw-from-env"),
    ];
    let (code, stdout, stderr) = run(&secrets);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains("from-env"), "{stdout}");

    // As the Docker image runs it: the admin port on every interface, protected by the token.
    let open = [
        ("PGMUX_ADMIN_LISTEN", "0.0.0.0:9930"),
        secrets[0],
        secrets[1],
    ];
    let (code, _, stderr) = run(&open);
    assert_eq!(code, Some(0), "{stderr}");
}

const OPEN_ADMIN: &str = "[admin]\nlisten = \"0.0.0.0:0\"\n\n[databases.app]\nport = 5432\n";

#[test]
fn an_open_admin_port_without_a_token_is_refused_at_check_and_start() {
    let (_dir, path) = write_config(OPEN_ADMIN);
    let (code, _stdout, stderr) = pgmux(&["check", "--config", &path]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(":2:10: admin.listen: \"0.0.0.0:0\" is beyond localhost")
            && stderr.contains("admin.token")
            && stderr.contains("admin.allow_no_token = true"),
        "{stderr}"
    );
    // Running refuses it the same way, before listening on anything.
    let (code, _stdout, stderr) = pgmux(&["--config", &path]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("admin.allow_no_token"), "{stderr}");
}

#[test]
fn an_open_admin_port_is_accepted_with_a_token_or_when_allowed() {
    let with_token = OPEN_ADMIN.replace("[databases", "token = \"t0ken\"\n\n[databases");
    let (_dir, path) = write_config(&with_token);
    let (code, _stdout, stderr) = pgmux(&["check", "--config", &path]);
    assert_eq!(code, 0, "{stderr}");

    let allowed = OPEN_ADMIN.replace("[databases", "allow_no_token = true\n\n[databases");
    let (_dir, path) = write_config(&allowed);
    let (code, stdout, stderr) = pgmux(&["check", "--config", &path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("allow_no_token = true"), "{stdout}");
    // Still said loudly.
    assert!(
        stderr.contains("without admin.token (admin.allow_no_token = true)"),
        "{stderr}"
    );
}

#[test]
fn version_is_printed() {
    let (code, stdout, _) = pgmux(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
}

#[tokio::test]
async fn a_reload_cannot_remove_the_token_of_an_open_admin_port() {
    let pg = TestPostgres::shared().await;
    let admin_port = free_port();
    let admin = format!("[admin]\nlisten = \"0.0.0.0:{admin_port}\"\ntoken = \"t0ken\"\n");
    let opts = MuxOptions {
        extra: admin.clone(),
        ..MuxOptions::default()
    };
    let mux = TestPgmux::start(pg, opts).await;
    let protected = http_request(admin_port, "GET", "/pools", None).await;
    assert_eq!(protected.status, 401, "{}", protected.body);

    // Without the token, even with a local listen (which would take a restart): refused,
    // since the port bound at start is on every interface.
    let good = std::fs::read_to_string(&mux.config_path).unwrap();
    let local = admin.replace("0.0.0.0", "127.0.0.1");
    let no_token = good.replace(&admin, &local.replace("token = \"t0ken\"\n", ""));
    std::fs::write(&mux.config_path, &no_token).unwrap();
    let refused = http_request(admin_port, "POST", "/reload", Some("t0ken")).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    let errors = refused.json()["errors"].to_string();
    assert!(
        errors.contains("0.0.0.0") && errors.contains("admin.allow_no_token = true"),
        "{errors}"
    );
    let still = http_request(admin_port, "GET", "/pools", None).await;
    assert_eq!(
        still.status, 401,
        "the token stays in force: {}",
        still.body
    );

    // Explicitly allowed: applied.
    let allowed = no_token.replace("[admin]\n", "[admin]\nallow_no_token = true\n");
    std::fs::write(&mux.config_path, allowed).unwrap();
    let applied = http_request(admin_port, "POST", "/reload", Some("t0ken")).await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    let open = http_request(admin_port, "GET", "/pools", None).await;
    assert_eq!(open.status, 200, "{}", open.body);
}

#[test]
fn check_refuses_an_empty_password_with_its_line() {
    let (_dir, path) =
        write_config("[databases.app]\n\n[users.app]\npassword = \"${PGMUX_TEST_EMPTY_PW}\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .args(["check", "--config", &path])
        .env("PGMUX_TEST_EMPTY_PW", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(":4:12: users.app.password: must not be empty"),
        "{stderr}"
    );
}
