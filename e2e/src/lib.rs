//! Shared plumbing for Corvid's end-to-end tests: find the cluster that `e2e/cluster up` started
//! (or skip cleanly when there is none), run the kubectl it built, and poll with deadlines.
//!
//! The tests talk to a real kube-apiserver; nothing here mocks Kubernetes. Without `KUBECONFIG`
//! every test prints `SKIP` and passes, so a plain `cargo test` works on any machine; with
//! `CORVID_E2E_REQUIRED=1` (as `e2e/ci-kwok` sets) a missing cluster fails the run instead.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
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
