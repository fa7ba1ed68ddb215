//! The broker as a client meets it, over real sockets: strict MQTT 3.1.1 and 5.0 behaviour,
//! malformed and hostile packets that must close one connection only, the transports (TLS,
//! WebSocket, PROXY protocol), topic matching, graceful shutdown, and the metric names the
//! alerts rely on. One test binary, each concern a module, so the broker is linked once.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod metric_names;
mod router_matching;
mod shutdown;
mod spec_strict;
mod transport;
