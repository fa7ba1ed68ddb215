//! One webhook's worker: takes events from its bounded queue and POSTs them as JSON, retrying
//! with exponential backoff; gives up after `max_retries`, counting and logging the loss.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{now_ms, Event};
use crate::config::WebhookConfig;
use crate::metrics::Metrics;

/// Longest pause between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
}

impl Worker {
    pub(super) fn new(
        cfg: &WebhookConfig,
        name: String,
        node: String,
        rx: mpsc::Receiver<Arc<Event>>,
        metrics: &Metrics,
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
            url: cfg.url.clone(),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            max_retries: cfg.max_retries,
            client,
            rx,
        })
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let ev = tokio::select! {
                ev = self.rx.recv() => match ev { Some(ev) => ev, None => return },
                _ = shutdown.cancelled() => return,
            };
            let body = ev.to_json(&self.node, now_ms());
            let mut backoff = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                match self.post(&body).await {
                    Ok(()) => {
                        self.delivered.inc();
                        break;
                    }
                    Err(e) if attempt >= self.max_retries => {
                        self.failed.inc();
                        tracing::warn!(webhook = %self.name, event = ev.kind().name(), error = %e, attempts = attempt + 1, "webhook delivery failed; event lost");
                        break;
                    }
                    Err(e) => {
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
        }
    }

    async fn post(&self, body: &serde_json::Value) -> Result<(), String> {
        let mut req = self.client.post(&self.url).json(body);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", resp.status().as_u16()))
        }
    }
}
