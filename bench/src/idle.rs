//! The idle-connection benchmark: open many MQTT connections at a bounded rate, keep them idle
//! (pinging only as keep-alive requires) and hold them, so a harness can read the broker's memory
//! per idle connection while they are all up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{info, warn};

use crate::connection::Connection;
use crate::error::{BenchError, Result};
use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::pubsub::{run_id, stopped};
use crate::wire::{Protocol, QoS};

/// Read buffer for an idle connection: it only ever sees CONNACK and PINGRESP.
const IDLE_READ_CHUNK: usize = 64;

/// Everything an idle-connection run needs.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Broker address, `host:port`.
    pub addr: String,
    /// MQTT protocol version.
    pub protocol: Protocol,
    /// Connections to open.
    pub connections: usize,
    /// New connections per second; 0 = as fast as `concurrency` allows.
    pub rate: f64,
    /// How long to hold them once all are up.
    pub hold: Duration,
    /// Handshakes allowed at the same time.
    pub concurrency: usize,
    /// MQTT keep-alive in seconds (pings go out at half of it).
    pub keep_alive: u16,
    /// Limit for each handshake step.
    pub connect_timeout: Duration,
    /// Created (with the established count) once every connection is up or has failed.
    pub ready_file: Option<PathBuf>,
    /// Each connection subscribes to a topic of its own (QoS 1) before it counts as up: the
    /// memory of an idle device that listens for commands.
    pub subscribe: bool,
}

/// Result of an idle-connection run.
#[derive(Debug, Clone, Serialize)]
pub struct ConnReport {
    /// Connections requested.
    pub requested: usize,
    /// Connections that got a successful CONNACK.
    pub established: u64,
    /// Connections that failed to connect.
    pub connect_errors: u64,
    /// Established connections the broker closed while they were held.
    pub dropped: u64,
    /// Time from the first connect to the last CONNACK, in seconds.
    pub connect_s: f64,
    /// Established connections per second over `connect_s`.
    pub connects_per_sec: f64,
    /// TCP connect + CONNECT/CONNACK latency.
    pub handshake: LatencySummary,
    /// Seconds the connections were held.
    pub hold_s: f64,
    /// Open-file limit the generator ran with.
    pub nofile_limit: u64,
}

/// Opens, holds and closes `cfg.connections` idle connections.
pub async fn run(cfg: ConnConfig, nofile_limit: u64) -> Result<ConnReport> {
    if cfg.connections as u64 + 64 > nofile_limit {
        return Err(BenchError::Config(format!(
            "{} connections need more file descriptors than the limit of {nofile_limit}",
            cfg.connections
        )));
    }
    let id = run_id();
    let gate = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::channel::<Option<Duration>>(1024);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cfg = Arc::new(cfg);
    let started = Instant::now();
    let interval = (cfg.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.rate));

    let spawner = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let mut handles = Vec::with_capacity(cfg.connections);
            for i in 0..cfg.connections {
                if let Some(iv) = interval {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(
                        started + iv.mul_f64(i as f64),
                    ))
                    .await;
                }
                let task = IdleTask {
                    client_id: format!("cb-{id}-c{i}"),
                    cfg: cfg.clone(),
                    gate: gate.clone(),
                    done: done_tx.clone(),
                    stop: stop_rx.clone(),
                };
                handles.push(tokio::spawn(task.run()));
            }
            handles
        })
    };

    let mut handshake = LatencyHistogram::new(3)?;
    let (mut established, mut failed) = (0u64, 0u64);
    let mut last_progress = Instant::now();
    while established + failed < cfg.connections as u64 {
        match done_rx.recv().await {
            Some(Some(d)) => {
                established += 1;
                handshake.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            }
            Some(None) => failed += 1,
            None => break,
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            info!(established, failed, "connecting");
            last_progress = Instant::now();
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    info!(
        established,
        failed, connect_s, "all connections settled; holding"
    );
    if let Some(path) = &cfg.ready_file {
        if let Err(e) = std::fs::write(path, format!("{established}\n")) {
            warn!(path = %path.display(), error = %e, "could not write ready file");
        }
    }
    tokio::time::sleep(cfg.hold).await;
    let _ = stop_tx.send(true);
    let handles = spawner.await.unwrap_or_default();
    let mut dropped = 0u64;
    for h in handles {
        if matches!(h.await, Ok(IdleOutcome::Dropped)) {
            dropped += 1;
        }
    }
    Ok(ConnReport {
        requested: cfg.connections,
        established,
        connect_errors: failed,
        dropped,
        connect_s,
        connects_per_sec: established as f64 / connect_s.max(1e-9),
        handshake: handshake.summary(),
        hold_s: cfg.hold.as_secs_f64(),
        nofile_limit,
    })
}

/// How one idle connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleOutcome {
    Failed,
    Held,
    Dropped,
}

/// One idle connection.
struct IdleTask {
    client_id: String,
    cfg: Arc<ConnConfig>,
    gate: Arc<Semaphore>,
    done: mpsc::Sender<Option<Duration>>,
    stop: watch::Receiver<bool>,
}

impl IdleTask {
    async fn run(mut self) -> IdleOutcome {
        let t0 = Instant::now();
        let conn = {
            let _permit = self.gate.acquire().await;
            Connection::open(
                &self.cfg.addr,
                self.cfg.protocol,
                &self.client_id,
                self.cfg.keep_alive,
                IDLE_READ_CHUNK,
                self.cfg.connect_timeout,
            )
            .await
        };
        let conn = match conn {
            Ok(mut c) if self.cfg.subscribe => {
                let filter = format!("{}/cmd", self.client_id);
                c.subscribe(&filter, QoS::AtLeastOnce, self.cfg.connect_timeout)
                    .await
                    .map(|()| c)
            }
            other => other,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(client = %self.client_id, error = %e, "connect failed");
                let _ = self.done.send(None).await;
                return IdleOutcome::Failed;
            }
        };
        let _ = self.done.send(Some(t0.elapsed())).await;
        let ping_every = Duration::from_secs(u64::from(self.cfg.keep_alive.max(2)) / 2);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        loop {
            tokio::select! {
                _ = stopped(&mut self.stop) => break,
                r = conn.read_more() => {
                    if r.is_err() {
                        return IdleOutcome::Dropped;
                    }
                    // Only PINGRESP is expected; decode to keep the buffer from growing.
                    while let Ok(Some(_)) = conn.try_packet() {}
                }
                _ = ping.tick() => {
                    if conn.wire.pingreq(&mut conn.wbuf).is_err() || conn.flush().await.is_err() {
                        return IdleOutcome::Dropped;
                    }
                }
            }
        }
        conn.close().await;
        IdleOutcome::Held
    }
}
