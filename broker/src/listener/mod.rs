//! Client listeners: accept loops for MQTT over TCP, TLS, WebSocket and WebSocket over TLS.
//!
//! The accept loop only accepts and counts; everything that can stall (PROXY header, TLS and
//! WebSocket handshakes) runs in the connection's own task under a timeout, so a slow or
//! hostile client never blocks the loop.

pub mod proxy;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::broker::Broker;
use crate::config::ListenerConfig;
use corvid_core::admission::ConnCount;
use corvid_core::transport::{Io, Transport};
use tls::ReloadingAcceptor;

/// What sits between TCP and MQTT on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain TCP.
    Tcp,
    /// TLS.
    Tls,
    /// WebSocket.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

/// One bound listener.
#[derive(Debug)]
pub struct Listener {
    /// Name (`mqtt`, `ws`, `mqtts`, `wss`).
    pub name: &'static str,
    /// Transport kind.
    pub kind: Kind,
    /// Bound socket.
    pub socket: TcpListener,
    /// Configuration.
    pub config: ListenerConfig,
    /// TLS acceptor for TLS kinds.
    pub tls: Option<ReloadingAcceptor>,
    /// Largest WebSocket message and frame buffered (`mqtt.max_packet_size`): a client cannot
    /// make the broker hold more than one packet's worth of a frame it never finishes.
    pub max_ws_message: usize,
}

impl Listener {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Runs the accept loop until the broker shuts down.
    pub async fn run(self, broker: Arc<Broker>, count: Arc<ConnCount>) {
        let me = Arc::new(self);
        let mut window = Instant::now();
        let mut in_window = 0u32;
        loop {
            let accepted = tokio::select! {
                r = me.socket.accept() => r,
                _ = broker.shutdown.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = me.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let limits = &broker.config.limits;
            if !broker.accepting.load(Ordering::Relaxed) {
                broker
                    .metrics
                    .connections_refused
                    .with_label_values(&["not_accepting"])
                    .inc();
                continue;
            }
            if limits.max_conn_rate > 0 {
                if window.elapsed() >= Duration::from_secs(1) {
                    window = Instant::now();
                    in_window = 0;
                }
                in_window += 1;
                if in_window > limits.max_conn_rate {
                    broker
                        .metrics
                        .connections_refused
                        .with_label_values(&["conn_rate"])
                        .inc();
                    continue;
                }
            }
            let Some(slot) = count.take_slot(limits.max_connections) else {
                broker
                    .metrics
                    .connections_refused
                    .with_label_values(&["max_connections"])
                    .inc();
                continue;
            };
            let me = me.clone();
            let broker = broker.clone();
            tokio::spawn(async move {
                if me.config.proxy_protocol && !me.config.proxy_trusts(peer.ip()) {
                    // Only the load balancer may say where a client comes from.
                    tracing::debug!(listener = me.name, %peer, "PROXY header from an untrusted source; closed");
                    broker.metrics.proxy_untrusted.inc();
                    return;
                }
                let _ = stream.set_nodelay(true);
                let timeout = Duration::from_secs(broker.config.tls.handshake_timeout.max(1));
                // Boxed: TLS and WebSocket handshake state is large and done with once the
                // client is served, while this task lives as long as the connection.
                let setup =
                    tokio::time::timeout(timeout, Box::pin(me.handshake(stream, peer))).await;
                match setup {
                    Ok(Ok((transport, peer))) => {
                        // Counted on the address after the PROXY header: the client's own.
                        let max = broker.config.limits.max_connections_per_ip;
                        let Some(admission) = slot.admit(peer.ip(), max) else {
                            tracing::debug!(listener = me.name, %peer, "too many connections from this address");
                            broker
                                .metrics
                                .connections_refused
                                .with_label_values(&["max_connections_per_ip"])
                                .inc();
                            return;
                        };
                        crate::connection::serve(broker, transport, peer, me.name, admission).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = me.name, %peer, error = %e, "handshake failed");
                        broker
                            .metrics
                            .connections_refused
                            .with_label_values(&["handshake"])
                            .inc();
                    }
                    Err(_) => {
                        tracing::debug!(listener = me.name, %peer, "handshake timed out");
                        broker
                            .metrics
                            .connections_refused
                            .with_label_values(&["handshake_timeout"])
                            .inc();
                    }
                }
            });
        }
    }

    async fn handshake(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) -> std::io::Result<(Transport, SocketAddr)> {
        let mut peer = peer;
        if self.config.proxy_protocol {
            if let Some(src) = proxy::read_header(&mut stream).await? {
                peer = src;
            }
        }
        if self.kind == Kind::Tcp {
            return Ok((Transport::Tcp(stream), peer));
        }
        let io: Box<dyn Io> = match (&self.tls, self.kind) {
            (Some(tls), Kind::Tls | Kind::Wss) => Box::new(tls.acceptor().accept(stream).await?),
            _ => Box::new(stream),
        };
        let transport = match self.kind {
            Kind::Tcp | Kind::Tls => Transport::Stream(io),
            Kind::Ws | Kind::Wss => {
                let path = self.config.path.clone();
                #[allow(clippy::result_large_err)] // tungstenite's callback signature
                let check = move |req: &Request, resp| ws_accept(&path, req, resp);
                let ws_config = WebSocketConfig::default()
                    .max_message_size(Some(self.max_ws_message))
                    .max_frame_size(Some(self.max_ws_message));
                let ws =
                    tokio_tungstenite::accept_hdr_async_with_config(io, check, Some(ws_config))
                        .await
                        .map_err(std::io::Error::other)?;
                Transport::Ws(Box::new(ws))
            }
        };
        Ok((transport, peer))
    }
}

/// Accepts the WebSocket upgrade only on the configured path, answering with the `mqtt`
/// subprotocol when the client offers it (browsers drop the connection otherwise).
#[allow(clippy::result_large_err)]
fn ws_accept(path: &str, req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != path {
        let mut err = ErrorResponse::new(Some("not found".into()));
        *err.status_mut() = StatusCode::NOT_FOUND;
        return Err(err);
    }
    if let Some(offered) = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
    {
        let chosen = offered
            .split(',')
            .map(str::trim)
            .find(|p| matches!(*p, "mqtt" | "mqttv3.1" | "mqttv3.1.1" | "mqttv5.0"));
        if let Some(p) = chosen {
            if let Ok(v) = HeaderValue::from_str(p) {
                resp.headers_mut().insert("sec-websocket-protocol", v);
            }
        }
    }
    Ok(resp)
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The TLS files are missing or invalid.
    #[error("listeners.{name} needs TLS: {source}")]
    Tls {
        /// Listener name.
        name: &'static str,
        /// Cause.
        source: tls::TlsError,
    },
    /// The port could not be bound.
    #[error("listeners.{name}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Binds every enabled listener. TLS listeners fail here, clearly, if their files are bad.
pub async fn bind_all(broker: &Arc<Broker>) -> Result<Vec<Listener>, BindError> {
    let cfg = &broker.config;
    let mut out = Vec::new();
    let mut tls: Option<ReloadingAcceptor> = None;
    for (name, l) in cfg.listener_list() {
        if !l.enabled {
            continue;
        }
        let kind = match name {
            "mqtt" => Kind::Tcp,
            "ws" => Kind::Ws,
            "mqtts" => Kind::Tls,
            _ => Kind::Wss,
        };
        let acceptor = if matches!(kind, Kind::Tls | Kind::Wss) {
            if tls.is_none() {
                tls = Some(
                    ReloadingAcceptor::start(
                        &cfg.tls,
                        Duration::from_secs(2),
                        broker.metrics.clone(),
                    )
                    .map_err(|source| BindError::Tls { name, source })?,
                );
            }
            tls.clone()
        } else {
            None
        };
        let socket = TcpListener::bind(l.bind)
            .await
            .map_err(|source| BindError::Bind {
                name,
                addr: l.bind,
                source,
            })?;
        tracing::info!(listener = name, addr = %l.bind, "listening");
        out.push(Listener {
            name,
            kind,
            socket,
            config: l.clone(),
            tls: acceptor,
            max_ws_message: usize::try_from(cfg.mqtt.max_packet_size).unwrap_or(usize::MAX),
        });
    }
    Ok(out)
}
