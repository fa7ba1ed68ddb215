//! The StatefulSet and its pod template.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume, VolumeMount, VolumeProjection};
use serde_json::json;

use super::build;

fn pod(sts: &StatefulSet) -> &PodSpec {
    sts.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn broker(sts: &StatefulSet) -> &Container {
    &pod(sts).containers[0]
}

/// The entry called `name` of an optional list (volumes, mounts); `name_of` reads its name.
fn named<'a, T>(items: &'a Option<Vec<T>>, name: &str, name_of: fn(&T) -> &str) -> &'a T {
    items
        .iter()
        .flatten()
        .find(|i| name_of(i) == name)
        .unwrap_or_else(|| panic!("no entry called {name}"))
}

/// The pod volume called `name`.
fn volume<'a>(sts: &'a StatefulSet, name: &str) -> &'a Volume {
    named(&pod(sts).volumes, name, |v| &v.name)
}

/// Whether the pod has no volume called `name`.
fn has_no_volume(sts: &StatefulSet, name: &str) -> bool {
    pod(sts).volumes.iter().flatten().all(|v| v.name != name)
}

/// The broker container's mount of the volume called `name`.
fn mount<'a>(sts: &'a StatefulSet, name: &str) -> &'a VolumeMount {
    named(&broker(sts).volume_mounts, name, |m| &m.name)
}

/// The sources of the projected volume called `name`.
fn projected_sources<'a>(sts: &'a StatefulSet, name: &str) -> &'a [VolumeProjection] {
    volume(sts, name)
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_deref())
        .unwrap_or_else(|| panic!("{name}: projected sources"))
}

/// (Secret, key, path) of every Secret item projected into the volume called `name`.
fn projected_secret_items(sts: &StatefulSet, name: &str) -> Vec<(String, String, String)> {
    projected_sources(sts, name)
        .iter()
        .filter_map(|s| s.secret.as_ref())
        .flat_map(|s| {
            s.items
                .iter()
                .flatten()
                .map(move |i| (s.name.clone(), i.key.clone(), i.path.clone()))
        })
        .collect()
}

fn own(secret: &str, key: &str, path: &str) -> (String, String, String) {
    (secret.to_string(), key.to_string(), path.to_string())
}

#[test]
fn operator_drives_rollouts_and_names_are_stable() {
    let (_, d) = build(json!({"replicas": 5}));
    let spec = d.statefulset.spec.as_ref().expect("spec");
    assert_eq!(d.statefulset.metadata.name.as_deref(), Some("demo"));
    assert_eq!(spec.replicas, Some(5));
    assert_eq!(spec.service_name.as_deref(), Some("demo-headless"));
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|u| u.type_.as_deref()),
        Some("OnDelete")
    );
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert!(spec.volume_claim_templates.is_none());
}

#[test]
fn config_hash_annotation_matches_rendered_config() {
    let (_, a) = build(json!({}));
    let (_, b) = build(json!({"limits": {"maxConnections": 7}}));
    let hash = |d: &crate::build::Desired| {
        d.statefulset
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .expect("annotations")["corvid.dev/config-hash"]
            .clone()
    };
    assert_eq!(hash(&a).len(), 64);
    assert_ne!(hash(&a), hash(&b));
}

#[test]
fn restricted_security_context_by_default() {
    let (_, d) = build(json!({}));
    let psc = pod(&d.statefulset)
        .security_context
        .as_ref()
        .expect("pod security");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    let csc = broker(&d.statefulset)
        .security_context
        .as_ref()
        .expect("container security");
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert_eq!(csc.read_only_root_filesystem, Some(true));
    assert_eq!(
        csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    // A read-only root filesystem needs a writable /tmp.
    let mounts = broker(&d.statefulset)
        .volume_mounts
        .clone()
        .expect("mounts");
    assert!(mounts
        .iter()
        .any(|m| m.mount_path == "/tmp" && m.read_only == Some(false)));
}

#[test]
fn security_context_can_be_overridden() {
    let (_, d) = build(
        json!({"pod": {"securityContext": {"runAsUser": 1234}, "containerSecurityContext": {"privileged": false}}}),
    );
    assert_eq!(
        pod(&d.statefulset)
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user),
        Some(1234)
    );
    assert_eq!(
        broker(&d.statefulset)
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem),
        None
    );
}

#[test]
fn probes_on_admin_port_and_grace_period_from_drain_timeout() {
    let (_, d) = build(json!({"upgradeStrategy": {"drainTimeoutSeconds": 120}}));
    let c = broker(&d.statefulset);
    let ready = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness");
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    assert_eq!(
        ready.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("admin".into())
    );
    let live = c
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("liveness");
    assert_eq!(live.path.as_deref(), Some("/healthz"));
    assert_eq!(
        pod(&d.statefulset).termination_grace_period_seconds,
        Some(135)
    );
    let pre_stop = c
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .expect("preStop");
    assert_eq!(pre_stop.sleep.as_ref().map(|s| s.seconds), Some(5));
}

#[test]
fn container_image_args_ports_and_env() {
    let (_, d) = build(json!({"version": "1.2.3", "imagePullPolicy": "Always",
        "pod": {"env": [{"name": "CORVID_LOG__LEVEL", "value": "debug"}]}}));
    let c = broker(&d.statefulset);
    assert_eq!(c.image.as_deref(), Some("corvid/corvid-broker:1.2.3"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        c.args,
        Some(vec![
            "serve".into(),
            "--config".into(),
            "/etc/corvid/corvid.yaml".into()
        ])
    );
    let ports: Vec<(String, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("mqtt".into(), 1883),
            ("ws".into(), 8083),
            ("admin".into(), 18083),
            ("cluster".into(), 4370)
        ]
    );
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        env,
        [
            "POD_NAME",
            "POD_NAMESPACE",
            "POD_IP",
            "POD_UID",
            "CORVID_LOG__LEVEL"
        ]
    );
    let (_, custom) = build(json!({"image": "registry.local/corvid:dev"}));
    assert_eq!(
        broker(&custom.statefulset).image.as_deref(),
        Some("registry.local/corvid:dev")
    );
}

#[test]
fn the_whole_cluster_secret_is_mounted_so_a_rotation_reaches_running_pods() {
    let (_, d) = build(json!({}));
    let v = volume(&d.statefulset, "cluster-secret");
    let secret = v.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("demo-cluster-secret"));
    // `accepted` exists only during a rotation: listing keys would need it always.
    assert!(secret.items.is_none(), "{:?}", secret.items);
    let m = mount(&d.statefulset, "cluster-secret");
    assert_eq!(m.mount_path, "/etc/corvid/cluster");
    assert!(
        m.sub_path.is_none(),
        "subPath mounts never see a rotated secret"
    );
}

#[test]
fn broker_tls_comes_from_a_projected_volume() {
    let (_, d) = build(
        json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}}, "tls": {"mode": "broker", "secretName": "certs"}}),
    );
    let source = projected_sources(&d.statefulset, "tls");
    assert_eq!(
        source[0].secret.as_ref().map(|s| s.name.as_str()),
        Some("certs")
    );
    let m = mount(&d.statefulset, "tls");
    assert_eq!(m.mount_path, "/etc/corvid/tls");
    assert!(
        m.sub_path.is_none(),
        "subPath mounts never see renewed files"
    );
    let (_, issued) = build(
        json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}}, "tls": {"mode": "broker", "issuerRef": {"name": "ca"}}}),
    );
    assert_eq!(
        projected_sources(&issued.statefulset, "tls")[0]
            .secret
            .as_ref()
            .map(|s| s.name.as_str()),
        Some("demo-tls")
    );
    let (_, plain) = build(json!({}));
    assert!(has_no_volume(&plain.statefulset, "tls"));
}

#[test]
fn event_store_passwords_come_from_a_projected_volume() {
    let (_, d) = build(json!({"eventStore": {
        "postgres": {"url": "postgres://corvid@db:5432/corvid", "passwordSecret": {"name": "pg"}},
        "redis": {"url": "redis://cache:6379/0", "passwordSecret": {"name": "rd", "key": "redis-password"}},
    }}));
    assert_eq!(
        projected_secret_items(&d.statefulset, "eventstore"),
        vec![
            own("pg", "password", "postgres-password"),
            own("rd", "redis-password", "redis-password"),
        ]
    );
    let m = mount(&d.statefulset, "eventstore");
    assert_eq!(m.mount_path, "/etc/corvid/eventstore");
    assert!(m.sub_path.is_none(), "rotated passwords must reach the pod");
    // No Secret, no volume.
    let (_, plain) = build(json!({"eventStore": {"redis": {"url": "redis://cache:6379/0"}}}));
    assert!(has_no_volume(&plain.statefulset, "eventstore"));
}

#[test]
fn persistence_adds_a_claim_template() {
    let (_, d) =
        build(json!({"persistence": {"mode": "pvc", "size": "5Gi", "storageClassName": "fast"}}));
    let claims = d
        .statefulset
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.clone())
        .expect("claims");
    let spec = claims[0].spec.as_ref().expect("claim spec");
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        spec.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests")["storage"]
            .0,
        "5Gi"
    );
    let mounts = broker(&d.statefulset)
        .volume_mounts
        .clone()
        .expect("mounts");
    assert!(mounts
        .iter()
        .any(|m| m.name == "data" && m.mount_path == "/var/lib/corvid"));
}

#[test]
fn spreads_across_nodes_and_zones_unless_told_otherwise() {
    let (_, d) = build(json!({}));
    let tsc = pod(&d.statefulset)
        .topology_spread_constraints
        .clone()
        .expect("spread");
    let keys: Vec<&str> = tsc.iter().map(|t| t.topology_key.as_str()).collect();
    assert_eq!(
        keys,
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    );
    assert!(tsc
        .iter()
        .all(|t| t.when_unsatisfiable == "ScheduleAnyway" && t.max_skew == 1));
    let (_, off) = build(json!({"pod": {"topologySpreadConstraints": []}}));
    assert_eq!(
        pod(&off.statefulset).topology_spread_constraints,
        Some(vec![])
    );
}

#[test]
fn pod_knobs_are_copied() {
    let (_, d) = build(json!({"pod": {
        "nodeSelector": {"pool": "mqtt"}, "priorityClassName": "high",
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "annotations": {"a": "1"}, "labels": {"team": "iot", "app.kubernetes.io/instance": "spoof"},
    }, "imagePullSecrets": [{"name": "regcred"}]}));
    let p = pod(&d.statefulset);
    assert_eq!(p.node_selector.clone().expect("ns")["pool"], "mqtt");
    assert_eq!(p.priority_class_name.as_deref(), Some("high"));
    assert_eq!(
        p.tolerations.clone().expect("tol")[0].key.as_deref(),
        Some("dedicated")
    );
    assert_eq!(p.service_account_name.as_deref(), Some("demo-broker"));
    assert_eq!(
        p.image_pull_secrets.clone().expect("ips")[0].name,
        "regcred"
    );
    let meta = d
        .statefulset
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.clone())
        .expect("meta");
    let labels = meta.labels.expect("labels");
    assert_eq!(labels["team"], "iot");
    assert_eq!(
        labels["app.kubernetes.io/instance"], "demo",
        "operator labels win: the selector must match"
    );
    assert_eq!(meta.annotations.expect("annotations")["a"], "1");
}

#[test]
fn bridge_secrets_are_projected_per_bridge() {
    let (_, d) = build(json!({"bridges": {"mqtt": [{
        "name": "hub",
        "remote": {
            "host": "h", "username": "u",
            "passwordSecret": {"name": "creds", "key": "pw"},
            "tls": {"clientCertSecret": "device"},
        },
        "egress": [{"localFilter": "a/#"}],
    }]}}));
    assert_eq!(
        projected_secret_items(&d.statefulset, "bridges"),
        vec![
            own("creds", "pw", "hub/password"),
            own("device", "tls.crt", "hub/tls.crt"),
            own("device", "tls.key", "hub/tls.key"),
        ]
    );
    assert_eq!(
        mount(&d.statefulset, "bridges").mount_path,
        "/etc/corvid/bridges"
    );
    let (_, plain) = build(json!({}));
    assert!(has_no_volume(&plain.statefulset, "bridges"));
}

#[test]
fn the_admin_token_secret_is_mounted_where_the_config_and_ctl_look() {
    use crate::build::config::{ADMIN_TOKEN_DIR, ADMIN_TOKEN_KEY};
    let (c, d) = build(json!({}));
    let names = crate::build::Names::of(&c);
    let secret = volume(&d.statefulset, "admin-token")
        .secret
        .as_ref()
        .expect("from a Secret");
    assert_eq!(
        secret.secret_name.as_deref(),
        Some(names.admin_token_secret().as_str())
    );
    let mount = mount(&d.statefulset, "admin-token");
    assert_eq!(mount.mount_path, ADMIN_TOKEN_DIR);
    assert_eq!(mount.read_only, Some(true));
    let config: serde_json::Value =
        serde_yaml::from_str(&d.config_map.data.as_ref().expect("data")["corvid.yaml"])
            .expect("config yaml");
    assert_eq!(
        config["admin"]["token_file"],
        json!(format!("{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"))
    );
}

#[test]
fn a_pod_name_leads_back_to_its_cluster() {
    let n = crate::build::Names::of_pod("mqtt", "demo-2").expect("pod of demo");
    assert_eq!((n.cluster.as_str(), n.namespace.as_str()), ("demo", "mqtt"));
    assert_eq!(n.admin_token_secret(), "demo-admin-token");
    let n = crate::build::Names::of_pod("mqtt", "my-iot-10").expect("dashes in the name");
    assert_eq!(n.cluster, "my-iot");
    assert!(crate::build::Names::of_pod("mqtt", "demo").is_none());
    assert!(crate::build::Names::of_pod("mqtt", "demo-x").is_none());
    assert!(crate::build::Names::of_pod("mqtt", "-1").is_none());
}

/// (whenDeleted, whenScaled) of the StatefulSet's claim retention policy, if any.
fn retention(sts: &StatefulSet) -> Option<(String, String)> {
    sts.spec
        .as_ref()
        .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref())
        .map(|p| {
            (
                p.when_deleted.clone().unwrap_or_default(),
                p.when_scaled.clone().unwrap_or_default(),
            )
        })
}

fn pair(deleted: &str, scaled: &str) -> Option<(String, String)> {
    Some((deleted.to_string(), scaled.to_string()))
}

#[test]
fn claims_are_retained_by_default() {
    let (_, d) = build(json!({"persistence": {"mode": "pvc"}}));
    assert_eq!(retention(&d.statefulset), pair("Retain", "Retain"));
}

#[test]
fn explicit_retention_maps_onto_the_statefulset() {
    let (_, d) = build(json!({"persistence": {"mode": "pvc",
        "retention": {"whenDeleted": "Delete", "whenScaled": "Delete"}}}));
    assert_eq!(retention(&d.statefulset), pair("Delete", "Delete"));
    let (_, mixed) = build(json!({"persistence": {"mode": "pvc",
        "retention": {"whenDeleted": "Delete"}}}));
    assert_eq!(retention(&mixed.statefulset), pair("Delete", "Retain"));
}

#[test]
fn no_retention_policy_without_claims() {
    let (_, d) = build(json!({"persistence": {"retention": {"whenDeleted": "Delete"}}}));
    assert_eq!(retention(&d.statefulset), None);
    assert!(d
        .statefulset
        .spec
        .as_ref()
        .is_some_and(|s| s.volume_claim_templates.is_none()));
}

#[test]
fn retention_leaves_the_pod_template_and_config_hash_alone() {
    // The pod revision (controller-revision-hash) is derived from the template only, and the
    // operator's own rollout trigger is the config hash inside it: neither may move.
    let (_, kept) = build(json!({"persistence": {"mode": "pvc"}}));
    let (_, deleted) = build(json!({"persistence": {"mode": "pvc",
        "retention": {"whenDeleted": "Delete", "whenScaled": "Delete"}}}));
    let template = |d: &super::Desired| d.statefulset.spec.as_ref().map(|s| s.template.clone());
    assert_eq!(template(&kept), template(&deleted));
    assert_eq!(kept.config_map, deleted.config_map);
    assert_ne!(
        retention(&kept.statefulset),
        retention(&deleted.statefulset)
    );
}
