//! Entry point of `corvid-operator`: parses the command line and hands off; the only place that
//! turns errors into an exit code (anyhow lives here and nowhere else).

mod run;

use anyhow::Context;
use clap::Parser;
use corvid_operator::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd(args) => {
            let yaml = corvid_crds::crd_yaml().context("rendering the CRD")?;
            if args.output.is_empty() {
                print!("{yaml}");
            }
            for path in &args.output {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                std::fs::write(path, &yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Run(args) => run::run(args).await,
    }
}
