//! Client-side MQTT framing: the shared framing of `corvid-testkit`, plus the mapping of the
//! command line's protocol and QoS levels onto it.

pub use corvid_testkit::wire::{ConnectOptions, Incoming, Protocol, QoS, Wire};

use crate::error::{BenchError, Result};

/// Maps the CLI's `--protocol 4|5` to a protocol level.
pub fn protocol_from_level(level: u8) -> Result<Protocol> {
    Protocol::from_level(level).ok_or_else(|| {
        BenchError::Config(format!("unsupported protocol level {level}, use 4 or 5"))
    })
}

/// Maps `--qos 0|1|2` to the codec's QoS type.
pub fn qos_from_level(level: u8) -> Result<QoS> {
    corvid_testkit::wire::qos_from_level(level)
        .ok_or_else(|| BenchError::Config(format!("unsupported QoS {level}, use 0, 1 or 2")))
}
