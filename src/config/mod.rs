//! The TOML configuration, in two stages: raw serde structs close to the file, then validated
//! settings with defaults applied, paths resolved against the config file's folder and
//! references checked. Every error names the file, the line and the key.
//!
//! The doc comments on the raw fields are the reference; README.md repeats them for operators.
//!
//! `raw.rs` holds the serde structs close to the file; `account.rs` and `watch.rs` validate one
//! `[accounts.NAME]` and one `[[watch]]` table; this file holds the validated types and
//! [`Config::load`].

mod account;
mod raw;
mod watch;

use raw::RawConfig;
pub use raw::{Bytes, Dur};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use inboxd_core::mailbox::{StartPolicy, UidValidityPolicy};
use inboxd_core::retry::RetryPolicy;
use inboxd_core::schedule::Schedule;
use inboxd_core::wait::WaitPolicy;
use serde::Deserialize;

use crate::oauth2::TokenSource;
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

/// What makes two messages the same message, and so which idempotency key the targets get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// Gmail's message id (`X-GM-MSGID`) where the server offers `X-GM-EXT-1`, the UID
    /// elsewhere.
    #[default]
    Auto,
    /// The folder, UIDVALIDITY and UID (`v1-...` keys) everywhere.
    Uid,
    /// Gmail's message id, always: one message under several labels (folders) gets one key
    /// (`gm1-...`), so a target that deduplicates takes it once. A server without
    /// `X-GM-EXT-1` is a configuration error.
    Gmail,
}

impl Identity {
    /// Refuses `gmail` on a server that does not offer `X-GM-EXT-1` (`offered`), naming the
    /// account's key and what to set instead.
    pub fn check(self, account: &str, offered: bool) -> Result<(), String> {
        if self == Identity::Gmail && !offered {
            return Err(format!(
                "accounts.{account}.identity = \"gmail\", but the server does not offer Gmail's X-GM-EXT-1: set identity = \"auto\" or \"uid\""
            ));
        }
        Ok(())
    }
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

impl After {
    /// `"none"`, `"seen"`, `"delete"`, `"move:<Folder>"` or `"flag:<keyword>"`.
    pub fn parse(s: &str) -> Option<After> {
        match s {
            "none" => Some(After::None),
            "seen" => Some(After::Seen),
            "delete" => Some(After::Delete),
            _ => {
                if let Some(folder) = s
                    .strip_prefix("move:")
                    .filter(|f| !f.is_empty() && !f.contains(['\r', '\n', '\0']))
                {
                    Some(After::Move(folder.to_string()))
                } else {
                    // An IMAP atom: no spaces, parentheses, quotes or wildcards (RFC 3501 §9).
                    let kw = s.strip_prefix("flag:")?;
                    let ok = !kw.is_empty() && kw.bytes().all(|b| b.is_ascii_graphic() && !b"(){%*\"]".contains(&b));
                    ok.then(|| After::Flag(kw.to_string()))
                }
            }
        }
    }
}

/// The config spelling, which [`After::parse`] reads back.
impl std::fmt::Display for After {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            After::None => f.write_str("none"),
            After::Seen => f.write_str("seen"),
            After::Delete => f.write_str("delete"),
            After::Move(folder) => write!(f, "move:{folder}"),
            After::Flag(kw) => write!(f, "flag:{kw}"),
        }
    }
}

impl<'de> Deserialize<'de> for After {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        After::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid value {s:?}; expected \"none\", \"seen\", \"delete\", \"move:<Folder>\" or \"flag:<keyword>\""
            ))
        })
    }
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
    /// Which key the targets get for a message (`identity`).
    pub identity: Identity,
    pub wait: WaitPolicy,
    pub schedule: Schedule,
    pub stable_after: Duration,
    pub park_for: Duration,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

/// How many connections an account's watches may hold and attempt at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions open at once to the account's host, over all accounts there (`[limits]
    /// connections_per_host`); `None`: no limit.
    pub connections_per_host: Option<usize>,
    /// Connection attempts (connect, TLS, login) at once to the host (`[limits]
    /// attempts_per_host`, default 8).
    pub attempts_per_host: usize,
    /// Sessions of this account's user at once (the account's `max_connections`: a provider's
    /// per-mailbox limit); `None`: no limit.
    pub max_connections: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_host: None,
            attempts_per_host: crate::imap::connect::ATTEMPTS_PER_HOST,
            max_connections: None,
        }
    }
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
            identity: Identity::Auto,
            wait: WaitPolicy::default(),
            schedule: Schedule::default(),
            stable_after: Duration::from_secs(300),
            park_for: Duration::from_secs(3600),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
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
        /// What the program reads on stdin.
        stdin: Payload,
    },
    Maildir {
        path: PathBuf,
        /// Mode of message files (directories get matching search bits).
        mode: u32,
    },
    Webhook {
        url: String,
        /// Standard Webhooks signing secret (`whsec_` + base64).
        secret: Option<SecretSource>,
        payload: Payload,
        timeout: Duration,
        ca_file: Option<PathBuf>,
    },
    Mqtt {
        url: String,
        user: Option<String>,
        password: Option<SecretSource>,
        /// Topic template with `{account}` and `{folder}`.
        topic: String,
        payload: Payload,
        timeout: Duration,
        /// Extra trust root for `mqtts://`.
        ca_file: Option<PathBuf>,
    },
    Amqp {
        url: String,
        user: String,
        password: Option<SecretSource>,
        exchange: String,
        /// Routing key template with `{account}` and `{folder}`.
        routing_key: String,
        payload: Payload,
        timeout: Duration,
        /// Extra trust root for `amqps://`.
        ca_file: Option<PathBuf>,
    },
    Redis {
        url: String,
        /// Stream key template with `{account}` and `{folder}`.
        stream: String,
        password: Option<SecretSource>,
        payload: Payload,
        dedupe_for: Duration,
        timeout: Duration,
    },
    Nats {
        servers: String,
        /// Subject template with `{account}` and `{folder}`.
        subject: String,
        payload: Payload,
        token: Option<SecretSource>,
        user: Option<String>,
        password: Option<SecretSource>,
        timeout: Duration,
        /// Extra trust root for `tls://` servers.
        ca_file: Option<PathBuf>,
    },
}

/// A named destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub deliver: Deliver,
}

impl Deliver {
    /// The destination's kind, as its config key: `exec`, `maildir`, `webhook`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            Deliver::Exec { .. } => "exec",
            Deliver::Maildir { .. } => "maildir",
            Deliver::Webhook { .. } => "webhook",
            Deliver::Nats { .. } => "nats",
            Deliver::Redis { .. } => "redis",
            Deliver::Amqp { .. } => "amqp",
            Deliver::Mqtt { .. } => "mqtt",
        }
    }
}

/// What a target receives: the raw message, or `inboxd.message.v1` JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Raw,
    Json(crate::envelope::JsonOptions),
}

/// A validated watch of one (account, folder).
#[derive(Debug, Clone)]
pub struct Watch {
    pub account: Arc<Account>,
    /// The folder; for a pattern watch, the pattern (`Support/*`), which is no folder.
    pub folder: String,
    /// A pattern watch (`folders = "Support/*"`): a template for one watch per matching
    /// folder, listed again every `rescan`.
    pub pattern: Option<String>,
    pub rescan: Duration,
    pub start: StartPolicy,
    /// What happens on the server after delivery (a rule may override it).
    pub after: After,
    /// The destinations this watch delivers to, by name (`[targets.NAME]`, or the kind of an
    /// inline `deliver = { .. }`); the routing refers to them by index.
    pub targets: Vec<Target>,
    /// Which targets each message goes to.
    pub routing: crate::route::Routing,
    pub on_uidvalidity_change: UidValidityPolicy,
    pub retry: RetryPolicy,
    pub batch_size: usize,
    /// UIDs per listing window of a long backlog.
    pub list_window: u32,
    /// A message the server reports larger than this is dead-lettered without being fetched.
    pub max_message_size: u64,
    /// A message larger than this is fetched in chunks into a file in `spool_dir`.
    pub spool_above: u64,
    /// Where large messages are spooled (a Maildir handler uses its own `tmp/` instead).
    pub spool_dir: PathBuf,
}

/// Default `rescan` of a pattern watch.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(60);

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
    /// The watch of one folder a pattern watch matched: the same settings, that folder.
    pub fn for_folder(&self, folder: &str) -> Watch {
        Watch {
            folder: folder.to_string(),
            pattern: None,
            ..self.clone()
        }
    }

    /// `account/folder`, as used in logs and `status`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.account.name, self.folder)
    }

    /// Whether some message of this watch may have a post-action (the watch's, or a rule's).
    pub fn posts_after(&self) -> bool {
        self.after != After::None || self.routing.overrides_after()
    }
}

/// Where the state (checkpoints, delivery log) lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// A SQLite file (the default), locked by one process at a time.
    File(PathBuf),
    /// A PostgreSQL database (`postgres://` or `postgresql://` URL; libpq's `PG*` variables
    /// fill in what it leaves out). The URL may hold a password: it is never shown.
    Postgres(String),
}

impl StateLocation {
    /// The SQLite file, if the state is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            StateLocation::File(p) => Some(p),
            StateLocation::Postgres(_) => None,
        }
    }

    fn parse(base: &Path, text: &str) -> StateLocation {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            StateLocation::Postgres(text.to_string())
        } else {
            StateLocation::File(base.join(text))
        }
    }
}

/// A URL with its password (in the user part, or a `password=` parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    if scheme.is_empty() {
        format!("{authority}{tail}")
    } else {
        format!("{scheme}://{authority}{tail}")
    }
}

impl std::fmt::Display for StateLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateLocation::File(p) => write!(f, "{}", p.display()),
            StateLocation::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl std::fmt::Debug for StateLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateLocation::File(p) => f.debug_tuple("File").field(p).finish(),
            StateLocation::Postgres(url) => f.debug_tuple("Postgres").field(&redact_url(url)).finish(),
        }
    }
}

impl serde::Serialize for StateLocation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub state: StateLocation,
    pub accounts: BTreeMap<String, Arc<Account>>,
    pub watches: Vec<Watch>,
    /// The HTTP endpoint, when configured.
    pub http: Option<Http>,
    /// With PostgreSQL state: how long a watch's lease lasts unrenewed; it is renewed every
    /// third of that, and another instance takes the watch once it expired.
    pub lease_ttl: Duration,
    /// The pause between starting one watch and the next, beyond the first four (with jitter:
    /// half to one and a half times this), so that thousands of watches do not connect at once.
    pub start_stagger: Duration,
    /// The key that seals the accounts stored in PostgreSQL (`accounts_key`).
    pub accounts_key: Option<SecretSource>,
    /// Where large messages are spooled.
    pub spool_dir: PathBuf,
    /// `[limits]` per host, as given to every account.
    pub limits: Limits,
}

/// What an account stored in the database may hold: its own tables, nothing of the instance.
const STORED_KEYS: &str =
    "an account stored in the database holds only its [accounts.NAME] table, [targets.*] and [[watch]] tables";

/// Default `[limits] start_stagger`.
pub const DEFAULT_START_STAGGER: Duration = Duration::from_millis(30);

/// Default `lease_ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// Default address of the HTTP endpoint.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9877";

/// `[http]`, validated.
#[derive(Debug, Clone)]
pub struct Http {
    pub listen: std::net::SocketAddr,
    /// Bearer token for everything but `/healthz`; always set off loopback.
    pub token: Option<SecretSource>,
    /// A watch disconnected longer than this makes `/readyz` fail.
    pub unready_after: Duration,
    /// Dead letters no operator acknowledged make `/readyz` fail.
    pub unready_on_dead_letters: bool,
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
        Config::parse_with(path, text, None)
    }

    /// Validates the text of an account stored in the database (`inboxd account add`) and
    /// adds its account and watches to this config. `label` names it in errors (e.g.
    /// `postgres:accounts/support`); relative paths resolve against this config's folder; the
    /// state, spool and limits are this config's. The text must define exactly the account
    /// `name`, which must not already be in this config.
    pub fn add_stored(&mut self, label: &str, name: &str, text: &str) -> Result<(), ConfigError> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        let path = base.join(label);
        let stored = Config::parse_with(&path, text, Some((self, base)))?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.clone(),
            line: 1,
            column: 1,
            message,
        };
        if stored.accounts.len() != 1 || !stored.accounts.contains_key(name) {
            return Err(invalid(format!(
                "defines the accounts {:?}; it must define exactly [accounts.{name}]",
                stored.accounts.keys().collect::<Vec<_>>()
            )));
        }
        if self.accounts.contains_key(name) {
            return Err(invalid(format!(
                "account {name} is also in {}; the file's stays",
                self.path.display()
            )));
        }
        self.accounts.extend(stored.accounts);
        self.watches.extend(stored.watches);
        Ok(())
    }

    /// `inherit`: a stored account's config and folder, whose state, spool and limits it takes.
    fn parse_with(path: &Path, text: &str, inherit: Option<(&Config, &Path)>) -> Result<Config, ConfigError> {
        let base = inherit
            .map(|(_, base)| base)
            .or_else(|| path.parent())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let inherit = inherit.map(|(c, _)| c);
        let ctx = Ctx {
            path,
            text,
            base: std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf()),
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.invalid(e.span(), e.message().to_string()))?;
        let base = &ctx.base;
        if inherit.is_some() {
            let spans = [
                raw.state.as_ref().map(|s| ("state", s.span())),
                raw.lease_ttl.as_ref().map(|s| ("lease_ttl", s.span())),
                raw.limits.as_ref().map(|s| ("limits", s.span())),
                raw.accounts_key.as_ref().map(|s| ("accounts_key", s.span())),
                raw.http.as_ref().map(|s| ("http", s.span())),
                raw.spool.as_ref().map(|_| ("spool", 0..0)),
            ];
            if let Some((key, span)) = spans.into_iter().flatten().next() {
                return Err(ctx.invalid(Some(span), format!("{key}: {STORED_KEYS}")));
            }
        }

        let mut accounts = BTreeMap::new();
        // One token cache per credential, shared by the accounts that use the same one.
        let mut token_sources: Vec<(crate::oauth2::Grant, TokenSource)> = Vec::new();
        let limits = raw.limits.map(|l| (l.span(), *l.get_ref())).unwrap_or_default();
        for (field, value) in [
            ("connections_per_host", limits.1.connections_per_host),
            ("attempts_per_host", limits.1.attempts_per_host),
        ] {
            if value == Some(0) {
                return Err(ctx.invalid(Some(limits.0.clone()), format!("limits.{field}: at least 1")));
            }
        }
        let host_limits = match inherit {
            Some(c) => c.limits,
            None => Limits {
                connections_per_host: limits.1.connections_per_host.map(|n| n as usize),
                attempts_per_host: limits
                    .1
                    .attempts_per_host
                    .map_or(Limits::default().attempts_per_host, |n| n as usize),
                max_connections: None,
            },
        };
        for (name, spanned) in raw.accounts {
            let mut account = account::build(&ctx, name.clone(), spanned, &mut token_sources)?;
            account.limits.connections_per_host = host_limits.connections_per_host;
            account.limits.attempts_per_host = host_limits.attempts_per_host;
            accounts.insert(name, Arc::new(account));
        }
        let start_stagger = limits.1.start_stagger.map_or(DEFAULT_START_STAGGER, |d| d.0);

        let state = match &raw.state {
            Some(text) => {
                let location = StateLocation::parse(base, text.get_ref());
                if matches!(location, StateLocation::Postgres(_)) && !cfg!(feature = "postgres") {
                    return Err(ctx.invalid(
                        Some(text.span()),
                        "state: this inboxd was built without the `postgres` feature".to_string(),
                    ));
                }
                if text.get_ref().trim().is_empty() {
                    return Err(ctx.invalid(Some(text.span()), "state: empty".to_string()));
                }
                location
            }
            None => StateLocation::File(base.join("inboxd.db")),
        };
        let state = inherit.map_or(state, |c| c.state.clone());
        let spool_dir = match (raw.spool, &state) {
            _ if inherit.is_some() => inherit.map(|c| c.spool_dir.clone()).unwrap_or_default(),
            (Some(dir), _) => base.join(dir),
            (None, StateLocation::File(file)) => {
                let mut name = file.as_os_str().to_os_string();
                name.push(".spool");
                PathBuf::from(name)
            }
            (None, StateLocation::Postgres(_)) => base.join("inboxd.spool"),
        };
        let mut targets = BTreeMap::new();
        for (name, spanned) in raw.targets {
            let what = format!("targets.{name}");
            if !watch::is_target_name(&name) {
                return Err(ctx.invalid(
                    Some(spanned.span()),
                    format!("{what}: a target name is letters, digits, `-`, `_` and `.`, and not \"skip\""),
                ));
            }
            targets.insert(name, watch::deliver(&ctx, spanned, &what)?);
        }
        let mut watches: Vec<Watch> = Vec::new();
        for spanned in raw.watch {
            let span = spanned.span();
            let watch = watch::build(&ctx, spanned, &accounts, &targets, &spool_dir)?;
            if watches
                .iter()
                .any(|o| o.account.name == watch.account.name && o.folder == watch.folder)
            {
                return Err(ctx.invalid(Some(span), format!("watch: {} is watched twice", watch.name())));
            }
            watches.push(watch);
        }
        let http = match raw.http {
            None => None,
            Some(spanned) => {
                let span = spanned.span();
                let h = spanned.into_inner();
                let text = h.listen.unwrap_or_else(|| DEFAULT_HTTP_LISTEN.into());
                let listen: std::net::SocketAddr = text.parse().map_err(|_| {
                    ctx.invalid(
                        Some(span.clone()),
                        format!("http.listen: {text:?} is not an address and port such as \"127.0.0.1:9877\""),
                    )
                })?;
                if !listen.ip().is_loopback() && h.token.is_none() {
                    return Err(ctx.invalid(
                        Some(span),
                        format!(
                            "http.token: listening on {listen}, beyond this machine, needs a bearer token (a secret source, e.g. token = {{ env = \"INBOXD_HTTP_TOKEN\" }})"
                        ),
                    ));
                }
                Some(Http {
                    listen,
                    token: h.token.map(|s| s.relative_to(base)),
                    unready_after: h.unready_after.map_or(Duration::from_secs(600), |d| d.0),
                    unready_on_dead_letters: h.unready_on_dead_letters.unwrap_or(false),
                })
            }
        };
        let lease_ttl = match raw.lease_ttl {
            None => DEFAULT_LEASE_TTL,
            Some(t) if t.get_ref().0 < Duration::from_secs(1) || t.get_ref().0 > Duration::from_secs(3600) => {
                return Err(ctx.invalid(
                    Some(t.span()),
                    "lease_ttl: between 1s and 1h (the lease is renewed every third of it)".to_string(),
                ));
            }
            Some(t) => t.get_ref().0,
        };
        if let Some(k) = &raw.accounts_key
            && !matches!(state, StateLocation::Postgres(_))
        {
            return Err(ctx.invalid(
                Some(k.span()),
                "accounts_key: accounts are stored in the database only with PostgreSQL state (`state = \"postgres://...\"`)".to_string(),
            ));
        }
        let accounts_key = raw.accounts_key.map(|k| k.into_inner().relative_to(base));
        Ok(Config {
            path: path.to_path_buf(),
            state,
            accounts,
            watches,
            http,
            lease_ttl,
            start_stagger,
            accounts_key,
            spool_dir,
            limits: host_limits,
        })
    }
}

/// What validation needs to say where a problem is and to resolve relative paths.
struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
    /// The config file's folder, absolute.
    base: PathBuf,
}

impl Ctx<'_> {
    /// A located error: `file:line:column: message`.
    fn invalid(&self, span: Option<std::ops::Range<usize>>, message: String) -> ConfigError {
        let (line, column) = span.map_or((1, 1), |s| line_col(self.text, s.start));
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message,
        }
    }
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
    use crate::oauth2::Grant;

    #[test]
    fn a_stored_account_resolves_paths_beside_the_config_and_takes_its_state() {
        let mut config = Config::parse(
            Path::new("/etc/inboxd/inboxd.toml"),
            "state = \"postgres://db/inboxd\"\nspool = \"spool\"\n[limits]\nconnections_per_host = 7\n",
        )
        .unwrap();
        let text = "[accounts.s]\nhost = \"h\"\nuser = \"u\"\npassword = \"p\"\n[[watch]]\naccount = \"s\"\nfolder = \"INBOX\"\ndeliver = { maildir = \"out\" }\n";
        config.add_stored("postgres:accounts/s", "s", text).unwrap();
        let w = &config.watches[0];
        assert!(matches!(&w.targets[0].deliver, Deliver::Maildir { path, .. } if path == Path::new("/etc/inboxd/out")));
        assert_eq!(w.spool_dir, Path::new("/etc/inboxd/spool"));
        assert_eq!(w.account.limits.connections_per_host, Some(7));
        // Another name than the one it is stored under, the instance's keys, a second copy.
        let e = config.clone().add_stored("postgres:accounts/t", "t", text).unwrap_err();
        assert!(e.to_string().contains("exactly [accounts.t]"), "{e}");
        let e = config
            .clone()
            .add_stored("postgres:accounts/s", "s", &format!("lease_ttl = \"2s\"\n{text}"))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/inboxd/postgres:accounts/s:1:13: lease_ttl:"),
            "{e}"
        );
        let e = config.add_stored("postgres:accounts/s", "s", text).unwrap_err();
        assert!(
            e.to_string().contains("account s is also in /etc/inboxd/inboxd.toml"),
            "{e}"
        );
    }

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
    fn a_pattern_watch_is_a_template_and_is_checked() {
        let c = parse(&GOOD.replace("folder = \"INBOX\"", "folders = \"Support/*\"\nrescan = \"30s\"")).unwrap();
        let w = &c.watches[0];
        assert_eq!(
            (w.pattern.as_deref(), w.folder.as_str()),
            (Some("Support/*"), "Support/*")
        );
        assert_eq!(w.rescan, Duration::from_secs(30));
        let one = w.for_folder("Support/Tier 1");
        assert_eq!(
            (one.pattern.clone(), one.name()),
            (None, "demo/Support/Tier 1".to_string())
        );
        assert_eq!(parse(GOOD).unwrap().watches[0].pattern, None);
        for (bad, says) in [
            ("folder = \"INBOX\"\nfolders = \"S/*\"", "`folder` or `folders`"),
            ("folders = \"Support\"", "is no pattern"),
        ] {
            let e = err(&GOOD.replace("folder = \"INBOX\"", bad));
            assert!(e.contains(says), "{e}");
        }
        // With PostgreSQL too (the instances expand it, each folder under a lease of its own).
        let pg = parse(
            &GOOD
                .replace("folder = \"INBOX\"", "folders = \"S/*\"")
                .replace("state = \"inboxd.db\"", "state = \"postgres://db.example.com/inboxd\""),
        )
        .unwrap();
        assert_eq!(pg.watches[0].pattern.as_deref(), Some("S/*"));
    }

    #[test]
    fn state_limits_and_leases_are_read_and_checked() {
        let pg = GOOD.replace(
            "state = \"inboxd.db\"",
            "state = \"postgres://inboxd:pw@db.example.com/inboxd?sslmode=require&password=pw2\"\nlease_ttl = \"6s\"\n[limits]\nconnections_per_host = 40\nattempts_per_host = 4\nstart_stagger = \"5ms\"",
        )
        .replace("user = \"alice\"", "user = \"alice\"\nmax_connections = 15");
        let c = parse(&pg).unwrap();
        assert!(matches!(c.state, StateLocation::Postgres(_)));
        // The password shows nowhere: not in Display, not in Debug (the whole config's).
        assert_eq!(
            c.state.to_string(),
            "postgres://inboxd:***@db.example.com/inboxd?sslmode=require&password=***"
        );
        assert!(!format!("{c:?}").contains("pw"), "{c:?}");
        assert_eq!(c.lease_ttl, Duration::from_secs(6));
        assert_eq!(c.start_stagger, Duration::from_millis(5));
        assert_eq!(c.watches[0].spool_dir, Path::new("/etc/inboxd/inboxd.spool"));
        let l = c.accounts["demo"].limits;
        assert_eq!(
            (l.connections_per_host, l.attempts_per_host, l.max_connections),
            (Some(40), 4, Some(15))
        );
        let d = parse(GOOD).unwrap();
        assert_eq!(
            (d.lease_ttl, d.start_stagger),
            (DEFAULT_LEASE_TTL, DEFAULT_START_STAGGER)
        );
        assert_eq!(d.accounts["demo"].limits, Limits::default());
        for (bad, says) in [
            ("lease_ttl = \"0s\"", "lease_ttl: between 1s and 1h"),
            (
                "[limits]\nconnections_per_host = 0",
                "limits.connections_per_host: at least 1",
            ),
            (
                "[limits]\nattempts_per_host = 0",
                "limits.attempts_per_host: at least 1",
            ),
        ] {
            let text = GOOD.replace("state = \"inboxd.db\"", &format!("state = \"inboxd.db\"\n{bad}"));
            let e = err(&text);
            assert!(e.contains(says) && e.contains(":3:"), "{e}");
        }
        let e = err(&GOOD.replace("user = \"alice\"", "user = \"alice\"\nmax_connections = 0"));
        assert!(e.contains("accounts.demo.max_connections: at least 1"), "{e}");
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(GOOD).unwrap();
        let a = &c.accounts["demo"];
        assert_eq!((a.port, a.tls), (10143, TlsMode::Starttls));
        assert_eq!(a.ca_file.as_deref(), Some(Path::new("/etc/inboxd/tls/cert.pem")));
        assert_eq!(a.schedule, Schedule::default());
        assert_eq!(c.state, StateLocation::File("/etc/inboxd/inboxd.db".into()));
        let w = &c.watches[0];
        assert_eq!((w.start, &w.after), (StartPolicy::All, &After::Seen));
        assert!(matches!(&w.targets[0].deliver, Deliver::Exec { argv, .. } if argv[0] == "./handler.sh"));
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
        let e = err(&GOOD.replace("after = \"seen\"", "after = \"seen\"\nlist_window = 0"));
        assert!(
            e.contains(":17:") && e.contains("list_window must be at least 1"),
            "{e}"
        );
        let c = parse(&GOOD.replace("after = \"seen\"", "after = \"seen\"\nlist_window = 50")).unwrap();
        assert_eq!(c.watches[0].list_window, 50);
        let idle = parse(&GOOD.replace("poll_interval = \"60s\"", "poll_interval = \"60s\"\nidle = false")).unwrap();
        assert!(!idle.watches[0].account.wait.use_idle && parse(GOOD).unwrap().watches[0].account.wait.use_idle);
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
