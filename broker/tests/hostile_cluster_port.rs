//! Hostile, unauthenticated connections to the cluster port of a real `corvid-broker`
//! process: frames larger than a handshake are refused before authentication, and
//! handshakes in progress are capped (8 per source address), so ten connections announcing
//! 64 MiB frames do not grow the node's memory; its MQTT clients keep their round trips.

mod cluster_util;
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use cluster_util::*;
use tokio::io::AsyncWriteExt;

/// Resident set size of process `pid` in bytes.
fn rss_of(pid: u32) -> u64 {
    common::rss_bytes(Some(pid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_64_mib_frames_do_not_grow_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lo = [Ipv4Addr::LOCALHOST];
    let node = Node::start(
        dir.path(),
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
    let pid = node.pid().expect("pid");
    let mqtt = node.mqtt_addr();
    let mut by = within("bystander connects", DEADLINE, async {
        loop {
            if tokio::net::TcpStream::connect(mqtt).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        common::Bystander::connect(mqtt, "bystander").await
    })
    .await;
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
