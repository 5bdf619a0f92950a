//! The HTTP endpoint of `inboxd run` against a real Dovecot: `/metrics` checked by Prometheus's
//! own `promtool`, readiness that follows the server going away, the watches as JSON, and the
//! bearer token.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Writes a config with `[http]` (`http` lines) and a Maildir watch, and starts `inboxd run`.
fn start(dv: &inboxd_testbed::Dovecot, dir: &std::path::Path, http: &str) -> (Child, std::path::PathBuf) {
    start_with(dv, dir, http, "start = \"all\"\ndeliver = { maildir = \"out\" }")
}

fn start_with(
    dv: &inboxd_testbed::Dovecot,
    dir: &std::path::Path,
    http: &str,
    watch: &str,
) -> (Child, std::path::PathBuf) {
    let cfg = config(dv, dir, "reconnect = [ { every = \"1s\" } ]", watch);
    let text = format!("{}\n[http]\n{http}\n", std::fs::read_to_string(&cfg.path).unwrap());
    std::fs::write(&cfg.path, text).unwrap();
    let child = inboxd_bin()
        .args(["run", "-c"])
        .arg(&cfg.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, cfg.path)
}

fn stop(child: Child) -> String {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Polls `url` until `pred` holds on (status, body), failing after `secs`.
async fn until(url: &str, token: Option<&str>, secs: u64, pred: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = (0, String::new());
    while Instant::now() < deadline {
        last = get(url, token).await;
        if pred(last.0, &last.1) {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{url}: condition not met within {secs}s; last answer {} {}",
        last.0, last.1
    );
}

fn promtool_check(metrics: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/install-deps installs it)");
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_readiness_follows_the_server() {
    let mut dv = dovecot();
    append(&dv, "INBOX", &["one", "two", "three"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let (daemon, path) = start(
        &dv,
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\nunready_after = \"2s\""),
    );
    let watches = until(&format!("{base}/api/v1/watches"), None, 30, |s, b| {
        // Delivered and connected is not yet caught up: the sync that sets last_sync ends
        // after the last commit, so the test waits for it rather than race it.
        s == 200
            && b.contains("\"delivered\":3")
            && b.contains("\"connected\":true")
            && !b.contains("\"last_sync\":null")
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&watches).unwrap();
    let w = &json["watches"][0];
    assert_eq!(
        (w["account"].as_str(), w["folder"].as_str()),
        (Some("t"), Some("INBOX"))
    );
    assert_eq!(w["ready"], true);
    assert!(
        w["last_delivery"].as_u64().is_some() && w["last_sync"].as_u64().is_some(),
        "{w}"
    );

    let (status, metrics) = get(&format!("{base}/metrics"), None).await;
    assert_eq!(status, 200);
    promtool_check(&metrics);
    for line in [
        "inboxd_messages_delivered_total{account=\"t\",folder=\"INBOX\"} 3",
        "inboxd_watch_connected{account=\"t\",folder=\"INBOX\"} 1",
        "inboxd_backlog_messages{account=\"t\",folder=\"INBOX\"} 0",
        "inboxd_messages_dead_lettered_total{account=\"t\",folder=\"INBOX\"} 0",
        "inboxd_build_info{version=\"",
        "# TYPE inboxd_messages_delivered_total counter",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    // Prometheus asks for OpenMetrics, and gets it.
    let om = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(
        om.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let om = om.text().await.unwrap();
    assert!(
        om.ends_with("# EOF\n") && om.contains("# TYPE inboxd_messages_delivered counter"),
        "{om}"
    );
    assert_eq!(get(&format!("{base}/readyz"), None).await, (200, "ready\n".into()));
    assert_eq!(get(&format!("{base}/healthz"), None).await.0, 200);

    // `status` asks the running daemon: the same state as the endpoint, in a table and as JSON.
    let status = inboxd_bin().args(["status", "-c"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("live state from http://127.0.0.1:{port}/api/v1/watches")),
        "{text}"
    );
    let row = text.lines().find(|l| l.trim_start().starts_with("t/INBOX")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cells[1], cells[3], cells[4]), ("idle", "3", "0"), "{text}");
    assert!(row.ends_with('Z'), "{row}");
    let json = inboxd_bin()
        .args(["status", "--json", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let w = &json["watches"][0];
    assert_eq!(
        (w["last_uid"].as_u64(), w["live"]["state"].as_str()),
        (Some(3), Some("idle")),
        "{json}"
    );
    assert_eq!(w["live"]["delivered"], 3);
    assert_eq!(json["dead_letters"], serde_json::json!([]));

    // Live mail: the latency from the server's IDLE notification to the commit is observed; the
    // backlog at the start was not (no notification announced it).
    append(&dv, "INBOX", &["live"]).await;
    until(&format!("{base}/api/v1/watches"), None, 30, |s, b| {
        s == 200 && b.contains("\"delivered\":4")
    })
    .await;
    let (_, metrics) = get(&format!("{base}/metrics"), None).await;
    promtool_check(&metrics);
    for line in [
        "inboxd_new_mail_latency_seconds_count{account=\"t\",folder=\"INBOX\"} 1",
        "inboxd_handler_duration_seconds_count{account=\"t\",folder=\"INBOX\"} 4",
        "inboxd_handler_duration_seconds_bucket{le=\"+Inf\",account=\"t\",folder=\"INBOX\"} 4",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }

    // The server goes away: the watch is disconnected, then (past unready_after) not ready.
    dv.stop();
    let why = until(&format!("{base}/readyz"), None, 30, |s, _| s == 503).await;
    assert!(why.contains("t/INBOX: disconnected for"), "{why}");
    let (_, metrics) = get(&format!("{base}/metrics"), None).await;
    promtool_check(&metrics);
    assert!(
        metrics.contains("inboxd_watch_connected{account=\"t\",folder=\"INBOX\"} 0")
            && metrics.contains("inboxd_reconnects_total{account=\"t\",folder=\"INBOX\",class=\"network\"}")
            && metrics.contains("inboxd_disconnected_since_timestamp_seconds{account=\"t\",folder=\"INBOX\"}"),
        "{metrics}"
    );
    // And back: ready again once it reconnected.
    dv.restart().unwrap();
    until(&format!("{base}/readyz"), None, 30, |s, _| s == 200).await;
    stop(daemon);
    // Without the daemon, `status` says it cannot tell the live state, and still shows the rest.
    let status = inboxd_bin().args(["status", "-c"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("not answering there (not running?)"),
        "{text}"
    );
    assert!(text.contains("(last commit)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_guards_everything_but_healthz_and_is_required_off_loopback() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let token = "t0k3n-for-the-test";
    let (daemon, path) = start(
        &dv,
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\ntoken = \"{token}\""),
    );
    until(&format!("{base}/healthz"), None, 30, |s, _| s == 200).await;
    for path in ["/metrics", "/readyz", "/api/v1/watches"] {
        let (status, body) = get(&format!("{base}{path}"), None).await;
        assert_eq!(status, 401, "{path}");
        assert!(!body.contains(token));
        assert_eq!(get(&format!("{base}{path}"), Some("wrong")).await.0, 401, "{path}");
        let (status, body) = get(&format!("{base}{path}"), Some(token)).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            !body.contains(token) && !body.contains("alicepw"),
            "{path} leaks a secret"
        );
    }
    // A reload over HTTP: same-origin JSON with the token; its outcome in the answer.
    let reload = || {
        reqwest::Client::new()
            .post(format!("{base}/api/v1/reload"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    let r = reload().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("1 kept, 0 stopped, 0 started"));
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("[[watch]]", "[[watch]]\nbogus = 1")).unwrap();
    let r = reload().await.unwrap();
    assert_eq!(r.status(), 409);
    assert!(
        r.text().await.unwrap().contains("bogus"),
        "the refusal names the problem"
    );
    std::fs::write(&path, good).unwrap();
    assert_eq!(get(&format!("{base}/healthz"), None).await.0, 200, "still running");
    let log = stop(daemon);
    assert!(!log.contains(token), "the log shows the token");

    // Off loopback, a token is required: a located config error.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("listen = \"127.0.0.1:{port}\"\ntoken = \"{token}\""),
        "listen = \"0.0.0.0:9877\"",
    );
    std::fs::write(&path, text).unwrap();
    let out = inboxd_bin().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:", path.display())) && err.contains("http.token"),
        "{err}"
    );
}

/// A Prometheus server of the test's own (Debian's `prometheus`) scraping `targets` every
/// second; returns the child and its API base URL.
fn prometheus(dir: &std::path::Path, target: &str) -> (Child, String) {
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: inboxd\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian's prometheus package; scripts/install-deps installs it)");
    (child, format!("http://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_series_per_watch() {
    let dv = dovecot();
    append(&dv, "INBOX", &["one", "two"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (daemon, _) = start(&dv, dir.path(), &format!("listen = \"127.0.0.1:{port}\""));
    let (mut prom, api) = prometheus(dir.path(), &format!("127.0.0.1:{port}"));
    let query = format!(
        "{api}/api/v1/query?query=inboxd_messages_delivered_total%7Baccount%3D%22t%22%2Cfolder%3D%22INBOX%22%7D"
    );
    let answer = until(&query, None, 60, |s, b| s == 200 && b.contains("\"result\":[{")).await;
    let json: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let series = &json["data"]["result"][0];
    assert_eq!(series["metric"]["job"], "inboxd");
    assert_eq!(series["value"][1], "2", "{answer}");
    // The scrape itself was healthy (Prometheus parsed the OpenMetrics it asked for).
    let up = until(&format!("{api}/api/v1/query?query=up"), None, 30, |s, b| {
        s == 200 && b.contains("\"result\":[{")
    })
    .await;
    assert!(up.contains("\"1\"]"), "{up}");
    let _ = prom.kill();
    let _ = prom.wait();
    stop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_and_replayed_by_a_same_origin_json_request_only() {
    let dv = dovecot();
    append(&dv, "INBOX", &["refused"]).await;
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("accept");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // The program refuses until the flag file exists; one attempt, then a dead letter.
    let (daemon, path) = start_with(
        &dv,
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\nunready_on_dead_letters = true"),
        &format!(
            "start = \"all\"\nmax_attempts = 1\ndeliver = {{ exec = [\"sh\", \"-c\", \"cat >/dev/null; test -e {}\"] }}",
            flag.display()
        ),
    );
    let list = until(&format!("{base}/api/v1/dead-letters"), None, 30, |s, b| {
        s == 200 && b.contains("\"key\"")
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&list).unwrap();
    let key = json["dead_letters"][0]["key"].as_str().unwrap().to_string();
    assert_eq!(json["dead_letters"][0]["uid"], 1);
    let url = format!("{base}/api/v1/dead-letters/{key}/replay");
    let client = reqwest::Client::new();
    let post = |content_type: &'static str, origin: Option<&'static str>| {
        let mut r = client.post(&url).header("content-type", content_type).body("{}");
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    // What a form on another site could send, and a JSON request from another origin: refused.
    assert_eq!(
        post("application/x-www-form-urlencoded", None).await.unwrap().status(),
        403
    );
    assert_eq!(
        post("application/json", Some("http://evil.example"))
            .await
            .unwrap()
            .status(),
        403
    );
    // Not ready while an operator has not seen the dead letter; acknowledged, ready again.
    let why = until(&format!("{base}/readyz"), None, 10, |s, _| s == 503).await;
    assert!(why.contains("t/INBOX: 1 dead letter(s) not acknowledged"), "{why}");
    let r = client
        .post(format!("{base}/api/v1/dead-letters/{key}/ack"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    until(&format!("{base}/readyz"), None, 10, |s, _| s == 200).await;
    let (_, list) = get(&format!("{base}/api/v1/dead-letters"), None).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap()["dead_letters"][0]["acknowledged"],
        true
    );
    let out = inboxd_bin()
        .args(["ack", "-c"])
        .arg(&path)
        .arg("v1-nope-1-1")
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no dead letter"));
    // The handler still refuses: the replay fails, and says why.
    let r = post("application/json", None).await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(
        r.text().await.unwrap().contains("exit"),
        "the handler's failure is reported"
    );
    // Now it accepts: replayed, and no longer a dead letter.
    std::fs::write(&flag, "").unwrap();
    let r = post("application/json", Some("http://127.0.0.1:0")).await.unwrap();
    assert_eq!(r.status(), 403, "a foreign origin, even on loopback");
    let r = post("application/json", None).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["replayed"], key.as_str());
    let (_, list) = get(&format!("{base}/api/v1/dead-letters"), None).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap()["dead_letters"],
        serde_json::json!([])
    );
    assert_eq!(
        post("application/json", None).await.unwrap().status(),
        404,
        "nothing left to replay"
    );
    stop(daemon);
}
