//! Broker peer discovery through the Kubernetes API (`--discovery kubernetes`), end to end:
//! a StatefulSet on kwok nodes gives pods their IPs, the real EndpointSlice controller publishes
//! them behind a headless Service, and one real `corvid-broker` process per pod — bound to that
//! pod's IP, which the test adds to the loopback interface — reads the slices with a
//! service-account token limited by RBAC and must form one cluster from what it finds.
//!
//! Needs root (CAP_NET_ADMIN) to add the pod IPs to `lo`, and a built `corvid-broker`
//! (see [`corvid_e2e::workspace_binary`]; `e2e/ci-kwok` builds it first).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use corvid_api::{ClusterView, MemberState};
use corvid_e2e::{
    cluster, http_get, http_get_with_token, kubectl, wait_for, workspace_binary, TestNamespace,
    TestProcess,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const REPLICAS: usize = 3;
const CLUSTER_PORT: u16 = 4370;
const ADMIN_PORT: u16 = 18083;
/// The admin token the brokers are given (their admin API listens on the pod IPs).
const ADMIN_TOKEN: &str = "corvid-e2e-admin-token";
const SERVICE: &str = "corvid-headless";
const JOIN_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn brokers_find_each_other_through_endpoint_slices() {
    let Some(client) = cluster("brokers_find_each_other_through_endpoint_slices").await else {
        return;
    };
    let broker = workspace_binary("corvid-broker", "CORVID_BROKER_BIN");
    let ns = TestNamespace::create(&client, "discovery").await.unwrap();
    create_rbac_service_and_statefulset(&client, &ns.name).await;
    let pods = wait_for_pod_ips(&client, &ns.name).await;
    wait_for_endpoint_slices(&client, &ns.name, &pods).await;

    // The token the brokers use is a real service-account token, so RBAC is exercised too.
    let token = kubectl(
        &[
            "-n",
            &ns.name,
            "create",
            "token",
            "corvid-broker",
            "--duration=1h",
        ],
        None,
    )
    .unwrap();
    assert!(
        token.status.success(),
        "kubectl create token: {}",
        String::from_utf8_lossy(&token.stderr)
    );

    let work = tempdir(&ns.name);
    let (api_url, ca_file) = api_server_and_ca(&work).await;
    std::fs::write(work.join("token"), &token.stdout).unwrap();
    std::fs::write(
        work.join("secret"),
        "corvid-e2e-cluster-secret-0123456789\n",
    )
    .unwrap();
    // The admin API listens on the pod IPs, so it needs a token (an open one is refused).
    std::fs::write(work.join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    let mut brokers = Brokers::default();
    for (name, ip) in &pods {
        brokers.add_loopback_ip(*ip);
        let config = broker_config(name, *ip, &ns.name, &api_url, &ca_file, &work);
        let config_path = work.join(format!("{name}.yaml"));
        std::fs::write(&config_path, config).unwrap();
        brokers.start(&broker, name, &config_path, &work);
    }

    let names: BTreeSet<String> = pods.iter().map(|(n, _)| n.clone()).collect();
    for (name, ip) in &pods {
        let admin = SocketAddr::new(*ip, ADMIN_PORT);
        let result = wait_for(
            &format!("{name} to see every peer and turn ready"),
            JOIN_TIMEOUT,
            || {
                let names = names.clone();
                async move {
                    let (code, body) =
                        http_get_with_token(admin, "/api/v1/cluster", Some(ADMIN_TOKEN)).await?;
                    let view: ClusterView = serde_json::from_str(&body)?;
                    let joined: BTreeSet<String> = view
                        .members
                        .into_iter()
                        .filter(|m| {
                            m.state == MemberState::Itself
                                || (m.state == MemberState::Ready && m.linked)
                        })
                        .map(|m| m.name)
                        .collect();
                    if code != 200 || joined != names {
                        return Ok(Err(format!("/api/v1/cluster HTTP {code}: {body}")));
                    }
                    // Ready only once joined and synced, which may trail the member list a little.
                    let (code, body) = http_get(admin, "/readyz").await?;
                    Ok(if code == 200 {
                        Ok(())
                    } else {
                        Err(format!("/readyz HTTP {code}: {body}"))
                    })
                }
            },
        )
        .await;
        if let Err(err) = result {
            panic!("{err:#}\n{}", brokers.log_tails());
        }
    }

    drop(brokers);
    std::fs::remove_dir_all(&work).ok();
    ns.delete().await.unwrap();
}

/// The API server URL and a PEM file with the CA that signed its certificate, both taken from
/// the kubeconfig the tests run with.
async fn api_server_and_ca(work: &Path) -> (String, PathBuf) {
    use base64::Engine as _;
    let config = kube::Config::infer().await.expect("kubeconfig");
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let certs = config
        .root_cert
        .expect("kubeconfig has certificate-authority data");
    let mut pem = String::new();
    for der in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    let path = work.join("ca.crt");
    std::fs::write(&path, pem).unwrap();
    (server, path)
}

fn tempdir(ns: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corvid-e2e-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the operator would give a broker pod, by hand: the pod name as node name, the pod IP
/// for every listener, and Kubernetes discovery pointed at the e2e API server.
fn broker_config(name: &str, ip: IpAddr, ns: &str, api: &str, ca: &Path, work: &Path) -> String {
    json!({
        "node": { "name": name },
        "listeners": {
            "mqtt": { "enabled": true, "bind": format!("{ip}:1883") },
            "ws": { "enabled": false },
        },
        "admin": {
            "bind": format!("{ip}:{ADMIN_PORT}"),
            "token_file": work.join("admin-token"),
        },
        "cluster": {
            "port": CLUSTER_PORT,
            "bind": ip.to_string(),
            "advertise": ip.to_string(),
            "discovery": "kubernetes",
            "secret_file": work.join("secret"),
            "kubernetes": {
                "namespace": ns,
                "service": SERVICE,
                "api_url": api,
                "token_file": work.join("token"),
                "ca_file": ca,
            },
        },
    })
    .to_string() // JSON is YAML
}

/// A ServiceAccount allowed only to read EndpointSlices, the headless Service (publishing
/// not-ready addresses, as the operator's does) and a StatefulSet whose pods kwok runs.
async fn create_rbac_service_and_statefulset(client: &Client, ns: &str) {
    let manifests = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            { "apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": { "name": "corvid-broker", "namespace": ns } },
            { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": { "name": "corvid-broker", "namespace": ns },
              "rules": [{ "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                          "verbs": ["get", "list"] }] },
            { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": { "name": "corvid-broker", "namespace": ns },
              "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": "corvid-broker" },
              "subjects": [{ "kind": "ServiceAccount", "name": "corvid-broker",
                             "namespace": ns }] },
            { "apiVersion": "v1", "kind": "Service",
              "metadata": { "name": SERVICE, "namespace": ns },
              "spec": { "clusterIP": "None", "publishNotReadyAddresses": true,
                        "selector": { "app": "corvid" },
                        "ports": [{ "name": "cluster", "port": CLUSTER_PORT }] } },
        ],
    })
    .to_string();
    let out = kubectl(&["apply", "-f", "-"], Some(&manifests)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": { "name": "corvid" },
        "spec": {
            "serviceName": SERVICE,
            "replicas": REPLICAS,
            "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app": "corvid" } },
            "template": {
                "metadata": { "labels": { "app": "corvid" } },
                "spec": {
                    "serviceAccountName": "corvid-broker",
                    "containers": [{ "name": "broker", "image": "corvid.invalid/broker:e2e" }],
                },
            },
        },
    }))
    .unwrap();
    Api::<StatefulSet>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
}

/// (pod name, pod IP) of every replica, once kwok has assigned them.
async fn wait_for_pod_ips(client: &Client, ns: &str) -> Vec<(String, IpAddr)> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    wait_for("pod IPs", JOIN_TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels("app=corvid"))
            .await?;
        let found: Vec<(String, IpAddr)> = list
            .items
            .iter()
            .filter_map(|p| {
                let ip = p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
                Some((p.metadata.name.clone()?, ip))
            })
            .collect();
        Ok(if found.len() == REPLICAS {
            Ok(found)
        } else {
            Err(format!("{found:?}"))
        })
    })
    .await
    .unwrap()
}

async fn wait_for_endpoint_slices(client: &Client, ns: &str, pods: &[(String, IpAddr)]) {
    let want: BTreeSet<String> = pods.iter().map(|(_, ip)| ip.to_string()).collect();
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
    let by_service = ListParams::default().labels(&format!("kubernetes.io/service-name={SERVICE}"));
    wait_for("EndpointSlices with every pod", JOIN_TIMEOUT, || async {
        let got: BTreeSet<String> = slices
            .list(&by_service)
            .await?
            .items
            .into_iter()
            .flat_map(|s| s.endpoints)
            .flat_map(|e| e.addresses)
            .collect();
        Ok(if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        })
    })
    .await
    .unwrap();
}

/// Broker processes and the loopback addresses added for them; both are undone on drop, also
/// when an assertion fails.
#[derive(Default)]
struct Brokers {
    processes: Vec<TestProcess>,
    added_ips: Vec<IpAddr>,
}

impl Brokers {
    fn add_loopback_ip(&mut self, ip: IpAddr) {
        let out = Command::new("ip")
            .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .output()
            .expect("run `ip` (Debian package iproute2)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            self.added_ips.push(ip);
        } else if !stderr.contains("File exists") {
            panic!("cannot add pod IP {ip} to lo (needs root / CAP_NET_ADMIN): {stderr}");
        }
    }

    fn start(&mut self, binary: &Path, name: &str, config: &Path, work: &Path) {
        let mut command = Command::new(binary);
        command
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let log = work.join(format!("{name}.log"));
        self.processes
            .push(TestProcess::spawn(name, command, log).expect("start corvid-broker"));
    }

    fn log_tails(&self) -> String {
        self.processes.iter().map(|p| p.log_tail(20)).collect()
    }
}

impl Drop for Brokers {
    fn drop(&mut self) {
        self.processes.clear(); // kills them before their addresses go away
        for ip in &self.added_ips {
            Command::new("ip")
                .args(["addr", "del", &format!("{ip}/32"), "dev", "lo"])
                .output()
                .ok();
        }
    }
}
