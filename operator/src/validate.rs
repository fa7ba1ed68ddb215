//! Semantic checks that the CRD's CEL rules also make, repeated here so that an object admitted by
//! an API server without CEL support (or edited with validation off) never reaches the builders.
//! A failure is a `Invalid` error: the controller records it and waits for the next spec change.

use std::collections::BTreeSet;

use corvid_crds::{
    ListenerKind, LoadBalancerProvider, MqttCluster, ServiceListener, ServiceType, TlsMode,
    ADMIN_PORT, CLUSTER_PORT,
};
use serde_json::Value;

use crate::build::Names;

/// Facts established by validation that the builders rely on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Validated {
    /// The broker configuration file, built from the spec with `spec.config` merged on top and
    /// accepted by the broker's own parser.
    pub config_file: serde_yaml::Value,
}

/// Why a spec cannot be reconciled; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Checks the spec; every error message names the offending field.
pub fn validate(cluster: &MqttCluster) -> Result<Validated, InvalidSpec> {
    let spec = &cluster.spec;
    let invalid = |m: &str| Err(InvalidSpec(m.to_string()));
    if spec.replicas < 1 {
        return invalid("spec.replicas must be at least 1");
    }
    let mut ports = BTreeSet::from([ADMIN_PORT, CLUSTER_PORT]);
    for kind in ListenerKind::ALL {
        let listener = spec.listeners.get(kind);
        if listener.enabled && !ports.insert(listener.port) {
            return Err(InvalidSpec(format!(
                "listeners.{}.port {} is used twice (listener ports, 18083 and 4370 must be unique)",
                kind.name(),
                listener.port
            )));
        }
    }
    let tls_listener = spec.listeners.mqtts.enabled || spec.listeners.wss.enabled;
    match spec.tls.mode {
        TlsMode::None if tls_listener => {
            return invalid(
                "listeners.mqtts and listeners.wss need tls.mode broker or loadBalancer",
            );
        }
        TlsMode::Broker if spec.tls.secret_name.is_none() && spec.tls.issuer_ref.is_none() => {
            return invalid("tls.mode: broker needs tls.secretName or tls.issuerRef");
        }
        TlsMode::LoadBalancer => match &spec.tls.load_balancer {
            None => return invalid("tls.mode: loadBalancer needs tls.loadBalancer"),
            Some(lb) if lb.provider == LoadBalancerProvider::Aws && lb.certificate.is_none() => {
                return invalid("tls.loadBalancer.certificate is required for provider aws");
            }
            Some(lb) if lb.proxy_trusted_ranges.iter().any(|r| !is_cidr(r)) => {
                let bad = lb
                    .proxy_trusted_ranges
                    .iter()
                    .find(|r| !is_cidr(r))
                    .cloned()
                    .unwrap_or_default();
                return Err(InvalidSpec(format!(
                    "tls.loadBalancer.proxyTrustedRanges: {bad:?} is not an address or CIDR \
                     (e.g. 10.0.0.0/16)"
                )));
            }
            Some(_) => {}
        },
        _ => {}
    }
    let exposed = matches!(
        spec.service.type_,
        corvid_crds::ServiceType::LoadBalancer | corvid_crds::ServiceType::NodePort
    );
    let auth = &spec.auth;
    if exposed
        && auth.users_secret.is_none()
        && auth.http.is_none()
        && auth.allow_anonymous != Some(true)
    {
        return invalid(
            "service.type LoadBalancer or NodePort exposes the brokers beyond the cluster: \
             configure auth.usersSecret or auth.http, or set auth.allowAnonymous: true on purpose",
        );
    }
    if !ListenerKind::ALL
        .iter()
        .any(|k| spec.listeners.get(*k).enabled)
    {
        return invalid("listeners: at least one listener must be enabled");
    }
    services(cluster)?;
    if crate::expand::quantity_millis(&spec.persistence.size).is_none() {
        return Err(InvalidSpec(format!(
            "persistence.size {:?} must be a quantity such as 10Gi",
            spec.persistence.size
        )));
    }
    let bridge_names: Vec<&str> = (spec.bridges.mqtt.iter().map(|b| b.name.as_str()))
        .chain(spec.bridges.kafka.iter().map(|b| b.name.as_str()))
        .collect();
    if let Some(dup) = (1..bridge_names.len()).find_map(|i| {
        bridge_names[..i]
            .contains(&bridge_names[i])
            .then_some(bridge_names[i])
    }) {
        return Err(InvalidSpec(format!(
            "bridges: the name {dup:?} is used twice (names are unique across mqtt and kafka)"
        )));
    }
    crate::build::podtemplate::check(&spec.pod_template)?;
    let overrides = match &spec.config {
        None => None,
        Some(v @ Value::Object(_)) => Some(v),
        Some(_) => return invalid("spec.config must be an object"),
    };
    let config_file = crate::build::config::file(cluster, &Names::of(cluster), overrides)?;
    Ok(Validated { config_file })
}

/// Checks spec.service.listeners and spec.services (the CRD's CEL rules, plus the Service name's
/// length, which CEL cannot see because it includes the cluster's name). Whether the Services
/// agree on PROXY protocol per listener is checked when the configuration is built.
fn services(cluster: &MqttCluster) -> Result<(), InvalidSpec> {
    let spec = &cluster.spec;
    let names = Names::of(cluster);
    let listeners_ok = |field: &str, named: &[ServiceListener]| {
        for (i, l) in named.iter().enumerate() {
            let kind = ListenerKind::from(*l);
            if named[..i].contains(l) {
                return Err(InvalidSpec(format!(
                    "{field}.listeners must not name a listener twice ({})",
                    kind.name()
                )));
            }
            if !spec.listeners.get(kind).enabled {
                return Err(InvalidSpec(format!(
                    "{field}.listeners names {}, which is not enabled (listeners.{}.enabled)",
                    kind.name(),
                    kind.name()
                )));
            }
        }
        Ok(())
    };
    listeners_ok("service", &spec.service.listeners)?;
    let auth = &spec.auth;
    let authenticated =
        auth.users_secret.is_some() || auth.http.is_some() || auth.allow_anonymous == Some(true);
    for (i, s) in spec.services.iter().enumerate() {
        let field = format!("services[{}]", s.name);
        let fail = |m: String| Err(InvalidSpec(format!("{field}: {m}")));
        if !is_dns_label(&s.name) {
            return fail(
                "name must be lowercase letters, digits and '-', start with a letter and end \
                 with a letter or digit"
                    .to_string(),
            );
        }
        if s.name == "headless" {
            return fail(
                "name must not be headless: <cluster>-headless is the operator's \
                 peer-discovery Service"
                    .to_string(),
            );
        }
        let full = names.extra_service(&s.name);
        if full.len() > 63 {
            return fail(format!(
                "the Service name {full:?} is longer than 63 characters; shorten the name"
            ));
        }
        if spec.services[..i].iter().any(|t| t.name == s.name) {
            return fail("name is used twice (services[].name must be unique)".to_string());
        }
        let lb = s.type_ == ServiceType::LoadBalancer;
        if !lb && (s.load_balancer_class.is_some() || !s.load_balancer_source_ranges.is_empty()) {
            return fail(
                "loadBalancerClass and loadBalancerSourceRanges need type LoadBalancer".to_string(),
            );
        }
        if s.type_ == ServiceType::ClusterIP && s.external_traffic_policy.is_some() {
            return fail("externalTrafficPolicy needs type NodePort or LoadBalancer".to_string());
        }
        if !s.proxy_protocol && !s.proxy_trusted_ranges.is_empty() {
            return fail("proxyTrustedRanges needs proxyProtocol: true".to_string());
        }
        if let Some(bad) = s.proxy_trusted_ranges.iter().find(|r| !is_cidr(r)) {
            return fail(format!(
                "proxyTrustedRanges: {bad:?} is not an address or CIDR (e.g. 10.0.0.0/16)"
            ));
        }
        listeners_ok(&format!("services[{}]", s.name), &s.listeners)?;
        if matches!(s.type_, ServiceType::LoadBalancer | ServiceType::NodePort) && !authenticated {
            return fail(
                "type LoadBalancer or NodePort exposes the brokers beyond the cluster: configure \
                 auth.usersSecret or auth.http, or set auth.allowAnonymous: true on purpose"
                    .to_string(),
            );
        }
        let exposes_tls = crate::build::service::exposed(cluster, &s.listeners)
            .iter()
            .any(|k| k.is_tls());
        if spec.tls.mode == TlsMode::LoadBalancer && exposes_tls && !lb {
            return fail(
                "with tls.mode loadBalancer, a Service that exposes mqtts or wss must be type \
                 LoadBalancer (TLS ends at the load balancer)"
                    .to_string(),
            );
        }
    }
    Ok(())
}

/// Whether `s` is a DNS-1035 label start (lowercase letters, digits, '-'; a letter first, no
/// '-' last); the length is checked on the whole Service name.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_lowercase)
        && b.last()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Whether `s` is an IP address or an address with a prefix length (`10.0.0.0/16`, `::1/128`).
fn is_cidr(s: &str) -> bool {
    let (ip, prefix) = s.split_once('/').unwrap_or((s, ""));
    match ip.parse::<std::net::IpAddr>() {
        Ok(_) if prefix.is_empty() => true,
        Ok(addr) => {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            prefix.parse::<u8>().is_ok_and(|p| p <= max)
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::validate;
    use crate::testing::cluster;

    fn error(spec: serde_json::Value) -> String {
        validate(&cluster(spec))
            .err()
            .map(|e| e.0)
            .unwrap_or_default()
    }

    #[test]
    fn default_spec_is_valid() {
        assert!(validate(&cluster(json!({}))).is_ok());
    }

    #[test]
    fn exposed_clusters_need_authentication_or_explicit_anonymous_access() {
        let message = error(json!({"service": {"type": "LoadBalancer"}}));
        assert!(message.contains("auth.allowAnonymous: true"), "{message}");
        assert!(
            error(json!({"service": {"type": "NodePort"}, "auth": {"allowAnonymous": false}}))
                .contains("auth.usersSecret")
        );
        for auth in [
            json!({"allowAnonymous": true}),
            json!({"usersSecret": {"name": "u"}}),
            json!({"http": {"url": "http://auth"}}),
        ] {
            assert_eq!(
                error(json!({"service": {"type": "LoadBalancer"}, "auth": auth})),
                ""
            );
        }
    }

    #[test]
    fn proxy_trusted_ranges_must_be_addresses_or_cidrs() {
        let spec = |ranges: serde_json::Value| {
            json!({
                "service": {"type": "LoadBalancer"}, "auth": {"allowAnonymous": true},
                "listeners": {"mqtts": {"enabled": true, "port": 8883}},
                "tls": {"mode": "loadBalancer", "loadBalancer": {"provider": "raw",
                        "annotations": {"a": "b"}, "proxyProtocol": true,
                        "proxyTrustedRanges": ranges}},
            })
        };
        assert_eq!(
            error(spec(json!(["10.0.0.0/16", "192.0.2.7", "2001:db8::/32"]))),
            ""
        );
        for bad in ["10.0.0.0/33", "vpc", "10.0.0/8", "::/129"] {
            let message = error(spec(json!([bad])));
            assert!(
                message.starts_with("tls.loadBalancer.proxyTrustedRanges") && message.contains(bad),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            error(json!({"replicas": 0})),
            "spec.replicas must be at least 1"
        );
        assert!(
            error(json!({"listeners": {"ws": {"enabled": true, "port": 1883}}}))
                .starts_with("listeners.ws.port 1883")
        );
        assert!(
            error(json!({"listeners": {"mqtt": {"enabled": true, "port": 4370}}}))
                .starts_with("listeners.mqtt.port")
        );
        assert_eq!(
            error(
                json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}}, "tls": {"mode": "broker"}})
            ),
            "tls.mode: broker needs tls.secretName or tls.issuerRef"
        );
        assert!(
            error(json!({"listeners": {"mqtts": {"enabled": true, "port": 8883}}}))
                .starts_with("listeners.mqtts")
        );
        assert_eq!(
            error(json!({"config": [1, 2]})),
            "spec.config must be an object"
        );
        assert_eq!(
            error(
                json!({"listeners": {"mqtt": {"enabled": false, "port": 1}, "ws": {"enabled": false, "port": 2}}})
            ),
            "listeners: at least one listener must be enabled"
        );
    }

    #[test]
    fn disabled_listeners_may_share_ports() {
        assert!(validate(&cluster(
            json!({"listeners": {"wss": {"enabled": false, "port": 1883}}})
        ))
        .is_ok());
    }
}
