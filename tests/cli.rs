//! The command line: `pgmux check`, `--version`, and config errors as a user sees them.

use std::process::Command;

fn pgmux(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .args(args)
        .env_remove("PGMUX_CONFIG")
        .output()
        .expect("pgmux runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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
fn shipped_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgmux.toml");
    let (code, _stdout, stderr) = pgmux(&["check", "--config", path]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn version_is_printed() {
    let (code, stdout, _) = pgmux(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
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
