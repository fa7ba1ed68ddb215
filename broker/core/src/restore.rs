//! Bringing a starting broker back to where the durable store left it: retained messages,
//! sessions with their routes, queues, in-flight and incoming QoS 2 state, and pending delayed
//! wills (see [`crate::persist`] for what is stored and how). Runs once at start, before any
//! listener accepts.

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytestring::ByteString;
use corvid_store::Op;

use crate::broker::Broker;
use crate::message::Msg;
use crate::persist::{
    deadline_instant, unix_ms, Durable, StoredDelivery, StoredMsg, StoredSession, StoredWill,
    WILL_KEY,
};
use crate::session::{Inflight, InflightState, Session};

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
