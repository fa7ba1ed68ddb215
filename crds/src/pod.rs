//! Pod-level knobs (placement, metadata, security, env) and persistent storage.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, PodSecurityContext, SecurityContext, Toleration, TopologySpreadConstraint,
};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Options copied into the broker pod template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOptions {
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How pods spread over failure domains. When unset the operator spreads them across nodes
    /// and zones (ScheduleAnyway); set an empty list to disable spreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Extra annotations on the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels on the pods (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Pod security context. When unset: the restricted Pod Security Standard (non-root, uid 10001,
    /// RuntimeDefault seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Broker container security context. When unset: no privilege escalation, all capabilities
    /// dropped, read-only root filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
    /// Extra environment of the broker container (CORVID_SECTION__KEY overrides configuration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// Storage for session and retained state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode == oldSelf.mode").message("persistence.mode is immutable (changing it would recreate the volumes)"),
    validation = Rule::new("!has(oldSelf.storageClassName) || (has(self.storageClassName) && self.storageClassName == oldSelf.storageClassName)")
        .message("persistence.storageClassName is immutable")
)]
pub struct PersistenceSpec {
    /// none keeps state in memory (lost when a pod restarts); pvc gives every pod a PersistentVolumeClaim.
    #[serde(default)]
    pub mode: PersistenceMode,
    /// Size of each pod's volume (pvc mode).
    #[serde(default = "default_size")]
    pub size: String,
    /// StorageClass of the volumes (pvc mode); unset uses the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// What happens to the claims when the cluster is deleted or scaled down (pvc mode); both
    /// default to Retain so data is only removed when asked for. Needs Kubernetes 1.27 or newer.
    #[serde(default)]
    pub retention: PersistenceRetention,
}

impl Default for PersistenceSpec {
    fn default() -> Self {
        PersistenceSpec {
            mode: PersistenceMode::None,
            size: default_size(),
            storage_class_name: None,
            retention: PersistenceRetention::default(),
        }
    }
}

fn default_size() -> String {
    "1Gi".to_string()
}

/// Persistence flavour.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "camelCase")]
pub enum PersistenceMode {
    /// State in memory only.
    #[default]
    None,
    /// One PersistentVolumeClaim per pod.
    Pvc,
}

/// Fate of the pods' claims, mapped onto the StatefulSet's persistentVolumeClaimRetentionPolicy.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceRetention {
    /// Retain keeps the claims when the MqttCluster (and so its StatefulSet) is deleted; Delete
    /// removes them with it.
    #[serde(default)]
    pub when_deleted: RetentionPolicy,
    /// Retain keeps the claims of pods removed by a scale-down (a later scale-up reuses them);
    /// Delete removes them.
    #[serde(default)]
    pub when_scaled: RetentionPolicy,
}

/// Whether a claim outlives its pod; serialized exactly as Kubernetes spells it.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RetentionPolicy {
    /// Keep the claim (and its data).
    #[default]
    Retain,
    /// Delete the claim together with its pod or StatefulSet.
    Delete,
}

impl RetentionPolicy {
    /// The value Kubernetes expects in persistentVolumeClaimRetentionPolicy.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Retain => "Retain",
            RetentionPolicy::Delete => "Delete",
        }
    }
}
