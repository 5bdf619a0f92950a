//! The IMAP session layer: the only module that knows about `async-imap`.
//!
//! [`Session::open`] connects, secures, greets and logs in with a deadline on every phase;
//! the methods of [`Session`] are the few commands inboxd needs, each with a deadline. Fetches
//! use `BODY.PEEK[]`, so fetching never sets `\Seen`.
//!
//! **Architecture Invariant:** no type of `async-imap` or `imap-proto` appears in this module's
//! public API; swapping the IMAP crate touches this folder only.

mod connect;
#[doc(hidden)]
pub mod fuzz;
pub mod guard;
pub mod sasl;

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use async_imap::Authenticator;
use async_imap::extensions::idle::IdleResponse;
use async_imap::imap_proto::{AttributeValue, MailboxDatum, Response, ResponseCode, Status};
use inboxd_core::failure::FailureClass;
use inboxd_core::mailbox::sequence_set;

pub use connect::Conn;

use self::sasl::Mechanism;
use crate::config::{Account, Auth, AuthMechanism, Timeouts, TlsMode};
use crate::oauth2::TokenError;
use crate::secret::SecretError;

type Inner = async_imap::Session<guard::Guard<Conn>>;

/// Why an IMAP operation failed. Never contains a password.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{phase} timed out after {after:?}")]
    Timeout { phase: &'static str, after: Duration },
    #[error("TLS handshake with {host} failed: {hint}{}", fingerprint.as_ref().map(|f| format!(" (the server's certificate: tls_fingerprint = \"{f}\")")).unwrap_or_default())]
    Tls {
        host: String,
        /// What went wrong and what to do, in a sentence.
        hint: String,
        /// The certificate the server presented, as `tls_fingerprint` takes it.
        fingerprint: Option<String>,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    #[error("server does not offer STARTTLS; refusing to send the password in clear")]
    NoStarttls,
    #[error("server refused the connection: {0}")]
    Refused(String),
    #[error("login as {user} refused: {message}")]
    Auth { user: String, message: String },
    #[error("cannot read the password of account {account}")]
    Secret {
        account: String,
        #[source]
        source: SecretError,
    },
    #[error("cannot get an access token for account {account}")]
    Token {
        account: String,
        #[source]
        source: TokenError,
    },
    #[error("{mechanism} as {user} refused: {message}{}", challenge.as_ref().map(|c| format!(" (server said {c})")).unwrap_or_default())]
    OAuth2Refused {
        user: String,
        mechanism: &'static str,
        message: String,
        challenge: Option<String>,
    },
    #[error("cannot select folder {folder:?}: {message}")]
    Select { folder: String, message: String },
    #[error("server closed the session: {0}")]
    Bye(String),
    #[error("{command} failed: {detail}")]
    Command { command: &'static str, detail: String },
    #[error("server answered {command} with {status}: {text}")]
    Rejected {
        command: &'static str,
        /// `NO` or `BAD`.
        status: &'static str,
        /// The server's text, with its response code first (`[TRYCREATE] ...`), at most 1 KiB.
        text: String,
    },
    #[error("server answered {command} with something unexpected: {detail}")]
    Unexpected { command: &'static str, detail: String },
}

impl ImapError {
    /// What this failure means for reconnecting.
    pub fn class(&self) -> FailureClass {
        let text = match self {
            ImapError::Rejected { text: m, .. }
            | ImapError::Bye(m)
            | ImapError::Select { message: m, .. }
            | ImapError::Refused(m) => Some(m.as_str()),
            _ => None,
        };
        if let Some(hint) = text.and_then(inboxd_core::failure::throttle_hint) {
            return FailureClass::Throttled(hint);
        }
        match self {
            ImapError::Auth { message, .. } => inboxd_core::failure::login_refused(message),
            // Exchange Online ends sessions whose token expired with this BYE, at any moment.
            ImapError::Bye(m) if m.contains("AccessTokenExpired") => FailureClass::AuthExpired,
            ImapError::Bye(_) => FailureClass::Bye,
            ImapError::OAuth2Refused { .. } => FailureClass::AuthExpired,
            ImapError::Token { source, .. } => source.class(),
            ImapError::Select { message, .. } => inboxd_core::failure::select_refused(message),
            ImapError::TlsConfig(_) | ImapError::NoStarttls => FailureClass::Permanent,
            // A vault that is down, an agent not started yet, a command past its deadline:
            // transient, along the schedule (which reaches hourly tries on its own).
            ImapError::Secret { .. } => FailureClass::Network,
            _ => FailureClass::Network,
        }
    }

    /// Whether this is the server refusing a command in a way that retrying cannot fix
    /// (RFC 5530 codes such as `TRYCREATE`, `NOPERM`, `READ-ONLY`).
    pub fn is_permanent_refusal(&self) -> bool {
        matches!(self, ImapError::Rejected { text, .. } if inboxd_core::failure::post_action_refusal_is_permanent(text))
    }
}

/// Longest server text kept in an error (it reaches logs, `Health` and events).
const MAX_TEXT: usize = 1024;

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub(crate) fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str(" [...]");
    }
    s
}

/// async-imap reports a tagged NO/BAD as `code: Some(TryCreate), info: Some("text")`: turns
/// that into `[TRYCREATE] text`.
fn humanize(m: &str) -> String {
    let Some(rest) = m.strip_prefix("code: ") else {
        return clip(m.to_string(), MAX_TEXT);
    };
    let (code, info) = rest.split_once(", info: ").unwrap_or((rest, ""));
    let code = code
        .strip_prefix("Some(")
        .and_then(|c| c.strip_suffix(')'))
        .map(|c| c.split('(').next().unwrap_or(c).to_string());
    let info = info
        .strip_prefix("Some(\"")
        .and_then(|i| i.strip_suffix("\")"))
        .map(|i| i.replace("\\\"", "\"").replace("\\\\", "\\"))
        .unwrap_or_default();
    let text = match code {
        Some(c) => format!("[{}] {info}", code_name_from_debug(&c)),
        None => info,
    };
    clip(text, MAX_TEXT)
}

/// The wire name of a response code imap-proto knows, from its `Debug` name.
fn code_name_from_debug(debug: &str) -> String {
    match debug {
        "ReadOnly" => "READ-ONLY".into(),
        "ReadWrite" => "READ-WRITE".into(),
        "Capabilities" => "CAPABILITY".into(),
        other => other.to_ascii_uppercase(),
    }
}

/// The wire name of a response code.
fn code_name(code: &ResponseCode<'_>) -> &'static str {
    match code {
        ResponseCode::Alert => "ALERT",
        ResponseCode::BadCharset(_) => "BADCHARSET",
        ResponseCode::Capabilities(_) => "CAPABILITY",
        ResponseCode::HighestModSeq(_) => "HIGHESTMODSEQ",
        ResponseCode::Parse => "PARSE",
        ResponseCode::PermanentFlags(_) => "PERMANENTFLAGS",
        ResponseCode::ReadOnly => "READ-ONLY",
        ResponseCode::ReadWrite => "READ-WRITE",
        ResponseCode::TryCreate => "TRYCREATE",
        ResponseCode::UidNext(_) => "UIDNEXT",
        ResponseCode::UidValidity(_) => "UIDVALIDITY",
        ResponseCode::Unseen(_) => "UNSEEN",
        ResponseCode::AppendUid(..) => "APPENDUID",
        ResponseCode::CopyUid(..) => "COPYUID",
        ResponseCode::UidNotSticky => "UIDNOTSTICKY",
        _ => "METADATA",
    }
}

/// A short, content-free description of an async-imap error: never the bytes of the response
/// that failed to parse (message content, PII), never more than a line.
fn describe(e: &async_imap::error::Error) -> String {
    use async_imap::error::{Error, ParseError};
    let text = match e {
        Error::Io(io) => {
            let t = io.to_string();
            if t.contains("during parsing of") {
                // imap-proto's error reads `Error(Error { input: [..], code: Tag }) during ...`:
                // keep the kind (nom's error code), never the input.
                let kind = t
                    .split_once("code: ")
                    .map(|(_, rest)| rest.chars().take_while(char::is_ascii_alphanumeric).collect::<String>())
                    .filter(|k| !k.is_empty())
                    .unwrap_or_else(|| "unknown".into());
                format!("the server sent a response that cannot be parsed (parser error {kind})")
            } else if t.contains("incoming data too large") {
                "the server sent a response larger than the IMAP library's 512 MiB limit".to_string()
            } else {
                format!("io: {}", clip(t, 200))
            }
        }
        Error::Bad(m) | Error::No(m) => humanize(m),
        Error::ConnectionLost => "connection lost".into(),
        Error::Parse(ParseError::Invalid(bytes)) => {
            format!(
                "the server sent a status response that cannot be parsed ({} bytes)",
                bytes.len()
            )
        }
        Error::Parse(ParseError::DataNotUtf8(bytes, _)) => {
            format!("the server sent {} bytes of text that is not UTF-8", bytes.len())
        }
        Error::Parse(ParseError::Unexpected(_)) => "the server sent a response that was not expected here".into(),
        Error::Parse(ParseError::Authentication(..)) => "cannot decode the server's authentication challenge".into(),
        Error::Parse(_) => "the server sent a response that cannot be parsed".into(),
        Error::Validate(v) => format!("an argument cannot be sent as an IMAP string: {v}"),
        Error::Append => "APPEND failed".into(),
        _ => "IMAP error".into(),
    };
    clip(text, MAX_TEXT)
}

/// A deadline on progress rather than on the whole command: fails only when the server sent
/// nothing for `idle` (a big FETCH over a slow link goes on as long as bytes arrive).
pub(crate) async fn progress_deadline<T>(
    phase: &'static str,
    idle: Duration,
    meter: &guard::Meter,
    fut: impl Future<Output = Result<T, ImapError>>,
) -> Result<T, ImapError> {
    tokio::pin!(fut);
    let mut seen = meter.read();
    loop {
        match tokio::time::timeout(idle, &mut fut).await {
            Ok(r) => return r,
            Err(_) => {
                let now = meter.read();
                if now == seen {
                    return Err(ImapError::Timeout { phase, after: idle });
                }
                seen = now;
            }
        }
    }
}

pub(crate) async fn deadline<T>(
    phase: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<T, ImapError>>,
) -> Result<T, ImapError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| ImapError::Timeout { phase, after })?
}

fn cmd(command: &'static str) -> impl FnOnce(async_imap::error::Error) -> ImapError {
    move |source| match source {
        async_imap::error::Error::Bad(m) | async_imap::error::Error::No(m) if m.contains("BYE") => {
            ImapError::Bye(humanize(&m))
        }
        async_imap::error::Error::No(m) => ImapError::Rejected {
            command,
            status: "NO",
            text: humanize(&m),
        },
        async_imap::error::Error::Bad(m) => ImapError::Rejected {
            command,
            status: "BAD",
            text: humanize(&m),
        },
        source => ImapError::Command {
            command,
            detail: describe(&source),
        },
    }
}

/// Says where on the connection a response could not be read: the bytes received so far (the
/// unreadable response ends at or before this offset).
fn at_byte(e: ImapError, read: u64) -> ImapError {
    match e {
        ImapError::Command { command, detail } if detail.contains("cannot be parsed") => ImapError::Command {
            command,
            detail: format!("{detail}, within the first {read} bytes of the connection"),
        },
        other => other,
    }
}

/// What SELECT reported, with UIDNEXT resolved even when the server omitted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderState {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub exists: u32,
}

/// One message as fetched.
#[derive(Clone, PartialEq, Eq)]
pub struct Fetched {
    pub uid: u32,
    /// The raw RFC 5322 bytes exactly as on the server.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("uid", &self.uid)
            .field("len", &self.body.len())
            .finish()
    }
}

/// How an IDLE (or a poll wait) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// The server reported a change.
    Activity,
    /// The wait reached its maximum length (`idle_refresh` or `poll_interval`).
    Elapsed,
    /// No byte from the server for `idle_silence`.
    Silence,
    /// The caller interrupted the wait (queued work, stop).
    Interrupted,
}

/// A logged-in IMAP session.
#[derive(Debug)]
pub struct Session {
    inner: Inner,
    caps: HashSet<String>,
    timeouts: Timeouts,
    selected: Option<String>,
    /// With OAuth2: when the access token this session logged in with is due for refresh; the
    /// watcher reconnects (between waits) before then.
    token_due: Option<tokio::time::Instant>,
    /// The server announced new mail (EXISTS above `exists`) since the last `take_news`.
    news: bool,
    /// The message count of the selected folder as last reported.
    exists: u32,
    /// Bytes read and the literal limit of this connection's guard.
    meter: std::sync::Arc<guard::Meter>,
}

struct Plain<'a> {
    user: &'a str,
    password: &'a str,
}

impl Authenticator for Plain<'_> {
    type Response = Vec<u8>;
    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        format!("\0{}\0{}", self.user, self.password).into_bytes()
    }
}

impl Session {
    /// Connects to the account's server and logs in.
    pub async fn open(account: &Account) -> Result<Session, ImapError> {
        let t = account.timeouts;
        if account.tls == TlsMode::None && !crate::config::is_loopback(&account.host) {
            // The config refuses this too; a library user building an `Account` by hand gets
            // the same rule.
            return Err(ImapError::TlsConfig(format!(
                "tls = \"none\" is only allowed for loopback hosts, not {}",
                account.host
            )));
        }
        if let Some(text) = connect::auth_gate::closed(account) {
            return Err(ImapError::Auth {
                user: account.user.clone(),
                message: format!("{text} (not tried again: another watch of this account was refused recently)"),
            });
        }
        // Held until the session is logged in (or the attempt failed).
        let _slot = connect::attempt_slot(&account.host).await;
        let tcp = connect::tcp(account).await?;
        let conn = if connect::implicit(account) {
            connect::tls(account, tcp).await?
        } else {
            Conn::Plain(tcp)
        };
        let meter = guard::Meter::new(guard::PRE_LOGIN_LITERAL);
        let mut client = async_imap::Client::new(guard::Guard::new(conn, meter.clone()));
        let mut greeting_caps = greeting(&mut client, t.greeting).await?;
        if account.tls == TlsMode::Starttls {
            if !greeting_caps.is_empty() && !greeting_caps.contains("STARTTLS") {
                return Err(ImapError::NoStarttls);
            }
            deadline("STARTTLS", t.command, async {
                client
                    .run_command_and_check_ok("STARTTLS", None)
                    .await
                    .map_err(|e| match e {
                        async_imap::error::Error::Bad(_) | async_imap::error::Error::No(_) => ImapError::NoStarttls,
                        e => cmd("STARTTLS")(e),
                    })
            })
            .await?;
            let Conn::Plain(tcp) = client.into_inner().into_inner() else {
                return Err(ImapError::TlsConfig("STARTTLS on a TLS stream".into()));
            };
            client = async_imap::Client::new(guard::Guard::new(connect::tls(account, tcp).await?, meter.clone()));
            // Capabilities seen before TLS are not to be trusted (RFC 3501 §6.2.1).
            greeting_caps.clear();
        }
        let (inner, token_due) = match &account.auth {
            Auth::Password(source) => {
                let password = source
                    .resolve_within(t.login)
                    .await
                    .map_err(|source| ImapError::Secret {
                        account: account.name.clone(),
                        source,
                    })?;
                let use_plain = match account.mechanism {
                    AuthMechanism::Plain => true,
                    AuthMechanism::Auto => greeting_caps.contains("LOGINDISABLED"),
                    _ => false,
                };
                let auth_err = |e: async_imap::error::Error| match e {
                    async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m) => ImapError::Auth {
                        user: account.user.clone(),
                        message: humanize(&m),
                    },
                    e => cmd("LOGIN")(e),
                };
                let inner = deadline("login", t.login, async {
                    if use_plain {
                        let auth = Plain {
                            user: &account.user,
                            password: password.expose(),
                        };
                        client.authenticate("PLAIN", auth).await.map_err(|(e, _)| auth_err(e))
                    } else {
                        client
                            .login(&account.user, password.expose())
                            .await
                            .map_err(|(e, _)| auth_err(e))
                    }
                })
                .await;
                let inner = match inner {
                    Ok(inner) => {
                        connect::auth_gate::open(account);
                        inner
                    }
                    Err(e) => {
                        if let ImapError::Auth { message, .. } = &e
                            && e.class() == FailureClass::Auth
                        {
                            connect::auth_gate::close(account, message);
                        }
                        return Err(e);
                    }
                };
                (inner, None)
            }
            Auth::OAuth2(source) => {
                let token = source.token().await.map_err(|e| ImapError::Token {
                    account: account.name.clone(),
                    source: e,
                })?;
                let mechanism = match account.mechanism {
                    AuthMechanism::Xoauth2 => Mechanism::XOAuth2,
                    AuthMechanism::Oauthbearer => Mechanism::OAuthBearer,
                    _ => {
                        if greeting_caps.is_empty() {
                            greeting_caps =
                                deadline("CAPABILITY", t.command, pre_login_capabilities(&mut client)).await?;
                        }
                        if greeting_caps.contains("AUTH=OAUTHBEARER") {
                            Mechanism::OAuthBearer
                        } else {
                            Mechanism::XOAuth2
                        }
                    }
                };
                let host = account.host.trim_start_matches('[').trim_end_matches(']');
                let initial = sasl::initial_response(mechanism, &account.user, host, account.port, &token.access);
                let (authenticator, challenge) = sasl::Authenticator::new(mechanism, initial);
                let inner = deadline("login", t.login, async {
                    client
                        .authenticate(mechanism.name(), authenticator)
                        .await
                        .map_err(|(e, _)| match e {
                            async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m) => {
                                ImapError::OAuth2Refused {
                                    user: account.user.clone(),
                                    mechanism: mechanism.name(),
                                    message: humanize(&m),
                                    challenge: challenge.lock().ok().and_then(|c| c.clone()),
                                }
                            }
                            e => cmd("AUTHENTICATE")(e),
                        })
                })
                .await?;
                (inner, Some(token.refresh_due(source.refresh_at())))
            }
        };
        let mut session = Session {
            inner,
            caps: HashSet::new(),
            timeouts: t,
            selected: None,
            token_due,
            news: false,
            exists: 0,
            meter: meter.clone(),
        };
        // Logged in: messages may come now. The watcher narrows this to its own limit.
        meter.set_max_literal(crate::config::MAX_MESSAGE_SIZE_LIMIT + guard::PRE_LOGIN_LITERAL);
        session.refresh_capabilities().await?;
        Ok(session)
    }

    async fn refresh_capabilities(&mut self) -> Result<(), ImapError> {
        let caps = deadline("CAPABILITY", self.timeouts.command, async {
            self.inner.capabilities().await.map_err(cmd("CAPABILITY"))
        })
        .await?;
        self.caps = caps
            .iter()
            .map(|c| match c {
                async_imap::types::Capability::Imap4rev1 => "IMAP4REV1".to_string(),
                async_imap::types::Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
                async_imap::types::Capability::Atom(a) => a.to_ascii_uppercase(),
            })
            .collect();
        Ok(())
    }

    /// The largest message literal this session accepts from the server (a larger
    /// announcement fails the command before anything is allocated for it).
    pub fn set_max_literal(&self, bytes: u64) {
        self.meter.set_max_literal(bytes);
    }

    /// With OAuth2: when the session's access token is due for refresh.
    pub fn token_due(&self) -> Option<tokio::time::Instant> {
        self.token_due
    }

    /// Whether the server advertised a capability (case-insensitive).
    pub fn has(&self, capability: &str) -> bool {
        self.caps.contains(&capability.to_ascii_uppercase())
    }

    /// The advertised capabilities, sorted.
    pub fn capabilities(&self) -> Vec<String> {
        let mut v: Vec<String> = self.caps.iter().cloned().collect();
        v.sort();
        v
    }

    /// The selected folder, if any.
    pub fn folder(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    /// SELECTs a folder. UIDNEXT comes from SELECT, else STATUS, else the highest UID + 1.
    /// Sent through the status-checking path, so a refusal keeps its response code
    /// (`[NONEXISTENT]` parks the watch, `[UNAVAILABLE]` does not).
    pub async fn select(&mut self, folder: &str) -> Result<FolderState, ImapError> {
        let (mut exists, mut uidvalidity, mut uidnext) = (0u32, None, None);
        let result = self
            .checked_inner(
                "SELECT",
                &format!("SELECT {}", quote(folder)),
                false,
                |resp| match resp {
                    Response::MailboxData(MailboxDatum::Exists(n)) => exists = *n,
                    Response::Data {
                        status: Status::Ok,
                        outcome,
                    } => match outcome.code {
                        Some(ResponseCode::UidValidity(v)) => uidvalidity = Some(v),
                        Some(ResponseCode::UidNext(n)) => uidnext = Some(n),
                        _ => {}
                    },
                    _ => {}
                },
            )
            .await;
        match result {
            Ok(()) => {}
            Err(ImapError::Rejected { text, .. }) => {
                self.selected = None;
                return Err(ImapError::Select {
                    folder: folder.to_string(),
                    message: text,
                });
            }
            Err(e) => return Err(e),
        }
        self.selected = Some(folder.to_string());
        self.exists = exists;
        let uidvalidity = uidvalidity.ok_or_else(|| ImapError::Unexpected {
            command: "SELECT",
            detail: format!("no UIDVALIDITY for {folder:?}"),
        })?;
        let uidnext = match uidnext {
            Some(n) => n,
            None => self.uidnext_fallback(folder).await?,
        };
        Ok(FolderState {
            uidvalidity,
            uidnext,
            exists,
        })
    }

    async fn uidnext_fallback(&mut self, folder: &str) -> Result<u32, ImapError> {
        let mut next = None;
        let status = self
            .checked_inner(
                "STATUS",
                &format!("STATUS {} (UIDNEXT)", quote(folder)),
                false,
                |resp| {
                    if let Response::MailboxData(MailboxDatum::Status { status, .. }) = resp {
                        for item in status {
                            if let async_imap::imap_proto::StatusAttribute::UidNext(n) = item {
                                next = Some(*n);
                            }
                        }
                    }
                },
            )
            .await;
        match status {
            Ok(()) => {}
            // A server that will not STATUS the selected folder: ask for the highest UID.
            Err(ImapError::Rejected { .. }) => {}
            // A deadline or a broken connection: the session is not usable, say so.
            Err(e) => return Err(e),
        }
        if let Some(n) = next {
            return Ok(n);
        }
        if self.exists == 0 {
            return Ok(1);
        }
        // `UID FETCH * (UID)`: one short line, where `UID SEARCH ALL` would be one line with
        // every UID of the folder.
        let mut highest = 0u32;
        self.checked_inner("UID FETCH", "UID FETCH * (UID)", false, |resp| {
            if let Response::Fetch(_, attrs) = resp {
                for a in attrs {
                    if let AttributeValue::Uid(u) = a {
                        highest = highest.max(*u);
                    }
                }
            }
        })
        .await?;
        Ok(highest.saturating_add(1))
    }

    /// `UID SEARCH <query>`, ascending. Fails on NO/BAD (async-imap's own search would return
    /// an empty set).
    pub async fn search(&mut self, query: &str) -> Result<Vec<u32>, ImapError> {
        let mut v = Vec::new();
        self.checked("UID SEARCH", &format!("UID SEARCH {query}"), |resp| {
            if let Response::MailboxData(MailboxDatum::Search(ids)) = resp {
                v.extend(ids.iter().copied());
            }
        })
        .await?;
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// The UIDs above `last_uid` with their sizes (`None` when the server gave none):
    /// `UID FETCH last+1:* (UID RFC822.SIZE)`. The caller filters: `*` may name a message
    /// below `last_uid + 1`.
    pub async fn list_above(&mut self, last_uid: u32) -> Result<Vec<(u32, Option<u32>)>, ImapError> {
        let from = last_uid.saturating_add(1);
        let mut out = Vec::new();
        self.checked("UID FETCH", &format!("UID FETCH {from}:* (UID RFC822.SIZE)"), |resp| {
            if let Response::Fetch(_, attrs) = resp
                && let Some(item) = listed_item(attrs)
            {
                out.push(item);
            }
        })
        .await?;
        Ok(out)
    }

    /// Fetches whole messages by UID with `BODY.PEEK[]`, in ascending UID order. Messages the
    /// server no longer has are simply absent from the result. A UID the server sends twice,
    /// or one not asked for, is dropped as it arrives; more than `max_bytes` of bodies in all
    /// (a server lying about sizes) fails the fetch instead of growing without bound.
    pub async fn fetch(&mut self, uids: &[u32], max_bytes: u64) -> Result<Vec<Fetched>, ImapError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut total = 0u64;
        let mut over = false;
        let command = format!("UID FETCH {} (UID BODY.PEEK[])", sequence_set(uids));
        self.checked("UID FETCH", &command, |resp| {
            let Response::Fetch(_, attrs) = resp else { return };
            let (uid, body) = fetched_item(attrs);
            if let (Some(uid), Some(body)) = (uid.filter(|u| wanted.contains(u)), body) {
                if over || !seen.insert(uid) {
                    return;
                }
                total = total.saturating_add(body.len() as u64);
                if total > max_bytes {
                    over = true;
                    out.clear();
                    return;
                }
                out.push(Fetched {
                    uid,
                    body: body.to_vec(),
                });
            }
        })
        .await?;
        if over {
            return Err(ImapError::Unexpected {
                command: "UID FETCH",
                detail: format!(
                    "the server sent more than {max_bytes} bytes of message bodies for {} message(s)",
                    uids.len()
                ),
            });
        }
        out.sort_by_key(|f| f.uid);
        Ok(out)
    }

    /// Fetches one message in pieces of at most `chunk` bytes (`BODY.PEEK[]<offset.chunk>`)
    /// and writes each to `out` as it arrives, so memory holds one piece whatever the
    /// message's size, and each piece is a command with its own inactivity deadline. Returns
    /// the message's length, or `None` when the server does not have it (any more). A piece
    /// larger than asked is refused before it is read (the literal limit); more than
    /// `max_bytes` in all fails the fetch.
    pub async fn fetch_into(
        &mut self,
        uid: u32,
        chunk: u32,
        max_bytes: u64,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<Option<u64>, ImapError> {
        // Never ask for more than one byte past the limit.
        let chunk = chunk.clamp(1, u32::try_from(max_bytes.saturating_add(1)).unwrap_or(u32::MAX));
        self.set_max_literal(u64::from(chunk));
        let mut offset = 0u64;
        loop {
            let command = format!("UID FETCH {uid} (UID BODY.PEEK[]<{offset}.{chunk}>)");
            let mut got: Option<u64> = None;
            let mut problem: Option<String> = None;
            self.checked("UID FETCH", &command, |resp| {
                let Response::Fetch(_, attrs) = resp else { return };
                let Some((origin, data)) = partial_item(attrs, uid) else {
                    return;
                };
                if got.is_some() || problem.is_some() {
                    return; // a repeated answer: the first one counts
                }
                if origin.is_some_and(|o| u64::from(o) != offset) {
                    problem = Some(format!(
                        "the server answered a fetch from byte {offset} with bytes from {}",
                        origin.unwrap_or(0)
                    ));
                    return;
                }
                match out.write_all(data) {
                    Ok(()) => got = Some(data.len() as u64),
                    Err(e) => problem = Some(format!("cannot write the spool file: {e}")),
                }
            })
            .await?;
            if let Some(detail) = problem {
                return Err(ImapError::Unexpected {
                    command: "UID FETCH",
                    detail,
                });
            }
            let Some(n) = got else {
                // Gone before the first piece (or expunged while being fetched).
                return Ok(None);
            };
            offset = offset.saturating_add(n);
            if offset > max_bytes {
                return Err(ImapError::Unexpected {
                    command: "UID FETCH",
                    detail: format!("uid {uid} is larger than the limit of {max_bytes} bytes"),
                });
            }
            if n < u64::from(chunk) {
                return Ok(Some(offset));
            }
        }
    }

    /// Runs a command, hands every untagged response to `each`, and fails unless the tagged
    /// status is OK. async-imap's own FETCH/STORE/EXPUNGE streams end at the tagged response
    /// whatever its status, so a NO or BAD (throttling, for one) would look like success.
    async fn checked(
        &mut self,
        phase: &'static str,
        command: &str,
        each: impl FnMut(&Response<'_>),
    ) -> Result<(), ImapError> {
        self.checked_inner(phase, command, true, each).await
    }

    /// As [`Session::checked`]; `news` says whether an EXISTS above the known count counts as
    /// new mail (not for SELECT, whose EXISTS is the folder's size).
    async fn checked_inner(
        &mut self,
        phase: &'static str,
        command: &str,
        news: bool,
        mut each: impl FnMut(&Response<'_>),
    ) -> Result<(), ImapError> {
        let t = self.timeouts.command;
        let inner = &mut self.inner;
        let saw_news = &mut self.news;
        let known = &mut self.exists;
        let meter = self.meter.clone();
        let counter = self.meter.clone();
        progress_deadline(phase, t, &meter, async move {
            let id = inner.run_command(command).await.map_err(cmd(phase))?;
            loop {
                let resp = inner
                    .read_response()
                    .await
                    .map_err(|e| at_byte(cmd(phase)(e.into()), counter.read()))?
                    .ok_or_else(|| ImapError::Bye(format!("connection closed during {phase}")))?;
                match resp.parsed() {
                    Response::Done { tag, status, outcome } if *tag == id => {
                        let text = outcome_text(outcome);
                        return match status {
                            Status::Ok => Ok(()),
                            _ if text.contains("BYE") => Err(ImapError::Bye(text)),
                            Status::No => Err(ImapError::Rejected {
                                command: phase,
                                status: "NO",
                                text,
                            }),
                            _ => Err(ImapError::Rejected {
                                command: phase,
                                status: "BAD",
                                text,
                            }),
                        };
                    }
                    Response::Data {
                        status: Status::Bye,
                        outcome,
                    } => {
                        return Err(ImapError::Bye(clip(
                            outcome.information.as_deref().unwrap_or("").to_string(),
                            MAX_TEXT,
                        )));
                    }
                    Response::MailboxData(MailboxDatum::Exists(n)) if news => {
                        // Only a count above the one we know is news: a server that repeats
                        // an unchanged EXISTS must not make the watcher list again and again.
                        if *n > *known {
                            *saw_news = true;
                        }
                        *known = *n;
                    }
                    Response::Expunge(_) if news => *known = known.saturating_sub(1),
                    Response::MailboxData(MailboxDatum::Recent(_)) if news => {}
                    other => each(other),
                }
            }
        })
        .await
    }

    /// Adds flags to messages (`UID STORE +FLAGS.SILENT`).
    pub async fn add_flags(&mut self, uids: &[u32], flags: &str) -> Result<(), ImapError> {
        let command = format!("UID STORE {} +FLAGS.SILENT ({flags})", sequence_set(uids));
        self.checked("UID STORE", &command, |_| {}).await
    }

    /// Removes messages: `\Deleted`, then `UID EXPUNGE` (UIDPLUS). Without UIDPLUS the
    /// messages are only flagged `\Deleted`: a bare `EXPUNGE` would also remove every other
    /// message someone marked `\Deleted`, including ones inboxd has not delivered yet.
    pub async fn delete(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        self.add_flags(uids, "\\Deleted").await?;
        if self.has("UIDPLUS") {
            self.checked("UID EXPUNGE", &format!("UID EXPUNGE {}", sequence_set(uids)), |_| {})
                .await
        } else {
            Ok(())
        }
    }

    /// Moves messages to `folder`: `UID MOVE` (RFC 6851) or `UID COPY` + delete (which, without
    /// UIDPLUS, leaves the originals flagged `\Deleted`).
    pub async fn move_to(&mut self, uids: &[u32], folder: &str) -> Result<(), ImapError> {
        let (set, quoted) = (sequence_set(uids), quote(folder));
        if self.has("MOVE") {
            return self
                .checked("UID MOVE", &format!("UID MOVE {set} {quoted}"), |_| {})
                .await;
        }
        self.checked("UID COPY", &format!("UID COPY {set} {quoted}"), |_| {})
            .await?;
        self.delete(uids).await
    }

    /// `APPEND` a message to a folder (used by tests, the demo and the benchmark).
    pub async fn append(&mut self, folder: &str, message: &[u8]) -> Result<(), ImapError> {
        let t = self.timeouts.command;
        deadline("APPEND", t, async {
            self.inner
                .append(folder, None, None, message)
                .await
                .map_err(cmd("APPEND"))
        })
        .await
    }

    /// `NOOP`: a liveness probe that also lets the server report changes.
    pub async fn noop(&mut self) -> Result<(), ImapError> {
        let t = self.timeouts.command;
        deadline("NOOP", t, async { self.inner.noop().await.map_err(cmd("NOOP")) }).await?;
        self.drain_unsolicited();
        Ok(())
    }

    /// Runs a raw command and waits for its tagged OK (for commands this API lacks).
    pub async fn run(&mut self, command: &str) -> Result<(), ImapError> {
        let t = self.timeouts.command;
        deadline("command", t, async {
            self.inner
                .run_command_and_check_ok(command)
                .await
                .map_err(cmd("command"))
        })
        .await
    }

    /// Drops unsolicited responses collected so far; returns whether any announced new mail
    /// (EXISTS or RECENT). The caller resyncs by UID range anyway: this is only a hint.
    pub fn drain_unsolicited(&mut self) -> bool {
        let mut news = false;
        // Bounded: at most what the library's channel holds (it drops beyond 100).
        while let Ok(r) = self.inner.unsolicited_responses.try_recv() {
            match r {
                async_imap::types::UnsolicitedResponse::Exists(n) => {
                    news |= n > self.exists;
                    self.exists = n;
                }
                async_imap::types::UnsolicitedResponse::Expunge(_) => self.exists = self.exists.saturating_sub(1),
                _ => {}
            }
        }
        self.news |= news;
        news
    }

    /// Whether the server announced new mail (EXISTS/RECENT, in any response) since the last
    /// call. A message announced in the answer to some other command would not be announced
    /// again in the next IDLE, so the watcher checks this before it waits.
    pub fn take_news(&mut self) -> bool {
        self.drain_unsolicited();
        std::mem::take(&mut self.news)
    }

    /// IDLE (RFC 2177) for at most `max`; leaves early on server activity, silence longer
    /// than `idle_silence`, or when `interrupt` completes. Ends with DONE under its deadline.
    pub async fn idle(
        self,
        max: Duration,
        interrupt: impl Future<Output = ()>,
    ) -> Result<(Session, WaitEnd), ImapError> {
        let Session {
            inner,
            caps,
            timeouts,
            selected,
            token_due,
            news,
            exists,
            meter,
        } = self;
        let mut handle = inner.idle();
        deadline("IDLE", timeouts.command, async {
            handle.init().await.map_err(cmd("IDLE"))
        })
        .await?;
        let end = {
            let (wait, stop) = handle.wait_with_timeout(timeouts.idle_silence);
            tokio::pin!(wait);
            tokio::pin!(interrupt);
            let mut stop = Some(stop);
            let mut reason = None;
            let sleep = tokio::time::sleep(max);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    r = &mut wait => {
                        let r = r.map_err(cmd("IDLE"))?;
                        break match (reason, r) {
                            (Some(reason), _) => reason,
                            (None, IdleResponse::Timeout) => WaitEnd::Silence,
                            (None, IdleResponse::ManualInterrupt) => {
                                return Err(ImapError::Bye("connection closed during IDLE".into()));
                            }
                            (None, IdleResponse::NewData(data)) => {
                                if let Response::Data { status: Status::Bye, outcome } = data.parsed() {
                                    return Err(ImapError::Bye(outcome.information.as_deref().unwrap_or("").to_string()));
                                }
                                WaitEnd::Activity
                            }
                        };
                    }
                    _ = &mut sleep, if reason.is_none() => {
                        reason = Some(WaitEnd::Elapsed);
                        stop.take();
                    }
                    _ = &mut interrupt, if reason.is_none() => {
                        reason = Some(WaitEnd::Interrupted);
                        stop.take();
                    }
                }
            }
        };
        let inner = deadline("DONE", timeouts.done, async {
            handle.done().await.map_err(cmd("DONE"))
        })
        .await?;
        let mut session = Session {
            inner,
            caps,
            timeouts,
            selected,
            token_due,
            news,
            exists,
            meter,
        };
        session.drain_unsolicited();
        Ok((session, end))
    }

    /// LOGOUT under a deadline; errors are ignored, the connection is closed either way.
    pub async fn logout(mut self) {
        let t = self.timeouts.done;
        let _ = tokio::time::timeout(t, self.inner.logout()).await;
    }
}

/// UID and size from one answer to `UID FETCH n:* (UID RFC822.SIZE)`.
fn listed_item(attrs: &[AttributeValue<'_>]) -> Option<(u32, Option<u32>)> {
    let uid = attrs
        .iter()
        .find_map(|a| if let AttributeValue::Uid(u) = a { Some(*u) } else { None })?;
    let size = attrs.iter().find_map(|a| {
        if let AttributeValue::Rfc822Size(n) = a {
            Some(*n)
        } else {
            None
        }
    });
    Some((uid, size))
}

/// UID and whole body from one answer to `UID FETCH set (UID BODY.PEEK[])`.
fn fetched_item<'a>(attrs: &'a [AttributeValue<'a>]) -> (Option<u32>, Option<&'a [u8]>) {
    let uid = attrs
        .iter()
        .find_map(|a| if let AttributeValue::Uid(u) = a { Some(*u) } else { None });
    let body = attrs.iter().find_map(|a| match a {
        AttributeValue::BodySection {
            section: None,
            data: Some(d),
            ..
        } => Some(d.as_ref()),
        AttributeValue::Rfc822(Some(d)) => Some(d.as_ref()),
        _ => None,
    });
    (uid, body)
}

/// Origin and data of the whole-message section from one answer to
/// `UID FETCH uid (UID BODY.PEEK[]<offset.length>)`, if it is for `uid`. A NIL section is
/// empty data (RFC 3501: a start past the end gives an empty string).
fn partial_item<'a>(attrs: &'a [AttributeValue<'a>], uid: u32) -> Option<(Option<u32>, &'a [u8])> {
    let (got, _) = fetched_item(attrs);
    if got != Some(uid) {
        return None;
    }
    attrs.iter().find_map(|a| match a {
        AttributeValue::BodySection {
            section: None,
            index,
            data,
        } => Some((*index, data.as_deref().unwrap_or(&[]))),
        _ => None,
    })
}

/// A status response's text with its code first (`[TRYCREATE] Mailbox doesn't exist`),
/// at most [`MAX_TEXT`] bytes.
fn outcome_text(outcome: &async_imap::imap_proto::Outcome<'_>) -> String {
    let info = outcome.information.as_deref().unwrap_or("");
    let text = match &outcome.code {
        Some(code) => format!("[{}] {info}", code_name(code)),
        None => info.to_string(),
    };
    clip(text, MAX_TEXT)
}

/// An IMAP quoted string (RFC 3501 §4.3).
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `CAPABILITY` before login, for servers whose greeting does not list them (and after
/// STARTTLS, where earlier ones must not be trusted).
async fn pre_login_capabilities(
    client: &mut async_imap::Client<guard::Guard<Conn>>,
) -> Result<HashSet<String>, ImapError> {
    // Bounded: a server that floods untagged lines before its CAPABILITY gets them dropped,
    // not stored.
    let (tx, rx) = async_channel::bounded(32);
    client
        .run_command_and_check_ok("CAPABILITY", Some(tx))
        .await
        .map_err(cmd("CAPABILITY"))?;
    let mut caps = HashSet::new();
    while let Ok(r) = rx.try_recv() {
        if let async_imap::types::UnsolicitedResponse::Other(data) = r
            && let Response::Capabilities(list) = data.parsed()
        {
            caps.extend(list.iter().map(capability_name));
        }
    }
    Ok(caps)
}

fn capability_name(c: &async_imap::imap_proto::Capability<'_>) -> String {
    match c {
        async_imap::imap_proto::Capability::Imap4rev1 => "IMAP4REV1".into(),
        async_imap::imap_proto::Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
        async_imap::imap_proto::Capability::Atom(a) => a.to_ascii_uppercase(),
    }
}

async fn greeting<T>(client: &mut async_imap::Client<T>, after: Duration) -> Result<HashSet<String>, ImapError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    deadline("greeting", after, async {
        let resp = client
            .read_response()
            .await
            .map_err(|e| cmd("greeting")(e.into()))?
            .ok_or_else(|| ImapError::Refused("connection closed before the greeting".into()))?;
        match resp.parsed() {
            Response::Data {
                status: Status::Ok | Status::PreAuth,
                outcome,
            } => {
                let mut caps = HashSet::new();
                if let Some(ResponseCode::Capabilities(list)) = &outcome.code {
                    for c in list {
                        caps.insert(match c {
                            async_imap::imap_proto::Capability::Imap4rev1 => "IMAP4REV1".into(),
                            async_imap::imap_proto::Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
                            async_imap::imap_proto::Capability::Atom(a) => a.to_ascii_uppercase(),
                        });
                    }
                }
                Ok(caps)
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => Err(ImapError::Refused(
                outcome.information.as_deref().unwrap_or("BYE").to_string(),
            )),
            other => Err(ImapError::Unexpected {
                command: "greeting",
                detail: format!("{other:?}"),
            }),
        }
    })
    .await
}
