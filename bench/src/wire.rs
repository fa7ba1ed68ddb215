//! Client-side MQTT framing on top of `rmqtt-codec` (the codec the broker uses): the rest of the
//! generator talks in a handful of packet kinds and never cares whether the wire is 3.1.1 or 5.0.

use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::types::{Protocol as CodecProtocol, Publish};
use rmqtt_codec::{v3, v5, MqttCodec, MqttPacket};
use tokio_util::codec::{Decoder, Encoder};

pub use rmqtt_codec::types::QoS;

use crate::error::{BenchError, Result};

/// Largest packet we accept from a broker; payloads in benchmarks are far smaller.
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
    /// Maps the CLI's `--protocol 4|5` to a protocol level.
    pub fn from_level(level: u8) -> Result<Self> {
        match level {
            4 => Ok(Protocol::V311),
            5 => Ok(Protocol::V5),
            other => Err(BenchError::Config(format!(
                "unsupported protocol level {other}, use 4 or 5"
            ))),
        }
    }
}

/// Maps `--qos 0|1|2` to the codec's QoS type.
pub fn qos_from_level(level: u8) -> Result<QoS> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => Err(BenchError::Config(format!(
            "unsupported QoS {other}, use 0, 1 or 2"
        ))),
    }
}

/// The server-to-client packets the generator reacts to, independent of protocol version.
#[derive(Debug)]
pub enum Incoming {
    /// CONNACK; `code` is 0 when accepted.
    ConnAck {
        /// Return/reason code (0 = success).
        code: u8,
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
    PubAck(NonZeroU16),
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
    /// The broker is closing the connection.
    Disconnect,
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
        let id = ByteString::from(client_id);
        let id5 = id.clone();
        self.put(
            || {
                v3::Packet::Connect(Box::new(v3::Connect {
                    protocol: CodecProtocol(rmqtt_codec::types::MQTT_LEVEL_311),
                    clean_session: true,
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
                    clean_start: true,
                    keep_alive,
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
    pub fn publish(
        &mut self,
        topic: &ByteString,
        qos: QoS,
        packet_id: Option<NonZeroU16>,
        payload: Bytes,
        dst: &mut BytesMut,
    ) -> Result<()> {
        let publish = Publish {
            dup: false,
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
        self.put(
            || v3::Packet::Disconnect,
            || v5::Packet::Disconnect(v5::Disconnect::default()),
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
        },
        v3::Packet::Publish(p) => Incoming::Publish {
            qos: p.qos,
            packet_id: p.packet_id,
            payload: p.payload,
        },
        v3::Packet::PublishAck { packet_id } => Incoming::PubAck(packet_id),
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
        v3::Packet::Disconnect => Incoming::Disconnect,
        _ => Incoming::Other,
    }
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnectAck(ack) => Incoming::ConnAck {
            code: ack.reason_code as u8,
        },
        v5::Packet::Publish(p) => Incoming::Publish {
            qos: p.qos,
            packet_id: p.packet_id,
            payload: p.payload,
        },
        v5::Packet::PublishAck(a) => Incoming::PubAck(a.packet_id),
        v5::Packet::PublishReceived(a) => Incoming::PubRec(a.packet_id),
        v5::Packet::PublishRelease(a) => Incoming::PubRel(a.packet_id),
        v5::Packet::PublishComplete(a) => Incoming::PubComp(a.packet_id),
        v5::Packet::SubscribeAck(a) => Incoming::SubAck {
            packet_id: a.packet_id,
            granted: a.status.iter().all(|s| (*s as u8) < 0x80),
        },
        v5::Packet::PingResponse => Incoming::PingResp,
        v5::Packet::Disconnect(_) => Incoming::Disconnect,
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
}
