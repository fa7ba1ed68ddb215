//! corvid-operator: reconciles `MqttCluster` resources into a running, clustered Corvid broker.
//!
//! The reconcile is a pipeline where only the edges talk to the API server:
//! read (`controller`) → validate (`validate`) → build (`build`, pure) → apply (`apply`) →
//! plan the rollout (`planner`, pure) → status (`status`, pure computation + one patch).

pub mod apply;
pub mod build;
pub mod cli;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod planner;
pub mod podtalk;
pub mod status;
pub mod validate;

#[cfg(test)]
pub mod testing;
