//! The Redis sink: a hash `{prefix}client:<id>` per client (online, node, connected_at, ...),
//! a sorted set `{prefix}online` of the clients online now (score: connect time in ms) and a
//! capped stream `{prefix}events` (`XADD ... MAXLEN ~ N`). A batch is one MULTI/EXEC
//! pipeline. The hash and the set change through a small Lua script that applies an event only
//! when its connection is not older than the one recorded, like the PostgreSQL upsert.

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo};

use super::{protocol_level, read_password, Backend, Fault, FaultKind};
use crate::config::RedisStoreConfig;
use crate::hooks::{Event, Stamped};

/// KEYS: client hash, online set. ARGV: mode (`c`/`d`), client id, connection start µs,
/// connection start ms, node, peer, username, protocol, disconnect time ms, reason.
const APPLY: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'connected_at_us') or '0') or 0
if cur > tonumber(ARGV[3]) then return 0 end
if ARGV[1] == 'c' then
  redis.call('HSET', KEYS[1], 'online', '1', 'node', ARGV[5], 'connected_at', ARGV[4],
    'connected_at_us', ARGV[3], 'peer', ARGV[6], 'username', ARGV[7], 'protocol', ARGV[8],
    'disconnected_at', '', 'reason', '')
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
else
  redis.call('HSET', KEYS[1], 'online', '0', 'node', ARGV[5], 'connected_at', ARGV[4],
    'connected_at_us', ARGV[3], 'peer', ARGV[6], 'username', ARGV[7],
    'disconnected_at', ARGV[9], 'reason', ARGV[10])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1
"#;

/// KEYS: online set. ARGV: client hash prefix, node, broker start µs, now ms. Marks this
/// node's clients from an earlier run offline.
const CLEAN: &str = r#"
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local k = ARGV[1] .. id
  local v = redis.call('HMGET', k, 'node', 'connected_at_us')
  if v[1] == ARGV[2] and (tonumber(v[2] or '0') or 0) < tonumber(ARGV[3]) then
    redis.call('HSET', k, 'online', '0', 'disconnected_at', ARGV[4], 'reason', 'node_restarted')
    redis.call('ZREM', KEYS[1], id)
    n = n + 1
  end
end
return n
"#;

/// See the module documentation.
pub(super) struct Redis {
    cfg: RedisStoreConfig,
    node: String,
    started_us: u64,
    conn: Option<(MultiplexedConnection, String)>,
    cleaned: bool,
}

impl Redis {
    pub(super) fn new(cfg: &RedisStoreConfig, node: &str, started_us: u64) -> Self {
        Redis {
            cfg: cfg.clone(),
            node: node.to_string(),
            started_us,
            conn: None,
            cleaned: false,
        }
    }

    /// The URL without a password.
    pub(super) fn target(&self) -> String {
        match self.cfg.url.as_str().into_connection_info() {
            Ok(info) => {
                let addr = info.addr().to_string();
                format!("redis://{addr}/{}", info.redis_settings().db())
            }
            Err(_) => "redis (invalid url)".into(),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.cfg.key_prefix)
    }
}

fn classify(e: &redis::RedisError) -> Fault {
    let text = e.to_string();
    let kind = if e.kind() == redis::ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("NOPERM")
    {
        FaultKind::Auth
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || text.contains("NOSCRIPT")
        || text.contains("LOADING")
    {
        FaultKind::Unreachable
    } else {
        FaultKind::Rejected
    };
    Fault::new(kind, text)
}

fn ms(us: u64) -> u64 {
    us / 1000
}

#[async_trait::async_trait]
impl Backend for Redis {
    async fn connect(&mut self) -> Result<(), Fault> {
        self.conn = None;
        let mut info = self
            .cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| Fault::new(FaultKind::Rejected, format!("url: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &self.cfg.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.cfg.password_file {
            settings = settings.set_password(read_password(p)?);
        }
        info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| classify(&e))?;
        let timeout = std::time::Duration::from_millis(self.cfg.retry.timeout_ms.max(1));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout)),
            )
            .await
            .map_err(|e| classify(&e))?;
        // A PING proves the credentials even on servers that accept the connection first.
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| classify(&e))?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(APPLY)
            .query_async(&mut conn)
            .await
            .map_err(|e| classify(&e))?;
        if !self.cleaned {
            let n: i64 = redis::cmd("EVAL")
                .arg(CLEAN)
                .arg(1)
                .arg(self.key("online"))
                .arg(self.key("client:"))
                .arg(&self.node)
                .arg(self.started_us)
                .arg(ms(crate::hooks::now_us()))
                .query_async(&mut conn)
                .await
                .map_err(|e| classify(&e))?;
            if n > 0 {
                tracing::info!(node = %self.node, clients = n, "event store redis: marked clients left online by this node's previous run offline");
            }
            self.cleaned = true;
        }
        self.conn = Some((conn, sha));
        Ok(())
    }

    async fn write(&mut self, batch: &[Stamped]) -> Result<(), Fault> {
        let online = self.key("online");
        let stream = self.key("events");
        let maxlen = self.cfg.stream_maxlen;
        let Some((conn, sha)) = self.conn.as_mut() else {
            return Err(Fault::new(FaultKind::Unreachable, "not connected"));
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        for s in batch {
            let xadd = pipe
                .cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(maxlen)
                .arg("*");
            let client = match &*s.event {
                Event::ClientConnected {
                    client_id,
                    username,
                    peer,
                    protocol,
                    connected_at_us,
                    ..
                } => Some((client_id, username, peer, *connected_at_us, true, *protocol)),
                Event::ClientDisconnected {
                    client_id,
                    username,
                    peer,
                    reason,
                    connected_at_us,
                } => Some((client_id, username, peer, *connected_at_us, false, *reason)),
                _ => None,
            };
            match (client, &*s.event) {
                (Some((client_id, username, peer, conn_us, connected, detail)), _) => {
                    let user = username.as_deref().unwrap_or("");
                    // One protocol label everywhere (the stream, the hash, PostgreSQL): the
                    // protocol level, 3/4/5, as on the wire.
                    let (mode, proto, reason) = if connected {
                        let p = protocol_level(detail).map(|p| p.to_string());
                        ("c", p.unwrap_or_default(), "")
                    } else {
                        ("d", String::new(), detail)
                    };
                    head_fields(xadd, s, &self.node, client_id)
                        .arg("username")
                        .arg(user)
                        .arg("peer")
                        .arg(peer)
                        .arg("connected_at")
                        .arg(ms(conn_us))
                        // `protocol` on connect, `reason` on disconnect.
                        .arg(if connected { "protocol" } else { "reason" })
                        .arg(if connected { proto.as_str() } else { reason })
                        .ignore();
                    pipe.cmd("EVALSHA")
                        .arg(sha.as_str())
                        .arg(2)
                        .arg(format!("{}client:{client_id}", self.cfg.key_prefix))
                        .arg(&online)
                        .arg(mode)
                        .arg(client_id)
                        .arg(conn_us)
                        .arg(ms(conn_us))
                        .arg(&self.node)
                        .arg(peer)
                        .arg(user)
                        .arg(proto)
                        .arg(ms(s.at_us))
                        .arg(reason)
                        .ignore();
                }
                (
                    None,
                    Event::MessagePublish {
                        client_id,
                        username,
                        topic,
                        qos,
                        retain,
                        payload,
                    },
                ) => {
                    head_fields(xadd, s, &self.node, client_id)
                        .arg("username")
                        .arg(username.as_deref().unwrap_or(""))
                        .arg("topic")
                        .arg(topic)
                        .arg("qos")
                        .arg(*qos)
                        .arg("retain")
                        .arg(u8::from(*retain))
                        .arg("payload")
                        .arg(payload.as_ref())
                        .ignore();
                }
                _ => {
                    // Not taken by this sink (see `kinds`); keep the stream entry meaningful.
                    xadd.arg("event").arg(s.event.kind().name()).ignore();
                }
            }
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| classify(&e))?;
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Fault> {
        match self.conn.as_mut() {
            Some((conn, _)) => redis::cmd("PING")
                .query_async::<String>(conn)
                .await
                .map(|_| ())
                .map_err(|e| classify(&e)),
            None => Err(Fault::new(FaultKind::Unreachable, "not connected")),
        }
    }

    fn close(&mut self) {
        self.conn = None;
    }
}

/// The stream fields every entry about a client starts with: the event, when, where, who.
fn head_fields<'p>(
    xadd: &'p mut redis::Pipeline,
    s: &Stamped,
    node: &str,
    client_id: impl redis::ToRedisArgs,
) -> &'p mut redis::Pipeline {
    xadd.arg("event")
        .arg(s.event.kind().name())
        .arg("ts")
        .arg(ms(s.at_us))
        .arg("node")
        .arg(node)
        .arg("client_id")
        .arg(client_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_hides_the_password() {
        let cfg = RedisStoreConfig {
            url: "redis://:secret@cache.example:6380/2".into(),
            ..Default::default()
        };
        let r = Redis::new(&cfg, "n1", 0);
        assert_eq!(r.target(), "redis://cache.example:6380/2");
    }
}
