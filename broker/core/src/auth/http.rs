//! The HTTP authentication backend: one JSON POST per CONNECT (client id, user name,
//! password, peer address), answered with allow / deny / ignore and optional ACL rules.
//! Fail-closed by default; decisions are cached briefly per (client id, user, password hash)
//! so a reconnect storm does not become a storm on the backend.
//!
//! Answer: HTTP 2xx with `{"result": "allow"|"deny"|"ignore", "acl": [rules]}`; 401/403 mean
//! deny; anything else (other statuses, timeouts, connection errors, a body that does not
//! parse, a 2xx without `result` — an empty body included) is a backend error, which refuses
//! the client unless `fail_open`: only an explicit `allow` admits anyone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

use super::{AuthError, ConnectCtx, Refusal, Verdict};
use crate::acl::Rule;
use crate::config::{AclRule, HttpAuthConfig};

/// Cache entries kept at most; expired ones are swept when it fills.
const CACHE_MAX: usize = 10_000;

/// Why the backend gave no decision.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Timeout, connection refused, TLS failure...
    #[error("request failed: {0}")]
    Request(String),
    /// A status that is neither success nor refusal.
    #[error("backend answered HTTP {0}")]
    Status(u16),
    /// The body is not the expected JSON.
    #[error("bad answer: {0}")]
    Body(String),
}

#[derive(Debug, Deserialize)]
struct Answer {
    result: Option<String>,
    #[serde(default)]
    acl: Vec<AclRule>,
}

type Key = (String, Option<String>, [u8; 32]);

/// The backend client with its decision cache.
#[derive(Debug)]
pub struct HttpBackend {
    client: reqwest::Client,
    url: String,
    headers: Vec<(String, String)>,
    ttl: Duration,
    fail_open: bool,
    cache: Mutex<HashMap<Key, (Instant, Verdict)>>,
}

impl HttpBackend {
    /// Builds the client from `auth.http`.
    pub fn new(cfg: &HttpAuthConfig) -> Result<Self, AuthError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
            .build()
            .map_err(|e| AuthError::Http(e.to_string()))?;
        Ok(HttpBackend {
            client,
            url: cfg.url.clone(),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ttl: Duration::from_secs(cfg.cache_ttl),
            fail_open: cfg.fail_open,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether an unreachable backend admits clients.
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// Asks the backend (or the cache).
    pub(crate) async fn ask(&self, ctx: &ConnectCtx<'_>) -> Result<Verdict, BackendError> {
        let key: Key = (
            ctx.client_id.to_string(),
            ctx.username.map(str::to_string),
            sha256(ctx.password.unwrap_or_default()),
        );
        if !self.ttl.is_zero() {
            if let Some((at, v)) = self.cache.lock().get(&key) {
                if at.elapsed() < self.ttl {
                    return Ok(v.clone());
                }
            }
        }
        let v = self.post(ctx).await?;
        if !self.ttl.is_zero() {
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_MAX {
                let ttl = self.ttl;
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now(), v.clone()));
        }
        Ok(v)
    }

    async fn post(&self, ctx: &ConnectCtx<'_>) -> Result<Verdict, BackendError> {
        let body = serde_json::json!({
            "client_id": ctx.client_id,
            "username": ctx.username,
            "password": ctx.password.map(|p| String::from_utf8_lossy(p).into_owned()),
            "peer_addr": ctx.peer.to_string(),
            "peer_host": ctx.peer.ip().to_string(),
            "protocol": ctx.protocol,
        });
        let mut req = self.client.post(&self.url).json(&body);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| BackendError::Request(e.to_string()))?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => {}
            401 | 403 => return Ok(Verdict::Deny(refusal(ctx))),
            s => return Err(BackendError::Status(s)),
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| BackendError::Request(e.to_string()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(BackendError::Body(format!(
                "HTTP {status} with an empty body"
            )));
        }
        let a: Answer =
            serde_json::from_slice(&bytes).map_err(|e| BackendError::Body(e.to_string()))?;
        let Some(result) = a.result else {
            return Err(BackendError::Body(format!(
                "HTTP {status} without `result`"
            )));
        };
        match result.as_str() {
            "allow" => {
                let rules = a
                    .acl
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Rule::compile(i, r))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| BackendError::Body(format!("acl {e}")))?;
                Ok(Verdict::Allow(rules))
            }
            "deny" => Ok(Verdict::Deny(refusal(ctx))),
            "ignore" => Ok(Verdict::Ignore),
            other => Err(BackendError::Body(format!("unknown result {other:?}"))),
        }
    }
}

/// A refusal by the backend: bad credentials when the client sent some, else not authorized.
fn refusal(ctx: &ConnectCtx<'_>) -> Refusal {
    if ctx.username.is_some() || ctx.password.is_some() {
        Refusal::BadCredentials
    } else {
        Refusal::NotAuthorized
    }
}

/// SHA-256 of the password: the cache never holds passwords.
fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
