//! `corvid-testkit`: the one MQTT client framing that Corvid's load generator (`corvid-bench`),
//! the live proof's load tool (`corvid-liveload`) and tests share, so a protocol detail (how a
//! CONNACK or a Server Reference is read, how buffers are reused) is written once.
//!
//! - [`wire`]: encoding and decoding on top of `rmqtt-codec` (the codec the broker uses), for
//!   MQTT 3.1.1 and 5.0 behind one packet vocabulary ([`wire::Incoming`]); no I/O.
//! - [`client`]: one connection — a tokio `TcpStream`, reusable read and write buffers and a
//!   [`wire::Wire`] — with the blocking-style steps (connect, subscribe, read, flush, close)
//!   clients are built from. The hot path (encode into the write buffer, decode from the read
//!   buffer) allocates nothing per packet.
//! - [`raw`]: byte-exact packets for tests that send what a codec would refuse to build.

pub mod client;
pub mod error;
pub mod raw;
pub mod wire;

pub use client::{Client, ConnAck};
pub use error::{ClientError, Result};
pub use wire::{ConnectOptions, Incoming, Protocol, QoS, Wire};
