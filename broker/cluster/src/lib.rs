//! The cluster layer: the broker pods of one `MqttCluster` act as one broker.
//!
//! - membership and failure detection: chitchat gossip ([`gossip`]), seeded by discovery
//!   ([`discovery`]: static list, DNS of a headless Service, or the Kubernetes API);
//! - encrypted, mutually authenticated TCP links between nodes ([`link`] over [`channel`])
//!   carry route changes, forwarded messages, retained messages and sessions ([`proto`]);
//!   gossip datagrams are sealed too ([`gossip`]); both keys come from the cluster secret,
//!   held in a key ring that is re-read while the node runs so the secret can rotate
//!   ([`secret::KeyRing`], [`Cluster::reload_keys`]);
//! - each node knows the others' route tables ([`routes`]) and forwards a message only to the
//!   nodes with matching subscribers; a shared group gets one delivery per message cluster-wide;
//! - a client id is unique cluster-wide: connecting on one node takes the session over from
//!   another; evacuation hands every session to a peer before the node stops;
//! - after a scale-up, nodes holding more than their share of connections shed the surplus
//!   towards the new members ([`rebalance`]);
//! - QoS 1/2 messages forwarded to a peer are held until it acknowledges them ([`held`]); a
//!   peer with durable sessions that fails is waited for: its messages are held, and its
//!   clients reconnecting elsewhere wait for it to take their sessions over
//!   (`cluster.node_failure`).

pub mod channel;
pub mod discovery;
pub mod early;
pub mod gossip;
pub mod held;
pub mod link;
pub mod proto;
pub mod rebalance;
pub mod routes;
pub mod secret;

// The core's modules under the names this crate's code has always used for them.
use corvid_core::{broker, codec, config, fabric, message, metrics, persist, session, topic, trie};

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use chitchat::ChitchatHandle;
use corvid_api::{EvacuationState, EvacuationStatus, Member, MemberState};
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{ClusterConfig, Discovery};
use crate::message::{Delivery, Msg};
use crate::session::{Kick, Session};
use link::Link;
use proto::{Frame, SessionSnapshot, WireDelivery, WireMsg};
use routes::RemoteRoutes;
use secret::{KeyRing, KeyUsage};

/// How long a session that moved to another node keeps forwarding what still reaches it here.
const MOVED_GRACE: Duration = Duration::from_secs(10);
/// How long a connecting client waits for the other nodes to give up its session.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// How many nodes may pass on one takeover request after the session moved (each pass follows
/// a hand-off that happened while the client reconnected).
const MAX_TAKE_HOPS: u8 = 4;

/// Why the cluster layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The secret is missing or unusable.
    #[error("cluster secret: {0}")]
    Secret(String),
    /// Gossip could not start.
    #[error("gossip: {0}")]
    Gossip(String),
    /// The link port could not be bound.
    #[error("cluster.port: cannot bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Discovery settings are incomplete.
    #[error("cluster discovery: {0}")]
    Discovery(String),
}

/// Cluster metrics.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// Members by state.
    pub members: IntGaugeVec,
    /// Messages forwarded to peers.
    pub forwarded: IntCounter,
    /// Bytes sent on links.
    pub forwarded_bytes: IntCounter,
    /// Messages received from peers.
    pub received: IntCounter,
    /// Seconds a frame waited between being queued for a peer and being written to its link.
    pub forward_latency: prometheus::Histogram,
    /// Frames dropped because a peer's queue was full.
    pub link_drops: IntCounter,
    /// Sessions taken over from another node.
    pub takeovers: IntCounter,
    /// Sessions handed to another node (evacuation or takeover).
    pub handed_off: IntCounter,
    /// Connections refused on the cluster port before authentication, by reason (handshake,
    /// peer, timeout, per_ip_limit, pending_limit, io).
    pub refused_peers: IntCounterVec,
    /// Link handshakes and messages that failed to authenticate, by reason (handshake,
    /// decrypt, peer).
    pub link_auth_failures: IntCounterVec,
    /// Gossip datagrams dropped as unauthenticated, stale or malformed.
    pub gossip_rejected: IntCounter,
    /// Link handshakes and gossip datagrams authenticated, by key (`primary`, `accepted`)
    /// and by what (`link_in`, `link_out`, `gossip`): a rotation's old key can go once no
    /// node counts `accepted` any more.
    pub key_used: IntCounterVec,
    /// Key ring reloads that changed the ring (`changed`) or failed (`error`, the ring in
    /// use is kept).
    pub keyring_reloads: IntCounterVec,
    /// Keys in the ring (1 outside a rotation).
    pub keyring_keys: IntGauge,
    /// Routes, messages, retained messages and session subscriptions from peers dropped as
    /// malformed or over the topic bounds, by kind.
    pub invalid: IntCounterVec,
    /// Clients still to move off this node during evacuation.
    pub evacuation_remaining: IntGauge,
    /// Sessions a dead member held when it died (lost unless evacuated before).
    pub sessions_lost: IntCounter,
    /// Messages held for peers until they acknowledge them (or come back).
    pub held: IntGauge,
    /// Held messages dropped without the peer having them (bound, hold expired, a peer
    /// without durable sessions failed).
    pub held_dropped: IntCounter,
    /// Forwarded messages received again (a resend) and not applied twice.
    pub forward_duplicates: IntCounter,
    /// Clients that waited for a failed durable node before resuming, by result (`returned`,
    /// `expired`).
    pub owner_waits: IntCounterVec,
    /// Connections moved away by rebalancing.
    pub rebalance_moved: IntCounter,
    /// Rebalancing rounds that moved connections.
    pub rebalance_rounds: IntCounter,
}

impl ClusterMetrics {
    fn new(m: &crate::metrics::Metrics) -> Result<Self, prometheus::Error> {
        Ok(ClusterMetrics {
            members: m.gauge_vec(
                "corvid_cluster_members",
                "Cluster members by state",
                "state",
            )?,
            forwarded: m.counter(
                "corvid_cluster_forwarded_messages_total",
                "Messages forwarded to other nodes",
            )?,
            forwarded_bytes: m.counter(
                "corvid_cluster_forwarded_bytes_total",
                "Bytes sent on inter-node links",
            )?,
            forward_latency: m.histogram(
                "corvid_cluster_forward_latency_seconds",
                "Time from queueing a frame for a peer to writing it on the link",
            )?,
            received: m.counter(
                "corvid_cluster_received_messages_total",
                "Messages received from other nodes",
            )?,
            link_drops: m.counter(
                "corvid_cluster_link_drops_total",
                "Frames dropped because a peer's queue was full",
            )?,
            takeovers: m.counter(
                "corvid_cluster_takeovers_total",
                "Sessions taken over from another node",
            )?,
            handed_off: m.counter(
                "corvid_cluster_sessions_handed_off_total",
                "Sessions moved to another node",
            )?,
            refused_peers: m.counter_vec(
                "corvid_cluster_refused_peers_total",
                "Connections refused on the cluster port before authentication, by reason",
                "reason",
            )?,
            link_auth_failures: m.counter_vec(
                "corvid_cluster_link_auth_failures_total",
                "Inter-node link handshakes or messages that failed to authenticate, by reason",
                "reason",
            )?,
            gossip_rejected: m.counter(
                "corvid_cluster_gossip_rejected_total",
                "Gossip datagrams dropped as unauthenticated, stale or malformed",
            )?,
            key_used: m.counter_vec_with(
                "corvid_cluster_key_used_total",
                "Link handshakes and gossip datagrams authenticated, by key of the ring (primary, accepted) and by what (link_in, link_out, gossip)",
                &["key", "via"],
            )?,
            keyring_reloads: m.counter_vec(
                "corvid_cluster_keyring_reloads_total",
                "Cluster key ring reloads that changed the ring or failed, by result",
                "result",
            )?,
            keyring_keys: m.gauge(
                "corvid_cluster_keyring_keys",
                "Cluster secrets this node accepts (the primary included)",
            )?,
            evacuation_remaining: m.gauge(
                "corvid_cluster_evacuation_remaining",
                "Clients and sessions still to move off this node",
            )?,
            sessions_lost: m.counter(
                "corvid_cluster_sessions_lost_total",
                "Sessions held by members that died without evacuating",
            )?,
            held: m.gauge(
                "corvid_cluster_held_messages",
                "QoS 1/2 messages held for peers until they acknowledge them or come back",
            )?,
            held_dropped: m.counter(
                "corvid_cluster_held_dropped_total",
                "Held messages dropped before the peer had them (bound reached, hold expired, a peer without durable sessions failed)",
            )?,
            forward_duplicates: m.counter(
                "corvid_cluster_forward_duplicates_total",
                "Forwarded messages received again after a resend and not applied twice",
            )?,
            owner_waits: m.counter_vec(
                "corvid_cluster_owner_waits_total",
                "Clients that waited for a failed node with durable sessions before resuming, by result",
                "result",
            )?,
            rebalance_moved: m.counter(
                "corvid_rebalance_moved_total",
                "Connections moved to less-loaded members by rebalancing",
            )?,
            rebalance_rounds: m.counter(
                "corvid_rebalance_rounds_total",
                "Rebalancing rounds that shed connections",
            )?,
            invalid: m.counter_vec(
                "corvid_cluster_invalid_total",
                "Items from peers dropped as malformed or over the topic bounds",
                "kind",
            )?,
        })
    }
}

/// How often the secret files are re-read (a mounted Kubernetes Secret changes in place).
const KEYRING_POLL: Duration = Duration::from_secs(2);
/// How long a changed set of secret files must stay the same before it is used.
const KEYRING_SETTLE: Duration = Duration::from_millis(250);

/// Reloads the key ring every [`KEYRING_POLL`] and on SIGHUP, until shutdown. A failed reload
/// is logged once per distinct error and the ring in use is kept.
async fn keyring_loop(cluster: Arc<Cluster>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the key ring is still re-read every few seconds");
            None
        }
    };
    let mut last_error: Option<String> = None;
    loop {
        let asked = tokio::select! {
            _ = tokio::time::sleep(KEYRING_POLL) => false,
            () = hangup(&mut hup) => true,
            _ = cluster.shutdown.cancelled() => return,
        };
        match cluster.reload_keys().await {
            Ok(changed) => {
                last_error = None;
                if asked && !changed {
                    tracing::info!(primary = %cluster.ring().primary_fingerprint(), "SIGHUP: cluster key ring unchanged");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if asked || last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "cannot reload the cluster key ring; keeping the one in use");
                }
                last_error = Some(text);
            }
        }
    }
}

/// Returns at the next SIGHUP; never when SIGHUP cannot be received.
async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
    let received = match hup {
        Some(h) => h.recv().await.is_some(),
        None => false,
    };
    if !received {
        std::future::pending::<()>().await;
    }
}

/// How long a gossiped member that has never linked may hold this node's readiness false.
pub const NEVER_LINKED_GRACE: Duration = Duration::from_secs(30);

/// When a live peer was first seen and whether it ever linked, for [`Cluster::synced`].
#[derive(Debug, Clone, Copy)]
struct PeerSeen {
    first: Instant,
    linked: bool,
    warned: bool,
}

/// What one peer means for readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Linked and synced.
    Synced,
    /// Not (yet, or no longer) synced: readiness waits for it.
    Waiting,
    /// Never linked within the grace: readiness does not wait for it.
    Excused,
}

impl PeerSeen {
    fn new(now: Instant) -> Self {
        PeerSeen {
            first: now,
            linked: false,
            warned: false,
        }
    }

    /// Records whether the peer is `linked` now and says how it counts for readiness. A peer
    /// that linked once is always waited for (a lost link is a real problem); one that never
    /// linked is waited for only during `grace`.
    fn holds_readiness(&mut self, linked: bool, now: Instant, grace: Duration) -> Hold {
        if linked {
            self.linked = true;
            return Hold::Synced;
        }
        if !self.linked && now.duration_since(self.first) >= grace {
            Hold::Excused
        } else {
            Hold::Waiting
        }
    }
}

/// What a peer gossips about its load.
#[derive(Debug, Clone, Default)]
struct PeerLoad {
    connections: Option<u64>,
    mqtt: Option<String>,
}

struct PendingTake {
    waiting: usize,
    found: Taken,
    done: Option<oneshot::Sender<Taken>>,
}

pub use crate::fabric::Taken;

/// A peer not live now that messages are held for until `until`.
#[derive(Debug, Clone, Copy)]
struct Parked {
    until: Instant,
    /// A failed peer with durable sessions: resuming clients wait for it. Peers something was
    /// held for before this node restarted may be long gone: nobody waits for them.
    clients_wait: bool,
}

/// The cluster layer of one node.
pub struct Cluster {
    /// This node's name.
    pub node: String,
    broker: Weak<Broker>,
    /// The cluster secrets: swapped whole on reload; links dial and accept with a snapshot.
    ring: parking_lot::RwLock<Arc<KeyRing>>,
    /// The files the ring is read from: the primary, then the accepted ones.
    ring_files: (std::path::PathBuf, Vec<std::path::PathBuf>),
    /// Gossip's ciphers, updated with the ring.
    gossip_key: Arc<gossip::GossipKey>,
    /// Which keys authenticate links and gossip.
    pub key_usage: Arc<KeyUsage>,
    /// Peers' route tables.
    pub routes: RemoteRoutes,
    links: Mutex<HashMap<String, Link>>,
    synced: Mutex<HashMap<String, u64>>,
    /// When each live peer was first seen and whether it ever linked (readiness grace).
    seen: Mutex<HashMap<String, PeerSeen>>,
    /// Open incoming links by id: the peer and what closes the link.
    incoming: Mutex<HashMap<u64, (String, CancellationToken)>>,
    /// Deliveries forwarded for sessions on their way here (bounded: [`early`]).
    early: Mutex<early::Early>,
    gossip: tokio::sync::OnceCell<ChitchatHandle>,
    /// Live peers: the state each gossips and its link address.
    live: Mutex<HashMap<String, (MemberState, Option<String>)>>,
    departed: Mutex<HashSet<String>>,
    pending: Mutex<HashMap<u64, PendingTake>>,
    next_req: AtomicU64,
    share_rr: AtomicUsize,
    evacuation: Mutex<EvacuationStatus>,
    /// Peers' last gossiped live connection count and MQTT address, for rebalancing.
    loads: Mutex<HashMap<String, PeerLoad>>,
    /// Connection rebalancing after scale-up.
    pub rebalancer: rebalance::Rebalancer,
    /// Metrics.
    pub metrics: ClusterMetrics,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    started: Instant,
    discovery: Discovery,
    /// QoS 1/2 messages held for peers until they acknowledge them.
    outbox: held::Outbox,
    /// Which forwards from peers were applied here.
    inbound: held::Inbound,
    /// Peers that acknowledge forwards, and whether they keep durable sessions (gossiped).
    caps: Mutex<HashMap<String, bool>>,
    /// Peers held for until a deadline, by name.
    parked: Mutex<HashMap<String, Parked>>,
    node_failure: corvid_config::NodeFailureConfig,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).finish()
    }
}

impl Cluster {
    /// Starts the cluster layer for `broker`: binds the link port (TCP and UDP), starts gossip
    /// and discovery, and attaches itself to the broker.
    pub async fn start(
        broker: &Arc<Broker>,
        admin: SocketAddr,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let cfg: &ClusterConfig = &broker.config.cluster;
        let Some(primary_file) = cfg.secret_file.clone() else {
            return Err(ClusterError::Secret(
                "cluster.secret_file (--cluster-secret-file) is required when clustering".into(),
            ));
        };
        let ring = KeyRing::load(&primary_file, &cfg.accepted_secret_files)?;
        let bind = SocketAddr::new(
            cfg.bind.parse().map_err(|_| {
                ClusterError::Discovery(format!("cluster.bind {:?} is not an IP address", cfg.bind))
            })?,
            cfg.port,
        );
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|source| ClusterError::Bind { addr: bind, source })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(cfg.port);
        let advertise_ip = cfg.advertise_ip();
        let advertise = SocketAddr::new(advertise_ip, port);
        let metrics = ClusterMetrics::new(&broker.metrics)
            .map_err(|e| ClusterError::Gossip(e.to_string()))?;
        metrics.keyring_keys.set(ring.keys().len() as i64);
        tracing::info!(
            primary = %ring.primary_fingerprint(),
            accepted = ?ring.accepted_fingerprints(),
            "cluster key ring loaded (fingerprints)"
        );
        let gossip_key = Arc::new(gossip::GossipKey::from_ring(&ring));
        let key_usage = Arc::new(KeyUsage::new(metrics.key_used.clone()));
        // This start's Unix ms: chitchat's generation and the first half of forward keys.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let node_failure = cfg.node_failure.clone();
        let cluster = Arc::new(Cluster {
            node: broker.node.clone(),
            broker: Arc::downgrade(broker),
            ring: parking_lot::RwLock::new(Arc::new(ring)),
            ring_files: (primary_file, cfg.accepted_secret_files.clone()),
            gossip_key: gossip_key.clone(),
            key_usage: key_usage.clone(),
            routes: RemoteRoutes::new(broker.config.mqtt.topic_limits()),
            links: Mutex::new(HashMap::new()),
            synced: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            early: Mutex::new(early::Early::default()),
            gossip: tokio::sync::OnceCell::new(),
            live: Mutex::new(HashMap::new()),
            departed: Mutex::new(HashSet::new()),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            share_rr: AtomicUsize::new(0),
            evacuation: Mutex::new(EvacuationStatus::default()),
            loads: Mutex::new(HashMap::new()),
            rebalancer: rebalance::Rebalancer::new(cfg.rebalance.enabled, cfg.rebalance.rate),
            metrics,
            shutdown: broker.shutdown.child_token(),
            started: Instant::now(),
            discovery: cfg.discovery,
            outbox: held::Outbox::new(generation, node_failure.max_held_messages),
            inbound: held::Inbound::default(),
            caps: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            node_failure,
        });
        cluster.restore_held(broker);
        tokio::spawn(link::accept_loop(cluster.clone(), listener));
        let seeds = discovery::seeds(cfg, port)?;
        let mut initial = vec![
            (gossip::KEY_LINK.into(), advertise.to_string()),
            (
                gossip::KEY_ADMIN.into(),
                SocketAddr::new(advertise_ip, admin.port()).to_string(),
            ),
            // "ready" only once synced (membership_loop): peers must not hand sessions or
            // redirect clients to a node that has not linked to them and has no routes yet.
            (
                gossip::KEY_STATE.into(),
                MemberState::Joining.as_str().into(),
            ),
            (
                gossip::KEY_DURABLE.into(),
                broker.durable.is_some().to_string(),
            ),
        ];
        // Where clients reach this node directly: the Server Reference rebalancing sends.
        let mqtt = &broker.config.listeners.mqtt;
        if mqtt.enabled && mqtt.bind.port() != 0 {
            initial.push((
                gossip::KEY_MQTT.into(),
                SocketAddr::new(advertise_ip, mqtt.bind.port()).to_string(),
            ));
        }
        let handle = gossip::start(
            &cluster.node,
            generation,
            SocketAddr::new(bind.ip(), port),
            advertise,
            seeds,
            gossip_key,
            initial,
            cluster.metrics.gossip_rejected.clone(),
            Some(key_usage),
        )
        .await?;
        let _ = cluster.gossip.set(handle);
        if cfg.discovery == Discovery::Kubernetes {
            tokio::spawn(discovery::kubernetes_loop(
                cluster.clone(),
                cfg.clone(),
                port,
            ));
        }
        if let (Discovery::Dns, Some(name)) = (cfg.discovery, cfg.dns_name.clone()) {
            tokio::spawn(discovery::dns_loop(cluster.clone(), name, port));
        }
        tokio::spawn(membership_loop(cluster.clone()));
        tokio::spawn(rebalance::run(cluster.clone()));
        tokio::spawn(keyring_loop(cluster.clone()));
        tokio::spawn(held_loop(cluster.clone()));
        tracing::info!(node = %cluster.node, %advertise, discovery = ?cfg.discovery, "cluster layer started");
        Ok(cluster)
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.upgrade()
    }

    /// The key ring in use now (links take a snapshot per handshake).
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.read().clone()
    }

    /// Re-reads the secret files and, when the keys differ from the ring in use and read the
    /// same again [`KEYRING_SETTLE`] later (files written one after the other are not taken
    /// half-way), makes the new ring the one new handshakes and gossip use; links already up
    /// keep their session keys. A file that cannot be read or holds a bad key leaves the ring
    /// in use unchanged. Returns whether the ring changed.
    pub async fn reload_keys(&self) -> Result<bool, ClusterError> {
        let (primary, accepted) = &self.ring_files;
        let read = || {
            KeyRing::load(primary, accepted).inspect_err(|_| {
                self.metrics
                    .keyring_reloads
                    .with_label_values(&["error"])
                    .inc();
            })
        };
        let loaded = read()?;
        if *self.ring() == loaded {
            return Ok(false);
        }
        tokio::time::sleep(KEYRING_SETTLE).await;
        if read()? != loaded {
            // Still being written: the next poll takes it.
            return Ok(false);
        }
        let before = self.ring();
        tracing::info!(
            primary = %loaded.primary_fingerprint(),
            accepted = ?loaded.accepted_fingerprints(),
            was_primary = %before.primary_fingerprint(),
            was_accepted = ?before.accepted_fingerprints(),
            "cluster key ring changed (fingerprints); new handshakes and gossip use it, links up stay up"
        );
        self.gossip_key.set_ring(&loaded);
        self.metrics.keyring_keys.set(loaded.keys().len() as i64);
        *self.ring.write() = Arc::new(loaded);
        self.metrics
            .keyring_reloads
            .with_label_values(&["changed"])
            .inc();
        Ok(true)
    }

    /// The key ring as the admin API shows it: fingerprints only.
    pub fn keyring_view(&self) -> corvid_api::KeyRingView {
        let ring = self.ring();
        corvid_api::KeyRingView {
            primary: ring.primary_fingerprint(),
            accepted: ring.accepted_fingerprints(),
            accepted_last_used: self.key_usage.last_accepted(),
        }
    }

    /// Asks gossip to contact an address (discovery found it).
    pub fn gossip_with(&self, addr: SocketAddr) {
        if let Some(g) = self.gossip.get() {
            let _ = g.gossip(addr);
        }
    }

    /// Frames a new link to `peer` sends first: this node's routes and retained messages,
    /// then every message still held for the peer (a broken link may have lost them; the
    /// peer skips those it has).
    pub fn sync_frames(&self, peer: &str) -> Vec<Frame> {
        let Some(b) = self.broker() else {
            return Vec::new();
        };
        let retained: Vec<WireMsg> = b
            .retained
            .all()
            .iter()
            .map(|m| WireMsg::from_msg(m))
            .collect();
        let mut frames = vec![
            Frame::Routes(b.router.filters()),
            Frame::RetainSnapshot(retained),
        ];
        let held = self.outbox.resend(peer);
        if !held.is_empty() {
            tracing::info!(
                peer,
                messages = held.len(),
                "resending held messages on the new link"
            );
        }
        frames.extend(held);
        frames
    }

    /// Takes back the messages held for peers and the forwards applied from them before a
    /// restart; a peer something is held for is held for until `node_failure.hold` (its
    /// clients do not wait for it: it may be long gone).
    fn restore_held(&self, b: &Broker) {
        let Some(db) = b.durable.as_ref() else {
            return;
        };
        let records = db.take_cluster_records();
        self.inbound.restore(&records);
        let moved = self.outbox.restore(&records, Some(db));
        self.count_held(moved);
        let peers = self.outbox.peers();
        if !peers.is_empty() {
            tracing::info!(
                ?peers,
                messages = moved.added,
                "messages held for peers restored"
            );
        }
        let until = Instant::now() + Duration::from_secs(self.node_failure.hold);
        let mut parked = self.parked.lock();
        for p in peers {
            parked.insert(
                p,
                Parked {
                    until,
                    clients_wait: false,
                },
            );
        }
    }

    fn count_held(&self, m: held::Moved) {
        let delta = m.added as i64 - m.acked as i64 - m.dropped as i64;
        if delta != 0 {
            self.metrics.held.add(delta);
        }
        if m.dropped > 0 {
            self.metrics.held_dropped.inc_by(m.dropped);
        }
    }

    /// Waits (at most `limit`) until this node has linked to and synced with every live peer,
    /// so a client that connects right after a restart is not answered from an empty view of
    /// the cluster (no session found elsewhere, no routes to publish to).
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.synced() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True once every live peer's routes are known here (the node may take traffic). A
    /// member that has never linked within [`NEVER_LINKED_GRACE`] of being seen (a ghost: a
    /// node that gossips but cannot be reached) stops holding readiness, with a warning.
    pub fn synced(&self) -> bool {
        let live = self.live.lock();
        let synced = self.synced.lock();
        let links = self.links.lock();
        let mut seen = self.seen.lock();
        let seen_world = self.started.elapsed() > Duration::from_secs(2) || !live.is_empty();
        let now = Instant::now();
        let mut all = true;
        for p in live.keys() {
            let linked = synced.contains_key(p)
                && links.get(p).is_some_and(|l| l.up.load(Ordering::Relaxed));
            let s = seen.entry(p.clone()).or_insert_with(|| PeerSeen::new(now));
            match s.holds_readiness(linked, now, NEVER_LINKED_GRACE) {
                Hold::Synced => {}
                Hold::Waiting => all = false,
                Hold::Excused => {
                    if !s.warned {
                        s.warned = true;
                        tracing::warn!(peer = %p, grace_s = NEVER_LINKED_GRACE.as_secs(), "member never linked; no longer waiting for it to count this node ready");
                    }
                }
            }
        }
        seen_world && all
    }

    fn send(&self, peer: &str, frame: Frame) -> bool {
        let links = self.links.lock();
        match links.get(peer) {
            Some(l) => {
                let sent = l.tx.try_send((Instant::now(), frame)).is_ok();
                if !sent {
                    self.metrics.link_drops.inc();
                }
                sent
            }
            None => false,
        }
    }

    fn broadcast(&self, make: impl Fn() -> Frame) {
        let links = self.links.lock();
        for l in links.values() {
            if l.tx.try_send((Instant::now(), make())).is_err() {
                self.metrics.link_drops.inc();
            }
        }
    }

    /// A local filter gained its first subscriber.
    pub fn route_added(&self, raw: &str) {
        self.broadcast(|| Frame::RouteAdd(raw.to_string()));
    }

    /// A local filter lost its last subscriber.
    pub fn route_removed(&self, raw: &str) {
        self.broadcast(|| Frame::RouteDel(raw.to_string()));
    }

    /// A retained message was set or cleared locally.
    pub fn retained(&self, msg: &Msg) {
        let w = WireMsg::from_msg(msg);
        self.broadcast(|| Frame::Retain(w.clone()));
    }

    /// Decides, for a message published here, which node delivers to each shared group and
    /// which peers get a copy. Returns the groups this node delivers locally.
    pub fn forward(&self, msg: &Msg, local_groups: &[Arc<str>]) -> HashSet<Arc<str>> {
        let remote = self.routes.matching(&msg.topic);
        let mut mine: HashSet<Arc<str>> = HashSet::new();
        if remote.is_empty() {
            mine.extend(local_groups.iter().cloned());
            return mine;
        }
        // Candidates per group: this node (None) and the peers with members.
        let mut candidates: HashMap<String, Vec<Option<usize>>> = HashMap::new();
        for g in local_groups {
            candidates.entry(g.to_string()).or_default().push(None);
        }
        for (i, (_, m)) in remote.iter().enumerate() {
            for g in &m.groups {
                candidates.entry(g.clone()).or_default().push(Some(i));
            }
        }
        let mut assigned: Vec<Vec<String>> = vec![Vec::new(); remote.len()];
        for (g, c) in candidates {
            let pick = c[self.share_rr.fetch_add(1, Ordering::Relaxed) % c.len()];
            match pick {
                None => {
                    if let Some(k) = local_groups.iter().find(|k| ***k == *g) {
                        mine.insert(k.clone());
                    }
                }
                Some(i) => assigned[i].push(g),
            }
        }
        let mut wire: Option<WireMsg> = None;
        let b = self.broker();
        let db = b.as_ref().and_then(|b| b.durable.as_ref());
        let caps = self.caps.lock();
        for ((node, m), groups) in remote.into_iter().zip(assigned) {
            if !m.plain && groups.is_empty() {
                continue;
            }
            self.metrics.forwarded.inc();
            // QoS 1/2 to a peer that acknowledges: held until it has it.
            if msg.qos != crate::codec::QoS::AtMostOnce && caps.contains_key(&node) {
                let tx = self.links.lock().get(&node).map(|l| l.tx.clone());
                let moved = self
                    .outbox
                    .hold(&node, msg, m.plain, groups, db, tx.as_ref());
                self.count_held(moved);
                continue;
            }
            let w = wire.get_or_insert_with(|| WireMsg::from_msg(msg)).clone();
            self.send(
                &node,
                Frame::Publish {
                    msg: w,
                    plain: m.plain,
                    groups,
                },
            );
        }
        mine
    }

    /// Forwards a delivery for a session that moved to `node`.
    pub fn deliver_to(&self, node: &str, client_id: &str, d: &Delivery) {
        self.send(
            node,
            Frame::DeliverTo {
                client_id: client_id.to_string(),
                delivery: WireDelivery::from_delivery(d),
            },
        );
    }

    /// Handles a frame from `peer`, received on incoming link `link`.
    pub fn handle(self: &Arc<Self>, peer: &str, link: u64, frame: Frame) {
        let Some(b) = self.broker() else { return };
        let limits = b.config.mqtt.topic_limits();
        // A peer is held to the same topic bounds as a client: what it replicates is dropped
        // and counted when malformed or oversize, never stored.
        let invalid = |kind: &str, n: usize| {
            if n > 0 {
                tracing::warn!(peer = %peer, kind, count = n, "invalid items from peer dropped");
                self.metrics
                    .invalid
                    .with_label_values(&[kind])
                    .inc_by(n as u64);
            }
        };
        // A message for this node's subscribers, held to the topic bounds like a client's.
        let apply = |msg: WireMsg, plain: bool, groups: Vec<String>| {
            if limits.name(&msg.topic).is_err() && !msg.topic.starts_with("$SYS/") {
                return invalid("publish", 1);
            }
            let groups: HashSet<Arc<str>> = groups.into_iter().map(Arc::from).collect();
            b.publish_local(msg.into_msg(), plain, &groups);
        };
        match frame {
            Frame::Routes(filters) => {
                invalid("route", self.routes.replace(peer, &filters));
                self.synced.lock().insert(peer.to_string(), link);
            }
            Frame::RouteAdd(f) => {
                if !self.routes.add(peer, &f) {
                    invalid("route", 1);
                }
            }
            Frame::RouteDel(f) => self.routes.del(peer, &f),
            Frame::Publish { msg, plain, groups } => {
                self.metrics.received.inc();
                apply(msg, plain, groups);
            }
            Frame::Retain(m) => {
                if limits.name(&m.topic).is_err() {
                    return invalid("retained", 1);
                }
                b.set_retained(m.into_msg())
            }
            Frame::RetainSnapshot(all) => {
                let before = all.len();
                let valid: Vec<WireMsg> = all
                    .into_iter()
                    .filter(|m| limits.name(&m.topic).is_ok())
                    .collect();
                invalid("retained", before - valid.len());
                for m in valid {
                    b.set_retained(m.into_msg());
                }
            }
            Frame::TakeSession {
                req,
                client_id,
                clean,
                owner,
            } => {
                if self.links.lock().contains_key(peer) {
                    self.answer_take(&b, req, &client_id, clean, owner, peer, 0);
                } else {
                    // A node that just (re)started can be asked before it has learnt of the
                    // asker and has a link to answer on: answer once it has (bounded).
                    let (c, peer) = (self.clone(), peer.to_string());
                    tokio::spawn(async move {
                        let until = Instant::now() + TAKEOVER_WAIT / 2;
                        while !c.links.lock().contains_key(&peer) && Instant::now() < until {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        c.answer_take(&b, req, &client_id, clean, owner, &peer, 0);
                    });
                }
            }
            Frame::TakeFor {
                req,
                client_id,
                clean,
                owner,
                requester,
                hops,
            } => self.answer_take(&b, req, &client_id, clean, owner, &requester, hops),
            Frame::TakeReply {
                req,
                snapshot,
                refused,
            } => {
                // Install right here, in link order: deliveries the old node forwards after
                // its reply must find the session.
                let mut pending = self.pending.lock();
                if let Some(p) = pending.get_mut(&req) {
                    p.waiting = p.waiting.saturating_sub(1);
                    if let Some(mut s) = snapshot {
                        invalid("subscription", s.drop_invalid_subscriptions(&limits));
                        b.install_session((*s).into());
                        p.found = Taken::Moved;
                    } else if refused {
                        p.found = Taken::NotOwner;
                    }
                    if p.waiting == 0 || p.found != Taken::NotFound {
                        if let Some(mut p) = pending.remove(&req) {
                            if let Some(tx) = p.done.take() {
                                let _ = tx.send(p.found);
                            }
                        }
                    }
                } else if let Some(s) = snapshot {
                    // The client stopped waiting (timeout) and started afresh; the session it
                    // gave up elsewhere is gone.
                    tracing::warn!(client_id = %s.client_id, "session arrived after the takeover wait; dropped");
                    b.metrics.dropped("late_takeover");
                }
            }
            Frame::Handoff(mut snap) => {
                tracing::info!(peer = %peer, client_id = %snap.client_id, "session handed over to this node");
                invalid("subscription", snap.drop_invalid_subscriptions(&limits));
                b.install_session((*snap).into());
            }
            Frame::DeliverTo {
                client_id,
                delivery,
            } => match b.sessions.get(&client_id) {
                Some(s) => {
                    b.enqueue(&s, delivery.into_delivery());
                }
                None => {
                    // The old node may forward before its reply reaches us: hold it until the
                    // session is installed (bounded in count, bytes and age).
                    let dropped = self.early.lock().hold(
                        &client_id,
                        delivery.into_delivery(),
                        std::time::Instant::now(),
                    );
                    b.metrics
                        .messages_dropped
                        .with_label_values(&["moved_session_missing"])
                        .inc_by(dropped as u64);
                }
            },
            Frame::Forward {
                key,
                msg,
                plain,
                groups,
            } => {
                self.metrics.received.inc();
                if !self.inbound.is_new(peer, key) {
                    self.metrics.forward_duplicates.inc();
                    return;
                }
                apply(msg, plain, groups);
                self.inbound.applied(peer, key, b.durable.as_ref());
            }
            Frame::ForwardAck { key } => {
                let moved = self.outbox.ack(peer, key, b.durable.as_ref());
                self.count_held(moved);
            }
            Frame::Hello { .. } | Frame::Welcome { .. } => {}
        }
    }

    /// Incoming link `link` from `peer` is open; the token closes it.
    pub fn link_opened(&self, peer: &str, link: u64) -> CancellationToken {
        let token = self.shutdown.child_token();
        self.incoming
            .lock()
            .insert(link, (peer.to_string(), token.clone()));
        token
    }

    /// Incoming link `link` from `peer` closed; a newer link's sync state is kept.
    pub fn link_closed(&self, peer: &str, link: u64) {
        self.incoming.lock().remove(&link);
        let mut synced = self.synced.lock();
        if synced.get(peer) == Some(&link) {
            synced.remove(peer);
        }
    }

    /// Answers `requester`'s request for `client_id`'s session. A session that already moved
    /// from here to a third node (an evacuation or rebalance handed it off while the client was
    /// reconnecting elsewhere) is asked for there, on the link that carried the hand-off, so
    /// the request cannot overtake it; before, both nodes answered "not found" in that window
    /// and the client started afresh while its queued messages sat on the other node.
    #[allow(clippy::too_many_arguments)]
    fn answer_take(
        self: &Arc<Self>,
        b: &Arc<Broker>,
        req: u64,
        client_id: &str,
        clean: bool,
        owner: Option<String>,
        requester: &str,
        hops: u8,
    ) {
        let moved_to = b
            .sessions
            .get(client_id)
            .and_then(|s| s.state.lock().moved_to().cloned());
        if let Some(next) = moved_to.filter(|n| n != requester && hops < MAX_TAKE_HOPS) {
            if self.links.lock().contains_key(&next) {
                tracing::info!(client_id, requester, to = %next, "session moved on; takeover request passed to its new node");
                self.send(
                    &next,
                    Frame::TakeFor {
                        req,
                        client_id: client_id.to_string(),
                        clean,
                        owner,
                        requester: requester.to_string(),
                        hops: hops + 1,
                    },
                );
                return;
            }
        }
        // Reserve room on the link first: a snapshot given up but then dropped on a full
        // queue would lose the session and every message queued in it.
        let Some(permit) = self.reserve(requester) else {
            tracing::warn!(peer = %requester, client_id, "link to the requesting node is full or down; session not given up");
            return;
        };
        let (snapshot, refused) = match self.give_up_session(
            b,
            client_id,
            clean,
            requester,
            Some(owner.as_deref()),
        ) {
            Ok(s) => (s, false),
            Err(crate::broker::NotOwner) => {
                tracing::info!(peer = %requester, client_id, "session takeover refused: another identity owns it");
                (None, true)
            }
        };
        permit.send((
            Instant::now(),
            Frame::TakeReply {
                req,
                snapshot: snapshot.map(Box::new),
                refused,
            },
        ));
    }

    /// A reserved place in `peer`'s send queue, so a frame that carries a session (which this
    /// node gives up as it builds the frame) is never dropped after the fact.
    fn reserve(&self, peer: &str) -> Option<mpsc::OwnedPermit<(Instant, Frame)>> {
        let tx = self.links.lock().get(peer)?.tx.clone();
        match tx.try_reserve_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.metrics.link_drops.inc();
                None
            }
        }
    }

    /// Forgets what `peer` told this node (its routes and sync state) and closes its incoming
    /// links. A peer that is still (or again) alive — a restarted pod whose new incarnation
    /// linked before the old one's departure was noticed — reconnects at once and sends its
    /// routes again; without the close it would never resend them, its routes would be
    /// missing and this node would never count itself synced.
    fn forget_peer(&self, peer: &str) {
        self.unlink_peer(peer);
        self.routes.remove_node(peer);
        self.caps.lock().remove(peer);
    }

    /// Drops the link to `peer` and what says it is synced, and closes its incoming links;
    /// its routes stay (a failed peer with durable sessions is waited for).
    fn unlink_peer(&self, peer: &str) {
        self.links.lock().remove(peer);
        self.synced.lock().remove(peer);
        self.seen.lock().remove(peer);
        for (_, (p, token)) in self.incoming.lock().iter() {
            if p == peer {
                token.cancel();
            }
        }
    }

    /// Deliveries forwarded for `client_id` before its session was installed here.
    pub fn take_early(&self, client_id: &str) -> Vec<Delivery> {
        self.early.lock().take(client_id)
    }

    /// Gives up a local session to `to`: the connection (if any) is closed as taken over, the
    /// session becomes a forwarding stub for a grace period, and its state is returned unless
    /// `clean`. Refused, with nothing changed, when a client's identity `owner` (`Some`; `None`
    /// for this node's own evacuation, which moves the session as it is) may not take it over.
    fn give_up_session(
        self: &Arc<Self>,
        b: &Arc<Broker>,
        client_id: &str,
        clean: bool,
        to: &str,
        owner: Option<Option<&str>>,
    ) -> Result<Option<SessionSnapshot>, crate::broker::NotOwner> {
        let Some(session) = b.sessions.get(client_id) else {
            return Ok(None);
        };
        let snapshot = {
            let mut st = session.state.lock();
            if st.ended || st.moved_to().is_some() {
                return Ok(None);
            }
            if owner.is_some_and(|o| {
                !crate::broker::may_take_over(b.config.sessions.takeover, st.owner.as_deref(), o)
            }) {
                return Err(crate::broker::NotOwner);
            }
            if let Some(c) = st.connection.take() {
                c.kick.send(Kick::TakenOver);
            }
            st.generation += 1;
            if clean {
                None
            } else {
                let snap = SessionSnapshot::capture(client_id, &st);
                st.queue.clear();
                st.inflight.clear();
                st.rare_mut().moved_to = Some(to.to_string());
                // The new node stores it from here on.
                if let Some(db) = &b.durable {
                    db.delete_session(client_id, &mut st);
                }
                Some(snap)
            }
        };
        if snapshot.is_none() {
            // Clean start elsewhere: the old session simply ends.
            b.end_session(&session);
            b.sessions.remove_if_same(&session);
            return Ok(None);
        }
        self.metrics.handed_off.inc();
        self.retire_stub(b, session);
        Ok(snapshot)
    }

    fn retire_stub(&self, b: &Arc<Broker>, session: Arc<Session>) {
        let b = b.clone();
        tokio::spawn(async move {
            tokio::time::sleep(MOVED_GRACE).await;
            b.end_session(&session);
            b.sessions.remove_if_same(&session);
        });
    }

    /// Asks the other nodes for `client_id`'s session before it connects here, on behalf of
    /// the identity `owner`. A moved session is installed by the time this returns.
    pub async fn take_session(&self, client_id: &str, clean: bool, owner: Option<&str>) -> Taken {
        if !clean {
            self.wait_for_owners(client_id).await;
        }
        let peers: Vec<String> = {
            let links = self.links.lock();
            links
                .iter()
                .filter(|(_, l)| l.up.load(Ordering::Relaxed))
                .map(|(n, _)| n.clone())
                .collect()
        };
        if peers.is_empty() {
            return Taken::NotFound;
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(
            req,
            PendingTake {
                waiting: peers.len(),
                found: Taken::NotFound,
                done: Some(tx),
            },
        );
        for p in &peers {
            self.send(
                p,
                Frame::TakeSession {
                    req,
                    client_id: client_id.to_string(),
                    clean,
                    owner: owner.map(str::to_string),
                },
            );
        }
        let got = tokio::time::timeout(TAKEOVER_WAIT, rx).await;
        self.pending.lock().remove(&req);
        let taken = match got {
            Ok(Ok(t)) => t,
            _ => Taken::NotFound,
        };
        if taken == Taken::Moved {
            self.metrics.takeovers.inc();
        }
        taken
    }

    /// A client resuming its session waits, at most `node_failure.owner_wait`, while a peer
    /// that keeps durable sessions is away (failed and held for, or not linked): its
    /// session may be there, and taking it over once the peer is back loses nothing. After
    /// the wait it goes on without that peer (counted).
    async fn wait_for_owners(&self, client_id: &str) {
        let limit = Duration::from_secs(self.node_failure.owner_wait);
        let Some(first) = self.away().filter(|_| !limit.is_zero()) else {
            return;
        };
        tracing::info!(client_id, peer = %first, "a node with durable sessions is away; the client waits for it before resuming its session");
        let deadline = Instant::now() + limit;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.away() {
                None => {
                    self.metrics
                        .owner_waits
                        .with_label_values(&["returned"])
                        .inc();
                    return;
                }
                Some(peer) if Instant::now() >= deadline => {
                    tracing::warn!(client_id, peer = %peer, wait_s = limit.as_secs(), "a node with durable sessions stayed away; the client goes on without it (a session it held there is not taken over)");
                    self.metrics
                        .owner_waits
                        .with_label_values(&["expired"])
                        .inc();
                    return;
                }
                Some(_) => {}
            }
        }
    }

    /// A peer with durable sessions that cannot answer for them now: failed and held for,
    /// or live but not linked (killed and not noticed yet, or restarting).
    fn away(&self) -> Option<String> {
        if let Some((p, _)) = self.parked.lock().iter().find(|(_, k)| k.clients_wait) {
            return Some(p.clone());
        }
        let caps = self.caps.lock();
        let live = self.live.lock();
        let links = self.links.lock();
        live.keys()
            .find(|p| {
                caps.get(*p) == Some(&true)
                    && !links.get(*p).is_some_and(|l| l.up.load(Ordering::Relaxed))
            })
            .cloned()
    }

    /// Members, this node first.
    pub fn members(&self) -> Vec<Member> {
        let mut out = Vec::new();
        let own_routes = self.broker().map(|b| b.router.filters().len()).unwrap_or(0);
        let evac = self.evacuation.lock().state;
        out.push(Member {
            name: self.node.clone(),
            state: if evac == EvacuationState::Idle {
                MemberState::Itself
            } else {
                MemberState::Evacuating
            },
            routes: own_routes as u64,
            addr: None,
            linked: true,
        });
        let live = self.live.lock();
        let links = self.links.lock();
        let mut names: Vec<&String> = live.keys().collect();
        names.sort();
        for n in names {
            let (state, addr) = &live[n];
            out.push(Member {
                name: n.clone(),
                state: *state,
                routes: self.routes.count(n) as u64,
                addr: addr.clone(),
                linked: links.get(n).is_some_and(|l| l.up.load(Ordering::Relaxed)),
            });
        }
        if let Some(g) = self.gossip.get() {
            if let Ok(c) = g.chitchat().try_lock() {
                let departed = self.departed.lock();
                for dead in c.dead_nodes() {
                    let name = &*dead.node_id;
                    // A member that left cleanly (scale-down) is not a ghost.
                    if !live.contains_key(name) && *name != *self.node && !departed.contains(name) {
                        out.push(Member {
                            name: dead.node_id.to_string(),
                            state: MemberState::Dead,
                            routes: 0,
                            addr: None,
                            linked: false,
                        });
                    }
                }
            }
        }
        out
    }

    /// Evacuation progress.
    pub fn evacuation(&self) -> EvacuationStatus {
        self.evacuation.lock().clone()
    }

    /// Starts evacuating this node: stop accepting, turn unready, move clients away at `rate`
    /// per second (MQTT 5 clients get DISCONNECT 0x9C with `server_reference` when given) and
    /// hand every persistent session to a peer. Returns false if one is already running.
    pub fn evacuate(self: &Arc<Self>, rate: u32, server_reference: Option<String>) -> bool {
        {
            let mut e = self.evacuation.lock();
            if e.state == EvacuationState::Running {
                return false;
            }
            e.state = EvacuationState::Running;
        }
        let me = self.clone();
        tokio::spawn(async move { me.run_evacuation(rate.max(1), server_reference).await });
        true
    }

    async fn run_evacuation(self: Arc<Self>, rate: u32, server_reference: Option<String>) {
        let Some(b) = self.broker() else { return };
        b.accepting.store(false, Ordering::Relaxed);
        if let Some(g) = self.gossip.get() {
            g.with_chitchat(|c| {
                c.self_node_state()
                    .set(gossip::KEY_STATE, MemberState::Evacuating.as_str())
            })
            .await;
        }
        tracing::info!(rate, "evacuation started");
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        let reference = server_reference.map(ByteString::from);
        let mut handed = 0u64;
        let mut rr = 0usize;
        loop {
            let sessions = b.sessions.all();
            let remaining: Vec<Arc<Session>> = sessions
                .into_iter()
                .filter(|s| {
                    let st = s.state.lock();
                    !st.ended && st.moved_to().is_none()
                })
                .collect();
            let clients = remaining
                .iter()
                .filter(|s| s.state.lock().connection.is_some())
                .count();
            {
                let mut e = self.evacuation.lock();
                e.remaining_clients = clients as u64;
                e.remaining_sessions = remaining.len() as u64;
                e.handed_off = handed;
            }
            self.metrics
                .evacuation_remaining
                .set(remaining.len() as i64);
            let peers = self.ready_peers();
            if remaining.is_empty() || (peers.is_empty() && clients == 0) {
                break;
            }
            let Some(s) = remaining.into_iter().next() else {
                break;
            };
            let to = (!peers.is_empty()).then(|| peers[rr % peers.len()].as_str());
            if self.move_client(&b, &s, reference.clone(), to).await {
                rr += 1;
                handed += 1;
            }
            tokio::time::sleep(interval).await;
        }
        let mut e = self.evacuation.lock();
        e.state = EvacuationState::Done;
        e.handed_off = handed;
        tracing::info!(
            handed_off = handed,
            remaining = e.remaining_sessions,
            "evacuation done"
        );
    }

    /// Moves one client off this node: its connection (if any) is told to use another server
    /// (MQTT 5: DISCONNECT 0x9C with `reference`; 3.1.1: closed), and once the connection task
    /// has handed the session back, a persistent session is handed to `to` so the client finds
    /// it there with its queued messages. Returns whether the session was handed off (a client
    /// that reconnected elsewhere first has taken it over already).
    async fn move_client(
        self: &Arc<Self>,
        b: &Arc<Broker>,
        s: &Arc<Session>,
        reference: Option<ByteString>,
        to: Option<&str>,
    ) -> bool {
        let conn = s.state.lock().connection.clone();
        if let Some(c) = conn {
            c.kick.send(Kick::UseAnotherServer(reference));
            // Wait (bounded) for the connection task to hand the session back.
            let until = Instant::now() + Duration::from_secs(5);
            while s
                .state
                .lock()
                .connection
                .as_ref()
                .is_some_and(|x| x.id == c.id)
                && Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let persistent = {
            let st = s.state.lock();
            !st.ended && st.expiry > 0 && st.connection.is_none()
        };
        let Some(to) = to.filter(|_| persistent) else {
            return false;
        };
        let Some(permit) = self.reserve(to) else {
            return false; // stays here; the next round (or another target) tries again
        };
        match self.give_up_session(b, &s.client_id, false, to, None) {
            Ok(Some(snap)) => {
                permit.send((Instant::now(), Frame::Handoff(Box::new(snap))));
                true
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// Members that may receive rebalanced connections, with their gossiped counts: ready
    /// (joined, not evacuating), linked, and reporting a count.
    fn rebalance_targets(&self) -> Vec<rebalance::Load> {
        let ready = self.ready_peers();
        let loads = self.loads.lock();
        ready
            .into_iter()
            .filter_map(|node| {
                let connections = loads.get(&node)?.connections?;
                Some(rebalance::Load { node, connections })
            })
            .collect()
    }

    /// Whether `addr` is the MQTT address a live member gossips (an allowed Server Reference).
    pub fn is_member_mqtt_addr(&self, addr: &str) -> bool {
        self.loads
            .lock()
            .values()
            .any(|l| l.mqtt.as_deref() == Some(addr))
    }

    /// The MQTT address `node` gossips, for the Server Reference of a moved client.
    fn mqtt_addr_of(&self, node: &str) -> Option<String> {
        self.loads.lock().get(node)?.mqtt.clone()
    }

    /// Asks for a rebalance check now (`POST /api/v1/rebalance`).
    pub fn rebalance_now(&self, rate: Option<u32>) {
        self.rebalancer.trigger(rate);
    }

    /// Rebalancing state (`GET /api/v1/rebalance`).
    pub fn rebalance_status(&self) -> corvid_api::RebalanceStatus {
        let own = self
            .broker()
            .map(|b| b.metrics.connections.get().max(0) as u64)
            .unwrap_or(0);
        self.rebalancer.status(own, &self.rebalance_targets())
    }

    /// Peers that are linked and ready to take sessions.
    fn ready_peers(&self) -> Vec<String> {
        let live = self.live.lock();
        let links = self.links.lock();
        let mut v: Vec<String> = live
            .iter()
            .filter(|(n, (state, _))| {
                *state == MemberState::Ready
                    && links.get(*n).is_some_and(|l| l.up.load(Ordering::Relaxed))
            })
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Leaves the cluster: tells peers this node is gone.
    pub async fn leave(&self) {
        // What this node forwarded is acknowledged within milliseconds; wait (bounded) so none
        // of it stays held on this node's volume for peers to come.
        let until = Instant::now() + Duration::from_secs(2);
        while !self.outbox.peers().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(g) = self.gossip.get() {
            g.with_chitchat(|c| {
                c.self_node_state()
                    .set(gossip::KEY_STATE, gossip::STATE_LEFT)
            })
            .await;
            // One more gossip round so peers hear it.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        self.shutdown.cancel();
    }

    /// Whether this node runs with peers (discovery other than none).
    pub fn is_clustered(&self) -> bool {
        self.discovery != Discovery::None
    }
}

/// How often acknowledgements of forwarded messages are sent (once durable) and held messages
/// are pushed again onto link queues that had no room.
const HELD_TICK: Duration = Duration::from_millis(5);

/// Acknowledges peers' forwards once the store holds what they wrote, and resends held
/// messages to peers whose link queue had no room, every [`HELD_TICK`].
async fn held_loop(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(HELD_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cluster.shutdown.cancelled() => return,
        }
        let Some(b) = cluster.broker() else { return };
        let durable = b.durable.as_ref().map_or(u64::MAX, |d| d.store().durable());
        for (peer, key) in cluster.inbound.due(durable) {
            let sent = cluster.send(&peer, Frame::ForwardAck { key });
            cluster.inbound.acked(&peer, key, sent);
        }
        for peer in cluster.outbox.resyncing() {
            let tx = cluster.links.lock().get(&peer).map(|l| l.tx.clone());
            if let Some(tx) = tx {
                cluster.outbox.pump(&peer, &tx);
            }
        }
    }
}

/// Follows gossip's view of live members: links to new ones, forgets departed ones.
async fn membership_loop(cluster: Arc<Cluster>) {
    let Some(g) = cluster.gossip.get() else {
        return;
    };
    let mut watcher = g.chitchat().lock().await.live_nodes_watcher();
    let mut sessions_of: HashMap<String, u64> = HashMap::new();
    let mut left: HashSet<String> = HashSet::new();
    let mut own_sessions = u64::MAX;
    let mut own_connections = u64::MAX;
    let mut announced_ready = false;
    loop {
        if !announced_ready
            && cluster.synced()
            && cluster.evacuation.lock().state == EvacuationState::Idle
        {
            announced_ready = true;
            g.with_chitchat(|c| {
                c.self_node_state()
                    .set(gossip::KEY_STATE, MemberState::Ready.as_str())
            })
            .await;
            tracing::info!(node = %cluster.node, "synced with every peer; ready");
        }
        // Publish our session count, so survivors can tell how many sessions a dead node held.
        if let Some(b) = cluster.broker() {
            let n = b.sessions.len() as u64;
            if n != own_sessions {
                own_sessions = n;
                g.with_chitchat(|c| c.self_node_state().set(gossip::KEY_SESSIONS, n))
                    .await;
            }
            // And our live connections, which rebalancing compares.
            let n = b.metrics.connections.get().max(0) as u64;
            if n != own_connections {
                own_connections = n;
                g.with_chitchat(|c| c.self_node_state().set(gossip::KEY_CONNECTIONS, n))
                    .await;
            }
        }
        let mut loads: HashMap<String, PeerLoad> = HashMap::new();
        type Seen = (String, Option<String>, Option<String>, Option<u64>);
        let mut caps_now: HashMap<String, bool> = HashMap::new();
        let snapshot: Vec<Seen> = watcher
            .borrow_and_update()
            .iter()
            .filter(|(id, _)| *id.node_id != *cluster.node)
            .map(|(id, st)| {
                loads.insert(
                    id.node_id.to_string(),
                    PeerLoad {
                        connections: st.get(gossip::KEY_CONNECTIONS).and_then(|v| v.parse().ok()),
                        mqtt: st.get(gossip::KEY_MQTT).map(str::to_string),
                    },
                );
                if let Some(d) = st.get(gossip::KEY_DURABLE) {
                    caps_now.insert(id.node_id.to_string(), d == "true");
                }
                (
                    id.node_id.to_string(),
                    st.get(gossip::KEY_STATE).map(str::to_string),
                    st.get(gossip::KEY_LINK).map(str::to_string),
                    st.get(gossip::KEY_SESSIONS).and_then(|v| v.parse().ok()),
                )
            })
            .collect();
        *cluster.loads.lock() = loads;
        cluster.caps.lock().extend(caps_now);
        let mut now: HashMap<String, (MemberState, Option<String>)> = HashMap::new();
        for (name, state, link, sessions) in snapshot {
            if let Some(n) = sessions {
                sessions_of.insert(name.clone(), n);
            }
            if state.as_deref() == Some(gossip::STATE_LEFT) {
                left.insert(name);
                continue;
            }
            left.remove(&name);
            // A peer that has not gossiped its state yet is still joining.
            let state = state.map_or(MemberState::Joining, |s| MemberState::from_wire(&s));
            now.insert(name, (state, link));
        }
        let gone: Vec<String> = {
            let mut live = cluster.live.lock();
            let gone = live
                .keys()
                .filter(|k| !now.contains_key(*k))
                .cloned()
                .collect();
            *live = now.clone();
            gone
        };
        let db = cluster.broker();
        let db = db.as_ref().and_then(|b| b.durable.as_ref());
        let hold = Duration::from_secs(cluster.node_failure.hold);
        // Forgets `n` for good; unless it left cleanly, what was held for it is dropped and its
        // sessions are lost (one survivor, the first by name, counts them, so the
        // cluster-wide sum is right). Returns (held messages dropped, sessions lost).
        let forget = |n: &String, left_cleanly: bool| {
            cluster.forget_peer(n);
            let moved = cluster.outbox.drop_peer(n, db);
            if left_cleanly {
                // It evacuated: what is still held for it went out on its link before it left
                // (only the acknowledgement may be missing), so it is no drop to alert on.
                cluster.count_held(held::Moved {
                    acked: moved.dropped,
                    ..held::Moved::default()
                });
                return (0, 0);
            }
            cluster.count_held(moved);
            let lost = sessions_of.get(n).copied().unwrap_or(0);
            let counter = now.keys().chain(std::iter::once(&cluster.node)).min();
            if counter == Some(&cluster.node) {
                cluster.metrics.sessions_lost.inc_by(lost);
            }
            (moved.dropped, lost)
        };
        for n in &gone {
            if left.contains(n) {
                forget(n, true);
                tracing::info!(peer = %n, "member left the cluster");
                continue;
            }
            let durable = cluster.caps.lock().get(n).copied().unwrap_or(false);
            if durable && !hold.is_zero() {
                // Its sessions are on its volume: wait for it, holding what is routed to them.
                cluster.unlink_peer(n);
                let until = Instant::now() + hold;
                cluster.parked.lock().insert(
                    n.clone(),
                    Parked {
                        until,
                        clients_wait: true,
                    },
                );
                tracing::warn!(peer = %n, hold_s = hold.as_secs(), held = cluster.outbox.len(n), "member failed; it keeps durable sessions, so what is routed to them is held until it is back");
                continue;
            }
            // It died without evacuating and keeps nothing: its sessions are gone.
            let (_, lost) = forget(n, false);
            tracing::warn!(peer = %n, sessions_lost = lost, "member failed");
        }
        let expired: Vec<String> = {
            let mut parked = cluster.parked.lock();
            parked.retain(|n, _| {
                let back = now.contains_key(n);
                if back {
                    tracing::info!(peer = %n, "failed member is back");
                }
                !back
            });
            let t = Instant::now();
            let expired: Vec<String> = parked
                .iter()
                .filter(|(_, k)| k.until <= t)
                .map(|(n, _)| n.clone())
                .collect();
            for n in &expired {
                parked.remove(n);
            }
            expired
        };
        for n in &expired {
            let (dropped, lost) = forget(n, false);
            tracing::warn!(peer = %n, sessions_lost = lost, held_dropped = dropped, "failed member did not come back within node_failure.hold; its sessions count as lost");
        }
        for (name, (_, link)) in &now {
            let Some(addr) = link.as_deref().and_then(|a| a.parse::<SocketAddr>().ok()) else {
                continue;
            };
            let mut links = cluster.links.lock();
            let stale = links.get(name).is_some_and(|l| l.addr != addr);
            if stale {
                links.remove(name);
            }
            if !links.contains_key(name) {
                tracing::info!(peer = %name, %addr, "member joined; linking");
                links.insert(
                    name.clone(),
                    Link::dial(cluster.clone(), name.clone(), addr),
                );
            }
        }
        let mut by_state: HashMap<MemberState, i64> = HashMap::new();
        for (st, _) in now.values() {
            *by_state.entry(*st).or_default() += 1;
        }
        for s in [
            MemberState::Ready,
            MemberState::Joining,
            MemberState::Evacuating,
        ] {
            let n = by_state.get(&s).copied().unwrap_or(0);
            cluster
                .metrics
                .members
                .with_label_values(&[s.as_str()])
                .set(n);
        }
        *cluster.departed.lock() = left.clone();
        tokio::select! {
            r = watcher.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = cluster.shutdown.cancelled() => return,
        }
    }
}

#[async_trait::async_trait]
impl crate::fabric::Fabric for Cluster {
    fn retained(&self, msg: &Msg) {
        Cluster::retained(self, msg)
    }
    fn forward(&self, msg: &Msg, local_groups: &[Arc<str>]) -> HashSet<Arc<str>> {
        Cluster::forward(self, msg, local_groups)
    }
    fn deliver_to(&self, node: &str, client_id: &str, d: &Delivery) {
        Cluster::deliver_to(self, node, client_id, d)
    }
    fn route_added(&self, raw: &str) {
        Cluster::route_added(self, raw)
    }
    fn route_removed(&self, raw: &str) {
        Cluster::route_removed(self, raw)
    }
    async fn wait_synced(&self, limit: Duration) -> bool {
        Cluster::wait_synced(self, limit).await
    }
    async fn take_session(&self, client_id: &str, clean: bool, owner: Option<&str>) -> Taken {
        Cluster::take_session(self, client_id, clean, owner).await
    }
    fn take_early(&self, client_id: &str) -> Vec<Delivery> {
        Cluster::take_early(self, client_id)
    }
    fn running_nodes(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .filter(|m| m.state != MemberState::Dead)
            .map(|m| m.name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_that_never_links_stops_holding_readiness_after_the_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(30);
        let mut ghost = PeerSeen::new(t0);
        assert_eq!(ghost.holds_readiness(false, t0, grace), Hold::Waiting);
        let later = t0 + Duration::from_secs(29);
        assert_eq!(ghost.holds_readiness(false, later, grace), Hold::Waiting);
        let after = t0 + Duration::from_secs(31);
        assert_eq!(ghost.holds_readiness(false, after, grace), Hold::Excused);

        // A peer that linked once is always waited for when its link is down.
        let mut real = PeerSeen::new(t0);
        assert_eq!(real.holds_readiness(true, t0, grace), Hold::Synced);
        assert_eq!(real.holds_readiness(false, after, grace), Hold::Waiting);
        // And a late linker counts as synced as soon as it links.
        assert_eq!(ghost.holds_readiness(true, after, grace), Hold::Synced);
        assert_eq!(
            ghost.holds_readiness(false, after + grace, grace),
            Hold::Waiting
        );
    }
}
