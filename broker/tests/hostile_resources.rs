//! Hostile clients against the broker's resource bounds, over real sockets: a client that
//! subscribes and then never reads is let go after `mqtt.write_timeout` with its session
//! kept, and nothing else (kicks, shutdown, other clients) waits for its blocked writes. Each
//! case keeps a bystander's round trips going and the process's memory bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use corvid_broker::server::Running;
use corvid_broker::session::Kick;

/// Held by each test for its whole run: RSS is measured for the process, so the tests of this
/// file must not run side by side.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's resident set size in bytes (the broker runs in-process).
fn rss() -> u64 {
    common::rss_bytes(None)
}

/// The largest growth of RSS over `rss0` seen during `window` (sampled every 50 ms).
async fn peak_rss_growth(rss0: u64, window: Duration) -> u64 {
    let t0 = Instant::now();
    let mut peak = 0;
    while t0.elapsed() < window {
        peak = peak.max(rss().saturating_sub(rss0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak
}

/// An MQTT 5 client with a 300 s session that subscribes to `filter` at QoS 0 and then never
/// reads its socket again.
async fn never_reading_subscriber(addr: std::net::SocketAddr, id: &str, filter: &str) -> Raw {
    let mut raw = Raw::tcp(addr, V::V5).await;
    // Session expiry interval 300 s: the session outlives the connection.
    raw.send(&pkt::connect_with(
        V::V5,
        id.as_bytes(),
        &[0x11, 0, 0, 1, 0x2c],
    ))
    .await;
    assert_eq!(raw.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(raw.subscribe(1, filter, 0).await, 0);
    raw
}

/// Publishes 16 KiB QoS 0 messages to `topic` until `done` holds (or the deadline passes),
/// checking that `bystander` keeps its round trips meanwhile.
async fn flood_until(
    addr: std::net::SocketAddr,
    topic: &str,
    bystander: &mut Bystander,
    mut done: impl FnMut() -> bool,
) {
    let mut publisher = Raw::connect(addr, V::V311, "flooder").await;
    let msg = pkt::publish(V::V311, topic.as_bytes(), 0, 0, &vec![b'z'; 16 * 1024]);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while !done() {
        assert!(
            t0.elapsed() < DEADLINE * 3,
            "condition not reached while flooding"
        );
        for _ in 0..64 {
            publisher.send(&msg).await;
        }
        sent += 64;
        if sent % 1024 == 0 {
            bystander.assert_served().await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether `id`'s session exists and has no connection.
fn offline(r: &Running, id: &str) -> bool {
    r.broker
        .sessions
        .get(id)
        .is_some_and(|s| s.state.lock().connection.is_none())
}

/// A client that stops reading is disconnected after the write deadline; its session stays
/// (per its expiry); the bystander keeps its round trips; memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go_after_the_write_timeout() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.mqtt.write_timeout = 2;
    cfg.sessions.congestion_timeout = 1;
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let rss0 = rss();
    let stuck = never_reading_subscriber(a, "stuck", "flood/#").await;
    let t0 = Instant::now();
    let broker = r.broker.clone();
    flood_until(a, "flood/t", &mut by, || {
        broker.metrics.write_timeouts.get() >= 1
    })
    .await;
    let took = t0.elapsed();
    wait_until("the stuck client's session goes offline", || {
        offline(&r, "stuck")
    })
    .await;
    assert!(
        r.broker.sessions.get("stuck").is_some(),
        "the session must be kept per its expiry"
    );
    assert_serving(a, &mut by).await;
    let grown = rss().saturating_sub(rss0);
    assert!(grown < 96 << 20, "RSS grew by {} MiB", grown >> 20);
    assert!(took < DEADLINE * 2, "write timeout took {took:?}");
    drop(stuck);
    stop(r).await;
}

/// With the default (long) write deadline, a kick and a shutdown do not wait for a client
/// whose writes are blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_and_shutdown_do_not_wait_for_a_blocked_writer() {
    let _serial = SERIAL.lock().await;
    let r = start().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let stuck = never_reading_subscriber(a, "blocked", "block/#").await;
    let session = r.broker.sessions.get("blocked").expect("session");
    // Flood until the session's queue backs up: its writer is blocked on a full socket.
    let s = session.clone();
    flood_until(a, "block/t", &mut by, || s.state.lock().queue.len() > 100).await;
    let kick = session
        .state
        .lock()
        .connection
        .as_ref()
        .map(|c| c.kick.clone())
        .expect("online");
    let t0 = Instant::now();
    kick.send(Kick::Administrative);
    wait_until("the kicked session goes offline", || offline(&r, "blocked")).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "kick waited {:?}",
        t0.elapsed()
    );
    assert_serving(a, &mut by).await;
    // Again, for shutdown: a second blocked client must not hold it up.
    let stuck2 = never_reading_subscriber(a, "blocked2", "block/#").await;
    let s2 = r.broker.sessions.get("blocked2").expect("session");
    flood_until(a, "block/t", &mut by, || s2.state.lock().queue.len() > 100).await;
    let t0 = Instant::now();
    stop(r).await;
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "shutdown waited {:?}",
        t0.elapsed()
    );
    drop((stuck, stuck2));
}

/// Opens a WebSocket on `addr` (hand-made upgrade) and starts a binary frame announcing
/// `len` bytes that it never finishes; returns the stream.
async fn unfinished_ws_frame(addr: std::net::SocketAddr, len: u64) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("ws connect");
    let req = "GET /mqtt HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
               Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    s.write_all(req.as_bytes()).await.expect("upgrade request");
    let mut head = Vec::new();
    within("WebSocket upgrade answer", async {
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut b).await.expect("read"),
                1,
                "closed during upgrade"
            );
            head.push(b[0]);
        }
    })
    .await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // FIN + binary, masked, 64-bit length, mask key 0.
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&frame).await.expect("frame header");
    s
}

/// Streams up to `total` bytes into `s` (stopping when the peer closes); returns how many
/// bytes were accepted.
async fn stream_into(s: &mut tokio::net::TcpStream, total: usize) -> usize {
    use tokio::io::AsyncWriteExt;
    let chunk = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    sent
}

/// Eight WebSocket connections each streaming an unfinished 12 MiB frame: the broker refuses
/// frames larger than `mqtt.max_packet_size` instead of buffering them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_websocket_frames_are_bounded_by_the_packet_size() {
    let _serial = SERIAL.lock().await;
    let r = start().await;
    let ws = r.addr("ws").expect("ws listener");
    let mut by = Bystander::connect(mqtt(&r), "bystander").await;
    let rss0 = rss();
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(unfinished_ws_frame(ws, 12 << 20).await);
    }
    let mut accepted = 0;
    for c in &mut conns {
        accepted += stream_into(c, 12 << 20).await;
        by.assert_served().await;
    }
    let grown = rss().saturating_sub(rss0);
    eprintln!(
        "8 unfinished 12 MiB WebSocket frames: {} MiB written, RSS grew {} MiB",
        accepted >> 20,
        grown >> 20
    );
    assert!(grown < 24 << 20, "RSS grew by {} MiB", grown >> 20);
    assert_serving(mqtt(&r), &mut by).await;
    drop(conns);
    stop(r).await;
}

/// `limits.max_connections_per_ip`: one address cannot hold more connections than that; a
/// freed slot can be used again; the bystander keeps its round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.limits.max_connections_per_ip = 4;
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(Raw::connect(a, V::V5, &format!("c{i}")).await);
    }
    let mut over = Raw::tcp(a, V::V5).await;
    over.send(&pkt::connect(V::V5, "over")).await;
    assert!(
        over.closed().await.is_empty(),
        "the fifth connection was served"
    );
    let refused = r
        .broker
        .metrics
        .connections_refused
        .with_label_values(&["max_connections_per_ip"])
        .get();
    assert_eq!(refused, 1);
    by.assert_served().await;
    drop(clients.pop());
    let b = r.broker.clone();
    wait_until("the freed slot is usable", || {
        b.sessions.get("c2").is_none()
    })
    .await;
    let _again = Raw::connect(a, V::V5, "again").await;
    by.assert_served().await;
    stop(r).await;
}

/// `limits.max_sessions`: a CONNECT that would create one session too many is refused (MQTT
/// 5: 0x89), an existing session can still reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_capped() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.limits.max_sessions = 3;
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let s1 = Raw::connect(a, V::V5, "s1").await;
    let _s2 = Raw::connect(a, V::V5, "s2").await;
    let mut over = Raw::tcp(a, V::V5).await;
    over.send(&pkt::connect(V::V5, "s3")).await;
    assert_eq!(over.expect(pkt::CONNACK).await.reason(), 0x89);
    let refused = r
        .broker
        .metrics
        .connections_refused
        .with_label_values(&["max_sessions"])
        .get();
    assert_eq!(refused, 1);
    // s1 takes its own session over: no new session, so not refused.
    let _s1_again = Raw::connect(a, V::V5, "s1").await;
    drop(s1);
    by.assert_served().await;
    assert!(r.broker.sessions.len() <= 3);
    stop(r).await;
}

/// `limits.max_retained`: retained messages to new topics beyond the limit are delivered
/// but not retained (counted); replacing an existing one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_capped() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.limits.max_retained = 3;
    cfg.sys.enabled = false; // only this test's retained messages in the store
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let mut p = Raw::connect(a, V::V311, "retainer").await;
    let retained = |topic: &str, body: &[u8]| {
        let mut b = Vec::new();
        pkt::field(topic.as_bytes(), &mut b);
        b.extend_from_slice(body);
        pkt::frame(0x31, &b)
    };
    for i in 0..6 {
        p.send(&retained(&format!("keep/{i}"), b"v1")).await;
    }
    p.send(&retained("keep/0", b"v2")).await;
    // A round trip orders the publishes before the checks.
    by.assert_served().await;
    let b = r.broker.clone();
    wait_until("retained publishes handled", || {
        b.metrics
            .messages_dropped
            .with_label_values(&["retained_limit"])
            .get()
            == 3
    })
    .await;
    assert_eq!(r.broker.retained.len(), 3);
    let kept = r.broker.retained.matching("keep/0");
    assert_eq!(&kept[0].payload[..], b"v2");
    stop(r).await;
}

/// A 3.1.1 CONNECT with a user name and password, sent over a connection from `src`.
async fn connect_as(addr: std::net::SocketAddr, src: &str, id: &str, user: &str, pw: &str) -> u8 {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{src}:0").parse().expect("src"))
        .expect("bind source address");
    let stream = sock.connect(addr).await.expect("connect");
    let mut raw = Raw::over(Box::new(stream), V::V311);
    let mut b = Vec::new();
    pkt::field(b"MQTT", &mut b);
    b.extend_from_slice(&[4, 0xC2, 0, 60]);
    pkt::field(id.as_bytes(), &mut b);
    pkt::field(user.as_bytes(), &mut b);
    pkt::field(pw.as_bytes(), &mut b);
    raw.send(&pkt::frame(0x10, &b)).await;
    raw.expect(pkt::CONNACK).await.reason()
}

/// `limits.max_auth_failures_per_minute`: after that many wrong passwords from one address,
/// even the right one is refused from it (without hashing); other addresses are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_is_cut_off_per_address() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("users");
    let hash = corvid_broker::auth::users::hash_password(b"right").expect("hash");
    std::fs::write(&path, format!("ann:{hash}\n")).expect("users file");
    let mut cfg = config();
    cfg.auth.allow_anonymous = false;
    cfg.auth.users_file = Some(path);
    cfg.limits.max_auth_failures_per_minute = 5;
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    assert_eq!(connect_as(a, "127.0.0.2", "ok", "ann", "right").await, 0);
    for i in 0..5 {
        let rc = connect_as(a, "127.0.0.3", &format!("guess{i}"), "ann", "wrong").await;
        assert_eq!(rc, 4, "guess {i}");
    }
    assert_eq!(connect_as(a, "127.0.0.3", "late", "ann", "right").await, 4);
    let limited = r
        .broker
        .metrics
        .connections_refused
        .with_label_values(&["auth_rate_limited"])
        .get();
    assert_eq!(limited, 1);
    // Another address still gets in.
    assert_eq!(connect_as(a, "127.0.0.2", "ok2", "ann", "right").await, 0);
    stop(r).await;
}

/// Before CONNECT, an anonymous peer cannot make the broker buffer more than
/// `mqtt.max_connect_size`: 32 connections each announcing and streaming a 1 MiB CONNECT are
/// closed at the header; a normal client still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_huge_connects_are_bounded_before_authentication() {
    let _serial = SERIAL.lock().await;
    use tokio::io::AsyncWriteExt;
    let r = start().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let rss0 = rss();
    let mut conns = Vec::new();
    for _ in 0..32 {
        let mut s = tokio::net::TcpStream::connect(a).await.expect("connect");
        let mut head = vec![0x10];
        pkt::varint((1 << 20) - 16, &mut head);
        // A valid start (protocol name, level, flags, keep alive) so only the size can stop it.
        head.extend_from_slice(b"\x00\x04MQTT\x04\x02\x00\x3c");
        s.write_all(&head).await.expect("header");
        conns.push(s);
    }
    let mut accepted = 0;
    for s in &mut conns {
        accepted += stream_into(s, 1 << 20).await;
    }
    by.assert_served().await;
    // The broker may still be reading what the kernel buffered: watch the peak for a while.
    let grown = peak_rss_growth(rss0, Duration::from_millis(1500)).await;
    eprintln!(
        "32 unfinished 1 MiB CONNECTs: {} KiB written, RSS grew {} MiB",
        accepted >> 10,
        grown >> 20
    );
    assert!(grown < 16 << 20, "RSS grew by {} MiB", grown >> 20);
    // Refused at the header, long before the connect timeout (10 s) would end them.
    for s in &mut conns {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an oversized CONNECT was not refused at its header: {r:?}"
        );
    }
    assert_serving(a, &mut by).await;
    drop(conns);
    stop(r).await;
}

/// `limits.max_retained_bytes`: a retained message that would go beyond it is not kept; a
/// smaller replacement is, and the byte count follows replacements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_bytes_are_capped() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.limits.max_retained_bytes = 100;
    cfg.sys.enabled = false; // only this test's retained messages in the store
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let mut p = Raw::connect(a, V::V311, "retainer").await;
    let retained = |topic: &str, n: usize| {
        let mut b = Vec::new();
        pkt::field(topic.as_bytes(), &mut b);
        b.extend_from_slice(&vec![b'r'; n]);
        pkt::frame(0x31, &b)
    };
    p.send(&retained("b/1", 60)).await; // 63 bytes: kept
    p.send(&retained("b/2", 60)).await; // 126 in all: refused
    p.send(&retained("b/1", 30)).await; // replaced: 33
    p.send(&retained("b/2", 30)).await; // 66 in all: kept
    by.assert_served().await;
    let b = r.broker.clone();
    wait_until("retained publishes handled", || b.retained.len() == 2).await;
    assert_eq!(r.broker.retained.bytes(), 66);
    let refused = r
        .broker
        .metrics
        .messages_dropped
        .with_label_values(&["retained_limit"])
        .get();
    assert_eq!(refused, 1);
    stop(r).await;
}

/// The Topic Alias property (0x23) of a PUBLISH's MQTT 5 property block, if present.
fn alias_of(p: &Packet) -> Option<u16> {
    let b = &p.body;
    let topic_len = usize::from(u16::from_be_bytes([b[0], b[1]]));
    let mut i = 2 + topic_len + if p.header & 0x06 != 0 { 2 } else { 0 };
    let (mut len, mut mult) = (0usize, 1usize);
    while b[i] & 0x80 != 0 {
        len += usize::from(b[i] & 0x7f) * mult;
        mult *= 128;
        i += 1;
    }
    len += usize::from(b[i] & 0x7f) * mult;
    i += 1;
    let props = &b[i..i + len];
    let mut j = 0;
    while j < props.len() {
        match props[j] {
            0x23 => return Some(u16::from_be_bytes([props[j + 1], props[j + 2]])),
            0x01 => j += 2,
            0x02 => j += 5,
            0x0B => {
                j += 1;
                while props[j] & 0x80 != 0 {
                    j += 1;
                }
                j += 1;
            }
            other => panic!("unexpected PUBLISH property {other:#x}"),
        }
    }
    None
}

/// A subscriber that allows the largest Topic Alias Maximum (65535) and receives messages on
/// hundreds of topics gets aliases only up to the broker's own cap (`mqtt.topic_alias_maximum`),
/// each first sent with its topic, and every aliased PUBLISH names a topic it was sent before.
#[tokio::test]
async fn outbound_topic_aliases_are_capped_and_consistent() {
    let _serial = SERIAL.lock().await;
    let r = start().await;
    let addr = mqtt(&r);
    let cap = r.broker.config.mqtt.topic_alias_maximum;
    let mut bystander = Bystander::connect(addr, "alias-bystander").await;
    let mut sub = Raw::tcp(addr, V::V5).await;
    // Topic Alias Maximum 65535: the client would take as many aliases as the broker hands out.
    sub.send(&pkt::connect_with(V::V5, b"alias-sub", &[0x22, 0xff, 0xff]))
        .await;
    assert_eq!(sub.expect(pkt::CONNACK).await.reason(), 0);
    assert_eq!(sub.subscribe(1, "alias/#", 0).await, 0);
    let mut publisher = Raw::connect(addr, V::V5, "alias-pub").await;
    const TOPICS: u16 = 300;
    for n in 0..TOPICS {
        let topic = format!("alias/{n}");
        publisher
            .send(&pkt::publish(V::V5, topic.as_bytes(), 0, 0, b"x"))
            .await;
    }
    let mut known: std::collections::HashMap<u16, String> = std::collections::HashMap::new();
    for _ in 0..TOPICS {
        let p = sub.expect(pkt::PUBLISH).await;
        let (topic, _, _) = p.publish(V::V5);
        match alias_of(&p) {
            Some(a) => {
                assert!(
                    (1..=cap).contains(&a),
                    "alias {a} outside 1..={cap} for {topic:?}"
                );
                if topic.is_empty() {
                    assert!(known.contains_key(&a), "alias {a} used before it was set");
                } else {
                    known.insert(a, topic);
                }
            }
            None => assert!(!topic.is_empty(), "a PUBLISH with neither topic nor alias"),
        }
    }
    assert!(known.len() <= usize::from(cap), "{} aliases", known.len());
    bystander.assert_served().await;
    stop(r).await;
}

/// A client that stops midway through a packet (keep alive 0, so keep alive never ends it) is
/// closed after `mqtt.packet_timeout` (MQTT 5: DISCONNECT 0x82 first), while a client that sends
/// a packet slowly but steadily, for longer than the timeout in all, is served; a bystander
/// keeps its round trips throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_that_stalls_midway_is_closed_after_the_packet_timeout() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.mqtt.packet_timeout = 1;
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    for v in [V::V311, V::V5] {
        let mut raw = Raw::tcp(a, v).await;
        let mut connect = pkt::connect(v, &format!("stall-{v:?}"));
        assert_eq!(
            &connect[10..12],
            &[0, 60],
            "keep alive bytes of the CONNECT"
        );
        connect[10..12].copy_from_slice(&[0, 0]);
        raw.send(&connect).await;
        assert_eq!(raw.expect(pkt::CONNACK).await.reason(), 0);
        let publish = pkt::publish(v, b"stall/t", 1, 1, &[b'x'; 1000]);
        raw.send(&publish[..20]).await;
        let t0 = Instant::now();
        raw.expect_disconnect(0x82).await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{v:?}: closed after {took:?}"
        );
        assert_serving(a, &mut by).await;
    }
    // The same packet in ten pieces 300 ms apart: three seconds in all, never a second idle.
    let mut slow = Raw::connect(a, V::V311, "slow").await;
    let publish = pkt::publish(V::V311, b"slow/t", 1, 7, &[b'y'; 1000]);
    for piece in publish.chunks(publish.len() / 10 + 1) {
        slow.send(piece).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    slow.expect(pkt::PUBACK).await;
    assert_serving(a, &mut by).await;
    stop(r).await;
}
