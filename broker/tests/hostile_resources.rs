//! Hostile clients against the broker's resource bounds, over real sockets: a client that
//! subscribes and then never reads is let go after `mqtt.write_timeout` with its session
//! kept, and nothing else (kicks, shutdown, other clients) waits for its blocked writes. Each
//! case keeps a bystander's round trips going and the process's memory bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use corvid_broker::server::Running;
use corvid_broker::session::Kick;

/// This process's resident set size in bytes (the broker runs in-process).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
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
