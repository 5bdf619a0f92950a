//! The driver: executes the actions of the watch machine and feeds back what happened.
//!
//! One loop: ask the machine for the next action, run it (an IMAP command, the handler, the
//! store, a timer), turn the outcome into an `Input`. Every decision (what comes next, when
//! the checkpoint advances, how long to wait) is the machine's; this file only executes, and
//! reports the machine's notices as events, log lines and health. A panic while executing an
//! action (for example in the IMAP parser on hostile bytes) is caught here and reported to the
//! machine as a dropped connection: other watchers never notice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use inboxd_core::checkpoint::Checkpoint;
use inboxd_core::failure::{FailureClass, Reconnect};
use inboxd_core::key::message_key;
use inboxd_core::machine::{
    Action, FetchedInfo, HandlerFailure, Input, ListWindow, Listed, LogRow, Notice, STOP_GRACE, Status, Wake,
    WatchMachine, WatchSpec,
};
use inboxd_core::mailbox::Selected;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::{Event, Health, Job, Mode, WatchError};
use crate::config::{After, Identity, Watch};
use crate::handler::Body as MessageBody;
use crate::handler::{HandlerError, Message};
use crate::imap::{Fetched, ImapError, Listing, Session, WaitEnd};
use crate::process::panic_message;
use crate::route::{Decision, Fanout};
use crate::spool::{Spool, SpoolError};
use crate::store::{Delivery, DeliveryStatus, Store};

/// Largest number of message bytes fetched into memory in one batch (by the sizes the server
/// reported; a message above the watch's `spool_above` is fetched on its own, into a file).
pub const BATCH_BYTES: u64 = 8 << 20;

/// Now, in Unix seconds (for health timestamps; decisions never use it).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Longest error text kept in health and events.
const MAX_ERROR: usize = 1024;

/// What the watcher task starts with.
pub(super) struct Parts {
    pub watch: Watch,
    pub store: Arc<dyn Store>,
    pub fanout: Fanout,
    pub mode: Mode,
    pub events: broadcast::Sender<Event>,
    pub health: Arc<Mutex<Health>>,
    pub stop: watch::Receiver<bool>,
    pub jobs: mpsc::Receiver<Job>,
}

/// A fetched message waiting for its delivery.
struct Body {
    held: Held,
    message_id: Option<String>,
    /// Message-ID, or a digest of the header when there is none (for dedupe and the log).
    identity: String,
    /// The key the targets get where it is not the log's (`v1-...`) key: Gmail's message
    /// identity (`gm1-...`), fixed when the message was fetched.
    target_key: Option<String>,
}

/// What a read-ahead reads while the current batch is delivered: the next batch, or (after
/// the last batch of a listing window) the next window's listing.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ahead {
    Batch(Vec<u32>),
    List(ListWindow),
}

/// What a read-ahead brought back.
enum AheadData {
    Fetched(Vec<Fetched>),
    /// The listing, and whether the server announced news meanwhile.
    Listed(Vec<Listing>, bool),
}

/// A read-ahead done: what it read, and what came back (or what the machine hears instead).
type ReadResult = (Ahead, Result<AheadData, Input>);

/// A read-ahead in flight: the task owns the session until it is joined.
struct ReadAhead {
    what: Ahead,
    task: tokio::task::JoinHandle<(Session, Result<AheadData, ImapError>)>,
}

impl Drop for ReadAhead {
    /// A read-ahead nobody waits for any more (the watcher ended or panicked) ends with it,
    /// and its session with it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a fetched message is held until its delivery.
enum Held {
    Memory(Vec<u8>),
    /// Removed when dropped.
    Spooled(Spool),
}

struct Driver {
    watch: Watch,
    name: String,
    store: Arc<dyn Store>,
    fanout: Fanout,
    events: broadcast::Sender<Event>,
    health: Arc<Mutex<Health>>,
    stop: watch::Receiver<bool>,
    jobs: mpsc::Receiver<Job>,
    jobs_closed: bool,
    /// A job that interrupted a wait.
    waiting_job: Option<Job>,
    session: Option<Session>,
    /// The next batch being read while this one is delivered: the session is in the task.
    reading_ahead: Option<ReadAhead>,
    /// The next batch, read ahead and back with the session, until the machine asks for it.
    read_ahead: Option<ReadResult>,
    /// Bodies read with the wake's SELECT and listing (the machine's `bodies_ahead`): the
    /// bytes asked for of each, and what came; used by the `Fetch` whose every message came
    /// back whole.
    wake_bodies: Option<(u32, Vec<Fetched>)>,
    /// The watch's failed attempts (the store's), read while the wake's SELECT was answered,
    /// for the `Fetch` after it; dropped with the wake's bodies and by any write to the log.
    wake_prior: Option<crate::store::StoreResult<HashMap<String, u32>>>,
    /// Whether the account's notifier tells this watch of news (`notify = true`).
    notifies: bool,
    /// The watch's place in the account's notifier, from its first SELECT on.
    notice: Option<crate::notify::Subscription>,
    bodies: BTreeMap<u32, Body>,
    /// INTERNALDATE and flags of the messages of the last listing.
    listed: HashMap<u32, Listing>,
    /// UIDs whose post-action is recorded as pending.
    pending_post: HashSet<u32>,
    /// The routing decision of each fetched message, made at its first delivery attempt.
    decisions: HashMap<u32, Decision>,
    /// Targets that already acknowledged a message whose fan-out is incomplete, by key.
    done: HashMap<String, BTreeSet<String>>,
    /// The post-action of delivered messages, where it is not the watch's `after` (a rule's
    /// override; `After::None` for a skipped message), until it has run.
    afters: HashMap<u32, After>,
    /// Delivered messages whose post-action could not even be tried, to be recorded as pending.
    unposted: Vec<u32>,
    /// Messages the routing skipped, committed and not yet reported: uid -> route.
    skipped_now: HashMap<u32, String>,
    /// When the server last told of new mail, until the watch caught up again.
    woke_at: Option<Instant>,
    /// The oldest pending message and its INTERNALDATE (Unix seconds), parsed once per uid.
    oldest: Option<(u32, Option<i64>)>,
    dead_in_run: u64,
    origin: Instant,
    /// The flush of a batch running behind the next ([`Action::FlushBehind`]).
    flushing: Option<tokio::task::JoinHandle<Result<(), HandlerError>>>,
}

/// Runs a watcher until it is stopped (or, in `once` mode, caught up). Returns the number of
/// messages dead-lettered during the run.
pub(super) async fn run(parts: Parts) -> Result<u64, WatchError> {
    let Parts {
        watch,
        store,
        fanout,
        mode,
        events,
        health,
        stop,
        jobs,
    } = parts;
    crate::spool::remove_stale(&watch.spool_dir);
    let account = watch.account.clone();
    let mut wait = account.wait;
    // The notifier watches folders by name: a special use (`\\Junk`) waits on its own session.
    wait.notify &= !watch.folder.starts_with('\\');
    let spec = WatchSpec {
        start: watch.start,
        on_uidvalidity_change: watch.on_uidvalidity_change,
        retry: watch.retry,
        wait,
        batch_size: watch.batch_size,
        batch_bytes: BATCH_BYTES,
        max_message_size: watch.max_message_size,
        spool_above: watch.spool_above,
        commit_each: !fanout.batches(),
        post_action: watch.posts_after(),
        flush_behind: fanout.flushes_behind(),
        once: mode == Mode::Once,
        list_window: watch.list_window,
    };
    let reconnect = Reconnect::new(account.schedule.clone(), account.stable_after, account.park_for);
    let mut machine = WatchMachine::new(spec, reconnect);
    let mut driver = Driver {
        name: watch.name(),
        watch,
        store,
        fanout,
        events,
        health,
        stop,
        jobs,
        jobs_closed: false,
        waiting_job: None,
        session: None,
        reading_ahead: None,
        read_ahead: None,
        wake_bodies: None,
        wake_prior: None,
        notifies: wait.notify && mode == Mode::Forever,
        notice: None,
        bodies: BTreeMap::new(),
        listed: HashMap::new(),
        pending_post: HashSet::new(),
        decisions: HashMap::new(),
        done: HashMap::new(),
        afters: HashMap::new(),
        unposted: Vec::new(),
        skipped_now: HashMap::new(),
        woke_at: None,
        oldest: None,
        dead_in_run: 0,
        origin: Instant::now(),
        flushing: None,
    };
    let mut input = Input::Start;
    loop {
        if *driver.stop.borrow() && !machine.stopping() {
            machine.stop();
        }
        let now = driver.origin.elapsed();
        let action = machine.on(input, now, fastrand::f64());
        let notices = machine.take_notices();
        driver.report(machine.checkpoint(), notices);
        driver
            .record_unposted(machine.checkpoint().map_or(0, |c| c.uidvalidity))
            .await;
        let state = machine.state().to_string();
        let backlog = machine.backlog() as u64;
        let oldest = driver.oldest_date(machine.oldest_pending());
        driver.health(|h| {
            h.state = state;
            h.backlog = backlog;
            h.oldest_pending = oldest;
        });
        if let Action::Done(result) = action {
            driver.join_read_ahead().await;
            driver.settle_flush().await;
            if let Some(s) = driver.session.take() {
                s.logout().await;
            }
            return match result {
                Ok(()) => Ok(driver.dead_in_run),
                Err(text) => Err(WatchError::Failed(text)),
            };
        }
        let uidvalidity = machine.checkpoint().map_or(0, |c| c.uidvalidity);
        let step = std::panic::AssertUnwindSafe(driver.execute(action, uidvalidity))
            .catch_unwind()
            .await;
        input = match step {
            Ok(input) => input,
            Err(panic) => {
                let msg = panic_message(panic.as_ref());
                driver.health(|h| h.panics += 1);
                error!(watch = %driver.name, panic = %msg, "watcher panicked; treating it as a dropped connection");
                driver.session = None;
                driver.reading_ahead = None;
                driver.read_ahead = None;
                Input::Failed {
                    class: FailureClass::Network,
                    error: clip(format!("watcher task panicked: {msg}")),
                }
            }
        };
    }
}

/// An error and its sources, `: `-joined, at most [`MAX_ERROR`] bytes.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    clip(text)
}

fn clip(text: String) -> String {
    crate::imap::clip(text, MAX_ERROR)
}

fn failed(e: &ImapError) -> Input {
    Input::Failed {
        class: e.class(),
        error: describe(e),
    }
}

impl Driver {
    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn health(&self, f: impl FnOnce(&mut Health)) {
        if let Ok(mut h) = self.health.lock() {
            f(&mut h);
        }
    }

    fn key(&self, uidvalidity: u32, uid: u32) -> String {
        message_key(&self.watch.account.name, &self.watch.folder, uidvalidity, uid)
    }

    /// Waits until a stop is requested (never, if it already was and that was handled).
    async fn stopped(stop: &mut watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            if stop.changed().await.is_err() {
                // The handle is gone without a stop (it sends one when dropped): nothing can
                // ask any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// With `notify`: news from here on wakes the next wait for a notice (called before the
    /// folder is read on a session, so nothing between the read and the wait is missed).
    fn mark_notice(&mut self) {
        if self.notifies {
            self.notice
                .get_or_insert_with(|| crate::notify::subscribe(&self.watch.account, &self.watch.folder))
                .mark();
        }
    }

    /// Runs an IMAP step that a stop may abandon; the session is dropped if it was.
    async fn interruptible<T>(&mut self, step: impl std::future::Future<Output = T>) -> Option<T> {
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            input = step => Some(input),
            _ = Self::stopped(&mut stop) => None,
        }
    }

    async fn execute(&mut self, action: Action, uidvalidity: u32) -> Input {
        match &action {
            // Neither touches the session: a read-ahead goes on meanwhile.
            Action::Deliver { .. }
            | Action::Flush
            | Action::FlushBehind
            | Action::AwaitFlush
            | Action::Commit { .. }
            | Action::Record { .. }
            | Action::Load
            | Action::InvalidateToken
            | Action::Sleep { keep_session: true, .. } => {}
            // The session is needed, and what was read ahead is still what the machine may
            // ask for next.
            Action::Fetch { .. } | Action::List { .. } | Action::PostAction { .. } | Action::CheckExists { .. } => {
                self.join_read_ahead().await;
            }
            // A new round, a new session or a wait: whatever was read ahead is stale.
            _ => {
                self.join_read_ahead().await;
                self.read_ahead = None;
                self.wake_bodies = None;
                self.wake_prior = None;
            }
        }
        match action {
            Action::Connect => self.connect().await,
            Action::Load => self.load().await,
            Action::Select {
                list_ahead,
                bodies_ahead,
            } => {
                self.mark_notice();
                let folder = self.watch.folder.clone();
                let Some(mut session) = self.session.take() else {
                    return no_session();
                };
                let mut listed_ahead = None;
                let mut wake_bodies = None;
                let mut wake_prior = None;
                let store = self.store.clone();
                let (account, watch_folder) = (self.watch.account.name.clone(), self.watch.folder.clone());
                let r = self
                    .interruptible(async {
                        // A special use (`\\Junk`) names whichever folder the server marks so.
                        let folder = match session.resolve(&folder).await {
                            Ok(f) => f,
                            Err(e) => return failed(&e),
                        };
                        let selected = match list_ahead {
                            // The listing the machine expects to ask for next, sent with the
                            // SELECT; kept for that `List`, whatever it brought. The bodies
                            // read with them wait for the `Fetch` that names them.
                            Some(w) => {
                                let bodies = bodies_ahead.map(|b| (b.from, b.to, b.max_bytes));
                                // What the `Fetch` after it reads from the store, read meanwhile.
                                let (selected, prior) = tokio::join!(
                                    session.select_and_list(&folder, w.above, w.upto, bodies),
                                    store.failed_attempts(&account, &watch_folder)
                                );
                                wake_prior = Some(prior);
                                selected.map(|(state, listing, read)| {
                                    let data = match listing {
                                        Ok(listed) => Ok(AheadData::Listed(listed, session.take_news())),
                                        Err(e) => Err(failed(&e)),
                                    };
                                    listed_ahead = Some((Ahead::List(w), data));
                                    if let Some(b) = bodies_ahead {
                                        wake_bodies = Some((b.max_bytes, read));
                                    }
                                    state
                                })
                            }
                            None => session.select(&folder).await,
                        };
                        match selected {
                            Ok(state) => Input::Selected(Selected {
                                uidvalidity: state.uidvalidity,
                                uidnext: state.uidnext,
                            }),
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
                self.read_ahead = listed_ahead;
                self.wake_bodies = wake_bodies;
                self.wake_prior = wake_prior;
                self.keep(session, r)
            }
            Action::ListNews { list, bodies_ahead } => {
                self.mark_notice();
                let Some(mut session) = self.session.take() else {
                    return no_session();
                };
                let store = self.store.clone();
                let (account, folder) = (self.watch.account.name.clone(), self.watch.folder.clone());
                let bodies = (bodies_ahead.from, bodies_ahead.to, bodies_ahead.max_bytes);
                let mut ahead = None;
                let r = self
                    .interruptible(async {
                        // What the `Fetch` after it reads from the store, read meanwhile.
                        let (read, prior) = tokio::join!(
                            session.list_news(list.above, list.upto, Some(bodies)),
                            store.failed_attempts(&account, &folder)
                        );
                        match read {
                            Ok((listing, read, seen)) => {
                                let data = match listing {
                                    Ok(listed) => Ok(AheadData::Listed(listed, session.take_news())),
                                    Err(e) => Err(failed(&e)),
                                };
                                ahead = Some((data, read, prior));
                                Input::NewsListed(seen)
                            }
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
                // Kept for the `List` (and `Fetch`) that follow if it fits; a SELECT drops them.
                if let Some((data, read, prior)) = ahead {
                    self.read_ahead = Some((Ahead::List(list), data));
                    self.wake_bodies = Some((bodies_ahead.max_bytes, read));
                    self.wake_prior = Some(prior);
                }
                self.keep(session, r)
            }
            Action::List { above, upto } => {
                let window = ListWindow { above, upto };
                // The listing read ahead with the last batch, if it is this window's.
                let read = match self.read_ahead.take() {
                    Some((Ahead::List(read), Ok(AheadData::Listed(listed, news)))) if read == window => {
                        Some(Ok((listed, news)))
                    }
                    Some((Ahead::List(read), Err(input))) if read == window => Some(Err(input)),
                    _ => None,
                };
                let (session, r) = match read {
                    Some(Ok(listed)) => (self.session.take(), Some(Ok(listed))),
                    Some(Err(input)) => {
                        // As a listing that fails now: the session goes with it.
                        self.session = None;
                        return input;
                    }
                    None => {
                        let Some(mut session) = self.session.take() else {
                            return no_session();
                        };
                        let r = self
                            .interruptible(async {
                                match session.list_range(above, upto).await {
                                    Ok(listed) => Ok((listed, session.take_news())),
                                    Err(e) => Err(failed(&e)),
                                }
                            })
                            .await;
                        (Some(session), r)
                    }
                };
                let Some(session) = session else {
                    return no_session();
                };
                let r = r.map(|r| match r {
                    Ok((listed, news)) => {
                        let items = listed
                            .iter()
                            .map(|l| Listed {
                                uid: l.uid,
                                size: l.size,
                            })
                            .collect();
                        // What the envelope tells of each message besides its bytes.
                        self.listed = listed.into_iter().map(|l| (l.uid, l)).collect();
                        Input::Listed { items, news }
                    }
                    Err(input) => input,
                });
                self.keep(session, r)
            }
            Action::Fetch {
                uids,
                check_seen,
                spool,
                ahead,
                list_ahead,
            } => {
                let next = match (ahead.is_empty(), list_ahead) {
                    (false, _) => Some(Ahead::Batch(ahead)),
                    (true, Some(window)) => Some(Ahead::List(window)),
                    (true, None) => None,
                };
                self.fetch(uids, &check_seen, spool, next, uidvalidity).await
            }
            Action::CheckExists { uid } => {
                let Some(mut session) = self.session.take() else {
                    return no_session();
                };
                let r = self
                    .interruptible(async {
                        match session.search(&format!("UID {uid}")).await {
                            Ok(found) => Input::Exists {
                                uid,
                                exists: found.contains(&uid),
                            },
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
                self.keep(session, r)
            }
            Action::Deliver { uid, attempt } => self.deliver(uid, attempt, uidvalidity).await,
            Action::Flush => {
                self.settle_flush().await;
                match self.fanout.flush().await {
                    Ok(()) => Input::Flushed,
                    Err(e) => not_durable(&e),
                }
            }
            Action::FlushBehind => {
                self.settle_flush().await;
                match self.fanout.flush_behind() {
                    Some(work) => {
                        self.flushing = Some(tokio::spawn(work));
                        Input::FlushStarted
                    }
                    // Not offered after all: made durable here, and so started.
                    None => match self.fanout.flush().await {
                        Ok(()) => Input::FlushStarted,
                        Err(e) => not_durable(&e),
                    },
                }
            }
            Action::AwaitFlush => match self.flushing.take() {
                None => Input::Flushed,
                Some(work) => match work.await {
                    Ok(Ok(())) => Input::Flushed,
                    Ok(Err(e)) => not_durable(&e),
                    Err(e) => Input::Failed {
                        class: FailureClass::Network,
                        error: clip(format!("handler cannot make the batch durable: flush task {e}")),
                    },
                },
            },
            Action::Commit { checkpoint, log } => {
                self.wake_prior = None;
                let rows = self.rows(&log, checkpoint.uidvalidity);
                match self
                    .store
                    .commit(&self.watch.account.name, &self.watch.folder, checkpoint, &rows)
                    .await
                {
                    Ok(()) => {
                        self.committed(&log, checkpoint.uidvalidity);
                        Input::Committed
                    }
                    Err(e) => Input::Failed {
                        class: FailureClass::Network,
                        error: describe(&e),
                    },
                }
            }
            Action::Record { log } => {
                self.wake_prior = None;
                let rows = self.rows(&log, uidvalidity);
                match self.store.record(&rows).await {
                    Ok(()) => Input::Recorded,
                    Err(e) => Input::Failed {
                        class: FailureClass::Network,
                        error: describe(&e),
                    },
                }
            }
            Action::PostAction { uids } => self.post_action(uids, uidvalidity).await,
            Action::RunJobs => self.run_jobs().await,
            Action::Idle(max) => self.idle(max).await,
            Action::AwaitNotice(max) => self.await_notice(max).await,
            Action::Poll(every) => {
                let mut stop = self.stop.clone();
                let wake = tokio::select! {
                    _ = tokio::time::sleep(every) => Wake::Elapsed,
                    _ = Self::stopped(&mut stop) => Wake::Interrupted,
                    job = Self::next_job(&mut self.jobs, self.jobs_closed) => {
                        self.took_job(job);
                        Wake::Interrupted
                    }
                };
                Input::WaitEnded {
                    wake,
                    token_left: self.token_left(),
                }
            }
            Action::Probe => {
                let Some(mut session) = self.session.take() else {
                    return no_session();
                };
                let r = self
                    .interruptible(async {
                        match session.noop().await {
                            Ok(()) => Input::Probed,
                            Err(e) => failed(&e),
                        }
                    })
                    .await;
                self.keep(session, r)
            }
            Action::Sleep { delay, keep_session } => {
                if !keep_session {
                    self.session = None;
                    self.bodies.clear();
                }
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = Self::stopped(&mut stop) => {}
                }
                Input::Slept
            }
            Action::InvalidateToken => {
                if let crate::config::Auth::OAuth2(source) = &self.watch.account.auth {
                    // The server says the token expired or refused it: the next login gets a
                    // new one.
                    source.invalidate().await;
                }
                Input::TokenInvalidated
            }
            Action::Logout => {
                if let Some(s) = self.session.take() {
                    if *self.stop.borrow() {
                        // A stop does not wait longer than STOP_GRACE for a server that no
                        // longer answers (an IDLE left open ends with the logout).
                        let _ = tokio::time::timeout(STOP_GRACE, s.logout()).await;
                    } else {
                        s.logout().await;
                    }
                }
                self.bodies.clear();
                Input::LoggedOut
            }
            Action::Done(_) => Input::Interrupted,
        }
    }

    /// Puts the session back after an interruptible step, or drops it if the step was
    /// abandoned mid-command.
    fn keep(&mut self, session: Session, result: Option<Input>) -> Input {
        match result {
            Some(input) => {
                if !matches!(input, Input::Failed { .. }) {
                    self.session = Some(session);
                }
                input
            }
            None => Input::Interrupted,
        }
    }

    fn token_left(&self) -> Option<Duration> {
        self.session
            .as_ref()
            .and_then(|s| s.token_due())
            .map(|due| due.saturating_duration_since(Instant::now()))
    }

    async fn connect(&mut self) -> Input {
        self.session = None;
        self.read_ahead = None;
        self.bodies.clear();
        let account = self.watch.account.clone();
        let opened = self.interruptible_open(&account).await;
        match opened {
            None => Input::Interrupted,
            Some(Err(e)) => failed(&e),
            Some(Ok(session)) => {
                let account = &self.watch.account;
                if let Err(error) = account.identity.check(&account.name, session.has("X-GM-EXT-1")) {
                    session.logout().await;
                    return Input::Failed {
                        class: FailureClass::Permanent,
                        error,
                    };
                }
                session.set_max_literal(self.watch.max_message_size);
                let idle = session.has("IDLE");
                info!(watch = %self.name, idle, "connected");
                self.session = Some(session);
                Input::Connected {
                    idle,
                    token_left: self.token_left(),
                }
            }
        }
    }

    /// The stored checkpoint and pending post-actions (read after the first login, as the
    /// store is not needed before the server answered).
    async fn load(&mut self) -> Input {
        let (account, folder) = (&self.watch.account.name, &self.watch.folder);
        let stored = match self.store.checkpoint(account, folder).await {
            Ok(s) => s,
            Err(e) => {
                return Input::Failed {
                    class: FailureClass::Network,
                    error: describe(&e),
                };
            }
        };
        let pending_post_actions = match stored {
            Some(cp) => match self.store.pending_post_actions(account, folder, cp.uidvalidity).await {
                Ok(p) => p,
                Err(e) => {
                    return Input::Failed {
                        class: FailureClass::Network,
                        error: describe(&e),
                    };
                }
            },
            None => Vec::new(),
        };
        self.pending_post = pending_post_actions.iter().map(|(uid, _)| *uid).collect();
        for (uid, state) in &pending_post_actions {
            // `pending <after>`: a rule's post-action; plain `pending`: the watch's.
            if let Some(after) = state.strip_prefix("pending ").and_then(After::parse) {
                self.afters.insert(*uid, after);
            }
        }
        Input::Loaded {
            stored,
            pending_post_actions: pending_post_actions.into_iter().map(|(uid, _)| uid).collect(),
        }
    }

    async fn interruptible_open(&mut self, account: &crate::config::Account) -> Option<Result<Session, ImapError>> {
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            r = Session::open(account) => Some(r),
            _ = Self::stopped(&mut stop) => None,
        }
    }

    /// Waits out a flush left in flight whose batch no longer counts (the machine awaits every
    /// flush it started; this is the belt to that).
    async fn settle_flush(&mut self) {
        if let Some(work) = self.flushing.take() {
            let _ = work.await;
        }
    }

    /// Waits for the read-ahead in flight, if any, and takes the session back (with what was
    /// read, or without the session if the read failed). A stop gives it the core's [`STOP_GRACE`] (so that the session can still carry the post-actions of what was committed),
    /// then drops the session.
    async fn join_read_ahead(&mut self) {
        let Some(mut reading) = self.reading_ahead.take() else {
            return;
        };
        let mut stop = self.stop.clone();
        let joined = tokio::select! {
            biased;
            r = &mut reading.task => r,
            _ = async {
                Self::stopped(&mut stop).await;
                tokio::time::sleep(STOP_GRACE).await;
            } => {
                // Dropping it aborts the task.
                debug!(watch = %self.name, "stopping: read-ahead abandoned with its session");
                return;
            }
        };
        let what = std::mem::replace(&mut reading.what, Ahead::Batch(Vec::new()));
        match joined {
            Ok((session, Ok(data))) => {
                self.session = Some(session);
                self.read_ahead = Some((what, Ok(data)));
            }
            Ok((_, Err(e))) => {
                // The session is gone; the machine hears of it with its next fetch of these
                // messages (or listing of this window), or from the next command that finds no
                // session.
                warn!(watch = %self.name, error = %describe(&e), "read-ahead failed; the session is dropped");
                self.read_ahead = Some((what, Err(failed(&e))));
            }
            Err(e) => {
                error!(watch = %self.name, error = %e, "read-ahead task failed; the session is dropped");
                self.health(|h| h.panics += u64::from(e.is_panic()));
            }
        }
    }

    /// Starts reading the next batch (messages each at most `spool_above`) or the next
    /// listing window with the session, in a task of its own, while the current batch is
    /// delivered.
    fn start_read_ahead(&mut self, what: Option<Ahead>) {
        let Some(what) = what.filter(|w| !matches!(w, Ahead::Batch(uids) if uids.is_empty())) else {
            return;
        };
        if *self.stop.borrow() {
            return;
        }
        let Some(mut session) = self.session.take() else {
            return;
        };
        let spool_above = self.watch.spool_above;
        let task = tokio::spawn({
            let what = what.clone();
            async move {
                let r = match what {
                    Ahead::Batch(uids) => Self::fetch_batch(&mut session, &uids, spool_above)
                        .await
                        .map(AheadData::Fetched),
                    Ahead::List(w) => match session.list_range(w.above, w.upto).await {
                        Ok(listed) => Ok(AheadData::Listed(listed, session.take_news())),
                        Err(e) => Err(e),
                    },
                };
                (session, r)
            }
        });
        self.reading_ahead = Some(ReadAhead { what, task });
    }

    /// One batch of messages, each at most `spool_above` by the server's listing, in memory.
    async fn fetch_batch(session: &mut Session, uids: &[u32], spool_above: u64) -> Result<Vec<Fetched>, ImapError> {
        // The machine sized the batch by the reported sizes, every message at most
        // `spool_above`; a server that lies gets this far and no further (the batch then fails,
        // and its messages are fetched one at a time, spooled).
        session.set_max_literal(spool_above.saturating_mul(2));
        let fetch_cap = BATCH_BYTES.saturating_add(spool_above.saturating_mul(2));
        session.fetch(uids, fetch_cap).await
    }

    async fn fetch(
        &mut self,
        uids: Vec<u32>,
        check_seen: &[u32],
        spool: bool,
        ahead: Option<Ahead>,
        uidvalidity: u32,
    ) -> Input {
        let read = match self.read_ahead.take() {
            Some((Ahead::Batch(read), r)) if read == uids => Some(r),
            _ => None,
        };
        let read = match (read, spool) {
            (None, false) => self.take_wake_bodies(&uids).map(|f| Ok(AheadData::Fetched(f))),
            (read, _) => read,
        };
        // Attempts already made on messages that failed before (e.g. before a restart): read
        // from the store while the server answers, not after it (a query is a round trip to
        // the store's thread, on the path of every new message).
        // (Read already if the wake's SELECT came just before.)
        let store = self.store.clone();
        let (account, folder) = (self.watch.account.name.clone(), self.watch.folder.clone());
        let read_prior = self.wake_prior.take();
        let prior = async move {
            match read_prior {
                Some(prior) => prior,
                None => store.failed_attempts(&account, &folder).await,
            }
        };
        let (fetched, prior): (Vec<(u32, Held)>, _) = match read {
            Some(Ok(AheadData::Fetched(f))) => (
                f.into_iter().map(|f| (f.uid, Held::Memory(f.body))).collect(),
                prior.await,
            ),
            Some(Ok(AheadData::Listed(..))) | None => match tokio::join!(self.fetch_now(&uids, spool), prior) {
                (Ok(f), prior) => (f, prior),
                (Err(input), _) => return input,
            },
            Some(Err(input)) => return input,
        };
        // The next batch (or listing window) comes while this one is delivered and committed.
        self.start_read_ahead(ahead);
        self.settle_fetched(uids, fetched, prior, check_seen, uidvalidity).await
    }

    /// The bodies of `uids` from those read with the wake's SELECT, if every one of them came
    /// back whole: shorter than the bytes asked for, and exactly as long as the listing said
    /// (a server that answers a partial fetch with less than the message cannot pass one off
    /// as whole). Otherwise nothing, and the batch is fetched as usual.
    fn take_wake_bodies(&mut self, uids: &[u32]) -> Option<Vec<Fetched>> {
        let (asked, read) = self.wake_bodies.as_mut()?;
        let whole = |f: &Fetched| {
            (f.body.len() as u64) < u64::from(*asked)
                && self
                    .listed
                    .get(&f.uid)
                    .and_then(|l| l.size)
                    .is_some_and(|size| u64::from(size) == f.body.len() as u64)
        };
        if !uids.iter().all(|uid| read.iter().any(|f| f.uid == *uid && whole(f))) {
            return None;
        }
        let (mut taken, kept): (Vec<Fetched>, Vec<Fetched>) =
            std::mem::take(read).into_iter().partition(|f| uids.contains(&f.uid));
        *read = kept;
        taken.sort_by_key(|f| f.uid);
        Some(taken)
    }

    /// Fetches `uids` with the session: a batch in memory, or (with `spool`) one message in
    /// pieces into a spool file.
    async fn fetch_now(&mut self, uids: &[u32], spool: bool) -> Result<Vec<(u32, Held)>, Input> {
        let Some(mut session) = self.session.take() else {
            return Err(no_session());
        };
        let mut stop = self.stop.clone();
        let max_message = self.watch.max_message_size;
        let fetched: Vec<(u32, Held)> = match (spool, uids) {
            (true, &[uid]) => {
                // Alone, in chunks, into a file: memory holds one chunk whatever the size.
                let dir = match self.fanout.spool_dir() {
                    Some(d) => d.to_path_buf(),
                    None => self.watch.spool_dir.clone(),
                };
                let r = tokio::select! {
                    biased;
                    r = crate::spool::fetch(&mut session, &dir, uid, max_message) => r,
                    _ = Self::stopped(&mut stop) => return Err(Input::Interrupted),
                };
                match r {
                    Ok(Some(spooled)) => vec![(uid, Held::Spooled(spooled))],
                    Ok(None) => Vec::new(),
                    Err(SpoolError::Imap(e)) => return Err(failed(&e)),
                    Err(SpoolError::File(e)) => {
                        return Err(Input::Failed {
                            class: FailureClass::Network,
                            error: clip(e),
                        });
                    }
                }
            }
            _ => {
                let r = tokio::select! {
                    biased;
                    r = Self::fetch_batch(&mut session, uids, self.watch.spool_above) => r,
                    _ = Self::stopped(&mut stop) => return Err(Input::Interrupted),
                };
                match r {
                    Ok(f) => f.into_iter().map(|f| (f.uid, Held::Memory(f.body))).collect(),
                    Err(e) => return Err(failed(&e)),
                }
            }
        };
        self.session = Some(session);
        Ok(fetched)
    }

    /// Holds the fetched bodies for delivery and tells the machine what came back.
    async fn settle_fetched(
        &mut self,
        uids: Vec<u32>,
        fetched: Vec<(u32, Held)>,
        prior: crate::store::StoreResult<std::collections::HashMap<String, u32>>,
        check_seen: &[u32],
        uidvalidity: u32,
    ) -> Input {
        let (account, folder) = (&self.watch.account.name, &self.watch.folder);
        let prior = match prior {
            Ok(p) => p,
            Err(e) => {
                return Input::Failed {
                    class: FailureClass::Network,
                    error: describe(&e),
                };
            }
        };
        self.bodies.clear();
        let bytes: u64 = fetched
            .iter()
            .map(|(_, held)| match held {
                Held::Memory(body) => body.len() as u64,
                Held::Spooled(spooled) => spooled.len(),
            })
            .sum();
        self.health(|h| h.fetched_bytes += bytes);
        for (uid, held) in fetched {
            let (message_id, identity) = match &held {
                Held::Memory(body) => crate::message::identity(body),
                Held::Spooled(spooled) => match spooled.head(crate::message::IDENTITY_HEAD) {
                    Ok(head) => crate::message::identity(&head),
                    Err(e) => {
                        return Input::Failed {
                            class: FailureClass::Network,
                            error: clip(format!("cannot read the spool file: {e}")),
                        };
                    }
                },
            };
            let target_key = match self.watch.account.identity {
                Identity::Uid => None,
                Identity::Auto | Identity::Gmail => self
                    .listed
                    .get(&uid)
                    .and_then(|l| l.gmail.as_ref())
                    .map(|g| inboxd_core::key::gmail_key(&self.watch.account.name, g.msgid)),
            };
            self.bodies.insert(
                uid,
                Body {
                    held,
                    message_id,
                    identity,
                    target_key,
                },
            );
        }
        let mut infos = Vec::with_capacity(uids.len());
        for uid in uids {
            let key = self.key(uidvalidity, uid);
            let body = self.bodies.get(&uid);
            let seen_before = match body {
                Some(b) if check_seen.contains(&uid) => {
                    match self.store.seen_message_id(account, folder, &b.identity).await {
                        Ok(seen) => seen,
                        Err(e) => {
                            return Input::Failed {
                                class: FailureClass::Network,
                                error: describe(&e),
                            };
                        }
                    }
                }
                _ => false,
            };
            infos.push(FetchedInfo {
                uid,
                body: body.is_some(),
                prior_attempts: prior.get(&key).copied().unwrap_or(0),
                seen_before,
            });
        }
        Input::Fetched(infos)
    }

    async fn deliver(&mut self, uid: u32, attempt: u32, uidvalidity: u32) -> Input {
        if !self.store.holds_lease() {
            // Paused or cut off past the lease's TTL: another instance may own the watch now.
            return Input::Failed {
                class: FailureClass::Network,
                error: "this instance may have lost its lease on the watch (paused, or cut off from the database, past its TTL); nothing more is delivered under it".into(),
            };
        }
        let key = self.key(uidvalidity, uid);
        let Some(body) = self.bodies.get(&uid) else {
            return Input::Failed {
                class: FailureClass::Network,
                error: format!("internal: no fetched body for uid {uid}"),
            };
        };
        let message = Message {
            account: &self.watch.account.name,
            folder: &self.watch.folder,
            uidvalidity,
            uid,
            key: body.target_key.as_deref().unwrap_or(&key),
            message_id: body.message_id.as_deref(),
            internal_date: self.listed.get(&uid).and_then(|l| l.internal_date.as_deref()),
            flags: self.listed.get(&uid).map_or(&[], |l| l.flags.as_slice()),
            gmail: self.listed.get(&uid).and_then(|l| l.gmail.as_ref()),
            body: match &body.held {
                Held::Memory(bytes) => MessageBody::Bytes(bytes),
                Held::Spooled(spooled) => MessageBody::File {
                    path: spooled.path(),
                    len: spooled.len(),
                },
            },
        };
        let decision = match self.decisions.get(&uid) {
            Some(d) => d.clone(),
            None => match self.fanout.decide(&message.body) {
                Ok(d) => {
                    self.decisions.insert(uid, d.clone());
                    d
                }
                Err(e) => {
                    return Input::HandlerFailed {
                        uid,
                        error: clip(format!("cannot read the spooled message: {e}")),
                        kind: HandlerFailure::Attempt,
                    };
                }
            },
        };
        let targets = match &decision {
            Decision::Skip { rule } => {
                debug!(watch = %self.name, uid, rule = ?rule, "skipped by the routing");
                return Input::Delivered { uid };
            }
            Decision::Deliver { targets, .. } => targets,
        };
        tracing::debug!(watch = %self.name, uid, attempt, targets = %self.fanout.names(targets), "delivering");
        let fanout = targets.len() > 1;
        if fanout && !self.done.contains_key(&key) {
            // A retry after a crash: the targets that acknowledged it before are not called again.
            match self.store.targets_done(&key).await {
                Ok(done) => {
                    self.done.insert(key.clone(), done.into_iter().collect());
                }
                Err(e) => {
                    return Input::Failed {
                        class: FailureClass::Network,
                        error: describe(&e),
                    };
                }
            }
        }
        let mut done = self.done.remove(&key).unwrap_or_default();
        let began = Instant::now();
        let outcome = self.fanout.deliver(&message, targets, &mut done).await;
        let took = began.elapsed();
        self.health(|h| h.handler_seconds.observe(took));
        match outcome {
            Ok(()) => Input::Delivered { uid },
            Err(failure) => {
                if !failure.acknowledged.is_empty()
                    && let Err(e) = self.store.record_targets(&key, &failure.acknowledged).await
                {
                    return Input::Failed {
                        class: FailureClass::Network,
                        error: describe(&e),
                    };
                }
                if fanout {
                    self.done.insert(key, done);
                }
                if failure.panicked > 0 {
                    self.health(|h| h.panics += u64::from(failure.panicked));
                    error!(watch = %self.name, uid, error = %failure.error.reason, "handler panicked");
                }
                Input::HandlerFailed {
                    uid,
                    error: clip(failure.error.detail()),
                    kind: failure.error.kind,
                }
            }
        }
    }

    /// Delivery-log rows for the store, with keys and Message-IDs filled in.
    fn rows(&self, log: &[LogRow], uidvalidity: u32) -> Vec<Delivery> {
        log.iter()
            .map(|row| {
                let body = self.bodies.get(&row.uid);
                Delivery {
                    key: self.key(uidvalidity, row.uid),
                    account: self.watch.account.name.clone(),
                    folder: self.watch.folder.clone(),
                    uidvalidity,
                    uid: row.uid,
                    message_id: body.map(|b| b.identity.clone()).unwrap_or_default(),
                    target_key: body.and_then(|b| b.target_key.clone()).unwrap_or_default(),
                    status: match row.status {
                        Status::Delivered if matches!(self.decisions.get(&row.uid), Some(Decision::Skip { .. })) => {
                            DeliveryStatus::Skipped
                        }
                        Status::Delivered => DeliveryStatus::Delivered,
                        Status::Dead => DeliveryStatus::Dead,
                        Status::Skipped => DeliveryStatus::Skipped,
                        Status::Vanished => DeliveryStatus::Vanished,
                        Status::Failed => DeliveryStatus::Failed,
                    },
                    attempts: row.attempts,
                    last_error: row.error.clone(),
                    route: self.route_of(row.uid),
                    acknowledged: false,
                    updated_at: 0,
                }
            })
            .collect()
    }

    fn committed(&mut self, log: &[LogRow], uidvalidity: u32) {
        for row in log {
            if row.status == Status::Failed {
                continue;
            }
            self.bodies.remove(&row.uid);
            self.done.remove(&self.key(uidvalidity, row.uid));
            if matches!(self.decisions.get(&row.uid), Some(Decision::Skip { .. })) {
                let route = self.route_of(row.uid);
                self.skipped_now.insert(row.uid, route);
            }
            let decision = self.decisions.remove(&row.uid);
            if row.status == Status::Delivered && self.watch.posts_after() {
                match decision {
                    Some(Decision::Skip { .. }) => {
                        self.afters.insert(row.uid, After::None);
                    }
                    Some(Decision::Deliver { after: Some(a), .. }) => {
                        self.afters.insert(row.uid, a);
                    }
                    _ => {}
                }
            }
        }
    }

    /// The INTERNALDATE of the oldest pending message, for health: parsed when that message
    /// changes, not at every step.
    fn oldest_date(&mut self, uid: Option<u32>) -> Option<i64> {
        let uid = uid?;
        if let Some((known, date)) = self.oldest
            && known == uid
        {
            return date;
        }
        let date = self
            .listed
            .get(&uid)
            .and_then(|l| l.internal_date.as_deref())
            .and_then(crate::envelope::internal_date_unix);
        self.oldest = Some((uid, date));
        date
    }

    /// Where the routing sent a message, for the delivery log (empty for a watch with one
    /// target and no rules).
    fn route_of(&self, uid: u32) -> String {
        let routing = &self.fanout.routing;
        let rule = |i: usize| {
            routing
                .rules
                .get(i)
                .map_or(String::new(), |r| format!("rule {:?}", r.name))
        };
        match self.decisions.get(&uid) {
            None => String::new(),
            Some(Decision::Skip { rule: Some(i) }) => format!("skipped by {}", rule(*i)),
            Some(Decision::Skip { rule: None }) => "skipped: no rule matched (else = skip)".into(),
            Some(Decision::Deliver {
                rule: Some(i), targets, ..
            }) => {
                format!("{} -> {}", rule(*i), self.fanout.names(targets))
            }
            Some(Decision::Deliver {
                rule: None, targets, ..
            }) => {
                if routing.rules.is_empty() && targets.len() <= 1 {
                    String::new()
                } else if routing.rules.is_empty() {
                    format!("-> {}", self.fanout.names(targets))
                } else {
                    format!("else -> {}", self.fanout.names(targets))
                }
            }
        }
    }

    /// The post-action of a delivered message: a rule's, or the watch's.
    fn after_of(&self, uid: u32) -> &After {
        self.afters.get(&uid).unwrap_or(&self.watch.after)
    }

    /// The state recorded for a post-action to retry: `pending`, or `pending <after>` for a
    /// rule's own, so that the next process runs the same one.
    fn pending_state(&self, uid: u32) -> String {
        match self.afters.get(&uid) {
            Some(after) => format!("pending {after}"),
            None => "pending".into(),
        }
    }

    /// Runs the post-actions of delivered messages, one command per distinct action.
    async fn post_action(&mut self, uids: Vec<u32>, uidvalidity: u32) -> Input {
        let mut groups: Vec<(After, Vec<u32>)> = Vec::new();
        for uid in uids {
            let after = self.after_of(uid).clone();
            match groups.iter_mut().find(|g| g.0 == after) {
                Some(g) => g.1.push(uid),
                None => groups.push((after, vec![uid])),
            }
        }
        let mut first_failure = None;
        for (after, uids) in groups {
            let r = self.post_group(&after, &uids, uidvalidity).await;
            if !matches!(r, Input::PostActionDone) && first_failure.is_none() {
                first_failure = Some(r);
            }
        }
        first_failure.unwrap_or(Input::PostActionDone)
    }

    async fn post_group(&mut self, after: &After, uids: &[u32], uidvalidity: u32) -> Input {
        let Some(session) = self.session.as_mut() else {
            return Input::PostActionFailed {
                permanent: false,
                error: "no session".into(),
            };
        };
        let r = match after {
            After::None => Ok(()),
            After::Seen => session.add_flags(uids, "\\Seen").await,
            After::Flag(f) => session.add_flags(uids, f).await,
            After::Delete => session.delete(uids).await,
            After::Move(folder) => match session.resolve(folder).await {
                Ok(target) => session.move_to(uids, &target).await,
                Err(e) => Err(e),
            },
        };
        let keys: Vec<String> = uids.iter().map(|&u| self.key(uidvalidity, u)).collect();
        match r {
            Ok(()) => {
                if uids.iter().any(|u| self.pending_post.contains(u)) {
                    // Best effort: a stale "pending" only means one more (harmless) try.
                    let _ = self.store.set_post_action(&keys, "").await;
                    for u in uids {
                        self.pending_post.remove(u);
                    }
                }
                for u in uids {
                    self.afters.remove(u);
                }
                Input::PostActionDone
            }
            Err(e) => {
                let permanent = e.is_permanent_refusal();
                let error = describe(&e);
                let state = if permanent {
                    clip(format!("failed: {error}"))
                } else {
                    self.pending_state(uids[0])
                };
                if let Err(se) = self.store.set_post_action(&keys, &state).await {
                    warn!(watch = %self.name, error = %describe(&se), "cannot record the post-action state");
                }
                if permanent {
                    for u in uids {
                        self.afters.remove(u);
                    }
                } else {
                    self.pending_post.extend(uids.iter().copied());
                }
                if matches!(e, ImapError::Rejected { .. }) {
                    Input::PostActionFailed { permanent, error }
                } else {
                    // The session itself failed (deadline, connection): the round ends.
                    failed(&e)
                }
            }
        }
    }

    /// Records as pending the post-actions that could not be tried (the session was gone when
    /// their messages were committed), so that the next start runs them.
    async fn record_unposted(&mut self, uidvalidity: u32) {
        if self.unposted.is_empty() {
            return;
        }
        for uid in std::mem::take(&mut self.unposted) {
            if *self.after_of(uid) == After::None {
                self.afters.remove(&uid);
                continue;
            }
            let state = self.pending_state(uid);
            let key = self.key(uidvalidity, uid);
            if let Err(e) = self.store.set_post_action(std::slice::from_ref(&key), &state).await {
                warn!(watch = %self.name, error = %describe(&e), "cannot record the post-action state");
            }
            self.pending_post.insert(uid);
        }
    }

    async fn next_job(jobs: &mut mpsc::Receiver<Job>, closed: bool) -> Option<Job> {
        if closed {
            std::future::pending::<()>().await;
        }
        jobs.recv().await
    }

    /// What ends a wait besides the server: a stop, or a queued job (put into `took`; `None`
    /// in it when the queue closed).
    async fn stop_or_job(
        mut stop: watch::Receiver<bool>,
        jobs: &mut mpsc::Receiver<Job>,
        closed: bool,
        took: &mut Option<Option<Job>>,
    ) {
        tokio::select! {
            _ = Self::stopped(&mut stop) => {}
            job = Self::next_job(jobs, closed) => *took = Some(job),
        }
    }

    fn took_job(&mut self, job: Option<Job>) {
        match job {
            Some(j) => self.waiting_job = Some(j),
            None => self.jobs_closed = true,
        }
    }

    async fn run_jobs(&mut self) -> Input {
        let mut jobs: Vec<Job> = self.waiting_job.take().into_iter().collect();
        // Only what is queued now: the channel is bounded, and more jobs wait their turn.
        while jobs.len() < super::JOB_QUEUE {
            match self.jobs.try_recv() {
                Ok(j) => jobs.push(j),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.jobs_closed = true;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
        let ran = !jobs.is_empty();
        let Some(session) = self.session.as_mut() else {
            return no_session();
        };
        let limit = self.watch.account.timeouts.command;
        for job in jobs {
            if tokio::time::timeout(limit, job(session)).await.is_err() {
                return Input::Failed {
                    class: FailureClass::Network,
                    error: format!("a queued job did not finish within {limit:?}; the session was dropped"),
                };
            }
        }
        Input::JobsRan { ran }
    }

    async fn idle(&mut self, max: Duration) -> Input {
        let Some(session) = self.session.take() else {
            return no_session();
        };
        let mut took: Option<Option<Job>> = None;
        let interrupt = Self::stop_or_job(self.stop.clone(), &mut self.jobs, self.jobs_closed, &mut took);
        // The wait ends at once on a stop (the IDLE is left open: DONE goes with the logout,
        // itself bounded by STOP_GRACE); should the wait itself not end, STOP_GRACE bounds it.
        let mut stopping = self.stop.clone();
        let result = {
            let idle = session.idle(max, interrupt);
            tokio::pin!(idle);
            tokio::select! {
                r = &mut idle => Some(r),
                _ = async {
                    Self::stopped(&mut stopping).await;
                    tokio::time::sleep(STOP_GRACE).await;
                } => None,
            }
        };
        let Some(result) = result else {
            return Input::Interrupted;
        };
        if let Some(job) = took {
            self.took_job(job);
        }
        match result {
            Ok((session, end)) => {
                self.session = Some(session);
                if matches!(end, WaitEnd::Activity | WaitEnd::NewMail) {
                    self.woke_at.get_or_insert_with(Instant::now);
                }
                let wake = match end {
                    WaitEnd::Activity => Wake::Activity,
                    WaitEnd::NewMail => Wake::NewMail,
                    WaitEnd::Elapsed => Wake::Elapsed,
                    WaitEnd::Silence => Wake::Silence,
                    WaitEnd::Interrupted => Wake::Interrupted,
                };
                Input::WaitEnded {
                    wake,
                    token_left: self.token_left(),
                }
            }
            Err(e) => failed(&e),
        }
    }

    /// Waits without a session for the account's notifier to report news in the folder (at
    /// most `max`), a queued job or a stop.
    async fn await_notice(&mut self, max: Duration) -> Input {
        let Some(notice) = self.notice.as_mut() else {
            return Input::WaitEnded {
                wake: Wake::NoNotifier,
                token_left: None,
            };
        };
        let mut took: Option<Option<Job>> = None;
        let interrupt = Self::stop_or_job(self.stop.clone(), &mut self.jobs, self.jobs_closed, &mut took);
        let wake = notice.wait(max, interrupt).await;
        if let Some(job) = took {
            self.took_job(job);
        }
        if wake == Wake::Activity {
            self.woke_at.get_or_insert_with(Instant::now);
        }
        if wake == Wake::NoNotifier {
            self.notice = None;
            self.notifies = false;
        }
        Input::WaitEnded { wake, token_left: None }
    }

    /// Logs, emits and counts what the machine noticed.
    fn report(&mut self, checkpoint: Option<Checkpoint>, notices: Vec<Notice>) {
        let uidvalidity = checkpoint.map_or(0, |c| c.uidvalidity);
        let watch = self.name.clone();
        for notice in notices {
            match notice {
                Notice::Connected => {
                    self.health(|h| {
                        h.last_error = None;
                        h.connected = true;
                        h.disconnected_since = None;
                    });
                    self.emit(Event::Connected { watch: watch.clone() });
                }
                Notice::Disconnected { error, class, retry_in } => {
                    self.health(|h| {
                        h.connected = false;
                        h.disconnected_since.get_or_insert_with(unix_now);
                    });
                    match (&error, retry_in) {
                        (Some(e), Some(d)) => {
                            warn!(watch = %watch, error = %e, retry_in = ?d, "watch failed");
                            self.health(|h| {
                                h.last_error = Some(e.clone());
                                h.reconnects += 1;
                                if let Some(class) = class {
                                    *h.reconnects_by_class.entry(class.name()).or_default() += 1;
                                }
                            });
                        }
                        _ => info!(watch = %watch, "recycling connection (age limit or access token due)"),
                    }
                    self.emit(Event::Disconnected {
                        watch: watch.clone(),
                        error,
                        retry_in,
                    });
                }
                Notice::FirstSight { uidvalidity, last_uid } => {
                    info!(watch = %watch, uidvalidity, last_uid, "first sight of folder; checkpoint created")
                }
                Notice::UidValidityChanged { old, new, policy } => {
                    warn!(watch = %watch, old, new, policy = ?policy, "UIDVALIDITY changed: the folder was recreated or restored");
                    self.pending_post.clear();
                    self.emit(Event::UidValidityChanged {
                        watch: watch.clone(),
                        old,
                        new,
                    });
                }
                Notice::UidNextBehindCheckpoint { uidnext, last_uid } => {
                    warn!(watch = %watch, uidnext, last_uid, "UIDNEXT is below the checkpoint without a UIDVALIDITY change; keeping the checkpoint")
                }
                Notice::UidsBeyondUidNext { uids, uidnext } => {
                    let shown: Vec<u32> = uids.iter().copied().take(10).collect();
                    warn!(watch = %watch, uids = ?shown, count = uids.len(), uidnext, "the server listed UIDs at or above UIDNEXT; ignoring them")
                }
                Notice::Delivered { uid } => {
                    if let Some(route) = self.skipped_now.remove(&uid) {
                        self.health(|h| h.skipped += 1);
                        self.emit(Event::SkippedByRoute {
                            watch: watch.clone(),
                            key: self.key(uidvalidity, uid),
                            uid,
                            route,
                        });
                        continue;
                    }
                    let latency = self.woke_at.map(|t| t.elapsed());
                    self.health(|h| {
                        h.delivered += 1;
                        h.last_delivery = Some(unix_now());
                        if let Some(l) = latency {
                            h.new_mail_seconds.observe(l);
                        }
                    });
                    self.emit(Event::Delivered {
                        watch: watch.clone(),
                        key: self.key(uidvalidity, uid),
                        uid,
                    });
                }
                Notice::Failed {
                    uid,
                    attempts,
                    error,
                    retry_in,
                } => {
                    let key = self.key(uidvalidity, uid);
                    self.health(|h| h.failed += 1);
                    warn!(watch = %watch, uid, key = %key, attempts, retry_in = ?retry_in, error = %error, "delivery failed; will retry");
                    self.emit(Event::Failed {
                        watch: watch.clone(),
                        key,
                        uid,
                        attempts,
                        error,
                    });
                }
                Notice::DeadLettered { uid, error } => {
                    let key = self.key(uidvalidity, uid);
                    error!(watch = %watch, uid, key = %key, error = %error, "message dead-lettered");
                    self.health(|h| h.dead_lettered += 1);
                    self.dead_in_run += 1;
                    self.emit(Event::DeadLettered {
                        watch: watch.clone(),
                        key,
                        uid,
                        error,
                    });
                }
                Notice::SkippedDuplicate { uid } => {
                    let key = self.key(uidvalidity, uid);
                    self.health(|h| h.skipped += 1);
                    info!(watch = %watch, uid, key = %key, "already delivered before the UIDVALIDITY change; skipping");
                    self.emit(Event::SkippedDuplicate {
                        watch: watch.clone(),
                        key,
                        uid,
                    });
                }
                Notice::Vanished { uid } => {
                    let key = self.key(uidvalidity, uid);
                    warn!(watch = %watch, uid, key = %key, "message expunged before its body could be fetched; recorded as vanished");
                    self.emit(Event::Vanished {
                        watch: watch.clone(),
                        key,
                        uid,
                    });
                }
                Notice::PostActionFailed { uids, error, permanent } => {
                    if !permanent {
                        let untried = uids.iter().filter(|u| !self.pending_post.contains(u));
                        self.unposted.extend(untried);
                    }
                    if permanent {
                        error!(watch = %watch, uids = ?uids, error = %error, "post-action refused for good; the messages stay delivered (see `inboxd status`)");
                    } else {
                        warn!(watch = %watch, uids = ?uids, error = %error, "post-action failed; will retry at the next wake");
                    }
                    self.emit(Event::PostActionFailed {
                        watch: watch.clone(),
                        uids,
                        error,
                        permanent,
                    });
                }
                Notice::CaughtUp { last_uid } => {
                    self.woke_at = None;
                    self.health(|h| h.last_sync = Some(unix_now()));
                    self.emit(Event::CaughtUp {
                        watch: watch.clone(),
                        last_uid,
                    })
                }
            }
        }
    }
}

fn not_durable(e: &HandlerError) -> Input {
    Input::Failed {
        class: FailureClass::Network,
        error: clip(format!("handler cannot make the batch durable: {}", e.detail())),
    }
}

fn no_session() -> Input {
    Input::Failed {
        class: FailureClass::Network,
        error: "internal: no session".into(),
    }
}
