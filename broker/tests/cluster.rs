//! The broker cluster, tested as users run it: three real `corvid-broker` processes per test,
//! each on its own free ports with its own log, discovering each other statically, through a
//! real DNS server (dnsmasq), or in network namespaces of their own where a link must be cut.
//!
//! What is proven: cross-node delivery at every QoS, retained messages across nodes, one
//! delivery per shared group cluster-wide, session takeover that loses no queued message,
//! survival of a `kill -9` (and the documented loss of the dead node's sessions), partition and
//! healing, DNS discovery, refusal of a peer with the wrong secret, link bytes that reveal no
//! topic or payload and that cannot be replayed or altered, gossip that cannot be forged, a
//! member that never links holding readiness only for a bound, evacuation and connection
//! rebalancing after a scale-up without losing an acknowledged message, sessions that another
//! identity cannot take over from another node, peers held to the topic bounds, and that a
//! clustered node's admin answers read exactly into their `corvid-api` types.
//!
//! The tests that need root (dnsmasq behind a private `/etc/resolv.conf`, network namespaces)
//! skip themselves with a message when they cannot run; `CORVID_REQUIRE_DNSMASQ=1` turns a
//! missing dnsmasq (`apt-get install dnsmasq-base`) into a failure.

mod cluster_util;
mod typed_api;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_util::*;

/// Seconds of quiet after which a subscriber is taken to have received everything.
const QUIET: Duration = Duration::from_millis(700);

/// Publishes `n` sequence-numbered messages on `topic` and waits until every QoS 1/2 one was
/// acknowledged; returns the sequence numbers.
async fn publish_seq(c: &mut Client, topic: &str, qos: u8, n: u64) -> Vec<u64> {
    c.publish_seqs(topic, qos, 0..n).await;
    (0..n).collect()
}

/// Sequence numbers of `msgs` on `topic`, with how often each arrived.
fn counts(msgs: &[(String, bytes::Bytes)], topic: &str) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for (t, p) in msgs {
        if t == topic {
            *m.entry(seq_of(p).expect("sequence payload")).or_default() += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_publish_subscribe_at_each_qos() {
    let mut c = Cluster::static_loopback(3);
    c.wait_formed(&[0, 1, 2]).await;

    // n2: one MQTT 5 subscriber per QoS; n3: a 3.1.1 wildcard subscriber at QoS 2.
    let mut on_b = Client::connect(c.nodes[1].mqtt_addr(), &Opts::clean(V::V5, "sub-b")).await;
    for q in 0..3u8 {
        on_b.subscribe(&format!("x/q{q}"), q).await;
    }
    let mut on_c = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V3, "sub-c")).await;
    on_c.subscribe("x/#", 2).await;
    c.wait_routes(0, 1, 3).await;
    c.wait_routes(0, 2, 1).await;

    let mut publisher = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V3, "pub-a")).await;
    const N: u64 = 30;
    for q in 0..3u8 {
        publish_seq(&mut publisher, &format!("x/q{q}"), q, N).await;
    }
    let got_b = on_b.drain(QUIET, DEADLINE).await;
    let got_c = on_c.drain(QUIET, DEADLINE).await;
    for q in 0..3u8 {
        let topic = format!("x/q{q}");
        let want: BTreeMap<u64, usize> = (0..N).map(|s| (s, 1)).collect();
        assert_eq!(counts(&got_b, &topic), want, "n2 subscriber, {topic}");
        assert_eq!(
            counts(&got_c, &topic),
            want,
            "n3 wildcard subscriber, {topic}"
        );
    }

    // And the other way round: published on n3, received on n1.
    let mut on_a = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V5, "sub-a")).await;
    on_a.subscribe("back/t", 1).await;
    c.wait_routes(2, 0, 1).await;
    let mut pub_c = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V5, "pub-c")).await;
    publish_seq(&mut pub_c, "back/t", 1, N).await;
    let got_a = on_a.drain(QUIET, DEADLINE).await;
    assert_eq!(
        counts(&got_a, "back/t"),
        (0..N).map(|s| (s, 1)).collect::<BTreeMap<_, _>>(),
        "n1 subscriber of messages published on n3"
    );
    let forwarded = c.nodes[0]
        .metric("corvid_cluster_forwarded_messages_total")
        .await
        .expect("metrics");
    assert!(forwarded >= (3 * N) as f64, "n1 forwarded only {forwarded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_set_on_one_node_is_seen_on_another() {
    let mut c = Cluster::static_loopback(3);
    c.wait_formed(&[0, 1, 2]).await;
    let mut a = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V3, "ret-pub")).await;
    a.publish("ret/t", 1, true, b"kept".to_vec()).await;
    within("PUBACK of the retained message", DEADLINE, async {
        while !matches!(a.rx.recv().await, Some(Ev::Acked(_)) | None) {}
    })
    .await;

    // Replication is asynchronous: a fresh subscriber on n3 gets it once it arrived there.
    let c3 = c.nodes[2].mqtt_addr();
    eventually("the retained message on n3", DEADLINE, || async move {
        let mut s = Client::connect(c3, &Opts::clean(V::V5, "ret-sub")).await;
        s.subscribe("ret/#", 1).await;
        match s.next_msg(Duration::from_secs(1)).await {
            Some((t, p, _, retain)) if t == "ret/t" && &p[..] == b"kept" && retain => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Clearing it on n1 clears it on n3 too.
    a.publish("ret/t", 1, true, Vec::new()).await;
    eventually(
        "the cleared retained message to vanish on n3",
        DEADLINE,
        || async move {
            let mut s = Client::connect(c3, &Opts::clean(V::V3, "ret-sub2")).await;
            s.subscribe("ret/#", 1).await;
            match s.next_msg(Duration::from_millis(800)).await {
                None => Ok(()),
                Some(m) => Err(format!("still retained: {m:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_group_gets_each_message_once_spread_over_nodes() {
    let mut c = Cluster::static_loopback(3);
    c.wait_formed(&[0, 1, 2]).await;
    let mut members = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        for k in 0..2 {
            let m =
                Client::connect(n.mqtt_addr(), &Opts::clean(V::V5, &format!("g-{i}-{k}"))).await;
            m.subscribe("$share/g/sh/t", 1).await;
            members.push((i, m));
        }
    }
    // A plain subscriber on n2 must still get every message, besides the group.
    let mut plain = Client::connect(c.nodes[1].mqtt_addr(), &Opts::clean(V::V3, "plain")).await;
    plain.subscribe("sh/t", 1).await;
    c.wait_routes(0, 1, 2).await;
    c.wait_routes(0, 2, 1).await;
    c.wait_routes(1, 2, 1).await;
    c.wait_routes(2, 0, 1).await;

    // Publishers on two nodes, so two nodes make the cluster-wide choice.
    const N: u64 = 60;
    let mut p1 = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V3, "g-pub1")).await;
    let mut p3 = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V3, "g-pub3")).await;
    publish_seq(&mut p1, "sh/t", 1, N).await;
    for seq in N..2 * N {
        p3.publish("sh/t", 1, false, seq_payload(seq)).await;
    }
    let mut acked = 0;
    within("PUBACKs on n3", DEADLINE, async {
        while acked < N {
            if let Some(Ev::Acked(_)) = p3.rx.recv().await {
                acked += 1;
            }
        }
    })
    .await;

    let mut all: BTreeMap<u64, usize> = BTreeMap::new();
    let mut per_node = [0usize; 3];
    for (node, m) in &mut members {
        let got = m.drain(QUIET, DEADLINE).await;
        for (s, k) in counts(&got, "sh/t") {
            *all.entry(s).or_default() += k;
            per_node[*node] += k;
        }
    }
    let twice: Vec<_> = all.iter().filter(|(_, k)| **k > 1).collect();
    let missing: Vec<u64> = (0..2 * N).filter(|s| !all.contains_key(s)).collect();
    assert!(
        twice.is_empty() && missing.is_empty(),
        "group deliveries: duplicated {twice:?}, missing {missing:?}; per node {per_node:?}"
    );
    assert!(
        per_node.iter().all(|k| *k > 0),
        "group deliveries not spread over the nodes: {per_node:?}"
    );
    let got_plain = plain.drain(QUIET, DEADLINE).await;
    assert_eq!(
        counts(&got_plain, "sh/t").len() as u64,
        2 * N,
        "plain subscriber"
    );
    eprintln!("shared group deliveries per node: {per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_on_another_node_keeps_every_queued_message() {
    let mut c = Cluster::static_loopback(3);
    c.wait_formed(&[0, 1, 2]).await;
    const N: u64 = 50;
    for v in [V::V3, V::V5] {
        let id = format!("tk-{v:?}");
        let topic = format!("tk/{v:?}");
        // A persistent session on n1, subscribed, then offline.
        let s = Client::connect(c.nodes[0].mqtt_addr(), &Opts::persistent(v, &id)).await;
        s.subscribe(&topic, 1).await;
        c.wait_routes(2, 0, 1).await;
        s.disconnect().await;
        drop(s);
        let n1 = &c.nodes[0];
        eventually(&format!("{id} offline on n1"), DEADLINE, || async {
            let j = n1.json(&format!("/api/v1/clients/{id}")).await?;
            (j["connected"] == false).then_some(()).ok_or(j.to_string())
        })
        .await;

        // N messages published on n3 queue up for it on n1.
        let mut p = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V3, "tk-pub")).await;
        publish_seq(&mut p, &topic, 1, N).await;
        drop(p);
        eventually(
            &format!("{N} messages queued for {id} on n1"),
            DEADLINE,
            || async {
                let j = n1.json(&format!("/api/v1/clients/{id}")).await?;
                (j["queued"].as_u64().unwrap_or(0) + j["inflight"].as_u64().unwrap_or(0) >= N)
                    .then_some(())
                    .ok_or(j.to_string())
            },
        )
        .await;

        // Reconnecting to n2 takes the session, queue included, over.
        let mut back = Client::connect(c.nodes[1].mqtt_addr(), &Opts::persistent(v, &id)).await;
        assert!(back.session_present, "{id}: session present after takeover");
        let got = back.drain(QUIET, DEADLINE).await;
        let seen = counts(&got, &topic);
        let dups: Vec<_> = seen.iter().filter(|(_, k)| **k > 1).collect();
        let missing: Vec<u64> = (0..N).filter(|s| !seen.contains_key(s)).collect();
        assert!(
            missing.is_empty() && dups.is_empty(),
            "{id}: {} of {N} received; missing {missing:?}, duplicated {dups:?}",
            seen.len()
        );
        // The session now lives on n2: a message published on n1 reaches it there.
        let p = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V5, "tk-pub2")).await;
        c.wait_routes(0, 1, 1).await;
        p.publish(&topic, 1, false, seq_payload(N)).await;
        let m = back
            .next_msg(DEADLINE)
            .await
            .expect("message after takeover");
        assert_eq!(seq_of(&m.1), Some(N));
        back.disconnect().await;
        drop(p);
    }
    let takeovers = c.nodes[1]
        .metric("corvid_cluster_takeovers_total")
        .await
        .expect("metrics");
    assert!(takeovers >= 2.0, "n2 counted {takeovers} takeovers");
}

/// A client that reconnects to a third node while its session is being handed off (an
/// evacuation moved it to n2, whose link has not delivered it yet) still finds it, queue
/// included: n1, which no longer holds it, passes the request on to n2 behind the hand-off.
/// n2 is paused (SIGSTOP) so the hand-off is surely in flight when n3 asks; before the fix
/// n1 answered "not found" at once and n2 did too whenever n3's question overtook the hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_flight_between_nodes_is_found_from_a_third() {
    let mut c = Cluster::static_loopback(3);
    c.wait_formed(&[0, 1, 2]).await;
    const N: u64 = 30;
    let (id, topic) = ("hop-sub", "hop/x");
    let s = Client::connect(c.nodes[0].mqtt_addr(), &Opts::persistent(V::V5, id)).await;
    s.subscribe(topic, 1).await;
    c.wait_routes(2, 0, 1).await;
    s.disconnect().await;
    drop(s);
    let mut p = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V3, "hop-pub")).await;
    publish_seq(&mut p, topic, 1, N).await;
    drop(p);
    let n1 = &c.nodes[0];
    eventually(
        &format!("{N} messages queued for {id} on n1"),
        DEADLINE,
        || async {
            let j = n1.json(&format!("/api/v1/clients/{id}")).await?;
            (j["queued"].as_u64().unwrap_or(0) >= N)
                .then_some(())
                .ok_or(j.to_string())
        },
    )
    .await;

    c.nodes[1].signal("-STOP");
    // Evacuating n1 hands the one session to the first ready peer by name: n2, paused.
    let (status, body) = n1.post("/api/v1/evacuate?rate=50").await.expect("evacuate");
    assert_eq!(status, 202, "{body}");
    eventually("n1 handed the session off", DEADLINE, || async {
        let j = n1.json("/api/v1/evacuate").await?;
        (j["state"] == "done" && j["handed_off"] == 1)
            .then_some(())
            .ok_or(j.to_string())
    })
    .await;
    let n3 = c.nodes[2].mqtt_addr();
    let back = tokio::spawn(async move { Client::connect(n3, &Opts::persistent(V::V5, id)).await });
    eventually("n1 to pass n3's request on to n2", DEADLINE, || async {
        n1.log_contains("takeover request passed to its new node")
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    c.nodes[1].signal("-CONT");
    let mut back = back.await.expect("connect task");
    assert!(back.session_present, "session present on n3");
    let got = back.drain(QUIET, DEADLINE).await;
    let seen = counts(&got, topic);
    let missing: Vec<u64> = (0..N).filter(|s| !seen.contains_key(s)).collect();
    assert!(missing.is_empty(), "missing {missing:?} of {N}");
}

/// `sessions.takeover: owner_only` holds across nodes: another identity connecting to another
/// node with the client id is refused there, and the owner's session (queue included) and
/// live connection stay where they are; the owner itself still moves freely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identity_cannot_take_a_session_from_another_node() {
    let mut c = Cluster::static_loopback(2);
    c.wait_formed(&[0, 1]).await;
    for v in [V::V3, V::V5] {
        let id = format!("own-{v:?}");
        let topic = format!("own/{v:?}");
        let alice = Opts::persistent(v, &id).with_user("alice");
        let s = Client::connect(c.nodes[0].mqtt_addr(), &alice).await;
        s.subscribe(&topic, 1).await;
        c.wait_routes(1, 0, 1).await;
        s.disconnect().await;
        drop(s);
        let n1 = &c.nodes[0];
        let queued = |min: u64| {
            let id = id.clone();
            async move {
                let j = n1.json(&format!("/api/v1/clients/{id}")).await?;
                let q = j["queued"].as_u64().unwrap_or(0) + j["inflight"].as_u64().unwrap_or(0);
                (j["connected"] == false && q >= min)
                    .then_some(())
                    .ok_or(j.to_string())
            }
        };
        eventually(&format!("{id} offline on n1"), DEADLINE, || queued(0)).await;
        let mut p = Client::connect(c.nodes[1].mqtt_addr(), &Opts::clean(V::V3, "own-pub")).await;
        publish_seq(&mut p, &topic, 1, 1).await;
        eventually(
            &format!("a message queued for {id} on n1"),
            DEADLINE,
            || queued(1),
        )
        .await;

        // Bob, and an anonymous clean start, on n2: refused by n1, nothing moves.
        let bob = Opts::persistent(v, &id).with_user("bob");
        for o in [bob.clone(), Opts::clean(v, &id)] {
            let e = Client::try_connect(c.nodes[1].mqtt_addr(), &o)
                .await
                .err()
                .expect("refused");
            assert!(e.contains("NotAuthorized"), "{id} as {:?}: {e}", o.user);
        }
        eventually(&format!("{id} still queued on n1"), DEADLINE, || queued(1)).await;

        // Alice online on n1 is not kicked by Bob on n2.
        let mut a = Client::connect(c.nodes[0].mqtt_addr(), &alice).await;
        assert!(a.session_present);
        let m = a.next_msg(DEADLINE).await.expect("queued message");
        assert_eq!(seq_of(&m.1), Some(0));
        assert!(Client::try_connect(c.nodes[1].mqtt_addr(), &bob)
            .await
            .is_err());
        p.publish(&topic, 1, false, seq_payload(1)).await;
        let m = a.next_msg(DEADLINE).await.expect("alice still connected");
        assert_eq!(seq_of(&m.1), Some(1));
        a.disconnect().await;
        drop((a, p));

        // The owner herself takes the session over to n2.
        eventually(&format!("{id} offline again"), DEADLINE, || queued(0)).await;
        let back = Client::connect(c.nodes[1].mqtt_addr(), &alice).await;
        assert!(back.session_present, "{id}: alice moves her own session");
        back.disconnect().await;
    }
    assert!(c.nodes[0].log_contains("session takeover refused"));
}

/// Peers are held to the same topic bounds as clients: a node configured with higher bounds
/// replicates a 300-level route and retained message; the node at the defaults (128 levels)
/// drops and counts both, and keeps serving cross-node traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_routes_and_retained_from_a_peer_are_dropped_and_counted() {
    let mut specs = Cluster::static_loopback_specs(2);
    // `cluster_extra` ends the file: a top-level line after it sets n1's own bounds.
    specs[0].cluster_extra = "mqtt: { max_topic_levels: 1000 }\n".into();
    let mut c = Cluster::empty();
    for s in specs {
        c.add(s);
    }
    c.wait_formed(&[0, 1]).await;
    let deep = vec!["d"; 300].join("/");
    let n1 = c.nodes[0].mqtt_addr();
    let sub = Client::connect(n1, &Opts::clean(V::V5, "deep-sub")).await;
    sub.subscribe(&format!("{deep}/#"), 0).await;
    let p = Client::connect(n1, &Opts::clean(V::V5, "deep-pub")).await;
    p.publish(&deep, 1, true, b"deep".to_vec()).await;
    let n2 = &c.nodes[1];
    eventually(
        "n2 drops the deep route and retained message",
        DEADLINE,
        || async {
            let n = n2.metric("corvid_cluster_invalid_total").await?;
            (n >= 2.0).then_some(()).ok_or(format!("{n} counted"))
        },
    )
    .await;
    // n2 still serves, across nodes too.
    let mut ok = Client::connect(n2.mqtt_addr(), &Opts::clean(V::V5, "ok-sub")).await;
    ok.subscribe("ok/t", 1).await;
    c.wait_routes(0, 1, 1).await;
    p.publish("ok/t", 1, false, seq_payload(7)).await;
    let m = ok.next_msg(DEADLINE).await.expect("cross-node message");
    assert_eq!(seq_of(&m.1), Some(7));
    assert!(c.nodes[1].log_contains("invalid items from peer dropped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_node_survivors_serve_and_its_sessions_are_lost() {
    let mut c = Cluster::static_loopback(3);
    c.wait_formed(&[0, 1, 2]).await;
    // A persistent session on n3, the node about to die.
    let doomed = Client::connect(c.nodes[2].mqtt_addr(), &Opts::persistent(V::V3, "doomed")).await;
    doomed.subscribe("kill/t", 1).await;
    c.wait_routes(0, 2, 1).await;
    // The node tells its peers how many sessions it holds through gossip (sampled once a
    // second, spread in rounds of 500 ms); no API shows a peer's copy of that number, so this
    // is the one fixed wait in the file: two sampling periods.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lost_before = [
        c.nodes[0]
            .metric("corvid_cluster_sessions_lost_total")
            .await
            .expect("metrics"),
        c.nodes[1]
            .metric("corvid_cluster_sessions_lost_total")
            .await
            .expect("metrics"),
    ];

    c.nodes[2].kill9();
    drop(doomed);
    wait_n3_not_ready(&c).await;
    // The survivors keep serving each other.
    let mut sub = Client::connect(c.nodes[1].mqtt_addr(), &Opts::clean(V::V5, "k-sub")).await;
    sub.subscribe("kill/after", 1).await;
    c.wait_routes(0, 1, 1).await;
    let mut p = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V3, "k-pub")).await;
    publish_seq(&mut p, "kill/after", 1, 20).await;
    let got = sub.drain(QUIET, DEADLINE).await;
    assert_eq!(counts(&got, "kill/after").len(), 20, "survivors' pub/sub");
    for i in [0, 1] {
        let (status, body) = c.nodes[i].get("/readyz").await.expect("readyz");
        assert_eq!(
            status,
            200,
            "{} /readyz after the kill: {body}",
            c.nodes[i].name()
        );
    }

    // Documented guarantee: the dead node's persistent sessions are lost.
    let back = Client::connect(c.nodes[0].mqtt_addr(), &Opts::persistent(V::V3, "doomed")).await;
    assert!(
        !back.session_present,
        "a session of the killed node cannot survive it"
    );
    let lost = eventually(
        "sessions_lost_total to grow on a survivor",
        DEADLINE,
        || async {
            let now = [
                c.nodes[0]
                    .metric("corvid_cluster_sessions_lost_total")
                    .await?,
                c.nodes[1]
                    .metric("corvid_cluster_sessions_lost_total")
                    .await?,
            ];
            if now[0] > lost_before[0] || now[1] > lost_before[1] {
                Ok(now)
            } else {
                Err(format!("{now:?} (before {lost_before:?})"))
            }
        },
    )
    .await;
    eprintln!("corvid_cluster_sessions_lost_total on n1, n2: {lost:?}");
}

/// Waits until n1 and n2 no longer count n3 (killed) as ready.
async fn wait_n3_not_ready(c: &Cluster) {
    for i in [0, 1] {
        let n = &c.nodes[i];
        eventually(
            &format!("{} to see n3 not ready", n.name()),
            Duration::from_secs(30),
            || async {
                let m = n.members().await?;
                match m.iter().find(|m| m.0 == "n3") {
                    Some(x) if x.1 == "ready" => Err(format!("{m:?}")),
                    _ => Ok(()),
                }
            },
        )
        .await;
    }
}

/// Three nodes with durable sessions, each on its own data directory.
fn durable_cluster() -> Cluster {
    let mut c = Cluster::empty();
    for mut s in Cluster::static_loopback_specs(3) {
        // A top-level section after the cluster section's lines.
        s.cluster_extra = format!(
            "persistence: {{ data_dir: \"{}\" }}\n",
            c.dir.path().join(format!("{}-data", s.name)).display()
        );
        c.add(s);
    }
    c
}

/// With durable sessions, `kill -9` of a node loses no acknowledged message (docs/cluster.md,
/// "Node failure: the guarantee"): while it is down the publisher's node holds what is routed
/// to its sessions (and acknowledges the publisher once that is on its own store); a client of
/// the killed node that reconnects to another node waits for it to come back, then takes its
/// session over with everything queued; an online subscriber's session keeps its unacknowledged
/// deliveries. Without the hold and the wait, the 100 messages published while the node is
/// down, and the offline session itself, are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_durable_node_loses_nothing_and_its_clients_resume_elsewhere() {
    let mut c = durable_cluster();
    c.wait_formed(&[0, 1, 2]).await;
    let topic = "dur/t";
    // On n3, the node about to die: an offline persistent session and an online one.
    let off = Client::connect(c.nodes[2].mqtt_addr(), &Opts::persistent(V::V3, "dur-off")).await;
    off.subscribe(topic, 1).await;
    let mut on = Client::connect(c.nodes[2].mqtt_addr(), &Opts::persistent(V::V5, "dur-on")).await;
    on.subscribe(topic, 1).await;
    c.wait_routes(0, 2, 1).await;
    off.disconnect().await;
    let mut p = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V5, "dur-pub")).await;
    p.publish_seqs(topic, 1, 0..100).await;
    let mut seen_on = on.drain(QUIET, DEADLINE).await;

    c.nodes[2].kill9();
    drop(on);
    // Acknowledged while n3 is down: held by n1 for n3's sessions.
    p.publish_seqs(topic, 1, 100..200).await;
    let held = c.nodes[0]
        .metric("corvid_cluster_held_messages")
        .await
        .expect("metrics");
    assert!(
        held >= 100.0,
        "n1 holds what n3's sessions are owed: {held}"
    );
    wait_n3_not_ready(&c).await;
    // The offline session's client comes back on n2 while n3 is still down: it waits.
    let n2 = c.nodes[1].mqtt_addr();
    let back =
        tokio::spawn(
            async move { Client::try_connect(n2, &Opts::persistent(V::V3, "dur-off")).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!back.is_finished(), "the client did not wait for n3");
    c.nodes[2].restart();
    let mut off = back
        .await
        .expect("join")
        .expect("the client resumes once n3 is back");
    assert!(
        off.session_present,
        "the session n3 kept on its volume moved to n2"
    );
    let got = counts(&off.drain(QUIET, DEADLINE).await, topic);
    let missing: Vec<u64> = (0..200).filter(|s| !got.contains_key(s)).collect();
    if !missing.is_empty() {
        c.dump_counters().await;
    }
    assert!(missing.is_empty(), "offline session lost {missing:?}");
    // The online session resumes on n1 with what it had not acknowledged and what was held.
    let mut on = Client::connect(c.nodes[0].mqtt_addr(), &Opts::persistent(V::V5, "dur-on")).await;
    assert!(on.session_present, "the online session survived the kill");
    seen_on.extend(on.drain(QUIET, DEADLINE).await);
    let got = counts(&seen_on, topic);
    let missing: Vec<u64> = (0..200).filter(|s| !got.contains_key(s)).collect();
    assert!(missing.is_empty(), "online session lost {missing:?}");
    for i in [0, 1] {
        let lost = c.nodes[i]
            .metric("corvid_cluster_held_dropped_total")
            .await
            .expect("metrics");
        assert_eq!(lost, 0.0, "{} dropped held messages", c.nodes[i].name());
    }
    eventually("n1 to let go of what n3 acknowledged", DEADLINE, || async {
        let held = c.nodes[0].metric("corvid_cluster_held_messages").await?;
        (held == 0.0).then_some(()).ok_or(format!("{held} held"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_secret_is_refused() {
    let mut c = Cluster::static_loopback(3);
    // n3 is an impostor: same peers, different secret.
    let mut spec = c.nodes[2].spec.clone();
    c.nodes[2].kill9();
    spec.secret = "not-the-cluster-secret-at-all-9876".into();
    spec.name = "impostor".into();
    c.nodes.pop();
    c.add(spec);
    c.wait_formed(&[0, 1]).await;

    // A raw link handshake signed with the wrong secret is refused and counted.
    let before = c.nodes[0]
        .metric("corvid_cluster_refused_peers_total")
        .await
        .expect("metrics");
    let link = SocketAddr::new(c.nodes[0].spec.ip, c.nodes[0].spec.cluster);
    let closed = wrong_secret_handshake(link, c.nodes[0].name()).await;
    assert!(
        closed,
        "n1 answered a handshake keyed with the wrong secret"
    );
    let after = c.nodes[0]
        .metric("corvid_cluster_refused_peers_total")
        .await
        .expect("metrics");
    assert!(after > before, "refused_peers_total {before} -> {after}");

    // The impostor process never becomes a member, linked or otherwise, for 8 seconds.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for i in [0, 1] {
            let m = c.nodes[i].members().await.expect("members");
            assert!(
                !m.iter()
                    .any(|x| x.0 == "impostor" && (x.2 || x.1 == "ready")),
                "{} admitted the impostor: {m:?}",
                c.nodes[i].name()
            );
        }
        let m = c.nodes[2].members().await.expect("impostor members");
        assert!(
            m.iter().all(|x| x.1 == "self" || !x.2),
            "the impostor linked to a member: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Messages never cross to the impostor.
    let mut s = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V3, "imp-sub")).await;
    s.subscribe("imp/t", 1).await;
    let mut p = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V3, "imp-pub")).await;
    publish_seq(&mut p, "imp/t", 1, 5).await;
    assert!(
        s.next_msg(Duration::from_secs(1)).await.is_none(),
        "impostor received a message"
    );
    let refused: Vec<f64> = vec![
        c.nodes[0]
            .metric("corvid_cluster_refused_peers_total")
            .await
            .expect("metrics"),
        c.nodes[1]
            .metric("corvid_cluster_refused_peers_total")
            .await
            .expect("metrics"),
    ];
    eprintln!("refused_peers_total on n1, n2 after the impostor ran 8 s: {refused:?} (raw handshake counted 1 on n1)");
}

/// Opens an inter-node link to `addr` (node `node`) and runs the link handshake with a wrong
/// secret; true if the node closed the link without completing it.
async fn wrong_secret_handshake(addr: SocketAddr, node: &str) -> bool {
    use corvid_broker::cluster::channel::{self, ChannelError};
    use corvid_broker::cluster::secret::Secret;
    let wrong = Secret::from_bytes(b"definitely-the-wrong-secret!");
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect link port");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        channel::dial(s, &wrong, "intruder", node),
    )
    .await
    .expect("the node answers or closes within 10 s");
    matches!(
        r,
        Err(ChannelError::Unanswered) | Err(ChannelError::Closed) | Err(ChannelError::Io(_))
    )
}

/// A TCP relay to `upstream` for one connection: forwards both ways and records what the
/// dialer sent; while `tamper` is set, it flips the last byte of each chunk it forwards.
async fn relay(
    upstream: SocketAddr,
    tamper: Arc<std::sync::atomic::AtomicBool>,
) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let addr = l.local_addr().expect("relay addr");
    let sent = Arc::new(Mutex::new(Vec::new()));
    let rec = sent.clone();
    tokio::spawn(async move {
        let Ok((down, _)) = l.accept().await else {
            return;
        };
        let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
            return;
        };
        let (mut dr, mut dw) = down.into_split();
        let (mut ur, mut uw) = up.into_split();
        let a = async move {
            let mut b = vec![0u8; 65536];
            while let Ok(n) = dr.read(&mut b).await {
                if n == 0 {
                    break;
                }
                rec.lock().expect("record").extend_from_slice(&b[..n]);
                if tamper.load(Ordering::SeqCst) {
                    b[n - 1] ^= 0x20;
                }
                if uw.write_all(&b[..n]).await.is_err() {
                    break;
                }
            }
            let _ = uw.shutdown().await;
        };
        let b = async move {
            let _ = tokio::io::copy(&mut ur, &mut dw).await;
            let _ = dw.shutdown().await;
        };
        tokio::join!(a, b);
    });
    (addr, sent)
}

/// A forwarded-message frame as a peer sends it, for topic `topic`.
fn publish_frame(topic: &str, seq: u64) -> Vec<u8> {
    use corvid_broker::cluster::proto::{self, Frame, WireMsg};
    proto::encode(&Frame::Publish {
        msg: WireMsg {
            id: 0x5eed_0000 + seq,
            topic: topic.into(),
            payload: bytes::Bytes::from(format!("forwarded-{seq}")),
            qos: 1,
            retain: false,
            properties: None,
            publisher: "link-recorder".into(),
            expires_in_ms: None,
        },
        plain: true,
        groups: vec![],
    })
    .expect("encode")
}

/// Reads from `s` until the peer closes it (true) or 10 s pass (false).
async fn closed_by_peer(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            _ => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_or_tampered_link_bytes_deliver_nothing_and_are_counted() {
    use corvid_broker::cluster::channel;
    use corvid_broker::cluster::secret::Secret;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncWriteExt;
    let mut c = Cluster::static_loopback(2);
    c.wait_formed(&[0, 1]).await;
    let mut sub = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V5, "replay-sub")).await;
    sub.subscribe("replay/#", 1).await;
    let n1 = SocketAddr::new(c.nodes[0].spec.ip, c.nodes[0].spec.cluster);
    let n1_name = c.nodes[0].name().to_string();
    let secret = Secret::from_bytes(c.nodes[0].spec.secret.as_bytes());

    // 1. A genuine link (through a recording relay) delivers a forwarded message.
    let tamper = Arc::new(AtomicBool::new(false));
    let (via, sent) = relay(n1, tamper.clone()).await;
    let s = tokio::net::TcpStream::connect(via).await.expect("relay");
    let mut ch = channel::dial(s, &secret, "link-recorder", &n1_name)
        .await
        .expect("handshake with the right secret");
    ch.send(&publish_frame("replay/t", 1)).await.expect("send");
    let got = sub
        .next_msg(DEADLINE)
        .await
        .expect("genuine frame delivered");
    assert_eq!(got.0, "replay/t");
    drop(ch);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let captured = sent.lock().expect("captured").clone();
    assert!(captured.len() > 64, "captured {} bytes", captured.len());
    for needle in [&b"replay/t"[..], b"forwarded-1", b"link-recorder"] {
        assert!(
            !captured.windows(needle.len()).any(|w| w == needle),
            "{:?} visible in the captured link bytes",
            String::from_utf8_lossy(needle)
        );
    }

    // 2. The same bytes replayed on a fresh connection: refused, counted, nothing delivered.
    let failures = "corvid_cluster_link_auth_failures_total";
    let before = c.nodes[0].metric(failures).await.expect("metrics");
    let mut raw = tokio::net::TcpStream::connect(n1).await.expect("connect");
    let _ = raw.write_all(&captured).await;
    assert!(
        closed_by_peer(&mut raw).await,
        "n1 kept a replayed link open"
    );
    let after = c.nodes[0].metric(failures).await.expect("metrics");
    assert!(
        after > before,
        "{failures} {before} -> {after} after a replay"
    );
    assert!(
        sub.next_msg(QUIET).await.is_none(),
        "a replayed frame was delivered"
    );

    // 3. One ciphertext byte flipped after the handshake: the link is dropped and counted.
    let decrypt = "corvid_cluster_link_auth_failures_total{reason=\"decrypt\"}";
    let before = c.nodes[0].metric(decrypt).await.expect("metrics");
    let (via, _) = relay(n1, tamper.clone()).await;
    let s = tokio::net::TcpStream::connect(via).await.expect("relay");
    let mut ch = channel::dial(s, &secret, "link-recorder", &n1_name)
        .await
        .expect("handshake");
    tokio::time::sleep(Duration::from_millis(300)).await;
    tamper.store(true, Ordering::SeqCst);
    let _ = ch.send(&publish_frame("replay/t", 2)).await;
    eventually("n1 to count the tampered frame", DEADLINE, || async {
        let now = c.nodes[0].metric(decrypt).await?;
        if now > before {
            Ok(())
        } else {
            Err(format!("{decrypt} still {now}"))
        }
    })
    .await;
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_secs(10), ch.recv()).await,
            Ok(Ok(None)) | Ok(Err(_))
        ),
        "n1 kept the tampered link open"
    );
    assert!(
        sub.next_msg(QUIET).await.is_none(),
        "a tampered frame was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_adds_no_member_and_a_ghost_member_stops_holding_readiness() {
    use corvid_broker::cluster::gossip::{self, GossipKey};
    use corvid_broker::cluster::secret::Secret;
    let mut c = Cluster::static_loopback(2);
    c.wait_formed(&[0, 1]).await;
    let lo = [Ipv4Addr::LOCALHOST];
    let n1_gossip = SocketAddr::new(c.nodes[0].spec.ip, c.nodes[0].spec.cluster);
    let ready = |i: usize| {
        let n = &c.nodes[i];
        async move { n.get("/readyz").await.map(|r| r.0 == 200).unwrap_or(false) }
    };
    let counter = || prometheus::IntCounter::new("t", "t").expect("counter");
    let rejected = "corvid_cluster_gossip_rejected_total";
    let before = c.nodes[0].metric(rejected).await.expect("metrics");

    // A chitchat node with another secret, raw garbage, and an authentic but stale datagram.
    let forger_port = free_port(&lo);
    let forger_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), forger_port);
    let forger = gossip::start(
        "forger",
        1,
        forger_addr,
        forger_addr,
        vec![n1_gossip.to_string()],
        Arc::new(GossipKey::new(&Secret::from_bytes(
            b"not-this-cluster-secret-at-all!",
        ))),
        vec![
            ("link".into(), "127.0.0.1:1".into()),
            ("state".into(), "ready".into()),
        ],
        counter(),
        None,
    )
    .await
    .expect("forger gossip");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    let stale = GossipKey::new(&Secret::from_bytes(c.nodes[0].spec.secret.as_bytes()))
        .seal_at(1_000_000, b"an old capture")
        .expect("seal");
    for _ in 0..20 {
        udp.send_to(b"\x00\x01garbage gossip", n1_gossip)
            .await
            .expect("send");
        udp.send_to(&stale, n1_gossip).await.expect("send");
    }
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let m = c.nodes[0].members().await.expect("members");
        assert!(
            !m.iter().any(|x| x.0 == "forger"),
            "forged member admitted: {m:?}"
        );
        assert!(ready(0).await, "n1 turned unready under forged gossip");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = c.nodes[0].metric(rejected).await.expect("metrics");
    assert!(after >= before + 40.0, "{rejected} {before} -> {after}");
    drop(forger);

    // A member with the right secret that never links: readiness waits for it only for the
    // grace period, then the node is ready again (with a warning in its log).
    let ghost_port = free_port(&lo);
    let ghost_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ghost_port);
    let _ghost = gossip::start(
        "ghost",
        1,
        ghost_addr,
        ghost_addr,
        vec![n1_gossip.to_string()],
        Arc::new(GossipKey::new(&Secret::from_bytes(
            c.nodes[0].spec.secret.as_bytes(),
        ))),
        vec![
            ("link".into(), format!("127.0.0.1:{}", free_port(&lo))),
            ("state".into(), "ready".into()),
        ],
        counter(),
        None,
    )
    .await
    .expect("ghost gossip");
    let seen = Instant::now();
    eventually(
        "n1 to list the ghost as a live member",
        DEADLINE,
        || async {
            let m = c.nodes[0].members().await?;
            if m.iter().any(|x| x.0 == "ghost" && x.1 != "dead") {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        },
    )
    .await;
    assert!(!ready(0).await, "n1 did not wait for a new member to link");
    let grace = corvid_broker::cluster::NEVER_LINKED_GRACE;
    eventually(
        "n1 to be ready again despite the ghost",
        grace + Duration::from_secs(15),
        || async {
            if ready(0).await {
                Ok(())
            } else {
                Err("not ready".to_string())
            }
        },
    )
    .await;
    assert!(
        seen.elapsed() >= grace - Duration::from_secs(2),
        "n1 stopped waiting for the ghost after {:?}",
        seen.elapsed()
    );
    assert!(c.nodes[0].log_contains("member never linked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_through_dnsmasq() {
    let Some(dnsmasq) = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        let msg = "dnsmasq is not installed (apt-get install dnsmasq-base); skipping DNS discovery";
        if std::env::var("CORVID_REQUIRE_DNSMASQ").as_deref() == Ok("1") {
            panic!("{msg}, but CORVID_REQUIRE_DNSMASQ=1");
        }
        eprintln!("SKIP: {msg}");
        return;
    };
    if !is_root() {
        eprintln!("SKIP: DNS discovery needs root (a private mount of /etc/resolv.conf per node)");
        return;
    }
    // Three nodes on 127.0.0.1-3 sharing one cluster port, as pods behind a headless Service.
    // dnsmasq serves the name on 127.53.x.1:53; each node runs in a mount namespace whose
    // /etc/resolv.conf points there, so the system resolver chitchat uses asks dnsmasq.
    let mut c = Cluster::empty();
    let ips: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let cport = free_port(&ips);
    let dns_ip = Ipv4Addr::new(127, 53, (std::process::id() % 250) as u8 + 1, 1);
    let hosts = c.dir.path().join("headless.hosts");
    let name = "corvid-headless.corvid.svc.test";
    std::fs::write(
        &hosts,
        ips.iter()
            .map(|ip| format!("{ip} {name}\n"))
            .collect::<String>(),
    )
    .expect("hosts file");
    let resolv = c.dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {dns_ip}\noptions timeout:1 attempts:2\n"),
    )
    .expect("resolv.conf");
    let dns_log = c.dir.path().join("dnsmasq.log");
    let child = std::process::Command::new(dnsmasq)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--log-queries",
            "--pid-file=",
            "--user=root",
        ])
        .arg(format!("--listen-address={dns_ip}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--log-facility={}", dns_log.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn dnsmasq");
    c.helpers.push(child);
    eventually("dnsmasq to listen", DEADLINE, || async {
        match std::net::UdpSocket::bind((dns_ip, 53)) {
            Ok(_) => Err("port 53 still free".to_string()),
            Err(_) => Ok(()),
        }
    })
    .await;
    let wrapper = vec![
        "unshare".to_string(),
        "--mount".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        format!(
            "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
            resolv.display()
        ),
    ];
    for (i, ip) in ips.iter().enumerate() {
        let lo = [*ip];
        c.add(NodeSpec {
            name: format!("d{}", i + 1),
            ip: IpAddr::V4(*ip),
            bind: IpAddr::V4(*ip),
            mqtt: free_port(&lo),
            admin: free_port(&lo),
            cluster: cport,
            discover: Discover::Dns(name.into()),
            secret: SECRET.into(),
            wrapper: wrapper.clone(),
            cluster_extra: String::new(),
        });
    }
    c.wait_formed(&[0, 1, 2]).await;
    let queries = std::fs::read_to_string(&dns_log).unwrap_or_default();
    assert!(
        queries.contains(&format!("query[A] {name}")),
        "dnsmasq saw no query for {name}:\n{queries}"
    );
    let mut s = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V5, "dns-sub")).await;
    s.subscribe("dns/t", 1).await;
    c.wait_routes(0, 2, 1).await;
    let mut p = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V3, "dns-pub")).await;
    publish_seq(&mut p, "dns/t", 1, 10).await;
    assert_eq!(counts(&s.drain(QUIET, DEADLINE).await, "dns/t").len(), 10);
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// Runs `ip ARGS`, returning its error output on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Moves the calling thread into network namespace `name` (sockets it creates live there).
fn enter_netns(name: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn setns(fd: i32, nstype: i32) -> i32;
    }
    const CLONE_NEWNET: i32 = 0x4000_0000;
    let f = std::fs::File::open(format!("/run/netns/{name}")).map_err(|e| e.to_string())?;
    // SAFETY: setns only reads the descriptor, which stays open for the call; it changes the
    // network namespace of this thread alone.
    let rc = unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

#[test]
fn partition_and_heal_in_network_namespaces() {
    if !is_root() {
        eprintln!("SKIP: partition test needs root for `ip netns add`");
        return;
    }
    let tag = format!("cv{}", std::process::id() % 100_000);
    let hub = format!("{tag}h");
    let mut cluster = Cluster::empty();
    if let Err(e) = ip(&["netns", "add", &hub]) {
        eprintln!("SKIP: `ip netns add` is not permitted here: {e}");
        return;
    }
    cluster.namespaces.push(hub.clone());
    // hub: a bridge with 10.200.0.254 (the test's clients); n1..n3: a veth each into the bridge.
    let setup = || -> Result<(), String> {
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "addr", "add", "10.200.0.254/24", "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        Ok(())
    };
    setup().expect("hub namespace");
    for i in 1..=3 {
        let ns = format!("{tag}n{i}");
        ip(&["netns", "add", &ns]).expect("node namespace");
        cluster.namespaces.push(ns.clone());
        let v = format!("v{i}");
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &v, "netns", &hub,
        ])
        .expect("veth pair");
        ip(&["-n", &ns, "link", "set", "lo", "up"]).expect("lo up");
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.200.0.{i}/24"),
            "dev",
            "eth0",
        ])
        .expect("addr");
        ip(&["-n", &ns, "link", "set", "eth0", "up"]).expect("eth0 up");
        ip(&["-n", &hub, "link", "set", &v, "master", "br0"]).expect("bridge port");
        ip(&["-n", &hub, "link", "set", &v, "up"]).expect("veth up");
    }
    let peers: Vec<String> = (1..=3).map(|i| format!("10.200.0.{i}:4370")).collect();
    for i in 1..=3u8 {
        cluster.add(NodeSpec {
            name: format!("n{i}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 200, 0, i)),
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            mqtt: 1883,
            admin: 18083,
            cluster: 4370,
            discover: Discover::Static(peers.clone()),
            secret: SECRET.into(),
            wrapper: vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                format!("{tag}n{i}"),
            ],
            cluster_extra: String::new(),
        });
    }
    // The test's own sockets must live in the hub namespace: run it on a thread that moved there.
    let hub2 = hub.clone();
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(&hub2).expect("enter the hub namespace");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(partition_body(&mut cluster, &hub2))
            })
            .join()
    });
    if let Err(panic) = outcome {
        cluster.dump_logs(60);
        std::panic::resume_unwind(panic);
    }
}

async fn partition_body(c: &mut Cluster, hub: &str) {
    c.wait_formed(&[0, 1, 2]).await;
    ip(&["-n", hub, "link", "set", "v3", "down"]).expect("cut n3");
    let cut = Instant::now();
    for i in [0, 1] {
        let n = &c.nodes[i];
        eventually(
            &format!("{} to see the cut-off n3 not ready", n.name()),
            Duration::from_secs(30),
            || async {
                let m = n.members().await?;
                match m.iter().find(|m| m.0 == "n3") {
                    Some(x) if x.1 == "ready" => Err(format!("{m:?}")),
                    _ => Ok(m),
                }
            },
        )
        .await;
    }
    eprintln!(
        "n1 and n2 saw n3 not ready {:?} after the cut; n1 sees {:?}",
        cut.elapsed(),
        c.nodes[0].members().await
    );
    // The majority side keeps serving.
    let mut s = Client::connect(c.nodes[1].mqtt_addr(), &Opts::clean(V::V5, "p-sub")).await;
    s.subscribe("part/t", 1).await;
    c.wait_routes(0, 1, 1).await;
    let mut p = Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V3, "p-pub")).await;
    publish_seq(&mut p, "part/t", 1, 10).await;
    assert_eq!(
        counts(&s.drain(QUIET, DEADLINE).await, "part/t").len(),
        10,
        "during partition"
    );

    ip(&["-n", hub, "link", "set", "v3", "up"]).expect("heal n3");
    let healed = Instant::now();
    // Every node, n3 included, is ready again: /readyz 200 after the heal.
    c.wait_formed(&[0, 1, 2]).await;
    eprintln!(
        "n3 rejoined {:?} after the link came back",
        healed.elapsed()
    );
    // Cross-node delivery works again, to and from the healed node.
    let mut s3 = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V5, "h-sub3")).await;
    s3.subscribe("part/t", 1).await;
    c.wait_routes(0, 2, 1).await;
    publish_seq(&mut p, "part/t", 1, 10).await;
    assert_eq!(
        counts(&s3.drain(QUIET, DEADLINE).await, "part/t").len(),
        10,
        "n1 -> healed n3"
    );
    assert_eq!(
        counts(&s.drain(QUIET, DEADLINE).await, "part/t").len(),
        10,
        "n1 -> n2 after heal"
    );
    let mut p3 = Client::connect(c.nodes[2].mqtt_addr(), &Opts::clean(V::V3, "h-pub3")).await;
    c.wait_routes(2, 1, 1).await;
    publish_seq(&mut p3, "part/t", 1, 10).await;
    assert_eq!(
        counts(&s.drain(QUIET, DEADLINE).await, "part/t").len(),
        10,
        "healed n3 -> n2"
    );
    for n in &c.nodes {
        eprintln!(
            "after the heal {} /readyz: {:?}",
            n.name(),
            n.get("/readyz").await
        );
    }
    // The inter-node TCP connections n3 holds (to tell a stale inbound link from the new one).
    let ns3 = format!("{}n3", hub.trim_end_matches('h'));
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "exec", &ns3, "ss", "-tno", "state", "established"])
        .output()
    {
        eprintln!(
            "n3 TCP connections after the heal:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_under_a_steady_qos1_stream_loses_nothing() {
    let mut c = Cluster::static_loopback(3);
    c.wait_formed(&[0, 1, 2]).await;
    const SUBS: usize = 4;
    const TOPIC: &str = "ev/stream";
    let target = c.nodes[2].mqtt_addr();
    let fallback = c.nodes[1].mqtt_addr();

    // Persistent MQTT 5 subscribers on n1, the node to evacuate.
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for k in 0..SUBS {
        let id = format!("ev-sub-{k}");
        let opts = Opts::persistent(V::V5, &id);
        let first = Client::connect(c.nodes[0].mqtt_addr(), &opts).await;
        first.subscribe(TOPIC, 1).await;
        let log = Arc::new(Mutex::new(MoveLog::default()));
        logs.push(log.clone());
        // rumqttc hides the Server Reference; the bare client below checks it, so a subscriber
        // told "use another server" goes to the target.
        let to = move |l: &MoveLog| match l.disconnect.as_ref().map(|d| d.0) {
            Some(0x9C) => target,
            _ => fallback,
        };
        tasks.push(follow_moves(first, opts, to, log));
    }
    c.wait_routes(1, 0, 1).await;
    // A bare MQTT 5 connection on n1 shows the DISCONNECT's properties (rumqttc hides them).
    let watcher = raw_v5_until_disconnect(c.nodes[0].mqtt_addr(), "ev-watch").await;

    // A QoS 1 publisher on n2 at ~200 msg/s; it records which sequence numbers were acknowledged.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = Client::connect(c.nodes[1].mqtt_addr(), &Opts::clean(V::V3, "ev-pub")).await;
    let pub_task = qos1_stream(publisher, TOPIC, Duration::from_millis(5), stop.clone());

    // Stream for a second, evacuate n1 towards n3, stream on for a second after it is done.
    let stream_started = Instant::now();
    eventually("subscribers receiving the stream", DEADLINE, || async {
        let n = logs
            .iter()
            .filter(|l| !l.lock().unwrap().seqs.is_empty())
            .count();
        (n == SUBS).then_some(()).ok_or(format!("{n} of {SUBS}"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(stream_started.elapsed())).await;
    let (status, body) = c.nodes[0]
        .post(&format!(
            "/api/v1/evacuate?rate=10&server_reference={target}"
        ))
        .await
        .expect("evacuate");
    assert_eq!(status, 202, "POST /api/v1/evacuate: {body}");
    let n1 = &c.nodes[0];
    let done = eventually(
        "evacuation of n1 to finish",
        Duration::from_secs(40),
        || async {
            let j = n1.json("/api/v1/evacuate").await?;
            (j["state"] == "done")
                .then_some(j.clone())
                .ok_or(j.to_string())
        },
    )
    .await;
    eprintln!("evacuation report: {done}");
    // The node reports itself evacuating to its peers.
    let n2 = &c.nodes[1];
    let seen_as: String = n2
        .members()
        .await
        .expect("members")
        .into_iter()
        .find(|m| m.0 == "n1")
        .map(|m| m.1)
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, acked) = within("publisher to finish", Duration::from_secs(30), pub_task)
        .await
        .expect("publisher task");
    assert!(
        acked.len() as u64 > 100,
        "only {} of {sent} acknowledged",
        acked.len()
    );

    // Every subscriber must end up with every acknowledged message.
    let named: Vec<_> = (logs.iter().enumerate())
        .map(|(k, l)| (format!("ev-sub-{k}"), l.clone()))
        .collect();
    wait_all_delivered(&c, &acked, &named, "during evacuation").await;
    for t in tasks {
        t.abort();
    }
    let mut dups = 0usize;
    for (k, l) in logs.iter().enumerate() {
        let l = l.lock().unwrap();
        dups += l.seqs.values().filter(|n| **n > 1).count();
        assert_eq!(
            l.disconnect.as_ref().map(|d| d.0),
            Some(0x9C),
            "ev-sub-{k} should get DISCONNECT 0x9C (use another server): {l:?}"
        );
        assert_eq!(
            l.session_present,
            Some(true),
            "ev-sub-{k}: session kept: {l:?}"
        );
        assert_eq!(l.reconnected_to, Some(target), "ev-sub-{k}");
    }
    let seen = within("the watcher's DISCONNECT", DEADLINE, watcher)
        .await
        .expect("watcher task");
    assert_eq!(
        seen,
        Some((0x9C, Some(target.to_string()))),
        "DISCONNECT reason and server reference seen by a bare MQTT 5 client on n1"
    );
    eprintln!(
        "evacuation: published {sent}, acknowledged {}, lost 0 across {SUBS} subscribers, {dups} duplicate deliveries (QoS 1 allows them); n1 as seen by n2 during evacuation: {seen_as}",
        acked.len()
    );
    assert_eq!(done["remaining_sessions"], 0, "{done}");
}

/// What one client saw while an evacuation or rebalancing moved it (or left it where it was).
#[derive(Debug, Default)]
struct MoveLog {
    seqs: HashMap<u64, usize>,
    disconnect: Option<(u8, Option<String>)>,
    closed: bool,
    reconnected_to: Option<SocketAddr>,
    session_present: Option<bool>,
    errors: Vec<String>,
}

/// Runs a persistent subscriber: reads until the broker closes the connection, then reconnects
/// to where `to` says from what it saw (see [`reference_or`]) with its session kept, and reads
/// on; everything goes into `log`.
fn follow_moves(
    first: Client,
    opts: Opts,
    to: impl Fn(&MoveLog) -> SocketAddr + Send + 'static,
    log: Arc<Mutex<MoveLog>>,
) -> tokio::task::JoinHandle<Option<Client>> {
    tokio::spawn(async move {
        let mut client = Some(first);
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            let Some(cl) = client.as_mut() else { break };
            match tokio::time::timeout(Duration::from_secs(1), cl.rx.recv()).await {
                Err(_) => continue,
                Ok(Some(Ev::Msg { payload, .. })) => {
                    if let Some(s) = seq_of(&payload) {
                        *log.lock().unwrap().seqs.entry(s).or_default() += 1;
                    }
                }
                Ok(Some(Ev::Disconnect(r, reference))) => {
                    let mut l = log.lock().unwrap();
                    // The error path repeats the reason without the reference: keep the first.
                    if l.disconnect.as_ref().is_none_or(|d| d.1.is_none()) {
                        l.disconnect = Some((r, reference));
                    }
                }
                Ok(Some(Ev::Closed(_))) | Ok(None) => {
                    let to = {
                        let mut l = log.lock().unwrap();
                        if l.closed {
                            l.errors.push("closed a second time".into());
                        }
                        l.closed = true;
                        to(&l)
                    };
                    client = None;
                    for _ in 0..50 {
                        match Client::try_connect(to, &opts).await {
                            Ok(cl) => {
                                let mut l = log.lock().unwrap();
                                l.reconnected_to = Some(to);
                                l.session_present = Some(cl.session_present);
                                client = Some(cl);
                                break;
                            }
                            Err(e) => {
                                log.lock().unwrap().errors.push(format!("reconnect: {e}"));
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                }
                Ok(Some(_)) => {}
            }
        }
        client
    })
}

/// Where the Server Reference points, or `fallback` (MQTT 3.1.1, and where rumqttc hides the
/// reference).
fn reference_or(fallback: SocketAddr) -> impl Fn(&MoveLog) -> SocketAddr + Send + 'static {
    move |l| {
        l.disconnect
            .as_ref()
            .and_then(|d| d.1.as_deref())
            .and_then(|r| r.parse::<SocketAddr>().ok())
            .unwrap_or(fallback)
    }
}

/// Waits (at most [`DEADLINE`]) until every client in `logs` has every acknowledged message;
/// panics naming those that still miss some, `during` saying what moved them.
async fn wait_all_delivered(
    c: &Cluster,
    acked: &HashSet<u64>,
    logs: &[(String, Arc<Mutex<MoveLog>>)],
    during: &str,
) {
    let until = Instant::now() + DEADLINE;
    loop {
        let mut lost = Vec::new();
        for (name, l) in logs {
            let l = l.lock().unwrap();
            let mut missing: Vec<u64> = acked
                .iter()
                .filter(|s| !l.seqs.contains_key(s))
                .copied()
                .collect();
            missing.sort_unstable();
            if !missing.is_empty() {
                lost.push(format!(
                    "{name} (reconnected to {:?}): {} missing, first {:?}",
                    l.reconnected_to,
                    missing.len(),
                    &missing[..missing.len().min(10)]
                ));
            }
        }
        if lost.is_empty() {
            return;
        }
        if Instant::now() > until {
            c.dump_counters().await;
            panic!(
                "acknowledged messages lost {during} ({} acknowledged): {}",
                acked.len(),
                lost.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A QoS 1 publisher streaming sequence numbers to `topic` every `every` until `stop`, then
/// waiting (bounded) for the outstanding acknowledgements. Returns how many it published and
/// which were acknowledged.
fn qos1_stream(
    mut publisher: Client,
    topic: &'static str,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, HashSet<u64>)> {
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut order: std::collections::VecDeque<u64> = Default::default();
        let mut by_id: HashMap<u16, u64> = HashMap::new();
        let mut acked: HashSet<u64> = HashSet::new();
        let mut tick = tokio::time::interval(every);
        let mut drain_until: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick(), if drain_until.is_none() => {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        drain_until = Some(Instant::now() + DEADLINE);
                        continue;
                    }
                    order.push_back(seq);
                    publisher.publish(topic, 1, false, seq_payload(seq)).await;
                    seq += 1;
                }
                ev = publisher.rx.recv() => match ev {
                    Some(Ev::Sent(id)) => {
                        if let Some(s) = order.pop_front() {
                            by_id.insert(id, s);
                        }
                    }
                    Some(Ev::Acked(id)) => {
                        if let Some(s) = by_id.remove(&id) {
                            acked.insert(s);
                        }
                    }
                    Some(Ev::Closed(e)) => panic!("the publisher lost its connection: {e}"),
                    None => break,
                    _ => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(50)), if drain_until.is_some() => {}
            }
            if let Some(t) = drain_until {
                if by_id.is_empty() && order.is_empty() || Instant::now() > t {
                    break;
                }
            }
        }
        (seq, acked)
    })
}

/// Live connections a node reports in `/api/v1/stats`.
async fn connections(n: &Node) -> Result<i64, String> {
    let v = n.json("/api/v1/stats").await?;
    v["connections"]
        .as_i64()
        .ok_or_else(|| format!("no connections in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_after_scale_up_moves_half_and_loses_nothing() {
    // 40 persistent subscribers (30 MQTT 5, 10 MQTT 3.1.1) on n1 under a steady QoS 1 stream;
    // n2 joins; n1 sheds down to the mean, newest connections first, and every message
    // acknowledged to the publisher reaches every subscriber, moved or not.
    const CLIENTS: usize = 40;
    const TOPIC: &str = "rb/stream";
    let mut specs = Cluster::static_loopback_specs(2);
    for s in &mut specs {
        s.cluster_extra = "  rebalance: { enabled: true, rate: 10 }\n".into();
    }
    let spec_b = specs.pop().expect("n2 spec");
    let spec_a = specs.pop().expect("n1 spec");
    let (a_addr, b_addr) = (
        SocketAddr::new(spec_a.ip, spec_a.mqtt),
        SocketAddr::new(spec_b.ip, spec_b.mqtt),
    );
    let mut c = Cluster::empty();
    c.add(spec_a);
    c.wait_formed(&[0]).await;

    // The publisher connects first: the oldest connection, so n1 keeps it.
    let publisher = Client::connect(a_addr, &Opts::clean(V::V3, "rb-pub")).await;
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for k in 0..CLIENTS {
        let v = if k % 4 == 3 { V::V3 } else { V::V5 };
        let opts = Opts::persistent(v, &format!("rb-sub-{k}"));
        let first = Client::connect(a_addr, &opts).await;
        first.subscribe(TOPIC, 1).await;
        let log = Arc::new(Mutex::new(MoveLog::default()));
        logs.push((opts.clone(), log.clone()));
        tasks.push(follow_moves(first, opts, reference_or(b_addr), log));
    }
    let n1 = &c.nodes[0];
    eventually("n1 to hold every subscription", DEADLINE, || async {
        let v = n1.json("/api/v1/stats").await?;
        let subs = v["subscriptions"].as_u64().unwrap_or(0);
        (subs >= CLIENTS as u64).then_some(()).ok_or(v.to_string())
    })
    .await;
    // Two bare MQTT 5 connections, the newest on n1, show the DISCONNECT's Server Reference.
    let watchers = [
        raw_v5_until_disconnect(a_addr, "rb-watch-1").await,
        raw_v5_until_disconnect(a_addr, "rb-watch-2").await,
    ];
    let total = CLIENTS as i64 + 3;
    eventually("n1 to count every connection", DEADLINE, || async {
        let n = connections(n1).await?;
        (n == total).then_some(()).ok_or(format!("{n} of {total}"))
    })
    .await;
    let status = n1.json("/api/v1/rebalance").await.expect("GET rebalance");
    assert_eq!(status["enabled"], true, "{status}");
    assert_eq!(
        status["moved_total"], 0,
        "alone, n1 moves nothing: {status}"
    );

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = qos1_stream(publisher, TOPIC, Duration::from_millis(20), stop.clone());
    eventually("subscribers receiving the stream", DEADLINE, || async {
        let n = logs
            .iter()
            .filter(|(_, l)| !l.lock().unwrap().seqs.is_empty())
            .count();
        (n == CLIENTS)
            .then_some(())
            .ok_or(format!("{n} of {CLIENTS}"))
    })
    .await;

    // Scale up: n2 joins, and n1 is asked for a check at once (as the operator does).
    c.add(spec_b);
    c.wait_formed(&[0, 1]).await;
    let (code, body) = c.nodes[0].post("/api/v1/rebalance").await.expect("POST");
    assert_eq!(code, 202, "POST /api/v1/rebalance: {body}");
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);

    // Balanced: every client n1 let go is back (on n2), and each node holds 40-60 % of the 40.
    let split = eventually(
        "connections balanced between n1 and n2",
        Duration::from_secs(60),
        || async {
            let closed = logs
                .iter()
                .filter(|(_, l)| l.lock().unwrap().closed)
                .count();
            let back = logs
                .iter()
                .filter(|(_, l)| l.lock().unwrap().reconnected_to.is_some())
                .count();
            let (a, b) = (connections(n1).await? - 1, connections(n2).await?);
            let ok = closed > 0
                && back == closed
                && a + b == CLIENTS as i64
                && (16..=24).contains(&a)
                && (16..=24).contains(&b);
            let st = n1.json("/api/v1/rebalance").await?;
            (ok && st["state"] == "balanced")
                .then_some((a, b, st.clone()))
                .ok_or(format!(
                    "n1 {a} subscribers, n2 {b}, {closed} moved, {back} back; n1 {st}"
                ))
        },
    )
    .await;
    eprintln!(
        "rebalanced: n1 {} subscribers, n2 {}; {}",
        split.0, split.1, split.2
    );

    // Stream a little longer, then stop and check that nothing acknowledged was lost.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, acked) = within("publisher to finish", Duration::from_secs(30), stream)
        .await
        .expect("publisher task");
    assert!(
        acked.len() > 50,
        "only {} of {sent} acknowledged",
        acked.len()
    );
    let named: Vec<_> = (logs.iter())
        .map(|(o, l)| (o.id.clone(), l.clone()))
        .collect();
    wait_all_delivered(&c, &acked, &named, "while rebalancing").await;
    for t in tasks {
        t.abort();
    }

    // Every moved client: MQTT 5 told 0x9C, all reconnected to n2 and found their session.
    let mut moved = (0, 0);
    let mut dups = 0usize;
    for (o, l) in &logs {
        let l = l.lock().unwrap();
        dups += l.seqs.values().filter(|n| **n > 1).count();
        assert!(
            l.errors.is_empty() || l.reconnected_to.is_some(),
            "{}: {l:?}",
            o.id
        );
        if !l.closed {
            continue;
        }
        match o.v {
            V::V5 => {
                moved.0 += 1;
                assert_eq!(
                    l.disconnect.as_ref().map(|d| d.0),
                    Some(0x9C),
                    "{}: DISCONNECT use another server: {l:?}",
                    o.id
                );
            }
            V::V3 => moved.1 += 1,
        }
        assert_eq!(l.reconnected_to, Some(b_addr), "{}: {l:?}", o.id);
        assert_eq!(
            l.session_present,
            Some(true),
            "{}: session followed: {l:?}",
            o.id
        );
    }
    for w in watchers {
        let seen = within("a watcher's DISCONNECT", DEADLINE, w)
            .await
            .expect("watcher task");
        assert_eq!(
            seen,
            Some((0x9C, Some(b_addr.to_string()))),
            "the newest connections go first, told to use n2"
        );
    }
    let moved_metric = n1
        .metric("corvid_rebalance_moved_total")
        .await
        .expect("n1 metrics");
    assert!(
        (19.0..=23.0).contains(&moved_metric),
        "n1 moved {moved_metric} connections (21 expected: 43 → 22)"
    );
    assert_eq!(
        n2.metric("corvid_rebalance_moved_total")
            .await
            .expect("n2 metrics"),
        0.0,
        "the new member sends nothing back (no ping-pong)"
    );
    assert_eq!(
        n2.metric("corvid_cluster_sessions_lost_total")
            .await
            .expect("n2"),
        0.0
    );
    eprintln!(
        "rebalance: {} MQTT 5 and {} MQTT 3.1.1 subscribers moved to n2, {moved_metric} connections shed by n1; published {sent}, acknowledged {}, lost 0, {dups} duplicate deliveries (QoS 1 allows them)",
        moved.0,
        moved.1,
        acked.len()
    );
    assert!(
        moved.0 > 0 && moved.1 > 0,
        "both protocol versions were moved: {moved:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_on_request_works_with_the_periodic_check_disabled() {
    // `POST /api/v1/rebalance` is a one-off check: it moves clients even when
    // `cluster.rebalance.enabled` is false, and only then.
    const CLIENTS: usize = 12;
    let mut specs = Cluster::static_loopback_specs(2);
    for s in &mut specs {
        s.cluster_extra = "  rebalance: { enabled: false, rate: 50 }\n".into();
    }
    let spec_b = specs.pop().expect("n2 spec");
    let spec_a = specs.pop().expect("n1 spec");
    let (a_addr, b_addr) = (
        SocketAddr::new(spec_a.ip, spec_a.mqtt),
        SocketAddr::new(spec_b.ip, spec_b.mqtt),
    );
    let mut c = Cluster::empty();
    c.add(spec_a);
    c.add(spec_b);
    c.wait_formed(&[0, 1]).await;
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for k in 0..CLIENTS {
        let opts = Opts::persistent(V::V5, &format!("rb-req-{k}"));
        let first = Client::connect(a_addr, &opts).await;
        let log = Arc::new(Mutex::new(MoveLog::default()));
        logs.push(log.clone());
        tasks.push(follow_moves(first, opts, reference_or(b_addr), log));
    }
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    // n1 must know n2's count before the check, or n2 is no target yet.
    eventually("n1 to see n2 as a target", DEADLINE, || async {
        let st = n1.json("/api/v1/rebalance").await?;
        (st["connections"] == CLIENTS && st["targets"]["n2"] == 0)
            .then_some(())
            .ok_or(st.to_string())
    })
    .await;
    let before = n1.json("/api/v1/rebalance").await.expect("GET");
    assert_eq!(before["enabled"], false, "{before}");
    assert_eq!(
        before["state"], "idle",
        "never checked on its own: {before}"
    );
    let (code, body) = n1.post("/api/v1/rebalance?rate=50").await.expect("POST");
    assert_eq!(code, 202, "{body}");
    let done = eventually(
        "the requested rebalance",
        Duration::from_secs(30),
        || async {
            let (a, b) = (connections(n1).await?, connections(n2).await?);
            let st = n1.json("/api/v1/rebalance").await?;
            (a == 6 && b == 6 && st["moved_total"] == 6 && st["state"] == "done")
                .then_some(st.clone())
                .ok_or(format!("n1 {a}, n2 {b}; {st}"))
        },
    )
    .await;
    eprintln!("requested rebalance: {done}");
    for l in &logs {
        let l = l.lock().unwrap();
        if l.closed {
            assert_eq!(l.session_present, Some(true), "{l:?}");
        }
    }
    for t in tasks {
        t.abort();
    }
}

/// A clustered node's own answers — the member list with a linked peer, the rebalancer with its
/// balance figures, an evacuation running and done, and the peer seen evacuating — read exactly
/// into their `corvid-api` types (see `typed_api::strict`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_answer_reads_into_its_corvid_api_type() {
    use corvid_api::*;
    use typed_api::{json, strict};

    let mut c = Cluster::static_loopback(2);
    c.wait_formed(&[0, 1]).await;
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let view: ClusterView = strict("cluster", &n1.json("/api/v1/cluster").await.expect("GET"));
    assert!(view.synced);
    assert_eq!(view.members[0].state, MemberState::Itself);
    let peer = &view.members[1];
    assert_eq!((peer.name.as_str(), peer.state), ("n2", MemberState::Ready));
    assert!(peer.linked && peer.addr.is_some(), "{peer:?}");

    let reb: RebalanceStatus = strict(
        "rebalance",
        &n1.json("/api/v1/rebalance").await.expect("GET"),
    );
    let balance = reb
        .balance
        .expect("a clustered node reports its balance figures");
    assert!(balance.targets.contains_key("n2"), "{balance:?}");
    let (code, body) = n1.post("/api/v1/rebalance?rate=10").await.expect("POST");
    assert_eq!(code, 202, "{body}");
    strict::<RebalanceStatus>("rebalance now", &json("rebalance now", &body));

    let idle: EvacuationStatus = strict(
        "evacuation",
        &n2.json("/api/v1/evacuate").await.expect("GET"),
    );
    assert_eq!(idle.state, EvacuationState::Idle);
    let (code, body) = n2.post("/api/v1/evacuate?rate=50").await.expect("POST");
    assert_eq!(code, 202, "{body}");
    let started: EvacuationStatus = strict("evacuate", &json("evacuate", &body));
    assert!(
        matches!(
            started.state,
            EvacuationState::Running | EvacuationState::Done
        ),
        "{started:?}"
    );
    eventually("n2's evacuation to finish", DEADLINE, || async {
        let v = n2.json("/api/v1/evacuate").await?;
        let e: EvacuationStatus = strict("evacuation", &v);
        (e.state == EvacuationState::Done)
            .then_some(())
            .ok_or(format!("{e:?}"))
    })
    .await;
    eventually("n1 to see n2 evacuating", FORM, || async {
        let v = n1.json("/api/v1/cluster").await?;
        let view: ClusterView = strict("cluster", &v);
        view.members
            .iter()
            .any(|m| m.name == "n2" && m.state == MemberState::Evacuating)
            .then_some(())
            .ok_or(format!("{view:?}"))
    })
    .await;
    let own: ClusterView = strict("cluster", &n2.json("/api/v1/cluster").await.expect("GET"));
    assert_eq!(own.members[0].state, MemberState::Evacuating);
}

/// A peer that the membership declares failed while it is in fact alive (paused longer than
/// the failure detector waits) is forgotten — its routes and sync state dropped — and must come
/// back with both: the others count themselves synced again, know the subscription it made
/// before the pause, and forward to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_declared_failed_while_alive_resyncs_its_routes() {
    let mut c = Cluster::static_loopback(2);
    c.wait_formed(&[0, 1]).await;
    let mut sub = Client::connect(c.nodes[1].mqtt_addr(), &Opts::clean(V::V5, "paused-sub")).await;
    sub.subscribe("paused/#", 1).await;
    c.wait_routes(0, 1, 1).await;
    c.nodes[1].signal("-STOP");
    eventually("n1 to declare the paused n2 failed", DEADLINE, || async {
        if c.nodes[0].log_contains("member failed") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    c.nodes[1].signal("-CONT");
    // n2's subscription was made before the pause: n1 has it again only through a resync.
    c.wait_routes(0, 1, 1).await;
    c.wait_members(&[0, 1], true).await;
    let mut publisher =
        Client::connect(c.nodes[0].mqtt_addr(), &Opts::clean(V::V5, "paused-pub")).await;
    publish_seq(&mut publisher, "paused/x", 1, 5).await;
    let got = sub.drain(QUIET, DEADLINE).await;
    let want: BTreeMap<u64, usize> = (0..5).map(|s| (s, 1)).collect();
    assert_eq!(counts(&got, "paused/x"), want);
}
