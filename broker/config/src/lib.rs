//! The broker's one configuration file: every field defaulted, so an empty file (or none) runs a
//! useful broker, and the operator can render exactly the sections it manages.
//!
//! Load order: embedded defaults ← YAML file ← `CORVID_SECTION__KEY` environment variables ←
//! command-line flags. Unknown keys are errors that name the field, so a typo never silently
//! falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod events;
pub mod net;

pub use events::EventKind;

/// A configuration field this build cannot serve: the cargo feature that brings it was left
/// out. Every crate with optional integrations refuses such a configuration at start with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field}: this broker was built without the `{feature}` feature")]
pub struct NotBuilt {
    /// The configuration field (`bridges.kafka`, `auth.http`, …).
    pub field: &'static str,
    /// The cargo feature that brings it.
    pub feature: &'static str,
}

impl NotBuilt {
    /// Refuses when the configuration `wants` the field and the feature is not `built`
    /// (pass `cfg!(feature = "…")`).
    pub fn check(
        wants: bool,
        built: bool,
        field: &'static str,
        feature: &'static str,
    ) -> Result<(), NotBuilt> {
        if wants && !built {
            return Err(NotBuilt { field, feature });
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded; the message always names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// YAML syntax or a field of the wrong shape (serde names the field path).
    #[error("{origin}: {message}")]
    Parse {
        /// File name or `environment`.
        origin: String,
        /// Parser message, which includes the field path.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("invalid value for `{field}`: {reason}")]
    Invalid {
        /// Dotted field path.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole broker configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity of this node in a cluster.
    pub node: NodeConfig,
    /// Logging output.
    pub log: LogConfig,
    /// Client-facing listeners.
    pub listeners: Listeners,
    /// Certificates for the TLS listeners.
    pub tls: TlsConfig,
    /// Admin HTTP endpoint (health, metrics, API).
    pub admin: AdminConfig,
    /// MQTT protocol limits and capabilities.
    pub mqtt: MqttConfig,
    /// Session persistence and offline queues.
    pub sessions: SessionConfig,
    /// Connection and message limits.
    pub limits: LimitsConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// Topic access control.
    pub acl: AclConfig,
    /// Subscriptions the server makes for every client on connect.
    pub auto_subscriptions: Vec<AutoSubscription>,
    /// Event hooks delivered to HTTP endpoints.
    pub webhooks: Vec<WebhookConfig>,
    /// Client events written to PostgreSQL and Redis.
    pub event_store: EventStoreConfig,
    /// `$SYS` topics.
    pub sys: SysConfig,
    /// Client and topic tracing.
    pub trace: TraceConfig,
    /// Inter-node clustering.
    pub cluster: ClusterConfig,
    /// Durable state.
    pub persistence: PersistenceConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Bridges to other MQTT brokers and to Kafka.
    pub bridges: BridgesConfig,
}

/// Authentication sources, tried in order: client-id allow list, users file, HTTP backend,
/// then the anonymous switch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept clients that send no user name.
    pub allow_anonymous: bool,
    /// File of `username:hash` lines (bcrypt, argon2 or pbkdf2 PHC strings); re-read on change.
    pub users_file: Option<PathBuf>,
    /// When non-empty, only these client ids may connect.
    pub client_ids: Vec<String>,
    /// HTTP authentication backend.
    pub http: Option<HttpAuthConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            users_file: None,
            client_ids: Vec::new(),
            http: None,
        }
    }
}

/// An HTTP service that decides on each CONNECT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpAuthConfig {
    /// URL that receives a JSON POST per CONNECT.
    pub url: String,
    /// Request timeout in milliseconds.
    pub timeout_ms: u64,
    /// Seconds a decision is cached for the same credentials.
    pub cache_ttl: u64,
    /// Allow connections when the backend cannot be reached (default: refuse).
    pub fail_open: bool,
    /// Extra request headers.
    pub headers: std::collections::BTreeMap<String, String>,
}

impl Default for HttpAuthConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout_ms: 5000,
            cache_ttl: 30,
            fail_open: false,
            headers: Default::default(),
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Permit.
    #[default]
    Allow,
    /// Refuse.
    Deny,
}

/// What an ACL rule governs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    /// PUBLISH.
    Publish,
    /// SUBSCRIBE.
    Subscribe,
    /// Both.
    #[default]
    All,
}

/// Whom an ACL rule applies to: `all`, or one of user / client id / address range.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum AclWho {
    /// The literal string `all`.
    All(AllClients),
    /// A user name, client id or CIDR.
    One(AclWhoOne),
}

/// The word `all`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AllClients {
    /// Every client.
    All,
}

/// One kind of client selector (exactly one field set).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AclWhoOne {
    /// User name.
    pub user: Option<String>,
    /// Client id.
    pub client_id: Option<String>,
    /// Address range, e.g. `10.0.0.0/8`.
    pub ip_cidr: Option<String>,
}

/// One ACL rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// Allow or deny when it matches.
    pub permission: Permission,
    /// Clients it applies to.
    #[serde(default = "all_clients")]
    pub who: AclWho,
    /// Actions it applies to.
    #[serde(default)]
    pub action: AclAction,
    /// Topic filters, with `%u` / `%c` placeholders; `eq FILTER` matches only that literal filter.
    pub topics: Vec<String>,
}

/// One topic of an ACL rule, parsed: what the rule compiler and validation both read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclTopic<'a> {
    /// `eq FILTER`: matches only that literal filter (a subscription to exactly `a/#`).
    Eq(&'a str),
    /// A topic filter, possibly with `%u` / `%c` placeholders.
    Filter(&'a str),
}

impl AclTopic<'_> {
    /// Parses one entry of `topics`; the error says why it is refused.
    pub fn parse(t: &str) -> Result<AclTopic<'_>, String> {
        match t.strip_prefix("eq ") {
            Some(rest) if rest.trim().is_empty() => Err("empty filter after `eq`".into()),
            Some(rest) => Ok(AclTopic::Eq(rest.trim())),
            None => corvid_proto::topic::validate_filter(t)
                .map(|()| AclTopic::Filter(t))
                .map_err(|e| e.to_string()),
        }
    }
}

fn all_clients() -> AclWho {
    AclWho::All(AllClients::All)
}

/// Ordered ACL rules; the first match decides, else `no_match`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Decision when no rule matches.
    pub no_match: Permission,
    /// Rules in order.
    pub rules: Vec<AclRule>,
}

/// A subscription made by the server for each client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AutoSubscription {
    /// Topic filter with `%c` / `%u` placeholders.
    pub topic: String,
    /// QoS.
    #[serde(default)]
    pub qos: u8,
}

/// One webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// URL receiving a JSON POST per event.
    pub url: String,
    /// Events to send (`client.connected`, `message.publish`, ...); empty = all.
    pub events: Vec<String>,
    /// Only message events whose topic matches this filter.
    pub topic: Option<String>,
    /// Extra request headers.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Request timeout in milliseconds.
    pub timeout_ms: u64,
    /// Events buffered while the endpoint is slow; more are dropped and counted.
    pub queue_size: usize,
    /// Retries per event, with exponential backoff.
    pub max_retries: u32,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: String::new(),
            events: Vec::new(),
            topic: None,
            headers: Default::default(),
            timeout_ms: 5000,
            queue_size: 10_000,
            max_retries: 3,
        }
    }
}

/// Where client events are persisted: each configured store is an independent sink with its
/// own bounded buffer, so a slow or absent database never slows MQTT clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventStoreConfig {
    /// PostgreSQL sink; unset = off.
    pub postgres: Option<PostgresStoreConfig>,
    /// Redis sink; unset = off.
    pub redis: Option<RedisStoreConfig>,
}

/// Event kinds a store records by default.
fn default_store_events() -> Vec<String> {
    vec!["client.connected".into(), "client.disconnected".into()]
}

/// Batching: a batch is written when it has `max_rows` events or its first event is
/// `linger_ms` old, whichever comes first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreBatchConfig {
    /// Most events in one write (one transaction / one pipeline).
    pub max_rows: usize,
    /// Longest wait for more events before writing, in milliseconds.
    pub linger_ms: u64,
}

impl Default for StoreBatchConfig {
    fn default() -> Self {
        Self {
            max_rows: 500,
            linger_ms: 100,
        }
    }
}

/// The bounded buffer in front of a store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreBufferConfig {
    /// Events held while the store is slow or down; newer events are dropped and counted.
    pub max_events: usize,
}

impl Default for StoreBufferConfig {
    fn default() -> Self {
        Self {
            max_events: 100_000,
        }
    }
}

/// Reconnects and retries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreRetryConfig {
    /// Longest pause between two attempts, in milliseconds (backoff doubles from 100 ms).
    pub max_backoff_ms: u64,
    /// Attempts for a batch the store rejects while reachable (a SQL error); then the batch
    /// is given up and counted as failed. Unreachable stores are retried without limit.
    pub max_attempts: u32,
    /// Connect (and, for Redis, response) timeout in milliseconds.
    pub timeout_ms: u64,
    /// How often an idle sink checks that its store still answers, in milliseconds.
    pub health_check_ms: u64,
}

impl Default for StoreRetryConfig {
    fn default() -> Self {
        Self {
            max_backoff_ms: 5000,
            max_attempts: 5,
            timeout_ms: 5000,
            health_check_ms: 10_000,
        }
    }
}

/// PostgreSQL sink: an append-only events table and a current-state table per client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresStoreConfig {
    /// `postgres://user@host:port/dbname?...`; when set, overrides host/port/dbname/user.
    /// A password in it is refused: use `password_file`.
    pub url: Option<String>,
    /// Server host name or address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Database name.
    pub dbname: String,
    /// User name.
    pub user: String,
    /// File holding the password (a mounted Secret); re-read on every reconnect.
    pub password_file: Option<PathBuf>,
    /// Prefix of the table names (`{prefix}client_events`, `{prefix}clients`, `{prefix}messages`).
    pub table_prefix: String,
    /// Client events recorded: `client.connected`, `client.disconnected`.
    pub events: Vec<String>,
    /// Messages published on topics matching these filters go to `{prefix}messages`.
    pub message_filters: Vec<String>,
    /// Batching.
    pub batch: StoreBatchConfig,
    /// Buffer in front of the database.
    pub buffer: StoreBufferConfig,
    /// Reconnects and retries.
    pub retry: StoreRetryConfig,
}

impl Default for PostgresStoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            host: "localhost".into(),
            port: 5432,
            dbname: "corvid".into(),
            user: "corvid".into(),
            password_file: None,
            table_prefix: "corvid_".into(),
            events: default_store_events(),
            message_filters: Vec::new(),
            batch: StoreBatchConfig::default(),
            buffer: StoreBufferConfig::default(),
            retry: StoreRetryConfig::default(),
        }
    }
}

/// Redis sink: a hash per client, a sorted set of online clients and a capped event stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisStoreConfig {
    /// `redis://host:port/db`; a password in it is refused: use `password_file`.
    pub url: String,
    /// ACL user name (Redis 6+); unset = the default user.
    pub username: Option<String>,
    /// File holding the password (a mounted Secret); re-read on every reconnect.
    pub password_file: Option<PathBuf>,
    /// Prefix of every key (`{prefix}client:<id>`, `{prefix}online`, `{prefix}events`).
    pub key_prefix: String,
    /// Approximate cap of the event stream (`XADD ... MAXLEN ~ N`).
    pub stream_maxlen: u64,
    /// Client events recorded: `client.connected`, `client.disconnected`.
    pub events: Vec<String>,
    /// Messages published on topics matching these filters are added to the event stream.
    pub message_filters: Vec<String>,
    /// Batching.
    pub batch: StoreBatchConfig,
    /// Buffer in front of Redis.
    pub buffer: StoreBufferConfig,
    /// Reconnects and retries.
    pub retry: StoreRetryConfig,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            url: "redis://localhost:6379/0".into(),
            username: None,
            password_file: None,
            key_prefix: "corvid:".into(),
            stream_maxlen: 100_000,
            events: default_store_events(),
            message_filters: Vec::new(),
            batch: StoreBatchConfig::default(),
            buffer: StoreBufferConfig::default(),
            retry: StoreRetryConfig::default(),
        }
    }
}

impl EventStoreConfig {
    /// Checks both sinks; errors name the field (`event_store.postgres.table_prefix`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, reason: String| ConfigError::Invalid { field, reason };
        let common = |sink: &str,
                      events: &[String],
                      filters: &[String],
                      batch: &StoreBatchConfig,
                      buffer: &StoreBufferConfig,
                      retry: &StoreRetryConfig|
         -> Result<(), ConfigError> {
            let f = |name: &str| format!("event_store.{sink}.{name}");
            if let Some(e) = events
                .iter()
                .find(|e| !matches!(e.as_str(), "client.connected" | "client.disconnected"))
            {
                return Err(invalid(
                    f("events"),
                    format!(
                        "unknown event {e:?} (client.connected, client.disconnected; \
                         messages are chosen with message_filters)"
                    ),
                ));
            }
            for (i, t) in filters.iter().enumerate() {
                if let Err(e) = corvid_proto::topic::validate_filter(t) {
                    return Err(invalid(
                        format!("event_store.{sink}.message_filters[{i}]"),
                        format!("{t:?}: {e}"),
                    ));
                }
            }
            if batch.max_rows == 0 {
                return Err(invalid(f("batch.max_rows"), "must be at least 1".into()));
            }
            if buffer.max_events == 0 {
                return Err(invalid(f("buffer.max_events"), "must be at least 1".into()));
            }
            if retry.timeout_ms == 0 {
                return Err(invalid(f("retry.timeout_ms"), "must be at least 1".into()));
            }
            if retry.health_check_ms < 100 {
                return Err(invalid(
                    f("retry.health_check_ms"),
                    "must be at least 100".into(),
                ));
            }
            if retry.max_attempts == 0 {
                return Err(invalid(
                    f("retry.max_attempts"),
                    "must be at least 1".into(),
                ));
            }
            Ok(())
        };
        if let Some(p) = &self.postgres {
            common(
                "postgres",
                &p.events,
                &p.message_filters,
                &p.batch,
                &p.buffer,
                &p.retry,
            )?;
            if let Some(url) = &p.url {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(invalid(
                        "event_store.postgres.url".into(),
                        "must start with postgres:// or postgresql://".into(),
                    ));
                }
                // A password in the URL ends up in ConfigMaps, logs and `ps`; the CRD's
                // CEL refuses it too.
                url_without_password(url)
                    .map_err(|e| invalid("event_store.postgres.url".into(), e))?;
            } else if p.host.is_empty() {
                return Err(invalid(
                    "event_store.postgres.host".into(),
                    "set host (or url)".into(),
                ));
            }
            let prefix_ok = !p.table_prefix.is_empty()
                && p.table_prefix.len() <= 40
                && p.table_prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !p.table_prefix.starts_with(|c: char| c.is_ascii_digit());
            if !prefix_ok {
                return Err(invalid(
                    "event_store.postgres.table_prefix".into(),
                    format!(
                        "{:?}: use 1-40 of a-z, 0-9 and _, not starting with a digit",
                        p.table_prefix
                    ),
                ));
            }
        }
        if let Some(r) = &self.redis {
            common(
                "redis",
                &r.events,
                &r.message_filters,
                &r.batch,
                &r.buffer,
                &r.retry,
            )?;
            if r.url.starts_with("rediss://") {
                return Err(invalid(
                    "event_store.redis.url".into(),
                    "rediss:// (TLS) is not supported yet; use redis://".into(),
                ));
            }
            if !r.url.starts_with("redis://") {
                return Err(invalid(
                    "event_store.redis.url".into(),
                    "must start with redis://".into(),
                ));
            }
            // As for PostgreSQL (and the CRD's CEL): no secrets in the URL.
            url_without_password(&r.url).map_err(|e| invalid("event_store.redis.url".into(), e))?;
            if r.key_prefix.chars().any(|c| c.is_whitespace()) {
                return Err(invalid(
                    "event_store.redis.key_prefix".into(),
                    "must not contain spaces".into(),
                ));
            }
            if r.stream_maxlen == 0 {
                return Err(invalid(
                    "event_store.redis.stream_maxlen".into(),
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// `$SYS` publishing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SysConfig {
    /// Publish `$SYS` topics.
    pub enabled: bool,
    /// Seconds between periodic `$SYS` publications (retained; the first goes out at start).
    pub interval: u64,
}

impl Default for SysConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: 10,
        }
    }
}

/// Where traces are written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// Directory for trace files.
    pub dir: PathBuf,
    /// Longest trace in seconds.
    pub max_duration: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            dir: std::env::temp_dir().join("corvid-trace"),
            max_duration: 3600,
        }
    }
}

/// Durable state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PersistenceConfig {
    /// Directory for persistent sessions and retained messages; unset keeps state in memory.
    pub data_dir: Option<PathBuf>,
    /// When a commit reaches the disk before the PUBACKs that wait on it are sent.
    pub sync: PersistSync,
    /// Under load (the last commit carried at least 64 changes), the next commit starts no
    /// sooner than this many microseconds after the last one did, so each group gathers more
    /// and the disk syncs less often; 0 commits at once. Costs up to this much acknowledgement
    /// latency under load, none on a lightly loaded broker.
    pub group_commit_us: u32,
}

/// The longest `persistence.group_commit_us` accepted: every acknowledgement under load may
/// wait this long.
pub const MAX_GROUP_COMMIT_US: u32 = 100_000;

impl Default for PersistenceConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            sync: PersistSync::Always,
            group_commit_us: 500,
        }
    }
}

/// `persistence.sync`: `always` (every group commit is `fdatasync`ed before its
/// acknowledgements go out: nothing acknowledged is lost, also on power loss) or `<N>ms`
/// (acknowledged once the OS has the bytes, synced at most N ms apart: a process crash or
/// `kill -9` loses nothing, a power loss or kernel crash up to the last N ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PersistSync {
    /// `fdatasync` before acknowledging.
    #[default]
    Always,
    /// Sync at most this many milliseconds apart.
    EveryMs(std::num::NonZeroU32),
}

impl TryFrom<String> for PersistSync {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        if t == "always" {
            return Ok(PersistSync::Always);
        }
        t.strip_suffix("ms")
            .and_then(|n| n.trim().parse::<std::num::NonZeroU32>().ok())
            .map(PersistSync::EveryMs)
            .ok_or_else(|| {
                format!("{s:?}: expected `always` or a number of milliseconds like `50ms`")
            })
    }
}

impl From<PersistSync> for String {
    fn from(p: PersistSync) -> String {
        match p {
            PersistSync::Always => "always".into(),
            PersistSync::EveryMs(n) => format!("{n}ms"),
        }
    }
}

/// A rate with a burst, written `rate,burst` (e.g. `1024,4096`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units per second.
    pub rate: u64,
    /// Bucket size.
    pub burst: u64,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (r, b) = match s.split_once(',') {
            Some((r, b)) => (r.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let rate: u64 = r
            .parse()
            .map_err(|_| format!("rate {r:?} is not a whole number"))?;
        let burst: u64 = b
            .parse()
            .map_err(|_| format!("burst {b:?} is not a whole number"))?;
        if rate == 0 || burst == 0 {
            return Err("rate and burst must be positive".into());
        }
        Ok(Rate { rate, burst })
    }
}

/// Node identity: the pod name in Kubernetes, stable across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name; when unset, `POD_NAME`, then the host name.
    pub name: Option<String>,
    /// This instance's Kubernetes pod UID; when unset, `POD_UID`. An evacuation request meant
    /// for another instance of the pod (`pod_uid=`) is refused with 409.
    pub uid: Option<String>,
}

/// Log level and format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `corvid_broker=debug`.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The four client listeners.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Listeners {
    /// Plain MQTT over TCP.
    pub mqtt: ListenerConfig,
    /// MQTT over WebSocket.
    pub ws: ListenerConfig,
    /// MQTT over TLS.
    pub mqtts: ListenerConfig,
    /// MQTT over WebSocket over TLS.
    pub wss: ListenerConfig,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            mqtt: ListenerConfig::new(true, "0.0.0.0:1883"),
            ws: ListenerConfig::new(true, "0.0.0.0:8083"),
            mqtts: ListenerConfig::new(false, "0.0.0.0:8883"),
            wss: ListenerConfig::new(false, "0.0.0.0:8084"),
        }
    }
}

/// One listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Whether the listener is opened.
    pub enabled: bool,
    /// Address and port to bind.
    pub bind: SocketAddr,
    /// WebSocket path (WebSocket listeners only).
    pub path: String,
    /// Expect a PROXY protocol v1/v2 header first (load balancer in front).
    pub proxy_protocol: bool,
    /// Source ranges (CIDRs, or bare addresses) whose PROXY headers are believed; a
    /// connection from anywhere else is closed. Empty: any sender (then any client that can
    /// reach the port can claim any source address).
    pub proxy_trusted: Vec<String>,
}

impl ListenerConfig {
    fn new(enabled: bool, bind: &str) -> Self {
        Self {
            enabled,
            bind: bind
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            path: "/mqtt".into(),
            proxy_protocol: false,
            proxy_trusted: Vec::new(),
        }
    }

    /// Whether a PROXY header from `ip` (the TCP peer, i.e. the load balancer) is believed.
    pub fn proxy_trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = net::canonical(ip);
        self.proxy_trusted.is_empty()
            || self
                .proxy_trusted
                .iter()
                .filter_map(|c| net::parse_cidr(c))
                .any(|net| net.contains(&ip))
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self::new(false, "0.0.0.0:0")
    }
}

/// PEM files for the TLS listeners; re-read when they change on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
    /// CA bundle to verify client certificates; when set, clients must present one.
    pub ca_file: Option<PathBuf>,
    /// Seconds a TLS or WebSocket handshake may take.
    pub handshake_timeout: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: "/etc/corvid/tls/tls.crt".into(),
            key_file: "/etc/corvid/tls/tls.key".into(),
            ca_file: None,
            handshake_timeout: 10,
        }
    }
}

/// Admin HTTP endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address and port to bind. Without `token_file` the API only ever listens on loopback:
    /// an unspecified address (`0.0.0.0`, `::`) becomes loopback and any other non-loopback
    /// address is refused.
    pub bind: SocketAddr,
    /// File holding the bearer token `/api/*` requires; re-read on each request.
    pub token_file: Option<PathBuf>,
    /// Server References an evacuation may send clients to besides the cluster's own members'
    /// MQTT addresses (e.g. the load balancer's public name).
    pub server_references: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 18083)),
            token_file: None,
            server_references: Vec::new(),
        }
    }
}

impl AdminConfig {
    /// The address the admin endpoint really binds: `bind`, or its loopback twin when no
    /// token protects the API and `bind` is the unspecified address.
    pub fn listen_addr(&self) -> SocketAddr {
        let ip = self.bind.ip();
        if self.token_file.is_none() && ip.is_unspecified() {
            let lo: std::net::IpAddr = match ip {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            SocketAddr::new(lo, self.bind.port())
        } else {
            self.bind
        }
    }
}

/// How a message for a shared-subscription group picks its member.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategy {
    /// Members in turn.
    #[default]
    RoundRobin,
    /// A random member.
    Random,
    /// The same member while it stays connected.
    Sticky,
    /// A member chosen by a hash of the publisher's client id.
    HashClientid,
}

/// MQTT protocol limits and capabilities announced in CONNACK.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Largest packet accepted from clients, in bytes.
    pub max_packet_size: u32,
    /// Unacknowledged QoS 2 publishes a client may have in flight towards the broker, and the
    /// broker's own cap on QoS 1/2 deliveries in flight towards one client.
    pub receive_maximum: u16,
    /// Largest keep-alive the broker accepts; larger requests are lowered (MQTT 5 server keep alive).
    pub max_keepalive: u16,
    /// Topic aliases a client may use towards the broker, and most the broker uses towards a
    /// client (each keeps a copy of its topic for the connection's lifetime).
    pub topic_alias_maximum: u16,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Highest QoS the broker grants.
    pub max_qos: u8,
    /// Longest client id accepted.
    pub max_client_id_len: usize,
    /// Most `/`-separated levels in a topic name or filter (like EMQX's default).
    pub max_topic_levels: usize,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Seconds a new connection may take to send CONNECT.
    pub connect_timeout: u64,
    /// Seconds a partly received packet may go without a new byte before the connection is
    /// closed (a stalled or trickling client holds a buffer; keep alive 0 would never end it).
    /// 0 disables.
    pub packet_timeout: u64,
    /// Largest CONNECT accepted (and so the most buffered for a connection before it is
    /// authenticated), in bytes; capped by `max_packet_size`.
    pub max_connect_size: u32,
    /// Seconds a write to a client may take; a client that stops reading is disconnected
    /// after it (its session kept per its expiry). At least 1.
    pub write_timeout: u64,
    /// Refuse control characters (U+0001–U+001F, U+007F–U+009F) in client ids, user names,
    /// will topics, topic names and filters as malformed packets (MQTT 1.5.4 lets a receiver
    /// do so; mosquitto does). `false` accepts them (U+0000 is always refused).
    pub strict_utf8: bool,
    /// Shared-subscription member selection.
    pub shared_subscription_strategy: SharedStrategy,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            receive_maximum: 32,
            max_keepalive: 65535,
            topic_alias_maximum: 64,
            retain_available: true,
            max_qos: 2,
            max_client_id_len: 65535,
            max_topic_levels: 128,
            // MQTT's own limit, as EMQX: valid topics up to 65,535 bytes must work (conformance
            // suites send them); the level bound is what keeps tree walks cheap, and packet
            // size bounds the bytes. Lower it where devices never send long topics.
            max_topic_length: 65535,
            connect_timeout: 5,
            packet_timeout: 5,
            max_connect_size: 64 * 1024,
            write_timeout: 30,
            strict_utf8: true,
            shared_subscription_strategy: SharedStrategy::RoundRobin,
        }
    }
}

impl MqttConfig {
    /// The topic size bounds every entry point checks.
    pub fn topic_limits(&self) -> corvid_proto::topic::TopicLimits {
        corvid_proto::topic::TopicLimits {
            max_levels: self.max_topic_levels,
            max_len: self.max_topic_length,
        }
    }
}

/// What happens to a new message when a session's queue is full.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QueueFullPolicy {
    /// Drop the oldest queued message to make room.
    #[default]
    DropOldest,
    /// Drop the new message.
    DropNew,
}

/// Sessions and their queues.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Messages queued per session (offline, or waiting for the inflight window).
    pub max_offline_queue: usize,
    /// Topic and payload bytes queued per session; over it the queue sheds per
    /// `queue_full_policy`, and above half of it the session is congested.
    pub max_queue_bytes: usize,
    /// Policy when the queue is full.
    pub queue_full_policy: QueueFullPolicy,
    /// Cap on a client's session expiry interval, in seconds.
    pub max_session_expiry: u32,
    /// Whether QoS 0 messages are queued for offline sessions.
    pub queue_qos0: bool,
    /// Queued messages above which an online session is congested: publishers routing into it
    /// stop being read until it drains to half this mark (flow control instead of loss).
    /// Capped by `max_offline_queue`; 0 turns flow control off.
    pub queue_high_water: usize,
    /// Seconds an online session may stay congested before it counts as not draining: from
    /// then on publishers no longer wait for it and only it sheds at `max_offline_queue`.
    pub congestion_timeout: u64,
    /// Who may take over (resume, or replace with clean start) a session that exists.
    pub takeover: Takeover,
}

/// Who may take over an existing session by connecting with its client id.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Takeover {
    /// Only the identity (user name, or anonymous) that owns the session; anyone else is
    /// refused with CONNACK 0x87 / 0x05 and the owner's connection is left alone.
    #[default]
    OwnerOnly,
    /// Any client that passes authentication (MQTT's plain rule; trust every client).
    Any,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_offline_queue: 1000,
            max_queue_bytes: 16 * 1024 * 1024,
            queue_full_policy: QueueFullPolicy::DropOldest,
            max_session_expiry: 7200,
            queue_qos0: false,
            takeover: Takeover::OwnerOnly,
            queue_high_water: 500,
            congestion_timeout: 5,
        }
    }
}

/// Connection and message limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Simultaneous client connections; more are refused.
    pub max_connections: usize,
    /// New connections per second per listener (0 = unlimited).
    pub max_conn_rate: u32,
    /// Max subscriptions per client (0 = unlimited).
    pub max_subscriptions: usize,
    /// Simultaneous connections from one source address (after PROXY protocol); 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Sessions on this node, online and offline; a CONNECT that would create one more is
    /// refused. 0 = unlimited.
    pub max_sessions: usize,
    /// Retained messages on this node; a retained PUBLISH to a new topic beyond it is
    /// delivered but not retained. 0 = unlimited.
    pub max_retained: usize,
    /// Topic and payload bytes of retained messages on this node; a retained PUBLISH that
    /// would go beyond it is delivered but not retained. 0 = unlimited.
    pub max_retained_bytes: usize,
    /// Password hashes (users file) verified at once; more CONNECTs wait their turn. At least 1.
    pub max_concurrent_hashes: usize,
    /// Failed authentications per source address per minute; beyond it that address's
    /// CONNECTs are refused without checking the password until the minute is over. 0 = unlimited.
    pub max_auth_failures_per_minute: u32,
    /// Per-connection PUBLISH rate, `rate,burst` messages per second.
    pub message_rate: Option<String>,
    /// Per-connection inbound byte rate, `rate,burst` bytes per second.
    pub byte_rate: Option<String>,
    /// What happens to a client over its rate: `throttle` (stop reading) or `disconnect`.
    pub over_rate: OverRate,
}

/// Reaction to a client exceeding its rate.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OverRate {
    /// Stop reading from the client until it is back under its rate.
    #[default]
    Throttle,
    /// Disconnect it (MQTT 5 reason 0x96, message rate too high).
    Disconnect,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_conn_rate: 0,
            max_subscriptions: 1000,
            max_connections_per_ip: 1000,
            max_sessions: 200_000,
            max_retained: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            max_concurrent_hashes: 4,
            max_auth_failures_per_minute: 30,
            message_rate: None,
            byte_rate: None,
            over_rate: OverRate::Throttle,
        }
    }
}

impl LimitsConfig {
    /// The parsed message rate.
    pub fn message_rate(&self) -> Option<Rate> {
        self.message_rate.as_deref().and_then(|s| s.parse().ok())
    }

    /// The parsed byte rate.
    pub fn byte_rate(&self) -> Option<Rate> {
        self.byte_rate.as_deref().and_then(|s| s.parse().ok())
    }
}

/// How a node finds its peers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// Single node.
    #[default]
    None,
    /// A fixed list of `host:port`.
    Static,
    /// A/SRV lookups of a headless Service name.
    Dns,
    /// EndpointSlices of the headless Service through the Kubernetes API.
    Kubernetes,
}

/// Clustering.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Inter-node port (TCP links and UDP gossip).
    pub port: u16,
    /// Address to bind the cluster port on.
    pub bind: String,
    /// IP address peers use to reach this node; default `$POD_IP`, else 127.0.0.1.
    pub advertise: Option<String>,
    /// Peer discovery method.
    pub discovery: Discovery,
    /// Static peers.
    pub peers: Vec<String>,
    /// Headless Service DNS name for `dns` discovery.
    pub dns_name: Option<String>,
    /// File holding the shared cluster secret: the primary key, which this node dials links
    /// and seals gossip with.
    pub secret_file: Option<PathBuf>,
    /// Files holding further secrets this node also accepts (links and gossip) while the
    /// cluster rotates its secret; a file that is missing or empty is skipped, so a Secret key
    /// that exists only during a rotation can stay listed. At most [`MAX_ACCEPTED_SECRETS`].
    pub accepted_secret_files: Vec<PathBuf>,
    /// Kubernetes discovery settings.
    pub kubernetes: KubernetesDiscovery,
    /// Moving connections onto new nodes after a scale-up.
    pub rebalance: RebalanceConfig,
    /// What the other nodes do while a node with durable sessions is down (killed, crashed):
    /// they hold what is routed to its sessions, and clients of its sessions wait for it.
    pub node_failure: NodeFailureConfig,
}

/// While a node with durable sessions (`persistence.data_dir`) is down after a crash or
/// `kill -9`, its sessions are on its volume, not lost: the other nodes keep what is routed to
/// them until it is back under the same name, and a client of one of them that reconnects to
/// another node waits (bounded) for it, then takes its session over with everything queued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFailureConfig {
    /// Seconds a client resuming a session (clean start off) on this node waits, at most, for
    /// a failed node with durable sessions to come back before it gets a fresh session here
    /// (counted: `corvid_cluster_owner_waits_total{result="expired"}`). 0 never waits.
    pub owner_wait: u64,
    /// Seconds this node keeps messages for a failed node's sessions; then the node counts
    /// as gone, and what was held for it is dropped (counted). A node that comes back sooner
    /// gets everything held for it.
    pub hold: u64,
    /// Messages held at most per peer (awaiting its acknowledgement, or its return); the
    /// oldest beyond it are dropped (counted: `corvid_cluster_held_dropped_total`).
    pub max_held_messages: usize,
}

impl Default for NodeFailureConfig {
    fn default() -> Self {
        Self {
            owner_wait: 15,
            hold: 600,
            max_held_messages: 100_000,
        }
    }
}

/// How many accepted secrets a node holds besides its primary: a rotation needs one; the bound
/// keeps the handshake's trial of each key (one per ring entry) cheap.
pub const MAX_ACCEPTED_SECRETS: usize = 3;

/// Connection rebalancing after scale-up: a node holding clearly more than its share of the
/// cluster's connections sheds the surplus towards less-loaded members (see `cluster::rebalance`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RebalanceConfig {
    /// Whether this node checks the balance every few seconds and sheds its surplus.
    pub enabled: bool,
    /// Connections per second moved at most (0 counts as 1).
    pub rate: u32,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        // The same rate as the operator's `spec.rebalance.rate` default.
        Self {
            enabled: false,
            rate: 100,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            port: 4370,
            bind: "0.0.0.0".into(),
            advertise: None,
            discovery: Discovery::None,
            peers: Vec::new(),
            dns_name: None,
            secret_file: None,
            accepted_secret_files: Vec::new(),
            kubernetes: KubernetesDiscovery::default(),
            rebalance: RebalanceConfig::default(),
            node_failure: NodeFailureConfig::default(),
        }
    }
}

/// Where to look for peers in Kubernetes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// Namespace; `POD_NAMESPACE` when unset.
    pub namespace: Option<String>,
    /// Headless Service name.
    pub service: Option<String>,
    /// API server URL; in a pod, from `KUBERNETES_SERVICE_HOST`/`_PORT`.
    pub api_url: Option<String>,
    /// Bearer token file; in a pod, the service-account token.
    pub token_file: Option<PathBuf>,
    /// CA bundle for the API server; in a pod, the service-account CA.
    pub ca_file: Option<PathBuf>,
}

impl ClusterConfig {
    /// Checks the key ring's files: at most [`MAX_ACCEPTED_SECRETS`] accepted ones, none listed
    /// twice or equal to the primary, and none without a primary. The files' contents (each key
    /// at least 16 bytes) are checked when the broker loads them.
    pub fn validate_secret_files(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            field: "cluster.accepted_secret_files".into(),
            reason,
        };
        let accepted = &self.accepted_secret_files;
        if accepted.is_empty() {
            return Ok(());
        }
        if accepted.len() > MAX_ACCEPTED_SECRETS {
            return Err(invalid(format!(
                "at most {MAX_ACCEPTED_SECRETS} files (a rotation needs one), got {}",
                accepted.len()
            )));
        }
        let Some(primary) = &self.secret_file else {
            return Err(invalid("set cluster.secret_file (the primary) too".into()));
        };
        for (i, f) in accepted.iter().enumerate() {
            if f.as_os_str().is_empty() {
                return Err(invalid(format!("entry {i} is empty")));
            }
            if f == primary {
                return Err(invalid(format!(
                    "{} is cluster.secret_file already",
                    f.display()
                )));
            }
            if accepted[..i].contains(f) {
                return Err(invalid(format!("{} is listed twice", f.display())));
            }
        }
        Ok(())
    }

    /// The IP address advertised to peers.
    pub fn advertise_ip(&self) -> std::net::IpAddr {
        self.advertise
            .clone()
            .or_else(|| std::env::var("POD_IP").ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Seconds SIGTERM may take to disconnect clients before the process exits.
    pub drain_timeout: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { drain_timeout: 30 }
    }
}

/// Bridges: message copies sent to (and received from) other systems; see `docs/bridges.md`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgesConfig {
    /// Bridges to remote MQTT brokers (mosquitto, RabbitMQ, cloud IoT hubs).
    pub mqtt: Vec<MqttBridgeConfig>,
    /// Bridges that produce local messages to Kafka topics.
    pub kafka: Vec<KafkaBridgeConfig>,
}

/// One MQTT bridge: a client connection to a remote broker carrying egress and ingress rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttBridgeConfig {
    /// Name in logs, metrics (`bridge` label) and `/api/v1/bridges`.
    pub name: String,
    /// The remote broker.
    pub remote: MqttRemoteConfig,
    /// Local messages copied to the remote.
    pub egress: Vec<MqttEgressRule>,
    /// Remote messages published here.
    pub ingress: Vec<MqttIngressRule>,
    /// Messages held while the remote is down or slow.
    pub buffer: BridgeBufferConfig,
    /// Reconnect delays.
    pub backoff: BridgeBackoffConfig,
}

/// The remote end of an MQTT bridge (MQTT 3.1.1 client).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttRemoteConfig {
    /// Host name or address.
    pub host: String,
    /// Port (1883 plain, usually 8883 with TLS).
    pub port: u16,
    /// TLS to the remote; unset means plain TCP.
    pub tls: Option<BridgeTlsConfig>,
    /// User name sent in CONNECT.
    pub username: Option<String>,
    /// File holding the password (a mounted Secret), re-read before every reconnect.
    pub password_file: Option<PathBuf>,
    /// Client id at the remote; default `corvid-<bridge>-<node>`.
    pub client_id: Option<String>,
    /// Clean session at the remote.
    pub clean_start: bool,
    /// Keep alive, seconds.
    pub keepalive: u16,
}

impl Default for MqttRemoteConfig {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: 1883,
            tls: None,
            username: None,
            password_file: None,
            client_id: None,
            clean_start: true,
            keepalive: 30,
        }
    }
}

/// TLS to a bridge remote: a CA to trust and, for IoT hubs, a client certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeTlsConfig {
    /// CA bundle (PEM) to verify the remote; unset trusts the public web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for remotes that require one.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    pub key_file: Option<PathBuf>,
}

/// Local messages matching `local_filter` go to the remote as `remote_prefix` + topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttEgressRule {
    /// Local topic filter.
    pub local_filter: String,
    /// Prepended to the topic at the remote (may be empty).
    pub remote_prefix: String,
    /// QoS at the remote (0 or 1; 2 is sent as 1).
    pub qos: u8,
    /// Retain flag at the remote; unset keeps the message's own.
    pub retain: Option<bool>,
}

impl Default for MqttEgressRule {
    fn default() -> Self {
        Self {
            local_filter: String::new(),
            remote_prefix: String::new(),
            qos: 1,
            retain: None,
        }
    }
}

/// Remote messages matching `remote_filter` are published here as `local_prefix` + topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttIngressRule {
    /// Filter subscribed at the remote.
    pub remote_filter: String,
    /// Prepended to the topic here (may be empty).
    pub local_prefix: String,
    /// QoS of the remote subscription.
    pub qos: u8,
}

impl Default for MqttIngressRule {
    fn default() -> Self {
        Self {
            remote_filter: String::new(),
            local_prefix: String::new(),
            qos: 1,
        }
    }
}

/// Bound on the messages a bridge holds while its remote cannot take them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeBufferConfig {
    /// Messages held; beyond it the oldest is dropped and counted.
    pub max_messages: usize,
}

impl Default for BridgeBufferConfig {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
        }
    }
}

/// Exponential reconnect backoff with jitter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeBackoffConfig {
    /// First delay, milliseconds.
    pub initial_ms: u64,
    /// Longest delay, milliseconds.
    pub max_ms: u64,
}

impl Default for BridgeBackoffConfig {
    fn default() -> Self {
        Self {
            initial_ms: 500,
            max_ms: 30_000,
        }
    }
}

/// One Kafka bridge: local messages matching `filters` produced to one Kafka topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaBridgeConfig {
    /// Name in logs, metrics and `/api/v1/bridges`.
    pub name: String,
    /// Bootstrap brokers, `host:port`.
    pub bootstrap: Vec<String>,
    /// Kafka topic (must exist; it is not created).
    pub topic: String,
    /// Local topic filters whose messages are produced.
    pub filters: Vec<String>,
    /// Record key: the publisher's client id or the MQTT topic.
    pub key: KafkaKey,
    /// Acknowledgement level required for a produce to count as sent.
    pub acks: KafkaAcks,
    /// Batching.
    pub batch: KafkaBatchConfig,
    /// Messages held while Kafka is down or slow.
    pub buffer: BridgeBufferConfig,
    /// Reconnect delays.
    pub backoff: BridgeBackoffConfig,
}

impl Default for KafkaBridgeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            bootstrap: Vec::new(),
            topic: String::new(),
            filters: Vec::new(),
            key: KafkaKey::ClientId,
            acks: KafkaAcks::All,
            batch: KafkaBatchConfig::default(),
            buffer: BridgeBufferConfig::default(),
            backoff: BridgeBackoffConfig::default(),
        }
    }
}

/// What a Kafka record's key is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KafkaKey {
    /// The publisher's MQTT client id (records of one device stay in order on one partition).
    ClientId,
    /// The MQTT topic.
    Topic,
}

/// Kafka produce acknowledgement level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KafkaAcks {
    /// All in-sync replicas (`acks=all`, the only level the client library sends).
    All,
    /// The partition leader only (`acks=1`); not supported yet, refused by `config check`.
    Leader,
    /// No acknowledgement (`acks=0`); not supported yet, refused by `config check`.
    None,
}

/// When a Kafka batch is sent: at `max_messages`, or `linger_ms` after its first message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaBatchConfig {
    /// Records per produce request.
    pub max_messages: usize,
    /// Milliseconds to wait for a batch to fill.
    pub linger_ms: u64,
}

impl Default for KafkaBatchConfig {
    fn default() -> Self {
        Self {
            max_messages: 500,
            linger_ms: 10,
        }
    }
}

impl BridgesConfig {
    /// Checks names, remotes, filters and limits; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names: Vec<&str> = Vec::new();
        for (i, b) in self.mqtt.iter().enumerate() {
            let at = format!("bridges.mqtt[{i}]");
            bridge_name(&at, &b.name, &mut names)?;
            if b.remote.host.trim().is_empty() {
                return invalid_at(format!("{at}.remote.host"), "required");
            }
            if b.remote.port == 0 {
                return invalid_at(format!("{at}.remote.port"), "must not be 0");
            }
            if let Some(t) = &b.remote.tls {
                if t.cert_file.is_some() != t.key_file.is_some() {
                    return invalid_at(
                        format!("{at}.remote.tls"),
                        "set both cert_file and key_file, or neither",
                    );
                }
            }
            if b.egress.is_empty() && b.ingress.is_empty() {
                return invalid_at(
                    format!("{at}.egress"),
                    "a bridge needs at least one egress or ingress rule",
                );
            }
            for (j, r) in b.egress.iter().enumerate() {
                filter_ok(&format!("{at}.egress[{j}].local_filter"), &r.local_filter)?;
                prefix_ok(&format!("{at}.egress[{j}].remote_prefix"), &r.remote_prefix)?;
                qos_ok(&format!("{at}.egress[{j}].qos"), r.qos)?;
            }
            for (j, r) in b.ingress.iter().enumerate() {
                // A shared subscription at the remote is how a cluster takes each remote
                // message once instead of once per pod.
                let field = format!("{at}.ingress[{j}].remote_filter");
                match corvid_proto::topic::parse_filter(&r.remote_filter) {
                    Ok(f) if f.group.is_some() => filter_ok(&field, f.filter)?,
                    _ => filter_ok(&field, &r.remote_filter)?,
                }
                prefix_ok(&format!("{at}.ingress[{j}].local_prefix"), &r.local_prefix)?;
                qos_ok(&format!("{at}.ingress[{j}].qos"), r.qos)?;
            }
            buffer_ok(&at, &b.buffer, &b.backoff)?;
        }
        for (i, k) in self.kafka.iter().enumerate() {
            let at = format!("bridges.kafka[{i}]");
            bridge_name(&at, &k.name, &mut names)?;
            if k.bootstrap.is_empty() {
                return invalid_at(format!("{at}.bootstrap"), "list at least one host:port");
            }
            for (j, b) in k.bootstrap.iter().enumerate() {
                let port_ok = b
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !port_ok {
                    return invalid_at(format!("{at}.bootstrap[{j}]"), "must be host:port");
                }
            }
            let topic_ok = !k.topic.is_empty()
                && k.topic.len() <= 249
                && k.topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !topic_ok {
                return invalid_at(
                    format!("{at}.topic"),
                    "a Kafka topic name: 1-249 of [a-zA-Z0-9._-]",
                );
            }
            if k.filters.is_empty() {
                return invalid_at(format!("{at}.filters"), "list at least one topic filter");
            }
            for (j, f) in k.filters.iter().enumerate() {
                filter_ok(&format!("{at}.filters[{j}]"), f)?;
            }
            if k.acks != KafkaAcks::All {
                return invalid_at(
                    format!("{at}.acks"),
                    "only `all` is supported (the Kafka client always waits for all in-sync replicas)",
                );
            }
            if k.batch.max_messages == 0 {
                return invalid_at(format!("{at}.batch.max_messages"), "must be at least 1");
            }
            buffer_ok(&at, &k.buffer, &k.backoff)?;
        }
        Ok(())
    }
}

/// Checks that a database URL parses and carries no password (in the user part or as a
/// `password=` parameter): secrets belong in `password_file`, not in ConfigMaps and logs.
fn url_without_password(raw: &str) -> Result<(), String> {
    let u = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if u.host_str().is_none_or(str::is_empty) && u.path().trim_matches('/').is_empty() {
        return Err(format!("{raw:?} names no host"));
    }
    if u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password") {
        return Err("must not hold a password: put it in password_file".into());
    }
    Ok(())
}

fn invalid_at<T>(field: String, reason: &str) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        field,
        reason: reason.into(),
    })
}

fn bridge_name<'a>(at: &str, name: &'a str, seen: &mut Vec<&'a str>) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return invalid_at(format!("{at}.name"), "1-63 of [a-zA-Z0-9_-]");
    }
    if seen.contains(&name) {
        return invalid_at(format!("{at}.name"), "another bridge has this name");
    }
    seen.push(name);
    Ok(())
}

fn filter_ok(field: &str, f: &str) -> Result<(), ConfigError> {
    if f.starts_with("$share/") {
        return invalid_at(field.into(), "shared subscriptions cannot be bridged");
    }
    corvid_proto::topic::validate_filter(f).or_else(|e| invalid_at(field.into(), &e.to_string()))
}

fn prefix_ok(field: &str, p: &str) -> Result<(), ConfigError> {
    if p.contains(['+', '#', '\0']) {
        return invalid_at(field.into(), "must not contain +, # or NUL");
    }
    Ok(())
}

fn qos_ok(field: &str, q: u8) -> Result<(), ConfigError> {
    if q > 2 {
        return invalid_at(field.into(), "must be 0, 1 or 2");
    }
    Ok(())
}

fn buffer_ok(at: &str, b: &BridgeBufferConfig, o: &BridgeBackoffConfig) -> Result<(), ConfigError> {
    if b.max_messages == 0 {
        return invalid_at(format!("{at}.buffer.max_messages"), "must be at least 1");
    }
    if o.initial_ms == 0 || o.max_ms < o.initial_ms {
        return invalid_at(
            format!("{at}.backoff"),
            "initial_ms must be positive and at most max_ms",
        );
    }
    Ok(())
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--node-name`.
    pub node_name: Option<String>,
    /// `--mqtt-port`.
    pub mqtt_port: Option<u16>,
    /// `--ws-port`.
    pub ws_port: Option<u16>,
    /// `--admin-port`.
    pub admin_port: Option<u16>,
    /// `--cluster-port`.
    pub cluster_port: Option<u16>,
}

impl Config {
    /// Loads the file (if any), applies environment overrides from `env`, then `overrides`,
    /// and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let (origin, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => ("defaults".to_string(), String::new()),
        };
        Self::from_text(&origin, &text, env, overrides)
    }

    /// Like [`Config::load`] for a file's text already in memory; `origin` names it in errors.
    pub fn from_text(
        origin: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let origin = origin.to_string();
        // Defaults first, the file merged on top: a partial section (one listener's `bind`)
        // keeps the defaults of that section's other fields.
        let mut value = Self::default_value()?;
        if !text.trim().is_empty() {
            let file: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
            merge(&mut value, file);
        }
        Self::from_merged(origin, value, env, overrides)
    }

    /// Reads an already-parsed file (what the operator renders): defaults, then `file`, then
    /// validation, with no environment and no flags.
    pub fn from_yaml(origin: &str, file: serde_yaml::Value) -> Result<Self, ConfigError> {
        let mut value = Self::default_value()?;
        merge(&mut value, file);
        Self::from_merged(origin.to_string(), value, [], &Overrides::default())
    }

    /// The fields of `self` that differ from the defaults, as a YAML mapping: all a generated
    /// file needs to say, since the broker defaults the rest (and a smaller file keeps older
    /// brokers, which refuse fields they do not know, working).
    pub fn non_default_fields(&self) -> Result<serde_yaml::Value, ConfigError> {
        let mut mine = serde_yaml::to_value(self).map_err(|e| ConfigError::Parse {
            origin: "generated".into(),
            message: e.to_string(),
        })?;
        strip_equal(&mut mine, &Self::default_value()?);
        Ok(mine)
    }

    fn default_value() -> Result<serde_yaml::Value, ConfigError> {
        serde_yaml::to_value(Config::default()).map_err(|e| ConfigError::Parse {
            origin: "defaults".into(),
            message: e.to_string(),
        })
    }

    fn from_merged(
        origin: String,
        mut value: serde_yaml::Value,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut from_env = false;
        for (key, val) in env {
            if let Some(rest) = key.strip_prefix("CORVID_") {
                if rest.contains("__") {
                    apply_env(&mut value, rest, &val);
                    from_env = true;
                }
            }
        }
        let origin = if from_env {
            format!("{origin} (with CORVID_* environment)")
        } else {
            origin
        };
        let mut cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            };
            ConfigError::Parse { origin, message }
        })?;
        cfg.apply(overrides);
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(n) = &o.node_name {
            self.node.name = Some(n.clone());
        }
        if let Some(p) = o.mqtt_port {
            self.listeners.mqtt.bind.set_port(p);
        }
        if let Some(p) = o.ws_port {
            self.listeners.ws.bind.set_port(p);
        }
        if let Some(p) = o.admin_port {
            self.admin.bind.set_port(p);
        }
        if let Some(p) = o.cluster_port {
            self.cluster.port = p;
        }
    }

    /// Checks values that parse but cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.mqtt.max_qos > 2 {
            return invalid("mqtt.max_qos", "must be 0, 1 or 2");
        }
        if self.mqtt.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum", "must be at least 1");
        }
        if self.mqtt.max_packet_size < 64 {
            return invalid("mqtt.max_packet_size", "must be at least 64 bytes");
        }
        if self.mqtt.max_topic_levels == 0 {
            return invalid("mqtt.max_topic_levels", "must be at least 1");
        }
        if !(1..=65535).contains(&self.mqtt.max_topic_length) {
            return invalid("mqtt.max_topic_length", "must be 1 to 65535 bytes");
        }
        if self.sessions.max_offline_queue == 0 {
            return invalid("sessions.max_offline_queue", "must be at least 1");
        }
        if self.persistence.group_commit_us > MAX_GROUP_COMMIT_US {
            return invalid(
                "persistence.group_commit_us",
                "must be at most 100000 (100 ms): it delays acknowledgements under load",
            );
        }
        if self.sessions.max_queue_bytes < 1024 {
            return invalid("sessions.max_queue_bytes", "must be at least 1024");
        }
        if self.limits.max_concurrent_hashes == 0 {
            return invalid("limits.max_concurrent_hashes", "must be at least 1");
        }
        if self.mqtt.max_connect_size < 64 {
            return invalid("mqtt.max_connect_size", "must be at least 64 bytes");
        }
        if self.mqtt.write_timeout == 0 {
            return invalid("mqtt.write_timeout", "must be at least 1 second");
        }
        for (name, l) in self.listener_list() {
            if (name == "ws" || name == "wss") && !l.path.starts_with('/') {
                return invalid(&format!("listeners.{name}.path"), "must start with '/'");
            }
            for (i, c) in l.proxy_trusted.iter().enumerate() {
                if net::parse_cidr(c).is_none() {
                    return invalid(
                        &format!("listeners.{name}.proxy_trusted[{i}]"),
                        &format!("{c:?} is not a CIDR range or address"),
                    );
                }
            }
        }
        let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
        for (name, l) in self.listener_list() {
            if !l.enabled || l.bind.port() == 0 {
                continue;
            }
            if let Some((other, _)) = seen.iter().find(|(_, a)| a.port() == l.bind.port()) {
                return invalid(
                    &format!("listeners.{name}.bind"),
                    &format!(
                        "port {} is already used by listeners.{other}",
                        l.bind.port()
                    ),
                );
            }
            seen.push((name, l.bind));
        }
        if let Some((other, _)) = seen
            .iter()
            .find(|(_, a)| a.port() == self.admin.bind.port())
        {
            return invalid(
                "admin.bind",
                &format!(
                    "port {} is already used by listeners.{other}",
                    self.admin.bind.port()
                ),
            );
        }
        let admin_ip = self.admin.bind.ip();
        if self.admin.token_file.is_none() && !admin_ip.is_loopback() && !admin_ip.is_unspecified()
        {
            return invalid(
                "admin.bind",
                &format!(
                    "{admin_ip} is reachable from other hosts but admin.token_file is not set; \
                     set a token or bind loopback"
                ),
            );
        }
        for (field, v) in [
            ("limits.message_rate", &self.limits.message_rate),
            ("limits.byte_rate", &self.limits.byte_rate),
        ] {
            if let Some(s) = v {
                if let Err(reason) = s.parse::<Rate>() {
                    return invalid(field, &reason);
                }
            }
        }
        for (i, rule) in self.acl.rules.iter().enumerate() {
            if let AclWho::One(w) = &rule.who {
                let set = [w.user.is_some(), w.client_id.is_some(), w.ip_cidr.is_some()];
                if set.iter().filter(|x| **x).count() != 1 {
                    return invalid(
                        &format!("acl.rules[{i}].who"),
                        "set exactly one of user, client_id, ip_cidr (or write `all`)",
                    );
                }
            }
            if let AclWho::One(AclWhoOne {
                ip_cidr: Some(c), ..
            }) = &rule.who
            {
                if net::parse_cidr(c).is_none() {
                    return invalid(
                        &format!("acl.rules[{i}].who.ip_cidr"),
                        &format!("{c:?} is not a CIDR range"),
                    );
                }
            }
            if rule.topics.is_empty() {
                return invalid(
                    &format!("acl.rules[{i}].topics"),
                    "must list at least one topic filter",
                );
            }
            for (j, t) in rule.topics.iter().enumerate() {
                if let Err(reason) = AclTopic::parse(t) {
                    return invalid(
                        &format!("acl.rules[{i}].topics[{j}]"),
                        &format!("{t:?}: {reason}"),
                    );
                }
            }
        }
        for (i, a) in self.auto_subscriptions.iter().enumerate() {
            if a.qos > 2 {
                return invalid(&format!("auto_subscriptions[{i}].qos"), "must be 0, 1 or 2");
            }
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return invalid(
                    &format!("webhooks[{i}].url"),
                    "must start with http:// or https://",
                );
            }
            if let Some(e) = w.events.iter().find(|e| EventKind::from_name(e).is_none()) {
                return invalid(
                    &format!("webhooks[{i}].events"),
                    &format!("unknown event {e:?} ({})", EventKind::names()),
                );
            }
            if w.queue_size == 0 {
                return invalid(&format!("webhooks[{i}].queue_size"), "must be at least 1");
            }
        }
        self.event_store.validate()?;
        if let Some(h) = &self.auth.http {
            if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                return invalid("auth.http.url", "must start with http:// or https://");
            }
        }
        if self.cluster.discovery == Discovery::Dns && self.cluster.dns_name.is_none() {
            return invalid("cluster.dns_name", "required when cluster.discovery is dns");
        }
        self.cluster.validate_secret_files()?;
        self.bridges.validate()?;
        // Bridge rules and auto-subscriptions are held to the topic bounds clients are.
        let limits = self.mqtt.topic_limits();
        let mut bounded: Vec<(String, &str)> = Vec::new();
        for (i, b) in self.bridges.mqtt.iter().enumerate() {
            for (j, r) in b.egress.iter().enumerate() {
                bounded.push((
                    format!("bridges.mqtt[{i}].egress[{j}].local_filter"),
                    &r.local_filter,
                ));
            }
            for (j, r) in b.ingress.iter().enumerate() {
                bounded.push((
                    format!("bridges.mqtt[{i}].ingress[{j}].remote_filter"),
                    &r.remote_filter,
                ));
            }
        }
        for (i, k) in self.bridges.kafka.iter().enumerate() {
            for (j, f) in k.filters.iter().enumerate() {
                bounded.push((format!("bridges.kafka[{i}].filters[{j}]"), f));
            }
        }
        for (i, a) in self.auto_subscriptions.iter().enumerate() {
            bounded.push((format!("auto_subscriptions[{i}].topic"), &a.topic));
        }
        for (field, f) in bounded {
            if let Err(e) = limits.filter(f) {
                return invalid(&field, &format!("{f:?}: {e}"));
            }
        }
        Ok(())
    }

    /// Listeners with their names, in a fixed order.
    pub fn listener_list(&self) -> [(&'static str, &ListenerConfig); 4] {
        [
            ("mqtt", &self.listeners.mqtt),
            ("ws", &self.listeners.ws),
            ("mqtts", &self.listeners.mqtts),
            ("wss", &self.listeners.wss),
        ]
    }

    /// The node name: configured, else `POD_NAME`, else the host name.
    pub fn node_name(&self) -> String {
        self.node
            .name
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// The pod UID: configured, else `POD_UID`; `None` outside Kubernetes.
    pub fn node_uid(&self) -> Option<String> {
        self.node
            .uid
            .clone()
            .or_else(|| std::env::var("POD_UID").ok())
            .filter(|s| !s.is_empty())
    }
}

/// Removes from `value` every key whose value equals the one in `defaults`, recursively, and
/// mappings left empty by that: what is left is what differs. Where there is no default to
/// compare with (list items, a section whose default is absent) only nulls go: an absent
/// optional field reads as null.
fn strip_equal(value: &mut serde_yaml::Value, defaults: &serde_yaml::Value) {
    match (value, defaults) {
        (serde_yaml::Value::Mapping(v), serde_yaml::Value::Mapping(d)) => v.retain(|k, item| {
            match d.get(k) {
                Some(default) if item == default => return false,
                Some(default) => strip_equal(item, default),
                None => strip_equal(item, &serde_yaml::Value::Null),
            }
            !matches!(item, serde_yaml::Value::Mapping(m) if m.is_empty())
        }),
        (serde_yaml::Value::Mapping(v), _) => v.retain(|_, item| {
            strip_equal(item, &serde_yaml::Value::Null);
            !item.is_null()
        }),
        (serde_yaml::Value::Sequence(items), _) => {
            for item in items {
                strip_equal(item, &serde_yaml::Value::Null);
            }
        }
        _ => {}
    }
}

/// Deep-merges `over` into `base`: mappings merge key by key, anything else replaces.
pub fn merge(base: &mut serde_yaml::Value, over: serde_yaml::Value) {
    match (base, over) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Sets `section.key` (from `SECTION__KEY`) in a YAML tree; the value is parsed as YAML so
/// numbers and booleans keep their types.
fn apply_env(root: &mut serde_yaml::Value, path: &str, raw: &str) {
    let parsed: serde_yaml::Value =
        serde_yaml::from_str(raw).unwrap_or_else(|_| serde_yaml::Value::String(raw.to_string()));
    let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
    let mut cur = root;
    for (i, key) in keys.iter().enumerate() {
        if !cur.is_mapping() {
            *cur = serde_yaml::Value::Mapping(Default::default());
        }
        let Some(map) = cur.as_mapping_mut() else {
            return;
        };
        let k = serde_yaml::Value::String(key.clone());
        if i == keys.len() - 1 {
            map.insert(k, parsed);
            return;
        }
        cur = map
            .entry(k)
            .or_insert(serde_yaml::Value::Mapping(Default::default()));
    }
}

/// A complete, commented example configuration (`corvid-broker config example`).
pub const EXAMPLE: &str = include_str!("../corvid.example.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(yaml: &str, env: Vec<(&str, &str)>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::Read {
            path: "tmp".into(),
            source: e,
        })?;
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, yaml).map_err(|e| ConfigError::Read {
            path: p.clone(),
            source: e,
        })?;
        Config::load(
            Some(&p),
            env.into_iter().map(|(a, b)| (a.to_string(), b.to_string())),
            &Overrides::default(),
        )
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = load_str("", vec![]).expect("defaults load");
        assert_eq!(c, Config::default());
        assert_eq!(c.listeners.mqtt.bind.port(), 1883);
        assert_eq!(c.listeners.ws.bind.port(), 8083);
        assert_eq!(c.listeners.mqtts.bind.port(), 8883);
        assert_eq!(c.admin.bind.port(), 18083);
        assert_eq!(c.cluster.port, 4370);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = load_str("listeners:\n  mqtt:\n    bnd: 1\n", vec![]).expect_err("typo");
        let msg = err.to_string();
        assert!(msg.contains("listeners.mqtt"), "{msg}");
        assert!(msg.contains("bnd"), "{msg}");
    }

    #[test]
    fn env_overrides_keep_types() {
        let c = load_str(
            "mqtt:\n  max_qos: 2\n",
            vec![
                ("CORVID_MQTT__MAX_QOS", "1"),
                ("CORVID_SESSIONS__QUEUE_QOS0", "true"),
            ],
        )
        .expect("env applies");
        assert_eq!(c.mqtt.max_qos, 1);
        assert!(c.sessions.queue_qos0);
    }

    #[test]
    fn partial_section_keeps_its_defaults() {
        let c = load_str("listeners:\n  ws:\n    bind: 0.0.0.0:9001\n", vec![]).expect("loads");
        assert!(c.listeners.ws.enabled);
        assert_eq!(c.listeners.ws.path, "/mqtt");
        assert_eq!(c.listeners.ws.bind.port(), 9001);
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load_str("mqtt:\n  max_qos: high\n", vec![]).expect_err("type");
        assert!(err.to_string().contains("mqtt.max_qos"), "{err}");
    }

    #[test]
    fn operator_rendered_sections_load() {
        let yaml = r#"
mqtt: { max_packet_size: 2048 }
limits: { message_rate: "100,200", byte_rate: "1024,4096" }
auth: { allow_anonymous: false, users_file: /etc/corvid/auth/users, client_ids: [a, b], http: { url: "http://auth:8080/mqtt", timeout_ms: 500 } }
acl:
  no_match: deny
  rules:
    - { permission: allow, who: { user: dashboard }, action: subscribe, topics: ["$SYS/#"] }
    - { permission: allow, who: all, action: all, topics: ["devices/%c/#", "eq shared/#"] }
auto_subscriptions: [{ topic: "devices/%c/cmd", qos: 1 }]
webhooks: [{ name: audit, url: "http://sink/events", events: [client.connected] }]
cluster: { rebalance: { enabled: true, rate: 10 } }
persistence: { data_dir: /var/lib/corvid, sync: 20ms }
"#;
        let c = load_str(yaml, vec![]).expect("operator shape loads");
        assert_eq!(
            c.persistence.sync,
            PersistSync::EveryMs(std::num::NonZeroU32::new(20).expect("20"))
        );
        assert_eq!(c.persistence.group_commit_us, 500, "the default");
        let e = load_str("persistence: { group_commit_us: 100001 }", vec![])
            .expect_err("a group commit over 100 ms")
            .to_string();
        assert!(e.contains("persistence.group_commit_us"), "{e}");
        for bad in ["sometimes", "0ms", "20"] {
            let y = format!("persistence: {{ sync: {bad:?} }}");
            let e = load_str(&y, vec![]).expect_err(bad).to_string();
            assert!(
                e.contains("persistence") && e.contains("always"),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            c.limits.message_rate(),
            Some(Rate {
                rate: 100,
                burst: 200
            })
        );
        assert_eq!(c.acl.no_match, Permission::Deny);
        assert_eq!(c.acl.rules[1].who, AclWho::All(AllClients::All));
        assert_eq!(c.auto_subscriptions[0].qos, 1);
        assert_eq!(c.webhooks[0].timeout_ms, 5000);
    }

    #[test]
    fn bad_rate_and_who_are_named() {
        let err = load_str("limits: { message_rate: \"fast\" }\n", vec![]).expect_err("rate");
        assert!(err.to_string().contains("limits.message_rate"), "{err}");
        let err = load_str(
            "acl: { rules: [{ permission: deny, who: { user: a, client_id: b }, topics: [x] }] }\n",
            vec![],
        )
        .expect_err("who");
        assert!(err.to_string().contains("acl.rules[0].who"), "{err}");
    }

    #[test]
    fn bad_acl_and_webhook_events_are_named() {
        let err = load_str(
            "acl: { rules: [{ permission: deny, who: { ip_cidr: 10.0.0.0/40 }, topics: [x] }] }\n",
            vec![],
        )
        .expect_err("cidr");
        assert!(err.to_string().contains("acl.rules"), "{err}");
        assert!(err.to_string().contains("10.0.0.0/40"), "{err}");
        let err = load_str(
            "webhooks: [{ url: \"http://x/\", events: [client.connect] }]\n",
            vec![],
        )
        .expect_err("event");
        assert!(err.to_string().contains("webhooks[0].events"), "{err}");
    }

    #[test]
    fn event_store_passwords_in_urls_are_refused() {
        for (yaml, field) in [
            (
                "event_store: { postgres: { url: \"postgres://corvid:hunter2@db:5432/corvid\" } }\n",
                "event_store.postgres.url",
            ),
            (
                "event_store: { postgres: { url: \"postgresql://corvid@db/corvid?password=hunter2\" } }\n",
                "event_store.postgres.url",
            ),
            (
                "event_store: { redis: { url: \"redis://:hunter2@cache:6379/0\" } }\n",
                "event_store.redis.url",
            ),
            (
                "event_store: { redis: { url: \"redis://app:hunter2@cache:6379/0\" } }\n",
                "event_store.redis.url",
            ),
        ] {
            let err = load_str(yaml, vec![]).expect_err(yaml);
            let text = err.to_string();
            assert!(text.contains(field) && text.contains("password_file"), "{yaml}: {text}");
            assert!(!text.contains("hunter2"), "the error repeats the secret: {text}");
        }
        // A user name alone is fine.
        load_str(
            "event_store: { postgres: { url: \"postgres://corvid@db/corvid\" }, redis: { url: \"redis://app@cache:6379/0\" } }\n",
            vec![],
        )
        .expect("no password, accepted");
    }

    #[test]
    fn event_store_loads_with_defaults_and_env() {
        let c = load_str(
            "event_store:\n  postgres:\n    url: postgres://corvid@db:5432/corvid\n    password_file: /etc/corvid/eventstore/postgres-password\n  redis: {}\n",
            vec![("CORVID_EVENT_STORE__POSTGRES__TABLE_PREFIX", "iot_")],
        )
        .expect("event store loads");
        let p = c.event_store.postgres.expect("postgres on");
        assert_eq!(p.table_prefix, "iot_");
        assert_eq!(p.events, vec!["client.connected", "client.disconnected"]);
        assert_eq!(p.batch.max_rows, 500);
        let r = c.event_store.redis.expect("redis on");
        assert_eq!(r.key_prefix, "corvid:");
        assert_eq!(r.url, "redis://localhost:6379/0");
        assert_eq!(Config::default().event_store, EventStoreConfig::default());
    }

    #[test]
    fn bad_event_store_fields_are_named() {
        for (yaml, field) in [
            (
                "event_store: { postgres: { table_prefix: \"x; DROP\" } }",
                "event_store.postgres.table_prefix",
            ),
            (
                "event_store: { postgres: { events: [message.publish] } }",
                "event_store.postgres.events",
            ),
            (
                "event_store: { postgres: { url: \"mysql://x\" } }",
                "event_store.postgres.url",
            ),
            (
                "event_store: { postgres: { batch: { max_rows: 0 } } }",
                "event_store.postgres.batch.max_rows",
            ),
            (
                "event_store: { redis: { message_filters: [\"a/#/b\"] } }",
                "event_store.redis.message_filters[0]",
            ),
            (
                "event_store: { redis: { url: \"rediss://x\" } }",
                "event_store.redis.url",
            ),
            (
                "event_store: { redis: { buffer: { max_events: 0 } } }",
                "event_store.redis.buffer.max_events",
            ),
            ("event_store: { redis: { passwd: x } }", "event_store.redis"),
        ] {
            let err = load_str(yaml, vec![]).expect_err(yaml);
            assert!(err.to_string().contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn duplicate_ports_rejected() {
        let err = load_str("listeners:\n  ws:\n    bind: 0.0.0.0:1883\n", vec![]).expect_err("dup");
        assert!(err.to_string().contains("listeners.ws.bind"), "{err}");
    }

    #[test]
    fn bridges_load_with_defaults() {
        let c = load_str(
            r##"
bridges:
  mqtt:
    - name: hub
      remote: { host: hub.example, port: 8883, tls: { ca_file: /ca.pem, cert_file: /c.pem, key_file: /k.pem } }
      egress: [{ local_filter: "sensors/#", remote_prefix: "site/" }]
  kafka:
    - { name: events, bootstrap: ["k:9092"], topic: mqtt-events, filters: ["#"], key: topic }
"##,
            vec![],
        )
        .expect("loads");
        let m = &c.bridges.mqtt[0];
        assert_eq!(m.egress[0].qos, 1);
        assert!(m.remote.clean_start);
        assert_eq!(m.buffer.max_messages, 10_000);
        let k = &c.bridges.kafka[0];
        assert_eq!(k.key, KafkaKey::Topic);
        assert_eq!(k.acks, KafkaAcks::All);
        assert_eq!(k.batch.max_messages, 500);
    }

    #[test]
    fn bad_bridge_fields_are_named() {
        let err = load_str(
            "bridges:\n  mqtt:\n    - { name: a, remote: { hots: x }, egress: [] }\n",
            vec![],
        )
        .expect_err("typo");
        assert!(err.to_string().contains("bridges.mqtt[0].remote"), "{err}");
        assert!(err.to_string().contains("hots"), "{err}");
        let cases = [
            (
                "{ name: a, remote: { host: h }, egress: [{ local_filter: \"a/#\", qos: 3 }] }",
                "bridges.mqtt[0].egress[0].qos",
            ),
            (
                "{ name: a, remote: { host: h }, egress: [{ local_filter: \"a/#/b\" }] }",
                "bridges.mqtt[0].egress[0].local_filter",
            ),
            ("{ name: a, remote: { host: h } }", "bridges.mqtt[0].egress"),
            ("{ name: \"a b\", remote: { host: h } }", "bridges.mqtt[0].name"),
            (
                "{ name: a, remote: { host: h, tls: { cert_file: /c } }, ingress: [{ remote_filter: x }] }",
                "bridges.mqtt[0].remote.tls",
            ),
        ];
        for (bridge, field) in cases {
            let err = load_str(&format!("bridges:\n  mqtt:\n    - {bridge}\n"), vec![])
                .expect_err(bridge);
            assert!(err.to_string().contains(field), "{bridge}: {err}");
        }
        let kafka = [
            (
                "{ name: k, bootstrap: [k], topic: t, filters: [\"#\"] }",
                "bootstrap[0]",
            ),
            (
                "{ name: k, bootstrap: [\"k:1\"], topic: \"a b\", filters: [\"#\"] }",
                "topic",
            ),
            (
                "{ name: k, bootstrap: [\"k:1\"], topic: t, filters: [] }",
                "filters",
            ),
            (
                "{ name: k, bootstrap: [\"k:1\"], topic: t, filters: [\"#\"], acks: leader }",
                "acks",
            ),
        ];
        for (bridge, field) in kafka {
            let err = load_str(&format!("bridges:\n  kafka:\n    - {bridge}\n"), vec![])
                .expect_err(bridge);
            assert!(
                err.to_string()
                    .contains(&format!("bridges.kafka[0].{field}")),
                "{bridge}: {err}"
            );
        }
        let err = load_str(
            "bridges:\n  mqtt:\n    - { name: x, remote: { host: h }, egress: [{ local_filter: a }] }\n  kafka:\n    - { name: x, bootstrap: [\"k:1\"], topic: t, filters: [a] }\n",
            vec![],
        )
        .expect_err("duplicate name");
        assert!(err.to_string().contains("bridges.kafka[0].name"), "{err}");
    }

    #[test]
    fn accepted_secret_files_are_bounded_distinct_and_need_a_primary() {
        let ok = "cluster:\n  secret_file: /s/secret\n  accepted_secret_files: [/s/accepted]\n";
        let c = load_str(ok, vec![]).expect("one accepted file");
        assert_eq!(c.cluster.accepted_secret_files.len(), 1);
        let bad = [
            "cluster:\n  accepted_secret_files: [/s/a]\n",
            "cluster:\n  secret_file: /s/a\n  accepted_secret_files: [/s/a]\n",
            "cluster:\n  secret_file: /s/p\n  accepted_secret_files: [/s/a, /s/a]\n",
            "cluster:\n  secret_file: /s/p\n  accepted_secret_files: [/s/a, /s/b, /s/c, /s/d]\n",
            "cluster:\n  secret_file: /s/p\n  accepted_secret_files: [\"\"]\n",
        ];
        for yaml in bad {
            let err = load_str(yaml, vec![]).expect_err(yaml);
            assert!(
                err.to_string().contains("cluster.accepted_secret_files"),
                "{yaml}: {err}"
            );
        }
    }

    #[test]
    fn example_is_valid_and_complete() {
        let v: serde_yaml::Value = serde_yaml::from_str(EXAMPLE).expect("example parses");
        let c: Config = serde_yaml::from_value(v).expect("example matches schema");
        c.validate().expect("example validates");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// Every field path under `defaults`, with its default when it is a scalar or a list.
    fn leaves(v: &serde_yaml::Value, at: String, out: &mut Vec<(String, serde_yaml::Value)>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, item) in m {
                    let key = k.as_str().unwrap_or_default();
                    let path = if at.is_empty() {
                        key.to_string()
                    } else {
                        format!("{at}.{key}")
                    };
                    leaves(item, path, out);
                }
            }
            other => out.push((at, other.clone())),
        }
    }

    fn lookup<'a>(v: &'a serde_yaml::Value, path: &str) -> Option<&'a serde_yaml::Value> {
        path.split('.').try_fold(v, |at, k| at.get(k))
    }

    #[test]
    fn example_lists_every_field_with_its_default() {
        let defaults = serde_yaml::to_value(Config::default()).expect("defaults serialize");
        let example: serde_yaml::Value = serde_yaml::from_str(EXAMPLE).expect("example parses");
        let mut all = Vec::new();
        leaves(&defaults, String::new(), &mut all);
        let mut missing = Vec::new();
        let mut differ = Vec::new();
        for (path, default) in all {
            // `path` means something only on the WebSocket listeners.
            if path == "listeners.mqtt.path" || path == "listeners.mqtts.path" {
                continue;
            }
            match lookup(&example, &path) {
                None => missing.push(path),
                Some(v) if *v != default => differ.push(format!("{path}: {v:?} vs {default:?}")),
                Some(_) => {}
            }
        }
        assert!(
            missing.is_empty(),
            "fields missing from corvid.example.yaml: {missing:?}"
        );
        assert!(
            differ.is_empty(),
            "example values that are not the defaults: {differ:#?}"
        );
    }

    #[test]
    fn reference_documents_every_field() {
        let doc = include_str!("../../../docs/broker-config.md");
        let defaults = serde_yaml::to_value(Config::default()).expect("defaults serialize");
        let mut all = Vec::new();
        leaves(&defaults, String::new(), &mut all);
        let undocumented: Vec<String> = all
            .into_iter()
            .map(|(path, _)| path)
            .filter(|path| {
                let key = path.rsplit('.').next().unwrap_or_default();
                // In a table (`key`), a YAML example (key:), a heading, a field list, or a list heading.
                ![
                    format!("`{key}`"),
                    format!("{key}`"),
                    format!("{key}:"),
                    format!("## {key}"),
                    format!(", {key},"),
                    format!("{key}[]"),
                ]
                .iter()
                .any(|form| doc.contains(form.as_str()))
            })
            .collect();
        assert!(
            undocumented.is_empty(),
            "fields missing from docs/broker-config.md: {undocumented:?}"
        );
    }
}
