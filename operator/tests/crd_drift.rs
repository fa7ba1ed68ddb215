//! Fails when the committed CRD YAML no longer matches what `corvid-operator crd` prints.

use std::process::Command;

#[test]
fn committed_crd_matches_generated() {
    let out = Command::new(env!("CARGO_BIN_EXE_corvid-operator"))
        .arg("crd")
        .output()
        .expect("run corvid-operator crd");
    assert!(
        out.status.success(),
        "corvid-operator crd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("utf-8 CRD");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/crds/mqttclusters.corvid.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == committed,
        "manifests/crds/mqttclusters.corvid.dev.yaml is stale; regenerate it with:\n  \
         cargo run -p corvid-operator -- crd --output manifests/crds/mqttclusters.corvid.dev.yaml"
    );
}
