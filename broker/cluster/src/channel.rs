//! The encrypted, mutually authenticated byte channel under every inter-node link, so nothing
//! on the cluster port can be read, forged, altered or replayed without the cluster secret.
//!
//! A Noise `NNpsk0` handshake ([`NOISE_PARAMS`]) keyed by a pre-shared key derived from the
//! cluster secret ([`Secret::derive_key`], never the raw secret), with fresh ephemeral keys
//! from both sides: the dialer's first message carries its node name and the name it means to
//! reach; the acceptor's answer carries its own name; the dialer then sends a confirmation under
//! the new session keys, which proves it is live (a replayed first message cannot produce it).
//! After that the frames, each behind a 4-byte length, form a byte stream carried in Noise
//! transport messages (ChaCha20-Poly1305, at most 65535 bytes each): the small frames written
//! between two flushes share one message (one seal for hundreds of forwarded messages), and a
//! frame larger than a message spans several, reassembled up to the same overall bound as before
//! ([`MAX_FRAME`]). Any message that fails to decrypt ends the channel.
//!
//! While the secret rotates, the acceptor holds several keys ([`super::secret::KeyRing`]):
//! `NNpsk0` mixes the key in before the dialer's first message is sealed, so the acceptor tries
//! that one message under each key it holds (at most [`MAX_KEYS`], no network round trip per
//! try) and answers under the one that opens it. The dialer uses one key per connection; a
//! dialer holding several dials again with the next one when its first is not answered.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::secret::{Secret, MAX_KEYS};

/// The Noise protocol of links: PSK-authenticated ephemeral-ephemeral X25519, ChaCha20-Poly1305.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash: a peer speaking anything else fails the handshake.
const PROLOGUE: &[u8] = b"corvid-cluster-link/1";
/// Label of the key derived from the cluster secret for links (gossip uses another).
const PSK_LABEL: &[u8] = b"corvid-cluster-link-noise-psk-v1";
/// Largest message accepted before the handshake completed (handshake messages are ~100 bytes):
/// an unauthenticated sender cannot make the node buffer more than this per connection.
pub const HANDSHAKE_FRAME: usize = 1024;
/// Largest Noise message (the protocol's limit).
pub const NOISE_MSG: usize = 65535;
/// Poly1305 tag length.
const TAG: usize = 16;
/// Plaintext bytes per transport message.
const CHUNK: usize = NOISE_MSG - TAG;
/// Length prefix of each frame in the stream.
const LEN: usize = 4;
/// Largest frame (reassembled from chunks) accepted from an authenticated peer.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Longest node name carried in the handshake.
const MAX_NAME: usize = 253;
/// What the dialer sends first under the session keys.
const CONFIRM: &[u8] = b"corvid-link-confirm";

/// Why a channel could not be opened or was closed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed (or a length prefix exceeded the current bound).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection during the handshake.
    #[error("closed during the handshake")]
    Closed,
    /// The acceptor closed the connection instead of answering the first message: it does
    /// not hold the key it was sealed with (or it is going away); another key may work.
    #[error("the peer did not answer the handshake (it may not accept this cluster secret)")]
    Unanswered,
    /// A handshake message failed to authenticate: wrong cluster secret, or a replay.
    #[error("handshake failed (wrong cluster secret or replayed handshake): {0}")]
    Handshake(String),
    /// A transport message failed to decrypt: tampered, replayed or out of order.
    #[error("a message failed to decrypt (tampered or replayed)")]
    Decrypt,
    /// The peer authenticated but is not who was expected (or the name is unusable).
    #[error("unexpected peer: {0}")]
    Peer(String),
    /// A reassembled frame exceeds [`MAX_FRAME`].
    #[error("frame exceeds {MAX_FRAME} bytes")]
    TooLarge,
    /// A decrypted message is not well formed.
    #[error("malformed message")]
    Malformed,
}

impl ChannelError {
    /// The `reason` label of `corvid_cluster_link_auth_failures_total` for cryptographic
    /// failures; `None` for ordinary network errors.
    pub fn auth_failure(&self) -> Option<&'static str> {
        match self {
            ChannelError::Handshake(_) => Some("handshake"),
            ChannelError::Decrypt => Some("decrypt"),
            ChannelError::Peer(_) => Some("peer"),
            _ => None,
        }
    }
}

fn hs_err(e: snow::Error) -> ChannelError {
    ChannelError::Handshake(e.to_string())
}

/// A Noise handshake state for this cluster's key.
fn handshake(secret: &Secret, initiator: bool) -> Result<snow::HandshakeState, ChannelError> {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().map_err(hs_err)?;
    let psk = secret.derive_key(PSK_LABEL);
    let b = snow::Builder::new(params).prologue(PROLOGUE).psk(0, &psk);
    if initiator {
        b.build_initiator().map_err(hs_err)
    } else {
        b.build_responder().map_err(hs_err)
    }
}

/// Length-prefixed framing that accepts only handshake-sized messages until raised.
fn framed<S: AsyncRead + AsyncWrite>(s: S) -> Framed<S, LengthDelimitedCodec> {
    Framed::new(
        s,
        LengthDelimitedCodec::builder()
            .max_frame_length(HANDSHAKE_FRAME)
            .new_codec(),
    )
}

async fn next_msg<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Framed<S, LengthDelimitedCodec>,
) -> Result<bytes::BytesMut, ChannelError> {
    io.next()
        .await
        .ok_or(ChannelError::Closed)?
        .map_err(Into::into)
}

/// Checks a node name from a peer: non-empty, bounded, UTF-8.
fn name(b: &[u8]) -> Result<String, ChannelError> {
    if b.is_empty() || b.len() > MAX_NAME {
        return Err(ChannelError::Peer("empty or overlong node name".into()));
    }
    String::from_utf8(b.to_vec()).map_err(|_| ChannelError::Peer("node name not UTF-8".into()))
}

/// Dials: runs the initiator's side of the handshake on `stream` as node `me`, expecting to
/// reach node `expect`; returns the open channel.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    secret: &Secret,
    me: &str,
    expect: &str,
) -> Result<Channel<S>, ChannelError> {
    if me.len() > MAX_NAME || expect.len() > MAX_NAME {
        return Err(ChannelError::Peer("node name too long".into()));
    }
    let mut hs = handshake(secret, true)?;
    let mut io = framed(stream);
    let mut payload = Vec::with_capacity(2 + me.len() + expect.len());
    payload.push(me.len() as u8);
    payload.extend_from_slice(me.as_bytes());
    payload.push(expect.len() as u8);
    payload.extend_from_slice(expect.as_bytes());
    let mut buf = vec![0u8; HANDSHAKE_FRAME];
    let n = hs.write_message(&payload, &mut buf).map_err(hs_err)?;
    io.send(Bytes::copy_from_slice(&buf[..n])).await?;
    let answer = match next_msg(&mut io).await {
        Ok(a) => a,
        Err(ChannelError::Closed) => return Err(ChannelError::Unanswered),
        Err(ChannelError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            return Err(ChannelError::Unanswered)
        }
        Err(e) => return Err(e),
    };
    let n = hs.read_message(&answer, &mut buf).map_err(hs_err)?;
    let reached = name(&buf[..n])?;
    if reached != expect {
        return Err(ChannelError::Peer(format!(
            "expected node {expect}, reached {reached}"
        )));
    }
    let noise = hs.into_transport_mode().map_err(hs_err)?;
    let mut ch = Channel::new(io, noise);
    ch.send(CONFIRM).await?;
    Ok(ch)
}

/// A link accepted by [`accept`].
#[derive(Debug)]
pub struct Accepted<S> {
    /// The open channel.
    pub channel: Channel<S>,
    /// The dialer's authenticated node name.
    pub peer: String,
    /// Which of the acceptor's keys the dialer used (0: the primary).
    pub key: usize,
}

/// Reads the dialer's first message under each of `keys` in turn (at most [`MAX_KEYS`]):
/// the handshake state that opened it, its payload length and the key's index.
fn open_first(
    keys: &[Secret],
    first: &[u8],
    buf: &mut [u8],
) -> Result<(snow::HandshakeState, usize, usize), ChannelError> {
    let mut last = ChannelError::Handshake("no cluster secret to accept with".into());
    for (i, key) in keys.iter().take(MAX_KEYS).enumerate() {
        let mut hs = handshake(key, false)?;
        match hs.read_message(first, buf) {
            Ok(n) => return Ok((hs, n, i)),
            Err(e) => last = hs_err(e),
        }
    }
    Err(last)
}

/// Accepts: runs the responder's side of the handshake on `stream` as node `me`, accepting a
/// dialer that holds any of `keys`; returns the open channel, the dialer's authenticated node
/// name and the key it used.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    keys: &[Secret],
    me: &str,
) -> Result<Accepted<S>, ChannelError> {
    let mut io = framed(stream);
    let first = next_msg(&mut io).await?;
    let mut buf = vec![0u8; HANDSHAKE_FRAME];
    let (mut hs, n, key) = open_first(keys, &first, &mut buf)?;
    let payload = &buf[..n];
    let split = |b: &[u8]| -> Result<(usize, usize), ChannelError> {
        let len = *b.first().ok_or(ChannelError::Malformed)? as usize;
        if b.len() < 1 + len {
            return Err(ChannelError::Malformed);
        }
        Ok((1, 1 + len))
    };
    let (a, b) = split(payload)?;
    let dialer = name(&payload[a..b])?;
    let rest = &payload[b..];
    let (c, d) = split(rest)?;
    let wanted = name(&rest[c..d])?;
    if wanted != me {
        return Err(ChannelError::Peer(format!(
            "{dialer} meant to reach {wanted}, this is {me}"
        )));
    }
    if dialer == me {
        return Err(ChannelError::Peer(format!(
            "a peer claims this node's name {me}"
        )));
    }
    let n = hs.write_message(me.as_bytes(), &mut buf).map_err(hs_err)?;
    io.send(Bytes::copy_from_slice(&buf[..n])).await?;
    let noise = hs.into_transport_mode().map_err(hs_err)?;
    let mut ch = Channel::new(io, noise);
    // The confirmation is still read under the handshake's frame limit.
    ch.io.codec_mut().set_max_frame_length(HANDSHAKE_FRAME);
    match ch.recv().await {
        Ok(Some(c)) if c == CONFIRM => {}
        Ok(_) | Err(ChannelError::Malformed) => {
            return Err(ChannelError::Handshake("no confirmation".into()))
        }
        Err(ChannelError::Decrypt) => {
            return Err(ChannelError::Handshake(
                "confirmation failed to decrypt (a replayed handshake?)".into(),
            ))
        }
        Err(e) => return Err(e),
    }
    ch.io.codec_mut().set_max_frame_length(NOISE_MSG);
    Ok(Accepted {
        channel: ch,
        peer: dialer,
        key,
    })
}

/// An open, encrypted channel: whole frames in, whole frames out.
pub struct Channel<S> {
    io: Framed<S, LengthDelimitedCodec>,
    noise: snow::TransportState,
    /// Plaintext stream written but not sealed yet (less than one message).
    sealing: Vec<u8>,
    /// Plaintext stream received but not returned yet.
    stream: BytesMut,
    /// Scratch for one decrypted message.
    opened: Vec<u8>,
}

impl<S> std::fmt::Debug for Channel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel(..)")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    fn new(mut io: Framed<S, LengthDelimitedCodec>, noise: snow::TransportState) -> Self {
        io.codec_mut().set_max_frame_length(NOISE_MSG);
        Channel {
            io,
            noise,
            sealing: Vec::with_capacity(CHUNK),
            stream: BytesMut::new(),
            opened: vec![0u8; NOISE_MSG],
        }
    }

    /// Seals the pending plaintext as one transport message and queues it.
    async fn seal(&mut self) -> Result<(), ChannelError> {
        if self.sealing.is_empty() {
            return Ok(());
        }
        let mut out = vec![0u8; self.sealing.len() + TAG];
        let n = self
            .noise
            .write_message(&self.sealing, &mut out)
            .map_err(|_| ChannelError::Malformed)?;
        out.truncate(n);
        self.sealing.clear();
        self.io.feed(Bytes::from(out)).await?;
        Ok(())
    }

    /// Appends to the plaintext stream, sealing every full message.
    async fn append(&mut self, mut data: &[u8]) -> Result<(), ChannelError> {
        while !data.is_empty() {
            let take = (CHUNK - self.sealing.len()).min(data.len());
            self.sealing.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.sealing.len() == CHUNK {
                self.seal().await?;
            }
        }
        Ok(())
    }

    /// Queues `frame`; it is sealed once a message is full or at the next [`Channel::flush`].
    pub async fn feed(&mut self, frame: &[u8]) -> Result<(), ChannelError> {
        if frame.len() > MAX_FRAME {
            return Err(ChannelError::TooLarge);
        }
        self.append(&(frame.len() as u32).to_be_bytes()).await?;
        self.append(frame).await
    }

    /// Seals what is pending and writes everything out.
    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        self.seal().await?;
        SinkExt::<Bytes>::flush(&mut self.io).await?;
        Ok(())
    }

    /// Seals and sends one frame.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), ChannelError> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// A whole frame at the front of the received stream, if there is one.
    fn next_frame(&mut self) -> Result<Option<Bytes>, ChannelError> {
        if self.stream.len() < LEN {
            return Ok(None);
        }
        let mut len = [0u8; LEN];
        len.copy_from_slice(&self.stream[..LEN]);
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(ChannelError::TooLarge);
        }
        if self.stream.len() < LEN + len {
            self.stream.reserve(LEN + len - self.stream.len());
            return Ok(None);
        }
        self.stream.advance(LEN);
        Ok(Some(self.stream.split_to(len).freeze()))
    }

    /// The next whole frame; `Ok(None)` when the peer closed the connection. Cancel-safe: what
    /// was received of a frame is kept for the next call.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, ChannelError> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(Some(f));
            }
            let Some(msg) = self.io.next().await else {
                return Ok(None);
            };
            let msg = msg?;
            let n = self
                .noise
                .read_message(&msg, &mut self.opened)
                .map_err(|_| ChannelError::Decrypt)?;
            self.stream.extend_from_slice(&self.opened[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn secret() -> Secret {
        Secret::from_bytes(b"test-cluster-secret-0123456789")
    }

    /// Accepts with a ring of [`secret`] alone.
    async fn accept1<S: AsyncRead + AsyncWrite + Unpin>(
        s: S,
        me: &str,
    ) -> Result<(Channel<S>, String), ChannelError> {
        accept(s, &[secret()], me)
            .await
            .map(|a| (a.channel, a.peer))
    }

    /// Runs one handshake over an in-memory pipe: the dialer with `dialer_key`, the acceptor
    /// with `ring`; the acceptor's result (peer and key index) and whether the dialer opened.
    async fn handshake_over_pipe(
        dialer_key: Secret,
        ring: Vec<Secret>,
    ) -> (Result<(String, usize), ChannelError>, bool) {
        let (a, b) = tokio::io::duplex(4096);
        let acceptor = tokio::spawn(async move {
            match accept(a, &ring, "n1").await {
                Ok(mut acc) => {
                    let _ = acc.channel.send(b"hi").await;
                    Ok((acc.peer, acc.key))
                }
                Err(e) => Err(e),
            }
        });
        let dialed = match dial(b, &dialer_key, "n2", "n1").await {
            Ok(mut ch) => ch.recv().await.is_ok(),
            Err(_) => false,
        };
        (acceptor.await.expect("acceptor task"), dialed)
    }

    fn key(i: u8) -> Secret {
        Secret::from_bytes(&[b'a' + i; 24])
    }

    #[tokio::test]
    async fn an_acceptor_takes_any_key_of_its_ring_and_says_which() {
        let ring = vec![key(0), key(1), key(2)];
        for (i, k) in ring.iter().enumerate() {
            let (acc, dialed) = handshake_over_pipe(k.clone(), ring.clone()).await;
            let (peer, used) = acc.expect("accepted");
            assert_eq!((peer.as_str(), used), ("n2", i));
            assert!(dialed, "dialer with key {i} did not open");
        }
    }

    #[tokio::test]
    async fn an_acceptor_refuses_a_key_outside_its_ring_and_the_dialer_sees_no_answer() {
        let (acc, dialed) = handshake_over_pipe(key(3), vec![key(0), key(1)]).await;
        assert!(matches!(acc, Err(ChannelError::Handshake(_))), "{acc:?}");
        assert!(!dialed);
        let (a, b) = tokio::io::duplex(4096);
        let acceptor = tokio::spawn(async move {
            // Dropping the pipe is what a refusing acceptor does.
            accept(a, &[key(0)], "n1").await.map(|_| ())
        });
        let d = dial(b, &key(3), "n2", "n1").await;
        assert!(matches!(d, Err(ChannelError::Unanswered)), "{d:?}");
        assert!(acceptor.await.expect("task").is_err());
    }

    #[tokio::test]
    async fn an_acceptor_tries_at_most_max_keys() {
        let ring: Vec<Secret> = (0..=MAX_KEYS as u8).map(key).collect();
        let last = ring[MAX_KEYS].clone();
        let (acc, _) = handshake_over_pipe(last, ring.clone()).await;
        assert!(acc.is_err(), "a key past the bound was tried: {acc:?}");
        let within = ring[MAX_KEYS - 1].clone();
        let (acc, _) = handshake_over_pipe(within, ring).await;
        assert_eq!(acc.expect("accepted").1, MAX_KEYS - 1);
    }

    /// A TCP relay in front of `upstream`: forwards one connection both ways and records the
    /// bytes each side sent (dialer to acceptor, acceptor to dialer).
    async fn relay(upstream: std::net::SocketAddr) -> (std::net::SocketAddr, Recorded, Recorded) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = l.local_addr().expect("relay addr");
        let sent = Recorded::default();
        let answered = Recorded::default();
        let rec = sent.clone();
        let rec2 = answered.clone();
        tokio::spawn(async move {
            let Ok((down, _)) = l.accept().await else {
                return;
            };
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let (mut dr, mut dw) = down.into_split();
            let (mut ur, mut uw) = up.into_split();
            let a = async move {
                let mut b = vec![0u8; 65536];
                while let Ok(n) = dr.read(&mut b).await {
                    if n == 0 || uw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                    rec.lock().extend_from_slice(&b[..n]);
                }
                let _ = uw.shutdown().await;
            };
            let b = async move {
                let mut b = vec![0u8; 65536];
                while let Ok(n) = ur.read(&mut b).await {
                    if n == 0 || dw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                    rec2.lock().extend_from_slice(&b[..n]);
                }
                let _ = dw.shutdown().await;
            };
            tokio::join!(a, b);
        });
        (addr, sent, answered)
    }

    type Recorded = Arc<Mutex<Vec<u8>>>;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn frames_cross_a_real_socket_without_plaintext_on_the_wire() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = l.local_addr().expect("addr");
        let (via, sent, answered) = relay(target).await;
        let acceptor = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (mut ch, peer) = accept1(s, "node-alpha-0001").await.expect("handshake");
            let small = ch.recv().await.expect("recv").expect("frame");
            let big = ch.recv().await.expect("recv").expect("frame");
            (peer, small, big)
        });
        let s = TcpStream::connect(via).await.expect("connect");
        let mut ch = dial(s, &secret(), "node-beta-00002", "node-alpha-0001")
            .await
            .expect("dial");
        let topic = b"secret/topic/plain-text-marker";
        let payload = b"payload-that-must-not-leak-0123";
        let mut small = topic.to_vec();
        small.extend_from_slice(payload);
        ch.send(&small).await.expect("send");
        // A frame several Noise messages long is split and reassembled.
        let big: Vec<u8> = payload
            .iter()
            .cycle()
            .take(3 * NOISE_MSG + 17)
            .copied()
            .collect();
        ch.send(&big).await.expect("send big");
        let (peer, got_small, got_big) = acceptor.await.expect("acceptor");
        assert_eq!(peer, "node-beta-00002");
        assert_eq!(got_small, small);
        assert_eq!(got_big, big);
        let mut wire = sent.lock().clone();
        wire.extend_from_slice(&answered.lock());
        assert!(wire.len() > big.len(), "relay saw {} bytes", wire.len());
        for needle in [
            &topic[..],
            &payload[..],
            b"node-alpha-0001",
            b"node-beta-00002",
            &b"secret/"[..],
        ] {
            assert!(
                !contains(&wire, needle),
                "{:?} on the wire",
                String::from_utf8_lossy(needle)
            );
        }
    }

    #[tokio::test]
    async fn replayed_bytes_on_a_new_connection_deliver_nothing() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = l.local_addr().expect("addr");
        let (via, sent, _) = relay(target).await;
        let first = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (mut ch, _) = accept1(s, "n1").await.expect("handshake");
            let f = ch.recv().await.expect("recv");
            (l, f)
        });
        let s = TcpStream::connect(via).await.expect("connect");
        let mut ch = dial(s, &secret(), "n2", "n1").await.expect("dial");
        ch.send(b"forwarded message").await.expect("send");
        let (l, f) = first.await.expect("first");
        assert_eq!(f.as_deref(), Some(&b"forwarded message"[..]));
        drop(ch);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Everything the dialer sent (handshake, confirmation, frame), replayed as-is.
        let captured = sent.lock().clone();
        let replay = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            match accept1(s, "n1").await {
                Ok((mut ch, _)) => ch.recv().await.map(|f| f.is_some()),
                Err(e) => Err(e),
            }
        });
        let mut s = TcpStream::connect(target).await.expect("connect");
        let _ = s.write_all(&captured).await;
        let r = replay.await.expect("replay task");
        assert!(
            matches!(
                r,
                Err(ChannelError::Handshake(_)) | Err(ChannelError::Decrypt)
            ),
            "a replay was accepted: {r:?}"
        );
    }

    #[tokio::test]
    async fn a_tampered_byte_after_the_handshake_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = l.local_addr().expect("addr");
        let acceptor = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (mut ch, _) = accept1(s, "n1").await.expect("handshake");
            ch.recv().await
        });
        let s = TcpStream::connect(target).await.expect("connect");
        let mut ch = dial(s, &secret(), "n2", "n1").await.expect("dial");
        // Seal a frame, flip one ciphertext byte, write it raw.
        let mut out = vec![0u8; 64];
        let n = ch
            .noise
            .write_message(&[0, 0, 0, 1, 7], &mut out)
            .expect("seal");
        out[n - 1] ^= 0x40;
        let mut raw = (n as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(&out[..n]);
        ch.io.get_mut().write_all(&raw).await.expect("write");
        let r = acceptor.await.expect("acceptor");
        assert!(matches!(r, Err(ChannelError::Decrypt)), "{r:?}");
    }

    #[tokio::test]
    async fn wrong_secret_or_wrong_node_fails_the_handshake() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = l.local_addr().expect("addr");
        let acceptor = tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..2 {
                let (s, _) = l.accept().await.expect("accept");
                out.push(accept1(s, "n1").await.map(|(_, p)| p));
            }
            out
        });
        let wrong = Secret::from_bytes(b"another-cluster-secret-9876543210");
        let s = TcpStream::connect(target).await.expect("connect");
        let d1 = dial(s, &wrong, "n2", "n1").await;
        let s = TcpStream::connect(target).await.expect("connect");
        let d2 = dial(s, &secret(), "n2", "n3").await;
        let got = acceptor.await.expect("acceptor");
        assert!(d1.is_err() && d2.is_err());
        assert!(
            matches!(got[0], Err(ChannelError::Handshake(_))),
            "{:?}",
            got[0]
        );
        assert!(matches!(got[1], Err(ChannelError::Peer(_))), "{:?}", got[1]);
    }
}
