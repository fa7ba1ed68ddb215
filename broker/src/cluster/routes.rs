//! The other nodes' route tables: which filters (and shared groups) each peer has subscribers
//! for, so a message is forwarded only to the nodes that want it.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::topic;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plain: bool,
    groups: Vec<String>,
}

impl Node {
    fn insert(&mut self, raw: &str) {
        let Ok(f) = topic::parse_filter(raw) else {
            return;
        };
        let mut n = self;
        for l in f.filter.split('/') {
            n = n.children.entry(l.into()).or_default();
        }
        match f.group {
            None => n.plain = true,
            Some(g) => {
                let key = format!("{g}/{}", f.filter);
                if !n.groups.contains(&key) {
                    n.groups.push(key);
                }
            }
        }
    }

    fn remove(&mut self, raw: &str) {
        let Ok(f) = topic::parse_filter(raw) else {
            return;
        };
        let levels: Vec<&str> = f.filter.split('/').collect();
        let key = f.group.map(|g| format!("{g}/{}", f.filter));
        remove(self, &levels, key.as_deref());
    }

    fn is_empty(&self) -> bool {
        !self.plain && self.groups.is_empty() && self.children.is_empty()
    }
}

fn remove(n: &mut Node, levels: &[&str], key: Option<&str>) {
    match levels.split_first() {
        None => match key {
            None => n.plain = false,
            Some(k) => n.groups.retain(|g| g != k),
        },
        Some((first, rest)) => {
            if let Some(child) = n.children.get_mut(*first) {
                remove(child, rest, key);
                if child.is_empty() {
                    n.children.remove(*first);
                }
            }
        }
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

fn collect(n: &Node, levels: &[&str], depth: usize, dollar: bool, out: &mut RemoteMatch) {
    let wild = !(dollar && depth == 0);
    if wild {
        if let Some(h) = n.children.get("#") {
            out.plain |= h.plain;
            out.groups.extend(h.groups.iter().cloned());
        }
    }
    let Some((l, rest)) = levels.split_first() else {
        out.plain |= n.plain;
        out.groups.extend(n.groups.iter().cloned());
        return;
    };
    if wild {
        if let Some(p) = n.children.get("+") {
            collect(p, rest, depth + 1, dollar, out);
        }
    }
    if let Some(c) = n.children.get(*l) {
        collect(c, rest, depth + 1, dollar, out);
    }
}

/// Route tables of all peers, by node name.
#[derive(Debug, Default)]
pub struct RemoteRoutes {
    nodes: RwLock<HashMap<String, (Node, usize)>>,
}

impl RemoteRoutes {
    /// Replaces a peer's table.
    pub fn replace(&self, node: &str, filters: &[String]) {
        let mut t = Node::default();
        for f in filters {
            t.insert(f);
        }
        self.nodes
            .write()
            .insert(node.to_string(), (t, filters.len()));
    }

    /// Adds one filter of a peer.
    pub fn add(&self, node: &str, filter: &str) {
        let mut w = self.nodes.write();
        let e = w.entry(node.to_string()).or_default();
        e.0.insert(filter);
        e.1 += 1;
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
            collect(t, &levels, 0, dollar, &mut m);
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
    fn dollar_topics_not_matched_by_leading_wildcards() {
        let r = RemoteRoutes::default();
        r.replace("b", &["#".into(), "+/x".into()]);
        assert!(r.matching("$SYS/x").is_empty());
        assert_eq!(r.matching("a/x").len(), 1);
    }
}
