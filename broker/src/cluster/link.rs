//! Authenticated TCP links between nodes. Each node dials every peer it learns from gossip and
//! sends on that link; it receives on the links peers dial to it. A link starts with a
//! challenge handshake keyed by the cluster secret; a peer that fails it is refused and counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::proto::{self, Frame};
use super::Cluster;

/// Largest frame accepted on a link once the peer has proved it holds the cluster secret.
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Largest frame accepted before that (a hello or welcome is a few dozen bytes): an
/// unauthenticated sender cannot make the node buffer more than this per connection.
pub const PRE_AUTH_FRAME: usize = 4 * 1024;
/// Handshakes in progress at once on the cluster port; more connections are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Frames buffered for a peer before new ones are dropped (and counted).
pub const LINK_QUEUE: usize = 100_000;
/// Seconds a handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// A framed link that accepts only handshake-sized frames until [`authenticated`] lifts it.
fn framed(s: TcpStream) -> Framed<TcpStream, LengthDelimitedCodec> {
    let _ = s.set_nodelay(true);
    Framed::new(
        s,
        LengthDelimitedCodec::builder()
            .max_frame_length(PRE_AUTH_FRAME)
            .new_codec(),
    )
}

/// Lifts the pre-authentication frame limit of a link whose handshake succeeded.
fn authenticated(io: &mut Framed<TcpStream, LengthDelimitedCodec>) {
    io.codec_mut().set_max_frame_length(MAX_FRAME);
}

fn unix_now() -> u64 {
    crate::session::unix_now()
}

/// Accepts links from peers until shutdown; at most [`MAX_PENDING_HANDSHAKES`] unauthenticated
/// connections at a time, each for at most the handshake deadline.
pub async fn accept_loop(cluster: Arc<Cluster>, listener: TcpListener) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
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
            cluster.metrics.refused_peers.inc();
            tracing::debug!(%addr, "too many inter-node handshakes in progress; connection closed");
            continue;
        };
        let c = cluster.clone();
        tokio::spawn(async move {
            let mut io = framed(stream);
            let result = tokio::time::timeout(HANDSHAKE, accept_handshake(&c, &mut io))
                .await
                .unwrap_or_else(|_| Err("handshake timed out".to_string()));
            drop(permit);
            let peer = match result {
                Ok(peer) => peer,
                Err(why) => {
                    c.metrics.refused_peers.inc();
                    tracing::warn!(%addr, reason = %why, "inter-node link refused");
                    return;
                }
            };
            authenticated(&mut io);
            tracing::debug!(%addr, peer = %peer, "inter-node link accepted");
            let link_id = fastrand::u64(..);
            let closed = c.link_opened(&peer, link_id);
            loop {
                let next = tokio::select! {
                    next = io.next() => next,
                    _ = closed.cancelled() => {
                        tracing::info!(peer = %peer, "closing the peer's link: it left the membership (it resyncs if it is back)");
                        break;
                    }
                };
                let Some(Ok(bytes)) = next else { break };
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

async fn accept_handshake(
    c: &Cluster,
    io: &mut Framed<TcpStream, LengthDelimitedCodec>,
) -> Result<String, String> {
    let first = io
        .next()
        .await
        .ok_or("closed before hello")?
        .map_err(|e| e.to_string())?;
    let Ok(Some(Frame::Hello {
        node,
        nonce,
        ts,
        tag,
    })) = proto::decode(&first)
    else {
        return Err("first frame is not a hello".into());
    };
    if ts.abs_diff(unix_now()) > 300 {
        return Err("hello timestamp too far from now".into());
    }
    if !c.secret.verify(
        &[
            b"hello",
            node.as_bytes(),
            &nonce.to_be_bytes(),
            &ts.to_be_bytes(),
        ],
        &tag,
    ) {
        return Err("wrong cluster secret".into());
    }
    let welcome = Frame::Welcome {
        node: c.node.clone(),
        tag: c
            .secret
            .tag(&[b"welcome", c.node.as_bytes(), &nonce.to_be_bytes()]),
    };
    let bytes = proto::encode(&welcome).map_err(|e| e.to_string())?;
    io.send(bytes::Bytes::from(bytes))
        .await
        .map_err(|e| e.to_string())?;
    Ok(node)
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
                        for f in cluster.sync_frames() {
                            if let Ok(b) = proto::encode(&f) {
                                if io.send(bytes::Bytes::from(b)).await.is_err() {
                                    ok = false;
                                    break;
                                }
                            }
                        }
                        if ok {
                            if let Some(b) = pending.take() {
                                ok = io.send(bytes::Bytes::from(b)).await.is_ok();
                            }
                        }
                        while ok {
                            let next = tokio::select! {
                                next = rx.recv() => next,
                                // The peer sends nothing on this link after the handshake: a
                                // read means it closed the link (it forgot this node, or it
                                // is gone), so reconnect and send the routes again at once.
                                _ = io.next() => break,
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
                            if io.feed(bytes::Bytes::from(bytes.clone())).await.is_err() {
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
                                    if io.feed(bytes::Bytes::from(b)).await.is_err() {
                                        ok = false;
                                        break;
                                    }
                                }
                            }
                            if ok && SinkExt::<bytes::Bytes>::flush(&mut io).await.is_err() {
                                ok = false;
                            }
                        }
                        up2.store(false, Ordering::Relaxed);
                        tracing::info!(peer = %peer, "inter-node link lost; reconnecting");
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer, %addr, error = %e, "cannot link to peer yet");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cluster.shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Link { addr, tx, up, task }
    }
}

async fn connect(
    c: &Cluster,
    peer: &str,
    addr: SocketAddr,
) -> Result<Framed<TcpStream, LengthDelimitedCodec>, String> {
    let stream = tokio::time::timeout(HANDSHAKE, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut io = framed(stream);
    let nonce = fastrand::u64(..);
    let ts = unix_now();
    let hello = Frame::Hello {
        node: c.node.clone(),
        nonce,
        ts,
        tag: c.secret.tag(&[
            b"hello",
            c.node.as_bytes(),
            &nonce.to_be_bytes(),
            &ts.to_be_bytes(),
        ]),
    };
    io.send(bytes::Bytes::from(
        proto::encode(&hello).map_err(|e| e.to_string())?,
    ))
    .await
    .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(HANDSHAKE, io.next())
        .await
        .map_err(|_| "no welcome".to_string())?
        .ok_or("closed during handshake (wrong cluster secret?)")?
        .map_err(|e| e.to_string())?;
    match proto::decode(&answer) {
        Ok(Some(Frame::Welcome { node, tag }))
            if c.secret
                .verify(&[b"welcome", node.as_bytes(), &nonce.to_be_bytes()], &tag) =>
        {
            if node != peer {
                return Err(format!("expected node {peer}, {addr} is {node}"));
            }
            authenticated(&mut io);
            Ok(io)
        }
        _ => Err("bad welcome (wrong cluster secret?)".into()),
    }
}
