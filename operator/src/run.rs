//! Process wiring of `corvid-operator run` (client, leader election, HTTP endpoints, controller).

use corvid_operator::cli::RunArgs;

/// Runs the operator until it is told to stop.
pub async fn run(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("the controller is not wired yet")
}
