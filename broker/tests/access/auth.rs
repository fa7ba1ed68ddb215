//! Authentication over real sockets, both protocol versions: users file (argon2, bcrypt,
//! pbkdf2), reload on change, client-id allow list, HTTP backend (allow, deny, timeout,
//! fail-open, cache, ACL rules from the backend), and the CONNACK codes of each refusal.

use crate::access_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use access_support::*;
use corvid_broker::auth::users::hash_password;
use corvid_broker::config::HttpAuthConfig;
use password_hash::{PasswordHasher, SaltString};

/// The CONNACK codes of a refusal, per protocol version.
type C3 = v3::ConnectReturnCode;
type C5 = v5::ConnectReturnCode;

fn users_file(dir: &tempfile::TempDir, lines: &[String]) -> std::path::PathBuf {
    let p = dir.path().join("users");
    // Write elsewhere and rename over, like a Kubernetes Secret update (new inode).
    let tmp = dir.path().join("users.tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").expect("write users");
    std::fs::rename(&tmp, &p).expect("rename users");
    p
}

fn pbkdf2_hash(pw: &str) -> String {
    let salt = SaltString::encode_b64(b"corvid-test-salt").expect("salt");
    let params = pbkdf2::Params {
        rounds: 1000,
        output_length: 32,
    };
    pbkdf2::Pbkdf2
        .hash_password_customized(pw.as_bytes(), None, None, params, &salt)
        .expect("pbkdf2")
        .to_string()
}

#[tokio::test]
async fn users_file_each_hash_scheme_both_versions() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = users_file(
        &dir,
        &[
            "# test users".into(),
            format!("ann:{}", hash_password(b"ann-pw").expect("argon2")),
            format!("bob:{}", bcrypt::hash("bob-pw", 4).expect("bcrypt")),
            format!("cat:{}", pbkdf2_hash("cat-pw")),
        ],
    );
    let mut c = config();
    c.auth.allow_anonymous = false;
    c.auth.users_file = Some(path);
    let r = start(c).await;
    let a = mqtt(&r);

    for (user, pw) in [("ann", "ann-pw"), ("bob", "bob-pw"), ("cat", "cat-pw")] {
        assert!(
            v3::connect(a, &format!("{user}-3"), Some((user, pw)))
                .await
                .is_ok(),
            "{user} v3"
        );
        assert!(
            v5::connect(a, &format!("{user}-5"), Some((user, pw)))
                .await
                .is_ok(),
            "{user} v5"
        );
    }
    // Wrong password, unknown user: bad credentials (3.1.1 0x04, 5.0 0x86).
    for (user, pw) in [("ann", "nope"), ("bob", "ann-pw"), ("zed", "x")] {
        assert_eq!(
            v3::connect(a, "w3", Some((user, pw))).await.err(),
            Some(C3::BadUserNamePassword),
            "{user} v3"
        );
        assert_eq!(
            v5::connect(a, "w5", Some((user, pw))).await.err(),
            Some(C5::BadUserNamePassword),
            "{user} v5"
        );
    }
    // No user name, anonymous off: not authorized (0x05 / 0x87).
    v3::assert_refused(a, "anon3", None, C3::NotAuthorized).await;
    v5::assert_refused(a, "anon5", None, C5::NotAuthorized).await;
    // Nothing of a refused client's session exists.
    for id in ["w3", "w5", "anon3", "anon5"] {
        assert!(r.broker.sessions.get(id).is_none(), "{id} has no session");
    }
    assert_eq!(
        metric(&r, "corvid_auth_total", &[r#"reason="bad_credentials""#]).await,
        6.0
    );
    assert_eq!(
        metric(&r, "corvid_auth_total", &[r#"reason="not_authorized""#]).await,
        2.0
    );
    assert_eq!(
        metric(&r, "corvid_auth_total", &[r#"reason="users_file""#]).await,
        6.0
    );
}

#[tokio::test]
async fn users_file_change_takes_effect_without_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = users_file(
        &dir,
        &[format!("ann:{}", hash_password(b"old").expect("hash"))],
    );
    let mut c = config();
    c.auth.allow_anonymous = false;
    c.auth.users_file = Some(path);
    let r = start(c).await;
    let a = mqtt(&r);
    assert!(v3::connect(a, "c1", Some(("ann", "old"))).await.is_ok());
    assert!(v3::connect(a, "c2", Some(("dan", "new"))).await.is_err());

    users_file(
        &dir,
        &[
            format!("ann:{}", hash_password(b"new").expect("hash")),
            format!("dan:{}", bcrypt::hash("new", 4).expect("hash")),
        ],
    );
    v5::assert_refused(a, "c3", Some(("ann", "old")), C5::BadUserNamePassword).await;
    assert!(v5::connect(a, "c4", Some(("ann", "new"))).await.is_ok());
    assert!(v3::connect(a, "c5", Some(("dan", "new"))).await.is_ok());
}

#[tokio::test]
async fn client_id_allow_list() {
    let mut c = config();
    c.auth.client_ids = vec!["allowed-1".into(), "allowed-2".into()];
    let r = start(c).await;
    let a = mqtt(&r);
    assert!(v3::connect(a, "allowed-1", None).await.is_ok());
    assert!(v5::connect(a, "allowed-2", None).await.is_ok());
    v3::assert_refused(a, "intruder", None, C3::BadClientId).await;
    v5::assert_refused(a, "intruder", None, C5::ClientIdentifierNotValid).await;
    assert!(r.broker.sessions.get("intruder").is_none());
    assert_eq!(
        metric(
            &r,
            "corvid_auth_total",
            &[r#"reason="client_id_not_allowed""#]
        )
        .await,
        2.0
    );
}

/// A backend: `good` allowed (with an ACL rule), `bad` denied, `slow` answers after 3 s,
/// `ignore` passes to the anonymous switch; counts requests.
async fn backend(hits: Arc<AtomicUsize>) -> HttpServer {
    HttpServer::start(Arc::new(move |v: &serde_json::Value| {
        hits.fetch_add(1, Ordering::SeqCst);
        match v["username"].as_str() {
            Some("good") if v["password"] == "secret" => (
                200,
                r#"{"result":"allow","acl":[{"permission":"deny","action":"publish","topics":["forbidden/#"]}]}"#.into(),
                None,
            ),
            Some("good") | Some("bad") => (200, r#"{"result":"deny"}"#.into(), None),
            Some("slow") => (200, r#"{"result":"allow"}"#.into(), Some(Duration::from_secs(3))),
            Some("ignore") => (200, r#"{"result":"ignore"}"#.into(), None),
            Some("empty") => (200, String::new(), None),
            Some("no-result") => (200, r#"{"acl":[]}"#.into(), None),
            _ => (403, String::new(), None),
        }
    }))
    .await
}

#[tokio::test]
async fn http_backend_allow_deny_timeout_cache_and_acl() {
    let hits = Arc::new(AtomicUsize::new(0));
    let b = backend(hits.clone()).await;
    let mut c = config();
    c.auth.allow_anonymous = false;
    c.auth.http = Some(HttpAuthConfig {
        url: b.url(),
        timeout_ms: 300,
        cache_ttl: 30,
        ..Default::default()
    });
    let r = start(c).await;
    let a = mqtt(&r);

    let mut good = v5::connect(a, "g5", Some(("good", "secret")))
        .await
        .expect("good admitted");
    let req = b
        .find(|v| v["client_id"] == "g5")
        .expect("backend saw the request");
    assert_eq!(req["username"], "good");
    assert_eq!(req["password"], "secret");
    assert_eq!(req["protocol"], "5.0");
    assert!(
        req["peer_addr"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{req}"
    );
    assert!(v3::connect(a, "g3", Some(("good", "secret"))).await.is_ok());
    // A 2xx without an explicit `result` (empty body, or JSON without it) fails closed.
    v3::assert_refused(a, "e3", Some(("empty", "x")), C3::NotAuthorized).await;
    v5::assert_refused(a, "e5", Some(("no-result", "x")), C5::NotAuthorized).await;

    // The backend's ACL rule applies to this client.
    let reason = good.publish_qos1("forbidden/x", "no").await;
    assert_eq!(reason, v5::PubAckReason::NotAuthorized);

    v3::assert_refused(a, "b3", Some(("bad", "x")), C3::BadUserNamePassword).await;
    v5::assert_refused(a, "b5", Some(("good", "wrong")), C5::BadUserNamePassword).await;
    // 403 for a client without credentials: not authorized.
    v5::assert_refused(a, "n5", None, C5::NotAuthorized).await;
    // `ignore` falls through to allow_anonymous = false.
    v3::assert_refused(a, "i3", Some(("ignore", "x")), C3::BadUserNamePassword).await;

    // A backend that does not answer in time: refused promptly (fail-closed).
    let t0 = Instant::now();
    v3::assert_refused(a, "s3", Some(("slow", "x")), C3::NotAuthorized).await;
    v5::assert_refused(a, "s5", Some(("slow", "x")), C5::NotAuthorized).await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        metric(&r, "corvid_auth_total", &[r#"reason="backend_error""#]).await,
        4.0 // two answers without `result`, two timeouts
    );

    // Cached: the same credentials again do not reach the backend.
    let before = hits.load(Ordering::SeqCst);
    assert!(v5::connect(a, "g5", Some(("good", "secret"))).await.is_ok());
    assert!(v5::connect(a, "g5", Some(("good", "secret"))).await.is_ok());
    assert_eq!(hits.load(Ordering::SeqCst), before);
    // Different password: not served from the cache.
    assert!(v5::connect(a, "g5", Some(("good", "other"))).await.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn http_backend_fail_open_and_unreachable() {
    let hits = Arc::new(AtomicUsize::new(0));
    let b = backend(hits).await;
    let mut c = config();
    c.auth.allow_anonymous = false;
    c.auth.http = Some(HttpAuthConfig {
        url: b.url(),
        timeout_ms: 300,
        fail_open: true,
        ..Default::default()
    });
    let r = start(c).await;
    assert!(v3::connect(mqtt(&r), "s3", Some(("slow", "x")))
        .await
        .is_ok());

    // Nothing listening at all: fail-closed by default.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead_url = format!("http://{}/auth", dead.local_addr().expect("addr"));
    drop(dead);
    let mut c = config();
    c.auth.http = Some(HttpAuthConfig {
        url: dead_url,
        timeout_ms: 300,
        ..Default::default()
    });
    let r = start(c).await;
    assert_eq!(
        v5::connect(mqtt(&r), "d5", Some(("any", "x"))).await.err(),
        Some(C5::NotAuthorized)
    );
}
