//! A client byte stream, whatever carries it (TCP, TLS, WebSocket, WebSocket over TLS), with
//! the two operations the connection task needs: read more bytes, write a batch.

use std::io;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

/// Any async byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The stream under a connection.
pub enum Transport {
    /// Plain TCP: read buffers are only allocated once the socket is readable, so an idle
    /// connection holds no buffer.
    Tcp(tokio::net::TcpStream),
    /// TLS (or anything else that is a byte stream).
    Stream(Box<dyn Io>),
    /// WebSocket (binary frames carry MQTT bytes) over TCP or TLS.
    Ws(Box<WebSocketStream<Box<dyn Io>>>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp(_) => "Transport::Tcp",
            Transport::Stream(_) => "Transport::Stream",
            Transport::Ws(_) => "Transport::Ws",
        })
    }
}

/// Bytes read per call when the buffer is empty.
const READ_CHUNK: usize = 4096;

thread_local! {
    /// Per-worker buffer for the first read of a connection that holds no buffer.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

impl Transport {
    /// Reads more bytes into `buf`; `Ok(0)` means the peer closed. Cancel-safe.
    pub async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => loop {
                // `poll_read_ready`, not `readable()`: the latter's future is ~150 bytes that
                // every idle connection's task would carry.
                std::future::poll_fn(|cx| s.poll_read_ready(cx)).await?;
                let got = if buf.capacity() == 0 {
                    // An idle connection has no buffer: read into this worker's scratch and
                    // keep only the bytes read (a CONNECT or PINGREQ is a few dozen), so a
                    // burst of handshakes leaves no 4 KB holes between long-lived objects.
                    SCRATCH.with_borrow_mut(|scratch| {
                        let r = s.try_read(scratch);
                        if let Ok(n) = r {
                            buf.extend_from_slice(&scratch[..n]);
                        }
                        r
                    })
                } else {
                    buf.reserve(READ_CHUNK);
                    s.try_read_buf(buf)
                };
                match got {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
            Transport::Stream(s) => {
                buf.reserve(READ_CHUNK);
                s.read_buf(buf).await
            }
            Transport::Ws(ws) => loop {
                match ws.next().await {
                    None => return Ok(0),
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    Some(Ok(WsMessage::Binary(b))) => {
                        if b.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(WsMessage::Close(_))) => return Ok(0),
                    Some(Ok(WsMessage::Text(_))) => {
                        // MQTT over WebSocket must use binary frames [MQTT-6.0.0-1].
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text WebSocket frame",
                        ));
                    }
                    Some(Ok(_)) => continue, // ping/pong are answered by tungstenite
                }
            },
        }
    }

    /// Writes all of `data` and flushes.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.write_all(data).await,
            Transport::Stream(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Transport::Ws(ws) => ws
                .send(WsMessage::Binary(bytes::Bytes::copy_from_slice(data)))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Closes our side, then reads and discards up to `max` bytes until the peer closes, so
    /// unread input does not turn the close into a reset that loses our last packet. The
    /// caller bounds the time.
    pub async fn linger_close(&mut self, max: u64) {
        if let Transport::Tcp(s) = self {
            let _ = s.shutdown().await;
            let mut scratch = vec![0u8; 16 * 1024];
            let mut seen = 0u64;
            while seen < max {
                match s.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen += n as u64,
                }
            }
            return;
        }
        self.close().await;
    }

    /// Closes the stream politely (TLS close_notify, WebSocket close frame).
    pub async fn close(&mut self) {
        match self {
            Transport::Tcp(s) => {
                let _ = s.shutdown().await;
            }
            Transport::Stream(s) => {
                let _ = s.shutdown().await;
            }
            Transport::Ws(ws) => {
                let _ = ws.close().await;
            }
        }
    }
}
