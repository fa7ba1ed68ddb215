//! Volume expansion planning: quantities, which claims grow, when the StatefulSet is re-created,
//! and every refusal.

use k8s_openapi::api::apps::v1::StatefulSet;
use serde_json::json;

use super::*;
use crate::testing::cluster;

fn claim(name: &str, size: &str) -> Claim {
    Claim {
        name: name.to_string(),
        requested: Some(size.to_string()),
        storage_class: Some("fast".to_string()),
    }
}

fn sts(size: &str) -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": {"name": "demo"},
        "spec": {
            "selector": {}, "serviceName": "demo-headless", "template": {},
            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                "spec": {"resources": {"requests": {"storage": size}}}}],
        },
    }))
    .expect("statefulset")
}

#[test]
fn quantities_compare_exactly_across_suffixes() {
    let q = |s| quantity_millis(s);
    assert_eq!(q("1Gi"), q("1024Mi"));
    assert_eq!(q("1.5Gi"), q("1536Mi"));
    assert_eq!(q("1G"), q("1e9"));
    assert_eq!(q("1000M"), q("1G"));
    assert_eq!(q("500m"), Some(500));
    assert_eq!(q("2"), Some(2000));
    assert!(q("1Gi") > q("1G"));
    assert!(q("10Gi") > q("9.5Gi"));
    for bad in ["", "Gi", "-1Gi", "1GB", "1..2Gi", "ten", "1e99"] {
        assert_eq!(q(bad), None, "{bad}");
    }
}

#[test]
fn growing_asks_the_small_claims_then_recreates_the_statefulset() {
    let claims = [claim("data-demo-0", "1Gi"), claim("data-demo-1", "1Gi")];
    assert_eq!(
        plan("5Gi", Some("1Gi"), &claims, &ClassExpansion::Allowed),
        Expansion::Grow {
            size: "5Gi".to_string(),
            claims: vec!["data-demo-0".to_string(), "data-demo-1".to_string()],
            recreate_statefulset: true,
        }
    );
}

#[test]
fn an_interrupted_expansion_carries_on_with_what_is_left() {
    // data-demo-0 already grew before the last reconcile failed.
    let claims = [claim("data-demo-0", "5Gi"), claim("data-demo-1", "1Gi")];
    assert_eq!(
        plan("5Gi", Some("1Gi"), &claims, &ClassExpansion::Allowed),
        Expansion::Grow {
            size: "5Gi".to_string(),
            claims: vec!["data-demo-1".to_string()],
            recreate_statefulset: true,
        }
    );
    // Every claim grew, only the StatefulSet is left: the class is not even needed.
    let grown = [claim("data-demo-0", "5Gi")];
    assert_eq!(
        plan(
            "5Gi",
            Some("1Gi"),
            &grown,
            &ClassExpansion::Forbidden("no".into())
        ),
        Expansion::Grow {
            size: "5Gi".to_string(),
            claims: Vec::new(),
            recreate_statefulset: true,
        }
    );
}

#[test]
fn the_same_size_spelled_differently_changes_nothing() {
    let claims = [claim("data-demo-0", "1Gi")];
    assert_eq!(
        plan("1024Mi", Some("1Gi"), &claims, &ClassExpansion::Allowed),
        Expansion::Nothing
    );
    let mut c = cluster(json!({"persistence": {"mode": "pvc", "size": "1024Mi"}}));
    assert!(!wanted(&c, Some(&sts("1Gi"))), "no API call at rest");
    c.spec.persistence.size = "2Gi".to_string();
    assert!(wanted(&c, Some(&sts("1Gi"))));
    assert!(
        !wanted(&c, None),
        "no StatefulSet yet: the apply creates it"
    );
    let memory = cluster(json!({"persistence": {"mode": "none", "size": "2Gi"}}));
    assert!(!wanted(&memory, Some(&sts("1Gi"))));
}

#[test]
fn shrinking_is_refused_naming_both_sizes() {
    let claims = [claim("data-demo-0", "5Gi")];
    let Expansion::Refused(why) = plan("1Gi", Some("5Gi"), &claims, &ClassExpansion::Allowed)
    else {
        panic!("shrink accepted");
    };
    assert!(why.contains("cannot shrink from 5Gi to 1Gi"), "{why}");
}

#[test]
fn a_class_without_expansion_is_refused_naming_it_and_the_claims() {
    let claims = [claim("data-demo-0", "1Gi")];
    let class = ClassExpansion::Forbidden(
        "StorageClass fast does not allow volume expansion (allowVolumeExpansion is not true)"
            .to_string(),
    );
    let Expansion::Refused(why) = plan("5Gi", Some("1Gi"), &claims, &class) else {
        panic!("expansion without class support");
    };
    assert!(
        why.contains("data-demo-0")
            && why.contains("StorageClass fast does not allow")
            && why.contains("back to 1Gi"),
        "{why}"
    );
    let unknown = ClassExpansion::Unknown("StorageClass gone does not exist".to_string());
    assert!(matches!(
        plan("5Gi", Some("1Gi"), &claims, &unknown),
        Expansion::Refused(why) if why.contains("gone does not exist")
    ));
    assert!(matches!(
        plan("lots", Some("1Gi"), &claims, &ClassExpansion::Allowed),
        Expansion::Refused(why) if why.contains("not a quantity")
    ));
}

#[test]
fn claims_are_recognised_by_name() {
    assert!(is_claim_of("data-demo-0", "demo"));
    assert!(is_claim_of("data-demo-12", "demo"));
    assert!(
        !is_claim_of("data-demo-1-0", "demo"),
        "cluster demo-1's claim"
    );
    assert!(!is_claim_of("data-demo-", "demo"));
    assert!(!is_claim_of("logs-demo-0", "demo"));
}

#[test]
fn a_refused_expansion_keeps_the_stored_claim_template() {
    let mut desired = sts("5Gi");
    keep_claim_template(&mut desired, &sts("1Gi"));
    assert_eq!(template_size(&desired).as_deref(), Some("1Gi"));
}
