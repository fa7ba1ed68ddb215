//! Deliveries a peer forwards for a session that is on its way here (a takeover or hand-off
//! whose session record has not arrived yet), held until the session is installed.
//!
//! A peer names the session, so the holder is bounded in every direction a buggy or hostile
//! peer could push it: deliveries per session, deliveries and payload bytes in all, and age
//! (a session that never arrives — the client gave up, the hand-off failed — lets its
//! deliveries go after [`MAX_AGE`] instead of keeping them forever).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::message::Delivery;

/// Deliveries held for one session.
pub const MAX_PER_SESSION: usize = 10_000;
/// Deliveries held for all sessions together.
pub const MAX_TOTAL: usize = 100_000;
/// Topic and payload bytes held for all sessions together.
pub const MAX_BYTES: usize = 64 << 20;
/// How long a session's deliveries wait for the session (longer than any takeover wait).
pub const MAX_AGE: Duration = Duration::from_secs(120);
/// Expired entries are looked for at most this often (the sweep walks every held session).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One session's held deliveries.
#[derive(Debug)]
struct Held {
    since: Instant,
    deliveries: Vec<Delivery>,
}

/// Why a delivery was not held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The session already holds [`MAX_PER_SESSION`].
    SessionFull,
    /// All sessions together hold [`MAX_TOTAL`] deliveries or [`MAX_BYTES`].
    Full,
}

/// Early deliveries by client id, bounded.
#[derive(Debug)]
pub struct Early {
    held: HashMap<String, Held>,
    count: usize,
    bytes: usize,
    last_sweep: Instant,
}

impl Default for Early {
    fn default() -> Self {
        Early {
            held: HashMap::new(),
            count: 0,
            bytes: 0,
            last_sweep: Instant::now(),
        }
    }
}

impl Early {
    /// Holds `d` for `client_id` (callers [`Early::sweep`] first, so expired sessions make
    /// room); on `Err` the caller counts the drop.
    pub fn push(&mut self, client_id: &str, d: Delivery, now: Instant) -> Result<(), Refused> {
        let size = d.size();
        if let Some(h) = self.held.get(client_id) {
            if h.deliveries.len() >= MAX_PER_SESSION {
                return Err(Refused::SessionFull);
            }
        }
        if self.count >= MAX_TOTAL || self.bytes.saturating_add(size) > MAX_BYTES {
            return Err(Refused::Full);
        }
        let h = self
            .held
            .entry(client_id.to_string())
            .or_insert_with(|| Held {
                since: now,
                deliveries: Vec::new(),
            });
        h.deliveries.push(d);
        self.count += 1;
        self.bytes += size;
        Ok(())
    }

    /// Lets go of what waited too long, then holds `d` for `client_id`; returns how many
    /// deliveries were dropped (expired, or `d` itself over a bound) for the caller to count.
    pub fn hold(&mut self, client_id: &str, d: Delivery, now: Instant) -> usize {
        let expired = self.sweep(now);
        expired + usize::from(self.push(client_id, d, now).is_err())
    }

    /// Everything held for `client_id` (its session was installed here).
    pub fn take(&mut self, client_id: &str) -> Vec<Delivery> {
        match self.held.remove(client_id) {
            Some(h) => {
                self.forget(&h);
                h.deliveries
            }
            None => Vec::new(),
        }
    }

    /// Deliveries held in all.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Lets go of sessions whose deliveries waited past [`MAX_AGE`]; returns how many
    /// deliveries went (at most one walk per [`SWEEP_EVERY`]).
    pub fn sweep(&mut self, now: Instant) -> usize {
        if now.saturating_duration_since(self.last_sweep) < SWEEP_EVERY || self.held.is_empty() {
            return 0;
        }
        self.last_sweep = now;
        let before = self.count;
        let expired: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.since) >= MAX_AGE)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(h) = self.held.remove(&k) {
                tracing::warn!(client_id = %k, deliveries = h.deliveries.len(), "deliveries forwarded for a session that never arrived; dropped");
                self.forget(&h);
            }
        }
        before - self.count
    }

    fn forget(&mut self, h: &Held) {
        self.count -= h.deliveries.len();
        self.bytes -= h.deliveries.iter().map(Delivery::size).sum::<usize>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;
    use crate::message::Message;
    use std::sync::Arc;

    fn delivery(payload: usize) -> Delivery {
        let msg = Message::new(
            "t/early".into(),
            vec![0u8; payload].into(),
            QoS::AtLeastOnce,
            false,
            None,
            "peer".into(),
        );
        Delivery {
            msg: Arc::new(msg),
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: Vec::new(),
            share: None,
            seq: 0,
        }
    }

    #[test]
    fn a_peer_naming_ever_new_sessions_is_held_to_the_total_bounds() {
        let mut e = Early::default();
        let now = Instant::now();
        let mut refused = 0;
        for i in 0..MAX_TOTAL + 10 {
            if e.push(&format!("c{i}"), delivery(0), now).is_err() {
                refused += 1;
            }
        }
        assert_eq!(e.len(), MAX_TOTAL);
        assert_eq!(refused, 10);
        let mut e = Early::default();
        let big = MAX_BYTES / 4 + 1;
        let held = (0..8)
            .filter(|i| e.push(&format!("b{i}"), delivery(big), now).is_ok())
            .count();
        assert_eq!(held, 3, "payload bytes are bounded too");
        assert_eq!(e.take("b0").len(), 1);
        assert!(
            e.push("b9", delivery(big), now).is_ok(),
            "taking frees its bytes"
        );
    }

    #[test]
    fn holding_counts_what_expired_and_what_did_not_fit() {
        let mut e = Early::default();
        let t0 = Instant::now();
        assert_eq!(e.hold("old", delivery(1), t0), 0);
        assert_eq!(e.hold("old", delivery(1), t0), 0);
        let later = t0 + MAX_AGE + Duration::from_secs(1);
        assert_eq!(
            e.hold("new", delivery(1), later),
            2,
            "both of `old` expired"
        );
        assert_eq!(
            e.hold("big", delivery(MAX_BYTES), later),
            1,
            "over the byte bound"
        );
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn one_session_is_held_to_its_own_bound() {
        let mut e = Early::default();
        let now = Instant::now();
        for _ in 0..MAX_PER_SESSION {
            assert!(e.push("c", delivery(1), now).is_ok());
        }
        assert_eq!(e.push("c", delivery(1), now), Err(Refused::SessionFull));
        assert!(e.push("other", delivery(1), now).is_ok());
        assert_eq!(e.take("c").len(), MAX_PER_SESSION);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn deliveries_for_a_session_that_never_arrives_are_let_go() {
        let mut e = Early::default();
        let t0 = Instant::now();
        e.push("gone", delivery(10), t0).expect("held");
        e.push("gone", delivery(10), t0).expect("held");
        let later = t0 + MAX_AGE / 2;
        e.push("young", delivery(10), later).expect("held");
        assert_eq!(e.sweep(t0 + MAX_AGE + Duration::from_secs(1)), 2);
        assert!(e.take("gone").is_empty());
        assert_eq!(e.take("young").len(), 1);
        assert!(e.is_empty());
        assert_eq!(e.bytes, 0);
    }
}
