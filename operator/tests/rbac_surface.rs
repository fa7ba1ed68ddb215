//! Fails when the operator's RBAC grows (or shrinks) without `rbac-surface.txt` being edited:
//! install.yaml's rules, and the rules written in the Helm chart's templates, must grant exactly
//! the permissions listed there. e2e/packaging-check runs the same comparison on real
//! `helm template` renders (scripts/rbac-surface), per mode.

use std::collections::BTreeSet;

/// (kind, apiGroup, resource, verb, resourceName); kind is empty when it is not known.
type Permission = (String, String, String, String, String);

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The listed permissions of `modes`.
fn listed(modes: &[&str]) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for line in read("operator/tests/rbac-surface.txt").lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || fields[0].starts_with('#') || !modes.contains(&fields[0]) {
            continue;
        }
        assert!(
            (5..=6).contains(&fields.len()),
            "malformed line in rbac-surface.txt: {line}"
        );
        let group = if fields[2] == "core" { "" } else { fields[2] };
        for verb in fields[4].split(',') {
            out.insert((
                fields[1].to_string(),
                group.to_string(),
                fields[3].to_string(),
                verb.to_string(),
                fields.get(5).unwrap_or(&"").to_string(),
            ));
        }
    }
    assert!(!out.is_empty(), "no entries for {modes:?}");
    out
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every permission of one rule.
fn expand(kind: &str, rule: &serde_yaml::Value, out: &mut BTreeSet<Permission>) {
    let mut names = strings(&rule["resourceNames"]);
    if names.is_empty() {
        names.push(String::new());
    }
    for group in strings(&rule["apiGroups"]) {
        for resource in strings(&rule["resources"]) {
            for verb in strings(&rule["verbs"]) {
                for name in &names {
                    out.insert((
                        kind.to_string(),
                        group.clone(),
                        resource.clone(),
                        verb.clone(),
                        name.clone(),
                    ));
                }
            }
        }
    }
}

fn without_kind(set: &BTreeSet<Permission>) -> BTreeSet<Permission> {
    set.iter()
        .map(|(_, g, r, v, n)| (String::new(), g.clone(), r.clone(), v.clone(), n.clone()))
        .collect()
}

fn assert_same(what: &str, granted: &BTreeSet<Permission>, listed: &BTreeSet<Permission>) {
    let extra: Vec<_> = granted.difference(listed).collect();
    let missing: Vec<_> = listed.difference(granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what} differs from operator/tests/rbac-surface.txt\n granted but not listed: {extra:#?}\n listed but not granted: {missing:#?}\nedit the list only for a verb an operator call needs"
    );
}

#[test]
fn install_yaml_grants_exactly_the_listed_permissions() {
    let text = read("manifests/install.yaml");
    let mut granted = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("yaml");
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind == "ClusterRole" || kind == "Role" {
            for rule in doc["rules"].as_sequence().into_iter().flatten() {
                expand(kind, rule, &mut granted);
            }
        }
    }
    assert_same("manifests/install.yaml", &granted, &listed(&["install"]));
}

/// The chart's rules, read from its templates: one flow-style rule per `- apiGroups: [...]`
/// with `resources`, optional `resourceNames` and `verbs` lines, template lines skipped (every
/// conditional counts as taken).
fn chart_rules(template: &str) -> BTreeSet<Permission> {
    let mut granted = BTreeSet::new();
    let mut rule = serde_yaml::Mapping::new();
    for line in read(template).lines() {
        let line = line.trim();
        if line.starts_with('#') || line.contains("{{") {
            continue;
        }
        let line = line.strip_prefix("- ").unwrap_or(line);
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if !matches!(key, "apiGroups" | "resources" | "resourceNames" | "verbs") {
            continue;
        }
        let value: serde_yaml::Value = serde_yaml::from_str(value.trim())
            .unwrap_or_else(|e| panic!("{template}: `{line}`: {e}"));
        assert!(
            value.is_sequence(),
            "{template}: write RBAC rules in flow style (`{key}: [a, b]`) so this test reads them: `{line}`"
        );
        if key == "apiGroups" {
            assert!(
                rule.is_empty(),
                "{template}: rule without verbs before `{line}`"
            );
        }
        rule.insert(key.into(), value);
        if key == "verbs" {
            expand("", &serde_yaml::Value::Mapping(rule.clone()), &mut granted);
            rule.clear();
        }
    }
    granted
}

#[test]
fn the_chart_grants_exactly_the_listed_permissions() {
    let mut granted = chart_rules("helm/corvid-operator/templates/_helpers.tpl");
    granted.extend(chart_rules("helm/corvid-operator/templates/rbac.yaml"));
    assert_same(
        "the Helm chart's RBAC templates",
        &granted,
        &without_kind(&listed(&["helm", "helm-ns"])),
    );
}

#[test]
fn both_chart_modes_grant_the_same_permissions() {
    // watchNamespaces moves rules from the ClusterRole into Roles; it never changes them.
    assert_eq!(
        without_kind(&listed(&["helm"])),
        without_kind(&listed(&["helm-ns"]))
    );
}
