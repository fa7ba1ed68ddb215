//! Corvid's broker core: sessions, the subscription router, the retained store, access control,
//! limits, wills and delivery, the connection's MQTT protocol and the durable state under
//! `persistence.data_dir`. It defines the seams the rest plugs into — [`fabric::Fabric`] for
//! the cluster, [`broker::Tap`] for bridges, hook sinks for the event store — and names none
//! of them, so a single node is this crate and a listener.

pub mod acl;
pub mod admission;
pub mod auth;
pub mod broker;
pub mod connection;
pub mod fabric;
pub mod hooks;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod park;
pub mod persist;
pub mod restore;
pub mod retained;
pub mod router;
pub mod session;
pub mod sys;
pub mod trace;
pub mod transport;
pub mod wire;

pub use corvid_config as config;
pub use corvid_proto::{codec, topic, trie};

pub use broker::Broker;
pub use config::Config;
