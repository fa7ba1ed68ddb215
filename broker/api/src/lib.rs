//! The broker's admin HTTP API as types: every request body, query and response of `/api/v1/*`,
//! with its states as enums. The broker serializes these, and `ctl`, the operator and the e2e
//! tools deserialize the same types, so a field or a state name is written once and the parties
//! cannot drift apart (as the operator's list of "not joined" states once did).
//!
//! The crate is deliberately light (serde only, no async runtime, no HTTP stack) because the
//! operator and the e2e tools depend on it. Each state enum keeps its wire strings in one table
//! ([`wire_enum!`]) and reads any string it does not know as `Unknown`, so an older reader of a
//! newer broker degrades to "not a state I can rely on" instead of failing.

mod clients;
mod cluster;
mod integrations;
mod trace;
mod wire;

pub use clients::{
    ClientConnection, ClientDetail, ClientFilter, ClientInfo, ClientList, ClientSubscription,
    Kicked, ProtocolVersion, Route, RouteList, SubscriptionInfo, SubscriptionList,
};
pub use cluster::{
    ClusterView, EvacuateOptions, EvacuationState, EvacuationStatus, KeyRingView, Member,
    MemberState, RebalanceBalance, RebalanceOptions, RebalanceState, RebalanceStatus,
};
pub use integrations::{
    BridgeList, BridgeState, BridgeStatus, EventStoreStatus, SinkReport, SinkState, WebhookList,
    WebhookState, WebhookStatus,
};
pub use trace::{TraceInfo, TraceKind, TraceList, TraceRequest, TraceTarget};

use serde::{Deserialize, Serialize};

/// The body of every error answer (4xx, 5xx) of `/api/*`: one message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in words.
    pub error: String,
}

impl ErrorBody {
    /// An error body saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        ErrorBody {
            error: message.into(),
        }
    }
}

/// `GET /api/v1/stats`: the node's identity and its headline counters, for `ctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Node name.
    pub node: String,
    /// The broker's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Seconds since the broker started.
    pub uptime_seconds: u64,
    /// Connected clients.
    pub connections: i64,
    /// Sessions held (online and offline).
    pub sessions: i64,
    /// Subscriptions over all sessions.
    pub subscriptions: i64,
    /// Distinct filters routed here.
    pub routes: i64,
    /// Retained messages.
    pub retained: i64,
    /// Messages queued for sessions.
    pub queued: i64,
    /// Messages sent and not yet acknowledged.
    pub inflight: i64,
    /// PUBLISH packets received, all QoS.
    pub messages_received: u64,
    /// PUBLISH packets sent, all QoS.
    pub messages_sent: u64,
}

#[cfg(test)]
mod tests;
