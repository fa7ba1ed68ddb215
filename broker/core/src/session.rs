//! Sessions: the state MQTT keeps for a client id across connections — subscriptions, the
//! queue of messages not yet sent, the inflight window, and QoS 2 receive state.
//!
//! A session's state lives behind one short-held mutex, never the connection task's stack,
//! so a new connection (on this node, or later through the cluster layer) can take it over
//! at any moment: the registry is the cluster's seam for takeover and hand-off.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytestring::ByteString;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::codec::{Protocol, QoS, SubOptions};
use crate::config::{QueueFullPolicy, SessionConfig};
use crate::message::Delivery;
use corvid_proto::keyed::SmallMap;

/// Why a connection is being told to go away by someone else.
#[derive(Debug, Clone)]
pub enum Kick {
    /// Another connection took the client id (MQTT 5 reason 0x8E).
    TakenOver,
    /// An administrator kicked the client (0x98).
    Administrative,
    /// The node is shutting down (0x8B).
    ShuttingDown,
    /// The node is evacuating: go to another server (0x9C), optionally named.
    UseAnotherServer(Option<ByteString>),
}

/// What a connected session knows about its connection, for the admin API and `$SYS`.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Connection id, unique on this node.
    pub id: u64,
    /// Client address (after PROXY protocol).
    pub peer: SocketAddr,
    /// Listener name.
    pub listener: &'static str,
    /// Protocol version.
    pub protocol: Protocol,
    /// Negotiated keep alive.
    pub keep_alive: u16,
    /// User name, if any.
    pub username: Option<String>,
    /// Connect time, seconds since the Unix epoch.
    pub connected_at: u64,
    /// Asks the connection task to close.
    pub kick: Arc<KickSlot>,
    /// This connection's ACL: deliveries of `$SYS` topics that name other clients check it.
    pub acl: Arc<crate::acl::ClientAcl>,
}

impl ConnInfo {
    /// The connection as the admin API shows it.
    pub fn to_api(&self) -> corvid_api::ClientConnection {
        corvid_api::ClientConnection {
            id: self.id,
            peer: self.peer,
            listener: self.listener.to_string(),
            protocol: self.protocol.into(),
            keep_alive: self.keep_alive,
            username: self.username.clone(),
            connected_at: self.connected_at,
        }
    }
}

/// A one-shot mailbox to ask a connection task to close: a few dozen bytes per connection,
/// where a channel would allocate a block of slots. While the connection is parked (idle,
/// without a task: see [`crate::park`]) it also holds the wake-up that resumes it, so a kick or
/// a message for its session brings it back.
#[derive(Debug, Default)]
pub struct KickSlot {
    slot: Mutex<KickState>,
    notify: Notify,
}

/// What a [`KickSlot`] holds.
#[derive(Debug, Default)]
struct KickState {
    /// Boxed: almost every connection ends without one, and the slot lives as long as it.
    kick: Option<Box<Kick>>,
    parked: Option<crate::park::Wakeup>,
}

impl KickSlot {
    /// Asks the connection to close (the first reason wins).
    pub fn send(&self, k: Kick) {
        let mut slot = self.slot.lock();
        if slot.kick.is_none() {
            slot.kick = Some(Box::new(k));
        }
        let parked = slot.parked.take();
        drop(slot);
        self.notify.notify_one();
        if let Some(w) = parked {
            w.wake();
        }
    }

    /// Waits for a kick. Cancel-safe.
    pub async fn recv(&self) -> Kick {
        loop {
            if let Some(k) = self.slot.lock().kick.take() {
                return *k;
            }
            self.notify.notified().await;
        }
    }

    /// Installs the wake-up of the parked connection, unless a kick is already waiting (then
    /// false: the connection must not park).
    pub fn park(&self, waker: crate::park::Wakeup) -> bool {
        let mut slot = self.slot.lock();
        if slot.kick.is_some() {
            return false;
        }
        slot.parked = Some(waker);
        true
    }

    /// Takes the parked connection's wake-up, if it is parked: whoever wakes it resumes it.
    pub fn unpark(&self) -> Option<crate::park::Wakeup> {
        self.slot.lock().parked.take()
    }
}

/// One subscription as the session records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Options.
    pub opts: SubOptions,
    /// Subscription identifier.
    pub sub_id: Option<NonZeroU32>,
}

/// Where an outgoing QoS 1/2 message is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// Sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// PUBREL sent; waiting for PUBCOMP (QoS 2).
    AwaitComp,
}

/// An outgoing message that the client has not finished acknowledging.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Packet id it was sent with.
    pub packet_id: NonZeroU16,
    /// The delivery.
    pub delivery: Delivery,
    /// Handshake state.
    pub state: InflightState,
}

/// Mutable session state, always accessed under the session's lock.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Subscriptions by raw filter (including any `$share/{group}/` prefix); most sessions
    /// have one or two, kept without a hash table.
    pub subscriptions: SmallMap<Box<str>, Subscription>,
    /// Messages waiting to be sent.
    pub queue: Queue,
    /// Messages sent and not yet acknowledged, in send order.
    pub inflight: VecDeque<Inflight>,
    /// Next packet id to try.
    pub next_packet_id: u16,
    /// QoS 2 packet ids received and not yet released.
    pub incoming_qos2: BTreeSet<u16>,
    /// The current connection, if online (shared with its connection task).
    pub connection: Option<Arc<ConnInfo>>,
    /// Session expiry interval in seconds (`u32::MAX` never).
    pub expiry: u32,
    /// Bumped by every (re)connect and by ending the session; stale tasks compare it.
    pub generation: u64,
    /// The session ended (clean start, expiry); its holders must let go.
    pub ended: bool,
    /// When it went offline.
    pub disconnected_at: Option<Instant>,
    /// Messages dropped because the queue was full, or expired.
    pub dropped: u64,
    /// The identity that owns the session: the user name it was opened with (`None` for an
    /// anonymous client). `sessions.takeover: owner_only` lets only this identity resume it.
    pub owner: Option<String>,
    /// What few sessions ever need (a move to another node, congestion, a delayed will), in
    /// one allocation made on first use: every session of a large fleet carries the field.
    pub rare: Option<Box<Rare>>,
    /// The session is in the durable store (`persistence.data_dir`, expiry above zero): its
    /// changes and QoS 1/2 deliveries are written there.
    pub stored: bool,
    /// The last sequence number given to a stored delivery.
    pub next_seq: u64,
}

/// The parts of a session's state few sessions ever use (see [`SessionState::rare`]).
#[derive(Debug, Default)]
pub struct Rare {
    /// The session moved to this node; deliveries are forwarded there.
    pub moved_to: Option<String>,
    /// Ids of messages recently queued, kept for sessions that arrived from another node, so a
    /// message that reaches them both directly and through the old node is queued once.
    pub recent_ids: Option<Box<RecentIds>>,
    /// When the queue of this online session went above its high-water mark; cleared once it
    /// drains to the low-water mark. Publishers routing into it wait meanwhile (bounded).
    pub congested_since: Option<Instant>,
    /// Congested for longer than the drain timeout: publishers no longer wait for it and it
    /// sheds at its queue limit (logged once per episode).
    pub not_draining: bool,
    /// The delayed will waiting to be published for this session, if any: at most one.
    pub pending_will: Option<tokio::task::AbortHandle>,
}

/// A session's queue of deliveries, its byte count kept in step so the byte bound costs
/// nothing to check.
#[derive(Debug, Default)]
pub struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
}

impl Queue {
    /// Messages queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Topic and payload bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The next message to send.
    pub fn front(&self) -> Option<&Delivery> {
        self.items.front()
    }

    /// Takes the next message to send.
    pub fn pop_front(&mut self) -> Option<Delivery> {
        let d = self.items.pop_front()?;
        self.bytes = self.bytes.saturating_sub(d.size());
        Some(d)
    }

    /// Queues a message last.
    pub fn push_back(&mut self, d: Delivery) {
        self.bytes += d.size();
        self.items.push_back(d);
    }

    /// Puts a message back first (it was taken and could not be sent yet).
    pub fn push_front(&mut self, d: Delivery) {
        self.bytes += d.size();
        self.items.push_front(d);
    }

    /// The queued messages in order.
    pub fn iter(&self) -> impl Iterator<Item = &Delivery> {
        self.items.iter()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }
}

impl FromIterator<Delivery> for Queue {
    fn from_iter<I: IntoIterator<Item = Delivery>>(iter: I) -> Self {
        let mut q = Queue::default();
        for d in iter {
            q.push_back(d);
        }
        q
    }
}

impl IntoIterator for Queue {
    type Item = Delivery;
    type IntoIter = std::collections::vec_deque::IntoIter<Delivery>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// A bounded set of recent message ids.
#[derive(Debug, Default)]
pub struct RecentIds {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl RecentIds {
    const CAP: usize = 4096;

    /// Records `id`; false if it was already there.
    pub fn insert(&mut self, id: u64) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl SessionState {
    /// The rarely used parts, allocated on first use.
    pub fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    /// The node this session moved to, if it did.
    pub fn moved_to(&self) -> Option<&String> {
        self.rare.as_ref()?.moved_to.as_ref()
    }

    /// When the current congestion episode began, if one is running.
    pub fn congested_since(&self) -> Option<Instant> {
        self.rare.as_ref()?.congested_since
    }

    /// Whether the session is congested past its drain timeout (it sheds instead of holding
    /// publishers back).
    pub fn not_draining(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.not_draining)
    }

    /// The raw filters of its subscriptions, in no particular order.
    pub fn subscription_filters(&self) -> Vec<String> {
        self.subscriptions.keys().map(|k| k.to_string()).collect()
    }

    /// Takes the delayed will waiting for this session, if any.
    pub fn take_pending_will(&mut self) -> Option<tokio::task::AbortHandle> {
        self.rare.as_mut()?.pending_will.take()
    }

    /// Ends a congestion episode once the queue is down to `low` (called by the connection
    /// after it moved messages out of the queue). Returns true if publishers should be woken.
    pub fn relieve(&mut self, b: &QueueBounds, client_id: &str) -> bool {
        if self.congested_since().is_none() || !b.at_low_water(&self.queue) {
            return false;
        }
        let rare = self.rare_mut();
        rare.congested_since = None;
        if std::mem::take(&mut rare.not_draining) {
            tracing::info!(
                client_id,
                "session draining again; publishers are held back for it again"
            );
        }
        true
    }

    /// Allocates a packet id not used by any inflight message, or `None` if all are taken.
    pub fn alloc_packet_id(&mut self) -> Option<NonZeroU16> {
        for _ in 0..=u16::MAX {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            let Some(id) = NonZeroU16::new(self.next_packet_id) else {
                continue;
            };
            if !self.inflight.iter().any(|f| f.packet_id == id) {
                return Some(id);
            }
        }
        None
    }

    /// Removes and returns the inflight entry with `packet_id`.
    pub fn take_inflight(&mut self, packet_id: NonZeroU16) -> Option<Inflight> {
        let pos = self
            .inflight
            .iter()
            .position(|f| f.packet_id == packet_id)?;
        self.inflight.remove(pos)
    }
}

/// The bounds a session queue is kept within, from `sessions.*`: resolved once, passed by value.
#[derive(Debug, Clone, Copy)]
pub struct QueueBounds {
    /// Most messages queued (`max_offline_queue`).
    pub max: usize,
    /// Most topic and payload bytes queued (`max_queue_bytes`); half of it is a high-water
    /// mark too.
    pub max_bytes: usize,
    /// Queued messages above which an online session holds publishers back (0 = never).
    pub high_water: usize,
    /// How long a congested session may take to drain to `low_water` before it sheds.
    pub congestion_timeout: Duration,
    /// What to drop at `max`.
    pub policy: QueueFullPolicy,
    /// Whether QoS 0 messages are queued for offline sessions.
    pub queue_qos0: bool,
}

impl QueueBounds {
    /// The bounds `sessions.*` configure.
    pub fn new(c: &SessionConfig) -> Self {
        QueueBounds {
            max: c.max_offline_queue,
            max_bytes: c.max_queue_bytes,
            high_water: c.queue_high_water.min(c.max_offline_queue),
            congestion_timeout: Duration::from_secs(c.congestion_timeout),
            policy: c.queue_full_policy,
            queue_qos0: c.queue_qos0,
        }
    }

    /// Where a congestion episode ends: half the high-water mark.
    pub fn low_water(&self) -> usize {
        self.high_water / 2
    }

    /// Whether a queue is above its high-water mark (messages, or half the byte bound).
    fn above_high_water(&self, q: &Queue) -> bool {
        self.high_water > 0 && (q.len() >= self.high_water || q.bytes() >= self.max_bytes / 2)
    }

    /// Whether a queue has drained to its low-water mark.
    fn at_low_water(&self, q: &Queue) -> bool {
        q.len() <= self.low_water() && q.bytes() <= self.max_bytes / 4
    }

    /// Whether `extra` more bytes would not fit.
    fn full(&self, q: &Queue, extra: usize) -> bool {
        q.len() >= self.max || q.bytes() + extra > self.max_bytes
    }
}

/// Result of offering a delivery to a session.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// The session lives on another node now: forward the delivery there.
    Moved(String, Box<Delivery>),
    /// Already queued through another path (session that moved between nodes).
    Duplicate,
    /// Queued.
    Queued,
    /// Queued, and the session is above its high-water mark and still draining: the
    /// publisher should wait for it (see [`Session::holds_back`]).
    Congested,
    /// Queued, and the oldest queued message was dropped for it.
    QueuedDroppedOldest,
    /// Not queued (queue full with drop-new, or QoS 0 to an offline session).
    Dropped,
}

/// A session, shared by the registry, the router's routes and its connection task.
#[derive(Debug)]
pub struct Session {
    /// Client id.
    pub client_id: ByteString,
    /// State.
    pub state: Mutex<SessionState>,
    /// Wakes the connection task when the queue grows.
    pub notify: Notify,
}

/// Wakes publishers held back by a congested session when that congestion ends. One for all
/// sessions, so a session carries no wait list of its own: a woken publisher looks again at
/// the sessions it waits for (`Session::holds_back`), and episodes end rarely (a queue must
/// drain to its low-water mark).
pub static DRAINED: Notify = Notify::const_new();

/// Where a stored session's queue changes are written (the durable store,
/// `persist::Durable`): [`Session::enqueue`] writes them under the session's lock, so a
/// removal can never reach the store before the entry it removes.
pub trait QueueLog {
    /// `d` joins the queue of the session `st` (numbered here when the session is stored).
    fn enqueued(&self, client_id: &str, st: &mut SessionState, d: &mut Delivery);
    /// `d` left the queue without being delivered.
    fn dequeued(&self, client_id: &str, d: &Delivery);
}

impl Session {
    /// A new, empty, offline session.
    pub fn new(client_id: ByteString, expiry: u32) -> Arc<Self> {
        Arc::new(Session {
            client_id,
            state: Mutex::new(SessionState {
                expiry,
                ..Default::default()
            }),
            notify: Notify::new(),
        })
    }

    /// Until when a publisher that routed into this session must wait for it, if at all: only
    /// while it is online, above its low-water mark, and congested for less than the drain
    /// timeout.
    pub fn holds_back(&self, b: &QueueBounds) -> Option<Instant> {
        let st = self.state.lock();
        let since = st.congested_since()?;
        if st.connection.is_none() || st.not_draining() || b.at_low_water(&st.queue) {
            return None;
        }
        let until = since + b.congestion_timeout;
        (Instant::now() < until).then_some(until)
    }

    /// Notes a congestion episode that ended for a reason other than draining (the session
    /// went offline or ended) so held-back publishers go on.
    pub fn release_publishers(&self) {
        if let Some(r) = self.state.lock().rare.as_mut() {
            r.congested_since = None;
        }
        DRAINED.notify_waiters();
    }

    /// Offers a delivery within `b`: QoS 0 to offline sessions is queued only when
    /// `queue_qos0`; an online session above its high-water mark answers
    /// [`Enqueued::Congested`] until it has been congested for the drain timeout, then sheds.
    /// With `durable`, a QoS 1/2 delivery to a stored session is written to the store under
    /// the session's lock (so its removal can never be sent before it).
    pub fn enqueue(
        &self,
        mut d: Delivery,
        b: &QueueBounds,
        durable: Option<&dyn QueueLog>,
    ) -> Enqueued {
        let mut st = self.state.lock();
        if let Some(node) = st.moved_to() {
            return Enqueued::Moved(node.clone(), Box::new(d));
        }
        if st.ended {
            return Enqueued::Dropped;
        }
        if let Some(recent) = st.rare.as_mut().and_then(|r| r.recent_ids.as_mut()) {
            if !recent.insert(d.msg.id) {
                return Enqueued::Duplicate;
            }
        }
        let online = st.connection.is_some();
        if !online && d.qos == QoS::AtMostOnce && !b.queue_qos0 {
            st.dropped += 1;
            return Enqueued::Dropped;
        }
        let mut result = Enqueued::Queued;
        if online && b.above_high_water(&st.queue) && !st.not_draining() {
            let now = Instant::now();
            let since = *st.rare_mut().congested_since.get_or_insert(now);
            if now.saturating_duration_since(since) < b.congestion_timeout {
                result = Enqueued::Congested;
            } else {
                st.rare_mut().not_draining = true;
                tracing::warn!(
                    client_id = %self.client_id,
                    queued = st.queue.len(),
                    "session has not drained for {:?}; it sheds at its queue limit until it does",
                    b.congestion_timeout
                );
            }
        }
        let size = d.size();
        if b.full(&st.queue, size) {
            if b.policy == QueueFullPolicy::DropNew || size > b.max_bytes {
                st.dropped += 1;
                return Enqueued::Dropped;
            }
            while b.full(&st.queue, size) {
                let Some(old) = st.queue.pop_front() else {
                    break;
                };
                if let Some(db) = durable {
                    db.dequeued(&self.client_id, &old);
                }
                st.dropped += 1;
            }
            result = Enqueued::QueuedDroppedOldest;
        }
        if let Some(db) = durable {
            db.enqueued(&self.client_id, &mut st, &mut d);
        }
        st.queue.push_back(d);
        // A parked connection has no task to notify: its wake-up resumes it.
        let parked = st.connection.as_ref().and_then(|c| c.kick.unpark());
        drop(st);
        if online {
            self.notify.notify_one();
        }
        if let Some(w) = parked {
            w.wake();
        }
        result
    }
}

/// All sessions of this node by client id.
#[derive(Debug, Default)]
pub struct Registry {
    /// Keyed by the sessions' own client ids: a table slot is one pointer (a map from a
    /// copy of the id would be five words a session).
    sessions: Mutex<HashSet<ById>>,
    conn_ids: AtomicU64,
}

/// A session as a member of [`Registry`]'s table: hashed, compared and looked up by its
/// client id.
#[derive(Debug)]
struct ById(Arc<Session>);

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it (`Borrow<str>`).
        (*self.0.client_id).hash(state);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        *self.0.client_id == *other.0.client_id
    }
}

impl Eq for ById {}

impl std::borrow::Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.client_id
    }
}

impl Registry {
    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The session for `client_id`, if any.
    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(client_id).map(|s| s.0.clone())
    }

    /// Inserts `session`, returning the one it replaces.
    pub fn insert(&self, session: Arc<Session>) -> Option<Arc<Session>> {
        self.sessions.lock().replace(ById(session)).map(|s| s.0)
    }

    /// Removes `session` only if it is still the registered one for its client id.
    pub fn remove_if_same(&self, session: &Arc<Session>) -> bool {
        let mut set = self.sessions.lock();
        match set.get(&*session.client_id) {
            Some(s) if Arc::ptr_eq(&s.0, session) => {
                set.remove(&*session.client_id);
                true
            }
            _ => false,
        }
    }

    /// Snapshot of all sessions.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().iter().map(|s| s.0.clone()).collect()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Seconds since the Unix epoch, for timestamps shown to people.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use bytes::Bytes;

    fn delivery(qos: QoS, n: u8) -> Delivery {
        Delivery {
            msg: Arc::new(Message::new(
                ByteString::from_static("t"),
                Bytes::from(vec![n]),
                qos,
                false,
                None,
                ByteString::new(),
            )),
            qos,
            retain: false,
            sub_ids: vec![],
            share: None,
            seq: 0,
        }
    }

    /// Bounds without flow control.
    fn bounds(max: usize, policy: QueueFullPolicy, queue_qos0: bool) -> QueueBounds {
        QueueBounds {
            max,
            max_bytes: 1 << 20,
            high_water: 0,
            congestion_timeout: Duration::from_secs(5),
            policy,
            queue_qos0,
        }
    }

    fn online(s: &Session) {
        s.state.lock().connection = Some(Arc::new(ConnInfo {
            id: 1,
            peer: "127.0.0.1:1".parse().expect("addr"),
            listener: "mqtt",
            protocol: Protocol::V311,
            keep_alive: 60,
            username: None,
            connected_at: 0,
            kick: Arc::default(),
            acl: Arc::new(crate::acl::ClientAcl::AllowAll),
        }));
    }

    #[test]
    fn above_high_water_holds_publishers_back_until_drained() {
        let s = Session::new(ByteString::from_static("c"), 60);
        online(&s);
        let b = QueueBounds {
            high_water: 4,
            ..bounds(10, QueueFullPolicy::DropOldest, false)
        };
        for n in 0..4 {
            assert!(matches!(
                s.enqueue(delivery(QoS::AtLeastOnce, n), &b, None),
                Enqueued::Queued
            ));
        }
        assert!(s.holds_back(&b).is_none());
        assert!(matches!(
            s.enqueue(delivery(QoS::AtLeastOnce, 4), &b, None),
            Enqueued::Congested
        ));
        assert!(s.holds_back(&b).is_some());
        // Draining to 3 is not enough (low water is 2); to 2 ends the episode.
        let mut st = s.state.lock();
        st.queue.pop_front();
        st.queue.pop_front();
        assert!(!st.relieve(&b, "c"));
        st.queue.pop_front();
        assert!(st.relieve(&b, "c"));
        drop(st);
        assert!(s.holds_back(&b).is_none());
    }

    #[test]
    fn a_session_that_does_not_drain_sheds_and_releases_publishers() {
        let s = Session::new(ByteString::from_static("c"), 60);
        online(&s);
        let b = QueueBounds {
            high_water: 2,
            congestion_timeout: Duration::ZERO,
            ..bounds(3, QueueFullPolicy::DropOldest, false)
        };
        for n in 0..6 {
            let r = s.enqueue(delivery(QoS::AtLeastOnce, n), &b, None);
            assert!(!matches!(r, Enqueued::Congested), "{r:?}");
        }
        assert!(s.holds_back(&b).is_none());
        let st = s.state.lock();
        assert!(st.not_draining());
        assert_eq!(st.queue.len(), 3);
        assert_eq!(st.dropped, 3);
    }

    #[test]
    fn offline_sessions_never_hold_publishers_back() {
        let s = Session::new(ByteString::from_static("c"), 60);
        let b = QueueBounds {
            high_water: 1,
            ..bounds(5, QueueFullPolicy::DropOldest, false)
        };
        for n in 0..5 {
            let r = s.enqueue(delivery(QoS::AtLeastOnce, n), &b, None);
            assert!(matches!(r, Enqueued::Queued), "{r:?}");
        }
        assert!(s.holds_back(&b).is_none());
    }

    #[test]
    fn queue_is_bounded_drop_oldest() {
        let s = Session::new(ByteString::from_static("c"), 60);
        for n in 0..5 {
            s.enqueue(
                delivery(QoS::AtLeastOnce, n),
                &bounds(3, QueueFullPolicy::DropOldest, false),
                None,
            );
        }
        let st = s.state.lock();
        let kept: Vec<u8> = st.queue.iter().map(|d| d.msg.payload[0]).collect();
        assert_eq!(kept, vec![2, 3, 4]);
        assert_eq!(st.dropped, 2);
    }

    #[test]
    fn queue_bytes_are_bounded_and_counted() {
        let s = Session::new(ByteString::from_static("c"), 60);
        let b = QueueBounds {
            max_bytes: 10,
            ..bounds(100, QueueFullPolicy::DropOldest, true)
        };
        // Each delivery is 2 bytes (topic "t" and a one-byte payload).
        for n in 0..8 {
            s.enqueue(delivery(QoS::AtLeastOnce, n), &b, None);
        }
        let mut st = s.state.lock();
        assert_eq!((st.queue.len(), st.queue.bytes(), st.dropped), (5, 10, 3));
        st.queue.pop_front();
        assert_eq!(st.queue.bytes(), 8);
        st.queue.clear();
        assert_eq!(st.queue.bytes(), 0);
    }

    #[test]
    fn queue_is_bounded_drop_new() {
        let s = Session::new(ByteString::from_static("c"), 60);
        for n in 0..5 {
            s.enqueue(
                delivery(QoS::AtLeastOnce, n),
                &bounds(3, QueueFullPolicy::DropNew, false),
                None,
            );
        }
        let st = s.state.lock();
        let kept: Vec<u8> = st.queue.iter().map(|d| d.msg.payload[0]).collect();
        assert_eq!(kept, vec![0, 1, 2]);
    }

    #[test]
    fn offline_qos0_not_queued_by_default() {
        let s = Session::new(ByteString::from_static("c"), 60);
        let r = s.enqueue(
            delivery(QoS::AtMostOnce, 0),
            &bounds(3, QueueFullPolicy::DropNew, false),
            None,
        );
        assert!(matches!(r, Enqueued::Dropped));
        let r = s.enqueue(
            delivery(QoS::AtMostOnce, 0),
            &bounds(3, QueueFullPolicy::DropNew, true),
            None,
        );
        assert!(matches!(r, Enqueued::Queued));
    }

    #[test]
    fn moved_session_hands_deliveries_back_and_dedupes() {
        let s = Session::new(ByteString::from_static("c"), 60);
        s.state.lock().rare_mut().recent_ids = Some(Box::default());
        let d = delivery(QoS::AtLeastOnce, 1);
        let r = s.enqueue(d.clone(), &bounds(3, QueueFullPolicy::DropNew, false), None);
        assert!(matches!(r, Enqueued::Queued));
        let r = s.enqueue(d.clone(), &bounds(3, QueueFullPolicy::DropNew, false), None);
        assert!(matches!(r, Enqueued::Duplicate));
        s.state.lock().rare_mut().moved_to = Some("n2".into());
        let r = s.enqueue(d, &bounds(3, QueueFullPolicy::DropNew, false), None);
        assert!(matches!(r, Enqueued::Moved(n, _) if n == "n2"));
    }

    #[test]
    fn packet_ids_skip_inflight() {
        let mut st = SessionState::default();
        let a = st.alloc_packet_id().expect("id");
        st.inflight.push_back(Inflight {
            packet_id: a,
            delivery: delivery(QoS::AtLeastOnce, 0),
            state: InflightState::AwaitAck,
        });
        st.next_packet_id = 0;
        let b = st.alloc_packet_id().expect("id");
        assert_ne!(a, b);
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    /// The table finds a session by its client id, replaces it under the same id, and removes
    /// only the session that is still registered.
    #[test]
    fn sessions_are_found_replaced_and_removed_by_client_id() {
        let r = Registry::default();
        let first = Session::new("dev-1".into(), 0);
        assert!(r.insert(first.clone()).is_none());
        r.insert(Session::new("dev-2".into(), 0));
        assert!(Arc::ptr_eq(&r.get("dev-1").expect("found"), &first));
        let second = Session::new("dev-1".into(), 0);
        let replaced = r.insert(second.clone()).expect("replaces");
        assert!(Arc::ptr_eq(&replaced, &first));
        assert_eq!(r.len(), 2);
        assert!(!r.remove_if_same(&first), "no longer registered");
        assert!(r.remove_if_same(&second));
        assert!(r.get("dev-1").is_none());
        assert_eq!(r.all().len(), 1);
    }
}
