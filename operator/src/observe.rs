//! The read edge: the StatefulSet, the broker pods, what the brokers say about evacuation and
//! membership, and whether optional CRDs exist. Turning a Pod into the planner's `PodView` is a
//! pure function, tested here.

use corvid_crds::{MemberStatus, MqttCluster, OperationPhase};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::build::names::{Names, VERSION_LABEL};
use crate::build::servicemonitor;
use crate::error::{Error, Result};
use crate::planner::{Evacuation, PodView};
use crate::podtalk::BrokerAdmin;

/// Label the StatefulSet controller puts on pods with their revision.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// What the read step found.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// The StatefulSet, if it exists.
    pub statefulset: Option<StatefulSet>,
    /// The broker pods, with admin-API facts filled in where asked.
    pub pods: Vec<PodView>,
    /// Members as a healthy broker reports them.
    pub members: Vec<MemberStatus>,
    /// Whether the ServiceMonitor CRD is installed (only looked up when asked for).
    pub service_monitor_crd: bool,
}

/// The planner's view of one pod (admin-API facts left empty).
pub fn pod_view(pod: &Pod) -> PodView {
    let name = pod.name_any();
    let ordinal = name
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    PodView {
        ordinal,
        revision: pod.labels().get(REVISION_LABEL).cloned(),
        ready,
        joined: None,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        evacuation: None,
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        version: pod.labels().get(VERSION_LABEL).cloned(),
        name,
    }
}

/// Maps the broker's evacuation state string.
pub fn evacuation_state(state: &str) -> Option<Evacuation> {
    match state {
        "idle" => Some(Evacuation::Idle),
        "running" => Some(Evacuation::Running),
        "done" => Some(Evacuation::Done),
        _ => None,
    }
}

/// Reads everything the planner and status need.
pub async fn observe(
    client: &Client,
    admin: &dyn BrokerAdmin,
    cluster: &MqttCluster,
    names: &Names,
) -> Result<Observation> {
    let ns = names.namespace.as_str();
    let read = |what: &str| {
        let what = what.to_string();
        move |source| Error::Read { what, source }
    };
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(&names.statefulset())
        .await
        .map_err(read("StatefulSet"))?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&names.selector_string()))
        .await
        .map_err(read("pods"))?;
    let mut views: Vec<PodView> = pods
        .items
        .iter()
        .map(pod_view)
        .filter(|p| p.ordinal >= 0)
        .collect();
    views.sort_by_key(|p| p.ordinal);

    // Evacuation progress matters for the pod of the recorded step and for pods a scale-down removes.
    let recorded = cluster.status.as_ref().and_then(|s| s.operation.as_ref());
    for view in views.iter_mut() {
        let in_step = recorded
            .is_some_and(|op| op.pod == view.name && op.phase != OperationPhase::WaitingReady);
        let leaving = view.ordinal >= cluster.spec.replicas && view.ready;
        if in_step || leaving {
            match admin.evacuation(ns, &view.name).await {
                Ok(report) => view.evacuation = evacuation_state(&report.state),
                Err(e) => {
                    tracing::debug!(pod = %view.name, error = %e, "evacuation state unavailable")
                }
            }
        }
    }

    // Membership, as the first ready broker sees it.
    let mut members = Vec::new();
    if let Some(asked) = views
        .iter()
        .find(|p| p.ready && !p.terminating)
        .map(|p| p.name.clone())
    {
        match admin.cluster(ns, &asked).await {
            Ok(view) => {
                for pod in views.iter_mut() {
                    pod.joined = Some(view.joined(&pod.name));
                }
                members = view
                    .members
                    .into_iter()
                    .map(|m| MemberStatus {
                        name: m.name,
                        state: m.state,
                        routes: m.routes,
                    })
                    .collect();
            }
            Err(e) => tracing::debug!(pod = %asked, error = %e, "cluster view unavailable"),
        }
    }

    let service_monitor_crd = if cluster.spec.monitoring.service_monitor.enabled {
        match Api::<CustomResourceDefinition>::all(client.clone())
            .get_opt(servicemonitor::CRD_NAME)
            .await
        {
            Ok(found) => found.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check for the ServiceMonitor CRD; skipping the ServiceMonitor");
                false
            }
        }
    } else {
        false
    };
    Ok(Observation {
        statefulset,
        pods: views,
        members,
        service_monitor_crd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_view_reads_ordinal_revision_readiness_and_version() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-12", "labels": {"controller-revision-hash": "demo-abc", "app.kubernetes.io/version": "1.0"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        let v = pod_view(&pod);
        assert_eq!(
            (v.ordinal, v.revision.as_deref(), v.ready, v.terminating),
            (12, Some("demo-abc"), true, false)
        );
        assert_eq!(v.version.as_deref(), Some("1.0"));
        let unready: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-0", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}
        }))
        .expect("pod");
        let v = pod_view(&unready);
        assert!(!v.ready && v.terminating);
    }

    #[test]
    fn evacuation_states() {
        assert_eq!(evacuation_state("running"), Some(Evacuation::Running));
        assert_eq!(evacuation_state("done"), Some(Evacuation::Done));
        assert_eq!(evacuation_state("weird"), None);
    }
}
