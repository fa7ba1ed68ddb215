//! Membership and failure detection: chitchat (scuttlebutt gossip with phi-accrual failure
//! detection) over UDP on the cluster port. Each node gossips a few keys about itself: its link
//! address, admin address, MQTT address, state, and its session and connection counts.
//!
//! Gossip only admits nodes whose chitchat cluster id matches, and that id is derived from the
//! cluster secret, so pods of another cluster never merge with this one. Gossip carries no
//! data: routes, messages and sessions travel only over the TCP links, which authenticate each
//! peer with an HMAC challenge ([`super::link`]).

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion,
};

use super::secret::Secret;
use super::ClusterError;

/// Gossip key: the node's inter-node TCP address.
pub const KEY_LINK: &str = "link";
/// Gossip key: the node's admin HTTP address.
pub const KEY_ADMIN: &str = "admin";
/// Gossip key: number of sessions the node holds.
pub const KEY_SESSIONS: &str = "sessions";
/// Gossip key: number of live client connections (rebalancing compares them).
pub const KEY_CONNECTIONS: &str = "connections";
/// Gossip key: the node's MQTT address, sent as Server Reference when rebalancing.
pub const KEY_MQTT: &str = "mqtt";
/// Gossip key: the node's state — a [`corvid_api::MemberState`] (`joining`, `ready`,
/// `evacuating`, the same strings the admin API shows) or [`STATE_LEFT`].
pub const KEY_STATE: &str = "state";
/// Gossiped state of a node that left cleanly (scale-down); it is never listed as a member.
pub const STATE_LEFT: &str = "left";

/// Starts gossip for this node.
pub async fn start(
    node: &str,
    generation: u64,
    listen: SocketAddr,
    advertise: SocketAddr,
    seeds: Vec<String>,
    secret: &Secret,
    initial: Vec<(String, String)>,
) -> Result<ChitchatHandle, ClusterError> {
    let id_tag = secret.tag(&[b"corvid-gossip-cluster-id"]);
    let cluster_id: String = id_tag[..16].iter().map(|b| format!("{b:02x}")).collect();
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(node.to_string(), generation, advertise),
        cluster_id,
        gossip_interval: Duration::from_millis(500),
        listen_addr: listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: 8.0,
            initial_interval: Duration::from_millis(500),
            max_interval: Duration::from_secs(3),
            // A dead member is forgotten after this; scale-down leaves no ghost for long.
            dead_node_grace_period: Duration::from_secs(60),
            ..FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(60),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    spawn_chitchat(config, initial, &UdpTransport)
        .await
        .map_err(|e| ClusterError::Gossip(e.to_string()))
}
