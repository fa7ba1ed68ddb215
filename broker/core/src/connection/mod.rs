//! One task per client connection: read bytes, hand them to the protocol ([`protocol`]),
//! write what it answers and the session's queued messages — nothing hidden.
//!
//! This module is the connection's I/O: the CONNECT handshake and authentication, the serving
//! loop (keep alive, rate pauses, congestion, acks waiting for the store), parking an idle
//! connection and closing it. What a packet means is decided in [`protocol`], which does no
//! I/O and is tested packet by packet; when keep alive lets a client go and when an idle
//! connection parks is decided in `timers`, tested instant by instant. Protocol errors end
//! only this connection, with an MQTT 5 DISCONNECT reason code where the protocol has one.

pub mod protocol;
mod timers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::OptionFuture;

use crate::acl::{self, Action};
use crate::admission::Admission;
use crate::auth::{AuthDecision, ConnectCtx, Refusal};
use crate::broker::Broker;
use crate::codec::{self, Codec, ConnAckCode, Connect, Inbound, Outbound};
use crate::config::{OverRate, Permission};
use crate::hooks::{Event, EventKind};
use crate::park::{Parkable, PARK_AFTER, REPARK_AFTER};
use crate::session::{Kick, QueueBounds, Session};
use crate::trace::Dir;
use crate::transport::Transport;
use corvid_proto::reason::Reason;
use timers::{KeepAlive, OnTimer};

pub use protocol::V3_ACK_WINDOW;
use protocol::{Conn, End, WRITE_BATCH};

/// How long the last words to a closing client (refusing CONNACK, acks before a protocol
/// error, DISCONNECT) may take: a client that does not read them is not waited for.
const FLUSH_BEFORE_CLOSE: Duration = Duration::from_secs(2);

/// How an accepted connection's serving loop stopped.
enum Served {
    /// The connection ended.
    Ended(End),
    /// Nothing to do for a while ([`PARK_AFTER`], [`REPARK_AFTER`]): it may park, with this
    /// keep alive deadline.
    Idle(Option<tokio::time::Instant>),
}

/// Where a parked connection left off: what its new task starts from.
#[derive(Debug, Clone, Copy)]
struct Resumed {
    /// Its keep alive deadline (`None`: keep alive 0).
    keep_alive: Option<tokio::time::Instant>,
    /// How long it was parked.
    parked_for: Duration,
}

/// Serves one client connection from its first byte to its close.
///
/// The task lives as long as the connection, so its future is kept small: the handshake
/// (CONNECT, authentication, a cluster takeover) and the close run in boxed futures that
/// are freed when they finish, and only the serving loop's state stays for the idle life.
pub fn serve(
    broker: Arc<Broker>,
    transport: Transport,
    peer: SocketAddr,
    listener: &'static str,
    admission: Admission,
) -> impl std::future::Future<Output = ()> + Send {
    // Not an `async fn`: its arguments would stay in the future after `open` took them.
    let opening = Box::pin(open(broker, transport, peer, listener));
    async move {
        let Some(Opened {
            conn,
            transport,
            rbuf,
            wbuf,
        }) = opening.await
        else {
            return;
        };
        serving(conn, transport, rbuf, wbuf, None, admission).await;
    }
}

/// Serves an accepted (or resumed) connection until it ends or parks.
async fn serving(
    mut conn: Conn,
    mut transport: Transport,
    rbuf: BytesMut,
    wbuf: BytesMut,
    resumed: Option<Resumed>,
    admission: Admission,
) {
    match conn.run(&mut transport, rbuf, wbuf, resumed).await {
        Served::Ended(end) => Box::pin(conn.finish(end, Some(&mut transport))).await,
        Served::Idle(keep_alive) => conn.park(transport, keep_alive, admission),
    }
}

/// A parked connection: its protocol state and what counts it as admitted.
struct ParkedConn {
    conn: Conn,
    admission: Admission,
}

impl Parkable for ParkedConn {
    fn resume(
        self: Box<Self>,
        stream: std::net::TcpStream,
        keep_alive: Option<tokio::time::Instant>,
        parked_for: Duration,
        handle: &tokio::runtime::Handle,
    ) {
        let ParkedConn { conn, admission } = *self;
        handle.spawn(async move {
            // Woken by its socket, a timer or shutdown: the waker it left is stale.
            drop(conn.info.kick.unpark());
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => {
                    let t = Transport::Tcp(s);
                    let resumed = Some(Resumed {
                        keep_alive,
                        parked_for,
                    });
                    serving(
                        conn,
                        t,
                        BytesMut::new(),
                        BytesMut::new(),
                        resumed,
                        admission,
                    )
                    .await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not resume a parked connection");
                    Box::pin(conn.finish(End::Lost, None)).await
                }
            }
        });
    }
}

/// An accepted connection, CONNACK written into `wbuf`, ready to serve.
struct Opened {
    conn: Conn,
    transport: Transport,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Reads and handles CONNECT: `None` when the connection ended (refused, timed out, closed).
async fn open(
    broker: Arc<Broker>,
    mut transport: Transport,
    peer: SocketAddr,
    listener: &'static str,
) -> Option<Opened> {
    // Until CONNECT is handled, only a CONNECT-sized packet is buffered for an anonymous peer.
    let max_packet = broker.config.mqtt.max_packet_size;
    let mut codec = Codec::new(broker.config.mqtt.max_connect_size.min(max_packet));
    let mut rbuf = BytesMut::new();
    let mut wbuf = BytesMut::new();
    let timeout = Duration::from_secs(broker.config.mqtt.connect_timeout.max(1));
    let first =
        tokio::time::timeout(timeout, read_packet(&mut transport, &mut codec, &mut rbuf)).await;
    let connect = match first {
        Ok(Ok(Some(Inbound::Connect(c)))) => {
            codec.set_max_inbound(max_packet);
            c
        }
        Ok(Ok(Some(other))) => {
            tracing::debug!(%peer, packet = ?other, "first packet is not CONNECT");
            broker
                .metrics
                .protocol_errors
                .with_label_values(&["first_packet_not_connect"])
                .inc();
            close_with(&mut transport, &[]).await;
            return None;
        }
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e.message, "bad CONNECT");
            broker
                .metrics
                .protocol_errors
                .with_label_values(&["malformed_connect"])
                .inc();
            let code = if e.unsupported_version {
                Some(ConnAckCode::UnsupportedVersion)
            } else if e.client_id_rejected {
                Some(ConnAckCode::ClientIdNotValid)
            } else {
                None
            };
            if let Some(code) = code {
                let _ = codec.encode(Outbound::refused(code), &mut wbuf);
            }
            close_with(&mut transport, &wbuf).await;
            return None;
        }
        Err(_) => {
            broker
                .metrics
                .connections_refused
                .with_label_values(&["connect_timeout"])
                .inc();
            return None;
        }
    };
    // Authenticate before anything else touches a session (here or, clustered, on another
    // node): a refused client gets its CONNACK code and nothing more.
    let extra_acl = match authenticate(&broker, &connect, peer).await {
        Ok(rules) => rules,
        Err((code, why)) => {
            tracing::debug!(%peer, client_id = %connect.client_id, reason = why, "authentication failed");
            broker
                .metrics
                .connections_refused
                .with_label_values(&[why])
                .inc();
            let _ = codec.encode(Outbound::refused(code), &mut wbuf);
            close_with(&mut transport, &wbuf).await;
            return None;
        }
    };
    // In a cluster the client id is unique cluster-wide: take the session from whichever node
    // holds it before answering CONNECT.
    let owner = connect.username.as_deref();
    if broker
        .prepare_session(&connect.client_id, connect.clean_start, owner)
        .await
        .is_err()
    {
        tracing::debug!(%peer, client_id = %connect.client_id, "session owned by another identity; refused");
        broker
            .metrics
            .connections_refused
            .with_label_values(&["session_owner"])
            .inc();
        let _ = codec.encode(Outbound::refused(ConnAckCode::NotAuthorized), &mut wbuf);
        let _ = transport.write_all(&wbuf).await;
        transport.close().await;
        return None;
    }
    match Conn::accept(
        broker, codec, peer, listener, *connect, extra_acl, &mut wbuf,
    ) {
        Ok(conn) => Some(Opened {
            conn,
            transport,
            rbuf,
            wbuf,
        }),
        Err(()) => {
            close_with(&mut transport, &wbuf).await;
            None
        }
    }
}

/// Runs the authentication chain for a CONNECT (skipped when it admits everyone). On success
/// returns the extra ACL rules for this connection; on refusal the CONNACK code and the
/// `connections_refused` reason.
async fn authenticate(
    broker: &Broker,
    c: &Connect,
    peer: SocketAddr,
) -> Result<Vec<acl::Rule>, (ConnAckCode, &'static str)> {
    if broker.auth.is_open() {
        return Ok(Vec::new());
    }
    if broker.auth_failures.blocked(peer.ip(), Instant::now()) {
        return Err((ConnAckCode::BadCredentials, "auth_rate_limited"));
    }
    let ctx = ConnectCtx {
        client_id: &c.client_id,
        username: c.username.as_deref(),
        password: c.password.as_deref(),
        peer,
        protocol: c.protocol.label(),
    };
    match broker.auth.authenticate(&ctx).await {
        AuthDecision::Allow { acl, .. } => Ok(acl),
        AuthDecision::Deny(r) => Err({
            if matches!(r, Refusal::BadCredentials | Refusal::NotAuthorized) {
                broker.auth_failures.failed(peer.ip(), Instant::now());
            }
            match r {
                Refusal::BadCredentials => (ConnAckCode::BadCredentials, "bad_credentials"),
                Refusal::NotAuthorized => (ConnAckCode::NotAuthorized, "not_authorized"),
                Refusal::ClientIdNotAllowed => {
                    (ConnAckCode::ClientIdNotValid, "client_id_not_allowed")
                }
                Refusal::BackendUnavailable => {
                    (ConnAckCode::NotAuthorized, "auth_backend_unavailable")
                }
            }
        }),
    }
}

/// Writes `last` (a refusing CONNACK) and closes, within [`FLUSH_BEFORE_CLOSE`] in all: a
/// client that does not read is not waited for.
async fn close_with(t: &mut Transport, last: &[u8]) {
    let _ = tokio::time::timeout(FLUSH_BEFORE_CLOSE, async {
        if !last.is_empty() {
            let _ = t.write_all(last).await;
        }
        t.close().await;
    })
    .await;
}

/// Writes what is buffered (acknowledgements of packets handled before an error go out
/// first [MQTT-4.3.2-4, 4.3.3-8]), then hands back why the connection ends.
async fn flush_then(t: &mut Transport, wbuf: &BytesMut, end: End) -> End {
    if !wbuf.is_empty() {
        let _ = tokio::time::timeout(FLUSH_BEFORE_CLOSE, t.write_all(wbuf)).await;
    }
    end
}

/// Waits until none of `held` holds its publisher back any more: each drained to its
/// low-water mark, went offline, or stayed congested past the drain timeout. Cancel-safe.
async fn wait_drained(held: &mut Vec<Arc<Session>>, bounds: &QueueBounds) {
    /// A wake-up that is lost (another session drained, a session went offline) costs at
    /// most this much.
    const RECHECK: Duration = Duration::from_millis(50);
    loop {
        let mut until: Option<Instant> = None;
        held.retain(|s| match s.holds_back(bounds) {
            Some(t) => {
                until = Some(until.map_or(t, |u| u.min(t)));
                true
            }
            None => false,
        });
        let (Some(first), Some(until)) = (held.first().cloned(), until) else {
            return;
        };
        let notified = crate::session::DRAINED.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if first.holds_back(bounds).is_none() {
            continue;
        }
        let wake = until.min(Instant::now() + RECHECK);
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Reads until one whole packet is decoded; `Ok(None)` if the peer closed first.
async fn read_packet(
    t: &mut Transport,
    codec: &mut Codec,
    buf: &mut BytesMut,
) -> Result<Option<Inbound>, codec::DecodeError> {
    loop {
        if let Some(p) = codec.decode(buf)? {
            return Ok(Some(p));
        }
        match t.read(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

impl Conn {
    /// Serves the connection until it ends, or until it has had nothing to do for
    /// [`PARK_AFTER`] and may park (plain TCP only). A connection `resumed` after a long park
    /// parks again as soon as it is idle ([`REPARK_AFTER`]): what woke it was most likely one
    /// packet (a ping, a reading) or one message, and a fleet that pings in step would
    /// otherwise hold a task per device for the whole grace.
    async fn run(
        &mut self,
        t: &mut Transport,
        mut rbuf: BytesMut,
        mut wbuf: BytesMut,
        resumed: Option<Resumed>,
    ) -> Served {
        let shutdown = self.broker.shutdown.clone();
        let session = self.session.clone();
        let kick = self.info.kick.clone();
        let start = tokio::time::Instant::now();
        // Moving the keep alive deadline later does not touch the timer: `sleep` fires at or
        // before it and is re-armed then.
        let mut ka = match resumed {
            Some(r) => KeepAlive::resumed(self.keep_alive, r.keep_alive),
            None => KeepAlive::new(self.keep_alive, start),
        };
        // Only plain TCP connections park (the others' streams keep state a socket does not).
        let parks = matches!(t, Transport::Tcp(_)) && self.broker.parker().is_some();
        let grace = match resumed {
            Some(r) if r.parked_for >= PARK_AFTER => REPARK_AFTER,
            _ => PARK_AFTER,
        };
        let park = parks.then_some(grace);
        // When the serving loop last had something to do.
        let mut active_at = start;
        let sleep = tokio::time::sleep_until(timers::next_timer(
            ka.deadline(),
            park.map(|g| start + g),
            start,
        ));
        tokio::pin!(sleep);
        // While over its rate the client is not read from until this instant.
        let mut paused: Option<tokio::time::Instant> = None;
        // While not empty the client is not read from: sessions its PUBLISHes went into that
        // are above their high-water mark (each holds it back at most the drain timeout).
        let mut held: Vec<Arc<Session>> = Vec::new();
        // Read through the broker, not copied into this long-lived future.
        let broker = self.broker.clone();
        let packet_timeout = broker.packet_timeout();
        // When the last bytes arrived: a packet left partly received stalls from there.
        let mut last_bytes = tokio::time::Instant::now();
        loop {
            let more = match self.drain(&mut wbuf) {
                Ok(more) => more,
                Err(end) => return Served::Ended(end),
            };
            self.release_acks(&broker.queue_bounds, &mut wbuf);
            if !wbuf.is_empty() {
                let n = wbuf.len();
                // A client that stops reading must not hold up a kick or shutdown, and is let
                // go after the write deadline (which also bounds how long keep alive, checked
                // between writes, can be kept waiting).
                tokio::select! {
                    biased;
                    k = kick.recv() => return Served::Ended(self.torn(End::Kicked(k))),
                    _ = shutdown.cancelled() => return Served::Ended(self.torn(End::Kicked(Kick::ShuttingDown))),
                    r = tokio::time::timeout(broker.write_timeout(), t.write_all(&wbuf)) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Served::Ended(End::Lost),
                        Err(_) => return Served::Ended(self.torn(End::WriteTimeout)),
                    },
                }
                self.broker.metrics.bytes_sent.inc_by(n as u64);
                wbuf.clear();
                if !more || wbuf.capacity() > 4 * WRITE_BATCH {
                    // Idle connections hold no write buffer either.
                    wbuf = BytesMut::new();
                }
            }
            if more {
                session.notify.notify_one();
            }
            if self.hold_for_congestion(&mut held) {
                // Not reading is the broker's doing: keep alive waits too.
                ka.not_reading_until(
                    tokio::time::Instant::now() + broker.queue_bounds.congestion_timeout,
                );
            }
            if rbuf.is_empty() && rbuf.capacity() > 0 && !more && paused.is_none() {
                // Idle connections hold no read buffer.
                rbuf = BytesMut::new();
            }
            // At most an ack window of acknowledgements wait for the store (`ack_window`); past
            // that the client is not read from until the store catches up (an MQTT 5 client that
            // respects the receive maximum never gets there). Acks held only for this client's
            // own congested session never stop reading: its PUBACKs for deliveries are what
            // drain that session.
            // Both decisions come from one look at the store, so a mark that becomes durable in
            // between cannot leave reading stopped with nothing to wake the loop.
            let (awaited, ack_wait) = self.ack_wait(&broker.queue_bounds);
            let acks_room = !awaited || self.held_acks.len() < self.ack_window();
            // A packet partly received while the broker is reading must keep coming.
            let stalled_at = packet_timeout
                .filter(|_| {
                    self.codec.mid_packet(&rbuf) && paused.is_none() && held.is_empty() && acks_room
                })
                .map(|t| last_bytes + t);
            tokio::select! {
                biased;
                k = kick.recv() => return Served::Ended(End::Kicked(k)),
                _ = shutdown.cancelled() => return Served::Ended(End::Kicked(Kick::ShuttingDown)),
                r = t.read(&mut rbuf), if paused.is_none() && held.is_empty() && acks_room => {
                    match r {
                        Ok(0) | Err(_) => return Served::Ended(End::Lost),
                        Ok(n) => {
                            last_bytes = tokio::time::Instant::now();
                            self.broker.metrics.bytes_received.inc_by(n as u64);
                            let mut wait = None;
                            if let Some(b) = self.limits.as_mut().and_then(|l| l.bytes.as_mut()) {
                                wait = b.take(n as u64, Instant::now());
                                if wait.is_some() {
                                    self.broker.metrics.throttled_bytes.inc();
                                }
                            }
                            if wait.is_some()
                                && self.broker.config.limits.over_rate == OverRate::Disconnect
                            {
                                return Served::Ended(End::RateLimited);
                            }
                            let decoded = self.codec.decoded();
                            match self.process(&mut rbuf, &mut wbuf) {
                                Ok(w) => wait = wait.max(w),
                                Err(end) => return Served::Ended(flush_then(t, &wbuf, end).await),
                            }
                            // Keep alive counts whole control packets [MQTT-3.1.2-24], not
                            // bytes: a client trickling one packet byte by byte is let go
                            // after one and a half keep alive periods all the same.
                            if self.codec.decoded() != decoded {
                                ka.packet(tokio::time::Instant::now());
                            }
                            paused = wait.map(|w| tokio::time::Instant::now() + w);
                            if let Some(until) = paused {
                                // Not reading is the broker's doing: keep alive waits too.
                                ka.not_reading_until(until);
                            }
                        }
                    }
                }
                // The rarely armed branches are boxed only while armed, so an idle connection's
                // future does not carry their state (see `serve`).
                _ = OptionFuture::from(paused.map(|p| Box::pin(tokio::time::sleep_until(p)))), if paused.is_some() => {
                    // Back under the rate: finish what is buffered, then read again.
                    ka.not_reading_until(tokio::time::Instant::now());
                    match self.process(&mut rbuf, &mut wbuf) {
                        Ok(w) => {
                            paused = w.map(|w| tokio::time::Instant::now() + w);
                            if let Some(until) = paused {
                                ka.not_reading_until(until);
                            }
                        }
                        Err(end) => return Served::Ended(flush_then(t, &wbuf, end).await),
                    }
                }
                _ = OptionFuture::from((!held.is_empty()).then(|| Box::pin(wait_drained(&mut held, &broker.queue_bounds)))), if !held.is_empty() => {
                    // The sessions drained (or stopped counting as draining): finish what is
                    // buffered, then read again — unless a rate pause is still running.
                    ka.not_reading_until(tokio::time::Instant::now());
                    if paused.is_none() {
                        match self.process(&mut rbuf, &mut wbuf) {
                            Ok(w) => paused = w.map(|w| tokio::time::Instant::now() + w),
                            Err(end) => return Served::Ended(flush_then(t, &wbuf, end).await),
                        }
                    }
                }
                _ = session.notify.notified() => {}
                // Acknowledgements waiting for the store: sent by the next turn's
                // `release_acks` once durable; a failed store sends none of them.
                r = OptionFuture::from(ack_wait.and_then(|m| Some(Box::pin(broker.durable.as_ref()?.store().wait_durable(m))))), if ack_wait.is_some() => {
                    if let Some(Err(_)) = r {
                        return Served::Ended(End::Protocol(
                            Reason::UnspecifiedError,
                            "the durable store failed; unacknowledged messages were not kept".into(),
                        ));
                    }
                }
                _ = &mut sleep => {
                    // Not mid-packet: the codec may hold a fixed header it took off `rbuf`.
                    let idle = !self.codec.mid_packet(&rbuf)
                        && wbuf.is_empty()
                        && paused.is_none()
                        && held.is_empty()
                        && self.held_acks.is_empty()
                        && ack_wait.is_none();
                    let now = tokio::time::Instant::now();
                    match timers::on_timer(&ka, park, idle, active_at.max(last_bytes), now) {
                        OnTimer::LetGo => return Served::Ended(End::KeepAlive),
                        OnTimer::Park => return Served::Idle(ka.deadline()),
                        // Not idle yet (acks held, a pause): look again in a while.
                        OnTimer::SleepUntil(at) => sleep.as_mut().reset(at),
                    }
                    // The timer is not activity.
                    continue;
                }
                _ = OptionFuture::from(stalled_at.map(|d| Box::pin(tokio::time::sleep_until(d)))), if stalled_at.is_some() => {
                    return Served::Ended(End::Protocol(
                        Reason::ProtocolError,
                        "a packet stalled midway (mqtt.packet_timeout)".into(),
                    ));
                }
            }
            active_at = tokio::time::Instant::now();
        }
    }

    /// Parks this idle connection (see [`crate::park`]): its task ends, its state waits
    /// without one until its socket, session, a kick, its keep alive or shutdown needs it.
    fn park(
        mut self,
        t: Transport,
        keep_alive: Option<tokio::time::Instant>,
        admission: Admission,
    ) {
        let Transport::Tcp(stream) = t else {
            unreachable!("only plain TCP connections park (Conn::run)");
        };
        // Parks with nothing it does not need (`run` parks only with no acks held).
        self.held_acks.shrink(0);
        let Some(parker) = self.broker.parker().cloned() else {
            unreachable!("the serving loop parks only with a parker (Conn::run)");
        };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                // Tokio dropped the socket with the error: the connection is lost.
                tracing::warn!(error = %e, "could not park a connection");
                tokio::spawn(async move { Box::pin(self.finish(End::Lost, None)).await });
                return;
            }
        };
        let session = self.session.clone();
        let kick = self.info.kick.clone();
        let generation = self.generation;
        let (waker, ticket) = parker.park(
            stream,
            keep_alive,
            Box::new(ParkedConn {
                conn: self,
                admission,
            }),
        );
        // What arrived since the serving loop last looked would have found no waker: only
        // an empty queue of a session still ours may wait, and the waker goes in under the
        // session's lock, where the next message looks for it.
        let stays = {
            let st = session.state.lock();
            st.generation == generation && !st.ended && st.queue.is_empty() && kick.park(waker)
        };
        if stays {
            parker.arm(ticket);
        } else {
            parker.unpark(ticket);
        }
    }

    /// Closes the connection: DISCONNECT with a reason for MQTT 5 where one applies, the will
    /// unless the client said goodbye, and the session handed back to the broker.
    async fn finish(mut self, end: End, mut t: Option<&mut Transport>) {
        let (reason, server_ref, publish_will) = match &end {
            End::ClientDisconnect { will } => (None, None, *will),
            End::Lost => (None, None, true),
            End::KeepAlive => (Some(Reason::KeepAliveTimeout), None, true),
            End::Protocol(code, why) => {
                let byte = code.code();
                tracing::debug!(peer = %self.info.peer, client_id = %self.session.client_id, code = byte, reason = %why, "protocol error");
                self.broker
                    .metrics
                    .protocol_errors
                    .with_label_values(&[&format!("0x{byte:02X}")])
                    .inc();
                (Some(*code), None, true)
            }
            End::Kicked(Kick::TakenOver) => (Some(Reason::SessionTakenOver), None, true),
            End::Kicked(Kick::Administrative) => (Some(Reason::AdministrativeAction), None, true),
            End::Kicked(Kick::ShuttingDown) => (Some(Reason::ServerShuttingDown), None, true),
            End::Kicked(Kick::UseAnotherServer(r)) => {
                (Some(Reason::UseAnotherServer), r.clone(), true)
            }
            End::RateLimited => {
                self.broker.metrics.rate_disconnects.inc();
                (Some(Reason::MessageRateTooHigh), None, true)
            }
            End::WriteTimeout => {
                self.broker.metrics.write_timeouts.inc();
                tracing::info!(peer = %self.info.peer, client_id = %self.session.client_id, "client stopped reading; disconnected after the write timeout");
                (None, None, true)
            }
        };
        if self.broker.tracer.is_traced(&self.session.client_id, None) {
            let line = format!("CLOSE reason={}", end.label());
            self.broker
                .tracer
                .record(&self.session.client_id, None, Dir::Out, &line);
        }
        if let (Some(code), true, false) = (reason, self.protocol.is_v5(), self.write_torn) {
            let mut buf = BytesMut::new();
            if self
                .codec
                .encode(
                    Outbound::Disconnect {
                        reason: code.code(),
                        server_reference: server_ref,
                    },
                    &mut buf,
                )
                .is_ok()
            {
                if let Some(t) = t.as_mut() {
                    let _ = tokio::time::timeout(FLUSH_BEFORE_CLOSE, t.write_all(&buf)).await;
                }
            }
        }
        self.broker.metrics.connections.dec();
        let will = self.will.take().filter(|w| {
            if crate::sys::is_sys(&w.topic) {
                self.broker.metrics.dropped("sys_topic");
                return false;
            }
            let ok = self.info.acl.check(Action::Publish, &w.topic) == Permission::Allow;
            if !ok {
                self.broker.metrics.acl.publish_deny.inc();
                self.broker.metrics.dropped("acl_denied");
            }
            ok
        });
        if let (true, Some(will)) = (publish_will, will) {
            self.broker.schedule_will(
                *will,
                self.session.client_id.clone(),
                self.session.clone(),
                self.generation,
            );
        }
        self.broker.close_session(&self.session, self.generation);
        if self.broker.hooks.wants(EventKind::ClientDisconnected) {
            self.broker.hooks.emit(Event::ClientDisconnected {
                client_id: self.session.client_id.to_string(),
                username: self.info.username.clone(),
                peer: self.info.peer.to_string(),
                reason: end.label(),
                connected_at_us: self.connected_at_us,
            });
        }
        crate::sys::client_disconnected(
            &self.broker,
            &self.session.client_id,
            &self.info,
            end.label(),
        );
        tracing::debug!(peer = %self.info.peer, client_id = %self.session.client_id, end = ?end, "client disconnected");
        // Last, after the session is handed back: half-close and discard what the client is
        // still sending, so the kernel sends FIN rather than RST and the client reads the
        // DISCONNECT above.
        let linger = u64::from(self.broker.config.mqtt.max_packet_size).saturating_mul(2);
        if let Some(t) = t {
            tokio::time::timeout(Duration::from_secs(2), t.linger_close(linger))
                .await
                .ok();
        }
    }
}

#[cfg(test)]
mod tests {
    /// The connection task lives as long as the connection is busy (an idle one parks
    /// without it): its future must not grow back. Handshake, close and rarely armed waits
    /// are boxed so that only the serving loop's state is inline; a large state added to it
    /// fails here before it shows in `bench/compare.sh`'s rows. Measured in the test (debug)
    /// build; the release layout is smaller.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let broker = crate::broker::Broker::new(crate::config::Config::default()).expect("broker");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let transport = crate::transport::Transport::Tcp(stream);
        let fut = super::serve(broker, transport, addr, "mqtt", Default::default());
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 2176, "the connection future is {size} bytes");
        assert!(
            std::mem::size_of::<super::Conn>() <= 512,
            "Conn is {} bytes",
            std::mem::size_of::<super::Conn>()
        );
    }

    /// What a parked (idle) connection keeps is its protocol state and its session: each a
    /// long-lived allocation per connected client, sized to stay in the allocator's size class
    /// they are in today (jemalloc: 192 and 320 bytes with the `Arc` counts). A field added to
    /// either shows here before it shows in `bench/compare.sh`'s idle row.
    #[test]
    fn what_an_idle_connection_keeps_stays_small() {
        let parked = std::mem::size_of::<super::ParkedConn>();
        assert!(parked <= 192, "a parked connection is {parked} bytes");
        let session = std::mem::size_of::<crate::session::Session>();
        assert!(session <= 304, "a session is {session} bytes");
    }
}
