//! The Kafka bridge: local messages matching the bridge's filters, produced as records to one
//! Kafka topic with rskafka (pure Rust, no librdkafka), in batches of up to
//! `batch.max_messages` gathered for at most `batch.linger_ms`.
//!
//! Records: key = the publisher's client id or the MQTT topic, value = the payload, headers
//! `mqtt_topic` and `mqtt_qos`. The partition is chosen from the key exactly as Kafka's Java
//! producer does (murmur2), so MQTT and Java producers keyed alike land on the same partition
//! and one device's messages stay in order. Produce requests wait for all in-sync replicas.
//!
//! Faults: Kafka unreachable, the topic missing, a produce request failing — each sets the
//! status, counts `failed`, requeues the batch in the bounded buffer (overflow dropped and
//! counted), and retries with backoff; local clients never notice. While no message flows, a
//! metadata request every [`HEALTH_EVERY`] checks that Kafka still answers and the topic still
//! exists, so a dead Kafka shows as `down` within seconds, not at the next publish. When Kafka
//! does not answer, a plain TCP connect to the bootstrap addresses tells "refused" from "no
//! answer" for the error text.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use rskafka::record::Record;
use rskafka::BackoffConfig;

use super::{backoff_delay, pause, Bridge, BridgeState, Outgoing};
use crate::broker::Broker;
use crate::config::{KafkaBridgeConfig, KafkaKey};

/// How long one Kafka operation (metadata, produce) may retry internally before the bridge
/// reports it and backs off itself.
const OP_DEADLINE: Duration = Duration::from_secs(10);
/// How long connecting may take before the bridge reports Kafka unreachable.
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);
/// How long the bridge may sit idle (no batch) before it checks that Kafka still answers.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// How long that check may take before Kafka counts as down.
const HEALTH_DEADLINE: Duration = Duration::from_secs(3);
/// How long the diagnostic TCP connect to a bootstrap address may take.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Runs one Kafka bridge until the broker shuts down.
pub async fn run(broker: Arc<Broker>, bridge: Arc<Bridge>, cfg: KafkaBridgeConfig) {
    let mut attempt = 0u32;
    loop {
        let outcome = tokio::select! {
            o = session(&bridge, &cfg, &mut attempt) => o,
            _ = broker.shutdown.cancelled() => return,
        };
        let (state, error) = outcome;
        bridge.metrics.failed.inc();
        bridge.set_state(state, Some(error));
        if !pause(&broker, backoff_delay(&cfg.backoff, attempt)).await {
            return;
        }
        attempt = attempt.saturating_add(1);
    }
}

/// Connects, checks the topic, then produces until something fails; returns why.
async fn session(
    bridge: &Bridge,
    cfg: &KafkaBridgeConfig,
    attempt: &mut u32,
) -> (BridgeState, String) {
    let backoff = BackoffConfig {
        init_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        base: 2.0,
        deadline: Some(OP_DEADLINE),
    };
    let built = tokio::time::timeout(
        CONNECT_DEADLINE,
        ClientBuilder::new(cfg.bootstrap.clone())
            .client_id(format!("corvid-{}", cfg.name))
            .backoff_config(backoff)
            .build(),
    )
    .await;
    let client = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return (
                BridgeState::Down,
                format!(
                    "cannot reach Kafka: {}",
                    probe(&cfg.bootstrap, Some(&e)).await
                ),
            )
        }
        Err(_) => {
            return (
                BridgeState::Down,
                format!("cannot reach Kafka: {}", probe(&cfg.bootstrap, None).await),
            )
        }
    };
    let topics = match tokio::time::timeout(OP_DEADLINE, client.list_topics()).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return (
                BridgeState::Down,
                format!("Kafka metadata request failed: {e}"),
            )
        }
        Err(_) => return (BridgeState::Down, "Kafka metadata request timed out".into()),
    };
    let Some(topic) = topics.into_iter().find(|t| t.name == cfg.topic) else {
        return (
            BridgeState::Error,
            format!(
                "Kafka topic {:?} does not exist (create it; the bridge does not)",
                cfg.topic
            ),
        );
    };
    let mut partitions: Vec<PartitionClient> = Vec::new();
    for p in &topic.partitions {
        let pc = tokio::time::timeout(
            OP_DEADLINE,
            client.partition_client(cfg.topic.clone(), *p, UnknownTopicHandling::Error),
        )
        .await;
        match pc {
            Ok(Ok(pc)) => partitions.push(pc),
            Ok(Err(e)) => {
                return (
                    BridgeState::Down,
                    format!("Kafka partition {}/{p} unavailable: {e}", cfg.topic),
                )
            }
            Err(_) => {
                return (
                    BridgeState::Down,
                    format!("Kafka partition {}/{p} timed out", cfg.topic),
                )
            }
        }
    }
    if partitions.is_empty() {
        return (
            BridgeState::Error,
            format!("Kafka topic {:?} has no partitions", cfg.topic),
        );
    }
    bridge.set_state(BridgeState::Up, None);
    *attempt = 0;
    let linger = Duration::from_millis(cfg.batch.linger_ms);
    loop {
        // Idle for HEALTH_EVERY: check Kafka instead (taking a batch is cancel-safe: entries
        // are taken only as `next_batch` completes).
        let batch = tokio::select! {
            b = bridge.buffer.next_batch(cfg.batch.max_messages, linger) => b,
            _ = tokio::time::sleep(HEALTH_EVERY) => {
                if let Some(fault) = health(&client, cfg).await {
                    return fault;
                }
                continue;
            }
        };
        // Taken, not yet settled: still counted in `buffered`.
        bridge.buffer.set_held(batch.len());
        // Group by partition, keeping each partition's records in buffer order.
        let mut groups: BTreeMap<usize, Vec<Outgoing>> = BTreeMap::new();
        for o in batch {
            let key = key_of(cfg.key, &o);
            let p = partition_for(&key, partitions.len());
            groups.entry(p).or_default().push(o);
        }
        let mut failure = None;
        let mut unsent: Vec<Outgoing> = Vec::new();
        for (p, items) in groups {
            if failure.is_some() {
                unsent.extend(items);
                continue;
            }
            let records: Vec<Record> = items.iter().map(|o| record(cfg.key, o)).collect();
            // `partition_for` is below `partitions.len()`, and Kafka numbers partitions 0..n.
            let Some(pc) = partitions.get(p) else {
                unsent.extend(items);
                continue;
            };
            let res =
                tokio::time::timeout(OP_DEADLINE, pc.produce(records, Compression::NoCompression))
                    .await;
            match res {
                Ok(Ok(_)) => items.iter().for_each(|o| bridge.sent(o)),
                Ok(Err(e)) => {
                    failure = Some(format!("Kafka produce to {}/{p} failed: {e}", cfg.topic));
                    unsent.extend(items);
                }
                Err(_) => {
                    failure = Some(format!("Kafka produce to {}/{p} timed out", cfg.topic));
                    unsent.extend(items);
                }
            }
        }
        if !unsent.is_empty() {
            unsent.sort_by_key(|o| o.at);
            bridge.buffer.requeue(unsent);
        }
        bridge.buffer.set_held(0);
        if let Some(why) = failure {
            return (BridgeState::Down, why);
        }
    }
}

/// The idle check: a metadata request within [`HEALTH_DEADLINE`]; `Some((state, why))` when
/// Kafka does not answer or the topic is gone.
async fn health(
    client: &rskafka::client::Client,
    cfg: &KafkaBridgeConfig,
) -> Option<(BridgeState, String)> {
    match tokio::time::timeout(HEALTH_DEADLINE, client.list_topics()).await {
        Ok(Ok(topics)) if topics.iter().any(|t| t.name == cfg.topic) => None,
        Ok(Ok(_)) => Some((
            BridgeState::Error,
            format!(
                "Kafka topic {:?} does not exist (create it; the bridge does not)",
                cfg.topic
            ),
        )),
        Ok(Err(e)) => Some((
            BridgeState::Down,
            format!(
                "Kafka stopped answering: {}",
                probe(&cfg.bootstrap, Some(&e)).await
            ),
        )),
        Err(_) => Some((
            BridgeState::Down,
            format!(
                "Kafka stopped answering: {}",
                probe(&cfg.bootstrap, None).await
            ),
        )),
    }
}

/// Says what happened when Kafka did not answer, from a plain TCP connect to each bootstrap
/// address: refused, no answer (timed out), not resolvable — or, when the port accepts
/// connections, the Kafka client's own error (`err`) or "no Kafka answer in time".
async fn probe(bootstrap: &[String], err: Option<&rskafka::client::error::Error>) -> String {
    let mut why = Vec::new();
    for addr in bootstrap {
        let attempt = tokio::time::timeout(
            PROBE_DEADLINE,
            tokio::net::TcpStream::connect(addr.as_str()),
        )
        .await;
        let text = match attempt {
            Ok(Ok(_)) => match err {
                Some(e) => format!("{addr} accepts connections but the Kafka request failed: {e}"),
                None => format!(
                    "{addr} accepts connections but Kafka gave no answer within {HEALTH_DEADLINE:?}"
                ),
            },
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                format!("{addr} refused the connection (nothing listening)")
            }
            Ok(Err(e)) => format!("{addr}: {e}"),
            Err(_) => format!("{addr} did not answer within {PROBE_DEADLINE:?} (timed out)"),
        };
        why.push(text);
    }
    why.join("; ")
}

fn key_of(key: KafkaKey, o: &Outgoing) -> Vec<u8> {
    match key {
        KafkaKey::ClientId => o.msg.publisher.as_bytes().to_vec(),
        KafkaKey::Topic => o.msg.topic.as_bytes().to_vec(),
    }
}

fn record(key: KafkaKey, o: &Outgoing) -> Record {
    let mut headers = BTreeMap::new();
    headers.insert("mqtt_topic".to_string(), o.msg.topic.as_bytes().to_vec());
    headers.insert("mqtt_qos".to_string(), vec![b'0' + o.msg.qos.value()]);
    Record {
        key: Some(key_of(key, o)),
        value: Some(o.msg.payload.to_vec()),
        headers,
        timestamp: chrono::Utc::now(),
    }
}

/// The partition Kafka's Java producer picks for a keyed record:
/// `toPositive(murmur2(key)) % partitions`.
pub fn partition_for(key: &[u8], partitions: usize) -> usize {
    let h = murmur2(key) & 0x7fff_ffff;
    usize::try_from(h).unwrap_or(0) % partitions.max(1)
}

/// Kafka's murmur2 (seed `0x9747b28c`), as in `org.apache.kafka.common.utils.Utils`.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2 (as signed ints there).
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ];
        for (s, want) in cases {
            assert_eq!(murmur2(s.as_bytes()) as i32, want, "{s}");
        }
    }
}
