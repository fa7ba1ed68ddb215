//! Prometheus metrics. Hot-path counters are resolved once at start-up (no label lookups
//! per message); gauges that mirror state (sessions, routes, queues) are computed at scrape
//! time from the state itself, so they cannot drift.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Counters by QoS level, indexed by the QoS value.
#[derive(Debug, Clone)]
pub struct ByQos(pub [IntCounter; 3]);

impl ByQos {
    fn new(vec: &IntCounterVec) -> Self {
        ByQos([
            vec.with_label_values(&["0"]),
            vec.with_label_values(&["1"]),
            vec.with_label_values(&["2"]),
        ])
    }

    /// Counter for `qos` (0..=2).
    pub fn at(&self, qos: u8) -> &IntCounter {
        &self.0[usize::from(qos.min(2))]
    }
}

/// All broker metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Connected clients.
    pub connections: IntGauge,
    /// Connections accepted.
    pub connections_total: IntCounter,
    /// Connections idle without a task of their own (parked: see `park`).
    pub connections_parked: IntGauge,
    /// Connections refused, by reason.
    pub connections_refused: IntCounterVec,
    /// Connections closed for a protocol error, by MQTT reason code name.
    pub protocol_errors: IntCounterVec,
    /// PUBLISH packets received from clients, by QoS.
    pub messages_received: ByQos,
    /// PUBLISH packets sent to clients, by QoS.
    pub messages_sent: ByQos,
    /// Messages dropped, by reason.
    pub messages_dropped: IntCounterVec,
    /// Bytes read from clients.
    pub bytes_received: IntCounter,
    /// Bytes written to clients.
    pub bytes_sent: IntCounter,
    /// Sessions (gauge refreshed at scrape).
    pub sessions: IntGauge,
    /// Subscriptions (gauge refreshed at scrape).
    pub subscriptions: IntGauge,
    /// Distinct route filters (gauge refreshed at scrape).
    pub routes: IntGauge,
    /// Retained messages (gauge refreshed at scrape).
    pub retained: IntGauge,
    /// Messages queued in sessions (gauge refreshed at scrape).
    pub queued: IntGauge,
    /// Messages inflight to clients (gauge refreshed at scrape).
    pub inflight: IntGauge,
    /// Session takeovers.
    pub takeovers: IntCounter,
    /// Sessions expired.
    pub sessions_expired: IntCounter,
    /// Will messages published.
    pub wills_published: IntCounter,
    /// TLS certificate reloads.
    pub tls_reloads: IntCounter,
    /// Admin API requests refused for a missing or wrong token.
    pub admin_unauthorized: IntCounter,
    /// Authentication outcomes.
    pub auth: AuthCounters,
    /// ACL decisions.
    pub acl: AclCounters,
    /// Connections slowed down by `limits.message_rate` (each pause counts once).
    pub throttled_messages: IntCounter,
    /// Connections slowed down by `limits.byte_rate` (each pause counts once).
    pub throttled_bytes: IntCounter,
    /// Publishers held back by a session above its `sessions.queue_high_water` (each pause
    /// counts once).
    pub throttled_congestion: IntCounter,
    /// Connections closed for exceeding their rate (`over_rate: disconnect`).
    pub rate_disconnects: IntCounter,
    /// Connections closed because the client did not read within `mqtt.write_timeout`.
    pub write_timeouts: IntCounter,
    /// Subscriptions refused by `limits.max_subscriptions`.
    pub subscriptions_refused: IntCounter,
    /// Auto-subscriptions made on connect.
    pub auto_subscriptions: IntCounter,
    /// Webhook events posted, by webhook name.
    pub webhook_delivered: IntCounterVec,
    /// Webhook events that failed after all retries, by webhook name.
    pub webhook_failed: IntCounterVec,
    /// Webhook events dropped because the webhook's queue was full, by webhook name.
    pub webhook_dropped: IntCounterVec,
    /// Traces started.
    pub traces_started: IntCounter,
    /// Traces running now.
    pub traces_active: IntGauge,
    /// Topic names and filters refused for `mqtt.max_topic_levels` / `max_topic_length`, by
    /// where they came from (`publish`, `subscribe`, `unsubscribe`, `will`, `auto_subscription`).
    pub topic_refused: IntCounterVec,
    /// Subscriptions of a resumed session dropped because the ACL now denies them.
    pub subscriptions_revoked: IntCounter,
    /// Connections closed for a PROXY header from outside `listeners.<name>.proxy_trusted`.
    pub proxy_untrusted: IntCounter,
}

/// Authentication outcomes, resolved once (`corvid_auth_total{result,reason}`).
#[derive(Debug, Clone)]
pub struct AuthCounters {
    /// Accepted by the users file.
    pub success_users_file: IntCounter,
    /// Accepted by the HTTP backend.
    pub success_http: IntCounter,
    /// Accepted as anonymous (no source decided).
    pub success_anonymous: IntCounter,
    /// Wrong user name or password.
    pub bad_credentials: IntCounter,
    /// Refused: anonymous not allowed, or the backend said no.
    pub not_authorized: IntCounter,
    /// Client id not on the allow list.
    pub client_id_not_allowed: IntCounter,
    /// The HTTP backend could not be asked (timeout, error); fail-closed refusals and
    /// fail-open admissions both count here.
    pub backend_error: IntCounter,
}

/// ACL decisions, resolved once (`corvid_acl_total{action,permission}`).
#[derive(Debug, Clone)]
pub struct AclCounters {
    /// PUBLISH allowed.
    pub publish_allow: IntCounter,
    /// PUBLISH denied.
    pub publish_deny: IntCounter,
    /// SUBSCRIBE allowed.
    pub subscribe_allow: IntCounter,
    /// SUBSCRIBE denied.
    pub subscribe_deny: IntCounter,
}

/// Registers `c` in `registry` and hands it back.
fn registered<C>(registry: &Registry, c: C) -> Result<C, prometheus::Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Options of a latency histogram: 100 µs to 10 s buckets.
fn latency_opts(name: &str, help: &str) -> Result<prometheus::HistogramOpts, prometheus::Error> {
    let buckets = prometheus::exponential_buckets(0.0001, 4.0, 9)?;
    Ok(prometheus::HistogramOpts::new(name, help).buckets(buckets))
}

impl Metrics {
    /// Registers every metric in a fresh registry, with process metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| registered(&registry, IntGauge::new(name, help)?);
        let counter = |name: &str, help: &str| registered(&registry, IntCounter::new(name, help)?);
        let vec = |name: &str, help: &str, label: &str| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label])?,
            )
        };
        let received = vec(
            "corvid_messages_received_total",
            "PUBLISH packets received from clients",
            "qos",
        )?;
        let sent = vec(
            "corvid_messages_sent_total",
            "PUBLISH packets sent to clients",
            "qos",
        )?;
        let auth = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("corvid_auth_total", "Authentication outcomes"),
                &["result", "reason"],
            )?,
        )?;
        let acl = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("corvid_acl_total", "ACL decisions"),
                &["action", "permission"],
            )?,
        )?;
        let throttled = vec(
            "corvid_throttled_total",
            "Times a connection was paused: over its rate, or publishing into a congested session",
            "limit",
        )?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            connections: gauge("corvid_connections", "Connected clients")?,
            connections_total: counter("corvid_connections_total", "Connections accepted")?,
            connections_parked: gauge(
                "corvid_connections_parked",
                "Connected clients idle without a task of their own",
            )?,
            connections_refused: vec(
                "corvid_connections_refused_total",
                "Connections refused",
                "reason",
            )?,
            protocol_errors: vec(
                "corvid_protocol_errors_total",
                "Connections closed for a protocol error",
                "reason",
            )?,
            messages_received: ByQos::new(&received),
            messages_sent: ByQos::new(&sent),
            messages_dropped: vec(
                "corvid_messages_dropped_total",
                "Messages dropped",
                "reason",
            )?,
            bytes_received: counter("corvid_bytes_received_total", "Bytes read from clients")?,
            bytes_sent: counter("corvid_bytes_sent_total", "Bytes written to clients")?,
            sessions: gauge("corvid_sessions", "Sessions, online and offline")?,
            subscriptions: gauge("corvid_subscriptions", "Subscriptions")?,
            routes: gauge("corvid_routes", "Distinct subscription filters")?,
            retained: gauge("corvid_retained_messages", "Retained messages")?,
            queued: gauge(
                "corvid_session_queue_messages",
                "Messages queued in sessions (offline queue depth)",
            )?,
            inflight: gauge(
                "corvid_inflight_messages",
                "QoS 1/2 messages sent and not yet acknowledged",
            )?,
            takeovers: counter(
                "corvid_session_takeovers_total",
                "Sessions taken over by a new connection",
            )?,
            sessions_expired: counter("corvid_sessions_expired_total", "Sessions expired")?,
            wills_published: counter("corvid_wills_published_total", "Will messages published")?,
            tls_reloads: counter("corvid_tls_reloads_total", "TLS certificate reloads")?,
            admin_unauthorized: counter(
                "corvid_admin_unauthorized_total",
                "Admin API requests refused for a missing or wrong token",
            )?,
            auth: AuthCounters {
                success_users_file: auth.with_label_values(&["success", "users_file"]),
                success_http: auth.with_label_values(&["success", "http"]),
                success_anonymous: auth.with_label_values(&["success", "anonymous"]),
                bad_credentials: auth.with_label_values(&["failure", "bad_credentials"]),
                not_authorized: auth.with_label_values(&["failure", "not_authorized"]),
                client_id_not_allowed: auth
                    .with_label_values(&["failure", "client_id_not_allowed"]),
                backend_error: auth.with_label_values(&["failure", "backend_error"]),
            },
            acl: AclCounters {
                publish_allow: acl.with_label_values(&["publish", "allow"]),
                publish_deny: acl.with_label_values(&["publish", "deny"]),
                subscribe_allow: acl.with_label_values(&["subscribe", "allow"]),
                subscribe_deny: acl.with_label_values(&["subscribe", "deny"]),
            },
            throttled_messages: throttled.with_label_values(&["message_rate"]),
            throttled_bytes: throttled.with_label_values(&["byte_rate"]),
            throttled_congestion: throttled.with_label_values(&["queue_high_water"]),
            rate_disconnects: counter(
                "corvid_rate_limit_disconnects_total",
                "Connections closed for exceeding their message or byte rate",
            )?,
            write_timeouts: counter(
                "corvid_write_timeouts_total",
                "Connections closed because the client did not read within mqtt.write_timeout",
            )?,
            subscriptions_refused: counter(
                "corvid_subscriptions_refused_total",
                "Subscriptions refused by limits.max_subscriptions",
            )?,
            auto_subscriptions: counter(
                "corvid_auto_subscriptions_total",
                "Subscriptions made by the server on connect",
            )?,
            webhook_delivered: vec(
                "corvid_webhook_delivered_total",
                "Webhook events posted successfully",
                "webhook",
            )?,
            webhook_failed: vec(
                "corvid_webhook_failed_total",
                "Webhook events given up after all retries",
                "webhook",
            )?,
            webhook_dropped: vec(
                "corvid_webhook_dropped_total",
                "Webhook events dropped because the webhook's queue was full",
                "webhook",
            )?,
            traces_started: counter("corvid_traces_started_total", "Traces started")?,
            traces_active: gauge("corvid_traces_active", "Traces running")?,
            topic_refused: vec(
                "corvid_topic_refused_total",
                "Topic names and filters over mqtt.max_topic_levels or max_topic_length",
                "kind",
            )?,
            subscriptions_revoked: counter(
                "corvid_subscriptions_revoked_total",
                "Subscriptions of a resumed session dropped because the ACL now denies them",
            )?,
            proxy_untrusted: counter(
                "corvid_proxy_untrusted_total",
                "Connections closed for a PROXY header from outside proxy_trusted",
            )?,
            registry,
        })
    }

    /// Registers another gauge (used by optional layers such as the cluster).
    pub fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        registered(&self.registry, IntGauge::new(name, help)?)
    }

    /// Registers a latency histogram (100 µs to 10 s buckets).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
    ) -> Result<prometheus::Histogram, prometheus::Error> {
        let h = prometheus::Histogram::with_opts(latency_opts(name, help)?)?;
        registered(&self.registry, h)
    }

    /// Registers another counter.
    pub fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        registered(&self.registry, IntCounter::new(name, help)?)
    }

    /// Registers another labelled gauge.
    pub fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
    ) -> Result<IntGaugeVec, prometheus::Error> {
        registered(
            &self.registry,
            IntGaugeVec::new(Opts::new(name, help), &[label])?,
        )
    }

    /// Registers another labelled counter (used by optional layers such as bridges).
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
    ) -> Result<IntCounterVec, prometheus::Error> {
        registered(
            &self.registry,
            IntCounterVec::new(Opts::new(name, help), &[label])?,
        )
    }

    /// Registers a counter with several labels.
    pub fn counter_vec_with(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        registered(
            &self.registry,
            IntCounterVec::new(Opts::new(name, help), labels)?,
        )
    }

    /// Registers a labelled latency histogram (100 µs to 10 s buckets).
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
    ) -> Result<prometheus::HistogramVec, prometheus::Error> {
        let h = prometheus::HistogramVec::new(latency_opts(name, help)?, &[label])?;
        registered(&self.registry, h)
    }

    /// Renders all metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts a dropped message.
    pub fn dropped(&self, reason: &str) {
        self.messages_dropped.with_label_values(&[reason]).inc();
    }
}
