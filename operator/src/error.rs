//! The operator's one error enum. Each variant is a pipeline step; its name doubles as the
//! `reason` label of the error metric and the reason of the Warning event.

use crate::podtalk::PodTalkError;
use crate::validate::InvalidSpec;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec cannot be reconciled; waits for the next change instead of retrying.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] InvalidSpec),
    /// Reading cluster state failed.
    #[error("reading {what}: {source}")]
    Read {
        /// What was being read.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A server-side apply, create or delete of an owned object failed.
    #[error("applying {what}: {source}")]
    Apply {
        /// Kind and name of the object.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// An API the spec relies on (cert-manager) is not installed in the cluster.
    #[error("{0}")]
    MissingApi(String),
    /// Talking to a broker's admin API failed.
    #[error("broker admin API: {0}")]
    PodTalk(#[from] PodTalkError),
    /// Writing status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    /// The MqttCluster has no namespace (it is namespaced, so this means a malformed event).
    #[error("MqttCluster has no namespace")]
    MissingNamespace,
    /// Growing the volumes (spec.persistence.size) is refused or not finished; the message says
    /// why. Retried with backoff, since what blocks it (a StorageClass) is not in the spec.
    #[error("volume expansion: {0}")]
    VolumeExpansion(String),
    /// The whole reconcile took longer than its deadline (a hung API call); it is abandoned so
    /// that the next one can start from fresh observations.
    #[error("reconcile did not finish within {}s", .0.as_secs())]
    Timeout(std::time::Duration),
}

impl Error {
    /// Short PascalCase reason: metric label and event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Read { .. } => "ReadFailed",
            Error::Apply { .. } => "ApplyFailed",
            Error::MissingApi(_) => "MissingApi",
            Error::PodTalk(_) => "BrokerAdminFailed",
            Error::Status(_) => "StatusFailed",
            Error::MissingNamespace => "MissingNamespace",
            Error::Timeout(_) => "ReconcileTimeout",
            Error::VolumeExpansion(_) => "VolumeExpansion",
        }
    }
}

/// Result of a pipeline step.
pub type Result<T, E = Error> = std::result::Result<T, E>;
