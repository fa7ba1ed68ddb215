//! The PrometheusRule: built only when asked for and installed, scoped to the cluster, and every
//! metric name in its expressions is one the broker exports (docs/broker-metrics.txt).

use std::collections::BTreeSet;

use serde_json::json;

use super::build;
use crate::build::prometheusrule::{alerts, build as build_rule};
use crate::build::Names;
use crate::testing::cluster;

/// The metric names the broker test checks against the broker's registry.
fn exported() -> BTreeSet<&'static str> {
    include_str!("../../../../docs/broker-metrics.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The metric names a PromQL expression reads: identifiers outside strings, label matchers,
/// ranges and grouping clauses (`by (…)`, `on (…)`) that are not a function call or a keyword.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 5] = ["bool", "and", "or", "unless", "offset"];
    // Blank out strings, {label matchers} and [ranges].
    let (mut depth, mut in_string) = (0, false);
    let outside: String = expr
        .chars()
        .map(|c| {
            let keep = !in_string && depth == 0 && !matches!(c, '{' | '[' | '"');
            match c {
                '"' => in_string = !in_string,
                '{' | '[' if !in_string => depth += 1,
                '}' | ']' if !in_string => depth -= 1,
                _ => {}
            }
            if keep {
                c
            } else {
                ' '
            }
        })
        .collect();
    // Tokens: identifiers, parentheses; everything else separates.
    let mut tokens: Vec<String> = Vec::new();
    let mut word = String::new();
    for c in outside.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' || (c == '.' && !word.is_empty()) {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            tokens.push(std::mem::take(&mut word));
        }
        if c == '(' || c == ')' {
            tokens.push(c.to_string());
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        // A call: `rate(`, or an aggregation with its modifier first (`sum by (…) (`).
        let call = tokens
            .get(i + 1)
            .is_some_and(|n| n == "(" || n == "by" || n == "without");
        if GROUPING.contains(&t) && tokens.get(i + 1).is_some_and(|n| n == "(") {
            // Skip the label list.
            while i < tokens.len() && tokens[i] != ")" {
                i += 1;
            }
        } else if !call
            && !KEYWORDS.contains(&t)
            && t.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
        {
            out.insert(t.to_string());
        }
        i += 1;
    }
    out
}

#[test]
fn the_extractor_finds_metrics_and_skips_labels_functions_and_keywords() {
    let names = metric_names(
        "sum by (reason, pod) (rate(a_total{x=\"b_c\", pod=~\"d-[0-9]+\"}[5m])) > 0.9 * 100 \
         and on (pod) max(b_gauge / c_gauge) < count(d)",
    );
    let want: BTreeSet<String> = ["a_total", "b_gauge", "c_gauge", "d"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, want);
}

#[test]
fn every_alert_uses_only_metrics_the_broker_exports() {
    let exported = exported();
    // With bridges and volumes, so the bridge and store alerts are checked too.
    let c = cluster(
        json!({"persistence": {"mode": "pvc"}, "bridges": {"mqtt": [{"name": "cloud",
        "remote": {"host": "mqtt.example.com"}, "egress": [{"localFilter": "a/#"}]}]}}),
    );
    let all = alerts(&c, &Names::of(&c));
    assert!(all.iter().any(|a| a.name == "CorvidBridgeDown"));
    assert!(all.iter().any(|a| a.name == "CorvidStoreFailed"));
    assert!(all.iter().any(|a| a.name == "CorvidOwnerWaitExpired"));
    assert!(all.iter().any(|a| a.name == "CorvidHeldMessagesDropped"));
    let mut used = BTreeSet::new();
    for alert in &all {
        let names = metric_names(&alert.expr);
        assert!(
            !names.is_empty(),
            "{}: no metric in {}",
            alert.name,
            alert.expr
        );
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "{} uses {name}, which is not in docs/broker-metrics.txt (the names the broker \
                 registers): {}",
                alert.name,
                alert.expr
            );
            used.insert(name);
        }
    }
    // The list holds no name that no alert uses, so it stays the alerts' own contract.
    let unused: Vec<_> = exported.iter().filter(|n| !used.contains(**n)).collect();
    assert!(unused.is_empty(), "listed but unused: {unused:?}");
}

#[test]
fn alerts_are_scoped_to_the_cluster_and_use_its_connection_limit() {
    let c = cluster(json!({"limits": {"maxConnections": 5000}}));
    let all = alerts(&c, &Names::of(&c));
    for alert in &all {
        assert!(
            alert
                .expr
                .contains("namespace=\"mqtt\", pod=~\"demo-[0-9]+\""),
            "{}: {}",
            alert.name,
            alert.expr
        );
    }
    let limit = all
        .iter()
        .find(|a| a.name == "CorvidNearConnectionLimit")
        .expect("limit alert");
    assert!(limit.expr.ends_with("> 0.9 * 5000"), "{}", limit.expr);
    assert!(
        !all.iter().any(|a| a.name.starts_with("CorvidBridge")),
        "no bridges, no bridge alerts"
    );
}

#[test]
fn prometheus_rule_needs_the_switch_and_its_crd() {
    let c = cluster(json!({"monitoring": {"prometheusRule": {"enabled": true,
        "labels": {"release": "kube-prometheus"}}}}));
    let names = Names::of(&c);
    assert!(build_rule(&c, &names, false).is_none(), "no CRD, no rule");
    let rule = build_rule(&c, &names, true).expect("built");
    assert_eq!(
        rule.types.as_ref().map(|t| t.kind.as_str()),
        Some("PrometheusRule")
    );
    let labels = rule.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("release").map(String::as_str),
        Some("kube-prometheus")
    );
    assert_eq!(
        labels.get("app.kubernetes.io/instance").map(String::as_str),
        Some("demo")
    );
    let rules = rule.data["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules");
    assert_eq!(rules.len(), 10);
    let missing = rules
        .iter()
        .find(|r| r["alert"] == "CorvidMemberMissing")
        .expect("CorvidMemberMissing");
    assert_eq!(missing["for"], "5m");
    assert_eq!(missing["labels"]["severity"], "critical");
    assert_eq!(missing["labels"]["mqttcluster"], "demo");
    let secret = rules
        .iter()
        .find(|r| r["alert"] == "CorvidWrongClusterSecret")
        .expect("CorvidWrongClusterSecret");
    assert!(secret.get("for").is_none(), "fires at once");
    let (_, off) = build(json!({}));
    assert!(off.prometheus_rule.is_none(), "off by default");
    let (_, on) = build(json!({"monitoring": {"prometheusRule": {"enabled": true}}}));
    assert!(on.prometheus_rule.is_some());
}
