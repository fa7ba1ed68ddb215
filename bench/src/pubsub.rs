//! The pub-sub benchmark: subscribers connect and subscribe first, then publishers send on an
//! open-loop schedule (or as fast as a bounded window allows), and every delivery is checked for
//! latency, loss and duplication at the subscriber that received it.
//!
//! Phases, all driven by [`run`]: connect subscribers → connect publishers → broadcast one start
//! time → warm-up → measured window → drain (until every expected delivery arrived or the drain
//! timeout) → disconnect everyone → merge per-task results into one [`PubSubReport`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use corvid_testkit::ClientError;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::sleep_until;
use tracing::{debug, info, warn};

use crate::accounting::{DeliveryTotals, Ledger, Observation};
use crate::connection::Connection;
use crate::error::{BenchError, Result};
use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::pacer::{PacePlan, Pacer};
use crate::payload::{self, PayloadBuilder, Stamp};
use crate::wire::{Incoming, Protocol, QoS};

/// Most messages a publisher encodes before writing and looking at its socket again.
const MAX_BATCH: u64 = 256;
/// With no delivery progress for this long, the end-to-end window assumes the rest was lost.
const STALL_FORGIVE: Duration = Duration::from_secs(1);
/// Read buffer growth step for publishers and subscribers.
const READ_CHUNK: usize = 16 * 1024;
/// A message this close to its due time is sent now: the pacer's float arithmetic may wake a
/// publisher a few nanoseconds before the publisher's own computation says "due".
const DUE_SLACK_NS: u64 = 5_000;

/// Who publishes to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// N publishers on their own topics, M subscribers on a wildcard over all of them.
    FanIn,
    /// N publishers on one shared topic, M subscribers on that topic.
    FanOut,
    /// Publisher i talks to subscriber i on a private topic; needs N == M.
    P2p,
}

/// Everything a pub-sub run needs.
#[derive(Debug, Clone)]
pub struct PubSubConfig {
    /// Broker address, `host:port`.
    pub addr: String,
    /// Address the subscribers connect to instead of `addr` (another node of a cluster).
    pub sub_addr: Option<String>,
    /// MQTT protocol version for every connection.
    pub protocol: Protocol,
    /// Topic layout.
    pub scenario: Scenario,
    /// Number of publishing connections.
    pub publishers: usize,
    /// Number of subscribing connections.
    pub subscribers: usize,
    /// QoS for publishes and subscriptions.
    pub qos: QoS,
    /// Payload size in bytes (at least the 28-byte header).
    pub payload: usize,
    /// Total offered rate in messages/s over all publishers; 0 = as fast as the window allows.
    pub rate: f64,
    /// Length of the measured window.
    pub duration: Duration,
    /// Sending before the measured window, excluded from rates and latency.
    pub warmup: Duration,
    /// Longest wait after sending for outstanding deliveries.
    pub drain: Duration,
    /// Topic prefix; a per-run id is appended so concurrent runs never cross.
    pub topic_prefix: String,
    /// Unacknowledged QoS 1/2 publishes allowed per publisher.
    pub inflight: usize,
    /// With `rate == 0`: messages allowed in flight end to end, per publisher.
    pub window: usize,
    /// Handshakes allowed at the same time.
    pub connect_concurrency: usize,
    /// MQTT keep-alive in seconds.
    pub keep_alive: u16,
    /// Limit for each handshake step.
    pub connect_timeout: Duration,
    /// Subscribers keep their sessions (3.1.1 clean session 0; 5.0 clean start 0 with an
    /// hour's session expiry), so a broker with durable sessions stores what it queues for
    /// them before acknowledging.
    pub persistent_subscribers: bool,
}

/// The result of one pub-sub run, printed as a table or as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct PubSubReport {
    /// Topic layout.
    pub scenario: Scenario,
    /// MQTT protocol level (4 or 5).
    pub protocol: u8,
    /// QoS used.
    pub qos: u8,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// Publishing connections requested.
    pub publishers: usize,
    /// Subscribing connections requested.
    pub subscribers: usize,
    /// Offered rate in msg/s (0 = unthrottled, bounded window).
    pub target_rate: f64,
    /// Measured window in seconds.
    pub duration_s: f64,
    /// Warm-up in seconds.
    pub warmup_s: f64,
    /// Connections that failed to connect or subscribe.
    pub connect_errors: u64,
    /// Connections that failed after the start.
    pub run_errors: u64,
    /// Messages published over the whole run (warm-up included).
    pub sent: u64,
    /// Deliveries the sent messages should have produced.
    pub expected: u64,
    /// Distinct deliveries received.
    pub delivered: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Repeated deliveries.
    pub duplicates: u64,
    /// Deliveries whose payload was not produced by this run.
    pub foreign: u64,
    /// Messages scheduled inside the measured window.
    pub sent_in_window: u64,
    /// Distinct deliveries received inside the measured window.
    pub delivered_in_window: u64,
    /// `sent_in_window / duration`.
    pub sent_per_sec: f64,
    /// `delivered_in_window / duration`: the broker's delivered throughput.
    pub delivered_per_sec: f64,
    /// Latency from the scheduled send time (coordinated-omission free), measured window only.
    pub latency: LatencySummary,
    /// Latency from the moment the publisher actually encoded the message.
    pub latency_from_send: LatencySummary,
    /// Wall time of the whole run including connect and drain, in seconds.
    pub wall_s: f64,
}

/// Start time and window, broadcast once every connection is ready (ns since the run's epoch).
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start_ns: u64,
    measure_from_ns: u64,
    end_ns: u64,
    /// End-to-end in-flight limit in deliveries (only used when `rate == 0`).
    window_deliveries: u64,
}

/// Counters every task can see; updated once per batch, not per message.
#[derive(Debug)]
struct Shared {
    epoch: Instant,
    expected_total: AtomicU64,
    delivered_total: AtomicU64,
    forgiven: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant_at(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + Duration::from_nanos(ns))
    }

    /// Deliveries produced but not yet seen (minus those written off as lost).
    fn in_flight(&self) -> u64 {
        let expected = self.expected_total.load(Ordering::Relaxed);
        let done =
            self.delivered_total.load(Ordering::Relaxed) + self.forgiven.load(Ordering::Relaxed);
        expected.saturating_sub(done)
    }
}

/// Topics and filters for a scenario.
#[derive(Debug, Clone)]
pub struct TopicPlan {
    /// Topic each publisher sends to.
    pub publish_topics: Vec<ByteString>,
    /// Filter each subscriber subscribes to.
    pub subscribe_filters: Vec<String>,
    scenario: Scenario,
}

impl TopicPlan {
    /// Lays out topics for `publishers` × `subscribers` under `prefix`.
    pub fn new(
        scenario: Scenario,
        prefix: &str,
        publishers: usize,
        subscribers: usize,
    ) -> Result<Self> {
        if publishers == 0 {
            return Err(BenchError::Config(
                "at least one publisher is needed".into(),
            ));
        }
        let (publish_topics, subscribe_filters) = match scenario {
            Scenario::FanIn => (
                (0..publishers)
                    .map(|i| ByteString::from(format!("{prefix}/fanin/{i}")))
                    .collect(),
                vec![format!("{prefix}/fanin/+"); subscribers],
            ),
            Scenario::FanOut => (
                vec![ByteString::from(format!("{prefix}/fanout")); publishers],
                vec![format!("{prefix}/fanout"); subscribers],
            ),
            Scenario::P2p => {
                if publishers != subscribers {
                    return Err(BenchError::Config(format!(
                        "p2p pairs publisher i with subscriber i: --publishers ({publishers}) must equal --subscribers ({subscribers})"
                    )));
                }
                let topics: Vec<String> = (0..publishers)
                    .map(|i| format!("{prefix}/p2p/{i}"))
                    .collect();
                (
                    topics
                        .iter()
                        .map(|t| ByteString::from(t.as_str()))
                        .collect(),
                    topics,
                )
            }
        };
        Ok(TopicPlan {
            publish_topics,
            subscribe_filters,
            scenario,
        })
    }

    /// Whether subscriber `sub` receives what publisher `publisher` sends.
    pub fn reaches(&self, publisher: usize, sub: usize) -> bool {
        match self.scenario {
            Scenario::FanIn | Scenario::FanOut => true,
            Scenario::P2p => publisher == sub,
        }
    }
}

/// What a publisher task reports back.
#[derive(Debug, Default)]
struct PublisherOutcome {
    connected: bool,
    sent: u64,
    sent_in_window: u64,
    error: Option<String>,
}

/// What a subscriber task reports back.
#[derive(Debug)]
struct SubscriberOutcome {
    connected: bool,
    ledger: Ledger,
    latency: LatencyHistogram,
    latency_from_send: LatencyHistogram,
    delivered_in_window: u64,
    foreign: u64,
    error: Option<String>,
}

/// Packet-id allocation for unacknowledged QoS 1/2 publishes.
#[derive(Debug)]
struct PacketIds {
    in_use: Vec<bool>,
    next: u16,
    count: usize,
    limit: usize,
}

impl PacketIds {
    fn new(limit: usize) -> Self {
        PacketIds {
            in_use: vec![false; 65_536],
            next: 1,
            count: 0,
            limit: limit.clamp(1, 65_535),
        }
    }

    fn has_room(&self) -> bool {
        self.count < self.limit
    }

    fn allocate(&mut self) -> Option<std::num::NonZeroU16> {
        if !self.has_room() {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if self.next == u16::MAX {
                1
            } else {
                self.next + 1
            };
            if !self.in_use[usize::from(id)] {
                self.in_use[usize::from(id)] = true;
                self.count += 1;
                return std::num::NonZeroU16::new(id);
            }
        }
    }

    fn release(&mut self, id: std::num::NonZeroU16) {
        let slot = &mut self.in_use[usize::from(id.get())];
        if *slot {
            *slot = false;
            self.count -= 1;
        }
    }
}

/// A short id unique enough to keep concurrent runs' client ids and topics apart.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:x}{:05x}", std::process::id(), nanos & 0xF_FFFF)
}

/// Runs one pub-sub benchmark end to end.
pub async fn run(cfg: PubSubConfig) -> Result<PubSubReport> {
    let wall = Instant::now();
    let id = run_id();
    let prefix = format!("{}/{}", cfg.topic_prefix.trim_end_matches('/'), id);
    let plan = TopicPlan::new(cfg.scenario, &prefix, cfg.publishers, cfg.subscribers)?;
    let qos_level = cfg.qos.value();
    if qos_level > 0 && cfg.inflight == 0 {
        return Err(BenchError::Config(
            "--inflight must be at least 1 for QoS 1/2".into(),
        ));
    }
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        expected_total: AtomicU64::new(0),
        delivered_total: AtomicU64::new(0),
        forgiven: AtomicU64::new(0),
    });
    let gate = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
    let (sched_tx, sched_rx) = watch::channel::<Option<Schedule>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Big histograms are ~8x bigger; with many subscribers 2 significant digits (1 %) is enough.
    let sigfig = if cfg.subscribers > 64 { 2 } else { 3 };

    // Phase 1: subscribers.
    let (ready_tx, mut ready_rx) = mpsc::channel::<(usize, bool)>(cfg.subscribers.max(1));
    let mut sub_handles = Vec::with_capacity(cfg.subscribers);
    for (idx, filter) in plan.subscribe_filters.iter().enumerate() {
        let task = SubscriberTask {
            idx,
            client_id: format!("cb-{id}-s{idx}"),
            filter: filter.clone(),
            cfg: cfg.clone(),
            shared: shared.clone(),
            gate: gate.clone(),
            ready: ready_tx.clone(),
            sched: sched_rx.clone(),
            stop: stop_rx.clone(),
            latency: LatencyHistogram::new(sigfig)?,
            latency_from_send: LatencyHistogram::new(sigfig)?,
        };
        sub_handles.push(tokio::spawn(task.run()));
    }
    drop(ready_tx);
    // Tasks keep their sender until they end, so count answers instead of waiting for `None`.
    let mut subscribed = vec![false; cfg.subscribers];
    for _ in 0..cfg.subscribers {
        match ready_rx.recv().await {
            Some((idx, ok)) => subscribed[idx] = ok,
            None => break,
        }
    }
    let sub_ok = subscribed.iter().filter(|ok| **ok).count();
    info!(
        subscribed = sub_ok,
        requested = cfg.subscribers,
        "subscribers ready"
    );

    // Phase 2: publishers, each told how many subscribers its messages reach.
    let (ready_tx, mut ready_rx) = mpsc::channel::<(usize, bool)>(cfg.publishers.max(1));
    let mut pub_handles = Vec::with_capacity(cfg.publishers);
    let mut reach_total = 0u64;
    let open_loop = cfg.rate > 0.0;
    let wakers: Vec<Arc<tokio::sync::Notify>> = (0..cfg.publishers)
        .map(|_| Arc::new(tokio::sync::Notify::new()))
        .collect();
    for (idx, topic) in plan.publish_topics.iter().enumerate() {
        let reach = (0..cfg.subscribers)
            .filter(|s| subscribed[*s] && plan.reaches(idx, *s))
            .count() as u64;
        reach_total += reach;
        let task = PublisherTask {
            idx,
            client_id: format!("cb-{id}-p{idx}"),
            topic: topic.clone(),
            reach,
            cfg: cfg.clone(),
            shared: shared.clone(),
            gate: gate.clone(),
            ready: ready_tx.clone(),
            sched: sched_rx.clone(),
            pace: open_loop.then(|| wakers[idx].clone()),
        };
        pub_handles.push(tokio::spawn(task.run()));
    }
    drop(ready_tx);
    let mut pub_ok = 0usize;
    for _ in 0..cfg.publishers {
        match ready_rx.recv().await {
            Some((_, ok)) => pub_ok += usize::from(ok),
            None => break,
        }
    }
    info!(
        connected = pub_ok,
        requested = cfg.publishers,
        "publishers ready"
    );

    // Phase 3: one start time for everybody, a little in the future so all tasks are waiting.
    let start_ns = shared.now_ns() + 20_000_000;
    let measure_from_ns = start_ns + dur_ns(cfg.warmup);
    let schedule = Schedule {
        start_ns,
        measure_from_ns,
        end_ns: measure_from_ns + dur_ns(cfg.duration),
        window_deliveries: (cfg.window as u64).max(1) * reach_total.max(1),
    };
    // Receivers only disappear if every task already ended, in which case nobody needs it.
    let _ = sched_tx.send(Some(schedule));
    let pacer = if open_loop {
        let plan = PacePlan {
            epoch: shared.epoch,
            start_ns,
            end_ns: schedule.end_ns,
            rate: cfg.rate,
        };
        Pacer::start(plan, wakers)
            .map_err(|e| warn!(error = %e, "no pacer thread; falling back to millisecond timers"))
            .ok()
    } else {
        None
    };

    let mut pubs = Vec::with_capacity(pub_handles.len());
    for h in pub_handles {
        pubs.push(h.await.unwrap_or_else(|e| PublisherOutcome {
            error: Some(e.to_string()),
            ..Default::default()
        }));
    }
    // Joins the pacer thread; every publisher has finished its schedule.
    drop(pacer);

    // Phase 4: drain until every expected delivery arrived, or give up after `drain`.
    let drain_deadline = Instant::now() + cfg.drain;
    while Instant::now() < drain_deadline {
        let expected = shared.expected_total.load(Ordering::Relaxed);
        if shared.delivered_total.load(Ordering::Relaxed) >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let mut subs = Vec::with_capacity(sub_handles.len());
    for h in sub_handles {
        match h.await {
            Ok(outcome) => subs.push(outcome),
            Err(e) => warn!(error = %e, "subscriber task failed"),
        }
    }

    Ok(summarise(
        &cfg,
        &pubs,
        &subs,
        shared.expected_total.load(Ordering::Relaxed),
        wall.elapsed(),
        sigfig,
    ))
}

/// Says which sequence ranges each subscriber missed (at `warn`, only when something was lost),
/// so a broker bug shows its shape: a burst mid-run, the tail of a stream, one subscriber only.
fn log_gaps(cfg: &PubSubConfig, pubs: &[PublisherOutcome], subs: &[SubscriberOutcome]) {
    let Ok(plan) = TopicPlan::new(cfg.scenario, "", cfg.publishers, cfg.subscribers) else {
        return;
    };
    let mut reported = 0;
    for (s, sub) in subs.iter().enumerate().filter(|(_, s)| s.connected) {
        for (p, publ) in pubs.iter().enumerate().filter(|(p, _)| plan.reaches(*p, s)) {
            let gaps = sub
                .ledger
                .stream(p as u32)
                .map(|st| st.gaps(publ.sent))
                .unwrap_or_else(|| vec![(0, publ.sent)]);
            if gaps.is_empty() || reported >= 20 {
                continue;
            }
            reported += 1;
            let missing: u64 = gaps.iter().map(|(a, b)| b - a).sum();
            let shown: Vec<String> = gaps
                .iter()
                .take(5)
                .map(|(a, b)| format!("{a}..{b}"))
                .collect();
            warn!(subscriber = s, publisher = p, sent = publ.sent, missing, gaps = %shown.join(","), "lost messages");
        }
    }
}

fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 4)
}

fn summarise(
    cfg: &PubSubConfig,
    pubs: &[PublisherOutcome],
    subs: &[SubscriberOutcome],
    expected: u64,
    wall: Duration,
    sigfig: u8,
) -> PubSubReport {
    let totals = DeliveryTotals::from_ledgers(expected, subs.iter().map(|s| &s.ledger));
    if totals.lost > 0 {
        log_gaps(cfg, pubs, subs);
    }
    let mut latency = LatencyHistogram::new(sigfig).ok();
    let mut latency_from_send = LatencyHistogram::new(sigfig).ok();
    for s in subs {
        if let Some(h) = latency.as_mut() {
            h.merge(&s.latency);
        }
        if let Some(h) = latency_from_send.as_mut() {
            h.merge(&s.latency_from_send);
        }
    }
    let connect_errors =
        pubs.iter().filter(|p| !p.connected).count() + subs.iter().filter(|s| !s.connected).count();
    let run_errors = pubs
        .iter()
        .filter(|p| p.connected && p.error.is_some())
        .count()
        + subs
            .iter()
            .filter(|s| s.connected && s.error.is_some())
            .count();
    let secs = cfg.duration.as_secs_f64().max(1e-9);
    let sent_in_window: u64 = pubs.iter().map(|p| p.sent_in_window).sum();
    let delivered_in_window: u64 = subs.iter().map(|s| s.delivered_in_window).sum();
    PubSubReport {
        scenario: cfg.scenario,
        protocol: match cfg.protocol {
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        },
        qos: cfg.qos.value(),
        payload_bytes: cfg.payload.max(payload::HEADER_LEN),
        publishers: cfg.publishers,
        subscribers: cfg.subscribers,
        target_rate: cfg.rate,
        duration_s: cfg.duration.as_secs_f64(),
        warmup_s: cfg.warmup.as_secs_f64(),
        connect_errors: connect_errors as u64,
        run_errors: run_errors as u64,
        sent: pubs.iter().map(|p| p.sent).sum(),
        expected: totals.expected,
        delivered: totals.delivered,
        lost: totals.lost,
        duplicates: totals.duplicates,
        foreign: subs.iter().map(|s| s.foreign + s.ledger.invalid()).sum(),
        sent_in_window,
        delivered_in_window,
        sent_per_sec: sent_in_window as f64 / secs,
        delivered_per_sec: delivered_in_window as f64 / secs,
        latency: latency.map(|h| h.summary()).unwrap_or_default(),
        latency_from_send: latency_from_send.map(|h| h.summary()).unwrap_or_default(),
        wall_s: wall.as_secs_f64(),
    }
}

/// Waits for the broadcast start schedule; `None` if the run was abandoned.
async fn wait_schedule(rx: &mut watch::Receiver<Option<Schedule>>) -> Option<Schedule> {
    match rx.wait_for(Option::is_some).await {
        Ok(s) => *s,
        Err(_) => None,
    }
}

/// Resolves once the stop flag is set (or its sender is gone); returns nothing borrowed, so
/// the future stays `Send` inside `select!`.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// One publishing connection.
struct PublisherTask {
    idx: usize,
    client_id: String,
    topic: ByteString,
    /// Subscribers each of this publisher's messages should reach.
    reach: u64,
    cfg: Arc<PubSubConfig>,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    ready: mpsc::Sender<(usize, bool)>,
    sched: watch::Receiver<Option<Schedule>>,
    /// Woken by the pacer thread when this publisher's next message is due (open loop only).
    pace: Option<Arc<tokio::sync::Notify>>,
}

impl PublisherTask {
    async fn run(mut self) -> PublisherOutcome {
        let mut out = PublisherOutcome::default();
        let conn = {
            let _permit = self.gate.acquire().await;
            Connection::open(
                &self.cfg.addr,
                self.cfg.protocol,
                &self.client_id,
                self.cfg.keep_alive,
                READ_CHUNK,
                self.cfg.connect_timeout,
            )
            .await
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(publisher = self.idx, error = %e, "publisher failed to connect");
                let _ = self.ready.send((self.idx, false)).await;
                out.error = Some(e.to_string());
                return out;
            }
        };
        out.connected = true;
        let _ = self.ready.send((self.idx, true)).await;
        let Some(schedule) = wait_schedule(&mut self.sched).await else {
            conn.close().await;
            return out;
        };
        if let Err(e) = self.publish_loop(&mut conn, schedule, &mut out).await {
            warn!(publisher = self.idx, error = %e, "publisher stopped early");
            out.error = Some(e.to_string());
            return out;
        }
        conn.close().await;
        out
    }

    async fn publish_loop(
        &self,
        conn: &mut Connection,
        s: Schedule,
        out: &mut PublisherOutcome,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let open_loop = cfg.rate > 0.0;
        let publishers = cfg.publishers.max(1) as f64;
        // Spread the publishers' schedules evenly instead of all firing on the same tick.
        let interval_ns = if open_loop {
            1e9 * publishers / cfg.rate
        } else {
            0.0
        };
        let offset_ns = interval_ns * self.idx as f64 / publishers;
        let due_at = |seq: u64| s.start_ns + (offset_ns + interval_ns * seq as f64) as u64;
        let builder = PayloadBuilder::new(cfg.payload);
        let mut ids = PacketIds::new(if cfg.qos == QoS::AtMostOnce {
            65_535
        } else {
            cfg.inflight
        });
        let ping_every_ns = u64::from(cfg.keep_alive.max(2)) * 500_000_000;
        let mut last_tx_ns = self.shared.now_ns();
        let mut last_progress = (
            self.shared.delivered_total.load(Ordering::Relaxed),
            Instant::now(),
        );
        let mut seq = 0u64;

        sleep_until(self.shared.instant_at(s.start_ns)).await;
        loop {
            let now = self.shared.now_ns();
            let mut batch = 0u64;
            let mut window_full = false;
            loop {
                let due = if open_loop { due_at(seq) } else { now };
                if due >= s.end_ns
                    || due > now + DUE_SLACK_NS
                    || batch >= MAX_BATCH
                    || !ids.has_room()
                {
                    break;
                }
                if !open_loop && self.shared.in_flight() + batch * self.reach >= s.window_deliveries
                {
                    window_full = true;
                    break;
                }
                let packet_id = if cfg.qos == QoS::AtMostOnce {
                    None
                } else {
                    ids.allocate()
                };
                let stamp = Stamp {
                    publisher: self.idx as u32,
                    seq,
                    scheduled_ns: due,
                    sent_ns: now,
                };
                conn.wire.publish(
                    &self.topic,
                    cfg.qos,
                    packet_id,
                    builder.build(stamp),
                    &mut conn.wbuf,
                )?;
                if due >= s.measure_from_ns {
                    out.sent_in_window += 1;
                }
                seq += 1;
                batch += 1;
            }
            if batch > 0 {
                out.sent += batch;
                self.shared
                    .expected_total
                    .fetch_add(batch * self.reach, Ordering::Relaxed);
                last_tx_ns = now;
            } else if now.saturating_sub(last_tx_ns) > ping_every_ns {
                conn.wire.pingreq(&mut conn.wbuf)?;
                last_tx_ns = now;
            }
            conn.flush().await?;

            let next_due = if open_loop { due_at(seq) } else { now };
            if next_due >= s.end_ns {
                break;
            }
            if window_full {
                self.forgive_stall(&mut last_progress);
            }
            // What to wait for: the next scheduled send, a window poll, or only acks.
            let wake = if !ids.has_room() {
                None
            } else if open_loop {
                Some(next_due)
            } else if window_full {
                Some(now + 1_000_000)
            } else {
                Some(now)
            };
            let wake = wake.map(|w| w.min(last_tx_ns + ping_every_ns));
            match wake {
                Some(w) if w <= now => tokio::task::yield_now().await,
                Some(w) => {
                    // The pacer usually wakes us first; the Tokio timer (1 ms grain) is the fallback.
                    let paced = async {
                        match &self.pace {
                            Some(n) => n.notified().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        r = conn.read_more() => { r?; self.handle_acks(conn, &mut ids)?; }
                        _ = sleep_until(self.shared.instant_at(w)) => {}
                        _ = paced => {}
                    }
                }
                None => {
                    conn.read_more().await?;
                    self.handle_acks(conn, &mut ids)?;
                }
            }
            // Acks may already sit in the buffer after a read in another branch.
            self.handle_acks(conn, &mut ids)?;
            conn.flush().await?;
        }

        // Let outstanding QoS 1/2 handshakes finish so the broker does not see an abrupt close.
        let deadline = tokio::time::Instant::now() + cfg.drain;
        while ids.count > 0 {
            match tokio::time::timeout_at(deadline, conn.read_more()).await {
                Ok(r) => {
                    r?;
                    self.handle_acks(conn, &mut ids)?;
                    conn.flush().await?;
                }
                Err(_) => {
                    debug!(
                        publisher = self.idx,
                        unacked = ids.count,
                        "giving up on outstanding acks"
                    );
                    break;
                }
            }
        }
        Ok(())
    }

    fn handle_acks(&self, conn: &mut Connection, ids: &mut PacketIds) -> Result<()> {
        while let Some(packet) = conn.try_packet()? {
            match packet {
                Incoming::PubAck { packet_id: id, .. } | Incoming::PubComp(id) => ids.release(id),
                Incoming::PubRec(id) => conn.wire.pubrel(id, &mut conn.wbuf)?,
                Incoming::Disconnect { .. } => return Err(ClientError::Closed.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// QoS 0 messages the broker dropped never arrive; without this the window would wait forever.
    fn forgive_stall(&self, last: &mut (u64, Instant)) {
        let delivered = self.shared.delivered_total.load(Ordering::Relaxed);
        if delivered != last.0 {
            *last = (delivered, Instant::now());
        } else if last.1.elapsed() > STALL_FORGIVE {
            let stuck = self.shared.in_flight();
            self.shared.forgiven.fetch_add(stuck, Ordering::Relaxed);
            debug!(
                publisher = self.idx,
                stuck, "no deliveries for a while; treating in-flight as lost"
            );
            *last = (delivered, Instant::now());
        }
    }
}

/// One subscribing connection.
struct SubscriberTask {
    idx: usize,
    client_id: String,
    filter: String,
    cfg: Arc<PubSubConfig>,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    ready: mpsc::Sender<(usize, bool)>,
    sched: watch::Receiver<Option<Schedule>>,
    stop: watch::Receiver<bool>,
    latency: LatencyHistogram,
    latency_from_send: LatencyHistogram,
}

impl SubscriberTask {
    async fn run(self) -> SubscriberOutcome {
        let SubscriberTask {
            idx,
            client_id,
            filter,
            cfg,
            shared,
            gate,
            ready,
            mut sched,
            mut stop,
            latency,
            latency_from_send,
        } = self;
        let conn = {
            let _permit = gate.acquire().await;
            let addr = cfg.sub_addr.as_deref().unwrap_or(&cfg.addr);
            let opened = if cfg.persistent_subscribers {
                let options = crate::wire::ConnectOptions {
                    clean_start: false,
                    keep_alive: cfg.keep_alive,
                    session_expiry: 3600,
                };
                match Connection::tcp(addr, cfg.protocol, READ_CHUNK, cfg.connect_timeout).await {
                    Ok(mut c) => c
                        .handshake(&client_id, options, cfg.connect_timeout)
                        .await
                        .map(|_| c),
                    Err(e) => Err(e),
                }
            } else {
                Connection::open(
                    addr,
                    cfg.protocol,
                    &client_id,
                    cfg.keep_alive,
                    READ_CHUNK,
                    cfg.connect_timeout,
                )
                .await
            };
            match opened {
                Ok(mut c) => c
                    .subscribe(&filter, cfg.qos, cfg.connect_timeout)
                    .await
                    .map(|_| c),
                Err(e) => Err(e),
            }
        };
        let mut out = SubscriberOutcome {
            connected: conn.is_ok(),
            ledger: Ledger::default(),
            latency,
            latency_from_send,
            delivered_in_window: 0,
            foreign: 0,
            error: None,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(subscriber = idx, error = %e, "subscriber failed to connect");
                let _ = ready.send((idx, false)).await;
                out.error = Some(e.to_string());
                return out;
            }
        };
        let _ = ready.send((idx, true)).await;
        let schedule = tokio::select! {
            s = wait_schedule(&mut sched) => s,
            _ = stopped(&mut stop) => None,
        };
        let Some(schedule) = schedule else {
            conn.close().await;
            return out;
        };
        match Self::receive_loop(&mut conn, &mut stop, &cfg, &shared, schedule, &mut out).await {
            Ok(()) => conn.close().await,
            Err(e) => {
                warn!(subscriber = idx, error = %e, "subscriber stopped early");
                out.error = Some(e.to_string());
            }
        }
        out
    }

    async fn receive_loop(
        conn: &mut Connection,
        stop: &mut watch::Receiver<bool>,
        cfg: &PubSubConfig,
        shared: &Shared,
        s: Schedule,
        out: &mut SubscriberOutcome,
    ) -> Result<()> {
        let ping_every = Duration::from_secs(u64::from(cfg.keep_alive.max(2)) / 2);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        loop {
            tokio::select! {
                biased;
                _ = stopped(stop) => return Ok(()),
                r = conn.read_more() => {
                    r?;
                    let now = shared.now_ns();
                    let new = Self::consume(conn, s, now, out)?;
                    if new > 0 {
                        shared.delivered_total.fetch_add(new, Ordering::Relaxed);
                    }
                    conn.flush().await?;
                }
                _ = ping.tick() => {
                    conn.wire.pingreq(&mut conn.wbuf)?;
                    conn.flush().await?;
                }
            }
        }
    }

    /// Handles every complete packet in the buffer; returns how many new deliveries it saw.
    fn consume(
        conn: &mut Connection,
        s: Schedule,
        now: u64,
        out: &mut SubscriberOutcome,
    ) -> Result<u64> {
        let mut new = 0;
        while let Some(packet) = conn.try_packet()? {
            match packet {
                Incoming::Publish {
                    qos,
                    packet_id,
                    payload,
                } => {
                    match payload::parse(&payload) {
                        Some(stamp) => {
                            if out.ledger.observe(stamp.publisher, stamp.seq) == Observation::First
                            {
                                new += 1;
                                if stamp.scheduled_ns >= s.measure_from_ns
                                    && stamp.scheduled_ns < s.end_ns
                                {
                                    out.latency
                                        .record_ns(now.saturating_sub(stamp.scheduled_ns));
                                    out.latency_from_send
                                        .record_ns(now.saturating_sub(stamp.sent_ns));
                                }
                                if now >= s.measure_from_ns && now < s.end_ns {
                                    out.delivered_in_window += 1;
                                }
                            }
                        }
                        None => out.foreign += 1,
                    }
                    match (qos, packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => conn.wire.puback(id, &mut conn.wbuf)?,
                        (QoS::ExactlyOnce, Some(id)) => conn.wire.pubrec(id, &mut conn.wbuf)?,
                        _ => {}
                    }
                }
                Incoming::PubRel(id) => conn.wire.pubcomp(id, &mut conn.wbuf)?,
                Incoming::Disconnect { .. } => return Err(ClientError::Closed.into()),
                _ => {}
            }
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2p_needs_pairs() {
        assert!(TopicPlan::new(Scenario::P2p, "x", 2, 3).is_err());
        let plan = TopicPlan::new(Scenario::P2p, "x", 2, 2).expect("plan");
        assert!(plan.reaches(1, 1) && !plan.reaches(0, 1));
        assert_eq!(plan.subscribe_filters[1], "x/p2p/1");
    }

    #[test]
    fn fan_in_subscribers_see_every_publisher() {
        let plan = TopicPlan::new(Scenario::FanIn, "x", 3, 1).expect("plan");
        assert_eq!(plan.subscribe_filters, vec!["x/fanin/+".to_string()]);
        assert_eq!(&plan.publish_topics[2][..], "x/fanin/2");
        assert!(plan.reaches(2, 0));
    }

    #[test]
    fn packet_ids_respect_the_limit_and_wrap() {
        let mut ids = PacketIds::new(2);
        let a = ids.allocate().expect("id");
        let b = ids.allocate().expect("id");
        assert!(ids.allocate().is_none());
        ids.release(a);
        ids.release(a); // an unknown or repeated ack must not corrupt the count
        assert_eq!(ids.count, 1);
        let c = ids.allocate().expect("id");
        assert_ne!(c, b);
    }
}
