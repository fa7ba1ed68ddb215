//! Object names and the label set every applied object carries (used to select pods and to find
//! objects to prune).

use std::collections::BTreeMap;

use corvid_crds::MqttCluster;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

/// Label with the cluster's name; selects everything the operator created for one MqttCluster.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label naming the application.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Label naming the manager (this operator).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label naming the component.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Pod label with the broker version the pod runs.
pub const VERSION_LABEL: &str = "app.kubernetes.io/version";
/// Pod-template annotation with the hash of the rendered configuration: a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "corvid.dev/config-hash";
/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "corvid-operator";

/// Names of the objects that belong to one MqttCluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The MqttCluster's name (also the StatefulSet's and the client Service's).
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
}

impl Names {
    /// Names for a cluster object.
    pub fn of(cluster: &MqttCluster) -> Self {
        Names {
            cluster: cluster.name_any(),
            namespace: cluster.namespace().unwrap_or_default(),
        }
    }
    /// StatefulSet name; pods are `<statefulset>-<ordinal>`.
    pub fn statefulset(&self) -> String {
        self.cluster.clone()
    }
    /// Client Service name.
    pub fn client_service(&self) -> String {
        self.cluster.clone()
    }
    /// Name of the additional client Service `spec.services[].name` (`<cluster>-<name>`).
    pub fn extra_service(&self, name: &str) -> String {
        format!("{}-{name}", self.cluster)
    }
    /// Headless Service name (peer discovery and stable pod DNS).
    pub fn headless_service(&self) -> String {
        format!("{}-headless", self.cluster)
    }
    /// ConfigMap with corvid.yaml.
    pub fn config_map(&self) -> String {
        format!("{}-config", self.cluster)
    }
    /// Secret shared by the members to authenticate each other.
    pub fn cluster_secret(&self) -> String {
        format!("{}-cluster-secret", self.cluster)
    }
    /// Secret holding the token of the brokers' admin API (mounted in every pod, sent by the
    /// operator on each admin call).
    pub fn admin_token_secret(&self) -> String {
        format!("{}-admin-token", self.cluster)
    }
    /// The Names of the cluster a broker pod belongs to, from the pod's name
    /// (`<statefulset>-<ordinal>`, the StatefulSet named after the cluster).
    pub fn of_pod(namespace: &str, pod: &str) -> Option<Self> {
        let (cluster, ordinal) = pod.rsplit_once('-')?;
        (!cluster.is_empty() && !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()))
            .then(|| Names {
                cluster: cluster.to_string(),
                namespace: namespace.to_string(),
            })
    }
    /// ServiceAccount, Role and RoleBinding of the broker pods.
    pub fn service_account(&self) -> String {
        format!("{}-broker", self.cluster)
    }
    /// NetworkPolicy over the broker pods (named after the cluster, like the StatefulSet).
    pub fn network_policy(&self) -> String {
        self.cluster.clone()
    }
    /// Secret the cert-manager Certificate writes.
    pub fn tls_secret(&self) -> String {
        format!("{}-tls", self.cluster)
    }
    /// Name of the pod with this ordinal.
    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{}", self.statefulset(), ordinal)
    }
    /// Selector labels of the broker pods.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_string(), "corvid".to_string()),
            (INSTANCE_LABEL.to_string(), self.cluster.clone()),
        ])
    }
    /// The selector rendered as a label-selector string (for status.selector and list calls).
    pub fn selector_string(&self) -> String {
        self.selector()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
    /// Labels of every object the operator applies.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert(MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string());
        labels.insert(COMPONENT_LABEL.to_string(), "broker".to_string());
        labels
    }
}

/// Metadata of an owned object: name, namespace, labels and a controller owner reference, so
/// garbage collection removes it with the MqttCluster.
pub fn owned_meta(cluster: &MqttCluster, names: &Names, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(names.labels()),
        owner_references: owner_ref(cluster).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Controller owner reference to the cluster (None only for an object without uid, i.e. in tests
/// built from a bare spec).
pub fn owner_ref(cluster: &MqttCluster) -> Option<OwnerReference> {
    cluster.controller_owner_ref(&())
}
