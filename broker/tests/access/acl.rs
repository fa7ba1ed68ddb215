//! ACL over real sockets, both protocol versions: placeholders, the `eq` form, SUBACK failure
//! codes (3.1.1 0x80, 5.0 0x87), refused PUBLISH (3.1.1 dropped, 5.0 PUBACK/PUBREC 0x87), the
//! dashboard-on-`$SYS` example, and the default (no rules) allowing everything.

use crate::access_support;

use std::time::Duration;

use access_support::*;
use corvid_broker::config::{AclAction, AclRule, AclWho, AclWhoOne, AllClients, Permission};

fn rule(p: Permission, who: AclWho, action: AclAction, topics: &[&str]) -> AclRule {
    AclRule {
        permission: p,
        who,
        action,
        topics: topics.iter().map(|s| s.to_string()).collect(),
    }
}

const ALL: AclWho = AclWho::All(AllClients::All);

fn user(u: &str) -> AclWho {
    AclWho::One(AclWhoOne {
        user: Some(u.into()),
        ..Default::default()
    })
}

/// The production-style policy: deny by default.
fn production() -> corvid_broker::Config {
    let mut c = config();
    c.acl.no_match = Permission::Deny;
    c.acl.rules = vec![
        rule(
            Permission::Allow,
            user("dashboard"),
            AclAction::Subscribe,
            &["$SYS/#"],
        ),
        rule(
            Permission::Deny,
            ALL,
            AclAction::Subscribe,
            &["eq devices/#"],
        ),
        rule(
            Permission::Allow,
            ALL,
            AclAction::All,
            &["devices/%c/#", "users/%u/#", "eq devices/#"],
        ),
        rule(
            Permission::Allow,
            ALL,
            AclAction::Subscribe,
            &["devices/+/status"],
        ),
    ];
    c
}

#[tokio::test]
async fn subscribe_placeholders_eq_and_suback_codes() {
    let r = start(production()).await;
    let a = mqtt(&r);
    let mut c3 = v3::connect(a, "d3", Some(("ann", "x"))).await.expect("v3");
    let mut c5 = v5::connect(a, "d5", Some(("bob", "x"))).await.expect("v5");

    use v3::SubscribeReasonCode as S3;
    use v5::SubscribeReasonCode as S5;
    // %c and %u substituted.
    assert_eq!(
        c3.subscribe("devices/d3/#", v3::QoS::AtLeastOnce).await,
        vec![S3::Success(v3::QoS::AtLeastOnce)]
    );
    assert_eq!(
        c3.subscribe("users/ann/inbox", v3::QoS::AtMostOnce).await,
        vec![S3::Success(v3::QoS::AtMostOnce)]
    );
    assert_eq!(
        c5.subscribe("devices/d5/cmd", v5::QoS::AtLeastOnce).await,
        vec![S5::Success(v5::QoS::AtLeastOnce)]
    );
    // Someone else's topics: refused, 0x80 for 3.1.1, 0x87 for 5.0.
    assert_eq!(
        c3.subscribe("devices/d5/#", v3::QoS::AtMostOnce).await,
        vec![S3::Failure]
    );
    assert_eq!(
        c5.subscribe("users/ann/inbox", v5::QoS::AtMostOnce).await,
        vec![S5::NotAuthorized]
    );
    // The eq deny rule matches only the literal `devices/#` ...
    assert_eq!(
        c5.subscribe("devices/#", v5::QoS::AtMostOnce).await,
        vec![S5::NotAuthorized]
    );
    // ... so `devices/+/status` reaches the later allow rule,
    assert_eq!(
        c5.subscribe("devices/+/status", v5::QoS::AtMostOnce).await,
        vec![S5::Success(v5::QoS::AtMostOnce)]
    );
    // and a subscription wildcard is not covered by a narrower rule.
    assert_eq!(
        c3.subscribe("devices/+/cmd", v3::QoS::AtMostOnce).await,
        vec![S3::Failure]
    );
    // $SYS only for the dashboard user.
    assert_eq!(
        c5.subscribe("$SYS/#", v5::QoS::AtMostOnce).await,
        vec![S5::NotAuthorized]
    );
    let mut dash = v5::connect(a, "dash", Some(("dashboard", "x")))
        .await
        .expect("dashboard");
    assert_eq!(
        dash.subscribe("$SYS/#", v5::QoS::AtMostOnce).await,
        vec![S5::Success(v5::QoS::AtMostOnce)]
    );
    // Refused subscriptions were not made.
    let subs = r.broker.sessions.get("d5").expect("session");
    assert!(!subs
        .state
        .lock()
        .subscriptions
        .contains_key("users/ann/inbox"));
    assert_eq!(
        metric(
            &r,
            "corvid_acl_total",
            &[r#"action="subscribe""#, r#"permission="deny""#]
        )
        .await,
        5.0
    );
}

#[tokio::test]
async fn refused_publish_dropped_v3_and_0x87_v5() {
    let r = start(production()).await;
    let a = mqtt(&r);
    // The listener may read everything: it is the client `devices/+/status` is for.
    let mut watcher = v3::connect(a, "watch", None).await.expect("watcher");
    assert_eq!(
        watcher
            .subscribe("devices/+/status", v3::QoS::AtLeastOnce)
            .await,
        vec![v3::SubscribeReasonCode::Success(v3::QoS::AtLeastOnce)]
    );

    let mut c5 = v5::connect(a, "p5", None).await.expect("v5");
    // Allowed: own device topic.
    let ok = c5.publish_qos1("devices/p5/status", "ok").await;
    assert_eq!(watcher.publish_in().await.0, "devices/p5/status");
    assert_eq!(ok, v5::PubAckReason::Success);
    // Refused: PUBACK 0x87 for QoS 1, PUBREC 0x87 for QoS 2, nothing delivered.
    let reason = c5.publish_qos1("devices/other/status", "no").await;
    assert_eq!(reason, v5::PubAckReason::NotAuthorized);
    c5.send("devices/other/status", v5::QoS::ExactlyOnce, "no")
        .await;
    let rec = c5
        .next("PUBREC", |p| match p {
            v5::Packet::PubRec(a) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(rec, rumqttc::v5::mqttbytes::v5::PubRecReason::NotAuthorized);

    // 3.1.1: acknowledged as usual, silently dropped; the connection stays usable.
    let mut c3 = v3::connect(a, "p3", None).await.expect("v3");
    for qos in [
        v3::QoS::AtMostOnce,
        v3::QoS::AtLeastOnce,
        v3::QoS::ExactlyOnce,
    ] {
        c3.client
            .publish("devices/other/status", qos, false, "no")
            .await
            .expect("publish");
    }
    c3.next("PUBACK", |p| {
        matches!(p, v3::Packet::PubAck(_)).then_some(())
    })
    .await;
    c3.next("PUBCOMP", |p| {
        matches!(p, v3::Packet::PubComp(_)).then_some(())
    })
    .await;
    c3.send("devices/p3/status", v3::QoS::AtLeastOnce, "ok")
        .await;
    assert_eq!(watcher.publish_in().await.0, "devices/p3/status");
    assert_eq!(watcher.quiet_for(Duration::from_millis(300)).await, None);
    assert_eq!(
        metric(
            &r,
            "corvid_acl_total",
            &[r#"action="publish""#, r#"permission="deny""#]
        )
        .await,
        5.0
    );
}

#[tokio::test]
async fn default_config_allows_everything() {
    let r = start(config()).await;
    let a = mqtt(&r);
    let mut c5 = v5::connect(a, "any5", None).await.expect("v5");
    assert_eq!(
        c5.subscribe("#", v5::QoS::AtLeastOnce).await,
        vec![v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
    );
    let c3 = v3::connect(a, "any3", None).await.expect("v3");
    c3.send("x/y", v3::QoS::AtLeastOnce, "hi").await;
    assert_eq!(c5.publish_in().await, ("x/y".to_string(), b"hi".to_vec()));
}
