//! How the spec's enums map onto the broker configuration's (`corvid-config`): written once,
//! checked by the compiler, so a renamed or added variant on either side fails the build
//! instead of a pod.

use corvid_config as cfg;

/// `From<crate::$spec> for cfg::$broker` for enums whose variants have the same names on both
/// sides: a variant missing in the broker's enum fails to compile.
macro_rules! same_variants {
    ($($spec:ident => $broker:ident { $($variant:ident),+ $(,)? })+) => {$(
        impl From<crate::$spec> for cfg::$broker {
            fn from(v: crate::$spec) -> Self {
                match v {
                    $(crate::$spec::$variant => cfg::$broker::$variant,)+
                }
            }
        }
    )+};
}

same_variants! {
    QueueFullPolicy => QueueFullPolicy { DropOldest, DropNew }
    SharedSubscriptionStrategy => SharedStrategy { RoundRobin, Random, Sticky, HashClientid }
    AclPermission => Permission { Allow, Deny }
    AclAction => AclAction { Publish, Subscribe, All }
    KafkaKey => KafkaKey { ClientId, Topic }
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
