//! `corvid-liveload`: steady, numbered QoS 1 traffic from persistent-session MQTT 5 clients that
//! survives broker restarts, and an exact account of what happened to every message.
//!
//! The live proof (issue #8, `e2e/live-proof`) runs one of these per scenario while it upgrades,
//! scales, deletes or kills broker pods, and asserts on the report: how many messages were
//! published, acknowledged by the broker (PUBACK), received by every subscriber that should have
//! had them, lost, duplicated, and the longest time any client waited to reconnect.
//!
//! Why a small client of its own instead of rumqttc: the measurement must know exactly which
//! numbered message a PUBACK acknowledges across reconnects, resend in-flight messages with DUP
//! on the same session, and follow a DISCONNECT's Server Reference — rumqttc hides the last and
//! blurs the first two. The framing and the connection are `corvid-testkit`'s (shared with
//! `corvid-bench`); the session logic, which is what is being measured, is all here.
//!
//! Topic layout (what makes "expected receipts" exact): subscribers and publishers are split
//! into `--groups` groups by index (`i % groups`). Subscriber `s` subscribes to
//! `live/<prefix>/<group>/#`; publisher `p` publishes to `live/<prefix>/<group>/<p>`. Every
//! message of publisher `p` is therefore expected by exactly the subscribers of its group.
//!
//! Accounting (per message, as the report contract counts messages):
//! - `published`: distinct numbered messages sent at least once (a resend after a reconnect,
//!   with DUP, is the same message);
//! - `acked`: messages the broker acknowledged with a successful PUBACK (reason < 0x80);
//!   `refused` counts PUBACKs with an error reason (e.g. 0x87 not authorized);
//! - `received_unique`: messages every expected subscriber received at least once;
//! - `lost`: acknowledged messages that at least one expected subscriber never received
//!   (`lost_deliveries` counts the missing (message, subscriber) pairs);
//! - `duplicates`: extra copies a subscriber received of a message it already had;
//! - `max_reconnect_gap_s`: longest time from a client noticing its connection was gone to its
//!   next successful CONNACK.
//!
//! Phases: subscribers connect and subscribe; publishers send QoS 0 probes until every
//! subscriber has seen a probe from every publisher of its group (so cluster routes are in
//! place — messages before that would be "lost" to route propagation, not to the broker); then
//! the measured run; on stop, publishers stop and wait for their PUBACKs, subscribers drain
//! (bounded), and the report is written.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use bytestring::ByteString;
use clap::Parser;
use corvid_testkit::{Client, ClientError, ConnAck, ConnectOptions, Incoming, Protocol, QoS};
use serde_json::json;
use tokio::io::AsyncReadExt as _;
use tokio::sync::watch;

/// Command line: where to connect, how much load, when to stop, where to report.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "corvid-liveload",
    about = "Numbered QoS 1 load from persistent MQTT 5 sessions, with an exact loss report"
)]
struct Args {
    /// Broker addresses, `host:port[,host:port…]` (in Kubernetes: the client Service).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Publishing clients.
    #[arg(long, default_value_t = 50)]
    publishers: usize,
    /// Subscribing clients.
    #[arg(long, default_value_t = 50)]
    subscribers: usize,
    /// Total messages per second over all publishers.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Topic groups (capped at the number of subscribers): each message reaches the
    /// subscribers of one group, about subscribers/groups of them.
    #[arg(long, default_value_t = 10)]
    groups: usize,
    /// Stop after this many seconds of measured load (default: run until told to stop).
    #[arg(long)]
    duration: Option<f64>,
    /// Stop when this file exists (the runner's control file).
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Also stop when standard input reaches end of file.
    #[arg(long)]
    stop_on_stdin_close: bool,
    /// Created once the measured phase starts (probes done), so a runner knows when to act.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Client id and topic prefix; make it unique per run so sessions never mix.
    #[arg(long, default_value = "liveload")]
    client_prefix: String,
    /// Scenario name written into the report.
    #[arg(long, default_value = "load")]
    name: String,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Longest wait, after stopping, for outstanding PUBACKs and deliveries (seconds).
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Longest wait for subscriptions and probes before the measured phase (seconds).
    #[arg(long, default_value_t = 60.0)]
    warmup_timeout: f64,
    /// Log every disconnect and reconnect (lost sessions are always logged).
    #[arg(long)]
    verbose: bool,
    /// Session expiry interval asked for in CONNECT (seconds).
    #[arg(long, default_value_t = 3600)]
    session_expiry: u32,
}

/// Keep alive asked for in CONNECT; a PINGREQ goes out every third of it.
const KEEP_ALIVE: u16 = 10;
/// A connection silent for this long (no packet at all, despite our pings) is treated as dead.
const SILENCE: Duration = Duration::from_millis(7_500);
/// Limits on one connection attempt.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect back-off: first wait, cap.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most unacknowledged QoS 1 messages per publisher (further capped by the broker's receive
/// maximum).
const MAX_INFLIGHT: usize = 64;
/// Drain ends early once nothing has arrived for this long with every client connected and
/// nothing in flight.
const QUIET: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Payload: who sent it, which number, when.

const MAGIC: &[u8; 2] = b"LV";
const KIND_MEASURED: u8 = 0;
const KIND_PROBE: u8 = 1;
const PAYLOAD_LEN: usize = 23;

/// The decoded payload of a liveload message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    kind: u8,
    publisher: u32,
    seq: u64,
    sent_us: u64,
}

impl Stamp {
    fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(PAYLOAD_LEN);
        b.put_slice(MAGIC);
        b.put_u8(self.kind);
        b.put_u32(self.publisher);
        b.put_u64(self.seq);
        b.put_u64(self.sent_us);
        b.freeze()
    }

    fn decode(mut b: &[u8]) -> Option<Stamp> {
        if b.len() != PAYLOAD_LEN || &b[..2] != MAGIC {
            return None;
        }
        b.advance(2);
        Some(Stamp {
            kind: b.get_u8(),
            publisher: b.get_u32(),
            seq: b.get_u64(),
            sent_us: b.get_u64(),
        })
    }
}

/// UTC time of day for log lines (HH:MM:SS.mmm), to line them up with the brokers' logs.
fn clock() -> String {
    let ms = now_us() / 1000;
    let (s, ms) = (ms / 1000, ms % 1000);
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60
    )
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Shared live state: only what the coordinator needs while the run goes on. Each client keeps
// its own ledger and hands it back at the end.

/// Where the run is; every client watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Subscribers subscribe; publishers send QoS 0 probes.
    Warmup,
    /// Numbered QoS 1 messages at the configured rate.
    Measure,
    /// No new messages; publishers wait for PUBACKs of what is in flight.
    Stop,
    /// Everyone disconnects (ending their sessions) and returns their ledger.
    Finish,
}

struct Shared {
    args: Args,
    groups: usize,
    started: Instant,
    subscribed: AtomicUsize,
    connected: AtomicUsize,
    /// `probe_seen[s * publishers + p]`: subscriber `s` has seen a probe from publisher `p`.
    probe_seen: Vec<AtomicBool>,
    inflight: AtomicI64,
    /// Sum over successfully acknowledged messages of their expected subscriber count.
    expected_acked_deliveries: AtomicU64,
    /// Distinct measured (message, subscriber) deliveries so far.
    unique_deliveries: AtomicU64,
    /// Milliseconds since `started` of the last measured delivery.
    last_delivery_ms: AtomicU64,
    /// Held (read) by a publisher while it checks the phase and counts a new message in flight;
    /// the coordinator takes it (write) after setting Stop, so the drain sees every message.
    publish_gate: std::sync::RwLock<()>,
}

impl Shared {
    fn new(args: Args) -> Shared {
        Shared {
            groups: args.groups.clamp(1, args.subscribers.max(1)),
            started: Instant::now(),
            subscribed: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            probe_seen: (0..args.subscribers * args.publishers)
                .map(|_| AtomicBool::new(false))
                .collect(),
            inflight: AtomicI64::new(0),
            expected_acked_deliveries: AtomicU64::new(0),
            unique_deliveries: AtomicU64::new(0),
            last_delivery_ms: AtomicU64::new(0),
            publish_gate: std::sync::RwLock::new(()),
            args,
        }
    }
    fn group_of_publisher(&self, p: usize) -> usize {
        p % self.groups
    }
    fn group_of_subscriber(&self, s: usize) -> usize {
        s % self.groups
    }
    fn subscribers_in_group(&self, g: usize) -> usize {
        (0..self.args.subscribers)
            .filter(|s| self.group_of_subscriber(*s) == g)
            .count()
    }
    fn topic(&self, p: usize) -> String {
        format!(
            "live/{}/{}/{}",
            self.args.client_prefix,
            self.group_of_publisher(p),
            p
        )
    }
    fn filter(&self, s: usize) -> String {
        format!(
            "live/{}/{}/#",
            self.args.client_prefix,
            self.group_of_subscriber(s)
        )
    }
    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

// ---------------------------------------------------------------------------------------------
// One connection: socket, buffers, codec.

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    /// The server sent DISCONNECT with this reason and maybe a Server Reference.
    Disconnect(u8, Option<String>),
    /// EOF, reset, silence, or a protocol error.
    Broken(String),
    /// The run is over (we disconnected on purpose).
    Finished,
}

struct Conn {
    client: Client,
    last_heard: Instant,
}

impl Conn {
    async fn open(
        addr: &str,
        client_id: &str,
        clean_start: bool,
        expiry: u32,
    ) -> anyhow::Result<(Conn, ConnAck)> {
        let client = Client::tcp(addr, Protocol::V5, 4096, TCP_TIMEOUT)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        let mut conn = Conn {
            client,
            last_heard: Instant::now(),
        };
        let options = ConnectOptions {
            clean_start,
            keep_alive: KEEP_ALIVE,
            session_expiry: expiry,
        };
        match conn
            .client
            .handshake(client_id, options, CONNACK_TIMEOUT)
            .await
        {
            Ok(accepted) => {
                conn.last_heard = Instant::now();
                Ok((conn, accepted))
            }
            Err(ClientError::ConnectRefused {
                code,
                server_reference,
            }) => {
                bail!("CONNACK 0x{code:02x} from {addr} (server reference {server_reference:?})")
            }
            Err(ClientError::Timeout(_)) => bail!("no CONNACK from {addr}"),
            Err(e) => Err(e).with_context(|| format!("CONNECT to {addr}")),
        }
    }

    /// Queues a PUBLISH (sent by the next [`Conn::flush`]).
    fn publish(
        &mut self,
        topic: &ByteString,
        payload: Bytes,
        qos: QoS,
        id: Option<NonZeroU16>,
        dup: bool,
    ) -> anyhow::Result<()> {
        let c = &mut self.client;
        Ok(c.wire
            .publish_dup(topic, qos, id, payload, dup, &mut c.wbuf)?)
    }

    fn puback(&mut self, id: NonZeroU16) -> anyhow::Result<()> {
        let c = &mut self.client;
        Ok(c.wire.puback(id, &mut c.wbuf)?)
    }

    fn ping(&mut self) -> anyhow::Result<()> {
        let c = &mut self.client;
        Ok(c.wire.pingreq(&mut c.wbuf)?)
    }

    fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let c = &mut self.client;
        Ok(c.wire
            .subscribe(NonZeroU16::MIN, filter, QoS::AtLeastOnce, &mut c.wbuf)?)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        Ok(self.client.flush().await?)
    }

    fn try_decode(&mut self) -> anyhow::Result<Option<Incoming>> {
        let p = self.client.try_packet()?;
        if p.is_some() {
            self.last_heard = Instant::now();
        }
        Ok(p)
    }

    /// Reads more bytes; cancel-safe (used in `select!`).
    async fn read_more(&mut self) -> anyhow::Result<()> {
        match self.client.read_more().await {
            Ok(_) => Ok(()),
            Err(ClientError::Closed) => bail!("connection closed by the server"),
            Err(e) => Err(e.into()),
        }
    }

    async fn next(&mut self) -> anyhow::Result<Incoming> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Ends the session on purpose: DISCONNECT with session expiry 0, so the broker forgets it.
    async fn finish(self) {
        self.client
            .close_with_expiry(Some(0), Some(Duration::from_secs(2)))
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Reconnecting: endpoint choice, back-off, gaps.

/// Per-client connection bookkeeping shared by publishers and subscribers.
struct Link {
    client_id: String,
    endpoints: Vec<String>,
    rng: u64,
    /// Index of the endpoint of the current/last connection.
    current: usize,
    /// Server Reference from the last DISCONNECT, tried first.
    referred: Option<String>,
    first: bool,
    gaps: Vec<f64>,
    sessions_lost: u64,
    disconnects: BTreeMap<String, u64>,
}

impl Link {
    fn new(client_id: String, endpoints: Vec<String>, index: usize) -> Link {
        let n = endpoints.len().max(1);
        Link {
            rng: 0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            current: index % n,
            client_id,
            endpoints,
            referred: None,
            first: true,
            gaps: Vec::new(),
            sessions_lost: 0,
            disconnects: BTreeMap::new(),
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: cheap jitter and endpoint choice, reproducible per client.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Picks the endpoint for the next attempt: the Server Reference once, else a random
    /// endpoint other than the one that just failed (when there is another).
    fn pick(&mut self, avoid_current: bool) -> String {
        if let Some(r) = self.referred.take() {
            return r;
        }
        let n = self.endpoints.len();
        if avoid_current && n > 1 {
            let step = 1 + (self.random() as usize) % (n - 1);
            self.current = (self.current + step) % n;
        }
        self.endpoints[self.current].clone()
    }

    fn note_end(&mut self, ended: &Ended, verbose: bool) {
        if verbose {
            eprintln!(
                "{} liveload: {} connection ended: {ended:?}",
                clock(),
                self.client_id
            );
        }
        let key = match ended {
            Ended::Disconnect(code, reference) => {
                if let Some(r) = reference {
                    self.referred = Some(r.clone());
                }
                format!("disconnect_0x{code:02x}")
            }
            Ended::Broken(_) => "connection_lost".to_string(),
            Ended::Finished => return,
        };
        *self.disconnects.entry(key).or_default() += 1;
    }

    /// Connects (clean start only the very first time), retrying with back-off until it works
    /// or the run reaches `Finish`. Records the reconnect gap and lost sessions.
    async fn connect(
        &mut self,
        shared: &Shared,
        phase: &mut watch::Receiver<Phase>,
    ) -> Option<(Conn, ConnAck)> {
        let lost_at = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0u32;
        loop {
            if *phase.borrow_and_update() == Phase::Finish {
                return None;
            }
            // The very first connect and a referred reconnect go at once; every other attempt
            // waits a jittered back-off (50–100 % of a step that doubles up to BACKOFF_MAX).
            if attempt > 0 || (!self.first && self.referred.is_none()) {
                let jitter = 0.5 + (self.random() % 1000) as f64 / 2000.0;
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = phase.wait_for(|p| *p == Phase::Finish) => return None,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            let addr = self.pick(!self.first || attempt > 0);
            attempt += 1;
            match Conn::open(
                &addr,
                &self.client_id,
                self.first,
                shared.args.session_expiry,
            )
            .await
            {
                Ok((conn, accepted)) => {
                    if !self.first {
                        let gap = lost_at.elapsed().as_secs_f64();
                        self.gaps.push(gap);
                        if !accepted.session_present {
                            self.sessions_lost += 1;
                            eprintln!(
                                "{} liveload: {} reconnected to {addr} after {gap:.3}s WITHOUT its \
                                 session (CONNACK session present = 0)", clock(),
                                self.client_id
                            );
                        } else if shared.args.verbose {
                            eprintln!(
                                "{} liveload: {} reconnected to {addr} after {gap:.3}s",
                                clock(),
                                self.client_id
                            );
                        }
                    }
                    if let Some(i) = self.endpoints.iter().position(|e| *e == addr) {
                        self.current = i;
                    }
                    self.first = false;
                    shared.connected.fetch_add(1, Ordering::SeqCst);
                    return Some((conn, accepted));
                }
                Err(e) => {
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        eprintln!(
                            "{} liveload: {} attempt {attempt} to {addr}: {e:#}",
                            clock(),
                            self.client_id
                        );
                    }
                }
            }
        }
    }
}

/// What every client returns when the run ends.
struct ClientSummary {
    gaps: Vec<f64>,
    sessions_lost: u64,
    disconnects: BTreeMap<String, u64>,
}

impl From<Link> for ClientSummary {
    fn from(l: Link) -> Self {
        ClientSummary {
            gaps: l.gaps,
            sessions_lost: l.sessions_lost,
            disconnects: l.disconnects,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher.

struct InflightMsg {
    packet_id: NonZeroU16,
    payload: Bytes,
}

/// A publisher's ledger.
struct PubLedger {
    index: usize,
    /// Next sequence number: messages 0..published were sent at least once.
    published: u64,
    /// Outcome per sequence number: None = no PUBACK yet, Some(code).
    outcome: Vec<Option<u8>>,
    client: ClientSummary,
}

struct Publisher {
    index: usize,
    shared: Arc<Shared>,
    topic: ByteString,
    link: Link,
    next_seq: u64,
    outcome: Vec<Option<u8>>,
    /// In-flight QoS 1 messages by sequence number (resent in order after a reconnect).
    inflight: BTreeMap<u64, InflightMsg>,
    by_packet_id: HashMap<u16, u64>,
    next_packet_id: u16,
    probes: u64,
}

impl Publisher {
    fn alloc_packet_id(&mut self) -> NonZeroU16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            if let Some(id) = NonZeroU16::new(self.next_packet_id) {
                if !self.by_packet_id.contains_key(&id.get()) {
                    return id;
                }
            }
        }
    }

    async fn run(mut self, mut phase: watch::Receiver<Phase>) -> PubLedger {
        let per_publisher = self.shared.args.rate / self.shared.args.publishers as f64;
        let period = Duration::from_secs_f64(1.0 / per_publisher.max(0.001));
        // Stagger publishers over one period so the total flow is smooth.
        let offset = period.mul_f64(self.index as f64 / self.shared.args.publishers as f64);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut probe_tick = tokio::time::interval(Duration::from_millis(200));
        let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE) / 3));
        'session: loop {
            let Some((mut conn, accepted)) = self.link.connect(&self.shared, &mut phase).await
            else {
                break;
            };
            let window = usize::from(accepted.receive_max).clamp(1, MAX_INFLIGHT);
            // Resend what was in flight, in order, with DUP: same session, same packet ids. If
            // the session is gone the broker treats them as new messages, which is still right:
            // they were never acknowledged.
            let mut ended = None;
            for m in self.inflight.values() {
                let resent = conn.publish(
                    &self.topic,
                    m.payload.clone(),
                    QoS::AtLeastOnce,
                    Some(m.packet_id),
                    true,
                );
                if let Err(e) = resent {
                    ended = Some(Ended::Broken(format!("{e:#}")));
                }
            }
            if ended.is_none() {
                if let Err(e) = conn.flush().await {
                    ended = Some(Ended::Broken(format!("{e:#}")));
                }
            }
            let ended = match ended {
                Some(e) => e,
                None => {
                    self.serve(
                        &mut conn,
                        &mut phase,
                        &mut ticker,
                        &mut probe_tick,
                        &mut ping,
                        window,
                    )
                    .await
                }
            };
            self.shared.connected.fetch_sub(1, Ordering::SeqCst);
            self.link.note_end(&ended, self.shared.args.verbose);
            if let Ended::Finished = ended {
                conn.finish().await;
                break 'session;
            }
            if let Ended::Broken(why) = &ended {
                eprintln!(
                    "{} liveload: {} connection lost: {why}",
                    clock(),
                    self.link.client_id
                );
            }
        }
        // Whatever is still in flight will never be acknowledged in this run.
        self.shared
            .inflight
            .fetch_sub(self.inflight.len() as i64, Ordering::SeqCst);
        PubLedger {
            index: self.index,
            published: self.next_seq,
            outcome: self.outcome,
            client: self.link.into(),
        }
    }

    async fn serve(
        &mut self,
        conn: &mut Conn,
        phase: &mut watch::Receiver<Phase>,
        ticker: &mut tokio::time::Interval,
        probe_tick: &mut tokio::time::Interval,
        ping: &mut tokio::time::Interval,
        window: usize,
    ) -> Ended {
        loop {
            // Packets already buffered first.
            loop {
                match conn.try_decode() {
                    Ok(Some(p)) => {
                        if let Some(end) = self.on_packet(p) {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Ended::Broken(format!("{e:#}")),
                }
            }
            // Reading the phase marks it seen, so `phase.changed()` below only wakes on news.
            let now = *phase.borrow_and_update();
            if now == Phase::Finish {
                return Ended::Finished;
            }
            tokio::select! {
                r = conn.read_more() => {
                    if let Err(e) = r {
                        return Ended::Broken(format!("{e:#}"));
                    }
                    continue;
                }
                _ = phase.changed() => continue,
                _ = ticker.tick(), if now == Phase::Measure && self.inflight.len() < window => {
                    // Under the publish gate: once the coordinator has set Stop and taken the
                    // gate, no message can start that its drain check would not see.
                    let shared = self.shared.clone();
                    let gate = shared.publish_gate.read().unwrap_or_else(|e| e.into_inner());
                    if *phase.borrow() != Phase::Measure {
                        continue;
                    }
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.outcome.push(None);
                    let payload = Stamp { kind: KIND_MEASURED, publisher: self.index as u32, seq, sent_us: now_us() }.encode();
                    let id = self.alloc_packet_id();
                    self.by_packet_id.insert(id.get(), seq);
                    self.inflight.insert(seq, InflightMsg { packet_id: id, payload: payload.clone() });
                    self.shared.inflight.fetch_add(1, Ordering::SeqCst);
                    drop(gate);
                    if let Err(e) = conn.publish(&self.topic, payload, QoS::AtLeastOnce, Some(id), false) {
                        return Ended::Broken(format!("{e:#}"));
                    }
                }
                _ = probe_tick.tick(), if now == Phase::Warmup => {
                    self.probes += 1;
                    let payload = Stamp { kind: KIND_PROBE, publisher: self.index as u32, seq: self.probes, sent_us: now_us() }.encode();
                    if let Err(e) = conn.publish(&self.topic, payload, QoS::AtMostOnce, None, false) {
                        return Ended::Broken(format!("{e:#}"));
                    }
                }
                _ = ping.tick() => {
                    if conn.last_heard.elapsed() > SILENCE {
                        return Ended::Broken(format!("no packet from the server for {SILENCE:?}"));
                    }
                    if let Err(e) = conn.ping() {
                        return Ended::Broken(format!("{e:#}"));
                    }
                }
            }
            if let Err(e) = conn.flush().await {
                return Ended::Broken(format!("{e:#}"));
            }
        }
    }

    fn on_packet(&mut self, p: Incoming) -> Option<Ended> {
        match p {
            Incoming::PubAck { packet_id, code } => {
                if let Some(seq) = self.by_packet_id.remove(&packet_id.get()) {
                    self.inflight.remove(&seq);
                    self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
                    if let Some(slot) = self.outcome.get_mut(seq as usize) {
                        *slot = Some(code);
                    }
                    if code < 0x80 {
                        let expected = self
                            .shared
                            .subscribers_in_group(self.shared.group_of_publisher(self.index));
                        self.shared
                            .expected_acked_deliveries
                            .fetch_add(expected as u64, Ordering::SeqCst);
                    }
                }
                None
            }
            Incoming::Disconnect {
                code,
                server_reference,
            } => Some(Ended::Disconnect(code, server_reference)),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriber.

/// A subscriber's ledger: copies received per (publisher, seq).
struct SubLedger {
    index: usize,
    received: HashMap<(u32, u64), u32>,
    client: ClientSummary,
}

struct Subscriber {
    index: usize,
    shared: Arc<Shared>,
    link: Link,
    received: HashMap<(u32, u64), u32>,
    subscribed_once: bool,
}

impl Subscriber {
    async fn run(mut self, mut phase: watch::Receiver<Phase>) -> SubLedger {
        let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE) / 3));
        loop {
            let Some((mut conn, accepted)) = self.link.connect(&self.shared, &mut phase).await
            else {
                break;
            };
            let ended = if accepted.session_present && self.subscribed_once {
                self.serve(&mut conn, &mut phase, &mut ping).await
            } else {
                match self.subscribe(&mut conn).await {
                    Ok(()) => self.serve(&mut conn, &mut phase, &mut ping).await,
                    Err(e) => Ended::Broken(format!("subscribe: {e:#}")),
                }
            };
            self.shared.connected.fetch_sub(1, Ordering::SeqCst);
            self.link.note_end(&ended, self.shared.args.verbose);
            if let Ended::Finished = ended {
                conn.finish().await;
                break;
            }
            if let Ended::Broken(why) = &ended {
                eprintln!(
                    "{} liveload: {} connection lost: {why}",
                    clock(),
                    self.link.client_id
                );
            }
        }
        SubLedger {
            index: self.index,
            received: self.received,
            client: self.link.into(),
        }
    }

    /// SUBSCRIBE at QoS 1 and wait for the SUBACK (handling any PUBLISH that arrives first).
    async fn subscribe(&mut self, conn: &mut Conn) -> anyhow::Result<()> {
        let filter = self.shared.filter(self.index);
        conn.subscribe(&filter)?;
        conn.flush().await?;
        let deadline = tokio::time::Instant::now() + CONNACK_TIMEOUT;
        loop {
            let p = tokio::time::timeout_at(deadline, conn.next())
                .await
                .context("no SUBACK")??;
            match p {
                Incoming::SubAck { granted, .. } => {
                    if !granted {
                        bail!("SUBSCRIBE {filter} refused");
                    }
                    if !self.subscribed_once {
                        self.subscribed_once = true;
                        self.shared.subscribed.fetch_add(1, Ordering::SeqCst);
                    }
                    return Ok(());
                }
                Incoming::Disconnect { code, .. } => {
                    bail!("DISCONNECT 0x{code:02x} before SUBACK")
                }
                other => {
                    self.on_packet(conn, other)?;
                }
            }
        }
    }

    async fn serve(
        &mut self,
        conn: &mut Conn,
        phase: &mut watch::Receiver<Phase>,
        ping: &mut tokio::time::Interval,
    ) -> Ended {
        loop {
            loop {
                match conn.try_decode() {
                    Ok(Some(Incoming::Disconnect {
                        code,
                        server_reference,
                    })) => return Ended::Disconnect(code, server_reference),
                    Ok(Some(p)) => {
                        if let Err(e) = self.on_packet(conn, p) {
                            return Ended::Broken(format!("{e:#}"));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Ended::Broken(format!("{e:#}")),
                }
            }
            if let Err(e) = conn.flush().await {
                return Ended::Broken(format!("{e:#}"));
            }
            if *phase.borrow_and_update() == Phase::Finish {
                return Ended::Finished;
            }
            tokio::select! {
                r = conn.read_more() => {
                    if let Err(e) = r {
                        return Ended::Broken(format!("{e:#}"));
                    }
                }
                _ = phase.changed() => {}
                _ = ping.tick() => {
                    if conn.last_heard.elapsed() > SILENCE {
                        return Ended::Broken(format!("no packet from the server for {SILENCE:?}"));
                    }
                    if let Err(e) = conn.ping() {
                        return Ended::Broken(format!("{e:#}"));
                    }
                }
            }
        }
    }

    /// Records a PUBLISH and queues its PUBACK (sent after recording, so an acknowledged
    /// delivery is always in the ledger).
    fn on_packet(&mut self, conn: &mut Conn, p: Incoming) -> anyhow::Result<()> {
        let Incoming::Publish {
            packet_id, payload, ..
        } = p
        else {
            return Ok(());
        };
        if let Some(stamp) = Stamp::decode(&payload) {
            match stamp.kind {
                KIND_PROBE => {
                    let i = self.index * self.shared.args.publishers + stamp.publisher as usize;
                    if let Some(flag) = self.shared.probe_seen.get(i) {
                        flag.store(true, Ordering::SeqCst);
                    }
                }
                _ => {
                    let copies = self
                        .received
                        .entry((stamp.publisher, stamp.seq))
                        .or_default();
                    *copies += 1;
                    if *copies == 1 {
                        self.shared.unique_deliveries.fetch_add(1, Ordering::SeqCst);
                        self.shared
                            .last_delivery_ms
                            .store(self.shared.elapsed_ms(), Ordering::SeqCst);
                    }
                }
            }
        }
        if let Some(id) = packet_id {
            conn.puback(id)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinator and report.

async fn wait_until(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> Result<(), String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match cond() {
            Ok(()) => return Ok(()),
            Err(state) if Instant::now() >= deadline => {
                bail!("timed out after {limit:?} waiting for {what}: {state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Resolves when the runner asks the load to stop: duration, SIGTERM/SIGINT, stop file, stdin.
async fn stop_requested(args: &Args) -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let duration = async {
        match args.duration {
            Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
            None => std::future::pending().await,
        }
    };
    let file = async {
        match &args.stop_file {
            Some(path) => loop {
                if path.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            },
            None => std::future::pending().await,
        }
    };
    let stdin = async {
        if args.stop_on_stdin_close {
            let mut buf = [0u8; 256];
            let mut input = tokio::io::stdin();
            while let Ok(n) = input.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    let int = async {
        match int.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = duration => "duration",
        _ = file => "stop file",
        _ = stdin => "stdin closed",
        _ = term => "SIGTERM",
        _ = int => "SIGINT",
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.publishers == 0 || args.subscribers == 0 || args.endpoints.is_empty() {
        bail!("need at least one publisher, one subscriber and one endpoint");
    }
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let shared = Arc::new(Shared::new(args.clone()));
    let groups = shared.groups;
    let (phase_tx, phase_rx) = watch::channel(Phase::Warmup);
    let clients = args.publishers + args.subscribers;

    let mut subs = Vec::new();
    for s in 0..args.subscribers {
        let id = format!("{}-sub-{s}", args.client_prefix);
        let sub = Subscriber {
            index: s,
            shared: shared.clone(),
            link: Link::new(id, args.endpoints.clone(), s),
            received: HashMap::new(),
            subscribed_once: false,
        };
        subs.push(tokio::spawn(sub.run(phase_rx.clone())));
    }
    let warm = async {
        wait_until(
            "every subscriber to subscribe",
            Duration::from_secs_f64(args.warmup_timeout),
            || {
                let n = shared.subscribed.load(Ordering::SeqCst);
                if n == args.subscribers {
                    Ok(())
                } else {
                    Err(format!("{n}/{} subscribed", args.subscribers))
                }
            },
        )
        .await
    };
    let mut pubs = Vec::new();
    let mut result = warm.await;
    if result.is_ok() {
        for p in 0..args.publishers {
            let id = format!("{}-pub-{p}", args.client_prefix);
            let publisher = Publisher {
                index: p,
                topic: ByteString::from(shared.topic(p)),
                shared: shared.clone(),
                link: Link::new(id, args.endpoints.clone(), p + args.subscribers),
                next_seq: 0,
                outcome: Vec::new(),
                inflight: BTreeMap::new(),
                by_packet_id: HashMap::new(),
                next_packet_id: 0,
                probes: 0,
            };
            pubs.push(tokio::spawn(publisher.run(phase_rx.clone())));
        }
        result = wait_until(
            "a probe from every publisher at every subscriber of its group (routes in place)",
            Duration::from_secs_f64(args.warmup_timeout),
            || {
                let mut missing = 0;
                for s in 0..args.subscribers {
                    for p in 0..args.publishers {
                        if shared.group_of_publisher(p) == shared.group_of_subscriber(s)
                            && !shared.probe_seen[s * args.publishers + p].load(Ordering::SeqCst)
                        {
                            missing += 1;
                        }
                    }
                }
                if missing == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "{missing} (subscriber, publisher) pairs without a probe"
                    ))
                }
            },
        )
        .await;
    }
    let measure_started = Instant::now();
    let mut stop_reason = "warm-up failed";
    if result.is_ok() {
        phase_tx.send_replace(Phase::Measure);
        eprintln!(
            "{} liveload: measuring: {} publishers, {} subscribers in {groups} groups, {} msg/s",
            clock(),
            args.publishers,
            args.subscribers,
            args.rate
        );
        if let Some(path) = &args.ready_file {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| path.display().to_string())?;
        }
        stop_reason = stop_requested(&args).await;
        eprintln!("{} liveload: stopping ({stop_reason}); draining", clock());
    }
    let measured_s = measure_started.elapsed().as_secs_f64();
    phase_tx.send_replace(Phase::Stop);
    // Wait out any publisher that saw Measure just before: after this, `inflight` counts all.
    drop(
        shared
            .publish_gate
            .write()
            .unwrap_or_else(|e| e.into_inner()),
    );
    // Drain: wait for PUBACKs and deliveries, bounded.
    let drain_started = Instant::now();
    let drain_limit = Duration::from_secs_f64(args.drain_timeout);
    let mut drained = "deadline";
    while result.is_ok() && drain_started.elapsed() < drain_limit {
        let inflight = shared.inflight.load(Ordering::SeqCst);
        let expected = shared.expected_acked_deliveries.load(Ordering::SeqCst);
        let got = shared.unique_deliveries.load(Ordering::SeqCst);
        if inflight == 0 && got >= expected {
            drained = "complete";
            break;
        }
        let quiet_ms = shared
            .elapsed_ms()
            .saturating_sub(shared.last_delivery_ms.load(Ordering::SeqCst));
        if inflight == 0
            && shared.connected.load(Ordering::SeqCst) == clients
            && quiet_ms >= QUIET.as_millis() as u64
        {
            drained = "quiet";
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{} liveload: drain ended ({drained}) after {:.1}s",
        clock(),
        drain_started.elapsed().as_secs_f64()
    );
    phase_tx.send_replace(Phase::Finish);

    let mut pub_ledgers = Vec::new();
    for h in pubs {
        pub_ledgers.push(h.await.context("publisher task")?);
    }
    let mut sub_ledgers = Vec::new();
    for h in subs {
        sub_ledgers.push(h.await.context("subscriber task")?);
    }
    let mut report = account(&shared, &pub_ledgers, &sub_ledgers);
    if let Some(obj) = report.as_object_mut() {
        obj.insert("name".into(), json!(args.name));
        obj.insert("duration_s".into(), json!(round3(measured_s)));
        obj.insert("stop_reason".into(), json!(stop_reason));
        obj.insert("drain".into(), json!(drained));
        obj.insert("endpoints".into(), json!(args.endpoints));
        obj.insert("publishers".into(), json!(args.publishers));
        obj.insert("subscribers".into(), json!(args.subscribers));
        obj.insert("groups".into(), json!(groups));
        obj.insert("rate".into(), json!(args.rate));
        if let Err(e) = &result {
            obj.insert("error".into(), json!(format!("{e:#}")));
        }
    }
    let text = serde_json::to_string_pretty(&report)?;
    match &args.report {
        Some(path) => {
            std::fs::write(path, format!("{text}\n")).with_context(|| path.display().to_string())?
        }
        None => println!("{text}"),
    }
    eprintln!(
        "{} liveload: {}: published {} acked {} received_unique {} lost {} duplicates {} max_reconnect_gap_s {}", clock(),
        args.name,
        report["published"],
        report["acked"],
        report["received_unique"],
        report["lost"],
        report["duplicates"],
        report["max_reconnect_gap_s"]
    );
    result
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Turns the ledgers into the report: see the module doc for what each figure means.
fn account(shared: &Shared, pubs: &[PubLedger], subs: &[SubLedger]) -> serde_json::Value {
    let mut members: Vec<Vec<&SubLedger>> = vec![Vec::new(); shared.groups];
    for s in subs {
        members[shared.group_of_subscriber(s.index)].push(s);
    }
    let (mut published, mut acked, mut refused, mut unacked) = (0u64, 0u64, 0u64, 0u64);
    let (mut received_unique, mut lost, mut lost_deliveries) = (0u64, 0u64, 0u64);
    let (mut lost_to_lost_sessions, mut lost_to_live_sessions) = (0u64, 0u64);
    let mut expected_deliveries = 0u64;
    let mut lost_examples = Vec::new();
    for p in pubs {
        let group = &members[shared.group_of_publisher(p.index)];
        published += p.published;
        for seq in 0..p.published {
            let outcome = p.outcome.get(seq as usize).copied().flatten();
            let key = (p.index as u32, seq);
            let missing: Vec<&&SubLedger> = group
                .iter()
                .filter(|s| !s.received.contains_key(&key))
                .collect();
            if missing.is_empty() {
                received_unique += 1;
            }
            match outcome {
                Some(code) if code < 0x80 => {
                    acked += 1;
                    expected_deliveries += group.len() as u64;
                    if !missing.is_empty() {
                        lost += 1;
                        lost_deliveries += missing.len() as u64;
                        for s in &missing {
                            if s.client.sessions_lost > 0 {
                                lost_to_lost_sessions += 1;
                            } else {
                                lost_to_live_sessions += 1;
                            }
                        }
                        if lost_examples.len() < 10 {
                            lost_examples.push(json!({
                                "publisher": p.index,
                                "seq": seq,
                                "missing_at": missing.iter().map(|s| s.index).collect::<Vec<_>>(),
                            }));
                        }
                    }
                }
                Some(_) => refused += 1,
                None => unacked += 1,
            }
        }
    }
    let mut duplicates = 0u64;
    let mut deliveries_unique = 0u64;
    for s in subs {
        for copies in s.received.values() {
            deliveries_unique += 1;
            duplicates += u64::from(copies.saturating_sub(1));
        }
    }
    let all: Vec<&ClientSummary> = pubs
        .iter()
        .map(|p| &p.client)
        .chain(subs.iter().map(|s| &s.client))
        .collect();
    let gaps: Vec<f64> = all.iter().flat_map(|c| c.gaps.iter().copied()).collect();
    let max_gap = gaps.iter().copied().fold(0.0, f64::max);
    let mut disconnects: BTreeMap<String, u64> = BTreeMap::new();
    for c in &all {
        for (k, v) in &c.disconnects {
            *disconnects.entry(k.clone()).or_default() += v;
        }
    }
    let subscriber_sessions_lost: u64 = subs.iter().map(|s| s.client.sessions_lost).sum();
    let publisher_sessions_lost: u64 = pubs.iter().map(|p| p.client.sessions_lost).sum();
    json!({
        "published": published,
        "acked": acked,
        "refused": refused,
        "unacked": unacked,
        "received_unique": received_unique,
        "lost": lost,
        "lost_deliveries": lost_deliveries,
        "lost_deliveries_to_lost_sessions": lost_to_lost_sessions,
        "lost_deliveries_to_live_sessions": lost_to_live_sessions,
        "expected_deliveries": expected_deliveries,
        "deliveries_unique": deliveries_unique,
        "duplicates": duplicates,
        "max_reconnect_gap_s": round3(max_gap),
        "reconnects": gaps.len(),
        "sessions_lost_subscribers": subscriber_sessions_lost,
        "sessions_lost_publishers": publisher_sessions_lost,
        "disconnects": disconnects,
        "lost_examples": lost_examples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(publishers: usize, subscribers: usize, groups: usize) -> Shared {
        Shared::new(Args::parse_from([
            "corvid-liveload",
            "--endpoints",
            "127.0.0.1:1883",
            "--publishers",
            &publishers.to_string(),
            "--subscribers",
            &subscribers.to_string(),
            "--groups",
            &groups.to_string(),
        ]))
    }

    fn client(sessions_lost: u64, gaps: &[f64]) -> ClientSummary {
        ClientSummary {
            gaps: gaps.to_vec(),
            sessions_lost,
            disconnects: BTreeMap::new(),
        }
    }

    fn sub(index: usize, got: &[(u32, u64, u32)], sessions_lost: u64) -> SubLedger {
        SubLedger {
            index,
            received: got.iter().map(|&(p, s, n)| ((p, s), n)).collect(),
            client: client(sessions_lost, &[]),
        }
    }

    #[test]
    fn stamps_round_trip_and_foreign_payloads_are_ignored() {
        let stamp = Stamp {
            kind: KIND_MEASURED,
            publisher: 7,
            seq: 123_456,
            sent_us: 99,
        };
        assert_eq!(Stamp::decode(&stamp.encode()), Some(stamp));
        assert_eq!(Stamp::decode(b"hello"), None);
        assert_eq!(Stamp::decode(&[0u8; PAYLOAD_LEN]), None);
    }

    #[test]
    fn topics_put_each_publisher_in_exactly_one_group() {
        let sh = shared(4, 6, 2);
        // Publisher 1 is in group 1, whose subscribers are 1, 3 and 5.
        assert_eq!(sh.topic(1), "live/liveload/1/1");
        assert_eq!(sh.filter(3), "live/liveload/1/#");
        assert_eq!(sh.subscribers_in_group(1), 3);
        // More groups than subscribers: capped, so no group is without subscribers.
        assert_eq!(shared(4, 2, 10).groups, 2);
    }

    /// Two publishers in two groups, two subscribers per group. Publisher 0 (group 0, subscribers
    /// 0 and 2) sent 4 messages: 0 and 1 reached both, 2 reached only subscriber 2 (whose session
    /// survived), 3 was never acknowledged. Publisher 1 (group 1, subscribers 1 and 3) sent 3:
    /// all acknowledged, 1 missed subscriber 3, which came back without its session, and 2 was
    /// refused (PUBACK 0x87). Subscriber 1 got message 0 three times.
    #[test]
    fn accounting_counts_per_message_and_classifies_losses() {
        let sh = shared(2, 4, 2);
        let pubs = vec![
            PubLedger {
                index: 0,
                published: 4,
                outcome: vec![Some(0), Some(0), Some(0), None],
                client: client(0, &[0.5]),
            },
            PubLedger {
                index: 1,
                published: 3,
                outcome: vec![Some(0), Some(0x10), Some(0x87)],
                client: client(0, &[]),
            },
        ];
        let subs = vec![
            sub(0, &[(0, 0, 1), (0, 1, 1)], 0),
            sub(1, &[(1, 0, 3), (1, 1, 1)], 0),
            sub(2, &[(0, 0, 1), (0, 1, 2), (0, 2, 1)], 0),
            sub(3, &[(1, 0, 1)], 1),
        ];
        let r = account(&sh, &pubs, &subs);
        assert_eq!(r["published"], 7);
        assert_eq!(
            r["acked"], 5,
            "0x10 (no matching subscribers) is a success code"
        );
        assert_eq!(r["refused"], 1);
        assert_eq!(r["unacked"], 1);
        assert_eq!(
            r["received_unique"], 3,
            "p0/0, p0/1 and p1/0 reached everyone"
        );
        assert_eq!(r["lost"], 2, "p0/2 and p1/1");
        assert_eq!(r["lost_deliveries"], 2);
        assert_eq!(
            r["lost_deliveries_to_live_sessions"], 1,
            "p0/2 at subscriber 0"
        );
        assert_eq!(
            r["lost_deliveries_to_lost_sessions"], 1,
            "p1/1 at subscriber 3"
        );
        assert_eq!(r["expected_deliveries"], 10);
        assert_eq!(
            r["duplicates"], 3,
            "two extra copies at subscriber 1, one at 2"
        );
        assert_eq!(r["reconnects"], 1);
        assert_eq!(r["max_reconnect_gap_s"], 0.5);
        assert_eq!(r["sessions_lost_subscribers"], 1);
    }
}
