//! Network isolation of the broker pods: the NetworkPolicy the operator ships by default, so the
//! cluster and admin ports are not reachable from every pod in the cluster.

use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The NetworkPolicy over the broker pods: cluster port from the same MqttCluster's pods only,
/// client listeners open, admin port open (token-protected) unless `adminFrom` restricts it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyOptions {
    /// Whether the operator manages a NetworkPolicy (deleted again when turned off).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Restricts the admin port to the operator's namespace plus these peers (for example
    /// Prometheus' namespace, and the source address of the API server's pod proxy, through
    /// which the operator calls the admin API). Empty: the admin port is open (it answers only
    /// with the cluster's admin token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub admin_from: Vec<NetworkPolicyPeer>,
}

impl Default for NetworkPolicyOptions {
    fn default() -> Self {
        NetworkPolicyOptions {
            enabled: true,
            admin_from: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}
