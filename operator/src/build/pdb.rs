//! PodDisruptionBudget: node drains take at most `maxUnavailable` brokers at once.

use corvid_crds::MqttCluster;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use serde_json::Value;

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

/// The budget as the apply sends it: with `minAvailable: null`, so the operator's forced apply
/// also takes back a `minAvailable` someone set by hand. Without it the API server would hold
/// both fields, refuse the PDB ("minAvailable and maxUnavailable cannot be both set") and every
/// reconcile would fail until a person removed the field.
pub fn apply_document(pdb: &PodDisruptionBudget) -> Value {
    let mut doc = serde_json::to_value(pdb).unwrap_or(Value::Null);
    if let Some(spec) = doc.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("minAvailable".to_string(), Value::Null);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::Resource as _;

    #[test]
    fn the_applied_budget_clears_min_available_and_keeps_the_rest() {
        let pdb = PodDisruptionBudget {
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        };
        let doc = apply_document(&pdb);
        assert_eq!(doc["apiVersion"], PodDisruptionBudget::API_VERSION);
        assert_eq!(doc["kind"], "PodDisruptionBudget");
        assert_eq!(doc["spec"]["maxUnavailable"], 1);
        assert!(doc["spec"]
            .as_object()
            .is_some_and(|s| s.get("minAvailable") == Some(&Value::Null)));
    }
}
