//! The watch machine: the one place that decides what a watcher does next.
//!
//! [`WatchMachine::on`] takes what the last action produced (an [`Input`]) and returns the next
//! [`Action`]: connect, select, list, fetch, deliver, flush, commit (when, and how far),
//! post-actions, wait (IDLE, poll, probe), sleep before a retry, log out, stop. The driver in
//! the `inboxd` crate executes one action at a time and feeds the result back; it decides
//! nothing. Time comes in as an offset from the driver's origin and randomness as a `jitter`
//! in `[0, 1)`, so the machine is a pure function of its inputs and is tested without a
//! server, thousands of runs a second (`tests/model.rs`).
//!
//! **When the checkpoint advances** is answered here and only here:
//! - after a SELECT that changed what the checkpoint means (first sight, UIDVALIDITY);
//! - after every acknowledged message when [`WatchSpec::commit_each`] (a handler with side
//!   effects that cannot be repeated cheaply), else at the end of each fetch batch;
//! - before a back-off wait (the acknowledged prefix, so a crash during a long wait does not
//!   repeat it), before a stop, and before a round ends because the handler is unavailable;
//! - when a finished catch-up clears a dedupe pass.
//!
//! With [`WatchSpec::flush_behind`] a batch's flush runs while the next batch is fetched and
//! delivered ([`Action::FlushBehind`]); the batch is committed once that flush is done
//! ([`Action::AwaitFlush`]), in batch order, and nothing but fetching, delivering, checking
//! and listing the batches after it happens meanwhile.
//!
//! Every commit is preceded by a flush of the handler and never passes a UID that was not
//! settled: delivered, dead-lettered, skipped as a duplicate, or found expunged. A UID the
//! server listed but whose body did not come back is never "a gap": the machine asks whether
//! it still exists, and retries and dead-letters it like a failed delivery if it does.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use crate::checkpoint::{AckWindow, Checkpoint};
use crate::failure::{FailureClass, Reconnect};
use crate::mailbox::{self, NewsSeen, Notice as SelectNotice, Selected, StartPolicy, UidValidityPolicy};
use crate::retry::{AfterFailure, RetryPolicy};
use crate::wait::{Wait, WaitPolicy, next_wait};

/// A session younger than this is not recycled (a token lifetime of zero would otherwise make a
/// login loop at network speed); the wait runs until it is this old instead.
pub const RECYCLE_FLOOR: Duration = Duration::from_secs(2);

/// How long a stopping watcher gives the server to end an IDLE (answer DONE) before it drops
/// the session: a stop must not wait `timeouts.done` on a frozen server.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// A back-off wait longer than this is spent disconnected (logged out cleanly), not holding a
/// silent session the server or a NAT would drop anyway.
pub const KEEP_SESSION_FOR: Duration = Duration::from_secs(30);

/// The fixed parts of a watch, as far as decisions go.
#[derive(Clone, Debug)]
pub struct WatchSpec {
    pub start: StartPolicy,
    pub on_uidvalidity_change: UidValidityPolicy,
    pub retry: RetryPolicy,
    pub wait: WaitPolicy,
    /// Most messages fetched in one batch.
    pub batch_size: usize,
    /// Most bytes (by the sizes the server reported) fetched in one batch. A message whose
    /// size is unknown is fetched alone.
    pub batch_bytes: u64,
    /// A message the server reports larger than this is dead-lettered without being fetched.
    pub max_message_size: u64,
    /// A message larger than this (by its reported size), of unknown size, or one a failed
    /// batch covered, is fetched alone and spooled to disk in chunks instead of into memory.
    pub spool_above: u64,
    /// Commit after every message (true) or once per batch (false).
    pub commit_each: bool,
    /// Whether a post-action (flag, move, delete) follows each delivery.
    pub post_action: bool,
    /// Catch up once and finish, instead of watching until stopped.
    pub once: bool,
    /// UIDs in the first listing window of a long backlog ([`LIST_WINDOW`] by default).
    pub list_window: u32,
    /// The handler can make a batch durable while the next one is delivered
    /// ([`Action::FlushBehind`]). Used only for batches committed once each (not with
    /// `commit_each`) and without a post-action (which runs after its batch's commit).
    pub flush_behind: bool,
}

/// One message of a listing: its UID and the size the server reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listed {
    pub uid: u32,
    pub size: Option<u32>,
}

/// What the driver learned about one UID of a [`Action::Fetch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchedInfo {
    pub uid: u32,
    /// The server returned the message's body.
    pub body: bool,
    /// Failed attempts recorded in the delivery log (before a restart, or an earlier round).
    pub prior_attempts: u32,
    /// Asked only for the UIDs in [`Action::Fetch`]'s `check_seen`: its Message-ID (or digest) was
    /// delivered from this folder before.
    pub seen_before: bool,
}

/// How a handler failed on a message, which decides what follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerFailure {
    /// A failed attempt on this message: retried with back-off, dead-lettered after
    /// `max_attempts` (a program that exited non-zero, a webhook's 400).
    Attempt,
    /// The target is busy or briefly unreachable (HTTP 429/5xx, a timeout, a refused
    /// connection): retried with back-off, waiting at least `retry_after` when the target
    /// said so, without counting against the message.
    Transient { retry_after: Option<Duration> },
    /// The target refused this message for good (HTTP 410): dead-lettered at once.
    Permanent,
    /// The handler cannot work at all (its program is missing): a failure of the watch, not
    /// of this message; the round ends and the reconnect schedule tries again.
    Unavailable,
}

impl HandlerFailure {
    /// The failure that decides what follows when a message fails at several targets at once
    /// (fan-out): a target that cannot work at all fails the watch; one that refuses for good
    /// dead-letters the message; a counted failure counts; busy targets are all waited for, the
    /// longest `retry_after` they asked for.
    pub fn graver(self, other: HandlerFailure) -> HandlerFailure {
        fn rank(f: HandlerFailure) -> u8 {
            match f {
                HandlerFailure::Unavailable => 3,
                HandlerFailure::Permanent => 2,
                HandlerFailure::Attempt => 1,
                HandlerFailure::Transient { .. } => 0,
            }
        }
        match (self, other) {
            (HandlerFailure::Transient { retry_after: a }, HandlerFailure::Transient { retry_after: b }) => {
                HandlerFailure::Transient { retry_after: a.max(b) }
            }
            (a, b) if rank(b) > rank(a) => b,
            (a, _) => a,
        }
    }
}

/// Longest wait a target's `Retry-After` can impose before the next attempt.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The server reported a change.
    Activity,
    /// The wait reached its planned length.
    Elapsed,
    /// No byte from the server for too long: probe before trusting the connection.
    Silence,
    /// Queued work or a stop request.
    Interrupted,
    /// (A wait for the account's notifier) The server offers no NOTIFY: wait on a session of
    /// the watch's own from now on.
    NoNotifier,
    /// The server reported new mail and, so far, nothing else: a message count above the one
    /// the session knew when the wait began. The folder is still the one the session selected
    /// (a folder deleted under a session that has it selected is announced otherwise: an
    /// untagged NO or BYE, RFC 2180 §3), so the wake may list without selecting it again
    /// ([`Action::ListNews`]).
    NewMail,
}

/// The status of a delivery-log row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Delivered,
    /// Given up on after its last attempt.
    Dead,
    /// Its Message-ID was delivered before a UIDVALIDITY change.
    Skipped,
    /// Listed, then expunged before its body could be fetched.
    Vanished,
    /// Failed, will be retried.
    Failed,
}

/// A delivery-log row, by UID; the driver adds key, Message-ID and folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRow {
    pub uid: u32,
    pub status: Status,
    pub attempts: u32,
    pub error: String,
}

/// What the last action produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The watch starts.
    Start,
    /// Answer to [`Action::Load`]: the stored checkpoint, and the UIDs (of the stored
    /// UIDVALIDITY) whose post-action failed transiently and awaits a retry.
    Loaded {
        stored: Option<Checkpoint>,
        pending_post_actions: Vec<u32>,
    },
    /// Logged in. `idle`: the server offers IDLE.
    Connected {
        idle: bool,
        token_left: Option<Duration>,
    },
    Selected(Selected),
    /// Answer to [`Action::ListNews`]: what the session saw. Unless the listing fits what was
    /// announced ([`mailbox::news_fit`]) the wake selects the folder again, as every wake did
    /// before.
    NewsListed(NewsSeen),
    /// `news`: the server announced new mail while the listing ran.
    Listed {
        items: Vec<Listed>,
        news: bool,
    },
    Fetched(Vec<FetchedInfo>),
    /// Answer to [`Action::CheckExists`].
    Exists {
        uid: u32,
        exists: bool,
    },
    Delivered {
        uid: u32,
    },
    HandlerFailed {
        uid: u32,
        error: String,
        kind: HandlerFailure,
    },
    Flushed,
    /// Answer to [`Action::FlushBehind`].
    FlushStarted,
    Committed,
    Recorded,
    PostActionDone,
    PostActionFailed {
        permanent: bool,
        error: String,
    },
    JobsRan {
        ran: bool,
    },
    WaitEnded {
        wake: Wake,
        token_left: Option<Duration>,
    },
    Probed,
    Slept,
    LoggedOut,
    TokenInvalidated,
    /// The action failed; the session (if any) is gone.
    Failed {
        class: FailureClass,
        error: String,
    },
    /// The action was abandoned for a stop request ([`WatchMachine::stop`] was called).
    Interrupted,
}

/// A listing window: `UID FETCH above+1:upto`, or `above+1:*` without `upto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListWindow {
    pub above: u32,
    pub upto: Option<u32>,
}

/// The UIDs in one listing window of a long backlog, at first: listing a backlog of 10,000
/// messages in one command makes every fetch wait for the whole of it; in windows, each
/// window after the first is listed while the last batch of the one before is delivered. A
/// window with messages doubles the next one, up to [`LIST_WINDOW_GROWTH`] times this (only
/// the first batch of a window waits for its listing); an empty one doubles the next one
/// without bound (UIDs may be sparse after mass deletions).
pub const LIST_WINDOW: u32 = 1_000;

/// How many times the first listing window the later ones grow to (see
/// [`WatchSpec::list_window`]).
pub const LIST_WINDOW_GROWTH: u32 = 8;

/// On a wake, how many UIDs above the checkpoint the driver may fetch the bodies of together
/// with the SELECT and the listing ([`BodiesAhead`]), at most `batch_size`.
pub const WAKE_BODIES: u32 = 4;

/// On a wake, how much of each body read ahead is asked for, at most `spool_above`: a message
/// this long or longer is fetched as usual once listed.
pub const WAKE_BODY_BYTES: u32 = 64 * 1024;

/// Bodies read on a guess with the wake's SELECT and listing, before the listing says which
/// UIDs exist: `UID FETCH from:to (UID BODY.PEEK[]<0.max_bytes>)`. New mail usually gets the
/// UIDs right above the checkpoint, so the message that woke the watcher comes back in the
/// same round trip as the listing instead of one more after it. A body that came back whole
/// (shorter than `max_bytes`, and exactly as long as the listing's RFC822.SIZE) serves the
/// `Fetch` that names its UID; anything else is fetched as usual. Memory: at most
/// `(to - from + 1) * max_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodiesAhead {
    pub from: u32,
    pub to: u32,
    pub max_bytes: u32,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Connect,
    /// Read the stored checkpoint (once, after the first login: the store is not touched
    /// before the server answered).
    Load,
    /// SELECT the watched folder. With `list_ahead`, the listing the machine will ask for
    /// next if the SELECT changes nothing it did not expect (same UIDVALIDITY, nothing to
    /// retry first): the driver may send it together with the SELECT, one round trip instead
    /// of two on the wake path; the next `List` names exactly it, or it is discarded unused.
    ///
    /// `bodies_ahead` (only with `list_ahead`): the bodies the driver may read in the same
    /// write, see [`BodiesAhead`]. Nothing read ahead is delivered before a `Fetch` names it.
    Select {
        list_ahead: Option<ListWindow>,
        bodies_ahead: Option<BodiesAhead>,
    },
    /// The wake path when the wait ended on new mail alone ([`Wake::NewMail`]): end the IDLE
    /// and send this listing (and the bodies, as with [`Action::Select`]) on the folder as
    /// selected, without selecting it again: one round trip without the SELECT's cost. What
    /// comes back is kept for the `List` that follows if it fits what was announced
    /// ([`mailbox::news_fit`]); otherwise the machine selects again and it is discarded.
    ListNews {
        list: ListWindow,
        bodies_ahead: BodiesAhead,
    },
    /// `UID FETCH above+1:upto (UID RFC822.SIZE INTERNALDATE FLAGS)`; without `upto`,
    /// `above+1:*`. A long backlog is listed in windows of UIDs (each below the UIDNEXT of
    /// the SELECT, so no message arriving later can fall into one that was listed), the last
    /// one open-ended; see [`ListWindow`].
    List {
        above: u32,
        upto: Option<u32>,
    },
    /// Fetch these bodies; for those in `check_seen` (the dedupe pass after a UIDVALIDITY
    /// change), say whether each was delivered before. With `spool`, `uids` is one message, to
    /// be fetched in chunks into a file (flat memory whatever its size).
    ///
    /// `ahead` is the batch after this one if the catch-up goes on as planned (never a spooled
    /// one): the driver may read it from the server while this batch is delivered and
    /// committed, the session being idle then. The next `Fetch` names exactly these UIDs
    /// unless something happened in between (a failure, a retry, a stop); then the read-ahead
    /// is discarded unused. Nothing read ahead is delivered before the machine asks for it.
    ///
    /// `list_ahead` is, when this batch is the last of a listing window, the `List` that
    /// follows it if all goes as planned: the driver may send it while this batch is delivered,
    /// like `ahead`, and the next `List` names exactly it or it is discarded.
    Fetch {
        uids: Vec<u32>,
        check_seen: Vec<u32>,
        spool: bool,
        ahead: Vec<u32>,
        list_ahead: Option<ListWindow>,
    },
    /// Does this UID still exist (`UID SEARCH UID n`)?
    CheckExists {
        uid: u32,
    },
    /// Hand the fetched message to the handler; `attempt` counts from 1.
    Deliver {
        uid: u32,
        attempt: u32,
    },
    Flush,
    /// Start making the deliveries since the last flush durable, without waiting: the next
    /// batch is fetched and delivered meanwhile. Answered by [`Input::FlushStarted`]; the
    /// batch counts only once [`Action::AwaitFlush`] is answered by [`Input::Flushed`]. At
    /// most one is in flight.
    FlushBehind,
    /// Wait for the flush started by [`Action::FlushBehind`] to finish: [`Input::Flushed`], or
    /// [`Input::Failed`] if the batch could not be made durable (it then counts for nothing).
    AwaitFlush,
    /// Write the checkpoint and these rows in one transaction.
    Commit {
        checkpoint: Checkpoint,
        log: Vec<LogRow>,
    },
    /// Write rows without touching the checkpoint.
    Record {
        log: Vec<LogRow>,
    },
    PostAction {
        uids: Vec<u32>,
    },
    /// Run queued jobs on the session; the folder is selected again afterwards.
    RunJobs,
    Idle(Duration),
    Poll(Duration),
    /// Wait without a session (it was logged out) until the account's notifier (one NOTIFY
    /// session for the account's folders, RFC 5465) reports a change in this folder, for at
    /// most this long; then connect and catch up. Answered by `WaitEnded` (`NoNotifier` when
    /// the server turns out to have no NOTIFY).
    AwaitNotice(Duration),
    /// NOOP under its deadline.
    Probe,
    /// Wait; with `keep_session` the session stays open (and unused).
    Sleep {
        delay: Duration,
        keep_session: bool,
    },
    /// The token was refused or expired: the next login needs a fresh one.
    InvalidateToken,
    Logout,
    /// The watch is over: stopped, or `once` finished (`Err` with the reason if it failed).
    Done(Result<(), String>),
}

/// Something the operator (logs, events, health) should hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    Connected,
    /// The session ended; `error` and `class` are `None` for a deliberate close (recycle).
    Disconnected {
        error: Option<String>,
        class: Option<FailureClass>,
        retry_in: Option<Duration>,
    },
    FirstSight {
        uidvalidity: u32,
        last_uid: u32,
    },
    UidValidityChanged {
        old: u32,
        new: u32,
        policy: UidValidityPolicy,
    },
    UidNextBehindCheckpoint {
        uidnext: u32,
        last_uid: u32,
    },
    /// The server listed UIDs at or above UIDNEXT (checked again with a fresh SELECT): they
    /// are ignored, and the checkpoint never moves to them.
    UidsBeyondUidNext {
        uids: Vec<u32>,
        uidnext: u32,
    },
    /// Committed as delivered.
    Delivered {
        uid: u32,
    },
    Failed {
        uid: u32,
        attempts: u32,
        error: String,
        retry_in: Duration,
    },
    DeadLettered {
        uid: u32,
        error: String,
    },
    SkippedDuplicate {
        uid: u32,
    },
    Vanished {
        uid: u32,
    },
    PostActionFailed {
        uids: Vec<u32>,
        error: String,
        permanent: bool,
    },
    CaughtUp {
        last_uid: u32,
    },
}

/// What the watch is doing, for health reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Starting,
    Connecting,
    CatchingUp,
    Idle,
    Polling,
    RetryingMessage { uid: u32, delay: Duration },
    WaitingToReconnect { delay: Duration },
    Stopped,
    Failed,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Starting => f.write_str("starting"),
            State::Connecting => f.write_str("connecting"),
            State::CatchingUp => f.write_str("catching up"),
            State::Idle => f.write_str("idle"),
            State::Polling => f.write_str("polling"),
            State::RetryingMessage { uid, delay } => write!(f, "retrying uid {uid} in {}s", delay.as_secs()),
            State::WaitingToReconnect { delay } => write!(f, "waiting {}s to reconnect", delay.as_secs()),
            State::Stopped => f.write_str("stopped"),
            State::Failed => f.write_str("failed"),
        }
    }
}

/// Why a SELECT was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SelectFor {
    /// The first SELECT of a session.
    Round,
    /// After a wake or queued jobs.
    Resync,
    /// The listing named UIDs at or above UIDNEXT: a fresh UIDNEXT decides.
    RecheckUidNext,
}

/// What follows a flush and commit.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AfterCommit {
    /// Go on with the catch-up.
    Continue,
    /// The listing after a SELECT.
    List,
    /// A finished catch-up.
    CaughtUp,
    /// Record this failed row, then wait and try again.
    Retry { row: LogRow, delay: Duration },
    /// End the round as a failure (the handler is unavailable).
    Fail { class: FailureClass, error: String },
    /// Log out and finish.
    Stop,
}

/// What follows a logout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterLogout {
    Reconnect,
    Sleep {
        delay: Duration,
    },
    Finish,
    /// Wait for the account's notifier ([`Action::AwaitNotice`]) this long at most.
    AwaitNotice(Duration),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Connecting,
    Loading,
    Selecting(SelectFor),
    Listing,
    Fetching {
        uids: Vec<u32>,
    },
    Checking {
        uid: u32,
    },
    Delivering {
        uid: u32,
        attempt: u32,
    },
    Flushing(AfterCommit),
    /// [`Action::FlushBehind`] of this batch was asked for.
    StartingFlush(Behind),
    /// [`Action::AwaitFlush`]: the flush in flight must finish before what was held back.
    AwaitingFlush,
    /// The commit of the batch whose flush finished behind.
    CommittingBehind,
    Committing {
        next: Checkpoint,
        then: AfterCommit,
    },
    Recording {
        uid: u32,
        delay: Duration,
    },
    PostActing {
        retrying: bool,
    },
    /// `news_only`: the wait before ended on new mail alone ([`Wake::NewMail`]).
    RunningJobs {
        then_wait: bool,
        news_only: bool,
    },
    ListingNews,
    Waiting {
        poll: bool,
    },
    AwaitingNotice,
    Probing,
    Sleeping {
        reconnect: bool,
    },
    InvalidatingToken {
        delay: Duration,
    },
    LoggingOut(AfterLogout),
    Done,
}

/// A batch whose flush runs behind the catch-up: what its commit will write.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Behind {
    next: Checkpoint,
    log: Vec<LogRow>,
    delivered: Vec<u32>,
}

/// The catch-up in progress within one session.
#[derive(Clone, Debug, Default)]
struct CatchUp {
    /// Listed UIDs not yet fetched, ascending, with their reported sizes.
    queue: VecDeque<Listed>,
    /// The current batch's UIDs not yet settled, ascending.
    batch: VecDeque<u32>,
    fetched: BTreeMap<u32, FetchedInfo>,
    window: AckWindow,
    /// Rows settled since the last commit.
    log: Vec<LogRow>,
    /// Delivered since the last commit: their post-actions follow the commit.
    delivered: Vec<u32>,
}

/// The decision machine of one watch. See the module documentation.
#[derive(Clone, Debug)]
pub struct WatchMachine {
    spec: WatchSpec,
    reconnect: Reconnect,
    phase: Phase,
    state: State,
    /// The committed checkpoint (`None` before the folder was first seen).
    cp: Option<Checkpoint>,
    uidnext: u32,
    idle: bool,
    /// When the current session selected its folder the first time.
    connected_at: Option<Duration>,
    /// When the current IDLE began (a session dropped while idling long enough is routine).
    idle_since: Option<Duration>,
    catch_up: CatchUp,
    /// The batch whose flush is in flight ([`Action::FlushBehind`]).
    behind: Option<Behind>,
    /// A batch made durable behind, to be committed (after the next flush was started).
    flushed: Option<Behind>,
    /// What was held back until the flush in flight finished, and the phase it set.
    held: Option<(Action, Phase)>,
    /// A flush is in flight whose batch counts for nothing (the commit before it failed): it
    /// is awaited all the same before anything else touches the handler or the store.
    stray: bool,
    /// UIDs found at or above UIDNEXT after a fresh SELECT; ignored while still beyond it.
    distrusted: BTreeSet<u32>,
    /// Post-actions to try again at the next wake.
    pending_post: Vec<u32>,
    /// Post-actions in flight.
    posting: Vec<u32>,
    /// Failed whole-fetch attempts per UID fetched alone (a message the server cannot send).
    fetch_failures: BTreeMap<u32, (u32, String)>,
    /// After a failed batch fetch, UIDs up to this one are fetched one at a time.
    single_until: u32,
    /// The message the target was last busy on, and how many busy answers in a row.
    busy: Option<(u32, u32)>,
    stopping: bool,
    /// The stored state was read.
    loaded: bool,
    /// The account's notifier cannot serve this watch (no NOTIFY): IDLE on its own session.
    notifier_off: bool,
    /// The session being opened follows a wait for a notice (no `Connected` notice for it).
    noticed: bool,
    /// An action was abandoned mid-command: the session cannot carry post-actions or LOGOUT.
    session_broken: bool,
    /// The listing was already checked against a fresh UIDNEXT.
    rechecked: bool,
    /// The next listing follows a wake without a SELECT (`ListNews`) whose answer fit what was
    /// announced: UIDs beyond the last SELECT's UIDNEXT are those messages.
    uidnext_by_count: bool,
    /// The upper bound of the listing window being worked through, if it had one.
    window_upto: Option<u32>,
    /// The size of the next listing window.
    window_size: u32,
    /// What follows the post-action in flight.
    after_post: Option<AfterCommit>,
    /// When the session's access token is due, as an offset like `now`.
    token_due: Option<Duration>,
    now: Duration,
    jitter: f64,
    notices: Vec<Notice>,
}

impl WatchMachine {
    pub fn new(spec: WatchSpec, reconnect: Reconnect) -> WatchMachine {
        let window_size = spec.list_window.max(1);
        WatchMachine {
            spec,
            reconnect,
            phase: Phase::Start,
            state: State::Starting,
            cp: None,
            uidnext: 1,
            idle: false,
            connected_at: None,
            idle_since: None,
            catch_up: CatchUp::default(),
            behind: None,
            flushed: None,
            held: None,
            stray: false,
            distrusted: BTreeSet::new(),
            pending_post: Vec::new(),
            posting: Vec::new(),
            fetch_failures: BTreeMap::new(),
            single_until: 0,
            busy: None,
            stopping: false,
            loaded: false,
            notifier_off: false,
            noticed: false,
            session_broken: false,
            window_upto: None,
            window_size,
            rechecked: false,
            uidnext_by_count: false,
            after_post: None,
            token_due: None,
            now: Duration::ZERO,
            jitter: 0.0,
            notices: Vec::new(),
        }
    }

    /// A stop was requested: the delivery in flight finishes and is committed, then the
    /// session logs out. Call it before feeding the input of the interrupted action.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// The committed checkpoint.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.cp
    }

    /// The first message of the last listing not yet settled, if any.
    pub fn oldest_pending(&self) -> Option<u32> {
        self.catch_up
            .batch
            .front()
            .copied()
            .or_else(|| self.catch_up.queue.front().map(|l| l.uid))
    }

    /// Messages of the last listing above the checkpoint not yet settled (the watch's lag as
    /// far as it knows).
    pub fn backlog(&self) -> usize {
        self.catch_up.queue.len() + self.catch_up.batch.len()
    }

    /// What the watch is doing.
    pub fn state(&self) -> State {
        self.state
    }

    /// Notices since the last call, oldest first.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        core::mem::take(&mut self.notices)
    }

    /// Feeds the result of the last action (or [`Input::Start`]) and returns the next action.
    /// `now` is the time since the driver's origin; `jitter` a number in `[0, 1)`.
    pub fn on(&mut self, input: Input, now: Duration, jitter: f64) -> Action {
        self.now = now;
        self.jitter = jitter;
        let action = self.step(input, now, jitter);
        let action = self.hold(action);
        if let Action::Done(result) = &action {
            self.phase = Phase::Done;
            self.state = if result.is_ok() { State::Stopped } else { State::Failed };
        }
        action
    }

    /// With a batch's flush in flight, only fetching, delivering, checking and listing the
    /// batches after it go on (none of them moves the checkpoint or needs that batch done); anything else is
    /// held back: the flush is awaited and its batch committed first.
    fn hold(&mut self, action: Action) -> Action {
        if (self.behind.is_none() && !self.stray)
            || matches!(self.phase, Phase::AwaitingFlush | Phase::CommittingBehind)
        {
            return action;
        }
        if matches!(
            action,
            Action::Fetch { .. } | Action::Deliver { .. } | Action::CheckExists { .. } | Action::List { .. }
        ) {
            return action;
        }
        let phase = core::mem::replace(&mut self.phase, Phase::AwaitingFlush);
        self.held = Some((action, phase));
        Action::AwaitFlush
    }

    /// The batch made durable behind is committed.
    fn commit_flushed(&mut self) -> Action {
        let Some(batch) = &self.flushed else {
            return self.resume();
        };
        self.phase = Phase::CommittingBehind;
        Action::Commit {
            checkpoint: batch.next,
            log: batch.log.clone(),
        }
    }

    /// What was held back for the flush in flight, or the catch-up's next step.
    fn resume(&mut self) -> Action {
        match self.held.take() {
            Some((action, phase)) => {
                self.phase = phase;
                action
            }
            None => self.next(),
        }
    }

    fn step(&mut self, input: Input, now: Duration, jitter: f64) -> Action {
        if self.phase == Phase::Done {
            return Action::Done(Ok(()));
        }
        let phase = core::mem::replace(&mut self.phase, Phase::Done);
        match (phase, input) {
            (Phase::Start, Input::Start) => self.connect(),
            (
                Phase::Loading,
                Input::Loaded {
                    stored,
                    pending_post_actions,
                },
            ) => {
                self.cp = stored;
                self.pending_post = pending_post_actions;
                self.loaded = true;
                self.select(SelectFor::Round)
            }
            (Phase::AwaitingFlush, Input::Flushed | Input::Failed { .. }) if self.stray => {
                // Its batch was given up already.
                self.stray = false;
                self.resume()
            }
            (
                Phase::StartingFlush(_) | Phase::AwaitingFlush | Phase::CommittingBehind,
                Input::Failed { class, error },
            ) => {
                // The batches not committed count for nothing: the next session starts from
                // the committed checkpoint. A flush still in flight (the commit of the batch
                // before it failed) is awaited before anything else.
                self.stray = self.behind.take().is_some();
                self.flushed = None;
                self.held = None;
                self.failed(class, error, now, jitter, None)
            }
            (phase, Input::Failed { class, error }) => {
                if let Phase::Fetching { uids } = &phase {
                    self.fetch_failed(uids, &error);
                }
                let idled_for = match phase {
                    Phase::Waiting { poll: false } => self.idle_since.map(|at| now.saturating_sub(at)),
                    _ => None,
                };
                self.failed(class, error, now, jitter, idled_for)
            }
            (phase, Input::Interrupted) => self.interrupted(phase),
            (Phase::Connecting, Input::Connected { idle, token_left }) => {
                // IDLE when the server offers it, unless the account polls by choice.
                self.idle = idle && self.spec.wait.use_idle;
                self.token_due = token_left.map(|t| now.saturating_add(t));
                self.session_broken = false;
                if !self.loaded {
                    self.phase = Phase::Loading;
                    return Action::Load;
                }
                self.select(SelectFor::Round)
            }
            (Phase::Selecting(why), Input::Selected(selected)) => self.selected(why, selected, now),
            (Phase::Listing, Input::Listed { items, news }) => self.listed(items, news),
            (Phase::Fetching { uids }, Input::Fetched(infos)) => {
                let wanted: BTreeSet<u32> = uids.iter().copied().collect();
                self.catch_up.fetched = infos
                    .into_iter()
                    .filter(|i| wanted.contains(&i.uid))
                    .map(|i| (i.uid, i))
                    .collect();
                for &uid in &uids {
                    // Every UID of the batch holds the checkpoint until it is settled, whether
                    // or not its body came back.
                    self.catch_up.window.track(uid);
                    if self.catch_up.fetched.get(&uid).is_some_and(|i| i.body) {
                        self.fetch_failures.remove(&uid);
                    }
                }
                self.catch_up.batch = uids.into();
                self.next()
            }
            (Phase::Checking { uid }, Input::Exists { uid: asked, exists }) if asked == uid => {
                self.catch_up.batch.pop_front();
                if !exists {
                    self.notices.push(Notice::Vanished { uid });
                    self.settle(uid, Status::Vanished, 0, String::new());
                    return self.after_settle();
                }
                let prior = self.catch_up.fetched.get(&uid).map_or(0, |i| i.prior_attempts);
                let error = String::from("the server listed this message but did not return its body");
                self.failed_attempt(uid, prior + 1, error)
            }
            (Phase::Delivering { uid, attempt }, Input::Delivered { uid: done }) if done == uid => {
                self.busy = None;
                self.catch_up.batch.pop_front();
                self.catch_up.delivered.push(uid);
                self.settle(uid, Status::Delivered, attempt, String::new());
                self.after_settle()
            }
            (
                Phase::Delivering { uid, attempt },
                Input::HandlerFailed {
                    uid: failed,
                    error,
                    kind,
                },
            ) if failed == uid => match kind {
                HandlerFailure::Unavailable => {
                    // Not this message's fault: commit the prefix and end the round; the
                    // reconnect schedule tries again.
                    self.flush(AfterCommit::Fail {
                        class: FailureClass::Network,
                        error,
                    })
                }
                HandlerFailure::Attempt => {
                    self.catch_up.batch.pop_front();
                    self.failed_attempt(uid, attempt, error)
                }
                HandlerFailure::Permanent => {
                    self.catch_up.batch.pop_front();
                    self.dead_letter(uid, attempt, error)
                }
                HandlerFailure::Transient { retry_after } => {
                    self.catch_up.batch.pop_front();
                    self.transient_failure(uid, attempt, error, retry_after)
                }
            },
            (Phase::Flushing(then), Input::Flushed) => {
                let next = self.advance();
                let log = core::mem::take(&mut self.catch_up.log);
                self.phase = Phase::Committing { next, then };
                Action::Commit { checkpoint: next, log }
            }
            (Phase::StartingFlush(batch), Input::FlushStarted) => {
                self.behind = Some(batch);
                if self.flushed.is_some() {
                    // The batch before it was durable: committed while this one is flushed.
                    return self.commit_flushed();
                }
                self.next()
            }
            (Phase::AwaitingFlush, Input::Flushed) => {
                self.flushed = self.behind.take();
                match self.held.take() {
                    // The next batch's flush starts before this one's commit: the disk stays
                    // busy while the store commits.
                    Some((Action::FlushBehind, phase @ Phase::StartingFlush(_))) => {
                        self.phase = phase;
                        Action::FlushBehind
                    }
                    held => {
                        self.held = held;
                        self.commit_flushed()
                    }
                }
            }
            (Phase::CommittingBehind, Input::Committed) => {
                if let Some(batch) = self.flushed.take() {
                    self.cp = Some(batch.next);
                    for uid in batch.delivered {
                        self.notices.push(Notice::Delivered { uid });
                    }
                }
                self.resume()
            }
            (Phase::Committing { next, then }, Input::Committed) => {
                self.cp = Some(next);
                let delivered = core::mem::take(&mut self.catch_up.delivered);
                for &uid in &delivered {
                    self.notices.push(Notice::Delivered { uid });
                }
                if self.spec.post_action && !delivered.is_empty() && self.session_broken {
                    // The session cannot carry it now: recorded as pending, tried at the next
                    // start.
                    self.notices.push(Notice::PostActionFailed {
                        uids: delivered,
                        error: String::from("stopped before the post-action could run"),
                        permanent: false,
                    });
                } else if self.spec.post_action && !delivered.is_empty() {
                    self.posting = delivered;
                    self.phase = Phase::PostActing { retrying: false };
                    // `then` is resumed after the post-action.
                    self.after_post = Some(then);
                    return Action::PostAction {
                        uids: self.posting.clone(),
                    };
                }
                self.after_commit(then)
            }
            (Phase::Recording { uid, delay }, Input::Recorded) => self.back_off(uid, delay),
            (Phase::PostActing { retrying }, Input::PostActionDone) => {
                self.posting.clear();
                self.after_post_action(retrying)
            }
            (Phase::PostActing { retrying }, Input::PostActionFailed { permanent, error }) => {
                let uids = core::mem::take(&mut self.posting);
                self.notices.push(Notice::PostActionFailed {
                    uids: uids.clone(),
                    error,
                    permanent,
                });
                if !permanent {
                    // Tried again at the next wake (the driver also records them).
                    self.pending_post.extend(uids);
                    self.pending_post.sort_unstable();
                    self.pending_post.dedup();
                }
                self.after_post_action(retrying)
            }
            (Phase::RunningJobs { then_wait, news_only }, Input::JobsRan { ran }) => {
                if !ran && news_only {
                    return self.list_news();
                }
                if ran || !then_wait {
                    // A job may have selected another folder: select ours again.
                    self.select(SelectFor::Resync)
                } else {
                    self.wait(now)
                }
            }
            (Phase::ListingNews, Input::NewsListed(seen)) => {
                if !mailbox::news_fit(&seen, self.committed_cp().last_uid) {
                    // Something besides new mail, or a listing that does not match what was
                    // announced: the folder as the server has it now decides.
                    return self.select(SelectFor::Resync);
                }
                // The listed UIDs were assigned after the last SELECT: above its UIDNEXT, and
                // vouched for by the message count instead.
                self.uidnext_by_count = true;
                self.state = State::CatchingUp;
                self.list()
            }
            (Phase::Waiting { poll }, Input::WaitEnded { wake, token_left }) => {
                if let Some(t) = token_left {
                    self.token_due = Some(now.saturating_add(t));
                }
                if self.stopping {
                    return self.logout(AfterLogout::Finish);
                }
                if poll || wake == Wake::Silence {
                    self.phase = Phase::Probing;
                    return Action::Probe;
                }
                self.run_jobs_then(false, wake == Wake::NewMail)
            }
            (Phase::Probing, Input::Probed) => self.run_jobs(false),
            (Phase::Sleeping { reconnect }, Input::Slept) => {
                if self.stopping {
                    return if reconnect {
                        Action::Done(Ok(()))
                    } else {
                        self.flush(AfterCommit::Stop)
                    };
                }
                if reconnect {
                    self.connect()
                } else {
                    // Back from a back-off with the session: list again, which fetches the
                    // message anew (the attempts are in the log).
                    self.list()
                }
            }
            (Phase::InvalidatingToken { delay }, Input::TokenInvalidated) => self.sleep_disconnected(delay),
            (Phase::LoggingOut(then), Input::LoggedOut) => match then {
                AfterLogout::Reconnect => self.connect(),
                AfterLogout::Sleep { delay } => {
                    if self.stopping {
                        return Action::Done(Ok(()));
                    }
                    self.phase = Phase::Sleeping { reconnect: true };
                    Action::Sleep {
                        delay,
                        keep_session: false,
                    }
                }
                AfterLogout::Finish => Action::Done(Ok(())),
                AfterLogout::AwaitNotice(max) => {
                    if self.stopping {
                        return Action::Done(Ok(()));
                    }
                    self.idle_since = Some(now);
                    self.state = State::Idle;
                    self.phase = Phase::AwaitingNotice;
                    Action::AwaitNotice(max)
                }
            },
            (Phase::AwaitingNotice, Input::WaitEnded { wake, .. }) => {
                if self.stopping {
                    return Action::Done(Ok(()));
                }
                if wake == Wake::NoNotifier {
                    self.notifier_off = true;
                }
                self.noticed = true;
                // News, the wait's bound, or queued jobs: a session again, which catches up.
                self.connect()
            }
            (phase, input) => {
                // An input that does not answer the action in flight: a driver bug. End the
                // round as a failure rather than guess; the schedule reconnects.
                let error = format!("internal: {input:?} does not answer {phase:?}");
                self.failed(FailureClass::Network, error, now, jitter, None)
            }
        }
    }

    fn connect(&mut self) -> Action {
        self.connected_at = None;
        self.catch_up = CatchUp::default();
        self.state = State::Connecting;
        self.phase = Phase::Connecting;
        Action::Connect
    }

    fn select(&mut self, why: SelectFor) -> Action {
        self.phase = Phase::Selecting(why);
        let list_ahead = self.list_after_resync(why);
        let bodies_ahead = list_ahead.map(|w| self.bodies_ahead(w));
        Action::Select {
            list_ahead,
            bodies_ahead,
        }
    }

    /// The bodies read with the wake's listing: the first few UIDs above its start.
    fn bodies_ahead(&self, w: ListWindow) -> BodiesAhead {
        let count = WAKE_BODIES.min(u32::try_from(self.spec.batch_size.max(1)).unwrap_or(u32::MAX));
        let from = w.above.saturating_add(1);
        BodiesAhead {
            from,
            to: from.saturating_add(count - 1),
            max_bytes: WAKE_BODY_BYTES.min(u32::try_from(self.spec.spool_above).unwrap_or(u32::MAX)),
        }
    }

    /// The listing that follows a SELECT on the wake path (IDLE or a poll said something
    /// changed, or queued jobs ran), if the SELECT shows what the last one did: the first
    /// window above the checkpoint, bounded as the last UIDNEXT bounds it. Only there: at a
    /// connect the backlog is unknown (a long one is listed in windows), and a post-action to
    /// retry, a stop or a UIDVALIDITY change comes first.
    fn list_after_resync(&self, why: SelectFor) -> Option<ListWindow> {
        if why != SelectFor::Resync || self.stopping || !self.pending_post.is_empty() {
            return None;
        }
        Some(self.window_of(self.cp?.last_uid, self.spec.list_window))
    }

    fn selected(&mut self, why: SelectFor, selected: Selected, now: Duration) -> Action {
        self.uidnext = selected.uidnext;
        self.uidnext_by_count = false;
        let outcome = mailbox::on_select(self.cp, selected, self.spec.start, self.spec.on_uidvalidity_change);
        match outcome.notice {
            Some(SelectNotice::FirstSight) => self.notices.push(Notice::FirstSight {
                uidvalidity: outcome.checkpoint.uidvalidity,
                last_uid: outcome.checkpoint.last_uid,
            }),
            Some(SelectNotice::UidValidityChanged { old, new, policy }) => {
                // The old UIDs mean nothing any more.
                self.pending_post.clear();
                self.fetch_failures.clear();
                self.distrusted.clear();
                self.single_until = 0;
                self.notices.push(Notice::UidValidityChanged { old, new, policy });
            }
            Some(SelectNotice::UidNextBehindCheckpoint { uidnext, last_uid }) => {
                self.notices.push(Notice::UidNextBehindCheckpoint { uidnext, last_uid })
            }
            None => {}
        }
        self.distrusted.retain(|&u| u >= selected.uidnext);
        if why == SelectFor::Round {
            self.reconnect.connected(now);
            self.connected_at = Some(now);
            // A session for a notice is not news to whoever follows the watch's connection.
            if !core::mem::take(&mut self.noticed) {
                self.notices.push(Notice::Connected);
            }
        }
        self.state = State::CatchingUp;
        if outcome.store {
            self.phase = Phase::Committing {
                next: outcome.checkpoint,
                then: AfterCommit::List,
            };
            return Action::Commit {
                checkpoint: outcome.checkpoint,
                log: Vec::new(),
            };
        }
        self.cp = Some(outcome.checkpoint);
        if why == SelectFor::RecheckUidNext {
            return self.list();
        }
        self.list_after_select()
    }

    /// After a SELECT: post-actions that failed earlier are tried again, then the listing.
    fn list_after_select(&mut self) -> Action {
        if !self.pending_post.is_empty() && !self.stopping {
            self.posting = core::mem::take(&mut self.pending_post);
            self.phase = Phase::PostActing { retrying: true };
            return Action::PostAction {
                uids: self.posting.clone(),
            };
        }
        self.list()
    }

    /// The checkpoint the settled prefix of the catch-up allows.
    fn advance(&mut self) -> Checkpoint {
        Checkpoint {
            last_uid: self.catch_up.window.advance(),
            ..self.planned_cp()
        }
    }

    /// The checkpoint once the batch whose flush is in flight is committed: what listing and
    /// fetching the batches after it go from.
    fn planned_cp(&self) -> Checkpoint {
        match &self.behind {
            Some(batch) => batch.next,
            None => self.committed_cp(),
        }
    }

    fn committed_cp(&self) -> Checkpoint {
        self.cp.unwrap_or(Checkpoint {
            uidvalidity: 0,
            last_uid: 0,
            dedupe_through: 0,
        })
    }

    /// Lists from the committed checkpoint, in a first window if the backlog is long.
    fn list(&mut self) -> Action {
        self.window_size = self.spec.list_window.max(1);
        let above = self.planned_cp().last_uid;
        self.list_from(above)
    }

    /// After a window whose every message is settled and committed: the next window, from
    /// its upper bound (the UIDs between the last listed and that bound do not exist: each
    /// was assigned before the SELECT, and none was listed).
    fn list_next(&mut self) -> Action {
        match self.window_upto {
            Some(upto) => {
                let above = self.planned_cp().last_uid.max(upto);
                self.list_from(above)
            }
            None => self.list(),
        }
    }

    fn list_from(&mut self, above: u32) -> Action {
        if self.stopping {
            return self.logout(AfterLogout::Finish);
        }
        let cp = self.planned_cp();
        self.catch_up = CatchUp {
            window: AckWindow::new(cp.last_uid),
            ..CatchUp::default()
        };
        let window = self.window_from(above);
        self.window_upto = window.upto;
        self.phase = Phase::Listing;
        Action::List {
            above: window.above,
            upto: window.upto,
        }
    }

    /// The listing window that starts above `above`: bounded only while its bound is below
    /// the last UID the SELECT's UIDNEXT vouches for.
    fn window_from(&self, above: u32) -> ListWindow {
        self.window_of(above, self.window_size)
    }

    /// The window of `size` UIDs above `above`, bounded only below the last UID UIDNEXT
    /// vouches for.
    fn window_of(&self, above: u32, size: u32) -> ListWindow {
        let end = above.saturating_add(size.max(1));
        ListWindow {
            above,
            upto: (end < self.uidnext.saturating_sub(1)).then_some(end),
        }
    }

    /// The `List` that follows the batch being fetched, if it is the last of a bounded window.
    fn list_ahead(&self) -> Option<ListWindow> {
        if self.stopping || !self.catch_up.queue.is_empty() {
            return None;
        }
        self.window_upto.map(|upto| self.window_from(upto))
    }

    fn listed(&mut self, mut items: Vec<Listed>, news: bool) -> Action {
        let cp = self.planned_cp();
        // `UID FETCH n:*` may name the last message even below n (RFC 3501 §6.4.8).
        items.retain(|l| l.uid > cp.last_uid);
        if let Some(upto) = self.window_upto {
            // Nothing beyond the window asked for: the next window starts at its bound, and a
            // UID from beyond it (a server that ignores the range) delivered now would move
            // the checkpoint past messages no window has listed yet.
            items.retain(|l| l.uid <= upto);
        }
        items.sort_unstable_by_key(|l| l.uid);
        items.dedup_by_key(|l| l.uid);
        if core::mem::take(&mut self.uidnext_by_count)
            && let Some(last) = items.last()
        {
            // A listing without a SELECT before it that names exactly the messages announced
            // since the wait (`mailbox::news_fit`): their UIDs stand for the UIDNEXT no
            // SELECT reported.
            self.uidnext = self.uidnext.max(last.uid.saturating_add(1));
        }
        let beyond: Vec<u32> = items.iter().map(|l| l.uid).filter(|&u| u >= self.uidnext).collect();
        if !beyond.is_empty() {
            let unknown = beyond.iter().any(|u| !self.distrusted.contains(u));
            if unknown && !self.rechecked {
                // New mail since the SELECT, or a server naming UIDs that do not exist: a
                // fresh UIDNEXT tells which.
                self.rechecked = true;
                return self.select(SelectFor::RecheckUidNext);
            }
            if unknown {
                self.notices.push(Notice::UidsBeyondUidNext {
                    uids: beyond.clone(),
                    uidnext: self.uidnext,
                });
                self.distrusted.extend(beyond);
            }
            let uidnext = self.uidnext;
            items.retain(|l| l.uid < uidnext);
        }
        self.rechecked = false;
        if items.is_empty()
            && let Some(upto) = self.window_upto
        {
            // An empty window: UIDs are sparse here; look further at once.
            self.window_size = self.window_size.saturating_mul(2);
            return self.list_from(upto);
        }
        if !items.is_empty() {
            // Each window after one with messages in it twice as large, up to
            // [`LIST_WINDOW_GROWTH`] times the first: the first batch of every window waits for
            // its listing (the batches after it are read ahead), so a long backlog is listed
            // in few commands, while the first window stays small for a prompt first delivery.
            let first = self.spec.list_window.max(1);
            self.window_size = self
                .window_size
                .saturating_mul(2)
                .clamp(first, first.saturating_mul(LIST_WINDOW_GROWTH));
        }
        if items.is_empty() {
            if news {
                // Announced while we listed: list again rather than wait on it.
                return self.list();
            }
            let settled = mailbox::settle(cp);
            if settled != cp {
                self.phase = Phase::Committing {
                    next: settled,
                    then: AfterCommit::CaughtUp,
                };
                return Action::Commit {
                    checkpoint: settled,
                    log: Vec::new(),
                };
            }
            return self.caught_up();
        }
        self.catch_up.queue = items.into();
        self.next()
    }

    /// The next step of the catch-up: deliver the next message of the batch, settle what
    /// cannot be delivered, commit a finished batch, fetch the next one, or list again.
    fn next(&mut self) -> Action {
        loop {
            if let Some(&uid) = self.catch_up.batch.front() {
                if self.stopping {
                    return self.flush(AfterCommit::Stop);
                }
                match self.catch_up.fetched.get(&uid).copied() {
                    Some(info) if info.body && info.seen_before => {
                        self.catch_up.batch.pop_front();
                        self.notices.push(Notice::SkippedDuplicate { uid });
                        self.settle(uid, Status::Skipped, 0, String::new());
                        continue;
                    }
                    Some(info) if info.body => {
                        let attempt = info.prior_attempts.saturating_add(1);
                        self.phase = Phase::Delivering { uid, attempt };
                        return Action::Deliver { uid, attempt };
                    }
                    _ => {
                        self.phase = Phase::Checking { uid };
                        return Action::CheckExists { uid };
                    }
                }
            }
            if !self.catch_up.log.is_empty() {
                return self.flush(AfterCommit::Continue);
            }
            if self.stopping {
                return self.logout(AfterLogout::Finish);
            }
            let Some(front) = self.catch_up.queue.front().copied() else {
                // Everything listed is settled and committed: the next window, or list again.
                return self.list_next();
            };
            if let Some(reason) = self.give_up_reason(front) {
                self.catch_up.queue.pop_front();
                self.catch_up.window.track(front.uid);
                self.notices.push(Notice::DeadLettered {
                    uid: front.uid,
                    error: reason.clone(),
                });
                let attempts = self.fetch_failures.remove(&front.uid).map_or(0, |(n, _)| n);
                self.settle(front.uid, Status::Dead, attempts, reason);
                if self.spec.commit_each {
                    return self.flush(AfterCommit::Continue);
                }
                continue;
            }
            let (uids, spool) = self.take_batch();
            self.phase = Phase::Fetching { uids: uids.clone() };
            let cp = self.planned_cp();
            let check_seen = uids
                .iter()
                .copied()
                .filter(|&u| mailbox::needs_dedupe(&cp, u))
                .collect();
            return Action::Fetch {
                uids,
                check_seen,
                spool,
                ahead: self.batch_ahead(),
                list_ahead: self.list_ahead(),
            };
        }
    }

    /// Why a listed message is dead-lettered without a fetch, if it is.
    fn give_up_reason(&self, listed: Listed) -> Option<String> {
        if let Some(size) = listed.size
            && u64::from(size) > self.spec.max_message_size
        {
            return Some(format!(
                "the message is {size} bytes, above max_message_size ({} bytes)",
                self.spec.max_message_size
            ));
        }
        match self.fetch_failures.get(&listed.uid) {
            Some((n, error)) if *n >= self.spec.retry.max_attempts.max(1) => {
                Some(format!("the message could not be fetched in {n} attempts: {error}"))
            }
            _ => None,
        }
    }

    /// The next fetch batch from the queue: at most `batch_size` messages and `batch_bytes`
    /// bytes; a message of unknown size, above `spool_above`, or one that a failed batch fetch
    /// covered, alone and spooled (the `bool`).
    fn take_batch(&mut self) -> (Vec<u32>, bool) {
        let (len, spool) = self.plan_batch();
        let uids = self.catch_up.queue.drain(..len).map(|l| l.uid).collect();
        (uids, spool)
    }

    /// How many messages at the front of the queue make the next batch, and whether it is
    /// spooled; see [`Self::take_batch`].
    fn plan_batch(&self) -> (usize, bool) {
        let mut len = 0;
        let mut bytes = 0u64;
        for &next in &self.catch_up.queue {
            let alone = next.size.is_none_or(|s| u64::from(s) > self.spec.spool_above) || next.uid <= self.single_until;
            let size = u64::from(next.size.unwrap_or(0));
            if len > 0
                && (alone
                    || len >= self.spec.batch_size.max(1)
                    || bytes.saturating_add(size) > self.spec.batch_bytes
                    || self.give_up_reason(next).is_some())
            {
                break;
            }
            len += 1;
            bytes = bytes.saturating_add(size);
            if alone {
                return (len, true);
            }
        }
        (len, false)
    }

    /// The batch that [`Self::take_batch`] will take next if nothing changes, for the driver
    /// to read ahead; empty where there is none, or it would be spooled (read in pieces into a
    /// file when its turn comes), or its first message is given up without a fetch.
    fn batch_ahead(&self) -> Vec<u32> {
        if self.stopping {
            return Vec::new();
        }
        match self.catch_up.queue.front() {
            Some(&front) if self.give_up_reason(front).is_none() => {}
            _ => return Vec::new(),
        }
        match self.plan_batch() {
            (len, false) => self.catch_up.queue.iter().take(len).map(|l| l.uid).collect(),
            (_, true) => Vec::new(),
        }
    }

    fn settle(&mut self, uid: u32, status: Status, attempts: u32, error: String) {
        self.catch_up.window.ack(uid);
        self.catch_up.log.push(LogRow {
            uid,
            status,
            attempts,
            error,
        });
    }

    fn after_settle(&mut self) -> Action {
        if self.spec.commit_each {
            self.flush(AfterCommit::Continue)
        } else {
            self.next()
        }
    }

    /// The `attempts`-th attempt on `uid` failed (handler, or a body that did not come).
    fn failed_attempt(&mut self, uid: u32, attempts: u32, error: String) -> Action {
        match self.spec.retry.after_failure(attempts) {
            AfterFailure::DeadLetter => self.dead_letter(uid, attempts, error),
            AfterFailure::RetryAfter(delay) => self.retry_later(uid, attempts, error, delay),
        }
    }

    /// The target was busy on the `attempt`-th try of `uid`: the same message again after the
    /// back-off of this streak of busy answers (at least what the target asked for), and the
    /// attempt does not count.
    fn transient_failure(&mut self, uid: u32, attempt: u32, error: String, retry_after: Option<Duration>) -> Action {
        let streak = match self.busy {
            Some((u, n)) if u == uid => n.saturating_add(1),
            _ => 1,
        };
        self.busy = Some((uid, streak));
        let delay = self
            .spec
            .retry
            .backoff(streak)
            .max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
        self.retry_later(uid, attempt.saturating_sub(1), error, delay)
    }

    fn dead_letter(&mut self, uid: u32, attempts: u32, error: String) -> Action {
        self.notices.push(Notice::DeadLettered {
            uid,
            error: error.clone(),
        });
        self.settle(uid, Status::Dead, attempts, error);
        self.after_settle()
    }

    /// `uid` failed after `attempts` counted attempts: record it, then the same message again
    /// after `delay`. Later messages wait their turn: the rest of the batch is fetched again
    /// after the back-off. What is settled before this one is committed first.
    fn retry_later(&mut self, uid: u32, attempts: u32, error: String, delay: Duration) -> Action {
        self.notices.push(Notice::Failed {
            uid,
            attempts,
            error: error.clone(),
            retry_in: delay,
        });
        self.catch_up.batch.clear();
        self.catch_up.queue.clear();
        let row = LogRow {
            uid,
            status: Status::Failed,
            attempts,
            error,
        };
        self.flush(AfterCommit::Retry { row, delay })
    }

    fn flush(&mut self, then: AfterCommit) -> Action {
        if self.catch_up.log.is_empty() && self.catch_up.delivered.is_empty() {
            return self.after_commit(then);
        }
        if then == AfterCommit::Continue && self.flushes_behind() && self.more_to_fetch() {
            let batch = Behind {
                next: self.advance(),
                log: core::mem::take(&mut self.catch_up.log),
                delivered: core::mem::take(&mut self.catch_up.delivered),
            };
            self.phase = Phase::StartingFlush(batch);
            return Action::FlushBehind;
        }
        self.phase = Phase::Flushing(then);
        Action::Flush
    }

    /// Whether a batch that ends with more to come is flushed behind the next one.
    fn flushes_behind(&self) -> bool {
        self.spec.flush_behind && !self.spec.commit_each && !self.spec.post_action && !self.stopping
    }

    /// Whether more messages are listed, or a listing window follows: something to fetch
    /// while a batch is flushed. (The last batch of a catch-up, new mail's among them, is
    /// flushed and committed at once: nothing would overlap its flush.)
    fn more_to_fetch(&self) -> bool {
        !self.catch_up.queue.is_empty() || self.window_upto.is_some()
    }

    fn after_commit(&mut self, then: AfterCommit) -> Action {
        match then {
            AfterCommit::Continue => self.next(),
            AfterCommit::List => self.list_after_select(),
            AfterCommit::CaughtUp => self.caught_up(),
            AfterCommit::Retry { row, delay } => {
                self.phase = Phase::Recording { uid: row.uid, delay };
                Action::Record { log: alloc::vec![row] }
            }
            AfterCommit::Fail { class, error } => self.failed(class, error, self.now, self.jitter, None),
            AfterCommit::Stop => {
                if self.session_broken {
                    Action::Done(Ok(()))
                } else {
                    self.logout(AfterLogout::Finish)
                }
            }
        }
    }

    fn after_post_action(&mut self, retrying: bool) -> Action {
        if retrying {
            return self.list();
        }
        match self.after_post.take() {
            Some(then) => self.after_commit(then),
            None => self.next(),
        }
    }

    fn back_off(&mut self, uid: u32, delay: Duration) -> Action {
        self.state = State::RetryingMessage { uid, delay };
        if self.stopping {
            return self.logout(AfterLogout::Finish);
        }
        if delay <= KEEP_SESSION_FOR {
            self.phase = Phase::Sleeping { reconnect: false };
            Action::Sleep {
                delay,
                keep_session: true,
            }
        } else {
            self.logout(AfterLogout::Sleep { delay })
        }
    }

    fn caught_up(&mut self) -> Action {
        if self.behind.is_some() {
            // Not caught up until the batch being flushed is committed: that first, then a
            // listing again (the windows after it were empty).
            self.phase = Phase::AwaitingFlush;
            return Action::AwaitFlush;
        }
        let cp = self.committed_cp();
        self.notices.push(Notice::CaughtUp { last_uid: cp.last_uid });
        if self.spec.once || self.stopping {
            return self.logout(AfterLogout::Finish);
        }
        self.run_jobs(true)
    }

    fn run_jobs(&mut self, then_wait: bool) -> Action {
        self.run_jobs_then(then_wait, false)
    }

    fn run_jobs_then(&mut self, then_wait: bool, news_only: bool) -> Action {
        if self.stopping {
            return self.logout(AfterLogout::Finish);
        }
        self.phase = Phase::RunningJobs { then_wait, news_only };
        Action::RunJobs
    }

    /// The wake path after new mail alone: the listing (and the first bodies) without a
    /// SELECT, where the wake would list exactly that after one (nothing to retry first, no
    /// stop, a known checkpoint); else the SELECT as after any wake.
    fn list_news(&mut self) -> Action {
        // Open-ended only: a bounded window would not name every announced message.
        let Some(list) = self.list_after_resync(SelectFor::Resync).filter(|w| w.upto.is_none()) else {
            return self.select(SelectFor::Resync);
        };
        self.phase = Phase::ListingNews;
        Action::ListNews {
            list,
            bodies_ahead: self.bodies_ahead(list),
        }
    }

    fn wait(&mut self, now: Duration) -> Action {
        if self.stopping {
            return self.logout(AfterLogout::Finish);
        }
        let connected_for = now.saturating_sub(self.connected_at.unwrap_or(now));
        let token_left = self.token_due.map(|due| due.saturating_sub(now));
        let wait = match next_wait(&self.spec.wait, self.idle, connected_for, token_left) {
            Wait::Recycle if connected_for < RECYCLE_FLOOR => {
                let rest = RECYCLE_FLOOR - connected_for;
                if self.idle { Wait::Idle(rest) } else { Wait::Poll(rest) }
            }
            other => other,
        };
        if self.spec.wait.notify && !self.notifier_off && self.idle && !self.spec.once {
            // The account's notifier watches the folder: no session of its own meanwhile.
            return self.logout(AfterLogout::AwaitNotice(self.spec.wait.idle_refresh));
        }
        match wait {
            Wait::Recycle => {
                self.notices.push(Notice::Disconnected {
                    error: None,
                    class: None,
                    retry_in: None,
                });
                self.logout(AfterLogout::Reconnect)
            }
            Wait::Idle(d) => {
                self.idle_since = Some(now);
                self.state = State::Idle;
                self.phase = Phase::Waiting { poll: false };
                Action::Idle(d)
            }
            Wait::Poll(d) => {
                self.state = State::Polling;
                self.phase = Phase::Waiting { poll: true };
                Action::Poll(d)
            }
        }
    }

    fn logout(&mut self, then: AfterLogout) -> Action {
        if self.session_broken || self.connected_at.is_none() && matches!(then, AfterLogout::Finish) {
            // Nothing to log out of (the driver drops whatever is left).
            if then == AfterLogout::Finish {
                return Action::Done(Ok(()));
            }
        }
        self.phase = Phase::LoggingOut(then);
        Action::Logout
    }

    /// The session failed; `idled_for` is how long it had been in IDLE when it did (if it was).
    fn failed(
        &mut self,
        class: FailureClass,
        error: String,
        now: Duration,
        jitter: f64,
        idled_for: Option<Duration>,
    ) -> Action {
        self.catch_up = CatchUp::default();
        self.connected_at = None;
        self.session_broken = false;
        // Told as a disconnect: the next session is told as a connect.
        self.noticed = false;
        if self.spec.once {
            return Action::Done(Err(error));
        }
        if self.stopping {
            return Action::Done(Ok(()));
        }
        let delay = match idled_for {
            Some(idled_for) => self.reconnect.dropped_in_idle(now, idled_for, class, jitter),
            None => self.reconnect.failed(now, class, jitter),
        };
        self.notices.push(Notice::Disconnected {
            error: Some(error),
            class: Some(class),
            retry_in: Some(delay),
        });
        self.state = State::WaitingToReconnect { delay };
        if class == FailureClass::AuthExpired {
            self.phase = Phase::InvalidatingToken { delay };
            return Action::InvalidateToken;
        }
        self.sleep_disconnected(delay)
    }

    /// A fetch failed as a whole (a deadline, a response the IMAP layer refused, a dropped
    /// connection). A batch is fetched again one message at a time; a message fetched alone
    /// that fails counts toward giving up on it, so one message the server cannot send never
    /// blocks the folder for good.
    fn fetch_failed(&mut self, uids: &[u32], error: &str) {
        match uids {
            [] => {}
            [uid] => {
                let entry = self.fetch_failures.entry(*uid).or_insert((0, String::new()));
                entry.0 = entry.0.saturating_add(1);
                entry.1 = String::from(error);
            }
            [.., last] => self.single_until = self.single_until.max(*last),
        }
    }

    fn sleep_disconnected(&mut self, delay: Duration) -> Action {
        self.phase = Phase::Sleeping { reconnect: true };
        Action::Sleep {
            delay,
            keep_session: false,
        }
    }

    fn interrupted(&mut self, phase: Phase) -> Action {
        match phase {
            // Nothing in flight that needs finishing.
            Phase::Start
            | Phase::Connecting
            | Phase::Sleeping { reconnect: true }
            | Phase::InvalidatingToken { .. } => Action::Done(Ok(())),
            // A command was abandoned mid-way: the session is unusable, but what was settled
            // is committed before the watch ends.
            _ => {
                self.session_broken = true;
                self.catch_up.batch.clear();
                self.flush(AfterCommit::Stop)
            }
        }
    }
}
