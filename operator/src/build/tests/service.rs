//! Headless and client Services, load-balancer presets.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::{build, Desired};

/// The client Service's annotations (present).
fn annotations(d: &Desired) -> std::collections::BTreeMap<String, String> {
    d.client_service
        .metadata
        .annotations
        .clone()
        .expect("annotations")
}

fn ports(svc: &k8s_openapi::api::core::v1::Service) -> Vec<(String, i32, IntOrString)> {
    let spec = svc.spec.as_ref().expect("spec");
    spec.ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port,
                p.target_port.clone().expect("target"),
            )
        })
        .collect()
}

fn named(s: &str) -> IntOrString {
    IntOrString::String(s.to_string())
}

#[test]
fn headless_service_publishes_not_ready_pods() {
    let (_, d) = build(json!({}));
    let spec = d.headless_service.spec.as_ref().expect("spec");
    assert_eq!(
        d.headless_service.metadata.name.as_deref(),
        Some("demo-headless")
    );
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(
        ports(&d.headless_service),
        vec![
            ("cluster".into(), 4370, named("cluster")),
            ("admin".into(), 18083, named("admin"))
        ]
    );
}

#[test]
fn client_service_exposes_enabled_listeners_only_and_owns_few_fields() {
    let (_, d) = build(json!({"listeners": {"ws": {"enabled": false, "port": 8083}}}));
    assert_eq!(
        ports(&d.client_service),
        vec![("mqtt".into(), 1883, named("mqtt"))]
    );
    let spec = d.client_service.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    // Fields a cloud controller or the API server fill in are never set by the operator.
    assert!(spec.cluster_ip.is_none() && spec.cluster_ips.is_none());
    assert!(
        spec.health_check_node_port.is_none() && spec.allocate_load_balancer_node_ports.is_none()
    );
    assert!(spec.ports.iter().flatten().all(|p| p.node_port.is_none()));
    assert!(d.client_service.metadata.annotations.is_none());
}

#[test]
fn client_service_options_are_copied() {
    let (_, d) = build(json!({"auth": {"allowAnonymous": true}, "service": {
        "type": "LoadBalancer", "annotations": {"a": "1"}, "labels": {"team": "iot"},
        "loadBalancerClass": "service.k8s.aws/nlb", "loadBalancerSourceRanges": ["10.0.0.0/8"],
        "externalTrafficPolicy": "Local",
    }}));
    let labels = d.client_service.metadata.labels.clone().expect("labels");
    assert_eq!(labels["team"], "iot");
    assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    assert_eq!(annotations(&d)["a"], "1");
    let spec = d.client_service.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.load_balancer_class.as_deref(),
        Some("service.k8s.aws/nlb")
    );
    assert_eq!(
        spec.load_balancer_source_ranges,
        Some(vec!["10.0.0.0/8".to_string()])
    );
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
}

fn lb(provider: &str, proxy: bool) -> serde_json::Value {
    json!({
        "service": {"type": "LoadBalancer"},
        "auth": {"allowAnonymous": true},
        "listeners": {"mqtts": {"enabled": true, "port": 8883}, "wss": {"enabled": true, "port": 8084}},
        "tls": {"mode": "loadBalancer", "loadBalancer": {"provider": provider, "certificate": "arn:aws:acm:cert", "proxyProtocol": proxy, "annotations": {"extra": "x"}}},
    })
}

#[test]
fn aws_preset_terminates_tls_on_the_nlb_and_forwards_to_plain_listeners() {
    let (_, d) = build(lb("aws", true));
    let a = annotations(&d);
    let p = "service.beta.kubernetes.io/aws-load-balancer-";
    assert_eq!(a[&format!("{p}ssl-cert")], "arn:aws:acm:cert");
    assert_eq!(a[&format!("{p}ssl-ports")], "8883,8084");
    assert_eq!(a[&format!("{p}type")], "external");
    assert_eq!(a[&format!("{p}nlb-target-type")], "ip");
    assert_eq!(a[&format!("{p}proxy-protocol")], "*");
    assert_eq!(a["extra"], "x", "raw annotations are added on top");
    assert_eq!(
        ports(&d.client_service),
        vec![
            ("mqtt".into(), 1883, named("mqtt")),
            ("ws".into(), 8083, named("ws")),
            ("mqtts".into(), 8883, named("mqtt")),
            ("wss".into(), 8084, named("ws")),
        ]
    );
}

#[test]
fn aws_preset_without_proxy_protocol_has_no_proxy_annotation() {
    let (_, d) = build(lb("aws", false));
    let a = annotations(&d);
    assert!(!a.contains_key("service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"));
}

#[test]
fn gcp_azure_and_raw_presets() {
    let (_, gcp) = build(lb("gcp", false));
    let a = annotations(&gcp);
    assert_eq!(a["cloud.google.com/l4-rbs"], "enabled");
    assert!(a.keys().all(|k| !k.contains("aws")));
    let (_, azure) = build(lb("azure", true));
    let a = annotations(&azure);
    assert_eq!(
        a["service.beta.kubernetes.io/azure-load-balancer-health-probe-protocol"],
        "tcp"
    );
    assert_eq!(
        a["service.beta.kubernetes.io/azure-pls-proxy-protocol"],
        "true"
    );
    let (_, raw) = build(lb("raw", false));
    let a = annotations(&raw);
    assert_eq!(a.len(), 1);
    assert_eq!(a["extra"], "x");
}

#[test]
fn service_annotations_win_over_presets() {
    let mut spec = lb("aws", false);
    spec["service"]["annotations"] =
        json!({"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"});
    let (_, d) = build(spec);
    let a = annotations(&d);
    assert_eq!(
        a["service.beta.kubernetes.io/aws-load-balancer-scheme"],
        "internal"
    );
}
