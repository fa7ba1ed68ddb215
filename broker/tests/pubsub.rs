//! Publish/subscribe through a real broker with real clients (rumqttc v3 and v5, and the raw
//! client where a test must see exactly what is on the wire): QoS, overlaps, retained, wills,
//! persistent sessions, session expiry, flow control, topic aliases and shared subscriptions.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{pkt, v3, v5, wait_until, Raw, V};
use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, PublishProperties};

type Q3 = rumqttc::QoS;
type Q5 = rumqttc::v5::mqttbytes::QoS;

#[tokio::test]
async fn qos_round_trips_v3() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = v3::client(addr, "rt3-sub").await;
    let mut publ = v3::client(addr, "rt3-pub").await;
    for qos in [Q3::AtMostOnce, Q3::AtLeastOnce, Q3::ExactlyOnce] {
        let topic = format!("rt3/{qos:?}");
        assert_eq!(sub.subscribe(&topic, qos).await, qos);
        publ.publish(&topic, qos, false, "hello").await;
        assert_eq!(sub.publishes(1).await, [(topic, "hello".into(), qos)]);
    }
    common::stop(b).await;
}

#[tokio::test]
async fn qos_round_trips_v5() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = v5::client(addr, "rt5-sub").await;
    let mut publ = v5::client(addr, "rt5-pub").await;
    for qos in [Q5::AtMostOnce, Q5::AtLeastOnce, Q5::ExactlyOnce] {
        let topic = format!("rt5/{qos:?}");
        assert_eq!(sub.subscribe(&topic, qos).await, qos);
        publ.publish(&topic, qos, false, "hello").await;
        assert_eq!(sub.publishes(1).await, [(topic, "hello".into(), qos)]);
    }
    common::stop(b).await;
}

/// Several matching filters: one copy, at the highest QoS granted [MQTT-3.3.4-2]. A marker
/// published afterwards on the same session must come next, so no second copy is queued.
#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_max_qos() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut s3 = v3::client(addr, "ov-sub3").await;
    let mut s5 = v5::client(addr, "ov-sub5").await;
    for (f, q) in [("ov/+/c", 0u8), ("ov/#", 2), ("ov/b/c", 1)] {
        let q3 = rumqttc::qos(q).expect("qos");
        let q5 = rumqttc::v5::mqttbytes::qos(q).expect("qos");
        assert_eq!(s3.subscribe(f, q3).await, q3);
        assert_eq!(s5.subscribe(f, q5).await, q5);
    }
    let mut publ = v5::client(addr, "ov-pub").await;
    publ.publish("ov/b/c", Q5::ExactlyOnce, false, "once").await;
    publ.publish("ov/end", Q5::AtLeastOnce, false, "marker")
        .await;
    assert_eq!(
        s3.publishes(2).await,
        [
            ("ov/b/c".into(), "once".into(), Q3::ExactlyOnce),
            ("ov/end".into(), "marker".into(), Q3::AtLeastOnce)
        ]
    );
    assert_eq!(
        s5.publishes(2).await,
        [
            ("ov/b/c".into(), "once".into(), Q5::ExactlyOnce),
            ("ov/end".into(), "marker".into(), Q5::AtLeastOnce)
        ]
    );
    common::stop(b).await;
}

#[tokio::test]
async fn retained_message_is_sent_to_new_subscribers_until_cleared() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut publ = v3::client(addr, "ret-pub").await;
    publ.publish("ret/a", Q3::AtLeastOnce, true, "kept").await;

    let mut s3 = v3::client(addr, "ret-sub3").await;
    s3.subscribe("ret/#", Q3::AtLeastOnce).await;
    let p = s3.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("ret/a", &b"kept"[..], true)
    );

    let mut s5 = v5::client(addr, "ret-sub5").await;
    s5.subscribe("ret/+", Q5::AtLeastOnce).await;
    let p = s5.next_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.retain),
        (&b"ret/a"[..], &b"kept"[..], true)
    );

    // An empty retained payload clears it [MQTT-3.3.1-6]; live subscribers still get it.
    publ.publish("ret/a", Q3::AtLeastOnce, true, "").await;
    let live = s3.next_publish().await;
    // Live delivery to an existing subscription clears the flag [MQTT-3.3.1-9].
    assert_eq!((live.payload.len(), live.retain), (0, false));
    let mut late = v5::client(addr, "ret-late").await;
    late.subscribe("ret/#", Q5::AtLeastOnce).await;
    publ.publish("ret/marker", Q3::AtLeastOnce, false, "marker")
        .await;
    let p = late.next_publish().await;
    assert_eq!((&p.topic[..], p.retain), (&b"ret/marker"[..], false));
    common::stop(b).await;
}

/// 3.1.1 will: published when the connection is lost, not after a clean DISCONNECT.
#[tokio::test]
async fn will_on_lost_connection_not_on_disconnect_v3() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut watcher = v3::client(addr, "will3-watch").await;
    watcher.subscribe("will3/#", Q3::AtLeastOnce).await;

    let mut o = v3::options(addr, "will3-polite");
    o.set_last_will(rumqttc::LastWill::new(
        "will3/polite",
        "gone",
        Q3::AtLeastOnce,
        false,
    ));
    v3::connect(o).await.0.disconnect().await;

    let mut o = v3::options(addr, "will3-lost");
    o.set_last_will(rumqttc::LastWill::new(
        "will3/lost",
        "gone",
        Q3::AtLeastOnce,
        false,
    ));
    v3::connect(o).await.0.kill().await;

    let p = watcher.next_publish().await;
    assert_eq!(
        p.topic, "will3/lost",
        "the polite client's will must not be sent"
    );
    common::stop(b).await;
}

fn will_with_delay(topic: &str, delay: u32) -> LastWill {
    let props = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    LastWill::new(topic, "gone", Q5::AtLeastOnce, false, Some(props))
}

/// MQTT 5 will delay [MQTT-3.1.3-9]: the will waits for its delay, and a reconnect within the
/// delay cancels it — so after lose, reconnect, lose again, exactly one will arrives.
#[tokio::test]
async fn will_delay_v5() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut watcher = v5::client(addr, "will5-watch").await;
    watcher.subscribe("will5/#", Q5::AtLeastOnce).await;

    let opts = |clean| {
        let mut o = v5::options(addr, "will5-client");
        o.set_last_will(will_with_delay("will5/gone", 2));
        o.set_session_expiry_interval(Some(60));
        o.set_clean_start(clean);
        o
    };
    v5::connect(opts(true)).await.0.kill().await;
    let (again, ack) = v5::connect(opts(false)).await;
    assert!(ack.session_present);
    again.kill().await;
    let lost = Instant::now();

    let p = watcher.next_publish().await;
    assert_eq!(&p.topic[..], b"will5/gone");
    let waited = lost.elapsed();
    assert!(
        waited.as_millis() >= 1900,
        "will sent after {waited:?}, delay is 2 s"
    );
    let mut publ = v5::client(addr, "will5-pub").await;
    publ.publish("will5/marker", Q5::AtLeastOnce, false, "marker")
        .await;
    let p = watcher.next_publish().await;
    assert_eq!(
        &p.topic[..],
        b"will5/marker",
        "the cancelled will was sent too"
    );
    common::stop(b).await;
}

/// The will delay never outlasts the session: with a 30 s delay and a 1 s session expiry the
/// will is published when the session ends [MQTT-3.1.3-9].
#[tokio::test]
async fn will_delay_is_capped_by_session_expiry() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut watcher = v3::client(addr, "willcap-watch").await;
    watcher.subscribe("willcap/#", Q3::AtLeastOnce).await;
    let mut o = v5::options(addr, "willcap-client");
    o.set_last_will(will_with_delay("willcap/gone", 30));
    o.set_session_expiry_interval(Some(1));
    v5::connect(o).await.0.kill().await;
    let lost = Instant::now();
    assert_eq!(watcher.next_publish().await.topic, "willcap/gone");
    let waited = lost.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "will waited {waited:?}, session expiry is 1 s"
    );
    common::stop(b).await;
}

/// A second connection with the same client id takes the session over: the first gets
/// DISCONNECT 0x8E [MQTT-3.1.4-3] and the second resumes the session, subscriptions and all
/// [MQTT-3.2.2-3].
#[tokio::test]
async fn session_takeover() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut old = Raw::tcp(addr, V::V5).await;
    // Session Expiry Interval (0x11) 60 s.
    let props = [0x11, 0, 0, 0, 60];
    old.send(&pkt::connect_with(V::V5, b"takeover", &props))
        .await;
    assert_eq!(old.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(old.subscribe(1, "takeover/t", 1).await, 1);

    let mut o = v5::options(addr, "takeover");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    let (mut new, ack) = v5::connect(o).await;
    assert!(ack.session_present);
    old.expect_disconnect(0x8E).await;
    let mut publ = v5::client(addr, "takeover-pub").await;
    publ.publish("takeover/t", Q5::AtLeastOnce, false, "kept")
        .await;
    assert_eq!(&new.next_publish().await.payload[..], b"kept");
    common::stop(b).await;
}

/// Messages published while a persistent subscriber is away are queued and delivered, all of
/// them and in order, when it comes back (session state, section 4.1; order [MQTT-4.6.0-6]).
#[tokio::test]
async fn offline_queue_survives_reconnect_v3() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let opts = || {
        let mut o = v3::options(addr, "off3-sub");
        o.set_clean_session(false);
        o
    };
    let (mut sub, ack) = v3::connect(opts()).await;
    assert!(!ack.session_present);
    sub.subscribe("off3/#", Q3::ExactlyOnce).await;
    sub.disconnect().await;

    let mut publ = v3::client(addr, "off3-pub").await;
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for (i, m) in sent.iter().enumerate() {
        let qos = if i % 2 == 0 {
            Q3::AtLeastOnce
        } else {
            Q3::ExactlyOnce
        };
        publ.publish("off3/t", qos, false, m).await;
    }

    let (mut sub, ack) = v3::connect(opts()).await;
    assert!(ack.session_present);
    let got = payloads(sub.publishes(20).await);
    assert_eq!(got, sent);
    publ.publish("off3/t", Q3::AtLeastOnce, false, "marker")
        .await;
    assert_eq!(
        sub.next_publish().await.payload,
        "marker",
        "more than 20 were queued"
    );
    common::stop(b).await;
}

#[tokio::test]
async fn offline_queue_survives_reconnect_v5() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let opts = |clean| {
        let mut o = v5::options(addr, "off5-sub");
        o.set_clean_start(clean);
        o.set_session_expiry_interval(Some(300));
        o
    };
    let (mut sub, ack) = v5::connect(opts(true)).await;
    assert!(!ack.session_present);
    sub.subscribe("off5/#", Q5::ExactlyOnce).await;
    sub.disconnect().await;

    let mut publ = v5::client(addr, "off5-pub").await;
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for (i, m) in sent.iter().enumerate() {
        let qos = if i % 2 == 0 {
            Q5::AtLeastOnce
        } else {
            Q5::ExactlyOnce
        };
        publ.publish("off5/t", qos, false, m).await;
    }

    let (mut sub, ack) = v5::connect(opts(false)).await;
    assert!(ack.session_present);
    let got = payloads(sub.publishes(20).await);
    assert_eq!(got, sent);
    publ.publish("off5/t", Q5::AtLeastOnce, false, "marker")
        .await;
    assert_eq!(
        &sub.next_publish().await.payload[..],
        b"marker",
        "more than 20 were queued"
    );
    common::stop(b).await;
}

/// Message Expiry Interval: a message that expires while queued for an offline session, or
/// while retained, is not delivered [MQTT-3.3.2-5]; one still valid is delivered with the
/// interval reduced by its time in the broker [MQTT-3.3.2-6].
#[tokio::test]
async fn message_expiry() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = persistent_raw(addr, "mexp-sub", true).await;
    assert_eq!(sub.subscribe(1, "mexp/#", 1).await, 1);
    sub.send(&pkt::disconnect()).await;
    assert!(sub.closed().await.is_empty());

    let mut publ = v5::client(addr, "mexp-pub").await;
    let expiry = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    let published = Instant::now();
    publ.publish_with(
        "mexp/retained",
        Q5::AtLeastOnce,
        true,
        "short",
        Some(expiry(1)),
    )
    .await;
    publ.publish_with("mexp/q", Q5::AtLeastOnce, false, "short", Some(expiry(1)))
        .await;
    publ.publish_with("mexp/q", Q5::AtLeastOnce, false, "long", Some(expiry(600)))
        .await;
    // The scenario is time passing: wait until the 1 s messages are certainly expired.
    wait_until("1.5 s to pass", || {
        published.elapsed() > Duration::from_millis(1500)
    })
    .await;

    let mut sub = persistent_raw(addr, "mexp-sub", false).await;
    let p = sub.expect(pkt::PUBLISH).await;
    let (topic, _, payload) = p.publish(V::V5);
    assert_eq!((topic.as_str(), &payload[..]), ("mexp/q", &b"long"[..]));
    let at = 2 + 2 + usize::from(u16::from_be_bytes([p.body[0], p.body[1]]));
    let props = &p.body[at + 1..at + 1 + usize::from(p.body[at])];
    assert_eq!(
        props[0], 0x02,
        "Message Expiry Interval first: {props:02X?}"
    );
    let left = u32::from_be_bytes([props[1], props[2], props[3], props[4]]);
    assert!((590..600).contains(&left), "expiry forwarded as {left}");

    let mut late = Raw::connect(addr, V::V5, "mexp-late").await;
    assert_eq!(late.subscribe(1, "mexp/#", 1).await, 1);
    publ.publish("mexp/marker", Q5::AtLeastOnce, false, "marker")
        .await;
    let (topic, _, _) = late.expect(pkt::PUBLISH).await.publish(V::V5);
    assert_eq!(
        topic, "mexp/marker",
        "the expired retained message was sent"
    );
    common::stop(b).await;
}

/// DISCONNECT can shorten the session expiry to 0, ending the session at once
/// (section 3.14.2.2.2).
#[tokio::test]
async fn disconnect_can_end_the_session() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut c = persistent_raw(addr, "dexp", true).await;
    // DISCONNECT, reason 0, Session Expiry Interval (0x11) = 0.
    c.send(&[0xE0, 7, 0, 5, 0x11, 0, 0, 0, 0]).await;
    assert!(c.closed().await.is_empty());
    wait_until("the session to end", || {
        b.broker.sessions.get("dexp").is_none()
    })
    .await;
    let mut again = Raw::tcp(addr, V::V5).await;
    let mut resume = pkt::connect(V::V5, "dexp");
    resume[9] &= !0x02; // clean start off: resume if there were a session
    again.send(&resume).await;
    assert_eq!(
        again.expect(pkt::CONNACK).await.body[..2],
        [0, 0],
        "no session present"
    );
    common::stop(b).await;
}

/// A session with a 2 s expiry is gone 2 s after its connection closes [MQTT-3.1.2-23]:
/// the broker forgets it, and reconnecting finds no session and no queued messages.
#[tokio::test]
async fn session_expires_after_its_interval() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let opts = |clean| {
        let mut o = v5::options(addr, "exp-sub");
        o.set_clean_start(clean);
        o.set_session_expiry_interval(Some(2));
        o
    };
    let (mut sub, _) = v5::connect(opts(true)).await;
    sub.subscribe("exp/#", Q5::AtLeastOnce).await;
    sub.disconnect().await;
    let closed = Instant::now();
    assert!(
        b.broker.sessions.get("exp-sub").is_some(),
        "session kept while within expiry"
    );

    wait_until("the session to expire", || {
        b.broker.sessions.get("exp-sub").is_none()
    })
    .await;
    assert!(
        closed.elapsed().as_millis() >= 900,
        "expired after {:?}",
        closed.elapsed()
    );
    let mut publ = v5::client(addr, "exp-pub").await;
    publ.publish("exp/t", Q5::AtLeastOnce, false, "lost").await;

    let (mut sub, ack) = v5::connect(opts(false)).await;
    assert!(!ack.session_present);
    sub.subscribe("exp/#", Q5::AtLeastOnce).await;
    publ.publish("exp/t", Q5::AtLeastOnce, false, "marker")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"marker");
    common::stop(b).await;
}

/// The broker never has more unacknowledged QoS 1 messages towards a client than the client's
/// Receive Maximum [MQTT-3.3.4-9]; acknowledging one lets the next through.
#[tokio::test]
async fn client_receive_maximum_is_honoured() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = Raw::tcp(addr, V::V5).await;
    // Property 0x21 Receive Maximum = 3.
    sub.send(&pkt::connect_with(V::V5, b"rm-sub", &[0x21, 0, 3]))
        .await;
    assert_eq!(sub.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(sub.subscribe(1, "rm/t", 1).await, 1);

    let mut publ = v5::client(addr, "rm-pub").await;
    for i in 0..10 {
        publ.publish("rm/t", Q5::AtLeastOnce, false, &format!("m{i}"))
            .await;
    }
    let session = b.broker.sessions.get("rm-sub").expect("session");
    wait_until("all 10 messages in the session", || {
        let st = session.state.lock();
        st.queue.len() + st.inflight.len() == 10
    })
    .await;

    // PINGRESP is written after anything the broker would send now, so it bounds the count.
    sub.send(&pkt::pingreq()).await;
    let mut inflight = Vec::new();
    loop {
        let p = sub.recv().await.expect("connected");
        match p.kind() {
            pkt::PUBLISH => inflight.push(p.publish(V::V5)),
            pkt::PINGRESP => break,
            _ => panic!("unexpected {p:?}"),
        }
    }
    assert_eq!(
        inflight.len(),
        3,
        "sent beyond receive maximum: {inflight:?}"
    );

    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut unacked: std::collections::VecDeque<_> = inflight.into();
    while got.len() < 10 {
        let (_, id, payload) = unacked.pop_front().expect("a message in flight");
        got.push(payload);
        sub.send(&pkt::puback(id.expect("QoS 1"))).await;
        if got.len() + unacked.len() < 10 {
            let next = sub.expect(pkt::PUBLISH).await;
            unacked.push_back(next.publish(V::V5));
        }
        assert!(unacked.len() <= 3);
    }
    let want: Vec<Vec<u8>> = (0..10).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(got, want);
    common::stop(b).await;
}

/// The broker's own Receive Maximum: one QoS 2 PUBLISH more than it allows unreleased ends the
/// connection with DISCONNECT 0x93 (section 3.2.2.3.3), and nobody else notices.
#[tokio::test]
async fn broker_receive_maximum_is_enforced() {
    let mut cfg = common::config();
    cfg.mqtt.receive_maximum = 4;
    let b = common::start_with(cfg).await;
    let addr = common::mqtt(&b);
    let mut bystander = common::Bystander::connect(addr, "rmx-by").await;
    let mut c = Raw::connect(addr, V::V5, "rmx").await;
    for id in 1..=4u16 {
        c.send(&pkt::publish(V::V5, b"rmx/t", 2, id, b"x")).await;
        assert_eq!(c.expect(pkt::PUBREC).await.body[..2], id.to_be_bytes());
    }
    c.send(&pkt::publish(V::V5, b"rmx/t", 2, 5, b"x")).await;
    c.expect_disconnect(0x93).await;
    common::assert_serving(addr, &mut bystander).await;
    common::stop(b).await;
}

/// A QoS 2 PUBLISH sent again (DUP) before PUBREL is acknowledged again but delivered once
/// [MQTT-4.3.3-10].
#[tokio::test]
async fn qos2_resend_is_delivered_once() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = v5::client(addr, "q2dup-sub").await;
    sub.subscribe("q2dup/#", Q5::ExactlyOnce).await;
    let mut publ = Raw::connect(addr, V::V5, "q2dup-pub").await;
    let first = pkt::publish(V::V5, b"q2dup/t", 2, 9, b"once");
    let mut again = first.clone();
    again[0] |= 0x08; // DUP
    for p in [first, again] {
        publ.send(&p).await;
        assert_eq!(publ.expect(pkt::PUBREC).await.body[..2], [0, 9]);
    }
    publ.send(&pkt::frame(0x62, &[0, 9])).await; // PUBREL
    assert_eq!(publ.expect(7).await.body[..2], [0, 9]); // PUBCOMP
    publ.send(&pkt::publish(V::V5, b"q2dup/t", 1, 10, b"marker"))
        .await;
    let got = payloads(sub.publishes(2).await);
    assert_eq!(got, ["once", "marker"]);
    common::stop(b).await;
}

/// Messages sent but not acknowledged when the connection dropped are sent again, with DUP
/// set and before anything newer, when the session resumes [MQTT-4.4.0-1, MQTT-3.3.1-1].
#[tokio::test]
async fn unacknowledged_messages_are_resent_on_reconnect() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = persistent_raw(addr, "resend-sub", true).await;
    assert_eq!(sub.subscribe(1, "resend/t", 1).await, 1);
    let mut publ = v5::client(addr, "resend-pub").await;
    for i in 0..3 {
        publ.publish("resend/t", Q5::AtLeastOnce, false, &format!("m{i}"))
            .await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        let p = sub.expect(pkt::PUBLISH).await;
        assert_eq!(p.header & 0x08, 0, "first delivery has DUP clear");
        first.push(p.publish(V::V5));
    }
    sub.send(&pkt::puback(first[0].1.expect("QoS 1"))).await;
    drop(sub);
    gone(&b, "resend-sub").await;
    publ.publish("resend/t", Q5::AtLeastOnce, false, "m3").await;

    let mut sub = persistent_raw(addr, "resend-sub", false).await;
    let mut again = Vec::new();
    for _ in 0..3 {
        let p = sub.expect(pkt::PUBLISH).await;
        let dup = p.header & 0x08 != 0;
        let (_, id, payload) = p.publish(V::V5);
        sub.send(&pkt::puback(id.expect("QoS 1"))).await;
        again.push((String::from_utf8_lossy(&payload).into_owned(), dup));
    }
    let want = [("m1", true), ("m2", true), ("m3", false)].map(|(m, d)| (m.to_string(), d));
    assert_eq!(again, want);
    common::stop(b).await;
}

/// A QoS 2 delivery that got as far as PUBREL continues with PUBREL, not the PUBLISH, when the
/// session resumes [MQTT-4.4.0-1].
#[tokio::test]
async fn qos2_pubrel_is_resent_on_reconnect() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = persistent_raw(addr, "relsub", true).await;
    assert_eq!(sub.subscribe(1, "rel/t", 2).await, 2);
    let mut publ = v5::client(addr, "relpub").await;
    publ.publish("rel/t", Q5::ExactlyOnce, false, "two").await;
    let id = sub
        .expect(pkt::PUBLISH)
        .await
        .publish(V::V5)
        .1
        .expect("QoS 2");
    sub.send(&pkt::frame(0x50, &id.to_be_bytes())).await; // PUBREC
    let rel = sub.expect(6).await; // PUBREL
    assert_eq!((rel.header, &rel.body[..2]), (0x62, &id.to_be_bytes()[..]));
    drop(sub);
    gone(&b, "relsub").await;

    let mut sub = persistent_raw(addr, "relsub", false).await;
    let rel = sub.expect(6).await;
    assert_eq!(rel.body[..2], id.to_be_bytes());
    sub.send(&pkt::frame(0x70, &id.to_be_bytes())).await; // PUBCOMP
    publ.publish("rel/t", Q5::AtLeastOnce, false, "next").await;
    let (_, _, payload) = sub.expect(pkt::PUBLISH).await.publish(V::V5);
    assert_eq!(payload, b"next", "the completed message came again");
    common::stop(b).await;
}

/// Connects a raw MQTT 5 client with a 60 s session, asserting session present is `!clean`.
async fn persistent_raw(addr: std::net::SocketAddr, id: &str, clean: bool) -> Raw {
    let mut c = Raw::tcp(addr, V::V5).await;
    // Session Expiry Interval (0x11) 60 s; clear Clean Start (flags byte) to resume.
    let mut connect = pkt::connect_with(V::V5, id.as_bytes(), &[0x11, 0, 0, 0, 60]);
    if !clean {
        connect[9] &= !0x02;
    }
    c.send(&connect).await;
    let ack = c.expect(pkt::CONNACK).await;
    assert_eq!(ack.body[..2], [u8::from(!clean), 0], "CONNACK {ack:?}");
    c
}

/// Waits until the broker has noticed that `client_id`'s connection is gone.
async fn gone(b: &corvid_broker::server::Running, client_id: &str) {
    let session = b.broker.sessions.get(client_id).expect("session");
    wait_until("the broker to see the connection gone", || {
        session.state.lock().connection.is_none()
    })
    .await;
}

/// The offline queue is bounded by `sessions.max_offline_queue`; with the default policy the
/// oldest messages make room for new ones.
#[tokio::test]
async fn offline_queue_is_bounded_dropping_oldest() {
    let mut cfg = common::config();
    cfg.sessions.max_offline_queue = 5;
    let b = common::start_with(cfg).await;
    let addr = common::mqtt(&b);
    let mut sub = persistent_raw(addr, "qlim", true).await;
    assert_eq!(sub.subscribe(1, "qlim/t", 1).await, 1);
    sub.send(&pkt::disconnect()).await;
    assert!(sub.closed().await.is_empty());
    let mut publ = v5::client(addr, "qlim-pub").await;
    for i in 0..10 {
        publ.publish("qlim/t", Q5::AtLeastOnce, false, &format!("m{i}"))
            .await;
    }
    let mut sub = persistent_raw(addr, "qlim", false).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let (_, id, payload) = sub.expect(pkt::PUBLISH).await.publish(V::V5);
        sub.send(&pkt::puback(id.expect("QoS 1"))).await;
        got.push(String::from_utf8_lossy(&payload).into_owned());
    }
    assert_eq!(got, ["m5", "m6", "m7", "m8", "m9"]);
    publ.publish("qlim/t", Q5::AtLeastOnce, false, "marker")
        .await;
    let (_, _, payload) = sub.expect(pkt::PUBLISH).await.publish(V::V5);
    assert_eq!(payload, b"marker");
    common::stop(b).await;
}

/// With overlapping subscriptions the one delivered message carries every matching
/// Subscription Identifier [MQTT-3.3.4-3].
#[tokio::test]
async fn overlapping_subscription_identifiers() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = Raw::connect(addr, V::V5, "subid").await;
    // SUBSCRIBE with property 0x0B (Subscription Identifier) = 1 and 2.
    for (id, filter) in [(1u8, &b"sid/#"[..]), (2, b"sid/b")] {
        let mut body = vec![0, id, 2, 0x0B, id];
        pkt::field(filter, &mut body);
        body.push(1);
        sub.send(&pkt::frame(0x82, &body)).await;
        assert_eq!(sub.expect(pkt::SUBACK).await.body.last(), Some(&1));
    }
    let mut publ = v5::client(addr, "subid-pub").await;
    publ.publish("sid/b", Q5::AtMostOnce, false, "x").await;
    let p = sub.expect(pkt::PUBLISH).await;
    let b2 = &p.body;
    let at = 2 + usize::from(u16::from_be_bytes([b2[0], b2[1]]));
    let props = &b2[at + 1..at + 1 + usize::from(b2[at])];
    let mut ids: Vec<u8> = props
        .chunks(2)
        .filter(|c| c[0] == 0x0B)
        .map(|c| c[1])
        .collect();
    ids.sort();
    assert_eq!(ids, [1, 2], "properties {props:02X?}");
    common::stop(b).await;
}

/// Topic alias set by the client (section 3.3.2.3.4): the first PUBLISH maps alias 1 to a topic,
/// later ones send an empty topic; subscribers see the full topic every time.
#[tokio::test]
async fn topic_alias_from_client() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = v5::client(addr, "ta-sub").await;
    sub.subscribe("ta/#", Q5::AtLeastOnce).await;
    let mut publ = v5::client(addr, "ta-pub").await;
    let alias = || PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    };
    publ.publish_with("ta/long/topic", Q5::AtLeastOnce, false, "1", Some(alias()))
        .await;
    publ.publish_with("", Q5::AtLeastOnce, false, "2", Some(alias()))
        .await;
    publ.publish_with("", Q5::AtMostOnce, false, "3", Some(alias()))
        .await;
    let got = sub.publishes(3).await;
    assert!(got.iter().all(|(t, _, _)| t == "ta/long/topic"), "{got:?}");
    let payloads: Vec<&str> = got.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(payloads, ["1", "2", "3"]);
    common::stop(b).await;
}

/// Topic aliases towards a client that accepts two: the first message on a topic carries the
/// topic and a new alias, later ones only the alias; a third topic goes without one
/// (section 3.3.2.3.4).
#[tokio::test]
async fn topic_alias_to_client() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = Raw::tcp(addr, V::V5).await;
    // Topic Alias Maximum (0x22) = 2.
    sub.send(&pkt::connect_with(V::V5, b"tao-sub", &[0x22, 0, 2]))
        .await;
    assert_eq!(sub.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(sub.subscribe(1, "tao/#", 0).await, 0);
    let mut publ = v5::client(addr, "tao-pub").await;
    for t in ["tao/a", "tao/a", "tao/b", "tao/c", "tao/b"] {
        publ.publish(t, Q5::AtLeastOnce, false, "x").await;
    }
    let mut seen = Vec::new();
    for _ in 0..5 {
        let p = sub.expect(pkt::PUBLISH).await;
        let (topic, _, rest) = p.publish(V::V5);
        let alias = topic_alias(&p);
        assert_eq!(rest, b"x");
        seen.push((topic, alias));
    }
    let want = [
        ("tao/a", Some(1)),
        ("", Some(1)),
        ("tao/b", Some(2)),
        ("tao/c", None),
        ("", Some(2)),
    ];
    let want: Vec<(String, Option<u16>)> = want.iter().map(|(t, a)| (t.to_string(), *a)).collect();
    assert_eq!(seen, want);
    common::stop(b).await;
}

/// The Topic Alias property (0x23) of a QoS 0 MQTT 5 PUBLISH, if present.
fn topic_alias(p: &common::Packet) -> Option<u16> {
    let b = &p.body;
    let at = 2 + usize::from(u16::from_be_bytes([b[0], b[1]]));
    let len = usize::from(b[at]); // short property blocks only
    let props = &b[at + 1..at + 1 + len];
    props
        .windows(3)
        .find(|w| w[0] == 0x23)
        .map(|w| u16::from_be_bytes([w[1], w[2]]))
}

/// When a shared-subscription member's session ends with messages still unacknowledged or
/// queued, they go to another member of the group instead of being lost (section 4.8.2).
#[tokio::test]
async fn shared_subscription_redelivers_when_a_member_leaves() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut lazy = Raw::tcp(addr, V::V5).await;
    // Receive Maximum 2, never acknowledges.
    lazy.send(&pkt::connect_with(V::V5, b"shr-lazy", &[0x21, 0, 2]))
        .await;
    assert_eq!(lazy.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(lazy.subscribe(1, "$share/g/shr/#", 1).await, 1);
    let mut good = v5::client(addr, "shr-good").await;
    good.subscribe("$share/g/shr/#", Q5::AtLeastOnce).await;
    let mut publ = v5::client(addr, "shr-pub").await;
    for i in 0..6 {
        publ.publish(
            &format!("shr/{i}"),
            Q5::AtLeastOnce,
            false,
            &format!("m{i}"),
        )
        .await;
    }
    for _ in 0..2 {
        lazy.expect(pkt::PUBLISH).await;
    }
    drop(lazy);
    let mut got = payloads(good.publishes(6).await);
    got.sort();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    common::stop(b).await;
}

/// `$share/{group}/{filter}`: each message goes to exactly one member of the group, and the
/// default round-robin strategy spreads them evenly [MQTT-4.8.2].
#[tokio::test]
async fn shared_subscription_distributes_across_members() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let got: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for member in 0..3 {
        let mut c = v5::client(addr, &format!("sh-{member}")).await;
        c.subscribe("$share/workers/sh/#", Q5::AtLeastOnce).await;
        let got = got.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let p = c.next_publish().await;
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                got.lock().expect("lock").push((member, payload));
            }
        }));
    }
    let mut publ = v5::client(addr, "sh-pub").await;
    for i in 0..30 {
        publ.publish(&format!("sh/{i}"), Q5::AtLeastOnce, false, &format!("m{i}"))
            .await;
    }
    wait_until("30 shared deliveries", || {
        got.lock().expect("lock").len() >= 30
    })
    .await;
    let got = got.lock().expect("lock").clone();
    let unique: BTreeSet<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!((got.len(), unique.len()), (30, 30), "duplicates: {got:?}");
    for member in 0..3 {
        let n = got.iter().filter(|(m, _)| *m == member).count();
        assert_eq!(n, 10, "member {member} got {n} of 30 with round robin");
    }
    for t in tasks {
        t.abort();
    }
    common::stop(b).await;
}

/// The payloads of `publishes`, in arrival order.
fn payloads<Q>(publishes: Vec<(String, String, Q)>) -> Vec<String> {
    publishes.into_iter().map(|(_, p, _)| p).collect()
}

/// Waits until `n` connections of `b` are parked (idle without a task).
async fn parked(b: &corvid_broker::server::Running, n: i64) {
    let gauge = &b.broker.metrics.connections_parked;
    wait_until(&format!("{n} parked connections"), || gauge.get() == n).await;
}

/// An idle connection parks (gives up its task) and comes back for each thing that needs it:
/// a message for its session, a packet from its client, a takeover, and the broker's shutdown.
#[tokio::test]
async fn a_parked_connection_comes_back_for_whatever_needs_it() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    for v in V::BOTH {
        let mut sub = Raw::connect(addr, v, "park-sub").await;
        assert_eq!(sub.subscribe(1, "park/t", 1).await, 1);
        let mut publ = Raw::connect(addr, v, "park-pub").await;
        parked(&b, 2).await;

        // A message for the parked subscriber, from a parked publisher.
        publ.send(&pkt::publish(v, b"park/t", 1, 7, b"one")).await;
        assert_eq!(publ.expect(pkt::PUBACK).await.kind(), pkt::PUBACK);
        let (topic, id, body) = sub.expect(pkt::PUBLISH).await.publish(v);
        assert_eq!((topic.as_str(), body.as_slice()), ("park/t", &b"one"[..]));
        sub.send(&pkt::puback(id.expect("QoS 1"))).await;
        parked(&b, 2).await;

        // A packet from the client.
        sub.send(&pkt::pingreq()).await;
        sub.expect(pkt::PINGRESP).await;
        parked(&b, 2).await;

        // A takeover of the parked subscriber's client id.
        let again = Raw::connect(addr, v, "park-sub").await;
        if v == V::V5 {
            sub.expect_disconnect(0x8E).await;
        } else {
            assert!(sub.closed().await.is_empty(), "3.1.1 gets no DISCONNECT");
        }
        drop((again, publ));
        parked(&b, 0).await;
    }
    // Shutdown reaches parked connections too.
    let mut idle = Raw::connect(addr, V::V5, "park-idle").await;
    parked(&b, 1).await;
    common::stop(b).await;
    idle.expect_disconnect(0x8B).await;
}

/// A parked connection whose client goes quiet is let go after one and a half keep alive
/// periods, like one with a task.
#[tokio::test]
async fn a_parked_connection_keeps_its_keep_alive() {
    let b = common::start().await;
    let mut quiet = Raw::tcp(common::mqtt(&b), V::V5).await;
    let started = Instant::now();
    quiet
        .send(&pkt::connect_keep_alive(V::V5, b"park-ka", 2, &[]))
        .await;
    quiet.expect(pkt::CONNACK).await;
    parked(&b, 1).await;
    quiet.expect_disconnect(0x8D).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3),
        "let go after {waited:?}, before 1.5 x keep alive"
    );
    parked(&b, 0).await;
    common::stop(b).await;
}

/// A connection whose packet stops right after its fixed header (which the codec has taken off
/// the read buffer) is not idle: it must not park, and is closed after `mqtt.packet_timeout`
/// even with keep alive off.
#[tokio::test]
async fn a_connection_mid_packet_does_not_park() {
    let mut cfg = common::config();
    cfg.mqtt.packet_timeout = 2;
    let b = common::start_with(cfg).await;
    let mut c = Raw::tcp(common::mqtt(&b), V::V311).await;
    c.send(&pkt::connect_keep_alive(V::V311, b"park-stall", 0, &[]))
        .await;
    c.expect(pkt::CONNACK).await;
    let publish = pkt::publish(V::V311, b"park/stall", 0, 0, &[b'x'; 100]);
    c.send(&publish[..2]).await;
    assert!(c.closed().await.is_empty(), "closed without a word");
    assert_eq!(b.broker.metrics.connections_parked.get(), 0);
    common::stop(b).await;
}

/// A connection woken again and again within the parking grace keeps its task instead of the
/// broker spawning one per packet: a client that trickles pings every 100 ms (busy, or trying
/// to make the broker churn tasks) is not parked between them, and parks once it goes quiet.
#[tokio::test]
async fn a_connection_woken_often_keeps_its_task() {
    let b = common::start().await;
    let mut c = Raw::connect(common::mqtt(&b), V::V311, "park-trickle").await;
    parked(&b, 1).await;
    // Woken after a long park: it parks again as soon as it is idle.
    c.send(&pkt::pingreq()).await;
    c.expect(pkt::PINGRESP).await;
    parked(&b, 1).await;
    // Woken again at once: it keeps its task through a trickle of pings.
    for i in 0..15 {
        if i > 0 {
            assert_eq!(
                b.broker.metrics.connections_parked.get(),
                0,
                "parked between pings 100 ms apart (before ping {i})"
            );
        }
        c.send(&pkt::pingreq()).await;
        c.expect(pkt::PINGRESP).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    parked(&b, 1).await;
    common::stop(b).await;
}
