//! Hostile clients on the internet side: topics deep enough to blow a recursive walk's stack,
//! oversize topics and filters at every entry point, identities that try to widen ACL rules,
//! client ids reused by another identity, publishes into `$SYS`. Each case asserts the
//! broker's answer, that a bystander keeps its round trips, and (where memory matters) that
//! the process's RSS stays bounded while the attack runs.

mod common;

use common::{pkt, Bystander, Raw, V};

/// Tests that measure RSS run one at a time: the broker shares this process with the others.
static MEASURED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident set size of this test process (the broker runs in it), in KiB.
fn rss_kib() -> u64 {
    common::rss_bytes(None) / 1024
}

/// A topic of `levels` one-byte levels: `a/a/…/a`.
fn deep(levels: usize) -> String {
    let mut t = "a/".repeat(levels - 1);
    t.push('a');
    t
}

/// SUBSCRIBE to one filter given as raw bytes (may be long).
fn subscribe_bytes(v: V, packet_id: u16, filter: &[u8], qos: u8) -> Vec<u8> {
    let mut b = packet_id.to_be_bytes().to_vec();
    if v == V::V5 {
        b.push(0);
    }
    pkt::field(filter, &mut b);
    b.push(qos);
    pkt::frame(0x82, &b)
}

/// UNSUBSCRIBE from one filter.
fn unsubscribe(v: V, packet_id: u16, filter: &[u8]) -> Vec<u8> {
    let mut b = packet_id.to_be_bytes().to_vec();
    if v == V::V5 {
        b.push(0);
    }
    pkt::field(filter, &mut b);
    pkt::frame(0xA2, &b)
}

/// CONNECT (clean start) with a QoS 0 will on `topic`.
fn connect_with_will(v: V, client_id: &str, topic: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    pkt::field(b"MQTT", &mut b);
    let level = if v == V::V5 { 5 } else { 4 };
    b.extend_from_slice(&[level, 0x06, 0, 60]);
    if v == V::V5 {
        pkt::props(&[], &mut b);
    }
    pkt::field(client_id.as_bytes(), &mut b);
    if v == V::V5 {
        pkt::props(&[], &mut b);
    }
    pkt::field(topic, &mut b);
    pkt::field(b"gone", &mut b);
    pkt::frame(0x10, &b)
}

/// A metric's value from `/metrics` (sum over the lines that contain every `labels` part).
async fn metric(r: &corvid_broker::server::Running, name: &str, labels: &[&str]) -> f64 {
    let (_, body) = common::http_get(r.admin, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The crash of issue #13: a retained PUBLISH to a topic of 30,000 levels, then a `#`
/// subscription that reaches it, then a filter just as deep, routed through and removed.
/// Before the walks were iterative this overflowed a worker's stack and aborted the process;
/// here the bounds are raised to the protocol's maximum so only the walks are under test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_deeper_than_any_stack_do_not_crash_the_broker() {
    let mut cfg = common::config();
    cfg.mqtt.max_topic_levels = 65536;
    cfg.mqtt.max_topic_length = 65535;
    let _alone = MEASURED.lock().await;
    let r = common::start_with(cfg).await;
    let addr = common::mqtt(&r);
    let mut bystander = Bystander::connect(addr, "deep-by").await;
    let rss_before = rss_kib();

    let topic = deep(30_000);
    let mut attacker = Raw::connect(addr, V::V5, "deep-attacker").await;
    attacker
        .send(&{
            let mut p = pkt::publish(V::V5, topic.as_bytes(), 1, 7, b"boom");
            p[0] |= 0x01; // retain
            p
        })
        .await;
    assert_eq!(attacker.expect(pkt::PUBACK).await.kind(), pkt::PUBACK);
    bystander.assert_served().await;

    // A wide subscription collects the deep retained message.
    let mut wide = Raw::connect(addr, V::V5, "deep-wide").await;
    assert_eq!(wide.subscribe(1, "#", 0).await, 0);
    let got = wide.expect(pkt::PUBLISH).await;
    assert_eq!(got.publish(V::V5).0, topic);
    bystander.assert_served().await;

    // A filter as deep as the topic: subscribed, matched by a live publish, unsubscribed.
    let deep_filter = format!("{}/#", deep(29_999));
    let mut narrow = Raw::connect(addr, V::V5, "deep-narrow").await;
    narrow
        .send(&subscribe_bytes(V::V5, 2, deep_filter.as_bytes(), 0))
        .await;
    let ack = narrow.expect(pkt::SUBACK).await;
    assert_eq!(ack.body.last(), Some(&0));
    // The retained message arrives for the new subscription too.
    assert_eq!(narrow.expect(pkt::PUBLISH).await.publish(V::V5).0, topic);
    attacker
        .send(&pkt::publish(V::V5, topic.as_bytes(), 0, 0, b"live"))
        .await;
    assert_eq!(narrow.expect(pkt::PUBLISH).await.publish(V::V5).2, b"live");
    // `#` also carries the bystander's traffic; the deep message is among it.
    loop {
        let (t, _, body) = wide.expect(pkt::PUBLISH).await.publish(V::V5);
        if body == b"live" {
            assert_eq!(t, topic);
            break;
        }
    }
    // The metrics walk lists every filter, the deep one included.
    assert!(r.broker.router.filters().contains(&deep_filter));
    let (status, _) = common::http_get(r.admin, "/metrics").await;
    assert_eq!(status, 200);
    narrow
        .send(&unsubscribe(V::V5, 3, deep_filter.as_bytes()))
        .await;
    narrow.expect(0x0B).await;
    // Clearing the retained message prunes the 30,000-node chain.
    attacker
        .send(&{
            let mut p = pkt::publish(V::V5, topic.as_bytes(), 0, 0, b"");
            p[0] |= 0x01;
            p
        })
        .await;
    // (`$SYS` figures are retained too: wait for this topic alone.)
    common::wait_until("retained message cleared", || {
        r.broker.retained.stored_size(&topic) == 0
    })
    .await;
    common::assert_serving(addr, &mut bystander).await;

    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!(
        "RSS {} MiB before, grew by {grown_mib} MiB",
        rss_before / 1024
    );
    assert!(grown_mib < 128, "RSS grew by {grown_mib} MiB");
    common::stop(r).await;
}

/// At the default level bound (128) and a length bound of 4096 bytes every entry point refuses
/// an oversize topic with its protocol's code, and a topic right at the bounds is served.
#[tokio::test]
async fn oversize_topics_are_refused_at_every_entry_point() {
    let _alone = MEASURED.lock().await;
    let mut cfg = common::config();
    cfg.mqtt.max_topic_length = 4096;
    let r = common::start_with(cfg).await;
    let addr = common::mqtt(&r);
    let mut bystander = Bystander::connect(addr, "bounds-by").await;
    let too_deep = deep(129);
    let too_long = "x".repeat(4097);
    for v in V::BOTH {
        // At the bounds: accepted.
        let mut ok = Raw::connect(addr, v, &format!("bounds-ok-{v:?}")).await;
        ok.send(&pkt::publish(v, deep(128).as_bytes(), 1, 1, b"fits"))
            .await;
        ok.expect(pkt::PUBACK).await;
        ok.send(&pkt::publish(v, "y".repeat(4096).as_bytes(), 1, 2, b"fits"))
            .await;
        ok.expect(pkt::PUBACK).await;

        // SUBSCRIBE / UNSUBSCRIBE: refused per filter, the connection stays.
        let refused = if v == V::V5 { 0x8F } else { 0x80 };
        for (id, filter) in [(3u16, &too_deep), (4, &too_long)] {
            ok.send(&subscribe_bytes(v, id, filter.as_bytes(), 1)).await;
            assert_eq!(
                ok.expect(pkt::SUBACK).await.body.last(),
                Some(&refused),
                "{v:?}"
            );
        }
        ok.send(&unsubscribe(v, 5, too_deep.as_bytes())).await;
        let unsuback = ok.expect(0x0B).await;
        if v == V::V5 {
            assert_eq!(unsuback.body.last(), Some(&0x8F));
        }
        ok.send(&pkt::pingreq()).await;
        ok.expect(pkt::PINGRESP).await;

        // PUBLISH: v5 DISCONNECT 0x90, 3.1.1 closes.
        for (i, t) in [&too_deep, &too_long].into_iter().enumerate() {
            let mut c = Raw::connect(addr, v, &format!("bounds-pub-{v:?}-{i}")).await;
            c.send(&pkt::publish(v, t.as_bytes(), 1, 1, b"x")).await;
            c.expect_disconnect(0x90).await;
        }

        // Will topic: v5 CONNACK 0x90, 3.1.1 closes without a CONNACK.
        let mut w = Raw::tcp(addr, v).await;
        w.send(&connect_with_will(
            v,
            &format!("bounds-will-{v:?}"),
            too_deep.as_bytes(),
        ))
        .await;
        let seen = w.closed().await;
        if v == V::V5 {
            assert!(
                seen.len() == 1 && seen[0].kind() == pkt::CONNACK && seen[0].reason() == 0x90,
                "{seen:?}"
            );
        } else {
            assert!(seen.is_empty(), "{seen:?}");
        }
        common::assert_serving(addr, &mut bystander).await;
    }
    for (kind, n) in [
        ("publish", 4.0),
        ("subscribe", 4.0),
        ("unsubscribe", 2.0),
        ("will", 2.0),
    ] {
        let label = format!("kind=\"{kind}\"");
        assert_eq!(
            metric(&r, "corvid_topic_refused_total", &[&label]).await,
            n,
            "{kind}"
        );
    }
    assert!(r.broker.sessions.get("bounds-will-V5").is_none());
    common::stop(r).await;
}

/// A flood of maximal-depth publishes and subscriptions from many connections: the broker's
/// memory stays bounded and the bystander keeps its round trips throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_topic_flood_keeps_memory_bounded() {
    let _alone = MEASURED.lock().await;
    let r = common::start().await;
    let addr = common::mqtt(&r);
    let mut bystander = Bystander::connect(addr, "flood-by").await;
    let rss_before = rss_kib();
    for round in 0..20u16 {
        let mut c = Raw::connect(addr, V::V5, &format!("flood-{round}")).await;
        // 128 distinct deep filters per connection, and a retained message at each.
        for i in 0..128u16 {
            let filter = format!("{}/{round}/{i}/#", deep(125));
            c.send(&subscribe_bytes(V::V5, i + 1, filter.as_bytes(), 0))
                .await;
            let topic = format!("{}/{round}/{i}", deep(125));
            c.send(&{
                let mut p = pkt::publish(V::V5, topic.as_bytes(), 0, 0, b"r");
                p[0] |= 0x01;
                p
            })
            .await;
        }
        // Every SUBACK granted; publishes to 200 levels close the connection.
        let mut acks = 0;
        while acks < 128 {
            let p = c.recv().await.expect("flooding client kept");
            if p.kind() == pkt::SUBACK {
                assert_eq!(p.body.last(), Some(&0));
                acks += 1;
            }
        }
        c.send(&pkt::publish(V::V5, deep(200).as_bytes(), 0, 0, b"x"))
            .await;
        c.expect_disconnect(0x90).await;
        bystander.assert_served().await;
    }
    // The broker's own `$SYS` figures are retained too (a handful): not part of the flood.
    common::wait_until("retained flood stored", || {
        r.broker.retained.len() - r.broker.retained.matching("$SYS/#").len() == 20 * 128
    })
    .await;
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!(
        "RSS {} MiB before, grew by {grown_mib} MiB",
        rss_before / 1024
    );
    assert!(grown_mib < 128, "RSS grew by {grown_mib} MiB");
    common::assert_serving(addr, &mut bystander).await;
    common::stop(r).await;
}

/// CONNECT with an optional user name (no password), clean start as given and, for MQTT 5,
/// a session expiry interval.
fn connect_as(v: V, client_id: &str, user: Option<&str>, clean: bool, expiry: u32) -> Vec<u8> {
    let mut b = Vec::new();
    pkt::field(b"MQTT", &mut b);
    let level = if v == V::V5 { 5 } else { 4 };
    let mut flags = if clean { 0x02 } else { 0x00 };
    if user.is_some() {
        flags |= 0x80;
    }
    b.extend_from_slice(&[level, flags, 0, 60]);
    if v == V::V5 {
        let mut props = vec![0x11];
        props.extend_from_slice(&expiry.to_be_bytes());
        pkt::props(&props, &mut b);
    }
    pkt::field(client_id.as_bytes(), &mut b);
    if let Some(u) = user {
        pkt::field(u.as_bytes(), &mut b);
    }
    pkt::frame(0x10, &b)
}

/// Connects with [`connect_as`]; returns the client and its CONNACK (code, session present).
async fn try_connect_as(
    addr: std::net::SocketAddr,
    v: V,
    client_id: &str,
    user: Option<&str>,
    clean: bool,
) -> (Raw, u8, bool) {
    let mut c = Raw::tcp(addr, v).await;
    c.send(&connect_as(v, client_id, user, clean, 300)).await;
    let ack = c.expect(pkt::CONNACK).await;
    (c, ack.reason(), ack.body[0] & 1 == 1)
}

/// `devices/%c/#` must not become `devices/+/#` or `devices/#/#` for a client that names
/// itself `+` or `#` (or `a/b`), in ACL rules and in auto-subscriptions alike.
#[tokio::test]
async fn identities_with_wildcards_never_widen_rules() {
    use corvid_broker::config::{AclAction, AclRule, AclWho, AllClients, AutoSubscription};
    let mut cfg = common::config();
    cfg.acl.no_match = corvid_broker::config::Permission::Deny;
    let all = AclWho::All(AllClients::All);
    cfg.acl.rules = vec![AclRule {
        permission: corvid_broker::config::Permission::Allow,
        who: all.clone(),
        action: AclAction::All,
        topics: vec!["devices/%c/#".into(), "bystander/#".into()],
    }];
    cfg.auto_subscriptions = vec![AutoSubscription {
        topic: "devices/%c/cmd".into(),
        qos: 1,
    }];
    let r = common::start_with(cfg).await;
    let addr = common::mqtt(&r);
    let mut bystander = Bystander::connect(addr, "ids-by").await;
    let mut victim = Raw::connect(addr, V::V5, "d1").await;
    for v in V::BOTH {
        let denied = if v == V::V5 { 0x87 } else { 0x80 };
        for id in ["+", "#", "a/b", "+/#"] {
            let (mut c, code, _) = try_connect_as(addr, v, id, None, true).await;
            assert_eq!(code, 0, "{id:?} connects");
            // No auto-subscription was made from the unsafe identity.
            let session = r.broker.sessions.get(id).expect("session");
            assert!(
                session.state.lock().subscriptions.is_empty(),
                "{id:?} got {:?}",
                session
                    .state
                    .lock()
                    .subscriptions
                    .keys()
                    .collect::<Vec<_>>()
            );
            for (n, filter) in [
                "devices/+/#",
                "devices/#",
                "devices/d1/cmd",
                "devices/+/cmd",
            ]
            .into_iter()
            .enumerate()
            {
                let code = c.subscribe(n as u16 + 1, filter, 1).await;
                assert_eq!(code, denied, "{v:?} {id:?} subscribing {filter}");
            }
            c.send(&pkt::disconnect()).await;
            common::assert_serving(addr, &mut bystander).await;
        }
    }
    // The rule still works for a plain id: d1 got its auto-subscription and reads its commands.
    let d1 = r.broker.sessions.get("d1").expect("d1");
    assert!(d1.state.lock().subscriptions.contains_key("devices/d1/cmd"));
    victim
        .send(&pkt::publish(V::V5, b"devices/d1/cmd", 1, 9, b"go"))
        .await;
    let mut got = false;
    while !got {
        let p = victim.recv().await.expect("victim served");
        if p.kind() == pkt::PUBLISH {
            assert_eq!(p.publish(V::V5).2, b"go");
            got = true;
        }
    }
    common::stop(r).await;
}

/// Another identity reusing a client id is refused (0x87 / 0x05) and the owner keeps its
/// session, its queued message and its live connection.
#[tokio::test]
async fn sessions_belong_to_their_owner() {
    let r = common::start().await;
    let addr = common::mqtt(&r);
    let mut bystander = Bystander::connect(addr, "owner-by").await;
    let mut publisher = Raw::connect(addr, V::V5, "owner-pub").await;
    for v in V::BOTH {
        let id = format!("shared-{v:?}");
        let inbox = format!("inbox/{v:?}");
        let refused = if v == V::V5 { 0x87 } else { 0x05 };
        let (mut alice, code, _) = try_connect_as(addr, v, &id, Some("alice"), false).await;
        assert_eq!(code, 0);
        assert_eq!(alice.subscribe(1, &inbox, 1).await, 1);
        alice.send(&pkt::disconnect()).await;
        let session = r.broker.sessions.get(&id).expect("session kept");
        common::wait_until("alice offline", || {
            session.state.lock().connection.is_none()
        })
        .await;
        publisher
            .send(&pkt::publish(V::V5, inbox.as_bytes(), 1, 1, b"queued"))
            .await;
        publisher.expect(pkt::PUBACK).await;
        common::wait_until("message queued", || session.state.lock().queue.len() == 1).await;

        // Bob, and an anonymous client, with or without clean start: refused, nothing touched.
        for (user, clean) in [(Some("bob"), false), (Some("bob"), true), (None, true)] {
            let (mut c, code, _) = try_connect_as(addr, v, &id, user, clean).await;
            assert_eq!(code, refused, "{v:?} {user:?} clean={clean}");
            assert!(c.closed().await.is_empty());
        }
        assert_eq!(session.state.lock().queue.len(), 1);
        assert!(session
            .state
            .lock()
            .subscriptions
            .contains_key(inbox.as_str()));

        // Alice resumes and gets her message; while she is online, Bob cannot kick her.
        let (mut alice, code, present) = try_connect_as(addr, v, &id, Some("alice"), false).await;
        assert_eq!((code, present), (0, true));
        let p = alice.expect(pkt::PUBLISH).await;
        let (_, pid, body) = p.publish(v);
        assert_eq!(body, b"queued");
        alice.send(&pkt::puback(pid.expect("QoS 1"))).await;
        let (_, code, _) = try_connect_as(addr, v, &id, Some("bob"), false).await;
        assert_eq!(code, refused);
        publisher
            .send(&pkt::publish(V::V5, inbox.as_bytes(), 1, 2, b"live"))
            .await;
        publisher.expect(pkt::PUBACK).await;
        let p = alice.expect(pkt::PUBLISH).await;
        assert_eq!(p.publish(v).2, b"live");
        alice.send(&pkt::disconnect()).await;
        common::assert_serving(addr, &mut bystander).await;
    }
    assert_eq!(
        metric(
            &r,
            "corvid_connections_refused_total",
            &[r#"reason="session_owner""#]
        )
        .await,
        8.0
    );
    common::stop(r).await;
}

/// With `sessions.takeover: any` another identity may resume the session — and then the
/// session's subscriptions are re-authorized against its ACL: what it may not read is removed.
#[tokio::test]
async fn resumed_subscriptions_are_reauthorized() {
    use corvid_broker::config::{AclAction, AclRule, AclWho, AclWhoOne, Permission, Takeover};
    let mut cfg = common::config();
    cfg.sessions.takeover = Takeover::Any;
    cfg.acl.rules = vec![AclRule {
        permission: Permission::Deny,
        who: AclWho::One(AclWhoOne {
            user: Some("bob".into()),
            ..Default::default()
        }),
        action: AclAction::Subscribe,
        topics: vec!["private/#".into()],
    }];
    let r = common::start_with(cfg).await;
    let addr = common::mqtt(&r);
    let (mut alice, _, _) = try_connect_as(addr, V::V5, "handed", Some("alice"), false).await;
    assert_eq!(alice.subscribe(1, "private/alice", 1).await, 1);
    assert_eq!(alice.subscribe(2, "public/news", 1).await, 1);
    alice.send(&pkt::disconnect()).await;
    let session = r.broker.sessions.get("handed").expect("session");
    common::wait_until("alice offline", || {
        session.state.lock().connection.is_none()
    })
    .await;
    let (_bob, code, present) = try_connect_as(addr, V::V5, "handed", Some("bob"), false).await;
    assert_eq!((code, present), (0, true));
    let subs: Vec<String> = session.state.lock().subscription_filters();
    assert_eq!(subs, vec!["public/news".to_string()]);
    assert_eq!(
        metric(&r, "corvid_subscriptions_revoked_total", &[]).await,
        1.0
    );
    common::stop(r).await;
}

/// A TCP connection to `addr` from the loopback source address `src` (any of 127.0.0.0/8).
async fn tcp_from(src: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(format!("{src}:0").parse().expect("source"))
        .expect("bind source");
    common::within("TCP connect", s.connect(addr))
        .await
        .expect("connect")
}

/// PROXY headers are believed only from `proxy_trusted`: a client that reaches the port
/// directly cannot claim another source address; it is closed and counted, and the clients
/// behind the trusted load balancer keep their round trips.
#[tokio::test]
async fn proxy_headers_only_from_trusted_sources() {
    let mut cfg = common::config();
    cfg.listeners.mqtt.proxy_protocol = true;
    cfg.listeners.mqtt.proxy_trusted = vec!["127.0.0.1".into()];
    let r = common::start_with(cfg).await;
    let addr = common::mqtt(&r);
    let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 1883\r\n";

    let mut lb = Raw::over(Box::new(tcp_from("127.0.0.1", addr).await), V::V5);
    lb.send(header).await;
    lb.handshake("behind-lb").await;
    assert_eq!(lb.subscribe(1, "pp/t", 1).await, 1);

    for (n, with_header) in [(1.0, true), (2.0, false)] {
        let mut forger = Raw::over(Box::new(tcp_from("127.0.0.2", addr).await), V::V5);
        if with_header {
            forger.send(header).await;
        }
        forger.send(&pkt::connect(V::V5, "forger")).await;
        assert!(forger.closed().await.is_empty(), "untrusted source served");
        assert_eq!(metric(&r, "corvid_proxy_untrusted_total", &[]).await, n);
    }
    assert!(r.broker.sessions.get("forger").is_none());

    lb.send(&pkt::publish(V::V5, b"pp/t", 1, 2, b"still here"))
        .await;
    let (mut acked, mut got) = (false, false);
    while !(acked && got) {
        let p = lb.recv().await.expect("trusted client served");
        match p.kind() {
            pkt::PUBACK => acked = true,
            pkt::PUBLISH => {
                let (_, id, body) = p.publish(V::V5);
                assert_eq!(body, b"still here");
                lb.send(&pkt::puback(id.expect("QoS 1"))).await;
                got = true;
            }
            other => panic!("unexpected packet {other}"),
        }
    }
    common::stop(r).await;
}

/// Publishing into `$SYS` is refused like an ACL denial (as mosquitto): MQTT 5 gets 0x87,
/// 3.1.1 its usual acknowledgement; nothing reaches `$SYS` subscribers, and a will on a `$SYS`
/// topic is never published.
#[tokio::test]
async fn clients_cannot_publish_into_sys() {
    let mut cfg = common::config();
    cfg.sys.enabled = false;
    let r = common::start_with(cfg).await;
    let addr = common::mqtt(&r);
    let mut bystander = Bystander::connect(addr, "sys-by").await;
    let mut watcher = Raw::connect(addr, V::V5, "sys-watch").await;
    assert_eq!(watcher.subscribe(1, "$SYS/#", 0).await, 0);
    for v in V::BOTH {
        let mut c = Raw::connect(addr, v, &format!("sys-forger-{v:?}")).await;
        c.send(&pkt::publish(
            v,
            b"$SYS/brokers/n1/version",
            1,
            1,
            b"forged",
        ))
        .await;
        let ack = c.expect(pkt::PUBACK).await;
        if v == V::V5 {
            assert_eq!(ack.body.get(2), Some(&0x87), "{ack:?}");
        }
        // A will into $SYS: dropped when the connection is lost.
        let mut w = Raw::tcp(addr, v).await;
        w.send(&connect_with_will(v, &format!("sys-will-{v:?}"), b"$SYS/x"))
            .await;
        w.expect(pkt::CONNACK).await;
        drop(w);
        common::assert_serving(addr, &mut bystander).await;
    }
    // Two publishes and two wills refused; then nothing is queued for the watcher: the answer
    // to its PINGREQ is the next packet it gets.
    let mut refused = 0.0;
    for _ in 0..100 {
        refused = metric(
            &r,
            "corvid_messages_dropped_total",
            &[r#"reason="sys_topic""#],
        )
        .await;
        if refused >= 4.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(refused, 4.0);
    watcher.send(&pkt::pingreq()).await;
    assert_eq!(watcher.expect(pkt::PINGRESP).await.kind(), pkt::PINGRESP);
    common::stop(r).await;
}
