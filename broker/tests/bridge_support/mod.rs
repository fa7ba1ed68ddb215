//! Real servers for the bridge tests: Debian's mosquitto and RabbitMQ started as the test's own
//! processes on free loopback ports, and Kafka through `scripts/services`. A test that cannot
//! get its server skips with a message, or fails when `CORVID_REQUIRE_BRIDGE_SERVERS=1` (CI).
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corvid_broker::bridge::{Bridge, BridgeState};
use corvid_broker::server::Running;

/// Longest a server may take to start (RabbitMQ boots an Erlang VM; the machine is shared).
pub const SERVER_START: Duration = Duration::from_secs(90);

/// Whether servers are required (CI): then a missing server fails the test.
pub fn required() -> bool {
    std::env::var("CORVID_REQUIRE_BRIDGE_SERVERS").as_deref() == Ok("1")
}

/// Reports that `what` is unavailable: panics in CI, prints a skip message otherwise.
pub fn unavailable(what: &str) {
    if required() {
        panic!("{what}, but CORVID_REQUIRE_BRIDGE_SERVERS=1");
    }
    eprintln!("SKIPPED: {what} (set CORVID_REQUIRE_BRIDGE_SERVERS=1 to make this a failure)");
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind ephemeral");
    l.local_addr().expect("local addr").port()
}

/// Waits until something accepts TCP connections on `port`, up to `limit`.
pub async fn wait_listening(port: u16, limit: Duration) -> bool {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A mosquitto process with its own configuration, killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    /// Its listener port.
    pub port: u16,
    conf: PathBuf,
}

/// The mosquitto binary, if installed.
pub fn mosquitto_bin() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Mosquitto {
    /// Starts mosquitto on `port` with `extra` configuration lines (TLS, passwords), writing
    /// its configuration into `dir`; `None` when it is not installed (after [`unavailable`]).
    pub async fn start(dir: &Path, port: u16, extra: &str) -> Option<Mosquitto> {
        let Some(_) = mosquitto_bin() else {
            unavailable("mosquitto is not installed (apt-get install mosquitto)");
            return None;
        };
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let text =
            format!("listener {port} 127.0.0.1\npersistence false\nlog_dest none\n{extra}\n");
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port,
            conf,
        };
        m.restart().await;
        Some(m)
    }

    /// Starts (again) with the same configuration and port, and waits until it listens.
    pub async fn restart(&mut self) {
        self.kill();
        let bin = mosquitto_bin().expect("mosquitto installed");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        assert!(
            wait_listening(self.port, SERVER_START).await,
            "mosquitto did not listen on {} in time",
            self.port
        );
    }

    /// Kills it (SIGKILL: the remote vanishing mid-stream) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The named bridge of a running broker.
pub fn bridge(running: &Running, name: &str) -> std::sync::Arc<Bridge> {
    running.server.bridges.get(name).expect("bridge configured")
}

/// Waits until the bridge reaches `state`.
pub async fn wait_state(running: &Running, name: &str, state: BridgeState) {
    let b = bridge(running, name);
    super_wait(&format!("bridge {name} {state:?}"), SERVER_START, || {
        b.state() == state
    })
    .await;
}

/// Polls `cond` until it holds, failing after `limit`.
pub async fn super_wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a Prometheus sample line `name{bridge="<bridge>"}` in `text`.
pub fn sample(text: &str, name: &str, bridge: &str) -> Option<f64> {
    let prefix = format!("{name}{{bridge=\"{bridge}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A server started through `scripts/services` (Kafka, RabbitMQ), stopped and wiped on drop.
pub struct Service {
    kind: &'static str,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    running: bool,
}

fn services_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services")
}

impl Service {
    /// Runs `scripts/services start <kind> --port <port>`; `None` (after [`unavailable`]) when
    /// the server cannot start here.
    pub async fn start(kind: &'static str, port: u16) -> Option<Service> {
        let script = services_script();
        let out = tokio::process::Command::new(&script)
            .args(["start", kind, "--port", &port.to_string()])
            .stdin(Stdio::null())
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => Some(Service {
                kind,
                port,
                running: true,
            }),
            Ok(o) => {
                unavailable(&format!(
                    "{kind} could not start: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                None
            }
            Err(e) => {
                unavailable(&format!("cannot run {}: {e}", script.display()));
                None
            }
        }
    }

    /// Stops it now (the remote going away); its data stays for a [`Service::start`] on the
    /// same port (a restart).
    pub fn stop(&mut self) {
        self.run_stop(false);
    }

    fn run_stop(&mut self, wipe: bool) {
        if !self.running && !wipe {
            return;
        }
        let port = self.port.to_string();
        let mut args = vec!["stop", self.kind, "--port", &port];
        if wipe {
            args.push("--wipe");
        }
        let _ = Command::new(services_script())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running = false;
    }
}

impl Drop for Service {
    /// Stops it and deletes its data: tests leave nothing behind in the cache.
    fn drop(&mut self) {
        self.run_stop(true);
    }
}
