//! What the CLI commands do: run every watch until a signal, catch every watch up once, check
//! accounts, show status, replay a dead letter.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use inboxd::core::key::{parse_key, scope_hash};
use tracing::{error, info};

use inboxd::config::{Account, Config, Watch};
use inboxd::handler::Message;
use inboxd::imap::Session;
use inboxd::store::{DeliveryStatus, StateLock, Store};
use inboxd::watcher::{Mode, Watcher};

/// Text from a handler or a server, safe for a terminal: control characters (escape
/// sequences) shown as `\u{..}`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Opens the configured state store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    inboxd::store::open(&config.state)
        .await
        .with_context(|| format!("cannot open state store {}", config.state))
}

/// Starts every watch. Beyond the first four, starts are staggered by `[limits]
/// start_stagger` (half to one and a half times it, at random), so a daemon with thousands of
/// mailboxes does not open them all in the same instant.
async fn start_all(config: &Config, store: &Arc<dyn Store>, mode: Mode) -> anyhow::Result<Vec<Watcher>> {
    if config.watches.is_empty() {
        bail!("{}: no [[watch]] configured", config.path.display());
    }
    let mut watchers = Vec::new();
    for (i, w) in config.watches.iter().filter(|w| w.pattern.is_none()).enumerate() {
        if i >= 4 {
            tokio::time::sleep(config.start_stagger.mul_f64(0.5 + fastrand::f64())).await;
        }
        watchers.push(
            Watcher::start(w.clone(), store.clone(), mode)
                .with_context(|| format!("cannot start watch {}", w.name()))?,
        );
    }
    Ok(watchers)
}

/// A running watch and the configuration it was started with.
pub(crate) struct Running {
    pub watch: Watch,
    pub watcher: Watcher,
    /// The lease it runs under, on a state shared by instances (PostgreSQL).
    pub fence: Option<Arc<inboxd::store::Fence>>,
    /// The pattern watch (its name) whose folder this is, for a watch a pattern matched.
    pub origin: Option<String>,
}

/// What decides whether a reload restarts a watch: everything of its watch table, account and
/// targets, as validated (a secret written inline in the file shows as `[redacted]`, so a
/// change of its value alone restarts nothing; secrets from env, file, command or credential
/// are read at each login anyway).
fn fingerprint(w: &Watch) -> String {
    format!("{w:?}")
}

/// The folders a pattern watch matches now; `None` (logged) when the server cannot tell.
async fn matching(template: &Watch) -> Option<Vec<String>> {
    let pattern = template.pattern.as_ref()?;
    let listed = match inboxd::imap::Session::open(&template.account).await {
        Ok(mut session) => {
            let listed = session.folders_matching(pattern).await;
            session.logout().await;
            listed
        }
        Err(e) => Err(e),
    };
    match listed {
        Ok(folders) => Some(folders),
        Err(e) => {
            tracing::warn!(watch = %template.name(), error = %format!("{:#}", anyhow::Error::from(e)), "cannot list the folders of a pattern watch; its watches stay as they are");
            None
        }
    }
}

/// `config` with each pattern watch replaced by the watches of the folders it matches (in its
/// place; a folder a watch of its own names, or an earlier pattern matched, left out), and
/// which pattern each of those came from. `known` holds each pattern's folders as last listed:
/// a pattern whose folders cannot be listed now keeps them (its watches stay as they are).
/// With `strict`, such a pattern fails instead (`once`).
async fn expand_patterns(
    config: &Config,
    known: &mut std::collections::BTreeMap<String, Vec<String>>,
    strict: bool,
) -> anyhow::Result<(Config, std::collections::HashMap<String, String>)> {
    for t in config.watches.iter().filter(|w| w.pattern.is_some()) {
        match matching(t).await {
            Some(folders) => {
                known.insert(t.name(), folders);
            }
            None if strict => bail!("watch {}: cannot list the folders the pattern matches", t.name()),
            None => {}
        }
    }
    known.retain(|name, _| config.watches.iter().any(|w| w.pattern.is_some() && w.name() == *name));
    let mut expanded = config.clone();
    expanded.watches.clear();
    let mut origins = std::collections::HashMap::new();
    for w in &config.watches {
        if w.pattern.is_none() {
            expanded.watches.push(w.clone());
            continue;
        }
        for f in known.get(&w.name()).into_iter().flatten() {
            let name = format!("{}/{f}", w.account.name);
            let taken = config
                .watches
                .iter()
                .any(|o| o.pattern.is_none() && o.account.name == w.account.name && o.folder == *f)
                || origins.contains_key(&name);
            if !taken {
                origins.insert(name, w.name());
                expanded.watches.push(w.for_folder(f));
            }
        }
    }
    Ok((expanded, origins))
}

/// In a cluster, after the patterns were listed again: the watches of folders no pattern
/// matches any more stop and give their leases back; the round then takes the new ones. Each
/// running watch learns the pattern it came from (for reloads).
async fn follow_patterns(
    cluster: &crate::cluster::Cluster,
    expanded: &Config,
    origins: &std::collections::HashMap<String, String>,
    running: &mut Vec<Running>,
) -> Duration {
    let (gone, keep): (Vec<Running>, Vec<Running>) = std::mem::take(running)
        .into_iter()
        .partition(|r| r.origin.is_some() && !expanded.watches.iter().any(|w| w.name() == r.watch.name()));
    *running = keep;
    for r in &gone {
        r.watcher.request_stop();
    }
    for r in gone {
        info!(watch = %r.watch.name(), "the folder no longer matches its pattern (deleted or renamed); its watch stops");
        cluster.release(r).await;
    }
    let due = cluster.round(expanded, running).await;
    for r in running.iter_mut().filter(|r| r.origin.is_none()) {
        r.origin = origins.get(&r.watch.name()).cloned();
    }
    due
}

/// Brings the watches of each pattern watch in line with the folders on the server: a folder
/// that appeared is watched, one that went (deleted, renamed) stops being watched. A folder a
/// watch of its own names is left to that watch; one two patterns match is watched once.
async fn rescan(config: &Config, running: &mut Vec<Running>, store: &Arc<dyn Store>) {
    for t in config.watches.iter().filter(|w| w.pattern.is_some()) {
        let Some(folders) = matching(t).await else { continue };
        let explicit = |f: &str| {
            config
                .watches
                .iter()
                .any(|w| w.pattern.is_none() && w.account.name == t.account.name && w.folder == f)
        };
        let wanted: Vec<&String> = folders.iter().filter(|f| !explicit(f)).collect();
        let origin = t.name();
        let (gone, keep): (Vec<Running>, Vec<Running>) = std::mem::take(running)
            .into_iter()
            .partition(|r| r.origin.as_deref() == Some(origin.as_str()) && !wanted.contains(&&r.watch.folder));
        *running = keep;
        for r in &gone {
            r.watcher.request_stop();
        }
        for r in gone {
            info!(watch = %r.watch.name(), pattern = %origin, "the folder no longer matches (deleted or renamed); its watch stops");
            if let Err(e) = r.watcher.join().await {
                tracing::warn!(watch = %r.watch.name(), error = %format!("{:#}", anyhow::Error::from(e)), "watch ended with an error");
            }
        }
        for f in wanted {
            if running
                .iter()
                .any(|r| r.watch.account.name == t.account.name && r.watch.folder == *f)
            {
                continue;
            }
            let w = t.for_folder(f);
            match Watcher::start(w.clone(), store.clone(), Mode::Forever) {
                Ok(watcher) => {
                    info!(watch = %w.name(), pattern = %origin, "a folder matches; watching it");
                    running.push(Running {
                        watch: w,
                        watcher,
                        fence: None,
                        origin: Some(origin.clone()),
                    });
                }
                Err(e) => error!(watch = %w.name(), error = %e.reason, "cannot start the watch of a matched folder"),
            }
        }
    }
}

fn views_of(running: &[Running]) -> Vec<crate::http::WatchView> {
    running
        .iter()
        .map(|r| crate::http::WatchView {
            account: r.watch.account.name.clone(),
            folder: r.watch.folder.clone(),
            health: r.watcher.health_handle(),
        })
        .collect()
}

/// Runs every watch until SIGINT or SIGTERM, then stops them cleanly: the delivery in flight
/// finishes and is committed, sessions log out. SIGHUP reloads the config.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let mut signals = Signals::new()?;
    let mut current = config.clone();
    // On PostgreSQL, instances share the watches through leases; a state file belongs to one
    // process, which runs every watch.
    let (cluster, _lock) = match &config.state {
        inboxd::config::StateLocation::Postgres(url) => {
            if config.watches.is_empty() && config.accounts_key.is_none() {
                bail!("{}: no [[watch]] configured", config.path.display());
            }
            if config.watches.is_empty() {
                info!("no watch yet: waiting for accounts stored with `inboxd account add`");
            }
            let cluster = crate::cluster::Cluster::join(url, config.lease_ttl)
                .await
                .with_context(|| format!("cannot join the instances on {}", config.state))?;
            info!(instance = %cluster.name(), lease_ttl = ?config.lease_ttl, "sharing the watches with the other instances on this database");
            (Some(cluster), None)
        }
        inboxd::config::StateLocation::File(path) => (None, Some(StateLock::acquire(path)?)),
    };
    // When the next lease round is due (a cluster only).
    let mut round_in = Duration::from_secs(3600);
    // In a cluster: the folders each pattern matched when last listed, and the config with
    // the patterns replaced by their folders' watches, which the rounds share out.
    let mut patterns = std::collections::BTreeMap::new();
    let (mut expanded, mut origins) = match &cluster {
        Some(_) => expand_patterns(config, &mut patterns, false).await?,
        None => (config.clone(), std::collections::HashMap::new()),
    };
    let mut running: Vec<Running> = match &cluster {
        Some(c) => {
            let mut running = Vec::new();
            round_in = follow_patterns(c, &expanded, &origins, &mut running).await;
            running
        }
        None => {
            let mut running: Vec<Running> = config
                .watches
                .iter()
                .filter(|w| w.pattern.is_none())
                .cloned()
                .zip(start_all(config, &store, Mode::Forever).await?)
                .map(|(watch, watcher)| Running {
                    watch,
                    watcher,
                    fence: None,
                    origin: None,
                })
                .collect();
            rescan(config, &mut running, &store).await;
            running
        }
    };
    // Pattern watches are listed again at the shortest `rescan` among them.
    let mut rescans = tokio::time::interval(
        config
            .watches
            .iter()
            .filter(|w| w.pattern.is_some())
            .map(|w| w.rescan)
            .min()
            .unwrap_or(Duration::from_secs(3600)),
    );
    rescans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescans.reset();
    let next_round = tokio::time::sleep(round_in);
    tokio::pin!(next_round);
    let views: crate::http::Views = Arc::new(std::sync::RwLock::new(views_of(&running)));
    let shared_config = Arc::new(std::sync::RwLock::new(config.clone()));
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<crate::http::ReloadRequest>(4);
    // Accounts stored in the database: every change reloads.
    let (changes_tx, mut changes_rx) = tokio::sync::mpsc::channel::<()>(1);
    let _changes = match &config.state {
        inboxd::config::StateLocation::Postgres(url) => Some(AbortOnDrop(tokio::spawn(
            crate::accounts::watch_changes(url.clone(), changes_tx),
        ))),
        inboxd::config::StateLocation::File(_) => None,
    };
    let endpoint = match &config.http {
        Some(http) => {
            // One entry per token cache (accounts may share a credential).
            let mut credentials: Vec<(String, inboxd::oauth2::TokenSource)> = Vec::new();
            for account in config.accounts.values() {
                if let inboxd::config::Auth::OAuth2(source) = &account.auth
                    && !credentials.iter().any(|(_, s)| s.shares_cache_with(source))
                {
                    credentials.push((source.name().to_string(), source.clone()));
                }
            }
            Some(
                crate::http::serve(
                    http,
                    views.clone(),
                    credentials,
                    store.clone(),
                    shared_config.clone(),
                    reload_tx,
                )
                .await?,
            )
        }
        None => None,
    };
    let _notifier = crate::service::start(views.clone()).map(AbortOnDrop);
    info!(watches = running.len(), state = %config.state, "inboxd running");
    loop {
        let answer = tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => break,
                Signal::Reload => None,
            },
            Some(request) = reload_rx.recv() => Some(request),
            Some(()) = changes_rx.recv() => {
                info!("the accounts stored in the database changed: reloading");
                None
            }
            _ = rescans.tick(), if current.watches.iter().any(|w| w.pattern.is_some()) => {
                if let Some(c) = &cluster {
                    (expanded, origins) = expand_patterns(&current, &mut patterns, false).await?;
                    let due = follow_patterns(c, &expanded, &origins, &mut running).await;
                    next_round.as_mut().reset(tokio::time::Instant::now() + due);
                } else {
                    rescan(&current, &mut running, &store).await;
                }
                if let Ok(mut v) = views.write() {
                    *v = views_of(&running);
                }
                continue;
            }
            _ = &mut next_round, if cluster.is_some() => {
                if let Some(c) = &cluster {
                    let due = follow_patterns(c, &expanded, &origins, &mut running).await;
                    next_round.as_mut().reset(tokio::time::Instant::now() + due);
                    if let Ok(mut v) = views.write() {
                        *v = views_of(&running);
                    }
                }
                continue;
            }
        };
        crate::service::reloading();
        let outcome = reload(&mut current, &mut running, &store, cluster.as_ref()).await;
        if cluster.is_none() {
            // New and changed pattern watches find their folders now.
            rescan(&current, &mut running, &store).await;
        }
        if let Some(c) = &cluster {
            // New and changed watches are taken (by this instance or another) in this round;
            // new and changed patterns are listed first.
            (expanded, origins) = expand_patterns(&current, &mut patterns, false).await?;
            let due = follow_patterns(c, &expanded, &origins, &mut running).await;
            next_round.as_mut().reset(tokio::time::Instant::now() + due);
        }
        if let Ok(mut v) = views.write() {
            *v = views_of(&running);
        }
        if let Ok(mut c) = shared_config.write() {
            *c = current.clone();
        }
        crate::service::reloaded();
        if let Some(answer) = answer {
            let _ = answer.send(outcome);
        }
    }
    info!("stopping");
    crate::service::stopping();
    // Ask every watch first, then wait for all: none goes on delivering while another stops.
    for r in &running {
        r.watcher.request_stop();
    }
    let joined = futures::future::join_all(running.into_iter().map(|r| async move {
        let name = r.watcher.name().to_string();
        if let Err(e) = r.watcher.join().await {
            error!(watch = %name, error = %format!("{:#}", anyhow::Error::from(e)), "watch ended with an error");
        }
    }));
    let _endpoint = endpoint.map(AbortOnDrop);
    let joined = async {
        joined.await;
        if let Some(c) = &cluster {
            // Committed and stopped: the others may take the watches at once.
            c.leave().await;
        }
    };
    tokio::select! {
        _ = joined => Ok(()),
        _ = signals.stop() => {
            // A second signal: the operator does not want to wait for handlers in flight.
            // Their messages are not committed and will be delivered again, with the same keys.
            Err(anyhow!("second signal: exiting without waiting for the deliveries in flight"))
        }
    }
}

/// Reads the config again and applies it: watches added start, removed ones stop (after the
/// delivery in flight, which is committed), changed ones stop and start again, the others go
/// on untouched. A config that does not load, or whose new targets cannot work, is refused as
/// a whole and the running one stays.
async fn reload(
    current: &mut Config,
    running: &mut Vec<Running>,
    store: &Arc<dyn Store>,
    cluster: Option<&crate::cluster::Cluster>,
) -> Result<String, String> {
    let new = match crate::accounts::load(&current.path).await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %format!("{e:#}"), "reload refused: the config does not load; the running config stays");
            return Err(format!("reload refused: {e:#}"));
        }
    };
    if new.state != current.state {
        error!(
            from = %current.state,
            to = %new.state,
            "reload refused: `state` changed; restart inboxd to move to another state file"
        );
        return Err("reload refused: `state` changed; restart inboxd to move to another state file".into());
    }
    if format!("{:?}", new.http) != format!("{:?}", current.http) {
        tracing::warn!("[http] changed: that takes effect at the next restart");
    }
    // Each watch's fingerprint once: running ones by name, new ones in file order.
    let before: std::collections::HashMap<String, String> = running
        .iter()
        .map(|r| (r.watch.name(), fingerprint(&r.watch)))
        .collect();
    let after: Vec<(String, String)> = new.watches.iter().map(|w| (w.name(), fingerprint(w))).collect();
    let kept_names: std::collections::HashSet<&str> = after
        .iter()
        .filter(|(name, fp)| before.get(name) == Some(fp))
        .map(|(name, _)| name.as_str())
        .collect();
    // Build the new and changed watches' targets first: if one cannot work, nothing changes.
    let mut fresh = Vec::new();
    for w in new.watches.iter().filter(|w| !kept_names.contains(w.name().as_str())) {
        match inboxd::route::Fanout::new(&w.targets, w.routing.clone()) {
            Ok(fanout) => fresh.push((w.clone(), fanout)),
            Err(e) => {
                error!(watch = %w.name(), error = %e.reason, "reload refused: a target cannot work; the running config stays");
                return Err(format!("reload refused: watch {}: {}", w.name(), e.reason));
            }
        }
    }
    let (keep, leave): (Vec<Running>, Vec<Running>) = std::mem::take(running).into_iter().partition(|r| {
        kept_names.contains(r.watch.name().as_str()) || r.origin.as_deref().is_some_and(|t| kept_names.contains(t))
    });
    let (stopped, kept) = (leave.len(), keep.len());
    for r in &leave {
        r.watcher.request_stop();
    }
    for r in leave {
        match cluster {
            // Stopped, then its lease given back: the new config's round takes it again.
            Some(c) => c.release(r).await,
            None => {
                let name = r.watcher.name().to_string();
                if let Err(e) = r.watcher.join().await {
                    error!(watch = %name, error = %format!("{:#}", anyhow::Error::from(e)), "watch ended with an error");
                }
            }
        }
    }
    let mut all = keep;
    // In a cluster, the next round takes new and changed watches under leases.
    let started = if cluster.is_some() { 0 } else { fresh.len() };
    for (w, fanout) in fresh
        .into_iter()
        .filter(|(w, _)| cluster.is_none() && w.pattern.is_none())
    {
        all.push(Running {
            watcher: Watcher::with_fanout(w.clone(), store.clone(), fanout, Mode::Forever),
            watch: w,
            fence: None,
            origin: None,
        });
    }
    // In the order of the file (a pattern's folders at its place).
    all.sort_by_key(|r| {
        new.watches
            .iter()
            .position(|w| Some(w.name()) == r.origin.clone().or_else(|| Some(r.watch.name())))
    });
    *running = all;
    info!(kept, stopped, started, watches = running.len(), "config reloaded");
    *current = new;
    Ok(format!(
        "config reloaded: {kept} kept, {stopped} stopped, {started} started, {} running",
        running.len()
    ))
}

/// What a signal asks of `run`.
enum Signal {
    Stop,
    Reload,
}

/// The signals `run` listens to, installed once so that none is missed between two waits.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?,
            // SIGHUP (a reload request, or a closed terminal) never kills the daemon mid-delivery.
            hup: signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn stop(&mut self) {
        loop {
            if let Signal::Stop = self.next().await {
                return;
            }
        }
    }
}

/// Marks a dead letter as seen by an operator: it no longer fails `/readyz` (with
/// `unready_on_dead_letters`), and stays listed until it is replayed.
pub async fn acknowledge(config: &Config, key: &str) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    if !store.acknowledge(key).await? {
        bail!("no dead letter with key {key}");
    }
    println!("acknowledged {key}");
    Ok(())
}

/// Asks the `inboxd run` holding this config's state to reload its config (SIGHUP), after
/// checking that the config loads.
pub fn reload_running(config: &Config) -> anyhow::Result<()> {
    let Some(file) = config.state.file() else {
        bail!(
            "`inboxd reload` finds the running inboxd by its state file; with PostgreSQL state, send it SIGHUP or POST /api/v1/reload"
        );
    };
    match StateLock::acquire(file) {
        Ok(_) => bail!("no inboxd is running on {}", file.display()),
        Err(inboxd::store::LockError::Held { holder, .. }) => {
            let pid: i32 = holder
                .parse()
                .map_err(|_| anyhow!("the state lock names no process ({holder:?})"))?;
            // SAFETY: kill(2) sends a signal; it touches no memory of ours.
            if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
                bail!("cannot signal pid {pid}: {}", std::io::Error::last_os_error());
            }
            println!("asked inboxd (pid {pid}) to reload {}", config.path.display());
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Stops a task when dropped (the HTTP endpoint, when `run` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Catches every watch up once. Fails if any watch failed or dead-lettered a message.
pub async fn once(config: &Config) -> anyhow::Result<()> {
    let (watchers, claimed, _lock) = match &config.state {
        inboxd::config::StateLocation::File(path) => {
            let lock = StateLock::acquire(path)?;
            let store = open_store(config).await?;
            let mut watchers = start_all(config, &store, Mode::Once).await?;
            // Each folder a pattern watch matches now, once.
            for t in config.watches.iter().filter(|w| w.pattern.is_some()) {
                let Some(folders) = matching(t).await else {
                    bail!("watch {}: cannot list the folders the pattern matches", t.name());
                };
                for f in folders {
                    let explicit = config
                        .watches
                        .iter()
                        .any(|w| w.pattern.is_none() && w.account.name == t.account.name && w.folder == f);
                    if !explicit && !watchers.iter().any(|w| w.name() == format!("{}/{f}", t.account.name)) {
                        watchers.push(
                            Watcher::start(t.for_folder(&f), store.clone(), Mode::Once)
                                .with_context(|| format!("cannot start watch {}/{f}", t.account.name))?,
                        );
                    }
                }
            }
            (watchers, None, Some(lock))
        }
        inboxd::config::StateLocation::Postgres(url) => {
            if config.watches.is_empty() && config.accounts_key.is_none() {
                bail!("{}: no [[watch]] configured", config.path.display());
            }
            if config.watches.is_empty() {
                info!("no watch yet: waiting for accounts stored with `inboxd account add`");
            }
            // Each folder a pattern watch matches now, under a lease of its own.
            let (config, _) = expand_patterns(config, &mut std::collections::BTreeMap::new(), true).await?;
            let claimed = crate::cluster::Cluster::claim_all(url, &config).await?;
            let mut watchers = Vec::new();
            for (i, w) in config.watches.iter().enumerate() {
                watchers.push(
                    Watcher::start(w.clone(), claimed.store_for(i), Mode::Once)
                        .with_context(|| format!("cannot start watch {}", w.name()))?,
                );
            }
            (watchers, Some(claimed), None)
        }
    };
    let progress = crate::progress::Progress::start(watchers.iter().map(Watcher::health_handle).collect());
    let mut failures = Vec::new();
    for w in watchers {
        let name = w.name().to_string();
        match w.join().await {
            Ok(0) => {}
            Ok(dead) => failures.push(format!("{name}: {dead} message(s) dead-lettered")),
            Err(e) => failures.push(format!("{name}: {:#}", anyhow::Error::from(e))),
        }
    }
    progress.finish();
    if let Some(c) = claimed {
        c.release().await;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(failures.join("; ")))
    }
}

/// Logs in to every account and prints capabilities and folder status. For OAuth2 accounts it
/// first obtains a token and prints its decoded claims (never the token), and on failure the
/// usual causes for the provider.
pub async fn check(config: &Config, route: Option<u32>, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let mut failed = 0;
    for w in &config.watches {
        // Each target is checked without delivering anything: the program can start, the
        // Maildir is writable, the webhook answers, a NATS stream captures the subject, Redis
        // answers PING.
        for t in &w.targets {
            let probed = match inboxd::handler::from_config(&t.deliver) {
                Ok(mut handler) => handler.probe(&w.account.name, &w.folder).await,
                Err(e) => Err(e),
            };
            let label = if w.targets.len() == 1 {
                "target".to_string()
            } else {
                format!("target {}", t.name)
            };
            match probed {
                Ok(what) => writeln!(out, "watch {}: {label} ok: {}", w.name(), printable(&what))?,
                Err(e) => {
                    writeln!(out, "watch {}: {label} FAILED: {}", w.name(), printable(&e.reason))?;
                    failed += 1;
                }
            }
        }
    }
    for (name, account) in &config.accounts {
        writeln!(
            out,
            "account {name}: {}@{}:{} ({:?})",
            account.user, account.host, account.port, account.tls
        )?;
        if let inboxd::config::Auth::OAuth2(source) = &account.auth {
            source.attach_store(store.clone());
            if !oauth2_token_report(account, source, out).await? {
                failed += 1;
                continue;
            }
        }
        let mut session = match Session::open(account).await {
            Ok(s) => s,
            Err(e) => {
                writeln!(out, "  FAILED: {:#}", anyhow::Error::from(e))?;
                if matches!(account.auth, inboxd::config::Auth::OAuth2(_)) {
                    for hint in oauth2_hints(account, true) {
                        writeln!(out, "    - {hint}")?;
                    }
                }
                failed += 1;
                continue;
            }
        };
        writeln!(out, "  login ok; capabilities: {}", session.capabilities().join(" "))?;
        let gmail = session.has("X-GM-EXT-1");
        match account.identity.check(name, gmail) {
            Err(e) => {
                writeln!(out, "  keys FAILED: {e}")?;
                failed += 1;
            }
            Ok(()) if gmail && account.identity != inboxd::config::Identity::Uid => writeln!(
                out,
                "  keys: Gmail's message id (gm1-...): one key for a message under several labels"
            )?,
            Ok(()) => writeln!(out, "  keys: per folder and UID (v1-...)")?,
        }
        if account.wait.notify {
            if session.has("NOTIFY") {
                writeln!(
                    out,
                    "  notify: the server offers NOTIFY: one session tells the watches of its personal folders of news"
                )?;
            } else {
                writeln!(
                    out,
                    "  notify: the server offers no NOTIFY: each watch waits on a session of its own (as with notify = false)"
                )?;
            }
        }
        match session.folders().await {
            Ok(list) => {
                const SHOWN: usize = 50;
                let mut names: Vec<String> = list
                    .iter()
                    .take(SHOWN)
                    .map(|(name, attrs)| {
                        if attrs.is_empty() {
                            format!("{:?}", printable(name))
                        } else {
                            format!("{:?} ({})", printable(name), attrs.join(" "))
                        }
                    })
                    .collect();
                if list.len() > SHOWN {
                    names.push(format!("and {} more", list.len() - SHOWN));
                }
                writeln!(out, "  folders ({}): {}", list.len(), names.join(", "))?;
            }
            Err(e) => writeln!(out, "  folders: cannot list them: {:#}", anyhow::Error::from(e))?,
        }
        for w in config.watches.iter().filter(|w| &w.account.name == name) {
            if let Some(pattern) = &w.pattern {
                match session.folders_matching(pattern).await {
                    Ok(found) => {
                        let names: Vec<String> = found.iter().map(|f| format!("{:?}", printable(f))).collect();
                        writeln!(
                            out,
                            "  pattern {pattern:?}: {} folder(s): {}",
                            found.len(),
                            if names.is_empty() {
                                "none yet".to_string()
                            } else {
                                names.join(", ")
                            }
                        )?;
                    }
                    Err(e) => {
                        writeln!(out, "  pattern {pattern:?}: FAILED: {:#}", anyhow::Error::from(e))?;
                        failed += 1;
                    }
                }
                continue;
            }
            let selected = match session.resolve(&w.folder).await {
                Ok(folder) => session.select(&folder).await.map(|s| (folder, s)),
                Err(e) => Err(e),
            };
            match selected {
                Ok((folder, s)) => {
                    let shown = if folder == w.folder {
                        format!("{folder:?}")
                    } else {
                        format!("{:?} ({folder:?})", w.folder)
                    };
                    writeln!(
                        out,
                        "  folder {shown}: uidvalidity {} uidnext {} messages {}",
                        s.uidvalidity, s.uidnext, s.exists
                    )?;
                    if let Some(n) = route
                        && let Err(e) = dry_run(w, &mut session, n, out).await
                    {
                        writeln!(out, "    routing dry-run FAILED: {e:#}")?;
                        failed += 1;
                    }
                }
                Err(e) => {
                    writeln!(out, "  folder {:?}: FAILED: {:#}", w.folder, anyhow::Error::from(e))?;
                    failed += 1;
                }
            }
        }
        session.logout().await;
    }
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// Prints where the routing would send each of the newest `n` messages of the selected
/// folder, delivering nothing and changing nothing on the server (`BODY.PEEK`).
async fn dry_run(w: &Watch, session: &mut Session, n: u32, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    use inboxd::route::{Decision, Facts};
    let mut uids = session.search("ALL").await?;
    uids.sort_unstable();
    let newest = &uids[uids.len().saturating_sub(n as usize)..];
    writeln!(out, "    routing of the newest {} message(s):", newest.len())?;
    let Some(&first) = newest.first() else {
        return Ok(());
    };
    let listed = session.list_above(first - 1).await?;
    let names = |targets: &[usize]| {
        targets
            .iter()
            .filter_map(|&i| w.targets.get(i).map(|t| t.name.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rules = &w.routing.rules;
    for l in listed.iter().filter(|l| newest.contains(&l.uid)) {
        let size = u64::from(l.size.unwrap_or(0));
        // Small messages whole; a large one by its first megabyte, which holds its header.
        let body = if size <= w.spool_above {
            session.fetch(&[l.uid], w.spool_above).await?
        } else {
            Vec::new()
        };
        let head;
        let facts = match body.first() {
            Some(f) => Facts::read(&inboxd::handler::Body::Bytes(&f.body), w.routing.needs_body())?,
            None => {
                let mut buf = Vec::new();
                session.fetch_into(l.uid, 1 << 20, 1 << 20, &mut buf).await?;
                head = buf;
                let mut f = Facts::read(&inboxd::handler::Body::Bytes(&head), false)?;
                f.size = size;
                f
            }
        };
        let decision = w.routing.decide(&facts);
        let rule = |i: &Option<usize>| match i {
            Some(i) => format!("rule {:?}", rules.get(*i).map_or("", |r| r.name.as_str())),
            None if rules.is_empty() => "every message".to_string(),
            None => "else".to_string(),
        };
        let to = match &decision {
            Decision::Skip { rule: r } => format!("{}: skip", rule(r)),
            Decision::Deliver {
                rule: r,
                targets,
                after,
            } => {
                let after = after.as_ref().unwrap_or(&w.after);
                format!("{}: {} (after: {after})", rule(r), names(targets))
            }
        };
        let from = facts
            .from
            .first()
            .and_then(|(_, a)| a.clone())
            .unwrap_or_else(|| "?".into());
        writeln!(
            out,
            "      uid {}  from {}  {:?}  {} bytes  ->  {}",
            l.uid,
            printable(&from),
            printable(facts.subject.as_deref().unwrap_or("")),
            size,
            printable(&to)
        )?;
    }
    Ok(())
}

/// Obtains a token and prints what it says; false if no token could be had.
async fn oauth2_token_report(
    account: &Account,
    source: &inboxd::oauth2::TokenSource,
    out: &mut impl std::io::Write,
) -> anyhow::Result<bool> {
    match source.token().await {
        Ok(token) => {
            writeln!(out, "  oauth2: token obtained, lifetime {}s", token.lifetime.as_secs())?;
            match inboxd::oauth2::claims(&token.access) {
                Some(claims) => {
                    for key in [
                        "aud", "iss", "sub", "roles", "scp", "scope", "tid", "appid", "azp", "email",
                    ] {
                        if let Some(v) = claims.get(key) {
                            writeln!(out, "    {key}: {v}")?;
                        }
                    }
                    if let Some(exp) = claims.get("exp").and_then(|v| v.as_i64()) {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64);
                        writeln!(out, "    exp: {exp} (in {}s)", exp - now)?;
                    }
                }
                None => writeln!(out, "    (an opaque token: no claims to show)")?,
            }
            Ok(true)
        }
        Err(e) => {
            writeln!(out, "  oauth2: FAILED to get a token: {:#}", anyhow::Error::from(e))?;
            for hint in oauth2_hints(account, false) {
                writeln!(out, "    - {hint}")?;
            }
            Ok(false)
        }
    }
}

/// The usual causes of an OAuth2 failure, by provider.
fn oauth2_hints(account: &Account, at_imap: bool) -> Vec<&'static str> {
    use inboxd::config::Provider;
    match (account.provider, at_imap) {
        (Some(Provider::Microsoft365), true) => vec![
            "the app's service principal is not registered in Exchange Online (New-ServicePrincipal -AppId <client_id> -ObjectId <enterprise app object id>)",
            "the service principal has no permission on this mailbox (Add-MailboxPermission -Identity <mailbox> -User <service principal id> -AccessRights FullAccess)",
            "the token's roles lack IMAP.AccessAsApp (API permissions: Office 365 Exchange Online > Application > IMAP.AccessAsApp, with admin consent)",
            "the scope is not https://outlook.office365.com/.default, or `user` is not the mailbox address",
        ],
        (Some(Provider::Microsoft365), false) => vec![
            "wrong tenant, client_id or client secret (secrets expire: check Certificates & secrets)",
            "for a certificate: the certificate uploaded to the app registration must be the one configured here",
        ],
        (Some(Provider::Gmail), true) => vec![
            "domain-wide delegation is missing: Admin console > Security > API controls > Domain-wide delegation, add the service account's client id with scope https://mail.google.com/",
            "IMAP is disabled for the user or the domain (Gmail settings / Admin console > Apps > Gmail)",
            "`user` (the subject) is not a mailbox of the delegated domain",
        ],
        (Some(Provider::Gmail), false) => vec![
            "the service-account key is revoked or for another project",
            "unauthorized_client: domain-wide delegation for this client id and scope is not set up",
        ],
        (None, true) => vec![
            "the server does not accept this token: check its issuer, audience, scopes and which claim names the user",
        ],
        (None, false) => vec!["check token_url, client_id and the credential"],
    }
}

/// The running daemon's view of its watches, from its HTTP endpoint when one is configured
/// and answers: (where it was asked, the answer or why there is none).
async fn live_watches(config: &Config) -> (Option<String>, Result<Vec<serde_json::Value>, String>) {
    let Some(http) = &config.http else {
        return (None, Err("no [http] endpoint configured".into()));
    };
    let url = format!("http://{}/api/v1/watches", http.listen);
    let answer = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = client.get(&url);
        if let Some(token) = &http.token {
            let token = token.resolve().await.map_err(|e| format!("http.token: {e}"))?;
            req = req.bearer_auth(token.expose());
        }
        let r = req
            .send()
            .await
            .map_err(|_| "inboxd is not answering there (not running?)".to_string())?;
        if !r.status().is_success() {
            return Err(format!("it answered {}", r.status()));
        }
        let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
        Ok(v["watches"].as_array().cloned().unwrap_or_default())
    }
    .await;
    (Some(url), answer)
}

fn delivery_json(d: &inboxd::store::Delivery) -> serde_json::Value {
    serde_json::json!({
        "key": d.key,
        "account": d.account,
        "folder": d.folder,
        "uidvalidity": d.uidvalidity,
        "uid": d.uid,
        "message_id": d.message_id,
        // The key the targets got, where it is not `key` (Gmail's message identity).
        "target_key": (!d.target_key.is_empty()).then_some(&d.target_key),
        "status": d.status.as_str(),
        "attempts": d.attempts,
        "last_error": d.last_error,
        "route": d.route,
        "updated_at": d.updated_at,
    })
}

/// `2026-11-30T10:42:52Z` from Unix seconds.
pub fn utc(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Prints per watch its state, checkpoint, backlog and last mail (live from the daemon's HTTP
/// endpoint when it answers), then messages being retried, dead letters, what the routing
/// skipped and post-actions not done; as one JSON document with `json`.
pub async fn status(config: &Config, json: bool, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let rows = store.checkpoints().await?;
    let (live_url, live) = live_watches(config).await;
    let live_of = |w: &Watch| {
        live.as_ref().ok().and_then(|list| {
            list.iter()
                .find(|v| v["account"] == w.account.name.as_str() && v["folder"] == w.folder.as_str())
                .cloned()
        })
    };
    let retrying = store.by_status(DeliveryStatus::Failed, 1000).await?;
    let dead = store.by_status(DeliveryStatus::Dead, 1000).await?;
    let skipped: Vec<_> = store
        .by_status(DeliveryStatus::Skipped, 20)
        .await?
        .into_iter()
        .filter(|d| d.route.starts_with("skipped"))
        .collect();
    let problems = store.post_action_problems(1000).await?;
    let leases = store.leases().await?;
    // A pattern watch shows as the folders it has watched (those with a checkpoint), matched
    // offline with either usual hierarchy delimiter.
    let mut shown: Vec<Watch> = Vec::new();
    for w in &config.watches {
        match &w.pattern {
            None => shown.push(w.clone()),
            Some(p) => {
                for r in rows.iter().filter(|r| r.account == w.account.name) {
                    let matches = [Some('/'), Some('.')]
                        .into_iter()
                        .any(|d| inboxd::core::mailbox::pattern_matches(p, &r.folder, d));
                    if matches
                        && !shown
                            .iter()
                            .any(|s| s.account.name == r.account && s.folder == r.folder)
                    {
                        shown.push(w.for_folder(&r.folder));
                    }
                }
            }
        }
    }
    let lease_of = |w: &Watch| {
        leases
            .iter()
            .find(|l| l.account == w.account.name && l.folder == w.folder)
    };
    if json {
        let mut watches = Vec::new();
        for w in &shown {
            let row = rows
                .iter()
                .find(|r| r.account == w.account.name && r.folder == w.folder);
            watches.push(serde_json::json!({
                "account": w.account.name,
                "folder": w.folder,
                "uidvalidity": row.map(|r| r.checkpoint.uidvalidity),
                "last_uid": row.map(|r| r.checkpoint.last_uid),
                "last_commit": row.map(|r| r.updated_at),
                "live": live_of(w),
                "lease": lease_of(w).map(|l| serde_json::json!({
                    "owner": if l.live { l.owner.clone() } else { None },
                    "epoch": l.epoch,
                    "since": l.acquired_at,
                    "expires": l.expires_at,
                })),
            }));
        }
        let mut dead_json = Vec::new();
        for d in &dead {
            let mut v = delivery_json(d);
            v["targets_done"] = serde_json::json!(store.targets_done(&d.key).await?);
            dead_json.push(v);
        }
        let doc = serde_json::json!({
            "state": config.state,
            "live_from": live_url,
            "live_error": live.as_ref().err(),
            "watches": watches,
            "retrying": retrying.iter().map(delivery_json).collect::<Vec<_>>(),
            "dead_letters": dead_json,
            "skipped": skipped.iter().map(delivery_json).collect::<Vec<_>>(),
            "post_actions": problems.iter().map(|(d, state)| {
                let mut v = delivery_json(d);
                v["post_action"] = serde_json::json!(state);
                v
            }).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "watches (state {}; live state {}):",
        config.state,
        match (&live_url, &live) {
            (Some(url), Ok(_)) => format!("from {url}"),
            (Some(url), Err(e)) => format!("unknown: {url}: {e}"),
            (None, Err(e)) => format!("unknown: {e}"),
            (None, Ok(_)) => String::new(),
        }
    )?;
    let mut table = vec![[
        "WATCH".to_string(),
        "STATE".into(),
        "UIDVALIDITY".into(),
        "LAST UID".into(),
        "BACKLOG".into(),
        "LAST MAIL".into(),
    ]];
    for w in &shown {
        let row = rows
            .iter()
            .find(|r| r.account == w.account.name && r.folder == w.folder);
        let live = live_of(w);
        let state = live
            .as_ref()
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .unwrap_or_else(|| {
                if row.is_some() {
                    "-".into()
                } else {
                    "never connected".into()
                }
            });
        let last_mail = live
            .as_ref()
            .and_then(|v| v["last_delivery"].as_i64())
            .map(utc)
            .or_else(|| row.map(|r| format!("{} (last commit)", utc(r.updated_at))))
            .unwrap_or_else(|| "-".into());
        table.push([
            printable(&w.name()),
            printable(&state),
            row.map_or("-".into(), |r| r.checkpoint.uidvalidity.to_string()),
            row.map_or("-".into(), |r| {
                let mut s = r.checkpoint.last_uid.to_string();
                if r.checkpoint.dedupe_through > 0 {
                    s.push_str(" (dedupe)");
                }
                s
            }),
            live.as_ref()
                .and_then(|v| v["backlog"].as_u64())
                .map_or("-".into(), |b| b.to_string()),
            last_mail,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| table.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &table {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}", w = *w))
            .collect();
        writeln!(out, "  {}", line.join("  ").trim_end())?;
    }
    if !leases.is_empty() {
        writeln!(out, "owners (leases on the shared state):")?;
        for w in &config.watches {
            let text = match lease_of(w) {
                Some(l) if l.live => format!(
                    "{}, epoch {}, since {}, lease expires {}",
                    printable(l.owner.as_deref().unwrap_or("an instance that left")),
                    l.epoch,
                    l.acquired_at.map_or("-".into(), utc),
                    l.expires_at.map_or("-".into(), utc)
                ),
                Some(l) => format!("nobody (epoch {} ended)", l.epoch),
                None => "nobody yet".into(),
            };
            writeln!(out, "  {}  {text}", printable(&w.name()))?;
        }
    }
    for (title, rows) in [("retrying", &retrying), ("dead letters", &dead)] {
        writeln!(out, "{title} ({}):", rows.len())?;
        for d in rows {
            writeln!(
                out,
                "  {}  {}/{} uid {}  attempts {}  error: {}",
                d.key,
                d.account,
                d.folder,
                d.uid,
                d.attempts,
                printable(&d.last_error)
            )?;
            if !d.target_key.is_empty() {
                // Gmail: the key the targets get (one for the message under every label).
                writeln!(out, "      targets' key: {}", d.target_key)?;
            }
            if !d.route.is_empty() {
                let done = store.targets_done(&d.key).await?;
                writeln!(
                    out,
                    "      route: {}{}",
                    printable(&d.route),
                    if done.is_empty() {
                        String::new()
                    } else {
                        format!("; already acknowledged by: {}", done.join(", "))
                    }
                )?;
            }
        }
    }
    let row = |out: &mut dyn std::io::Write, d: &inboxd::store::Delivery, what: &str| {
        writeln!(
            out,
            "  {}  {}/{} uid {}  {}",
            d.key,
            d.account,
            d.folder,
            d.uid,
            printable(what)
        )
    };
    writeln!(out, "skipped by the routing (newest {}):", skipped.len())?;
    for d in &skipped {
        row(out, d, &d.route)?;
    }
    writeln!(out, "post-actions not done ({}):", problems.len())?;
    for (d, state) in &problems {
        row(out, d, state)?;
    }
    Ok(())
}

/// Delivers one logged message again (typically a dead letter) with its watch's handler.
pub async fn replay(config: &Config, key: &str) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    replay_with(config, &store, key).await
}

/// [`replay`] with a store already open (the running daemon's, for the HTTP API).
pub async fn replay_with(config: &Config, store: &Arc<dyn Store>, key: &str) -> anyhow::Result<()> {
    let mut d = store
        .delivery(key)
        .await?
        .ok_or_else(|| anyhow!("no message with key {key} in the delivery log"))?;
    // Found by either key: the log's own (`v1-...`) names the watch and the message; the
    // targets get the key they got the first time (Gmail's `gm1-...` where it was used).
    let key = d.key.clone();
    let key = key.as_str();
    let target_key = if d.target_key.is_empty() {
        key.to_string()
    } else {
        d.target_key.clone()
    };
    let (scope, uidvalidity, uid) = parse_key(key).ok_or_else(|| anyhow!("{key} is not an inboxd key"))?;
    let watch: &Watch = config
        .watches
        .iter()
        .find(|w| scope_hash(&w.account.name, &w.folder) == scope && w.account.name == d.account)
        .ok_or_else(|| anyhow!("no configured watch for {}/{}", d.account, d.folder))?;
    if let inboxd::config::Auth::OAuth2(source) = &watch.account.auth {
        source.attach_store(store.clone());
    }
    let mut session = Session::open(&watch.account).await?;
    let folder = session.resolve(&watch.folder).await?;
    let state = session.select(&folder).await?;
    if state.uidvalidity != uidvalidity {
        bail!(
            "{}'s UIDVALIDITY is now {} (was {uidvalidity}): uid {uid} no longer names this message",
            watch.name(),
            state.uidvalidity
        );
    }
    // Spooled whatever its size: a replayed dead letter may be the one that was too large.
    let mut fanout = inboxd::route::Fanout::new(&watch.targets, watch.routing.clone())?;
    let dir = fanout
        .spool_dir()
        .map_or_else(|| watch.spool_dir.clone(), Path::to_path_buf);
    let spooled = inboxd::spool::fetch(&mut session, &dir, uid, inboxd::config::MAX_MESSAGE_SIZE_LIMIT)
        .await?
        .ok_or_else(|| anyhow!("uid {uid} is no longer in {}", watch.name()))?;
    let len = spooled.len();
    let (mid, _) = inboxd::message::identity(&spooled.head(inboxd::message::IDENTITY_HEAD)?);
    let msg = Message {
        account: &watch.account.name,
        folder: &watch.folder,
        uidvalidity,
        uid,
        key: &target_key,
        message_id: mid.as_deref(),
        internal_date: None,
        flags: &[],
        gmail: None,
        body: inboxd::handler::Body::File {
            path: spooled.path(),
            len,
        },
    };
    // Routed again by today's rules; targets that acknowledged it before are not called again.
    let result = match fanout.decide(&msg.body)? {
        inboxd::route::Decision::Skip { .. } => Ok(()),
        inboxd::route::Decision::Deliver { targets, .. } => {
            let mut done = store.targets_done(key).await?.into_iter().collect();
            match fanout.deliver(&msg, &targets, &mut done).await {
                Ok(()) => fanout.flush().await,
                Err(failure) => {
                    store.record_targets(key, &failure.acknowledged).await?;
                    Err(failure.error)
                }
            }
        }
    };
    d.attempts += 1;
    match result {
        Ok(()) => {
            d.status = DeliveryStatus::Delivered;
            d.last_error.clear();
            store.record(std::slice::from_ref(&d)).await?;
            session.logout().await;
            info!(key, "replayed");
            Ok(())
        }
        Err(e) => {
            d.last_error = e.detail();
            store.record(std::slice::from_ref(&d)).await?;
            session.logout().await;
            Err(anyhow!("replay of {key} failed: {}", e.detail()))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_seconds_as_utc() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(1_796_035_372), "2026-11-30T10:42:52Z");
    }
}
