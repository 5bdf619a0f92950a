//! A full disk under the Maildir: nothing is acknowledged while writes fail, the watcher retries
//! along its schedule (no tight loop, not parked), and everything arrives once space returns.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_acknowledges_nothing_and_recovers_when_space_returns() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED a_full_disk_acknowledges_nothing_and_recovers_when_space_returns: not root");
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
        eprintln!("SKIPPED a_full_disk_acknowledges_nothing_and_recovers_when_space_returns: cannot mount tmpfs here");
        return;
    }
    let _guard = Mount(mnt.clone());
    let msgs: Vec<Vec<u8>> = (0..12)
        .map(|i| inboxd::testbed::sample_message(i, &format!("big{i}"), 60_000))
        .collect();
    append_raw(&dv, "INBOX", &msgs).await;
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"300ms\" } ]",
        "start = \"all\"\nbatch_size = 4\ndeliver = { maildir = \"out\" }",
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
        assert!(cp < 12);

        let ok = Command::new("mount")
            .args(["-o", "remount,size=16m"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        while st.checkpoint("t", "INBOX").await.unwrap().map_or(0, |c| c.last_uid) < 12 {
            wait_for(&mut ev, 30, |e| matches!(e, Event::Delivered { .. })).await;
        }
        w.stop().await.unwrap();
    }
    assert_eq!(st.checkpoint("t", "INBOX").await.unwrap().unwrap().last_uid, 12);
    assert_eq!(
        std::fs::read_dir(mnt.join("new")).unwrap().count(),
        12,
        "every message exactly once"
    );
    assert_eq!(std::fs::read_dir(mnt.join("tmp")).unwrap().count(), 0);
}
