//! TLS for tests: a certificate authority made with rcgen, a tokio-postgres TLS
//! connector over tokio-rustls (tokio-postgres ships none), with the
//! `tls-server-end-point` channel binding SCRAM-SHA-256-PLUS needs, and PostgreSQL clusters
//! that speak TLS to pgmux (`server_tls`) with certificates of [`ServerCerts`].

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// A CA and what it signed, as PEM.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (host names or IP addresses) with this common name:
    /// (cert PEM, key PEM).
    pub fn issue(&self, common_name: &str, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A directory for certificate files, kept for the life of the test binary.
pub fn cert_dir(prefix: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap()
        .keep()
}

/// What channel binding data the connector hands tokio-postgres.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// SHA-256 of the server's certificate (right for the certificates rcgen makes).
    Real,
    /// Data that matches no certificate: a man in the middle's view.
    Wrong,
    /// None: tokio-postgres then never picks SCRAM-SHA-256-PLUS.
    Off,
}

/// A tokio-postgres TLS connector over rustls. Records the certificates servers showed.
#[derive(Clone)]
pub struct Rustls {
    config: Arc<ClientConfig>,
    binding: Binding,
    /// The leaf certificate of every handshake, in order.
    pub seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Rustls {
    /// Verifies the server against `ca_pem` (name included), with ALPN `postgresql`.
    pub fn verifying(ca_pem: &str) -> Rustls {
        Self::build(ca_pem, None, true)
    }

    /// As [`Rustls::verifying`], presenting a client certificate.
    pub fn with_client_cert(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Rustls {
        Self::build(ca_pem, Some((cert_pem, key_pem)), true)
    }

    /// As [`Rustls::verifying`], offering no ALPN.
    pub fn without_alpn(ca_pem: &str) -> Rustls {
        Self::build(ca_pem, None, false)
    }

    /// The same connector with this channel binding.
    pub fn binding(mut self, binding: Binding) -> Rustls {
        self.binding = binding;
        self
    }

    /// The rustls configuration, for raw TLS connections.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    fn build(ca_pem: &str, client: Option<(&str, &str)>, alpn: bool) -> Rustls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        if alpn {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        Rustls {
            config: Arc::new(config),
            binding: Binding::Real,
            seen: Arc::default(),
        }
    }
}

impl<S> MakeTlsConnect<S> for Rustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect {
            rustls: self.clone(),
            name,
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnect {
    rustls: Rustls,
    name: ServerName<'static>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.rustls.config.clone());
            let tls = connector.connect(self.name, stream).await?;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .unwrap_or_default();
            self.rustls.seen.lock().unwrap().push(leaf.clone());
            let binding = match self.rustls.binding {
                Binding::Real => Some(Sha256::digest(&leaf).to_vec()),
                Binding::Wrong => Some(vec![0u8; 32]),
                Binding::Off => None,
            };
            Ok(RustlsStream { tls, binding })
        })
    }
}

/// A TLS stream tokio-postgres reads and writes.
pub struct RustlsStream<S> {
    tls: tokio_rustls::client::TlsStream<S>,
    binding: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.binding {
            Some(data) => ChannelBinding::tls_server_end_point(data.clone()),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The certificates for TLS between pgmux and PostgreSQL, in a directory pgmux reads them
/// from: `ca.crt`, `other_ca.crt` (a CA that signed nothing here) and `pgmux.crt` /
/// `pgmux.key` (CN pgmux, from `ca`). Made at the first call, then shared by the binary's
/// tests.
pub struct ServerCerts {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl ServerCerts {
    pub fn get() -> &'static ServerCerts {
        static CERTS: std::sync::OnceLock<ServerCerts> = std::sync::OnceLock::new();
        CERTS.get_or_init(|| {
            let dir = cert_dir("pgmux-tls-");
            let ca = Ca::new("pgmux test CA");
            std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
            let other = Ca::new("some other CA");
            std::fs::write(dir.join("other_ca.crt"), other.pem()).unwrap();
            let (cert, key) = ca.issue("pgmux", &["pgmux"]);
            std::fs::write(dir.join("pgmux.crt"), cert).unwrap();
            std::fs::write(dir.join("pgmux.key"), key).unwrap();
            ServerCerts { dir, ca }
        })
    }

    /// The path of file `name` in [`ServerCerts::dir`], for a config.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A cluster with `ssl = on` for 127.0.0.1 and localhost; TCP only with TLS (`hostssl`).
/// One per test binary.
pub async fn tls_cluster() -> &'static super::TestPostgres {
    static PG: tokio::sync::OnceCell<super::TestPostgres> = tokio::sync::OnceCell::const_new();
    PG.get_or_init(|| async {
        let (cert_pem, key_pem) = ServerCerts::get()
            .ca
            .issue("localhost", &["localhost", "127.0.0.1"]);
        super::TestPostgres::start_with_ssl(super::PgSsl {
            cert_pem,
            key_pem,
            hostssl_only: true,
            client_ca_pem: None,
        })
        .await
    })
    .await
}

/// A cluster with `ssl = on`, a certificate for another name only (db.example.test), and
/// client certificates required (`clientcert=verify-ca`) from [`ServerCerts`]' CA.
pub async fn mutual_cluster() -> &'static super::TestPostgres {
    static PG: tokio::sync::OnceCell<super::TestPostgres> = tokio::sync::OnceCell::const_new();
    PG.get_or_init(|| async {
        let certs = ServerCerts::get();
        let (cert_pem, key_pem) = certs.ca.issue("db.example.test", &["db.example.test"]);
        super::TestPostgres::start_with_ssl(super::PgSsl {
            cert_pem,
            key_pem,
            hostssl_only: true,
            client_ca_pem: Some(certs.ca.pem()),
        })
        .await
    })
    .await
}
