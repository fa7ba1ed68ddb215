//! An application message as the broker holds it: immutable, shared by reference between
//! the router, every session queue it lands in and the retained store, so fan-out never
//! copies a payload.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;

use crate::codec::{PublishProperties, QoS};

/// One published message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Random id, unique in practice across the cluster; lets a session that just moved between
    /// nodes drop a copy that reached it by two paths.
    pub id: u64,
    /// Topic name.
    pub topic: ByteString,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// Retain flag it was published with.
    pub retain: bool,
    /// MQTT 5 properties to forward (topic alias and subscription ids removed).
    pub properties: Option<PublishProperties>,
    /// Publisher's client id (for no-local); empty for server-originated messages.
    pub publisher: ByteString,
    /// When the message expires (MQTT 5 message expiry interval).
    pub expires_at: Option<Instant>,
}

/// Shared handle to a message.
pub type Msg = Arc<Message>;

impl Message {
    /// Builds a message, computing its expiry deadline from the properties.
    pub fn new(
        topic: ByteString,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Option<PublishProperties>,
        publisher: ByteString,
    ) -> Self {
        let expires_at = properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s.get())));
        if let Some(p) = properties.as_mut() {
            p.topic_alias = None;
            p.subscription_ids.clear();
        }
        Message {
            id: fastrand::u64(..),
            topic,
            payload,
            qos,
            retain,
            properties,
            publisher,
            expires_at,
        }
    }

    /// Whether the message has outlived its expiry interval.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Properties to send to one subscriber: remaining expiry and that subscriber's ids.
    pub fn properties_for(
        &self,
        now: Instant,
        sub_ids: &[NonZeroU32],
    ) -> Option<PublishProperties> {
        if self.properties.is_none() && sub_ids.is_empty() {
            return None;
        }
        let mut p = self.properties.clone().unwrap_or_default();
        if let Some(t) = self.expires_at {
            let left = t.saturating_duration_since(now).as_secs().max(1);
            p.message_expiry_interval = NonZeroU32::new(u32::try_from(left).unwrap_or(u32::MAX));
        }
        p.subscription_ids = sub_ids.to_vec();
        Some(p)
    }
}

/// A message on its way to one session, with the options of the matching subscription(s).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub msg: Msg,
    /// QoS granted for this subscriber (min of publish and subscription).
    pub qos: QoS,
    /// Retain flag to send.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<NonZeroU32>,
    /// The shared-subscription group (`group/filter`) that chose this session, so the message
    /// can go to another member if this session ends before acknowledging it.
    pub share: Option<Arc<str>>,
    /// Its key in the session's durable queue (`persistence.data_dir`); 0 when not stored
    /// (QoS 0, a session with expiry 0, or no persistence).
    pub seq: u64,
}

impl Delivery {
    /// What this delivery counts against a session's queue byte bound: topic and payload.
    pub fn size(&self) -> usize {
        self.msg.topic.len() + self.msg.payload.len()
    }
}
