//! Integration endpoints: bridges (`/api/v1/bridges`), the event store
//! (`/api/v1/eventstore`) and webhooks (`/api/v1/webhooks`) — their connection states, last
//! errors and counters.

use serde::{Deserialize, Serialize};

use crate::wire::wire_enum;

wire_enum! {
    /// A bridge's connection to its remote.
    pub enum BridgeState {
        /// Not connected yet.
        Connecting = "connecting",
        /// Connected; messages flow.
        Up = "up",
        /// The remote is unreachable or the connection broke; retrying with backoff.
        Down = "down",
        /// The remote refused us (credentials, certificate, authorization); retrying with backoff.
        Refused = "refused",
        /// The bridge cannot work as configured (unreadable file, missing Kafka topic); retrying.
        Error = "error",
    }
}

/// One bridge in `GET /api/v1/bridges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeStatus {
    /// Name.
    pub name: String,
    /// `mqtt` or `kafka`.
    pub kind: String,
    /// Remote address (`host:port`, or the bootstrap list and topic).
    pub remote: String,
    /// Connection state.
    pub state: BridgeState,
    /// The last error, kept after recovery until the next one (see `last_error_at`).
    pub last_error: Option<String>,
    /// Unix seconds when `last_error` happened: older than `since` with `state: up` means the
    /// bridge has recovered from it.
    pub last_error_at: Option<u64>,
    /// Unix seconds when `state` last changed.
    pub since: u64,
    /// Successful connections so far.
    pub connects: u64,
    /// Messages acknowledged by the remote.
    pub sent: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Messages dropped (buffer full).
    pub dropped: u64,
    /// Remote messages published here.
    pub received: u64,
    /// Messages not yet delivered: in the buffer plus those the worker holds.
    pub buffered: u64,
    /// Buffer capacity.
    pub capacity: u64,
}

/// `GET /api/v1/bridges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeList {
    /// Every configured bridge.
    pub bridges: Vec<BridgeStatus>,
}

wire_enum! {
    /// An event-store sink's state.
    pub enum SinkState {
        /// Not connected yet.
        Connecting = "connecting",
        /// Connected; the last write (if any) succeeded.
        Up = "up",
        /// Unreachable: connection refused, timed out or lost.
        Down = "down",
        /// The store refused the credentials.
        AuthFailed = "auth_failed",
        /// Reachable, but it rejected a write.
        Error = "error",
    }
}

/// One sink in `GET /api/v1/eventstore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkReport {
    /// `postgres` or `redis`.
    pub sink: String,
    /// Where it writes, without the password.
    pub target: String,
    /// Current state.
    pub state: SinkState,
    /// When it entered that state (ms since the epoch).
    pub since_ms: u64,
    /// Last fault message, if any.
    pub last_error: Option<String>,
    /// When the last fault happened (ms since the epoch).
    pub last_error_at_ms: Option<u64>,
    /// When a batch was last written (ms since the epoch).
    pub last_write_at_ms: Option<u64>,
    /// Events written.
    pub written: u64,
    /// Events given up after `retry.max_attempts` rejected writes.
    pub failed: u64,
    /// Events dropped because the buffer was full (or left over at shutdown).
    pub dropped: u64,
    /// Events waiting to be written.
    pub buffered: u64,
    /// Buffer size (`buffer.max_events`).
    pub buffer_capacity: u64,
    /// Client events recorded.
    pub events: Vec<String>,
    /// Message topic filters recorded.
    pub message_filters: Vec<String>,
}

/// `GET /api/v1/eventstore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventStoreStatus {
    /// The answering node.
    pub node: String,
    /// Whether any sink is configured.
    pub enabled: bool,
    /// Every configured sink.
    pub sinks: Vec<SinkReport>,
}

wire_enum! {
    /// How a webhook's endpoint is doing, as the last delivery or idle check found it.
    pub enum WebhookState {
        /// Nothing delivered or checked yet.
        Unchecked = "unchecked",
        /// The endpoint accepts connections and the last delivery (if any) succeeded.
        Up = "up",
        /// The endpoint cannot be reached or answered with an error; events are retried.
        Down = "down",
        /// The endpoint refused us (HTTP 401 or 403): check the configured headers.
        Refused = "refused",
    }
}

/// One webhook in `GET /api/v1/webhooks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookStatus {
    /// Name.
    pub name: String,
    /// Endpoint.
    pub url: String,
    /// State.
    pub state: WebhookState,
    /// The last error, kept after recovery until the next one (see `last_error_at`).
    pub last_error: Option<String>,
    /// Unix seconds when `last_error` happened: older than `since` with `state: up` means the
    /// webhook has recovered from it.
    pub last_error_at: Option<u64>,
    /// Unix seconds when `state` last changed.
    pub since: u64,
    /// Events posted successfully.
    pub delivered: u64,
    /// Events given up after all retries.
    pub failed: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events not yet delivered: queued, plus the one being posted or retried.
    pub buffered: u64,
}

/// `GET /api/v1/webhooks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookList {
    /// The answering node.
    pub node: String,
    /// Every configured webhook.
    pub webhooks: Vec<WebhookStatus>,
}
