//! TLS to PostgreSQL: the rustls configuration a pool's `server_tls*` settings make, and
//! the SSLRequest exchange and handshake on a new TCP connection. The connection it yields
//! is a [`TlsIo`], which the session polls like a plain socket.
//!
//! Modes follow libpq's `sslmode` and PgBouncer's `server_tls_sslmode`: `prefer` and
//! `require` encrypt without checking the certificate, `verify-ca` checks its chain
//! against `server_ca_file`, `verify-full` also checks that it names the host.

use std::fmt;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::ParsedCertificate;
use tokio_rustls::rustls::{
    self, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::tls_io::TlsIo;
use crate::config::{ServerTlsMode, ServerTlsSettings};

/// A TLS connection to a server.
pub type ServerTlsIo = TlsIo<TcpStream, ClientConnection>;

/// The SSLRequest code (1234 << 16 | 5679).
const SSL_REQUEST: i32 = 80_877_103;

/// How one pool opens TLS to its servers: the mode and, unless disabled, the rustls client
/// configuration built from its files. Cheap to clone. Two are equal when their settings
/// (files' contents included) are: a reload with new files makes a different upstream.
#[derive(Clone)]
pub struct TlsConnector {
    settings: ServerTlsSettings,
    config: Option<Arc<ClientConfig>>,
}

impl PartialEq for TlsConnector {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl Eq for TlsConnector {}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.settings.mode.as_str())
    }
}

impl Default for TlsConnector {
    /// `disable`.
    fn default() -> Self {
        TlsConnector {
            settings: ServerTlsSettings {
                mode: ServerTlsMode::Disable,
                ..ServerTlsSettings::default()
            },
            config: None,
        }
    }
}

/// What a server connection ended up with.
pub enum Negotiated {
    /// The server agreed and the handshake succeeded.
    Tls(Box<ServerTlsIo>),
    /// Plain TCP: `disable`, or `prefer` and the server said no.
    Plain(TcpStream),
}

impl TlsConnector {
    /// Builds the configuration; on failure, the key that is wrong and why.
    pub fn new(settings: &ServerTlsSettings) -> Result<TlsConnector, (&'static str, String)> {
        let config = match settings.mode {
            ServerTlsMode::Disable => None,
            _ => Some(Arc::new(client_config(settings)?)),
        };
        Ok(TlsConnector {
            settings: settings.clone(),
            config,
        })
    }

    /// Whether `settings` make a working configuration (for config validation).
    pub fn check(settings: &ServerTlsSettings) -> Result<(), (&'static str, String)> {
        client_config(settings).map(drop)
    }

    /// The mode.
    pub fn mode(&self) -> ServerTlsMode {
        self.settings.mode
    }

    /// Sends SSLRequest on a fresh TCP connection to `host` and, if the server answers
    /// `S`, runs the TLS handshake; `prefer` goes on in plain text when it answers `N`.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> Result<Negotiated, String> {
        let Some(config) = &self.config else {
            return Ok(Negotiated::Plain(tcp));
        };
        let mode = self.settings.mode.as_str();
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
        let io = |e: std::io::Error| format!("server_tls = {mode}: SSLRequest failed: {e}");
        tcp.write_all(&request).await.map_err(io)?;
        // Exactly one byte: anything after it belongs to the TLS handshake (or, after
        // `N`, to the startup), never to this answer.
        match tcp.read_u8().await.map_err(io)? {
            b'S' => {}
            b'N' if self.settings.mode == ServerTlsMode::Prefer => {
                return Ok(Negotiated::Plain(tcp));
            }
            b'N' => {
                return Err(format!(
                    "server_tls = {mode}: the server does not accept TLS (it answered N to SSLRequest; set ssl = on in postgresql.conf, or lower server_tls)"
                ));
            }
            other => {
                return Err(format!(
                    "server_tls = {mode}: unexpected answer to SSLRequest (byte {other:#04x})"
                ));
            }
        }
        let name = server_name(host, &tcp);
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let stream = connector.connect(name, tcp).await.map_err(|e| {
            let what = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::InvalidCertificate(why)) => {
                    format!("the server's certificate failed verification: {why:?}")
                }
                _ => e.to_string(),
            };
            format!("server_tls = {mode}: TLS handshake failed: {what}")
        })?;
        let (tcp, connection) = stream.into_inner();
        Ok(Negotiated::Tls(Box::new(TlsIo::new(tcp, connection))))
    }
}

/// The name the certificate is checked against (`verify-full`) and sent as SNI: the
/// configured host, or the address connected to when it is not a valid name.
fn server_name(host: &str, tcp: &TcpStream) -> ServerName<'static> {
    match ServerName::try_from(host.to_owned()) {
        Ok(name) => name,
        Err(_) => match tcp.peer_addr() {
            Ok(addr) => ServerName::IpAddress(addr.ip().into()),
            Err(_) => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        },
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `settings` (not `disable`).
fn client_config(settings: &ServerTlsSettings) -> Result<ClientConfig, (&'static str, String)> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &settings.ca_file {
        let err = |e: String| ("server_ca_file", format!("{}: {e}", ca.path.display()));
        for cert in CertificateDer::pem_slice_iter(&ca.pem) {
            let cert = cert.map_err(|e| err(e.to_string()))?;
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(err("holds no certificate".to_owned()));
        }
    }
    let verifier: Arc<dyn ServerCertVerifier> = match settings.mode {
        ServerTlsMode::VerifyFull => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| ("server_ca_file", e.to_string()))?
        }
        ServerTlsMode::VerifyCa => Arc::new(WithoutName {
            roots: Some(Arc::new(roots)),
            algorithms: provider.signature_verification_algorithms,
        }),
        _ => Arc::new(WithoutName {
            roots: None,
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("server_tls", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&settings.cert_file, &settings.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(("server_cert_file", "needs server_key_file".to_owned()));
        }
        (None, Some(_)) => {
            return Err(("server_key_file", "needs server_cert_file".to_owned()));
        }
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert.pem)
                .collect::<Result<_, _>>()
                .map_err(|e| ("server_cert_file", format!("{}: {e}", cert.path.display())))?;
            if chain.is_empty() {
                let msg = format!("{}: holds no certificate", cert.path.display());
                return Err(("server_cert_file", msg));
            }
            let key_der = PrivateKeyDer::from_pem_slice(&key.pem).map_err(|e| {
                let msg = format!("{}: no private key found: {e}", key.path.display());
                ("server_key_file", msg)
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ("server_key_file", format!("{}: {e}", key.path.display())))?
        }
    };
    // What libpq 17 sends; servers before 17 ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// `verify-ca`: the chain must lead to one of the roots; the name is not checked. Without
/// roots (`prefer`, `require`: libpq's and PgBouncer's meaning of these modes) any
/// certificate is accepted. Either way the handshake's signatures are checked against it.
#[derive(Debug)]
struct WithoutName {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for WithoutName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
