//! Byte-exact MQTT for tests that must send what a codec would refuse to build (invalid UTF-8,
//! wrong flags, hostile lengths): packet builders ([`pkt`]) and whole packets split off a byte
//! stream ([`take_packet`]) with only the fixed header parsed. Well-formed traffic goes through
//! [`crate::wire`] instead.

use bytes::{Buf, BytesMut};

use crate::wire::Protocol;

/// Hand-built packets.
pub mod pkt {
    use crate::wire::Protocol;

    /// CONNECT
    pub const CONNECT: u8 = 1;
    /// CONNACK
    pub const CONNACK: u8 = 2;
    /// PUBLISH
    pub const PUBLISH: u8 = 3;
    /// PUBACK
    pub const PUBACK: u8 = 4;
    /// PUBREC
    pub const PUBREC: u8 = 5;
    /// PUBREL
    pub const PUBREL: u8 = 6;
    /// PUBCOMP
    pub const PUBCOMP: u8 = 7;
    /// SUBACK
    pub const SUBACK: u8 = 9;
    /// PINGRESP
    pub const PINGRESP: u8 = 13;
    /// DISCONNECT
    pub const DISCONNECT: u8 = 14;

    /// Variable byte integer [MQTT-1.5.5].
    pub fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    /// A length-prefixed string or binary field, bytes taken as given (may be invalid UTF-8).
    pub fn field(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// Fixed header + remaining length + body.
    pub fn frame(header: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![header];
        varint(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    /// A property block (MQTT 5): length + raw property bytes.
    pub fn props(raw: &[u8], out: &mut Vec<u8>) {
        varint(raw.len(), out);
        out.extend_from_slice(raw);
    }

    /// CONNECT with clean start, keep alive 60 and raw MQTT 5 properties.
    pub fn connect_with(v: Protocol, client_id: &[u8], properties: &[u8]) -> Vec<u8> {
        connect_keep_alive(v, client_id, 60, properties)
    }

    /// CONNECT with clean start, the given keep alive (seconds) and raw MQTT 5 properties.
    pub fn connect_keep_alive(
        v: Protocol,
        client_id: &[u8],
        keep_alive: u16,
        properties: &[u8],
    ) -> Vec<u8> {
        let mut b = Vec::new();
        field(b"MQTT", &mut b);
        b.extend_from_slice(&[v.level(), 0x02]);
        b.extend_from_slice(&keep_alive.to_be_bytes());
        if v == Protocol::V5 {
            props(properties, &mut b);
        }
        field(client_id, &mut b);
        frame(0x10, &b)
    }

    /// CONNECT with clean start and keep alive 60.
    pub fn connect(v: Protocol, client_id: &str) -> Vec<u8> {
        connect_with(v, client_id.as_bytes(), &[])
    }

    /// PUBLISH with the topic bytes taken as given.
    pub fn publish(v: Protocol, topic: &[u8], qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
        publish_with(v, topic, qos, packet_id, &[], payload)
    }

    /// PUBLISH with raw MQTT 5 properties.
    pub fn publish_with(
        v: Protocol,
        topic: &[u8],
        qos: u8,
        packet_id: u16,
        properties: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = Vec::new();
        field(topic, &mut b);
        if qos > 0 {
            b.extend_from_slice(&packet_id.to_be_bytes());
        }
        if v == Protocol::V5 {
            props(properties, &mut b);
        }
        b.extend_from_slice(payload);
        frame(0x30 | (qos << 1), &b)
    }

    /// SUBSCRIBE to one filter.
    pub fn subscribe(v: Protocol, packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
        let mut b = packet_id.to_be_bytes().to_vec();
        if v == Protocol::V5 {
            b.push(0);
        }
        field(filter.as_bytes(), &mut b);
        b.push(qos);
        frame(0x82, &b)
    }

    /// PUBACK (success).
    pub fn puback(packet_id: u16) -> Vec<u8> {
        frame(0x40, &packet_id.to_be_bytes())
    }

    /// PUBREL (success).
    pub fn pubrel(packet_id: u16) -> Vec<u8> {
        frame(0x62, &packet_id.to_be_bytes())
    }

    /// PINGREQ.
    pub fn pingreq() -> Vec<u8> {
        vec![0xC0, 0]
    }

    /// DISCONNECT, normal.
    pub fn disconnect() -> Vec<u8> {
        vec![0xE0, 0]
    }
}

/// One packet read off the wire.
#[derive(Debug, Clone)]
pub struct Packet {
    /// First byte: type and flags.
    pub header: u8,
    /// Everything after the remaining length.
    pub body: Vec<u8>,
}

/// A PUBLISH's topic (lossy UTF-8), packet id (QoS > 0) and payload.
pub type PublishParts = (String, Option<u16>, Vec<u8>);

impl Packet {
    /// Packet type (upper four bits).
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }

    /// CONNACK return/reason code, or MQTT 5 DISCONNECT reason code (0 when omitted).
    pub fn reason(&self) -> u8 {
        match self.kind() {
            pkt::CONNACK => self.body.get(1).copied().unwrap_or(0),
            _ => self.body.first().copied().unwrap_or(0),
        }
    }

    /// The topic, packet id and payload of a whole PUBLISH; `None` for any other packet or a
    /// body cut short.
    pub fn parse_publish(&self, v: Protocol) -> Option<PublishParts> {
        if self.kind() != pkt::PUBLISH {
            return None;
        }
        let mut b = &self.body[..];
        if b.len() < 2 {
            return None;
        }
        let len = usize::from(b.get_u16());
        let topic = String::from_utf8_lossy(b.get(..len)?).into_owned();
        b.advance(len);
        let id = if self.header & 0x06 != 0 {
            if b.len() < 2 {
                return None;
            }
            Some(b.get_u16())
        } else {
            None
        };
        if v == Protocol::V5 {
            let (n, used) = read_varint(b)?;
            b = b.get(used + n..)?;
        }
        Some((topic, id, b.to_vec()))
    }

    /// Like [`Packet::parse_publish`], as a test assertion: panics unless this is a whole
    /// PUBLISH.
    pub fn publish(&self, v: Protocol) -> PublishParts {
        match self.parse_publish(v) {
            Some(parts) => parts,
            None => panic!("not a whole PUBLISH: {self:?}"),
        }
    }
}

/// A variable byte integer at the start of `b`: its value and how many bytes it took; `None`
/// when `b` ends first.
pub fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let (mut n, mut mult) = (0usize, 1usize);
    for (i, byte) in b.iter().enumerate().take(4) {
        n += usize::from(byte & 0x7f) * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

/// Splits the next whole packet off the front of `buf`, or `None` (leaving `buf` as it is)
/// while it holds only part of one.
pub fn take_packet(buf: &mut BytesMut) -> Option<Packet> {
    let (len, used) = read_varint(buf.get(1..)?)?;
    if buf.len() < 1 + used + len {
        return None;
    }
    let header = buf[0];
    buf.advance(1 + used);
    let body = buf.split_to(len).to_vec();
    Some(Packet { header, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_split_back_whole_and_only_whole() {
        for v in Protocol::BOTH {
            let mut stream = BytesMut::new();
            stream.extend_from_slice(&pkt::publish(v, b"a/b", 1, 7, &[9; 300]));
            stream.extend_from_slice(&pkt::pingreq());
            let total = stream.len();
            let mut partial = BytesMut::from(&stream[..total - 1]);
            let first = take_packet(&mut partial).expect("the PUBLISH is whole");
            assert_eq!(first.publish(v), ("a/b".into(), Some(7), vec![9; 300]));
            assert!(take_packet(&mut partial).is_none(), "PINGREQ is cut short");
            let mut whole = stream.clone();
            take_packet(&mut whole).expect("PUBLISH");
            assert_eq!(take_packet(&mut whole).map(|p| p.header), Some(0xC0));
            assert!(whole.is_empty());
        }
    }

    #[test]
    fn truncated_publishes_parse_as_none() {
        let p = Packet {
            header: 0x32,
            body: vec![0, 5, b'a'],
        };
        assert!(p.parse_publish(Protocol::V311).is_none());
        assert!(read_varint(&[0x80, 0x80]).is_none());
        assert_eq!(read_varint(&[0xC1, 0x02]), Some((321, 2)));
    }
}
