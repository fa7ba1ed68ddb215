//! Shared plumbing for Corvid's end-to-end tests: find the cluster that `e2e/cluster up` started
//! (or skip cleanly when there is none), run the kubectl it built, and poll with deadlines.
//!
//! The tests talk to a real kube-apiserver; nothing here mocks Kubernetes. Without `KUBECONFIG`
//! every test prints `SKIP` and passes, so a plain `cargo test` works on any machine; with
//! `CORVID_E2E_REQUIRED=1` (as `e2e/ci-kwok` sets) a missing cluster fails the run instead.

pub mod local;
pub mod proof;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client};

/// Env var that turns "no cluster" from a skip into a failure (set by CI).
pub const REQUIRED_ENV: &str = "CORVID_E2E_REQUIRED";

/// True when a missing cluster must fail the test run rather than skip it.
pub fn required() -> bool {
    std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A client for the e2e cluster named by `KUBECONFIG`, or `None` (after printing why) when the
/// test should be skipped. Panics when the cluster is required but absent or unreachable.
pub async fn cluster(test: &str) -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        assert!(
            !required(),
            "{test}: KUBECONFIG is not set but {REQUIRED_ENV}=1; start a cluster with \
             `e2e/cluster up` and export the KUBECONFIG=… line it prints"
        );
        eprintln!(
            "SKIP {test}: KUBECONFIG is not set (run `e2e/cluster up` and export the \
             KUBECONFIG=… line it prints, or run e2e/ci-kwok)"
        );
        return None;
    }
    match Client::try_default().await {
        Ok(client) => Some(client),
        Err(err) => panic!("{test}: cannot build a Kubernetes client from KUBECONFIG: {err}"),
    }
}

/// The repository root, for reading committed manifests and pinned versions.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The k8s.io/kubernetes version pinned in e2e/gomod/kubernetes/go.mod, which is the version
/// `e2e/cluster build` compiles; the apiserver must report exactly this.
pub fn pinned_kubernetes_version() -> anyhow::Result<String> {
    let path = repo_root().join("e2e/gomod/kubernetes/go.mod");
    let gomod = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    gomod
        .lines()
        .filter_map(|line| line.trim().strip_prefix("k8s.io/kubernetes "))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .find(|version| version.starts_with('v'))
        .context("no k8s.io/kubernetes requirement in e2e/gomod/kubernetes/go.mod")
}

/// The kubectl to run: `$CORVID_E2E_KUBECTL`, else the one `e2e/cluster build` cached, else
/// whatever `kubectl` is on PATH.
pub fn kubectl_path() -> PathBuf {
    if let Some(path) = std::env::var_os("CORVID_E2E_KUBECTL") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("CORVID_K8S_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/corvid/k8s")));
    match cache.map(|c| c.join("bin/kubectl")) {
        Some(cached) if cached.exists() => cached,
        _ => PathBuf::from("kubectl"),
    }
}

/// Runs kubectl against the e2e cluster (it reads `KUBECONFIG` from the environment), feeding
/// `stdin` to it. Returns the output whatever the exit status, so tests can assert on failures.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
    use std::io::Write as _;
    let kubectl = kubectl_path();
    let mut child = Command::new(&kubectl)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", kubectl.display()))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Polls `check` every 250 ms until it yields `Some`, failing after `timeout` with the last
/// state it reported, so a timeout says what was observed rather than only that time ran out.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<T, String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(state)) => state,
            Err(err) => format!("error: {err:#}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A namespace of its own for one test, so tests can run in parallel and be cleaned up by
/// deleting one object.
pub struct TestNamespace {
    /// The namespace's name (`e2e-<prefix>-<unique suffix>`).
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates a fresh namespace named after `prefix`.
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "e2e-{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { "corvid.dev/e2e": "true" } },
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self {
            name,
            client: client.clone(),
        })
    }

    /// Deletes the namespace (the namespace controller removes its contents in the background).
    pub async fn delete(self) -> anyhow::Result<()> {
        Api::<Namespace>::all(self.client)
            .delete(&self.name, &DeleteParams::background())
            .await
            .with_context(|| format!("deleting namespace {}", self.name))?;
        Ok(())
    }
}

/// GETs `path` from a plain-HTTP endpoint (the broker's admin API) and returns the status code
/// and body; a few lines of HTTP/1.0 keep the crate free of an HTTP client dependency.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_with_token(addr, path, None).await
}

/// [`http_get`] presenting the broker's admin `token` (`Authorization: Bearer`).
pub async fn http_get_with_token(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n{auth}\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response from {addr}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code from {addr}: {head}"))?;
    Ok((code, body.to_string()))
}

/// Name of the MqttCluster CRD.
pub const CRD_NAME: &str = "mqttclusters.corvid.dev";

/// The committed CRD manifests (`corvid-operator crd` output).
pub fn crd_dir() -> PathBuf {
    repo_root().join("manifests/crds")
}

/// How kube's dynamic API addresses MqttClusters (tests use untyped objects so they can also
/// send what the Rust types would never produce).
pub fn mqtt_cluster_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("corvid.dev", "v1alpha1", "MqttCluster");
    ApiResource::from_gvk_with_plural(&gvk, "mqttclusters")
}

/// An MqttCluster object with the given spec.
pub fn mqtt_cluster(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "corvid.dev/v1alpha1",
        "kind": "MqttCluster",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("valid MqttCluster object")
}

/// Applies every CRD under manifests/crds/ with `kubectl apply --server-side` (the only way a
/// CRD this large installs: its last-applied annotation would exceed the 256 KiB limit) and
/// waits until MqttClusters can be listed. Idempotent, so every test that needs it calls it.
pub async fn apply_crds(client: &Client) {
    let dir = crd_dir();
    let dir = dir.to_str().expect("UTF-8 path");
    let out = kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=corvid-e2e",
            "-f",
            dir,
        ],
        None,
    )
    .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl apply --server-side -f {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    wait_for("the MqttCluster CRD to be Established", SETTLE, || async {
        let crd = crds.get(CRD_NAME).await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        let established = conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        Ok(if established {
            Ok(())
        } else {
            Err(format!("{conditions:?}"))
        })
    })
    .await
    .unwrap();
    let all = Api::<DynamicObject>::all_with(client.clone(), &mqtt_cluster_resource());
    wait_for("MqttClusters to be served", SETTLE, || async {
        Ok(all
            .list(&Default::default())
            .await
            .map(drop)
            .map_err(|e| e.to_string()))
    })
    .await
    .unwrap();
}

/// How long the API server gets to settle after a CRD change.
const SETTLE: Duration = Duration::from_secs(60);

/// A binary of this workspace for a test to run: `$<env_var>`, else the one cargo built next to
/// the running test (`target/<profile>/<name>`); e2e/ci-kwok builds them before the tests.
pub fn workspace_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let candidate = exe.parent().and_then(Path::parent).map(|d| d.join(name));
    match candidate {
        Some(path) if path.exists() => path,
        _ => panic!(
            "no {name} binary: build it with `cargo build -p {name}` (same target dir) or set \
             {env_var}"
        ),
    }
}

/// A process a test started, with its output in a log file; killed when dropped, so a failing
/// assertion never leaves it running.
pub struct TestProcess {
    /// What the process is, for messages.
    pub name: String,
    /// Its combined stdout and stderr.
    pub log: PathBuf,
    child: std::process::Child,
}

impl TestProcess {
    /// Starts `command` with stdin closed and stdout/stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            log,
            child,
        })
    }

    /// Sends SIGTERM, as Kubernetes does when it deletes a pod (a broker evacuates on it).
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The exit status once the process has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the log, headed by the process name, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("--- {} ({})\n{tail}\n", self.name, self.log.display())
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
