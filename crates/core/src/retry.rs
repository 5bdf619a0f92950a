//! Back-off for a handler that failed on one message.
//!
//! A failed message is retried with exponential back-off (doubling from `initial` up to `max`)
//! and never skipped, until `max_attempts` attempts have failed; then it is dead-lettered and
//! the watcher moves on. Attempts are counted in the delivery log, so a restart does not reset
//! the count.

use core::time::Duration;

/// Handler retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// Attempts (including the first) before the message is dead-lettered.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_attempts: 10,
        }
    }
}

/// What to do after a handler failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try the same message again after this delay.
    RetryAfter(Duration),
    /// Give up on this message: record it as dead and move on.
    DeadLetter,
}

impl RetryPolicy {
    /// Decides what follows the `attempts`-th failed attempt (1 = the first attempt failed).
    pub fn after_failure(&self, attempts: u32) -> AfterFailure {
        if attempts >= self.max_attempts.max(1) {
            return AfterFailure::DeadLetter;
        }
        AfterFailure::RetryAfter(self.backoff(attempts))
    }

    /// The wait after the `n`-th failure in a row (1 = the first): `initial`, doubling, at most
    /// `max`.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        self.initial.saturating_mul(1u32 << exp).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_then_dead_letters() {
        let p = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
            max_attempts: 5,
        };
        let seq: Vec<AfterFailure> = (1..=5).map(|a| p.after_failure(a)).collect();
        use AfterFailure::*;
        assert_eq!(
            seq,
            vec![
                RetryAfter(Duration::from_secs(1)),
                RetryAfter(Duration::from_secs(2)),
                RetryAfter(Duration::from_secs(4)),
                RetryAfter(Duration::from_secs(5)),
                DeadLetter
            ]
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let p = RetryPolicy {
            max_attempts: u32::MAX,
            ..RetryPolicy::default()
        };
        assert_eq!(p.after_failure(1000), AfterFailure::RetryAfter(p.max));
    }
}
