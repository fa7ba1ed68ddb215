//! The live proof's judge (`e2e/live-proof`, issue #8): which scenarios exist, what each must
//! show to pass, and the report the proof writes — typed and unit-tested, because these rules
//! are the product's headline guarantee. The bash script only orchestrates (kubectl, liveload,
//! timing) and calls `corvid-proofjudge` (`src/bin/proofjudge.rs`) for every decision.
//!
//! Pass rules per scenario (`ok` = every check passes):
//! - every scenario: no liveload error, nothing left unacknowledged, no PUBACK refused, no
//!   reconnect gap over [`MAX_RECONNECT_GAP_S`];
//! - every scenario, kill -9 included: 0 acknowledged messages lost and every reconnect resumed
//!   its session (CONNACK session present = 1). The brokers keep durable sessions
//!   (`persistence.data_dir`; a PersistentVolumeClaim per pod in kubernetes mode), so a killed
//!   node comes back with its data and its clients take their sessions over (docs/cluster.md,
//!   "Node failure: the guarantee");
//! - the upgrade finishes in under [`UPGRADE_MAX_S`];
//! - in kubernetes mode also: the runner's soft checks, Degraded never True, Available True after
//!   the action, and Progressing True during it for the scenarios that change the spec (not the
//!   pod deletion or the kill).

use std::fmt;
use std::path::{Path, PathBuf};

use corvid_api::{ClusterView, MemberState, RebalanceStatus};
use corvid_crds::MqttClusterStatus;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Longest time any client may wait to reconnect in a passing scenario (seconds).
pub const MAX_RECONNECT_GAP_S: f64 = 10.0;
/// The upgrade scenario's rollout must take less than this (seconds).
pub const UPGRADE_MAX_S: f64 = 180.0;

/// Files in a scenario's work directory, written by the runner and read by the judge.
pub mod files {
    /// corvid-liveload's report (`--report`).
    pub const LOAD: &str = "load.json";
    /// The runner's soft checks, one [`super::Check`] per line.
    pub const CHECKS: &str = "checks.jsonl";
    /// Kubernetes mode: one [`super::Sample`] of the MqttCluster per line while the scenario ran.
    pub const CONDITIONS: &str = "conditions.jsonl";
    /// Kubernetes mode: the MqttCluster as `kubectl get -o json` showed it after the action.
    pub const AFTER: &str = "mqc-after.json";
    /// The judged scenario ([`super::ScenarioResult`]).
    pub const SCENARIO: &str = "scenario.json";
}

/// What can go wrong judging the proof: bad names or unreadable inputs, never a failed rule
/// (a failed rule is a `pass: false` check in the report).
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// `--only` or a scenario name that the target does not run.
    #[error("unknown scenario {name:?} for --target {target} (known: {known})")]
    UnknownScenario {
        /// The name given.
        name: String,
        /// The target it was looked up for.
        target: Target,
        /// The names that target runs, comma-separated.
        known: String,
    },
    /// `--only` given but naming nothing.
    #[error("--only names no scenario")]
    EmptyOnly,
    /// A required input file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An input file did not hold what its type says.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// Where the proof runs: the cluster under test and how actions are carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// corvid-broker processes on loopback; actions are signals and restarts.
    Local,
    /// An MqttCluster run by the operator; actions are spec patches, pod deletion, SIGKILL.
    Kubernetes,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Local => "local",
            Target::Kubernetes => "kubernetes",
        })
    }
}

/// What a scenario does to the cluster (the report's `kind`). Nothing may be lost in any of
/// them; only the upgrade has a time limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A planned change (scale, pod deletion, config roll).
    Planned,
    /// kill -9 of a broker, which comes back with its durable sessions (its data directory or
    /// volume): held to the planned rules.
    Kill,
    /// A version upgrade: planned, and under [`UPGRADE_MAX_S`].
    Upgrade,
}

/// One scenario of the proof, as the runner names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Name in `--only`, the report and the work directory.
    pub name: &'static str,
    /// What the action is.
    pub kind: Kind,
    /// The action changes the MqttCluster's spec, so the operator must report Progressing=True
    /// during it (kubernetes mode).
    pub changes_spec: bool,
}

const fn scenario(name: &'static str, kind: Kind, changes_spec: bool) -> Scenario {
    Scenario {
        name,
        kind,
        changes_spec,
    }
}

/// The scenarios of `--target kubernetes`, in the order they run.
pub const KUBERNETES_SCENARIOS: &[Scenario] = &[
    scenario("a-upgrade", Kind::Upgrade, true),
    scenario("b-scale-3-5-3", Kind::Planned, true),
    scenario("c-delete-pod", Kind::Planned, false),
    scenario("c-kill-9", Kind::Kill, false),
    scenario("d-acl-change", Kind::Planned, true),
];

/// The scenarios of `--target local` (process-level stand-ins), in the order they run.
pub const LOCAL_SCENARIOS: &[Scenario] = &[
    scenario("a-rolling-upgrade", Kind::Upgrade, true),
    scenario("b-scale-3-5-3", Kind::Planned, true),
    scenario("c-delete-pod", Kind::Planned, false),
    scenario("c-kill-9", Kind::Kill, false),
    scenario("d-acl-change", Kind::Planned, true),
];

impl Target {
    /// The scenarios this target runs, in order.
    pub fn scenarios(self) -> &'static [Scenario] {
        match self {
            Target::Local => LOCAL_SCENARIOS,
            Target::Kubernetes => KUBERNETES_SCENARIOS,
        }
    }

    /// The scenario called `name` on this target.
    pub fn scenario(self, name: &str) -> Result<&'static Scenario, ProofError> {
        self.scenarios()
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ProofError::UnknownScenario {
                name: name.to_string(),
                target: self,
                known: self
                    .scenarios()
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(","),
            })
    }

    /// `--only NAME[,NAME…]`: the selected scenarios in run order, each once; an unknown name
    /// is an error up front instead of a proof that silently runs nothing.
    pub fn parse_only(self, only: &str) -> Result<Vec<&'static Scenario>, ProofError> {
        let mut wanted = Vec::new();
        for name in only.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            wanted.push(self.scenario(name)?.name);
        }
        if wanted.is_empty() {
            return Err(ProofError::EmptyOnly);
        }
        Ok(self
            .scenarios()
            .iter()
            .filter(|s| wanted.contains(&s.name))
            .collect())
    }
}

/// corvid-liveload's report (`src/bin/liveload.rs`, `account`): the figures the rules read, and
/// everything else it wrote, kept as it is for the scenario report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The scenario name liveload was given.
    pub name: String,
    /// How long liveload measured (s).
    pub duration_s: f64,
    /// The figures and the rest of the report.
    #[serde(flatten)]
    pub figures: LoadFigures,
}

/// The figures of a liveload run that the scenario report carries (see liveload's module doc for
/// what each counts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadFigures {
    /// Distinct numbered messages sent.
    pub published: u64,
    /// Messages the broker acknowledged with a successful PUBACK.
    pub acked: u64,
    /// PUBACKs with an error reason.
    pub refused: u64,
    /// Messages never acknowledged.
    pub unacked: u64,
    /// Messages every expected subscriber received.
    pub received_unique: u64,
    /// Acknowledged messages some expected subscriber never received.
    pub lost: u64,
    /// Missing deliveries to subscribers whose session was never lost (diagnostic: every loss
    /// fails a scenario).
    pub lost_deliveries_to_live_sessions: u64,
    /// Extra copies received.
    pub duplicates: u64,
    /// Longest time a client waited to reconnect (s).
    pub max_reconnect_gap_s: f64,
    /// Subscriber reconnects that got CONNACK session-present = 0.
    pub sessions_lost_subscribers: u64,
    /// Publisher reconnects that got CONNACK session-present = 0.
    pub sessions_lost_publishers: u64,
    /// Why liveload failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Everything else liveload reported (diagnostics), unchanged.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One named pass/fail check of a scenario (the report's `checks`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked, in words.
    pub check: String,
    /// Whether it held.
    pub pass: bool,
}

impl Check {
    /// A check named `check` that passed iff `pass`.
    pub fn new(check: impl Into<String>, pass: bool) -> Self {
        Check {
            check: check.into(),
            pass,
        }
    }
}

/// An MqttCluster as `kubectl get -o json` prints it; only what the proof reads. A status the
/// operator has not written yet (or one without conditions) reads as empty, never as an error.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClusterObject {
    /// Object metadata (the generation).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The operator's status, defaulted when absent.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: MqttClusterStatus,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl ClusterObject {
    /// True when a condition of type `kind` has status `status`.
    pub fn has_condition(&self, kind: &str, status: &str) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.type_ == kind && c.status == status)
    }

    fn count_conditions(&self, kind: &str, status: &str, reason: Option<&str>) -> usize {
        self.status
            .conditions
            .iter()
            .filter(|c| c.type_ == kind && c.status == status)
            .filter(|c| reason.is_none_or(|r| c.reason == r))
            .count()
    }
}

/// One condition in a [`Sample`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditionState {
    /// Condition type (Available, Progressing, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// True, False or Unknown.
    pub status: String,
    /// The operator's reason.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The MqttCluster's state at one instant of a scenario (the report's `conditions_timeline`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Unix time of the sample (s).
    pub t: f64,
    /// metadata.generation.
    pub generation: Option<i64>,
    /// status.observedGeneration.
    pub observed: Option<i64>,
    /// status.readyReplicas.
    pub ready: Option<i32>,
    /// status.conditions (empty before the operator wrote any).
    #[serde(default)]
    pub conditions: Vec<ConditionState>,
}

impl Sample {
    /// The sample of `obj` taken at `t`.
    pub fn of(obj: &ClusterObject, t: f64) -> Self {
        Sample {
            t,
            generation: obj.metadata.generation,
            observed: obj.status.observed_generation,
            ready: Some(obj.status.ready_replicas),
            conditions: obj
                .status
                .conditions
                .iter()
                .map(|c| ConditionState {
                    kind: c.type_.clone(),
                    status: c.status.clone(),
                    reason: Some(c.reason.clone()),
                })
                .collect(),
        }
    }

    fn has_condition(&self, kind: &str, status: &str) -> bool {
        self.conditions
            .iter()
            .any(|c| c.kind == kind && c.status == status)
    }
}

/// What still keeps a rollout to `replicas` pods from being finished; empty when it is: the
/// operator saw the latest generation, Progressing False (Complete), Available True, no operation
/// in progress, and the StatefulSet has every replica updated and ready (its updateStrategy is
/// OnDelete, so currentRevision never advances and is not checked).
pub fn rollout_pending(mqc: &ClusterObject, sts: &StatefulSet, replicas: i32) -> Vec<String> {
    let mut pending = Vec::new();
    let status = &mqc.status;
    if status.observed_generation != mqc.metadata.generation {
        pending.push(format!(
            "MqttCluster observedGeneration {:?} != generation {:?}",
            status.observed_generation, mqc.metadata.generation
        ));
    }
    if mqc.count_conditions("Progressing", "False", Some("Complete")) != 1 {
        pending.push("MqttCluster not Progressing=False (Complete)".into());
    }
    if mqc.count_conditions("Available", "True", None) != 1 {
        pending.push("MqttCluster not Available=True".into());
    }
    if status.ready_replicas != replicas || status.updated_replicas != replicas {
        pending.push(format!(
            "MqttCluster ready {} updated {} of {replicas}",
            status.ready_replicas, status.updated_replicas
        ));
    }
    if let Some(op) = &status.operation {
        pending.push(format!(
            "MqttCluster operation {:?} on {}",
            op.phase, op.pod
        ));
    }
    let sts_status = sts.status.clone().unwrap_or_default();
    if sts_status.observed_generation != sts.metadata.generation {
        pending.push(format!(
            "StatefulSet observedGeneration {:?} != generation {:?}",
            sts_status.observed_generation, sts.metadata.generation
        ));
    }
    let (have, updated, ready) = (
        sts_status.replicas,
        sts_status.updated_replicas.unwrap_or(0),
        sts_status.ready_replicas.unwrap_or(0),
    );
    if have != replicas || updated != replicas || ready != replicas {
        pending.push(format!(
            "StatefulSet replicas {have} updated {updated} ready {ready} of {replicas}"
        ));
    }
    pending
}

/// The CRD is served: its Established condition is True. A CRD the API server has not yet given
/// any conditions is simply not established yet (`kubectl wait --for condition=Established`
/// fails at once on it instead: ".status.conditions accessor error", the proof's old first
/// failure on a fresh cluster).
pub fn crd_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// What the runner observed about the cluster during a scenario, besides liveload's figures.
#[derive(Clone, Debug, PartialEq)]
pub enum Observed {
    /// Local mode: nothing besides the soft checks.
    Local,
    /// Kubernetes mode.
    Kubernetes {
        /// The MqttCluster, once a second while the scenario ran.
        timeline: Vec<Sample>,
        /// Available=True right after the action.
        available_after: bool,
    },
}

/// One judged scenario: an entry of the report's `scenarios`. `duration_s` is the action's
/// duration (the contract's figure); liveload's own is `load_duration_s`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// Published, acknowledged, lost, … as liveload counted them.
    #[serde(flatten)]
    pub figures: LoadFigures,
    /// How long liveload measured (s).
    pub load_duration_s: f64,
    /// How long the action took (s).
    pub duration_s: f64,
    /// What the action was.
    pub kind: Kind,
    /// Where it ran.
    pub target: Target,
    /// Kubernetes mode: the MqttCluster's conditions while the scenario ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions_timeline: Option<Vec<Sample>>,
    /// The runner's checks (soft checks; in kubernetes mode also the condition rules).
    pub condition_checks: Vec<Check>,
    /// Every check, liveload's and the runner's.
    pub checks: Vec<Check>,
    /// Every check passed.
    pub ok: bool,
}

/// Formats a number as jq prints it (no trailing `.0` on whole numbers), so names and tables
/// read as they always have.
fn num(x: f64) -> String {
    format!("{x}")
}

/// Judges one scenario: liveload's figures, the action's duration and what the runner observed
/// against the scenario's rules (module doc).
pub fn judge(
    scenario: &Scenario,
    target: Target,
    action_s: f64,
    load: LoadReport,
    soft_checks: Vec<Check>,
    observed: Observed,
) -> ScenarioResult {
    let f = &load.figures;
    let mut checks = vec![
        Check::new("no liveload error", f.error.is_none()),
        Check::new("nothing left unacknowledged", f.unacked == 0),
        Check::new("no PUBACK refused", f.refused == 0),
        Check::new(
            format!("reconnect gap <= {} s", num(MAX_RECONNECT_GAP_S)),
            f.max_reconnect_gap_s <= MAX_RECONNECT_GAP_S,
        ),
    ];
    // The same for kill -9 as for planned changes: the killed node's sessions are durable.
    checks.push(Check::new("0 acknowledged messages lost", f.lost == 0));
    checks.push(Check::new(
        "every session kept (CONNACK session present = 1 on every reconnect)",
        f.sessions_lost_subscribers + f.sessions_lost_publishers == 0,
    ));
    if scenario.kind == Kind::Upgrade {
        checks.push(Check::new(
            format!("upgrade under {} s", num(UPGRADE_MAX_S)),
            action_s < UPGRADE_MAX_S,
        ));
    }
    let mut condition_checks = soft_checks;
    let conditions_timeline = match observed {
        Observed::Local => None,
        Observed::Kubernetes {
            timeline,
            available_after,
        } => {
            let seen = |kind, status| timeline.iter().any(|s| s.has_condition(kind, status));
            condition_checks.push(Check::new("Degraded never True", !seen("Degraded", "True")));
            condition_checks.push(Check::new(
                "Available True after the action",
                available_after,
            ));
            if scenario.changes_spec {
                condition_checks.push(Check::new(
                    "Progressing True during the action",
                    seen("Progressing", "True"),
                ));
            }
            Some(timeline)
        }
    };
    checks.extend(condition_checks.iter().cloned());
    let ok = checks.iter().all(|c| c.pass);
    ScenarioResult {
        name: load.name,
        figures: load.figures,
        load_duration_s: load.duration_s,
        duration_s: action_s,
        kind: scenario.kind,
        target,
        conditions_timeline,
        condition_checks,
        checks,
        ok,
    }
}

fn read(path: &Path) -> Result<String, ProofError> {
    std::fs::read_to_string(path).map_err(|source| ProofError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, ProofError> {
    serde_json::from_str(text).map_err(|source| ProofError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a JSON file into `T`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ProofError> {
    parse(path, &read(path)?)
}

/// The lines of a JSON-lines file that parse as `T`; a missing file is empty, and a line cut
/// short (a poller stopped mid-write) is skipped.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, ProofError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(ProofError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Judges the scenario whose files are in `dir` (see [`files`]).
pub fn judge_dir(
    dir: &Path,
    scenario: &Scenario,
    target: Target,
    action_s: f64,
) -> Result<ScenarioResult, ProofError> {
    let load: LoadReport = read_json(&dir.join(files::LOAD))?;
    let soft_checks: Vec<Check> = read_jsonl(&dir.join(files::CHECKS))?;
    let observed = match target {
        Target::Local => Observed::Local,
        Target::Kubernetes => {
            // Not there or not readable: kubectl failed after the action, so Available was not
            // seen True.
            let available_after = read_json::<ClusterObject>(&dir.join(files::AFTER))
                .is_ok_and(|obj| obj.has_condition("Available", "True"));
            Observed::Kubernetes {
                timeline: read_jsonl(&dir.join(files::CONDITIONS))?,
                available_after,
            }
        }
    };
    Ok(judge(
        scenario,
        target,
        action_s,
        load,
        soft_checks,
        observed,
    ))
}

/// The one-line summary the runner logs after each scenario.
#[derive(Serialize)]
pub struct Summary {
    published: u64,
    acked: u64,
    received_unique: u64,
    lost: u64,
    duplicates: u64,
    max_reconnect_gap_s: f64,
    duration_s: f64,
    ok: bool,
}

impl ScenarioResult {
    /// The figures the runner logs for this scenario.
    pub fn summary(&self) -> Summary {
        Summary {
            published: self.figures.published,
            acked: self.figures.acked,
            received_unique: self.figures.received_unique,
            lost: self.figures.lost,
            duplicates: self.figures.duplicates,
            max_reconnect_gap_s: self.figures.max_reconnect_gap_s,
            duration_s: self.duration_s,
            ok: self.ok,
        }
    }
}

/// The live proof's report, `target/e2e/live-report.json` (docs: CONTRACTS.md, "live proof").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Where the proof ran.
    pub target: Target,
    /// When the report was written (UTC, `YYYY-MM-DDTHH:MM:SSZ`).
    pub generated_at: String,
    /// Every scenario that ran, in order.
    pub scenarios: Vec<ScenarioResult>,
}

impl Report {
    /// The proof passed: every scenario that ran is ok.
    pub fn ok(&self) -> bool {
        self.scenarios.iter().all(|s| s.ok)
    }

    /// The markdown the runner prints: a table of every scenario, then one line per failed
    /// scenario naming its failed checks, then where the JSON report is.
    pub fn markdown(&self, report_path: &str) -> String {
        let date = self
            .generated_at
            .split('T')
            .next()
            .unwrap_or(&self.generated_at);
        let mut out = format!("\nLive proof ({}), {date}\n\n", self.target);
        out.push_str("| scenario | published | acked | received_unique | lost | duplicates | max reconnect gap (s) | duration (s) | ok |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for s in &self.scenarios {
            let f = &s.figures;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.name,
                f.published,
                f.acked,
                f.received_unique,
                f.lost,
                f.duplicates,
                num(f.max_reconnect_gap_s),
                num(s.duration_s),
                if s.ok { "yes" } else { "**no**" }
            ));
        }
        out.push('\n');
        for s in self.scenarios.iter().filter(|s| !s.ok) {
            let failed: Vec<&str> = s
                .checks
                .iter()
                .filter(|c| !c.pass)
                .map(|c| c.check.as_str())
                .collect();
            out.push_str(&format!("{} failed: {}\n", s.name, failed.join("; ")));
        }
        out.push_str(&format!("report: {report_path}\n"));
        out
    }
}

/// `name` is a ready member that the broker answering `GET /api/v1/cluster` is linked to (the
/// local runner's "cluster formed" test).
pub fn member_ready(view: &ClusterView, name: &str) -> bool {
    view.members
        .iter()
        .any(|m| m.name == name && m.state == MemberState::Ready && m.linked)
}

/// The broker answering `GET /api/v1/rebalance` holds live client connections.
pub fn has_connections(status: &RebalanceStatus) -> bool {
    status.connections > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(overrides: Value) -> LoadReport {
        let mut v = json!({
            "name": "a-upgrade", "duration_s": 31.5,
            "published": 1000, "acked": 1000, "refused": 0, "unacked": 0,
            "received_unique": 1000, "lost": 0, "lost_deliveries": 0,
            "lost_deliveries_to_lost_sessions": 0, "lost_deliveries_to_live_sessions": 0,
            "expected_deliveries": 1000, "deliveries_unique": 1000, "duplicates": 2,
            "max_reconnect_gap_s": 1.2, "reconnects": 40,
            "sessions_lost_subscribers": 0, "sessions_lost_publishers": 0,
            "disconnects": {"0x9c": 40}, "lost_examples": [],
            "stop_reason": "stop-file", "drain": "quiet", "endpoints": "10.96.0.10:1883",
            "publishers": 50, "subscribers": 50, "groups": 5, "rate": 200.0
        });
        for (k, val) in overrides.as_object().cloned().unwrap_or_default() {
            v[k] = val;
        }
        serde_json::from_value(v).unwrap()
    }

    fn kube(timeline: Vec<Sample>, available_after: bool) -> Observed {
        Observed::Kubernetes {
            timeline,
            available_after,
        }
    }

    fn sample(conditions: &[(&str, &str)]) -> Sample {
        Sample {
            t: 1.0,
            generation: Some(2),
            observed: Some(2),
            ready: Some(3),
            conditions: conditions
                .iter()
                .map(|(k, s)| ConditionState {
                    kind: k.to_string(),
                    status: s.to_string(),
                    reason: None,
                })
                .collect(),
        }
    }

    fn failed(r: &ScenarioResult) -> Vec<&str> {
        r.checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.check.as_str())
            .collect()
    }

    fn k8s(name: &str) -> &'static Scenario {
        Target::Kubernetes.scenario(name).unwrap()
    }

    fn local_ok(name: &str, overrides: Value, action_s: f64) -> ScenarioResult {
        let scenario = Target::Local.scenario(name).unwrap();
        judge(
            scenario,
            Target::Local,
            action_s,
            load(overrides),
            vec![],
            Observed::Local,
        )
    }

    #[test]
    fn a_clean_planned_scenario_passes_with_every_check_named() {
        let r = local_ok("c-delete-pod", json!({}), 20.0);
        assert!(r.ok, "{:?}", failed(&r));
        let names: Vec<&str> = r.checks.iter().map(|c| c.check.as_str()).collect();
        assert_eq!(
            names,
            [
                "no liveload error",
                "nothing left unacknowledged",
                "no PUBACK refused",
                "reconnect gap <= 10 s",
                "0 acknowledged messages lost",
                "every session kept (CONNACK session present = 1 on every reconnect)",
            ]
        );
    }

    #[test]
    fn each_common_rule_fails_on_its_own() {
        for (overrides, check) in [
            (json!({"error": "connect: refused"}), "no liveload error"),
            (json!({"unacked": 1}), "nothing left unacknowledged"),
            (json!({"refused": 3}), "no PUBACK refused"),
            (
                json!({"max_reconnect_gap_s": 10.001}),
                "reconnect gap <= 10 s",
            ),
        ] {
            for name in ["c-delete-pod", "c-kill-9", "a-rolling-upgrade"] {
                let r = local_ok(name, overrides.clone(), 20.0);
                assert!(!r.ok, "{name} {overrides}");
                assert_eq!(failed(&r), [check], "{name} {overrides}");
            }
        }
        // The gap bound is inclusive.
        assert!(local_ok("c-delete-pod", json!({"max_reconnect_gap_s": 10.0}), 1.0).ok);
    }

    #[test]
    fn planned_scenarios_lose_nothing_and_keep_every_session() {
        // The kill -9 included: its node comes back with its durable sessions.
        for name in ["b-scale-3-5-3", "d-acl-change", "c-kill-9"] {
            let r = local_ok(name, json!({"lost": 1}), 20.0);
            assert_eq!(failed(&r), ["0 acknowledged messages lost"], "{name}");
            for key in ["sessions_lost_subscribers", "sessions_lost_publishers"] {
                let r = local_ok(name, json!({ key: 1 }), 20.0);
                assert_eq!(
                    failed(&r),
                    ["every session kept (CONNACK session present = 1 on every reconnect)"],
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn kill_is_held_to_the_planned_rules() {
        // A clean kill -9 (the node came back with its durable sessions) passes, on the same
        // checks as a planned change.
        let clean = local_ok("c-kill-9", json!({}), 20.0);
        assert!(clean.ok, "{:?}", failed(&clean));
        assert_eq!(clean.kind, Kind::Kill);
        let names = |r: &ScenarioResult| -> Vec<String> {
            r.checks.iter().map(|c| c.check.clone()).collect()
        };
        assert_eq!(
            names(&clean),
            names(&local_ok("c-delete-pod", json!({}), 20.0))
        );
        // What the kill used to be allowed: losses confined to the sessions the killed node held
        // (their clients came back to session present = 0). Now a failure on both counts.
        let lost_sessions = json!({
            "lost": 231, "lost_deliveries": 231, "lost_deliveries_to_lost_sessions": 231,
            "lost_deliveries_to_live_sessions": 0,
            "sessions_lost_subscribers": 4, "sessions_lost_publishers": 3
        });
        let r_local = local_ok("c-kill-9", lost_sessions.clone(), 20.0);
        assert!(!r_local.ok);
        assert_eq!(
            failed(&r_local),
            [
                "0 acknowledged messages lost",
                "every session kept (CONNACK session present = 1 on every reconnect)"
            ]
        );
        // The same in kubernetes mode, where the kill needs no Progressing=True.
        let kill = |report| {
            let after = kube(vec![sample(&[("Available", "True")])], true);
            judge(
                k8s("c-kill-9"),
                Target::Kubernetes,
                30.0,
                load(report),
                vec![],
                after,
            )
        };
        let r = kill(json!({}));
        assert!(r.ok, "{:?}", failed(&r));
        assert_eq!(failed(&kill(lost_sessions)), failed(&r_local));
    }

    #[test]
    fn the_upgrade_must_finish_in_under_180_s() {
        let r = local_ok("a-rolling-upgrade", json!({}), 179.999);
        assert!(r.ok);
        assert_eq!(r.checks.last().unwrap().check, "upgrade under 180 s");
        let r = local_ok("a-rolling-upgrade", json!({}), 180.0);
        assert_eq!(failed(&r), ["upgrade under 180 s"]);
        // Only the upgrade has a time limit.
        assert!(local_ok("c-delete-pod", json!({}), 500.0).ok);
    }

    #[test]
    fn kubernetes_condition_rules() {
        let good = vec![
            sample(&[("Available", "True"), ("Progressing", "True")]),
            sample(&[("Available", "True"), ("Progressing", "False")]),
        ];
        let r = judge(
            k8s("a-upgrade"),
            Target::Kubernetes,
            45.7,
            load(json!({})),
            vec![],
            kube(good.clone(), true),
        );
        assert!(r.ok, "{:?}", failed(&r));
        let names: Vec<&str> = r
            .condition_checks
            .iter()
            .map(|c| c.check.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "Degraded never True",
                "Available True after the action",
                "Progressing True during the action"
            ]
        );

        let mut degraded = good.clone();
        degraded.push(sample(&[("Degraded", "True")]));
        let r = judge(
            k8s("b-scale-3-5-3"),
            Target::Kubernetes,
            60.0,
            load(json!({})),
            vec![],
            kube(degraded, true),
        );
        assert_eq!(failed(&r), ["Degraded never True"]);

        let r = judge(
            k8s("d-acl-change"),
            Target::Kubernetes,
            60.0,
            load(json!({})),
            vec![],
            kube(good.clone(), false),
        );
        assert_eq!(failed(&r), ["Available True after the action"]);

        let flat = vec![sample(&[("Available", "True"), ("Progressing", "False")])];
        let r = judge(
            k8s("d-acl-change"),
            Target::Kubernetes,
            60.0,
            load(json!({})),
            vec![],
            kube(flat.clone(), true),
        );
        assert_eq!(failed(&r), ["Progressing True during the action"]);
        // Deleting or killing a pod does not change the spec: no Progressing needed.
        for name in ["c-delete-pod", "c-kill-9"] {
            let r = judge(
                k8s(name),
                Target::Kubernetes,
                30.0,
                load(json!({})),
                vec![],
                kube(flat.clone(), true),
            );
            assert!(r.ok, "{name}: {:?}", failed(&r));
            assert_eq!(r.condition_checks.len(), 2);
        }
        // No samples at all (the operator never wrote conditions): judged, not an error.
        let r = judge(
            k8s("c-kill-9"),
            Target::Kubernetes,
            30.0,
            load(json!({})),
            vec![],
            kube(vec![], true),
        );
        assert!(r.ok);
    }

    #[test]
    fn soft_checks_come_first_among_condition_checks_and_can_fail_the_scenario() {
        let soft = vec![Check::new(
            "rebalancing moved clients onto live-3 and live-4",
            false,
        )];
        let r = judge(
            k8s("b-scale-3-5-3"),
            Target::Kubernetes,
            60.0,
            load(json!({})),
            soft,
            kube(vec![sample(&[("Progressing", "True")])], true),
        );
        assert_eq!(
            failed(&r),
            ["rebalancing moved clients onto live-3 and live-4"]
        );
        assert_eq!(
            r.condition_checks[0].check,
            "rebalancing moved clients onto live-3 and live-4"
        );
        let soft = vec![Check::new(
            "rebalancing moved clients onto n4 and n5",
            false,
        )];
        let r = judge(
            Target::Local.scenario("b-scale-3-5-3").unwrap(),
            Target::Local,
            60.0,
            load(json!({})),
            soft,
            Observed::Local,
        );
        assert!(!r.ok);
        assert_eq!(r.condition_checks.len(), 1);
    }

    #[test]
    fn the_scenario_json_keeps_liveloads_report_and_the_contract_fields() {
        let r = local_ok("c-kill-9", json!({}), 12.345);
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "name",
            "published",
            "acked",
            "received_unique",
            "lost",
            "duplicates",
            "max_reconnect_gap_s",
            "duration_s",
            "ok",
        ] {
            assert!(v.get(key).is_some(), "contract field {key} missing: {v}");
        }
        assert_eq!(v["duration_s"], json!(12.345));
        assert_eq!(v["load_duration_s"], json!(31.5));
        assert_eq!(v["kind"], json!("kill"));
        assert_eq!(v["target"], json!("local"));
        assert!(v.get("broker_sessions_lost").is_none());
        assert!(v.get("conditions_timeline").is_none());
        assert_eq!(v["disconnects"], json!({"0x9c": 40}));
        assert_eq!(v["drain"], json!("quiet"));
        assert!(v.get("error").is_none());
        // And it reads back as itself (the report step reads the scenario files).
        let back: ScenarioResult = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, r);
        // A scenario file from before durable sessions (with the survivors' lost-session count)
        // still reads; the count is kept as a diagnostic, it decides nothing.
        let mut old = v;
        old["broker_sessions_lost"] = json!(7);
        let back: ScenarioResult = serde_json::from_value(old).unwrap();
        assert_eq!(back.figures.other["broker_sessions_lost"], json!(7));
        assert_eq!(back.ok, r.ok);
        let k = judge(
            k8s("c-kill-9"),
            Target::Kubernetes,
            1.0,
            load(json!({})),
            vec![],
            kube(vec![sample(&[("Available", "True")])], true),
        );
        let v = serde_json::to_value(&k).unwrap();
        assert_eq!(
            v["conditions_timeline"][0]["conditions"][0]["type"],
            "Available"
        );
        let back: ScenarioResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, k);
    }

    #[test]
    fn a_liveload_report_missing_a_figure_is_an_error_not_a_pass() {
        let mut v = serde_json::to_value(load(json!({}))).unwrap();
        v.as_object_mut().unwrap().remove("unacked");
        assert!(serde_json::from_value::<LoadReport>(v).is_err());
    }

    #[test]
    fn only_accepts_any_subset_in_run_order_and_rejects_unknown_names() {
        let names = |t: Target, s: &str| -> Vec<&str> {
            t.parse_only(s).unwrap().iter().map(|s| s.name).collect()
        };
        assert_eq!(names(Target::Kubernetes, "c-kill-9"), ["c-kill-9"]);
        assert_eq!(
            names(Target::Kubernetes, "d-acl-change, a-upgrade,d-acl-change,"),
            ["a-upgrade", "d-acl-change"]
        );
        assert_eq!(
            names(
                Target::Local,
                "c-kill-9,b-scale-3-5-3,a-rolling-upgrade,d-acl-change,c-delete-pod"
            )
            .len(),
            5
        );
        let err = Target::Local.parse_only("a-upgrade").unwrap_err();
        assert!(err.to_string().contains("a-rolling-upgrade"), "{err}");
        assert!(Target::Kubernetes.parse_only("a-rolling-upgrade").is_err());
        assert!(matches!(
            Target::Kubernetes.parse_only(" , "),
            Err(ProofError::EmptyOnly)
        ));
    }

    fn mqc(v: Value) -> ClusterObject {
        serde_json::from_value(v).unwrap()
    }

    fn condition(kind: &str, status: &str, reason: &str) -> Value {
        json!({"type": kind, "status": status, "reason": reason, "message": "",
               "lastTransitionTime": "2026-12-04T22:00:00Z"})
    }

    fn done_mqc() -> Value {
        json!({
            "metadata": {"name": "live", "generation": 3},
            "status": {"observedGeneration": 3, "readyReplicas": 3, "updatedReplicas": 3,
                       "replicas": 3,
                       "conditions": [condition("Available", "True", "AllReady"),
                                      condition("Progressing", "False", "Complete"),
                                      condition("Degraded", "False", "Healthy")]}
        })
    }

    fn sts(replicas: i32, updated: i32, ready: i32) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "live", "generation": 5},
            "spec": {"selector": {}, "serviceName": "live", "template": {}},
            "status": {"observedGeneration": 5, "replicas": replicas,
                       "updatedReplicas": updated, "readyReplicas": ready}
        }))
        .unwrap()
    }

    #[test]
    fn a_cluster_without_status_or_conditions_reads_as_empty() {
        for v in [
            json!({"metadata": {"generation": 1}}),
            json!({"metadata": {"generation": 1}, "status": null}),
            json!({"metadata": {"generation": 1}, "status": {}}),
            json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}),
        ] {
            let obj = mqc(v.clone());
            assert!(obj.status.conditions.is_empty(), "{v}");
            assert!(!obj.has_condition("Available", "True"));
            let s = Sample::of(&obj, 5.5);
            assert!(s.conditions.is_empty());
            assert_eq!(s.generation, Some(1));
            assert!(!rollout_pending(&obj, &sts(3, 3, 3), 3).is_empty());
        }
    }

    #[test]
    fn rollout_done_needs_every_condition() {
        assert_eq!(
            rollout_pending(&mqc(done_mqc()), &sts(3, 3, 3), 3),
            Vec::<String>::new()
        );
        assert!(!rollout_pending(&mqc(done_mqc()), &sts(3, 3, 3), 5).is_empty());
        assert!(!rollout_pending(&mqc(done_mqc()), &sts(3, 2, 3), 3).is_empty());
        assert!(!rollout_pending(&mqc(done_mqc()), &sts(3, 3, 2), 3).is_empty());
        assert!(!rollout_pending(&mqc(done_mqc()), &sts(4, 3, 3), 3).is_empty());
        let mut stale = sts(3, 3, 3);
        stale.metadata.generation = Some(6);
        assert!(!rollout_pending(&mqc(done_mqc()), &stale, 3).is_empty());
        let tweaks: [(&str, Value); 6] = [
            ("/status/observedGeneration", json!(2)),
            ("/status/readyReplicas", json!(2)),
            ("/status/updatedReplicas", json!(2)),
            (
                "/status/conditions/1",
                condition("Progressing", "True", "Rolling"),
            ),
            (
                "/status/conditions/0",
                condition("Available", "False", "NotReady"),
            ),
            (
                "/status/operation",
                json!({"phase": "evacuating", "pod": "live-1", "since": "2026-12-04T22:00:00Z"}),
            ),
        ];
        for (pointer, value) in tweaks {
            let mut v = done_mqc();
            match v.pointer_mut(pointer) {
                Some(slot) => *slot = value,
                None => {
                    v["status"]["operation"] = value;
                }
            }
            assert_eq!(
                rollout_pending(&mqc(v), &sts(3, 3, 3), 3).len(),
                1,
                "{pointer}"
            );
        }
    }

    #[test]
    fn samples_carry_the_conditions_and_counts() {
        let s = Sample::of(&mqc(done_mqc()), 12.5);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            json!({"t": 12.5, "generation": 3, "observed": 3, "ready": 3, "conditions": [
                {"type": "Available", "status": "True", "reason": "AllReady"},
                {"type": "Progressing", "status": "False", "reason": "Complete"},
                {"type": "Degraded", "status": "False", "reason": "Healthy"}]})
        );
    }

    #[test]
    fn the_report_markdown_is_the_table_then_the_failures() {
        let ok = local_ok("c-delete-pod", json!({"max_reconnect_gap_s": 0.0}), 20.5);
        let bad = local_ok("c-kill-9", json!({"unacked": 2, "refused": 1}), 30.0);
        let report = Report {
            target: Target::Local,
            generated_at: "2026-12-04T23:01:02Z".into(),
            scenarios: vec![ok, bad],
        };
        assert!(!report.ok());
        assert_eq!(
            report.markdown("/r/target/e2e/live-report.json"),
            "\nLive proof (local), 2026-12-04\n\n\
             | scenario | published | acked | received_unique | lost | duplicates | max reconnect gap (s) | duration (s) | ok |\n\
             |---|---|---|---|---|---|---|---|---|\n\
             | a-upgrade | 1000 | 1000 | 1000 | 0 | 2 | 0 | 20.5 | yes |\n\
             | a-upgrade | 1000 | 1000 | 1000 | 0 | 2 | 1.2 | 30 | **no** |\n\
             \n\
             a-upgrade failed: nothing left unacknowledged; no PUBACK refused\n\
             report: /r/target/e2e/live-report.json\n"
        );
        let v = serde_json::to_value(&report).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["generated_at", "scenarios", "target"]);
        let all_ok = Report {
            scenarios: vec![local_ok("c-delete-pod", json!({}), 1.0)],
            ..report
        };
        assert!(all_ok.ok());
    }

    #[test]
    fn a_fresh_crd_without_conditions_is_not_established_yet() {
        let crd = |status: Value| -> CustomResourceDefinition {
            serde_json::from_value(json!({
                "metadata": {"name": "mqttclusters.corvid.dev"},
                "spec": {"group": "corvid.dev", "names": {"kind": "MqttCluster", "plural": "mqttclusters"},
                         "scope": "Namespaced", "versions": []},
                "status": status
            }))
            .unwrap()
        };
        assert!(!crd_established(&crd(Value::Null)));
        assert!(!crd_established(&crd(json!({}))));
        assert!(!crd_established(&crd(json!({"conditions": null}))));
        assert!(!crd_established(&crd(json!({"conditions": [
            {"type": "NamesAccepted", "status": "True"},
            {"type": "Established", "status": "False"}]}))));
        assert!(crd_established(&crd(json!({"conditions": [
            {"type": "NamesAccepted", "status": "True"},
            {"type": "Established", "status": "True"}]}))));
    }

    #[test]
    fn the_live_manifest_asks_for_durable_sessions_on_the_runners_class() {
        // As e2e/live-proof fills it in (the StorageClass it makes for its static volumes).
        let path = crate::repo_root().join("e2e/live/mqttcluster.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("@IMAGE@", "corvid-broker:live-a")
            .replace("@VERSION@", "live-a")
            .replace("@REBALANCE@", "false")
            .replace("@STORAGE_CLASS@", "corvid-live");
        assert!(
            !text.contains('@'),
            "a placeholder the runner does not fill"
        );
        let cluster: corvid_crds::MqttCluster = serde_yaml::from_str(&text).unwrap();
        let p = &cluster.spec.persistence;
        assert_eq!(p.mode, corvid_crds::PersistenceMode::Pvc);
        assert_eq!(p.storage_class_name.as_deref(), Some("corvid-live"));
        // One 1Gi static volume per pod: the claims must ask for no more.
        assert_eq!(p.size, "1Gi");
        assert_eq!(
            p.retention.when_scaled,
            corvid_crds::RetentionPolicy::Retain
        );
        assert_eq!(cluster.spec.replicas, 3);
    }

    #[test]
    fn member_and_connection_views() {
        let c: ClusterView =
            serde_json::from_value(json!({"node": "n1", "synced": true, "members": [
            {"name": "n1", "state": "self", "routes": 1, "addr": null, "linked": true},
            {"name": "n2", "state": "ready", "linked": true},
            {"name": "n3", "state": "joining", "linked": true},
            {"name": "n4", "state": "ready", "linked": false}]}))
            .unwrap();
        assert!(member_ready(&c, "n2"));
        assert!(!member_ready(&c, "n1"), "self is not a peer that joined");
        assert!(!member_ready(&c, "n3"));
        assert!(!member_ready(&c, "n4"));
        assert!(!member_ready(&c, "n5"));
        let r = |n: u64| -> RebalanceStatus {
            serde_json::from_value(
                json!({"enabled": false, "rate": 100, "state": "idle", "connections": n}),
            )
            .unwrap()
        };
        assert!(!has_connections(&r(0)));
        assert!(has_connections(&r(3)));
    }
}
