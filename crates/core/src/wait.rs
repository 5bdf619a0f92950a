//! What a watcher does after a catch-up: IDLE, poll, or recycle the connection.
//!
//! IDLE is re-issued at least every `idle_refresh` (RFC 2177 asks for less than 29 minutes;
//! servers and NATs drop quiet connections sooner). Without IDLE the watcher polls every
//! `poll_interval`. A connection older than `recycle_after` is closed cleanly between two
//! waits and opened again, which also bounds how long a silently broken connection can live.

use core::time::Duration;

/// Timing of the wait between catch-ups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitPolicy {
    pub idle_refresh: Duration,
    pub poll_interval: Duration,
    pub recycle_after: Duration,
    /// IDLE where the server offers it; false: poll every `poll_interval` even then (for a
    /// server whose IDLE is broken or whose notifications lag behind polling).
    pub use_idle: bool,
    /// The account's notifier (one NOTIFY session for its folders, RFC 5465) tells the watch
    /// of news: between catch-ups it holds no session of its own (it waits at most
    /// `idle_refresh`, then catches up anyway). Where the server has no NOTIFY, the watch
    /// waits on a session of its own, as without it.
    pub notify: bool,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy {
            idle_refresh: Duration::from_secs(600),
            poll_interval: Duration::from_secs(60),
            recycle_after: Duration::from_secs(3600),
            use_idle: true,
            notify: false,
        }
    }
}

/// The next wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Enter IDLE and leave it after at most this long.
    Idle(Duration),
    /// Sleep this long, then catch up (a NOOP first lets the server report changes).
    Poll(Duration),
    /// Log out and connect again now.
    Recycle,
}

/// Decides the next wait for a connection that has been up for `connected_for`. With OAuth2,
/// `token_left` is the time until the session's access token is due for refresh: the
/// connection is recycled (between waits, never mid-delivery) before the token expires.
pub fn next_wait(
    policy: &WaitPolicy,
    server_has_idle: bool,
    connected_for: Duration,
    token_left: Option<Duration>,
) -> Wait {
    let age_left = policy.recycle_after.saturating_sub(connected_for);
    let left = token_left.map_or(age_left, |t| t.min(age_left));
    if left.is_zero() {
        return Wait::Recycle;
    }
    if server_has_idle {
        Wait::Idle(policy.idle_refresh.min(left))
    } else {
        Wait::Poll(policy.poll_interval.min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn idles_polls_and_recycles() {
        let p = WaitPolicy::default();
        assert_eq!(next_wait(&p, true, s(0), None), Wait::Idle(s(600)));
        assert_eq!(next_wait(&p, false, s(0), None), Wait::Poll(s(60)));
        // The wait never outlives the connection's age limit.
        assert_eq!(next_wait(&p, true, s(3590), None), Wait::Idle(s(10)));
        assert_eq!(next_wait(&p, true, s(3600), None), Wait::Recycle);
    }

    #[test]
    fn the_token_bounds_the_session() {
        let p = WaitPolicy::default();
        assert_eq!(next_wait(&p, true, s(0), Some(s(16))), Wait::Idle(s(16)));
        assert_eq!(next_wait(&p, false, s(0), Some(s(16))), Wait::Poll(s(16)));
        assert_eq!(next_wait(&p, true, s(0), Some(s(0))), Wait::Recycle);
        assert_eq!(next_wait(&p, true, s(3595), Some(s(16))), Wait::Idle(s(5)));
    }
}
