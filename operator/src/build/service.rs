//! The Services: the headless one (stable pod DNS and peer discovery, not-ready pods included so
//! members can find each other while joining), the client-facing one and the additional ones of
//! spec.services, which set only the fields the operator owns so a cloud load-balancer
//! controller's fields are left alone; and which PROXY protocol setting each broker listener
//! gets from the Services that reach it.

use std::collections::BTreeMap;

use corvid_crds::{
    ListenerKind, LoadBalancerProvider, MqttCluster, ServiceListener, ServiceType, TlsMode,
    ADMIN_PORT, CLUSTER_PORT,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config;
use super::names::{owned_meta, Names};
use crate::validate::InvalidSpec;

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

/// The enabled listeners a Service exposes: those it names, or every enabled one when it names
/// none (validation refuses naming a disabled one; it is left out here all the same).
pub fn exposed(cluster: &MqttCluster, named: &[ServiceListener]) -> Vec<ListenerKind> {
    let listeners = &cluster.spec.listeners;
    ListenerKind::ALL
        .into_iter()
        .filter(|k| listeners.get(*k).enabled)
        .filter(|k| named.is_empty() || named.iter().any(|n| ListenerKind::from(*n) == *k))
        .collect()
}

fn ports_of(cluster: &MqttCluster, kinds: &[ListenerKind]) -> Vec<ServicePort> {
    kinds
        .iter()
        .map(|&k| {
            port(
                k.name(),
                cluster.spec.listeners.get(k).port,
                target_port(cluster, k).name(),
            )
        })
        .collect()
}

/// One Service that carries client traffic to the broker listeners, as far as PROXY protocol
/// is concerned: which listeners it reaches and whether its traffic starts with a PROXY header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    /// The spec field that declares it, for messages (`spec.service`, `spec.services[name]`).
    pub field: String,
    /// The client listeners it exposes (Service ports).
    pub listeners: Vec<ListenerKind>,
    /// Whether its traffic carries a PROXY header.
    pub proxy_protocol: bool,
    /// Sources whose PROXY header is believed (empty: any).
    pub proxy_trusted: Vec<String>,
}

/// Every Service that exposes client listeners: spec.service's first, then spec.services in order.
pub fn exposures(cluster: &MqttCluster) -> Vec<Exposure> {
    let spec = &cluster.spec;
    let client_proxy = config::proxy_protocol(cluster);
    let mut out = vec![Exposure {
        field: "spec.service".to_string(),
        listeners: exposed(cluster, &spec.service.listeners),
        proxy_protocol: client_proxy,
        proxy_trusted: if client_proxy {
            config::proxy_trusted(cluster)
        } else {
            Vec::new()
        },
    }];
    out.extend(spec.services.iter().map(|s| Exposure {
        field: format!("spec.services[{}]", s.name),
        listeners: exposed(cluster, &s.listeners),
        proxy_protocol: s.proxy_protocol,
        proxy_trusted: if s.proxy_protocol {
            s.proxy_trusted_ranges.clone()
        } else {
            Vec::new()
        },
    }));
    out
}

/// PROXY protocol settings of one broker listener.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyTrust {
    /// Whether the listener expects a PROXY header.
    pub proxy_protocol: bool,
    /// Sources whose PROXY header it believes (empty: any).
    pub proxy_trusted: Vec<String>,
}

/// The PROXY protocol setting of the broker listener `kind`, which follows the Services whose
/// ports land on it (with TLS at the load balancer, mqtts and wss land on mqtt and ws). A
/// listener no Service reaches keeps spec.service's setting. The broker has one listener per
/// kind, so Services that disagree cannot both be served: that is refused, naming both.
pub fn proxy_trust(cluster: &MqttCluster, kind: ListenerKind) -> Result<ProxyTrust, InvalidSpec> {
    let all = exposures(cluster);
    let reaching: Vec<&Exposure> = all
        .iter()
        .filter(|e| e.listeners.iter().any(|k| target_port(cluster, *k) == kind))
        .collect();
    let Some(first) = reaching.first() else {
        let client = &all[0];
        return Ok(ProxyTrust {
            proxy_protocol: client.proxy_protocol,
            proxy_trusted: client.proxy_trusted.clone(),
        });
    };
    if let Some(other) = reaching
        .iter()
        .find(|e| e.proxy_protocol != first.proxy_protocol)
    {
        let (with, without) = if first.proxy_protocol {
            (first, other)
        } else {
            (other, first)
        };
        return Err(InvalidSpec(format!(
            "the broker listener {} is exposed by {} with PROXY protocol and by {} without; a \
             listener either expects the PROXY header or not, so expose it through Services that \
             agree (narrow spec.service.listeners or spec.services[].listeners)",
            kind.name(),
            with.field,
            without.field
        )));
    }
    if !first.proxy_protocol {
        return Ok(ProxyTrust::default());
    }
    // The union of the trusted ranges; one Service trusting any sender opens the listener.
    let mut trusted: Vec<String> = Vec::new();
    for e in &reaching {
        if e.proxy_trusted.is_empty() {
            trusted.clear();
            break;
        }
        for range in &e.proxy_trusted {
            if !trusted.contains(range) {
                trusted.push(range.clone());
            }
        }
    }
    Ok(ProxyTrust {
        proxy_protocol: true,
        proxy_trusted: trusted,
    })
}

/// Client Service: one port per exposed listener, plus owned metadata and LB options.
pub fn client(cluster: &MqttCluster, names: &Names) -> Service {
    let spec = &cluster.spec;
    let svc = &spec.service;
    let ports = ports_of(cluster, &exposed(cluster, &svc.listeners));
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

/// The additional Services of spec.services, named `<cluster>-<name>`, built like the client
/// Service from their own options. With TLS at the load balancer, one of type LoadBalancer that
/// exposes a TLS listener gets the preset's annotations for its own TLS ports and PROXY setting.
pub fn extra(cluster: &MqttCluster, names: &Names) -> Vec<Service> {
    cluster
        .spec
        .services
        .iter()
        .map(|s| {
            let kinds = exposed(cluster, &s.listeners);
            let mut meta = owned_meta(cluster, names, names.extra_service(&s.name));
            let mut labels = s.labels.clone();
            labels.extend(names.labels());
            meta.labels = Some(labels);
            let mut annotations = BTreeMap::new();
            let tls = &cluster.spec.tls;
            if let (TlsMode::LoadBalancer, Some(lb), ServiceType::LoadBalancer) =
                (tls.mode, &tls.load_balancer, s.type_)
            {
                let tls_ports: Vec<String> = kinds
                    .iter()
                    .filter(|k| k.is_tls())
                    .map(|k| cluster.spec.listeners.get(*k).port.to_string())
                    .collect();
                if !tls_ports.is_empty() {
                    annotations.extend(preset(
                        lb.provider,
                        lb.certificate.as_deref(),
                        &tls_ports.join(","),
                        s.proxy_protocol,
                    ));
                }
            }
            annotations.extend(s.annotations.clone());
            meta.annotations = (!annotations.is_empty()).then_some(annotations);
            Service {
                metadata: meta,
                spec: Some(ServiceSpec {
                    type_: Some(s.type_.as_str().to_string()),
                    selector: Some(names.selector()),
                    ports: Some(ports_of(cluster, &kinds)),
                    load_balancer_class: s.load_balancer_class.clone(),
                    load_balancer_source_ranges: (!s.load_balancer_source_ranges.is_empty())
                        .then(|| s.load_balancer_source_ranges.clone()),
                    external_traffic_policy: s
                        .external_traffic_policy
                        .map(|p| p.as_str().to_string()),
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            }
        })
        .collect()
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
