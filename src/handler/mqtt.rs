//! The `mqtt` target: publishes each message with QoS 1 over MQTT 5 (for the home-automation
//! side: Home Assistant, Node-RED and the like read a topic).
//!
//! The idempotency key travels as the user property `inboxd-key`; the payload is the
//! `inboxd.message.v1` JSON (or the raw message). The broker's PUBACK is the acknowledgement: a
//! batch is published without waiting and `flush` waits until every message of it was
//! acknowledged. A broker that is down, drops the connection or does not acknowledge in time
//! is a busy target: the client is made anew and the batch is published again after the
//! back-off (MQTT has no deduplication: subscribers may see the batch in flight twice; drop
//! repeats by `inboxd-key`, or set `batch_size = 1`). A PUBACK with a refusal (not authorized,
//! topic name invalid, quota exceeded) fails the watch with the broker's reason.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures::future::BoxFuture;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use super::{Handler, HandlerError, Message};
use crate::config::Payload;
use crate::secret::SecretSource;

/// What the event loop saw.
enum Note {
    /// A publish left with this packet id (in the order of the publish calls).
    Sent(u16),
    /// PUBACK for a packet id: `None` accepted, `Some(reason)` refused.
    Acked(u16, Option<String>),
    /// The connection failed.
    Down(String),
}

struct Live {
    client: AsyncClient,
    notes: mpsc::UnboundedReceiver<Note>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Mqtt {
    host: String,
    port: u16,
    /// For `mqtts://`.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    user: Option<String>,
    password: Option<SecretSource>,
    topic: String,
    payload: Payload,
    timeout: Duration,
    live: Option<Live>,
    /// Published, packet id not known yet.
    queued: VecDeque<String>,
    /// Sent, PUBACK awaited: packet id -> key.
    inflight: HashMap<u16, String>,
}

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("topic", &self.topic)
            .finish()
    }
}

impl Mqtt {
    pub fn new(
        url: &str,
        user: Option<String>,
        password: Option<SecretSource>,
        topic: &str,
        payload: Payload,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Mqtt, HandlerError> {
        let (host, port, tls) = endpoint(url).ok_or_else(|| {
            HandlerError::unavailable(format!("mqtt: {url} is not an mqtt:// or mqtts://host[:port] URL"))
        })?;
        let tls = if tls {
            Some(super::tls_config(ca_file, "mqtt")?)
        } else {
            None
        };
        Ok(Mqtt {
            host,
            port,
            tls,
            user,
            password,
            topic: topic.to_string(),
            payload,
            timeout,
            live: None,
            queued: VecDeque::new(),
            inflight: HashMap::new(),
        })
    }

    async fn connect(&mut self) -> Result<(), HandlerError> {
        if self.live.is_some() {
            return Ok(());
        }
        let id = format!("inboxd-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let mut options = MqttOptions::new(id, self.host.clone(), self.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_connection_timeout(self.timeout.as_secs().max(1));
        if let Some(config) = &self.tls {
            options.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                config.clone(),
            )));
        }
        if let Some(user) = &self.user {
            let password = match &self.password {
                Some(source) => source
                    .resolve()
                    .await
                    .map_err(|e| HandlerError::unavailable(format!("mqtt: cannot read the password: {e}")))?
                    .expose()
                    .to_string(),
                None => String::new(),
            };
            options.set_credentials(user.clone(), password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let (tx, notes) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let note = match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Note::Sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        use rumqttc::v5::mqttbytes::v5::PubAckReason;
                        let refused = match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                            other => Some(format!("{other:?}")),
                        };
                        Note::Acked(ack.pkid, refused)
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Note::Down(e.to_string()));
                        return;
                    }
                };
                if tx.send(note).is_err() {
                    return;
                }
            }
        });
        self.live = Some(Live { client, notes, task });
        Ok(())
    }

    /// Forgets the client; what was published on it is published again after the back-off.
    fn reset(&mut self) {
        if let Some(live) = self.live.take() {
            live.task.abort();
        }
        self.queued.clear();
        self.inflight.clear();
    }

    async fn publish(&mut self, m: &Message<'_>) -> Result<(), HandlerError> {
        let topic = super::fill(&self.topic, m.account, m.folder);
        let (content_type, body) = super::encode(self.payload, m)?;
        self.connect().await?;
        let Some(live) = self.live.as_ref() else {
            return Err(HandlerError::transient("mqtt: not connected", None));
        };
        let properties = PublishProperties {
            content_type: Some(content_type.to_string()),
            user_properties: vec![("inboxd-key".to_string(), m.key.to_string())],
            ..PublishProperties::default()
        };
        match live
            .client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body, properties)
            .await
        {
            Ok(()) => {
                self.queued.push_back(m.key.to_string());
                Ok(())
            }
            Err(e) => {
                self.live = None;
                Err(HandlerError::transient(format!("mqtt: publish failed: {e}"), None))
            }
        }
    }

    async fn acknowledged(&mut self) -> Result<(), HandlerError> {
        if self.queued.is_empty() && self.inflight.is_empty() {
            return Ok(());
        }
        let Some(live) = self.live.as_mut() else {
            self.reset();
            return Err(HandlerError::transient(
                "mqtt: the connection was lost before the broker acknowledged",
                None,
            ));
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut refused = None;
        while !(self.queued.is_empty() && self.inflight.is_empty()) {
            match tokio::time::timeout_at(deadline, live.notes.recv()).await {
                Ok(Some(Note::Sent(pkid))) => {
                    if let Some(key) = self.queued.pop_front() {
                        self.inflight.insert(pkid, key);
                    }
                }
                Ok(Some(Note::Acked(pkid, reason))) => {
                    self.inflight.remove(&pkid);
                    if let Some(r) = reason {
                        refused = Some(r);
                    }
                }
                Ok(Some(Note::Down(e))) => {
                    self.reset();
                    return Err(HandlerError::transient(format!("mqtt: {e}"), None));
                }
                Ok(None) | Err(_) => {
                    self.reset();
                    return Err(HandlerError::transient(
                        format!("mqtt: no acknowledgement from the broker within {:?}", self.timeout),
                        None,
                    ));
                }
            }
        }
        match refused {
            Some(reason) => Err(HandlerError::unavailable(format!(
                "mqtt: the broker refused a message: {reason}"
            ))),
            None => Ok(()),
        }
    }
}

/// Host, port and TLS of `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]`
/// (8883).
fn endpoint(url: &str) -> Option<(String, u16, bool)> {
    let u = reqwest::Url::parse(url).ok()?;
    let tls = match u.scheme() {
        "mqtt" => false,
        "mqtts" => true,
        _ => return None,
    };
    Some((
        u.host_str()?.to_string(),
        u.port().unwrap_or(if tls { 8883 } else { 1883 }),
        tls,
    ))
}

impl Handler for Mqtt {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.publish(message))
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(self.acknowledged())
    }

    fn batches(&self) -> bool {
        true
    }

    fn probe<'a>(&'a mut self, _account: &'a str, _folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async move {
            // A connection is made by the event loop's first poll: wait for it to answer.
            let stream = tokio::time::timeout(
                self.timeout,
                tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| HandlerError::unavailable(format!("mqtt: {}:{} did not answer", self.host, self.port)))?
            .map_err(|e| {
                HandlerError::unavailable(format!("mqtt: cannot connect to {}:{}: {e}", self.host, self.port))
            })?;
            if let Some(config) = &self.tls {
                // The handshake too, so that a certificate problem shows here.
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| HandlerError::unavailable(format!("mqtt: {}: {e}", self.host)))?;
                tokio::time::timeout(
                    self.timeout,
                    tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream),
                )
                .await
                .map_err(|_| HandlerError::unavailable(format!("mqtt: {}:{}: no TLS handshake", self.host, self.port)))?
                .map_err(|e| HandlerError::unavailable(format!("mqtt: TLS with {}:{}: {e}", self.host, self.port)))?;
                return Ok(format!(
                    "{}:{} accepts TLS connections (certificate verified)",
                    self.host, self.port
                ));
            }
            drop(stream);
            Ok(format!("{}:{} accepts connections", self.host, self.port))
        })
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            live.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("mqtt://127.0.0.1"), Some(("127.0.0.1".into(), 1883, false)));
        assert_eq!(endpoint("mqtt://broker:8883"), Some(("broker".into(), 8883, false)));
        assert_eq!(endpoint("mqtts://broker"), Some(("broker".into(), 8883, true)));
        assert_eq!(endpoint("http://broker"), None);
    }
}
