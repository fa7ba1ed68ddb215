//! Hostile connections to the cluster port of a real `corvid-broker` process.
//!
//! Unauthenticated: frames larger than a handshake are refused before authentication, and
//! handshakes in progress are capped (8 per source address), so ten connections announcing
//! 64 MiB frames do not grow the node's memory; its MQTT clients keep their round trips.
//!
//! Authenticated (a compromised or buggy node that holds the cluster secret): deliveries it
//! forwards for sessions that never arrive are held within their bounds (64 MiB of topic and
//! payload in all) and the rest dropped and counted, so naming ever-new client ids does not
//! grow the node without bound; forward keys at the edge of their range, acknowledgements of
//! nothing, bogus routes, takeover requests it cannot be answered on and frame kinds from the
//! future leave the node serving its clients and its metrics.

mod cluster_util;
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_util::*;
use corvid_broker::cluster::channel::{self, Channel};
use corvid_broker::cluster::proto::{self, Frame, WireDelivery, WireMsg};
use corvid_broker::cluster::secret::Secret;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Resident set size of process `pid` in bytes.
fn rss_of(pid: u32) -> u64 {
    common::rss_bytes(Some(pid))
}

/// Starts node "solo" under `dir`, alone in its cluster (its one static peer never answers),
/// and connects a bystander client to it once it listens.
async fn solo_with_bystander(dir: &std::path::Path) -> (Node, common::Bystander) {
    let lo = [Ipv4Addr::LOCALHOST];
    let node = Node::start(
        dir,
        NodeSpec {
            name: "solo".into(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mqtt: free_port(&lo),
            admin: free_port(&lo),
            cluster: free_port(&lo),
            // A peer that never answers: static discovery needs one.
            discover: Discover::Static(vec![format!("127.0.0.1:{}", free_port(&lo))]),
            secret: SECRET.into(),
            wrapper: vec![],
            cluster_extra: String::new(),
        },
    );
    let mqtt = node.mqtt_addr();
    let by = within("bystander connects", DEADLINE, async {
        loop {
            if tokio::net::TcpStream::connect(mqtt).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        common::Bystander::connect(mqtt, "bystander").await
    })
    .await;
    (node, by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_64_mib_frames_do_not_grow_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, mut by) = solo_with_bystander(dir.path()).await;
    let pid = node.pid().expect("pid");
    let cluster_addr = (Ipv4Addr::LOCALHOST, node.spec.cluster);
    let rss0 = rss_of(pid);
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut s = tokio::net::TcpStream::connect(cluster_addr)
            .await
            .expect("cluster port");
        // A length prefix of 64 MiB, then as much of the frame as the node takes.
        s.write_all(&(64u32 << 20).to_be_bytes())
            .await
            .expect("len");
        conns.push(s);
    }
    let chunk = vec![0u8; 256 * 1024];
    let mut accepted = 0usize;
    for s in &mut conns {
        for _ in 0..96 {
            match tokio::time::timeout(Duration::from_secs(1), s.write_all(&chunk)).await {
                Ok(Ok(())) => accepted += chunk.len(),
                _ => break,
            }
        }
        by.assert_served().await;
    }
    let grown = rss_of(pid).saturating_sub(rss0);
    eprintln!(
        "10 unauthenticated 64 MiB frames: {} MiB written, node RSS grew {} MiB",
        accepted >> 20,
        grown >> 20
    );
    assert!(grown < 16 << 20, "node RSS grew by {} MiB", grown >> 20);
    by.assert_served().await;
    drop(conns);

    // Idle connections that never start a handshake: at most 8 from one address are held
    // (until the 5 s handshake deadline); the rest are closed at once and counted.
    let per_ip = "corvid_cluster_refused_peers_total{reason=\"per_ip_limit\"}";
    let before = node.metric(per_ip).await.expect("metrics");
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(
            tokio::net::TcpStream::connect(cluster_addr)
                .await
                .expect("cluster port"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = node.metric(per_ip).await.expect("metrics");
    assert!(
        after - before >= 4.0,
        "{per_ip} {before} -> {after} after 12 idle connections from one address"
    );
    by.assert_served().await;
    drop(idle);
    drop(node);
}

/// The bytes of `frame` as a peer sends them.
fn enc(frame: &Frame) -> Vec<u8> {
    proto::encode(frame).expect("encode frame")
}

/// A QoS 1 message from the hostile peer on `topic`.
fn wire_msg(id: u64, topic: &str, payload: Bytes) -> WireMsg {
    WireMsg {
        id,
        topic: topic.into(),
        payload,
        qos: 1,
        retain: false,
        properties: None,
        publisher: "hostile-peer".into(),
        expires_in_ms: None,
    }
}

/// A frame whose processing the node counts in `corvid_cluster_invalid_total{kind="publish"}`
/// (a topic name with a wildcard): sent after others on the same link, once it is counted the
/// node has handled everything before it.
fn sentinel(id: u64) -> Frame {
    Frame::Publish {
        msg: wire_msg(id, "hostile/+/sentinel", Bytes::from_static(b"-")),
        plain: true,
        groups: vec![],
    }
}

/// Sends a [`sentinel`] on `link`, then waits until the node has handled it and so everything
/// sent before it.
async fn sync(node: &Node, link: &mut Channel<TcpStream>, id: u64) {
    let before = node.metric(INVALID_PUBLISH).await.expect("metrics");
    link.send(&enc(&sentinel(id))).await.expect("send sentinel");
    eventually("the node to handle the peer's frames", DEADLINE, || async {
        let now = node.metric(INVALID_PUBLISH).await?;
        if now > before {
            Ok(())
        } else {
            Err(format!("{INVALID_PUBLISH} still {now}"))
        }
    })
    .await;
}

const INVALID_PUBLISH: &str = "corvid_cluster_invalid_total{kind=\"publish\"}";
const DROPPED_EARLY: &str = "corvid_messages_dropped_total{reason=\"moved_session_missing\"}";
const DUPLICATES: &str = "corvid_cluster_forward_duplicates_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_peer_flooding_frames_cannot_grow_the_node() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut node, mut by) = solo_with_bystander(dir.path()).await;
    let pid = node.pid().expect("pid");
    // The key exactly as the node reads it from the secret file the harness wrote.
    let secret = Secret::load(&node.secret_path()).expect("the node's secret file");
    let cluster_addr = (Ipv4Addr::LOCALHOST, node.spec.cluster);
    let (secret, node_ref) = (&secret, &node);
    let mut link = eventually(
        "an authenticated link to the node",
        DEADLINE,
        move || async move {
            let s = TcpStream::connect(cluster_addr)
                .await
                .map_err(|e| e.to_string())?;
            channel::dial(s, secret, "hostile-peer", node_ref.name())
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    sync(&node, &mut link, 0).await;
    let rss0 = rss_of(pid);
    let dropped0 = node.metric(DROPPED_EARLY).await.expect("metrics");

    // 1. Deliveries for ever-new sessions that never arrive: 40,000 of 4 KiB (~160 MiB if
    //    the node kept them all). It holds at most 64 MiB of topic and payload; the rest is
    //    dropped and counted.
    const FLOOD: u64 = 40_000;
    const PER_CHUNK: u64 = 2_000;
    const PAYLOAD: usize = 4096;
    const TOPIC: &str = "hostile/early";
    let payload = Bytes::from(vec![0x5a; PAYLOAD]);
    let flood_start = Instant::now();
    for chunk in 0..FLOOD / PER_CHUNK {
        for i in chunk * PER_CHUNK..(chunk + 1) * PER_CHUNK {
            let frame = Frame::DeliverTo {
                client_id: format!("ghost-{i}"),
                delivery: WireDelivery {
                    msg: wire_msg(i + 1, TOPIC, payload.clone()),
                    qos: 1,
                    retain: false,
                    sub_ids: vec![],
                    share: None,
                },
            };
            link.feed(&enc(&frame)).await.expect("feed DeliverTo");
        }
        link.flush().await.expect("flush");
        by.assert_served().await;
    }
    sync(&node, &mut link, 1).await;
    let flood_took = flood_start.elapsed();
    let grown = rss_of(pid).saturating_sub(rss0);
    let dropped = (node.metric(DROPPED_EARLY).await.expect("metrics") - dropped0) as u64;
    // At most 64 MiB of topic and payload is held: every delivery past that is dropped.
    let held_at_most = (64u64 << 20) / (PAYLOAD + TOPIC.len()) as u64;
    eprintln!(
        "{FLOOD} deliveries of {PAYLOAD} B for sessions that never arrive: node RSS grew {} MiB, \
         {dropped} dropped as moved_session_missing (at least {} expected), {:.1} s",
        grown >> 20,
        FLOOD - held_at_most,
        flood_took.as_secs_f64()
    );
    // Holding the 64 MiB the bound allows costs ~79 MiB of RSS (each 4 KiB payload plus its
    // message, delivery and session entry); holding all 40,000, as the node did before the
    // bound, costs ~193 MiB (measured with the bounds raised to usize::MAX), so this fails on
    // unbounded holding, and on a bound loosened to more than ~80 MiB.
    assert!(grown < 100 << 20, "node RSS grew by {} MiB", grown >> 20);
    assert!(
        dropped >= FLOOD - held_at_most,
        "{DROPPED_EARLY} counted {dropped}, expected at least {} of {FLOOD}",
        FLOOD - held_at_most
    );
    by.assert_served().await;

    // 2. Frames a peer could abuse cheaply: the largest forward key (twice: the second is a
    //    duplicate), an acknowledgement of forwards never sent, routes that make the node
    //    forward everything to a peer it has no link to, takeover requests it cannot answer
    //    (one for the bystander's session, then 10,000), a reply to no request, the old
    //    handshake frames, and a frame kind from a newer version.
    let dup0 = node.metric(DUPLICATES).await.expect("metrics");
    let max = (u64::MAX, u64::MAX);
    let forward = || Frame::Forward {
        key: max,
        msg: wire_msg(u64::MAX, "hostile/forward", Bytes::from_static(b"max key")),
        plain: true,
        groups: vec!["no-such-group/#".into()],
    };
    let abuse = [
        forward(),
        forward(),
        Frame::ForwardAck { key: max },
        Frame::ForwardAck { key: (0, 0) },
        Frame::Routes(vec!["#".into(), "$share/g/#".into(), "bad/#/route".into()]),
        Frame::RouteAdd("+/+/#".into()),
        Frame::RouteDel("never/added".into()),
        Frame::TakeSession {
            req: u64::MAX,
            client_id: "bystander".into(),
            clean: false,
            owner: None,
        },
        Frame::TakeFor {
            req: 1,
            client_id: "ghost-take-for".into(),
            clean: true,
            owner: None,
            requester: "hostile-peer".into(),
            hops: u8::MAX,
        },
        Frame::TakeReply {
            req: 7,
            snapshot: None,
            refused: true,
        },
        Frame::Hello {
            node: "hostile-peer".into(),
            nonce: 0,
            ts: 0,
            tag: vec![0; 32],
        },
        Frame::Welcome {
            node: "solo".into(),
            tag: vec![],
        },
    ];
    for frame in &abuse {
        link.feed(&enc(frame)).await.expect("feed");
    }
    // Takeover requests for 10,000 sessions: each waits (1.5 s) for a link back to a peer
    // that never gets one; the bystander is served while they wait.
    for i in 0..10_000 {
        let frame = Frame::TakeSession {
            req: i,
            client_id: format!("wanted-{i}"),
            clean: false,
            owner: None,
        };
        link.feed(&enc(&frame)).await.expect("feed TakeSession");
    }
    // A frame of a kind this version does not know (a newer peer's): skipped.
    link.feed(&[proto::KNOWN_FRAME_KINDS, 0, 0])
        .await
        .expect("feed");
    link.flush().await.expect("flush");
    sync(&node, &mut link, 2).await;
    let dups = node.metric(DUPLICATES).await.expect("metrics") - dup0;
    assert_eq!(
        dups, 1.0,
        "the repeated largest-key forward counted {dups} duplicates"
    );
    by.assert_served().await;
    // The node waits for a link back to the peer (1.5 s), then gives up the bystander's
    // takeover without giving its session away: the bystander stays connected and served.
    eventually(
        "the bystander's takeover to be given up",
        DEADLINE,
        || async {
            let log = std::fs::read_to_string(&node.log).map_err(|e| e.to_string())?;
            log.lines()
                .any(|l| {
                    l.contains("link to the requesting node is full or down")
                        && l.contains("bystander")
                })
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    // Its publishes now also match the peer's "#" (forwarded nowhere): served here all the same.
    by.assert_served().await;
    let (status, body) = node.get("/metrics").await.expect("metrics endpoint");
    assert_eq!(status, 200, "{body}");
    assert!(node.exited().is_none(), "the node exited");
    eprintln!(
        "authenticated hostile peer test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(link);
    drop(node);
}
