//! Corvid's MQTT broker server: client listeners (TCP, TLS, WebSocket, PROXY protocol), the
//! admin HTTP API, `ctl`, and the start and stop of a whole node that wires the core
//! ([`corvid_core`]), the cluster ([`corvid_cluster`]) and the integrations
//! ([`corvid_integrations`]) together. The only crate with sockets to clients. The other crates'
//! modules are re-exported under their old names so tests and tools reach one library.

pub mod admin;
pub mod listener;
pub mod memory;
pub mod server;

pub use corvid_cluster as cluster;
pub use corvid_core::{
    acl, admission, auth, broker, codec, config, connection, fabric, hooks, limits, message,
    metrics, park, persist, restore, retained, router, session, sys, topic, trace, transport, trie,
    wire,
};
pub use corvid_integrations::{bridge, eventstore};

pub use broker::Broker;
pub use config::Config;
