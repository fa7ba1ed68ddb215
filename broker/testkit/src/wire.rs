//! Client-side MQTT framing on top of `rmqtt-codec` (the codec the broker uses): clients talk in
//! a handful of packet kinds and never care whether the wire is 3.1.1 or 5.0. Encoding appends
//! to a caller's buffer and decoding maps the codec's packet without copying payloads, so a
//! client's hot path allocates nothing per packet.

use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::types::{Protocol as CodecProtocol, Publish};
use rmqtt_codec::{v3, v5, MqttCodec, MqttPacket};
use tokio_util::codec::{Decoder, Encoder};

pub use rmqtt_codec::types::QoS;

use crate::error::Result;

/// Largest packet we accept from a broker; payloads in benchmarks and tests are far smaller.
const MAX_INBOUND: u32 = 16 * 1024 * 1024;

/// MQTT protocol level spoken by a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Protocol {
    /// Both versions, for clients and tests that run once per version.
    pub const BOTH: [Protocol; 2] = [Protocol::V311, Protocol::V5];

    /// CONNECT's protocol level.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }

    /// The protocol of CONNECT's protocol level (4 or 5), if it is one of these.
    pub fn from_level(level: u8) -> Option<Self> {
        match level {
            4 => Some(Protocol::V311),
            5 => Some(Protocol::V5),
            _ => None,
        }
    }
}

/// The QoS of a level 0, 1 or 2.
pub fn qos_from_level(level: u8) -> Option<QoS> {
    match level {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

/// What a CONNECT asks for beyond the client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Clean start (5.0) / clean session (3.1.1).
    pub clean_start: bool,
    /// Keep alive in seconds.
    pub keep_alive: u16,
    /// MQTT 5 session expiry interval in seconds (ignored on 3.1.1).
    pub session_expiry: u32,
}

impl ConnectOptions {
    /// A clean session that ends with the connection.
    pub fn clean(keep_alive: u16) -> Self {
        ConnectOptions {
            clean_start: true,
            keep_alive,
            session_expiry: 0,
        }
    }
}

/// The server-to-client packets clients react to, independent of protocol version.
#[derive(Debug)]
pub enum Incoming {
    /// CONNACK; `code` is 0 when accepted.
    ConnAck {
        /// Return/reason code (0 = success).
        code: u8,
        /// The broker still had the session.
        session_present: bool,
        /// MQTT 5 Receive Maximum (65,535 when absent and on 3.1.1).
        receive_max: u16,
        /// MQTT 5 Server Reference: another server to use.
        server_reference: Option<String>,
    },
    /// An application message delivered to a subscriber.
    Publish {
        /// QoS the broker delivered with.
        qos: QoS,
        /// Packet id (QoS 1/2 only).
        packet_id: Option<NonZeroU16>,
        /// Application payload.
        payload: Bytes,
    },
    /// PUBACK for one of our QoS 1 publishes.
    PubAck {
        /// Packet id of the PUBLISH.
        packet_id: NonZeroU16,
        /// Reason code (0 on 3.1.1; 0x80 and above is a refusal).
        code: u8,
    },
    /// PUBREC for one of our QoS 2 publishes.
    PubRec(NonZeroU16),
    /// PUBREL for a QoS 2 message delivered to us.
    PubRel(NonZeroU16),
    /// PUBCOMP finishing one of our QoS 2 publishes.
    PubComp(NonZeroU16),
    /// SUBACK; `granted` is false when any filter was refused.
    SubAck {
        /// Packet id of the SUBSCRIBE.
        packet_id: NonZeroU16,
        /// Whether every filter was granted.
        granted: bool,
    },
    /// PINGRESP.
    PingResp,
    /// The broker is closing the connection (MQTT 5; 3.1.1 brokers just close).
    Disconnect {
        /// Reason code.
        code: u8,
        /// Server Reference: where the client should reconnect.
        server_reference: Option<String>,
    },
    /// Anything a client does not need to act on.
    Other,
}

/// Encoder/decoder for one connection.
#[derive(Debug)]
pub struct Wire {
    protocol: Protocol,
    codec: MqttCodec,
}

impl Wire {
    /// Creates the codec for a fresh connection speaking `protocol`.
    pub fn new(protocol: Protocol) -> Self {
        let codec = match protocol {
            Protocol::V311 => MqttCodec::V3(v3::Codec::new(MAX_INBOUND)),
            Protocol::V5 => MqttCodec::V5(v5::Codec::new(MAX_INBOUND, 0)),
        };
        Wire { protocol, codec }
    }

    /// The protocol this connection speaks.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    fn put(
        &mut self,
        v3p: impl FnOnce() -> v3::Packet,
        v5p: impl FnOnce() -> v5::Packet,
        dst: &mut BytesMut,
    ) -> Result<()> {
        let packet = match self.protocol {
            Protocol::V311 => MqttPacket::V3(v3p()),
            Protocol::V5 => MqttPacket::V5(v5p()),
        };
        self.codec.encode(packet, dst)?;
        Ok(())
    }

    /// Appends a CONNECT with a clean session and the given keep-alive.
    pub fn connect(&mut self, client_id: &str, keep_alive: u16, dst: &mut BytesMut) -> Result<()> {
        self.connect_with(client_id, ConnectOptions::clean(keep_alive), dst)
    }

    /// Appends a CONNECT with `options`.
    pub fn connect_with(
        &mut self,
        client_id: &str,
        options: ConnectOptions,
        dst: &mut BytesMut,
    ) -> Result<()> {
        let ConnectOptions {
            clean_start,
            keep_alive,
            session_expiry,
        } = options;
        let id = ByteString::from(client_id);
        let id5 = id.clone();
        self.put(
            || {
                v3::Packet::Connect(Box::new(v3::Connect {
                    protocol: CodecProtocol(rmqtt_codec::types::MQTT_LEVEL_311),
                    clean_session: clean_start,
                    keep_alive,
                    last_will: None,
                    client_id: id,
                    username: None,
                    password: None,
                    cert: None,
                }))
            },
            || {
                v5::Packet::Connect(Box::new(v5::Connect {
                    clean_start,
                    keep_alive,
                    session_expiry_interval_secs: session_expiry,
                    client_id: id5,
                    ..v5::Connect::default()
                }))
            },
            dst,
        )
    }

    /// Appends a SUBSCRIBE for one filter.
    pub fn subscribe(
        &mut self,
        packet_id: NonZeroU16,
        filter: &str,
        qos: QoS,
        dst: &mut BytesMut,
    ) -> Result<()> {
        let f = ByteString::from(filter);
        let f5 = f.clone();
        self.put(
            || v3::Packet::Subscribe {
                packet_id,
                topic_filters: vec![(f, qos)],
            },
            || {
                v5::Packet::Subscribe(v5::Subscribe {
                    packet_id,
                    id: None,
                    user_properties: Vec::new(),
                    topic_filters: vec![(
                        f5,
                        v5::SubscriptionOptions {
                            qos,
                            ..Default::default()
                        },
                    )],
                })
            },
            dst,
        )
    }

    /// Appends a PUBLISH; `packet_id` must be set exactly when `qos` > 0.
    #[inline]
    pub fn publish(
        &mut self,
        topic: &ByteString,
        qos: QoS,
        packet_id: Option<NonZeroU16>,
        payload: Bytes,
        dst: &mut BytesMut,
    ) -> Result<()> {
        self.publish_dup(topic, qos, packet_id, payload, false, dst)
    }

    /// Appends a PUBLISH with the DUP flag as given (`true` for a resend of an unacknowledged
    /// QoS ≥ 1 message on the same session).
    pub fn publish_dup(
        &mut self,
        topic: &ByteString,
        qos: QoS,
        packet_id: Option<NonZeroU16>,
        payload: Bytes,
        dup: bool,
        dst: &mut BytesMut,
    ) -> Result<()> {
        let publish = Publish {
            dup,
            retain: false,
            qos,
            topic: topic.clone(),
            packet_id,
            payload,
            properties: None,
        };
        let packet = match self.protocol {
            Protocol::V311 => MqttPacket::V3(v3::Packet::Publish(Box::new(publish))),
            Protocol::V5 => MqttPacket::V5(v5::Packet::Publish(Box::new(publish))),
        };
        self.codec.encode(packet, dst)?;
        Ok(())
    }

    /// Appends a PUBACK (subscriber side of QoS 1).
    pub fn puback(&mut self, packet_id: NonZeroU16, dst: &mut BytesMut) -> Result<()> {
        self.put(
            || v3::Packet::PublishAck { packet_id },
            || {
                v5::Packet::PublishAck(v5::PublishAck {
                    packet_id,
                    ..Default::default()
                })
            },
            dst,
        )
    }

    /// Appends a PUBREC (subscriber side of QoS 2, step 1).
    pub fn pubrec(&mut self, packet_id: NonZeroU16, dst: &mut BytesMut) -> Result<()> {
        self.put(
            || v3::Packet::PublishReceived { packet_id },
            || {
                v5::Packet::PublishReceived(v5::PublishAck {
                    packet_id,
                    ..Default::default()
                })
            },
            dst,
        )
    }

    /// Appends a PUBREL (publisher side of QoS 2, step 2).
    pub fn pubrel(&mut self, packet_id: NonZeroU16, dst: &mut BytesMut) -> Result<()> {
        self.put(
            || v3::Packet::PublishRelease { packet_id },
            || {
                v5::Packet::PublishRelease(v5::PublishAck2 {
                    packet_id,
                    ..Default::default()
                })
            },
            dst,
        )
    }

    /// Appends a PUBCOMP (subscriber side of QoS 2, step 3).
    pub fn pubcomp(&mut self, packet_id: NonZeroU16, dst: &mut BytesMut) -> Result<()> {
        self.put(
            || v3::Packet::PublishComplete { packet_id },
            || {
                v5::Packet::PublishComplete(v5::PublishAck2 {
                    packet_id,
                    ..Default::default()
                })
            },
            dst,
        )
    }

    /// Appends a PINGREQ to keep an otherwise quiet connection alive.
    pub fn pingreq(&mut self, dst: &mut BytesMut) -> Result<()> {
        self.put(|| v3::Packet::PingRequest, || v5::Packet::PingRequest, dst)
    }

    /// Appends a DISCONNECT so the broker does not publish wills or log errors.
    pub fn disconnect(&mut self, dst: &mut BytesMut) -> Result<()> {
        self.disconnect_with_expiry(None, dst)
    }

    /// Appends a DISCONNECT; on MQTT 5 with `session_expiry` set, it replaces the session's
    /// expiry (0: the broker forgets the session now).
    pub fn disconnect_with_expiry(
        &mut self,
        session_expiry: Option<u32>,
        dst: &mut BytesMut,
    ) -> Result<()> {
        self.put(
            || v3::Packet::Disconnect,
            || {
                v5::Packet::Disconnect(v5::Disconnect {
                    session_expiry_interval_secs: session_expiry,
                    ..v5::Disconnect::default()
                })
            },
            dst,
        )
    }

    /// Decodes the next complete packet from `src`, or `None` if more bytes are needed.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>> {
        let Some((packet, _len)) = self.codec.decode(src)? else {
            return Ok(None);
        };
        Ok(Some(match packet {
            MqttPacket::V3(p) => from_v3(p),
            MqttPacket::V5(p) => from_v5(p),
            MqttPacket::Version(_) => Incoming::Other,
        }))
    }
}

fn from_v3(p: v3::Packet) -> Incoming {
    match p {
        v3::Packet::ConnectAck(ack) => Incoming::ConnAck {
            code: u8::from(ack.return_code),
            session_present: ack.session_present,
            receive_max: u16::MAX,
            server_reference: None,
        },
        v3::Packet::Publish(p) => Incoming::Publish {
            qos: p.qos,
            packet_id: p.packet_id,
            payload: p.payload,
        },
        v3::Packet::PublishAck { packet_id } => Incoming::PubAck { packet_id, code: 0 },
        v3::Packet::PublishReceived { packet_id } => Incoming::PubRec(packet_id),
        v3::Packet::PublishRelease { packet_id } => Incoming::PubRel(packet_id),
        v3::Packet::PublishComplete { packet_id } => Incoming::PubComp(packet_id),
        v3::Packet::SubscribeAck { packet_id, status } => Incoming::SubAck {
            packet_id,
            granted: status
                .iter()
                .all(|s| matches!(s, v3::SubscribeReturnCode::Success(_))),
        },
        v3::Packet::PingResponse => Incoming::PingResp,
        v3::Packet::Disconnect => Incoming::Disconnect {
            code: 0,
            server_reference: None,
        },
        _ => Incoming::Other,
    }
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnectAck(ack) => Incoming::ConnAck {
            code: ack.reason_code as u8,
            session_present: ack.session_present,
            receive_max: ack.receive_max.get(),
            server_reference: ack.server_reference.map(|r| r.to_string()),
        },
        v5::Packet::Publish(p) => Incoming::Publish {
            qos: p.qos,
            packet_id: p.packet_id,
            payload: p.payload,
        },
        v5::Packet::PublishAck(a) => Incoming::PubAck {
            packet_id: a.packet_id,
            code: a.reason_code as u8,
        },
        v5::Packet::PublishReceived(a) => Incoming::PubRec(a.packet_id),
        v5::Packet::PublishRelease(a) => Incoming::PubRel(a.packet_id),
        v5::Packet::PublishComplete(a) => Incoming::PubComp(a.packet_id),
        v5::Packet::SubscribeAck(a) => Incoming::SubAck {
            packet_id: a.packet_id,
            granted: a.status.iter().all(|s| (*s as u8) < 0x80),
        },
        v5::Packet::PingResponse => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            code: d.reason_code as u8,
            server_reference: d.server_reference.map(|r| r.to_string()),
        },
        _ => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both protocol versions must round-trip a QoS 1 publish through the codec.
    #[test]
    fn publish_round_trips_on_both_versions() {
        for proto in [Protocol::V311, Protocol::V5] {
            let mut wire = Wire::new(proto);
            let mut buf = BytesMut::new();
            let topic = ByteString::from("a/b");
            let id = NonZeroU16::new(7).expect("non-zero");
            wire.publish(
                &topic,
                QoS::AtLeastOnce,
                Some(id),
                Bytes::from_static(b"hello"),
                &mut buf,
            )
            .expect("encode");
            match wire.decode(&mut buf).expect("decode") {
                Some(Incoming::Publish {
                    qos,
                    packet_id,
                    payload,
                }) => {
                    assert_eq!(qos, QoS::AtLeastOnce);
                    assert_eq!(packet_id, Some(id));
                    assert_eq!(&payload[..], b"hello");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn server_v5(packet: v5::Packet) -> BytesMut {
        let mut buf = BytesMut::new();
        v5::Codec::new(MAX_INBOUND, 0)
            .encode(packet, &mut buf)
            .expect("encode");
        buf
    }

    /// What a reconnecting client needs from MQTT 5: session present, Receive Maximum, the
    /// Server Reference of a refusal or a DISCONNECT, and PUBACK reason codes.
    #[test]
    fn v5_acks_and_disconnects_carry_what_reconnecting_clients_need() {
        let mut wire = Wire::new(Protocol::V5);
        let mut buf = server_v5(v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
            session_present: true,
            receive_max: NonZeroU16::new(20).expect("non-zero"),
            ..Default::default()
        })));
        match wire.decode(&mut buf).expect("decode") {
            Some(Incoming::ConnAck {
                code: 0,
                session_present: true,
                receive_max: 20,
                server_reference: None,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        let mut buf = server_v5(v5::Packet::PublishAck(v5::PublishAck {
            packet_id: NonZeroU16::new(9).expect("non-zero"),
            reason_code: v5::PublishAckReason::NotAuthorized,
            ..Default::default()
        }));
        match wire.decode(&mut buf).expect("decode") {
            Some(Incoming::PubAck { packet_id, code }) => {
                assert_eq!(packet_id.get(), 9);
                assert_eq!(code, 0x87);
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut buf = server_v5(v5::Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::UseAnotherServer,
            server_reference: Some(ByteString::from("10.0.0.2:1883")),
            ..Default::default()
        }));
        match wire.decode(&mut buf).expect("decode") {
            Some(Incoming::Disconnect {
                code: 0x9C,
                server_reference: Some(r),
            }) => assert_eq!(r, "10.0.0.2:1883"),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// CONNECT carries clean start and session expiry; a resend carries DUP.
    #[test]
    fn connect_options_and_dup_reach_the_wire() {
        let mut wire = Wire::new(Protocol::V5);
        let mut buf = BytesMut::new();
        wire.connect_with(
            "c1",
            ConnectOptions {
                clean_start: false,
                keep_alive: 30,
                session_expiry: 300,
            },
            &mut buf,
        )
        .expect("encode");
        let topic = ByteString::from("t");
        let id = NonZeroU16::new(3).expect("non-zero");
        wire.publish_dup(
            &topic,
            QoS::AtLeastOnce,
            Some(id),
            Bytes::from_static(b"x"),
            true,
            &mut buf,
        )
        .expect("encode");
        let mut server = v5::Codec::new(MAX_INBOUND, 0);
        match server.decode(&mut buf).expect("decode") {
            Some((v5::Packet::Connect(c), _)) => {
                assert!(!c.clean_start);
                assert_eq!(c.keep_alive, 30);
                assert_eq!(c.session_expiry_interval_secs, 300);
                assert_eq!(c.client_id, "c1");
            }
            other => panic!("unexpected {other:?}"),
        }
        match server.decode(&mut buf).expect("decode") {
            Some((v5::Packet::Publish(p), _)) => assert!(p.dup),
            other => panic!("unexpected {other:?}"),
        }
    }
}
