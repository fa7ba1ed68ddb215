//! Bridges to other MQTT brokers (cloud IoT hubs, RabbitMQ) and to Kafka, rendered into the
//! broker's `bridges` section; passwords and certificates come from Secrets mounted as files.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Message bridges of every broker pod (see docs/bridges.md).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BridgesSpec {
    /// Bridges to remote MQTT brokers (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub mqtt: Vec<MqttBridge>,
    /// Bridges producing local messages to Kafka (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub kafka: Vec<KafkaBridge>,
}

impl BridgesSpec {
    /// Whether no bridge is configured.
    pub fn is_empty(&self) -> bool {
        self.mqtt.is_empty() && self.kafka.is_empty()
    }
}

/// One MQTT bridge: a client connection to a remote broker with egress and ingress rules.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.name.matches('^[a-zA-Z0-9_-]{1,63}$')")
        .message("bridges.mqtt[].name must be 1-63 of [a-zA-Z0-9_-]"),
    validation = Rule::new("size(self.egress) + size(self.ingress) > 0")
        .message("bridges.mqtt[] needs at least one egress or ingress rule")
)]
pub struct MqttBridge {
    /// Name in logs, metrics (label bridge) and the admin API; unique among all bridges.
    #[schemars(length(max = 63))]
    pub name: String,
    /// The remote broker.
    pub remote: MqttBridgeRemote,
    /// Local messages copied to the remote (at most 64 rules).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub egress: Vec<MqttBridgeEgress>,
    /// Remote messages published locally (at most 64 rules).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub ingress: Vec<MqttBridgeIngress>,
    /// Messages held while the remote is down (beyond it the oldest is dropped and counted).
    #[serde(default = "default_buffer")]
    #[schemars(range(min = 1))]
    pub buffer_max_messages: i64,
}

/// The remote end of an MQTT bridge (MQTT 3.1.1).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MqttBridgeRemote {
    /// Host name or address.
    pub host: String,
    /// Port.
    #[serde(default = "default_mqtt_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// TLS to the remote; unset means plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MqttBridgeTls>,
    /// User name sent in CONNECT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The password, from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<BridgeSecretKey>,
    /// Client id at the remote; default corvid-<bridge>-<pod>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// TLS to a bridge remote: the CA to trust and, for IoT hubs, a client certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MqttBridgeTls {
    /// CA bundle (PEM) from a Secret; unset trusts the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<BridgeSecretKey>,
    /// A kubernetes.io/tls Secret (tls.crt, tls.key) with the client certificate the remote requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret: Option<String>,
}

/// A key inside a Secret in the cluster's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BridgeSecretKey {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret.
    pub key: String,
}

/// Local messages matching localFilter go to the remote as remotePrefix + topic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MqttBridgeEgress {
    /// Local topic filter.
    pub local_filter: String,
    /// Prepended to the topic at the remote.
    #[serde(default)]
    pub remote_prefix: String,
    /// QoS at the remote.
    #[serde(default = "default_qos")]
    #[schemars(range(min = 0, max = 2))]
    pub qos: i32,
    /// Retain flag at the remote; unset keeps the message's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<bool>,
}

/// Remote messages matching remoteFilter are published locally as localPrefix + topic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MqttBridgeIngress {
    /// Filter subscribed at the remote.
    pub remote_filter: String,
    /// Prepended to the topic locally.
    #[serde(default)]
    pub local_prefix: String,
    /// QoS of the remote subscription.
    #[serde(default = "default_qos")]
    #[schemars(range(min = 0, max = 2))]
    pub qos: i32,
}

/// One Kafka bridge: local messages matching filters produced to one Kafka topic (acks=all).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.name.matches('^[a-zA-Z0-9_-]{1,63}$')")
        .message("bridges.kafka[].name must be 1-63 of [a-zA-Z0-9_-]"),
    validation = Rule::new("self.topic.matches('^[a-zA-Z0-9._-]{1,249}$')")
        .message("bridges.kafka[].topic must be a Kafka topic name"),
    validation = Rule::new("size(self.bootstrap) > 0 && size(self.filters) > 0")
        .message("bridges.kafka[] needs bootstrap servers and filters")
)]
pub struct KafkaBridge {
    /// Name in logs, metrics and the admin API; unique among all bridges.
    #[schemars(length(max = 63))]
    pub name: String,
    /// Bootstrap servers, host:port (at most 16).
    #[schemars(length(max = 16))]
    pub bootstrap: Vec<String>,
    /// Kafka topic; it must exist (the bridge reports a missing topic).
    #[schemars(length(max = 249))]
    pub topic: String,
    /// Local topic filters whose messages are produced (at most 64).
    #[schemars(length(max = 64))]
    pub filters: Vec<String>,
    /// Record key: clientId (the publisher) or topic.
    #[serde(default)]
    pub key: KafkaKey,
    /// Records per produce request.
    #[serde(default = "default_batch")]
    #[schemars(range(min = 1))]
    pub batch_max_messages: i64,
    /// Milliseconds a batch may wait to fill.
    #[serde(default = "default_linger")]
    #[schemars(range(min = 0))]
    pub linger_ms: i64,
    /// Messages held while Kafka is down (beyond it the oldest is dropped and counted).
    #[serde(default = "default_buffer")]
    #[schemars(range(min = 1))]
    pub buffer_max_messages: i64,
}

/// What a Kafka record's key is.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "camelCase")]
pub enum KafkaKey {
    /// The publisher's MQTT client id.
    #[default]
    ClientId,
    /// The MQTT topic.
    Topic,
}

fn default_buffer() -> i64 {
    crate::broker_default(corvid_config::BridgeBufferConfig::default().max_messages)
}

fn default_batch() -> i64 {
    crate::broker_default(corvid_config::KafkaBatchConfig::default().max_messages)
}

fn default_linger() -> i64 {
    crate::broker_default(corvid_config::KafkaBatchConfig::default().linger_ms)
}

fn default_qos() -> i32 {
    corvid_config::MqttEgressRule::default().qos.into()
}

fn default_mqtt_port() -> i32 {
    corvid_config::MqttRemoteConfig::default().port.into()
}
