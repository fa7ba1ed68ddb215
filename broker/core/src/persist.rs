//! Durable sessions (`persistence.data_dir`): turns changes of persistent sessions, their
//! queues, QoS 2 state and the retained store into [`corvid_store`] ops, and restores all of
//! it before the broker serves anyone after a restart. A PUBACK/PUBREC waits until the ops
//! its PUBLISH caused are durable (the connection holds it on the store's mark), so what was
//! acknowledged survives `kill -9`.
//!
//! What is stored: sessions with an expiry above zero (subscriptions with options, owner,
//! expiry, when they went offline), their queued QoS 1/2 deliveries keyed by a per-session
//! sequence number, the packet id and state of outgoing QoS 2 deliveries, the packet ids of
//! incoming QoS 2 messages not yet released, and retained messages. Record formats are the
//! cluster's wire types (postcard), so a session looks the same on a link and on disk.

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytestring::ByteString;
use corvid_store::{Op, Recovered, Store, Sync};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::config::{PersistSync, PersistenceConfig};
use crate::message::{Delivery, Message, Msg};
use crate::session::{Inflight, InflightState, Session, SessionState};
use crate::wire::{WireDelivery, WireMsg, WireSub};

/// A session's own record.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSession {
    /// Session expiry interval, seconds (`u32::MAX` never).
    expiry: u32,
    /// The identity that owns it.
    owner: Option<String>,
    /// When it went offline (Unix seconds); `None` while online (a crash then counts the
    /// offline time from the restart).
    offline_since: Option<u64>,
    /// Subscriptions by raw filter.
    subscriptions: Vec<(String, WireSub)>,
}

/// A message with its expiry as a wall-clock time (the wire form's is relative).
#[derive(Debug, Serialize, Deserialize)]
struct StoredDelivery {
    delivery: WireDelivery,
    /// Unix milliseconds after which it is not delivered.
    expires_at_ms: Option<u64>,
}

/// A message with its expiry as a wall-clock time: a retained message, and the message of a
/// held forward and of a pending will.
#[derive(Debug, Serialize, Deserialize)]
struct StoredMsg {
    msg: WireMsg,
    /// Unix milliseconds after which it is not delivered.
    expires_at_ms: Option<u64>,
}

impl StoredMsg {
    fn of(msg: &Message) -> Self {
        StoredMsg {
            msg: WireMsg::from_msg(msg),
            expires_at_ms: deadline_ms(msg.expires_at),
        }
    }

    /// The message, its expiry an `Instant` again.
    fn into_msg(self) -> Message {
        let mut m = Arc::unwrap_or_clone(self.msg.into_msg());
        m.expires_at = deadline_instant(self.expires_at_ms);
        m
    }
}

/// A message held for a peer until it has it (the cluster's `held` messages).
#[derive(Debug, Serialize, Deserialize)]
struct StoredForward {
    stored: StoredMsg,
    /// Deliver to ordinary subscriptions.
    plain: bool,
    /// Shared groups assigned to the peer.
    groups: Vec<String>,
}

/// Encodes a message held for a peer.
pub fn encode_forward(msg: &Message, plain: bool, groups: &[String]) -> Option<Vec<u8>> {
    let rec = StoredForward {
        stored: StoredMsg::of(msg),
        plain,
        groups: groups.to_vec(),
    };
    postcard::to_stdvec(&rec)
        .inspect_err(|e| tracing::error!(error = %e, "held message not encoded"))
        .ok()
}

/// Decodes a message held for a peer (its expiry relative to now again); `None` when the
/// record is unreadable.
pub fn decode_forward(rec: &[u8]) -> Option<(WireMsg, bool, Vec<String>)> {
    let s: StoredForward = postcard::from_bytes(rec).ok()?;
    Some((WireMsg::from_msg(&s.stored.into_msg()), s.plain, s.groups))
}

/// A will waiting out its delay, with when it is due.
#[derive(Debug, Serialize, Deserialize)]
struct StoredWill {
    stored: StoredMsg,
    /// Unix milliseconds when it is published unless the session is resumed first.
    due_at_ms: u64,
}

/// Marker key of a session's pending delayed will.
const WILL_KEY: &[u8] = b"w";

/// Marker key of an incoming QoS 2 packet id (received, not yet released).
fn incoming_key(packet_id: u16) -> Vec<u8> {
    let mut k = b"i".to_vec();
    k.extend_from_slice(&packet_id.to_be_bytes());
    k
}

/// Marker key of the packet id an outgoing QoS 2 delivery was sent with.
fn outgoing_key(seq: u64) -> Vec<u8> {
    let mut k = b"o".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn unix_ms(now_wall: SystemTime) -> u64 {
    now_wall
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An `Instant` deadline as Unix milliseconds.
fn deadline_ms(at: Option<Instant>) -> Option<u64> {
    let at = at?;
    let left = at.saturating_duration_since(Instant::now());
    Some(unix_ms(SystemTime::now()) + left.as_millis() as u64)
}

/// Unix milliseconds back to an `Instant` deadline (`now` if already past).
fn deadline_instant(ms: Option<u64>) -> Option<Instant> {
    let ms = ms?;
    let left = ms.saturating_sub(unix_ms(SystemTime::now()));
    Some(Instant::now() + Duration::from_millis(left))
}

/// The store's figures as metrics, refreshed at scrape time from [`corvid_store::Stats`].
struct StoreMetrics {
    commits: prometheus::IntCounter,
    syncs: prometheus::IntCounter,
    ops: prometheus::IntCounter,
    failures: prometheus::IntCounter,
    commit_micros: prometheus::IntCounter,
    max_commit_micros: prometheus::IntGauge,
    disk_bytes: prometheus::IntGauge,
    pending: prometheus::IntGauge,
    failed: prometheus::IntGauge,
}

impl StoreMetrics {
    fn new(m: &crate::metrics::Metrics) -> Result<Self, prometheus::Error> {
        Ok(StoreMetrics {
            commits: m.counter("corvid_store_commits_total", "Group commits written to the durable store")?,
            syncs: m.counter(
                "corvid_store_syncs_total",
                "fdatasync calls of the durable store (commits of acknowledgements alone need none)",
            )?,
            ops: m.counter("corvid_store_ops_total", "Changes written to the durable store")?,
            failures: m.counter(
                "corvid_store_commit_failures_total",
                "Commits that failed (I/O error, disk full); QoS 1/2 publishers are disconnected unacknowledged",
            )?,
            commit_micros: m.counter(
                "corvid_store_commit_microseconds_total",
                "Time spent writing and syncing commits (with corvid_store_commits_total: mean commit latency)",
            )?,
            max_commit_micros: m.gauge(
                "corvid_store_commit_max_microseconds",
                "Slowest commit since the last scrape",
            )?,
            disk_bytes: m.gauge("corvid_store_disk_bytes", "Bytes the durable store uses on disk")?,
            pending: m.gauge(
                "corvid_store_pending_requests",
                "Changes handed to the store and not yet durable (acknowledgements wait on them)",
            )?,
            failed: m.gauge(
                "corvid_store_failed",
                "1 once a commit failed: nothing more is acknowledged until the broker restarts",
            )?,
        })
    }
}

/// Brings a counter up to `value` (the store counts; Prometheus counters only add).
fn catch_up(c: &prometheus::IntCounter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

/// The broker's handle on its durable store.
pub struct Durable {
    store: Store,
    /// What the store held when opened, until [`restore`] takes it.
    recovered: Mutex<Option<Recovered>>,
    /// The cluster layer's records, until the cluster layer takes them at its start.
    cluster_records: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").finish_non_exhaustive()
    }
}

impl Durable {
    /// Opens the store under `persistence.data_dir`, if set, and registers its metrics.
    pub fn open(
        cfg: &PersistenceConfig,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Option<Durable>, crate::broker::BrokerError> {
        let Some(dir) = &cfg.data_dir else {
            return Ok(None);
        };
        let sync = match cfg.sync {
            PersistSync::Always => Sync::Always,
            PersistSync::EveryMs(ms) => Sync::Every(Duration::from_millis(u64::from(ms.get()))),
        };
        let started = Instant::now();
        let (store, recovered) = Store::open(&dir.join("store"), sync)?;
        tracing::info!(
            dir = %dir.display(),
            sessions = recovered.sessions.len(),
            queued = recovered.queued.len(),
            retained = recovered.retained.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "durable store opened"
        );
        let mut recovered = recovered;
        let cluster_records = std::mem::take(&mut recovered.cluster);
        Ok(Some(Durable {
            store,
            recovered: Mutex::new(Some(recovered)),
            cluster_records: Mutex::new(cluster_records),
            metrics: StoreMetrics::new(metrics)?,
        }))
    }

    /// Copies the store's figures into the metrics (at scrape time).
    pub fn refresh_metrics(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (s, m) = (self.store.stats(), &self.metrics);
        catch_up(&m.commits, s.commits.load(Relaxed));
        catch_up(&m.syncs, s.syncs.load(Relaxed));
        catch_up(&m.ops, s.ops.load(Relaxed));
        catch_up(&m.failures, s.failures.load(Relaxed));
        catch_up(&m.commit_micros, s.commit_micros.load(Relaxed));
        m.max_commit_micros
            .set(i64::try_from(s.max_commit_micros.swap(0, Relaxed)).unwrap_or(i64::MAX));
        m.disk_bytes
            .set(i64::try_from(self.store.disk_space()).unwrap_or(i64::MAX));
        let pending = self.store.submitted().saturating_sub(self.store.durable());
        m.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        m.failed.set(i64::from(self.store.failed()));
    }

    /// The store (marks, stats).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn send(&self, op: Op) {
        self.store.send(vec![op]);
    }

    /// Writes a session's record (identity, expiry, subscriptions); marks it stored.
    pub fn put_session(&self, client_id: &str, st: &mut SessionState) {
        st.stored = true;
        let offline_since = st.connection.is_none().then(|| {
            let ago = st.disconnected_at.map_or(0, |t| t.elapsed().as_secs());
            unix_ms(SystemTime::now()) / 1000 - ago
        });
        let rec = StoredSession {
            expiry: st.expiry,
            owner: st.owner.clone(),
            offline_since,
            subscriptions: st
                .subscriptions
                .iter()
                .map(|(f, s)| (f.to_string(), WireSub::from_sub(s)))
                .collect(),
        };
        match postcard::to_stdvec(&rec) {
            Ok(record) => self.send(Op::PutSession {
                client_id: client_id.to_string(),
                record,
            }),
            Err(e) => tracing::error!(client_id, error = %e, "session record not encoded"),
        }
    }

    /// Removes a stored session and everything it holds.
    pub fn delete_session(&self, client_id: &str, st: &mut SessionState) {
        if std::mem::take(&mut st.stored) {
            self.send(Op::DeleteSession {
                client_id: client_id.to_string(),
            });
        }
    }

    /// Gives `d` the session's next sequence number and stores it, if the session is stored
    /// and the delivery is QoS 1 or 2.
    pub fn enqueue(&self, client_id: &str, st: &mut SessionState, d: &mut Delivery) {
        if !st.stored || d.qos == crate::codec::QoS::AtMostOnce {
            return;
        }
        st.next_seq += 1;
        d.seq = st.next_seq;
        let rec = StoredDelivery {
            delivery: WireDelivery::from_delivery(d),
            expires_at_ms: deadline_ms(d.msg.expires_at),
        };
        match postcard::to_stdvec(&rec) {
            Ok(record) => self.send(Op::Enqueue {
                client_id: client_id.to_string(),
                seq: d.seq,
                record,
            }),
            Err(e) => {
                d.seq = 0;
                tracing::error!(client_id, error = %e, "delivery not encoded");
            }
        }
    }

    /// A stored delivery is done with (acknowledged, expired, dropped).
    pub fn dequeue(&self, client_id: &str, d: &Delivery) {
        if d.seq == 0 {
            return;
        }
        let mut ops = vec![Op::Dequeue {
            client_id: client_id.to_string(),
            seq: d.seq,
        }];
        if d.qos == crate::codec::QoS::ExactlyOnce {
            ops.push(Op::DeleteMark {
                client_id: client_id.to_string(),
                key: outgoing_key(d.seq),
            });
            self.store.send(ops);
        } else {
            // Undone by a power failure, a QoS 1 delivery only comes again (at least once):
            // no sync of its own.
            self.store.send_relaxed(ops);
        }
    }

    /// A stored QoS 2 delivery was sent with `packet_id`; `released` once PUBREL went out.
    pub fn sent_qos2(&self, client_id: &str, d: &Delivery, packet_id: NonZeroU16, released: bool) {
        if d.seq == 0 {
            return;
        }
        let [a, b] = packet_id.get().to_be_bytes();
        self.send(Op::PutMark {
            client_id: client_id.to_string(),
            key: outgoing_key(d.seq),
            record: vec![a, b, u8::from(released)],
        });
    }

    /// An incoming QoS 2 message was routed and awaits PUBREL.
    pub fn put_incoming(&self, client_id: &str, st: &SessionState, packet_id: u16) {
        if st.stored {
            self.send(Op::PutMark {
                client_id: client_id.to_string(),
                key: incoming_key(packet_id),
                record: Vec::new(),
            });
        }
    }

    /// An incoming QoS 2 message was released.
    pub fn delete_incoming(&self, client_id: &str, st: &SessionState, packet_id: u16) {
        if st.stored {
            self.send(Op::DeleteMark {
                client_id: client_id.to_string(),
                key: incoming_key(packet_id),
            });
        }
    }

    /// A delayed will was armed for a stored session: due in `delay_s` seconds.
    pub fn put_will(&self, client_id: &str, st: &SessionState, msg: &Message, delay_s: u32) {
        if !st.stored {
            return;
        }
        let rec = StoredWill {
            stored: StoredMsg::of(msg),
            due_at_ms: unix_ms(SystemTime::now()) + u64::from(delay_s) * 1000,
        };
        match postcard::to_stdvec(&rec) {
            Ok(record) => self.send(Op::PutMark {
                client_id: client_id.to_string(),
                key: WILL_KEY.to_vec(),
                record,
            }),
            Err(e) => tracing::error!(client_id, error = %e, "will not encoded"),
        }
    }

    /// A stored session's delayed will was published or cancelled.
    pub fn delete_will(&self, client_id: &str, st: &SessionState) {
        if st.stored {
            self.send(Op::DeleteMark {
                client_id: client_id.to_string(),
                key: WILL_KEY.to_vec(),
            });
        }
    }

    /// A retained message was set (or cleared, by an empty payload).
    pub fn retained(&self, msg: &Message) {
        if msg.payload.is_empty() {
            self.send(Op::DeleteRetained {
                topic: msg.topic.to_string(),
            });
            return;
        }
        match postcard::to_stdvec(&StoredMsg::of(msg)) {
            Ok(record) => self.send(Op::PutRetained {
                topic: msg.topic.to_string(),
                record,
            }),
            Err(e) => tracing::error!(topic = %msg.topic, error = %e, "retained not encoded"),
        }
    }

    /// The cluster layer's records as the store held them at start (taken once).
    pub fn take_cluster_records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        std::mem::take(&mut *self.cluster_records.lock())
    }

    /// Writes a cluster-layer record; returns the mark it is durable at.
    pub fn put_cluster(&self, key: Vec<u8>, record: Vec<u8>) -> u64 {
        self.store.send(vec![Op::PutCluster { key, record }])
    }

    /// Removes cluster-layer records.
    pub fn delete_cluster(&self, keys: Vec<Vec<u8>>) {
        if !keys.is_empty() {
            self.store.send(
                keys.into_iter()
                    .map(|key| Op::DeleteCluster { key })
                    .collect(),
            );
        }
    }

    /// Commits what was sent and stops the writer (graceful shutdown).
    pub async fn close(&self) {
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

/// What [`restore`] brought back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Sessions restored.
    pub sessions: usize,
    /// Sessions dropped because they expired while the broker was down.
    pub expired_sessions: usize,
    /// Deliveries restored (queued or in flight).
    pub messages: usize,
    /// Deliveries dropped because their message expired.
    pub expired_messages: usize,
    /// Retained messages restored.
    pub retained: usize,
    /// Delayed wills restored (armed again, or published: their session expired meanwhile).
    pub wills: usize,
}

/// Restores what the store held into `broker`: retained messages, sessions with their
/// routes, queues, in-flight QoS 2 and incoming QoS 2 state. Called once at start, before any
/// listener accepts.
pub fn restore(broker: &Arc<Broker>) -> Restored {
    let mut out = Restored::default();
    let Some(db) = &broker.durable else {
        return out;
    };
    let Some(r) = db.recovered.lock().take() else {
        return out;
    };
    let started = Instant::now();
    let now_s = unix_ms(SystemTime::now()) / 1000;
    for (topic, rec) in r.retained {
        match postcard::from_bytes::<StoredMsg>(&rec) {
            Ok(s) => {
                let m = s.into_msg();
                if m.expired(Instant::now()) {
                    db.send(Op::DeleteRetained { topic });
                    continue;
                }
                broker.retained.set(Arc::new(m));
                out.retained += 1;
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "unreadable retained record dropped");
                db.send(Op::DeleteRetained { topic });
            }
        }
    }
    let mut sessions: HashMap<String, Arc<Session>> = HashMap::new();
    // Sessions that expired while the broker was down: their pending wills are due now.
    let mut expired: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (client_id, rec) in r.sessions {
        let s = match postcard::from_bytes::<StoredSession>(&rec) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(client_id, error = %e, "unreadable session record dropped");
                db.send(Op::DeleteSession { client_id });
                continue;
            }
        };
        let offline_for = s.offline_since.map_or(0, |t| now_s.saturating_sub(t));
        if s.expiry != u32::MAX && offline_for >= u64::from(s.expiry) {
            expired.insert(client_id.clone());
            db.send(Op::DeleteSession { client_id });
            out.expired_sessions += 1;
            broker.metrics.sessions_expired.inc();
            continue;
        }
        let session = Session::new(ByteString::from(client_id.as_str()), s.expiry);
        {
            let mut st = session.state.lock();
            st.owner = s.owner;
            st.stored = true;
            st.disconnected_at = Some(
                Instant::now()
                    .checked_sub(Duration::from_secs(offline_for))
                    .unwrap_or_else(Instant::now),
            );
        }
        for (raw, w) in s.subscriptions {
            broker.restore_subscription(&session, raw, w.to_sub());
        }
        broker.sessions.insert(session.clone());
        if s.expiry != u32::MAX {
            let left = u64::from(s.expiry) - offline_for;
            let generation = session.state.lock().generation;
            broker.schedule_expiry_in(&session, generation, Duration::from_secs(left));
        }
        sessions.insert(client_id, session);
        out.sessions += 1;
    }
    // Outgoing QoS 2 deliveries already sent: (client, seq) → (packet id, released).
    let mut sent: HashMap<(String, u64), (u16, bool)> = HashMap::new();
    for (client_id, key, rec) in r.marks {
        if key == WILL_KEY {
            if restore_will(
                broker,
                db,
                &client_id,
                &rec,
                sessions.get(&client_id),
                &expired,
            ) {
                out.wills += 1;
            }
            continue;
        }
        let Some(session) = sessions.get(&client_id) else {
            continue; // the session's deletion covers it
        };
        match (key.first(), key.len(), rec.as_slice()) {
            (Some(b'i'), 3, _) => {
                let id = u16::from_be_bytes([key[1], key[2]]);
                session.state.lock().incoming_qos2.insert(id);
            }
            (Some(b'o'), 9, [a, b, released]) => {
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&key[1..9]);
                sent.insert(
                    (client_id, u64::from_be_bytes(seq)),
                    (u16::from_be_bytes([*a, *b]), *released != 0),
                );
            }
            _ => tracing::warn!(client_id, "unknown session marker ignored"),
        }
    }
    let now = Instant::now();
    let mut orphans: Vec<String> = Vec::new();
    for (client_id, seq, rec) in r.queued {
        let Some(session) = sessions.get(&client_id) else {
            if orphans.last() != Some(&client_id) {
                orphans.push(client_id);
            }
            continue;
        };
        let mut d = match postcard::from_bytes::<StoredDelivery>(&rec) {
            Ok(s) => {
                let mut d = s.delivery.into_delivery();
                let mut m = Arc::unwrap_or_clone(d.msg);
                m.expires_at = deadline_instant(s.expires_at_ms);
                d.msg = Msg::new(m);
                d
            }
            Err(e) => {
                tracing::warn!(client_id, seq, error = %e, "unreadable queued message dropped");
                db.send(Op::Dequeue { client_id, seq });
                continue;
            }
        };
        d.seq = seq;
        let mut st = session.state.lock();
        st.next_seq = st.next_seq.max(seq);
        if d.msg.expired(now) {
            drop(st);
            db.dequeue(&client_id, &d);
            out.expired_messages += 1;
            continue;
        }
        out.messages += 1;
        match sent
            .remove(&(client_id, seq))
            .and_then(|(id, rel)| Some((NonZeroU16::new(id)?, rel)))
        {
            Some((packet_id, released)) => st.inflight.push_back(Inflight {
                packet_id,
                delivery: d,
                state: if released {
                    InflightState::AwaitComp
                } else {
                    InflightState::AwaitAck
                },
            }),
            None => st.queue.push_back(d),
        }
    }
    for client_id in orphans {
        // Queued messages whose session record is gone (never written, or unreadable).
        db.send(Op::DeleteSession { client_id });
    }
    tracing::info!(
        sessions = out.sessions,
        expired_sessions = out.expired_sessions,
        messages = out.messages,
        expired_messages = out.expired_messages,
        retained = out.retained,
        wills = out.wills,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "durable state restored"
    );
    out
}

/// Arms a delayed will again for a restored session (what is left of its delay), or publishes
/// it when its session expired while the broker was down. False when it is unreadable (then
/// dropped) or its session is gone for another reason.
fn restore_will(
    broker: &Arc<Broker>,
    db: &Durable,
    client_id: &str,
    rec: &[u8],
    session: Option<&Arc<Session>>,
    expired: &std::collections::HashSet<String>,
) -> bool {
    let will = match postcard::from_bytes::<StoredWill>(rec) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(client_id, error = %e, "unreadable pending will dropped");
            db.send(Op::DeleteMark {
                client_id: client_id.to_string(),
                key: WILL_KEY.to_vec(),
            });
            return false;
        }
    };
    let msg = Msg::new(will.stored.into_msg());
    match session {
        Some(s) => {
            let left = will.due_at_ms.saturating_sub(unix_ms(SystemTime::now()));
            let mut st = s.state.lock();
            let generation = st.generation;
            let delay = Duration::from_millis(left);
            broker.arm_will(msg, delay, s, &mut st, generation, true);
            true
        }
        None if expired.contains(client_id) => {
            broker.publish_restored_will(msg);
            true
        }
        None => false,
    }
}
