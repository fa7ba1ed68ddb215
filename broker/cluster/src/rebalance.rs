//! Connection rebalancing after scale-up: a new member starts empty while the old ones keep
//! their clients, because MQTT connections are long-lived and a load balancer only spreads new
//! ones. Each node gossips its live connection count; a node that holds clearly more than the
//! cluster mean sheds its surplus at a bounded rate towards the members below the mean, moving
//! each client the way evacuation does (DISCONNECT 0x9C with a Server Reference for MQTT 5, a
//! plain close for 3.1.1, and the persistent session handed to the target first).
//!
//! The decision — how many to shed and to whom — is the pure function [`plan`]; the loop in
//! [`run`] only gathers the numbers, paces the moves and waits for gossip to catch up between
//! rounds. Hysteresis keeps it from ping-ponging: a node starts shedding only above
//! `mean × 1.1` and `mean + 2`, sheds down to the mean (not to the threshold), and a client it
//! moved is not picked again for [`RECENTLY_MOVED`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use corvid_api::{EvacuationState, RebalanceBalance, RebalanceState, RebalanceStatus};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::Cluster;
use crate::session::Session;

/// A node sheds only when it holds more than this times the mean…
pub const TRIGGER_RATIO: f64 = 1.1;
/// …and at least this many connections more than the mean (no churn over a handful).
pub const MIN_SURPLUS: f64 = 2.0;
/// How often an enabled node checks its balance.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// After a round, the time gossip needs before the targets' new counts are visible here.
const SETTLE: Duration = Duration::from_secs(3);
/// A client moved by rebalancing is not moved again for this long, even if the load balancer
/// brings it back here.
pub const RECENTLY_MOVED: Duration = Duration::from_secs(60);

/// A member that may receive connections, with its last gossiped connection count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// Node name.
    pub node: String,
    /// Live connections it reported.
    pub connections: u64,
}

/// What this node should do: shed one connection per entry of `targets`, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shed {
    /// The cluster mean of connections per member (this node and the targets considered).
    pub mean: f64,
    /// The member each shed connection is sent to, interleaved so that a round cut short
    /// still spreads evenly.
    pub targets: Vec<String>,
}

/// Decides how many connections this node sheds, and to which members, from its own count
/// and the counts of the members that may take connections (ready, linked, not evacuating).
/// Pure, so the thresholds and the spread are unit-tested.
pub fn plan(own: u64, peers: &[Load]) -> Shed {
    let members = peers.len() as u64 + 1;
    let total: u64 = own + peers.iter().map(|p| p.connections).sum::<u64>();
    let mean = total as f64 / members as f64;
    let mut out = Shed {
        mean,
        targets: Vec::new(),
    };
    if peers.is_empty() || (own as f64) <= mean * TRIGGER_RATIO || (own as f64) < mean + MIN_SURPLUS
    {
        return out;
    }
    // Shed down to the mean (rounded up, so this node never ends below a target), and give each
    // target at most what brings it up to the mean (rounded down): nobody overshoots.
    let keep = total.div_ceil(members);
    let surplus = own.saturating_sub(keep);
    let fill = total / members;
    let mut deficits: Vec<(u64, &str)> = peers
        .iter()
        .filter(|p| p.connections < fill)
        .map(|p| (fill - p.connections, p.node.as_str()))
        .collect();
    for _ in 0..surplus {
        // The target with the largest remaining deficit (ties: by name), one at a time.
        let Some(best) = deficits
            .iter_mut()
            .filter(|d| d.0 > 0)
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        else {
            break;
        };
        best.0 -= 1;
        out.targets.push(best.1.to_string());
    }
    out
}

/// The rebalancer of one node: its state and the trigger the admin API pulls.
#[derive(Debug)]
pub struct Rebalancer {
    enabled: bool,
    rate: u32,
    trigger: Notify,
    state: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RebalanceState,
    mean: f64,
    planned: usize,
    moved_total: u64,
    last_check: Option<Instant>,
    forced_rate: Option<u32>,
    recently_moved: HashMap<String, Instant>,
}

impl Rebalancer {
    /// A rebalancer for `cluster.rebalance`.
    pub fn new(enabled: bool, rate: u32) -> Self {
        Rebalancer {
            enabled,
            rate: rate.max(1),
            trigger: Notify::new(),
            state: Mutex::new(Inner {
                state: RebalanceState::Idle,
                mean: 0.0,
                planned: 0,
                moved_total: 0,
                last_check: None,
                forced_rate: None,
                recently_moved: HashMap::new(),
            }),
        }
    }

    /// Asks for one balance check now (also when the periodic check is disabled), moving at
    /// `rate` per second when given.
    pub fn trigger(&self, rate: Option<u32>) {
        self.state.lock().forced_rate = Some(rate.unwrap_or(self.rate).max(1));
        self.trigger.notify_one();
    }

    /// The current state, with this node's live count and its possible targets' counts.
    pub fn status(&self, connections: u64, targets: &[Load]) -> RebalanceStatus {
        let i = self.state.lock();
        RebalanceStatus {
            enabled: self.enabled,
            rate: self.rate,
            state: i.state,
            connections,
            balance: Some(RebalanceBalance {
                mean: i.mean,
                targets: targets
                    .iter()
                    .map(|t| (t.node.clone(), t.connections))
                    .collect(),
                planned: i.planned as u64,
                moved_total: i.moved_total,
                last_check_seconds_ago: i.last_check.map(|t| t.elapsed().as_secs()),
            }),
        }
    }
}

/// The rebalancing loop of one node: checks every [`CHECK_EVERY`] when enabled, and at once
/// when triggered; sheds at most `rate` connections per second; waits [`SETTLE`] after a round.
pub async fn run(cluster: Arc<Cluster>) {
    let r = &cluster.rebalancer;
    loop {
        tokio::select! {
            _ = r.trigger.notified() => {}
            _ = tokio::time::sleep(CHECK_EVERY), if r.enabled => {}
            _ = cluster.shutdown.cancelled() => return,
        }
        let forced = r.state.lock().forced_rate.take();
        if !r.enabled && forced.is_none() {
            continue;
        }
        let rate = forced.unwrap_or(r.rate);
        let moved = round(&cluster, rate).await;
        if moved > 0 {
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = cluster.shutdown.cancelled() => return,
            }
        }
    }
}

/// One check and, when this node holds too many, one round of moves. Returns how many moved.
async fn round(cluster: &Arc<Cluster>, rate: u32) -> usize {
    let r = &cluster.rebalancer;
    let Some(b) = cluster.broker() else { return 0 };
    if cluster.evacuation.lock().state != EvacuationState::Idle
        || !b.accepting.load(Ordering::Relaxed)
    {
        return 0; // an evacuating node moves everything anyway
    }
    let own = b.metrics.connections.get().max(0) as u64;
    let peers = cluster.rebalance_targets();
    let shed = plan(own, &peers);
    {
        let mut i = r.state.lock();
        i.last_check = Some(Instant::now());
        i.mean = shed.mean;
        i.planned = shed.targets.len();
        i.state = if shed.targets.is_empty() {
            if peers.is_empty() && own > 0 {
                RebalanceState::Waiting
            } else {
                RebalanceState::Balanced
            }
        } else {
            RebalanceState::Running
        };
        let now = Instant::now();
        i.recently_moved
            .retain(|_, t| now.duration_since(*t) < RECENTLY_MOVED);
    }
    if shed.targets.is_empty() {
        return 0;
    }
    let mut candidates = candidates(cluster, &b.sessions.all())
        .into_iter()
        .peekable();
    if candidates.peek().is_none() {
        // Everything here was moved a moment ago (and came back): wait rather than churn.
        r.state.lock().state = RebalanceState::Waiting;
        tracing::debug!(connections = own, "rebalancing: no client may move yet");
        return 0;
    }
    tracing::info!(
        connections = own,
        mean = format!("{:.1}", shed.mean),
        shed = shed.targets.len(),
        rate,
        "rebalancing: shedding connections towards less-loaded members"
    );
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut moved = 0usize;
    let mut per_target: HashMap<String, usize> = HashMap::new();
    for to in &shed.targets {
        if cluster.evacuation.lock().state != EvacuationState::Idle
            || cluster.shutdown.is_cancelled()
        {
            break;
        }
        // A candidate may have gone offline since the round started: moving its session
        // would not move a connection.
        let Some(s) = candidates
            .by_ref()
            .find(|s| s.state.lock().connection.is_some())
        else {
            break;
        };
        let reference = cluster.mqtt_addr_of(to).map(ByteString::from);
        tracing::debug!(client_id = %s.client_id, to = %to, "rebalancing: moving client");
        cluster.move_client(&b, &s, reference, Some(to)).await;
        moved += 1;
        *per_target.entry(to.clone()).or_default() += 1;
        cluster.metrics.rebalance_moved.inc();
        {
            let mut i = r.state.lock();
            i.moved_total += 1;
            i.recently_moved
                .insert(s.client_id.to_string(), Instant::now());
        }
        tokio::time::sleep(interval).await;
    }
    cluster.metrics.rebalance_rounds.inc();
    r.state.lock().state = if r.enabled {
        RebalanceState::Settling
    } else {
        RebalanceState::Done
    };
    tracing::info!(moved, to = ?per_target, "rebalancing round done");
    moved
}

/// Connected clients this node may move — online, not already moving, not moved recently —
/// newest connection first: the longest-standing connections (and whatever they are in the
/// middle of) are disturbed last, and the order is predictable.
fn candidates(cluster: &Cluster, sessions: &[Arc<Session>]) -> Vec<Arc<Session>> {
    let recent = cluster.rebalancer.state.lock().recently_moved.clone();
    let mut online: Vec<(u64, Arc<Session>)> = sessions
        .iter()
        .filter(|s| !recent.contains_key(&*s.client_id))
        .filter_map(|s| {
            let st = s.state.lock();
            let conn = st.connection.as_ref()?;
            (!st.ended && st.moved_to().is_none()).then(|| (conn.id, s.clone()))
        })
        .collect();
    online.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
    online.into_iter().map(|(_, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(v: &[(&str, u64)]) -> Vec<Load> {
        v.iter()
            .map(|(n, c)| Load {
                node: n.to_string(),
                connections: *c,
            })
            .collect()
    }

    fn count(s: &Shed, node: &str) -> usize {
        s.targets.iter().filter(|t| *t == node).count()
    }

    #[test]
    fn a_new_empty_member_gets_half_of_two() {
        let s = plan(40, &loads(&[("b", 0)]));
        assert_eq!(s.mean, 20.0);
        assert_eq!(s.targets.len(), 20);
        assert_eq!(count(&s, "b"), 20);
    }

    #[test]
    fn odd_totals_leave_this_node_the_extra_one() {
        let s = plan(41, &loads(&[("b", 0)]));
        assert_eq!(s.targets.len(), 20, "keeps 21, b gets 20");
    }

    #[test]
    fn only_members_below_the_mean_receive_and_none_overshoots() {
        // 90 over 3: mean 30; b is at the mean, c is empty.
        let s = plan(60, &loads(&[("b", 30), ("c", 0)]));
        assert_eq!(s.targets.len(), 30);
        assert_eq!(count(&s, "b"), 0);
        assert_eq!(count(&s, "c"), 30);
    }

    #[test]
    fn two_new_members_are_filled_in_turn() {
        let s = plan(100, &loads(&[("b", 0), ("c", 0), ("d", 0)]));
        assert_eq!(s.mean, 25.0);
        assert_eq!(s.targets.len(), 75);
        assert_eq!(
            (count(&s, "b"), count(&s, "c"), count(&s, "d")),
            (25, 25, 25)
        );
        // Interleaved: the first three moves go to three different members.
        let first: std::collections::HashSet<&String> = s.targets[..3].iter().collect();
        assert_eq!(first.len(), 3, "{:?}", &s.targets[..3]);
    }

    #[test]
    fn within_the_threshold_nothing_moves() {
        // 10 % over the mean is tolerated.
        assert!(plan(21, &loads(&[("b", 19)])).targets.is_empty());
        assert!(plan(105, &loads(&[("b", 95)])).targets.is_empty());
        // A handful over a tiny mean is not worth moving.
        assert!(plan(3, &loads(&[("b", 0)])).targets.is_empty());
        assert!(plan(2, &loads(&[("b", 0)])).targets.is_empty());
    }

    #[test]
    fn just_past_the_threshold_moves_down_to_the_mean() {
        // mean 100, 115 > 110 and ≥ 102: shed 15 to b.
        let s = plan(115, &loads(&[("b", 85)]));
        assert_eq!(s.targets.len(), 15);
    }

    #[test]
    fn a_balanced_result_never_triggers_the_reverse_move() {
        // After a move both are at the mean: neither side sheds (no ping-pong).
        for (a, b) in [(20, 20), (21, 20), (20, 21), (50, 49)] {
            assert!(plan(a, &loads(&[("b", b)])).targets.is_empty(), "{a}/{b}");
            assert!(plan(b, &loads(&[("a", a)])).targets.is_empty(), "{b}/{a}");
        }
    }

    #[test]
    fn an_under_loaded_node_and_a_lonely_node_shed_nothing() {
        assert!(plan(0, &loads(&[("b", 40)])).targets.is_empty());
        assert!(plan(10, &loads(&[("b", 40), ("c", 40)])).targets.is_empty());
        assert!(
            plan(1000, &[]).targets.is_empty(),
            "no target, nothing to do"
        );
    }

    #[test]
    fn two_overloaded_nodes_together_fill_the_new_one_exactly() {
        // Both see the same snapshot and shed their own surplus only.
        let a = plan(30, &loads(&[("b", 30), ("c", 0)]));
        let b = plan(30, &loads(&[("a", 30), ("c", 0)]));
        assert_eq!(a.targets.len() + b.targets.len(), 20);
        assert_eq!(count(&a, "c") + count(&b, "c"), 20);
    }
}
