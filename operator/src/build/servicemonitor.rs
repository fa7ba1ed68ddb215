//! Prometheus Operator ServiceMonitor scraping `/metrics` on every broker's admin port through
//! the headless Service. Only built when asked for and when its CRD is installed (otherwise the
//! apply would fail forever).

use corvid_crds::MqttCluster;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::names::{owned_meta, Names};

/// Name of the ServiceMonitor CRD, looked up before building.
pub const CRD_NAME: &str = "servicemonitors.monitoring.coreos.com";

/// API resource of ServiceMonitors.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// The ServiceMonitor, or None when disabled or its CRD is missing.
pub fn build(cluster: &MqttCluster, names: &Names, crd_installed: bool) -> Option<DynamicObject> {
    let sm = &cluster.spec.monitoring.service_monitor;
    if !sm.enabled || !crd_installed {
        return None;
    }
    let mut obj = DynamicObject::new(&names.cluster, &api_resource());
    obj.metadata = owned_meta(cluster, names, names.cluster.clone());
    let mut labels = sm.labels.clone();
    labels.extend(names.labels());
    obj.metadata.labels = Some(labels);
    obj.data = json!({
        "spec": {
            "selector": { "matchLabels": names.selector() },
            "endpoints": [{ "port": "admin", "path": "/metrics", "interval": sm.interval }],
        }
    });
    Some(obj)
}
