//! The NATS JetStream target against a real Dovecot and a real nats-server of the test's own.
#![cfg(feature = "nats")]

mod support;

use std::time::Duration;

use futures::StreamExt;
use inboxd::watcher::{Event, Mode, Watcher};
use inboxd_testbed::Nats;
use support::*;

/// A client of the test's server (trusting its CA when it speaks TLS).
async fn client(nats: &Nats) -> async_nats::Client {
    let mut options = async_nats::ConnectOptions::new();
    if nats.url().starts_with("tls:") {
        options = options.add_root_certificates(nats.ca_file()).require_tls(true);
    }
    options.connect(nats.url()).await.unwrap()
}

async fn stream(nats: &Nats, name: &str, subjects: &str) -> async_nats::jetstream::stream::Stream {
    let client = client(nats).await;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![subjects.to_string()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Every message of the stream: (subject, Nats-Msg-Id, payload).
async fn stored(nats: &Nats, name: &str) -> Vec<(String, String, Vec<u8>)> {
    let client = client(nats).await;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(name).await.unwrap();
    let count = stream.info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut batch = consumer.fetch().max_messages(count.max(1)).messages().await.unwrap();
    while out.len() < count {
        let m = tokio::time::timeout(Duration::from_secs(10), batch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        out.push((m.subject.to_string(), id, m.payload.to_vec()));
    }
    out
}

fn nats_watch(nats: &Nats, extra: &str) -> String {
    format!(
        "start = \"all\"\ndeliver = {{ nats = \"{}\", subject = \"mail.{{account}}.{{folder}}\"{extra} }}",
        nats.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_and_live_mail_reach_the_stream_in_order_and_a_replay_is_deduplicated() {
    let dv = dovecot();
    let nats = Nats::start().unwrap();
    stream(&nats, "MAIL", "mail.>").await;
    let subjects: Vec<String> = (1..=20).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
    append(&dv, "INBOX", &refs).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dv, dir.path(), "", &nats_watch(&nats, ""));
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { last_uid: 20, .. })).await;
    append(&dv, "INBOX", &["live"]).await;
    wait_for(&mut ev, 30, |e| matches!(e, Event::Delivered { uid: 21, .. })).await;
    w.stop().await.unwrap();

    let got = stored(&nats, "MAIL").await;
    assert_eq!(got.len(), 21);
    let mut uids = Vec::new();
    for (subject, id, payload) in &got {
        assert_eq!(subject, "mail.t.INBOX");
        let json: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(json["key"], id.as_str(), "Nats-Msg-Id is the idempotency key");
        uids.push(json["uid"].as_u64().unwrap());
    }
    assert_eq!(uids, (1..=21).collect::<Vec<u64>>(), "in UID order");

    // Everything again, as after a crash that lost the state: the stream drops the repeats.
    let again = tempfile::tempdir().unwrap();
    let replay = support::config(&dv, again.path(), "", &nats_watch(&nats, ""));
    let w = Watcher::start(replay.watches[0].clone(), store(&replay).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    assert_eq!(
        stored(&nats, "MAIL").await.len(),
        21,
        "re-published messages were stored twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_during_a_backlog_loses_and_repeats_nothing() {
    let dv = dovecot();
    let mut nats = Nats::start().unwrap();
    stream(&nats, "MAIL", "mail.>").await;
    let msgs: Vec<Vec<u8>> = (0..500)
        .map(|i| inboxd_testbed::sample_message(i, &format!("b{i}"), 2000))
        .collect();
    dv.drop_messages("alice", "INBOX", &msgs[..250]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"500ms\" } ]",
        &format!(
            "{}\nbatch_size = 50\nretry_initial = \"200ms\"\nretry_max = \"1s\"",
            nats_watch(&nats, ", timeout = \"2s\"")
        ),
    );
    let dead = backlog_across_outage(&dv, &config, &msgs, "nats", |up| {
        if up { nats.restart().unwrap() } else { nats.stop() }
    })
    .await;
    assert_eq!(dead, 0, "a broker outage dead-lettered messages");
    let got = stored(&nats, "MAIL").await;
    let mut ids: Vec<&str> = got.iter().map(|(_, id, _)| id.as_str()).collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        (total, ids.len()),
        (500, 500),
        "lost or repeated messages across the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_stream_captures_is_a_clear_failure_not_a_dead_letter() {
    let dv = dovecot();
    let nats = Nats::start().unwrap();
    append(&dv, "INBOX", &["a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        &format!("{}\nmax_attempts = 1", nats_watch(&nats, "")),
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 30, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    assert!(
        matches!(&e, Event::Disconnected { error: Some(m), .. } if m.contains("no JetStream stream")),
        "{e:?}"
    );
    // `inboxd check` says the same before delivering anything.
    let mut handler = inboxd::handler::from_config(&config.watches[0].targets[0].deliver).unwrap();
    let e = handler.probe("t", "INBOX").await.unwrap_err();
    assert!(
        e.is_unavailable() && e.reason.contains("no JetStream stream captures mail.t.INBOX"),
        "{e:?}"
    );
    // Once a stream exists, the message goes through: it was never dead-lettered.
    stream(&nats, "LATE", "mail.>").await;
    let ok = handler.probe("t", "INBOX").await.unwrap();
    assert!(ok.contains("stream LATE"), "{ok}");
    w.stop().await.unwrap();
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    assert_eq!(stored(&nats, "LATE").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_is_verified_with_the_given_ca() {
    let dv = dovecot();
    let nats = Nats::start_tls().unwrap();
    stream(&nats, "MAIL", "mail.>").await;
    append(&dv, "INBOX", &["over tls"]).await;
    let dir = tempfile::tempdir().unwrap();
    let watch = |ca: &str| {
        format!(
            "start = \"all\"\ndeliver = {{ nats = \"{}\", subject = \"mail.{{account}}\", timeout = \"3s\"{ca} }}",
            nats.url()
        )
    };
    // Without the CA the server's certificate is not trusted: the watch waits, nothing is lost.
    let untrusted = config(&dv, dir.path(), "", &watch(""));
    let mut handler = inboxd::handler::from_config(&untrusted.watches[0].targets[0].deliver).unwrap();
    assert!(handler.probe("t", "INBOX").await.is_err());
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        &watch(&format!(", ca_file = \"{}\"", nats.ca_file().display())),
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    let got = stored(&nats, "MAIL").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "mail.t");
}
