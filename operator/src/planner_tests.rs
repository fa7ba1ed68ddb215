//! Table tests of the planner: observed pods → next action.

use corvid_crds::{OperationPhase, OperationStatus, PendingRebalance};
use jiff::{SignedDuration, Timestamp};

use super::*;

const NOW: &str = "2026-01-01T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().expect("time")
}

fn ago(seconds: i64) -> Timestamp {
    now() - SignedDuration::from_secs(seconds)
}

fn healthy(ordinal: i32, revision: &str) -> PodView {
    PodView {
        name: format!("demo-{ordinal}"),
        ordinal,
        uid: Some(format!("uid-{ordinal}-{revision}")),
        revision: Some(revision.to_string()),
        ready: true,
        joined: Some(true),
        terminating: false,
        evacuation: None,
        created: Some(ago(3600)),
        unready_since: None,
        version: None,
        problem: None,
    }
}

/// A pod that has not been Ready for `seconds`, for the reason `problem`.
fn broken(ordinal: i32, revision: &str, seconds: i64, problem: &str) -> PodView {
    PodView {
        ready: false,
        joined: Some(false),
        created: Some(ago(seconds)),
        unready_since: Some(ago(seconds)),
        problem: Some(problem.to_string()),
        ..healthy(ordinal, revision)
    }
}

const CRASH: &str = "container broker: CrashLoopBackOff (4 restarts), last exit code 1 (Error)";
const PULL: &str = "container broker: ImagePullBackOff, image corvid/corvid-broker:9.9.9";

fn observed(pods: Vec<PodView>, target: &str) -> Observed {
    Observed {
        desired_replicas: 3,
        statefulset_replicas: Some(3),
        replicas_before: Some(3),
        rebalance_enabled: false,
        pending_rebalance: None,
        update_revision: Some(target.to_string()),
        pods,
        operation: None,
        paused: false,
        drain_timeout_seconds: 60,
        ready_timeout_seconds: 300,
        grace_period_seconds: 75,
        now: now(),
    }
}

fn step(
    phase: OperationPhase,
    pod: &str,
    revision: &str,
    seconds_ago: i64,
) -> Option<OperationStatus> {
    Some(OperationStatus {
        phase,
        pod: pod.to_string(),
        revision: revision.to_string(),
        since: ago(seconds_ago).to_string(),
    })
}

fn three(revision: &str) -> Vec<PodView> {
    (0..3).map(|i| healthy(i, revision)).collect()
}

/// Three pods at r1, `demo-2` replaced by `third`.
fn with_third(third: PodView) -> Vec<PodView> {
    let mut pods = three("r1");
    pods[2] = third;
    pods
}

/// A pod at `revision` created `seconds` ago, not Ready yet, that no broker was asked about.
fn starting(ordinal: i32, revision: &str, seconds: i64) -> PodView {
    PodView {
        ready: false,
        joined: None,
        created: Some(ago(seconds)),
        ..healthy(ordinal, revision)
    }
}

/// `pods` rolling to `target`, with the step `recorded` in status.
fn rolling(pods: Vec<PodView>, target: &str, recorded: Option<OperationStatus>) -> Observed {
    let mut o = observed(pods, target);
    o.operation = recorded;
    o
}

use OperationPhase::*;

#[test]
fn converged_cluster_is_idle() {
    let p = plan(&observed(three("r1"), "r1"));
    assert_eq!(
        p,
        Plan {
            statefulset_replicas: 3,
            action: Action::Idle,
            operation: None,
            rebalance: None,
        }
    );
}

#[test]
fn creation_waits_for_the_statefulset() {
    let mut o = observed(vec![], "r1");
    o.statefulset_replicas = None;
    o.update_revision = None;
    let p = plan(&o);
    assert_eq!(
        (p.statefulset_replicas, p.action),
        (3, Action::Wait(Wait::StatefulSetPending))
    );
}

#[test]
fn starting_pods_are_waited_for() {
    let mut pods = three("r1");
    pods[1].ready = false;
    pods[1].created = Some(ago(10));
    assert_eq!(
        plan(&observed(pods, "r1")).action,
        Action::Wait(Wait::ClusterNotReady)
    );
    assert_eq!(
        plan(&observed(three("r1")[..2].to_vec(), "r1")).action,
        Action::Wait(Wait::ClusterNotReady)
    );
}

#[test]
fn rollout_starts_with_the_highest_ordinal() {
    let p = plan(&observed(three("r1"), "r2"));
    assert_eq!(p.action, Action::Evacuate("demo-2".into()));
    assert_eq!(p.operation, step(Evacuating, "demo-2", "r2", 0));
}

/// (case, evacuation state of demo-2, seconds since evacuation started, expected action, expected phase)
#[test]
fn evacuation_table() {
    let cases = [
        (
            "draining",
            Some(Evacuation::Running),
            10,
            Action::Wait(Wait::Draining("demo-2".into())),
            Some(Evacuating),
        ),
        (
            "drained",
            Some(Evacuation::Done),
            10,
            Action::DeletePod("demo-2".into()),
            Some(Replacing),
        ),
        (
            "drain timeout bounds the wait",
            Some(Evacuation::Running),
            60,
            Action::DeletePod("demo-2".into()),
            Some(Replacing),
        ),
        (
            "lost request is repeated",
            Some(Evacuation::Idle),
            10,
            Action::Evacuate("demo-2".into()),
            Some(Evacuating),
        ),
        (
            "unreachable admin api: ask again (idempotent)",
            None,
            10,
            Action::Evacuate("demo-2".into()),
            Some(Evacuating),
        ),
    ];
    for (case, evacuation, since, action, phase) in cases {
        let third = PodView {
            evacuation,
            ..healthy(2, "r1")
        };
        let p = plan(&rolling(
            with_third(third),
            "r2",
            step(Evacuating, "demo-2", "r2", since),
        ));
        assert_eq!(p.action, action, "{case}");
        assert_eq!(p.operation.map(|op| op.phase), phase, "{case}");
    }
}

#[test]
fn replacing_waits_for_the_old_pod_to_go_then_for_the_new_one() {
    let terminating = PodView {
        terminating: true,
        ..healthy(2, "r1")
    };
    let mut o = rolling(
        with_third(terminating),
        "r2",
        step(Replacing, "demo-2", "r2", 5),
    );
    assert_eq!(
        plan(&o).action,
        Action::Wait(Wait::Replacing("demo-2".into()))
    );

    o.pods = with_third(starting(2, "r2", 1));
    let p = plan(&o);
    assert_eq!(p.action, Action::Wait(Wait::Joining("demo-2".into())));
    assert_eq!(
        p.operation,
        step(WaitingReady, "demo-2", "r2", 0),
        "ready clock starts when the new pod exists"
    );
}

#[test]
fn replacing_repeats_a_lost_delete() {
    let mut o = observed(three("r1"), "r2");
    o.operation = step(Replacing, "demo-2", "r2", 5);
    assert_eq!(plan(&o).action, Action::DeletePod("demo-2".into()));
}

#[test]
fn joined_pod_moves_the_rollout_to_the_next_ordinal() {
    let o = rolling(
        with_third(healthy(2, "r2")),
        "r2",
        step(WaitingReady, "demo-2", "r2", 20),
    );
    let p = plan(&o);
    assert_eq!(p.action, Action::Evacuate("demo-1".into()));
    assert_eq!(p.operation, step(Evacuating, "demo-1", "r2", 0));
}

#[test]
fn ready_but_not_joined_is_not_done() {
    let not_joined = PodView {
        joined: Some(false),
        ..healthy(2, "r2")
    };
    let o = rolling(
        with_third(not_joined),
        "r2",
        step(WaitingReady, "demo-2", "r2", 20),
    );
    assert_eq!(
        plan(&o).action,
        Action::Wait(Wait::Joining("demo-2".into()))
    );
}

#[test]
fn bad_image_blocks_the_rollout_without_touching_other_pods() {
    let o = rolling(
        with_third(starting(2, "r2", 301)),
        "r2",
        step(WaitingReady, "demo-2", "r2", 300),
    );
    let p = plan(&o);
    assert!(
        matches!(&p.action, Action::Blocked { pod, reason } if pod == "demo-2" && reason.contains("300s")),
        "{:?}",
        p.action
    );
    assert_eq!(
        p.operation.map(|op| op.phase),
        Some(WaitingReady),
        "the step stays recorded"
    );
}

#[test]
fn fixing_the_spec_replaces_the_broken_pod_first_without_evacuation() {
    let o = rolling(
        with_third(starting(2, "r2-bad", 900)),
        "r3",
        step(WaitingReady, "demo-2", "r2-bad", 900),
    );
    let p = plan(&o);
    assert_eq!(p.action, Action::DeletePod("demo-2".into()));
    assert_eq!(p.operation, step(Replacing, "demo-2", "r3", 0));
}

#[test]
fn operator_restart_that_lost_the_step_still_blocks_on_a_stuck_pod() {
    let p = plan(&observed(with_third(starting(2, "r2", 400)), "r2"));
    assert!(
        matches!(p.action, Action::Blocked { ref pod, .. } if pod == "demo-2"),
        "{:?}",
        p.action
    );
}

#[test]
fn operator_restart_resumes_from_pod_revisions() {
    let mut pods = three("r1");
    pods[2] = healthy(2, "r2");
    let p = plan(&observed(pods, "r2"));
    assert_eq!(p.action, Action::Evacuate("demo-1".into()));
}

/// The CI failure of 2026-12-06: the Evacuating step, read back from the cache after this
/// operator had already deleted the pod, made every reconcile ask the terminating pod to
/// evacuate again — until a request reached its replacement, which evacuated itself and never
/// joined ("did not become Ready … within 120s", the rollout blocked). A pod on its way out, or
/// gone, is waited for; it is never asked again.
#[test]
fn a_stale_evacuating_step_never_asks_a_pod_on_its_way_out() {
    for (case, pod) in [
        (
            "terminating, still Ready",
            Some(PodView {
                terminating: true,
                ..healthy(2, "r1")
            }),
        ),
        (
            "terminating, unready",
            Some(PodView {
                terminating: true,
                ..broken(2, "r1", 5, "")
            }),
        ),
        ("gone", None),
    ] {
        let mut pods = three("r1");
        pods.truncate(2);
        pods.extend(pod);
        let p = plan(&rolling(pods, "r2", step(Evacuating, "demo-2", "r2", 3)));
        assert_eq!(
            p.action,
            Action::Wait(Wait::Replacing("demo-2".into())),
            "{case}"
        );
        assert_eq!(
            p.operation.map(|op| (op.phase, op.pod)),
            Some((Replacing, "demo-2".to_string())),
            "{case}: the step moves on, so the next reconcile reads Replacing"
        );
    }
}

#[test]
fn operator_restart_mid_evacuation_keeps_the_recorded_clock() {
    let mut pods = three("r1");
    pods[2].evacuation = Some(Evacuation::Running);
    let mut o = observed(pods, "r2");
    o.operation = step(Evacuating, "demo-2", "r2", 30);
    let p = plan(&o);
    assert_eq!(p.action, Action::Wait(Wait::Draining("demo-2".into())));
    assert_eq!(p.operation, step(Evacuating, "demo-2", "r2", 30));
}

#[test]
fn paused_holds_the_rollout() {
    let mut o = observed(three("r1"), "r2");
    o.paused = true;
    assert_eq!(
        plan(&o),
        Plan {
            statefulset_replicas: 3,
            action: Action::Paused,
            operation: None,
            rebalance: None,
        }
    );
    o.operation = step(Evacuating, "demo-2", "r2", 5);
    assert_eq!(
        plan(&o).operation,
        step(Evacuating, "demo-2", "r2", 5),
        "the step is kept for later"
    );
    let mut idle = observed(three("r1"), "r1");
    idle.paused = true;
    assert_eq!(plan(&idle).action, Action::Idle);
}

#[test]
fn unhealthy_member_stops_new_evacuations() {
    let mut pods = three("r1");
    pods[0].ready = false;
    let p = plan(&observed(pods, "r2"));
    assert_eq!(
        p.action,
        Action::DeletePod("demo-0".into()),
        "an unready outdated pod is replaced directly"
    );
    let mut pods = three("r1");
    pods[0] = PodView {
        ready: false,
        created: Some(ago(5)),
        ..healthy(0, "r2")
    };
    let p = plan(&observed(pods, "r2"));
    assert_eq!(p.action, Action::Wait(Wait::ClusterNotReady));
}

fn five() -> Observed {
    let mut o = observed((0..5).map(|i| healthy(i, "r1")).collect(), "r1");
    o.statefulset_replicas = Some(5);
    o
}

#[test]
fn scale_down_evacuates_leaving_pods_highest_first_then_shrinks() {
    let o = five();
    let p = plan(&o);
    assert_eq!(
        (p.statefulset_replicas, p.action.clone()),
        (5, Action::Evacuate("demo-4".into()))
    );
    assert_eq!(p.operation, step(ScalingDown, "demo-4", "", 0));

    let mut o = five();
    o.pods[4].evacuation = Some(Evacuation::Running);
    o.operation = step(ScalingDown, "demo-4", "", 10);
    let p = plan(&o);
    assert_eq!(
        (p.statefulset_replicas, p.action),
        (5, Action::Wait(Wait::Draining("demo-4".into())))
    );

    o.pods[4].evacuation = Some(Evacuation::Done);
    let p = plan(&o);
    assert_eq!(
        (p.statefulset_replicas, p.action.clone()),
        (5, Action::Evacuate("demo-3".into()))
    );
    assert_eq!(p.operation, step(ScalingDown, "demo-3", "", 0));

    o.pods[3].evacuation = Some(Evacuation::Done);
    o.operation = p.operation;
    let p = plan(&o);
    assert_eq!(
        p,
        Plan {
            statefulset_replicas: 3,
            action: Action::Wait(Wait::Shrinking),
            operation: None,
            rebalance: None,
        }
    );
}

#[test]
fn scale_down_drain_is_bounded_and_skips_unready_pods() {
    let mut o = five();
    o.pods[4].evacuation = Some(Evacuation::Running);
    o.pods[3].ready = false;
    o.operation = step(ScalingDown, "demo-4", "", 61);
    let p = plan(&o);
    assert_eq!(
        p.statefulset_replicas, 3,
        "demo-4 timed out, demo-3 serves nobody"
    );
}

#[test]
fn scale_up_is_immediate() {
    let mut o = observed(three("r1"), "r1");
    o.desired_replicas = 5;
    let p = plan(&o);
    assert_eq!(p.statefulset_replicas, 5);
    assert_eq!(
        p.action,
        Action::Wait(Wait::ClusterNotReady),
        "new pods are awaited"
    );
}

fn pending(from: i32) -> Option<PendingRebalance> {
    Some(PendingRebalance {
        from_replicas: from,
        since: ago(30).to_string(),
    })
}

/// A scale-up from 3 to 5 with rebalancing on, as the reconcile after the spec change sees it.
fn scale_up(pods: Vec<PodView>) -> Observed {
    let mut o = observed(pods, "r1");
    o.desired_replicas = 5;
    o.statefulset_replicas = Some(5);
    o.replicas_before = Some(5);
    o.rebalance_enabled = true;
    o
}

fn five_pods(ready: usize) -> Vec<PodView> {
    (0..5)
        .map(|i| {
            let mut p = healthy(i, "r1");
            if i as usize >= ready {
                p.ready = false;
                p.joined = Some(false);
                p.created = Some(ago(5));
            }
            p
        })
        .collect()
}

/// (case, observed, expected action, expected pending rebalance in status)
#[test]
fn rebalance_after_scale_up_table() {
    let asked = Action::Rebalance(vec!["demo-0".into(), "demo-1".into(), "demo-2".into()]);
    let started = |mut o: Observed| {
        o.replicas_before = Some(3);
        o
    };
    let with = |mut o: Observed, p: Option<PendingRebalance>| {
        o.pending_rebalance = p;
        o
    };
    let disabled = |mut o: Observed| {
        o.rebalance_enabled = false;
        o
    };
    let cases: Vec<(&str, Observed, Action, Option<PendingRebalance>)> = vec![
        (
            "the scale-up starts: remembered from the old size, new pods not there yet",
            started(scale_up(three("r1"))),
            Action::Wait(Wait::ClusterNotReady),
            Some(PendingRebalance {
                from_replicas: 3,
                since: NOW.parse::<Timestamp>().expect("now").to_string(),
            }),
        ),
        (
            "new pods starting: keep waiting, keep the record",
            with(scale_up(five_pods(3)), pending(3)),
            Action::Wait(Wait::ClusterNotReady),
            pending(3),
        ),
        (
            "one new pod Ready but not joined: still waiting",
            with(
                scale_up({
                    let mut p = five_pods(5);
                    p[4].joined = Some(false);
                    p
                }),
                pending(3),
            ),
            Action::Wait(Wait::ClusterNotReady),
            pending(3),
        ),
        (
            "all Ready and joined: the old pods are asked, once",
            with(scale_up(five_pods(5)), pending(3)),
            asked.clone(),
            None,
        ),
        (
            "the next reconcile after the request is idle",
            scale_up(five_pods(5)),
            Action::Idle,
            None,
        ),
        (
            "a second scale-up before the first finished keeps the earliest size",
            started(with(scale_up(five_pods(3)), pending(3))),
            Action::Wait(Wait::ClusterNotReady),
            pending(3),
        ),
        (
            "rebalancing off: a scale-up is not remembered",
            disabled(started(scale_up(three("r1")))),
            Action::Wait(Wait::ClusterNotReady),
            None,
        ),
        (
            "rebalancing switched off meanwhile: the record is dropped, nobody asked",
            disabled(with(scale_up(five_pods(5)), pending(3))),
            Action::Idle,
            None,
        ),
        (
            "scaled back to the old size before the new pods came: nothing to rebalance",
            {
                let mut o = with(scale_up(three("r1")), pending(3));
                o.desired_replicas = 3;
                o.statefulset_replicas = Some(3);
                o
            },
            Action::Idle,
            None,
        ),
        (
            "creation is no scale-up",
            {
                let mut o = scale_up(five_pods(5));
                o.replicas_before = None;
                o
            },
            Action::Idle,
            None,
        ),
    ];
    for (case, o, action, rebalance) in cases {
        let p = plan(&o);
        assert_eq!(p.action, action, "{case}");
        assert_eq!(p.rebalance, rebalance, "{case}");
    }
}

#[test]
fn rebalance_waits_for_a_rollout_to_finish() {
    // New pods came up at r2 while the old ones still run r1: the rollout goes first, the
    // record stays until every pod is updated.
    let mut o = with_revision(scale_up(five_pods(5)), "r2");
    o.pending_rebalance = pending(3);
    let p = plan(&o);
    assert!(matches!(p.action, Action::Evacuate(_)), "{:?}", p.action);
    assert_eq!(p.rebalance, pending(3));
}

#[test]
fn paused_with_unready_pods_does_not_rebalance() {
    let mut o = scale_up(five_pods(4));
    o.paused = true;
    o.pending_rebalance = pending(3);
    let p = plan(&o);
    assert_eq!(p.action, Action::Idle);
    assert_eq!(p.rebalance, pending(3), "kept until the new pod joins");
}

fn with_revision(mut o: Observed, target: &str) -> Observed {
    o.update_revision = Some(target.to_string());
    for p in o.pods.iter_mut().filter(|p| p.ordinal >= 3) {
        p.revision = Some(target.to_string());
    }
    o
}

/// (case, pods, recorded step, target revision, expected action, expected recorded step)
type SpecChangeCase = (
    &'static str,
    Vec<PodView>,
    Option<OperationStatus>,
    &'static str,
    Action,
    Option<OperationStatus>,
);

/// (case, pods, recorded step, target revision, expected action)
type RestartCase = (
    &'static str,
    Vec<PodView>,
    Option<OperationStatus>,
    &'static str,
    Action,
);

/// A newer spec supersedes the step in progress. (case, pods, recorded step, target revision,
/// expected action, expected recorded step)
#[test]
fn spec_change_during_a_replacement_table() {
    let terminating = |mut p: PodView| {
        p.terminating = true;
        p
    };
    let cases: Vec<SpecChangeCase> = vec![
        (
            "new config while the new pod crash-loops: replaced at once at the newest revision",
            with_third(broken(2, "r2", 40, CRASH)),
            step(WaitingReady, "demo-2", "r2", 40),
            "r3",
            Action::DeletePod("demo-2".into()),
            step(Replacing, "demo-2", "r3", 0),
        ),
        (
            "revert to the running revision while the new pod cannot pull its image",
            with_third(broken(2, "r2", 45, PULL)),
            step(WaitingReady, "demo-2", "r2", 45),
            "r1",
            Action::DeletePod("demo-2".into()),
            step(Replacing, "demo-2", "r1", 0),
        ),
        (
            "revert after the rollout blocked (Degraded): same, no evacuation",
            with_third(broken(2, "r2", 900, CRASH)),
            step(WaitingReady, "demo-2", "r2", 900),
            "r1",
            Action::DeletePod("demo-2".into()),
            step(Replacing, "demo-2", "r1", 0),
        ),
        (
            "spec change while the old pod terminates: it comes back at the newest revision",
            with_third(terminating(healthy(2, "r1"))),
            step(Replacing, "demo-2", "r2", 20),
            "r3",
            Action::Wait(Wait::Replacing("demo-2".into())),
            step(Replacing, "demo-2", "r3", 0),
        ),
        (
            "spec change after the old pod is gone",
            three("r1")[..2].to_vec(),
            step(Replacing, "demo-2", "r2", 20),
            "r3",
            Action::Wait(Wait::Replacing("demo-2".into())),
            step(Replacing, "demo-2", "r3", 0),
        ),
        (
            "spec change mid-evacuation: evacuate again for the newest revision",
            three("r1"),
            step(Evacuating, "demo-2", "r2", 20),
            "r3",
            Action::Evacuate("demo-2".into()),
            step(Evacuating, "demo-2", "r3", 0),
        ),
        (
            "revert while the replaced pod is already healthy at the reverted-from revision",
            with_third(healthy(2, "r2")),
            step(WaitingReady, "demo-2", "r2", 20),
            "r1",
            Action::Evacuate("demo-2".into()),
            step(Evacuating, "demo-2", "r1", 0),
        ),
        (
            "revert that makes every pod current again: nothing left to do",
            three("r1"),
            step(Evacuating, "demo-2", "r2", 5),
            "r1",
            Action::Idle,
            None,
        ),
    ];
    for (case, pods, recorded, target, action, operation) in cases {
        let p = plan(&rolling(pods, target, recorded));
        assert_eq!(p.action, action, "{case}");
        assert_eq!(p.operation, operation, "{case}");
        assert_eq!(p.statefulset_replicas, 3, "{case}");
    }
}

#[test]
fn reverted_pod_comes_back_and_the_rollout_completes() {
    // After the revert's delete: the pod is recreated at the running revision.
    let recreated = PodView {
        unready_since: Some(ago(2)),
        ..starting(2, "r1", 2)
    };
    let o = rolling(
        with_third(recreated),
        "r1",
        step(Replacing, "demo-2", "r1", 10),
    );
    let p = plan(&o);
    assert_eq!(p.action, Action::Wait(Wait::Joining("demo-2".into())));
    assert_eq!(p.operation, step(WaitingReady, "demo-2", "r1", 0));
    // Ready and joined: converged, the step is cleared (Progressing=False).
    assert_eq!(
        plan(&rolling(three("r1"), "r1", p.operation)),
        Plan {
            statefulset_replicas: 3,
            action: Action::Idle,
            operation: None,
            rebalance: None,
        }
    );
}

/// Scaling during a stuck rollout. (case, observed, expected StatefulSet replicas, expected action)
#[test]
fn scale_during_a_stuck_rollout_table() {
    let stuck = |desired: i32, target: &str, extra: Vec<PodView>| {
        let mut pods = three("r1");
        pods[2] = broken(2, "r2", 400, PULL);
        pods.extend(extra);
        let mut o = observed(pods, target);
        o.desired_replicas = desired;
        o.statefulset_replicas = Some(3);
        o.operation = step(WaitingReady, "demo-2", "r2", 400);
        o
    };
    let cases: Vec<(&str, Observed, i32, Action)> = vec![
        (
            "scale-up is honoured at once; the rollout stays blocked on the bad pod",
            stuck(4, "r2", vec![]),
            4,
            Action::Blocked {
                pod: "demo-2".into(),
                reason: format!("pod demo-2 did not become Ready and join the cluster within 300s ({PULL}); fix the spec to resume"),
            },
        ),
        (
            "scale-up then revert: the newest broken pod is replaced first, at once",
            {
                let mut o = stuck(4, "r1", vec![broken(3, "r2", 30, PULL)]);
                o.statefulset_replicas = Some(4);
                o
            },
            4,
            Action::DeletePod("demo-3".into()),
        ),
        (
            "scale-down removing the broken pod: nothing to drain, shrink now",
            stuck(2, "r2", vec![]),
            2,
            Action::Wait(Wait::Shrinking),
        ),
    ];
    for (case, o, replicas, action) in cases {
        let p = plan(&o);
        assert_eq!(p.statefulset_replicas, replicas, "{case}");
        assert_eq!(p.action, action, "{case}");
    }
}

#[test]
fn the_second_broken_pod_is_replaced_while_the_first_comes_back() {
    // Revert after a scale-up: demo-3 was deleted last time and is terminating; demo-2 is still
    // broken at the old revision and is replaced too, without waiting for demo-3.
    let mut pods = three("r1");
    pods[2] = broken(2, "r2", 60, PULL);
    pods.push(PodView {
        terminating: true,
        ..broken(3, "r2", 30, PULL)
    });
    let mut o = observed(pods, "r1");
    o.desired_replicas = 4;
    o.statefulset_replicas = Some(4);
    o.operation = step(Replacing, "demo-3", "r1", 3);
    let p = plan(&o);
    assert_eq!(p.action, Action::DeletePod("demo-2".into()));
    assert_eq!(
        p.operation,
        step(Replacing, "demo-3", "r1", 3),
        "demo-3's step continues afterwards"
    );
}

#[test]
fn scale_down_with_no_serving_pod_left_holds_and_says_why() {
    let mut o = five();
    for p in o.pods.iter_mut().filter(|p| p.ordinal < 3) {
        *p = broken(p.ordinal, "r1", 30, CRASH);
    }
    let p = plan(&o);
    assert_eq!(p.statefulset_replicas, 5, "held");
    assert!(
        matches!(&p.action, Action::Blocked { pod, reason } if pod == "demo-4" && reason.contains("no remaining pod is Ready")),
        "{:?}",
        p.action
    );
}

/// The operator restarted (its memory is gone; status may or may not hold the step).
#[test]
fn operator_restart_in_the_middle_table() {
    let cases: Vec<RestartCase> = vec![
        (
            "step lost, new pod still starting: wait, take nothing else down",
            with_third(broken(2, "r2", 20, CRASH)),
            None,
            "r2",
            Action::Wait(Wait::ClusterNotReady),
        ),
        (
            "step lost, new pod stuck past the timeout: blocked, naming its container state",
            with_third(broken(2, "r2", 400, CRASH)),
            None,
            "r2",
            Action::Blocked {
                pod: "demo-2".into(),
                reason: format!("pod demo-2 did not become Ready and join the cluster within 300s ({CRASH}); fix the spec to resume"),
            },
        ),
        (
            "step lost and the spec fixed meanwhile: the broken pod is replaced at once",
            with_third(broken(2, "r2", 400, CRASH)),
            None,
            "r3",
            Action::DeletePod("demo-2".into()),
        ),
        (
            "step kept, old pod terminated while the operator was down",
            with_third(PodView {
                unready_since: Some(ago(5)),
                ..starting(2, "r2", 5)
            }),
            step(Replacing, "demo-2", "r2", 40),
            "r2",
            Action::Wait(Wait::Joining("demo-2".into())),
        ),
    ];
    for (case, pods, recorded, target, action) in cases {
        assert_eq!(
            plan(&rolling(pods, target, recorded)).action,
            action,
            "{case}"
        );
    }
}

#[test]
fn a_pod_stuck_on_the_current_revision_is_reported_even_with_nothing_to_roll() {
    let mut pods = three("r1");
    pods[1] = broken(1, "r1", 301, CRASH);
    let p = plan(&observed(pods, "r1"));
    assert!(
        matches!(&p.action, Action::Blocked { pod, reason } if pod == "demo-1" && reason.contains("CrashLoopBackOff")),
        "{:?}",
        p.action
    );
    // A long-lived pod that restarted 10 s ago is starting, not stuck.
    let mut pods = three("r1");
    pods[1] = PodView {
        created: Some(ago(86_400)),
        ..broken(1, "r1", 10, CRASH)
    };
    assert_eq!(
        plan(&observed(pods, "r1")).action,
        Action::Wait(Wait::ClusterNotReady)
    );
}

#[test]
fn a_dead_member_is_not_counted_as_joined() {
    // demo-1's pod is Ready, but the broker that answered lists it dead (the member states the
    // broker really sends): no other pod is taken down meanwhile.
    let view: crate::podtalk::ClusterView = serde_json::from_str(
        r#"{"node":"demo-0","members":[{"name":"demo-0","state":"self"},{"name":"demo-1","state":"dead"},{"name":"demo-2","state":"ready"}]}"#,
    )
    .expect("view");
    let mut pods = three("r1");
    for p in pods.iter_mut() {
        p.joined = None;
    }
    crate::observe::apply_cluster_view(&mut pods, Some(&view), &[]);
    assert_eq!(pods[1].joined, Some(false));
    let p = plan(&observed(pods, "r2"));
    assert_eq!(p.action, Action::Wait(Wait::ClusterNotReady));
}

#[test]
fn a_broker_that_does_not_answer_counts_as_not_joined() {
    let view: crate::podtalk::ClusterView = serde_json::from_str(
        r#"{"node":"demo-1","members":[{"name":"demo-0","state":"ready"},{"name":"demo-1","state":"self"},{"name":"demo-2","state":"ready"}]}"#,
    )
    .expect("view");
    let mut pods = three("r1");
    let members = crate::observe::apply_cluster_view(&mut pods, Some(&view), &["demo-0".into()]);
    assert_eq!(members.len(), 3);
    assert_eq!(
        pods.iter().map(|p| p.joined).collect::<Vec<_>>(),
        vec![Some(false), Some(true), Some(true)]
    );
    assert_eq!(
        plan(&observed(pods.clone(), "r2")).action,
        Action::Wait(Wait::ClusterNotReady),
        "no evacuation while a member cannot be reached"
    );
    // Nobody answered: membership unknown, Ready decides (the broker's /readyz means joined).
    let mut pods = three("r1");
    for p in pods.iter_mut() {
        p.joined = None;
    }
    assert!(crate::observe::apply_cluster_view(&mut pods, None, &["demo-0".into()]).is_empty());
    assert_eq!(
        plan(&observed(pods, "r2")).action,
        Action::Evacuate("demo-2".into())
    );
}
