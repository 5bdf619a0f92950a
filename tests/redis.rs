//! The Redis Streams target against a real Dovecot and a real redis-server of the test's own.
#![cfg(feature = "redis")]

mod support;

use inboxd::watcher::{Mode, Watcher};
use inboxd_testbed::Redis;
use support::*;

/// Every entry of a stream: (key field, uid field, payload).
async fn entries(redis: &Redis, stream: &str) -> Vec<(String, u64, Vec<u8>)> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            let key: String = e.get("key").unwrap();
            let uid: u64 = e.get("uid").unwrap();
            let payload: Vec<u8> = e.get("payload").unwrap();
            (key, uid, payload)
        })
        .collect()
}

fn redis_watch(redis: &Redis, extra: &str) -> String {
    format!("start = \"all\"\ndeliver = {{ redis = \"{}\"{extra} }}", redis.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_lands_in_the_stream_in_order_and_a_replay_adds_nothing() {
    let dv = dovecot();
    let redis = Redis::start().unwrap();
    append(&dv, "INBOX", &["a", "b", "c", "d", "e"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dv, dir.path(), "", &redis_watch(&redis, ""));
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    let got = entries(&redis, "inboxd:t:INBOX").await;
    assert_eq!(got.iter().map(|e| e.1).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    let mut handler = inboxd::handler::from_config(&config.watches[0].targets[0].deliver).unwrap();
    let ok = handler.probe("t", "INBOX").await.unwrap();
    assert!(ok.contains("PONG") && ok.contains("inboxd:t:INBOX"), "{ok}");
    for (key, _, payload) in &got {
        let json: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(json["key"], key.as_str());
    }
    // The same messages again, as after a crash that lost the state: nothing is added.
    let again = tempfile::tempdir().unwrap();
    let replay = support::config(&dv, again.path(), "", &redis_watch(&redis, ", format = \"raw\""));
    let w = Watcher::start(replay.watches[0].clone(), store(&replay).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    assert_eq!(entries(&redis, "inboxd:t:INBOX").await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_down_during_a_backlog_loses_and_repeats_nothing() {
    let dv = dovecot();
    let mut redis = Redis::start().unwrap();
    let msgs: Vec<Vec<u8>> = (0..500)
        .map(|i| inboxd_testbed::sample_message(i, &format!("r{i}"), 2000))
        .collect();
    dv.drop_messages("alice", "INBOX", &msgs[..250]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"500ms\" } ]",
        &format!(
            "{}\nbatch_size = 50\nretry_initial = \"200ms\"\nretry_max = \"1s\"",
            redis_watch(&redis, ", timeout = \"2s\"")
        ),
    );
    let dead = backlog_across_outage(&dv, &config, &msgs, "redis", |up| {
        if up { redis.restart().unwrap() } else { redis.stop() }
    })
    .await;
    assert_eq!(dead, 0);
    let got = entries(&redis, "inboxd:t:INBOX").await;
    let uids: Vec<u64> = got.iter().map(|e| e.1).collect();
    assert_eq!(
        uids,
        (1..=500).collect::<Vec<u64>>(),
        "lost, repeated or reordered entries"
    );
    // `inboxd check` sees a Redis that is down as unusable.
    redis.stop();
    let mut handler = inboxd::handler::from_config(&config.watches[0].targets[0].deliver).unwrap();
    assert!(handler.probe("t", "INBOX").await.unwrap_err().is_unavailable());
}
