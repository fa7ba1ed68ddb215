//! The connection's MQTT protocol as a state machine without I/O: [`Conn`] takes decoded
//! packets (or the bytes holding them) and writes its answers — CONNACK, SUBACK, PUBACK, the
//! session's deliveries — into a buffer the caller sends. Everything that outlives the
//! connection lives in the [`Session`]; everything that waits (sockets, timers, the store's
//! durable mark) lives in the caller, [`super`]. The tests below drive it packet by packet
//! with the test client's framing, no socket involved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;

use crate::acl::{self, Action};
use crate::broker::{max_qos, Broker};
use crate::codec::{
    self, Codec, ConnAckCode, ConnAckProps, Connect, Inbound, Outbound, Protocol, Publish, QoS,
    SubOptions, Will,
};
use crate::config::{OverRate, Permission};
use crate::hooks::{Event, EventKind};
use crate::limits::ConnLimits;
use crate::message::Message;
use crate::session::{
    unix_now, ConnInfo, Inflight, InflightState, Kick, KickSlot, QueueBounds, Session,
};
use crate::topic;
use crate::trace::{self, Dir};
use corvid_proto::reason::Reason;

/// Most acknowledgements an MQTT 3.1/3.1.1 client may have waiting for the store (see
/// `Conn::ack_window`): bounds what one connection puts into the store's queue and holds.
pub const V3_ACK_WINDOW: usize = 256;
/// Bytes buffered for writing before the queue drain pauses to flush.
pub(super) const WRITE_BATCH: usize = 64 * 1024;

/// Why a connection ended.
#[derive(Debug)]
pub(super) enum End {
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
    pub(super) fn label(&self) -> &'static str {
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

/// State of an accepted connection.
pub(super) struct Conn {
    pub(super) broker: Arc<Broker>,
    pub(super) codec: Codec,
    pub(super) protocol: Protocol,
    pub(super) session: Arc<Session>,
    pub(super) generation: u64,
    pub(super) keep_alive: Duration,
    /// Boxed: most clients set no will, and this struct lives as long as the connection.
    pub(super) will: Option<Box<Will>>,
    max_inflight: u16,
    /// Topic aliases in both directions, allocated on first use (most clients use none).
    aliases: Option<Box<Aliases>>,
    client_alias_max: u16,
    expiry_was_zero: bool,
    /// What `$SYS` and hooks report about this connection: its address, kick slot and ACL
    /// (shared with the session, which shows it to the admin API).
    pub(super) info: Arc<ConnInfo>,
    /// Accept time in µs since the epoch: identifies this connection in stored events.
    pub(super) connected_at_us: u64,
    /// Message and byte rate buckets; `None` when no rate is configured.
    pub(super) limits: Option<Box<ConnLimits>>,
    /// Sessions this client's last PUBLISH was routed into while they were above their
    /// high-water mark: its socket is not read until they drain (bounded in time).
    congested: Vec<Arc<Session>>,
    /// A write was abandoned midway: nothing more may be written.
    pub(super) write_torn: bool,
    /// PUBACK / PUBREC held back while this client's own session is congested.
    /// Each with the durable store's mark it waits for (0: none): PUBACK / PUBREC are sent
    /// in PUBLISH order once what their PUBLISH changed is on disk.
    pub(super) held_acks: HeldAcks,
}

/// Acknowledgements held back, each with the store mark it waits for; the queue is allocated
/// on first use (most connections never hold one, and every connection carries the field:
/// boxed, the field is one word instead of four).
#[derive(Default)]
#[allow(clippy::box_collection)]
pub(super) struct HeldAcks(Option<Box<std::collections::VecDeque<(u64, Outbound)>>>);

impl HeldAcks {
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    pub(super) fn is_empty(&self) -> bool {
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
    pub(super) fn shrink(&mut self, keep: usize) {
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
    pub(super) fn accept(
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

    /// Notes that a write was abandoned midway (the stream may end inside a packet), so
    /// closing sends no DISCONNECT; hands `end` back.
    pub(super) fn torn(&mut self, end: End) -> End {
        self.write_torn = true;
        end
    }

    /// Moves the sessions the last PUBLISHes found congested into `held`; true when the
    /// connection starts waiting (counted as a pause).
    pub(super) fn hold_for_congestion(&mut self, held: &mut Vec<Arc<Session>>) -> bool {
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
    pub(super) fn process(
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
    pub(super) fn drain(&mut self, wbuf: &mut BytesMut) -> Result<bool, End> {
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
                // [MQTT-4.3.3] a QoS 2 delivery is answered with PUBREC, never PUBACK.
                let fits = |f: &Inflight| f.delivery.qos == QoS::AtLeastOnce;
                return self.delivered(id, fits, "PUBACK for a QoS 2 message");
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
                // [MQTT-4.3.3] PUBCOMP answers our PUBREL of a QoS 2 delivery, nothing else.
                let fits = |f: &Inflight| {
                    f.delivery.qos == QoS::ExactlyOnce && f.state == InflightState::AwaitComp
                };
                return self.delivered(id, fits, "PUBCOMP for a message not awaiting it");
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

    /// Ends the delivery `id` the client acknowledged (PUBACK, PUBCOMP) if the acknowledgement
    /// `fits` it, or ends the connection with `misfit`. An id no longer in flight is a
    /// duplicate acknowledgement of a resend and is ignored.
    fn delivered(
        &mut self,
        id: NonZeroU16,
        fits: impl Fn(&Inflight) -> bool,
        misfit: &'static str,
    ) -> Option<End> {
        let mut st = self.session.state.lock();
        let pos = st.inflight.iter().position(|f| f.packet_id == id)?;
        if !fits(&st.inflight[pos]) {
            return Some(End::Protocol(Reason::ProtocolError, misfit.into()));
        }
        let acked = st.inflight.remove(pos);
        drop(st);
        if let Some(f) = acked {
            if let Some(db) = &self.broker.durable {
                db.dequeue(&self.session.client_id, &f.delivery);
            }
            self.acked_event(&f);
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
    pub(super) fn ack_window(&self) -> usize {
        let announced = usize::from(self.broker.config.mqtt.receive_maximum);
        if self.protocol.is_v5() {
            announced
        } else {
            announced.max(V3_ACK_WINDOW)
        }
    }

    /// Sends the held acknowledgements whose marks are durable, in order, once this client's
    /// own session no longer holds publishers back.
    pub(super) fn release_acks(&mut self, bounds: &QueueBounds, wbuf: &mut BytesMut) {
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
    pub(super) fn ack_wait(&self, bounds: &QueueBounds) -> (bool, Option<u64>) {
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
}

/// The protocol driven packet by packet: bytes a client would send go into [`Conn::process`],
/// what the connection answers comes out of its write buffer — no socket, no task.
#[cfg(test)]
mod tests {
    use super::*;
    use corvid_testkit::raw::{pkt, take_packet, Packet};
    use corvid_testkit::{Protocol as V, Wire};

    fn broker() -> Arc<Broker> {
        Broker::new(crate::config::Config::default()).expect("broker")
    }

    /// One client's connection, as the serving loop would hold it.
    struct Client {
        conn: Conn,
        v: V,
    }

    impl Client {
        /// CONNECTs `id` (clean start, keep alive 60 s); returns the connection and its
        /// CONNACK.
        fn connect(broker: &Arc<Broker>, v: V, id: &str) -> (Client, Packet) {
            let mut rbuf = BytesMut::new();
            Wire::new(v)
                .connect(id, 60, &mut rbuf)
                .expect("encode CONNECT");
            let mut codec = Codec::new(broker.config.mqtt.max_packet_size);
            let Ok(Some(Inbound::Connect(c))) = codec.decode(&mut rbuf) else {
                panic!("the CONNECT does not decode");
            };
            let mut wbuf = BytesMut::new();
            let peer = SocketAddr::from(([192, 0, 2, 1], 50000));
            let Ok(conn) = Conn::accept(
                broker.clone(),
                codec,
                peer,
                "mqtt",
                *c,
                Vec::new(),
                &mut wbuf,
            ) else {
                panic!("CONNECT refused");
            };
            let connack = take_packet(&mut wbuf).expect("a CONNACK");
            assert!(wbuf.is_empty(), "only a CONNACK answers CONNECT");
            (Client { conn, v }, connack)
        }

        /// Hands `bytes` to the connection as one read, then lets it send what its session
        /// holds; returns every packet it writes, or why it ends.
        fn send(&mut self, bytes: &[u8]) -> Result<Vec<Packet>, End> {
            let mut rbuf = BytesMut::from(bytes);
            let mut wbuf = BytesMut::new();
            self.conn.process(&mut rbuf, &mut wbuf)?;
            self.conn.drain(&mut wbuf)?;
            let broker = self.conn.broker.clone();
            self.conn.release_acks(&broker.queue_bounds, &mut wbuf);
            let mut out = Vec::new();
            while let Some(p) = take_packet(&mut wbuf) {
                out.push(p);
            }
            assert!(wbuf.is_empty(), "a packet was cut short");
            Ok(out)
        }

        /// Subscribes to `filter` and checks the SUBACK grants `qos`.
        fn subscribe(&mut self, filter: &str, qos: u8) {
            let out = self
                .send(&pkt::subscribe(self.v, 1, filter, qos))
                .expect("SUBSCRIBE");
            assert_eq!(out.len(), 1, "one SUBACK: {out:?}");
            assert_eq!(out[0].kind(), pkt::SUBACK);
            assert_eq!(out[0].body.last(), Some(&qos), "granted QoS");
        }

        fn publish(
            &mut self,
            topic: &str,
            qos: u8,
            id: u16,
            payload: &[u8],
        ) -> Result<Vec<Packet>, End> {
            self.send(&pkt::publish(self.v, topic.as_bytes(), qos, id, payload))
        }

        fn inflight(&self) -> usize {
            self.conn.session.state.lock().inflight.len()
        }
    }

    /// The packet id and (MQTT 5, where present) reason code of a PUBACK / PUBREC / PUBCOMP.
    fn ack_of(p: &Packet, kind: u8) -> (u16, u8) {
        assert_eq!(p.kind(), kind, "{p:?}");
        let id = u16::from_be_bytes([p.body[0], p.body[1]]);
        (id, p.body.get(2).copied().unwrap_or(0))
    }

    #[tokio::test]
    async fn a_qos1_publish_is_acknowledged_and_delivered_across_versions() {
        let b = broker();
        let (mut sub, connack) = Client::connect(&b, V::V311, "sub");
        assert_eq!((connack.kind(), connack.reason()), (pkt::CONNACK, 0));
        sub.subscribe("t/+", 1);
        let (mut publisher, connack) = Client::connect(&b, V::V5, "pub");
        assert_eq!((connack.kind(), connack.reason()), (pkt::CONNACK, 0));

        let out = publisher.publish("t/1", 1, 7, b"hello").expect("PUBLISH");
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(ack_of(&out[0], pkt::PUBACK), (7, 0));

        let out = sub.send(&[]).expect("drain");
        assert_eq!(out.len(), 1, "{out:?}");
        let (topic, id, payload) = out[0].publish(V::V311);
        assert_eq!((topic.as_str(), payload.as_slice()), ("t/1", &b"hello"[..]));
        let id = id.expect("QoS 1 delivery has a packet id");
        assert_eq!(sub.inflight(), 1);
        assert!(sub.send(&pkt::puback(id)).expect("PUBACK").is_empty());
        assert_eq!(sub.inflight(), 0, "the PUBACK ends the delivery");

        // Nobody subscribed: MQTT 5 says so in the PUBACK.
        let out = publisher
            .publish("nobody/here", 1, 8, b"x")
            .expect("PUBLISH");
        assert_eq!(
            ack_of(&out[0], pkt::PUBACK),
            (8, Reason::NoMatchingSubscribers.code())
        );
    }

    #[tokio::test]
    async fn a_qos2_publish_resent_before_pubrel_is_acknowledged_again_and_delivered_once() {
        let b = broker();
        let (mut sub, _) = Client::connect(&b, V::V5, "sub");
        sub.subscribe("q/2", 0);
        let (mut publisher, _) = Client::connect(&b, V::V311, "pub");

        let out = publisher.publish("q/2", 2, 9, b"once").expect("PUBLISH");
        assert_eq!(ack_of(&out[0], pkt::PUBREC).0, 9);
        // The PUBREC was lost; the client resends with DUP [MQTT-4.3.3].
        let mut resend = pkt::publish(V::V311, b"q/2", 2, 9, b"once");
        resend[0] |= 0x08;
        let out = publisher.send(&resend).expect("resend");
        assert_eq!(ack_of(&out[0], pkt::PUBREC).0, 9);

        let out = sub.send(&[]).expect("drain");
        assert_eq!(out.len(), 1, "delivered exactly once: {out:?}");
        assert_eq!(out[0].publish(V::V5).2, b"once");

        let out = publisher.send(&pkt::pubrel(9)).expect("PUBREL");
        assert_eq!(ack_of(&out[0], pkt::PUBCOMP).0, 9);
        assert!(publisher.conn.session.state.lock().incoming_qos2.is_empty());
        assert!(sub.send(&[]).expect("drain").is_empty(), "nothing more");
    }

    #[tokio::test]
    async fn deliveries_wait_for_room_in_the_inflight_window() {
        let b = broker();
        let (mut sub, _) = Client::connect(&b, V::V311, "sub");
        sub.subscribe("w", 1);
        let window = usize::from(sub.conn.max_inflight);
        let (mut publisher, _) = Client::connect(&b, V::V311, "pub");
        for i in 0..window + 2 {
            let id = u16::try_from(i + 1).expect("id");
            publisher
                .publish("w", 1, id, &id.to_be_bytes())
                .expect("PUBLISH");
        }

        let out = sub.send(&[]).expect("drain");
        assert_eq!(out.len(), window, "a full window, no more");
        assert_eq!(sub.inflight(), window);
        let first = out[0].publish(V::V311).1.expect("packet id");
        let out = sub.send(&pkt::puback(first)).expect("PUBACK");
        assert_eq!(out.len(), 1, "one acknowledged, one more sent");
        let (_, _, payload) = out[0].publish(V::V311);
        assert_eq!(
            payload,
            u16::try_from(window + 1).expect("id").to_be_bytes()
        );
    }

    #[tokio::test]
    async fn topic_aliases_stand_for_their_topic_until_the_connection_ends() {
        let b = broker();
        let (mut sub, _) = Client::connect(&b, V::V311, "sub");
        sub.subscribe("a/b", 0);
        let (mut publisher, _) = Client::connect(&b, V::V5, "pub");
        let alias = |n: u16| {
            let [hi, lo] = n.to_be_bytes();
            [0x23, hi, lo]
        };
        publisher
            .send(&pkt::publish_with(V::V5, b"a/b", 0, 0, &alias(1), b"1"))
            .expect("PUBLISH setting alias 1");
        publisher
            .send(&pkt::publish_with(V::V5, b"", 0, 0, &alias(1), b"2"))
            .expect("PUBLISH by alias 1");
        let out = sub.send(&[]).expect("drain");
        let got: Vec<_> = out.iter().map(|p| p.publish(V::V311)).collect();
        assert_eq!(
            got,
            vec![
                ("a/b".to_string(), None, b"1".to_vec()),
                ("a/b".to_string(), None, b"2".to_vec())
            ]
        );

        // An alias never set is a protocol error [MQTT-3.3.4-7] ...
        let end = publisher
            .send(&pkt::publish_with(V::V5, b"", 0, 0, &alias(2), b"3"))
            .expect_err("unknown alias");
        assert!(
            matches!(end, End::Protocol(Reason::ProtocolError, _)),
            "{end:?}"
        );
        // ... and one above the maximum the broker announced is invalid [MQTT-3.3.2-9].
        let (mut other, _) = Client::connect(&b, V::V5, "other");
        let over = b.config.mqtt.topic_alias_maximum.saturating_add(1);
        let end = other
            .send(&pkt::publish_with(V::V5, b"a/b", 0, 0, &alias(over), b"4"))
            .expect_err("alias over the maximum");
        assert!(
            matches!(end, End::Protocol(Reason::TopicAliasInvalid, _)),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn more_unreleased_qos2_publishes_than_the_receive_maximum_end_the_connection() {
        let b = broker();
        let (mut publisher, _) = Client::connect(&b, V::V5, "pub");
        let max = b.config.mqtt.receive_maximum;
        let mut burst = Vec::new();
        for id in 1..=max {
            burst.extend(pkt::publish(V::V5, b"r", 2, id, b"x"));
        }
        let out = publisher.send(&burst).expect("up to the receive maximum");
        assert_eq!(out.len(), usize::from(max), "a PUBREC each");
        let end = publisher
            .publish("r", 2, max + 1, b"x")
            .expect_err("one over");
        assert!(
            matches!(end, End::Protocol(Reason::ReceiveMaximumExceeded, _)),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_client_cannot_publish_into_sys_or_connect_twice() {
        let b = broker();
        let (mut spy, _) = Client::connect(&b, V::V311, "spy");
        spy.subscribe("$SYS/fake", 1);
        let (mut c, _) = Client::connect(&b, V::V5, "c");
        let out = c.publish("$SYS/fake", 1, 3, b"forged").expect("PUBLISH");
        assert_eq!(
            ack_of(&out[0], pkt::PUBACK),
            (3, Reason::NotAuthorized.code())
        );
        assert!(spy.send(&[]).expect("drain").is_empty(), "not delivered");

        // A second CONNECT on a connection is a protocol error [MQTT-3.1.0-2].
        let mut again = BytesMut::new();
        Wire::new(V::V5)
            .connect("c", 60, &mut again)
            .expect("encode");
        let end = c.send(&again).expect_err("second CONNECT");
        assert!(
            matches!(end, End::Protocol(Reason::ProtocolError, _)),
            "{end:?}"
        );
    }
}
