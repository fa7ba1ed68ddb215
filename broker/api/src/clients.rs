//! Client endpoints: the client list and detail, kicking, subscriptions and routes — what
//! people look at (through `ctl`) when one device misbehaves.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::wire::wire_enum;

wire_enum! {
    /// The MQTT protocol level a client connected with, as the API names it.
    pub enum ProtocolVersion {
        /// MQTT 3.1 (protocol level 3), handled as 3.1.1.
        V31 = "V31",
        /// MQTT 3.1.1 (protocol level 4).
        V311 = "V311",
        /// MQTT 5.0 (protocol level 5).
        V5 = "V5",
    }
}

impl ProtocolVersion {
    /// The version as people write it (`3.1.1`), for tables and `$SYS` payloads.
    pub fn label(self) -> &'static str {
        match self {
            ProtocolVersion::V31 => "3.1",
            ProtocolVersion::V311 => "3.1.1",
            ProtocolVersion::V5 => "5.0",
            ProtocolVersion::Unknown => "unknown",
        }
    }
}

/// What the broker knows about a connected client's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConnection {
    /// Connection id, unique on this node.
    pub id: u64,
    /// Client address (after the PROXY protocol).
    pub peer: SocketAddr,
    /// Listener name.
    pub listener: String,
    /// Protocol version.
    pub protocol: ProtocolVersion,
    /// Negotiated keep alive, seconds.
    pub keep_alive: u16,
    /// User name, if any.
    pub username: Option<String>,
    /// Connect time, seconds since the Unix epoch.
    pub connected_at: u64,
}

/// One session in `GET /api/v1/clients`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Client id.
    pub client_id: String,
    /// Whether a connection is attached.
    pub connected: bool,
    /// The connection, when connected (`null` otherwise).
    pub connection: Option<ClientConnection>,
    /// Number of subscriptions.
    pub subscriptions: u64,
    /// Messages queued for it.
    pub queued: u64,
    /// Messages sent and not yet acknowledged.
    pub inflight: u64,
    /// Messages dropped (queue full, expired).
    pub dropped: u64,
    /// Session expiry interval, seconds (`4294967295`: never).
    pub session_expiry: u32,
}

/// `GET /api/v1/clients`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientList {
    /// Number of entries in `clients`.
    pub count: u64,
    /// The sessions that passed the filter, by client id.
    pub clients: Vec<ClientInfo>,
}

/// One subscription in a client's detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSubscription {
    /// Topic filter (with any `$share/{group}/` prefix).
    pub filter: String,
    /// Granted maximum QoS.
    pub qos: u8,
}

/// `GET /api/v1/clients/{id}`: the session with its subscriptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientDetail {
    /// The same fields as in the list.
    #[serde(flatten)]
    pub info: ClientInfo,
    /// Its subscriptions.
    pub subscription_list: Vec<ClientSubscription>,
}

/// Query of `GET /api/v1/clients`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFilter {
    /// Substring of the client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub like: Option<String>,
    /// Only connected (`true`) or only offline (`false`) sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// Exact user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Page size (default [`ClientFilter::DEFAULT_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl ClientFilter {
    /// Entries returned when the request names no limit.
    pub const DEFAULT_LIMIT: usize = 1000;
}

/// `DELETE /api/v1/clients/{id}` (and `…/kick`): whom the broker told to disconnect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kicked {
    /// The client id.
    pub kicked: String,
}

/// One subscription in `GET /api/v1/subscriptions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    /// Subscriber's client id.
    pub client_id: String,
    /// Topic filter (with any `$share/{group}/` prefix).
    pub filter: String,
    /// Granted maximum QoS.
    pub qos: u8,
    /// MQTT 5 No Local.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier (`null` when none).
    pub subscription_id: Option<u32>,
}

/// `GET /api/v1/subscriptions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionList {
    /// Number of entries.
    pub count: u64,
    /// Every subscription on this node.
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// One route in `GET /api/v1/routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Topic filter.
    pub filter: String,
    /// Node with subscribers for it.
    pub node: String,
}

/// `GET /api/v1/routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteList {
    /// Number of entries.
    pub count: u64,
    /// Distinct filters, sorted.
    pub routes: Vec<Route>,
}
