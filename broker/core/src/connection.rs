//! One task per client connection: read packets, act on them, write the answers and the
//! session's queued messages — nothing hidden.
//!
//! The task owns the socket and the per-connection protocol state (topic aliases, keep alive);
//! everything that must outlive the connection lives in the [`Session`]. Protocol errors end
//! only this connection, with an MQTT 5 DISCONNECT reason code where the protocol has one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use futures_util::future::OptionFuture;

use crate::acl::{self, Action};
use crate::admission::Admission;
use crate::auth::{AuthDecision, ConnectCtx, Refusal};
use crate::broker::{max_qos, Broker};
use crate::codec::{
    self, Codec, ConnAckCode, ConnAckProps, Connect, Inbound, Outbound, Protocol, Publish, QoS,
    SubOptions, Will,
};
use crate::config::{OverRate, Permission};
use crate::hooks::{Event, EventKind};
use crate::limits::ConnLimits;
use crate::message::Message;
use crate::park::{Parkable, PARK_AFTER, REPARK_AFTER};
use crate::session::{
    unix_now, ConnInfo, Inflight, InflightState, Kick, KickSlot, QueueBounds, Session,
};
use crate::topic;
use crate::trace::{self, Dir};
use crate::transport::Transport;
use corvid_proto::reason::Reason;

/// Most acknowledgements an MQTT 3.1/3.1.1 client may have waiting for the store (see
/// `Conn::ack_window`): bounds what one connection puts into the store's queue and holds.
pub const V3_ACK_WINDOW: usize = 256;
/// Bytes buffered for writing before the queue drain pauses to flush.
const WRITE_BATCH: usize = 64 * 1024;

/// How long the last words to a closing client (refusing CONNACK, acks before a protocol
/// error, DISCONNECT) may take: a client that does not read them is not waited for.
const FLUSH_BEFORE_CLOSE: Duration = Duration::from_secs(2);

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// Client sent DISCONNECT; `will` says whether to publish the will (MQTT 5 reason 0x04).
    ClientDisconnect { will: bool },
    /// The socket closed or failed without DISCONNECT.
    Lost,
    /// Keep alive expired.
    KeepAlive,
    /// Protocol violation, with the MQTT 5 reason code to send.
    Protocol(Reason, String),
    /// Someone else closed it.
    Kicked(Kick),
    /// Over its message or byte rate with `over_rate: disconnect` (MQTT 5 reason 0x96).
    RateLimited,
    /// The client did not take our bytes within `mqtt.write_timeout`; a packet may be half
    /// written, so nothing more is sent.
    WriteTimeout,
}

impl End {
    /// The reason named in `client.disconnected` events and `$SYS`.
    fn label(&self) -> &'static str {
        match self {
            End::ClientDisconnect { .. } => "normal",
            End::Lost => "connection_lost",
            End::KeepAlive => "keepalive_timeout",
            End::Protocol(..) => "protocol_error",
            End::Kicked(Kick::TakenOver) => "taken_over",
            End::Kicked(Kick::Administrative) => "kicked",
            End::Kicked(Kick::ShuttingDown) => "server_shutdown",
            End::Kicked(Kick::UseAnotherServer(_)) => "use_another_server",
            End::RateLimited => "rate_limited",
            End::WriteTimeout => "write_timeout",
        }
    }
}

/// How an accepted connection's serving loop stopped.
enum Served {
    /// The connection ended.
    Ended(End),
    /// Nothing to do for a while ([`PARK_AFTER`], [`REPARK_AFTER`]): it may park, with this
    /// keep alive deadline.
    Idle(Option<tokio::time::Instant>),
}

/// The serving loop's next timer: the keep alive deadline or the next look at parking,
/// whichever comes first (a year away when neither applies).
fn next_timer(
    keep_alive: Option<tokio::time::Instant>,
    park_at: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    keep_alive.into_iter().chain(park_at).min().unwrap_or(far)
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

/// State of an accepted connection.
struct Conn {
    broker: Arc<Broker>,
    codec: Codec,
    protocol: Protocol,
    session: Arc<Session>,
    generation: u64,
    keep_alive: Duration,
    /// Boxed: most clients set no will, and this struct lives as long as the connection.
    will: Option<Box<Will>>,
    max_inflight: u16,
    /// Topic aliases in both directions, allocated on first use (most clients use none).
    aliases: Option<Box<Aliases>>,
    client_alias_max: u16,
    expiry_was_zero: bool,
    /// What `$SYS` and hooks report about this connection: its address, kick slot and ACL
    /// (shared with the session, which shows it to the admin API).
    info: Arc<ConnInfo>,
    /// Accept time in µs since the epoch: identifies this connection in stored events.
    connected_at_us: u64,
    /// Message and byte rate buckets; `None` when no rate is configured.
    limits: Option<Box<ConnLimits>>,
    /// Sessions this client's last PUBLISH was routed into while they were above their
    /// high-water mark: its socket is not read until they drain (bounded in time).
    congested: Vec<Arc<Session>>,
    /// A write was abandoned midway: nothing more may be written.
    write_torn: bool,
    /// PUBACK / PUBREC held back while this client's own session is congested.
    /// Each with the durable store's mark it waits for (0: none): PUBACK / PUBREC are sent
    /// in PUBLISH order once what their PUBLISH changed is on disk.
    held_acks: HeldAcks,
}

/// Acknowledgements held back, each with the store mark it waits for; the queue is allocated
/// on first use (most connections never hold one, and every connection carries the field:
/// boxed, the field is one word instead of four).
#[derive(Default)]
#[allow(clippy::box_collection)]
struct HeldAcks(Option<Box<std::collections::VecDeque<(u64, Outbound)>>>);

impl HeldAcks {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn front(&self) -> Option<&(u64, Outbound)> {
        self.0.as_ref()?.front()
    }

    fn push_back(&mut self, ack: (u64, Outbound)) {
        self.0.get_or_insert_default().push_back(ack);
    }

    fn pop_front(&mut self) -> Option<(u64, Outbound)> {
        self.0.as_mut()?.pop_front()
    }

    /// Gives the queue's memory back when it is empty and grew past `keep` entries (or
    /// always, with `keep` 0).
    fn shrink(&mut self, keep: usize) {
        if self
            .0
            .as_ref()
            .is_some_and(|q| q.is_empty() && q.capacity() >= keep)
        {
            self.0 = None;
        }
    }
}

/// A connection's topic alias tables [MQTT-3.3.2.3.4].
#[derive(Default)]
struct Aliases {
    /// Aliases the client set, to topics.
    inbound: HashMap<u16, ByteString>,
    /// Topics this side aliased, to their aliases.
    outbound: HashMap<ByteString, u16>,
}

impl Conn {
    /// Validates CONNECT, opens the session and writes CONNACK into `wbuf`. On refusal the
    /// refusing CONNACK is in `wbuf` and `Err` is returned.
    fn accept(
        broker: Arc<Broker>,
        mut codec: Codec,
        peer: SocketAddr,
        listener: &'static str,
        c: Connect,
        extra_acl: Vec<acl::Rule>,
        wbuf: &mut BytesMut,
    ) -> Result<Conn, ()> {
        let cfg = broker.config.clone();
        let protocol = c.protocol;
        let mut refuse = |codec: &mut Codec, code: ConnAckCode, why: &str| {
            tracing::debug!(%peer, client_id = %c.client_id, reason = why, "connection refused");
            broker
                .metrics
                .connections_refused
                .with_label_values(&[why])
                .inc();
            let _ = codec.encode(Outbound::refused(code), wbuf);
            Err(())
        };
        if !broker.accepting.load(Ordering::Relaxed) || broker.shutdown.is_cancelled() {
            return refuse(&mut codec, ConnAckCode::ServerUnavailable, "not_accepting");
        }
        if !protocol.is_v5() && c.password.is_some() && c.username.is_none() {
            // [MQTT-3.1.2-22]: 3.1.1 forbids a password without a user name.
            return refuse(
                &mut codec,
                ConnAckCode::ProtocolError,
                "password_without_username",
            );
        }
        if c.auth_method.is_some() {
            return refuse(&mut codec, ConnAckCode::BadAuthMethod, "auth_method");
        }
        if c.client_id.len() > cfg.mqtt.max_client_id_len || c.client_id.contains('\0') {
            return refuse(&mut codec, ConnAckCode::ClientIdNotValid, "client_id");
        }
        if protocol == Protocol::V31 && !(1..=23).contains(&c.client_id.chars().count()) {
            // MQTT 3.1: a client id is 1 to 23 characters; otherwise CONNACK 2.
            return refuse(&mut codec, ConnAckCode::ClientIdNotValid, "client_id_31");
        }
        if cfg.mqtt.strict_utf8 {
            let will = c.will.as_ref().map(|w| &*w.topic);
            if [Some(&*c.client_id), c.username.as_deref(), will]
                .into_iter()
                .flatten()
                .any(topic::has_control_chars)
            {
                // MQTT 1.5.4: a receiver MAY treat these as a malformed packet.
                return refuse(&mut codec, ConnAckCode::Malformed, "control_chars");
            }
        }
        if let Some(w) = &c.will {
            if topic::validate_name(&w.topic).is_err() {
                return refuse(&mut codec, ConnAckCode::ProtocolError, "will_topic");
            }
            if cfg.mqtt.topic_limits().check(&w.topic).is_err() {
                broker
                    .metrics
                    .topic_refused
                    .with_label_values(&["will"])
                    .inc();
                return refuse(
                    &mut codec,
                    ConnAckCode::TopicNameInvalid,
                    "will_topic_bounds",
                );
            }
            if w.qos > max_qos(&cfg) {
                return refuse(&mut codec, ConnAckCode::QosNotSupported, "will_qos");
            }
            if w.retain && !cfg.mqtt.retain_available {
                return refuse(&mut codec, ConnAckCode::RetainNotSupported, "will_retain");
            }
        }
        let max_sessions = cfg.limits.max_sessions;
        if max_sessions > 0
            && broker.sessions.len() >= max_sessions
            && (c.client_id.is_empty() || broker.sessions.get(&c.client_id).is_none())
        {
            // MQTT 5: 0x89 Server busy; 3.1.1: 0x03 Server unavailable.
            return refuse(&mut codec, ConnAckCode::ServerBusy, "max_sessions");
        }
        let assigned = c.client_id.is_empty();
        let client_id = if assigned {
            ByteString::from(format!("corvid-{:016x}", fastrand::u64(..)))
        } else {
            // Copied out of the read buffer: the session keeps its id for as long as it lives,
            // and a slice would keep the whole buffer of the CONNECT's read with it.
            ByteString::from(&*c.client_id)
        };
        let expiry = if protocol.is_v5() {
            c.session_expiry.min(cfg.sessions.max_session_expiry)
        } else if c.clean_start {
            0
        } else {
            cfg.sessions.max_session_expiry
        };
        let mut server_keepalive = None;
        let mut keep_alive = c.keep_alive;
        if protocol.is_v5()
            && (keep_alive > cfg.mqtt.max_keepalive || keep_alive == 0)
            && cfg.mqtt.max_keepalive < u16::MAX
        {
            keep_alive = cfg.mqtt.max_keepalive;
            server_keepalive = Some(keep_alive);
        }
        let kick = Arc::new(KickSlot::default());
        let username = c.username.as_ref().map(|u| u.to_string());
        let acl = broker
            .acl
            .for_client(
                &acl::Client {
                    client_id: &client_id,
                    username: username.as_deref(),
                    ip: peer.ip(),
                },
                &extra_acl,
            )
            .shared();
        let info = Arc::new(ConnInfo {
            id: broker.sessions.next_conn_id(),
            peer,
            listener,
            protocol,
            keep_alive,
            username,
            connected_at: unix_now(),
            kick,
            acl,
        });
        if let Some(max) = c.max_packet_size {
            codec.set_max_outbound(max);
        }
        let props = ConnAckProps {
            session_expiry: (protocol.is_v5() && expiry != c.session_expiry).then_some(expiry),
            receive_max: cfg.mqtt.receive_maximum,
            max_qos: cfg.mqtt.max_qos,
            max_packet_size: cfg.mqtt.max_packet_size,
            assigned_client_id: assigned.then(|| client_id.clone()),
            topic_alias_max: cfg.mqtt.topic_alias_maximum,
            retain_available: cfg.mqtt.retain_available,
            server_keepalive,
            server_reference: None,
            reason_string: None,
        };
        // [MQTT-3.1.2-24]: nothing larger than the client's Maximum Packet Size may be sent; a
        // client that cannot take even the CONNACK is closed at once instead of left waiting.
        let trial = Outbound::ConnAck {
            session_present: false,
            code: ConnAckCode::Success,
            props: Box::new(props.clone()),
        };
        if codec.encode(trial, &mut BytesMut::new()).is_err() {
            tracing::debug!(%peer, client_id = %client_id, "CONNACK larger than the client's maximum packet size");
            broker
                .metrics
                .connections_refused
                .with_label_values(&["connack_too_large"])
                .inc();
            return Err(());
        }
        let Ok(opened) = broker.open_session(&client_id, c.clean_start, expiry, info.clone())
        else {
            return refuse(&mut codec, ConnAckCode::NotAuthorized, "session_owner");
        };
        let connack = Outbound::ConnAck {
            session_present: opened.present,
            code: ConnAckCode::Success,
            props: Box::new(props),
        };
        if broker.tracer.is_traced(&client_id, None) {
            let (line, _) = trace::summary_in(&Inbound::Connect(Box::new(c.clone())));
            broker.tracer.record(&client_id, None, Dir::In, &line);
            let (line, _) = trace::summary_out(&connack);
            broker.tracer.record(&client_id, None, Dir::Out, &line);
        }
        let _ = codec.encode(connack, wbuf);
        broker.metrics.connections.inc();
        broker.metrics.connections_total.inc();
        tracing::debug!(%peer, client_id = %client_id, protocol = protocol.label(), present = opened.present, "client connected");
        let max_inflight = c.receive_max.min(cfg.mqtt.receive_maximum).max(1);
        let limits = ConnLimits::new(cfg.limits.message_rate(), cfg.limits.byte_rate());
        let limits =
            (limits.messages.is_some() || limits.bytes.is_some()).then(|| Box::new(limits));
        let mut conn = Conn {
            broker,
            codec,
            protocol,
            session: opened.session,
            generation: opened.generation,
            keep_alive: Duration::from_millis(u64::from(keep_alive) * 1500),
            will: c.will.map(Box::new),
            max_inflight,
            aliases: None,
            // The broker's own table is bounded too: each alias keeps a copy of its topic.
            client_alias_max: if protocol.is_v5() {
                c.topic_alias_max.min(cfg.mqtt.topic_alias_maximum)
            } else {
                0
            },
            expiry_was_zero: expiry == 0,
            info,
            connected_at_us: crate::hooks::now_us(),
            limits,
            congested: Vec::new(),
            write_torn: false,
            held_acks: HeldAcks::default(),
        };
        if opened.present {
            conn.reauthorize_subscriptions();
            conn.resend_inflight(wbuf);
        }
        conn.auto_subscribe();
        if conn.broker.hooks.wants(EventKind::ClientConnected) {
            conn.broker.hooks.emit(Event::ClientConnected {
                client_id: conn.session.client_id.to_string(),
                username: conn.info.username.clone(),
                peer: peer.to_string(),
                protocol: protocol.label(),
                keepalive: conn.info.keep_alive,
                clean_start: c.clean_start,
                connected_at_us: conn.connected_at_us,
            });
        }
        crate::sys::client_connected(
            &conn.broker,
            &conn.session.client_id,
            &conn.info,
            c.clean_start,
        );
        Ok(conn)
    }

    /// Subscribes the client to the configured `auto_subscriptions` (`%c` / `%u` substituted
    /// as in ACL rules: a `%u` topic is skipped for a client without a user name, and any topic
    /// is skipped when the identity it substitutes holds `+`, `#`, `/` or U+0000). They bypass
    /// the ACL: the operator configured them.
    fn auto_subscribe(&mut self) {
        let broker = self.broker.clone();
        for (filter, qos) in self.auto_filters() {
            if let Err(e) = broker.config.mqtt.topic_limits().filter(&filter) {
                broker
                    .metrics
                    .topic_refused
                    .with_label_values(&["auto_subscription"])
                    .inc();
                tracing::warn!(client_id = %self.session.client_id, error = %e, "auto-subscription over the topic bounds; skipped");
                continue;
            }
            let qos = QoS::try_from(qos).unwrap_or(QoS::AtMostOnce);
            match broker.subscribe(&self.session, &filter, SubOptions::qos(qos), None) {
                Ok(granted) => {
                    broker.metrics.auto_subscriptions.inc();
                    self.subscribed_event(&filter, granted.value());
                }
                Err(e) => {
                    tracing::warn!(client_id = %self.session.client_id, filter = %filter, error = %e, "auto-subscription refused");
                }
            }
        }
    }

    /// This client's auto-subscriptions, placeholders substituted, with their QoS.
    fn auto_filters(&self) -> Vec<(String, u8)> {
        let who = acl::Client {
            client_id: &self.session.client_id,
            username: self.info.username.as_deref(),
            ip: self.info.peer.ip(),
        };
        self.broker
            .config
            .auto_subscriptions
            .iter()
            .filter_map(|a| {
                let f = acl::substitute(&a.topic, &who);
                if f.is_none() && a.topic.contains('%') {
                    tracing::debug!(client_id = %self.session.client_id, topic = %a.topic, "auto-subscription skipped: no safe identity to substitute");
                }
                Some((f?, a.qos))
            })
            .collect()
    }

    /// Checks a resumed session's subscriptions against this connection's ACL (which may have
    /// changed since they were made, here or on the node the session came from) and removes
    /// the ones it now denies.
    fn reauthorize_subscriptions(&mut self) {
        let filters: Vec<String> = self.session.state.lock().subscription_filters();
        // Auto-subscriptions bypass the ACL; they are made again right after this.
        let auto: Vec<String> = self.auto_filters().into_iter().map(|(f, _)| f).collect();
        for raw in filters {
            if auto.contains(&raw) {
                continue;
            }
            let plain = topic::parse_filter(&raw).map_or(&*raw, |f| f.filter);
            if self.info.acl.check(Action::Subscribe, plain) == Permission::Allow {
                continue;
            }
            self.broker.unsubscribe(&self.session, &raw);
            self.broker.metrics.subscriptions_revoked.inc();
            tracing::info!(client_id = %self.session.client_id, filter = %raw, "subscription of the resumed session removed: the ACL denies it now");
        }
    }

    fn subscribed_event(&self, filter: &str, qos: u8) {
        if self.broker.hooks.wants(EventKind::SessionSubscribed) {
            self.broker.hooks.emit(Event::SessionSubscribed {
                client_id: self.session.client_id.to_string(),
                username: self.info.username.clone(),
                topic: filter.to_string(),
                qos,
            });
        }
    }

    /// Encodes a packet for the client, tracing it first when a trace follows this client
    /// (or the PUBLISH's `topic`, which may differ from the packet's when an alias is used).
    fn send(
        &mut self,
        p: Outbound,
        wbuf: &mut BytesMut,
        topic: Option<&str>,
    ) -> Result<(), codec::EncodeError> {
        if self.broker.tracer.active() {
            let (line, t) = trace::summary_out(&p);
            let topic = topic.or(t.as_deref());
            if self.broker.tracer.is_traced(&self.session.client_id, topic) {
                self.broker
                    .tracer
                    .record(&self.session.client_id, topic, Dir::Out, &line);
            }
        }
        self.codec.encode(p, wbuf)
    }

    /// Resends unacknowledged messages of a resumed session [MQTT-4.4.0-1].
    fn resend_inflight(&mut self, wbuf: &mut BytesMut) {
        let pending: Vec<Inflight> = {
            let mut st = self.session.state.lock();
            // The client's receive maximum may be smaller now [MQTT-4.9.0-2]: unacknowledged
            // messages beyond it go back to the head of the queue and are sent as the window
            // frees up.
            while st.inflight.len() > usize::from(self.max_inflight) {
                let Some(pos) = st
                    .inflight
                    .iter()
                    .rposition(|f| f.state == InflightState::AwaitAck)
                else {
                    break;
                };
                if let Some(f) = st.inflight.remove(pos) {
                    st.queue.push_front(f.delivery);
                }
            }
            st.inflight.iter().cloned().collect()
        };
        let now = Instant::now();
        for f in pending {
            match f.state {
                InflightState::AwaitAck => {
                    let p = self.publish_packet(&f.delivery, Some(f.packet_id), true, now);
                    let _ = self.send(p, wbuf, Some(&f.delivery.msg.topic));
                }
                InflightState::AwaitComp => {
                    let _ = self.send(Outbound::PubRel(f.packet_id, 0), wbuf, None);
                }
            }
        }
    }

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
        let ka = self.keep_alive;
        let start = tokio::time::Instant::now();
        // When the client is let go unless a packet comes first (`None`: never). Moving it
        // later does not touch the timer: `sleep` fires at or before it and is re-armed then.
        let mut ka_deadline = match resumed {
            Some(r) => r.keep_alive,
            None => (!ka.is_zero()).then(|| start + ka),
        };
        // Only plain TCP connections park (the others' streams keep state a socket does not).
        let parks = matches!(t, Transport::Tcp(_)) && self.broker.parker().is_some();
        let grace = match resumed {
            Some(r) if r.parked_for >= PARK_AFTER => REPARK_AFTER,
            _ => PARK_AFTER,
        };
        // When the serving loop last had something to do.
        let mut active_at = start;
        let sleep =
            tokio::time::sleep_until(next_timer(ka_deadline, parks.then_some(start + grace)));
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
            if self.hold_for_congestion(&mut held) && !ka.is_zero() {
                // Not reading is the broker's doing: keep alive waits too.
                let until = tokio::time::Instant::now() + broker.queue_bounds.congestion_timeout;
                ka_deadline = Some(until + ka);
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
                            if self.codec.decoded() != decoded && !ka.is_zero() {
                                ka_deadline = Some(tokio::time::Instant::now() + ka);
                            }
                            paused = wait.map(|w| tokio::time::Instant::now() + w);
                            if let (Some(until), false) = (paused, ka.is_zero()) {
                                // Not reading is the broker's doing: keep alive waits too.
                                ka_deadline = Some(until + ka);
                            }
                        }
                    }
                }
                // The rarely armed branches are boxed only while armed, so an idle connection's
                // future does not carry their state (see `serve`).
                _ = OptionFuture::from(paused.map(|p| Box::pin(tokio::time::sleep_until(p)))), if paused.is_some() => {
                    // Back under the rate: finish what is buffered, then read again.
                    if !ka.is_zero() {
                        ka_deadline = Some(tokio::time::Instant::now() + ka);
                    }
                    match self.process(&mut rbuf, &mut wbuf) {
                        Ok(w) => {
                            paused = w.map(|w| tokio::time::Instant::now() + w);
                            if let (Some(until), false) = (paused, ka.is_zero()) {
                                ka_deadline = Some(until + ka);
                            }
                        }
                        Err(end) => return Served::Ended(flush_then(t, &wbuf, end).await),
                    }
                }
                _ = OptionFuture::from((!held.is_empty()).then(|| Box::pin(wait_drained(&mut held, &broker.queue_bounds)))), if !held.is_empty() => {
                    // The sessions drained (or stopped counting as draining): finish what is
                    // buffered, then read again — unless a rate pause is still running.
                    if !ka.is_zero() {
                        ka_deadline = Some(tokio::time::Instant::now() + ka);
                    }
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
                    let now = tokio::time::Instant::now();
                    if ka_deadline.is_some_and(|d| d <= now) {
                        return Served::Ended(End::KeepAlive);
                    }
                    let idle_since = active_at.max(last_bytes);
                    // Not mid-packet: the codec may hold a fixed header it took off `rbuf`.
                    let idle = !self.codec.mid_packet(&rbuf)
                        && wbuf.is_empty()
                        && paused.is_none()
                        && held.is_empty()
                        && self.held_acks.is_empty()
                        && ack_wait.is_none();
                    if parks && idle && idle_since + grace <= now {
                        return Served::Idle(ka_deadline);
                    }
                    // Not idle yet (acks held, a pause): look again in a while.
                    let park_at = parks.then(|| (idle_since + grace).max(now + PARK_AFTER / 4));
                    sleep.as_mut().reset(next_timer(ka_deadline, park_at));
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

    /// Notes that a write was abandoned midway (the stream may end inside a packet), so
    /// closing sends no DISCONNECT; hands `end` back.
    fn torn(&mut self, end: End) -> End {
        self.write_torn = true;
        end
    }

    /// Moves the sessions the last PUBLISHes found congested into `held`; true when the
    /// connection starts waiting (counted as a pause).
    fn hold_for_congestion(&mut self, held: &mut Vec<Arc<Session>>) -> bool {
        if self.congested.is_empty() {
            return false;
        }
        let starts = held.is_empty();
        for s in self.congested.drain(..) {
            if !held.iter().any(|h| Arc::ptr_eq(h, &s)) {
                held.push(s);
            }
        }
        if starts {
            self.broker.metrics.throttled_congestion.inc();
        }
        starts
    }

    /// Decodes and handles the packets in `rbuf`. Stops early when the client goes over its
    /// message rate, returning how long to stop reading (the rest stays buffered), or when a
    /// PUBLISH went into a congested session (`self.congested` is then not empty).
    fn process(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<Option<Duration>, End> {
        loop {
            match self.codec.decode(rbuf) {
                Ok(Some(p)) => {
                    let mut wait = None;
                    if let (Inbound::Publish(_), Some(b)) =
                        (&p, self.limits.as_mut().and_then(|l| l.messages.as_mut()))
                    {
                        wait = b.take(1, Instant::now());
                        if wait.is_some() {
                            if self.broker.config.limits.over_rate == OverRate::Disconnect {
                                return Err(End::RateLimited);
                            }
                            self.broker.metrics.throttled_messages.inc();
                        }
                    }
                    if let Some(end) = self.handle(p, wbuf) {
                        return Err(end);
                    }
                    if wait.is_some() || !self.congested.is_empty() {
                        return Ok(wait);
                    }
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(End::Protocol(e.reason, e.message)),
            }
        }
    }

    /// Moves queued messages into the inflight window and encodes them. Returns whether more
    /// could be sent right away (the write batch filled up).
    fn drain(&mut self, wbuf: &mut BytesMut) -> Result<bool, End> {
        let now = Instant::now();
        let session = self.session.clone();
        let mut st = session.state.lock();
        if st.generation != self.generation || st.ended {
            return Err(End::Kicked(Kick::TakenOver));
        }
        let broker = self.broker.clone();
        let metrics = &broker.metrics;
        let more = loop {
            let Some(front) = st.queue.front() else {
                break false;
            };
            if front.msg.expired(now) {
                if let (Some(d), Some(db)) = (st.queue.pop_front(), &broker.durable) {
                    db.dequeue(&self.session.client_id, &d);
                }
                metrics.dropped("expired");
                continue;
            }
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= usize::from(self.max_inflight) {
                break false;
            }
            if wbuf.len() >= WRITE_BATCH {
                break true;
            }
            let Some(d) = st.queue.pop_front() else {
                break false;
            };
            let packet_id = if d.qos == QoS::AtMostOnce {
                None
            } else {
                match st.alloc_packet_id() {
                    Some(id) => Some(id),
                    None => {
                        st.queue.push_front(d);
                        break false;
                    }
                }
            };
            let aliases_before = self.aliases.as_ref().map_or(0, |a| a.outbound.len());
            let p = self.publish_packet(&d, packet_id, false, now);
            if self.send(p, wbuf, Some(&d.msg.topic)).is_err() {
                // Larger than the client's maximum packet size [MQTT-3.1.2-25]: drop it, and
                // forget an alias it would have introduced (the client never learned it).
                if let Some(a) = self.aliases.as_mut() {
                    if a.outbound.len() > aliases_before {
                        a.outbound.remove(&d.msg.topic);
                    }
                }
                if let Some(db) = &broker.durable {
                    db.dequeue(&self.session.client_id, &d);
                }
                metrics.dropped("too_large_for_client");
                continue;
            }
            metrics.messages_sent.at(d.qos.value()).inc();
            if broker.hooks.wants(EventKind::MessageDelivered) {
                broker.hooks.emit(Event::MessageDelivered {
                    client_id: self.session.client_id.to_string(),
                    from_client_id: d.msg.publisher.to_string(),
                    topic: d.msg.topic.to_string(),
                    qos: d.qos.value(),
                    payload: d.msg.payload.clone(),
                });
            }
            if let Some(packet_id) = packet_id {
                if let Some(db) = broker
                    .durable
                    .as_ref()
                    .filter(|_| d.qos == QoS::ExactlyOnce)
                {
                    // Resent with the same packet id after a restart [MQTT-4.3.3].
                    db.sent_qos2(&self.session.client_id, &d, packet_id, false);
                }
                st.inflight.push_back(Inflight {
                    packet_id,
                    delivery: d,
                    state: InflightState::AwaitAck,
                });
            }
        };
        if st.relieve(&broker.queue_bounds, &self.session.client_id) {
            drop(st);
            crate::session::DRAINED.notify_waiters();
        }
        Ok(more)
    }

    fn publish_packet(
        &mut self,
        d: &crate::message::Delivery,
        packet_id: Option<NonZeroU16>,
        dup: bool,
        now: Instant,
    ) -> Outbound {
        let mut props = if self.protocol.is_v5() {
            d.msg.properties_for(now, &d.sub_ids)
        } else {
            None
        };
        let mut topic = d.msg.topic.clone();
        if self.client_alias_max > 0 && !dup {
            let max = self.client_alias_max;
            let out = &mut self.aliases.get_or_insert_with(Default::default).outbound;
            // Computed wide: `len() as u16 + 1` would wrap at 65,535 aliases.
            let next = u16::try_from(out.len() + 1).ok().filter(|&n| n <= max);
            let alias = match (out.get(&topic), next) {
                (Some(&a), _) => {
                    topic = ByteString::new();
                    Some(a)
                }
                (None, Some(next)) => {
                    // A copy: the topic may be a slice of a large packet's buffer, which the
                    // alias table would otherwise keep alive for the connection's lifetime.
                    out.insert(ByteString::from(&*topic), next);
                    Some(next)
                }
                (None, None) => None,
            };
            if let Some(a) = alias {
                props.get_or_insert_with(Default::default).topic_alias = NonZeroU16::new(a);
            }
        }
        codec::publish(
            topic,
            d.msg.payload.clone(),
            d.qos,
            d.retain,
            dup,
            packet_id,
            props,
        )
    }

    /// Acts on one packet; `Some(end)` closes the connection.
    fn handle(&mut self, p: Inbound, wbuf: &mut BytesMut) -> Option<End> {
        if self.broker.tracer.active() {
            let (line, topic) = trace::summary_in(&p);
            if self
                .broker
                .tracer
                .is_traced(&self.session.client_id, topic.as_deref())
            {
                self.broker.tracer.record(
                    &self.session.client_id,
                    topic.as_deref(),
                    Dir::In,
                    &line,
                );
            }
        }
        match p {
            Inbound::Publish(p) => return self.on_publish(*p, wbuf),
            Inbound::PubAck(id) => {
                let mut st = self.session.state.lock();
                let Some(pos) = st.inflight.iter().position(|f| f.packet_id == id) else {
                    return None; // an id we no longer wait for (a resend was acked twice)
                };
                if st.inflight[pos].delivery.qos != QoS::AtLeastOnce {
                    // [MQTT-4.3.3] a QoS 2 delivery is answered with PUBREC, never PUBACK.
                    return Some(End::Protocol(
                        Reason::ProtocolError,
                        "PUBACK for a QoS 2 message".into(),
                    ));
                }
                let acked = st.inflight.remove(pos);
                drop(st);
                if let Some(f) = acked {
                    if let Some(db) = &self.broker.durable {
                        db.dequeue(&self.session.client_id, &f.delivery);
                    }
                    self.acked_event(&f);
                }
            }
            Inbound::PubRec(id, rc) => {
                let mut st = self.session.state.lock();
                let found = st.inflight.iter().position(|f| f.packet_id == id);
                if found.is_some_and(|pos| st.inflight[pos].delivery.qos != QoS::ExactlyOnce) {
                    // [MQTT-4.3.2] a QoS 1 delivery is answered with PUBACK only.
                    return Some(End::Protocol(
                        Reason::ProtocolError,
                        "PUBREC for a QoS 1 message".into(),
                    ));
                }
                match found {
                    Some(pos) if rc >= Reason::UnspecifiedError.code() => {
                        if let (Some(f), Some(db)) = (st.inflight.remove(pos), &self.broker.durable)
                        {
                            db.dequeue(&self.session.client_id, &f.delivery);
                        }
                    }
                    Some(pos) => {
                        if let Some(f) = st.inflight.get_mut(pos) {
                            f.state = InflightState::AwaitComp;
                            if let Some(db) = &self.broker.durable {
                                db.sent_qos2(&self.session.client_id, &f.delivery, id, true);
                            }
                        }
                        drop(st);
                        let _ = self.send(Outbound::PubRel(id, Reason::Success.code()), wbuf, None);
                    }
                    None => {
                        drop(st);
                        let _ = self.send(
                            Outbound::PubRel(id, Reason::PacketIdNotFound.code()),
                            wbuf,
                            None,
                        );
                    }
                }
            }
            Inbound::PubRel(id) => {
                let known = {
                    let mut st = self.session.state.lock();
                    let known = st.incoming_qos2.remove(&id.get());
                    if let Some(db) = self.broker.durable.as_ref().filter(|_| known) {
                        db.delete_incoming(&self.session.client_id, &st, id.get());
                    }
                    known
                };
                let _ = self.send(
                    Outbound::PubComp(
                        id,
                        if known {
                            Reason::Success
                        } else {
                            Reason::PacketIdNotFound
                        }
                        .code(),
                    ),
                    wbuf,
                    None,
                );
            }
            Inbound::PubComp(id) => {
                let mut st = self.session.state.lock();
                let Some(pos) = st.inflight.iter().position(|f| f.packet_id == id) else {
                    return None; // already completed (a duplicate PUBCOMP)
                };
                let f = &st.inflight[pos];
                if f.delivery.qos != QoS::ExactlyOnce || f.state != InflightState::AwaitComp {
                    // [MQTT-4.3.3] PUBCOMP answers our PUBREL of a QoS 2 delivery, nothing else.
                    return Some(End::Protocol(
                        Reason::ProtocolError,
                        "PUBCOMP for a message not awaiting it".into(),
                    ));
                }
                let acked = st.inflight.remove(pos);
                drop(st);
                if let Some(f) = acked {
                    if let Some(db) = &self.broker.durable {
                        db.dequeue(&self.session.client_id, &f.delivery);
                    }
                    self.acked_event(&f);
                }
            }
            Inbound::Subscribe {
                packet_id,
                sub_id,
                filters,
            } => {
                let mut codes = Vec::with_capacity(filters.len());
                let max_subs = self.broker.config.limits.max_subscriptions;
                if filters.iter().any(|(f, _)| f.contains('\0')) {
                    return Some(End::Protocol(
                        Reason::MalformedPacket,
                        "U+0000 in topic filter".into(),
                    ));
                }
                let strict = self.broker.config.mqtt.strict_utf8;
                if strict && filters.iter().any(|(f, _)| topic::has_control_chars(f)) {
                    return Some(End::Protocol(
                        Reason::MalformedPacket,
                        "control character in topic filter".into(),
                    ));
                }
                for (raw, opts) in filters {
                    if opts.no_local && raw.starts_with("$share/") {
                        return Some(End::Protocol(
                            Reason::ProtocolError,
                            "no-local on a shared subscription".into(),
                        ));
                    }
                    if self.broker.config.mqtt.topic_limits().filter(&raw).is_err() {
                        // Malformed filters get the same code from `Broker::subscribe`; only
                        // the size bounds are counted here, before the ACL walks the filter.
                        if topic::parse_filter(&raw).is_ok() {
                            self.broker
                                .metrics
                                .topic_refused
                                .with_label_values(&["subscribe"])
                                .inc();
                        }
                        codes.push(self.suback_refusal(Reason::TopicFilterInvalid));
                        continue;
                    }
                    let count = self.session.state.lock().subscriptions.len();
                    if max_subs > 0
                        && count >= max_subs
                        && !self.session.state.lock().subscriptions.contains_key(&*raw)
                    {
                        self.broker.metrics.subscriptions_refused.inc();
                        codes.push(self.suback_refusal(Reason::QuotaExceeded));
                        continue;
                    }
                    // The ACL sees the filter without any `$share/{group}/` prefix.
                    let plain = topic::parse_filter(&raw).map_or(&*raw, |f| f.filter);
                    if self.info.acl.check(Action::Subscribe, plain) == Permission::Deny {
                        self.broker.metrics.acl.subscribe_deny.inc();
                        tracing::debug!(client_id = %self.session.client_id, filter = %raw, "subscription denied by ACL");
                        codes.push(self.suback_refusal(Reason::NotAuthorized));
                        continue;
                    }
                    self.broker.metrics.acl.subscribe_allow.inc();
                    match self.broker.subscribe(&self.session, &raw, opts, sub_id) {
                        Ok(q) => {
                            codes.push(q.value());
                            self.subscribed_event(&raw, q.value());
                        }
                        Err(_) => codes.push(self.suback_refusal(Reason::TopicFilterInvalid)),
                    }
                }
                let _ = self.send(Outbound::SubAck(packet_id, codes), wbuf, None);
            }
            Inbound::Unsubscribe { packet_id, filters } => {
                let strict = self.broker.config.mqtt.strict_utf8;
                if filters
                    .iter()
                    .any(|f| f.contains('\0') || (strict && topic::has_control_chars(f)))
                {
                    return Some(End::Protocol(
                        Reason::MalformedPacket,
                        "U+0000 or a control character in an unsubscribe filter".into(),
                    ));
                }
                let codes = filters
                    .iter()
                    .map(|f| {
                        if self.broker.config.mqtt.topic_limits().filter(f).is_err() {
                            if topic::parse_filter(f).is_ok() {
                                self.broker
                                    .metrics
                                    .topic_refused
                                    .with_label_values(&["unsubscribe"])
                                    .inc();
                            }
                            return Reason::TopicFilterInvalid.code();
                        }
                        if self.broker.unsubscribe(&self.session, f) {
                            if self.broker.hooks.wants(EventKind::SessionUnsubscribed) {
                                self.broker.hooks.emit(Event::SessionUnsubscribed {
                                    client_id: self.session.client_id.to_string(),
                                    username: self.info.username.clone(),
                                    topic: f.to_string(),
                                });
                            }
                            Reason::Success.code()
                        } else {
                            Reason::NoSubscriptionExisted.code()
                        }
                    })
                    .collect();
                let _ = self.send(Outbound::UnsubAck(packet_id, codes), wbuf, None);
            }
            Inbound::PingReq => {
                let _ = self.send(Outbound::PingResp, wbuf, None);
            }
            Inbound::Disconnect {
                reason,
                session_expiry,
            } => {
                if !Reason::client_disconnect_allowed(reason) {
                    return Some(End::Protocol(
                        Reason::ProtocolError,
                        format!(
                            "DISCONNECT with reason code {reason:#04x}, which clients may not send"
                        ),
                    ));
                }
                if let Some(e) = session_expiry {
                    if self.expiry_was_zero && e != 0 {
                        // [MQTT-3.14.2-2]
                        return Some(End::Protocol(
                            Reason::ProtocolError,
                            "session expiry set after connecting with 0".into(),
                        ));
                    }
                    let cap = self.broker.config.sessions.max_session_expiry;
                    self.session.state.lock().expiry = e.min(cap);
                }
                return Some(End::ClientDisconnect {
                    will: reason == Reason::DisconnectWithWill.code(),
                });
            }
            Inbound::Connect(_) => {
                return Some(End::Protocol(
                    Reason::ProtocolError,
                    "second CONNECT".into(),
                ));
            }
            Inbound::Auth => {
                return Some(End::Protocol(
                    Reason::ProtocolError,
                    "AUTH without an authentication method".into(),
                ))
            }
            Inbound::ServerOnly(name) => {
                return Some(End::Protocol(
                    Reason::ProtocolError,
                    format!("client sent {name}"),
                ));
            }
        }
        None
    }

    fn on_publish(&mut self, mut p: Publish, wbuf: &mut BytesMut) -> Option<End> {
        let cfg = &self.broker.config;
        self.broker
            .metrics
            .messages_received
            .at(p.qos.value())
            .inc();
        if let Some(alias) = p.properties.as_ref().and_then(|pr| pr.topic_alias) {
            if alias.get() > cfg.mqtt.topic_alias_maximum {
                return Some(End::Protocol(
                    Reason::TopicAliasInvalid,
                    "topic alias out of range".into(),
                ));
            }
            if p.topic.is_empty() {
                match self
                    .aliases
                    .as_ref()
                    .and_then(|a| a.inbound.get(&alias.get()))
                {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Some(End::Protocol(
                            Reason::ProtocolError,
                            "unknown topic alias".into(),
                        ))
                    }
                }
            } else {
                // A copy, so the alias table does not keep this packet's buffer alive.
                self.aliases
                    .get_or_insert_with(Default::default)
                    .inbound
                    .insert(alias.get(), ByteString::from(&*p.topic));
            }
        }
        if p.properties
            .as_ref()
            .is_some_and(|pr| !pr.subscription_ids.is_empty())
        {
            // [MQTT-3.3.4-6]: only the server sends subscription identifiers.
            return Some(End::Protocol(
                Reason::ProtocolError,
                "PUBLISH with a subscription identifier".into(),
            ));
        }
        if p.topic.contains('\0') {
            // [MQTT-1.5.4-2]: U+0000 in a UTF-8 string is a malformed packet.
            return Some(End::Protocol(
                Reason::MalformedPacket,
                "U+0000 in topic name".into(),
            ));
        }
        if cfg.mqtt.strict_utf8 && topic::has_control_chars(&p.topic) {
            // MQTT 1.5.4: a receiver MAY treat control characters as a malformed packet.
            return Some(End::Protocol(
                Reason::MalformedPacket,
                "control character in topic name".into(),
            ));
        }
        if topic::validate_name(&p.topic).is_err() {
            return Some(End::Protocol(
                Reason::TopicNameInvalid,
                format!("invalid topic name {:?}", &*p.topic),
            ));
        }
        if let Err(e) = cfg.mqtt.topic_limits().check(&p.topic) {
            self.broker
                .metrics
                .topic_refused
                .with_label_values(&["publish"])
                .inc();
            return Some(End::Protocol(
                Reason::TopicNameInvalid,
                format!("topic name {e}"),
            ));
        }
        if p.qos > max_qos(cfg) {
            return Some(End::Protocol(
                Reason::QosNotSupported,
                "QoS not supported".into(),
            ));
        }
        if p.retain && !cfg.mqtt.retain_available {
            return Some(End::Protocol(
                Reason::RetainNotSupported,
                "retain not supported".into(),
            ));
        }
        let packet_id = p.packet_id;
        if crate::sys::is_sys(&p.topic) {
            // Only the broker publishes into `$SYS`; refused like an ACL denial, as mosquitto.
            return self.publish_denied(p, wbuf, "sys_topic");
        }
        if self.info.acl.check(Action::Publish, &p.topic) == Permission::Deny {
            self.broker.metrics.acl.publish_deny.inc();
            return self.publish_denied(p, wbuf, "acl_denied");
        }
        self.broker.metrics.acl.publish_allow.inc();
        // The store's mark before this PUBLISH changed anything (see the acknowledgement).
        let before = self.broker.durable.as_ref().map(|d| d.store().submitted());
        if p.qos == QoS::ExactlyOnce {
            let Some(id) = packet_id else {
                return Some(End::Protocol(
                    Reason::ProtocolError,
                    "QoS 2 without packet id".into(),
                ));
            };
            let mut st = self.session.state.lock();
            if st.incoming_qos2.contains(&id.get()) {
                // A resend of a message already routed: acknowledge again, don't deliver twice.
                drop(st);
                self.ack(Outbound::PubRec(id, Reason::Success.code()), false, 0, wbuf);
                return None;
            }
            if st.incoming_qos2.len() >= usize::from(cfg.mqtt.receive_maximum) {
                return Some(End::Protocol(
                    Reason::ReceiveMaximumExceeded,
                    "receive maximum exceeded".into(),
                ));
            }
            st.incoming_qos2.insert(id.get());
            if let Some(db) = &self.broker.durable {
                db.put_incoming(&self.session.client_id, &st, id.get());
            }
        }
        let qos = p.qos;
        if self.broker.hooks.wants(EventKind::MessagePublish) {
            self.broker.hooks.emit(Event::MessagePublish {
                client_id: self.session.client_id.to_string(),
                username: self.info.username.clone(),
                topic: p.topic.to_string(),
                qos: qos.value(),
                retain: p.retain,
                payload: p.payload.clone(),
            });
        }
        let msg = Arc::new(Message::new(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            p.properties,
            self.session.client_id.clone(),
        ));
        let routed = if self.broker.hooks.wants(EventKind::MessageDropped) {
            let (topic, publisher) = (msg.topic.clone(), msg.publisher.clone());
            let n = self.broker.publish_flow(msg, &mut self.congested);
            if n == 0 {
                self.broker.hooks.emit(Event::MessageDropped {
                    from_client_id: publisher.to_string(),
                    topic: topic.to_string(),
                    qos: qos.value(),
                    reason: "no_subscribers",
                });
            }
            n
        } else {
            self.broker.publish_flow(msg, &mut self.congested)
        };
        // Never stop reading for our own session: only reading this socket (its PUBACKs)
        // drains it. Its acknowledgements are held back instead, so the client's own inflight
        // limit slows it down while its acks for our deliveries keep coming.
        let own = &self.session;
        let self_fed = self.congested.iter().any(|s| Arc::ptr_eq(s, own));
        self.congested.retain(|s| !Arc::ptr_eq(s, own));
        let reason = if routed == 0 {
            Reason::NoMatchingSubscribers
        } else {
            Reason::Success
        }
        .code();
        // What this PUBLISH stored (queued for stored sessions, retained, its QoS 2 state)
        // must be durable before it is acknowledged: everything sent to the store since
        // `before` (other connections' changes included, which costs at most one commit).
        let mark = match (&self.broker.durable, before) {
            (Some(d), Some(before)) => Some(d.store().submitted()).filter(|&m| m > before),
            _ => None,
        }
        .unwrap_or(0);
        match (qos, packet_id) {
            (QoS::AtLeastOnce, Some(id)) => {
                self.ack(Outbound::PubAck(id, reason), self_fed, mark, wbuf);
            }
            (QoS::ExactlyOnce, Some(id)) => {
                self.ack(Outbound::PubRec(id, reason), self_fed, mark, wbuf);
            }
            _ => {}
        }
        None
    }

    /// Acknowledges a PUBLISH, or holds the acknowledgement back while this client's own
    /// session is congested or until the store's `mark` is durable (and behind any held one:
    /// acks go out in PUBLISH order).
    fn ack(&mut self, p: Outbound, hold: bool, mark: u64, wbuf: &mut BytesMut) {
        let not_durable = mark > 0
            && self
                .broker
                .durable
                .as_ref()
                .is_some_and(|d| d.store().durable() < mark);
        if hold || not_durable || !self.held_acks.is_empty() {
            self.held_acks.push_back((mark, p));
        } else {
            let _ = self.send(p, wbuf, None);
        }
    }

    /// Acknowledgements this client may have waiting for the store before it is not read from.
    /// An MQTT 5 client may not have more unacknowledged publishes than the receive maximum
    /// the broker announced (`mqtt.receive_maximum`). MQTT 3.1/3.1.1 have no receive maximum:
    /// the client chooses how many it keeps in flight (an SDK's "max inflight", commonly
    /// 10–100), and without a store the broker acknowledges them at once; so durable sessions
    /// let it keep that window, up to [`V3_ACK_WINDOW`], instead of cutting it to the receive
    /// maximum.
    fn ack_window(&self) -> usize {
        let announced = usize::from(self.broker.config.mqtt.receive_maximum);
        if self.protocol.is_v5() {
            announced
        } else {
            announced.max(V3_ACK_WINDOW)
        }
    }

    /// Sends the held acknowledgements whose marks are durable, in order, once this client's
    /// own session no longer holds publishers back.
    fn release_acks(&mut self, bounds: &QueueBounds, wbuf: &mut BytesMut) {
        if self.held_acks.is_empty() || self.session.holds_back(bounds).is_some() {
            return;
        }
        let durable = self
            .broker
            .durable
            .as_ref()
            .map_or(u64::MAX, |d| d.store().durable());
        while let Some(&(mark, _)) = self.held_acks.front() {
            if mark > durable {
                break;
            }
            if let Some((_, p)) = self.held_acks.pop_front() {
                let _ = self.send(p, wbuf, None);
            }
        }
        self.held_acks.shrink(65);
    }

    /// One look at the held acknowledgements against the store: whether the first still waits
    /// for its mark to be durable, and the mark this turn waits on. It waits whenever the first
    /// is not durable yet, and also when it is but this client's session does not hold it back
    /// (it became durable since `release_acks`: the wait resolves at once and the next turn
    /// sends it). Acks held only for the client's own congested session are released by the
    /// queue's wake-up instead.
    fn ack_wait(&self, bounds: &QueueBounds) -> (bool, Option<u64>) {
        let (Some(&(mark, _)), Some(db)) = (self.held_acks.front(), self.broker.durable.as_ref())
        else {
            return (false, None);
        };
        let awaited = mark > db.store().durable();
        let wait = awaited || self.session.holds_back(bounds).is_none();
        (awaited, wait.then_some(mark))
    }

    /// A PUBLISH the ACL refuses (or one into `$SYS`): MQTT 5 acknowledges it with 0x87 (Not
    /// authorized); 3.1.1 has no way to say no, so it is acknowledged as usual and dropped.
    /// `reason` labels the drop.
    fn publish_denied(
        &mut self,
        p: Publish,
        wbuf: &mut BytesMut,
        reason: &'static str,
    ) -> Option<End> {
        self.broker.metrics.dropped(reason);
        tracing::debug!(client_id = %self.session.client_id, topic = %p.topic, reason, "publish refused");
        if self.broker.hooks.wants(EventKind::MessageDropped) {
            self.broker.hooks.emit(Event::MessageDropped {
                from_client_id: self.session.client_id.to_string(),
                topic: p.topic.to_string(),
                qos: p.qos.value(),
                reason,
            });
        }
        let v5 = self.protocol.is_v5();
        // 3.1.1 has no way to refuse a PUBLISH: it is acknowledged and dropped.
        let rc = if v5 {
            Reason::NotAuthorized
        } else {
            Reason::Success
        }
        .code();
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => {
                self.ack(Outbound::PubAck(id, rc), false, 0, wbuf);
            }
            (QoS::ExactlyOnce, Some(id)) => {
                if !v5 {
                    // The 3.1.1 flow goes on to PUBREL/PUBCOMP.
                    self.session.state.lock().incoming_qos2.insert(id.get());
                }
                self.ack(Outbound::PubRec(id, rc), false, 0, wbuf);
            }
            (QoS::ExactlyOnce, None) => {
                return Some(End::Protocol(
                    Reason::ProtocolError,
                    "QoS 2 without packet id".into(),
                ));
            }
            _ => {}
        }
        None
    }

    /// A refused SUBACK entry: the MQTT 5 reason, or 3.1.1's only refusal, 0x80 Failure.
    fn suback_refusal(&self, why: Reason) -> u8 {
        if self.protocol.is_v5() {
            why.code()
        } else {
            Reason::UnspecifiedError.code()
        }
    }

    fn acked_event(&self, f: &Inflight) {
        if self.broker.hooks.wants(EventKind::MessageAcked) {
            self.broker.hooks.emit(Event::MessageAcked {
                client_id: self.session.client_id.to_string(),
                from_client_id: f.delivery.msg.publisher.to_string(),
                topic: f.delivery.msg.topic.to_string(),
                qos: f.delivery.qos.value(),
                packet_id: f.packet_id.get(),
            });
        }
    }

    /// Closes the connection: DISCONNECT with a reason for MQTT 5 where one applies, the will
    /// unless the client said goodbye, and the session handed back to the broker.
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
