//! The watcher: one task per (account, folder) that executes the decision core.
//!
//! A round connects, selects, reconciles the checkpoint with the folder (UIDVALIDITY), catches
//! up by UID range, then waits (IDLE, or a poll sleep) and catches up again after every wake;
//! queued closures run on the same session between waits. Any error ends the round; the
//! reconnect schedule decides when the next one starts. A panic in a round (for example in the
//! IMAP parser on hostile bytes) is caught at the task boundary and treated like a dropped
//! connection: other watchers never notice.
//!
//! **Architecture Invariant:** the checkpoint is committed only after the handler acknowledged
//! and flushed every message up to it; post-actions run only after that commit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use inboxd_core::checkpoint::{AckWindow, Checkpoint};
use inboxd_core::failure::{FailureClass, Reconnect};
use inboxd_core::key::message_key;
use inboxd_core::mailbox::{self, Notice, Selected};
use inboxd_core::retry::AfterFailure;
use inboxd_core::wait::{Wait, next_wait};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::{After, Watch};
use crate::handler::{Handler, HandlerError, Message};
use crate::imap::{ImapError, Session, WaitEnd};
use crate::store::{Delivery, DeliveryStatus, Store, StoreError};

/// Largest number of message bytes fetched in one batch (a single larger message is fetched
/// on its own).
const BATCH_BYTES: u64 = 32 << 20;

/// Something that happened in a watcher. Subscribe with [`Watcher::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Logged in and selected the folder.
    Connected { watch: String },
    /// The session ended; `error` is `None` for a deliberate close (recycle, stop).
    Disconnected {
        watch: String,
        error: Option<String>,
        retry_in: Option<Duration>,
    },
    /// A message was acknowledged by the handler and the checkpoint committed.
    Delivered { watch: String, key: String, uid: u32 },
    /// The handler failed on a message; it will be retried.
    Failed {
        watch: String,
        key: String,
        uid: u32,
        attempts: u32,
        error: String,
    },
    /// The handler failed `max_attempts` times; the message was dead-lettered.
    DeadLettered {
        watch: String,
        key: String,
        uid: u32,
        error: String,
    },
    /// A message was not delivered because its Message-ID was delivered before.
    SkippedDuplicate { watch: String, key: String, uid: u32 },
    /// The folder's UIDVALIDITY changed.
    UidValidityChanged { watch: String, old: u32, new: u32 },
    /// Every message above the checkpoint has been handled.
    CaughtUp { watch: String, last_uid: u32 },
}

/// Why a watcher stopped for good, or why one round of `once` failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("handler: {0}")]
    Handler(HandlerError),
    #[error("watcher task panicked: {0}")]
    Panicked(String),
    #[error("the watcher has stopped")]
    Stopped,
}

impl WatchError {
    pub fn class(&self) -> FailureClass {
        match self {
            WatchError::Imap(e) => e.class(),
            // A handler that cannot make a batch durable (disk full, Maildir unwritable) is
            // retried along the schedule: space comes back, permissions get fixed.
            WatchError::Handler(_) => FailureClass::Network,
            _ => FailureClass::Network,
        }
    }
}

/// Live health of one watch, for `status` and health endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub state: String,
    pub last_error: Option<String>,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub reconnects: u64,
    pub panics: u64,
}

/// A closure queued to run on the watcher's own session between waits.
pub type Job = Box<dyn for<'a> FnOnce(&'a mut Session) -> BoxFuture<'a, ()> + Send>;

/// Whether a watcher runs until stopped or catches up once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forever,
    Once,
}

struct Ctx {
    watch: Watch,
    name: String,
    store: Arc<dyn Store>,
    events: broadcast::Sender<Event>,
    health: Arc<Mutex<Health>>,
    stop: watch::Receiver<bool>,
    jobs: mpsc::Receiver<Job>,
    pending_jobs: Vec<Job>,
    dead_in_run: u64,
}

impl Ctx {
    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn set_state(&self, state: &str) {
        if let Ok(mut h) = self.health.lock() {
            h.state = state.to_string();
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn health(&self, f: impl FnOnce(&mut Health)) {
        if let Ok(mut h) = self.health.lock() {
            f(&mut h);
        }
    }
}

/// How a round ended without error.
enum RoundEnd {
    Stopped,
    Recycle,
    CaughtUp,
}

/// A running watcher. Dropping it asks it to stop (the delivery in flight finishes and is
/// committed); [`Watcher::stop`] also waits for that.
pub struct Watcher {
    name: String,
    stop: watch::Sender<bool>,
    jobs: mpsc::Sender<Job>,
    events: broadcast::Sender<Event>,
    /// Created before the task started, handed to the first subscriber, so that it sees every
    /// event from the start.
    first: Mutex<Option<broadcast::Receiver<Event>>>,
    health: Arc<Mutex<Health>>,
    task: tokio::task::JoinHandle<Result<u64, WatchError>>,
}

impl Watcher {
    /// Starts watching with the handler the config names.
    pub fn start(watch: Watch, store: Arc<dyn Store>, mode: Mode) -> Result<Watcher, HandlerError> {
        let handler = crate::handler::from_config(&watch.deliver)?;
        Ok(Watcher::with_handler(watch, store, handler, mode))
    }

    /// Starts watching with a handler of the caller's.
    pub fn with_handler(watch: Watch, store: Arc<dyn Store>, handler: Box<dyn Handler>, mode: Mode) -> Watcher {
        if let crate::config::Auth::OAuth2(source) = &watch.account.auth {
            source.attach_store(store.clone());
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (jobs_tx, jobs_rx) = mpsc::channel(64);
        let (events, first) = broadcast::channel(1024);
        let health = Arc::new(Mutex::new(Health {
            state: "starting".into(),
            ..Health::default()
        }));
        let name = watch.name();
        let ctx = Ctx {
            name: name.clone(),
            watch,
            store,
            events: events.clone(),
            health: health.clone(),
            stop: stop_rx,
            jobs: jobs_rx,
            pending_jobs: Vec::new(),
            dead_in_run: 0,
        };
        let task = tokio::spawn(supervise(ctx, handler, mode));
        Watcher {
            name,
            stop: stop_tx,
            jobs: jobs_tx,
            events,
            first: Mutex::new(Some(first)),
            health,
            task,
        }
    }

    /// `account/folder`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Receives events: the first subscriber from the watcher's start, later ones from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        match self.first.lock().ok().and_then(|mut f| f.take()) {
            Some(rx) => rx,
            None => self.events.subscribe(),
        }
    }

    /// A snapshot of the watcher's health.
    pub fn health(&self) -> Health {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Runs `f` on the watcher's own session between waits (interrupting IDLE to do so) and
    /// returns its result. If the watcher is disconnected, `f` runs after it reconnects.
    ///
    /// ```no_run
    /// # async fn demo(w: &inboxd::watcher::Watcher) -> Result<(), Box<dyn std::error::Error>> {
    /// let unseen = w.queue(|s| Box::pin(async move { s.search("UNSEEN").await })).await??;
    /// println!("{} unseen", unseen.len());
    /// # Ok(()) }
    /// ```
    pub async fn queue<T, F>(&self, f: F) -> Result<T, WatchError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut Session) -> BoxFuture<'a, T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |s| {
            Box::pin(async move {
                let _ = tx.send(f(s).await);
            })
        });
        self.jobs.send(job).await.map_err(|_| WatchError::Stopped)?;
        rx.await.map_err(|_| WatchError::Stopped)
    }

    /// Asks the watcher to stop (finishing the delivery in flight and committing it) and waits
    /// for it. Returns the number of messages dead-lettered during the run.
    pub async fn stop(self) -> Result<u64, WatchError> {
        self.request_stop();
        self.join().await
    }

    /// Asks the watcher to stop without waiting; [`Watcher::join`] waits. A daemon asks all
    /// its watchers first, then joins them, so none goes on delivering while another stops.
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits for the watcher to end by itself (in [`Mode::Once`]), or after a stop request.
    pub async fn join(mut self) -> Result<u64, WatchError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(WatchError::Panicked(e.to_string())),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Without this, the task would see its stop and job channels closed: every wait on
        // them would end at once, and it would spin against the server.
        let _ = self.stop.send(true);
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

async fn supervise(mut ctx: Ctx, mut handler: Box<dyn Handler>, mode: Mode) -> Result<u64, WatchError> {
    let a = ctx.watch.account.clone();
    let mut reconnect = Reconnect::new(a.schedule.clone(), a.stable_after, a.park_for);
    let origin = Instant::now();
    loop {
        if ctx.stopping() {
            ctx.set_state("stopped");
            return Ok(ctx.dead_in_run);
        }
        ctx.set_state("connecting");
        let round = std::panic::AssertUnwindSafe(round(&mut ctx, handler.as_mut(), &mut reconnect, origin, mode))
            .catch_unwind()
            .await;
        let err = match round {
            Ok(Ok(RoundEnd::Stopped | RoundEnd::CaughtUp)) => {
                ctx.set_state("stopped");
                return Ok(ctx.dead_in_run);
            }
            Ok(Ok(RoundEnd::Recycle)) => {
                info!(watch = %ctx.name, "recycling connection (age limit or access token due)");
                ctx.emit(Event::Disconnected {
                    watch: ctx.name.clone(),
                    error: None,
                    retry_in: None,
                });
                continue;
            }
            Ok(Err(e)) => e,
            Err(panic) => {
                let msg = panic_message(panic.as_ref());
                ctx.health(|h| h.panics += 1);
                error!(watch = %ctx.name, panic = %msg, "watcher panicked; treating it as a dropped connection");
                WatchError::Panicked(msg)
            }
        };
        if mode == Mode::Once {
            ctx.set_state("failed");
            return Err(err);
        }
        let class = err.class();
        if let (FailureClass::AuthExpired, crate::config::Auth::OAuth2(source)) = (class, &a.auth) {
            // The server says the token expired or refused it: the next attempt gets a new one.
            source.invalidate().await;
        }
        let delay = reconnect.failed(origin.elapsed(), class, fastrand::f64());
        let text = format!("{:#}", anyhow::Error::from(err));
        warn!(watch = %ctx.name, error = %text, retry_in = ?delay, "watch failed");
        ctx.health(|h| {
            h.last_error = Some(text.clone());
            h.reconnects += 1;
            h.state = format!("waiting {}s to reconnect", delay.as_secs());
        });
        ctx.emit(Event::Disconnected {
            watch: ctx.name.clone(),
            error: Some(text),
            retry_in: Some(delay),
        });
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = ctx.stop.changed() => {
                    if ctx.stopping() { break; }
                }
                Some(job) = ctx.jobs.recv() => ctx.pending_jobs.push(job),
            }
        }
    }
}

async fn round(
    ctx: &mut Ctx,
    handler: &mut dyn Handler,
    reconnect: &mut Reconnect,
    origin: Instant,
    mode: Mode,
) -> Result<RoundEnd, WatchError> {
    let w = ctx.watch.clone();
    let mut session = Session::open(&w.account).await?;
    let stored = ctx.store.checkpoint(&w.account.name, &w.folder).await?;
    let mut cp = reconcile(ctx, &mut session, stored).await?;
    reconnect.connected(origin.elapsed());
    let connected_at = Instant::now();
    info!(watch = %ctx.name, idle = session.has("IDLE"), "connected");
    ctx.emit(Event::Connected {
        watch: ctx.name.clone(),
    });
    ctx.health(|h| h.last_error = None);

    loop {
        if run_jobs(ctx, &mut session).await {
            // A job may have selected another folder: select ours again before listing.
            cp = reconcile(ctx, &mut session, Some(cp)).await?;
        }
        ctx.set_state("catching up");
        let stopped;
        (cp, stopped) = catch_up(ctx, handler, &mut session, cp).await?;
        if stopped || ctx.stopping() {
            session.logout().await;
            return Ok(RoundEnd::Stopped);
        }
        ctx.emit(Event::CaughtUp {
            watch: ctx.name.clone(),
            last_uid: cp.last_uid,
        });
        if mode == Mode::Once {
            session.logout().await;
            return Ok(RoundEnd::CaughtUp);
        }
        if run_jobs(ctx, &mut session).await {
            cp = reconcile(ctx, &mut session, Some(cp)).await?;
            continue;
        }
        if session.take_news() {
            // Announced during the post-actions or queued work: catch up before waiting.
            continue;
        }
        let token_left = session
            .token_due()
            .map(|due| due.saturating_duration_since(Instant::now()));
        match next_wait(&w.account.wait, session.has("IDLE"), connected_at.elapsed(), token_left) {
            Wait::Recycle => {
                session.logout().await;
                return Ok(RoundEnd::Recycle);
            }
            Wait::Idle(max) => {
                ctx.set_state("idle");
                let (stop, jobs, pending) = (&mut ctx.stop, &mut ctx.jobs, &mut ctx.pending_jobs);
                let interrupt = async {
                    if *stop.borrow() {
                        return;
                    }
                    tokio::select! {
                        _ = stop.changed() => {}
                        job = jobs.recv() => if let Some(j) = job { pending.push(j) },
                    }
                };
                let (s, end) = session.idle(max, interrupt).await?;
                session = s;
                debug!(watch = %ctx.name, end = ?end, "left IDLE");
                if end == WaitEnd::Silence {
                    // The watchdog: no byte for `idle_silence`. A NOOP under its deadline tells
                    // a quiet server from a dead connection.
                    session.noop().await?;
                }
            }
            Wait::Poll(every) => {
                ctx.set_state("polling");
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = ctx.stop.changed() => {}
                    job = ctx.jobs.recv() => if let Some(j) = job { ctx.pending_jobs.push(j) },
                }
                session.noop().await?;
            }
        }
        if ctx.stopping() {
            session.logout().await;
            return Ok(RoundEnd::Stopped);
        }
        cp = reconcile(ctx, &mut session, Some(cp)).await?;
    }
}

/// SELECTs the folder and reconciles the checkpoint with what the server reports (first sight,
/// UIDVALIDITY change). Runs at connect and again after every wake: a folder can be deleted
/// and recreated under a live session, and Dovecot then shows the new folder's messages in
/// the same session, with UIDs that mean something else.
async fn reconcile(ctx: &mut Ctx, session: &mut Session, stored: Option<Checkpoint>) -> Result<Checkpoint, WatchError> {
    let w = &ctx.watch;
    let state = session.select(&w.folder).await?;
    let outcome = mailbox::on_select(
        stored,
        Selected {
            uidvalidity: state.uidvalidity,
            uidnext: state.uidnext,
        },
        w.start,
        w.on_uidvalidity_change,
    );
    match outcome.notice {
        Some(Notice::FirstSight) => {
            info!(watch = %ctx.name, uidvalidity = state.uidvalidity, last_uid = outcome.checkpoint.last_uid, "first sight of folder; checkpoint created")
        }
        Some(Notice::UidValidityChanged { old, new, policy }) => {
            warn!(watch = %ctx.name, old, new, policy = ?policy, "UIDVALIDITY changed: the folder was recreated or restored");
            ctx.emit(Event::UidValidityChanged {
                watch: ctx.name.clone(),
                old,
                new,
            });
        }
        Some(Notice::UidNextBehindCheckpoint { uidnext, last_uid }) => {
            warn!(watch = %ctx.name, uidnext, last_uid, "UIDNEXT is below the checkpoint without a UIDVALIDITY change; keeping the checkpoint")
        }
        None => {}
    }
    if outcome.store {
        ctx.store
            .commit(&w.account.name, &w.folder, outcome.checkpoint, &[])
            .await?;
    }
    Ok(outcome.checkpoint)
}

/// Runs the queued jobs; returns whether any ran (the caller then selects its folder again).
async fn run_jobs(ctx: &mut Ctx, session: &mut Session) -> bool {
    while let Ok(job) = ctx.jobs.try_recv() {
        ctx.pending_jobs.push(job);
    }
    let jobs = std::mem::take(&mut ctx.pending_jobs);
    let ran = !jobs.is_empty();
    for job in jobs {
        job(session).await;
    }
    ran
}

/// The messages of one fetch batch on their way to the checkpoint.
struct Batch {
    /// The checkpoint as last committed.
    cp: Checkpoint,
    window: AckWindow,
    /// Delivery-log rows not yet committed.
    log: Vec<Delivery>,
    /// UIDs delivered (not skipped or dead) and not yet given their post-action.
    acked: Vec<u32>,
}

/// The outcome of delivering one message.
enum Delivered {
    Ok(Delivery),
    Interrupted,
}

/// Delivers everything above the checkpoint, in UID order. Returns the new checkpoint and
/// whether a stop request interrupted the catch-up.
async fn catch_up(
    ctx: &mut Ctx,
    handler: &mut dyn Handler,
    session: &mut Session,
    mut cp: Checkpoint,
) -> Result<(Checkpoint, bool), WatchError> {
    let w = ctx.watch.clone();
    loop {
        session.take_news();
        let listed = session.list_above(cp.last_uid).await?;
        let mut sizes = std::collections::HashMap::new();
        for &(uid, size) in &listed {
            sizes.insert(uid, size);
        }
        let uids = mailbox::uids_to_deliver(listed.into_iter().map(|(u, _)| u).collect(), cp.last_uid);
        if uids.is_empty() {
            if session.take_news() {
                // New mail was announced while we listed: list again rather than miss it.
                continue;
            }
            let settled = mailbox::settle(cp);
            if settled != cp {
                ctx.store.commit(&w.account.name, &w.folder, settled, &[]).await?;
            }
            return Ok((settled, false));
        }
        debug!(watch = %ctx.name, count = uids.len(), from = uids[0], "new messages");
        for batch in mailbox::batches(
            &uids,
            |u| u64::from(sizes.get(&u).copied().unwrap_or(0)),
            w.batch_size,
            BATCH_BYTES,
        ) {
            let fetched = session.fetch(batch).await?;
            // Attempts already made on messages that failed before (e.g. before a restart).
            let failed = ctx.store.failed_attempts(&w.account.name, &w.folder).await?;
            let mut b = Batch {
                cp,
                window: AckWindow::new(cp.last_uid),
                log: Vec::new(),
                acked: Vec::new(),
            };
            for m in &fetched {
                b.window.track(m.uid);
            }
            let mut interrupted = false;
            for m in &fetched {
                if ctx.stopping() {
                    interrupted = true;
                    break;
                }
                let key = message_key(&w.account.name, &w.folder, cp.uidvalidity, m.uid);
                let (mid, ident) = crate::message::identity(&m.body);
                let record = |status, attempts, last_error: String| Delivery {
                    key: key.clone(),
                    account: w.account.name.clone(),
                    folder: w.folder.clone(),
                    uidvalidity: cp.uidvalidity,
                    uid: m.uid,
                    message_id: ident.clone(),
                    status,
                    attempts,
                    last_error,
                    updated_at: 0,
                };
                if mailbox::needs_dedupe(&cp, m.uid)
                    && ctx.store.seen_message_id(&w.account.name, &w.folder, &ident).await?
                {
                    info!(watch = %ctx.name, uid = m.uid, message_id = %ident, "already delivered before the UIDVALIDITY change; skipping");
                    ctx.emit(Event::SkippedDuplicate {
                        watch: ctx.name.clone(),
                        key: key.clone(),
                        uid: m.uid,
                    });
                    b.log.push(record(DeliveryStatus::Skipped, 0, String::new()));
                    b.window.ack(m.uid);
                    continue;
                }
                let msg = Message {
                    account: &w.account.name,
                    folder: &w.folder,
                    uidvalidity: cp.uidvalidity,
                    uid: m.uid,
                    key: &key,
                    message_id: mid.as_deref(),
                    body: &m.body,
                };
                let first = record(DeliveryStatus::Delivered, 0, String::new());
                let prior = failed.get(&key).copied().unwrap_or(0);
                let d = deliver_with_retry(ctx, handler, session, &msg, first, prior, &mut b).await?;
                match d {
                    Delivered::Ok(rec) => {
                        let status = rec.status;
                        b.log.push(rec);
                        b.window.ack(m.uid);
                        if status == DeliveryStatus::Delivered {
                            b.acked.push(m.uid);
                        }
                    }
                    Delivered::Interrupted => {
                        interrupted = true;
                        break;
                    }
                }
                if !handler.batches() {
                    commit(ctx, handler, session, &mut b).await?;
                }
            }
            commit(ctx, handler, session, &mut b).await?;
            cp = b.cp;
            if interrupted {
                return Ok((cp, true));
            }
        }
    }
}

/// Flushes the handler, commits the acknowledged prefix with its log rows, then runs
/// post-actions for the messages that were delivered.
async fn commit(
    ctx: &mut Ctx,
    handler: &mut dyn Handler,
    session: &mut Session,
    b: &mut Batch,
) -> Result<(), WatchError> {
    if b.log.is_empty() && b.acked.is_empty() {
        return Ok(());
    }
    let w = &ctx.watch;
    handler.flush().await.map_err(WatchError::Handler)?;
    let next = Checkpoint {
        last_uid: b.window.advance(),
        ..b.cp
    };
    ctx.store.commit(&w.account.name, &w.folder, next, &b.log).await?;
    b.cp = next;
    for d in b.log.drain(..) {
        if d.status == DeliveryStatus::Delivered {
            ctx.emit(Event::Delivered {
                watch: ctx.name.clone(),
                key: d.key,
                uid: d.uid,
            });
        }
    }
    ctx.health(|h| h.delivered += b.acked.len() as u64);
    let uids = std::mem::take(&mut b.acked);
    if !uids.is_empty() {
        let r = match &w.after {
            After::None => Ok(()),
            After::Seen => session.add_flags(&uids, "\\Seen").await,
            After::Flag(f) => session.add_flags(&uids, f).await,
            After::Delete => session.delete(&uids).await,
            After::Move(folder) => session.move_to(&uids, folder).await,
        };
        if let Err(e) = r {
            // The messages are delivered and committed; only the post-action is lost.
            warn!(watch = %ctx.name, uids = ?uids, "post-action failed; the messages stay delivered");
            return Err(WatchError::Imap(e));
        }
    }
    Ok(())
}

/// Delivers one message, retrying with back-off until it is acknowledged or dead-lettered.
/// Before the first retry wait, what is already acknowledged in this batch is flushed and
/// committed, so a crash during a long back-off does not repeat it.
async fn deliver_with_retry(
    ctx: &mut Ctx,
    handler: &mut dyn Handler,
    session: &mut Session,
    msg: &Message<'_>,
    mut record: Delivery,
    mut attempts: u32,
    batch: &mut Batch,
) -> Result<Delivered, WatchError> {
    let mut committed_prefix = false;
    loop {
        match handler.deliver(msg).await {
            Ok(()) => {
                record.attempts = attempts + 1;
                return Ok(Delivered::Ok(record));
            }
            Err(e) if e.unavailable => {
                // Not this message's fault: commit what is acknowledged, end the round, and
                // let the reconnect schedule try again (the program may come back).
                if !committed_prefix {
                    commit(ctx, handler, session, batch).await?;
                }
                return Err(WatchError::Handler(e));
            }
            Err(e) => {
                attempts += 1;
                let detail = e.detail();
                record.attempts = attempts;
                record.last_error = detail.clone();
                match ctx.watch.retry.after_failure(attempts) {
                    AfterFailure::DeadLetter => {
                        error!(watch = %ctx.name, uid = msg.uid, key = %msg.key, attempts, error = %detail, "handler failed; message dead-lettered");
                        ctx.emit(Event::DeadLettered {
                            watch: ctx.name.clone(),
                            key: msg.key.into(),
                            uid: msg.uid,
                            error: detail,
                        });
                        ctx.health(|h| h.dead_lettered += 1);
                        ctx.dead_in_run += 1;
                        record.status = DeliveryStatus::Dead;
                        return Ok(Delivered::Ok(record));
                    }
                    AfterFailure::RetryAfter(delay) => {
                        warn!(watch = %ctx.name, uid = msg.uid, key = %msg.key, attempts, retry_in = ?delay, error = %detail, "handler failed; will retry");
                        ctx.emit(Event::Failed {
                            watch: ctx.name.clone(),
                            key: msg.key.into(),
                            uid: msg.uid,
                            attempts,
                            error: detail,
                        });
                        if !committed_prefix {
                            commit(ctx, handler, session, batch).await?;
                            committed_prefix = true;
                        }
                        let mut failed = record.clone();
                        failed.status = DeliveryStatus::Failed;
                        ctx.store.record(std::slice::from_ref(&failed)).await?;
                        ctx.set_state(&format!("retrying uid {} in {}s", msg.uid, delay.as_secs()));
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = ctx.stop.changed() => {}
                        }
                        if ctx.stopping() {
                            return Ok(Delivered::Interrupted);
                        }
                    }
                }
            }
        }
    }
}
