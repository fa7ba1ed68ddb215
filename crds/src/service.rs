//! The client-facing Service: only the fields listed here are owned by the operator, so a cloud
//! load-balancer controller can manage its own fields without a tug of war.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Options of the client Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type == 'LoadBalancer' || (!has(self.loadBalancerClass) && size(self.loadBalancerSourceRanges) == 0)")
        .message("service.loadBalancerClass and service.loadBalancerSourceRanges need service.type LoadBalancer"),
    validation = Rule::new("self.type != 'ClusterIP' || !has(self.externalTrafficPolicy)")
        .message("service.externalTrafficPolicy needs service.type NodePort or LoadBalancer"),
    validation = Rule::new("!has(self.listeners) || self.listeners.all(l, self.listeners.exists_one(m, m == l))")
        .message("service.listeners must not name a listener twice")
)]
pub struct ServiceOptions {
    /// Service type: ClusterIP, NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Extra annotations on the Service (merged with those written by tls.loadBalancer presets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels on the Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Load-balancer implementation class (for example service.k8s.aws/nlb). Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    /// Client CIDRs allowed through the load balancer.
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    /// Cluster or Local; Local keeps client source addresses and avoids a second hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<ExternalTrafficPolicy>,
    /// Listeners the client Service exposes, each on the listener's port; empty (the default):
    /// every enabled one. Narrow it when another Service (spec.services) serves a listener with
    /// a different PROXY protocol setting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub listeners: Vec<ServiceListener>,
}

/// How the client Service is exposed.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Exposed on a port of every node.
    NodePort,
    /// Exposed through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The value Kubernetes expects in `spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Routing of external traffic to nodes.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalTrafficPolicy {
    /// Any node forwards to any pod (source address is lost).
    Cluster,
    /// Only nodes with a broker pod receive traffic (source address kept).
    Local,
}

impl ExternalTrafficPolicy {
    /// The value Kubernetes expects in `spec.externalTrafficPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExternalTrafficPolicy::Cluster => "Cluster",
            ExternalTrafficPolicy::Local => "Local",
        }
    }
}

/// A client listener a Service exposes, by its port name.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ServiceListener {
    /// Plain MQTT (listeners.mqtt).
    Mqtt,
    /// MQTT over WebSocket (listeners.ws).
    Ws,
    /// MQTT over TLS (listeners.mqtts).
    Mqtts,
    /// MQTT over secure WebSocket (listeners.wss).
    Wss,
}

impl From<ServiceListener> for crate::ListenerKind {
    fn from(l: ServiceListener) -> Self {
        match l {
            ServiceListener::Mqtt => crate::ListenerKind::Mqtt,
            ServiceListener::Ws => crate::ListenerKind::Ws,
            ServiceListener::Mqtts => crate::ListenerKind::Mqtts,
            ServiceListener::Wss => crate::ListenerKind::Wss,
        }
    }
}

/// An additional client Service (`spec.services[]`), named `<cluster>-<name>`: one more way in
/// (an internal ClusterIP beside an internet-facing load balancer, say) with its own exposure
/// options, next to the client Service of `spec.service`, which always stays.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("services[].name must be lowercase letters, digits and '-', start with a letter and end with a letter or digit"),
    validation = Rule::new("self.name != 'headless'")
        .message("services[].name must not be headless: <cluster>-headless is the operator's peer-discovery Service"),
    validation = Rule::new("self.type == 'LoadBalancer' || (!has(self.loadBalancerClass) && size(self.loadBalancerSourceRanges) == 0)")
        .message("services[].loadBalancerClass and services[].loadBalancerSourceRanges need type LoadBalancer"),
    validation = Rule::new("self.type != 'ClusterIP' || !has(self.externalTrafficPolicy)")
        .message("services[].externalTrafficPolicy needs type NodePort or LoadBalancer"),
    validation = Rule::new("self.proxyProtocol || size(self.proxyTrustedRanges) == 0")
        .message("services[].proxyTrustedRanges needs proxyProtocol: true"),
    validation = Rule::new("self.listeners.all(l, self.listeners.exists_one(m, m == l))")
        .message("services[].listeners must not name a listener twice")
)]
pub struct ExtraService {
    /// Suffix of the Service's name: the Service is `<cluster>-<name>` (lowercase letters,
    /// digits and '-'; unique in the list; not `headless`).
    #[schemars(length(min = 1, max = 40))]
    pub name: String,
    /// Service type: ClusterIP, NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations on the Service (after the tls.loadBalancer preset's, when it applies).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels on the Service (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Load-balancer implementation class (for example service.k8s.aws/nlb). Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    /// Client CIDRs allowed through the load balancer.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub load_balancer_source_ranges: Vec<String>,
    /// Cluster or Local; Local keeps client source addresses and avoids a second hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<ExternalTrafficPolicy>,
    /// Listeners this Service exposes, each on the listener's port; empty: every enabled one.
    #[serde(default)]
    #[schemars(length(max = 4))]
    pub listeners: Vec<ServiceListener>,
    /// Whatever sends traffic through this Service (its load balancer) puts a PROXY protocol
    /// header first, so the broker listeners it reaches expect one. A broker listener either
    /// expects the header or not: a listener cannot be exposed by a Service with and one without
    /// PROXY protocol (spec.service's follows tls.loadBalancer.proxyProtocol). Configuring the
    /// load balancer to send it is up to this Service's annotations, except for the TLS preset.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// With proxyProtocol: the source ranges (CIDRs) PROXY headers are believed from, e.g. the
    /// load balancer's subnet. Empty: any sender. A listener behind several PROXY Services trusts
    /// the union of their ranges (any sender if one of them is empty).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub proxy_trusted_ranges: Vec<String>,
}
