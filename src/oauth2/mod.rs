//! OAuth2 for IMAP: token sources, the token cache, and the SASL mechanisms that carry tokens.
//!
//! - [`grant`]: obtaining an access token: client credentials with a secret or a certificate
//!   (`private_key_jwt`), the JWT bearer grant for Google service accounts, the refresh-token
//!   grant (rotated refresh tokens are persisted), or an external command.
//! - [`TokenSource`]: one cache per credential, shared by every watcher that uses it;
//!   single-flight refresh, refreshed ahead of expiry (80 % of the lifetime by default).

pub mod grant;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use inboxd_core::failure::FailureClass;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::secret::{Secret, SecretError, SecretSource};
use crate::store::Store;

/// How to obtain access tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Client credentials with a client secret (e.g. Microsoft 365 app-only).
    ClientSecret {
        token_url: String,
        client_id: String,
        secret: SecretSource,
        scopes: Vec<String>,
    },
    /// Client credentials with a `private_key_jwt` client assertion made from a certificate.
    ClientCertificate {
        token_url: String,
        client_id: String,
        certificate: std::path::PathBuf,
        private_key: SecretSource,
        thumbprint: Thumbprint,
        scopes: Vec<String>,
    },
    /// The JWT bearer grant (RFC 7523) with a service-account key (Google domain-wide delegation).
    JwtBearer {
        token_url: Option<String>,
        key: SecretSource,
        subject: String,
        scopes: Vec<String>,
    },
    /// The refresh-token grant; a rotated refresh token is persisted in the state store.
    RefreshToken {
        token_url: String,
        client_id: String,
        secret: Option<SecretSource>,
        refresh_token: SecretSource,
        scopes: Vec<String>,
    },
    /// An external program prints an access token (and optionally its lifetime in seconds on
    /// the next line). It runs in the config file's folder.
    Command { argv: Vec<String>, cwd: std::path::PathBuf },
}

/// Which certificate thumbprint the client assertion carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Thumbprint {
    /// `PS256` with an `x5t#S256` header (Microsoft's current documentation).
    #[default]
    Sha256,
    /// `RS256` with an `x5t` (SHA-1) header (older Microsoft documentation).
    Sha1,
}

/// An access token and when it was obtained.
#[derive(Clone, Debug)]
pub struct Token {
    pub access: Secret,
    pub obtained: Instant,
    pub lifetime: Duration,
}

impl Token {
    /// When the token should be replaced: `refresh_at` (0–1) of its lifetime.
    pub fn refresh_due(&self, refresh_at: f64) -> Instant {
        let wait = self
            .lifetime
            .min(Duration::from_secs(24 * 3600))
            .mul_f64(refresh_at.clamp(0.1, 1.0));
        self.obtained.checked_add(wait).unwrap_or(self.obtained)
    }
}

/// Why no token could be had. Never contains a secret or a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot reach the token endpoint {url}: {detail}")]
    Network { url: String, detail: String },
    #[error("token endpoint {url} answered {status}{}", retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default())]
    Unavailable {
        url: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint {url} refused: {error}{}", if description.is_empty() { String::new() } else { format!(": {description}") })]
    Refused {
        url: String,
        status: u16,
        error: String,
        description: String,
    },
    #[error("credential: {0}")]
    Credential(String),
    #[error("cannot read a secret")]
    Secret(#[from] SecretError),
    #[error("token command failed: {0}")]
    Command(String),
}

impl TokenError {
    /// What this failure means for reconnecting: refusals that retrying cannot fix park the
    /// account; the endpoint being down or throttling follows the schedule.
    pub fn class(&self) -> FailureClass {
        match self {
            TokenError::Network { .. } => FailureClass::Network,
            TokenError::Unavailable {
                status: 429,
                retry_after,
                ..
            } => FailureClass::Throttled(*retry_after),
            TokenError::Unavailable { .. } => FailureClass::Network,
            TokenError::Refused { error, .. }
                if matches!(
                    error.as_str(),
                    "invalid_client"
                        | "invalid_grant"
                        | "unauthorized_client"
                        | "invalid_scope"
                        | "unsupported_grant_type"
                ) =>
            {
                FailureClass::Permanent
            }
            TokenError::Refused { status, .. } if *status >= 500 => FailureClass::Network,
            TokenError::Refused { .. } => FailureClass::Permanent,
            TokenError::Credential(_) | TokenError::Secret(_) => FailureClass::Permanent,
            TokenError::Command(_) => FailureClass::Network,
        }
    }
}

/// One credential's token cache. Cloning shares the cache.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    /// Names the credential in the state store (rotated refresh tokens) and in logs.
    name: String,
    grant: Grant,
    refresh_at: f64,
    http: reqwest::Client,
    cache: Mutex<Option<Token>>,
    store: OnceLock<Arc<dyn Store>>,
    /// Tokens obtained, and attempts that failed (for metrics).
    obtained: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("name", &self.inner.name)
            .field("grant", &self.inner.grant)
            .finish()
    }
}

impl TokenSource {
    /// A token source for `grant`. Fails if no HTTP client can be built (no usable system
    /// certificates, for one). The client follows no redirects: a 307 would re-send the
    /// form, secrets included, to wherever it points.
    pub fn new(name: impl Into<String>, grant: Grant, refresh_at: f64) -> Result<TokenSource, TokenError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                TokenError::Credential(format!("cannot set up the HTTP client for the token endpoint: {e}"))
            })?;
        Ok(TokenSource {
            inner: Arc::new(Inner {
                name: name.into(),
                grant,
                refresh_at,
                http,
                cache: Mutex::new(None),
                store: OnceLock::new(),
                obtained: std::sync::atomic::AtomicU64::new(0),
                failed: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Whether two sources share one cache (the same credential).
    pub fn shares_cache_with(&self, other: &TokenSource) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The credential's name (for logs and the state store).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn grant(&self) -> &Grant {
        &self.inner.grant
    }

    /// Gives the source the state store, where rotated refresh tokens are kept.
    pub fn attach_store(&self, store: Arc<dyn Store>) {
        let _ = self.inner.store.set(store);
    }

    /// A token that is not due for refresh. Concurrent callers share one refresh.
    pub async fn token(&self) -> Result<Token, TokenError> {
        let mut cache = self.inner.cache.lock().await;
        if let Some(t) = cache.as_ref()
            && Instant::now() < t.refresh_due(self.inner.refresh_at)
        {
            return Ok(t.clone());
        }
        let obtained = grant::obtain(
            &self.inner.name,
            &self.inner.grant,
            &self.inner.http,
            self.inner.store.get(),
        )
        .await;
        let counter = if obtained.is_ok() {
            &self.inner.obtained
        } else {
            &self.inner.failed
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = obtained?;
        tracing::debug!(credential = %self.inner.name, lifetime = ?token.lifetime, "obtained access token");
        *cache = Some(token.clone());
        Ok(token)
    }

    /// Tokens obtained from the endpoint so far, and attempts that failed.
    pub fn refreshes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.inner.obtained.load(Relaxed), self.inner.failed.load(Relaxed))
    }

    /// Forgets the cached token (the server said it expired or refused it).
    pub async fn invalidate(&self) {
        *self.inner.cache.lock().await = None;
    }

    /// When the cached token is due for refresh.
    pub async fn refresh_due(&self) -> Option<Instant> {
        self.inner
            .cache
            .lock()
            .await
            .as_ref()
            .map(|t| t.refresh_due(self.inner.refresh_at))
    }

    pub fn refresh_at(&self) -> f64 {
        self.inner.refresh_at
    }
}

/// The claims of a JWT access token, decoded without verification, for diagnostics. Opaque
/// tokens give `None`.
pub fn claims(token: &Secret) -> Option<serde_json::Value> {
    let payload = token.expose().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_retrying_cannot_fix_are_permanent() {
        let refused = |error: &str| TokenError::Refused {
            url: "u".into(),
            status: 401,
            error: error.into(),
            description: String::new(),
        };
        assert_eq!(refused("invalid_client").class(), FailureClass::Permanent);
        assert_eq!(refused("invalid_grant").class(), FailureClass::Permanent);
        let throttled = TokenError::Unavailable {
            url: "u".into(),
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(throttled.class(), FailureClass::Throttled(Some(Duration::from_secs(7))));
        let down = TokenError::Unavailable {
            url: "u".into(),
            status: 503,
            retry_after: None,
        };
        assert_eq!(down.class(), FailureClass::Network);
    }

    #[test]
    fn claims_are_decoded_without_the_signature() {
        let t = Secret::new("eyJhbGciOiJub25lIn0.eyJhdWQiOiJpbWFwIiwicm9sZXMiOlsiSU1BUC5BY2Nlc3NBc0FwcCJdfQ.sig");
        let c = claims(&t).unwrap();
        assert_eq!(c["aud"], "imap");
        assert_eq!(c["roles"][0], "IMAP.AccessAsApp");
        assert!(claims(&Secret::new("opaque-token")).is_none());
    }
}
