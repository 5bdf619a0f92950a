//! What a watcher reports: [`Event`]s to subscribers and [`Health`] snapshots.

use std::time::Duration;

/// Something that happened in a watcher. Subscribe with [`super::Watcher::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Logged in and selected the folder.
    Connected { watch: String },
    /// The session ended; `error` is `None` for a deliberate close (recycle, stop).
    Disconnected {
        watch: String,
        error: Option<String>,
        retry_in: Option<Duration>,
    },
    /// A message was acknowledged by the handler and the checkpoint committed.
    Delivered { watch: String, key: String, uid: u32 },
    /// The handler failed on a message (or its body did not come); it will be retried.
    Failed {
        watch: String,
        key: String,
        uid: u32,
        attempts: u32,
        error: String,
    },
    /// The message was given up on after `max_attempts` (or could not be fetched, or is
    /// larger than `max_message_size`); it was dead-lettered.
    DeadLettered {
        watch: String,
        key: String,
        uid: u32,
        error: String,
    },
    /// The routing skipped a message (a rule's `deliver = "skip"`, or `else = "skip"`); it is
    /// settled and logged as skipped. `route` says which.
    SkippedByRoute {
        watch: String,
        key: String,
        uid: u32,
        route: String,
    },
    /// A message was not delivered because its Message-ID was delivered before.
    SkippedDuplicate { watch: String, key: String, uid: u32 },
    /// A listed message was expunged before its body could be fetched; recorded as vanished.
    Vanished { watch: String, key: String, uid: u32 },
    /// The folder's UIDVALIDITY changed.
    UidValidityChanged { watch: String, old: u32, new: u32 },
    /// A post-action failed; `permanent` ones (e.g. `[TRYCREATE]`) are not retried.
    PostActionFailed {
        watch: String,
        uids: Vec<u32>,
        error: String,
        permanent: bool,
    },
    /// Every message above the checkpoint has been handled.
    CaughtUp { watch: String, last_uid: u32 },
}

/// Upper bounds, in seconds, of the buckets of [`Histogram`] (a last bucket takes the rest).
pub const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A histogram of durations over [`LATENCY_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    pub counts: [u64; LATENCY_BUCKETS.len() + 1],
    pub count: u64,
    pub sum_micros: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum_micros = self
            .sum_micros
            .saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }
}

/// Live health of one watch, for `status` and health endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// What the watch is doing: `connecting`, `catching up`, `idle`, `polling`,
    /// `retrying uid N in Ss`, `waiting Ns to reconnect`, `stopped`, `failed`.
    pub state: String,
    /// The last error (at most about 1 KiB), cleared by the next successful connection.
    pub last_error: Option<String>,
    pub delivered: u64,
    /// Failed delivery attempts (each retry counts).
    pub failed: u64,
    pub dead_lettered: u64,
    /// Messages settled without delivery: skipped by the routing, or duplicates after a
    /// UIDVALIDITY change.
    pub skipped: u64,
    pub reconnects: u64,
    /// Reconnects by failure class (`network`, `bye`, `throttled`, `auth`, `auth_expired`,
    /// `permanent`).
    pub reconnects_by_class: std::collections::BTreeMap<&'static str, u64>,
    pub panics: u64,
    /// Whether a session is up.
    pub connected: bool,
    /// Since when (Unix seconds) the watch has had no session; `None` while connected.
    pub disconnected_since: Option<u64>,
    /// When (Unix seconds) the watch last caught up with its folder.
    pub last_sync: Option<u64>,
    /// When (Unix seconds) a message was last delivered.
    pub last_delivery: Option<u64>,
    /// Messages listed above the checkpoint and not yet settled.
    pub backlog: u64,
    /// The server's INTERNALDATE (Unix seconds) of the oldest of them, when known.
    pub oldest_pending: Option<i64>,
    /// Message bytes fetched.
    pub fetched_bytes: u64,
    /// How long each delivery to the targets took.
    pub handler_seconds: Histogram,
    /// From the server's notification of new mail in IDLE to
    /// the message acknowledged and committed.
    pub new_mail_seconds: Histogram,
}
