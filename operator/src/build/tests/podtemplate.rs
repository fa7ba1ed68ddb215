//! spec.podTemplate: what merges into the built pod, and which fields are refused.

use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::{json, Value};

use super::build;
use crate::build::podtemplate::sidecar_security;
use crate::build::statefulset::default_container_security;
use crate::testing::cluster;
use crate::validate::validate;

fn pod(spec: Value) -> PodSpec {
    let (_, d) = build(spec);
    d.statefulset
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec")
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The InvalidSpec message for a spec whose podTemplate.spec is `template`.
fn refused(template: Value) -> String {
    validate(&cluster(json!({"podTemplate": {"spec": template}})))
        .err()
        .map(|e| e.0)
        .unwrap_or_else(|| panic!("accepted: {template}"))
}

#[test]
fn a_sidecar_is_added_next_to_the_broker_with_the_restricted_profile() {
    let p = pod(json!({"podTemplate": {"spec": {"containers": [
        {"name": "log-shipper", "image": "fluent/fluent-bit:3.1",
         "volumeMounts": [{"name": "logs", "mountPath": "/logs"}]},
    ], "volumes": [{"name": "logs", "emptyDir": {}}]}}}));
    assert_eq!(p.containers.len(), 2);
    assert_eq!(p.containers[0].name, "broker", "the broker stays first");
    let sidecar = container(&p, "log-shipper");
    assert_eq!(sidecar.image.as_deref(), Some("fluent/fluent-bit:3.1"));
    assert_eq!(sidecar.security_context, Some(sidecar_security()));
    // A sidecar that brings its own security context keeps it.
    let own = pod(json!({"podTemplate": {"spec": {"containers": [
        {"name": "proxy", "image": "envoy", "securityContext": {"runAsUser": 1337}},
    ]}}}));
    let ctx = container(&own, "proxy").security_context.as_ref();
    assert_eq!(ctx.and_then(|c| c.run_as_user), Some(1337));
}

#[test]
fn an_init_container_runs_before_the_broker() {
    let p = pod(json!({"podTemplate": {"spec": {"initContainers": [
        {"name": "wait-for-db", "image": "busybox:1.36", "command": ["sh", "-c", "true"]},
    ]}}}));
    let init = p.init_containers.as_deref().expect("init containers");
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].name, "wait-for-db");
    assert_eq!(init[0].security_context, Some(sidecar_security()));
}

#[test]
fn an_extra_volume_is_mounted_in_the_broker_container() {
    let p = pod(json!({"podTemplate": {"spec": {
        "volumes": [{"name": "plugins", "configMap": {"name": "corvid-plugins"}}],
        "containers": [{"name": "broker",
            "volumeMounts": [{"name": "plugins", "mountPath": "/etc/corvid/plugins", "readOnly": true}],
            "env": [{"name": "RUST_LOG", "value": "debug"}],
            "envFrom": [{"secretRef": {"name": "corvid-extra-env"}}],
            "resources": {"limits": {"memory": "2Gi"}},
            "readinessProbe": {"periodSeconds": 2, "failureThreshold": 10}}],
    }}}));
    let plugins = p
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "plugins")
        .expect("volume");
    assert_eq!(
        plugins.config_map.as_ref().map(|c| c.name.as_str()),
        Some("corvid-plugins")
    );
    assert_eq!(p.containers.len(), 1, "merged into the broker, not added");
    let broker = container(&p, "broker");
    let mounts = broker.volume_mounts.as_deref().expect("mounts");
    assert!(mounts.iter().any(|m| m.name == "config"), "own mounts stay");
    assert!(mounts
        .iter()
        .any(|m| m.name == "plugins" && m.mount_path == "/etc/corvid/plugins"));
    let env = broker.env.as_deref().expect("env");
    assert!(env.iter().any(|e| e.name == "POD_NAME"), "own env stays");
    assert!(env
        .iter()
        .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")));
    assert_eq!(broker.env_from.as_ref().map(Vec::len), Some(1));
    let limits = broker.resources.as_ref().and_then(|r| r.limits.as_ref());
    assert_eq!(
        limits.and_then(|l| l.get("memory")).map(|q| q.0.as_str()),
        Some("2Gi")
    );
    // Probe timing is tuned, the handler (the join gate) stays the operator's.
    let ready = broker.readiness_probe.as_ref().expect("readiness");
    assert_eq!(
        (ready.period_seconds, ready.failure_threshold),
        (Some(2), Some(10))
    );
    assert_eq!(
        ready.http_get.as_ref().and_then(|h| h.path.as_deref()),
        Some("/readyz")
    );
    // Everything the template did not touch is as built.
    assert_eq!(broker.image.as_deref(), Some("corvid/corvid-broker:0.1.0"));
    assert_eq!(broker.security_context, Some(default_container_security()));
}

#[test]
fn the_template_wins_over_spec_pod_and_the_operator_labels_win_over_both() {
    let (_, d) = build(json!({
        "pod": {"nodeSelector": {"disk": "ssd", "pool": "a"}, "priorityClassName": "low",
                "labels": {"team": "a"}, "annotations": {"x": "1"}},
        "podTemplate": {
            "metadata": {"labels": {"team": "b", "app.kubernetes.io/instance": "hijack"},
                         "annotations": {"x": "2", "corvid.dev/config-hash": "0"}},
            "spec": {"nodeSelector": {"pool": "b"}, "priorityClassName": "high",
                     "hostAliases": [{"ip": "10.0.0.9", "hostnames": ["auth.internal"]}],
                     "tolerations": [{"key": "mqtt", "operator": "Exists"}]}},
    }));
    let template = &d.statefulset.spec.as_ref().expect("spec").template;
    let meta = template.metadata.as_ref().expect("meta");
    let labels = meta.labels.as_ref().expect("labels");
    assert_eq!(labels.get("team").map(String::as_str), Some("b"));
    assert_eq!(
        labels.get("app.kubernetes.io/instance").map(String::as_str),
        Some("demo")
    );
    let annotations = meta.annotations.as_ref().expect("annotations");
    assert_eq!(annotations.get("x").map(String::as_str), Some("2"));
    assert_ne!(
        annotations
            .get("corvid.dev/config-hash")
            .map(String::as_str),
        Some("0")
    );
    let p = template.spec.as_ref().expect("pod");
    let selector = p.node_selector.as_ref().expect("nodeSelector");
    assert_eq!(selector.get("disk").map(String::as_str), Some("ssd"));
    assert_eq!(selector.get("pool").map(String::as_str), Some("b"));
    assert_eq!(p.priority_class_name.as_deref(), Some("high"));
    assert_eq!(p.host_aliases.as_ref().map(Vec::len), Some(1));
    assert_eq!(p.tolerations.as_ref().map(Vec::len), Some(1));
    assert_eq!(p.service_account_name.as_deref(), Some("demo-broker"));
}

#[test]
fn service_account_annotations_reach_the_operators_service_account() {
    let (_, d) = build(json!({"podTemplate": {"serviceAccount": {
        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/corvid"},
        "labels": {"app.kubernetes.io/managed-by": "me", "team": "iot"},
    }}}));
    let meta = &d.service_account.metadata;
    assert_eq!(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("eks.amazonaws.com/role-arn"))
            .map(String::as_str),
        Some("arn:aws:iam::1:role/corvid")
    );
    let labels = meta.labels.as_ref().expect("labels");
    assert_eq!(labels.get("team").map(String::as_str), Some("iot"));
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("corvid-operator")
    );
}

#[test]
fn an_empty_template_changes_nothing() {
    let (_, plain) = build(json!({}));
    let (_, empty) = build(json!({"podTemplate": {"metadata": {}, "spec": {}}}));
    assert_eq!(plain.statefulset, empty.statefulset);
    assert_eq!(plain.service_account, empty.service_account);
}

#[test]
fn each_protected_broker_field_is_refused_by_name() {
    for (field, value, hint) in [
        ("command", json!(["sh"]), "serve --config"),
        ("args", json!(["serve"]), "serve --config"),
        (
            "ports",
            json!([{"containerPort": 9999, "name": "x"}]),
            "spec.listeners",
        ),
        ("image", json!("evil:latest"), "spec.image"),
        (
            "securityContext",
            json!({"privileged": true}),
            "spec.pod.containerSecurityContext",
        ),
        (
            "lifecycle",
            json!({"preStop": {"sleep": {"seconds": 1}}}),
            "drain",
        ),
        ("workingDir", json!("/"), "only env"),
    ] {
        let mut broker = json!({"name": "broker"});
        broker[field] = value;
        let message = refused(json!({"containers": [broker]}));
        assert!(
            message.starts_with(&format!("podTemplate.spec.containers[broker].{field} ")),
            "{field}: {message}"
        );
        assert!(message.contains(hint), "{field}: {message}");
    }
}

#[test]
fn protected_pod_fields_volumes_mounts_env_and_probe_handlers_are_refused() {
    for (template, starts) in [
        (
            json!({"securityContext": {"runAsUser": 0}}),
            "podTemplate.spec.securityContext",
        ),
        (
            json!({"serviceAccountName": "admin"}),
            "podTemplate.spec.serviceAccountName",
        ),
        (
            json!({"terminationGracePeriodSeconds": 1}),
            "podTemplate.spec.terminationGracePeriodSeconds",
        ),
        (
            json!({"volumes": [{"name": "config", "emptyDir": {}}]}),
            "podTemplate.spec.volumes[config]",
        ),
        (
            json!({"volumes": [{"name": "x", "emptyDir": {}}, {"name": "x", "emptyDir": {}}]}),
            "podTemplate.spec.volumes[x] is listed twice",
        ),
        (
            json!({"containers": [{"name": "broker", "volumeMounts": [{"name": "x", "mountPath": "/etc/corvid"}]}]}),
            "podTemplate.spec.containers[broker].volumeMounts[x]",
        ),
        (
            json!({"containers": [{"name": "broker", "volumeMounts": [{"name": "x", "mountPath": "/var/lib/corvid/"}]}]}),
            "podTemplate.spec.containers[broker].volumeMounts[x]",
        ),
        (
            json!({"containers": [{"name": "broker", "env": [{"name": "POD_IP", "value": "1.2.3.4"}]}]}),
            "podTemplate.spec.containers[broker].env[POD_IP]",
        ),
        (
            json!({"containers": [{"name": "broker", "readinessProbe": {"tcpSocket": {"port": 1883}}}]}),
            "podTemplate.spec.containers[broker].readinessProbe.tcpSocket",
        ),
        (
            json!({"containers": [{"name": "broker", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}]}),
            "podTemplate.spec.containers[broker].volumeMounts[nope]: no volume",
        ),
        (
            json!({"initContainers": [{"name": "i", "image": "busybox", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}]}),
            "podTemplate.spec.initContainers[i].volumeMounts[nope]: no volume",
        ),
        (
            json!({"containers": [{"name": "sidecar"}]}),
            "podTemplate.spec.containers[sidecar].image is required",
        ),
        (
            json!({"initContainers": [{"name": "init"}]}),
            "podTemplate.spec.initContainers[init].image is required",
        ),
    ] {
        let message = refused(template.clone());
        assert!(message.starts_with(starts), "{template}: {message}");
    }
}

#[test]
fn the_builder_drops_protected_fields_even_without_validation() {
    // build() validates; here the builder is called on a spec that skipped validation.
    let c = cluster(json!({"podTemplate": {"spec": {
        "volumes": [{"name": "config", "emptyDir": {}}],
        "containers": [{"name": "broker", "image": "evil", "command": ["sh"],
                        "env": [{"name": "POD_NAME", "value": "x"}],
                        "volumeMounts": [{"name": "x", "mountPath": "/"}]}],
    }}}));
    let names = crate::build::Names::of(&c);
    let rendered = crate::build::config::Rendered {
        yaml: String::new(),
        hash: "h".to_string(),
    };
    let t = crate::build::statefulset::pod_template(&c, &names, &rendered);
    let p = t.spec.expect("pod");
    let broker = container(&p, "broker");
    assert_eq!(broker.image.as_deref(), Some("corvid/corvid-broker:0.1.0"));
    assert_eq!(broker.command, None);
    let pod_name = broker.env.iter().flatten().find(|e| e.name == "POD_NAME");
    assert!(pod_name.is_some_and(|e| e.value.is_none()));
    assert!(broker
        .volume_mounts
        .iter()
        .flatten()
        .all(|m| m.mount_path != "/"));
    let config = p.volumes.iter().flatten().find(|v| v.name == "config");
    assert!(config.is_some_and(|v| v.config_map.is_some()));
}
