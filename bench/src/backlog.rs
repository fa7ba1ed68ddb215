//! The offline-backlog benchmark: what a broker holds for persistent sessions that are away
//! (disk per queued message) and whether a restart gives all of it back. `fill` creates
//! persistent sessions, leaves them offline and publishes a backlog for them at QoS 1 until
//! every PUBACK is in; the harness then measures the broker's files, restarts it (kill -9 or
//! stop) and times its recovery; `check` reconnects every session and counts what arrives.

use std::collections::HashSet;
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::connection::Connection;
use crate::wire::{ConnectOptions, Incoming, Protocol, QoS};
use crate::{BenchError, Result};

/// Read buffer per connection.
const READ_CHUNK: usize = 16 * 1024;
/// Sessions reconnected at once by `check`.
const CHECK_CONCURRENCY: usize = 50;

/// One backlog run.
#[derive(Debug, Clone)]
pub struct BacklogConfig {
    /// Broker `host:port`.
    pub addr: String,
    /// Protocol of every connection.
    pub protocol: Protocol,
    /// Persistent sessions the backlog is queued for.
    pub sessions: usize,
    /// Messages in all, spread evenly over the sessions (rounded down to a multiple).
    pub messages: usize,
    /// Publishing connections.
    pub publishers: usize,
    /// Payload bytes.
    pub payload: usize,
    /// Unacknowledged publishes per publisher.
    pub inflight: usize,
    /// Client ids and topics start with this.
    pub prefix: String,
    /// Each handshake step's deadline, and the longest wait for any one packet.
    pub step_timeout: Duration,
}

impl BacklogConfig {
    fn per_session(&self) -> usize {
        self.messages / self.sessions.max(1)
    }

    fn client_id(&self, i: usize) -> String {
        format!("{}-b{i}", self.prefix)
    }

    fn topic(&self, i: usize) -> String {
        format!("{}/backlog/{i}", self.prefix)
    }

    fn persistent() -> ConnectOptions {
        ConnectOptions {
            clean_start: false,
            keep_alive: 60,
            session_expiry: 3600,
        }
    }
}

/// What `fill` did.
#[derive(Debug, Serialize)]
pub struct FillReport {
    /// Sessions left offline with a subscription.
    pub sessions: usize,
    /// Messages acknowledged by the broker.
    pub acknowledged: usize,
    /// Seconds the publishing took.
    pub publish_secs: f64,
}

/// What `check` found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// Sessions the broker still had (CONNACK session present).
    pub sessions_present: usize,
    /// Distinct messages received.
    pub received: usize,
    /// Messages expected and not received.
    pub lost: usize,
    /// Seconds from the first reconnect to the last message.
    pub drain_secs: f64,
}

/// Creates the sessions (subscribed, then offline) and publishes the backlog.
pub async fn fill(cfg: BacklogConfig) -> Result<FillReport> {
    if cfg.sessions == 0 || cfg.publishers == 0 || cfg.inflight == 0 || cfg.payload < 8 {
        return Err(BenchError::Config(
            "backlog needs sessions, publishers and inflight ≥ 1 and payload ≥ 8".into(),
        ));
    }
    for i in 0..cfg.sessions {
        let mut c = Connection::tcp(&cfg.addr, cfg.protocol, 256, cfg.step_timeout).await?;
        c.handshake(
            &cfg.client_id(i),
            BacklogConfig::persistent(),
            cfg.step_timeout,
        )
        .await?;
        c.subscribe(&cfg.topic(i), QoS::AtLeastOnce, cfg.step_timeout)
            .await?;
        c.close().await;
    }
    let per = cfg.per_session();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for p in 0..cfg.publishers {
        let cfg = cfg.clone();
        tasks.spawn(async move { publish_share(&cfg, p, per).await });
    }
    let mut acknowledged = 0;
    while let Some(r) = tasks.join_next().await {
        acknowledged += r.map_err(|e| BenchError::Config(format!("publisher task: {e}")))??;
    }
    Ok(FillReport {
        sessions: cfg.sessions,
        acknowledged,
        publish_secs: started.elapsed().as_secs_f64(),
    })
}

/// Publisher `p` sends message `n` of every session whose index is `p` modulo the publishers,
/// so each session's backlog comes from one connection, in order. Returns the PUBACKs.
async fn publish_share(cfg: &BacklogConfig, p: usize, per: usize) -> Result<usize> {
    let mut c = Connection::open(
        &cfg.addr,
        cfg.protocol,
        &format!("{}-p{p}", cfg.prefix),
        60,
        READ_CHUNK,
        cfg.step_timeout,
    )
    .await?;
    let mine: Vec<ByteString> = (p..cfg.sessions)
        .step_by(cfg.publishers)
        .map(|i| ByteString::from(cfg.topic(i)))
        .collect();
    let total = mine.len() * per;
    let (mut sent, mut acked, mut in_flight) = (0usize, 0usize, 0usize);
    let mut next_id: u16 = 0;
    while acked < total {
        while in_flight < cfg.inflight && sent < total {
            next_id = next_id % u16::MAX + 1;
            let id = NonZeroU16::new(next_id);
            let topic = &mine[sent % mine.len()];
            let mut body = vec![0u8; cfg.payload];
            body[..8].copy_from_slice(&((sent / mine.len()) as u64).to_be_bytes());
            c.wire
                .publish(topic, QoS::AtLeastOnce, id, Bytes::from(body), &mut c.wbuf)?;
            sent += 1;
            in_flight += 1;
        }
        c.flush().await?;
        let packet = timeout(cfg.step_timeout, c.next_packet())
            .await
            .map_err(|_| BenchError::Config("no PUBACK within the step timeout".into()))??;
        if let Incoming::PubAck { code, .. } = packet {
            if code >= 0x80 {
                return Err(BenchError::Config(format!(
                    "the broker refused a publish (0x{code:02x})"
                )));
            }
            acked += 1;
            in_flight -= 1;
            while let Some(Incoming::PubAck { .. }) = c.try_packet()? {
                acked += 1;
                in_flight -= 1;
            }
        }
    }
    c.close().await;
    Ok(acked)
}

/// Reconnects every session and receives its backlog (acknowledging each message).
pub async fn check(cfg: BacklogConfig) -> Result<CheckReport> {
    let per = cfg.per_session();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut next = 0;
    let (mut present, mut received) = (0, 0);
    loop {
        while next < cfg.sessions && tasks.len() < CHECK_CONCURRENCY {
            let cfg = cfg.clone();
            let i = next;
            tasks.spawn(async move { drain_session(&cfg, i, per).await });
            next += 1;
        }
        match tasks.join_next().await {
            Some(r) => {
                let (p, n) = r.map_err(|e| BenchError::Config(format!("session task: {e}")))??;
                present += usize::from(p);
                received += n;
            }
            None => break,
        }
    }
    Ok(CheckReport {
        sessions_present: present,
        received,
        lost: (per * cfg.sessions).saturating_sub(received),
        drain_secs: started.elapsed().as_secs_f64(),
    })
}

/// One session: whether the broker had it, and how many distinct messages of its backlog came
/// (stops at `per`, or when nothing arrives within the step timeout).
async fn drain_session(cfg: &BacklogConfig, i: usize, per: usize) -> Result<(bool, usize)> {
    let mut c = Connection::tcp(&cfg.addr, cfg.protocol, READ_CHUNK, cfg.step_timeout).await?;
    let ack = c
        .handshake(
            &cfg.client_id(i),
            BacklogConfig::persistent(),
            cfg.step_timeout,
        )
        .await?;
    let mut seen = HashSet::with_capacity(per);
    while seen.len() < per {
        let Ok(packet) = timeout(cfg.step_timeout, c.next_packet()).await else {
            break;
        };
        if let Incoming::Publish {
            packet_id, payload, ..
        } = packet?
        {
            if let Some(n) = payload.get(..8) {
                seen.insert(u64::from_be_bytes(n.try_into().unwrap_or([0; 8])));
            }
            if let Some(id) = packet_id {
                c.wire.puback(id, &mut c.wbuf)?;
                c.flush().await?;
            }
        }
    }
    // Forget the session, so a later run starts from nothing.
    c.close_with_expiry(Some(0), Some(cfg.step_timeout)).await;
    Ok((ack.session_present, seen.len()))
}
