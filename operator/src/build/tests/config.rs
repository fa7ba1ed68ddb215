//! corvid.yaml rendering, merging and hashing.

use std::path::Path;

use corvid_config::{AclWho, Config, Discovery, QueueFullPolicy, SharedStrategy};
use serde_json::{json, Value};

use super::build;
use crate::build::config::{render, Rendered};
use crate::testing::cluster;
use crate::validate::validate;

/// What a broker pod would run with: the rendered file read by the broker's own loader.
fn loaded(spec: Value) -> Config {
    let (_, r) = rendered(spec);
    Config::from_text("test", &r.yaml, [], &Default::default()).expect("the broker accepts it")
}

fn rendered(spec: Value) -> (Value, Rendered) {
    let c = cluster(spec);
    let r = render(&validate(&c).expect("valid"));
    let v: Value = serde_yaml::from_str(&r.yaml).expect("rendered YAML parses");
    (v, r)
}

#[test]
fn default_spec_renders_the_contract_shape() {
    let c = loaded(json!({}));
    let mqtt = &c.listeners.mqtt;
    assert!(mqtt.enabled && !mqtt.proxy_protocol && mqtt.proxy_trusted.is_empty());
    assert_eq!(mqtt.bind.to_string(), "0.0.0.0:1883");
    assert_eq!(c.listeners.ws.path, "/mqtt");
    assert!(!c.listeners.mqtts.enabled);
    assert_eq!(c.admin.bind.to_string(), "0.0.0.0:18083");
    assert_eq!(
        c.admin.token_file.as_deref(),
        Some(Path::new("/etc/corvid/admin/token"))
    );
    assert_eq!(c.cluster.discovery, Discovery::Kubernetes);
    assert_eq!(c.cluster.kubernetes.namespace.as_deref(), Some("mqtt"));
    assert_eq!(
        c.cluster.kubernetes.service.as_deref(),
        Some("demo-headless")
    );
    assert_eq!(
        c.cluster.secret_file.as_deref(),
        Some(Path::new("/etc/corvid/cluster/secret"))
    );
    assert_eq!(
        c.cluster.accepted_secret_files,
        vec![Path::new("/etc/corvid/cluster/accepted").to_path_buf()]
    );
    assert_eq!(
        c.mqtt.shared_subscription_strategy,
        SharedStrategy::RoundRobin
    );
    assert_eq!(c.sessions.max_session_expiry, 7200);
    assert_eq!(c.shutdown.drain_timeout, 60);
    assert_eq!(c.log.format, corvid_config::LogFormat::Json);
    assert!(c.persistence.data_dir.is_none());
    // The file says only what differs from the broker's defaults.
    let (v, _) = rendered(json!({}));
    assert!(v.get("auth").is_none() && v.get("acl").is_none() && v.get("webhooks").is_none());
    assert!(v.get("node").is_none() && v.get("bridges").is_none());
    assert!(v.get("event_store").is_none() && v.get("persistence").is_none());
    assert!(
        v["mqtt"].get("receive_maximum").is_none(),
        "no copied defaults"
    );
}

#[test]
fn spec_sections_map_to_broker_keys() {
    let c = loaded(json!({
        "auth": {"allowAnonymous": false, "usersSecret": {"name": "users"}, "clientIds": ["a"], "http": {"url": "http://auth"}},
        "acl": {"noMatch": "deny", "rules": [{"permission": "allow", "who": {"user": "u"}, "action": "publish", "topics": ["t/#"]}]},
        "limits": {"messageRate": "10,20", "maxConnections": 5},
        "sessions": {"queueFullPolicy": "drop_new"},
        "sharedSubscriptionStrategy": "hash_clientid",
        "autoSubscriptions": [{"topic": "devices/%c/cmd", "qos": 1}],
        "persistence": {"mode": "pvc"},
    }));
    assert!(!c.auth.allow_anonymous);
    assert_eq!(
        c.auth.users_file.as_deref(),
        Some(Path::new("/etc/corvid/auth/users"))
    );
    assert_eq!(c.auth.client_ids, vec!["a".to_string()]);
    assert_eq!(
        c.auth.http.as_ref().map(|h| h.url.as_str()),
        Some("http://auth")
    );
    assert_eq!(c.acl.no_match, corvid_config::Permission::Deny);
    let rule = &c.acl.rules[0];
    assert_eq!(rule.permission, corvid_config::Permission::Allow);
    assert_eq!(rule.action, corvid_config::AclAction::Publish);
    assert_eq!(rule.topics, vec!["t/#".to_string()]);
    assert!(
        matches!(&rule.who, AclWho::One(w) if w.user.as_deref() == Some("u") && w.client_id.is_none())
    );
    assert_eq!(c.limits.message_rate.as_deref(), Some("10,20"));
    assert_eq!(c.limits.max_connections, 5);
    assert_eq!(c.sessions.queue_full_policy, QueueFullPolicy::DropNew);
    assert_eq!(
        c.mqtt.shared_subscription_strategy,
        SharedStrategy::HashClientid
    );
    assert_eq!(c.auto_subscriptions[0].topic, "devices/%c/cmd");
    assert_eq!(c.auto_subscriptions[0].qos, 1);
    assert_eq!(
        c.persistence.data_dir.as_deref(),
        Some(Path::new("/var/lib/corvid"))
    );
}

#[test]
fn event_store_renders_the_broker_section() {
    let c = loaded(json!({"eventStore": {
        "postgres": {"url": "postgres://corvid@db:5432/corvid", "passwordSecret": {"name": "pg"},
                     "messageFilters": ["alerts/#"], "tuning": {"batchMaxRows": 100}},
        "redis": {"url": "redis://cache:6379/0", "username": "corvid", "events": ["client.connected"]},
    }}));
    let pg = c.event_store.postgres.expect("postgres");
    assert_eq!(pg.url.as_deref(), Some("postgres://corvid@db:5432/corvid"));
    assert_eq!(
        pg.password_file.as_deref(),
        Some(Path::new("/etc/corvid/eventstore/postgres-password"))
    );
    assert_eq!(pg.table_prefix, "corvid_");
    assert_eq!(pg.message_filters, vec!["alerts/#".to_string()]);
    assert_eq!((pg.batch.max_rows, pg.batch.linger_ms), (100, 100));
    assert_eq!(pg.buffer.max_events, 100_000);
    let redis = c.event_store.redis.expect("redis");
    assert_eq!(redis.url, "redis://cache:6379/0");
    assert_eq!(redis.username.as_deref(), Some("corvid"));
    assert_eq!(redis.events, vec!["client.connected".to_string()]);
    assert_eq!(redis.key_prefix, "corvid:");
    assert_eq!(redis.stream_maxlen, 100_000);
    assert!(redis.password_file.is_none());
    assert_eq!((redis.batch.max_rows, redis.batch.linger_ms), (500, 100));
    let (plain, _) = rendered(json!({}));
    assert!(plain.get("event_store").is_none());
}

#[test]
fn free_form_config_is_deep_merged_on_top() {
    let (v, _) = rendered(json!({"config": {"log": {"level": "debug"}, "mqtt": {"max_qos": 1}}}));
    assert_eq!(v["log"], json!({"level": "debug", "format": "json"}));
    let c = loaded(json!({"config": {"log": {"level": "debug"}, "mqtt": {"max_qos": 1}}}));
    assert_eq!(c.mqtt.max_qos, 1);
    assert_eq!(c.log.level, "debug");
    assert_eq!(
        c.listeners.mqtt.bind.to_string(),
        "0.0.0.0:1883",
        "siblings survive the merge"
    );
}

#[test]
fn a_bad_override_is_an_invalid_spec_naming_the_field() {
    let err = |config: Value| {
        validate(&cluster(json!({ "config": config })))
            .expect_err("refused")
            .to_string()
    };
    let typo = err(json!({"mqtt": {"max_qoss": 1}}));
    assert!(typo.starts_with("spec.config.mqtt"), "{typo}");
    assert!(typo.contains("max_qoss"), "{typo}");
    let unknown = err(json!({"extra": {"x": 1}}));
    assert!(
        unknown.contains("spec.config") && unknown.contains("extra"),
        "{unknown}"
    );
    let shape = err(json!({"mqtt": {"max_qos": "two"}}));
    assert!(shape.starts_with("spec.config.mqtt.max_qos"), "{shape}");
    let value = err(json!({"mqtt": {"max_qos": 3}}));
    assert_eq!(value, "spec.config.mqtt.max_qos: must be 0, 1 or 2");
    let topic = err(json!({"acl": {"rules": [{"permission": "deny", "topics": ["a/#/b"]}]}}));
    assert!(
        topic.starts_with("spec.config.acl.rules[0].topics[0]"),
        "{topic}"
    );
}

#[test]
fn tls_modes_decide_what_the_broker_listens_on() {
    let broker = loaded(json!({
        "listeners": {"mqtts": {"enabled": true, "port": 8883}},
        "tls": {"mode": "broker", "secretName": "certs"},
    }));
    assert!(broker.listeners.mqtts.enabled);
    assert_eq!(broker.tls.cert_file, Path::new("/etc/corvid/tls/tls.crt"));
    assert_eq!(broker.tls.key_file, Path::new("/etc/corvid/tls/tls.key"));

    // At the load balancer: the broker serves plain MQTT (even if the plain listener is not
    // exposed) and expects PROXY headers when asked.
    let lb = loaded(json!({
        "service": {"type": "LoadBalancer"},
        "auth": {"allowAnonymous": true},
        "listeners": {"mqtt": {"enabled": false, "port": 1883}, "mqtts": {"enabled": true, "port": 8883}},
        "tls": {"mode": "loadBalancer", "loadBalancer": {"provider": "aws", "certificate": "arn:x", "proxyProtocol": true,
                "proxyTrustedRanges": ["10.0.0.0/16"]}},
    }));
    assert!(!lb.listeners.mqtts.enabled);
    assert!(lb.listeners.mqtt.enabled);
    assert!(lb.listeners.mqtt.proxy_protocol);
    assert_eq!(
        lb.listeners.mqtt.proxy_trusted,
        vec!["10.0.0.0/16".to_string()],
        "PROXY headers are believed only from the load balancer's ranges"
    );
}

#[test]
fn hash_follows_configuration_not_scale_or_certificates() {
    let (_, base) = rendered(json!({}));
    let (_, scaled) = rendered(json!({"replicas": 5}));
    assert_eq!(base.hash, scaled.hash, "scaling must not roll pods");
    let broker_a = json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}}, "tls": {"mode": "broker", "issuerRef": {"name": "a"}}});
    let broker_b = json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}}, "tls": {"mode": "broker", "issuerRef": {"name": "b"}}});
    assert_eq!(
        rendered(broker_a).1.hash,
        rendered(broker_b).1.hash,
        "certificate source is not configuration"
    );
    let (_, tuned) = rendered(json!({"limits": {"maxConnections": 10}}));
    assert_ne!(
        base.hash, tuned.hash,
        "a configuration change rolls the pods"
    );
    assert_eq!(base.hash.len(), 64);
}

#[test]
fn config_map_carries_the_rendered_file() {
    let (_, d) = build(json!({}));
    let data = d.config_map.data.expect("data");
    assert!(data["corvid.yaml"].contains("discovery: kubernetes"));
    assert_eq!(d.config_map.metadata.name.as_deref(), Some("demo-config"));
}

#[test]
fn bridges_render_with_secret_backed_files() {
    let c = loaded(json!({
        "bridges": {
            "mqtt": [{
                "name": "hub",
                "remote": {
                    "host": "hub.example", "port": 8883, "username": "site-1",
                    "passwordSecret": {"name": "hub-creds", "key": "password"},
                    "tls": {"caSecret": {"name": "hub-ca", "key": "ca.pem"}, "clientCertSecret": "hub-device"},
                },
                "egress": [{"localFilter": "sensors/#", "remotePrefix": "site-1/"}],
                "ingress": [{"remoteFilter": "cmd/#", "localPrefix": "hub/", "qos": 0}],
            }],
            "kafka": [{"name": "events", "bootstrap": ["k:9092"], "topic": "mqtt-events", "filters": ["#"], "key": "topic"}],
        },
    }));
    let hub = &c.bridges.mqtt[0];
    let dir = Path::new("/etc/corvid/bridges/hub");
    assert_eq!(
        (hub.remote.host.as_str(), hub.remote.port),
        ("hub.example", 8883)
    );
    assert_eq!(hub.remote.username.as_deref(), Some("site-1"));
    assert_eq!(
        hub.remote.password_file.as_deref(),
        Some(dir.join("password").as_path())
    );
    let tls = hub.remote.tls.as_ref().expect("tls");
    assert_eq!(tls.ca_file.as_deref(), Some(dir.join("ca.crt").as_path()));
    assert_eq!(
        tls.cert_file.as_deref(),
        Some(dir.join("tls.crt").as_path())
    );
    assert_eq!(tls.key_file.as_deref(), Some(dir.join("tls.key").as_path()));
    let e = &hub.egress[0];
    assert_eq!(
        (e.local_filter.as_str(), e.remote_prefix.as_str(), e.qos),
        ("sensors/#", "site-1/", 1)
    );
    let i = &hub.ingress[0];
    assert_eq!(
        (i.remote_filter.as_str(), i.local_prefix.as_str(), i.qos),
        ("cmd/#", "hub/", 0)
    );
    assert_eq!(hub.buffer.max_messages, 10_000);
    let k = &c.bridges.kafka[0];
    assert_eq!(
        (k.name.as_str(), k.topic.as_str()),
        ("events", "mqtt-events")
    );
    assert_eq!(k.key, corvid_config::KafkaKey::Topic);
    assert_eq!(k.acks, corvid_config::KafkaAcks::All);
    assert_eq!((k.batch.max_messages, k.batch.linger_ms), (500, 10));
    assert_eq!(k.buffer.max_messages, 10_000);
    let (plain, _) = rendered(json!({}));
    assert!(plain.get("bridges").is_none(), "no section without bridges");
}

#[test]
fn bridge_names_are_unique() {
    let c = cluster(json!({"bridges": {
        "mqtt": [{"name": "x", "remote": {"host": "h"}, "egress": [{"localFilter": "a"}]}],
        "kafka": [{"name": "x", "bootstrap": ["k:1"], "topic": "t", "filters": ["a"]}],
    }}));
    let err = validate(&c).expect_err("duplicate");
    assert!(err.to_string().contains("\"x\" is used twice"), "{err}");
}
