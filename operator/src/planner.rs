//! The rollout and scale-down planner: a pure state machine from what the operator observes
//! (pods, revisions, readiness, membership, evacuation progress, the step recorded in status) to
//! the single next action. One pod at a time, highest ordinal first; every wait is bounded, a pod
//! that never becomes Ready blocks the rollout (Degraded) instead of taking more pods down.
//!
//! A newer spec supersedes whatever is in progress: a pod that is not Ready on an outdated
//! revision serves nobody and holds no sessions, so it is deleted at once (no evacuation) and
//! comes back at the newest revision — even while another step is recorded. That is what
//! un-blocks a rollout stuck on a bad image or a bad config once the spec is fixed. Scale-ups
//! happen at once whatever the rollout is doing; a scale-down goes first and holds (reported)
//! only when no staying pod could take the leaving pods' clients.
//! The step in progress lives in status, so an operator restart resumes where it stopped.
//!
//! With `spec.rebalance.enabled`, a scale-up is remembered (status `pendingRebalance`) until
//! every pod is Ready, joined and up to date; then the pods that existed before it are asked to
//! shed connections towards the new ones, once.

use corvid_crds::{OperationPhase, OperationStatus, PendingRebalance};
use jiff::Timestamp;

/// Evacuation progress as the broker reports it (`GET /api/v1/evacuate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evacuation {
    /// Not evacuating.
    Idle,
    /// Moving clients away.
    Running,
    /// No clients or sessions left.
    Done,
}

/// What the planner knows about one broker pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// Pod name (`<cluster>-<ordinal>`).
    pub name: String,
    /// StatefulSet ordinal.
    pub ordinal: i32,
    /// The pod's UID: which instance of the name this is (a replaced pod has a new one).
    pub uid: Option<String>,
    /// `controller-revision-hash` label: the StatefulSet revision the pod was created from.
    pub revision: Option<String>,
    /// Pod Ready condition (the broker's /readyz: joined and synced).
    pub ready: bool,
    /// Whether the cluster view lists the pod as a member; None when nobody could be asked.
    pub joined: Option<bool>,
    /// Deletion has started.
    pub terminating: bool,
    /// Evacuation progress; None when not asked or unreachable.
    pub evacuation: Option<Evacuation>,
    /// When the pod was created.
    pub created: Option<Timestamp>,
    /// Since when the pod has not been Ready (its Ready condition's last transition, else its
    /// creation); None while Ready.
    pub unready_since: Option<Timestamp>,
    /// Broker version the pod runs (its `app.kubernetes.io/version` label).
    pub version: Option<String>,
    /// Why the pod does not run, as Kubernetes reports it (CrashLoopBackOff with the last exit,
    /// ImagePullBackOff with the image, unschedulable); None when nothing is known to be wrong.
    pub problem: Option<String>,
}

impl PodView {
    /// Serving clients as a full member.
    pub fn healthy(&self) -> bool {
        self.ready && !self.terminating && self.joined != Some(false)
    }

    /// Seconds the pod has not been Ready (since its Ready condition changed, else since it was
    /// created). None while Ready: a Ready pod that a broker does not list as joined is waited
    /// for, never reported as broken (one unanswered admin call must not flap Degraded).
    fn unready_for(&self, now: Timestamp) -> Option<i64> {
        if self.ready {
            return None;
        }
        self.unready_since
            .or(self.created)
            .map(|t| (now - t).get_seconds())
    }

    /// "pod X did not become Ready …" with what Kubernetes says about it.
    fn not_ready_reason(&self, ready_timeout_seconds: i64) -> String {
        let mut reason = format!(
            "pod {} did not become Ready and join the cluster within {}s",
            self.name, ready_timeout_seconds
        );
        if let Some(problem) = &self.problem {
            reason.push_str(&format!(" ({problem})"));
        }
        reason.push_str("; fix the spec to resume");
        reason
    }
}

/// Everything the planner decides from.
#[derive(Clone, Debug)]
pub struct Observed {
    /// spec.replicas.
    pub desired_replicas: i32,
    /// The StatefulSet's current spec.replicas (None before it exists).
    pub statefulset_replicas: Option<i32>,
    /// The StatefulSet's spec.replicas when this reconcile started, before its apply: a value
    /// below `desired_replicas` means a scale-up starts now (None before it exists).
    pub replicas_before: Option<i32>,
    /// spec.rebalance.enabled.
    pub rebalance_enabled: bool,
    /// The scale-up recorded in status whose old pods were not asked to rebalance yet.
    pub pending_rebalance: Option<PendingRebalance>,
    /// The StatefulSet's status.updateRevision: the revision every pod should run.
    pub update_revision: Option<String>,
    /// The broker pods.
    pub pods: Vec<PodView>,
    /// The step recorded in status by an earlier reconcile.
    pub operation: Option<OperationStatus>,
    /// upgradeStrategy.paused.
    pub paused: bool,
    /// upgradeStrategy.drainTimeoutSeconds.
    pub drain_timeout_seconds: i64,
    /// upgradeStrategy.readyTimeoutSeconds.
    pub ready_timeout_seconds: i64,
    /// The pods' terminationGracePeriodSeconds (a replaced pod may take this long to go away).
    pub grace_period_seconds: i64,
    /// Current time.
    pub now: Timestamp,
}

/// Why the planner is waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The StatefulSet has not reported its revisions yet.
    StatefulSetPending,
    /// Pods are missing or not Ready; nothing is taken down meanwhile.
    ClusterNotReady,
    /// The pod is moving its clients away.
    Draining(String),
    /// The old pod is terminating or the new one is not created yet.
    Replacing(String),
    /// The new pod must become Ready and join.
    Joining(String),
    /// The leaving pods are drained; the StatefulSet shrinks now.
    Shrinking,
}

/// The one thing to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Converged: every pod runs the update revision and the size is right.
    Idle,
    /// Nothing to do but check again soon.
    Wait(Wait),
    /// Ask the pod to evacuate through its admin API.
    Evacuate(String),
    /// Delete the pod; the StatefulSet recreates it at the update revision.
    DeletePod(String),
    /// The rollout cannot continue until the spec changes or the pod recovers.
    Blocked {
        /// The pod that does not come up.
        pod: String,
        /// Human-readable reason (goes into the Degraded condition and an Event).
        reason: String,
    },
    /// upgradeStrategy.paused holds an outstanding rollout.
    Paused,
    /// A scale-up completed: ask these pods (the ones that existed before it) to shed
    /// connections towards the new members (`POST /api/v1/rebalance`).
    Rebalance(Vec<String>),
}

/// The planner's decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Replicas to write into the StatefulSet.
    pub statefulset_replicas: i32,
    /// What to do now.
    pub action: Action,
    /// The step to record in status (None clears it).
    pub operation: Option<OperationStatus>,
    /// The scale-up to remember in status until its rebalance is requested (None clears it).
    pub rebalance: Option<PendingRebalance>,
}

/// Decides the next step.
pub fn plan(o: &Observed) -> Plan {
    let current = o.statefulset_replicas.unwrap_or(o.desired_replicas);
    let pending = pending_rebalance(o);
    if o.desired_replicas < current {
        return Plan {
            rebalance: pending,
            ..scale_down(o, current)
        };
    }
    // Scale-up (or creation) happens at once: new pods start at the update revision and join.
    let (action, operation) = rollout(o);
    let (action, rebalance) = match pending {
        Some(p) if action == Action::Idle && all_serving(o) => (rebalance_action(o, &p), None),
        p => (action, p),
    };
    Plan {
        statefulset_replicas: o.desired_replicas,
        action,
        operation,
        rebalance,
    }
}

/// The scale-up to remember: the one recorded earlier while it still is one (the earliest
/// start wins, so every pod that held connections is asked), or one starting now.
fn pending_rebalance(o: &Observed) -> Option<PendingRebalance> {
    if !o.rebalance_enabled {
        return None;
    }
    match &o.pending_rebalance {
        Some(p) if p.from_replicas < o.desired_replicas => Some(p.clone()),
        _ => o
            .replicas_before
            .filter(|from| *from < o.desired_replicas)
            .map(|from| PendingRebalance {
                from_replicas: from,
                since: o.now.to_string(),
            }),
    }
}

/// Every desired pod exists, is Ready and joined: the new members can take connections.
fn all_serving(o: &Observed) -> bool {
    let present = (0..o.desired_replicas).all(|i| o.pods.iter().any(|p| p.ordinal == i));
    present && o.pods.iter().all(PodView::healthy)
}

/// Asks the pods that existed before the scale-up (lowest ordinal first) to rebalance; with
/// none of them left, there is nothing to ask and the plan is simply idle.
fn rebalance_action(o: &Observed, p: &PendingRebalance) -> Action {
    let mut old: Vec<&PodView> = o
        .pods
        .iter()
        .filter(|pod| pod.ordinal < p.from_replicas)
        .collect();
    old.sort_by_key(|pod| pod.ordinal);
    if old.is_empty() {
        return Action::Idle;
    }
    Action::Rebalance(old.into_iter().map(|pod| pod.name.clone()).collect())
}

fn elapsed(o: &Observed, since: &str) -> i64 {
    // An unparsable timestamp counts as "just started": the worst case is one extra wait period.
    since
        .parse::<Timestamp>()
        .map(|t| (o.now - t).get_seconds())
        .unwrap_or(0)
}

fn op(o: &Observed, phase: OperationPhase, pod: &str, revision: &str) -> Option<OperationStatus> {
    Some(OperationStatus {
        phase,
        pod: pod.to_string(),
        revision: revision.to_string(),
        since: o.now.to_string(),
    })
}

fn pod<'a>(o: &'a Observed, name: &str) -> Option<&'a PodView> {
    o.pods.iter().find(|p| p.name == name)
}

/// Evacuates the pods above the new size one at a time (highest first), then shrinks.
fn scale_down(o: &Observed, current: i32) -> Plan {
    let hold = |action, operation| Plan {
        statefulset_replicas: current,
        action,
        operation,
        rebalance: None,
    };
    let mut leaving: Vec<&PodView> = o
        .pods
        .iter()
        .filter(|p| p.ordinal >= o.desired_replicas)
        .collect();
    leaving.sort_by_key(|p| std::cmp::Reverse(p.ordinal));
    let recorded = o
        .operation
        .as_ref()
        .filter(|op| op.phase == OperationPhase::ScalingDown);
    let recorded_ordinal = recorded.and_then(|r| pod(o, &r.pod)).map(|p| p.ordinal);
    for p in leaving {
        if recorded_ordinal.is_some_and(|r| p.ordinal > r) {
            continue; // handled earlier in this scale-down
        }
        let finished = !p.ready || p.terminating || p.evacuation == Some(Evacuation::Done);
        if finished {
            continue;
        }
        let staying_serves = o
            .pods
            .iter()
            .any(|s| s.ordinal < o.desired_replicas && s.healthy());
        if !staying_serves && recorded.is_none() {
            // Draining into nothing would disconnect every client: hold and say so.
            let reason = format!(
                "scale-down to {} waits: no remaining pod is Ready to take the clients of {}",
                o.desired_replicas, p.name
            );
            return hold(
                Action::Blocked {
                    pod: p.name.clone(),
                    reason,
                },
                None,
            );
        }
        match recorded.filter(|r| r.pod == p.name) {
            Some(r) if elapsed(o, &r.since) >= o.drain_timeout_seconds => continue, // bounded drain
            Some(r) if p.evacuation == Some(Evacuation::Running) => {
                return hold(
                    Action::Wait(Wait::Draining(p.name.clone())),
                    Some(r.clone()),
                );
            }
            // Recorded but not running (the request was lost): ask again, keep the clock.
            Some(r) => return hold(Action::Evacuate(p.name.clone()), Some(r.clone())),
            None => {
                return hold(
                    Action::Evacuate(p.name.clone()),
                    op(o, OperationPhase::ScalingDown, &p.name, ""),
                );
            }
        }
    }
    Plan {
        statefulset_replicas: o.desired_replicas,
        action: Action::Wait(Wait::Shrinking),
        operation: None,
        rebalance: None,
    }
}

/// Replaces outdated pods one at a time.
fn rollout(o: &Observed) -> (Action, Option<OperationStatus>) {
    let Some(target) = o.update_revision.as_deref() else {
        return (Action::Wait(Wait::StatefulSetPending), None);
    };
    let recorded = o
        .operation
        .clone()
        .filter(|r| r.phase != OperationPhase::ScalingDown);
    // A step recorded for another revision is obsolete: the spec changed, start over from the
    // pods — except a pod already on its way out, which comes back at the newest revision.
    let recorded = match recorded {
        Some(r) if r.revision != target => superseded(o, &r, target),
        r => r,
    };
    if o.paused {
        let outdated = o.pods.iter().any(|p| p.revision.as_deref() != Some(target));
        return if outdated || recorded.is_some() {
            (Action::Paused, recorded)
        } else {
            (Action::Idle, None)
        };
    }
    // Broken pods on an old revision serve nobody: replace them at once, without evacuation and
    // whatever step is in progress (the step stays recorded and continues next time).
    if let Some(p) = broken_outdated(o, target) {
        let operation = match recorded {
            // Another pod's step goes on afterwards; a repeated delete keeps its clock.
            Some(r) if r.pod != p.name || r.phase == OperationPhase::Replacing => Some(r),
            _ => op(o, OperationPhase::Replacing, &p.name, target),
        };
        return (Action::DeletePod(p.name.clone()), operation);
    }
    if let Some(r) = recorded {
        if let Some(next) = continue_step(o, &r, target) {
            return next;
        }
    }
    next_step(o, target)
}

/// What becomes of a step recorded for an older revision once the spec changed: a pod that is
/// being deleted (or already gone) keeps its Replacing step, moved to the new revision with a
/// fresh clock; anything else is dropped and the plan starts from the pods.
fn superseded(o: &Observed, r: &OperationStatus, target: &str) -> Option<OperationStatus> {
    let leaving = pod(o, &r.pod).is_none_or(|p| p.terminating);
    let replacing = matches!(
        r.phase,
        OperationPhase::Replacing | OperationPhase::Evacuating
    );
    (replacing && leaving)
        .then(|| op(o, OperationPhase::Replacing, &r.pod, target))
        .flatten()
}

/// The highest outdated pod that is neither Ready nor already being deleted.
fn broken_outdated<'a>(o: &'a Observed, target: &str) -> Option<&'a PodView> {
    o.pods
        .iter()
        .filter(|p| p.revision.as_deref() != Some(target) && !p.ready && !p.terminating)
        .max_by_key(|p| p.ordinal)
}

/// Continues a recorded step; None when it is finished.
fn continue_step(
    o: &Observed,
    r: &OperationStatus,
    target: &str,
) -> Option<(Action, Option<OperationStatus>)> {
    let p = pod(o, &r.pod);
    let updated = p.is_some_and(|p| p.revision.as_deref() == Some(target) && !p.terminating);
    let since = elapsed(o, &r.since);
    match r.phase {
        OperationPhase::Evacuating if updated => Some((
            Action::Wait(Wait::Joining(r.pod.clone())),
            op(o, OperationPhase::WaitingReady, &r.pod, target),
        )),
        OperationPhase::Evacuating => {
            // Already deleted or on its way out (the step was read back from before this
            // operator's delete landed in its cache): asking again would reach the pod's
            // replacement as soon as it starts, and evacuate the new pod instead.
            let Some(p) = p.filter(|p| !p.terminating) else {
                return Some((
                    Action::Wait(Wait::Replacing(r.pod.clone())),
                    op(o, OperationPhase::Replacing, &r.pod, target),
                ));
            };
            let drained = !p.ready
                || p.evacuation == Some(Evacuation::Done)
                || since >= o.drain_timeout_seconds;
            if drained {
                Some((
                    Action::DeletePod(r.pod.clone()),
                    op(o, OperationPhase::Replacing, &r.pod, target),
                ))
            } else if p.evacuation == Some(Evacuation::Running) {
                Some((Action::Wait(Wait::Draining(r.pod.clone())), Some(r.clone())))
            } else {
                Some((Action::Evacuate(r.pod.clone()), Some(r.clone())))
            }
        }
        OperationPhase::Replacing if updated => Some((
            Action::Wait(Wait::Joining(r.pod.clone())),
            op(o, OperationPhase::WaitingReady, &r.pod, target),
        )),
        OperationPhase::Replacing => {
            if since >= o.grace_period_seconds + o.ready_timeout_seconds {
                return Some(blocked(
                    r,
                    format!("pod {} was not replaced within {}s", r.pod, since),
                ));
            }
            match p {
                Some(p) if !p.terminating => {
                    Some((Action::DeletePod(r.pod.clone()), Some(r.clone())))
                }
                _ => Some((
                    Action::Wait(Wait::Replacing(r.pod.clone())),
                    Some(r.clone()),
                )),
            }
        }
        OperationPhase::WaitingReady => match p {
            Some(p) if updated && p.healthy() => None,
            Some(p) if since >= o.ready_timeout_seconds => {
                Some(blocked(r, p.not_ready_reason(o.ready_timeout_seconds)))
            }
            _ if since >= o.ready_timeout_seconds => Some(blocked(
                r,
                format!(
                    "pod {} did not come back within {}s; fix the spec to resume",
                    r.pod, o.ready_timeout_seconds
                ),
            )),
            _ => Some((Action::Wait(Wait::Joining(r.pod.clone())), Some(r.clone()))),
        },
        OperationPhase::ScalingDown => None,
    }
}

fn blocked(r: &OperationStatus, reason: String) -> (Action, Option<OperationStatus>) {
    (
        Action::Blocked {
            pod: r.pod.clone(),
            reason,
        },
        Some(r.clone()),
    )
}

/// Picks the next pod to replace.
fn next_step(o: &Observed, target: &str) -> (Action, Option<OperationStatus>) {
    let mut outdated: Vec<&PodView> = o
        .pods
        .iter()
        .filter(|p| p.revision.as_deref() != Some(target))
        .collect();
    outdated.sort_by_key(|p| std::cmp::Reverse(p.ordinal));
    // A pod on the newest revision that stays out of service past the timeout blocks the
    // rollout and makes the cluster Degraded (also after a restart that lost the recorded step,
    // and for a pod a scale-up added).
    let stuck = o.pods.iter().find(|p| {
        p.revision.as_deref() == Some(target)
            && !p.terminating
            && p.unready_for(o.now)
                .is_some_and(|s| s >= o.ready_timeout_seconds)
    });
    if let Some(p) = stuck {
        return (
            Action::Blocked {
                pod: p.name.clone(),
                reason: p.not_ready_reason(o.ready_timeout_seconds),
            },
            None,
        );
    }
    let all_present = o.pods.len() >= usize::try_from(o.desired_replicas).unwrap_or(0);
    if !all_present || !o.pods.iter().all(PodView::healthy) {
        // Never take a healthy member down while another one is missing or unready.
        return (Action::Wait(Wait::ClusterNotReady), None);
    }
    match outdated.first() {
        None => (Action::Idle, None),
        Some(p) => (
            Action::Evacuate(p.name.clone()),
            op(o, OperationPhase::Evacuating, &p.name, target),
        ),
    }
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
