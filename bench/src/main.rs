//! Entry point of `corvid-bench`: parses flags, raises the open-file limit, runs one benchmark on
//! a Tokio runtime and prints a table or one JSON object.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use corvid_bench::pubsub::{PubSubConfig, Scenario};
use corvid_bench::wire::{protocol_from_level, qos_from_level};
use corvid_bench::{backlog, idle, pubsub, report, rlimit};

/// Open-loop MQTT load generator.
#[derive(Debug, Parser)]
#[command(name = "corvid-bench", version, about)]
struct Cli {
    /// Tokio worker threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Which benchmark to run.
#[derive(Debug, Subcommand)]
enum Command {
    /// Publish/subscribe throughput, latency, loss and duplicates.
    PubSub(PubSubArgs),
    /// Open idle connections and hold them (memory per idle connection).
    Conn(ConnArgs),
    /// Queue a QoS 1 backlog for offline persistent sessions (`fill`), or reconnect them and
    /// count what the broker kept (`check`, after a restart).
    Backlog(BacklogArgs),
}

/// Which half of the backlog run.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BacklogPhase {
    /// Create the sessions, leave them offline, publish the backlog.
    Fill,
    /// Reconnect every session and receive its backlog.
    Check,
}

/// Flags of `backlog`.
#[derive(Debug, Args)]
struct BacklogArgs {
    #[command(flatten)]
    target: Target,
    /// Which half to run.
    #[arg(long, value_enum)]
    phase: BacklogPhase,
    /// Persistent sessions.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Messages in all (spread evenly over the sessions).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Publishing connections (fill).
    #[arg(long, default_value_t = 10)]
    publishers: usize,
    /// Payload bytes (at least 8: the message's number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Unacknowledged publishes per publisher.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Client id and topic prefix (the same for both phases).
    #[arg(long, default_value = "corvid-backlog")]
    prefix: String,
}

/// Where the broker is and how to talk to it.
#[derive(Debug, Args)]
struct Target {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker MQTT port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// MQTT protocol level: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    protocol: u8,
    /// MQTT keep-alive in seconds.
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Seconds allowed for each handshake step.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl Target {
    fn addr(&self) -> String {
        host_port(&self.host, self.port)
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Flags of `pub-sub`.
#[derive(Debug, Args)]
struct PubSubArgs {
    #[command(flatten)]
    target: Target,
    /// Host the subscribers connect to (default: --host); with --sub-port, publishers on one
    /// cluster node and subscribers on another.
    #[arg(long)]
    sub_host: Option<String>,
    /// MQTT port the subscribers connect to (default: --port).
    #[arg(long)]
    sub_port: Option<u16>,
    /// Topic layout.
    #[arg(long, value_enum, default_value = "p2p")]
    scenario: Scenario,
    /// Publishing connections.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Subscribing connections (p2p: defaults to --publishers).
    #[arg(long)]
    subscribers: Option<usize>,
    /// QoS 0, 1 or 2.
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes (minimum 28: the timestamp/sequence header).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Total offered msg/s over all publishers, sent on a schedule; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Longest wait for outstanding deliveries after sending stops, in seconds.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Topic prefix (a per-run id is appended).
    #[arg(long, default_value = "corvid-bench")]
    topic_prefix: String,
    /// Unacknowledged QoS 1/2 publishes per publisher.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// With --rate 0: messages in flight end to end, per publisher.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Subscribers keep their sessions (clean session 0 / session expiry 3600 s), so a broker
    /// with durable sessions stores their deliveries before acknowledging the publishes.
    #[arg(long)]
    persistent_subscribers: bool,
}

/// Flags of `conn`.
#[derive(Debug, Args)]
struct ConnArgs {
    #[command(flatten)]
    target: Target,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// New connections per second (0 = limited only by --connect-concurrency).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds to hold the connections once all are up.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// File to create once every connection is established (for harnesses sampling memory).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Each connection subscribes (QoS 1) to a topic of its own before it counts as up.
    #[arg(long)]
    subscribe: bool,
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{name} must be a non-negative number of seconds"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("starting the Tokio runtime")?;
    match cli.command {
        Command::PubSub(a) => {
            let need = (a.publishers + a.subscribers.unwrap_or(a.publishers)) as u64 + 256;
            let nofile = rlimit::raise_nofile(need.max(4096)).context("raising RLIMIT_NOFILE")?;
            tracing::debug!(nofile, "open-file limit");
            if !a.rate.is_finite() || a.rate < 0.0 {
                anyhow::bail!("--rate must be a non-negative number");
            }
            let cfg = PubSubConfig {
                addr: a.target.addr(),
                sub_addr: (a.sub_host.is_some() || a.sub_port.is_some()).then(|| {
                    host_port(
                        a.sub_host.as_deref().unwrap_or(&a.target.host),
                        a.sub_port.unwrap_or(a.target.port),
                    )
                }),
                protocol: protocol_from_level(a.target.protocol)?,
                scenario: a.scenario,
                publishers: a.publishers,
                subscribers: a.subscribers.unwrap_or(match a.scenario {
                    Scenario::P2p => a.publishers,
                    _ => 1,
                }),
                qos: qos_from_level(a.qos)?,
                payload: a.payload,
                rate: a.rate,
                duration: secs("duration", a.duration)?,
                warmup: secs("warmup", a.warmup)?,
                drain: secs("drain", a.drain)?,
                topic_prefix: a.topic_prefix,
                inflight: a.inflight,
                window: a.window,
                connect_concurrency: a.target.connect_concurrency,
                keep_alive: a.target.keep_alive,
                connect_timeout: secs("connect-timeout", a.target.connect_timeout)?,
                persistent_subscribers: a.persistent_subscribers,
            };
            let r = rt
                .block_on(pubsub::run(cfg))
                .context("pub-sub run failed")?;
            if a.target.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", report::pubsub_table(&r));
            }
        }
        Command::Conn(a) => {
            let nofile = rlimit::raise_nofile(a.connections as u64 + 1024)
                .context("raising RLIMIT_NOFILE")?;
            if !a.rate.is_finite() || a.rate < 0.0 {
                anyhow::bail!("--rate must be a non-negative number");
            }
            let cfg = idle::ConnConfig {
                addr: a.target.addr(),
                protocol: protocol_from_level(a.target.protocol)?,
                connections: a.connections,
                rate: a.rate,
                hold: secs("hold", a.hold)?,
                concurrency: a.target.connect_concurrency,
                keep_alive: a.target.keep_alive,
                connect_timeout: secs("connect-timeout", a.target.connect_timeout)?,
                ready_file: a.ready_file,
                subscribe: a.subscribe,
            };
            let r = rt
                .block_on(idle::run(cfg, nofile))
                .context("conn run failed")?;
            if a.target.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", report::conn_table(&r));
            }
        }
        Command::Backlog(a) => {
            rlimit::raise_nofile(4096).context("raising RLIMIT_NOFILE")?;
            let cfg = backlog::BacklogConfig {
                addr: a.target.addr(),
                protocol: protocol_from_level(a.target.protocol)?,
                sessions: a.sessions,
                messages: a.messages,
                publishers: a.publishers,
                payload: a.payload,
                inflight: a.inflight,
                prefix: a.prefix,
                step_timeout: secs("connect-timeout", a.target.connect_timeout)?,
            };
            let json = match a.phase {
                BacklogPhase::Fill => serde_json::to_string(
                    &rt.block_on(backlog::fill(cfg))
                        .context("backlog fill failed")?,
                )?,
                BacklogPhase::Check => serde_json::to_string(
                    &rt.block_on(backlog::check(cfg))
                        .context("backlog check failed")?,
                )?,
            };
            println!("{json}");
        }
    }
    Ok(())
}
