//! Additional client Services (spec.services) and the PROXY protocol setting each broker listener
//! takes from the Services that reach it.

use corvid_crds::ListenerKind;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use super::build;
use crate::build::service::{proxy_trust, ProxyTrust};
use crate::testing::cluster;
use crate::validate::validate;

fn ports(svc: &Service) -> Vec<(String, i32, String)> {
    let spec = svc.spec.as_ref().expect("spec");
    spec.ports
        .iter()
        .flatten()
        .map(|p| {
            let target = match p.target_port.clone().expect("target") {
                IntOrString::String(s) => s,
                IntOrString::Int(i) => i.to_string(),
            };
            (p.name.clone().unwrap_or_default(), p.port, target)
        })
        .collect()
}

fn error(spec: Value) -> String {
    validate(&cluster(spec))
        .err()
        .map(|e| e.0)
        .unwrap_or_default()
}

/// Internal ClusterIP plus an internet-facing NLB, TLS in the broker, PROXY on mqtts only.
fn internal_and_external() -> Value {
    json!({
        "auth": {"usersSecret": {"name": "users"}},
        "listeners": {"mqtts": {"enabled": true, "port": 8883}},
        "tls": {"mode": "broker", "secretName": "tls"},
        "service": {"listeners": ["mqtt", "ws"]},
        "services": [
            {"name": "internal", "listeners": ["mqtt"], "labels": {"tier": "internal"}},
            {"name": "public", "type": "LoadBalancer", "listeners": ["mqtts"],
             "annotations": {"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"},
             "loadBalancerClass": "service.k8s.aws/nlb",
             "loadBalancerSourceRanges": ["0.0.0.0/0"], "externalTrafficPolicy": "Local",
             "proxyProtocol": true, "proxyTrustedRanges": ["10.0.0.0/16"]},
        ],
    })
}

#[test]
fn no_services_means_no_extra_objects() {
    let (_, d) = build(json!({}));
    assert!(d.extra_services.is_empty());
}

#[test]
fn each_entry_is_a_service_named_after_the_cluster_with_its_own_options() {
    let (_, d) = build(internal_and_external());
    let names: Vec<_> = d
        .extra_services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["demo-internal", "demo-public"]);
    let [internal, public] = &d.extra_services[..] else {
        panic!("two Services");
    };
    assert_eq!(
        ports(internal),
        [("mqtt".to_string(), 1883, "mqtt".to_string())]
    );
    let labels = internal.metadata.labels.clone().expect("labels");
    assert_eq!(labels["tier"], "internal");
    assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "corvid-operator");
    assert!(
        internal.metadata.owner_references.is_some(),
        "garbage-collected with the cluster"
    );
    let spec = internal.spec.clone().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(
        spec.selector,
        d.client_service.spec.clone().expect("spec").selector
    );
    assert!(internal.metadata.annotations.is_none());

    assert_eq!(
        ports(public),
        [("mqtts".to_string(), 8883, "mqtts".to_string())]
    );
    let spec = public.spec.clone().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.load_balancer_class.as_deref(),
        Some("service.k8s.aws/nlb")
    );
    assert_eq!(
        spec.load_balancer_source_ranges,
        Some(vec!["0.0.0.0/0".to_string()])
    );
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    // The default client Service is narrowed by spec.service.listeners.
    assert_eq!(
        ports(&d.client_service),
        [
            ("mqtt".to_string(), 1883, "mqtt".to_string()),
            ("ws".to_string(), 8083, "ws".to_string())
        ]
    );
}

#[test]
fn each_broker_listener_follows_the_services_that_reach_it() {
    let c = cluster(internal_and_external());
    assert_eq!(
        proxy_trust(&c, ListenerKind::Mqtt),
        Ok(ProxyTrust::default())
    );
    assert_eq!(
        proxy_trust(&c, ListenerKind::Mqtts),
        Ok(ProxyTrust {
            proxy_protocol: true,
            proxy_trusted: vec!["10.0.0.0/16".to_string()]
        })
    );
    let (_, d) = build(internal_and_external());
    let yaml = &d.config_map.data.expect("data")["corvid.yaml"];
    let config: corvid_config::Config = serde_yaml::from_str(yaml).expect("config");
    assert!(config.listeners.mqtts.proxy_protocol);
    assert_eq!(config.listeners.mqtts.proxy_trusted, ["10.0.0.0/16"]);
    assert!(!config.listeners.mqtt.proxy_protocol && !config.listeners.ws.proxy_protocol);
}

#[test]
fn a_listener_behind_a_proxy_and_a_plain_service_is_refused_naming_both() {
    // spec.service exposes every enabled listener, mqtt included, without PROXY protocol.
    let message = error(json!({
        "auth": {"allowAnonymous": true},
        "services": [{"name": "nlb", "type": "LoadBalancer", "listeners": ["mqtt"], "proxyProtocol": true}],
    }));
    assert!(
        message.contains("broker listener mqtt")
            && message.contains("spec.services[nlb] with PROXY protocol")
            && message.contains("spec.service without"),
        "{message}"
    );
    // With TLS at the load balancer, mqtts lands on the mqtt listener: still one listener.
    let message = error(json!({
        "auth": {"allowAnonymous": true},
        "listeners": {"mqtts": {"enabled": true, "port": 8883}},
        "service": {"type": "LoadBalancer", "listeners": ["mqtts"]},
        "tls": {"mode": "loadBalancer", "loadBalancer": {"provider": "aws", "certificate": "arn:x", "proxyProtocol": true}},
        "services": [{"name": "internal", "listeners": ["mqtt"]}],
    }));
    assert!(
        message.contains("broker listener mqtt")
            && message.contains("spec.service with PROXY protocol")
            && message.contains("spec.services[internal] without"),
        "{message}"
    );
}

#[test]
fn proxy_services_that_agree_share_a_listener_and_the_union_of_their_ranges() {
    let spec = |second: Value| {
        json!({
            "auth": {"allowAnonymous": true},
            "service": {"listeners": ["ws"]},
            "services": [
                {"name": "a", "type": "LoadBalancer", "listeners": ["mqtt"], "proxyProtocol": true,
                 "proxyTrustedRanges": ["10.0.0.0/16"]},
                second,
            ],
        })
    };
    let c = cluster(spec(
        json!({"name": "b", "type": "LoadBalancer", "listeners": ["mqtt"],
        "proxyProtocol": true, "proxyTrustedRanges": ["10.1.0.0/16", "10.0.0.0/16"]}),
    ));
    assert_eq!(
        proxy_trust(&c, ListenerKind::Mqtt).map(|t| t.proxy_trusted),
        Ok(vec!["10.0.0.0/16".to_string(), "10.1.0.0/16".to_string()])
    );
    // One of them believes any sender: so does the listener.
    let c = cluster(spec(
        json!({"name": "b", "type": "LoadBalancer", "listeners": ["mqtt"], "proxyProtocol": true}),
    ));
    assert_eq!(
        proxy_trust(&c, ListenerKind::Mqtt),
        Ok(ProxyTrust {
            proxy_protocol: true,
            proxy_trusted: Vec::new()
        })
    );
}

#[test]
fn tls_preset_reaches_an_extra_load_balancer_with_its_own_proxy_setting() {
    let (_, d) = build(json!({
        "auth": {"allowAnonymous": true},
        "listeners": {"mqtts": {"enabled": true, "port": 8883}},
        "service": {"type": "LoadBalancer", "listeners": ["mqtt"]},
        "tls": {"mode": "loadBalancer", "loadBalancer": {"provider": "aws", "certificate": "arn:x"}},
        "services": [
            {"name": "public", "type": "LoadBalancer", "listeners": ["mqtts", "ws"],
             "annotations": {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"}},
        ],
    }));
    let public = &d.extra_services[0];
    let a = public.metadata.annotations.clone().expect("annotations");
    let p = "service.beta.kubernetes.io/aws-load-balancer-";
    assert_eq!(a[&format!("{p}ssl-cert")], "arn:x");
    assert_eq!(a[&format!("{p}ssl-ports")], "8883");
    assert_eq!(
        a[&format!("{p}scheme")],
        "internal",
        "its own annotations win"
    );
    assert!(!a.contains_key(&format!("{p}proxy-protocol")));
    // TLS ends at the load balancer: mqtts forwards to the plain listener.
    assert_eq!(
        ports(public),
        [
            ("ws".to_string(), 8083, "ws".to_string()),
            ("mqtts".to_string(), 8883, "mqtt".to_string())
        ]
    );
}

#[test]
fn certificate_names_every_client_service() {
    let (_, d) = build(internal_and_external());
    assert!(d.certificate.is_none(), "secretName: no Certificate");
    let mut spec = internal_and_external();
    spec["tls"] = json!({"mode": "broker", "issuerRef": {"name": "ca"}});
    let (_, d) = build(spec);
    let cert = d.certificate.expect("certificate");
    let dns: Vec<String> =
        serde_json::from_value(cert.data["spec"]["dnsNames"].clone()).expect("dnsNames");
    for name in [
        "demo.mqtt.svc",
        "demo-internal.mqtt.svc",
        "demo-public",
        "demo-public.mqtt",
    ] {
        assert!(dns.contains(&name.to_string()), "{name} in {dns:?}");
    }
}

#[test]
fn invalid_entries_are_refused_naming_the_field() {
    let with =
        |service: Value| error(json!({"auth": {"allowAnonymous": true}, "services": [service]}));
    let cases = [
        (
            json!({"name": "Public"}),
            "services[Public]: name must be lowercase",
        ),
        (json!({"name": "internal-"}), "name must be lowercase"),
        (json!({"name": "headless"}), "must not be headless"),
        (json!({"name": "a".repeat(60)}), "longer than 63 characters"),
        (
            json!({"name": "x", "loadBalancerSourceRanges": ["10.0.0.0/8"]}),
            "need type LoadBalancer",
        ),
        (
            json!({"name": "x", "externalTrafficPolicy": "Local"}),
            "externalTrafficPolicy needs type",
        ),
        (
            json!({"name": "x", "proxyTrustedRanges": ["10.0.0.0/8"]}),
            "proxyTrustedRanges needs proxyProtocol",
        ),
        (
            json!({"name": "x", "proxyProtocol": true, "proxyTrustedRanges": ["vpc"]}),
            "\"vpc\" is not an address",
        ),
        (
            json!({"name": "x", "listeners": ["mqtts"]}),
            "services[x].listeners names mqtts, which is not enabled",
        ),
        (
            json!({"name": "x", "listeners": ["mqtt", "mqtt"]}),
            "must not name a listener twice",
        ),
    ];
    for (service, text) in cases {
        let message = with(service.clone());
        assert!(message.contains(text), "{service}: {message}");
    }
    let message = error(json!({"auth": {"allowAnonymous": true},
        "services": [{"name": "a"}, {"name": "a"}]}));
    assert!(message.contains("must be unique"), "{message}");
    let message = error(json!({"services": [{"name": "a", "type": "NodePort"}]}));
    assert!(
        message.contains("services[a]: type LoadBalancer or NodePort exposes"),
        "{message}"
    );
    let message = error(json!({"service": {"listeners": ["wss"]}}));
    assert!(
        message.starts_with("service.listeners names wss"),
        "{message}"
    );
    let message = error(json!({
        "auth": {"allowAnonymous": true},
        "listeners": {"mqtts": {"enabled": true, "port": 8883}},
        "service": {"type": "LoadBalancer"},
        "tls": {"mode": "loadBalancer", "loadBalancer": {"provider": "aws", "certificate": "arn:x"}},
        "services": [{"name": "internal"}],
    }));
    assert!(
        message.contains("must be type LoadBalancer (TLS ends"),
        "{message}"
    );
}
