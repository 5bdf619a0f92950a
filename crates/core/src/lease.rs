//! Leases: which instance owns which watch when several share one PostgreSQL state.
//!
//! A watch (account, folder) is owned by at most one instance through a lease (owner, epoch,
//! expiry). The database decides who holds what, on its own clock; this module decides the
//! rest, as pure functions:
//!
//! - when to renew ([`LeasePolicy::renew_every`], well inside the TTL);
//! - until when the holder may rely on its lease by its *own* monotonic clock
//!   ([`LeasePolicy::trusted_until`]): counted from when the renewal was *sent*, so the local
//!   deadline is never later than the database's, and a process paused past it (SIGSTOP, a
//!   stall) knows on waking that it may have lost the lease, before it delivers anything;
//! - how many watches each instance should hold ([`fair_share`]) and which to take or give
//!   back this round ([`plan`]): when an instance joins, the others give back what exceeds
//!   the new share (after committing), and it takes them; when one leaves, its leases expire
//!   and the others take them up to their new share.
//!
//! Fencing is the store's part: every commit is conditional on the lease (owner and epoch)
//! being held and unexpired in the same transaction, so a holder that lost its lease cannot
//! move a checkpoint even if it missed the local deadline.

use alloc::vec::Vec;
use core::time::Duration;

/// How long after another instance's lease expires a round looks at it: the round's own
/// queries take a few milliseconds, and the database's clock decides expiry.
pub const EXPIRY_MARGIN: Duration = Duration::from_millis(50);

/// How long leases last and how they are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePolicy {
    /// A lease not renewed for this long expires, and another instance may take the watch.
    pub ttl: Duration,
}

impl LeasePolicy {
    /// Renewals come three times per TTL: two can fail (a slow database, a lost packet)
    /// before the lease is at risk.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Until when (on the holder's monotonic clock) a lease renewed by a request sent at
    /// `sent` may be relied on: the TTL less a tenth, for clocks that run at slightly
    /// different rates.
    pub fn trusted_until(&self, sent: Duration) -> Duration {
        sent.saturating_add(self.ttl - self.ttl / 10)
    }

    /// How long until the next round, when another instance's announcement or lease expires
    /// in `other_expires` (by the database's clock; `None`: none does): at its expiry (and a
    /// moment, [`EXPIRY_MARGIN`]) when that comes before the regular round, so a dead or
    /// stalled instance's watches are taken over a TTL after its last renewal, not up to a
    /// third of a TTL later; otherwise [`LeasePolicy::renew_every`].
    pub fn next_round(&self, other_expires: Option<Duration>) -> Duration {
        match other_expires {
            Some(d) if d < self.renew_every() => (d + EXPIRY_MARGIN).min(self.renew_every()),
            _ => self.renew_every(),
        }
    }

    /// Whether a lease last renewed by a request sent at `sent` still holds at `now`.
    pub fn holds(&self, sent: Duration, now: Duration) -> bool {
        now < self.trusted_until(sent)
    }
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            ttl: Duration::from_secs(15),
        }
    }
}

/// How many of `watches` one of `instances` live instances holds at most: the ceiling of the
/// quotient, so that together they cover every watch.
pub fn fair_share(watches: usize, instances: usize) -> usize {
    watches.div_ceil(instances.max(1))
}

/// What one instance does in a round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan<W> {
    /// Watches to try to take (each may be taken by another instance first).
    pub acquire: Vec<W>,
    /// Watches to give back: stopped and committed first, then released.
    pub release: Vec<W>,
}

/// The round's plan for an instance that holds `held` (in the order it took them) while
/// `free` (unowned or expired, in config order) are up for taking, with `share` as its fair
/// share. It takes free watches up to its share and gives back what it holds beyond it, the
/// most recently taken first (so that watches move as little as possible).
pub fn plan<W: Clone>(held: &[W], free: &[W], share: usize) -> Plan<W> {
    if held.len() > share {
        return Plan {
            acquire: Vec::new(),
            release: held[share..].iter().rev().cloned().collect(),
        };
    }
    Plan {
        acquire: free.iter().take(share - held.len()).cloned().collect(),
        release: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_watch() {
        for watches in 0..50 {
            for instances in 1..8 {
                let share = fair_share(watches, instances);
                assert!(share * instances >= watches);
                assert!(share.saturating_sub(1) * instances < watches || watches == 0);
            }
        }
        assert_eq!(fair_share(30, 3), 10);
        assert_eq!(fair_share(30, 2), 15);
        assert_eq!(fair_share(31, 3), 11);
        assert_eq!(fair_share(5, 0), 5);
    }

    #[test]
    fn a_round_comes_when_another_instance_expires_if_that_is_sooner() {
        let p = LeasePolicy {
            ttl: Duration::from_secs(15),
        };
        let ms = Duration::from_millis;
        // Nobody else, or nobody expiring before the regular round: every third of the TTL.
        assert_eq!(p.next_round(None), ms(5000));
        assert_eq!(p.next_round(Some(ms(9000))), ms(5000));
        // A dead instance's lease expires in 1.2 s: the round comes just after.
        assert_eq!(p.next_round(Some(ms(1200))), ms(1250));
        assert_eq!(p.next_round(Some(ms(0))), ms(50));
        assert_eq!(p.next_round(Some(ms(4990))), ms(5000));
    }

    #[test]
    fn a_plan_takes_up_to_the_share_and_gives_back_the_excess() {
        let p = plan(&[1, 2], &[3, 4, 5, 6], 4);
        assert_eq!(p.acquire, vec![3, 4]);
        assert!(p.release.is_empty());
        let p = plan(&[1, 2, 3, 4, 5], &[6], 3);
        assert!(p.acquire.is_empty());
        assert_eq!(p.release, vec![5, 4]);
        assert_eq!(plan::<u8>(&[1, 2, 3], &[], 3), Plan::default());
    }

    #[test]
    fn a_lease_is_trusted_for_less_than_its_ttl_from_the_request() {
        let p = LeasePolicy {
            ttl: Duration::from_secs(10),
        };
        assert_eq!(
            p.renew_every(),
            Duration::from_millis(3333) + Duration::from_nanos(333_333)
        );
        let sent = Duration::from_secs(100);
        assert!(p.holds(sent, Duration::from_secs(108)));
        assert!(!p.holds(sent, Duration::from_secs(109)));
        // A pause (SIGSTOP) past the deadline: the holder knows when it wakes.
        assert!(!p.holds(sent, Duration::from_secs(400)));
    }
}
