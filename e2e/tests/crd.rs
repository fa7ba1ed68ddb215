//! The committed MqttCluster CRD (manifests/crds/) must install on a real API server with
//! server-side apply, and the API server itself must reject invalid specs with a message that
//! names the offending field: the CEL rules are the operator's first line of validation, so
//! they are tested where they run, not only as YAML.

use corvid_e2e::{
    apply_crds, cluster, kubectl, mqtt_cluster, mqtt_cluster_resource, TestNamespace, CRD_NAME,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

/// The API server's 422 message for a rejected object, or a panic if it was accepted.
fn rejection(result: kube::Result<DynamicObject>, case: &str) -> String {
    match result {
        Ok(obj) => panic!("{case}: invalid MqttCluster was accepted: {:?}", obj.data),
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                status.code, 422,
                "{case}: expected 422 Invalid, got {status:?}"
            );
            status.message
        }
        Err(other) => panic!("{case}: unexpected error {other}"),
    }
}

#[tokio::test]
async fn crd_applies_server_side_and_registers_the_short_name() {
    let Some(client) = cluster("crd_applies_server_side_and_registers_the_short_name").await else {
        return;
    };
    apply_crds(&client).await;
    // A second apply must be a clean no-op, as in a GitOps loop.
    apply_crds(&client).await;

    let crd = Api::<CustomResourceDefinition>::all(client)
        .get(CRD_NAME)
        .await
        .unwrap();
    let names = crd
        .status
        .and_then(|s| s.accepted_names)
        .expect("accepted names");
    assert_eq!(names.kind, "MqttCluster");
    assert!(
        names
            .short_names
            .unwrap_or_default()
            .contains(&"mqc".to_string()),
        "short name mqc not accepted"
    );
    let out = kubectl(&["get", "mqc", "--all-namespaces"], None).unwrap();
    assert!(
        out.status.success(),
        "kubectl get mqc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn empty_spec_is_accepted_and_defaulted_by_the_api_server() {
    let Some(client) = cluster("empty_spec_is_accepted_and_defaulted_by_the_api_server").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "crd-defaults")
        .await
        .unwrap();
    let api = Api::<DynamicObject>::namespaced_with(client, &ns.name, &mqtt_cluster_resource());
    let created = api
        .create(&PostParams::default(), &mqtt_cluster("defaults", json!({})))
        .await
        .expect("an empty spec is valid");
    let spec = &created.data["spec"];
    assert_eq!(spec["replicas"], 3, "{spec}");
    assert_eq!(spec["listeners"]["mqtt"]["port"], 1883, "{spec}");
    assert_eq!(spec["tls"]["mode"], "none", "{spec}");
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn an_exposed_cluster_is_accepted_with_authentication_or_explicit_anonymous_access() {
    let Some(client) =
        cluster("an_exposed_cluster_is_accepted_with_authentication_or_explicit_anonymous_access")
            .await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "crd-exposed").await.unwrap();
    let api = Api::<DynamicObject>::namespaced_with(client, &ns.name, &mqtt_cluster_resource());
    for (name, spec) in [
        (
            "anonymous-on-purpose",
            json!({ "service": { "type": "LoadBalancer" }, "auth": { "allowAnonymous": true } }),
        ),
        (
            "users",
            json!({ "service": { "type": "NodePort" }, "auth": { "usersSecret": { "name": "u" } } }),
        ),
        (
            "http-backend",
            json!({ "service": { "type": "LoadBalancer" }, "auth": { "http": { "url": "http://auth" } } }),
        ),
        ("internal", json!({ "service": { "type": "ClusterIP" } })),
    ] {
        api.create(&PostParams::default(), &mqtt_cluster(name, spec))
            .await
            .unwrap_or_else(|e| panic!("{name} must be accepted: {e}"));
    }
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn invalid_specs_are_rejected_naming_the_field() {
    let Some(client) = cluster("invalid_specs_are_rejected_naming_the_field").await else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "crd-invalid").await.unwrap();
    let api = Api::<DynamicObject>::namespaced_with(client, &ns.name, &mqtt_cluster_resource());

    // (case, spec, field path the API server reports, text the message must contain)
    let cases = [
        (
            "zero replicas",
            json!({ "replicas": 0 }),
            "spec",
            "spec.replicas must be at least 1",
        ),
        (
            "two listeners on one port",
            json!({ "listeners": {
                "mqtt": { "enabled": true, "port": 1883 },
                "ws": { "enabled": true, "port": 1883 },
            } }),
            "spec.listeners",
            "listeners.mqtt.port and listeners.ws.port must differ",
        ),
        (
            "listener on the admin port",
            json!({ "listeners": { "mqtt": { "enabled": true, "port": 18083 } } }),
            "spec.listeners",
            "must not use the admin port 18083",
        ),
        (
            "port out of range",
            json!({ "listeners": { "mqtt": { "enabled": true, "port": 70000 } } }),
            "spec.listeners.mqtt.port",
            "less than or equal to 65535",
        ),
        (
            "TLS listener without TLS",
            json!({ "listeners": { "mqtts": { "enabled": true, "port": 8883 } } }),
            "spec",
            "listeners.mqtts and listeners.wss need tls.mode broker or loadBalancer",
        ),
        (
            "broker TLS without a certificate source",
            json!({
                "tls": { "mode": "broker" },
                "listeners": { "mqtts": { "enabled": true, "port": 8883 } },
            }),
            "spec.tls",
            "tls.mode: broker needs tls.secretName or tls.issuerRef",
        ),
        (
            "internet-facing Service without authentication",
            json!({ "service": { "type": "LoadBalancer" } }),
            "spec",
            "configure auth.usersSecret or auth.http, or set auth.allowAnonymous: true on purpose",
        ),
        (
            "NodePort Service with anonymous access explicitly off but no source",
            json!({ "service": { "type": "NodePort" }, "auth": { "allowAnonymous": false } }),
            "spec",
            "service.type LoadBalancer or NodePort exposes the brokers",
        ),
        (
            "additional Service named like the headless one",
            json!({ "services": [{ "name": "headless" }] }),
            "spec.services[0]",
            "services[].name must not be headless",
        ),
        (
            "additional Service with an upper-case name",
            json!({ "services": [{ "name": "Public" }] }),
            "spec.services[0]",
            "services[].name must be lowercase letters",
        ),
        (
            "two additional Services with one name",
            json!({ "services": [{ "name": "a" }, { "name": "a" }] }),
            "spec",
            "services[].name must be unique",
        ),
        (
            "additional Service exposing a disabled listener",
            json!({ "services": [{ "name": "a", "listeners": ["wss"] }] }),
            "spec",
            "services[].listeners may only name enabled listeners",
        ),
        (
            "additional load balancer without authentication",
            json!({ "services": [{ "name": "a", "type": "LoadBalancer" }] }),
            "spec",
            "services[].type LoadBalancer or NodePort exposes the brokers",
        ),
        (
            "trusted PROXY ranges without PROXY protocol",
            json!({ "services": [{ "name": "a", "proxyTrustedRanges": ["10.0.0.0/8"] }] }),
            "spec.services[0]",
            "services[].proxyTrustedRanges needs proxyProtocol: true",
        ),
        (
            "unknown TLS mode",
            json!({ "tls": { "mode": "sometimes" } }),
            "spec.tls.mode",
            "Unsupported value",
        ),
        (
            "malformed rate limit",
            json!({ "limits": { "messageRate": "fast" } }),
            "spec.limits",
            "limits.messageRate must look like",
        ),
    ];
    for (i, (case, spec, field, text)) in cases.into_iter().enumerate() {
        let obj = mqtt_cluster(&format!("invalid-{i}"), spec);
        let message = rejection(api.create(&PostParams::default(), &obj).await, case);
        assert!(
            message.contains(&format!("{field}: ")) && message.contains(text),
            "{case}: expected field `{field}` and `{text}` in: {message}"
        );
    }

    // kubectl users see the same field-named message.
    let manifest = json!({
        "apiVersion": "corvid.dev/v1alpha1",
        "kind": "MqttCluster",
        "metadata": { "name": "invalid-kubectl", "namespace": ns.name },
        "spec": { "replicas": 0 },
    })
    .to_string();
    let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&manifest)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kubectl accepted replicas: 0");
    assert!(
        stderr.contains("spec.replicas must be at least 1"),
        "kubectl error does not name the field: {stderr}"
    );
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn persistence_mode_cannot_change_after_creation() {
    let Some(client) = cluster("persistence_mode_cannot_change_after_creation").await else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "crd-immutable")
        .await
        .unwrap();
    let api = Api::<DynamicObject>::namespaced_with(client, &ns.name, &mqtt_cluster_resource());
    let spec = json!({ "persistence": { "mode": "none" } });
    api.create(&PostParams::default(), &mqtt_cluster("immutable", spec))
        .await
        .expect("valid MqttCluster");

    let change = json!({ "spec": { "persistence": { "mode": "pvc" } } });
    let result = api
        .patch("immutable", &PatchParams::default(), &Patch::Merge(&change))
        .await;
    let message = rejection(result, "persistence.mode change");
    assert!(
        message.contains("spec.persistence: ") && message.contains("persistence.mode is immutable"),
        "unexpected message: {message}"
    );

    // Changing something else is still allowed: the rule only guards the transition.
    let scale = json!({ "spec": { "replicas": 5 } });
    let patched = api
        .patch("immutable", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("replicas can change");
    assert_eq!(patched.data["spec"]["replicas"], 5);
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn persistence_size_may_grow_but_never_shrink() {
    let Some(client) = cluster("persistence_size_may_grow_but_never_shrink").await else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "crd-size").await.unwrap();
    let api = Api::<DynamicObject>::namespaced_with(client, &ns.name, &mqtt_cluster_resource());
    let spec = json!({ "persistence": { "mode": "pvc", "size": "2Gi" } });
    api.create(&PostParams::default(), &mqtt_cluster("size", spec))
        .await
        .expect("valid MqttCluster");
    let size = |s: &str| json!({ "spec": { "persistence": { "size": s } } });

    let result = api
        .patch("size", &PatchParams::default(), &Patch::Merge(&size("1Gi")))
        .await;
    let message = rejection(result, "persistence.size shrink");
    assert!(
        message.contains("spec.persistence: ")
            && message.contains("persistence.size cannot shrink"),
        "unexpected message: {message}"
    );
    let result = api
        .patch(
            "size",
            &PatchParams::default(),
            &Patch::Merge(&size("lots")),
        )
        .await;
    let message = rejection(result, "persistence.size not a quantity");
    assert!(
        message.contains("persistence.size must be a quantity"),
        "unexpected message: {message}"
    );
    // The same size spelled differently, and growing, are accepted.
    for ok in ["2048Mi", "5Gi"] {
        api.patch("size", &PatchParams::default(), &Patch::Merge(&size(ok)))
            .await
            .unwrap_or_else(|e| panic!("persistence.size {ok}: {e}"));
    }
    ns.delete().await.unwrap();
}
