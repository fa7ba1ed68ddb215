//! TLS for the `mqtts`/`wss` listeners, from PEM files that are re-read when they change, so a
//! renewed certificate (cert-manager rotating a projected Secret) is served without a restart.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::metrics::Metrics;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file holds no usable PEM item.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was missing.
        what: &'static str,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// A TLS acceptor that follows its certificate files.
#[derive(Clone)]
pub struct ReloadingAcceptor {
    current: Arc<RwLock<TlsAcceptor>>,
}

impl std::fmt::Debug for ReloadingAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadingAcceptor")
    }
}

impl ReloadingAcceptor {
    /// Loads the files now and spawns a watcher that reloads them when their modification
    /// time changes (checked every `interval`). A broken new file keeps the old certificate.
    pub fn start(cfg: &TlsConfig, interval: Duration, metrics: Metrics) -> Result<Self, TlsError> {
        let acceptor = load(cfg)?;
        let me = ReloadingAcceptor {
            current: Arc::new(RwLock::new(acceptor)),
        };
        let watch = me.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let mut seen = stamp(&cfg);
            loop {
                tokio::time::sleep(interval).await;
                let now = stamp(&cfg);
                if now == seen {
                    continue;
                }
                match load(&cfg) {
                    Ok(a) => {
                        *watch.current.write() = a;
                        seen = now;
                        metrics.tls_reloads.inc();
                        tracing::info!(cert = %cfg.cert_file.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        // Files may be mid-rotation; try again next tick.
                        tracing::warn!(error = %e, "TLS certificate changed but cannot be loaded yet");
                    }
                }
            }
        });
        Ok(me)
    }

    /// The acceptor for the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().clone()
    }
}

fn stamp(cfg: &TlsConfig) -> Vec<Option<SystemTime>> {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut v = vec![mtime(&cfg.cert_file), mtime(&cfg.key_file)];
    if let Some(ca) = &cfg.ca_file {
        v.push(mtime(ca));
    }
    v
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found",
        });
    }
    Ok(certs)
}

fn load(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(&cfg.cert_file)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut open(&cfg.key_file)?)
        .map_err(|source| TlsError::Read {
            path: cfg.key_file.clone(),
            source,
        })?
        .ok_or(TlsError::Pem {
            path: cfg.key_file.clone(),
            what: "no private key found",
        })?;
    let builder = ServerConfig::builder();
    let builder = match &cfg.ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| TlsError::Rustls(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
