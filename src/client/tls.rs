//! TLS for clients: the rustls configuration `[tls]` makes, the handshake after an
//! SSLRequest or a direct one (PostgreSQL 17's `sslnegotiation=direct`, ALPN
//! `postgresql`), and what the rest of pgmux asks of a finished handshake: how it is
//! described in the views, the client certificate's name (`verify-full`) and the
//! `tls-server-end-point` channel binding of SCRAM-SHA-256-PLUS.
//!
//! Built once per config load: a reload with renewed files makes a new [`ClientTls`] for
//! the connections that arrive after it, and the ones already open keep theirs.

use std::io;
use std::sync::Arc;

use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig, ServerConnection};
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::der::asn1::ObjectIdentifier as Oid;

use crate::config::{ClientTlsMode, TlsSection};
use crate::server::TlsIo;

/// A client connection over TLS.
pub type ClientTlsIo = TlsIo<TcpStream, ServerConnection>;

/// The ALPN protocol PostgreSQL 17 defines (and requires for a direct handshake).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// How pgmux offers TLS to clients, as one config load made it. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    mode: ClientTlsMode,
    config: Arc<ServerConfig>,
    /// `tls-server-end-point` channel binding data: pgmux's certificate hashed with the
    /// hash of its signature (SHA-256 for MD5 and SHA-1, RFC 5929). `None` when the
    /// signature names no hash (Ed25519, RSA-PSS): SCRAM-SHA-256-PLUS is then not offered,
    /// as PostgreSQL does not offer it either.
    end_point: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mode.as_str())
    }
}

impl ClientTls {
    /// Builds what `[tls]` describes; `Ok(None)` for `client_tls = "disable"`. On failure,
    /// the key under `[tls]` that is wrong and why.
    pub fn new(tls: &TlsSection) -> Result<Option<ClientTls>, (&'static str, String)> {
        if tls.client_tls == ClientTlsMode::Disable {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) else {
            return Err(("client_tls", "needs cert_file and key_file".to_owned()));
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert.pem)
            .collect::<Result<_, _>>()
            .map_err(|e| ("cert_file", format!("{}: {e}", cert.path.display())))?;
        let Some(leaf) = chain.first() else {
            let msg = format!("{}: holds no certificate", cert.path.display());
            return Err(("cert_file", msg));
        };
        let end_point = end_point(leaf).map(Arc::from);
        let key_der = PrivateKeyDer::from_pem_slice(&key.pem).map_err(|e| {
            let msg = format!("{}: no private key found: {e}", key.path.display());
            ("key_file", msg)
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("client_tls", e.to_string()))?;
        let builder = match (&tls.client_ca_file, tls.client_tls.verifies()) {
            // With a CA, certificates are asked for: required by verify-ca/verify-full,
            // optional otherwise (for the `cert` method of some users or rules).
            (Some(ca), verifies) => {
                let err = |e: String| ("client_ca_file", format!("{}: {e}", ca.path.display()));
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&ca.pem) {
                    roots
                        .add(cert.map_err(|e| err(e.to_string()))?)
                        .map_err(|e| err(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(err("holds no certificate".to_owned()));
                }
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
                if !verifies {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier.build().map_err(|e| err(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            (None, true) => {
                return Err(("client_tls", "needs client_ca_file".to_owned()));
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| ("key_file", format!("{}: {e}", key.path.display())))?;
        // A client that offers ALPN must offer `postgresql`; one that offers none may still
        // use TLS after an SSLRequest (libpq before 17), not directly.
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Some(ClientTls {
            mode: tls.client_tls,
            config: Arc::new(config),
            end_point,
        }))
    }

    /// What clients are asked for.
    pub fn mode(&self) -> ClientTlsMode {
        self.mode
    }

    /// The `tls-server-end-point` channel binding data, when SCRAM-SHA-256-PLUS can be
    /// offered.
    pub fn end_point(&self) -> Option<&Arc<[u8]>> {
        self.end_point.as_ref()
    }

    /// Runs the server side of the handshake on `tcp`, whose next bytes are the client's
    /// ClientHello.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<ClientTlsIo> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        let stream = acceptor.accept(tcp).await?;
        let (tcp, connection) = stream.into_inner();
        Ok(TlsIo::new(tcp, connection))
    }
}

/// The common name of a client's certificate (the first CN of its subject), for
/// `verify-full`; `None` when it has none or cannot be read.
pub fn peer_common_name(connection: &ServerConnection) -> Option<String> {
    const COMMON_NAME: Oid = Oid::new_unwrap("2.5.4.3");
    let leaf = connection.peer_certificates()?.first()?;
    let cert = Certificate::from_der(leaf).ok()?;
    let subject = &cert.tbs_certificate.subject;
    subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == COMMON_NAME)
        .and_then(|attribute| std::str::from_utf8(attribute.value.value()).ok())
        .map(str::to_owned)
}

/// `tls-server-end-point` data for a certificate (RFC 5929 section 4.1): its DER hashed
/// with the hash function of its signature algorithm, MD5 and SHA-1 replaced by SHA-256.
fn end_point(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    const SHA256: &[Oid] = &[
        Oid::new_unwrap("1.2.840.113549.1.1.4"), // md5WithRSAEncryption
        Oid::new_unwrap("1.2.840.113549.1.1.5"), // sha1WithRSAEncryption
        Oid::new_unwrap("1.2.840.113549.1.1.11"), // sha256WithRSAEncryption
        Oid::new_unwrap("1.2.840.10045.4.1"),    // ecdsa-with-SHA1
        Oid::new_unwrap("1.2.840.10045.4.3.2"),  // ecdsa-with-SHA256
    ];
    const SHA384: &[Oid] = &[
        Oid::new_unwrap("1.2.840.113549.1.1.12"), // sha384WithRSAEncryption
        Oid::new_unwrap("1.2.840.10045.4.3.3"),   // ecdsa-with-SHA384
    ];
    const SHA512: &[Oid] = &[
        Oid::new_unwrap("1.2.840.113549.1.1.13"), // sha512WithRSAEncryption
        Oid::new_unwrap("1.2.840.10045.4.3.4"),   // ecdsa-with-SHA512
    ];
    let parsed = Certificate::from_der(cert).ok()?;
    let algorithm = parsed.signature_algorithm.oid;
    let der: &[u8] = cert;
    if SHA256.contains(&algorithm) {
        Some(Sha256::digest(der).to_vec())
    } else if SHA384.contains(&algorithm) {
        Some(Sha384::digest(der).to_vec())
    } else if SHA512.contains(&algorithm) {
        Some(Sha512::digest(der).to_vec())
    } else {
        None
    }
}
