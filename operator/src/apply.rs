//! The apply edge: server-side apply of every desired object under one field manager, a
//! create-once for the cluster Secret, and deletion of objects the spec no longer wants (found by
//! the cluster's instance label).

use std::fmt::Debug;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::build::names::{Names, FIELD_MANAGER, INSTANCE_LABEL};
use crate::build::{certificate, pdb, prometheusrule, servicemonitor, Desired};
use crate::error::{Error, Result};

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn failed(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Apply { what, source }
}

/// Server-side applies one namespaced object and returns what the API server stored.
pub async fn apply<K>(client: &Client, namespace: &str, obj: &K) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(&name, &params(), &Patch::Apply(obj))
        .await
        .map_err(failed(format!("{} {name}", K::kind(&()))))
}

/// Server-side applies a dynamic object (cert-manager Certificate, ServiceMonitor, PrometheusRule).
pub async fn apply_dynamic(
    client: &Client,
    namespace: &str,
    ar: &ApiResource,
    obj: &DynamicObject,
) -> Result<()> {
    let name = obj.name_any();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, ar);
    api.patch(&name, &params(), &Patch::Apply(obj))
        .await
        .map_err(failed(format!("{} {name}", ar.kind)))?;
    Ok(())
}

/// Creates the cluster Secret when it does not exist; an existing one is never touched, so the
/// shared key is not rotated by accident. Returns whether it was created.
pub async fn create_secret_once(client: &Client, namespace: &str, secret: &Secret) -> Result<bool> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = secret.name_any();
    match api.create(&PostParams::default(), secret).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(source) => Err(Error::Apply {
            what: format!("Secret {name}"),
            source,
        }),
    }
}

/// Applies every desired object; returns the client Service as stored (for the endpoint).
pub async fn apply_all(client: &Client, names: &Names, desired: &Desired) -> Result<Service> {
    let ns = names.namespace.as_str();
    apply(client, ns, &desired.service_account).await?;
    apply(client, ns, &desired.role).await?;
    apply(client, ns, &desired.role_binding).await?;
    apply(client, ns, &desired.config_map).await?;
    apply(client, ns, &desired.headless_service).await?;
    let client_service = apply(client, ns, &desired.client_service).await?;
    for svc in &desired.extra_services {
        apply(client, ns, svc).await?;
    }
    apply(client, ns, &desired.statefulset).await?;
    if let Some(pdb) = &desired.pdb {
        let name = pdb.name_any();
        Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
            .patch(&name, &params(), &Patch::Apply(pdb::apply_document(pdb)))
            .await
            .map_err(failed(format!("PodDisruptionBudget {name}")))?;
    }
    if let Some(policy) = &desired.network_policy {
        apply(client, ns, policy).await?;
    }
    if let Some(sm) = &desired.service_monitor {
        apply_dynamic(client, ns, &servicemonitor::api_resource(), sm).await?;
    }
    if let Some(rule) = &desired.prometheus_rule {
        apply_dynamic(client, ns, &prometheusrule::api_resource(), rule).await?;
    }
    // Last, so everything else converges even when cert-manager is missing.
    if let Some(cert) = &desired.certificate {
        match apply_dynamic(client, ns, &certificate::api_resource(), cert).await {
            Err(Error::Apply {
                source: kube::Error::Api(e),
                ..
            }) if e.code == 404 => {
                return Err(Error::MissingApi(
                    "tls.issuerRef needs cert-manager, but the cert-manager.io/v1 Certificate API is not installed".to_string(),
                ));
            }
            other => other?,
        }
    }
    Ok(client_service)
}

/// Deletes owned objects of the pruned kinds that the spec no longer wants. Returns what was deleted.
pub async fn prune(client: &Client, names: &Names, desired: &Desired) -> Result<Vec<String>> {
    let ns = names.namespace.as_str();
    let selector = format!("{INSTANCE_LABEL}={}", names.cluster);
    let mut deleted = Vec::new();
    let mut keep_services = vec![names.client_service(), names.headless_service()];
    keep_services.extend(desired.extra_services.iter().map(|s| s.name_any()));
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    deleted.extend(prune_typed(&services, &selector, &keep_services).await?);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let keep_pdb: Vec<String> = desired.pdb.iter().map(|p| p.name_any()).collect();
    deleted.extend(prune_typed(&pdbs, &selector, &keep_pdb).await?);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let keep_policy: Vec<String> = desired
        .network_policy
        .iter()
        .map(|p| p.name_any())
        .collect();
    deleted.extend(prune_typed(&policies, &selector, &keep_policy).await?);
    for (ar, wanted) in [
        (certificate::api_resource(), &desired.certificate),
        (servicemonitor::api_resource(), &desired.service_monitor),
        (prometheusrule::api_resource(), &desired.prometheus_rule),
    ] {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let keep: Vec<String> = wanted.iter().map(|o| o.name_any()).collect();
        deleted.extend(prune_typed(&api, &selector, &keep).await?);
    }
    Ok(deleted)
}

async fn prune_typed<K>(api: &Api<K>, selector: &str, keep: &[String]) -> Result<Vec<String>>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    let list = match api.list(&ListParams::default().labels(selector)).await {
        Ok(list) => list,
        // The kind is not installed (no cert-manager, no Prometheus Operator): nothing to prune.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Apply {
                what: format!("listing {selector}"),
                source,
            })
        }
    };
    let mut deleted = Vec::new();
    for obj in list.items {
        let name = obj.name_any();
        if keep.contains(&name) {
            continue;
        }
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => deleted.push(name),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Apply {
                    what: format!("deleting {name}"),
                    source,
                })
            }
        }
    }
    Ok(deleted)
}
