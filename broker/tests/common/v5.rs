//! rumqttc's MQTT 5 client, driven like [`super::v3`] ([`super::driven`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Packet, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::within;

driven_client!();

fn topic_of(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

impl Client {
    /// Subscribes and waits for the SUBACK; returns the granted QoS.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> QoS {
        let code = self.subscribed(filter, qos).await;
        match code {
            SubscribeReasonCode::Success(q) => q,
            other => panic!("subscription to {filter} refused: {other:?}"),
        }
    }

    /// Publishes (with `props`, if any) and, for QoS 1 and 2, waits until the broker has
    /// acknowledged it.
    pub async fn publish_with(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &str,
        props: Option<PublishProperties>,
    ) {
        let payload = payload.as_bytes().to_vec();
        match props {
            Some(p) => {
                self.client
                    .publish_with_properties(topic, qos, retain, payload, p)
                    .await
            }
            None => self.client.publish(topic, qos, retain, payload).await,
        }
        .expect("publish queued");
        self.acknowledged(qos).await
    }

    /// Publishes and, for QoS 1 and 2, waits until the broker has acknowledged it.
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &str) {
        self.publish_with(topic, qos, retain, payload, None).await
    }
}
