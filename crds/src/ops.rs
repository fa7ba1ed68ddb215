//! Operational switches: rollout pacing, rebalancing, disruption budget and monitoring.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// How the operator replaces pods, one at a time from the highest ordinal.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStrategy {
    /// Clients per second moved off a pod while it evacuates.
    #[serde(default = "default_evacuation_rate")]
    #[schemars(range(min = 1))]
    pub evacuation_rate: i32,
    /// Longest wait, in seconds, for a pod to drain before it is replaced anyway. Also sizes the
    /// pod's terminationGracePeriodSeconds.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub drain_timeout_seconds: i32,
    /// Longest wait, in seconds, for a replaced pod to become Ready and join before the rollout is
    /// marked Degraded and stops.
    #[serde(default = "default_ready_timeout")]
    #[schemars(range(min = 10))]
    pub ready_timeout_seconds: i32,
    /// Halt the rollout where it is (pods already replaced stay replaced).
    #[serde(default)]
    pub paused: bool,
}

impl Default for UpgradeStrategy {
    fn default() -> Self {
        UpgradeStrategy {
            evacuation_rate: default_evacuation_rate(),
            drain_timeout_seconds: default_drain_timeout(),
            ready_timeout_seconds: default_ready_timeout(),
            paused: false,
        }
    }
}

fn default_evacuation_rate() -> i32 {
    500
}
fn default_drain_timeout() -> i32 {
    60
}
fn default_ready_timeout() -> i32 {
    300
}

/// Moving connections onto pods added by a scale-up.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// Whether brokers shed connections towards new members after a scale-up.
    #[serde(default)]
    pub enabled: bool,
    /// Connections per second moved while rebalancing.
    #[serde(default = "default_rebalance_rate")]
    #[schemars(range(min = 1))]
    pub rate: i32,
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        RebalanceSpec {
            enabled: false,
            rate: default_rebalance_rate(),
        }
    }
}

fn default_rebalance_rate() -> i32 {
    i32::try_from(corvid_config::RebalanceConfig::default().rate).unwrap_or(i32::MAX)
}

/// A scale-up whose old pods have not been asked to rebalance yet: kept in status so that the
/// request survives the reconciles (and an operator restart) until the new pods joined.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingRebalance {
    /// Replicas before the scale-up: the pods below this ordinal hold the connections.
    pub from_replicas: i32,
    /// RFC 3339 time the scale-up started.
    pub since: String,
}

/// The PodDisruptionBudget of the broker pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Whether the operator manages a PodDisruptionBudget.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Pods that may be voluntarily disrupted at once.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        PodDisruptionBudgetSpec {
            enabled: true,
            max_unavailable: 1,
        }
    }
}

fn yes() -> bool {
    true
}
fn one() -> i32 {
    1
}

/// Prometheus Operator integration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// A ServiceMonitor scraping the brokers' /metrics on the admin port.
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
    /// A PrometheusRule with the alerts of docs/monitoring.md, scoped to this cluster's pods.
    #[serde(default)]
    pub prometheus_rule: PrometheusRuleSpec,
}

/// The PrometheusRule; created only when enabled and its CRD (Prometheus Operator) is installed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusRuleSpec {
    /// Whether to create the PrometheusRule. Its alerts select the series by the namespace and
    /// pod labels a ServiceMonitor scrape adds (spec.monitoring.serviceMonitor, or your own
    /// scrape config with the same labels).
    #[serde(default)]
    pub enabled: bool,
    /// Extra labels, for a Prometheus ruleSelector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The ServiceMonitor; created only when enabled and its CRD is installed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Whether to create the ServiceMonitor.
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval (Prometheus duration).
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Extra labels, for a Prometheus serviceMonitorSelector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Default for ServiceMonitorSpec {
    fn default() -> Self {
        ServiceMonitorSpec {
            enabled: false,
            interval: default_interval(),
            labels: BTreeMap::new(),
        }
    }
}

fn default_interval() -> String {
    "30s".to_string()
}
