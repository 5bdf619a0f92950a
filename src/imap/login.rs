//! Connecting and logging in: greeting, capabilities, STARTTLS, LOGIN / AUTHENTICATE.

use super::*;

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
        // Held for the session's life: at most `connections_per_host` sessions to this host and
        // `max_connections` of this account at once (a watch beyond them waits here).
        let slots = connect::connection_slots(account).await;
        // Held until the session is logged in (or the attempt failed).
        let _slot = connect::attempt_slot(&account.host, account.limits.attempts_per_host).await;
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
                        message: super::error::explained(humanize(&m)),
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
            special: std::collections::HashMap::new(),
            _slots: slots,
            utf8: false,
            idling: None,
            idle_base: 0,
        };
        // Logged in: messages may come now. The watcher narrows this to its own limit.
        meter.set_max_literal(crate::config::MAX_MESSAGE_SIZE_LIMIT + guard::PRE_LOGIN_LITERAL);
        session.refresh_capabilities().await?;
        if session.has("UTF8=ACCEPT") {
            // RFC 6855: folder names as UTF-8 from here on (the guard lets them through).
            match session.checked("ENABLE", "ENABLE UTF8=ACCEPT", |_| {}).await {
                Ok(()) => {
                    session.utf8 = true;
                    meter.set_utf8(true);
                }
                // A server that advertises it but refuses the ENABLE: modified UTF-7 as before.
                Err(ImapError::Rejected { text, .. }) => {
                    tracing::debug!(server = %text, "ENABLE UTF8=ACCEPT refused; folder names in modified UTF-7");
                }
                Err(e) => return Err(e),
            }
        }
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

/// `CAPABILITY` before login, for servers whose greeting does not list them (and after
/// STARTTLS, where earlier ones must not be trusted).
pub(super) async fn pre_login_capabilities(
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

pub(super) fn capability_name(c: &async_imap::imap_proto::Capability<'_>) -> String {
    match c {
        async_imap::imap_proto::Capability::Imap4rev1 => "IMAP4REV1".into(),
        async_imap::imap_proto::Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
        async_imap::imap_proto::Capability::Atom(a) => a.to_ascii_uppercase(),
    }
}

pub(super) async fn greeting<T>(
    client: &mut async_imap::Client<T>,
    after: Duration,
) -> Result<HashSet<String>, ImapError>
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
