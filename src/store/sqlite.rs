//! The embedded SQLite store (the default). WAL journal, `synchronous = FULL`: a commit is on
//! disk when it returns, so a message is never acknowledged before its checkpoint is durable.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use inboxd_core::checkpoint::Checkpoint;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};

use super::{CheckpointRow, Delivery, DeliveryStatus, Store, StoreError, StoreResult};

/// Migrations, applied in order at start-up; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_secrets.sql"),
];

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

/// The SQLite checkpoint store.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies pending migrations. The file is
    /// created with mode 0600: it may later hold rotated refresh tokens.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError {
                what: "create directory",
                source: Box::new(e),
            })?;
        }
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError {
                    what: "create database",
                    source: Box::new(e),
                })?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(err("open"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        // One writer connection: SQLite serialises writers anyway, and one connection keeps
        // transactions from waiting on each other's locks.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(err("open"))?;
        let store = SqliteStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(err("migrate"))?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(err("migrate"))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(err("migrate"))?;
            // The version is our own integer, not input.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {}", i + 1)))
                .execute(&mut *tx)
                .await
                .map_err(err("migrate"))?;
        }
        tx.commit().await.map_err(err("migrate"))
    }

    async fn write_log(tx: &mut Transaction<'_, Sqlite>, log: &[Delivery]) -> Result<(), sqlx::Error> {
        let t = now();
        for d in log {
            sqlx::query(
                "INSERT INTO deliveries (key, account, folder, uidvalidity, uid, message_id, status, attempts, last_error, first_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
                 ON CONFLICT (key) DO UPDATE SET message_id = excluded.message_id, status = excluded.status,
                   attempts = excluded.attempts, last_error = excluded.last_error, updated_at = excluded.updated_at",
            )
            .bind(&d.key)
            .bind(&d.account)
            .bind(&d.folder)
            .bind(i64::from(d.uidvalidity))
            .bind(i64::from(d.uid))
            .bind(&d.message_id)
            .bind(d.status.as_str())
            .bind(i64::from(d.attempts))
            .bind(&d.last_error)
            .bind(t)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

fn delivery(row: &sqlx::sqlite::SqliteRow) -> Result<Delivery, sqlx::Error> {
    let status: String = row.try_get("status")?;
    Ok(Delivery {
        key: row.try_get("key")?,
        account: row.try_get("account")?,
        folder: row.try_get("folder")?,
        uidvalidity: row.try_get::<i64, _>("uidvalidity")? as u32,
        uid: row.try_get::<i64, _>("uid")? as u32,
        message_id: row.try_get("message_id")?,
        status: DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Failed),
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        last_error: row.try_get("last_error")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store for SqliteStore {
    fn checkpoint<'a>(&'a self, account: &'a str, folder: &'a str) -> BoxFuture<'a, StoreResult<Option<Checkpoint>>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT uidvalidity, last_uid, dedupe_through FROM checkpoints WHERE account = ?1 AND folder = ?2",
            )
            .bind(account)
            .bind(folder)
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
            Self::write_log(&mut tx, log).await.map_err(err("commit"))?;
            sqlx::query(
                "INSERT INTO checkpoints (account, folder, uidvalidity, last_uid, dedupe_through, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (account, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity,
                   last_uid = excluded.last_uid, dedupe_through = excluded.dedupe_through, updated_at = excluded.updated_at",
            )
            .bind(account)
            .bind(folder)
            .bind(i64::from(checkpoint.uidvalidity))
            .bind(i64::from(checkpoint.last_uid))
            .bind(i64::from(checkpoint.dedupe_through))
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(err("commit"))?;
            tx.commit().await.map_err(err("commit"))
        })
    }

    fn record<'a>(&'a self, log: &'a [Delivery]) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(err("record"))?;
            Self::write_log(&mut tx, log).await.map_err(err("record"))?;
            tx.commit().await.map_err(err("record"))
        })
    }

    fn delivery<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Delivery>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT * FROM deliveries WHERE key = ?1")
                .bind(key)
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
                "SELECT key, attempts FROM deliveries WHERE status = 'failed' AND account = ?1 AND folder = ?2",
            )
            .bind(account)
            .bind(folder)
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
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM deliveries WHERE account = ?1 AND folder = ?2 AND message_id = ?3
                 AND status IN ('delivered', 'dead', 'skipped')",
            )
            .bind(account)
            .bind(folder)
            .bind(message_id)
            .fetch_one(&self.pool)
            .await
            .map_err(err("read delivery"))?;
            Ok(n > 0)
        })
    }

    fn secret<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<(String, String)>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT value, origin FROM secrets WHERE name = ?1")
                .bind(name)
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
                "INSERT INTO secrets (name, value, origin, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, origin = excluded.origin, updated_at = excluded.updated_at",
            )
            .bind(name)
            .bind(value)
            .bind(origin)
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

    fn by_status(&self, status: DeliveryStatus, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Delivery>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT * FROM deliveries WHERE status = ?1 ORDER BY updated_at DESC, key LIMIT ?2")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn d(key: &str, status: DeliveryStatus, mid: &str) -> Delivery {
        Delivery {
            key: key.into(),
            account: "a".into(),
            folder: "INBOX".into(),
            uidvalidity: 1,
            uid: 1,
            message_id: mid.into(),
            status,
            attempts: 1,
            last_error: String::new(),
            updated_at: 0,
        }
    }

    #[tokio::test]
    async fn commit_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.checkpoint("a", "INBOX").await.unwrap(), None);
        let cp = Checkpoint {
            uidvalidity: 9,
            last_uid: 4,
            dedupe_through: 0,
        };
        store
            .commit("a", "INBOX", cp, &[d("k1", DeliveryStatus::Delivered, "<m1>")])
            .await
            .unwrap();
        drop(store);
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.checkpoint("a", "INBOX").await.unwrap(), Some(cp));
        assert!(store.seen_message_id("a", "INBOX", "<m1>").await.unwrap());
        assert!(!store.seen_message_id("a", "INBOX", "<m2>").await.unwrap());
        store.record(&[d("k2", DeliveryStatus::Dead, "<m2>")]).await.unwrap();
        let dead = store.by_status(DeliveryStatus::Dead, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].key, "k2");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
