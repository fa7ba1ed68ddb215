//! The other nodes' route tables: which filters (and shared groups) each peer has subscribers
//! for, so a message is forwarded only to the nodes that want it.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::topic::TopicLimits;
use crate::trie;

#[derive(Debug, Default)]
struct Node {
    children: trie::Children<Node>,
    plain: bool,
    groups: Vec<String>,
}

corvid_proto::trie_node!(Node, |n| !n.plain && n.groups.is_empty());

impl Node {
    /// Adds a peer's filter; `false` (and nothing stored) when it is malformed or over
    /// `limits` — a peer is held to the same bounds as a client.
    fn insert(&mut self, raw: &str, limits: &TopicLimits) -> bool {
        let Ok(f) = limits.filter(raw) else {
            return false;
        };
        let n = trie::descend_or_insert(self, f.filter.split('/'));
        match f.group {
            None => n.plain = true,
            Some(g) => {
                let key = format!("{g}/{}", f.filter);
                if !n.groups.contains(&key) {
                    n.groups.push(key);
                }
            }
        }
        true
    }

    fn remove(&mut self, raw: &str) {
        let Ok(f) = crate::topic::parse_filter(raw) else {
            return;
        };
        let levels: Vec<&str> = f.filter.split('/').collect();
        let key = f.group.map(|g| format!("{g}/{}", f.filter));
        if let Some(n) = trie::descend_mut(self, &levels) {
            match key {
                None => n.plain = false,
                Some(k) => n.groups.retain(|g| *g != k),
            }
        }
        trie::prune(self, &levels);
    }
}

/// What a peer wants of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteMatch {
    /// It has ordinary subscribers for the topic.
    pub plain: bool,
    /// Shared groups (`group/filter`) with members on it that match the topic.
    pub groups: Vec<String>,
}

/// What `root`'s filters want of a message on the topic `levels` (the same iterative walk as
/// the local router's).
fn collect(root: &Node, levels: &[&str], dollar: bool, out: &mut RemoteMatch) {
    trie::walk_matching(root, levels, dollar, |n| {
        out.plain |= n.plain;
        out.groups.extend(n.groups.iter().cloned());
    });
}

/// Route tables of all peers, by node name.
#[derive(Debug)]
pub struct RemoteRoutes {
    nodes: RwLock<HashMap<String, (Node, usize)>>,
    limits: TopicLimits,
}

impl Default for RemoteRoutes {
    fn default() -> Self {
        RemoteRoutes::new(TopicLimits::PROTOCOL)
    }
}

impl RemoteRoutes {
    /// Empty tables that accept peers' filters within `limits`.
    pub fn new(limits: TopicLimits) -> Self {
        RemoteRoutes {
            nodes: RwLock::default(),
            limits,
        }
    }

    /// Replaces a peer's table. Returns how many filters were refused as invalid.
    pub fn replace(&self, node: &str, filters: &[String]) -> usize {
        let mut t = Node::default();
        let mut refused = 0;
        for f in filters {
            if !t.insert(f, &self.limits) {
                refused += 1;
            }
        }
        let kept = filters.len() - refused;
        self.nodes.write().insert(node.to_string(), (t, kept));
        refused
    }

    /// Adds one filter of a peer; `false` when it is refused as invalid.
    pub fn add(&self, node: &str, filter: &str) -> bool {
        let mut w = self.nodes.write();
        let e = w.entry(node.to_string()).or_default();
        if !e.0.insert(filter, &self.limits) {
            return false;
        }
        e.1 += 1;
        true
    }

    /// Removes one filter of a peer.
    pub fn del(&self, node: &str, filter: &str) {
        if let Some(e) = self.nodes.write().get_mut(node) {
            e.0.remove(filter);
            e.1 = e.1.saturating_sub(1);
        }
    }

    /// Forgets a peer.
    pub fn remove_node(&self, node: &str) {
        self.nodes.write().remove(node);
    }

    /// Number of filters known for a peer.
    pub fn count(&self, node: &str) -> usize {
        self.nodes.read().get(node).map(|e| e.1).unwrap_or(0)
    }

    /// The peers that want a message on `topic`.
    pub fn matching(&self, topic: &str) -> Vec<(String, RemoteMatch)> {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let r = self.nodes.read();
        let mut out = Vec::new();
        for (name, (t, _)) in r.iter() {
            let mut m = RemoteMatch::default();
            collect(t, &levels, dollar, &mut m);
            if m.plain || !m.groups.is_empty() {
                out.push((name.clone(), m));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_per_node() {
        let r = RemoteRoutes::default();
        r.replace("b", &["a/+".into(), "$share/g/a/#".into()]);
        r.add("c", "x/#");
        let m = r.matching("a/1");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, "b");
        assert!(m[0].1.plain);
        assert_eq!(m[0].1.groups, vec!["g/a/#".to_string()]);
        assert_eq!(r.matching("x/y/z")[0].0, "c");
        r.del("c", "x/#");
        assert!(r.matching("x/y/z").is_empty());
        r.del("b", "a/+");
        let m = r.matching("a/1");
        assert!(!m[0].1.plain);
        r.remove_node("b");
        assert!(r.matching("a/1").is_empty());
    }

    #[test]
    fn invalid_or_oversize_filters_from_peers_are_refused() {
        let r = RemoteRoutes::new(TopicLimits {
            max_levels: 4,
            max_len: 64,
        });
        assert_eq!(
            r.replace("b", &["a/b".into(), "a/#/b".into(), "1/2/3/4/5".into()]),
            2
        );
        assert_eq!(r.count("b"), 1);
        assert!(!r.add("b", &"x/".repeat(100)));
        assert!(r.add("b", "x/+"));
        assert_eq!(r.count("b"), 2);
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards() {
        let r = RemoteRoutes::default();
        r.replace("b", &["#".into(), "+/x".into()]);
        assert!(r.matching("$SYS/x").is_empty());
        assert_eq!(r.matching("a/x").len(), 1);
    }
}
