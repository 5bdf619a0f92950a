//! Routing and fan-out: which targets a message goes to, and delivering it to all of them.
//!
//! [`Routing::decide`] is pure: a message's [`Facts`] in, a [`Decision`] out. The rules are
//! tried in order and the first that matches wins; a message no rule matches goes where the
//! watch's `else` says (targets, or `skip`). A watch without rules sends everything to its
//! `deliver` targets.
//!
//! [`Fanout`] holds a watch's targets and delivers one message to the targets of its decision.
//! The message counts as delivered when every target acknowledged it. When some acknowledged
//! and another failed, the ones that did are flushed (made durable) and named in the result, so
//! that the watcher records them in the delivery log and a retry, or the next process after a
//! crash, calls only the targets still missing.

use std::collections::BTreeSet;
use std::path::Path;

use futures::FutureExt;
use futures::future::BoxFuture;
use mail_parser::MimeHeaders;

use crate::config::{After, Target};
use crate::handler::{Body, Handler, HandlerError, HandlerFailure, Message};

/// A pattern as written in the config: a glob (`*@example.com`, `[Ii]nvoice*`), or a regular
/// expression (`{ regex = "^re: " }`). Both match case-insensitively and must match the whole
/// value (a regex may use `.*`).
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    Glob(globset::GlobMatcher),
    Regex(regex::Regex),
}

/// Largest compiled regular expression: a config cannot make inboxd allocate without bound.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    pub fn glob(text: &str) -> Result<Pattern, String> {
        let glob = globset::GlobBuilder::new(text)
            .case_insensitive(true)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("{text:?} is not a glob: {}", e.kind()))?;
        Ok(Pattern {
            text: text.to_string(),
            matcher: Matcher::Glob(glob.compile_matcher()),
        })
    }

    pub fn regex(text: &str) -> Result<Pattern, String> {
        // Anchored: a pattern matches the whole value, as a glob does.
        let re = regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .case_insensitive(true)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("{text:?} is not a regular expression: {e}"))?;
        Ok(Pattern {
            text: text.to_string(),
            matcher: Matcher::Regex(re),
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match &self.matcher {
            Matcher::Glob(g) => g.is_match(value),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.matcher {
            Matcher::Glob(_) => write!(f, "{:?}", self.text),
            Matcher::Regex(_) => write!(f, "/{}/", self.text),
        }
    }
}

/// Which address header a condition looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressField {
    From,
    To,
    Cc,
}

/// One condition of a rule; a rule matches when all of its conditions do.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Some address of the field, or its display name, matches one of the patterns.
    Address(AddressField, Vec<Pattern>),
    /// The decoded subject matches one of the patterns.
    Subject(Vec<Pattern>),
    /// Some field of this name (case-insensitive), its value unfolded, matches one of them.
    Header(String, Vec<Pattern>),
    HasAttachment(bool),
    /// The message is larger than this many bytes.
    LargerThan(u64),
    /// The message is smaller than this many bytes.
    SmallerThan(u64),
}

impl Condition {
    fn holds(&self, facts: &Facts) -> bool {
        let any = |patterns: &[Pattern], value: &str| patterns.iter().any(|p| p.matches(value));
        match self {
            Condition::Address(field, patterns) => {
                let list = match field {
                    AddressField::From => &facts.from,
                    AddressField::To => &facts.to,
                    AddressField::Cc => &facts.cc,
                };
                list.iter().any(|(name, address)| {
                    address.as_deref().is_some_and(|a| any(patterns, a))
                        || name.as_deref().is_some_and(|n| any(patterns, n))
                })
            }
            Condition::Subject(patterns) => any(patterns, facts.subject.as_deref().unwrap_or("")),
            Condition::Header(name, patterns) => facts
                .headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && any(patterns, v)),
            Condition::HasAttachment(wanted) => facts.has_attachment == *wanted,
            Condition::LargerThan(n) => facts.size > *n,
            Condition::SmallerThan(n) => facts.size < *n,
        }
    }
}

/// An ordered rule of a watch.
#[derive(Debug, Clone)]
pub struct Rule {
    /// As given (`name = ".."`), or `rule N` (its place among the watch's rules, from 1).
    pub name: String,
    pub conditions: Vec<Condition>,
    /// Indices into the watch's targets; none for `deliver = "skip"`.
    pub targets: Vec<usize>,
    /// Overrides the watch's `after` for the messages this rule matches.
    pub after: Option<After>,
}

/// Where a message goes when no rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    Targets(Vec<usize>),
    /// Acknowledged without delivery, logged as skipped, and left on the server as it is.
    Skip,
}

/// A watch's rules and its fallback.
#[derive(Debug, Clone)]
pub struct Routing {
    pub rules: Vec<Rule>,
    pub fallback: Fallback,
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Deliver {
        /// The rule that matched (an index into the rules), or `None` for the fallback.
        rule: Option<usize>,
        targets: Vec<usize>,
        /// The rule's `after`, overriding the watch's.
        after: Option<After>,
    },
    /// Acknowledged without delivery: by a rule whose `deliver = "skip"`, or by `else`.
    Skip { rule: Option<usize> },
}

impl Routing {
    /// Every message to these targets.
    pub fn all_to(targets: Vec<usize>) -> Routing {
        Routing {
            rules: Vec::new(),
            fallback: Fallback::Targets(targets),
        }
    }

    /// Whether a rule looks at more than the header block (`has_attachment`).
    pub fn needs_body(&self) -> bool {
        self.rules
            .iter()
            .flat_map(|r| &r.conditions)
            .any(|c| matches!(c, Condition::HasAttachment(_)))
    }

    /// Whether some rule overrides the watch's `after`.
    pub fn overrides_after(&self) -> bool {
        self.rules.iter().any(|r| r.after.is_some())
    }

    /// The first rule that matches, else the fallback.
    pub fn decide(&self, facts: &Facts) -> Decision {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.conditions.iter().all(|c| c.holds(facts)) {
                if rule.targets.is_empty() {
                    return Decision::Skip { rule: Some(i) };
                }
                return Decision::Deliver {
                    rule: Some(i),
                    targets: rule.targets.clone(),
                    after: rule.after.clone(),
                };
            }
        }
        match &self.fallback {
            Fallback::Targets(t) => Decision::Deliver {
                rule: None,
                targets: t.clone(),
                after: None,
            },
            Fallback::Skip => Decision::Skip { rule: None },
        }
    }
}

/// What the rules look at in a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// (display name, lower-case address) of each mailbox.
    pub from: Vec<(Option<String>, Option<String>)>,
    pub to: Vec<(Option<String>, Option<String>)>,
    pub cc: Vec<(Option<String>, Option<String>)>,
    /// Decoded.
    pub subject: Option<String>,
    /// Every header field: name as written, value unfolded.
    pub headers: Vec<(String, String)>,
    pub size: u64,
    pub has_attachment: bool,
}

/// Messages above this are judged from their header block alone: `has_attachment` is then
/// whether the top-level type is `multipart/mixed` (the same bound as the JSON envelope's
/// `parse_max`).
pub const FACTS_PARSE_MAX: u64 = 32 << 20;

impl Facts {
    /// Reads the facts of a message. Never fails on the message's bytes (a part the parser
    /// cannot read leaves its facts empty); fails only when a spool file cannot be read. The
    /// body is parsed only when `body` is true (a rule asks about attachments).
    pub fn read(body: &Body<'_>, body_needed: bool) -> std::io::Result<Facts> {
        use std::io::Read;
        let size = body.len();
        let whole = body_needed && size <= FACTS_PARSE_MAX;
        let bytes: std::borrow::Cow<'_, [u8]> = match body {
            Body::Bytes(b) => (*b).into(),
            _ if whole => body.to_vec()?.into(),
            _ => {
                let mut head = Vec::new();
                body.reader()?
                    .take(crate::message::IDENTITY_HEAD as u64)
                    .read_to_end(&mut head)?;
                head.into()
            }
        };
        let head = crate::message::header_block(&bytes);
        let mut facts = Facts {
            headers: crate::envelope::raw_headers(head)
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
            size,
            ..Facts::default()
        };
        let parsed = std::panic::catch_unwind(|| {
            let parser = mail_parser::MessageParser::default();
            let m = if whole {
                parser.parse(&bytes[..])
            } else {
                parser.parse_headers(head)
            }?;
            let list = |a: Option<&mail_parser::Address<'_>>| {
                crate::envelope::mailboxes(a)
                    .into_iter()
                    .map(|m| (m.name, m.address.map(|a| a.to_lowercase())))
                    .collect::<Vec<_>>()
            };
            let multipart_mixed = m.root_part().content_type().is_some_and(|ct| {
                ct.ctype().eq_ignore_ascii_case("multipart")
                    && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case("mixed"))
            });
            Some((
                list(m.from()),
                list(m.to()),
                list(m.cc()),
                m.subject().map(str::to_string),
                if whole {
                    m.attachment_count() > 0
                } else {
                    multipart_mixed
                },
            ))
        });
        if let Ok(Some((from, to, cc, subject, has_attachment))) = parsed {
            facts.from = from;
            facts.to = to;
            facts.cc = cc;
            facts.subject = subject;
            facts.has_attachment = has_attachment;
        }
        Ok(facts)
    }
}

/// A target that did not acknowledge a message.
pub struct Refusal {
    pub target: String,
    pub error: HandlerError,
}

/// A delivery to several targets that did not complete: what failed, and which targets
/// acknowledged it in this attempt and were flushed, to be recorded.
pub struct FanoutError {
    pub error: HandlerError,
    pub acknowledged: Vec<String>,
    /// How many targets panicked (a handler bug, counted in the watch's health).
    pub panicked: u32,
}

/// A watch's targets, built from its config (or one handler of the library user's).
pub struct Fanout {
    targets: Vec<(String, Box<dyn Handler>)>,
    /// Targets delivered to since their last flush.
    dirty: Vec<bool>,
    pub routing: Routing,
}

impl Fanout {
    /// Builds every target of the watch. Fails if one cannot work at all.
    pub fn new(targets: &[Target], routing: Routing) -> Result<Fanout, HandlerError> {
        let mut built = Vec::with_capacity(targets.len());
        for t in targets {
            let handler = crate::handler::from_config(&t.deliver).map_err(|e| HandlerError {
                reason: format!("target `{}`: {}", t.name, e.reason),
                ..e
            })?;
            built.push((t.name.clone(), handler));
        }
        Ok(Fanout {
            dirty: vec![false; built.len()],
            targets: built,
            routing,
        })
    }

    /// Handlers of the caller's, by name, with rules whose targets index into them.
    pub fn with_handlers(handlers: Vec<(String, Box<dyn Handler>)>, routing: Routing) -> Fanout {
        Fanout {
            dirty: vec![false; handlers.len()],
            targets: handlers,
            routing,
        }
    }

    /// One handler for every message.
    pub fn single(name: &str, handler: Box<dyn Handler>) -> Fanout {
        Fanout {
            targets: vec![(name.to_string(), handler)],
            dirty: vec![false],
            routing: Routing::all_to(vec![0]),
        }
    }

    /// The names of these targets, for logs: `a, b`.
    pub fn names(&self, targets: &[usize]) -> String {
        targets
            .iter()
            .filter_map(|&i| self.targets.get(i).map(|t| t.0.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether the checkpoint may be committed once per batch: only if every target allows it.
    pub fn batches(&self) -> bool {
        self.targets.iter().all(|(_, h)| h.batches())
    }

    /// Where large messages are spooled: the first target that asks for a place (a Maildir's
    /// `tmp/`, so that its delivery is a hard link), else the watch's spool directory.
    pub fn spool_dir(&self) -> Option<&Path> {
        self.targets.iter().find_map(|(_, h)| h.spool_dir())
    }

    /// The routing decision for a message.
    pub fn decide(&self, body: &Body<'_>) -> std::io::Result<Decision> {
        if self.routing.rules.is_empty() {
            return Ok(self.routing.decide(&Facts::default()));
        }
        Ok(self.routing.decide(&Facts::read(body, self.routing.needs_body())?))
    }

    /// Delivers a message to each of `targets` not in `done`, in order, each one tried even if
    /// an earlier one failed. On success every target has it (`done` is not changed). On
    /// failure the targets that acknowledged it now are flushed; those whose flush succeeded
    /// are added to `done` and returned, to be recorded.
    pub async fn deliver(
        &mut self,
        message: &Message<'_>,
        targets: &[usize],
        done: &mut BTreeSet<String>,
    ) -> Result<(), FanoutError> {
        let mut refusals: Vec<Refusal> = Vec::new();
        let mut acknowledged: Vec<usize> = Vec::new();
        let mut panicked = 0;
        for &i in targets {
            let Some((name, handler)) = self.targets.get_mut(i) else {
                continue;
            };
            if done.contains(name.as_str()) {
                continue;
            }
            // The call inside the future: a handler that panics before returning its future
            // is caught too.
            let outcome = std::panic::AssertUnwindSafe(async { handler.deliver(message).await })
                .catch_unwind()
                .await;
            let result = match outcome {
                Ok(r) => r,
                // A handler bug on this message: a failed attempt like any other.
                Err(panic) => {
                    panicked += 1;
                    Err(HandlerError::new(format!(
                        "handler panicked: {}",
                        crate::process::panic_message(panic.as_ref())
                    )))
                }
            };
            self.dirty[i] = true;
            match result {
                Ok(()) => acknowledged.push(i),
                Err(error) => refusals.push(Refusal {
                    target: name.clone(),
                    error,
                }),
            }
        }
        if refusals.is_empty() {
            return Ok(());
        }
        let single = targets.len() == 1;
        let mut recorded = Vec::new();
        for i in acknowledged {
            let (name, handler) = &mut self.targets[i];
            if handler.flush().await.is_ok() {
                self.dirty[i] = false;
                done.insert(name.clone());
                recorded.push(name.clone());
            }
        }
        Err(FanoutError {
            error: combine(refusals, single),
            acknowledged: recorded,
            panicked,
        })
    }

    /// Whether every target can flush a batch behind the next ([`Handler::flush_behind`]).
    pub fn flushes_behind(&self) -> bool {
        self.targets.iter().all(|(_, h)| h.flushes_behind())
    }

    /// Starts the flush of every target delivered to since its last flush and returns the work
    /// (all of it, in parallel); `None` unless every target offers it.
    pub fn flush_behind(&mut self) -> Option<BoxFuture<'static, Result<(), HandlerError>>> {
        if !self.flushes_behind() {
            return None;
        }
        let single = self.targets.len() == 1;
        let mut works: Vec<BoxFuture<'static, Result<(), HandlerError>>> = Vec::new();
        for (i, (name, handler)) in self.targets.iter_mut().enumerate() {
            if !self.dirty[i] {
                continue;
            }
            let name = name.clone();
            match handler.flush_behind() {
                Some(work) => {
                    self.dirty[i] = false;
                    works.push(Box::pin(async move { work.await.map_err(|e| named(e, &name, single)) }));
                }
                // It said it offers one: its batch does not count (and stays to be flushed).
                None => works.push(Box::pin(async move {
                    Err(named(
                        HandlerError::new("no flush behind offered after all"),
                        &name,
                        single,
                    ))
                })),
            }
        }
        Some(Box::pin(async move {
            futures::future::join_all(works)
                .await
                .into_iter()
                .collect::<Result<(), _>>()
        }))
    }

    /// Flushes every target delivered to since its last flush.
    pub async fn flush(&mut self) -> Result<(), HandlerError> {
        let single = self.targets.len() == 1;
        for (i, (name, handler)) in self.targets.iter_mut().enumerate() {
            if !self.dirty[i] {
                continue;
            }
            handler.flush().await.map_err(|e| named(e, name, single))?;
            self.dirty[i] = false;
        }
        Ok(())
    }

    /// Probes every target (for `inboxd check`): (name, what was checked or why it cannot work).
    pub async fn probe(&mut self, account: &str, folder: &str) -> Vec<(String, Result<String, HandlerError>)> {
        let mut out = Vec::new();
        for (name, handler) in &mut self.targets {
            out.push((name.clone(), handler.probe(account, folder).await));
        }
        out
    }
}

/// A target's error, named after the target when there are several.
fn named(e: HandlerError, name: &str, single: bool) -> HandlerError {
    if single {
        return e;
    }
    HandlerError {
        reason: format!("target `{name}`: {}", e.reason),
        ..e
    }
}

/// One error for a message several targets refused; what follows is the core's
/// [`HandlerFailure::graver`] of their failures.
fn combine(refusals: Vec<Refusal>, single: bool) -> HandlerError {
    if single && refusals.len() == 1 {
        return refusals
            .into_iter()
            .next()
            .map(|r| r.error)
            .unwrap_or_else(|| HandlerError::new(""));
    }
    let kind = refusals
        .iter()
        .map(|r| r.error.kind)
        .fold(HandlerFailure::Transient { retry_after: None }, HandlerFailure::graver);
    let reason = refusals
        .iter()
        .map(|r| format!("target `{}`: {}", r.target, r.error.reason))
        .collect::<Vec<_>>()
        .join("; ");
    let output = refusals
        .iter()
        .filter(|r| !r.error.output.is_empty())
        .map(|r| format!("[{}] {}", r.target, r.error.output))
        .collect::<Vec<_>>()
        .join(" ");
    HandlerError { reason, output, kind }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(raw: &str) -> Facts {
        Facts::read(&Body::Bytes(raw.as_bytes()), true).unwrap()
    }

    const INVOICE: &str = "From: \"Billing Dept\" <Billing@Vendor.Example>\r\nTo: invoices@us.example, Ann <ann@us.example>\r\nCc: audit@us.example\r\nSubject: =?UTF-8?Q?Invoice_n=C2=B0_42?=\r\nX-Priority: 1 (Highest)\r\nList-Id: Vendor news\r\n <news.vendor.example>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=i.pdf\r\n\r\nJVBERi0=\r\n--b--\r\n";

    fn rule(conditions: Vec<Condition>, targets: Vec<usize>) -> Rule {
        Rule {
            name: "r".into(),
            conditions,
            targets,
            after: None,
        }
    }

    #[test]
    fn facts_decode_addresses_subject_headers_and_attachments() {
        let f = facts(INVOICE);
        assert_eq!(
            f.from,
            vec![(Some("Billing Dept".into()), Some("billing@vendor.example".into()))]
        );
        assert_eq!(f.to.len(), 2);
        assert_eq!(f.subject.as_deref(), Some("Invoice n° 42"));
        assert!(f.has_attachment);
        assert!(
            f.headers
                .iter()
                .any(|(n, v)| n == "List-Id" && v == "Vendor news <news.vendor.example>")
        );
        let plain = facts("From: a@b.example\r\nSubject: hi\r\n\r\nbody\r\n");
        assert!(!plain.has_attachment);
        // Without the body, only the top-level type says whether there is an attachment.
        let head_only = Facts::read(&Body::Bytes(INVOICE.as_bytes()), false).unwrap();
        assert!(head_only.has_attachment);
    }

    #[test]
    fn conditions_match_case_insensitively_and_whole_values() {
        let f = facts(INVOICE);
        let g = |p: &str| vec![Pattern::glob(p).unwrap()];
        let r = |p: &str| vec![Pattern::regex(p).unwrap()];
        let holds = |c: Condition| c.holds(&f);
        assert!(holds(Condition::Address(AddressField::From, g("*@vendor.example"))));
        assert!(holds(Condition::Address(AddressField::From, g("billing dept"))));
        assert!(!holds(Condition::Address(AddressField::From, g("vendor.example"))));
        assert!(holds(Condition::Address(AddressField::To, g("ann@*"))));
        assert!(!holds(Condition::Address(AddressField::Cc, g("ann@*"))));
        assert!(holds(Condition::Subject(g("invoice*"))));
        assert!(holds(Condition::Subject(r(r"invoice n° \d+"))));
        assert!(
            !holds(Condition::Subject(r("invoice"))),
            "a regex matches the whole value"
        );
        assert!(holds(Condition::Header("x-priority".into(), g("1*"))));
        assert!(holds(Condition::Header("LIST-ID".into(), g("*<news.vendor.example>"))));
        assert!(!holds(Condition::Header("X-Missing".into(), g("*"))));
        assert!(holds(Condition::HasAttachment(true)));
        assert!(holds(Condition::LargerThan(100)));
        assert!(!holds(Condition::SmallerThan(100)));
    }

    #[test]
    fn the_first_matching_rule_wins_and_else_takes_the_rest() {
        let routing = Routing {
            rules: vec![
                rule(
                    vec![Condition::Subject(vec![Pattern::glob("*invoice*").unwrap()])],
                    vec![1],
                ),
                Rule {
                    after: Some(After::Seen),
                    ..rule(vec![Condition::LargerThan(0)], vec![0, 1])
                },
            ],
            fallback: Fallback::Skip,
        };
        let f = facts(INVOICE);
        assert_eq!(
            routing.decide(&f),
            Decision::Deliver {
                rule: Some(0),
                targets: vec![1],
                after: None
            }
        );
        let other = facts("Subject: hello\r\n\r\nx");
        assert_eq!(
            routing.decide(&other),
            Decision::Deliver {
                rule: Some(1),
                targets: vec![0, 1],
                after: Some(After::Seen)
            }
        );
        assert_eq!(routing.decide(&Facts::default()), Decision::Skip { rule: None });
    }

    #[test]
    fn hostile_bytes_give_facts_not_panics() {
        let inputs: [&[u8]; 4] = [
            b"",
            b"\xff\xfe: \x00\r\n\r\n",
            b"From: =?x-unknown?B?////?= <\xc3\x28@\xa0\xa1>\r\nContent-Type: multipart/mixed; boundary=\"\r\n\r\n--",
            b"Subject: \r\n \r\n \r\n",
        ];
        for raw in inputs {
            let _ = Facts::read(&Body::Bytes(raw), true).unwrap();
        }
        let parts: String = (0..1000)
            .map(|i| format!("--b\r\nContent-Type: application/x-{i}\r\n\r\nx\r\n"))
            .collect();
        let many = format!("Content-Type: multipart/mixed; boundary=b\r\n\r\n{parts}--b--\r\n");
        assert!(Facts::read(&Body::Bytes(many.as_bytes()), true).unwrap().has_attachment);
    }

    #[test]
    fn patterns_from_config_bytes_are_bounded() {
        assert!(Pattern::glob("[").is_err());
        assert!(Pattern::regex("(").is_err());
        // A regex whose compiled form would be huge is refused, not built.
        assert!(Pattern::regex(r"\w{1000}{1000}").is_err());
    }
}
