//! The `MqttCluster` root type: one field per concern, each defaulted so that an empty spec is a
//! working three-node cluster.

// Several `printcolumn(type_ = "string", ...)` entries are distinct columns, not duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::{LocalObjectReference, ResourceRequirements};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{
    AclSpec, AuthSpec, AutoSubscription, BridgesSpec, LimitsSpec, Listeners, MonitoringSpec,
    NetworkPolicyOptions, PersistenceSpec, PodDisruptionBudgetSpec, PodTemplateOptions,
    PodTemplateOverride, RebalanceSpec, ServiceOptions, SessionsSpec, SharedSubscriptionStrategy,
    TlsSpec, UpgradeStrategy, Webhook,
};

/// Desired state of a clustered Corvid MQTT broker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "corvid.dev",
    version = "v1alpha1",
    kind = "MqttCluster",
    namespaced,
    shortname = "mqc",
    category = "corvid",
    status = "crate::MqttClusterStatus",
    doc = "A clustered Corvid MQTT broker managed by corvid-operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status",
        description = "Whether the cluster serves clients"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Broker pods that exist"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.currentVersion",
        description = "Broker version running on every pod"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "Client-facing address"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.replicas >= 1").message("spec.replicas must be at least 1"),
    validation = Rule::new("self.tls.mode != 'none' || !(self.listeners.mqtts.enabled || self.listeners.wss.enabled)")
        .message("listeners.mqtts and listeners.wss need tls.mode broker or loadBalancer"),
    validation = Rule::new("self.tls.mode == 'none' || self.listeners.mqtts.enabled || self.listeners.wss.enabled")
        .message("tls.mode broker or loadBalancer needs listeners.mqtts or listeners.wss enabled"),
    validation = Rule::new("self.tls.mode != 'loadBalancer' || self.service.type == 'LoadBalancer'")
        .message("tls.mode loadBalancer needs service.type LoadBalancer"),
    validation = Rule::new("!(self.service.type in ['LoadBalancer', 'NodePort']) || has(self.auth.usersSecret) || has(self.auth.http) || (has(self.auth.allowAnonymous) && self.auth.allowAnonymous)")
        .message("service.type LoadBalancer or NodePort exposes the brokers beyond the cluster: configure auth.usersSecret or auth.http, or set auth.allowAnonymous: true on purpose"),
    validation = Rule::new("!has(self.services) || self.services.all(s, !(s.type in ['LoadBalancer', 'NodePort'])) || has(self.auth.usersSecret) || has(self.auth.http) || (has(self.auth.allowAnonymous) && self.auth.allowAnonymous)")
        .message("services[].type LoadBalancer or NodePort exposes the brokers beyond the cluster: configure auth.usersSecret or auth.http, or set auth.allowAnonymous: true on purpose"),
    validation = Rule::new("!has(self.services) || self.services.all(s, self.services.exists_one(t, t.name == s.name))")
        .message("services[].name must be unique"),
    validation = Rule::new("(!has(self.services) || self.services.all(s, s.listeners.all(l, (l == 'mqtt' && self.listeners.mqtt.enabled) || (l == 'ws' && self.listeners.ws.enabled) || (l == 'mqtts' && self.listeners.mqtts.enabled) || (l == 'wss' && self.listeners.wss.enabled)))) && (!has(self.service.listeners) || self.service.listeners.all(l, (l == 'mqtt' && self.listeners.mqtt.enabled) || (l == 'ws' && self.listeners.ws.enabled) || (l == 'mqtts' && self.listeners.mqtts.enabled) || (l == 'wss' && self.listeners.wss.enabled)))")
        .message("service.listeners and services[].listeners may only name enabled listeners"),
    validation = Rule::new("self.tls.mode != 'loadBalancer' || !has(self.services) || self.services.all(s, s.type == 'LoadBalancer' || (size(s.listeners) == 0 ? !(self.listeners.mqtts.enabled || self.listeners.wss.enabled) : !s.listeners.exists(l, l == 'mqtts' || l == 'wss')))")
        .message("with tls.mode loadBalancer, a services[] entry that exposes mqtts or wss must be type LoadBalancer (TLS ends at the load balancer)")
)]
#[serde(rename_all = "camelCase")]
pub struct MqttClusterSpec {
    /// Number of broker pods. Scale-down evacuates the leaving pods first; must be at least 1.
    #[serde(default = "default_replicas")]
    pub replicas: i32,

    /// Full image reference. When unset the operator uses corvid/corvid-broker:<version>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Broker version; the image tag when image is unset, and the version reported in status.
    #[serde(default = "default_version")]
    pub version: String,

    /// Image pull policy of the broker container (Always, IfNotPresent, Never).
    #[serde(default)]
    pub image_pull_policy: PullPolicy,

    /// Secrets used to pull the broker image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// CPU and memory requests and limits of the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Client listeners (MQTT, WebSocket, and their TLS variants): whether each is on and its port.
    #[serde(default)]
    pub listeners: Listeners,

    /// The client-facing Service. Only the fields listed here are owned by the operator.
    #[serde(default)]
    pub service: ServiceOptions,

    /// Additional client Services, each named `<cluster>-<name>` with its own type, annotations,
    /// source ranges, listeners and PROXY protocol setting (at most 8); spec.service's Service
    /// stays the default one. Removing an entry deletes its Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub services: Vec<crate::ExtraService>,

    /// Where TLS terminates: none, at the cloud load balancer, or in the broker.
    #[serde(default)]
    pub tls: TlsSpec,

    /// Client authentication: anonymous access, users from a Secret, client-id allow list, HTTP backend.
    #[serde(default)]
    pub auth: AuthSpec,

    /// Topic access control: ordered rules and what happens when none matches.
    #[serde(default)]
    pub acl: AclSpec,

    /// Connection, rate and packet limits enforced by every broker.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// Persistent session behaviour: offline queue size and session expiry.
    #[serde(default)]
    pub sessions: SessionsSpec,

    /// How messages of a shared subscription are spread over its members.
    #[serde(default)]
    pub shared_subscription_strategy: SharedSubscriptionStrategy,

    /// Subscriptions the broker adds for every client on connect (%c = client id, %u = username).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auto_subscriptions: Vec<AutoSubscription>,

    /// HTTP endpoints notified of client and message events (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub webhooks: Vec<Webhook>,

    /// Bridges to other MQTT brokers (IoT hubs, RabbitMQ) and to Kafka; credentials from Secrets.
    #[serde(default, skip_serializing_if = "BridgesSpec::is_empty")]
    pub bridges: BridgesSpec,

    /// Free-form broker configuration, deep-merged over the configuration rendered from this spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::cluster::free_form")]
    pub config: Option<serde_json::Value>,

    /// Storage for session and retained state: none (in memory) or a PersistentVolumeClaim per pod.
    #[serde(default)]
    pub persistence: PersistenceSpec,

    /// Pod placement, metadata, security context and extra environment of the broker pods
    /// (spec.podTemplate is merged over these and wins where both set a field).
    #[serde(default)]
    pub pod: PodTemplateOptions,

    /// A partial pod template merged over the pod the operator builds: sidecars, init
    /// containers, extra volumes and mounts, envFrom, probe timing, host aliases, ServiceAccount
    /// annotations. Precedence, lowest first: the operator's defaults, then spec.pod,
    /// spec.resources and the other typed fields, then this template (lists merge by name,
    /// maps by key, other fields replace). The fields that keep the broker safe always win and
    /// setting them here is refused with a message naming the field: the broker container's
    /// command, args, ports, image and securityContext, the pod securityContext,
    /// serviceAccountName, terminationGracePeriodSeconds, the operator's labels, volumes, mount
    /// paths and POD_* variables, and the probes' handlers. A change rolls the pods like any
    /// template change.
    #[serde(default, skip_serializing_if = "PodTemplateOverride::is_empty")]
    pub pod_template: PodTemplateOverride,

    /// How the operator rolls pods on image, version or configuration changes.
    #[serde(default)]
    pub upgrade_strategy: UpgradeStrategy,

    /// Moving connections onto new pods after a scale-up.
    #[serde(default)]
    pub rebalance: RebalanceSpec,

    /// The PodDisruptionBudget protecting the cluster from voluntary disruptions.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// Prometheus Operator integration.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// The NetworkPolicy isolating the cluster and admin ports (on by default).
    #[serde(default)]
    pub network_policy: NetworkPolicyOptions,

    /// Client connect/disconnect events (and chosen messages) written to PostgreSQL and/or Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_store: Option<crate::EventStoreSpec>,
}

/// When the kubelet pulls the broker image.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum PullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the image is not on the node.
    #[default]
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

fn default_replicas() -> i32 {
    3
}

fn default_version() -> String {
    crate::DEFAULT_BROKER_VERSION.to_string()
}

/// Schema of an arbitrary object that the API server keeps as written.
pub(crate) fn free_form(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "Free-form broker configuration (snake_case keys as in corvid.yaml), deep-merged over the configuration rendered from this spec.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

impl Default for MqttClusterSpec {
    fn default() -> Self {
        // Deserializing an empty object applies every serde default: one source of truth.
        serde_json::from_value(serde_json::json!({})).unwrap_or_else(|_| unreachable!())
    }
}

impl MqttClusterSpec {
    /// The image the broker pods run: `spec.image`, or the default repository tagged with `spec.version`.
    pub fn image_ref(&self) -> String {
        match &self.image {
            Some(image) => image.clone(),
            None => format!("{}:{}", crate::DEFAULT_IMAGE_REPOSITORY, self.version),
        }
    }
}
