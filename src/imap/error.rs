//! `ImapError` and the content-free, capped descriptions of what the server said.

use super::*;

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

/// A server's refusal with what it means where that is not obvious: the account's session
/// limit (Gmail, Dovecot), or its provider's bandwidth limits (Gmail).
pub(crate) fn explained(text: String) -> String {
    if inboxd_core::failure::too_many_connections(&text) {
        format!(
            "{text} (the account holds as many sessions as the server allows: set the account's max_connections below that limit, e.g. 15 for Gmail)"
        )
    } else if inboxd_core::failure::over_limit(&text) {
        format!(
            "{text} (the account is over its provider's IMAP bandwidth or command limits, such as Gmail's 2,500 MB of downloads a day, shared by every IMAP client of the account: inboxd tries again every {} minutes until they lift)",
            inboxd_core::failure::OVER_LIMIT_WAIT.as_secs() / 60
        )
    } else {
        text
    }
}

/// Longest server text kept in an error (it reaches logs, `Health` and events).
pub(super) const MAX_TEXT: usize = 1024;

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
pub(super) fn humanize(m: &str) -> String {
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
pub(super) fn code_name_from_debug(debug: &str) -> String {
    match debug {
        "ReadOnly" => "READ-ONLY".into(),
        "ReadWrite" => "READ-WRITE".into(),
        "Capabilities" => "CAPABILITY".into(),
        other => other.to_ascii_uppercase(),
    }
}

/// The wire name of a response code.
pub(super) fn code_name(code: &ResponseCode<'_>) -> &'static str {
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
pub(super) fn describe(e: &async_imap::error::Error) -> String {
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

pub(super) fn cmd(command: &'static str) -> impl FnOnce(async_imap::error::Error) -> ImapError {
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
pub(super) fn at_byte(e: ImapError, read: u64) -> ImapError {
    match e {
        ImapError::Command { command, detail } if detail.contains("cannot be parsed") => ImapError::Command {
            command,
            detail: format!("{detail}, within the first {read} bytes of the connection"),
        },
        other => other,
    }
}

/// A status response's text with its code first (`[TRYCREATE] Mailbox doesn't exist`),
/// at most [`MAX_TEXT`] bytes.
pub(super) fn outcome_text(outcome: &async_imap::imap_proto::Outcome<'_>) -> String {
    let info = outcome.information.as_deref().unwrap_or("");
    let text = match &outcome.code {
        Some(code) => format!("[{}] {info}", code_name(code)),
        None => info.to_string(),
    };
    clip(text, MAX_TEXT)
}
