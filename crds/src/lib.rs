//! Kubernetes API types for Corvid: the `MqttCluster` custom resource (`corvid.dev/v1alpha1`).
//!
//! The CRD YAML that users install is generated from these types (`corvid-operator crd`), so the
//! Rust structs are the single source of truth for field names, defaults, descriptions and CEL rules.

#![warn(missing_docs)]

pub mod auth;
pub mod bridges;
pub mod broker;
pub mod cluster;
pub mod crdgen;
pub mod eventstore;
pub mod listeners;
pub mod network;
pub mod ops;
pub mod pod;
pub mod service;
pub mod status;
pub mod tls;
mod to_config;

pub use auth::*;
pub use bridges::*;
pub use broker::*;
pub use cluster::*;
pub use crdgen::{crd_yaml, CrdError};
pub use eventstore::*;
pub use listeners::*;
pub use network::*;
pub use ops::*;
pub use pod::*;
pub use service::*;
pub use status::*;
pub use tls::*;

/// A broker default as the CRD's integer type: the spec's defaults that mirror the broker's are
/// read from `corvid-config`, so they cannot drift apart.
fn broker_default<N: TryInto<i64>>(n: N) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// API group of every Corvid resource.
pub const GROUP: &str = "corvid.dev";
/// Served and stored API version.
pub const VERSION: &str = "v1alpha1";
/// Version of the broker image used when `spec.version` is not set.
pub const DEFAULT_BROKER_VERSION: &str = "0.1.0";
/// Image repository used when `spec.image` is not set; the tag is `spec.version`.
pub const DEFAULT_IMAGE_REPOSITORY: &str = "corvid/corvid-broker";
