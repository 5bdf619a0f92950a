//! Accounts managed at run time: stored in PostgreSQL, sealed with the `accounts_key`, added to
//! the config file's accounts whenever a config is loaded, and picked up by running instances
//! through `LISTEN inboxd_accounts`.
//!
//! An account is stored as config text: one `[accounts.NAME]` table, the `[targets.*]` its
//! watches use and its `[[watch]]` tables, validated by the same code as the file (errors name
//! `postgres:accounts/NAME`, its line and key) before it is stored.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use inboxd::config::{Config, StateLocation};
use inboxd::sealed::SealingKey;
use inboxd::store::{PgStore, StoredAccount};
use tracing::{error, warn};

/// How a stored account is named in messages.
fn label(name: &str) -> String {
    format!("postgres:accounts/{name}")
}

/// The database of a PostgreSQL config; an error naming the file otherwise.
async fn database(config: &Config) -> anyhow::Result<PgStore> {
    let StateLocation::Postgres(url) = &config.state else {
        bail!(
            "{}: accounts are stored in the database only with PostgreSQL state (`state = \"postgres://...\"`); with a state file, put the account in the config file",
            config.path.display()
        );
    };
    PgStore::open(url)
        .await
        .with_context(|| format!("cannot open state store {}", config.state))
}

/// The config's `accounts_key`, read and checked.
async fn key(config: &Config) -> anyhow::Result<SealingKey> {
    let source = config.accounts_key.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no accounts_key: stored accounts are sealed with it (`inboxd account keygen` makes one; then e.g. accounts_key = {{ file = \"accounts.key\" }})",
            config.path.display()
        )
    })?;
    let text = source.resolve().await.context("accounts_key")?;
    Ok(SealingKey::from_base64(&text)?)
}

/// Loads the config file and, with PostgreSQL state, adds the accounts stored in the database.
/// A stored account that does not open with this key or does not validate is left out, with
/// an error logged naming it: the others run.
pub async fn load(path: &Path) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    if !matches!(config.state, StateLocation::Postgres(_)) {
        return Ok(config);
    }
    let db = database(&config).await?;
    let stored = db.accounts().await?;
    if stored.is_empty() {
        return Ok(config);
    }
    let key = match key(&config).await {
        Ok(k) => k,
        Err(e) => {
            error!(accounts = stored.len(), error = %format!("{e:#}"), "the accounts stored in the database are left out");
            return Ok(config);
        }
    };
    for a in stored {
        if let Err(e) = add(&mut config, &key, &a) {
            error!(account = %a.name, error = %format!("{e:#}"), "stored account left out");
        }
    }
    Ok(config)
}

fn add(config: &mut Config, key: &SealingKey, a: &StoredAccount) -> anyhow::Result<()> {
    let text = key
        .open(&a.name, &a.sealed)
        .with_context(|| format!("{}: cannot open", label(&a.name)))?;
    config.add_stored(&label(&a.name), &a.name, text.expose())?;
    Ok(())
}

/// Validates account text against the config file (`file`: without the stored accounts, whose
/// names the database keeps unique) and returns the account's name and listing columns.
fn validate(file: &Config, text: &str) -> anyhow::Result<StoredAccount> {
    let table: toml::Table = toml::from_str(text).context("the account's text is not TOML")?;
    let names: Vec<&String> = table
        .get("accounts")
        .and_then(|a| a.as_table())
        .map(|t| t.keys().collect())
        .unwrap_or_default();
    let [name] = names[..] else {
        bail!("the text must define exactly one [accounts.NAME] table; it defines {names:?}");
    };
    let mut with = file.clone();
    with.add_stored(&label(name), name, text)?;
    let account = &with.accounts[name];
    let folders: Vec<String> = with
        .watches
        .iter()
        .filter(|w| w.account.name == *name)
        .map(|w| w.folder.clone())
        .collect();
    if folders.is_empty() {
        warn!(account = %name, "the account has no [[watch]]: it is stored, but nothing is watched");
    }
    for w in with.watches.iter().filter(|w| w.account.name == *name) {
        inboxd::route::Fanout::new(&w.targets, w.routing.clone())
            .map_err(|e| anyhow!("watch {}: {}", w.name(), e.reason))?;
    }
    Ok(StoredAccount {
        name: name.clone(),
        sealed: Vec::new(),
        host: account.host.clone(),
        user: account.user.clone(),
        folders,
        updated_at: 0,
        updated_by: String::new(),
    })
}

/// What storing an account came to.
pub enum Stored {
    /// Stored; the message says what happens next.
    Done(String),
    /// An account of that name is stored and `replace` was not given.
    Exists(String),
}

/// Validates, seals and stores account text. Errors are the text's (invalid config, names
/// the line) or the database's.
pub async fn store(path: &Path, text: &str, replace: bool) -> anyhow::Result<Stored> {
    let config = Config::load(path)?;
    let db = database(&config).await?;
    let key = key(&config).await?;
    let mut a = validate(&config, text)?;
    a.sealed = key.seal(&a.name, text.as_bytes())?;
    a.updated_by = inboxd::store::instance_name();
    if !db.put_account(&a, replace).await? {
        return Ok(Stored::Exists(a.name));
    }
    Ok(Stored::Done(format!(
        "account {} stored (sealed with key {}): {} watch{}; running instances start it within seconds",
        a.name,
        key.id(),
        a.folders.len(),
        if a.folders.len() == 1 { "" } else { "es" }
    )))
}

/// `inboxd account add`.
pub async fn add_command(path: &Path, text: &str, replace: bool, out: &mut impl Write) -> anyhow::Result<()> {
    match store(path, text, replace).await? {
        Stored::Done(message) => writeln!(out, "{message}")?,
        Stored::Exists(name) => bail!("account {name} is already stored; `inboxd account add --replace` replaces it"),
    }
    Ok(())
}

/// Removes a stored account; `Ok(false)` if none of that name is stored.
pub async fn remove(path: &Path, name: &str) -> anyhow::Result<bool> {
    let config = Config::load(path)?;
    let db = database(&config).await?;
    Ok(db.remove_account(name).await?)
}

/// `inboxd account remove`: removes a stored account; running instances stop its watches
/// after the delivery in flight.
pub async fn remove_command(path: &Path, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    if !remove(path, name).await? {
        let config = Config::load(path)?;
        if config.accounts.contains_key(name) {
            bail!(
                "account {name} is in {}, not in the database: remove it from the file",
                config.path.display()
            );
        }
        bail!("no account {name} is stored");
    }
    writeln!(
        out,
        "account {name} removed; running instances stop its watches after the delivery in flight"
    )?;
    Ok(())
}

/// One account as `account list` and the HTTP API show it.
fn json(a: &StoredAccount, opens: &Result<(), String>) -> serde_json::Value {
    serde_json::json!({
        "name": a.name,
        "source": "database",
        "host": a.host,
        "user": a.user,
        "folders": a.folders,
        "updated_at": crate::commands::utc(a.updated_at),
        "updated_by": a.updated_by,
        "error": opens.as_ref().err(),
    })
}

/// The stored accounts, each with whether it opens and validates here.
async fn stored(path: &Path) -> anyhow::Result<(Config, Vec<(StoredAccount, Result<(), String>)>)> {
    let config = Config::load(path)?;
    let db = database(&config).await?;
    let rows = db.accounts().await?;
    let key = if rows.is_empty() {
        None
    } else {
        Some(key(&config).await)
    };
    let mut base = config.clone();
    let mut out = Vec::new();
    for a in rows {
        let ok = match &key {
            Some(Ok(k)) => add(&mut base, k, &a).map_err(|e| format!("{e:#}")),
            Some(Err(e)) => Err(format!("{e:#}")),
            None => Ok(()),
        };
        out.push((a, ok));
    }
    Ok((config, out))
}

/// `inboxd account list`: the accounts of the file and of the database.
pub async fn list_command(path: &Path, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let (config, rows) = stored(path).await?;
    if as_json {
        let mut all: Vec<serde_json::Value> = config
            .accounts
            .values()
            .map(|a| {
                serde_json::json!({
                    "name": a.name,
                    "source": "file",
                    "host": a.host,
                    "user": a.user,
                    "folders": config.watches.iter().filter(|w| w.account.name == a.name).map(|w| w.folder.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        all.extend(rows.iter().map(|(a, ok)| json(a, ok)));
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<9} {:<28} {:<24} folders",
        "account", "source", "host", "user"
    )?;
    for a in config.accounts.values() {
        let folders: Vec<&str> = config
            .watches
            .iter()
            .filter(|w| w.account.name == a.name)
            .map(|w| w.folder.as_str())
            .collect();
        writeln!(
            out,
            "{:<20} {:<9} {:<28} {:<24} {}",
            a.name,
            "file",
            a.host,
            a.user,
            folders.join(", ")
        )?;
    }
    for (a, ok) in &rows {
        writeln!(
            out,
            "{:<20} {:<9} {:<28} {:<24} {}",
            a.name,
            "database",
            a.host,
            a.user,
            a.folders.join(", ")
        )?;
        writeln!(
            out,
            "{:<20} updated {} by {}",
            "",
            crate::commands::utc(a.updated_at),
            a.updated_by
        )?;
        if let Err(e) = ok {
            writeln!(out, "{:<20} NOT RUNNING: {e}", "")?;
        }
    }
    Ok(())
}

/// Wakes `run` on every change of the stored accounts: a notification, or a lost listening
/// connection (notifications may have been missed while it was down). Runs until `changes`
/// is closed.
pub async fn watch_changes(url: String, changes: tokio::sync::mpsc::Sender<()>) {
    let mut listener = None;
    loop {
        if changes.is_closed() {
            return;
        }
        let l = match listener.as_mut() {
            Some(l) => l,
            None => {
                let opened = async { PgStore::open(&url).await?.listen_accounts().await }.await;
                match opened {
                    Ok(l) => listener.insert(l),
                    Err(e) => {
                        warn!(error = %e, "cannot listen for account changes; trying again in 5 s");
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        continue;
                    }
                }
            }
        };
        match l.try_recv().await {
            Ok(Some(_)) => {
                // Several changes in a row make one reload: those already buffered are taken
                // without waiting (never by cancelling a read, which could lose one).
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                while l.next_buffered().is_some() {}
                if changes.send(()).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                warn!("lost the connection listening for account changes; reloading in case one was missed");
                let _ = changes.send(()).await;
            }
            Err(e) => {
                warn!(error = %e, "listening for account changes failed; trying again in 5 s");
                listener = None;
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    }
}
