//! A full disk under the Maildir: nothing is acknowledged while writes fail, the watcher retries
//! along its schedule (no tight loop, not parked), and everything arrives once space returns.
//! A full disk under the state store: a failed commit leaves the store usable, and the next
//! commit after space returns is really on disk (seen from another connection).
//! Needs root (it mounts a small tmpfs); skipped with a message otherwise.

mod support;

use std::process::Command;

use inboxd::watcher::{Event, Mode, Watcher};
use support::*;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn tmpfs(dir: &std::path::Path, size: &str) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap()
        .success();
    ok.then(|| Mount(dir.to_path_buf()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_state_commit_leaves_the_store_usable_and_later_commits_reach_the_disk() {
    use inboxd::core::checkpoint::Checkpoint;
    use inboxd::store::{SqliteStore, Store};
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED a_failed_state_commit_leaves_the_store_usable: not root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("state");
    let Some(_guard) = tmpfs(&mnt, "1m") else {
        eprintln!("SKIPPED a_failed_state_commit_leaves_the_store_usable: cannot mount tmpfs here");
        return;
    };
    let path = mnt.join("s.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let cp = |last_uid| Checkpoint {
        uidvalidity: 7,
        last_uid,
        dedupe_through: 0,
    };
    let log = |uid: u32| {
        vec![inboxd::store::Delivery {
            key: format!("k{uid}"),
            account: "a".into(),
            folder: "INBOX".into(),
            uidvalidity: 7,
            uid,
            message_id: "x".repeat(20_000),
            target_key: String::new(),
            status: inboxd::store::DeliveryStatus::Delivered,
            attempts: 1,
            last_error: String::new(),
            route: String::new(),
            acknowledged: false,
            updated_at: 0,
        }]
    };
    store.commit("a", "INBOX", cp(3), &log(3)).await.unwrap();
    // Fill the file system, then commit until SQLite runs out of space.
    let fill = mnt.join("fill");
    let _ = std::fs::write(&fill, vec![0u8; 2 << 20]);
    let mut failures = 0;
    for uid in 4..40 {
        if store.commit("a", "INBOX", cp(uid), &log(uid)).await.is_err() {
            failures += 1;
            if failures == 2 {
                break;
            }
        }
    }
    assert_eq!(failures, 2, "the disk never filled");
    std::fs::remove_file(&fill).unwrap();
    store.commit("a", "INBOX", cp(100), &log(100)).await.unwrap();
    // Another connection sees it: it is on disk, and no write transaction is left open.
    let other = SqliteStore::open(&path).await.unwrap();
    assert_eq!(
        other.checkpoint("a", "INBOX").await.unwrap().map(|c| c.last_uid),
        Some(100)
    );
    other.commit("a", "INBOX", cp(101), &log(101)).await.unwrap();
    drop(other);
    assert_eq!(
        store.checkpoint("a", "INBOX").await.unwrap().map(|c| c.last_uid),
        Some(101)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_acknowledges_nothing_and_recovers_when_space_returns() {
    full_disk(
        "a_full_disk_acknowledges_nothing_and_recovers_when_space_returns",
        12,
        60_000,
        4,
    )
    .await;
}

/// The same with batches of 40 small messages (a catch-up's), the disk filling up within one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_a_batch_of_many_small_messages_acknowledges_nothing() {
    full_disk(
        "a_full_disk_during_a_batch_of_many_small_messages_acknowledges_nothing",
        80,
        10_000,
        40,
    )
    .await;
}

/// `n` messages of `size` bytes, `batch_size` at a time, into a Maildir on a 256 KiB tmpfs
/// that fills up; then it grows to 16 MiB.
async fn full_disk(name: &str, n: u32, size: usize, batch_size: u32) {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {name}: not root");
        return;
    }
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("out");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    if !ok {
        eprintln!("SKIPPED {name}: cannot mount tmpfs here");
        return;
    }
    let _guard = Mount(mnt.clone());
    let msgs: Vec<Vec<u8>> = (0..n as usize)
        .map(|i| inboxd_testbed::sample_message(i, &format!("big{i}"), size))
        .collect();
    append_raw(&dv, "INBOX", &msgs).await;
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"300ms\" } ]",
        &format!("start = \"all\"\nbatch_size = {batch_size}\ndeliver = {{ maildir = \"out\" }}"),
    );
    let st = store(&config).await;
    {
        let w = Watcher::start(config.watches[0].clone(), st.clone(), Mode::Forever).unwrap();
        let mut ev = w.subscribe();
        let e = wait_for(&mut ev, 30, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
        let Event::Disconnected {
            error: Some(err),
            retry_in: Some(d),
            ..
        } = e
        else {
            unreachable!()
        };
        assert!(err.contains("No space left"), "{err}");
        assert!(
            d < std::time::Duration::from_secs(60),
            "retried along the schedule, not parked: {d:?}"
        );
        // Whatever is acknowledged is really on disk.
        let cp = st.checkpoint("t", "INBOX").await.unwrap().map_or(0, |c| c.last_uid);
        let files = std::fs::read_dir(mnt.join("new")).unwrap().count() as u32;
        assert!(cp <= files, "checkpoint {cp} ahead of the {files} files on disk");
        assert!(cp < n);

        let ok = Command::new("mount")
            .args(["-o", "remount,size=16m"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        while st.checkpoint("t", "INBOX").await.unwrap().map_or(0, |c| c.last_uid) < n {
            wait_for(&mut ev, 30, |e| matches!(e, Event::Delivered { .. })).await;
        }
        w.stop().await.unwrap();
    }
    assert_eq!(st.checkpoint("t", "INBOX").await.unwrap().unwrap().last_uid, n);
    assert_eq!(
        std::fs::read_dir(mnt.join("new")).unwrap().count(),
        n as usize,
        "every message exactly once"
    );
    assert_eq!(std::fs::read_dir(mnt.join("tmp")).unwrap().count(), 0);
}
