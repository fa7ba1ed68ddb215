//! The two Services: the headless one (stable pod DNS and peer discovery, not-ready pods
//! included so members can find each other while joining) and the client-facing one, which sets
//! only the fields the operator owns so a cloud load-balancer controller's fields are left alone.

use std::collections::BTreeMap;

use corvid_crds::{
    ListenerKind, LoadBalancerProvider, MqttCluster, TlsMode, ADMIN_PORT, CLUSTER_PORT,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::names::{owned_meta, Names};

fn port(name: &str, port: i32, target: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(target.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// Headless Service over all broker pods, ready or not.
pub fn headless(cluster: &MqttCluster, names: &Names) -> Service {
    Service {
        metadata: owned_meta(cluster, names, names.headless_service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names.selector()),
            ports: Some(vec![
                port("cluster", CLUSTER_PORT, "cluster"),
                port("admin", ADMIN_PORT, "admin"),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The container port a client listener's traffic lands on: with TLS at the load balancer, the
/// TLS ports forward to the plain listener.
pub fn target_port(cluster: &MqttCluster, kind: ListenerKind) -> ListenerKind {
    if cluster.spec.tls.mode == TlsMode::LoadBalancer {
        kind.plaintext_peer()
    } else {
        kind
    }
}

/// Client Service: one port per enabled listener, plus owned metadata and LB options.
pub fn client(cluster: &MqttCluster, names: &Names) -> Service {
    let spec = &cluster.spec;
    let svc = &spec.service;
    let ports = ListenerKind::ALL
        .into_iter()
        .filter(|k| spec.listeners.get(*k).enabled)
        .map(|k| {
            port(
                k.name(),
                spec.listeners.get(k).port,
                target_port(cluster, k).name(),
            )
        })
        .collect();
    let mut meta = owned_meta(cluster, names, names.client_service());
    let mut labels = svc.labels.clone();
    labels.extend(names.labels());
    meta.labels = Some(labels);
    let annotations = annotations(cluster);
    meta.annotations = (!annotations.is_empty()).then_some(annotations);
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(svc.type_.as_str().to_string()),
            selector: Some(names.selector()),
            ports: Some(ports),
            load_balancer_class: svc.load_balancer_class.clone(),
            load_balancer_source_ranges: (!svc.load_balancer_source_ranges.is_empty())
                .then(|| svc.load_balancer_source_ranges.clone()),
            external_traffic_policy: svc.external_traffic_policy.map(|p| p.as_str().to_string()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Service annotations: the TLS preset's, then `tls.loadBalancer.annotations`, then
/// `service.annotations` (later wins).
pub fn annotations(cluster: &MqttCluster) -> BTreeMap<String, String> {
    let spec = &cluster.spec;
    let mut out = BTreeMap::new();
    if let (TlsMode::LoadBalancer, Some(lb)) = (spec.tls.mode, &spec.tls.load_balancer) {
        let tls_ports: Vec<String> = [ListenerKind::Mqtts, ListenerKind::Wss]
            .into_iter()
            .filter(|k| spec.listeners.get(*k).enabled)
            .map(|k| spec.listeners.get(k).port.to_string())
            .collect();
        out.extend(preset(
            lb.provider,
            lb.certificate.as_deref(),
            &tls_ports.join(","),
            lb.proxy_protocol,
        ));
        out.extend(lb.annotations.clone());
    }
    out.extend(spec.service.annotations.clone());
    out
}

/// Annotations of a cloud preset.
///
/// aws: an NLB from the AWS Load Balancer Controller that terminates TLS on the TLS ports with
/// the ACM certificate and forwards TCP to the pods. gcp and azure: their Service load balancers
/// are TCP pass-through (they cannot terminate TLS), so the preset selects the load-balancer
/// flavour and health probe; the certificate is recorded for TLS-terminating controllers that
/// read it through raw annotations.
pub fn preset(
    provider: LoadBalancerProvider,
    certificate: Option<&str>,
    tls_ports: &str,
    proxy_protocol: bool,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        a.insert(k.to_string(), v.to_string());
    };
    match provider {
        LoadBalancerProvider::Aws => {
            let p = "service.beta.kubernetes.io/aws-load-balancer-";
            set(&format!("{p}type"), "external");
            set(&format!("{p}nlb-target-type"), "ip");
            set(&format!("{p}scheme"), "internet-facing");
            set(&format!("{p}backend-protocol"), "tcp");
            if let Some(cert) = certificate {
                set(&format!("{p}ssl-cert"), cert);
                set(&format!("{p}ssl-ports"), tls_ports);
            }
            if proxy_protocol {
                set(&format!("{p}proxy-protocol"), "*");
            }
        }
        LoadBalancerProvider::Gcp => {
            set("cloud.google.com/l4-rbs", "enabled");
            if let Some(cert) = certificate {
                set("corvid.dev/tls-certificate", cert);
            }
        }
        LoadBalancerProvider::Azure => {
            set(
                "service.beta.kubernetes.io/azure-load-balancer-health-probe-protocol",
                "tcp",
            );
            if let Some(cert) = certificate {
                set("corvid.dev/tls-certificate", cert);
            }
            if proxy_protocol {
                set(
                    "service.beta.kubernetes.io/azure-pls-proxy-protocol",
                    "true",
                );
            }
        }
        LoadBalancerProvider::Raw => {}
    }
    a
}
