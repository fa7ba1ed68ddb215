//! The MQTT bridge against real brokers: Debian's mosquitto (plain, with passwords, with TLS
//! and required client certificates — the cloud IoT hub case) and RabbitMQ's MQTT plugin.
//! Faults: the remote down at start, killed mid-stream, refusing our credentials or our
//! missing certificate — each must show in the status and metrics while the broker keeps
//! serving its own clients.
//!
//! Servers are the tests' own processes on free loopback ports; when one cannot start the test
//! skips with a message, or fails with `CORVID_REQUIRE_BRIDGE_SERVERS=1` (CI).

mod bridge_support;
mod common;

use std::path::Path;
use std::time::Duration;

use bridge_support::{bridge, free_port, sample, super_wait, wait_state, Mosquitto, Service};
use common::{assert_serving, http_get, v3, within, Bystander};
use corvid_broker::bridge::BridgeState;
use corvid_broker::config::{
    BridgeBackoffConfig, BridgeBufferConfig, BridgeTlsConfig, MqttBridgeConfig, MqttEgressRule,
    MqttIngressRule, MqttRemoteConfig,
};
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(30);

fn egress(filter: &str, prefix: &str) -> MqttEgressRule {
    MqttEgressRule {
        local_filter: filter.into(),
        remote_prefix: prefix.into(),
        qos: 1,
        retain: None,
    }
}

fn bridge_to(name: &str, host: &str, port: u16) -> MqttBridgeConfig {
    MqttBridgeConfig {
        name: name.into(),
        remote: MqttRemoteConfig {
            host: host.into(),
            port,
            client_id: Some(format!("corvid-test-{name}-{:08x}", fastrand::u32(..))),
            ..Default::default()
        },
        egress: vec![egress("sensors/#", "corvid/")],
        ingress: Vec::new(),
        buffer: BridgeBufferConfig::default(),
        backoff: BridgeBackoffConfig {
            initial_ms: 50,
            max_ms: 400,
        },
    }
}

async fn start_with_bridges(bridges: Vec<MqttBridgeConfig>) -> corvid_broker::server::Running {
    let mut cfg = common::config();
    cfg.bridges.mqtt = bridges;
    cfg.validate().expect("bridge config valid");
    common::start_with(cfg).await
}

async fn metrics(running: &corvid_broker::server::Running) -> String {
    http_get(running.admin, "/metrics").await.1
}

#[tokio::test]
async fn egress_and_ingress_through_mosquitto() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(remote) = Mosquitto::start(dir.path(), free_port(), "allow_anonymous true").await
    else {
        return;
    };
    let mut b = bridge_to("m", "127.0.0.1", remote.port);
    b.ingress = vec![MqttIngressRule {
        remote_filter: "cmd/#".into(),
        local_prefix: "remote/".into(),
        qos: 1,
    }];
    // An egress rule that would echo ingress back if loop prevention failed.
    b.egress.push(egress("remote/#", "echo/"));
    let running = start_with_bridges(vec![b]).await;
    wait_state(&running, "m", BridgeState::Up).await;

    let mut observer = v3::client(remote.addr(), "observer").await;
    observer.subscribe("corvid/#", QoS::AtLeastOnce).await;
    observer.subscribe("echo/#", QoS::AtLeastOnce).await;
    let mut local = v3::client(common::mqtt(&running), "local").await;
    local.subscribe("remote/#", QoS::AtLeastOnce).await;

    for i in 0..20 {
        local
            .publish("sensors/room1", QoS::AtLeastOnce, false, &format!("t{i}"))
            .await;
    }
    let got = observer.publishes(20).await;
    for (i, (topic, payload, _)) in got.iter().enumerate() {
        assert_eq!(topic, "corvid/sensors/room1");
        assert_eq!(payload, &format!("t{i}"), "egress keeps order");
    }

    // Ingress: a remote command arrives here under the local prefix, and is not echoed.
    observer
        .publish("cmd/valve", QoS::AtLeastOnce, false, "open")
        .await;
    let (topic, payload, _) = local.publishes(1).await.remove(0);
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("remote/cmd/valve", "open")
    );

    let m = bridge(&running, "m");
    super_wait("20 sent", WAIT, || m.metrics.sent.get() == 20).await;
    assert_eq!(m.metrics.received.get(), 1);
    let text = metrics(&running).await;
    assert_eq!(sample(&text, "corvid_bridge_sent_total", "m"), Some(20.0));
    assert_eq!(sample(&text, "corvid_bridge_up", "m"), Some(1.0));
    assert_eq!(sample(&text, "corvid_bridge_dropped_total", "m"), Some(0.0));
    assert!(
        text.contains("corvid_bridge_latency_seconds_count{bridge=\"m\"} 20"),
        "{text}"
    );
    let (status, body) = http_get(running.admin, "/api/v1/bridges").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["bridges"][0]["name"], "m");
    assert_eq!(v["bridges"][0]["state"], "up");
    assert_eq!(v["bridges"][0]["sent"], 20);
    // Nothing came back on echo/: the ingress message was not sent out again.
    local
        .publish("sensors/room1", QoS::AtLeastOnce, false, "last")
        .await;
    let (topic, _, _) = observer.publishes(1).await.remove(0);
    assert_eq!(topic, "corvid/sensors/room1", "no echo of ingress");
    common::stop(running).await;
}

#[tokio::test]
async fn remote_down_at_start_buffers_then_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    if bridge_support::mosquitto_bin().is_none() {
        bridge_support::unavailable("mosquitto is not installed");
        return;
    }
    let port = free_port();
    let mut b = bridge_to("late", "127.0.0.1", port);
    // Retained at the remote, so the messages can be read after the bridge drained them.
    b.egress[0].retain = Some(true);
    let running = start_with_bridges(vec![b]).await;
    wait_state(&running, "late", BridgeState::Down).await;
    let st = bridge(&running, "late").status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot reach the remote")),
        "{st:?}"
    );

    let mut local = v3::client(common::mqtt(&running), "local").await;
    for i in 0..50 {
        local
            .publish(&format!("sensors/s{i}"), QoS::AtLeastOnce, false, "v")
            .await;
    }
    let late = bridge(&running, "late");
    // All 50 wait: in the bridge buffer, except the few already handed to the MQTT client
    // (its request channel of 16 and the one the pump holds).
    super_wait("buffered while down", WAIT, || late.buffer.len() >= 50 - 17).await;
    assert_eq!(late.metrics.sent.get(), 0);
    let text = metrics(&running).await;
    assert_eq!(sample(&text, "corvid_bridge_up", "late"), Some(0.0));
    assert!(sample(&text, "corvid_bridge_failed_total", "late").is_some_and(|f| f >= 1.0));
    let mut bystander = Bystander::connect(common::mqtt(&running), "bystander").await;
    assert_serving(common::mqtt(&running), &mut bystander).await;

    let Some(_remote) = Mosquitto::start(dir.path(), port, "allow_anonymous true").await else {
        return;
    };
    wait_state(&running, "late", BridgeState::Up).await;
    super_wait("buffer drained", WAIT, || late.metrics.sent.get() == 50).await;
    assert_eq!(late.buffer.len(), 0);
    assert_eq!(late.buffer.dropped(), 0);
    let mut observer = v3::client(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "observer",
    )
    .await;
    observer.subscribe("corvid/#", QoS::AtLeastOnce).await;
    let mut topics: Vec<String> = observer
        .publishes(50)
        .await
        .into_iter()
        .map(|(t, _, _)| t)
        .collect();
    topics.sort();
    let mut want: Vec<String> = (0..50).map(|i| format!("corvid/sensors/s{i}")).collect();
    want.sort();
    assert_eq!(topics, want);
    common::stop(running).await;
}

#[tokio::test]
async fn remote_killed_mid_stream_counts_drops_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mut remote) = Mosquitto::start(dir.path(), free_port(), "allow_anonymous true").await
    else {
        return;
    };
    let mut b = bridge_to("k", "127.0.0.1", remote.port);
    b.buffer.max_messages = 10;
    b.egress[0].qos = 0;
    let running = start_with_bridges(vec![b]).await;
    wait_state(&running, "k", BridgeState::Up).await;
    let k = bridge(&running, "k");
    let mut local = v3::client(common::mqtt(&running), "local").await;
    for _ in 0..5 {
        local
            .publish("sensors/a", QoS::AtLeastOnce, false, "x")
            .await;
    }
    super_wait("5 sent", WAIT, || k.metrics.sent.get() == 5).await;

    remote.kill();
    wait_state(&running, "k", BridgeState::Down).await;
    for i in 0..300 {
        local
            .publish("sensors/a", QoS::AtLeastOnce, false, &format!("{i}"))
            .await;
    }
    super_wait("drops counted", WAIT, || k.buffer.dropped() > 0).await;
    assert_eq!(k.buffer.len(), 10, "buffer stays at its bound");
    let text = metrics(&running).await;
    let dropped = sample(&text, "corvid_bridge_dropped_total", "k").expect("dropped metric");
    assert!(dropped >= 1.0, "{text}");
    // The gauge counts the buffer and what the worker holds (handed to the client, waiting
    // for the connection), as the status does.
    let st = k.status();
    assert!(st.buffered >= 10, "{st:?}");
    assert_eq!(
        sample(&text, "corvid_bridge_buffered", "k"),
        Some(st.buffered as f64)
    );
    assert_eq!(st.state, BridgeState::Down);
    assert!(st.last_error.is_some(), "{st:?}");
    let mut bystander = Bystander::connect(common::mqtt(&running), "bystander").await;
    assert_serving(common::mqtt(&running), &mut bystander).await;

    // Back: the bridge reconnects and drains its buffer.
    remote.restart().await;
    wait_state(&running, "k", BridgeState::Up).await;
    super_wait("buffer drained", WAIT, || k.buffer.is_empty()).await;
    assert!(k.status().connects >= 2);
    common::stop(running).await;
}

/// What the worker holds (handed to the MQTT client, written and unacknowledged) counts in
/// `buffered`: during an outage every waiting QoS 1 message shows, not only those still in the
/// bridge buffer; after the recovery the error stays, time-stamped before it.
#[tokio::test]
async fn everything_waiting_counts_as_buffered_during_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mut remote) = Mosquitto::start(dir.path(), free_port(), "allow_anonymous true").await
    else {
        return;
    };
    let running = start_with_bridges(vec![bridge_to("held", "127.0.0.1", remote.port)]).await;
    wait_state(&running, "held", BridgeState::Up).await;
    let held = bridge(&running, "held");
    remote.kill();
    wait_state(&running, "held", BridgeState::Down).await;
    let mut local = v3::client(common::mqtt(&running), "local").await;
    for i in 0..5 {
        local
            .publish("sensors/a", QoS::AtLeastOnce, false, &format!("{i}"))
            .await;
    }
    super_wait("5 buffered", WAIT, || held.status().buffered == 5).await;
    assert_eq!(
        sample(&metrics(&running).await, "corvid_bridge_buffered", "held"),
        Some(5.0)
    );
    remote.restart().await;
    wait_state(&running, "held", BridgeState::Up).await;
    super_wait("5 sent", WAIT, || held.metrics.sent.get() == 5).await;
    super_wait("nothing waiting", WAIT, || held.status().buffered == 0).await;
    let st = held.status();
    assert!(
        st.last_error.is_some() && st.last_error_at.is_some_and(|at| at <= st.since),
        "{st:?}"
    );
    assert_eq!(
        sample(&metrics(&running).await, "corvid_bridge_buffered", "held"),
        Some(0.0)
    );
    common::stop(running).await;
}

#[tokio::test]
async fn wrong_credentials_are_refused_with_a_clear_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, "").expect("passwd file");
    let ok = std::process::Command::new("mosquitto_passwd")
        .args(["-b"])
        .arg(&passwd)
        .args(["bridge", "s3cret"])
        .status();
    if !ok.is_ok_and(|s| s.success()) {
        bridge_support::unavailable(
            "mosquitto_passwd is not installed (apt-get install mosquitto)",
        );
        return;
    }
    let extra = format!("allow_anonymous false\npassword_file {}", passwd.display());
    let Some(remote) = Mosquitto::start(dir.path(), free_port(), &extra).await else {
        return;
    };
    let secret = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("password file");
        p
    };
    let mut good = bridge_to("good", "127.0.0.1", remote.port);
    good.remote.username = Some("bridge".into());
    good.remote.password_file = Some(secret("good", "s3cret\n"));
    let mut bad = bridge_to("bad", "127.0.0.1", remote.port);
    bad.remote.username = Some("bridge".into());
    bad.remote.password_file = Some(secret("bad", "wrong\n"));
    let mut missing = bridge_to("nofile", "127.0.0.1", remote.port);
    missing.remote.username = Some("bridge".into());
    missing.remote.password_file = Some(dir.path().join("does-not-exist"));
    let running = start_with_bridges(vec![good, bad, missing]).await;

    wait_state(&running, "good", BridgeState::Up).await;
    wait_state(&running, "bad", BridgeState::Refused).await;
    wait_state(&running, "nofile", BridgeState::Error).await;
    let st = bridge(&running, "bad").status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused the connection")),
        "{st:?}"
    );
    let st = bridge(&running, "nofile").status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("does-not-exist")),
        "{st:?}"
    );
    let text = metrics(&running).await;
    assert!(sample(&text, "corvid_bridge_failed_total", "bad").is_some_and(|f| f >= 1.0));
    assert_eq!(sample(&text, "corvid_bridge_up", "bad"), Some(0.0));
    assert_eq!(sample(&text, "corvid_bridge_up", "good"), Some(1.0));
    let (_, body) = http_get(running.admin, "/api/v1/bridges").await;
    assert!(body.contains("\"state\":\"refused\""), "{body}");
    let mut bystander = Bystander::connect(common::mqtt(&running), "bystander").await;
    assert_serving(common::mqtt(&running), &mut bystander).await;
    common::stop(running).await;
}

/// A throwaway PKI for the IoT-hub case: CA, server certificate, client certificate.
struct HubPki {
    ca: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
}

fn hub_pki(dir: &Path) -> HubPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "test hub CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
    let issue = |names: Vec<String>, cn: &str| {
        let mut p = CertificateParams::new(names).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca).expect("cert");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) =
        issue(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
    let (client_cert, client_key) = issue(Vec::new(), "device-1");
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write PEM");
        p
    };
    HubPki {
        ca: w("ca.pem", &ca.pem()),
        server_cert: w("server.pem", &server_cert),
        server_key: w("server.key", &server_key),
        client_cert: w("client.pem", &client_cert),
        client_key: w("client.key", &client_key),
    }
}

#[tokio::test]
async fn tls_with_client_certificate_like_an_iot_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = hub_pki(dir.path());
    let extra = format!(
        "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
         use_identity_as_username true",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let Some(remote) = Mosquitto::start(dir.path(), free_port(), &extra).await else {
        return;
    };
    let mut hub = bridge_to("hub", "localhost", remote.port);
    hub.remote.tls = Some(BridgeTlsConfig {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
    });
    hub.ingress = vec![MqttIngressRule {
        remote_filter: "devices/device-1/cmd".into(),
        local_prefix: "hub/".into(),
        qos: 1,
    }];
    let mut nocert = bridge_to("nocert", "localhost", remote.port);
    nocert.remote.tls = Some(BridgeTlsConfig {
        ca_file: Some(pki.ca.clone()),
        ..Default::default()
    });
    let running = start_with_bridges(vec![hub, nocert]).await;
    wait_state(&running, "hub", BridgeState::Up).await;
    let refused = bridge(&running, "nocert");
    super_wait("nocert fails", WAIT, || {
        refused.metrics.failed.get() >= 1 && refused.status().last_error.is_some()
    })
    .await;
    wait_state(&running, "nocert", BridgeState::Refused).await;
    let st = refused.status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("requires a client certificate")),
        "{st:?}"
    );

    // The test's own device client, also with the client certificate, watches the hub.
    let mut opts = rumqttc::MqttOptions::new("watcher", "localhost", remote.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(device_tls(&pki))),
    ));
    let (mut watcher, _) = v3::connect(opts).await;
    watcher.subscribe("corvid/#", QoS::AtLeastOnce).await;
    let mut local = v3::client(common::mqtt(&running), "local").await;
    local.subscribe("hub/#", QoS::AtLeastOnce).await;
    local
        .publish("sensors/t", QoS::AtLeastOnce, false, "over tls")
        .await;
    let (topic, payload, _) = watcher.publishes(1).await.remove(0);
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("corvid/sensors/t", "over tls")
    );
    watcher
        .publish("devices/device-1/cmd", QoS::AtLeastOnce, false, "reboot")
        .await;
    let (topic, payload, _) = within("ingress over TLS", local.publishes(1))
        .await
        .remove(0);
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("hub/devices/device-1/cmd", "reboot")
    );
    common::stop(running).await;
}

/// A rustls client trusting the hub CA and presenting the device certificate.
fn device_tls(pki: &HubPki) -> tokio_rustls::rustls::ClientConfig {
    use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};
    let pem = |p: &Path| std::fs::read(p).expect("read PEM");
    let mut roots = RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem(&pki.ca).as_slice()) {
        roots.add(c.expect("CA PEM")).expect("CA root");
    }
    let chain = rustls_pemfile::certs(&mut pem(&pki.client_cert).as_slice())
        .collect::<Result<Vec<_>, _>>()
        .expect("client cert PEM");
    let key = rustls_pemfile::private_key(&mut pem(&pki.client_key).as_slice())
        .expect("key PEM")
        .expect("a key");
    ClientConfig::builder_with_provider(std::sync::Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth")
}

#[tokio::test]
async fn bridge_to_rabbitmq_mqtt_plugin() {
    let port = free_port();
    let Some(_rabbit) = Service::start("rabbitmq", port).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("password file");
        p
    };
    // `scripts/services` configures user corvid / corvid-secret and no anonymous access.
    let mut rabbit = bridge_to("rabbit", "127.0.0.1", port);
    rabbit.remote.username = Some("corvid".into());
    rabbit.remote.password_file = Some(secret("good", "corvid-secret"));
    rabbit.ingress = vec![MqttIngressRule {
        remote_filter: "cmd/#".into(),
        local_prefix: "rabbit/".into(),
        qos: 1,
    }];
    let mut bad = bridge_to("rabbit-bad", "127.0.0.1", port);
    bad.remote.username = Some("corvid".into());
    bad.remote.password_file = Some(secret("bad", "nope"));
    let running = start_with_bridges(vec![rabbit, bad]).await;
    wait_state(&running, "rabbit", BridgeState::Up).await;
    wait_state(&running, "rabbit-bad", BridgeState::Refused).await;

    let mut opts = v3::options(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "observer",
    );
    opts.set_credentials("corvid", "corvid-secret");
    let (mut observer, _) = v3::connect(opts).await;
    observer.subscribe("corvid/#", QoS::AtLeastOnce).await;
    let mut local = v3::client(common::mqtt(&running), "local").await;
    local.subscribe("rabbit/#", QoS::AtLeastOnce).await;
    for i in 0..10 {
        local
            .publish("sensors/r", QoS::AtLeastOnce, false, &format!("r{i}"))
            .await;
    }
    let got = observer.publishes(10).await;
    let payloads: Vec<&str> = got.iter().map(|(_, p, _)| p.as_str()).collect();
    let want: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    assert_eq!(payloads, want);
    assert!(got.iter().all(|(t, _, _)| t == "corvid/sensors/r"));
    observer
        .publish("cmd/fan", QoS::AtLeastOnce, false, "on")
        .await;
    let (topic, payload, _) = local.publishes(1).await.remove(0);
    assert_eq!((topic.as_str(), payload.as_str()), ("rabbit/cmd/fan", "on"));
    let r = bridge(&running, "rabbit");
    super_wait("10 sent", WAIT, || r.metrics.sent.get() == 10).await;
    let st = bridge(&running, "rabbit-bad").status();
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused the connection")),
        "{st:?}"
    );
    common::stop(running).await;
}

#[tokio::test]
async fn shared_ingress_takes_each_remote_message_once_per_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(remote) = Mosquitto::start(dir.path(), free_port(), "allow_anonymous true").await
    else {
        return;
    };
    // Two bridges with one shared subscription stand for two pods of a cluster.
    let pod = |name: &str| {
        let mut b = bridge_to(name, "127.0.0.1", remote.port);
        b.egress.clear();
        b.ingress = vec![MqttIngressRule {
            remote_filter: "$share/corvid/cmd/#".into(),
            local_prefix: "in/".into(),
            qos: 1,
        }];
        b
    };
    let running = start_with_bridges(vec![pod("pod-0"), pod("pod-1")]).await;
    wait_state(&running, "pod-0", BridgeState::Up).await;
    wait_state(&running, "pod-1", BridgeState::Up).await;
    let (a, b) = (bridge(&running, "pod-0"), bridge(&running, "pod-1"));
    let mut local = v3::client(common::mqtt(&running), "local").await;
    local.subscribe("in/#", QoS::AtLeastOnce).await;
    let mut sender = v3::client(remote.addr(), "sender").await;
    // The bridges subscribe just after their CONNACK: probe until both take messages
    // (mosquitto spreads a shared subscription's messages over its members).
    let until = tokio::time::Instant::now() + WAIT;
    while a.metrics.received.get() == 0 || b.metrics.received.get() == 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "both shared members active"
        );
        sender
            .publish("cmd/probe", QoS::AtLeastOnce, false, "p")
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..10 {
        sender
            .publish(&format!("cmd/{i}"), QoS::AtLeastOnce, false, "x")
            .await;
    }
    sender
        .publish("cmd/end", QoS::AtLeastOnce, false, "end")
        .await;
    // Everything but the probes, until the end marker and all ten have arrived.
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    while seen.len() < 11 {
        let (topic, _, _) = local.publishes(1).await.remove(0);
        if topic != "in/cmd/probe" {
            *seen.entry(topic).or_default() += 1;
        }
    }
    // One more round trip: a late duplicate would arrive before this.
    sender
        .publish("cmd/last", QoS::AtLeastOnce, false, "l")
        .await;
    loop {
        let (topic, _, _) = local.publishes(1).await.remove(0);
        if topic == "in/cmd/last" {
            break;
        }
        if topic != "in/cmd/probe" {
            *seen.entry(topic).or_default() += 1;
        }
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "each remote message once: {seen:?}"
    );
    assert!(seen.contains_key("in/cmd/end") && seen.contains_key("in/cmd/9"));
    common::stop(running).await;
}
