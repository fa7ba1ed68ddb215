//! One MQTT client connection: owns the socket, the read and write buffers and the codec, and
//! offers the handful of blocking-style steps (connect, subscribe, read, flush) the publisher,
//! subscriber and idle-connection tasks are built from.

use std::num::NonZeroU16;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::error::{BenchError, Result};
use crate::wire::{Incoming, Protocol, QoS, Wire};

/// A connected, CONNACKed MQTT client.
#[derive(Debug)]
pub struct Connection {
    addr: String,
    stream: TcpStream,
    /// How much to grow the read buffer by; small for idle connections, larger for subscribers.
    read_chunk: usize,
    /// Bytes read from the socket not yet decoded.
    pub rbuf: BytesMut,
    /// Encoded packets not yet written; flushed by [`Connection::flush`].
    pub wbuf: BytesMut,
    /// Codec for this connection.
    pub wire: Wire,
}

impl Connection {
    /// Opens TCP, sends CONNECT and waits for a successful CONNACK, all within `deadline`.
    pub async fn open(
        addr: &str,
        protocol: Protocol,
        client_id: &str,
        keep_alive: u16,
        read_capacity: usize,
        deadline: Duration,
    ) -> Result<Self> {
        let stream = timeout(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| BenchError::Timeout("TCP connect"))?
            .map_err(|source| BenchError::Io {
                addr: addr.to_string(),
                source,
            })?;
        // Benchmarks measure the broker's latency, not Nagle's.
        stream.set_nodelay(true).map_err(|source| BenchError::Io {
            addr: addr.to_string(),
            source,
        })?;
        let mut conn = Connection {
            addr: addr.to_string(),
            stream,
            read_chunk: read_capacity.max(16),
            rbuf: BytesMut::with_capacity(read_capacity),
            wbuf: BytesMut::with_capacity(128),
            wire: Wire::new(protocol),
        };
        conn.wire.connect(client_id, keep_alive, &mut conn.wbuf)?;
        conn.flush().await?;
        let ack = timeout(deadline, conn.next_packet())
            .await
            .map_err(|_| BenchError::Timeout("CONNACK"))??;
        match ack {
            Incoming::ConnAck { code: 0 } => Ok(conn),
            Incoming::ConnAck { code } => Err(BenchError::ConnectRefused(code)),
            other => Err(BenchError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    /// Subscribes to one filter and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, deadline: Duration) -> Result<()> {
        let packet_id = NonZeroU16::MIN;
        self.wire
            .subscribe(packet_id, filter, qos, &mut self.wbuf)?;
        self.flush().await?;
        let ack = timeout(deadline, self.next_packet())
            .await
            .map_err(|_| BenchError::Timeout("SUBACK"))??;
        match ack {
            Incoming::SubAck { granted: true, .. } => Ok(()),
            Incoming::SubAck { granted: false, .. } => {
                Err(BenchError::SubscribeRefused(filter.to_string()))
            }
            other => Err(BenchError::Protocol(format!(
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
            .map_err(|source| BenchError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        if n == 0 {
            return Err(BenchError::Closed);
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
            .map_err(|source| BenchError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        self.wbuf.clear();
        Ok(())
    }

    /// Sends DISCONNECT and shuts the socket down; errors are ignored because the run is over.
    pub async fn close(mut self) {
        if self.wire.disconnect(&mut self.wbuf).is_ok() {
            let _ = self.flush().await;
        }
        let _ = self.stream.shutdown().await;
    }
}
