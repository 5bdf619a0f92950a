//! The PostgreSQL store (`state = "postgres://..."`, feature `postgres`): the same tables and
//! the same contract as the SQLite store, for instances that share their state. A commit is
//! durable when it returns (PostgreSQL's default `synchronous_commit = on`; the store refuses
//! to run against a server or role where it is off).
//!
//! Text from a server (Message-IDs, errors) may hold NUL bytes, which PostgreSQL's `TEXT`
//! cannot: they are written as U+FFFD, so that no message can make every commit fail.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use inboxd_core::checkpoint::Checkpoint;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row};

use super::{CheckpointRow, Delivery, DeliveryStatus, LeaseRow, Store, StoreError, StoreResult};

/// Migrations, applied in order at start-up under an advisory lock (instances starting
/// together take turns); `inboxd_migrations` records those that ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_init.sql"),
    include_str!("../../migrations/postgres/0002_leases.sql"),
    include_str!("../../migrations/postgres/0003_accounts.sql"),
    include_str!("../../migrations/postgres/0004_target_key.sql"),
];

/// The channel on which every change of the `accounts` table is announced.
pub const ACCOUNTS_CHANNEL: &str = "inboxd_accounts";

/// An account stored in the database: its sealed config text and, in clear, what a listing
/// shows.
#[derive(Clone, Debug)]
pub struct StoredAccount {
    pub name: String,
    pub sealed: Vec<u8>,
    pub host: String,
    pub user: String,
    pub folders: Vec<String>,
    /// Unix seconds.
    pub updated_at: i64,
    pub updated_by: String,
}

/// The advisory lock key that serialises migrations ("inboxd" in ASCII).
const MIGRATION_LOCK: i64 = 0x0069_6e62_6f78_0064;

fn err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError {
        what,
        source: Box::new(e),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// This process as instances and sessions name it: `inboxd <pid> on <host>`.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("inboxd {} on {}", std::process::id(), host.trim())
}

/// `TEXT` holds no NUL byte.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The PostgreSQL checkpoint store.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// With a fence, every write of the watch's state is conditional on its lease.
    fence: Option<Arc<Fence>>,
}

/// A lease this instance holds on one watch, as the store checks it: every commit, log write
/// and post-action record of the watch runs only if (owner, epoch) still holds the lease,
/// unexpired by the database's clock, in the same transaction (which also keeps a takeover
/// waiting until it ends).
#[derive(Debug)]
pub struct Fence {
    pub account: String,
    pub folder: String,
    pub owner: String,
    pub epoch: i64,
    /// Until when the holder's own monotonic clock trusts the lease (see
    /// `inboxd_core::lease::LeasePolicy::trusted_until`); deliveries stop after it.
    trusted_until: Mutex<Instant>,
}

impl Fence {
    pub fn new(account: &str, folder: &str, owner: &str, epoch: i64, trusted_until: Instant) -> Fence {
        Fence {
            account: account.to_string(),
            folder: folder.to_string(),
            owner: owner.to_string(),
            epoch,
            trusted_until: Mutex::new(trusted_until),
        }
    }

    /// A renewal succeeded: the lease is trusted until `until`.
    pub fn trust_until(&self, until: Instant) {
        *self.trusted_until.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }

    /// The lease is lost: nothing more is delivered under it.
    pub fn revoke(&self) {
        self.trust_until(Instant::now());
    }

    pub fn holds(&self) -> bool {
        Instant::now() < *self.trusted_until.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for PgStore {
    /// The pool's options hold the password: not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects and applies pending migrations. `url` is a `postgres://` URL (libpq's form,
    /// with its `PG*` environment defaults).
    pub async fn open(url: &str) -> StoreResult<PgStore> {
        let options: PgConnectOptions = url.parse().map_err(err("parse the PostgreSQL URL"))?;
        PgStore::connect(options).await
    }

    pub async fn connect(options: PgConnectOptions) -> StoreResult<PgStore> {
        // The session name tells an operator who this is.
        let options = options.application_name(&instance_name());
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(err("connect"))?;
        let store = PgStore { pool, fence: None };
        store.check_durability().await?;
        store.migrate().await?;
        Ok(store)
    }

    /// A commit must be on disk when it returns: `synchronous_commit = off` would acknowledge
    /// messages a crash of the database can lose (`local` and the replica levels flush the
    /// primary's WAL, which is enough).
    async fn check_durability(&self) -> StoreResult<()> {
        let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&self.pool)
            .await
            .map_err(err("check synchronous_commit"))?;
        if setting == "off" {
            return Err(StoreError {
                what: "check synchronous_commit",
                source: "the server or role has synchronous_commit = off: a commit could be lost after it returned; set it to on for inboxd's role".into(),
            });
        }
        Ok(())
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(err("migrate"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(err("migrate"))?;
        // Created only when missing: `IF NOT EXISTS` would log a notice at every start.
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('inboxd_migrations') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await
            .map_err(err("migrate"))?;
        if !exists {
            sqlx::raw_sql("CREATE TABLE inboxd_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)")
                .execute(&mut *tx)
                .await
                .map_err(err("migrate"))?;
        }
        let done: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0)::BIGINT FROM inboxd_migrations")
            .fetch_one(&mut *tx)
            .await
            .map_err(err("migrate"))?;
        if done > MIGRATIONS.len() as i64 {
            return Err(StoreError {
                what: "migrate",
                source: format!(
                    "the database is at schema version {done}, newer than this inboxd knows ({}); run the newer inboxd",
                    MIGRATIONS.len()
                )
                .into(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(done.max(0) as usize) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(err("migrate"))?;
            sqlx::query("INSERT INTO inboxd_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(i as i32 + 1)
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(err("migrate"))?;
        }
        tx.commit().await.map_err(err("migrate"))
    }

    /// The same store, writing one watch's state only under `fence`.
    pub fn fenced(&self, fence: Arc<Fence>) -> PgStore {
        PgStore {
            pool: self.pool.clone(),
            fence: Some(fence),
        }
    }

    /// Checks, inside a write transaction, that the fence's lease still holds, and keeps it
    /// from being taken over until the transaction ends (`FOR SHARE` on its row).
    async fn check_fence(&self, conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let Some(f) = &self.fence else {
            return Ok(());
        };
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT epoch FROM leases WHERE account = $1 AND folder = $2 AND owner = $3 AND epoch = $4
               AND expires_at > now() FOR SHARE",
        )
        .bind(&f.account)
        .bind(&f.folder)
        .bind(&f.owner)
        .bind(f.epoch)
        .fetch_optional(&mut *conn)
        .await?;
        if held.is_none() {
            f.revoke();
            return Err(sqlx::Error::Protocol(format!(
                "this instance no longer holds the lease on {}/{} (epoch {}): another instance may own the watch; nothing was written",
                f.account, f.folder, f.epoch
            )));
        }
        Ok(())
    }

    /// Announces this instance (or keeps it announced) for `ttl`; returns how many instances
    /// are live, this one included.
    pub async fn heartbeat(&self, id: &str, name: &str, ttl: Duration) -> StoreResult<usize> {
        let mut tx = self.pool.begin().await.map_err(err("heartbeat"))?;
        sqlx::query(
            "INSERT INTO instances (id, name, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(id)
        .bind(text(name))
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(err("heartbeat"))?;
        // Instances gone for an hour are forgotten.
        sqlx::query("DELETE FROM instances WHERE expires_at < now() - interval '1 hour'")
            .execute(&mut *tx)
            .await
            .map_err(err("heartbeat"))?;
        let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE expires_at > now()")
            .fetch_one(&mut *tx)
            .await
            .map_err(err("heartbeat"))?;
        tx.commit().await.map_err(err("heartbeat"))?;
        Ok(live.max(1) as usize)
    }

    /// This instance leaves: its announcement and its leases go (call after its watches
    /// stopped and committed), so the others take over at once instead of after the TTL.
    pub async fn leave(&self, id: &str) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(err("leave"))?;
        sqlx::query("UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(err("leave"))?;
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(err("leave"))?;
        tx.commit().await.map_err(err("leave"))
    }

    /// Renews the leases this instance holds, each for `ttl` from now; returns those renewed.
    /// A lease that expired (or was taken) is not renewed: it is lost.
    pub async fn renew(
        &self,
        id: &str,
        ttl: Duration,
        held: &[(String, String, i64)],
    ) -> StoreResult<Vec<(String, String)>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let accounts: Vec<&str> = held.iter().map(|h| h.0.as_str()).collect();
        let folders: Vec<&str> = held.iter().map(|h| h.1.as_str()).collect();
        let epochs: Vec<i64> = held.iter().map(|h| h.2).collect();
        let rows = sqlx::query(
            "UPDATE leases l SET expires_at = now() + make_interval(secs => $2)
             FROM UNNEST($3::TEXT[], $4::TEXT[], $5::BIGINT[]) AS h(account, folder, epoch)
             WHERE l.account = h.account AND l.folder = h.folder AND l.epoch = h.epoch
               AND l.owner = $1 AND l.expires_at > now()
             RETURNING l.account, l.folder",
        )
        .bind(id)
        .bind(ttl.as_secs_f64())
        .bind(&accounts)
        .bind(&folders)
        .bind(&epochs)
        .fetch_all(&self.pool)
        .await
        .map_err(err("renew leases"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(err("renew leases"))
    }

    /// Of these watches, those nobody holds: never leased, released, or expired.
    pub async fn free_watches(&self, watches: &[(String, String)]) -> StoreResult<Vec<(String, String)>> {
        let held: Vec<(String, String)> =
            sqlx::query_as("SELECT account, folder FROM leases WHERE owner IS NOT NULL AND expires_at > now()")
                .fetch_all(&self.pool)
                .await
                .map_err(err("read leases"))?;
        let held: std::collections::HashSet<(String, String)> = held.into_iter().collect();
        Ok(watches.iter().filter(|w| !held.contains(*w)).cloned().collect())
    }

    /// How long until the first announcement or lease of another instance than `id` expires
    /// (by the database's clock), if any is live: the next round may take what it frees.
    pub async fn next_expiry(&self, id: &str) -> StoreResult<Option<Duration>> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM MIN(t) - now())::float8 FROM (
               SELECT expires_at AS t FROM instances WHERE id <> $1 AND expires_at > now()
               UNION ALL
               SELECT expires_at FROM leases WHERE owner IS NOT NULL AND owner <> $1 AND expires_at > now()
             ) x",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .map_err(err("read leases"))?;
        Ok(secs
            .filter(|s| s.is_finite())
            .map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// Takes the lease on a watch if nobody holds it (never leased, released, or expired by
    /// the database's clock); returns the new epoch, one above the last owner's.
    pub async fn acquire(&self, id: &str, ttl: Duration, account: &str, folder: &str) -> StoreResult<Option<i64>> {
        sqlx::query_scalar(
            "INSERT INTO leases (account, folder, owner, epoch, acquired_at, expires_at)
             VALUES ($1, $2, $3, 1, now(), now() + make_interval(secs => $4))
             ON CONFLICT (account, folder) DO UPDATE SET owner = excluded.owner, epoch = leases.epoch + 1,
               acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
             WHERE leases.owner IS NULL OR leases.expires_at <= now()
             RETURNING epoch",
        )
        .bind(text(account))
        .bind(text(folder))
        .bind(id)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(err("acquire lease"))
    }

    /// Gives a lease back (after the watch stopped and committed): the next owner may start
    /// at once.
    pub async fn release(&self, id: &str, account: &str, folder: &str, epoch: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE leases SET owner = NULL, expires_at = '-infinity'
             WHERE account = $1 AND folder = $2 AND owner = $3 AND epoch = $4",
        )
        .bind(text(account))
        .bind(text(folder))
        .bind(id)
        .bind(epoch)
        .execute(&self.pool)
        .await
        .map_err(err("release lease"))?;
        Ok(())
    }

    /// Stores an account (replacing one of the same name only if `replace`) and notifies the
    /// running instances, in one transaction. Returns false if it exists and `replace` is not
    /// set.
    pub async fn put_account(&self, a: &StoredAccount, replace: bool) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(err("store account"))?;
        let sql = if replace {
            "INSERT INTO accounts (name, sealed, host, user_name, folders, updated_by) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET sealed = EXCLUDED.sealed, host = EXCLUDED.host,
               user_name = EXCLUDED.user_name, folders = EXCLUDED.folders, updated_at = now(),
               updated_by = EXCLUDED.updated_by"
        } else {
            "INSERT INTO accounts (name, sealed, host, user_name, folders, updated_by) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO NOTHING"
        };
        let folders: Vec<String> = a.folders.iter().map(|f| text(f).into_owned()).collect();
        let n = sqlx::query(sql)
            .bind(text(&a.name))
            .bind(&a.sealed)
            .bind(text(&a.host))
            .bind(text(&a.user))
            .bind(&folders)
            .bind(text(&a.updated_by))
            .execute(&mut *tx)
            .await
            .map_err(err("store account"))?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(ACCOUNTS_CHANNEL)
            .bind(text(&a.name))
            .execute(&mut *tx)
            .await
            .map_err(err("store account"))?;
        tx.commit().await.map_err(err("store account"))?;
        Ok(true)
    }

    /// Removes a stored account and notifies the running instances; false if there was none.
    pub async fn remove_account(&self, name: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(err("remove account"))?;
        let n = sqlx::query("DELETE FROM accounts WHERE name = $1")
            .bind(text(name))
            .execute(&mut *tx)
            .await
            .map_err(err("remove account"))?
            .rows_affected();
        if n > 0 {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(ACCOUNTS_CHANNEL)
                .bind(text(name))
                .execute(&mut *tx)
                .await
                .map_err(err("remove account"))?;
        }
        tx.commit().await.map_err(err("remove account"))?;
        Ok(n > 0)
    }

    /// Every stored account, by name.
    pub async fn accounts(&self) -> StoreResult<Vec<StoredAccount>> {
        let rows = sqlx::query(
            "SELECT name, sealed, host, user_name, folders, EXTRACT(EPOCH FROM updated_at)::BIGINT, updated_by
             FROM accounts ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(err("read accounts"))?;
        rows.iter()
            .map(|r| {
                Ok(StoredAccount {
                    name: r.try_get(0)?,
                    sealed: r.try_get(1)?,
                    host: r.try_get(2)?,
                    user: r.try_get(3)?,
                    folders: r.try_get(4)?,
                    updated_at: r.try_get(5)?,
                    updated_by: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(err("read accounts"))
    }

    /// A listener that wakes on every change of the stored accounts.
    pub async fn listen_accounts(&self) -> StoreResult<sqlx::postgres::PgListener> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(err("listen for account changes"))?;
        l.listen(ACCOUNTS_CHANNEL)
            .await
            .map_err(err("listen for account changes"))?;
        Ok(l)
    }

    /// Every lease, with its owner's name.
    pub async fn lease_rows(&self) -> StoreResult<Vec<LeaseRow>> {
        let rows = sqlx::query(
            "SELECT l.account, l.folder, i.name, l.epoch,
                    EXTRACT(EPOCH FROM l.acquired_at)::BIGINT AS acquired,
                    CASE WHEN l.expires_at = '-infinity' THEN NULL ELSE EXTRACT(EPOCH FROM l.expires_at)::BIGINT END AS expires,
                    (l.owner IS NOT NULL AND l.expires_at > now()) AS live
             FROM leases l LEFT JOIN instances i ON i.id = l.owner
             ORDER BY l.account, l.folder",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(err("read leases"))?;
        rows.iter()
            .map(|r| {
                Ok(LeaseRow {
                    account: r.try_get(0)?,
                    folder: r.try_get(1)?,
                    owner: r.try_get(2)?,
                    epoch: r.try_get(3)?,
                    acquired_at: r.try_get(4)?,
                    expires_at: r.try_get(5)?,
                    live: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(err("read leases"))
    }

    /// Writes delivery-log rows, a few hundred per statement.
    async fn write_log(conn: &mut sqlx::PgConnection, log: &[Delivery]) -> Result<(), sqlx::Error> {
        // 13 parameters a row, well inside PostgreSQL's 65,535.
        const ROWS_PER_STATEMENT: usize = 256;
        let t = now();
        for chunk in log.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::QueryBuilder::<Postgres>::new(
                "INSERT INTO deliveries (key, account, folder, uidvalidity, uid, message_id, status, attempts, last_error, first_at, updated_at, route, target_key) ",
            );
            q.push_values(chunk, |mut row, d| {
                row.push_bind(text(&d.key).into_owned())
                    .push_bind(text(&d.account).into_owned())
                    .push_bind(text(&d.folder).into_owned())
                    .push_bind(i64::from(d.uidvalidity))
                    .push_bind(i64::from(d.uid))
                    .push_bind(text(&d.message_id).into_owned())
                    .push_bind(d.status.as_str())
                    .push_bind(i64::from(d.attempts))
                    .push_bind(text(&d.last_error).into_owned())
                    .push_bind(t)
                    .push_bind(t)
                    .push_bind(text(&d.route).into_owned())
                    .push_bind(text(&d.target_key).into_owned());
            });
            q.push(
                " ON CONFLICT (key) DO UPDATE SET message_id = excluded.message_id, status = excluded.status,
                   attempts = excluded.attempts, last_error = excluded.last_error, updated_at = excluded.updated_at,
                   route = CASE WHEN excluded.route = '' THEN deliveries.route ELSE excluded.route END,
                   target_key = CASE WHEN excluded.target_key = '' THEN deliveries.target_key ELSE excluded.target_key END,
                   acknowledged = CASE WHEN excluded.status = 'dead' THEN deliveries.acknowledged ELSE FALSE END",
            );
            q.build().execute(&mut *conn).await?;
        }
        Ok(())
    }
}

fn delivery(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    let status: String = row.try_get("status")?;
    Ok(Delivery {
        key: row.try_get("key")?,
        account: row.try_get("account")?,
        folder: row.try_get("folder")?,
        uidvalidity: row.try_get::<i64, _>("uidvalidity")? as u32,
        uid: row.try_get::<i64, _>("uid")? as u32,
        message_id: row.try_get("message_id")?,
        target_key: row.try_get("target_key")?,
        status: DeliveryStatus::parse(&status).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: "status".into(),
            source: format!("unknown delivery status {status:?} (a newer inboxd wrote this state?)").into(),
        })?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        last_error: row.try_get("last_error")?,
        route: row.try_get("route")?,
        acknowledged: row.try_get("acknowledged")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store for PgStore {
    fn holds_lease(&self) -> bool {
        self.fence.as_ref().is_none_or(|f| f.holds())
    }

    fn leases(&self) -> BoxFuture<'_, StoreResult<Vec<LeaseRow>>> {
        Box::pin(self.lease_rows())
    }

    fn checkpoint<'a>(&'a self, account: &'a str, folder: &'a str) -> BoxFuture<'a, StoreResult<Option<Checkpoint>>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT uidvalidity, last_uid, dedupe_through FROM checkpoints WHERE account = $1 AND folder = $2",
            )
            .bind(text(account))
            .bind(text(folder))
            .fetch_optional(&self.pool)
            .await
            .map_err(err("read checkpoint"))?;
            row.map(|r| {
                Ok(Checkpoint {
                    uidvalidity: r.try_get::<i64, _>(0)? as u32,
                    last_uid: r.try_get::<i64, _>(1)? as u32,
                    dedupe_through: r.try_get::<i64, _>(2)? as u32,
                })
            })
            .transpose()
            .map_err(err("read checkpoint"))
        })
    }

    fn commit<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
        checkpoint: Checkpoint,
        log: &'a [Delivery],
    ) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(err("commit"))?;
            self.check_fence(&mut tx).await.map_err(err("commit"))?;
            Self::write_log(&mut tx, log).await.map_err(err("commit"))?;
            // Compare-and-set: within one UIDVALIDITY the checkpoint never moves backwards.
            let done = sqlx::query(
                "INSERT INTO checkpoints (account, folder, uidvalidity, last_uid, dedupe_through, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (account, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity,
                   last_uid = excluded.last_uid, dedupe_through = excluded.dedupe_through, updated_at = excluded.updated_at
                 WHERE checkpoints.uidvalidity <> excluded.uidvalidity OR checkpoints.last_uid <= excluded.last_uid",
            )
            .bind(text(account))
            .bind(text(folder))
            .bind(i64::from(checkpoint.uidvalidity))
            .bind(i64::from(checkpoint.last_uid))
            .bind(i64::from(checkpoint.dedupe_through))
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(err("commit"))?;
            if done.rows_affected() == 0 {
                // Dropping the transaction rolls the log rows back too.
                return Err(err("commit")(sqlx::Error::Protocol(format!(
                    "the stored checkpoint of {account}/{folder} is ahead of uid {} (another process is delivering from this state?)",
                    checkpoint.last_uid
                ))));
            }
            tx.commit().await.map_err(err("commit"))
        })
    }

    fn record<'a>(&'a self, log: &'a [Delivery]) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(err("record"))?;
            self.check_fence(&mut tx).await.map_err(err("record"))?;
            Self::write_log(&mut tx, log).await.map_err(err("record"))?;
            tx.commit().await.map_err(err("record"))
        })
    }

    fn delivery<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Delivery>>> {
        Box::pin(async move {
            if key.is_empty() {
                return Ok(None);
            }
            // By its own key, or by the key its targets got (Gmail's, which several folders'
            // rows may share: the latest).
            let row = sqlx::query(
                "SELECT * FROM deliveries WHERE key = $1 OR target_key = $1 ORDER BY key = $1 DESC, updated_at DESC LIMIT 1",
            )
                .bind(text(key))
                .fetch_optional(&self.pool)
                .await
                .map_err(err("read delivery"))?;
            row.as_ref().map(delivery).transpose().map_err(err("read delivery"))
        })
    }

    fn failed_attempts<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
    ) -> BoxFuture<'a, StoreResult<std::collections::HashMap<String, u32>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT key, attempts FROM deliveries WHERE status = 'failed' AND account = $1 AND folder = $2",
            )
            .bind(text(account))
            .bind(text(folder))
            .fetch_all(&self.pool)
            .await
            .map_err(err("read deliveries"))?;
            rows.iter()
                .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u32)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(err("read deliveries"))
        })
    }

    fn seen_message_id<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM deliveries WHERE account = $1 AND folder = $2 AND message_id = $3
                 AND status IN ('delivered', 'skipped'))",
            )
            .bind(text(account))
            .bind(text(folder))
            .bind(text(message_id))
            .fetch_one(&self.pool)
            .await
            .map_err(err("read delivery"))
        })
    }

    fn secret<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<(String, String)>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT value, origin FROM secrets WHERE name = $1")
                .bind(text(name))
                .fetch_optional(&self.pool)
                .await
                .map_err(err("read secret"))?;
            row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
                .map_err(err("read secret"))
        })
    }

    fn put_secret<'a>(&'a self, name: &'a str, value: &'a str, origin: &'a str) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO secrets (name, value, origin, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, origin = excluded.origin, updated_at = excluded.updated_at",
            )
            .bind(text(name))
            .bind(text(value))
            .bind(text(origin))
            .bind(now())
            .execute(&self.pool)
            .await
            .map_err(err("write secret"))?;
            Ok(())
        })
    }

    fn checkpoints(&self) -> BoxFuture<'_, StoreResult<Vec<CheckpointRow>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT * FROM checkpoints ORDER BY account, folder")
                .fetch_all(&self.pool)
                .await
                .map_err(err("read checkpoints"))?;
            rows.iter()
                .map(|r| {
                    Ok(CheckpointRow {
                        account: r.try_get("account")?,
                        folder: r.try_get("folder")?,
                        checkpoint: Checkpoint {
                            uidvalidity: r.try_get::<i64, _>("uidvalidity")? as u32,
                            last_uid: r.try_get::<i64, _>("last_uid")? as u32,
                            dedupe_through: r.try_get::<i64, _>("dedupe_through")? as u32,
                        },
                        updated_at: r.try_get("updated_at")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(err("read checkpoints"))
        })
    }

    fn set_post_action<'a>(&'a self, keys: &'a [String], state: &'a str) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let keys: Vec<String> = keys.iter().map(|k| text(k).into_owned()).collect();
            let mut tx = self.pool.begin().await.map_err(err("write post-action"))?;
            self.check_fence(&mut tx).await.map_err(err("write post-action"))?;
            sqlx::query("UPDATE deliveries SET post_action = $2, updated_at = $3 WHERE key = ANY($1)")
                .bind(&keys)
                .bind(text(state))
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(err("write post-action"))?;
            tx.commit().await.map_err(err("write post-action"))
        })
    }

    fn pending_post_actions<'a>(
        &'a self,
        account: &'a str,
        folder: &'a str,
        uidvalidity: u32,
    ) -> BoxFuture<'a, StoreResult<Vec<(u32, String)>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT uid, post_action FROM deliveries WHERE (post_action = 'pending' OR post_action LIKE 'pending %')
                   AND account = $1 AND folder = $2 AND uidvalidity = $3 ORDER BY uid",
            )
            .bind(text(account))
            .bind(text(folder))
            .bind(i64::from(uidvalidity))
            .fetch_all(&self.pool)
            .await
            .map_err(err("read post-actions"))?;
            rows.iter()
                .map(|r| Ok((r.try_get::<i64, _>(0)? as u32, r.try_get::<String, _>(1)?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(err("read post-actions"))
        })
    }

    fn post_action_problems(&self, limit: u32) -> BoxFuture<'_, StoreResult<Vec<(Delivery, String)>>> {
        Box::pin(async move {
            let rows =
                sqlx::query("SELECT * FROM deliveries WHERE post_action <> '' ORDER BY updated_at DESC, key LIMIT $1")
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(err("read post-actions"))?;
            rows.iter()
                .map(|r| Ok((delivery(r)?, r.try_get::<String, _>("post_action")?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(err("read post-actions"))
        })
    }

    fn targets_done<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Vec<String>>> {
        Box::pin(async move {
            sqlx::query_scalar("SELECT target FROM target_deliveries WHERE key = $1 ORDER BY target")
                .bind(text(key))
                .fetch_all(&self.pool)
                .await
                .map_err(err("read target deliveries"))
        })
    }

    fn record_targets<'a>(&'a self, key: &'a str, targets: &'a [String]) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            if targets.is_empty() {
                return Ok(());
            }
            let targets: Vec<String> = targets.iter().map(|t| text(t).into_owned()).collect();
            let mut tx = self.pool.begin().await.map_err(err("record target deliveries"))?;
            self.check_fence(&mut tx)
                .await
                .map_err(err("record target deliveries"))?;
            sqlx::query(
                "INSERT INTO target_deliveries (key, target, at) SELECT $1, t, $3 FROM UNNEST($2::TEXT[]) AS t
                 ON CONFLICT (key, target) DO NOTHING",
            )
            .bind(text(key))
            .bind(&targets)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(err("record target deliveries"))?;
            tx.commit().await.map_err(err("record target deliveries"))
        })
    }

    fn acknowledge<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            let r = sqlx::query("UPDATE deliveries SET acknowledged = TRUE WHERE key = $1 AND status = 'dead'")
                .bind(text(key))
                .execute(&self.pool)
                .await
                .map_err(err("acknowledge"))?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn unacknowledged_dead(&self) -> BoxFuture<'_, StoreResult<Vec<(String, String, u64)>>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT account, folder, COUNT(*) FROM deliveries WHERE status = 'dead' AND NOT acknowledged GROUP BY account, folder ORDER BY account, folder",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(err("read dead letters"))?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get::<i64, _>(2)? as u64)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(err("read dead letters"))
        })
    }

    fn by_status(&self, status: DeliveryStatus, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Delivery>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT * FROM deliveries WHERE status = $1 ORDER BY updated_at DESC, key LIMIT $2")
                .bind(status.as_str())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(err("read deliveries"))?;
            rows.iter()
                .map(delivery)
                .collect::<Result<_, _>>()
                .map_err(err("read deliveries"))
        })
    }
}
