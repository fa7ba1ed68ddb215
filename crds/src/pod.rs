//! Pod-level knobs (placement, metadata, security, env) and persistent storage.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, HostAlias, LocalObjectReference, PodDNSConfig, PodSecurityContext,
    SecurityContext, Toleration, TopologySpreadConstraint, Volume,
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
        .message("persistence.storageClassName is immutable"),
    validation = Rule::new("isQuantity(self.size)")
        .message("persistence.size must be a quantity such as 10Gi"),
    validation = Rule::new("!isQuantity(self.size) || !isQuantity(oldSelf.size) || quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0")
        .message("persistence.size cannot shrink (volumes only grow)")
)]
pub struct PersistenceSpec {
    /// none keeps state in memory (lost when a pod crashes); pvc gives every pod a PersistentVolumeClaim where the broker keeps persistent sessions, their queued messages and retained messages across restarts.
    #[serde(default)]
    pub mode: PersistenceMode,
    /// Size of each pod's volume (pvc mode). It may grow, never shrink: growing expands every
    /// claim in place when their StorageClass has allowVolumeExpansion, and re-creates the
    /// StatefulSet object (not its pods) so later claims get the new size.
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

/// Name of the broker container in the pods; `spec.podTemplate` merges an entry of this name into
/// it (the CEL rules on [`PodSpecOverride`] spell the same word).
pub const BROKER_CONTAINER: &str = "broker";

/// A partial pod template merged over the one the operator builds, for what the typed fields do
/// not cover (sidecars, init containers, extra volumes, cloud IAM on the ServiceAccount).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverride {
    /// Labels and annotations merged into the pods' metadata.
    #[serde(default, skip_serializing_if = "PodMetadataOverride::is_empty")]
    pub metadata: PodMetadataOverride,
    /// Pod spec fields merged over the built pod spec.
    #[serde(default, skip_serializing_if = "PodSpecOverride::is_empty")]
    pub spec: PodSpecOverride,
    /// Labels and annotations of the pods' ServiceAccount, which the operator creates (e.g.
    /// eks.amazonaws.com/role-arn or iam.gke.io/gcp-service-account for cloud IAM).
    #[serde(default, skip_serializing_if = "PodMetadataOverride::is_empty")]
    pub service_account: PodMetadataOverride,
}

impl PodTemplateOverride {
    /// Whether nothing is overridden (the field is then left out of the serialized spec).
    pub fn is_empty(&self) -> bool {
        self == &PodTemplateOverride::default()
    }
}

/// Labels and annotations to merge into an object's metadata (the operator's labels win).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadataOverride {
    /// Extra labels; the operator's own labels (app.kubernetes.io/*, corvid.dev/*) win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations; the operator's own (the pods' configuration hash) win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl PodMetadataOverride {
    /// Whether there is nothing to merge.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }
}

/// Pod spec fields a platform team may add or replace. Lists merge by name like a strategic
/// merge patch; the fields that keep the broker safe are refused (CEL here, and again by the
/// operator, which reports an InvalidSpec condition naming the field).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.containers) || self.containers.all(c, c.name != 'broker' || (!has(c.command) && !has(c.args)))")
        .message("podTemplate.spec.containers[broker]: command and args are set by the operator"),
    validation = Rule::new("!has(self.containers) || self.containers.all(c, c.name != 'broker' || !has(c.ports))")
        .message("podTemplate.spec.containers[broker].ports are set by the operator from spec.listeners"),
    validation = Rule::new("!has(self.containers) || self.containers.all(c, c.name != 'broker' || !has(c.image))")
        .message("podTemplate.spec.containers[broker].image is set by the operator: use spec.image or spec.version"),
    validation = Rule::new("!has(self.containers) || self.containers.all(c, c.name != 'broker' || !has(c.securityContext))")
        .message("podTemplate.spec.containers[broker].securityContext is the operator's hardening: use spec.pod.containerSecurityContext"),
    validation = Rule::new("!has(self.containers) || self.containers.all(c, c.name == 'broker' || has(c.image))")
        .message("podTemplate.spec.containers: a container other than broker needs an image"),
    validation = Rule::new("!has(self.initContainers) || self.initContainers.all(c, has(c.image))")
        .message("podTemplate.spec.initContainers: every init container needs an image"),
    validation = Rule::new("!has(self.securityContext)")
        .message("podTemplate.spec.securityContext is the operator's hardening: use spec.pod.securityContext"),
    validation = Rule::new("!has(self.serviceAccountName)")
        .message("podTemplate.spec.serviceAccountName is set by the operator (peer discovery needs its Role): annotate it with podTemplate.serviceAccount instead"),
    validation = Rule::new("!has(self.terminationGracePeriodSeconds)")
        .message("podTemplate.spec.terminationGracePeriodSeconds is sized by the operator from upgradeStrategy.drainTimeoutSeconds")
)]
pub struct PodSpecOverride {
    /// Containers merged by name. An entry named broker merges into the broker container: env
    /// (by name, this entry wins), envFrom (appended), volumeMounts (by mountPath), resources
    /// (replaces spec.resources) and the timing fields of its readiness, liveness and startup
    /// probes; its command, args, ports, image and securityContext are refused. Any other name
    /// adds a sidecar (image required); without a securityContext a sidecar gets the
    /// restricted profile (no privilege escalation, all capabilities dropped, RuntimeDefault
    /// seccomp).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub containers: Vec<Container>,
    /// Init containers, run before the broker in the order given (image required; the same
    /// securityContext default as sidecars). restartPolicy: Always makes a native sidecar.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub init_containers: Vec<Container>,
    /// Extra volumes, merged by name; the operator's own volume names (config, cluster-secret,
    /// admin-token, tmp, tls, users, bridges, eventstore, data) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub volumes: Vec<Volume>,
    /// Node labels the pods must match, merged over spec.pod.nodeSelector (this wins per key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations; replace spec.pod.tolerations when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity; replaces spec.pod.affinity when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Topology spread; replaces spec.pod.topologySpreadConstraints and the default spread when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Extra /etc/hosts entries of the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_aliases: Vec<HostAlias>,
    /// PriorityClass; replaces spec.pod.priorityClassName when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Pull secrets added to spec.imagePullSecrets (for sidecar images).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// DNS policy of the pods (ClusterFirst when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_policy: Option<String>,
    /// DNS resolver options of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<PodDNSConfig>,
    /// RuntimeClass of the pods (e.g. a sandboxed runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// Scheduler that places the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// Whether Service environment variables are injected into the containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_service_links: Option<bool>,
    /// Refused: the pod security context is the operator's hardening (spec.pod.securityContext
    /// replaces it). Listed so that setting it is an error rather than silently pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "refused")]
    pub security_context: Option<serde_json::Value>,
    /// Refused: the operator's ServiceAccount carries the Role peer discovery needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Refused: sized from upgradeStrategy.drainTimeoutSeconds so a draining pod is never killed early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
}

impl PodSpecOverride {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self == &PodSpecOverride::default()
    }
}

/// Schema of an object field that exists only to be refused with a clear message (typed as an
/// object so that CEL can see it; its content is not worth a schema).
fn refused(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "Owned by the operator; setting it is refused.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
