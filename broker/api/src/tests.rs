//! The wire strings of every state enum, pinned in one place: changing one is a change of the
//! admin API contract that the operator, `ctl`, the e2e tools and outside checks rely on.

use super::*;

/// Asserts that `known` is exactly the list of `(value, wire string)` pairs, that each
/// serializes to and parses from its string, and that an unknown string reads as `unknown`.
fn pinned<T>(known: &[T], unknown: T, want: &[(T, &str)], as_str: fn(T) -> &'static str)
where
    T: Copy + PartialEq + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    assert_eq!(
        known,
        want.iter().map(|(v, _)| *v).collect::<Vec<_>>().as_slice(),
        "every known value is pinned here"
    );
    for (value, wire) in want {
        assert_eq!(as_str(*value), *wire);
        assert_eq!(
            serde_json::to_string(value).expect("serialize"),
            format!("\"{wire}\"")
        );
        let back: T = serde_json::from_str(&format!("\"{wire}\"")).expect("parse");
        assert_eq!(back, *value);
    }
    let future: T = serde_json::from_str("\"from-a-newer-broker\"").expect("parse unknown");
    assert_eq!(future, unknown);
    assert_eq!(as_str(unknown), "unknown");
    assert!(
        serde_json::from_str::<T>("7").is_err(),
        "a number is not a state"
    );
}

#[test]
fn member_states() {
    use MemberState::*;
    pinned(
        MemberState::KNOWN,
        Unknown,
        &[
            (Itself, "self"),
            (Ready, "ready"),
            (Joining, "joining"),
            (Evacuating, "evacuating"),
            (Dead, "dead"),
        ],
        MemberState::as_str,
    );
}

#[test]
fn only_self_ready_and_evacuating_members_are_joined() {
    use MemberState::*;
    let joined: Vec<MemberState> = [Itself, Ready, Joining, Evacuating, Dead, Unknown]
        .into_iter()
        .filter(|s| s.joined())
        .collect();
    assert_eq!(joined, vec![Itself, Ready, Evacuating]);
}

#[test]
fn evacuation_states() {
    use EvacuationState::*;
    pinned(
        EvacuationState::KNOWN,
        Unknown,
        &[(Idle, "idle"), (Running, "running"), (Done, "done")],
        EvacuationState::as_str,
    );
}

#[test]
fn rebalance_states() {
    use RebalanceState::*;
    pinned(
        RebalanceState::KNOWN,
        Unknown,
        &[
            (Idle, "idle"),
            (Balanced, "balanced"),
            (Running, "running"),
            (Settling, "settling"),
            (Done, "done"),
            (Waiting, "waiting"),
        ],
        RebalanceState::as_str,
    );
}

#[test]
fn bridge_states() {
    use BridgeState::*;
    pinned(
        BridgeState::KNOWN,
        Unknown,
        &[
            (Connecting, "connecting"),
            (Up, "up"),
            (Down, "down"),
            (Refused, "refused"),
            (Error, "error"),
        ],
        BridgeState::as_str,
    );
}

#[test]
fn webhook_states() {
    use WebhookState::*;
    pinned(
        WebhookState::KNOWN,
        Unknown,
        &[
            (Unchecked, "unchecked"),
            (Up, "up"),
            (Down, "down"),
            (Refused, "refused"),
        ],
        WebhookState::as_str,
    );
}

#[test]
fn sink_states() {
    use SinkState::*;
    pinned(
        SinkState::KNOWN,
        Unknown,
        &[
            (Connecting, "connecting"),
            (Up, "up"),
            (Down, "down"),
            (AuthFailed, "auth_failed"),
            (Error, "error"),
        ],
        SinkState::as_str,
    );
}

#[test]
fn protocol_versions_and_trace_kinds() {
    use ProtocolVersion::*;
    pinned(
        ProtocolVersion::KNOWN,
        Unknown,
        &[(V31, "V31"), (V311, "V311"), (V5, "V5")],
        ProtocolVersion::as_str,
    );
    assert_eq!(V311.label(), "3.1.1");
    pinned(
        TraceKind::KNOWN,
        TraceKind::Unknown,
        &[(TraceKind::Client, "client"), (TraceKind::Topic, "topic")],
        TraceKind::as_str,
    );
}

#[test]
fn a_single_node_rebalance_status_has_no_balance_figures() {
    let single = r#"{"enabled":false,"rate":100,"state":"idle","connections":3}"#;
    let s: RebalanceStatus = serde_json::from_str(single).expect("single node");
    assert_eq!(s.balance, None);
    assert_eq!(s.state, RebalanceState::Idle);
    assert_eq!(
        serde_json::to_value(&s).expect("value"),
        serde_json::from_str::<serde_json::Value>(single).expect("value"),
        "no balance fields appear"
    );
    let clustered = r#"{"enabled":true,"rate":5,"state":"settling","connections":9,"mean":4.5,
        "targets":{"n2":0},"planned":4,"moved_total":4,"last_check_seconds_ago":null}"#;
    let c: RebalanceStatus = serde_json::from_str(clustered).expect("clustered");
    let b = c.balance.expect("balance figures");
    assert_eq!(b.targets.get("n2"), Some(&0));
    assert_eq!(b.last_check_seconds_ago, None);
}

#[test]
fn a_client_detail_is_the_list_entry_plus_its_subscriptions() {
    let d: ClientDetail = serde_json::from_str(
        r#"{"client_id":"c1","connected":true,"connection":{"id":7,"peer":"127.0.0.1:5000",
        "listener":"mqtt","protocol":"V5","keep_alive":30,"username":null,"connected_at":1},
        "subscriptions":1,"queued":0,"inflight":0,"dropped":0,"session_expiry":0,
        "subscription_list":[{"filter":"a/#","qos":1}]}"#,
    )
    .expect("detail");
    assert_eq!(
        d.info.connection.map(|c| c.protocol),
        Some(ProtocolVersion::V5)
    );
    assert_eq!(d.subscription_list.len(), 1);
}

#[test]
fn request_options_leave_unset_fields_out_of_the_query() {
    let none = EvacuateOptions::default();
    assert_eq!(serde_json::to_string(&none).expect("json"), "{}");
    let req = TraceRequest {
        kind: TraceKind::Topic,
        client_id: None,
        topic: Some("a/#".into()),
        duration: None,
        name: None,
    };
    assert_eq!(
        serde_json::to_string(&req).expect("json"),
        r#"{"type":"topic","topic":"a/#"}"#
    );
    let odd: TraceRequest = serde_json::from_str(r#"{"type":"queue"}"#).expect("parse");
    assert_eq!(
        odd.kind,
        TraceKind::Unknown,
        "the broker answers 400, not 422"
    );
}

#[test]
fn options_become_the_query_the_broker_reads() {
    let evacuate = EvacuateOptions {
        rate: Some(200),
        server_reference: Some("mqtt-1.example:1883 a&b".into()),
        pod_uid: Some("6f1c-42".into()),
    };
    assert_eq!(
        evacuate.query(),
        "rate=200&server_reference=mqtt-1.example%3A1883%20a%26b&pod_uid=6f1c-42"
    );
    assert_eq!(EvacuateOptions::default().query(), "");
    assert_eq!(RebalanceOptions { rate: Some(5) }.query(), "rate=5");
}
