//! Renders the broker configuration file (`corvid.yaml`) from the spec, deep-merges `spec.config`
//! over it, and hashes the result so that a configuration change (and only that) rolls the pods.

use corvid_crds::{ListenerKind, MqttCluster, PersistenceMode, TlsMode, ADMIN_PORT, CLUSTER_PORT};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::Names;
use crate::validate::Validated;

/// Directory of the broker's files inside the pod.
pub const CONFIG_DIR: &str = "/etc/corvid";
/// Path of the configuration file (the broker is started with `--config` pointing here).
pub const CONFIG_PATH: &str = "/etc/corvid/corvid.yaml";
/// ConfigMap key holding the configuration.
pub const CONFIG_KEY: &str = "corvid.yaml";
/// Where the TLS Secret is projected; renewed files appear here without a restart.
pub const TLS_DIR: &str = "/etc/corvid/tls";
/// Where the cluster Secret is mounted.
pub const CLUSTER_SECRET_DIR: &str = "/etc/corvid/cluster";
/// Key of the cluster Secret (and file name under CLUSTER_SECRET_DIR).
pub const CLUSTER_SECRET_KEY: &str = "secret";
/// Where the admin token Secret is mounted (`corvid-broker ctl` looks there by default).
pub const ADMIN_TOKEN_DIR: &str = "/etc/corvid/admin";
/// Key of the admin token Secret (and file name under ADMIN_TOKEN_DIR).
pub const ADMIN_TOKEN_KEY: &str = "token";
/// Where the users Secret is mounted.
pub const AUTH_DIR: &str = "/etc/corvid/auth";
/// Where bridge Secrets (passwords, CA and client certificates) are projected, one folder per bridge.
pub const BRIDGES_DIR: &str = "/etc/corvid/bridges";
/// Where the persistent volume is mounted (pvc mode).
pub const DATA_DIR: &str = "/var/lib/corvid";
/// Where the event-store password Secrets are projected (`postgres-password`, `redis-password`).
pub const EVENTSTORE_DIR: &str = "/etc/corvid/eventstore";

/// The configuration file and its hash.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// YAML text of corvid.yaml.
    pub yaml: String,
    /// Hex SHA-256 of `yaml`; goes into a pod-template annotation.
    pub hash: String,
}

/// Whether the broker itself listens on `kind` (loadBalancer mode moves TLS listeners to the load
/// balancer, which forwards to the plain listener).
pub fn broker_serves(cluster: &MqttCluster, kind: ListenerKind) -> bool {
    let spec = &cluster.spec;
    let l = &spec.listeners;
    match (spec.tls.mode, kind) {
        (TlsMode::Broker, _) => l.get(kind).enabled,
        (_, ListenerKind::Mqtts | ListenerKind::Wss) => false,
        (TlsMode::LoadBalancer, k) => {
            let tls_peer = if k == ListenerKind::Mqtt {
                ListenerKind::Mqtts
            } else {
                ListenerKind::Wss
            };
            l.get(k).enabled || l.get(tls_peer).enabled
        }
        (TlsMode::None, k) => l.get(k).enabled,
    }
}

/// Whether listeners expect a PROXY protocol header (only when the load balancer sends it).
pub fn proxy_protocol(cluster: &MqttCluster) -> bool {
    let tls = &cluster.spec.tls;
    tls.mode == TlsMode::LoadBalancer
        && tls
            .load_balancer
            .as_ref()
            .is_some_and(|lb| lb.proxy_protocol)
}

/// The source ranges listeners believe PROXY headers from (`listeners.*.proxy_trusted`).
pub fn proxy_trusted(cluster: &MqttCluster) -> Vec<String> {
    let lb = cluster.spec.tls.load_balancer.as_ref();
    lb.map(|lb| lb.proxy_trusted_ranges.clone())
        .unwrap_or_default()
}

/// The configuration rendered from the spec, before `spec.config` is merged.
pub fn base(cluster: &MqttCluster, names: &Names) -> Value {
    let spec = &cluster.spec;
    let proxy = proxy_protocol(cluster);
    let trusted = if proxy {
        proxy_trusted(cluster)
    } else {
        Vec::new()
    };
    let listener = |kind: ListenerKind| {
        let mut l = json!({
            "enabled": broker_serves(cluster, kind),
            "bind": format!("0.0.0.0:{}", spec.listeners.get(kind).port),
            "proxy_protocol": proxy,
            "proxy_trusted": trusted,
        });
        if kind.is_websocket() {
            l["path"] = json!("/mqtt");
        }
        l
    };
    let auth = &spec.auth;
    let mut config = json!({
        "node": { "name": null },
        "log": { "level": "info", "format": "json" },
        "listeners": {
            "mqtt": listener(ListenerKind::Mqtt),
            "ws": listener(ListenerKind::Ws),
            "mqtts": listener(ListenerKind::Mqtts),
            "wss": listener(ListenerKind::Wss),
        },
        "tls": {
            "cert_file": format!("{TLS_DIR}/tls.crt"),
            "key_file": format!("{TLS_DIR}/tls.key"),
            "ca_file": null,
        },
        "admin": {
            "bind": format!("0.0.0.0:{ADMIN_PORT}"),
            "token_file": format!("{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"),
        },
        "mqtt": {
            "max_packet_size": spec.limits.max_packet_size,
            "receive_maximum": 32,
            "max_keepalive": 65535,
            "topic_alias_maximum": 64,
            "retain_available": true,
            "max_qos": 2,
            "shared_subscription_strategy": spec.shared_subscription_strategy,
        },
        "sessions": {
            "max_offline_queue": spec.sessions.max_offline_queue,
            "queue_full_policy": spec.sessions.queue_full_policy,
            "max_session_expiry": spec.sessions.max_session_expiry_seconds,
        },
        "limits": {
            "max_connections": spec.limits.max_connections,
            "max_conn_rate": spec.limits.max_conn_rate,
            "message_rate": spec.limits.message_rate,
            "byte_rate": spec.limits.byte_rate,
            "max_subscriptions": spec.limits.max_subscriptions,
        },
        "auth": {
            "allow_anonymous": auth.anonymous_allowed(),
            "users_file": auth.users_secret.as_ref().map(|_| format!("{AUTH_DIR}/users")),
            "client_ids": auth.client_ids,
            "http": auth.http.as_ref().map(|h| json!({ "url": h.url, "timeout_ms": h.timeout_ms })),
        },
        "acl": acl(cluster),
        "auto_subscriptions": spec.auto_subscriptions.iter()
            .map(|s| json!({ "topic": s.topic, "qos": s.qos })).collect::<Vec<_>>(),
        "webhooks": spec.webhooks.iter()
            .map(|w| json!({ "name": w.name, "url": w.url, "events": w.events })).collect::<Vec<_>>(),
        "cluster": {
            "port": CLUSTER_PORT,
            "discovery": "kubernetes",
            "secret_file": format!("{CLUSTER_SECRET_DIR}/{CLUSTER_SECRET_KEY}"),
            "kubernetes": { "namespace": names.namespace, "service": names.headless_service() },
            "dns_name": null,
            "peers": [],
        },
        "shutdown": { "drain_timeout": spec.upgrade_strategy.drain_timeout_seconds },
    });
    // Sections still at the broker's defaults are left out, as are nulls: every field is optional
    // and defaulted by the broker, and a smaller file keeps older brokers (which reject unknown
    // sections) working with default specs.
    let defaults = [
        (
            "auth",
            json!({ "allow_anonymous": true, "users_file": null, "client_ids": [], "http": null }),
        ),
        ("acl", json!({ "no_match": "allow", "rules": [] })),
        ("auto_subscriptions", json!([])),
        ("webhooks", json!([])),
    ];
    if let Value::Object(map) = &mut config {
        for (key, default) in defaults {
            if map.get(key) == Some(&default) {
                map.remove(key);
            }
        }
    }
    strip_nulls(&mut config);
    // Keys below are outside the baseline file shape, so they are written only when switched on.
    if let Some(es) = &spec.event_store {
        config["event_store"] = event_store(es);
    }
    if spec.rebalance.enabled {
        config["cluster"]["rebalance"] = json!({ "enabled": true, "rate": spec.rebalance.rate });
    }
    if spec.persistence.mode == PersistenceMode::Pvc {
        config["persistence"] = json!({ "data_dir": DATA_DIR });
    }
    if !spec.bridges.is_empty() {
        config["bridges"] = bridges(cluster);
    }
    config
}

/// The `bridges` section; Secret-backed values become files under [`BRIDGES_DIR`]/<bridge>/.
fn bridges(cluster: &MqttCluster) -> Value {
    let b = &cluster.spec.bridges;
    let file = |bridge: &str, name: &str| format!("{BRIDGES_DIR}/{bridge}/{name}");
    let mqtt: Vec<Value> = b
        .mqtt
        .iter()
        .map(|m| {
            let r = &m.remote;
            let mut remote = json!({
                "host": r.host,
                "port": r.port,
                "username": r.username,
                "password_file": r.password_secret.as_ref().map(|_| file(&m.name, "password")),
                "client_id": r.client_id,
            });
            if let Some(t) = &r.tls {
                let client = t.client_cert_secret.is_some();
                remote["tls"] = json!({
                    "ca_file": t.ca_secret.as_ref().map(|_| file(&m.name, "ca.crt")),
                    "cert_file": client.then(|| file(&m.name, "tls.crt")),
                    "key_file": client.then(|| file(&m.name, "tls.key")),
                });
            }
            json!({
                "name": m.name,
                "remote": remote,
                "egress": m.egress.iter().map(|e| json!({
                    "local_filter": e.local_filter, "remote_prefix": e.remote_prefix,
                    "qos": e.qos, "retain": e.retain,
                })).collect::<Vec<_>>(),
                "ingress": m.ingress.iter().map(|i| json!({
                    "remote_filter": i.remote_filter, "local_prefix": i.local_prefix, "qos": i.qos,
                })).collect::<Vec<_>>(),
                "buffer": { "max_messages": m.buffer_max_messages },
            })
        })
        .collect();
    let kafka: Vec<Value> = b
        .kafka
        .iter()
        .map(|k| {
            json!({
                "name": k.name,
                "bootstrap": k.bootstrap,
                "topic": k.topic,
                "filters": k.filters,
                "key": k.key.as_config(),
                "acks": "all",
                "batch": { "max_messages": k.batch_max_messages, "linger_ms": k.linger_ms },
                "buffer": { "max_messages": k.buffer_max_messages },
            })
        })
        .collect();
    let mut section = json!({ "mqtt": mqtt, "kafka": kafka });
    strip_nulls(&mut section);
    section
}

fn acl(cluster: &MqttCluster) -> Value {
    let acl = &cluster.spec.acl;
    let rules: Vec<Value> = acl
        .rules
        .iter()
        .map(|r| {
            let who = match (&r.who.user, &r.who.client_id, &r.who.ip_cidr) {
                (Some(u), _, _) => json!({ "user": u }),
                (_, Some(c), _) => json!({ "client_id": c }),
                (_, _, Some(ip)) => json!({ "ip_cidr": ip }),
                _ => json!("all"),
            };
            json!({ "permission": r.permission, "who": who, "action": r.action, "topics": r.topics })
        })
        .collect();
    json!({ "no_match": acl.no_match, "rules": rules })
}

/// Removes null-valued keys recursively (the broker defaults them).
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Merges `overlay` into `base`: objects merge key by key, anything else replaces.
pub fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => merge_maps(b, o),
        (b, o) => *b = o.clone(),
    }
}

fn merge_maps(base: &mut Map<String, Value>, overlay: &Map<String, Value>) {
    for (key, value) in overlay {
        match base.get_mut(key) {
            Some(existing) => deep_merge(existing, value),
            None => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The final corvid.yaml: base configuration with `spec.config` merged on top, and its hash.
pub fn render(cluster: &MqttCluster, names: &Names, valid: &Validated) -> Rendered {
    let mut config = base(cluster, names);
    if let Some(overrides) = &valid.config_overrides {
        deep_merge(&mut config, overrides);
    }
    // serde_yaml cannot fail on a serde_json::Value (string keys, no non-finite floats survive JSON).
    let yaml = serde_yaml::to_string(&config).unwrap_or_default();
    let hash = hex(&Sha256::digest(yaml.as_bytes()));
    Rendered { yaml, hash }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The broker's `event_store` section; passwords are files from the projected Secrets.
fn event_store(es: &corvid_crds::EventStoreSpec) -> Value {
    let tuning = |t: &corvid_crds::EventStoreTuning| {
        json!({
            "batch": { "max_rows": t.batch_max_rows, "linger_ms": t.batch_linger_ms },
            "buffer": { "max_events": t.buffer_max_events },
        })
    };
    let mut out = json!({});
    if let Some(p) = &es.postgres {
        let mut v = json!({
            "url": p.url,
            "table_prefix": p.table_prefix,
            "message_filters": p.message_filters,
        });
        if !p.events.is_empty() {
            v["events"] = json!(p.events);
        }
        if p.password_secret.is_some() {
            v["password_file"] = json!(format!("{EVENTSTORE_DIR}/postgres-password"));
        }
        deep_merge(&mut v, &tuning(&p.tuning));
        out["postgres"] = v;
    }
    if let Some(r) = &es.redis {
        let mut v = json!({
            "url": r.url,
            "key_prefix": r.key_prefix,
            "stream_maxlen": r.stream_max_len,
            "message_filters": r.message_filters,
        });
        if let Some(u) = &r.username {
            v["username"] = json!(u);
        }
        if !r.events.is_empty() {
            v["events"] = json!(r.events);
        }
        if r.password_secret.is_some() {
            v["password_file"] = json!(format!("{EVENTSTORE_DIR}/redis-password"));
        }
        deep_merge(&mut v, &tuning(&r.tuning));
        out["redis"] = v;
    }
    out
}
