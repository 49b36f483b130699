//! Certificates for TLS tests, made with rcgen, and PostgreSQL clusters that speak TLS
//! with them: one CA (and another one, to be refused) and a certificate for pgmux, written
//! once per test binary to a directory pgmux reads them from.

use std::path::PathBuf;
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::sync::OnceCell;

use super::{PgSsl, TestPostgres};

/// A CA and what it signs, as PEM.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `name`.
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

    /// The CA's own certificate.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (host names or IP addresses): (cert PEM, key PEM).
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

/// The certificates of this test binary: `ca.crt`, `other_ca.crt` (a CA that signed
/// nothing here) and `pgmux.crt` / `pgmux.key` (CN pgmux, from `ca`), in `dir`.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Certs {
    /// Made at the first call, then shared by the binary's tests.
    pub fn get() -> &'static Certs {
        static CERTS: OnceLock<Certs> = OnceLock::new();
        CERTS.get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("pgmux-tls-")
                .tempdir()
                .unwrap()
                .keep();
            let ca = Ca::new("pgmux test CA");
            std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
            let other = Ca::new("some other CA");
            std::fs::write(dir.join("other_ca.crt"), other.pem()).unwrap();
            let (cert, key) = ca.issue("pgmux", &["pgmux"]);
            std::fs::write(dir.join("pgmux.crt"), cert).unwrap();
            std::fs::write(dir.join("pgmux.key"), key).unwrap();
            Certs { dir, ca }
        })
    }

    /// The path of file `name` in [`Certs::dir`], for a config.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A cluster with `ssl = on` for 127.0.0.1 and localhost; TCP only with TLS (`hostssl`).
/// One per test binary.
pub async fn tls_cluster() -> &'static TestPostgres {
    static PG: OnceCell<TestPostgres> = OnceCell::const_new();
    PG.get_or_init(|| async {
        let (cert_pem, key_pem) = Certs::get()
            .ca
            .issue("localhost", &["localhost", "127.0.0.1"]);
        TestPostgres::start_with_ssl(PgSsl {
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
/// client certificates required (`clientcert=verify-ca`) from [`Certs`]' CA.
pub async fn mutual_cluster() -> &'static TestPostgres {
    static PG: OnceCell<TestPostgres> = OnceCell::const_new();
    PG.get_or_init(|| async {
        let certs = Certs::get();
        let (cert_pem, key_pem) = certs.ca.issue("db.example.test", &["db.example.test"]);
        TestPostgres::start_with_ssl(PgSsl {
            cert_pem,
            key_pem,
            hostssl_only: true,
            client_ca_pem: Some(certs.ca.pem()),
        })
        .await
    })
    .await
}
