//! What sits between TCP and MQTT: TLS (including certificate rotation without a restart),
//! WebSocket on its path, and the PROXY protocol's client address as the admin API shows it.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::tls::Pki;
use common::{v3, v5, within, Raw, V};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Q3 = rumqttc::QoS;
type Q5 = rumqttc::v5::mqttbytes::QoS;

fn tls_config(pki: &Pki) -> corvid_broker::Config {
    let mut cfg = common::config();
    cfg.listeners.mqtts.enabled = true;
    cfg.listeners.wss.enabled = true;
    cfg.tls.cert_file = pki.cert_file.clone();
    cfg.tls.key_file = pki.key_file.clone();
    cfg
}

/// MQTT over TLS (v3 client) and over WebSocket-over-TLS (v5 client), verified against the
/// test CA, exchanging messages with a plain TCP client.
#[tokio::test]
async fn tls_and_wss_round_trips() {
    let (pki, _) = Pki::new("server");
    let b = common::start_with(tls_config(&pki)).await;
    let (mqtts, wss) = (b.addr("mqtts").expect("mqtts"), b.addr("wss").expect("wss"));
    let mut plain = v3::client(common::mqtt(&b), "tls-plain").await;
    plain.subscribe("tls/#", Q3::AtLeastOnce).await;

    let mut o = v3::options(mqtts, "tls-v3");
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(pki.client_config()),
    ));
    let mut over_tls = v3::connect(o).await.0;
    over_tls.subscribe("tls/#", Q3::AtLeastOnce).await;
    over_tls
        .publish("tls/from-tls", Q3::AtLeastOnce, false, "a")
        .await;

    let url = format!("wss://127.0.0.1:{}/mqtt", wss.port());
    let mut o = rumqttc::v5::MqttOptions::new("tls-wss", url, wss.port());
    o.set_transport(rumqttc::Transport::wss_with_config(
        rumqttc::TlsConfiguration::Rustls(pki.client_config()),
    ));
    let mut over_wss = v5::connect(o).await.0;
    over_wss
        .publish("tls/from-wss", Q5::AtLeastOnce, false, "b")
        .await;

    for c in [&mut plain, &mut over_tls] {
        let got: Vec<(String, String)> = c
            .publishes(2)
            .await
            .into_iter()
            .map(|(t, p, _)| (t, p))
            .collect();
        assert_eq!(
            got,
            [
                ("tls/from-tls".into(), "a".into()),
                ("tls/from-wss".into(), "b".into())
            ]
        );
    }
    common::stop(b).await;
}

/// Replacing the certificate files is enough: new connections get the new certificate without
/// a restart, and connections made before keep working.
#[tokio::test]
async fn tls_certificate_is_reloaded_from_disk() {
    let (pki, first) = Pki::new("first");
    let b = common::start_with(tls_config(&pki)).await;
    let mqtts = b.addr("mqtts").expect("mqtts");
    let (tls, shown) = pki.connect(mqtts).await;
    assert_eq!(shown, first);
    let mut before = Raw::over(Box::new(tls), V::V5);
    before.handshake("reload-before").await;

    let second = pki.issue("second");
    within("the new certificate to be served", async {
        while pki.connect(mqtts).await.1 != second {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(before.subscribe(1, "reload/t", 1).await, 1);
    let mut after = Raw::over(Box::new(pki.connect(mqtts).await.0), V::V5);
    after.handshake("reload-after").await;
    after
        .send(&common::pkt::publish(V::V5, b"reload/t", 0, 0, b"x"))
        .await;
    let (topic, _, payload) = before.expect(common::pkt::PUBLISH).await.publish(V::V5);
    assert_eq!((topic.as_str(), &payload[..]), ("reload/t", &b"x"[..]));
    common::stop(b).await;
}

#[tokio::test]
async fn websocket_round_trip() {
    let b = common::start().await;
    let ws = b.addr("ws").expect("ws");
    let mut plain = v5::client(common::mqtt(&b), "ws-plain").await;
    plain.subscribe("ws/#", Q5::AtLeastOnce).await;

    let url = format!("ws://127.0.0.1:{}/mqtt", ws.port());
    let mut o = rumqttc::MqttOptions::new("ws-client", url, ws.port());
    o.set_transport(rumqttc::Transport::Ws);
    let mut over_ws = v3::connect(o).await.0;
    over_ws.subscribe("ws/#", Q3::ExactlyOnce).await;
    over_ws
        .publish("ws/a", Q3::ExactlyOnce, false, "over websocket")
        .await;
    plain
        .publish("ws/b", Q5::AtLeastOnce, false, "over tcp")
        .await;

    let got = payloads(over_ws.publishes(2).await);
    assert_eq!(got, ["over websocket", "over tcp"]);
    let got = payloads(plain.publishes(2).await);
    assert_eq!(got, ["over websocket", "over tcp"]);
    common::stop(b).await;
}

/// Sends a WebSocket upgrade request for `path`; returns the stream and the status line.
async fn ws_upgrade(ws: SocketAddr, path: &str) -> (TcpStream, String) {
    within("WebSocket upgrade", async {
        let mut s = TcpStream::connect(ws).await.expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        // Read exactly the response head, leaving any frames after it unread.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = s.read_u8().await.expect("response head");
            head.push(byte);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        (s, text.lines().next().unwrap_or("").to_string())
    })
    .await
}

/// The upgrade is accepted only on the configured path (`/mqtt`).
#[tokio::test]
async fn websocket_wrong_path_is_refused() {
    let b = common::start().await;
    let ws = b.addr("ws").expect("ws");
    assert!(ws_upgrade(ws, "/other").await.1.starts_with("HTTP/1.1 404"));
    assert!(ws_upgrade(ws, "/mqtt").await.1.starts_with("HTTP/1.1 101"));
    common::stop(b).await;
}

/// MQTT over WebSocket uses binary frames only; a text frame closes the connection
/// [MQTT-6.0.0-1].
#[tokio::test]
async fn websocket_text_frame_closes_connection() {
    let b = common::start().await;
    let ws = b.addr("ws").expect("ws");
    let mut bystander = common::Bystander::connect(common::mqtt(&b), "wstext-by").await;
    let (mut s, status) = ws_upgrade(ws, "/mqtt").await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 5]; // FIN + text, masked, 5 bytes
    frame.extend_from_slice(&mask);
    frame.extend(b"hello".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    s.write_all(&frame).await.expect("write frame");
    let mut rest = Vec::new();
    within("close after a text frame", s.read_to_end(&mut rest))
        .await
        .expect("read");
    common::assert_serving(common::mqtt(&b), &mut bystander).await;
    common::stop(b).await;
}

/// The peer address the admin API reports for `client_id`.
async fn peer_of(admin: SocketAddr, client_id: &str) -> Option<String> {
    let (status, body) = common::http_get(admin, "/api/v1/clients").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    v["clients"]
        .as_array()
        .expect("clients array")
        .iter()
        .find(|c| c["client_id"] == client_id)
        .and_then(|c| c["connection"]["peer"].as_str().map(str::to_string))
}

/// Behind a load balancer the PROXY header (v1 text, v2 binary) names the real client; a
/// connection without one is refused on such a listener.
#[tokio::test]
async fn proxy_protocol_client_address() {
    let mut cfg = common::config();
    cfg.listeners.mqtt.proxy_protocol = true;
    let b = common::start_with(cfg).await;
    let addr = common::mqtt(&b);

    let mut c1 = Raw::tcp(addr, V::V311).await;
    c1.send(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 1883\r\n")
        .await;
    c1.handshake("pp-v1").await;

    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::7]:40000".parse::<SocketAddr>().expect("addr"),
            "[2001:db8::1]:1883".parse::<SocketAddr>().expect("addr"),
        ),
    )
    .build()
    .expect("v2 header");
    let mut c2 = Raw::tcp(addr, V::V5).await;
    c2.send(&header).await;
    c2.handshake("pp-v2").await;

    assert_eq!(
        peer_of(b.admin, "pp-v1").await.as_deref(),
        Some("203.0.113.7:51234")
    );
    assert_eq!(
        peer_of(b.admin, "pp-v2").await.as_deref(),
        Some("[2001:db8::7]:40000")
    );

    let mut bare = Raw::tcp(addr, V::V5).await;
    bare.send(&common::pkt::connect(V::V5, "pp-none")).await;
    assert!(
        bare.closed().await.is_empty(),
        "accepted without a PROXY header"
    );
    assert_eq!(c2.subscribe(1, "pp/t", 0).await, 0, "others still served");
    common::stop(b).await;
}

/// The payloads of `publishes`, in arrival order.
fn payloads<Q>(publishes: Vec<(String, String, Q)>) -> Vec<String> {
    publishes.into_iter().map(|(_, p, _)| p).collect()
}
