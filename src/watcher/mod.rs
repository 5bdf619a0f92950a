//! The watcher: one task per (account, folder).
//!
//! [`Watcher`] is the handle (events, health, queued jobs, stop); `driver` executes the
//! decisions of the core's [`inboxd_core::machine::WatchMachine`] one action at a time;
//! `event` holds what a watcher reports.
//!
//! **Architecture Invariant:** the driver decides nothing. When the checkpoint advances, when
//! to retry, back off, reconnect, recycle or stop is the machine's answer to what the driver
//! reports; the driver only runs IMAP commands, the handler, the store and timers.

mod driver;
mod event;

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use crate::spool::SPOOL_CHUNK;
pub use driver::BATCH_BYTES;
pub use event::{Event, Health, Histogram, LATENCY_BUCKETS};

use crate::config::Watch;
use crate::handler::{Handler, HandlerError};
use crate::imap::{ImapError, Session};
use crate::route::Fanout;
use crate::store::{Store, StoreError};

/// Reads a watcher's [`Health`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct HealthHandle(Arc<Mutex<Health>>);

impl HealthHandle {
    pub fn get(&self) -> Health {
        self.0.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// Why a watcher stopped for good, or why a `once` run failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("handler: {}", .0.detail())]
    Handler(HandlerError),
    /// A `once` run ended on this failure (already formatted, at most about 1 KiB).
    #[error("{0}")]
    Failed(String),
    #[error("watcher task panicked: {0}")]
    Panicked(String),
    #[error("the watcher has stopped")]
    Stopped,
}

/// A closure queued to run on the watcher's own session between waits.
pub type Job = Box<dyn for<'a> FnOnce(&'a mut Session) -> BoxFuture<'a, ()> + Send>;

/// Whether a watcher runs until stopped or catches up once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forever,
    Once,
}

/// Queued jobs waiting for the watcher's session; beyond this, `queue` waits.
const JOB_QUEUE: usize = 64;

/// Events kept for a subscriber that is behind; older ones are dropped for it (it sees
/// `Lagged`). The buffer is allocated when the watcher starts, whether or not anyone listens:
/// 1,024 slots cost 110 KiB per watch (measured in the many-watches benchmark), 64 cost 7 KiB.
const EVENT_BUFFER: usize = 64;

/// A running watcher. Dropping it asks it to stop (the delivery in flight finishes and is
/// committed); [`Watcher::stop`] also waits for that.
pub struct Watcher {
    name: String,
    stop: watch::Sender<bool>,
    jobs: mpsc::Sender<Job>,
    events: broadcast::Sender<Event>,
    /// Created before the task started, handed to the first subscriber, so that it sees every
    /// event from the start.
    first: Mutex<Option<broadcast::Receiver<Event>>>,
    health: Arc<Mutex<Health>>,
    task: tokio::task::JoinHandle<Result<u64, WatchError>>,
}

impl Watcher {
    /// Starts watching with the targets and routing the config names. Fails if a target cannot
    /// work at all (its program is missing, its Maildir cannot be created).
    pub fn start(watch: Watch, store: Arc<dyn Store>, mode: Mode) -> Result<Watcher, HandlerError> {
        let fanout = Fanout::new(&watch.targets, watch.routing.clone())?;
        Ok(Watcher::with_fanout(watch, store, fanout, mode))
    }

    /// Starts watching with a handler of the caller's, for every message (the config's targets
    /// and rules are not used).
    pub fn with_handler(watch: Watch, store: Arc<dyn Store>, handler: Box<dyn Handler>, mode: Mode) -> Watcher {
        Watcher::with_fanout(watch, store, Fanout::single("handler", handler), mode)
    }

    /// Starts watching with targets (and routing) of the caller's.
    pub fn with_fanout(watch: Watch, store: Arc<dyn Store>, fanout: Fanout, mode: Mode) -> Watcher {
        if let crate::config::Auth::OAuth2(source) = &watch.account.auth {
            source.attach_store(store.clone());
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE);
        let (events, first) = broadcast::channel(EVENT_BUFFER);
        let health = Arc::new(Mutex::new(Health {
            state: "starting".into(),
            disconnected_since: Some(driver::unix_now()),
            ..Health::default()
        }));
        let name = watch.name();
        let task = tokio::spawn(driver::run(driver::Parts {
            watch,
            store,
            fanout,
            mode,
            events: events.clone(),
            health: health.clone(),
            stop: stop_rx,
            jobs: jobs_rx,
        }));
        Watcher {
            name,
            stop: stop_tx,
            jobs: jobs_tx,
            events,
            first: Mutex::new(Some(first)),
            health,
            task,
        }
    }

    /// `account/folder`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Receives events: the first subscriber from the watcher's start, later ones from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        match self.first.lock().ok().and_then(|mut f| f.take()) {
            Some(rx) => rx,
            None => self.events.subscribe(),
        }
    }

    /// A snapshot of the watcher's health.
    pub fn health(&self) -> Health {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// A handle that reads this watcher's health from elsewhere (an HTTP endpoint), also
    /// after the watcher was moved.
    pub fn health_handle(&self) -> HealthHandle {
        HealthHandle(self.health.clone())
    }

    /// Runs `f` on the watcher's own session between waits (interrupting IDLE to do so) and
    /// returns its result. If the watcher is disconnected, `f` runs after it reconnects. The
    /// folder is selected again after `f`, so `f` may select another one. `f` must finish
    /// within the account's command timeout, or the session is dropped and reconnected.
    ///
    /// ```no_run
    /// # async fn demo(w: &inboxd::watcher::Watcher) -> Result<(), Box<dyn std::error::Error>> {
    /// let unseen = w.queue(|s| Box::pin(async move { s.search("UNSEEN").await })).await??;
    /// println!("{} unseen", unseen.len());
    /// # Ok(()) }
    /// ```
    pub async fn queue<T, F>(&self, f: F) -> Result<T, WatchError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut Session) -> BoxFuture<'a, T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |s| {
            Box::pin(async move {
                let _ = tx.send(f(s).await);
            })
        });
        self.jobs.send(job).await.map_err(|_| WatchError::Stopped)?;
        rx.await.map_err(|_| WatchError::Stopped)
    }

    /// Asks the watcher to stop (finishing the delivery in flight and committing it) and waits
    /// for it. Returns the number of messages dead-lettered during the run.
    pub async fn stop(self) -> Result<u64, WatchError> {
        self.request_stop();
        self.join().await
    }

    /// Asks the watcher to stop without waiting; [`Watcher::join`] waits. A daemon asks all
    /// its watchers first, then joins them, so none goes on delivering while another stops.
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits for the watcher to end by itself (in [`Mode::Once`]), or after a stop request.
    pub async fn join(mut self) -> Result<u64, WatchError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(WatchError::Panicked(e.to_string())),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Without this, the task would see its stop and job channels closed and would have to
        // guess; dropping the handle means stop.
        let _ = self.stop.send(true);
    }
}
