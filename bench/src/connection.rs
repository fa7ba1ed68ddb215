//! One MQTT client connection (socket, buffers, codec): the shared client of `corvid-testkit`,
//! under the name the generator's publisher, subscriber and idle-connection tasks use.

pub use corvid_testkit::client::{Client as Connection, ConnAck};
