//! A throwaway PKI: a CA and server certificates for `localhost`/127.0.0.1, written as PEM
//! files in a temporary directory for `cfg.tls`, and a rustls client that trusts the CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::within;

/// CA, current server certificate files, and the directory holding them.
pub struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// Server certificate chain file.
    pub cert_file: PathBuf,
    /// Server private key file.
    pub key_file: PathBuf,
}

impl Pki {
    /// A new CA and a first server certificate named `first`.
    pub fn new(first: &str) -> (Pki, CertificateDer<'static>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "corvid test CA");
        let key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("CA cert");
        let pki = Pki {
            cert_file: dir.path().join("tls.crt"),
            key_file: dir.path().join("tls.key"),
            dir,
            ca,
        };
        let der = pki.issue(first);
        (pki, der)
    }

    /// Issues a server certificate with common name `name` and replaces the files with it
    /// (each written aside and renamed, as a Secret volume update would). Returns its DER.
    pub fn issue(&self, name: &str) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.ca).expect("server cert");
        let write = |path: &PathBuf, pem: String| {
            let tmp = self.dir.path().join(format!("{name}.tmp"));
            std::fs::write(&tmp, pem).expect("write PEM");
            std::fs::rename(&tmp, path).expect("rename PEM");
        };
        write(&self.key_file, key.serialize_pem());
        write(&self.cert_file, cert.pem() + &self.ca.pem());
        cert.der().clone()
    }

    /// A client configuration trusting only this CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("CA root");
        let provider = Arc::new(crypto::ring::default_provider());
        let cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }

    /// Opens a TLS connection to `addr` and returns it with the certificate it was shown.
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
        within("TLS handshake", async {
            let tcp = TcpStream::connect(addr).await.expect("TCP connect");
            let name = ServerName::try_from("localhost").expect("server name");
            let tls = TlsConnector::from(self.client_config())
                .connect(name, tcp)
                .await
                .expect("TLS handshake");
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .expect("server certificate")[0]
                .clone()
                .into_owned();
            (tls, cert)
        })
        .await
    }
}
