//! Messages, deliveries and subscription options as serializable records: the one encoding
//! shared by the durable store (what a restart reads back) and the cluster's links (what a
//! peer receives), so the two never disagree on what a message carries.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::codec::{PublishProperties, QoS, RetainHandling, SubOptions};
use crate::message::{Delivery, Message, Msg};
use crate::session::Subscription;

/// A message on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireMsg {
    /// Cluster-unique id (duplicate suppression during session moves).
    pub id: u64,
    /// Topic.
    pub topic: ByteString,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: Option<PublishProperties>,
    /// Publisher's client id.
    pub publisher: ByteString,
    /// Milliseconds until expiry.
    pub expires_in_ms: Option<u64>,
}

impl WireMsg {
    /// Encodes a message.
    pub fn from_msg(m: &Message) -> Self {
        let now = Instant::now();
        WireMsg {
            id: m.id,
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: m.qos.value(),
            retain: m.retain,
            properties: m.properties.clone(),
            publisher: m.publisher.clone(),
            expires_in_ms: m
                .expires_at
                .map(|t| t.saturating_duration_since(now).as_millis() as u64),
        }
    }

    /// Decodes into a shared message.
    pub fn into_msg(self) -> Msg {
        Arc::new(Message {
            id: self.id,
            topic: self.topic,
            payload: self.payload,
            qos: QoS::try_from(self.qos).unwrap_or(QoS::AtMostOnce),
            retain: self.retain,
            properties: self.properties,
            publisher: self.publisher,
            expires_at: self
                .expires_in_ms
                .map(|ms| Instant::now() + Duration::from_millis(ms)),
        })
    }
}

/// A delivery on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireDelivery {
    /// The message.
    pub msg: WireMsg,
    /// Granted QoS.
    pub qos: u8,
    /// Retain flag to send.
    pub retain: bool,
    /// Subscription ids.
    pub sub_ids: Vec<u32>,
    /// Shared group key.
    pub share: Option<String>,
}

impl WireDelivery {
    /// Encodes a delivery.
    pub fn from_delivery(d: &Delivery) -> Self {
        WireDelivery {
            msg: WireMsg::from_msg(&d.msg),
            qos: d.qos.value(),
            retain: d.retain,
            sub_ids: d.sub_ids.iter().map(|i| i.get()).collect(),
            share: d.share.as_deref().map(str::to_string),
        }
    }

    /// Decodes a delivery.
    pub fn into_delivery(self) -> Delivery {
        Delivery {
            msg: self.msg.into_msg(),
            qos: QoS::try_from(self.qos).unwrap_or(QoS::AtMostOnce),
            retain: self.retain,
            sub_ids: self
                .sub_ids
                .into_iter()
                .filter_map(NonZeroU32::new)
                .collect(),
            share: self.share.map(Arc::from),
            seq: 0,
        }
    }
}

/// Subscription options on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WireSub {
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    sub_id: Option<u32>,
}

impl WireSub {
    /// Encodes a session's subscription.
    pub fn from_sub(s: &Subscription) -> Self {
        WireSub {
            qos: s.opts.qos.value(),
            no_local: s.opts.no_local,
            retain_as_published: s.opts.retain_as_published,
            retain_handling: u8::from(s.opts.retain_handling),
            sub_id: s.sub_id.map(|i| i.get()),
        }
    }

    /// Decodes into a session's subscription (unknown values fall back to the defaults).
    pub fn to_sub(self) -> Subscription {
        Subscription {
            opts: SubOptions {
                qos: QoS::try_from(self.qos).unwrap_or(QoS::AtMostOnce),
                no_local: self.no_local,
                retain_as_published: self.retain_as_published,
                retain_handling: RetainHandling::try_from(self.retain_handling)
                    .unwrap_or(RetainHandling::AtSubscribe),
            },
            sub_id: self.sub_id.and_then(NonZeroU32::new),
        }
    }
}
