//! The event store against real PostgreSQL and Redis servers (Debian's, started by
//! `scripts/db-services` on loopback ports): rows and keys after real MQTT clients connect and
//! disconnect, the documented "who is online since when" queries, ordering on takeover, and
//! the faults — store down at start, store killed mid-stream, wrong password — each with its
//! status, metrics, and MQTT clients still served.
//!
//! Without the servers the tests skip with a message; with `CORVID_REQUIRE_DB_SERVERS=1` (CI)
//! they fail instead.

use crate::access_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use access_support::*;
use corvid_broker::config::{PostgresStoreConfig, RedisStoreConfig, StoreRetryConfig};
use corvid_broker::server::Running;
use serde_json::Value;

/// One throwaway server from `scripts/db-services`, stopped (killed) on drop.
struct Service {
    kind: &'static str,
    dir: tempfile::TempDir,
    port: u16,
    url: String,
    password_file: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/db-services")
}

fn required() -> bool {
    std::env::var("CORVID_REQUIRE_DB_SERVERS").as_deref() == Ok("1")
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Service {
    /// Prepares a service without starting it (for "down at start").
    fn planned(kind: &'static str) -> Service {
        let dir = tempfile::Builder::new()
            .prefix("corvid-es-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let port = free_port();
        let url = match kind {
            "postgres" => format!("postgres://corvid@127.0.0.1:{port}/corvid"),
            _ => format!("redis://127.0.0.1:{port}/0"),
        };
        let password_file = dir.path().join(kind).join("password");
        Service {
            kind,
            dir,
            port,
            url,
            password_file,
        }
    }

    /// Starts a fresh server, or returns `None` (test skipped) when it cannot start and the
    /// servers are not required.
    async fn start(kind: &'static str) -> Option<Service> {
        let s = Service::planned(kind);
        match s.up().await {
            Ok(()) => Some(s),
            Err(e) if required() => {
                panic!("CORVID_REQUIRE_DB_SERVERS=1 but {kind} did not start: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot start {kind} with scripts/db-services ({e}); set CORVID_REQUIRE_DB_SERVERS=1 to fail instead");
                None
            }
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join(self.kind)
    }

    /// Starts (or restarts) the server on its port and data directory.
    async fn up(&self) -> Result<(), String> {
        let out = tokio::process::Command::new("bash")
            .arg(script())
            .args([
                "start",
                self.kind,
                "--port",
                &self.port.to_string(),
                "--dir",
            ])
            .arg(self.state_dir())
            .output()
            .await
            .map_err(|e| format!("cannot run scripts/db-services: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.lines().any(|l| l == format!("URL={}", self.url)),
            "unexpected URL from db-services: {stdout}"
        );
        Ok(())
    }

    /// Stops the server: `now` kills it (a crash), else a clean shutdown.
    async fn down(&self, now: bool) {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(script())
            .args(["stop", self.kind, "--dir"])
            .arg(self.state_dir());
        if now {
            cmd.arg("--now");
        }
        let out = cmd.output().await.expect("run db-services stop");
        assert!(
            out.status.success(),
            "db-services stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script())
            .args(["stop", self.kind, "--now", "--dir"])
            .arg(self.state_dir())
            .output();
    }
}

/// Fast retries so the fault tests take seconds.
fn quick_retry() -> StoreRetryConfig {
    StoreRetryConfig {
        max_backoff_ms: 300,
        max_attempts: 3,
        timeout_ms: 3000,
        health_check_ms: 300,
    }
}

fn pg_config(s: &Service, prefix: &str) -> PostgresStoreConfig {
    let mut p = PostgresStoreConfig {
        url: Some(s.url.clone()),
        password_file: Some(s.password_file.clone()),
        table_prefix: prefix.into(),
        retry: quick_retry(),
        ..Default::default()
    };
    p.batch.linger_ms = 20;
    p
}

async fn pg(s: &Service) -> tokio_postgres::Client {
    let url = s.url.replace("corvid@", "corvid:corvid@");
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("test connects to postgres");
    tokio::spawn(conn);
    c
}

/// The documented query, verbatim but for the prefix.
async fn online_now(db: &tokio_postgres::Client, prefix: &str) -> Vec<String> {
    db.query(
        &format!("SELECT client_id, connected_at FROM {prefix}clients WHERE online ORDER BY connected_at"),
        &[],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
    .unwrap_or_default()
}

async fn events_of(db: &tokio_postgres::Client, prefix: &str, client: &str) -> Vec<String> {
    db.query(
        &format!("SELECT event FROM {prefix}client_events WHERE client_id = $1 ORDER BY id"),
        &[&client],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
    .unwrap_or_default()
}

async fn status(r: &Running, sink: &str) -> Value {
    let body = http_get(&format!("http://{}/api/v1/eventstore", r.admin)).await;
    let v: Value = serde_json::from_str(&body).expect("eventstore status is JSON");
    v["sinks"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["sink"] == sink).cloned())
        .unwrap_or_else(|| panic!("no sink {sink} in {body}"))
}

/// The value of the event store metric `name` for `sink`.
async fn sink_metric(r: &Running, name: &str, sink: &str) -> f64 {
    metric(r, name, &[&format!(r#"sink="{sink}""#)]).await
}

/// The sink reports itself down and has counted at least one failed attempt.
async fn assert_sink_failing(r: &Running, sink: &str) {
    assert_eq!(sink_metric(r, "corvid_eventstore_up", sink).await, 0.0);
    assert!(sink_metric(r, "corvid_eventstore_errors_total", sink).await >= 1.0);
}

async fn wait_state(r: &Running, sink: &str, state: &str) -> Value {
    eventually(&format!("{sink} state {state}"), || async {
        let s = status(r, sink).await;
        (s["state"] == state).then_some(s)
    })
    .await
}

async fn disconnect(c: v3::Client) {
    c.client.disconnect().await.expect("disconnect");
    // The broker has seen the DISCONNECT once the client's event loop ends.
    let mut rx = c.rx;
    let _ = tokio::time::timeout(WAIT, async { while rx.recv().await.is_some() {} }).await;
}

#[tokio::test]
async fn postgres_records_who_is_online_and_since_when() {
    let Some(s) = Service::start("postgres").await else {
        return;
    };
    let db = pg(&s).await;
    let prefix = "t1_";
    let mut c = config();
    let mut p = pg_config(&s, prefix);
    p.message_filters = vec!["telemetry/#".into()];
    c.event_store.postgres = Some(p);
    let r = start(c).await;
    wait_state(&r, "postgres", "up").await;
    db.execute(
        &format!(
            "INSERT INTO {prefix}clients (client_id, online, node, connected_at) \
             VALUES ('ghost', true, 'n1', now() - interval '1 hour')"
        ),
        &[],
    )
    .await
    .expect("insert ghost");
    let a = mqtt(&r);

    let first = v3::connect(a, "dev-a", None).await.expect("a");
    let second = v3::connect(a, "dev-b", Some(("alice", "x")))
        .await
        .expect("b");
    let third = v3::connect(a, "dev-c", None).await.expect("c");
    second
        .send("telemetry/b/temp", v3::QoS::AtLeastOnce, "21.5")
        .await;
    second
        .send("other/b", v3::QoS::AtLeastOnce, "not stored")
        .await;
    disconnect(first).await;
    // A takeover: the second connection's connect is queued before the first one's
    // disconnect; the client must stay online.
    let dup1 = v3::connect(a, "dev-dup", None).await.expect("dup1");
    let dup2 = v3::connect(a, "dev-dup", None).await.expect("dup2");
    eventually("takeover disconnect recorded", || async {
        (events_of(&db, prefix, "dev-dup").await.len() == 3).then_some(())
    })
    .await;

    let online = eventually("b, c and dup online, a offline", || async {
        let o = online_now(&db, prefix).await;
        (o.len() == 4).then_some(o)
    })
    .await;
    assert_eq!(
        online,
        vec!["ghost", "dev-b", "dev-c", "dev-dup"],
        "ordered by connected_at"
    );
    assert_eq!(
        events_of(&db, prefix, "dev-a").await,
        vec!["client.connected", "client.disconnected"]
    );
    assert_eq!(
        events_of(&db, prefix, "dev-dup").await,
        vec![
            "client.connected",
            "client.connected",
            "client.disconnected"
        ]
    );
    let row = db
        .query_one(
            &format!(
                "SELECT online, node, username, protocol, disconnect_reason, disconnected_at IS NOT NULL \
                 FROM {prefix}clients WHERE client_id = $1"
            ),
            &[&"dev-a"],
        )
        .await
        .expect("dev-a row");
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "n1");
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert_eq!(row.get::<_, Option<i32>>(3), Some(4));
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("normal"));
    assert!(row.get::<_, bool>(5));
    let b_user: Option<String> = db
        .query_one(
            &format!("SELECT username FROM {prefix}clients WHERE client_id = 'dev-b'"),
            &[],
        )
        .await
        .expect("dev-b")
        .get(0);
    assert_eq!(b_user.as_deref(), Some("alice"));
    let ghost = db
        .query_one(
            &format!(
                "SELECT online, disconnect_reason FROM {prefix}clients WHERE client_id = 'ghost'"
            ),
            &[],
        )
        .await
        .expect("ghost");
    // The ghost was inserted after the sink's first connect, so it is still online: the
    // clean-up runs once per broker start (checked in the restart test below).
    assert!(ghost.get::<_, bool>(0));
    let msgs = eventually("the telemetry message stored", || async {
        let rows = db
            .query(
                &format!("SELECT topic, payload, client_id FROM {prefix}messages ORDER BY id"),
                &[],
            )
            .await
            .ok()?;
        let msgs: Vec<(String, Vec<u8>, String)> = rows
            .iter()
            .map(|m| (m.get(0), m.get(1), m.get(2)))
            .collect();
        (!msgs.is_empty()).then_some(msgs)
    })
    .await;
    assert_eq!(
        msgs,
        vec![(
            "telemetry/b/temp".to_string(),
            b"21.5".to_vec(),
            "dev-b".to_string()
        )]
    );

    let st = status(&r, "postgres").await;
    assert_eq!(st["state"], "up");
    assert_eq!(st["target"], s.url.as_str());
    assert_eq!(st["dropped"], 0);
    // a: 2, b: 1, c: 1, dup: 3, one message.
    assert_eq!(st["written"], 8, "{st}");
    assert_eq!(
        sink_metric(&r, "corvid_eventstore_up", "postgres").await,
        1.0
    );
    assert_eq!(
        sink_metric(&r, "corvid_eventstore_written_total", "postgres").await,
        8.0
    );
    assert_eq!(
        sink_metric(&r, "corvid_eventstore_latency_seconds_count", "postgres").await,
        8.0
    );
    drop((second, third, dup1, dup2));
    r.shutdown(Duration::from_secs(5)).await;

    // Clean shutdown: the remaining clients' disconnects were written before exit.
    assert!(online_now(&db, prefix).await.iter().all(|c| c == "ghost"));

    // A restart of the node marks what it had left online (the ghost) offline.
    let mut c = config();
    c.event_store.postgres = Some(pg_config(&s, prefix));
    let r = start(c).await;
    wait_state(&r, "postgres", "up").await;
    let ghost: Option<String> = eventually("ghost marked offline", || async {
        let row = db
            .query_one(
                &format!("SELECT online, disconnect_reason FROM {prefix}clients WHERE client_id = 'ghost'"),
                &[],
            )
            .await
            .ok()?;
        (!row.get::<_, bool>(0)).then(|| row.get(1))
    })
    .await;
    assert_eq!(ghost.as_deref(), Some("node_restarted"));
    r.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn postgres_down_at_start_buffers_then_writes() {
    // Only checks that the servers can run; this test starts its own later.
    let s = Service::planned("postgres");
    // The Secret is mounted before the database exists.
    std::fs::create_dir_all(s.state_dir()).expect("mkdir");
    std::fs::write(&s.password_file, "corvid\n").expect("password file");
    let mut c = config();
    c.event_store.postgres = Some(pg_config(&s, "t2_"));
    let r = start(c).await;
    let st = wait_state(&r, "postgres", "down").await;
    let err = st["last_error"].as_str().unwrap_or_default().to_string();
    // Says what happened, not only "error connecting to server".
    assert!(err.contains("Connection refused"), "{st}");
    assert_sink_failing(&r, "postgres").await;

    let a = mqtt(&r);
    let early = v3::connect(a, "early", None).await.expect("early");
    let gone = v3::connect(a, "gone", None).await.expect("gone");
    disconnect(gone).await;
    eventually("3 events buffered", || async {
        let st = status(&r, "postgres").await;
        (st["buffered"] == 3).then_some(())
    })
    .await;
    assert_eq!(
        sink_metric(&r, "corvid_eventstore_buffered", "postgres").await,
        3.0
    );
    assert_mqtt_served(&r, "bystander-down").await;

    if let Err(e) = s.up().await {
        if required() {
            panic!("CORVID_REQUIRE_DB_SERVERS=1 but postgres did not start: {e}");
        }
        eprintln!("SKIPPED (second half): cannot start postgres: {e}");
        return;
    }
    wait_state(&r, "postgres", "up").await;
    let db = pg(&s).await;
    let online = eventually("buffered events written", || async {
        let o = online_now(&db, "t2_").await;
        let gone = events_of(&db, "t2_", "gone").await;
        (gone.len() == 2 && !o.is_empty()).then_some(o)
    })
    .await;
    assert_eq!(online, vec!["early".to_string()]);
    // early (1) + gone (2) + the bystander (2), all buffered through the outage.
    let st = eventually("all 5 events written", || async {
        let st = status(&r, "postgres").await;
        (st["written"] == 5).then_some(st)
    })
    .await;
    assert_eq!(st["dropped"], 0);
    assert_eq!(st["buffered"], 0);
    drop(early);
    r.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn postgres_killed_mid_stream_drops_counted_and_mqtt_keeps_serving() {
    let Some(s) = Service::start("postgres").await else {
        return;
    };
    let mut c = config();
    let mut p = pg_config(&s, "t3_");
    p.buffer.max_events = 5;
    p.batch.max_rows = 5;
    c.event_store.postgres = Some(p);
    let r = start(c).await;
    wait_state(&r, "postgres", "up").await;
    let a = mqtt(&r);
    let before = v3::connect(a, "before", None).await.expect("before");
    eventually("first event written", || async {
        (status(&r, "postgres").await["written"] == 1).then_some(())
    })
    .await;

    s.down(true).await;
    // Idle, the sink notices by its health check.
    let st = wait_state(&r, "postgres", "down").await;
    assert!(!st["last_error"].is_null(), "{st}");
    assert_eq!(
        sink_metric(&r, "corvid_eventstore_up", "postgres").await,
        0.0
    );
    // 40 events against a buffer of 5 (plus a batch of 5 in hand): most are dropped.
    for i in 0..20 {
        let c = v3::connect(a, &format!("burst-{i}"), None)
            .await
            .expect("burst");
        disconnect(c).await;
    }
    let dropped = eventually("drops counted", || async {
        let d = sink_metric(&r, "corvid_eventstore_dropped_total", "postgres").await;
        (d >= 20.0).then_some(d)
    })
    .await;
    assert_eq!(
        status(&r, "postgres").await["dropped"].as_f64(),
        Some(dropped)
    );
    assert_eq!(
        sink_metric(&r, "corvid_eventstore_up", "postgres").await,
        0.0
    );
    assert_mqtt_served(&r, "bystander-killed").await;

    s.up().await.expect("postgres restarts");
    wait_state(&r, "postgres", "up").await;
    // Every event is either written or counted as dropped: 1 (before) + 40 (burst) + 2 (the
    // bystander's connect and disconnect).
    let st = eventually("every event written or counted as dropped", || async {
        let st = status(&r, "postgres").await;
        let w = st["written"].as_u64().unwrap_or(0);
        let d = st["dropped"].as_u64().unwrap_or(0);
        (w + d == 43 && st["buffered"] == 0).then_some(st)
    })
    .await;
    assert!(
        st["written"].as_u64().unwrap_or(0) > 1,
        "buffered events written: {st}"
    );
    assert!(st["dropped"].as_f64().unwrap_or(0.0) >= dropped, "{st}");
    drop(before);
    r.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn postgres_wrong_password_is_a_clear_state_and_recovers_when_fixed() {
    let Some(s) = Service::start("postgres").await else {
        return;
    };
    let wrong = s.dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").expect("write");
    let mut c = config();
    let mut p = pg_config(&s, "t4_");
    p.password_file = Some(wrong.clone());
    c.event_store.postgres = Some(p);
    let r = start(c).await;
    let st = wait_state(&r, "postgres", "auth_failed").await;
    let err = st["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("password authentication failed"), "{st}");
    assert_sink_failing(&r, "postgres").await;
    let c1 = v3::connect(mqtt(&r), "while-refused", None)
        .await
        .expect("MQTT clients still accepted");
    assert_mqtt_served(&r, "bystander-auth").await;

    // The Secret is fixed: the file is re-read on the next attempt.
    std::fs::copy(&s.password_file, &wrong).expect("fix password");
    wait_state(&r, "postgres", "up").await;
    let db = pg(&s).await;
    eventually("buffered connect written", || async {
        (online_now(&db, "t4_").await == vec!["while-refused".to_string()]).then_some(())
    })
    .await;
    drop(c1);
    r.shutdown(Duration::from_secs(5)).await;
}

fn redis_config(s: &Service, prefix: &str) -> RedisStoreConfig {
    let mut c = RedisStoreConfig {
        url: s.url.clone(),
        password_file: Some(s.password_file.clone()),
        key_prefix: prefix.into(),
        retry: quick_retry(),
        ..Default::default()
    };
    c.batch.linger_ms = 20;
    c
}

async fn redis_conn(s: &Service) -> redis::aio::MultiplexedConnection {
    let url = s.url.replace("redis://", "redis://:corvid@");
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("test connects to redis")
}

async fn zrange(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<(String, f64)> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .unwrap_or_default()
}

/// The stream's entries as field maps, oldest first.
async fn stream(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap_or_default();
    raw.into_iter()
        .map(|(_, kv)| {
            kv.chunks(2)
                .filter_map(|p| Some((p.first()?.clone(), p.get(1)?.clone())))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn redis_records_online_set_hashes_and_stream() {
    let Some(s) = Service::start("redis").await else {
        return;
    };
    let mut db = redis_conn(&s).await;
    let mut c = config();
    let mut rc = redis_config(&s, "t5:");
    rc.message_filters = vec!["telemetry/#".into()];
    c.event_store.redis = Some(rc);
    let r = start(c).await;
    wait_state(&r, "redis", "up").await;
    let a = mqtt(&r);
    let first = v3::connect(a, "dev-a", None).await.expect("a");
    let second = v3::connect(a, "dev-b", Some(("bob", "x")))
        .await
        .expect("b");
    second.send("telemetry/b", v3::QoS::AtLeastOnce, "42").await;
    disconnect(first).await;
    let dup1 = v3::connect(a, "dev-dup", None).await.expect("dup1");
    let dup2 = v3::connect(a, "dev-dup", None).await.expect("dup2");

    // Every event reaches the stream, per client in order; the takeover's late disconnect
    // does not remove dev-dup from the online set.
    let entries = eventually("stream has all events", || async {
        let mut conn = db.clone();
        let e = stream(&mut conn, "t5:events").await;
        (e.len() >= 7).then_some(e)
    })
    .await;
    let of = |id: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|e| e.get("client_id").map(String::as_str) == Some(id))
            .filter_map(|e| e.get("event").cloned())
            .collect()
    };
    assert_eq!(of("dev-a"), vec!["client.connected", "client.disconnected"]);
    assert_eq!(
        of("dev-dup"),
        vec![
            "client.connected",
            "client.connected",
            "client.disconnected"
        ]
    );
    let msg = entries
        .iter()
        .find(|e| e.get("event").map(String::as_str) == Some("message.publish"))
        .expect("message in the stream");
    assert_eq!(msg.get("topic").map(String::as_str), Some("telemetry/b"));
    assert_eq!(msg.get("payload").map(String::as_str), Some("42"));

    let online = zrange(&mut db, "t5:online").await;
    assert_eq!(
        online.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        vec!["dev-b", "dev-dup"]
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as f64)
        .unwrap_or(0.0);
    assert!(online
        .iter()
        .all(|(_, since)| *since > now_ms - 60_000.0 && *since <= now_ms));
    let h: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("t5:client:dev-a")
        .query_async(&mut db)
        .await
        .expect("hash");
    assert_eq!(h.get("online").map(String::as_str), Some("0"));
    assert_eq!(h.get("node").map(String::as_str), Some("n1"));
    assert_eq!(h.get("reason").map(String::as_str), Some("normal"));
    let hb: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("t5:client:dev-b")
        .query_async(&mut db)
        .await
        .expect("hash");
    assert_eq!(hb.get("online").map(String::as_str), Some("1"));
    assert_eq!(hb.get("username").map(String::as_str), Some("bob"));
    // One protocol label everywhere: the level (4 for 3.1.1), in the hash and the stream alike.
    assert_eq!(hb.get("protocol").map(String::as_str), Some("4"));
    let connect_b = entries
        .iter()
        .find(|e| {
            e.get("client_id").map(String::as_str) == Some("dev-b")
                && e.get("event").map(String::as_str) == Some("client.connected")
        })
        .expect("dev-b's connect in the stream");
    assert_eq!(connect_b.get("protocol").map(String::as_str), Some("4"));
    let st = status(&r, "redis").await;
    assert_eq!(st["state"], "up");
    assert!(st["written"].as_u64().unwrap_or(0) >= 7, "{st}");
    assert_eq!(sink_metric(&r, "corvid_eventstore_up", "redis").await, 1.0);
    drop((second, dup1, dup2));
    r.shutdown(Duration::from_secs(5)).await;
    let after = zrange(&mut db, "t5:online").await;
    assert!(
        after.is_empty(),
        "clean shutdown leaves nobody online: {after:?}"
    );
}

#[tokio::test]
async fn redis_faults_wrong_password_and_restart() {
    let Some(s) = Service::start("redis").await else {
        return;
    };
    let wrong = s.dir.path().join("wrong-password");
    std::fs::write(&wrong, "nope\n").expect("write");
    let mut c = config();
    let mut rc = redis_config(&s, "t6:");
    rc.password_file = Some(wrong.clone());
    c.event_store.redis = Some(rc);
    let r = start(c).await;
    let st = wait_state(&r, "redis", "auth_failed").await;
    assert!(
        st["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("authentication failed"),
        "{st}"
    );
    assert_eq!(sink_metric(&r, "corvid_eventstore_up", "redis").await, 0.0);
    assert_mqtt_served(&r, "bystander-redis-auth").await;
    std::fs::copy(&s.password_file, &wrong).expect("fix password");
    wait_state(&r, "redis", "up").await;
    // The bystander's events, held while the password was wrong, go out once it is right
    // (written, not only taken from the buffer: a write cut short by the kill below would put
    // them back, and the count after the kill would no longer be the outage's alone).
    eventually(
        "the events held during the auth failure written",
        || async {
            let st = status(&r, "redis").await;
            (st["buffered"] == 0 && st["written"].as_u64() >= Some(2)).then_some(())
        },
    )
    .await;

    // Killed mid-stream, then back: buffered events arrive.
    s.down(true).await;
    wait_state(&r, "redis", "down").await;
    let a = mqtt(&r);
    let c1 = v3::connect(a, "during-outage", None).await.expect("c1");
    eventually("the connect buffered", || async {
        (status(&r, "redis").await["buffered"] == 1).then_some(())
    })
    .await;
    assert_mqtt_served(&r, "bystander-redis-down").await;
    s.up().await.expect("redis restarts");
    wait_state(&r, "redis", "up").await;
    let mut db = redis_conn(&s).await;
    eventually("buffered connect written to the new redis", || async {
        let mut conn = db.clone();
        let z = zrange(&mut conn, "t6:online").await;
        z.iter().any(|(id, _)| id == "during-outage").then_some(())
    })
    .await;
    assert_eq!(status(&r, "redis").await["dropped"], 0);
    let _ = zrange(&mut db, "t6:online").await;
    drop(c1);
    r.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn late_disconnect_from_another_node_keeps_the_client_online() {
    // Two nodes writing to the same stores: the client moves from n1 to n2, and n1 reports the
    // end of the old connection only afterwards (as after a takeover across the cluster).
    let Some(pg_s) = Service::start("postgres").await else {
        return;
    };
    let Some(redis_s) = Service::start("redis").await else {
        return;
    };
    let node = |name: &str| {
        let mut c = config();
        c.node.name = Some(name.into());
        c.event_store.postgres = Some(pg_config(&pg_s, "t7_"));
        c.event_store.redis = Some(redis_config(&redis_s, "t7:"));
        c
    };
    let n1 = start(node("n1")).await;
    let n2 = start(node("n2")).await;
    for r in [&n1, &n2] {
        wait_state(r, "postgres", "up").await;
        wait_state(r, "redis", "up").await;
    }
    let db = pg(&pg_s).await;
    let mut rdb = redis_conn(&redis_s).await;

    let old = v3::connect(mqtt(&n1), "roamer", None).await.expect("on n1");
    eventually("connect on n1 written", || async {
        (events_of(&db, "t7_", "roamer").await.len() == 1).then_some(())
    })
    .await;
    let new = v3::connect(mqtt(&n2), "roamer", None).await.expect("on n2");
    eventually("connect on n2 written", || async {
        (events_of(&db, "t7_", "roamer").await.len() == 2).then_some(())
    })
    .await;
    disconnect(old).await;
    eventually("late disconnect from n1 written", || async {
        (events_of(&db, "t7_", "roamer").await.len() == 3).then_some(())
    })
    .await;
    let r = db
        .query_one(
            "SELECT online, node FROM t7_clients WHERE client_id = 'roamer'",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(
        (r.get::<_, bool>(0), r.get::<_, String>(1)),
        (true, "n2".into())
    );
    let h: std::collections::HashMap<String, String> =
        eventually("redis saw n1's disconnect", || {
            let mut conn = rdb.clone();
            async move {
                let e = stream(&mut conn, "t7:events").await;
                if e.len() < 3 {
                    return None;
                }
                redis::cmd("HGETALL")
                    .arg("t7:client:roamer")
                    .query_async(&mut conn)
                    .await
                    .ok()
            }
        })
        .await;
    assert_eq!(h.get("online").map(String::as_str), Some("1"));
    assert_eq!(h.get("node").map(String::as_str), Some("n2"));
    assert_eq!(
        zrange(&mut rdb, "t7:online")
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>(),
        vec!["roamer".to_string()]
    );

    // Its current connection ending does mark it offline.
    disconnect(new).await;
    eventually("offline after the current connection ends", || async {
        online_now(&db, "t7_").await.is_empty().then_some(())
    })
    .await;
    eventually("redis online set empty", || {
        let mut conn = rdb.clone();
        async move {
            zrange(&mut conn, "t7:online")
                .await
                .is_empty()
                .then_some(())
        }
    })
    .await;
    n1.shutdown(Duration::from_secs(5)).await;
    n2.shutdown(Duration::from_secs(5)).await;
}
