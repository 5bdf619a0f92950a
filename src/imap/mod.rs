//! The IMAP session layer: the only module that knows about `async-imap`.
//!
//! [`Session::open`] connects, secures, greets and logs in with a deadline on every phase;
//! the methods of [`Session`] are the few commands inboxd needs, each with a deadline. Fetches
//! use `BODY.PEEK[]`, so fetching never sets `\Seen`.
//!
//! **Architecture Invariant:** no type of `async-imap` or `imap-proto` appears in this module's
//! public API; swapping the IMAP crate touches this folder only.

pub(crate) mod connect;
mod error;
mod fetch;
#[doc(hidden)]
pub mod fuzz;
pub mod guard;
mod idle;
mod login;
pub mod mutf7;
mod notify;
pub mod sasl;

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use async_imap::Authenticator;
use async_imap::imap_proto::{AttributeValue, MailboxDatum, Response, ResponseCode, Status};
use inboxd_core::failure::FailureClass;
use inboxd_core::mailbox::{NewsSeen, sequence_set};

pub use connect::Conn;
pub use error::ImapError;
pub(crate) use error::clip;
use error::*;
use fetch::*;
use login::*;

use self::sasl::Mechanism;
use crate::config::{Account, Auth, AuthMechanism, Timeouts, TlsMode};
use crate::oauth2::TokenError;
use crate::secret::SecretError;

type Inner = async_imap::Session<guard::Guard<Conn>>;

/// What SELECT reported, with UIDNEXT resolved even when the server omitted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderState {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub exists: u32,
}

/// One message of a listing: its UID, and what the server said of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub uid: u32,
    /// RFC822.SIZE, when the server gave it.
    pub size: Option<u32>,
    /// INTERNALDATE as the server wrote it (`17-Jul-1996 02:44:25 -0700`).
    pub internal_date: Option<String>,
    pub flags: Vec<String>,
    /// Gmail's identities and labels, where the server offers `X-GM-EXT-1`.
    pub gmail: Option<Gmail>,
}

/// What Gmail says of a message besides IMAP's view (`X-GM-EXT-1`): its identity across
/// labels (`X-GM-MSGID`), its conversation (`X-GM-THRID`) and its labels (`X-GM-LABELS`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gmail {
    pub msgid: u64,
    pub thrid: u64,
    pub labels: Vec<String>,
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
    /// The server reported new mail (a message count above the one known when the IDLE
    /// began) before anything else.
    NewMail,
    /// The wait reached its maximum length (`idle_refresh` or `poll_interval`).
    Elapsed,
    /// No byte from the server for `idle_silence`.
    Silence,
    /// The caller interrupted the wait (queued work, stop).
    Interrupted,
}

/// What one write of the wake path brought back ([`Session::select_and_list`],
/// [`Session::list_news`]).
struct WakeRead {
    /// The SELECT's answer and outcome, if one was sent.
    select: Option<(SelectAnswer, Result<(), ImapError>)>,
    /// The listing's outcome; its items (and each one's sequence number, in `seqs`).
    listing: Result<(), ImapError>,
    listed: Vec<Listing>,
    seqs: Vec<u32>,
    /// The bodies read with them.
    bodies: Vec<Fetched>,
    /// The server said something besides new mail: an EXPUNGE, an untagged NO or BAD, a
    /// smaller count.
    other_news: bool,
    /// The message count when the IDLE's answer came (before the listing ran).
    announced: u32,
}

/// Whether an untagged response says nothing but "new mail" about the selected folder.
fn only_new_mail(resp: &Response<'_>, known: u32) -> bool {
    match resp {
        Response::MailboxData(MailboxDatum::Exists(n)) => *n >= known,
        Response::MailboxData(MailboxDatum::Recent(_)) | Response::Fetch(..) | Response::Continue { .. } => true,
        Response::Data { status, .. } => *status == Status::Ok,
        _ => false,
    }
}

/// What a SELECT's untagged answers said.
#[derive(Default)]
struct SelectAnswer {
    exists: u32,
    uidvalidity: Option<u32>,
    uidnext: Option<u32>,
}

impl SelectAnswer {
    fn note(&mut self, resp: &Response<'_>) {
        match resp {
            Response::MailboxData(MailboxDatum::Exists(n)) => self.exists = *n,
            Response::Data {
                status: Status::Ok,
                outcome,
            } => match outcome.code {
                Some(ResponseCode::UidValidity(v)) => self.uidvalidity = Some(v),
                Some(ResponseCode::UidNext(n)) => self.uidnext = Some(n),
                _ => {}
            },
            _ => {}
        }
    }
}

/// The session's end a `* BYE` announces, with the server's text (capped).
fn bye(resp: &Response<'_>) -> ImapError {
    let text = match resp {
        Response::Data { outcome, .. } => outcome.information.as_deref().unwrap_or(""),
        _ => "",
    };
    ImapError::Bye(clip(text.to_string(), MAX_TEXT))
}

/// A command's tagged answer as a result: OK, or the refusal with the server's text
/// (explained where inboxd knows what it means).
fn tagged(
    phase: &'static str,
    status: &Status,
    outcome: &async_imap::imap_proto::Outcome<'_>,
) -> Result<(), ImapError> {
    if *status == Status::Ok {
        return Ok(());
    }
    let text = error::explained(outcome_text(outcome));
    match status {
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
    }
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
    /// Special uses resolved on this connection (`\\Junk` -> its folder): one LIST per session.
    special: std::collections::HashMap<String, String>,
    /// The connection slots (per host, per account) this session holds while it lives (held
    /// for what dropping them does: they free the slots).
    _slots: connect::Slots,
    /// UTF8=ACCEPT is enabled (RFC 6855): folder names go and come as UTF-8, not modified
    /// UTF-7.
    utf8: bool,
    /// An IDLE left open by [`Session::idle`] (its tag): DONE goes out with the next command.
    idling: Option<async_imap::imap_proto::RequestId>,
    /// The message count when the last IDLE began (the new messages' numbers start above it:
    /// [`Session::list_news`]).
    idle_base: u32,
}

impl Session {
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

    /// Whether folder names travel as UTF-8 (UTF8=ACCEPT enabled) rather than modified UTF-7.
    pub fn utf8_names(&self) -> bool {
        self.utf8
    }

    /// A folder name (as people read it) as a command argument: quoted UTF-8 once UTF8=ACCEPT
    /// is enabled, else modified UTF-7 (RFC 3501 §5.1.3), quoted.
    fn mailbox(&self, folder: &str) -> String {
        if self.utf8 {
            quote(folder)
        } else {
            quote(&mutf7::encode(folder))
        }
    }

    /// SELECTs a folder. UIDNEXT comes from SELECT, else STATUS, else the highest UID + 1.
    /// Sent through the status-checking path, so a refusal keeps its response code
    /// (`[NONEXISTENT]` parks the watch, `[UNAVAILABLE]` does not).
    pub async fn select(&mut self, folder: &str) -> Result<FolderState, ImapError> {
        let mut answer = SelectAnswer::default();
        let result = self
            .checked_inner("SELECT", &format!("SELECT {}", self.mailbox(folder)), false, |resp| {
                answer.note(resp)
            })
            .await;
        self.selected_as(folder, result, answer).await
    }

    /// SELECT and the listing of UIDs above `last_uid` (up to `upto`) sent together: one round
    /// trip instead of two, on the wake path. The server answers commands in order, so the
    /// listing is of the folder as just selected, exactly as if it had been sent after the
    /// SELECT's OK; a UID it names at or above the SELECT's UIDNEXT arrived in between, as it
    /// could have then. The outer error is the SELECT's (or the connection's); the listing's
    /// own refusal (after a SELECT that failed, for one) is the inner one.
    ///
    /// With `bodies` (`from`, `to`, `max_bytes`), a third command in the same write reads the
    /// first `max_bytes` of each message with a UID from `from` to `to` (`BODY.PEEK[]<0.n>`):
    /// returned as they came, each at most `max_bytes` long, whole or not (the caller
    /// compares each with its listed size); nothing when the server refuses that command.
    #[allow(clippy::type_complexity)]
    pub async fn select_and_list(
        &mut self,
        folder: &str,
        last_uid: u32,
        upto: Option<u32>,
        bodies: Option<(u32, u32, u32)>,
    ) -> Result<(FolderState, Result<Vec<Listing>, ImapError>, Vec<Fetched>), ImapError> {
        let select = format!("SELECT {}", self.mailbox(folder));
        let read = self.wake_read(Some(&select), last_uid, upto, bodies).await?;
        let Some((answer, selected)) = read.select else {
            return Err(ImapError::Unexpected {
                command: "SELECT",
                detail: "the SELECT went unanswered".into(),
            });
        };
        // The count as the listing left it: the SELECT's, updated by what came after it.
        let exists_after = self.exists;
        let state = self.selected_as(folder, selected, answer).await?;
        self.exists = exists_after;
        Ok((state, read.listing.map(|()| read.listed), read.bodies))
    }

    /// The wake path after an IDLE that new mail alone ended ([`WaitEnd::NewMail`]): DONE,
    /// the listing and the bodies (as [`Session::select_and_list`] sends them) in one write,
    /// without a SELECT: the folder as selected, its message count since known.
    ///
    /// Also returned: what the session saw from the IDLE on (the counts, each listed message's
    /// number, whether anything besides new mail was said: an EXPUNGE, an untagged NO or BAD,
    /// a smaller count), for the core to decide whether the listing can be trusted without a
    /// SELECT (`inboxd_core::mailbox::news_fit`). The listing is returned either way.
    #[allow(clippy::type_complexity)]
    pub async fn list_news(
        &mut self,
        last_uid: u32,
        upto: Option<u32>,
        bodies: Option<(u32, u32, u32)>,
    ) -> Result<(Result<Vec<Listing>, ImapError>, Vec<Fetched>, NewsSeen), ImapError> {
        let base = self.idle_base;
        let read = self.wake_read(None, last_uid, upto, bodies).await?;
        let seen = NewsSeen {
            base,
            announced: read.announced,
            count: self.exists,
            listed: read.listed.iter().map(|l| l.uid).zip(read.seqs).collect(),
            listing_ok: read.listing.is_ok(),
            other_news: read.other_news,
        };
        Ok((read.listing.map(|()| read.listed), read.bodies, seen))
    }

    /// One write of [DONE,] [SELECT,] listing [, bodies], and their answers; see
    /// [`Session::select_and_list`] and [`Session::list_news`].
    async fn wake_read(
        &mut self,
        select: Option<&str>,
        last_uid: u32,
        upto: Option<u32>,
        bodies: Option<(u32, u32, u32)>,
    ) -> Result<WakeRead, ImapError> {
        let list = self.list_command(last_uid, upto);
        let read =
            bodies.map(|(from, to, max)| format!("UID FETCH {from}:{} (UID BODY.PEEK[]<0.{max}>)", to.max(from)));
        if let Some((_, _, max)) = bodies {
            // A server that ignores the range is refused as it would be in a batch of messages
            // at most `max` long.
            self.set_max_literal(u64::from(max).saturating_mul(2));
        }
        let mut answer = SelectAnswer::default();
        let mut out = WakeRead {
            select: None,
            listing: Ok(()),
            listed: Vec::new(),
            seqs: Vec::new(),
            bodies: Vec::new(),
            other_news: false,
            announced: self.exists,
        };
        // An IDLE still open ends with a DONE written just before the SELECT: its answer is
        // read with theirs, not waited for first.
        let mut idle_open = self.idling.take();
        let t = self.timeouts.command;
        let first = if select.is_some() { "SELECT" } else { "UID FETCH" };
        let inner = &mut self.inner;
        let saw_news = &mut self.news;
        let known = &mut self.exists;
        let meter = self.meter.clone();
        let counter = self.meter.clone();
        let all = progress_deadline(first, t, &meter, async {
            if idle_open.is_some() {
                inner.run_command_untagged("DONE").await.map_err(cmd("DONE"))?;
            }
            let select_id = match select {
                Some(select) => Some(inner.run_command(select).await.map_err(cmd("SELECT"))?),
                None => None,
            };
            let list_id = inner.run_command(&list).await.map_err(cmd("UID FETCH"))?;
            let read_id = match &read {
                Some(read) => Some(inner.run_command(read).await.map_err(cmd("UID FETCH"))?),
                None => None,
            };
            // Without a SELECT the folder is the one selected: as if its SELECT had succeeded.
            let mut selected: Option<Result<(), ImapError>> = select_id.is_none().then_some(Ok(()));
            let mut listing: Option<Result<(), ImapError>> = None;
            let mut read_done = read_id.is_none();
            loop {
                let phase = if selected.is_none() { "SELECT" } else { "UID FETCH" };
                let resp = inner
                    .read_response()
                    .await
                    .map_err(|e| at_byte(cmd(phase)(e.into()), counter.read()))?
                    .ok_or_else(|| ImapError::Bye(format!("connection closed during {phase}")))?;
                match resp.parsed() {
                    Response::Done { tag, status, outcome } if idle_open.as_ref() == Some(tag) => {
                        idle_open = None;
                        tagged("DONE", status, outcome)?;
                        // The count the IDLE ended with: all of it is the listing's to name.
                        out.announced = *known;
                    }
                    // What came before the IDLE's answer came during the wait: the SELECT
                    // and the listing sent after it cover it, so it is not news during them.
                    other if idle_open.is_some() && !matches!(other, Response::Done { .. }) => {
                        out.other_news |= !only_new_mail(other, *known);
                        idle::note_unsolicited(other, known, &mut false)?;
                    }
                    Response::Done { tag, status, outcome } if select_id.as_ref() == Some(tag) => {
                        selected = Some(tagged("SELECT", status, outcome));
                        // What comes after is news against the folder as selected.
                        *known = answer.exists;
                    }
                    Response::Done { tag, status, outcome } if *tag == list_id => {
                        if selected.is_none() {
                            return Err(ImapError::Unexpected {
                                command: "SELECT",
                                detail: "the listing was answered before the SELECT".into(),
                            });
                        }
                        listing = Some(tagged("UID FETCH", status, outcome));
                        if read_done {
                            break;
                        }
                    }
                    // Dovecot runs the two FETCHes together: the bodies' answer may come before
                    // the listing's as well as after it.
                    Response::Done { tag, .. } if read_id.as_ref() == Some(tag) => {
                        if selected.is_none() {
                            return Err(ImapError::Unexpected {
                                command: "SELECT",
                                detail: "the bodies were answered before the SELECT".into(),
                            });
                        }
                        // Refused or not, the bodies are only a guess: what came is kept.
                        read_done = true;
                        if listing.is_some() {
                            break;
                        }
                    }
                    resp @ Response::Data {
                        status: Status::Bye, ..
                    } => return Err(bye(resp)),
                    other if selected.is_none() => answer.note(other),
                    // After the SELECT: as `checked` treats a listing's responses.
                    Response::MailboxData(MailboxDatum::Exists(n)) => {
                        out.other_news |= *n < *known;
                        if *n > *known {
                            *saw_news = true;
                        }
                        *known = *n;
                    }
                    Response::Expunge(_) => {
                        out.other_news = true;
                        *known = known.saturating_sub(1);
                    }
                    // The bodies are told from the listing's items by their section (they may
                    // come while the listing is still answered): each UID asked for once, each
                    // at most `max_bytes`.
                    Response::Fetch(seq, attrs) => match fetch::fetched_item(attrs) {
                        (Some(uid), Some(body)) => {
                            if let Some((from, to, max)) = bodies
                                && !read_done
                                && (from..=to).contains(&uid)
                                && body.len() <= max as usize
                                && !out.bodies.iter().any(|f: &Fetched| f.uid == uid)
                            {
                                out.bodies.push(Fetched {
                                    uid,
                                    body: body.to_vec(),
                                });
                            }
                        }
                        (_, None) if listing.is_none() => {
                            if let Some(item) = fetch::listed_item(attrs) {
                                out.listed.push(item);
                                out.seqs.push(*seq);
                            }
                        }
                        _ => {}
                    },
                    other => out.other_news |= !only_new_mail(other, *known),
                }
            }
            Ok((selected, listing))
        })
        .await;
        let (selected, listing) = all?;
        let (Some(selected), Some(listing)) = (selected, listing) else {
            return Err(ImapError::Unexpected {
                command: first,
                detail: format!("the {first} or the listing went unanswered"),
            });
        };
        if select.is_some() {
            out.select = Some((answer, selected));
        }
        out.listing = listing;
        Ok(out)
    }

    /// The session after a SELECT answered `result` with `answer`.
    async fn selected_as(
        &mut self,
        folder: &str,
        result: Result<(), ImapError>,
        answer: SelectAnswer,
    ) -> Result<FolderState, ImapError> {
        let SelectAnswer {
            exists,
            uidvalidity,
            uidnext,
        } = answer;
        match result {
            Ok(()) => {}
            Err(ImapError::Rejected { text, .. }) => {
                self.selected = None;
                let message = if inboxd_core::failure::not_connected(&text) {
                    format!(
                        "{text} (Exchange accepted the login but cannot open the mailbox with it: the app or user has no access to this mailbox (app-only: grant the service principal FullAccess with Add-MailboxPermission), the user name is not the mailbox's address, or the mailbox has too many open connections (set max_connections))"
                    )
                } else {
                    text
                };
                return Err(ImapError::Select {
                    folder: folder.to_string(),
                    message,
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
                &format!("STATUS {} (UIDNEXT)", self.mailbox(folder)),
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
        self.end_idle().await?;
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
                        return tagged(phase, status, outcome);
                    }
                    resp @ Response::Data {
                        status: Status::Bye, ..
                    } => return Err(bye(resp)),
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
        let (set, quoted) = (sequence_set(uids), self.mailbox(folder));
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
        self.end_idle().await?;
        let t = self.timeouts.command;
        let name = if self.utf8 {
            folder.to_string()
        } else {
            mutf7::encode(folder)
        };
        deadline("APPEND", t, async {
            self.inner
                .append(name, None, None, message)
                .await
                .map_err(cmd("APPEND"))
        })
        .await
    }

    /// `CREATE`s a folder (its name as people read it).
    pub async fn create(&mut self, folder: &str) -> Result<(), ImapError> {
        let name = self.mailbox(folder);
        self.checked("CREATE", &format!("CREATE {name}"), |_| {}).await
    }

    /// Every folder (`LIST "" "*"`), by its readable name (as sent when it is not valid
    /// modified UTF-7), with its attributes (`\Noselect`, `\Junk`, ...).
    pub async fn folders(&mut self) -> Result<Vec<(String, Vec<String>)>, ImapError> {
        let mut out = Vec::new();
        self.checked("LIST", "LIST \"\" \"*\"", |resp| {
            if let Response::MailboxData(MailboxDatum::List(list)) = resp {
                // The parser hands a quoted name over with its escapes (`\"`, `\\`) still in.
                let name = unescape(&list.name);
                let attributes = list.name_attributes.iter().map(name_attribute).collect();
                out.push((name, attributes));
            }
        })
        .await?;
        let utf8 = self.utf8;
        let mut out: Vec<(String, Vec<String>)> = out.into_iter().map(|(n, a)| (readable(utf8, n), a)).collect();
        out.sort();
        Ok(out)
    }

    /// The selectable folders whose readable names match an IMAP LIST pattern (`Support/*`,
    /// `Kunden/%/Eingang`), matched here with the server's hierarchy delimiter.
    pub async fn folders_matching(&mut self, pattern: &str) -> Result<Vec<String>, ImapError> {
        let mut out = Vec::new();
        let utf8 = self.utf8;
        self.checked("LIST", "LIST \"\" \"*\"", |resp| {
            if let Response::MailboxData(MailboxDatum::List(list)) = resp {
                let name = unescape(&list.name);
                let readable = readable(utf8, name);
                let selectable = !list
                    .name_attributes
                    .iter()
                    .map(name_attribute)
                    .any(|a| a.eq_ignore_ascii_case("\\Noselect") || a.eq_ignore_ascii_case("\\NonExistent"));
                let delimiter = list.delimiter.as_deref().and_then(|d| d.chars().next());
                if selectable && inboxd_core::mailbox::pattern_matches(pattern, &readable, delimiter) {
                    out.push(readable);
                }
            }
        })
        .await?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The folder the server marks with a special use (`\\Junk`, RFC 6154), if one is.
    pub async fn special_use(&mut self, attribute: &str) -> Result<Option<String>, ImapError> {
        Ok(self
            .folders()
            .await?
            .into_iter()
            .find(|(_, attrs)| attrs.iter().any(|a| a.eq_ignore_ascii_case(attribute)))
            .map(|(name, _)| name))
    }

    /// The folder a configured name stands for: itself, or for a special use (`\\Junk`) the
    /// folder the server marks so. An error when no folder has that use.
    pub async fn resolve(&mut self, folder: &str) -> Result<String, ImapError> {
        if !folder.starts_with('\\') {
            return Ok(folder.to_string());
        }
        if let Some(known) = self.special.get(folder) {
            return Ok(known.clone());
        }
        let found = self.special_use(folder).await?.ok_or_else(|| ImapError::Select {
            folder: folder.to_string(),
            message: format!("[NONEXISTENT] no folder has the special use {folder} (RFC 6154)"),
        })?;
        self.special.insert(folder.to_string(), found.clone());
        Ok(found)
    }

    /// `NOOP`: a liveness probe that also lets the server report changes.
    pub async fn noop(&mut self) -> Result<(), ImapError> {
        self.end_idle().await?;
        let t = self.timeouts.command;
        deadline("NOOP", t, async { self.inner.noop().await.map_err(cmd("NOOP")) }).await?;
        self.drain_unsolicited();
        Ok(())
    }

    /// Runs a raw command and waits for its tagged OK (for commands this API lacks).
    pub async fn run(&mut self, command: &str) -> Result<(), ImapError> {
        self.end_idle().await?;
        let t = self.timeouts.command;
        deadline("command", t, async {
            self.inner
                .run_command_and_check_ok(command)
                .await
                .map_err(cmd("command"))
        })
        .await
    }

    /// LOGOUT under a deadline; errors are ignored, the connection is closed either way.
    pub async fn logout(mut self) {
        if self.end_idle().await.is_err() {
            // The connection is gone or wedged: nothing more to say on it.
            return;
        }
        let t = self.timeouts.done;
        let _ = tokio::time::timeout(t, self.inner.logout()).await;
    }
}

/// A LIST attribute as IMAP writes it (`\\Noselect`, `\\Junk`, ...).
fn name_attribute(a: &async_imap::imap_proto::NameAttribute<'_>) -> String {
    use async_imap::imap_proto::NameAttribute as A;
    match a {
        A::NoInferiors => "\\Noinferiors".into(),
        A::NoSelect => "\\Noselect".into(),
        A::Marked => "\\Marked".into(),
        A::Unmarked => "\\Unmarked".into(),
        A::All => "\\All".into(),
        A::Archive => "\\Archive".into(),
        A::Drafts => "\\Drafts".into(),
        A::Flagged => "\\Flagged".into(),
        A::Junk => "\\Junk".into(),
        A::Sent => "\\Sent".into(),
        A::Trash => "\\Trash".into(),
        A::Extension(s) => s.to_string(),
        _ => format!("{a:?}"),
    }
}

/// The content of an IMAP quoted string, its `\\` and `\"` escapes resolved.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some(next @ ('\\' | '"'))) => {
                out.push(next);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// A folder name as the server wrote it, as people read it: as is once UTF8=ACCEPT is
/// enabled, else decoded from modified UTF-7 (as sent when it is not valid modified UTF-7).
fn readable(utf8: bool, name: String) -> String {
    if utf8 {
        name
    } else {
        mutf7::decode(&name).unwrap_or(name)
    }
}

/// An IMAP quoted string (RFC 3501 §4.3).
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
