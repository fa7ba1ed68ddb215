//! Builder tests: spec in, objects out, no API server.

mod config;
mod networkpolicy;
mod objects;
mod podtemplate;
mod prometheusrule;
mod service;
mod services;
mod statefulset;

use corvid_crds::MqttCluster;
use serde_json::Value;

use super::{desired, BuildInputs, Desired};
use crate::testing::cluster;
use crate::validate::validate;

/// Validates and builds everything for a spec, with the StatefulSet at spec.replicas.
fn build(spec: Value) -> (MqttCluster, Desired) {
    let c = cluster(spec);
    let valid = validate(&c).expect("valid spec");
    let inputs = BuildInputs {
        statefulset_replicas: c.spec.replicas,
        service_monitor_crd: true,
        prometheus_rule_crd: true,
        operator_namespace: "corvid-system".to_string(),
    };
    let d = desired(&c, &valid, &inputs);
    (c, d)
}
