//! One MQTT client connection: owns the socket, the read and write buffers and the codec, and
//! offers the handful of blocking-style steps (connect, subscribe, read, flush, close) that the
//! benchmark's publishers, subscribers and idle connections and the live-load clients are built
//! from. Buffers are reused for the connection's life; callers encode with
//! `client.wire.publish(…, &mut client.wbuf)` and decode with [`Client::try_packet`].

use std::num::NonZeroU16;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::error::{ClientError, Result};
use crate::wire::{ConnectOptions, Incoming, Protocol, QoS, Wire};

/// What a successful CONNACK said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// The broker still had the session (CONNACK session present = 1).
    pub session_present: bool,
    /// MQTT 5 Receive Maximum: how many QoS ≥ 1 publishes may be in flight.
    pub receive_max: u16,
}

/// A client connection to a broker.
#[derive(Debug)]
pub struct Client {
    addr: String,
    stream: TcpStream,
    /// How much to grow the read buffer by; small for idle connections, larger for subscribers.
    read_chunk: usize,
    /// Bytes read from the socket not yet decoded.
    pub rbuf: BytesMut,
    /// Encoded packets not yet written; flushed by [`Client::flush`].
    pub wbuf: BytesMut,
    /// Codec for this connection.
    pub wire: Wire,
}

impl Client {
    /// Opens TCP, sends a clean-session CONNECT and waits for a successful CONNACK, each step
    /// within `deadline`.
    pub async fn open(
        addr: &str,
        protocol: Protocol,
        client_id: &str,
        keep_alive: u16,
        read_capacity: usize,
        deadline: Duration,
    ) -> Result<Self> {
        let mut client = Client::tcp(addr, protocol, read_capacity, deadline).await?;
        client
            .handshake(client_id, ConnectOptions::clean(keep_alive), deadline)
            .await?;
        Ok(client)
    }

    /// Opens the TCP connection (with Nagle off) within `deadline`; nothing is sent yet.
    pub async fn tcp(
        addr: &str,
        protocol: Protocol,
        read_capacity: usize,
        deadline: Duration,
    ) -> Result<Self> {
        let stream = timeout(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("TCP connect"))?
            .map_err(|source| ClientError::Io {
                addr: addr.to_string(),
                source,
            })?;
        // Clients measure the broker's latency, not Nagle's.
        stream.set_nodelay(true).map_err(|source| ClientError::Io {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Client {
            addr: addr.to_string(),
            stream,
            read_chunk: read_capacity.max(16),
            rbuf: BytesMut::with_capacity(read_capacity),
            wbuf: BytesMut::with_capacity(128),
            wire: Wire::new(protocol),
        })
    }

    /// The broker address this client connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends CONNECT with `options` and waits (within `deadline`) for a successful CONNACK. A
    /// refusal is [`ClientError::ConnectRefused`] (with the Server Reference, if any); a
    /// DISCONNECT or anything else first is [`ClientError::Protocol`].
    pub async fn handshake(
        &mut self,
        client_id: &str,
        options: ConnectOptions,
        deadline: Duration,
    ) -> Result<ConnAck> {
        self.wire.connect_with(client_id, options, &mut self.wbuf)?;
        self.flush().await?;
        let ack = timeout(deadline, self.next_packet())
            .await
            .map_err(|_| ClientError::Timeout("CONNACK"))??;
        match ack {
            Incoming::ConnAck {
                code: 0,
                session_present,
                receive_max,
                ..
            } => Ok(ConnAck {
                session_present,
                receive_max,
            }),
            Incoming::ConnAck {
                code,
                server_reference,
                ..
            } => Err(ClientError::ConnectRefused {
                code,
                server_reference,
            }),
            Incoming::Disconnect { code, .. } => Err(ClientError::Protocol(format!(
                "DISCONNECT 0x{code:02x} instead of CONNACK"
            ))),
            other => Err(ClientError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    /// Subscribes to one filter and waits for the SUBACK, which must come next.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, deadline: Duration) -> Result<()> {
        let packet_id = NonZeroU16::MIN;
        self.wire
            .subscribe(packet_id, filter, qos, &mut self.wbuf)?;
        self.flush().await?;
        let ack = timeout(deadline, self.next_packet())
            .await
            .map_err(|_| ClientError::Timeout("SUBACK"))??;
        match ack {
            Incoming::SubAck { granted: true, .. } => Ok(()),
            Incoming::SubAck { granted: false, .. } => {
                Err(ClientError::SubscribeRefused(filter.to_string()))
            }
            other => Err(ClientError::Protocol(format!(
                "expected SUBACK, got {other:?}"
            ))),
        }
    }

    /// Reads whatever the socket has into the read buffer; errors with `Closed` at EOF.
    /// Cancel-safe, so it can sit in a `select!`.
    pub async fn read_more(&mut self) -> Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_chunk / 4 + 1 {
            self.rbuf.reserve(self.read_chunk);
        }
        let n = self
            .stream
            .read_buf(&mut self.rbuf)
            .await
            .map_err(|source| ClientError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        Ok(n)
    }

    /// Decodes the next buffered packet without touching the socket.
    pub fn try_packet(&mut self) -> Result<Option<Incoming>> {
        self.wire.decode(&mut self.rbuf)
    }

    /// Reads until one whole packet is available and returns it.
    pub async fn next_packet(&mut self) -> Result<Incoming> {
        loop {
            if let Some(p) = self.try_packet()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Writes out everything in the write buffer.
    pub async fn flush(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|source| ClientError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        self.wbuf.clear();
        Ok(())
    }

    /// Sends DISCONNECT and shuts the socket down; errors are ignored because the run is over.
    pub async fn close(self) {
        self.close_with_expiry(None, None).await
    }

    /// Like [`Client::close`], with the DISCONNECT's session expiry (MQTT 5; `Some(0)`: the
    /// broker forgets the session) and an optional bound on writing it.
    pub async fn close_with_expiry(mut self, session_expiry: Option<u32>, limit: Option<Duration>) {
        if self
            .wire
            .disconnect_with_expiry(session_expiry, &mut self.wbuf)
            .is_ok()
        {
            match limit {
                Some(limit) => {
                    let _ = timeout(limit, self.flush()).await;
                }
                None => {
                    let _ = self.flush().await;
                }
            }
        }
        let _ = self.stream.shutdown().await;
    }
}
