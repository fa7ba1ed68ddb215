//! `corvid-liveload` against real `corvid-broker` processes on loopback: its accounting is what
//! the live proof (issue #8) asserts on, so it must report zero loss where nothing can be lost,
//! keep its figures consistent, and ride through a node's SIGTERM evacuation without losing an
//! acknowledged message.
//!
//! These need no Kubernetes. They run the `corvid-broker` next to the test binary in the cargo
//! target dir (or `$CORVID_BROKER_BIN`); without one they print SKIP and pass, unless
//! `CORVID_E2E_REQUIRED=1` (e2e/ci-kwok builds the broker first).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use corvid_api::{ClusterView, MemberState};
use corvid_e2e::{http_get, required, wait_for, TestProcess};
use serde_json::Value;

const LIVELOAD: &str = env!("CARGO_BIN_EXE_corvid-liveload");
const SECRET: &str = "corvid-liveload-test-secret-0123456789";

/// The broker binary, or `None` (after printing SKIP) when it is not built.
fn broker_binary(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CORVID_BROKER_BIN") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().expect("test executable path");
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("corvid-broker"));
    match candidate {
        Some(path) if path.exists() => Some(path),
        _ => {
            assert!(
                !required(),
                "{test}: no corvid-broker binary (cargo build -p corvid-broker, same target dir, \
                 or set CORVID_BROKER_BIN)"
            );
            eprintln!("SKIP {test}: no corvid-broker binary next to the tests");
            None
        }
    }
}

/// A port free for both TCP and UDP on loopback (the cluster port uses both).
fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(tcp) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) else {
            continue;
        };
        let port = tcp.local_addr().expect("local addr").port();
        if UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corvid-liveload-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

struct Node {
    mqtt: SocketAddr,
    admin: SocketAddr,
    process: TestProcess,
}

/// Starts a broker named `name`; `peers` are the cluster ports of a static cluster (empty: one
/// node on its own).
fn start_node(
    bin: &Path,
    dir: &Path,
    name: &str,
    cluster_port: u16,
    peers: &[u16],
) -> anyhow::Result<Node> {
    let (mqtt, admin) = (free_port(), free_port());
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET)?;
    let mut yaml = format!(
        "node: {{ name: \"{name}\" }}\n\
         listeners:\n  mqtt: {{ bind: \"127.0.0.1:{mqtt}\" }}\n  ws: {{ enabled: false }}\n\
         admin: {{ bind: \"127.0.0.1:{admin}\" }}\n\
         sys: {{ enabled: false }}\n\
         shutdown: {{ drain_timeout: 15 }}\n"
    );
    if !peers.is_empty() {
        let peers: Vec<String> = peers.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        yaml.push_str(&format!(
            "cluster:\n  port: {cluster_port}\n  bind: \"127.0.0.1\"\n  advertise: \"127.0.0.1\"\n  \
             discovery: static\n  peers: [{}]\n  secret_file: \"{}\"\n",
            peers.join(", "),
            secret.display()
        ));
    }
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml)?;
    let mut command = Command::new(bin);
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("POD_IP");
    let process = TestProcess::spawn(name, command, dir.join(format!("{name}.log")))?;
    Ok(Node {
        mqtt: SocketAddr::from(([127, 0, 0, 1], mqtt)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        process,
    })
}

/// Waits until `node` answers /readyz and (for a cluster) sees every name in `peers` ready
/// and linked.
async fn wait_ready(node: &Node, peers: &[&str]) {
    wait_for(
        &format!("{} ready with peers {peers:?}", node.process.name),
        Duration::from_secs(60),
        || async {
            let (code, body) = http_get(node.admin, "/readyz").await?;
            if code != 200 {
                return Ok(Err(format!("/readyz {code}: {body}")));
            }
            if peers.is_empty() {
                return Ok(Ok(()));
            }
            let (_, body) = http_get(node.admin, "/api/v1/cluster").await?;
            let view: ClusterView = serde_json::from_str(&body)?;
            let all = peers.iter().all(|p| {
                view.members
                    .iter()
                    .any(|m| m.name == *p && m.state == MemberState::Ready && m.linked)
            });
            Ok(if all { Ok(()) } else { Err(body) })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", node.process.log_tail(30)));
}

fn liveload(endpoints: &[SocketAddr], dir: &Path, extra: &[&str]) -> Command {
    let list: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
    let mut c = Command::new(LIVELOAD);
    c.arg("--endpoints")
        .arg(list.join(","))
        .args(["--publishers", "10", "--subscribers", "10", "--groups", "5"])
        .args(["--rate", "100", "--drain-timeout", "20"])
        .arg("--client-prefix")
        .arg(format!("t{}", std::process::id()))
        .arg("--report")
        .arg(dir.join("report.json"))
        .args(extra);
    c
}

fn read_report(dir: &Path, load: &TestProcess) -> Value {
    let text = std::fs::read_to_string(dir.join("report.json"))
        .unwrap_or_else(|e| panic!("no liveload report: {e}\n{}", load.log_tail(30)));
    serde_json::from_str(&text).expect("report is JSON")
}

fn n(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {report:#}"))
}

/// The figures must add up however the run went.
fn assert_consistent(report: &Value) {
    let (published, acked, refused, unacked) = (
        n(report, "published"),
        n(report, "acked"),
        n(report, "refused"),
        n(report, "unacked"),
    );
    assert_eq!(acked + refused + unacked, published, "{report:#}");
    assert!(n(report, "received_unique") <= published, "{report:#}");
    assert!(n(report, "lost") <= acked, "{report:#}");
    assert!(
        n(report, "lost_deliveries") >= n(report, "lost"),
        "{report:#}"
    );
    // 10 subscribers in 5 groups: every message is expected by exactly two of them.
    assert_eq!(n(report, "expected_deliveries"), 2 * acked, "{report:#}");
    assert!(report["error"].is_null(), "{report:#}");
}

/// Waits (bounded) for a process to exit by itself.
async fn wait_exit(p: &mut TestProcess, limit: Duration) {
    wait_for(&format!("{} to exit", p.name), limit, || {
        let done = p.try_wait();
        async move { Ok(done.ok_or_else(|| "still running".to_string())) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", p.log_tail(20)));
}

#[tokio::test]
async fn single_broker_loses_nothing_and_counts_exactly() {
    let Some(bin) = broker_binary("single_broker_loses_nothing_and_counts_exactly") else {
        return;
    };
    let dir = scratch_dir("single");
    let node = start_node(&bin, &dir, "solo", 0, &[]).unwrap();
    wait_ready(&node, &[]).await;

    let mut load = TestProcess::spawn(
        "corvid-liveload",
        liveload(&[node.mqtt], &dir, &["--duration", "3"]),
        dir.join("liveload.log"),
    )
    .unwrap();
    wait_exit(&mut load, Duration::from_secs(120)).await;
    let report = read_report(&dir, &load);
    assert_consistent(&report);
    let published = n(&report, "published");
    assert!(published >= 200, "3 s at 100 msg/s: {report:#}");
    assert_eq!(n(&report, "acked"), published, "{report:#}");
    assert_eq!(n(&report, "received_unique"), published, "{report:#}");
    assert_eq!(n(&report, "lost"), 0, "{report:#}");
    assert_eq!(
        n(&report, "duplicates"),
        0,
        "nothing disturbed the run: {report:#}"
    );
    assert_eq!(n(&report, "reconnects"), 0, "{report:#}");
}

#[tokio::test]
async fn sigterm_of_one_of_two_nodes_loses_no_acknowledged_message() {
    let test = "sigterm_of_one_of_two_nodes_loses_no_acknowledged_message";
    let Some(bin) = broker_binary(test) else {
        return;
    };
    let dir = scratch_dir("sigterm");
    let ports = [free_port(), free_port()];
    let n1 = start_node(&bin, &dir, "n1", ports[0], &ports).unwrap();
    let mut n2 = start_node(&bin, &dir, "n2", ports[1], &ports).unwrap();
    wait_ready(&n1, &["n2"]).await;
    wait_ready(&n2, &["n1"]).await;

    let ready = dir.join("ready");
    let stop = dir.join("stop");
    let mut load = TestProcess::spawn(
        "corvid-liveload",
        liveload(
            &[n1.mqtt, n2.mqtt],
            &dir,
            &[
                "--ready-file",
                ready.to_str().unwrap(),
                "--stop-file",
                stop.to_str().unwrap(),
            ],
        ),
        dir.join("liveload.log"),
    )
    .unwrap();
    wait_for(
        "liveload to start measuring",
        Duration::from_secs(90),
        || {
            let exists = ready.exists();
            async move {
                Ok(if exists {
                    Ok(())
                } else {
                    Err("no ready file".into())
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", load.log_tail(30)));
    // Half the clients are on n2 (endpoints are dealt round robin). Some load first, then
    // SIGTERM n2: it evacuates — clients get DISCONNECT 0x9C, sessions move to n1 — and exits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    n2.process.signal_term();
    wait_exit(&mut n2.process, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&stop, "").unwrap();
    wait_exit(&mut load, Duration::from_secs(120)).await;

    let report = read_report(&dir, &load);
    eprintln!("{report:#}");
    assert_consistent(&report);
    assert!(n(&report, "published") >= 300, "{report:#}");
    assert!(
        n(&report, "reconnects") >= 5,
        "n2's clients had to move: {report:#}\n{}",
        n1.process.log_tail(20)
    );
    assert_eq!(n(&report, "unacked"), 0, "{report:#}");
    assert_eq!(
        n(&report, "sessions_lost_subscribers") + n(&report, "sessions_lost_publishers"),
        0,
        "evacuation hands every session over: {report:#}"
    );
    assert_eq!(
        n(&report, "lost"),
        0,
        "an acknowledged message was lost: {report:#}\n{}\n{}",
        n1.process.log_tail(40),
        n2.process.log_tail(40)
    );
    assert_eq!(
        n(&report, "received_unique"),
        n(&report, "acked"),
        "{report:#}"
    );
    assert!(
        report["max_reconnect_gap_s"].as_f64().unwrap_or(f64::MAX) < 10.0,
        "{report:#}"
    );
}
