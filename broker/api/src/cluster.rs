//! Cluster endpoints: the member list (`/api/v1/cluster`), evacuation (`/api/v1/evacuate`) and
//! rebalancing (`/api/v1/rebalance`) — what the operator reads to gate rollouts and drain pods.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wire::wire_enum;

wire_enum! {
    /// A member's state in `GET /api/v1/cluster`; the broker's gossip carries the same strings
    /// for the states a node announces about itself (`joining`, `ready`, `evacuating`).
    pub enum MemberState {
        /// The answering node itself (not evacuating).
        Itself = "self",
        /// Joined and synced: takes sessions and redirected clients.
        Ready = "ready",
        /// Known through gossip but not synced yet.
        Joining = "joining",
        /// Moving its clients away (still a member until its pod goes).
        Evacuating = "evacuating",
        /// Gone without leaving cleanly: gossip declared it dead (listed for a grace period).
        Dead = "dead",
    }
}

impl MemberState {
    /// Whether a member in this state is a full member of the cluster (the operator's rollout
    /// gate): dead, joining and unknown members are not.
    pub fn joined(self) -> bool {
        match self {
            MemberState::Itself | MemberState::Ready | MemberState::Evacuating => true,
            MemberState::Joining | MemberState::Dead | MemberState::Unknown => false,
        }
    }
}

/// One member in `GET /api/v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node (pod) name.
    pub name: String,
    /// Membership state.
    pub state: MemberState,
    /// Routes it has (for the answering node: its own filters).
    #[serde(default)]
    pub routes: u64,
    /// Its inter-node link address (none for the answering node and dead members).
    #[serde(default)]
    pub addr: Option<String>,
    /// Whether the answering node's link to it is up.
    #[serde(default)]
    pub linked: bool,
}

/// `GET /api/v1/cluster`: the cluster as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The answering node.
    pub node: String,
    /// Whether it has synced routes with every live peer (always true on a single node).
    #[serde(default)]
    pub synced: bool,
    /// Every member it knows, itself first.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The cluster secrets it holds, by fingerprint (absent on a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<KeyRingView>,
}

/// The answering node's cluster key ring in `GET /api/v1/cluster`, by fingerprint only (never a
/// key): what a secret rotation waits on before its next phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRingView {
    /// Fingerprint of the primary secret: links are dialled and gossip sealed with it.
    pub primary: String,
    /// Fingerprints of the other accepted secrets.
    #[serde(default)]
    pub accepted: Vec<String>,
    /// Unix second a peer last used one of the accepted (non-primary) secrets for a link or a
    /// gossip datagram here; none since this process started if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_last_used: Option<u64>,
}

impl ClusterView {
    /// Whether `pod` is a full member in this view. A pod that restarted under the same name may
    /// be listed twice for a moment (its old incarnation dead); any joined entry counts.
    pub fn joined(&self, pod: &str) -> bool {
        self.members
            .iter()
            .any(|m| m.name == pod && m.state.joined())
    }
}

wire_enum! {
    /// Where an evacuation stands (`GET /api/v1/evacuate`).
    pub enum EvacuationState {
        /// Never started: the node serves normally.
        Idle = "idle",
        /// Moving clients and sessions away.
        Running = "running",
        /// Finished: nothing is left to move (or, on a single node, it stopped accepting).
        Done = "done",
    }
}

/// `GET`/`POST /api/v1/evacuate`: evacuation progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvacuationStatus {
    /// Where it stands.
    pub state: EvacuationState,
    /// Connected clients still on this node.
    #[serde(default)]
    pub remaining_clients: u64,
    /// Sessions still on this node.
    #[serde(default)]
    pub remaining_sessions: u64,
    /// Sessions handed to peers so far.
    #[serde(default)]
    pub handed_off: u64,
}

impl Default for EvacuationStatus {
    fn default() -> Self {
        EvacuationStatus {
            state: EvacuationState::Idle,
            remaining_clients: 0,
            remaining_sessions: 0,
            handed_off: 0,
        }
    }
}

/// Query of `POST /api/v1/evacuate` (the broker reads options from the query string only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvacuateOptions {
    /// Clients moved per second (default [`EvacuateOptions::DEFAULT_RATE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    /// Server reference sent with MQTT 5 DISCONNECT 0x9C: a member's MQTT address or one of
    /// `admin.server_references`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_reference: Option<String>,
    /// The Kubernetes pod UID the request is meant for: a broker that knows its own UID
    /// (`node.uid`, `POD_UID`) and has another one refuses with 409, so a request sent to a pod
    /// that was replaced meanwhile (same name, new instance) never evacuates the new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl EvacuateOptions {
    /// Clients moved per second when the request names no rate.
    pub const DEFAULT_RATE: u32 = 100;

    /// The query string the broker reads these options from (`rate=200&server_reference=…`).
    pub fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(r) = self.rate {
            q.push(format!("rate={r}"));
        }
        if let Some(s) = &self.server_reference {
            q.push(format!(
                "server_reference={}",
                crate::wire::percent_encode(s)
            ));
        }
        if let Some(u) = &self.pod_uid {
            q.push(format!("pod_uid={}", crate::wire::percent_encode(u)));
        }
        q.join("&")
    }
}

wire_enum! {
    /// What the rebalancer is doing (`GET /api/v1/rebalance`).
    pub enum RebalanceState {
        /// Never checked.
        Idle = "idle",
        /// The last check found nothing to shed.
        Balanced = "balanced",
        /// Shedding connections towards less-loaded members.
        Running = "running",
        /// Waiting for the targets' new counts before the next check.
        Settling = "settling",
        /// A requested round finished while the periodic check is off.
        Done = "done",
        /// No target, or every client here moved recently.
        Waiting = "waiting",
    }
}

/// `GET`/`POST /api/v1/rebalance`: the rebalancer's state. A single node reports only the
/// first four fields; a clustered node adds [`RebalanceBalance`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceStatus {
    /// Whether the periodic check runs (`cluster.rebalance.enabled`).
    pub enabled: bool,
    /// Connections per second moved at most.
    pub rate: u32,
    /// What it is doing.
    pub state: RebalanceState,
    /// This node's live connections now.
    pub connections: u64,
    /// The balance figures; absent on a single node.
    #[serde(flatten)]
    pub balance: Option<RebalanceBalance>,
}

/// The figures a clustered node's rebalancer reports besides its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceBalance {
    /// The mean over this node and its possible targets at the last check.
    pub mean: f64,
    /// Connections each possible target (ready, linked, not evacuating) gossips now.
    pub targets: BTreeMap<String, u64>,
    /// Connections the last check decided to shed.
    pub planned: u64,
    /// Connections moved away by rebalancing since start.
    pub moved_total: u64,
    /// Seconds since the last check; `null` before the first.
    pub last_check_seconds_ago: Option<u64>,
}

/// Query of `POST /api/v1/rebalance`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceOptions {
    /// Clients moved per second (default `cluster.rebalance.rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
}

impl RebalanceOptions {
    /// The query string the broker reads these options from (`rate=200`).
    pub fn query(&self) -> String {
        self.rate.map(|r| format!("rate={r}")).unwrap_or_default()
    }
}
