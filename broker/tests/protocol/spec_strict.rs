//! Strict spec checks that once failed (found by the integration tests and fixed), kept as
//! regression tests: each states what the MQTT specification requires.

use crate::common;

use common::{pkt, Bystander, Raw, V};

/// Packets handled before a protocol error must still be answered: the broker took ownership
/// of the QoS 1 and QoS 2 messages (it routed them), so it must send their PUBACK and PUBREC
/// [MQTT-4.3.2-4, MQTT-4.3.3-8] before DISCONNECT 0x90.
#[tokio::test]
async fn acks_before_a_protocol_error_are_sent() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = Bystander::connect(addr, "ackloss-by").await;
    let mut c = Raw::connect(addr, V::V5, "ackloss").await;
    let mut batch = pkt::publish(V::V5, b"ackloss/a", 1, 1, b"one");
    batch.extend(pkt::publish(V::V5, b"ackloss/b", 2, 2, b"two"));
    batch.extend(pkt::publish(V::V5, b"ackloss/+", 0, 0, b"bad"));
    c.send(&batch).await;
    let seen = c.closed().await;
    // PUBACK/PUBREC carry their reason code after the packet id.
    let kinds: Vec<(u8, u8)> = seen
        .iter()
        .map(|p| match p.kind() {
            pkt::PUBACK | pkt::PUBREC => (p.kind(), p.body.get(2).copied().unwrap_or(0)),
            _ => (p.kind(), p.reason()),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (pkt::PUBACK, 0x10),
            (pkt::PUBREC, 0x10),
            (pkt::DISCONNECT, 0x90)
        ],
        "{seen:?}"
    );
    common::assert_serving(addr, &mut sub).await;
    common::stop(b).await;
}

/// U+0000 in a UTF-8 string is a malformed packet [MQTT-1.5.4-2]: DISCONNECT 0x81.
#[tokio::test]
async fn nul_in_topic_is_malformed() {
    let b = common::start().await;
    let mut c = Raw::connect(common::mqtt(&b), V::V5, "nul").await;
    c.send(&pkt::publish(V::V5, b"a/\x00b", 0, 0, b"x")).await;
    c.expect_disconnect(0x81).await;
    common::stop(b).await;
}

/// Invalid fixed-header flags make a malformed packet [MQTT-2.1.3-1]: DISCONNECT 0x81.
#[tokio::test]
async fn wrong_fixed_header_flags_are_malformed() {
    let b = common::start().await;
    let mut c = Raw::connect(common::mqtt(&b), V::V5, "flags").await;
    c.send(&pkt::frame(0x60, &[0x00, 0x01])).await;
    c.expect_disconnect(0x81).await;
    common::stop(b).await;
}

/// A message too large for the client is dropped [MQTT-3.1.2-25] — but the topic alias the
/// broker assigned while encoding it stays recorded, so the next message on that topic is sent
/// as an empty topic with an alias the client never saw: a protocol error on the client side
/// (section 3.3.2.3.4: an alias must first be sent together with its topic).
#[tokio::test]
async fn alias_of_a_dropped_message_is_not_reused() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut sub = Raw::tcp(addr, V::V5).await;
    // Topic Alias Maximum (0x22) = 2, Maximum Packet Size (0x27) = 100.
    let props = [0x22, 0, 2, 0x27, 0, 0, 0, 100];
    sub.send(&pkt::connect_with(V::V5, b"alias-drop", &props))
        .await;
    assert_eq!(sub.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(sub.subscribe(1, "ad/#", 0).await, 0);
    let mut publ = Raw::connect(addr, V::V5, "alias-drop-pub").await;
    publ.send(&pkt::publish(V::V5, b"ad/t", 0, 0, &[b'x'; 200]))
        .await;
    publ.send(&pkt::publish(V::V5, b"ad/t", 0, 0, b"small"))
        .await;
    let (topic, _, payload) = sub.expect(pkt::PUBLISH).await.publish(V::V5);
    assert_eq!(payload, b"small");
    assert_eq!(
        topic, "ad/t",
        "the first PUBLISH the client sees must carry the topic"
    );
    common::stop(b).await;
}

/// Resending unacknowledged messages on reconnect uses send quota like any other QoS 1
/// PUBLISH: with the new connection's Receive Maximum of 1, only one may be outstanding
/// [MQTT-3.3.4-9, MQTT-4.9.0-2].
#[tokio::test]
async fn resend_on_reconnect_honours_receive_maximum() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    // Session Expiry Interval (0x11) 60 s, Receive Maximum (0x21) as given.
    let connect = |clean: bool, receive_max: u8| {
        let props = [0x11, 0, 0, 0, 60, 0x21, 0, receive_max];
        let mut p = pkt::connect_with(V::V5, b"rm-resume", &props);
        if !clean {
            p[9] &= !0x02;
        }
        p
    };
    let mut sub = Raw::tcp(addr, V::V5).await;
    sub.send(&connect(true, 3)).await;
    assert_eq!(sub.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(sub.subscribe(1, "rm-resume/t", 1).await, 1);
    let mut publ = Raw::connect(addr, V::V5, "rm-resume-pub").await;
    for id in 1..=3u16 {
        publ.send(&pkt::publish(V::V5, b"rm-resume/t", 1, id, b"x"))
            .await;
        publ.expect(pkt::PUBACK).await;
    }
    for _ in 0..3 {
        sub.expect(pkt::PUBLISH).await;
    }
    drop(sub);
    let session = b.broker.sessions.get("rm-resume").expect("session");
    common::wait_until("the broker to see the connection gone", || {
        session.state.lock().connection.is_none()
    })
    .await;

    let mut sub = Raw::tcp(addr, V::V5).await;
    sub.send(&connect(false, 1)).await;
    assert_eq!(sub.expect(pkt::CONNACK).await.body[..2], [1, 0]);
    // PINGRESP comes after everything the broker sends on resuming.
    sub.send(&pkt::pingreq()).await;
    let mut resent = 0;
    while sub.recv().await.expect("connected").kind() != pkt::PINGRESP {
        resent += 1;
    }
    assert_eq!(resent, 1, "resent beyond the Receive Maximum of 1");
    common::stop(b).await;
}

/// U+0000 in a SUBSCRIBE filter: 3.1.1 MUST close the connection [MQTT-1.5.3-2]; MQTT 5
/// treats it as malformed, DISCONNECT 0x81 [MQTT-1.5.4-2]. The broker answers with a SUBACK
/// failure (0x80 / 0x8F) and keeps the connection.
#[tokio::test]
async fn nul_in_subscribe_filter_closes() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    for v in V::BOTH {
        let mut c = Raw::connect(addr, v, "nul-filter").await;
        c.send(&pkt::subscribe(v, 1, "a/\u{0}", 0)).await;
        let answer = c.recv().await.map(|p| (p.kind(), p.reason()));
        let want = (v == V::V5).then_some((pkt::DISCONNECT, 0x81));
        assert_eq!(
            answer, want,
            "{v:?}: expected close (with DISCONNECT 0x81 for MQTT 5)"
        );
    }
    common::stop(b).await;
}

/// SHOULD-level: a will the server cannot honour is refused with the specific reason —
/// 0x9B (QoS not supported) for a will QoS above Maximum QoS (section 3.2.2.3.4), 0x9A (Retain
/// not supported) for a retained will without retain support (section 3.2.2.3.5).
#[tokio::test]
async fn unsupported_will_gets_specific_connack_codes() {
    let mut cfg = common::config();
    cfg.mqtt.max_qos = 1;
    cfg.mqtt.retain_available = false;
    let b = common::start_with(cfg).await;
    for (flags, want) in [(0x16u8, 0x9Bu8), (0x26, 0x9A)] {
        let mut body = Vec::new();
        pkt::field(b"MQTT", &mut body);
        body.extend_from_slice(&[5, flags, 0, 60, 0]);
        pkt::field(b"will-cid", &mut body);
        body.push(0); // will properties
        pkt::field(b"will/t", &mut body);
        pkt::field(b"bye", &mut body);
        let mut c = Raw::tcp(common::mqtt(&b), V::V5).await;
        c.send(&pkt::frame(0x10, &body)).await;
        let ack = c.expect(pkt::CONNACK).await;
        assert_eq!(ack.reason(), want, "flags {flags:02X}");
    }
    common::stop(b).await;
}

/// An acknowledgement of the wrong kind is a protocol error: a QoS 1 delivery is answered with
/// PUBACK only [MQTT-4.3.2-5], a QoS 2 delivery with PUBREC and then PUBCOMP [MQTT-4.3.3-9]
/// [MQTT-4.3.3-11]. MQTT 5 gets DISCONNECT 0x82; 3.1.1 is closed [MQTT-4.8.0-1]. Before, the
/// broker ignored PUBCOMP, took PUBREC for a QoS 1 message as a QoS 2 handshake and a PUBACK
/// as the end of a QoS 2 one.
#[tokio::test]
async fn wrong_acknowledgement_types_close_the_connection() {
    const PUBACK: u8 = 0x40;
    const PUBREC: u8 = 0x50;
    const PUBCOMP: u8 = 0x70;
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut by = Bystander::connect(addr, "wrongack-by").await;
    let mut publ = Raw::connect(addr, V::V5, "wrongack-pub").await;
    for (i, (v, qos, answer, name)) in [
        (V::V5, 1, PUBREC, "v5-pubrec-for-qos1"),
        (V::V5, 1, PUBCOMP, "v5-pubcomp-for-qos1"),
        (V::V5, 2, PUBACK, "v5-puback-for-qos2"),
        (V::V5, 2, PUBCOMP, "v5-pubcomp-before-pubrec"),
        (V::V311, 1, PUBREC, "v3-pubrec-for-qos1"),
        (V::V311, 2, PUBACK, "v3-puback-for-qos2"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Raw::connect(addr, v, name).await;
        let topic = format!("wrongack/{name}");
        assert_eq!(c.subscribe(1, &topic, qos).await, qos, "{name}");
        let id = u16::try_from(i + 1).expect("small");
        publ.send(&pkt::publish(V::V5, topic.as_bytes(), qos, id, b"x"))
            .await;
        let delivery = c.expect(pkt::PUBLISH).await;
        let (_, packet_id, _) = delivery.publish(v);
        let packet_id = packet_id.expect("QoS > 0 has a packet id");
        c.send(&pkt::frame(answer, &packet_id.to_be_bytes())).await;
        c.expect_disconnect(0x82).await;
    }
    common::assert_serving(addr, &mut by).await;
    common::stop(b).await;
}

/// A client may send DISCONNECT only with the reason codes the specification marks for
/// clients (MQTT 5.0 §3.14.2.1) [MQTT-3.14.2-1]: a server-only code is a protocol error (0x82),
/// an unassigned one a malformed packet (0x81, from the codec) or a protocol error.
#[tokio::test]
async fn a_disconnect_reason_clients_may_not_send_is_a_protocol_error() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut by = Bystander::connect(addr, "badreason-by").await;
    for code in [0x01u8, 0x05, 0x8E, 0x9C] {
        let mut c = Raw::connect(addr, V::V5, &format!("badreason-{code:02x}")).await;
        // Reason code, then an empty property list.
        c.send(&pkt::frame(0xE0, &[code, 0])).await;
        if code >= 0x80 {
            c.expect_disconnect(0x82).await;
        } else {
            c.expect_disconnect_in(&[0x81, 0x82]).await;
        }
    }
    // A reason clients may send (0x04: publish my will) is a normal goodbye.
    let mut ok = Raw::connect(addr, V::V5, "goodreason").await;
    ok.send(&pkt::frame(0xE0, &[0x04, 0])).await;
    let seen = ok.closed().await;
    assert!(
        seen.is_empty(),
        "no DISCONNECT for a valid reason: {seen:?}"
    );
    common::assert_serving(addr, &mut by).await;
    common::stop(b).await;
}

/// Control characters (U+0001–U+001F, U+007F–U+009F) SHOULD NOT be sent, and a receiver MAY
/// treat a packet holding them as malformed (MQTT 5.0 §1.5.4, 3.1.1 §1.5.3); with
/// `mqtt.strict_utf8` (the default) Corvid does, as mosquitto: CONNACK or DISCONNECT 0x81 on
/// MQTT 5, closed on 3.1.1. `strict_utf8: false` lets them through.
#[tokio::test]
async fn control_characters_are_malformed_unless_allowed() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut by = Bystander::connect(addr, "ctrl-by").await;
    for v in [V::V5, V::V311] {
        // In the client id: refused before a session exists.
        let mut c = Raw::tcp(addr, v).await;
        c.send(&pkt::connect_with(v, b"ctrl\x01id", &[])).await;
        let seen = c.closed().await;
        match v {
            V::V5 => assert!(
                seen.len() == 1 && seen[0].kind() == pkt::CONNACK && seen[0].reason() == 0x81,
                "{seen:?}"
            ),
            V::V311 => assert!(
                seen.is_empty(),
                "3.1.1 has no CONNACK code for it: {seen:?}"
            ),
        }
        // In a topic name and in a filter.
        let mut p = Raw::connect(addr, v, "ctrl-pub").await;
        p.send(&pkt::publish(v, b"ctrl/\x7f", 0, 0, b"x")).await;
        p.expect_disconnect(0x81).await;
        let mut s = Raw::connect(addr, v, "ctrl-sub").await;
        s.send(&pkt::subscribe(v, 1, "ctrl/\u{1b}/#", 0)).await;
        s.expect_disconnect(0x81).await;
    }
    common::assert_serving(addr, &mut by).await;
    common::stop(b).await;

    let mut cfg = common::config();
    cfg.mqtt.strict_utf8 = false;
    let b = common::start_with(cfg).await;
    let addr = common::mqtt(&b);
    let mut s = Raw::connect(addr, V::V5, "lenient\u{1}sub").await;
    assert_eq!(s.subscribe(1, "lenient/\u{7f}", 0).await, 0);
    let mut p = Raw::connect(addr, V::V5, "lenient-pub").await;
    p.send(&pkt::publish(
        V::V5,
        "lenient/\u{7f}".as_bytes(),
        0,
        0,
        b"x",
    ))
    .await;
    let (topic, _, payload) = s.expect(pkt::PUBLISH).await.publish(V::V5);
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("lenient/\u{7f}", &b"x"[..])
    );
    common::stop(b).await;
}

/// A CONNECT with protocol `name` and `level`, connect `flags` and fixed-header `header`.
fn connect_raw(header: u8, name: &[u8], level: u8, flags: u8, client_id: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    pkt::field(name, &mut b);
    b.extend_from_slice(&[level, flags, 0, 60]);
    pkt::field(client_id, &mut b);
    pkt::frame(header, &b)
}

/// The CONNACK return code a CONNECT gets (the connection may close after it).
async fn connack_code(addr: std::net::SocketAddr, connect: &[u8]) -> Option<u8> {
    let mut c = Raw::tcp(addr, V::V311).await;
    c.send(connect).await;
    c.recv()
        .await
        .filter(|p| p.kind() == pkt::CONNACK)
        .map(|p| p.body.get(1).copied().unwrap_or(0xFF))
}

/// MQTT 3.1 (`MQIsdp`, level 3) by its own rules: it leaves the connect flags' bit 0 and the
/// fixed header's flags unused (3.1.1 made them reserved-zero [MQTT-3.1.2-3], [MQTT-2.2.2-2]),
/// so a 3.1 client setting them is accepted; its client id is 1 to 23 characters, anything else
/// gets CONNACK 2 (identifier rejected). A protocol name with another version's level is
/// CONNACK 1 (unacceptable protocol version) [MQTT-3.1.2-2].
#[tokio::test]
async fn mqtt31_is_judged_by_its_own_rules() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut by = Bystander::connect(addr, "v31-by").await;
    let accepted = connect_raw(0x1F, b"MQIsdp", 3, 0x03, b"v31-flags");
    assert_eq!(connack_code(addr, &accepted).await, Some(0));
    assert_eq!(
        connack_code(addr, &connect_raw(0x10, b"MQIsdp", 3, 0x02, b"")).await,
        Some(2)
    );
    let long = [b'x'; 24];
    assert_eq!(
        connack_code(addr, &connect_raw(0x10, b"MQIsdp", 3, 0x02, &long)).await,
        Some(2)
    );
    assert_eq!(
        connack_code(addr, &connect_raw(0x10, b"MQIsdp", 3, 0x02, &long[..23])).await,
        Some(0)
    );
    for (name, level) in [(&b"MQTT"[..], 3), (&b"MQIsdp"[..], 4)] {
        assert_eq!(
            connack_code(addr, &connect_raw(0x10, name, level, 0x02, b"wrong-level")).await,
            Some(1),
            "{name:?} level {level}"
        );
    }
    // 3.1.1 keeps its reserved bit: a CONNECT with it set is closed without CONNACK.
    let mut c = Raw::tcp(addr, V::V311).await;
    c.send(&connect_raw(0x10, b"MQTT", 4, 0x03, b"v311-reserved"))
        .await;
    assert!(c.closed().await.is_empty());
    common::assert_serving(addr, &mut by).await;
    common::stop(b).await;
}

/// The server MUST NOT send a packet over the client's Maximum Packet Size [MQTT-3.1.2-24]: a
/// client whose maximum cannot hold the CONNACK is closed at once, not left waiting for it.
#[tokio::test]
async fn a_client_too_small_for_the_connack_is_closed() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut by = Bystander::connect(addr, "tinymax-by").await;
    let mut c = Raw::tcp(addr, V::V5).await;
    // Maximum Packet Size (0x27) = 8 bytes: the CONNACK with its properties is larger.
    c.send(&pkt::connect_with(V::V5, b"tiny-max", &[0x27, 0, 0, 0, 8]))
        .await;
    let seen = c.closed().await;
    assert!(seen.is_empty(), "{seen:?}");
    // A maximum that holds the CONNACK connects as usual.
    let mut ok = Raw::tcp(addr, V::V5).await;
    ok.send(&pkt::connect_with(V::V5, b"fits-max", &[0x27, 0, 0, 1, 0]))
        .await;
    assert_eq!(ok.expect(pkt::CONNACK).await.reason(), 0);
    common::assert_serving(addr, &mut by).await;
    common::stop(b).await;
}
