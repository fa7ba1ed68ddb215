//! Process wiring of `corvid-operator run`: logging, the Kubernetes client (in-cluster, KUBECONFIG
//! or --kubeconfig), the /metrics /healthz /readyz server, leader election, then the controller.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use corvid_crds::MqttCluster;
use corvid_operator::cli::RunArgs;
use corvid_operator::controller::{self, Context};
use corvid_operator::leader::Elector;
use corvid_operator::metrics::{self, HttpState, Metrics};
use corvid_operator::podtalk::ApiServerProxy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::CustomResourceExt;
use kube::{Client, Config};
use tracing_subscriber::EnvFilter;

fn init_logging(format: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "text" {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

async fn client(args: &RunArgs) -> anyhow::Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("loading kubeconfig")?
        }
        None => Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Applies the CRD this binary was built with (Helm installs `crds/` once and never upgrades
/// it). Every replica does this before the election; applies of the same YAML by the same field
/// manager are idempotent. A failure (most often RBAC) is logged, not fatal: the operator then
/// runs against whatever CRD version the cluster has.
async fn apply_own_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // The same document as `corvid-operator crd` and manifests/crds/ (descriptions unwrapped).
    let crd: CustomResourceDefinition = match corvid_crds::crd_yaml()
        .map_err(anyhow::Error::from)
        .and_then(|yaml| serde_yaml::from_str(&yaml).map_err(anyhow::Error::from))
    {
        Ok(crd) => crd,
        Err(e) => {
            tracing::warn!(error = %e, "could not render the MqttCluster CRD");
            return;
        }
    };
    let name = MqttCluster::crd_name();
    let params = PatchParams::apply("corvid-operator").force();
    match crds.patch(name, &params, &Patch::Apply(&crd)).await {
        Ok(_) => tracing::info!(crd = %name, "applied the MqttCluster CRD"),
        Err(e) => {
            tracing::warn!(crd = %name, error = %e, "could not apply the MqttCluster CRD; using the installed one")
        }
    }
}

/// The namespace the operator runs in: POD_NAMESPACE (downward API in the chart and
/// install.yaml), else the client's default namespace (the kubeconfig's, or "default").
fn operator_namespace(client: &Client) -> String {
    match std::env::var("POD_NAMESPACE") {
        Ok(ns) if !ns.is_empty() => ns,
        _ => {
            let ns = client.default_namespace().to_string();
            tracing::warn!(namespace = %ns, "POD_NAMESPACE is not set; the NetworkPolicies admit admin calls from this namespace");
            ns
        }
    }
}

/// Runs the operator until SIGTERM/SIGINT or until leadership is lost.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let client = client(&args).await?;
    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    let addr = SocketAddr::from(([0, 0, 0, 0], args.metrics_port));
    let http = tokio::spawn(metrics::serve(
        addr,
        HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let version = client
        .apiserver_version()
        .await
        .context("contacting the API server")?;
    tracing::info!(version = %version.git_version, "connected to the API server");
    if args.apply_crd {
        apply_own_crd(&client).await;
    }
    ready.store(true, Ordering::Relaxed);

    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("corvid-operator-{:08x}", rand::random::<u32>()));
    let lost = if args.leader_election_enabled() {
        let namespace = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let elector = Elector::new(client.clone(), &namespace, identity.clone());
        tracing::info!(identity, namespace, "waiting for leadership");
        elector.acquire().await?;
        tracing::info!(identity, "leading");
        Some(tokio::spawn(async move { elector.keep().await }))
    } else {
        None
    };

    let ctx = Arc::new(Context {
        client: client.clone(),
        admin: Arc::new(ApiServerProxy::new(client.clone())),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "corvid-operator".into(),
                instance: Some(identity),
            },
        ),
        metrics,
        failures: Mutex::new(Default::default()),
        operator_namespace: operator_namespace(&client),
    });
    let controller = controller::run(ctx, args.namespaces.clone());
    tokio::select! {
        () = controller => tracing::info!("controller stopped"),
        Some(lost) = async { match lost { Some(handle) => handle.await.ok(), None => std::future::pending().await } } => {
            anyhow::bail!("{lost}");
        }
        served = http => anyhow::bail!("metrics server stopped: {served:?}"),
    }
    Ok(())
}
