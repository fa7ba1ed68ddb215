//! Flow control instead of loss, over real sockets: publishers feeding a subscriber whose
//! queue is above its high-water mark are slowed (their sockets are not read) rather than the
//! broker dropping messages it already acknowledged; only a subscriber that does not drain
//! within `sessions.congestion_timeout` sheds, counted. Each case also checks that it cannot
//! deadlock (a publisher subscribed to its own topic, shared subscriptions, a subscriber that
//! never reads) and that a bystander keeps its round trips.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use corvid_broker::server::Running;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Messages each publisher sends in the burst.
const BURST: usize = 4000;
/// QoS 1 messages each publisher keeps in flight.
const INFLIGHT: u16 = 100;
/// How long a whole burst may take on a slow, shared machine.
const BURST_DEADLINE: Duration = Duration::from_secs(90);

/// Counters a client's event loop task keeps.
#[derive(Default)]
struct Counts {
    acked: AtomicUsize,
    received: AtomicUsize,
    connected: AtomicUsize,
}

/// A rumqttc 3.1.1 client whose event loop runs in a task, counting PUBACKs and deliveries
/// (it acknowledges QoS 1 deliveries as fast as loopback allows).
async fn client(addr: std::net::SocketAddr, id: &str, inflight: u16) -> (AsyncClient, Arc<Counts>) {
    client_with(addr, id, inflight, true).await
}

/// [`client`] with a choice of clean session (false: a persistent session, which a broker
/// with `persistence.data_dir` stores).
async fn client_with(
    addr: std::net::SocketAddr,
    id: &str,
    inflight: u16,
    clean: bool,
) -> (AsyncClient, Arc<Counts>) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o.set_inflight(inflight);
    let (c, mut ev) = AsyncClient::new(o, 1024);
    let counts = Arc::new(Counts::default());
    let k = counts.clone();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    k.connected.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    k.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    k.received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let kc = counts.clone();
    wait_until(&format!("{id} connected"), || {
        kc.connected.load(Ordering::Relaxed) > 0
    })
    .await;
    (c, counts)
}

/// Starts a broker with a durable store in a fresh directory (kept while the guard lives).
async fn start_durable() -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config();
    cfg.persistence.data_dir = Some(dir.path().to_path_buf());
    (start_with(cfg).await, dir)
}

/// Subscribes and gives the broker a moment to confirm (a bystander round trip orders it).
async fn subscribe(c: &AsyncClient, filter: &str, by: &mut Bystander) {
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // The SUBACK is consumed by the event loop task; a round trip through the broker after
    // it makes sure the SUBSCRIBE was handled (one task per connection, handled in order).
    tokio::time::sleep(Duration::from_millis(50)).await;
    by.assert_served().await;
}

/// Every queue-full drop the broker counted, under any of its reasons.
fn queue_full_drops(r: &Running) -> u64 {
    ["queue_full", "queue_full_or_offline_qos0"]
        .iter()
        .map(|l| {
            r.broker
                .metrics
                .messages_dropped
                .with_label_values(&[l])
                .get()
        })
        .sum()
}

/// Held by each test for its whole run: RSS is measured for the process, so the tests of this
/// file must not run side by side.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's resident set size in bytes (the broker runs in-process).
fn rss() -> u64 {
    common::rss_bytes(None)
}

/// Publishes `n` QoS 1 messages of 64 bytes to `topic` (the client keeps `INFLIGHT` in flight).
fn spawn_publisher(c: AsyncClient, topic: String, n: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..n {
            let mut payload = format!("{i:08}").into_bytes();
            payload.resize(64, b'x');
            c.publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish queued");
        }
    })
}

/// Waits until `what` reaches `want`, with the burst deadline.
async fn wait_count(what: &str, counter: &AtomicUsize, want: usize) {
    let t0 = Instant::now();
    while counter.load(Ordering::Relaxed) < want {
        assert!(
            t0.elapsed() < BURST_DEADLINE,
            "{what}: {} of {want} after {BURST_DEADLINE:?}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The burst: two publishers with 100 in flight each send 4,000 QoS 1 messages to two
/// subscribers reading as fast as loopback allows. Default settings; nothing may be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_is_delivered_without_loss_at_default_settings() {
    let _serial = SERIAL.lock().await;
    let r = start().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let rss0 = rss();
    let mut subs = Vec::new();
    for i in 0..2 {
        let (c, k) = client(a, &format!("sub{i}"), 100).await;
        subscribe(&c, &format!("burst/{i}"), &mut by).await;
        subs.push((c, k));
    }
    let mut pubs = Vec::new();
    for i in 0..2 {
        let (c, k) = client(a, &format!("pub{i}"), INFLIGHT).await;
        spawn_publisher(c.clone(), format!("burst/{i}"), BURST);
        pubs.push((c, k));
    }
    by.assert_served().await;
    for (i, (_, k)) in pubs.iter().enumerate() {
        wait_count(&format!("PUBACKs of pub{i}"), &k.acked, BURST).await;
    }
    for (i, (_, k)) in subs.iter().enumerate() {
        wait_count(&format!("deliveries to sub{i}"), &k.received, BURST).await;
    }
    by.assert_served().await;
    assert_eq!(
        queue_full_drops(&r),
        0,
        "acknowledged messages were dropped"
    );
    let grown = rss().saturating_sub(rss0);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
    stop(r).await;
}

/// Two publishers into one subscriber (fan-in) and one publisher into two subscribers of the
/// same topic (fan-out): every delivery arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_and_fan_out_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let r = start().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let (s0, k0) = client(a, "in-sub", 100).await;
    subscribe(&s0, "fanin/#", &mut by).await;
    let (s1, k1) = client(a, "out-sub1", 100).await;
    subscribe(&s1, "fanout/t", &mut by).await;
    let (s2, k2) = client(a, "out-sub2", 100).await;
    subscribe(&s2, "fanout/t", &mut by).await;
    for (id, topic) in [
        ("in-a", "fanin/a"),
        ("in-b", "fanin/b"),
        ("out", "fanout/t"),
    ] {
        let (c, _) = client(a, id, INFLIGHT).await;
        spawn_publisher(c, topic.into(), 3000);
    }
    wait_count("fan-in deliveries", &k0.received, 6000).await;
    wait_count("fan-out deliveries 1", &k1.received, 3000).await;
    wait_count("fan-out deliveries 2", &k2.received, 3000).await;
    by.assert_served().await;
    assert_eq!(queue_full_drops(&r), 0);
    drop((s0, s1, s2));
    stop(r).await;
}

/// A publisher subscribed to its own topic must not wait for itself: its own queue drains only
/// while its socket is read (PUBACKs from it free its inflight window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_subscribed_to_itself_does_not_deadlock() {
    let _serial = SERIAL.lock().await;
    let r = start().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let (c, k) = client(a, "echo", INFLIGHT).await;
    subscribe(&c, "echo/t", &mut by).await;
    spawn_publisher(c.clone(), "echo/t".into(), 3000);
    wait_count("echo PUBACKs", &k.acked, 3000).await;
    wait_count("echo deliveries", &k.received, 3000).await;
    by.assert_served().await;
    stop(r).await;
}

/// The same with a durable store and a persistent session: every PUBACK then also waits for
/// the store, and acks held that way stop reading only until the store catches up, never for
/// the client's own congestion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_subscribed_to_itself_does_not_deadlock_with_a_durable_store() {
    let _serial = SERIAL.lock().await;
    let (r, _dir) = start_durable().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let (c, k) = client_with(a, "echo", INFLIGHT, false).await;
    subscribe(&c, "echo/t", &mut by).await;
    spawn_publisher(c.clone(), "echo/t".into(), 3000);
    wait_count("echo PUBACKs", &k.acked, 3000).await;
    wait_count("echo deliveries", &k.received, 3000).await;
    by.assert_served().await;
    let store = r.broker.durable.as_ref().expect("durable store").store();
    assert!(
        store.durable() >= 3000,
        "every message went through the store: {} marks durable",
        store.durable()
    );
    stop(r).await;
}

/// Ten publishers with 100 in flight each into ten persistent subscribers on a durable store:
/// every PUBACK waits for a commit, so marks become durable while connections decide whether to
/// read or wait; every publisher must get all its PUBACKs. (An ack whose mark turned durable
/// between those two looks was once held with nothing left to wake its connection: the release
/// benchmark hung in one run of four. The race is narrow and this test did not catch it in four
/// debug runs against the old code; it guards the load pattern, not that exact interleaving.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_acks_reach_every_publisher_under_load() {
    let _serial = SERIAL.lock().await;
    let (r, _dir) = start_durable().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    const PAIRS: usize = 10;
    const EACH: usize = 2000;
    let mut subs = Vec::new();
    for i in 0..PAIRS {
        let (c, k) = client_with(a, &format!("dsub{i}"), 100, false).await;
        subscribe(&c, &format!("durable/{i}"), &mut by).await;
        subs.push((c, k));
    }
    let mut pubs = Vec::new();
    for i in 0..PAIRS {
        let (c, k) = client(a, &format!("dpub{i}"), INFLIGHT).await;
        spawn_publisher(c.clone(), format!("durable/{i}"), EACH);
        pubs.push((c, k));
    }
    for (i, (_, k)) in pubs.iter().enumerate() {
        wait_count(&format!("PUBACKs of dpub{i}"), &k.acked, EACH).await;
    }
    for (i, (_, k)) in subs.iter().enumerate() {
        wait_count(&format!("deliveries to dsub{i}"), &k.received, EACH).await;
    }
    by.assert_served().await;
    stop(r).await;
}

/// A 3.1.1 client has no receive maximum to respect: one that writes 20,000 QoS 1 PUBLISHes
/// without waiting for a single PUBACK, to a broker whose every PUBACK waits for the store, is
/// read only as fast as its acknowledgements become durable (the broker holds at most
/// `V3_ACK_WINDOW` of them before it stops reading), gets
/// every PUBACK in the order it published, and loses nothing on the way to a persistent
/// subscriber; a bystander keeps its round trips and the process does not balloon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_client_that_never_waits_gets_every_ack_from_a_durable_store() {
    let _serial = SERIAL.lock().await;
    let (r, _dir) = start_durable().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let (sub, k) = client_with(a, "flood-sub", 100, false).await;
    subscribe(&sub, "flood/t", &mut by).await;
    let rss0 = rss();
    const N: u16 = 20_000;
    let mut flood = Vec::with_capacity(usize::from(N) * 80);
    for id in 1..=N {
        let mut payload = format!("{id:08}").into_bytes();
        payload.resize(64, b'x');
        flood.extend_from_slice(&pkt::publish(V::V311, b"flood/t", 1, id, &payload));
    }
    let mut publ = Raw::connect(a, V::V311, "flood-pub").await;
    // All of it at once: the broker's PUBACKs (4 bytes each) fit the socket's buffers, so the
    // write completes as fast as the broker reads.
    publ.send(&flood).await;
    by.assert_served().await;
    for want in 1..=N {
        let ack = publ.expect(pkt::PUBACK).await;
        let got = u16::from_be_bytes([ack.body[0], ack.body[1]]);
        assert_eq!(got, want, "PUBACKs in publish order [MQTT-4.6.0-2]");
    }
    wait_count("deliveries to flood-sub", &k.received, usize::from(N)).await;
    by.assert_served().await;
    let store = r.broker.durable.as_ref().expect("durable store").store();
    assert!(
        store.durable() >= u64::from(N),
        "{} marks durable",
        store.durable()
    );
    let grown = rss().saturating_sub(rss0);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
    stop(r).await;
}

/// Shared subscriptions: a group of two members gets every message exactly once in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_group_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let r = start().await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let (m1, k1) = client(a, "member1", 100).await;
    subscribe(&m1, "$share/g/shared/t", &mut by).await;
    let (m2, k2) = client(a, "member2", 100).await;
    subscribe(&m2, "$share/g/shared/t", &mut by).await;
    for id in ["sp1", "sp2"] {
        let (c, _) = client(a, id, INFLIGHT).await;
        spawn_publisher(c, "shared/t".into(), 3000);
    }
    let t0 = Instant::now();
    while k1.received.load(Ordering::Relaxed) + k2.received.load(Ordering::Relaxed) < 6000 {
        assert!(
            t0.elapsed() < BURST_DEADLINE,
            "shared deliveries incomplete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    by.assert_served().await;
    assert_eq!(queue_full_drops(&r), 0);
    drop((m1, m2));
    stop(r).await;
}

/// A subscriber that never reads holds publishers back at most `congestion_timeout`; after that
/// only it sheds (counted), while a healthy subscriber of the same topic gets everything and a
/// bystander keeps its round trips. Memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_subscriber_sheds_alone_after_the_congestion_timeout() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.sessions.congestion_timeout = 1;
    let r = start_with(cfg).await;
    let a = mqtt(&r);
    let mut by = Bystander::connect(a, "bystander").await;
    let rss0 = rss();
    // Subscribes at QoS 1, then never reads again (its socket buffers fill up).
    let mut stuck = Raw::connect(a, V::V311, "stuck").await;
    assert_eq!(stuck.subscribe(1, "shed/t", 1).await, 1);
    let (healthy, hk) = client(a, "healthy", 100).await;
    subscribe(&healthy, "shed/t", &mut by).await;
    let (p, pk) = client(a, "shed-pub", INFLIGHT).await;
    let n = 5000;
    let big = vec![b'y'; 1024];
    let pc = p.clone();
    let t0 = Instant::now();
    tokio::spawn(async move {
        for _ in 0..n {
            pc.publish("shed/t", QoS::AtLeastOnce, false, big.clone())
                .await
                .expect("publish queued");
        }
    });
    wait_count("PUBACKs with a stuck subscriber", &pk.acked, n).await;
    wait_count("deliveries to the healthy subscriber", &hk.received, n).await;
    let took = t0.elapsed();
    by.assert_served().await;
    assert!(
        queue_full_drops(&r) > 0,
        "the stuck subscriber did not shed"
    );
    // Held back at most a few drain timeouts (one per episode), not until the deadline.
    assert!(
        took < Duration::from_secs(30),
        "publisher slowed for {took:?}"
    );
    let grown = rss().saturating_sub(rss0);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
    drop(stuck);
    stop(r).await;
}
