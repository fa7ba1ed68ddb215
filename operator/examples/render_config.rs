//! Prints the corvid.yaml the operator would render for an MqttCluster read from stdin (YAML or
//! JSON), after the broker's own validation (the same `corvid-config` code the pods run).

use std::io::Read;

use corvid_crds::MqttCluster;
use corvid_operator::build::config;
use corvid_operator::validate::validate;

fn main() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let cluster: MqttCluster = serde_yaml::from_str(&input)?;
    let valid = validate(&cluster)?;
    print!("{}", config::render(&valid).yaml);
    Ok(())
}
