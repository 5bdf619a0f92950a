//! The config file as serde reads it: structs close to the TOML, with spans for messages.
//! Their doc comments are the reference for each key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{After, AuthMechanism, Identity, Provider, TlsMode};
use crate::secret::SecretSource;

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
pub(super) fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
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

pub(super) fn parse_bytes(s: &str) -> Option<u64> {
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

/// `[limits]`.
#[derive(Deserialize, Clone, Copy, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) connections_per_host: Option<u32>,
    pub(super) attempts_per_host: Option<u32>,
    /// Pause between starting one watch and the next, beyond the first four (default 30 ms,
    /// with jitter).
    pub(super) start_stagger: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    /// Where checkpoints and the delivery log live: a SQLite file (default `inboxd.db`,
    /// relative to the config file's folder), or a `postgres://` URL.
    pub(super) state: Option<Spanned<String>>,
    /// Directory where messages above a watch's `spool_above` are written while fetched.
    /// Default: `<state>.spool` beside the state file (not /tmp, often a RAM disk); with
    /// PostgreSQL, `inboxd.spool` beside the config file.
    pub(super) spool: Option<PathBuf>,
    /// With PostgreSQL state: how long a watch's lease lasts unrenewed (default 15 s).
    pub(super) lease_ttl: Option<Spanned<Dur>>,
    /// Connection limits per server, for every account.
    pub(super) limits: Option<Spanned<RawLimits>>,
    /// With PostgreSQL state: the key (32 bytes, base64; a secret source) that seals the
    /// accounts stored in the database (`inboxd account add`).
    pub(super) accounts_key: Option<Spanned<SecretSource>>,
    #[serde(default)]
    pub(super) accounts: BTreeMap<String, Spanned<RawAccount>>,
    /// The HTTP endpoint (metrics, health, the watches' state); off unless given.
    pub(super) http: Option<Spanned<RawHttp>>,
    /// Named destinations that watches and rules refer to: `[targets.tickets]`.
    #[serde(default)]
    pub(super) targets: BTreeMap<String, Spanned<RawDeliver>>,
    #[serde(default)]
    pub(super) watch: Vec<Spanned<RawWatch>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    /// A well-known provider whose defaults fill in host, port, TLS, token URL and scope.
    pub(super) provider: Option<Provider>,
    pub(super) host: Option<Spanned<String>>,
    /// Default 993 for implicit TLS, 143 otherwise.
    pub(super) port: Option<u16>,
    pub(super) tls: Option<TlsMode>,
    /// Extra trust root (PEM) on top of the platform's.
    pub(super) ca_file: Option<PathBuf>,
    /// Pin the server's certificate instead: `"sha256:AB:CD:..."` (printed by `inboxd check`
    /// when the handshake fails).
    pub(super) tls_fingerprint: Option<String>,
    pub(super) user: String,
    pub(super) password: Option<SecretSource>,
    pub(super) oauth2: Option<Spanned<RawOAuth2>>,
    #[serde(default)]
    pub(super) auth: AuthMechanism,
    /// What makes two messages the same: `auto` (Gmail's message id where offered), `uid`,
    /// `gmail`.
    #[serde(default)]
    pub(super) identity: Identity,
    pub(super) idle_refresh: Option<Dur>,
    pub(super) poll_interval: Option<Dur>,
    /// false: never IDLE; poll every `poll_interval` even where the server offers IDLE.
    pub(super) idle: Option<bool>,
    /// true: one NOTIFY session (RFC 5465) tells the account's watches of news, and a
    /// caught-up watch holds no session of its own; where the server has no NOTIFY, as false.
    pub(super) notify: Option<bool>,
    pub(super) recycle_after: Option<Dur>,
    pub(super) reconnect: Option<Spanned<Vec<RawStage>>>,
    /// A connection must stay up this long before the reconnect schedule starts over.
    pub(super) stable_after: Option<Dur>,
    /// How long a watch with a permanent failure (e.g. missing folder) waits between tries.
    pub(super) park_for: Option<Dur>,
    /// Sessions of this user at once (a provider's per-mailbox limit); default no limit.
    pub(super) max_connections: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawGrant {
    ClientCredentials,
    RefreshToken,
    JwtBearer,
    Command,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawThumbprint {
    Sha256,
    Sha1,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth2 {
    pub(super) grant: RawGrant,
    /// Token endpoint; presets derive it (Microsoft 365 from `tenant`).
    pub(super) token_url: Option<String>,
    /// Microsoft 365 tenant (domain or id).
    pub(super) tenant: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<SecretSource>,
    /// PEM certificate for a `private_key_jwt` client assertion (with `private_key`).
    pub(super) certificate: Option<PathBuf>,
    pub(super) private_key: Option<SecretSource>,
    pub(super) thumbprint: Option<RawThumbprint>,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) refresh_token: Option<SecretSource>,
    /// Service-account key JSON (Google), from a secret source such as `{ file = "sa.json" }`.
    pub(super) service_account_key: Option<SecretSource>,
    /// The mailbox user the service account acts for; default: the account's `user`.
    pub(super) subject: Option<String>,
    pub(super) command: Option<Vec<String>>,
    /// Refresh the token after this fraction of its lifetime (default 0.8).
    pub(super) refresh_at: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStage {
    pub(super) every: Dur,
    pub(super) until: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) connect: Option<Dur>,
    pub(super) tls: Option<Dur>,
    pub(super) greeting: Option<Dur>,
    pub(super) login: Option<Dur>,
    pub(super) command: Option<Dur>,
    pub(super) done: Option<Dur>,
    pub(super) idle_silence: Option<Dur>,
    pub(super) keepalive: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWatch {
    pub(super) account: Spanned<String>,
    /// Default `INBOX`; not with `folders`.
    pub(super) folder: Option<String>,
    /// A pattern (`Support/*`): every folder that matches, as folders come and go.
    pub(super) folders: Option<Spanned<String>>,
    /// How often a pattern is listed again (default 1 minute).
    pub(super) rescan: Option<Dur>,
    #[serde(default)]
    pub(super) start: RawStart,
    #[serde(default)]
    pub(super) after: After,
    /// Where every message goes: a destination table, or names of `[targets]`. Not with rules.
    pub(super) deliver: Option<Spanned<RawTargets>>,
    /// Ordered routing rules: the first that matches decides.
    #[serde(default)]
    pub(super) rule: Vec<Spanned<RawRule>>,
    /// With rules: where a message no rule matches goes (target names, or "skip").
    #[serde(rename = "else")]
    pub(super) otherwise: Option<Spanned<OneOrMany<String>>>,
    #[serde(default)]
    pub(super) on_uidvalidity_change: RawUidValidity,
    pub(super) max_attempts: Option<u32>,
    pub(super) retry_initial: Option<Dur>,
    pub(super) retry_max: Option<Dur>,
    /// Messages per UID FETCH command.
    pub(super) batch_size: Option<usize>,
    /// UIDs per listing window of a long backlog (default 1000).
    pub(super) list_window: Option<u32>,
    /// A message the server reports larger than this is dead-lettered without being fetched
    /// (default 200 MiB).
    pub(super) max_message_size: Option<Bytes>,
    /// Messages larger than this are fetched in chunks into a spool file instead of memory
    /// (default 1 MiB).
    pub(super) spool_above: Option<Bytes>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawStart {
    #[default]
    New,
    All,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawUidValidity {
    #[default]
    Dedupe,
    Skip,
    Replay,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeliver {
    /// Program and arguments; no shell. Run in the config file's folder.
    pub(super) exec: Option<Vec<String>>,
    pub(super) maildir: Option<PathBuf>,
    /// URL the message is POSTed to (https://, or http:// to loopback or with `allow_http`).
    pub(super) webhook: Option<String>,
    /// NATS server(s) the message is published to with JetStream (`nats://host:4222`).
    pub(super) nats: Option<String>,
    /// NATS subject, with `{account}` and `{folder}` (default "inboxd.{account}.{folder}").
    pub(super) subject: Option<String>,
    /// NATS authentication token, from a secret source.
    pub(super) token: Option<SecretSource>,
    /// Redis server URL (`redis://127.0.0.1:6379/0`; a password from `password`).
    pub(super) redis: Option<String>,
    /// Redis stream key, with `{account}` and `{folder}` (default "inboxd:{account}:{folder}").
    pub(super) stream: Option<String>,
    /// Redis, AMQP or MQTT password, from a secret source.
    pub(super) password: Option<SecretSource>,
    /// How long Redis remembers a key to drop a repeat (default 7 days).
    pub(super) dedupe_for: Option<Dur>,
    /// AMQP broker (`amqp://host:5672/vhost`; credentials in `user` and `password`).
    pub(super) amqp: Option<String>,
    /// AMQP user (default "guest"), or MQTT user (default none).
    pub(super) user: Option<String>,
    /// MQTT broker (`mqtt://host:1883`).
    pub(super) mqtt: Option<String>,
    /// MQTT topic, with `{account}` and `{folder}` (default "inboxd/{account}/{folder}").
    pub(super) topic: Option<String>,
    /// AMQP exchange (default "", the default exchange: the routing key names the queue).
    pub(super) exchange: Option<String>,
    /// AMQP routing key, with `{account}` and `{folder}` (default "inboxd.{account}.{folder}").
    pub(super) routing_key: Option<String>,
    /// Deadline per message: exec default 5 minutes, webhook 30 seconds.
    pub(super) timeout: Option<Dur>,
    /// Maildir file mode, octal (default "0600"); directories get matching search bits.
    pub(super) mode: Option<String>,
    /// Names of further environment variables the exec handler may see (beyond `PATH`,
    /// `HOME`, `LANG`, `LC_*`, `TZ`, `USER`, `TMPDIR` and the `INBOXD_*` it is given).
    pub(super) pass_env: Option<Vec<String>>,
    /// What the exec handler reads on stdin: "raw" (default) or "json" (`inboxd.message.v1`).
    pub(super) stdin: Option<RawFormat>,
    /// What the webhook POSTs or NATS publishes: "json" (default, `inboxd.message.v1`) or
    /// "raw" (message/rfc822).
    pub(super) format: Option<RawFormat>,
    /// Webhook signing secret (Standard Webhooks: `whsec_` + base64), from a secret source.
    pub(super) secret: Option<SecretSource>,
    /// Extra trust root (PEM) for the webhook's server, on top of the platform's.
    pub(super) ca_file: Option<PathBuf>,
    /// Allow plain http:// to a host that is not loopback.
    pub(super) allow_http: Option<bool>,
    /// JSON: attachments as "metadata" (default), "inline" (base64 content) or "omit".
    pub(super) attachments: Option<crate::envelope::Attachments>,
    /// JSON: attachments above this size stay metadata only (default 1 MiB).
    pub(super) attachment_max: Option<Bytes>,
    /// JSON: include the raw message, base64 (default false).
    pub(super) raw: Option<bool>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawFormat {
    Raw,
    Json,
}

/// A value, or a list of them.
#[derive(Deserialize, Clone)]
#[serde(untagged, expecting = "a value or a list of values")]
pub(super) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub(super) fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A glob (`"*@example.com"`) or a regular expression (`{ regex = "..." }`).
#[derive(Deserialize, Clone)]
#[serde(
    untagged,
    expecting = "a glob such as \"*@example.com\", { regex = \"...\" }, or a list of them"
)]
pub(super) enum RawPattern {
    Glob(String),
    Regex { regex: String },
}

/// The patterns of one condition.
#[derive(Deserialize, Clone)]
#[serde(
    untagged,
    expecting = "a glob such as \"*@example.com\", { regex = \"...\" }, or a list of them"
)]
pub(super) enum RawPatterns {
    One(RawPattern),
    Many(Vec<RawPattern>),
}

impl RawPatterns {
    pub(super) fn into_vec(self) -> Vec<RawPattern> {
        match self {
            RawPatterns::One(p) => vec![p],
            RawPatterns::Many(v) => v,
        }
    }
}

/// `[[watch.rule]]`: conditions (all must hold; a list within one is any of), then where the
/// message goes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    /// Shown in logs, `status` and `check --route` (default "rule N").
    pub(super) name: Option<String>,
    /// Sender address or display name.
    pub(super) from: Option<RawPatterns>,
    pub(super) to: Option<RawPatterns>,
    pub(super) cc: Option<RawPatterns>,
    /// The decoded subject.
    pub(super) subject: Option<RawPatterns>,
    /// Header name to pattern: `header = { "List-Id" = "*<alerts.example.com>" }`.
    #[serde(default)]
    pub(super) header: BTreeMap<String, RawPatterns>,
    pub(super) has_attachment: Option<bool>,
    pub(super) larger_than: Option<Bytes>,
    pub(super) smaller_than: Option<Bytes>,
    /// Target names, or "skip".
    pub(super) deliver: OneOrMany<String>,
    /// Overrides the watch's `after` for the messages this rule takes.
    pub(super) after: Option<After>,
}

/// A watch's `deliver`: one destination written in place, or names of `[targets]`.
pub(super) enum RawTargets {
    Names(Vec<String>),
    Inline(Box<RawDeliver>),
}

impl<'de> Deserialize<'de> for RawTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawTargets;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a destination such as { maildir = \"path\" }, a target name, or a list of target names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawTargets, E> {
                Ok(RawTargets::Names(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawTargets, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(RawTargets::Names(names))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawTargets, A::Error> {
                RawDeliver::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|d| RawTargets::Inline(Box::new(d)))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[http]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    /// `host:port`; default `127.0.0.1:9877`.
    pub(super) listen: Option<String>,
    /// Bearer token required for everything but `/healthz` (required off loopback).
    pub(super) token: Option<SecretSource>,
    /// `/readyz` fails for a watch disconnected longer than this (default 10 minutes).
    pub(super) unready_after: Option<Dur>,
    /// `/readyz` fails while a watch has dead letters no operator acknowledged (default false).
    pub(super) unready_on_dead_letters: Option<bool>,
}
