//! `notify = true`: one NOTIFY session (RFC 5465) per account tells the watches of its folders
//! of news, against a real Dovecot (which offers NOTIFY); a caught-up watch holds no session
//! of its own.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use inboxd::watcher::{Event, Mode, Watcher};
use support::*;

/// Waits until `port` has `n` established connections, failing after 10 s.
async fn wait_connections(port: u16, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while inboxd_testbed::established_to(port) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} connections to the server, expected {n}",
            inboxd_testbed::established_to(port)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const FOLDERS: [&str; 3] = ["A", "B", "Entwürfe"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_folders_of_an_account_share_one_notify_session_and_lose_nothing_across_a_restart() {
    let mut dv = dovecot();
    for f in FOLDERS {
        imap(&dv, &format!("CREATE \"{}\"", inboxd::imap::mutf7::encode(f))).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut watches = String::new();
    for (i, f) in FOLDERS.iter().enumerate() {
        if i > 0 {
            watches.push_str("\n[[watch]]\naccount = \"t\"\n");
        }
        watches.push_str(&format!("folder = \"{f}\"\ndeliver = {{ maildir = \"m{i}\" }}\n"));
    }
    // The notifier reconnects on the account's schedule, as its watches do.
    let config = config(
        &dv,
        dir.path(),
        "notify = true\nreconnect = [ { every = \"300ms\" } ]",
        &watches,
    );
    let store = store(&config).await;
    let mut running = Vec::new();
    for w in &config.watches {
        let w = Watcher::start(w.clone(), store.clone(), Mode::Forever).unwrap();
        let mut ev = w.subscribe();
        wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
        running.push((w, ev));
    }
    for (w, _) in &running {
        wait_state(w, "idle").await;
    }
    // Three caught-up watches, one session: the notifier's.
    wait_connections(dv.port, 1).await;

    let mut delivered: HashMap<String, Vec<u32>> = HashMap::new();
    let mut collect = async |running: &mut Vec<(Watcher, _)>, each: usize| {
        for (i, (_, ev)) in running.iter_mut().enumerate() {
            for uid in wait_delivered(ev, each, 20).await {
                delivered.entry(FOLDERS[i].to_string()).or_default().push(uid);
            }
        }
    };
    for f in FOLDERS {
        append(&dv, f, &[&format!("first in {f}")]).await;
    }
    collect(&mut running, 1).await;
    for (w, _) in &running {
        wait_state(w, "idle").await;
    }
    wait_connections(dv.port, 1).await;

    // The server restarts: the notifier's session goes; mail that comes while it reconnects
    // is caught up once it watches again.
    dv.restart().unwrap();
    for f in FOLDERS {
        append(&dv, f, &[&format!("second in {f}"), &format!("third in {f}")]).await;
    }
    collect(&mut running, 2).await;
    for (w, _) in &running {
        wait_state(w, "idle").await;
    }
    wait_connections(dv.port, 1).await;
    for (w, _) in running {
        w.stop().await.unwrap();
    }
    for f in FOLDERS {
        assert_eq!(delivered[f], vec![1, 2, 3], "{f}: each message once, in order");
    }
}

/// The notifier's session is replaced at `recycle_after` with the next one watching before it
/// goes: no change wakes the watches (none catches up while no mail comes), and mail that
/// comes across the changes is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_recycles_its_session_without_a_gap_or_a_wake_of_every_watch() {
    let dv = dovecot();
    for f in ["A", "B"] {
        imap(&dv, &format!("CREATE {f}")).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let watches = "folder = \"A\"\ndeliver = { maildir = \"ma\" }\n[[watch]]\naccount = \"t\"\nfolder = \"B\"\ndeliver = { maildir = \"mb\" }\n";
    let config = config(&dv, dir.path(), "notify = true\nrecycle_after = \"1s\"", watches);
    let store = store(&config).await;
    let mut running = Vec::new();
    for w in &config.watches {
        let w = Watcher::start(w.clone(), store.clone(), Mode::Forever).unwrap();
        let ev = w.subscribe();
        running.push((w, ev));
    }
    for (w, _) in &running {
        wait_state(w, "idle").await;
    }
    // Settled (the wake of a folder marked before the notifier watched included), then no
    // mail for 3.5 s: three recycles or more, and no catch-up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (_, ev) in &mut running {
        while ev.try_recv().is_ok() {}
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for (i, (_, ev)) in running.iter_mut().enumerate() {
        let mut quiet = Vec::new();
        while let Ok(e) = ev.try_recv() {
            quiet.push(e);
        }
        assert!(
            !quiet.iter().any(|e| matches!(e, Event::CaughtUp { .. })),
            "watch {i} caught up with no mail: {quiet:?}"
        );
    }
    // Mail across the recycles.
    for i in 0..4 {
        append(&dv, "A", &[&format!("a{i}")]).await;
        append(&dv, "B", &[&format!("b{i}")]).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    for (i, (w, mut ev)) in running.into_iter().enumerate() {
        let uids = wait_delivered(&mut ev, 4, 20).await;
        w.stop().await.unwrap();
        assert_eq!(uids, vec![1, 2, 3, 4], "watch {i}: each message once, in order");
    }
}

/// Mail that arrives while the notifier's replacement session is still logging in is heard by
/// the session being replaced: read to its end before it logs out, it wakes the watch.
/// (Before, its notification was dropped with it, and the watch slept until `idle_refresh`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_arriving_while_the_notifier_is_replaced_wakes_its_watch() {
    use support::faultproxy::FaultProxy;
    let dv = dovecot();
    imap(&dv, "CREATE A").await;
    let proxy = FaultProxy::start(dv.port).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "notify = true\nrecycle_after = \"2s\"",
        "folder = \"A\"\ndeliver = { maildir = \"ma\" }\n",
    );
    // Through the proxy: its delay makes a new session's login slow, and so the replacement's.
    let text = std::fs::read_to_string(&config.path).unwrap().replacen(
        &format!("port = {}", dv.port),
        &format!("port = {}", proxy.port),
        1,
    );
    std::fs::write(&config.path, text).unwrap();
    let config = inboxd::config::Config::load(&config.path).unwrap();
    let store = store(&config).await;
    let w = Watcher::start(config.watches[0].clone(), store.clone(), Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    wait_state(&w, "idle").await;
    // Settled; then every chunk through the proxy waits 150 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while ev.try_recv().is_ok() {}
    let accepted = proxy.accepted_count();
    proxy.delay(150);
    // The replacement connects at the notifier session's age limit; mail comes while it logs in.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proxy.accepted_count() == accepted {
        assert!(std::time::Instant::now() < deadline, "the notifier was not replaced");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    append(&dv, "A", &["in the gap"]).await;
    let uids = wait_delivered(&mut ev, 1, 15).await;
    assert_eq!(uids, vec![1]);
    proxy.heal();
    w.stop().await.unwrap();
}
