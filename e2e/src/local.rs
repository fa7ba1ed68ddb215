//! The configuration of one broker of the live proof's local target, built as the broker's own
//! typed `corvid_config::Config`, so the proof's nodes are configured with the same fields,
//! defaults and validation as every other broker (no hand-written YAML to drift).

use std::path::PathBuf;

use corvid_config::{
    AclAction, AclRule, AclWho, AllClients, Config, ConfigError, Discovery, Permission,
};

/// What differs between the local nodes.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// Node number (1…5); the node is named `n<index>`.
    pub index: u8,
    /// Its MQTT port on 127.0.0.1.
    pub mqtt_port: u16,
    /// Its admin port on 127.0.0.1.
    pub admin_port: u16,
    /// Its cluster port on 127.0.0.1.
    pub cluster_port: u16,
    /// Every node's cluster port (the static peer list).
    pub peer_ports: Vec<u16>,
    /// The shared cluster secret file.
    pub secret_file: PathBuf,
    /// `cluster.rebalance.enabled`.
    pub rebalance: bool,
    /// The d-acl-change scenario's new ACL (deny publishing to `forbidden/#`).
    pub changed_acl: bool,
    /// `persistence.data_dir`: the node's durable sessions, kept across a restart on the same
    /// directory (as a pod's volume is); `None` keeps them in memory.
    pub data_dir: Option<PathBuf>,
}

impl LocalNode {
    /// The node's configuration, checked by the broker's own validation.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut c = Config::default();
        c.node.name = Some(format!("n{}", self.index));
        c.log.level = "info,chitchat=warn".into();
        c.listeners.mqtt.bind = loopback(self.mqtt_port);
        c.listeners.ws.enabled = false;
        c.admin.bind = loopback(self.admin_port);
        c.sys.enabled = false;
        c.shutdown.drain_timeout = 30;
        c.cluster.port = self.cluster_port;
        c.cluster.bind = "127.0.0.1".into();
        c.cluster.advertise = Some("127.0.0.1".into());
        c.cluster.discovery = Discovery::Static;
        c.cluster.peers = self
            .peer_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        c.cluster.secret_file = Some(self.secret_file.clone());
        c.cluster.rebalance.enabled = self.rebalance;
        c.cluster.rebalance.rate = 100;
        // `persistence.sync` stays at its default, `always`, as the operator leaves it.
        c.persistence.data_dir = self.data_dir.clone();
        if self.changed_acl {
            let all = |permission, action, topic: &str| AclRule {
                permission,
                who: AclWho::All(AllClients::All),
                action,
                topics: vec![topic.to_string()],
            };
            c.acl.no_match = Permission::Allow;
            c.acl.rules = vec![
                all(Permission::Deny, AclAction::Publish, "forbidden/#"),
                all(Permission::Allow, AclAction::All, "live/#"),
            ];
        }
        c.validate()?;
        Ok(c)
    }

    /// The node's `corvid.yaml`: the fields that differ from the broker's defaults.
    pub fn yaml(&self) -> Result<String, ConfigError> {
        let file = self.config()?.non_default_fields()?;
        serde_yaml::to_string(&file).map_err(|e| ConfigError::Parse {
            origin: "live proof".into(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(changed_acl: bool) -> LocalNode {
        LocalNode {
            index: 2,
            mqtt_port: 21002,
            admin_port: 21102,
            cluster_port: 21202,
            peer_ports: vec![21201, 21202, 21203],
            secret_file: "/tmp/cluster.secret".into(),
            rebalance: false,
            changed_acl,
            data_dir: Some("/tmp/live/data/n2".into()),
        }
    }

    #[test]
    fn the_broker_reads_back_what_the_proof_configures() {
        let yaml = node(true).yaml().expect("valid");
        let c = Config::from_text("test", &yaml, [], &Default::default()).expect("loads");
        assert_eq!(c.node.name.as_deref(), Some("n2"));
        assert_eq!(c.listeners.mqtt.bind.to_string(), "127.0.0.1:21002");
        assert!(!c.listeners.ws.enabled);
        assert_eq!(c.cluster.discovery, Discovery::Static);
        assert_eq!(c.cluster.peers[2], "127.0.0.1:21203");
        assert_eq!(c.acl.rules.len(), 2);
        assert_eq!(c.acl.rules[0].topics, vec!["forbidden/#".to_string()]);
        assert_eq!(
            c.persistence.data_dir.as_deref(),
            Some(std::path::Path::new("/tmp/live/data/n2"))
        );
        assert_eq!(c.persistence.sync, corvid_config::PersistSync::Always);
        let base = Config::from_text(
            "test",
            &node(false).yaml().expect("valid"),
            [],
            &Default::default(),
        )
        .expect("loads");
        assert!(base.acl.rules.is_empty());
        let in_memory = LocalNode {
            data_dir: None,
            ..node(false)
        };
        let yaml = in_memory.yaml().expect("valid");
        assert!(!yaml.contains("persistence"), "{yaml}");
    }
}
