//! Tracing one client id or one topic filter into a file for a limited time, as
//! `emqx_ctl trace client|topic` does: every packet in and out, one line each, with an RFC 3339
//! timestamp, the direction and a summary.
//!
//! Connection tasks ask [`Tracer::active`] (one atomic load) before anything else, so a broker
//! with no trace running formats nothing. Traces stop by themselves after their duration.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use corvid_api::{TraceInfo, TraceKind, TraceTarget};
use parking_lot::{Mutex, RwLock};

use crate::codec::{Inbound, Outbound, Publish};
use crate::metrics::Metrics;
use crate::topic;

/// What a trace follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every packet of one client id.
    Client(String),
    /// Every PUBLISH whose topic matches the filter, whoever sends or receives it.
    Topic(String),
}

impl From<&Target> for TraceTarget {
    fn from(t: &Target) -> Self {
        let (kind, value) = match t {
            Target::Client(c) => (TraceKind::Client, c),
            Target::Topic(f) => (TraceKind::Topic, f),
        };
        TraceTarget {
            kind,
            value: value.clone(),
        }
    }
}

/// Why a trace cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A trace with this name runs already.
    #[error("a trace named {0:?} is already running")]
    Exists(String),
    /// Bad name or filter.
    #[error("{0}")]
    Invalid(String),
    /// The file could not be created.
    #[error("cannot create {path}: {source}")]
    File {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running trace.
#[derive(Debug)]
pub struct Trace {
    /// Name (file name without `.log`).
    pub name: String,
    /// What it follows.
    pub target: Target,
    /// Log file.
    pub path: PathBuf,
    /// Start, seconds since the epoch.
    pub started_at: u64,
    /// Planned end, seconds since the epoch.
    pub ends_at: u64,
    lines: AtomicU64,
    file: Mutex<std::fs::File>,
    stopped: AtomicBool,
}

/// Packet direction.
#[derive(Debug, Clone, Copy)]
pub enum Dir {
    /// From the client.
    In,
    /// To the client.
    Out,
}

/// All running traces.
#[derive(Debug)]
pub struct Tracer {
    active: AtomicBool,
    traces: RwLock<Vec<Arc<Trace>>>,
    dir: PathBuf,
    max_duration: Duration,
    metrics: Metrics,
}

impl Tracer {
    /// No traces yet; files go to `dir`, durations are capped at `max_duration`.
    pub fn new(dir: PathBuf, max_duration: Duration, metrics: Metrics) -> Self {
        Tracer {
            active: AtomicBool::new(false),
            traces: RwLock::new(Vec::new()),
            dir,
            max_duration,
            metrics,
        }
    }

    /// Whether any trace is running: the cheap check before anything else.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Starts a trace; it stops by itself after `duration` (capped by `trace.max_duration`).
    pub fn start(
        self: &Arc<Self>,
        name: Option<String>,
        target: Target,
        duration: Duration,
    ) -> Result<TraceInfo, TraceError> {
        if let Target::Topic(f) = &target {
            topic::validate_filter(f)
                .map_err(|e| TraceError::Invalid(format!("topic filter {f:?}: {e}")))?;
        }
        let name = name.unwrap_or_else(|| match &target {
            Target::Client(c) => format!("client-{c}"),
            Target::Topic(t) => format!("topic-{t}"),
        });
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() || name.starts_with('.') {
            return Err(TraceError::Invalid(format!("bad trace name {name:?}")));
        }
        let duration = duration.min(self.max_duration).max(Duration::from_secs(1));
        let path = self.dir.join(format!("{name}.log"));
        let mut traces = self.traces.write();
        if traces.iter().any(|t| t.name == name) {
            return Err(TraceError::Exists(name));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| TraceError::File {
            path: self.dir.clone(),
            source,
        })?;
        let file = std::fs::File::create(&path).map_err(|source| TraceError::File {
            path: path.clone(),
            source,
        })?;
        let now = crate::session::unix_now();
        let t = Arc::new(Trace {
            name: name.clone(),
            target,
            path,
            started_at: now,
            ends_at: now + duration.as_secs(),
            lines: AtomicU64::new(0),
            file: Mutex::new(file),
            stopped: AtomicBool::new(false),
        });
        traces.push(t.clone());
        self.active.store(true, Ordering::Relaxed);
        self.metrics.traces_started.inc();
        self.metrics.traces_active.set(traces.len() as i64);
        drop(traces);
        tracing::info!(trace = %name, file = %t.path.display(), secs = duration.as_secs(), "trace started");
        let me = self.clone();
        let weak = Arc::downgrade(&t);
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            if let Some(t) = weak.upgrade() {
                if !t.stopped.load(Ordering::Relaxed) {
                    me.stop(&t.name);
                }
            }
        });
        Ok(info(&t))
    }

    /// Stops a trace by name; returns its final state.
    pub fn stop(&self, name: &str) -> Option<TraceInfo> {
        let mut traces = self.traces.write();
        let pos = traces.iter().position(|t| t.name == name)?;
        let t = traces.remove(pos);
        t.stopped.store(true, Ordering::Relaxed);
        let _ = t.file.lock().flush();
        self.active.store(!traces.is_empty(), Ordering::Relaxed);
        self.metrics.traces_active.set(traces.len() as i64);
        tracing::info!(trace = %name, lines = t.lines.load(Ordering::Relaxed), "trace stopped");
        Some(info(&t))
    }

    /// Running traces.
    pub fn list(&self) -> Vec<TraceInfo> {
        self.traces.read().iter().map(|t| info(t)).collect()
    }

    /// Whether a packet of `client_id` (with `topic`, for PUBLISH) is traced.
    pub fn is_traced(&self, client_id: &str, topic: Option<&str>) -> bool {
        self.active() && self.traces.read().iter().any(|t| t.wants(client_id, topic))
    }

    /// Writes one line to every trace that follows this packet.
    pub fn record(&self, client_id: &str, topic: Option<&str>, dir: Dir, summary: &str) {
        let traces = self.traces.read();
        let mut line = None;
        for t in traces.iter().filter(|t| t.wants(client_id, topic)) {
            let line = line.get_or_insert_with(|| {
                format!(
                    "{} {} {} {}\n",
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    match dir {
                        Dir::In => "IN ",
                        Dir::Out => "OUT",
                    },
                    client_id,
                    summary
                )
            });
            let mut f = t.file.lock();
            if f.write_all(line.as_bytes()).is_ok() {
                t.lines.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Trace {
    fn wants(&self, client_id: &str, topic: Option<&str>) -> bool {
        match &self.target {
            Target::Client(c) => c == client_id,
            Target::Topic(f) => topic.is_some_and(|t| topic::matches(f, t)),
        }
    }
}

fn info(t: &Trace) -> TraceInfo {
    TraceInfo {
        name: t.name.clone(),
        target: TraceTarget::from(&t.target),
        file: t.path.display().to_string(),
        started_at: t.started_at,
        ends_at: t.ends_at,
        lines: t.lines.load(Ordering::Relaxed),
    }
}

fn payload_preview(p: &[u8]) -> String {
    const MAX: usize = 64;
    let cut = &p[..p.len().min(MAX)];
    let s = String::from_utf8_lossy(cut);
    let more = if p.len() > MAX { "..." } else { "" };
    format!("{s:?}{more}")
}

/// A one-line summary of a PUBLISH either way, and its topic.
fn summary_publish(p: &Publish) -> (String, Option<String>) {
    (
        format!(
            "PUBLISH topic={} qos={} retain={} dup={} packet_id={:?} payload={}",
            p.topic,
            p.qos.value(),
            p.retain,
            p.dup,
            p.packet_id.map(|i| i.get()),
            payload_preview(&p.payload)
        ),
        Some(p.topic.to_string()),
    )
}

/// A one-line summary of a packet from a client, and its topic if it is a PUBLISH.
pub fn summary_in(p: &Inbound) -> (String, Option<String>) {
    match p {
        Inbound::Connect(c) => (
            format!(
                "CONNECT protocol={} clean_start={} keepalive={} username={:?}",
                c.protocol.label(),
                c.clean_start,
                c.keep_alive,
                c.username.as_deref()
            ),
            None,
        ),
        Inbound::Publish(p) => summary_publish(p),
        Inbound::PubAck(id) => (format!("PUBACK packet_id={id}"), None),
        Inbound::PubRec(id, rc) => (format!("PUBREC packet_id={id} reason=0x{rc:02X}"), None),
        Inbound::PubRel(id) => (format!("PUBREL packet_id={id}"), None),
        Inbound::PubComp(id) => (format!("PUBCOMP packet_id={id}"), None),
        Inbound::Subscribe {
            packet_id, filters, ..
        } => {
            let f: Vec<String> = filters
                .iter()
                .map(|(f, o)| format!("{f}(qos={})", o.qos.value()))
                .collect();
            (
                format!("SUBSCRIBE packet_id={packet_id} filters=[{}]", f.join(", ")),
                None,
            )
        }
        Inbound::Unsubscribe { packet_id, filters } => {
            let f: Vec<&str> = filters.iter().map(|f| &**f).collect();
            (
                format!(
                    "UNSUBSCRIBE packet_id={packet_id} filters=[{}]",
                    f.join(", ")
                ),
                None,
            )
        }
        Inbound::PingReq => ("PINGREQ".into(), None),
        Inbound::Disconnect { reason, .. } => (format!("DISCONNECT reason=0x{reason:02X}"), None),
        Inbound::Auth => ("AUTH".into(), None),
        Inbound::ServerOnly(n) => (n.to_string(), None),
    }
}

/// A one-line summary of a packet to a client, and its topic if it is a PUBLISH.
pub fn summary_out(p: &Outbound) -> (String, Option<String>) {
    match p {
        Outbound::ConnAck {
            session_present,
            code,
            ..
        } => (
            format!("CONNACK code={code:?} session_present={session_present}"),
            None,
        ),
        Outbound::Publish(p) => summary_publish(p),
        Outbound::PubAck(id, rc) => (format!("PUBACK packet_id={id} reason=0x{rc:02X}"), None),
        Outbound::PubRec(id, rc) => (format!("PUBREC packet_id={id} reason=0x{rc:02X}"), None),
        Outbound::PubRel(id, rc) => (format!("PUBREL packet_id={id} reason=0x{rc:02X}"), None),
        Outbound::PubComp(id, rc) => (format!("PUBCOMP packet_id={id} reason=0x{rc:02X}"), None),
        Outbound::SubAck(id, codes) => (format!("SUBACK packet_id={id} codes={codes:02X?}"), None),
        Outbound::UnsubAck(id, codes) => {
            (format!("UNSUBACK packet_id={id} codes={codes:02X?}"), None)
        }
        Outbound::PingResp => ("PINGRESP".into(), None),
        Outbound::Disconnect { reason, .. } => (format!("DISCONNECT reason=0x{reason:02X}"), None),
    }
}
