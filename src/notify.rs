//! The account's notifier: one session per account in NOTIFY (RFC 5465) tells the watches of
//! its folders of news, so that a caught-up watch holds no session of its own (`notify = true`
//! on the account; the core's `Action::AwaitNotice`).
//!
//! The notifier asks for `NOTIFY SET (personal (MessageNew MessageExpunge MailboxName))`: news
//! in any folder of the user's personal namespace, matched to the subscribed folders by name.
//! (Not a `mailboxes` list: Dovecot 2.3 matches those in UTF-8 only, where RFC 5465 wants
//! modified UTF-7, so a folder named "Entwürfe" was never reported; it also names folders in
//! UTF-8 in its notifications, which the decoding below accepts as they are.) Folders of a
//! shared or public namespace are not covered: watch those with `notify = false`.
//!
//! Nothing is missed between a watch's catch-up and the notifier: a watch marks its
//! subscription before each SELECT ([`Subscription::mark`]); news after the mark wakes it. A
//! folder marked while the notifier did not watch (before its `NOTIFY SET` succeeded, or while
//! its session was down) is woken once as soon as it does, so that the watch catches up what
//! came in between. While the notifier cannot connect, watches wake at their `idle_refresh`
//! and catch up, as they would after an IDLE refresh.
//!
//! Without NOTIFY on the server every subscriber is told once ([`Wake::NoNotifier`]) and the
//! core sends the watch back to IDLE on a session of its own.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use inboxd_core::failure::Reconnect;
use inboxd_core::machine::Wake;
use inboxd_core::wait::{Wait, next_wait};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::config::Account;
use crate::imap::{ImapError, Session};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Up,
    /// The server has no NOTIFY.
    Unsupported,
}

struct Folder {
    news: watch::Sender<u64>,
    subscribers: usize,
    /// A watch marked it while the notifier did not watch: wake it once it does.
    behind: bool,
}

#[derive(Default)]
struct Folders {
    by_name: HashMap<String, Folder>,
    /// The notifier's `NOTIFY SET` holds (its session is up).
    watching: bool,
}

struct Shared {
    key: String,
    folders: Mutex<Folders>,
    /// The set of folders changed.
    changed: Notify,
    state: watch::Sender<State>,
}

impl Shared {
    fn folders(&self) -> MutexGuard<'_, Folders> {
        self.folders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// News in `name` (as the server named it).
    fn heard(&self, name: &str) {
        let name = canonical(name);
        if let Some(f) = self.folders().by_name.get(&name) {
            f.news.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Watched from now on: wake the folders whose watches may have missed news.
    fn armed(&self) {
        let mut all = self.folders();
        all.watching = true;
        for f in all.by_name.values_mut() {
            if std::mem::take(&mut f.behind) {
                f.news.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Every folder looks again (news may have been missed).
    fn wake_all(&self) {
        for f in self.folders().by_name.values() {
            f.news.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The session is gone: nothing is watched.
    fn disarmed(&self) {
        let mut all = self.folders();
        all.watching = false;
        for f in all.by_name.values_mut() {
            f.behind = true;
        }
    }
}

static NOTIFIERS: LazyLock<Mutex<HashMap<String, Arc<Shared>>>> = LazyLock::new(Mutex::default);

fn registry() -> MutexGuard<'static, HashMap<String, Arc<Shared>>> {
    NOTIFIERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// INBOX is case-insensitive (RFC 3501 §5.1).
fn canonical(name: &str) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else {
        name.to_string()
    }
}

/// A watch's place in its account's notifier. Dropped, the folder leaves the notifier's set
/// (and the notifier ends with its last subscriber).
pub(crate) struct Subscription {
    shared: Arc<Shared>,
    folder: String,
    news: watch::Receiver<u64>,
    state: watch::Receiver<State>,
}

/// Subscribes `folder` (as people read it) of `account` to the account's notifier, starting
/// it if it is not running.
pub(crate) fn subscribe(account: &Account, folder: &str) -> Subscription {
    let key = format!("{}\0{}\0{}\0{}", account.name, account.host, account.port, account.user);
    let folder = canonical(folder);
    let mut notifiers = registry();
    let shared = match notifiers.get(&key) {
        Some(s) => s.clone(),
        None => {
            let shared = Arc::new(Shared {
                key: key.clone(),
                folders: Mutex::default(),
                changed: Notify::new(),
                state: watch::Sender::new(State::Connecting),
            });
            notifiers.insert(key, shared.clone());
            tokio::spawn(run(shared.clone(), account.clone()));
            shared
        }
    };
    let news = {
        let mut folders = shared.folders();
        let behind = !folders.watching;
        let f = folders.by_name.entry(folder.clone()).or_insert_with(|| Folder {
            news: watch::Sender::new(0),
            subscribers: 0,
            behind,
        });
        f.subscribers += 1;
        f.news.subscribe()
    };
    drop(notifiers);
    shared.changed.notify_one();
    let state = shared.state.subscribe();
    Subscription {
        shared,
        folder,
        news,
        state,
    }
}

impl Subscription {
    /// News from here on wakes the next [`Subscription::wait`]; call it before the SELECT
    /// that starts a catch-up.
    pub(crate) fn mark(&mut self) {
        self.news.borrow_and_update();
        let mut all = self.shared.folders();
        let watching = all.watching;
        if let Some(f) = all.by_name.get_mut(&self.folder)
            && !watching
        {
            f.behind = true;
        }
    }

    /// Waits for news in the folder since the last mark, at most `max`, or until `interrupt`.
    pub(crate) async fn wait(&mut self, max: Duration, interrupt: impl Future<Output = ()>) -> Wake {
        tokio::pin!(interrupt);
        let sleep = tokio::time::sleep(max);
        tokio::pin!(sleep);
        loop {
            if *self.state.borrow_and_update() == State::Unsupported {
                return Wake::NoNotifier;
            }
            tokio::select! {
                r = self.news.changed() => {
                    return if r.is_ok() { Wake::Activity } else { Wake::NoNotifier };
                }
                r = self.state.changed() => {
                    if r.is_err() {
                        return Wake::NoNotifier;
                    }
                }
                _ = &mut sleep => return Wake::Elapsed,
                _ = &mut interrupt => return Wake::Interrupted,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        {
            let mut folders = self.shared.folders();
            if let Some(f) = folders.by_name.get_mut(&self.folder) {
                f.subscribers = f.subscribers.saturating_sub(1);
                if f.subscribers == 0 {
                    folders.by_name.remove(&self.folder);
                }
            }
        }
        self.shared.changed.notify_one();
    }
}

/// How a notifier session ended without an error.
enum Ended {
    /// No folder is subscribed any more.
    Unsubscribed,
    /// The server has no NOTIFY.
    Unsupported,
}

/// Leaves the registry if no folder is subscribed (checked under the registry's lock, so a
/// subscriber that comes meanwhile finds a notifier that runs, or starts a new one).
fn leave_if_unused(shared: &Arc<Shared>) -> bool {
    let mut notifiers = registry();
    if !shared.folders().by_name.is_empty() {
        return false;
    }
    if notifiers.get(&shared.key).is_some_and(|s| Arc::ptr_eq(s, shared)) {
        notifiers.remove(&shared.key);
    }
    true
}

async fn run(shared: Arc<Shared>, account: Account) {
    // When to try again after a failure is the core's decision, on the account's schedule,
    // as for its watches.
    let mut reconnect = Reconnect::new(account.schedule.clone(), account.stable_after, account.park_for);
    let origin = tokio::time::Instant::now();
    loop {
        if leave_if_unused(&shared) {
            return;
        }
        match session(&shared, &account, &mut reconnect, origin).await {
            Ok(Ended::Unsubscribed) => {}
            Ok(Ended::Unsupported) => {
                info!(account = %account.name, "the server offers no NOTIFY: each watch waits on a session of its own");
                shared.state.send_replace(State::Unsupported);
                // Subscribers learn it from the state; the notifier stays (so that later
                // ones learn it at once) until the last is gone.
                loop {
                    let changed = shared.changed.notified();
                    if leave_if_unused(&shared) {
                        return;
                    }
                    changed.await;
                }
            }
            Err(e) => {
                shared.disarmed();
                shared.state.send_replace(State::Connecting);
                let retry_in = reconnect.failed(origin.elapsed(), e.class(), fastrand::f64());
                warn!(account = %account.name, error = %e, retry_in = ?retry_in, "notifier session failed");
                let changed = async {
                    // Wait out the back-off unless every subscriber leaves meanwhile.
                    loop {
                        shared.changed.notified().await;
                        if shared.folders().by_name.is_empty() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => {}
                    _ = changed => {}
                }
            }
        }
    }
}

/// One notifier session: `NOTIFY SET`, then IDLE (again at `idle_refresh`) until the last
/// subscriber is gone.
async fn session(
    shared: &Arc<Shared>,
    account: &Account,
    reconnect: &mut Reconnect,
    origin: tokio::time::Instant,
) -> Result<Ended, ImapError> {
    let mut session = Session::open(account).await?;
    if !session.has("NOTIFY") {
        session.logout().await;
        return Ok(Ended::Unsupported);
    }
    let mut heard = |name: String| shared.heard(&name);
    session.notify_set(&mut heard).await?;
    debug!(account = %account.name, "notifier watching");
    shared.armed();
    shared.state.send_replace(State::Up);
    reconnect.connected(origin.elapsed());
    let mut opened = tokio::time::Instant::now();
    loop {
        // Made before the set is read: a change after the read ends the wait below.
        let changed = shared.changed.notified();
        if shared.folders().by_name.is_empty() {
            shared.disarmed();
            session.logout().await;
            return Ok(Ended::Unsubscribed);
        }
        // The session's age limit and its token's lifetime bound the wait, as for any
        // session (the core's `next_wait`); at the limit the next session is watching before
        // this one goes, so nothing falls between them.
        let now = tokio::time::Instant::now();
        let token_left = session.token_due().map(|due| due.saturating_duration_since(now));
        match next_wait(&account.wait, true, now - opened, token_left) {
            Wait::Idle(max) | Wait::Poll(max) => {
                session.notify_wait(max, changed, &mut heard).await?;
            }
            Wait::Recycle => {
                let mut fresh = Session::open(account).await?;
                fresh.notify_set(&mut heard).await?;
                // What the old session was told until the new one watched (logging out
                // would drop it): without this, mail arriving while the new session logged
                // in woke no watch until the next news or `idle_refresh`.
                if let Err(e) = session.notify_drain(&mut heard).await {
                    debug!(account = %account.name, error = %e, "the replaced notifier session could not be read to its end: every folder looks again");
                    shared.wake_all();
                }
                session.logout().await;
                session = fresh;
                opened = tokio::time::Instant::now();
                debug!(account = %account.name, "notifier session recycled");
            }
        }
    }
}
