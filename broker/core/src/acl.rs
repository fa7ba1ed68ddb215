//! Topic access control: ordered allow/deny rules, first match decides, else the no-match
//! policy. Pure (no I/O), so the matching rules are unit-tested here in one place.
//!
//! Rules are compiled once at start-up; when a client connects, [`Acl::for_client`] keeps only
//! the rules whose `who` selects that client and substitutes `%u` / `%c`, so checking a PUBLISH
//! afterwards is a walk over a short list of plain filters with no allocation.
//!
//! For SUBSCRIBE a rule's filter must *cover* the requested filter: every topic the
//! subscription could match must be matched by the rule. Wildcards in the subscription are
//! taken literally (as EMQX does): rule `a/+` covers `a/+` and `a/b`, not `a/#`; rule `a/b`
//! does not cover `a/+`. The `eq FILTER` form matches only that exact filter (or topic name).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{AclAction, AclConfig, AclRule, AclTopic, AclWho, Permission};
use crate::topic;

/// A rule that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// `ip_cidr` is not an address range.
    #[error("rule {index}: ip_cidr {value:?} is not a CIDR range")]
    BadCidr {
        /// Rule position.
        index: usize,
        /// The value.
        value: String,
    },
    /// A topic filter is malformed.
    #[error("rule {index}: topic {value:?}: {reason}")]
    BadTopic {
        /// Rule position.
        index: usize,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// What a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH to a topic name.
    Publish,
    /// SUBSCRIBE to a filter.
    Subscribe,
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// Client id.
    pub client_id: &'a str,
    /// User name, if any.
    pub username: Option<&'a str>,
    /// Address.
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    All,
    User(String),
    ClientId(String),
    Cidr(IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// A filter, matched by MQTT rules (`%u`/`%c` substituted per client).
    Filter(String),
    /// `eq FILTER`: only that literal string.
    Eq(String),
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    permission: Permission,
    who: Who,
    action: AclAction,
    topics: Vec<Pattern>,
}

impl Rule {
    /// Compiles a configured rule; `index` names it in errors.
    pub fn compile(index: usize, r: &AclRule) -> Result<Rule, AclError> {
        let who = match &r.who {
            AclWho::All(_) => Who::All,
            AclWho::One(w) => {
                if let Some(u) = &w.user {
                    Who::User(u.clone())
                } else if let Some(c) = &w.client_id {
                    Who::ClientId(c.clone())
                } else if let Some(n) = &w.ip_cidr {
                    Who::Cidr(parse_cidr(n).ok_or_else(|| AclError::BadCidr {
                        index,
                        value: n.clone(),
                    })?)
                } else {
                    Who::All
                }
            }
        };
        let mut topics = Vec::with_capacity(r.topics.len());
        for t in &r.topics {
            let parsed = AclTopic::parse(t).map_err(|reason| AclError::BadTopic {
                index,
                value: t.clone(),
                reason,
            })?;
            topics.push(match parsed {
                AclTopic::Eq(f) => Pattern::Eq(f.to_string()),
                AclTopic::Filter(f) => Pattern::Filter(f.to_string()),
            });
        }
        Ok(Rule {
            permission: r.permission,
            who,
            action: r.action,
            topics,
        })
    }

    fn selects(&self, c: &Client<'_>) -> bool {
        match &self.who {
            Who::All => true,
            Who::User(u) => c.username == Some(u.as_str()),
            Who::ClientId(id) => c.client_id == id,
            Who::Cidr(net) => net.contains(&canonical(c.ip)),
        }
    }

    /// This rule with `who` resolved and placeholders substituted for one client; `None`
    /// when it does not apply to the client (a `%u` rule for a client without a user name
    /// keeps only its other topics).
    fn bind(&self, c: &Client<'_>) -> Option<Rule> {
        if !self.selects(c) {
            return None;
        }
        let topics: Vec<Pattern> = self
            .topics
            .iter()
            .filter_map(|p| match p {
                Pattern::Filter(f) => substitute(f, c).map(Pattern::Filter),
                Pattern::Eq(f) => Some(Pattern::Eq(f.clone())),
            })
            .collect();
        if topics.is_empty() {
            return None;
        }
        Some(Rule {
            permission: self.permission,
            who: Who::All,
            action: self.action,
            topics,
        })
    }

    fn applies(&self, action: Action, topic: &str) -> bool {
        let act = matches!(
            (self.action, action),
            (AclAction::All, _)
                | (AclAction::Publish, Action::Publish)
                | (AclAction::Subscribe, Action::Subscribe)
        );
        act && self.topics.iter().any(|p| match (p, action) {
            (Pattern::Eq(f), _) => f == topic,
            (Pattern::Filter(f), Action::Publish) => topic::matches(f, topic),
            (Pattern::Filter(f), Action::Subscribe) => covers(f, topic),
        })
    }
}

/// The configured rules and policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
    no_match: Permission,
}

impl Acl {
    /// Compiles the `acl` section.
    pub fn new(cfg: &AclConfig) -> Result<Acl, AclError> {
        let rules = cfg
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(i, r))
            .collect::<Result<_, _>>()?;
        Ok(Acl {
            rules,
            no_match: cfg.no_match,
        })
    }

    /// The rules for one connected client: `extra` (from the HTTP auth backend) first, then
    /// the configured ones.
    pub fn for_client(&self, c: &Client<'_>, extra: &[Rule]) -> ClientAcl {
        let rules: Vec<Rule> = extra
            .iter()
            .chain(self.rules.iter())
            .filter_map(|r| r.bind(c))
            .collect();
        if rules.is_empty() && self.no_match == Permission::Allow {
            return ClientAcl::AllowAll;
        }
        ClientAcl::Rules {
            rules,
            no_match: self.no_match,
        }
    }
}

/// One client's effective ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAcl {
    /// Nothing to check (the default configuration).
    AllowAll,
    /// Rules that apply to this client, placeholders resolved.
    Rules {
        /// In order.
        rules: Vec<Rule>,
        /// Decision when none matches.
        no_match: Permission,
    },
}

/// The one [`ClientAcl::AllowAll`] every connection shares when no rule applies to it (the
/// default configuration), instead of an allocation each.
static ALLOW_ALL: std::sync::LazyLock<std::sync::Arc<ClientAcl>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(ClientAcl::AllowAll));

impl ClientAcl {
    /// This ACL behind an `Arc`, shared with every other connection's when it checks nothing.
    pub fn shared(self) -> std::sync::Arc<ClientAcl> {
        match self {
            ClientAcl::AllowAll => ALLOW_ALL.clone(),
            rules => std::sync::Arc::new(rules),
        }
    }
}

impl ClientAcl {
    /// Decides a PUBLISH to the topic name `topic` or a SUBSCRIBE to the filter `topic`
    /// (without any `$share/{group}/` prefix).
    pub fn check(&self, action: Action, topic: &str) -> Permission {
        match self {
            ClientAcl::AllowAll => Permission::Allow,
            ClientAcl::Rules { rules, no_match } => rules
                .iter()
                .find(|r| r.applies(action, topic))
                .map_or(*no_match, |r| r.permission),
        }
    }
}

impl ClientAcl {
    /// Whether a rule explicitly lets this client read the topic name `topic`: the first
    /// rule that matches it for SUBSCRIBE allows. `no_match` (and the rule-less default)
    /// never grants this — it is the gate for `$SYS` topics that name other clients.
    pub fn explicitly_allows_read(&self, topic: &str) -> bool {
        match self {
            ClientAcl::AllowAll => false,
            ClientAcl::Rules { rules, .. } => rules
                .iter()
                .find(|r| r.applies(Action::Subscribe, topic))
                .is_some_and(|r| r.permission == Permission::Allow),
        }
    }
}

/// Whether the rule filter `rule` covers every topic the subscription filter `sub` can match.
pub fn covers(rule: &str, sub: &str) -> bool {
    // A leading wildcard never reaches `$` topics [MQTT-4.7.2-1], so it cannot cover them.
    if sub.starts_with('$') && (rule.starts_with('+') || rule.starts_with('#')) {
        return false;
    }
    let mut r = rule.split('/');
    let mut s = sub.split('/');
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b && b != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether an identity (client id, user name) may stand in for a placeholder: it must be
/// one plain topic level, so it can never widen a rule — no `+`, `#`, `/` or U+0000.
pub fn placeholder_safe(identity: &str) -> bool {
    !identity.contains(['+', '#', '/', '\0'])
}

/// Substitutes `%u` and `%c` in an ACL filter or auto-subscription. `None` — the filter does
/// not apply to this client — when `%u` is used and the client has no user name, or when the
/// identity substituted is not [`placeholder_safe`] (a client id `#` must not turn
/// `devices/%c/#` into `devices/#/#`, nor `+` into everyone's `devices/+/#`).
pub fn substitute(filter: &str, c: &Client<'_>) -> Option<String> {
    if !filter.contains('%') {
        return Some(filter.to_string());
    }
    if filter.contains("%u") && !c.username.is_some_and(placeholder_safe) {
        return None;
    }
    if filter.contains("%c") && !placeholder_safe(c.client_id) {
        return None;
    }
    Some(
        filter
            .replace("%u", c.username.unwrap_or(""))
            .replace("%c", c.client_id),
    )
}

pub use crate::config::net::{canonical, parse_cidr};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AclWhoOne, AllClients};

    fn rule(p: Permission, who: AclWho, action: AclAction, topics: &[&str]) -> AclRule {
        AclRule {
            permission: p,
            who,
            action,
            topics: topics.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn user(u: &str) -> AclWho {
        AclWho::One(AclWhoOne {
            user: Some(u.into()),
            ..Default::default()
        })
    }

    fn cid(c: &str) -> AclWho {
        AclWho::One(AclWhoOne {
            client_id: Some(c.into()),
            ..Default::default()
        })
    }

    fn cidr(c: &str) -> AclWho {
        AclWho::One(AclWhoOne {
            ip_cidr: Some(c.into()),
            ..Default::default()
        })
    }

    const ALL: AclWho = AclWho::All(AllClients::All);

    fn client<'a>(id: &'a str, user: Option<&'a str>, ip: &str) -> Client<'a> {
        Client {
            client_id: id,
            username: user,
            ip: ip.parse().expect("ip"),
        }
    }

    fn acl(no_match: Permission, rules: Vec<AclRule>) -> Acl {
        Acl::new(&AclConfig { no_match, rules }).expect("compiles")
    }

    /// Everyone may do anything on `topics`, nothing else.
    fn allow_only(topics: &[&str]) -> Acl {
        acl(Deny, vec![rule(Allow, ALL, AclAction::All, topics)])
    }

    /// `a` as it applies to a client on the loopback address with no extra rules.
    fn local(a: &Acl, id: &str, user: Option<&str>) -> ClientAcl {
        a.for_client(&client(id, user, "127.0.0.1"), &[])
    }

    use Action::{Publish as P, Subscribe as S};
    use Permission::{Allow, Deny};

    #[test]
    fn covers_treats_subscription_wildcards_literally() {
        assert!(covers("a/b", "a/b"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/#", "a"));
        assert!(covers("#", "a/#"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(covers("+/+", "+/+"));
        assert!(!covers("+", "+/+"));
        assert!(!covers("a/b/c", "a/b"));
        assert!(!covers("a/b", "a/b/c"));
        assert!(!covers("#", "$SYS/#"));
        assert!(!covers("+/brokers", "$SYS/brokers"));
        assert!(covers("$SYS/#", "$SYS/brokers/+/uptime"));
    }

    #[test]
    fn default_config_allows_everything_without_rules() {
        let a = Acl::new(&AclConfig::default()).expect("compiles");
        let c = local(&a, "c", None);
        assert_eq!(c, ClientAcl::AllowAll);
        assert_eq!(c.check(P, "x"), Allow);
        assert_eq!(c.check(S, "#"), Allow);
    }

    #[test]
    fn first_match_wins_then_no_match() {
        let a = acl(
            Deny,
            vec![
                rule(Deny, ALL, AclAction::Publish, &["a/secret"]),
                rule(Allow, ALL, AclAction::All, &["a/#"]),
            ],
        );
        let c = local(&a, "c", None);
        assert_eq!(c.check(P, "a/secret"), Deny);
        assert_eq!(c.check(S, "a/secret"), Allow); // the deny rule is publish-only
        assert_eq!(c.check(P, "a/x"), Allow);
        assert_eq!(c.check(P, "b"), Deny);
    }

    #[test]
    fn who_user_client_id_and_cidr() {
        let a = acl(
            Deny,
            vec![
                rule(Allow, user("dashboard"), AclAction::Subscribe, &["$SYS/#"]),
                rule(Allow, cid("sensor-1"), AclAction::Publish, &["s/1"]),
                rule(Allow, cidr("10.1.0.0/16"), AclAction::Publish, &["lan/#"]),
                rule(Allow, cidr("192.168.1.7"), AclAction::Publish, &["one"]),
            ],
        );
        let dash = local(&a, "x", Some("dashboard"));
        assert_eq!(dash.check(S, "$SYS/#"), Allow);
        assert_eq!(dash.check(S, "$SYS/brokers/n1/uptime"), Allow);
        assert_eq!(dash.check(P, "$SYS/x"), Deny);
        let other = local(&a, "x", Some("bob"));
        assert_eq!(other.check(S, "$SYS/#"), Deny);
        let s1 = local(&a, "sensor-1", None);
        assert_eq!(s1.check(P, "s/1"), Allow);
        let lan = a.for_client(&client("y", None, "10.1.2.3"), &[]);
        assert_eq!(lan.check(P, "lan/a"), Allow);
        let mapped = a.for_client(&client("y", None, "::ffff:10.1.2.3"), &[]);
        assert_eq!(mapped.check(P, "lan/a"), Allow);
        let wan = a.for_client(&client("y", None, "10.2.0.1"), &[]);
        assert_eq!(wan.check(P, "lan/a"), Deny);
        let host = a.for_client(&client("y", None, "192.168.1.7"), &[]);
        assert_eq!(host.check(P, "one"), Allow);
    }

    #[test]
    fn placeholders() {
        let a = allow_only(&["devices/%c/#", "users/%u/inbox"]);
        let c = local(&a, "d1", Some("ann"));
        assert_eq!(c.check(P, "devices/d1/temp"), Allow);
        assert_eq!(c.check(P, "devices/d2/temp"), Deny);
        assert_eq!(c.check(S, "devices/d1/#"), Allow);
        assert_eq!(c.check(S, "devices/+/temp"), Deny);
        assert_eq!(c.check(S, "users/ann/inbox"), Allow);
        assert_eq!(c.check(S, "users/bob/inbox"), Deny);
        // No user name: the %u topic is skipped, the %c one still applies.
        let anon = local(&a, "d1", None);
        assert_eq!(anon.check(S, "users//inbox"), Deny);
        assert_eq!(anon.check(S, "users/%u/inbox"), Deny);
        assert_eq!(anon.check(P, "devices/d1/x"), Allow);
    }

    #[test]
    fn identities_with_wildcards_or_separators_never_widen_a_rule() {
        let a = allow_only(&["devices/%c/#", "users/%u/inbox", "public/#"]);
        for (id, user) in [
            ("+", Some("ann")),
            ("#", Some("ann")),
            ("a/b", Some("ann")),
            ("x\0y", Some("ann")),
        ] {
            let c = a.for_client(&client(id, user, "127.0.0.1"), &[]);
            assert_eq!(c.check(S, "devices/+/#"), Deny, "{id:?}");
            assert_eq!(c.check(S, "devices/#"), Deny, "{id:?}");
            assert_eq!(c.check(P, "devices/a/b/x"), Deny, "{id:?}");
            assert_eq!(c.check(P, &format!("devices/{id}/x")), Deny, "{id:?}");
            // The rule's other topics still apply; so does a safe user name.
            assert_eq!(c.check(P, "public/x"), Allow, "{id:?}");
            assert_eq!(c.check(S, "users/ann/inbox"), Allow, "{id:?}");
        }
        for user in ["+", "#", "a/b", "\0"] {
            let c = a.for_client(&client("d1", Some(user), "127.0.0.1"), &[]);
            assert_eq!(c.check(S, "users/+/inbox"), Deny, "{user:?}");
            assert_eq!(c.check(S, &format!("users/{user}/inbox")), Deny, "{user:?}");
            assert_eq!(c.check(P, "devices/d1/x"), Allow, "{user:?}");
        }
        // A rule whose only topic substitutes an unsafe identity does not apply at all.
        let only = acl(
            Allow,
            vec![rule(Deny, ALL, AclAction::All, &["devices/%c/#"])],
        );
        let c = only.for_client(&client("#", None, "127.0.0.1"), &[]);
        assert_eq!(c, ClientAcl::AllowAll);
    }

    #[test]
    fn only_an_explicit_rule_grants_reading_a_topic() {
        let topic = "$SYS/brokers/n1/clients/c1/connected";
        let none = Acl::new(&AclConfig::default()).expect("compiles");
        assert!(!none
            .for_client(&client("c", None, "127.0.0.1"), &[])
            .explicitly_allows_read(topic));
        let a = acl(
            Allow,
            vec![
                rule(
                    Deny,
                    ALL,
                    AclAction::Subscribe,
                    &["$SYS/brokers/+/clients/#"],
                ),
                rule(Allow, user("dash"), AclAction::Subscribe, &["$SYS/#"]),
            ],
        );
        let dash = local(&a, "d", Some("dash"));
        assert!(!dash.explicitly_allows_read(topic)); // the deny rule comes first
        assert!(dash.explicitly_allows_read("$SYS/brokers/n1/uptime"));
        let b = acl(
            Deny,
            vec![rule(Allow, user("dash"), AclAction::Subscribe, &["$SYS/#"])],
        );
        let dash = b.for_client(&client("d", Some("dash"), "127.0.0.1"), &[]);
        assert!(dash.explicitly_allows_read(topic));
        let other = b.for_client(&client("o", Some("other"), "127.0.0.1"), &[]);
        assert!(!other.explicitly_allows_read(topic));
    }

    #[test]
    fn eq_matches_only_the_literal_filter() {
        let a = acl(
            Allow,
            vec![rule(Deny, ALL, AclAction::Subscribe, &["eq #", "eq a/%c"])],
        );
        let c = local(&a, "c1", None);
        assert_eq!(c.check(S, "#"), Deny);
        assert_eq!(c.check(S, "a/#"), Allow);
        assert_eq!(c.check(S, "x/y"), Allow);
        // eq takes no placeholders: only the literal `a/%c`.
        assert_eq!(c.check(S, "a/c1"), Allow);
        assert_eq!(c.check(S, "a/%c"), Deny);
        let a = acl(
            Deny,
            vec![rule(Allow, ALL, AclAction::Subscribe, &["eq t/#"])],
        );
        let c = local(&a, "c1", None);
        assert_eq!(c.check(S, "t/#"), Allow);
        assert_eq!(c.check(S, "t/a"), Deny);
        assert_eq!(c.check(S, "t/+"), Deny);
    }

    #[test]
    fn extra_rules_come_first() {
        let a = acl(Allow, vec![rule(Deny, ALL, AclAction::All, &["x/#"])]);
        let extra = vec![
            Rule::compile(0, &rule(Allow, ALL, AclAction::Publish, &["x/mine"])).expect("compiles"),
        ];
        let c = a.for_client(&client("c", None, "127.0.0.1"), &extra);
        assert_eq!(c.check(P, "x/mine"), Allow);
        assert_eq!(c.check(P, "x/other"), Deny);
    }

    #[test]
    fn bad_rules_are_named() {
        let e = Acl::new(&AclConfig {
            no_match: Deny,
            rules: vec![rule(Allow, cidr("10.0.0.0/99"), AclAction::All, &["a"])],
        })
        .expect_err("bad cidr");
        assert!(e.to_string().contains("rule 0"), "{e}");
        let e = Acl::new(&AclConfig {
            no_match: Deny,
            rules: vec![rule(Allow, ALL, AclAction::All, &["a/#/b"])],
        })
        .expect_err("bad filter");
        assert!(e.to_string().contains("a/#/b"), "{e}");
    }
}
