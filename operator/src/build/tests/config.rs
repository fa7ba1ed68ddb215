//! corvid.yaml rendering, merging and hashing.

use serde_json::{json, Value};

use super::build;
use crate::build::config::{deep_merge, render, Rendered};
use crate::build::Names;
use crate::testing::cluster;
use crate::validate::validate;

fn rendered(spec: Value) -> (Value, Rendered) {
    let c = cluster(spec);
    let r = render(&c, &Names::of(&c), &validate(&c).expect("valid"));
    let v: Value = serde_yaml::from_str(&r.yaml).expect("rendered YAML parses");
    (v, r)
}

#[test]
fn default_spec_renders_the_contract_shape() {
    let (v, _) = rendered(json!({}));
    assert_eq!(
        v["listeners"]["mqtt"],
        json!({"enabled": true, "bind": "0.0.0.0:1883", "proxy_protocol": false, "proxy_trusted": []})
    );
    assert_eq!(v["listeners"]["ws"]["path"], json!("/mqtt"));
    assert_eq!(v["listeners"]["mqtts"]["enabled"], json!(false));
    assert_eq!(v["admin"]["bind"], json!("0.0.0.0:18083"));
    assert_eq!(v["cluster"]["discovery"], json!("kubernetes"));
    assert_eq!(
        v["cluster"]["kubernetes"],
        json!({"namespace": "mqtt", "service": "demo-headless"})
    );
    assert_eq!(
        v["cluster"]["secret_file"],
        json!("/etc/corvid/cluster/secret")
    );
    assert_eq!(
        v["mqtt"]["shared_subscription_strategy"],
        json!("round_robin")
    );
    assert_eq!(v["sessions"]["max_session_expiry"], json!(7200));
    assert_eq!(v["shutdown"]["drain_timeout"], json!(60));
    // Default sections and nulls are left to the broker's defaults.
    assert!(v.get("auth").is_none() && v.get("acl").is_none() && v.get("webhooks").is_none());
    assert!(v["node"].get("name").is_none());
    assert!(v.get("persistence").is_none());
}

#[test]
fn spec_sections_map_to_broker_keys() {
    let (v, _) = rendered(json!({
        "auth": {"allowAnonymous": false, "usersSecret": {"name": "users"}, "clientIds": ["a"], "http": {"url": "http://auth"}},
        "acl": {"noMatch": "deny", "rules": [{"permission": "allow", "who": {"user": "u"}, "action": "publish", "topics": ["t/#"]}]},
        "limits": {"messageRate": "10,20", "maxConnections": 5},
        "sessions": {"queueFullPolicy": "drop_new"},
        "sharedSubscriptionStrategy": "hash_clientid",
        "autoSubscriptions": [{"topic": "devices/%c/cmd", "qos": 1}],
        "persistence": {"mode": "pvc"},
    }));
    assert_eq!(v["auth"]["allow_anonymous"], json!(false));
    assert_eq!(v["auth"]["users_file"], json!("/etc/corvid/auth/users"));
    assert_eq!(v["auth"]["http"]["url"], json!("http://auth"));
    assert_eq!(v["acl"]["no_match"], json!("deny"));
    assert_eq!(
        v["acl"]["rules"][0],
        json!({"permission": "allow", "who": {"user": "u"}, "action": "publish", "topics": ["t/#"]})
    );
    assert_eq!(v["limits"]["message_rate"], json!("10,20"));
    assert_eq!(v["limits"]["max_connections"], json!(5));
    assert_eq!(v["sessions"]["queue_full_policy"], json!("drop_new"));
    assert_eq!(
        v["mqtt"]["shared_subscription_strategy"],
        json!("hash_clientid")
    );
    assert_eq!(
        v["auto_subscriptions"],
        json!([{"topic": "devices/%c/cmd", "qos": 1}])
    );
    assert_eq!(v["persistence"]["data_dir"], json!("/var/lib/corvid"));
}

#[test]
fn event_store_renders_the_broker_section() {
    let (v, _) = rendered(json!({"eventStore": {
        "postgres": {"url": "postgres://corvid@db:5432/corvid", "passwordSecret": {"name": "pg"},
                     "messageFilters": ["alerts/#"], "tuning": {"batchMaxRows": 100}},
        "redis": {"url": "redis://cache:6379/0", "username": "corvid", "events": ["client.connected"]},
    }}));
    assert_eq!(
        v["event_store"]["postgres"],
        json!({
            "url": "postgres://corvid@db:5432/corvid",
            "password_file": "/etc/corvid/eventstore/postgres-password",
            "table_prefix": "corvid_",
            "message_filters": ["alerts/#"],
            "batch": {"max_rows": 100, "linger_ms": 100},
            "buffer": {"max_events": 100000},
        })
    );
    assert_eq!(
        v["event_store"]["redis"],
        json!({
            "url": "redis://cache:6379/0",
            "username": "corvid",
            "events": ["client.connected"],
            "key_prefix": "corvid:",
            "stream_maxlen": 100000,
            "message_filters": [],
            "batch": {"max_rows": 500, "linger_ms": 100},
            "buffer": {"max_events": 100000},
        })
    );
    let (plain, _) = rendered(json!({}));
    assert!(plain.get("event_store").is_none());
}

#[test]
fn free_form_config_is_deep_merged_on_top() {
    let (v, _) = rendered(
        json!({"config": {"log": {"level": "debug"}, "mqtt": {"max_qos": 1}, "extra": {"x": 1}}}),
    );
    assert_eq!(v["log"], json!({"level": "debug", "format": "json"}));
    assert_eq!(v["mqtt"]["max_qos"], json!(1));
    assert_eq!(
        v["mqtt"]["receive_maximum"],
        json!(32),
        "siblings survive the merge"
    );
    assert_eq!(v["extra"], json!({"x": 1}));
}

#[test]
fn deep_merge_replaces_non_objects() {
    let mut base = json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
    deep_merge(&mut base, &json!({"a": {"c": [3]}, "d": {"e": 2}}));
    assert_eq!(base, json!({"a": {"b": 1, "c": [3]}, "d": {"e": 2}}));
}

#[test]
fn tls_modes_decide_what_the_broker_listens_on() {
    let (broker, _) = rendered(json!({
        "listeners": {"mqtts": {"enabled": true, "port": 8883}},
        "tls": {"mode": "broker", "secretName": "certs"},
    }));
    assert_eq!(broker["listeners"]["mqtts"]["enabled"], json!(true));
    assert_eq!(broker["tls"]["cert_file"], json!("/etc/corvid/tls/tls.crt"));

    // At the load balancer: the broker serves plain MQTT (even if the plain listener is not
    // exposed) and expects PROXY headers when asked.
    let (lb, _) = rendered(json!({
        "service": {"type": "LoadBalancer"},
        "auth": {"allowAnonymous": true},
        "listeners": {"mqtt": {"enabled": false, "port": 1883}, "mqtts": {"enabled": true, "port": 8883}},
        "tls": {"mode": "loadBalancer", "loadBalancer": {"provider": "aws", "certificate": "arn:x", "proxyProtocol": true,
                "proxyTrustedRanges": ["10.0.0.0/16"]}},
    }));
    assert_eq!(lb["listeners"]["mqtts"]["enabled"], json!(false));
    assert_eq!(lb["listeners"]["mqtt"]["enabled"], json!(true));
    assert_eq!(lb["listeners"]["mqtt"]["proxy_protocol"], json!(true));
    assert_eq!(
        lb["listeners"]["mqtt"]["proxy_trusted"],
        json!(["10.0.0.0/16"]),
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
    let (v, _) = rendered(json!({
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
    let hub = &v["bridges"]["mqtt"][0];
    assert_eq!(
        hub["remote"],
        json!({
            "host": "hub.example", "port": 8883, "username": "site-1",
            "password_file": "/etc/corvid/bridges/hub/password",
            "tls": {
                "ca_file": "/etc/corvid/bridges/hub/ca.crt",
                "cert_file": "/etc/corvid/bridges/hub/tls.crt",
                "key_file": "/etc/corvid/bridges/hub/tls.key",
            },
        })
    );
    assert_eq!(
        hub["egress"],
        json!([{"local_filter": "sensors/#", "remote_prefix": "site-1/", "qos": 1}])
    );
    assert_eq!(
        hub["ingress"],
        json!([{"remote_filter": "cmd/#", "local_prefix": "hub/", "qos": 0}])
    );
    assert_eq!(hub["buffer"], json!({"max_messages": 10000}));
    assert_eq!(
        v["bridges"]["kafka"][0],
        json!({
            "name": "events", "bootstrap": ["k:9092"], "topic": "mqtt-events", "filters": ["#"],
            "key": "topic", "acks": "all", "batch": {"max_messages": 500, "linger_ms": 10},
            "buffer": {"max_messages": 10000},
        })
    );
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
