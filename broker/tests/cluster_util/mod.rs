//! Shared pieces of the multi-process cluster tests: real `corvid-broker` processes on free
//! ports (or in network namespaces of their own), each logging to its own file, killed on drop
//! with their log tails printed when a test fails; a tiny HTTP client for the admin API; and
//! thin rumqttc v3/v5 wrappers that turn a client's event loop into a channel of events.
//!
//! Every wait here is a condition polled against a deadline; nothing sleeps and hopes.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The broker binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_corvid-broker");
/// Longest a cluster may take to form (gossip rounds, links, route sync) on a loaded machine.
pub const FORM: Duration = Duration::from_secs(40);
/// Longest any single client-level wait may take.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// The secret every well-behaved node of a test cluster shares (at least 16 bytes).
pub const SECRET: &str = "corvid-cluster-test-secret-0123456789";

/// Awaits `fut`, failing the test with `what` after `limit`.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls the async condition `cond` every 100 ms until it returns `Some`, failing the test
/// with `what` (and the last value it saw) after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let until = Instant::now() + limit;
    loop {
        let last = match cond().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        if Instant::now() >= until {
            panic!("timed out after {limit:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port free for TCP and UDP on every address in `ips`, never handed out twice by this
/// process (tests of one binary run in parallel).
pub fn free_port(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..200 {
        let Ok(l) = TcpListener::bind((ips[0], 0)) else {
            continue;
        };
        let Ok(port) = l.local_addr().map(|a| a.port()) else {
            continue;
        };
        let free = ips
            .iter()
            .all(|ip| TcpListener::bind((*ip, port)).is_ok() || *ip == ips[0])
            && ips.iter().all(|ip| UdpSocket::bind((*ip, port)).is_ok());
        drop(l);
        if !free {
            continue;
        }
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        if taken.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free port found in 200 tries");
}

/// How a node finds its peers.
#[derive(Debug, Clone)]
pub enum Discover {
    /// `--discovery static --peers …`.
    Static(Vec<String>),
    /// `--discovery dns --dns-name NAME`.
    Dns(String),
}

/// Everything needed to start one node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// Address every port binds to, advertised to peers and used by clients.
    pub ip: IpAddr,
    /// Listener bind address (`ip`, or 0.0.0.0 inside a namespace).
    pub bind: IpAddr,
    /// MQTT port.
    pub mqtt: u16,
    /// Admin HTTP port.
    pub admin: u16,
    /// Cluster port (TCP links and UDP gossip).
    pub cluster: u16,
    /// Peer discovery.
    pub discover: Discover,
    /// Secret file contents.
    pub secret: String,
    /// Command run in front of the broker (`ip netns exec NS`, `unshare …`).
    pub wrapper: Vec<String>,
    /// More YAML lines of the `cluster:` section, each indented two spaces (`rebalance: …`).
    pub cluster_extra: String,
}

/// One running broker process.
pub struct Node {
    /// What it was started with.
    pub spec: NodeSpec,
    /// Its log file.
    pub log: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Writes the node's config and secret under `dir` and starts it.
    pub fn start(dir: &Path, spec: NodeSpec) -> Node {
        let mut node = Node {
            log: dir.join(format!("{}.log", spec.name)),
            dir: dir.to_path_buf(),
            spec,
            child: None,
        };
        node.launch();
        node
    }

    fn launch(&mut self) {
        let s = &self.spec;
        let secret = self.dir.join(format!("{}.secret", s.name));
        fs::write(&secret, &s.secret).expect("write secret");
        // Like every production node: the admin API needs a token (the netns nodes bind it on a
        // non-loopback address, which is refused without one).
        let token = self.dir.join(format!("{}.admin-token", s.name));
        fs::write(&token, ADMIN_TOKEN).expect("write admin token");
        let (discovery, peers) = match &s.discover {
            Discover::Static(p) => (
                "static",
                format!(
                    "  peers: [{}]\n",
                    p.iter()
                        .map(|x| format!("\"{x}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Discover::Dns(n) => ("dns", format!("  dns_name: \"{n}\"\n")),
        };
        let yaml = format!(
            "node: {{ name: \"{name}\" }}\n\
             log: {{ level: \"info,chitchat=warn\" }}\n\
             listeners:\n  mqtt: {{ bind: \"{bind}:{mqtt}\" }}\n  ws: {{ enabled: false }}\n\
             admin: {{ bind: \"{bind}:{admin}\", token_file: \"{token}\" }}\n\
             sys: {{ enabled: false }}\n\
             shutdown: {{ drain_timeout: 5 }}\n\
             cluster:\n  port: {cport}\n  bind: \"{bind}\"\n  advertise: \"{ip}\"\n  discovery: {discovery}\n{peers}  secret_file: \"{secret}\"\n{extra}",
            name = s.name,
            bind = s.bind,
            ip = s.ip,
            mqtt = s.mqtt,
            admin = s.admin,
            cport = s.cluster,
            secret = secret.display(),
            token = token.display(),
            extra = s.cluster_extra,
        );
        let cfg = self.dir.join(format!("{}.yaml", s.name));
        fs::write(&cfg, yaml).expect("write config");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let mut cmd = match s.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["serve", "--config"])
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env_remove("POD_IP")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn corvid-broker"));
    }

    /// The node's primary secret file.
    pub fn secret_path(&self) -> PathBuf {
        self.dir.join(format!("{}.secret", self.spec.name))
    }

    /// Replaces the node's secret files while it runs, as Kubernetes updates a mounted
    /// Secret (each file swapped whole): the primary, and `accepted` (empty: no accepted key)
    /// at `accepted_file`. A restart keeps the new primary.
    pub fn write_keys(&mut self, primary: &str, accepted_file: &Path, accepted: &str) {
        let swap = |path: &Path, body: &str| {
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, body).expect("write key");
            fs::rename(&tmp, path).expect("swap key file");
        };
        swap(accepted_file, accepted);
        swap(&self.secret_path(), primary);
        self.spec.secret = primary.to_string();
    }

    /// Starts the process again with the same configuration (after a kill).
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Where clients connect.
    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::new(self.spec.ip, self.spec.mqtt)
    }

    /// The admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.spec.ip, self.spec.admin)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` (`-STOP`, `-CONT`) to the running process: a paused node looks dead to its
    /// peers while its sockets stay open.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("the node runs").to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// `kill -9`, then reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process has exited (and reaps it if so).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// GET `path` on the admin port.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        http(self.admin_addr(), "GET", path).await
    }

    /// POST `path` on the admin port.
    pub async fn post(&self, path: &str) -> Result<(u16, String), String> {
        http(self.admin_addr(), "POST", path).await
    }

    /// GET `path` as JSON, requiring 200.
    pub async fn json(&self, path: &str) -> Result<Value, String> {
        let (status, body) = self.get(path).await?;
        if status != 200 {
            return Err(format!("{path}: HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))
    }

    /// `/api/v1/cluster`'s members as `(name, state, linked, routes)`.
    pub async fn members(&self) -> Result<Vec<(String, String, bool, u64)>, String> {
        let v = self.json("/api/v1/cluster").await?;
        let members = v["members"]
            .as_array()
            .ok_or_else(|| format!("no members in {v}"))?;
        Ok(members
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["state"].as_str().unwrap_or_default().to_string(),
                    m["linked"].as_bool().unwrap_or(false),
                    m["routes"].as_u64().unwrap_or(0),
                )
            })
            .collect())
    }

    /// The sum of every sample of metric `name` (all label sets), or 0 when absent.
    pub async fn metric(&self, name: &str) -> Result<f64, String> {
        let (status, body) = self.get("/metrics").await?;
        if status != 200 {
            return Err(format!("/metrics: HTTP {status}"));
        }
        Ok(metric_sum(&body, name).unwrap_or(0.0))
    }

    /// Whether `/metrics` mentions metric `name` at all.
    pub async fn has_metric(&self, name: &str) -> Result<bool, String> {
        let (_, body) = self.get("/metrics").await?;
        Ok(metric_sum(&body, name).is_some())
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the node's log contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains(needle)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sums the samples of `name` (with or without labels) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// The admin token every test node is given and every admin call presents.
pub const ADMIN_TOKEN: &str = "corvid-test-admin-token";

/// A minimal HTTP/1.1 request with `Connection: close` and the test nodes' admin token,
/// bounded by a 5 s deadline.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Connection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_response(&raw)
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| Err(format!("{method} {addr}{path}: no answer within 5s")))
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed HTTP response: {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).map_err(|e| format!("chunk size: {e}"))?;
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((status, out))
}

/// A set of nodes (and the network namespaces they run in) that is torn down on drop, printing
/// every node's log tail if the test is failing.
pub struct Cluster {
    /// The nodes, in start order.
    pub nodes: Vec<Node>,
    /// Their working directory (configs, secrets, logs).
    pub dir: tempfile::TempDir,
    /// Network namespaces to delete on drop.
    pub namespaces: Vec<String>,
    /// Other processes to kill on drop (dnsmasq).
    pub helpers: Vec<Child>,
}

impl Cluster {
    /// An empty cluster with a fresh working directory.
    pub fn empty() -> Cluster {
        Cluster {
            nodes: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("corvid-cluster-")
                .tempdir()
                .expect("tempdir"),
            namespaces: Vec::new(),
            helpers: Vec::new(),
        }
    }

    /// `n` nodes on 127.0.0.1 with static discovery of each other.
    pub fn static_loopback(n: usize) -> Cluster {
        let mut c = Cluster::empty();
        for spec in Cluster::static_loopback_specs(n) {
            c.add(spec);
        }
        c
    }

    /// The specs of `n` nodes on 127.0.0.1 that list each other as static peers, not started
    /// (a test adjusts them and starts some later, as a scale-up does).
    pub fn static_loopback_specs(n: usize) -> Vec<NodeSpec> {
        let lo = [Ipv4Addr::LOCALHOST];
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(&lo), free_port(&lo), free_port(&lo)))
            .collect();
        let peers: Vec<String> = ports
            .iter()
            .map(|(_, _, cl)| format!("127.0.0.1:{cl}"))
            .collect();
        ports
            .into_iter()
            .enumerate()
            .map(|(i, (mqtt, admin, cluster))| NodeSpec {
                name: format!("n{}", i + 1),
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
                mqtt,
                admin,
                cluster,
                discover: Discover::Static(peers.clone()),
                secret: SECRET.into(),
                wrapper: Vec::new(),
                cluster_extra: String::new(),
            })
            .collect()
    }

    /// Starts one more node.
    pub fn add(&mut self, spec: NodeSpec) -> usize {
        let node = Node::start(self.dir.path(), spec);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Waits until every node in `idx` answers `/readyz` with 200 and sees every other node
    /// in `idx` as `ready` and linked.
    pub async fn wait_formed(&mut self, idx: &[usize]) {
        self.wait_members(idx, true).await
    }

    /// Waits until every node in `idx` sees every other node in `idx` as `ready` and linked
    /// (and, with `readyz`, also answers `/readyz` with 200).
    pub async fn wait_members(&mut self, idx: &[usize], readyz: bool) {
        let started = Instant::now();
        for &i in idx {
            let others: Vec<String> = idx
                .iter()
                .filter(|j| **j != i)
                .map(|j| self.nodes[*j].name().to_string())
                .collect();
            let node = &self.nodes[i];
            eventually(
                &format!("{} to join {others:?} and turn ready", node.name()),
                FORM.saturating_sub(started.elapsed())
                    .max(Duration::from_secs(5)),
                || async {
                    let members = node.members().await?;
                    for o in &others {
                        let ok = members
                            .iter()
                            .any(|(n, st, linked, _)| n == o && st == "ready" && *linked);
                        if !ok {
                            return Err(format!("{o} not ready+linked in {members:?}"));
                        }
                    }
                    let (status, body) = node.get("/readyz").await?;
                    if readyz && status != 200 {
                        return Err(format!("/readyz {status} {body}"));
                    }
                    Ok(())
                },
            )
            .await;
        }
    }

    /// Waits until node `at` knows at least `min` routes of peer `peer`.
    pub async fn wait_routes(&self, at: usize, peer: usize, min: u64) {
        let node = &self.nodes[at];
        let peer = self.nodes[peer].name().to_string();
        eventually(
            &format!("{} to learn {min} route(s) of {peer}", node.name()),
            DEADLINE,
            || async {
                let members = node.members().await?;
                match members.iter().find(|m| m.0 == peer) {
                    Some(m) if m.3 >= min => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    /// Prints every node's `corvid_messages_dropped_total` and cluster counters (after a
    /// failed delivery check, to say where messages went).
    pub async fn dump_counters(&self) {
        for n in &self.nodes {
            let Ok((_, body)) = n.get("/metrics").await else {
                continue;
            };
            let lines: Vec<&str> = body
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && (l.starts_with("corvid_messages_dropped")
                            || l.starts_with("corvid_cluster_"))
                })
                .collect();
            eprintln!("----- {} counters -----\n{}", n.name(), lines.join("\n"));
        }
    }

    /// Prints every node's log tail.
    pub fn dump_logs(&self, lines: usize) {
        for n in &self.nodes {
            eprintln!(
                "----- {} ({}) last {lines} log lines -----\n{}",
                n.name(),
                n.log.display(),
                n.log_tail(lines)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        for h in &mut self.helpers {
            let _ = h.kill();
            let _ = h.wait();
        }
        if std::thread::panicking() {
            self.dump_logs(60);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// What a client saw.
#[derive(Debug, Clone)]
pub enum Ev {
    /// A PUBLISH.
    Msg {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Bytes,
        /// QoS.
        qos: u8,
        /// Retain flag.
        retain: bool,
    },
    /// A QoS 1/2 PUBLISH of ours left with this packet id.
    Sent(u16),
    /// PUBACK or PUBCOMP for this packet id.
    Acked(u16),
    /// The server sent DISCONNECT (MQTT 5) with this reason and server reference.
    Disconnect(u8, Option<String>),
    /// The connection ended.
    Closed(String),
}

/// Protocol version of a test client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V {
    /// MQTT 3.1.1.
    V3,
    /// MQTT 5.
    V5,
}

/// Connection options of a test client.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Protocol.
    pub v: V,
    /// Client id.
    pub id: String,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// MQTT 5 session expiry interval.
    pub expiry: Option<u32>,
    /// User name sent in CONNECT (empty password), if any.
    pub user: Option<String>,
}

impl Opts {
    /// A clean client.
    pub fn clean(v: V, id: &str) -> Opts {
        Opts {
            v,
            id: id.into(),
            clean: true,
            expiry: None,
            user: None,
        }
    }

    /// A persistent session (3.1.1 clean session 0; 5: clean start 0, expiry 1 h).
    pub fn persistent(v: V, id: &str) -> Opts {
        Opts {
            v,
            id: id.into(),
            clean: false,
            expiry: Some(3600),
            user: None,
        }
    }

    /// The same options with a user name.
    pub fn with_user(mut self, user: &str) -> Opts {
        self.user = Some(user.into());
        self
    }
}

enum Handle {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A connected test client: requests go through `publish`/`subscribe`, everything the event
/// loop sees arrives on `rx`.
pub struct Client {
    handle: Handle,
    /// Events.
    pub rx: mpsc::UnboundedReceiver<Ev>,
    /// CONNACK's session present flag.
    pub session_present: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn qos3(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Client {
    /// Connects to `addr`, waiting (bounded) for a successful CONNACK.
    pub async fn connect(addr: SocketAddr, o: &Opts) -> Client {
        match Client::try_connect(addr, o).await {
            Ok(c) => c,
            Err(e) => panic!("client {} cannot connect to {addr}: {e}", o.id),
        }
    }

    /// Connects to `addr`; `Err` if the broker refuses or the connection fails.
    pub async fn try_connect(addr: SocketAddr, o: &Opts) -> Result<Client, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel::<Result<bool, String>>();
        let host = addr.ip().to_string();
        let (handle, task) = match o.v {
            V::V3 => {
                let mut m = rumqttc::MqttOptions::new(&o.id, host, addr.port());
                m.set_keep_alive(Duration::from_secs(10))
                    .set_clean_session(o.clean)
                    .set_inflight(100);
                if let Some(u) = &o.user {
                    m.set_credentials(u, "");
                }
                let (c, mut el) = rumqttc::AsyncClient::new(m, 10_000);
                let task = tokio::spawn(async move {
                    let mut ack_tx = Some(ack_tx);
                    loop {
                        use rumqttc::{Event, Outgoing, Packet};
                        match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(a))) => {
                                if let Some(t) = ack_tx.take() {
                                    let r = if a.code == rumqttc::ConnectReturnCode::Success {
                                        Ok(a.session_present)
                                    } else {
                                        Err(format!("CONNACK {:?}", a.code))
                                    };
                                    let _ = t.send(r);
                                }
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let _ = tx.send(Ev::Msg {
                                    topic: p.topic.clone(),
                                    payload: p.payload.clone(),
                                    qos: p.qos as u8,
                                    retain: p.retain,
                                });
                            }
                            Ok(Event::Incoming(Packet::PubAck(a))) => {
                                let _ = tx.send(Ev::Acked(a.pkid));
                            }
                            Ok(Event::Incoming(Packet::PubComp(a))) => {
                                let _ = tx.send(Ev::Acked(a.pkid));
                            }
                            Ok(Event::Outgoing(Outgoing::Publish(id))) if id != 0 => {
                                let _ = tx.send(Ev::Sent(id));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                if let Some(t) = ack_tx.take() {
                                    let _ = t.send(Err(e.to_string()));
                                }
                                let _ = tx.send(Ev::Closed(e.to_string()));
                                return;
                            }
                        }
                    }
                });
                (Handle::V3(c), task)
            }
            V::V5 => {
                let mut m = rumqttc::v5::MqttOptions::new(&o.id, host, addr.port());
                m.set_keep_alive(Duration::from_secs(10))
                    .set_clean_start(o.clean)
                    .set_session_expiry_interval(o.expiry);
                if let Some(u) = &o.user {
                    m.set_credentials(u, "");
                }
                let (c, mut el) = rumqttc::v5::AsyncClient::new(m, 10_000);
                let task = tokio::spawn(async move {
                    let mut ack_tx = Some(ack_tx);
                    loop {
                        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
                        use rumqttc::v5::Event;
                        use rumqttc::Outgoing;
                        match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(a))) => {
                                if let Some(t) = ack_tx.take() {
                                    let r = if a.code == ConnectReturnCode::Success {
                                        Ok(a.session_present)
                                    } else {
                                        Err(format!("CONNACK {:?}", a.code))
                                    };
                                    let _ = t.send(r);
                                }
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let _ = tx.send(Ev::Msg {
                                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                    payload: p.payload.clone(),
                                    qos: p.qos as u8,
                                    retain: p.retain,
                                });
                            }
                            Ok(Event::Incoming(Packet::PubAck(a))) => {
                                let _ = tx.send(Ev::Acked(a.pkid));
                            }
                            Ok(Event::Incoming(Packet::PubComp(a))) => {
                                let _ = tx.send(Ev::Acked(a.pkid));
                            }
                            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                                let reference =
                                    d.properties.and_then(|p| p.server_reference.clone());
                                let _ = tx.send(Ev::Disconnect(d.reason_code as u8, reference));
                            }
                            Ok(Event::Outgoing(Outgoing::Publish(id))) if id != 0 => {
                                let _ = tx.send(Ev::Sent(id));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                // rumqttc reports a server DISCONNECT as an error (and drops
                                // its properties, so the server reference is not visible here).
                                if let rumqttc::v5::ConnectionError::MqttState(
                                    rumqttc::v5::StateError::ServerDisconnect {
                                        reason_code, ..
                                    },
                                ) = &e
                                {
                                    let _ = tx.send(Ev::Disconnect(*reason_code as u8, None));
                                }
                                if let Some(t) = ack_tx.take() {
                                    let _ = t.send(Err(e.to_string()));
                                }
                                let _ = tx.send(Ev::Closed(e.to_string()));
                                return;
                            }
                        }
                    }
                });
                (Handle::V5(c), task)
            }
        };
        let got = tokio::time::timeout(Duration::from_secs(10), ack_rx).await;
        let session_present = match got {
            Ok(Ok(Ok(sp))) => sp,
            Ok(Ok(Err(e))) => {
                task.abort();
                return Err(e);
            }
            Ok(Err(_)) => {
                task.abort();
                return Err("event loop ended before CONNACK".into());
            }
            Err(_) => {
                task.abort();
                return Err("no CONNACK within 10s".into());
            }
        };
        Ok(Client {
            handle,
            rx,
            session_present,
            task,
        })
    }

    /// Publishes the sequence numbers `seqs` on `topic` at `qos` and, for QoS 1 and 2, waits
    /// until every one is acknowledged (PUBACK, PUBCOMP).
    pub async fn publish_seqs(&mut self, topic: &str, qos: u8, seqs: std::ops::Range<u64>) {
        let n = seqs.end.saturating_sub(seqs.start);
        for seq in seqs {
            self.publish(topic, qos, false, seq_payload(seq)).await;
        }
        if qos == 0 {
            return;
        }
        let mut acked = 0;
        within("PUBACK/PUBCOMP for every publish", DEADLINE, async {
            while acked < n {
                match self.rx.recv().await {
                    Some(Ev::Acked(_)) => acked += 1,
                    Some(Ev::Closed(e)) => panic!("publisher closed: {e}"),
                    None => panic!("publisher event loop ended"),
                    Some(_) => {}
                }
            }
        })
        .await;
    }

    /// Subscribes to `filter` at `qos` and waits for the SUBACK to be requested (the request is
    /// queued in order; callers that need the route elsewhere wait for it separately).
    pub async fn subscribe(&self, filter: &str, qos: u8) {
        let r = match &self.handle {
            Handle::V3(c) => c
                .subscribe(filter, qos3(qos))
                .await
                .map_err(|e| e.to_string()),
            Handle::V5(c) => c
                .subscribe(filter, qos5(qos))
                .await
                .map_err(|e| e.to_string()),
        };
        r.expect("subscribe request");
    }

    /// Publishes `payload` to `topic`.
    pub async fn publish(&self, topic: &str, qos: u8, retain: bool, payload: Vec<u8>) {
        let r = match &self.handle {
            Handle::V3(c) => c
                .publish(topic, qos3(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Handle::V5(c) => c
                .publish(topic, qos5(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
        };
        r.expect("publish request");
    }

    /// Sends DISCONNECT (a normal close: no will, session kept if persistent).
    pub async fn disconnect(&self) {
        let _ = match &self.handle {
            Handle::V3(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Handle::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }

    /// Next PUBLISH within `limit`, skipping other events; `None` on timeout or close.
    pub async fn next_msg(&mut self, limit: Duration) -> Option<(String, Bytes, u8, bool)> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(Ev::Msg {
                    topic,
                    payload,
                    qos,
                    retain,
                })) => return Some((topic, payload, qos, retain)),
                Ok(Some(Ev::Closed(_))) | Ok(None) | Err(_) => return None,
                Ok(Some(_)) => {}
            }
        }
    }

    /// Collects every PUBLISH that arrives until none has come for `quiet`, or `limit` passed.
    pub async fn drain(&mut self, quiet: Duration, limit: Duration) -> Vec<(String, Bytes)> {
        let until = tokio::time::Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let wait = (tokio::time::Instant::now() + quiet).min(until);
            match tokio::time::timeout_at(wait, self.rx.recv()).await {
                Ok(Some(Ev::Msg { topic, payload, .. })) => out.push((topic, payload)),
                Ok(Some(Ev::Closed(_))) | Ok(None) | Err(_) => return out,
                Ok(Some(_)) => {}
            }
        }
    }
}

/// Payload carrying a sequence number (and some padding so it looks like data).
pub fn seq_payload(seq: u64) -> Vec<u8> {
    format!("{seq:010}-corvid-cluster-test").into_bytes()
}

/// The sequence number of a [`seq_payload`].
pub fn seq_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..10)?).ok()?.parse().ok()
}

/// A bare MQTT 5 connection that only waits for the server's DISCONNECT and returns its reason
/// code and Server Reference property (rumqttc does not expose the properties).
pub async fn raw_v5_until_disconnect(
    addr: SocketAddr,
    client_id: &str,
) -> tokio::task::JoinHandle<Option<(u8, Option<String>)>> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("raw connect");
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).await.expect("raw CONNECT");
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            // Parse whole packets out of the buffer.
            while buf.len() >= 2 {
                let (len, used) = varint(&buf[1..])?;
                if buf.len() < 1 + used + len {
                    break;
                }
                let header = buf[0];
                let body: Vec<u8> = buf[1 + used..1 + used + len].to_vec();
                buf.drain(..1 + used + len);
                if header >> 4 == 14 {
                    let reason = body.first().copied().unwrap_or(0);
                    return Some((reason, server_reference(body.get(1..).unwrap_or(&[]))));
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(until, s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    })
}

fn varint(b: &[u8]) -> Option<(usize, usize)> {
    let (mut n, mut mult) = (0usize, 1usize);
    for (i, byte) in b.iter().take(4).enumerate() {
        n += usize::from(byte & 0x7f) * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

/// The Server Reference (0x1C) in an MQTT 5 property block (length-prefixed).
fn server_reference(props: &[u8]) -> Option<String> {
    let (len, used) = varint(props)?;
    let mut p = props.get(used..used + len)?;
    while let Some((&id, rest)) = p.split_first() {
        match id {
            // UTF-8 string properties: reason string, server reference.
            0x1F | 0x1C => {
                let n = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
                let v = std::str::from_utf8(rest.get(2..2 + n)?).ok()?.to_string();
                if id == 0x1C {
                    return Some(v);
                }
                p = &rest[2 + n..];
            }
            // Session expiry interval (four-byte integer).
            0x11 => p = rest.get(4..)?,
            // User property: two strings.
            0x26 => {
                let k = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
                let r = rest.get(2 + k..)?;
                let v = usize::from(u16::from_be_bytes([*r.first()?, *r.get(1)?]));
                p = r.get(2 + v..)?;
            }
            _ => return None,
        }
    }
    None
}
