//! Client listeners: which protocols the cluster serves and on which ports.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Port of the admin HTTP API (probes, evacuation, cluster view); fixed by contract.
pub const ADMIN_PORT: i32 = 18083;
/// Port of the broker-to-broker cluster protocol; fixed by contract.
pub const CLUSTER_PORT: i32 = 4370;

/// The four client listeners. Ports must differ from each other and from the admin and cluster ports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
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
    /// Plain MQTT over TCP (default: on, port 1883).
    #[serde(default)]
    pub mqtt: MqttListener,
    /// MQTT over WebSocket, path /mqtt (default: on, port 8083).
    #[serde(default)]
    pub ws: WsListener,
    /// MQTT over TLS (default: off, port 8883). Needs tls.mode broker or loadBalancer.
    #[serde(default)]
    pub mqtts: MqttsListener,
    /// MQTT over secure WebSocket, path /mqtt (default: off, port 8084). Needs tls.mode broker or loadBalancer.
    #[serde(default)]
    pub wss: WssListener,
}

/// One client listener as the operator uses it (the four spec types differ only in defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Whether the listener is served.
    pub enabled: bool,
    /// Its port.
    pub port: i32,
}

/// Declares a listener type whose fields each default on their own, so `{enabled: false}` is enough.
macro_rules! listener_type {
    ($(#[$doc:meta])* $name:ident, $enabled_fn:literal = $enabled:expr, $port_fn:literal = $port:expr) => {
        $(#[$doc])*
        #[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
        pub struct $name {
            /// Whether the listener is served (and exposed on the client Service).
            #[serde(default = $enabled_fn)]
            pub enabled: bool,
            /// Port on the pod and on the client Service (1-65535).
            #[serde(default = $port_fn)]
            #[schemars(range(min = 1, max = 65535))]
            pub port: i32,
        }

        impl Default for $name {
            fn default() -> Self {
                $name { enabled: $enabled, port: $port }
            }
        }

        impl From<$name> for Listener {
            fn from(l: $name) -> Listener {
                Listener { enabled: l.enabled, port: l.port }
            }
        }
    };
}

fn on() -> bool {
    true
}
fn off() -> bool {
    false
}
fn port_1883() -> i32 {
    1883
}
fn port_8083() -> i32 {
    8083
}
fn port_8883() -> i32 {
    8883
}
fn port_8084() -> i32 {
    8084
}

listener_type!(
    /// The plain MQTT listener.
    MqttListener, "on" = true, "port_1883" = 1883
);
listener_type!(
    /// The MQTT over WebSocket listener.
    WsListener, "on" = true, "port_8083" = 8083
);
listener_type!(
    /// The MQTT over TLS listener.
    MqttsListener, "off" = false, "port_8883" = 8883
);
listener_type!(
    /// The MQTT over secure WebSocket listener.
    WssListener, "off" = false, "port_8084" = 8084
);

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
    pub fn get(&self, kind: ListenerKind) -> Listener {
        match kind {
            ListenerKind::Mqtt => self.mqtt.into(),
            ListenerKind::Ws => self.ws.into(),
            ListenerKind::Mqtts => self.mqtts.into(),
            ListenerKind::Wss => self.wss.into(),
        }
    }
}
