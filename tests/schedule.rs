//! The driver follows the reconnect schedule, checked in tokio's paused (virtual) time: hours of
//! back-off run in milliseconds, and no network server is involved (the port refuses).

use inboxd::config::Config;
use inboxd::watcher::{Event, Mode, Watcher};

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn reconnect_attempts_follow_the_default_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inboxd.toml");
    let text = format!(
        "[accounts.a]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nuser = \"u\"\npassword = \"p\"\n[[watch]]\naccount = \"a\"\ndeliver = {{ maildir = \"m\" }}\n",
        closed_port()
    );
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let store = inboxd::store::open(&config.state).await.unwrap();
    // Paused only now: the store's pool waits on a real thread and would see its timeout fire.
    // Connecting fails before the watcher touches the store.
    tokio::time::pause();
    let w = Watcher::start(config.watches[0].clone(), store, Mode::Forever).unwrap();
    let mut events = w.subscribe();

    // Planned attempt times, as offsets from the first failure.
    let mut planned = Vec::new();
    let mut first = None;
    while planned.len() < 18 {
        if let Ok(Event::Disconnected {
            error: Some(e),
            retry_in: Some(d),
            ..
        }) = events.recv().await
        {
            assert!(e.contains("connect"), "{e}");
            let now = tokio::time::Instant::now();
            let start = *first.get_or_insert(now);
            planned.push((now - start + d).as_secs_f64());
        }
    }
    w.stop().await.unwrap();

    let m = 60.0;
    let expected: Vec<(f64, f64)> = [(0.0, 0.0)]
        .into_iter()
        .chain((1..=10).map(|k| (k as f64 * m, m)))
        .chain((2..=6).map(|k| (k as f64 * 10.0 * m, 10.0 * m)))
        .chain((2..=3).map(|k| (k as f64 * 60.0 * m, 60.0 * m)))
        .collect();
    for (i, (&got, &(want, every))) in planned.iter().zip(&expected).enumerate() {
        // Jitter adds up to 10 % of the stage's interval, never less than the slot.
        assert!(
            got >= want - 0.01 && got < want + 0.1 * every + 0.01,
            "attempt {i}: planned at {got}s, slot {want}s"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_that_never_greets_hits_the_greeting_deadline() {
    // Accepts the connection and then says nothing, like a wedged server or a stuck proxy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let (_sock, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let mut account = inboxd::config::Account::new(
        "a",
        "127.0.0.1",
        port,
        inboxd::config::TlsMode::None,
        "u",
        inboxd::secret::SecretSource::Literal(inboxd::secret::Secret::new("p")),
    );
    account.timeouts.greeting = std::time::Duration::from_secs(15);
    let start = tokio::time::Instant::now();
    let err = inboxd::imap::Session::open(&account).await.unwrap_err();
    assert!(
        matches!(err, inboxd::imap::ImapError::Timeout { phase: "greeting", .. }),
        "{err:?}"
    );
    assert_eq!(
        start.elapsed().as_secs(),
        15,
        "virtual time: exactly the greeting deadline"
    );
    hold.abort();
}
