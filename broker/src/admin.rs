//! The admin HTTP endpoint: health and readiness for Kubernetes probes, Prometheus metrics, and
//! the read-only API people and the operator use to see clients, subscriptions and routes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

use crate::broker::Broker;
use crate::session::Kick;

/// Builds the admin router: probes and metrics are open; `/api/*` needs the token when one
/// is configured.
pub fn router(broker: Arc<Broker>) -> Router {
    let api = Router::new()
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/eventstore", get(eventstore))
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/clients/{id}", get(client).delete(kick))
        .route("/api/v1/clients/{id}/kick", delete(kick).post(kick))
        .route("/api/v1/subscriptions", get(subscriptions))
        .route("/api/v1/routes", get(routes))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/bridges", get(bridges))
        .route("/api/v1/webhooks", get(webhooks))
        .route("/api/v1/evacuate", get(evacuation).post(evacuate))
        .route("/api/v1/rebalance", get(rebalance).post(rebalance_now))
        .route("/api/v1/trace", get(trace_list).post(trace_start))
        .route("/api/v1/trace/{name}", get(trace_log).delete(trace_stop))
        .route_layer(axum::middleware::from_fn_with_state(
            broker.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(broker)
}

/// Refuses `/api/*` requests without the configured bearer token.
async fn require_token(
    State(b): State<Arc<Broker>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorized(&b, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => r,
    }
}

/// Serves the admin API on `listener` until shutdown.
pub async fn serve(broker: Arc<Broker>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let shutdown = broker.shutdown.clone();
    axum::serve(listener, router(broker))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(b): State<Arc<Broker>>) -> Response {
    if !b.accepting.load(Ordering::Relaxed) || b.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not accepting connections\n",
        )
            .into_response();
    }
    if let Some(c) = b.cluster.get() {
        if !c.synced() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: joining the cluster\n",
            )
                .into_response();
        }
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// Every webhook's health (last delivery or idle check), last error and counters.
async fn webhooks(State(b): State<Arc<Broker>>) -> Json<Value> {
    Json(json!({ "node": b.node, "webhooks": b.hooks.webhook_status() }))
}

/// Every bridge's state, last error and counters.
async fn bridges(State(b): State<Arc<Broker>>) -> Json<Value> {
    Json(json!({ "bridges": b.bridges.status() }))
}

async fn cluster(State(b): State<Arc<Broker>>) -> Response {
    match b.cluster.get() {
        Some(c) => Json(json!({ "node": b.node, "synced": c.synced(), "members": c.members() }))
            .into_response(),
        None => Json(json!({
            "node": b.node,
            "synced": true,
            "members": [{
                "name": b.node, "state": "self", "routes": b.router.filters().len(),
                "addr": null, "linked": true,
            }],
        }))
        .into_response(),
    }
}

/// Options of `POST /api/v1/evacuate`.
#[derive(Debug, Default, Deserialize)]
struct EvacuateOptions {
    /// Clients moved per second.
    rate: Option<u32>,
    /// Server reference sent with MQTT 5 DISCONNECT 0x9C.
    server_reference: Option<String>,
}

fn single_node_evacuation(b: &Broker) -> Value {
    let state = if b.accepting.load(Ordering::Relaxed) {
        "idle"
    } else {
        "done"
    };
    json!({
        "state": state,
        "remaining_clients": b.metrics.connections.get(),
        "remaining_sessions": b.sessions.len(),
        "handed_off": 0,
    })
}

async fn evacuate(State(b): State<Arc<Broker>>, Query(o): Query<EvacuateOptions>) -> Response {
    let rate = o.rate.unwrap_or(100);
    if let Some(r) = &o.server_reference {
        let member = b.cluster.get().is_some_and(|c| c.is_member_mqtt_addr(r));
        if !member && !b.config.admin.server_references.iter().any(|a| a == r) {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!(
                    "server_reference {r:?} is neither a cluster member's MQTT address nor in \
                     admin.server_references"
                )})),
            )
                .into_response();
        }
    }
    match b.cluster.get() {
        Some(c) => {
            c.evacuate(rate, o.server_reference);
            (StatusCode::ACCEPTED, Json(json!(c.evacuation()))).into_response()
        }
        None => {
            // A single node has nowhere to send clients: it stops accepting and reports.
            b.accepting.store(false, Ordering::Relaxed);
            (StatusCode::ACCEPTED, Json(single_node_evacuation(&b))).into_response()
        }
    }
}

async fn evacuation(State(b): State<Arc<Broker>>) -> Response {
    match b.cluster.get() {
        Some(c) => Json(json!(c.evacuation())).into_response(),
        None => Json(single_node_evacuation(&b)).into_response(),
    }
}

/// Options of `POST /api/v1/rebalance`.
#[derive(Debug, Default, Deserialize)]
struct RebalanceOptions {
    /// Clients moved per second (default `cluster.rebalance.rate`).
    rate: Option<u32>,
}

/// One balance check now; the operator calls it on the old pods after a scale-up.
async fn rebalance_now(
    State(b): State<Arc<Broker>>,
    Query(o): Query<RebalanceOptions>,
) -> Response {
    match b.cluster.get() {
        Some(c) => {
            c.rebalance_now(o.rate);
            tracing::info!(rate = ?o.rate, "rebalance check requested through the admin API");
            (StatusCode::ACCEPTED, Json(json!(c.rebalance_status()))).into_response()
        }
        None => (
            StatusCode::CONFLICT,
            Json(json!({"error": "not clustered: nothing to rebalance"})),
        )
            .into_response(),
    }
}

async fn rebalance(State(b): State<Arc<Broker>>) -> Response {
    match b.cluster.get() {
        Some(c) => Json(json!(c.rebalance_status())).into_response(),
        None => Json(json!({
            "enabled": b.config.cluster.rebalance.enabled,
            "rate": b.config.cluster.rebalance.rate,
            "state": "idle",
            "connections": b.metrics.connections.get(),
        }))
        .into_response(),
    }
}

async fn metrics(State(b): State<Arc<Broker>>) -> Response {
    b.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        b.metrics.render(),
    )
        .into_response()
}

/// Header carrying the admin token where `Authorization` cannot: the Kubernetes API server's
/// pod proxy strips `Authorization` before it forwards a request to the pod.
pub const TOKEN_HEADER: &str = "x-corvid-admin-token";

/// Reads the admin token from `file`: its trimmed content, which must not be empty.
pub fn read_token(file: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", file.display()));
    }
    Ok(token.to_string())
}

/// Compares two tokens in time independent of where they differ (and of their lengths: both
/// are hashed first).
fn tokens_match(given: &str, expected: &str) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let a = sha2::Sha256::digest(given.as_bytes());
    let b = sha2::Sha256::digest(expected.as_bytes());
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

/// The token a request presents: `Authorization: Bearer T` or the [`TOKEN_HEADER`].
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

#[allow(clippy::result_large_err)] // an axum Response is the natural error of a handler guard
fn authorized(b: &Broker, headers: &HeaderMap) -> Result<(), Response> {
    let Some(file) = &b.config.admin.token_file else {
        // Without a token the endpoint only listens on loopback (`AdminConfig::listen_addr`).
        return Ok(());
    };
    let ok = match (read_token(file), presented_token(headers)) {
        (Ok(expected), Some(given)) => tokens_match(given, &expected),
        (Err(e), _) => {
            tracing::warn!(error = %e, "admin token unreadable: refusing /api requests");
            false
        }
        (Ok(_), None) => false,
    };
    if ok {
        Ok(())
    } else {
        b.metrics.admin_unauthorized.inc();
        Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong bearer token"})),
        )
            .into_response())
    }
}

async fn stats(State(b): State<Arc<Broker>>) -> Response {
    b.refresh_gauges();
    let m = &b.metrics;
    Json(json!({
        "node": b.node,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": b.started.elapsed().as_secs(),
        "connections": m.connections.get(),
        "sessions": m.sessions.get(),
        "subscriptions": m.subscriptions.get(),
        "routes": m.routes.get(),
        "retained": m.retained.get(),
        "queued": m.queued.get(),
        "inflight": m.inflight.get(),
        "messages_received": (0..3).map(|q| m.messages_received.at(q).get()).sum::<u64>(),
        "messages_sent": (0..3).map(|q| m.messages_sent.at(q).get()).sum::<u64>(),
    }))
    .into_response()
}

/// The event store's sinks: state, last error, counters.
async fn eventstore(State(b): State<Arc<Broker>>) -> Response {
    let sinks = b.event_store.report();
    Json(json!({ "node": b.node, "enabled": b.event_store.enabled(), "sinks": sinks }))
        .into_response()
}

/// Filters for the client list.
#[derive(Debug, Deserialize)]
struct ClientFilter {
    /// Substring of the client id.
    like: Option<String>,
    /// Only connected (`true`) or only offline (`false`) sessions.
    connected: Option<bool>,
    /// Exact user name.
    username: Option<String>,
    /// Page size.
    limit: Option<usize>,
}

fn client_json(s: &crate::session::Session) -> Value {
    let st = s.state.lock();
    json!({
        "client_id": &*s.client_id,
        "connected": st.connection.is_some(),
        "connection": st.connection,
        "subscriptions": st.subscriptions.len(),
        "queued": st.queue.len(),
        "inflight": st.inflight.len(),
        "dropped": st.dropped,
        "session_expiry": st.expiry,
    })
}

async fn clients(State(b): State<Arc<Broker>>, Query(f): Query<ClientFilter>) -> Response {
    let mut all = b.sessions.all();
    all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    let list: Vec<Value> = all
        .iter()
        .filter(|s| {
            f.like
                .as_ref()
                .is_none_or(|l| s.client_id.contains(l.as_str()))
        })
        .filter(|s| {
            let st = s.state.lock();
            f.connected.is_none_or(|c| st.connection.is_some() == c)
                && f.username.as_ref().is_none_or(|u| {
                    st.connection.as_ref().and_then(|c| c.username.as_ref()) == Some(u)
                })
        })
        .take(f.limit.unwrap_or(1000))
        .map(|s| client_json(s))
        .collect();
    Json(json!({ "count": list.len(), "clients": list })).into_response()
}

async fn client(State(b): State<Arc<Broker>>, Path(id): Path<String>) -> Response {
    match b.sessions.get(&id) {
        Some(s) => {
            let mut v = client_json(&s);
            let subs: Vec<Value> = s
                .state
                .lock()
                .subscriptions
                .iter()
                .map(|(f, sub)| json!({"filter": f, "qos": sub.opts.qos.value()}))
                .collect();
            v["subscription_list"] = Value::Array(subs);
            Json(v).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no client {id}")})),
        )
            .into_response(),
    }
}

async fn kick(State(b): State<Arc<Broker>>, Path(id): Path<String>) -> Response {
    let Some(s) = b.sessions.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no client {id}")})),
        )
            .into_response();
    };
    let conn = s.state.lock().connection.clone();
    match conn {
        Some(c) => {
            c.kick.send(Kick::Administrative);
            Json(json!({"kicked": id})).into_response()
        }
        None => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("client {id} is not connected")})),
        )
            .into_response(),
    }
}

async fn subscriptions(State(b): State<Arc<Broker>>) -> Response {
    let mut out = Vec::new();
    for s in b.sessions.all() {
        let st = s.state.lock();
        for (f, sub) in &st.subscriptions {
            out.push(json!({
                "client_id": &*s.client_id,
                "filter": f,
                "qos": sub.opts.qos.value(),
                "no_local": sub.opts.no_local,
                "retain_as_published": sub.opts.retain_as_published,
                "subscription_id": sub.sub_id.map(|i| i.get()),
            }));
        }
    }
    Json(json!({"count": out.len(), "subscriptions": out})).into_response()
}

async fn routes(State(b): State<Arc<Broker>>) -> Response {
    let mut filters = b.router.filters();
    filters.sort();
    let list: Vec<Value> = filters
        .iter()
        .map(|f| json!({"filter": f, "node": b.node}))
        .collect();
    Json(json!({"count": list.len(), "routes": list})).into_response()
}

/// `POST /api/v1/trace` body.
#[derive(Debug, Deserialize)]
struct TraceRequest {
    /// `client` or `topic`.
    #[serde(rename = "type")]
    kind: String,
    /// Client id (type `client`).
    client_id: Option<String>,
    /// Topic filter (type `topic`).
    topic: Option<String>,
    /// Seconds; default 600, capped by `trace.max_duration`.
    duration: Option<u64>,
    /// Name; default `client-{id}` / `topic-{filter}`.
    name: Option<String>,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

async fn trace_start(State(b): State<Arc<Broker>>, Json(req): Json<TraceRequest>) -> Response {
    use crate::trace::{Target, TraceError};
    let target = match (req.kind.as_str(), req.client_id, req.topic) {
        ("client", Some(c), _) if !c.is_empty() => Target::Client(c),
        ("topic", _, Some(t)) if !t.is_empty() => Target::Topic(t),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "expected {\"type\": \"client\", \"client_id\": ...} or {\"type\": \"topic\", \"topic\": ...}",
            )
        }
    };
    let duration = Duration::from_secs(req.duration.unwrap_or(600));
    match b.tracer.start(req.name, target, duration) {
        Ok(info) => (StatusCode::CREATED, Json(json!(info))).into_response(),
        Err(e @ TraceError::Exists(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ TraceError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn trace_list(State(b): State<Arc<Broker>>) -> Response {
    let list = b.tracer.list();
    Json(json!({"count": list.len(), "traces": list})).into_response()
}

async fn trace_stop(State(b): State<Arc<Broker>>, Path(name): Path<String>) -> Response {
    match b.tracer.stop(&name) {
        Some(info) => Json(json!(info)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no trace {name}")),
    }
}

/// The log of a running trace, as plain text.
async fn trace_log(State(b): State<Arc<Broker>>, Path(name): Path<String>) -> Response {
    let Some(t) = b.tracer.list().into_iter().find(|t| t.name == name) else {
        return error(StatusCode::NOT_FOUND, format!("no trace {name}"));
    };
    match tokio::fs::read_to_string(&t.file).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain")], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
