//! The admin HTTP endpoint: health and readiness for Kubernetes probes, Prometheus metrics, and
//! the read-only API people and the operator use to see clients, subscriptions and routes.
//! Every `/api/*` body is a type of `corvid-api`, the crate `ctl`, the operator and e2e read
//! the same answers with.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use corvid_api::{
    BridgeList, ClientDetail, ClientFilter, ClientInfo, ClientList, ClientSubscription,
    ClusterView, ErrorBody, EvacuateOptions, EvacuationState, EvacuationStatus, EventStoreStatus,
    Kicked, Member, MemberState, RebalanceOptions, RebalanceState, RebalanceStatus, Route,
    RouteList, Stats, SubscriptionInfo, SubscriptionList, TraceKind, TraceList, TraceRequest,
};
use std::time::Duration;

use crate::broker::Broker;
use crate::server::Server;
use crate::session::Kick;

/// Builds the admin router: probes and metrics are open; `/api/*` needs the token when one
/// is configured.
pub fn router(broker: Arc<Server>) -> Router {
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
    State(b): State<Arc<Server>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorized(&b, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => r,
    }
}

/// Serves the admin API on `listener` until shutdown.
pub async fn serve(broker: Arc<Server>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let shutdown = broker.shutdown.clone();
    axum::serve(listener, router(broker))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(b): State<Arc<Server>>) -> Response {
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
async fn webhooks(State(b): State<Arc<Server>>) -> Json<corvid_api::WebhookList> {
    Json(corvid_api::WebhookList {
        node: b.node.clone(),
        webhooks: b.hooks.webhook_status(),
    })
}

/// Every bridge's state, last error and counters.
async fn bridges(State(b): State<Arc<Server>>) -> Json<BridgeList> {
    Json(BridgeList {
        bridges: b.bridges.status(),
    })
}

async fn cluster(State(b): State<Arc<Server>>) -> Json<ClusterView> {
    Json(match b.cluster.get() {
        Some(c) => ClusterView {
            node: b.node.clone(),
            synced: c.synced(),
            members: c.members(),
            keyring: Some(c.keyring_view()),
        },
        None => ClusterView {
            node: b.node.clone(),
            synced: true,
            members: vec![Member {
                name: b.node.clone(),
                state: MemberState::Itself,
                routes: b.router.filters().len() as u64,
                addr: None,
                linked: true,
            }],
            keyring: None,
        },
    })
}

/// A gauge as a count for the API (never negative).
fn count(gauge: i64) -> u64 {
    gauge.max(0) as u64
}

fn single_node_evacuation(b: &Broker) -> EvacuationStatus {
    let state = if b.accepting.load(Ordering::Relaxed) {
        EvacuationState::Idle
    } else {
        EvacuationState::Done
    };
    EvacuationStatus {
        state,
        remaining_clients: count(b.metrics.connections.get()),
        remaining_sessions: b.sessions.len() as u64,
        handed_off: 0,
    }
}

async fn evacuate(State(b): State<Arc<Server>>, Query(o): Query<EvacuateOptions>) -> Response {
    let rate = o.rate.unwrap_or(EvacuateOptions::DEFAULT_RATE);
    // Meant for another instance of this pod (it was replaced while the request was on its
    // way, or retried): evacuating the new one would keep it out of the cluster.
    if let (Some(want), Some(have)) = (&o.pod_uid, b.config.node_uid()) {
        if *want != have {
            return error(
                StatusCode::CONFLICT,
                format!("this is pod instance {have}; the request is for {want}, which is gone"),
            );
        }
    }
    if let Some(r) = &o.server_reference {
        let member = b.cluster.get().is_some_and(|c| c.is_member_mqtt_addr(r));
        if !member && !b.config.admin.server_references.iter().any(|a| a == r) {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "server_reference {r:?} is neither a cluster member's MQTT address nor in \
                     admin.server_references"
                ),
            );
        }
    }
    match b.cluster.get() {
        Some(c) => {
            c.evacuate(rate, o.server_reference);
            (StatusCode::ACCEPTED, Json(c.evacuation())).into_response()
        }
        None => {
            // A single node has nowhere to send clients: it stops accepting and reports.
            b.accepting.store(false, Ordering::Relaxed);
            (StatusCode::ACCEPTED, Json(single_node_evacuation(&b))).into_response()
        }
    }
}

async fn evacuation(State(b): State<Arc<Server>>) -> Json<EvacuationStatus> {
    Json(match b.cluster.get() {
        Some(c) => c.evacuation(),
        None => single_node_evacuation(&b),
    })
}

/// One balance check now; the operator calls it on the old pods after a scale-up.
async fn rebalance_now(
    State(b): State<Arc<Server>>,
    Query(o): Query<RebalanceOptions>,
) -> Response {
    match b.cluster.get() {
        Some(c) => {
            c.rebalance_now(o.rate);
            tracing::info!(rate = ?o.rate, "rebalance check requested through the admin API");
            (StatusCode::ACCEPTED, Json(c.rebalance_status())).into_response()
        }
        None => error(StatusCode::CONFLICT, "not clustered: nothing to rebalance"),
    }
}

async fn rebalance(State(b): State<Arc<Server>>) -> Json<RebalanceStatus> {
    Json(match b.cluster.get() {
        Some(c) => c.rebalance_status(),
        None => RebalanceStatus {
            enabled: b.config.cluster.rebalance.enabled,
            rate: b.config.cluster.rebalance.rate,
            state: RebalanceState::Idle,
            connections: count(b.metrics.connections.get()),
            balance: None,
        },
    })
}

async fn metrics(State(b): State<Arc<Server>>) -> Response {
    b.refresh_gauges();
    b.event_store.refresh_gauges();
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
        Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))
    }
}

async fn stats(State(b): State<Arc<Server>>) -> Json<Stats> {
    b.refresh_gauges();
    let m = &b.metrics;
    Json(Stats {
        node: b.node.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: b.started.elapsed().as_secs(),
        connections: m.connections.get(),
        sessions: m.sessions.get(),
        subscriptions: m.subscriptions.get(),
        routes: m.routes.get(),
        retained: m.retained.get(),
        queued: m.queued.get(),
        inflight: m.inflight.get(),
        messages_received: (0..3).map(|q| m.messages_received.at(q).get()).sum::<u64>(),
        messages_sent: (0..3).map(|q| m.messages_sent.at(q).get()).sum::<u64>(),
    })
}

/// The event store's sinks: state, last error, counters.
async fn eventstore(State(b): State<Arc<Server>>) -> Json<EventStoreStatus> {
    Json(EventStoreStatus {
        node: b.node.clone(),
        enabled: b.event_store.enabled(),
        sinks: b.event_store.report(),
    })
}

fn client_info(s: &crate::session::Session) -> ClientInfo {
    let st = s.state.lock();
    ClientInfo {
        client_id: s.client_id.to_string(),
        connected: st.connection.is_some(),
        connection: st.connection.as_ref().map(|c| c.to_api()),
        subscriptions: st.subscriptions.len() as u64,
        queued: st.queue.len() as u64,
        inflight: st.inflight.len() as u64,
        dropped: st.dropped,
        session_expiry: st.expiry,
    }
}

async fn clients(State(b): State<Arc<Server>>, Query(f): Query<ClientFilter>) -> Json<ClientList> {
    let mut all = b.sessions.all();
    all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    let list: Vec<ClientInfo> = all
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
        .take(f.limit.unwrap_or(ClientFilter::DEFAULT_LIMIT))
        .map(|s| client_info(s))
        .collect();
    Json(ClientList {
        count: list.len() as u64,
        clients: list,
    })
}

async fn client(State(b): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    match b.sessions.get(&id) {
        Some(s) => {
            let info = client_info(&s);
            let subscription_list = s
                .state
                .lock()
                .subscriptions
                .iter()
                .map(|(f, sub)| ClientSubscription {
                    filter: f.to_string(),
                    qos: sub.opts.qos.value(),
                })
                .collect();
            Json(ClientDetail {
                info,
                subscription_list,
            })
            .into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no client {id}")),
    }
}

async fn kick(State(b): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    let Some(s) = b.sessions.get(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no client {id}"));
    };
    let conn = s.state.lock().connection.clone();
    match conn {
        Some(c) => {
            c.kick.send(Kick::Administrative);
            Json(Kicked { kicked: id }).into_response()
        }
        None => error(
            StatusCode::CONFLICT,
            format!("client {id} is not connected"),
        ),
    }
}

async fn subscriptions(State(b): State<Arc<Server>>) -> Json<SubscriptionList> {
    let mut out = Vec::new();
    for s in b.sessions.all() {
        let st = s.state.lock();
        for (f, sub) in &st.subscriptions {
            out.push(SubscriptionInfo {
                client_id: s.client_id.to_string(),
                filter: f.to_string(),
                qos: sub.opts.qos.value(),
                no_local: sub.opts.no_local,
                retain_as_published: sub.opts.retain_as_published,
                subscription_id: sub.sub_id.map(|i| i.get()),
            });
        }
    }
    Json(SubscriptionList {
        count: out.len() as u64,
        subscriptions: out,
    })
}

async fn routes(State(b): State<Arc<Server>>) -> Json<RouteList> {
    let mut filters = b.router.filters();
    filters.sort();
    let list: Vec<Route> = filters
        .into_iter()
        .map(|filter| Route {
            filter,
            node: b.node.clone(),
        })
        .collect();
    Json(RouteList {
        count: list.len() as u64,
        routes: list,
    })
}

/// An error answer: `status` with an [`ErrorBody`].
fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ErrorBody::new(msg))).into_response()
}

async fn trace_start(State(b): State<Arc<Server>>, Json(req): Json<TraceRequest>) -> Response {
    use crate::trace::{Target, TraceError};
    let target = match (req.kind, req.client_id, req.topic) {
        (TraceKind::Client, Some(c), _) if !c.is_empty() => Target::Client(c),
        (TraceKind::Topic, _, Some(t)) if !t.is_empty() => Target::Topic(t),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "expected {\"type\": \"client\", \"client_id\": ...} or {\"type\": \"topic\", \"topic\": ...}",
            )
        }
    };
    let duration = Duration::from_secs(req.duration.unwrap_or(TraceRequest::DEFAULT_DURATION_SECS));
    match b.tracer.start(req.name, target, duration) {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(e @ TraceError::Exists(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ TraceError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn trace_list(State(b): State<Arc<Server>>) -> Json<TraceList> {
    let traces = b.tracer.list();
    Json(TraceList {
        count: traces.len() as u64,
        traces,
    })
}

async fn trace_stop(State(b): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    match b.tracer.stop(&name) {
        Some(info) => Json(info).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no trace {name}")),
    }
}

/// The log of a running trace, as plain text.
async fn trace_log(State(b): State<Arc<Server>>, Path(name): Path<String>) -> Response {
    let Some(t) = b.tracer.list().into_iter().find(|t| t.name == name) else {
        return error(StatusCode::NOT_FOUND, format!("no trace {name}"));
    };
    match tokio::fs::read_to_string(&t.file).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain")], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
