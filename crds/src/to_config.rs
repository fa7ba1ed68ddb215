//! How the spec's enums map onto the broker configuration's (`corvid-config`): written once,
//! checked by the compiler, so a renamed or added variant on either side fails the build
//! instead of a pod.

use corvid_config as cfg;

impl From<crate::QueueFullPolicy> for cfg::QueueFullPolicy {
    fn from(p: crate::QueueFullPolicy) -> Self {
        match p {
            crate::QueueFullPolicy::DropOldest => cfg::QueueFullPolicy::DropOldest,
            crate::QueueFullPolicy::DropNew => cfg::QueueFullPolicy::DropNew,
        }
    }
}

impl From<crate::SharedSubscriptionStrategy> for cfg::SharedStrategy {
    fn from(s: crate::SharedSubscriptionStrategy) -> Self {
        match s {
            crate::SharedSubscriptionStrategy::RoundRobin => cfg::SharedStrategy::RoundRobin,
            crate::SharedSubscriptionStrategy::Random => cfg::SharedStrategy::Random,
            crate::SharedSubscriptionStrategy::Sticky => cfg::SharedStrategy::Sticky,
            crate::SharedSubscriptionStrategy::HashClientid => cfg::SharedStrategy::HashClientid,
        }
    }
}

impl From<crate::AclPermission> for cfg::Permission {
    fn from(p: crate::AclPermission) -> Self {
        match p {
            crate::AclPermission::Allow => cfg::Permission::Allow,
            crate::AclPermission::Deny => cfg::Permission::Deny,
        }
    }
}

impl From<crate::AclAction> for cfg::AclAction {
    fn from(a: crate::AclAction) -> Self {
        match a {
            crate::AclAction::Publish => cfg::AclAction::Publish,
            crate::AclAction::Subscribe => cfg::AclAction::Subscribe,
            crate::AclAction::All => cfg::AclAction::All,
        }
    }
}

impl From<&crate::AclWho> for cfg::AclWho {
    fn from(w: &crate::AclWho) -> Self {
        let one = |user, client_id, ip_cidr| {
            cfg::AclWho::One(cfg::AclWhoOne {
                user,
                client_id,
                ip_cidr,
            })
        };
        match (&w.user, &w.client_id, &w.ip_cidr) {
            (Some(u), _, _) => one(Some(u.clone()), None, None),
            (_, Some(c), _) => one(None, Some(c.clone()), None),
            (_, _, Some(ip)) => one(None, None, Some(ip.clone())),
            _ => cfg::AclWho::All(cfg::AllClients::All),
        }
    }
}

impl From<&crate::AclRule> for cfg::AclRule {
    fn from(r: &crate::AclRule) -> Self {
        cfg::AclRule {
            permission: r.permission.into(),
            who: (&r.who).into(),
            action: r.action.into(),
            topics: r.topics.clone(),
        }
    }
}

impl From<crate::KafkaKey> for cfg::KafkaKey {
    fn from(k: crate::KafkaKey) -> Self {
        match k {
            crate::KafkaKey::ClientId => cfg::KafkaKey::ClientId,
            crate::KafkaKey::Topic => cfg::KafkaKey::Topic,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{ListenerKind, Listeners, ADMIN_PORT, CLUSTER_PORT};

    /// Ports are literals in the CRD (CEL rules and schema defaults need them), so a test holds
    /// them to the broker's defaults.
    #[test]
    fn ports_are_the_brokers_defaults() {
        let broker = corvid_config::Config::default();
        assert_eq!(ADMIN_PORT, i32::from(broker.admin.bind.port()));
        assert_eq!(CLUSTER_PORT, i32::from(broker.cluster.port));
        let spec = Listeners::default();
        for (kind, listener) in [
            (ListenerKind::Mqtt, &broker.listeners.mqtt),
            (ListenerKind::Ws, &broker.listeners.ws),
            (ListenerKind::Mqtts, &broker.listeners.mqtts),
            (ListenerKind::Wss, &broker.listeners.wss),
        ] {
            let l = spec.get(kind);
            assert_eq!(l.port, i32::from(listener.bind.port()), "{}", kind.name());
            assert_eq!(l.enabled, listener.enabled, "{}", kind.name());
        }
    }
}
