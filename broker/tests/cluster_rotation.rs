//! Cluster secret rotation without downtime, tested as an operator runs it: three real
//! `corvid-broker` processes whose secret files are rewritten while they run, the way
//! Kubernetes updates a mounted Secret, through the three phases — install (every node also
//! accepts the new secret, still sends with the old), use (every node sends with the new,
//! still accepts the old), remove (only the new) — while QoS 1 messages cross nodes.
//!
//! What is proven: no acknowledged message is lost across the phases; links up stay up; a node
//! restarted in the middle of a phase (some peers a phase ahead or behind) links again and
//! carries messages; each node shows the fingerprints it holds and counts which key its peers
//! use; and after the rotation a node holding only the removed secret can neither link nor
//! gossip its way in.

mod cluster_util;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use cluster_util::*;
use corvid_broker::cluster::secret::Secret;

/// The secret the cluster rotates to.
const NEW: &str = "corvid-cluster-rotated-secret-9876543210";
/// The topic the stream crosses nodes on.
const TOPIC: &str = "rotate/stream";

fn fingerprint(s: &str) -> String {
    Secret::from_bytes(s.as_bytes()).fingerprint()
}

/// The accepted-secret file of node `i`.
fn accepted_file(c: &Cluster, i: usize) -> PathBuf {
    c.dir.path().join(format!("n{}.accepted", i + 1))
}

/// Waits until node `i` reports `primary` and `accepted` as its key ring.
async fn wait_ring(c: &Cluster, i: usize, primary: &str, accepted: &[&str]) {
    let want_p = fingerprint(primary);
    let want_a: Vec<String> = accepted.iter().map(|a| fingerprint(a)).collect();
    let node = &c.nodes[i];
    eventually(
        &format!("{} to load the key ring", node.name()),
        DEADLINE,
        || async {
            let v = node.json("/api/v1/cluster").await?;
            let k = &v["keyring"];
            let p = k["primary"].as_str().unwrap_or_default().to_string();
            let a: Vec<String> = k["accepted"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if p == want_p && a == want_a {
                Ok(())
            } else {
                Err(format!("{k}"))
            }
        },
    )
    .await
}

/// Publishes `seqs` on [`TOPIC`] at QoS 1 from a fresh client on node `from` and waits until
/// every one is acknowledged.
async fn publish_acked(c: &Cluster, from: usize, id: &str, seqs: std::ops::Range<u64>) {
    let mut p = Client::connect(c.nodes[from].mqtt_addr(), &Opts::clean(V::V5, id)).await;
    p.publish_seqs(TOPIC, 1, seqs).await;
    p.disconnect().await;
}

/// Publishes the next 40 sequence numbers (from `next`) from node `from`.
async fn batch(c: &Cluster, from: usize, next: &mut u64) {
    let start = *next;
    *next += 40;
    let id = format!("rotate-pub-{from}-{start}");
    publish_acked(c, from, &id, start..start + 40).await
}

/// Runs the link handshake with `secret` against node `i`: whether it opened.
async fn handshake_with(c: &Cluster, i: usize, secret: &str) -> bool {
    use corvid_broker::cluster::channel;
    let n = &c.nodes[i];
    let addr = std::net::SocketAddr::new(n.spec.ip, n.spec.cluster);
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect link port");
    let key = Secret::from_bytes(secret.as_bytes());
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        channel::dial(s, &key, "rotation-probe", n.name()),
    )
    .await
    .expect("the node answers or closes within 10 s");
    r.is_ok()
}

/// Sum of `corvid_cluster_key_used_total` samples with `key` on node `i`.
async fn key_used(c: &Cluster, i: usize, key: &str) -> f64 {
    let (_, body) = c.nodes[i].get("/metrics").await.expect("metrics");
    body.lines()
        .filter(|l| {
            l.starts_with("corvid_cluster_key_used_total{") && l.contains(&format!("key=\"{key}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_phase_rotation_loses_nothing_and_locks_the_old_secret_out() {
    let mut c = Cluster::empty();
    let mut specs = Cluster::static_loopback_specs(3);
    for (i, spec) in specs.iter_mut().enumerate() {
        spec.cluster_extra = format!(
            "  accepted_secret_files: [\"{}\"]\n",
            accepted_file(&c, i).display()
        );
    }
    for spec in specs.clone() {
        c.add(spec);
    }
    c.wait_formed(&[0, 1, 2]).await;
    for i in 0..3 {
        wait_ring(&c, i, SECRET, &[]).await;
    }

    // The stream: a persistent QoS 1 subscriber on n1, publishers on n3 (never restarted, so
    // its link to n1 spans every phase) and on n2 (restarted in each phase).
    let mut sub = Client::connect(
        c.nodes[0].mqtt_addr(),
        &Opts::persistent(V::V5, "rotate-sub"),
    )
    .await;
    sub.subscribe(TOPIC, 1).await;
    c.wait_routes(2, 0, 1).await;
    c.wait_routes(1, 0, 1).await;
    let mut next = 0u64;
    batch(&c, 2, &mut next).await;

    // Phase 1, install: every node also accepts NEW, still sends with the old secret. n2 is
    // restarted after it took the phase but before n3 did.
    let old = SECRET;
    let f = accepted_file(&c, 1);
    c.nodes[1].write_keys(old, &f, NEW);
    wait_ring(&c, 1, old, &[NEW]).await;
    c.nodes[1].restart();
    c.wait_formed(&[0, 1, 2]).await;
    c.wait_routes(1, 0, 1).await;
    batch(&c, 1, &mut next).await;
    for i in [0, 2] {
        let f = accepted_file(&c, i);
        c.nodes[i].write_keys(old, &f, NEW);
        batch(&c, 2, &mut next).await;
    }
    for i in 0..3 {
        wait_ring(&c, i, old, &[NEW]).await;
        assert!(handshake_with(&c, i, NEW).await, "n{} refused NEW", i + 1);
        assert!(
            handshake_with(&c, i, old).await,
            "n{} refused the old",
            i + 1
        );
    }

    // Phase 2, use: every node sends with NEW, still accepts the old. n2 takes the phase
    // first and restarts: it dials peers that still send with the old secret (they accept
    // NEW since phase 1) and they dial it with the old one (it still accepts it).
    let f = accepted_file(&c, 1);
    c.nodes[1].write_keys(NEW, &f, old);
    wait_ring(&c, 1, NEW, &[old]).await;
    let accepted_before = key_used(&c, 0, "accepted").await;
    c.nodes[1].restart();
    c.wait_formed(&[0, 1, 2]).await;
    c.wait_routes(1, 0, 1).await;
    batch(&c, 1, &mut next).await;
    assert!(
        key_used(&c, 0, "accepted").await > accepted_before,
        "n1 did not count n2's link or gossip under its accepted (new) secret"
    );
    let view = c.nodes[0]
        .json("/api/v1/cluster")
        .await
        .expect("cluster view");
    assert!(
        view["keyring"]["accepted_last_used"].as_u64().is_some(),
        "n1 does not say when an accepted key was last used: {}",
        view["keyring"]
    );
    for i in [0, 2] {
        let f = accepted_file(&c, i);
        c.nodes[i].write_keys(NEW, &f, old);
        batch(&c, 2, &mut next).await;
    }
    for i in 0..3 {
        wait_ring(&c, i, NEW, &[old]).await;
    }

    // Phase 3, remove: only NEW. n2 restarts once more and links with NEW alone.
    for i in 0..3 {
        let f = accepted_file(&c, i);
        c.nodes[i].write_keys(NEW, &f, "");
    }
    for i in 0..3 {
        wait_ring(&c, i, NEW, &[]).await;
    }
    c.nodes[1].restart();
    c.wait_formed(&[0, 1, 2]).await;
    c.wait_routes(1, 0, 1).await;
    batch(&c, 1, &mut next).await;
    batch(&c, 2, &mut next).await;

    // Nothing acknowledged was lost (QoS 1 may duplicate).
    let got: BTreeSet<u64> = sub
        .drain(Duration::from_millis(1500), Duration::from_secs(30))
        .await
        .iter()
        .filter(|(t, _)| t == TOPIC)
        .filter_map(|(_, p)| seq_of(p))
        .collect();
    let missing: Vec<u64> = (0..next).filter(|s| !got.contains(s)).collect();
    if !missing.is_empty() {
        c.dump_counters().await;
        c.dump_logs(40);
    }
    assert!(missing.is_empty(), "lost {missing:?} of {next}");
    assert!(
        c.nodes[0].log_contains("cluster key ring changed"),
        "n1 did not log the ring change"
    );
    // SIGHUP re-reads the ring at once (and no longer ends the process).
    c.nodes[2].signal("-HUP");
    eventually("n3 to answer SIGHUP", DEADLINE, || async {
        if c.nodes[2].log_contains("SIGHUP: cluster key ring unchanged") {
            Ok(())
        } else {
            Err(c.nodes[2].log_tail(5))
        }
    })
    .await;
    assert!(c.nodes[2].exited().is_none(), "SIGHUP ended n3");

    // A node holding only the removed secret cannot link or gossip its way in.
    for i in 0..3 {
        assert!(
            !handshake_with(&c, i, old).await,
            "n{} took the removed secret",
            i + 1
        );
        assert!(handshake_with(&c, i, NEW).await, "n{} refused NEW", i + 1);
    }
    let gossip_before = c.nodes[0]
        .metric("corvid_cluster_gossip_rejected_total")
        .await
        .unwrap_or(0.0);
    let mut stale = Cluster::static_loopback_specs(1).remove(0);
    stale.name = "stale".into();
    stale.discover = specs[0].discover.clone();
    stale.secret = old.into();
    let s = c.add(stale);
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until {
        for i in 0..3 {
            let m = c.nodes[i].members().await.expect("members");
            assert!(
                !m.iter().any(|x| x.0 == "stale"),
                "a node with the removed secret was admitted: {m:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = c.nodes[s].members().await.expect("stale members");
    assert!(
        m.iter().all(|x| x.0 == "stale"),
        "the stale node sees members: {m:?}"
    );
    let gossip_after = c.nodes[0]
        .metric("corvid_cluster_gossip_rejected_total")
        .await
        .expect("metric");
    assert!(
        gossip_after > gossip_before,
        "n1 did not reject the stale node's gossip"
    );
}
