//! `corvid-broker`: the command line — serve, check or print the configuration, drive a
//! running broker through its admin API (`ctl`), hash passwords for the users file (`passwd`).

mod ctl;

/// jemalloc, not the C library's malloc: measured in docs/performance.md ("The allocator").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use corvid_broker::config::{Config, Discovery, LogFormat, Overrides};

/// Corvid's clustered MQTT broker.
#[derive(Debug, Parser)]
#[command(name = "corvid-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Validate or print configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect and operate a running broker through its admin API.
    Ctl(ctl::CtlArgs),
    /// Read a password from stdin and print a `USERNAME:$argon2id$...` line for the users file.
    Passwd {
        /// The user name.
        username: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; names the bad field on error.
    Check {
        /// The YAML file.
        file: PathBuf,
    },
    /// Print a complete, commented example configuration.
    Example,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// YAML configuration file (every field has a default).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Node name (default: POD_NAME, then the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// MQTT/TCP port.
    #[arg(long)]
    mqtt_port: Option<u16>,
    /// MQTT/WebSocket port.
    #[arg(long)]
    ws_port: Option<u16>,
    /// Admin HTTP port.
    #[arg(long)]
    admin_port: Option<u16>,
    /// Inter-node cluster port.
    #[arg(long)]
    cluster_port: Option<u16>,
    /// Peer discovery: static, dns or kubernetes.
    #[arg(long)]
    discovery: Option<String>,
    /// Static peers, host:port,...
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Headless Service name for DNS discovery.
    #[arg(long)]
    dns_name: Option<String>,
    /// File holding the shared cluster secret.
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Example,
        } => {
            print!("{}", corvid_broker::config::EXAMPLE);
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(Some(&file), std::env::vars(), &Overrides::default()) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        Command::Serve(args) => serve(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Passwd { username } => passwd(&username),
    }
}

fn passwd(username: &str) -> anyhow::Result<()> {
    if username.is_empty() || username.contains(':') {
        anyhow::bail!("the user name must be non-empty and contain no ':'");
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        anyhow::bail!("empty password on stdin");
    }
    let hash = corvid_broker::auth::users::hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    println!("{username}:{hash}");
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        node_name: args.node_name.clone(),
        mqtt_port: args.mqtt_port,
        ws_port: args.ws_port,
        admin_port: args.admin_port,
        cluster_port: args.cluster_port,
    };
    let mut config = Config::load(args.config.as_deref(), std::env::vars(), &overrides)
        .context("invalid configuration")?;
    if let Some(d) = &args.discovery {
        config.cluster.discovery = match d.as_str() {
            "static" => Discovery::Static,
            "dns" => Discovery::Dns,
            "kubernetes" => Discovery::Kubernetes,
            "none" => Discovery::None,
            other => {
                anyhow::bail!("--discovery: unknown method {other:?} (static, dns, kubernetes)")
            }
        };
    }
    if !args.peers.is_empty() {
        config.cluster.peers = args.peers.clone();
    }
    if args.dns_name.is_some() {
        config.cluster.dns_name = args.dns_name.clone();
    }
    if args.cluster_secret_file.is_some() {
        config.cluster.secret_file = args.cluster_secret_file.clone();
    }
    config.validate().context("invalid configuration")?;
    init_logging(&config);
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("corvid")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let drain = Duration::from_secs(config.shutdown.drain_timeout);
        let running = corvid_broker::server::start(config).await?;
        wait_for_signal().await;
        tracing::info!(deadline_s = drain.as_secs(), "shutting down");
        running.drain_and_shutdown(drain, 100).await;
        Ok(())
    })
}

/// Raises the soft limit on open files to the hard limit: every client connection is a
/// descriptor, and the usual soft limit of 1,024 would refuse the 1,025th device long before
/// memory runs out. Logs what the process got (the hard limit is the pod's or the node's).
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
        }
    }
    tracing::info!(
        soft = lim.rlim_cur,
        hard = lim.rlim_max,
        was = before,
        "open-file limit (each client connection takes one)"
    );
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| {
            // The Kafka client logs every retry; the Kafka bridge logs its state changes once.
            let level = &config.log.level;
            let quiet = if level.contains("rskafka") {
                level.clone()
            } else {
                format!("{level},rskafka=error")
            };
            tracing_subscriber::EnvFilter::try_new(quiet)
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
