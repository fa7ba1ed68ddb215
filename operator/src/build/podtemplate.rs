//! `spec.podTemplate`: the platform team's partial pod template, merged over the pod the operator
//! builds with strategic-merge habits (containers, volumes, env by name; mounts by path; maps by
//! key; other fields replace). `check` refuses the fields that keep the broker safe, with a
//! message naming the field; `merge` never copies them even when `check` was skipped, so the
//! builder stays safe on its own.

use std::collections::BTreeMap;

use corvid_crds::{PodSpecOverride, PodTemplateOverride, BROKER_CONTAINER};
use k8s_openapi::api::core::v1::{Container, PodSpec, Probe, SecurityContext};

use super::config::{
    ADMIN_TOKEN_DIR, AUTH_DIR, BRIDGES_DIR, CLUSTER_SECRET_DIR, CONFIG_PATH, DATA_DIR,
    EVENTSTORE_DIR, TLS_DIR,
};
use crate::validate::InvalidSpec;

/// Volume names the operator uses (some only with certain specs; all are reserved so that a
/// later spec change cannot collide with a template volume).
pub const OPERATOR_VOLUMES: [&str; 9] = [
    "config",
    "cluster-secret",
    "admin-token",
    "tmp",
    "tls",
    "users",
    "bridges",
    "eventstore",
    "data",
];

/// Paths the operator mounts into the broker container; a template mount there, or above one
/// (which would hide it), is refused.
pub const OPERATOR_MOUNT_PATHS: [&str; 9] = [
    CONFIG_PATH,
    CLUSTER_SECRET_DIR,
    ADMIN_TOKEN_DIR,
    "/tmp",
    TLS_DIR,
    EVENTSTORE_DIR,
    AUTH_DIR,
    BRIDGES_DIR,
    DATA_DIR,
];

/// Environment variables the operator sets from the downward API, with the pod field each
/// comes from: the broker's node name and peer discovery read the first three, and its admin
/// API refuses an evacuation meant for another instance of the pod by the UID.
pub const OPERATOR_ENV: [(&str, &str); 4] = [
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("POD_IP", "status.podIP"),
    ("POD_UID", "metadata.uid"),
];

/// Whether `name` is one of [`OPERATOR_ENV`].
pub fn operator_env(name: &str) -> bool {
    OPERATOR_ENV.iter().any(|(n, _)| *n == name)
}

/// Fields of the broker container a template entry may set; everything else is the operator's.
const BROKER_FIELDS: [&str; 8] = [
    "name",
    "env",
    "envFrom",
    "volumeMounts",
    "resources",
    "readinessProbe",
    "livenessProbe",
    "startupProbe",
];

/// Why a field of the broker container is not the template's, for the refusal message.
fn broker_field_hint(field: &str) -> &'static str {
    match field {
        "command" | "args" => "the operator runs `serve --config` on the file it renders",
        "ports" => "ports follow spec.listeners",
        "image" => "use spec.image or spec.version",
        "imagePullPolicy" => "use spec.imagePullPolicy",
        "securityContext" => {
            "it is the operator's hardening; use spec.pod.containerSecurityContext"
        }
        "lifecycle" => "the preStop hook is part of the drain",
        _ => "only env, envFrom, volumeMounts, resources and probe timing can be merged",
    }
}

fn refuse(message: String) -> Result<(), InvalidSpec> {
    Err(InvalidSpec(message))
}

/// Whether `path` is an operator mount path or a folder above one.
fn shadows_operator_mount(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    OPERATOR_MOUNT_PATHS
        .iter()
        .any(|own| *own == path || path.is_empty() || own.starts_with(&format!("{path}/")))
}

/// Refuses every protected field of a template; each message names the field.
pub fn check(template: &PodTemplateOverride) -> Result<(), InvalidSpec> {
    let spec = &template.spec;
    let field = "podTemplate.spec";
    if spec.security_context.is_some() {
        return refuse(format!(
            "{field}.securityContext is the operator's hardening: use spec.pod.securityContext"
        ));
    }
    if spec.service_account_name.is_some() {
        return refuse(format!(
            "{field}.serviceAccountName is set by the operator (peer discovery needs its Role): \
             annotate it with podTemplate.serviceAccount instead"
        ));
    }
    if spec.termination_grace_period_seconds.is_some() {
        return refuse(format!(
            "{field}.terminationGracePeriodSeconds is sized by the operator from \
             upgradeStrategy.drainTimeoutSeconds"
        ));
    }
    for (list, containers) in [
        ("containers", &spec.containers),
        ("initContainers", &spec.init_containers),
    ] {
        let mut seen = Vec::new();
        for c in containers {
            let at = format!("{field}.{list}[{}]", c.name);
            if seen.contains(&c.name.as_str()) {
                return refuse(format!("{at} is listed twice"));
            }
            seen.push(c.name.as_str());
            if list == "containers" && c.name == BROKER_CONTAINER {
                check_broker(c, &at)?;
            } else if c.image.as_deref().is_none_or(str::is_empty) {
                return refuse(format!(
                    "{at}.image is required (the operator only builds the broker container)"
                ));
            }
        }
    }
    let mut volumes = Vec::new();
    for v in &spec.volumes {
        if OPERATOR_VOLUMES.contains(&v.name.as_str()) {
            return refuse(format!(
                "{field}.volumes[{}]: the name is the operator's (reserved: {})",
                v.name,
                OPERATOR_VOLUMES.join(", ")
            ));
        }
        if volumes.contains(&v.name.as_str()) {
            return refuse(format!("{field}.volumes[{}] is listed twice", v.name));
        }
        volumes.push(v.name.as_str());
    }
    // A mount of a volume nobody declares would only fail later, as an apply error on the
    // StatefulSet; say which entry is wrong instead.
    for (list, containers) in [
        ("containers", &spec.containers),
        ("initContainers", &spec.init_containers),
    ] {
        for c in containers {
            let unknown = c.volume_mounts.iter().flatten().find(|m| {
                !volumes.contains(&m.name.as_str()) && !OPERATOR_VOLUMES.contains(&m.name.as_str())
            });
            if let Some(m) = unknown {
                return refuse(format!(
                    "{field}.{list}[{}].volumeMounts[{}]: no volume of that name; add it to \
                     podTemplate.spec.volumes",
                    c.name, m.name
                ));
            }
        }
    }
    Ok(())
}

/// The broker container entry may only carry the merged fields.
fn check_broker(c: &Container, at: &str) -> Result<(), InvalidSpec> {
    let value = serde_json::to_value(c).map_err(|e| InvalidSpec(format!("{at}: {e}")))?;
    let keys = value
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>());
    for key in keys.unwrap_or_default() {
        if !BROKER_FIELDS.contains(&key.as_str()) {
            return refuse(format!(
                "{at}.{key} is owned by the operator: {}",
                broker_field_hint(&key)
            ));
        }
    }
    for env in c.env.iter().flatten() {
        if operator_env(&env.name) {
            return refuse(format!(
                "{at}.env[{}] is set by the operator from the pod (the broker reads it)",
                env.name
            ));
        }
    }
    for m in c.volume_mounts.iter().flatten() {
        if shadows_operator_mount(&m.mount_path) {
            return refuse(format!(
                "{at}.volumeMounts[{}]: {} is, or would hide, a path the operator mounts",
                m.name, m.mount_path
            ));
        }
    }
    for (name, probe) in [
        ("readinessProbe", &c.readiness_probe),
        ("livenessProbe", &c.liveness_probe),
        ("startupProbe", &c.startup_probe),
    ] {
        let Some(p) = probe else { continue };
        let handler = [
            ("httpGet", p.http_get.is_some()),
            ("tcpSocket", p.tcp_socket.is_some()),
            ("exec", p.exec.is_some()),
            ("grpc", p.grpc.is_some()),
        ]
        .into_iter()
        .find_map(|(h, set)| set.then_some(h));
        if let Some(h) = handler {
            return refuse(format!(
                "{at}.{name}.{h}: only the timing of the broker's probes can be tuned \
                 (readiness means joined and synced)"
            ));
        }
    }
    Ok(())
}

/// The restricted Pod Security Standard for a sidecar or init container that sets no security
/// context of its own (its root filesystem stays writable: it is not the broker).
pub fn sidecar_security() -> SecurityContext {
    SecurityContext {
        read_only_root_filesystem: None,
        ..super::statefulset::default_container_security()
    }
}

/// Merges the template's pod spec fields into `pod` (metadata is merged by the caller, which
/// knows the operator's labels). Protected fields are never copied.
pub fn merge_spec(pod: &mut PodSpec, over: &PodSpecOverride) {
    for c in &over.containers {
        match pod.containers.iter_mut().find(|b| b.name == c.name) {
            Some(broker) if c.name == BROKER_CONTAINER => merge_broker(broker, c),
            Some(existing) => *existing = with_default_security(c),
            None => pod.containers.push(with_default_security(c)),
        }
    }
    if !over.init_containers.is_empty() {
        let init = pod.init_containers.get_or_insert_with(Vec::new);
        for c in &over.init_containers {
            match init.iter_mut().find(|i| i.name == c.name) {
                Some(existing) => *existing = with_default_security(c),
                None => init.push(with_default_security(c)),
            }
        }
    }
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    for v in &over.volumes {
        if OPERATOR_VOLUMES.contains(&v.name.as_str()) {
            continue;
        }
        match volumes.iter_mut().find(|o| o.name == v.name) {
            Some(existing) => *existing = v.clone(),
            None => volumes.push(v.clone()),
        }
    }
    if !over.node_selector.is_empty() {
        pod.node_selector
            .get_or_insert_with(BTreeMap::new)
            .extend(over.node_selector.clone());
    }
    replace(&mut pod.tolerations, &over.tolerations);
    replace(&mut pod.affinity, &over.affinity);
    replace(
        &mut pod.topology_spread_constraints,
        &over.topology_spread_constraints,
    );
    replace(&mut pod.priority_class_name, &over.priority_class_name);
    replace(&mut pod.dns_policy, &over.dns_policy);
    replace(&mut pod.dns_config, &over.dns_config);
    replace(&mut pod.runtime_class_name, &over.runtime_class_name);
    replace(&mut pod.scheduler_name, &over.scheduler_name);
    replace(&mut pod.enable_service_links, &over.enable_service_links);
    if !over.host_aliases.is_empty() {
        pod.host_aliases = Some(over.host_aliases.clone());
    }
    for secret in &over.image_pull_secrets {
        let secrets = pod.image_pull_secrets.get_or_insert_with(Vec::new);
        if !secrets.contains(secret) {
            secrets.push(secret.clone());
        }
    }
}

fn replace<T: Clone>(field: &mut Option<T>, over: &Option<T>) {
    if over.is_some() {
        field.clone_from(over);
    }
}

fn with_default_security(c: &Container) -> Container {
    let mut c = c.clone();
    if c.security_context.is_none() {
        c.security_context = Some(sidecar_security());
    }
    c
}

/// Merges the allowed fields of the template's broker entry into the built broker container.
fn merge_broker(broker: &mut Container, over: &Container) {
    for var in over.env.iter().flatten() {
        if operator_env(&var.name) {
            continue;
        }
        let env = broker.env.get_or_insert_with(Vec::new);
        match env.iter_mut().find(|e| e.name == var.name) {
            Some(existing) => *existing = var.clone(),
            None => env.push(var.clone()),
        }
    }
    if let Some(from) = &over.env_from {
        broker
            .env_from
            .get_or_insert_with(Vec::new)
            .extend(from.iter().cloned());
    }
    for m in over.volume_mounts.iter().flatten() {
        if shadows_operator_mount(&m.mount_path) {
            continue;
        }
        let mounts = broker.volume_mounts.get_or_insert_with(Vec::new);
        match mounts.iter_mut().find(|o| o.mount_path == m.mount_path) {
            Some(existing) => *existing = m.clone(),
            None => mounts.push(m.clone()),
        }
    }
    replace(&mut broker.resources, &over.resources);
    tune(&mut broker.readiness_probe, &over.readiness_probe);
    tune(&mut broker.liveness_probe, &over.liveness_probe);
    tune(&mut broker.startup_probe, &over.startup_probe);
}

/// Copies the timing fields of `over` into the operator's probe; its handler stays.
fn tune(probe: &mut Option<Probe>, over: &Option<Probe>) {
    let (Some(p), Some(o)) = (probe.as_mut(), over.as_ref()) else {
        return;
    };
    replace(&mut p.initial_delay_seconds, &o.initial_delay_seconds);
    replace(&mut p.period_seconds, &o.period_seconds);
    replace(&mut p.timeout_seconds, &o.timeout_seconds);
    replace(&mut p.success_threshold, &o.success_threshold);
    replace(&mut p.failure_threshold, &o.failure_threshold);
    replace(
        &mut p.termination_grace_period_seconds,
        &o.termination_grace_period_seconds,
    );
}
