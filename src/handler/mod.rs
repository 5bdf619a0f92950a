//! Handlers: where a message goes. Each is named after its destination.
//!
//! - [`exec`]: runs a program with the raw message on stdin (a spooled message straight from
//!   its file); exit 0 acknowledges.
//! - [`maildir`]: writes the message into a Maildir, durably, at most once.
//!
//! Library users can implement [`Handler`] themselves.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod exec;
pub mod maildir;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
pub mod webhook;

use std::path::Path;

use futures::future::BoxFuture;

use crate::config::Deliver;

/// A message's raw bytes, exactly as on the server: in memory, or (for a message larger than
/// the watch's `spool_above`) in a file that the watcher spooled it into chunk by chunk, so that
/// a message of any size passes through with flat memory.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Body<'a> {
    Bytes(&'a [u8]),
    /// `len` bytes in the file at `path`. The file belongs to the watcher and lives until the
    /// delivery is over: read it, copy or hard-link it, never change or remove it.
    File {
        path: &'a Path,
        len: u64,
    },
}

impl<'a> Body<'a> {
    /// The message's size in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, when the message is held in memory.
    pub fn bytes(&self) -> Option<&'a [u8]> {
        match self {
            Body::Bytes(b) => Some(b),
            Body::File { .. } => None,
        }
    }

    /// The spool file, when the message was spooled.
    pub fn path(&self) -> Option<&'a Path> {
        match self {
            Body::Bytes(_) => None,
            Body::File { path, .. } => Some(path),
        }
    }

    /// A reader over the message, whichever way it is held (blocking reads for a file).
    pub fn reader(&self) -> std::io::Result<Box<dyn std::io::Read + Send + 'a>> {
        Ok(match self {
            Body::Bytes(b) => Box::new(*b),
            Body::File { path, .. } => Box::new(std::fs::File::open(path)?),
        })
    }

    /// The whole message in memory: a copy, or the file read whole. For handlers that need
    /// the bytes at once; a spooled message can be large, so prefer [`Body::reader`].
    pub fn to_vec(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Body::Bytes(b) => Ok(b.to_vec()),
            Body::File { path, .. } => std::fs::read(path),
        }
    }
}

/// One message handed to a handler.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub account: &'a str,
    pub folder: &'a str,
    pub uidvalidity: u32,
    pub uid: u32,
    /// The idempotency key: stable across restarts and re-deliveries.
    pub key: &'a str,
    pub message_id: Option<&'a str>,
    /// The server's INTERNALDATE (`17-Jul-1996 02:44:25 -0700`), when it was listed.
    pub internal_date: Option<&'a str>,
    /// The message's flags when it was listed.
    pub flags: &'a [String],
    /// Gmail's message and thread ids and labels, where the server offers them.
    pub gmail: Option<&'a crate::imap::Gmail>,
    /// The raw message, exactly as on the server.
    pub body: Body<'a>,
}

pub use inboxd_core::machine::HandlerFailure;

/// Why a handler did not acknowledge a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct HandlerError {
    pub reason: String,
    /// The tail of what the handler printed (stderr, then stdout), if anything.
    pub output: String,
    /// What follows: another attempt (counted), a wait for a busy target (not counted), a dead
    /// letter at once, or (the handler cannot work at all: its program is missing, its
    /// destination unusable) a failure of the watch, retried along the reconnect schedule and
    /// never counted against the message, which would dead-letter every message in turn.
    pub kind: HandlerFailure,
}

impl HandlerError {
    /// The handler failed on this message; it counts toward `max_attempts`.
    pub fn new(reason: impl Into<String>) -> HandlerError {
        HandlerError {
            reason: reason.into(),
            output: String::new(),
            kind: HandlerFailure::Attempt,
        }
    }

    /// The handler cannot work at all; see [`HandlerError::kind`].
    pub fn unavailable(reason: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: HandlerFailure::Unavailable,
            ..HandlerError::new(reason)
        }
    }

    /// The target is busy or unreachable for now: try again after the back-off (and at least
    /// `retry_after`), without counting an attempt.
    pub fn transient(reason: impl Into<String>, retry_after: Option<std::time::Duration>) -> HandlerError {
        HandlerError {
            kind: HandlerFailure::Transient { retry_after },
            ..HandlerError::new(reason)
        }
    }

    /// The target refused this message for good: dead-letter it now.
    pub fn permanent(reason: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: HandlerFailure::Permanent,
            ..HandlerError::new(reason)
        }
    }

    /// Whether the handler cannot work at all.
    pub fn is_unavailable(&self) -> bool {
        self.kind == HandlerFailure::Unavailable
    }

    /// Adds the tail of what the handler printed.
    pub fn with_output(mut self, output: impl Into<String>) -> HandlerError {
        self.output = output.into();
        self
    }

    /// The reason followed by the output tail, as stored in the delivery log.
    pub fn detail(&self) -> String {
        if self.output.is_empty() {
            self.reason.clone()
        } else {
            format!("{}; output: {}", self.reason, self.output)
        }
    }
}

/// A destination for messages.
///
/// `deliver` may return before the message is durable; the watcher calls `flush` before it
/// commits the checkpoint, and only a successful `flush` makes the deliveries before it count.
pub trait Handler: Send {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Makes every delivery since the last flush durable.
    fn flush(&mut self) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the checkpoint may be committed once per batch (true) or must be committed after
    /// every message (false; for handlers with side effects that cannot be repeated cheaply).
    fn batches(&self) -> bool {
        false
    }

    /// Whether [`Handler::flush_behind`] is offered: the watcher then makes one batch durable
    /// while it fetches and delivers the next.
    fn flushes_behind(&self) -> bool {
        false
    }

    /// Starts making every delivery since the last flush durable and returns that work, which
    /// owns the batch: deliveries made meanwhile belong to the next batch. The watcher awaits
    /// the work before it commits the batch, never starts a flush while one is in flight, and
    /// counts nothing of a batch whose work failed. `None` (the default) if not offered.
    fn flush_behind(&mut self) -> Option<BoxFuture<'static, Result<(), HandlerError>>> {
        None
    }

    /// Checks that the target can take messages for `account`/`folder`, without delivering
    /// anything (for `inboxd check`): what was checked, or why it cannot work.
    fn probe<'a>(&'a mut self, _account: &'a str, _folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async { Ok("nothing to check".to_string()) })
    }

    /// Where this handler wants large messages spooled; `None` means the watch's spool
    /// directory. A Maildir answers its own `tmp/`, so that delivering a spooled message is a
    /// hard link, not a copy.
    fn spool_dir(&self) -> Option<&Path> {
        None
    }
}

/// The TLS client configuration of a broker target: the platform's trust store plus the
/// target's `ca_file`, always verifying the server's name (the same verifier as the accounts').
#[cfg(any(feature = "amqp", feature = "mqtt"))]
pub(crate) fn tls_config(
    ca_file: Option<&Path>,
    what: &str,
) -> Result<std::sync::Arc<rustls::ClientConfig>, HandlerError> {
    let bad = |m: String| HandlerError::unavailable(format!("{what}: {m}"));
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let extra = match ca_file {
        Some(path) => crate::imap::connect::ca_certificates(path).map_err(bad)?,
        None => Vec::new(),
    };
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
        .map_err(|e| bad(format!("TLS: {e}")))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// A target name template (`inboxd.{account}.{folder}`) filled in for a message.
pub fn fill(template: &str, account: &str, folder: &str) -> String {
    template.replace("{account}", account).replace("{folder}", folder)
}

/// What a target sends for a message: the `inboxd.message.v1` JSON, or the raw bytes, with its
/// content type. A spooled message is read from its file (raw: whole; a broker message is
/// bounded by the broker anyway).
pub fn encode(payload: crate::config::Payload, m: &Message<'_>) -> Result<(&'static str, Vec<u8>), HandlerError> {
    let unreadable = |e: std::io::Error| HandlerError::new(format!("cannot read the spooled message: {e}"));
    Ok(match payload {
        crate::config::Payload::Json(options) => (
            "application/json",
            crate::envelope::Envelope::build(m, &options)
                .map_err(unreadable)?
                .to_json(),
        ),
        crate::config::Payload::Raw => ("message/rfc822", m.body.to_vec().map_err(unreadable)?),
    })
}

/// Builds the handler a watch's config asks for.
pub fn from_config(deliver: &Deliver) -> Result<Box<dyn Handler>, HandlerError> {
    Ok(match deliver {
        Deliver::Exec {
            argv,
            timeout,
            cwd,
            pass_env,
            stdin,
        } => {
            let exec = exec::Exec::new(argv.clone(), *timeout, cwd.clone())
                .pass_env(pass_env.clone())
                .stdin(*stdin);
            exec.check()?;
            Box::new(exec)
        }
        Deliver::Webhook {
            url,
            secret,
            payload,
            timeout,
            ca_file,
        } => Box::new(webhook::Webhook::new(
            url,
            secret.clone(),
            *payload,
            *timeout,
            ca_file.as_deref(),
        )?),
        #[cfg(feature = "mqtt")]
        Deliver::Mqtt {
            url,
            user,
            password,
            topic,
            payload,
            timeout,
            ca_file,
        } => Box::new(mqtt::Mqtt::new(
            url,
            user.clone(),
            password.clone(),
            topic,
            *payload,
            *timeout,
            ca_file.as_deref(),
        )?),
        #[cfg(not(feature = "mqtt"))]
        Deliver::Mqtt { .. } => {
            return Err(HandlerError::unavailable(
                "this inboxd was built without the `mqtt` feature",
            ));
        }
        #[cfg(feature = "amqp")]
        Deliver::Amqp {
            url,
            user,
            password,
            exchange,
            routing_key,
            payload,
            timeout,
            ca_file,
        } => Box::new(amqp::Amqp::new(
            url,
            user,
            password.clone(),
            exchange,
            routing_key,
            *payload,
            *timeout,
            ca_file.as_deref(),
        )?),
        #[cfg(not(feature = "amqp"))]
        Deliver::Amqp { .. } => {
            return Err(HandlerError::unavailable(
                "this inboxd was built without the `amqp` feature",
            ));
        }
        #[cfg(feature = "redis")]
        Deliver::Redis {
            url,
            stream,
            password,
            payload,
            dedupe_for,
            timeout,
        } => Box::new(redis::Redis::new(
            url,
            stream,
            password.clone(),
            *payload,
            *dedupe_for,
            *timeout,
        )),
        #[cfg(not(feature = "redis"))]
        Deliver::Redis { .. } => {
            return Err(HandlerError::unavailable(
                "this inboxd was built without the `redis` feature",
            ));
        }
        #[cfg(feature = "nats")]
        Deliver::Nats {
            servers,
            subject,
            payload,
            token,
            user,
            password,
            timeout,
            ca_file,
        } => Box::new(nats::Nats::new(
            servers,
            subject,
            *payload,
            nats::Auth {
                token: token.clone(),
                user: user.clone(),
                password: password.clone(),
            },
            *timeout,
            ca_file.clone(),
        )),
        #[cfg(not(feature = "nats"))]
        Deliver::Nats { .. } => {
            return Err(HandlerError::unavailable(
                "this inboxd was built without the `nats` feature",
            ));
        }
        Deliver::Maildir { path, mode } => Box::new(maildir::Maildir::open_with_mode(path, *mode)?),
    })
}
