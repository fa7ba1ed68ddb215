//! The "Trying it locally" commands of `docs/bridges.md` and `docs/eventstore.md`, run as
//! written by `scripts/docs-walkthrough` against the `corvid-broker` this build made: a
//! newcomer's first steps (start Kafka, create the topic, run a broker with a Kafka bridge,
//! publish, read the record back; start PostgreSQL and Redis, see a client online in both)
//! keep working. Each walkthrough's output must show the client it published with.
//!
//! Needs what the bridge and event-store tests need (Java and Maven for Kafka, Debian's
//! PostgreSQL and Redis, mosquitto's clients); skips with a message when one is missing,
//! fails instead with `CORVID_REQUIRE_BRIDGE_SERVERS=1` (CI). The walkthroughs use fixed
//! ports (as a reader would), so they run one after the other in one test.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn required() -> bool {
    std::env::var("CORVID_REQUIRE_BRIDGE_SERVERS").as_deref() == Ok("1")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs one doc's walkthrough; returns its combined output, failing the test on a non-zero exit.
fn walkthrough(doc: &str) -> String {
    let out = Command::new(repo().join("scripts/docs-walkthrough"))
        .arg(repo().join(doc))
        .env("CORVID_BROKER_BIN", env!("CARGO_BIN_EXE_corvid-broker"))
        .current_dir(repo())
        .output()
        .expect("run scripts/docs-walkthrough");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{doc}: the walkthrough failed ({}):\n{text}",
        out.status
    );
    text
}

/// Best-effort clean-up of what the walkthroughs leave (they keep data on purpose).
fn cleanup() {
    let quiet = |script: &str, args: &[&str]| {
        let _ = Command::new(repo().join(script)).args(args).output();
    };
    quiet(
        "scripts/services",
        &["stop", "kafka", "--port", "29092", "--wipe"],
    );
    quiet("scripts/db-services", &["stop", "postgres", "--wipe"]);
    quiet("scripts/db-services", &["stop", "redis", "--wipe"]);
}

#[test]
fn trying_it_locally_runs_as_written() {
    let missing: Vec<&str> = [
        "java",
        "mvn",
        "mosquitto_pub",
        "mosquitto_sub",
        "psql",
        "redis-cli",
        "curl",
        "setsid",
    ]
    .into_iter()
    .filter(|t| !have(t))
    .collect();
    if !missing.is_empty() {
        let what = format!("docs walkthroughs need {missing:?}");
        assert!(!required(), "{what}, but CORVID_REQUIRE_BRIDGE_SERVERS=1");
        eprintln!("SKIPPED: {what}");
        return;
    }
    cleanup();
    let bridges = walkthrough("docs/bridges.md");
    let eventstore = walkthrough("docs/eventstore.md");
    cleanup();
    // The record read back from Kafka: headers, key (the publisher's client id), value.
    assert!(
        bridges
            .lines()
            .any(|l| l.contains("sensors/dev-1/temp") && l.contains("\tdev-1\t21.5")),
        "bridges.md: the record never came back:\n{bridges}"
    );
    assert!(
        bridges.contains("\"state\":\"up\"") && bridges.contains("\"sent\":1"),
        "{bridges}"
    );
    // The subscriber online in PostgreSQL (a row) and Redis (the online set), and both sinks up.
    assert!(
        eventstore
            .lines()
            .any(|l| l.trim_start().starts_with("dev-1 ")),
        "eventstore.md: dev-1 not online in PostgreSQL:\n{eventstore}"
    );
    assert!(
        eventstore.lines().any(|l| l.trim() == "dev-1"),
        "eventstore.md: dev-1 not in Redis's online set:\n{eventstore}"
    );
    assert_eq!(
        eventstore.matches("\"state\":\"up\"").count(),
        2,
        "{eventstore}"
    );
}
