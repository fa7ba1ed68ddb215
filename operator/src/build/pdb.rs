//! PodDisruptionBudget: node drains take at most `maxUnavailable` brokers at once.

use corvid_crds::MqttCluster;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::names::{owned_meta, Names};

/// The budget, or None when disabled (the apply step then deletes an existing one).
pub fn build(cluster: &MqttCluster, names: &Names) -> Option<PodDisruptionBudget> {
    let spec = &cluster.spec.pod_disruption_budget;
    spec.enabled.then(|| PodDisruptionBudget {
        metadata: owned_meta(cluster, names, names.statefulset()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(spec.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(names.selector()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}
