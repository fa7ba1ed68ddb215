//! `corvid-proofjudge`: every decision of the live proof (`e2e/live-proof`), so the bash runner
//! only orchestrates. The rules and the report format live in `corvid_e2e::proof`, unit-tested;
//! this binary reads the runner's files and kubectl's JSON and answers with files, lines and exit
//! codes (0 = yes/passed, 1 = no/failed, 2 = bad input).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use corvid_e2e::proof::{self, files, Check, ClusterObject, Report, Sample, Target};
use k8s_openapi::api::apps::v1::StatefulSet;

/// The live proof's judge.
#[derive(Parser)]
#[command(name = "corvid-proofjudge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validates `--only NAME[,NAME…]` for a target; prints the selected names comma-separated.
    Only {
        #[arg(long, value_enum)]
        target: Target,
        /// The names, comma-separated.
        only: String,
    },
    /// Prints one soft check as a JSON line (for the scenario's checks.jsonl).
    Check {
        #[arg(long)]
        name: String,
        #[arg(long, action = clap::ArgAction::Set)]
        pass: bool,
    },
    /// Reads an MqttCluster (kubectl -o json) on stdin; prints its conditions sample as a line.
    Sample {
        /// Unix time of the sample (s).
        #[arg(long)]
        t: f64,
    },
    /// Exits 0 when the MqttCluster and its StatefulSet have finished rolling out to N pods.
    Rollout {
        #[arg(long)]
        replicas: i32,
        /// The MqttCluster (kubectl -o json).
        #[arg(long)]
        mqc: PathBuf,
        /// Its StatefulSet (kubectl -o json).
        #[arg(long)]
        statefulset: PathBuf,
    },
    /// Judges the scenario whose files are in DIR; writes DIR/scenario.json, prints a summary
    /// line.
    Scenario {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        target: Target,
        /// How long the action took (s).
        #[arg(long)]
        action_s: f64,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Writes the report from the scenario files; prints the markdown; exits 1 unless every
    /// scenario passed.
    Report {
        #[arg(long, value_enum)]
        target: Target,
        /// UTC time of the report, YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long)]
        generated_at: String,
        #[arg(long)]
        out: PathBuf,
        /// The scenario.json files, in run order.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
    /// Reads a broker's GET /api/v1/cluster on stdin; exits 0 when NAME is ready and linked.
    MemberReady {
        #[arg(long)]
        name: String,
    },
    /// Reads a broker's GET /api/v1/rebalance on stdin; exits 0 when it has live connections.
    HasConnections,
    /// Reads a CustomResourceDefinition (kubectl -o json) on stdin; exits 0 once Established
    /// (one without conditions yet is not).
    CrdEstablished,
    /// Prints the local target's `corvid.yaml` for node INDEX (built as the broker's typed
    /// configuration and validated by it).
    NodeConfig {
        #[arg(long)]
        index: u8,
        #[arg(long)]
        mqtt_port: u16,
        #[arg(long)]
        admin_port: u16,
        #[arg(long)]
        cluster_port: u16,
        /// Every node's cluster port, comma-separated.
        #[arg(long, value_delimiter = ',')]
        peer_ports: Vec<u16>,
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long, action = clap::ArgAction::Set)]
        rebalance: bool,
        /// The d-acl-change scenario's changed ACL.
        #[arg(long, action = clap::ArgAction::Set)]
        changed_acl: bool,
        /// The node's `persistence.data_dir` (durable sessions); unset keeps them in memory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn stdin_json<T: serde::de::DeserializeOwned>() -> anyhow::Result<T> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading stdin")?;
    serde_json::from_str(&text).context("parsing stdin")
}

fn yes(b: bool) -> ExitCode {
    if b {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, format!("{text}\n")).with_context(|| path.display().to_string())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    Ok(match cli.command {
        Command::Only { target, only } => {
            let names: Vec<&str> = target.parse_only(&only)?.iter().map(|s| s.name).collect();
            println!("{}", names.join(","));
            ExitCode::SUCCESS
        }
        Command::Check { name, pass } => {
            println!("{}", serde_json::to_string(&Check::new(name, pass))?);
            ExitCode::SUCCESS
        }
        Command::Sample { t } => {
            let obj: ClusterObject = stdin_json()?;
            println!("{}", serde_json::to_string(&Sample::of(&obj, t))?);
            ExitCode::SUCCESS
        }
        Command::Rollout {
            replicas,
            mqc,
            statefulset,
        } => {
            let mqc: ClusterObject = proof::read_json(&mqc)?;
            let sts: StatefulSet = proof::read_json(&statefulset)?;
            let pending = proof::rollout_pending(&mqc, &sts, replicas);
            for p in &pending {
                eprintln!("rollout pending: {p}");
            }
            yes(pending.is_empty())
        }
        Command::Scenario {
            name,
            target,
            action_s,
            dir,
        } => {
            let scenario = target.scenario(&name)?;
            let result = proof::judge_dir(&dir, scenario, target, action_s)?;
            write_json(&dir.join(files::SCENARIO), &result)?;
            println!("{}", serde_json::to_string(&result.summary())?);
            ExitCode::SUCCESS
        }
        Command::Report {
            target,
            generated_at,
            out,
            scenarios,
        } => {
            let scenarios = scenarios
                .iter()
                .map(|p| proof::read_json(p))
                .collect::<Result<Vec<_>, _>>()?;
            let report = Report {
                target,
                generated_at,
                scenarios,
            };
            write_json(&out, &report)?;
            print!("{}", report.markdown(&out.display().to_string()));
            yes(report.ok())
        }
        Command::MemberReady { name } => yes(proof::member_ready(&stdin_json()?, &name)),
        Command::HasConnections => yes(proof::has_connections(&stdin_json()?)),
        Command::CrdEstablished => yes(proof::crd_established(&stdin_json()?)),
        Command::NodeConfig {
            index,
            mqtt_port,
            admin_port,
            cluster_port,
            peer_ports,
            secret_file,
            rebalance,
            changed_acl,
            data_dir,
        } => {
            let node = corvid_e2e::local::LocalNode {
                index,
                mqtt_port,
                admin_port,
                cluster_port,
                peer_ports,
                secret_file,
                rebalance,
                changed_acl,
                data_dir,
            };
            print!("{}", node.yaml()?);
            ExitCode::SUCCESS
        }
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corvid-proofjudge: {e:#}");
            ExitCode::from(2)
        }
    }
}
