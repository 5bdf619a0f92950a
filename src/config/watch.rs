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
        ("mqtt", d.mqtt.is_some()),
    ];
    let kind = match given.iter().filter(|(_, g)| *g).map(|(k, _)| *k).collect::<Vec<_>>()[..] {
        [one] => one,
        _ => {
            return Err(bad(
                "watch.deliver: give exactly one of `exec = [\"program\", ..]`, `maildir = \"path\"`, `webhook = \"https://..\"`, `nats = \"nats://..\"`, `redis = \"redis://..\"`, `amqp = \"amqp://..\"` or `mqtt = \"mqtt://..\"`".into(),
            ));
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
        ("ca_file", d.ca_file.is_some(), &["webhook"]),
        ("allow_http", d.allow_http.is_some(), &["webhook"]),
        ("subject", d.subject.is_some(), &["nats"]),
        ("token", d.token.is_some(), &["nats"]),
        ("stream", d.stream.is_some(), &["redis"]),
        ("dedupe_for", d.dedupe_for.is_some(), &["redis"]),
        ("exchange", d.exchange.is_some(), &["amqp"]),
        ("routing_key", d.routing_key.is_some(), &["amqp"]),
        ("topic", d.topic.is_some(), &["mqtt"]),
        ("user", d.user.is_some(), &["amqp", "mqtt"]),
        ("password", d.password.is_some(), &["redis", "amqp", "mqtt"]),
        ("attachment_max", d.attachment_max.is_some(), SENDERS),
    ];
    for (key, given, applies) in keys {
        if given && !applies.contains(&kind) {
            return Err(bad(format!(
                "watch.deliver: `{key}` applies to {} only, not to `{kind}`",
                applies.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ")
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
        "mqtt" => {
            if !cfg!(feature = "mqtt") {
                return Err(bad(
                    "watch.deliver: this inboxd was built without the `mqtt` feature".into()
                ));
            }
            let url = d.mqtt.unwrap_or_default();
            if !url.starts_with("mqtt://") || url.contains('@') {
                return Err(bad(format!(
                    "watch.deliver.mqtt: {url:?} is not an mqtt://host[:port] URL (credentials go in `user` and `password`; mqtts:// is not supported yet)"
                )));
            }
            let topic = d.topic.unwrap_or_else(|| "inboxd/{account}/{folder}".into());
            if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                return Err(bad(format!(
                    "watch.deliver.topic: {topic:?} is not a topic to publish to (no wildcards)"
                )));
            }
            Deliver::Mqtt {
                url,
                user: d.user,
                password: d.password.map(|s| s.relative_to(&ctx.base)),
                topic,
                payload: payload(d.format, RawFormat::Json),
                timeout: d.timeout.map_or(Duration::from_secs(10), |x| x.0),
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
            } = &c.watches[0].deliver
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
}
