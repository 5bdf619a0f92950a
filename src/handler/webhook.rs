//! The `webhook` target: POSTs each message (as `inboxd.message.v1` JSON, or raw
//! `message/rfc822`) to a URL, signed per the Standard Webhooks convention.
//!
//! Headers: `webhook-id` (the idempotency key, the same on every re-delivery, so the receiver
//! can drop repeats), `webhook-timestamp` (Unix seconds) and, with a `secret`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`; any library of the
//! convention verifies it. A 2xx answer acknowledges. 429, 408 and 5xx answers, timeouts and
//! connection failures are a busy target: the same message again after the back-off, at least
//! the `Retry-After` the receiver asked for, without counting an attempt. 410 Gone dead-letters
//! the message at once; other answers (other 4xx, a redirect, which is never followed) count as
//! failed attempts. Connections are kept alive between messages. A spooled message is streamed
//! from its file (signed in a first pass over it), never read into memory whole.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::future::BoxFuture;

use super::{Body, Handler, HandlerError, Message};
use crate::config::Payload;
use crate::secret::{Secret, SecretSource};

/// How long a resolved secret is used before its source is read again (a rotated file or
/// variable is picked up without a restart).
const SECRET_TTL: Duration = Duration::from_secs(60);

/// Bytes of a refusing answer kept for the delivery log.
const ANSWER_TAIL: usize = 512;

pub struct Webhook {
    url: String,
    client: reqwest::Client,
    secret: Option<SecretSource>,
    key: Option<(Secret, std::time::Instant)>,
    payload: Payload,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

impl Webhook {
    pub fn new(
        url: &str,
        secret: Option<SecretSource>,
        payload: Payload,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Webhook, HandlerError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(15)))
            .tcp_keepalive(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("inboxd/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                HandlerError::unavailable(format!("webhook: cannot read ca_file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| HandlerError::unavailable(format!("webhook: ca_file {}: {e}", path.display())))?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| HandlerError::unavailable(format!("webhook: cannot build the HTTP client: {e}")))?;
        Ok(Webhook {
            url: url.to_string(),
            client,
            secret,
            key: None,
            payload,
        })
    }

    /// The signing key: the secret's bytes after `whsec_`, base64-decoded.
    async fn signing_key(&mut self) -> Result<Option<Vec<u8>>, HandlerError> {
        let Some(source) = &self.secret else { return Ok(None) };
        let fresh = self.key.as_ref().is_some_and(|(_, at)| at.elapsed() < SECRET_TTL);
        if !fresh {
            let secret = source
                .resolve()
                .await
                .map_err(|e| HandlerError::unavailable(format!("webhook: cannot read the signing secret: {e}")))?;
            self.key = Some((secret, std::time::Instant::now()));
        }
        let secret = self.key.as_ref().map(|(s, _)| s.expose()).unwrap_or_default();
        let text = secret.strip_prefix("whsec_").unwrap_or(secret);
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map(Some)
            .map_err(|_| HandlerError::unavailable("webhook: the signing secret is not \"whsec_\" followed by base64"))
    }

    async fn post(&mut self, m: &Message<'_>) -> Result<(), HandlerError> {
        let key = self.signing_key().await?;
        // The body: JSON in memory, raw bytes in memory, or a spooled file streamed.
        let (content_type, bytes, file) = match (self.payload, m.body) {
            (Payload::Raw, Body::File { path, .. }) => ("message/rfc822", None, Some(path.to_path_buf())),
            (payload, _) => {
                let (content_type, bytes) = super::encode(payload, m)?;
                (content_type, Some(bytes), None)
            }
        };
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", content_type)
            .header("webhook-id", m.key)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(key) = key {
            let signed = format!("{}.{timestamp}.", m.key);
            let hmac = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
            let mut ctx = aws_lc_rs::hmac::Context::with_key(&hmac);
            ctx.update(signed.as_bytes());
            match (&bytes, &file) {
                (Some(b), _) => ctx.update(b),
                (None, Some(path)) => {
                    let path = path.clone();
                    ctx = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                        use std::io::Read;
                        let mut f = std::fs::File::open(path)?;
                        let mut buf = vec![0u8; 1 << 17];
                        loop {
                            let n = f.read(&mut buf)?;
                            if n == 0 {
                                return Ok(ctx);
                            }
                            ctx.update(&buf[..n]);
                        }
                    })
                    .await
                    .map_err(|e| HandlerError::new(format!("signing task failed: {e}")))?
                    .map_err(|e| HandlerError::new(format!("cannot read the spooled message: {e}")))?;
                }
                (None, None) => {}
            }
            let signature = base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref());
            request = request.header("webhook-signature", format!("v1,{signature}"));
        }
        request = match (bytes, file) {
            (Some(b), _) => request.body(b),
            (None, Some(path)) => {
                let f = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| HandlerError::new(format!("cannot read the spooled message: {e}")))?;
                request
                    .header("content-length", m.body.len().to_string())
                    .body(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                        f,
                        1 << 17,
                    )))
            }
            (None, None) => request,
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                // Not reached, refused, timed out: the receiver's trouble, not the message's.
                return Err(HandlerError::transient(format!("webhook: {}", describe(&e)), None));
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let answer = answer_tail(response).await;
        let reason = format!("webhook answered {status}");
        let error = match status.as_u16() {
            408 | 429 | 500..=599 => HandlerError::transient(reason, retry_after),
            410 => HandlerError::permanent(reason),
            300..=399 => HandlerError::new(format!(
                "{reason}; redirects are not followed{}",
                location
                    .map(|l| format!(" (Location: {})", crate::imap::clip(l, 200)))
                    .unwrap_or_default()
            )),
            _ => HandlerError::new(reason),
        };
        Err(error.with_output(answer))
    }
}

/// A transport error in a sentence, without the URL's query (which may hold a token).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() {
        "the request body failed"
    } else {
        "request failed"
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        what.to_string()
    } else {
        format!("{what}: {}", crate::imap::clip(detail, 300))
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date, taken relative to `now`
/// (a date already past means at once). The core caps what it honours at an hour.
fn parse_retry_after(v: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The start of a refusing answer's body, for the delivery log (printable text only).
async fn answer_tail(response: reqwest::Response) -> String {
    let mut response = response;
    let mut kept = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        kept.extend_from_slice(&chunk[..chunk.len().min(ANSWER_TAIL - kept.len())]);
        if kept.len() >= ANSWER_TAIL {
            break;
        }
    }
    String::from_utf8_lossy(&kept)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

impl Handler for Webhook {
    fn deliver<'a>(&'a mut self, message: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.post(message))
    }

    fn probe<'a>(&'a mut self, _account: &'a str, _folder: &'a str) -> BoxFuture<'a, Result<String, HandlerError>> {
        Box::pin(async move {
            let signed = self.signing_key().await?.is_some();
            // A HEAD proves the name resolves, the connection opens and TLS verifies; its
            // status says little (many receivers answer 405 to HEAD), so it is only shown.
            let answer = self
                .client
                .head(&self.url)
                .send()
                .await
                .map_err(|e| HandlerError::unavailable(format!("webhook: {}", describe(&e))))?;
            Ok(format!(
                "{} reachable (HEAD answered {}), {}",
                self.url,
                answer.status(),
                if signed {
                    "signing secret ok"
                } else {
                    "requests are NOT signed (no secret)"
                }
            ))
        })
    }

    /// Acknowledged messages are committed once per batch: a receiver that deduplicates on
    /// `webhook-id` sees a message again only after a crash in the middle of a batch.
    fn batches(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:30:30 GMT", now),
            Some(Duration::from_secs(150))
        );
        // The obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-26 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
