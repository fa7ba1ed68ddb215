//! corvid-operator: reconciles `MqttCluster` resources into a running, clustered Corvid broker.
//!
//! The reconcile (`controller`) is a pipeline where only the edges talk to the API server:
//! read (`observe`) → validate (`validate`, pure) → plan (`planner`, pure) → build (`build`,
//! pure) → apply (`apply`, server-side apply) → act on one pod (`podtalk`, pod delete) →
//! status (`status`, pure computation + one server-side apply of the status subresource).

#![warn(missing_docs)]

pub mod apply;
pub mod build;
pub mod cli;
pub mod controller;
pub mod error;
pub mod expand;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod planner;
pub mod podtalk;
pub mod rotation;
pub mod status;
pub mod validate;
pub mod watched;

#[cfg(test)]
pub mod testing;
