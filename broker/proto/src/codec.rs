//! The one module that knows the wire codec crate (`rmqtt-codec`, pinned exactly).
//!
//! Everything else in the broker speaks [`Inbound`] and [`Outbound`]: one protocol-neutral
//! vocabulary for MQTT 3.1.1 and 5.0, so sessions, routing and delivery are written once and
//! the codec could be swapped without touching them.

use std::num::{NonZeroU16, NonZeroU32};

use crate::reason::Reason;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::types::Publish as WirePublish;
use rmqtt_codec::{v3, v5, version::ProtocolVersion, MqttCodec, MqttPacket};
use tokio_util::codec::{Decoder, Encoder};

pub use rmqtt_codec::types::QoS;
pub use rmqtt_codec::v5::{PublishProperties, RetainHandling, UserProperties};

/// Protocol level negotiated by CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1 (protocol level 3) — handled as 3.1.1.
    V31,
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Protocol {
    /// Whether MQTT 5 features (reason codes, properties) apply.
    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }

    /// Human label used in logs, `$SYS` and the admin API.
    pub fn label(self) -> &'static str {
        corvid_api::ProtocolVersion::from(self).label()
    }
}

impl From<Protocol> for corvid_api::ProtocolVersion {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::V31 => corvid_api::ProtocolVersion::V31,
            Protocol::V311 => corvid_api::ProtocolVersion::V311,
            Protocol::V5 => corvid_api::ProtocolVersion::V5,
        }
    }
}

/// Why decoding failed; `reason` is the MQTT 5 DISCONNECT code to send, when one applies.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    /// Description for logs.
    pub message: String,
    /// Why, as the MQTT 5 reason sent in DISCONNECT (malformed, protocol error, too large ...).
    pub reason: Reason,
    /// The CONNECT named a protocol level the broker does not speak.
    pub unsupported_version: bool,
    /// A 3.1.1 CONNECT with an empty client id and clean session off.
    pub client_id_rejected: bool,
}

impl From<rmqtt_codec::error::DecodeError> for DecodeError {
    fn from(e: rmqtt_codec::error::DecodeError) -> Self {
        use rmqtt_codec::error::DecodeError as E;
        let reason = match &e {
            E::MaxSizeExceeded { .. } => Reason::PacketTooLarge,
            E::InvalidProtocol
            | E::ConnectReservedFlagSet
            | E::InvalidConnectFlags
            | E::PacketIdRequired => Reason::ProtocolError,
            E::InvalidTopicName => Reason::TopicNameInvalid,
            E::InvalidTopicFilter => Reason::TopicFilterInvalid,
            _ => Reason::MalformedPacket,
        };
        DecodeError {
            message: e.to_string(),
            reason,
            unsupported_version: matches!(e, E::UnsupportedProtocolLevel | E::InvalidProtocol),
            client_id_rejected: matches!(e, E::InvalidClientId),
        }
    }
}

/// A last-will message from CONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    /// Topic.
    pub topic: ByteString,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Seconds to wait after the connection is lost (MQTT 5).
    pub delay: u32,
    /// Publish properties carried with the will (MQTT 5).
    pub properties: Option<PublishProperties>,
}

/// A CONNECT, both versions.
#[derive(Debug, Clone)]
pub struct Connect {
    /// Negotiated protocol.
    pub protocol: Protocol,
    /// Clean session (3.1.1) / clean start (5.0).
    pub clean_start: bool,
    /// Keep alive in seconds.
    pub keep_alive: u16,
    /// Session expiry interval in seconds (3.1.1: 0 when clean, "forever" otherwise).
    pub session_expiry: u32,
    /// Client identifier (may be empty).
    pub client_id: ByteString,
    /// User name.
    pub username: Option<ByteString>,
    /// Password.
    pub password: Option<Bytes>,
    /// Last will.
    pub will: Option<Will>,
    /// Client's receive maximum (inflight QoS>0 it accepts from us).
    pub receive_max: u16,
    /// Largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// Topic aliases the client accepts from us.
    pub topic_alias_max: u16,
    /// Whether the client wants reason strings and user properties on errors.
    pub request_problem_info: bool,
    /// MQTT 5 authentication method (enhanced auth is not supported).
    pub auth_method: Option<ByteString>,
}

/// Per-filter subscription options, both versions (3.1.1 uses only `qos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// Don't deliver the subscriber's own messages (MQTT 5).
    pub no_local: bool,
    /// Keep the retain flag on forwarded messages (MQTT 5).
    pub retain_as_published: bool,
    /// When to send retained messages (MQTT 5).
    pub retain_handling: RetainHandling,
}

impl SubOptions {
    /// 3.1.1 semantics at the given QoS.
    pub fn qos(qos: QoS) -> Self {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::AtSubscribe,
        }
    }
}

/// Packets a client sends.
#[derive(Debug)]
pub enum Inbound {
    /// CONNECT.
    Connect(Box<Connect>),
    /// PUBLISH.
    Publish(Box<WirePublish>),
    /// PUBACK.
    PubAck(NonZeroU16),
    /// PUBREC (with reason code; >= 0x80 means the client refused the message).
    PubRec(NonZeroU16, u8),
    /// PUBREL.
    PubRel(NonZeroU16),
    /// PUBCOMP.
    PubComp(NonZeroU16),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        packet_id: NonZeroU16,
        /// Subscription identifier (MQTT 5).
        sub_id: Option<NonZeroU32>,
        /// Filters and options.
        filters: Vec<(ByteString, SubOptions)>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        packet_id: NonZeroU16,
        /// Filters.
        filters: Vec<ByteString>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect {
        /// Reason code (0 normal, 4 with will).
        reason: u8,
        /// New session expiry (MQTT 5).
        session_expiry: Option<u32>,
    },
    /// AUTH (MQTT 5 enhanced authentication; unsupported).
    Auth,
    /// A packet only a server sends (CONNACK, SUBACK, ...).
    ServerOnly(&'static str),
}

/// Reason codes for CONNACK, mapped to the 3.1.1 return codes where those exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAckCode {
    /// Accepted.
    Success,
    /// Unsupported protocol version (3.1.1: 0x01, 5.0: 0x84).
    UnsupportedVersion,
    /// Client id not valid (0x02 / 0x85).
    ClientIdNotValid,
    /// Server unavailable (0x03 / 0x88).
    ServerUnavailable,
    /// Bad user name or password (0x04 / 0x86).
    BadCredentials,
    /// Not authorized (0x05 / 0x87).
    NotAuthorized,
    /// Server busy (0x03 / 0x89).
    ServerBusy,
    /// Connection rate exceeded (0x03 / 0x9F).
    ConnectionRateExceeded,
    /// Bad authentication method (0x05 / 0x8C).
    BadAuthMethod,
    /// Use another server (0x03 / 0x9C).
    UseAnotherServer,
    /// Will QoS above the maximum (0x05 / 0x9B).
    QosNotSupported,
    /// Retained will while retain is unavailable (0x05 / 0x9A).
    RetainNotSupported,
    /// Protocol error (5.0: 0x82) — 3.1.1 has no code, the connection just closes.
    ProtocolError,
    /// Malformed packet (5.0: 0x81) — 3.1.1 has no code, the connection just closes.
    Malformed,
    /// Will topic over the topic bounds (5.0: 0x90) — 3.1.1 has no code, the connection closes.
    TopicNameInvalid,
}

/// CONNACK fields beyond the code (MQTT 5 properties).
#[derive(Debug, Clone, Default)]
pub struct ConnAckProps {
    /// Session expiry the server will use, if it differs from the client's.
    pub session_expiry: Option<u32>,
    /// Server's receive maximum.
    pub receive_max: u16,
    /// Highest QoS supported.
    pub max_qos: u8,
    /// Largest packet accepted.
    pub max_packet_size: u32,
    /// Client id assigned by the server.
    pub assigned_client_id: Option<ByteString>,
    /// Topic aliases accepted from the client.
    pub topic_alias_max: u16,
    /// Retain supported.
    pub retain_available: bool,
    /// Keep alive the server imposes.
    pub server_keepalive: Option<u16>,
    /// Where to go instead.
    pub server_reference: Option<ByteString>,
    /// Reason string.
    pub reason_string: Option<ByteString>,
}

/// Packets the broker sends.
#[derive(Debug)]
pub enum Outbound {
    /// CONNACK.
    ConnAck {
        /// Session present flag.
        session_present: bool,
        /// Result.
        code: ConnAckCode,
        /// MQTT 5 properties.
        props: Box<ConnAckProps>,
    },
    /// PUBLISH.
    Publish(Box<WirePublish>),
    /// PUBACK with MQTT 5 reason code.
    PubAck(NonZeroU16, u8),
    /// PUBREC with MQTT 5 reason code.
    PubRec(NonZeroU16, u8),
    /// PUBREL (reason 0x92 = packet id not found).
    PubRel(NonZeroU16, u8),
    /// PUBCOMP (reason 0x92 = packet id not found).
    PubComp(NonZeroU16, u8),
    /// SUBACK: per filter granted QoS (0..=2) or failure code (>= 0x80).
    SubAck(NonZeroU16, Vec<u8>),
    /// UNSUBACK: per filter reason (MQTT 5; 3.1.1 ignores it).
    UnsubAck(NonZeroU16, Vec<u8>),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (MQTT 5 only; 3.1.1 servers just close).
    Disconnect {
        /// Reason code.
        reason: u8,
        /// Server reference for 0x9C/0x9D.
        server_reference: Option<ByteString>,
    },
}

impl Outbound {
    /// The CONNACK that refuses a connection with `code` (no session, no properties).
    pub fn refused(code: ConnAckCode) -> Self {
        Outbound::ConnAck {
            session_present: false,
            code,
            props: Box::default(),
        }
    }
}

/// Errors encoding a packet for one client.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode packet: {0}")]
pub struct EncodeError(String);

/// Framing state of one connection: detects the version from CONNECT, then decodes and
/// encodes in that version.
#[derive(Debug)]
pub struct Codec {
    inner: MqttCodec,
    max_in: u32,
    protocol: Option<Protocol>,
    /// The inner codec has taken a fixed header off the buffer and waits for the rest.
    partial: bool,
    /// Packets decoded so far (wrapping): keep alive counts whole packets.
    decoded: u32,
}

impl Codec {
    /// A codec for a new connection, refusing inbound packets over `max_packet_size`.
    pub fn new(max_packet_size: u32) -> Self {
        Codec {
            inner: MqttCodec::Version(rmqtt_codec::version::VersionCodec),
            max_in: max_packet_size,
            protocol: None,
            partial: false,
            decoded: 0,
        }
    }

    /// Whether a packet has started arriving and is not complete: bytes are buffered, or the
    /// codec has already taken the packet's fixed header off `buf`.
    pub fn mid_packet(&self, buf: &BytesMut) -> bool {
        self.partial || !buf.is_empty()
    }

    /// How many packets this codec has decoded (wrapping): a change means a whole control
    /// packet arrived, which is what keep alive counts [MQTT-3.1.2-24].
    pub fn decoded(&self) -> u32 {
        self.decoded
    }

    /// The protocol negotiated by CONNECT, once seen.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// Changes the largest inbound packet accepted (a small bound until CONNECT is handled,
    /// `max_packet_size` after).
    pub fn set_max_inbound(&mut self, size: u32) {
        self.max_in = size;
        match &mut self.inner {
            MqttCodec::V3(c) => c.set_max_size(size),
            MqttCodec::V5(c) => c.set_max_inbound_size(size),
            _ => {}
        }
    }

    /// Caps outbound packets at the client's maximum packet size (MQTT 5).
    pub fn set_max_outbound(&mut self, size: u32) {
        if let MqttCodec::V5(c) = &mut self.inner {
            c.set_max_outbound_size(size);
        }
    }

    /// Decodes the next packet from `buf`, or `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, DecodeError> {
        if let MqttCodec::Version(v) = &mut self.inner {
            if !mqtt31_connect(buf)? {
                return Ok(None);
            }
            match v.decode(buf)? {
                None => return Ok(None),
                Some(ProtocolVersion::MQTT3) => {
                    self.inner = MqttCodec::V3(v3::Codec::new(self.max_in));
                }
                Some(ProtocolVersion::MQTT5) => {
                    self.inner = MqttCodec::V5(v5::Codec::new(self.max_in, 0));
                }
            }
        }
        // The checks below read a fixed header at the start of `buf`: not while the inner
        // codec has taken one and `buf` starts inside that packet's body.
        if !self.partial && empty_packet_has_a_body(buf, matches!(self.inner, MqttCodec::V3(_))) {
            // PINGREQ (and a 3.1.1 DISCONNECT) has no variable header and no payload: a
            // remaining length other than 0 is a malformed packet.
            return Err(DecodeError {
                message: "a packet that has no body announced one".into(),
                reason: Reason::MalformedPacket,
                unsupported_version: false,
                client_id_rejected: false,
            });
        }
        if !self.partial
            && matches!(self.inner, MqttCodec::V3(_))
            && v3_subscribe_has_reserved_bits(buf)
        {
            // [MQTT-3.8.3-4]: the codec masks these bits; 3.1.1 requires closing the connection.
            return Err(DecodeError {
                message: "SUBSCRIBE options with reserved bits set".into(),
                reason: Reason::MalformedPacket,
                unsupported_version: false,
                client_id_rejected: false,
            });
        }
        let before = buf.len();
        let packet = self.inner.decode(buf)?;
        self.partial = packet.is_none() && (self.partial || buf.len() < before);
        if packet.is_some() {
            self.decoded = self.decoded.wrapping_add(1);
        }
        match packet {
            None => Ok(None),
            Some((MqttPacket::V3(p), _)) => Ok(Some(self.inbound_v3(p))),
            Some((MqttPacket::V5(p), _)) => Ok(Some(self.inbound_v5(p))),
            Some((MqttPacket::Version(_), _)) => Err(DecodeError {
                message: "unexpected version packet".into(),
                reason: Reason::ProtocolError,
                unsupported_version: false,
                client_id_rejected: false,
            }),
        }
    }

    fn inbound_v3(&mut self, p: v3::Packet) -> Inbound {
        use v3::Packet as P;
        match p {
            P::Connect(c) => {
                let protocol = if c.protocol.level() == 3 {
                    Protocol::V31
                } else {
                    Protocol::V311
                };
                self.protocol = Some(protocol);
                Inbound::Connect(Box::new(Connect {
                    protocol,
                    clean_start: c.clean_session,
                    keep_alive: c.keep_alive,
                    session_expiry: if c.clean_session { 0 } else { u32::MAX },
                    client_id: c.client_id,
                    username: c.username,
                    password: c.password,
                    will: c.last_will.map(|w| Will {
                        topic: w.topic,
                        payload: w.message,
                        qos: w.qos,
                        retain: w.retain,
                        delay: 0,
                        properties: None,
                    }),
                    receive_max: u16::MAX,
                    max_packet_size: None,
                    topic_alias_max: 0,
                    request_problem_info: false,
                    auth_method: None,
                }))
            }
            P::Publish(p) => Inbound::Publish(p),
            P::PublishAck { packet_id } => Inbound::PubAck(packet_id),
            P::PublishReceived { packet_id } => Inbound::PubRec(packet_id, 0),
            P::PublishRelease { packet_id } => Inbound::PubRel(packet_id),
            P::PublishComplete { packet_id } => Inbound::PubComp(packet_id),
            P::Subscribe {
                packet_id,
                topic_filters,
            } => Inbound::Subscribe {
                packet_id,
                sub_id: None,
                filters: topic_filters
                    .into_iter()
                    .map(|(t, q)| (t, SubOptions::qos(q)))
                    .collect(),
            },
            P::Unsubscribe {
                packet_id,
                topic_filters,
            } => Inbound::Unsubscribe {
                packet_id,
                filters: topic_filters,
            },
            P::PingRequest => Inbound::PingReq,
            P::Disconnect => Inbound::Disconnect {
                reason: 0,
                session_expiry: None,
            },
            P::ConnectAck(_) => Inbound::ServerOnly("CONNACK"),
            P::SubscribeAck { .. } => Inbound::ServerOnly("SUBACK"),
            P::UnsubscribeAck { .. } => Inbound::ServerOnly("UNSUBACK"),
            P::PingResponse => Inbound::ServerOnly("PINGRESP"),
        }
    }

    fn inbound_v5(&mut self, p: v5::Packet) -> Inbound {
        use v5::Packet as P;
        match p {
            P::Connect(c) => {
                self.protocol = Some(Protocol::V5);
                let c = *c;
                Inbound::Connect(Box::new(Connect {
                    protocol: Protocol::V5,
                    clean_start: c.clean_start,
                    keep_alive: c.keep_alive,
                    session_expiry: c.session_expiry_interval_secs,
                    client_id: c.client_id,
                    username: c.username,
                    password: c.password,
                    will: c.last_will.map(|w| Will {
                        topic: w.topic,
                        payload: w.message,
                        qos: w.qos,
                        retain: w.retain,
                        delay: w.will_delay_interval_sec.unwrap_or(0),
                        properties: Some(PublishProperties {
                            topic_alias: None,
                            correlation_data: w.correlation_data,
                            message_expiry_interval: w.message_expiry_interval,
                            content_type: w.content_type,
                            user_properties: w.user_properties,
                            is_utf8_payload: w.is_utf8_payload.unwrap_or(false),
                            response_topic: w.response_topic,
                            subscription_ids: Vec::new(),
                        }),
                    }),
                    receive_max: c.receive_max.map(|r| r.get()).unwrap_or(u16::MAX),
                    max_packet_size: c.max_packet_size.map(|m| m.get()),
                    topic_alias_max: c.topic_alias_max,
                    request_problem_info: c.request_problem_info,
                    auth_method: c.auth_method,
                }))
            }
            P::Publish(p) => Inbound::Publish(p),
            P::PublishAck(a) => Inbound::PubAck(a.packet_id),
            P::PublishReceived(a) => Inbound::PubRec(a.packet_id, u8::from(a.reason_code)),
            P::PublishRelease(a) => Inbound::PubRel(a.packet_id),
            P::PublishComplete(a) => Inbound::PubComp(a.packet_id),
            P::Subscribe(s) => Inbound::Subscribe {
                packet_id: s.packet_id,
                sub_id: s.id,
                filters: s
                    .topic_filters
                    .into_iter()
                    .map(|(t, o)| {
                        (
                            t,
                            SubOptions {
                                qos: o.qos,
                                no_local: o.no_local,
                                retain_as_published: o.retain_as_published,
                                retain_handling: o.retain_handling,
                            },
                        )
                    })
                    .collect(),
            },
            P::Unsubscribe(u) => Inbound::Unsubscribe {
                packet_id: u.packet_id,
                filters: u.topic_filters,
            },
            P::PingRequest => Inbound::PingReq,
            P::Disconnect(d) => Inbound::Disconnect {
                reason: u8::from(d.reason_code),
                session_expiry: d.session_expiry_interval_secs,
            },
            P::Auth(_) => Inbound::Auth,
            P::ConnectAck(_) => Inbound::ServerOnly("CONNACK"),
            P::SubscribeAck(_) => Inbound::ServerOnly("SUBACK"),
            P::UnsubscribeAck(_) => Inbound::ServerOnly("UNSUBACK"),
            P::PingResponse => Inbound::ServerOnly("PINGRESP"),
        }
    }

    /// Encodes `pkt` for this connection's protocol into `dst`.
    ///
    /// Before CONNECT is decoded, only a 3.1.1 CONNACK (for refusing unknown versions) can be
    /// written.
    pub fn encode(&mut self, pkt: Outbound, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match &mut self.inner {
            MqttCodec::V5(c) => c
                .encode(to_v5(pkt), dst)
                .map_err(|e| EncodeError(e.to_string())),
            MqttCodec::V3(c) => match to_v3(pkt) {
                Some(p) => c.encode(p, dst).map_err(|e| EncodeError(e.to_string())),
                None => Ok(()),
            },
            MqttCodec::Version(_) => match to_v3(pkt) {
                Some(p) => v3::Codec::new(0)
                    .encode(p, dst)
                    .map_err(|e| EncodeError(e.to_string())),
                None => Ok(()),
            },
        }
    }
}

/// Prepares a first packet for the codec where MQTT 3.1 differs from 3.1.1: a 3.1 CONNECT
/// (`MQIsdp`, level 3) may carry bits 3.1 leaves unused — the fixed header's flags and the
/// reserved connect flag — which 3.1.1 requires to be zero [MQTT-3.1.2-3], so they are cleared
/// for 3.1 only; a protocol name with another protocol's level (`MQTT` 3, `MQIsdp` 4) is an
/// unsupported version. `Ok(false)`: not enough bytes yet to tell.
fn mqtt31_connect(buf: &mut BytesMut) -> Result<bool, DecodeError> {
    if buf.first().is_some_and(|b| b >> 4 != 1) {
        return Ok(true); // not a CONNECT: the codec refuses it
    }
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(false);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Ok(true); // a bad length: the codec refuses it
        }
    }
    let Some(name_len) = buf
        .get(i..i + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return Ok(false);
    };
    let (name_at, level_at) = (i + 2, i + 2 + name_len);
    let Some(&level) = buf.get(level_at) else {
        return Ok(false);
    };
    let wrong_level = match &buf[name_at..level_at] {
        b"MQIsdp" => level != 3,
        b"MQTT" => level == 3,
        _ => false,
    };
    if wrong_level {
        return Err(DecodeError {
            message: format!("protocol name with level {level} of another protocol"),
            reason: Reason::ProtocolError,
            unsupported_version: true,
            client_id_rejected: false,
        });
    }
    if &buf[name_at..level_at] == b"MQIsdp" {
        let Some(flags) = buf.get_mut(level_at + 1) else {
            return Ok(false);
        };
        *flags &= !0x01;
        buf[0] &= 0xF0;
    }
    if level == 5 {
        let Some(&flags) = buf.get(level_at + 1) else {
            return Ok(false);
        };
        // [MQTT-3.1.2-11], [MQTT-3.1.2-13]: without the Will Flag, Will QoS and Will Retain
        // must be 0 (the 3.1.1 codec checks this itself; the 5.0 one does not).
        if flags & 0x04 == 0 && flags & 0x38 != 0 {
            return Err(DecodeError {
                message: "Will QoS or Will Retain set without the Will Flag".into(),
                reason: Reason::MalformedPacket,
                unsupported_version: false,
                client_id_rejected: false,
            });
        }
    }
    Ok(true)
}

/// Whether `buf` starts with the fixed header of a packet that can have no body — PINGREQ,
/// and DISCONNECT before MQTT 5 — announcing a remaining length other than 0.
fn empty_packet_has_a_body(buf: &[u8], v3: bool) -> bool {
    match buf {
        [0xC0, len, ..] => *len != 0,
        [0xE0, len, ..] if v3 => *len != 0,
        _ => false,
    }
}

/// Whether `buf` starts with a complete 3.1.1 SUBSCRIBE whose requested-QoS bytes have any of
/// the reserved upper six bits set.
fn v3_subscribe_has_reserved_bits(buf: &[u8]) -> bool {
    if buf.first() != Some(&0x82) {
        return false;
    }
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let Some(&b) = buf.get(i) else { return false };
        len += usize::from(b & 0x7f) * mult;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        mult *= 128;
        if i > 4 {
            return false;
        }
    }
    let Some(body) = buf.get(i..i + len) else {
        return false;
    };
    let mut p = 2; // packet id
    while p + 2 <= body.len() {
        let n = usize::from(u16::from_be_bytes([body[p], body[p + 1]]));
        p += 2 + n;
        match body.get(p) {
            Some(opts) if opts & 0b1111_1100 != 0 => return true,
            Some(_) => p += 1,
            None => return false,
        }
    }
    false
}

fn to_v3(pkt: Outbound) -> Option<v3::Packet> {
    use v3::ConnectAckReason as R;
    use v3::Packet as P;
    Some(match pkt {
        Outbound::ConnAck {
            session_present,
            code,
            ..
        } => {
            let return_code = match code {
                ConnAckCode::Success => R::ConnectionAccepted,
                ConnAckCode::UnsupportedVersion => R::UnacceptableProtocolVersion,
                ConnAckCode::ClientIdNotValid => R::IdentifierRejected,
                ConnAckCode::BadCredentials => R::BadUserNameOrPassword,
                ConnAckCode::NotAuthorized
                | ConnAckCode::BadAuthMethod
                | ConnAckCode::QosNotSupported
                | ConnAckCode::RetainNotSupported => R::NotAuthorized,
                ConnAckCode::ServerUnavailable
                | ConnAckCode::ServerBusy
                | ConnAckCode::ConnectionRateExceeded
                | ConnAckCode::UseAnotherServer => R::ServiceUnavailable,
                ConnAckCode::ProtocolError
                | ConnAckCode::Malformed
                | ConnAckCode::TopicNameInvalid => return None,
            };
            P::ConnectAck(v3::ConnectAck {
                return_code,
                session_present: session_present && code == ConnAckCode::Success,
            })
        }
        Outbound::Publish(mut p) => {
            p.properties = None;
            P::Publish(p)
        }
        Outbound::PubAck(packet_id, _) => P::PublishAck { packet_id },
        Outbound::PubRec(packet_id, _) => P::PublishReceived { packet_id },
        Outbound::PubRel(packet_id, _) => P::PublishRelease { packet_id },
        Outbound::PubComp(packet_id, _) => P::PublishComplete { packet_id },
        Outbound::SubAck(packet_id, codes) => P::SubscribeAck {
            packet_id,
            status: codes
                .into_iter()
                .map(|c| match QoS::try_from(c) {
                    Ok(q) if c < 3 => v3::SubscribeReturnCode::Success(q),
                    _ => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        },
        Outbound::UnsubAck(packet_id, _) => P::UnsubscribeAck { packet_id },
        Outbound::PingResp => P::PingResponse,
        Outbound::Disconnect { .. } => return None,
    })
}

fn to_v5(pkt: Outbound) -> v5::Packet {
    use v5::Packet as P;
    match pkt {
        Outbound::ConnAck {
            session_present,
            code,
            props,
        } => {
            let reason_code = match code {
                ConnAckCode::Success => v5::ConnectAckReason::Success,
                ConnAckCode::UnsupportedVersion => v5::ConnectAckReason::UnsupportedProtocolVersion,
                ConnAckCode::ClientIdNotValid => v5::ConnectAckReason::ClientIdentifierNotValid,
                ConnAckCode::ServerUnavailable => v5::ConnectAckReason::ServerUnavailable,
                ConnAckCode::BadCredentials => v5::ConnectAckReason::BadUserNameOrPassword,
                ConnAckCode::NotAuthorized => v5::ConnectAckReason::NotAuthorized,
                ConnAckCode::ServerBusy => v5::ConnectAckReason::ServerBusy,
                ConnAckCode::ConnectionRateExceeded => v5::ConnectAckReason::ConnectionRateExceeded,
                ConnAckCode::BadAuthMethod => v5::ConnectAckReason::BadAuthenticationMethod,
                ConnAckCode::UseAnotherServer => v5::ConnectAckReason::UseAnotherServer,
                ConnAckCode::QosNotSupported => v5::ConnectAckReason::QosNotSupported,
                ConnAckCode::RetainNotSupported => v5::ConnectAckReason::RetainNotSupported,
                ConnAckCode::ProtocolError => v5::ConnectAckReason::ProtocolError,
                ConnAckCode::Malformed => v5::ConnectAckReason::MalformedPacket,
                ConnAckCode::TopicNameInvalid => v5::ConnectAckReason::TopicNameInvalid,
            };
            let p = *props;
            P::ConnectAck(Box::new(v5::ConnectAck {
                session_present: session_present && code == ConnAckCode::Success,
                reason_code,
                session_expiry_interval_secs: p.session_expiry,
                receive_max: NonZeroU16::new(p.receive_max).unwrap_or(NonZeroU16::MAX),
                max_qos: QoS::try_from(p.max_qos).unwrap_or(QoS::ExactlyOnce),
                max_packet_size: (p.max_packet_size > 0).then_some(p.max_packet_size),
                assigned_client_id: p.assigned_client_id,
                topic_alias_max: p.topic_alias_max,
                retain_available: p.retain_available,
                wildcard_subscription_available: true,
                subscription_identifiers_available: true,
                shared_subscription_available: true,
                server_keepalive_sec: p.server_keepalive,
                response_info: None,
                server_reference: p.server_reference,
                auth_method: None,
                auth_data: None,
                reason_string: p.reason_string,
                user_properties: Vec::new(),
            }))
        }
        Outbound::Publish(p) => P::Publish(p),
        Outbound::PubAck(packet_id, reason) => P::PublishAck(puback(packet_id, reason)),
        Outbound::PubRec(packet_id, reason) => P::PublishReceived(puback(packet_id, reason)),
        Outbound::PubRel(packet_id, reason) => P::PublishRelease(puback2(packet_id, reason)),
        Outbound::PubComp(packet_id, reason) => P::PublishComplete(puback2(packet_id, reason)),
        Outbound::SubAck(packet_id, codes) => P::SubscribeAck(v5::SubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: codes
                .into_iter()
                .map(|c| {
                    v5::SubscribeAckReason::try_from(c)
                        .unwrap_or(v5::SubscribeAckReason::UnspecifiedError)
                })
                .collect(),
        }),
        Outbound::UnsubAck(packet_id, codes) => P::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: codes
                .into_iter()
                .map(|c| {
                    v5::UnsubscribeAckReason::try_from(c)
                        .unwrap_or(v5::UnsubscribeAckReason::UnspecifiedError)
                })
                .collect(),
        }),
        Outbound::PingResp => P::PingResponse,
        Outbound::Disconnect {
            reason,
            server_reference,
        } => P::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::try_from(reason)
                .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError),
            session_expiry_interval_secs: None,
            server_reference,
            reason_string: None,
            user_properties: Vec::new(),
        }),
    }
}

fn puback(packet_id: NonZeroU16, reason: u8) -> v5::PublishAck {
    v5::PublishAck {
        packet_id,
        reason_code: v5::PublishAckReason::try_from(reason)
            .unwrap_or(v5::PublishAckReason::UnspecifiedError),
        properties: Vec::new(),
        reason_string: None,
    }
}

fn puback2(packet_id: NonZeroU16, reason: u8) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id,
        reason_code: v5::PublishAck2Reason::try_from(reason)
            .unwrap_or(v5::PublishAck2Reason::Success),
        properties: Vec::new(),
        reason_string: None,
    }
}

/// Builds an outbound PUBLISH.
pub fn publish(
    topic: ByteString,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    dup: bool,
    packet_id: Option<NonZeroU16>,
    properties: Option<PublishProperties>,
) -> Outbound {
    Outbound::Publish(Box::new(WirePublish {
        dup,
        retain,
        qos,
        topic,
        packet_id,
        payload,
        properties,
    }))
}

/// The PUBLISH type shared by both versions.
pub type Publish = WirePublish;

#[cfg(test)]
mod tests {
    use super::*;

    /// A codec past a clean CONNECT at protocol `level`, and the buffer it read it from.
    fn connected(level: u8) -> (Codec, BytesMut) {
        let mut c = Codec::new(1024);
        let mut buf = connect_bytes(level, 0x02, "abc");
        assert!(matches!(c.decode(&mut buf), Ok(Some(Inbound::Connect(_)))));
        (c, buf)
    }

    fn connect_bytes(level: u8, flags: u8, client_id: &str) -> BytesMut {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut b = BytesMut::new();
        b.extend_from_slice(&[0x10, body.len() as u8]);
        b.extend_from_slice(&body);
        b
    }

    #[test]
    fn a_pingreq_with_a_body_is_malformed() {
        for level in [4u8, 5] {
            let (mut c, mut buf) = connected(level);
            buf.extend_from_slice(&[0xC0, 0x00]);
            assert!(
                matches!(c.decode(&mut buf), Ok(Some(_))),
                "level {level}: PINGREQ"
            );
            buf.extend_from_slice(&[0xC0, 0x01, 0x00]);
            let e = c.decode(&mut buf).expect_err("PINGREQ with a body");
            assert_eq!(e.reason, Reason::MalformedPacket);
        }
    }

    #[test]
    fn a_body_that_looks_like_a_header_is_not_read_as_one() {
        // A PUBACK whose header came alone and whose packet id starts with 0x82 (the first
        // byte of a SUBSCRIBE) or 0xC0 (PINGREQ) is a PUBACK.
        for first in [0x82u8, 0xC0] {
            let (mut c, mut buf) = connected(4);
            buf.extend_from_slice(&[0x40, 0x02]);
            assert!(matches!(c.decode(&mut buf), Ok(None)));
            buf.extend_from_slice(&[first, 0xFF]);
            assert!(
                matches!(c.decode(&mut buf), Ok(Some(_))),
                "packet id {first:#x}ff after a lone header"
            );
        }
    }

    #[test]
    fn a_v5_will_qos_without_the_will_flag_is_malformed() {
        for flags in [0x02 | 0x08, 0x02 | 0x20] {
            let mut c = Codec::new(1024);
            let mut buf = connect_bytes(5, flags, "abc");
            let e = c.decode(&mut buf).expect_err("will bits without will flag");
            assert_eq!(e.reason, Reason::MalformedPacket);
        }
    }

    #[test]
    fn a_packet_whose_header_was_taken_is_still_mid_packet() {
        for level in [4u8, 5] {
            let (mut c, mut buf) = connected(level);
            assert_eq!(c.decoded(), 1);
            assert!(!c.mid_packet(&buf));
            // A QoS 0 PUBLISH announcing 10 bytes, of which only the fixed header came.
            buf.extend_from_slice(&[0x30, 10]);
            assert!(matches!(c.decode(&mut buf), Ok(None)));
            assert!(c.mid_packet(&buf), "level {level}: header taken, body owed");
            assert_eq!(c.decoded(), 1, "no whole packet yet");
            let mut body = vec![0, 3, b'a', b'/', b'b'];
            if level == 5 {
                body.push(0); // no properties
            }
            body.resize(10, b'x');
            buf.extend_from_slice(&body);
            assert!(matches!(c.decode(&mut buf), Ok(Some(Inbound::Publish(_)))));
            assert_eq!(c.decoded(), 2);
            assert!(!c.mid_packet(&buf));
        }
    }

    #[test]
    fn detects_both_versions() {
        for (level, proto) in [(4u8, Protocol::V311), (5u8, Protocol::V5)] {
            let mut c = Codec::new(1024);
            let mut buf = connect_bytes(level, 0x02, "abc");
            match c.decode(&mut buf) {
                Ok(Some(Inbound::Connect(conn))) => {
                    assert_eq!(conn.protocol, proto);
                    assert_eq!(&*conn.client_id, "abc");
                    assert!(conn.clean_start);
                }
                other => panic!("unexpected {other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn partial_connect_needs_more() {
        let mut c = Codec::new(1024);
        let full = connect_bytes(4, 0x02, "abc");
        let mut buf = BytesMut::from(&full[..5]);
        assert!(matches!(c.decode(&mut buf), Ok(None)));
    }

    #[test]
    fn unknown_level_is_unsupported_version() {
        let mut c = Codec::new(1024);
        let mut buf = connect_bytes(9, 0x02, "abc");
        let err = c.decode(&mut buf).expect_err("level 9");
        assert!(err.unsupported_version);
    }

    #[test]
    fn oversize_is_packet_too_large() {
        let mut c = Codec::new(1024);
        let mut buf = connect_bytes(5, 0x02, "abc");
        assert!(matches!(c.decode(&mut buf), Ok(Some(_))));
        buf.extend_from_slice(&[0x30, 0xff, 0xff, 0x7f]);
        let err = c.decode(&mut buf).expect_err("too big");
        assert_eq!(err.reason, Reason::PacketTooLarge);
    }

    #[test]
    fn v3_subscribe_reserved_bits_are_malformed() {
        let mut c = Codec::new(1024);
        let mut buf = connect_bytes(4, 0x02, "abc");
        assert!(matches!(c.decode(&mut buf), Ok(Some(_))));
        buf.extend_from_slice(&[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0xc1]);
        assert!(c.decode(&mut buf).is_err());
        let mut ok =
            BytesMut::from(&[0x82u8, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01][..]);
        assert!(matches!(
            c.decode(&mut ok),
            Ok(Some(Inbound::Subscribe { .. }))
        ));
    }

    #[test]
    fn v3_connack_before_connect_for_refusals() {
        let mut c = Codec::new(1024);
        let mut out = BytesMut::new();
        c.encode(
            Outbound::ConnAck {
                session_present: false,
                code: ConnAckCode::UnsupportedVersion,
                props: Box::default(),
            },
            &mut out,
        )
        .expect("encodes");
        assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x01]);
    }
}
