//! The cluster Secret: a random shared key the members use to authenticate each other. It is
//! created once (the apply step only creates it when missing) and never rewritten, so no spec
//! change can rotate it by accident and split the cluster.

use std::collections::BTreeMap;

use corvid_crds::MqttCluster;
use k8s_openapi::api::core::v1::Secret;

use super::config::CLUSTER_SECRET_KEY;
use super::names::{owned_meta, Names};

/// Secret holding `key_material` (random bytes chosen by the caller) as hex text.
pub fn build(cluster: &MqttCluster, names: &Names, key_material: &[u8]) -> Secret {
    let value: String = key_material.iter().map(|b| format!("{b:02x}")).collect();
    Secret {
        metadata: owned_meta(cluster, names, names.cluster_secret()),
        type_: Some("Opaque".to_string()),
        string_data: Some(BTreeMap::from([(CLUSTER_SECRET_KEY.to_string(), value)])),
        ..Secret::default()
    }
}
