//! Obtaining access tokens: one function per grant, all ending in the same token response
//! parsing and error classification.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Grant, Thumbprint, Token, TokenError};
use crate::secret::Secret;
use crate::store::Store;

/// Google's token endpoint, the default audience of service-account assertions.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) async fn obtain(
    name: &str,
    grant: &Grant,
    http: &reqwest::Client,
    store: Option<&Arc<dyn Store>>,
) -> Result<Token, TokenError> {
    match grant {
        Grant::ClientSecret {
            token_url,
            client_id,
            secret,
            scopes,
        } => {
            let secret = secret.resolve().await?;
            let form = vec![
                ("grant_type", "client_credentials".to_string()),
                ("client_id", client_id.clone()),
                ("client_secret", secret.expose().to_string()),
                ("scope", scopes.join(" ")),
            ];
            post(http, token_url, form).await.map(|r| r.token)
        }
        Grant::ClientCertificate {
            token_url,
            client_id,
            certificate,
            private_key,
            thumbprint,
            scopes,
        } => {
            let assertion = client_assertion(
                token_url,
                client_id,
                certificate,
                &private_key.resolve().await?,
                *thumbprint,
            )?;
            let form = vec![
                ("grant_type", "client_credentials".to_string()),
                ("client_id", client_id.clone()),
                ("client_assertion_type", CLIENT_ASSERTION_TYPE.to_string()),
                ("client_assertion", assertion),
                ("scope", scopes.join(" ")),
            ];
            post(http, token_url, form).await.map(|r| r.token)
        }
        Grant::JwtBearer {
            token_url,
            key,
            subject,
            scopes,
        } => {
            let key = key.resolve().await?;
            let (url, assertion) = service_account_assertion(token_url.as_deref(), &key, subject, scopes)?;
            let form = vec![("grant_type", JWT_BEARER.to_string()), ("assertion", assertion)];
            post(http, &url, form).await.map(|r| r.token)
        }
        Grant::RefreshToken {
            token_url,
            client_id,
            secret,
            refresh_token,
            scopes,
        } => {
            let configured = refresh_token.resolve().await?;
            let origin = fingerprint(configured.expose());
            let slot = format!("oauth2-refresh-token:{name}");
            let mut current = configured.expose().to_string();
            // In memory, keyed by everything that makes it this credential's.
            let memory_key = format!("{slot}\0{token_url}\0{client_id}");
            if let Some(value) = rotated_in_memory(&memory_key, &origin) {
                // Rotated earlier in this process: the newest, even if persisting it failed.
                current = value;
            } else if let Some(store) = store
                && let Ok(Some((value, stored_origin))) = store.secret(&slot).await
                && stored_origin == origin
            {
                // A rotated token from an earlier run of the same configured token.
                current = value;
            }
            let mut form = vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", current.clone()),
                ("client_id", client_id.clone()),
            ];
            if let Some(secret) = secret {
                form.push(("client_secret", secret.resolve().await?.expose().to_string()));
            }
            if !scopes.is_empty() {
                form.push(("scope", scopes.join(" ")));
            }
            let reply = post(http, token_url, form).await?;
            if let Some(rotated) = reply.refresh_token.filter(|r| *r != current) {
                // Kept in memory first: with one-time refresh tokens, using the old one again
                // would revoke the whole family.
                remember_rotated(&memory_key, &origin, &rotated);
                match store {
                    Some(store) => {
                        if let Err(e) = store.put_secret(&slot, &rotated, &origin).await {
                            tracing::error!(credential = %name, error = %e, "cannot persist the rotated refresh token; the next restart may need a new one");
                        }
                    }
                    None => {
                        tracing::warn!(credential = %name, "refresh token rotated but no state store attached to keep it")
                    }
                }
            }
            Ok(reply.token)
        }
        Grant::Command { argv, cwd } => command(argv, cwd).await,
    }
}

/// SHA-256 of a configured refresh token: lets a rotated token be used only while the
/// configured one is unchanged, without storing the configured one.
fn fingerprint(value: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

/// A `private_key_jwt` client assertion (RFC 7523 §2.2) signed with the certificate's key.
pub fn client_assertion(
    token_url: &str,
    client_id: &str,
    certificate: &std::path::Path,
    private_key: &Secret,
    thumbprint: Thumbprint,
) -> Result<String, TokenError> {
    let cert = CertificateDer::from_pem_file(certificate)
        .map_err(|e| TokenError::Credential(format!("cannot read certificate {}: {e}", certificate.display())))?;
    let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
    let mut header = match thumbprint {
        Thumbprint::Sha256 => Header::new(Algorithm::PS256),
        Thumbprint::Sha1 => Header::new(Algorithm::RS256),
    };
    match thumbprint {
        Thumbprint::Sha256 => {
            header.x5t_s256 = Some(b64(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                cert.as_ref(),
            )
            .as_ref()))
        }
        Thumbprint::Sha1 => {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
            header.x5t = Some(b64(d.as_ref()))
        }
    }
    let key = EncodingKey::from_rsa_pem(private_key.expose().as_bytes())
        .map_err(|e| TokenError::Credential(format!("private key is not an RSA PEM key: {e}")))?;
    let now = now_secs();
    let claims = AssertionClaims {
        aud: token_url,
        iss: client_id,
        sub: client_id,
        jti: format!("{:032x}", fastrand::u128(..)),
        nbf: now,
        iat: now,
        exp: now + 600,
    };
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| TokenError::Credential(format!("cannot sign the client assertion: {e}")))
}

#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct ServiceAccountClaims<'a> {
    iss: &'a str,
    scope: String,
    aud: &'a str,
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// The JWT bearer assertion of a service account (Google domain-wide delegation): returns the
/// token URL to post it to, and the assertion.
pub fn service_account_assertion(
    token_url: Option<&str>,
    key_json: &Secret,
    subject: &str,
    scopes: &[String],
) -> Result<(String, String), TokenError> {
    let key: ServiceAccountKey = serde_json::from_str(key_json.expose())
        .map_err(|e| TokenError::Credential(format!("service account key is not the expected JSON: {e}")))?;
    let url = token_url
        .map(str::to_string)
        .or(key.token_uri.clone())
        .unwrap_or_else(|| GOOGLE_TOKEN_URL.to_string());
    let signing = EncodingKey::from_rsa_pem(key.private_key.as_bytes())
        .map_err(|e| TokenError::Credential(format!("service account private_key is not an RSA PEM key: {e}")))?;
    let now = now_secs();
    let claims = ServiceAccountClaims {
        iss: &key.client_email,
        scope: scopes.join(" "),
        aud: &url,
        sub: subject,
        iat: now,
        exp: now + 3600,
    };
    let jwt = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &signing)
        .map_err(|e| TokenError::Credential(format!("cannot sign the service account assertion: {e}")))?;
    Ok((url, jwt))
}

struct Reply {
    token: Token,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Deserialize, Default)]
struct ErrorResponse {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

async fn post(http: &reqwest::Client, url: &str, form: Vec<(&str, String)>) -> Result<Reply, TokenError> {
    let obtained = Instant::now();
    let resp = http
        .post(url)
        .form(&form)
        .send()
        .await
        .map_err(|e| TokenError::Network {
            url: url.to_string(),
            detail: e.without_url().to_string(),
        })?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = resp.bytes().await.map_err(|e| TokenError::Network {
        url: url.to_string(),
        detail: e.without_url().to_string(),
    })?;
    if status == 429 || status == 503 || status == 502 || status == 504 {
        return Err(TokenError::Unavailable {
            url: url.to_string(),
            status,
            retry_after,
        });
    }
    if !(200..300).contains(&status) {
        let e: ErrorResponse = serde_json::from_slice(&body).unwrap_or_default();
        let error = if e.error.is_empty() {
            format!("http_{status}")
        } else {
            e.error
        };
        return Err(TokenError::Refused {
            url: url.to_string(),
            status,
            error,
            description: e.error_description,
        });
    }
    let r: TokenResponse = serde_json::from_slice(&body).map_err(|e| TokenError::Refused {
        url: url.to_string(),
        status,
        error: "invalid_response".into(),
        description: format!("not a token response: {e}"),
    })?;
    let lifetime = r
        .expires_in
        .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
        .map_or(Duration::from_secs(3600), lifetime);
    Ok(Reply {
        token: Token {
            access: Secret::new(r.access_token),
            obtained,
            lifetime,
        },
        refresh_token: r.refresh_token,
    })
}

/// Rotated refresh tokens of this process, by store slot: (origin fingerprint, token).
fn rotated() -> &'static std::sync::Mutex<std::collections::HashMap<String, (String, Secret)>> {
    static ROTATED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, (String, Secret)>>> =
        std::sync::OnceLock::new();
    ROTATED.get_or_init(Default::default)
}

fn rotated_in_memory(slot: &str, origin: &str) -> Option<String> {
    let map = rotated().lock().ok()?;
    map.get(slot)
        .filter(|(o, _)| o == origin)
        .map(|(_, t)| t.expose().to_string())
}

fn remember_rotated(slot: &str, origin: &str, token: &str) {
    if let Ok(mut map) = rotated().lock() {
        map.insert(slot.to_string(), (origin.to_string(), Secret::new(token)));
    }
}

/// A token lifetime as the server (or command) states it, clamped to 5 s .. 24 h: a lifetime
/// of 0 would make a login loop, and an absurd one would overflow the clock arithmetic.
fn lifetime(seconds: u64) -> Duration {
    Duration::from_secs(seconds.clamp(5, 24 * 3600))
}

/// `token_command`: the first line of stdout is the token, an optional second line its
/// lifetime in seconds (default one hour).
async fn command(argv: &[String], cwd: &std::path::Path) -> Result<Token, TokenError> {
    let program = argv.first().cloned().unwrap_or_default();
    let obtained = Instant::now();
    let mut cmd = tokio::process::Command::new(&program);
    crate::process::confine_tool(&mut cmd);
    cmd.args(&argv[1.min(argv.len())..])
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| TokenError::Command(format!("{program} did not finish within 60 s")))?
        .map_err(|e| TokenError::Command(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(TokenError::Command(format!("{program} exited with {}", out.status)));
    }
    let text =
        String::from_utf8(out.stdout).map_err(|_| TokenError::Command(format!("{program} printed non-UTF-8")))?;
    let mut lines = text.lines();
    let token = lines
        .next()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::Command(format!("{program} printed no token")))?;
    let lifetime = lines
        .next()
        .and_then(|l| l.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(3600), lifetime);
    Ok(Token {
        access: Secret::new(token),
        obtained,
        lifetime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetimes_are_clamped_so_nothing_loops_or_overflows() {
        assert_eq!(lifetime(0), Duration::from_secs(5));
        assert_eq!(lifetime(u64::MAX), Duration::from_secs(24 * 3600));
        let token = Token {
            access: Secret::new("t"),
            obtained: Instant::now(),
            lifetime: Duration::from_secs(u64::MAX),
        };
        // Used to panic: "overflow when adding duration to instant".
        assert!(token.refresh_due(0.8) > Instant::now());
    }
}
