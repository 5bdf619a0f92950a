//! One `[[watch]]` table, validated.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use inboxd_core::mailbox::{StartPolicy, UidValidityPolicy};
use inboxd_core::retry::RetryPolicy;
use toml::Spanned;

use super::raw::{RawStart, RawUidValidity, RawWatch};
use super::{
    Account, ConfigError, Ctx, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_SPOOL_ABOVE, Deliver, MAX_MESSAGE_SIZE_LIMIT,
    SPOOL_ABOVE_RANGE, Watch,
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
    let dspan = w.deliver.span();
    let d = w.deliver.into_inner();
    if d.maildir.is_some() && (d.pass_env.is_some() || d.timeout.is_some()) {
        return Err(ctx.invalid(
            Some(dspan),
            "watch.deliver: `timeout` and `pass_env` apply to `exec` only".into(),
        ));
    }
    if d.exec.is_some() && d.mode.is_some() {
        return Err(ctx.invalid(Some(dspan), "watch.deliver: `mode` applies to `maildir` only".into()));
    }
    let mode = match &d.mode {
        None => crate::handler::maildir::DEFAULT_MODE,
        Some(text) => match u32::from_str_radix(text, 8) {
            Ok(m) if m <= 0o777 && m & 0o600 == 0o600 => m,
            _ => {
                return Err(ctx.invalid(
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
            cwd: ctx.base.clone(),
            pass_env: d.pass_env.unwrap_or_default(),
        },
        (None, Some(path)) => Deliver::Maildir {
            path: ctx.base.join(path),
            mode,
        },
        _ => {
            return Err(ctx.invalid(
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
