//! One `[accounts.NAME]` table, validated.

use std::path::Path;
use std::time::Duration;

use inboxd_core::schedule::{Schedule, Stage};
use inboxd_core::wait::WaitPolicy;
use toml::Spanned;

use super::raw::{RawAccount, RawGrant, RawOAuth2, RawThumbprint, parse_fingerprint};
use super::{Account, Auth, AuthMechanism, ConfigError, Ctx, Limits, Provider, Timeouts, TlsMode, is_loopback};
use crate::oauth2::{Grant, Thumbprint, TokenSource};

/// Validates one account. `token_sources` holds one token cache per credential, found by
/// structural equality of the grant (which compares literal secrets by value): two accounts
/// share a cache only when they would ask the token endpoint the very same question.
pub(super) fn build(
    ctx: &Ctx<'_>,
    name: String,
    spanned: Spanned<RawAccount>,
    token_sources: &mut Vec<(Grant, TokenSource)>,
) -> Result<Account, ConfigError> {
    let span = spanned.span();
    let a = spanned.into_inner();
    let preset = a.provider;
    let tls = a.tls.unwrap_or(if preset.is_some() {
        TlsMode::Implicit
    } else {
        TlsMode::default()
    });
    let (host, host_span) = match (&a.host, preset) {
        (Some(h), _) => (h.get_ref().clone(), h.span()),
        (None, Some(p)) => (p.host().to_string(), span.clone()),
        (None, None) => {
            return Err(ctx.invalid(
                Some(span),
                format!("accounts.{name}: missing field `host` (or a `provider`)"),
            ));
        }
    };
    if tls == TlsMode::None && !is_loopback(&host) {
        return Err(ctx.invalid(
            Some(host_span),
            format!("accounts.{name}.tls: \"none\" is only allowed for loopback hosts, not {host:?}"),
        ));
    }
    let auth = match (a.password, a.oauth2) {
        (Some(p), None) => Auth::Password(p.relative_to(&ctx.base)),
        (None, Some(o)) => {
            let osp = o.span();
            let grant = oauth2_grant(o.into_inner(), preset, &a.user, &ctx.base)
                .map_err(|m| ctx.invalid(Some(osp.clone()), format!("accounts.{name}.oauth2: {m}")))?;
            let refresh_at = grant.1;
            let source = match token_sources.iter().find(|(g, _)| *g == grant.0) {
                Some((_, source)) => source.clone(),
                None => {
                    let source = TokenSource::new(name.clone(), grant.0.clone(), refresh_at)
                        .map_err(|e| ctx.invalid(Some(osp.clone()), format!("accounts.{name}.oauth2: {e}")))?;
                    token_sources.push((grant.0, source.clone()));
                    source
                }
            };
            Auth::OAuth2(source)
        }
        _ => {
            return Err(ctx.invalid(
                Some(span),
                format!("accounts.{name}: give exactly one of `password` or `oauth2`"),
            ));
        }
    };
    let oauth = matches!(auth, Auth::OAuth2(_));
    let fits = match a.auth {
        AuthMechanism::Auto => true,
        AuthMechanism::Login | AuthMechanism::Plain => !oauth,
        AuthMechanism::Xoauth2 | AuthMechanism::Oauthbearer => oauth,
    };
    if !fits {
        return Err(ctx.invalid(
            Some(span),
            format!(
                "accounts.{name}.auth: {:?} does not fit this account's credentials",
                a.auth
            ),
        ));
    }
    let schedule = match a.reconnect {
        None => Schedule::default(),
        Some(stages) => {
            let sp = stages.span();
            let stages = stages
                .into_inner()
                .into_iter()
                .map(|s| Stage {
                    every: s.every.0,
                    until: s.until.map(|d| d.0),
                })
                .collect();
            Schedule::new(stages).map_err(|e| ctx.invalid(Some(sp), format!("accounts.{name}.reconnect: {e}")))?
        }
    };
    let d = Timeouts::default();
    let t = a.timeouts;
    let timeouts = Timeouts {
        connect: t.connect.map_or(d.connect, |x| x.0),
        tls: t.tls.map_or(d.tls, |x| x.0),
        greeting: t.greeting.map_or(d.greeting, |x| x.0),
        login: t.login.map_or(d.login, |x| x.0),
        command: t.command.map_or(d.command, |x| x.0),
        done: t.done.map_or(d.done, |x| x.0),
        idle_silence: t.idle_silence.map_or(d.idle_silence, |x| x.0),
        keepalive: t.keepalive.map_or(d.keepalive, |x| x.0).max(Duration::from_secs(1)),
    };
    for (key, value) in [
        ("connect", timeouts.connect),
        ("tls", timeouts.tls),
        ("greeting", timeouts.greeting),
        ("login", timeouts.login),
        ("command", timeouts.command),
        ("done", timeouts.done),
        ("idle_silence", timeouts.idle_silence),
    ] {
        if value.is_zero() {
            return Err(ctx.invalid(
                Some(span.clone()),
                format!("accounts.{name}.timeouts.{key} must be more than 0s"),
            ));
        }
    }
    if a.port == Some(0) {
        return Err(ctx.invalid(
            Some(span.clone()),
            format!("accounts.{name}.port must be between 1 and 65535"),
        ));
    }
    let w = WaitPolicy::default();
    let wait = WaitPolicy {
        idle_refresh: a.idle_refresh.map_or(w.idle_refresh, |x| x.0),
        poll_interval: a.poll_interval.map_or(w.poll_interval, |x| x.0),
        recycle_after: a.recycle_after.map_or(w.recycle_after, |x| x.0),
        use_idle: a.idle.unwrap_or(w.use_idle),
        notify: a.notify.unwrap_or(w.notify),
    };
    for (key, value) in [
        ("idle_refresh", wait.idle_refresh),
        ("poll_interval", wait.poll_interval),
        ("recycle_after", wait.recycle_after),
    ] {
        if value.is_zero() {
            return Err(ctx.invalid(
                Some(span.clone()),
                format!("accounts.{name}.{key} must be more than 0s"),
            ));
        }
    }
    if a.tls_fingerprint.is_some() && a.ca_file.is_some() {
        return Err(ctx.invalid(
            Some(span.clone()),
            format!("accounts.{name}: give `ca_file` or `tls_fingerprint`, not both"),
        ));
    }
    let tls_fingerprint = match &a.tls_fingerprint {
        None => None,
        Some(text) => Some(parse_fingerprint(text).ok_or_else(|| {
            ctx.invalid(
                Some(span.clone()),
                format!("accounts.{name}.tls_fingerprint: {text:?} is not \"sha256:\" followed by 64 hex digits"),
            )
        })?),
    };
    let max_connections = match a.max_connections {
        Some(n) if *n.get_ref() == 0 => {
            return Err(ctx.invalid(Some(n.span()), format!("accounts.{name}.max_connections: at least 1")));
        }
        n => n.map(|n| *n.get_ref() as usize),
    };
    let account = Account {
        name: name.clone(),
        port: a.port.unwrap_or(if tls == TlsMode::Implicit { 993 } else { 143 }),
        host,
        tls,
        ca_file: a.ca_file.map(|p| ctx.base.join(p)),
        tls_fingerprint,
        user: a.user,
        auth,
        provider: preset,
        mechanism: a.auth,
        identity: a.identity,
        wait,
        schedule,
        stable_after: a.stable_after.map_or(Duration::from_secs(300), |x| x.0),
        park_for: a.park_for.map_or(Duration::from_secs(3600), |x| x.0),
        timeouts,
        limits: Limits {
            max_connections,
            ..Limits::default()
        },
    };
    Ok(account)
}

/// Builds the grant from the `oauth2` table, filling in the provider's defaults.
fn oauth2_grant(o: RawOAuth2, preset: Option<Provider>, user: &str, base: &Path) -> Result<(Grant, f64), String> {
    let scopes = o
        .scopes
        .clone()
        .unwrap_or_else(|| preset.map(|p| vec![p.scope().to_string()]).unwrap_or_default());
    let token_url = match (&o.token_url, preset, &o.tenant) {
        (Some(u), _, _) => Some(u.clone()),
        (None, Some(Provider::Microsoft365), Some(t)) => {
            Some(format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token"))
        }
        (None, Some(Provider::Gmail), _) => Some(crate::oauth2::grant::GOOGLE_TOKEN_URL.to_string()),
        _ => None,
    };
    if let Some(url) = &token_url {
        // The token endpoint gets client secrets and refresh tokens: TLS, as for IMAP, unless
        // it is on this machine.
        let host = url
            .strip_prefix("http://")
            .map(|rest| rest.split(['/', '?']).next().unwrap_or(""))
            .map(|authority| match authority.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
                _ => authority,
            });
        match host {
            Some(h) if !is_loopback(h) => {
                return Err(format!(
                    "`token_url` {url:?} is plain http to a host that is not loopback; use https"
                ));
            }
            None if !url.starts_with("https://") => {
                return Err(format!("`token_url` {url:?} is not an https:// URL"));
            }
            _ => {}
        }
    }
    let need_url = || {
        token_url
            .clone()
            .ok_or_else(|| "needs `token_url` (or `provider = \"microsoft365\"` with `tenant`)".to_string())
    };
    let need_id = || o.client_id.clone().ok_or_else(|| "needs `client_id`".to_string());
    let refresh_at = o.refresh_at.unwrap_or(0.8);
    if !(0.1..=1.0).contains(&refresh_at) {
        return Err("`refresh_at` must be between 0.1 and 1.0".into());
    }
    let grant = match o.grant {
        RawGrant::ClientCredentials => match (o.client_secret, o.certificate, o.private_key) {
            (Some(secret), None, None) => Grant::ClientSecret {
                token_url: need_url()?,
                client_id: need_id()?,
                secret: secret.relative_to(base),
                scopes,
            },
            (None, Some(certificate), Some(private_key)) => Grant::ClientCertificate {
                token_url: need_url()?,
                client_id: need_id()?,
                certificate: base.join(certificate),
                private_key: private_key.relative_to(base),
                thumbprint: match o.thumbprint {
                    Some(RawThumbprint::Sha1) => Thumbprint::Sha1,
                    _ => Thumbprint::Sha256,
                },
                scopes,
            },
            _ => return Err("client_credentials needs `client_secret`, or `certificate` and `private_key`".into()),
        },
        RawGrant::RefreshToken => Grant::RefreshToken {
            token_url: need_url()?,
            client_id: need_id()?,
            secret: o.client_secret.map(|s| s.relative_to(base)),
            refresh_token: o
                .refresh_token
                .ok_or("refresh_token grant needs `refresh_token`")?
                .relative_to(base),
            scopes,
        },
        RawGrant::JwtBearer => Grant::JwtBearer {
            token_url,
            key: o
                .service_account_key
                .ok_or("jwt_bearer grant needs `service_account_key`")?
                .relative_to(base),
            subject: o.subject.unwrap_or_else(|| user.to_string()),
            scopes,
        },
        RawGrant::Command => {
            let argv = o
                .command
                .filter(|c| !c.is_empty())
                .ok_or("command grant needs `command = [\"program\", ..]`")?;
            Grant::Command {
                argv,
                cwd: base.to_path_buf(),
            }
        }
    };
    Ok((grant, refresh_at))
}
