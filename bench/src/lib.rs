//! `corvid-bench`: an open-loop MQTT load generator, so Corvid (or any broker) can be load-tested
//! before production with figures that do not hide queueing: latency is measured from the
//! scheduled send time, and loss and duplicates are counted per subscriber.
//!
//! The binary (`main.rs`) only parses flags and prints; everything measurable lives here so the
//! integration tests and other tools can drive it directly.

#![warn(missing_docs)]

pub mod accounting;
pub mod backlog;
pub mod connection;
pub mod error;
pub mod histogram;
pub mod idle;
pub mod pacer;
pub mod payload;
pub mod pubsub;
pub mod report;
pub mod rlimit;
pub mod wire;

pub use error::{BenchError, Result};
