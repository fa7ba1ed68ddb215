//! The read edge: the StatefulSet, the broker pods, what the brokers say about evacuation and
//! membership, and whether optional CRDs exist. Turning a Pod into the planner's `PodView` (with
//! a one-line account of why it is not running) is a pure function, tested here.
//!
//! Admin calls are bounded (`podtalk::bounded`) and their failures only make facts unknown: a
//! broker that does not answer never fails the read step.

use corvid_crds::{MemberStatus, MqttCluster, OperationPhase};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, LogParams};
use kube::{Client, ResourceExt};

use crate::build::names::{Names, VERSION_LABEL};
use crate::build::statefulset::CONTAINER;
use crate::build::{prometheusrule, servicemonitor};
use crate::error::{Error, Result};
use crate::planner::{Evacuation, PodView};
use crate::podtalk::{bounded, BrokerAdmin, ClusterView, EvacuationState, ADMIN_CALL_TIMEOUT};

/// How many Ready pods are asked for the cluster view before membership is left unknown.
const CLUSTER_VIEW_ATTEMPTS: usize = 3;

/// The longest account of a pod's problem kept (it ends up in a condition message and an Event).
const PROBLEM_MAX_CHARS: usize = 300;

/// Waiting reasons that mean the container will not start without help (as opposed to
/// `ContainerCreating` or `PodInitializing`).
const STUCK_WAITING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Label the StatefulSet controller puts on pods with their revision.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// What the read step found.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// The StatefulSet, if it exists.
    pub statefulset: Option<StatefulSet>,
    /// The broker pods, with admin-API facts filled in where asked.
    pub pods: Vec<PodView>,
    /// Members as a healthy broker reports them.
    pub members: Vec<MemberStatus>,
    /// Whether the ServiceMonitor CRD is installed (only looked up when asked for).
    pub service_monitor_crd: bool,
    /// Whether the PrometheusRule CRD is installed (only looked up when asked for).
    pub prometheus_rule_crd: bool,
}

/// The planner's view of one pod (admin-API facts left empty).
pub fn pod_view(pod: &Pod) -> PodView {
    let name = pod.name_any();
    let ordinal = name
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    // A pod that was Ready for days and restarts a minute ago has been unready for a minute.
    let ready_changed = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    PodView {
        ordinal,
        uid: pod.metadata.uid.clone(),
        revision: pod.labels().get(REVISION_LABEL).cloned(),
        ready,
        joined: None,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        evacuation: None,
        created,
        unready_since: if ready {
            None
        } else {
            ready_changed.or(created)
        },
        version: pod.labels().get(VERSION_LABEL).cloned(),
        problem: if ready { None } else { problem(pod) },
        name,
    }
}

/// Why a pod is not running, in one line, when Kubernetes says so: a container that cannot
/// start (with its image, or its last exit and termination message), or a pod that cannot be
/// scheduled. None while it is merely starting.
pub fn problem(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let containers = status.container_statuses.iter().flatten();
    let init = status.init_container_statuses.iter().flatten();
    let from_containers = init
        .chain(containers)
        .filter(|c| !c.ready)
        .find_map(container_problem);
    let text = from_containers.or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .map(|c| {
                format!(
                    "not scheduled ({}): {}",
                    c.reason.as_deref().unwrap_or("Unschedulable"),
                    c.message.as_deref().unwrap_or_default()
                )
            })
    })?;
    Some(truncate(text.trim()))
}

fn container_problem(c: &ContainerStatus) -> Option<String> {
    let state = c.state.as_ref()?;
    if let Some(waiting) = &state.waiting {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if !STUCK_WAITING_REASONS.contains(&reason) {
            return None;
        }
        let mut text = format!("container {}: {reason}", c.name);
        match reason {
            "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" | "ErrImageNeverPull" => {
                text.push_str(&format!(", image {}", c.image));
            }
            "CrashLoopBackOff" => {
                text.push_str(&format!(" ({} restarts)", c.restart_count));
                if let Some(last) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
                    text.push_str(&format!(
                        ", last exit code {} ({})",
                        last.exit_code,
                        last.reason.as_deref().unwrap_or("no reason given")
                    ));
                    if let Some(line) = last.message.as_deref().and_then(last_line) {
                        text.push_str(&format!(": {line}"));
                    }
                }
            }
            _ => {
                if let Some(message) = waiting.message.as_deref().and_then(last_line) {
                    text.push_str(&format!(": {message}"));
                }
            }
        }
        return Some(text);
    }
    let terminated = state.terminated.as_ref()?;
    let mut text = format!(
        "container {}: exited with code {} ({})",
        c.name,
        terminated.exit_code,
        terminated.reason.as_deref().unwrap_or("no reason given")
    );
    if let Some(line) = terminated.message.as_deref().and_then(last_line) {
        text.push_str(&format!(": {line}"));
    }
    Some(text)
}

/// The last non-empty line of a log or message.
fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rfind(|l| !l.is_empty())
}

/// The last line of a log that says something: a backtrace printed after the error (frames
/// `N: symbol`, `at file:line`) is skipped.
fn last_error_line(log: &str) -> Option<&str> {
    let frame = |l: &str| {
        l.starts_with("at ")
            || l == "Stack backtrace:"
            || l.split_once(": ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    };
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !frame(l))
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(PROBLEM_MAX_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Whether the broker container keeps crashing, so its previous run's log says why.
fn crash_looping(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.name == CONTAINER)
        .any(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                == Some("CrashLoopBackOff")
        })
}

/// The last line the broker container printed before it exited last (`kubectl logs --previous`),
/// bounded like an admin call; None when it cannot be read.
async fn last_log_line(pods: &Api<Pod>, pod: &str) -> Option<String> {
    let params = LogParams {
        container: Some(CONTAINER.to_string()),
        previous: true,
        // Enough to reach past a backtrace (RUST_BACKTRACE) to the error it follows.
        tail_lines: Some(100),
        limit_bytes: Some(64 * 1024),
        ..LogParams::default()
    };
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, pods.logs(pod, &params)).await {
        Ok(Ok(log)) => last_error_line(&log).map(truncate),
        Ok(Err(e)) => {
            tracing::debug!(pod, error = %e, "previous log unavailable");
            None
        }
        Err(_) => {
            tracing::debug!(pod, "previous log did not arrive in time");
            None
        }
    }
}

/// Applies one broker's cluster view to the pods, or — when no broker answered — leaves
/// membership unknown. Pods that were asked and did not answer count as not joined whenever
/// another broker did answer: a broker the operator cannot reach is not one it may rely on.
pub fn apply_cluster_view(
    views: &mut [PodView],
    answer: Option<&ClusterView>,
    silent: &[String],
) -> Vec<MemberStatus> {
    let Some(view) = answer else {
        return Vec::new();
    };
    for pod in views.iter_mut() {
        pod.joined = Some(view.joined(&pod.name) && !silent.contains(&pod.name));
    }
    view.members
        .iter()
        .map(|m| MemberStatus {
            name: m.name.clone(),
            state: m.state.as_str().to_string(),
            routes: i64::try_from(m.routes).unwrap_or(i64::MAX),
        })
        .collect()
}

/// Maps the broker's evacuation state; one this operator does not know is no fact at all.
pub fn evacuation_state(state: EvacuationState) -> Option<Evacuation> {
    match state {
        EvacuationState::Idle => Some(Evacuation::Idle),
        EvacuationState::Running => Some(Evacuation::Running),
        EvacuationState::Done => Some(Evacuation::Done),
        EvacuationState::Unknown => None,
    }
}

/// Reads everything the planner and status need.
pub async fn observe(
    client: &Client,
    admin: &dyn BrokerAdmin,
    cluster: &MqttCluster,
    names: &Names,
) -> Result<Observation> {
    let ns = names.namespace.as_str();
    let read = |what: &str| {
        let what = what.to_string();
        move |source| Error::Read { what, source }
    };
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(&names.statefulset())
        .await
        .map_err(read("StatefulSet"))?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&names.selector_string()))
        .await
        .map_err(read("pods"))?;
    let mut views: Vec<PodView> = pods
        .items
        .iter()
        .map(pod_view)
        .filter(|p| p.ordinal >= 0)
        .collect();
    views.sort_by_key(|p| p.ordinal);

    // Evacuation progress matters for the pod of the recorded step and for pods a scale-down
    // removes. Asked concurrently, each call bounded.
    let recorded = cluster.status.as_ref().and_then(|s| s.operation.as_ref());
    let asked: Vec<usize> = views
        .iter()
        .enumerate()
        .filter(|(_, view)| {
            // Only evacuating steps read it: a pod being replaced or starting is not asked.
            let in_step = recorded.is_some_and(|op| {
                op.pod == view.name
                    && matches!(
                        op.phase,
                        OperationPhase::Evacuating | OperationPhase::ScalingDown
                    )
            });
            let leaving = view.ordinal >= cluster.spec.replicas && view.ready;
            (in_step || leaving) && !view.terminating
        })
        .map(|(i, _)| i)
        .collect();
    let reports = futures::future::join_all(
        asked
            .iter()
            .map(|&i| bounded(&views[i].name, admin.evacuation(ns, &views[i].name))),
    )
    .await;
    for (&i, report) in asked.iter().zip(reports) {
        match report {
            Ok(report) => views[i].evacuation = evacuation_state(report.state),
            Err(e) => {
                tracing::debug!(pod = %views[i].name, error = %e, "evacuation state unavailable")
            }
        }
    }

    // Membership, as the first Ready broker that answers sees it.
    let candidates: Vec<String> = views
        .iter()
        .filter(|p| p.ready && !p.terminating)
        .map(|p| p.name.clone())
        .take(CLUSTER_VIEW_ATTEMPTS)
        .collect();
    let mut silent = Vec::new();
    let mut answer = None;
    for pod in candidates {
        match bounded(&pod, admin.cluster(ns, &pod)).await {
            Ok(view) => {
                answer = Some(view);
                break;
            }
            Err(e) => {
                tracing::info!(pod, error = %e, "broker did not answer for the cluster view; counted as not joined");
                silent.push(pod);
            }
        }
    }
    let members = apply_cluster_view(&mut views, answer.as_ref(), &silent);

    // Why a crash-looping broker exits: the last line of its previous run's log.
    let crashing: Vec<usize> = pods
        .items
        .iter()
        .filter(|p| crash_looping(p))
        .filter_map(|p| views.iter().position(|v| v.name == p.name_any()))
        .collect();
    let pod_api = Api::<Pod>::namespaced(client.clone(), ns);
    let lines = futures::future::join_all(
        crashing
            .iter()
            .map(|&i| last_log_line(&pod_api, &views[i].name)),
    )
    .await;
    for (&i, line) in crashing.iter().zip(lines) {
        if let (Some(line), Some(problem)) = (line, views[i].problem.as_mut()) {
            if !problem.contains(&line) {
                *problem = truncate(&format!("{problem}; last log line: {line}"));
            }
        }
    }

    let monitoring = &cluster.spec.monitoring;
    let service_monitor_crd = monitoring.service_monitor.enabled
        && crd_installed(client, servicemonitor::CRD_NAME, "ServiceMonitor").await;
    let prometheus_rule_crd = monitoring.prometheus_rule.enabled
        && crd_installed(client, prometheusrule::CRD_NAME, "PrometheusRule").await;
    Ok(Observation {
        statefulset,
        pods: views,
        members,
        service_monitor_crd,
        prometheus_rule_crd,
    })
}

/// Whether the CRD `name` is installed; an optional object of `kind` is skipped (with a warning)
/// when that cannot be read, rather than failing the whole reconcile.
async fn crd_installed(client: &Client, name: &str, kind: &str) -> bool {
    match Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt(name)
        .await
    {
        Ok(found) => found.is_some(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check for the {kind} CRD; skipping the {kind}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_view_reads_ordinal_revision_readiness_and_version() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-12", "labels": {"controller-revision-hash": "demo-abc", "app.kubernetes.io/version": "1.0"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        let v = pod_view(&pod);
        assert_eq!(
            (v.ordinal, v.revision.as_deref(), v.ready, v.terminating),
            (12, Some("demo-abc"), true, false)
        );
        assert_eq!(v.version.as_deref(), Some("1.0"));
        let unready: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-0", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}
        }))
        .expect("pod");
        let v = pod_view(&unready);
        assert!(!v.ready && v.terminating);
    }

    #[test]
    fn evacuation_states() {
        let parse = |s: &str| evacuation_state(EvacuationState::from_wire(s));
        assert_eq!(parse("idle"), Some(Evacuation::Idle));
        assert_eq!(parse("running"), Some(Evacuation::Running));
        assert_eq!(parse("done"), Some(Evacuation::Done));
        assert_eq!(parse("weird"), None);
    }

    #[test]
    fn a_crash_looping_pod_says_why() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-2", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:05Z"}],
                "containerStatuses": [{
                    "name": "broker", "image": "corvid/corvid-broker:0.1.0", "imageID": "", "ready": false,
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "loading\nmqtt.max_qos: invalid type\n"}}
                }]
            }
        }))
        .expect("pod");
        let v = pod_view(&pod);
        assert!(!v.ready);
        assert_eq!(
            v.unready_since,
            Some("2026-01-01T00:00:05Z".parse().expect("time"))
        );
        assert_eq!(
            v.problem.as_deref(),
            Some("container broker: CrashLoopBackOff (4 restarts), last exit code 1 (Error): mqtt.max_qos: invalid type")
        );
        assert!(crash_looping(&pod));
    }

    #[test]
    fn an_image_that_cannot_be_pulled_is_named() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-2"},
            "status": {
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{
                    "name": "broker", "image": "corvid/corvid-broker:9.9.9", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
                }]
            }
        }))
        .expect("pod");
        assert_eq!(
            problem(&pod).as_deref(),
            Some("container broker: ImagePullBackOff, image corvid/corvid-broker:9.9.9")
        );
        assert!(!crash_looping(&pod));
    }

    #[test]
    fn a_starting_pod_has_no_problem_and_a_ready_one_is_not_unready() {
        let starting: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-1"},
            "status": {"containerStatuses": [{
                "name": "broker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}
            }]}
        }))
        .expect("pod");
        assert_eq!(problem(&starting), None);
        let unschedulable: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-1"},
            "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                       "message": "0/1 nodes are available: 1 Insufficient memory."}]}
        }))
        .expect("pod");
        assert_eq!(
            problem(&unschedulable).as_deref(),
            Some("not scheduled (Unschedulable): 0/1 nodes are available: 1 Insufficient memory.")
        );
        let ready: Pod = serde_json::from_value(json!({
            "metadata": {"name": "demo-0", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:09Z"}]}
        }))
        .expect("pod");
        let v = pod_view(&ready);
        assert_eq!((v.unready_since, v.problem), (None, None));
    }

    #[test]
    fn long_problems_are_cut() {
        let long = "x".repeat(1000);
        let cut = truncate(&long);
        assert_eq!(cut.chars().count(), PROBLEM_MAX_CHARS + 1);
        assert_eq!(last_line("a\n\n  b  \n\n"), Some("b"));
    }

    #[test]
    fn the_error_line_is_found_above_a_backtrace() {
        let log = "Error: invalid configuration\n\nCaused by:\n    /etc/corvid/corvid.yaml: mqtt.max_qos: invalid type: string \"lots\", expected u8\n\nStack backtrace:\n   0: <E as anyhow::context::ext::StdError>::ext_context\n             at /src/backtrace.rs:10:14\n  20: _start\n";
        assert_eq!(
            last_error_line(log),
            Some(
                "/etc/corvid/corvid.yaml: mqtt.max_qos: invalid type: string \"lots\", expected u8"
            )
        );
        assert_eq!(
            last_error_line("Error: bind 0.0.0.0:1883: address in use\n"),
            Some("Error: bind 0.0.0.0:1883: address in use")
        );
    }
}
