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
        .message("service.externalTrafficPolicy needs service.type NodePort or LoadBalancer")
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
