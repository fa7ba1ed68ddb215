//! The reconcile pipeline and its wiring into kube's runtime Controller:
//! read → validate → plan → build → apply → act → status. Only `observe`, `apply`, `act` and the
//! status patch talk to the API server; everything in between is pure and unit-tested.
//!
//! A reconcile never wedges and never hides a failure: every admin call to a broker is bounded,
//! the whole reconcile has a deadline, and every way out — success, an invalid spec, a failed
//! read, apply or admin call, a timeout — writes status (`ReconcileSuccess=False` with the error
//! when something failed) and an Event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corvid_crds::{MqttCluster, MqttClusterStatus};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::apply;
use crate::build::names::{Names, FIELD_MANAGER, INSTANCE_LABEL};
use crate::build::statefulset::{GRACE_MARGIN_SECONDS, PRE_STOP_SLEEP_SECONDS};
use crate::build::{self, secret, BuildInputs};
use crate::error::{Error, Result};
use crate::expand;
use crate::metrics::Metrics;
use crate::observe::{observe, Observation};
use crate::planner::{self, Action, Observed, Plan, Wait};
use crate::podtalk::{bounded, BrokerAdmin};
use crate::rotation;
use crate::status::{self, StatusInputs};
use crate::validate::validate;
use crate::watched;

/// Shared state of all reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Broker admin API access.
    pub admin: Arc<dyn BrokerAdmin>,
    /// Event publisher.
    pub recorder: Recorder,
    /// Reconcile metrics.
    pub metrics: Metrics,
    /// Consecutive failures per object, for the backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Namespace the operator runs in (its admin calls come from there; see the NetworkPolicy).
    pub operator_namespace: String,
}

/// The longest a whole reconcile may take. Broker calls are bounded far below this
/// (`podtalk::ADMIN_CALL_TIMEOUT`); this catches an API call that hangs.
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(90);

/// The longest the status write or an Event may take after a failed or timed-out reconcile.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

impl Context {
    async fn event(&self, cluster: &MqttCluster, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: reason.to_string(),
            secondary: None,
        };
        let reference = cluster.object_ref(&());
        let publish = self.recorder.publish(&event, &reference);
        match tokio::time::timeout(REPORT_TIMEOUT, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, reason, "publishing event failed"),
            Err(_) => tracing::warn!(reason, "publishing event timed out"),
        }
    }
}

fn key(cluster: &MqttCluster) -> String {
    format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    )
}

/// Reconciles one MqttCluster, recording metrics.
pub async fn reconcile(cluster: Arc<MqttCluster>, ctx: Arc<Context>) -> Result<Requeue> {
    let timer = ctx
        .metrics
        .duration
        .with_label_values(&[] as &[&str])
        .start_timer();
    let result =
        match tokio::time::timeout(RECONCILE_TIMEOUT, reconcile_pipeline(&cluster, &ctx)).await {
            Ok(result) => result,
            Err(_) => {
                let error = Error::Timeout(RECONCILE_TIMEOUT);
                report_failure(&ctx, &cluster, &error).await;
                Err(error)
            }
        };
    timer.observe_duration();
    match &result {
        Ok(_) => {
            ctx.metrics.reconciles.with_label_values(&["success"]).inc();
            if let Ok(mut failures) = ctx.failures.lock() {
                failures.remove(&key(&cluster));
            }
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            ctx.metrics.errors.with_label_values(&[e.reason()]).inc();
        }
    }
    result
}

/// Invalid objects wait for a change; everything else retries with exponential backoff (5 s → 5 min).
pub fn error_policy(cluster: Arc<MqttCluster>, error: &Error, ctx: Arc<Context>) -> Requeue {
    tracing::warn!(cluster = %key(&cluster), reason = error.reason(), error = %error, "reconcile failed");
    if matches!(error, Error::InvalidSpec(_)) {
        return Requeue::await_change();
    }
    // An unreachable broker must not slow a rollout down past its own bounds: the planner's drain
    // timeout decides when to move on, so look again soon.
    if matches!(error, Error::PodTalk(_)) {
        return Requeue::requeue(Duration::from_secs(5));
    }
    let attempts = match ctx.failures.lock() {
        Ok(mut failures) => {
            let n = failures.entry(key(&cluster)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    Requeue::requeue(backoff(attempts))
}

/// Delay before retry number `attempts`.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs((5u64 << attempts.saturating_sub(1).min(6)).min(300))
}

/// How soon to look again after a successful reconcile.
pub fn requeue_after(action: &Action) -> Duration {
    match action {
        Action::Idle => Duration::from_secs(300),
        Action::Paused => Duration::from_secs(60),
        Action::Blocked { .. } => Duration::from_secs(30),
        Action::Evacuate(_) | Action::DeletePod(_) | Action::Wait(_) | Action::Rebalance(_) => {
            Duration::from_secs(5)
        }
    }
}

/// The annotation that stops every write the operator makes for one cluster (objects, status,
/// events, broker calls) until it is removed or set to anything but `"true"`: for hand repairs
/// and investigations, as other operators offer.
pub const PAUSED_ANNOTATION: &str = "corvid.dev/paused";

/// Whether `cluster` carries `corvid.dev/paused: "true"`.
pub fn paused(cluster: &MqttCluster) -> bool {
    cluster
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PAUSED_ANNOTATION))
        .is_some_and(|v| v == "true")
}

async fn reconcile_pipeline(cluster: &MqttCluster, ctx: &Context) -> Result<Requeue> {
    let names = Names::of(cluster);
    if names.namespace.is_empty() {
        return Err(Error::MissingNamespace);
    }
    if paused(cluster) {
        // Removing the annotation is a change to the object, which wakes the controller.
        tracing::info!(cluster = %names.cluster, namespace = %names.namespace, "paused by the corvid.dev/paused annotation; nothing is written");
        // The pause itself is the one thing recorded, once: status and an event say so.
        if !status::shows_paused(cluster.status.as_ref()) {
            ctx.event(
                cluster,
                EventType::Normal,
                "Paused",
                format!("{PAUSED_ANNOTATION} is \"true\": reconciling stopped"),
            )
            .await;
            let new = status::paused(cluster.status.as_ref(), jiff::Timestamp::now());
            patch_status(ctx, &names, &new).await?;
        }
        return Ok(Requeue::await_change());
    }
    if status::shows_paused(cluster.status.as_ref()) {
        ctx.event(
            cluster,
            EventType::Normal,
            "Resumed",
            format!("{PAUSED_ANNOTATION} removed: reconciling again"),
        )
        .await;
    }
    let observation = match observe(&ctx.client, ctx.admin.as_ref(), cluster, &names).await {
        Ok(observation) => observation,
        Err(error) => {
            report_failure(ctx, cluster, &error).await;
            return Err(error);
        }
    };
    let valid = match validate(cluster) {
        Ok(valid) => valid,
        Err(invalid) => {
            // Refusing a generation is acting on it: observedGeneration moves.
            write_status(
                ctx,
                cluster,
                &names,
                &observation,
                Written {
                    generation: cluster.metadata.generation,
                    plan: None,
                    error: Some(("InvalidSpec", invalid.0.clone())),
                    endpoint: None,
                },
            )
            .await?;
            return Err(Error::InvalidSpec(invalid));
        }
    };

    // The replica count is decided before the apply (a scale-down holds it until pods drained).
    let pre = planner::plan(&planner_input(
        cluster,
        &observation,
        observation.statefulset.as_ref(),
    ));
    let desired = build::desired(
        cluster,
        &valid,
        &BuildInputs {
            statefulset_replicas: pre.statefulset_replicas,
            service_monitor_crd: observation.service_monitor_crd,
            prometheus_rule_crd: observation.prometheus_rule_crd,
            operator_namespace: ctx.operator_namespace.clone(),
        },
    );
    let current = observation
        .statefulset
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let outcome = apply_and_act(ctx, cluster, &names, &desired, &observation).await;
    let mut rotating = false;
    // The generation was acted on once its objects were applied.
    let previous_generation = cluster.status.as_ref().and_then(|s| s.observed_generation);
    let (plan, endpoint, error, generation) = match outcome {
        Ok(Acted {
            plan,
            endpoint,
            error,
            rotating: r,
        }) => {
            rotating = r;
            (plan, endpoint, error, cluster.metadata.generation)
        }
        // Nothing was done to pods: keep the recorded step as it was, and a rebalance that was
        // due but not requested.
        Err(e) => {
            let kept = cluster.status.as_ref().and_then(|s| s.operation.clone());
            let rebalance = match &pre.action {
                Action::Rebalance(_) => cluster
                    .status
                    .as_ref()
                    .and_then(|s| s.pending_rebalance.clone()),
                _ => pre.rebalance.clone(),
            };
            (
                Plan {
                    operation: kept,
                    rebalance,
                    ..pre.clone()
                },
                None,
                Some(e),
                previous_generation,
            )
        }
    };
    if error.is_none() {
        scale_event(ctx, cluster, current, pre.statefulset_replicas).await;
    }
    let error_note = error.as_ref().map(|e| (e.reason(), e.to_string()));
    write_status(
        ctx,
        cluster,
        &names,
        &observation,
        Written {
            generation,
            plan: Some(&plan),
            error: error_note,
            endpoint,
        },
    )
    .await?;
    match error {
        Some(e) => Err(e),
        None if rotating => Ok(Requeue::requeue(
            requeue_after(&plan.action).min(ROTATION_RECHECK),
        )),
        None => Ok(Requeue::requeue(requeue_after(&plan.action))),
    }
}

/// How soon a reconcile looks again while a cluster secret rotation runs.
const ROTATION_RECHECK: Duration = Duration::from_secs(10);

/// Result of the apply and act steps once the objects were applied.
struct Acted {
    /// The pod-level decision (recorded in status even when acting on it failed).
    plan: Plan,
    /// Client endpoint.
    endpoint: Option<String>,
    /// Failure of the act step.
    error: Option<Error>,
    /// Whether a cluster secret rotation is running (look again soon).
    rotating: bool,
}

async fn apply_and_act(
    ctx: &Context,
    cluster: &MqttCluster,
    names: &Names,
    desired: &build::Desired,
    observation: &Observation,
) -> Result<Acted> {
    let ns = names.namespace.as_str();
    let key_material: [u8; 32] = rand::random();
    let token_material: [u8; 32] = rand::random();
    // Created once: an existing Secret is never replaced, so neither key rotates by accident.
    let once = [
        (
            secret::build(cluster, names, &key_material),
            "ClusterSecretCreated",
            names.cluster_secret(),
        ),
        (
            secret::admin_token(cluster, names, &token_material),
            "AdminTokenCreated",
            names.admin_token_secret(),
        ),
    ];
    for (secret, reason, name) in once {
        if apply::create_secret_once(&ctx.client, ns, &secret).await? {
            ctx.event(cluster, EventType::Normal, reason, name).await;
        }
    }
    let rotating = rotate_cluster_secret(ctx, cluster, names, observation).await;
    let (kept, expansion_error) = grow_volumes(ctx, cluster, names, desired, observation).await?;
    let desired = kept.as_ref().unwrap_or(desired);
    let client_service = apply::apply_all(&ctx.client, names, desired).await?;
    for gone in apply::prune(&ctx.client, names, desired).await? {
        ctx.event(
            cluster,
            EventType::Normal,
            "Pruned",
            format!("deleted {gone}, no longer wanted by the spec"),
        )
        .await;
    }
    // Plan the pod step against the StatefulSet as stored after this apply; a revision the
    // StatefulSet controller has not caught up with yet is treated as unknown.
    let applied = Api::<StatefulSet>::namespaced(ctx.client.clone(), ns)
        .get_opt(&names.statefulset())
        .await
        .map_err(|source| Error::Read {
            what: "StatefulSet".to_string(),
            source,
        })?;
    let plan = planner::plan(&planner_input(cluster, observation, applied.as_ref()));
    let error = act(ctx, cluster, names, &plan, observation)
        .await
        .err()
        .or(expansion_error);
    Ok(Acted {
        plan,
        endpoint: endpoint(&client_service, names),
        error,
        rotating,
    })
}

/// Grows the claims and re-creates the StatefulSet when spec.persistence.size grew (see
/// `expand`). When that is refused, returns the desired objects with the StatefulSet's claim
/// template as stored, and the refusal, reported once the rest was applied.
async fn grow_volumes(
    ctx: &Context,
    cluster: &MqttCluster,
    names: &Names,
    desired: &build::Desired,
    observation: &Observation,
) -> Result<(Option<build::Desired>, Option<Error>)> {
    let Some(sts) = observation
        .statefulset
        .as_ref()
        .filter(|s| expand::wanted(cluster, Some(s)))
    else {
        return Ok((None, None));
    };
    let done = expand::run(&ctx.client, cluster, names, sts).await?;
    let size = &cluster.spec.persistence.size;
    for claim in &done.grown {
        ctx.event(
            cluster,
            EventType::Normal,
            "VolumeExpansion",
            format!("asked PersistentVolumeClaim {claim} to grow to {size}"),
        )
        .await;
    }
    if done.recreated {
        ctx.event(
            cluster,
            EventType::Normal,
            "StatefulSetRecreated",
            format!(
                "deleted StatefulSet {} with propagationPolicy Orphan (pods and claims kept) to \
                 apply it again with volumeClaimTemplates of {size}",
                names.statefulset()
            ),
        )
        .await;
    }
    let Some(why) = done.refused else {
        return Ok((None, None));
    };
    ctx.event(
        cluster,
        EventType::Warning,
        "VolumeExpansionRefused",
        why.clone(),
    )
    .await;
    let mut kept = desired.clone();
    expand::keep_claim_template(&mut kept.statefulset, sts);
    Ok((Some(kept), Some(Error::VolumeExpansion(why))))
}

/// One step of a cluster secret rotation (`corvid.dev/rotate-cluster-secret`); returns whether
/// one is still running. A failed step is logged and retried: it never holds up the rest of the
/// reconcile (the brokers keep whatever keys the Secret holds).
async fn rotate_cluster_secret(
    ctx: &Context,
    cluster: &MqttCluster,
    names: &Names,
    observation: &Observation,
) -> bool {
    use rotation::{Phase, Step};
    match rotation::step(&ctx.client, ctx.admin.as_ref(), cluster, names, observation).await {
        Ok(Step::Nothing) => false,
        Ok(Step::Wait(why)) => {
            tracing::info!(cluster = %names.cluster, namespace = %names.namespace, waiting_for = %why, "cluster secret rotation");
            true
        }
        Ok(Step::Write { phase, .. }) => {
            let note = match phase {
                Phase::Install => "phase 1 of 3: every broker now also accepts a new secret",
                Phase::Use => "phase 2 of 3: every broker now sends with the new secret and still accepts the old",
                Phase::Done => "phase 3 of 3: the old secret was removed; rotation complete",
            };
            ctx.event(
                cluster,
                EventType::Normal,
                "ClusterSecretRotation",
                note.to_string(),
            )
            .await;
            phase != Phase::Done
        }
        Err(e) => {
            tracing::warn!(cluster = %names.cluster, namespace = %names.namespace, error = %e, "cluster secret rotation step failed; retried soon");
            true
        }
    }
}

/// An Event when this reconcile changed the StatefulSet's size.
async fn scale_event(ctx: &Context, cluster: &MqttCluster, before: Option<i32>, after: i32) {
    match before {
        Some(before) if after < before => {
            let note = format!("leaving pods drained; scaled from {before} to {after}");
            ctx.event(cluster, EventType::Normal, "ScaledDown", note)
                .await;
        }
        Some(before) if after > before => {
            let note = format!("scaled from {before} to {after}; new pods join the cluster");
            ctx.event(cluster, EventType::Normal, "ScaledUp", note)
                .await;
        }
        _ => {}
    }
}

/// The planner's input from the observation and a StatefulSet.
pub fn planner_input(
    cluster: &MqttCluster,
    observation: &Observation,
    sts: Option<&StatefulSet>,
) -> Observed {
    let strategy = &cluster.spec.upgrade_strategy;
    let settled = sts.is_some_and(|s| {
        s.status.as_ref().and_then(|st| st.observed_generation) >= s.metadata.generation
    });
    Observed {
        desired_replicas: cluster.spec.replicas,
        statefulset_replicas: sts.and_then(|s| s.spec.as_ref()).and_then(|s| s.replicas),
        // The StatefulSet as read before this reconcile's apply, for both plans.
        replicas_before: observation
            .statefulset
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.replicas),
        rebalance_enabled: cluster.spec.rebalance.enabled,
        pending_rebalance: cluster
            .status
            .as_ref()
            .and_then(|s| s.pending_rebalance.clone()),
        update_revision: if settled {
            sts.and_then(|s| s.status.as_ref())
                .and_then(|s| s.update_revision.clone())
        } else {
            None
        },
        pods: observation.pods.clone(),
        operation: cluster.status.as_ref().and_then(|s| s.operation.clone()),
        paused: strategy.paused,
        drain_timeout_seconds: i64::from(strategy.drain_timeout_seconds),
        ready_timeout_seconds: i64::from(strategy.ready_timeout_seconds),
        grace_period_seconds: i64::from(strategy.drain_timeout_seconds)
            + PRE_STOP_SLEEP_SECONDS
            + GRACE_MARGIN_SECONDS,
        now: jiff::Timestamp::now(),
    }
}

/// Client endpoint: the load balancer's address, or the Service's cluster DNS name.
pub fn endpoint(service: &Service, names: &Names) -> Option<String> {
    let lb = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    if let Some(ingress) = lb.and_then(|i| i.first()) {
        return ingress.hostname.clone().or_else(|| ingress.ip.clone());
    }
    let is_lb = service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
    (!is_lb).then(|| format!("{}.{}.svc", names.client_service(), names.namespace))
}

async fn act(
    ctx: &Context,
    cluster: &MqttCluster,
    names: &Names,
    plan: &Plan,
    observation: &Observation,
) -> Result<()> {
    let ns = names.namespace.as_str();
    match &plan.action {
        Action::Evacuate(pod) => {
            let rate = cluster.spec.upgrade_strategy.evacuation_rate;
            // Addressed to the instance observed, not just the name: a request that arrives
            // (or is retried) after the pod was replaced is refused by the new pod.
            let uid = observation
                .pods
                .iter()
                .find(|p| p.name == *pod)
                .and_then(|p| p.uid.as_deref());
            bounded(pod, ctx.admin.evacuate(ns, pod, uid, rate)).await?;
            tracing::info!(cluster = %key(cluster), pod, rate, "evacuation requested");
            ctx.event(
                cluster,
                EventType::Normal,
                "Evacuating",
                format!("asked {pod} to move its clients away at {rate}/s"),
            )
            .await;
        }
        Action::DeletePod(pod) => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
            match pods.delete(pod, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(source) => {
                    return Err(Error::Apply {
                        what: format!("deleting pod {pod}"),
                        source,
                    })
                }
            }
            tracing::info!(cluster = %key(cluster), pod, "pod replaced");
            ctx.event(
                cluster,
                EventType::Normal,
                "ReplacingPod",
                format!("deleted {pod} to recreate it at the new revision"),
            )
            .await;
        }
        Action::Blocked { pod, reason } => {
            tracing::warn!(cluster = %key(cluster), pod, reason, "rollout blocked");
            ctx.event(
                cluster,
                EventType::Warning,
                "RolloutBlocked",
                reason.clone(),
            )
            .await;
        }
        Action::Wait(Wait::Shrinking) => {
            let to = plan.statefulset_replicas;
            ctx.event(
                cluster,
                EventType::Normal,
                "ScaledDown",
                format!("leaving pods drained; scaling to {to}"),
            )
            .await;
        }
        Action::Idle => converged(ctx, cluster, names, observation).await,
        Action::Rebalance(pods) => {
            // The cluster converged this very reconcile: the same checks as when idle.
            converged(ctx, cluster, names, observation).await;
            let rate = cluster.spec.rebalance.rate;
            // Best effort: each broker also checks its balance on its own every few seconds
            // (`cluster.rebalance.enabled`), so a pod that misses the request still sheds.
            // Asked all at once, each call bounded: a silent pod costs one deadline, not one each.
            let answers = futures::future::join_all(
                pods.iter()
                    .map(|pod| bounded(pod, ctx.admin.rebalance(ns, pod, rate))),
            )
            .await;
            let mut asked = Vec::new();
            let mut failed = Vec::new();
            for (pod, answer) in pods.iter().zip(answers) {
                match answer {
                    Ok(()) => asked.push(pod.as_str()),
                    Err(e) => {
                        tracing::warn!(cluster = %key(cluster), pod, error = %e, "rebalance request failed");
                        failed.push(pod.as_str());
                    }
                }
            }
            tracing::info!(cluster = %key(cluster), ?asked, ?failed, rate, "rebalance requested after scale-up");
            let mut note =
                format!(
                "scale-up complete; asked {} to shed connections to the new pods at up to {rate}/s",
                if asked.is_empty() { "no pod".to_string() } else { asked.join(", ") }
            );
            if !failed.is_empty() {
                note.push_str(&format!(
                    " ({} unreachable; they rebalance on their own)",
                    failed.join(", ")
                ));
            }
            ctx.event(cluster, EventType::Normal, "Rebalancing", note)
                .await;
        }
        Action::Wait(_) | Action::Paused => {}
    }
    Ok(())
}

/// What to check and announce once every pod runs the desired revision at the desired size.
async fn converged(ctx: &Context, cluster: &MqttCluster, names: &Names, observation: &Observation) {
    // Scale-downs must not leave ghosts: members whose pod is gone for good.
    for ghost in status::stale_members(
        &observation.members,
        &observation.pods,
        &names.statefulset(),
        cluster.spec.replicas,
    ) {
        let note = format!("{ghost} is still listed as a cluster member after its pod was removed");
        ctx.event(cluster, EventType::Warning, "StaleMember", note)
            .await;
    }
    let was_progressing = cluster.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == status::PROGRESSING && c.status == "True")
    });
    if was_progressing {
        ctx.event(
            cluster,
            EventType::Normal,
            "RolloutComplete",
            format!("all pods run version {}", cluster.spec.version),
        )
        .await;
    }
}

/// What this reconcile writes into status besides the observation.
struct Written<'a> {
    /// The generation the status describes (see `StatusInputs::generation`).
    generation: Option<i64>,
    /// The planner's decision (None when the spec was invalid).
    plan: Option<&'a Plan>,
    /// A failure of this reconcile: (reason, message); also sent as a Warning event.
    error: Option<(&'a str, String)>,
    /// Client endpoint, when known.
    endpoint: Option<String>,
}

/// Writes the status for this reconcile, after a Warning event for its failure if it failed.
async fn write_status(
    ctx: &Context,
    cluster: &MqttCluster,
    names: &Names,
    observation: &Observation,
    written: Written<'_>,
) -> Result<()> {
    if let Some((reason, message)) = &written.error {
        ctx.event(cluster, EventType::Warning, reason, message.clone())
            .await;
    }
    let update_revision = observation
        .statefulset
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.update_revision.as_deref());
    let previous: Option<&MqttClusterStatus> = cluster.status.as_ref();
    let new = status::compute(&StatusInputs {
        generation: written.generation,
        previous,
        desired_replicas: cluster.spec.replicas,
        max_unavailable: cluster.spec.pod_disruption_budget.max_unavailable,
        pods: &observation.pods,
        update_revision,
        target_version: &cluster.spec.version,
        plan: written.plan,
        error: written.error,
        members: observation.members.clone(),
        endpoint: written
            .endpoint
            .or_else(|| previous.and_then(|p| p.endpoint.clone())),
        selector: names.selector_string(),
        now: jiff::Timestamp::now(),
    });
    patch_status(ctx, names, &new).await
}

async fn patch_status(ctx: &Context, names: &Names, new: &MqttClusterStatus) -> Result<()> {
    let patch =
        json!({ "apiVersion": "corvid.dev/v1alpha1", "kind": "MqttCluster", "status": new });
    Api::<MqttCluster>::namespaced(ctx.client.clone(), &names.namespace)
        .patch_status(
            &names.cluster,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Status)?;
    Ok(())
}

/// Records a reconcile that failed before it could decide anything (a failed read, a
/// timeout): a Warning Event and `ReconcileSuccess=False` with the error, everything else in
/// status as it was. Best effort and bounded: the error itself is returned by the caller.
async fn report_failure(ctx: &Context, cluster: &MqttCluster, error: &Error) {
    let names = Names::of(cluster);
    if names.namespace.is_empty() {
        return;
    }
    ctx.event(
        cluster,
        EventType::Warning,
        error.reason(),
        error.to_string(),
    )
    .await;
    let new = status::failed(
        cluster.status.as_ref(),
        error.reason(),
        error.to_string(),
        jiff::Timestamp::now(),
    );
    match tokio::time::timeout(REPORT_TIMEOUT, patch_status(ctx, &names, &new)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(cluster = %key(cluster), error = %e, "could not record the failure in status")
        }
        Err(_) => {
            tracing::warn!(cluster = %key(cluster), "recording the failure in status timed out")
        }
    }
}

/// An Api over one namespace, or over all of them.
fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// An Api over one namespace, or over all of them, for a dynamic kind.
fn scoped_dynamic(
    client: &Client,
    namespace: &Option<String>,
    ar: &ApiResource,
) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// Runs the controller over `namespaces` (all namespaces when empty) until shutdown.
///
/// Every kind the operator applies is watched (see `watched`), so drift in any owned object
/// is corrected within seconds; the optional kinds only when their API is served at start.
pub async fn run(ctx: Arc<Context>, namespaces: Vec<String>) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let optional = watched::served_optional_kinds(&ctx.client).await;
    let controllers = scopes.into_iter().map(|ns| {
        let client = ctx.client.clone();
        let owned = watched::owned_config();
        let mut controller = Controller::new(
            scoped::<MqttCluster>(&client, &ns),
            watcher::Config::default().any_semantic(),
        )
        .owns(scoped::<StatefulSet>(&client, &ns), owned.clone())
        .owns(scoped::<Service>(&client, &ns), owned.clone())
        .owns(scoped::<ConfigMap>(&client, &ns), owned.clone())
        .owns(scoped::<ServiceAccount>(&client, &ns), owned.clone())
        .owns(scoped::<Role>(&client, &ns), owned.clone())
        .owns(scoped::<RoleBinding>(&client, &ns), owned.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, &ns), owned.clone())
        .owns(scoped::<NetworkPolicy>(&client, &ns), owned.clone());
        for ar in &optional {
            controller =
                controller.owns_with(scoped_dynamic(&client, &ns, ar), ar.clone(), owned.clone());
        }
        controller
            // Pods belong to the StatefulSet, not to the MqttCluster: map them back by label.
            .watches(scoped::<Pod>(&client, &ns), owned, |pod: Pod| {
                let ns = pod.namespace()?;
                let cluster = pod.labels().get(INSTANCE_LABEL)?.clone();
                Some(ObjectRef::<MqttCluster>::new(&cluster).within(&ns))
            })
            .shutdown_on_signal()
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                match result {
                    Ok((obj, _)) => tracing::debug!(cluster = %obj.name, "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile attempt failed"),
                }
            })
    });
    futures::future::join_all(controllers).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }

    #[test]
    fn requeue_is_fast_while_acting_and_slow_when_idle() {
        assert_eq!(
            requeue_after(&Action::Evacuate("p".into())),
            Duration::from_secs(5)
        );
        assert_eq!(requeue_after(&Action::Idle), Duration::from_secs(300));
    }

    #[test]
    fn endpoint_prefers_the_load_balancer_address() {
        let names = Names {
            cluster: "demo".into(),
            namespace: "mqtt".into(),
        };
        let lb: Service = serde_json::from_value(json!({"spec": {"type": "LoadBalancer"},
            "status": {"loadBalancer": {"ingress": [{"hostname": "abc.elb.amazonaws.com"}]}}}))
        .expect("svc");
        assert_eq!(
            endpoint(&lb, &names).as_deref(),
            Some("abc.elb.amazonaws.com")
        );
        let pending: Service =
            serde_json::from_value(json!({"spec": {"type": "LoadBalancer"}})).expect("svc");
        assert_eq!(endpoint(&pending, &names), None);
        let internal: Service =
            serde_json::from_value(json!({"spec": {"type": "ClusterIP"}})).expect("svc");
        assert_eq!(
            endpoint(&internal, &names).as_deref(),
            Some("demo.mqtt.svc")
        );
    }
}
