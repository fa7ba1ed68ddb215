//! The Kafka bridge against a real single-node KRaft Kafka started by `scripts/services`
//! (Apache Kafka's jars from Maven Central): Kafka down when the broker starts, then up —
//! the buffer drains and every record is read back with its key, partition and payload; a
//! bridge whose topic does not exist reports it; Kafka going away mid-stream shows in the
//! status. The broker keeps serving MQTT clients throughout.
//!
//! One Kafka for the whole file (a JVM start is the slow part); skips with a message when
//! Kafka cannot start, fails instead with `CORVID_REQUIRE_BRIDGE_SERVERS=1` (CI).

mod bridge_support;
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bridge_support::{bridge, free_port, sample, super_wait, wait_state, Service};
use common::{assert_serving, http_get, v3, Bystander};
use corvid_broker::bridge::kafka::partition_for;
use corvid_broker::bridge::BridgeState;
use corvid_broker::config::{BridgeBackoffConfig, KafkaBatchConfig, KafkaBridgeConfig, KafkaKey};
use rskafka::client::partition::UnknownTopicHandling;
use rskafka::client::{Client, ClientBuilder};
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(60);
const TOPIC: &str = "corvid-events";
const PARTITIONS: i32 = 3;

fn kafka_bridge(name: &str, port: u16, topic: &str) -> KafkaBridgeConfig {
    KafkaBridgeConfig {
        name: name.into(),
        bootstrap: vec![format!("127.0.0.1:{port}")],
        topic: topic.into(),
        filters: vec!["sensors/#".into()],
        key: KafkaKey::ClientId,
        batch: KafkaBatchConfig {
            max_messages: 100,
            linger_ms: 20,
        },
        backoff: BridgeBackoffConfig {
            initial_ms: 100,
            max_ms: 1000,
        },
        ..Default::default()
    }
}

/// A Kafka client for the test itself, retried until Kafka answers.
async fn kafka_client(port: u16) -> Client {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let built = tokio::time::timeout(
            Duration::from_secs(10),
            ClientBuilder::new(vec![format!("127.0.0.1:{port}")]).build(),
        )
        .await;
        if let Ok(Ok(c)) = built {
            return c;
        }
        assert!(tokio::time::Instant::now() < until, "Kafka never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every record of `TOPIC` as (partition, key, value, mqtt_topic header), in offset order per
/// partition, once `n` have arrived.
async fn read_back(client: &Client, n: usize) -> Vec<(i32, String, String, String)> {
    let mut out = Vec::new();
    let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
    let until = tokio::time::Instant::now() + WAIT;
    while out.len() < n {
        assert!(
            tokio::time::Instant::now() < until,
            "read {} of {n} records back from Kafka",
            out.len()
        );
        for p in 0..PARTITIONS {
            let pc = client
                .partition_client(TOPIC, p, UnknownTopicHandling::Retry)
                .await
                .expect("partition client");
            let offset = offsets.entry(p).or_insert(0);
            let (records, _) = pc
                .fetch_records(*offset, 1..1_000_000, 200)
                .await
                .expect("fetch");
            for r in records {
                *offset = r.offset + 1;
                let text =
                    |v: Option<Vec<u8>>| String::from_utf8(v.unwrap_or_default()).expect("utf-8");
                let header = r
                    .record
                    .headers
                    .get("mqtt_topic")
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .unwrap_or_default();
                out.push((p, text(r.record.key), text(r.record.value), header));
            }
        }
    }
    out
}

#[tokio::test]
async fn kafka_down_at_start_then_up_missing_topic_and_going_away() {
    let port = free_port();
    let mut cfg = common::config();
    cfg.bridges.kafka = vec![
        kafka_bridge("events", port, TOPIC),
        kafka_bridge("orphan", port, "no-such-topic"),
    ];
    cfg.validate().expect("valid");
    let running = common::start_with(cfg).await;

    // Kafka is not there yet: the bridge says so and buffers.
    wait_state(&running, "events", BridgeState::Down).await;
    let events = bridge(&running, "events");
    assert!(
        events
            .status()
            .last_error
            .is_some_and(|e| e.contains("Kafka")),
        "{:?}",
        events.status()
    );
    let mut devices = Vec::new();
    for d in 0..3 {
        devices.push(v3::client(common::mqtt(&running), &format!("dev-{d}")).await);
    }
    for i in 0..10 {
        for (d, c) in devices.iter_mut().enumerate() {
            c.publish(
                &format!("sensors/dev-{d}/temp"),
                QoS::AtLeastOnce,
                false,
                &format!("dev-{d}:{i}"),
            )
            .await;
        }
    }
    super_wait("30 buffered", WAIT, || events.buffer.len() == 30).await;
    let mut bystander = Bystander::connect(common::mqtt(&running), "bystander").await;
    assert_serving(common::mqtt(&running), &mut bystander).await;

    // Kafka comes up; the topic is created; the buffer drains.
    let Some(mut kafka) = Service::start("kafka", port).await else {
        common::stop(running).await;
        return;
    };
    let client = kafka_client(port).await;
    client
        .controller_client()
        .expect("controller")
        .create_topic(TOPIC, PARTITIONS, 1, 10_000)
        .await
        .expect("create topic");
    wait_state(&running, "events", BridgeState::Up).await;
    super_wait("30 sent", WAIT, || events.metrics.sent.get() == 30).await;
    assert_eq!(events.buffer.len(), 0);
    assert_eq!(events.buffer.dropped(), 0);

    let records = read_back(&client, 30).await;
    assert_eq!(records.len(), 30, "exactly the 30 messages, no duplicates");
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, key, value, topic) in &records {
        assert!(value.starts_with(&format!("{key}:")), "{key} → {value}");
        assert_eq!(topic, &format!("sensors/{key}/temp"));
        let want = partition_for(key.as_bytes(), PARTITIONS as usize) as i32;
        assert_eq!(
            *p, want,
            "{key} is on the partition Kafka's own producer would pick"
        );
        per_key.entry(key.clone()).or_default().push(value.clone());
    }
    for (key, values) in &per_key {
        let want: Vec<String> = (0..10).map(|i| format!("{key}:{i}")).collect();
        assert_eq!(values, &want, "one device's messages stay in order");
    }
    assert_eq!(per_key.len(), 3);

    // The bridge to a topic that does not exist says so, in the status and the metrics.
    wait_state(&running, "orphan", BridgeState::Error).await;
    let st = bridge(&running, "orphan").status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("\"no-such-topic\" does not exist")),
        "{st:?}"
    );
    assert_eq!(st.sent, 0);
    assert_eq!(st.buffered, 30);
    let text = http_get(running.admin, "/metrics").await.1;
    assert_eq!(sample(&text, "corvid_bridge_up", "orphan"), Some(0.0));
    assert_eq!(sample(&text, "corvid_bridge_up", "events"), Some(1.0));
    assert_eq!(
        sample(&text, "corvid_bridge_sent_total", "events"),
        Some(30.0)
    );
    assert!(sample(&text, "corvid_bridge_failed_total", "orphan").is_some_and(|f| f >= 1.0));
    assert!(text.contains("corvid_bridge_latency_seconds_count{bridge=\"events\"} 30"));
    let (_, body) = http_get(running.admin, "/api/v1/bridges").await;
    assert!(body.contains("\"state\":\"error\""), "{body}");

    // Kafka goes away mid-stream: the bridge notices, keeps the messages, the broker serves on.
    kafka.stop();
    for i in 0..5 {
        devices[0]
            .publish(
                "sensors/dev-0/temp",
                QoS::AtLeastOnce,
                false,
                &format!("late {i}"),
            )
            .await;
    }
    wait_state(&running, "events", BridgeState::Down).await;
    super_wait("5 kept", WAIT, || events.buffer.len() == 5).await;
    assert_eq!(events.metrics.sent.get(), 30);
    assert_serving(common::mqtt(&running), &mut bystander).await;
    common::stop(running).await;
}

/// A Kafka that dies while nothing is published shows as down within seconds (the idle
/// health check), with an error that says the port refused; messages published meanwhile
/// count in `buffered` until a restarted Kafka (same data) takes them; the error stays with
/// its time, older than the recovery.
#[tokio::test]
async fn kafka_dying_while_idle_shows_down_within_seconds_and_recovers() {
    let port = free_port();
    let Some(mut kafka) = Service::start("kafka", port).await else {
        return;
    };
    let client = kafka_client(port).await;
    client
        .controller_client()
        .expect("controller")
        .create_topic(TOPIC, 1, 1, 10_000)
        .await
        .expect("create topic");
    let mut cfg = common::config();
    cfg.bridges.kafka = vec![kafka_bridge("idle", port, TOPIC)];
    let running = common::start_with(cfg).await;
    wait_state(&running, "idle", BridgeState::Up).await;
    let idle = bridge(&running, "idle");
    let mut dev = v3::client(common::mqtt(&running), "dev-1").await;
    dev.publish("sensors/dev-1/t", QoS::AtLeastOnce, false, "first")
        .await;
    super_wait("1 sent", WAIT, || idle.metrics.sent.get() == 1).await;

    // Kafka dies; nobody publishes. Down within a few seconds, not at the next publish.
    kafka.stop();
    let stopped = tokio::time::Instant::now();
    super_wait("down while idle", Duration::from_secs(10), || {
        idle.state() == BridgeState::Down
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("Kafka stopped while idle: bridge down after {took:?}");
    assert!(
        took < Duration::from_secs(8),
        "down after {took:?} (HEALTH_EVERY {:?})",
        corvid_broker::bridge::kafka::HEALTH_EVERY
    );
    let st = idle.status();
    let err = st.last_error.clone().unwrap_or_default();
    assert!(err.contains("refused"), "says the port refused: {err}");
    assert!(st.last_error_at.is_some(), "{st:?}");
    let text = http_get(running.admin, "/metrics").await.1;
    assert_eq!(sample(&text, "corvid_bridge_up", "idle"), Some(0.0));

    // Published while down: every one counts as buffered, in the status and the gauge.
    for i in 0..5 {
        dev.publish("sensors/dev-1/t", QoS::AtLeastOnce, false, &format!("{i}"))
            .await;
    }
    super_wait("5 buffered", WAIT, || idle.status().buffered == 5).await;
    let text = http_get(running.admin, "/metrics").await.1;
    assert_eq!(sample(&text, "corvid_bridge_buffered", "idle"), Some(5.0));

    // Kafka comes back with its data (the topic survives the restart): the 5 go out.
    let Some(_kafka) = Service::start("kafka", port).await else {
        common::stop(running).await;
        return;
    };
    wait_state(&running, "idle", BridgeState::Up).await;
    super_wait("6 sent", WAIT, || idle.metrics.sent.get() == 6).await;
    let st = idle.status();
    assert_eq!(st.buffered, 0, "{st:?}");
    assert!(
        st.last_error_at.is_some_and(|at| at <= st.since),
        "the error is older than the recovery: {st:?}"
    );
    common::stop(running).await;
}
