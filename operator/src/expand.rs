//! Online volume expansion: growing `spec.persistence.size` grows every claim of the
//! StatefulSet in place, when their StorageClass allows it, and then re-creates the StatefulSet
//! object so its `volumeClaimTemplates` (immutable on a StatefulSet) carry the new size for
//! claims made later.
//!
//! The StatefulSet is deleted with `propagationPolicy: Orphan`: its pods, claims and revisions
//! stay, lose their owner reference for a moment and are adopted by the StatefulSet applied right
//! after (same name, selector and pod template, so same revision: no pod restarts). Shrinking is
//! refused by the CRD (a CEL transition rule) and again here against what is stored, because a
//! claim never shrinks.
//!
//! Deciding is pure (`plan`, over `Claim`s and the StorageClass's `allowVolumeExpansion`); only
//! `run` talks to the API server, and only when the StatefulSet's claim template and the spec
//! disagree or a claim is smaller than the spec, so a cluster at rest costs no extra call.

use std::time::Duration;

use corvid_crds::{MqttCluster, PersistenceMode};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::build::names::{Names, FIELD_MANAGER};
use crate::error::{Error, Result};

/// Name of the StatefulSet's claim template (claims are `data-<statefulset>-<ordinal>`).
pub const CLAIM_TEMPLATE: &str = "data";

/// A Kubernetes quantity (`1Gi`, `500M`, `1.5Gi`, `2e9`) in thousandths of a unit, so any two
/// sizes compare exactly; `None` when it is not a non-negative quantity.
pub fn quantity_millis(text: &str) -> Option<u128> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number = number.strip_prefix('+').unwrap_or(number);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if !(whole.bytes().all(|b| b.is_ascii_digit()) && fraction.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    // value = digits / 10^fraction_len * multiplier; in thousandths: * 1000.
    let (numerator, denominator): (u128, u128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "k" => (1000u128.pow(2), 1),
        "M" => (1000u128.pow(3), 1),
        "G" => (1000u128.pow(4), 1),
        "T" => (1000u128.pow(5), 1),
        "P" => (1000u128.pow(6), 1),
        "E" => (1000u128.pow(7), 1),
        "Ki" => (1000 << 10, 1),
        "Mi" => (1000 << 20, 1),
        "Gi" => (1000 << 30, 1),
        "Ti" => (1000 << 40, 1),
        "Pi" => (1000 << 50, 1),
        "Ei" => (1000 << 60, 1),
        exp if exp.starts_with(['e', 'E']) => {
            let power: u32 = exp[1..].parse().ok().filter(|p| *p <= 18)?;
            (1000 * 10u128.pow(power), 1)
        }
        _ => return None,
    };
    let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    Some(digits.checked_mul(numerator)? / denominator / scale)
}

/// One claim of the StatefulSet, as the planner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Its name (`data-<statefulset>-<ordinal>`).
    pub name: String,
    /// `spec.resources.requests.storage` as written.
    pub requested: Option<String>,
    /// Its StorageClass (`spec.storageClassName`, filled in by the default-class admission).
    pub storage_class: Option<String>,
}

/// What the StorageClass of the claims says about expansion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClassExpansion {
    /// `allowVolumeExpansion: true`.
    Allowed,
    /// The class exists and does not allow it.
    Forbidden(String),
    /// The class does not exist, or a claim names none.
    Unknown(String),
}

/// The decision for one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expansion {
    /// The StatefulSet's claim template and every claim already have the spec's size.
    Nothing,
    /// Grow these claims to `size`, then re-create the StatefulSet when its template is smaller.
    Grow {
        /// The spec's size, as written there.
        size: String,
        /// Claims whose request is below it.
        claims: Vec<String>,
        /// Whether the StatefulSet object must be re-created for its template.
        recreate_statefulset: bool,
    },
    /// Not possible; the message says why and what to do. The StatefulSet keeps its template.
    Refused(String),
}

/// The claim template's requested size of a stored StatefulSet.
pub fn template_size(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some(CLAIM_TEMPLATE))?
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

/// Whether `claim` is one of the StatefulSet's claims (`data-<statefulset>-<ordinal>`).
pub fn is_claim_of(claim: &str, statefulset: &str) -> bool {
    claim
        .strip_prefix(&format!("{CLAIM_TEMPLATE}-{statefulset}-"))
        .is_some_and(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether the expansion step has to look at claims at all: only when the stored template's size
/// differs from the spec's as a quantity (the usual case is equal, and then nothing is read).
pub fn wanted(cluster: &MqttCluster, sts: Option<&StatefulSet>) -> bool {
    let p = &cluster.spec.persistence;
    p.mode == PersistenceMode::Pvc
        && sts
            .and_then(template_size)
            .is_some_and(|t| quantity_millis(&t) != quantity_millis(&p.size))
}

/// Decides the expansion from the spec's size, the stored template's, the claims and what their
/// StorageClass allows (`class` is only consulted when a claim must grow).
pub fn plan(
    desired: &str,
    template: Option<&str>,
    claims: &[Claim],
    class: &ClassExpansion,
) -> Expansion {
    let Some(want) = quantity_millis(desired) else {
        return Expansion::Refused(format!(
            "persistence.size {desired:?} is not a quantity (e.g. 10Gi)"
        ));
    };
    let template_millis = template.and_then(quantity_millis);
    if let (Some(t), Some(have)) = (template, template_millis) {
        if want < have {
            return Expansion::Refused(format!(
                "persistence.size cannot shrink from {t} to {desired}: volumes only grow; set it \
                 back to {t} or more"
            ));
        }
    }
    let small: Vec<String> = claims
        .iter()
        .filter(|c| {
            c.requested
                .as_deref()
                .and_then(quantity_millis)
                .is_some_and(|r| r < want)
        })
        .map(|c| c.name.clone())
        .collect();
    // Compared as quantities: the API server stores `1024Mi` as `1Gi`.
    let recreate_statefulset = template_millis.is_some_and(|t| t < want);
    if small.is_empty() && !recreate_statefulset {
        return Expansion::Nothing;
    }
    if !small.is_empty() {
        match class {
            ClassExpansion::Allowed => {}
            ClassExpansion::Forbidden(why) | ClassExpansion::Unknown(why) => {
                return Expansion::Refused(format!(
                    "persistence.size {desired} needs claims {} to grow, but {why}; ask the \
                     cluster administrator to set allowVolumeExpansion: true on it, or set \
                     persistence.size back to {}",
                    small.join(", "),
                    template.unwrap_or("its previous value")
                ));
            }
        }
    }
    Expansion::Grow {
        size: desired.to_string(),
        claims: small,
        recreate_statefulset,
    }
}

/// With the expansion refused, the StatefulSet is applied with the claim template it has (the
/// field is immutable), so every other change of the spec still reaches it.
pub fn keep_claim_template(desired: &mut StatefulSet, stored: &StatefulSet) {
    let stored = stored
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.clone());
    if let Some(spec) = desired.spec.as_mut() {
        spec.volume_claim_templates = stored;
    }
}

/// What `run` did, for events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Done {
    /// Claims asked to grow.
    pub grown: Vec<String>,
    /// Whether the StatefulSet object was deleted (orphaning its pods) to be applied again.
    pub recreated: bool,
    /// Why nothing could be done, when refused.
    pub refused: Option<String>,
}

/// How long `run` waits for the orphaning delete to finish before leaving it to the next reconcile.
const GONE_TIMEOUT: Duration = Duration::from_secs(20);

/// Reads the claims and their StorageClass, grows the claims and deletes the StatefulSet with
/// `Orphan` when `plan` says so, waiting until it is gone so the apply that follows creates it
/// with the new claim template. Only called when [`wanted`].
pub async fn run(
    client: &Client,
    cluster: &MqttCluster,
    names: &Names,
    sts: &StatefulSet,
) -> Result<Done> {
    let ns = names.namespace.as_str();
    let desired = cluster.spec.persistence.size.as_str();
    let template = template_size(sts);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let listed = pvcs
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: "PersistentVolumeClaims".to_string(),
            source,
        })?;
    let claims: Vec<Claim> = listed
        .items
        .iter()
        .filter(|c| is_claim_of(&c.name_any(), &names.statefulset()))
        .map(|c| {
            let spec = c.spec.as_ref();
            Claim {
                name: c.name_any(),
                requested: spec
                    .and_then(|s| s.resources.as_ref())
                    .and_then(|r| r.requests.as_ref())
                    .and_then(|r| r.get("storage"))
                    .map(|q| q.0.clone()),
                storage_class: spec.and_then(|s| s.storage_class_name.clone()),
            }
        })
        .collect();
    let class = class_expansion(client, &claims).await?;
    let mut done = Done::default();
    match plan(desired, template.as_deref(), &claims, &class) {
        Expansion::Nothing => {}
        Expansion::Refused(why) => done.refused = Some(why),
        Expansion::Grow {
            size,
            claims,
            recreate_statefulset,
        } => {
            let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}});
            for claim in claims {
                pvcs.patch(
                    &claim,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.to_string()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(|source| Error::Apply {
                    what: format!("PersistentVolumeClaim {claim}"),
                    source,
                })?;
                done.grown.push(claim);
            }
            if recreate_statefulset {
                orphan_statefulset(client, names).await?;
                done.recreated = true;
            }
        }
    }
    Ok(done)
}

/// Whether the claims' StorageClass allows expansion (the claims of one StatefulSet share one
/// class; the first one that does not allow it is named).
async fn class_expansion(client: &Client, claims: &[Claim]) -> Result<ClassExpansion> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let mut seen: Vec<&str> = Vec::new();
    for claim in claims {
        let Some(name) = claim.storage_class.as_deref() else {
            return Ok(ClassExpansion::Unknown(format!(
                "claim {} names no StorageClass",
                claim.name
            )));
        };
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let class = classes.get_opt(name).await.map_err(|source| Error::Read {
            what: format!("StorageClass {name}"),
            source,
        })?;
        match class {
            None => {
                return Ok(ClassExpansion::Unknown(format!(
                    "StorageClass {name} does not exist"
                )))
            }
            Some(c) if c.allow_volume_expansion != Some(true) => {
                return Ok(ClassExpansion::Forbidden(format!(
                    "StorageClass {name} does not allow volume expansion (allowVolumeExpansion \
                     is not true)"
                )))
            }
            Some(_) => {}
        }
    }
    Ok(ClassExpansion::Allowed)
}

/// Deletes the StatefulSet object but not its pods or claims, and waits until it is gone.
async fn orphan_statefulset(client: &Client, names: &Names) -> Result<()> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &names.namespace);
    let name = names.statefulset();
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    let failed = |source| Error::Apply {
        what: format!("deleting StatefulSet {name} (orphaning its pods)"),
        source,
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(source) => return Err(failed(source)),
    }
    let deadline = tokio::time::Instant::now() + GONE_TIMEOUT;
    loop {
        if api.get_opt(&name).await.map_err(failed)?.is_none() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            // The next reconcile sees it still there (or gone) and carries on from there.
            return Err(Error::VolumeExpansion(format!(
                "StatefulSet {name} is still being deleted (orphaning its pods); retrying"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests;
