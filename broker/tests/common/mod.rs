//! Shared pieces of the broker's integration tests: an in-process broker on ephemeral
//! 127.0.0.1 ports, deadlines for every wait, a tiny raw MQTT client for hand-built packets,
//! thin wrappers around rumqttc's v3 and v5 clients, and the bystander that proves the broker
//! keeps serving everyone else.
// Each test binary uses a different part of this module; `next` hands unwanted packets back
// by value in `Err`, which is fine for a test client.
#![allow(dead_code, clippy::result_large_err)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use corvid_broker::server::Running;
use corvid_broker::Config;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single wait may take; generous, because the test machine is shared and slow.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `cond` until it holds, failing the test with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A configuration with every listener and the admin port on an ephemeral 127.0.0.1 port.
pub fn config() -> Config {
    let mut cfg = Config::default();
    let any = "127.0.0.1:0".parse().expect("address");
    cfg.listeners.mqtt.bind = any;
    cfg.listeners.ws.bind = any;
    cfg.listeners.mqtts.bind = any;
    cfg.listeners.wss.bind = any;
    cfg.admin.bind = any;
    cfg
}

/// Starts a broker with [`config`].
pub async fn start() -> Running {
    start_with(config()).await
}

/// Starts a broker with `cfg`.
pub async fn start_with(cfg: Config) -> Running {
    corvid_broker::server::start(cfg)
        .await
        .expect("broker starts")
}

/// Stops a broker, giving clients a moment to go.
pub async fn stop(running: Running) {
    running.shutdown(Duration::from_secs(5)).await;
}

/// The plain MQTT listener's address.
pub fn mqtt(running: &Running) -> SocketAddr {
    running.addr("mqtt").expect("mqtt listener")
}

/// Protocol level in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.0.
    V5,
}

impl V {
    /// Both versions, for tests that run once per version.
    pub const BOTH: [V; 2] = [V::V311, V::V5];

    fn level(self) -> u8 {
        match self {
            V::V311 => 4,
            V::V5 => 5,
        }
    }
}

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

/// A client that stays connected through a bad-input case and must still be served after it.
pub struct Bystander {
    raw: Raw,
    topic: String,
    next_id: u16,
}

impl Bystander {
    /// Connects an MQTT 5 client subscribed at QoS 1 to its own topic.
    pub async fn connect(addr: SocketAddr, name: &str) -> Bystander {
        let mut raw = Raw::connect(addr, V::V5, name).await;
        let topic = format!("bystander/{name}");
        assert_eq!(raw.subscribe(1, &topic, 1).await, 1);
        Bystander {
            raw,
            topic,
            next_id: 1,
        }
    }

    /// Publishes at QoS 1 to its own topic and asserts both the PUBACK and the delivery.
    pub async fn assert_served(&mut self) {
        self.next_id += 1;
        let payload = format!("still here {}", self.next_id);
        let publish = pkt::publish(
            V::V5,
            self.topic.as_bytes(),
            1,
            self.next_id,
            payload.as_bytes(),
        );
        self.raw.send(&publish).await;
        let (mut acked, mut got) = (false, false);
        while !(acked && got) {
            let p = self.raw.recv().await.expect("bystander was disconnected");
            match p.kind() {
                pkt::PUBACK => acked = true,
                pkt::PUBLISH => {
                    let (topic, id, body) = p.publish(V::V5);
                    assert_eq!(
                        (topic.as_str(), body),
                        (self.topic.as_str(), payload.clone().into_bytes())
                    );
                    self.raw.send(&pkt::puback(id.expect("QoS 1"))).await;
                    got = true;
                }
                _ => panic!("bystander got unexpected {p:?}"),
            }
        }
    }
}

/// Asserts the broker serves an existing bystander and a brand-new client.
pub async fn assert_serving(addr: SocketAddr, bystander: &mut Bystander) {
    bystander.assert_served().await;
    let mut fresh = Bystander::connect(addr, &format!("fresh-{:08x}", fastrand::u32(..))).await;
    fresh.assert_served().await;
}

/// `GET path` on the admin port; returns status and body.
pub async fn http_get(admin: SocketAddr, path: &str) -> (u16, String) {
    within("admin HTTP request", async {
        let mut s = TcpStream::connect(admin).await.expect("admin connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("admin write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("admin read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("HTTP status line");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
    .await
}

/// rumqttc's MQTT 3.1.1 client, driven by a task that forwards its events and stops (instead
/// of reconnecting) at the first connection error.
pub mod v3 {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::time::Duration;

    use rumqttc::{
        AsyncClient, ConnAck, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
    };
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::within;

    /// Options for `client_id` at `addr`, keep alive 30 s.
    pub fn options(addr: SocketAddr, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// A connected client.
    pub struct Client {
        /// The rumqttc handle.
        pub client: AsyncClient,
        events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        pending: VecDeque<Publish>,
        task: JoinHandle<()>,
    }

    /// Connects and returns the client with its CONNACK.
    pub async fn connect(opts: MqttOptions) -> (Client, ConnAck) {
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let r = eventloop.poll().await;
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut c = Client {
            client,
            events,
            pending: VecDeque::new(),
            task,
        };
        let ack = c
            .next("CONNACK", |p| match p {
                Packet::ConnAck(a) => Ok(a),
                p => Err(p),
            })
            .await;
        (c, ack)
    }

    /// Connects a clean-session client.
    pub async fn client(addr: SocketAddr, client_id: &str) -> Client {
        connect(options(addr, client_id)).await.0
    }

    impl Client {
        /// The next incoming packet `pick` accepts; PUBLISHes it passes over are kept for
        /// [`Client::next_publish`].
        pub async fn next<T>(
            &mut self,
            what: &str,
            mut pick: impl FnMut(Packet) -> Result<T, Packet>,
        ) -> T {
            within(what, async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(Event::Incoming(p))) => match pick(p) {
                            Ok(t) => return t,
                            Err(Packet::Publish(p)) => self.pending.push_back(p),
                            Err(_) => {}
                        },
                        Some(Ok(Event::Outgoing(_))) => {}
                        Some(Err(e)) => panic!("connection failed while waiting for {what}: {e}"),
                        None => panic!("connection closed while waiting for {what}"),
                    }
                }
            })
            .await
        }

        /// The next message delivered to this client.
        pub async fn next_publish(&mut self) -> Publish {
            if let Some(p) = self.pending.pop_front() {
                return p;
            }
            self.next("PUBLISH", |p| match p {
                Packet::Publish(p) => Ok(p),
                p => Err(p),
            })
            .await
        }

        /// The next `n` messages as (topic, payload, qos).
        pub async fn publishes(&mut self, n: usize) -> Vec<(String, String, QoS)> {
            let mut out = Vec::new();
            for _ in 0..n {
                let p = self.next_publish().await;
                out.push((
                    p.topic,
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.qos,
                ));
            }
            out
        }

        /// Subscribes and waits for the SUBACK; returns the granted QoS.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> QoS {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe queued");
            let code = self
                .next("SUBACK", |p| match p {
                    Packet::SubAck(a) => Ok(a.return_codes[0]),
                    p => Err(p),
                })
                .await;
            match code {
                rumqttc::SubscribeReasonCode::Success(q) => q,
                rumqttc::SubscribeReasonCode::Failure => panic!("subscription to {filter} refused"),
            }
        }

        /// Publishes and, for QoS 1 and 2, waits until the broker has acknowledged it.
        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &str) {
            self.client
                .publish(topic, qos, retain, payload.as_bytes().to_vec())
                .await
                .expect("publish queued");
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.next("PUBACK", |p| match p {
                        Packet::PubAck(_) => Ok(()),
                        p => Err(p),
                    })
                    .await
                }
                QoS::ExactlyOnce => {
                    self.next("PUBCOMP", |p| match p {
                        Packet::PubComp(_) => Ok(()),
                        p => Err(p),
                    })
                    .await
                }
            }
        }

        /// Sends DISCONNECT and waits until the broker has closed the connection.
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("disconnect queued");
            within("close after DISCONNECT", async {
                while let Some(Ok(_)) = self.events.recv().await {}
            })
            .await;
            self.task.abort();
        }

        /// Drops the connection without DISCONNECT, like a client that lost its network.
        pub async fn kill(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

/// rumqttc's MQTT 5 client, driven like [`v3`].
pub mod v5 {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::time::Duration;

    use rumqttc::v5::mqttbytes::v5::{
        ConnAck, Packet, Publish, PublishProperties, SubscribeReasonCode,
    };
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::within;

    /// Options for `client_id` at `addr`, keep alive 30 s.
    pub fn options(addr: SocketAddr, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// A connected client.
    pub struct Client {
        /// The rumqttc handle.
        pub client: AsyncClient,
        events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        pending: VecDeque<Publish>,
        task: JoinHandle<()>,
    }

    /// Connects and returns the client with its CONNACK.
    pub async fn connect(opts: MqttOptions) -> (Client, ConnAck) {
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let r = eventloop.poll().await;
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut c = Client {
            client,
            events,
            pending: VecDeque::new(),
            task,
        };
        let ack = c
            .next("CONNACK", |p| match p {
                Packet::ConnAck(a) => Ok(a),
                p => Err(p),
            })
            .await;
        (c, ack)
    }

    /// Connects a clean-start client.
    pub async fn client(addr: SocketAddr, client_id: &str) -> Client {
        connect(options(addr, client_id)).await.0
    }

    impl Client {
        /// The next incoming packet `pick` accepts; PUBLISHes it passes over are kept for
        /// [`Client::next_publish`].
        pub async fn next<T>(
            &mut self,
            what: &str,
            mut pick: impl FnMut(Packet) -> Result<T, Packet>,
        ) -> T {
            within(what, async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(Event::Incoming(p))) => match pick(p) {
                            Ok(t) => return t,
                            Err(Packet::Publish(p)) => self.pending.push_back(p),
                            Err(_) => {}
                        },
                        Some(Ok(Event::Outgoing(_))) => {}
                        Some(Err(e)) => panic!("connection failed while waiting for {what}: {e}"),
                        None => panic!("connection closed while waiting for {what}"),
                    }
                }
            })
            .await
        }

        /// The next message delivered to this client.
        pub async fn next_publish(&mut self) -> Publish {
            if let Some(p) = self.pending.pop_front() {
                return p;
            }
            self.next("PUBLISH", |p| match p {
                Packet::Publish(p) => Ok(p),
                p => Err(p),
            })
            .await
        }

        /// The next `n` messages as (topic, payload, qos).
        pub async fn publishes(&mut self, n: usize) -> Vec<(String, String, QoS)> {
            let mut out = Vec::new();
            for _ in 0..n {
                let p = self.next_publish().await;
                out.push((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.qos,
                ));
            }
            out
        }

        /// Subscribes and waits for the SUBACK; returns the granted QoS.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> QoS {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe queued");
            let code = self
                .next("SUBACK", |p| match p {
                    Packet::SubAck(a) => Ok(a.return_codes[0]),
                    p => Err(p),
                })
                .await;
            match code {
                SubscribeReasonCode::Success(q) => q,
                other => panic!("subscription to {filter} refused: {other:?}"),
            }
        }

        /// Publishes (with `props`, if any) and, for QoS 1 and 2, waits until the broker has
        /// acknowledged it.
        pub async fn publish_with(
            &mut self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: &str,
            props: Option<PublishProperties>,
        ) {
            let payload = payload.as_bytes().to_vec();
            match props {
                Some(p) => {
                    self.client
                        .publish_with_properties(topic, qos, retain, payload, p)
                        .await
                }
                None => self.client.publish(topic, qos, retain, payload).await,
            }
            .expect("publish queued");
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.next("PUBACK", |p| match p {
                        Packet::PubAck(_) => Ok(()),
                        p => Err(p),
                    })
                    .await
                }
                QoS::ExactlyOnce => {
                    self.next("PUBCOMP", |p| match p {
                        Packet::PubComp(_) => Ok(()),
                        p => Err(p),
                    })
                    .await
                }
            }
        }

        /// Publishes and, for QoS 1 and 2, waits until the broker has acknowledged it.
        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &str) {
            self.publish_with(topic, qos, retain, payload, None).await
        }

        /// Sends DISCONNECT and waits until the broker has closed the connection.
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("disconnect queued");
            within("close after DISCONNECT", async {
                while let Some(Ok(_)) = self.events.recv().await {}
            })
            .await;
            self.task.abort();
        }

        /// Drops the connection without DISCONNECT, like a client that lost its network.
        pub async fn kill(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

/// A throwaway PKI: a CA and server certificates for `localhost`/127.0.0.1, written as PEM
/// files in a temporary directory for `cfg.tls`, and a rustls client that trusts the CA.
pub mod tls {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use tempfile::TempDir;
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};
    use tokio_rustls::TlsConnector;

    use super::within;

    /// CA, current server certificate files, and the directory holding them.
    pub struct Pki {
        dir: TempDir,
        ca: CertifiedIssuer<'static, KeyPair>,
        /// Server certificate chain file.
        pub cert_file: PathBuf,
        /// Server private key file.
        pub key_file: PathBuf,
    }

    impl Pki {
        /// A new CA and a first server certificate named `first`.
        pub fn new(first: &str) -> (Pki, CertificateDer<'static>) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "corvid test CA");
            let key = KeyPair::generate().expect("CA key");
            let ca = CertifiedIssuer::self_signed(params, key).expect("CA cert");
            let pki = Pki {
                cert_file: dir.path().join("tls.crt"),
                key_file: dir.path().join("tls.key"),
                dir,
                ca,
            };
            let der = pki.issue(first);
            (pki, der)
        }

        /// Issues a server certificate with common name `name` and replaces the files with it
        /// (each written aside and renamed, as a Secret volume update would). Returns its DER.
        pub fn issue(&self, name: &str) -> CertificateDer<'static> {
            let mut params =
                CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                    .expect("server params");
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().expect("server key");
            let cert = params.signed_by(&key, &self.ca).expect("server cert");
            let write = |path: &PathBuf, pem: String| {
                let tmp = self.dir.path().join(format!("{name}.tmp"));
                std::fs::write(&tmp, pem).expect("write PEM");
                std::fs::rename(&tmp, path).expect("rename PEM");
            };
            write(&self.key_file, key.serialize_pem());
            write(&self.cert_file, cert.pem() + &self.ca.pem());
            cert.der().clone()
        }

        /// A client configuration trusting only this CA.
        pub fn client_config(&self) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der().clone()).expect("CA root");
            let provider = Arc::new(crypto::ring::default_provider());
            let cfg = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(cfg)
        }

        /// Opens a TLS connection to `addr` and returns it with the certificate it was shown.
        pub async fn connect(
            &self,
            addr: SocketAddr,
        ) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
            within("TLS handshake", async {
                let tcp = TcpStream::connect(addr).await.expect("TCP connect");
                let name = ServerName::try_from("localhost").expect("server name");
                let tls = TlsConnector::from(self.client_config())
                    .connect(name, tcp)
                    .await
                    .expect("TLS handshake");
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .expect("server certificate")[0]
                    .clone()
                    .into_owned();
                (tls, cert)
            })
            .await
        }
    }
}
