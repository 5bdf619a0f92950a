//! The message as JSON: `inboxd.message.v1`, one schema for every target (`schema/` holds the
//! JSON Schema; the README documents it).
//!
//! Built from the raw bytes with mail-parser, under `catch_unwind`, and never fails: a message
//! the parser cannot read, or only partly, still gives a valid envelope with the fields that
//! could be read (`parse.complete` false and a short reason). Text and HTML bodies are decoded
//! to UTF-8; attachments are described (name, type, size, SHA-256) and their content is
//! included (base64) only when configured and under a size cap. A message larger than
//! [`JsonOptions::parse_max`] is described from its header block alone, so a 1 GB message does
//! not become a 1 GB parse in memory.

use base64::Engine;
use serde::Serialize;

use crate::handler::{Body, Message};

/// The schema name, also the value of the `schema` field.
pub const SCHEMA: &str = "inboxd.message.v1";

/// What an attachment's content becomes in the envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Attachments {
    /// Name, type, size and digest, no content.
    #[default]
    Metadata,
    /// Also the content, base64, for attachments up to `attachment_max` bytes.
    Inline,
    /// No attachment entries at all.
    Omit,
}

/// How the envelope is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonOptions {
    pub attachments: Attachments,
    /// Attachments larger than this are metadata only, whatever `attachments` says.
    pub attachment_max: u64,
    /// Include the raw message, base64 (`raw` field).
    pub raw: bool,
    /// Messages larger than this are described from their header block only.
    pub parse_max: u64,
}

impl Default for JsonOptions {
    fn default() -> JsonOptions {
        JsonOptions {
            attachments: Attachments::Metadata,
            attachment_max: 1 << 20,
            raw: false,
            parse_max: 32 << 20,
        }
    }
}

/// A name and an address, as written (`"Ann Example" <ann@example.com>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Headers {
    pub subject: Option<String>,
    pub from: Vec<Mailbox>,
    pub sender: Vec<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    /// RFC 3339.
    pub date: Option<String>,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    pub list_id: Option<String>,
}

/// One header field as it is in the message (unfolded value, undecoded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RawHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attachment {
    pub filename: Option<String>,
    pub content_type: String,
    pub disposition: Option<String>,
    pub content_id: Option<String>,
    pub size: u64,
    pub sha256: String,
    /// Base64, only with `attachments = "inline"` and at most `attachment_max` bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Parse {
    /// Every part was read; false when the parser gave up, panicked, or only the header block
    /// was read (a message above `parse_max`).
    pub complete: bool,
    pub note: Option<String>,
}

/// `inboxd.message.v1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Envelope {
    pub schema: &'static str,
    pub key: String,
    pub account: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub message_id: Option<String>,
    pub size: u64,
    /// The server's INTERNALDATE, RFC 3339.
    pub internal_date: Option<String>,
    pub flags: Vec<String>,
    pub headers: Headers,
    pub raw_headers: Vec<RawHeader>,
    pub text: Option<String>,
    pub html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Vec<Attachment>>,
    /// The raw message, base64, only with `raw = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Gmail's ids (decimal strings: they exceed JavaScript's exact integers) and labels,
    /// where the server offers `X-GM-EXT-1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gmail: Option<GmailMeta>,
    pub parse: Parse,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GmailMeta {
    pub msgid: String,
    pub thrid: String,
    pub labels: Vec<String>,
}

impl Envelope {
    /// Builds the envelope of a message; reads a spooled body from its file. Never fails on
    /// the message's bytes; fails only when a spool file cannot be read.
    pub fn build(message: &Message<'_>, options: &JsonOptions) -> std::io::Result<Envelope> {
        let size = message.body.len();
        let whole = size <= options.parse_max;
        let bytes: std::borrow::Cow<'_, [u8]> = match message.body {
            Body::Bytes(b) => b.into(),
            _ if whole => message.body.to_vec()?.into(),
            _ => {
                use std::io::Read;
                let mut head = Vec::new();
                message
                    .body
                    .reader()?
                    .take(crate::message::IDENTITY_HEAD as u64)
                    .read_to_end(&mut head)?;
                head.into()
            }
        };
        let mut env = Envelope {
            schema: SCHEMA,
            key: message.key.to_string(),
            account: message.account.to_string(),
            folder: message.folder.to_string(),
            uidvalidity: message.uidvalidity,
            uid: message.uid,
            message_id: message.message_id.map(str::to_string),
            size,
            internal_date: message.internal_date.and_then(internal_date_rfc3339),
            flags: message.flags.to_vec(),
            headers: Headers::default(),
            raw_headers: Vec::new(),
            text: None,
            html: None,
            attachments: (options.attachments != Attachments::Omit).then(Vec::new),
            raw: None,
            gmail: message.gmail.map(|g| GmailMeta {
                msgid: g.msgid.to_string(),
                thrid: g.thrid.to_string(),
                labels: g.labels.clone(),
            }),
            parse: Parse {
                complete: true,
                note: None,
            },
        };
        let input: &[u8] = if whole {
            &bytes
        } else {
            crate::message::header_block(&bytes)
        };
        let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fill(&mut env, input, options, whole)));
        match filled {
            Ok(Ok(())) => {}
            Ok(Err(note)) => {
                env.parse = Parse {
                    complete: false,
                    note: Some(note),
                }
            }
            Err(_) => {
                // What was filled before the panic may be half-done: keep only what cannot be.
                env.headers = Headers::default();
                env.text = None;
                env.html = None;
                env.attachments = (options.attachments != Attachments::Omit).then(Vec::new);
                env.raw_headers = raw_headers(crate::message::header_block(&bytes));
                env.parse = Parse {
                    complete: false,
                    note: Some("the MIME parser failed on this message; raw header fields only".into()),
                };
            }
        }
        if !whole && env.parse.complete {
            env.parse = Parse {
                complete: false,
                note: Some(format!(
                    "the message is {size} bytes, above parse_max ({} bytes): header fields only",
                    options.parse_max
                )),
            };
        }
        if options.raw && whole {
            env.raw = Some(base64::engine::general_purpose::STANDARD.encode(&bytes));
        }
        Ok(env)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn fill(env: &mut Envelope, raw: &[u8], options: &JsonOptions, whole: bool) -> Result<(), String> {
    env.raw_headers = raw_headers(crate::message::header_block(raw));
    let Some(m) = mail_parser::MessageParser::default().parse(raw) else {
        return Err("the message could not be parsed as MIME; raw header fields only".into());
    };
    let h = &mut env.headers;
    h.subject = m.subject().map(str::to_string);
    h.from = mailboxes(m.from());
    h.sender = mailboxes(m.sender());
    h.reply_to = mailboxes(m.reply_to());
    h.to = mailboxes(m.to());
    h.cc = mailboxes(m.cc());
    h.bcc = mailboxes(m.bcc());
    h.date = m.date().map(|d| d.to_rfc3339());
    h.in_reply_to = texts(m.in_reply_to());
    h.references = texts(m.references());
    h.list_id = texts(m.list_id()).into_iter().next();
    if !whole {
        return Ok(());
    }
    env.text = m.body_text(0).map(|t| t.into_owned());
    // mail-parser makes HTML out of a text body when there is none; only a real HTML part
    // counts here (text, by contrast, is made from the HTML when there is no text part).
    let real_html = m.html_part(0).is_some_and(|p| p.is_text_html());
    env.html = real_html.then(|| m.body_html(0).map(|t| t.into_owned())).flatten();
    if let Some(list) = env.attachments.as_mut() {
        use mail_parser::MimeHeaders;
        for part in m.attachments() {
            let contents = part.contents();
            let size = contents.len() as u64;
            let inline = options.attachments == Attachments::Inline && size <= options.attachment_max;
            list.push(Attachment {
                filename: part.attachment_name().map(str::to_string),
                content_type: part.content_type().map_or_else(
                    || "application/octet-stream".to_string(),
                    |c| match c.subtype() {
                        Some(sub) => format!("{}/{}", c.ctype(), sub),
                        None => c.ctype().to_string(),
                    },
                ),
                disposition: part.content_disposition().map(|d| d.ctype().to_string()),
                content_id: part.content_id().map(str::to_string),
                size,
                sha256: hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, contents).as_ref()),
                content: inline.then(|| base64::engine::general_purpose::STANDARD.encode(contents)),
            });
        }
    }
    Ok(())
}

pub(crate) fn mailboxes(a: Option<&mail_parser::Address<'_>>) -> Vec<Mailbox> {
    let one = |x: &mail_parser::Addr<'_>| Mailbox {
        name: x.name.as_ref().map(|n| n.to_string()),
        address: x.address.as_ref().map(|n| n.to_string()),
    };
    match a {
        None => Vec::new(),
        Some(mail_parser::Address::List(list)) => list.iter().map(one).collect(),
        Some(mail_parser::Address::Group(groups)) => groups.iter().flat_map(|g| g.addresses.iter().map(one)).collect(),
    }
}

fn texts(v: &mail_parser::HeaderValue<'_>) -> Vec<String> {
    match v {
        mail_parser::HeaderValue::Text(t) => vec![t.to_string()],
        mail_parser::HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
        // List-Id and the like are parsed as addresses (`<support.example.com>`).
        mail_parser::HeaderValue::Address(a) => mailboxes(Some(a))
            .into_iter()
            .filter_map(|m| m.address.or(m.name))
            .collect(),
        _ => Vec::new(),
    }
}

/// Every header field of a header block: name and unfolded value, as (lossy) UTF-8.
pub(crate) fn raw_headers(block: &[u8]) -> Vec<RawHeader> {
    let text = String::from_utf8_lossy(block);
    let mut out: Vec<RawHeader> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.value.push(' ');
                last.value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            out.push(RawHeader {
                name: name.trim().to_string(),
                value: value.trim().to_string(),
            });
        }
    }
    out
}

/// IMAP's INTERNALDATE (`17-Jul-1996 02:44:25 -0700`) as RFC 3339.
/// IMAP's INTERNALDATE as Unix seconds.
pub(crate) fn internal_date_unix(s: &str) -> Option<i64> {
    mail_parser::DateTime::parse_rfc3339(&internal_date_rfc3339(s)?).map(|d| d.to_timestamp())
}

fn internal_date_rfc3339(s: &str) -> Option<String> {
    let s = s.trim().trim_matches('"').trim();
    let (date, rest) = s.split_once(' ')?;
    let (time, zone) = rest.trim().split_once(' ')?;
    let mut d = date.trim().split('-');
    let day: u32 = d.next()?.trim().parse().ok()?;
    let month = match d.next()?.to_ascii_lowercase().as_str() {
        "jan" => 1,
        "feb" => 2,
        "mar" => 3,
        "apr" => 4,
        "may" => 5,
        "jun" => 6,
        "jul" => 7,
        "aug" => 8,
        "sep" => 9,
        "oct" => 10,
        "nov" => 11,
        "dec" => 12,
        _ => return None,
    };
    let year: u32 = d.next()?.parse().ok()?;
    let zone = zone.trim();
    let valid_zone = zone.len() == 5 && zone.starts_with(['+', '-']) && zone[1..].bytes().all(|b| b.is_ascii_digit());
    let valid_time = time.len() == 8
        && time.bytes().enumerate().all(|(i, b)| {
            if i == 2 || i == 5 {
                b == b':'
            } else {
                b.is_ascii_digit()
            }
        });
    if !(valid_zone && valid_time && (1..=31).contains(&day)) {
        return None;
    }
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{time}{}:{}",
        &zone[..3],
        &zone[3..]
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &[u8]) -> Message<'_> {
        Message {
            account: "a",
            folder: "INBOX",
            uidvalidity: 7,
            uid: 3,
            key: "v1-k-7-3",
            message_id: Some("x@y"),
            internal_date: Some("17-Jul-1996 02:44:25 -0700"),
            flags: &[],
            gmail: None,
            body: Body::Bytes(body),
        }
    }

    #[test]
    fn a_multipart_message_becomes_a_complete_envelope() {
        let raw = b"From: \"Ann Example\" <ann@example.com>\r\nTo: bob@example.com, \"C\" <c@example.com>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nDate: Thu, 26 Nov 2026 07:00:00 +0000\r\nMessage-ID: <x@y>\r\nIn-Reply-To: <p@y>\r\nList-Id: <support.example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nGr\xfc\xdfe\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n";
        let env = Envelope::build(
            &msg(raw),
            &JsonOptions {
                attachments: Attachments::Inline,
                ..JsonOptions::default()
            },
        )
        .unwrap();
        assert!(env.parse.complete, "{:?}", env.parse);
        assert_eq!(env.headers.subject.as_deref(), Some("Grüße"));
        assert_eq!(
            env.headers.from,
            vec![Mailbox {
                name: Some("Ann Example".into()),
                address: Some("ann@example.com".into())
            }]
        );
        assert_eq!(env.headers.to.len(), 2);
        assert_eq!(env.headers.date.as_deref(), Some("2026-11-26T07:00:00Z"));
        assert_eq!(env.headers.in_reply_to, vec!["p@y".to_string()]);
        assert_eq!(env.headers.list_id.as_deref(), Some("support.example.com"));
        assert_eq!(env.text.as_deref().map(str::trim), Some("Grüße"));
        assert_eq!(env.html, None, "no HTML part: no HTML made up from the text");
        let a = &env.attachments.as_ref().unwrap()[0];
        assert_eq!(a.filename.as_deref(), Some("a.pdf"));
        assert_eq!(a.content_type, "application/pdf");
        assert_eq!(a.size, 5);
        assert_eq!(a.content.as_deref(), Some("JVBERi0="));
        assert_eq!(env.internal_date.as_deref(), Some("1996-07-17T02:44:25-07:00"));
        assert!(
            env.raw_headers
                .iter()
                .any(|h| h.name == "Subject" && h.value.starts_with("=?utf-8?"))
        );
        let json: serde_json::Value = serde_json::from_slice(&env.to_json()).unwrap();
        assert_eq!(json["schema"], "inboxd.message.v1");
        assert!(json.get("raw").is_none());
    }

    #[test]
    fn metadata_only_and_caps() {
        let raw = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=big.bin\r\n\r\n0123456789\r\n--b--\r\n";
        let meta = Envelope::build(&msg(raw), &JsonOptions::default()).unwrap();
        assert!(meta.attachments.as_ref().unwrap()[0].content.is_none());
        let capped = Envelope::build(
            &msg(raw),
            &JsonOptions {
                attachments: Attachments::Inline,
                attachment_max: 5,
                raw: true,
                ..JsonOptions::default()
            },
        )
        .unwrap();
        assert!(capped.attachments.as_ref().unwrap()[0].content.is_none());
        assert!(capped.raw.is_some());
        let omitted = Envelope::build(
            &msg(raw),
            &JsonOptions {
                attachments: Attachments::Omit,
                ..JsonOptions::default()
            },
        )
        .unwrap();
        assert!(omitted.attachments.is_none());
    }

    #[test]
    fn above_parse_max_the_header_block_alone_is_read() {
        let mut raw = b"Subject: big\r\nFrom: a@b\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'x', 10_000));
        let env = Envelope::build(
            &msg(&raw),
            &JsonOptions {
                parse_max: 1_000,
                ..JsonOptions::default()
            },
        )
        .unwrap();
        assert_eq!(env.headers.subject.as_deref(), Some("big"));
        assert!(!env.parse.complete && env.text.is_none());
        assert_eq!(env.size, raw.len() as u64);
    }

    #[test]
    fn internal_dates_as_unix_seconds() {
        assert_eq!(internal_date_unix("17-Jul-1996 02:44:25 -0700"), Some(837_596_665));
        assert_eq!(internal_date_unix("30-Nov-2026 10:42:52 +0000"), Some(1_796_035_372));
        assert_eq!(internal_date_unix("nonsense"), None);
    }

    #[test]
    fn internal_dates() {
        assert_eq!(
            internal_date_rfc3339("\" 1-Jan-2026 00:00:01 +0100\"").as_deref(),
            Some("2026-01-01T00:00:01+01:00")
        );
        assert_eq!(internal_date_rfc3339("garbage"), None);
        assert_eq!(internal_date_rfc3339("99-Foo-2026 00:00:01 +0100"), None);
    }
}
