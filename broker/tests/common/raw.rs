//! The raw client: hand-built packets (`corvid_testkit::raw::pkt`), whole packets read back off
//! the wire (`corvid_testkit::raw::take_packet`), each read under the shared deadline.

use std::net::SocketAddr;

use bytes::BytesMut;
pub use corvid_testkit::raw::{pkt, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{within, V};

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
            if let Some(p) = corvid_testkit::raw::take_packet(&mut self.buf) {
                return Some(p);
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
