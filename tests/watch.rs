//! End-to-end behaviour of a watcher against a real Dovecot.

mod support;

use std::time::Duration;

use inboxd::watcher::{Event, Mode, Watcher};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_appended_while_idle_is_delivered_to_exec() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let script = dir.path().join("handler.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat > \"out/$INBOXD_KEY\"\nenv | grep ^INBOXD_ | sort > \"out/$INBOXD_KEY.env\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = config(&dv, dir.path(), "", r#"deliver = { exec = ["./handler.sh"] }"#);
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    wait_state(&w, "idle").await;

    let msg = inboxd_testbed::sample_message(1, "hello", 2000);
    append_raw(&dv, "INBOX", std::slice::from_ref(&msg)).await;
    let Event::Delivered { key, uid, .. } = wait_for(&mut ev, 20, |e| matches!(e, Event::Delivered { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(uid, 1);
    assert_eq!(
        std::fs::read(out.join(&key)).unwrap(),
        msg,
        "stdin must be the exact server bytes"
    );
    let env = std::fs::read_to_string(out.join(format!("{key}.env"))).unwrap();
    assert!(
        env.contains("INBOXD_ACCOUNT=t\n") && env.contains("INBOXD_FOLDER=INBOX\n") && env.contains("INBOXD_UID=1\n"),
        "{env}"
    );
    assert!(
        env.contains(&format!("INBOXD_KEY={key}\n")) && env.contains(&format!("INBOXD_SIZE={}\n", msg.len())),
        "{env}"
    );
    assert!(env.contains("INBOXD_MESSAGE_ID=1."), "{env}");
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_appended_while_idle_is_delivered_to_maildir_once() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dv, dir.path(), "", r#"deliver = { maildir = "out" }"#);
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    append(&dv, "INBOX", &["a", "b"]).await;
    wait_delivered(&mut ev, 2, 20).await;
    w.stop().await.unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out/new"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("v1-")), "{names:?}");
    // The server's copy is untouched: BODY.PEEK[] never sets \Seen.
    let flags = dv
        .doveadm(&["fetch", "-u", "alice", "flags", "mailbox", "INBOX"])
        .unwrap();
    assert!(!flags.contains("\\Seen"), "{flags}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_is_delivered_in_uid_order_with_start_all_and_skipped_with_start_new() {
    let dv = dovecot();
    append(&dv, "INBOX", &["m1", "m2", "m3", "m4", "m5"]).await;
    let dir = tempfile::tempdir().unwrap();
    // A batch size of 2 makes the catch-up span several fetches.
    let all = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\nbatch_size = 2\ndeliver = { maildir = \"out\" }",
    );
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        all.watches[0].clone(),
        store(&all).await,
        Box::new(rec.clone()),
        Mode::Once,
    );
    w.join().await.unwrap();
    assert_eq!(rec.uids(), vec![1, 2, 3, 4, 5]);
    assert_eq!(rec.subjects(), vec!["m1", "m2", "m3", "m4", "m5"]);

    let dir2 = tempfile::tempdir().unwrap();
    let new = config(&dv, dir2.path(), "", "deliver = { maildir = \"out\" }");
    let rec2 = Recorder::default();
    let w = Watcher::with_handler(
        new.watches[0].clone(),
        store(&new).await,
        Box::new(rec2.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    append(&dv, "INBOX", &["m6"]).await;
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec2.uids(), vec![6], "start = \"new\" must not replay history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loses_nothing_and_repeats_nothing() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    append(&dv, "INBOX", &["a", "b"]).await;
    wait_delivered(&mut ev, 2, 20).await;
    w.stop().await.unwrap();

    // Mail arrives while inboxd is down.
    append(&dv, "INBOX", &["c", "d"]).await;
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_delivered(&mut ev, 2, 20).await;
    append(&dv, "INBOX", &["e"]).await;
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.uids(), vec![1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_change_dedupes_by_default() {
    let dv = dovecot();
    imap(&dv, "CREATE Work").await;
    let old = inboxd_testbed::sample_message(1, "old", 300);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        "folder = \"Work\"\nstart = \"all\"\ndeliver = { maildir = \"out\" }",
    );
    append_raw(&dv, "Work", std::slice::from_ref(&old)).await;
    let rec = Recorder::default();
    Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Once,
    )
    .join()
    .await
    .unwrap();
    assert_eq!(rec.subjects(), vec!["old"]);

    // The folder is recreated holding the old message again plus a new one.
    imap(&dv, "DELETE Work").await;
    imap(&dv, "CREATE Work").await;
    let new = inboxd_testbed::sample_message(2, "new", 300);
    append_raw(&dv, "Work", &[old.clone(), new]).await;
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Once,
    );
    let mut ev = w.subscribe();
    w.join().await.unwrap();
    assert_eq!(
        rec.subjects(),
        vec!["old", "new"],
        "the old message must not come again; the new one must"
    );
    let mut saw_change = false;
    while let Ok(e) = ev.try_recv() {
        saw_change |= matches!(e, Event::UidValidityChanged { .. });
    }
    assert!(saw_change);
}

/// A folder "Work" holding one message ("old", returned), watched from the start and caught
/// up: the watcher, what it delivered, its events.
async fn watch_work(
    dv: &inboxd_testbed::Dovecot,
    dir: &std::path::Path,
) -> (Watcher, Recorder, tokio::sync::broadcast::Receiver<Event>, Vec<u8>) {
    imap(dv, "CREATE Work").await;
    let old = inboxd_testbed::sample_message(1, "old", 300);
    append_raw(dv, "Work", std::slice::from_ref(&old)).await;
    let config = config(
        dv,
        dir,
        "",
        "folder = \"Work\"\nstart = \"all\"\ndeliver = { maildir = \"out\" }",
    );
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    (w, rec, ev, old)
}

/// The folder is deleted and created again while the watcher idles in it: Dovecot keeps the
/// session on the deleted folder (even a STATUS of the folder's name, on that session, reports
/// the deleted folder's UIDVALIDITY), so the wake SELECTs again and finds the new folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_recreated_under_an_idling_session_is_noticed_at_the_next_wake() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let (w, rec, mut ev, old) = watch_work(&dv, dir.path()).await;
    assert_eq!(rec.subjects(), vec!["old"]);
    imap(&dv, "DELETE Work").await;
    imap(&dv, "CREATE Work").await;
    // Dovecot briefly answers "Mailbox was deleted under us" to an APPEND right after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = inboxd_testbed::sample_message(2, "new", 300);
    append_raw(&dv, "Work", &[old, new]).await;
    let mut seen = Vec::new();
    let t = std::time::Instant::now();
    while rec.subjects().len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the new message never came: {seen:?}"
        );
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(100), ev.recv()).await {
            seen.push(e);
        }
    }
    w.stop().await.unwrap();
    while let Ok(e) = ev.try_recv() {
        seen.push(e);
    }
    assert_eq!(rec.subjects(), vec!["old", "new"], "{seen:?}");
    assert!(
        seen.iter().any(|e| matches!(e, Event::UidValidityChanged { .. })),
        "{seen:?}"
    );
}

/// The folder's UIDVALIDITY changes in place while the watcher idles in it (a restore from a
/// backup; `doveadm mailbox update --uid-validity` here), then mail comes. The wake on that
/// mail must not list the old incarnation's UIDs as if nothing had happened. Dovecot 2.3 ends
/// the session (`* BYE IMAP session state is inconsistent, please relogin.`) and the
/// reconnect's SELECT sees the change; the old message is recognised, the new one delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uidvalidity_changed_in_place_under_an_idling_session_is_noticed() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let (w, rec, mut ev, _) = watch_work(&dv, dir.path()).await;
    // Idling: the wait has begun.
    tokio::time::sleep(Duration::from_millis(300)).await;
    dv.doveadm(&["mailbox", "update", "-u", "alice", "--uid-validity", "777", "Work"])
        .unwrap();
    let new = inboxd_testbed::sample_message(2, "new", 300);
    append_raw(&dv, "Work", &[new]).await;
    let mut seen = Vec::new();
    let t = std::time::Instant::now();
    while !seen.iter().any(|e| matches!(e, Event::UidValidityChanged { .. })) || rec.subjects().len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the change or the new message never came: {:?} {seen:?}",
            rec.subjects()
        );
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(100), ev.recv()).await {
            seen.push(e);
        }
    }
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["old", "new"], "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_change_skip_and_replay_policies() {
    for (policy, expected) in [("skip", vec!["old"]), ("replay", vec!["old", "old", "new"])] {
        let dv = dovecot();
        imap(&dv, "CREATE Work").await;
        let old = inboxd_testbed::sample_message(1, "old", 300);
        let dir = tempfile::tempdir().unwrap();
        let config = config(
            &dv,
            dir.path(),
            "",
            &format!(
                "folder = \"Work\"\nstart = \"all\"\non_uidvalidity_change = \"{policy}\"\ndeliver = {{ maildir = \"out\" }}"
            ),
        );
        append_raw(&dv, "Work", std::slice::from_ref(&old)).await;
        let rec = Recorder::default();
        Watcher::with_handler(
            config.watches[0].clone(),
            store(&config).await,
            Box::new(rec.clone()),
            Mode::Once,
        )
        .join()
        .await
        .unwrap();
        imap(&dv, "DELETE Work").await;
        imap(&dv, "CREATE Work").await;
        append_raw(
            &dv,
            "Work",
            &[old.clone(), inboxd_testbed::sample_message(2, "new", 300)],
        )
        .await;
        Watcher::with_handler(
            config.watches[0].clone(),
            store(&config).await,
            Box::new(rec.clone()),
            Mode::Once,
        )
        .join()
        .await
        .unwrap();
        assert_eq!(rec.subjects(), expected, "policy {policy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_idle_is_polled() {
    let dv = inboxd_testbed::Dovecot::start_with(inboxd_testbed::Options {
        capabilities: Some("IMAP4rev1 LITERAL+ UIDPLUS MOVE".into()),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "poll_interval = \"300ms\"",
        "deliver = { maildir = \"out\" }",
    );
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    wait_for(&mut ev, 5, |e| matches!(e, Event::CaughtUp { .. })).await;
    wait_state(&w, "polling").await;
    append(&dv, "INBOX", &["polled"]).await;
    wait_delivered(&mut ev, 1, 10).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["polled"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_dovecot_restart_and_delivers_what_arrived() {
    let mut dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"200ms\" } ]",
        "deliver = { maildir = \"out\" }",
    );
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    append(&dv, "INBOX", &["before"]).await;
    wait_delivered(&mut ev, 1, 20).await;

    dv.stop();
    wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    dv.restart().unwrap();
    append(&dv, "INBOX", &["during", "after"]).await;
    wait_delivered(&mut ev, 2, 30).await;
    assert!(w.health().reconnects >= 1);
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["before", "during", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_actions_are_visible_on_the_server() {
    let dv = dovecot();
    imap(&dv, "CREATE Done").await;
    for (after, check) in [
        ("seen", "seen"),
        ("flag:$Processed", "flag"),
        ("move:Done", "move"),
        ("delete", "delete"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = config(
            &dv,
            dir.path(),
            "",
            &format!("after = \"{after}\"\ndeliver = {{ maildir = \"out\" }}"),
        );
        let rec = Recorder::default();
        let w = Watcher::with_handler(
            config.watches[0].clone(),
            store(&config).await,
            Box::new(rec.clone()),
            Mode::Forever,
        );
        let mut ev = w.subscribe();
        wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
        append(&dv, "INBOX", &[after]).await;
        let uid = wait_delivered(&mut ev, 1, 20).await[0];
        // Post-actions run right after the commit; the next catch-up proves they finished.
        wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
        w.stop().await.unwrap();
        let uid_q = uid.to_string();
        let flags = dv
            .doveadm(&["fetch", "-u", "alice", "flags", "mailbox", "INBOX", "uid", &uid_q])
            .unwrap();
        match check {
            "seen" => assert!(flags.contains("\\Seen"), "{flags}"),
            "flag" => assert!(flags.contains("$Processed"), "{flags}"),
            "move" => {
                assert!(flags.trim().is_empty(), "moved away: {flags}");
                let moved = dv
                    .doveadm(&["search", "-u", "alice", "mailbox", "Done", "all"])
                    .unwrap();
                assert_eq!(moved.lines().count(), 1, "{moved}");
            }
            _ => assert!(flags.trim().is_empty(), "expunged: {flags}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_closure_runs_on_the_watchers_session_between_idles() {
    let dv = dovecot();
    append(&dv, "INBOX", &["x", "y"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dv, dir.path(), "", "deliver = { maildir = \"out\" }");
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(Recorder::default()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    let t = std::time::Instant::now();
    let (folder, all) = w
        .queue(|s| Box::pin(async move { (s.folder().map(str::to_string), s.search("ALL").await.unwrap()) }))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the queue must interrupt IDLE, not wait for idle_refresh"
    );
    assert_eq!((folder.as_deref(), all), (Some("INBOX"), vec![1, 2]));
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_mode_connects_runs_and_disconnects() {
    let dv = dovecot();
    append(&dv, "INBOX", &["x"]).await;
    // The user whose password needs quoting, over implicit TLS, with AUTHENTICATE PLAIN.
    let mut account = dv.account("quoted");
    account.port = dv.tls_port;
    account.tls = inboxd::config::TlsMode::Implicit;
    account.mechanism = inboxd::config::AuthMechanism::Plain;
    let n = inboxd::once_with(&account, "INBOX", async |s| s.search("ALL").await.unwrap().len())
        .await
        .unwrap();
    assert_eq!(n, 0);
    let mut alice = dv.account("alice");
    alice.mechanism = inboxd::config::AuthMechanism::Login;
    let caps = inboxd::once_with(&alice, "INBOX", async |s| s.capabilities())
        .await
        .unwrap();
    assert!(caps.contains(&"IDLE".to_string()), "{caps:?}");
    let mut quoted_login = dv.account("quoted");
    quoted_login.mechanism = inboxd::config::AuthMechanism::Login;
    inboxd::once_with(&quoted_login, "INBOX", async |_| ())
        .await
        .expect("LOGIN with a quoted password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_actions_fall_back_without_move_and_uidplus() {
    let dv = inboxd_testbed::Dovecot::start_with(inboxd_testbed::Options {
        capabilities: Some("IMAP4rev1 IDLE LITERAL+".into()),
        ..Default::default()
    })
    .unwrap();
    imap(&dv, "CREATE Done").await;
    append(&dv, "INBOX", &["keep-me"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        "after = \"move:Done\"\ndeliver = { maildir = \"out\" }",
    );
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(Recorder::default()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    append(&dv, "INBOX", &["moved"]).await;
    wait_delivered(&mut ev, 1, 20).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    w.stop().await.unwrap();
    // COPY + \Deleted, and no bare EXPUNGE (it would also remove messages others flagged
    // \Deleted, undelivered ones included): the copy is in Done, the original flagged.
    let undeleted = dv
        .doveadm(&["search", "-u", "alice", "mailbox", "INBOX", "undeleted"])
        .unwrap();
    let deleted = dv
        .doveadm(&["search", "-u", "alice", "mailbox", "INBOX", "deleted"])
        .unwrap();
    let done = dv
        .doveadm(&["search", "-u", "alice", "mailbox", "Done", "all"])
        .unwrap();
    assert_eq!(
        (undeleted.lines().count(), deleted.lines().count(), done.lines().count()),
        (1, 1, 1),
        "INBOX: {undeleted} / deleted {deleted} Done: {done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_connections_are_recycled_cleanly_without_losing_mail() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "recycle_after = \"1s\"",
        "deliver = { maildir = \"out\" }",
    );
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    // A clean recycle: a disconnect without error, then a new connection.
    wait_for(&mut ev, 10, |e| matches!(e, Event::Disconnected { error: None, .. })).await;
    wait_for(&mut ev, 10, |e| matches!(e, Event::Connected { .. })).await;
    append(&dv, "INBOX", &["after-recycle"]).await;
    wait_delivered(&mut ev, 1, 20).await;
    assert_eq!(w.health().reconnects, 0, "a recycle is not a failure");
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["after-recycle"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_selects_another_folder_never_changes_what_is_delivered() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    imap(&dv, "CREATE Other").await;
    append(&dv, "Other", &["other-1", "other-2", "other-3"]).await;
    append(&dv, "INBOX", &["inbox-1"]).await;
    let config = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let st = store(&config).await;
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        st.clone(),
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    w.queue(|s| Box::pin(async move { s.select("Other").await.map(|_| ()) }))
        .await
        .unwrap()
        .unwrap();
    append(&dv, "INBOX", &["inbox-2"]).await;
    wait_delivered(&mut ev, 1, 20).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["inbox-1", "inbox-2"]);
    assert_eq!(st.checkpoint("t", "INBOX").await.unwrap().unwrap().last_uid, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_action_refused_for_good_never_slows_delivery_and_shows_in_status() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    append(&dv, "INBOX", &["a", "b", "c"]).await;
    // A typo: the folder does not exist, so MOVE gets `NO [TRYCREATE]`.
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"1s\", until = \"2s\" }, { every = \"1h\" } ]",
        "start = \"all\"\nafter = \"move:Archiv\"\ndeliver = { exec = [\"true\"] }",
    );
    let st = store(&config).await;
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        st.clone(),
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::PostActionFailed { .. })).await;
    assert!(
        matches!(&e, Event::PostActionFailed { permanent: true, error, .. } if error.contains("TRYCREATE")),
        "{e:?}"
    );
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { last_uid: 3, .. })).await;
    // More mail flows at once: the round did not end on the refusal.
    append(&dv, "INBOX", &["d"]).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::Delivered { uid: 4, .. })).await;
    assert_eq!(w.health().reconnects, 0);
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["a", "b", "c", "d"]);
    // Recorded as failed for good, for `inboxd status` to show (its output is checked in
    // crates/cli/tests/cli.rs).
    let problems = st.post_action_problems(100).await.unwrap();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(
        problems
            .iter()
            .all(|(_, state)| state.starts_with("failed: ") && state.contains("TRYCREATE")),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_spooled_and_arrive_byte_for_byte_in_maildir_and_exec() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    // Sizes around the spool threshold (64 KiB) and the fetch piece, in one backlog.
    let piece = inboxd::watcher::SPOOL_CHUNK as usize;
    let sizes: [usize; 6] = [1_000, 70_000, piece, piece + 1, 2 * piece + 300, 300];
    let msgs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            // Exactly n bytes: the boundaries of the piece are what matters.
            let mut m = inboxd_testbed::sample_message(i + 1, &format!("m{i}"), n.saturating_sub(400));
            m.resize(n.max(m.len()), b'.');
            m
        })
        .collect();
    assert_eq!(msgs[2].len(), piece);
    append_raw(&dv, "INBOX", &msgs).await;
    // One run into a Maildir, one (with its own state) into a program.
    let md = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\nspool_above = \"64KiB\"\ndeliver = { maildir = \"md\" }",
    );
    let w = Watcher::start(md.watches[0].clone(), store(&md).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    let exec_dir = dir.path().join("exec");
    std::fs::create_dir(&exec_dir).unwrap();
    let out = exec_dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let script = exec_dir.join("handler.sh");
    std::fs::write(&script, "#!/bin/sh\ncat > \"out/$INBOXD_UID\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ex = config(
        &dv,
        &exec_dir,
        "",
        "start = \"all\"\nspool_above = \"64KiB\"\ndeliver = { exec = [\"./handler.sh\"] }",
    );
    let w = Watcher::start(ex.watches[0].clone(), store(&ex).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    for (i, m) in msgs.iter().enumerate() {
        let uid = i + 1;
        let exec = std::fs::read(out.join(uid.to_string())).unwrap();
        assert!(
            exec == *m,
            "exec got uid {uid} changed ({} vs {} bytes)",
            exec.len(),
            m.len()
        );
    }
    let mut in_maildir: Vec<Vec<u8>> = std::fs::read_dir(dir.path().join("md/new"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    in_maildir.sort();
    let mut expected = msgs.clone();
    expected.sort();
    assert!(
        in_maildir == expected,
        "the Maildir holds other bytes: {:?} vs {:?}",
        in_maildir.iter().map(Vec::len).collect::<Vec<_>>(),
        expected.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // Nothing left behind in either spool.
    assert_eq!(std::fs::read_dir(dir.path().join("md/tmp")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(exec_dir.join("state.db.spool")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_named_by_its_special_use_is_found_and_moved_to() {
    let dv = dovecot();
    for f in ["Junk", "Trash"] {
        imap(&dv, &format!("CREATE {f}")).await;
    }
    append(&dv, "Junk", &["spam 1", "spam 2"]).await;
    let dir = tempfile::tempdir().unwrap();
    // The config names uses, not folders: the server's `\Junk` and `\Trash` (RFC 6154).
    let junk = config(
        &dv,
        dir.path(),
        "",
        "folder = \"\\\\Junk\"\nstart = \"all\"\nafter = \"move:\\\\Trash\"\ndeliver = { maildir = \"out\" }",
    );
    assert_eq!(junk.watches[0].name(), "t/\\Junk");
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        junk.watches[0].clone(),
        store(&junk).await,
        Box::new(rec.clone()),
        Mode::Once,
    );
    assert_eq!(w.join().await.unwrap(), 0);
    assert_eq!(rec.subjects(), vec!["spam 1", "spam 2"]);
    let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
    assert_eq!(s.special_use("\\Junk").await.unwrap().as_deref(), Some("Junk"));
    assert_eq!(s.select("Junk").await.unwrap().exists, 0, "moved away");
    assert_eq!(s.select("Trash").await.unwrap().exists, 2, "into the \\Trash folder");
    s.logout().await;

    // A use no folder has is a clear, located failure of the watch; an unknown use, a config
    // error.
    let dir = tempfile::tempdir().unwrap();
    let archive = config_text_error(
        &dv,
        dir.path(),
        "folder = \"\\\\Archive\"\ndeliver = { maildir = \"out\" }",
    );
    assert!(archive.is_none());
    let dir = tempfile::tempdir().unwrap();
    let bad = config_text_error(
        &dv,
        dir.path(),
        "folder = \"\\\\Spam\"\ndeliver = { maildir = \"out\" }",
    );
    assert!(bad.is_some_and(|e| e.contains("no special use")));
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        "folder = \"\\\\Archive\"\ndeliver = { maildir = \"out\" }",
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    assert!(
        format!("{e:?}").contains("no folder has the special use \\\\Archive"),
        "{e:?}"
    );
    w.stop().await.unwrap();
}

/// The error of a config with these watch lines, if it does not load.
fn config_text_error(dv: &inboxd_testbed::Dovecot, dir: &std::path::Path, watch: &str) -> Option<String> {
    let text = format!(
        "[accounts.t]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\nuser = \"alice\"\npassword = \"alicepw\"\n\n[[watch]]\naccount = \"t\"\n{watch}\n",
        dv.port,
        dv.ca_file().display()
    );
    let path = dir.join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    inboxd::config::Config::load(&path).err().map(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_limit_per_host_keeps_watches_beyond_it_waiting_for_a_slot() {
    let dv = dovecot();
    for folder in ["A", "B", "C"] {
        dv.drop_messages("alice", folder, &[inboxd_testbed::sample_message(0, folder, 100)])
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!(
        "state = \"state.db\"\n[limits]\nconnections_per_host = 2\n[accounts.t]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\nuser = \"alice\"\npassword = \"alicepw\"\n",
        dv.port,
        dv.ca_file().display()
    );
    for folder in ["INBOX", "A", "B", "C"] {
        text.push_str(&format!(
            "[[watch]]\naccount = \"t\"\nfolder = \"{folder}\"\ndeliver = {{ maildir = \"out\" }}\n"
        ));
    }
    std::fs::write(dir.path().join("inboxd.toml"), text).unwrap();
    let config = inboxd::config::Config::load(&dir.path().join("inboxd.toml")).unwrap();
    assert_eq!(config.watches[0].account.limits.connections_per_host, Some(2));
    let st = store(&config).await;
    let mut watchers: Vec<Watcher> = config
        .watches
        .iter()
        .map(|w| Watcher::start(w.clone(), st.clone(), Mode::Forever).unwrap())
        .collect();
    let connected = |ws: &[Watcher]| ws.iter().filter(|w| w.health().connected).count();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connected(&watchers) < 2 {
        assert!(std::time::Instant::now() < deadline, "two watches never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other two wait for a slot, however long.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(connected(&watchers), 2);
    assert_eq!(
        watchers.iter().filter(|w| w.health().state == "connecting").count(),
        2,
        "{:?}",
        watchers.iter().map(|w| w.health().state).collect::<Vec<_>>()
    );
    // One connected watch stops: its slot goes to a waiting one.
    let i = watchers.iter().position(|w| w.health().connected).unwrap();
    watchers.remove(i).stop().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connected(&watchers) < 2 {
        assert!(std::time::Instant::now() < deadline, "the freed slot was not taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in watchers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backlog_with_a_gap_is_listed_in_windows_and_delivered_whole_in_order() {
    // 4,000 messages, UIDs 1,101..3,400 expunged: the listing goes in windows of 1,000 UIDs
    // (1:1000, 1001:2000, then 2001:3000 which is empty and doubles the next, which reaches
    // past the SELECT's UIDNEXT and so is open-ended: 3001:*), each read ahead with the last
    // batch of the window before.
    let dv = dovecot();
    let msgs: Vec<Vec<u8>> = (0..4_000)
        .map(|i| inboxd_testbed::sample_message(i, "w", 200))
        .collect();
    dv.drop_messages("alice", "INBOX", &msgs).unwrap();
    let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
    s.select("INBOX").await.unwrap();
    s.run("UID STORE 1101:3400 +FLAGS.SILENT (\\Deleted)").await.unwrap();
    s.run("EXPUNGE").await.unwrap();
    s.logout().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let rec = Recorder::default();
    Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Once,
    )
    .join()
    .await
    .unwrap();
    let want: Vec<u32> = (1..=1100).chain(3401..=4000).collect();
    assert_eq!(rec.uids(), want);
}
