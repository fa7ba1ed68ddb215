//! Condition and count tests.

use corvid_crds::{MemberStatus, MqttClusterStatus};
use jiff::Timestamp;

use super::*;
use crate::planner::{Action, Plan, PodView, Wait};

fn pod(ordinal: i32, revision: &str, ready: bool) -> PodView {
    PodView {
        name: format!("demo-{ordinal}"),
        ordinal,
        uid: None,
        revision: Some(revision.into()),
        ready,
        joined: Some(ready),
        terminating: false,
        evacuation: None,
        created: None,
        unready_since: None,
        problem: None,
        version: Some(if revision == "r2" { "2.0" } else { "1.0" }.into()),
    }
}

fn now() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().expect("time")
}

fn inputs<'a>(
    pods: &'a [PodView],
    plan: Option<&'a Plan>,
    previous: Option<&'a MqttClusterStatus>,
) -> StatusInputs<'a> {
    StatusInputs {
        generation: Some(4),
        previous,
        desired_replicas: 3,
        max_unavailable: 1,
        pods,
        update_revision: Some("r2"),
        target_version: "2.0",
        plan,
        error: None,
        members: vec![],
        endpoint: Some("demo.mqtt.svc".into()),
        selector: "a=b".into(),
        now: now(),
    }
}

fn get<'a>(s: &'a MqttClusterStatus, t: &str) -> &'a Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .expect("condition present")
}

fn plan(action: Action) -> Plan {
    Plan {
        statefulset_replicas: 3,
        action,
        operation: None,
        rebalance: None,
    }
}

#[test]
fn converged_cluster() {
    let pods = [pod(0, "r2", true), pod(1, "r2", true), pod(2, "r2", true)];
    let p = plan(Action::Idle);
    let s = compute(&inputs(&pods, Some(&p), None));
    assert_eq!(
        (s.replicas, s.ready_replicas, s.updated_replicas),
        (3, 3, 3)
    );
    assert_eq!(s.current_version.as_deref(), Some("2.0"));
    assert_eq!(s.observed_generation, Some(4));
    assert_eq!(get(&s, AVAILABLE).status, "True");
    assert_eq!(get(&s, PROGRESSING).status, "False");
    assert_eq!(get(&s, DEGRADED).status, "False");
    assert_eq!(get(&s, RECONCILE_SUCCESS).status, "True");
    assert!(
        s.conditions
            .iter()
            .all(|c| c.status == "True" || c.status == "False"),
        "never Unknown"
    );
}

#[test]
fn mid_rollout_keeps_the_old_version_and_is_progressing() {
    let pods = [pod(0, "r1", true), pod(1, "r1", true), pod(2, "r2", false)];
    let previous = MqttClusterStatus {
        current_version: Some("1.0".into()),
        ..Default::default()
    };
    let p = plan(Action::Wait(Wait::Joining("demo-2".into())));
    let s = compute(&inputs(&pods, Some(&p), Some(&previous)));
    assert_eq!(s.current_version.as_deref(), Some("1.0"));
    assert_eq!(s.target_version.as_deref(), Some("2.0"));
    assert_eq!(s.updated_replicas, 1);
    assert_eq!(get(&s, PROGRESSING).reason, "WaitingForJoin");
    assert_eq!(
        get(&s, AVAILABLE).status,
        "True",
        "two of three ready is within maxUnavailable 1"
    );
}

#[test]
fn blocked_rollout_is_degraded() {
    let pods = [pod(0, "r1", true), pod(1, "r1", false), pod(2, "r2", false)];
    let p = plan(Action::Blocked {
        pod: "demo-2".into(),
        reason: "pod demo-2 did not become Ready".into(),
    });
    let s = compute(&inputs(&pods, Some(&p), None));
    assert_eq!(get(&s, DEGRADED).status, "True");
    assert_eq!(get(&s, DEGRADED).reason, "RolloutBlocked");
    assert_eq!(get(&s, AVAILABLE).status, "False");
    assert_eq!(get(&s, PROGRESSING).status, "False");
}

#[test]
fn invalid_spec_fails_reconcile_and_degrades() {
    let pods = [pod(0, "r2", true)];
    let mut i = inputs(&pods, None, None);
    i.error = Some(("InvalidSpec", "spec.replicas must be at least 1".into()));
    let s = compute(&i);
    assert_eq!(get(&s, RECONCILE_SUCCESS).status, "False");
    assert_eq!(
        get(&s, RECONCILE_SUCCESS).message,
        "spec.replicas must be at least 1"
    );
    assert_eq!(get(&s, DEGRADED).reason, "InvalidSpec");
}

#[test]
fn transition_time_only_moves_when_status_changes() {
    let pods = [pod(0, "r2", true), pod(1, "r2", true), pod(2, "r2", true)];
    let p = plan(Action::Idle);
    let first = compute(&inputs(&pods, Some(&p), None));
    let mut later = inputs(&pods, Some(&p), Some(&first));
    later.now = "2026-01-02T00:00:00Z".parse().expect("time");
    let second = compute(&later);
    assert_eq!(
        get(&second, AVAILABLE).last_transition_time,
        get(&first, AVAILABLE).last_transition_time
    );
    let broken = plan(Action::Blocked {
        pod: "demo-2".into(),
        reason: "x".into(),
    });
    let mut changed = inputs(&pods, Some(&broken), Some(&first));
    changed.now = later.now;
    let third = compute(&changed);
    assert_eq!(get(&third, DEGRADED).last_transition_time.0, later.now);
}

#[test]
fn members_left_behind_by_a_scale_down_are_found() {
    let member = |name: &str| MemberStatus {
        name: name.into(),
        state: "up".into(),
        routes: 0,
    };
    let members = [
        member("demo-0"),
        member("demo-1"),
        member("demo-2"),
        member("other-5"),
    ];
    let pods = [pod(0, "r2", true), pod(1, "r2", true)];
    assert_eq!(
        stale_members(&members, &pods, "demo", 2),
        vec!["demo-2".to_string()]
    );
    assert!(stale_members(&members[..2], &pods, "demo", 2).is_empty());
    // A pod that is merely being replaced is not a ghost.
    let all = [pod(0, "r2", true), pod(1, "r2", true), pod(2, "r2", false)];
    assert!(stale_members(&members, &all, "demo", 3).is_empty());
}

#[test]
fn pending_rebalance_follows_the_plan_and_survives_an_invalid_spec() {
    let pods = [pod(0, "r2", true), pod(1, "r2", true), pod(2, "r2", true)];
    let record = corvid_crds::PendingRebalance {
        from_replicas: 2,
        since: "2026-01-01T00:00:00Z".into(),
    };
    let mut p = plan(Action::Wait(Wait::ClusterNotReady));
    p.rebalance = Some(record.clone());
    let s = compute(&inputs(&pods, Some(&p), None));
    assert_eq!(s.pending_rebalance, Some(record.clone()));
    // No plan (invalid spec): the record is kept as it was.
    let kept = compute(&inputs(&pods, None, Some(&s)));
    assert_eq!(kept.pending_rebalance, Some(record));
    // The rebalance was requested: the record is cleared, and nothing is progressing.
    let done = plan(Action::Rebalance(vec!["demo-0".into(), "demo-1".into()]));
    let s = compute(&inputs(&pods, Some(&done), Some(&s)));
    assert_eq!(s.pending_rebalance, None);
    let c = get(&s, PROGRESSING);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Rebalancing")
    );
    assert!(c.message.contains("demo-0, demo-1"), "{}", c.message);
}

#[test]
fn degraded_names_the_pod_and_its_container_state() {
    let pods = [pod(0, "r1", true), pod(1, "r1", true), pod(2, "r2", false)];
    let why =
        "pod demo-2 did not become Ready and join the cluster within 300s (container broker: \
               CrashLoopBackOff (5 restarts), last exit code 1 (Error); last log line: Error: \
               mqtt.max_qos: invalid type); fix the spec to resume";
    let p = plan(Action::Blocked {
        pod: "demo-2".into(),
        reason: why.into(),
    });
    let s = compute(&inputs(&pods, Some(&p), None));
    let degraded = get(&s, DEGRADED);
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.message, why);
    assert!(get(&s, PROGRESSING).message.contains("demo-2"));
}

#[test]
fn a_failed_reconcile_says_so_and_keeps_what_it_did_not_observe() {
    let pods = [pod(0, "r2", true), pod(1, "r2", true), pod(2, "r2", true)];
    let idle = plan(Action::Idle);
    let mut i = inputs(&pods, Some(&idle), None);
    i.generation = Some(3);
    let before = compute(&i);
    let later: Timestamp = "2026-01-01T00:05:00Z".parse().expect("time");
    let s = failed(
        Some(&before),
        "ReadFailed",
        "reading pods: 503".into(),
        later,
    );
    let c = get(&s, RECONCILE_SUCCESS);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
        ("False", "ReadFailed", "reading pods: 503")
    );
    assert_eq!(c.last_transition_time.0, later);
    assert_eq!(s.observed_generation, Some(3), "no generation was acted on");
    assert_eq!(get(&s, AVAILABLE), get(&before, AVAILABLE));
    assert_eq!(s.conditions.len(), 4);
    assert_eq!(s.ready_replicas, 3);
    // Failing again keeps the time it started failing.
    let again = failed(
        Some(&s),
        "ReconcileTimeout",
        "slow".into(),
        later + jiff::SignedDuration::from_secs(60),
    );
    assert_eq!(get(&again, RECONCILE_SUCCESS).last_transition_time.0, later);
    // Before any status existed: only the failure is known.
    let first = failed(None, "ReadFailed", "x".into(), later);
    assert_eq!(first.conditions.len(), 1);
    assert_eq!(first.observed_generation, None);
}

#[test]
fn observed_generation_is_the_generation_acted_on() {
    let pods = [pod(0, "r2", true)];
    let idle = plan(Action::Idle);
    let mut i = inputs(&pods, Some(&idle), None);
    i.generation = Some(2);
    i.error = Some(("ApplyFailed", "applying StatefulSet demo: 503".into()));
    let s = compute(&i);
    assert_eq!(s.observed_generation, Some(2));
    assert!(s
        .conditions
        .iter()
        .all(|c| c.observed_generation == Some(2)));
}

#[test]
fn a_pause_is_recorded_once_and_the_next_reconcile_replaces_it() {
    let pods = [pod(0, "r2", true), pod(1, "r2", true), pod(2, "r2", true)];
    let p = plan(Action::Idle);
    let running = compute(&inputs(&pods, Some(&p), None));
    assert!(!shows_paused(Some(&running)));
    assert!(!shows_paused(None));

    let held = paused(Some(&running), now());
    assert!(shows_paused(Some(&held)));
    assert_eq!(get(&held, RECONCILE_SUCCESS).status, "False");
    assert!(get(&held, RECONCILE_SUCCESS)
        .message
        .contains("corvid.dev/paused"));
    // Everything else is what the operator last saw: the pause changes nothing it reports.
    assert_eq!(get(&held, AVAILABLE), get(&running, AVAILABLE));
    assert_eq!(held.observed_generation, running.observed_generation);

    let resumed = compute(&inputs(&pods, Some(&p), Some(&held)));
    assert!(!shows_paused(Some(&resumed)));
    assert_eq!(get(&resumed, RECONCILE_SUCCESS).status, "True");
}
