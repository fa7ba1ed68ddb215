//! End-to-end check of corvid-bench against a real broker: Debian's mosquitto on a free loopback
//! port. Skipped (with a message) when mosquitto is not installed, unless
//! `CORVID_REQUIRE_MOSQUITTO=1` says it must be there.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A mosquitto process that is killed when the test ends, however it ends.
struct Mosquitto {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mosquitto_binary() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mosquitto"))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| Some(PathBuf::from("/usr/sbin/mosquitto")).filter(|p| p.is_file()))
}

/// Starts mosquitto, or returns `None` (after saying why) when the test should be skipped.
fn start_mosquitto(test: &str) -> Option<Mosquitto> {
    let Some(bin) = mosquitto_binary() else {
        if std::env::var("CORVID_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
            panic!("mosquitto is not installed but CORVID_REQUIRE_MOSQUITTO=1");
        }
        eprintln!("skipping {test}: mosquitto is not installed (apt-get install mosquitto)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = std::env::temp_dir().join(format!("corvid-bench-test-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"),
    )
    .expect("write config");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    let broker = Mosquitto { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(broker)
}

/// Runs `corvid-bench <command> --port <port> <args…> --json` (`args` split on white space)
/// against a mosquitto started for `test`, and returns its report; `None` when the test is
/// skipped (see [`start_mosquitto`]).
fn bench(test: &str, command: &str, args: &str) -> Option<Value> {
    let broker = start_mosquitto(test)?;
    Some(run(&broker, command, &format!("{args} --json")))
}

/// Runs `corvid-bench <command> --port <port> <args…>` against `broker` and parses the one JSON
/// object it prints.
fn run(broker: &Mosquitto, command: &str, args: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_corvid-bench"))
        .arg(command)
        .args(["--port", &broker.port.to_string()])
        .args(args.split_whitespace())
        .output()
        .expect("run bench");
    assert!(
        out.status.success(),
        "corvid-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn qos1_run_delivers_every_message_exactly_once() {
    let Some(r) = bench(
        "qos1_run_delivers_every_message_exactly_once",
        "pub-sub",
        "--scenario p2p --publishers 2 --qos 1 --rate 400 --duration 1 --warmup 0.5",
    ) else {
        return;
    };
    assert!(count(&r, "sent") >= 500, "{r}");
    assert_eq!(
        count(&r, "expected"),
        count(&r, "sent"),
        "p2p: one delivery per message"
    );
    assert_eq!(count(&r, "delivered"), count(&r, "expected"), "{r}");
    assert_eq!(count(&r, "lost"), 0);
    assert_eq!(count(&r, "duplicates"), 0);
    assert_eq!(count(&r, "connect_errors"), 0);
    assert!(
        r["latency"]["p99_us"].as_u64().unwrap_or(0) > 0,
        "latency recorded: {r}"
    );
}

#[test]
fn mqtt5_qos2_fan_in_counts_every_subscriber() {
    let Some(r) = bench(
        "mqtt5_qos2_fan_in_counts_every_subscriber",
        "pub-sub",
        "--protocol 5 --scenario fan-in --publishers 3 --subscribers 2 --qos 2 --rate 300 \
         --duration 1 --warmup 0",
    ) else {
        return;
    };
    assert_eq!(
        count(&r, "expected"),
        2 * count(&r, "sent"),
        "two subscribers see every message"
    );
    assert_eq!(count(&r, "delivered"), count(&r, "expected"), "{r}");
    assert_eq!(count(&r, "duplicates"), 0);
}

#[test]
fn conn_mode_holds_idle_connections() {
    let Some(r) = bench(
        "conn_mode_holds_idle_connections",
        "conn",
        "--connections 50 --hold 0.5",
    ) else {
        return;
    };
    assert_eq!(count(&r, "established"), 50, "{r}");
    assert_eq!(count(&r, "connect_errors"), 0);
    assert_eq!(count(&r, "dropped"), 0);
}

/// `--subscribe`: each connection counts as up only once its own subscription is acknowledged.
#[test]
fn conn_mode_with_a_subscription_each() {
    let Some(r) = bench(
        "conn_mode_with_a_subscription_each",
        "conn",
        "--connections 50 --hold 0.5 --subscribe",
    ) else {
        return;
    };
    assert_eq!(count(&r, "established"), 50, "{r}");
    assert_eq!(count(&r, "connect_errors"), 0);
    assert_eq!(count(&r, "dropped"), 0);
}

/// `backlog`: the sessions are left offline with their backlog queued, and `check` gets every
/// message back on the same broker; a session the broker never had counts as lost.
#[test]
fn backlog_fill_then_check_finds_every_message() {
    let test = "backlog_fill_then_check_finds_every_message";
    let Some(broker) = start_mosquitto(test) else {
        return;
    };
    let backlog = |phase: &str, prefix: &str| {
        run(
            &broker,
            "backlog",
            &format!(
                "--phase {phase} --sessions 7 --messages 700 --prefix {prefix} --connect-timeout 3"
            ),
        )
    };
    let fill = backlog("fill", "bl-a");
    assert_eq!(count(&fill, "acknowledged"), 700, "{fill}");
    let check = backlog("check", "bl-a");
    assert_eq!(count(&check, "sessions_present"), 7, "{check}");
    assert_eq!(count(&check, "received"), 700, "{check}");
    assert_eq!(count(&check, "lost"), 0, "{check}");
    // Sessions nobody filled: not present, and their whole backlog is counted lost.
    let empty = backlog("check", "bl-never");
    assert_eq!(count(&empty, "sessions_present"), 0, "{empty}");
    assert_eq!(count(&empty, "lost"), 700, "{empty}");
}
