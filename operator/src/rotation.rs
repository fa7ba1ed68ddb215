//! Cluster secret rotation driven by an annotation, so people rotate the secret the brokers
//! share without a restart and without running the three phases by hand.
//!
//! Setting `corvid.dev/rotate-cluster-secret` on an MqttCluster to a value the operator has not
//! rotated for yet starts a rotation; the operator then rewrites the cluster Secret in three
//! phases, each only once every Ready broker reports (through the admin API's key ring
//! fingerprints) that it took the previous one:
//!
//! 1. install: `accepted` = a new random secret (everyone accepts it, still sends the old);
//! 2. use: `secret` = the new one, `accepted` = the old (everyone sends the new one);
//! 3. remove: `accepted` emptied, once no broker saw the old secret used for [`QUIET_S`].
//!
//! The progress lives in annotations on the Secret itself ([`TOKEN`], [`PHASE`],
//! [`NEW_FINGERPRINT`]), so a restarted operator continues where it stopped. The operator never
//! computes a fingerprint: it learns the new secret's from the brokers after phase 1. The plan
//! ([`plan`]) is pure; [`step`] reads and writes the Secret and asks the brokers.

use std::collections::BTreeMap;

use corvid_crds::MqttCluster;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::build::config::{CLUSTER_SECRET_ACCEPTED_KEY, CLUSTER_SECRET_KEY};
use crate::build::names::Names;
use crate::error::{Error, Result};
use crate::observe::Observation;
use crate::podtalk::{bounded, BrokerAdmin};

/// MqttCluster annotation: a new value starts a rotation of the cluster secret.
pub const ROTATE_ANNOTATION: &str = "corvid.dev/rotate-cluster-secret";
/// Secret annotation: the [`ROTATE_ANNOTATION`] value of the latest rotation.
pub const TOKEN: &str = "corvid.dev/rotation";
/// Secret annotation: the phase that rotation is in ([`Phase`]).
pub const PHASE: &str = "corvid.dev/rotation-phase";
/// Secret annotation: the new secret's fingerprint, as the brokers reported it in phase 1.
pub const NEW_FINGERPRINT: &str = "corvid.dev/rotation-fingerprint";
/// Seconds without any broker seeing the old secret used before it is removed.
pub const QUIET_S: u64 = 30;

/// Where a rotation stands (the Secret's [`PHASE`] annotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Every broker is to accept the new secret.
    Install,
    /// Every broker is to send with the new secret.
    Use,
    /// The old secret was removed: the rotation is over.
    Done,
}

impl Phase {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Install => "install",
            Phase::Use => "use",
            Phase::Done => "done",
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        match s {
            "install" => Some(Phase::Install),
            "use" => Some(Phase::Use),
            "done" => Some(Phase::Done),
            _ => None,
        }
    }
}

/// What the cluster Secret holds, as far as rotation is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretState {
    /// The primary secret.
    pub secret: String,
    /// The accepted secret (empty: none).
    pub accepted: String,
    /// [`TOKEN`].
    pub token: Option<String>,
    /// [`PHASE`].
    pub phase: Option<Phase>,
    /// [`NEW_FINGERPRINT`].
    pub new_fingerprint: Option<String>,
}

/// One Ready broker's key ring, by fingerprint (`None`: it did not answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRing {
    /// Pod name.
    pub pod: String,
    /// Its ring, if it answered.
    pub ring: Option<corvid_api::KeyRingView>,
}

/// What to do about the cluster Secret now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No rotation asked for or running.
    Nothing,
    /// A phase waits for the brokers (the reason, for logs and events).
    Wait(String),
    /// Write these keys and annotations to the Secret.
    Write {
        /// New `secret` key.
        secret: String,
        /// New `accepted` key (empty: no accepted secret).
        accepted: String,
        /// [`TOKEN`].
        token: String,
        /// [`PHASE`].
        phase: Phase,
        /// [`NEW_FINGERPRINT`] (kept when `None`).
        new_fingerprint: Option<String>,
    },
}

/// The next step of a rotation: `requested` is the MqttCluster's [`ROTATE_ANNOTATION`],
/// `rings` every Ready broker's answer, `now` unix seconds, `fresh` a new random secret (used
/// only when a rotation starts). A new request waits until the running rotation is done.
pub fn plan(
    requested: Option<&str>,
    s: &SecretState,
    rings: &[PodRing],
    now: u64,
    fresh: impl FnOnce() -> String,
) -> Step {
    let token = s.token.clone().unwrap_or_default();
    match s.phase {
        None | Some(Phase::Done) => match requested {
            Some(r) if !r.is_empty() && s.token.as_deref() != Some(r) => Step::Write {
                secret: s.secret.clone(),
                accepted: fresh(),
                token: r.to_string(),
                phase: Phase::Install,
                new_fingerprint: None,
            },
            _ => Step::Nothing,
        },
        Some(Phase::Install) => {
            let answered = match all_answered(rings) {
                Ok(a) => a,
                Err(why) => return Step::Wait(why),
            };
            let primary = &answered[0].primary;
            let accepted = &answered[0].accepted;
            let installed = accepted.len() == 1
                && answered
                    .iter()
                    .all(|r| &r.primary == primary && &r.accepted == accepted);
            if !installed || s.accepted.is_empty() {
                return Step::Wait("every broker to accept the new secret".into());
            }
            Step::Write {
                secret: s.accepted.clone(),
                accepted: s.secret.clone(),
                token,
                phase: Phase::Use,
                new_fingerprint: Some(accepted[0].clone()),
            }
        }
        Some(Phase::Use) => {
            let answered = match all_answered(rings) {
                Ok(a) => a,
                Err(why) => return Step::Wait(why),
            };
            let Some(new) = s.new_fingerprint.as_deref() else {
                return Step::Wait("the new secret's fingerprint is not recorded".into());
            };
            if !answered.iter().all(|r| r.primary == new) {
                return Step::Wait("every broker to send with the new secret".into());
            }
            let quiet = answered.iter().all(|r| {
                r.accepted_last_used
                    .is_none_or(|t| now.saturating_sub(t) >= QUIET_S)
            });
            if !quiet {
                return Step::Wait(format!(
                    "the old secret to go unused for {QUIET_S} s on every broker"
                ));
            }
            Step::Write {
                secret: s.secret.clone(),
                accepted: String::new(),
                token,
                phase: Phase::Done,
                new_fingerprint: None,
            }
        }
    }
}

/// Every ring, or why not all Ready brokers answered.
fn all_answered(rings: &[PodRing]) -> std::result::Result<Vec<&corvid_api::KeyRingView>, String> {
    if rings.is_empty() {
        return Err("no Ready broker to ask".into());
    }
    rings
        .iter()
        .map(|r| {
            r.ring
                .as_ref()
                .ok_or_else(|| format!("{} to report its key ring", r.pod))
        })
        .collect()
}

/// Reads the rotation state of `secret`.
pub fn secret_state(secret: &Secret) -> SecretState {
    let key = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).trim_end().to_string())
            .unwrap_or_default()
    };
    let ann = secret.annotations();
    SecretState {
        secret: key(CLUSTER_SECRET_KEY),
        accepted: key(CLUSTER_SECRET_ACCEPTED_KEY),
        token: ann.get(TOKEN).cloned(),
        phase: ann.get(PHASE).and_then(|p| Phase::parse(p)),
        new_fingerprint: ann.get(NEW_FINGERPRINT).cloned(),
    }
}

/// The merge patch of a [`Step::Write`].
pub fn patch(step: &Step) -> Option<serde_json::Value> {
    let Step::Write {
        secret,
        accepted,
        token,
        phase,
        new_fingerprint,
    } = step
    else {
        return None;
    };
    let mut ann = BTreeMap::from([
        (TOKEN.to_string(), json!(token)),
        (PHASE.to_string(), json!(phase.as_str())),
    ]);
    if let Some(fp) = new_fingerprint {
        ann.insert(NEW_FINGERPRINT.to_string(), json!(fp));
    }
    Some(json!({
        "metadata": {"annotations": ann},
        "stringData": {CLUSTER_SECRET_KEY: secret, CLUSTER_SECRET_ACCEPTED_KEY: accepted},
    }))
}

/// Runs one step of a rotation of `cluster`'s Secret: reads it, asks every Ready broker for
/// its key ring when a phase is running, writes the next phase. Returns the step taken.
pub async fn step(
    client: &Client,
    admin: &dyn BrokerAdmin,
    cluster: &MqttCluster,
    names: &Names,
    observation: &Observation,
) -> Result<Step> {
    let requested = cluster.annotations().get(ROTATE_ANNOTATION).cloned();
    let ns = names.namespace.as_str();
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = names.cluster_secret();
    let Some(secret) = api.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("Secret {name}"),
        source,
    })?
    else {
        return Ok(Step::Nothing);
    };
    let state = secret_state(&secret);
    let running = matches!(state.phase, Some(Phase::Install | Phase::Use));
    if requested.is_none() && !running {
        return Ok(Step::Nothing);
    }
    let mut rings = Vec::new();
    if running {
        for pod in observation
            .pods
            .iter()
            .filter(|p| p.ready && !p.terminating)
        {
            let ring = match bounded(&pod.name, admin.cluster(ns, &pod.name)).await {
                Ok(view) => view.keyring,
                Err(e) => {
                    tracing::info!(pod = %pod.name, error = %e, "broker did not report its key ring");
                    None
                }
            };
            rings.push(PodRing {
                pod: pod.name.clone(),
                ring,
            });
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let next = plan(requested.as_deref(), &state, &rings, now, || {
        let material: [u8; 32] = rand::random();
        material.iter().map(|b| format!("{b:02x}")).collect()
    });
    if let Some(body) = patch(&next) {
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map_err(|source| Error::Apply {
                what: format!("Secret {name}"),
                source,
            })?;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use corvid_api::KeyRingView;

    fn ring(pod: &str, primary: &str, accepted: &[&str], used: Option<u64>) -> PodRing {
        PodRing {
            pod: pod.into(),
            ring: Some(KeyRingView {
                primary: primary.into(),
                accepted: accepted.iter().map(|a| a.to_string()).collect(),
                accepted_last_used: used,
            }),
        }
    }

    fn state(secret: &str, accepted: &str, phase: Option<Phase>) -> SecretState {
        SecretState {
            secret: secret.into(),
            accepted: accepted.into(),
            token: phase.map(|_| "t1".into()),
            phase,
            new_fingerprint: (phase == Some(Phase::Use)).then(|| "fnew".into()),
        }
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn an_annotation_starts_a_rotation_once() {
        let s = state("old", "", None);
        assert_eq!(plan(None, &s, &[], NOW, || unreachable!()), Step::Nothing);
        let start = plan(Some("t1"), &s, &[], NOW, || "new".into());
        assert_eq!(
            start,
            Step::Write {
                secret: "old".into(),
                accepted: "new".into(),
                token: "t1".into(),
                phase: Phase::Install,
                new_fingerprint: None,
            }
        );
        let done = SecretState {
            token: Some("t1".into()),
            phase: Some(Phase::Done),
            ..state("new", "", None)
        };
        assert_eq!(
            plan(Some("t1"), &done, &[], NOW, || unreachable!()),
            Step::Nothing
        );
        assert!(matches!(
            plan(Some("t2"), &done, &[], NOW, || "newer".into()),
            Step::Write {
                phase: Phase::Install,
                ..
            }
        ));
    }

    #[test]
    fn install_waits_for_every_ready_broker_then_swaps_the_keys() {
        let s = state("old", "new", Some(Phase::Install));
        let behind = [
            ring("p0", "fold", &["fnew"], None),
            ring("p1", "fold", &[], None),
        ];
        assert!(matches!(
            plan(Some("t1"), &s, &behind, NOW, || unreachable!()),
            Step::Wait(_)
        ));
        let silent = [
            ring("p0", "fold", &["fnew"], None),
            PodRing {
                pod: "p1".into(),
                ring: None,
            },
        ];
        assert!(matches!(
            plan(Some("t1"), &s, &silent, NOW, || unreachable!()),
            Step::Wait(_)
        ));
        assert!(matches!(
            plan(Some("t1"), &s, &[], NOW, || unreachable!()),
            Step::Wait(_)
        ));
        // A newer request does not interrupt the running rotation.
        let all = [
            ring("p0", "fold", &["fnew"], None),
            ring("p1", "fold", &["fnew"], None),
        ];
        assert_eq!(
            plan(Some("t2"), &s, &all, NOW, || unreachable!()),
            Step::Write {
                secret: "new".into(),
                accepted: "old".into(),
                token: "t1".into(),
                phase: Phase::Use,
                new_fingerprint: Some("fnew".into()),
            }
        );
    }

    #[test]
    fn use_waits_for_the_new_primary_everywhere_and_the_old_key_going_quiet() {
        let s = state("new", "old", Some(Phase::Use));
        let behind = [
            ring("p0", "fnew", &["fold"], None),
            ring("p1", "fold", &["fnew"], None),
        ];
        assert!(matches!(
            plan(None, &s, &behind, NOW, || unreachable!()),
            Step::Wait(_)
        ));
        let busy = [
            ring("p0", "fnew", &["fold"], Some(NOW - 2)),
            ring("p1", "fnew", &["fold"], None),
        ];
        assert!(matches!(
            plan(None, &s, &busy, NOW, || unreachable!()),
            Step::Wait(_)
        ));
        let quiet = [
            ring("p0", "fnew", &["fold"], Some(NOW - QUIET_S)),
            ring("p1", "fnew", &["fold"], None),
        ];
        assert_eq!(
            plan(None, &s, &quiet, NOW, || unreachable!()),
            Step::Write {
                secret: "new".into(),
                accepted: String::new(),
                token: "t1".into(),
                phase: Phase::Done,
                new_fingerprint: None,
            }
        );
    }

    #[test]
    fn the_patch_writes_both_keys_and_the_progress() {
        let step = Step::Write {
            secret: "new".into(),
            accepted: "old".into(),
            token: "t1".into(),
            phase: Phase::Use,
            new_fingerprint: Some("fnew".into()),
        };
        let p = patch(&step).expect("a patch");
        assert_eq!(p["stringData"]["secret"], "new");
        assert_eq!(p["stringData"]["accepted"], "old");
        assert_eq!(p["metadata"]["annotations"][PHASE], "use");
        assert_eq!(p["metadata"]["annotations"][TOKEN], "t1");
        assert_eq!(p["metadata"]["annotations"][NEW_FINGERPRINT], "fnew");
        assert!(patch(&Step::Nothing).is_none());
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "demo-cluster-secret", "annotations": {PHASE: "use", TOKEN: "t1", NEW_FINGERPRINT: "fnew"}},
            "data": {"secret": "bmV3Cg==", "accepted": "b2xk"},
        }))
        .expect("secret");
        assert_eq!(
            secret_state(&secret),
            SecretState {
                secret: "new".into(),
                accepted: "old".into(),
                token: Some("t1".into()),
                phase: Some(Phase::Use),
                new_fingerprint: Some("fnew".into()),
            }
        );
    }
}
