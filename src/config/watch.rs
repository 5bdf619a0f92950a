//! One `[[watch]]` table, validated.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use inboxd_core::mailbox::{StartPolicy, UidValidityPolicy};
use inboxd_core::retry::RetryPolicy;
use toml::Spanned;

use crate::envelope::JsonOptions;

use super::raw::{RawDeliver, RawFormat, RawStart, RawUidValidity, RawWatch};
use super::{
    Account, ConfigError, Ctx, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_SPOOL_ABOVE, Deliver, MAX_MESSAGE_SIZE_LIMIT, Payload,
    SPOOL_ABOVE_RANGE, Watch, is_loopback,
};

/// Validates one watch against the accounts already validated.
pub(super) fn build(
    ctx: &Ctx<'_>,
    spanned: Spanned<RawWatch>,
    accounts: &BTreeMap<String, Arc<Account>>,
    spool_dir: &Path,
) -> Result<Watch, ConfigError> {
    let span = spanned.span();
    let w = spanned.into_inner();
    if w.folder.is_empty() || w.folder.contains(['\r', '\n', '\0']) {
        return Err(ctx.invalid(Some(span), format!("watch.folder: {:?} is not a folder name", w.folder)));
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
    let deliver = deliver(ctx, w.deliver)?;
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
        spool_dir: spool_dir.to_path_buf(),
    };
    Ok(watch)
}

/// Validates `deliver = { .. }`: exactly one destination, and only the keys that apply to it.
fn deliver(ctx: &Ctx<'_>, spanned: Spanned<RawDeliver>) -> Result<Deliver, ConfigError> {
    let dspan = spanned.span();
    let d = spanned.into_inner();
    let bad = |message: String| ctx.invalid(Some(dspan.clone()), message);
    let given = [
        ("exec", d.exec.as_ref().is_some_and(|a| !a.is_empty())),
        ("maildir", d.maildir.is_some()),
        ("webhook", d.webhook.is_some()),
        ("nats", d.nats.is_some()),
        ("redis", d.redis.is_some()),
        ("amqp", d.amqp.is_some()),
    ];
    let kind = match given.iter().filter(|(_, g)| *g).map(|(k, _)| *k).collect::<Vec<_>>()[..] {
        [one] => one,
        _ => {
            return Err(bad(
                "watch.deliver: give exactly one of `exec = [\"program\", ..]`, `maildir = \"path\"`, `webhook = \"https://..\"`, `nats = \"nats://..\"`, `redis = \"redis://..\"` or `amqp = \"amqp://..\"`".into(),
            ));
        }
    };
    // Which destination each optional key belongs to.
    let keys: [(&str, bool, &[&str]); 18] = [
        (
            "timeout",
            d.timeout.is_some(),
            &["exec", "webhook", "nats", "redis", "amqp"],
        ),
        ("stream", d.stream.is_some(), &["redis"]),
        ("password", d.password.is_some(), &["redis", "amqp"]),
        ("user", d.user.is_some(), &["amqp"]),
        ("exchange", d.exchange.is_some(), &["amqp"]),
        ("routing_key", d.routing_key.is_some(), &["amqp"]),
        ("dedupe_for", d.dedupe_for.is_some(), &["redis"]),
        ("subject", d.subject.is_some(), &["nats"]),
        ("token", d.token.is_some(), &["nats"]),
        ("pass_env", d.pass_env.is_some(), &["exec"]),
        ("stdin", d.stdin.is_some(), &["exec"]),
        ("mode", d.mode.is_some(), &["maildir"]),
        ("secret", d.secret.is_some(), &["webhook"]),
        ("format", d.format.is_some(), &["webhook", "nats", "redis", "amqp"]),
        ("ca_file", d.ca_file.is_some(), &["webhook"]),
        ("allow_http", d.allow_http.is_some(), &["webhook"]),
        (
            "attachments",
            d.attachments.is_some() || d.attachment_max.is_some(),
            &["exec", "webhook"],
        ),
        ("raw", d.raw.is_some(), &["exec", "webhook"]),
    ];
    for (key, given, applies) in keys {
        if given && !applies.contains(&kind) {
            return Err(bad(format!(
                "watch.deliver: `{key}` applies to {} only, not to `{kind}`",
                applies
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        }
    }
    if d.timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(bad("watch.deliver.timeout must be more than 0s".into()));
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
                            "watch.deliver.mode: {text:?} is not an octal file mode that lets inboxd read and write (e.g. \"0600\" or \"0640\")"
                        )));
                    }
                },
            };
            Deliver::Maildir {
                path: ctx.base.join(d.maildir.unwrap_or_default()),
                mode,
            }
        }
        "amqp" => {
            if !cfg!(feature = "amqp") {
                return Err(bad(
                    "watch.deliver: this inboxd was built without the `amqp` feature".into()
                ));
            }
            let url = d.amqp.unwrap_or_default();
            if !url.starts_with("amqp://") {
                return Err(bad(format!(
                    "watch.deliver.amqp: {url:?} is not an amqp:// URL (amqps:// is not supported yet)"
                )));
            }
            if url.contains('@') {
                return Err(bad(
                    "watch.deliver.amqp: put no credentials in the URL; use `user` and `password`".into(),
                ));
            }
            Deliver::Amqp {
                url,
                user: d.user.unwrap_or_else(|| "guest".into()),
                password: d.password.map(|s| s.relative_to(&ctx.base)),
                exchange: d.exchange.unwrap_or_default(),
                routing_key: d.routing_key.unwrap_or_else(|| "inboxd.{account}.{folder}".into()),
                payload: payload(d.format, RawFormat::Json),
                timeout: d.timeout.map_or(Duration::from_secs(10), |x| x.0),
            }
        }
        "redis" => {
            if !cfg!(feature = "redis") {
                return Err(bad(
                    "watch.deliver: this inboxd was built without the `redis` feature".into()
                ));
            }
            let url = d.redis.unwrap_or_default();
            if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
                return Err(bad(format!("watch.deliver.redis: {url:?} is not a redis:// URL")));
            }
            if url.contains('@') {
                return Err(bad(
                    "watch.deliver.redis: put no password in the URL; use `password` (a secret source)".into(),
                ));
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
                return Err(bad(
                    "watch.deliver: this inboxd was built without the `nats` feature".into()
                ));
            }
            let subject = d.subject.unwrap_or_else(|| "inboxd.{account}.{folder}".into());
            if subject.is_empty() || subject.contains(char::is_whitespace) || subject.contains(['*', '>']) {
                return Err(bad(format!(
                    "watch.deliver.subject: {subject:?} is not a subject to publish to (no spaces or wildcards)"
                )));
            }
            Deliver::Nats {
                servers: d.nats.unwrap_or_default(),
                subject,
                payload: payload(d.format, RawFormat::Json),
                token: d.token.map(|s| s.relative_to(&ctx.base)),
                timeout: d.timeout.map_or(Duration::from_secs(10), |x| x.0),
            }
        }
        _ => {
            let url = d.webhook.unwrap_or_default();
            let parsed = reqwest::Url::parse(&url)
                .map_err(|e| bad(format!("watch.deliver.webhook: {url:?} is not a URL: {e}")))?;
            let loopback = parsed.host_str().is_some_and(is_loopback);
            match parsed.scheme() {
                "https" => {}
                "http" if loopback || d.allow_http == Some(true) => {}
                "http" => {
                    return Err(bad(format!(
                        "watch.deliver.webhook: plain http:// to {:?} would send mail in clear; use https://, or allow_http = true",
                        parsed.host_str().unwrap_or("")
                    )));
                }
                other => return Err(bad(format!("watch.deliver.webhook: unsupported scheme {other:?}"))),
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err(bad(
                    "watch.deliver.webhook: put no credentials in the URL; sign with `secret` instead".into(),
                ));
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
