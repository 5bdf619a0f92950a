//! The `amqp` target: publishes each message to RabbitMQ (AMQP 0.9.1) with publisher confirms.
//!
//! Messages are persistent, `message_id` is the idempotency key, and publishing is mandatory:
//! a message no queue would receive comes back (`basic.return`) and is a failure of the watch
//! (a missing binding), never a silent drop. A batch is published without waiting; `flush`
//! waits until the broker confirmed every delivery tag of it. A nack, a lost connection or a
//! confirm that does not come in time is a busy target: the connection is dropped, and the
//! batch is published again after the back-off (AMQP has no deduplication: a consumer sees a
//! message twice only if the broker took it but its confirm was lost).
//!
//! Crate: amqprs (tokio-native, 3 crates beyond what inboxd has). lapin 4.12 was measured too:
//! 73 more crates (its own executor, a DNS resolver, PKCS#12), for per-publish confirm futures
//! that the delivery-tag bookkeeping below gives as well.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Handler, HandlerError, Message};
use crate::config::Payload;
use crate::secret::SecretSource;

/// What the broker said about published messages.
enum Confirm {
    Ack {
        tag: u64,
        multiple: bool,
    },
    /// Any nack fails the batch, which is published again whole: which tags it named does not
    /// matter.
    Nack,
    /// Unroutable (mandatory): the message id and the broker's reason.
    Returned {
        key: String,
        reason: String,
    },
}

struct Confirms(mpsc::UnboundedSender<Confirm>);

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _channel: &Channel, _close: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _channel: &Channel, _cancel: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _channel: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        let _ = self.0.send(Confirm::Ack {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
        });
    }
    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        let _ = nack;
        let _ = self.0.send(Confirm::Nack);
    }
    async fn publish_return(&mut self, _channel: &Channel, ret: Return, props: BasicProperties, _content: Vec<u8>) {
        let _ = self.0.send(Confirm::Returned {
            key: props.message_id().cloned().unwrap_or_default(),
            reason: format!(
                "{} {} (routing key {:?})",
                ret.reply_code(),
                ret.reply_text(),
                ret.routing_key()
            ),
        });
    }
}

struct Live {
    connection: Connection,
    channel: Channel,
    confirms: mpsc::UnboundedReceiver<Confirm>,
    /// The delivery tag the next publish gets (tags count from 1 after confirm.select).
    next_tag: u64,
}

pub struct Amqp {
    url: String,
    user: String,
    password: Option<SecretSource>,
    exchange: String,
    routing_key: String,
    payload: Payload,
    timeout: Duration,
    /// For `amqps://`.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    live: Option<Live>,
    /// Published, not yet confirmed: delivery tag -> key.
    pending: BTreeMap<u64, String>,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp")
            .field("url", &self.url)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish()
    }
}

impl Amqp {
    // One argument per key of the target's config table.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        url: &str,
        user: &str,
        password: Option<SecretSource>,
        exchange: &str,
        routing_key: &str,
        payload: Payload,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Amqp, HandlerError> {
        let tls = match endpoint(url) {
            Some((_, _, _, true)) => Some(super::tls_config(ca_file, "amqp")?),
            _ => None,
        };
        Ok(Amqp {
            tls,
            url: url.to_string(),
            user: user.to_string(),
            password,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            payload,
            timeout,
            live: None,
            pending: BTreeMap::new(),
        })
    }

    async fn connect(&mut self) -> Result<(), HandlerError> {
        if self.live.is_some() {
            return Ok(());
        }
        let password = match &self.password {
            Some(source) => source
                .resolve()
                .await
                .map_err(|e| HandlerError::unavailable(format!("amqp: cannot read the password: {e}")))?
                .expose()
                .to_string(),
            None => String::new(),
        };
        let (host, port, vhost, _) = endpoint(&self.url)
            .ok_or_else(|| HandlerError::unavailable(format!("amqp: {} is not an amqp:// URL", self.url)))?;
        let mut args = OpenConnectionArguments::new(&host, port, &self.user, &password);
        args.virtual_host(&vhost)
            .connection_name(concat!("inboxd/", env!("CARGO_PKG_VERSION")));
        if let Some(config) = &self.tls {
            args.tls_adaptor(amqprs::tls::TlsAdaptor::new(
                tokio_rustls::TlsConnector::from(config.clone()),
                host.clone(),
            ));
        }
        let args = args.finish();
        let busy = |what: &str, e: amqprs::error::Error| HandlerError::transient(format!("amqp: {what}: {e}"), None);
        let open = async {
            let connection = Connection::open(&args).await.map_err(|e| busy("cannot connect", e))?;
            connection
                .register_callback(DefaultConnectionCallback)
                .await
                .map_err(|e| busy("connection", e))?;
            let channel = connection.open_channel(None).await.map_err(|e| busy("channel", e))?;
            let (tx, rx) = mpsc::unbounded_channel();
            channel
                .register_callback(Confirms(tx))
                .await
                .map_err(|e| busy("channel", e))?;
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await
                .map_err(|e| busy("confirm.select", e))?;
            Ok::<_, HandlerError>(Live {
                connection,
                channel,
                confirms: rx,
                next_tag: 1,
            })
        };
        let live = tokio::time::timeout(self.timeout, open).await.map_err(|_| {
            HandlerError::transient(format!("amqp: connecting took longer than {:?}", self.timeout), None)
        })??;
        self.live = Some(live);
        Ok(())
    }

    /// Forgets the connection; what was published on it is published again.
    fn reset(&mut self) {
        if let Some(live) = self.live.take() {
            tokio::spawn(async move {
                let _ = live.channel.close().await;
                let _ = live.connection.close().await;
            });
        }
        self.pending.clear();
    }

    async fn publish(&mut self, m: &Message<'_>) -> Result<(), HandlerError> {
        let routing_key = super::fill(&self.routing_key, m.account, m.folder);
        if routing_key.len() > 255 || self.exchange.len() > 255 {
            return Err(HandlerError::permanent(format!(
                "amqp: the routing key {routing_key:?} is longer than AMQP's 255 bytes"
            )));
        }
        let (content_type, body) = super::encode(self.payload, m)?;
        self.connect().await?;
        let Some(live) = self.live.as_mut() else {
            return Err(HandlerError::transient("amqp: not connected", None));
        };
        let props = BasicProperties::default()
            .with_message_id(m.key)
            .with_persistence(true)
            .with_content_type(content_type)
            .finish();
        let args = BasicPublishArguments::new(&self.exchange, &routing_key)
            .mandatory(true)
            .finish();
        let tag = live.next_tag;
        match live.channel.basic_publish(props, body, args).await {
            Ok(()) => {
                live.next_tag += 1;
                self.pending.insert(tag, m.key.to_string());
                Ok(())
            }
            Err(e) => {
                // What this connection published unconfirmed is published again after the
                // back-off: the flush before it fails.
                self.live = None;
                Err(HandlerError::transient(format!("amqp: publish failed: {e}"), None))
            }
        }
    }

    async fn confirmed(&mut self) -> Result<(), HandlerError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(live) = self.live.as_mut() else {
            self.pending.clear();
            return Err(HandlerError::transient(
                "amqp: the connection was lost before the broker confirmed",
                None,
            ));
        };
        let mut returned: BTreeSet<String> = BTreeSet::new();
        let mut reason = String::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        while !self.pending.is_empty() {
            let event = tokio::time::timeout_at(deadline, live.confirms.recv()).await;
            match event {
                Ok(Some(Confirm::Ack { tag, multiple })) => {
                    if multiple {
                        self.pending.retain(|t, _| *t > tag);
                    } else {
                        self.pending.remove(&tag);
                    }
                }
                Ok(Some(Confirm::Nack)) => {
                    self.reset();
                    return Err(HandlerError::transient(
                        "amqp: the broker refused (nack) a message",
                        None,
                    ));
                }
                Ok(Some(Confirm::Returned { key, reason: why })) => {
                    returned.insert(key);
                    reason = why;
                }
                Ok(None) | Err(_) => {
                    self.reset();
                    return Err(HandlerError::transient(
                        format!("amqp: no confirm from the broker within {:?}", self.timeout),
                        None,
                    ));
                }
            }
        }
        if !returned.is_empty() {
            // No queue is bound for these: a configuration problem, not the messages'.
            return Err(HandlerError::unavailable(format!(
                "amqp: {} message(s) were unroutable and returned: {reason}",
                returned.len()
            )));
        }
        Ok(())
    }
}

/// Host, port and virtual host of `amqp://host[:port][/vhost]` (vhost percent-decoded; none or
/// empty is `/`).
fn endpoint(url: &str) -> Option<(String, u16, String, bool)> {
    let u = reqwest::Url::parse(url).ok()?;
    let tls = match u.scheme() {
        "amqp" => false,
        "amqps" => true,
        _ => return None,
    };
    let path = u.path().strip_prefix('/').unwrap_or("");
    let vhost = if path.is_empty() {
        "/".to_string()
    } else {
        percent_decode(path)?
    };
    let port = u.port().unwrap_or(if tls { 5671 } else { 5672 });
    Some((u.host_str()?.to_string(), port, vhost, tls))
}

/// Strict percent-decoding: a `%` not followed by two hex digits is an error (the
/// percent-encoding crate passes such a `%` through, which would name another vhost).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Handler for Amqp {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.publish(message))
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(self.confirmed())
    }

    /// Confirmed and committed per batch: AMQP cannot drop a repeat, so a crash repeats at
    /// most the batch in flight (`batch_size = 1` makes that one message, at one round trip and
    /// one commit per message).
    fn batches(&self) -> bool {
        true
    }

    fn probe<'a>(&'a mut self, _account: &'a str, _folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async move {
            self.connect().await.map_err(|e| HandlerError::unavailable(e.reason))?;
            Ok(format!("{} connected, publisher confirms on", self.url))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint("amqp://127.0.0.1"),
            Some(("127.0.0.1".into(), 5672, "/".into(), false))
        );
        assert_eq!(
            endpoint("amqp://mq:5673/%2f"),
            Some(("mq".into(), 5673, "/".into(), false))
        );
        assert_eq!(
            endpoint("amqp://mq/prod"),
            Some(("mq".into(), 5672, "prod".into(), false))
        );
        assert_eq!(endpoint("amqps://mq"), Some(("mq".into(), 5671, "/".into(), true)));
        assert_eq!(endpoint("http://mq"), None);
        assert_eq!(endpoint("amqp://mq/%zz"), None);
    }
}
