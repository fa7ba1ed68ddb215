//! Event hooks: what happens to clients, sessions and messages, delivered as JSON to the
//! configured webhooks without ever slowing the message flow.
//!
//! [`Hooks::emit`] never blocks and never waits: each webhook has its own bounded queue and
//! worker task; when a queue is full the event is dropped for that webhook, counted and
//! logged. Callers ask [`Hooks::wants`] (one bit test) before building an event, so a broker
//! without webhooks pays nothing per message.
//!
//! The event store (`crate::eventstore`) attaches its sinks here too ([`Hooks::attach`]): same
//! non-blocking emit, but each event is stamped with the time it happened, since a database
//! row needs that time and not the time it was written.

#[cfg(feature = "webhooks")]
mod webhook;
#[cfg(not(feature = "webhooks"))]
#[path = "webhook_off.rs"]
mod webhook;

pub use corvid_api::{WebhookState, WebhookStatus};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::IntCounter;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::config::EventKind;
use crate::config::WebhookConfig;
use crate::metrics::Metrics;
use crate::topic;

/// One event.
#[derive(Debug, Clone)]
pub enum Event {
    /// `client.connected`.
    ClientConnected {
        /// Client id.
        client_id: String,
        /// User name.
        username: Option<String>,
        /// Address.
        peer: String,
        /// `3.1.1` / `5.0`.
        protocol: &'static str,
        /// Keep alive, seconds.
        keepalive: u16,
        /// Clean start / clean session.
        clean_start: bool,
        /// When this connection was accepted, µs since the epoch: with the node, what tells
        /// one connection of a client id from the next.
        connected_at_us: u64,
    },
    /// `client.disconnected`.
    ClientDisconnected {
        /// Client id.
        client_id: String,
        /// User name.
        username: Option<String>,
        /// Address.
        peer: String,
        /// Why.
        reason: &'static str,
        /// When the connection that ended was accepted, µs since the epoch (matches its
        /// `ClientConnected`), so a late disconnect never overrides a newer connection.
        connected_at_us: u64,
    },
    /// `session.subscribed`.
    SessionSubscribed {
        /// Client id.
        client_id: String,
        /// User name.
        username: Option<String>,
        /// Filter as subscribed.
        topic: String,
        /// Granted QoS.
        qos: u8,
    },
    /// `session.unsubscribed`.
    SessionUnsubscribed {
        /// Client id.
        client_id: String,
        /// User name.
        username: Option<String>,
        /// Filter.
        topic: String,
    },
    /// `message.publish`.
    MessagePublish {
        /// Publisher.
        client_id: String,
        /// Publisher's user name.
        username: Option<String>,
        /// Topic.
        topic: String,
        /// QoS.
        qos: u8,
        /// Retain flag.
        retain: bool,
        /// Payload.
        payload: Bytes,
    },
    /// `message.delivered`.
    MessageDelivered {
        /// Receiving client.
        client_id: String,
        /// Publisher.
        from_client_id: String,
        /// Topic.
        topic: String,
        /// QoS it was sent with.
        qos: u8,
        /// Payload.
        payload: Bytes,
    },
    /// `message.acked`.
    MessageAcked {
        /// Receiving client.
        client_id: String,
        /// Publisher.
        from_client_id: String,
        /// Topic.
        topic: String,
        /// QoS.
        qos: u8,
        /// Packet id acknowledged.
        packet_id: u16,
    },
    /// `message.dropped`.
    MessageDropped {
        /// Publisher.
        from_client_id: String,
        /// Topic.
        topic: String,
        /// QoS.
        qos: u8,
        /// Why: `no_subscribers`, `acl_denied`, `queue_full`.
        reason: &'static str,
    },
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::ClientConnected { .. } => EventKind::ClientConnected,
            Event::ClientDisconnected { .. } => EventKind::ClientDisconnected,
            Event::SessionSubscribed { .. } => EventKind::SessionSubscribed,
            Event::SessionUnsubscribed { .. } => EventKind::SessionUnsubscribed,
            Event::MessagePublish { .. } => EventKind::MessagePublish,
            Event::MessageDelivered { .. } => EventKind::MessageDelivered,
            Event::MessageAcked { .. } => EventKind::MessageAcked,
            Event::MessageDropped { .. } => EventKind::MessageDropped,
        }
    }

    /// The topic of a message or subscription event.
    pub fn topic(&self) -> Option<&str> {
        match self {
            Event::SessionSubscribed { topic, .. }
            | Event::SessionUnsubscribed { topic, .. }
            | Event::MessagePublish { topic, .. }
            | Event::MessageDelivered { topic, .. }
            | Event::MessageAcked { topic, .. }
            | Event::MessageDropped { topic, .. } => Some(topic),
            _ => None,
        }
    }

    /// The JSON body posted to webhooks: `event`, `node`, `timestamp` (ms since the epoch)
    /// and the event's own fields.
    pub fn to_json(&self, node: &str, timestamp_ms: u64) -> Value {
        let mut v = match self {
            Event::ClientConnected {
                client_id,
                username,
                peer,
                protocol,
                keepalive,
                clean_start,
                ..
            } => json!({
                "client_id": client_id, "username": username, "peer": peer,
                "protocol": protocol, "keepalive": keepalive, "clean_start": clean_start,
            }),
            Event::ClientDisconnected {
                client_id,
                username,
                peer,
                reason,
                ..
            } => json!({
                "client_id": client_id, "username": username, "peer": peer, "reason": reason,
            }),
            Event::SessionSubscribed {
                client_id,
                username,
                topic,
                qos,
            } => json!({"client_id": client_id, "username": username, "topic": topic, "qos": qos}),
            Event::SessionUnsubscribed {
                client_id,
                username,
                topic,
            } => json!({"client_id": client_id, "username": username, "topic": topic}),
            Event::MessagePublish {
                client_id,
                username,
                topic,
                qos,
                retain,
                payload,
            } => with_payload(
                json!({
                    "client_id": client_id, "username": username, "topic": topic,
                    "qos": qos, "retain": retain,
                }),
                payload,
            ),
            Event::MessageDelivered {
                client_id,
                from_client_id,
                topic,
                qos,
                payload,
            } => with_payload(
                json!({
                    "client_id": client_id, "from_client_id": from_client_id,
                    "topic": topic, "qos": qos,
                }),
                payload,
            ),
            Event::MessageAcked {
                client_id,
                from_client_id,
                topic,
                qos,
                packet_id,
            } => json!({
                "client_id": client_id, "from_client_id": from_client_id,
                "topic": topic, "qos": qos, "packet_id": packet_id,
            }),
            Event::MessageDropped {
                from_client_id,
                topic,
                qos,
                reason,
            } => json!({
                "from_client_id": from_client_id, "topic": topic, "qos": qos, "reason": reason,
            }),
        };
        v["event"] = json!(self.kind().name());
        v["node"] = json!(node);
        v["timestamp"] = json!(timestamp_ms);
        v
    }
}

/// `v` with the payload: as UTF-8 text when it is, else base64 with `payload_encoding: base64`.
fn with_payload(mut v: Value, payload: &Bytes) -> Value {
    match std::str::from_utf8(payload) {
        Ok(s) => {
            v["payload"] = json!(s);
            v["payload_encoding"] = json!("plain");
        }
        Err(_) => {
            use base64::Engine;
            v["payload"] = json!(base64::engine::general_purpose::STANDARD.encode(payload));
            v["payload_encoding"] = json!("base64");
        }
    }
    v
}

/// Why hooks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Unknown event name in `webhooks[i].events`.
    #[error("webhooks[{index}].events: unknown event {name:?}")]
    UnknownEvent {
        /// Webhook position.
        index: usize,
        /// The name.
        name: String,
    },
    /// The webhook metrics could not be registered.
    #[error("webhook metrics: {0}")]
    Metrics(String),
    /// The HTTP client could not be built.
    #[error("webhooks[{index}]: {reason}")]
    Client {
        /// Webhook position.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The configuration asks for something this build left out.
    #[error(transparent)]
    NotBuilt(#[from] crate::config::NotBuilt),
}

/// An event with the time it happened, as queued for the event store.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// When it was emitted, µs since the Unix epoch.
    pub at_us: u64,
    /// The event.
    pub event: Arc<Event>,
}

/// An event-store sink to attach: which events it takes and the queue they go to.
#[derive(Debug)]
pub struct StoreSink {
    /// Name in logs (`postgres`, `redis`).
    pub name: String,
    /// Event kinds it takes.
    pub kinds: Vec<EventKind>,
    /// Message events are taken only on topics matching one of these filters.
    pub topics: Vec<String>,
    /// Its bounded queue.
    pub tx: mpsc::Sender<Stamped>,
    /// Counts events dropped because the queue was full.
    pub dropped: IntCounter,
}

enum Queue {
    Webhook(mpsc::Sender<Arc<Event>>),
    Store(mpsc::Sender<Stamped>),
}

struct Sink {
    name: String,
    mask: u16,
    topics: Vec<String>,
    queue: Queue,
    dropped: IntCounter,
    dropped_n: AtomicU64,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("name", &self.name).finish()
    }
}

/// The configured webhooks.
#[derive(Debug)]
pub struct Hooks {
    mask: u16,
    sinks: Vec<Sink>,
    pending: Mutex<Vec<webhook::Worker>>,
    webhooks: Vec<WebhookHandle>,
}

/// What the admin API reads of one webhook.
#[derive(Debug)]
struct WebhookHandle {
    health: Arc<webhook::Health>,
    tx: mpsc::Sender<Arc<Event>>,
    delivered: IntCounter,
    failed: IntCounter,
    dropped: IntCounter,
}

impl Hooks {
    /// Sets up one queue per webhook; workers start with [`Hooks::start`].
    pub fn new(cfg: &[WebhookConfig], node: &str, metrics: &Metrics) -> Result<Self, HookError> {
        let built = cfg!(feature = "webhooks");
        crate::config::NotBuilt::check(!cfg.is_empty(), built, "webhooks", "webhooks")?;
        let mut sinks = Vec::new();
        let mut workers = Vec::new();
        let mut handles = Vec::new();
        let mut all = 0u16;
        let up = metrics
            .gauge_vec(
                "corvid_webhook_up",
                "1 while the webhook's endpoint is healthy (last delivery or idle check)",
                "webhook",
            )
            .map_err(|e| HookError::Metrics(e.to_string()))?;
        for (index, w) in cfg.iter().enumerate() {
            let mut mask = 0u16;
            for e in &w.events {
                let k = EventKind::from_name(e).ok_or_else(|| HookError::UnknownEvent {
                    index,
                    name: e.clone(),
                })?;
                mask |= k.bit();
            }
            if w.events.is_empty() {
                mask = u16::MAX;
            }
            let name = if w.name.is_empty() {
                format!("webhook-{index}")
            } else {
                w.name.clone()
            };
            let (tx, rx) = mpsc::channel(w.queue_size.max(1));
            #[cfg(not(feature = "webhooks"))]
            let _ = (rx, node, &up, &mut workers, &mut handles);
            #[cfg(feature = "webhooks")]
            let health = Arc::new(webhook::Health::new(
                &name,
                &w.url,
                up.with_label_values(&[&name]),
            ));
            #[cfg(feature = "webhooks")]
            workers.push(
                webhook::Worker::new(
                    w,
                    name.clone(),
                    node.to_string(),
                    rx,
                    metrics,
                    health.clone(),
                )
                .map_err(|reason| HookError::Client { index, reason })?,
            );
            #[cfg(feature = "webhooks")]
            handles.push(WebhookHandle {
                health,
                tx: tx.clone(),
                delivered: metrics.webhook_delivered.with_label_values(&[&name]),
                failed: metrics.webhook_failed.with_label_values(&[&name]),
                dropped: metrics.webhook_dropped.with_label_values(&[&name]),
            });
            sinks.push(Sink {
                dropped: metrics.webhook_dropped.with_label_values(&[&name]),
                name,
                mask,
                topics: w.topic.iter().cloned().collect(),
                queue: Queue::Webhook(tx),
                dropped_n: AtomicU64::new(0),
            });
            all |= mask;
        }
        Ok(Hooks {
            mask: all,
            sinks,
            pending: Mutex::new(workers),
            webhooks: handles,
        })
    }

    /// Adds an event-store sink; call before the broker is shared.
    pub fn attach(&mut self, s: StoreSink) {
        let mask = s.kinds.iter().fold(0u16, |m, k| m | k.bit());
        self.mask |= mask;
        self.sinks.push(Sink {
            name: s.name,
            mask,
            topics: s.topics,
            queue: Queue::Store(s.tx),
            dropped: s.dropped,
            dropped_n: AtomicU64::new(0),
        });
    }

    /// Starts the worker tasks (needs a tokio runtime); they stop at `shutdown`.
    pub fn start(&self, shutdown: &CancellationToken) {
        for w in self.pending.lock().drain(..) {
            tokio::spawn(w.run(shutdown.clone()));
        }
    }

    /// Each webhook's health and counts, for `GET /api/v1/webhooks`.
    pub fn webhook_status(&self) -> Vec<WebhookStatus> {
        self.webhooks
            .iter()
            .map(|h| {
                let queued = h.tx.max_capacity().saturating_sub(h.tx.capacity());
                h.health.status(
                    u64::try_from(queued).unwrap_or(u64::MAX),
                    h.delivered.get(),
                    h.failed.get(),
                    h.dropped.get(),
                )
            })
            .collect()
    }

    /// Whether any webhook wants events of `kind`: check before building one.
    #[inline]
    pub fn wants(&self, kind: EventKind) -> bool {
        self.mask & kind.bit() != 0
    }

    /// Queues `ev` for every webhook and event-store sink that wants it. Never blocks: a
    /// full queue drops the event for that sink, counted (`corvid_webhook_dropped_total`,
    /// `corvid_eventstore_dropped_total`) and logged.
    pub fn emit(&self, ev: Event) {
        let bit = ev.kind().bit();
        let ev = Arc::new(ev);
        let mut at_us = None;
        for s in &self.sinks {
            if s.mask & bit == 0 {
                continue;
            }
            if let Some(t) = ev.topic() {
                if !s.topics.is_empty() && !s.topics.iter().any(|f| topic::matches(f, t)) {
                    continue;
                }
            }
            let sent = match &s.queue {
                Queue::Webhook(tx) => tx.try_send(ev.clone()).is_ok(),
                Queue::Store(tx) => {
                    let at_us = *at_us.get_or_insert_with(now_us);
                    tx.try_send(Stamped {
                        at_us,
                        event: ev.clone(),
                    })
                    .is_ok()
                }
            };
            if !sent {
                s.dropped.inc();
                let n = s.dropped_n.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    match s.queue {
                        Queue::Webhook(_) => {
                            tracing::warn!(webhook = %s.name, dropped = n, event = ev.kind().name(), "webhook queue full; dropping events")
                        }
                        Queue::Store(_) => {
                            tracing::warn!(sink = %s.name, dropped = n, event = ev.kind().name(), "event store buffer full; dropping events (is the store down?)")
                        }
                    }
                }
            }
        }
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
