//! Observed state written by the operator: conditions, counts, versions, members, endpoint, and
//! the rollout step in progress (so that an operator restart resumes where it stopped).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde::{Deserialize, Serialize};

/// Status of an MqttCluster.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MqttClusterStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Available, Progressing, Degraded and ReconcileSuccess; never left Unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Broker pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Broker pods that are Ready (joined and synced).
    #[serde(default)]
    pub ready_replicas: i32,
    /// Broker pods running the desired revision.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Label selector of the broker pods (for the scale subresource and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Version every pod runs once the rollout is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Version being rolled out (equals currentVersion when idle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Cluster members as the brokers report them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Client endpoint: the load-balancer address, or the Service DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The rollout or scale-down step in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationStatus>,
    /// A scale-up waiting for its new pods before the old ones are asked to rebalance
    /// (only with `spec.rebalance.enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_rebalance: Option<crate::ops::PendingRebalance>,
}

/// One member of the broker cluster.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MemberStatus {
    /// Node (pod) name.
    pub name: String,
    /// Membership state as reported by the broker: self (the broker that answered), ready,
    /// joining, evacuating or dead (unknown for a state this operator does not know).
    pub state: String,
    /// Number of routes the member owns.
    #[serde(default)]
    pub routes: i64,
}

/// A rollout or scale-down step that spans reconciles.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    /// What is being done to the pod.
    pub phase: OperationPhase,
    /// The pod the step applies to.
    pub pod: String,
    /// StatefulSet revision the step moves the pod to (empty for scale-down).
    #[serde(default)]
    pub revision: String,
    /// RFC 3339 time the step started; timeouts are measured from it.
    pub since: String,
}

/// Step of a rollout or scale-down.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OperationPhase {
    /// The pod was asked to move its clients away.
    Evacuating,
    /// The drained pod is being deleted so the StatefulSet recreates it at the new revision.
    Replacing,
    /// The replaced pod must become Ready and join the cluster.
    WaitingReady,
    /// The pods above the new replica count are being evacuated before the StatefulSet shrinks.
    ScalingDown,
}
