//! The subscription router against a naive matcher written from the MQTT rules (4.7): random
//! subscribe / unsubscribe sequences over small alphabets (so filters collide and overlap),
//! with `+`, `#`, empty levels, `$` topics and shared groups, then random topics routed. The
//! trie must agree with checking every live subscription one by one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytestring::ByteString;
use corvid_broker::codec::{QoS, SubOptions};
use corvid_broker::config::SharedStrategy;
use corvid_broker::router::Router;
use corvid_broker::session::Session;
use proptest::prelude::*;

/// Whether `filter` matches `topic`, straight from the specification: level by level, `+` one
/// level, `#` the rest (its parent level included), and no leading wildcard on a `$` topic.
fn naive(filter: &str, topic: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
        return false;
    }
    let mut i = 0;
    loop {
        match (f.get(i), t.get(i)) {
            (Some(&"#"), _) => return true,
            (None, None) => return true,
            (Some(&"+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
        i += 1;
    }
}

#[derive(Debug, Clone)]
enum Op {
    Sub(usize, Option<&'static str>, String),
    Unsub(usize, Option<&'static str>, String),
}

fn filter() -> impl Strategy<Value = String> {
    let level = prop::sample::select(vec!["a", "b", "", "+", "$s"]);
    (prop::collection::vec(level, 0..4), any::<bool>()).prop_map(|(mut levels, hash)| {
        if hash {
            levels.push("#");
        }
        if levels.is_empty() {
            levels.push("a");
        }
        levels.join("/")
    })
}

fn topic() -> impl Strategy<Value = String> {
    let level = prop::sample::select(vec!["a", "b", "", "$s"]);
    prop::collection::vec(level, 1..6).prop_map(|l| l.join("/"))
}

fn op() -> impl Strategy<Value = Op> {
    let group = prop::sample::select(vec![None, Some("g1"), Some("g2")]);
    (0..4usize, group, filter(), any::<u8>()).prop_map(|(c, g, f, k)| {
        if k % 3 == 0 {
            Op::Unsub(c, g, f)
        } else {
            Op::Sub(c, g, f)
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn trie_matches_the_naive_matcher(ops in prop::collection::vec(op(), 1..40),
                                      topics in prop::collection::vec(topic(), 1..10)) {
        let sessions: Vec<Arc<Session>> = (0..4)
            .map(|i| Session::new(ByteString::from(format!("c{i}")), 0))
            .collect();
        let router = Router::default();
        // The model: live (client, group, filter) subscriptions.
        let mut live: BTreeSet<(usize, Option<&str>, String)> = BTreeSet::new();
        let q = SubOptions::qos(QoS::AtMostOnce);
        for o in &ops {
            match o {
                Op::Sub(c, g, f) => {
                    let (new, _) = router.subscribe(*g, f, &sessions[*c], q, None);
                    prop_assert_eq!(new, live.insert((*c, *g, f.clone())));
                }
                Op::Unsub(c, g, f) => {
                    let (removed, _) = router.unsubscribe(*g, f, &format!("c{c}"));
                    prop_assert_eq!(removed, live.remove(&(*c, *g, f.clone())));
                }
            }
        }
        prop_assert_eq!(router.subscription_count(), live.len());
        let mut want_filters: BTreeSet<String> = BTreeSet::new();
        for (_, g, f) in &live {
            want_filters.insert(match g {
                None => f.clone(),
                Some(g) => format!("$share/{g}/{f}"),
            });
        }
        let got_filters: BTreeSet<String> = router.filters().into_iter().collect();
        prop_assert_eq!(got_filters, want_filters);

        for t in &topics {
            let targets = router.route(t, "publisher", SharedStrategy::RoundRobin);
            let mut plain: BTreeSet<String> = BTreeSet::new();
            let mut shared: BTreeMap<String, String> = BTreeMap::new();
            for tg in &targets {
                let who = tg.session.client_id.to_string();
                match &tg.share {
                    None => prop_assert!(plain.insert(who), "one plain target per session"),
                    Some(k) => prop_assert!(shared.insert(k.to_string(), who).is_none(), "one member per group"),
                }
            }
            let want_plain: BTreeSet<String> = live
                .iter()
                .filter(|(_, g, f)| g.is_none() && naive(f, t))
                .map(|(c, _, _)| format!("c{c}"))
                .collect();
            prop_assert_eq!(&plain, &want_plain, "plain targets of {:?}", t);
            let mut want_groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (c, g, f) in &live {
                if let Some(g) = g {
                    if naive(f, t) {
                        want_groups.entry(format!("{g}/{f}")).or_default().insert(format!("c{c}"));
                    }
                }
            }
            let keys: BTreeSet<&String> = shared.keys().collect();
            prop_assert_eq!(keys, want_groups.keys().collect::<BTreeSet<_>>(), "groups of {:?}", t);
            for (k, who) in &shared {
                prop_assert!(want_groups[k].contains(who), "{} is not in {}", who, k);
            }
        }

        // Removing everything leaves an empty route table.
        for (c, g, f) in live {
            prop_assert_eq!(router.unsubscribe(g, &f, &format!("c{c}")).0, true);
        }
        prop_assert_eq!(router.subscription_count(), 0);
        prop_assert!(router.filters().is_empty());
    }
}

/// The same agreement for topics and filters thousands of levels deep.
#[test]
fn deep_filters_match_like_the_naive_matcher() {
    let router = Router::default();
    let s = Session::new(ByteString::from("deep"), 0);
    let q = SubOptions::qos(QoS::AtMostOnce);
    let depth = 5_000;
    let topic = vec!["a"; depth].join("/");
    let filters = [
        format!("{}/#", vec!["a"; depth - 1].join("/")),
        format!("{}/+", vec!["a"; depth - 1].join("/")),
        vec!["+"; depth].join("/"),
        format!("{}/b", vec!["a"; depth - 1].join("/")),
        "#".to_string(),
    ];
    for f in &filters {
        router.subscribe(None, f, &s, q, None);
        let hit = !router
            .route(&topic, "p", SharedStrategy::RoundRobin)
            .is_empty();
        assert_eq!(hit, naive(f, &topic), "{}…", &f[..20]);
        router.unsubscribe(None, f, "deep");
    }
    assert!(router.filters().is_empty());
}
