//! Leader election on a coordination.k8s.io Lease, so that only one operator replica reconciles.
//! The holder renews the Lease every few seconds; a candidate takes it over once it has not been
//! renewed for its duration. Losing the Lease ends the process (a clean restart beats two leaders).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;

/// Name of the Lease.
pub const LEASE_NAME: &str = "corvid-operator-leader";
/// How long a Lease stays valid without renewal.
pub const LEASE_SECONDS: i32 = 15;
/// How often the holder renews (and a candidate retries).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Failure of the election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read or written.
    #[error("lease {LEASE_NAME}: {0}")]
    Api(#[from] kube::Error),
    /// The Lease was not renewed in time and someone else may lead now.
    #[error("lost the leader lease")]
    Lost,
}

/// One candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    identity: String,
}

/// Whether `lease` may be taken by `identity` at `now`.
pub fn can_take(lease: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    match lease.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration = i64::from(lease.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
            match &lease.renew_time {
                Some(MicroTime(renewed)) => *renewed + SignedDuration::from_secs(duration) < now,
                None => true,
            }
        }
    }
}

impl Elector {
    /// A candidate named `identity` for the Lease in `namespace`.
    pub fn new(client: Client, namespace: &str, identity: String) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            identity,
        }
    }

    /// Tries once to acquire or renew; true while this candidate holds the Lease.
    pub async fn try_acquire(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        if !can_take(&current, &self.identity, now) {
            return Ok(false);
        }
        let ours = current.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
        lease.spec = Some(spec(
            transitions,
            if ours { current.acquire_time } else { None },
        ));
        // replace() carries the resourceVersion we read: a concurrent writer makes this fail (409).
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Blocks until this candidate holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        loop {
            match self.try_acquire().await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::debug!(identity = %self.identity, "lease held by another replica")
                }
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews forever; returns `Lost` once renewal has failed for longer than the Lease duration.
    pub async fn keep(&self) -> LeaderError {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_acquire().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => return LeaderError::Lost,
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            }
            if last_renewed.elapsed() > Duration::from_secs(u64::from(LEASE_SECONDS.unsigned_abs()))
            {
                return LeaderError::Lost;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_seconds_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                now() - SignedDuration::from_secs(renewed_seconds_ago),
            )),
            ..LeaseSpec::default()
        }
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().expect("time")
    }

    #[test]
    fn lease_rules() {
        assert!(can_take(&LeaseSpec::default(), "me", now()), "unheld");
        assert!(can_take(&lease("me", 1), "me", now()), "renew own");
        assert!(
            !can_take(&lease("other", 5), "me", now()),
            "fresh foreign lease"
        );
        assert!(
            can_take(&lease("other", 16), "me", now()),
            "expired foreign lease"
        );
    }
}
