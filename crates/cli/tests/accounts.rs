//! Accounts managed at run time: stored in a PostgreSQL database of the test's own (sealed with
//! the `accounts_key`), added, replaced and removed with `inboxd account` and the HTTP API while
//! an `inboxd run` is watching a real Dovecot; the running instance picks each change up
//! within seconds, and the password is never in the database, the listing or the logs.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use inboxd_testbed::{Dovecot, PgDatabase};
use support::{free_port, inboxd_bin};

/// The Dovecot test user's password: it must show up nowhere but in Dovecot's own files.
const PASSWORD: &str = "alicepw";

fn inboxd(args: &[&str], config: &Path, stdin: Option<&str>) -> Output {
    let mut cmd = inboxd_bin();
    cmd.args(args).arg("-c").arg(config);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        std::io::Write::write_all(&mut input, text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An account's config text: `acct` watching `folders` of alice into `out`.
fn account(dv: &Dovecot, name: &str, folders: &[&str], out: &str) -> String {
    let mut t = format!(
        "# stored with inboxd account add\n[accounts.{name}]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\nuser = \"alice\"\npassword = \"{PASSWORD}\"\n",
        dv.port,
        dv.ca_file().display()
    );
    for f in folders {
        t.push_str(&format!(
            "\n[[watch]]\naccount = \"{name}\"\nfolder = \"{f}\"\nstart = \"all\"\ndeliver = {{ maildir = \"{out}\" }}\n"
        ));
    }
    t
}

struct Setup {
    dir: tempfile::TempDir,
    db: PgDatabase,
    config: PathBuf,
}

/// A config with PostgreSQL state, a fresh accounts key and no account of its own.
fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = PgDatabase::create().unwrap();
    let config = dir.path().join("inboxd.toml");
    let key = inboxd_bin().arg("account").arg("keygen").output().unwrap();
    assert!(key.status.success());
    std::fs::write(dir.path().join("accounts.key"), &key.stdout).unwrap();
    std::fs::write(
        &config,
        format!(
            "state = \"{}\"\nlease_ttl = \"3s\"\naccounts_key = {{ file = \"accounts.key\" }}\n{extra}",
            db.url()
        ),
    )
    .unwrap();
    Setup { dir, db, config }
}

fn delivered(dir: &Path, out: &str) -> usize {
    std::fs::read_dir(dir.join(out).join("new")).map_or(0, |d| d.count())
}

/// The log of the test's `inboxd run`, shown when a wait fails.
static RUN_LOG: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > Duration::from_secs(secs) {
            let log = RUN_LOG
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            panic!("not within {secs} s: {what}\ninboxd run's log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

fn leased(db: &PgDatabase) -> Vec<String> {
    db.sql("SELECT account || '/' || folder FROM leases WHERE owner IS NOT NULL AND expires_at > now() ORDER BY 1")
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The `inboxd run` under test, killed if the test fails before stopping it.
struct Run(Option<Child>);

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stop(mut run: Run, log: &Path) -> String {
    let mut child = run.0.take().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "inboxd run ended with {status}");
    std::fs::read_to_string(log).unwrap()
}

async fn http(method: &str, url: &str, body: Option<serde_json::Value>) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(b) = body {
        req = req.json(&b);
    } else if method != "GET" {
        req = req.header("content-type", "application/json");
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_added_replaced_and_removed_at_run_time_are_picked_up_within_seconds() {
    let dv = Dovecot::start().expect("dovecot");
    let port = free_port();
    let s = setup(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    for f in ["A1", "A2"] {
        dv.drop_messages("alice", f, &[inboxd_testbed::sample_message(0, f, 100)])
            .unwrap();
    }
    // No watch yet: the instance waits for stored accounts.
    let log_path = s.dir.path().join("run.log");
    *RUN_LOG.lock().unwrap() = Some(log_path.clone());
    let child = Run(Some(
        inboxd_bin()
            .args(["run", "-c"])
            .arg(&s.config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    ));
    let api = format!("http://127.0.0.1:{port}/api/v1/accounts");
    wait_for("the HTTP endpoint", 20, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    // Added from the command line (standard input): started within seconds.
    let text1 = account(&dv, "sales", &["A1"], "out");
    let t = Instant::now();
    let o = inboxd(&["account", "add", "-"], &s.config, Some(&text1));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("account sales stored"), "{}", text(&o));
    wait_for("A1's message delivered", 30, || delivered(s.dir.path(), "out") == 1);
    println!(
        "pickup: account add -> first delivery in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // Sealed in the database: host, user and folders in clear for listing, the password not.
    let row =
        s.db.sql("SELECT host, user_name, array_to_string(folders, ','), encode(sealed, 'hex') FROM accounts")
            .unwrap();
    let hex: String = PASSWORD.bytes().map(|b| format!("{b:02x}")).collect();
    assert!(row.starts_with("127.0.0.1|alice|A1|"), "{row}");
    assert!(
        !row.contains(&hex) && !row.contains(PASSWORD),
        "password in clear in the row"
    );
    assert!(
        s.db.sql("SELECT count(*) FROM accounts WHERE position(convert_to('alicepw', 'UTF8') in sealed) > 0")
            .unwrap()
            .trim()
            == "0"
    );

    // Adding it again without --replace is refused and changes nothing.
    let o = inboxd(&["account", "add", "-"], &s.config, Some(&text1));
    assert!(!o.status.success());
    assert!(text(&o).contains("already stored"), "{}", text(&o));

    // Listed, by the CLI and the API, without the password.
    let o = inboxd(&["account", "list"], &s.config, None);
    assert!(o.status.success(), "{}", text(&o));
    let listing = text(&o);
    assert!(
        listing.contains("sales") && listing.contains("database") && listing.contains("A1"),
        "{listing}"
    );
    let (status, body) = http("GET", &api, None).await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["name"], "sales");
    assert_eq!(list[0]["folders"][0], "A1");
    assert!(!listing.contains(PASSWORD) && !body.contains(PASSWORD));

    // Replaced over the API: A1 is given back, A2 taken and its message delivered.
    let text2 = account(&dv, "sales", &["A2"], "out");
    let (status, body) = http(
        "POST",
        &api,
        Some(serde_json::json!({ "config": text2, "replace": false })),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    // A change from another site's page (a form post, no JSON) is refused.
    let r = reqwest::Client::new()
        .post(&api)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("config=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let t = Instant::now();
    let (status, body) = http(
        "POST",
        &api,
        Some(serde_json::json!({ "config": text2, "replace": true })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    wait_for("A2's message delivered", 30, || delivered(s.dir.path(), "out") == 2);
    wait_for("A1 given back", 30, || leased(&s.db) == ["sales/A2"]);
    println!(
        "pickup: replace -> first delivery in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // Invalid text is refused naming where, and nothing changes.
    let (status, body) = http(
        "POST",
        &api,
        Some(serde_json::json!({ "config": text2.replace("starttls", "sometimes"), "replace": true })),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("postgres:accounts/sales:5:"), "{body}");

    // Removed over the API: its watch stops and its lease is given back.
    let (status, body) = http("DELETE", &format!("{api}/sales"), None).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the watch stopped", 30, || leased(&s.db).is_empty());
    let (status, _) = http("DELETE", &format!("{api}/sales"), None).await;
    assert_eq!(status, 404);

    // Added again from the CLI and removed from the CLI.
    let o = inboxd(&["account", "add", "-"], &s.config, Some(&text1));
    assert!(o.status.success(), "{}", text(&o));
    wait_for("A1 taken again", 30, || leased(&s.db) == ["sales/A1"]);
    let o = inboxd(&["account", "remove", "sales"], &s.config, None);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("the watch stopped", 30, || leased(&s.db).is_empty());

    let log = stop(child, &log_path);
    assert!(!log.contains(PASSWORD), "password in the log");
    assert!(log.contains("accounts stored in the database changed"), "{log}");
    // Each message once: replacing and re-adding delivered nothing twice.
    assert_eq!(delivered(s.dir.path(), "out"), 2);
}

#[test]
fn stored_accounts_are_refused_or_left_out_with_a_clear_reason() {
    let dv = Dovecot::start().expect("dovecot");
    let s = setup("");
    let acct = account(&dv, "ops", &["B1"], "out");

    // Not TOML, two accounts, a top-level key of the instance, a bad value: each refused.
    let o = inboxd(&["account", "add", "-"], &s.config, Some("[accounts.ops\n"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not TOML"), "{}", text(&o));
    let two = format!("{acct}\n{}", account(&dv, "ops2", &[], "out"));
    let o = inboxd(&["account", "add", "-"], &s.config, Some(&two));
    assert!(text(&o).contains("exactly one [accounts.NAME]"), "{}", text(&o));
    let o = inboxd(
        &["account", "add", "-"],
        &s.config,
        Some(&format!("lease_ttl = \"1s\"\n{acct}")),
    );
    assert!(
        text(&o).contains("postgres:accounts/ops:1:")
            && text(&o).contains("lease_ttl: an account stored in the database holds only"),
        "{}",
        text(&o)
    );
    let o = inboxd(
        &["account", "add", "-"],
        &s.config,
        Some(&acct.replace("starttls", "sometimes")),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("postgres:accounts/ops:5:"), "{}", text(&o));
    assert!(s.db.sql("SELECT count(*) FROM accounts").unwrap().trim() == "0");

    // A name the config file already has is refused.
    let file_account = account(&dv, "ops", &[], "out").replace("# stored with inboxd account add\n", "");
    let with_file = s.dir.path().join("with-file.toml");
    std::fs::write(
        &with_file,
        format!("{}{file_account}", std::fs::read_to_string(&s.config).unwrap()),
    )
    .unwrap();
    let o = inboxd(&["account", "add", "-"], &with_file, Some(&acct));
    assert!(text(&o).contains("account ops is also in"), "{}", text(&o));

    // Stored under one key, read under another: listed as not running, left out by `once`
    // with the reason, the others unaffected.
    let o = inboxd(&["account", "add", "-"], &s.config, Some(&acct));
    assert!(o.status.success(), "{}", text(&o));
    let other = inboxd_bin().arg("account").arg("keygen").output().unwrap();
    std::fs::write(s.dir.path().join("accounts.key"), &other.stdout).unwrap();
    let o = inboxd(&["account", "list"], &s.config, None);
    assert!(
        text(&o).contains("NOT RUNNING") && text(&o).contains("sealed with another accounts_key"),
        "{}",
        text(&o)
    );
    let o = inboxd(&["status"], &s.config, None);
    assert!(text(&o).contains("stored account left out"), "{}", text(&o));

    // Without a key: the reason.
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("accounts_key = { file = \"accounts.key\" }\n", ""),
    )
    .unwrap();
    let o = inboxd(&["account", "add", "-"], &s.config, Some(&acct));
    assert!(text(&o).contains("no accounts_key"), "{}", text(&o));

    // With a state file there is no database to store accounts in.
    let file_state = s.dir.path().join("file-state.toml");
    std::fs::write(&file_state, "state = \"state.db\"\n").unwrap();
    let o = inboxd(&["account", "add", "-"], &file_state, Some(&acct));
    assert!(text(&o).contains("only with PostgreSQL state"), "{}", text(&o));
    let o = inboxd(&["account", "list"], &file_state, None);
    assert!(text(&o).contains("only with PostgreSQL state"), "{}", text(&o));
}

/// Two running instances on one database: an account stored while both run has its watches
/// shared out between them within seconds, each message delivered once; removed, its watches
/// stop on both and their leases go back.
#[test]
fn an_account_stored_at_run_time_is_shared_by_two_instances() {
    let dv = Dovecot::start().expect("dovecot");
    let s = setup("");
    let folders = ["B1", "B2", "B3", "B4"];
    for f in folders {
        dv.drop_messages("alice", f, &[inboxd_testbed::sample_message(0, f, 100)])
            .unwrap();
    }
    let logs: Vec<PathBuf> = (0..2).map(|i| s.dir.path().join(format!("run{i}.log"))).collect();
    *RUN_LOG.lock().unwrap() = Some(logs[0].clone());
    let runs: Vec<Run> = logs
        .iter()
        .map(|log| {
            Run(Some(
                inboxd_bin()
                    .args(["run", "-c"])
                    .arg(&s.config)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(log).unwrap())
                    .spawn()
                    .unwrap(),
            ))
        })
        .collect();
    // Both instances are up (each announced itself) before the account comes.
    wait_for("two instances announced", 30, || {
        s.db.sql("SELECT count(*) FROM instances").unwrap_or_default().trim() == "2"
    });
    let t = Instant::now();
    let o = inboxd(
        &["account", "add", "-"],
        &s.config,
        Some(&account(&dv, "shared", &folders, "out")),
    );
    assert!(o.status.success(), "{}", text(&o));
    wait_for("the four messages delivered", 30, || {
        delivered(s.dir.path(), "out") == 4
    });
    println!(
        "two instances: account add -> all four folders delivered in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // Shared out: two watches each, under leases of two owners.
    wait_for("the watches shared by both instances", 30, || {
        s.db.sql("SELECT count(DISTINCT owner) FROM leases WHERE owner IS NOT NULL AND expires_at > now()")
            .unwrap_or_default()
            .trim()
            == "2"
    });
    assert_eq!(leased(&s.db).len(), 4, "{:?}", leased(&s.db));
    let o = inboxd(&["account", "remove", "shared"], &s.config, None);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("every lease given back", 30, || leased(&s.db).is_empty());
    let mut texts = Vec::new();
    for (run, log) in runs.into_iter().zip(&logs) {
        texts.push(stop(run, log));
    }
    for (i, t) in texts.iter().enumerate() {
        assert!(t.contains("lease taken"), "instance {i} watched nothing:\n{t}");
        assert!(!t.contains(PASSWORD), "the password in instance {i}'s log");
    }
    assert_eq!(delivered(s.dir.path(), "out"), 4);
}
