//! Classes of failure and what each means for reconnecting.
//!
//! The driver classifies an error (the error types have a `class()` method); this module
//! decides how long to wait. A failure streak starts at the first failure and continues until
//! a connection has stayed healthy for `stable_after`, so a server that accepts and drops at
//! once is retried along the schedule, not hammered.

use std::time::Duration;

use crate::schedule::Schedule;

/// What kind of failure ended a connection (or prevented one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// TCP/TLS trouble, a deadline that passed, an unexpected close.
    Network,
    /// The server said BYE.
    Bye,
    /// The server asked us to slow down, maybe with a hint.
    Throttled(Option<Duration>),
    /// Authentication was refused.
    Auth,
    /// The access token expired or was refused (OAuth2): get a fresh token and reconnect at
    /// once, not along the schedule; only a repeat within one streak follows the schedule.
    AuthExpired,
    /// Retrying soon cannot help: the folder is missing, permission is denied, the config is
    /// wrong. The watch is parked and retried rarely.
    Permanent,
}

/// Reads a server's throttling hint, such as Exchange Online's
/// `Request is throttled. Suggested Backoff Time: 5000 milliseconds`. `None` if the text does
/// not say the request was throttled; `Some(None)` if it does but gives no usable time.
pub fn throttle_hint(text: &str) -> Option<Option<Duration>> {
    let lower = text.to_ascii_lowercase();
    if !lower.contains("throttl") {
        return None;
    }
    let Some(at) = lower.find("backoff time:") else {
        return Some(None);
    };
    let rest = lower[at + "backoff time:".len()..].trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = match digits.parse() {
        Ok(n) => n,
        Err(_) => return Some(None),
    };
    let unit = rest[digits.len()..].trim_start();
    let d = if unit.starts_with("ms") || unit.starts_with("milli") {
        Duration::from_millis(n)
    } else if unit.starts_with('s') {
        Duration::from_secs(n)
    } else {
        Duration::from_millis(n)
    };
    // A hint is advice from a server that may be broken: never wait more than an hour on it.
    Some(Some(d.min(Duration::from_secs(3600))))
}

/// Reconnect state of one watcher. Times are offsets from any fixed origin chosen by the
/// driver (it passes `Instant::now() - origin`), so this stays pure.
#[derive(Clone, Debug)]
pub struct Reconnect {
    schedule: Schedule,
    stable_after: Duration,
    park_for: Duration,
    streak: Option<(Duration, u32)>,
    connected_at: Option<Duration>,
    /// An immediate re-authentication was already used in this streak.
    reauthed: bool,
}

impl Reconnect {
    pub fn new(schedule: Schedule, stable_after: Duration, park_for: Duration) -> Reconnect {
        Reconnect {
            reauthed: false,
            schedule,
            stable_after,
            park_for,
            streak: None,
            connected_at: None,
        }
    }

    /// A session was established (logged in and folder selected) at `now`.
    pub fn connected(&mut self, now: Duration) {
        self.connected_at = Some(now);
        self.reauthed = false;
    }

    /// The connection has been healthy long enough that the streak is over.
    pub fn is_stable(&self, now: Duration) -> bool {
        self.connected_at
            .is_some_and(|at| now.saturating_sub(at) >= self.stable_after)
    }

    /// The number of failures in the current streak.
    pub fn attempts(&self) -> u32 {
        self.streak.map_or(0, |(_, n)| n)
    }

    /// A connection failed (or could not be made) at `now`; returns how long to wait before the
    /// next attempt. `jitter` is a number in `[0, 1)`.
    pub fn failed(&mut self, now: Duration, class: FailureClass, jitter: f64) -> Duration {
        let was_connected = self.connected_at.is_some();
        if self.is_stable(now) {
            self.streak = None;
            self.reauthed = false;
        }
        self.connected_at = None;
        if class == FailureClass::AuthExpired {
            if was_connected {
                // A token that expired under a working session is routine, not a failure.
                return Duration::ZERO;
            }
            if !self.reauthed {
                // Refused at login: one immediate retry with a fresh token, counted as the
                // streak's first attempt so that a repeat follows the schedule.
                self.reauthed = true;
                let (start, attempts) = *self.streak.get_or_insert((now, 0));
                self.streak = Some((start, attempts + 1));
                return Duration::ZERO;
            }
        }
        let (start, attempts) = *self.streak.get_or_insert((now, 0));
        let delay = match class {
            FailureClass::Permanent => self.park_for + self.park_for.mul_f64(0.1 * jitter.clamp(0.0, 0.999)),
            _ => {
                let next = self.schedule.next_attempt(now - start, attempts, jitter);
                self.streak = Some((start, next.attempt + 1));
                next.delay
            }
        };
        match class {
            FailureClass::Throttled(Some(hint)) => delay.max(hint),
            _ => delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn reconnect() -> Reconnect {
        Reconnect::new(Schedule::default(), s(300), s(3600))
    }

    #[test]
    fn exchange_throttle_hints_are_read() {
        let t = "A3 BAD Request is throttled. Suggested Backoff Time: 5000 milliseconds";
        assert_eq!(throttle_hint(t), Some(Some(Duration::from_millis(5000))));
        assert_eq!(throttle_hint("NO [THROTTLED] slow down"), Some(None));
        assert_eq!(
            throttle_hint("Suggested Backoff Time: 9 seconds (throttled)"),
            Some(Some(s(9)))
        );
        assert_eq!(throttle_hint("NO Mailbox does not exist"), None);
        assert_eq!(
            throttle_hint("throttled; Suggested Backoff Time: 99999999999 seconds"),
            Some(Some(s(3600)))
        );
    }

    #[test]
    fn flapping_server_walks_the_schedule() {
        let mut r = reconnect();
        assert_eq!(r.failed(s(0), FailureClass::Network, 0.0), s(0));
        // Connected again at once but dropped after 5 s: still the same streak.
        r.connected(s(1));
        assert_eq!(r.failed(s(6), FailureClass::Bye, 0.0), s(54));
        r.connected(s(61));
        assert_eq!(r.failed(s(70), FailureClass::Network, 0.0), s(50));
    }

    #[test]
    fn a_stable_connection_resets_the_streak() {
        let mut r = reconnect();
        r.failed(s(0), FailureClass::Network, 0.0);
        r.failed(s(1), FailureClass::Network, 0.0);
        r.connected(s(60));
        assert_eq!(r.failed(s(60 + 301), FailureClass::Network, 0.0), s(0));
        assert_eq!(r.attempts(), 1);
    }

    #[test]
    fn expired_tokens_reconnect_at_once_but_never_loop() {
        let mut r = reconnect();
        r.connected(s(0));
        // Expired mid-session: immediately, as often as it happens to working sessions.
        assert_eq!(r.failed(s(100), FailureClass::AuthExpired, 0.0), s(0));
        r.connected(s(100));
        assert_eq!(r.failed(s(200), FailureClass::AuthExpired, 0.0), s(0));
        // Refused right at login, twice in a row: the second follows the schedule.
        assert_eq!(r.failed(s(201), FailureClass::AuthExpired, 0.0), s(0));
        assert!(r.failed(s(202), FailureClass::AuthExpired, 0.0) > s(0));
    }

    #[test]
    fn permanent_failures_park_and_throttle_hints_are_honoured() {
        let mut r = reconnect();
        assert_eq!(r.failed(s(0), FailureClass::Permanent, 0.0), s(3600));
        let mut r = reconnect();
        assert_eq!(r.failed(s(0), FailureClass::Throttled(Some(s(7))), 0.0), s(7));
    }
}
