//! rumqttc's MQTT 3.1.1 client, driven by a task that forwards its events and stops (instead
//! of reconnecting) at the first connection error ([`super::driven`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnAck, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::within;

driven_client!();

fn topic_of(p: &Publish) -> String {
    p.topic.clone()
}

impl Client {
    /// Subscribes and waits for the SUBACK; returns the granted QoS.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> QoS {
        let code = self.subscribed(filter, qos).await;
        match code {
            SubscribeReasonCode::Success(q) => q,
            SubscribeReasonCode::Failure => panic!("subscription to {filter} refused"),
        }
    }

    /// Publishes and, for QoS 1 and 2, waits until the broker has acknowledged it.
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &str) {
        self.client
            .publish(topic, qos, retain, payload.as_bytes().to_vec())
            .await
            .expect("publish queued");
        self.acknowledged(qos).await
    }
}
