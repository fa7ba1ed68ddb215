//! What Corvid connects to besides MQTT clients: bridges to other brokers and Kafka (the
//! core's [`corvid_core::broker::Tap`]) and the event store in PostgreSQL and Redis (sinks on
//! the core's hooks). The core names neither; the server wires them in.

// A build that leaves an integration out keeps the shared machinery it would have used.
#![cfg_attr(
    not(all(
        feature = "mqtt-bridge",
        feature = "kafka",
        feature = "postgres",
        feature = "redis"
    )),
    allow(dead_code, unused_imports, unused_macros, unused_mut, unused_variables)
)]

pub mod bridge;
pub mod eventstore;

// The core's modules under the names this crate's code has always used for them.
use corvid_core::{broker, codec, config, hooks, message, metrics, topic};
