//! The `redis` target: adds each message to a Redis stream (`XADD`), at most once per key.
//!
//! One Lua script, atomic in Redis, records the idempotency key (`SET key NX EX ttl`) and adds
//! the entry only when the key was new; a message handed over again after a crash finds its
//! key and adds nothing. The entry's fields: `key`, `account`, `folder`, `uid`, `content_type`
//! and `payload` (the `inboxd.message.v1` JSON, or the raw message). The script's answer is the
//! acknowledgement. A Redis that is down or unreachable is a busy target (back-off, never a
//! dead letter); the connection is made again on the next attempt.

use std::time::Duration;

use futures::future::BoxFuture;

use super::{Handler, HandlerError, Message};
use crate::config::Payload;

/// Adds the entry only if the key is new. KEYS: stream, dedupe key. ARGV: ttl, then field,
/// value pairs. Returns the entry id, or false for a repeat.
const ADD_ONCE: &str = r"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
return false
";

pub struct Redis {
    url: String,
    password: Option<crate::secret::SecretSource>,
    stream: String,
    payload: Payload,
    /// How long a key is remembered to drop repeats.
    dedupe_for: Duration,
    timeout: Duration,
    script: redis::Script,
    connection: Option<redis::aio::MultiplexedConnection>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("stream", &self.stream).finish()
    }
}

impl Redis {
    pub fn new(
        url: &str,
        stream: &str,
        password: Option<crate::secret::SecretSource>,
        payload: Payload,
        dedupe_for: Duration,
        timeout: Duration,
    ) -> Redis {
        Redis {
            url: url.to_string(),
            password,
            stream: stream.to_string(),
            payload,
            dedupe_for,
            timeout,
            script: redis::Script::new(ADD_ONCE),
            connection: None,
        }
    }

    async fn connection(&mut self) -> Result<redis::aio::MultiplexedConnection, HandlerError> {
        if let Some(c) = &self.connection {
            return Ok(c.clone());
        }
        use redis::IntoConnectionInfo;
        let mut info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| HandlerError::unavailable(format!("redis: {}", e.kind_text())))?;
        if let Some(source) = &self.password {
            let password = source
                .resolve()
                .await
                .map_err(|e| HandlerError::unavailable(format!("redis: cannot read the password: {e}")))?;
            let settings = info.redis_settings().clone().set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client =
            redis::Client::open(info).map_err(|e| HandlerError::unavailable(format!("redis: {}", e.kind_text())))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let c = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| HandlerError::transient(format!("redis: cannot connect: {}", e.kind_text()), None))?;
        self.connection = Some(c.clone());
        Ok(c)
    }

    async fn add(&mut self, m: &Message<'_>) -> Result<(), HandlerError> {
        let mut c = self.connection().await?;
        let (content_type, payload) = super::encode(self.payload, m)?;
        let stream = super::fill(&self.stream, m.account, m.folder);
        let result: redis::RedisResult<Option<String>> = self
            .script
            .key(&stream)
            .key(format!("{stream}:seen:{}", m.key))
            .arg(self.dedupe_for.as_secs().max(1))
            .arg("key")
            .arg(m.key)
            .arg("account")
            .arg(m.account)
            .arg("folder")
            .arg(m.folder)
            .arg("uid")
            .arg(m.uid)
            .arg("content_type")
            .arg(content_type)
            .arg("payload")
            .arg(payload)
            .invoke_async(&mut c)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() => {
                self.connection = None;
                Err(HandlerError::transient(format!("redis: {}", e.kind_text()), None))
            }
            Err(e) => Err(HandlerError::new(format!("redis: {}", e.kind_text()))),
        }
    }
}

/// A Redis error's kind and server message, never the URL (which may hold a password).
trait KindText {
    fn kind_text(&self) -> String;
}

impl KindText for redis::RedisError {
    fn kind_text(&self) -> String {
        let detail = self.detail().unwrap_or("");
        let code = self.code().unwrap_or("");
        let text = format!("{:?} {code} {detail}", self.kind());
        crate::imap::clip(text.trim().to_string(), 300)
    }
}

impl Handler for Redis {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.add(message))
    }

    fn batches(&self) -> bool {
        true
    }

    fn probe<'a>(&'a mut self, account: &'a str, folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async move {
            let mut c = self
                .connection()
                .await
                .map_err(|e| HandlerError::unavailable(e.reason))?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut c)
                .await
                .map_err(|e| HandlerError::unavailable(format!("redis: {}", e.kind_text())))?;
            let stream = super::fill(&self.stream, account, folder);
            Ok(format!("connected ({pong}); entries go to stream {stream}"))
        })
    }
}
