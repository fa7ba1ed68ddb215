//! Every MqttCluster in manifests/examples/ passes the operator's own validation (the server-side
//! dry run in e2e/packaging-check covers the schema and CEL; this covers what only the operator
//! checks, such as spec.podTemplate's protected fields and spec.config).

use corvid_crds::MqttCluster;
use corvid_operator::validate::validate;
use serde::Deserialize;

#[test]
fn every_example_is_accepted_by_the_operator() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("manifests/examples") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("yaml");
            if value["kind"].as_str() != Some("MqttCluster") {
                continue;
            }
            let mut cluster: MqttCluster =
                serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cluster.metadata.namespace = Some("examples".to_string());
            if let Err(e) = validate(&cluster) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} examples found");
}
