//! cert-manager Certificate for tls.mode broker with an issuerRef. Built as a dynamic object so
//! the operator does not depend on cert-manager's types (or on cert-manager being installed when
//! nobody asks for it).

use corvid_crds::{MqttCluster, TlsMode};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::names::{owned_meta, Names};

/// API resource of cert-manager Certificates.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// The Certificate, or None when the spec does not ask cert-manager for one.
pub fn build(cluster: &MqttCluster, names: &Names) -> Option<DynamicObject> {
    let tls = &cluster.spec.tls;
    let issuer = tls
        .issuer_ref
        .as_ref()
        .filter(|_| tls.mode == TlsMode::Broker)?;
    let ns = &names.namespace;
    let client = names.client_service();
    let headless = names.headless_service();
    let mut dns = vec![
        client.clone(),
        format!("{client}.{ns}"),
        format!("{client}.{ns}.svc"),
        format!("*.{headless}.{ns}.svc"),
    ];
    for extra in &cluster.spec.services {
        let svc = names.extra_service(&extra.name);
        dns.extend([
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
        ]);
    }
    dns.extend(tls.dns_names.iter().cloned());
    let mut obj = DynamicObject::new(&names.tls_secret(), &api_resource());
    obj.metadata = owned_meta(cluster, names, names.tls_secret());
    obj.data = json!({
        "spec": {
            "secretName": names.tls_secret(),
            "issuerRef": { "name": issuer.name, "kind": issuer.kind, "group": issuer.group },
            "dnsNames": dns,
            "privateKey": { "rotationPolicy": "Always" },
            "usages": ["server auth", "digital signature", "key encipherment"],
        }
    });
    Some(obj)
}
