//! Operations over real sockets: webhook payloads at a local HTTP sink (and a dead sink not
//! slowing publishers, measured), `$SYS` content, trace files, the admin API and the
//! `corvid-broker ctl` / `passwd` command lines.

use crate::access_support;
use crate::typed_api;

use std::sync::Arc;
use std::time::{Duration, Instant};

use access_support::*;
use corvid_broker::config::{AclAction, AclRule, AclWho, AclWhoOne, Permission, WebhookConfig};
use serde_json::Value;

fn ok_sink() -> Responder {
    Arc::new(|_: &Value| (200, String::new(), None))
}

async fn wait_event(sink: &HttpServer, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    eventually(what, || async { sink.find(&f) }).await
}

#[tokio::test]
async fn webhook_payloads_for_every_event() {
    let all = HttpServer::start(ok_sink()).await;
    let filtered = HttpServer::start(ok_sink()).await;
    let mut c = config();
    c.webhooks = vec![
        WebhookConfig {
            name: "all".into(),
            url: all.url(),
            ..Default::default()
        },
        WebhookConfig {
            name: "only-pub".into(),
            url: filtered.url(),
            events: vec!["message.publish".into()],
            topic: Some("only/#".into()),
            ..Default::default()
        },
    ];
    let r = start(c).await;
    let a = mqtt(&r);
    let mut sub = v5::connect(a, "hook-sub", Some(("ann", "x")))
        .await
        .expect("sub");
    sub.subscribe("t/#", v5::QoS::AtLeastOnce).await;
    let publisher = v3::connect(a, "hook-pub", None).await.expect("pub");
    publisher.send("t/1", v3::QoS::AtLeastOnce, "hello").await;
    sub.publish_in().await;
    publisher
        .client
        .publish("only/x", v3::QoS::AtMostOnce, false, vec![0xff, 0x00])
        .await
        .expect("publish");
    sub.client.unsubscribe("t/#").await.expect("unsubscribe");
    sub.next("UNSUBACK", |p| {
        matches!(p, v5::Packet::UnsubAck(_)).then_some(())
    })
    .await;
    sub.client.disconnect().await.expect("disconnect");

    let e = wait_event(&all, "client.connected", |v| {
        v["event"] == "client.connected" && v["client_id"] == "hook-sub"
    })
    .await;
    assert_eq!(e["username"], "ann");
    assert_eq!(e["protocol"], "5.0");
    assert_eq!(e["keepalive"], 30);
    assert_eq!(e["node"], "n1");
    assert!(e["peer"]
        .as_str()
        .is_some_and(|p| p.starts_with("127.0.0.1:")));
    assert!(e["timestamp"]
        .as_u64()
        .is_some_and(|t| t > 1_600_000_000_000));
    let e = wait_event(&all, "session.subscribed", |v| {
        v["event"] == "session.subscribed"
    })
    .await;
    assert_eq!(
        (
            e["client_id"].as_str(),
            e["topic"].as_str(),
            e["qos"].as_u64()
        ),
        (Some("hook-sub"), Some("t/#"), Some(1))
    );
    let e = wait_event(&all, "message.publish", |v| {
        v["event"] == "message.publish" && v["topic"] == "t/1"
    })
    .await;
    assert_eq!(e["client_id"], "hook-pub");
    assert_eq!(e["payload"], "hello");
    assert_eq!(e["payload_encoding"], "plain");
    assert_eq!(e["qos"], 1);
    let e = wait_event(&all, "message.delivered", |v| {
        v["event"] == "message.delivered"
    })
    .await;
    assert_eq!(
        (e["client_id"].as_str(), e["from_client_id"].as_str()),
        (Some("hook-sub"), Some("hook-pub"))
    );
    let e = wait_event(&all, "message.acked", |v| v["event"] == "message.acked").await;
    assert_eq!(
        (e["client_id"].as_str(), e["topic"].as_str()),
        (Some("hook-sub"), Some("t/1"))
    );
    let e = wait_event(&all, "message.dropped", |v| v["event"] == "message.dropped").await;
    assert_eq!(
        (e["topic"].as_str(), e["reason"].as_str()),
        (Some("only/x"), Some("no_subscribers"))
    );
    let e = wait_event(&all, "session.unsubscribed", |v| {
        v["event"] == "session.unsubscribed"
    })
    .await;
    assert_eq!(e["topic"], "t/#");
    let e = wait_event(&all, "client.disconnected", |v| {
        v["event"] == "client.disconnected" && v["client_id"] == "hook-sub"
    })
    .await;
    assert_eq!(e["reason"], "normal");

    // The filtered webhook got only message.publish on only/#, binary payload as base64.
    let e = wait_event(&filtered, "filtered publish", |v| v["topic"] == "only/x").await;
    assert_eq!(e["payload"], "/wA=");
    assert_eq!(e["payload_encoding"], "base64");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(filtered.count(), 1, "{:?}", filtered.bodies.lock());
    assert!(metric(&r, "corvid_webhook_delivered_total", &[r#"webhook="all""#]).await >= 9.0);
}

/// Publishes `n` QoS 1 messages and waits until the subscriber has them all.
async fn publish_round(r: &corvid_broker::server::Running, n: usize) -> Duration {
    let a = mqtt(r);
    let mut sub = v3::connect(a, "m-sub", None).await.expect("sub");
    sub.subscribe("m/#", v3::QoS::AtLeastOnce).await;
    let publisher = v3::connect(a, "m-pub", None).await.expect("pub");
    let t0 = Instant::now();
    let p = publisher.client.clone();
    tokio::spawn(async move {
        for i in 0..n {
            if p.publish("m/t", v3::QoS::AtLeastOnce, false, format!("{i}"))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    for _ in 0..n {
        sub.publish_in().await;
    }
    t0.elapsed()
}

#[tokio::test]
async fn dead_webhook_does_not_slow_publishers() {
    const N: usize = 1000;
    let baseline = publish_round(&start(config()).await, N).await;

    // A sink that accepts connections and never answers in time.
    let dead = HttpServer::start(Arc::new(|_: &Value| {
        (200, String::new(), Some(Duration::from_secs(60)))
    }))
    .await;
    let mut c = config();
    c.webhooks = vec![WebhookConfig {
        name: "dead".into(),
        url: dead.url(),
        timeout_ms: 10_000,
        queue_size: 10,
        max_retries: 2,
        ..Default::default()
    }];
    let r = start(c).await;
    let with_dead = publish_round(&r, N).await;
    eprintln!("baseline {baseline:?}, with a dead webhook {with_dead:?}");
    assert!(
        with_dead < baseline * 3 + Duration::from_secs(1),
        "baseline {baseline:?}, with a dead webhook {with_dead:?}"
    );
    // Nearly everything (publish, delivered, acked per message) was dropped for that
    // webhook, and counted.
    let dropped = metric(&r, "corvid_webhook_dropped_total", &[r#"webhook="dead""#]).await;
    assert!(dropped >= (3 * N - 20) as f64, "dropped {dropped}");
}

/// GET /api/v1/webhooks, the entry named `name`.
async fn webhook_status(r: &corvid_broker::server::Running, name: &str) -> Value {
    let (status, v) = api(r, reqwest::Method::GET, "/api/v1/webhooks", None).await;
    assert_eq!(status, 200, "{v}");
    v["webhooks"]
        .as_array()
        .and_then(|w| w.iter().find(|h| h["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn webhook_health_is_reported_while_idle() {
    // A port with nothing listening (reserved, then closed) for a webhook that no traffic uses.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let refusing = HttpServer::start(Arc::new(|_: &Value| (403, String::new(), None))).await;
    let mut c = config();
    c.webhooks = vec![
        WebhookConfig {
            name: "idle".into(),
            url: format!("http://{addr}/hook"),
            events: vec!["client.connected".into()],
            ..Default::default()
        },
        WebhookConfig {
            name: "auth".into(),
            url: refusing.url(),
            events: vec!["client.connected".into()],
            max_retries: 0,
            ..Default::default()
        },
    ];
    let r = start(c).await;
    let t0 = Instant::now();
    let down = eventually("the idle webhook to be reported down", || async {
        let s = webhook_status(&r, "idle").await;
        (s["state"] == "down").then_some(s)
    })
    .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(6), "down after {took:?}");
    let error = down["last_error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("refused"), "{down}");
    assert_eq!(down["buffered"], 0, "{down}");
    assert!(metric(&r, "corvid_webhook_up", &[r#"webhook="idle""#]).await == 0.0);

    // The endpoint comes back: the next idle check says so; the error stays, time-stamped.
    let sink = HttpServer::start_on(addr, ok_sink()).await;
    let up = eventually("the webhook to recover", || async {
        let s = webhook_status(&r, "idle").await;
        (s["state"] == "up").then_some(s)
    })
    .await;
    assert_eq!(up["last_error"].as_str(), Some(error.as_str()), "{up}");
    assert!(up["since"].as_u64() >= up["last_error_at"].as_u64(), "{up}");

    // Traffic: delivered and counted; the endpoint that answers 403 is `refused`.
    let _client = v3::connect(mqtt(&r), "hook-health", None)
        .await
        .expect("connect");
    wait_event(&sink, "client.connected", |v| {
        v["event"] == "client.connected"
    })
    .await;
    eventually("the delivery to be counted", || async {
        let s = webhook_status(&r, "idle").await;
        (s["delivered"] == 1 && s["buffered"] == 0).then_some(())
    })
    .await;
    let refused = eventually("the 403 webhook to be refused", || async {
        let s = webhook_status(&r, "auth").await;
        (s["state"] == "refused").then_some(s)
    })
    .await;
    assert_eq!(refused["last_error"], "refused: HTTP 403", "{refused}");
    assert!(metric(&r, "corvid_webhook_up", &[r#"webhook="idle""#]).await == 1.0);
}

/// `$SYS` every `interval` seconds; client events name other clients, so only an explicit
/// rule lets a subscriber read them: the one for the client `dash`.
fn sys_config(interval: u64) -> corvid_broker::Config {
    let mut c = config();
    c.sys.enabled = true;
    c.sys.interval = interval;
    c.acl.rules = vec![AclRule {
        permission: Permission::Allow,
        who: AclWho::One(AclWhoOne {
            client_id: Some("dash".into()),
            ..Default::default()
        }),
        action: AclAction::Subscribe,
        topics: vec!["$SYS/#".into()],
    }];
    c
}

#[tokio::test]
async fn sys_topics() {
    let c = sys_config(1);
    let r = start(c).await;
    let a = mqtt(&r);
    let mut dash = v5::connect(a, "dash", None).await.expect("dash");
    dash.subscribe("$SYS/#", v5::QoS::AtMostOnce).await;
    // Allowed `$SYS/#` by `no_match: allow`, but not by a rule of its own.
    let mut nosy = v5::connect(a, "nosy", None).await.expect("nosy");
    nosy.subscribe("$SYS/#", v5::QoS::AtMostOnce).await;
    nosy.subscribe("marker", v5::QoS::AtMostOnce).await;
    let mut seen = std::collections::HashMap::new();
    let want = [
        "$SYS/brokers",
        "$SYS/brokers/n1/version",
        "$SYS/brokers/n1/uptime",
        "$SYS/brokers/n1/stats/connections/count",
        "$SYS/brokers/n1/stats/sessions/count",
        "$SYS/brokers/n1/stats/subscriptions/count",
        "$SYS/brokers/n1/stats/topics/count",
        "$SYS/brokers/n1/metrics/messages/received",
        "$SYS/brokers/n1/metrics/messages/sent",
        "$SYS/brokers/n1/metrics/messages/dropped",
    ];
    while !want.iter().all(|w| seen.contains_key(*w)) {
        let (t, p) = dash.publish_in().await;
        seen.insert(t, String::from_utf8_lossy(&p).into_owned());
    }
    assert_eq!(seen["$SYS/brokers"], "n1");
    assert_eq!(seen["$SYS/brokers/n1/version"], env!("CARGO_PKG_VERSION"));
    assert!(seen["$SYS/brokers/n1/uptime"].parse::<u64>().is_ok());
    // The periodic counts catch up with the dashboard's own connection and subscription.
    let until = Instant::now() + WAIT;
    while !(seen["$SYS/brokers/n1/stats/connections/count"] == "2"
        && seen["$SYS/brokers/n1/stats/subscriptions/count"] == "3")
    {
        assert!(Instant::now() < until, "counts in $SYS: {seen:?}");
        let (t, p) = dash.publish_in().await;
        seen.insert(t, String::from_utf8_lossy(&p).into_owned());
    }

    let watched = v3::connect(a, "watched", Some(("wu", "x")))
        .await
        .expect("watched");
    let (t, p) = dash
        .next("connected", |p| match p {
            v5::Packet::Publish(p) if p.topic.ends_with(b"/connected") => {
                Some((String::from_utf8_lossy(&p.topic).into_owned(), p.payload))
            }
            _ => None,
        })
        .await;
    assert_eq!(t, "$SYS/brokers/n1/clients/watched/connected");
    let v: Value = serde_json::from_slice(&p).expect("json");
    assert_eq!(v["client_id"], "watched");
    assert_eq!(v["username"], "wu");
    assert_eq!(v["protocol"], "3.1.1");
    assert_eq!(v["keepalive"], 30);
    assert!(v["address"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    assert!(v["connected_at"].as_u64().is_some());
    watched.client.disconnect().await.expect("disconnect");
    let p = dash
        .next("disconnected", |p| match p {
            v5::Packet::Publish(p) if p.topic.ends_with(b"watched/disconnected") => Some(p.payload),
            _ => None,
        })
        .await;
    let v: Value = serde_json::from_slice(&p).expect("json");
    assert_eq!(v["reason"], "normal");
    assert!(v["disconnected_at"].as_u64().is_some());

    // The other subscriber got the statistics but none of the client events: everything
    // queued for it up to a marker published after the events, in order.
    dash.client
        .publish("marker", v5::QoS::AtMostOnce, false, "m")
        .await
        .expect("marker");
    let mut nosy_seen = Vec::new();
    loop {
        let (t, _) = nosy.publish_in().await;
        if t == "marker" {
            break;
        }
        nosy_seen.push(t);
    }
    assert!(
        nosy_seen.iter().any(|t| t.ends_with("/uptime")),
        "{nosy_seen:?}"
    );
    assert!(
        nosy_seen.iter().all(|t| !t.contains("/clients/")),
        "{nosy_seen:?}"
    );
    assert!(
        metric(
            &r,
            "corvid_messages_dropped_total",
            &[r#"reason="sys_acl_denied""#]
        )
        .await
            >= 2.0
    );

    // Nobody publishes into `$SYS`: MQTT 5 gets 0x87, the dashboard sees nothing.
    let reason = dash.publish_qos1("$SYS/brokers/n1/version", "forged").await;
    assert_eq!(reason, v5::PubAckReason::NotAuthorized);
    assert!(
        metric(
            &r,
            "corvid_messages_dropped_total",
            &[r#"reason="sys_topic""#]
        )
        .await
            >= 1.0
    );
}

/// `$SYS` as mosquitto users expect: the first round goes out as the broker starts and is
/// retained, so a subscriber arriving later (with no round due for an hour) gets the figures
/// at once; the client events are moments and are not retained.
#[tokio::test]
async fn sys_topics_retained_from_start() {
    assert_eq!(corvid_broker::config::SysConfig::default().interval, 10);
    let c = sys_config(3600);
    let r = start(c).await;
    let a = mqtt(&r);
    // A client comes and goes before the dashboard looks: its events are not kept for it.
    let early = v3::connect(a, "early", None).await.expect("early");
    early.client.disconnect().await.expect("disconnect");
    let started = Instant::now();
    let mut dash = v5::connect(a, "dash", None).await.expect("dash");
    dash.subscribe("$SYS/#", v5::QoS::AtMostOnce).await;
    let want = [
        "$SYS/brokers",
        "$SYS/brokers/n1/version",
        "$SYS/brokers/n1/uptime",
        "$SYS/brokers/n1/datetime",
        "$SYS/brokers/n1/stats/connections/count",
        "$SYS/brokers/n1/stats/retained/count",
        "$SYS/brokers/n1/metrics/messages/received",
    ];
    let mut seen = std::collections::HashMap::new();
    let deadline = Duration::from_secs(3);
    while !want.iter().all(|w| seen.contains_key(*w)) {
        let left = deadline.saturating_sub(started.elapsed());
        let p = tokio::time::timeout(
            left,
            dash.next("retained $SYS", |p| match p {
                v5::Packet::Publish(p) => Some(p),
                _ => None,
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("$SYS after {:?}, seen {:?}", started.elapsed(), seen.keys()));
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        assert!(p.retain, "{topic} delivered without the retain flag");
        assert!(
            !topic.contains("/clients/"),
            "client event retained: {topic}"
        );
        seen.insert(topic, String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(seen["$SYS/brokers"], "n1");
    assert_eq!(seen["$SYS/brokers/n1/version"], env!("CARGO_PKG_VERSION"));
    // Nothing else is held for the subscriber: no retained client event trails the round.
    if let Some(t) = dash.quiet_for(Duration::from_millis(500)).await {
        assert!(!t.contains("/clients/"), "client event retained: {t}");
    }
}

async fn api(
    r: &corvid_broker::server::Running,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("http://{}{path}", r.admin));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("admin request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn trace_client_and_topic_into_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = config();
    c.trace.dir = dir.path().to_path_buf();
    let r = start(c).await;
    let a = mqtt(&r);
    use reqwest::Method;
    let (s, v) = api(
        &r,
        Method::POST,
        "/api/v1/trace",
        Some(serde_json::json!({"type": "client", "client_id": "tc", "duration": 60})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["name"], "client-tc");
    let (s, _) = api(
        &r,
        Method::POST,
        "/api/v1/trace",
        Some(serde_json::json!({"type": "topic", "topic": "tt/#", "duration": 60})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = api(
        &r,
        Method::POST,
        "/api/v1/trace",
        Some(serde_json::json!({"type": "client", "client_id": "tc"})),
    )
    .await;
    assert_eq!(s, 409, "same name twice");

    let mut tc = v5::connect(a, "tc", None).await.expect("tc");
    tc.subscribe("tt/#", v5::QoS::AtLeastOnce).await;
    let other = v3::connect(a, "other", None).await.expect("other");
    other.send("tt/a", v3::QoS::AtLeastOnce, "traced").await;
    other.send("zz", v3::QoS::AtMostOnce, "not traced").await;
    tc.publish_in().await;
    tc.client.disconnect().await.expect("disconnect");
    eventually("trace lines", || async {
        let (_, v) = api(&r, Method::GET, "/api/v1/trace", None).await;
        let lines = v["traces"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == "client-tc")?["lines"]
            .as_u64()?;
        (lines >= 8).then_some(())
    })
    .await;
    let (s, v) = api(&r, Method::DELETE, "/api/v1/trace/client-tc", None).await;
    assert_eq!(s, 200, "{v}");
    let text = std::fs::read_to_string(dir.path().join("client-tc.log")).expect("trace file");
    let lines: Vec<&str> = text.lines().collect();
    for l in &lines {
        let ts = l.split(' ').next().unwrap_or("");
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
            "timestamp in {l:?}"
        );
        assert!(l.contains(" tc "), "{l}");
    }
    let find = |what: &str| lines.iter().any(|l| l.contains(what));
    assert!(find("IN  tc CONNECT protocol=5.0"), "{text}");
    assert!(find("OUT tc CONNACK code=Success"), "{text}");
    assert!(find("IN  tc SUBSCRIBE"), "{text}");
    assert!(find("OUT tc SUBACK"), "{text}");
    assert!(find("OUT tc PUBLISH topic=tt/a qos=1"), "{text}");
    assert!(find("IN  tc PUBACK"), "{text}");
    assert!(find("IN  tc DISCONNECT"), "{text}");
    assert!(!find("zz"), "{text}");

    // The topic trace saw the message from `other` in and towards `tc` out, nothing else.
    let text = std::fs::read_to_string(dir.path().join("topic-tt__.log")).expect("topic trace");
    assert!(text.contains("IN  other PUBLISH topic=tt/a"), "{text}");
    assert!(text.contains("OUT tc PUBLISH topic=tt/a"), "{text}");
    assert!(!text.contains("zz"), "{text}");

    // Traces stop by themselves.
    let (s, _) = api(
        &r,
        Method::POST,
        "/api/v1/trace",
        Some(serde_json::json!({"type": "client", "client_id": "short", "duration": 1})),
    )
    .await;
    assert_eq!(s, 201);
    eventually("trace expiry", || async {
        let (_, v) = api(&r, Method::GET, "/api/v1/trace", None).await;
        (!v["traces"]
            .as_array()?
            .iter()
            .any(|t| t["name"] == "client-short"))
        .then_some(())
    })
    .await;
    assert_eq!(metric(&r, "corvid_traces_started_total", &[]).await, 3.0);
}

fn ctl(
    r: &corvid_broker::server::Running,
    token: &std::path::Path,
    args: &[&str],
) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corvid-broker"))
        .arg("ctl")
        .arg("--admin")
        .arg(format!("http://{}", r.admin))
        .arg("--token-file")
        .arg(token)
        .args(args)
        .output()
        .expect("run ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_and_ctl() {
    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let mut c = config();
    c.admin.token_file = Some(token.clone());
    c.trace.dir = dir.path().join("traces");
    let r = start(c).await;
    let a = mqtt(&r);
    let mut c1 = v5::connect(a, "ctl-one", Some(("ann", "x")))
        .await
        .expect("c1");
    c1.subscribe("ctl/#", v5::QoS::AtLeastOnce).await;
    let _c2 = v3::connect(a, "ctl-two", None).await.expect("c2");

    // Without the token: refused.
    let (s, _) = api(&r, reqwest::Method::GET, "/api/v1/clients", None).await;
    assert_eq!(s, 401);
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong").expect("bad token");
    let (ok, _, err) = ctl(&r, &bad, &["status"]);
    assert!(!ok);
    assert!(err.contains("401"), "{err}");

    let run = |args: &[&str]| {
        let (ok, out, err) = ctl(&r, &token, args);
        assert!(ok, "ctl {args:?} failed: {err}");
        out
    };
    let out = tokio::task::block_in_place(|| run(&["status"]));
    assert!(out.contains("node n1"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("connections") && l.ends_with(" 2")),
        "{out}"
    );
    let out = tokio::task::block_in_place(|| run(&["clients"]));
    assert!(out.starts_with("CLIENT_ID"), "{out}");
    assert!(out.contains("ctl-one") && out.contains("ctl-two"), "{out}");
    let out = tokio::task::block_in_place(|| run(&["clients", "--username", "ann"]));
    assert!(out.contains("ctl-one") && !out.contains("ctl-two"), "{out}");
    let out = tokio::task::block_in_place(|| run(&["--json", "clients", "--like", "two"]));
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["count"], 1);
    assert_eq!(v["clients"][0]["client_id"], "ctl-two");
    let out = tokio::task::block_in_place(|| run(&["client", "ctl-one"]));
    assert!(out.contains("ctl/# (qos 1)"), "{out}");
    assert!(out.contains("5.0"), "{out}");
    let out = tokio::task::block_in_place(|| run(&["subscriptions"]));
    assert!(
        out.lines()
            .any(|l| l.starts_with("ctl-one") && l.contains("ctl/#")),
        "{out}"
    );
    let out = tokio::task::block_in_place(|| run(&["routes"]));
    assert!(
        out.lines()
            .any(|l| l.starts_with("ctl/#") && l.contains("n1")),
        "{out}"
    );

    let out = tokio::task::block_in_place(|| {
        run(&["trace", "start", "client", "ctl-one", "--duration", "30"])
    });
    assert!(out.contains("trace client-ctl-one started"), "{out}");
    let out = tokio::task::block_in_place(|| run(&["trace", "list"]));
    assert!(
        out.contains("client-ctl-one") && out.contains("client"),
        "{out}"
    );
    c1.send("ctl/x", v5::QoS::AtMostOnce, "p").await;
    c1.publish_in().await;
    let out = tokio::task::block_in_place(|| run(&["trace", "show", "client-ctl-one"]));
    assert!(out.contains("PUBLISH topic=ctl/x"), "{out}");
    let out = tokio::task::block_in_place(|| run(&["--json", "trace", "stop", "client-ctl-one"]));
    let v: Value = serde_json::from_str(&out).expect("json");
    assert!(v["lines"].as_u64().is_some_and(|n| n >= 2), "{v}");
    let out = tokio::task::block_in_place(|| run(&["trace", "list"]));
    assert!(out.contains("(none)"), "{out}");

    let out = tokio::task::block_in_place(|| run(&["kick", "ctl-one"]));
    assert_eq!(out.trim(), "kicked ctl-one");
    let reason = c1.disconnect_reason().await;
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction
    );
    let (ok, _, err) = tokio::task::block_in_place(|| ctl(&r, &token, &["kick", "nobody"]));
    assert!(!ok && err.contains("404"), "{err}");
}

/// Every `/api/v1` answer of a real single node — lists with entries, a bridge and an event
/// store sink that cannot connect, a trace, the error bodies — reads into its `corvid-api` type
/// exactly (see `typed_api::strict`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_answer_reads_into_its_corvid_api_type() {
    use corvid_api::*;
    use corvid_broker::config::{
        MqttBridgeConfig, MqttEgressRule, MqttRemoteConfig, RedisStoreConfig,
    };
    use reqwest::Method;
    use typed_api::strict;

    let dir = tempfile::tempdir().expect("tmp");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a port nobody listens on");
    let mut c = config();
    c.node.uid = Some("uid-now".into());
    c.trace.dir = dir.path().join("traces");
    c.bridges.mqtt = vec![MqttBridgeConfig {
        name: "nowhere".into(),
        remote: MqttRemoteConfig {
            host: "127.0.0.1".into(),
            port: closed,
            ..Default::default()
        },
        egress: vec![MqttEgressRule {
            local_filter: "typed/#".into(),
            ..Default::default()
        }],
        ..Default::default()
    }];
    c.event_store.redis = Some(RedisStoreConfig {
        url: format!("redis://127.0.0.1:{closed}/0"),
        ..Default::default()
    });
    c.webhooks = vec![WebhookConfig {
        name: "nowhere".into(),
        url: format!("http://127.0.0.1:{closed}/hook"),
        events: vec!["client.connected".into()],
        ..Default::default()
    }];
    let r = start(c).await;
    let a = mqtt(&r);
    let mut one = v5::connect(a, "typed-one", Some(("ann", "x")))
        .await
        .expect("typed-one");
    one.subscribe("typed/#", v5::QoS::AtLeastOnce).await;
    let _two = v3::connect(a, "typed-two", None).await.expect("typed-two");
    let get = |path: &'static str| {
        let r = &r;
        async move {
            let (status, v) = api(r, Method::GET, path, None).await;
            assert_eq!(status, 200, "GET {path}: {v}");
            v
        }
    };

    let stats: Stats = strict("stats", &get("/api/v1/stats").await);
    assert_eq!((stats.node.as_str(), stats.connections), ("n1", 2));
    let list: ClientList = strict("clients", &get("/api/v1/clients").await);
    assert_eq!(list.count, 2);
    let conn = list.clients[0]
        .connection
        .as_ref()
        .expect("typed-one online");
    assert_eq!(
        (conn.protocol, conn.username.as_deref()),
        (ProtocolVersion::V5, Some("ann"))
    );
    assert_eq!(
        list.clients[1].connection.as_ref().map(|c| c.protocol),
        Some(ProtocolVersion::V311)
    );
    let offline: ClientList = strict(
        "offline clients",
        &get("/api/v1/clients?connected=false").await,
    );
    assert_eq!(offline.count, 0);
    let detail: ClientDetail = strict("client", &get("/api/v1/clients/typed-one").await);
    assert_eq!(detail.subscription_list[0].filter, "typed/#");
    let subs: SubscriptionList = strict("subscriptions", &get("/api/v1/subscriptions").await);
    assert_eq!(subs.subscriptions[0].qos, 1);
    let routes: RouteList = strict("routes", &get("/api/v1/routes").await);
    assert_eq!(routes.routes[0].filter, "typed/#");
    let view: ClusterView = strict("cluster", &get("/api/v1/cluster").await);
    assert_eq!(view.members[0].state, MemberState::Itself);
    assert!(view.joined("n1"));
    let evac: EvacuationStatus = strict("evacuation", &get("/api/v1/evacuate").await);
    assert_eq!(evac.state, EvacuationState::Idle);
    let reb: RebalanceStatus = strict("rebalance", &get("/api/v1/rebalance").await);
    assert_eq!((reb.state, reb.balance), (RebalanceState::Idle, None));
    let bridges: BridgeList = eventually("the bridge to a closed port to be down", || async {
        let b: BridgeList = strict("bridges", &get("/api/v1/bridges").await);
        (b.bridges[0].state == BridgeState::Down).then_some(b)
    })
    .await;
    assert!(bridges.bridges[0].last_error.is_some());
    let store: EventStoreStatus = eventually("the sink of a closed port to be down", || async {
        let s: EventStoreStatus = strict("eventstore", &get("/api/v1/eventstore").await);
        (s.sinks[0].state == SinkState::Down).then_some(s)
    })
    .await;
    assert!(store.enabled);
    let hooks: WebhookList = eventually("the webhook of a closed port to be down", || async {
        let w: WebhookList = strict("webhooks", &get("/api/v1/webhooks").await);
        (w.webhooks[0].state == WebhookState::Down).then_some(w)
    })
    .await;
    assert!(hooks.webhooks[0].last_error.is_some());

    let start = TraceRequest {
        kind: TraceKind::Client,
        client_id: Some("typed-one".into()),
        topic: None,
        duration: None,
        name: None,
    };
    let body = serde_json::to_value(&start).expect("request");
    let (status, v) = api(&r, Method::POST, "/api/v1/trace", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    let info: TraceInfo = strict("trace start", &v);
    assert_eq!(info.target.kind, TraceKind::Client);
    let traces: TraceList = strict("traces", &get("/api/v1/trace").await);
    assert_eq!(traces.count, 1);
    let (status, v) = api(
        &r,
        Method::DELETE,
        &format!("/api/v1/trace/{}", info.name),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    strict::<TraceInfo>("trace stop", &v);

    // Error answers, each with its status.
    let bad_trace = serde_json::json!({"type": "queue"});
    for (method, path, body, want) in [
        (Method::POST, "/api/v1/trace", Some(bad_trace), 400),
        (Method::GET, "/api/v1/clients/nobody", None, 404),
        (Method::POST, "/api/v1/rebalance", None, 409),
        (
            Method::POST,
            "/api/v1/evacuate?server_reference=evil.example:1883",
            None,
            400,
        ),
        // Meant for an instance of the pod that was replaced: the new one stays.
        (
            Method::POST,
            "/api/v1/evacuate?pod_uid=uid-before",
            None,
            409,
        ),
    ] {
        let (status, v) = api(&r, method, path, body).await;
        assert_eq!(status, want, "{path}: {v}");
        strict::<ErrorBody>(path, &v);
    }
    // Hostile UIDs (16 KiB, NUL and percent-escapes, a prefix of the real one) are only ever
    // compared: each is refused, nothing is evacuated, MQTT keeps serving.
    let long = format!("/api/v1/evacuate?pod_uid={}", "u".repeat(16 * 1024));
    for path in [
        long.as_str(),
        "/api/v1/evacuate?pod_uid=%00uid-now%25%26",
        "/api/v1/evacuate?pod_uid=uid-no",
    ] {
        let (status, v) = api(&r, Method::POST, path, None).await;
        assert_eq!(status, 409, "{v}");
        strict::<ErrorBody>("hostile pod_uid", &v);
    }
    // Given twice: the query does not parse (400), whichever comes first.
    let (status, _) = api(
        &r,
        Method::POST,
        "/api/v1/evacuate?pod_uid=uid-now&pod_uid=x",
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_mqtt_served(&r, "evacuate-bystander").await;

    let (status, v) = api(&r, Method::DELETE, "/api/v1/clients/typed-two", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(strict::<Kicked>("kick", &v).kicked, "typed-two");
    let evac: EvacuationStatus = strict("evacuation", &get("/api/v1/evacuate").await);
    assert_eq!(
        evac.state,
        EvacuationState::Idle,
        "the refused request did nothing"
    );
    let (status, v) = api(&r, Method::POST, "/api/v1/evacuate?pod_uid=uid-now", None).await;
    assert_eq!(status, 202, "{v}");
    let evac: EvacuationStatus = strict("evacuate", &v);
    assert_eq!(
        evac.state,
        EvacuationState::Done,
        "a single node only stops accepting"
    );
}

#[test]
fn passwd_prints_a_users_file_line() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_corvid-broker"))
        .args(["passwd", "ann"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"pa:ss word\n")
        .expect("write");
    let out = child.wait_with_output().expect("passwd output");
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (user, hash) = line.split_once(':').expect("user:hash");
    assert_eq!(user, "ann");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(corvid_broker::auth::users::verify_hash(hash, b"pa:ss word"));
}
