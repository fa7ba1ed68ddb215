//! The broker StatefulSet. The operator drives rollouts itself (updateStrategy OnDelete), so the
//! StatefulSet only records the desired pod template; a hash of the rendered configuration in the
//! template makes configuration changes roll the pods, while TLS files come from a projected volume
//! so certificate renewals do not. `spec.podTemplate` is merged over the built pod last.

use std::collections::BTreeMap;

use corvid_crds::{ListenerKind, MqttCluster, PersistenceMode, TlsMode, ADMIN_PORT, CLUSTER_PORT};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ProjectedVolumeSource, SeccompProfile, SecretProjection, SecretVolumeSource,
    SecurityContext, SleepAction, TopologySpreadConstraint, Volume, VolumeMount, VolumeProjection,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{
    broker_serves, Rendered, ADMIN_TOKEN_DIR, ADMIN_TOKEN_KEY, AUTH_DIR, BRIDGES_DIR,
    CLUSTER_SECRET_DIR, CONFIG_KEY, CONFIG_PATH, DATA_DIR, TLS_DIR,
};
use super::names::{owned_meta, Names, CONFIG_HASH_ANNOTATION, VERSION_LABEL};

/// Name of the broker container (spec.podTemplate merges the entry of this name into it).
pub const CONTAINER: &str = corvid_crds::BROKER_CONTAINER;
/// Seconds the pod stays in the endpoints after deletion starts, before SIGTERM: lets load
/// balancers stop sending new connections first.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Margin on top of the drain timeout before the kubelet kills the broker: the grace period is
/// bounded, so a pod can never hang in Terminating.
pub const GRACE_MARGIN_SECONDS: i64 = 10;
/// User and group the broker runs as under the default security context.
pub const BROKER_UID: i64 = 10001;

/// The StatefulSet with `replicas` pods (chosen by the planner).
pub fn build(
    cluster: &MqttCluster,
    names: &Names,
    rendered: &Rendered,
    replicas: i32,
) -> StatefulSet {
    let spec = &cluster.spec;
    StatefulSet {
        metadata: owned_meta(cluster, names, names.statefulset()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.headless_service()),
            selector: LabelSelector {
                match_labels: Some(names.selector()),
                ..LabelSelector::default()
            },
            // Pods start in parallel; ordering is the operator's job during rollouts.
            pod_management_policy: Some("Parallel".to_string()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_string()),
                rolling_update: None,
            }),
            template: pod_template(cluster, names, rendered),
            volume_claim_templates: (spec.persistence.mode == PersistenceMode::Pvc)
                .then(|| vec![data_claim(cluster)]),
            // Outside the pod template: changing it neither changes the revision nor rolls pods.
            persistent_volume_claim_retention_policy: (spec.persistence.mode
                == PersistenceMode::Pvc)
                .then(|| retention_policy(cluster)),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The claim retention policy from spec.persistence.retention (applied by the StatefulSet
/// controller; whenDeleted relies on the StatefulSet's owner reference to the cluster).
fn retention_policy(cluster: &MqttCluster) -> StatefulSetPersistentVolumeClaimRetentionPolicy {
    let r = cluster.spec.persistence.retention;
    StatefulSetPersistentVolumeClaimRetentionPolicy {
        when_deleted: Some(r.when_deleted.as_str().to_string()),
        when_scaled: Some(r.when_scaled.as_str().to_string()),
    }
}

fn data_claim(cluster: &MqttCluster) -> PersistentVolumeClaim {
    let p = &cluster.spec.persistence;
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_string()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: p.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(p.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Pod template: metadata (labels, config hash), placement, security, volumes, broker container.
pub fn pod_template(cluster: &MqttCluster, names: &Names, rendered: &Rendered) -> PodTemplateSpec {
    let spec = &cluster.spec;
    let pod = &spec.pod;
    let extra = &spec.pod_template.metadata;
    let mut labels = pod.labels.clone();
    labels.extend(extra.labels.clone());
    // The operator's labels last: they select the pods.
    labels.extend(names.labels());
    // Lets status report the version each pod runs; not part of the selector.
    labels.insert(VERSION_LABEL.to_string(), spec.version.clone());
    let mut annotations = pod.annotations.clone();
    annotations.extend(extra.annotations.clone());
    annotations.insert(CONFIG_HASH_ANNOTATION.to_string(), rendered.hash.clone());
    let grace = i64::from(spec.upgrade_strategy.drain_timeout_seconds)
        + PRE_STOP_SLEEP_SECONDS
        + GRACE_MARGIN_SECONDS;
    let mut pod_spec = PodSpec {
        service_account_name: Some(names.service_account()),
        termination_grace_period_seconds: Some(grace),
        node_selector: (!pod.node_selector.is_empty()).then(|| pod.node_selector.clone()),
        tolerations: (!pod.tolerations.is_empty()).then(|| pod.tolerations.clone()),
        affinity: pod.affinity.clone(),
        topology_spread_constraints: Some(
            pod.topology_spread_constraints
                .clone()
                .unwrap_or_else(|| default_spread(names)),
        ),
        priority_class_name: pod.priority_class_name.clone(),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty())
            .then(|| spec.image_pull_secrets.clone()),
        security_context: Some(
            pod.security_context
                .clone()
                .unwrap_or_else(default_pod_security),
        ),
        containers: vec![container(cluster)],
        volumes: Some(volumes(cluster, names)),
        ..PodSpec::default()
    };
    // spec.podTemplate last: it wins over the typed fields, never over the protected ones.
    super::podtemplate::merge_spec(&mut pod_spec, &spec.pod_template.spec);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec),
    }
}

/// Spread across nodes and zones, preferring but not requiring balance (small clusters still schedule).
pub fn default_spread(names: &Names) -> Vec<TopologySpreadConstraint> {
    ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.to_string(),
            when_unsatisfiable: "ScheduleAnyway".to_string(),
            label_selector: Some(LabelSelector {
                match_labels: Some(names.selector()),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        })
        .collect()
}

/// The restricted Pod Security Standard at pod level.
pub fn default_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(BROKER_UID),
        run_as_group: Some(BROKER_UID),
        fs_group: Some(BROKER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// The restricted Pod Security Standard at container level, plus a read-only root filesystem.
pub fn default_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

fn admin_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("admin".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

/// The broker container.
pub fn container(cluster: &MqttCluster) -> Container {
    let spec = &cluster.spec;
    let mut ports: Vec<ContainerPort> = ListenerKind::ALL
        .into_iter()
        .filter(|k| broker_serves(cluster, *k))
        .map(|k| container_port(k.name(), spec.listeners.get(k).port))
        .collect();
    ports.push(container_port("admin", ADMIN_PORT));
    ports.push(container_port("cluster", CLUSTER_PORT));
    let mut env: Vec<EnvVar> = super::podtemplate::OPERATOR_ENV
        .iter()
        .map(|(name, path)| field_env(name, path))
        .collect();
    env.extend(spec.pod.env.iter().cloned());
    Container {
        name: CONTAINER.to_string(),
        image: Some(spec.image_ref()),
        image_pull_policy: Some(spec.image_pull_policy.as_str().to_string()),
        args: Some(vec![
            "serve".to_string(),
            "--config".to_string(),
            CONFIG_PATH.to_string(),
        ]),
        ports: Some(ports),
        env: Some(env),
        resources: spec.resources.clone(),
        // Ready means joined and synced (the broker's /readyz contract): an unjoined pod gets no traffic.
        readiness_probe: Some(admin_probe("/readyz", 5, 3)),
        liveness_probe: Some(admin_probe("/healthz", 10, 6)),
        startup_probe: Some(admin_probe("/healthz", 2, 60)),
        lifecycle: Some(Lifecycle {
            // Sleep first so endpoints drop the pod; SIGTERM then makes the broker evacuate within
            // shutdown.drain_timeout, all inside terminationGracePeriodSeconds.
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(
            spec.pod
                .container_security_context
                .clone()
                .unwrap_or_else(default_container_security),
        ),
        volume_mounts: Some(mounts(cluster)),
        ..Container::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn mounts(cluster: &MqttCluster) -> Vec<VolumeMount> {
    let spec = &cluster.spec;
    let mut m = vec![
        VolumeMount {
            sub_path: Some(CONFIG_KEY.to_string()),
            ..mount("config", CONFIG_PATH)
        },
        mount("cluster-secret", CLUSTER_SECRET_DIR),
        mount("admin-token", ADMIN_TOKEN_DIR),
        VolumeMount {
            read_only: Some(false),
            ..mount("tmp", "/tmp")
        },
    ];
    if spec.tls.mode == TlsMode::Broker {
        m.push(mount("tls", TLS_DIR));
    }
    if !eventstore_secrets(cluster).is_empty() {
        m.push(mount("eventstore", super::config::EVENTSTORE_DIR));
    }
    if spec.auth.users_secret.is_some() {
        m.push(mount("users", AUTH_DIR));
    }
    if !bridge_projections(cluster).is_empty() {
        m.push(mount("bridges", BRIDGES_DIR));
    }
    if spec.persistence.mode == PersistenceMode::Pvc {
        m.push(VolumeMount {
            read_only: Some(false),
            ..mount("data", DATA_DIR)
        });
    }
    m
}

/// The event-store password Secrets, with the file name each is projected to.
fn eventstore_secrets(
    cluster: &MqttCluster,
) -> Vec<(&'static str, &corvid_crds::PasswordSecretRef)> {
    let Some(es) = &cluster.spec.event_store else {
        return Vec::new();
    };
    let pg = es
        .postgres
        .as_ref()
        .and_then(|p| p.password_secret.as_ref())
        .map(|s| ("postgres-password", s));
    let redis = es
        .redis
        .as_ref()
        .and_then(|r| r.password_secret.as_ref())
        .map(|s| ("redis-password", s));
    pg.into_iter().chain(redis).collect()
}

/// Name of the Secret the broker's TLS files come from.
pub fn tls_secret_name(cluster: &MqttCluster, names: &Names) -> String {
    cluster
        .spec
        .tls
        .secret_name
        .clone()
        .unwrap_or_else(|| names.tls_secret())
}

/// A volume holding one key of the Secret `secret_name`, as a file named after the key.
fn secret_key_volume(name: &str, secret_name: String, key: &str) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name),
            items: Some(vec![KeyToPath {
                key: key.to_string(),
                path: key.to_string(),
                ..KeyToPath::default()
            }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn volumes(cluster: &MqttCluster, names: &Names) -> Vec<Volume> {
    let spec = &cluster.spec;
    let mut v = vec![
        Volume {
            name: "config".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Every key of the cluster Secret (`secret`, and `accepted` during a rotation): a key
        // listed in `items` would have to exist, and the rotation adds and removes one.
        Volume {
            name: "cluster-secret".to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.cluster_secret()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_key_volume("admin-token", names.admin_token_secret(), ADMIN_TOKEN_KEY),
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(Default::default()),
            ..Volume::default()
        },
    ];
    let es = eventstore_secrets(cluster);
    if !es.is_empty() {
        // Projected (not subPath): a rotated password reaches the pod without a restart, and
        // the broker reads the file again on its next reconnect.
        v.push(Volume {
            name: "eventstore".to_string(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(
                    es.into_iter()
                        .map(|(path, secret)| VolumeProjection {
                            secret: Some(SecretProjection {
                                name: secret.name.clone(),
                                items: Some(vec![KeyToPath {
                                    key: secret.key.clone(),
                                    path: path.to_string(),
                                    ..KeyToPath::default()
                                }]),
                                ..SecretProjection::default()
                            }),
                            ..VolumeProjection::default()
                        })
                        .collect(),
                ),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if spec.tls.mode == TlsMode::Broker {
        // Projected (not subPath) so the kubelet swaps renewed files in place; the broker re-reads them.
        v.push(Volume {
            name: "tls".to_string(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    secret: Some(SecretProjection {
                        name: tls_secret_name(cluster, names),
                        ..SecretProjection::default()
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let bridge_sources = bridge_projections(cluster);
    if !bridge_sources.is_empty() {
        // Projected, so a renewed client certificate or rotated password reaches the files
        // without a pod restart (bridges read them again when they reconnect after a failure).
        v.push(Volume {
            name: "bridges".to_string(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(bridge_sources),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if let Some(users) = &spec.auth.users_secret {
        v.push(Volume {
            name: "users".to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(users.name.clone()),
                items: Some(vec![KeyToPath {
                    key: users.key.clone(),
                    path: "users".to_string(),
                    ..KeyToPath::default()
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    v
}

/// The Secret keys bridges read, projected as `<bridge>/password`, `<bridge>/ca.crt`,
/// `<bridge>/tls.crt` and `<bridge>/tls.key` under the bridges folder.
fn bridge_projections(cluster: &MqttCluster) -> Vec<VolumeProjection> {
    let item = |secret: &str, pairs: &[(&str, String)]| VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.to_string(),
            items: Some(
                pairs
                    .iter()
                    .map(|(key, path)| KeyToPath {
                        key: key.to_string(),
                        path: path.clone(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            ..SecretProjection::default()
        }),
        ..VolumeProjection::default()
    };
    let mut out = Vec::new();
    for b in &cluster.spec.bridges.mqtt {
        let r = &b.remote;
        if let Some(p) = &r.password_secret {
            out.push(item(&p.name, &[(&p.key, format!("{}/password", b.name))]));
        }
        if let Some(t) = &r.tls {
            if let Some(ca) = &t.ca_secret {
                out.push(item(&ca.name, &[(&ca.key, format!("{}/ca.crt", b.name))]));
            }
            if let Some(c) = &t.client_cert_secret {
                out.push(item(
                    c,
                    &[
                        ("tls.crt", format!("{}/tls.crt", b.name)),
                        ("tls.key", format!("{}/tls.key", b.name)),
                    ],
                ));
            }
        }
    }
    out
}
