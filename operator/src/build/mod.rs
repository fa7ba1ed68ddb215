//! Pure builders: spec in, Kubernetes objects out. Nothing here talks to the API server, so every
//! object the operator applies can be checked by a plain unit test.

pub mod certificate;
pub mod config;
pub mod configmap;
pub mod names;
pub mod networkpolicy;
pub mod pdb;
pub mod podtemplate;
pub mod prometheusrule;
pub mod rbac;
pub mod secret;
pub mod service;
pub mod servicemonitor;
pub mod statefulset;

use corvid_crds::MqttCluster;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::DynamicObject;

pub use names::Names;

use crate::validate::Validated;

/// What the build step needs besides the spec: facts only the read step can know.
#[derive(Clone, Debug)]
pub struct BuildInputs {
    /// Replica count the StatefulSet gets now (the planner holds it up during a scale-down).
    pub statefulset_replicas: i32,
    /// Whether the ServiceMonitor CRD is installed in the cluster.
    pub service_monitor_crd: bool,
    /// Whether the PrometheusRule CRD is installed in the cluster.
    pub prometheus_rule_crd: bool,
    /// Namespace the operator runs in: the NetworkPolicy lets its admin calls through.
    pub operator_namespace: String,
}

/// Every object the spec wants, ready to be applied.
#[derive(Clone, Debug)]
pub struct Desired {
    /// Broker configuration.
    pub config_map: ConfigMap,
    /// Identity the pods use for peer discovery.
    pub service_account: ServiceAccount,
    /// Read access to the peer-discovery objects.
    pub role: Role,
    /// Binds the Role to the ServiceAccount.
    pub role_binding: RoleBinding,
    /// Headless Service that gives pods stable DNS names and peers each other.
    pub headless_service: Service,
    /// Client-facing Service.
    pub client_service: Service,
    /// Additional client Services (spec.services), in spec order.
    pub extra_services: Vec<Service>,
    /// The broker pods.
    pub statefulset: StatefulSet,
    /// Voluntary-disruption guard, when enabled.
    pub pdb: Option<PodDisruptionBudget>,
    /// Ingress isolation of the broker pods, when enabled.
    pub network_policy: Option<NetworkPolicy>,
    /// Prometheus ServiceMonitor, when asked for and its CRD exists.
    pub service_monitor: Option<DynamicObject>,
    /// Prometheus alerting rules, when asked for and their CRD exists.
    pub prometheus_rule: Option<DynamicObject>,
    /// cert-manager Certificate, when tls.mode is broker with an issuerRef.
    pub certificate: Option<DynamicObject>,
}

/// Builds every desired object from a validated cluster.
pub fn desired(cluster: &MqttCluster, valid: &Validated, inputs: &BuildInputs) -> Desired {
    let names = Names::of(cluster);
    let rendered = config::render(valid);
    Desired {
        config_map: configmap::build(cluster, &names, &rendered),
        service_account: rbac::service_account(cluster, &names),
        role: rbac::role(cluster, &names),
        role_binding: rbac::role_binding(cluster, &names),
        headless_service: service::headless(cluster, &names),
        client_service: service::client(cluster, &names),
        extra_services: service::extra(cluster, &names),
        statefulset: statefulset::build(cluster, &names, &rendered, inputs.statefulset_replicas),
        pdb: pdb::build(cluster, &names),
        network_policy: networkpolicy::build(cluster, &names, &inputs.operator_namespace),
        service_monitor: servicemonitor::build(cluster, &names, inputs.service_monitor_crd),
        prometheus_rule: prometheusrule::build(cluster, &names, inputs.prometheus_rule_crd),
        certificate: certificate::build(cluster, &names),
    }
}

#[cfg(test)]
mod tests;
