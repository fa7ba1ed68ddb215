//! The smaller objects: Secret, RBAC, PDB, Certificate, ServiceMonitor, owner references.

use serde_json::json;

use super::build;
use crate::build::{secret, servicemonitor, Names};
use crate::testing::cluster;

#[test]
fn every_object_is_owned_and_labelled() {
    let (_, d) = build(json!({"monitoring": {"serviceMonitor": {"enabled": true}},
        "listeners": {"mqtts": {"enabled": true, "port": 8883}}, "tls": {"mode": "broker", "issuerRef": {"name": "ca"}}}));
    let metas = [
        &d.config_map.metadata,
        &d.service_account.metadata,
        &d.role.metadata,
        &d.role_binding.metadata,
        &d.headless_service.metadata,
        &d.client_service.metadata,
        &d.statefulset.metadata,
        &d.pdb.as_ref().expect("pdb").metadata,
        &d.service_monitor.as_ref().expect("sm").metadata,
        &d.certificate.as_ref().expect("cert").metadata,
    ];
    for meta in metas {
        let owner = &meta.owner_references.as_ref().expect("owner refs")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("MqttCluster", "demo", Some(true))
        );
        assert_eq!(meta.namespace.as_deref(), Some("mqtt"));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "corvid-operator");
    }
}

#[test]
fn cluster_secret_is_hex_of_the_given_key_material() {
    let c = cluster(json!({}));
    let s = secret::build(&c, &Names::of(&c), &[0xab; 32]);
    let value = &s.string_data.expect("data")["secret"];
    assert_eq!(value.len(), 64);
    assert!(value.chars().all(|ch| ch == 'a' || ch == 'b'));
    assert_eq!(s.metadata.name.as_deref(), Some("demo-cluster-secret"));
}

#[test]
fn role_grants_only_endpointslice_reads() {
    let (_, d) = build(json!({}));
    let rules = d.role.rules.expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].api_groups,
        Some(vec!["discovery.k8s.io".to_string()])
    );
    assert_eq!(rules[0].resources, Some(vec!["endpointslices".to_string()]));
    assert_eq!(rules[0].verbs, vec!["get", "list", "watch"]);
    let subject = &d.role_binding.subjects.expect("subjects")[0];
    assert_eq!(subject.name, "demo-broker");
    assert_eq!(d.role_binding.role_ref.name, "demo-broker");
}

#[test]
fn pdb_defaults_to_one_unavailable_and_can_be_disabled() {
    let (_, d) = build(json!({}));
    let spec = d.pdb.expect("pdb").spec.expect("spec");
    assert_eq!(
        spec.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert!(spec.min_available.is_none());
    let (_, off) = build(json!({"podDisruptionBudget": {"enabled": false}}));
    assert!(off.pdb.is_none());
}

#[test]
fn certificate_only_for_broker_tls_with_an_issuer() {
    let (_, none) = build(json!({}));
    assert!(none.certificate.is_none());
    let (_, secret) = build(
        json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}}, "tls": {"mode": "broker", "secretName": "mine"}}),
    );
    assert!(
        secret.certificate.is_none(),
        "a user Secret needs no Certificate"
    );
    let (_, issued) = build(
        json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}},
        "tls": {"mode": "broker", "issuerRef": {"name": "le", "kind": "ClusterIssuer"}, "dnsNames": ["mqtt.example.com"]}}),
    );
    let cert = issued.certificate.expect("certificate");
    assert_eq!(
        cert.types.as_ref().map(|t| t.kind.as_str()),
        Some("Certificate")
    );
    let spec = &cert.data["spec"];
    assert_eq!(spec["secretName"], json!("demo-tls"));
    assert_eq!(
        spec["issuerRef"],
        json!({"name": "le", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    let dns = spec["dnsNames"].as_array().expect("dnsNames");
    assert!(dns.contains(&json!("demo.mqtt.svc")) && dns.contains(&json!("mqtt.example.com")));
}

#[test]
fn service_monitor_needs_the_switch_and_its_crd() {
    let c =
        cluster(json!({"monitoring": {"serviceMonitor": {"enabled": true, "interval": "15s"}}}));
    let names = Names::of(&c);
    assert!(
        servicemonitor::build(&c, &names, false).is_none(),
        "no CRD, no ServiceMonitor"
    );
    let sm = servicemonitor::build(&c, &names, true).expect("built");
    assert_eq!(
        sm.data["spec"]["endpoints"][0],
        json!({"port": "admin", "path": "/metrics", "interval": "15s"})
    );
    let off = cluster(json!({}));
    assert!(servicemonitor::build(&off, &Names::of(&off), true).is_none());
}
