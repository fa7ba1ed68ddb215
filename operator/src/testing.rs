//! Test fixtures shared by the unit tests: MqttCluster objects built from JSON specs.

use corvid_crds::MqttCluster;
use serde_json::{json, Value};

/// An MqttCluster named `demo` in namespace `mqtt` with a uid (so owner references are set),
/// generation 1 and the given spec (serde defaults fill the rest).
pub fn cluster(spec: Value) -> MqttCluster {
    serde_json::from_value(json!({
        "apiVersion": "corvid.dev/v1alpha1",
        "kind": "MqttCluster",
        "metadata": { "name": "demo", "namespace": "mqtt", "uid": "uid-1", "generation": 1 },
        "spec": spec,
    }))
    .expect("test cluster deserializes")
}
