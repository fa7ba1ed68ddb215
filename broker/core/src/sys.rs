//! `$SYS` topics: the broker's own state published as MQTT messages, for dashboards that
//! speak only MQTT. A periodic task publishes the node list, version, uptime, counts and
//! message counters; connection tasks publish `clients/{id}/connected` and `/disconnected` as
//! they happen. As in mosquitto, the periodic topics are retained and the first round goes out
//! as the broker starts: a dashboard (or `mosquitto_sub -t '$SYS/#'`) subscribing at any time
//! sees the current figures at once, then a fresh round every `sys.interval`. They are a
//! handful of small messages per node, overwritten in place, so the retained store cannot grow
//! from them. The client events are not retained: they are moments, not state.
//!
//! Who may subscribe is the ACL's business: `acl.rules` can allow `$SYS/#` to a dashboard user
//! and a `deny` policy keeps everyone else out. The topics that name other clients
//! (`…/clients/{id}/connected|disconnected`: client ids, user names, addresses) go further: they
//! are delivered only to subscribers whose ACL has a rule that explicitly allows reading that
//! topic — `no_match: allow` and the rule-less default never do — whatever filter they used.
//! Clients cannot publish into `$SYS` at all (see [`is_sys`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use serde_json::{json, Value};

use crate::broker::Broker;
use crate::codec::QoS;
use crate::message::Message;
use crate::session::ConnInfo;

pub use crate::topic::{is_sys, sys_names_clients as names_clients};

/// Publishes one `$SYS` message.
fn publish(broker: &Broker, topic: String, payload: String, retain: bool) {
    let msg = Arc::new(Message::new(
        ByteString::from(topic),
        Bytes::from(payload),
        QoS::AtMostOnce,
        retain,
        None,
        ByteString::new(),
    ));
    broker.publish(msg);
}

/// Starts the periodic publisher when `sys.enabled`: one round at once (the interval's first
/// tick is immediate), then one every `sys.interval`; it stops at shutdown.
pub fn start(broker: Arc<Broker>) {
    if !broker.config.sys.enabled {
        return;
    }
    let every = Duration::from_secs(broker.config.sys.interval.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => publish_stats(&broker),
                _ = broker.shutdown.cancelled() => return,
            }
        }
    });
}

/// Publishes the periodic topics once, retained (see the module comment).
pub fn publish_stats(b: &Broker) {
    b.refresh_gauges();
    let m = &b.metrics;
    let base = format!("$SYS/brokers/{}", b.node);
    let sum = |c: &crate::metrics::ByQos| (0..3).map(|q| c.at(q).get()).sum::<u64>();
    use prometheus::core::Collector;
    let dropped: u64 = m
        .messages_dropped
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|mm| mm.get_counter().get_value() as u64)
        .sum();
    // Like EMQX: the comma-separated names of the running nodes (this one first).
    let nodes = match b.fabric.get() {
        Some(c) => c.running_nodes().join(","),
        None => b.node.clone(),
    };
    publish(b, "$SYS/brokers".into(), nodes, true);
    let items: Vec<(&str, String)> = vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("uptime", b.started.elapsed().as_secs().to_string()),
        ("datetime", chrono::Utc::now().to_rfc3339()),
        ("stats/connections/count", m.connections.get().to_string()),
        ("stats/sessions/count", m.sessions.get().to_string()),
        (
            "stats/subscriptions/count",
            m.subscriptions.get().to_string(),
        ),
        ("stats/topics/count", m.routes.get().to_string()),
        ("stats/retained/count", m.retained.get().to_string()),
        (
            "metrics/messages/received",
            sum(&m.messages_received).to_string(),
        ),
        ("metrics/messages/sent", sum(&m.messages_sent).to_string()),
        ("metrics/messages/dropped", dropped.to_string()),
        ("metrics/bytes/received", m.bytes_received.get().to_string()),
        ("metrics/bytes/sent", m.bytes_sent.get().to_string()),
    ];
    for (k, v) in items {
        publish(b, format!("{base}/{k}"), v, true);
    }
}

/// `$SYS/brokers/{node}/clients/{id}/connected`.
pub fn client_connected(b: &Broker, client_id: &str, info: &ConnInfo, clean_start: bool) {
    client_event(b, client_id, "connected", || {
        json!({
        "client_id": client_id,
        "username": info.username,
        "address": info.peer.to_string(),
        "listener": info.listener,
        "protocol": info.protocol.label(),
        "keepalive": info.keep_alive,
        "clean_start": clean_start,
        "connected_at": info.connected_at,
        "timestamp": crate::hooks::now_ms(),
        })
    });
}

/// `$SYS/brokers/{node}/clients/{id}/disconnected`.
pub fn client_disconnected(b: &Broker, client_id: &str, info: &ConnInfo, reason: &str) {
    client_event(b, client_id, "disconnected", || {
        json!({
        "client_id": client_id,
        "username": info.username,
        "address": info.peer.to_string(),
        "protocol": info.protocol.label(),
        "keepalive": info.keep_alive,
        "reason": reason,
        "connected_at": info.connected_at,
        "disconnected_at": crate::session::unix_now(),
        "timestamp": crate::hooks::now_ms(),
        })
    });
}

/// Publishes `payload()` (not retained) at `$SYS/brokers/{node}/clients/{id}/{what}` when
/// `$SYS` is enabled; the payload is only built then.
fn client_event(b: &Broker, client_id: &str, what: &str, payload: impl FnOnce() -> Value) {
    if !b.config.sys.enabled {
        return;
    }
    publish(
        b,
        format!("$SYS/brokers/{}/clients/{client_id}/{what}", b.node),
        payload().to_string(),
        false,
    );
}
