//! Store-and-forward between nodes, so a QoS 1/2 message acknowledged to its publisher reaches
//! the subscribers on other nodes even when a link breaks or a node is killed.
//!
//! The sending side ([`Outbox`]) holds every QoS 1/2 message it forwards to a peer — on its own
//! store too, when it has one, in the same commit the publisher's PUBACK waits for — until the
//! peer acknowledges it ([`super::proto::Frame::ForwardAck`]). Each message gets a key that
//! only grows in the order it is sent to that peer; a new link (after a break, or a peer that
//! restarted) first resends everything still held, so nothing queued in a dead link's buffers
//! is lost. A failed push onto a full link queue stops direct sends until everything held
//! fits again, so the peer never sees a gap it would skip over.
//!
//! The receiving side ([`Inbound`]) applies a key only once (above the last one it applied for
//! that peer, which it stores with the sessions it wrote), and acknowledges it once the store
//! holds what it wrote — immediately without a store.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::proto::{Frame, FwdKey, WireMsg};
use crate::message::Message;
use crate::persist::Durable;

/// Key prefix of a held message's record: `out/` + peer (length-prefixed) + key.
const OUT: &[u8] = b"out/";
/// Key prefix of the last key applied from a peer: `in/` + peer.
const IN: &[u8] = b"in/";

/// A frame queued for a link, with when it was queued.
pub type Queued = (std::time::Instant, Frame);

/// One message held for a peer.
#[derive(Debug)]
struct Entry {
    key: FwdKey,
    msg: WireMsg,
    plain: bool,
    groups: Vec<String>,
    /// Whether a record of it is on the store (to delete when it goes).
    stored: bool,
}

impl Entry {
    fn frame(&self) -> Frame {
        Frame::Forward {
            key: self.key,
            msg: self.msg.clone(),
            plain: self.plain,
            groups: self.groups.clone(),
        }
    }
}

/// What one peer has not acknowledged yet.
#[derive(Debug, Default)]
struct Held {
    entries: VecDeque<Entry>,
    /// A push onto the link failed: direct sends stop until everything held is pushed again.
    resync: bool,
}

/// Messages held for peers until they acknowledge them.
#[derive(Debug)]
pub struct Outbox {
    /// This node's start, the first half of every key it makes.
    epoch: u64,
    /// Messages held per peer at most.
    max: usize,
    /// The counter of the last key, one for all peers: a peer forgotten (it left) and seen
    /// again must get keys above those it already applied, which it remembers on its store.
    last: std::sync::atomic::AtomicU64,
    peers: Mutex<HashMap<String, Held>>,
}

/// What a call changed in the number of held messages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Messages now held that were not.
    pub added: u64,
    /// Messages let go because the peer has them.
    pub acked: u64,
    /// Messages dropped without the peer having them (bound, peer gone).
    pub dropped: u64,
}

fn out_key(peer: &str, key: FwdKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(OUT.len() + 2 + peer.len() + 16);
    k.extend_from_slice(OUT);
    k.extend_from_slice(&(peer.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    k.extend_from_slice(peer.as_bytes());
    k.extend_from_slice(&key.0.to_be_bytes());
    k.extend_from_slice(&key.1.to_be_bytes());
    k
}

fn in_key(peer: &str) -> Vec<u8> {
    let mut k = IN.to_vec();
    k.extend_from_slice(peer.as_bytes());
    k
}

/// Splits a held message's store key into the peer and the key.
fn parse_out_key(k: &[u8]) -> Option<(String, FwdKey)> {
    let rest = k.strip_prefix(OUT)?;
    let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let peer = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_string();
    let tail: &[u8; 16] = rest.get(2 + len..)?.try_into().ok()?;
    let epoch = u64::from_be_bytes(tail[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(tail[8..].try_into().ok()?);
    Some((peer, (epoch, seq)))
}

impl Outbox {
    /// An empty outbox for a node started at `epoch` (Unix ms).
    pub fn new(epoch: u64, max: usize) -> Outbox {
        Outbox {
            epoch,
            max: max.max(1),
            last: std::sync::atomic::AtomicU64::new(0),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Holds `msg` for `peer` (on `db` too) and pushes it onto the peer's link queue `tx` when
    /// there is one and nothing held is waiting for a resend.
    pub fn hold(
        &self,
        peer: &str,
        msg: &Message,
        plain: bool,
        groups: Vec<String>,
        db: Option<&Durable>,
        tx: Option<&mpsc::Sender<Queued>>,
    ) -> Moved {
        let mut moved = Moved {
            added: 1,
            ..Moved::default()
        };
        let mut peers = self.peers.lock();
        let held = peers.entry(peer.to_string()).or_default();
        let key = (
            self.epoch,
            self.last.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
        );
        let stored = match db.and_then(|_| crate::persist::encode_forward(msg, plain, &groups)) {
            Some(record) => {
                if let Some(db) = db {
                    db.put_cluster(out_key(peer, key), record);
                }
                true
            }
            None => false,
        };
        held.entries.push_back(Entry {
            key,
            msg: WireMsg::from_msg(msg),
            plain,
            groups,
            stored,
        });
        let mut gone = Vec::new();
        while held.entries.len() > self.max {
            if let Some(e) = held.entries.pop_front() {
                moved.dropped += 1;
                if e.stored {
                    gone.push(out_key(peer, e.key));
                }
            }
        }
        if let (Some(db), false) = (db, gone.is_empty()) {
            db.delete_cluster(gone);
        }
        if let Some(tx) = tx {
            if held.resync {
                Self::push_all(held, tx);
            } else if let Some(e) = held.entries.back() {
                if tx.try_send((std::time::Instant::now(), e.frame())).is_err() {
                    held.resync = true;
                }
            }
        }
        moved
    }

    /// Pushes everything held for `peer` onto its link queue when a push failed earlier and
    /// the queue now has room for all of it.
    pub fn pump(&self, peer: &str, tx: &mpsc::Sender<Queued>) {
        if let Some(held) = self.peers.lock().get_mut(peer) {
            if held.resync {
                Self::push_all(held, tx);
            }
        }
    }

    fn push_all(held: &mut Held, tx: &mpsc::Sender<Queued>) {
        if tx.capacity() < held.entries.len() {
            return;
        }
        let now = std::time::Instant::now();
        for e in &held.entries {
            if tx.try_send((now, e.frame())).is_err() {
                return;
            }
        }
        held.resync = false;
    }

    /// Peers waiting for a resend ([`Outbox::pump`]).
    pub fn resyncing(&self) -> Vec<String> {
        self.peers
            .lock()
            .iter()
            .filter(|(_, h)| h.resync)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// What a new link to `peer` sends first: everything held for it, oldest first.
    pub fn resend(&self, peer: &str) -> Vec<Frame> {
        let mut peers = self.peers.lock();
        let Some(held) = peers.get_mut(peer) else {
            return Vec::new();
        };
        held.resync = false;
        held.entries.iter().map(Entry::frame).collect()
    }

    /// `peer` has everything up to `key`: lets it go.
    pub fn ack(&self, peer: &str, key: FwdKey, db: Option<&Durable>) -> Moved {
        let mut moved = Moved::default();
        let mut gone = Vec::new();
        if let Some(held) = self.peers.lock().get_mut(peer) {
            while held.entries.front().is_some_and(|e| e.key <= key) {
                if let Some(e) = held.entries.pop_front() {
                    moved.acked += 1;
                    if e.stored {
                        gone.push(out_key(peer, e.key));
                    }
                }
            }
        }
        if let Some(db) = db {
            db.delete_cluster(gone);
        }
        moved
    }

    /// `peer` is gone for good: drops what was held for it.
    pub fn drop_peer(&self, peer: &str, db: Option<&Durable>) -> Moved {
        let Some(held) = self.peers.lock().remove(peer) else {
            return Moved::default();
        };
        let gone: Vec<Vec<u8>> = held
            .entries
            .iter()
            .filter(|e| e.stored)
            .map(|e| out_key(peer, e.key))
            .collect();
        if let Some(db) = db {
            db.delete_cluster(gone);
        }
        Moved {
            dropped: held.entries.len() as u64,
            ..Moved::default()
        }
    }

    /// Messages held for `peer`.
    pub fn len(&self, peer: &str) -> usize {
        self.peers.lock().get(peer).map_or(0, |h| h.entries.len())
    }

    /// Peers something is held for.
    pub fn peers(&self) -> Vec<String> {
        self.peers
            .lock()
            .iter()
            .filter(|(_, h)| !h.entries.is_empty())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Takes back what the store held for peers before a restart (their old keys, which are
    /// below every key this start makes); unreadable records are dropped and counted.
    pub fn restore(&self, records: &[(Vec<u8>, Vec<u8>)], db: Option<&Durable>) -> Moved {
        let mut moved = Moved::default();
        let mut bad = Vec::new();
        let mut peers = self.peers.lock();
        for (k, v) in records {
            if !k.starts_with(OUT) {
                continue;
            }
            let parsed = parse_out_key(k).zip(crate::persist::decode_forward(v));
            let Some(((peer, key), (msg, plain, groups))) = parsed else {
                tracing::warn!(
                    key = ?String::from_utf8_lossy(k),
                    "unreadable held-message record dropped"
                );
                moved.dropped += 1;
                bad.push(k.clone());
                continue;
            };
            moved.added += 1;
            peers.entry(peer).or_default().entries.push_back(Entry {
                key,
                msg,
                plain,
                groups,
                stored: true,
            });
        }
        drop(peers);
        if let Some(db) = db {
            db.delete_cluster(bad);
        }
        moved
    }
}

/// What one peer's forwards came to here.
#[derive(Debug, Default)]
struct Applied {
    /// The last key applied.
    applied: FwdKey,
    /// The last key acknowledged to the peer.
    acked: FwdKey,
    /// Keys applied and the store mark that makes them durable, oldest first.
    pending: VecDeque<(u64, FwdKey)>,
    /// A resent (already applied) message arrived: acknowledge again, the last one was lost.
    again: bool,
}

/// Forwards received from peers: applied once each, acknowledged once durable.
#[derive(Debug, Default)]
pub struct Inbound {
    peers: Mutex<HashMap<String, Applied>>,
}

impl Inbound {
    /// Takes back the last key applied from each peer before a restart.
    pub fn restore(&self, records: &[(Vec<u8>, Vec<u8>)]) {
        let mut peers = self.peers.lock();
        for (k, v) in records {
            let Some(peer) = k.strip_prefix(IN) else {
                continue;
            };
            let (Ok(peer), Ok(key)) =
                (std::str::from_utf8(peer), postcard::from_bytes::<FwdKey>(v))
            else {
                tracing::warn!("unreadable record of a peer's forwards ignored");
                continue;
            };
            peers.insert(
                peer.to_string(),
                Applied {
                    applied: key,
                    acked: key,
                    ..Applied::default()
                },
            );
        }
    }

    /// Whether `key` from `peer` is new (to apply); a repeat is remembered for a fresh
    /// acknowledgement.
    pub fn is_new(&self, peer: &str, key: FwdKey) -> bool {
        let mut peers = self.peers.lock();
        let a = peers.entry(peer.to_string()).or_default();
        if key > a.applied {
            true
        } else {
            a.again = true;
            false
        }
    }

    /// `key` from `peer` was applied; with a store, its record joins the commit of what
    /// applying it wrote.
    pub fn applied(&self, peer: &str, key: FwdKey, db: Option<&Durable>) {
        let mark = match db {
            Some(db) => match postcard::to_stdvec(&key) {
                Ok(rec) => db.put_cluster(in_key(peer), rec),
                Err(_) => return,
            },
            None => 0,
        };
        let mut peers = self.peers.lock();
        let a = peers.entry(peer.to_string()).or_default();
        a.applied = a.applied.max(key);
        a.pending.push_back((mark, key));
    }

    /// Acknowledgements due now that the store is durable up to `durable`: (peer, key).
    pub fn due(&self, durable: u64) -> Vec<(String, FwdKey)> {
        let mut out = Vec::new();
        for (peer, a) in self.peers.lock().iter_mut() {
            let mut last = None;
            while a.pending.front().is_some_and(|(m, _)| *m <= durable) {
                last = a.pending.pop_front().map(|(_, k)| k);
            }
            let key = match last {
                Some(k) if k > a.acked => Some(k),
                _ if a.again && a.pending.is_empty() => Some(a.applied),
                _ => None,
            };
            if let Some(k) = key {
                out.push((peer.clone(), k));
            }
        }
        out
    }

    /// The acknowledgement of `key` reached `peer`'s link queue (or did not: sent again later).
    pub fn acked(&self, peer: &str, key: FwdKey, sent: bool) {
        if let Some(a) = self.peers.lock().get_mut(peer) {
            if sent {
                a.acked = a.acked.max(key);
                a.again = false;
            } else {
                a.again = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u8) -> Message {
        Message {
            id: u64::from(n),
            topic: "t".into(),
            payload: vec![n].into(),
            qos: crate::codec::QoS::AtLeastOnce,
            retain: false,
            properties: None,
            publisher: "p".into(),
            expires_at: None,
        }
    }

    fn keys(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Forward { key, .. } => Some(key.1),
                _ => None,
            })
            .collect()
    }

    fn drain(rx: &mut mpsc::Receiver<Queued>) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Ok((_, f)) = rx.try_recv() {
            out.push(f);
        }
        out
    }

    #[test]
    fn a_full_link_queue_stops_direct_sends_until_everything_held_fits_again() {
        let o = Outbox::new(7, 100);
        let (tx, mut rx) = mpsc::channel(2);
        for n in 1..=4 {
            o.hold("b", &msg(n), true, Vec::new(), None, Some(&tx));
        }
        // 1 and 2 fit; 3 failed, so 4 is not sent either (the peer would skip 3 for good).
        assert_eq!(keys(&drain(&mut rx)), [1, 2]);
        assert_eq!(o.resyncing(), ["b"]);
        // The queue has room for two, but four are held: still waiting.
        o.pump("b", &tx);
        assert!(drain(&mut rx).is_empty());
        o.ack("b", (7, 2), None);
        o.pump("b", &tx);
        assert_eq!(keys(&drain(&mut rx)), [3, 4]);
        assert!(o.resyncing().is_empty());
    }

    #[test]
    fn acknowledged_messages_go_and_a_new_link_gets_the_rest_in_order() {
        let o = Outbox::new(7, 100);
        for n in 1..=5 {
            o.hold("b", &msg(n), true, Vec::new(), None, None);
        }
        assert_eq!(o.ack("b", (7, 3), None).acked, 3);
        assert_eq!(keys(&o.resend("b")), [4, 5]);
        // A key from an earlier start (smaller epoch) acknowledges nothing newer.
        assert_eq!(o.ack("b", (6, 99), None).acked, 0);
        assert_eq!(o.len("b"), 2);
    }

    #[test]
    fn a_peer_forgotten_and_seen_again_gets_keys_above_those_it_applied() {
        let o = Outbox::new(7, 100);
        let i = Inbound::default();
        for n in 1..=3 {
            o.hold("b", &msg(n), true, Vec::new(), None, None);
        }
        for f in o.resend("b") {
            if let Frame::Forward { key, .. } = f {
                assert!(i.is_new("a", key));
                i.applied("a", key, None);
            }
        }
        // b left (its held messages dropped) and came back with what it applied on its store.
        o.drop_peer("b", None);
        o.hold("b", &msg(4), true, Vec::new(), None, None);
        let again = o.resend("b");
        assert!(matches!(&again[..], [Frame::Forward { key, .. }] if i.is_new("a", *key)));
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let o = Outbox::new(1, 3);
        let dropped: u64 = (1..=5)
            .map(|n| o.hold("b", &msg(n), true, Vec::new(), None, None).dropped)
            .sum();
        assert_eq!(dropped, 2);
        assert_eq!(keys(&o.resend("b")), [3, 4, 5]);
        assert_eq!(o.drop_peer("b", None).dropped, 3);
        assert!(o.peers().is_empty());
    }

    #[test]
    fn a_receiver_applies_each_key_once_and_acknowledges_only_what_is_durable() {
        let i = Inbound::default();
        assert!(i.is_new("a", (1, 1)));
        i.applied("a", (1, 1), None);
        assert!(i.is_new("a", (1, 2)));
        i.applied("a", (1, 2), None);
        assert!(!i.is_new("a", (1, 2)), "a resend is applied once");
        assert_eq!(i.due(0), [("a".to_string(), (1, 2))]);
        i.acked("a", (1, 2), true);
        assert!(i.due(0).is_empty(), "nothing new to acknowledge");
        // A resend after a broken link: acknowledged again, not applied again.
        assert!(!i.is_new("a", (1, 1)));
        assert_eq!(i.due(0), [("a".to_string(), (1, 2))]);
        i.acked("a", (1, 2), true);
        // A restarted sender's keys are above the old ones.
        assert!(i.is_new("a", (2, 1)));
    }

    #[test]
    fn keys_on_the_store_round_trip_and_records_restore_per_peer() {
        let k = out_key("corvid-2", (5, 9));
        assert_eq!(parse_out_key(&k), Some(("corvid-2".to_string(), (5, 9))));
        assert_eq!(parse_out_key(b"out/\x00\x09short"), None);
        let rec = crate::persist::encode_forward(&msg(3), false, &["g/t".into()]).unwrap();
        let o = Outbox::new(9, 10);
        let m = o.restore(
            &[
                (k.clone(), rec),
                (out_key("corvid-2", (5, 10)), b"garbage".to_vec()),
                (in_key("x"), vec![]),
            ],
            None,
        );
        assert_eq!((m.added, m.dropped), (1, 1));
        let frames = o.resend("corvid-2");
        assert!(matches!(
            &frames[..],
            [Frame::Forward { key: (5, 9), plain: false, groups, .. }] if groups == &["g/t".to_string()]
        ));
        let i = Inbound::default();
        i.restore(&[(in_key("a"), postcard::to_stdvec(&(4u64, 2u64)).unwrap())]);
        assert!(!i.is_new("a", (4, 2)));
        assert!(i.is_new("a", (4, 3)));
    }
}
