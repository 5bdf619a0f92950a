//! Leases and fencing on the PostgreSQL store (a database of its own on the machine's
//! PostgreSQL): one owner per watch, takeovers only after expiry, and no write of a watch's
//! state by an instance that lost its lease.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use inboxd::store::{Delivery, DeliveryStatus, Fence, PgStore, Store};
use inboxd_core::checkpoint::Checkpoint;
use inboxd_testbed::PgDatabase;

const TTL: Duration = Duration::from_secs(30);

fn cp(last_uid: u32) -> Checkpoint {
    Checkpoint {
        uidvalidity: 7,
        last_uid,
        dedupe_through: 0,
    }
}

fn row(uid: u32) -> Delivery {
    Delivery {
        key: format!("k{uid}"),
        account: "acct".into(),
        folder: "INBOX".into(),
        uidvalidity: 7,
        uid,
        message_id: format!("<m{uid}>"),
        target_key: String::new(),
        status: DeliveryStatus::Delivered,
        attempts: 1,
        last_error: String::new(),
        route: String::new(),
        acknowledged: false,
        updated_at: 0,
    }
}

fn fenced(store: &PgStore, owner: &str, epoch: i64) -> (PgStore, Arc<Fence>) {
    let fence = Arc::new(Fence::new("acct", "INBOX", owner, epoch, Instant::now() + TTL));
    (store.fenced(fence.clone()), fence)
}

/// Makes a lease expire now, as if its holder had stopped renewing it a TTL ago.
fn expire(db: &PgDatabase) {
    db.sql("UPDATE leases SET expires_at = now() - interval '1 second'")
        .unwrap();
}

#[tokio::test]
async fn a_watch_has_one_owner_and_a_new_one_only_after_expiry() {
    let db = PgDatabase::create().unwrap();
    let store = PgStore::open(db.url()).await.unwrap();
    assert_eq!(store.acquire("a", TTL, "acct", "INBOX").await.unwrap(), Some(1));
    assert_eq!(store.acquire("b", TTL, "acct", "INBOX").await.unwrap(), None);
    assert_eq!(
        store.acquire("a", TTL, "acct", "INBOX").await.unwrap(),
        None,
        "not twice either"
    );
    let watches = vec![
        ("acct".to_string(), "INBOX".to_string()),
        ("acct".into(), "Other".into()),
    ];
    assert_eq!(store.free_watches(&watches).await.unwrap(), vec![watches[1].clone()]);
    // Renewed while held.
    let held = [("acct".to_string(), "INBOX".to_string(), 1)];
    assert_eq!(store.renew("a", TTL, &held).await.unwrap().len(), 1);
    assert!(
        store.renew("b", TTL, &held).await.unwrap().is_empty(),
        "b holds nothing"
    );
    // Expired: not renewable, and the next owner gets a higher epoch.
    expire(&db);
    assert!(store.renew("a", TTL, &held).await.unwrap().is_empty());
    assert_eq!(store.acquire("b", TTL, "acct", "INBOX").await.unwrap(), Some(2));
    // Released: free at once.
    store.release("b", "acct", "INBOX", 2).await.unwrap();
    assert_eq!(store.acquire("a", TTL, "acct", "INBOX").await.unwrap(), Some(3));
    let leases = store.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].epoch, leases[0].live), (3, true));
}

#[tokio::test]
async fn a_holder_that_lost_its_lease_writes_nothing_and_stops_delivering() {
    let db = PgDatabase::create().unwrap();
    let store = PgStore::open(db.url()).await.unwrap();
    store.heartbeat("a", "inboxd 1 on host-a", TTL).await.unwrap();
    store.heartbeat("b", "inboxd 2 on host-b", TTL).await.unwrap();
    assert_eq!(store.acquire("a", TTL, "acct", "INBOX").await.unwrap(), Some(1));
    let (old, old_fence) = fenced(&store, "a", 1);
    old.commit("acct", "INBOX", cp(1), &[row(1)]).await.unwrap();
    assert!(old.holds_lease());

    // a is paused past its TTL; b takes over and moves on.
    expire(&db);
    assert_eq!(store.acquire("b", TTL, "acct", "INBOX").await.unwrap(), Some(2));
    let (new, _) = fenced(&store, "b", 2);
    new.commit("acct", "INBOX", cp(3), &[row(2), row(3)]).await.unwrap();

    // a wakes: none of its writes of the watch's state go through.
    let e = old.commit("acct", "INBOX", cp(4), &[row(4)]).await.unwrap_err();
    assert!(format!("{:?}", e.source).contains("no longer holds the lease"), "{e:?}");
    assert!(old.record(&[row(5)]).await.is_err());
    assert!(old.set_post_action(&["k3".into()], "pending").await.is_err());
    assert!(old.record_targets("k3", &["archive".into()]).await.is_err());
    assert_eq!(store.checkpoint("acct", "INBOX").await.unwrap(), Some(cp(3)));
    assert_eq!(store.delivery("k4").await.unwrap(), None);
    assert_eq!(store.delivery("k5").await.unwrap(), None);
    assert!(store.pending_post_actions("acct", "INBOX", 7).await.unwrap().is_empty());
    // And it delivers nothing more: the first refused write revoked its local trust.
    assert!(!old.holds_lease());
    assert!(!old_fence.holds());
    // An unfenced store (the operator's commands) is not bound by leases.
    assert!(store.holds_lease());
    let names: Vec<Option<String>> = store.leases().await.unwrap().into_iter().map(|l| l.owner).collect();
    assert_eq!(names, vec![Some("inboxd 2 on host-b".to_string())]);
}

#[tokio::test]
async fn the_local_clock_stops_deliveries_before_the_database_says_so() {
    let db = PgDatabase::create().unwrap();
    let store = PgStore::open(db.url()).await.unwrap();
    assert_eq!(store.acquire("a", TTL, "acct", "INBOX").await.unwrap(), Some(1));
    // Trusted until a moment ago (the last renewal was sent too long ago, as after a pause).
    let fence = Arc::new(Fence::new("acct", "INBOX", "a", 1, Instant::now()));
    let held = store.fenced(fence.clone());
    assert!(!held.holds_lease());
    fence.trust_until(Instant::now() + TTL);
    assert!(held.holds_lease());
}

#[tokio::test]
async fn instances_announce_themselves_and_leaving_frees_their_watches() {
    let db = PgDatabase::create().unwrap();
    let store = PgStore::open(db.url()).await.unwrap();
    assert_eq!(store.heartbeat("a", "inboxd 1 on h", TTL).await.unwrap(), 1);
    assert_eq!(store.heartbeat("b", "inboxd 2 on h", TTL).await.unwrap(), 2);
    assert_eq!(store.heartbeat("a", "inboxd 1 on h", TTL).await.unwrap(), 2);
    assert_eq!(store.acquire("a", TTL, "acct", "INBOX").await.unwrap(), Some(1));
    assert_eq!(store.acquire("a", TTL, "acct", "Other").await.unwrap(), Some(1));
    store.leave("a").await.unwrap();
    assert_eq!(store.heartbeat("b", "inboxd 2 on h", TTL).await.unwrap(), 1);
    assert_eq!(store.acquire("b", TTL, "acct", "INBOX").await.unwrap(), Some(2));
    assert_eq!(store.acquire("b", TTL, "acct", "Other").await.unwrap(), Some(2));
}

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_delivers_nothing_under_a_lease_its_clock_no_longer_trusts() {
    let dv = support::dovecot();
    support::append(&dv, "INBOX", &["one", "two"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let db = PgDatabase::create().unwrap();
    let store = PgStore::open(db.url()).await.unwrap();
    assert_eq!(store.acquire("a", TTL, "t", "INBOX").await.unwrap(), Some(1));
    // The lease is held in the database, but this process was paused past its own deadline.
    let fence = Arc::new(Fence::new("t", "INBOX", "a", 1, Instant::now()));
    let rec = support::Recorder::default();
    let w = inboxd::watcher::Watcher::with_handler(
        config.watches[0].clone(),
        Arc::new(store.fenced(fence.clone())),
        Box::new(rec.clone()),
        inboxd::watcher::Mode::Once,
    );
    let e = w.join().await.unwrap_err();
    assert!(format!("{e:#}").contains("lost its lease"), "{e:#}");
    assert!(
        rec.uids().is_empty(),
        "delivered {:?} under an untrusted lease",
        rec.uids()
    );
    // Trusted again (a renewal came back): it delivers.
    fence.trust_until(Instant::now() + TTL);
    let w = inboxd::watcher::Watcher::with_handler(
        config.watches[0].clone(),
        Arc::new(store.fenced(fence)),
        Box::new(rec.clone()),
        inboxd::watcher::Mode::Once,
    );
    w.join().await.unwrap();
    assert_eq!(rec.uids(), vec![1, 2]);
    assert_eq!(store.checkpoint("t", "INBOX").await.unwrap().unwrap().last_uid, 2);
}
