//! The durable checkpoint and the acknowledgement window.
//!
//! **Invariant:** the checkpoint's `last_uid` never passes a UID whose delivery was not
//! acknowledged (delivered, or dead-lettered after its last attempt). Acknowledgements may
//! arrive out of order; the window advances only over the contiguous prefix of them, in the
//! style of vector's `OrderedFinalizer`.

use alloc::collections::BTreeMap;

/// Where a watcher stands in one folder; stored per (account, folder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The folder's UIDVALIDITY when the checkpoint was written.
    pub uidvalidity: u32,
    /// Every UID up to and including this one has been acknowledged (or was never to be
    /// delivered, e.g. history skipped by `start = "new"`).
    pub last_uid: u32,
    /// After a UIDVALIDITY change under the `dedupe` policy: messages with a UID up to and
    /// including this one are delivered only if their Message-ID (or header digest) is not in
    /// the delivery log (`u32::MAX` after a change: the whole new epoch). 0 = no check.
    pub dedupe_through: u32,
}

/// Outcome of one message, as far as the checkpoint is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// Not yet acknowledged.
    Pending,
    /// The handler acknowledged it, or it was dead-lettered, or deliberately skipped.
    Done,
}

/// Tracks the UIDs handed out in one catch-up and how far the checkpoint may advance.
#[derive(Debug, Default, Clone)]
pub struct AckWindow {
    base: u32,
    pending: BTreeMap<u32, Ack>,
}

impl AckWindow {
    /// A window whose checkpoint currently stands at `last_uid`.
    pub fn new(last_uid: u32) -> AckWindow {
        AckWindow {
            base: last_uid,
            pending: BTreeMap::new(),
        }
    }

    /// Registers a UID handed to delivery. UIDs at or below the checkpoint are ignored.
    pub fn track(&mut self, uid: u32) {
        if uid > self.base {
            self.pending.entry(uid).or_insert(Ack::Pending);
        }
    }

    /// Marks a tracked UID as acknowledged. Returns false if it was not tracked.
    pub fn ack(&mut self, uid: u32) -> bool {
        match self.pending.get_mut(&uid) {
            Some(a) => {
                *a = Ack::Done;
                true
            }
            None => false,
        }
    }

    /// Advances over the contiguous prefix of acknowledged UIDs and returns the new checkpoint
    /// UID. Gaps between tracked UIDs are fine (expunged or never existing UIDs), but a pending
    /// UID stops the advance.
    pub fn advance(&mut self) -> u32 {
        while let Some((&uid, &state)) = self.pending.first_key_value() {
            if state != Ack::Done {
                break;
            }
            self.base = uid;
            self.pending.remove(&uid);
        }
        self.base
    }

    /// The checkpoint UID as of the last `advance`.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// Number of tracked UIDs not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.pending.values().filter(|a| **a == Ack::Pending).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn advances_only_over_the_contiguous_acknowledged_prefix() {
        let mut w = AckWindow::new(10);
        for uid in [11, 12, 15, 20] {
            w.track(uid);
        }
        w.ack(12);
        w.ack(15);
        assert_eq!(w.advance(), 10, "11 is pending, nothing may move");
        w.ack(11);
        assert_eq!(w.advance(), 15, "gaps (13, 14) are not messages; 20 is pending");
        w.ack(20);
        assert_eq!(w.advance(), 20);
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn ignores_uids_at_or_below_the_checkpoint() {
        let mut w = AckWindow::new(10);
        w.track(3);
        assert!(!w.ack(3));
        assert_eq!(w.advance(), 10);
    }

    proptest! {
        #[test]
        fn never_passes_an_unacknowledged_uid(
            uids in proptest::collection::btree_set(1u32..200, 0..40),
            acks in proptest::collection::vec(any::<proptest::sample::Index>(), 0..40),
        ) {
            let uids: Vec<u32> = uids.into_iter().collect();
            let mut w = AckWindow::new(0);
            for &u in &uids { w.track(u); }
            let mut acked = alloc::collections::BTreeSet::new();
            for i in acks {
                if uids.is_empty() { break; }
                let u = uids[i.index(uids.len())];
                w.ack(u);
                acked.insert(u);
                let base = w.advance();
                for &u in &uids {
                    if u <= base { prop_assert!(acked.contains(&u)); }
                }
                // And it is as far as it may go: the next tracked UID is not acknowledged.
                if let Some(&next) = uids.iter().find(|&&u| u > base) {
                    prop_assert!(!acked.contains(&next));
                }
            }
        }
    }
}
