//! Network isolation of the broker pods: the NetworkPolicy the operator ships by default, so the
//! cluster and admin ports are not reachable from every pod in the cluster.

use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The NetworkPolicy over the broker pods: cluster port from the same MqttCluster's pods only,
/// admin port from the operator's namespace (plus `adminFrom`), client listeners open.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyOptions {
    /// Whether the operator manages a NetworkPolicy (deleted again when turned off).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Extra peers allowed on the admin port (for example the namespace of Prometheus).
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
