//! The checkpoint store: checkpoints and the delivery log, behind the [`Store`] trait.
//!
//! **Architecture Invariant:** a checkpoint and the delivery-log rows that justify it change
//! in one transaction ([`Store::commit`]), so after a crash the log never claims a delivery the
//! checkpoint does not cover, nor the reverse.

mod lock;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use futures::future::BoxFuture;
use inboxd_core::checkpoint::Checkpoint;

pub use lock::{LockError, StateLock};
#[cfg(feature = "postgres")]
pub use postgres::{ACCOUNTS_CHANNEL, Fence, PgStore, StoredAccount, instance_name};
pub use sqlite::SqliteStore;

/// Opens the state store at `location`.
pub async fn open(location: &crate::config::StateLocation) -> StoreResult<std::sync::Arc<dyn Store>> {
    match location {
        crate::config::StateLocation::File(path) => Ok(std::sync::Arc::new(SqliteStore::open(path).await?)),
        #[cfg(feature = "postgres")]
        crate::config::StateLocation::Postgres(url) => Ok(std::sync::Arc::new(PgStore::open(url).await?)),
        #[cfg(not(feature = "postgres"))]
        crate::config::StateLocation::Postgres(_) => Err(StoreError {
            what: "open",
            source: "this inboxd was built without the `postgres` feature".into(),
        }),
    }
}

/// What the delivery log says about one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// The handler acknowledged it.
    Delivered,
    /// The handler failed; it will be retried.
    Failed,
    /// The handler failed `max_attempts` times; the watcher moved on. `inboxd replay` retries.
    Dead,
    /// Not delivered on purpose: its Message-ID was already delivered (UIDVALIDITY dedupe).
    Skipped,
    /// Listed by the server, then expunged before its body could be fetched.
    Vanished,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Skipped => "skipped",
            DeliveryStatus::Vanished => "vanished",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<DeliveryStatus> {
        Some(match s {
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            "dead" => DeliveryStatus::Dead,
            "skipped" => DeliveryStatus::Skipped,
            "vanished" => DeliveryStatus::Vanished,
            _ => return None,
        })
    }
}

/// One row of the delivery log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub key: String,
    pub account: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    /// Message-ID, or `sha256:<hex>` of the header block when there is none.
    pub message_id: String,
    /// The idempotency key the targets got, where it is not `key`: Gmail's message identity
    /// (`gm1-...`, see the account's `identity`); empty otherwise.
    pub target_key: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_error: String,
    /// Where the routing sent it (`rule "invoices" -> tickets, archive`, `else -> archive`,
    /// `skipped by else`); empty without rules, or when not known (an earlier row stands).
    pub route: String,
    /// A dead letter an operator has set aside (`inboxd ack`); not written by `record`.
    pub acknowledged: bool,
    pub updated_at: i64,
}

/// Who owns a watch, on a store shared by several instances (PostgreSQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub account: String,
    pub folder: String,
    /// The owner's name (`inboxd <pid> on <host>`), if the watch is owned.
    pub owner: Option<String>,
    pub epoch: i64,
    /// Unix seconds.
    pub acquired_at: Option<i64>,
    pub expires_at: Option<i64>,
    /// Whether the lease is unexpired by the database's clock.
    pub live: bool,
}

/// A stored checkpoint with its folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRow {
    pub account: String,
    pub folder: String,
    pub checkpoint: Checkpoint,
    pub updated_at: i64,
}

/// A store that cannot do what was asked; nothing was acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("state store {what} failed")]
pub struct StoreError {
    pub what: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Durable checkpoints and delivery log. Implementations must make [`Store::commit`] atomic and
/// durable before it returns.
pub trait Store: Send + Sync + 'static {
    /// Whether the watch this store writes for may still deliver: true, but for a store
    /// fenced by a lease that its holder's own clock says may have expired (no IO; the
    /// watcher asks before each delivery, and the store's writes check the lease again).
    fn holds_lease(&self) -> bool {
        true
    }

    fn checkpoint<'a>(&'a self, account: &'a str, folder: &'a str) -> BoxFuture<'a, StoreResult<Option<Checkpoint>>>;

    /// Writes the checkpoint and the given delivery-log rows in one transaction.
    fn commit<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
        checkpoint: Checkpoint,
        log: &'a [Delivery],
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// Writes delivery-log rows without touching the checkpoint (failed attempts, replays).
    fn record<'a>(&'a self, log: &'a [Delivery]) -> BoxFuture<'a, StoreResult<()>>;

    fn delivery<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Delivery>>>;

    /// Attempts so far of the messages of a folder that failed and await a retry, by key.
    fn failed_attempts<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
    ) -> BoxFuture<'a, StoreResult<std::collections::HashMap<String, u32>>>;

    /// Whether a message with this Message-ID (or digest) was delivered from this folder
    /// before (under any UIDVALIDITY).
    fn seen_message_id<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, StoreResult<bool>>;

    /// A secret inboxd keeps (a rotated refresh token), with the fingerprint of its origin.
    fn secret<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<(String, String)>>>;

    fn put_secret<'a>(&'a self, name: &'a str, value: &'a str, origin: &'a str) -> BoxFuture<'a, StoreResult<()>>;

    fn checkpoints(&self) -> BoxFuture<'_, StoreResult<Vec<CheckpointRow>>>;

    /// Who owns which watch (a store shared by instances); none for a store of one process.
    fn leases(&self) -> BoxFuture<'_, StoreResult<Vec<LeaseRow>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Sets the post-action state of delivered messages: `""` (done), `"pending"` or
    /// `"pending <after>"` (retry it) or `"failed: <reason>"` (a permanent refusal, shown by
    /// `status`).
    fn set_post_action<'a>(&'a self, keys: &'a [String], state: &'a str) -> BoxFuture<'a, StoreResult<()>>;

    /// UIDs of one folder epoch whose post-action is pending, with their state: `"pending"`
    /// (the watch's `after`) or `"pending <after>"` (a rule's, e.g. `pending move:Done`).
    fn pending_post_actions<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
        uidvalidity: u32,
    ) -> BoxFuture<'a, StoreResult<Vec<(u32, String)>>>;

    /// The targets that acknowledged this message while another did not (fan-out).
    fn targets_done<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Vec<String>>>;

    /// Records that these targets acknowledged the message.
    fn record_targets<'a>(&'a self, key: &'a str, targets: &'a [String]) -> BoxFuture<'a, StoreResult<()>>;

    /// Delivered messages whose post-action is pending or failed: (row, state).
    fn post_action_problems(&self, limit: u32) -> BoxFuture<'_, StoreResult<Vec<(Delivery, String)>>>;

    /// Marks a dead letter as seen by an operator; false if `key` is no dead letter.
    fn acknowledge<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<bool>>;

    /// Dead letters no operator acknowledged, counted per (account, folder).
    fn unacknowledged_dead(&self) -> BoxFuture<'_, StoreResult<Vec<(String, String, u64)>>>;

    /// Delivery-log rows with the given status, newest first.
    fn by_status(&self, status: DeliveryStatus, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Delivery>>>;
}
