//! Graceful shutdown as clients see it: MQTT 5 clients are told why (DISCONNECT 0x8B, server
//! shutting down) before the connection closes; 3.1.1 clients are simply closed.

use crate::common;

use common::{Raw, V};

#[tokio::test]
async fn clients_are_told_the_server_is_shutting_down() {
    let b = common::start().await;
    let addr = common::mqtt(&b);
    let mut c5 = Raw::connect(addr, V::V5, "bye-v5").await;
    let mut c3 = Raw::connect(addr, V::V311, "bye-v3").await;
    let stopping = tokio::spawn(common::stop(b));
    c5.expect_disconnect(0x8B).await;
    c3.expect_disconnect(0x8B).await;
    common::within("shutdown", stopping)
        .await
        .expect("shutdown task");
}
