//! Bridges: copies of local messages sent on to other systems (another MQTT broker, a cloud
//! IoT hub, RabbitMQ, Kafka), and messages from remote MQTT brokers published here.
//!
//! The publish path only ever touches the *tap*: [`Bridges::tap`] matches a message against
//! each bridge's local filters and pushes a reference into that bridge's bounded [`Buffer`]
//! — no I/O, no await, so a remote that is down or slow never slows local clients; it costs
//! at most `buffer.max_messages` messages of memory, and what does not fit is dropped and
//! counted. One worker task per bridge ([`mqtt`], [`kafka`]) drains its buffer to the remote,
//! reconnecting with exponential backoff and jitter.
//!
//! The tap runs in [`corvid_core::broker::Broker::publish`], on the node where a message entered the
//! cluster (never for copies forwarded by peers), so in a cluster every message leaves through
//! a bridge once, not once per pod.

pub mod buffer;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mqtt-bridge")]
pub mod mqtt;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytestring::ByteString;
use parking_lot::Mutex;
use prometheus::{Histogram, IntCounter, IntGauge};

use crate::broker::Broker;
use crate::config::{BridgeBackoffConfig, BridgesConfig, NotBuilt};
use crate::message::Msg;
use crate::metrics::Metrics;
use crate::topic;

pub use buffer::{Buffer, BufferMetrics, Pushed};
// A bridge's state and status are the admin API's types: their names are written once there.
pub use corvid_api::{BridgeState, BridgeStatus};

/// A message on its way out through a bridge.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The message (shared, never copied).
    pub msg: Msg,
    /// Which egress rule of the bridge matched (always 0 for Kafka).
    pub rule: usize,
    /// When the tap took it, for the latency histogram.
    pub at: Instant,
}

/// Per-bridge counters and gauges, all labelled `bridge=<name>`.
#[derive(Debug, Clone)]
pub struct BridgeMetrics {
    /// Messages the remote acknowledged (`corvid_bridge_sent_total`).
    pub sent: IntCounter,
    /// Failed attempts: connects, broken connections, rejected produce requests
    /// (`corvid_bridge_failed_total`).
    pub failed: IntCounter,
    /// Messages dropped because the buffer was full (`corvid_bridge_dropped_total`).
    pub dropped: IntCounter,
    /// Remote messages published here (`corvid_bridge_received_total`).
    pub received: IntCounter,
    /// Messages waiting in the buffer (`corvid_bridge_buffered`).
    pub buffered: IntGauge,
    /// 1 while connected (`corvid_bridge_up`).
    pub up: IntGauge,
    /// Tap to remote acknowledgement (`corvid_bridge_latency_seconds`).
    pub latency: Histogram,
}

/// One bridge's shared state: its buffer, metrics and status.
#[derive(Debug)]
pub struct Bridge {
    /// Configured name.
    pub name: String,
    /// `mqtt` or `kafka`.
    pub kind: &'static str,
    /// Where it sends to, for the status (`host:port` or the bootstrap list and topic).
    pub remote: String,
    /// Local filters and which rule each belongs to.
    filters: Vec<(String, usize)>,
    /// Publisher id of the messages this bridge itself publishes here (loop prevention).
    pub publisher: ByteString,
    /// Messages waiting to go out.
    pub buffer: Arc<Buffer<Outgoing>>,
    /// Metrics.
    pub metrics: BridgeMetrics,
    status: Mutex<Status>,
}

#[derive(Debug, Clone)]
struct Status {
    state: BridgeState,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    since: SystemTime,
    connects: u64,
}

impl Bridge {
    fn new(
        name: &str,
        kind: &'static str,
        remote: String,
        filters: Vec<(String, usize)>,
        capacity: usize,
        vecs: &MetricVecs,
    ) -> Self {
        let l = [name];
        let metrics = BridgeMetrics {
            sent: vecs.sent.with_label_values(&l),
            failed: vecs.failed.with_label_values(&l),
            dropped: vecs.dropped.with_label_values(&l),
            received: vecs.received.with_label_values(&l),
            buffered: vecs.buffered.with_label_values(&l),
            up: vecs.up.with_label_values(&l),
            latency: vecs.latency.with_label_values(&l),
        };
        let buffer = Arc::new(Buffer::new(
            capacity,
            Some(BufferMetrics {
                buffered: metrics.buffered.clone(),
                dropped: metrics.dropped.clone(),
            }),
        ));
        Bridge {
            name: name.to_string(),
            kind,
            remote,
            filters,
            publisher: ByteString::from(format!("$bridge/{name}")),
            buffer,
            metrics,
            status: Mutex::new(Status {
                state: BridgeState::Connecting,
                last_error: None,
                last_error_at: None,
                since: SystemTime::now(),
                connects: 0,
            }),
        }
    }

    /// Records a state change; logs it once per change of state (not on every retry, nor when
    /// only the error text of the same fault changes) and sets `corvid_bridge_up`.
    pub fn set_state(&self, state: BridgeState, error: Option<String>) {
        let mut st = self.status.lock();
        // While up, a new error (an ingress subscription refused) is news of its own.
        let changed = st.state != state
            || (state == BridgeState::Up && error.is_some() && st.last_error != error);
        if !changed && error.is_some() && st.last_error != error {
            tracing::debug!(bridge = %self.name, state = ?state, error = ?error, "bridge still not connected");
        }
        if state == BridgeState::Up {
            st.connects += 1;
        }
        if changed {
            st.since = SystemTime::now();
            match (&state, &error) {
                (BridgeState::Up, _) => {
                    tracing::info!(bridge = %self.name, remote = %self.remote, "bridge connected")
                }
                (_, Some(e)) => tracing::warn!(
                    bridge = %self.name, remote = %self.remote, state = ?state, error = %e,
                    "bridge not connected; retrying with backoff"
                ),
                _ => {}
            }
        }
        st.state = state;
        if error.is_some() {
            st.last_error = error;
            st.last_error_at = Some(SystemTime::now());
        }
        self.metrics.up.set(i64::from(state == BridgeState::Up));
    }

    /// The current state.
    pub fn state(&self) -> BridgeState {
        self.status.lock().state
    }

    /// A snapshot for the admin API.
    pub fn status(&self) -> BridgeStatus {
        let st = self.status.lock().clone();
        BridgeStatus {
            name: self.name.clone(),
            kind: self.kind.to_string(),
            remote: self.remote.clone(),
            state: st.state,
            last_error: st.last_error,
            last_error_at: st.last_error_at.map(unix_secs),
            since: unix_secs(st.since),
            connects: st.connects,
            sent: self.metrics.sent.get(),
            failed: self.metrics.failed.get(),
            dropped: self.buffer.dropped(),
            received: self.metrics.received.get(),
            buffered: self.buffer.pending() as u64,
            capacity: self.buffer.capacity() as u64,
        }
    }

    /// Counts a message the remote acknowledged, with its latency.
    pub fn sent(&self, o: &Outgoing) {
        self.metrics.sent.inc();
        self.metrics.latency.observe(o.at.elapsed().as_secs_f64());
    }
}

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct MetricVecs {
    sent: prometheus::IntCounterVec,
    failed: prometheus::IntCounterVec,
    dropped: prometheus::IntCounterVec,
    received: prometheus::IntCounterVec,
    buffered: prometheus::IntGaugeVec,
    up: prometheus::IntGaugeVec,
    latency: prometheus::HistogramVec,
}

impl MetricVecs {
    fn new(m: &Metrics) -> Result<Self, prometheus::Error> {
        Ok(MetricVecs {
            sent: m.counter_vec(
                "corvid_bridge_sent_total",
                "Messages a bridge's remote acknowledged",
                "bridge",
            )?,
            failed: m.counter_vec(
                "corvid_bridge_failed_total",
                "Failed bridge attempts: connects, broken connections, rejected produce requests",
                "bridge",
            )?,
            dropped: m.counter_vec(
                "corvid_bridge_dropped_total",
                "Messages a bridge dropped because its buffer was full",
                "bridge",
            )?,
            received: m.counter_vec(
                "corvid_bridge_received_total",
                "Remote messages a bridge published here",
                "bridge",
            )?,
            buffered: m.gauge_vec(
                "corvid_bridge_buffered",
                "Messages waiting in a bridge's buffer",
                "bridge",
            )?,
            up: m.gauge_vec(
                "corvid_bridge_up",
                "1 while a bridge is connected",
                "bridge",
            )?,
            latency: m.histogram_vec(
                "corvid_bridge_latency_seconds",
                "Time from publish to the remote's acknowledgement",
                "bridge",
            )?,
        })
    }
}

/// Why the bridges could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Metrics registration failed (a bug).
    #[error("bridges metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration asks for a kind of bridge this build left out.
    #[error(transparent)]
    NotBuilt(#[from] NotBuilt),
}

/// All configured bridges; built before the broker (it is the broker's tap), started by [`start`].
#[derive(Debug, Default)]
pub struct Bridges {
    all: Vec<Arc<Bridge>>,
    config: BridgesConfig,
}

impl Bridges {
    /// Builds the bridges' buffers, metrics and status from the configuration (no I/O).
    pub fn new(config: &BridgesConfig, metrics: &Metrics) -> Result<Self, BridgeError> {
        if config.mqtt.is_empty() && config.kafka.is_empty() {
            return Ok(Bridges::default());
        }
        let mqtt = cfg!(feature = "mqtt-bridge");
        NotBuilt::check(!config.mqtt.is_empty(), mqtt, "bridges.mqtt", "mqtt-bridge")?;
        let kafka = cfg!(feature = "kafka");
        NotBuilt::check(!config.kafka.is_empty(), kafka, "bridges.kafka", "kafka")?;
        let vecs = MetricVecs::new(metrics)?;
        let mut all = Vec::new();
        for b in &config.mqtt {
            let filters = b
                .egress
                .iter()
                .enumerate()
                .map(|(i, r)| (r.local_filter.clone(), i))
                .collect();
            let remote = format!("{}:{}", b.remote.host, b.remote.port);
            all.push(Arc::new(Bridge::new(
                &b.name,
                "mqtt",
                remote,
                filters,
                b.buffer.max_messages,
                &vecs,
            )));
        }
        for k in &config.kafka {
            let filters = k.filters.iter().map(|f| (f.clone(), 0)).collect();
            let remote = format!("{} topic {}", k.bootstrap.join(","), k.topic);
            all.push(Arc::new(Bridge::new(
                &k.name,
                "kafka",
                remote,
                filters,
                k.buffer.max_messages,
                &vecs,
            )));
        }
        Ok(Bridges {
            all,
            config: config.clone(),
        })
    }

    /// Pushes `msg` into the buffer of every bridge with a matching local filter (once per
    /// matching egress rule). Never blocks. Returns how many copies were taken.
    pub fn tap(&self, msg: &Msg) -> usize {
        let mut n = 0;
        for b in &self.all {
            if msg.publisher == b.publisher {
                continue; // came in through this bridge: never send it back
            }
            let mut last_rule = None;
            for (filter, rule) in &b.filters {
                if last_rule == Some(*rule) || !topic::matches(filter, &msg.topic) {
                    continue;
                }
                last_rule = Some(*rule);
                b.buffer.push(Outgoing {
                    msg: msg.clone(),
                    rule: *rule,
                    at: Instant::now(),
                });
                n += 1;
                if b.kind == "kafka" {
                    break; // one record per message, however many filters match
                }
            }
        }
        n
    }

    /// Whether any bridge is configured.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Status of every bridge, in configuration order (MQTT first).
    pub fn status(&self) -> Vec<BridgeStatus> {
        self.all.iter().map(|b| b.status()).collect()
    }

    /// A bridge by name.
    pub fn get(&self, name: &str) -> Option<Arc<Bridge>> {
        self.all.iter().find(|b| b.name == name).cloned()
    }
}

impl crate::broker::Tap for Bridges {
    fn tap(&self, msg: &Msg) -> usize {
        Bridges::tap(self, msg)
    }
}

/// Starts one worker task per bridge; they stop when the broker shuts down.
pub fn start(broker: &Arc<Broker>, bridges: &Bridges) {
    for cfg in &bridges.config.mqtt {
        if let Some(b) = bridges.get(&cfg.name) {
            #[cfg(feature = "mqtt-bridge")]
            tokio::spawn(mqtt::run(broker.clone(), b, cfg.clone()));
            #[cfg(not(feature = "mqtt-bridge"))]
            let _ = b; // refused by `Bridges::new`
        }
    }
    for cfg in &bridges.config.kafka {
        if let Some(b) = bridges.get(&cfg.name) {
            #[cfg(feature = "kafka")]
            tokio::spawn(kafka::run(broker.clone(), b, cfg.clone()));
            #[cfg(not(feature = "kafka"))]
            let _ = b; // refused by `Bridges::new`
        }
    }
}

/// Exponential backoff with jitter: the delay before reconnect attempt `attempt` (0-based),
/// between half and all of `initial * 2^attempt`, capped at `max`.
pub fn backoff_delay(cfg: &BridgeBackoffConfig, attempt: u32) -> Duration {
    let exp = cfg
        .initial_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cfg.max_ms.max(1));
    let half = exp / 2;
    Duration::from_millis(half + fastrand::u64(0..=exp - half))
}

/// Sleeps for `d` unless the broker shuts down first; returns false on shutdown.
async fn pause(broker: &Broker, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = broker.shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration that asks for a bridge this build left out is refused with the field
    /// and the feature named, not silently ignored (runs in builds without the features).
    #[test]
    #[cfg(not(all(feature = "kafka", feature = "mqtt-bridge")))]
    fn a_bridge_left_out_of_the_build_is_refused_by_name() {
        let metrics = Metrics::new().expect("metrics");
        let mut config = BridgesConfig::default();
        let (field, feature) = if cfg!(feature = "kafka") {
            config.mqtt.push(Default::default());
            ("bridges.mqtt", "mqtt-bridge")
        } else {
            config.kafka.push(Default::default());
            ("bridges.kafka", "kafka")
        };
        let e = Bridges::new(&config, &metrics).expect_err("refused");
        assert!(
            matches!(e, BridgeError::NotBuilt(n) if n == NotBuilt { field, feature }),
            "{e}"
        );
        assert!(e.to_string().contains(field), "{e}");
    }

    #[test]
    fn backoff_grows_and_caps_with_jitter() {
        let cfg = BridgeBackoffConfig {
            initial_ms: 100,
            max_ms: 1000,
        };
        for _ in 0..50 {
            let d0 = backoff_delay(&cfg, 0).as_millis();
            assert!((50..=100).contains(&d0), "{d0}");
            let d3 = backoff_delay(&cfg, 3).as_millis();
            assert!((400..=800).contains(&d3), "{d3}");
            let d30 = backoff_delay(&cfg, 30).as_millis();
            assert!((500..=1000).contains(&d30), "{d30}");
        }
    }
}
