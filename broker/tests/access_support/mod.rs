//! Helpers for the access-control tests: an in-process broker on 127.0.0.1 ports, rumqttc
//! clients for both protocol versions whose incoming packets are forwarded to a channel, and
//! a local HTTP server (auth backend, webhook sink). Every wait has a deadline.

#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use corvid_broker::server::Running;
use corvid_broker::Config;
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// How long any single wait may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A config with the MQTT and admin listeners on ephemeral loopback ports, nothing else.
pub fn config() -> Config {
    let mut c = Config::default();
    c.listeners.mqtt.bind = "127.0.0.1:0".parse().expect("addr");
    c.listeners.ws.enabled = false;
    c.admin.bind = "127.0.0.1:0".parse().expect("addr");
    c.node.name = Some("n1".into());
    c.sys.enabled = false;
    c
}

/// Starts a broker.
pub async fn start(c: Config) -> Running {
    corvid_broker::server::start(c)
        .await
        .expect("broker starts")
}

/// The MQTT address of a running broker.
pub fn mqtt(r: &Running) -> SocketAddr {
    r.addr("mqtt").expect("mqtt listener")
}

/// Polls `f` until it returns `Some`, or panics after [`WAIT`] naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > until {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the Prometheus sample `name` whose labels include every `labels` pair
/// (written `key="value"`); 0 when absent.
pub async fn metric(r: &Running, name: &str, labels: &[&str]) -> f64 {
    let body = http_get(&format!("http://{}/metrics", r.admin)).await;
    body.lines()
        .find(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && labels.iter().all(|x| l.contains(x))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// GET a URL and return the body.
pub async fn http_get(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("GET")
        .text()
        .await
        .expect("body")
}

/// The parts of the rumqttc wrappers that read the same for both protocol versions; the
/// types differ, so each module brings its own `AsyncClient`, `Packet`, `QoS`, … into scope and
/// defines `forward` (the event loop's packets into the channel) and `topic_string`.
macro_rules! client_common {
    ($version:literal) => {
        #[doc = concat!("A connected ", $version, " client and its incoming packets.")]
        pub struct Client {
            pub client: AsyncClient,
            pub rx: mpsc::UnboundedReceiver<Packet>,
        }

        pub fn options(addr: SocketAddr, id: &str, creds: Option<(&str, &str)>) -> MqttOptions {
            let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
            o.set_keep_alive(Duration::from_secs(30));
            if let Some((u, p)) = creds {
                o.set_credentials(u, p);
            }
            o
        }

        /// Connects; `Err(code)` when the broker refuses with a CONNACK code.
        pub async fn connect(
            addr: SocketAddr,
            id: &str,
            creds: Option<(&str, &str)>,
        ) -> Result<Client, ConnectReturnCode> {
            connect_with(options(addr, id, creds)).await
        }

        /// Connects and asserts that the broker refuses with `code`.
        pub async fn assert_refused(
            addr: SocketAddr,
            id: &str,
            creds: Option<(&str, &str)>,
            code: ConnectReturnCode,
        ) {
            assert_eq!(connect(addr, id, creds).await.err(), Some(code), "{id}");
        }

        pub async fn connect_with(o: MqttOptions) -> Result<Client, ConnectReturnCode> {
            let (client, mut ev) = AsyncClient::new(o, 1000);
            let first = tokio::time::timeout(WAIT, async {
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(a))) => return Ok(a),
                        Ok(_) => {}
                        Err(ConnectionError::ConnectionRefused(code)) => return Err(code),
                        Err(e) => panic!("connect failed: {e}"),
                    }
                }
            })
            .await
            .expect("CONNACK in time");
            first?;
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(forward(ev, tx));
            Ok(Client { client, rx })
        }

        impl Client {
            /// The next incoming packet that `f` accepts (others are skipped).
            pub async fn next<T>(
                &mut self,
                what: &str,
                mut f: impl FnMut(Packet) -> Option<T>,
            ) -> T {
                let until = tokio::time::Instant::now() + WAIT;
                loop {
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    match tokio::time::timeout(left, self.rx.recv()).await {
                        Ok(Some(p)) => {
                            if let Some(v) = f(p) {
                                return v;
                            }
                        }
                        Ok(None) => panic!("connection closed while waiting for {what}"),
                        Err(_) => panic!("timed out waiting for {what}"),
                    }
                }
            }

            /// Publishes `payload` to `topic` (not retained); returns once the client queued it.
            pub async fn send(&self, topic: &str, qos: QoS, payload: &str) {
                self.client
                    .publish(topic.to_string(), qos, false, payload.as_bytes().to_vec())
                    .await
                    .expect("publish");
            }

            /// Subscribes and returns the SUBACK codes.
            pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
                self.client.subscribe(filter, qos).await.expect("subscribe");
                self.next("SUBACK", |p| match p {
                    Packet::SubAck(s) => Some(s.return_codes),
                    _ => None,
                })
                .await
            }

            /// Next PUBLISH as (topic, payload).
            pub async fn publish_in(&mut self) -> (String, Vec<u8>) {
                self.next("PUBLISH", |p| match p {
                    Packet::Publish(p) => Some((topic_string(p.topic), p.payload.to_vec())),
                    _ => None,
                })
                .await
            }

            /// Whether a PUBLISH arrives within `d`.
            pub async fn quiet_for(&mut self, d: Duration) -> Option<String> {
                let until = tokio::time::Instant::now() + d;
                loop {
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    match tokio::time::timeout(left, self.rx.recv()).await {
                        Ok(Some(Packet::Publish(p))) => return Some(topic_string(p.topic)),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => return None,
                    }
                }
            }
        }
    };
}

/// MQTT keeps working for everyone: a QoS 1 round trip through the broker.
pub async fn assert_mqtt_served(r: &Running, id: &str) {
    let mut c = v3::connect(mqtt(r), id, None)
        .await
        .expect("bystander connects");
    c.subscribe(&format!("bystander/{id}"), v3::QoS::AtLeastOnce)
        .await;
    let t = tokio::time::Instant::now();
    c.client
        .publish(
            format!("bystander/{id}"),
            v3::QoS::AtLeastOnce,
            false,
            "ping",
        )
        .await
        .expect("publish");
    let (topic, body) = c.publish_in().await;
    assert_eq!(
        (topic.as_str(), body.as_slice()),
        (format!("bystander/{id}").as_str(), &b"ping"[..])
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a bystander's QoS 1 round trip took {:?}",
        t.elapsed()
    );
    c.client.disconnect().await.expect("disconnect");
}

pub mod v3 {
    use super::*;
    pub use rumqttc::{
        AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
        SubscribeReasonCode,
    };

    client_common!("3.1.1");

    /// Hands every incoming packet on until the connection or the receiver is gone.
    async fn forward(mut ev: rumqttc::EventLoop, tx: mpsc::UnboundedSender<Packet>) {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn topic_string(topic: String) -> String {
        topic
    }
}

pub mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};

    client_common!("5.0");

    impl Client {
        /// Publishes `payload` to `topic` at QoS 1 and returns the PUBACK's reason.
        pub async fn publish_qos1(&mut self, topic: &str, payload: &str) -> PubAckReason {
            self.send(topic, QoS::AtLeastOnce, payload).await;
            self.next("PUBACK", |p| match p {
                Packet::PubAck(a) => Some(a.reason),
                _ => None,
            })
            .await
        }

        /// The reason code of the DISCONNECT the broker sends next.
        pub async fn disconnect_reason(
            &mut self,
        ) -> rumqttc::v5::mqttbytes::v5::DisconnectReasonCode {
            self.next("DISCONNECT", |p| match p {
                Packet::Disconnect(d) => Some(d.reason_code),
                _ => None,
            })
            .await
        }
    }

    /// Hands every incoming packet on until a DISCONNECT, or the connection or the receiver is
    /// gone.
    async fn forward(mut ev: rumqttc::v5::EventLoop, tx: mpsc::UnboundedSender<Packet>) {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(p)) => {
                    let end = matches!(p, Packet::Disconnect(_));
                    if tx.send(p).is_err() || end {
                        return;
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                    reason_code,
                    ..
                })) => {
                    // rumqttc reports a server DISCONNECT as an error: hand it on.
                    let d = rumqttc::v5::mqttbytes::v5::Disconnect::new(reason_code);
                    let _ = tx.send(Packet::Disconnect(d));
                    return;
                }
                Err(_) => return,
            }
        }
    }

    fn topic_string(topic: bytes::Bytes) -> String {
        String::from_utf8_lossy(&topic).into_owned()
    }
}

/// A local HTTP server recording JSON bodies POSTed to it and answering with `respond`.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

/// What the local HTTP server does with each request.
pub type Responder =
    Arc<dyn Fn(&serde_json::Value) -> (u16, String, Option<Duration>) + Send + Sync>;

impl HttpServer {
    /// Serves on 127.0.0.1:0 until the test ends.
    pub async fn start(respond: Responder) -> HttpServer {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), respond).await
    }

    /// Serves on `addr` (a port a test reserved) until the test ends.
    pub async fn start_on(addr: SocketAddr, respond: Responder) -> HttpServer {
        use axum::extract::State;
        let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let state = (bodies.clone(), respond);
        async fn handle(
            State((bodies, respond)): State<(Arc<Mutex<Vec<serde_json::Value>>>, Responder)>,
            body: axum::body::Bytes,
        ) -> (axum::http::StatusCode, String) {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            bodies.lock().push(v.clone());
            let (status, text, delay) = respond(&v);
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            (
                axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK),
                text,
            )
        }
        let app = axum::Router::new()
            .fallback(axum::routing::post(handle))
            .with_state(state);
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind http");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        HttpServer { addr, bodies }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn count(&self) -> usize {
        self.bodies.lock().len()
    }

    pub fn find(&self, f: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.bodies.lock().iter().find(|v| f(v)).cloned()
    }
}
