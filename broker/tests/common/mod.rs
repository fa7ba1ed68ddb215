//! Shared pieces of the broker's integration tests: an in-process broker on ephemeral
//! 127.0.0.1 ports, deadlines for every wait, a tiny raw MQTT client for hand-built packets,
//! thin wrappers around rumqttc's v3 and v5 clients, and the bystander that proves the broker
//! keeps serving everyone else.
// Each test binary uses a different part of this module (and of its re-exports); the rumqttc
// wrappers hand unwanted packets back by value in `Err`, which is fine for a test client.
#![allow(dead_code, unused_imports, clippy::result_large_err)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use corvid_broker::server::Running;
use corvid_broker::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod raw;
pub mod tls;
#[macro_use]
mod driven;
pub mod v3;
pub mod v5;

pub use raw::{pkt, Io, Packet, Raw};

/// Longest any single wait may take; generous, because the test machine is shared and slow.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `cond` until it holds, failing the test with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A configuration with every listener and the admin port on an ephemeral 127.0.0.1 port.
pub fn config() -> Config {
    let mut cfg = Config::default();
    let any = "127.0.0.1:0".parse().expect("address");
    cfg.listeners.mqtt.bind = any;
    cfg.listeners.ws.bind = any;
    cfg.listeners.mqtts.bind = any;
    cfg.listeners.wss.bind = any;
    cfg.admin.bind = any;
    cfg
}

/// Starts a broker with [`config`].
pub async fn start() -> Running {
    start_with(config()).await
}

/// Starts a broker with `cfg`.
pub async fn start_with(cfg: Config) -> Running {
    corvid_broker::server::start(cfg)
        .await
        .expect("broker starts")
}

/// Stops a broker, giving clients a moment to go.
pub async fn stop(running: Running) {
    running.shutdown(Duration::from_secs(5)).await;
}

/// The plain MQTT listener's address.
pub fn mqtt(running: &Running) -> SocketAddr {
    running.addr("mqtt").expect("mqtt listener")
}

/// Protocol level in CONNECT (`V::BOTH` for tests that run once per version): the test kit's.
pub use corvid_testkit::Protocol as V;

/// A client that stays connected through a bad-input case and must still be served after it.
pub struct Bystander {
    raw: Raw,
    topic: String,
    next_id: u16,
}

impl Bystander {
    /// Connects an MQTT 5 client subscribed at QoS 1 to its own topic.
    pub async fn connect(addr: SocketAddr, name: &str) -> Bystander {
        let mut raw = Raw::connect(addr, V::V5, name).await;
        let topic = format!("bystander/{name}");
        assert_eq!(raw.subscribe(1, &topic, 1).await, 1);
        Bystander {
            raw,
            topic,
            next_id: 1,
        }
    }

    /// Publishes at QoS 1 to its own topic and asserts both the PUBACK and the delivery.
    pub async fn assert_served(&mut self) {
        self.next_id += 1;
        let payload = format!("still here {}", self.next_id);
        let publish = pkt::publish(
            V::V5,
            self.topic.as_bytes(),
            1,
            self.next_id,
            payload.as_bytes(),
        );
        self.raw.send(&publish).await;
        let (mut acked, mut got) = (false, false);
        while !(acked && got) {
            let p = self.raw.recv().await.expect("bystander was disconnected");
            match p.kind() {
                pkt::PUBACK => acked = true,
                pkt::PUBLISH => {
                    let (topic, id, body) = p.publish(V::V5);
                    assert_eq!(
                        (topic.as_str(), body),
                        (self.topic.as_str(), payload.clone().into_bytes())
                    );
                    self.raw.send(&pkt::puback(id.expect("QoS 1"))).await;
                    got = true;
                }
                _ => panic!("bystander got unexpected {p:?}"),
            }
        }
    }
}

/// Asserts the broker serves an existing bystander and a brand-new client.
pub async fn assert_serving(addr: SocketAddr, bystander: &mut Bystander) {
    bystander.assert_served().await;
    let mut fresh = Bystander::connect(addr, &format!("fresh-{:08x}", fastrand::u32(..))).await;
    fresh.assert_served().await;
}

/// Resident set size in bytes of process `pid`, or of this process (where in-process brokers
/// run) for `None`; 0 when it cannot be read.
pub fn rss_bytes(pid: Option<u32>) -> u64 {
    let path = pid.map_or("/proc/self/status".to_string(), |p| {
        format!("/proc/{p}/status")
    });
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `GET path` on the admin port; returns status and body.
pub async fn http_get(admin: SocketAddr, path: &str) -> (u16, String) {
    http(admin, "GET", path, &[]).await
}

/// One HTTP request with `headers` to the admin port; returns status and body.
pub async fn http(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    within("admin HTTP request", async {
        let mut s = TcpStream::connect(admin).await.expect("admin connect");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Content-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("admin write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("admin read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("HTTP status line");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
    .await
}
