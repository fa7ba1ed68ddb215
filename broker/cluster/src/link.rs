//! Encrypted, mutually authenticated TCP links between nodes. Each node dials every peer it
//! learns from gossip and sends on that link; it receives on the links peers dial to it. Every
//! link runs over a [`channel`] (a Noise handshake keyed by the cluster secret, then encrypted
//! frames); a peer that fails the handshake, or a message that fails to decrypt, is refused,
//! dropped and counted.
//!
//! Each handshake takes the key ring in use at that moment ([`Cluster::ring`]): a node accepts
//! a dialer holding any key of its ring, and dials with its primary, then (only when a peer
//! closes without answering, as one that does not hold that key does) with its other keys, one
//! new connection each. A ring reload therefore changes new links only; links already up keep
//! their session keys.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::channel::{self, Channel, ChannelError};
use super::proto::{self, Frame};
use super::Cluster;

pub use super::channel::HANDSHAKE_FRAME as PRE_AUTH_FRAME;
/// Handshakes in progress at once on the cluster port; more connections are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Handshakes in progress at once from one source address, so one host cannot use them all.
pub const MAX_PENDING_PER_IP: usize = 8;
/// Frames buffered for a peer before new ones are dropped (and counted).
pub const LINK_QUEUE: usize = 100_000;
/// Seconds a handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// Counts a refused or failed link: `refused_peers{reason}`, and for a cryptographic failure
/// also `link_auth_failures{reason}`.
fn count_failure(c: &Cluster, e: &ChannelError, accepting: bool) {
    if let Some(reason) = e.auth_failure() {
        c.metrics
            .link_auth_failures
            .with_label_values(&[reason])
            .inc();
    }
    if accepting {
        let reason = e.auth_failure().unwrap_or("io");
        c.metrics.refused_peers.with_label_values(&[reason]).inc();
    }
}

/// One unauthenticated connection's hold on the handshake budget, released on drop.
struct PendingHandshake {
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let mut m = self.per_ip.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Accepts links from peers until shutdown; at most [`MAX_PENDING_HANDSHAKES`] unauthenticated
/// connections at a time ([`MAX_PENDING_PER_IP`] from one address), each for at most the
/// handshake deadline.
pub async fn accept_loop(cluster: Arc<Cluster>, listener: TcpListener) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::new(Mutex::new(HashMap::new()));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = cluster.shutdown.cancelled() => return,
        };
        let Ok((stream, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            cluster
                .metrics
                .refused_peers
                .with_label_values(&["pending_limit"])
                .inc();
            tracing::debug!(%addr, "too many inter-node handshakes in progress; connection closed");
            continue;
        };
        {
            let mut m = per_ip.lock();
            let n = m.entry(addr.ip()).or_insert(0);
            if *n >= MAX_PENDING_PER_IP {
                drop(m);
                cluster
                    .metrics
                    .refused_peers
                    .with_label_values(&["per_ip_limit"])
                    .inc();
                tracing::debug!(%addr, "too many inter-node handshakes from one address; connection closed");
                continue;
            }
            *n += 1;
        }
        let pending = PendingHandshake {
            per_ip: per_ip.clone(),
            ip: addr.ip(),
            _permit: permit,
        };
        let c = cluster.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let ring = c.ring();
            let result =
                tokio::time::timeout(HANDSHAKE, channel::accept(stream, ring.keys(), &c.node))
                    .await;
            drop(pending);
            let (mut chan, peer) = match result {
                Ok(Ok(open)) => {
                    c.key_usage.record(open.key, "link_in");
                    (open.channel, open.peer)
                }
                Ok(Err(e)) => {
                    count_failure(&c, &e, true);
                    tracing::warn!(%addr, reason = %e, "inter-node link refused");
                    return;
                }
                Err(_) => {
                    c.metrics
                        .refused_peers
                        .with_label_values(&["timeout"])
                        .inc();
                    tracing::warn!(%addr, "inter-node link refused: handshake timed out");
                    return;
                }
            };
            tracing::debug!(%addr, peer = %peer, "inter-node link accepted");
            let link_id = fastrand::u64(..);
            let closed = c.link_opened(&peer, link_id);
            loop {
                let next = tokio::select! {
                    next = chan.recv() => next,
                    _ = closed.cancelled() => {
                        tracing::info!(peer = %peer, "closing the peer's link: it left the membership (it resyncs if it is back)");
                        break;
                    }
                };
                let bytes = match next {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => {
                        count_failure(&c, &e, false);
                        tracing::warn!(peer = %peer, %addr, error = %e, "inter-node link dropped");
                        break;
                    }
                };
                match proto::decode(&bytes) {
                    Ok(Some(frame)) => c.handle(&peer, link_id, frame),
                    Ok(None) => {
                        tracing::debug!(peer = %peer, kind = bytes.first().copied(), "frame of a kind this version does not know; skipped");
                    }
                    Err(e) => {
                        tracing::warn!(peer = %peer, error = %e, "undecodable frame; closing link");
                        break;
                    }
                }
            }
            c.link_closed(&peer, link_id);
        });
    }
}

/// The sending side of a link to one peer.
#[derive(Debug)]
pub struct Link {
    /// Peer's link address.
    pub addr: SocketAddr,
    /// Frames to send.
    pub tx: mpsc::Sender<(std::time::Instant, Frame)>,
    /// Whether the connection is established now.
    pub up: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Starts dialing `peer` at `addr`, reconnecting with backoff. On every (re)connect the
    /// link first sends this node's route table and retained messages.
    pub fn dial(cluster: Arc<Cluster>, peer: String, addr: SocketAddr) -> Link {
        let (tx, mut rx) = mpsc::channel::<(std::time::Instant, Frame)>(LINK_QUEUE);
        let up = Arc::new(AtomicBool::new(false));
        let up2 = up.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut pending: Option<Vec<u8>> = None;
            loop {
                match connect(&cluster, &peer, addr).await {
                    Ok(mut io) => {
                        backoff = Duration::from_millis(100);
                        up2.store(true, Ordering::Relaxed);
                        let mut ok = true;
                        for f in cluster.sync_frames(&peer) {
                            if let Ok(b) = proto::encode(&f) {
                                if io.send(&b).await.is_err() {
                                    ok = false;
                                    break;
                                }
                            }
                        }
                        if ok {
                            if let Some(b) = pending.take() {
                                ok = io.send(&b).await.is_ok();
                            }
                        }
                        while ok {
                            let next = tokio::select! {
                                next = rx.recv() => next,
                                // The peer sends nothing on this link after the handshake: a
                                // read means it closed the link (it forgot this node, or it
                                // is gone), so reconnect and send the routes again at once.
                                _ = io.recv() => break,
                            };
                            let Some((queued, frame)) = next else {
                                return;
                            };
                            cluster
                                .metrics
                                .forward_latency
                                .observe(queued.elapsed().as_secs_f64());
                            let Ok(bytes) = proto::encode(&frame) else {
                                continue;
                            };
                            cluster.metrics.forwarded_bytes.inc_by(bytes.len() as u64);
                            if io.feed(&bytes).await.is_err() {
                                pending = Some(bytes);
                                break;
                            }
                            // Batch what is already queued, then flush once.
                            while let Ok((queued, more)) = rx.try_recv() {
                                cluster
                                    .metrics
                                    .forward_latency
                                    .observe(queued.elapsed().as_secs_f64());
                                if let Ok(b) = proto::encode(&more) {
                                    cluster.metrics.forwarded_bytes.inc_by(b.len() as u64);
                                    if io.feed(&b).await.is_err() {
                                        ok = false;
                                        break;
                                    }
                                }
                            }
                            if ok && io.flush().await.is_err() {
                                ok = false;
                            }
                        }
                        up2.store(false, Ordering::Relaxed);
                        tracing::info!(peer = %peer, "inter-node link lost; reconnecting");
                    }
                    Err(e) => {
                        count_failure(&cluster, &e, false);
                        if e.auth_failure().is_some() {
                            tracing::warn!(peer = %peer, %addr, error = %e, "cannot link to peer: authentication failed");
                        } else {
                            tracing::debug!(peer = %peer, %addr, error = %e, "cannot link to peer yet");
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cluster.shutdown.cancelled() => return,
                }
                // At most a second apart: a killed peer that restarts is waited for by clients
                // and held messages, so it is linked again soon after it listens.
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
        Link { addr, tx, up, task }
    }
}

/// Dials `peer` at `addr` and runs the link handshake with the primary key, then with each
/// other key of the ring while the peer closes without answering (at most one connection per
/// key of the ring).
async fn connect(
    c: &Cluster,
    peer: &str,
    addr: SocketAddr,
) -> Result<Channel<TcpStream>, ChannelError> {
    let ring = c.ring();
    let mut last = ChannelError::Closed;
    for (i, key) in ring.keys().iter().enumerate() {
        match connect_with(c, peer, addr, key).await {
            Ok(ch) => {
                c.key_usage.record(i, "link_out");
                if i > 0 {
                    tracing::info!(peer = %peer, key = %key.fingerprint(), primary = %ring.primary_fingerprint(), "linked to a peer with an accepted (not the primary) cluster secret: it does not hold the primary yet");
                }
                return Ok(ch);
            }
            Err(ChannelError::Unanswered) => last = ChannelError::Unanswered,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// One connection to `peer` at `addr` and the handshake with `key`.
async fn connect_with(
    c: &Cluster,
    peer: &str,
    addr: SocketAddr,
    key: &super::secret::Secret,
) -> Result<Channel<TcpStream>, ChannelError> {
    let stream = tokio::time::timeout(HANDSHAKE, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(HANDSHAKE, channel::dial(stream, key, &c.node, peer))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}
