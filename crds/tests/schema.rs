//! Schema tests: the generated CRD is structural, documented, defaulted, and its CEL rules both
//! exist and reject what they promise to reject (evaluated client-side with kube's CEL validator).

use corvid_crds::{MqttCluster, MqttClusterSpec};
use kube::core::cel::Validator;
use kube::CustomResourceExt;
use serde_json::{json, Value};

fn schema() -> Value {
    let crd = MqttCluster::crd();
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema.expect("openAPIV3Schema")).expect("schema to json")
}

fn spec_schema() -> Value {
    schema()["properties"]["spec"].clone()
}

/// Visits every sub-schema with its JSON path.
fn walk(path: &str, node: &Value, visit: &mut dyn FnMut(&str, &Value)) {
    visit(path, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            walk(&format!("{path}.{name}"), child, visit);
        }
    }
    if let Some(items) = node.get("items") {
        walk(&format!("{path}[]"), items, visit);
    }
    if let Some(extra) = node.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), extra, visit);
    }
}

#[test]
fn crd_names_scope_and_subresources() {
    let crd = MqttCluster::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("mqttclusters.corvid.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["mqc".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let sub = version.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some(), "status subresource");
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Ready", "Replicas", "Version", "Endpoint", "Age"]);
}

#[test]
fn schema_is_structural() {
    let mut problems = Vec::new();
    walk("", &schema(), &mut |path, node| {
        for banned in ["$ref", "oneOf", "allOf", "definitions", "$defs"] {
            if node.get(banned).is_some() {
                problems.push(format!("{path}: {banned}"));
            }
        }
        let free = node.get("x-kubernetes-preserve-unknown-fields").is_some()
            || node.get("x-kubernetes-int-or-string").is_some();
        if node.get("type").is_none() && !free {
            problems.push(format!("{path}: no type"));
        }
    });
    assert!(
        problems.is_empty(),
        "non-structural schema nodes: {problems:#?}"
    );
}

#[test]
fn every_spec_field_has_a_description() {
    let mut missing = Vec::new();
    walk("spec", &spec_schema(), &mut |path, node| {
        let is_field = !path.ends_with("[]") && !path.ends_with('}');
        let described = node
            .get("description")
            .and_then(Value::as_str)
            .is_some_and(|d| !d.trim().is_empty());
        if is_field && !described {
            missing.push(path.to_string());
        }
    });
    assert!(
        missing.is_empty(),
        "fields without description: {missing:#?}"
    );
}

#[test]
fn kubectl_explain_tls_is_useful() {
    let tls = &spec_schema()["properties"]["tls"];
    let mode = tls["properties"]["mode"]["description"]
        .as_str()
        .expect("tls.mode description");
    for word in ["none", "loadBalancer", "broker", "secretName", "issuerRef"] {
        assert!(
            mode.contains(word),
            "tls.mode description should mention {word}: {mode}"
        );
    }
    assert_eq!(
        tls["properties"]["mode"]["enum"],
        json!(["none", "loadBalancer", "broker"])
    );
    let lb = &tls["properties"]["loadBalancer"]["properties"];
    assert_eq!(
        lb["provider"]["enum"],
        json!(["aws", "gcp", "azure", "raw"])
    );
}

#[test]
fn defaults_are_in_the_schema() {
    let spec = spec_schema();
    let p = &spec["properties"];
    assert_eq!(p["replicas"]["default"], json!(3));
    assert_eq!(
        p["listeners"]["default"]["mqtt"],
        json!({"enabled": true, "port": 1883})
    );
    assert_eq!(
        p["listeners"]["default"]["wss"],
        json!({"enabled": false, "port": 8084})
    );
    assert_eq!(p["tls"]["default"]["mode"], json!("none"));
    assert_eq!(
        p["podDisruptionBudget"]["default"]["maxUnavailable"],
        json!(1)
    );
    assert_eq!(p["upgradeStrategy"]["default"]["paused"], json!(false));
    assert_eq!(
        p["sharedSubscriptionStrategy"]["default"],
        json!("round_robin")
    );
}

#[test]
fn empty_spec_matches_schema_defaults() {
    let spec: MqttClusterSpec = serde_json::from_value(json!({})).expect("empty spec");
    assert_eq!(spec, MqttClusterSpec::default());
    assert_eq!(spec.replicas, 3);
    assert_eq!(
        spec.image_ref(),
        format!(
            "corvid/corvid-broker:{}",
            corvid_crds::DEFAULT_BROKER_VERSION
        )
    );
    // Serde defaults and schema defaults must agree, or server-side defaulting would differ from ours.
    let defaulted = serde_json::to_value(&spec).expect("to json");
    for (name, field) in spec_schema()["properties"].as_object().expect("props") {
        if let Some(default) = field.get("default") {
            assert_eq!(&defaulted[name], default, "default of spec.{name}");
        }
    }
}

fn rule_messages() -> Vec<String> {
    let mut messages = Vec::new();
    walk("", &schema(), &mut |_, node| {
        for rule in node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            messages.push(rule["message"].as_str().unwrap_or_default().to_string());
        }
    });
    messages
}

#[test]
fn cel_rules_are_present_and_name_their_field() {
    let messages = rule_messages();
    for expected in [
        "spec.replicas must be at least 1",
        "tls.mode: broker needs tls.secretName or tls.issuerRef",
        "listeners.mqtt.port and listeners.ws.port must differ",
        "persistence.mode is immutable (changing it would recreate the volumes)",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "missing CEL rule: {expected}"
        );
    }
    assert!(
        messages.iter().all(|m| !m.is_empty()),
        "every CEL rule has a message"
    );
}

/// A fully defaulted object (what the API server validates after defaulting), patched by `edit`.
fn object(edit: impl FnOnce(&mut Value)) -> Value {
    let mut spec = serde_json::to_value(MqttClusterSpec::default()).expect("spec json");
    edit(&mut spec);
    json!({
        "apiVersion": "corvid.dev/v1alpha1",
        "kind": "MqttCluster",
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": spec,
    })
}

fn errors(obj: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), obj, None) {
        Ok(()) => Vec::new(),
        Err(e) => vec![e.to_string()],
    }
}

/// `obj` is rejected with (at least) `message`.
fn assert_rejected(obj: &Value, message: &str) {
    let errs = errors(obj).join("\n");
    assert!(
        errs.contains(message),
        "expected rejection with {message:?}, got: {errs:?}"
    );
}

#[test]
fn cel_accepts_the_default_object() {
    assert_eq!(errors(&object(|_| {})), Vec::<String>::new());
}

/// A change applied to a defaulted spec.
type Edit = Box<dyn FnOnce(&mut Value)>;

#[test]
fn cel_rejects_invalid_objects_with_field_messages() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "spec.replicas must be at least 1",
            Box::new(|s| s["replicas"] = json!(0)),
        ),
        (
            "tls.mode: broker needs tls.secretName or tls.issuerRef",
            Box::new(|s| {
                s["tls"]["mode"] = json!("broker");
                s["listeners"]["mqtts"]["enabled"] = json!(true);
            }),
        ),
        (
            "listeners.mqtt.port and listeners.ws.port must differ",
            Box::new(|s| s["listeners"]["ws"]["port"] = json!(1883)),
        ),
        (
            "listeners.mqtts and listeners.wss need tls.mode broker or loadBalancer",
            Box::new(|s| s["listeners"]["mqtts"]["enabled"] = json!(true)),
        ),
        (
            "admin port 18083",
            Box::new(|s| s["listeners"]["mqtt"]["port"] = json!(18083)),
        ),
        (
            "tls.loadBalancer.certificate (an ACM certificate ARN) is required for provider aws",
            Box::new(|s| {
                s["service"]["type"] = json!("LoadBalancer");
                s["listeners"]["mqtts"]["enabled"] = json!(true);
                s["tls"] = json!({"mode": "loadBalancer", "loadBalancer": {"provider": "aws", "annotations": {}, "proxyProtocol": false}});
            }),
        ),
        (
            "configure auth.usersSecret or auth.http, or set auth.allowAnonymous: true on purpose",
            Box::new(|s| s["service"]["type"] = json!("LoadBalancer")),
        ),
        (
            "service.type LoadBalancer or NodePort exposes the brokers beyond the cluster",
            Box::new(|s| {
                s["service"]["type"] = json!("NodePort");
                s["auth"] = json!({"allowAnonymous": false});
            }),
        ),
        (
            "acl.rules[].who must set exactly one of user, clientId, ipCidr, all",
            Box::new(|s| {
                s["acl"]["rules"] = json!([{"permission": "deny", "who": {"user": "a", "clientId": "b"}, "action": "all", "topics": ["#"]}]);
            }),
        ),
    ];
    for (message, edit) in cases {
        assert_rejected(&object(edit), message);
    }
}

#[test]
fn cel_checks_the_event_store() {
    let ok = object(|s| {
        s["eventStore"] = json!({
            "postgres": {"url": "postgres://corvid@db:5432/corvid", "passwordSecret": {"name": "pg", "key": "password"},
                         "tablePrefix": "iot_", "events": ["client.connected"], "messageFilters": ["alerts/#"]},
            "redis": {"url": "redis://cache:6379/0", "keyPrefix": "corvid:"},
        });
    });
    assert_eq!(errors(&ok), Vec::<String>::new());
    for (message, store) in [
        (
            "eventStore.postgres.url must not hold a password: use passwordSecret",
            json!({"postgres": {"url": "postgres://corvid:secret@db/corvid"}}),
        ),
        (
            "eventStore.postgres.url must start with postgres:// or postgresql://",
            json!({"postgres": {"url": "mysql://db/corvid"}}),
        ),
        (
            "eventStore.postgres.tablePrefix: 1-40 of a-z, 0-9 and _, not starting with a digit",
            json!({"postgres": {"url": "postgres://db/c", "tablePrefix": "x; drop"}}),
        ),
        (
            "eventStore.postgres.events: client.connected, client.disconnected",
            json!({"postgres": {"url": "postgres://db/c", "events": ["message.publish"]}}),
        ),
        (
            "eventStore.redis.url must start with redis:// (TLS is not supported yet)",
            json!({"redis": {"url": "rediss://cache:6379"}}),
        ),
        (
            "eventStore.redis.url must not hold a password: use passwordSecret",
            json!({"redis": {"url": "redis://:pw@cache:6379"}}),
        ),
    ] {
        assert_rejected(&object(|s| s["eventStore"] = store), message);
    }
}

#[test]
fn cel_accepts_valid_tls_setups() {
    let broker = object(|s| {
        s["listeners"]["mqtts"]["enabled"] = json!(true);
        s["tls"] = json!({"mode": "broker", "issuerRef": {"name": "le", "kind": "ClusterIssuer", "group": "cert-manager.io"}});
    });
    assert_eq!(errors(&broker), Vec::<String>::new());
    let aws = object(|s| {
        s["service"]["type"] = json!("LoadBalancer");
        s["auth"] = json!({"allowAnonymous": true});
        s["listeners"]["mqtts"]["enabled"] = json!(true);
        s["tls"] = json!({"mode": "loadBalancer", "loadBalancer": {"provider": "aws", "certificate": "arn:aws:acm:x", "annotations": {}, "proxyProtocol": true}});
    });
    assert_eq!(errors(&aws), Vec::<String>::new());
}

#[test]
fn cel_accepts_exposed_clusters_with_authentication_or_explicit_anonymous_access() {
    for auth in [
        json!({"allowAnonymous": true}),
        json!({"usersSecret": {"name": "u", "key": "users"}}),
        json!({"http": {"url": "http://auth", "timeoutMs": 5000}}),
    ] {
        for kind in ["LoadBalancer", "NodePort"] {
            let obj = object(|s| {
                s["service"]["type"] = json!(kind);
                s["auth"] = auth.clone();
            });
            assert_eq!(errors(&obj), Vec::<String>::new(), "{kind} with {auth}");
        }
    }
}

#[test]
fn anonymous_access_defaults_to_off_once_a_source_is_configured() {
    let mut auth = corvid_crds::AuthSpec::default();
    assert!(auth.anonymous_allowed(), "no source: anonymous as before");
    auth.users_secret = Some(corvid_crds::SecretKeyRef {
        name: "u".into(),
        key: "users".into(),
    });
    assert!(!auth.anonymous_allowed(), "users configured: anonymous off");
    auth.allow_anonymous = Some(true);
    assert!(auth.anonymous_allowed(), "explicitly on");
}

#[test]
fn persistence_mode_is_immutable() {
    let old = object(|_| {});
    let new = object(|s| s["persistence"]["mode"] = json!("pvc"));
    let result = Validator::new().validate(&schema(), &new, Some(&old));
    let errs = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        errs.contains("persistence.mode is immutable"),
        "got: {errs}"
    );
}

#[test]
fn a_listener_can_be_switched_off_without_restating_its_port() {
    let spec: MqttClusterSpec = serde_json::from_value(
        json!({"listeners": {"mqtt": {"enabled": false}, "wss": {"enabled": true}}}),
    )
    .expect("partial listeners");
    assert_eq!(
        (spec.listeners.mqtt.enabled, spec.listeners.mqtt.port),
        (false, 1883)
    );
    assert_eq!(
        (spec.listeners.wss.enabled, spec.listeners.wss.port),
        (true, 8084)
    );
    assert_eq!(
        spec.listeners.ws.port, 8083,
        "untouched listeners keep their defaults"
    );
    let props = &spec_schema()["properties"]["listeners"]["properties"];
    assert_eq!(
        props["mqtts"]["properties"]["port"]["default"],
        json!(8883),
        "the API server defaults each field"
    );
    assert_eq!(props["ws"]["properties"]["enabled"]["default"], json!(true));
}
