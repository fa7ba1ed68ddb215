//! The control plane `e2e/cluster up` starts must be real and complete enough for the operator:
//! the pinned apiserver version is serving, kwok nodes are Ready and heartbeating, and the
//! StatefulSet, EndpointSlice and garbage-collection controllers all do their work.

use std::collections::BTreeSet;
use std::time::Duration;

use corvid_e2e::{cluster, pinned_kubernetes_version, wait_for, TestNamespace};
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

/// Pod CIDR `e2e/cluster` gives kwok; every fake pod IP must come from it.
const POD_IP_PREFIX: &str = "10.244.";
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn apiserver_is_ready_and_runs_the_pinned_version() {
    let Some(client) = cluster("apiserver_is_ready_and_runs_the_pinned_version").await else {
        return;
    };
    let request = http::Request::get("/readyz?verbose")
        .body(Vec::new())
        .unwrap();
    let readyz = client.request_text(request).await.expect("GET /readyz");
    assert!(
        readyz.contains("readyz check passed"),
        "apiserver not ready:\n{readyz}"
    );

    let version = client.apiserver_version().await.expect("GET /version");
    let pinned = pinned_kubernetes_version().expect("pinned version");
    assert_eq!(
        version.git_version, pinned,
        "apiserver reports {version:?}, but e2e/gomod/kubernetes pins {pinned}"
    );
}

#[tokio::test]
async fn kwok_nodes_are_ready_and_hold_a_lease() {
    let Some(client) = cluster("kwok_nodes_are_ready_and_hold_a_lease").await else {
        return;
    };
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("type=kwok"))
        .await
        .expect("list nodes");
    assert!(!nodes.items.is_empty(), "no kwok nodes (label type=kwok)");

    let leases = Api::<Lease>::namespaced(client, "kube-node-lease");
    for node in &nodes.items {
        let name = node.metadata.name.as_deref().unwrap();
        let status = node.status.as_ref().expect("node status");
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.as_str());
        assert_eq!(ready, Some("True"), "node {name} is not Ready");
        let spec = node.spec.as_ref().expect("node spec");
        assert!(
            spec.pod_cidr
                .as_deref()
                .is_some_and(|c| c.starts_with(POD_IP_PREFIX)),
            "node {name} has no pod CIDR in {POD_IP_PREFIX}0.0/16: {:?}",
            spec.pod_cidr
        );
        // The node lifecycle controller taints nodes whose lease goes stale; kwok must renew it.
        let lease = leases
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("lease of {name}: {e}"));
        let spec = lease.spec.unwrap_or_default();
        assert!(
            spec.holder_identity.is_some() && spec.renew_time.is_some(),
            "lease of {name} is not held and renewed: {spec:?}"
        );
    }
}

#[tokio::test]
async fn statefulset_rolls_out_fills_endpoint_slices_and_is_garbage_collected() {
    let Some(client) =
        cluster("statefulset_rolls_out_fills_endpoint_slices_and_is_garbage_collected").await
    else {
        return;
    };
    let ns = TestNamespace::create(&client, "sts").await.unwrap();
    let replicas = 3;
    create_headless_service_and_statefulset(&client, &ns.name, replicas).await;

    // Rolled out means the controller saw this generation and every replica is updated and
    // Ready (OrderedReady: pod N+1 is only created once pod N is Ready).
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), &ns.name);
    wait_for("StatefulSet rollout", ROLLOUT_TIMEOUT, || async {
        let sts = sts_api.get("web").await?;
        let status = sts.status.clone().unwrap_or_default();
        let done = status.observed_generation == sts.metadata.generation
            && status.ready_replicas == Some(replicas)
            && status.updated_replicas == Some(replicas);
        Ok(if done {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        })
    })
    .await
    .unwrap();

    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), replicas as usize);
    let mut pod_ips = BTreeSet::new();
    for pod in &pods.items {
        let name = pod.metadata.name.as_deref().unwrap();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        assert!(
            node.is_some_and(|n| n.starts_with("kwok-node-")),
            "{name} not scheduled on a kwok node: {node:?}"
        );
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        assert!(
            ip.starts_with(POD_IP_PREFIX),
            "{name} has no pod IP from the pod CIDR: {ip:?}"
        );
        pod_ips.insert(ip);
    }
    assert_eq!(pod_ips.len(), replicas as usize, "pod IPs not unique");

    // The EndpointSlice controller publishes exactly the Ready pod IPs behind the Service.
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &ns.name);
    let by_service = ListParams::default().labels("kubernetes.io/service-name=web");
    wait_for(
        "EndpointSlices to list every pod",
        ROLLOUT_TIMEOUT,
        || async {
            let ready = ready_endpoint_ips(&slices, &by_service).await?;
            Ok(if ready == pod_ips {
                Ok(())
            } else {
                Err(format!("{ready:?}"))
            })
        },
    )
    .await
    .unwrap();

    // Deleting the owner leaves pods and revisions to the garbage collector.
    sts_api
        .delete("web", &DeleteParams::background())
        .await
        .unwrap();
    let pod_api = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let revisions = Api::<ControllerRevision>::namespaced(client.clone(), &ns.name);
    wait_for(
        "garbage collection of pods and revisions",
        ROLLOUT_TIMEOUT,
        || async {
            let pods = pod_api
                .list(&ListParams::default().labels("app=web"))
                .await?;
            let revs = revisions.list(&ListParams::default()).await?;
            let left = pods.items.len() + revs.items.len();
            Ok(if left == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{} pods, {} revisions left",
                    pods.items.len(),
                    revs.items.len()
                ))
            })
        },
    )
    .await
    .unwrap();
    wait_for("EndpointSlices to empty", ROLLOUT_TIMEOUT, || async {
        let ready = ready_endpoint_ips(&slices, &by_service).await?;
        Ok(if ready.is_empty() {
            Ok(())
        } else {
            Err(format!("{ready:?}"))
        })
    })
    .await
    .unwrap();

    ns.delete().await.unwrap();
}

/// Creates the `web` headless Service and a StatefulSet of `replicas` pods behind it. The image
/// is never pulled: kwok only simulates the pod lifecycle.
async fn create_headless_service_and_statefulset(client: &Client, ns: &str, replicas: i32) {
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web" },
        "spec": {
            "clusterIP": "None",
            "selector": { "app": "web" },
            "ports": [{ "name": "mqtt", "port": 1883 }],
        },
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let sts: StatefulSet = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "web" },
        "spec": {
            "serviceName": "web",
            "replicas": replicas,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{
                    "name": "broker",
                    "image": "corvid.invalid/never-pulled:e2e",
                    "ports": [{ "name": "mqtt", "containerPort": 1883 }],
                }] },
            },
        },
    }))
    .unwrap();
    Api::<StatefulSet>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
}

/// Addresses of Ready endpoints across the Service's EndpointSlices.
async fn ready_endpoint_ips(
    slices: &Api<EndpointSlice>,
    by_service: &ListParams,
) -> anyhow::Result<BTreeSet<String>> {
    let mut ips = BTreeSet::new();
    for slice in slices.list(by_service).await?.items {
        for endpoint in slice.endpoints {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready);
            if ready == Some(true) {
                ips.extend(endpoint.addresses);
            }
        }
    }
    Ok(ips)
}
