//! Builds the broker configuration (`corvid.yaml`) from the spec as the broker's own typed
//! `corvid_config::Config`, deep-merges `spec.config` over it, validates the result with the
//! broker's own code (so a bad override is an `InvalidSpec`, never a crash-looping pod), and
//! hashes the file so that a configuration change (and only that) rolls the pods.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use corvid_config as cfg;
use corvid_config::Config;
use corvid_crds::{ListenerKind, MqttCluster, PersistenceMode, TlsMode, ADMIN_PORT, CLUSTER_PORT};
use sha2::{Digest, Sha256};

use super::Names;
use crate::validate::{InvalidSpec, Validated};

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
/// Key of the cluster Secret holding the other secret the brokers accept during a rotation
/// (absent or empty otherwise; file name under CLUSTER_SECRET_DIR). The brokers re-read both
/// files while they run, so a rotation needs no restart (`docs/security.md`).
pub const CLUSTER_SECRET_ACCEPTED_KEY: &str = "accepted";
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

/// Whether the client Service's traffic carries a PROXY protocol header (only when the load
/// balancer sends it); each listener follows the Services that reach it (`service::proxy_trust`).
pub fn proxy_protocol(cluster: &MqttCluster) -> bool {
    let tls = &cluster.spec.tls;
    tls.mode == TlsMode::LoadBalancer
        && tls
            .load_balancer
            .as_ref()
            .is_some_and(|lb| lb.proxy_protocol)
}

/// The source ranges the client Service's PROXY headers are believed from.
pub fn proxy_trusted(cluster: &MqttCluster) -> Vec<String> {
    let lb = cluster.spec.tls.load_balancer.as_ref();
    lb.map(|lb| lb.proxy_trusted_ranges.clone())
        .unwrap_or_default()
}

/// A spec integer that must fit the broker's field; the CRD's bounds keep it in range, and an
/// object admitted without them gets an `InvalidSpec` naming the field.
fn fit<T: TryFrom<i64>>(value: i64, field: &str) -> Result<T, InvalidSpec> {
    T::try_from(value).map_err(|_| InvalidSpec(format!("{field}: {value} is out of range")))
}

/// Every pod listens on all its addresses.
fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// The configuration built from the spec, before `spec.config` is merged.
pub fn typed(cluster: &MqttCluster, names: &Names) -> Result<Config, InvalidSpec> {
    let spec = &cluster.spec;
    let mut c = Config::default();
    c.log.format = cfg::LogFormat::Json;
    for kind in ListenerKind::ALL {
        let port = fit(
            spec.listeners.get(kind).port.into(),
            &format!("spec.listeners.{}.port", kind.name()),
        )?;
        let l = match kind {
            ListenerKind::Mqtt => &mut c.listeners.mqtt,
            ListenerKind::Ws => &mut c.listeners.ws,
            ListenerKind::Mqtts => &mut c.listeners.mqtts,
            ListenerKind::Wss => &mut c.listeners.wss,
        };
        let trust = super::service::proxy_trust(cluster, kind)?;
        l.enabled = broker_serves(cluster, kind);
        l.bind = any_addr(port);
        l.proxy_protocol = trust.proxy_protocol;
        l.proxy_trusted = trust.proxy_trusted;
    }
    c.tls.cert_file = PathBuf::from(format!("{TLS_DIR}/tls.crt"));
    c.tls.key_file = PathBuf::from(format!("{TLS_DIR}/tls.key"));
    c.admin.bind = any_addr(fit(ADMIN_PORT.into(), "admin port")?);
    c.admin.token_file = Some(format!("{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}").into());
    let limits = &spec.limits;
    c.mqtt.max_packet_size = fit(limits.max_packet_size, "spec.limits.maxPacketSize")?;
    c.mqtt.shared_subscription_strategy = spec.shared_subscription_strategy.into();
    let sessions = &spec.sessions;
    c.sessions.max_offline_queue =
        fit(sessions.max_offline_queue, "spec.sessions.maxOfflineQueue")?;
    c.sessions.queue_full_policy = sessions.queue_full_policy.into();
    c.sessions.max_session_expiry = fit(
        sessions.max_session_expiry_seconds,
        "spec.sessions.maxSessionExpirySeconds",
    )?;
    c.limits.max_connections = fit(limits.max_connections, "spec.limits.maxConnections")?;
    c.limits.max_conn_rate = fit(limits.max_conn_rate, "spec.limits.maxConnRate")?;
    c.limits.message_rate = limits.message_rate.clone();
    c.limits.byte_rate = limits.byte_rate.clone();
    c.limits.max_subscriptions = fit(limits.max_subscriptions, "spec.limits.maxSubscriptions")?;
    let auth = &spec.auth;
    c.auth.allow_anonymous = auth.anonymous_allowed();
    c.auth.users_file = auth
        .users_secret
        .as_ref()
        .map(|_| format!("{AUTH_DIR}/users").into());
    c.auth.client_ids = auth.client_ids.clone();
    if let Some(h) = &auth.http {
        c.auth.http = Some(cfg::HttpAuthConfig {
            url: h.url.clone(),
            timeout_ms: fit(h.timeout_ms, "spec.auth.http.timeoutMs")?,
            ..Default::default()
        });
    }
    c.acl.no_match = spec.acl.no_match.into();
    c.acl.rules = spec.acl.rules.iter().map(Into::into).collect();
    c.auto_subscriptions = spec
        .auto_subscriptions
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(cfg::AutoSubscription {
                topic: s.topic.clone(),
                qos: fit(s.qos.into(), &format!("spec.autoSubscriptions[{i}].qos"))?,
            })
        })
        .collect::<Result<_, InvalidSpec>>()?;
    c.webhooks = spec
        .webhooks
        .iter()
        .map(|w| cfg::WebhookConfig {
            name: w.name.clone(),
            url: w.url.clone(),
            events: w.events.clone(),
            ..Default::default()
        })
        .collect();
    c.cluster.port = fit(CLUSTER_PORT.into(), "cluster port")?;
    c.cluster.discovery = cfg::Discovery::Kubernetes;
    c.cluster.secret_file = Some(format!("{CLUSTER_SECRET_DIR}/{CLUSTER_SECRET_KEY}").into());
    c.cluster.accepted_secret_files =
        vec![format!("{CLUSTER_SECRET_DIR}/{CLUSTER_SECRET_ACCEPTED_KEY}").into()];
    c.cluster.kubernetes.namespace = Some(names.namespace.clone());
    c.cluster.kubernetes.service = Some(names.headless_service());
    if spec.rebalance.enabled {
        c.cluster.rebalance.enabled = true;
        c.cluster.rebalance.rate = fit(spec.rebalance.rate.into(), "spec.rebalance.rate")?;
    }
    c.shutdown.drain_timeout = fit(
        spec.upgrade_strategy.drain_timeout_seconds.into(),
        "spec.upgradeStrategy.drainTimeoutSeconds",
    )?;
    if let Some(es) = &spec.event_store {
        c.event_store = event_store(es)?;
    }
    if spec.persistence.mode == PersistenceMode::Pvc {
        c.persistence.data_dir = Some(DATA_DIR.into());
    }
    c.bridges = bridges(cluster)?;
    Ok(c)
}

/// The `bridges` section; Secret-backed values become files under [`BRIDGES_DIR`]/<bridge>/.
fn bridges(cluster: &MqttCluster) -> Result<cfg::BridgesConfig, InvalidSpec> {
    let b = &cluster.spec.bridges;
    let file = |bridge: &str, name: &str| PathBuf::from(format!("{BRIDGES_DIR}/{bridge}/{name}"));
    let mut out = cfg::BridgesConfig::default();
    for (i, m) in b.mqtt.iter().enumerate() {
        let at = format!("spec.bridges.mqtt[{i}]");
        let r = &m.remote;
        let tls = r.tls.as_ref().map(|t| {
            let client = t.client_cert_secret.is_some();
            cfg::BridgeTlsConfig {
                ca_file: t.ca_secret.as_ref().map(|_| file(&m.name, "ca.crt")),
                cert_file: client.then(|| file(&m.name, "tls.crt")),
                key_file: client.then(|| file(&m.name, "tls.key")),
            }
        });
        let egress = m
            .egress
            .iter()
            .enumerate()
            .map(|(j, e)| {
                Ok(cfg::MqttEgressRule {
                    local_filter: e.local_filter.clone(),
                    remote_prefix: e.remote_prefix.clone(),
                    qos: fit(e.qos.into(), &format!("{at}.egress[{j}].qos"))?,
                    retain: e.retain,
                })
            })
            .collect::<Result<_, InvalidSpec>>()?;
        let ingress = m
            .ingress
            .iter()
            .enumerate()
            .map(|(j, e)| {
                Ok(cfg::MqttIngressRule {
                    remote_filter: e.remote_filter.clone(),
                    local_prefix: e.local_prefix.clone(),
                    qos: fit(e.qos.into(), &format!("{at}.ingress[{j}].qos"))?,
                })
            })
            .collect::<Result<_, InvalidSpec>>()?;
        out.mqtt.push(cfg::MqttBridgeConfig {
            name: m.name.clone(),
            remote: cfg::MqttRemoteConfig {
                host: r.host.clone(),
                port: fit(r.port.into(), &format!("{at}.remote.port"))?,
                tls,
                username: r.username.clone(),
                password_file: r
                    .password_secret
                    .as_ref()
                    .map(|_| file(&m.name, "password")),
                client_id: r.client_id.clone(),
                ..Default::default()
            },
            egress,
            ingress,
            buffer: cfg::BridgeBufferConfig {
                max_messages: fit(m.buffer_max_messages, &format!("{at}.bufferMaxMessages"))?,
            },
            ..Default::default()
        });
    }
    for (i, k) in b.kafka.iter().enumerate() {
        let at = format!("spec.bridges.kafka[{i}]");
        out.kafka.push(cfg::KafkaBridgeConfig {
            name: k.name.clone(),
            bootstrap: k.bootstrap.clone(),
            topic: k.topic.clone(),
            filters: k.filters.clone(),
            key: k.key.into(),
            acks: cfg::KafkaAcks::All,
            batch: cfg::KafkaBatchConfig {
                max_messages: fit(k.batch_max_messages, &format!("{at}.batchMaxMessages"))?,
                linger_ms: fit(k.linger_ms, &format!("{at}.lingerMs"))?,
            },
            buffer: cfg::BridgeBufferConfig {
                max_messages: fit(k.buffer_max_messages, &format!("{at}.bufferMaxMessages"))?,
            },
            ..Default::default()
        });
    }
    Ok(out)
}

/// The broker's `event_store` section; passwords are files from the projected Secrets.
fn event_store(es: &corvid_crds::EventStoreSpec) -> Result<cfg::EventStoreConfig, InvalidSpec> {
    let batch = |t: &corvid_crds::EventStoreTuning, at: &str| {
        Ok::<_, InvalidSpec>(cfg::StoreBatchConfig {
            max_rows: fit(t.batch_max_rows, &format!("{at}.tuning.batchMaxRows"))?,
            linger_ms: fit(t.batch_linger_ms, &format!("{at}.tuning.batchLingerMs"))?,
        })
    };
    let buffer = |t: &corvid_crds::EventStoreTuning, at: &str| {
        Ok::<_, InvalidSpec>(cfg::StoreBufferConfig {
            max_events: fit(t.buffer_max_events, &format!("{at}.tuning.bufferMaxEvents"))?,
        })
    };
    let mut out = cfg::EventStoreConfig::default();
    if let Some(p) = &es.postgres {
        let at = "spec.eventStore.postgres";
        let mut pg = cfg::PostgresStoreConfig {
            url: Some(p.url.clone()),
            table_prefix: p.table_prefix.clone(),
            message_filters: p.message_filters.clone(),
            password_file: p
                .password_secret
                .as_ref()
                .map(|_| format!("{EVENTSTORE_DIR}/postgres-password").into()),
            batch: batch(&p.tuning, at)?,
            buffer: buffer(&p.tuning, at)?,
            ..Default::default()
        };
        if !p.events.is_empty() {
            pg.events = p.events.clone();
        }
        out.postgres = Some(pg);
    }
    if let Some(r) = &es.redis {
        let at = "spec.eventStore.redis";
        let mut rd = cfg::RedisStoreConfig {
            url: r.url.clone(),
            username: r.username.clone(),
            key_prefix: r.key_prefix.clone(),
            stream_maxlen: fit(r.stream_max_len, &format!("{at}.streamMaxLen"))?,
            message_filters: r.message_filters.clone(),
            password_file: r
                .password_secret
                .as_ref()
                .map(|_| format!("{EVENTSTORE_DIR}/redis-password").into()),
            batch: batch(&r.tuning, at)?,
            buffer: buffer(&r.tuning, at)?,
            ..Default::default()
        };
        if !r.events.is_empty() {
            rd.events = r.events.clone();
        }
        out.redis = Some(rd);
    }
    Ok(out)
}

/// Where a broker configuration error points: into `spec.config` when the user's override set
/// that field, else at the configuration the spec produced.
fn spec_error(e: cfg::ConfigError, overrides: Option<&serde_json::Value>) -> InvalidSpec {
    let (field, reason) = match e {
        cfg::ConfigError::Invalid { field, reason } => (field, reason),
        cfg::ConfigError::Parse { message, .. } => match message.split_once(": ") {
            Some((path, reason)) if !path.contains(' ') => (path.to_string(), reason.to_string()),
            _ => (String::new(), message),
        },
        other => (String::new(), other.to_string()),
    };
    let in_overrides = overrides.is_some_and(|o| sets(o, &field));
    match (field.is_empty(), in_overrides) {
        (true, _) => InvalidSpec(format!("spec.config: {reason}")),
        (false, true) => InvalidSpec(format!("spec.config.{field}: {reason}")),
        (false, false) => InvalidSpec(format!(
            "corvid.yaml `{field}` (built from the spec): {reason}"
        )),
    }
}

/// Whether `value` holds the dotted broker field `path` (`acl.rules[0].topics[1]`).
fn sets(value: &serde_json::Value, path: &str) -> bool {
    let mut at = value;
    for segment in path.split('.') {
        let mut parts = segment.split('[');
        let key = parts.next().unwrap_or_default();
        let Some(next) = at.get(key) else {
            return false;
        };
        at = next;
        for index in parts {
            let Some(next) = index
                .trim_end_matches(']')
                .parse::<usize>()
                .ok()
                .and_then(|i| at.get(i))
            else {
                return false;
            };
            at = next;
        }
    }
    true
}

/// The file the pods read: the spec's configuration, `spec.config` merged on top, validated
/// by the broker's own parser, as the fields that differ from the broker's defaults.
pub fn file(
    cluster: &MqttCluster,
    names: &Names,
    overrides: Option<&serde_json::Value>,
) -> Result<serde_yaml::Value, InvalidSpec> {
    let built = typed(cluster, names)?;
    let mut file = built
        .non_default_fields()
        .map_err(|e| InvalidSpec(format!("corvid.yaml: {e}")))?;
    if let Some(o) = overrides {
        let o = serde_yaml::to_value(o).map_err(|e| InvalidSpec(format!("spec.config: {e}")))?;
        cfg::merge(&mut file, o);
    }
    Config::from_yaml("spec", file.clone()).map_err(|e| spec_error(e, overrides))?;
    Ok(file)
}

/// The final corvid.yaml (validated) and its hash.
pub fn render(valid: &Validated) -> Rendered {
    // serde_yaml cannot fail on a mapping it produced itself.
    let yaml = serde_yaml::to_string(&valid.config_file).unwrap_or_default();
    let hash = hex(&Sha256::digest(yaml.as_bytes()));
    Rendered { yaml, hash }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
