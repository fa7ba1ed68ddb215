//! The MQTT bridge: one MQTT 3.1.1 client connection (rumqttc) to a remote broker — another
//! MQTT broker, a cloud IoT hub over TLS with a client certificate, RabbitMQ's MQTT plugin —
//! carrying egress (local filter → remote topic with a prefix) and ingress (remote filter →
//! local publish with a prefix).
//!
//! Two tasks per bridge: the *pump* moves messages from the bridge buffer into the client's
//! small request channel (so while the remote is down, messages stay in the bounded buffer
//! and overflow there, counted), and the *event loop* drives the connection: it reconnects
//! with exponential backoff and jitter, resubscribes the ingress filters on every connect,
//! counts acknowledgements and requeues unacknowledged messages when the remote starts a
//! fresh session, so a broken connection loses no QoS 1/2 message.
//!
//! Loop prevention: messages published here by ingress carry the publisher id
//! `$bridge/<name>`, and the tap never sends those back out through the same bridge.

use std::collections::{HashMap, VecDeque};
use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming,
    MqttOptions, Outgoing as Out, TlsConfiguration, Transport,
};
use tokio_rustls::rustls::{self, pki_types, ClientConfig, RootCertStore};

use super::{backoff_delay, pause, Bridge, BridgeState, Outgoing};
use crate::broker::Broker;
use crate::codec::QoS;
use crate::config::{BridgeTlsConfig, MqttBridgeConfig};
use crate::message::Message;

/// Messages handed to the client but not yet acknowledged, at most.
const INFLIGHT: u16 = 100;
/// The client's request channel: small, so the bridge buffer is where messages wait.
const CHANNEL: usize = 16;

/// Why the client options could not be built (reported as the bridge's status).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A file (password, CA, certificate, key) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What is missing or wrong.
        what: String,
    },
    /// rustls refused the certificate/key combination.
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Runs one MQTT bridge until the broker shuts down.
pub async fn run(broker: Arc<Broker>, bridge: Arc<Bridge>, cfg: MqttBridgeConfig) {
    let mut attempt = 0u32;
    // Files (password, certificates) come from mounted Secrets and may appear late: a setup
    // error is a status and a retry, never a reason to stop serving local clients.
    let opts = loop {
        match options(&cfg, &broker.node) {
            Ok(o) => break o,
            Err(e) => {
                bridge.metrics.failed.inc();
                bridge.set_state(BridgeState::Error, Some(e.to_string()));
                if !pause(&broker, backoff_delay(&cfg.backoff, attempt)).await {
                    return;
                }
                attempt = attempt.saturating_add(1);
            }
        }
    };
    let (client, eventloop) = AsyncClient::new(opts, CHANNEL);
    let held = Arc::new(Held::default());
    let pump = tokio::spawn(pump(
        broker.clone(),
        bridge.clone(),
        cfg.clone(),
        client.clone(),
        held.clone(),
    ));
    drive(&broker, &bridge, &cfg, client, eventloop, held).await;
    pump.abort();
}

/// What the worker holds outside the bridge buffer: messages handed to the client and not yet
/// written (`handed`, in order) and, by count, those written and not yet acknowledged. Both
/// count in the bridge's `buffered`, so an outage shows every message still waiting.
#[derive(Debug, Default)]
struct Held {
    handed: Mutex<VecDeque<Outgoing>>,
    inflight: AtomicUsize,
}

impl Held {
    /// Tells the buffer how many messages the worker holds now.
    fn report(&self, bridge: &Bridge) {
        let n = self.handed.lock().len() + self.inflight.load(Ordering::Relaxed);
        bridge.buffer.set_held(n);
    }
}

/// Reads the password and TLS files and builds the client options.
fn options(cfg: &MqttBridgeConfig, node: &str) -> Result<MqttOptions, SetupError> {
    let r = &cfg.remote;
    let client_id = r
        .client_id
        .clone()
        .unwrap_or_else(|| format!("corvid-{}-{node}", cfg.name));
    let mut o = MqttOptions::new(client_id, r.host.clone(), r.port);
    o.set_keep_alive(Duration::from_secs(u64::from(r.keepalive.max(5))));
    o.set_clean_session(r.clean_start);
    o.set_inflight(INFLIGHT);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = &r.username {
        let password = match &r.password_file {
            Some(p) => read(p)?.trim_end_matches(['\r', '\n']).to_string(),
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if let Some(t) = &r.tls {
        let tls = tls_config(t)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    Ok(o)
}

fn read(p: &Path) -> Result<String, SetupError> {
    std::fs::read_to_string(p).map_err(|source| SetupError::Read {
        path: p.display().to_string(),
        source,
    })
}

/// A rustls client: the given CA (or the public web roots) and an optional client certificate.
fn tls_config(t: &BridgeTlsConfig) -> Result<ClientConfig, SetupError> {
    let mut roots = RootCertStore::empty();
    match &t.ca_file {
        Some(ca) => {
            for c in pem_certs(ca)? {
                roots.add(c)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let chain = pem_certs(cert)?;
            let text = read(key)?;
            let key = rustls_pemfile::private_key(&mut BufReader::new(text.as_bytes()))
                .map_err(|e| SetupError::Pem {
                    path: key.display().to_string(),
                    what: e.to_string(),
                })?
                .ok_or_else(|| SetupError::Pem {
                    path: key.display().to_string(),
                    what: "no private key found".into(),
                })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(cfg)
}

fn pem_certs(p: &Path) -> Result<Vec<pki_types::CertificateDer<'static>>, SetupError> {
    let text = read(p)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(text.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| SetupError::Pem {
            path: p.display().to_string(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SetupError::Pem {
            path: p.display().to_string(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Moves buffered messages into the client, in order. While the remote is down the client's
/// channel fills up and this waits, so messages accumulate (bounded) in the bridge buffer.
async fn pump(
    broker: Arc<Broker>,
    bridge: Arc<Bridge>,
    cfg: MqttBridgeConfig,
    client: AsyncClient,
    held: Arc<Held>,
) {
    loop {
        let batch = tokio::select! {
            b = bridge.buffer.next_batch(1, Duration::ZERO) => b,
            _ = broker.shutdown.cancelled() => return,
        };
        for o in batch {
            let Some(rule) = cfg.egress.get(o.rule) else {
                continue;
            };
            let topic = format!("{}{}", rule.remote_prefix, o.msg.topic);
            let qos = rumqttc_qos(rule.qos);
            let retain = rule.retain.unwrap_or(o.msg.retain);
            let payload = o.msg.payload.clone();
            held.handed.lock().push_back(o.clone());
            held.report(&bridge);
            let sent = tokio::select! {
                r = client.publish_bytes(topic, qos, retain, payload) => r.is_ok(),
                _ = broker.shutdown.cancelled() => false,
            };
            if !sent {
                held.handed.lock().pop_back();
                bridge.buffer.requeue(vec![o]);
                held.report(&bridge);
                return;
            }
        }
    }
}

fn rumqttc_qos(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

/// Drives the connection until shutdown: connects, reconnects with backoff, counts acks,
/// publishes ingress messages here.
async fn drive(
    broker: &Arc<Broker>,
    bridge: &Arc<Bridge>,
    cfg: &MqttBridgeConfig,
    client: AsyncClient,
    mut eventloop: EventLoop,
    held: Arc<Held>,
) {
    let mut attempt = 0u32;
    // Written to the remote, waiting for PUBACK/PUBCOMP, by packet id.
    let mut inflight: HashMap<u16, Outgoing> = HashMap::new();
    loop {
        // The last event may have moved messages between the buffer, `handed` and `inflight`.
        held.inflight.store(inflight.len(), Ordering::Relaxed);
        held.report(bridge);
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = broker.shutdown.cancelled() => {
                let _ = client.try_disconnect();
                return;
            }
        };
        match ev {
            Ok(Event::Incoming(Incoming::ConnAck(ConnAck {
                session_present, ..
            }))) => {
                attempt = 0;
                if !session_present && !inflight.is_empty() {
                    // The remote started a fresh session and the client forgot what was in
                    // flight: send those again, first.
                    let mut again: Vec<Outgoing> = inflight.drain().map(|(_, o)| o).collect();
                    again.sort_by_key(|o| o.at);
                    bridge.buffer.requeue(again);
                }
                bridge.set_state(BridgeState::Up, None);
                subscribe(&client, cfg);
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => ingress(broker, bridge, cfg, p),
            Ok(Event::Incoming(Incoming::PubAck(a))) => acked(bridge, &mut inflight, a.pkid),
            Ok(Event::Incoming(Incoming::PubComp(c))) => acked(bridge, &mut inflight, c.pkid),
            Ok(Event::Incoming(Incoming::SubAck(s))) => {
                if s.return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    bridge.set_state(
                        BridgeState::Up,
                        Some("the remote refused an ingress subscription".into()),
                    );
                }
            }
            Ok(Event::Outgoing(Out::Publish(pkid))) => {
                if pkid == 0 {
                    // QoS 0: written is as good as it gets.
                    if let Some(o) = held.handed.lock().pop_front() {
                        bridge.sent(&o);
                    }
                } else if let std::collections::hash_map::Entry::Vacant(slot) = inflight.entry(pkid)
                {
                    // A first transmission (a retransmission keeps its packet id).
                    if let Some(o) = held.handed.lock().pop_front() {
                        slot.insert(o);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                bridge.metrics.failed.inc();
                let state = match &e {
                    ConnectionError::ConnectionRefused(_) | ConnectionError::Tls(_) => {
                        BridgeState::Refused
                    }
                    e if tls_alert(e).is_some() => BridgeState::Refused,
                    _ => BridgeState::Down,
                };
                bridge.set_state(state, Some(describe(&e)));
                if !pause(broker, backoff_delay(&cfg.backoff, attempt)).await {
                    return;
                }
                attempt = attempt.saturating_add(1);
                // Read the password and certificates again: a rotated Secret (or a renewed
                // client certificate) takes effect on the next connect, without a restart.
                match options(cfg, &broker.node) {
                    Ok(o) => eventloop.mqtt_options = o,
                    Err(e) => bridge.set_state(BridgeState::Error, Some(e.to_string())),
                }
            }
        }
    }
}

fn acked(bridge: &Bridge, inflight: &mut HashMap<u16, Outgoing>, pkid: u16) {
    if let Some(o) = inflight.remove(&pkid) {
        bridge.sent(&o);
    }
}

/// Subscribes the ingress filters; queued behind any publishes already in the channel.
fn subscribe(client: &AsyncClient, cfg: &MqttBridgeConfig) {
    if cfg.ingress.is_empty() {
        return;
    }
    let client = client.clone();
    let filters: Vec<rumqttc::SubscribeFilter> = cfg
        .ingress
        .iter()
        .map(|r| rumqttc::SubscribeFilter::new(r.remote_filter.clone(), rumqttc_qos(r.qos)))
        .collect();
    tokio::spawn(async move {
        let _ = client.subscribe_many(filters).await;
    });
}

/// Publishes a remote message here under the first matching ingress rule's prefix.
fn ingress(broker: &Broker, bridge: &Bridge, cfg: &MqttBridgeConfig, p: rumqttc::Publish) {
    let remote_topic = p.topic.as_str();
    let Some(rule) = cfg.ingress.iter().find(|r| {
        // `$share/<group>/<filter>` at the remote matches like `<filter>`.
        let filter = crate::topic::parse_filter(&r.remote_filter)
            .map(|f| f.filter)
            .unwrap_or(&r.remote_filter);
        crate::topic::matches(filter, remote_topic)
    }) else {
        return;
    };
    let topic = format!("{}{remote_topic}", rule.local_prefix);
    if broker.config.mqtt.topic_limits().name(&topic).is_err() {
        tracing::debug!(bridge = %bridge.name, topic, "ingress topic not valid here; dropped");
        return;
    }
    let qos = match (p.qos as u8).min(rule.qos) {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let msg = Message::new(
        ByteString::from(topic),
        p.payload,
        qos,
        p.retain,
        None,
        bridge.publisher.clone(),
    );
    bridge.metrics.received.inc();
    broker.publish(Arc::new(msg));
}

/// The TLS alert the remote sent, if that is why the connection ended. With TLS 1.3 a server
/// that rejects the client certificate says so only after the handshake, so the alert
/// surfaces as a read error rather than as a handshake failure.
fn tls_alert(e: &ConnectionError) -> Option<String> {
    let text = e.to_string();
    let (_, alert) = text.split_once("received fatal alert: ")?;
    Some(alert.to_string())
}

/// One line a person can act on.
fn describe(e: &ConnectionError) -> String {
    if let Some(alert) = tls_alert(e) {
        let hint = match alert.as_str() {
            "CertificateRequired" => {
                " (the remote requires a client certificate: set tls.cert_file and tls.key_file)"
            }
            "BadCertificate" | "UnknownCA" | "CertificateUnknown" => {
                " (the remote does not accept this client certificate)"
            }
            _ => "",
        };
        return format!("the remote rejected the TLS session: {alert}{hint}");
    }
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorized",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not accepted",
                ConnectReturnCode::Success => "success?",
            };
            format!("the remote refused the connection: {why}")
        }
        ConnectionError::Tls(t) => format!("TLS handshake with the remote failed: {t}"),
        ConnectionError::NetworkTimeout => "connecting to the remote timed out".into(),
        ConnectionError::Io(io) => format!("cannot reach the remote: {io}"),
        other => format!("connection to the remote broke: {other}"),
    }
}
