//! The names of the broker's client, session and message events: webhooks and the event store
//! are configured with them and payloads carry them, so they are written once, here.

/// Kinds of events, by the names used in configuration and payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A client connected.
    ClientConnected = 0,
    /// A client disconnected.
    ClientDisconnected = 1,
    /// A subscription was added.
    SessionSubscribed = 2,
    /// A subscription was removed.
    SessionUnsubscribed = 3,
    /// A client published a message.
    MessagePublish = 4,
    /// A message was sent to a subscriber.
    MessageDelivered = 5,
    /// A subscriber acknowledged a QoS 1/2 message.
    MessageAcked = 6,
    /// A message was dropped (no subscribers, ACL, full queue...).
    MessageDropped = 7,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 8] = [
        EventKind::ClientConnected,
        EventKind::ClientDisconnected,
        EventKind::SessionSubscribed,
        EventKind::SessionUnsubscribed,
        EventKind::MessagePublish,
        EventKind::MessageDelivered,
        EventKind::MessageAcked,
        EventKind::MessageDropped,
    ];

    /// The configuration / payload name.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::ClientConnected => "client.connected",
            EventKind::ClientDisconnected => "client.disconnected",
            EventKind::SessionSubscribed => "session.subscribed",
            EventKind::SessionUnsubscribed => "session.unsubscribed",
            EventKind::MessagePublish => "message.publish",
            EventKind::MessageDelivered => "message.delivered",
            EventKind::MessageAcked => "message.acked",
            EventKind::MessageDropped => "message.dropped",
        }
    }

    /// Parses a configured name.
    pub fn from_name(s: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The kind's bit in a set of wanted kinds (one test per event on the hot path).
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl EventKind {
    /// Every name, comma-separated: what an error about an unknown event lists.
    pub fn names() -> String {
        Self::ALL.map(EventKind::name).join(", ")
    }
}
