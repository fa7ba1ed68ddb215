//! Sessions: the state MQTT keeps for a client id across connections — subscriptions, the
//! queue of messages not yet sent, the inflight window, and QoS 2 receive state.
//!
//! A session's state lives behind one short-held mutex, never the connection task's stack,
//! so a new connection (on this node, or later through the cluster layer) can take it over
//! at any moment: the registry is the cluster's seam for takeover and hand-off.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytestring::ByteString;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::codec::{Protocol, QoS, SubOptions};
use crate::config::QueueFullPolicy;
use crate::message::Delivery;

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
#[derive(Debug, Clone, serde::Serialize)]
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
    #[serde(skip)]
    /// Asks the connection task to close.
    pub kick: Arc<KickSlot>,
    #[serde(skip)]
    /// This connection's ACL: deliveries of `$SYS` topics that name other clients check it.
    pub acl: Arc<crate::acl::ClientAcl>,
}

/// A one-shot mailbox to ask a connection task to close: a few dozen bytes per connection,
/// where a channel would allocate a block of slots.
#[derive(Debug, Default)]
pub struct KickSlot {
    kick: Mutex<Option<Kick>>,
    notify: Notify,
}

impl KickSlot {
    /// Asks the connection to close (the first reason wins).
    pub fn send(&self, k: Kick) {
        let mut slot = self.kick.lock();
        if slot.is_none() {
            *slot = Some(k);
        }
        drop(slot);
        self.notify.notify_one();
    }

    /// Waits for a kick. Cancel-safe.
    pub async fn recv(&self) -> Kick {
        loop {
            if let Some(k) = self.kick.lock().take() {
                return k;
            }
            self.notify.notified().await;
        }
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
    /// Subscriptions by raw filter (including any `$share/{group}/` prefix).
    pub subscriptions: HashMap<String, Subscription>,
    /// Messages waiting to be sent.
    pub queue: VecDeque<Delivery>,
    /// Messages sent and not yet acknowledged, in send order.
    pub inflight: VecDeque<Inflight>,
    /// Next packet id to try.
    pub next_packet_id: u16,
    /// QoS 2 packet ids received and not yet released.
    pub incoming_qos2: HashSet<u16>,
    /// The current connection, if online.
    pub connection: Option<ConnInfo>,
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
    /// The session moved to this node; deliveries are forwarded there.
    pub moved_to: Option<String>,
    /// Ids of messages recently queued, kept for sessions that arrived from another node, so a
    /// message that reaches them both directly and through the old node is queued once.
    pub recent_ids: Option<RecentIds>,
    /// The identity that owns the session: the user name it was opened with (`None` for an
    /// anonymous client). `sessions.takeover: owner_only` lets only this identity resume it.
    pub owner: Option<String>,
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

/// Result of offering a delivery to a session.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// The session lives on another node now: forward the delivery there.
    Moved(String, Box<Delivery>),
    /// Already queued through another path (session that moved between nodes).
    Duplicate,
    /// Queued.
    Queued,
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

    /// Offers a delivery; bounded by `max_queue` with `policy`; QoS 0 to offline sessions is
    /// queued only when `queue_qos0`.
    pub fn enqueue(
        &self,
        d: Delivery,
        max_queue: usize,
        policy: QueueFullPolicy,
        queue_qos0: bool,
    ) -> Enqueued {
        let mut st = self.state.lock();
        if let Some(node) = &st.moved_to {
            return Enqueued::Moved(node.clone(), Box::new(d));
        }
        if st.ended {
            return Enqueued::Dropped;
        }
        if let Some(recent) = st.recent_ids.as_mut() {
            if !recent.insert(d.msg.id) {
                return Enqueued::Duplicate;
            }
        }
        let online = st.connection.is_some();
        if !online && d.qos == QoS::AtMostOnce && !queue_qos0 {
            st.dropped += 1;
            return Enqueued::Dropped;
        }
        let mut result = Enqueued::Queued;
        if st.queue.len() >= max_queue {
            match policy {
                QueueFullPolicy::DropNew => {
                    st.dropped += 1;
                    return Enqueued::Dropped;
                }
                QueueFullPolicy::DropOldest => {
                    st.queue.pop_front();
                    st.dropped += 1;
                    result = Enqueued::QueuedDroppedOldest;
                }
            }
        }
        st.queue.push_back(d);
        drop(st);
        if online {
            self.notify.notify_one();
        }
        result
    }
}

/// All sessions of this node by client id.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<ByteString, Arc<Session>>>,
    conn_ids: AtomicU64,
}

impl Registry {
    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The session for `client_id`, if any.
    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(client_id).cloned()
    }

    /// Inserts `session`, returning the one it replaces.
    pub fn insert(&self, session: Arc<Session>) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .insert(session.client_id.clone(), session)
    }

    /// Removes `session` only if it is still the registered one for its client id.
    pub fn remove_if_same(&self, session: &Arc<Session>) -> bool {
        let mut map = self.sessions.lock();
        match map.get(&session.client_id) {
            Some(s) if Arc::ptr_eq(s, session) => {
                map.remove(&session.client_id);
                true
            }
            _ => false,
        }
    }

    /// Snapshot of all sessions.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
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
        }
    }

    #[test]
    fn queue_is_bounded_drop_oldest() {
        let s = Session::new(ByteString::from_static("c"), 60);
        for n in 0..5 {
            s.enqueue(
                delivery(QoS::AtLeastOnce, n),
                3,
                QueueFullPolicy::DropOldest,
                false,
            );
        }
        let st = s.state.lock();
        let kept: Vec<u8> = st.queue.iter().map(|d| d.msg.payload[0]).collect();
        assert_eq!(kept, vec![2, 3, 4]);
        assert_eq!(st.dropped, 2);
    }

    #[test]
    fn queue_is_bounded_drop_new() {
        let s = Session::new(ByteString::from_static("c"), 60);
        for n in 0..5 {
            s.enqueue(
                delivery(QoS::AtLeastOnce, n),
                3,
                QueueFullPolicy::DropNew,
                false,
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
            3,
            QueueFullPolicy::DropNew,
            false,
        );
        assert!(matches!(r, Enqueued::Dropped));
        let r = s.enqueue(
            delivery(QoS::AtMostOnce, 0),
            3,
            QueueFullPolicy::DropNew,
            true,
        );
        assert!(matches!(r, Enqueued::Queued));
    }

    #[test]
    fn moved_session_hands_deliveries_back_and_dedupes() {
        let s = Session::new(ByteString::from_static("c"), 60);
        s.state.lock().recent_ids = Some(RecentIds::default());
        let d = delivery(QoS::AtLeastOnce, 1);
        let r = s.enqueue(d.clone(), 3, QueueFullPolicy::DropNew, false);
        assert!(matches!(r, Enqueued::Queued));
        let r = s.enqueue(d.clone(), 3, QueueFullPolicy::DropNew, false);
        assert!(matches!(r, Enqueued::Duplicate));
        s.state.lock().moved_to = Some("n2".into());
        let r = s.enqueue(d, 3, QueueFullPolicy::DropNew, false);
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
