//! The reconnect schedule.
//!
//! A schedule is a list of stages, each "retry every `every` until `until` has passed since the
//! first failure". The default is the seed's: at once, then every minute until 10 minutes have
//! passed, then every 10 minutes until an hour, then hourly. A stage without `until` lasts
//! forever; if the last stage has an `until`, its `every` goes on after it.
//!
//! The schedule is expressed as retry *offsets* measured from the first failure of a streak:
//! the default gives 0 s, 1 m, 2 m, … 10 m, 20 m, … 60 m, 2 h, 3 h, … Each offset is used at most
//! once, and an offset that has already passed (because an attempt itself took long) is skipped,
//! so a slow server never turns the schedule into a tight loop.

use alloc::{vec, vec::Vec};

use core::time::Duration;

/// One stage of a reconnect schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage {
    /// Time between two attempts in this stage. Zero means "once, at the start of the stage".
    pub every: Duration,
    /// Elapsed time since the first failure at which this stage ends; `None` = never.
    pub until: Option<Duration>,
}

/// Why a list of stages is not a usable schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    /// The list is empty.
    Empty,
    /// Stage `index` ends before the previous one does.
    NotIncreasing { index: usize },
    /// Stage `index` has `every = 0` but lasts for a while: that would be a tight loop.
    ZeroIntervalSpan { index: usize },
    /// Stage `index` comes after a stage that never ends.
    AfterEndless { index: usize },
    /// The last stage has `every = 0`, so there would be nothing to continue with.
    ZeroIntervalLast,
}

impl core::fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ScheduleError::Empty => write!(f, "the schedule has no stages"),
            ScheduleError::NotIncreasing { index } => {
                write!(f, "stage {} ends before the stage before it", index + 1)
            }
            ScheduleError::ZeroIntervalSpan { index } => write!(
                f,
                "stage {} has every = 0s but lasts beyond its start (a tight loop)",
                index + 1
            ),
            ScheduleError::AfterEndless { index } => {
                write!(f, "stage {} follows a stage without `until`", index + 1)
            }
            ScheduleError::ZeroIntervalLast => {
                write!(f, "the last stage must have every > 0s")
            }
        }
    }
}

impl core::error::Error for ScheduleError {}

/// A validated reconnect schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    stages: Vec<Stage>,
}

impl Default for Schedule {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        Schedule {
            stages: vec![
                Stage {
                    every: Duration::ZERO,
                    until: Some(Duration::ZERO),
                },
                Stage {
                    every: m(1),
                    until: Some(m(10)),
                },
                Stage {
                    every: m(10),
                    until: Some(m(60)),
                },
                Stage {
                    every: m(60),
                    until: None,
                },
            ],
        }
    }
}

/// When to try the next connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextAttempt {
    /// How long to wait from now.
    pub delay: Duration,
    /// Index of the attempt (0 = the first retry after the first failure); pass
    /// `attempt + 1` as `attempts_made` next time.
    pub attempt: u32,
}

impl Schedule {
    /// Builds a schedule from stages, rejecting shapes that would loop tightly or go backwards.
    pub fn new(stages: Vec<Stage>) -> Result<Schedule, ScheduleError> {
        if stages.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let mut start = Duration::ZERO;
        for (index, stage) in stages.iter().enumerate() {
            if index > 0 && stages[index - 1].until.is_none() {
                return Err(ScheduleError::AfterEndless { index });
            }
            if let Some(until) = stage.until {
                if until < start {
                    return Err(ScheduleError::NotIncreasing { index });
                }
                if stage.every.is_zero() && until > start {
                    return Err(ScheduleError::ZeroIntervalSpan { index });
                }
                start = until;
            } else if stage.every.is_zero() {
                return Err(ScheduleError::ZeroIntervalSpan { index });
            }
        }
        if stages.last().is_some_and(|s| s.every.is_zero()) {
            return Err(ScheduleError::ZeroIntervalLast);
        }
        Ok(Schedule { stages })
    }

    /// The stages, as configured.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The offset from the first failure of retry number `n`, and the interval of its stage
    /// (used to size the jitter).
    pub fn offset(&self, n: u32) -> (Duration, Duration) {
        let mut remaining = u64::from(n);
        let mut start = Duration::ZERO;
        for stage in &self.stages {
            if stage.every.is_zero() {
                if remaining == 0 {
                    return (start, Duration::ZERO);
                }
                remaining -= 1;
                continue;
            }
            let count = match stage.until {
                Some(until) => (until.saturating_sub(start)).as_nanos() / stage.every.as_nanos(),
                None => u128::MAX,
            };
            if u128::from(remaining) < count {
                let k = remaining as u32 + 1;
                return (start + stage.every * k, stage.every);
            }
            remaining -= count as u64;
            start = stage.until.unwrap_or(start);
        }
        // Past the last stage: keep its interval forever.
        let every = self.stages.last().map_or(Duration::from_secs(3600), |s| s.every);
        let k = u32::try_from(remaining + 1).unwrap_or(u32::MAX);
        (start.saturating_add(every.saturating_mul(k)), every)
    }

    /// The next attempt of a failure streak.
    ///
    /// `elapsed` is the time since the first failure of the streak, `attempts_made` the number
    /// of retries already made in it, and `jitter` a number in `[0, 1)` supplied by the caller
    /// (so this stays pure); up to 10 % of the stage's interval is added.
    pub fn next_attempt(&self, elapsed: Duration, attempts_made: u32, jitter: f64) -> NextAttempt {
        let mut n = attempts_made;
        // Offsets that passed while earlier attempts were running are skipped, never bunched.
        while self.offset(n).0 < elapsed && n < u32::MAX {
            n += 1;
        }
        let (offset, every) = self.offset(n);
        let jitter = every.mul_f64(0.1 * jitter.clamp(0.0, 0.999));
        NextAttempt {
            delay: offset.saturating_sub(elapsed) + jitter,
            attempt: n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 60;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn default_schedule_matches_the_seed() {
        let s = Schedule::default();
        let offsets: Vec<u64> = (0..20).map(|n| s.offset(n).0.as_secs()).collect();
        let mut expected = vec![0];
        expected.extend((1..=10).map(|k| k * M));
        expected.extend([20 * M, 30 * M, 40 * M, 50 * M, 60 * M]);
        expected.extend([120 * M, 180 * M, 240 * M, 300 * M]);
        assert_eq!(offsets, expected);
    }

    #[test]
    fn first_retry_is_immediate_then_one_minute_apart() {
        let s = Schedule::default();
        let a = s.next_attempt(Duration::ZERO, 0, 0.0);
        assert_eq!(
            a,
            NextAttempt {
                delay: Duration::ZERO,
                attempt: 0
            }
        );
        let b = s.next_attempt(secs(2), 1, 0.0);
        assert_eq!(
            b,
            NextAttempt {
                delay: secs(58),
                attempt: 1
            }
        );
    }

    #[test]
    fn slow_attempts_skip_passed_offsets_without_bursting() {
        let s = Schedule::default();
        // Attempt 1 was due at 1 min but the connect took until 3.5 min: the 2 min and 3 min
        // slots are gone; the next attempt waits for the 4 min slot.
        let a = s.next_attempt(secs(210), 2, 0.0);
        assert_eq!(
            a,
            NextAttempt {
                delay: secs(30),
                attempt: 4
            }
        );
    }

    #[test]
    fn jitter_is_bounded_by_a_tenth_of_the_interval() {
        let s = Schedule::default();
        let a = s.next_attempt(secs(61), 2, 0.999);
        assert!(a.delay >= secs(59) && a.delay < secs(59 + 6), "{a:?}");
    }

    #[test]
    fn hourly_forever_after_the_first_hour() {
        let s = Schedule::default();
        let a = s.next_attempt(secs(10 * 3600 + 5), 25, 0.0);
        assert_eq!(
            a,
            NextAttempt {
                delay: secs(3600 - 5),
                attempt: 25
            }
        );
    }

    #[test]
    fn last_stage_with_until_continues_at_its_interval() {
        let s = Schedule::new(vec![Stage {
            every: secs(1),
            until: Some(secs(3)),
        }])
        .unwrap();
        let offsets: Vec<u64> = (0..5).map(|n| s.offset(n).0.as_secs()).collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn rejects_tight_loops_and_backwards_stages() {
        assert_eq!(Schedule::new(vec![]), Err(ScheduleError::Empty));
        assert_eq!(
            Schedule::new(vec![Stage {
                every: Duration::ZERO,
                until: Some(secs(10))
            }]),
            Err(ScheduleError::ZeroIntervalSpan { index: 0 })
        );
        assert_eq!(
            Schedule::new(vec![
                Stage {
                    every: secs(1),
                    until: Some(secs(10))
                },
                Stage {
                    every: secs(1),
                    until: Some(secs(5))
                },
            ]),
            Err(ScheduleError::NotIncreasing { index: 1 })
        );
        assert_eq!(
            Schedule::new(vec![
                Stage {
                    every: secs(1),
                    until: None
                },
                Stage {
                    every: secs(2),
                    until: None
                },
            ]),
            Err(ScheduleError::AfterEndless { index: 1 })
        );
    }
}
