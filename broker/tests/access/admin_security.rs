//! The admin API as an attacker on the network meets it: without a token it listens on
//! loopback only, with one every `/api` call needs it (as a bearer token, or in the header the
//! Kubernetes API server's pod proxy leaves alone), probes and metrics stay open, and an
//! evacuation cannot send clients to a host of the caller's choosing.

use crate::common;

use std::net::SocketAddr;

use common::{config, http, start_with, stop};

/// `GET /api/v1/stats` presenting `header: value`; returns the status.
async fn stats_with(admin: SocketAddr, header: &str, value: &str) -> u16 {
    http(admin, "GET", "/api/v1/stats", &[(header, value)])
        .await
        .0
}

#[tokio::test]
async fn without_a_token_the_api_listens_on_loopback_only() {
    let mut cfg = config();
    cfg.admin.bind = "0.0.0.0:0".parse().expect("address");
    let r = start_with(cfg).await;
    assert!(
        r.admin.ip().is_loopback(),
        "admin bound {} without a token",
        r.admin
    );
    let (code, _) = http(r.admin, "GET", "/api/v1/stats", &[]).await;
    assert_eq!(code, 200, "loopback callers need no token");
    stop(r).await;
}

#[test]
fn a_non_loopback_bind_without_a_token_is_refused() {
    let mut cfg = config();
    cfg.admin.bind = "10.1.2.3:18083".parse().expect("address");
    let err = cfg
        .validate()
        .expect_err("an open admin API must not validate");
    assert!(err.to_string().contains("admin.bind"), "{err}");
    assert!(err.to_string().contains("token_file"), "{err}");
}

#[tokio::test]
async fn an_empty_token_file_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "\n").expect("token");
    let mut cfg = config();
    cfg.admin.token_file = Some(token);
    let err = corvid_broker::server::start(cfg)
        .await
        .expect_err("an empty token must not start");
    assert!(err.to_string().contains("admin.token_file"), "{err}");
}

#[tokio::test]
async fn with_a_token_every_api_call_needs_it_and_probes_stay_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "correct-horse-battery\n").expect("token");
    let mut cfg = config();
    cfg.admin.bind = "0.0.0.0:0".parse().expect("address");
    cfg.admin.token_file = Some(token.clone());
    let r = start_with(cfg).await;
    assert!(
        r.admin.ip().is_unspecified(),
        "a token keeps the configured bind"
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], r.admin.port()));

    for path in [
        "/api/v1/stats",
        "/api/v1/clients",
        "/api/v1/trace",
        "/api/v1/cluster",
    ] {
        let (code, body) = http(admin, "GET", path, &[]).await;
        assert_eq!(code, 401, "{path} without a token: {body}");
    }
    for (name, value) in [
        ("Authorization", "Bearer wrong"),
        ("Authorization", "Bearer correct-horse-batter"),
        ("Authorization", "correct-horse-battery"),
        ("X-Corvid-Admin-Token", "correct-horse-battery-staple"),
    ] {
        let code = stats_with(admin, name, value).await;
        assert_eq!(code, 401, "{name}: {value} must be refused");
    }
    let (code, _) = http(
        admin,
        "POST",
        "/api/v1/evacuate",
        &[("Authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(code, 401, "an evacuation without the token");
    assert!(r
        .broker
        .accepting
        .load(std::sync::atomic::Ordering::Relaxed));

    let bearer = "Bearer correct-horse-battery";
    assert_eq!(
        stats_with(admin, "Authorization", bearer).await,
        200,
        "the bearer token"
    );
    let plain = "correct-horse-battery";
    assert_eq!(
        stats_with(admin, "X-Corvid-Admin-Token", plain).await,
        200,
        "the pod-proxy header"
    );

    // A rotated token applies at once.
    std::fs::write(&token, "rotated").expect("rotate");
    let (code, _) = http(
        admin,
        "GET",
        "/api/v1/stats",
        &[("Authorization", "Bearer correct-horse-battery")],
    )
    .await;
    assert_eq!(code, 401, "the old token after rotation");
    let (code, _) = http(
        admin,
        "GET",
        "/api/v1/stats",
        &[("Authorization", "Bearer rotated")],
    )
    .await;
    assert_eq!(code, 200, "the new token");

    for path in ["/healthz", "/readyz", "/metrics"] {
        let (code, _) = http(admin, "GET", path, &[]).await;
        assert_eq!(code, 200, "{path} stays open for probes and Prometheus");
    }
    let (_, metrics) = http(admin, "GET", "/metrics", &[]).await;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("corvid_admin_unauthorized_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("corvid_admin_unauthorized_total exported");
    assert_eq!(refused, 10, "every refused call is counted");
    stop(r).await;
}

#[tokio::test]
async fn an_evacuation_only_redirects_to_members_or_listed_references() {
    let mut cfg = config();
    cfg.admin.server_references = vec!["mqtt.example.com:8883".into()];
    let r = start_with(cfg).await;
    let (code, body) = http(
        r.admin,
        "POST",
        "/api/v1/evacuate?server_reference=evil.example.net:1883",
        &[],
    )
    .await;
    assert_eq!(code, 400, "an arbitrary Server Reference: {body}");
    assert!(body.contains("admin.server_references"), "{body}");
    assert!(
        r.broker
            .accepting
            .load(std::sync::atomic::Ordering::Relaxed),
        "a refused evacuation changes nothing"
    );
    let (code, body) = http(
        r.admin,
        "POST",
        "/api/v1/evacuate?server_reference=mqtt.example.com:8883",
        &[],
    )
    .await;
    assert_eq!(code, 202, "a listed Server Reference: {body}");
    stop(r).await;
}
