//! `corvid-broker ctl`: a small HTTP client of the admin API for people at a shell (or a
//! `kubectl exec`), with tables by default and the API's JSON with `--json`. Answers are read
//! into the `corvid-api` types the broker writes them with; `--json` prints the answer as it
//! came, so fields a newer broker added are not lost.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use corvid_api::{
    ClientDetail, ClientFilter, ClientList, ClusterView, ErrorBody, EvacuateOptions,
    EvacuationStatus, KeyRingView, Kicked, RebalanceOptions, RebalanceStatus, RouteList, Stats,
    SubscriptionList, TraceInfo, TraceKind, TraceList, TraceRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// `ctl` options.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API base URL.
    #[arg(long, env = "CORVID_ADMIN", default_value = "http://127.0.0.1:18083")]
    admin: String,
    /// File holding the admin bearer token (`admin.token_file` of the broker); without it,
    /// `$CORVID_ADMIN_TOKEN`, then the pod's mounted token.
    #[arg(long, env = "CORVID_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Node, version, uptime and counts.
    Status,
    /// List clients.
    Clients {
        /// Only client ids containing this.
        #[arg(long)]
        like: Option<String>,
        /// Only this user name.
        #[arg(long)]
        username: Option<String>,
        /// Only connected (true) or offline (false) sessions.
        #[arg(long)]
        connected: Option<bool>,
    },
    /// One client's details.
    Client {
        /// Client id.
        id: String,
    },
    /// Disconnect a client (MQTT 5 reason 0x98).
    Kick {
        /// Client id.
        id: String,
    },
    /// All subscriptions.
    Subscriptions,
    /// All routes (distinct filters).
    Routes,
    /// Trace a client or a topic into a file.
    Trace {
        #[command(subcommand)]
        command: TraceCommand,
    },
    /// Cluster members as this node sees them.
    Cluster,
    /// The cluster secrets this node holds, by fingerprint: what a secret rotation checks on
    /// every node before its next phase (with --fingerprint: a secret file's fingerprint,
    /// computed here without asking the broker).
    Keyring {
        /// Print the fingerprint of this secret file instead.
        #[arg(long, value_name = "FILE")]
        fingerprint: Option<PathBuf>,
    },
    /// Move every client and session off this node before it stops (with --status: progress).
    Evacuate {
        /// Only show the evacuation's progress.
        #[arg(long)]
        status: bool,
        /// Clients moved per second.
        #[arg(long)]
        rate: Option<u32>,
        /// Server reference sent to MQTT 5 clients with DISCONNECT 0x9C.
        #[arg(long)]
        server_reference: Option<String>,
    },
    /// Shed connections to less-loaded members now (with --status: the rebalancer's state).
    Rebalance {
        /// Only show the rebalancer's state.
        #[arg(long)]
        status: bool,
        /// Clients moved per second.
        #[arg(long)]
        rate: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum TraceCommand {
    /// Start a trace: `trace start client ID` or `trace start topic FILTER`.
    Start {
        /// `client` or `topic`.
        #[arg(value_parser = ["client", "topic"])]
        kind: String,
        /// Client id or topic filter.
        target: String,
        /// Seconds until it stops by itself.
        #[arg(long, default_value_t = TraceRequest::DEFAULT_DURATION_SECS)]
        duration: u64,
        /// Trace name (default `client-ID` / `topic-FILTER`).
        #[arg(long)]
        name: Option<String>,
    },
    /// Stop a trace.
    Stop {
        /// Trace name.
        name: String,
    },
    /// Running traces.
    List,
    /// Print a running trace's log.
    Show {
        /// Trace name.
        name: String,
    },
}

struct Api {
    base: reqwest::Url,
    token: Option<String>,
    client: reqwest::Client,
}

impl Api {
    fn url(&self, segments: &[&str]) -> anyhow::Result<reqwest::Url> {
        let mut u = self.base.clone();
        {
            let mut p = u
                .path_segments_mut()
                .map_err(|_| anyhow::anyhow!("--admin {} cannot be a base URL", self.base))?;
            p.pop_if_empty();
            p.extend(["api", "v1"]);
            p.extend(segments);
        }
        Ok(u)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: &(impl Serialize + ?Sized),
        body: Option<&TraceRequest>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = self.url(segments)?;
        let mut req = self.client.request(method, url.clone()).query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            anyhow::bail!("{} {url}: {msg}", status.as_u16());
        }
        Ok(resp)
    }

    /// One call whose answer is a `T`: returns the answer as it came (for `--json`) and typed.
    async fn json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: &(impl Serialize + ?Sized),
        body: Option<&TraceRequest>,
    ) -> anyhow::Result<(Value, T)> {
        let resp = self.call(method, segments, query, body).await?;
        let v: Value = resp
            .json()
            .await
            .context("the admin API answered with bad JSON")?;
        let typed = T::deserialize(&v).with_context(|| {
            format!(
                "the admin API's answer to {} does not have the expected shape",
                segments.join("/")
            )
        })?;
        Ok((v, typed))
    }
}

/// Where the operator mounts a cluster's admin token in every broker pod, so that
/// `kubectl exec … corvid-broker ctl` works without flags.
pub const POD_TOKEN_FILE: &str = "/etc/corvid/admin/token";

/// The admin token: `--token-file` (or `$CORVID_ADMIN_TOKEN_FILE`), else `$CORVID_ADMIN_TOKEN`,
/// else the pod's mounted token when it exists, else none.
fn admin_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        return corvid_broker::admin::read_token(f)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--token-file: {e}"));
    }
    if let Ok(t) = std::env::var("CORVID_ADMIN_TOKEN") {
        let t = t.trim();
        if !t.is_empty() {
            return Ok(Some(t.to_string()));
        }
    }
    let pod = std::path::Path::new(POD_TOKEN_FILE);
    if pod.exists() {
        return corvid_broker::admin::read_token(pod)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{e}"));
    }
    Ok(None)
}

/// Runs one `ctl` command.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let token = admin_token(args.token_file.as_deref())?;
    let base =
        reqwest::Url::parse(&args.admin).with_context(|| format!("--admin {}", args.admin))?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let api = Api {
        base,
        token,
        client,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(exec(&api, args.json, args.command))
}

/// No query parameters.
const NO_QUERY: &[(&str, &str)] = &[];

async fn exec(api: &Api, as_json: bool, cmd: CtlCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let out = match cmd {
        CtlCommand::Status => {
            let (v, stats) = api
                .json::<Stats>(Method::GET, &["stats"], NO_QUERY, None)
                .await?;
            (v, status_text(&stats))
        }
        CtlCommand::Clients {
            like,
            username,
            connected,
        } => {
            let filter = ClientFilter {
                like,
                connected,
                username,
                limit: None,
            };
            let (v, list) = api
                .json::<ClientList>(Method::GET, &["clients"], &filter, None)
                .await?;
            let rows = list
                .clients
                .iter()
                .map(|c| {
                    let conn = c.connection.as_ref();
                    vec![
                        c.client_id.clone(),
                        c.connected.to_string(),
                        opt(conn.map(|x| x.peer)),
                        opt(conn.map(|x| x.protocol.label())),
                        opt(conn.and_then(|x| x.username.as_ref())),
                        c.subscriptions.to_string(),
                        c.queued.to_string(),
                    ]
                })
                .collect();
            let t = table(
                &[
                    "CLIENT_ID",
                    "CONNECTED",
                    "PEER",
                    "PROTOCOL",
                    "USERNAME",
                    "SUBS",
                    "QUEUED",
                ],
                rows,
            );
            (v, t)
        }
        CtlCommand::Client { id } => {
            let (v, d) = api
                .json::<ClientDetail>(Method::GET, &["clients", &id], NO_QUERY, None)
                .await?;
            let c = &d.info;
            let conn = c.connection.as_ref();
            let mut t = String::new();
            for (k, val) in [
                ("client_id", c.client_id.clone()),
                ("connected", c.connected.to_string()),
                ("session_expiry", c.session_expiry.to_string()),
                ("queued", c.queued.to_string()),
                ("inflight", c.inflight.to_string()),
                ("dropped", c.dropped.to_string()),
                ("peer", opt(conn.map(|x| x.peer))),
                ("listener", opt(conn.map(|x| &x.listener))),
                ("protocol", opt(conn.map(|x| x.protocol.label()))),
                ("username", opt(conn.and_then(|x| x.username.as_ref()))),
                ("keep_alive", opt(conn.map(|x| x.keep_alive))),
                ("connected_at", opt(conn.map(|x| x.connected_at))),
            ] {
                t.push_str(&format!("{k:<16} {val}\n"));
            }
            t.push_str("subscriptions:\n");
            for sub in &d.subscription_list {
                t.push_str(&format!("  {} (qos {})\n", sub.filter, sub.qos));
            }
            (v, t)
        }
        CtlCommand::Kick { id } => {
            let (v, k) = api
                .json::<Kicked>(Method::DELETE, &["clients", &id], NO_QUERY, None)
                .await?;
            (v, format!("kicked {}\n", k.kicked))
        }
        CtlCommand::Cluster => {
            let (v, view) = api
                .json::<ClusterView>(Method::GET, &["cluster"], NO_QUERY, None)
                .await?;
            let rows = view
                .members
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        m.state.to_string(),
                        opt(m.addr.as_ref()),
                        m.linked.to_string(),
                        m.routes.to_string(),
                    ]
                })
                .collect();
            let mut t = format!(
                "node {} (synced: {})\n{}",
                view.node,
                view.synced,
                table(&["MEMBER", "STATE", "ADDR", "LINKED", "ROUTES"], rows)
            );
            if let Some(k) = &view.keyring {
                t.push_str(&keyring_text(k));
            }
            (v, t)
        }
        CtlCommand::Keyring {
            fingerprint: Some(file),
        } => {
            let secret = corvid_broker::cluster::secret::Secret::load(&file)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let fp = secret.fingerprint();
            (json!({ "fingerprint": fp }), format!("{fp}\n"))
        }
        CtlCommand::Keyring { fingerprint: None } => {
            let (v, view) = api
                .json::<ClusterView>(Method::GET, &["cluster"], NO_QUERY, None)
                .await?;
            let Some(k) = &view.keyring else {
                anyhow::bail!(
                    "node {} is not clustered: it holds no cluster secret",
                    view.node
                );
            };
            let v = v.get("keyring").cloned().unwrap_or(Value::Null);
            (v, format!("node {}\n{}", view.node, keyring_text(k)))
        }
        CtlCommand::Evacuate {
            status,
            rate,
            server_reference,
        } => {
            let options = EvacuateOptions {
                rate,
                server_reference,
                pod_uid: None,
            };
            let method = if status { Method::GET } else { Method::POST };
            let (v, e) = api
                .json::<EvacuationStatus>(method, &["evacuate"], &options, None)
                .await?;
            let t = format!(
                "evacuation {}: {} clients and {} sessions left, {} handed off\n",
                e.state, e.remaining_clients, e.remaining_sessions, e.handed_off
            );
            (v, t)
        }
        CtlCommand::Rebalance { status, rate } => {
            let method = if status { Method::GET } else { Method::POST };
            let (v, _) = api
                .json::<RebalanceStatus>(method, &["rebalance"], &RebalanceOptions { rate }, None)
                .await?;
            let t = format!("{}\n", serde_json::to_string_pretty(&v)?);
            (v, t)
        }
        CtlCommand::Subscriptions => {
            let (v, list) = api
                .json::<SubscriptionList>(Method::GET, &["subscriptions"], NO_QUERY, None)
                .await?;
            let mut rows: Vec<Vec<String>> = list
                .subscriptions
                .iter()
                .map(|x| vec![x.client_id.clone(), x.filter.clone(), x.qos.to_string()])
                .collect();
            rows.sort();
            let t = table(&["CLIENT_ID", "FILTER", "QOS"], rows);
            (v, t)
        }
        CtlCommand::Routes => {
            let (v, list) = api
                .json::<RouteList>(Method::GET, &["routes"], NO_QUERY, None)
                .await?;
            let rows = list
                .routes
                .iter()
                .map(|x| vec![x.filter.clone(), x.node.clone()])
                .collect();
            let t = table(&["FILTER", "NODE"], rows);
            (v, t)
        }
        CtlCommand::Trace { command } => match command {
            TraceCommand::Start {
                kind,
                target,
                duration,
                name,
            } => {
                let kind = TraceKind::from_wire(&kind);
                let (client_id, topic) = match kind {
                    TraceKind::Client => (Some(target.clone()), None),
                    _ => (None, Some(target.clone())),
                };
                let body = TraceRequest {
                    kind,
                    client_id,
                    topic,
                    duration: Some(duration),
                    name,
                };
                let (v, info) = api
                    .json::<TraceInfo>(Method::POST, &["trace"], NO_QUERY, Some(&body))
                    .await?;
                let t = format!(
                    "trace {} started: {} {} for {}s -> {}\n",
                    info.name, kind, target, duration, info.file
                );
                (v, t)
            }
            TraceCommand::Stop { name } => {
                let (v, info) = api
                    .json::<TraceInfo>(Method::DELETE, &["trace", &name], NO_QUERY, None)
                    .await?;
                let t = format!(
                    "trace {} stopped ({} lines in {})\n",
                    name, info.lines, info.file
                );
                (v, t)
            }
            TraceCommand::List => {
                let (v, list) = api
                    .json::<TraceList>(Method::GET, &["trace"], NO_QUERY, None)
                    .await?;
                let rows = list
                    .traces
                    .iter()
                    .map(|x| {
                        vec![
                            x.name.clone(),
                            x.target.kind.to_string(),
                            x.target.value.clone(),
                            x.lines.to_string(),
                            x.ends_at.to_string(),
                            x.file.clone(),
                        ]
                    })
                    .collect();
                let t = table(
                    &["NAME", "TYPE", "TARGET", "LINES", "ENDS_AT", "FILE"],
                    rows,
                );
                (v, t)
            }
            TraceCommand::Show { name } => {
                let text = api
                    .call(Method::GET, &["trace", &name], NO_QUERY, None)
                    .await?
                    .text()
                    .await
                    .context("cannot read the trace")?;
                (json!({"name": name, "log": text}), text)
            }
        },
    };
    let (v, text) = out;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{text}");
    }
    Ok(())
}

fn status_text(v: &Stats) -> String {
    let mut t = format!(
        "node {} (corvid-broker {}), up {}s\n",
        v.node, v.version, v.uptime_seconds
    );
    for (k, n) in [
        ("connections", v.connections),
        ("sessions", v.sessions),
        ("subscriptions", v.subscriptions),
        ("routes", v.routes),
        ("retained", v.retained),
        ("queued", v.queued),
        ("inflight", v.inflight),
    ] {
        t.push_str(&format!("{k:<18} {n}\n"));
    }
    for (k, n) in [
        ("messages_received", v.messages_received),
        ("messages_sent", v.messages_sent),
    ] {
        t.push_str(&format!("{k:<18} {n}\n"));
    }
    t
}

/// An optional value as table text: `-` when absent.
/// The key ring block of `ctl cluster` and `ctl keyring`.
fn keyring_text(k: &KeyRingView) -> String {
    let accepted = if k.accepted.is_empty() {
        "-".to_string()
    } else {
        k.accepted.join(", ")
    };
    let used = match k.accepted_last_used {
        Some(t) => {
            let ago = corvid_broker::session::unix_now().saturating_sub(t);
            format!("{ago} s ago")
        }
        None => "never (since start)".to_string(),
    };
    format!(
        "key ring: primary {}, accepted {}\naccepted key last used by a peer: {}\n",
        k.primary, accepted, used
    )
}

fn opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".into(), |x| x.to_string())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut l: String = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}  "))
            .collect();
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}
