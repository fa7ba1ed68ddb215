//! The event store: `client.connected` / `client.disconnected` (and, on chosen topics,
//! published messages) written to PostgreSQL and Redis, so operators can ask a database
//! "which devices are online now, and since when" and keep a history of connections.
//!
//! Each configured store is a *sink* attached to the hooks machinery ([`Hooks::attach`]):
//! emitting is a `try_send` into the sink's bounded buffer and never waits, so a slow, absent
//! or misconfigured database cannot slow MQTT clients. One worker task per sink takes events
//! from the buffer in batches (`max_rows` or `linger_ms`), writes each batch in one
//! transaction (PostgreSQL) or one MULTI/EXEC pipeline (Redis), reconnects with backoff when
//! the store goes away, and keeps its batch until it is written. While the store is down the
//! buffer fills; once full, new events are dropped and counted. Everything a sink does shows
//! up in three places: a log line on every change of state, the `corvid_eventstore_*`
//! metrics, and `GET /api/v1/eventstore`.
//!
//! Writes are at least once: a batch whose commit reply was lost is written again. The
//! current-state rows (`{prefix}clients`, the Redis client hashes) are idempotent and ordered
//! by connection start time, so a replay or a late disconnect from an older connection (a
//! takeover on another node) never marks a newer connection offline.

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{EventStoreConfig, NotBuilt, StoreBatchConfig, StoreRetryConfig};
use crate::hooks::{now_ms, now_us, EventKind, Hooks, Stamped, StoreSink};
use crate::metrics::Metrics;

/// Shortest pause between two attempts; doubles up to `retry.max_backoff_ms`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Why the event store could not be set up (start-up only; runtime faults are states).
#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    /// Metrics registration failed (a bug).
    #[error("event_store metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration asks for a store this build left out.
    #[error(transparent)]
    NotBuilt(#[from] NotBuilt),
}

/// What kind of fault a store reported: decides between reconnecting and giving up a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// Cannot connect, or the connection broke: reconnect and retry without limit.
    Unreachable,
    /// The store refused our credentials: reconnect (the password file may be fixed).
    Auth,
    /// The store is reachable but rejected the batch: retried `max_attempts` times.
    Rejected,
}

/// A fault reported by a store, with a message for logs and the status API.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Fault {
    /// What kind.
    pub kind: FaultKind,
    /// The store's or driver's message.
    pub message: String,
}

impl Fault {
    pub(crate) fn new(kind: FaultKind, message: impl Into<String>) -> Self {
        Fault {
            kind,
            message: message.into(),
        }
    }
}

/// One store's connection and writes; the worker loop around it is shared.
#[async_trait::async_trait]
pub(crate) trait Backend: Send {
    /// Connects, creates the schema if needed; on the first success also marks this node's
    /// clients from an earlier run offline.
    async fn connect(&mut self) -> Result<(), Fault>;
    /// Writes one batch atomically.
    async fn write(&mut self, batch: &[Stamped]) -> Result<(), Fault>;
    /// A cheap round trip on the open connection (idle health check).
    async fn ping(&mut self) -> Result<(), Fault>;
    /// Drops the connection (after a fault).
    fn close(&mut self);
}

// A sink's state and report are the admin API's types: their names are written once there.
pub use corvid_api::{SinkReport, SinkState};

/// Maps a write fault to the state it puts the sink in.
fn state_of_fault(k: FaultKind) -> SinkState {
    match k {
        FaultKind::Unreachable => SinkState::Down,
        FaultKind::Auth => SinkState::AuthFailed,
        FaultKind::Rejected => SinkState::Error,
    }
}

#[derive(Debug)]
struct Inner {
    state: SinkState,
    since_ms: u64,
    last_error: Option<String>,
    last_error_at_ms: Option<u64>,
    last_write_at_ms: Option<u64>,
    consecutive_failures: u64,
}

/// One sink's metrics, resolved once for its label.
#[derive(Debug, Clone)]
struct SinkMetrics {
    written: IntCounter,
    failed: IntCounter,
    dropped: IntCounter,
    errors: IntCounter,
    buffered: IntGauge,
    up: IntGauge,
    latency: Histogram,
}

/// What the worker and the status API share about one sink.
#[derive(Debug)]
struct Sink {
    name: &'static str,
    target: String,
    events: Vec<String>,
    message_filters: Vec<String>,
    capacity: usize,
    tx: mpsc::Sender<Stamped>,
    in_hand: AtomicUsize,
    inner: Mutex<Inner>,
    m: SinkMetrics,
}

impl Sink {
    fn buffered(&self) -> usize {
        (self.tx.max_capacity() - self.tx.capacity()) + self.in_hand.load(Ordering::Relaxed)
    }

    fn set_up(&self) {
        self.m.up.set(1);
        let mut i = self.inner.lock();
        if i.state != SinkState::Up {
            let was = i.state;
            i.state = SinkState::Up;
            i.since_ms = now_ms();
            i.consecutive_failures = 0;
            drop(i);
            if was == SinkState::Connecting {
                tracing::info!(sink = self.name, target = %self.target, "event store connected");
            } else {
                tracing::info!(sink = self.name, target = %self.target, buffered = self.buffered(), "event store reachable again; writing buffered events");
            }
        }
    }

    fn fault(&self, f: &Fault, doing: &str) {
        self.m.errors.inc();
        let state = state_of_fault(f.kind);
        if state != SinkState::Error {
            self.m.up.set(0);
        }
        let mut i = self.inner.lock();
        i.consecutive_failures += 1;
        let n = i.consecutive_failures;
        let changed = i.state != state || i.last_error.as_deref() != Some(&f.message);
        if i.state != state {
            i.since_ms = now_ms();
        }
        i.state = state;
        i.last_error = Some(f.message.clone());
        i.last_error_at_ms = Some(now_ms());
        drop(i);
        let buffered = self.buffered();
        if changed || n.is_power_of_two() {
            match state {
                SinkState::AuthFailed => {
                    tracing::error!(sink = self.name, target = %self.target, error = %f, attempts = n, buffered, capacity = self.capacity, "event store {doing} failed: authentication refused (check the user and password file); events are buffered and retried, and dropped once the buffer is full")
                }
                SinkState::Error => {
                    tracing::warn!(sink = self.name, target = %self.target, error = %f, attempts = n, buffered, "event store {doing} rejected by the store; retrying the batch")
                }
                _ => {
                    tracing::warn!(sink = self.name, target = %self.target, error = %f, attempts = n, buffered, capacity = self.capacity, "event store {doing} failed: store unreachable; events are buffered and retried, and dropped once the buffer is full")
                }
            }
        } else {
            tracing::debug!(sink = self.name, error = %f, attempts = n, "event store {doing} failed again");
        }
    }

    fn report(&self) -> SinkReport {
        let i = self.inner.lock();
        SinkReport {
            sink: self.name.to_string(),
            target: self.target.clone(),
            state: i.state,
            since_ms: i.since_ms,
            last_error: i.last_error.clone(),
            last_error_at_ms: i.last_error_at_ms,
            last_write_at_ms: i.last_write_at_ms,
            written: self.m.written.get(),
            failed: self.m.failed.get(),
            dropped: self.m.dropped.get(),
            buffered: self.buffered() as u64,
            buffer_capacity: self.capacity as u64,
            events: self.events.clone(),
            message_filters: self.message_filters.clone(),
        }
    }
}

type Spawn = Box<dyn FnOnce(CancellationToken) -> JoinHandle<()> + Send>;

/// The configured sinks: attached to the hooks at construction, workers started by
/// [`EventStore::start`] and flushed by [`EventStore::finish`].
pub struct EventStore {
    sinks: Vec<Arc<Sink>>,
    pending: Mutex<Vec<Spawn>>,
    running: Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("sinks", &self.sinks)
            .finish_non_exhaustive()
    }
}

/// The kinds a sink takes: its client events, plus `message.publish` when it has filters.
fn kinds(events: &[String], filters: &[String]) -> Vec<EventKind> {
    let mut k: Vec<EventKind> = events
        .iter()
        .filter_map(|e| EventKind::from_name(e))
        .collect();
    if !filters.is_empty() {
        k.push(EventKind::MessagePublish);
    }
    k
}

impl EventStore {
    /// Builds the configured sinks and attaches them to `hooks`. `started_us` is the broker's
    /// start time: rows this node left online before it are marked offline on first connect.
    pub fn new(
        cfg: &EventStoreConfig,
        node: &str,
        started_us: u64,
        metrics: &Metrics,
        hooks: &mut Hooks,
    ) -> Result<Self, EventStoreError> {
        let mut store = EventStore {
            sinks: Vec::new(),
            pending: Mutex::new(Vec::new()),
            running: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        };
        if cfg.postgres.is_none() && cfg.redis.is_none() {
            return Ok(store);
        }
        let postgres = cfg!(feature = "postgres");
        NotBuilt::check(
            cfg.postgres.is_some(),
            postgres,
            "event_store.postgres",
            "postgres",
        )?;
        let redis = cfg!(feature = "redis");
        NotBuilt::check(cfg.redis.is_some(), redis, "event_store.redis", "redis")?;
        let label = "sink";
        let written = metrics.counter_vec(
            "corvid_eventstore_written_total",
            "Events written to the event store",
            label,
        )?;
        let failed = metrics.counter_vec(
            "corvid_eventstore_failed_total",
            "Events given up after the store rejected their batch retry.max_attempts times",
            label,
        )?;
        let dropped = metrics.counter_vec(
            "corvid_eventstore_dropped_total",
            "Events dropped because the sink's buffer was full (store slow or down)",
            label,
        )?;
        let errors = metrics.counter_vec(
            "corvid_eventstore_errors_total",
            "Failed connection or write attempts",
            label,
        )?;
        let buffered = metrics.gauge_vec(
            "corvid_eventstore_buffered",
            "Events waiting to be written",
            label,
        )?;
        let up = metrics.gauge_vec(
            "corvid_eventstore_up",
            "1 while the sink is connected and writing, 0 while the store is unreachable or refuses the credentials",
            label,
        )?;
        let latency = metrics.histogram_vec(
            "corvid_eventstore_latency_seconds",
            "Time from an event to its commit in the store",
            label,
        )?;
        let sink_metrics = |name: &str| SinkMetrics {
            written: written.with_label_values(&[name]),
            failed: failed.with_label_values(&[name]),
            dropped: dropped.with_label_values(&[name]),
            errors: errors.with_label_values(&[name]),
            buffered: buffered.with_label_values(&[name]),
            up: up.with_label_values(&[name]),
            latency: latency.with_label_values(&[name]),
        };
        // The sinks' configs are different types with the same common fields.
        macro_rules! add_sink {
            ($name:literal, $c:expr, $backend:expr) => {{
                let (c, backend) = ($c, $backend);
                store.add(
                    $name,
                    backend.target(),
                    &c.events,
                    &c.message_filters,
                    c.buffer.max_events,
                    c.batch.clone(),
                    c.retry.clone(),
                    sink_metrics($name),
                    hooks,
                    backend,
                );
            }};
        }
        #[cfg(feature = "postgres")]
        if let Some(p) = &cfg.postgres {
            add_sink!("postgres", p, postgres::Postgres::new(p, node, started_us));
        }
        #[cfg(feature = "redis")]
        if let Some(r) = &cfg.redis {
            add_sink!("redis", r, redis::Redis::new(r, node, started_us));
        }
        #[cfg(not(all(feature = "postgres", feature = "redis")))]
        let _ = (node, started_us, &sink_metrics, &mut *hooks);
        Ok(store)
    }

    #[allow(clippy::too_many_arguments)] // one call per store kind, all fields named above
    fn add<B: Backend + 'static>(
        &mut self,
        name: &'static str,
        target: String,
        events: &[String],
        filters: &[String],
        capacity: usize,
        batch: StoreBatchConfig,
        retry: StoreRetryConfig,
        m: SinkMetrics,
        hooks: &mut Hooks,
        backend: B,
    ) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        m.up.set(0);
        hooks.attach(StoreSink {
            name: name.to_string(),
            kinds: kinds(events, filters),
            topics: filters.to_vec(),
            tx: tx.clone(),
            dropped: m.dropped.clone(),
        });
        let sink = Arc::new(Sink {
            name,
            target,
            events: events.to_vec(),
            message_filters: filters.to_vec(),
            capacity,
            tx,
            in_hand: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                state: SinkState::Connecting,
                since_ms: now_ms(),
                last_error: None,
                last_error_at_ms: None,
                last_write_at_ms: None,
                consecutive_failures: 0,
            }),
            m,
        });
        self.sinks.push(sink.clone());
        let worker = Worker {
            backend,
            rx,
            sink,
            batch,
            retry,
        };
        self.pending
            .lock()
            .push(Box::new(move |stop| tokio::spawn(worker.run(stop))));
    }

    /// Whether any sink is configured.
    pub fn enabled(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// Starts the workers (needs a tokio runtime).
    pub fn start(&self) {
        let spawns: Vec<Spawn> = self.pending.lock().drain(..).collect();
        let mut running = self.running.lock();
        for s in spawns {
            running.push(s(self.stop.clone()));
        }
    }

    /// Asks the workers to write what they hold (one attempt each, within `deadline`) and
    /// stop; what is left is counted as dropped. Call after clients are disconnected, so
    /// their `client.disconnected` events are in the buffers.
    pub async fn finish(&self, deadline: Duration) {
        self.stop.cancel();
        let handles: Vec<JoinHandle<()>> = self.running.lock().drain(..).collect();
        let until = tokio::time::Instant::now() + deadline;
        for mut h in handles {
            if tokio::time::timeout_at(until, &mut h).await.is_err() {
                h.abort();
            }
        }
    }

    /// Refreshes the `corvid_eventstore_buffered` gauges (at scrape time).
    pub fn refresh_gauges(&self) {
        for s in &self.sinks {
            s.m.buffered
                .set(i64::try_from(s.buffered()).unwrap_or(i64::MAX));
        }
    }

    /// The sinks' states, for `GET /api/v1/eventstore`.
    pub fn report(&self) -> Vec<SinkReport> {
        self.sinks.iter().map(|s| s.report()).collect()
    }
}

/// One sink's worker: batches from the buffer, writes, reconnects, retries.
struct Worker<B> {
    backend: B,
    rx: mpsc::Receiver<Stamped>,
    sink: Arc<Sink>,
    batch: StoreBatchConfig,
    retry: StoreRetryConfig,
}

impl<B: Backend> Worker<B> {
    async fn run(mut self, stop: CancellationToken) {
        let max_backoff = Duration::from_millis(self.retry.max_backoff_ms).max(MIN_BACKOFF);
        let linger = Duration::from_millis(self.batch.linger_ms);
        let max_rows = self.batch.max_rows.max(1);
        let mut backoff = MIN_BACKOFF;
        let mut connected = false;
        let mut batch: Vec<Stamped> = Vec::with_capacity(max_rows);
        let mut rejected = 0u32;
        loop {
            if stop.is_cancelled() {
                return self.flush_on_stop(batch, connected, max_rows).await;
            }
            if !connected {
                let timeout = Duration::from_millis(self.retry.timeout_ms.max(1));
                let attempt = tokio::time::timeout(timeout * 2, self.backend.connect())
                    .await
                    .unwrap_or_else(|_| {
                        Err(Fault::new(
                            FaultKind::Unreachable,
                            format!("connect timed out after {} ms", (timeout * 2).as_millis()),
                        ))
                    });
                match attempt {
                    Ok(()) => {
                        connected = true;
                        backoff = MIN_BACKOFF;
                        self.sink.set_up();
                    }
                    Err(f) => {
                        self.sink.fault(&f, "connect");
                        pause(&stop, &mut backoff, max_backoff).await;
                        continue;
                    }
                }
            }
            // A batch kept from a failed attempt goes again as it is; a new one waits up to
            // `linger` for more events.
            if batch.is_empty() {
                tokio::select! {
                    ev = self.rx.recv() => match ev {
                        Some(ev) => batch.push(ev),
                        None => return,
                    },
                    _ = stop.cancelled() => continue,
                    // An idle sink checks its store now and then, so the status and
                    // `corvid_eventstore_up` show an outage before the next event does.
                    _ = tokio::time::sleep(Duration::from_millis(self.retry.health_check_ms.max(100))) => {
                        let timeout = Duration::from_millis(self.retry.timeout_ms.max(1));
                        let ping = tokio::time::timeout(timeout, self.backend.ping())
                            .await
                            .unwrap_or_else(|_| Err(Fault::new(FaultKind::Unreachable, "health check timed out")));
                        if let Err(f) = ping {
                            connected = false;
                            self.backend.close();
                            self.sink.fault(&f, "health check");
                        }
                        continue;
                    }
                }
                let until = tokio::time::Instant::now() + linger;
                while batch.len() < max_rows {
                    match self.rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => {
                            tokio::select! {
                                ev = self.rx.recv() => match ev {
                                    Some(ev) => batch.push(ev),
                                    None => break,
                                },
                                _ = tokio::time::sleep_until(until) => break,
                                _ = stop.cancelled() => break,
                            }
                        }
                    }
                }
            }
            self.sink.in_hand.store(batch.len(), Ordering::Relaxed);
            match self.write(&batch).await {
                Ok(()) => {
                    batch.clear();
                    rejected = 0;
                    backoff = MIN_BACKOFF;
                }
                Err(f) if f.kind == FaultKind::Rejected => {
                    rejected += 1;
                    self.sink.fault(&f, "write");
                    if rejected >= self.retry.max_attempts {
                        let n = batch.len() as u64;
                        self.sink.m.failed.inc_by(n);
                        tracing::error!(sink = self.sink.name, events = n, attempts = rejected, error = %f, "event store gave up a batch the store keeps rejecting; events lost");
                        batch.clear();
                        rejected = 0;
                    } else {
                        pause(&stop, &mut backoff, max_backoff).await;
                    }
                }
                Err(f) => {
                    connected = false;
                    self.backend.close();
                    self.sink.fault(&f, "write");
                    pause(&stop, &mut backoff, max_backoff).await;
                }
            }
            self.sink.in_hand.store(batch.len(), Ordering::Relaxed);
        }
    }

    /// Writes one batch with the timeout and, on success, counts it.
    async fn write(&mut self, batch: &[Stamped]) -> Result<(), Fault> {
        let timeout = Duration::from_millis(self.retry.timeout_ms.max(1));
        match tokio::time::timeout(timeout, self.backend.write(batch)).await {
            Ok(Ok(())) => {
                let now = now_us();
                self.sink.m.written.inc_by(batch.len() as u64);
                for ev in batch {
                    self.sink
                        .m
                        .latency
                        .observe(now.saturating_sub(ev.at_us) as f64 / 1e6);
                }
                {
                    let mut i = self.sink.inner.lock();
                    i.last_write_at_ms = Some(now / 1000);
                }
                self.sink.set_up();
                Ok(())
            }
            Ok(Err(f)) => Err(f),
            Err(_) => Err(Fault::new(
                FaultKind::Unreachable,
                format!("write timed out after {} ms", timeout.as_millis()),
            )),
        }
    }

    /// At shutdown: one attempt at writing what is held and buffered, then count the rest.
    async fn flush_on_stop(mut self, mut batch: Vec<Stamped>, connected: bool, max_rows: usize) {
        while let Ok(ev) = self.rx.try_recv() {
            batch.push(ev);
        }
        if batch.is_empty() {
            return;
        }
        let mut written = 0usize;
        if connected {
            for chunk in batch.chunks(max_rows) {
                if self.write(chunk).await.is_err() {
                    break;
                }
                written += chunk.len();
            }
        }
        // Events emitted while we were writing (the last connections closing).
        let mut late = Vec::new();
        while let Ok(ev) = self.rx.try_recv() {
            late.push(ev);
        }
        if connected
            && written == batch.len()
            && !late.is_empty()
            && self.write(&late).await.is_ok()
        {
            late.clear();
        }
        let lost = batch.len() - written + late.len();
        self.sink.in_hand.store(0, Ordering::Relaxed);
        if lost > 0 {
            self.sink.m.dropped.inc_by(lost as u64);
            tracing::warn!(
                sink = self.sink.name,
                events = lost,
                "event store could not write these events before shutdown; dropped"
            );
        }
    }
}

/// Waits `backoff` (or until stopped) and doubles it.
async fn pause(stop: &CancellationToken, backoff: &mut Duration, max: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = stop.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(max);
}

/// Password from a mounted Secret file, trailing newline removed.
pub(crate) fn read_password(path: &std::path::Path) -> Result<String, Fault> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| {
            Fault::new(
                FaultKind::Auth,
                format!("cannot read password_file {}: {e}", path.display()),
            )
        })
}

/// Protocol label (`3.1.1`) to the protocol level stored in the databases (4).
pub(crate) fn protocol_level(label: &str) -> Option<i32> {
    match label {
        "3.1" => Some(3),
        "3.1.1" => Some(4),
        "5.0" => Some(5),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration that asks for a store this build left out is refused with the field
    /// and the feature named (runs in builds without the features).
    #[test]
    #[cfg(not(all(feature = "postgres", feature = "redis")))]
    fn a_store_left_out_of_the_build_is_refused_by_name() {
        let metrics = Metrics::new().expect("metrics");
        let mut hooks = Hooks::new(&[], "n", &metrics).expect("hooks");
        let mut config = EventStoreConfig::default();
        let (field, feature) = if cfg!(feature = "postgres") {
            config.redis = Some(Default::default());
            ("event_store.redis", "redis")
        } else {
            config.postgres = Some(Default::default());
            ("event_store.postgres", "postgres")
        };
        let e = EventStore::new(&config, "n", 0, &metrics, &mut hooks).expect_err("refused");
        assert!(
            matches!(e, EventStoreError::NotBuilt(n) if n == NotBuilt { field, feature }),
            "{e}"
        );
    }

    #[test]
    fn kinds_add_publish_only_with_filters() {
        let ev = vec!["client.connected".to_string()];
        assert_eq!(kinds(&ev, &[]), vec![EventKind::ClientConnected]);
        assert_eq!(
            kinds(&ev, &["a/#".to_string()]),
            vec![EventKind::ClientConnected, EventKind::MessagePublish]
        );
    }

    #[test]
    fn protocol_levels() {
        assert_eq!(protocol_level("3.1.1"), Some(4));
        assert_eq!(protocol_level("5.0"), Some(5));
        assert_eq!(protocol_level("x"), None);
    }
}
