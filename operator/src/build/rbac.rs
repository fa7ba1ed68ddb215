//! ServiceAccount, Role and RoleBinding of the broker pods: read access to the EndpointSlices of the
//! cluster's own namespace (the broker's `kubernetes` discovery watches those of the headless Service), which is exactly what Kubernetes peer discovery needs.

use corvid_crds::MqttCluster;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::names::{owned_meta, Names};

/// The pods' identity; no API token beyond what the Role grants. spec.podTemplate.serviceAccount
/// adds labels and annotations (cloud IAM roles); the operator's labels win.
pub fn service_account(cluster: &MqttCluster, names: &Names) -> ServiceAccount {
    let extra = &cluster.spec.pod_template.service_account;
    let mut metadata = owned_meta(cluster, names, names.service_account());
    if !extra.labels.is_empty() {
        let mut labels = extra.labels.clone();
        labels.extend(metadata.labels.take().unwrap_or_default());
        metadata.labels = Some(labels);
    }
    if !extra.annotations.is_empty() {
        metadata
            .annotations
            .get_or_insert_with(Default::default)
            .extend(extra.annotations.clone());
    }
    ServiceAccount {
        metadata,
        ..ServiceAccount::default()
    }
}

/// Read-only access to EndpointSlices (the headless Service's members); nothing else.
pub fn role(cluster: &MqttCluster, names: &Names) -> Role {
    let read = vec!["get".to_string(), "list".to_string(), "watch".to_string()];
    Role {
        metadata: owned_meta(cluster, names, names.service_account()),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".to_string()]),
            resources: Some(vec!["endpointslices".to_string()]),
            verbs: read,
            ..PolicyRule::default()
        }]),
    }
}

/// Binds the Role to the ServiceAccount.
pub fn role_binding(cluster: &MqttCluster, names: &Names) -> RoleBinding {
    RoleBinding {
        metadata: owned_meta(cluster, names, names.service_account()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_string(),
            kind: "Role".to_string(),
            name: names.service_account(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name: names.service_account(),
            namespace: Some(names.namespace.clone()),
            ..Subject::default()
        }]),
    }
}
