//! Queued deliveries packed into segments: what one commit queues is one engine record (a
//! segment), not one record per delivery, and a delivery done with sets a bit in its
//! segment's dead-set instead of writing a tombstone; a segment with nothing live left is
//! deleted. The engine then does a few writes per commit instead of about two per message —
//! its memtable inserts, their key comparisons and the compactions of the tombstones were most
//! of the durable path's cost (`docs/adr/0002-durable-session-store.md`).
//!
//! The writer keeps an index of the live deliveries (client id, sequence number → where on
//! disk), rebuilt from the segments and their dead-sets when the store is opened. Stores
//! written before segments keep their deliveries under one key each (the `queue` keyspace);
//! those are read, indexed and deleted one by one as they are done with.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fjall::Keyspace;

use crate::StoreError;

/// A segment is cut at this size; a commit's deliveries beyond it go into the next one.
const SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// A segment with at most one live delivery in this many is rewritten: what it holds on disk
/// stays within this factor of what is live.
const SPARSE: u32 = 4;

/// A sparse segment is moved once this many segments were written after it.
pub(crate) const SPARSE_AGE: u64 = 64;

/// The format byte a segment starts with.
const SEGMENT_FORMAT: u8 = 1;

/// Where a live queued delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    /// Entry `.0` of the commit being built: not written yet.
    Pending(usize),
    /// Entry `idx` of segment `n`.
    Segment { n: u64, idx: u32 },
    /// Under its own key in the `queue` keyspace (a store written before segments).
    Legacy,
}

/// A written segment's bookkeeping.
#[derive(Debug)]
struct Seg {
    /// Entries it holds.
    total: u32,
    /// Entries not done with yet.
    live: u32,
    /// Entries done with, one bit each (what the segment's dead-set record holds).
    dead: Vec<u64>,
}

impl Seg {
    /// Marks entry `idx` done; whether it was live.
    fn kill(&mut self, idx: u32) -> bool {
        let (word, bit) = ((idx / 64) as usize, idx % 64);
        if self.dead.len() <= word {
            self.dead.resize(word + 1, 0);
        }
        let was_live = self.dead[word] & (1 << bit) == 0;
        if was_live {
            self.dead[word] |= 1 << bit;
            self.live = self.live.saturating_sub(1);
        }
        was_live
    }

    fn is_dead(&self, idx: u32) -> bool {
        let (word, bit) = ((idx / 64) as usize, idx % 64);
        self.dead.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn dead_record(&self) -> Vec<u8> {
        self.dead.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// A live queued delivery as recovered: client id, sequence number, record.
pub(crate) type Queued = (String, u64, Vec<u8>);

/// One engine change the queues need in a commit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QueueWrite {
    /// A new segment: key, value.
    PutSegment(Vec<u8>, Vec<u8>),
    /// A segment's dead-set changed: key, value.
    PutDead(Vec<u8>, Vec<u8>),
    /// A segment with nothing live: its record and its dead-set go.
    DeleteSegment(Vec<u8>),
    /// A delivery of a store written before segments is done with: its key goes.
    DeleteLegacy(Vec<u8>),
}

/// The deliveries of the commit being built, borrowed from its requests.
#[derive(Debug, Default)]
pub(crate) struct Pending<'a> {
    /// Client id, sequence number, record; `None` once done with before it was written.
    entries: Vec<Option<(&'a str, u64, &'a [u8])>>,
}

/// The index of live queued deliveries, owned by the writer.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    sessions: HashMap<String, BTreeMap<u64, Loc>>,
    segments: HashMap<u64, Seg>,
    /// The next segment's number.
    next: u64,
    /// Segments whose dead-set changed in the commit being built.
    touched: Vec<u64>,
    /// Segments found with nothing live when opened: the first commit deletes them.
    doomed: Vec<u64>,
    /// Segments that became sparse, to be moved once old enough.
    sparse: BTreeSet<u64>,
}

/// A segment's key: its number, big-endian, so segments iterate in the order they were written.
fn segment_key(n: u64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

impl Queues {
    /// A delivery was queued for `client` under `seq` (replacing one under the same number).
    pub(crate) fn enqueue<'a>(
        &mut self,
        p: &mut Pending<'a>,
        client: &'a str,
        seq: u64,
        record: &'a [u8],
        out: &mut Vec<QueueWrite>,
    ) {
        let idx = p.entries.len();
        p.entries.push(Some((client, seq, record)));
        if !self.sessions.contains_key(client) {
            self.sessions.insert(client.to_owned(), BTreeMap::new());
        }
        let replaced = self
            .sessions
            .get_mut(client)
            .and_then(|q| q.insert(seq, Loc::Pending(idx)));
        if let Some(old) = replaced {
            self.drop_loc(p, client, seq, old, out);
        }
    }

    /// A delivery is done with (acknowledged, expired, dropped): unknown ones are ignored.
    pub(crate) fn dequeue(
        &mut self,
        p: &mut Pending<'_>,
        client: &str,
        seq: u64,
        out: &mut Vec<QueueWrite>,
    ) {
        let gone = self.sessions.get_mut(client).and_then(|q| q.remove(&seq));
        if let Some(loc) = gone {
            self.drop_loc(p, client, seq, loc, out);
        }
    }

    /// A session is gone with every delivery queued for it.
    pub(crate) fn delete_session(
        &mut self,
        p: &mut Pending<'_>,
        client: &str,
        out: &mut Vec<QueueWrite>,
    ) {
        if let Some(q) = self.sessions.remove(client) {
            for (seq, loc) in q {
                self.drop_loc(p, client, seq, loc, out);
            }
        }
    }

    fn drop_loc(
        &mut self,
        p: &mut Pending<'_>,
        client: &str,
        seq: u64,
        loc: Loc,
        out: &mut Vec<QueueWrite>,
    ) {
        match loc {
            Loc::Pending(i) => {
                if let Some(e) = p.entries.get_mut(i) {
                    *e = None;
                }
            }
            Loc::Segment { n, idx } => {
                if let Some(s) = self.segments.get_mut(&n) {
                    if s.kill(idx) {
                        self.touched.push(n);
                    }
                }
            }
            Loc::Legacy => out.push(QueueWrite::DeleteLegacy(crate::queue_key(client, seq))),
        }
    }

    /// Ends the commit: moves what is still live out of segments that are mostly done with
    /// (so a few long-queued deliveries cannot keep whole segments of acknowledged ones on
    /// disk), packs the commit's surviving deliveries and the moved ones into new segments,
    /// writes the dead-sets that changed and deletes the segments with nothing live left.
    pub(crate) fn finish(
        &mut self,
        p: Pending<'_>,
        segments: &Keyspace,
        out: &mut Vec<QueueWrite>,
    ) -> Result<(), StoreError> {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &n in &touched {
            let sparse = self
                .segments
                .get(&n)
                .is_some_and(|s| s.live > 0 && s.total >= 2 && s.live * SPARSE <= s.total);
            if sparse {
                self.sparse.insert(n);
            }
        }
        // Live deliveries of sparse segments: client id, sequence number, record. A segment
        // is moved once it is `SPARSE_AGE` segments old: young ones are usually about to be
        // done with entirely (acknowledgements trail the commit by a few), and moving them
        // would copy for nothing.
        let mut moved: Vec<Queued> = Vec::new();
        while let Some(n) = self.sparse.first().copied() {
            if n.saturating_add(SPARSE_AGE) > self.next {
                break;
            }
            self.sparse.remove(&n);
            let sparse = self
                .segments
                .get(&n)
                .is_some_and(|s| s.live > 0 && s.live * SPARSE <= s.total);
            if !sparse {
                continue;
            }
            let Some(value) = segments.get(segment_key(n))? else {
                continue;
            };
            let Some(seg) = self.segments.remove(&n) else {
                continue;
            };
            for (idx, entry) in (0u32..).zip(Entries::new(&value)?) {
                let (client, seq, record) = entry?;
                let here = self.sessions.get(client).and_then(|q| q.get(&seq)).copied()
                    == Some(Loc::Segment { n, idx });
                if here && !seg.is_dead(idx) {
                    moved.push((client.to_owned(), seq, record.to_vec()));
                }
            }
            out.push(QueueWrite::DeleteSegment(segment_key(n)));
        }
        let entries = p
            .entries
            .into_iter()
            .flatten()
            .chain(moved.iter().map(|(c, s, r)| (c.as_str(), *s, r.as_slice())));
        // One allocation for the segment (the engine copies it once more).
        let size: usize = entries
            .clone()
            .map(|(c, _, r)| 14 + c.len() + r.len())
            .sum();
        let mut buf: Vec<u8> = Vec::with_capacity(1 + size.min(SEGMENT_BYTES + 64 * 1024));
        let mut count: u32 = 0;
        for (client, seq, record) in entries {
            if count > 0 && buf.len() + record.len() > SEGMENT_BYTES {
                self.seal(&mut buf, &mut count, out);
            }
            if buf.is_empty() {
                buf.push(SEGMENT_FORMAT);
            }
            // Client ids are at most 65,535 bytes (an MQTT string); records at most the
            // largest packet, far below 4 GiB.
            let id = &client.as_bytes()[..client.len().min(usize::from(u16::MAX))];
            buf.extend_from_slice(&(id.len() as u16).to_be_bytes());
            buf.extend_from_slice(id);
            buf.extend_from_slice(&seq.to_be_bytes());
            buf.extend_from_slice(&(record.len() as u32).to_be_bytes());
            buf.extend_from_slice(record);
            let n = self.next;
            if let Some(loc) = self.sessions.get_mut(client).and_then(|q| q.get_mut(&seq)) {
                *loc = Loc::Segment { n, idx: count };
            }
            count += 1;
        }
        if count > 0 {
            self.seal(&mut buf, &mut count, out);
        }
        for n in std::mem::take(&mut self.doomed) {
            out.push(QueueWrite::DeleteSegment(segment_key(n)));
        }
        for n in touched {
            match self.segments.get(&n) {
                Some(s) if s.live == 0 => {
                    self.segments.remove(&n);
                    out.push(QueueWrite::DeleteSegment(segment_key(n)));
                }
                Some(s) => out.push(QueueWrite::PutDead(segment_key(n), s.dead_record())),
                None => {}
            }
        }
        Ok(())
    }

    /// Writes the segment in `buf` under the next number.
    fn seal(&mut self, buf: &mut Vec<u8>, count: &mut u32, out: &mut Vec<QueueWrite>) {
        let n = self.next;
        self.next += 1;
        self.segments.insert(
            n,
            Seg {
                total: *count,
                live: *count,
                dead: Vec::new(),
            },
        );
        out.push(QueueWrite::PutSegment(segment_key(n), std::mem::take(buf)));
        *count = 0;
    }

    /// Rebuilds the index from the segments, their dead-sets and the deliveries of a store
    /// written before segments; returns it with the live deliveries (client id, sequence
    /// number, record) in (client id, sequence number) order.
    pub(crate) fn recover(
        segments: &Keyspace,
        dead: &Keyspace,
        legacy: &Keyspace,
    ) -> Result<(Queues, Vec<Queued>), StoreError> {
        let bad = |keyspace| StoreError::BadKey { keyspace };
        let mut q = Queues::default();
        let mut dead_sets: HashMap<u64, Vec<u64>> = HashMap::new();
        for kv in dead.iter() {
            let (k, v) = kv.into_inner()?;
            let n = u64::from_be_bytes((&*k).try_into().map_err(|_| bad("segment_dead"))?);
            let words = v
                .chunks(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect();
            dead_sets.insert(n, words);
        }
        let mut live = Vec::new();
        for kv in segments.iter() {
            let (k, v) = kv.into_inner()?;
            let n = u64::from_be_bytes((&*k).try_into().map_err(|_| bad("segments"))?);
            q.next = q.next.max(n + 1);
            let mut seg = Seg {
                total: 0,
                live: 0,
                dead: dead_sets.remove(&n).unwrap_or_default(),
            };
            for (idx, entry) in (0u32..).zip(Entries::new(&v)?) {
                let (client, seq, record) = entry?;
                seg.total = idx + 1;
                if !seg.is_dead(idx) {
                    seg.live += 1;
                    let loc = Loc::Segment { n, idx };
                    let replaced = q
                        .sessions
                        .entry(client.to_owned())
                        .or_default()
                        .insert(seq, loc);
                    if let Some(Loc::Segment { n: m, idx: i }) = replaced {
                        // The same number queued twice: the later one stands (the list keeps
                        // only the later one once sorted, below).
                        if let Some(s) = q.segments.get_mut(&m) {
                            s.kill(i);
                        }
                    }
                    live.push((client.to_owned(), seq, record.to_vec()));
                }
            }
            q.segments.insert(n, seg);
        }
        q.doomed.extend(dead_sets.into_keys());
        q.doomed.extend(
            q.segments
                .iter()
                .filter(|(_, s)| s.live == 0)
                .map(|(n, _)| *n),
        );
        q.segments.retain(|_, s| s.live > 0);
        q.sparse.extend(
            q.segments
                .iter()
                .filter(|(_, s)| s.live * SPARSE <= s.total)
                .map(|(n, _)| *n),
        );
        for kv in legacy.iter() {
            let (k, v) = kv.into_inner()?;
            let (client, rest) = crate::split_key(&k, "queue")?;
            let seq = u64::from_be_bytes(rest.try_into().map_err(|_| bad("queue"))?);
            q.sessions
                .entry(client.clone())
                .or_default()
                .insert(seq, Loc::Legacy);
            live.push((client, seq, v.to_vec()));
        }
        // A stable sort keeps a number queued twice in the order read; keep the later one.
        live.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        live.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0 && later.1 == earlier.1;
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        Ok((q, live))
    }
}

/// The entries of a segment record, checked as they are read.
struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Entries<'a> {
    fn new(v: &'a [u8]) -> Result<Self, StoreError> {
        match v.split_first() {
            Some((&SEGMENT_FORMAT, rest)) => Ok(Entries { rest }),
            _ => Err(StoreError::BadRecord {
                keyspace: "segments",
            }),
        }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    fn entry(&mut self) -> Option<(&'a str, u64, &'a [u8])> {
        let len = usize::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?));
        let client = std::str::from_utf8(self.take(len)?).ok()?;
        let seq = u64::from_be_bytes(self.take(8)?.try_into().ok()?);
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        Some((client, seq, self.take(len)?))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(&'a str, u64, &'a [u8]), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.entry().ok_or(StoreError::BadRecord {
            keyspace: "segments",
        }))
    }
}
