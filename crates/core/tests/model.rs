//! Model-based test of the decision core: random sequences of appends, expunges, dropped
//! connections, crashes between delivery and commit, handler failures and UIDVALIDITY resets
//! are run through the same decisions the watcher makes (`on_select`, `uids_to_deliver`,
//! `AckWindow`, `RetryPolicy`, dedupe) against a simple model of a folder, and checked:
//! every message is delivered (or dead-lettered) at least once; the checkpoint never passes an
//! unacknowledged UID; nothing is delivered again after a clean commit; a UIDVALIDITY reset
//! that brings old messages back does not repeat them (dedupe policy).

use std::collections::{BTreeMap, HashMap, HashSet};

use inboxd_core::checkpoint::{AckWindow, Checkpoint};
use inboxd_core::mailbox::{self, Selected, StartPolicy, UidValidityPolicy};
use inboxd_core::retry::{AfterFailure, RetryPolicy};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append,
    Expunge(prop::sample::Index),
    /// Deliver what is new; `crash_at` = crash after this many deliveries, before the commit.
    Sync {
        batch: usize,
        crash_at: Option<usize>,
    },
    /// The handler fails the next `n` attempts.
    HandlerFails(u32),
    /// The folder is recreated with a new UIDVALIDITY; `keep_old` copies its messages back.
    UidValidityReset {
        keep_old: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Append),
        1 => any::<prop::sample::Index>().prop_map(Op::Expunge),
        3 => (1usize..6, prop::option::of(0usize..5)).prop_map(|(batch, crash_at)| Op::Sync { batch, crash_at }),
        1 => (1u32..5).prop_map(Op::HandlerFails),
        1 => any::<bool>().prop_map(|keep_old| Op::UidValidityReset { keep_old }),
    ]
}

#[derive(Default)]
struct World {
    // The server.
    uidvalidity: u32,
    uidnext: u32,
    folder: BTreeMap<u32, u64>, // uid -> message id
    next_mid: u64,
    // What the client persisted.
    stored: Option<Checkpoint>,
    log: HashSet<u64>,              // message ids committed as delivered/skipped/dead
    committed: HashSet<(u32, u32)>, // (uidvalidity, uid) committed
    // Observations.
    deliveries: HashMap<u64, u32>,
    uncommitted_deliveries: HashSet<u64>, // delivered, then lost to a crash before commit
    handler_failures: u32,
}

const POLICY: RetryPolicy = RetryPolicy {
    initial: std::time::Duration::from_secs(1),
    max: std::time::Duration::from_secs(8),
    max_attempts: 3,
};

impl World {
    fn sync(&mut self, batch: usize, crash_at: Option<usize>) -> Result<(), TestCaseError> {
        let out = mailbox::on_select(
            self.stored,
            Selected {
                uidvalidity: self.uidvalidity,
                uidnext: self.uidnext,
            },
            StartPolicy::All,
            UidValidityPolicy::Dedupe,
        );
        let mut cp = out.checkpoint;
        if out.store {
            self.stored = Some(cp);
        }
        // The server may answer n:* with the highest message even below n.
        let mut listed: Vec<u32> = self.folder.keys().copied().filter(|&u| u > cp.last_uid).collect();
        if let Some(&max) = self.folder.keys().last() {
            listed.push(max);
        }
        let uids = mailbox::uids_to_deliver(listed, cp.last_uid);
        let mut delivered_count = 0;
        for chunk in mailbox::batches(&uids, |_| 0, batch, u64::MAX) {
            let mut window = AckWindow::new(cp.last_uid);
            for &u in chunk {
                window.track(u);
            }
            let mut pending_log = Vec::new();
            for &uid in chunk {
                let mid = self.folder[&uid];
                if mailbox::needs_dedupe(&cp, uid) && self.log.contains(&mid) {
                    window.ack(uid);
                    pending_log.push((uid, mid, false));
                    continue;
                }
                let mut attempts = 0;
                loop {
                    if self.handler_failures > 0 {
                        self.handler_failures -= 1;
                        attempts += 1;
                        match POLICY.after_failure(attempts) {
                            AfterFailure::RetryAfter(_) => continue,
                            AfterFailure::DeadLetter => break,
                        }
                    }
                    *self.deliveries.entry(mid).or_default() += 1;
                    delivered_count += 1;
                    break;
                }
                window.ack(uid);
                pending_log.push((uid, mid, true));
                if crash_at == Some(delivered_count) {
                    // Crash before the commit: nothing of this batch is durable.
                    for (_, mid, delivered) in pending_log {
                        if delivered {
                            self.uncommitted_deliveries.insert(mid);
                        }
                    }
                    return Ok(());
                }
            }
            let upto = window.advance();
            for &u in chunk {
                if u <= upto {
                    prop_assert!(
                        pending_log.iter().any(|(p, _, _)| *p == u),
                        "checkpoint passed unacknowledged uid {u}"
                    );
                }
            }
            cp = mailbox::settle(Checkpoint { last_uid: upto, ..cp });
            for (uid, mid, _) in pending_log {
                self.log.insert(mid);
                self.committed.insert((cp.uidvalidity, uid));
            }
            self.stored = Some(cp);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_core_loses_nothing_and_repeats_nothing(ops in prop::collection::vec(op(), 1..60)) {
        let mut w = World { uidvalidity: 1, uidnext: 1, ..World::default() };
        let mut ever: HashSet<u64> = HashSet::new();
        for op in ops {
            match op {
                Op::Append => {
                    w.next_mid += 1;
                    w.folder.insert(w.uidnext, w.next_mid);
                    ever.insert(w.next_mid);
                    w.uidnext += 1;
                }
                Op::Expunge(i) => {
                    if !w.folder.is_empty() {
                        let uid = *w.folder.keys().nth(i.index(w.folder.len())).unwrap();
                        let mid = w.folder.remove(&uid).unwrap();
                        // A message expunged before it was seen need not be delivered.
                        if !w.deliveries.contains_key(&mid) { ever.remove(&mid); }
                    }
                }
                Op::Sync { batch, crash_at } => w.sync(batch, crash_at)?,
                Op::HandlerFails(n) => w.handler_failures = n,
                Op::UidValidityReset { keep_old } => {
                    let old: Vec<u64> = w.folder.values().copied().collect();
                    w.uidvalidity += 1;
                    w.folder.clear();
                    w.uidnext = 1;
                    if keep_old {
                        for mid in old {
                            w.folder.insert(w.uidnext, mid);
                            w.uidnext += 1;
                        }
                    } else {
                        for mid in old {
                            if !w.deliveries.contains_key(&mid) { ever.remove(&mid); }
                        }
                    }
                }
            }
        }
        // A final clean sync catches everything up.
        w.handler_failures = 0;
        w.sync(5, None)?;
        for mid in &ever {
            prop_assert!(
                w.log.contains(mid) || w.deliveries.contains_key(mid),
                "message {mid} never delivered or dead-lettered"
            );
        }
        for (mid, n) in &w.deliveries {
            // More than once only if a crash lost the commit of an earlier delivery.
            prop_assert!(*n == 1 || w.uncommitted_deliveries.contains(mid), "message {mid} delivered {n} times after a clean commit");
        }
    }
}
