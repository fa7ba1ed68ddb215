//! What nodes say to each other over their encrypted, authenticated TCP links: route changes,
//! forwarded messages, retained messages, and session hand-offs. Serialized with postcard; each
//! frame is sealed by the link's [`super::channel`].

use std::num::NonZeroU16;

use serde::{Deserialize, Serialize};

use crate::session::{Inflight, InflightState, SessionState, Subscription};
pub use corvid_core::wire::{WireDelivery, WireMsg, WireSub};

/// One frame on an inter-node link.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// Handshake of builds before link encryption; never sent now (the Noise handshake of
    /// [`super::channel`] replaced it), kept so later variants keep their wire numbers.
    Hello {
        /// Dialer's node name.
        node: String,
        /// Random challenge.
        nonce: u64,
        /// Unix seconds (replays of old handshakes are refused).
        ts: u64,
        /// HMAC over node, nonce and ts.
        tag: Vec<u8>,
    },
    /// Answer to [`Frame::Hello`] of builds before link encryption; never sent now, kept for
    /// the wire numbering.
    Welcome {
        /// Acceptor's node name.
        node: String,
        /// HMAC over "welcome", node and the dialer's nonce.
        tag: Vec<u8>,
    },
    /// The sender's complete route table (replaces what the receiver had).
    Routes(Vec<String>),
    /// A filter gained its first subscriber on the sender.
    RouteAdd(String),
    /// A filter lost its last subscriber on the sender.
    RouteDel(String),
    /// A message for the receiver's subscribers.
    Publish {
        /// The message.
        msg: WireMsg,
        /// Deliver to ordinary subscriptions.
        plain: bool,
        /// Shared groups (`group/filter`) whose delivery the sender assigned to the receiver.
        groups: Vec<String>,
    },
    /// A retained message set (or cleared, empty payload) anywhere in the cluster.
    Retain(WireMsg),
    /// All retained messages the sender holds (sent when a link comes up).
    RetainSnapshot(Vec<WireMsg>),
    /// Asks every node for the session of a client id that is connecting to the sender.
    TakeSession {
        /// Request id.
        req: u64,
        /// Client id.
        client_id: String,
        /// Clean start: the old session is discarded, not moved.
        clean: bool,
        /// The connecting identity (user name; `None` anonymous): under
        /// `sessions.takeover: owner_only` the holder refuses any other than the owner.
        /// Last, so an older peer decoding this frame ignores it.
        owner: Option<String>,
    },
    /// Answer to [`Frame::TakeSession`].
    TakeReply {
        /// Request id.
        req: u64,
        /// The session, if the replier had it and it is moving.
        snapshot: Option<Box<SessionSnapshot>>,
        /// The replier holds the session and refused it to the requesting identity.
        refused: bool,
    },
    /// An evacuating node hands a session to the receiver.
    Handoff(Box<SessionSnapshot>),
    /// A message for a session that moved from the sender to the receiver.
    DeliverTo {
        /// Client id.
        client_id: String,
        /// The delivery.
        delivery: WireDelivery,
    },
    /// A [`Frame::TakeSession`] passed on by a node whose copy of the session has moved to the
    /// receiver: sent on the same link as the [`Frame::Handoff`] (or reply) that moved it, so it
    /// arrives after the session is installed. The receiver answers `requester` directly.
    /// Added after the first release: an older peer that cannot decode it skips it.
    TakeFor {
        /// The requester's request id.
        req: u64,
        /// Client id.
        client_id: String,
        /// Clean start: the old session is discarded, not moved.
        clean: bool,
        /// The connecting identity, as in [`Frame::TakeSession`].
        owner: Option<String>,
        /// The node the client is connecting to, which waits for the [`Frame::TakeReply`].
        requester: String,
        /// How many nodes passed this request on (bounded, so a cycle of moves cannot loop).
        hops: u8,
    },
    /// A QoS 1/2 message for the receiver's subscribers that the sender holds (durably, when
    /// it has a store) until the receiver acknowledges it with [`Frame::ForwardAck`]; resent
    /// after a link breaks or the receiver restarts, and applied once (`key` only grows).
    /// Sent only to peers that gossip [`super::gossip::KEY_DURABLE`].
    Forward {
        /// The sender's key for it: increasing in the order the sender sends to this peer.
        key: FwdKey,
        /// The message.
        msg: WireMsg,
        /// Deliver to ordinary subscriptions.
        plain: bool,
        /// Shared groups whose delivery the sender assigned to the receiver.
        groups: Vec<String>,
    },
    /// Every [`Frame::Forward`] from the receiver up to `key` is applied here, and durable in
    /// the sessions it reached when this node has a store: the receiver may let them go.
    ForwardAck {
        /// The last key applied.
        key: FwdKey,
    },
}

/// How many kinds of [`Frame`] this node decodes; a frame whose kind (postcard's leading
/// variant index) is not below this comes from a newer peer and is skipped, not fatal.
pub const KNOWN_FRAME_KINDS: u8 = 15;

/// Orders the messages one node forwards to one peer: the sender's start (Unix ms, so a
/// restarted sender's keys are above its earlier ones) and a counter within it.
pub type FwdKey = (u64, u64);

/// Everything that moves with a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSnapshot {
    /// Client id.
    pub client_id: String,
    /// Session expiry interval.
    pub expiry: u32,
    /// Seconds it has been offline already.
    pub offline_for: u64,
    /// Subscriptions by raw filter.
    pub subscriptions: Vec<(String, WireSub)>,
    /// Queued messages.
    pub queue: Vec<WireDelivery>,
    /// Inflight messages: packet id, delivery, waiting for PUBCOMP.
    pub inflight: Vec<(u16, WireDelivery, bool)>,
    /// QoS 2 packet ids received and not yet released.
    pub incoming_qos2: Vec<u16>,
    /// Next packet id.
    pub next_packet_id: u16,
    /// The identity that owns the session (user name; `None` anonymous).
    pub owner: Option<String>,
}

impl SessionSnapshot {
    /// Captures a session's state.
    pub fn capture(client_id: &str, st: &SessionState) -> Self {
        SessionSnapshot {
            client_id: client_id.to_string(),
            expiry: st.expiry,
            offline_for: st
                .disconnected_at
                .map(|t| t.elapsed().as_secs())
                .unwrap_or(0),
            subscriptions: st
                .subscriptions
                .iter()
                .map(|(f, s)| (f.to_string(), WireSub::from_sub(s)))
                .collect(),
            queue: st.queue.iter().map(WireDelivery::from_delivery).collect(),
            inflight: st
                .inflight
                .iter()
                .map(|f| {
                    (
                        f.packet_id.get(),
                        WireDelivery::from_delivery(&f.delivery),
                        f.state == InflightState::AwaitComp,
                    )
                })
                .collect(),
            incoming_qos2: st.incoming_qos2.iter().copied().collect(),
            next_packet_id: st.next_packet_id,
            owner: st.owner.clone(),
        }
    }

    /// Drops subscriptions whose filters are malformed or over `limits`; returns how many.
    pub fn drop_invalid_subscriptions(&mut self, limits: &crate::topic::TopicLimits) -> usize {
        let before = self.subscriptions.len();
        self.subscriptions.retain(|(f, _)| limits.filter(f).is_ok());
        before - self.subscriptions.len()
    }

    /// Subscriptions as the session stores them.
    pub fn subscriptions(&self) -> Vec<(String, Subscription)> {
        self.subscriptions
            .iter()
            .map(|(f, w)| (f.clone(), w.to_sub()))
            .collect()
    }

    /// Restores queue, inflight and QoS 2 state into `st` (subscriptions are applied by the
    /// broker, which also registers their routes).
    pub fn restore_into(self, st: &mut SessionState) {
        st.expiry = self.expiry;
        st.queue = self
            .queue
            .into_iter()
            .map(WireDelivery::into_delivery)
            .collect();
        st.inflight = self
            .inflight
            .into_iter()
            .filter_map(|(id, d, comp)| {
                Some(Inflight {
                    packet_id: NonZeroU16::new(id)?,
                    delivery: d.into_delivery(),
                    state: if comp {
                        InflightState::AwaitComp
                    } else {
                        InflightState::AwaitAck
                    },
                })
            })
            .collect();
        st.incoming_qos2 = self.incoming_qos2.into_iter().collect();
        st.next_packet_id = self.next_packet_id;
    }
}

/// Encodes a frame.
pub fn encode(f: &Frame) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(f)
}

/// Decodes a frame: `Ok(None)` for a kind this node does not know (sent by a newer peer during
/// a rolling upgrade), so the link stays up and the frame is skipped.
pub fn decode(b: &[u8]) -> Result<Option<Frame>, postcard::Error> {
    // Variant indexes are varints; below 128 they are a single byte.
    if b.first()
        .is_some_and(|k| *k >= KNOWN_FRAME_KINDS && *k < 0x80)
    {
        return Ok(None);
    }
    postcard::from_bytes(b).map(Some)
}

impl From<SessionSnapshot> for crate::fabric::ArrivedSession {
    fn from(snap: SessionSnapshot) -> Self {
        crate::fabric::ArrivedSession {
            client_id: snap.client_id.clone(),
            expiry: snap.expiry,
            owner: snap.owner.clone(),
            subscriptions: snap.subscriptions(),
            restore: Box::new(move |st| snap.restore_into(st)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `KNOWN_FRAME_KINDS` follows the enum: the last variant decodes, one past it is skipped.
    #[test]
    fn the_last_kind_decodes_and_a_newer_kind_is_skipped() {
        let last = Frame::ForwardAck { key: (5, 9) };
        let bytes = encode(&last).expect("encode");
        assert_eq!(
            bytes[0],
            KNOWN_FRAME_KINDS - 1,
            "ForwardAck must stay the last kind"
        );
        assert!(matches!(
            decode(&bytes),
            Ok(Some(Frame::ForwardAck { key: (5, 9) }))
        ));
        let mut newer = bytes.clone();
        newer[0] = KNOWN_FRAME_KINDS;
        assert!(matches!(decode(&newer), Ok(None)));
        assert!(decode(&[0xff, 0xff]).is_err(), "garbage still fails");
    }
}
