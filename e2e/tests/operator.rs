//! The real `corvid-operator` against the real API server: it turns an MqttCluster into its
//! owned objects, the StatefulSet rolls out on kwok nodes, the status and conditions follow,
//! the scale subresource reaches the StatefulSet, and deleting the MqttCluster lets garbage
//! collection remove everything it owned; owned objects edited by hand are restored within
//! seconds (they are watched). kwok pods run no broker, so anything that needs a
//! live broker (joins, evacuation) is out of scope here.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use corvid_e2e::{
    apply_crds, cluster, http_get, kubectl, mqtt_cluster, mqtt_cluster_resource, wait_for,
    workspace_binary, TestNamespace, TestProcess,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
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
    let sts = wait_for_ready_statefulset(&statefulsets, &operator, 3).await;
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

/// Waits until the StatefulSet `NAME` has `ready` Ready pods, and returns it.
async fn wait_for_ready_statefulset(
    statefulsets: &Api<StatefulSet>,
    operator: &TestProcess,
    ready: i32,
) -> StatefulSet {
    wait_for(
        &format!("the StatefulSet to roll out {ready} Ready pods"),
        TIMEOUT,
        || async {
            let Some(sts) = statefulsets.get_opt(NAME).await? else {
                return Ok(Err("no StatefulSet yet".to_string()));
            };
            let now = sts.status.as_ref().and_then(|s| s.ready_replicas);
            Ok(if now == Some(ready) {
                Ok(sts)
            } else {
                Err(format!("{:?}", sts.status))
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)))
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

/// spec.podTemplate through the real API server: the CRD's schema and CEL accept a sidecar, an
/// init container and an extra volume mounted in the broker container, the operator's merged
/// StatefulSet passes the API server's own pod validation, and the StatefulSet as stored holds
/// them next to everything the operator owns; the ServiceAccount carries the IAM annotation.
/// A protected field is refused by CEL on create, and one only the operator checks ends in an
/// InvalidSpec condition naming the field.
#[tokio::test]
async fn operator_merges_the_pod_template_into_the_statefulset() {
    let Some(client) = cluster("operator_merges_the_pod_template_into_the_statefulset").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "podtemplate").await.unwrap();
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());

    // CEL refuses the broker container's command before anything is stored.
    let hijack = json!({"podTemplate": {"spec": {"containers": [
        {"name": "broker", "command": ["sh", "-c", "sleep infinity"]}]}}});
    match clusters
        .create(&PostParams::default(), &mqtt_cluster("hijack", hijack))
        .await
    {
        Err(kube::Error::Api(status)) => assert!(
            status.code == 422
                && status
                    .message
                    .contains("podTemplate.spec.containers[broker]: command and args"),
            "{}",
            status.message
        ),
        other => panic!("a broker command override was accepted: {other:?}"),
    }

    let spec = json!({
        "replicas": 2,
        "podTemplate": {
            "metadata": {"labels": {"team": "iot"}},
            "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/corvid"}},
            "spec": {
                "initContainers": [{"name": "wait-for-auth", "image": "busybox:1.36",
                                    "command": ["sh", "-c", "true"]}],
                "containers": [
                    {"name": "broker",
                     "env": [{"name": "RUST_LOG", "value": "debug"}],
                     "volumeMounts": [{"name": "plugins", "mountPath": "/etc/corvid-extra", "readOnly": true}]},
                    {"name": "log-shipper", "image": "fluent/fluent-bit:3.1",
                     "volumeMounts": [{"name": "logs", "mountPath": "/logs"}]},
                ],
                "volumes": [{"name": "plugins", "configMap": {"name": "corvid-plugins", "optional": true}},
                            {"name": "logs", "emptyDir": {}}],
            },
        },
    });
    clusters
        .create(&PostParams::default(), &mqtt_cluster(NAME, spec))
        .await
        .unwrap();
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns.name);
    let sts = wait_for_ready_statefulset(&statefulsets, &operator, 2).await;
    let template = sts.spec.expect("spec").template;
    let labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
    assert_eq!(labels.get("team").map(String::as_str), Some("iot"));
    let pod = template.spec.expect("pod spec");
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["broker", "log-shipper"]);
    let broker = &pod.containers[0];
    let mounts: Vec<&str> = broker
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/etc/corvid-extra"), "{mounts:?}");
    assert!(mounts.contains(&"/etc/corvid/corvid.yaml"), "{mounts:?}");
    assert!(broker.env.iter().flatten().any(|e| e.name == "RUST_LOG"));
    assert!(broker.env.iter().flatten().any(|e| e.name == "POD_NAME"));
    assert_eq!(
        broker.args.as_deref(),
        Some(
            &[
                "serve".to_string(),
                "--config".into(),
                "/etc/corvid/corvid.yaml".into()
            ][..]
        )
    );
    let sidecar = &pod.containers[1];
    assert_eq!(
        sidecar
            .security_context
            .as_ref()
            .and_then(|s| s.allow_privilege_escalation),
        Some(false),
        "sidecars get the restricted profile"
    );
    let init: Vec<&str> = pod
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["wait-for-auth"]);
    let volumes: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for v in ["config", "tmp", "plugins", "logs"] {
        assert!(volumes.contains(&v), "{v} missing from {volumes:?}");
    }
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
        .get(
            pod.service_account_name
                .as_deref()
                .expect("service account"),
        )
        .await
        .unwrap();
    assert_eq!(
        sa.annotations()
            .get("eks.amazonaws.com/role-arn")
            .map(String::as_str),
        Some("arn:aws:iam::1:role/corvid")
    );
    wait_for_status(&clusters, &operator, 2).await;

    // A field CEL does not cover (an operator volume name) is refused by the operator, in status.
    let patch = json!({"spec": {"podTemplate": {"spec": {"volumes": [
        {"name": "plugins", "configMap": {"name": "corvid-plugins", "optional": true}},
        {"name": "logs", "emptyDir": {}},
        {"name": "config", "emptyDir": {}}]}}}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for(
        "an InvalidSpec condition naming the field",
        TIMEOUT,
        || async {
            let obj = clusters.get(NAME).await?;
            let condition = obj.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "ReconcileSuccess")
                .cloned()
                .unwrap_or_default();
            let message = condition["message"].as_str().unwrap_or_default();
            Ok(
                if condition["status"] == "False"
                    && condition["reason"] == "InvalidSpec"
                    && message.contains("podTemplate.spec.volumes[config]")
                {
                    Ok(())
                } else {
                    Err(condition.to_string())
                },
            )
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    let kept = statefulsets.get(NAME).await.unwrap();
    let volumes = kept
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.volumes)
        .unwrap_or_default();
    let config = volumes.iter().find(|v| v.name == "config");
    assert!(
        config.is_some_and(|v| v.config_map.is_some()),
        "the operator's config volume was replaced: {config:?}"
    );

    drop(operator);
    ns.delete().await.unwrap();
}

/// A stand-in for the Prometheus Operator's PrometheusRule CRD (same group, version, kind and
/// plural; any content): the operator only looks the CRD up by name and applies the object.
const PROMETHEUS_RULE_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: prometheusrules.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {kind: PrometheusRule, listKind: PrometheusRuleList, plural: prometheusrules, singular: prometheusrule}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

/// spec.monitoring.prometheusRule through the real API server: with the PrometheusRule CRD
/// present the operator applies a rule owned by the MqttCluster, with the cluster's scoped
/// alerts, and prunes it when the switch goes off.
#[tokio::test]
async fn operator_owns_a_prometheus_rule_when_its_crd_exists() {
    let Some(client) = cluster("operator_owns_a_prometheus_rule_when_its_crd_exists").await else {
        return;
    };
    apply_crds(&client).await;
    let out = kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=corvid-e2e",
            "-f",
            "-",
        ],
        Some(PROMETHEUS_RULE_CRD),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "PrometheusRule CRD: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns = TestNamespace::create(&client, "alerts").await.unwrap();
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    let spec = json!({"replicas": 1, "limits": {"maxConnections": 5000},
        "monitoring": {"prometheusRule": {"enabled": true, "labels": {"release": "prom"}}}});
    let created = clusters
        .create(&PostParams::default(), &mqtt_cluster(NAME, spec))
        .await
        .unwrap();
    let uid = created.uid().unwrap();
    let gvk = kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule");
    let rules = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::api::ApiResource::from_gvk_with_plural(&gvk, "prometheusrules"),
    );
    let rule = wait_for("the PrometheusRule", TIMEOUT, || async {
        Ok(rules
            .get_opt(NAME)
            .await?
            .ok_or_else(|| "no PrometheusRule yet".to_string()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    assert_controlled_by(&rule, &uid);
    assert_eq!(
        rule.labels().get("release").map(String::as_str),
        Some("prom")
    );
    let alerts = rule.data["spec"]["groups"][0]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let limit = alerts
        .iter()
        .find(|r| r["alert"] == "CorvidNearConnectionLimit")
        .unwrap_or_else(|| panic!("no CorvidNearConnectionLimit in {alerts:?}"));
    let expr = limit["expr"].as_str().unwrap_or_default();
    assert!(
        expr.contains(&format!("namespace=\"{}\"", ns.name)) && expr.ends_with("> 0.9 * 5000"),
        "{expr}"
    );

    // The optional kind is watched too (its CRD was served when the operator started): once
    // the cluster is idle, a hand edit of the rules is undone within seconds.
    wait_for_status(&clusters, &operator, 1).await;
    hand_edit(&rules, NAME, json!({"spec": {"groups": []}})).await;
    wait_for(
        "the PrometheusRule's alerts back",
        DRIFT_TIMEOUT,
        || async {
            let rule = rules.get(NAME).await?;
            let groups = rule.data["spec"]["groups"].as_array().map_or(0, Vec::len);
            Ok(if groups > 0 {
                Ok(())
            } else {
                Err("no rule groups".to_string())
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    let off = json!({"spec": {"monitoring": {"prometheusRule": {"enabled": false}}}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&off))
        .await
        .unwrap();
    wait_for("the PrometheusRule to be pruned", TIMEOUT, || async {
        Ok(match rules.get_opt(NAME).await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    drop(operator);
    ns.delete().await.unwrap();
}

/// spec.services through the real API server: each entry becomes a Service `<cluster>-<name>`
/// owned by the MqttCluster with its own type and ports next to the default client Service, the
/// broker listener behind a PROXY-protocol Service expects the header, and removing an entry
/// deletes its Service while the default one stays.
#[tokio::test]
async fn operator_manages_additional_services_and_prunes_removed_ones() {
    let Some(client) =
        cluster("operator_manages_additional_services_and_prunes_removed_ones").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "services").await.unwrap();
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    let spec = json!({"replicas": 1, "auth": {"allowAnonymous": true},
    "service": {"listeners": ["ws"]},
    "services": [
        {"name": "internal", "listeners": ["ws"]},
        {"name": "public", "type": "NodePort", "listeners": ["mqtt"],
         "proxyProtocol": true, "proxyTrustedRanges": ["10.0.0.0/8"],
         "annotations": {"example.com/team": "iot"}},
    ]});
    let created = clusters
        .create(&PostParams::default(), &mqtt_cluster(NAME, spec))
        .await
        .unwrap();
    let uid = created.uid().unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let public = wait_for("the additional Services", TIMEOUT, || async {
        let internal = services.get_opt(&format!("{NAME}-internal")).await?;
        let public = services.get_opt(&format!("{NAME}-public")).await?;
        Ok(match (internal, public) {
            (Some(_), Some(public)) => Ok(public),
            _ => Err("not both there yet".to_string()),
        })
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}
{}",
            operator.log_tail(30)
        )
    });
    assert_controlled_by(&public, &uid);
    let spec = public.spec.clone().unwrap_or_default();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    let ports: Vec<(Option<String>, i32)> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.port))
        .collect();
    assert_eq!(ports, [(Some("mqtt".to_string()), 1883)]);
    assert_eq!(
        public
            .annotations()
            .get("example.com/team")
            .map(String::as_str),
        Some("iot")
    );
    let default = services.get(NAME).await.unwrap();
    let default_ports: Vec<i32> = default
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.port)
        .collect();
    assert_eq!(
        default_ports,
        [8083],
        "spec.service.listeners narrows the default Service"
    );
    let config = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get(&format!("{NAME}-config"))
        .await
        .unwrap();
    let yaml = config
        .data
        .as_ref()
        .and_then(|d| d.get("corvid.yaml"))
        .cloned()
        .unwrap_or_default();
    let parsed: Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(
        parsed["listeners"]["mqtt"]["proxy_protocol"], true,
        "{yaml}"
    );
    assert_eq!(
        parsed["listeners"]["mqtt"]["proxy_trusted"],
        json!(["10.0.0.0/8"]),
        "{yaml}"
    );
    assert!(
        parsed["listeners"]["ws"].get("proxy_protocol").is_none(),
        "{yaml}"
    );

    let fewer = json!({"spec": {"services": [{"name": "internal", "listeners": ["ws"]}]}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&fewer))
        .await
        .unwrap();
    wait_for("the removed Service to be pruned", TIMEOUT, || async {
        Ok(match services.get_opt(&format!("{NAME}-public")).await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}
{}",
            operator.log_tail(30)
        )
    });
    for kept in [
        NAME.to_string(),
        format!("{NAME}-internal"),
        format!("{NAME}-headless"),
    ] {
        assert!(
            services.get_opt(&kept).await.unwrap().is_some(),
            "{kept} kept"
        );
    }

    drop(operator);
    ns.delete().await.unwrap();
}

/// A StorageClass for one test (cluster-scoped, so named after the test's namespace and
/// deleted by the test). kwok has no storage: its provisioner provisions nothing.
async fn storage_class(client: &kube::Client, name: &str, expandable: bool) -> StorageClass {
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": name},
        "provisioner": "e2e.corvid.dev/none",
        "allowVolumeExpansion": expandable,
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Retain",
    }))
    .unwrap();
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap()
}

/// The claim template's storage request of the stored StatefulSet.
fn template_size(sts: &StatefulSet) -> Option<String> {
    let templates = sts.spec.as_ref()?.volume_claim_templates.as_ref()?;
    let requests = templates.first()?.spec.as_ref()?.resources.as_ref()?;
    Some(requests.requests.as_ref()?.get("storage")?.0.clone())
}

/// The message of the MqttCluster's ReconcileSuccess condition when it is False.
async fn reconcile_failure(clusters: &Api<DynamicObject>) -> anyhow::Result<Option<String>> {
    let cluster = clusters.get(NAME).await?;
    let conditions = cluster.data["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(conditions
        .iter()
        .find(|c| c["type"] == "ReconcileSuccess" && c["status"] == "False")
        .map(|c| format!("{}: {}", c["reason"], c["message"])))
}

/// Growing spec.persistence.size when the claims' StorageClass does not allow expansion: the
/// operator changes nothing, says so in ReconcileSuccess, and keeps the StatefulSet's template.
/// (kwok has no storage, so the claim stays unbound; the refusal comes before any resize.)
#[tokio::test]
async fn operator_refuses_to_grow_volumes_the_storage_class_cannot_expand() {
    let Some(client) =
        cluster("operator_refuses_to_grow_volumes_the_storage_class_cannot_expand").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "volumes-fixed")
        .await
        .unwrap();
    let class_name = format!("{}-fixed", ns.name);
    storage_class(&client, &class_name, false).await;
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    let spec = json!({"replicas": 1,
        "persistence": {"mode": "pvc", "size": "1Gi", "storageClassName": class_name}});
    clusters
        .create(&PostParams::default(), &mqtt_cluster(NAME, spec))
        .await
        .unwrap();
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns.name);
    let claim = format!("data-{NAME}-0");
    wait_for("the StatefulSet's claim", TIMEOUT, || async {
        Ok(match claims.get_opt(&claim).await? {
            Some(_) => Ok(()),
            None => Err("no claim yet".to_string()),
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    let grow = json!({"spec": {"persistence": {"size": "2Gi"}}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&grow))
        .await
        .unwrap();
    let message = wait_for(
        "ReconcileSuccess=False for the expansion",
        TIMEOUT,
        || async {
            Ok(match reconcile_failure(&clusters).await? {
                Some(m) if m.contains("VolumeExpansion") => Ok(m),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    assert!(
        message.contains(&format!(
            "StorageClass {class_name} does not allow volume expansion"
        )) && message.contains(&claim),
        "{message}"
    );
    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns.name)
        .get(NAME)
        .await
        .unwrap();
    assert_eq!(template_size(&sts).as_deref(), Some("1Gi"), "template kept");
    let stored = claims.get(&claim).await.unwrap();
    let requested = stored
        .spec
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").cloned());
    assert_eq!(
        requested.map(|q| q.0).as_deref(),
        Some("1Gi"),
        "claim untouched"
    );

    drop(operator);
    ns.delete().await.unwrap();
    Api::<StorageClass>::all(client)
        .delete(&class_name, &DeleteParams::default())
        .await
        .unwrap();
}

/// Growing spec.persistence.size with an expandable StorageClass: the bound claim's request
/// grows and the StatefulSet is re-created (new uid, new claim template) while its pod keeps
/// running (same uid). kwok has no storage, so the test binds the claim to a PersistentVolume it
/// makes itself (Kubernetes only resizes bound claims); nothing actually grows on a disk.
#[tokio::test]
async fn operator_grows_bound_claims_and_recreates_the_statefulset_without_restarting_pods() {
    let Some(client) = cluster(
        "operator_grows_bound_claims_and_recreates_the_statefulset_without_restarting_pods",
    )
    .await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "volumes-grow")
        .await
        .unwrap();
    let class_name = format!("{}-grow", ns.name);
    storage_class(&client, &class_name, true).await;
    let claim = format!("data-{NAME}-0");
    let pv_name = format!("{}-0", ns.name);
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class_name,
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": "/tmp/corvid-e2e-volume"},
            "claimRef": {"namespace": ns.name, "name": claim},
        },
    }))
    .unwrap();
    let volumes = Api::<PersistentVolume>::all(client.clone());
    volumes
        .create(&PostParams::default(), &volume)
        .await
        .unwrap();
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    let spec = json!({"replicas": 1,
        "persistence": {"mode": "pvc", "size": "1Gi", "storageClassName": class_name}});
    clusters
        .create(&PostParams::default(), &mqtt_cluster(NAME, spec))
        .await
        .unwrap();
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns.name);
    wait_for("the claim to be bound", TIMEOUT, || async {
        let phase = claims
            .get_opt(&claim)
            .await?
            .and_then(|c| c.status)
            .and_then(|s| s.phase);
        Ok(if phase.as_deref() == Some("Bound") {
            Ok(())
        } else {
            Err(format!("phase {phase:?}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    wait_for_status(&clusters, &operator, 1).await;
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns.name);
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns.name);
    let sts_uid = statefulsets.get(NAME).await.unwrap().uid();
    let pod_uid = pods.get(&format!("{NAME}-0")).await.unwrap().uid();

    let grow = json!({"spec": {"persistence": {"size": "2Gi"}}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&grow))
        .await
        .unwrap();
    wait_for("the StatefulSet re-created with 2Gi", TIMEOUT, || async {
        let Some(sts) = statefulsets.get_opt(NAME).await? else {
            return Ok(Err("no StatefulSet (between delete and apply)".to_string()));
        };
        Ok(
            if sts.uid() != sts_uid && template_size(&sts).as_deref() == Some("2Gi") {
                Ok(())
            } else {
                Err(format!(
                    "uid {:?}, template {:?}",
                    sts.uid(),
                    template_size(&sts)
                ))
            },
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    let requested = claims
        .get(&claim)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").cloned());
    assert_eq!(
        requested.map(|q| q.0).as_deref(),
        Some("2Gi"),
        "claim asked to grow"
    );
    wait_for_status(&clusters, &operator, 1).await;
    assert_eq!(
        pods.get(&format!("{NAME}-0")).await.unwrap().uid(),
        pod_uid,
        "the pod kept running through the re-creation"
    );

    drop(operator);
    ns.delete().await.unwrap();
    Api::<StorageClass>::all(client)
        .delete(&class_name, &DeleteParams::default())
        .await
        .unwrap();
    volumes
        .delete(&pv_name, &DeleteParams::default())
        .await
        .unwrap();
}

/// How soon a hand edit of an owned object must be undone: far below the 300 s idle requeue,
/// so only a watch on the object's kind can meet it.
const DRIFT_TIMEOUT: Duration = Duration::from_secs(15);

/// A hand edit (a merge patch under another field manager, as `kubectl edit` makes) of `name`.
async fn hand_edit<K>(api: &Api<K>, name: &str, patch: Value)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams {
            field_manager: Some("e2e-hand-edit".to_string()),
            ..PatchParams::default()
        },
        &Patch::Merge(&patch),
    )
    .await
    .unwrap_or_else(|e| panic!("hand edit of {name}: {e}"));
}

/// Owned objects are watched: once the cluster is idle (next requeue in 300 s), a hand edit of
/// the NetworkPolicy, the brokers' Role and the PodDisruptionBudget (maxUnavailable swapped for
/// minAvailable), and the deletion of the RoleBinding, are each undone by the operator within
/// seconds. (Checked the other way round too: with those watches removed, the edits stay and the
/// test times out.)
#[tokio::test]
async fn operator_restores_hand_edited_owned_objects_within_seconds() {
    let Some(client) = cluster("operator_restores_hand_edited_owned_objects_within_seconds").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "drift").await.unwrap();
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    clusters
        .create(
            &PostParams::default(),
            &mqtt_cluster(NAME, json!({"replicas": 1})),
        )
        .await
        .unwrap();
    // Idle: every later reconcile comes from a watch event, not from a rollout's 5 s requeue.
    wait_for_status(&clusters, &operator, 1).await;

    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name);
    let rules = |policy: &NetworkPolicy| {
        policy
            .spec
            .as_ref()
            .and_then(|s| s.ingress.as_ref())
            .map_or(0, Vec::len)
    };
    let before = rules(&policies.get(NAME).await.unwrap());
    assert!(before > 0, "the NetworkPolicy has ingress rules");
    hand_edit(&policies, NAME, json!({"spec": {"ingress": []}})).await;
    wait_for(
        "the NetworkPolicy's ingress rules back",
        DRIFT_TIMEOUT,
        || async {
            let n = rules(&policies.get(NAME).await?);
            Ok(if n == before {
                Ok(())
            } else {
                Err(format!("{n} ingress rules, want {before}"))
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    let broker = format!("{NAME}-broker");
    let roles = Api::<Role>::namespaced(client.clone(), &ns.name);
    let resources = |role: &Role| -> Vec<String> {
        role.rules
            .iter()
            .flatten()
            .flat_map(|r| r.resources.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(
        resources(&roles.get(&broker).await.unwrap()),
        ["endpointslices"]
    );
    let widened =
        json!({"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]});
    hand_edit(&roles, &broker, widened).await;
    wait_for("the Role's rules back", DRIFT_TIMEOUT, || async {
        let found = resources(&roles.get(&broker).await?);
        Ok(if found == ["endpointslices"] {
            Ok(())
        } else {
            Err(format!("rules on {found:?}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name);
    let budget = |pdb: &PodDisruptionBudget| {
        let spec = pdb.spec.clone().unwrap_or_default();
        (spec.max_unavailable, spec.min_available)
    };
    let wanted = (Some(IntOrString::Int(1)), None);
    assert_eq!(budget(&pdbs.get(NAME).await.unwrap()), wanted);
    // Swapping maxUnavailable for minAvailable: the operator's apply must also remove
    // minAvailable, or the API server refuses a PDB with both.
    let swapped = json!({"spec": {"maxUnavailable": null, "minAvailable": 2}});
    hand_edit(&pdbs, NAME, swapped).await;
    wait_for(
        "the PDB back at maxUnavailable 1 without minAvailable",
        DRIFT_TIMEOUT,
        || async {
            let found = budget(&pdbs.get(NAME).await?);
            Ok(if found == wanted {
                Ok(())
            } else {
                Err(format!("(maxUnavailable, minAvailable) = {found:?}"))
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    let bindings = Api::<RoleBinding>::namespaced(client.clone(), &ns.name);
    let uid = bindings.get(&broker).await.unwrap().uid();
    bindings
        .delete(&broker, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the RoleBinding re-created", DRIFT_TIMEOUT, || async {
        Ok(match bindings.get_opt(&broker).await? {
            Some(b) if b.uid() != uid => Ok(()),
            Some(_) => Err("the deleted RoleBinding is still there".to_string()),
            None => Err("no RoleBinding".to_string()),
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));

    drop(operator);
    ns.delete().await.unwrap();
}

/// The events.k8s.io Events about the MqttCluster `name` with `reason`, as the operator's
/// recorder publishes them.
async fn events_with_reason(client: &kube::Client, ns: &str, name: &str, reason: &str) -> usize {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&Default::default())
        .await
        .map(|list| {
            list.items
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .count()
        })
        .unwrap_or(0)
}

/// `corvid.dev/paused: "true"` through the real API server: the operator records the pause
/// (ReconcileSuccess=False, reason PausedByAnnotation, and a Paused event), then writes nothing
/// while it holds — a hand-deleted owned Service stays deleted and a spec change waits, although
/// both wake the controller — and removing the annotation resumes at once: the Service is back,
/// the change applied, status converged, a Resumed event.
#[tokio::test]
async fn operator_pause_annotation_stops_every_write_and_resumes_cleanly() {
    let Some(client) =
        cluster("operator_pause_annotation_stops_every_write_and_resumes_cleanly").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "paused").await.unwrap();
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    clusters
        .create(
            &PostParams::default(),
            &mqtt_cluster(NAME, json!({"replicas": 1})),
        )
        .await
        .unwrap();
    wait_for_status(&clusters, &operator, 1).await;

    let pause = json!({"metadata": {"annotations": {"corvid.dev/paused": "true"}}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&pause))
        .await
        .unwrap();
    wait_for("the pause in status and events", TIMEOUT, || async {
        let failure = reconcile_failure(&clusters).await?;
        let events = events_with_reason(&client, &ns.name, NAME, "Paused").await;
        Ok(match failure {
            Some(m) if m.contains("PausedByAnnotation") && events == 1 => Ok(()),
            other => Err(format!("{other:?}, {events} Paused events")),
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    let observed = clusters.get(NAME).await.unwrap().data["status"]["observedGeneration"].clone();

    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    services
        .delete(NAME, &DeleteParams::default())
        .await
        .unwrap();
    let grow = json!({"spec": {"replicas": 2}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&grow))
        .await
        .unwrap();
    // Unpaused, the watches undo a deleted Service within seconds (see the drift test); paused,
    // nothing may be written for as long as DRIFT_TIMEOUT, checked throughout.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let held_until = std::time::Instant::now() + DRIFT_TIMEOUT;
    while std::time::Instant::now() < held_until {
        assert!(
            services.get_opt(NAME).await.unwrap().is_none(),
            "the Service came back while paused\n{}",
            operator.log_tail(30)
        );
        let replicas = statefulsets
            .get(NAME)
            .await
            .unwrap()
            .spec
            .and_then(|s| s.replicas);
        assert_eq!(replicas, Some(1), "the StatefulSet changed while paused");
        let now = clusters.get(NAME).await.unwrap();
        assert_eq!(
            now.data["status"]["observedGeneration"], observed,
            "status moved while paused"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        events_with_reason(&client, &ns.name, NAME, "Paused").await,
        1,
        "the pause is recorded once, not per wake"
    );

    let resume = json!({"metadata": {"annotations": {"corvid.dev/paused": null}}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&resume))
        .await
        .unwrap();
    wait_for_status(&clusters, &operator, 2).await;
    assert!(
        services.get_opt(NAME).await.unwrap().is_some(),
        "the Service is back"
    );
    wait_for("the Resumed event", TIMEOUT, || async {
        let events = events_with_reason(&client, &ns.name, NAME, "Resumed").await;
        Ok(if events >= 1 {
            Ok(())
        } else {
            Err("no Resumed event".to_string())
        })
    })
    .await
    .unwrap();

    drop(operator);
    ns.delete().await.unwrap();
}

/// spec.persistence.retention through the real API server and controller manager: it becomes
/// the StatefulSet's persistentVolumeClaimRetentionPolicy (changed in place, the pod kept), and
/// garbage collection follows it — deleting a cluster with `whenDeleted: Delete` removes its
/// claims, while the default (Retain) keeps them after the StatefulSet is gone.
#[tokio::test]
async fn operator_maps_claim_retention_and_deleting_the_cluster_follows_it() {
    let Some(client) =
        cluster("operator_maps_claim_retention_and_deleting_the_cluster_follows_it").await
    else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNamespace::create(&client, "retention").await.unwrap();
    let operator = start_operator(&ns.name).await;
    let clusters =
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &mqtt_cluster_resource());
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns.name);
    const KEPT: &str = "kept";
    for (name, retention) in [(NAME, json!({"whenDeleted": "Delete"})), (KEPT, json!({}))] {
        let spec = json!({"replicas": 1,
            "persistence": {"mode": "pvc", "size": "1Gi", "retention": retention}});
        clusters
            .create(&PostParams::default(), &mqtt_cluster(name, spec))
            .await
            .unwrap();
    }
    let policy = |sts: &StatefulSet| {
        sts.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref())
            .map(|p| (p.when_deleted.clone(), p.when_scaled.clone()))
    };
    let pod_uid = || async {
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns.name)
            .get_opt(&format!("{NAME}-0"))
            .await
            .ok()
            .flatten()
            .and_then(|p| p.metadata.uid)
    };
    for (name, expected) in [(NAME, ("Delete", "Retain")), (KEPT, ("Retain", "Retain"))] {
        wait_for(
            &format!("{name}'s StatefulSet and claim"),
            TIMEOUT,
            || async {
                let sts = statefulsets.get_opt(name).await?;
                let claim = claims.get_opt(&format!("data-{name}-0")).await?;
                let got = sts.as_ref().and_then(policy);
                let want = Some((Some(expected.0.to_string()), Some(expected.1.to_string())));
                Ok(if got == want && claim.is_some() {
                    Ok(())
                } else {
                    Err(format!("policy {got:?}, claim {}", claim.is_some()))
                })
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    }
    let pod = wait_for("the first cluster's pod", TIMEOUT, || async {
        Ok(pod_uid().await.ok_or_else(|| "no pod yet".to_string()))
    })
    .await
    .unwrap();

    let scaled = json!({"spec": {"persistence": {"retention": {"whenScaled": "Delete"}}}});
    clusters
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&scaled))
        .await
        .unwrap();
    wait_for("whenScaled: Delete on the StatefulSet", TIMEOUT, || async {
        let got = statefulsets.get(NAME).await.ok().as_ref().and_then(policy);
        Ok(
            if got == Some((Some("Delete".into()), Some("Delete".into()))) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            },
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(30)));
    assert_eq!(
        pod_uid().await,
        Some(pod),
        "the retention policy restarts no pod"
    );

    for name in [NAME, KEPT] {
        clusters
            .delete(name, &DeleteParams::background())
            .await
            .unwrap();
    }
    wait_for("both StatefulSets collected", TIMEOUT, || async {
        let left = statefulsets.list(&Default::default()).await?.items.len();
        Ok(if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} StatefulSets"))
        })
    })
    .await
    .unwrap();
    wait_for("the whenDeleted: Delete claim removed", TIMEOUT, || async {
        Ok(match claims.get_opt(&format!("data-{NAME}-0")).await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await
    .unwrap();
    assert!(
        claims
            .get_opt(&format!("data-{KEPT}-0"))
            .await
            .unwrap()
            .is_some(),
        "the default keeps the claim after its cluster is gone"
    );

    drop(operator);
    ns.delete().await.unwrap();
}
