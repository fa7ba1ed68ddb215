//! The NetworkPolicy: cluster port from members only, admin port open unless adminFrom
//! restricts it to the operator's namespace and those peers, client listeners open, nothing
//! when disabled.

use corvid_crds::{ADMIN_PORT, CLUSTER_PORT};
use k8s_openapi::api::networking::v1::{NetworkPolicyIngressRule, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::build;

/// (port, protocol) pairs of one rule.
fn ports(rule: &NetworkPolicyIngressRule) -> Vec<(i32, String)> {
    rule.ports
        .iter()
        .flatten()
        .map(|p| {
            let number = match &p.port {
                Some(IntOrString::Int(n)) => *n,
                other => panic!("numeric port expected, got {other:?}"),
            };
            (number, p.protocol.clone().unwrap_or_default())
        })
        .collect()
}

/// The ingress rules of the policy the spec builds.
fn ingress(d: crate::build::Desired) -> Vec<NetworkPolicyIngressRule> {
    d.network_policy
        .expect("policy")
        .spec
        .expect("spec")
        .ingress
        .expect("rules")
}

fn rule_for(rules: &[NetworkPolicyIngressRule], port: i32) -> &NetworkPolicyIngressRule {
    rules
        .iter()
        .find(|r| ports(r).iter().any(|(n, _)| *n == port))
        .unwrap_or_else(|| panic!("a rule for port {port}"))
}

#[test]
fn selects_the_broker_pods_and_restricts_the_cluster_port() {
    let (_, d) = build(json!({}));
    let policy = d.network_policy.expect("on by default");
    assert_eq!(policy.metadata.name.as_deref(), Some("demo"));
    let owner = &policy.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("MqttCluster", Some(true))
    );
    let spec = policy.spec.expect("spec");
    let selector =
        json!({"app.kubernetes.io/name": "corvid", "app.kubernetes.io/instance": "demo"});
    assert_eq!(
        serde_json::to_value(&spec.pod_selector).expect("json")["matchLabels"],
        selector
    );
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    let rules = spec.ingress.expect("ingress");
    assert_eq!(rules.len(), 3);

    // Cluster port: TCP links and UDP gossip, only from pods with the same selector labels.
    let members = rule_for(&rules, CLUSTER_PORT);
    assert_eq!(
        ports(members),
        vec![(CLUSTER_PORT, "TCP".into()), (CLUSTER_PORT, "UDP".into())]
    );
    let from = members.from.as_ref().expect("restricted");
    assert_eq!(from.len(), 1);
    assert!(from[0].namespace_selector.is_none() && from[0].ip_block.is_none());
    assert_eq!(
        serde_json::to_value(&from[0].pod_selector).expect("json")["matchLabels"],
        selector
    );

    // Admin port: open by default (token-protected; the operator's calls come through the
    // API server's pod proxy, from an address that depends on the network plugin).
    let admin = rule_for(&rules, ADMIN_PORT);
    assert_eq!(ports(admin), vec![(ADMIN_PORT, "TCP".into())]);
    assert!(
        admin.from.is_none(),
        "admin port takes any source by default"
    );

    // Client listeners (mqtt 1883 and ws 8083 by default): open to everyone.
    let clients = rule_for(&rules, 1883);
    assert_eq!(
        ports(clients),
        vec![(1883, "TCP".into()), (8083, "TCP".into())]
    );
    assert!(clients.from.is_none(), "client ports take any source");
}

#[test]
fn admin_from_restricts_the_admin_port_to_the_operator_namespace_and_those_peers() {
    let (_, d) = build(json!({"networkPolicy": {"adminFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]}}));
    let rules = ingress(d);
    let from: &Vec<NetworkPolicyPeer> = rule_for(&rules, ADMIN_PORT).from.as_ref().expect("from");
    assert_eq!(from.len(), 2);
    assert_eq!(
        serde_json::to_value(&from[0].namespace_selector).expect("json"),
        json!({"matchLabels": {"kubernetes.io/metadata.name": "corvid-system"}})
    );
    assert_eq!(
        serde_json::to_value(&from[1]).expect("json"),
        json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}})
    );
    // The extra peers widen only the admin port.
    assert_eq!(
        rule_for(&rules, CLUSTER_PORT)
            .from
            .as_ref()
            .expect("from")
            .len(),
        1
    );
}

#[test]
fn client_ports_follow_the_listeners_the_broker_serves() {
    let (_, d) = build(
        json!({"listeners": {"mqtt": {"port": 11883}, "ws": {"enabled": false},
        "mqtts": {"enabled": true}}, "tls": {"mode": "broker", "issuerRef": {"name": "ca"}}}),
    );
    let rules = ingress(d);
    assert_eq!(
        ports(rule_for(&rules, 11883)),
        vec![(11883, "TCP".into()), (8883, "TCP".into())]
    );
}

#[test]
fn disabled_builds_no_policy() {
    let (_, d) = build(json!({"networkPolicy": {"enabled": false}}));
    assert!(d.network_policy.is_none());
}
