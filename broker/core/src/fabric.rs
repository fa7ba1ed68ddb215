//! The seam between the broker's core and the cluster: what the core asks of other nodes,
//! as a trait the core owns. The cluster layer implements it; a single node has none, so the
//! core's publish, subscribe and takeover paths never name the cluster's types.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::message::{Delivery, Msg};
use crate::session::{SessionState, Subscription};

/// What asking the other nodes for a session came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// No node had it (or all had let it go).
    NotFound,
    /// It moved here and is installed.
    Moved,
    /// The node holding it refused: another identity owns it (`sessions.takeover`).
    NotOwner,
}

/// A session that arrived from another node, in the core's terms: the cluster decodes its
/// snapshot into this and the core installs it.
pub struct ArrivedSession {
    /// Client id.
    pub client_id: String,
    /// Session expiry, seconds.
    pub expiry: u32,
    /// The identity that owns it.
    pub owner: Option<String>,
    /// Its subscriptions, raw filter first.
    pub subscriptions: Vec<(String, Subscription)>,
    /// Restores the queue, in-flight and QoS 2 state into the new session's state.
    pub restore: Box<dyn FnOnce(&mut SessionState) + Send>,
}

/// The other nodes, as the core sees them.
#[async_trait::async_trait]
pub trait Fabric: Send + Sync + std::fmt::Debug {
    /// A retained message was set or cleared here: every node keeps a copy.
    fn retained(&self, msg: &Msg);
    /// Sends `msg` to the peers with matching subscribers; returns the shared groups (of
    /// `local_groups`) this node serves for this message.
    fn forward(&self, msg: &Msg, local_groups: &[Arc<str>]) -> HashSet<Arc<str>>;
    /// A session moved to `node`: the delivery follows it there.
    fn deliver_to(&self, node: &str, client_id: &str, d: &Delivery);
    /// The first subscription to `raw` on this node.
    fn route_added(&self, raw: &str);
    /// The last subscription to `raw` on this node is gone.
    fn route_removed(&self, raw: &str);
    /// Waits, at most `limit`, until this node has synced with its peers.
    async fn wait_synced(&self, limit: Duration) -> bool;
    /// Takes `client_id`'s session from whichever node holds it (or makes it drop the
    /// session, with `clean`), for the connecting identity `owner`.
    async fn take_session(&self, client_id: &str, clean: bool, owner: Option<&str>) -> Taken;
    /// Deliveries that arrived for `client_id` before its session did.
    fn take_early(&self, client_id: &str) -> Vec<Delivery>;
    /// The names of the nodes not known to be dead, this one first (`$SYS/brokers`).
    fn running_nodes(&self) -> Vec<String>;
}
