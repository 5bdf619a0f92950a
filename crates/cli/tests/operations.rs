//! Twenty watches on two accounts (two real Dovecots), one server stopped for a while, one
//! handler failing: the metrics, `/readyz`, the status page, `/api/v1/watches` and
//! `inboxd status --json` all say the same thing at the same moment.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

const FOLDERS: [&str; 10] = ["INBOX", "F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9"];

fn account(name: &str, dv: &inboxd_testbed::Dovecot) -> String {
    format!(
        "[accounts.{name}]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\nuser = \"alice\"\npassword = \"alicepw\"\nreconnect = [ {{ every = \"1s\" }} ]\n\n",
        dv.port,
        dv.ca_file().display()
    )
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Per watch, what each view says: (connected, ready).
struct Views {
    api: BTreeMap<String, (bool, bool, String)>,
    metrics: BTreeMap<String, bool>,
    readyz: (u16, String),
    page: BTreeMap<String, String>,
    status: BTreeMap<String, bool>,
}

async fn look(base: &str, config: &std::path::Path) -> Views {
    let (_, api) = get(&format!("{base}/api/v1/watches")).await;
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    let api = api["watches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                format!("{}/{}", w["account"].as_str().unwrap(), w["folder"].as_str().unwrap()),
                (
                    w["connected"].as_bool().unwrap(),
                    w["ready"].as_bool().unwrap(),
                    w["state"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    let (_, text) = get(&format!("{base}/metrics")).await;
    let metrics = text
        .lines()
        .filter_map(|l| l.strip_prefix("inboxd_watch_connected{account=\""))
        .map(|l| {
            let (account, rest) = l.split_once("\",folder=\"").unwrap();
            let (folder, value) = rest.split_once("\"} ").unwrap();
            (format!("{account}/{folder}"), value.trim() == "1")
        })
        .collect();
    let readyz = get(&format!("{base}/readyz")).await;
    let (_, html) = get(&format!("{base}/")).await;
    let page = html
        .split("<tr data-watch=\"")
        .skip(1)
        .map(|row| {
            let (name, rest) = row.split_once('"').unwrap();
            let class = rest.split("class=\"state ").nth(1).unwrap().split('"').next().unwrap();
            // The template escapes `/` in attributes.
            (name.replace("&#x2f;", "/"), class.to_string())
        })
        .collect();
    let out = inboxd_bin()
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = json["watches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                format!("{}/{}", w["account"].as_str().unwrap(), w["folder"].as_str().unwrap()),
                w["live"]["connected"].as_bool().unwrap(),
            )
        })
        .collect();
    Views {
        api,
        metrics,
        readyz,
        page,
        status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_watches_one_server_down_one_handler_failing_every_view_agrees() {
    let dv_a = dovecot();
    let mut dv_b = dovecot();
    for dv in [&dv_a, &dv_b] {
        for f in &FOLDERS[1..] {
            imap(dv, &format!("CREATE {f}")).await;
        }
        for f in FOLDERS {
            append(dv, f, &[&format!("hello {f}")]).await;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut text = format!("state = \"state.db\"\n\n{}{}", account("a", &dv_a), account("b", &dv_b));
    for acc in ["a", "b"] {
        for f in FOLDERS {
            // One handler that always fails: retried, never dead-lettered (many attempts).
            let deliver = if (acc, f) == ("a", "F3") {
                "{ exec = [\"false\"] }\nmax_attempts = 1000\nretry_initial = \"1s\"".to_string()
            } else {
                format!("{{ maildir = \"out-{acc}\" }}")
            };
            text.push_str(&format!(
                "[[watch]]\naccount = \"{acc}\"\nfolder = \"{f}\"\nstart = \"all\"\ndeliver = {deliver}\n\n"
            ));
        }
    }
    text.push_str(&format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\nunready_after = \"2s\"\n"
    ));
    let path = dir.path().join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    let mut daemon = inboxd_bin()
        .args(["run", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Everything up: 19 messages delivered, one watch retrying.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&format!("{base}/api/v1/watches")).await;
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let ws = v["watches"].as_array().unwrap();
            let delivered: u64 = ws.iter().map(|w| w["delivered"].as_u64().unwrap()).sum();
            if ws.len() == 20 && delivered == 19 && ws.iter().all(|w| w["connected"] == true) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the watches did not all come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = look(&base, &path).await;
    assert_eq!(v.readyz.0, 200, "{}", v.readyz.1);
    assert!(v.api.values().all(|(c, r, _)| *c && *r));
    assert!(v.api["a/F3"].2.starts_with("retrying"), "{:?}", v.api["a/F3"]);
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("inboxd_delivery_failures_total{account=\"a\",folder=\"F3\"}"))
        .unwrap();
    assert!(!failures.ends_with(" 0"), "{failures}");

    // Account b's server goes away: its ten watches disconnect, then are not ready.
    dv_b.stop();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&format!("{base}/readyz")).await;
        if status == 503 && body.lines().filter(|l| l.starts_with("b/")).count() == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "readyz did not report account b: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = look(&base, &path).await;
    assert_eq!(v.api.len(), 20);
    for (name, (connected, ready, state)) in &v.api {
        let down = name.starts_with("b/");
        assert_eq!(*connected, !down, "{name} ({state}): api");
        assert_eq!(*ready, !down, "{name} ({state}): api ready");
        assert_eq!(v.metrics[name], *connected, "{name}: metrics");
        assert_eq!(v.status[name], *connected, "{name}: status --json");
        let class = &v.page[name];
        assert_eq!(class == "bad", down, "{name}: page shows {class}");
        assert_eq!(
            v.readyz.1.contains(&format!("{name}: disconnected for")),
            down,
            "{name}: readyz"
        );
    }
    assert!(v.readyz.1.lines().all(|l| l.starts_with("b/")), "{}", v.readyz.1);

    // Back: every view says ready again.
    dv_b.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&format!("{base}/readyz")).await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready again after the server came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = look(&base, &path).await;
    assert!(v.metrics.values().all(|c| *c) && v.status.values().all(|c| *c));
    assert!(v.page.values().all(|class| class != "bad"), "{:?}", v.page);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}
