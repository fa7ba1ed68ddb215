//! `spec.eventStore`: client events written to PostgreSQL and/or Redis, rendered into the
//! broker's `event_store` section; passwords come from Secrets mounted into the pods.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Where client events are persisted; each store is optional and independent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventStoreSpec {
    /// PostgreSQL: an append-only events table and a current-state table per client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresEventStore>,
    /// Redis: a hash per client, a sorted set of online clients and a capped event stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisEventStore>,
}

/// A password inside a Secret in the cluster's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PasswordSecretRef {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret.
    #[serde(default = "default_password_key")]
    pub key: String,
}

fn default_password_key() -> String {
    "password".to_string()
}

/// Batching and buffering of one store.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventStoreTuning {
    /// Most events written in one transaction or pipeline.
    #[serde(default = "default_max_rows")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_max_rows: i64,
    /// Longest wait for more events before a batch is written, in milliseconds.
    #[serde(default = "default_linger_ms")]
    #[schemars(range(min = 0, max = 60000))]
    pub batch_linger_ms: i64,
    /// Events held per pod while the store is slow or down; newer events are dropped and counted.
    #[serde(default = "default_max_events")]
    #[schemars(range(min = 1, max = 10000000))]
    pub buffer_max_events: i64,
}

impl Default for EventStoreTuning {
    fn default() -> Self {
        EventStoreTuning {
            batch_max_rows: default_max_rows(),
            batch_linger_ms: default_linger_ms(),
            buffer_max_events: default_max_events(),
        }
    }
}

fn default_max_rows() -> i64 {
    crate::broker_default(corvid_config::StoreBatchConfig::default().max_rows)
}
fn default_linger_ms() -> i64 {
    crate::broker_default(corvid_config::StoreBatchConfig::default().linger_ms)
}
fn default_max_events() -> i64 {
    crate::broker_default(corvid_config::StoreBufferConfig::default().max_events)
}

/// The PostgreSQL event store.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.url.startsWith('postgres://') || self.url.startsWith('postgresql://')")
        .message("eventStore.postgres.url must start with postgres:// or postgresql://"),
    validation = Rule::new("!self.url.matches('^postgres(ql)?://[^/@]*:[^/@]*@')")
        .message("eventStore.postgres.url must not hold a password: use passwordSecret"),
    validation = Rule::new("!has(self.tablePrefix) || self.tablePrefix.matches('^[a-z_][a-z0-9_]{0,39}$')")
        .message("eventStore.postgres.tablePrefix: 1-40 of a-z, 0-9 and _, not starting with a digit"),
    validation = Rule::new("!has(self.events) || self.events.all(e, e == 'client.connected' || e == 'client.disconnected')")
        .message("eventStore.postgres.events: client.connected, client.disconnected")
)]
pub struct PostgresEventStore {
    /// postgres://user@host:port/dbname (libpq keywords as query parameters work); no password.
    #[schemars(length(max = 2048))]
    pub url: String,
    /// Secret holding the password; mounted into the pods and re-read on every reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<PasswordSecretRef>,
    /// Prefix of the table names ({prefix}client_events, {prefix}clients, {prefix}messages).
    #[serde(default = "default_table_prefix")]
    pub table_prefix: String,
    /// Client events recorded; empty means both client.connected and client.disconnected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2), inner(length(max = 32)))]
    pub events: Vec<String>,
    /// PUBLISHes on topics matching these filters are written to {prefix}messages (at most 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 1024)))]
    pub message_filters: Vec<String>,
    /// Batching and buffering.
    #[serde(default)]
    pub tuning: EventStoreTuning,
}

fn default_table_prefix() -> String {
    corvid_config::PostgresStoreConfig::default().table_prefix
}

/// The Redis event store.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.url.startsWith('redis://')")
        .message("eventStore.redis.url must start with redis:// (TLS is not supported yet)"),
    validation = Rule::new("!self.url.matches('^redis://[^/@]*:[^/@]*@')")
        .message("eventStore.redis.url must not hold a password: use passwordSecret"),
    validation = Rule::new("!has(self.keyPrefix) || !self.keyPrefix.contains(' ')")
        .message("eventStore.redis.keyPrefix must not contain spaces"),
    validation = Rule::new("!has(self.events) || self.events.all(e, e == 'client.connected' || e == 'client.disconnected')")
        .message("eventStore.redis.events: client.connected, client.disconnected")
)]
pub struct RedisEventStore {
    /// redis://host:port/db; no password.
    #[schemars(length(max = 2048))]
    pub url: String,
    /// ACL user name (Redis 6+); unset means the default user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Secret holding the password; mounted into the pods and re-read on every reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<PasswordSecretRef>,
    /// Prefix of every key ({prefix}client:<id>, {prefix}online, {prefix}events).
    #[serde(default = "default_key_prefix")]
    #[schemars(length(max = 64))]
    pub key_prefix: String,
    /// Approximate length cap of the event stream (XADD MAXLEN ~ N).
    #[serde(default = "default_stream_max_len")]
    #[schemars(range(min = 1))]
    pub stream_max_len: i64,
    /// Client events recorded; empty means both client.connected and client.disconnected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2), inner(length(max = 32)))]
    pub events: Vec<String>,
    /// PUBLISHes on topics matching these filters are added to the event stream (at most 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 1024)))]
    pub message_filters: Vec<String>,
    /// Batching and buffering.
    #[serde(default)]
    pub tuning: EventStoreTuning,
}

fn default_key_prefix() -> String {
    corvid_config::RedisStoreConfig::default().key_prefix
}
fn default_stream_max_len() -> i64 {
    crate::broker_default(corvid_config::RedisStoreConfig::default().stream_maxlen)
}
