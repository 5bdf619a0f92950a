//! Large messages against the scripted server: fetched in pieces into a spool file, and a
//! server that ignores the range asked for. (A test binary of its own: the memory assertions
//! of `scripted.rs` read the process's peak RSS, which these messages would raise.)

mod support;

use inboxd::watcher::Event;
use support::scripted::{Scripted, config_with, watch};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_is_fetched_in_pieces_and_handed_over_as_a_file() {
    let server = Scripted::start().await;
    server.add_message("small");
    server.add_message_sized("large", 9 << 20);
    server.add_message("after");
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), server.port, "", "start = \"all\"\nspool_above = \"64KiB\"");
    let (w, rec, mut ev) = watch(&config).await;
    wait_delivered(&mut ev, 3, 30).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["small", "large", "after"]);
    let expected = server.state.lock().unwrap().messages[1].1.clone();
    assert!(
        rec.seen.lock().unwrap()[1].2 == expected,
        "the spooled message arrived changed"
    );
    // In pieces: as many partial fetches as pieces (the last one short), and nothing left in
    // the spool.
    let pieces = expected.len() / inboxd::watcher::SPOOL_CHUNK as usize + 1;
    assert!(pieces >= 2);
    assert_eq!(server.state.lock().unwrap().partial_fetches as usize, pieces);
    let spool = dir.path().join("state.db.spool");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0, "spool files left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_the_range_cannot_make_a_large_message_sit_in_memory() {
    let server = Scripted::start().await;
    server.add_message_sized("large", 9 << 20);
    server.add_message("after");
    server.state.lock().unwrap().ignore_partial = true;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        server.port,
        "",
        "start = \"all\"\nspool_above = \"64KiB\"\nmax_attempts = 2\nretry_initial = \"100ms\"",
    );
    let (w, rec, mut ev) = watch(&config).await;
    // The whole message announced where a 4 MiB piece was asked for is refused before it is
    // read; after max_attempts the message is dead-lettered with the reason, and the folder
    // goes on.
    let e = wait_for(&mut ev, 30, |e| matches!(e, Event::DeadLettered { .. })).await;
    let Event::DeadLettered { uid, error, .. } = e else {
        unreachable!()
    };
    assert_eq!(uid, 1);
    assert!(
        error.contains("could not be fetched") && error.contains("literal of"),
        "{error}"
    );
    wait_delivered(&mut ev, 1, 30).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["after"]);
}
