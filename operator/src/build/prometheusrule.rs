//! Prometheus Operator PrometheusRule with the alerts docs/monitoring.md describes, so that alerts
//! ship with the cluster instead of living in prose. Built like the ServiceMonitor: only when
//! asked for and when its CRD is installed (otherwise the apply would fail forever). Every
//! expression is scoped to this cluster's pods, and may only use metric names listed in
//! docs/broker-metrics.txt, which a broker test checks against what the broker registers.

use corvid_crds::MqttCluster;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{json, Value};

use super::names::{owned_meta, Names};

/// Name of the PrometheusRule CRD, looked up before building.
pub const CRD_NAME: &str = "prometheusrules.monitoring.coreos.com";

/// API resource of PrometheusRules.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule"),
        "prometheusrules",
    )
}

/// One alerting rule, before it becomes YAML.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    /// Alert name (CamelCase, `Corvid…`).
    pub name: &'static str,
    /// PromQL expression; fires while it returns series.
    pub expr: String,
    /// How long the expression must hold before the alert fires (None: at once).
    pub for_: Option<&'static str>,
    /// `warning` or `critical`.
    pub severity: &'static str,
    /// One line for the notification.
    pub summary: &'static str,
}

/// The alerts for one cluster. `sel` matches the cluster's pods: the namespace and the
/// StatefulSet's pod names, labels every ServiceMonitor-based scrape adds.
pub fn alerts(cluster: &MqttCluster, names: &Names) -> Vec<Alert> {
    let sel = format!(
        "namespace=\"{}\", pod=~\"{}-[0-9]+\"",
        names.namespace,
        names.statefulset()
    );
    let max_connections = cluster.spec.limits.max_connections;
    let alert = |name, expr: String, for_, severity, summary| Alert {
        name,
        expr,
        for_,
        severity,
        summary,
    };
    let mut out = vec![
        alert(
            "CorvidMemberMissing",
            format!(
                "min(corvid_cluster_members{{state=\"ready\", {sel}}}) < count(corvid_connections{{{sel}}})"
            ),
            Some("5m"),
            "critical",
            "A broker pod sees fewer ready cluster members than there are broker pods.",
        ),
        alert(
            "CorvidMemberStuckJoining",
            format!("max(corvid_cluster_members{{state=\"joining\", {sel}}}) > 0"),
            Some("10m"),
            "warning",
            "A cluster member has been joining for 10 minutes.",
        ),
        alert(
            "CorvidMessagesDropped",
            format!("sum by (reason) (rate(corvid_messages_dropped_total{{{sel}}}[5m])) > 0"),
            Some("10m"),
            "warning",
            "Messages are dropped: subscribers cannot keep up, or sit offline with full queues.",
        ),
        alert(
            "CorvidConnectionsRefused",
            format!(
                "sum by (reason) (rate(corvid_connections_refused_total{{{sel}}}[5m])) > 1"
            ),
            Some("10m"),
            "warning",
            "More than one connection per second is refused.",
        ),
        alert(
            "CorvidNearConnectionLimit",
            // The real limit of this cluster (spec.limits.maxConnections), not a guess.
            format!("max by (pod) (corvid_connections{{{sel}}}) > 0.9 * {max_connections}"),
            Some("10m"),
            "warning",
            "A broker pod holds more than 90% of spec.limits.maxConnections.",
        ),
        alert(
            "CorvidFileDescriptorsLow",
            format!("max by (pod) (process_open_fds{{{sel}}} / process_max_fds{{{sel}}}) > 0.8"),
            Some("10m"),
            "warning",
            "A broker pod uses more than 80% of its file descriptors.",
        ),
        alert(
            "CorvidClusterLinkDrops",
            format!("sum by (pod) (rate(corvid_cluster_link_drops_total{{{sel}}}[5m])) > 0"),
            Some("5m"),
            "warning",
            "A peer is too slow or the cluster mesh is saturated: frames are dropped.",
        ),
        alert(
            "CorvidWrongClusterSecret",
            format!(
                "sum by (pod) (increase(corvid_cluster_refused_peers_total{{reason=\"handshake\", {sel}}}[10m])) > 0"
            ),
            None,
            "critical",
            "A peer failed the cluster handshake: a wrong cluster secret or a replay.",
        ),
        alert(
            "CorvidHeldMessagesDropped",
            format!(
                "sum by (pod) (increase(corvid_cluster_held_dropped_total{{{sel}}}[10m])) > 0"
            ),
            None,
            "critical",
            "Acknowledged QoS 1/2 messages held for a peer were dropped (node_failure bound or hold reached, or a peer without durable sessions failed): its subscribers lose them.",
        ),
        alert(
            "CorvidHeldMessagesPilingUp",
            format!("max by (pod) (corvid_cluster_held_messages{{{sel}}}) > 10000"),
            Some("5m"),
            "warning",
            "More than 10,000 messages have waited 5 minutes for a peer's acknowledgement: it is down (held for until it is back) or its link is too slow.",
        ),
    ];
    if cluster.spec.persistence.mode == corvid_crds::PersistenceMode::Pvc {
        out.push(alert(
            "CorvidStoreFailed",
            format!("max by (pod) (corvid_store_failed{{{sel}}}) > 0"),
            None,
            "critical",
            "A broker's durable store failed (disk full or I/O error): it acknowledges no QoS 1/2 message until restarted.",
        ));
        out.push(alert(
            "CorvidStoreSlowCommits",
            format!(
                "max by (pod) (rate(corvid_store_commit_microseconds_total{{{sel}}}[5m]) / rate(corvid_store_commits_total{{{sel}}}[5m])) > 50000"
            ),
            Some("10m"),
            "warning",
            "Durable-store commits take over 50 ms on average: every QoS 1/2 acknowledgement waits that long.",
        ));
        out.push(alert(
            "CorvidOwnerWaitExpired",
            format!(
                "sum by (pod) (increase(corvid_cluster_owner_waits_total{{result=\"expired\", {sel}}}[10m])) > 0"
            ),
            None,
            "warning",
            "Clients stopped waiting for a failed pod with durable sessions and started afresh: it stayed away longer than node_failure.owner_wait.",
        ));
    }
    let bridges = &cluster.spec.bridges;
    if !bridges.mqtt.is_empty() || !bridges.kafka.is_empty() {
        out.push(alert(
            "CorvidBridgeDown",
            format!("max by (pod, bridge) (1 - corvid_bridge_up{{{sel}}}) > 0"),
            Some("5m"),
            "warning",
            "A bridge's remote is unreachable, refusing it, or missing a Kafka topic.",
        ));
        out.push(alert(
            "CorvidBridgeDropping",
            format!("sum by (bridge) (rate(corvid_bridge_dropped_total{{{sel}}}[5m])) > 0"),
            Some("5m"),
            "warning",
            "A bridge drops messages: its remote was away longer than the buffer lasts.",
        ));
    }
    out
}

fn rule(alert: &Alert, names: &Names) -> Value {
    let mut r = json!({
        "alert": alert.name,
        "expr": alert.expr,
        "labels": {
            "severity": alert.severity,
            "mqttcluster": names.cluster,
        },
        "annotations": {
            "summary": alert.summary,
            "description": format!(
                "MqttCluster {}/{}: {}",
                names.namespace, names.cluster, alert.summary
            ),
        },
    });
    if let Some(for_) = alert.for_ {
        r["for"] = json!(for_);
    }
    r
}

/// The PrometheusRule, or None when disabled or its CRD is missing.
pub fn build(cluster: &MqttCluster, names: &Names, crd_installed: bool) -> Option<DynamicObject> {
    let pr = &cluster.spec.monitoring.prometheus_rule;
    if !pr.enabled || !crd_installed {
        return None;
    }
    let mut obj = DynamicObject::new(&names.cluster, &api_resource());
    obj.metadata = owned_meta(cluster, names, names.cluster.clone());
    let mut labels = pr.labels.clone();
    labels.extend(names.labels());
    obj.metadata.labels = Some(labels);
    let rules: Vec<Value> = alerts(cluster, names)
        .iter()
        .map(|a| rule(a, names))
        .collect();
    obj.data = json!({
        "spec": { "groups": [{ "name": format!("corvid-{}", names.cluster), "rules": rules }] }
    });
    Some(obj)
}
