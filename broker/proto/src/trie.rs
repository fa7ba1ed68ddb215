//! What the three topic tries (subscriptions, retained messages, peers' routes) share: walking
//! down a path, pruning the empty tail of a path, and dropping a subtree — all with loops, so a
//! topic's depth (which a client chooses) never becomes the depth of the call stack.

use crate::keyed::SmallMap;

/// A node's children by level: most topic levels have one child, kept without a hash table.
pub type Children<N> = SmallMap<Box<str>, N>;

/// A node of a topic trie: children by level, plus whatever it stores.
pub trait TrieNode: Sized {
    /// Children by level.
    fn children(&self) -> &Children<Self>;
    /// Children by level, mutably.
    fn children_mut(&mut self) -> &mut Children<Self>;
    /// Whether the node stores nothing of its own (it may still have children).
    fn is_vacant(&self) -> bool;
}

/// Implements [`TrieNode`] for a node type with a `children: Children<Self>` field,
/// and its `Drop` with [`drop_children`] (so dropping a deep trie never recurses).
/// `vacant` says when the node stores nothing of its own.
#[macro_export]
macro_rules! trie_node {
    ($node:ty, |$n:ident| $vacant:expr) => {
        impl $crate::trie::TrieNode for $node {
            fn children(&self) -> &$crate::trie::Children<Self> {
                &self.children
            }
            fn children_mut(&mut self) -> &mut $crate::trie::Children<Self> {
                &mut self.children
            }
            fn is_vacant(&self) -> bool {
                let $n = self;
                $vacant
            }
        }

        impl Drop for $node {
            fn drop(&mut self) {
                $crate::trie::drop_children(self);
            }
        }
    };
}

/// The node at `levels` below `root`, if the path exists.
pub fn descend<'a, N: TrieNode>(root: &'a N, levels: &[&str]) -> Option<&'a N> {
    let mut node = root;
    for l in levels {
        node = node.children().get(*l)?;
    }
    Some(node)
}

/// Calls `visit` on every node whose filter matches the topic `levels`: the `#` child of each
/// node on the way (which also matches its parent level), and the node where the topic ends.
/// A loop over an explicit stack; a leading wildcard never matches a `$` topic [MQTT-4.7.2-1].
pub fn walk_matching<'a, N: TrieNode>(
    root: &'a N,
    levels: &[&str],
    dollar: bool,
    mut visit: impl FnMut(&'a N),
) {
    let mut stack: Vec<(&'a N, usize)> = vec![(root, 0)];
    while let Some((node, depth)) = stack.pop() {
        let wildcard_ok = !(dollar && depth == 0);
        if wildcard_ok {
            if let Some(hash) = node.children().get("#") {
                visit(hash);
            }
        }
        let Some(level) = levels.get(depth) else {
            visit(node);
            continue;
        };
        if wildcard_ok {
            if let Some(plus) = node.children().get("+") {
                stack.push((plus, depth + 1));
            }
        }
        if let Some(child) = node.children().get(*level) {
            stack.push((child, depth + 1));
        }
    }
}

/// The node at `levels` below `root`, if the path exists.
pub fn descend_mut<'a, N: TrieNode>(root: &'a mut N, levels: &[&str]) -> Option<&'a mut N> {
    let mut node = root;
    for l in levels {
        node = node.children_mut().get_mut(*l)?;
    }
    Some(node)
}

/// The node at `levels` below `root`, created (with its ancestors) if missing.
pub fn descend_or_insert<'a, N: TrieNode + Default>(
    root: &'a mut N,
    levels: impl IntoIterator<Item = &'a str>,
) -> &'a mut N {
    let mut node = root;
    for l in levels {
        node = node
            .children_mut()
            .get_or_insert_with(l, || (l.into(), N::default()));
    }
    node
}

/// Removes the nodes along `levels` that no longer hold anything: the deepest run of
/// vacant nodes whose only child is the next node of the path, ending in a vacant leaf.
pub fn prune<N: TrieNode>(root: &mut N, levels: &[&str]) {
    // Find the shallowest depth from which the rest of the path is a removable chain.
    let mut cut: Option<usize> = None;
    let mut node: &N = root;
    for (depth, l) in levels.iter().enumerate() {
        let Some(child) = node.children().get(*l) else {
            return;
        };
        let last = depth + 1 == levels.len();
        let removable = child.is_vacant()
            && if last {
                child.children().is_empty()
            } else {
                child.children().len() == 1
            };
        if removable {
            cut.get_or_insert(depth);
        } else {
            cut = None;
        }
        node = child;
    }
    let Some(depth) = cut else { return };
    if let Some(parent) = descend_mut(root, &levels[..depth]) {
        // Dropping the chain is iterative too (see `drop_children`).
        parent.children_mut().remove(levels[depth]);
    }
}

/// Empties `node`'s subtree without recursion; call it from the node type's `Drop`.
pub fn drop_children<N: TrieNode>(node: &mut N) {
    if node.children().is_empty() {
        return;
    }
    let mut stack: Vec<N> = node.children_mut().drain().map(|(_, c)| c).collect();
    while let Some(mut n) = stack.pop() {
        stack.extend(n.children_mut().drain().map(|(_, c)| c));
        // `n` drops here with no children left.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct N {
        children: Children<N>,
        value: bool,
    }

    impl TrieNode for N {
        fn children(&self) -> &Children<Self> {
            &self.children
        }
        fn children_mut(&mut self) -> &mut Children<Self> {
            &mut self.children
        }
        fn is_vacant(&self) -> bool {
            !self.value
        }
    }

    impl Drop for N {
        fn drop(&mut self) {
            drop_children(self);
        }
    }

    #[test]
    fn prune_keeps_what_holds_something() {
        let mut root = N::default();
        descend_or_insert(&mut root, ["a", "b", "c", "d"]).value = true;
        descend_or_insert(&mut root, ["a", "x"]).value = true;
        if let Some(n) = descend_mut(&mut root, &["a", "b", "c", "d"]) {
            n.value = false;
        }
        prune(&mut root, &["a", "b", "c", "d"]);
        // `a` stays for `a/x`; `b/c/d` is gone.
        assert!(descend_mut(&mut root, &["a", "x"]).is_some());
        assert!(descend_mut(&mut root, &["a", "b"]).is_none());
        if let Some(n) = descend_mut(&mut root, &["a", "x"]) {
            n.value = false;
        }
        prune(&mut root, &["a", "x"]);
        assert!(root.children.is_empty());
    }

    #[test]
    fn a_path_deeper_than_any_stack_drops_and_prunes() {
        let levels: Vec<String> = (0..200_000).map(|i| (i % 7).to_string()).collect();
        let path: Vec<&str> = levels.iter().map(String::as_str).collect();
        let mut root = N::default();
        descend_or_insert(&mut root, path.iter().copied()).value = true;
        if let Some(n) = descend_mut(&mut root, &path) {
            n.value = false;
        }
        prune(&mut root, &path);
        assert!(root.children.is_empty());
        descend_or_insert(&mut root, path.iter().copied()).value = true;
        drop(root);
    }
}
