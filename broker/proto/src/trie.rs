//! What the three topic tries (subscriptions, retained messages, peers' routes) share: walking
//! down a path, pruning the empty tail of a path, and dropping a subtree — all with loops, so a
//! topic's depth (which a client chooses) never becomes the depth of the call stack.

use std::collections::HashMap;

/// A node of a topic trie: children by level, plus whatever it stores.
pub trait TrieNode: Sized {
    /// Children by level.
    fn children(&self) -> &HashMap<Box<str>, Self>;
    /// Children by level, mutably.
    fn children_mut(&mut self) -> &mut HashMap<Box<str>, Self>;
    /// Whether the node stores nothing of its own (it may still have children).
    fn is_vacant(&self) -> bool;
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
        node = node.children_mut().entry(l.into()).or_default();
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
        children: HashMap<Box<str>, N>,
        value: bool,
    }

    impl TrieNode for N {
        fn children(&self) -> &HashMap<Box<str>, Self> {
            &self.children
        }
        fn children_mut(&mut self) -> &mut HashMap<Box<str>, Self> {
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
