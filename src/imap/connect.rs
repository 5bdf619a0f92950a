//! Opening a connection: TCP with keepalive, TLS (implicit or STARTTLS), greeting, login.
//! Every phase has its own deadline.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{ImapError, deadline};
use crate::config::{Account, TlsMode};

/// The byte stream under an IMAP session: plain (loopback only) or TLS.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match this {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        #[cfg(target_os = "linux")]
        if polled.is_pending() {
            // About to wait for the server: acknowledge what came so far now, not after the
            // delayed-ACK timer. A server that writes a response in pieces with Nagle's
            // algorithm on (Courier) holds each next piece until that ACK: 40 ms on Linux for
            // every FETCH. Setting TCP_QUICKACK sends a pending ACK at once; only here, as
            // acknowledging every read at once made each command on Cyrus 0.4 ms slower.
            let tcp = match this {
                Conn::Plain(s) => &*s,
                Conn::Tls(s) => s.get_ref().0,
            };
            let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Concurrent connection attempts (connect, TLS, login) allowed per host by default, so that
/// many watchers reconnecting after an outage do not storm the server.
pub const ATTEMPTS_PER_HOST: usize = 8;

/// A semaphore per key, made with the size its first user asks for (a changed limit takes
/// effect at the next start of the process).
fn semaphore(kind: &str, key: String, size: usize) -> Option<Arc<tokio::sync::Semaphore>> {
    type Map = std::collections::HashMap<(String, String), Arc<tokio::sync::Semaphore>>;
    static SEMAPHORES: std::sync::OnceLock<std::sync::Mutex<Map>> = std::sync::OnceLock::new();
    let mut map = SEMAPHORES.get_or_init(Default::default).lock().ok()?;
    Some(
        map.entry((kind.to_string(), key))
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(size.max(1))))
            .clone(),
    )
}

/// Waits for a connection-attempt slot for `host`.
pub(crate) async fn attempt_slot(host: &str, per_host: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
    semaphore("attempt", host.to_ascii_lowercase(), per_host)?
        .acquire_owned()
        .await
        .ok()
}

/// The connection slots a session holds while it lives.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    _host: Option<tokio::sync::OwnedSemaphorePermit>,
    _account: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Waits until this account may open one more session: at most `connections_per_host` to its
/// host, and `max_connections` of its user there, at once (each when set).
pub(crate) async fn connection_slots(account: &crate::config::Account) -> Slots {
    let host = account.host.to_ascii_lowercase();
    let mut slots = Slots::default();
    if let Some(n) = account.limits.connections_per_host
        && let Some(sem) = semaphore("host", host.clone(), n)
    {
        slots._host = sem.acquire_owned().await.ok();
    }
    if let Some(n) = account.limits.max_connections
        && let Some(sem) = semaphore("account", format!("{host}:{}:{}", account.port, account.user), n)
    {
        slots._account = sem.acquire_owned().await.ok();
    }
    slots
}

/// Login refusals that park a whole account: after the server refused a user's credentials
/// (`[AUTHENTICATIONFAILED]` and kin), no watch of that (host, user) sends them again until the
/// park time is over. Without this, each watch would try on its own, and five watches of one
/// mailbox would make five times the failures that trip a provider's lockout.
pub(crate) mod auth_gate {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use tokio::time::Instant;

    type Key = (String, u16, String);

    fn gates() -> &'static Mutex<HashMap<Key, (Instant, String)>> {
        static GATES: OnceLock<Mutex<HashMap<Key, (Instant, String)>>> = OnceLock::new();
        GATES.get_or_init(Default::default)
    }

    fn key(account: &crate::config::Account) -> Key {
        (account.host.to_ascii_lowercase(), account.port, account.user.clone())
    }

    /// The refusal still in force for this (host, user), if any.
    pub(crate) fn closed(account: &crate::config::Account) -> Option<String> {
        let mut map = gates().lock().ok()?;
        let k = key(account);
        match map.get(&k) {
            Some((until, text)) if *until > Instant::now() => Some(text.clone()),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    /// The server refused this (host, user): close the gate for `park_for`.
    pub(crate) fn close(account: &crate::config::Account, text: &str) {
        if let Ok(mut map) = gates().lock() {
            map.insert(key(account), (Instant::now() + account.park_for, text.to_string()));
        }
    }

    /// A login succeeded: whatever was refused before is not any more.
    pub(crate) fn open(account: &crate::config::Account) {
        if let Ok(mut map) = gates().lock() {
            map.remove(&key(account));
        }
    }
}

/// Opens the TCP connection with keepalive (`timeouts.keepalive`, then three probes
/// `max(1s, keepalive/2)` apart) and `TCP_USER_TIMEOUT` of the same total where the platform
/// has it, so a half-open connection is noticed even while the client is silent in IDLE.
pub(crate) async fn tcp(account: &Account) -> Result<TcpStream, ImapError> {
    let addr = format!("{}:{}", account.host, account.port);
    let t = account.timeouts.connect;
    let stream = deadline("connect", t, async {
        TcpStream::connect((account.host.trim_start_matches('[').trim_end_matches(']'), account.port))
            .await
            .map_err(|source| ImapError::Connect {
                addr: addr.clone(),
                source,
            })
    })
    .await?;
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(&stream);
    let idle = account.timeouts.keepalive;
    let interval = (idle / 2).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(idle + interval * 3));
    Ok(stream)
}

/// The end-entity certificate the server presented in the last handshake, kept so that a
/// failure can say which certificate to pin.
type Seen = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// Verifies as `inner` does and remembers the end-entity certificate presented.
#[derive(Debug)]
struct Recording<V> {
    inner: Arc<V>,
    seen: Seen,
}

impl<V: ServerCertVerifier> ServerCertVerifier for Recording<V> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(end_entity.to_vec());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts exactly the certificate whose SHA-256 the operator pinned (`tls_fingerprint`). The
/// operator vouched for this very certificate, so its names, dates and issuer are not checked;
/// the handshake signatures are.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if sha256(end_entity) == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the one pinned by tls_fingerprint".into(),
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `sha256:AB:CD:...`, the form `tls_fingerprint` takes.
pub fn fingerprint(der: &[u8]) -> String {
    let hex: Vec<String> = sha256(der).iter().map(|b| format!("{b:02X}")).collect();
    format!("sha256:{}", hex.join(":"))
}

/// The certificates of a `ca_file` (PEM), or why it cannot serve as one.
pub(crate) fn ca_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?
    {
        certs.push(cert.map_err(|e| format!("bad certificate in ca_file {}: {e}", path.display()))?);
    }
    if certs.is_empty() {
        return Err(format!("ca_file {} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The crypto provider, made once.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The platform's trust store plus a `ca_file`, loaded once and shared by every session that
/// uses it (a thousand sessions each holding their own copy of the system's roots cost about
/// 100 KiB each, measured in the many-watches benchmark). A `ca_file` that changed on disk
/// (another modification time or size) is loaded again.
fn platform_verifier(
    ca_file: Option<&std::path::Path>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls_platform_verifier::Verifier>, ImapError> {
    type Key = Option<(std::path::PathBuf, Option<std::time::SystemTime>, u64)>;
    static CACHE: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<Key, Arc<rustls_platform_verifier::Verifier>>>,
    > = std::sync::OnceLock::new();
    let key: Key = ca_file.map(|p| {
        let meta = std::fs::metadata(p).ok();
        (
            p.to_path_buf(),
            meta.as_ref().and_then(|m| m.modified().ok()),
            meta.map_or(0, |m| m.len()),
        )
    });
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(v);
    }
    let extra = match ca_file {
        Some(path) => ca_certificates(path).map_err(ImapError::TlsConfig)?,
        None => Vec::new(),
    };
    let verifier = Arc::new(
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(|e| ImapError::TlsConfig(e.to_string()))?,
    );
    if let Ok(mut c) = cache.lock() {
        // Versions of a file that changed are dropped with the entries of other paths' old
        // versions: the map holds only what was loaded last per path.
        if let Some(path) = ca_file {
            c.retain(|k, _| k.as_ref().is_none_or(|(p, _, _)| p != path));
        }
        c.insert(key, verifier.clone());
    }
    Ok(verifier)
}

/// Builds the TLS connector: the platform's trust store plus the account's `ca_file`, always
/// verifying the server's name; or, with `tls_fingerprint`, exactly the pinned certificate.
fn tls_connector(account: &Account, seen: Seen) -> Result<TlsConnector, ImapError> {
    let provider = crypto_provider();
    let verifier: Arc<dyn ServerCertVerifier> = match account.tls_fingerprint {
        Some(sha256) => Arc::new(Recording {
            inner: Arc::new(Pinned {
                sha256,
                provider: provider.clone(),
            }),
            seen,
        }),
        None => Arc::new(Recording {
            inner: platform_verifier(account.ca_file.as_deref(), &provider)?,
            seen,
        }),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ImapError::TlsConfig(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // No session resumption: sessions live for hours, a handshake is cheap next to that, and
    // each connection's own config would keep a cache (sized for 32 servers) and the server's
    // tickets that nothing ever reuses. A cache shared between accounts could let one with a
    // pinned certificate hand a resumable session to one that verifies against a CA.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A sentence for a TLS failure, and what to do about it.
fn tls_hint(host: &str, source: &io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(e) = source.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return source.to_string();
    };
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the certificate is signed by an authority this machine does not trust; give that authority's certificate as `ca_file`, or pin the server's certificate with `tls_fingerprint`".into()
        }
        rustls::Error::InvalidCertificate(C::NotValidForNameContext { presented, .. }) => format!(
            "the certificate is not valid for {host:?}; it names {}",
            if presented.is_empty() { "no host".to_string() } else { presented.join(", ") }
        ),
        rustls::Error::InvalidCertificate(C::NotValidForName) => {
            format!("the certificate is not valid for {host:?}")
        }
        rustls::Error::InvalidCertificate(C::ExpiredContext { not_after, .. }) => format!(
            "the certificate expired {} (Unix time {})",
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(not_after.as_secs())),
            not_after.as_secs()
        ),
        rustls::Error::InvalidCertificate(C::Expired) => "the certificate has expired".into(),
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the certificate is not valid yet (is this machine's clock right?)".into()
        }
        rustls::Error::InvalidCertificate(C::Other(other)) if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            "the server presents a CA certificate as its own (what `openssl req -x509` makes by default), which cannot be trusted through `ca_file`; pin it with `tls_fingerprint`, or give the server a certificate issued by a CA and that CA as `ca_file`".into()
        }
        rustls::Error::InvalidCertificate(C::BadSignature) => {
            "the certificate's signature does not verify (a self-signed certificate? pin it with `tls_fingerprint`)".into()
        }
        other => other.to_string(),
    }
}

pub(crate) async fn tls(account: &Account, tcp: TcpStream) -> Result<Conn, ImapError> {
    let seen: Seen = Arc::default();
    let connector = tls_connector(account, seen.clone())?;
    let host = account.host.trim_start_matches('[').trim_end_matches(']').to_string();
    let name = ServerName::try_from(host.clone())
        .map_err(|_| ImapError::TlsConfig(format!("{host:?} is not a valid server name")))?;
    let stream = deadline("TLS handshake", account.timeouts.tls, async {
        connector.connect(name, tcp).await.map_err(|source| {
            let hint = tls_hint(&host, &source);
            let presented = seen.lock().ok().and_then(|s| s.as_deref().map(fingerprint));
            ImapError::Tls {
                host,
                hint,
                fingerprint: presented,
            }
        })
    })
    .await?;
    // The presented certificate was kept for an error message; none is coming.
    if let Ok(mut s) = seen.lock() {
        *s = None;
    }
    Ok(Conn::Tls(Box::new(stream)))
}

/// Whether the account connects with TLS at once.
pub(crate) fn implicit(account: &Account) -> bool {
    account.tls == TlsMode::Implicit
}
