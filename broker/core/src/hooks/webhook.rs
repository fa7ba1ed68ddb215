//! One webhook's worker: takes events from its bounded queue and POSTs them as JSON, retrying
//! with exponential backoff; gives up after `max_retries`, counting and logging the loss.
//!
//! The worker also says how the endpoint is doing, whether or not events flow: every delivery
//! sets the webhook's [`Health`], and while the queue is idle the worker opens a TCP connection
//! to the endpoint every [`PROBE_INTERVAL`], so a webhook that went away is reported `down`
//! within seconds, with what happened (refused, timed out, cannot resolve), one log line per
//! change of state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use corvid_api::{WebhookState, WebhookStatus};
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{now_ms, Event};
use crate::config::WebhookConfig;
use crate::metrics::Metrics;

/// Longest pause between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an idle worker checks that its endpoint still accepts connections.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a health check's connection attempt may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a failure was seen: a connection-level one is cleared by a successful health check,
/// an HTTP answer only by a successful delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Connect,
    Http,
}

#[derive(Debug)]
struct HealthState {
    state: WebhookState,
    cause: Option<Cause>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    since: SystemTime,
}

/// One webhook's health, shared by its worker (which writes it) and the admin API.
#[derive(Debug)]
pub struct Health {
    name: String,
    url: String,
    state: Mutex<HealthState>,
    /// Events the worker holds: the one being posted or retried.
    held: AtomicU64,
    up: IntGauge,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Health {
    pub(super) fn new(name: &str, url: &str, up: IntGauge) -> Self {
        Health {
            name: name.to_string(),
            url: url.to_string(),
            state: Mutex::new(HealthState {
                state: WebhookState::Unchecked,
                cause: None,
                last_error: None,
                last_error_at: None,
                since: SystemTime::now(),
            }),
            held: AtomicU64::new(0),
            up,
        }
    }

    /// Records an observation; logs once per change of state.
    fn set(&self, state: WebhookState, failure: Option<(Cause, String)>) {
        let mut st = self.state.lock();
        if let Some((_, e)) = &failure {
            st.last_error = Some(e.clone());
            st.last_error_at = Some(SystemTime::now());
        }
        st.cause = failure.as_ref().map(|(c, _)| *c);
        if st.state == state {
            return;
        }
        st.state = state;
        st.since = SystemTime::now();
        self.up.set(i64::from(state == WebhookState::Up));
        match (&failure, state) {
            (Some((_, e)), _) => {
                tracing::warn!(webhook = %self.name, url = %self.url, state = ?state, error = %e, "webhook endpoint not healthy");
            }
            (None, _) => {
                tracing::info!(webhook = %self.name, url = %self.url, state = ?state, "webhook endpoint healthy");
            }
        }
    }

    /// A health check connected: clears a connection-level failure (not an HTTP one).
    fn probe_ok(&self) {
        let clears = {
            let st = self.state.lock();
            st.state == WebhookState::Unchecked || st.cause == Some(Cause::Connect)
        };
        if clears {
            self.set(WebhookState::Up, None);
        }
    }

    /// The status for the admin API; `queued` is the queue's length.
    pub(super) fn status(
        &self,
        queued: u64,
        delivered: u64,
        failed: u64,
        dropped: u64,
    ) -> WebhookStatus {
        let st = self.state.lock();
        WebhookStatus {
            name: self.name.clone(),
            url: self.url.clone(),
            state: st.state,
            last_error: st.last_error.clone(),
            last_error_at: st.last_error_at.map(unix),
            since: unix(st.since),
            delivered,
            failed,
            dropped,
            buffered: queued + self.held.load(Ordering::Relaxed),
        }
    }
}

/// Why a request failed, in words an operator acts on: refused, timed out, TLS, DNS — with
/// the innermost cause (reqwest's own message only names the URL).
fn describe(e: &reqwest::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    format!("{what}: {inner}")
}

#[derive(Debug)]
pub(super) struct Worker {
    name: String,
    node: String,
    url: String,
    headers: Vec<(String, String)>,
    max_retries: u32,
    client: reqwest::Client,
    rx: mpsc::Receiver<Arc<Event>>,
    delivered: IntCounter,
    failed: IntCounter,
    health: Arc<Health>,
    /// Host and port the idle health check connects to, from `url` (parsed once).
    probe_target: Option<(String, u16)>,
}

impl Worker {
    pub(super) fn new(
        cfg: &WebhookConfig,
        name: String,
        node: String,
        rx: mpsc::Receiver<Arc<Event>>,
        metrics: &Metrics,
        health: Arc<Health>,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Worker {
            delivered: metrics.webhook_delivered.with_label_values(&[&name]),
            failed: metrics.webhook_failed.with_label_values(&[&name]),
            name,
            node,
            probe_target: reqwest::Url::parse(&cfg.url).ok().and_then(|u| {
                let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
                Some((host.to_string(), u.port_or_known_default()?))
            }),
            url: cfg.url.clone(),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            max_retries: cfg.max_retries,
            client,
            rx,
            health,
        })
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let ev = tokio::select! {
                ev = self.rx.recv() => match ev { Some(ev) => ev, None => return },
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {
                    self.probe().await;
                    continue;
                }
            };
            self.health.held.store(1, Ordering::Relaxed);
            let body = ev.to_json(&self.node, now_ms());
            let mut backoff = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                match self.post(&body).await {
                    Ok(()) => {
                        self.delivered.inc();
                        self.health.set(WebhookState::Up, None);
                        break;
                    }
                    Err((state, cause, e)) => {
                        self.health.set(state, Some((cause, e.clone())));
                        if attempt >= self.max_retries {
                            self.failed.inc();
                            tracing::warn!(webhook = %self.name, event = ev.kind().name(), error = %e, attempts = attempt + 1, "webhook delivery failed; event lost");
                            break;
                        }
                        tracing::debug!(webhook = %self.name, error = %e, "webhook delivery failed; retrying");
                        attempt += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            self.health.held.store(0, Ordering::Relaxed);
        }
    }

    /// The idle health check: can a TCP connection to the endpoint be opened?
    async fn probe(&self) {
        let Some((host, port)) = &self.probe_target else {
            return;
        };
        let (host, port) = (host.as_str(), *port);
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((host, port)))
            .await
        {
            Ok(Ok(_)) => self.health.probe_ok(),
            Ok(Err(e)) => {
                let what = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                    _ => format!("cannot connect to {host}:{port}: {e}"),
                };
                self.health
                    .set(WebhookState::Down, Some((Cause::Connect, what)));
            }
            Err(_) => self.health.set(
                WebhookState::Down,
                Some((
                    Cause::Connect,
                    format!("timed out connecting to {host}:{port} after {PROBE_TIMEOUT:?}"),
                )),
            ),
        }
    }

    async fn post(&self, body: &serde_json::Value) -> Result<(), (WebhookState, Cause, String)> {
        let mut req = self.client.post(&self.url).json(body);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| (WebhookState::Down, Cause::Connect, describe(&e)))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.as_u16() == 401 || status.as_u16() == 403 {
            Err((
                WebhookState::Refused,
                Cause::Http,
                format!("refused: HTTP {}", status.as_u16()),
            ))
        } else {
            Err((
                WebhookState::Down,
                Cause::Http,
                format!("HTTP {}", status.as_u16()),
            ))
        }
    }
}
