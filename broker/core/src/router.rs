//! The subscription router: a topic trie from filters to the sessions subscribed to them,
//! including shared-subscription groups.
//!
//! Matching takes a read lock and walks only the branches a topic can reach (`+`, `#` and the
//! literal level), so the cost of a publish grows with the number of matching filters, not
//! with the number of subscriptions. The trie is also the route table the cluster layer
//! replicates: [`Router::filters`] lists what this node wants.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytestring::ByteString;
use parking_lot::RwLock;

use crate::codec::{QoS, SubOptions};
use crate::config::SharedStrategy;
use crate::session::Session;
use crate::trie::{self, Children};
use corvid_proto::keyed::{Keyed, KeyedSet, SmallMap};

/// One subscriber of a filter.
#[derive(Debug, Clone)]
struct Subscriber {
    session: Arc<Session>,
    opts: SubOptions,
    sub_id: Option<NonZeroU32>,
}

/// The members of one `$share/{group}/{filter}`.
#[derive(Debug)]
struct SharedGroup {
    key: Arc<str>,
    members: Vec<Subscriber>,
    next: AtomicUsize,
    sticky: AtomicUsize,
}

impl Keyed for Subscriber {
    type Key = ByteString;
    fn key(&self) -> &ByteString {
        &self.session.client_id
    }
}

/// Shared groups on one filter by group name; boxed, as most filters have none.
type Groups = Option<Box<SmallMap<Box<str>, SharedGroup>>>;

/// One topic level. Small on purpose: a device's own topic (`{id}/cmd`) is two nodes with one
/// child and one subscriber each, and every node lives in its parent's child map.
#[derive(Debug, Default)]
struct Node {
    children: Children<Node>,
    subscribers: KeyedSet<Subscriber>,
    shared: Groups,
}

impl Node {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups().next().is_none()
    }

    /// The shared groups on this filter.
    fn groups(&self) -> impl Iterator<Item = (&Box<str>, &SharedGroup)> {
        self.shared.iter().flat_map(|m| m.iter())
    }
}

corvid_proto::trie_node!(Node, |n| n.subscribers.is_empty() && n.shared.is_none());

/// A matched subscriber, ready to become a [`crate::message::Delivery`].
#[derive(Debug, Clone)]
pub struct Target {
    /// Session to deliver to.
    pub session: Arc<Session>,
    /// Highest QoS among the matching subscriptions of this session.
    pub qos: QoS,
    /// Whether any matching subscription asked for retain-as-published.
    pub retain_as_published: bool,
    /// Subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<NonZeroU32>,
    /// Shared group key when chosen through a shared subscription.
    pub share: Option<Arc<str>>,
}

/// The subscription trie.
#[derive(Debug, Default)]
pub struct Router {
    root: RwLock<Node>,
    subscriptions: AtomicUsize,
}

impl Router {
    /// Adds or replaces `session`'s subscription to `filter`, optionally in share `group`.
    /// Returns whether the subscription is new, and whether the route (the filter, or the group
    /// on the filter) is new on this node — what the cluster layer tells its peers.
    pub fn subscribe(
        &self,
        group: Option<&str>,
        filter: &str,
        session: &Arc<Session>,
        opts: SubOptions,
        sub_id: Option<NonZeroU32>,
    ) -> (bool, bool) {
        let mut root = self.root.write();
        let node = trie::descend_or_insert(&mut *root, filter.split('/'));
        let sub = Subscriber {
            session: session.clone(),
            opts,
            sub_id,
        };
        let route_new = match group {
            None => node.subscribers.is_empty(),
            Some(g) => !node.shared.as_ref().is_some_and(|m| m.contains_key(g)),
        };
        let new = match group {
            None => node.subscribers.insert(sub).is_none(),
            Some(g) => {
                let groups = node.shared.get_or_insert_with(Box::default);
                let grp = groups.get_or_insert_with(g, || {
                    let grp = SharedGroup {
                        key: Arc::from(format!("{g}/{filter}")),
                        members: Vec::new(),
                        next: AtomicUsize::new(0),
                        sticky: AtomicUsize::new(usize::MAX),
                    };
                    (g.into(), grp)
                });
                match grp
                    .members
                    .iter_mut()
                    .find(|m| m.session.client_id == session.client_id)
                {
                    Some(m) => {
                        *m = sub;
                        false
                    }
                    None => {
                        grp.members.push(sub);
                        true
                    }
                }
            }
        };
        if new {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        (new, route_new)
    }

    /// Removes `client_id`'s subscription to `filter` (in `group`). Returns whether it existed
    /// and whether that was the route's last subscriber on this node.
    pub fn unsubscribe(&self, group: Option<&str>, filter: &str, client_id: &str) -> (bool, bool) {
        let mut root = self.root.write();
        let levels: Vec<&str> = filter.split('/').collect();
        let (removed, gone) = match trie::descend_mut(&mut *root, &levels) {
            Some(node) => remove(node, group, client_id),
            None => (false, false),
        };
        trie::prune(&mut *root, &levels);
        if removed {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        (removed, removed && gone)
    }

    /// Subscriptions in the trie.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Finds the sessions a message on `topic` goes to: one target per session for ordinary
    /// subscriptions (overlaps merged at the highest QoS), and one member per shared group.
    pub fn route(&self, topic: &str, publisher: &str, strategy: SharedStrategy) -> Vec<Target> {
        self.route_selected(topic, publisher, strategy, Select::All)
    }

    /// Like [`Router::route`], limited to what `select` lets through: in a cluster, ordinary
    /// subscribers may be skipped and only the shared groups assigned to this node served.
    pub fn route_selected(
        &self,
        topic: &str,
        publisher: &str,
        strategy: SharedStrategy,
        select: Select<'_>,
    ) -> Vec<Target> {
        let root = self.root.read();
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        let dollar = topic.starts_with('$');
        let ctx = Ctx {
            publisher,
            strategy,
            select,
        };
        trie::walk_matching(&*root, &levels, dollar, |n| emit(n, &ctx, &mut out));
        drop(root);
        merge_overlaps(out)
    }

    /// Keys (`group/filter`) of the shared groups with members here that match `topic`.
    pub fn shared_groups(&self, topic: &str) -> Vec<Arc<str>> {
        let root = self.root.read();
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        trie::walk_matching(&*root, &levels, topic.starts_with('$'), |n| {
            out.extend(n.groups().map(|(_, g)| g.key.clone()))
        });
        out
    }

    /// All distinct filters with subscribers (shared ones as `$share/{group}/{filter}`).
    pub fn filters(&self) -> Vec<String> {
        let root = self.root.read();
        let mut out = Vec::new();
        walk_filters(&root, &mut out);
        out
    }
}

/// Removes `client_id` from the subscribers (or `group`'s members) stored at `node`.
fn remove(node: &mut Node, group: Option<&str>, client_id: &str) -> (bool, bool) {
    match group {
        None => {
            let removed = node.subscribers.remove(client_id).is_some();
            (removed, node.subscribers.is_empty())
        }
        Some(g) => {
            let Some(groups) = node.shared.as_mut() else {
                return (false, false);
            };
            let Some(grp) = groups.get_mut(g) else {
                return (false, false);
            };
            let before = grp.members.len();
            grp.members.retain(|m| &*m.session.client_id != client_id);
            let removed = grp.members.len() != before;
            let gone = grp.members.is_empty();
            if gone {
                groups.remove(g);
                if groups.is_empty() {
                    node.shared = None;
                }
            }
            (removed, gone)
        }
    }
}

/// Which subscribers a routing pass serves.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// Everything (a single node, or a message published here with no shared groups elsewhere).
    All,
    /// Ordinary subscribers if `plain`, and only the listed shared groups.
    Some {
        /// Serve ordinary subscriptions.
        plain: bool,
        /// Shared group keys to serve.
        groups: &'a std::collections::HashSet<Arc<str>>,
    },
}

struct Ctx<'a> {
    publisher: &'a str,
    strategy: SharedStrategy,
    select: Select<'a>,
}

fn emit(node: &Node, ctx: &Ctx<'_>, out: &mut Vec<Target>) {
    let (plain, only) = match ctx.select {
        Select::All => (true, None),
        Select::Some { plain, groups } => (plain, Some(groups)),
    };
    if plain {
        for s in &node.subscribers {
            if s.opts.no_local && &*s.session.client_id == ctx.publisher {
                continue;
            }
            out.push(target(s, None));
        }
    }
    for (_, grp) in node.groups() {
        if only.is_some_and(|g| !g.contains(&grp.key)) {
            continue;
        }
        if let Some(m) = pick_member(grp, ctx.publisher, ctx.strategy) {
            out.push(target(m, Some(grp.key.clone())));
        }
    }
}

fn target(s: &Subscriber, share: Option<Arc<str>>) -> Target {
    Target {
        session: s.session.clone(),
        qos: s.opts.qos,
        retain_as_published: s.opts.retain_as_published,
        sub_ids: s.sub_id.into_iter().collect(),
        share,
    }
}

/// Picks the member of a shared group that gets this message. Connected members are
/// preferred; if none is connected, an offline persistent member queues it.
fn pick_member<'a>(
    grp: &'a SharedGroup,
    publisher: &str,
    strategy: SharedStrategy,
) -> Option<&'a Subscriber> {
    let n = grp.members.len();
    if n == 0 {
        return None;
    }
    let online = |i: usize| grp.members[i].session.state.lock().connection.is_some();
    let start = match strategy {
        SharedStrategy::RoundRobin => grp.next.fetch_add(1, Ordering::Relaxed) % n,
        SharedStrategy::Random => fastrand::usize(..n),
        SharedStrategy::HashClientid => {
            let mut h: u64 = 0xcbf29ce484222325;
            for b in publisher.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
            }
            (h % n as u64) as usize
        }
        SharedStrategy::Sticky => {
            let s = grp.sticky.load(Ordering::Relaxed);
            if s < n && online(s) {
                return Some(&grp.members[s]);
            }
            fastrand::usize(..n)
        }
    };
    let chosen = (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| online(i))
        .unwrap_or(start);
    if strategy == SharedStrategy::Sticky {
        grp.sticky.store(chosen, Ordering::Relaxed);
    }
    Some(&grp.members[chosen])
}

/// One target per session for ordinary subscriptions: overlapping matches merge at the highest
/// QoS with all their subscription ids [MQTT-3.3.4-2, 3.3.4-3]. Shared-group targets stay apart.
fn merge_overlaps(mut out: Vec<Target>) -> Vec<Target> {
    if out.len() < 2 {
        return out;
    }
    out.sort_by_key(|t| (Arc::as_ptr(&t.session) as usize, t.share.is_some()));
    let mut merged: Vec<Target> = Vec::with_capacity(out.len());
    for t in out {
        if let Some(last) = merged.last_mut() {
            if t.share.is_none() && last.share.is_none() && Arc::ptr_eq(&last.session, &t.session) {
                last.qos = last.qos.max(t.qos);
                last.retain_as_published |= t.retain_as_published;
                last.sub_ids.extend(t.sub_ids);
                continue;
            }
        }
        merged.push(t);
    }
    merged
}

/// Depth-first over the trie with an explicit stack of child iterators and one shared path,
/// so neither the call stack nor the memory for paths grows with the depth squared.
fn walk_filters(root: &Node, out: &mut Vec<String>) {
    let mut path: Vec<&str> = Vec::new();
    let mut stack = vec![root.children.iter()];
    while let Some(top) = stack.last_mut() {
        let Some((level, child)) = top.next() else {
            stack.pop();
            path.pop();
            continue;
        };
        path.push(level);
        if child.shared.is_some() || !child.subscribers.is_empty() {
            let filter = path.join("/");
            for (g, _) in child.groups() {
                out.push(format!("$share/{g}/{filter}"));
            }
            if !child.subscribers.is_empty() {
                out.push(filter);
            }
        }
        stack.push(child.children.iter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sess(id: &str) -> Arc<Session> {
        Session::new(ByteString::from(id), 0)
    }

    fn ids(t: &[Target]) -> Vec<String> {
        let mut v: Vec<String> = t.iter().map(|t| t.session.client_id.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let r = Router::default();
        let (a, b, c) = (sess("a"), sess("b"), sess("c"));
        r.subscribe(None, "x/+", &a, SubOptions::qos(QoS::AtMostOnce), None);
        r.subscribe(None, "#", &b, SubOptions::qos(QoS::AtMostOnce), None);
        r.subscribe(None, "$SYS/#", &c, SubOptions::qos(QoS::AtMostOnce), None);
        let rr = SharedStrategy::RoundRobin;
        assert_eq!(ids(&r.route("x/y", "p", rr)), vec!["a", "b"]);
        assert_eq!(ids(&r.route("x/y/z", "p", rr)), vec!["b"]);
        assert_eq!(ids(&r.route("$SYS/up", "p", rr)), vec!["c"]);
        assert_eq!(ids(&r.route("x", "p", rr)), vec!["b"]);
    }

    #[test]
    fn overlaps_merge_to_max_qos_with_all_ids() {
        let r = Router::default();
        let a = sess("a");
        r.subscribe(
            None,
            "x/+",
            &a,
            SubOptions::qos(QoS::AtMostOnce),
            NonZeroU32::new(1),
        );
        r.subscribe(
            None,
            "x/#",
            &a,
            SubOptions::qos(QoS::ExactlyOnce),
            NonZeroU32::new(2),
        );
        let t = r.route("x/y", "p", SharedStrategy::RoundRobin);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].qos, QoS::ExactlyOnce);
        let mut ids: Vec<u32> = t[0].sub_ids.iter().map(|i| i.get()).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn no_local_skips_publisher() {
        let r = Router::default();
        let a = sess("a");
        let mut o = SubOptions::qos(QoS::AtMostOnce);
        o.no_local = true;
        r.subscribe(None, "t", &a, o, None);
        assert!(r.route("t", "a", SharedStrategy::RoundRobin).is_empty());
        assert_eq!(r.route("t", "b", SharedStrategy::RoundRobin).len(), 1);
    }

    #[test]
    fn shared_group_round_robin_one_per_message() {
        let r = Router::default();
        let members: Vec<_> = (0..3).map(|i| sess(&format!("m{i}"))).collect();
        for m in &members {
            r.subscribe(Some("g"), "t/#", m, SubOptions::qos(QoS::AtLeastOnce), None);
        }
        let mut counts = std::collections::HashMap::new();
        for _ in 0..30 {
            let t = r.route("t/1", "p", SharedStrategy::RoundRobin);
            assert_eq!(t.len(), 1);
            *counts
                .entry(t[0].session.client_id.to_string())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&c| c == 10), "{counts:?}");
    }

    #[test]
    fn route_changes_are_reported_once_per_filter() {
        let r = Router::default();
        let (a, b) = (sess("a"), sess("b"));
        let q = SubOptions::qos(QoS::AtMostOnce);
        assert_eq!(r.subscribe(None, "t", &a, q, None), (true, true));
        assert_eq!(r.subscribe(None, "t", &b, q, None), (true, false));
        assert_eq!(r.subscribe(None, "t", &b, q, None), (false, false));
        assert_eq!(r.unsubscribe(None, "t", "a"), (true, false));
        assert_eq!(r.unsubscribe(None, "t", "b"), (true, true));
        let mut keys: Vec<String> = Vec::new();
        r.subscribe(Some("g"), "t/#", &a, q, None);
        keys.extend(r.shared_groups("t/x").iter().map(|k| k.to_string()));
        assert_eq!(keys, vec!["g/t/#".to_string()]);
        let none = std::collections::HashSet::new();
        let sel = Select::Some {
            plain: true,
            groups: &none,
        };
        assert!(r
            .route_selected("t/x", "p", SharedStrategy::RoundRobin, sel)
            .is_empty());
    }

    #[test]
    fn a_subscription_keeps_small_records() {
        // A device's own filter (`{id}/cmd`) is two nodes, each in its parent's child map, and
        // one subscriber: what each costs is what 10,000 idle subscribed devices cost.
        assert!(
            std::mem::size_of::<Node>() <= 56,
            "{}",
            std::mem::size_of::<Node>()
        );
        assert!(std::mem::size_of::<Subscriber>() <= 16);
        let r = Router::default();
        let a = sess("a");
        r.subscribe(None, "a/cmd", &a, SubOptions::qos(QoS::AtLeastOnce), None);
        let root = r.root.read();
        let dev = root.children.get("a").expect("the device's level");
        assert!(dev.shared.is_none());
        let cmd = dev.children.get("cmd").expect("its command topic");
        assert_eq!(cmd.subscribers.len(), 1);
        assert!(cmd.subscribers.contains("a"));
    }

    #[test]
    fn unsubscribe_prunes() {
        let r = Router::default();
        let a = sess("a");
        r.subscribe(None, "a/b/c", &a, SubOptions::qos(QoS::AtMostOnce), None);
        r.subscribe(Some("g"), "a/b", &a, SubOptions::qos(QoS::AtMostOnce), None);
        assert_eq!(r.subscription_count(), 2);
        let mut f = r.filters();
        f.sort();
        assert_eq!(f, vec!["$share/g/a/b".to_string(), "a/b/c".to_string()]);
        assert_eq!(r.unsubscribe(None, "a/b/c", "a"), (true, true));
        assert_eq!(r.unsubscribe(None, "a/b/c", "a"), (false, false));
        assert_eq!(r.unsubscribe(Some("g"), "a/b", "a"), (true, true));
        assert_eq!(r.subscription_count(), 0);
        assert!(r.root.read().is_empty());
    }
}
