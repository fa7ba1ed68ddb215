//! Corvid's MQTT broker: its own core (sessions, router, retained store, delivery) on tokio,
//! with the wire codec behind [`codec`]. The binary `corvid-broker` wires it up; tests and the
//! cluster layer use the library directly.

pub mod acl;
pub mod admin;
pub mod auth;
pub mod bridge;
pub mod broker;
pub mod cluster;
pub mod connection;
pub mod eventstore;
pub mod fabric;
pub mod hooks;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod park;
pub mod persist;
pub mod retained;
pub mod router;
pub mod server;
pub mod session;
pub mod sys;
pub mod trace;

pub use corvid_config as config;
pub use corvid_proto::{codec, topic, trie};

pub use broker::Broker;
pub use config::Config;
