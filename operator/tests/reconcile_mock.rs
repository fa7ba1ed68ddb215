//! The reconcile pipeline against a fake API server: which calls it makes, with which field
//! manager, and what it writes to status. Real API server tests live in e2e/.

use std::sync::{Arc, Mutex};

use corvid_crds::MqttCluster;
use corvid_operator::controller::{error_policy, reconcile, Context};
use corvid_operator::metrics::Metrics;
use corvid_operator::podtalk::{BrokerAdmin, ClusterView, EvacuationStatus, PodTalkError};
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use serde_json::{json, Value};

/// One request the operator made.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    uri: String,
    body: Value,
}

/// Answers like an empty cluster without cert-manager or Prometheus Operator: objects do not
/// exist yet, lists are empty, writes echo their body.
fn respond(call: &Call) -> (StatusCode, Value) {
    let path = call.uri.split('?').next().unwrap_or_default();
    let missing = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"});
    match call.method.as_str() {
        "GET" if path.contains("cert-manager.io") || path.contains("monitoring.coreos.com") => {
            (StatusCode::NOT_FOUND, missing)
        }
        "GET"
            if path.ends_with("/pods")
                || path.ends_with("/services")
                || path.ends_with("/poddisruptionbudgets")
                || path.ends_with("/networkpolicies") =>
        {
            (
                StatusCode::OK,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []}),
            )
        }
        "GET" => (StatusCode::NOT_FOUND, missing),
        "POST" => (StatusCode::CREATED, call.body.clone()),
        // A status patch carries only status; the stored object also has metadata and spec.
        "PATCH" if path.ends_with("/status") => {
            let mut stored = call.body.clone();
            stored["metadata"] = json!({"name": "demo", "namespace": "mqtt"});
            stored["spec"] = json!({});
            (StatusCode::OK, stored)
        }
        _ => (StatusCode::OK, call.body.clone()),
    }
}

fn fake_client() -> (Client, Arc<Mutex<Vec<Call>>>) {
    fake_client_with(|_| None)
}

/// A fake API server where `answer` overrides `respond` for the calls it returns Some for.
fn fake_client_with(
    answer: fn(&Call) -> Option<(StatusCode, Value)>,
) -> (Client, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let log = log.clone();
        async move {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect_bytes().await?;
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let call = Call { method, uri, body };
            let (status, answer) = answer(&call).unwrap_or_else(|| respond(&call));
            log.lock().expect("log").push(call);
            let response = Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer)?))?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(response)
        }
    });
    (Client::new(service, "default"), calls)
}

/// Implements every `BrokerAdmin` call of `$ty` as `$answer`, with the call's name bound to
/// `$what` and the pod to `$pod`.
macro_rules! broker_admin {
    ($ty:ty, |$what:ident, $pod:ident| $answer:expr) => {
        impl BrokerAdmin for $ty {
            fn evacuate<'a>(
                &'a self,
                _: &'a str,
                $pod: &'a str,
                _: Option<&'a str>,
                _: i32,
            ) -> BoxFuture<'a, Result<(), PodTalkError>> {
                let $what = "evacuate";
                $answer
            }
            fn evacuation<'a>(
                &'a self,
                _: &'a str,
                $pod: &'a str,
            ) -> BoxFuture<'a, Result<EvacuationStatus, PodTalkError>> {
                let $what = "evacuation query";
                $answer
            }
            fn cluster<'a>(
                &'a self,
                _: &'a str,
                $pod: &'a str,
            ) -> BoxFuture<'a, Result<ClusterView, PodTalkError>> {
                let $what = "cluster query";
                $answer
            }
            fn rebalance<'a>(
                &'a self,
                _: &'a str,
                $pod: &'a str,
                _: i32,
            ) -> BoxFuture<'a, Result<(), PodTalkError>> {
                let $what = "rebalance request";
                $answer
            }
        }
    };
}

/// Broker admin that nobody should call in these scenarios (no pods exist).
struct NoBrokers;

broker_admin!(NoBrokers, |what, pod| panic!("unexpected {what} for {pod}"));

/// Brokers whose admin API never answers (the pod proxy waits on a pod that is gone).
struct SilentBrokers;

broker_admin!(SilentBrokers, |_what, _pod| Box::pin(
    futures::future::pending()
));

fn context(client: Client) -> Arc<Context> {
    context_with(client, Arc::new(NoBrokers))
}

fn context_with(client: Client, admin: Arc<dyn BrokerAdmin>) -> Arc<Context> {
    Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "corvid-operator".into(),
                instance: None,
            },
        ),
        client,
        admin,
        metrics: Metrics::new().expect("metrics"),
        failures: Mutex::new(Default::default()),
        operator_namespace: "corvid-system".to_string(),
    })
}

fn cluster(spec: Value) -> Arc<MqttCluster> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "corvid.dev/v1alpha1", "kind": "MqttCluster",
            "metadata": {"name": "demo", "namespace": "mqtt", "uid": "u1", "generation": 2},
            "spec": spec,
        }))
        .expect("cluster"),
    )
}

fn status_patch(calls: &[Call]) -> Value {
    let call = calls
        .iter()
        .rev()
        .find(|c| c.uri.contains("/mqttclusters/demo/status"))
        .expect("status was written");
    assert_eq!(call.method, "PATCH");
    assert!(
        call.uri.contains("fieldManager=corvid-operator") && call.uri.contains("force=true"),
        "{}",
        call.uri
    );
    call.body["status"].clone()
}

fn condition(status: &Value, type_: &str) -> (String, String) {
    let c = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .expect("condition");
    (
        c["status"].as_str().unwrap_or_default().to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn first_reconcile_creates_every_object_with_server_side_apply() {
    let (client, calls) = fake_client();
    let ctx = context(client);
    let action = reconcile(cluster(json!({})), ctx.clone())
        .await
        .expect("reconcile succeeds");
    assert_eq!(
        action,
        Action::requeue(std::time::Duration::from_secs(5)),
        "pods are still to come"
    );
    let calls = calls.lock().expect("calls").clone();

    let applied: Vec<&str> = calls
        .iter()
        .filter(|c| c.method == "PATCH" && !c.uri.contains("/status"))
        .map(|c| {
            assert!(
                c.uri.contains("fieldManager=corvid-operator") && c.uri.contains("force=true"),
                "{}",
                c.uri
            );
            c.body["kind"].as_str().unwrap_or_default()
        })
        .collect();
    for kind in [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(applied.contains(&kind), "{kind} applied; got {applied:?}");
    }
    let secret = calls
        .iter()
        .find(|c| c.method == "POST" && c.uri.contains("/secrets"))
        .expect("cluster secret created");
    assert_eq!(secret.body["metadata"]["name"], "demo-cluster-secret");
    assert!(
        !calls.iter().any(|c| c.method == "DELETE"),
        "nothing to prune or replace"
    );

    let status = status_patch(&calls);
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(
        condition(&status, "ReconcileSuccess"),
        ("True".into(), "Reconciled".into())
    );
    assert_eq!(
        condition(&status, "Available"),
        ("False".into(), "NotEnoughReplicas".into())
    );
    assert_eq!(condition(&status, "Progressing").0, "True");
    assert_eq!(status["targetVersion"], corvid_crds::DEFAULT_BROKER_VERSION);
    assert_eq!(status["endpoint"], "demo.mqtt.svc");
}

/// The NetworkPolicy an earlier reconcile applied, listed by the cluster's instance label.
fn existing_network_policy(call: &Call) -> Option<(StatusCode, Value)> {
    let path = call.uri.split('?').next().unwrap_or_default();
    (call.method == "GET" && path.ends_with("/networkpolicies")).then(|| {
        (
            StatusCode::OK,
            json!({"kind": "NetworkPolicyList", "apiVersion": "networking.k8s.io/v1",
                "metadata": {}, "items": [{"apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy", "metadata": {"name": "demo", "namespace": "mqtt",
                "labels": {"app.kubernetes.io/instance": "demo"}}}]}),
        )
    })
}

#[tokio::test]
async fn turning_the_network_policy_off_deletes_the_one_applied_before() {
    let (client, calls) = fake_client_with(existing_network_policy);
    let ctx = context(client);
    reconcile(cluster(json!({"networkPolicy": {"enabled": false}})), ctx)
        .await
        .expect("reconcile succeeds");
    let calls = calls.lock().expect("calls").clone();
    assert!(
        !calls
            .iter()
            .any(|c| c.method == "PATCH" && c.body["kind"] == "NetworkPolicy"),
        "no NetworkPolicy applied when disabled"
    );
    assert!(
        calls.iter().any(|c| c.method == "DELETE"
            && c.uri
                .contains("/apis/networking.k8s.io/v1/namespaces/mqtt/networkpolicies/demo")),
        "the old NetworkPolicy is deleted; calls: {:?}",
        calls
            .iter()
            .map(|c| (&c.method, &c.uri))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn an_enabled_network_policy_is_kept() {
    let (client, calls) = fake_client_with(existing_network_policy);
    reconcile(cluster(json!({})), context(client))
        .await
        .expect("reconcile succeeds");
    let calls = calls.lock().expect("calls").clone();
    assert!(
        !calls
            .iter()
            .any(|c| c.method == "DELETE" && c.uri.contains("/networkpolicies/")),
        "the wanted NetworkPolicy is not pruned"
    );
}

#[tokio::test]
async fn a_paused_cluster_gets_no_write_but_the_record_of_its_pause() {
    let (client, calls) = fake_client();
    let ctx = context(client);
    let mut obj = (*cluster(json!({}))).clone();
    obj.metadata.annotations = Some(
        [(
            corvid_operator::controller::PAUSED_ANNOTATION.to_string(),
            "true".to_string(),
        )]
        .into(),
    );
    let action = reconcile(Arc::new(obj.clone()), ctx.clone())
        .await
        .expect("a paused reconcile succeeds");
    assert_eq!(action, Action::await_change(), "woken by the next change");
    // Entering the pause writes exactly its record: one event and the status saying so.
    let writes: Vec<_> = calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|c| c.method != "GET")
        .cloned()
        .collect();
    let described: Vec<String> = writes
        .iter()
        .map(|c| format!("{} {}", c.method, c.uri))
        .collect();
    assert_eq!(writes.len(), 2, "only the pause's record: {described:?}");
    assert!(
        writes[0].method == "POST" && writes[0].uri.contains("/events"),
        "{described:?}"
    );
    assert_eq!(writes[0].body["reason"], "Paused");
    assert!(writes[1].uri.contains("/status"), "{described:?}");
    let status = writes[1].body["status"].clone();
    let reconcile_success = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "ReconcileSuccess"))
        .cloned()
        .expect("ReconcileSuccess in the pause's status");
    assert_eq!(reconcile_success["status"], "False");
    assert_eq!(reconcile_success["reason"], "PausedByAnnotation");

    // Once status shows the pause, a reconcile (any wake) writes nothing at all.
    obj.status = Some(serde_json::from_value(status).expect("status"));
    calls.lock().expect("calls").clear();
    reconcile(Arc::new(obj.clone()), ctx.clone())
        .await
        .expect("a paused reconcile succeeds");
    let writes: Vec<String> = calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|c| c.method != "GET")
        .map(|c| format!("{} {}", c.method, c.uri))
        .collect();
    assert!(writes.is_empty(), "no writes while paused: {writes:?}");

    // Any other value (or none) reconciles as usual.
    obj.metadata.annotations = Some(
        [(
            corvid_operator::controller::PAUSED_ANNOTATION.to_string(),
            "false".to_string(),
        )]
        .into(),
    );
    reconcile(Arc::new(obj), ctx)
        .await
        .expect("reconcile succeeds");
    assert!(calls
        .lock()
        .expect("calls")
        .iter()
        .any(|c| c.method == "PATCH" && c.body["kind"] == "StatefulSet"));
    assert!(
        calls
            .lock()
            .expect("calls")
            .iter()
            .any(|c| c.method == "POST" && c.body["reason"] == "Resumed"),
        "resuming is an event"
    );
}

#[tokio::test]
async fn invalid_spec_is_reported_and_waits_for_a_change() {
    let (client, calls) = fake_client();
    let ctx = context(client);
    let obj = cluster(json!({"replicas": 0}));
    let err = reconcile(obj.clone(), ctx.clone())
        .await
        .expect_err("invalid spec");
    assert_eq!(err.reason(), "InvalidSpec");
    assert_eq!(
        error_policy(obj, &err, ctx.clone()),
        Action::await_change(),
        "no hot loop"
    );
    let calls = calls.lock().expect("calls").clone();
    assert!(
        !calls
            .iter()
            .any(|c| c.method == "PATCH" && !c.uri.contains("/status")),
        "nothing applied"
    );
    let status = status_patch(&calls);
    assert_eq!(
        condition(&status, "ReconcileSuccess"),
        ("False".into(), "InvalidSpec".into())
    );
    assert_eq!(
        condition(&status, "Degraded"),
        ("True".into(), "InvalidSpec".into())
    );
    assert!(
        calls.iter().any(|c| c.method == "POST"
            && c.uri.contains("events")
            && c.body["reason"] == "InvalidSpec"),
        "warning event"
    );
    assert!(ctx
        .metrics
        .render()
        .contains("corvid_operator_reconcile_errors_total{reason=\"InvalidSpec\"} 1"));
}

#[tokio::test]
async fn other_errors_back_off() {
    let (client, _) = fake_client();
    let ctx = context(client);
    let obj = cluster(json!({}));
    let err = corvid_operator::error::Error::MissingNamespace;
    let first = error_policy(obj.clone(), &err, ctx.clone());
    let second = error_policy(obj, &err, ctx);
    assert_eq!(first, Action::requeue(std::time::Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(std::time::Duration::from_secs(10)));
}

#[tokio::test]
async fn unreachable_brokers_do_not_stretch_the_backoff() {
    let (client, _) = fake_client();
    let ctx = context(client);
    let obj = cluster(json!({}));
    let err = corvid_operator::error::Error::PodTalk(PodTalkError::Request {
        pod: "demo-2".into(),
        message: "down".into(),
    });
    for _ in 0..5 {
        assert_eq!(
            error_policy(obj.clone(), &err, ctx.clone()),
            Action::requeue(std::time::Duration::from_secs(5))
        );
    }
}

/// Three Ready broker pods at revision r1, a StatefulSet whose update revision is r1, and a
/// recorded step that makes the operator ask demo-2 about its evacuation.
fn three_pods(call: &Call) -> Option<(StatusCode, Value)> {
    let path = call.uri.split('?').next().unwrap_or_default();
    let pod = |i: i32| {
        json!({"metadata": {"name": format!("demo-{i}"), "namespace": "mqtt",
                            "labels": {"controller-revision-hash": "r1", "app.kubernetes.io/instance": "demo"},
                            "creationTimestamp": "2026-01-01T00:00:00Z"},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    };
    match call.method.as_str() {
        "GET" if path.ends_with("/pods") => Some((
            StatusCode::OK,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod(0), pod(1), pod(2)]}),
        )),
        "GET" if path.ends_with("/statefulsets/demo") => Some((
            StatusCode::OK,
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                   "metadata": {"name": "demo", "namespace": "mqtt", "generation": 1},
                   "spec": {"replicas": 3, "selector": {}, "template": {}, "serviceName": "demo-headless"},
                   "status": {"replicas": 3, "observedGeneration": 1, "updateRevision": "r1", "currentRevision": "r1"}}),
        )),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn brokers_that_never_answer_do_not_hold_up_the_reconcile() {
    let (client, calls) = fake_client_with(three_pods);
    let ctx = context_with(client, Arc::new(SilentBrokers));
    let mut object = (*cluster(json!({}))).clone();
    object.status = Some(corvid_crds::MqttClusterStatus {
        observed_generation: Some(1),
        operation: Some(corvid_crds::OperationStatus {
            phase: corvid_crds::OperationPhase::Evacuating,
            pod: "demo-2".into(),
            revision: "r0".into(),
            since: "2026-01-01T00:00:00Z".into(),
        }),
        ..Default::default()
    });
    let started = tokio::time::Instant::now();
    let result = reconcile(Arc::new(object), ctx).await;
    let took = started.elapsed();
    assert!(
        took < corvid_operator::controller::RECONCILE_TIMEOUT,
        "bounded by the admin call deadlines, not the reconcile deadline: {took:?}"
    );
    assert!(result.is_ok(), "{result:?}");
    let calls = calls.lock().expect("calls").clone();
    let status = status_patch(&calls);
    assert_eq!(
        status["observedGeneration"], 2,
        "the new generation was acted on"
    );
    assert_eq!(
        condition(&status, "ReconcileSuccess"),
        ("True".into(), "Reconciled".into())
    );
    // Nobody answered the cluster view: membership is unknown, nothing is taken down.
    assert!(status["members"].is_null(), "{status}");
    assert!(
        !calls.iter().any(|c| c.method == "DELETE"),
        "no pod deleted"
    );
}

fn pods_unreadable(call: &Call) -> Option<(StatusCode, Value)> {
    let path = call.uri.split('?').next().unwrap_or_default();
    (call.method == "GET" && path.ends_with("/pods")).then(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                   "reason": "ServiceUnavailable", "message": "etcd is having a moment"}),
        )
    })
}

#[tokio::test]
async fn a_failed_read_is_written_to_status_and_keeps_the_observed_generation() {
    let (client, calls) = fake_client_with(pods_unreadable);
    let ctx = context(client);
    let mut object = (*cluster(json!({}))).clone();
    object.status = Some(corvid_crds::MqttClusterStatus {
        observed_generation: Some(1),
        ..Default::default()
    });
    let err = reconcile(Arc::new(object), ctx)
        .await
        .expect_err("reading pods failed");
    assert_eq!(err.reason(), "ReadFailed");
    let calls = calls.lock().expect("calls").clone();
    let status = status_patch(&calls);
    assert_eq!(
        condition(&status, "ReconcileSuccess"),
        ("False".into(), "ReadFailed".into())
    );
    assert_eq!(
        status["observedGeneration"], 1,
        "generation 2 was not acted on"
    );
    let event = calls
        .iter()
        .find(|c| c.method == "POST" && c.uri.contains("/events"))
        .expect("a Warning event");
    assert_eq!(event.body["reason"], "ReadFailed");
    assert_eq!(event.body["type"], "Warning");
}

/// The cluster Secret as created, before any rotation.
fn cluster_secret_exists(call: &Call) -> Option<(StatusCode, Value)> {
    let path = call.uri.split('?').next().unwrap_or_default();
    match call.method.as_str() {
        "GET" if path.ends_with("/secrets/demo-cluster-secret") => Some((
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "demo-cluster-secret", "namespace": "mqtt"},
                   "data": {"secret": "b2xkLXNlY3JldC0wMTIzNDU2Nzg5"}}),
        )),
        _ => None,
    }
}

#[tokio::test]
async fn the_rotate_annotation_installs_a_new_accepted_secret_and_looks_again_soon() {
    use corvid_operator::rotation;
    let (client, calls) = fake_client_with(cluster_secret_exists);
    let ctx = context(client);
    let mut obj = (*cluster(json!({}))).clone();
    obj.metadata.annotations = Some(
        [(
            rotation::ROTATE_ANNOTATION.to_string(),
            "2026-12".to_string(),
        )]
        .into(),
    );
    let action = reconcile(Arc::new(obj), ctx).await.expect("reconcile");
    let calls = calls.lock().expect("calls").clone();
    let patch = calls
        .iter()
        .find(|c| c.method == "PATCH" && c.uri.contains("/secrets/demo-cluster-secret"))
        .expect("the cluster Secret was patched");
    assert_eq!(patch.body["stringData"]["secret"], "old-secret-0123456789");
    let new = patch.body["stringData"]["accepted"]
        .as_str()
        .expect("a new accepted secret");
    assert_eq!(new.len(), 64, "{new}");
    let ann = &patch.body["metadata"]["annotations"];
    assert_eq!(ann[rotation::PHASE], "install");
    assert_eq!(ann[rotation::TOKEN], "2026-12");
    assert!(
        calls.iter().any(|c| c.method == "POST"
            && c.uri.contains("/events")
            && c.body.to_string().contains("ClusterSecretRotation")),
        "an Event says the rotation started"
    );
    // At most the rotation's recheck interval (here the pod step's 5 s is sooner).
    assert!(
        (1..=10).any(|s| action == Action::requeue(std::time::Duration::from_secs(s))),
        "{action:?}"
    );
}
