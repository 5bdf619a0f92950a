//! The status page in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver) against `inboxd run` and a real Dovecot. The page loads, shows the watch idle,
//! replays a dead letter with its button, and shows the watch failing when its server stops.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use support::*;

/// chromedriver on a free port, and a headless Chromium session through it.
async fn browser(profile: &std::path::Path) -> (Child, Client) {
    let port = free_port();
    let driver = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; scripts/install-deps installs it)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1000,700",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = ClientBuilder::rustls()
        .unwrap()
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// Reloads the page until the element's text satisfies `pred`.
async fn until_text(c: &Client, css: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            last = e.text().await.unwrap_or_default();
            if pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = c.refresh().await;
    }
    panic!("{css}: not as expected within {secs}s; last {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_watches_replays_a_dead_letter_and_follows_a_failing_server() {
    let mut dv = dovecot();
    append(&dv, "INBOX", &["refused at first"]).await;
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("accept");
    let port = free_port();
    let cfg = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"1s\" } ]",
        &format!(
            "start = \"all\"\nmax_attempts = 1\ndeliver = {{ exec = [\"sh\", \"-c\", \"cat >/dev/null; test -e {}\"] }}",
            flag.display()
        ),
    );
    let text = format!(
        "{}\n[http]\nlisten = \"127.0.0.1:{port}\"\nunready_after = \"2s\"\n",
        std::fs::read_to_string(&cfg.path).unwrap()
    );
    std::fs::write(&cfg.path, text).unwrap();
    let mut daemon = inboxd_bin()
        .args(["run", "-c"])
        .arg(&cfg.path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut driver, c) = browser(&dir.path().join("chromium")).await;
    let base = format!("http://127.0.0.1:{port}/");
    // The endpoint may take a moment to come up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.goto(&base).await.is_err() || c.find(Locator::Css("#watches")).await.is_err() {
        assert!(Instant::now() < deadline, "the page did not load");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.title().await.unwrap().starts_with("inboxd: 1 watch"));
    let state = "tr[data-watch='t/INBOX'] td.state";
    until_text(&c, state, 30, |t| t == "idle").await;
    assert_eq!(until_text(&c, "#dead-count", 30, |t| t == "1").await, "1");
    let shot = c.screenshot().await.unwrap();
    std::fs::write(dir.path().join("page.png"), &shot).unwrap();
    if let Some(out) = std::env::var_os("INBOXD_PAGE_SCREENSHOT") {
        std::fs::write(out, &shot).unwrap();
    }

    // The handler accepts now: the button replays the dead letter, and the page shows none.
    std::fs::write(&flag, "").unwrap();
    c.find(Locator::Css("button[data-action='replay']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&c, "#dead-count", 30, |t| t == "0").await;

    // The server stops: the watch is shown reconnecting, then failing readiness (red).
    dv.stop();
    until_text(&c, state, 30, |t| t.starts_with("waiting")).await;
    let class_of = |css: &'static str| {
        let c = &c;
        async move {
            c.find(Locator::Css(css))
                .await
                .unwrap()
                .attr("class")
                .await
                .unwrap()
                .unwrap_or_default()
        }
    };
    let class = class_of(state).await;
    assert!(class.contains("warn") || class.contains("bad"), "{class}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.refresh().await.unwrap();
        let class = class_of(state).await;
        if class.contains("bad") {
            break;
        }
        assert!(Instant::now() < deadline, "the watch never showed as failing: {class}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = c.close().await;
    let _ = driver.kill();
    let _ = driver.wait();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
}
