//! Status computed from what was observed and decided in this reconcile (pure), so the
//! conditions can be unit-tested: Available, Progressing, Degraded and ReconcileSuccess, each
//! always True or False with a reason — never Unknown.

use corvid_crds::{MemberStatus, MqttClusterStatus};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::planner::{Action, Plan, PodView, Wait};

/// Condition types, by contract.
pub const AVAILABLE: &str = "Available";
/// See [`AVAILABLE`].
pub const PROGRESSING: &str = "Progressing";
/// See [`AVAILABLE`].
pub const DEGRADED: &str = "Degraded";
/// See [`AVAILABLE`].
pub const RECONCILE_SUCCESS: &str = "ReconcileSuccess";

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct StatusInputs<'a> {
    /// The generation this status describes: metadata.generation when this reconcile acted on
    /// it (applied its objects, or refused an invalid spec), the previous observedGeneration
    /// otherwise.
    pub generation: Option<i64>,
    /// The status before this reconcile (keeps transition times and the last known version).
    pub previous: Option<&'a MqttClusterStatus>,
    /// spec.replicas.
    pub desired_replicas: i32,
    /// podDisruptionBudget.maxUnavailable: how many missing pods still count as Available.
    pub max_unavailable: i32,
    /// The broker pods.
    pub pods: &'a [PodView],
    /// The StatefulSet's update revision.
    pub update_revision: Option<&'a str>,
    /// spec.version.
    pub target_version: &'a str,
    /// The planner's decision (None when the spec was invalid).
    pub plan: Option<&'a Plan>,
    /// A failure of this reconcile: (reason, message).
    pub error: Option<(&'a str, String)>,
    /// Cluster members as reported by a broker.
    pub members: Vec<MemberStatus>,
    /// Client endpoint.
    pub endpoint: Option<String>,
    /// Pod label selector.
    pub selector: String,
    /// Current time.
    pub now: Timestamp,
}

/// The new status.
pub fn compute(i: &StatusInputs) -> MqttClusterStatus {
    let live: Vec<&PodView> = i.pods.iter().filter(|p| !p.terminating).collect();
    let replicas = count(live.len());
    let ready = count(live.iter().filter(|p| p.healthy()).count());
    let updated = count(
        live.iter()
            .filter(|p| i.update_revision.is_some() && p.revision.as_deref() == i.update_revision)
            .count(),
    );
    let versions: Vec<&str> = live.iter().filter_map(|p| p.version.as_deref()).collect();
    let uniform = versions
        .first()
        .filter(|v| versions.iter().all(|x| x == *v) && versions.len() == live.len());
    let current_version = uniform
        .map(|v| v.to_string())
        .or_else(|| i.previous.and_then(|p| p.current_version.clone()));

    let needed = (i.desired_replicas - i.max_unavailable).max(1);
    let available = ready >= needed;
    let mut conditions = vec![cond(
        i,
        AVAILABLE,
        available,
        if available {
            "ReplicasReady"
        } else {
            "NotEnoughReplicas"
        },
        format!(
            "{ready}/{} pods ready and joined (at least {needed} needed)",
            i.desired_replicas
        ),
    )];
    let (progressing, p_reason, p_message) = progressing(i.plan);
    conditions.push(cond(i, PROGRESSING, progressing, p_reason, p_message));
    let (degraded, d_reason, d_message) = match (i.plan.map(|p| &p.action), &i.error) {
        // Problems that only a spec change or an install fixes.
        (_, Some((reason @ ("InvalidSpec" | "MissingApi"), m))) => (true, *reason, m.clone()),
        (Some(Action::Blocked { reason, .. }), _) => (true, "RolloutBlocked", reason.clone()),
        _ => (false, "AsExpected", "no known problem".to_string()),
    };
    conditions.push(cond(i, DEGRADED, degraded, d_reason, d_message));
    let (ok, r_reason, r_message) = match &i.error {
        Some((reason, message)) => (false, *reason, message.clone()),
        None => (true, "Reconciled", "all objects applied".to_string()),
    };
    conditions.push(cond(i, RECONCILE_SUCCESS, ok, r_reason, r_message));

    MqttClusterStatus {
        observed_generation: i.generation,
        conditions,
        replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        selector: Some(i.selector.clone()),
        current_version,
        target_version: Some(i.target_version.to_string()),
        members: i.members.clone(),
        endpoint: i.endpoint.clone(),
        operation: match i.plan {
            Some(plan) => plan.operation.clone(),
            None => i.previous.and_then(|p| p.operation.clone()),
        },
        pending_rebalance: match i.plan {
            Some(plan) => plan.rebalance.clone(),
            None => i.previous.and_then(|p| p.pending_rebalance.clone()),
        },
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn progressing(plan: Option<&Plan>) -> (bool, &'static str, String) {
    let Some(plan) = plan else {
        return (false, "InvalidSpec", "waiting for a valid spec".to_string());
    };
    match &plan.action {
        Action::Idle => (
            false,
            "Complete",
            "every pod runs the desired revision".to_string(),
        ),
        Action::Paused => (
            false,
            "Paused",
            "upgradeStrategy.paused holds the rollout".to_string(),
        ),
        Action::Blocked { pod, .. } => (
            false,
            "RolloutBlocked",
            format!("waiting for a spec change or for {pod} to recover"),
        ),
        Action::Rebalance(pods) => (
            false,
            "Rebalancing",
            format!(
                "scale-up complete; {} asked to shed connections to the new pods",
                pods.join(", ")
            ),
        ),
        Action::Evacuate(pod) => (true, "Evacuating", format!("evacuating {pod}")),
        Action::DeletePod(pod) => (true, "ReplacingPod", format!("replacing {pod}")),
        Action::Wait(w) => match w {
            Wait::StatefulSetPending => {
                (true, "Creating", "waiting for the StatefulSet".to_string())
            }
            Wait::ClusterNotReady => (
                true,
                "WaitingForPods",
                "waiting for every pod to be Ready and joined".to_string(),
            ),
            Wait::Draining(pod) => (
                true,
                "Evacuating",
                format!("{pod} is moving its clients away"),
            ),
            Wait::Replacing(pod) => (true, "ReplacingPod", format!("{pod} is being replaced")),
            Wait::Joining(pod) => (
                true,
                "WaitingForJoin",
                format!("waiting for {pod} to become Ready and join"),
            ),
            Wait::Shrinking => (
                true,
                "ScalingDown",
                "leaving pods drained; shrinking".to_string(),
            ),
        },
    }
}

fn cond(i: &StatusInputs, type_: &str, status: bool, reason: &str, message: String) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = i
        .previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_));
    let since = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(i.now),
    };
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: i.generation,
        last_transition_time: since,
    }
}

/// The status after a reconcile that failed before it could decide anything (the read step or
/// the whole reconcile timed out): the previous status, unchanged — including observedGeneration,
/// since no generation was acted on — except `ReconcileSuccess=False` with the error.
pub fn failed(
    previous: Option<&MqttClusterStatus>,
    reason: &str,
    message: String,
    now: Timestamp,
) -> MqttClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let since = status
        .conditions
        .iter()
        .find(|c| c.type_ == RECONCILE_SUCCESS && c.status == "False")
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    status.conditions.retain(|c| c.type_ != RECONCILE_SUCCESS);
    status.conditions.push(Condition {
        type_: RECONCILE_SUCCESS.to_string(),
        status: "False".to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: status.observed_generation,
        last_transition_time: since,
    });
    status
}

/// The `ReconcileSuccess` reason while `corvid.dev/paused: "true"` holds the operator back.
pub const PAUSED_BY_ANNOTATION: &str = "PausedByAnnotation";

/// Whether `status` already records the pause (so entering it is written once, not per wake).
pub fn shows_paused(status: Option<&MqttClusterStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == RECONCILE_SUCCESS && c.reason == PAUSED_BY_ANNOTATION)
    })
}

/// The status that records a pause: everything as it was, `ReconcileSuccess=False` with reason
/// [`PAUSED_BY_ANNOTATION`]; the next reconcile after the annotation goes replaces it.
pub fn paused(previous: Option<&MqttClusterStatus>, now: Timestamp) -> MqttClusterStatus {
    failed(
        previous,
        PAUSED_BY_ANNOTATION,
        "corvid.dev/paused is \"true\": the operator applies, prunes, evacuates and deletes \
         nothing for this cluster until the annotation is removed"
            .to_string(),
        now,
    )
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;

/// Members the brokers still list although their pod is gone for good (an ordinal at or above
/// the desired size, no pod): after a scale-down these are ghosts that should have left.
pub fn stale_members(
    members: &[MemberStatus],
    pods: &[PodView],
    statefulset: &str,
    desired: i32,
) -> Vec<String> {
    members
        .iter()
        .filter(|m| {
            let ordinal = m
                .name
                .strip_prefix(statefulset)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|o| o.parse::<i32>().ok());
            ordinal.is_some_and(|o| o >= desired) && !pods.iter().any(|p| p.name == m.name)
        })
        .map(|m| m.name.clone())
        .collect()
}
