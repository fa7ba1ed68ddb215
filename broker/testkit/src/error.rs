//! The client's error type, so callers can tell a refused connection from a protocol violation
//! from a broken socket (and the benchmark can report each as it always has).

use std::io;

/// Everything that can go wrong on one client connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection to the broker could not be opened or broke.
    #[error("i/o error talking to {addr}: {source}")]
    Io {
        /// Broker address we were talking to.
        addr: String,
        /// Underlying socket error.
        #[source]
        source: io::Error,
    },
    /// The broker sent bytes the MQTT codec could not decode.
    #[error("malformed packet from broker: {0}")]
    Decode(#[from] rmqtt_codec::error::DecodeError),
    /// A packet we built could not be encoded (a bug or an oversized payload).
    #[error("could not encode packet: {0}")]
    Encode(#[from] rmqtt_codec::error::EncodeError),
    /// The broker refused the CONNECT.
    #[error("broker refused connection with reason code {code}")]
    ConnectRefused {
        /// CONNACK return/reason code.
        code: u8,
        /// MQTT 5 Server Reference, when the broker named another server to use.
        server_reference: Option<String>,
    },
    /// The broker refused a SUBSCRIBE.
    #[error("broker refused subscription to {0}")]
    SubscribeRefused(String),
    /// The broker sent something out of order (for example PUBLISH before CONNACK).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The broker closed the connection.
    #[error("broker closed the connection")]
    Closed,
    /// A handshake step did not finish in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Result alias used throughout the kit.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
