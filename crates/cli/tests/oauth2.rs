//! OAuth2 end to end: every grant against a real authorization server (oauth2-mock-server
//! behind our policy wrapper) and Dovecot's OAuth2 passdb validating the JWTs it signs.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use inboxd::config::Config;
use inboxd::watcher::{Event, Mode, Watcher};
use serde_json::json;
use support::oauth;
use support::*;

fn write_config(dv: &inboxd_testbed::Dovecot, dir: &Path, account_extra: &str, watch_extra: &str) -> Config {
    let text = format!(
        r#"state = "state.db"
[accounts.t]
host = "127.0.0.1"
port = {port}
tls = "starttls"
ca_file = "{ca}"
user = "alice"
{account_extra}

[[watch]]
account = "t"
deliver = {{ maildir = "out" }}
{watch_extra}
"#,
        port = dv.port,
        ca = dv.ca_file().display(),
    );
    let path = dir.join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// Runs a watcher, appends `subjects` one by one, and returns the subjects delivered.
async fn deliver(dv: &inboxd_testbed::Dovecot, config: &Config, subjects: &[&str]) -> Vec<String> {
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { .. })).await;
    append(dv, "INBOX", subjects).await;
    wait_delivered(&mut ev, subjects.len(), 30).await;
    w.stop().await.unwrap();
    rec.subjects()
}

fn secret_clients() -> serde_json::Value {
    json!({ "clients": { "alice-app": { "secret": "s3cret-alice", "user": "alice" } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_grant_with_xoauth2_and_oauthbearer() {
    let (dv, auth) = oauth::start(secret_clients());
    for mechanism in ["xoauth2", "oauthbearer", "auto"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            &dv,
            dir.path(),
            &format!(
                "auth = \"{mechanism}\"\noauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"alice-app\", client_secret = \"s3cret-alice\", scopes = [\"mail\"] }}",
                auth.token_url()
            ),
            "",
        );
        assert_eq!(deliver(&dv, &config, &[mechanism]).await, vec![mechanism]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_assertion_grant_ps256_and_rs256() {
    let dir = tempfile::tempdir().unwrap();
    let kp = oauth::keypair(dir.path(), "app");
    let (dv, auth) = oauth::start(json!({ "clients": { "cert-app": { "certificate": kp.cert, "user": "alice" } } }));
    for thumbprint in ["sha256", "sha1"] {
        let d = tempfile::tempdir().unwrap();
        let config = write_config(
            &dv,
            d.path(),
            &format!(
                "oauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"cert-app\", certificate = \"{}\", private_key = {{ file = \"{}\" }}, thumbprint = \"{thumbprint}\" }}",
                auth.token_url(),
                kp.cert.display(),
                kp.key.display()
            ),
            "",
        );
        assert_eq!(deliver(&dv, &config, &[thumbprint]).await, vec![thumbprint]);
    }
    // A key that does not belong to the registered certificate is refused by the server.
    let other = oauth::keypair(dir.path(), "other");
    let d = tempfile::tempdir().unwrap();
    let config = write_config(
        &dv,
        d.path(),
        &format!(
            "oauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"cert-app\", certificate = \"{}\", private_key = {{ file = \"{}\" }} }}",
            auth.token_url(),
            kp.cert.display(),
            other.key.display()
        ),
        "",
    );
    let out = inboxd_bin().args(["check", "-c"]).arg(&config.path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("invalid_client") && text.contains("bad signature"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_grant_for_a_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let kp = oauth::keypair(dir.path(), "sa");
    let (dv, auth) = oauth::start(json!({ "service_accounts": { "robot@test.iam": { "public_key": kp.public } } }));
    let key_json = json!({
        "type": "service_account",
        "client_email": "robot@test.iam",
        "private_key": std::fs::read_to_string(&kp.key).unwrap(),
        "token_uri": auth.token_url(),
    });
    let key_file = dir.path().join("sa.json");
    std::fs::write(&key_file, key_json.to_string()).unwrap();
    let config = write_config(
        &dv,
        dir.path(),
        &format!(
            "oauth2 = {{ grant = \"jwt_bearer\", service_account_key = {{ file = \"{}\" }}, scopes = [\"mail\"] }}",
            key_file.display()
        ),
        "",
    );
    assert_eq!(deliver(&dv, &config, &["delegated"]).await, vec!["delegated"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_grant_keeps_the_rotated_token_across_restarts() {
    let (dv, auth) = oauth::start(json!({ "refresh_tokens": { "rt-initial": "alice" } }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dv,
        dir.path(),
        &format!(
            "oauth2 = {{ grant = \"refresh_token\", token_url = \"{}\", client_id = \"desktop\", refresh_token = {{ env = \"TEST_RT\" }} }}",
            auth.token_url()
        ),
        "",
    );
    // SAFETY: set before any thread of this test reads the environment; the name is unique.
    unsafe { std::env::set_var("TEST_RT", "rt-initial") };
    assert_eq!(deliver(&dv, &config, &["first"]).await, vec!["first"]);
    // The server rotated the token: "rt-initial" is dead now. A restart (fresh config, fresh
    // caches, same state file) must use the rotated one from the store.
    let config = Config::load(&config.path).unwrap();
    assert_eq!(deliver(&dv, &config, &["second"]).await, vec!["second"]);
    let stats = auth.stats().await;
    assert!(stats["tokens_issued"].as_u64().unwrap() >= 2, "{stats}");
    let db = std::fs::read(dir.path().join("state.db")).unwrap();
    assert!(
        !String::from_utf8_lossy(&db).contains("rt-initial"),
        "the configured token itself is never stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_grant() {
    let (dv, auth) = oauth::start(secret_clients());
    let dir = tempfile::tempdir().unwrap();
    let token = auth.fetch_token("alice-app", "s3cret-alice").await;
    std::fs::write(dir.path().join("token.txt"), format!("{token}\n600\n")).unwrap();
    let config = write_config(
        &dv,
        dir.path(),
        "oauth2 = { grant = \"command\", command = [\"cat\", \"token.txt\"] }",
        "",
    );
    assert_eq!(deliver(&dv, &config, &["by-command"]).await, vec!["by-command"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_reconnect_ahead_of_expiry_without_loss_or_repeats() {
    let (dv, auth) = oauth::start(json!({ "clients": { "alice-app": { "secret": "s", "user": "alice" } }, "ttl": 5 }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dv,
        dir.path(),
        &format!(
            "oauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"alice-app\", client_secret = \"s\" }}",
            auth.token_url()
        ),
        "",
    );
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { .. })).await;
    // 24 s of traffic with 5 s tokens (refreshed at 80 %: every 4 s).
    let sender = tokio::spawn({
        let account = dv.account("alice");
        async move {
            for i in 0..40 {
                let mut s = inboxd::imap::Session::open(&account).await.unwrap();
                s.append("INBOX", &inboxd_testbed::sample_message(i, &format!("m{i}"), 200))
                    .await
                    .unwrap();
                s.logout().await;
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
        }
    });
    let mut recycles = 0;
    let mut delivered = 0;
    let mut failures = Vec::new();
    tokio::time::timeout(Duration::from_secs(90), async {
        while delivered < 40 {
            match ev.recv().await {
                Ok(Event::Delivered { .. }) => delivered += 1,
                Ok(Event::Disconnected { error: None, .. }) => recycles += 1,
                Ok(Event::Disconnected { error: Some(e), .. }) => failures.push(e),
                _ => {}
            }
        }
    })
    .await
    .expect("all 40 messages delivered");
    sender.await.unwrap();
    w.stop().await.unwrap();
    let want: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    assert_eq!(rec.subjects(), want, "every message once, in order");
    assert!(recycles >= 4, "proactive reconnects before expiry: {recycles}");
    assert!(
        failures.is_empty(),
        "no session may die of an expired token: {failures:?}"
    );
    let issued = auth.stats().await["tokens_issued"].as_u64().unwrap();
    assert!(issued >= 5, "tokens issued: {issued}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_outage_backs_off_and_recovers_without_loss() {
    let (dv, auth) = oauth::start(json!({ "clients": { "alice-app": { "secret": "s", "user": "alice" } } }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dv,
        dir.path(),
        &format!(
            "reconnect = [ {{ every = \"300ms\" }} ]\noauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"alice-app\", client_secret = \"s\" }}",
            auth.token_url()
        ),
        "start = \"all\"",
    );
    auth.control("/test/fail-next?status=503&count=4").await;
    append(&dv, "INBOX", &["during-outage"]).await;
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    let mut outages: Vec<Duration> = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ev.recv().await {
                Ok(Event::Disconnected {
                    error: Some(e),
                    retry_in: Some(d),
                    ..
                }) => {
                    assert!(e.contains("503"), "{e}");
                    // The first failure retries at once (the schedule's first slot); after that
                    // the 300 ms slots, never the immediate re-auth path.
                    assert!(outages.is_empty() || d > Duration::ZERO, "{d:?}");
                    outages.push(d);
                }
                Ok(Event::Delivered { .. }) => break,
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    append(&dv, "INBOX", &["after"]).await;
    wait_delivered(&mut ev, 1, 30).await;
    w.stop().await.unwrap();
    assert_eq!(outages.len(), 4);
    let waited: Duration = outages.iter().sum();
    assert!(
        waited >= Duration::from_millis(600),
        "retries follow the 300 ms schedule, not a tight loop: {outages:?}"
    );
    assert_eq!(rec.subjects(), vec!["during-outage", "after"]);
    // What the metrics report as token refreshes by result.
    let inboxd::config::Auth::OAuth2(source) = &config.watches[0].account.auth else {
        panic!("an OAuth2 account");
    };
    let (ok, failed) = source.refreshes();
    assert_eq!(failed, 4);
    assert!(ok >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_secret_is_clear_parked_and_never_printed() {
    let (dv, auth) = oauth::start(json!({ "clients": { "alice-app": { "secret": "right", "user": "alice" } } }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dv,
        dir.path(),
        &format!(
            "oauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"alice-app\", client_secret = {{ env = \"TEST_WRONG_SECRET\" }} }}",
            auth.token_url()
        ),
        "",
    );
    let run = |args: &[&str]| {
        inboxd_bin()
            .args(["--log", "trace"])
            .args(args)
            .arg("-c")
            .arg(&config.path)
            .env("TEST_WRONG_SECRET", "Wr0ngS3cret")
            .output()
            .unwrap()
    };
    for out in [run(&["check"]), run(&["once"])] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success());
        assert!(all.contains("account t") && all.contains("invalid_client"), "{all}");
        assert!(!all.contains("Wr0ngS3cret"), "secret leaked: {all}");
    }
    // A long-running watcher parks the account instead of looping.
    // SAFETY: only this test uses the variable.
    unsafe { std::env::set_var("TEST_WRONG_SECRET", "Wr0ngS3cret") };
    let before = auth.stats().await["token_requests"].as_u64().unwrap();
    let w = Watcher::start(config.watches[0].clone(), store(&config).await, Mode::Forever).unwrap();
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let Event::Disconnected { retry_in: Some(d), .. } = e else {
        unreachable!()
    };
    assert!(d >= Duration::from_secs(3600), "parked, not retried soon: {d:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        auth.stats().await["token_requests"].as_u64().unwrap() - before,
        1,
        "no tight loop"
    );
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_claims_for_a_working_account_and_hints_for_a_refused_one() {
    let (dv, auth) = oauth::start(
        json!({ "clients": { "alice-app": { "secret": "s", "user": "alice" }, "bob-app": { "secret": "b", "user": "bob" } } }),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dv,
        dir.path(),
        &format!(
            "oauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"alice-app\", client_secret = \"s\" }}",
            auth.token_url()
        ),
        "",
    );
    let out = inboxd_bin().args(["check", "-c"]).arg(&config.path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("sub: \"alice\"")
            && text.contains("iss: ")
            && text.contains("exp: ")
            && text.contains("login ok"),
        "{text}"
    );
    let token = auth.fetch_token("alice-app", "s").await;
    assert!(!text.contains(&token[..40]), "the token itself is never printed");

    // A token for bob presented as alice: the token is fine, the IMAP login is refused.
    let d = tempfile::tempdir().unwrap();
    let config = write_config(
        &dv,
        d.path(),
        &format!(
            "oauth2 = {{ grant = \"client_credentials\", token_url = \"{}\", client_id = \"bob-app\", client_secret = \"b\" }}",
            auth.token_url()
        ),
        "",
    );
    let out = inboxd_bin().args(["check", "-c"]).arg(&config.path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("sub: \"bob\"") && text.contains("as alice refused"),
        "{text}"
    );
    assert!(
        text.contains("server said {") && text.contains("- the server does not accept this token"),
        "{text}"
    );
}

/// A config for the scripted server: plain TCP on loopback, XOAUTH2 with a token command that
/// prints a new token every time.
fn scripted_config(dir: &Path, port: u16) -> Config {
    let text = format!(
        r#"state = "state.db"
[accounts.x]
host = "127.0.0.1"
port = {port}
tls = "none"
user = "support@contoso.test"
oauth2 = {{ grant = "command", command = ["sh", "-c", "echo tok-$(date +%s%N)"] }}
[[watch]]
account = "x"
start = "all"
deliver = {{ maildir = "out" }}
"#
    );
    let path = dir.join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_expired_bye_in_idle_reauthenticates_at_once() {
    let server = support::scripted::Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().bye_in_idle = Some(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port);
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let Event::Disconnected {
        error: Some(err),
        retry_in: Some(d),
        ..
    } = e
    else {
        unreachable!()
    };
    assert!(err.contains("AccessTokenExpired"), "{err}");
    assert_eq!(d, Duration::ZERO, "an expired token means: refresh and reconnect now");
    wait_for(&mut ev, 20, |e| matches!(e, Event::Connected { .. })).await;
    server.add_message("two");
    wait_for(&mut ev, 20, |e| matches!(e, Event::Delivered { uid: 2, .. })).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one", "two"]);
    let tokens = server.state.lock().unwrap().tokens.clone();
    assert!(
        tokens.len() >= 2 && tokens[0] != tokens[1],
        "a fresh token after the BYE: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_expired_bye_in_fetch_loses_and_repeats_nothing() {
    let server = support::scripted::Scripted::start().await;
    server.add_message("one");
    server.add_message("two");
    server.state.lock().unwrap().bye_in_fetch = true;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port);
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    assert!(
        matches!(
            e,
            Event::Disconnected {
                retry_in: Some(Duration::ZERO),
                ..
            }
        ),
        "{e:?}"
    );
    wait_delivered(&mut ev, 2, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["one", "two"]);
    assert_eq!(server.state.lock().unwrap().connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xoauth2_error_challenge_is_answered_reported_and_retried_with_a_new_token() {
    let server = support::scripted::Scripted::start().await;
    server.add_message("one");
    server.state.lock().unwrap().refuse_next_auth = true;
    let dir = tempfile::tempdir().unwrap();
    let config = scripted_config(dir.path(), server.port);
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    let e = wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let Event::Disconnected {
        error: Some(err),
        retry_in: Some(d),
        ..
    } = e
    else {
        unreachable!()
    };
    assert!(
        err.contains("XOAUTH2 as support@contoso.test refused") && err.contains(r#""status":"401""#),
        "{err}"
    );
    assert_eq!(d, Duration::ZERO);
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    let tokens = server.state.lock().unwrap().tokens.clone();
    assert_eq!(tokens.len(), 2);
    assert_ne!(tokens[0], tokens[1], "the refused token is not presented again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_sharing_a_credential_share_one_token_request() {
    let (dv, auth) = oauth::start(json!({ "clients": { "alice-app": { "secret": "s", "user": "alice" } } }));
    for folder in ["Work", "Other"] {
        imap(&dv, &format!("CREATE {folder}")).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"state = "state.db"
[accounts.t]
host = "127.0.0.1"
port = {port}
tls = "starttls"
ca_file = "{ca}"
user = "alice"
oauth2 = {{ grant = "client_credentials", token_url = "{url}", client_id = "alice-app", client_secret = "s" }}
[[watch]]
account = "t"
deliver = {{ maildir = "a" }}
[[watch]]
account = "t"
folder = "Work"
deliver = {{ maildir = "b" }}
[[watch]]
account = "t"
folder = "Other"
deliver = {{ maildir = "c" }}
"#,
        port = dv.port,
        ca = dv.ca_file().display(),
        url = auth.token_url()
    );
    let path = dir.path().join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let st = store(&config).await;
    // Started together: three concurrent logins, one token request.
    let watchers: Vec<Watcher> = config
        .watches
        .iter()
        .map(|w| Watcher::start(w.clone(), st.clone(), Mode::Forever).unwrap())
        .collect();
    for w in &watchers {
        let mut ev = w.subscribe();
        wait_for(&mut ev, 30, |e| matches!(e, Event::CaughtUp { .. })).await;
    }
    assert_eq!(auth.stats().await["tokens_issued"].as_u64(), Some(1));
    for w in watchers {
        w.stop().await.unwrap();
    }
}
