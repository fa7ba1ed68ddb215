//! The real `corvid-operator` against the real API server: it turns an MqttCluster into its
//! owned objects, the StatefulSet rolls out on kwok nodes, the status and conditions follow,
//! the scale subresource reaches the StatefulSet, and deleting the MqttCluster lets garbage
//! collection remove everything it owned. kwok pods run no broker, so anything that needs a
//! live broker (joins, evacuation) is out of scope here.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use corvid_e2e::{
    apply_crds, cluster, http_get, kubectl, mqtt_cluster, mqtt_cluster_resource, wait_for,
    workspace_binary, TestNamespace, TestProcess,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(90);
const NAME: &str = "mqtt";

#[tokio::test]
async fn operator_rolls_out_scales_and_cleans_up_an_mqtt_cluster() {
    let Some(client) = cluster("operator_rolls_out_scales_and_cleans_up_an_mqtt_cluster").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "operator").await.unwrap();
    let operator = start_operator(&ns.name).await;

    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    let created = clusters
        .create(&PostParams::default(), &mqtt_cluster(NAME, json!({})))
        .await
        .unwrap();
    let uid = created.uid().unwrap();

    // Owned objects exist and point back at the MqttCluster as their controller.
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns.name);
    let sts = wait_for(
        "the StatefulSet to roll out 3 Ready pods",
        TIMEOUT,
        || async {
            let Some(sts) = statefulsets.get_opt(NAME).await? else {
                return Ok(Err("no StatefulSet yet".to_string()));
            };
            let ready = sts.status.as_ref().and_then(|s| s.ready_replicas);
            Ok(if ready == Some(3) {
                Ok(sts)
            } else {
                Err(format!("{:?}", sts.status))
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    assert_controlled_by(&sts, &uid);
    let services = Api::<Service>::namespaced(client.clone(), &ns.name);
    for name in [NAME.to_string(), format!("{NAME}-headless")] {
        let service = services.get(&name).await.unwrap();
        assert_controlled_by(&service, &uid);
    }
    let config = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get(&format!("{NAME}-config"))
        .await
        .unwrap();
    assert_controlled_by(&config, &uid);
    // The NetworkPolicy (on by default) passed the API server's validation when the operator
    // applied it. kwok and the bridge CNI of the real node enforce no policy: this proves the
    // object is accepted and owned, not that traffic is filtered.
    let policy = Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
        .get(NAME)
        .await
        .unwrap();
    assert_controlled_by(&policy, &uid);
    let ingress = policy.spec.and_then(|s| s.ingress).unwrap_or_default();
    assert_eq!(ingress.len(), 3, "cluster, admin and client rules");

    // Status follows the pods, for the current generation, with no Unknown conditions.
    wait_for_status(&clusters, &operator, 3).await;

    // The scale subresource (kubectl scale, HPA) reaches the StatefulSet and the status.
    let out = kubectl(
        &["-n", &ns.name, "scale", "mqttcluster", NAME, "--replicas=4"],
        None,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "kubectl scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the StatefulSet to scale to 4", TIMEOUT, || async {
        let sts = statefulsets.get(NAME).await?;
        let ready = sts.status.as_ref().and_then(|s| s.ready_replicas);
        Ok(if ready == Some(4) {
            Ok(())
        } else {
            Err(format!("{:?}", sts.status))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    wait_for_status(&clusters, &operator, 4).await;

    // Deleting the MqttCluster garbage-collects everything it owned.
    clusters
        .delete(NAME, &DeleteParams::background())
        .await
        .unwrap();
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    wait_for("owned objects to be garbage-collected", TIMEOUT, || async {
        let mut left = Vec::new();
        if statefulsets.get_opt(NAME).await?.is_some() {
            left.push("StatefulSet");
        }
        if services.get_opt(NAME).await?.is_some() {
            left.push("Service");
        }
        if configmaps
            .get_opt(&format!("{NAME}-config"))
            .await?
            .is_some()
        {
            left.push("ConfigMap");
        }
        Ok(if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still there: {left:?}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    drop(operator);
    ns.delete().await.unwrap();
}

/// Runs `corvid-operator run` against the e2e cluster, watching only `ns` so tests in other
/// namespaces are left alone, and waits for its /readyz.
async fn start_operator(ns: &str) -> TestProcess {
    let binary = workspace_binary("corvid-operator", "CORVID_OPERATOR_BIN");
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .args(["run", "--no-leader-election", "--log-format", "text"])
        .args(["--metrics-port", &port.to_string(), "--namespace", ns])
        .env("NO_COLOR", "1");
    let log = std::env::temp_dir().join(format!("corvid-e2e-operator-{ns}.log"));
    let operator = TestProcess::spawn("corvid-operator", command, log).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("the operator's /readyz", TIMEOUT, || async {
        let (code, body) = http_get(addr, "/readyz").await?;
        Ok(if code == 200 {
            Ok(())
        } else {
            Err(format!("HTTP {code}: {body}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    operator
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn assert_controlled_by<K: Resource>(object: &K, uid: &str) {
    let meta = object.meta();
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    assert!(
        controller.is_some_and(|o| o.kind == "MqttCluster" && o.uid == uid),
        "{:?} is not controlled by the MqttCluster: {:?}",
        meta.name,
        meta.owner_references
    );
}

/// Waits until the MqttCluster's status describes the current generation with `replicas`
/// Ready pods, Available and ReconcileSuccess True, Degraded False, and no Unknown condition.
async fn wait_for_status(clusters: &Api<DynamicObject>, operator: &TestProcess, replicas: i64) {
    wait_for(
        &format!("status with {replicas} ready replicas"),
        TIMEOUT,
        || async {
            let obj = clusters.get(NAME).await?;
            let status = &obj.data["status"];
            let condition = |t: &str| -> Option<String> {
                status["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == t)
                    .and_then(|c| c["status"].as_str().map(String::from))
            };
            let ok = status["observedGeneration"].as_i64() == obj.metadata.generation
                && status["replicas"] == replicas
                && status["readyReplicas"] == replicas
                && condition("Available").as_deref() == Some("True")
                && condition("ReconcileSuccess").as_deref() == Some("True")
                && condition("Degraded").as_deref() == Some("False")
                && condition("Progressing").is_some();
            Ok(if ok {
                Ok(status.clone())
            } else {
                Err(status.to_string())
            })
        },
    )
    .await
    .map(|status: Value| {
        let unknown = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["status"] == "Unknown")
            .count();
        assert_eq!(unknown, 0, "Unknown conditions in {status}");
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
}
