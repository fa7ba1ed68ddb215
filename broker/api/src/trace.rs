//! Trace endpoints (`/api/v1/trace`): follow one client's packets, or every PUBLISH on a topic
//! filter, into a log file.

use serde::{Deserialize, Serialize};

use crate::wire::wire_enum;

wire_enum! {
    /// What a trace follows.
    pub enum TraceKind {
        /// Every packet of one client id.
        Client = "client",
        /// Every PUBLISH whose topic matches a filter.
        Topic = "topic",
    }
}

/// A trace's target as the API shows it: `{"type": "client", "value": ID}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceTarget {
    /// Client or topic.
    #[serde(rename = "type")]
    pub kind: TraceKind,
    /// The client id or the topic filter.
    pub value: String,
}

/// A running (or just stopped) trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceInfo {
    /// Name.
    pub name: String,
    /// What it follows.
    pub target: TraceTarget,
    /// Log file on the broker's disk.
    pub file: String,
    /// Start (epoch seconds).
    pub started_at: u64,
    /// Planned end (epoch seconds).
    pub ends_at: u64,
    /// Lines written.
    pub lines: u64,
}

/// `GET /api/v1/trace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceList {
    /// Number of entries.
    pub count: u64,
    /// Running traces.
    pub traces: Vec<TraceInfo>,
}

/// Body of `POST /api/v1/trace`: `{"type": "client", "client_id": ID}` or
/// `{"type": "topic", "topic": FILTER}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Client or topic.
    #[serde(rename = "type")]
    pub kind: TraceKind,
    /// Client id (type `client`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Topic filter (type `topic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Seconds (default [`TraceRequest::DEFAULT_DURATION_SECS`], capped by
    /// `trace.max_duration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    /// Name; default `client-{id}` / `topic-{filter}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl TraceRequest {
    /// How long a trace runs when the request names no duration.
    pub const DEFAULT_DURATION_SECS: u64 = 600;
}
