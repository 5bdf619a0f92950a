//! The AMQP target against a real Dovecot and the machine's RabbitMQ (127.0.0.1:5672,
//! guest/guest; `.ci/run` starts it when it is not running). Each test uses queues of its own
//! and deletes them; the test that kills the broker runs a RabbitMQ node of its own.
#![cfg(feature = "amqp")]

mod support;
#[path = "support/tls.rs"]
mod tls;

use amqprs::channel::{BasicGetArguments, Channel, QueueDeclareArguments, QueueDeleteArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use inboxd::watcher::{Event, Mode, Watcher};
use support::*;

async fn rabbit() -> (Connection, Channel) {
    rabbit_at(5672).await
}

async fn rabbit_at(port: u16) -> (Connection, Channel) {
    let args = OpenConnectionArguments::new("127.0.0.1", port, "guest", "guest");
    let c = Connection::open(&args)
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (.ci/run starts it: rabbitmq-server -detached)");
    let ch = c.open_channel(None).await.unwrap();
    (c, ch)
}

fn queue_name() -> String {
    format!("inboxd-test-{}-{}", std::process::id(), fastrand::u64(..))
}

/// Every message in the queue, in order: (message_id, body).
async fn drain(ch: &Channel, queue: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((_, props, body)) = ch
        .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
        .await
        .unwrap()
    {
        out.push((props.message_id().cloned().unwrap_or_default(), body));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_and_live_mail_are_confirmed_persistent_and_in_order() {
    let dv = dovecot();
    let (_c, ch) = rabbit().await;
    let queue = queue_name();
    ch.queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await
        .unwrap();
    let names: Vec<String> = (1..=20).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    append(&dv, "INBOX", &refs).await;
    let dir = tempfile::tempdir().unwrap();
    // The default exchange routes by queue name.
    let config = config(
        &dv,
        dir.path(),
        "",
        &format!(
            "start = \"all\"\ndeliver = {{ amqp = \"amqp://127.0.0.1:5672/%2f\", routing_key = \"{queue}\", password = \"guest\" }}"
        ),
    );
    let mut handler = inboxd::handler::from_config(&config.watches[0].targets[0].deliver).unwrap();
    assert!(
        handler
            .probe("t", "INBOX")
            .await
            .unwrap()
            .contains("publisher confirms on")
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { last_uid: 20, .. })).await;
    append(&dv, "INBOX", &["live"]).await;
    wait_for(&mut ev, 30, |e| matches!(e, Event::Delivered { uid: 21, .. })).await;
    w.stop().await.unwrap();
    let got = drain(&ch, &queue).await;
    ch.queue_delete(QueueDeleteArguments::new(&queue)).await.unwrap();
    assert_eq!(got.len(), 21);
    let mut uids = Vec::new();
    for (id, body) in &got {
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["key"], id.as_str(), "message_id is the idempotency key");
        uids.push(json["uid"].as_u64().unwrap());
    }
    assert_eq!(uids, (1..=21).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_is_a_failure_of_the_watch_not_a_silent_drop() {
    let dv = dovecot();
    append(&dv, "INBOX", &["a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let queue = queue_name();
    let config = config(
        &dv,
        dir.path(),
        "",
        &format!(
            "start = \"all\"\nmax_attempts = 1\ndeliver = {{ amqp = \"amqp://127.0.0.1:5672/%2f\", routing_key = \"{queue}\", password = \"guest\" }}"
        ),
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 30, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    assert!(
        matches!(&e, Event::Disconnected { error: Some(m), .. } if m.contains("unroutable") && m.contains("NO_ROUTE")),
        "{e:?}"
    );
    assert_eq!(w.health().dead_lettered, 0);
    w.stop().await.unwrap();
    // With the queue there, the same message goes through.
    let (_c, ch) = rabbit().await;
    ch.queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await
        .unwrap();
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    let got = drain(&ch, &queue).await;
    ch.queue_delete(QueueDeleteArguments::new(&queue)).await.unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_during_a_backlog_loses_nothing_and_repeats_at_most_a_batch() {
    let dv = dovecot();
    let mut broker = inboxd_testbed::Rabbit::start().unwrap();
    let queue = "mail";
    {
        let (_c, ch) = rabbit_at(broker.port).await;
        ch.queue_declare(QueueDeclareArguments::durable_client_named(queue))
            .await
            .unwrap();
    }
    let msgs: Vec<Vec<u8>> = (0..500)
        .map(|i| inboxd_testbed::sample_message(i, &format!("b{i}"), 2000))
        .collect();
    dv.drop_messages("alice", "INBOX", &msgs[..250]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let batch = 50;
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"500ms\" } ]",
        &format!(
            "start = \"all\"\nbatch_size = {batch}\nretry_initial = \"200ms\"\nretry_max = \"1s\"\ndeliver = {{ amqp = \"{}\", routing_key = \"{queue}\", password = \"guest\", timeout = \"2s\" }}",
            broker.url()
        ),
    );
    // The node stopped (SIGTERM to its process group) mid-backlog, then started again on the
    // same port and data.
    let dead = backlog_across_outage(&dv, &config, &msgs, "amqp", |up| {
        if up { broker.restart().unwrap() } else { broker.stop() }
    })
    .await;
    assert_eq!(dead, 0, "a broker outage dead-lettered messages");
    let (_c, ch) = rabbit_at(broker.port).await;
    let got = drain(&ch, queue).await;
    let mut ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 500, "lost messages across the outage");
    // Confirmed messages are on disk; only a batch published but not yet confirmed when the
    // broker died can come again.
    assert!(total - 500 <= batch, "{} repeats, more than a batch", total - 500);
    eprintln!(
        "amqp broker restarted mid-backlog: 500 delivered, {} repeated",
        total - 500
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_verifies_the_broker_with_the_given_ca() {
    let dv = dovecot();
    let broker = inboxd_testbed::Rabbit::start_tls().unwrap();
    // The test's own client, over TLS, trusting only the test bed's CA.
    let connect = || async {
        let mut args = OpenConnectionArguments::new("localhost", broker.port, "guest", "guest");
        args.tls_adaptor(amqprs::tls::TlsAdaptor::new(
            tokio_rustls::TlsConnector::from(tls::client_config(&broker.ca_file())),
            "localhost".into(),
        ));
        let c = Connection::open(&args.finish()).await.unwrap();
        let ch = c.open_channel(None).await.unwrap();
        (c, ch)
    };
    let (_c, ch) = connect().await;
    ch.queue_declare(QueueDeclareArguments::durable_client_named("mail"))
        .await
        .unwrap();
    append(&dv, "INBOX", &["over tls"]).await;
    let dir = tempfile::tempdir().unwrap();
    let watch = |ca: &str| {
        format!(
            "start = \"all\"\ndeliver = {{ amqp = \"{}\", routing_key = \"mail\", password = \"guest\", timeout = \"5s\"{ca} }}",
            broker.url()
        )
    };
    let untrusted = config(&dv, dir.path(), "", &watch(""));
    let mut handler = inboxd::handler::from_config(&untrusted.watches[0].targets[0].deliver).unwrap();
    assert!(
        handler.probe("t", "INBOX").await.is_err(),
        "an unknown CA must not be accepted"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        &watch(&format!(", ca_file = \"{}\"", broker.ca_file().display())),
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    let got = drain(&ch, "mail").await;
    assert_eq!(got.len(), 1);
    assert!(got[0].0.starts_with("v1-"));
}
