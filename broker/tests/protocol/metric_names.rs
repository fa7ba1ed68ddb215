//! The metric names the operator's PrometheusRule alerts may use (docs/broker-metrics.txt) are
//! names this broker really exports, so an alert can never watch a series that does not exist.
//! A name counts as exported when a fresh registry renders it (process metrics, plain counters
//! and gauges) or when the broker's source passes it to a registration call (labelled families
//! and the cluster and bridge layers, which register when those layers start and render only
//! once a label value was seen).

use std::path::{Path, PathBuf};

use corvid_broker::metrics::Metrics;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The calls that register a metric under the name given as their first argument.
const REGISTRATIONS: [&str; 9] = [
    "gauge(",
    "counter(",
    "gauge_vec(",
    "counter_vec(",
    "histogram(",
    "histogram_vec(",
    "vec(",
    "Opts::new(",
    "::new(",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `name` is the first argument of a registration call somewhere in the broker's crates.
fn registered_in_source(sources: &[String], name: &str) -> bool {
    let literal = format!("\"{name}\"");
    sources.iter().any(|text| {
        text.match_indices(&literal).any(|(at, _)| {
            let before = text[..at].trim_end();
            REGISTRATIONS.iter().any(|call| before.ends_with(call))
        })
    })
}

#[test]
fn every_name_the_alerts_may_use_is_registered_by_the_broker() {
    let list = std::fs::read_to_string(format!("{ROOT}/docs/broker-metrics.txt"))
        .expect("docs/broker-metrics.txt");
    let names: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!names.is_empty(), "docs/broker-metrics.txt lists no name");
    let rendered = Metrics::new().expect("metrics").render();
    let mut files = Vec::new();
    // The server's own `src` and every crate's under `broker/` (tests left out: a name they
    // mention is not a registration), so a crate added later is read without being listed.
    let broker = PathBuf::from(format!("{ROOT}/broker"));
    let crates = std::fs::read_dir(&broker)
        .expect("broker/")
        .map(|e| e.expect("entry").path());
    for src in std::iter::once(broker.join("src")).chain(crates.map(|c| c.join("src"))) {
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    let sources: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("source"))
        .collect();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            let in_registry = rendered
                .lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} ")));
            !in_registry && !registered_in_source(&sources, name)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/broker-metrics.txt lists metrics the broker does not register: {missing:?}"
    );
}

#[test]
fn a_name_the_broker_does_not_register_is_caught() {
    let sources = vec!["m.gauge_vec(\n    \"corvid_real\",\n".to_string()];
    assert!(registered_in_source(&sources, "corvid_real"));
    assert!(!registered_in_source(&sources, "corvid_made_up"));
    let mentioned_only = vec!["/// see `corvid_doc_only` and \"corvid_doc_only\"".to_string()];
    assert!(!registered_in_source(&mentioned_only, "corvid_doc_only"));
}
