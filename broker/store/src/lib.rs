//! Durable broker state on an embedded LSM engine ([fjall], chosen by measurement:
//! `docs/adr/0002-durable-session-store.md`). The broker describes each change as an [`Op`];
//! a single writer thread gathers the ops of every caller that arrived while the previous
//! commit was on its way to disk into one atomic batch and one `fdatasync` (group commit),
//! then completes each caller's [`Ticket`]. A PUBACK/PUBREC waits on its ticket, so an
//! acknowledged message is on disk. [`Store::open`] hands back everything stored
//! ([`Recovered`]) before the broker serves anyone.
//!
//! The store knows keys and bytes only: values are the broker's own encodings, so the record
//! formats live with the types they store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

mod queue;
use queue::{Pending, QueueWrite, Queues};

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O error, disk full, corruption).
    #[error("store: {0}")]
    Engine(#[from] fjall::Error),
    /// The writer thread is gone (the store was closed or a commit failed before).
    #[error("store: closed")]
    Closed,
    /// A key the store wrote does not have the store's layout.
    #[error("store: bad key in {keyspace}")]
    BadKey {
        /// Which keyspace held it.
        keyspace: &'static str,
    },
    /// A record the store wrote does not have the store's layout.
    #[error("store: unreadable record in {keyspace}")]
    BadRecord {
        /// Which keyspace held it.
        keyspace: &'static str,
    },
    /// The directory holds no store this version can open (another program's files, a
    /// damaged store): refused, never replaced.
    #[error("store: cannot open {path} (damaged, or not a Corvid store; move it aside to start empty): {source}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// What the engine said.
        source: fjall::Error,
    },
    /// The data directory could not be created.
    #[error("store: {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// When a commit is on disk before its callers hear of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Every commit is `fdatasync`ed before its tickets complete: nothing acknowledged is lost.
    /// A commit of [`Store::send_relaxed`] changes only is written to the OS and synced by the
    /// next commit that needs it (a power loss may undo it; a process crash does not).
    Always,
    /// Commits are written to the OS at once and synced at most this far apart: a power loss or
    /// kernel crash may lose the last interval's acknowledged messages (a process crash does
    /// not: the OS holds them).
    Every(Duration),
}

/// One change to durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A session's own record (identity, expiry, subscriptions), replacing the last one.
    PutSession {
        /// Client id.
        client_id: String,
        /// The broker's encoding of the session record.
        record: Vec<u8>,
    },
    /// A session and everything it holds (queue, in-flight, QoS 2 state) are gone.
    DeleteSession {
        /// Client id.
        client_id: String,
    },
    /// A message was queued (or sent and is awaiting its acknowledgement) for a session.
    Enqueue {
        /// Client id.
        client_id: String,
        /// The session's sequence number for it: messages come back in this order.
        seq: u64,
        /// The broker's encoding of the delivery.
        record: Vec<u8>,
    },
    /// A queued message is done with (acknowledged, expired or dropped by policy).
    Dequeue {
        /// Client id.
        client_id: String,
        /// Its sequence number.
        seq: u64,
    },
    /// A session's QoS 2 packet id whose PUBLISH was received and PUBREL not yet (so a resent
    /// PUBLISH is not delivered twice), or another small per-session marker.
    PutMark {
        /// Client id.
        client_id: String,
        /// The marker's key within the session (e.g. `q2/<packet id>`).
        key: Vec<u8>,
        /// Its value.
        record: Vec<u8>,
    },
    /// A marker is cleared.
    DeleteMark {
        /// Client id.
        client_id: String,
        /// The marker's key.
        key: Vec<u8>,
    },
    /// A retained message was set for a topic (replacing the last one).
    PutRetained {
        /// Topic.
        topic: String,
        /// The broker's encoding of the message.
        record: Vec<u8>,
    },
    /// A topic's retained message was cleared.
    DeleteRetained {
        /// Topic.
        topic: String,
    },
    /// A record of the cluster layer (messages held for a peer until it has them durably,
    /// what this node last took from each peer), replacing the last one under `key`.
    PutCluster {
        /// The cluster layer's key.
        key: Vec<u8>,
        /// Its value.
        record: Vec<u8>,
    },
    /// A cluster-layer record is gone.
    DeleteCluster {
        /// The cluster layer's key.
        key: Vec<u8>,
    },
}

/// Everything the store held when it was opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Session records, by client id.
    pub sessions: Vec<(String, Vec<u8>)>,
    /// Queued messages: client id, sequence number, record; in (client id, sequence) order.
    pub queued: Vec<(String, u64, Vec<u8>)>,
    /// Per-session markers: client id, marker key, record.
    pub marks: Vec<(String, Vec<u8>, Vec<u8>)>,
    /// Retained messages by topic.
    pub retained: Vec<(String, Vec<u8>)>,
    /// Cluster-layer records by key, in key order.
    pub cluster: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Counters the broker exports as metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commits written.
    pub commits: AtomicU64,
    /// Ops written.
    pub ops: AtomicU64,
    /// `fdatasync` calls (with `Sync::Always`, the commits that needed one).
    pub syncs: AtomicU64,
    /// Commits that failed (each failed every ticket in it).
    pub failures: AtomicU64,
    /// Total time spent in commits, microseconds (with `commits`, the mean latency).
    pub commit_micros: AtomicU64,
    /// The slowest commit since the last read of it, microseconds.
    pub max_commit_micros: AtomicU64,
}

/// Completes when the ops it was handed with are durable (per [`Sync`]), or the commit failed.
pub struct Ticket(tokio::sync::oneshot::Receiver<Result<(), String>>);

impl Ticket {
    /// Waits for the commit.
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "store commit failed");
                Err(StoreError::Closed)
            }
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Waits for the commit, blocking the thread (tests and shutdown).
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        match self.0.blocking_recv() {
            Ok(Ok(())) => Ok(()),
            _ => Err(StoreError::Closed),
        }
    }
}

/// One caller's ops and where to tell it they are durable.
struct Request {
    ops: Vec<Op>,
    /// Where to tell the caller; `None` for [`Store::send`], whose callers watch the mark.
    done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    /// Its place in submission order (see [`Store::submitted`]).
    mark: u64,
    /// The writer commits this request, syncs and stops.
    close: bool,
    /// Losing these ops to a power failure only repeats what they finished (see
    /// [`Store::send_relaxed`]): a commit of relaxed requests alone is not synced.
    relaxed: bool,
}

/// The sending half, behind one lock so marks enter the channel in order: the writer commits
/// requests in channel order, so "every mark up to N is durable" is a single number.
struct Sender {
    tx: std::sync::mpsc::Sender<Request>,
    next: u64,
}

/// The durable store: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Store {
    sender: Arc<std::sync::Mutex<Sender>>,
    /// The mark of the last request handed to the writer.
    submitted: Arc<AtomicU64>,
    /// The mark up to which every request is durable (per [`Sync`]).
    durable: tokio::sync::watch::Receiver<u64>,
    /// A commit failed: nothing submitted since is known to be durable, ever.
    failed: Arc<std::sync::atomic::AtomicBool>,
    db: Database,
    stats: Arc<Stats>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// The keyspaces, one per kind of record.
#[derive(Clone)]
struct Spaces {
    sessions: Keyspace,
    /// Queued deliveries one key each, as stores before segments wrote them (read, and
    /// deleted as they are done with; never written).
    queue: Keyspace,
    /// Queued deliveries packed per commit (see `queue.rs`).
    segments: Keyspace,
    /// Each segment's done entries.
    segment_dead: Keyspace,
    marks: Keyspace,
    retained: Keyspace,
    cluster: Keyspace,
}

/// Names a keyspace in a commit's folded ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Space {
    Sessions,
    Marks,
    Retained,
    Cluster,
}

impl Spaces {
    fn get(&self, space: Space) -> &Keyspace {
        match space {
            Space::Sessions => &self.sessions,
            Space::Marks => &self.marks,
            Space::Retained => &self.retained,
            Space::Cluster => &self.cluster,
        }
    }
}

/// Most ops one commit gathers; the rest wait for the next (bounds a batch's memory).
const MAX_BATCH_OPS: usize = 16 * 1024;

/// A commit of at least this many ops means load: the next one waits for its group to fill.
pub const GROUP_MIN_OPS: usize = 64;

impl Store {
    /// Opens (or creates) the store in `dir`, reads everything back, and starts the writer.
    /// Under load (a commit of [`GROUP_MIN_OPS`] ops or more), commits start at most `group`
    /// apart (zero: at once).
    pub fn open(dir: &Path, sync: Sync, group: Duration) -> Result<(Store, Recovered), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let refused = |source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        };
        // No compression in the journal: it runs inside the engine's journal lock on every
        // commit's critical path (with a zeroed buffer per segment), and measured in the QoS 1
        // durable benchmark it cost a fifth of the throughput; tables are still compressed
        // when the memtable is flushed (ADR 0002).
        let db = Database::builder(dir)
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(refused)?;
        let space = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(refused)
        };
        let spaces = Spaces {
            sessions: space("sessions")?,
            queue: space("queue")?,
            segments: space("segments")?,
            segment_dead: space("segment_dead")?,
            marks: space("marks")?,
            retained: space("retained")?,
            cluster: space("cluster")?,
        };
        let (queues, recovered) = recover(&spaces)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(Stats::default());
        let (durable_tx, durable) = tokio::sync::watch::channel(0);
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = Writer {
            db: db.clone(),
            spaces,
            queues,
            sync,
            group,
            stats: stats.clone(),
            durable: durable_tx,
            failed: failed.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("corvid-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        let writer = Arc::new(std::sync::Mutex::new(Some(handle)));
        Ok((
            Store {
                sender: Arc::new(std::sync::Mutex::new(Sender { tx, next: 0 })),
                submitted: Arc::new(AtomicU64::new(0)),
                durable,
                failed,
                db,
                stats,
                writer,
            },
            recovered,
        ))
    }

    /// Hands `ops` to the writer; the ticket completes when they are durable. Ops from one call
    /// are committed atomically, in order, and after every earlier call's.
    pub fn submit(&self, ops: Vec<Op>) -> Ticket {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.enqueue(ops, Some(done), false, false);
        Ticket(rx)
    }

    /// Hands `ops` to the writer without a ticket and returns their mark: they are durable
    /// once [`Store::durable`] reaches it. Cheaper than [`Store::submit`] for the many small
    /// changes of a publish path, whose acknowledgement waits on the mark (see
    /// [`Store::wait_durable`]).
    pub fn send(&self, ops: Vec<Op>) -> u64 {
        self.enqueue(ops, None, false, false)
    }

    /// Like [`Store::send`], for changes whose loss on a power failure only repeats something
    /// (a QoS 1 delivery the subscriber acknowledged comes again: at least once allows it). With
    /// [`Sync::Always`] a commit holding only such changes is written without `fdatasync`; the
    /// next commit that needs one syncs them too. Halves the syncs of a lightly loaded broker,
    /// whose every acknowledgement would otherwise be a commit and a sync of its own.
    pub fn send_relaxed(&self, ops: Vec<Op>) -> u64 {
        self.enqueue(ops, None, false, true)
    }

    fn enqueue(
        &self,
        ops: Vec<Op>,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
        close: bool,
        relaxed: bool,
    ) -> u64 {
        let mut s = match self.sender.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        s.next += 1;
        let mark = s.next;
        let sent = s.tx.send(Request {
            ops,
            done,
            mark,
            close,
            relaxed,
        });
        self.submitted.store(mark, Ordering::Release);
        drop(s);
        if let Err(e) = sent {
            self.failed.store(true, Ordering::Release);
            if let Some(done) = e.0.done {
                let _ = done.send(Err("store closed".into()));
            }
        }
        mark
    }

    /// The mark of the last request handed to the writer: whatever a caller sent before
    /// reading it is durable once [`Store::durable`] reaches it.
    pub fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Acquire)
    }

    /// The mark up to which every request is durable.
    pub fn durable(&self) -> u64 {
        *self.durable.borrow()
    }

    /// Whether a commit failed (I/O error, disk full) or the store was closed: marks past the
    /// failure never become durable, and acknowledgements waiting on them must not be sent.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Waits until `mark` is durable; `Err` when the store failed first.
    pub async fn wait_durable(&self, mark: u64) -> Result<(), StoreError> {
        let mut rx = self.durable.clone();
        let failed = self.failed.clone();
        let reached = match rx
            .wait_for(|d| *d >= mark || failed.load(Ordering::Acquire))
            .await
        {
            Ok(d) => *d >= mark,
            Err(_) => false,
        };
        if reached {
            Ok(())
        } else {
            Err(StoreError::Closed)
        }
    }

    /// Commits what was submitted, syncs, and stops the writer: later submits fail. Returns
    /// once the writer has let go of the files, so the store can be opened again.
    pub fn close(self) {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.enqueue(Vec::new(), Some(done), true, false);
        let _ = rx.blocking_recv();
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bytes the store uses on disk (journal and tables).
    pub fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }
}

/// The single writer: gathers requests into group commits.
struct Writer {
    db: Database,
    spaces: Spaces,
    /// Where every live queued delivery is.
    queues: Queues,
    /// Under load, commits start at most this far apart.
    group: Duration,
    sync: Sync,
    stats: Arc<Stats>,
    /// Advanced to the last mark of every committed batch.
    durable: tokio::sync::watch::Sender<u64>,
    /// Set by the first failed commit (fjall refuses writes after a journal I/O error).
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Request>) {
        let mut last_sync = Instant::now();
        let mut dirty = false;
        let mut last_start = Instant::now();
        let mut last_ops = 0;
        loop {
            // Block for the first request (or, with interval syncing and unsynced commits, at
            // most until the next sync is due).
            let first = match (self.sync, dirty) {
                (Sync::Every(every), true) => {
                    let left = every.saturating_sub(last_sync.elapsed());
                    match rx.recv_timeout(left) {
                        Ok(r) => Some(r),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
            };
            let mut batch = Vec::new();
            let mut n = 0;
            let mut closing = false;
            if first.is_some() && last_ops >= GROUP_MIN_OPS && !self.group.is_zero() {
                // Under load (the last commit was a large group), let the next group fill
                // until `group` after the last one started: fewer, larger commits and syncs
                // for the same work, at most that much later. A lightly loaded store (small
                // commits) commits at once.
                let due = last_start + self.group;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            if let Some(r) = first {
                closing = r.close;
                n += r.ops.len();
                batch.push(r);
                while n < MAX_BATCH_OPS && !closing {
                    match rx.try_recv() {
                        Ok(r) => {
                            closing = r.close;
                            n += r.ops.len();
                            batch.push(r);
                        }
                        Err(_) => break,
                    }
                }
            }
            let sync_now = closing
                || match self.sync {
                    Sync::Always => batch.iter().any(|r| !r.relaxed),
                    Sync::Every(every) => {
                        (dirty || !batch.is_empty()) && last_sync.elapsed() >= every
                    }
                };
            let started = Instant::now();
            let result = self.commit(&batch, sync_now);
            last_start = started;
            last_ops = n;
            if sync_now && result.is_ok() {
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            }
            let micros = started.elapsed().as_micros() as u64;
            match &result {
                Ok(()) => {
                    if !batch.is_empty() {
                        self.stats.commits.fetch_add(1, Ordering::Relaxed);
                        self.stats.ops.fetch_add(n as u64, Ordering::Relaxed);
                        self.stats
                            .commit_micros
                            .fetch_add(micros, Ordering::Relaxed);
                        self.stats
                            .max_commit_micros
                            .fetch_max(micros, Ordering::Relaxed);
                    }
                    if sync_now {
                        last_sync = Instant::now();
                        dirty = false;
                    } else if !batch.is_empty() {
                        dirty = true;
                    }
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, ops = n, "store commit failed");
                }
            }
            let last_mark = batch.last().map(|r| r.mark);
            match (&result, last_mark) {
                (Ok(()), Some(mark)) => {
                    self.durable.send_if_modified(|d| {
                        let moved = mark > *d;
                        *d = (*d).max(mark);
                        moved
                    });
                }
                (Err(_), _) => {
                    self.failed.store(true, Ordering::Release);
                    // Wake every waiter: they see the failure.
                    self.durable.send_modify(|_| {});
                }
                _ => {}
            }
            let outcome = result.map_err(|e| e.to_string());
            for r in batch {
                if let Some(done) = r.done {
                    let _ = done.send(outcome.clone());
                }
            }
            if closing {
                break;
            }
        }
        // Everyone is gone: leave the journal synced; later sends can never be durable.
        let _ = self.db.persist(PersistMode::SyncAll);
        self.failed.store(true, Ordering::Release);
        self.durable.send_modify(|_| {});
    }

    fn commit(&mut self, batch: &[Request], sync: bool) -> Result<(), StoreError> {
        if batch.is_empty() {
            if sync {
                self.db.persist(PersistMode::SyncData)?;
            }
            return Ok(());
        }
        // Every item of an engine batch gets the same sequence number, so a key written twice
        // in one batch would be ambiguous: fold the ops into each key's last state first.
        let mut last: BTreeMap<(Space, Vec<u8>), Option<&[u8]>> = BTreeMap::new();
        // Queued deliveries go into this commit's segment; one queued and done with within
        // the commit never reaches the disk at all.
        let mut pending = Pending::default();
        let mut writes: Vec<QueueWrite> = Vec::new();
        let queues = &mut self.queues;
        for op in batch.iter().flat_map(|r| &r.ops) {
            match op {
                Op::PutSession { client_id, record } => {
                    last.insert(
                        (Space::Sessions, client_id.as_bytes().to_vec()),
                        Some(record),
                    );
                }
                Op::DeleteSession { client_id } => {
                    last.insert((Space::Sessions, client_id.as_bytes().to_vec()), None);
                    queues.delete_session(&mut pending, client_id, &mut writes);
                    let prefix = session_prefix(client_id);
                    for kv in self.spaces.marks.prefix(&prefix) {
                        last.insert((Space::Marks, kv.key()?.to_vec()), None);
                    }
                    let pending_marks: Vec<Vec<u8>> = last
                        .range((Space::Marks, prefix.clone())..)
                        .take_while(|((sp, k), _)| *sp == Space::Marks && k.starts_with(&prefix))
                        .map(|((_, k), _)| k.clone())
                        .collect();
                    for k in pending_marks {
                        last.insert((Space::Marks, k), None);
                    }
                }
                Op::Enqueue {
                    client_id,
                    seq,
                    record,
                } => queues.enqueue(&mut pending, client_id, *seq, record, &mut writes),
                Op::Dequeue { client_id, seq } => {
                    queues.dequeue(&mut pending, client_id, *seq, &mut writes);
                }
                Op::PutMark {
                    client_id,
                    key,
                    record,
                } => {
                    last.insert((Space::Marks, mark_key(client_id, key)), Some(record));
                }
                Op::DeleteMark { client_id, key } => {
                    last.insert((Space::Marks, mark_key(client_id, key)), None);
                }
                Op::PutRetained { topic, record } => {
                    last.insert((Space::Retained, topic.as_bytes().to_vec()), Some(record));
                }
                Op::DeleteRetained { topic } => {
                    last.insert((Space::Retained, topic.as_bytes().to_vec()), None);
                }
                Op::PutCluster { key, record } => {
                    last.insert((Space::Cluster, key.clone()), Some(record));
                }
                Op::DeleteCluster { key } => {
                    last.insert((Space::Cluster, key.clone()), None);
                }
            }
        }
        queues.finish(pending, &self.spaces.segments, &mut writes)?;
        let mode = if sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        if last.is_empty() && writes.is_empty() {
            // Everything cancelled out; a sync still covers earlier unsynced commits.
            if sync {
                self.db.persist(mode)?;
            }
            return Ok(());
        }
        let mut b = self.db.batch().durability(Some(mode));
        for ((space, key), value) in last {
            let ks = self.spaces.get(space);
            match value {
                Some(v) => b.insert(ks, key, v),
                None => b.remove(ks, key),
            }
        }
        // Segment numbers are never reused, and a legacy key is never written again: a
        // segment, a dead-set and a legacy key each appear at most once per commit.
        for w in writes {
            match w {
                QueueWrite::PutSegment(k, v) => b.insert(&self.spaces.segments, k, v),
                QueueWrite::PutDead(k, v) => b.insert(&self.spaces.segment_dead, k, v),
                QueueWrite::DeleteSegment(k) => {
                    b.remove(&self.spaces.segments, k.clone());
                    b.remove(&self.spaces.segment_dead, k);
                }
                QueueWrite::DeleteLegacy(k) => b.remove(&self.spaces.queue, k),
            }
        }
        b.commit()?;
        Ok(())
    }
}

/// Keys of one session's records start with its client id's length and bytes, so a prefix
/// scan finds exactly that session's (a client id may contain any byte but U+0000).
fn session_prefix(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + client_id.len() + 8);
    // Client ids are at most 65,535 bytes (an MQTT string).
    k.extend_from_slice(&(client_id.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    k.extend_from_slice(client_id.as_bytes());
    k
}

fn queue_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn mark_key(client_id: &str, key: &[u8]) -> Vec<u8> {
    let mut k = session_prefix(client_id);
    k.extend_from_slice(key);
    k
}

/// Splits a session-prefixed key into client id and the rest.
fn split_key<'a>(key: &'a [u8], keyspace: &'static str) -> Result<(String, &'a [u8]), StoreError> {
    let bad = || StoreError::BadKey { keyspace };
    let len = usize::from(u16::from_be_bytes([
        *key.first().ok_or_else(bad)?,
        *key.get(1).ok_or_else(bad)?,
    ]));
    let id = key.get(2..2 + len).ok_or_else(bad)?;
    let id = std::str::from_utf8(id).map_err(|_| bad())?.to_owned();
    Ok((id, &key[2 + len..]))
}

fn recover(s: &Spaces) -> Result<(Queues, Recovered), StoreError> {
    let mut r = Recovered::default();
    for kv in s.sessions.iter() {
        let (k, v) = kv.into_inner()?;
        let id = std::str::from_utf8(&k)
            .map_err(|_| StoreError::BadKey {
                keyspace: "sessions",
            })?
            .to_owned();
        r.sessions.push((id, v.to_vec()));
    }
    let (queues, queued) = Queues::recover(&s.segments, &s.segment_dead, &s.queue)?;
    r.queued = queued;
    for kv in s.marks.iter() {
        let (k, v) = kv.into_inner()?;
        let (id, rest) = split_key(&k, "marks")?;
        r.marks.push((id, rest.to_vec(), v.to_vec()));
    }
    for kv in s.retained.iter() {
        let (k, v) = kv.into_inner()?;
        let topic = std::str::from_utf8(&k)
            .map_err(|_| StoreError::BadKey {
                keyspace: "retained",
            })?
            .to_owned();
        r.retained.push((topic, v.to_vec()));
    }
    for kv in s.cluster.iter() {
        let (k, v) = kv.into_inner()?;
        r.cluster.push((k.to_vec(), v.to_vec()));
    }
    Ok((queues, r))
}

#[cfg(test)]
mod tests;
