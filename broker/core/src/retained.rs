//! Retained messages, kept in a topic trie so a new subscription finds the retained messages
//! its filter matches without scanning every retained topic.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::RwLock;

use crate::message::Msg;
use crate::trie;

/// What a retained message counts against `limits.max_retained_bytes`.
fn size(m: &Msg) -> usize {
    m.topic.len() + m.payload.len()
}

/// The message stored at exactly `levels`, found without recursion.
fn exact<'a>(root: &'a Node, levels: &[&str]) -> Option<&'a Msg> {
    trie::descend(root, levels)?.msg.as_ref()
}

#[derive(Debug, Default)]
struct Node {
    children: trie::Children<Node>,
    msg: Option<Msg>,
}

corvid_proto::trie_node!(Node, |n| n.msg.is_none());

/// The retained-message store.
#[derive(Debug, Default)]
pub struct Retained {
    root: RwLock<Node>,
    count: AtomicUsize,
    /// Topic and payload bytes of the stored messages (for `limits.max_retained_bytes`).
    bytes: AtomicUsize,
}

impl Retained {
    /// Stores `msg` as the retained message of its topic; an empty payload clears it
    /// [MQTT-3.3.1-6, 3.3.1-7].
    pub fn set(&self, msg: Msg) {
        let topic = msg.topic.clone();
        let levels: Vec<&str> = topic.split('/').collect();
        let mut root = self.root.write();
        if msg.payload.is_empty() {
            let cleared = trie::descend_mut(&mut *root, &levels).and_then(|n| n.msg.take());
            if let Some(old) = cleared {
                self.count.fetch_sub(1, Ordering::Relaxed);
                self.bytes.fetch_sub(size(&old), Ordering::Relaxed);
                trie::prune(&mut *root, &levels);
            }
            return;
        }
        let node = trie::descend_or_insert(&mut *root, levels.iter().copied());
        self.bytes.fetch_add(size(&msg), Ordering::Relaxed);
        match node.msg.replace(msg) {
            None => {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            Some(old) => {
                self.bytes.fetch_sub(size(&old), Ordering::Relaxed);
            }
        }
    }

    /// Topic and payload bytes a message for `topic` stores now (expired or not).
    pub fn stored_size(&self, topic: &str) -> usize {
        let levels: Vec<&str> = topic.split('/').collect();
        exact(&self.root.read(), &levels).map_or(0, size)
    }

    /// Topic and payload bytes of all retained messages.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Retained messages whose topics match `filter`, skipping expired ones.
    pub fn matching(&self, filter: &str) -> Vec<Msg> {
        let levels: Vec<&str> = filter.split('/').collect();
        let root = self.root.read();
        let mut out = Vec::new();
        let now = Instant::now();
        collect(&root, &levels, now, &mut out);
        out
    }

    /// Every retained message (sent to a node that joins the cluster).
    pub fn all(&self) -> Vec<Msg> {
        let root = self.root.read();
        let mut out = Vec::new();
        let mut stack: Vec<&Node> = vec![&root];
        while let Some(n) = stack.pop() {
            if let Some(m) = &n.msg {
                out.push(m.clone());
            }
            stack.extend(n.children.values());
        }
        out
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn push_live(node: &Node, now: Instant, out: &mut Vec<Msg>) {
    if let Some(m) = &node.msg {
        if !m.expired(now) {
            out.push(m.clone());
        }
    }
}

/// The retained messages matching the filter `levels`, with an explicit stack: `(node, how
/// many filter levels it has consumed)`. Wildcards at the first level skip `$` topics.
fn collect(root: &Node, filter: &[&str], now: Instant, out: &mut Vec<Msg>) {
    let mut stack: Vec<(&Node, usize)> = vec![(root, 0)];
    while let Some((node, depth)) = stack.pop() {
        let at_root = depth == 0;
        let Some(level) = filter.get(depth) else {
            push_live(node, now, out);
            continue;
        };
        match *level {
            "#" => {
                // `#` also matches the parent level itself [MQTT-4.7.1-2].
                if !at_root {
                    push_live(node, now, out);
                }
                all_below(node, at_root, now, out);
            }
            "+" => {
                for (name, child) in &node.children {
                    if at_root && name.starts_with('$') {
                        continue;
                    }
                    stack.push((child, depth + 1));
                }
            }
            lit => {
                if let Some(child) = node.children.get(lit) {
                    stack.push((child, depth + 1));
                }
            }
        }
    }
}

/// Every live message strictly below `node` (skipping `$` children of the root).
fn all_below(node: &Node, at_root: bool, now: Instant, out: &mut Vec<Msg>) {
    let mut stack: Vec<&Node> = node
        .children
        .iter()
        .filter(|(name, _)| !(at_root && name.starts_with('$')))
        .map(|(_, c)| c)
        .collect();
    while let Some(n) = stack.pop() {
        push_live(n, now, out);
        stack.extend(n.children.values());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;
    use crate::message::Message;
    use bytes::Bytes;
    use bytestring::ByteString;
    use std::sync::Arc;

    fn msg(topic: &str, payload: &str) -> Msg {
        Arc::new(Message::new(
            ByteString::from(topic),
            Bytes::from(payload.to_string()),
            QoS::AtMostOnce,
            true,
            None,
            ByteString::new(),
        ))
    }

    fn topics(v: Vec<Msg>) -> Vec<String> {
        let mut t: Vec<String> = v.iter().map(|m| m.topic.to_string()).collect();
        t.sort();
        t
    }

    #[test]
    fn set_match_clear() {
        let r = Retained::default();
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/v"] {
            r.set(msg(t, "1"));
        }
        assert_eq!(r.len(), 5);
        assert_eq!(topics(r.matching("a/#")), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(topics(r.matching("+/b")), vec!["a/b", "x/b"]);
        assert_eq!(topics(r.matching("#")), vec!["a", "a/b", "a/b/c", "x/b"]);
        assert_eq!(topics(r.matching("$SYS/#")), vec!["$SYS/v"]);
        r.set(msg("a/b", ""));
        assert_eq!(r.len(), 4);
        assert_eq!(topics(r.matching("a/+")), Vec::<String>::new());
        assert_eq!(topics(r.matching("a/b/c")), vec!["a/b/c"]);
    }
}
