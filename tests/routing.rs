//! Routing rules and fan-out against a real Dovecot, real Maildirs, a real program and a real
//! HTTP receiver: the first matching rule decides, `skip` leaves a message alone, a rule's
//! `after` overrides the watch's, and a message fanned out to several targets reaches each of
//! them once, even when one target fails for a while and inboxd restarts in between. (The
//! command line's side, `check --route` and `status`, is in crates/cli/tests/cli.rs.)

#[path = "support/receiver.rs"]
mod receiver;
mod support;

use std::path::Path;
use std::time::Duration;

use inboxd::imap::Session;
use inboxd::store::DeliveryStatus;
use inboxd::watcher::{Mode, Watcher};
use inboxd_testbed::Dovecot;
use receiver::{Receiver, SECRET};
use support::*;

fn files(maildir: &Path) -> usize {
    std::fs::read_dir(maildir.join("new")).map_or(0, |d| d.count())
}

/// (messages, unseen) of a folder.
async fn count(dv: &Dovecot, folder: &str) -> (usize, usize) {
    let mut s = Session::open(&dv.account("alice")).await.unwrap();
    s.select(folder).await.unwrap();
    let all = s.search("ALL").await.unwrap().len();
    let unseen = s.search("UNSEEN").await.unwrap().len();
    s.logout().await;
    (all, unseen)
}

const RULES: &str = r#"start = "all"
after = "seen"
else = "rest"

[[watch.rule]]
name = "invoices"
from = "*@vendor.example"
has_attachment = true
deliver = ["archive", "hook"]
after = "move:Done"

[[watch.rule]]
name = "newsletters"
header = { "List-Id" = "*<news.vendor.example>" }
deliver = "skip"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_route_fan_out_skip_and_override_the_post_action() {
    let dv = dovecot();
    let rx = Receiver::start().await;
    imap(&dv, "CREATE Done").await;
    let mut msgs = Vec::new();
    for n in 1..=3 {
        msgs.extend([invoice(n), newsletter(n), personal(n)]);
    }
    append_raw(&dv, "INBOX", &msgs).await;
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "\n[targets.archive]\nmaildir = \"archive\"\n\n[targets.hook]\nwebhook = \"{}\"\nsecret = \"{SECRET}\"\n\n[targets.rest]\nmaildir = \"rest\"\n",
        rx.url
    );
    let config = config(&dv, dir.path(), &targets, RULES);
    let store = store(&config).await;
    let w = Watcher::start(config.watches[0].clone(), store.clone(), Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);

    // Invoices: both targets of their rule, then moved by the rule's own post-action.
    assert_eq!(files(&dir.path().join("archive")), 3);
    let accepted = rx.accepted_ids();
    assert_eq!(accepted.len(), 3);
    let uids: Vec<u32> = accepted
        .iter()
        .map(|k| k.rsplit('-').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(uids, [1, 4, 7], "the invoices, in UID order");
    assert_eq!(count(&dv, "Done").await.0, 3);
    // Personal mail: `else`, and the watch's `after` (seen). Newsletters: skipped, untouched.
    assert_eq!(files(&dir.path().join("rest")), 3);
    assert_eq!(count(&dv, "INBOX").await, (6, 3), "6 left, the 3 newsletters unseen");
    let skipped = store.by_status(DeliveryStatus::Skipped, 10).await.unwrap();
    assert_eq!(skipped.len(), 3);
    assert!(
        skipped.iter().all(|d| d.route == "skipped by rule \"newsletters\""),
        "{skipped:?}"
    );
    let delivered = store.by_status(DeliveryStatus::Delivered, 10).await.unwrap();
    let routes: std::collections::BTreeSet<&str> = delivered.iter().map(|d| d.route.as_str()).collect();
    assert_eq!(
        routes.into_iter().collect::<Vec<_>>(),
        ["else -> rest", "rule \"invoices\" -> archive, hook"]
    );
}

/// Lines of the exec target's call log.
fn calls(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_calls_only_the_targets_still_missing_even_across_a_restart() {
    let dv = dovecot();
    let rx = Receiver::start().await;
    // The receiver is down for a long while.
    rx.inner.lock().unwrap().script = std::iter::repeat_n((503, None), 10_000).collect();
    append(&dv, "INBOX", &["one", "two", "three"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let targets = format!(
        "\n[targets.log]\nexec = [\"sh\", \"-c\", \"cat >/dev/null; echo \\\"$INBOXD_KEY\\\" >> {}\"]\n\n[targets.hook]\nwebhook = \"{}\"\nsecret = \"{SECRET}\"\n",
        log.display(),
        rx.url
    );
    let config = config(
        &dv,
        dir.path(),
        &targets,
        "start = \"all\"\ndeliver = [\"log\", \"hook\"]\nretry_initial = \"50ms\"\nretry_max = \"100ms\"",
    );
    let store = store(&config).await;
    let w = Watcher::start(config.watches[0].clone(), store.clone(), Mode::Forever).unwrap();
    // The first message waits for the webhook; the program had it once, however often the
    // webhook is retried.
    tokio::time::timeout(Duration::from_secs(30), async {
        while rx.requests().len() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the webhook was retried");
    w.stop().await.unwrap();
    let first = calls(&log);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(store.targets_done(&first[0]).await.unwrap(), ["log"]);
    let row = store.delivery(&first[0]).await.unwrap().unwrap();
    assert_eq!(row.status, DeliveryStatus::Failed);
    assert!(row.last_error.contains("target `hook`"), "{}", row.last_error);

    // A new process, the receiver back: only the webhook is called for the first message.
    rx.inner.lock().unwrap().script.clear();
    let w = Watcher::start(config.watches[0].clone(), store.clone(), Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    let all = calls(&log);
    assert_eq!(all.len(), 3, "each message ran the program once: {all:?}");
    assert_eq!(all[0], first[0]);
    assert_eq!(rx.accepted_ids(), all, "the webhook got each once, in order");
}
