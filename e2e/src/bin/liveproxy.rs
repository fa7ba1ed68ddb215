//! `corvid-liveproxy`: a stand-in for a Kubernetes Service in the live proof's local mode.
//!
//! In Kubernetes, clients reach the brokers through the client Service: kube-proxy sends each
//! new connection to one *ready* endpoint, a pod leaves the endpoints as soon as it starts
//! terminating, and one that has not joined the cluster is not Ready, so it gets no traffic.
//! Established connections are left alone. Connecting to broker processes directly would skip
//! all of that (a client could reach a restarted node before it has joined), so local mode puts
//! this in front of them instead: it accepts on `--listen`, picks a random backend from
//! `--backends-file` (one `host:port` per line, re-read for every connection; the runner
//! rewrites it as nodes stop and become ready again) and copies bytes both ways.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "corvid-liveproxy",
    about = "TCP stand-in for a Kubernetes Service: new connections go to a random listed backend"
)]
struct Args {
    /// Address to accept client connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// File with the current backends, one `host:port` per line (missing or empty: none).
    #[arg(long)]
    backends_file: PathBuf,
}

fn backends(path: &PathBuf) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn random_index(n: usize) -> usize {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Nanoseconds are random enough to spread connections; this is not a security boundary.
    (nanos.wrapping_mul(2_654_435_761) >> 7) as usize % n.max(1)
}

async fn serve(mut client: TcpStream, backends_file: PathBuf) {
    let list = backends(&backends_file);
    if list.is_empty() {
        // No ready endpoint: like a Service without endpoints, the connection is refused.
        return;
    }
    let target = &list[random_index(list.len())];
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    client.set_nodelay(true).ok();
    upstream.set_nodelay(true).ok();
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(serve(client, args.backends_file.clone()));
    }
}
