//! Starting and stopping a whole broker: listeners, admin endpoint, graceful shutdown. Shared by
//! the binary and the tests, so tests run exactly what users run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use corvid_core::admission::ConnCount;

use crate::bridge::Bridges;
use crate::broker::{Broker, Parts};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::eventstore::EventStore;
use crate::listener::{self, BindError};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener failed.
    #[error(transparent)]
    Listener(#[from] BindError),
    /// The admin port could not be bound.
    #[error("admin.bind: cannot bind {addr}: {source}")]
    Admin {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The admin token file is missing or empty: an API that cannot check its token is refused.
    #[error("admin.token_file: {0}")]
    AdminToken(String),
    /// Metrics registration failed (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The cluster layer could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The configuration could not be turned into broker state (auth, ACL, webhooks).
    #[error(transparent)]
    Setup(#[from] crate::broker::BrokerError),
    /// The event store cannot be set up.
    #[error(transparent)]
    EventStore(#[from] crate::eventstore::EventStoreError),
    /// The bridges cannot be set up.
    #[error(transparent)]
    Bridges(#[from] crate::bridge::BridgeError),
}

/// One broker process: the core and what the server wired into it. Dereferences to the
/// [`Broker`], so the admin API reads the core's state and the parts beside it alike.
#[derive(Debug)]
pub struct Server {
    /// The core.
    pub broker: Arc<Broker>,
    /// The cluster layer, once it is up (membership, evacuation, rebalancing).
    pub cluster: std::sync::OnceLock<Arc<Cluster>>,
    /// Bridges to other brokers and Kafka (the broker's tap).
    pub bridges: Arc<Bridges>,
    /// Client events persisted to PostgreSQL / Redis (sinks attached to the broker's hooks).
    pub event_store: EventStore,
}

impl std::ops::Deref for Server {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.broker
    }
}

impl Server {
    /// Builds the broker with the bridges as its tap and the event store's sinks on its hooks.
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let mut parts = Parts::new(&config)?;
        let bridges = Arc::new(Bridges::new(&config.bridges, &parts.metrics)?);
        let event_store = EventStore::new(
            &config.event_store,
            &config.node_name(),
            crate::hooks::now_us(),
            &parts.metrics,
            &mut parts.hooks,
        )?;
        if !bridges.is_empty() {
            parts.tap = Some(bridges.clone());
        }
        Ok(Arc::new(Server {
            broker: Broker::with_parts(config, parts)?,
            cluster: std::sync::OnceLock::new(),
            bridges,
            event_store,
        }))
    }
}

/// A started broker.
#[derive(Debug)]
pub struct Running {
    /// Shared state.
    pub broker: Arc<Broker>,
    /// The broker with what the server wired into it.
    pub server: Arc<Server>,
    /// Bound client listeners by name.
    pub listeners: HashMap<&'static str, SocketAddr>,
    /// Bound admin address.
    pub admin: SocketAddr,
    tasks: JoinSet<()>,
}

/// Binds everything and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let server = Server::new(config)?;
    let broker = server.broker.clone();
    // Everything the durable store holds is back before any client can connect.
    crate::restore::restore(&broker);
    broker.hooks.start(&broker.shutdown);
    crate::sys::start(broker.clone());
    crate::bridge::start(&broker, &server.bridges);
    let mut tasks = JoinSet::new();
    let mut addrs = HashMap::new();
    let count = Arc::new(ConnCount::default());
    for l in listener::bind_all(&broker).await? {
        if let Ok(a) = l.local_addr() {
            addrs.insert(l.name, a);
        }
        tasks.spawn(l.run(broker.clone(), count.clone()));
    }
    if let Some(file) = &broker.config.admin.token_file {
        crate::admin::read_token(file).map_err(StartError::AdminToken)?;
    }
    let admin_addr = broker.config.admin.listen_addr();
    if admin_addr != broker.config.admin.bind {
        tracing::warn!(
            addr = %admin_addr,
            "no admin.token_file: the admin API listens on loopback only"
        );
    }
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| StartError::Admin {
            addr: admin_addr,
            source,
        })?;
    let admin_addr = admin.local_addr().unwrap_or(admin_addr);
    tracing::info!(addr = %admin_addr, "admin endpoint listening");
    let s = server.clone();
    tasks.spawn(async move {
        if let Err(e) = crate::admin::serve(s, admin).await {
            tracing::error!(error = %e, "admin endpoint failed");
        }
    });
    if broker.config.cluster.discovery != crate::config::Discovery::None {
        let cluster = crate::cluster::Cluster::start(&broker, admin_addr).await?;
        let _ = broker.fabric.set(cluster.clone());
        let _ = server.cluster.set(cluster);
    }
    // Events emitted before this wait in the sinks' buffers.
    server.event_store.start();
    tasks.spawn(return_memory_after_bursts(broker.clone()));
    tracing::info!(node = %broker.node, version = env!("CARGO_PKG_VERSION"), "broker started");
    Ok(Running {
        broker,
        server,
        listeners: addrs,
        admin: admin_addr,
        tasks,
    })
}

impl Running {
    /// Address of a client listener (`mqtt`, `ws`, `mqtts`, `wss`).
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).copied()
    }

    /// What SIGTERM does: in a cluster with peers, evacuate (clients sent to other nodes,
    /// sessions handed off) within `deadline`, leave the cluster, then shut down.
    pub async fn drain_and_shutdown(self, deadline: Duration, rate: u32) {
        let until = tokio::time::Instant::now() + deadline;
        if let Some(c) = self.server.cluster.get() {
            if c.evacuate(rate, None)
                || c.evacuation().state == corvid_api::EvacuationState::Running
            {
                while c.evacuation().state == corvid_api::EvacuationState::Running
                    && tokio::time::Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            c.leave().await;
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        self.shutdown(left.max(Duration::from_secs(1))).await;
    }

    /// Stops accepting, tells connected clients the server is shutting down (MQTT 5 reason
    /// 0x8B) and waits up to `deadline` for their connections to close. Persistent sessions
    /// stay in memory until the process exits (the cluster layer hands them off first); with
    /// `persistence.data_dir` they are in the store, which is synced and closed last.
    pub async fn shutdown(mut self, deadline: Duration) {
        let b = &self.broker;
        b.accepting.store(false, Ordering::Relaxed);
        b.shutdown.cancel();
        let until = tokio::time::Instant::now() + deadline;
        while b.metrics.connections.get() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = b.metrics.connections.get();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain deadline reached with clients still connected"
            );
        }
        // Clients' disconnect events are queued by now: give the event store a moment to
        // write them.
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        self.server
            .event_store
            .finish(left.max(Duration::from_secs(2)))
            .await;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        if let Some(d) = &b.durable {
            d.close().await;
        }
        tracing::info!("broker stopped");
    }
}

/// How often the broker looks whether clients have left since the last look.
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// Connections that must have ended (or parked) since the last trim before the allocator is
/// asked again.
const TRIM_AFTER_ENDED: u64 = 256;

/// Gives memory back to the kernel after a crowd of clients leaves (a reconnect storm that
/// ended, a load balancer that moved clients away): the allocator keeps freed pages, so without
/// this the pod keeps paying for its peak. Releasing walks the heap, so it runs at most
/// every few seconds and only when many connections have ended since the last time.
async fn return_memory_after_bursts(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let m = &broker.metrics;
    // Connections ended = accepted minus still open; a parked connection freed its task too.
    let ended = || {
        let parks = broker
            .parker()
            .map_or(0, |p| p.parks.load(Ordering::Relaxed));
        m.connections_total
            .get()
            .saturating_sub(m.connections.get().max(0) as u64)
            + parks
    };
    let mut last = ended();
    loop {
        tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = ended();
        if now.saturating_sub(last) < TRIM_AFTER_ENDED {
            continue;
        }
        let started = std::time::Instant::now();
        let released = crate::memory::release_free_memory();
        tracing::debug!(
            ended = now - last,
            released,
            took_us = started.elapsed().as_micros() as u64,
            "returned free heap to the kernel"
        );
        last = now;
    }
}
