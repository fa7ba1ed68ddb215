//! NetworkPolicy over the broker pods, on by default: the cluster port (TCP links and UDP gossip)
//! only from pods of the same MqttCluster, the client listeners open to everyone, and the admin
//! port open unless `spec.networkPolicy.adminFrom` restricts it (then: the operator's namespace
//! plus those peers). Open by default because the operator calls the admin API through the API
//! server's pod proxy, whose source address depends on the network plugin; a default that drops
//! those calls would make every rollout wait out its drain timeouts.

use std::collections::BTreeMap;

use corvid_crds::{ListenerKind, MqttCluster, ADMIN_PORT, CLUSTER_PORT};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::broker_serves;
use super::names::{owned_meta, Names};

/// Label every namespace carries with its own name (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn port(number: i32, protocol: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(number)),
        protocol: Some(protocol.to_string()),
        ..NetworkPolicyPort::default()
    }
}

fn match_labels(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..LabelSelector::default()
    }
}

/// The policy, or None when `spec.networkPolicy.enabled` is false (the apply step then deletes
/// one created before). `operator_namespace` is where the operator runs: with `adminFrom` set,
/// the admin port admits it too.
pub fn build(
    cluster: &MqttCluster,
    names: &Names,
    operator_namespace: &str,
) -> Option<NetworkPolicy> {
    let spec = &cluster.spec.network_policy;
    if !spec.enabled {
        return None;
    }
    // Members only: the same selector labels, in the cluster's own namespace.
    let members = NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            pod_selector: Some(match_labels(names.selector())),
            ..NetworkPolicyPeer::default()
        }]),
        ports: Some(vec![port(CLUSTER_PORT, "TCP"), port(CLUSTER_PORT, "UDP")]),
    };
    let admin_peers = (!spec.admin_from.is_empty()).then(|| {
        let mut peers = vec![NetworkPolicyPeer {
            namespace_selector: Some(match_labels(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_string(),
                operator_namespace.to_string(),
            )]))),
            ..NetworkPolicyPeer::default()
        }];
        peers.extend(spec.admin_from.iter().cloned());
        peers
    });
    let admin = NetworkPolicyIngressRule {
        from: admin_peers,
        ports: Some(vec![port(ADMIN_PORT, "TCP")]),
    };
    // The container ports the broker listens on for clients, open to every source.
    let client_ports: Vec<NetworkPolicyPort> = ListenerKind::ALL
        .into_iter()
        .filter(|k| broker_serves(cluster, *k))
        .map(|k| port(cluster.spec.listeners.get(k).port, "TCP"))
        .collect();
    let clients = NetworkPolicyIngressRule {
        from: None,
        ports: Some(client_ports),
    };
    Some(NetworkPolicy {
        metadata: owned_meta(cluster, names, names.network_policy()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(names.selector())),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(vec![members, admin, clients]),
            ..NetworkPolicySpec::default()
        }),
    })
}
