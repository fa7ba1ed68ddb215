//! The broker's shared state and the operations that span sessions: publishing (routing,
//! retained store, delivery), subscribing, opening and ending sessions, wills.
//!
//! Connection tasks call into this; the cluster layer will too, which is why these
//! operations take plain values (messages, client ids) and never a socket.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use tokio_util::sync::CancellationToken;

use crate::acl::{Acl, AclError};
use crate::auth::{AuthError, Authenticator};
use crate::codec::{QoS, RetainHandling, SubOptions, Will};
use crate::config::{Config, Takeover};
use crate::fabric::{ArrivedSession, Fabric, Taken};
use crate::hooks::{Event, EventKind, HookError, Hooks};
use crate::message::{Delivery, Message, Msg};
use crate::metrics::Metrics;
use crate::retained::Retained;
use crate::router::{Router, Select, Target};
use crate::session::{ConnInfo, Enqueued, Kick, QueueBounds, Registry, Session, Subscription};
use crate::topic;
use crate::trace::Tracer;

/// How long a client connecting to a node that has just started waits for it to sync with its
/// peers (a few hundred milliseconds in practice) before it is served anyway.
const SYNC_WAIT: Duration = Duration::from_secs(5);

/// Shared broker state; one per process, behind an `Arc`.
#[derive(Debug)]
pub struct Broker {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// This node's name.
    pub node: String,
    /// Subscription trie.
    pub router: Router,
    /// Retained messages.
    pub retained: Retained,
    /// Sessions by client id.
    pub sessions: Registry,
    /// Metrics.
    pub metrics: Metrics,
    /// Cancelled when the broker shuts down.
    pub shutdown: CancellationToken,
    /// Whether new connections are accepted (false while evacuating or shutting down).
    pub accepting: AtomicBool,
    /// Start time.
    pub started: Instant,
    /// The other nodes, as the core's publish, subscribe and takeover paths see them; set
    /// once when clustering is on.
    pub fabric: std::sync::OnceLock<Arc<dyn Fabric>>,
    /// Client authentication.
    pub auth: Authenticator,
    /// Topic access control.
    pub acl: Acl,
    /// Event hooks (webhooks).
    pub hooks: Hooks,
    /// The durable store of sessions and retained messages (`persistence.data_dir`).
    pub durable: Option<crate::persist::Durable>,
    /// Client and topic traces.
    pub tracer: Arc<Tracer>,
    /// Where every message that enters the cluster here is also handed (the bridges).
    tap: Option<Arc<dyn Tap>>,
    /// Session queue bounds and flow-control marks, resolved from `sessions.*` once.
    pub queue_bounds: QueueBounds,
    /// Failed authentications per source address (`limits.max_auth_failures_per_minute`).
    pub auth_failures: crate::limits::AuthFailures,
    /// Where idle connections wait without a task; started by the first connection (`None`
    /// inside if it could not be: connections then keep their tasks).
    parker: std::sync::OnceLock<Option<Arc<crate::park::Parker>>>,
}

/// Why the broker state could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Metrics registration failed (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The `auth` section cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// An ACL rule cannot be compiled.
    #[error("acl.rules: {0}")]
    Acl(#[from] AclError),
    /// A webhook cannot be set up.
    #[error(transparent)]
    Hooks(#[from] HookError),
    /// The durable store under `persistence.data_dir` cannot be opened.
    #[error("persistence.data_dir: {0}")]
    Store(#[from] crate::persist::OpenError),
}

/// A CONNECT refused because another identity owns the session of its client id
/// (`sessions.takeover: owner_only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session of this client id belongs to another identity")]
pub struct NotOwner;

/// Whether `owner` may take over a session owned by `current` under `policy`.
pub fn may_take_over(policy: Takeover, current: Option<&str>, owner: Option<&str>) -> bool {
    policy == Takeover::Any || current == owner
}

/// Result of opening a session for a CONNECT.
#[derive(Debug)]
pub struct Opened {
    /// The session.
    pub session: Arc<Session>,
    /// Whether an existing session was resumed (CONNACK session present).
    pub present: bool,
    /// Generation of this connection's ownership.
    pub generation: u64,
}

/// Takes a copy of every message that enters the cluster on this node (the bridges to other
/// brokers and Kafka): the core hands messages over without naming who takes them.
pub trait Tap: Send + Sync + std::fmt::Debug {
    /// Takes `msg` if it matches; returns how many destinations took it.
    fn tap(&self, msg: &Msg) -> usize;
}

/// What the server attaches to the broker before it is built: the metrics registry and the
/// hooks, on which integrations register (event-store sinks), and the tap.
#[derive(Debug)]
pub struct Parts {
    /// The metrics registry every part registers its figures in.
    pub metrics: Metrics,
    /// Event hooks; sinks may be attached until the broker is built.
    pub hooks: Hooks,
    /// Where published messages are also handed.
    pub tap: Option<Arc<dyn Tap>>,
}

impl Parts {
    /// The metrics registry and the configured webhooks.
    pub fn new(config: &Config) -> Result<Self, BrokerError> {
        let metrics = Metrics::new()?;
        let hooks = Hooks::new(&config.webhooks, &config.node_name(), &metrics)?;
        Ok(Parts {
            metrics,
            hooks,
            tap: None,
        })
    }
}

impl Broker {
    /// Creates the broker state with nothing attached (no bridges, no event store).
    pub fn new(config: Config) -> Result<Arc<Self>, BrokerError> {
        let parts = Parts::new(&config)?;
        Self::with_parts(config, parts)
    }

    /// Creates the broker state from `parts` built for the same `config`.
    pub fn with_parts(config: Config, parts: Parts) -> Result<Arc<Self>, BrokerError> {
        let node = config.node_name();
        let Parts {
            metrics,
            hooks,
            tap,
        } = parts;
        let auth = Authenticator::new(&config.auth, metrics.auth.clone())?
            .with_max_concurrent_hashes(config.limits.max_concurrent_hashes);
        let acl = Acl::new(&config.acl)?;
        let tracer = Arc::new(Tracer::new(
            config.trace.dir.clone(),
            Duration::from_secs(config.trace.max_duration.max(1)),
            metrics.clone(),
        ));
        let config_persistence = config.persistence.clone();
        let durable_metrics = metrics.clone();
        Ok(Arc::new(Broker {
            auth,
            acl,
            hooks,
            tracer,
            tap,
            queue_bounds: QueueBounds::new(&config.sessions),
            auth_failures: crate::limits::AuthFailures::new(
                config.limits.max_auth_failures_per_minute,
            ),
            config: Arc::new(config),
            node,
            router: Router::default(),
            retained: Retained::default(),
            sessions: Registry::default(),
            metrics,
            shutdown: CancellationToken::new(),
            accepting: AtomicBool::new(true),
            started: Instant::now(),
            fabric: std::sync::OnceLock::new(),
            parker: std::sync::OnceLock::new(),
            durable: crate::persist::Durable::open(&config_persistence, &durable_metrics)?,
        }))
    }

    /// Where this broker's idle connections park; started on first use, which must be on the
    /// broker's runtime.
    pub fn parker(&self) -> Option<&Arc<crate::park::Parker>> {
        self.parker
            .get_or_init(|| {
                crate::park::Parker::start(
                    self.shutdown.clone(),
                    self.metrics.connections_parked.clone(),
                )
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "idle connections cannot park; each keeps its task")
                })
                .ok()
            })
            .as_ref()
    }

    /// Publishes a message: updates the retained store if asked, then delivers it to every
    /// matching session. Returns how many sessions it was routed to.
    pub fn publish(&self, msg: Msg) -> usize {
        self.publish_flow(msg, &mut Vec::new())
    }

    /// [`Broker::publish`] for a client connection: also collects into `congested` the sessions
    /// above their high-water mark, which the publisher's connection then waits for (flow
    /// control instead of loss).
    pub fn publish_flow(&self, msg: Msg, congested: &mut Vec<Arc<Session>>) -> usize {
        if msg.retain && self.config.mqtt.retain_available {
            // The broker's own `$SYS` figures (clients cannot publish there) do not count
            // against the limits meant for clients.
            if !topic::is_sys(&msg.topic) && self.retained_over_limit(&msg) {
                self.metrics.dropped("retained_limit");
            } else {
                self.set_retained(msg.clone());
                if let Some(c) = self.fabric.get() {
                    c.retained(&msg);
                }
            }
        }
        let strategy = self.config.mqtt.shared_subscription_strategy;
        let targets = match self.fabric.get() {
            None => self.router.route(&msg.topic, &msg.publisher, strategy),
            Some(c) => {
                // One delivery per shared group cluster-wide: the cluster layer decides which
                // node serves each group and forwards copies to peers with subscribers.
                let local_groups = self.router.shared_groups(&msg.topic);
                let mine = c.forward(&msg, &local_groups);
                let sel = Select::Some {
                    plain: true,
                    groups: &mine,
                };
                self.router
                    .route_selected(&msg.topic, &msg.publisher, strategy, sel)
            }
        };
        let n = targets.len();
        for t in targets {
            self.deliver(&msg, t, congested);
        }
        // Bridges see each message once, on the node where it entered the cluster.
        n + self.tap.as_ref().map_or(0, |t| t.tap(&msg))
    }

    /// Stores (or, with an empty payload, clears) a retained message, durably when
    /// `persistence.data_dir` is set. Every path that changes the retained store comes here.
    pub fn set_retained(&self, msg: Msg) {
        // `$SYS` figures are the broker's own and published again after a restart.
        if let Some(db) = self.durable.as_ref().filter(|_| !topic::is_sys(&msg.topic)) {
            db.retained(&msg);
        }
        self.retained.set(msg);
    }

    /// Whether retaining `msg` would go beyond `limits.max_retained` (a new topic) or
    /// `limits.max_retained_bytes`; clearing, and replacing with no more bytes, always work.
    fn retained_over_limit(&self, msg: &Message) -> bool {
        if msg.payload.is_empty() {
            return false;
        }
        let l = &self.config.limits;
        let size = msg.topic.len() + msg.payload.len();
        let count_full = l.max_retained > 0 && self.retained.len() >= l.max_retained;
        let bytes_full =
            l.max_retained_bytes > 0 && self.retained.bytes() + size > l.max_retained_bytes;
        if !count_full && !bytes_full {
            return false;
        }
        let old = self.retained.stored_size(&msg.topic);
        (count_full && old == 0)
            || (bytes_full
                && (self.retained.bytes() + size).saturating_sub(old) > l.max_retained_bytes)
    }

    /// Delivers a message forwarded by a peer to this node's subscribers: ordinary ones if
    /// `plain`, and the shared groups the peer assigned here. The link is not held back for
    /// congested sessions (that would stall every other frame from the peer): such a session
    /// takes forwarded messages up to its queue limit.
    pub fn publish_local(&self, msg: Msg, plain: bool, groups: &HashSet<Arc<str>>) {
        let strategy = self.config.mqtt.shared_subscription_strategy;
        let sel = Select::Some { plain, groups };
        for t in self
            .router
            .route_selected(&msg.topic, &msg.publisher, strategy, sel)
        {
            self.deliver(&msg, t, &mut Vec::new());
        }
    }

    /// Whether `session` may be given `msg`: a `$SYS` topic that names other clients only
    /// goes to a connected client whose ACL explicitly allows reading it (counted when not).
    fn may_receive(&self, session: &Session, msg: &Msg) -> bool {
        if !topic::sys_names_clients(&msg.topic) {
            return true;
        }
        let allowed = session
            .state
            .lock()
            .connection
            .as_ref()
            .is_some_and(|c| c.acl.explicitly_allows_read(&msg.topic));
        if !allowed {
            self.metrics.dropped("sys_acl_denied");
        }
        allowed
    }

    fn deliver(&self, msg: &Msg, t: Target, congested: &mut Vec<Arc<Session>>) {
        if !self.may_receive(&t.session, msg) {
            return;
        }
        let d = Delivery {
            msg: msg.clone(),
            qos: msg.qos.min(t.qos),
            retain: msg.retain && t.retain_as_published,
            sub_ids: t.sub_ids,
            share: t.share,
            seq: 0,
        };
        if self.enqueue(&t.session, d) && !congested.iter().any(|s| Arc::ptr_eq(s, &t.session)) {
            congested.push(t.session);
        }
    }

    /// Queues a delivery on a session with the configured bounds, counting drops. Returns
    /// true if the session is congested (above its high-water mark and still draining).
    pub fn enqueue(&self, session: &Session, d: Delivery) -> bool {
        let hook = self
            .hooks
            .wants(EventKind::MessageDropped)
            .then(|| (d.msg.clone(), d.qos));
        let reason =
            match session.enqueue(d, &self.queue_bounds, self.durable.as_ref().map(|d| d as _)) {
                Enqueued::Queued | Enqueued::Duplicate => return false,
                Enqueued::Congested => return true,
                Enqueued::QueuedDroppedOldest => "queue_full",
                Enqueued::Dropped => "queue_full_or_offline_qos0",
                Enqueued::Moved(node, d) => match self.fabric.get() {
                    Some(c) => {
                        c.deliver_to(&node, &session.client_id, &d);
                        return false;
                    }
                    None => "moved_session",
                },
            };
        self.metrics.dropped(reason);
        if let Some((msg, qos)) = hook {
            self.hooks.emit(Event::MessageDropped {
                from_client_id: msg.publisher.to_string(),
                topic: msg.topic.to_string(),
                qos: qos.value(),
                reason,
            });
        }
        false
    }

    /// Adds a subscription for `session` and queues the retained messages it should get.
    /// Returns the granted QoS.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        raw: &str,
        mut opts: SubOptions,
        sub_id: Option<NonZeroU32>,
    ) -> Result<QoS, topic::TopicError> {
        let f = self.config.mqtt.topic_limits().filter(raw)?;
        opts.qos = opts.qos.min(max_qos(&self.config));
        let existed = {
            let mut st = session.state.lock();
            let existed = st
                .subscriptions
                .insert(raw.into(), Subscription { opts, sub_id })
                .is_some();
            if let Some(db) = self.durable.as_ref().filter(|_| st.stored) {
                db.put_session(&session.client_id, &mut st);
            }
            existed
        };
        let (_, new_route) = self
            .router
            .subscribe(f.group, f.filter, session, opts, sub_id);
        if new_route {
            if let Some(c) = self.fabric.get() {
                c.route_added(raw);
            }
        }
        // Retained messages are not sent for shared subscriptions [MQTT-3.8.4-?, 4.8.2].
        let send_retained = f.group.is_none()
            && match opts.retain_handling {
                RetainHandling::AtSubscribe => true,
                RetainHandling::AtSubscribeNew => !existed,
                RetainHandling::NoAtSubscribe => false,
            };
        if send_retained {
            for m in self.retained.matching(f.filter) {
                let d = Delivery {
                    qos: m.qos.min(opts.qos),
                    msg: m,
                    retain: true,
                    sub_ids: sub_id.into_iter().collect(),
                    share: None,
                    seq: 0,
                };
                self.enqueue(session, d);
            }
        }
        Ok(opts.qos)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, session: &Arc<Session>, raw: &str) -> bool {
        let existed = {
            let mut st = session.state.lock();
            let existed = st.subscriptions.remove(raw).is_some();
            if let Some(db) = self.durable.as_ref().filter(|_| existed && st.stored) {
                db.put_session(&session.client_id, &mut st);
            }
            existed
        };
        self.remove_route(session, raw);
        existed
    }

    /// Puts back a subscription of a session restored from the durable store, with its route.
    pub(crate) fn restore_subscription(
        &self,
        session: &Arc<Session>,
        raw: String,
        sub: Subscription,
    ) {
        let Ok(f) = self.config.mqtt.topic_limits().filter(&raw) else {
            tracing::warn!(client_id = %session.client_id, filter = raw, "stored subscription no longer valid; dropped");
            return;
        };
        let _ = self
            .router
            .subscribe(f.group, f.filter, session, sub.opts, sub.sub_id);
        session.state.lock().subscriptions.insert(raw.into(), sub);
    }

    fn remove_route(&self, session: &Session, raw: &str) {
        if let Ok(f) = topic::parse_filter(raw) {
            let (_, gone) = self
                .router
                .unsubscribe(f.group, f.filter, &session.client_id);
            if gone {
                if let Some(c) = self.fabric.get() {
                    c.route_removed(raw);
                }
            }
        }
    }

    /// Before a client connects here (after waiting, bounded, until this node has synced with
    /// its peers), takes its session over from another node if one holds
    /// it (or, with clean start, makes that node drop it). `owner` is the connecting identity;
    /// `Err` when the node holding the session refuses it to that identity.
    pub async fn prepare_session(
        self: &Arc<Self>,
        client_id: &str,
        clean_start: bool,
        owner: Option<&str>,
    ) -> Result<(), NotOwner> {
        let Some(c) = self.fabric.get() else {
            return Ok(());
        };
        if !c.wait_synced(SYNC_WAIT).await {
            tracing::warn!(
                client_id,
                "not synced with the cluster after {SYNC_WAIT:?}; accepting the client anyway"
            );
        }
        if client_id.is_empty() {
            return Ok(());
        }
        if let Some(local) = self.sessions.get(client_id) {
            let st = local.state.lock();
            if st.moved_to().is_none() && !st.ended {
                return Ok(()); // it is here: `open_session` checks the owner
            }
        }
        match c.take_session(client_id, clean_start, owner).await {
            Taken::Moved => {
                tracing::info!(client_id, "session taken over from another node");
                Ok(())
            }
            Taken::NotFound => Ok(()),
            Taken::NotOwner => Err(NotOwner),
        }
    }

    /// Installs a session that arrived from another node, offline, with its routes.
    pub fn install_session(self: &Arc<Self>, snap: ArrivedSession) {
        let client_id = ByteString::from(snap.client_id);
        let subs = snap.subscriptions;
        let session = Session::new(client_id, snap.expiry);
        {
            let mut st = session.state.lock();
            st.owner = snap.owner;
            (snap.restore)(&mut st);
            // A fresh dedupe window: the ids the old node saw stay there.
            st.rare_mut().recent_ids = Some(Box::default());
            st.disconnected_at = Some(Instant::now());
        }
        if let Some(old) = self.sessions.insert(session.clone()) {
            if !Arc::ptr_eq(&old, &session) {
                self.end_session(&old);
            }
        }
        for (raw, sub) in subs {
            session
                .state
                .lock()
                .subscriptions
                .insert(raw.as_str().into(), sub);
            if let Ok(f) = topic::parse_filter(&raw) {
                let (_, new_route) = self
                    .router
                    .subscribe(f.group, f.filter, &session, sub.opts, sub.sub_id);
                if new_route {
                    if let Some(c) = self.fabric.get() {
                        c.route_added(&raw);
                    }
                }
            }
        }
        // A session that arrived is stored here as if it had always been (the old node
        // deleted its copy when it handed it over).
        if let Some(db) = self.durable.as_ref() {
            let mut st = session.state.lock();
            if st.expiry > 0 {
                db.put_session(&session.client_id, &mut st);
                let queued: Vec<Delivery> = std::mem::take(&mut st.queue).into_iter().collect();
                for mut d in queued {
                    db.enqueue(&session.client_id, &mut st, &mut d);
                    st.queue.push_back(d);
                }
                let mut inflight = std::mem::take(&mut st.inflight);
                for f in inflight.iter_mut() {
                    db.enqueue(&session.client_id, &mut st, &mut f.delivery);
                    if f.delivery.qos == QoS::ExactlyOnce {
                        let released = f.state == crate::session::InflightState::AwaitComp;
                        db.sent_qos2(&session.client_id, &f.delivery, f.packet_id, released);
                    }
                }
                st.inflight = inflight;
                for id in st.incoming_qos2.iter() {
                    db.put_incoming(&session.client_id, &st, *id);
                }
            }
        }
        // Deliveries the old node forwarded before the session arrived.
        if let Some(c) = self.fabric.get() {
            for d in c.take_early(&session.client_id) {
                self.enqueue(&session, d);
            }
        }
        // An offline persistent session expires here like any other.
        let expiry = session.state.lock().expiry;
        if expiry != u32::MAX {
            let generation = session.state.lock().generation;
            self.schedule_expiry(&session, generation, expiry);
        }
    }

    /// Opens (or resumes) the session for a connecting client and marks it online, kicking
    /// any connection that holds it now. The session's owner is the connection's user name;
    /// under `sessions.takeover: owner_only` a live session owned by another identity is
    /// refused with [`NotOwner`] before anything about it changes.
    pub fn open_session(
        &self,
        client_id: &ByteString,
        clean_start: bool,
        expiry: u32,
        conn: Arc<ConnInfo>,
    ) -> Result<Opened, NotOwner> {
        let existing = self.sessions.get(client_id);
        if let Some(old) = &existing {
            let mut st = old.state.lock();
            if !st.ended
                && !may_take_over(
                    self.config.sessions.takeover,
                    st.owner.as_deref(),
                    conn.username.as_deref(),
                )
            {
                return Err(NotOwner);
            }
            if let Some(c) = st.connection.take() {
                // The old connection sees the bumped generation and lets go.
                c.kick.send(Kick::TakenOver);
                self.metrics.takeovers.inc();
            }
            st.generation += 1;
        }
        let resumable = existing.filter(|s| !s.state.lock().ended);
        let (session, present) = match resumable {
            Some(old) if !clean_start => (old, true),
            Some(old) => {
                self.end_session(&old);
                let s = Session::new(client_id.clone(), expiry);
                self.sessions.insert(s.clone());
                (s, false)
            }
            None => {
                let s = Session::new(client_id.clone(), expiry);
                self.sessions.insert(s.clone());
                (s, false)
            }
        };
        let generation = {
            let mut st = session.state.lock();
            st.generation += 1;
            st.expiry = expiry;
            st.owner = conn.username.clone();
            st.connection = Some(conn);
            st.disconnected_at = None;
            if present {
                // Resumed within the will delay: that will is never sent [MQTT-3.1.3-9].
                if let Some(will) = st.take_pending_will() {
                    will.abort();
                    if let Some(db) = &self.durable {
                        db.delete_will(client_id, &st);
                    }
                }
            }
            if let Some(db) = &self.durable {
                if expiry > 0 {
                    db.put_session(client_id, &mut st);
                } else {
                    // Expiry 0 now: it ends when this connection does; nothing to keep.
                    db.delete_session(client_id, &mut st);
                }
            }
            st.generation
        };
        Ok(Opened {
            session,
            present,
            generation,
        })
    }

    /// Called when a connection that owned `session` at `generation` ends. Ends the session
    /// now if its expiry is zero, otherwise schedules its expiry.
    pub fn close_session(self: &Arc<Self>, session: &Arc<Session>, generation: u64) {
        let expiry = {
            let mut st = session.state.lock();
            if st.generation != generation || st.ended {
                return; // taken over or already ended: the new owner decides
            }
            st.connection = None;
            st.disconnected_at = Some(Instant::now());
            if let Some(db) = self.durable.as_ref().filter(|_| st.stored && st.expiry > 0) {
                // Offline from now: the expiry countdown survives a restart.
                db.put_session(&session.client_id, &mut st);
            }
            st.expiry
        };
        session.release_publishers();
        if expiry == 0 {
            self.end_session(session);
            self.sessions.remove_if_same(session);
            return;
        }
        if expiry == u32::MAX {
            return;
        }
        self.schedule_expiry(session, generation, expiry);
    }

    /// Ends `session` after `expiry` seconds unless it reconnects (its generation changes).
    fn schedule_expiry(self: &Arc<Self>, session: &Arc<Session>, generation: u64, expiry: u32) {
        self.schedule_expiry_in(session, generation, Duration::from_secs(u64::from(expiry)));
    }

    /// Ends `session` after `left` unless it reconnects (a restored session's remaining time).
    pub(crate) fn schedule_expiry_in(
        self: &Arc<Self>,
        session: &Arc<Session>,
        generation: u64,
        left: Duration,
    ) {
        let broker = self.clone();
        let session = session.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = broker.shutdown.cancelled() => return,
            }
            let expired = {
                let st = session.state.lock();
                st.generation == generation && st.connection.is_none() && !st.ended
            };
            if expired {
                broker.end_session(&session);
                broker.sessions.remove_if_same(&session);
                broker.metrics.sessions_expired.inc();
            }
        });
    }

    /// Ends a session: removes its routes, and gives its undelivered shared-subscription
    /// messages to other members of their groups.
    pub fn end_session(&self, session: &Arc<Session>) {
        let (subs, orphans) = {
            let mut st = session.state.lock();
            st.ended = true;
            st.generation += 1;
            if let Some(db) = &self.durable {
                db.delete_session(&session.client_id, &mut st);
            }
            let subs: Vec<String> = st.subscriptions.drain().map(|(k, _)| k.into()).collect();
            let mut orphans: Vec<Delivery> = st
                .inflight
                .drain(..)
                .map(|f| f.delivery)
                .filter(|d| d.share.is_some())
                .collect();
            let queue = std::mem::take(&mut st.queue);
            orphans.extend(queue.into_iter().filter(|d| d.share.is_some()));
            (subs, orphans)
        };
        session.release_publishers();
        for raw in subs {
            self.remove_route(session, &raw);
        }
        for d in orphans {
            self.redispatch_shared(d);
        }
    }

    /// Sends a shared-subscription delivery to another member of its group, if any.
    fn redispatch_shared(&self, d: Delivery) {
        let Some(share) = d.share.clone() else { return };
        let targets = self.router.route(
            &d.msg.topic,
            &d.msg.publisher,
            self.config.mqtt.shared_subscription_strategy,
        );
        match targets
            .into_iter()
            .find(|t| t.share.as_deref() == Some(&*share))
        {
            Some(t) => {
                if !self.may_receive(&t.session, &d.msg) {
                    return;
                }
                let d = Delivery {
                    qos: d.msg.qos.min(t.qos),
                    share: t.share,
                    // A key in the ended session's queue, gone with it.
                    seq: 0,
                    ..d
                };
                self.enqueue(&t.session, d);
            }
            None => self.metrics.dropped("shared_group_empty"),
        }
    }

    /// Publishes a will, after its delay unless the session reconnects first.
    pub fn schedule_will(
        self: &Arc<Self>,
        will: Will,
        client_id: ByteString,
        session: Arc<Session>,
        generation: u64,
    ) {
        // The check, the stored copy and the pending handle under one lock: a connection that
        // resumes the session between them would find no pending will to cancel, and a stored
        // one would be published after a restart although the session came back in time.
        let mut st = session.state.lock();
        let delay = will.delay.min(st.expiry);
        if delay > 0 && st.generation != generation && !st.ended {
            // Resumed by a newer connection before this one's close got here: a delayed will
            // is never sent [MQTT-3.1.3-9] (nor stored, to be restored after a restart).
            return;
        }
        let msg = Arc::new(Message::new(
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            will.properties,
            client_id,
        ));
        if delay == 0 {
            drop(st);
            self.metrics.wills_published.inc();
            self.publish(msg);
            return;
        }
        if let Some(db) = &self.durable {
            // A restart within the delay publishes it then (persist::restore).
            db.put_will(&session.client_id, &st, &msg, delay);
        }
        self.arm_will(
            msg,
            Duration::from_secs(u64::from(delay)),
            &session,
            &mut st,
            generation,
            false,
        );
    }

    /// Publishes the will `msg` of `session` after `delay` unless the session was resumed
    /// (its generation moved on) meanwhile, and makes it the session's one pending will: a
    /// client that connects and drops again and again within its will delay replaces its will
    /// instead of piling up sleeping copies. `st` is the session's state, locked by the caller
    /// together with whatever it checked or stored about the will. A will `restored` from the
    /// store waits for the cluster first, so peers' subscribers get it too.
    pub fn arm_will(
        self: &Arc<Self>,
        msg: Msg,
        delay: Duration,
        session: &Arc<Session>,
        st: &mut crate::session::SessionState,
        generation: u64,
        restored: bool,
    ) {
        let broker = self.clone();
        let session = session.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if restored {
                broker.settled().await;
            }
            let still_gone = {
                let st = session.state.lock();
                st.connection.is_none() && (st.generation == generation || st.ended)
            };
            if still_gone {
                broker.metrics.wills_published.inc();
                broker.publish(msg);
            }
            if let Some(db) = &broker.durable {
                db.delete_will(&session.client_id, &session.state.lock());
            }
        });
        if let Some(old) = st.rare_mut().pending_will.replace(task.abort_handle()) {
            old.abort();
        }
    }

    /// Publishes the will of a session that expired while the broker was down (restored from
    /// the store), once the cluster has settled.
    pub fn publish_restored_will(self: &Arc<Self>, msg: Msg) {
        let broker = self.clone();
        tokio::spawn(async move {
            broker.settled().await;
            broker.metrics.wills_published.inc();
            broker.publish(msg);
        });
    }

    /// Waits (bounded) until a clustered broker's cluster layer is up and synced with its
    /// peers, so what is published right after a start reaches their subscribers.
    async fn settled(&self) {
        if self.config.cluster.discovery == crate::config::Discovery::None {
            return;
        }
        let until = Instant::now() + SYNC_WAIT;
        while self.fabric.get().is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(f) = self.fabric.get() {
            f.wait_synced(SYNC_WAIT).await;
        }
    }

    /// How long a partly received packet may wait for its next byte; `None` when disabled.
    pub fn packet_timeout(&self) -> Option<Duration> {
        let s = self.config.mqtt.packet_timeout;
        (s > 0).then(|| Duration::from_secs(s))
    }

    /// How long a write to a client may take (`mqtt.write_timeout`, at least a second).
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.config.mqtt.write_timeout.max(1))
    }

    /// Refreshes the gauges that mirror state; called before rendering metrics.
    pub fn refresh_gauges(&self) {
        let sessions = self.sessions.all();
        let (mut queued, mut inflight) = (0usize, 0usize);
        for s in &sessions {
            let st = s.state.lock();
            queued += st.queue.len();
            inflight += st.inflight.len();
        }
        let m = &self.metrics;
        m.sessions.set(gauge(sessions.len()));
        m.queued.set(gauge(queued));
        m.inflight.set(gauge(inflight));
        m.subscriptions.set(gauge(self.router.subscription_count()));
        m.routes.set(gauge(self.router.filters().len()));
        m.retained.set(gauge(self.retained.len()));
        if let Some(d) = &self.durable {
            d.refresh_metrics();
        }
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The highest QoS the broker grants.
pub fn max_qos(config: &Config) -> QoS {
    QoS::try_from(config.mqtt.max_qos).unwrap_or(QoS::ExactlyOnce)
}
