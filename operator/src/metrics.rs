//! Prometheus metrics of the reconcile loop (count, duration, errors by reason) and the small HTTP
//! server that exposes them together with /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Reconcile metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    /// Registry served on /metrics.
    pub registry: Registry,
    /// Reconciles by outcome (success, error).
    pub reconciles: IntCounterVec,
    /// Reconcile duration in seconds.
    pub duration: HistogramVec,
    /// Reconcile errors by reason (the error variant name).
    pub errors: IntCounterVec,
}

/// Failure to set up metrics or serve them.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered.
    #[error("registering metrics: {0}")]
    Register(#[from] prometheus::Error),
    /// The HTTP listener failed.
    #[error("serving metrics: {0}")]
    Serve(#[from] std::io::Error),
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("corvid_operator_reconciles_total", "Reconciles by outcome"),
            &["outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "corvid_operator_reconcile_duration_seconds",
                "Reconcile duration",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &[],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "corvid_operator_reconcile_errors_total",
                "Reconcile errors by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            duration,
            errors,
        })
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for text output.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// State shared with the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to render.
    pub metrics: Metrics,
    /// Set once the API server answered; /readyz reports it.
    pub ready: Arc<AtomicBool>,
}

/// Serves /metrics, /healthz and /readyz on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, state: HttpState) -> Result<(), MetricsError> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<HttpState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_their_names() {
        let m = Metrics::new().expect("metrics");
        m.reconciles.with_label_values(&["success"]).inc();
        m.errors.with_label_values(&["ApplyFailed"]).inc();
        m.duration.with_label_values(&[] as &[&str]).observe(0.2);
        let text = m.render();
        assert!(text.contains("corvid_operator_reconciles_total{outcome=\"success\"} 1"));
        assert!(text.contains("corvid_operator_reconcile_errors_total{reason=\"ApplyFailed\"} 1"));
        assert!(text.contains("corvid_operator_reconcile_duration_seconds_count 1"));
    }
}
