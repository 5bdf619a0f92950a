//! The `nats` target: publishes each message to a NATS JetStream subject.
//!
//! The message is the `inboxd.message.v1` JSON (or the raw bytes), with `Nats-Msg-Id` set to
//! the idempotency key, so the stream drops a repeat within its duplicate window (2 minutes
//! by default: a message re-published after a crash and a restart is stored once). The
//! stream's PubAck is the acknowledgement. A batch is published without waiting, and the acks
//! are awaited in order before the checkpoint moves (`flush`): one round trip per batch, not
//! per message. A server that is down or unreachable is a busy target (back-off, never a dead
//! letter); a subject no stream captures makes the handler unavailable (a configuration error,
//! retried along the reconnect schedule); a message larger than the server's `max_payload` is
//! dead-lettered with that reason.

use std::time::Duration;

use futures::future::BoxFuture;

use super::{Handler, HandlerError, Message};
use crate::config::Payload;
use crate::secret::SecretSource;

/// How inboxd authenticates to NATS: a token, or a user and password (or neither).
#[derive(Default)]
pub struct Auth {
    pub token: Option<SecretSource>,
    pub user: Option<String>,
    pub password: Option<SecretSource>,
}

pub struct Nats {
    servers: String,
    subject: String,
    payload: Payload,
    auth: Auth,
    timeout: Duration,
    /// Extra trust root for `tls://` servers.
    ca_file: Option<std::path::PathBuf>,
    client: Option<(async_nats::Client, async_nats::jetstream::Context)>,
    /// Published, ack not yet awaited: (key, ack).
    pending: Vec<(String, async_nats::jetstream::context::PublishAckFuture)>,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("servers", &self.servers)
            .field("subject", &self.subject)
            .finish()
    }
}

impl Nats {
    pub fn new(
        servers: &str,
        subject: &str,
        payload: Payload,
        auth: Auth,
        timeout: Duration,
        ca_file: Option<std::path::PathBuf>,
    ) -> Nats {
        Nats {
            servers: servers.to_string(),
            subject: subject.to_string(),
            payload,
            auth,
            timeout,
            ca_file,
            client: None,
            pending: Vec::new(),
        }
    }

    async fn context(&mut self) -> Result<(async_nats::Client, async_nats::jetstream::Context), HandlerError> {
        if let Some((c, js)) = &self.client {
            return Ok((c.clone(), js.clone()));
        }
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(self.timeout)
            .name(concat!("inboxd/", env!("CARGO_PKG_VERSION")));
        if let Some(source) = &self.auth.token {
            let token = source
                .resolve()
                .await
                .map_err(|e| HandlerError::unavailable(format!("nats: cannot read the token: {e}")))?;
            options = options.token(token.expose().to_string());
        }
        if let Some(user) = &self.auth.user {
            let password = match &self.auth.password {
                Some(source) => source
                    .resolve()
                    .await
                    .map_err(|e| HandlerError::unavailable(format!("nats: cannot read the password: {e}")))?
                    .expose()
                    .to_string(),
                None => String::new(),
            };
            options = options.user_and_password(user.clone(), password);
        }
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options
            .connect(self.servers.as_str())
            .await
            .map_err(|e| HandlerError::transient(format!("nats: cannot connect to {}: {e}", self.servers), None))?;
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(self.timeout);
        self.client = Some((client.clone(), js.clone()));
        Ok((client, js))
    }

    async fn publish(&mut self, m: &Message<'_>) -> Result<(), HandlerError> {
        let (client, js) = self.context().await?;
        let max = client.server_info().max_payload as u64;
        let too_big = |size: u64| {
            HandlerError::permanent(format!(
                "nats: the message is {size} bytes, above the server's max_payload ({max} bytes)"
            ))
        };
        // A raw message too large is refused before it is read.
        if self.payload == Payload::Raw && max > 0 && m.body.len() > max {
            return Err(too_big(m.body.len()));
        }
        let (content_type, bytes) = super::encode(self.payload, m)?;
        if max > 0 && bytes.len() as u64 > max {
            return Err(too_big(bytes.len() as u64));
        }
        let subject = subject_for(&self.subject, m.account, m.folder);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", m.key);
        headers.insert("Content-Type", content_type);
        match js.publish_with_headers(subject, headers, bytes.into()).await {
            Ok(ack) => {
                self.pending.push((m.key.to_string(), ack));
                Ok(())
            }
            // Earlier messages of the batch stay pending: the flush before the back-off waits
            // for their acks.
            Err(e) => Err(HandlerError::transient(format!("nats: publish failed: {e}"), None)),
        }
    }

    async fn await_acks(&mut self) -> Result<(), HandlerError> {
        for (key, ack) in std::mem::take(&mut self.pending) {
            match ack.await {
                Ok(_) => {}
                Err(e) => {
                    let text = e.to_string();
                    // No stream listens on the subject: nothing will ever take these messages.
                    let kind = e.kind();
                    let error = if matches!(kind, async_nats::jetstream::context::PublishErrorKind::StreamNotFound) {
                        HandlerError::unavailable(format!("nats: no JetStream stream captures the subject: {text}"))
                    } else {
                        HandlerError::transient(format!("nats: no acknowledgement for {key}: {text}"), None)
                    };
                    return Err(error);
                }
            }
        }
        Ok(())
    }
}

/// The subject for a message: `{account}` and `{folder}` replaced by their names, with the
/// characters a subject token cannot hold (space, `.`, `*`, `>`) made `_`.
pub fn subject_for(template: &str, account: &str, folder: &str) -> String {
    let token = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_whitespace() || matches!(c, '.' | '*' | '>') {
                    '_'
                } else {
                    c
                }
            })
            .collect()
    };
    super::fill(template, &token(account), &token(folder))
}

impl Handler for Nats {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.publish(message))
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(self.await_acks())
    }

    fn batches(&self) -> bool {
        true
    }

    fn probe<'a>(&'a mut self, account: &'a str, folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async move {
            let (_, js) = self.context().await.map_err(|e| HandlerError::unavailable(e.reason))?;
            let subject = subject_for(&self.subject, account, folder);
            let stream = js
                .stream_by_subject(subject.clone())
                .await
                .map_err(|e| HandlerError::unavailable(format!("nats: no JetStream stream captures {subject}: {e}")))?;
            Ok(format!(
                "{} connected; subject {subject} goes to stream {stream}",
                self.servers
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_made_of_valid_tokens() {
        assert_eq!(
            subject_for("mail.{account}.{folder}", "support", "INBOX"),
            "mail.support.INBOX"
        );
        assert_eq!(
            subject_for("mail.{account}.{folder}", "a.b", "Sent Items>*"),
            "mail.a_b.Sent_Items__"
        );
    }
}
