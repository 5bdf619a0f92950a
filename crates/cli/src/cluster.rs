//! Several instances on one PostgreSQL state: each runs the watches whose leases it holds.
//!
//! Every `renew_every` (a third of `lease_ttl`) a round: announce this instance, renew the
//! leases held (a lease not renewed is lost: its watch stops at once), then take free watches
//! up to the fair share, or give back what exceeds it (stopped and committed first, then
//! released, so the next owner starts from the committed checkpoint). What to renew, when a
//! lease can be trusted, and the shares are decided in `inboxd_core::lease`; the database
//! decides who holds what. Each watch runs on a store fenced by its lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use inboxd::config::Config;
use inboxd::core::lease::{self, LeasePolicy};
use inboxd::store::{Fence, PgStore, Store};
use inboxd::watcher::{Mode, Watcher};
use tracing::{error, info, warn};

use crate::commands::Running;

/// The lease a running watch holds (every one does, in a cluster).
fn fence(r: &Running) -> Option<&Arc<Fence>> {
    r.fence.as_ref()
}

/// This instance, as the database knows it.
pub struct Cluster {
    pg: PgStore,
    /// Unique per process run.
    id: String,
    /// `inboxd <pid> on <host>`, shown by `status`.
    name: String,
    pub policy: LeasePolicy,
    origin: Instant,
}

impl Cluster {
    pub async fn join(url: &str, ttl: Duration) -> anyhow::Result<Cluster> {
        let pg = PgStore::open(url).await?;
        let name = inboxd::store::instance_name();
        let id = format!("{}-{:016x}", std::process::id(), fastrand::u64(..));
        Ok(Cluster {
            pg,
            id,
            name,
            policy: LeasePolicy { ttl },
            origin: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The monotonic instant until which a lease renewed by a request sent at `sent` is
    /// trusted.
    fn trusted_until(&self, sent: Instant) -> Instant {
        self.origin + self.policy.trusted_until(sent.duration_since(self.origin))
    }

    /// One round: renew, drop what was lost, then take or give back watches toward the fair
    /// share of `config`'s watches. `running` is in the order the leases were taken. Returns
    /// when the next round is due (`LeasePolicy::next_round`).
    pub async fn round(&self, config: &Config, running: &mut Vec<Running>) -> Duration {
        self.take_and_give(config, running).await;
        match self.pg.next_expiry(&self.id).await {
            Ok(expires) => self.policy.next_round(expires),
            Err(_) => self.policy.renew_every(),
        }
    }

    async fn take_and_give(&self, config: &Config, running: &mut Vec<Running>) {
        let ttl = self.policy.ttl;
        let sent = Instant::now();
        let live = match self.pg.heartbeat(&self.id, &self.name, ttl).await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot reach the state database; leases are not renewed");
                self.drop_untrusted(running).await;
                return;
            }
        };
        let fences: Vec<Arc<Fence>> = running.iter().filter_map(fence).cloned().collect();
        let renewed = match renew(&self.pg, &self.id, self.policy, self.origin, sent, &fences).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot renew leases");
                self.drop_untrusted(running).await;
                return;
            }
        };
        let mut lost = Vec::new();
        for (i, l) in running.iter().enumerate() {
            let Some(f) = fence(l) else { continue };
            if !renewed.iter().any(|r| Arc::ptr_eq(r, f)) {
                f.revoke();
                lost.push(i);
            }
        }
        for i in lost.into_iter().rev() {
            let l = running.remove(i);
            warn!(watch = %l.watch.name(), "lease lost (expired or taken over); the watch stops here");
            stop(l).await;
        }

        let share = lease::fair_share(config.watches.len(), live);
        let mine: Vec<String> = running.iter().map(|l| l.watch.name()).collect();
        let candidates: Vec<(String, String)> = config
            .watches
            .iter()
            .filter(|w| !mine.contains(&w.name()))
            .map(|w| (w.account.name.clone(), w.folder.clone()))
            .collect();
        let free = match self.pg.free_watches(&candidates).await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot read leases");
                return;
            }
        };
        let free_names: Vec<String> = free.iter().map(|(a, f)| format!("{a}/{f}")).collect();
        let plan = lease::plan(&mine, &free_names, share);
        for name in plan.release {
            let Some(i) = running.iter().position(|l| l.watch.name() == name) else {
                continue;
            };
            let l = running.remove(i);
            info!(watch = %name, share, instances = live, "giving the watch back (above this instance's share)");
            self.release(l).await;
        }
        for name in plan.acquire {
            let Some(watch) = config.watches.iter().find(|w| w.name() == name) else {
                continue;
            };
            let sent = Instant::now();
            let epoch = match self.pg.acquire(&self.id, ttl, &watch.account.name, &watch.folder).await {
                Ok(Some(epoch)) => epoch,
                // Taken by another instance first.
                Ok(None) => continue,
                Err(e) => {
                    warn!(watch = %name, error = %format!("{:#}", anyhow::Error::from(e)), "cannot take the lease");
                    continue;
                }
            };
            let fence = Arc::new(Fence::new(
                &watch.account.name,
                &watch.folder,
                &self.id,
                epoch,
                self.trusted_until(sent),
            ));
            let store: Arc<dyn Store> = Arc::new(self.pg.fenced(fence.clone()));
            match Watcher::start(watch.clone(), store, Mode::Forever) {
                Ok(watcher) => {
                    info!(watch = %name, epoch, share, instances = live, "lease taken; watching");
                    running.push(Running {
                        watch: watch.clone(),
                        watcher,
                        fence: Some(fence),
                        origin: None,
                    });
                }
                Err(e) => {
                    error!(watch = %name, error = %e.reason, "cannot start the watch; its lease is given back");
                    let _ = self
                        .pg
                        .release(&self.id, &watch.account.name, &watch.folder, epoch)
                        .await;
                }
            }
        }
    }

    /// Without the database, leases cannot be renewed: a watch whose lease this instance no
    /// longer trusts stops (another instance may take it over once it expired).
    async fn drop_untrusted(&self, running: &mut Vec<Running>) {
        let (keep, gone): (Vec<Running>, Vec<Running>) = std::mem::take(running)
            .into_iter()
            .partition(|l| fence(l).is_none_or(|f| f.holds()));
        *running = keep;
        for l in gone {
            warn!(watch = %l.watch.name(), "lease no longer trusted (the database is unreachable); the watch stops here");
            stop(l).await;
        }
    }

    /// Gives back one watch (reload: removed or changed); stopped first.
    pub async fn release(&self, l: Running) {
        let held = fence(&l).map(|f| (f.account.clone(), f.folder.clone(), f.epoch));
        let name = l.watch.name();
        stop(l).await;
        if let Some((account, folder, epoch)) = held
            && let Err(e) = self.pg.release(&self.id, &account, &folder, epoch).await
        {
            warn!(watch = %name, error = %format!("{:#}", anyhow::Error::from(e)), "cannot release the lease; it expires instead");
        }
    }

    /// This instance leaves (its watches stopped): its leases are released at once.
    pub async fn leave(&self) {
        if let Err(e) = self.pg.leave(&self.id).await {
            warn!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot release the leases; they expire instead");
        }
    }
}

/// Renews the leases behind `fences` (the request sent at `sent`) and trusts each renewed one
/// until its new deadline; returns those renewed.
async fn renew(
    pg: &PgStore,
    id: &str,
    policy: LeasePolicy,
    origin: Instant,
    sent: Instant,
    fences: &[Arc<Fence>],
) -> Result<Vec<Arc<Fence>>, inboxd::store::StoreError> {
    let held: Vec<(String, String, i64)> = fences
        .iter()
        .map(|f| (f.account.clone(), f.folder.clone(), f.epoch))
        .collect();
    let renewed = pg.renew(id, policy.ttl, &held).await?;
    let until = origin + policy.trusted_until(sent.duration_since(origin));
    let mut out = Vec::new();
    for f in fences {
        if renewed.iter().any(|(a, fo)| *a == f.account && *fo == f.folder) {
            f.trust_until(until);
            out.push(f.clone());
        }
    }
    Ok(out)
}

/// Stops a watch and waits until its delivery in flight is committed (or refused by the
/// fence).
async fn stop(l: Running) {
    let name = l.watch.name();
    l.watcher.request_stop();
    if let Err(e) = l.watcher.join().await {
        warn!(watch = %name, error = %format!("{:#}", anyhow::Error::from(e)), "watch ended with an error");
    }
}

/// `inboxd once` on a shared state: every watch's lease is taken for the run (and renewed
/// while it lasts), so that `once` never runs a watch an instance is running. A watch
/// another instance holds fails the command, naming its owner.
pub struct Claimed {
    cluster: Cluster,
    pub fences: Vec<Arc<Fence>>,
    renewing: tokio::task::JoinHandle<()>,
}

impl Cluster {
    pub async fn claim_all(url: &str, config: &Config) -> anyhow::Result<Claimed> {
        let cluster = Cluster::join(url, config.lease_ttl).await?;
        let mut fences: Vec<Arc<Fence>> = Vec::new();
        for w in &config.watches {
            let sent = Instant::now();
            match cluster
                .pg
                .acquire(&cluster.id, cluster.policy.ttl, &w.account.name, &w.folder)
                .await
            {
                Ok(Some(epoch)) => fences.push(Arc::new(Fence::new(
                    &w.account.name,
                    &w.folder,
                    &cluster.id,
                    epoch,
                    cluster.trusted_until(sent),
                ))),
                outcome => {
                    for f in &fences {
                        let _ = cluster.pg.release(&cluster.id, &f.account, &f.folder, f.epoch).await;
                    }
                    outcome?;
                    let owner = cluster
                        .pg
                        .lease_rows()
                        .await
                        .ok()
                        .and_then(|rows| {
                            rows.into_iter()
                                .find(|r| r.account == w.account.name && r.folder == w.folder)
                        })
                        .and_then(|r| r.owner)
                        .unwrap_or_else(|| "another instance".into());
                    anyhow::bail!(
                        "watch {} is owned by {owner} (its lease on {}); `once` runs only watches no instance holds",
                        w.name(),
                        config.state
                    );
                }
            }
        }
        let renewing = tokio::spawn({
            let (pg, id, policy, origin) = (cluster.pg.clone(), cluster.id.clone(), cluster.policy, cluster.origin);
            let fences = fences.clone();
            async move {
                loop {
                    tokio::time::sleep(policy.renew_every()).await;
                    // A lease not renewed is not trusted past its deadline: the watch stops
                    // delivering on its own.
                    let _ = renew(&pg, &id, policy, origin, Instant::now(), &fences).await;
                }
            }
        });
        Ok(Claimed {
            cluster,
            fences,
            renewing,
        })
    }
}

impl Claimed {
    /// The store for one claimed watch, fenced by its lease.
    pub fn store_for(&self, i: usize) -> Arc<dyn Store> {
        Arc::new(self.cluster.pg.fenced(self.fences[i].clone()))
    }

    /// Done: the leases go back.
    pub async fn release(self) {
        self.renewing.abort();
        for f in &self.fences {
            let _ = self
                .cluster
                .pg
                .release(&self.cluster.id, &f.account, &f.folder, f.epoch)
                .await;
        }
    }
}
