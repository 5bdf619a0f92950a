//! What Dovecot won't do, from a socket-level scripted server: hostile bytes that panic the IMAP
//! parser, throttling with a back-off hint, SELECT without UIDNEXT, non-ASCII response text, a
//! server that stops in the middle of a literal, and `UID FETCH n:*` answering below n.

mod support;

use std::path::Path;
use std::time::Duration;

use inboxd::config::Config;
use inboxd::watcher::{Event, Mode, Watcher};
use support::scripted::{Scripted, config_with, watch};
use support::*;

/// The retry delay and the error of the next disconnection that came with an error.
async fn next_failure(ev: &mut tokio::sync::broadcast::Receiver<Event>) -> (Duration, String) {
    match wait_for(ev, 20, |e| {
        matches!(
            e,
            Event::Disconnected {
                error: Some(_),
                retry_in: Some(_),
                ..
            }
        )
    })
    .await
    {
        Event::Disconnected {
            retry_in: Some(d),
            error: Some(m),
            ..
        } => (d, m),
        other => unreachable!("{other:?}"),
    }
}

fn scripted_config(dir: &Path, port: u16, start: &str, account_extra: &str) -> Config {
    config_with(dir, port, account_extra, &format!("start = \"{start}\""))
}

/// A handler that panics on one UID.
#[derive(Clone)]
struct Panicky {
    rec: Recorder,
    on: u32,
}

impl inboxd::handler::Handler for Panicky {
    fn deliver<'a>(
        &'a mut self,
        m: &'a inboxd::handler::Message<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), inboxd::handler::HandlerError>> {
        if m.uid == self.on {
            panic!("handler bug on uid {}", m.uid);
        }
        self.rec.deliver(m)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_panicked_the_parser_are_read_and_a_panic_is_caught_and_counted() {
    // `OK [READ-WRITE]– x` (a multi-byte character right after `]`) panicked imap-proto 0.17;
    // the guard makes such text ASCII before the parser sees it.
    let hostile = Scripted::start().await;
    for s in ["one", "two", "three"] {
        hostile.add_message(s);
    }
    hostile.state.lock().unwrap().hostile_select = true;
    let dv = dovecot();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bad = retrying_config(d1.path(), hostile.port);
    let good = config(&dv, d2.path(), "", "deliver = { maildir = \"out\" }");
    // And a handler that panics on uid 2: caught, counted as a failed attempt, dead-lettered.
    let recb = Recorder::default();
    let wb = Watcher::with_handler(
        bad.watches[0].clone(),
        store(&bad).await,
        Box::new(Panicky {
            rec: recb.clone(),
            on: 2,
        }),
        Mode::Forever,
    );
    let mut evb = wb.subscribe();
    let recg = Recorder::default();
    let wg = Watcher::with_handler(
        good.watches[0].clone(),
        store(&good).await,
        Box::new(recg.clone()),
        Mode::Forever,
    );
    let mut evg = wg.subscribe();
    wait_for(&mut evg, 20, |e| matches!(e, Event::CaughtUp { .. })).await;

    let e = wait_for(&mut evb, 20, |e| matches!(e, Event::DeadLettered { .. })).await;
    assert!(
        matches!(&e, Event::DeadLettered { uid: 2, error, .. } if error.contains("panicked") && error.contains("handler bug")),
        "{e:?}"
    );
    wait_for(&mut evb, 20, |e| matches!(e, Event::CaughtUp { last_uid: 3, .. })).await;
    assert_eq!(wb.health().panics, 2, "two attempts, two panics");
    assert_eq!(wb.health().reconnects, 0);
    assert_eq!(recb.subjects(), vec!["one", "three"]);

    append(&dv, "INBOX", &["unaffected"]).await;
    wait_delivered(&mut evg, 1, 20).await;
    assert_eq!(wg.health().panics, 0);
    assert_eq!(wg.health().reconnects, 0, "the other watcher never noticed");
    wb.stop().await.unwrap();
    wg.stop().await.unwrap();
    assert_eq!(recg.subjects(), vec!["unaffected"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_bad_with_a_hint_is_honoured() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().throttle_ms = Some(1500);
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let Event::Disconnected { retry_in: Some(d), .. } = e else {
        unreachable!()
    };
    assert!(
        d >= Duration::from_millis(1500),
        "the server's hint beats the 200 ms schedule: {d:?}"
    );
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_without_uidnext_falls_back_to_status() {
    let server = Scripted::start().await;
    server.add_message("history");
    {
        let mut st = server.state.lock().unwrap();
        st.no_uidnext = true;
        st.non_ascii = true;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "new", "");
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    server.add_message("fresh");
    wait_delivered(&mut ev, 1, 20).await;
    // A wake with nothing new: `UID FETCH 3:*` is answered with uid 2, which must not come again.
    server.add_message_silently_none();
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.stop().await.unwrap();
    assert_eq!(
        rec.subjects(),
        vec!["fresh"],
        "start = \"new\" from STATUS's UIDNEXT; non-ASCII text parsed"
    );
    let cmds = server.state.lock().unwrap().commands.clone();
    assert!(cmds.iter().any(|c| c.starts_with("STATUS")), "{cmds:?}");
}

/// Waits (up to 20 s) until the server has seen `n` IDLE commands.
async fn wait_idles(server: &Scripted, n: usize) {
    let idles = || {
        server
            .state
            .lock()
            .unwrap()
            .commands
            .iter()
            .filter(|c| c.starts_with("IDLE"))
            .count()
    };
    let t = std::time::Instant::now();
    while idles() < n {
        assert!(t.elapsed() < Duration::from_secs(20), "never idle again");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The commands the client sent after its first IDLE, as the server read them.
fn after_first_idle(server: &Scripted) -> Vec<String> {
    let st = server.state.lock().unwrap();
    st.commands
        .iter()
        .skip_while(|c| !c.starts_with("IDLE"))
        .cloned()
        .collect()
}

/// A wake on new mail alone (an EXISTS above the count, nothing else): DONE, the listing and
/// the first bodies in one write, without selecting the folder again, one round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_on_new_mail_sends_done_and_the_listing_together_without_a_select() {
    let server = Scripted::start().await;
    server.add_message("history");
    server.state.lock().unwrap().watch_pipelining = true;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "new", "");
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    // At the connect the backlog is unknown: the SELECT goes alone.
    assert_eq!(server.state.lock().unwrap().pipelined_after_select, 0);
    for (n, subject) in ["one", "two"].into_iter().enumerate() {
        wait_idles(&server, n + 1).await;
        server.add_message(subject);
        wait_delivered(&mut ev, 1, 20).await;
    }
    wait_idles(&server, 3).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one", "two"]);
    let after = after_first_idle(&server);
    let st = server.state.lock().unwrap();
    // Each wake: DONE with the listing after it, written together.
    assert_eq!(st.pipelined_after_done, 2, "{:?}", st.commands);
    assert!(!after.iter().any(|c| c.starts_with("SELECT")), "{after:?}");
    let wakes: Vec<&[String]> = after.windows(2).filter(|p| p[0].starts_with("IDLE")).collect();
    assert!(
        wakes.len() >= 2 && wakes[..2].iter().all(|p| p[1].starts_with("UID FETCH")),
        "{after:?}"
    );
}

/// A wake that announced more than new mail selects the folder again before it lists: an
/// EXPUNGE, or Dovecot's untagged NO to a session whose folder was deleted (RFC 2180 §3),
/// after which the folder of the same name may be another one (a new UIDVALIDITY) that the
/// old session would never announce anything of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_that_announced_more_than_new_mail_selects_again() {
    for extra in [
        "* 1 EXPUNGE",
        "* NO Internal error occurred. Refer to server log for more information.",
    ] {
        let server = Scripted::start().await;
        server.add_message("history");
        let dir = tempfile::tempdir().unwrap();
        let config = scripted_config(dir.path(), server.port, "new", "");
        let (w, rec, mut ev) = watch(&config).await;
        wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
        wait_idles(&server, 1).await;
        // A message appended, then (in the same IDLE) the line that makes it more than news.
        server.state.lock().unwrap().after_exists_in_idle = vec![extra.to_string()];
        server.add_message("one");
        wait_delivered(&mut ev, 1, 20).await;
        // Then new mail alone: no SELECT for it.
        wait_idles(&server, 2).await;
        server.add_message("two");
        wait_delivered(&mut ev, 1, 20).await;
        w.stop().await.unwrap();
        assert_eq!(rec.subjects(), vec!["one", "two"], "{extra}");
        let after = after_first_idle(&server);
        let at = |command: &str| -> Vec<usize> {
            let found = after.iter().enumerate().filter(|(_, c)| c.starts_with(command));
            found.map(|(i, _)| i).collect()
        };
        let (selects, idles) = (at("SELECT"), at("IDLE"));
        // Exactly one SELECT, between the first IDLE and the second.
        assert!(
            selects.len() == 1 && idles.len() >= 2 && selects[0] < idles[1],
            "{extra}: {after:?}"
        );
    }
}

/// On a wake, the bodies of the first UIDs above the checkpoint are asked for in the same
/// write as the SELECT and the listing; a message that came back whole is not fetched again,
/// one that did not (longer than what was asked for) is fetched as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_reads_the_new_message_with_the_listing_and_fetches_only_what_did_not_fit() {
    let server = Scripted::start().await;
    server.add_message("history");
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "new", "");
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    wait_idles(&server, 1).await;
    server.add_message("small");
    wait_delivered(&mut ev, 1, 20).await;
    wait_idles(&server, 2).await;
    // Longer than the 64 KiB asked for with the listing.
    server.add_message_sized("large", 70_000);
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["small", "large"]);
    let st = server.state.lock().unwrap();
    let fetches: Vec<&String> = st
        .commands
        .iter()
        .filter(|c| c.starts_with("UID FETCH") && c.contains("BODY.PEEK[]"))
        .collect();
    assert_eq!(
        fetches,
        [
            "UID FETCH 2:5 (UID BODY.PEEK[]<0.65536>)",
            "UID FETCH 3:6 (UID BODY.PEEK[]<0.65536>)",
            "UID FETCH 3 (UID BODY.PEEK[])"
        ],
        "{:?}",
        st.commands
    );
}

/// Dovecot runs a listing and the FETCH pipelined after it together: the bodies come before
/// the listing's tagged OK. They are still the bodies (not listing items without a size), and
/// serve the delivery with no fetch of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_answered_before_the_listing_ends_are_still_used() {
    let server = Scripted::start().await;
    server.add_message("history");
    server.state.lock().unwrap().parallel_fetches = true;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "new", "");
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    wait_idles(&server, 1).await;
    server.add_message("small");
    wait_delivered(&mut ev, 1, 20).await;
    wait_idles(&server, 2).await;
    server.add_message("second");
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["small", "second"]);
    let st = server.state.lock().unwrap();
    let fetches: Vec<&String> = st
        .commands
        .iter()
        .filter(|c| c.starts_with("UID FETCH") && c.contains("BODY.PEEK[]"))
        .collect();
    assert_eq!(
        fetches,
        [
            "UID FETCH 2:5 (UID BODY.PEEK[]<0.65536>)",
            "UID FETCH 3:6 (UID BODY.PEEK[]<0.65536>)"
        ],
        "{:?}",
        st.commands
    );
}

/// `notify = true` against a server without NOTIFY: the account's notifier finds no NOTIFY,
/// the watch goes back to IDLE on a session of its own, and new mail is delivered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_without_the_capability_falls_back_to_idle() {
    let server = Scripted::start().await;
    server.add_message("history");
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "new", "notify = true");
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    wait_idles(&server, 1).await;
    server.add_message("after");
    wait_delivered(&mut ev, 1, 20).await;
    wait_idles(&server, 2).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["after"]);
    let st = server.state.lock().unwrap();
    assert!(
        !st.commands.iter().any(|c| c.starts_with("NOTIFY")),
        "{:?}",
        st.commands
    );
    // Caught up, the watch gave its session back to wait for the notifier; the notifier's
    // session found no NOTIFY; the watch connected again and idled.
    let first = |what: &str| st.commands.iter().position(|c| c.starts_with(what)).unwrap();
    assert!(first("LOGOUT") < first("IDLE"), "{:?}", st.commands);
    assert!(st.connections >= 3, "{} connections: {:?}", st.connections, st.commands);
}

/// A server may end an IDLE itself (its tagged OK): the watcher takes that as a wake, sends
/// no DONE for it, and goes on (a new message after it is delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_the_server_ends_itself_needs_no_done() {
    let server = Scripted::start().await;
    server.add_message("history");
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "new", "");
    // The first IDLE is ended by the server.
    server.state.lock().unwrap().end_idle_in = Some(Duration::from_millis(200));
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    // The IDLE the server ended, then the next one.
    wait_idles(&server, 2).await;
    server.add_message("after");
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["after"]);
    let st = server.state.lock().unwrap();
    // A DONE outside an IDLE would reach the server as a command of its own.
    assert!(
        !st.commands
            .iter()
            .any(|c| c.trim_start().starts_with("DONE") || c.starts_with(" ")),
        "{:?}",
        st.commands
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_mid_literal_hits_the_command_deadline() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().stall_in_literal = true;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "timeouts = { command = \"1s\" }");
    let (w, rec, mut ev) = watch(&config).await;
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    assert!(
        matches!(&e, Event::Disconnected { error: Some(m), .. } if m.contains("timed out")),
        "{e:?}"
    );
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
    assert_eq!(server.state.lock().unwrap().bodies_sent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_watcher_stops_it_instead_of_spinning() {
    let server = Scripted::start().await;
    server.add_message("one");
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, _rec, mut ev) = watch(&config).await;
    wait_delivered(&mut ev, 1, 20).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = server.state.lock().unwrap().commands.len();
    drop(w);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cmds = server.state.lock().unwrap().commands.clone();
    let after = &cmds[before..];
    assert!(
        after.len() <= 3,
        "a dropped watcher kept talking to the server: {} commands, {:?}",
        after.len(),
        &after[..after.len().min(10)]
    );
}

fn retrying_config(dir: &Path, port: u16) -> Config {
    config_with(
        dir,
        port,
        "",
        "start = \"all\"\nmax_attempts = 2\nretry_initial = \"100ms\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_message_without_a_body_is_retried_then_dead_lettered_never_skipped() {
    let server = Scripted::start().await;
    for s in ["one", "two", "three"] {
        server.add_message(s);
    }
    server.state.lock().unwrap().no_body = vec![2];
    let dir = tempfile::tempdir().unwrap();
    let config = retrying_config(dir.path(), server.port);
    let (w, rec, mut ev) = watch(&config).await;
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::DeadLettered { uid: 2, .. })).await;
    assert!(
        matches!(&e, Event::DeadLettered { error, .. } if error.contains("did not return its body")),
        "{e:?}"
    );
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { last_uid: 3, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one", "three"]);
    let st = store(&config).await;
    let dead = st.by_status(inboxd::store::DeliveryStatus::Dead, 10).await.unwrap();
    assert_eq!(dead.iter().map(|d| d.uid).collect::<Vec<_>>(), vec![2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_expunged_between_listing_and_fetch_is_recorded_as_vanished() {
    let server = Scripted::start().await;
    for s in ["one", "two", "three"] {
        server.add_message(s);
    }
    server.state.lock().unwrap().vanish = vec![2];
    let dir = tempfile::tempdir().unwrap();
    let config = retrying_config(dir.path(), server.port);
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::Vanished { uid: 2, .. })).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { last_uid: 3, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one", "three"]);
    let st = store(&config).await;
    let key = inboxd::core::key::message_key("s", "INBOX", 42, 2);
    assert_eq!(
        st.delivery(&key).await.unwrap().map(|d| d.status),
        Some(inboxd::store::DeliveryStatus::Vanished)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_far_above_uidnext_never_move_the_checkpoint() {
    let server = Scripted::start().await;
    for s in ["one", "two", "three"] {
        server.add_message(s);
    }
    server.state.lock().unwrap().bogus_uids = vec![99, 4_000_000_000];
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    server.add_message("four");
    wait_for(&mut ev, 20, |e| matches!(e, Event::Delivered { uid: 4, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one", "two", "three", "four"]);
    let st = store(&config).await;
    assert_eq!(st.checkpoint("s", "INBOX").await.unwrap().unwrap().last_uid, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_select_refusal_follows_the_schedule_and_a_missing_folder_parks() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().select_refusals = vec!["UNAVAILABLE".into(), "NONEXISTENT".into()];
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, _rec, mut ev) = watch(&config).await;
    let (d, m) = next_failure(&mut ev).await;
    assert!(d < Duration::from_secs(5), "[UNAVAILABLE] is temporary: {d:?} ({m})");
    let (d, m) = next_failure(&mut ev).await;
    assert!(d >= Duration::from_secs(3600), "[NONEXISTENT] parks: {d:?} ({m})");
    assert!(m.contains("NONEXISTENT") && !m.contains("Outcome"), "{m}");
    w.stop().await.unwrap();
}

/// Peak resident memory of this test process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_literal_announcement_allocates_nothing_and_says_so_without_content() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().huge_literal = true;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let before = peak_rss();
    let (w, rec, mut ev) = watch(&config).await;
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let Event::Disconnected { error: Some(m), .. } = e else {
        unreachable!()
    };
    assert!(m.contains("literal of 536000000 bytes"), "{m}");
    assert!(!m.contains("ZZZ") && m.len() <= 1100, "{m}");
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
    let grew = peak_rss().saturating_sub(before);
    assert!(grew < 100 << 20, "peak memory grew by {grew} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_line_is_cut_off_quickly() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().endless_line = true;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let Event::Disconnected { error: Some(m), .. } = e else {
        unreachable!()
    };
    assert!(m.contains("line longer than"), "{m}");
    assert!(!m.contains("AAAA"), "{m}");
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_error_inside_a_message_never_puts_its_bytes_in_errors() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().garbage_fetch = Some(format!("PII-CANARY {}", "x".repeat(50_000)));
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let Event::Disconnected { error: Some(m), .. } = e else {
        unreachable!()
    };
    assert!(!m.contains("PII-CANARY") && m.len() <= 1100, "{m}");
    assert!(
        m.contains("cannot be parsed (parser error ") && m.contains("bytes of the connection"),
        "{m}"
    );
    let health = w.health();
    assert!(health.last_error.as_deref().is_some_and(|e| !e.contains("PII-CANARY")));
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_fetch_responses_are_dropped_as_they_arrive() {
    let server = Scripted::start().await;
    server.add_message_sized("one", 30_000);
    server.state.lock().unwrap().repeat_fetch = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let before = peak_rss();
    let (w, rec, mut ev) = watch(&config).await;
    wait_delivered(&mut ev, 1, 60).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
    // 5,000 copies of 30 KB: 150 MB if they were kept.
    let grew = peak_rss().saturating_sub(before);
    assert!(grew < 75 << 20, "peak memory grew by {grew} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_sizes_never_let_a_batch_grow_past_its_cap() {
    let server = Scripted::start().await;
    for i in 0..4 {
        server.add_message_sized(&format!("big{i}"), 3_000_000);
    }
    server.add_message("small");
    server.state.lock().unwrap().lie_size = Some(10);
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        server.port,
        "",
        "start = \"all\"\nmax_attempts = 2\nmax_message_size = \"1MB\"",
    );
    let (w, rec, mut ev) = watch(&config).await;
    let mut dead = Vec::new();
    while dead.len() < 4 {
        if let Event::DeadLettered { uid, error, .. } =
            wait_for(&mut ev, 60, |e| matches!(e, Event::DeadLettered { .. })).await
        {
            assert!(
                error.contains("could not be fetched") && error.contains("limit of 1000000 bytes"),
                "{error}"
            );
            dead.push(uid);
        }
    }
    wait_for(&mut ev, 30, |e| matches!(e, Event::Delivered { uid: 5, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(dead, vec![1, 2, 3, 4]);
    assert_eq!(rec.subjects(), vec!["small"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_makes_progress_instead_of_timing_out() {
    let server = Scripted::start().await;
    server.add_message_sized("slow", 60_000);
    // 20 KB/s: three seconds for the message, against a one-second command timeout.
    server.state.lock().unwrap().body_rate = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "timeouts = { command = \"1s\" }");
    let (w, rec, mut ev) = watch(&config).await;
    wait_delivered(&mut ev, 1, 30).await;
    assert_eq!(w.health().reconnects, 0, "{:?}", w.health().last_error);
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["slow"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_park_every_watch_of_the_account_after_one_try() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().refuse_login = Some("[AUTHENTICATIONFAILED] Authentication failed.".into());
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        server.port,
        "",
        "[[watch]]\naccount = \"s\"\nfolder = \"Other\"\ndeliver = { maildir = \"b\" }",
    );
    let st = store(&config).await;
    let mut watchers = Vec::new();
    let mut parked = Vec::new();
    for w in &config.watches {
        let watcher = Watcher::with_handler(w.clone(), st.clone(), Box::new(Recorder::default()), Mode::Forever);
        let mut ev = watcher.subscribe();
        let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
        let Event::Disconnected {
            retry_in: Some(d),
            error: Some(m),
            ..
        } = e
        else {
            unreachable!()
        };
        assert!(m.contains("AUTHENTICATIONFAILED") && !m.contains("code:"), "{m}");
        parked.push(d);
        watchers.push(watcher);
    }
    // Both parked for about an hour, and the server saw the password once, not once per watch
    // and attempt (a lockout risk).
    assert!(parked.iter().all(|d| *d >= Duration::from_secs(3600)), "{parked:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.state.lock().unwrap().logins, 1);
    for w in watchers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_a_server_frozen_in_idle() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().freeze_at_done = true;
    let dir = tempfile::tempdir().unwrap();
    // DONE would wait a minute; a stop must not.
    let config = config_with(
        dir.path(),
        server.port,
        "timeouts = { done = \"60s\" }",
        "start = \"all\"",
    );
    let (w, rec, mut ev) = watch(&config).await;
    wait_delivered(&mut ev, 1, 20).await;
    wait_state(&w, "idle").await;
    let t = std::time::Instant::now();
    w.stop().await.unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(30), "stopping took {took:?}");
    assert_eq!(rec.subjects(), vec!["one"]);
}

/// A handler that holds uid 1 until the server was asked for uid 3's body (the next batch),
/// or 10 s.
#[derive(Clone)]
struct WaitsForReadAhead {
    rec: Recorder,
    server: std::sync::Arc<std::sync::Mutex<support::scripted::State>>,
    saw_read_ahead: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl inboxd::handler::Handler for WaitsForReadAhead {
    fn deliver<'a>(
        &'a mut self,
        m: &'a inboxd::handler::Message<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), inboxd::handler::HandlerError>> {
        Box::pin(async move {
            if m.uid == 1 {
                for _ in 0..200 {
                    let asked = self
                        .server
                        .lock()
                        .unwrap()
                        .commands
                        .iter()
                        .any(|c| c.contains("FETCH 3") && c.contains("BODY"));
                    if asked {
                        self.saw_read_ahead.store(true, std::sync::atomic::Ordering::SeqCst);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            self.rec.deliver(m).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_batch_is_read_while_this_one_is_delivered() {
    let server = Scripted::start().await;
    for s in ["one", "two", "three", "four", "five"] {
        server.add_message(s);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), server.port, "", "start = \"all\"\nbatch_size = 2");
    let rec = Recorder::default();
    let saw = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(WaitsForReadAhead {
            rec: rec.clone(),
            server: server.state.clone(),
            saw_read_ahead: saw.clone(),
        }),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { last_uid: 5, .. })).await;
    w.stop().await.unwrap();
    assert!(
        saw.load(std::sync::atomic::Ordering::SeqCst),
        "uid 3 was not asked for while uid 1 was being delivered"
    );
    assert_eq!(rec.subjects(), vec!["one", "two", "three", "four", "five"]);
    let st = server.state.lock().unwrap();
    let body_fetches = st.commands.iter().filter(|c| c.contains("BODY")).count();
    assert_eq!(body_fetches, 3, "each batch read once: {:?}", st.commands);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_a_read_ahead_loses_and_repeats_nothing() {
    let server = Scripted::start().await;
    for s in ["one", "two", "three", "four", "five", "six"] {
        server.add_message(s);
    }
    // The first batch comes; the read-ahead of the second gets BYE and a closed connection.
    server.state.lock().unwrap().bye_after_bodies = Some(2);
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), server.port, "", "start = \"all\"\nbatch_size = 2");
    let (w, rec, mut ev) = watch(&config).await;
    wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { last_uid: 6, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one", "two", "three", "four", "five", "six"]);
    assert_eq!(server.state.lock().unwrap().connections, 2);
    let st = store(&config).await;
    assert_eq!(st.checkpoint("s", "INBOX").await.unwrap().unwrap().last_uid, 6);
    assert!(
        st.by_status(inboxd::store::DeliveryStatus::Dead, 10)
            .await
            .unwrap()
            .is_empty(),
        "a lost read-ahead is no failure of its messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_authenticated_but_not_connected_says_why_and_follows_the_schedule() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().select_refusals = vec!["BAD User is authenticated but not connected.".into()];
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    let (d, m) = next_failure(&mut ev).await;
    // Not parked: a passing cause (too many connections) gets the next try soon.
    assert!(d < Duration::from_secs(5), "{d:?} ({m})");
    assert!(
        m.contains("authenticated but not connected")
            && m.contains("no access to this mailbox")
            && m.contains("max_connections"),
        "{m}"
    );
    // The next session opens the folder.
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { last_uid: 1, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_at_login_does_not_park_the_account() {
    let server = Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().refuse_login = Some("[ALERT] Too many simultaneous connections. (Failure)".into());
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    let (d, m) = next_failure(&mut ev).await;
    // Gmail's limit is no refusal of the password: the schedule, not an hour's parking.
    assert!(d < Duration::from_secs(5), "{d:?} ({m})");
    assert!(
        m.contains("Too many simultaneous connections") && m.contains("max_connections"),
        "{m}"
    );
    server.state.lock().unwrap().refuse_login = None;
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { last_uid: 1, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
}

/// Gmail over its bandwidth limits refuses logins and body fetches with `Account exceeded
/// command or bandwidth limits.` for hours: ten minutes between tries, said so, the password
/// never taken for wrong (which parks the account) and the schedule never walked into its
/// hourly part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_over_its_bandwidth_limits_is_retried_every_ten_minutes_at_login_and_at_fetch() {
    let over = "[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)";
    for at_login in [true, false] {
        let server = Scripted::start().await;
        server.add_message("one");
        {
            let mut st = server.state.lock().unwrap();
            st.extra_caps = "X-GM-EXT-1".into();
            if at_login {
                st.refuse_login = Some(over.into());
            } else {
                st.refuse_fetch = Some(over.into());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let config = scripted_config(dir.path(), server.port, "all", "");
        let (w, rec, mut ev) = watch(&config).await;
        let (d, m) = next_failure(&mut ev).await;
        let ten = inboxd::core::failure::OVER_LIMIT_WAIT;
        assert!(d >= ten && d <= ten.mul_f64(1.1), "at_login {at_login}: {d:?} ({m})");
        assert!(
            m.contains("bandwidth") && m.contains("tries again every 10 minutes"),
            "{m}"
        );
        w.stop().await.unwrap();
        assert!(rec.subjects().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_enable_utf8_is_spoken_to_in_modified_utf7() {
    // It advertises UTF8=ACCEPT but answers ENABLE with BAD: the session goes on as before.
    let server = Scripted::start().await;
    {
        let mut st = server.state.lock().unwrap();
        st.extra_caps = "ENABLE UTF8=ACCEPT".into();
        st.refuse_enable = true;
    }
    server.add_message("one");
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one"]);
    let cmds = server.state.lock().unwrap().commands.clone();
    assert!(cmds.iter().any(|c| c.starts_with("ENABLE UTF8=ACCEPT")), "{cmds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_a_listing_read_ahead_loses_and_repeats_nothing() {
    // 2,500 messages: the second window's listing (1001:2000) is read ahead with the last batch
    // of the first, and the server says BYE instead of answering it.
    let server = Scripted::start().await;
    for i in 0..2_500 {
        server.add_message(&format!("m{i}"));
    }
    server.state.lock().unwrap().bye_at_listing = Some(2);
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let (w, rec, mut ev) = watch(&config).await;
    wait_delivered(&mut ev, 2_500, 60).await;
    w.stop().await.unwrap();
    assert_eq!(rec.uids(), (1..=2_500).collect::<Vec<u32>>());
    let st = server.state.lock().unwrap();
    assert!(
        st.connections >= 2,
        "the BYE was not met: {} connection(s)",
        st.connections
    );
    assert!(
        st.commands.iter().any(|c| c.contains("1001:2000")),
        "no windowed listing: {:?}",
        st.commands
            .iter()
            .filter(|c| c.contains("RFC822.SIZE"))
            .collect::<Vec<_>>()
    );
}

/// One message's Gmail metadata and its JSON envelope.
type GmailRecord = (Option<inboxd::imap::Gmail>, serde_json::Value);

/// Records each message's Gmail metadata and its JSON envelope.
#[derive(Clone, Default)]
struct GmailSeen(std::sync::Arc<std::sync::Mutex<Vec<GmailRecord>>>);

impl inboxd::handler::Handler for GmailSeen {
    fn deliver<'a>(
        &'a mut self,
        m: &'a inboxd::handler::Message<'a>,
    ) -> futures::future::BoxFuture<'a, Result<(), inboxd::handler::HandlerError>> {
        let env = inboxd::envelope::Envelope::build(m, &inboxd::envelope::JsonOptions::default()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&env.to_json()).unwrap();
        self.0.lock().unwrap().push((m.gmail.cloned(), json));
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_ids_and_labels_come_with_the_listing_into_the_message_and_its_json() {
    let server = Scripted::start().await;
    server.state.lock().unwrap().extra_caps = "X-GM-EXT-1".into();
    server.add_message("one");
    server.add_message("two");
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let seen = GmailSeen::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(seen.clone()),
        Mode::Once,
    );
    w.join().await.unwrap();
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let (gmail, json) = &seen[1];
    assert_eq!(
        gmail.as_ref().unwrap(),
        &inboxd::imap::Gmail {
            msgid: 1_700_000_000_000_000_002,
            thrid: 1_600_000_000_000_000_001,
            labels: vec!["\\Inbox".into(), "Kunden/Müller".into(), "Important".into()],
        }
    );
    // Decimal strings: beyond JavaScript's exact integers.
    assert_eq!(json["gmail"]["msgid"], "1700000000000000002");
    assert_eq!(json["gmail"]["thrid"], "1600000000000000001");
    assert_eq!(json["gmail"]["labels"][1], "Kunden/Müller");
    let cmds = server.state.lock().unwrap().commands.clone();
    assert!(
        cmds.iter().any(|c| c.contains("X-GM-MSGID X-GM-THRID X-GM-LABELS")),
        "{cmds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_x_gm_ext_1_nothing_gmail_is_asked_or_told() {
    let server = Scripted::start().await;
    server.add_message("one");
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port, "all", "");
    let seen = GmailSeen::default();
    Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(seen.clone()),
        Mode::Once,
    )
    .join()
    .await
    .unwrap();
    let seen = seen.0.lock().unwrap().clone();
    assert!(seen[0].0.is_none() && seen[0].1.get("gmail").is_none());
    let cmds = server.state.lock().unwrap().commands.clone();
    assert!(!cmds.iter().any(|c| c.contains("X-GM")), "{cmds:?}");
}

/// Runs a watch of INBOX and one of `[Gmail]/All Mail` once each against the scripted server
/// (`identity` an account line); the files in their shared Maildir `out`, and the store.
async fn gmail_labels_run(dir: &Path, port: u16, identity: &str) -> (usize, Config, Result<(), String>) {
    // The shared config's watch (INBOX), and a second one on `[Gmail]/All Mail`.
    let config = config_with(
        dir,
        port,
        identity,
        "start = \"all\"\n[[watch]]\naccount = \"s\"\nfolder = \"[Gmail]/All Mail\"\nstart = \"all\"\ndeliver = { maildir = \"out\" }",
    );
    let store = store(&config).await;
    let mut result = Ok(());
    for w in &config.watches {
        if let Err(e) = Watcher::start(w.clone(), store.clone(), Mode::Once)
            .unwrap()
            .join()
            .await
        {
            result = Err(e.to_string());
        }
    }
    let files = ["new", "cur"]
        .iter()
        .filter_map(|d| std::fs::read_dir(dir.join("out").join(d)).ok())
        .map(|r| r.count())
        .sum();
    (files, config, result)
}

/// Gmail shows one message in every folder (label) it carries: watched in two folders into one
/// Maildir, each message lands once under its Gmail key (`gm1-...`), and the log of each folder
/// tells which key the targets got. `identity = "uid"` keeps one key per folder (so two
/// copies); `identity = "gmail"` against a server without X-GM-EXT-1 is refused, named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gmail_message_under_two_labels_is_one_message_for_a_target_that_deduplicates() {
    let server = Scripted::start().await;
    server.state.lock().unwrap().extra_caps = "X-GM-EXT-1".into();
    server.add_message("one");
    server.add_message("two");

    let dir = tempfile::tempdir().unwrap();
    let (files, config, result) = gmail_labels_run(dir.path(), server.port, "").await;
    result.unwrap();
    assert_eq!(files, 2, "each message once, though both folders delivered it");
    let store = store(&config).await;
    let gm = inboxd::core::key::gmail_key("s", 1_700_000_000_000_000_002);
    let found = store
        .delivery(&gm)
        .await
        .unwrap()
        .expect("found by the key its targets got");
    assert_eq!((found.uid, found.target_key.as_str()), (2, gm.as_str()));
    let logged = store
        .by_status(inboxd::store::DeliveryStatus::Delivered, 10)
        .await
        .unwrap();
    assert_eq!(logged.len(), 4, "each folder logs its own delivery: {logged:?}");
    assert!(
        logged
            .iter()
            .all(|d| d.target_key.starts_with("gm1-") && d.key.starts_with("v1-"))
    );

    let dir = tempfile::tempdir().unwrap();
    let (files, _, result) = gmail_labels_run(dir.path(), server.port, "identity = \"uid\"").await;
    result.unwrap();
    assert_eq!(files, 4, "a key per folder: each folder's copy");

    let plain = Scripted::start().await;
    plain.add_message("one");
    let dir = tempfile::tempdir().unwrap();
    let (files, _, result) = gmail_labels_run(dir.path(), plain.port, "identity = \"gmail\"").await;
    let e = result.unwrap_err();
    assert!(e.contains("identity = \"gmail\"") && e.contains("X-GM-EXT-1"), "{e}");
    assert_eq!(files, 0);
}
