//! One `[[watch]]` table, validated.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use inboxd_core::mailbox::{StartPolicy, UidValidityPolicy};
use inboxd_core::retry::RetryPolicy;
use toml::Spanned;

use crate::envelope::JsonOptions;

use super::raw::{
    OneOrMany, RawDeliver, RawFormat, RawPattern, RawPatterns, RawRule, RawStart, RawTargets, RawUidValidity, RawWatch,
};
use super::{
    Account, ConfigError, Ctx, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_SPOOL_ABOVE, Deliver, MAX_MESSAGE_SIZE_LIMIT, Payload,
    SPOOL_ABOVE_RANGE, Target, Watch, is_loopback,
};
use crate::route::{AddressField, Condition, Fallback, Pattern, Routing, Rule};

/// The special uses a folder may be named by (RFC 6154).
const SPECIAL_USES: [&str; 7] = [
    "\\All",
    "\\Archive",
    "\\Drafts",
    "\\Flagged",
    "\\Junk",
    "\\Sent",
    "\\Trash",
];

/// Whether `name` can name a target: letters, digits, `-`, `_`, `.`; not `skip`.
pub(super) fn is_target_name(name: &str) -> bool {
    !name.is_empty()
        && name != "skip"
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

type Span = std::ops::Range<usize>;

/// The watch's targets and routing, from `deliver`, `[[watch.rule]]` and `else`.
fn routing(
    ctx: &Ctx<'_>,
    wspan: Span,
    deliver: Option<Spanned<RawTargets>>,
    rules: Vec<Spanned<RawRule>>,
    otherwise: Option<Spanned<OneOrMany<String>>>,
    shared: &BTreeMap<String, Deliver>,
) -> Result<(Vec<Target>, Routing), ConfigError> {
    let mut targets: Vec<Target> = Vec::new();
    // Names to indices into `targets`, taking each shared target the first time it is named.
    let mut resolve = |names: Vec<String>, span: &Span, what: &str| -> Result<Vec<usize>, ConfigError> {
        if names.is_empty() {
            return Err(ctx.invalid(Some(span.clone()), format!("{what}: name at least one target")));
        }
        let mut out = Vec::new();
        for name in names {
            let i = match targets.iter().position(|t| t.name == name) {
                Some(i) => i,
                None => {
                    let Some(d) = shared.get(&name) else {
                        let known = shared.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>();
                        return Err(ctx.invalid(
                            Some(span.clone()),
                            format!(
                                "{what}: no target named {name:?} in [targets] (there: {})",
                                if known.is_empty() {
                                    "none".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        ));
                    };
                    targets.push(Target {
                        name: name.clone(),
                        deliver: d.clone(),
                    });
                    targets.len() - 1
                }
            };
            if out.contains(&i) {
                return Err(ctx.invalid(Some(span.clone()), format!("{what}: target {name:?} is named twice")));
            }
            out.push(i);
        }
        Ok(out)
    };
    let skip = |names: &[String]| names.len() == 1 && names[0] == "skip";
    match (deliver, rules.is_empty(), otherwise) {
        (Some(d), true, None) => {
            let span = d.span();
            let all = match d.into_inner() {
                RawTargets::Inline(raw) => {
                    let deliver = destination(ctx, span, *raw, "watch.deliver")?;
                    targets.push(Target {
                        name: deliver.kind().to_string(),
                        deliver,
                    });
                    vec![0]
                }
                RawTargets::Names(names) => resolve(names, &span, "watch.deliver")?,
            };
            Ok((targets, Routing::all_to(all)))
        }
        (Some(d), false, _) => Err(ctx.invalid(
            Some(d.span()),
            "watch.deliver: a watch with rules sends the messages no rule takes where `else` says; write `else = \"<target>\"` (or \"skip\") instead of `deliver`".into(),
        )),
        (_, true, Some(e)) => Err(ctx.invalid(
            Some(e.span()),
            "watch.else: `else` is where messages no rule matches go; this watch has no [[watch.rule]] (use `deliver`)".into(),
        )),
        (None, true, None) => Err(ctx.invalid(
            Some(wspan),
            "watch: missing `deliver` (a destination such as { maildir = \"path\" }, or names of [targets])".into(),
        )),
        (None, false, None) => Err(ctx.invalid(
            Some(wspan),
            "watch: a watch with rules needs `else`: the target(s) for messages no rule matches, or \"skip\"".into(),
        )),
        (None, false, Some(e)) => {
            let mut built = Vec::new();
            for (n, spanned) in rules.into_iter().enumerate() {
                let span = spanned.span();
                let r = spanned.into_inner();
                let name = r.name.clone().unwrap_or_else(|| format!("rule {}", n + 1));
                let what = format!("watch.rule {name:?}");
                let conditions = conditions(&r, &what).map_err(|m| ctx.invalid(Some(span.clone()), m))?;
                let names = r.deliver.into_vec();
                let rule_targets = if skip(&names) {
                    Vec::new()
                } else {
                    resolve(names, &span, &format!("{what}.deliver"))?
                };
                built.push(Rule {
                    name,
                    conditions,
                    targets: rule_targets,
                    after: r.after,
                });
            }
            let espan = e.span();
            let names = e.into_inner().into_vec();
            let fallback = if skip(&names) {
                Fallback::Skip
            } else {
                Fallback::Targets(resolve(names, &espan, "watch.else")?)
            };
            Ok((
                targets,
                Routing {
                    rules: built,
                    fallback,
                },
            ))
        }
    }
}

/// A rule's conditions, or what is wrong with them.
fn conditions(r: &RawRule, what: &str) -> Result<Vec<Condition>, String> {
    let patterns = |key: &str, raw: &RawPatterns| -> Result<Vec<Pattern>, String> {
        let list = raw.clone().into_vec();
        if list.is_empty() {
            return Err(format!("{what}.{key}: give at least one pattern"));
        }
        list.iter()
            .map(|p| match p {
                RawPattern::Glob(g) => Pattern::glob(g),
                RawPattern::Regex { regex } => Pattern::regex(regex),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{what}.{key}: {e}"))
    };
    let mut out = Vec::new();
    for (key, field, raw) in [
        ("from", AddressField::From, &r.from),
        ("to", AddressField::To, &r.to),
        ("cc", AddressField::Cc, &r.cc),
    ] {
        if let Some(raw) = raw {
            out.push(Condition::Address(field, patterns(key, raw)?));
        }
    }
    if let Some(raw) = &r.subject {
        out.push(Condition::Subject(patterns("subject", raw)?));
    }
    for (name, raw) in &r.header {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(format!("{what}.header: {name:?} is not a header field name"));
        }
        out.push(Condition::Header(
            name.clone(),
            patterns(&format!("header.{name}"), raw)?,
        ));
    }
    if let Some(b) = r.has_attachment {
        out.push(Condition::HasAttachment(b));
    }
    if let Some(n) = r.larger_than {
        out.push(Condition::LargerThan(n.0));
    }
    if let Some(n) = r.smaller_than {
        out.push(Condition::SmallerThan(n.0));
    }
    if let (Some(l), Some(s)) = (r.larger_than, r.smaller_than)
        && s.0 <= l.0.saturating_add(1)
    {
        return Err(format!(
            "{what}: no message is larger than {} and smaller than {} bytes",
            l.0, s.0
        ));
    }
    if out.is_empty() {
        return Err(format!(
            "{what}: a rule needs a condition (from, to, cc, subject, header, has_attachment, larger_than, smaller_than); for every other message use the watch's `else`"
        ));
    }
    Ok(out)
}

/// Validates one watch against the accounts already validated.
pub(super) fn build(
    ctx: &Ctx<'_>,
    spanned: Spanned<RawWatch>,
    accounts: &BTreeMap<String, Arc<Account>>,
    shared: &BTreeMap<String, Deliver>,
    spool_dir: &Path,
) -> Result<Watch, ConfigError> {
    let span = spanned.span();
    let mut w = spanned.into_inner();
    let pattern = match (&w.folder, w.folders.take()) {
        (Some(_), Some(p)) => {
            return Err(ctx.invalid(
                Some(p.span()),
                "watch.folders: a watch has `folder` or `folders` (a pattern), not both".to_string(),
            ));
        }
        (None, Some(p)) => {
            let text = p.get_ref().clone();
            if text.is_empty() || text.contains(['\r', '\n', '\0', '"']) || !text.contains(['*', '%']) {
                return Err(ctx.invalid(
                    Some(p.span()),
                    format!(
                        "watch.folders: {text:?} is no pattern (a folder name with `*` or `%`, e.g. \"Support/*\")"
                    ),
                ));
            }
            Some(text)
        }
        _ => None,
    };
    let folder = pattern
        .clone()
        .or_else(|| w.folder.clone())
        .unwrap_or_else(|| "INBOX".to_string());
    if folder.is_empty() || folder.contains(['\r', '\n', '\0']) {
        return Err(ctx.invalid(Some(span), format!("watch.folder: {folder:?} is not a folder name")));
    }
    if folder.starts_with('\\') && !SPECIAL_USES.iter().any(|u| u.eq_ignore_ascii_case(&folder)) {
        return Err(ctx.invalid(
            Some(span),
            format!(
                "watch.folder: {folder:?} is no special use; RFC 6154 has {}",
                SPECIAL_USES.join(", ")
            ),
        ));
    }
    let account = accounts.get(w.account.get_ref()).cloned().ok_or_else(|| {
        ctx.invalid(
            Some(w.account.span()),
            format!(
                "watch.account: no account named {:?} in [accounts]",
                w.account.get_ref()
            ),
        )
    })?;
    let (targets, routing) = routing(ctx, span.clone(), w.deliver, w.rule, w.otherwise, shared)?;
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
    } else if w.list_window == Some(0) {
        Some("watch.list_window must be at least 1".to_string())
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(ctx.invalid(Some(span), problem));
    }
    let max_message_size = match w.max_message_size {
        None => DEFAULT_MAX_MESSAGE_SIZE,
        Some(size) if (1..=MAX_MESSAGE_SIZE_LIMIT).contains(&size.0) => size.0,
        Some(_) => {
            return Err(ctx.invalid(
                Some(span),
                format!("watch.max_message_size must be between 1 and {MAX_MESSAGE_SIZE_LIMIT} bytes (4 GiB)"),
            ));
        }
    };
    let spool_above = match w.spool_above {
        None => DEFAULT_SPOOL_ABOVE,
        Some(size) if SPOOL_ABOVE_RANGE.contains(&size.0) => size.0,
        Some(_) => {
            return Err(ctx.invalid(
                Some(span),
                "watch.spool_above must be between 64 KiB and 64 MiB".to_string(),
            ));
        }
    };
    let rescan = w
        .rescan
        .map_or(super::DEFAULT_RESCAN, |d| d.0)
        .max(std::time::Duration::from_secs(1));
    let watch = Watch {
        account,
        folder,
        pattern,
        rescan,
        start: match w.start {
            RawStart::New => StartPolicy::New,
            RawStart::All => StartPolicy::All,
        },
        after: w.after,
        targets,
        routing,
        on_uidvalidity_change: match w.on_uidvalidity_change {
            RawUidValidity::Dedupe => UidValidityPolicy::Dedupe,
            RawUidValidity::Skip => UidValidityPolicy::Skip,
            RawUidValidity::Replay => UidValidityPolicy::Replay,
        },
        retry,
        batch_size: w.batch_size.unwrap_or(200),
        list_window: w.list_window.unwrap_or(inboxd_core::machine::LIST_WINDOW),
        max_message_size,
        spool_above,
        spool_dir: spool_dir.to_path_buf(),
    };
    Ok(watch)
}

/// Validates `deliver = { .. }` or `[targets.NAME]` (`what`, for messages): exactly one
/// destination, and only the keys that apply to it.
pub(super) fn deliver(ctx: &Ctx<'_>, spanned: Spanned<RawDeliver>, what: &str) -> Result<Deliver, ConfigError> {
    let dspan = spanned.span();
    destination(ctx, dspan, spanned.into_inner(), what)
}

fn destination(
    ctx: &Ctx<'_>,
    dspan: std::ops::Range<usize>,
    d: RawDeliver,
    what: &str,
) -> Result<Deliver, ConfigError> {
    let bad = |message: String| ctx.invalid(Some(dspan.clone()), message);
    let given = [
        ("exec", d.exec.as_ref().is_some_and(|a| !a.is_empty())),
        ("maildir", d.maildir.is_some()),
        ("webhook", d.webhook.is_some()),
        ("nats", d.nats.is_some()),
        ("redis", d.redis.is_some()),
        ("amqp", d.amqp.is_some()),
        ("mqtt", d.mqtt.is_some()),
    ];
    let kind = match given.iter().filter(|(_, g)| *g).map(|(k, _)| *k).collect::<Vec<_>>()[..] {
        [one] => one,
        _ => {
            return Err(bad(format!(
                "{what}: give exactly one of `exec = [\"program\", ..]`, `maildir = \"path\"`, `webhook = \"https://..\"`, `nats = \"nats://..\"`, `redis = \"redis://..\"`, `amqp = \"amqp://..\"` or `mqtt = \"mqtt://..\"`"
            )));
        }
    };
    // Which destinations each optional key belongs to.
    const SENDERS: &[&str] = &["exec", "webhook", "nats", "redis", "amqp", "mqtt"];
    const BROKERS: &[&str] = &["webhook", "nats", "redis", "amqp", "mqtt"];
    let keys: [(&str, bool, &[&str]); 20] = [
        ("timeout", d.timeout.is_some(), SENDERS),
        ("format", d.format.is_some(), BROKERS),
        (
            "attachments",
            d.attachments.is_some() || d.attachment_max.is_some(),
            SENDERS,
        ),
        ("raw", d.raw.is_some(), SENDERS),
        ("pass_env", d.pass_env.is_some(), &["exec"]),
        ("stdin", d.stdin.is_some(), &["exec"]),
        ("mode", d.mode.is_some(), &["maildir"]),
        ("secret", d.secret.is_some(), &["webhook"]),
        ("ca_file", d.ca_file.is_some(), &["webhook", "nats", "amqp", "mqtt"]),
        ("allow_http", d.allow_http.is_some(), &["webhook"]),
        ("subject", d.subject.is_some(), &["nats"]),
        ("token", d.token.is_some(), &["nats"]),
        ("stream", d.stream.is_some(), &["redis"]),
        ("dedupe_for", d.dedupe_for.is_some(), &["redis"]),
        ("exchange", d.exchange.is_some(), &["amqp"]),
        ("routing_key", d.routing_key.is_some(), &["amqp"]),
        ("topic", d.topic.is_some(), &["mqtt"]),
        ("user", d.user.is_some(), &["nats", "amqp", "mqtt"]),
        ("password", d.password.is_some(), &["nats", "redis", "amqp", "mqtt"]),
        ("attachment_max", d.attachment_max.is_some(), SENDERS),
    ];
    for (key, given, applies) in keys {
        if given && !applies.contains(&kind) {
            return Err(bad(format!(
                "{what}: `{key}` applies to {} only, not to `{kind}`",
                applies.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if d.timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(bad(format!("{what}.timeout must be more than 0s")));
    }
    let json = JsonOptions {
        attachments: d.attachments.unwrap_or_default(),
        attachment_max: d.attachment_max.map_or(JsonOptions::default().attachment_max, |b| b.0),
        raw: d.raw.unwrap_or(false),
        ..JsonOptions::default()
    };
    let payload = |format: Option<RawFormat>, default: RawFormat| match format.unwrap_or(default) {
        RawFormat::Raw => Payload::Raw,
        RawFormat::Json => Payload::Json(json),
    };
    Ok(match kind {
        "exec" => Deliver::Exec {
            argv: d.exec.unwrap_or_default(),
            timeout: d.timeout.map_or(Duration::from_secs(300), |x| x.0),
            cwd: ctx.base.clone(),
            pass_env: d.pass_env.unwrap_or_default(),
            stdin: payload(d.stdin, RawFormat::Raw),
        },
        "maildir" => {
            let mode = match &d.mode {
                None => crate::handler::maildir::DEFAULT_MODE,
                Some(text) => match u32::from_str_radix(text, 8) {
                    Ok(m) if m <= 0o777 && m & 0o600 == 0o600 => m,
                    _ => {
                        return Err(bad(format!(
                            "{what}.mode: {text:?} is not an octal file mode that lets inboxd read and write (e.g. \"0600\" or \"0640\")"
                        )));
                    }
                },
            };
            Deliver::Maildir {
                path: ctx.base.join(d.maildir.unwrap_or_default()),
                mode,
            }
        }
        "mqtt" => {
            if !cfg!(feature = "mqtt") {
                return Err(bad(format!("{what}: this inboxd was built without the `mqtt` feature")));
            }
            let url = d.mqtt.unwrap_or_default();
            if !(url.starts_with("mqtt://") || url.starts_with("mqtts://")) || url.contains('@') {
                return Err(bad(format!(
                    "{what}.mqtt: {url:?} is not an mqtt://host[:port] or mqtts://host[:port] URL (credentials go in `user` and `password`)"
                )));
            }
            let topic = d.topic.unwrap_or_else(|| "inboxd/{account}/{folder}".into());
            if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                return Err(bad(format!(
                    "{what}.topic: {topic:?} is not a topic to publish to (no wildcards)"
                )));
            }
            Deliver::Mqtt {
                url,
                user: d.user,
                password: d.password.map(|s| s.relative_to(&ctx.base)),
                topic,
                payload: payload(d.format, RawFormat::Json),
                timeout: d.timeout.map_or(Duration::from_secs(10), |x| x.0),
                ca_file: d.ca_file.map(|p| ctx.base.join(p)),
            }
        }
        "amqp" => {
            if !cfg!(feature = "amqp") {
                return Err(bad(format!("{what}: this inboxd was built without the `amqp` feature")));
            }
            let url = d.amqp.unwrap_or_default();
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(bad(format!("{what}.amqp: {url:?} is not an amqp:// or amqps:// URL")));
            }
            if url.contains('@') {
                return Err(bad(format!(
                    "{what}.amqp: put no credentials in the URL; use `user` and `password`"
                )));
            }
            Deliver::Amqp {
                url,
                user: d.user.unwrap_or_else(|| "guest".into()),
                password: d.password.map(|s| s.relative_to(&ctx.base)),
                exchange: d.exchange.unwrap_or_default(),
                routing_key: d.routing_key.unwrap_or_else(|| "inboxd.{account}.{folder}".into()),
                payload: payload(d.format, RawFormat::Json),
                timeout: d.timeout.map_or(Duration::from_secs(10), |x| x.0),
                ca_file: d.ca_file.map(|p| ctx.base.join(p)),
            }
        }
        "redis" => {
            if !cfg!(feature = "redis") {
                return Err(bad(format!(
                    "{what}: this inboxd was built without the `redis` feature"
                )));
            }
            let url = d.redis.unwrap_or_default();
            if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
                return Err(bad(format!("{what}.redis: {url:?} is not a redis:// URL")));
            }
            if url.contains('@') {
                return Err(bad(format!(
                    "{what}.redis: put no password in the URL; use `password` (a secret source)"
                )));
            }
            Deliver::Redis {
                url,
                stream: d.stream.unwrap_or_else(|| "inboxd:{account}:{folder}".into()),
                password: d.password.map(|s| s.relative_to(&ctx.base)),
                payload: payload(d.format, RawFormat::Json),
                dedupe_for: d.dedupe_for.map_or(Duration::from_secs(7 * 24 * 3600), |x| x.0),
                timeout: d.timeout.map_or(Duration::from_secs(10), |x| x.0),
            }
        }
        "nats" => {
            if !cfg!(feature = "nats") {
                return Err(bad(format!("{what}: this inboxd was built without the `nats` feature")));
            }
            let subject = d.subject.unwrap_or_else(|| "inboxd.{account}.{folder}".into());
            if subject.is_empty() || subject.contains(char::is_whitespace) || subject.contains(['*', '>']) {
                return Err(bad(format!(
                    "{what}.subject: {subject:?} is not a subject to publish to (no spaces or wildcards)"
                )));
            }
            let servers = d.nats.unwrap_or_default();
            if servers.contains('@') {
                return Err(bad(format!(
                    "{what}.nats: put no credentials in the URL; use `token`, or `user` and `password`"
                )));
            }
            if d.token.is_some() && (d.user.is_some() || d.password.is_some()) {
                return Err(bad(format!("{what}: give `token`, or `user` and `password`, not both")));
            }
            if d.password.is_some() && d.user.is_none() {
                return Err(bad(format!("{what}.password: a NATS password goes with a `user`")));
            }
            Deliver::Nats {
                servers,
                subject,
                payload: payload(d.format, RawFormat::Json),
                token: d.token.map(|s| s.relative_to(&ctx.base)),
                user: d.user,
                password: d.password.map(|s| s.relative_to(&ctx.base)),
                timeout: d.timeout.map_or(Duration::from_secs(10), |x| x.0),
                ca_file: d.ca_file.map(|p| ctx.base.join(p)),
            }
        }
        _ => {
            let url = d.webhook.unwrap_or_default();
            let parsed =
                reqwest::Url::parse(&url).map_err(|e| bad(format!("{what}.webhook: {url:?} is not a URL: {e}")))?;
            let loopback = parsed.host_str().is_some_and(is_loopback);
            match parsed.scheme() {
                "https" => {}
                "http" if loopback || d.allow_http == Some(true) => {}
                "http" => {
                    return Err(bad(format!(
                        "{what}.webhook: plain http:// to {:?} would send mail in clear; use https://, or allow_http = true",
                        parsed.host_str().unwrap_or("")
                    )));
                }
                other => return Err(bad(format!("{what}.webhook: unsupported scheme {other:?}"))),
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err(bad(format!(
                    "{what}.webhook: put no credentials in the URL; sign with `secret` instead"
                )));
            }
            Deliver::Webhook {
                url: parsed.to_string(),
                secret: d.secret.map(|s| s.relative_to(&ctx.base)),
                payload: payload(d.format, RawFormat::Json),
                timeout: d.timeout.map_or(Duration::from_secs(30), |x| x.0),
                ca_file: d.ca_file.map(|p| ctx.base.join(p)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, Deliver, Payload};

    fn load(deliver: &str) -> Result<Config, String> {
        let text = format!(
            "[accounts.a]\nhost = \"127.0.0.1\"\nuser = \"u\"\npassword = \"p\"\ntls = \"none\"\n\n[[watch]]\naccount = \"a\"\ndeliver = {deliver}\n"
        );
        Config::parse(Path::new("/etc/inboxd/inboxd.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn every_target_takes_its_keys_and_the_json_options() {
        for deliver in [
            r#"{ exec = ["h"], stdin = "json", attachments = "inline", attachment_max = "2MiB", raw = true, timeout = "1m" }"#,
            r#"{ webhook = "https://h.example/x", secret = { env = "S" }, format = "raw", ca_file = "ca.pem", timeout = "5s" }"#,
            r#"{ nats = "nats://127.0.0.1:4222", subject = "m.{account}", token = { env = "T" }, attachments = "omit" }"#,
            r#"{ redis = "redis://127.0.0.1", stream = "s:{folder}", password = { env = "P" }, dedupe_for = "1d", raw = true }"#,
            r#"{ amqp = "amqp://127.0.0.1", user = "u", password = { env = "P" }, exchange = "x", routing_key = "r", attachments = "metadata" }"#,
            r#"{ mqtt = "mqtt://127.0.0.1", topic = "t/{account}", user = "u", password = { env = "P" }, timeout = "3s" }"#,
        ] {
            let c = load(deliver).unwrap_or_else(|e| panic!("{deliver}: {e}"));
            if let Deliver::Exec {
                stdin: Payload::Json(o),
                ..
            } = &c.watches[0].targets[0].deliver
            {
                assert_eq!(o.attachment_max, 2 << 20);
                assert!(o.raw);
            }
        }
    }

    #[test]
    fn misplaced_keys_and_unsafe_urls_are_located_errors() {
        for (deliver, expected) in [
            (r#"{ maildir = "m", timeout = "1s" }"#, "`timeout` applies to"),
            (r#"{ exec = ["h"], topic = "x" }"#, "`topic` applies to `mqtt` only"),
            (r#"{ webhook = "http://hooks.example.com/x" }"#, "plain http://"),
            (
                r#"{ webhook = "https://u:p@hooks.example.com/x" }"#,
                "no credentials in the URL",
            ),
            (r#"{ redis = "redis://:pw@127.0.0.1" }"#, "no password in the URL"),
            (
                r#"{ amqp = "amqp://guest:guest@127.0.0.1" }"#,
                "no credentials in the URL",
            ),
            (r#"{ mqtt = "mqtt://127.0.0.1", topic = "a/#" }"#, "no wildcards"),
            (r#"{ nats = "nats://x", subject = "a.*" }"#, "no spaces or wildcards"),
            (r#"{ exec = ["h"], maildir = "m" }"#, "exactly one of"),
        ] {
            let e = load(deliver).unwrap_err();
            assert!(
                e.contains(expected) && e.contains("/etc/inboxd/inboxd.toml:9:"),
                "{deliver}: {e}"
            );
        }
    }

    const ROUTED: &str = r#"
[accounts.a]
host = "127.0.0.1"
user = "u"
password = "p"
tls = "none"

[targets.tickets]
webhook = "https://tickets.example/hook"

[targets.archive]
maildir = "archive"

[targets.unused]
maildir = "unused"

[[watch]]
account = "a"
after = "seen"
else = "archive"

[[watch.rule]]
name = "invoices"
from = ["*@billing.example", { regex = "ap-[0-9]+@.*" }]
subject = "*invoice*"
has_attachment = true
deliver = ["archive", "tickets"]
after = "move:Done"

[[watch.rule]]
header = { "List-Id" = "*<news.example>" }
larger_than = "1KiB"
deliver = "skip"
"#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/inboxd/inboxd.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn rules_name_shared_targets_and_override_after() {
        use crate::config::After;
        use crate::route::{Condition, Fallback};
        let c = parse(ROUTED).unwrap();
        let w = &c.watches[0];
        // Only the targets the watch names are its own, in the order first named.
        let names: Vec<&str> = w.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["archive", "tickets"]);
        assert!(
            matches!(w.targets[0].deliver, Deliver::Maildir { ref path, .. } if path == Path::new("/etc/inboxd/archive"))
        );
        let r = &w.routing;
        assert_eq!(r.rules.len(), 2);
        assert_eq!(r.rules[0].name, "invoices");
        assert_eq!(r.rules[0].targets, [0, 1]);
        assert_eq!(r.rules[0].after, Some(After::Move("Done".into())));
        assert_eq!(r.rules[0].conditions.len(), 3);
        assert_eq!(r.rules[1].name, "rule 2");
        assert!(r.rules[1].targets.is_empty(), "deliver = \"skip\"");
        assert!(matches!(r.rules[1].conditions[0], Condition::Header(ref n, _) if n == "List-Id"));
        assert_eq!(r.fallback, Fallback::Targets(vec![0]));
        assert!(w.posts_after());
        // Fan-out without rules: a list of names.
        let fan = ROUTED.split("[[watch]]").next().unwrap().to_string()
            + "[[watch]]\naccount = \"a\"\ndeliver = [\"tickets\", \"archive\"]\n";
        let c = parse(&fan).unwrap();
        assert_eq!(c.watches[0].targets.len(), 2);
        assert_eq!(c.watches[0].routing.fallback, Fallback::Targets(vec![0, 1]));
        assert!(!c.watches[0].posts_after());
    }

    #[test]
    fn routing_mistakes_are_errors_naming_the_line() {
        let cases: [(&str, &str, &str, usize); 9] = [
            (
                "deliver = [\"archive\", \"tickets\"]",
                "deliver = [\"archive\", \"nope\"]",
                "no target named \"nope\"",
                22,
            ),
            (
                "subject = \"*invoice*\"",
                "subject = { regex = \"(\" }",
                "is not a regular expression",
                22,
            ),
            ("subject = \"*invoice*\"", "subject = \"[\"", "is not a glob", 22),
            (
                "header = { \"List-Id\" = \"*<news.example>\" }\nlarger_than = \"1KiB\"\n",
                "",
                "a rule needs a condition",
                30,
            ),
            ("else = \"archive\"", "deliver = \"archive\"", "write `else", 20),
            ("else = \"archive\"", "", "a watch with rules needs `else`", 17),
            (
                "deliver = [\"archive\", \"tickets\"]",
                "deliver = [\"archive\", \"archive\"]",
                "named twice",
                22,
            ),
            (
                "larger_than = \"1KiB\"",
                "larger_than = \"1KiB\"\nsmaller_than = \"1KB\"",
                "no message is larger",
                30,
            ),
            ("[targets.unused]", "[targets.\"bad name\"]", "a target name is", 14),
        ];
        for (from, to, expected, line) in cases {
            assert!(ROUTED.contains(from), "{from}");
            let text = ROUTED.replacen(from, to, 1);
            let e = parse(&text).unwrap_err();
            assert!(
                e.contains(expected) && e.contains(&format!("/etc/inboxd/inboxd.toml:{line}:")),
                "{from} -> {to}: {e}"
            );
        }
        // `else` without rules.
        let e = parse(ROUTED.split("[[watch.rule]]").next().unwrap()).unwrap_err();
        assert!(e.contains("this watch has no [[watch.rule]]"), "{e}");
    }
}
