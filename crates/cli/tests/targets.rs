//! The deduplicating targets under the harshest fault for a delivery guarantee: the real
//! binary (`inboxd run`) SIGKILLed three times while a burst of mail arrives. Every message
//! must reach NATS, Redis and a webhook receiver: nothing lost, and the repeats a kill causes
//! (the batch in flight is handed over again with the same key) dropped by NATS (Msg-Id), the
//! Redis script (the key) and the receiver (webhook-id). AMQP and MQTT cannot drop a repeat:
//! there, each kill may repeat at most the message in flight (`batch_size = 1`).

#[path = "../../../tests/support/mqtt_sub.rs"]
mod mqtt_sub;
#[path = "../../../tests/support/mod.rs"]
mod support;
#[path = "../../../tests/support/tls.rs"]
mod tls;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use inboxd_testbed::{Mosquitto, Nats, Redis};
use support::*;

/// A webhook receiver that records every request's webhook-id and answers 204.
async fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let sink = ids.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let sink = sink.clone();
            async move {
                let id = headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                sink.lock().unwrap().push(id);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, ids)
}

fn start(config: &std::path::Path, log: &std::path::Path) -> Child {
    let err = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    inboxd_bin()
        .args(["--log", "inboxd=debug", "run", "-c"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap()
}

/// How often the daemon is killed during a burst.
const KILLS: usize = 3;

/// Starts `inboxd run`, appends `n` messages to each folder (10 ms apart) while SIGKILLing and
/// restarting the daemon [`KILLS`] times at random moments (seeded), and returns the daemon
/// running after the last restart, once the burst is sent.
async fn burst_through_kills(
    dv: &inboxd_testbed::Dovecot,
    config: &std::path::Path,
    log: &std::path::Path,
    folders: &'static [&'static str],
    n: usize,
    seed: u64,
) -> Child {
    let mut daemon = start(config, log);
    let account = dv.account("alice");
    let sender = tokio::spawn(async move {
        let mut s = inboxd::imap::Session::open(&account).await.unwrap();
        for i in 0..n {
            let m = inboxd_testbed::sample_message(i, &format!("burst {i}"), 1500);
            for folder in folders {
                s.append(folder, &m).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        s.logout().await;
    });
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.u64(200..900))).await;
        let _ = daemon.kill();
        let _ = daemon.wait();
        daemon = start(config, log);
    }
    sender.await.unwrap();
    daemon
}

async fn nats_ids(nats: &Nats) -> Vec<String> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream("MAIL").await.unwrap();
    let count = stream.info().await.unwrap().state.messages;
    let mut ids = Vec::new();
    for seq in 1..=count {
        if let Ok(m) = stream.get_raw_message(seq).await {
            ids.push(m.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default());
        }
    }
    ids
}

async fn redis_keys(redis: &Redis) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("inboxd:t:Work")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    reply.ids.iter().map(|e| e.get::<String>("key").unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sigkills_during_a_burst_lose_nothing_and_repeat_nothing_in_nats_redis_and_a_webhook() {
    let dv = dovecot();
    let nats = Nats::start().unwrap();
    let redis = Redis::start().unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "MAIL".into(),
        subjects: vec!["mail.>".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
    s.run("CREATE Work").await.unwrap();
    s.run("CREATE Hooks").await.unwrap();
    let (hook, requests) = receiver().await;
    s.logout().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg_text = std::fs::read_to_string(
        config(
            &dv,
            dir.path(),
            "",
            &format!(
                "start = \"all\"\nbatch_size = 20\ndeliver = {{ nats = \"{}\", subject = \"mail.{{account}}\" }}",
                nats.url()
            ),
        )
        .path,
    )
    .unwrap();
    cfg_text.push_str(&format!(
        "\n[[watch]]\naccount = \"t\"\nfolder = \"Work\"\nstart = \"all\"\nbatch_size = 20\ndeliver = {{ redis = \"{}\" }}\n",
        redis.url()
    ));
    cfg_text.push_str(&format!(
        "\n[[watch]]\naccount = \"t\"\nfolder = \"Hooks\"\nstart = \"all\"\nbatch_size = 20\ndeliver = {{ webhook = \"{hook}\" }}\n"
    ));
    let config = dir.path().join("inboxd.toml");
    std::fs::write(&config, cfg_text).unwrap();
    let log = dir.path().join("inboxd.log");
    // A burst into every folder while the daemon is killed three times and restarted.
    let n = 150;
    let mut daemon = burst_through_kills(&dv, &config, &log, &["INBOX", "Work", "Hooks"], n, 20261130).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let distinct = |ids: &[String]| {
        let mut v = ids.to_vec();
        v.sort();
        v.dedup();
        v.len()
    };
    let (mut in_nats, mut in_redis) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        in_nats = nats_ids(&nats).await;
        in_redis = redis_keys(&redis).await;
        let hooked = distinct(&requests.lock().unwrap());
        if in_nats.len() >= n && in_redis.len() >= n && hooked >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stop cleanly, then look once more: nothing arrives late, twice.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    // The receiver may have been sent a message again (a kill between its 204 and the
    // commit); deduplicating by webhook-id, it processed each exactly once.
    let hooked = requests.lock().unwrap().clone();
    assert_eq!(distinct(&hooked), n, "webhook: distinct webhook-ids after three kills");
    assert!(
        hooked.iter().all(|id| id.starts_with("v1-")),
        "every request carries the key"
    );
    let in_nats_final = nats_ids(&nats).await;
    let in_redis_final = redis_keys(&redis).await;
    assert_eq!(in_nats_final.len(), in_nats.len());
    assert_eq!(in_redis_final.len(), in_redis.len());
    for (target, mut keys) in [("nats", in_nats_final), ("redis", in_redis_final)] {
        let total = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!((total, keys.len()), (n, n), "{target}: stored/unique after three kills");
    }
}

/// A channel on the machine's RabbitMQ.
async fn amqp() -> (amqprs::connection::Connection, amqprs::channel::Channel) {
    use amqprs::connection::{Connection, OpenConnectionArguments};
    let c = Connection::open(&OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest"))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (.ci/run starts it)");
    let ch = c.open_channel(None).await.unwrap();
    (c, ch)
}

/// How many messages an AMQP queue holds.
async fn amqp_count(queue: &str) -> usize {
    use amqprs::channel::QueueDeclareArguments;
    let (c, ch) = amqp().await;
    let declared = ch
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .unwrap();
    let _ = c.close().await;
    declared.map_or(0, |(_, messages, _)| messages as usize)
}

/// Every message in an AMQP queue, in order: message_id of each.
async fn amqp_ids(queue: &str) -> Vec<String> {
    use amqprs::channel::BasicGetArguments;
    let (c, ch) = amqp().await;
    let mut out = Vec::new();
    while let Some((_, props, _)) = ch
        .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
        .await
        .unwrap()
    {
        out.push(props.message_id().cloned().unwrap_or_default());
    }
    let _ = ch.queue_delete(amqprs::channel::QueueDeleteArguments::new(queue)).await;
    let _ = c.close().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sigkills_during_a_burst_lose_nothing_in_amqp_and_mqtt_and_repeat_at_most_the_message_in_flight() {
    let dv = dovecot();
    let broker = Mosquitto::start().unwrap();
    let got = mqtt_sub::subscriber(&broker, "mail/#").await;
    let queue = format!("inboxd-kill-{}-{}", std::process::id(), fastrand::u32(..));
    {
        use amqprs::channel::QueueDeclareArguments;
        let (c, ch) = amqp().await;
        ch.queue_declare(QueueDeclareArguments::durable_client_named(&queue))
            .await
            .unwrap();
        let _ = c.close().await;
    }
    let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
    s.run("CREATE Work").await.unwrap();
    s.logout().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg_text = std::fs::read_to_string(
        config(
            &dv,
            dir.path(),
            "",
            &format!(
                "start = \"all\"\nbatch_size = 1\ndeliver = {{ amqp = \"amqp://127.0.0.1:5672\", routing_key = \"{queue}\", password = \"guest\" }}"
            ),
        )
        .path,
    )
    .unwrap();
    cfg_text.push_str(&format!(
        "\n[[watch]]\naccount = \"t\"\nfolder = \"Work\"\nstart = \"all\"\nbatch_size = 1\ndeliver = {{ mqtt = \"{}\", topic = \"mail/{{folder}}\" }}\n",
        broker.url()
    ));
    let config = dir.path().join("inboxd.toml");
    std::fs::write(&config, cfg_text).unwrap();
    let log = dir.path().join("inboxd.log");
    let n = 150;
    let kills = KILLS;
    let mut daemon = burst_through_kills(&dv, &config, &log, &["INBOX", "Work"], n, 20261201).await;
    let distinct = |ids: &[String]| {
        let mut v = ids.to_vec();
        v.sort();
        v.dedup();
        v.len()
    };
    let mqtt_keys = || got.lock().unwrap().iter().map(|g| g.1.clone()).collect::<Vec<_>>();
    // The queue can only be counted without consuming it, repeats included: at least n, and no
    // longer growing (a repeat may have made it n while the last message was still coming).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, Instant::now());
    while Instant::now() < deadline {
        let count = amqp_count(&queue).await;
        if count != last.0 {
            last = (count, Instant::now());
        }
        if distinct(&mqtt_keys()) >= n && count >= n && last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    for (target, keys) in [("amqp", amqp_ids(&queue).await), ("mqtt", mqtt_keys())] {
        let repeats = keys.len() - distinct(&keys);
        assert_eq!(distinct(&keys), n, "{target}: lost messages after {kills} kills");
        assert!(
            repeats <= kills,
            "{target}: {repeats} repeats after {kills} kills: more than the message in flight at each"
        );
        eprintln!("{target}: {n} delivered, {repeats} repeated after {kills} kills");
    }
}
