//! The webhook target against a real Dovecot and a real HTTP receiver that verifies the
//! Standard Webhooks signature with the convention's own library; and the JSON message checked
//! against its JSON Schema.

#[path = "support/receiver.rs"]
mod receiver;
mod support;

use std::time::Duration;

use inboxd::watcher::{Event, Mode, Watcher};
use receiver::{Receiver, SECRET};
use support::*;

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema/inboxd.message.v1.json")).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn assert_valid(v: &jsonschema::Validator, json: &[u8]) -> serde_json::Value {
    let value: serde_json::Value = serde_json::from_slice(json).unwrap();
    let errors: Vec<String> = v
        .iter_errors(&value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:?}\n{value}");
    value
}

fn webhook_watch(url: &str, extra: &str) -> String {
    format!("start = \"all\"\ndeliver = {{ webhook = \"{url}\", secret = \"{SECRET}\"{extra} }}")
}

fn multipart(n: usize) -> Vec<u8> {
    format!(
        "From: \"Ann Example\" <ann@example.com>\r\nTo: support@example.com\r\nSubject: =?utf-8?q?Rechnung_Nr=2E_{n}_=E2=82=AC?=\r\nMessage-ID: <mp.{n}@example.com>\r\nDate: Thu, 26 Nov 2026 07:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHallo {n}\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"r{n}.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_arrives_signed_in_order_as_valid_json_once_per_key() {
    let dv = dovecot();
    let rx = Receiver::start().await;
    let mut msgs: Vec<Vec<u8>> = (1..=4).map(multipart).collect();
    // A large one: spooled (above spool_above), its envelope built from the file.
    msgs.push(inboxd_testbed::sample_message(5, "large", 300_000));
    append_raw(&dv, "INBOX", &msgs).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        &format!(
            "{}\nspool_above = \"64KiB\"",
            webhook_watch(&rx.url, ", attachments = \"inline\"")
        ),
    );
    let mut handler = inboxd::handler::from_config(&config.watches[0].targets[0].deliver).unwrap();
    let ok = handler.probe("t", "INBOX").await.unwrap();
    assert!(ok.contains("reachable") && ok.contains("signing secret ok"), "{ok}");
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    assert_eq!(w.join().await.unwrap(), 0);
    let v = schema();
    let requests = rx.requests();
    assert_eq!(requests.len(), 5, "one request per message");
    let mut uids = Vec::new();
    for r in &requests {
        assert!(r.verified, "signature did not verify for {}", r.id);
        assert_eq!(r.content_type, "application/json");
        let json = assert_valid(&v, &r.body);
        assert_eq!(json["key"], r.id.as_str(), "webhook-id is the idempotency key");
        uids.push(json["uid"].as_u64().unwrap());
    }
    assert_eq!(uids, vec![1, 2, 3, 4, 5], "in UID order");
    let first: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(first["headers"]["subject"], "Rechnung Nr. 1 €");
    assert_eq!(first["headers"]["from"][0]["address"], "ann@example.com");
    assert_eq!(first["attachments"][0]["filename"], "r1.pdf");
    assert_eq!(first["attachments"][0]["content"], "JVBERi0xLjQK");
    assert!(first["internal_date"].as_str().is_some(), "{first}");
    let large: serde_json::Value = serde_json::from_slice(&requests[4].body).unwrap();
    assert_eq!(large["size"], msgs[4].len());
    assert_eq!(large["headers"]["subject"], "large");
    assert_eq!(large["parse"]["complete"], true);

    // A second run over the same state sends nothing again.
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    w.join().await.unwrap();
    assert_eq!(rx.requests().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_receiver_is_waited_for_and_its_retry_after_honoured_without_dead_letters() {
    let dv = dovecot();
    let rx = Receiver::start().await;
    append(&dv, "INBOX", &["a", "b"]).await;
    // 503, 503 (Retry-After: 2), 429, then 200s. max_attempts = 1: a counted failure would
    // dead-letter at once, so only "busy is not counted" lets both messages through.
    rx.inner.lock().unwrap().script = [(503, None), (503, Some(2)), (429, None)].into();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        &format!(
            "{}\nmax_attempts = 1\nretry_initial = \"100ms\"",
            webhook_watch(&rx.url, "")
        ),
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    let t = std::time::Instant::now();
    wait_delivered(&mut ev, 2, 30).await;
    let took = t.elapsed();
    w.stop().await.unwrap();
    let requests = rx.requests();
    assert_eq!(requests.len(), 5, "three busy answers, then two deliveries");
    assert!(
        requests[..4].iter().all(|r| r.id == requests[0].id),
        "the same message until accepted"
    );
    assert_eq!(rx.accepted_ids().len(), 2);
    // The receiver asked for 2 s once: honoured (the back-off alone is 100-400 ms).
    assert!(took >= Duration::from_secs(2), "Retry-After not honoured: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_dead_letters_at_once_other_refusals_count_and_redirects_are_not_followed() {
    let dv = dovecot();
    let rx = Receiver::start().await;
    append(&dv, "INBOX", &["gone", "bad", "fine"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_text = |url: &str| {
        format!(
            "{}\nmax_attempts = 2\nretry_initial = \"100ms\"",
            webhook_watch(url, "")
        )
    };
    // 410 for the first message; 400 twice for the second (its two attempts).
    rx.inner.lock().unwrap().script = [(410, None), (400, None), (400, None)].into();
    let first = config(&dv, dir.path(), "", &cfg_text(&rx.url));
    let w = Watcher::start(first.watches[0].clone(), store(&first).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    let mut dead = Vec::new();
    while dead.len() < 2 {
        if let Event::DeadLettered { uid, error, .. } =
            wait_for(&mut ev, 30, |e| matches!(e, Event::DeadLettered { .. })).await
        {
            dead.push((uid, error));
        }
    }
    wait_for(&mut ev, 30, |e| matches!(e, Event::Delivered { uid: 3, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(dead[0].0, 1);
    assert!(dead[0].1.contains("410"), "{:?}", dead[0]);
    assert_eq!(dead[1].0, 2);
    assert!(dead[1].1.contains("400"), "{:?}", dead[1]);
    let per_uid = |n: usize| rx.requests().iter().filter(|r| r.id == rx.requests()[n].id).count();
    assert_eq!(per_uid(0), 1, "410: one request, no retry");
    assert_eq!(per_uid(1), 2, "400: max_attempts requests");

    // A redirect is a failed attempt, and its target is never asked.
    let dv2 = dovecot();
    append(&dv2, "INBOX", &["x"]).await;
    let dir2 = tempfile::tempdir().unwrap();
    let moved = rx.url.replace("/hook", "/moved");
    let second = config(&dv2, dir2.path(), "", &cfg_text(&moved));
    let w = Watcher::start(second.watches[0].clone(), store(&second).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 30, |e| matches!(e, Event::DeadLettered { .. })).await;
    w.stop().await.unwrap();
    assert!(
        matches!(&e, Event::DeadLettered { error, .. } if error.contains("302") && error.contains("not followed")),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reads_the_json_message_on_stdin() {
    let dv = dovecot();
    append_raw(&dv, "INBOX", &[multipart(1)]).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("handler.sh");
    std::fs::write(&script, "#!/bin/sh\ncat > \"out-$INBOXD_UID.json\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\ndeliver = { exec = [\"./handler.sh\"], stdin = \"json\", raw = true }",
    );
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Once).unwrap();
    w.join().await.unwrap();
    let json = assert_valid(&schema(), &std::fs::read(dir.path().join("out-1.json")).unwrap());
    assert_eq!(json["headers"]["to"][0]["address"], "support@example.com");
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(json["raw"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, multipart(1));
}
