//! Flow control and server-made subscriptions over real sockets: message and byte rates
//! measured (throttled clients slowed, `disconnect` clients closed with 0x96), max
//! subscriptions and max connections refused and counted, auto-subscriptions with
//! placeholders.

use crate::access_support;

use std::time::{Duration, Instant};

use access_support::*;
use corvid_broker::config::{AutoSubscription, OverRate};
use tokio::io::AsyncReadExt;

/// Publishes `n` QoS 0 messages of `size` bytes as fast as the client can and returns how long
/// the subscriber took to receive all of them (none may be lost).
async fn push_and_measure(r: &corvid_broker::server::Running, n: usize, size: usize) -> Duration {
    let a = mqtt(r);
    let mut sub = v3::connect(a, "sub", None).await.expect("sub");
    sub.subscribe("rate/#", v3::QoS::AtMostOnce).await;
    let publisher = v3::connect(a, "pub", None).await.expect("pub");
    let t0 = Instant::now();
    for _ in 0..n {
        publisher
            .client
            .publish(
                "rate/t",
                v3::QoS::AtMostOnce,
                false,
                vec![b'x'; size.max(1)],
            )
            .await
            .expect("publish");
    }
    for i in 0..n {
        let (t, _) = sub.publish_in().await;
        assert_eq!(t, "rate/t", "message {i}");
    }
    t0.elapsed()
}

#[tokio::test]
async fn message_rate_throttles_to_the_configured_rate() {
    let mut c = config();
    c.limits.message_rate = Some("20,5".into());
    let r = start(c).await;
    // 45 messages: 5 from the burst, 40 at 20/s = at least 2 s.
    let took = push_and_measure(&r, 45, 10).await;
    assert!(took >= Duration::from_millis(1800), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert!(metric(&r, "corvid_throttled_total", &[r#"limit="message_rate""#]).await >= 1.0);
}

#[tokio::test]
async fn unlimited_by_default() {
    let r = start(config()).await;
    let took = push_and_measure(&r, 45, 10).await;
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(metric(&r, "corvid_throttled_total", &[]).await, 0.0);
}

#[tokio::test]
async fn byte_rate_throttles() {
    let mut c = config();
    c.limits.byte_rate = Some("10000,2000".into());
    let r = start(c).await;
    // ~30 kB at 10 kB/s after a 2 kB burst: at least ~2.8 s.
    let took = push_and_measure(&r, 30, 1000).await;
    assert!(took >= Duration::from_millis(2300), "{took:?}");
    assert!(metric(&r, "corvid_throttled_total", &[r#"limit="byte_rate""#]).await >= 1.0);
}

#[tokio::test]
async fn over_rate_disconnect_sends_0x96() {
    let mut c = config();
    c.limits.message_rate = Some("5,5".into());
    c.limits.over_rate = OverRate::Disconnect;
    let r = start(c).await;
    let mut c5 = v5::connect(mqtt(&r), "fast", None).await.expect("v5");
    for _ in 0..20 {
        if c5
            .client
            .publish("rate/t", v5::QoS::AtMostOnce, false, "x")
            .await
            .is_err()
        {
            break;
        }
    }
    let reason = c5.disconnect_reason().await;
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::MessageRateTooHigh
    );
    eventually("rate disconnect counted", || async {
        (metric(&r, "corvid_rate_limit_disconnects_total", &[]).await == 1.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn max_subscriptions_refused_and_counted() {
    let mut c = config();
    c.limits.max_subscriptions = 2;
    let r = start(c).await;
    let a = mqtt(&r);
    let mut c5 = v5::connect(a, "s5", None).await.expect("v5");
    c5.subscribe("a", v5::QoS::AtMostOnce).await;
    c5.subscribe("b", v5::QoS::AtMostOnce).await;
    assert_eq!(
        c5.subscribe("c", v5::QoS::AtMostOnce).await,
        vec![v5::SubscribeReasonCode::QuotaExceeded]
    );
    let mut c3 = v3::connect(a, "s3", None).await.expect("v3");
    c3.subscribe("a", v3::QoS::AtMostOnce).await;
    c3.subscribe("b", v3::QoS::AtMostOnce).await;
    assert_eq!(
        c3.subscribe("c", v3::QoS::AtMostOnce).await,
        vec![v3::SubscribeReasonCode::Failure]
    );
    assert_eq!(
        metric(&r, "corvid_subscriptions_refused_total", &[]).await,
        2.0
    );
}

#[tokio::test]
async fn max_connections_refused_and_counted() {
    let mut c = config();
    c.limits.max_connections = 2;
    let r = start(c).await;
    let a = mqtt(&r);
    let _c1 = v3::connect(a, "c1", None).await.expect("c1");
    let _c2 = v5::connect(a, "c2", None).await.expect("c2");
    let mut s = tokio::net::TcpStream::connect(a).await.expect("tcp");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed unanswered");
    assert_eq!(
        metric(
            &r,
            "corvid_connections_refused_total",
            &[r#"reason="max_connections""#]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn auto_subscriptions_with_placeholders() {
    let mut c = config();
    c.auto_subscriptions = vec![
        AutoSubscription {
            topic: "devices/%c/cmd".into(),
            qos: 1,
        },
        AutoSubscription {
            topic: "users/%u/inbox".into(),
            qos: 0,
        },
    ];
    let r = start(c).await;
    let a = mqtt(&r);
    let mut dev = v5::connect(a, "dev1", Some(("ann", "x")))
        .await
        .expect("dev1");
    let mut anon = v3::connect(a, "dev2", None).await.expect("dev2");
    let sender = v3::connect(a, "sender", None).await.expect("sender");
    for t in ["devices/dev1/cmd", "users/ann/inbox", "devices/dev2/cmd"] {
        sender
            .client
            .publish(t, v3::QoS::AtLeastOnce, false, t)
            .await
            .expect("publish");
    }
    let mut got = vec![dev.publish_in().await.0, dev.publish_in().await.0];
    got.sort();
    assert_eq!(got, vec!["devices/dev1/cmd", "users/ann/inbox"]);
    assert_eq!(anon.publish_in().await.0, "devices/dev2/cmd");
    // No user name: the %u subscription is skipped.
    let s = r.broker.sessions.get("dev2").expect("session");
    let subs: Vec<String> = s.state.lock().subscription_filters();
    assert_eq!(subs, vec!["devices/dev2/cmd".to_string()]);
    let d = r.broker.sessions.get("dev1").expect("session");
    let qos = d
        .state
        .lock()
        .subscriptions
        .get("devices/dev1/cmd")
        .map(|s| s.opts.qos.value());
    assert_eq!(qos, Some(1));
    // dev1: 2, dev2 and sender: 1 each.
    assert_eq!(
        metric(&r, "corvid_auto_subscriptions_total", &[]).await,
        4.0
    );
}
