//! Broker behaviour knobs (limits, sessions, shared subscriptions, auto subscriptions, webhooks)
//! that map one to one onto sections of the broker configuration file.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Limits enforced by every broker pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.messageRate) || self.messageRate.matches('^[0-9]+,[0-9]+$')").message("limits.messageRate must look like \"rate,burst\""),
    validation = Rule::new("!has(self.byteRate) || self.byteRate.matches('^[0-9]+,[0-9]+$')").message("limits.byteRate must look like \"rate,burst\"")
)]
pub struct LimitsSpec {
    /// Maximum concurrent client connections per pod.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1))]
    pub max_connections: i64,
    /// Maximum new connections per second per pod.
    #[serde(default = "default_max_conn_rate")]
    #[schemars(range(min = 1))]
    pub max_conn_rate: i64,
    /// Per-client publish rate as "messages-per-second,burst"; unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub message_rate: Option<String>,
    /// Per-client inbound byte rate as "bytes-per-second,burst"; unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub byte_rate: Option<String>,
    /// Maximum subscriptions per client; 0 means unlimited.
    #[serde(default = "default_max_subscriptions")]
    #[schemars(range(min = 0))]
    pub max_subscriptions: i64,
    /// Largest MQTT packet accepted, in bytes.
    #[serde(default = "default_max_packet_size")]
    #[schemars(range(min = 1024))]
    pub max_packet_size: i64,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            max_connections: default_max_connections(),
            max_conn_rate: default_max_conn_rate(),
            message_rate: None,
            byte_rate: None,
            max_subscriptions: default_max_subscriptions(),
            max_packet_size: default_max_packet_size(),
        }
    }
}

fn default_max_connections() -> i64 {
    crate::broker_default(corvid_config::LimitsConfig::default().max_connections)
}
fn default_max_subscriptions() -> i64 {
    crate::broker_default(corvid_config::LimitsConfig::default().max_subscriptions)
}
fn default_max_conn_rate() -> i64 {
    1000
}
fn default_max_packet_size() -> i64 {
    crate::broker_default(corvid_config::MqttConfig::default().max_packet_size)
}

/// Persistent sessions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionsSpec {
    /// Messages kept per offline session.
    #[serde(default = "default_offline_queue")]
    #[schemars(range(min = 0))]
    pub max_offline_queue: i64,
    /// What to do when the offline queue is full: drop_oldest or drop_new.
    #[serde(default)]
    pub queue_full_policy: QueueFullPolicy,
    /// Longest session expiry a client may ask for, in seconds.
    #[serde(default = "default_session_expiry")]
    #[schemars(range(min = 0))]
    pub max_session_expiry_seconds: i64,
}

impl Default for SessionsSpec {
    fn default() -> Self {
        SessionsSpec {
            max_offline_queue: default_offline_queue(),
            queue_full_policy: QueueFullPolicy::default(),
            max_session_expiry_seconds: default_session_expiry(),
        }
    }
}

fn default_offline_queue() -> i64 {
    crate::broker_default(corvid_config::SessionConfig::default().max_offline_queue)
}
fn default_session_expiry() -> i64 {
    crate::broker_default(corvid_config::SessionConfig::default().max_session_expiry)
}

/// Behaviour of a full offline queue.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "snake_case")]
pub enum QueueFullPolicy {
    /// Evict the oldest queued message.
    #[default]
    DropOldest,
    /// Refuse the new message.
    DropNew,
}

/// Distribution of shared-subscription messages.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "snake_case")]
pub enum SharedSubscriptionStrategy {
    /// Each member in turn.
    #[default]
    RoundRobin,
    /// A random member.
    Random,
    /// The same member until it leaves.
    Sticky,
    /// A member chosen by hashing the publisher's client id.
    HashClientid,
}

/// A subscription added for every client on connect.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AutoSubscription {
    /// Topic filter (%c = client id, %u = username).
    pub topic: String,
    /// QoS of the subscription (0, 1 or 2).
    #[serde(default)]
    #[schemars(range(min = 0, max = 2))]
    pub qos: i32,
}

/// An HTTP endpoint notified of broker events.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.url.startsWith('http://') || self.url.startsWith('https://')")
    .message("webhooks[].url must start with http:// or https://"))]
pub struct Webhook {
    /// Name used in logs and metrics.
    pub name: String,
    /// URL that receives a POST per event.
    #[schemars(length(max = 2048))]
    pub url: String,
    /// Events to send (client.connected, client.disconnected, message.publish, ...); empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}
