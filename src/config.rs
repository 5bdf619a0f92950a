//! The TOML configuration, in two stages: raw serde structs close to the file, then validated
//! settings with defaults applied, paths resolved against the config file's folder and
//! references checked. Every error names the file, the line and the key.
//!
//! The doc comments on the raw fields are the reference; README.md repeats them for operators.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use inboxd_core::mailbox::{StartPolicy, UidValidityPolicy};
use inboxd_core::retry::RetryPolicy;
use inboxd_core::schedule::{Schedule, Stage};
use inboxd_core::wait::WaitPolicy;
use serde::Deserialize;
use toml::Spanned;

use crate::oauth2::{Grant, Thumbprint, TokenSource};
use crate::secret::SecretSource;

/// A config file that cannot be used. The message is `file:line:column: problem`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// A duration written as `"90s"`, `"10m"`, `"1h 30m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"30s\", \"10m\", \"1h\""
            ))
        })
    }
}

/// A size in bytes: an integer, or a string with a unit (`"150MB"`, `"200 MiB"`, `"1GiB"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Bytes(n)),
            Raw::Text(s) => parse_bytes(&s).map(Bytes).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {s:?}; write e.g. 52428800, \"50MB\" or \"200MiB\""
                ))
            }),
        }
    }
}

/// `sha256:AB:CD:...` (colons and case optional) as the 32 bytes it names.
fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text
        .trim()
        .strip_prefix("sha256:")?
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let factor: u64 = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// How the IMAP connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS from the first byte (port 993).
    #[default]
    Implicit,
    /// Plain connection upgraded with STARTTLS (port 143); refuses to go on without it.
    Starttls,
    /// No TLS at all; accepted only for loopback hosts.
    None,
}

/// Which authentication mechanism to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMechanism {
    /// Passwords: LOGIN, or AUTHENTICATE PLAIN when the server advertises LOGINDISABLED.
    /// OAuth2: OAUTHBEARER when advertised, else XOAUTH2 (Outlook offers only XOAUTH2).
    #[default]
    Auto,
    Login,
    Plain,
    Xoauth2,
    Oauthbearer,
}

/// How an account proves who it is.
#[derive(Clone, Debug)]
pub enum Auth {
    Password(SecretSource),
    OAuth2(TokenSource),
}

/// Well-known providers: their host, port, TLS, token endpoint and scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Exchange Online: outlook.office365.com:993, token URL from `tenant`,
    /// scope `https://outlook.office365.com/.default`.
    Microsoft365,
    /// Gmail: imap.gmail.com:993, Google's token URL, scope `https://mail.google.com/`.
    Gmail,
}

impl Provider {
    fn host(self) -> &'static str {
        match self {
            Provider::Microsoft365 => "outlook.office365.com",
            Provider::Gmail => "imap.gmail.com",
        }
    }
    fn scope(self) -> &'static str {
        match self {
            Provider::Microsoft365 => "https://outlook.office365.com/.default",
            Provider::Gmail => "https://mail.google.com/",
        }
    }
}

/// What happens on the server after a message was acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum After {
    #[default]
    None,
    /// Set `\Seen`.
    Seen,
    /// Set `\Deleted` and expunge the message.
    Delete,
    /// Move the message to another folder.
    Move(String),
    /// Set a keyword (or system flag) on the message.
    Flag(String),
}

impl<'de> Deserialize<'de> for After {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || {
            serde::de::Error::custom(format!(
                "invalid value {s:?}; expected \"none\", \"seen\", \"delete\", \"move:<Folder>\" or \"flag:<keyword>\""
            ))
        };
        match s.as_str() {
            "none" => Ok(After::None),
            "seen" => Ok(After::Seen),
            "delete" => Ok(After::Delete),
            _ => {
                if let Some(folder) = s
                    .strip_prefix("move:")
                    .filter(|f| !f.is_empty() && !f.contains(['\r', '\n', '\0']))
                {
                    Ok(After::Move(folder.to_string()))
                } else if let Some(kw) = s.strip_prefix("flag:") {
                    // An IMAP atom: no spaces, parentheses, quotes or wildcards (RFC 3501 §9).
                    let ok = !kw.is_empty() && kw.bytes().all(|b| b.is_ascii_graphic() && !b"(){%*\"]".contains(&b));
                    if ok {
                        Ok(After::Flag(kw.to_string()))
                    } else {
                        Err(bad())
                    }
                } else {
                    Err(bad())
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// SQLite file holding checkpoints and the delivery log. Default `inboxd.db`, relative to
    /// the config file's folder.
    state: Option<PathBuf>,
    /// Directory where messages above a watch's `spool_above` are written while fetched.
    /// Default: `<state>.spool` beside the state file (not /tmp, often a RAM disk).
    spool: Option<PathBuf>,
    #[serde(default)]
    accounts: BTreeMap<String, Spanned<RawAccount>>,
    #[serde(default)]
    watch: Vec<Spanned<RawWatch>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    /// A well-known provider whose defaults fill in host, port, TLS, token URL and scope.
    provider: Option<Provider>,
    host: Option<Spanned<String>>,
    /// Default 993 for implicit TLS, 143 otherwise.
    port: Option<u16>,
    tls: Option<TlsMode>,
    /// Extra trust root (PEM) on top of the platform's.
    ca_file: Option<PathBuf>,
    /// Pin the server's certificate instead: `"sha256:AB:CD:..."` (printed by `inboxd check`
    /// when the handshake fails).
    tls_fingerprint: Option<String>,
    user: String,
    password: Option<SecretSource>,
    oauth2: Option<Spanned<RawOAuth2>>,
    #[serde(default)]
    auth: AuthMechanism,
    idle_refresh: Option<Dur>,
    poll_interval: Option<Dur>,
    recycle_after: Option<Dur>,
    reconnect: Option<Spanned<Vec<RawStage>>>,
    /// A connection must stay up this long before the reconnect schedule starts over.
    stable_after: Option<Dur>,
    /// How long a watch with a permanent failure (e.g. missing folder) waits between tries.
    park_for: Option<Dur>,
    #[serde(default)]
    timeouts: RawTimeouts,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawGrant {
    ClientCredentials,
    RefreshToken,
    JwtBearer,
    Command,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawThumbprint {
    Sha256,
    Sha1,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth2 {
    grant: RawGrant,
    /// Token endpoint; presets derive it (Microsoft 365 from `tenant`).
    token_url: Option<String>,
    /// Microsoft 365 tenant (domain or id).
    tenant: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretSource>,
    /// PEM certificate for a `private_key_jwt` client assertion (with `private_key`).
    certificate: Option<PathBuf>,
    private_key: Option<SecretSource>,
    thumbprint: Option<RawThumbprint>,
    scopes: Option<Vec<String>>,
    refresh_token: Option<SecretSource>,
    /// Service-account key JSON (Google), from a secret source such as `{ file = "sa.json" }`.
    service_account_key: Option<SecretSource>,
    /// The mailbox user the service account acts for; default: the account's `user`.
    subject: Option<String>,
    command: Option<Vec<String>>,
    /// Refresh the token after this fraction of its lifetime (default 0.8).
    refresh_at: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    every: Dur,
    until: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<Dur>,
    tls: Option<Dur>,
    greeting: Option<Dur>,
    login: Option<Dur>,
    command: Option<Dur>,
    done: Option<Dur>,
    idle_silence: Option<Dur>,
    keepalive: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    account: Spanned<String>,
    #[serde(default = "inbox")]
    folder: String,
    #[serde(default)]
    start: RawStart,
    #[serde(default)]
    after: After,
    deliver: Spanned<RawDeliver>,
    #[serde(default)]
    on_uidvalidity_change: RawUidValidity,
    max_attempts: Option<u32>,
    retry_initial: Option<Dur>,
    retry_max: Option<Dur>,
    /// Messages per UID FETCH command.
    batch_size: Option<usize>,
    /// A message the server reports larger than this is dead-lettered without being fetched
    /// (default 200 MiB).
    max_message_size: Option<Bytes>,
    /// Messages larger than this are fetched in chunks into a spool file instead of memory
    /// (default 1 MiB).
    spool_above: Option<Bytes>,
}

fn inbox() -> String {
    "INBOX".into()
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawStart {
    #[default]
    New,
    All,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawUidValidity {
    #[default]
    Dedupe,
    Skip,
    Replay,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeliver {
    /// Program and arguments; no shell. Run in the config file's folder.
    exec: Option<Vec<String>>,
    maildir: Option<PathBuf>,
    /// Handler deadline (exec). Default 5 minutes.
    timeout: Option<Dur>,
    /// Maildir file mode, octal (default "0600"); directories get matching search bits.
    mode: Option<String>,
    /// Names of further environment variables the exec handler may see (beyond `PATH`,
    /// `HOME`, `LANG`, `LC_*`, `TZ`, `USER`, `TMPDIR` and the `INBOXD_*` it is given).
    pass_env: Option<Vec<String>>,
}

/// Deadlines on every network phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub tls: Duration,
    pub greeting: Duration,
    pub login: Duration,
    pub command: Duration,
    pub done: Duration,
    /// No byte from the server in IDLE for this long: leave IDLE and probe with NOOP.
    pub idle_silence: Duration,
    /// TCP keepalive idle time; probes follow every `max(1s, keepalive/2)`, three of them, and
    /// `TCP_USER_TIMEOUT` is set to the same total, so a half-open connection is noticed by the
    /// kernel even while inboxd is silent in IDLE.
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            connect: s(15),
            tls: s(15),
            greeting: s(15),
            login: s(30),
            command: s(60),
            done: s(15),
            idle_silence: s(300),
            keepalive: s(60),
        }
    }
}

/// A validated account.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the one server certificate to accept (`tls_fingerprint`), instead of
    /// verifying it against trust roots.
    pub tls_fingerprint: Option<[u8; 32]>,
    pub user: String,
    pub auth: Auth,
    /// The provider preset, if any (used for diagnostics).
    pub provider: Option<Provider>,
    pub mechanism: AuthMechanism,
    pub wait: WaitPolicy,
    pub schedule: Schedule,
    pub stable_after: Duration,
    pub park_for: Duration,
    pub timeouts: Timeouts,
}

impl Account {
    /// A minimal account for library users; everything else takes its default.
    pub fn new(
        name: impl Into<String>,
        host: impl Into<String>,
        port: u16,
        tls: TlsMode,
        user: impl Into<String>,
        password: SecretSource,
    ) -> Account {
        Account {
            name: name.into(),
            host: host.into(),
            port,
            tls,
            ca_file: None,
            tls_fingerprint: None,
            user: user.into(),
            auth: Auth::Password(password),
            provider: None,
            mechanism: AuthMechanism::Auto,
            wait: WaitPolicy::default(),
            schedule: Schedule::default(),
            stable_after: Duration::from_secs(300),
            park_for: Duration::from_secs(3600),
            timeouts: Timeouts::default(),
        }
    }
}

/// Where messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deliver {
    Exec {
        argv: Vec<String>,
        timeout: Duration,
        cwd: PathBuf,
        /// Variables passed through from inboxd's environment beyond the default allowlist.
        pass_env: Vec<String>,
    },
    Maildir {
        path: PathBuf,
        /// Mode of message files (directories get matching search bits).
        mode: u32,
    },
}

/// A validated watch of one (account, folder).
#[derive(Debug, Clone)]
pub struct Watch {
    pub account: Arc<Account>,
    pub folder: String,
    pub start: StartPolicy,
    pub after: After,
    pub deliver: Deliver,
    pub on_uidvalidity_change: UidValidityPolicy,
    pub retry: RetryPolicy,
    pub batch_size: usize,
    /// A message the server reports larger than this is dead-lettered without being fetched.
    pub max_message_size: u64,
    /// A message larger than this is fetched in chunks into a file in `spool_dir`.
    pub spool_above: u64,
    /// Where large messages are spooled (a Maildir handler uses its own `tmp/` instead).
    pub spool_dir: PathBuf,
}

/// Default `max_message_size`: above every mainstream provider's limit (Exchange Online
/// allows 150 MB; Gmail 25 MB).
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 200 << 20;

/// Largest `max_message_size` accepted: IMAP sizes are 32-bit (RFC 3501 `number`).
pub const MAX_MESSAGE_SIZE_LIMIT: u64 = u32::MAX as u64;

/// Default `spool_above`: most mail stays in memory, attachments go to disk.
pub const DEFAULT_SPOOL_ABOVE: u64 = 1 << 20;

/// The accepted range of `spool_above`.
pub const SPOOL_ABOVE_RANGE: std::ops::RangeInclusive<u64> = (64 << 10)..=(64 << 20);

impl Watch {
    /// `account/folder`, as used in logs and `status`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.account.name, self.folder)
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub state: PathBuf,
    pub accounts: BTreeMap<String, Arc<Account>>,
    pub watches: Vec<Watch>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` is used for messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = span.map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| invalid(e.span(), e.message().to_string()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());

        let mut accounts = BTreeMap::new();
        // One token cache per credential, shared by every account that uses the same one.
        // One token cache per credential, found by structural equality of the grant (which
        // compares literal secrets by value): two accounts share a cache only when they would
        // ask the token endpoint the very same question.
        let mut token_sources: Vec<(crate::oauth2::Grant, TokenSource)> = Vec::new();
        for (name, spanned) in raw.accounts {
            let span = spanned.span();
            let a = spanned.into_inner();
            let preset = a.provider;
            let tls = a.tls.unwrap_or(if preset.is_some() {
                TlsMode::Implicit
            } else {
                TlsMode::default()
            });
            let (host, host_span) = match (&a.host, preset) {
                (Some(h), _) => (h.get_ref().clone(), h.span()),
                (None, Some(p)) => (p.host().to_string(), span.clone()),
                (None, None) => {
                    return Err(invalid(
                        Some(span),
                        format!("accounts.{name}: missing field `host` (or a `provider`)"),
                    ));
                }
            };
            if tls == TlsMode::None && !is_loopback(&host) {
                return Err(invalid(
                    Some(host_span),
                    format!("accounts.{name}.tls: \"none\" is only allowed for loopback hosts, not {host:?}"),
                ));
            }
            let auth = match (a.password, a.oauth2) {
                (Some(p), None) => Auth::Password(p.relative_to(&base)),
                (None, Some(o)) => {
                    let osp = o.span();
                    let grant = oauth2_grant(o.into_inner(), preset, &a.user, &base)
                        .map_err(|m| invalid(Some(osp.clone()), format!("accounts.{name}.oauth2: {m}")))?;
                    let refresh_at = grant.1;
                    let source = match token_sources.iter().find(|(g, _)| *g == grant.0) {
                        Some((_, source)) => source.clone(),
                        None => {
                            let source = TokenSource::new(name.clone(), grant.0.clone(), refresh_at)
                                .map_err(|e| invalid(Some(osp.clone()), format!("accounts.{name}.oauth2: {e}")))?;
                            token_sources.push((grant.0, source.clone()));
                            source
                        }
                    };
                    Auth::OAuth2(source)
                }
                _ => {
                    return Err(invalid(
                        Some(span),
                        format!("accounts.{name}: give exactly one of `password` or `oauth2`"),
                    ));
                }
            };
            let oauth = matches!(auth, Auth::OAuth2(_));
            let fits = match a.auth {
                AuthMechanism::Auto => true,
                AuthMechanism::Login | AuthMechanism::Plain => !oauth,
                AuthMechanism::Xoauth2 | AuthMechanism::Oauthbearer => oauth,
            };
            if !fits {
                return Err(invalid(
                    Some(span),
                    format!(
                        "accounts.{name}.auth: {:?} does not fit this account's credentials",
                        a.auth
                    ),
                ));
            }
            let schedule = match a.reconnect {
                None => Schedule::default(),
                Some(stages) => {
                    let sp = stages.span();
                    let stages = stages
                        .into_inner()
                        .into_iter()
                        .map(|s| Stage {
                            every: s.every.0,
                            until: s.until.map(|d| d.0),
                        })
                        .collect();
                    Schedule::new(stages).map_err(|e| invalid(Some(sp), format!("accounts.{name}.reconnect: {e}")))?
                }
            };
            let d = Timeouts::default();
            let t = a.timeouts;
            let timeouts = Timeouts {
                connect: t.connect.map_or(d.connect, |x| x.0),
                tls: t.tls.map_or(d.tls, |x| x.0),
                greeting: t.greeting.map_or(d.greeting, |x| x.0),
                login: t.login.map_or(d.login, |x| x.0),
                command: t.command.map_or(d.command, |x| x.0),
                done: t.done.map_or(d.done, |x| x.0),
                idle_silence: t.idle_silence.map_or(d.idle_silence, |x| x.0),
                keepalive: t.keepalive.map_or(d.keepalive, |x| x.0).max(Duration::from_secs(1)),
            };
            for (key, value) in [
                ("connect", timeouts.connect),
                ("tls", timeouts.tls),
                ("greeting", timeouts.greeting),
                ("login", timeouts.login),
                ("command", timeouts.command),
                ("done", timeouts.done),
                ("idle_silence", timeouts.idle_silence),
            ] {
                if value.is_zero() {
                    return Err(invalid(
                        Some(span.clone()),
                        format!("accounts.{name}.timeouts.{key} must be more than 0s"),
                    ));
                }
            }
            if a.port == Some(0) {
                return Err(invalid(
                    Some(span.clone()),
                    format!("accounts.{name}.port must be between 1 and 65535"),
                ));
            }
            let w = WaitPolicy::default();
            let wait = WaitPolicy {
                idle_refresh: a.idle_refresh.map_or(w.idle_refresh, |x| x.0),
                poll_interval: a.poll_interval.map_or(w.poll_interval, |x| x.0),
                recycle_after: a.recycle_after.map_or(w.recycle_after, |x| x.0),
            };
            for (key, value) in [
                ("idle_refresh", wait.idle_refresh),
                ("poll_interval", wait.poll_interval),
                ("recycle_after", wait.recycle_after),
            ] {
                if value.is_zero() {
                    return Err(invalid(
                        Some(span.clone()),
                        format!("accounts.{name}.{key} must be more than 0s"),
                    ));
                }
            }
            if a.tls_fingerprint.is_some() && a.ca_file.is_some() {
                return Err(invalid(
                    Some(span.clone()),
                    format!("accounts.{name}: give `ca_file` or `tls_fingerprint`, not both"),
                ));
            }
            let tls_fingerprint = match &a.tls_fingerprint {
                None => None,
                Some(text) => Some(parse_fingerprint(text).ok_or_else(|| {
                    invalid(
                        Some(span.clone()),
                        format!(
                            "accounts.{name}.tls_fingerprint: {text:?} is not \"sha256:\" followed by 64 hex digits"
                        ),
                    )
                })?),
            };
            let account = Account {
                name: name.clone(),
                port: a.port.unwrap_or(if tls == TlsMode::Implicit { 993 } else { 143 }),
                host,
                tls,
                ca_file: a.ca_file.map(|p| base.join(p)),
                tls_fingerprint,
                user: a.user,
                auth,
                provider: preset,
                mechanism: a.auth,
                wait,
                schedule,
                stable_after: a.stable_after.map_or(Duration::from_secs(300), |x| x.0),
                park_for: a.park_for.map_or(Duration::from_secs(3600), |x| x.0),
                timeouts,
            };
            accounts.insert(name, Arc::new(account));
        }

        let state = base.join(raw.state.unwrap_or_else(|| PathBuf::from("inboxd.db")));
        let spool_dir = match raw.spool {
            Some(dir) => base.join(dir),
            None => {
                let mut name = state.as_os_str().to_os_string();
                name.push(".spool");
                PathBuf::from(name)
            }
        };
        let mut watches: Vec<Watch> = Vec::new();
        for spanned in raw.watch {
            let span = spanned.span();
            let w = spanned.into_inner();
            if w.folder.is_empty() || w.folder.contains(['\r', '\n', '\0']) {
                return Err(invalid(
                    Some(span),
                    format!("watch.folder: {:?} is not a folder name", w.folder),
                ));
            }
            let account = accounts.get(w.account.get_ref()).cloned().ok_or_else(|| {
                invalid(
                    Some(w.account.span()),
                    format!(
                        "watch.account: no account named {:?} in [accounts]",
                        w.account.get_ref()
                    ),
                )
            })?;
            let dspan = w.deliver.span();
            let d = w.deliver.into_inner();
            if d.maildir.is_some() && (d.pass_env.is_some() || d.timeout.is_some()) {
                return Err(invalid(
                    Some(dspan),
                    "watch.deliver: `timeout` and `pass_env` apply to `exec` only".into(),
                ));
            }
            if d.exec.is_some() && d.mode.is_some() {
                return Err(invalid(
                    Some(dspan),
                    "watch.deliver: `mode` applies to `maildir` only".into(),
                ));
            }
            let mode = match &d.mode {
                None => crate::handler::maildir::DEFAULT_MODE,
                Some(text) => match u32::from_str_radix(text, 8) {
                    Ok(m) if m <= 0o777 && m & 0o600 == 0o600 => m,
                    _ => {
                        return Err(invalid(
                            Some(dspan),
                            format!(
                                "watch.deliver.mode: {text:?} is not an octal file mode that lets inboxd read and write (e.g. \"0600\" or \"0640\")"
                            ),
                        ));
                    }
                },
            };
            let deliver = match (d.exec, d.maildir) {
                (Some(argv), None) if !argv.is_empty() => Deliver::Exec {
                    argv,
                    timeout: d.timeout.map_or(Duration::from_secs(300), |x| x.0),
                    cwd: base.clone(),
                    pass_env: d.pass_env.unwrap_or_default(),
                },
                (None, Some(path)) => Deliver::Maildir {
                    path: base.join(path),
                    mode,
                },
                _ => {
                    return Err(invalid(
                        Some(dspan),
                        "watch.deliver: give exactly one of `exec = [\"program\", ..]` or `maildir = \"path\"`".into(),
                    ));
                }
            };
            let r = RetryPolicy::default();
            let retry = RetryPolicy {
                initial: w.retry_initial.map_or(r.initial, |x| x.0),
                max: w.retry_max.map_or(r.max, |x| x.0),
                max_attempts: w.max_attempts.unwrap_or(r.max_attempts),
            };
            let problem = if retry.max_attempts == 0 {
                Some("watch.max_attempts must be at least 1".to_string())
            } else if retry.initial.is_zero() {
                Some("watch.retry_initial must be more than 0s".to_string())
            } else if retry.max < retry.initial {
                Some(format!(
                    "watch.retry_max ({:?}) is below retry_initial ({:?})",
                    retry.max, retry.initial
                ))
            } else if w.batch_size.is_some_and(|b| !(1..=10_000).contains(&b)) {
                Some("watch.batch_size must be between 1 and 10000".to_string())
            } else if matches!(deliver, Deliver::Exec { timeout, .. } if timeout.is_zero()) {
                Some("watch.deliver.timeout must be more than 0s".to_string())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(invalid(Some(span), problem));
            }
            let max_message_size = match w.max_message_size {
                None => DEFAULT_MAX_MESSAGE_SIZE,
                Some(size) if (1..=MAX_MESSAGE_SIZE_LIMIT).contains(&size.0) => size.0,
                Some(_) => {
                    return Err(invalid(
                        Some(span),
                        format!("watch.max_message_size must be between 1 and {MAX_MESSAGE_SIZE_LIMIT} bytes (4 GiB)"),
                    ));
                }
            };
            let spool_above = match w.spool_above {
                None => DEFAULT_SPOOL_ABOVE,
                Some(size) if SPOOL_ABOVE_RANGE.contains(&size.0) => size.0,
                Some(_) => {
                    return Err(invalid(
                        Some(span),
                        "watch.spool_above must be between 64 KiB and 64 MiB".to_string(),
                    ));
                }
            };
            let watch = Watch {
                account,
                folder: w.folder,
                start: match w.start {
                    RawStart::New => StartPolicy::New,
                    RawStart::All => StartPolicy::All,
                },
                after: w.after,
                deliver,
                on_uidvalidity_change: match w.on_uidvalidity_change {
                    RawUidValidity::Dedupe => UidValidityPolicy::Dedupe,
                    RawUidValidity::Skip => UidValidityPolicy::Skip,
                    RawUidValidity::Replay => UidValidityPolicy::Replay,
                },
                retry,
                batch_size: w.batch_size.unwrap_or(200),
                max_message_size,
                spool_above,
                spool_dir: spool_dir.clone(),
            };
            if watches
                .iter()
                .any(|o| o.account.name == watch.account.name && o.folder == watch.folder)
            {
                return Err(invalid(Some(span), format!("watch: {} is watched twice", watch.name())));
            }
            watches.push(watch);
        }
        Ok(Config {
            path: path.to_path_buf(),
            state,
            accounts,
            watches,
        })
    }
}

/// Builds the grant from the `oauth2` table, filling in the provider's defaults.
fn oauth2_grant(o: RawOAuth2, preset: Option<Provider>, user: &str, base: &Path) -> Result<(Grant, f64), String> {
    let scopes = o
        .scopes
        .clone()
        .unwrap_or_else(|| preset.map(|p| vec![p.scope().to_string()]).unwrap_or_default());
    let token_url = match (&o.token_url, preset, &o.tenant) {
        (Some(u), _, _) => Some(u.clone()),
        (None, Some(Provider::Microsoft365), Some(t)) => {
            Some(format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token"))
        }
        (None, Some(Provider::Gmail), _) => Some(crate::oauth2::grant::GOOGLE_TOKEN_URL.to_string()),
        _ => None,
    };
    if let Some(url) = &token_url {
        // The token endpoint gets client secrets and refresh tokens: TLS, as for IMAP, unless
        // it is on this machine.
        let host = url
            .strip_prefix("http://")
            .map(|rest| rest.split(['/', '?']).next().unwrap_or(""))
            .map(|authority| match authority.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
                _ => authority,
            });
        match host {
            Some(h) if !is_loopback(h) => {
                return Err(format!(
                    "`token_url` {url:?} is plain http to a host that is not loopback; use https"
                ));
            }
            None if !url.starts_with("https://") => {
                return Err(format!("`token_url` {url:?} is not an https:// URL"));
            }
            _ => {}
        }
    }
    let need_url = || {
        token_url
            .clone()
            .ok_or_else(|| "needs `token_url` (or `provider = \"microsoft365\"` with `tenant`)".to_string())
    };
    let need_id = || o.client_id.clone().ok_or_else(|| "needs `client_id`".to_string());
    let refresh_at = o.refresh_at.unwrap_or(0.8);
    if !(0.1..=1.0).contains(&refresh_at) {
        return Err("`refresh_at` must be between 0.1 and 1.0".into());
    }
    let grant = match o.grant {
        RawGrant::ClientCredentials => match (o.client_secret, o.certificate, o.private_key) {
            (Some(secret), None, None) => Grant::ClientSecret {
                token_url: need_url()?,
                client_id: need_id()?,
                secret: secret.relative_to(base),
                scopes,
            },
            (None, Some(certificate), Some(private_key)) => Grant::ClientCertificate {
                token_url: need_url()?,
                client_id: need_id()?,
                certificate: base.join(certificate),
                private_key: private_key.relative_to(base),
                thumbprint: match o.thumbprint {
                    Some(RawThumbprint::Sha1) => Thumbprint::Sha1,
                    _ => Thumbprint::Sha256,
                },
                scopes,
            },
            _ => return Err("client_credentials needs `client_secret`, or `certificate` and `private_key`".into()),
        },
        RawGrant::RefreshToken => Grant::RefreshToken {
            token_url: need_url()?,
            client_id: need_id()?,
            secret: o.client_secret.map(|s| s.relative_to(base)),
            refresh_token: o
                .refresh_token
                .ok_or("refresh_token grant needs `refresh_token`")?
                .relative_to(base),
            scopes,
        },
        RawGrant::JwtBearer => Grant::JwtBearer {
            token_url,
            key: o
                .service_account_key
                .ok_or("jwt_bearer grant needs `service_account_key`")?
                .relative_to(base),
            subject: o.subject.unwrap_or_else(|| user.to_string()),
            scopes,
        },
        RawGrant::Command => {
            let argv = o
                .command
                .filter(|c| !c.is_empty())
                .ok_or("command grant needs `command = [\"program\", ..]`")?;
            Grant::Command {
                argv,
                cwd: base.to_path_buf(),
            }
        }
    };
    Ok((grant, refresh_at))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Whether `host` is a loopback name or address.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
state = "inboxd.db"

[accounts.demo]
host = "127.0.0.1"
port = 10143
tls = "starttls"
ca_file = "tls/cert.pem"
user = "alice"
password = { env = "DEMO_PASSWORD" }
idle_refresh = "10m"
poll_interval = "60s"
recycle_after = "1h"
reconnect = [ { every = "0s", until = "0s" }, { every = "1m", until = "10m" },
              { every = "10m", until = "1h" }, { every = "1h" } ]

[[watch]]
account = "demo"
folder = "INBOX"
start = "all"
after = "seen"
deliver = { exec = ["./handler.sh", "--flag"] }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/inboxd/inboxd.toml"), text)
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(GOOD).unwrap();
        let a = &c.accounts["demo"];
        assert_eq!((a.port, a.tls), (10143, TlsMode::Starttls));
        assert_eq!(a.ca_file.as_deref(), Some(Path::new("/etc/inboxd/tls/cert.pem")));
        assert_eq!(a.schedule, Schedule::default());
        assert_eq!(c.state, Path::new("/etc/inboxd/inboxd.db"));
        let w = &c.watches[0];
        assert_eq!((w.start, &w.after), (StartPolicy::All, &After::Seen));
        assert!(matches!(&w.deliver, Deliver::Exec { argv, .. } if argv[0] == "./handler.sh"));
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err(&GOOD.replace("user = \"alice\"", "usr = \"alice\""));
        assert!(e.starts_with("/etc/inboxd/inboxd.toml:9:"), "{e}");
        assert!(e.contains("usr"), "{e}");
    }

    #[test]
    fn wrong_type_and_missing_key_are_located() {
        let e = err(&GOOD.replace("port = 10143", "port = \"x\""));
        assert!(e.starts_with("/etc/inboxd/inboxd.toml:6:"), "{e}");
        let e = err(&GOOD.replace("user = \"alice\"\n", ""));
        assert!(e.contains("missing field `user`"), "{e}");
        assert!(e.starts_with("/etc/inboxd/inboxd.toml:4:"), "{e}");
    }

    #[test]
    fn semantic_errors_are_located() {
        let e = err(&GOOD.replace("account = \"demo\"", "account = \"nope\""));
        assert!(
            e.starts_with("/etc/inboxd/inboxd.toml:18:") && e.contains("nope"),
            "{e}"
        );
        let e = err(&GOOD
            .replace("127.0.0.1", "mail.example.com")
            .replace("starttls", "none"));
        assert!(e.contains(":5:") && e.contains("loopback"), "{e}");
        let e = err(&GOOD.replace("every = \"0s\", until = \"0s\"", "every = \"0s\", until = \"5m\""));
        assert!(e.contains(":14:") && e.contains("tight loop"), "{e}");
        let e = err(&GOOD.replace("after = \"seen\"", "after = \"sen\""));
        assert!(e.contains(":21:") && e.contains("move:<Folder>"), "{e}");
        let e = err(&GOOD.replace("idle_refresh = \"10m\"", "idle_refresh = \"10 parsecs\""));
        assert!(e.contains(":11:") && e.contains("invalid duration"), "{e}");
    }

    #[test]
    fn password_literal_never_in_debug() {
        let c = parse(&GOOD.replace("{ env = \"DEMO_PASSWORD\" }", "\"s3cr3t-pw\"")).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t-pw"));
    }

    #[test]
    fn provider_presets_fill_in_and_explicit_keys_win() {
        let m365 = r#"
[accounts.m]
provider = "microsoft365"
user = "support@contoso.com"
oauth2 = { grant = "client_credentials", tenant = "contoso.onmicrosoft.com", client_id = "app", client_secret = { env = "S" } }
"#;
        let c = parse(m365).unwrap();
        let a = &c.accounts["m"];
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("outlook.office365.com", 993, TlsMode::Implicit)
        );
        let Auth::OAuth2(src) = &a.auth else { panic!() };
        let Grant::ClientSecret { token_url, scopes, .. } = src.grant() else {
            panic!()
        };
        assert_eq!(
            token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(scopes, &vec!["https://outlook.office365.com/.default".to_string()]);

        let c = parse(&m365.replace(
            "provider = \"microsoft365\"",
            "provider = \"microsoft365\"\nhost = \"127.0.0.1\"\nport = 1993",
        ))
        .unwrap();
        assert_eq!(
            (c.accounts["m"].host.as_str(), c.accounts["m"].port),
            ("127.0.0.1", 1993)
        );

        let gmail = r#"
[accounts.g]
provider = "gmail"
user = "ops@example.com"
oauth2 = { grant = "jwt_bearer", service_account_key = { file = "sa.json" } }
"#;
        let c = parse(gmail).unwrap();
        let Auth::OAuth2(src) = &c.accounts["g"].auth else {
            panic!()
        };
        let Grant::JwtBearer {
            subject,
            scopes,
            token_url,
            ..
        } = src.grant()
        else {
            panic!()
        };
        assert_eq!(
            (subject.as_str(), scopes[0].as_str()),
            ("ops@example.com", "https://mail.google.com/")
        );
        assert_eq!(token_url.as_deref(), Some("https://oauth2.googleapis.com/token"));
    }

    #[test]
    fn oauth2_mistakes_are_located() {
        let e = err(r#"
[accounts.m]
provider = "microsoft365"
user = "u"
oauth2 = { grant = "client_credentials", client_id = "app", client_secret = "x" }
"#);
        assert!(e.contains(":5:") && e.contains("tenant"), "{e}");
        let e = err(
            "[accounts.a]\nhost = \"h\"\nuser = \"u\"\npassword = \"p\"\noauth2 = { grant = \"command\", command = [\"x\"] }\n",
        );
        assert!(e.contains("exactly one of `password` or `oauth2`"), "{e}");
        let e = err("[accounts.a]\nhost = \"h\"\nuser = \"u\"\npassword = \"p\"\nauth = \"xoauth2\"\n");
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn accounts_with_the_same_credential_share_one_token_cache() {
        let text = r#"
[accounts.a]
provider = "microsoft365"
user = "a@contoso.com"
oauth2 = { grant = "client_credentials", tenant = "t", client_id = "app", client_secret = { env = "S" } }
[accounts.b]
provider = "microsoft365"
user = "b@contoso.com"
oauth2 = { grant = "client_credentials", tenant = "t", client_id = "app", client_secret = { env = "S" } }
"#;
        let c = parse(text).unwrap();
        let (Auth::OAuth2(a), Auth::OAuth2(b)) = (&c.accounts["a"].auth, &c.accounts["b"].auth) else {
            panic!()
        };
        assert!(a.shares_cache_with(b));
        let other = text.replacen("client_id = \"app\"", "client_id = \"other\"", 1);
        let c = parse(&other).unwrap();
        let (Auth::OAuth2(a), Auth::OAuth2(b)) = (&c.accounts["a"].auth, &c.accounts["b"].auth) else {
            panic!()
        };
        assert!(!a.shares_cache_with(b));
    }

    #[test]
    fn nonsense_numbers_are_located_errors() {
        let base = "[accounts.a]\nhost = \"127.0.0.1\"\ntls = \"none\"\nuser = \"u\"\npassword = \"p\"\n";
        let watch = "[[watch]]\naccount = \"a\"\ndeliver = { exec = [\"x\"] }\n";
        for (account_extra, watch_extra, expect) in [
            ("port = 0\n", "", "accounts.a.port"),
            ("timeouts = { command = \"0s\" }\n", "", "accounts.a.timeouts.command"),
            (
                "timeouts = { idle_silence = \"0s\" }\n",
                "",
                "accounts.a.timeouts.idle_silence",
            ),
            ("timeouts = { done = \"0s\" }\n", "", "accounts.a.timeouts.done"),
            ("", "max_attempts = 0\n", "watch.max_attempts"),
            ("", "batch_size = 0\n", "watch.batch_size"),
            ("", "retry_initial = \"10m\"\nretry_max = \"1m\"\n", "watch.retry_max"),
        ] {
            let text = format!("{base}{account_extra}{watch}{watch_extra}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(expect), "{text}\n-> {e}");
            assert!(
                e.contains(":1:") || e.contains(":6:") || e.contains(":7:"),
                "no line in {e}"
            );
        }
        let e = parse(&format!(
            "{base}[[watch]]\naccount = \"a\"\ndeliver = {{ exec = [\"x\"], timeout = \"0s\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("deliver.timeout"), "{e}");
        let e = parse(&format!(
            "{base}[[watch]]\naccount = \"a\"\ndeliver = {{ maildir = \"m\", mode = \"0044\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("deliver.mode"), "{e}");
    }

    #[test]
    fn different_literal_refresh_tokens_never_share_a_token_cache() {
        let text = r#"
[accounts.a]
provider = "gmail"
user = "a@example.com"
oauth2 = { grant = "refresh_token", client_id = "app", client_secret = "cs", refresh_token = "token-of-a" }
[accounts.b]
provider = "gmail"
user = "b@example.com"
oauth2 = { grant = "refresh_token", client_id = "app", client_secret = "cs", refresh_token = "token-of-b" }
"#;
        let c = parse(text).unwrap();
        let (Auth::OAuth2(a), Auth::OAuth2(b)) = (&c.accounts["a"].auth, &c.accounts["b"].auth) else {
            panic!()
        };
        assert!(!a.shares_cache_with(b));
        let same = text.replace("token-of-b", "token-of-a");
        let c = parse(&same).unwrap();
        let (Auth::OAuth2(a), Auth::OAuth2(b)) = (&c.accounts["a"].auth, &c.accounts["b"].auth) else {
            panic!()
        };
        assert!(a.shares_cache_with(b));
    }

    #[test]
    fn a_token_endpoint_in_clear_is_refused_unless_on_this_machine() {
        let text = |url: &str| {
            format!(
                "[accounts.a]\nhost = \"h\"\nuser = \"u\"\noauth2 = {{ grant = \"client_credentials\", token_url = \"{url}\", client_id = \"c\", client_secret = \"s\" }}\n"
            )
        };
        let e = parse(&text("http://login.example.com/token")).unwrap_err().to_string();
        assert!(e.contains("plain http") && e.contains(":4:"), "{e}");
        assert!(parse(&text("ftp://x/token")).is_err());
        parse(&text("http://127.0.0.1:8080/token")).unwrap();
        parse(&text("https://login.example.com/token")).unwrap();
    }

    #[test]
    fn loopback_detection() {
        for h in ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.1", "example.com", "localhost.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
