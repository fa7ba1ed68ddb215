//! Which owned objects the controller watches, so a hand edit or deletion of any of them wakes
//! the reconcile within seconds instead of waiting for the idle requeue.
//!
//! Every watch is label-filtered to the operator's own objects (`managed-by=corvid-operator`) and
//! metadata-only (kube's `owns` uses a metadata watcher), so the cache stays small however many
//! unrelated objects the namespace holds. The optional kinds (cert-manager Certificate,
//! ServiceMonitor, PrometheusRule) are watched only when their API is served when the operator
//! starts: a kind installed later is still corrected, at the next reconcile of its cluster.
//!
//! The generated Secrets are not watched on purpose: they are created once and never rewritten
//! (so there is no drift to correct), and a watch would need `list` and `watch` on Secrets.

use kube::api::ApiResource;
use kube::runtime::watcher;
use kube::Client;

use crate::build::names::{FIELD_MANAGER, MANAGED_BY_LABEL};
use crate::build::{certificate, prometheusrule, servicemonitor};

/// Watch configuration of every owned kind: only objects labelled as managed by this operator.
pub fn owned_config() -> watcher::Config {
    watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}"))
}

/// The optional owned kinds the operator may create, whether or not their API is installed.
pub fn optional_kinds() -> [ApiResource; 3] {
    [
        certificate::api_resource(),
        servicemonitor::api_resource(),
        prometheusrule::api_resource(),
    ]
}

/// Whether `resources` (an API group version's discovery document) serves `kind`'s plural.
pub fn serves(resources: &[String], kind: &ApiResource) -> bool {
    resources.contains(&kind.plural)
}

/// The optional kinds whose API the server serves now, found through discovery (which every
/// authenticated client may read, so this needs no extra RBAC). A kind that cannot be looked up
/// is left unwatched with a log line; it is still applied and corrected on every reconcile.
pub async fn served_optional_kinds(client: &Client) -> Vec<ApiResource> {
    let mut served = Vec::new();
    for kind in optional_kinds() {
        match client.list_api_group_resources(&kind.api_version).await {
            Ok(list) => {
                let names: Vec<String> = list.resources.into_iter().map(|r| r.name).collect();
                if serves(&names, &kind) {
                    tracing::info!(kind = %kind.kind, "watching owned objects of this optional kind");
                    served.push(kind);
                } else {
                    tracing::info!(kind = %kind.kind, "API not served; its objects are not watched");
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                tracing::info!(kind = %kind.kind, "API not installed; its objects are not watched");
            }
            Err(e) => {
                tracing::warn!(kind = %kind.kind, error = %e, "cannot discover this API; its objects are not watched");
            }
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_watches_select_only_the_operators_objects() {
        assert_eq!(
            owned_config().label_selector.as_deref(),
            Some("app.kubernetes.io/managed-by=corvid-operator")
        );
    }

    #[test]
    fn a_kind_is_served_only_when_discovery_lists_its_plural() {
        let rules = prometheusrule::api_resource();
        let listed = vec!["servicemonitors".to_string(), "prometheusrules".to_string()];
        assert!(serves(&listed, &rules));
        assert!(!serves(&listed, &certificate::api_resource()));
        assert!(!serves(&[], &rules));
    }
}
