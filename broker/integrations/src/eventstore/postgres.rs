//! The PostgreSQL sink: an append-only `{prefix}client_events` table, the current state of
//! every client in `{prefix}clients` (upserted in the same transaction), and optionally
//! `{prefix}messages`. The schema is created on connect when missing.
//!
//! Ordering across nodes: a `{prefix}clients` row is only changed by an event whose
//! connection started at or after the row's `connected_at`, so the `client.disconnected` of
//! an old connection that arrives after a newer connect (a takeover, possibly on another
//! node) leaves the client online.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::try_join_all;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use super::{protocol_level, read_password, Backend, Fault, FaultKind};
use crate::config::PostgresStoreConfig;
use crate::hooks::{Event, Stamped};

/// The prepared statements of one connection.
struct Prepared {
    insert_event: Statement,
    upsert_connected: Statement,
    upsert_disconnected: Statement,
    insert_message: Statement,
}

/// A connected client with its statements.
struct Conn {
    client: Client,
    st: Prepared,
}

/// See the module documentation.
pub(super) struct Postgres {
    cfg: PostgresStoreConfig,
    node: String,
    started: SystemTime,
    conn: Option<Conn>,
    /// This node's rows from an earlier run have been marked offline.
    cleaned: bool,
}

/// µs since the epoch as a timestamp.
fn ts(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

impl Postgres {
    pub(super) fn new(cfg: &PostgresStoreConfig, node: &str, started_us: u64) -> Self {
        Postgres {
            cfg: cfg.clone(),
            node: node.to_string(),
            started: ts(started_us),
            conn: None,
            cleaned: false,
        }
    }

    /// `postgres://user@host:port/dbname`, never with a password.
    pub(super) fn target(&self) -> String {
        match self.config(None) {
            Ok(c) => {
                let host = c
                    .get_hosts()
                    .first()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(h) => h.clone(),
                        #[cfg(unix)]
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .unwrap_or_default();
                let port = c.get_ports().first().copied().unwrap_or(5432);
                format!(
                    "postgres://{}@{}:{}/{}",
                    c.get_user().unwrap_or(""),
                    host,
                    port,
                    c.get_dbname().unwrap_or("")
                )
            }
            Err(_) => "postgres (invalid url)".into(),
        }
    }

    fn config(&self, password: Option<&str>) -> Result<tokio_postgres::Config, Fault> {
        let mut c = match &self.cfg.url {
            Some(url) => url
                .parse::<tokio_postgres::Config>()
                .map_err(|e| Fault::new(FaultKind::Rejected, format!("url: {e}")))?,
            None => {
                let mut c = tokio_postgres::Config::new();
                c.host(&self.cfg.host)
                    .port(self.cfg.port)
                    .dbname(&self.cfg.dbname)
                    .user(&self.cfg.user);
                c
            }
        };
        if let Some(p) = password {
            c.password(p);
        }
        c.application_name(format!("corvid-broker {}", self.node))
            .connect_timeout(Duration::from_millis(self.cfg.retry.timeout_ms.max(1)))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        Ok(c)
    }

    fn table(&self, name: &str) -> String {
        format!("{}{name}", self.cfg.table_prefix)
    }

    /// `CREATE TABLE IF NOT EXISTS` for every table, under an advisory lock so nodes starting
    /// together do not race on the catalog.
    fn schema_sql(&self) -> String {
        let events = self.table("client_events");
        let clients = self.table("clients");
        let messages = self.table("messages");
        let mut sql = format!(
            "BEGIN;
SELECT pg_advisory_xact_lock(hashtext('corvid-schema:{clients}'));
CREATE TABLE IF NOT EXISTS {events} (
    id bigserial PRIMARY KEY,
    ts timestamptz NOT NULL,
    node text NOT NULL,
    client_id text NOT NULL,
    username text,
    event text NOT NULL,
    peer text,
    reason text,
    protocol int,
    connected_at timestamptz
);
CREATE INDEX IF NOT EXISTS {events}_client_ts ON {events} (client_id, ts);
CREATE TABLE IF NOT EXISTS {clients} (
    client_id text PRIMARY KEY,
    online boolean NOT NULL,
    node text NOT NULL,
    connected_at timestamptz NOT NULL,
    disconnected_at timestamptz,
    peer text,
    username text,
    protocol int,
    disconnect_reason text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {clients}_online ON {clients} (connected_at) WHERE online;
"
        );
        if !self.cfg.message_filters.is_empty() {
            sql.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {messages} (
    id bigserial PRIMARY KEY,
    ts timestamptz NOT NULL,
    node text NOT NULL,
    client_id text NOT NULL,
    username text,
    topic text NOT NULL,
    qos int NOT NULL,
    retain boolean NOT NULL,
    payload bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS {messages}_topic_ts ON {messages} (topic, ts);
"
            ));
        }
        sql.push_str("COMMIT;");
        sql
    }

    async fn prepare(&self, client: &Client) -> Result<Prepared, tokio_postgres::Error> {
        let events = self.table("client_events");
        let clients = self.table("clients");
        let messages = self.table("messages");
        let insert_event = client
            .prepare(&format!(
                "INSERT INTO {events} (ts, node, client_id, username, event, peer, reason, protocol, connected_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ))
            .await?;
        let upsert_connected = client
            .prepare(&format!(
                "INSERT INTO {clients} AS c (client_id, online, node, connected_at, disconnected_at, peer, username, protocol, disconnect_reason, updated_at)
                 VALUES ($1, true, $2, $3, NULL, $4, $5, $6, NULL, now())
                 ON CONFLICT (client_id) DO UPDATE SET
                    online = true, node = EXCLUDED.node, connected_at = EXCLUDED.connected_at,
                    disconnected_at = NULL, peer = EXCLUDED.peer, username = EXCLUDED.username,
                    protocol = EXCLUDED.protocol, disconnect_reason = NULL, updated_at = now()
                 WHERE c.connected_at <= EXCLUDED.connected_at"
            ))
            .await?;
        let upsert_disconnected = client
            .prepare(&format!(
                "INSERT INTO {clients} AS c (client_id, online, node, connected_at, disconnected_at, peer, username, protocol, disconnect_reason, updated_at)
                 VALUES ($1, false, $2, $3, $4, $5, $6, NULL, $7, now())
                 ON CONFLICT (client_id) DO UPDATE SET
                    online = false, node = EXCLUDED.node, connected_at = EXCLUDED.connected_at,
                    disconnected_at = EXCLUDED.disconnected_at, peer = EXCLUDED.peer,
                    username = EXCLUDED.username, disconnect_reason = EXCLUDED.disconnect_reason,
                    updated_at = now()
                 WHERE c.connected_at <= EXCLUDED.connected_at"
            ))
            .await?;
        // Prepared even without message filters: a cheap statement, one code path.
        let insert_message = if self.cfg.message_filters.is_empty() {
            client.prepare("SELECT 1").await?
        } else {
            client
                .prepare(&format!(
                    "INSERT INTO {messages} (ts, node, client_id, username, topic, qos, retain, payload)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                ))
                .await?
        };
        Ok(Prepared {
            insert_event,
            upsert_connected,
            upsert_disconnected,
            insert_message,
        })
    }
}

/// Sorts a driver error into reconnect / credentials / rejected.
fn classify(e: &tokio_postgres::Error) -> Fault {
    let kind = match e.code() {
        None => FaultKind::Unreachable,
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            FaultKind::Auth
        }
        Some(c)
            if c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::INVALID_CATALOG_NAME =>
        {
            FaultKind::Unreachable
        }
        Some(_) => FaultKind::Rejected,
    };
    let kind = if e.is_closed() {
        FaultKind::Unreachable
    } else {
        kind
    };
    // The driver's Display leaves out the server's message; the DbError has it.
    // Nor does it say why a connect failed ("error connecting to server"): the source chain
    // does ("Connection refused (os error 111)", a timeout, a TLS or DNS failure).
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => {
            let mut m = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let text = s.to_string();
                if !m.ends_with(&text) {
                    m.push_str(": ");
                    m.push_str(&text);
                }
                source = s.source();
            }
            m
        }
    };
    Fault::new(kind, message)
}

/// Owned parameters of one event, so the pipelined statements can borrow them.
enum Row<'a> {
    Client {
        ts: SystemTime,
        connected_at: SystemTime,
        connected: bool,
        client_id: &'a str,
        username: Option<&'a str>,
        peer: &'a str,
        reason: Option<&'a str>,
        protocol: Option<i32>,
    },
    Message {
        ts: SystemTime,
        client_id: &'a str,
        username: Option<&'a str>,
        topic: &'a str,
        qos: i32,
        retain: bool,
        payload: &'a [u8],
    },
}

fn row(s: &Stamped) -> Option<Row<'_>> {
    match &*s.event {
        Event::ClientConnected {
            client_id,
            username,
            peer,
            protocol,
            connected_at_us,
            ..
        } => Some(Row::Client {
            ts: ts(s.at_us),
            connected_at: ts(*connected_at_us),
            connected: true,
            client_id,
            username: username.as_deref(),
            peer,
            reason: None,
            protocol: protocol_level(protocol),
        }),
        Event::ClientDisconnected {
            client_id,
            username,
            peer,
            reason,
            connected_at_us,
        } => Some(Row::Client {
            ts: ts(s.at_us),
            connected_at: ts(*connected_at_us),
            connected: false,
            client_id,
            username: username.as_deref(),
            peer,
            reason: Some(reason),
            protocol: None,
        }),
        Event::MessagePublish {
            client_id,
            username,
            topic,
            qos,
            retain,
            payload,
        } => Some(Row::Message {
            ts: ts(s.at_us),
            client_id,
            username: username.as_deref(),
            topic,
            qos: i32::from(*qos),
            retain: *retain,
            payload,
        }),
        _ => None,
    }
}

#[async_trait::async_trait]
impl Backend for Postgres {
    async fn connect(&mut self) -> Result<(), Fault> {
        self.conn = None;
        let password = match &self.cfg.password_file {
            Some(p) => Some(read_password(p)?),
            None => None,
        };
        let config = self.config(password.as_deref())?;
        let (client, connection) = config.connect(NoTls).await.map_err(|e| classify(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "event store postgres connection closed");
            }
        });
        client
            .batch_execute(&self.schema_sql())
            .await
            .map_err(|e| classify(&e))?;
        let st = self.prepare(&client).await.map_err(|e| classify(&e))?;
        if !self.cleaned {
            // Clients this node had online before it restarted are gone: their disconnect
            // events died with the old process.
            let n = client
                .execute(
                    &format!(
                        "UPDATE {} SET online = false, disconnected_at = now(),
                         disconnect_reason = 'node_restarted', updated_at = now()
                         WHERE node = $1 AND online AND connected_at < $2",
                        self.table("clients")
                    ),
                    &[&self.node, &self.started],
                )
                .await
                .map_err(|e| classify(&e))?;
            if n > 0 {
                tracing::info!(node = %self.node, clients = n, "event store postgres: marked clients left online by this node's previous run offline");
            }
            self.cleaned = true;
        }
        self.conn = Some(Conn { client, st });
        Ok(())
    }

    async fn write(&mut self, batch: &[Stamped]) -> Result<(), Fault> {
        let node = self.node.as_str();
        let Some(conn) = self.conn.as_mut() else {
            return Err(Fault::new(FaultKind::Unreachable, "not connected"));
        };
        let rows: Vec<Row<'_>> = batch.iter().filter_map(row).collect();
        let st = &conn.st;
        let tx = conn.client.transaction().await.map_err(|e| classify(&e))?;
        let mut calls = Vec::with_capacity(rows.len() * 2);
        // Sent in order on one connection (pipelined): the events table and the state table
        // see the events in the order they happened.
        for r in &rows {
            match r {
                Row::Client {
                    ts,
                    connected_at,
                    connected,
                    client_id,
                    username,
                    peer,
                    reason,
                    protocol,
                } => {
                    // `&'static` so the pipelined calls may hold it.
                    let event: &'static &'static str = if *connected {
                        &"client.connected"
                    } else {
                        &"client.disconnected"
                    };
                    let p: [&(dyn ToSql + Sync); 9] = [
                        ts,
                        &node,
                        client_id,
                        username,
                        event,
                        peer,
                        reason,
                        protocol,
                        connected_at,
                    ];
                    calls.push(tx.execute_raw(&st.insert_event, p.to_vec()));
                    if *connected {
                        let p: [&(dyn ToSql + Sync); 6] =
                            [client_id, &node, connected_at, peer, username, protocol];
                        calls.push(tx.execute_raw(&st.upsert_connected, p.to_vec()));
                    } else {
                        let p: [&(dyn ToSql + Sync); 7] =
                            [client_id, &node, connected_at, ts, peer, username, reason];
                        calls.push(tx.execute_raw(&st.upsert_disconnected, p.to_vec()));
                    }
                }
                Row::Message {
                    ts,
                    client_id,
                    username,
                    topic,
                    qos,
                    retain,
                    payload,
                } => {
                    let p: [&(dyn ToSql + Sync); 8] =
                        [ts, &node, client_id, username, topic, qos, retain, payload];
                    calls.push(tx.execute_raw(&st.insert_message, p.to_vec()));
                }
            }
        }
        try_join_all(calls).await.map_err(|e| classify(&e))?;
        tx.commit().await.map_err(|e| classify(&e))?;
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Fault> {
        match &self.conn {
            Some(c) => c
                .client
                .batch_execute("SELECT 1")
                .await
                .map_err(|e| classify(&e)),
            None => Err(Fault::new(FaultKind::Unreachable, "not connected")),
        }
    }

    fn close(&mut self) {
        self.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_hides_the_password() {
        let cfg = PostgresStoreConfig {
            url: Some("postgres://corvid:secret@db.example:6543/events".into()),
            ..Default::default()
        };
        let p = Postgres::new(&cfg, "n1", 0);
        assert_eq!(p.target(), "postgres://corvid@db.example:6543/events");
        let p = Postgres::new(&PostgresStoreConfig::default(), "n1", 0);
        assert_eq!(p.target(), "postgres://corvid@localhost:5432/corvid");
    }

    #[test]
    fn schema_uses_the_prefix() {
        let cfg = PostgresStoreConfig {
            table_prefix: "iot_".into(),
            message_filters: vec!["a/#".into()],
            ..Default::default()
        };
        let sql = Postgres::new(&cfg, "n1", 0).schema_sql();
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS iot_client_events"));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS iot_clients"));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS iot_messages"));
        let sql = Postgres::new(&PostgresStoreConfig::default(), "n1", 0).schema_sql();
        assert!(!sql.contains("corvid_messages"));
    }
}
