//! One suite for every state store: each case runs against the SQLite store (a file of its
//! own) and the PostgreSQL store (a database of its own on the machine's PostgreSQL).

use std::collections::HashMap;
use std::sync::Arc;

#[cfg(feature = "postgres")]
use inboxd::store::PgStore;
use inboxd::store::{Delivery, DeliveryStatus, SqliteStore, Store};
use inboxd_core::checkpoint::Checkpoint;
#[cfg(feature = "postgres")]
use inboxd_testbed::PgDatabase;

/// A store under test, and how to open it again (a restart).
struct Backend {
    store: Arc<dyn Store>,
    reopen: Box<dyn Fn() -> futures::future::BoxFuture<'static, Arc<dyn Store>>>,
    _keep: Box<dyn std::any::Any>,
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    Backend {
        store,
        reopen: Box::new(move || {
            let path = path.clone();
            Box::pin(async move { Arc::new(SqliteStore::open(&path).await.unwrap()) as Arc<dyn Store> })
        }),
        _keep: Box::new(dir),
    }
}

#[cfg(feature = "postgres")]
async fn postgres() -> Backend {
    let db = PgDatabase::create().expect("a database on the machine's PostgreSQL (scripts/install-deps starts it)");
    let url = db.url().to_string();
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&url).await.unwrap());
    Backend {
        store,
        reopen: Box::new(move || {
            let url = url.clone();
            Box::pin(async move { Arc::new(PgStore::open(&url).await.unwrap()) as Arc<dyn Store> })
        }),
        _keep: Box::new(db),
    }
}

/// Runs each case against both backends.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::sqlite().await).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres_store {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::postgres().await).await;
                }
            )*
        }
    };
}

suite!(
    a_commit_round_trips_and_survives_a_restart,
    the_checkpoint_never_moves_backwards_within_an_epoch,
    failed_attempts_are_counted_per_folder,
    a_message_id_is_seen_across_epochs_once_delivered_or_skipped,
    secrets_are_replaced_whole,
    post_action_states_are_kept_and_listed,
    target_acknowledgements_are_recorded_once,
    dead_letters_are_acknowledged_until_replayed,
    a_route_stands_until_another_is_written,
    server_text_with_nul_bytes_cannot_fail_a_commit,
    a_large_batch_commits_in_one_transaction,
    a_message_is_found_by_the_key_its_targets_got,
);

fn cp(uidvalidity: u32, last_uid: u32) -> Checkpoint {
    Checkpoint {
        uidvalidity,
        last_uid,
        dedupe_through: 0,
    }
}

fn row(key: &str, uid: u32, status: DeliveryStatus, message_id: &str) -> Delivery {
    Delivery {
        key: key.into(),
        account: "acct".into(),
        folder: "INBOX".into(),
        uidvalidity: 9,
        uid,
        message_id: message_id.into(),
        target_key: String::new(),
        status,
        attempts: 1,
        last_error: String::new(),
        route: String::new(),
        acknowledged: false,
        updated_at: 0,
    }
}

async fn a_commit_round_trips_and_survives_a_restart(b: Backend) {
    let s = &b.store;
    assert_eq!(s.checkpoint("acct", "INBOX").await.unwrap(), None);
    s.commit(
        "acct",
        "INBOX",
        cp(9, 4),
        &[row("k1", 4, DeliveryStatus::Delivered, "<m1@x>")],
    )
    .await
    .unwrap();
    s.commit("acct", "Archive", cp(3, 1), &[]).await.unwrap();
    let s = (b.reopen)().await;
    assert_eq!(s.checkpoint("acct", "INBOX").await.unwrap(), Some(cp(9, 4)));
    let d = s.delivery("k1").await.unwrap().unwrap();
    assert_eq!(
        (d.uid, d.status, d.message_id.as_str(), d.attempts),
        (4, DeliveryStatus::Delivered, "<m1@x>", 1)
    );
    assert!(d.updated_at > 0);
    assert_eq!(s.delivery("nope").await.unwrap(), None);
    let all = s.checkpoints().await.unwrap();
    let names: Vec<(&str, &str, u32)> = all
        .iter()
        .map(|c| (c.account.as_str(), c.folder.as_str(), c.checkpoint.last_uid))
        .collect();
    assert_eq!(names, vec![("acct", "Archive", 1), ("acct", "INBOX", 4)]);
}

async fn the_checkpoint_never_moves_backwards_within_an_epoch(b: Backend) {
    let s = &b.store;
    s.commit("acct", "INBOX", cp(9, 100), &[]).await.unwrap();
    // A second writer that is behind: refused, and its log rows do not stand either.
    let e = s
        .commit(
            "acct",
            "INBOX",
            cp(9, 90),
            &[row("k90", 90, DeliveryStatus::Delivered, "<m90>")],
        )
        .await
        .unwrap_err();
    assert!(format!("{:?}", e.source).contains("ahead of uid 90"), "{e:?}");
    assert_eq!(s.checkpoint("acct", "INBOX").await.unwrap(), Some(cp(9, 100)));
    assert_eq!(s.delivery("k90").await.unwrap(), None);
    // The same position again and a new epoch are fine; the store is still usable.
    s.commit("acct", "INBOX", cp(9, 100), &[]).await.unwrap();
    s.commit("acct", "INBOX", cp(10, 1), &[]).await.unwrap();
    assert_eq!(s.checkpoint("acct", "INBOX").await.unwrap(), Some(cp(10, 1)));
}

async fn failed_attempts_are_counted_per_folder(b: Backend) {
    let s = &b.store;
    let mut failed = row("k5", 5, DeliveryStatus::Failed, "<m5>");
    failed.attempts = 2;
    failed.last_error = "exit status 3".into();
    let mut elsewhere = row("k6", 6, DeliveryStatus::Failed, "<m6>");
    elsewhere.folder = "Other".into();
    s.record(&[
        failed.clone(),
        elsewhere,
        row("k7", 7, DeliveryStatus::Delivered, "<m7>"),
    ])
    .await
    .unwrap();
    let attempts = s.failed_attempts("acct", "INBOX").await.unwrap();
    assert_eq!(attempts, HashMap::from([("k5".to_string(), 2)]));
    // Delivered at last: no longer counted.
    failed.status = DeliveryStatus::Delivered;
    failed.attempts = 3;
    s.commit("acct", "INBOX", cp(9, 7), &[failed]).await.unwrap();
    assert!(s.failed_attempts("acct", "INBOX").await.unwrap().is_empty());
    assert_eq!(s.delivery("k5").await.unwrap().unwrap().attempts, 3);
}

async fn a_message_id_is_seen_across_epochs_once_delivered_or_skipped(b: Backend) {
    let s = &b.store;
    let mut old = row("k1", 1, DeliveryStatus::Delivered, "<a@x>");
    old.uidvalidity = 1;
    s.record(&[
        old,
        row("k2", 2, DeliveryStatus::Skipped, "<b@x>"),
        row("k3", 3, DeliveryStatus::Dead, "<c@x>"),
        row("k4", 4, DeliveryStatus::Failed, "<d@x>"),
    ])
    .await
    .unwrap();
    assert!(s.seen_message_id("acct", "INBOX", "<a@x>").await.unwrap());
    assert!(s.seen_message_id("acct", "INBOX", "<b@x>").await.unwrap());
    assert!(!s.seen_message_id("acct", "INBOX", "<c@x>").await.unwrap());
    assert!(!s.seen_message_id("acct", "INBOX", "<d@x>").await.unwrap());
    assert!(!s.seen_message_id("acct", "Other", "<a@x>").await.unwrap());
}

async fn secrets_are_replaced_whole(b: Backend) {
    let s = &b.store;
    assert_eq!(s.secret("refresh").await.unwrap(), None);
    s.put_secret("refresh", "one", "fp1").await.unwrap();
    s.put_secret("refresh", "two", "fp2").await.unwrap();
    assert_eq!(
        s.secret("refresh").await.unwrap(),
        Some(("two".to_string(), "fp2".to_string()))
    );
}

async fn post_action_states_are_kept_and_listed(b: Backend) {
    let s = &b.store;
    let rows: Vec<Delivery> = (1..=4)
        .map(|u| row(&format!("k{u}"), u, DeliveryStatus::Delivered, &format!("<m{u}>")))
        .collect();
    s.commit("acct", "INBOX", cp(9, 4), &rows).await.unwrap();
    s.set_post_action(&["k1".into(), "k3".into()], "pending").await.unwrap();
    s.set_post_action(&["k2".into()], "pending move:Done").await.unwrap();
    s.set_post_action(&["k4".into()], "failed: [TRYCREATE] no such folder")
        .await
        .unwrap();
    s.set_post_action(&[], "pending").await.unwrap();
    assert_eq!(
        s.pending_post_actions("acct", "INBOX", 9).await.unwrap(),
        vec![
            (1, "pending".to_string()),
            (2, "pending move:Done".to_string()),
            (3, "pending".to_string())
        ]
    );
    assert!(s.pending_post_actions("acct", "INBOX", 8).await.unwrap().is_empty());
    s.set_post_action(&["k1".into()], "").await.unwrap();
    let problems = s.post_action_problems(10).await.unwrap();
    let mut keys: Vec<(String, String)> = problems.into_iter().map(|(d, st)| (d.key, st)).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            ("k2".to_string(), "pending move:Done".to_string()),
            ("k3".to_string(), "pending".to_string()),
            ("k4".to_string(), "failed: [TRYCREATE] no such folder".to_string()),
        ]
    );
}

async fn target_acknowledgements_are_recorded_once(b: Backend) {
    let s = &b.store;
    s.record_targets("k1", &["tickets".into(), "archive".into()])
        .await
        .unwrap();
    s.record_targets("k1", &["archive".into()]).await.unwrap();
    s.record_targets("k1", &[]).await.unwrap();
    assert_eq!(
        s.targets_done("k1").await.unwrap(),
        vec!["archive".to_string(), "tickets".to_string()]
    );
    assert!(s.targets_done("k2").await.unwrap().is_empty());
}

async fn dead_letters_are_acknowledged_until_replayed(b: Backend) {
    let s = &b.store;
    let dead = row("k1", 1, DeliveryStatus::Dead, "<m1>");
    let mut other = row("k2", 2, DeliveryStatus::Dead, "<m2>");
    other.folder = "Other".into();
    s.record(&[dead.clone(), other, row("k3", 3, DeliveryStatus::Delivered, "<m3>")])
        .await
        .unwrap();
    let mut counts = s.unacknowledged_dead().await.unwrap();
    counts.sort();
    assert_eq!(
        counts,
        vec![
            ("acct".to_string(), "INBOX".to_string(), 1),
            ("acct".to_string(), "Other".to_string(), 1)
        ]
    );
    assert!(s.acknowledge("k1").await.unwrap());
    assert!(
        !s.acknowledge("k3").await.unwrap(),
        "a delivered message is no dead letter"
    );
    assert!(!s.acknowledge("nope").await.unwrap());
    assert_eq!(s.unacknowledged_dead().await.unwrap().len(), 1);
    assert!(s.delivery("k1").await.unwrap().unwrap().acknowledged);
    // Dead again (a failed replay's row written anew): the mark stays.
    s.record(std::slice::from_ref(&dead)).await.unwrap();
    assert!(s.delivery("k1").await.unwrap().unwrap().acknowledged);
    // Replayed (any other status): the mark goes with the status.
    let mut replayed = dead;
    replayed.status = DeliveryStatus::Failed;
    s.record(&[replayed]).await.unwrap();
    assert!(!s.delivery("k1").await.unwrap().unwrap().acknowledged);
    let by_status = s.by_status(DeliveryStatus::Dead, 10).await.unwrap();
    assert_eq!(by_status.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), vec!["k2"]);
}

async fn a_route_stands_until_another_is_written(b: Backend) {
    let s = &b.store;
    let mut r = row("k1", 1, DeliveryStatus::Failed, "<m1>");
    r.route = "rule \"invoices\" -> tickets".into();
    s.record(std::slice::from_ref(&r)).await.unwrap();
    r.route = String::new();
    r.status = DeliveryStatus::Delivered;
    s.commit("acct", "INBOX", cp(9, 1), std::slice::from_ref(&r))
        .await
        .unwrap();
    assert_eq!(
        s.delivery("k1").await.unwrap().unwrap().route,
        "rule \"invoices\" -> tickets"
    );
    r.route = "else -> archive".into();
    s.record(&[r]).await.unwrap();
    assert_eq!(s.delivery("k1").await.unwrap().unwrap().route, "else -> archive");
}

async fn server_text_with_nul_bytes_cannot_fail_a_commit(b: Backend) {
    let s = &b.store;
    let mut r = row("k1", 1, DeliveryStatus::Dead, "<evil\0id@x>");
    r.last_error = "server said \0 and more".into();
    s.commit("acct", "INBOX", cp(9, 1), &[r]).await.unwrap();
    let d = s.delivery("k1").await.unwrap().unwrap();
    assert!(
        d.message_id.starts_with("<evil") && d.message_id.ends_with("id@x>"),
        "{d:?}"
    );
    assert!(d.last_error.ends_with(" and more"), "{d:?}");
}

async fn a_large_batch_commits_in_one_transaction(b: Backend) {
    let s = &b.store;
    let rows: Vec<Delivery> = (1..=700)
        .map(|u| row(&format!("k{u}"), u, DeliveryStatus::Delivered, &format!("<m{u}>")))
        .collect();
    s.commit("acct", "INBOX", cp(9, 700), &rows).await.unwrap();
    assert_eq!(s.delivery("k700").await.unwrap().unwrap().uid, 700);
    assert!(s.seen_message_id("acct", "INBOX", "<m1>").await.unwrap());
    // A refused commit of as many rows leaves none of them.
    let more: Vec<Delivery> = (701..=1400)
        .map(|u| row(&format!("k{u}"), u, DeliveryStatus::Delivered, &format!("<m{u}>")))
        .collect();
    assert!(s.commit("acct", "INBOX", cp(9, 600), &more).await.is_err());
    assert_eq!(s.delivery("k701").await.unwrap(), None);
    assert_eq!(s.delivery("k1400").await.unwrap(), None);
}

/// Gmail: two folders' rows (their own keys) share the key their targets got; either finds a
/// row, its own key first; a later row without one keeps it; an empty key finds nothing.
async fn a_message_is_found_by_the_key_its_targets_got(b: Backend) {
    let s = &b.store;
    let mut inbox = row("v1-a-9-1", 1, DeliveryStatus::Delivered, "<m1>");
    inbox.target_key = "gm1-x-17".into();
    s.commit("acct", "INBOX", cp(9, 1), std::slice::from_ref(&inbox))
        .await
        .unwrap();
    let mut label = row("v1-b-9-5", 5, DeliveryStatus::Failed, "<m1>");
    label.folder = "Label".into();
    label.target_key = "gm1-x-17".into();
    s.record(std::slice::from_ref(&label)).await.unwrap();
    let found = s.delivery("gm1-x-17").await.unwrap().unwrap();
    assert_eq!(found.target_key, "gm1-x-17");
    assert!(["v1-a-9-1", "v1-b-9-5"].contains(&found.key.as_str()), "{found:?}");
    let own = s.delivery("v1-a-9-1").await.unwrap().unwrap();
    assert_eq!((own.uid, own.target_key.as_str()), (1, "gm1-x-17"));
    // A retry's row written without the key (the body not at hand) keeps the one recorded.
    label.target_key = String::new();
    label.status = DeliveryStatus::Dead;
    s.record(std::slice::from_ref(&label)).await.unwrap();
    assert_eq!(s.delivery("v1-b-9-5").await.unwrap().unwrap().target_key, "gm1-x-17");
    assert_eq!(s.delivery("").await.unwrap(), None);
    assert_eq!(s.delivery("gm1-x-18").await.unwrap(), None);
}
