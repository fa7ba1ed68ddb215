//! `corvid-broker ctl`: a small HTTP client of the admin API for people at a shell (or a
//! `kubectl exec`), with tables by default and the API's JSON with `--json`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
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
        #[arg(long, default_value_t = 600)]
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
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = self.url(segments)?;
        let mut req = self.client.request(method, url.clone()).query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            anyhow::bail!("{} {url}: {msg}", status.as_u16());
        }
        Ok(resp)
    }

    async fn json(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let resp = self.call(method, segments, query, body).await?;
        resp.json()
            .await
            .context("the admin API answered with bad JSON")
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

async fn exec(api: &Api, as_json: bool, cmd: CtlCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let out = match cmd {
        CtlCommand::Status => {
            let v = api.json(Method::GET, &["stats"], &[], None).await?;
            (v.clone(), status_text(&v))
        }
        CtlCommand::Clients {
            like,
            username,
            connected,
        } => {
            let mut q = Vec::new();
            if let Some(l) = like {
                q.push(("like", l));
            }
            if let Some(u) = username {
                q.push(("username", u));
            }
            if let Some(c) = connected {
                q.push(("connected", c.to_string()));
            }
            let v = api.json(Method::GET, &["clients"], &q, None).await?;
            let rows = list(&v["clients"])
                .iter()
                .map(|c| {
                    let conn = &c["connection"];
                    vec![
                        s(&c["client_id"]),
                        s(&c["connected"]),
                        s(&conn["peer"]),
                        proto(&conn["protocol"]),
                        s(&conn["username"]),
                        s(&c["subscriptions"]),
                        s(&c["queued"]),
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
            let v = api.json(Method::GET, &["clients", &id], &[], None).await?;
            let mut t = String::new();
            for k in [
                "client_id",
                "connected",
                "session_expiry",
                "queued",
                "inflight",
                "dropped",
            ] {
                t.push_str(&format!("{k:<16} {}\n", s(&v[k])));
            }
            let conn = &v["connection"];
            for k in [
                "peer",
                "listener",
                "protocol",
                "username",
                "keep_alive",
                "connected_at",
            ] {
                let v = if k == "protocol" {
                    proto(&conn[k])
                } else {
                    s(&conn[k])
                };
                t.push_str(&format!("{k:<16} {v}\n"));
            }
            t.push_str("subscriptions:\n");
            for sub in list(&v["subscription_list"]) {
                t.push_str(&format!(
                    "  {} (qos {})\n",
                    s(&sub["filter"]),
                    s(&sub["qos"])
                ));
            }
            (v, t)
        }
        CtlCommand::Kick { id } => {
            let v = api
                .json(Method::DELETE, &["clients", &id], &[], None)
                .await?;
            (v, format!("kicked {id}\n"))
        }
        CtlCommand::Cluster => {
            let v = api.json(Method::GET, &["cluster"], &[], None).await?;
            let rows = list(&v["members"])
                .iter()
                .map(|m| {
                    vec![
                        s(&m["name"]),
                        s(&m["state"]),
                        s(&m["addr"]),
                        s(&m["linked"]),
                        s(&m["routes"]),
                    ]
                })
                .collect();
            let t = format!(
                "node {} (synced: {})\n{}",
                s(&v["node"]),
                s(&v["synced"]),
                table(&["MEMBER", "STATE", "ADDR", "LINKED", "ROUTES"], rows)
            );
            (v, t)
        }
        CtlCommand::Evacuate {
            status,
            rate,
            server_reference,
        } => {
            let mut query = Vec::new();
            if let Some(r) = rate {
                query.push(("rate", r.to_string()));
            }
            if let Some(r) = server_reference {
                query.push(("server_reference", r));
            }
            let method = if status { Method::GET } else { Method::POST };
            let v = api.json(method, &["evacuate"], &query, None).await?;
            let t = format!(
                "evacuation {}: {} clients and {} sessions left, {} handed off\n",
                s(&v["state"]),
                s(&v["remaining_clients"]),
                s(&v["remaining_sessions"]),
                s(&v["handed_off"])
            );
            (v, t)
        }
        CtlCommand::Rebalance { status, rate } => {
            let query: Vec<(&str, String)> =
                rate.map(|r| ("rate", r.to_string())).into_iter().collect();
            let method = if status { Method::GET } else { Method::POST };
            let v = api.json(method, &["rebalance"], &query, None).await?;
            (
                v.clone(),
                format!("{}\n", serde_json::to_string_pretty(&v)?),
            )
        }
        CtlCommand::Subscriptions => {
            let v = api.json(Method::GET, &["subscriptions"], &[], None).await?;
            let mut rows: Vec<Vec<String>> = list(&v["subscriptions"])
                .iter()
                .map(|x| vec![s(&x["client_id"]), s(&x["filter"]), s(&x["qos"])])
                .collect();
            rows.sort();
            let t = table(&["CLIENT_ID", "FILTER", "QOS"], rows);
            (v, t)
        }
        CtlCommand::Routes => {
            let v = api.json(Method::GET, &["routes"], &[], None).await?;
            let rows = list(&v["routes"])
                .iter()
                .map(|x| vec![s(&x["filter"]), s(&x["node"])])
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
                let key = if kind == "client" {
                    "client_id"
                } else {
                    "topic"
                };
                let body = json!({"type": kind, key: target, "duration": duration, "name": name});
                let v = api.json(Method::POST, &["trace"], &[], Some(body)).await?;
                let t = format!(
                    "trace {} started: {} {} for {}s -> {}\n",
                    s(&v["name"]),
                    kind,
                    target,
                    duration,
                    s(&v["file"])
                );
                (v, t)
            }
            TraceCommand::Stop { name } => {
                let v = api
                    .json(Method::DELETE, &["trace", &name], &[], None)
                    .await?;
                let t = format!(
                    "trace {} stopped ({} lines in {})\n",
                    name,
                    s(&v["lines"]),
                    s(&v["file"])
                );
                (v, t)
            }
            TraceCommand::List => {
                let v = api.json(Method::GET, &["trace"], &[], None).await?;
                let rows = list(&v["traces"])
                    .iter()
                    .map(|x| {
                        vec![
                            s(&x["name"]),
                            s(&x["target"]["type"]),
                            s(&x["target"]["value"]),
                            s(&x["lines"]),
                            s(&x["ends_at"]),
                            s(&x["file"]),
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
                    .call(Method::GET, &["trace", &name], &[], None)
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

fn status_text(v: &Value) -> String {
    let mut t = format!(
        "node {} (corvid-broker {}), up {}s\n",
        s(&v["node"]),
        s(&v["version"]),
        s(&v["uptime_seconds"])
    );
    for k in [
        "connections",
        "sessions",
        "subscriptions",
        "routes",
        "retained",
        "queued",
        "inflight",
        "messages_received",
        "messages_sent",
    ] {
        t.push_str(&format!("{k:<18} {}\n", s(&v[k])));
    }
    t
}

/// The API's protocol enum (`V311`, `V5`) as people write it.
fn proto(v: &Value) -> String {
    match v.as_str() {
        Some("V31") => "3.1".into(),
        Some("V311") => "3.1.1".into(),
        Some("V5") => "5.0".into(),
        _ => s(v),
    }
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// A JSON value as table text: strings bare, null as `-`.
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
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
