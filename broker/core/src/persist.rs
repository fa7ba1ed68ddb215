//! Durable sessions (`persistence.data_dir`): turns changes of persistent sessions, their
//! queues, QoS 2 state and the retained store into [`corvid_store`] ops, which `restore.rs`
//! reads back before the broker serves anyone after a restart. A PUBACK/PUBREC waits until
//! the ops its PUBLISH caused are durable (the connection holds it on the store's mark), so
//! what was acknowledged survives `kill -9`.
//!
//! What is stored: sessions with an expiry above zero (subscriptions with options, owner,
//! expiry, when they went offline), their queued QoS 1/2 deliveries keyed by a per-session
//! sequence number, the packet id and state of outgoing QoS 2 deliveries, the packet ids of
//! incoming QoS 2 messages not yet released, and retained messages. Record formats are the
//! cluster's wire types (postcard), so a session looks the same on a link and on disk.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use corvid_store::{Op, Recovered, Store, Sync};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::{PersistSync, PersistenceConfig};
use crate::message::{Delivery, Message};
use crate::session::SessionState;
use crate::wire::{WireDelivery, WireMsg, WireSub};

/// A session's own record.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredSession {
    /// Session expiry interval, seconds (`u32::MAX` never).
    pub(crate) expiry: u32,
    /// The identity that owns it.
    pub(crate) owner: Option<String>,
    /// When it went offline (Unix seconds); `None` while online (a crash then counts the
    /// offline time from the restart).
    pub(crate) offline_since: Option<u64>,
    /// Subscriptions by raw filter.
    pub(crate) subscriptions: Vec<(String, WireSub)>,
}

/// A message with its expiry as a wall-clock time (the wire form's is relative).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredDelivery {
    pub(crate) delivery: WireDelivery,
    /// Unix milliseconds after which it is not delivered.
    pub(crate) expires_at_ms: Option<u64>,
}

/// A message with its expiry as a wall-clock time: a retained message, and the message of a
/// held forward and of a pending will.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredMsg {
    pub(crate) msg: WireMsg,
    /// Unix milliseconds after which it is not delivered.
    pub(crate) expires_at_ms: Option<u64>,
}

impl StoredMsg {
    fn of(msg: &Message) -> Self {
        StoredMsg {
            msg: WireMsg::from_msg(msg),
            expires_at_ms: deadline_ms(msg.expires_at),
        }
    }

    /// The message, its expiry an `Instant` again.
    pub(crate) fn into_msg(self) -> Message {
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
pub(crate) struct StoredWill {
    pub(crate) stored: StoredMsg,
    /// Unix milliseconds when it is published unless the session is resumed first.
    pub(crate) due_at_ms: u64,
}

/// Marker key of a session's pending delayed will.
pub(crate) const WILL_KEY: &[u8] = b"w";

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

pub(crate) fn unix_ms(now_wall: SystemTime) -> u64 {
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
pub(crate) fn deadline_instant(ms: Option<u64>) -> Option<Instant> {
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
    /// What the store held when opened, until `restore::restore` takes it.
    pub(crate) recovered: Mutex<Option<Recovered>>,
    /// The cluster layer's records, until the cluster layer takes them at its start.
    cluster_records: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").finish_non_exhaustive()
    }
}

/// Why the durable store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store under `persistence.data_dir` cannot be opened or recovered.
    #[error(transparent)]
    Store(#[from] corvid_store::StoreError),
    /// Its metrics cannot be registered (a bug).
    #[error("store metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Durable {
    /// Opens the store under `persistence.data_dir`, if set, and registers its metrics.
    pub fn open(
        cfg: &PersistenceConfig,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Option<Durable>, OpenError> {
        let Some(dir) = &cfg.data_dir else {
            return Ok(None);
        };
        let sync = match cfg.sync {
            PersistSync::Always => Sync::Always,
            PersistSync::EveryMs(ms) => Sync::Every(Duration::from_millis(u64::from(ms.get()))),
        };
        let started = Instant::now();
        let (store, recovered) = Store::open(
            &dir.join("store"),
            sync,
            Duration::from_micros(u64::from(cfg.group_commit_us)),
        )?;
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

    pub(crate) fn send(&self, op: Op) {
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

impl crate::session::QueueLog for Durable {
    fn enqueued(&self, client_id: &str, st: &mut SessionState, d: &mut Delivery) {
        self.enqueue(client_id, st, d);
    }
    fn dequeued(&self, client_id: &str, d: &Delivery) {
        self.dequeue(client_id, d);
    }
}
