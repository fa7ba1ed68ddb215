//! The bodies of Corvid's fuzz targets: every decoder a hostile client, load balancer, peer or
//! configuration author can reach, each driven the way the broker drives it. A target must
//! never panic, overflow the stack or hang; where a cheap invariant exists it is asserted too.
//! `fuzz_targets/*.rs` wrap these for libFuzzer; `scripts/fuzz` runs them.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use corvid_broker::codec::{Codec, QoS, SubOptions};
use corvid_broker::config::{Config, Overrides, SharedStrategy};
use corvid_broker::message::Message;
use corvid_broker::retained::Retained;
use corvid_broker::router::Router;
use corvid_broker::session::Session;
use corvid_broker::topic::{self, TopicLimits};

/// The topic bounds the broker applies at its edge by default (`mqtt.max_topic_levels`,
/// `mqtt.max_topic_length`), so the tries below only ever see what a client could insert.
const LIMITS: TopicLimits = TopicLimits {
    max_levels: 128,
    max_len: 65535,
};

/// The MQTT codec wrapper on arbitrary bytes, as a connection feeds it: decode packets until it
/// needs more input or refuses the stream. The buffer is fed in two pieces so partial packets
/// are exercised too.
pub fn packet_decode(data: &[u8]) {
    let mut codec = Codec::new(64 * 1024);
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut buf = BytesMut::new();
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// Splits fuzz input into NUL-separated UTF-8 tokens (lossy), at most `max` of them.
fn tokens(data: &[u8], max: usize) -> Vec<String> {
    data.split(|b| *b == 0)
        .take(max)
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect()
}

/// Subscribe / unsubscribe / route sequences on the subscription trie, every filter and topic
/// validated as the broker's edge validates them. Each routed target must hold a live
/// subscription whose filter really matches the topic.
pub fn topic_router(data: &[u8]) {
    let router = Router::default();
    let sessions: Vec<Arc<Session>> = (0..4)
        .map(|i| Session::new(ByteString::from(format!("c{i}")), 0))
        .collect();
    let mut live: Vec<(usize, Option<String>, String)> = Vec::new();
    for tok in tokens(data, 256) {
        let Some((&op, rest)) = tok.as_bytes().split_first() else {
            continue;
        };
        let rest = std::str::from_utf8(rest).unwrap_or_default();
        let client = usize::from(op >> 4) % sessions.len();
        match op % 3 {
            0 => {
                let Ok(f) = LIMITS.filter(rest) else { continue };
                let opts = SubOptions::qos(QoS::AtLeastOnce);
                router.subscribe(f.group, f.filter, &sessions[client], opts, None);
                let entry = (client, f.group.map(str::to_string), f.filter.to_string());
                if !live.contains(&entry) {
                    live.push(entry);
                }
            }
            1 => {
                let Ok(f) = LIMITS.filter(rest) else { continue };
                router.unsubscribe(f.group, f.filter, &format!("c{client}"));
                live.retain(|(c, g, fl)| {
                    !(*c == client && g.as_deref() == f.group && fl == f.filter)
                });
            }
            _ => {
                if LIMITS.name(rest).is_err() {
                    continue;
                }
                for t in router.route(rest, "publisher", SharedStrategy::RoundRobin) {
                    let holds = live.iter().any(|(c, _, f)| {
                        sessions[*c].client_id == t.session.client_id && topic::matches(f, rest)
                    });
                    assert!(
                        holds,
                        "routed {rest:?} to {} without a matching subscription",
                        t.session.client_id
                    );
                }
            }
        }
    }
    assert_eq!(router.subscription_count(), live.len());
}

/// Retained messages set, cleared (empty payload) and collected by filters, topics and filters
/// validated as at the broker's edge.
pub fn retained(data: &[u8]) {
    let store = Retained::default();
    for tok in tokens(data, 256) {
        let Some((&op, rest)) = tok.as_bytes().split_first() else {
            continue;
        };
        let rest = std::str::from_utf8(rest).unwrap_or_default();
        if op % 2 == 0 {
            if LIMITS.name(rest).is_err() || topic::has_wildcards(rest) {
                continue;
            }
            let payload = if op % 4 == 0 {
                Bytes::new()
            } else {
                Bytes::from_static(b"x")
            };
            store.set(Arc::new(Message::new(
                ByteString::from(rest),
                payload,
                QoS::AtMostOnce,
                true,
                None,
                ByteString::from_static("fuzz"),
            )));
        } else {
            let Ok(f) = LIMITS.filter(rest) else { continue };
            for m in store.matching(f.filter) {
                assert!(
                    topic::matches(f.filter, &m.topic),
                    "{:?} returned for {:?}",
                    m.topic,
                    f.filter
                );
            }
        }
    }
}

/// `corvid.yaml` text through the same loader as `corvid-broker serve --config`.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::from_text("fuzz", text, std::iter::empty(), &Overrides::default());
}

/// PROXY protocol v1/v2 headers as a load balancer (or an impostor) sends them.
pub fn proxy_header(data: &[u8]) {
    if let Ok(Some((len, _))) = corvid_broker::listener::proxy::parse_header(data) {
        assert!(
            len <= data.len(),
            "header length {len} beyond the {} bytes read",
            data.len()
        );
    }
}

/// Inter-node link frames as a peer (or an attacker on the pod network) sends them; a frame
/// that decodes must encode again (a frame of a kind this version does not know is skipped).
pub fn cluster_frame(data: &[u8]) {
    if let Ok(Some(frame)) = corvid_broker::cluster::proto::decode(data) {
        let again = corvid_broker::cluster::proto::encode(&frame);
        assert!(again.is_ok(), "a decoded frame must encode: {frame:?}");
    }
}
