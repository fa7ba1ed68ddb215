//! Membership and failure detection: chitchat (scuttlebutt gossip with phi-accrual failure
//! detection) over UDP on the cluster port. Each node gossips a few keys about itself: its link
//! address, admin address, MQTT address, state, and its session and connection counts.
//!
//! Every datagram is sealed ([`SealedUdpTransport`]): ChaCha20-Poly1305 under a key derived from
//! the cluster secret (its own label, not the links' key), a random 96-bit nonce carried in the
//! datagram, and the sender's clock inside the sealed part. Datagrams that fail to open, carry
//! a time outside [`WINDOW_S`] of ours, or repeat a nonce seen within that window are dropped
//! and counted (`corvid_cluster_gossip_rejected_total`), so nobody without the secret can add a
//! member, change a member's state or replay old gossip. Gossip carries no data: routes,
//! messages and sessions travel only over the encrypted TCP links ([`super::link`]).
//!
//! During a secret rotation a node seals with its primary key and opens with any key of its
//! ring ([`GossipKey::set_ring`] swaps them while gossip runs). chitchat's own cluster id is
//! therefore a constant ([`CLUSTER_ID`]): derived from the secret, it would differ between
//! nodes on either side of a rotation, and the AEAD already keeps other clusters out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId,
    FailureDetectorConfig, ProtocolVersion,
};
use prometheus::IntCounter;

use super::secret::{KeyRing, KeyUsage, Secret};
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
/// Gossip key: `true` when the node keeps sessions on a durable store (a failed one comes back
/// with them, so the others hold its messages and its clients wait for it), `false` when not.
/// Present at all: the node acknowledges forwarded messages ([`super::proto::Frame::Forward`]).
pub const KEY_DURABLE: &str = "durable";
/// Gossiped state of a node that left cleanly (scale-down); it is never listed as a member.
pub const STATE_LEFT: &str = "left";

/// chitchat's cluster id; the same for every key (see the module doc).
const CLUSTER_ID: &str = "corvid-cluster";

/// Label of the key derived from the cluster secret for gossip (links use another).
const KEY_LABEL: &[u8] = b"corvid-cluster-gossip-aead-v1";
/// First bytes of every sealed datagram (also authenticated as associated data).
const MAGIC: &[u8; 4] = b"CVG1";
/// Nonce length (96 bits, random per datagram).
const NONCE: usize = 12;
/// Poly1305 tag length.
const TAG: usize = 16;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// Seconds a datagram's sealed timestamp may differ from this node's clock.
pub const WINDOW_S: u64 = 60;
/// Nonces remembered to refuse replays within the window; beyond this the oldest are dropped.
const REPLAY_CACHE: usize = 65_536;

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Too short or without the magic prefix.
    #[error("not a sealed gossip datagram")]
    Malformed,
    /// Failed to authenticate: another key, or altered.
    #[error("failed to authenticate")]
    Unauthenticated,
    /// Sealed too long ago (or in the future).
    #[error("timestamp outside the window")]
    Stale,
    /// A nonce already seen within the window.
    #[error("replayed")]
    Replayed,
}

/// Seals and opens gossip datagrams with the keys derived from the ring's secrets.
pub struct GossipKey {
    /// One cipher per key of the ring, the primary (the one sealing) first.
    aeads: parking_lot::RwLock<Arc<Vec<ChaCha20Poly1305>>>,
    seen: parking_lot::Mutex<HashMap<[u8; NONCE], u64>>,
}

/// The gossip cipher of one secret.
fn cipher(secret: &Secret) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(&secret.derive_key(KEY_LABEL).into())
}

impl std::fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GossipKey(..)")
    }
}

impl GossipKey {
    /// The gossip key of the cluster with `secret` alone.
    pub fn new(secret: &Secret) -> Self {
        Self::from_ring(&KeyRing::single(secret.clone()))
    }

    /// The gossip keys of `ring`.
    pub fn from_ring(ring: &KeyRing) -> Self {
        let k = GossipKey {
            aeads: parking_lot::RwLock::new(Arc::new(Vec::new())),
            seen: parking_lot::Mutex::new(HashMap::new()),
        };
        k.set_ring(ring);
        k
    }

    /// Seals with `ring`'s primary and opens with any of its keys from now on.
    pub fn set_ring(&self, ring: &KeyRing) {
        *self.aeads.write() = Arc::new(ring.keys().iter().map(cipher).collect());
    }

    /// Seals `plain` as sent at unix second `ts`: magic, nonce, then ciphertext of ts ‖ plain.
    pub fn seal_at(&self, ts: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut msg = Vec::with_capacity(8 + plain.len());
        msg.extend_from_slice(&ts.to_be_bytes());
        msg.extend_from_slice(plain);
        let aeads = self.aeads.read().clone();
        let sealed = aeads
            .first()?
            .encrypt(
                &nonce,
                Payload {
                    msg: &msg,
                    aad: MAGIC,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// Opens a datagram received at unix second `now`: its plaintext, or why it is refused.
    pub fn open(&self, datagram: &[u8], now: u64) -> Result<Vec<u8>, Rejected> {
        self.open_with_key(datagram, now).map(|(plain, _)| plain)
    }

    /// Opens a datagram received at unix second `now` with any key of the ring: its
    /// plaintext and the index of the key that opened it, or why it is refused.
    pub fn open_with_key(&self, datagram: &[u8], now: u64) -> Result<(Vec<u8>, usize), Rejected> {
        if datagram.len() < MAGIC.len() + NONCE + TAG + 8 || !datagram.starts_with(MAGIC) {
            return Err(Rejected::Malformed);
        }
        let (nonce, sealed) = datagram[MAGIC.len()..].split_at(NONCE);
        let mut n = [0u8; NONCE];
        n.copy_from_slice(nonce);
        let aeads = self.aeads.read().clone();
        let (plain, key) = aeads
            .iter()
            .enumerate()
            .find_map(|(i, aead)| {
                aead.decrypt(
                    (&n).into(),
                    Payload {
                        msg: sealed,
                        aad: MAGIC,
                    },
                )
                .ok()
                .map(|p| (p, i))
            })
            .ok_or(Rejected::Unauthenticated)?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&plain[..8]);
        let ts = u64::from_be_bytes(ts);
        if ts.abs_diff(now) > WINDOW_S {
            return Err(Rejected::Stale);
        }
        let mut seen = self.seen.lock();
        if seen.len() >= REPLAY_CACHE {
            seen.retain(|_, t| t.abs_diff(now) <= WINDOW_S);
            if seen.len() >= REPLAY_CACHE {
                // Only a flood of authentic datagrams gets here; forget the oldest half.
                let mut ts: Vec<u64> = seen.values().copied().collect();
                ts.sort_unstable();
                let cut = ts[ts.len() / 2];
                seen.retain(|_, t| *t > cut);
            }
        }
        if seen.insert(n, ts).is_some() {
            return Err(Rejected::Replayed);
        }
        Ok((plain[8..].to_vec(), key))
    }
}

/// chitchat's UDP transport with every datagram sealed by a [`GossipKey`].
///
/// chitchat 0.13 keeps its wire encoding private; its own public `UdpSocket` is the only codec
/// it offers. So each sealed socket uses two of them on loopback as encoder and decoder: an
/// envelope to send is written by the encoder to a private tap socket, and the bytes read there
/// are sealed and sent from the public socket; an opened datagram is written to the decoder,
/// which parses it back into an envelope. Only sealed bytes ever leave the node.
pub struct SealedUdpTransport {
    key: Arc<GossipKey>,
    rejected: IntCounter,
    usage: Option<Arc<KeyUsage>>,
}

impl SealedUdpTransport {
    /// A transport sealing with `key`, counting dropped datagrams in `rejected`.
    pub fn new(key: Arc<GossipKey>, rejected: IntCounter) -> Self {
        SealedUdpTransport {
            key,
            rejected,
            usage: None,
        }
    }

    /// Also records which key opened each datagram in `usage`.
    pub fn with_usage(mut self, usage: Arc<KeyUsage>) -> Self {
        self.usage = Some(usage);
        self
    }
}

/// Loopback address of the private codec sockets.
fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[async_trait]
impl Transport for SealedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = Arc::new(
            tokio::net::UdpSocket::bind(listen_addr)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("failed to bind to {listen_addr}/UDP for gossip: {e}")
                })?,
        );
        let encoder = UdpSocket::open(loopback()).await?;
        let tap = tokio::net::UdpSocket::bind(loopback()).await?;
        let decoder = UdpSocket::open(loopback()).await?;
        let injector = tokio::net::UdpSocket::bind(loopback()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let reader = tokio::spawn(read_loop(ReadLoop {
            public: public.clone(),
            key: self.key.clone(),
            rejected: self.rejected.clone(),
            usage: self.usage.clone(),
            decoder,
            injector,
            out: tx,
        }));
        Ok(Box::new(SealedSocket {
            public,
            key: self.key.clone(),
            encoder_addr: encoder.local_addr()?,
            encoder,
            tap,
            incoming: rx,
            reader,
            scratch: Vec::new(),
        }))
    }
}

/// What the background reader of a sealed socket owns.
struct ReadLoop {
    public: Arc<tokio::net::UdpSocket>,
    key: Arc<GossipKey>,
    rejected: IntCounter,
    usage: Option<Arc<KeyUsage>>,
    decoder: UdpSocket,
    injector: tokio::net::UdpSocket,
    out: tokio::sync::mpsc::Sender<RecvOutcome>,
}

/// Receives on the public socket, opens each datagram, decodes it, and passes it on; runs in
/// its own task so `Socket::recv` stays cancel-safe.
async fn read_loop(mut r: ReadLoop) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let (Ok(decoder_addr), Ok(injector_addr)) = (r.decoder.local_addr(), r.injector.local_addr())
    else {
        return;
    };
    loop {
        let (n, from) = match r.public.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "gossip socket failed");
                return;
            }
        };
        let plain = match r.key.open_with_key(&buf[..n], crate::session::unix_now()) {
            Ok((p, key)) => {
                if let Some(u) = &r.usage {
                    u.record(key, "gossip");
                }
                p
            }
            Err(why) => {
                r.rejected.inc();
                tracing::debug!(%from, bytes = n, reason = %why, "gossip datagram dropped");
                continue;
            }
        };
        if r.injector.send_to(&plain, decoder_addr).await.is_err() {
            continue;
        }
        let decoded = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match r.decoder.recv().await {
                    Ok(o) if o.from_addr == injector_addr => return Some(o),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        })
        .await;
        match decoded {
            Ok(Some(o)) => {
                let outcome = RecvOutcome {
                    from_addr: from,
                    envelope: o.envelope,
                    num_bytes_received: n,
                };
                if r.out.send(outcome).await.is_err() {
                    return;
                }
            }
            _ => {
                r.rejected.inc();
                tracing::warn!(%from, "authenticated gossip datagram does not decode; dropped");
            }
        }
    }
}

/// A bound gossip socket that seals what it sends and drops what it cannot open.
struct SealedSocket {
    public: Arc<tokio::net::UdpSocket>,
    key: Arc<GossipKey>,
    encoder: UdpSocket,
    encoder_addr: SocketAddr,
    tap: tokio::net::UdpSocket,
    incoming: tokio::sync::mpsc::Receiver<RecvOutcome>,
    reader: tokio::task::JoinHandle<()>,
    /// Reused datagram buffer for sends.
    scratch: Vec<u8>,
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.public.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(MAX_DATAGRAM, 0);
        let sent = self.send_with(to, envelope, &mut buf).await;
        self.scratch = buf;
        sent
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.incoming
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("gossip socket reader stopped"))
    }
}

impl SealedSocket {
    /// Encodes `envelope` through the loopback encoder, seals it and sends it to `to`, using
    /// `buf` (one datagram long) as scratch.
    async fn send_with(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
        buf: &mut [u8],
    ) -> anyhow::Result<SendOutcome> {
        // Whatever a cancelled send left on the tap is stale.
        while self.tap.try_recv_from(buf).is_ok() {}
        let tap_addr = self.tap.local_addr()?;
        self.encoder.send(tap_addr, envelope).await?;
        let encoded = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match self.tap.recv_from(buf).await {
                    Ok((n, from)) if from == self.encoder_addr => return Some(n),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        })
        .await;
        let Ok(Some(n)) = encoded else {
            tracing::warn!(%to, "gossip envelope could not be encoded; not sent");
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        let Some(sealed) = self.key.seal_at(crate::session::unix_now(), &buf[..n]) else {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        if sealed.len() > MAX_DATAGRAM {
            tracing::warn!(bytes = sealed.len(), %to, "gossip datagram too large once sealed; not sent");
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        let num_bytes_sent = match self.public.send_to(&sealed, to).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(%to, error = %e, "gossip send failed");
                0
            }
        };
        Ok(SendOutcome { num_bytes_sent })
    }
}

/// Receive errors after which the socket still works (ICMP unreachable reported late).
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::OutOfMemory
    )
}

/// Starts gossip for this node, sealed with `key` (the ring's gossip keys, swapped on
/// reload); datagrams that fail to open are counted in `rejected`, the key that opened the
/// others in `usage` when given.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    node: &str,
    generation: u64,
    listen: SocketAddr,
    advertise: SocketAddr,
    seeds: Vec<String>,
    key: Arc<GossipKey>,
    initial: Vec<(String, String)>,
    rejected: IntCounter,
    usage: Option<Arc<KeyUsage>>,
) -> Result<ChitchatHandle, ClusterError> {
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(node.to_string(), generation, advertise),
        cluster_id: CLUSTER_ID.to_string(),
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
    let mut transport = SealedUdpTransport::new(key, rejected);
    if let Some(u) = usage {
        transport = transport.with_usage(u);
    }
    spawn_chitchat(config, initial, &transport)
        .await
        .map_err(|e| ClusterError::Gossip(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_datagrams_open_only_with_the_key_in_the_window_and_once() {
        let k = GossipKey::new(&Secret::from_bytes(b"gossip-test-secret-0123456789"));
        let other = GossipKey::new(&Secret::from_bytes(b"another-secret-entirely-987654"));
        let now = 1_800_000_000;
        let d = k.seal_at(now, b"member n9 alive").expect("seal");
        assert!(
            !d.windows(9).any(|w| w == b"member n9"),
            "plaintext visible"
        );
        assert_eq!(other.open(&d, now), Err(Rejected::Unauthenticated));
        assert_eq!(k.open(&d, now).as_deref(), Ok(&b"member n9 alive"[..]));
        assert_eq!(k.open(&d, now), Err(Rejected::Replayed));
        let old = k.seal_at(now - WINDOW_S - 1, b"old").expect("seal");
        assert_eq!(k.open(&old, now), Err(Rejected::Stale));
        let mut bent = k.seal_at(now, b"x").expect("seal");
        let last = bent.len() - 1;
        bent[last] ^= 1;
        assert_eq!(k.open(&bent, now), Err(Rejected::Unauthenticated));
        assert_eq!(k.open(b"garbage", now), Err(Rejected::Malformed));
    }

    #[test]
    fn a_ring_seals_with_its_primary_and_opens_with_any_of_its_keys() {
        let old = Secret::from_bytes(b"old-gossip-secret-0123456789");
        let new = Secret::from_bytes(b"new-gossip-secret-0123456789");
        let outsider = GossipKey::new(&Secret::from_bytes(b"outsider-secret-0123456789"));
        let now = 1_800_000_000;
        // Phase 1: send old, accept new too.
        let k = GossipKey::from_ring(&KeyRing::new(old.clone(), vec![new.clone()]).expect("ring"));
        let from_old = GossipKey::new(&old).seal_at(now, b"a").expect("seal");
        let from_new = GossipKey::new(&new).seal_at(now, b"b").expect("seal");
        assert_eq!(k.open_with_key(&from_old, now), Ok((b"a".to_vec(), 0)));
        assert_eq!(k.open_with_key(&from_new, now), Ok((b"b".to_vec(), 1)));
        let mine = k.seal_at(now, b"c").expect("seal");
        assert!(GossipKey::new(&old).open(&mine, now).is_ok());
        assert_eq!(
            outsider
                .open(&outsider.seal_at(now, b"x").expect("seal"), now)
                .as_deref(),
            Ok(&b"x"[..])
        );
        assert_eq!(
            k.open(&outsider.seal_at(now, b"x").expect("seal"), now),
            Err(Rejected::Unauthenticated)
        );
        // Phase 3 (swapped in place): only the new key.
        k.set_ring(&KeyRing::single(new.clone()));
        let late_old = GossipKey::new(&old).seal_at(now, b"d").expect("seal");
        assert_eq!(k.open(&late_old, now), Err(Rejected::Unauthenticated));
        let sealed = k.seal_at(now, b"e").expect("seal");
        assert!(GossipKey::new(&new).open(&sealed, now).is_ok());
    }
}
