//! What a SELECT result means for the checkpoint (first sight, UIDVALIDITY), and which
//! messages need the dedupe check. Which UIDs to fetch, in which batches, is the watch
//! machine's (`machine.rs`).
//!
//! UIDVALIDITY (RFC 3501 §2.3.1.1) says whether the UIDs we remember still name the same
//! messages. When it changes (folder deleted and recreated, server restored from backup), UIDs
//! restart and the checkpoint is meaningless; the policy decides how to carry on without losing
//! what arrived and, by default, without delivering old messages again.

use alloc::{
    format,
    string::{String, ToString},
    vec::Vec,
};

use crate::checkpoint::Checkpoint;

/// Where a watcher starts in a folder it has never seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StartPolicy {
    /// Begin at UIDNEXT: history is not replayed.
    #[default]
    New,
    /// Deliver every message in the folder.
    All,
}

/// What to do when a folder's UIDVALIDITY changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UidValidityPolicy {
    /// Re-scan the folder; deliver only messages whose Message-ID (or header digest) is not in
    /// the delivery log. The check applies to every message of the new UIDVALIDITY, not only to
    /// those present when the change was seen: a restore or migration tool may copy the old
    /// messages back into the recreated folder after inboxd already saw it empty.
    #[default]
    Dedupe,
    /// Start at the new UIDNEXT; whatever is in the folder now is not delivered.
    Skip,
    /// Deliver everything in the folder again.
    Replay,
}

/// The parts of a SELECT response the decisions need. `uidnext` is resolved by the driver
/// (from SELECT, or STATUS, or the highest UID + 1 when the server omits it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected {
    pub uidvalidity: u32,
    pub uidnext: u32,
}

/// Something about the folder that the operator must hear about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// No checkpoint existed; one was created by the start policy.
    FirstSight,
    /// UIDVALIDITY changed from `old` to `new`; handled according to `policy`.
    UidValidityChanged {
        old: u32,
        new: u32,
        policy: UidValidityPolicy,
    },
    /// UIDNEXT is below the checkpoint although UIDVALIDITY did not change: the server is
    /// broken or was restored without bumping UIDVALIDITY. The checkpoint is kept.
    UidNextBehindCheckpoint { uidnext: u32, last_uid: u32 },
}

/// The checkpoint to work from after SELECT, and whether it must be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectOutcome {
    pub checkpoint: Checkpoint,
    pub store: bool,
    pub notice: Option<Notice>,
}

/// Decides the working checkpoint after a SELECT.
pub fn on_select(
    stored: Option<Checkpoint>,
    selected: Selected,
    start: StartPolicy,
    policy: UidValidityPolicy,
) -> SelectOutcome {
    let below_next = selected.uidnext.saturating_sub(1);
    let Some(stored) = stored else {
        let last_uid = match start {
            StartPolicy::New => below_next,
            StartPolicy::All => 0,
        };
        let checkpoint = Checkpoint {
            uidvalidity: selected.uidvalidity,
            last_uid,
            dedupe_through: 0,
        };
        return SelectOutcome {
            checkpoint,
            store: true,
            notice: Some(Notice::FirstSight),
        };
    };
    if stored.uidvalidity != selected.uidvalidity {
        let (last_uid, dedupe_through) = match policy {
            UidValidityPolicy::Dedupe => (0, u32::MAX),
            UidValidityPolicy::Skip => (below_next, 0),
            UidValidityPolicy::Replay => (0, 0),
        };
        let checkpoint = Checkpoint {
            uidvalidity: selected.uidvalidity,
            last_uid,
            dedupe_through,
        };
        let notice = Notice::UidValidityChanged {
            old: stored.uidvalidity,
            new: selected.uidvalidity,
            policy,
        };
        return SelectOutcome {
            checkpoint,
            store: true,
            notice: Some(notice),
        };
    }
    let notice = (below_next < stored.last_uid).then_some(Notice::UidNextBehindCheckpoint {
        uidnext: selected.uidnext,
        last_uid: stored.last_uid,
    });
    SelectOutcome {
        checkpoint: stored,
        store: false,
        notice,
    }
}

/// Whether a message must pass the dedupe check before delivery.
pub fn needs_dedupe(checkpoint: &Checkpoint, uid: u32) -> bool {
    uid <= checkpoint.dedupe_through
}

/// Clears a finished dedupe pass: once the checkpoint reaches `dedupe_through`, later UIDs are
/// new messages and need no check.
pub fn settle(checkpoint: Checkpoint) -> Checkpoint {
    if checkpoint.dedupe_through != 0 && checkpoint.last_uid >= checkpoint.dedupe_through {
        Checkpoint {
            dedupe_through: 0,
            ..checkpoint
        }
    } else {
        checkpoint
    }
}

/// Whether a folder name matches a pattern in IMAP LIST's terms (RFC 3501 §6.3.8): `*` matches
/// any run of characters, `%` any run without the hierarchy `delimiter`; everything else
/// matches itself. A pattern watch (`folders = "Support/*"`) watches every folder it matches.
pub fn pattern_matches(pattern: &str, name: &str, delimiter: Option<char>) -> bool {
    let p: alloc::vec::Vec<char> = pattern.chars().collect();
    let n: alloc::vec::Vec<char> = name.chars().collect();
    // Positions of the pattern reachable after each prefix of the name (no backtracking
    // blow-up on hostile names: O(pattern x name)).
    let mut reach = alloc::vec![false; p.len() + 1];
    reach[0] = true;
    let close = |reach: &mut alloc::vec::Vec<bool>| {
        for i in 0..p.len() {
            if reach[i] && (p[i] == '*' || p[i] == '%') {
                reach[i + 1] = true;
            }
        }
    };
    close(&mut reach);
    for &c in &n {
        let mut next = alloc::vec![false; p.len() + 1];
        for i in 0..p.len() {
            if !reach[i] {
                continue;
            }
            match p[i] {
                '*' => next[i] = true,
                '%' if Some(c) != delimiter => next[i] = true,
                '%' => {}
                pc if pc == c => next[i + 1] = true,
                _ => {}
            }
        }
        close(&mut next);
        reach = next;
    }
    reach[p.len()]
}

/// Formats ascending UIDs as a compact IMAP sequence set, e.g. `1:3,7,9:10`.
pub fn sequence_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// What the session saw of a wake's listing sent without a SELECT (the machine's `ListNews`):
/// the facts [`news_fit`] decides on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NewsSeen {
    /// The message count when the wait began.
    pub base: u32,
    /// The message count when the server answered the end of the wait (DONE), before the
    /// listing ran.
    pub announced: u32,
    /// The message count after the listing.
    pub count: u32,
    /// Each listed message as (UID, sequence number).
    pub listed: Vec<(u32, u32)>,
    /// The listing was answered OK.
    pub listing_ok: bool,
    /// From the wait on, the server said something besides new mail: an EXPUNGE, an
    /// untagged NO or BAD, a smaller count.
    pub other_news: bool,
}

/// Whether a listing sent without a SELECT may be trusted as one sent after it: the server
/// said nothing but new mail since the wait began, and the messages listed above `last_uid`
/// are exactly those numbered `base + 1` up, covering at least the count announced when the
/// wait ended. Then every announced message is listed, each with a UID the folder holds in
/// the incarnation the session selected; anything else is decided by a fresh SELECT.
pub fn news_fit(seen: &NewsSeen, last_uid: u32) -> bool {
    let mut seqs: Vec<u32> = seen
        .listed
        .iter()
        .filter(|&&(uid, _)| uid > last_uid)
        .map(|&(_, seq)| seq)
        .collect();
    seqs.sort_unstable();
    let numbered_from_base = seqs.iter().enumerate().all(|(i, &seq)| {
        u32::try_from(i)
            .ok()
            .and_then(|i| seen.base.checked_add(i)?.checked_add(1))
            == Some(seq)
    });
    let last = match seqs.last() {
        Some(&last) => last,
        None => return false,
    };
    !seen.other_news && seen.listing_ok && numbered_from_base && last >= seen.announced && last <= seen.count
}

#[cfg(test)]
mod tests {

    #[test]
    fn patterns_match_as_imap_list_does() {
        let d = Some('/');
        assert!(pattern_matches("Support/*", "Support/Tier 1", d));
        assert!(pattern_matches("Support/*", "Support/Tier 1/Urgent", d));
        assert!(!pattern_matches("Support/*", "Support", d));
        assert!(!pattern_matches("Support/*", "Sales/Support/x", d));
        assert!(pattern_matches("Support/%", "Support/Tier 1", d));
        assert!(!pattern_matches("Support/%", "Support/Tier 1/Urgent", d));
        assert!(pattern_matches("*", "Entwürfe", d));
        assert!(pattern_matches("Kunden/%/Eingang", "Kunden/Müller/Eingang", d));
        assert!(!pattern_matches("Kunden/%/Eingang", "Kunden/Müller/Alt/Eingang", d));
        assert!(pattern_matches("INBOX", "INBOX", d));
        assert!(!pattern_matches("INBOX", "INBOX2", d));
        // A long hostile name costs pattern x name steps, not exponential backtracking.
        let long = "a".repeat(5000);
        assert!(!pattern_matches("*a*a*a*a*a*a*a*b", &long, d));
    }

    use super::*;

    /// Messages 5 and 6 arrived (count 4 -> 6) above a checkpoint at UID 10.
    fn news() -> NewsSeen {
        NewsSeen {
            base: 4,
            announced: 6,
            count: 6,
            // `11:*` also names nothing below; the last message below the checkpoint may come
            // with it (RFC 3501 `n:*`) and is not one of the new.
            listed: alloc::vec![(10, 4), (12, 6), (11, 5)],
            listing_ok: true,
            other_news: false,
        }
    }

    #[test]
    fn a_listing_without_a_select_fits_only_when_it_names_exactly_the_announced_messages() {
        assert!(news_fit(&news(), 10));
        let no = |f: fn(&mut NewsSeen)| {
            let mut n = news();
            f(&mut n);
            !news_fit(&n, 10)
        };
        // Something besides new mail was said.
        assert!(no(|n| n.other_news = true));
        assert!(no(|n| n.listing_ok = false));
        // An announced message is missing (6 announced, only 5 listed).
        assert!(no(|n| n.listed.retain(|&(u, _)| u != 12)));
        // A listed message that is not one of the announced (a number at or below the base:
        // an old message above the checkpoint, or a UID the folder does not hold there).
        assert!(no(|n| n.listed.push((4_000_000_000, 3))));
        // A number twice, or beyond the count.
        assert!(no(|n| n.listed.push((13, 6))));
        assert!(no(|n| n.listed.push((13, 7))));
        // Nothing new listed.
        assert!(no(|n| n.listed.retain(|&(u, _)| u <= 10)));
        // More listed than announced at the end of the wait is fine while the count covers
        // it (mail that came while the listing ran).
        let mut more = news();
        more.count = 7;
        more.listed.push((13, 7));
        assert!(news_fit(&more, 10));
        // A base at the top of the range cannot overflow into a fit.
        let mut top = news();
        top.base = u32::MAX;
        assert!(!news_fit(&top, 10));
    }

    fn sel(uidvalidity: u32, uidnext: u32) -> Selected {
        Selected { uidvalidity, uidnext }
    }

    #[test]
    fn first_sight_follows_the_start_policy() {
        let new = on_select(None, sel(5, 11), StartPolicy::New, UidValidityPolicy::Dedupe);
        assert_eq!(
            new.checkpoint,
            Checkpoint {
                uidvalidity: 5,
                last_uid: 10,
                dedupe_through: 0
            }
        );
        assert!(new.store);
        let all = on_select(None, sel(5, 11), StartPolicy::All, UidValidityPolicy::Dedupe);
        assert_eq!(all.checkpoint.last_uid, 0);
        let empty = on_select(None, sel(5, 0), StartPolicy::New, UidValidityPolicy::Dedupe);
        assert_eq!(empty.checkpoint.last_uid, 0);
    }

    #[test]
    fn unchanged_uidvalidity_keeps_the_checkpoint() {
        let cp = Checkpoint {
            uidvalidity: 5,
            last_uid: 7,
            dedupe_through: 0,
        };
        let o = on_select(Some(cp), sel(5, 20), StartPolicy::All, UidValidityPolicy::Replay);
        assert_eq!(
            o,
            SelectOutcome {
                checkpoint: cp,
                store: false,
                notice: None
            }
        );
    }

    #[test]
    fn uidvalidity_change_follows_the_policy() {
        let cp = Checkpoint {
            uidvalidity: 5,
            last_uid: 70,
            dedupe_through: 0,
        };
        let d = on_select(Some(cp), sel(6, 4), StartPolicy::New, UidValidityPolicy::Dedupe);
        assert_eq!(
            d.checkpoint,
            Checkpoint {
                uidvalidity: 6,
                last_uid: 0,
                dedupe_through: u32::MAX
            }
        );
        assert!(matches!(
            d.notice,
            Some(Notice::UidValidityChanged { old: 5, new: 6, .. })
        ));
        let s = on_select(Some(cp), sel(6, 4), StartPolicy::New, UidValidityPolicy::Skip);
        assert_eq!(
            s.checkpoint,
            Checkpoint {
                uidvalidity: 6,
                last_uid: 3,
                dedupe_through: 0
            }
        );
        let r = on_select(Some(cp), sel(6, 4), StartPolicy::New, UidValidityPolicy::Replay);
        assert_eq!(
            r.checkpoint,
            Checkpoint {
                uidvalidity: 6,
                last_uid: 0,
                dedupe_through: 0
            }
        );
    }

    #[test]
    fn uidnext_behind_checkpoint_is_reported_not_obeyed() {
        let cp = Checkpoint {
            uidvalidity: 5,
            last_uid: 70,
            dedupe_through: 0,
        };
        let o = on_select(Some(cp), sel(5, 10), StartPolicy::New, UidValidityPolicy::Dedupe);
        assert_eq!(o.checkpoint, cp);
        assert_eq!(
            o.notice,
            Some(Notice::UidNextBehindCheckpoint {
                uidnext: 10,
                last_uid: 70
            })
        );
    }

    #[test]
    fn dedupe_pass_settles_when_the_checkpoint_passes_it() {
        let cp = Checkpoint {
            uidvalidity: 6,
            last_uid: 2,
            dedupe_through: 3,
        };
        assert!(needs_dedupe(&cp, 3));
        assert!(!needs_dedupe(&cp, 4));
        assert_eq!(settle(cp), cp);
        let done = Checkpoint { last_uid: 3, ..cp };
        assert_eq!(settle(done).dedupe_through, 0);
    }

    #[test]
    fn sequence_sets_compress_runs() {
        assert_eq!(sequence_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(sequence_set(&[4]), "4");
        assert_eq!(sequence_set(&[]), "");
    }
}
