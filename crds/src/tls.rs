//! TLS: where it terminates (nowhere, at the cloud load balancer, or in the broker) and where the
//! certificate comes from.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// TLS settings of the client listeners mqtts and wss.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'broker' || has(self.secretName) || has(self.issuerRef)")
        .message("tls.mode: broker needs tls.secretName or tls.issuerRef"),
    validation = Rule::new("!(has(self.secretName) && has(self.issuerRef))")
        .message("tls.secretName and tls.issuerRef are mutually exclusive"),
    validation = Rule::new("self.mode != 'loadBalancer' || has(self.loadBalancer)")
        .message("tls.mode: loadBalancer needs tls.loadBalancer")
)]
pub struct TlsSpec {
    /// none: no TLS listener. loadBalancer: TLS ends at the cloud load balancer, which forwards plain
    /// MQTT/WebSocket to the pods. broker: the broker terminates TLS with a certificate from
    /// secretName or from a cert-manager Certificate created from issuerRef; renewals are picked up
    /// without restarting pods.
    #[serde(default)]
    pub mode: TlsMode,
    /// broker mode: an existing kubernetes.io/tls Secret (keys tls.crt, tls.key, optional ca.crt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// broker mode: the cert-manager issuer that signs a Certificate the operator creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
    /// broker mode with issuerRef: extra DNS names for the certificate (the Service names are always included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// loadBalancer mode: a cloud preset or raw Service annotations, and PROXY protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerTls>,
}

/// Where client TLS terminates.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "camelCase")]
pub enum TlsMode {
    /// No TLS.
    #[default]
    None,
    /// TLS ends at the cloud load balancer.
    LoadBalancer,
    /// TLS ends in the broker pod.
    Broker,
}

/// Reference to a cert-manager Issuer or ClusterIssuer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the issuer.
    pub name: String,
    /// Issuer or ClusterIssuer.
    #[serde(default = "default_issuer_kind")]
    pub kind: String,
    /// API group of the issuer.
    #[serde(default = "default_issuer_group")]
    pub group: String,
}

fn default_issuer_kind() -> String {
    "Issuer".to_string()
}

fn default_issuer_group() -> String {
    "cert-manager.io".to_string()
}

/// TLS termination at a cloud load balancer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.provider != 'aws' || has(self.certificate)")
        .message("tls.loadBalancer.certificate (an ACM certificate ARN) is required for provider aws"),
    validation = Rule::new("self.provider != 'raw' || size(self.annotations) > 0")
        .message("tls.loadBalancer.annotations must be set for provider raw")
)]
pub struct LoadBalancerTls {
    /// Preset that writes the Service annotations: aws (NLB with an ACM certificate), gcp, azure,
    /// or raw (only the annotations below).
    pub provider: LoadBalancerProvider,
    /// Certificate reference for the preset: the ACM ARN on aws, the pre-shared certificate name on
    /// gcp, the Key Vault certificate id on azure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Annotations added to the client Service after the preset's (they win on conflict).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// PROXY protocol v2 end to end: the load balancer sends it and the broker expects it, so the
    /// broker sees real client addresses. Both sides are switched together.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Source ranges (CIDRs) the PROXY header is believed from: the load balancer's addresses,
    /// e.g. the VPC's CIDR for an AWS NLB. Empty: any sender, so any pod that reaches the broker
    /// directly could forge the client address ACL `ipCidr` rules and the HTTP backend see.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub proxy_trusted_ranges: Vec<String>,
}

/// Cloud load-balancer preset.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancerProvider {
    /// AWS Network Load Balancer via the AWS Load Balancer Controller.
    Aws,
    /// Google Cloud load balancer.
    Gcp,
    /// Azure load balancer.
    Azure,
    /// Only the raw annotations.
    Raw,
}
