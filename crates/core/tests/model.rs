//! Model-based test of the watch machine: the real `WatchMachine` is driven against an
//! in-memory folder, store and handler. Random sequences of appends, expunges, handler
//! failures, bodies the server does not return, failing fetches and commits, UIDVALIDITY
//! resets, crashes after any number of actions, and stops are run, and after every run:
//!
//! - nothing is skipped: every message that stayed in the folder was delivered, dead-lettered
//!   or skipped as a duplicate of a delivered one;
//! - the checkpoint never passes an unsettled UID, and never moves backwards in an epoch;
//! - nothing is repeated after it was committed: a message is delivered again only if a crash,
//!   a failed commit or a stop came between its delivery and its commit;
//! - with the batching (Maildir-like) handler, a durable copy exists for each delivery, and
//!   none is committed before its flush finished, also when batches are flushed behind the
//!   next (`flush_behind`: at most one flush in flight, no other flush or post-action meanwhile).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use inboxd_core::checkpoint::Checkpoint;
use inboxd_core::failure::{FailureClass, Reconnect};
use inboxd_core::machine::{
    Action, BodiesAhead, FetchedInfo, HandlerFailure, Input, ListWindow, Listed, LogRow, Notice, Status, Wake,
    WatchMachine, WatchSpec,
};
use inboxd_core::mailbox::{StartPolicy, UidValidityPolicy};
use inboxd_core::retry::RetryPolicy;
use inboxd_core::schedule::Schedule;
use inboxd_core::wait::WaitPolicy;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Appends messages; with `Some(k)` the last one's body is missing from the next `k`
    /// body fetches.
    Append(u8, Option<u32>),
    /// The watcher wakes (IDLE reported activity) and catches up.
    Wake,
    Expunge(prop::sample::Index),
    /// The handler fails the next `n` attempts.
    HandlerFails(u32),
    /// The target is busy for the next `n` attempts (HTTP 503: not counted).
    TargetBusy(u32),
    /// The next fetch fails (connection dropped).
    FetchFails,
    /// The next commit fails (disk full).
    CommitFails,
    /// The next flush fails (the handler's disk is full): its batch counts for nothing.
    FlushFails,
    /// The folder is recreated with a new UIDVALIDITY; `keep_old` copies its messages back.
    UidValidityReset {
        keep_old: bool,
    },
    /// The process dies after this many actions (before or after any of them).
    Crash(u8),
    /// A stop is requested after this many actions.
    Stop(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..5, prop::option::weighted(0.2, 1u32..5)).prop_map(|(n, k)| Op::Append(n, k)),
        4 => Just(Op::Wake),
        1 => any::<prop::sample::Index>().prop_map(Op::Expunge),
        1 => (1u32..5).prop_map(Op::HandlerFails),
        1 => (1u32..8).prop_map(Op::TargetBusy),
        1 => Just(Op::FetchFails),
        1 => Just(Op::CommitFails),
        1 => Just(Op::FlushFails),
        1 => any::<bool>().prop_map(|keep_old| Op::UidValidityReset { keep_old }),
        2 => (0u8..30).prop_map(Op::Crash),
        1 => (0u8..30).prop_map(Op::Stop),
    ]
}

const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(8),
    max_attempts: 3,
};

fn spec(batch_size: usize, commit_each: bool, post_action: bool, flush_behind: bool) -> WatchSpec {
    WatchSpec {
        start: StartPolicy::All,
        on_uidvalidity_change: UidValidityPolicy::Dedupe,
        retry: RETRY,
        wait: WaitPolicy::default(),
        batch_size,
        batch_bytes: 10_000,
        max_message_size: 1_000_000,
        spool_above: 1_000,
        commit_each,
        post_action,
        once: false,
        list_window: 1_000,
        flush_behind,
    }
}

/// The size the model's server reports: every fifth message is large.
fn size_of(uid: u32) -> u32 {
    if uid.is_multiple_of(5) { 5_000 } else { 100 }
}

#[derive(Default)]
struct World {
    // The server.
    uidvalidity: u32,
    uidnext: u32,
    folder: BTreeMap<u32, u64>, // uid -> message id
    next_mid: u64,
    no_body: HashMap<u64, u32>,
    fetch_fails: bool,
    // The store.
    stored: Option<Checkpoint>,
    /// Settled rows by message id (delivered, dead, skipped), and failed attempts by
    /// (uidvalidity, uid).
    settled: HashMap<u64, Status>,
    attempts: HashMap<(u32, u32), u32>,
    commit_fails: bool,
    // The handler.
    handler_failures: u32,
    target_busy: u32,
    /// Deliveries the handler acknowledged, per message id.
    deliveries: HashMap<u64, u32>,
    /// Not yet flushed (batching handler): lost in a crash.
    unflushed: Vec<u64>,
    /// In a flush running behind the catch-up, not yet awaited: lost in a crash.
    flushing: Vec<u64>,
    flush_fails: bool,
    durable: HashSet<u64>,
    // Observations.
    /// Messages whose delivery may be repeated: delivered but not committed when a crash, a
    /// failed commit or a stop came.
    may_repeat: HashSet<u64>,
    /// Delivered since the last commit.
    uncommitted: Vec<u64>,
    /// The UIDVALIDITY the machine's session selected.
    session_uidvalidity: u32,
    /// Ever appended and not expunged before being settled.
    must_arrive: HashSet<u64>,
    /// Since the machine last waited: messages were appended, and something besides appends
    /// happened (an expunge, a new UIDVALIDITY). A wake after appends alone is
    /// `Wake::NewMail`, and its listing without a SELECT fits.
    appended: bool,
    changed: bool,
    now: Duration,
}

impl World {
    /// The handler makes `batch` durable, or fails to (then nothing uncommitted counts).
    fn flush(&mut self, batch: Vec<u64>) -> Input {
        if std::mem::take(&mut self.flush_fails) {
            self.may_repeat.extend(self.uncommitted.drain(..));
            return Input::Failed {
                class: FailureClass::Network,
                error: "no space left on device".into(),
            };
        }
        self.durable.extend(batch);
        Input::Flushed
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Append(n, no_body) => {
                for _ in 0..n {
                    self.next_mid += 1;
                    self.folder.insert(self.uidnext, self.next_mid);
                    self.must_arrive.insert(self.next_mid);
                    self.uidnext += 1;
                }
                if let Some(k) = no_body {
                    self.no_body.insert(self.next_mid, k);
                }
                self.appended = true;
            }
            Op::Expunge(i) => {
                if !self.folder.is_empty() {
                    let uid = *self.folder.keys().nth(i.index(self.folder.len())).unwrap();
                    let mid = self.folder.remove(&uid).unwrap();
                    self.changed = true;
                    if !self.deliveries.contains_key(&mid) && !self.settled.contains_key(&mid) {
                        self.must_arrive.remove(&mid);
                    }
                }
            }
            Op::HandlerFails(n) => self.handler_failures = n,
            Op::TargetBusy(n) => self.target_busy = n,
            Op::FetchFails => self.fetch_fails = true,
            Op::CommitFails => self.commit_fails = true,
            Op::FlushFails => self.flush_fails = true,
            Op::UidValidityReset { keep_old } => {
                let old: Vec<u64> = self.folder.values().copied().collect();
                self.changed = true;
                self.uidvalidity += 1;
                self.folder.clear();
                self.uidnext = 1;
                for mid in old {
                    if keep_old {
                        self.folder.insert(self.uidnext, mid);
                        self.uidnext += 1;
                    } else if !self.deliveries.contains_key(&mid) && !self.settled.contains_key(&mid) {
                        self.must_arrive.remove(&mid);
                    }
                }
            }
            Op::Wake | Op::Crash(_) | Op::Stop(_) => {}
        }
    }

    fn mid_of(&self, uidvalidity: u32, uid: u32) -> Option<u64> {
        (uidvalidity == self.uidvalidity)
            .then(|| self.folder.get(&uid).copied())
            .flatten()
    }

    fn commit(&mut self, checkpoint: Checkpoint, log: &[LogRow]) -> Result<(), TestCaseError> {
        if let Some(old) = self.stored
            && old.uidvalidity == checkpoint.uidvalidity
        {
            prop_assert!(checkpoint.last_uid >= old.last_uid, "checkpoint moved backwards");
        }
        for row in log {
            if let Some(mid) = self.mid_of(checkpoint.uidvalidity, row.uid) {
                prop_assert!(
                    row.status != Status::Delivered || self.durable.contains(&mid),
                    "uid {} (message {mid}) committed as delivered before its flush finished",
                    row.uid
                );
                self.uncommitted.retain(|&m| m != mid);
                match row.status {
                    Status::Vanished => prop_assert!(false, "uid {} recorded as vanished but present", row.uid),
                    Status::Failed => {}
                    s => {
                        self.settled.insert(mid, s);
                    }
                }
            }
        }
        if checkpoint.uidvalidity == self.uidvalidity {
            let before = self
                .stored
                .filter(|c| c.uidvalidity == checkpoint.uidvalidity)
                .map_or(0, |c| c.last_uid);
            for (&uid, mid) in self
                .folder
                .range(before + 1..checkpoint.last_uid.saturating_add(1).max(before + 1))
            {
                prop_assert!(
                    self.settled.contains_key(mid),
                    "checkpoint {} passes uid {uid} (message {mid}), which was never settled",
                    checkpoint.last_uid
                );
            }
        }
        self.stored = Some(checkpoint);
        Ok(())
    }
}

fn new_machine(s: &WatchSpec) -> WatchMachine {
    WatchMachine::new(
        s.clone(),
        Reconnect::new(Schedule::default(), Duration::from_secs(300), Duration::from_secs(3600)),
    )
}

fn start(_: &World) -> Input {
    Input::Start
}

/// With `flush_behind`, the watch has no post-action (which keeps every batch's flush in place).
fn check_world(ops: Vec<Op>, batch: usize, commit_each: bool, flush_behind: bool) -> Result<(), TestCaseError> {
    let mut s = spec(batch, commit_each, !flush_behind, flush_behind);
    // Small listing windows, so that every run lists a backlog in several.
    s.list_window = 4;
    let mut w = World {
        uidvalidity: 1,
        uidnext: 1,
        ..World::default()
    };
    let mut m = new_machine(&s);
    let mut started = false;
    for op in &ops {
        w.apply(op);
        let (limit, stop) = match op {
            Op::Wake => (None, None),
            Op::Crash(n) => (Some(*n as usize), None),
            Op::Stop(n) => (None, Some(*n as usize)),
            // Server changes and faults wait for the next wake.
            _ => continue,
        };
        let first = if started {
            // A wake of the running machine: on new mail alone if only appends came.
            let wake = if w.appended && !w.changed {
                Wake::NewMail
            } else {
                Wake::Activity
            };
            Input::WaitEnded { wake, token_left: None }
        } else {
            m = new_machine(&s);
            start(&w)
        };
        started = drive(&mut w, &mut m, first, commit_each, limit, stop)?;
    }
    // Quiet at last: a clean run catches everything up.
    w.handler_failures = 0;
    w.target_busy = 0;
    w.no_body.clear();
    w.fetch_fails = false;
    w.commit_fails = false;
    w.flush_fails = false;
    let mut m = new_machine(&s);
    let first = start(&w);
    prop_assert!(
        drive(&mut w, &mut m, first, commit_each, None, None)?,
        "the final run did not catch up"
    );
    let present: HashSet<u64> = w.folder.values().copied().collect();
    for mid in &w.must_arrive {
        if present.contains(mid) {
            prop_assert!(
                w.settled.contains_key(mid),
                "message {mid} is in the folder but was never delivered, dead-lettered or deduplicated (folder {:?})",
                w.folder
            );
        } else {
            // Gone from the folder after it was handed over at least once.
            prop_assert!(
                w.settled.contains_key(mid) || w.deliveries.contains_key(mid),
                "message {mid} was lost"
            );
        }
    }
    for (mid, n) in &w.deliveries {
        prop_assert!(
            *n == 1 || w.may_repeat.contains(mid),
            "message {mid} delivered {n} times"
        );
        if w.settled.get(mid) == Some(&Status::Delivered) {
            prop_assert!(
                w.durable.contains(mid),
                "message {mid} committed as delivered but not durable"
            );
        }
    }
    Ok(())
}

/// Drives `m` from `first` until it waits (caught up: true) or finishes (false). With
/// `limit`, the process dies after that many actions (false); with `stop_after`, a stop is
/// requested after that many.
fn drive(
    w: &mut World,
    m: &mut WatchMachine,
    first: Input,
    commit_each: bool,
    limit: Option<usize>,
    stop_after: Option<usize>,
) -> Result<bool, TestCaseError> {
    let mut input = first;
    // The read-ahead of the last fetch, while nothing happened that may change the plan: the
    // next fetch must name exactly it.
    let mut ahead: Option<Vec<u32>> = None;
    // Likewise the listing read ahead with the last batch of a window: the next List names it.
    let mut list_ahead: Option<ListWindow> = None;
    for steps in 0..5_000usize {
        if stop_after == Some(steps) {
            m.stop();
        }
        if matches!(input, Input::Failed { .. } | Input::HandlerFailed { .. }) {
            ahead = None;
            list_ahead = None;
        }
        let action = m.on(input, w.now, 0.5);
        for notice in m.take_notices() {
            if let Notice::CaughtUp { last_uid } = notice {
                // Caught up means committed: a batch whose flush is in flight does not count.
                prop_assert!(
                    m.checkpoint().is_some_and(|c| c.last_uid >= last_uid),
                    "caught up to {last_uid} with the checkpoint at {:?}",
                    m.checkpoint()
                );
            }
        }
        match &action {
            Action::Fetch {
                uids,
                ahead: next,
                list_ahead: next_list,
                ..
            } => {
                if let Some(expected) = ahead.take().filter(|a| !a.is_empty()) {
                    prop_assert_eq!(uids, &expected, "the fetch after a read-ahead names other messages");
                }
                list_ahead = None;
                if !m.stopping() {
                    ahead = Some(next.clone());
                    list_ahead = *next_list;
                }
            }
            Action::ListNews { list, bodies_ahead } => {
                prop_assert!(
                    list.upto.is_none() && bodies_ahead.from == list.above + 1,
                    "a listing without a SELECT {list:?} with bodies {bodies_ahead:?}"
                );
                // Kept for the `List` that follows if it fits.
                ahead = None;
                list_ahead = Some(*list);
            }
            Action::List { above, upto } => {
                if let Some(expected) = list_ahead.take() {
                    prop_assert_eq!(
                        ListWindow {
                            above: *above,
                            upto: *upto
                        },
                        expected,
                        "the listing after a listing read ahead names another window"
                    );
                }
                ahead = None;
            }
            Action::Deliver { .. }
            | Action::Flush
            | Action::FlushBehind
            | Action::AwaitFlush
            | Action::Commit { .. }
            | Action::Record { .. }
            | Action::PostAction { .. }
            | Action::CheckExists { .. } => {}
            _ => {
                ahead = None;
                list_ahead = None;
            }
        }
        if m.stopping() {
            ahead = None;
            list_ahead = None;
        }
        if matches!(action, Action::Flush | Action::FlushBehind | Action::PostAction { .. }) {
            prop_assert!(
                w.flushing.is_empty(),
                "{action:?} while a flush runs behind the catch-up"
            );
        }
        if limit.is_some_and(|l| steps >= l) {
            // The process dies: nothing unflushed survives, nothing uncommitted counts.
            w.unflushed.clear();
            w.flushing.clear();
            w.may_repeat.extend(w.uncommitted.drain(..));
            return Ok(false);
        }
        input = match action {
            Action::Idle(_) | Action::Poll(_) | Action::AwaitNotice(_) => {
                (w.appended, w.changed) = (false, false);
                return Ok(true);
            }
            Action::Done(_) => {
                w.unflushed.clear();
                w.flushing.clear();
                w.may_repeat.extend(w.uncommitted.drain(..));
                return Ok(false);
            }
            other => answer(w, other, commit_each)?,
        };
    }
    prop_assert!(false, "no progress in 5000 actions");
    Ok(false)
}

/// The world's answer to one action.
fn answer(w: &mut World, action: Action, commit_each: bool) -> Result<Input, TestCaseError> {
    let current = w.session_uidvalidity;
    Ok(match action {
        Action::Select {
            list_ahead,
            bodies_ahead,
        } => {
            // Bodies are read ahead only with the listing, from the first UID it asks for, a
            // bounded few, each bounded.
            if let Some(b) = bodies_ahead {
                prop_assert!(
                    list_ahead.is_some_and(|l| l.above + 1 == b.from)
                        && b.from <= b.to
                        && b.to - b.from < inboxd_core::machine::WAKE_BODIES
                        && b.max_bytes <= inboxd_core::machine::WAKE_BODY_BYTES,
                    "bodies read ahead {b:?} with the listing {list_ahead:?}"
                );
            }
            w.session_uidvalidity = w.uidvalidity;
            Input::Selected(inboxd_core::mailbox::Selected {
                uidvalidity: w.uidvalidity,
                uidnext: w.uidnext,
            })
        }
        Action::ListNews { list, .. } => {
            // What a session that selected the folder at `current` sees: if the folder is
            // still that incarnation, its messages numbered in UID order; the count at the
            // start of the wait is the messages up to the checkpoint (caught up), and any
            // expunge or new UIDVALIDITY since is said.
            let same = current == w.uidvalidity;
            let listed: Vec<(u32, u32)> = if same {
                w.folder
                    .keys()
                    .zip(1u32..)
                    .filter(|&(&u, _)| u > list.above)
                    .map(|(&u, n)| (u, n))
                    .collect()
            } else {
                Vec::new()
            };
            let count = if same { w.folder.len() as u32 } else { 0 };
            let base = if same {
                w.folder.keys().filter(|&&u| u <= list.above).count() as u32
            } else {
                0
            };
            Input::NewsListed(inboxd_core::mailbox::NewsSeen {
                base,
                announced: count,
                count,
                listed,
                listing_ok: true,
                other_news: w.changed,
            })
        }
        Action::Connect => Input::Connected {
            idle: true,
            token_left: None,
        },
        Action::Load => Input::Loaded {
            stored: w.stored,
            pending_post_actions: Vec::new(),
        },
        Action::List { above, upto } => {
            let mut items: Vec<Listed> = w
                .folder
                .keys()
                .filter(|&&u| u > above && upto.is_none_or(|t| u <= t))
                .map(|&uid| Listed {
                    uid,
                    size: Some(size_of(uid)),
                })
                .collect();
            // `n:*` names the last message even below n (RFC 3501); a bounded range does not.
            if let (Some(&max), None) = (w.folder.keys().last(), upto) {
                items.push(Listed {
                    uid: max,
                    size: Some(size_of(max)),
                });
            }
            Input::Listed { items, news: false }
        }
        Action::Fetch {
            uids,
            check_seen,
            spool,
            ahead,
            list_ahead,
        } => {
            prop_assert!(
                list_ahead.is_none() || ahead.is_empty(),
                "a batch and a listing both read ahead: {ahead:?}, {list_ahead:?}"
            );
            // A message above spool_above (every fifth here) goes alone, into a spool file.
            assert!(!spool || uids.len() == 1, "a spooled fetch of {uids:?}");
            // The read-ahead is the batch after this one: above it, ascending, never a message
            // that would be spooled.
            prop_assert!(
                ahead.windows(2).all(|p| p[0] < p[1]) && ahead.iter().all(|a| uids.iter().all(|u| a > u)),
                "read-ahead {ahead:?} is not the batch after {uids:?}"
            );
            prop_assert!(
                ahead.iter().all(|&u| u64::from(size_of(u)) <= 1_000),
                "a message above spool_above read ahead: {ahead:?}"
            );
            assert!(
                spool || uids.iter().all(|&u| u64::from(size_of(u)) <= 1_000),
                "a message above spool_above fetched in a batch: {uids:?}"
            );
            if std::mem::take(&mut w.fetch_fails) {
                return Ok(Input::Failed {
                    class: FailureClass::Network,
                    error: "connection reset".into(),
                });
            }
            let mut infos = Vec::new();
            for uid in uids {
                let Some(mid) = w.mid_of(current, uid) else { continue };
                let body = match w.no_body.get_mut(&mid) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        false
                    }
                    _ => true,
                };
                infos.push(FetchedInfo {
                    uid,
                    body,
                    prior_attempts: w.attempts.get(&(current, uid)).copied().unwrap_or(0),
                    seen_before: check_seen.contains(&uid) && w.settled.contains_key(&mid),
                });
            }
            Input::Fetched(infos)
        }
        Action::CheckExists { uid } => Input::Exists {
            uid,
            exists: w.mid_of(current, uid).is_some(),
        },
        Action::Deliver { uid, attempt } => {
            let mid = w.mid_of(current, uid).expect("delivering a message the folder has");
            prop_assert_eq!(attempt, w.attempts.get(&(current, uid)).copied().unwrap_or(0) + 1);
            if w.target_busy > 0 {
                w.target_busy -= 1;
                Input::HandlerFailed {
                    uid,
                    error: "503 Service Unavailable".into(),
                    kind: HandlerFailure::Transient {
                        retry_after: w.target_busy.is_multiple_of(2).then_some(Duration::from_secs(3)),
                    },
                }
            } else if w.handler_failures > 0 {
                w.handler_failures -= 1;
                Input::HandlerFailed {
                    uid,
                    error: "told to fail".into(),
                    kind: HandlerFailure::Attempt,
                }
            } else {
                prop_assert!(
                    w.settled.get(&mid) != Some(&Status::Delivered) || w.may_repeat.contains(&mid),
                    "message {mid} delivered again after its delivery was committed"
                );
                *w.deliveries.entry(mid).or_default() += 1;
                w.uncommitted.push(mid);
                if commit_each {
                    w.durable.insert(mid);
                } else {
                    w.unflushed.push(mid);
                }
                Input::Delivered { uid }
            }
        }
        Action::Flush => {
            let batch = std::mem::take(&mut w.unflushed);
            w.flush(batch)
        }
        Action::FlushBehind => {
            w.flushing = std::mem::take(&mut w.unflushed);
            Input::FlushStarted
        }
        Action::AwaitFlush => {
            let batch = std::mem::take(&mut w.flushing);
            w.flush(batch)
        }
        Action::Commit { checkpoint, log } => {
            if std::mem::take(&mut w.commit_fails) {
                w.may_repeat.extend(w.uncommitted.drain(..));
                Input::Failed {
                    class: FailureClass::Network,
                    error: "database or disk is full".into(),
                }
            } else {
                w.commit(checkpoint, &log)?;
                Input::Committed
            }
        }
        Action::Record { log } => {
            for row in log {
                w.attempts.insert((current, row.uid), row.attempts);
            }
            Input::Recorded
        }
        Action::PostAction { .. } => Input::PostActionDone,
        Action::RunJobs => Input::JobsRan { ran: false },
        Action::Probe => Input::Probed,
        Action::Sleep { delay, .. } => {
            w.now += delay;
            Input::Slept
        }
        Action::InvalidateToken => Input::TokenInvalidated,
        Action::Logout => Input::LoggedOut,
        Action::Idle(_) | Action::Poll(_) | Action::AwaitNotice(_) | Action::Done(_) => unreachable!(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn per_message_commits_lose_nothing_and_repeat_nothing(ops in prop::collection::vec(op(), 1..50)) {
        check_world(ops, 3, true, false)?;
    }

    #[test]
    fn per_batch_commits_lose_nothing_and_repeat_nothing(ops in prop::collection::vec(op(), 1..50), batch in 1usize..6) {
        check_world(ops, batch, false, false)?;
    }

    #[test]
    fn batches_flushed_behind_the_next_lose_nothing_and_repeat_nothing(ops in prop::collection::vec(op(), 1..50), batch in 1usize..6) {
        check_world(ops, batch, false, true)?;
    }
}

// Data-driven sequences: these inputs give these actions.

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn cp(uidvalidity: u32, last_uid: u32) -> Checkpoint {
    Checkpoint {
        uidvalidity,
        last_uid,
        dedupe_through: 0,
    }
}

fn started(spec: WatchSpec, stored: Option<Checkpoint>) -> WatchMachine {
    let mut m = new_machine(&spec);
    assert_eq!(m.on(Input::Start, s(0), 0.0), Action::Connect);
    assert_eq!(
        m.on(
            Input::Connected {
                idle: true,
                token_left: None
            },
            s(0),
            0.0
        ),
        Action::Load
    );
    assert_eq!(
        m.on(
            Input::Loaded {
                stored,
                pending_post_actions: vec![]
            },
            s(0),
            0.0
        ),
        Action::Select {
            list_ahead: None,
            bodies_ahead: None
        }
    );
    m
}

fn listed(uids: &[u32]) -> Input {
    Input::Listed {
        items: uids.iter().map(|&uid| Listed { uid, size: Some(10) }).collect(),
        news: false,
    }
}

fn fetched(uids: &[u32]) -> Input {
    Input::Fetched(
        uids.iter()
            .map(|&uid| FetchedInfo {
                uid,
                body: true,
                prior_attempts: 0,
                seen_before: false,
            })
            .collect(),
    )
}

#[test]
fn a_listed_uid_without_a_body_is_checked_then_retried_never_passed_over() {
    let mut m = started(spec(10, false, false, false), Some(cp(7, 10)));
    assert_eq!(
        m.on(
            Input::Selected(inboxd_core::mailbox::Selected {
                uidvalidity: 7,
                uidnext: 14
            }),
            s(0),
            0.0
        ),
        Action::List { above: 10, upto: None }
    );
    assert_eq!(
        m.on(listed(&[11, 12, 13]), s(0), 0.0),
        Action::Fetch {
            uids: vec![11, 12, 13],
            check_seen: vec![],
            spool: false,
            ahead: vec![],
            list_ahead: None,
        }
    );
    // 12 came back without a body.
    assert_eq!(
        m.on(fetched(&[11, 13]), s(0), 0.0),
        Action::Deliver { uid: 11, attempt: 1 }
    );
    assert_eq!(
        m.on(Input::Delivered { uid: 11 }, s(0), 0.0),
        Action::CheckExists { uid: 12 }
    );
    // Still there: a failed attempt; the prefix (11) is committed, 13 waits its turn.
    assert_eq!(m.on(Input::Exists { uid: 12, exists: true }, s(0), 0.0), Action::Flush);
    let Action::Commit { checkpoint, log } = m.on(Input::Flushed, s(0), 0.0) else {
        panic!()
    };
    assert_eq!(checkpoint.last_uid, 11);
    assert_eq!(log.len(), 1);
    let Action::Record { log } = m.on(Input::Committed, s(0), 0.0) else {
        panic!()
    };
    assert_eq!((log[0].uid, log[0].status, log[0].attempts), (12, Status::Failed, 1));
    assert_eq!(
        m.on(Input::Recorded, s(0), 0.0),
        Action::Sleep {
            delay: s(1),
            keep_session: true
        }
    );
    assert_eq!(m.on(Input::Slept, s(1), 0.0), Action::List { above: 11, upto: None });
}

#[test]
fn a_uid_expunged_before_its_fetch_is_recorded_as_vanished() {
    let mut m = started(spec(10, false, false, false), Some(cp(7, 10)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 13,
        }),
        s(0),
        0.0,
    );
    m.on(listed(&[11, 12]), s(0), 0.0);
    assert_eq!(m.on(fetched(&[12]), s(0), 0.0), Action::CheckExists { uid: 11 });
    assert_eq!(
        m.on(Input::Exists { uid: 11, exists: false }, s(0), 0.0),
        Action::Deliver { uid: 12, attempt: 1 }
    );
    assert_eq!(m.on(Input::Delivered { uid: 12 }, s(0), 0.0), Action::Flush);
    let Action::Commit { checkpoint, log } = m.on(Input::Flushed, s(0), 0.0) else {
        panic!()
    };
    assert_eq!(checkpoint.last_uid, 12);
    assert_eq!(
        log.iter().map(|r| (r.uid, r.status)).collect::<Vec<_>>(),
        vec![(11, Status::Vanished), (12, Status::Delivered)]
    );
}

#[test]
fn uids_beyond_uidnext_are_checked_with_a_fresh_select_then_ignored() {
    let mut m = started(spec(10, false, false, false), Some(cp(7, 3)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 4,
        }),
        s(0),
        0.0,
    );
    // The listing names 4000000000 while UIDNEXT is 4: select again before believing it.
    assert_eq!(
        m.on(listed(&[4_000_000_000]), s(0), 0.0),
        Action::Select {
            list_ahead: None,
            bodies_ahead: None
        }
    );
    assert_eq!(
        m.on(
            Input::Selected(inboxd_core::mailbox::Selected {
                uidvalidity: 7,
                uidnext: 4
            }),
            s(0),
            0.0
        ),
        Action::List { above: 3, upto: None }
    );
    // Still beyond: ignored, and the folder counts as caught up at 3.
    assert_eq!(m.on(listed(&[4_000_000_000]), s(0), 0.0), Action::RunJobs);
    assert!(
        m.take_notices()
            .iter()
            .any(|n| matches!(n, inboxd_core::machine::Notice::UidsBeyondUidNext { uidnext: 4, .. }))
    );
    assert_eq!(m.checkpoint().map(|c| c.last_uid), Some(3));
    // New mail that the fresh UIDNEXT covers is delivered as usual.
    assert_eq!(m.on(Input::JobsRan { ran: false }, s(0), 0.0), Action::Idle(s(600)));
    m.on(
        Input::WaitEnded {
            wake: Wake::Activity,
            token_left: None,
        },
        s(1),
        0.0,
    );
    m.on(Input::JobsRan { ran: false }, s(1), 0.0);
    assert_eq!(
        m.on(
            Input::Selected(inboxd_core::mailbox::Selected {
                uidvalidity: 7,
                uidnext: 5
            }),
            s(1),
            0.0
        ),
        Action::List { above: 3, upto: None }
    );
    assert_eq!(
        m.on(listed(&[4, 4_000_000_000]), s(1), 0.0),
        Action::Fetch {
            uids: vec![4],
            check_seen: vec![],
            spool: false,
            ahead: vec![],
            list_ahead: None,
        }
    );
}

#[test]
fn a_wake_selects_with_the_listing_it_will_ask_for_and_a_connect_does_not_guess() {
    let mut m = started(spec(10, false, false, false), Some(cp(7, 3)));
    let selected = |uidnext| {
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext,
        })
    };
    assert_eq!(m.on(selected(4), s(0), 0.0), Action::List { above: 3, upto: None });
    assert_eq!(m.on(listed(&[]), s(0), 0.0), Action::RunJobs);
    assert_eq!(m.on(Input::JobsRan { ran: false }, s(0), 0.0), Action::Idle(s(600)));
    let wake = |m: &mut WatchMachine| {
        m.on(
            Input::WaitEnded {
                wake: Wake::Activity,
                token_left: None,
            },
            s(1),
            0.0,
        );
        m.on(Input::JobsRan { ran: false }, s(1), 0.0)
    };
    // The wake: the SELECT names the listing that follows it when nothing else changed...
    let ahead = ListWindow { above: 3, upto: None };
    assert_eq!(
        wake(&mut m),
        Action::Select {
            list_ahead: Some(ahead),
            bodies_ahead: Some(BodiesAhead {
                from: 4,
                to: 7,
                max_bytes: 1_000
            })
        }
    );
    let next = m.on(selected(6), s(1), 0.0);
    assert_eq!(next, Action::List { above: 3, upto: None });
    assert!(matches!(next, Action::List { above, upto } if ListWindow { above, upto } == ahead));
    m.on(listed(&[4, 5]), s(1), 0.0);
    // ...and it is only a guess: a folder that changed in between gets the listing it needs
    // (a new UIDVALIDITY: everything above the new checkpoint), the guess is discarded.
    let mut m = started(spec(10, false, false, false), Some(cp(7, 3)));
    m.on(selected(4), s(0), 0.0);
    m.on(listed(&[]), s(0), 0.0);
    m.on(Input::JobsRan { ran: false }, s(0), 0.0);
    assert_eq!(
        wake(&mut m),
        Action::Select {
            list_ahead: Some(ahead),
            bodies_ahead: Some(BodiesAhead {
                from: 4,
                to: 7,
                max_bytes: 1_000
            })
        }
    );
    let changed = m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 8,
            uidnext: 3,
        }),
        s(1),
        0.0,
    );
    assert!(matches!(changed, Action::Commit { .. }), "{changed:?}");
}

#[test]
fn a_message_the_server_cannot_send_is_dead_lettered_after_max_attempts() {
    let mut m = started(spec(10, true, false, false), Some(cp(7, 0)));
    let select = Input::Selected(inboxd_core::mailbox::Selected {
        uidvalidity: 7,
        uidnext: 4,
    });
    m.on(select.clone(), s(0), 0.0);
    assert_eq!(
        m.on(listed(&[1, 2, 3]), s(0), 0.0),
        Action::Fetch {
            uids: vec![1, 2, 3],
            check_seen: vec![],
            spool: false,
            ahead: vec![],
            list_ahead: None,
        }
    );
    let mut now = 0;
    // The batch fails: next time one message at a time.
    let mut action = m.on(
        Input::Failed {
            class: FailureClass::Network,
            error: "timed out".into(),
        },
        s(now),
        0.0,
    );
    for _ in 0..RETRY.max_attempts {
        let Action::Sleep { delay, .. } = action else {
            panic!("{action:?}")
        };
        now += delay.as_secs();
        assert_eq!(m.on(Input::Slept, s(now), 0.0), Action::Connect);
        m.on(
            Input::Connected {
                idle: true,
                token_left: None,
            },
            s(now),
            0.0,
        );
        m.on(select.clone(), s(now), 0.0);
        assert_eq!(
            m.on(listed(&[1, 2, 3]), s(now), 0.0),
            Action::Fetch {
                uids: vec![1],
                check_seen: vec![],
                spool: true,
                ahead: vec![],
                list_ahead: None,
            }
        );
        action = m.on(
            Input::Failed {
                class: FailureClass::Network,
                error: "incoming data too large".into(),
            },
            s(now),
            0.0,
        );
    }
    let Action::Sleep { delay, .. } = action else { panic!() };
    now += delay.as_secs();
    m.on(Input::Slept, s(now), 0.0);
    m.on(
        Input::Connected {
            idle: true,
            token_left: None,
        },
        s(now),
        0.0,
    );
    m.on(select, s(now), 0.0);
    // Given up on without a fetch, and the rest of the folder flows.
    assert_eq!(m.on(listed(&[1, 2, 3]), s(now), 0.0), Action::Flush);
    let Action::Commit { checkpoint, log } = m.on(Input::Flushed, s(now), 0.0) else {
        panic!()
    };
    assert_eq!(checkpoint.last_uid, 1);
    assert_eq!(log[0].status, Status::Dead);
    assert!(log[0].error.contains("incoming data too large"), "{:?}", log[0]);
    assert_eq!(
        m.on(Input::Committed, s(now), 0.0),
        Action::Fetch {
            uids: vec![2],
            check_seen: vec![],
            spool: true,
            ahead: vec![],
            list_ahead: None,
        }
    );
}

#[test]
fn a_message_above_max_message_size_is_dead_lettered_without_a_fetch() {
    let mut m = started(spec(10, false, false, false), Some(cp(7, 0)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 3,
        }),
        s(0),
        0.0,
    );
    let items = vec![
        Listed {
            uid: 1,
            size: Some(5_000_000),
        },
        Listed { uid: 2, size: Some(10) },
    ];
    // Settled as dead and committed like any other row, then the folder flows on.
    assert_eq!(m.on(Input::Listed { items, news: false }, s(0), 0.0), Action::Flush);
    let Action::Commit { checkpoint, log } = m.on(Input::Flushed, s(0), 0.0) else {
        panic!()
    };
    assert_eq!((checkpoint.last_uid, log[0].status), (1, Status::Dead));
    assert_eq!(
        m.on(Input::Committed, s(0), 0.0),
        Action::Fetch {
            uids: vec![2],
            check_seen: vec![],
            spool: false,
            ahead: vec![],
            list_ahead: None,
        }
    );
    assert!(
        m.take_notices()
            .iter()
            .any(|n| matches!(n, inboxd_core::machine::Notice::DeadLettered { uid: 1, .. }))
    );
}

#[test]
fn a_failed_post_action_never_ends_the_round_and_is_retried_at_the_next_wake() {
    let mut m = started(spec(10, true, true, false), Some(cp(7, 0)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 2,
        }),
        s(0),
        0.0,
    );
    m.on(listed(&[1]), s(0), 0.0);
    m.on(fetched(&[1]), s(0), 0.0);
    m.on(Input::Delivered { uid: 1 }, s(0), 0.0);
    m.on(Input::Flushed, s(0), 0.0);
    assert_eq!(m.on(Input::Committed, s(0), 0.0), Action::PostAction { uids: vec![1] });
    assert_eq!(
        m.on(
            Input::PostActionFailed {
                permanent: false,
                error: "[UNAVAILABLE] busy".into()
            },
            s(0),
            0.0
        ),
        Action::List { above: 1, upto: None }
    );
    assert_eq!(m.on(listed(&[]), s(0), 0.0), Action::RunJobs);
    m.on(Input::JobsRan { ran: false }, s(0), 0.0);
    m.on(
        Input::WaitEnded {
            wake: Wake::Activity,
            token_left: None,
        },
        s(5),
        0.0,
    );
    m.on(Input::JobsRan { ran: false }, s(5), 0.0);
    assert_eq!(
        m.on(
            Input::Selected(inboxd_core::mailbox::Selected {
                uidvalidity: 7,
                uidnext: 2
            }),
            s(5),
            0.0
        ),
        Action::PostAction { uids: vec![1] }
    );
    assert_eq!(
        m.on(Input::PostActionDone, s(5), 0.0),
        Action::List { above: 1, upto: None }
    );
}

#[test]
fn a_stop_during_a_delivery_commits_it_and_logs_out() {
    let mut m = started(spec(10, false, false, false), Some(cp(7, 0)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 3,
        }),
        s(0),
        0.0,
    );
    m.on(listed(&[1, 2]), s(0), 0.0);
    assert_eq!(
        m.on(fetched(&[1, 2]), s(0), 0.0),
        Action::Deliver { uid: 1, attempt: 1 }
    );
    m.stop();
    assert_eq!(m.on(Input::Delivered { uid: 1 }, s(0), 0.0), Action::Flush);
    let Action::Commit { checkpoint, .. } = m.on(Input::Flushed, s(0), 0.0) else {
        panic!()
    };
    assert_eq!(checkpoint.last_uid, 1);
    assert_eq!(m.on(Input::Committed, s(0), 0.0), Action::Logout);
    assert_eq!(m.on(Input::LoggedOut, s(0), 0.0), Action::Done(Ok(())));
}

#[test]
fn an_unavailable_handler_ends_the_round_without_counting_against_the_message() {
    let mut m = started(spec(10, true, false, false), Some(cp(7, 0)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 2,
        }),
        s(0),
        0.0,
    );
    m.on(listed(&[1]), s(0), 0.0);
    m.on(fetched(&[1]), s(0), 0.0);
    let a = m.on(
        Input::HandlerFailed {
            uid: 1,
            error: "handler ./h.sh not found".into(),
            kind: HandlerFailure::Unavailable,
        },
        s(0),
        0.0,
    );
    assert!(
        matches!(
            a,
            Action::Sleep {
                keep_session: false,
                ..
            }
        ),
        "{a:?}"
    );
    assert!(!m.take_notices().iter().any(|n| matches!(
        n,
        inboxd_core::machine::Notice::DeadLettered { .. } | inboxd_core::machine::Notice::Failed { .. }
    )));
}

#[test]
fn a_token_due_at_once_does_not_make_a_login_loop() {
    let mut m = new_machine(&spec(10, false, false, false));
    m.on(Input::Start, s(0), 0.0);
    m.on(
        Input::Connected {
            idle: true,
            token_left: Some(s(0)),
        },
        s(0),
        0.0,
    );
    m.on(
        Input::Loaded {
            stored: Some(cp(7, 0)),
            pending_post_actions: vec![],
        },
        s(0),
        0.0,
    );
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 1,
        }),
        s(0),
        0.0,
    );
    m.on(listed(&[]), s(0), 0.0);
    // The session is young: it waits until the floor instead of recycling now.
    assert_eq!(
        m.on(Input::JobsRan { ran: false }, s(0), 0.0),
        Action::Idle(inboxd_core::machine::RECYCLE_FLOOR)
    );
}

#[test]
fn a_busy_target_never_dead_letters_and_its_retry_after_is_honoured() {
    // max_attempts is 3; the target answers "busy" ten times in a row, then takes the message.
    let mut m = started(spec(10, true, false, false), Some(cp(7, 0)));
    let select = Input::Selected(inboxd_core::mailbox::Selected {
        uidvalidity: 7,
        uidnext: 2,
    });
    m.on(select.clone(), s(0), 0.0);
    let mut now = 0;
    let mut action = m.on(listed(&[1]), s(now), 0.0);
    let mut delays = Vec::new();
    for busy in 0..10u32 {
        assert_eq!(
            action,
            Action::Fetch {
                uids: vec![1],
                check_seen: vec![],
                spool: false,
                ahead: vec![],
                list_ahead: None,
            }
        );
        assert_eq!(m.on(fetched(&[1]), s(now), 0.0), Action::Deliver { uid: 1, attempt: 1 });
        let retry_after = (busy == 4).then_some(Duration::from_secs(900));
        action = m.on(
            Input::HandlerFailed {
                uid: 1,
                error: "503".into(),
                kind: HandlerFailure::Transient { retry_after },
            },
            s(now),
            0.0,
        );
        // The failed row is recorded with the attempt not counted, then the back-off.
        let Action::Record { log } = action else {
            panic!("{action:?}")
        };
        assert_eq!((log[0].status, log[0].attempts), (Status::Failed, 0));
        // Then the wait (a long one without the session), and the same message again.
        action = m.on(Input::Recorded, s(now), 0.0);
        loop {
            action = match action {
                Action::Logout => m.on(Input::LoggedOut, s(now), 0.0),
                Action::Sleep { delay, .. } => {
                    delays.push(delay.as_secs());
                    now += delay.as_secs();
                    m.on(Input::Slept, s(now), 0.0)
                }
                Action::Connect => m.on(
                    Input::Connected {
                        idle: true,
                        token_left: None,
                    },
                    s(now),
                    0.0,
                ),
                Action::Select { .. } => m.on(select.clone(), s(now), 0.0),
                Action::List { .. } => m.on(listed(&[1]), s(now), 0.0),
                Action::Fetch { .. } => break,
                other => panic!("{other:?}"),
            };
        }
    }
    // Doubling from 1 s, capped at 8 s by the policy, and 900 s when the target asked.
    assert_eq!(delays, vec![1, 2, 4, 8, 900, 8, 8, 8, 8, 8]);
    assert_eq!(m.on(fetched(&[1]), s(now), 0.0), Action::Deliver { uid: 1, attempt: 1 });
    let Action::Flush = m.on(Input::Delivered { uid: 1 }, s(now), 0.0) else {
        panic!()
    };
}

#[test]
fn a_target_refusing_for_good_dead_letters_at_once() {
    let mut m = started(spec(10, true, false, false), Some(cp(7, 0)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 3,
        }),
        s(0),
        0.0,
    );
    m.on(listed(&[1, 2]), s(0), 0.0);
    assert_eq!(
        m.on(fetched(&[1, 2]), s(0), 0.0),
        Action::Deliver { uid: 1, attempt: 1 }
    );
    let Action::Flush = m.on(
        Input::HandlerFailed {
            uid: 1,
            error: "410 Gone".into(),
            kind: HandlerFailure::Permanent,
        },
        s(0),
        0.0,
    ) else {
        panic!()
    };
    let Action::Commit { log, .. } = m.on(Input::Flushed, s(0), 0.0) else {
        panic!()
    };
    assert_eq!((log[0].status, log[0].attempts), (Status::Dead, 1));
    assert_eq!(
        m.on(Input::Committed, s(0), 0.0),
        Action::Deliver { uid: 2, attempt: 1 }
    );
}

#[test]
fn the_gravest_of_several_target_failures_decides() {
    use inboxd_core::machine::HandlerFailure::{Attempt, Permanent, Transient, Unavailable};
    let busy = |s: u64| Transient {
        retry_after: Some(Duration::from_secs(s)),
    };
    let none = Transient { retry_after: None };
    assert_eq!(
        busy(5).graver(busy(30)),
        busy(30),
        "busy targets: the longest wait they asked for"
    );
    assert_eq!(none.graver(busy(7)), busy(7));
    assert_eq!(busy(30).graver(Attempt), Attempt);
    assert_eq!(Attempt.graver(Permanent), Permanent);
    assert_eq!(Permanent.graver(Attempt), Permanent);
    assert_eq!(Permanent.graver(Unavailable), Unavailable);
    assert_eq!(Unavailable.graver(busy(1)), Unavailable);
}

#[test]
fn each_fetch_names_the_next_batch_to_read_ahead_and_never_a_spooled_one() {
    // Batches of 3; uid 8 is above spool_above (1,000 bytes): it goes alone, spooled, and is
    // never read ahead.
    let mut m = started(spec(3, false, false, false), Some(cp(7, 0)));
    let select = Input::Selected(inboxd_core::mailbox::Selected {
        uidvalidity: 7,
        uidnext: 11,
    });
    assert_eq!(m.on(select, s(0), 0.0), Action::List { above: 0, upto: None });
    let items = (1..=10)
        .map(|uid| Listed {
            uid,
            size: Some(if uid == 8 { 5_000 } else { 10 }),
        })
        .collect();
    let mut action = m.on(Input::Listed { items, news: false }, s(0), 0.0);
    let mut fetches = Vec::new();
    loop {
        action = match action {
            Action::Fetch { uids, spool, ahead, .. } => {
                fetches.push((uids.clone(), spool, ahead));
                m.on(fetched(&uids), s(0), 0.0)
            }
            Action::Deliver { uid, .. } => m.on(Input::Delivered { uid }, s(0), 0.0),
            Action::Flush => m.on(Input::Flushed, s(0), 0.0),
            Action::Commit { .. } => m.on(Input::Committed, s(0), 0.0),
            Action::List { above: 10, upto: None } => break,
            other => panic!("{other:?}"),
        };
    }
    assert_eq!(
        fetches,
        vec![
            (vec![1, 2, 3], false, vec![4, 5, 6]),
            (vec![4, 5, 6], false, vec![7]),
            (vec![7], false, vec![]),
            (vec![8], true, vec![9, 10]),
            (vec![9, 10], false, vec![]),
        ]
    );
}

#[test]
fn a_long_backlog_is_listed_in_growing_windows_each_read_ahead_with_the_last_batch_of_the_one_before() {
    // A first window of 4 UIDs below the SELECT's UIDNEXT (100): 0..4; each window after one
    // with messages twice as large, up to 8 times the first (32); an empty window (the UIDs
    // are sparse there) doubles the next one too; the last one is open-ended.
    let mut sp = spec(2, false, false, false);
    sp.list_window = 4;
    let mut m = started(sp, Some(cp(7, 0)));
    let select = Input::Selected(inboxd_core::mailbox::Selected {
        uidvalidity: 7,
        uidnext: 100,
    });
    let listed = |uids: &[u32]| Input::Listed {
        items: uids.iter().map(|&uid| Listed { uid, size: Some(10) }).collect(),
        news: false,
    };
    assert_eq!(
        m.on(select, s(0), 0.0),
        Action::List {
            above: 0,
            upto: Some(4)
        }
    );
    let fetch = m.on(listed(&[2, 3, 4]), s(0), 0.0);
    assert_eq!(
        fetch,
        Action::Fetch {
            uids: vec![2, 3],
            check_seen: vec![],
            spool: false,
            ahead: vec![4],
            list_ahead: None,
        }
    );
    let mut action = m.on(fetched(&[2, 3]), s(0), 0.0);
    let mut lists = Vec::new();
    let mut fetches = Vec::new();
    loop {
        action = match action {
            Action::Fetch { uids, list_ahead, .. } => {
                fetches.push((uids.clone(), list_ahead));
                m.on(fetched(&uids), s(0), 0.0)
            }
            Action::Deliver { uid, .. } => m.on(Input::Delivered { uid }, s(0), 0.0),
            Action::Flush => m.on(Input::Flushed, s(0), 0.0),
            Action::Commit { .. } => m.on(Input::Committed, s(0), 0.0),
            Action::List { above, upto } => {
                lists.push((above, upto));
                match (above, upto) {
                    (4, Some(12)) => m.on(listed(&[]), s(0), 0.0),
                    (12, Some(28)) => m.on(listed(&[13, 20]), s(0), 0.0),
                    (28, Some(60)) => m.on(listed(&[29]), s(0), 0.0),
                    (60, Some(92)) => m.on(listed(&[]), s(0), 0.0),
                    (92, None) => break,
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        };
    }
    assert_eq!(
        lists,
        vec![
            (4, Some(12)),
            (12, Some(28)),
            (28, Some(60)),
            (60, Some(92)),
            (92, None)
        ]
    );
    let w = |above, upto| Some(ListWindow { above, upto });
    assert_eq!(
        fetches,
        vec![
            (vec![4], w(4, Some(12))),
            (vec![13, 20], w(28, Some(60))),
            (vec![29], w(60, Some(92))),
        ]
    );
}

#[test]
fn a_uid_beyond_the_listing_window_is_ignored_until_its_own_window() {
    // A server that ignores the range answers `UID FETCH 1:4` with UID 9 as well: delivering 9
    // now would move the checkpoint past 5..8, which no window has listed yet.
    let mut sp = spec(10, false, false, false);
    sp.list_window = 4;
    let mut m = started(sp, Some(cp(7, 0)));
    let select = Input::Selected(inboxd_core::mailbox::Selected {
        uidvalidity: 7,
        uidnext: 12,
    });
    assert_eq!(
        m.on(select, s(0), 0.0),
        Action::List {
            above: 0,
            upto: Some(4)
        }
    );
    let items = [2, 9].iter().map(|&uid| Listed { uid, size: Some(10) }).collect();
    match m.on(Input::Listed { items, news: false }, s(0), 0.0) {
        Action::Fetch { uids, .. } => assert_eq!(uids, vec![2]),
        other => panic!("{other:?}"),
    }
}

/// Brings a started machine with nothing new to IDLE at `at`.
fn idle_at(m: &mut WatchMachine, at: Duration) {
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 4,
        }),
        at,
        0.0,
    );
    assert_eq!(m.on(listed(&[]), at, 0.0), Action::RunJobs);
    assert!(matches!(m.on(Input::JobsRan { ran: false }, at, 0.0), Action::Idle(_)));
}

#[test]
fn a_session_dropped_after_minutes_in_idle_reconnects_at_once_every_time() {
    let mut m = started(spec(10, false, false, false), Some(cp(7, 3)));
    let mut now = s(0);
    // Forty sessions, each dropped by the server after four minutes in IDLE (Gmail does this;
    // so do NAT boxes): each time straight back, never into the schedule's slower parts.
    for i in 0..40 {
        idle_at(&mut m, now);
        now += s(240);
        let class = if i % 2 == 0 {
            FailureClass::Bye
        } else {
            FailureClass::Network
        };
        assert_eq!(
            m.on(
                Input::Failed {
                    class,
                    error: "BYE".into()
                },
                now,
                0.5
            ),
            Action::Sleep {
                delay: s(0),
                keep_session: false
            },
            "drop {i}"
        );
        assert_eq!(m.on(Input::Slept, now, 0.0), Action::Connect);
        m.on(
            Input::Connected {
                idle: true,
                token_left: None,
            },
            now,
            0.0,
        );
    }
    // A drop seconds into IDLE is a failure: after the first at once, the schedule waits.
    let mut waits = Vec::new();
    for _ in 0..3 {
        idle_at(&mut m, now);
        now += s(2);
        match m.on(
            Input::Failed {
                class: FailureClass::Bye,
                error: "BYE".into(),
            },
            now,
            0.5,
        ) {
            Action::Sleep { delay, .. } => {
                waits.push(delay);
                now += delay;
            }
            other => panic!("{other:?}"),
        }
        m.on(Input::Slept, now, 0.0);
        m.on(
            Input::Connected {
                idle: true,
                token_left: None,
            },
            now,
            0.0,
        );
    }
    assert_eq!(waits[0], s(0));
    assert!(waits[1] >= s(30) && waits[2] >= s(30), "{waits:?}");
}

/// With the account's notifier (`wait.notify`), a caught-up watch gives its session back and
/// waits for a notice; any end of that wait connects again (which catches up), and a server
/// without NOTIFY sends the watch back to IDLE on a session of its own.
#[test]
fn a_notified_watch_waits_without_a_session_and_falls_back_to_idle_without_notify() {
    let mut sp = spec(10, false, false, false);
    sp.wait.notify = true;
    let mut m = started(sp, Some(cp(7, 3)));
    let selected = Input::Selected(inboxd_core::mailbox::Selected {
        uidvalidity: 7,
        uidnext: 4,
    });
    let connected = Input::Connected {
        idle: true,
        token_left: None,
    };
    let ended = |wake| Input::WaitEnded { wake, token_left: None };
    assert_eq!(m.on(selected.clone(), s(0), 0.0), Action::List { above: 3, upto: None });
    assert_eq!(m.on(listed(&[]), s(0), 0.0), Action::RunJobs);
    // Caught up: the session goes, then the wait for a notice (as long as an IDLE would be).
    assert_eq!(m.on(Input::JobsRan { ran: false }, s(0), 0.0), Action::Logout);
    assert_eq!(m.on(Input::LoggedOut, s(0), 0.0), Action::AwaitNotice(s(600)));
    assert_eq!(m.state(), inboxd_core::machine::State::Idle);
    // Each way the wait can end connects again; the catch-up follows the connect.
    for wake in [Wake::Activity, Wake::Elapsed, Wake::Interrupted] {
        assert_eq!(m.on(ended(wake), s(1), 0.0), Action::Connect);
        assert!(matches!(m.on(connected.clone(), s(1), 0.0), Action::Select { .. }));
        assert_eq!(m.on(selected.clone(), s(1), 0.0), Action::List { above: 3, upto: None });
        assert_eq!(m.on(listed(&[]), s(1), 0.0), Action::RunJobs);
        assert_eq!(m.on(Input::JobsRan { ran: false }, s(1), 0.0), Action::Logout);
        assert_eq!(m.on(Input::LoggedOut, s(1), 0.0), Action::AwaitNotice(s(600)));
    }
    // No NOTIFY on this server: from now on the watch IDLEs on its own session.
    assert_eq!(m.on(ended(Wake::NoNotifier), s(2), 0.0), Action::Connect);
    assert!(matches!(m.on(connected, s(2), 0.0), Action::Select { .. }));
    assert_eq!(m.on(selected, s(2), 0.0), Action::List { above: 3, upto: None });
    assert_eq!(m.on(listed(&[]), s(2), 0.0), Action::RunJobs);
    assert_eq!(m.on(Input::JobsRan { ran: false }, s(2), 0.0), Action::Idle(s(600)));
    // A stop during the wait for a notice finishes at once.
    let mut sp = spec(10, false, false, false);
    sp.wait.notify = true;
    let mut m = started(sp, Some(cp(7, 3)));
    m.on(
        Input::Selected(inboxd_core::mailbox::Selected {
            uidvalidity: 7,
            uidnext: 4,
        }),
        s(0),
        0.0,
    );
    m.on(listed(&[]), s(0), 0.0);
    m.on(Input::JobsRan { ran: false }, s(0), 0.0);
    assert_eq!(m.on(Input::LoggedOut, s(0), 0.0), Action::AwaitNotice(s(600)));
    m.stop();
    assert_eq!(m.on(ended(Wake::Interrupted), s(1), 0.0), Action::Done(Ok(())));
}
