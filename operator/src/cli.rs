//! Command line of `corvid-operator`: `crd` prints the CRD, `run` starts the controller.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Kubernetes operator for Corvid MQTT clusters.
#[derive(Debug, Parser)]
#[command(name = "corvid-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the MqttCluster CRD YAML (or write it to files with --output).
    Crd(CrdArgs),
    /// Run the controller.
    Run(RunArgs),
}

/// Arguments of `crd`.
#[derive(Debug, Args)]
pub struct CrdArgs {
    /// Write the YAML to this file instead of stdout; repeat for several targets
    /// (manifests/crds/mqttclusters.corvid.dev.yaml, helm/corvid-operator/crds/...).
    #[arg(long, short)]
    pub output: Vec<PathBuf>,
}

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kubeconfig file for running outside the cluster; in-cluster config or KUBECONFIG otherwise.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Port of the /metrics, /healthz and /readyz HTTP endpoint.
    #[arg(long, default_value_t = 8080, env = "CORVID_OPERATOR_METRICS_PORT")]
    pub metrics_port: u16,
    /// Elect a leader through a coordination Lease so only one replica reconciles.
    #[arg(
        long = "leader-election",
        overrides_with = "no_leader_election",
        default_value_t = true
    )]
    pub leader_election: bool,
    /// Disable leader election (single replica, or local development).
    #[arg(long = "no-leader-election")]
    pub no_leader_election: bool,
    /// Namespace of the leader-election Lease; defaults to the pod's namespace or "default".
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Watch only these namespaces (repeatable); all namespaces when omitted.
    #[arg(long = "namespace", short = 'n')]
    pub namespaces: Vec<String>,
    /// Server-side apply this version's MqttCluster CRD at start-up (field manager
    /// corvid-operator), so `helm upgrade` also upgrades the CRD. Needs get/patch on the
    /// customresourcedefinition mqttclusters.corvid.dev; when forbidden the operator logs a
    /// warning and runs with the CRD it finds.
    #[arg(long, env = "CORVID_OPERATOR_APPLY_CRD")]
    pub apply_crd: bool,
    /// Log format: json or text.
    #[arg(long, default_value = "json", env = "CORVID_OPERATOR_LOG_FORMAT")]
    pub log_format: String,
}

impl RunArgs {
    /// Whether leader election is on after both flags were read.
    pub fn leader_election_enabled(&self) -> bool {
        self.leader_election && !self.no_leader_election
    }
}
