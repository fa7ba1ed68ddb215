//! The raw client: hand-built packets (`pkt`), whole packets read back off the wire, each
//! read under the shared deadline.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{within, V};

/// Hand-built packets.
pub mod pkt {
    use super::V;

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
    pub fn connect_with(v: V, client_id: &[u8], properties: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        field(b"MQTT", &mut b);
        b.extend_from_slice(&[v.level(), 0x02, 0, 60]);
        if v == V::V5 {
            props(properties, &mut b);
        }
        field(client_id, &mut b);
        frame(0x10, &b)
    }

    /// CONNECT with clean start and keep alive 60.
    pub fn connect(v: V, client_id: &str) -> Vec<u8> {
        connect_with(v, client_id.as_bytes(), &[])
    }

    /// PUBLISH with the topic bytes taken as given.
    pub fn publish(v: V, topic: &[u8], qos: u8, packet_id: u16, payload: &[u8]) -> Vec<u8> {
        publish_with(v, topic, qos, packet_id, &[], payload)
    }

    /// PUBLISH with raw MQTT 5 properties.
    pub fn publish_with(
        v: V,
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
        if v == V::V5 {
            props(properties, &mut b);
        }
        b.extend_from_slice(payload);
        frame(0x30 | (qos << 1), &b)
    }

    /// SUBSCRIBE to one filter.
    pub fn subscribe(v: V, packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
        let mut b = packet_id.to_be_bytes().to_vec();
        if v == V::V5 {
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

impl Packet {
    /// Packet type (upper four bits).
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }

    /// CONNACK return/reason code, or MQTT 5 DISCONNECT reason code (0 when omitted).
    pub fn reason(&self) -> u8 {
        match self.kind() {
            pkt::CONNACK => self.body[1],
            _ => self.body.first().copied().unwrap_or(0),
        }
    }

    /// A PUBLISH's topic, packet id (QoS > 0) and payload.
    pub fn publish(&self, v: V) -> (String, Option<u16>, Vec<u8>) {
        assert_eq!(self.kind(), pkt::PUBLISH, "not a PUBLISH: {self:?}");
        let mut b = &self.body[..];
        let len = usize::from(b.get_u16());
        let topic = String::from_utf8_lossy(&b[..len]).into_owned();
        b.advance(len);
        let id = (self.header & 0x06 != 0).then(|| b.get_u16());
        if v == V::V5 {
            let (n, used) = read_varint(b);
            b.advance(used + n);
        }
        (topic, id, b.to_vec())
    }
}

fn read_varint(b: &[u8]) -> (usize, usize) {
    let (mut n, mut mult) = (0usize, 1usize);
    for (i, byte) in b.iter().enumerate() {
        n += usize::from(byte & 0x7f) * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            return (n, i + 1);
        }
    }
    panic!("truncated variable byte integer")
}

/// Any byte stream a raw client can run over (TCP, TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A minimal MQTT client over a raw stream: send exactly the bytes a test builds, read back
/// whole packets, each read under [`DEADLINE`].
pub struct Raw {
    io: Box<dyn Io>,
    buf: BytesMut,
    /// Protocol version, for parsing PUBLISH.
    pub v: V,
}

impl Raw {
    /// Opens a TCP connection; nothing is sent yet.
    pub async fn tcp(addr: SocketAddr, v: V) -> Raw {
        let s = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        s.set_nodelay(true).expect("nodelay");
        Raw::over(Box::new(s), v)
    }

    /// Wraps an already open stream.
    pub fn over(io: Box<dyn Io>, v: V) -> Raw {
        Raw {
            io,
            buf: BytesMut::new(),
            v,
        }
    }

    /// Connects with `client_id` and asserts a successful CONNACK.
    pub async fn connect(addr: SocketAddr, v: V, client_id: &str) -> Raw {
        let mut r = Raw::tcp(addr, v).await;
        r.handshake(client_id).await;
        r
    }

    /// Sends CONNECT on an open stream and asserts a successful CONNACK.
    pub async fn handshake(&mut self, client_id: &str) {
        self.send(&pkt::connect(self.v, client_id)).await;
        let ack = self.expect(pkt::CONNACK).await;
        assert_eq!(ack.reason(), 0, "CONNACK refused: {ack:?}");
    }

    /// Writes bytes; a write error is ignored (the broker may already have closed).
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = within("write", async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await;
    }

    /// The next packet, or `None` when the broker closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        within("a packet from the broker", self.recv_inner()).await
    }

    async fn recv_inner(&mut self) -> Option<Packet> {
        loop {
            if self.buf.len() >= 2 {
                let (len, used) = {
                    let b = &self.buf[1..];
                    let complete = b.iter().take(4).any(|x| x & 0x80 == 0);
                    if complete {
                        read_varint(b)
                    } else {
                        (usize::MAX, 0)
                    }
                };
                if len != usize::MAX && self.buf.len() >= 1 + used + len {
                    let header = self.buf[0];
                    self.buf.advance(1 + used);
                    let body = self.buf.split_to(len).to_vec();
                    return Some(Packet { header, body });
                }
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next packet, which must be of type `kind`.
    pub async fn expect(&mut self, kind: u8) -> Packet {
        match self.recv().await {
            Some(p) if p.kind() == kind => p,
            other => panic!("expected packet type {kind}, got {other:?}"),
        }
    }

    /// Reads until the broker closes the connection; returns what it sent before closing.
    pub async fn closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }

    /// Asserts the broker closes the connection, and for MQTT 5 that its last word was a
    /// DISCONNECT with `reason`. Other packets (acks of earlier packets) may come first.
    pub async fn expect_disconnect(&mut self, reason: u8) {
        self.expect_disconnect_in(&[reason]).await
    }

    /// Like [`Raw::expect_disconnect`], where the specification leaves a choice of reasons.
    pub async fn expect_disconnect_in(&mut self, reasons: &[u8]) {
        let seen = self.closed().await;
        if self.v == V::V5 {
            let last = seen.last();
            assert!(
                last.is_some_and(|p| p.kind() == pkt::DISCONNECT && reasons.contains(&p.reason())),
                "expected DISCONNECT with one of {reasons:02X?} before close, got {seen:?}"
            );
        } else {
            // 3.1.1 has no server DISCONNECT: the broker just closes.
            assert!(
                seen.iter().all(|p| p.kind() != pkt::DISCONNECT),
                "3.1.1 server sent DISCONNECT: {seen:?}"
            );
        }
    }

    /// Subscribes to one filter and returns the SUBACK code.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: u8) -> u8 {
        self.send(&pkt::subscribe(self.v, packet_id, filter, qos))
            .await;
        let ack = self.expect(pkt::SUBACK).await;
        *ack.body.last().expect("SUBACK code")
    }
}
