//! Client listeners: which protocols the cluster serves and on which ports.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Port of the admin HTTP API (probes, evacuation, cluster view); fixed by contract.
pub const ADMIN_PORT: i32 = 18083;
/// Port of the broker-to-broker cluster protocol; fixed by contract.
pub const CLUSTER_PORT: i32 = 4370;

/// The four client listeners. Ports must differ from each other and from the admin and cluster ports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!(self.mqtt.enabled && self.ws.enabled) || self.mqtt.port != self.ws.port").message("listeners.mqtt.port and listeners.ws.port must differ"),
    validation = Rule::new("!(self.mqtt.enabled && self.mqtts.enabled) || self.mqtt.port != self.mqtts.port").message("listeners.mqtt.port and listeners.mqtts.port must differ"),
    validation = Rule::new("!(self.mqtt.enabled && self.wss.enabled) || self.mqtt.port != self.wss.port").message("listeners.mqtt.port and listeners.wss.port must differ"),
    validation = Rule::new("!(self.ws.enabled && self.mqtts.enabled) || self.ws.port != self.mqtts.port").message("listeners.ws.port and listeners.mqtts.port must differ"),
    validation = Rule::new("!(self.ws.enabled && self.wss.enabled) || self.ws.port != self.wss.port").message("listeners.ws.port and listeners.wss.port must differ"),
    validation = Rule::new("!(self.mqtts.enabled && self.wss.enabled) || self.mqtts.port != self.wss.port").message("listeners.mqtts.port and listeners.wss.port must differ"),
    // One clause per listener: CEL gives every property its own type, so they cannot share a list.
    validation = Rule::new("(!self.mqtt.enabled || !(self.mqtt.port in [18083, 4370])) && (!self.ws.enabled || !(self.ws.port in [18083, 4370])) && (!self.mqtts.enabled || !(self.mqtts.port in [18083, 4370])) && (!self.wss.enabled || !(self.wss.port in [18083, 4370]))").message("listeners ports must not use the admin port 18083 or the cluster port 4370"),
    validation = Rule::new("self.mqtt.enabled || self.ws.enabled || self.mqtts.enabled || self.wss.enabled").message("listeners: at least one listener must be enabled")
)]
pub struct Listeners {
    /// Plain MQTT over TCP (default port 1883).
    #[serde(default = "Listener::mqtt")]
    pub mqtt: Listener,
    /// MQTT over WebSocket (default port 8083, path /mqtt).
    #[serde(default = "Listener::ws")]
    pub ws: Listener,
    /// MQTT over TLS (default port 8883). Needs tls.mode broker or loadBalancer.
    #[serde(default = "Listener::mqtts")]
    pub mqtts: Listener,
    /// MQTT over secure WebSocket (default port 8084, path /mqtt). Needs tls.mode broker or loadBalancer.
    #[serde(default = "Listener::wss")]
    pub wss: Listener,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            mqtt: Listener::mqtt(),
            ws: Listener::ws(),
            mqtts: Listener::mqtts(),
            wss: Listener::wss(),
        }
    }
}

/// One client listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Listener {
    /// Whether the listener is served (and exposed on the client Service).
    pub enabled: bool,
    /// Port on the pod and on the client Service (1-65535).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

impl Listener {
    /// Default MQTT listener: on, 1883.
    pub fn mqtt() -> Self {
        Listener {
            enabled: true,
            port: 1883,
        }
    }
    /// Default WebSocket listener: on, 8083.
    pub fn ws() -> Self {
        Listener {
            enabled: true,
            port: 8083,
        }
    }
    /// Default MQTT/TLS listener: off, 8883.
    pub fn mqtts() -> Self {
        Listener {
            enabled: false,
            port: 8883,
        }
    }
    /// Default secure WebSocket listener: off, 8084.
    pub fn wss() -> Self {
        Listener {
            enabled: false,
            port: 8084,
        }
    }
}

/// Identifies one of the four listeners; names match the Service port and container port names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerKind {
    /// Plain MQTT.
    Mqtt,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over secure WebSocket.
    Wss,
}

impl ListenerKind {
    /// All listeners in a stable order.
    pub const ALL: [ListenerKind; 4] = [Self::Mqtt, Self::Ws, Self::Mqtts, Self::Wss];

    /// The port name used on containers and Services.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::Ws => "ws",
            Self::Mqtts => "mqtts",
            Self::Wss => "wss",
        }
    }

    /// Whether clients speak TLS on this listener.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Mqtts | Self::Wss)
    }

    /// Whether the listener carries WebSocket (and so has an HTTP path).
    pub fn is_websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }

    /// The plain-text listener that carries this listener's traffic when TLS ends at the load balancer.
    pub fn plaintext_peer(self) -> ListenerKind {
        match self {
            Self::Mqtt | Self::Mqtts => Self::Mqtt,
            Self::Ws | Self::Wss => Self::Ws,
        }
    }
}

impl Listeners {
    /// The settings of one listener.
    pub fn get(&self, kind: ListenerKind) -> &Listener {
        match kind {
            ListenerKind::Mqtt => &self.mqtt,
            ListenerKind::Ws => &self.ws,
            ListenerKind::Mqtts => &self.mqtts,
            ListenerKind::Wss => &self.wss,
        }
    }
}
