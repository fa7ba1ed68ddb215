//! Bridges: copies of local messages sent on to other systems (another MQTT broker, a cloud
//! IoT hub, RabbitMQ, Kafka) and messages from remote MQTT brokers published here.

pub mod buffer;
