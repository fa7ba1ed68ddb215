//! Finding peers: a static list, DNS of a headless Service (re-resolved every 2 s, because
//! gossip alone re-resolves its seeds only once a minute and a pod that starts before its peers'
//! records exist would stay alone that long),
//! or the EndpointSlices of the headless Service read from the Kubernetes API with the pod's
//! service-account token. Not-ready endpoints count too, so a starting pod can sync before it
//! is marked Ready.
//!
//! RBAC needed for `kubernetes`: `get`, `list` on `endpointslices.discovery.k8s.io` in the
//! pod's namespace.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::{Cluster, ClusterError};
use crate::config::{ClusterConfig, Discovery};

/// Seeds handed to gossip at start.
pub fn seeds(cfg: &ClusterConfig, port: u16) -> Result<Vec<String>, ClusterError> {
    match cfg.discovery {
        Discovery::None => Ok(Vec::new()),
        Discovery::Static => {
            if cfg.peers.is_empty() {
                return Err(ClusterError::Discovery(
                    "static discovery needs cluster.peers (--peers)".into(),
                ));
            }
            Ok(cfg.peers.clone())
        }
        Discovery::Dns => match &cfg.dns_name {
            Some(n) if n.contains(':') => Ok(vec![n.clone()]),
            Some(n) => Ok(vec![format!("{n}:{port}")]),
            None => Err(ClusterError::Discovery(
                "dns discovery needs cluster.dns_name (--dns-name)".into(),
            )),
        },
        Discovery::Kubernetes => Ok(Vec::new()),
    }
}

#[derive(Debug, Deserialize)]
struct SliceList {
    #[serde(default)]
    items: Vec<Slice>,
}

#[derive(Debug, Deserialize)]
struct Slice {
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
struct Endpoint {
    #[serde(default)]
    addresses: Vec<String>,
}

/// Polls the headless Service's EndpointSlices and introduces every address to gossip.
pub async fn kubernetes_loop(cluster: Arc<Cluster>, cfg: ClusterConfig, port: u16) {
    let k = &cfg.kubernetes;
    let namespace = k
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| std::fs::read_to_string(format!("{SA_DIR}/namespace")).ok())
        .unwrap_or_else(|| "default".into());
    let Some(service) = k.service.clone() else {
        tracing::error!(
            "kubernetes discovery needs cluster.kubernetes.service (the headless Service)"
        );
        return;
    };
    let api = k.api_url.clone().unwrap_or_else(|| {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .unwrap_or_else(|_| "kubernetes.default.svc".into());
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        }
    });
    let path = format!(
        "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{service}"
    );
    let mut logged_error = false;
    loop {
        match list(&api, &path, k.token_file.as_deref(), k.ca_file.as_deref()).await {
            Ok(addrs) => {
                logged_error = false;
                for ip in addrs {
                    cluster.gossip_with(SocketAddr::new(ip, port));
                }
            }
            Err(e) if !logged_error => {
                tracing::warn!(error = %e, api = %api, "kubernetes discovery failed; retrying");
                logged_error = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            _ = cluster.shutdown.cancelled() => return,
        }
    }
}

/// Resolves the headless Service's name every 2 s and introduces every address to gossip.
pub async fn dns_loop(cluster: Arc<Cluster>, name: String, port: u16) {
    let target = if name.contains(':') {
        name
    } else {
        format!("{name}:{port}")
    };
    let mut logged_error = false;
    loop {
        match tokio::net::lookup_host(target.as_str()).await {
            Ok(addrs) => {
                logged_error = false;
                for addr in addrs {
                    cluster.gossip_with(addr);
                }
            }
            // Expected while the Service has no endpoints yet; said once, not every round.
            Err(e) if !logged_error => {
                tracing::info!(error = %e, name = %target, "dns discovery: no records yet; retrying");
                logged_error = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = cluster.shutdown.cancelled() => return,
        }
    }
}

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

async fn list(
    api: &str,
    path: &str,
    token_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
) -> Result<Vec<IpAddr>, String> {
    let token_path = token_file
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| format!("{SA_DIR}/token").into());
    let ca_path = ca_file
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| format!("{SA_DIR}/ca.crt").into());
    let token = std::fs::read_to_string(&token_path)
        .map_err(|e| format!("{}: {e}", token_path.display()))?;
    let rest = api
        .strip_prefix("https://")
        .ok_or("cluster.kubernetes.api_url must be https://")?;
    let hostport = rest.trim_end_matches('/');
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse::<u16>().map_err(|e| e.to_string())?,
        ),
        None => (hostport.to_string(), 443),
    };
    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(&ca_path).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let tls = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timeout".to_string())?
    .map_err(|e| e.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        token.trim()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut body))
        .await
        .map_err(|_| "read timeout".to_string())?
        .or_else(|e| {
            if body.is_empty() {
                Err(e.to_string())
            } else {
                Ok(0)
            }
        })?;
    let text = String::from_utf8_lossy(&body);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "HTTP {status}: {}",
            payload.chars().take(200).collect::<String>()
        ));
    }
    let json = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload)
    } else {
        payload.to_string()
    };
    let list: SliceList = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .flat_map(|s| s.endpoints)
        .flat_map(|e| e.addresses)
        .filter_map(|a| a.parse().ok())
        .collect())
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn seeds_per_method() {
        let mut c = ClusterConfig {
            discovery: Discovery::Dns,
            dns_name: Some("corvid-headless".into()),
            ..Default::default()
        };
        assert_eq!(
            seeds(&c, 4370).ok(),
            Some(vec!["corvid-headless:4370".to_string()])
        );
        c.discovery = Discovery::Static;
        assert!(seeds(&c, 4370).is_err());
        c.peers = vec!["10.0.0.2:4370".into()];
        assert_eq!(
            seeds(&c, 4370).ok(),
            Some(vec!["10.0.0.2:4370".to_string()])
        );
    }
}
