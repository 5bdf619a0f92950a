//! Classes of failure and what each means for reconnecting.
//!
//! The driver classifies an error (the error types have a `class()` method); this module
//! decides how long to wait. A failure streak starts at the first failure and continues until
//! a connection has stayed healthy for `stable_after`, so a server that accepts and drops at
//! once is retried along the schedule, not hammered.

use alloc::string::String;

use core::time::Duration;

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

impl FailureClass {
    /// A short lower-case name, for metrics labels and logs.
    pub fn name(&self) -> &'static str {
        match self {
            FailureClass::Network => "network",
            FailureClass::Bye => "bye",
            FailureClass::Throttled(_) => "throttled",
            FailureClass::Auth => "auth",
            FailureClass::AuthExpired => "auth_expired",
            FailureClass::Permanent => "permanent",
        }
    }
}

/// The response code (RFC 3501 §7.1, RFC 5530) in a server's text, uppercased without its
/// brackets: `[AUTHENTICATIONFAILED] Authentication failed.` gives `AUTHENTICATIONFAILED`.
/// The code is looked for at the start of the text, or after a `"` (where an IMAP library
/// quoted the text inside its own message).
pub fn response_code(text: &str) -> Option<String> {
    let at = text
        .strip_prefix('[')
        .map(|_| 0)
        .or_else(|| text.find("\"[").map(|i| i + 1))?;
    let rest = &text[at + 1..];
    let code: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    (!code.is_empty()).then(|| code.to_ascii_uppercase())
}

/// What a refused login means. RFC 5530: `AUTHENTICATIONFAILED`, `AUTHORIZATIONFAILED` and
/// `EXPIRED` will not change by retrying soon (and retrying risks locking the account), so
/// they are [`FailureClass::Auth`], which parks; `UNAVAILABLE` and its kin are transient. A
/// refusal without a code is taken for bad credentials.
pub fn login_refused(text: &str) -> FailureClass {
    if let Some(hint) = throttle_hint(text) {
        // Gmail's "Account exceeded command or bandwidth limits" at login: the credentials
        // are fine.
        return FailureClass::Throttled(hint);
    }
    if too_many_connections(text) {
        // The credentials are fine: parking the account as refused would stop every watch
        // of it for `park_for`.
        return FailureClass::Network;
    }
    match response_code(text).as_deref() {
        Some("UNAVAILABLE" | "SERVERBUG" | "INUSE" | "LIMIT" | "OVERQUOTA" | "CONTACTADMIN") => FailureClass::Network,
        _ => FailureClass::Auth,
    }
}

/// What a refused SELECT means: a missing folder or a missing right is permanent (parks); a
/// server that is busy or broken for the moment (`UNAVAILABLE`, `INUSE`, `SERVERBUG`, `LIMIT`)
/// is transient. Without a code it is taken for a missing folder.
pub fn select_refused(text: &str) -> FailureClass {
    if not_connected(text) {
        // Lasting causes (no access) and passing ones (too many connections) look alike:
        // along the schedule, which slows to hourly tries on its own.
        return FailureClass::Network;
    }
    match response_code(text).as_deref() {
        Some("UNAVAILABLE" | "INUSE" | "SERVERBUG" | "LIMIT" | "EXPUNGEISSUED") => FailureClass::Network,
        _ => FailureClass::Permanent,
    }
}

/// A login refused because the user holds too many sessions already: Gmail's `[ALERT] Too
/// many simultaneous connections`, Dovecot's `Maximum number of connections from user+IP
/// exceeded`.
pub fn too_many_connections(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("too many simultaneous connections") || lower.contains("maximum number of connections")
}

/// Exchange Online's `BAD User is authenticated but not connected.`: the login (or token) was
/// accepted, but the mailbox cannot be opened with it: the app or user has no access to that
/// mailbox, the user name is not the mailbox's address, or the mailbox has too many open
/// connections. It comes as the answer to the first mailbox command, followed by BYE.
pub fn not_connected(text: &str) -> bool {
    text.to_ascii_lowercase().contains("authenticated but not connected")
}

/// Whether a refused post-action (STORE, MOVE, COPY, EXPUNGE) will fail again however often it
/// is retried: the target folder is missing (`TRYCREATE`, `NONEXISTENT`), the right is missing
/// (`NOPERM`), the folder is read-only (`READ-ONLY`) or the message is gone.
pub fn post_action_refusal_is_permanent(text: &str) -> bool {
    matches!(
        response_code(text).as_deref(),
        Some("TRYCREATE" | "NONEXISTENT" | "NOPERM" | "READ-ONLY" | "CANNOT" | "OVERQUOTA" | "ALREADYEXISTS")
    )
}

/// How long to wait when a server says it throttles without saying for how long: the pace
/// of the schedule's fast part.
pub const THROTTLE_WAIT: Duration = Duration::from_secs(60);

/// How long to wait when the account is over its provider's bandwidth or command limits
/// (Gmail: `[OVERQUOTA] Account exceeded command or bandwidth limits.`, at login or on a
/// FETCH). Such limits lift over hours; a try costs a login and a listing, no bodies.
pub const OVER_LIMIT_WAIT: Duration = Duration::from_secs(600);

/// Whether a server's text says the account is over its bandwidth or command limits (Gmail).
pub fn over_limit(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("bandwidth limit") || lower.contains("command or bandwidth")
}

/// Reads a server's throttling hint, such as Exchange Online's
/// `Request is throttled. Suggested Backoff Time: 5000 milliseconds`. `None` if the text does
/// not say the request was throttled; `Some(None)` if it does but gives no usable time. An
/// account over its bandwidth limits (see [`over_limit`]) is throttled for [`OVER_LIMIT_WAIT`].
pub fn throttle_hint(text: &str) -> Option<Option<Duration>> {
    if over_limit(text) {
        return Some(Some(OVER_LIMIT_WAIT));
    }
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

/// A session must have lived this long before "access token expired" counts as routine
/// (reconnect at once); a server that ends every session with it sooner is retried along the
/// schedule instead of in a tight loop.
pub const ROUTINE_TOKEN_EXPIRY_AFTER: Duration = Duration::from_secs(60);

/// A session dropped (BYE, a closed or silent connection) after idling this long is routine
/// (Gmail ends IDLE sessions every so often, and so do NAT boxes and firewalls): reconnect at
/// once and end the failure streak, so periodic drops never walk the schedule into its slow
/// part. One dropped sooner is a failure like any other.
pub const ROUTINE_DROP_AFTER: Duration = Duration::from_secs(60);

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
        // `reauthed` is reset with the streak (a stable connection), not here: a server that
        // refuses every fresh session must not earn a new immediate retry each time.
        self.connected_at = Some(now);
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
        let stable = self.is_stable(now);
        if stable {
            self.streak = None;
            self.reauthed = false;
        }
        let connected_at = self.connected_at.take();
        if class == FailureClass::AuthExpired {
            let session_age = connected_at.map(|at| now.saturating_sub(at));
            if was_connected && session_age.is_some_and(|age| age >= ROUTINE_TOKEN_EXPIRY_AFTER) {
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
        if let FailureClass::Throttled(hint) = class {
            // Waiting as long as the server asked is no failure streak: the schedule does not
            // advance, so once the server lets us in again the watch is back at full pace,
            // not in the schedule's hourly part.
            let wait = hint.unwrap_or(THROTTLE_WAIT);
            return wait + wait.mul_f64(0.1 * jitter.clamp(0.0, 0.999));
        }
        let (start, attempts) = *self.streak.get_or_insert((now, 0));
        match class {
            // Bad credentials park too: retrying a refused password on the schedule would
            // trip the provider's lockout for every client of the account.
            FailureClass::Permanent | FailureClass::Auth => {
                self.park_for + self.park_for.mul_f64(0.1 * jitter.clamp(0.0, 0.999))
            }
            _ => {
                let next = self.schedule.next_attempt(now - start, attempts, jitter);
                self.streak = Some((start, next.attempt + 1));
                next.delay
            }
        }
    }

    /// The server ended a session that had been waiting in IDLE for `idled_for`. A drop
    /// (`Network`, `Bye`) after [`ROUTINE_DROP_AFTER`] is routine: at once, and the streak is
    /// over (the session worked); anything else, or sooner, is [`Reconnect::failed`].
    pub fn dropped_in_idle(
        &mut self,
        now: Duration,
        idled_for: Duration,
        class: FailureClass,
        jitter: f64,
    ) -> Duration {
        if matches!(class, FailureClass::Network | FailureClass::Bye) && idled_for >= ROUTINE_DROP_AFTER {
            self.connected_at = None;
            self.streak = None;
            self.reauthed = false;
            return Duration::ZERO;
        }
        self.failed(now, class, jitter)
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

    #[test]
    fn throttling_waits_as_asked_and_never_walks_the_schedule_into_its_slow_part() {
        let mut r = reconnect();
        // A day of a server that keeps throttling without a hint: a minute (plus jitter) each.
        let mut now = s(0);
        for _ in 0..1440 {
            let d = r.failed(now, FailureClass::Throttled(None), 0.5);
            assert!(d >= THROTTLE_WAIT && d <= THROTTLE_WAIT.mul_f64(1.1), "{d:?}");
            now += d;
        }
        // Then a plain network failure starts the schedule from its beginning (at once).
        assert_eq!(r.failed(now, FailureClass::Network, 0.0), s(0));
    }

    #[test]
    fn gmail_over_its_bandwidth_limits_waits_ten_minutes_at_login_or_fetch() {
        for text in [
            "[OVERQUOTA] Account exceeded command or bandwidth limits.",
            "[ALERT] Account exceeded command or bandwidth limits. (Failure)",
            "Account has exceeded the Gmail bandwidth limit for downloads via IMAP",
        ] {
            assert_eq!(throttle_hint(text), Some(Some(OVER_LIMIT_WAIT)), "{text}");
            // At login it is no refusal of the credentials (which would park the account).
            assert_eq!(
                login_refused(text),
                FailureClass::Throttled(Some(OVER_LIMIT_WAIT)),
                "{text}"
            );
        }
        let mut r = reconnect();
        let mut now = s(0);
        for _ in 0..100 {
            let d = r.failed(now, FailureClass::Throttled(Some(OVER_LIMIT_WAIT)), 0.0);
            assert_eq!(d, OVER_LIMIT_WAIT);
            now += d;
        }
    }

    #[test]
    fn periodic_drops_in_idle_reconnect_at_once_and_early_ones_follow_the_schedule() {
        let mut r = reconnect();
        let mut now = s(0);
        // Fifty sessions each dropped after five minutes of IDLE (Gmail, a NAT box): never a
        // wait, and the streak ends with each (the session worked).
        for _ in 0..50 {
            r.connected(now);
            now += s(300);
            for class in [FailureClass::Bye, FailureClass::Network] {
                assert_eq!(r.dropped_in_idle(now, s(290), class, 0.9), s(0));
            }
            assert_eq!(r.attempts(), 0);
        }
        // Dropped within seconds of entering IDLE, again and again: the schedule, which
        // slows down (at once, then about a minute apart).
        let mut waits = Vec::new();
        for _ in 0..4 {
            r.connected(now);
            now += s(5);
            let d = r.dropped_in_idle(now, s(3), FailureClass::Bye, 0.0);
            waits.push(d);
            now += d;
        }
        assert_eq!(waits[0], s(0));
        assert!(waits[1..].iter().all(|d| *d >= s(55)), "{waits:?}");
        // Refused credentials are no drop, however long the IDLE lasted.
        assert_eq!(r.dropped_in_idle(now, s(600), FailureClass::Auth, 0.0), s(3600));
    }

    #[test]
    fn a_server_that_expires_every_fresh_session_is_not_hammered() {
        let mut r = reconnect();
        let mut waited = Duration::ZERO;
        let mut now = s(0);
        for _ in 0..20 {
            r.connected(now);
            now += s(1);
            let d = r.failed(now, FailureClass::AuthExpired, 0.0);
            waited += d;
            now += d;
        }
        assert!(
            waited >= s(60),
            "20 sessions ended after 1 s each, waited only {waited:?}"
        );
    }

    #[test]
    fn refused_credentials_park_and_busy_servers_do_not() {
        let mut r = reconnect();
        assert_eq!(r.failed(s(0), FailureClass::Auth, 0.0), s(3600));
        assert_eq!(
            login_refused("[AUTHENTICATIONFAILED] Authentication failed."),
            FailureClass::Auth
        );
        assert_eq!(
            login_refused("code: None, info: Some(\"[AUTHORIZATIONFAILED] no\")"),
            FailureClass::Auth
        );
        assert_eq!(login_refused("Invalid credentials"), FailureClass::Auth);
        assert_eq!(login_refused("[UNAVAILABLE] Try later"), FailureClass::Network);
        // Too many sessions: not a refusal of the credentials.
        assert_eq!(
            login_refused("[ALERT] Too many simultaneous connections. (Failure)"),
            FailureClass::Network
        );
        assert_eq!(
            login_refused("Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)"),
            FailureClass::Network
        );
        assert_eq!(
            select_refused("[NONEXISTENT] Mailbox doesn't exist: X"),
            FailureClass::Permanent
        );
        assert_eq!(select_refused("[NOPERM] no"), FailureClass::Permanent);
        // Exchange: no access to the mailbox, or too many connections: along the schedule.
        assert_eq!(
            select_refused("User is authenticated but not connected."),
            FailureClass::Network
        );
        assert!(not_connected("BAD User is authenticated but not connected."));
        assert!(!not_connected("[NONEXISTENT] no such folder"));
        for code in ["UNAVAILABLE", "INUSE", "SERVERBUG"] {
            assert_eq!(
                select_refused(&format!("[{code}] temporary trouble")),
                FailureClass::Network
            );
        }
        assert!(post_action_refusal_is_permanent(
            "[TRYCREATE] Mailbox doesn't exist: Archiv"
        ));
        assert!(post_action_refusal_is_permanent("[READ-ONLY] read-only"));
        assert!(!post_action_refusal_is_permanent("[UNAVAILABLE] busy"));
        assert!(!post_action_refusal_is_permanent("Internal error"));
        assert_eq!(response_code("no code here"), None);
    }
}
