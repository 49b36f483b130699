//! `[tls]`: TLS between clients and pgmux, under names close to PgBouncer's
//! (`client_tls_sslmode`, `client_tls_cert_file`, ...): `client_tls`, `cert_file`,
//! `key_file`, `client_ca_file`. The files are read when the config is loaded, so a reload
//! (SIGHUP, `POST /reload`) picks up renewed certificates for new connections while the
//! connections already open keep theirs.

use std::path::Path;

use toml::de::DeTable;

use super::load::Walker;
use super::report::{Places, Report, join_key};
use super::server_tls::{PemFile, read_pem};

/// `client_tls`: what pgmux asks of clients (PgBouncer's `client_tls_sslmode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientTlsMode {
    /// No TLS: an SSLRequest is answered `N`, a direct TLS handshake is closed.
    #[default]
    Disable,
    /// TLS when the client asks for it, plain text otherwise.
    Allow,
    /// The same as `allow` on this side of the connection (as in PgBouncer); the default
    /// once `cert_file` and `key_file` are set.
    Prefer,
    /// TLS or nothing: a plain client gets `28000` before authentication.
    Require,
    /// `require`, and the client must present a certificate that `client_ca_file` signed.
    VerifyCa,
    /// `verify-ca`, and the certificate's common name must be the user name the client
    /// logs in as (PostgreSQL's `clientcert=verify-full`).
    VerifyFull,
}

/// The spellings in the TOML file.
pub(super) const CLIENT_TLS_MODES: &[(&str, ClientTlsMode)] = &[
    ("disable", ClientTlsMode::Disable),
    ("allow", ClientTlsMode::Allow),
    ("prefer", ClientTlsMode::Prefer),
    ("require", ClientTlsMode::Require),
    ("verify-ca", ClientTlsMode::VerifyCa),
    ("verify-full", ClientTlsMode::VerifyFull),
];

impl ClientTlsMode {
    /// The spelling used in the TOML file.
    pub fn as_str(self) -> &'static str {
        CLIENT_TLS_MODES
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("disable", |(name, _)| name)
    }

    /// Whether a client must use TLS.
    pub fn required(self) -> bool {
        matches!(
            self,
            ClientTlsMode::Require | ClientTlsMode::VerifyCa | ClientTlsMode::VerifyFull
        )
    }

    /// Whether a client must present a certificate signed by `client_ca_file`.
    pub fn verifies(self) -> bool {
        matches!(self, ClientTlsMode::VerifyCa | ClientTlsMode::VerifyFull)
    }
}

/// `[tls]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSection {
    /// `client_tls`; when not written, `prefer` if `cert_file` is set, else `disable`.
    pub client_tls: ClientTlsMode,
    /// `cert_file`: pgmux's certificate (chain) shown to clients.
    pub cert_file: Option<PemFile>,
    /// `key_file`: its private key.
    pub key_file: Option<PemFile>,
    /// `client_ca_file`: the roots client certificates are checked against (`verify-ca`,
    /// `verify-full`).
    pub client_ca_file: Option<PemFile>,
}

pub(super) const TLS_KEYS: &[&str] = &["client_tls", "cert_file", "key_file", "client_ca_file"];

impl Walker<'_> {
    /// Reads `[tls]`.
    pub(super) fn tls(&mut self, table: &DeTable<'_>, tls: &mut TlsSection) {
        let mut mode = None;
        for (key, value) in table {
            let path = join_key("tls", key.get_ref());
            let file = |w: &mut Self| w.string(&path, value).map(|f| PemFile::named(&f));
            match key.get_ref().as_ref() {
                "client_tls" => mode = self.choice(&path, value, CLIENT_TLS_MODES),
                "cert_file" => tls.cert_file = file(self),
                "key_file" => tls.key_file = file(self),
                "client_ca_file" => tls.client_ca_file = file(self),
                _ => self.unknown("tls", key, TLS_KEYS),
            }
        }
        tls.client_tls = match mode {
            Some(mode) => mode,
            None if tls.cert_file.is_some() => ClientTlsMode::Prefer,
            None => ClientTlsMode::Disable,
        };
    }
}

/// Reads the files `[tls]` names (relative to `base`).
pub(super) fn load_files(tls: &mut TlsSection, base: &Path, places: &Places, report: &mut Report) {
    read_pem(&mut tls.cert_file, "tls.cert_file", base, places, report);
    read_pem(&mut tls.key_file, "tls.key_file", base, places, report);
    read_pem(
        &mut tls.client_ca_file,
        "tls.client_ca_file",
        base,
        places,
        report,
    );
}

/// Checks `[tls]`: a mode other than `disable` needs a certificate and its key, one that
/// verifies clients needs a CA, and the files must make a working configuration.
pub(super) fn check(tls: &TlsSection, places: &Places, report: &mut Report) {
    let mode = tls.client_tls;
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => return report.at(places, "tls.cert_file", "needs tls.key_file"),
        (None, Some(_)) => return report.at(places, "tls.key_file", "needs tls.cert_file"),
        (None, None) if mode != ClientTlsMode::Disable => {
            let msg = format!(
                "\"{}\" needs tls.cert_file and tls.key_file (pgmux's certificate and key)",
                mode.as_str()
            );
            return report.at(places, "tls.client_tls", msg);
        }
        _ => {}
    }
    if mode.verifies() && tls.client_ca_file.is_none() {
        let msg = format!(
            "\"{}\" checks client certificates and needs tls.client_ca_file",
            mode.as_str()
        );
        return report.at(places, "tls.client_tls", msg);
    }
    let unread = |f: &Option<PemFile>| f.as_ref().is_some_and(|f| f.pem.is_empty());
    if unread(&tls.cert_file) || unread(&tls.key_file) || unread(&tls.client_ca_file) {
        return; // already reported
    }
    if let Err((key, msg)) = crate::client::ClientTls::new(tls) {
        report.at(places, &join_key("tls", key), msg);
    }
}
