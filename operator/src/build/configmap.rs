//! The ConfigMap carrying `corvid.yaml`.

use std::collections::BTreeMap;

use corvid_crds::MqttCluster;
use k8s_openapi::api::core::v1::ConfigMap;

use super::config::{Rendered, CONFIG_KEY};
use super::names::{owned_meta, Names};

/// ConfigMap with the rendered broker configuration.
pub fn build(cluster: &MqttCluster, names: &Names, rendered: &Rendered) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(cluster, names, names.config_map()),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            rendered.yaml.clone(),
        )])),
        ..ConfigMap::default()
    }
}
