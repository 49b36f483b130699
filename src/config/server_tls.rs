//! TLS from pgmux to PostgreSQL, under PgBouncer's names: `server_tls` (its
//! `server_tls_sslmode`), `server_ca_file`, `server_cert_file`, `server_key_file`, in
//! `[pool]` and per database. The files are read when the config is loaded (and so on
//! every reload): a pool whose files changed replaces its connections, as for a new host.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::report::{Places, Report, join_key};
use super::{Config, PoolOverrides};

/// `server_tls`: whether and how pgmux uses TLS to servers (libpq's `sslmode`). Unix
/// sockets never use TLS, whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerTlsMode {
    /// Plain TCP; no SSLRequest is sent.
    Disable,
    /// TLS if the server accepts it, else plain; no certificate check (PgBouncer's and
    /// libpq's default).
    #[default]
    Prefer,
    /// TLS or no connection; no certificate check.
    Require,
    /// TLS with the server's certificate chain checked against `server_ca_file`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host pgmux connects to.
    VerifyFull,
}

/// The spellings in the TOML file.
pub(super) const SERVER_TLS_MODES: &[(&str, ServerTlsMode)] = &[
    ("disable", ServerTlsMode::Disable),
    ("prefer", ServerTlsMode::Prefer),
    ("require", ServerTlsMode::Require),
    ("verify-ca", ServerTlsMode::VerifyCa),
    ("verify-full", ServerTlsMode::VerifyFull),
];

impl ServerTlsMode {
    /// The spelling used in the TOML file.
    pub fn as_str(self) -> &'static str {
        SERVER_TLS_MODES
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("prefer", |(name, _)| name)
    }

    /// Whether the server's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull)
    }
}

/// A PEM file named in the config, with its contents as read at load. `Debug` shows only
/// the path (a key file is a secret).
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    /// As resolved against the config file's directory.
    pub path: PathBuf,
    /// The file's bytes; empty until the loader reads it.
    pub pem: Arc<[u8]>,
}

impl PemFile {
    /// A file named in the config, not read yet.
    pub fn named(path: &str) -> PemFile {
        PemFile {
            path: PathBuf::from(path),
            pem: Arc::from([]),
        }
    }
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path.fmt(f)
    }
}

/// TLS to the servers of one pool (`[pool]`, then the database's keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerTlsSettings {
    /// `server_tls`.
    pub mode: ServerTlsMode,
    /// `server_ca_file`: root certificates for `verify-ca` and `verify-full`.
    pub ca_file: Option<PemFile>,
    /// `server_cert_file`: a client certificate (chain) for servers that ask for one.
    pub cert_file: Option<PemFile>,
    /// `server_key_file`: the private key of `server_cert_file`.
    pub key_file: Option<PemFile>,
}

impl ServerTlsSettings {
    /// Replaces what `o` sets.
    pub fn apply(&mut self, o: &PoolOverrides) {
        self.mode = o.server_tls.unwrap_or(self.mode);
        for (mine, theirs) in [
            (&mut self.ca_file, &o.server_ca_file),
            (&mut self.cert_file, &o.server_cert_file),
            (&mut self.key_file, &o.server_key_file),
        ] {
            if theirs.is_some() {
                mine.clone_from(theirs);
            }
        }
    }
}

/// Reads every file the TLS keys name (relative to `base`) into the config, then checks
/// each database's effective settings by building what the pool will use, reporting at the
/// key that is wrong.
pub(super) fn load_files(config: &mut Config, base: &Path, places: &Places, report: &mut Report) {
    let keys = |path: &str| {
        ["server_ca_file", "server_cert_file", "server_key_file"].map(|k| join_key(path, k))
    };
    let [ca, cert, key] = keys("pool");
    let tls = &mut config.pool.server_tls;
    read_pem(&mut tls.ca_file, &ca, base, places, report);
    read_pem(&mut tls.cert_file, &cert, base, places, report);
    read_pem(&mut tls.key_file, &key, base, places, report);
    for (name, db) in &mut config.databases {
        let [ca, cert, key] = keys(&join_key("databases", name));
        let o = &mut db.overrides;
        read_pem(&mut o.server_ca_file, &ca, base, places, report);
        read_pem(&mut o.server_cert_file, &cert, base, places, report);
        read_pem(&mut o.server_key_file, &key, base, places, report);
    }
}

/// Resolves a PEM file named at `key` against `base` and reads it, reporting at the key
/// when it cannot be read or is empty (its contents then stay empty).
pub(super) fn read_pem(
    file: &mut Option<PemFile>,
    key: &str,
    base: &Path,
    places: &Places,
    report: &mut Report,
) {
    let Some(file) = file else {
        return;
    };
    file.path = base.join(&file.path);
    match std::fs::read(&file.path) {
        Ok(bytes) if bytes.is_empty() => {
            report.at(places, key, format!("{} is empty", file.path.display()));
        }
        Ok(bytes) => file.pem = bytes.into(),
        Err(e) => report.at(
            places,
            key,
            format!("cannot read {}: {e}", file.path.display()),
        ),
    }
}

/// Checks `[pool]`'s and every database's TLS settings: a mode that verifies needs a CA
/// file, a certificate needs its key, and the files must hold what they should.
pub(super) fn check(config: &Config, places: &Places, report: &mut Report) {
    let mut check_one = |path: &str, settings: &ServerTlsSettings, o: Option<&PoolOverrides>| {
        // A problem is reported where it was written: the database's key if it set one.
        let at = |key: &str, set_here: bool| {
            if set_here || o.is_none() {
                join_key(path, key)
            } else {
                join_key("pool", key)
            }
        };
        if settings.mode.verifies() && settings.ca_file.is_none() {
            let set = o.is_none_or(|o| o.server_tls.is_some());
            let msg = format!(
                "\"{}\" checks the server's certificate and needs server_ca_file",
                settings.mode.as_str()
            );
            report.at(places, &at("server_tls", set), msg);
        }
        let unread = |f: &Option<PemFile>| f.as_ref().is_some_and(|f| f.pem.is_empty());
        if unread(&settings.ca_file) || unread(&settings.cert_file) || unread(&settings.key_file) {
            return; // already reported (or empty, which the checks below would repeat)
        }
        if let Err((key, msg)) = crate::server::TlsConnector::check(settings) {
            let set = o.is_none_or(|o| match key {
                "server_ca_file" => o.server_ca_file.is_some(),
                "server_cert_file" => o.server_cert_file.is_some(),
                _ => o.server_key_file.is_some(),
            });
            report.at(places, &at(key, set), msg);
        }
    };
    check_one("pool", &config.pool.server_tls, None);
    for (name, db) in &config.databases {
        let o = &db.overrides;
        let touched = o.server_tls.is_some()
            || o.server_ca_file.is_some()
            || o.server_cert_file.is_some()
            || o.server_key_file.is_some();
        if touched {
            let mut settings = config.pool.server_tls.clone();
            settings.apply(o);
            check_one(&join_key("databases", name), &settings, Some(o));
        }
    }
}
