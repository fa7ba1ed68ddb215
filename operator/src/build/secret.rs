//! The generated Secrets: the cluster Secret (a random shared key the members use to
//! authenticate each other) and the admin token Secret (the bearer token of the brokers' admin
//! API). Both are created once (the apply step only creates them when missing) and never
//! rewritten, so no spec change can rotate them by accident and split the cluster.

use std::collections::BTreeMap;

use corvid_crds::MqttCluster;
use k8s_openapi::api::core::v1::Secret;

use super::config::{ADMIN_TOKEN_KEY, CLUSTER_SECRET_KEY};
use super::names::{owned_meta, Names};

/// Secret holding `key_material` (random bytes chosen by the caller) as hex text.
pub fn build(cluster: &MqttCluster, names: &Names, key_material: &[u8]) -> Secret {
    hex_secret(
        cluster,
        names,
        names.cluster_secret(),
        CLUSTER_SECRET_KEY,
        key_material,
    )
}

/// Admin token Secret holding `token_material` (random bytes chosen by the caller) as hex text.
pub fn admin_token(cluster: &MqttCluster, names: &Names, token_material: &[u8]) -> Secret {
    hex_secret(
        cluster,
        names,
        names.admin_token_secret(),
        ADMIN_TOKEN_KEY,
        token_material,
    )
}

fn hex_secret(
    cluster: &MqttCluster,
    names: &Names,
    name: String,
    key: &str,
    material: &[u8],
) -> Secret {
    let value: String = material.iter().map(|b| format!("{b:02x}")).collect();
    Secret {
        metadata: owned_meta(cluster, names, name),
        type_: Some("Opaque".to_string()),
        string_data: Some(BTreeMap::from([(key.to_string(), value)])),
        ..Secret::default()
    }
}
