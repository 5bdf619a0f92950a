//! The MQTT target against a real Dovecot and a Mosquitto of the test's own.
#![cfg(feature = "mqtt")]

#[path = "support/mqtt_sub.rs"]
mod mqtt_sub;
mod support;
#[path = "support/tls.rs"]
mod tls;

use std::time::Duration;

use inboxd::watcher::{Event, Mode, Watcher};
use inboxd_testbed::Mosquitto;
use mqtt_sub::subscriber;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_and_live_mail_arrive_in_order_with_the_key_as_a_user_property() {
    let dv = dovecot();
    let broker = Mosquitto::start().unwrap();
    let got = subscriber(&broker, "mail/#").await;
    let names: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    append(&dv, "INBOX", &refs).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        &format!(
            "start = \"all\"\ndeliver = {{ mqtt = \"{}\", topic = \"mail/{{account}}/{{folder}}\" }}",
            broker.url()
        ),
    );
    let mut handler = inboxd::handler::from_config(&config.watches[0].targets[0].deliver).unwrap();
    assert!(
        handler
            .probe("t", "INBOX")
            .await
            .unwrap()
            .contains("accepts connections")
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { last_uid: 10, .. })).await;
    append(&dv, "INBOX", &["live"]).await;
    wait_for(&mut ev, 30, |e| matches!(e, Event::Delivered { uid: 11, .. })).await;
    w.stop().await.unwrap();
    // QoS 1 to the subscriber too: give the last ones a moment to arrive.
    for _ in 0..100 {
        if got.lock().unwrap().len() >= 11 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 11);
    let mut uids = Vec::new();
    for (topic, key, payload) in &got {
        assert_eq!(topic, "mail/t/INBOX");
        let json: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(
            json["key"],
            key.as_str(),
            "the inboxd-key user property is the idempotency key"
        );
        uids.push(json["uid"].as_u64().unwrap());
    }
    assert_eq!(uids, (1..=11).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_during_a_backlog_loses_nothing() {
    let dv = dovecot();
    let mut broker = Mosquitto::start().unwrap();
    let msgs: Vec<Vec<u8>> = (0..200)
        .map(|i| inboxd_testbed::sample_message(i, &format!("q{i}"), 2000))
        .collect();
    dv.drop_messages("alice", "INBOX", &msgs[..100]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"500ms\" } ]",
        &format!(
            "start = \"all\"\nbatch_size = 20\nretry_initial = \"200ms\"\nretry_max = \"1s\"\ndeliver = {{ mqtt = \"{}\", topic = \"mail/{{account}}\", timeout = \"2s\" }}",
            broker.url()
        ),
    );
    let got = subscriber(&broker, "mail/#").await;
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    wait_for(&mut ev, 60, |e| matches!(e, Event::CaughtUp { last_uid: 100, .. })).await;
    broker.stop();
    append_raw(&dv, "INBOX", &msgs[100..]).await;
    let e = wait_for(&mut ev, 60, |e| {
        matches!(e, Event::Failed { .. } | Event::Disconnected { error: Some(_), .. })
    })
    .await;
    assert!(format!("{e:?}").contains("mqtt"), "{e:?}");
    broker.restart().unwrap();
    let got2 = subscriber(&broker, "mail/#").await;
    wait_for(&mut ev, 120, |e| matches!(e, Event::CaughtUp { last_uid: 200, .. })).await;
    let dead = w.health().dead_lettered;
    w.stop().await.unwrap();
    assert_eq!(dead, 0);
    for _ in 0..100 {
        if got.lock().unwrap().len() + got2.lock().unwrap().len() >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every message reached a subscriber at least once (MQTT cannot drop repeats: a batch in
    // flight at the outage may come twice).
    let mut keys: Vec<String> = got.lock().unwrap().iter().map(|g| g.1.clone()).collect();
    keys.extend(got2.lock().unwrap().iter().map(|g| g.1.clone()));
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 200, "lost messages across the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_verifies_the_broker_with_the_given_ca_and_refuses_it_without() {
    let dv = dovecot();
    let broker = Mosquitto::start_tls().unwrap();
    append(&dv, "INBOX", &["over tls"]).await;
    let dir = tempfile::tempdir().unwrap();
    let watch = |ca: &str| {
        format!(
            "start = \"all\"\ndeliver = {{ mqtt = \"{}\", topic = \"mail/{{account}}\", timeout = \"5s\"{ca} }}",
            broker.url()
        )
    };
    // Without the CA, the platform's roots do not know the broker: a clear refusal.
    let untrusted = config(&dv, dir.path(), "", &watch(""));
    let mut handler = inboxd::handler::from_config(&untrusted.watches[0].targets[0].deliver).unwrap();
    let e = handler.probe("t", "INBOX").await.unwrap_err();
    assert!(
        e.reason.contains("TLS") && e.reason.contains("certificate"),
        "{}",
        e.reason
    );

    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        &watch(&format!(", ca_file = \"{}\"", broker.ca_file().display())),
    );
    let mut handler = inboxd::handler::from_config(&config.watches[0].targets[0].deliver).unwrap();
    let ok = handler.probe("t", "INBOX").await.unwrap();
    assert!(ok.contains("certificate verified"), "{ok}");
    let got = subscriber(&broker, "mail/#").await;
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    for _ in 0..100 {
        if !got.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert!(got[0].1.starts_with("v1-"), "the key travels over TLS too");
}
