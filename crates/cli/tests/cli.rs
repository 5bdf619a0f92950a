//! The `inboxd` command line: errors an operator sees, secrets they must never see.

#[path = "../../../tests/support/mod.rs"]
mod support;

use inboxd::store::DeliveryStatus;
use inboxd::watcher::{Event, Mode, Watcher};
use support::*;

#[test]
fn bad_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inboxd.toml");
    std::fs::write(
        &path,
        "[accounts.a]\nhost = \"127.0.0.1\"\nuser = \"u\"\npassword = \"p\"\nprot = 143\n",
    )
    .unwrap();
    let out = inboxd_bin().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:5:", path.display())) && err.contains("prot"),
        "{err}"
    );

    std::fs::write(
        &path,
        "[[watch]]\naccount = \"nobody\"\ndeliver = { maildir = \"m\" }\n",
    )
    .unwrap();
    let out = inboxd_bin().args(["run", "-c"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":2:") && err.contains("nobody"), "{err}");
}

#[test]
fn config_path_may_come_from_the_environment() {
    let out = inboxd_bin()
        .arg("status")
        .env("INBOXD_CONFIG", "/nonexistent/inboxd.toml")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/inboxd.toml"),
        "{err}"
    );
}

#[test]
fn wrong_password_is_a_clear_error_without_the_password() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let wrong = "Wr0ng-\"pass\\word";
    let cfg = config(&dv, dir.path(), "", "deliver = { maildir = \"out\" }");
    let text = std::fs::read_to_string(&cfg.path)
        .unwrap()
        .replace("password = \"alicepw\"", "password = { env = \"TEST_PW\" }");
    std::fs::write(&cfg.path, text).unwrap();

    let check = inboxd_bin()
        .args(["--log", "trace", "check", "-c"])
        .arg(&cfg.path)
        .env("TEST_PW", wrong)
        .output()
        .unwrap();
    let once = inboxd_bin()
        .args(["--log", "trace", "--log-format", "json", "once", "-c"])
        .arg(&cfg.path)
        .env("TEST_PW", wrong)
        .output()
        .unwrap();
    for out in [&check, &once] {
        assert!(!out.status.success());
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(all.contains("login as alice refused"), "{all}");
        assert!(!all.contains("Wr0ng"), "the password leaked: {all}");
    }

    // The right password works, and `check` prints capabilities and the folder.
    let ok = inboxd_bin()
        .args(["check", "-c"])
        .arg(&cfg.path)
        .env("TEST_PW", "alicepw")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(
        text.contains("capabilities:") && text.contains("IDLE") && text.contains("folder \"INBOX\": uidvalidity"),
        "{text}"
    );
}

#[test]
fn missing_folder_fails_check_and_once() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &dv,
        dir.path(),
        "",
        "folder = \"Nope\"\ndeliver = { maildir = \"out\" }",
    );
    let out = inboxd_bin().args(["check", "-c"]).arg(&cfg.path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot select folder \"Nope\""));
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(append(&dv, "INBOX", &["a", "b"]));
    let mut child = inboxd_bin()
        .args(["run", "-c"])
        .arg(&cfg.path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(dir.path().join("out/new")).map_or(0, |d| d.count()) < 2 {
        assert!(std::time::Instant::now() < deadline, "messages not delivered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let st = rt.block_on(inboxd::store::open(&cfg.state)).unwrap();
    let cp = rt.block_on(st.checkpoint("t", "INBOX")).unwrap().unwrap();
    assert_eq!(cp.last_uid, 2);
}

#[test]
fn a_second_process_on_the_same_state_is_refused_and_sighup_does_not_kill() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(append(&dv, "INBOX", &["a"]));
    let count = || std::fs::read_dir(dir.path().join("out/new")).map_or(0, |d| d.count());
    let wait_count = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while count() < n {
            assert!(std::time::Instant::now() < deadline, "messages not delivered");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let mut first = inboxd_bin()
        .args(["run", "-c"])
        .arg(&cfg.path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_count(1);
    for command in ["run", "once"] {
        let out = inboxd_bin().args([command, "-c"]).arg(&cfg.path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "second {command} was allowed: {err}");
        assert!(
            err.contains("in use by another inboxd") && err.contains(&format!("pid {}", first.id())),
            "{err}"
        );
    }
    // SIGHUP: logged, not fatal; the daemon goes on delivering.
    unsafe { libc::kill(first.id() as i32, libc::SIGHUP) };
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(first.try_wait().unwrap().is_none(), "SIGHUP killed inboxd");
    rt.block_on(append(&dv, "INBOX", &["b"]));
    wait_count(2);
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert!(first.wait().unwrap().success());
    // The lock went with the process: a new one may start.
    let out = inboxd_bin().args(["once", "-c"]).arg(&cfg.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inboxd.toml");
    let mut text = String::from("state = \"s.db\"\n");
    for i in 0..200 {
        text.push_str(&format!(
            "[accounts.a{i}]\nhost = \"127.0.0.1\"\ntls = \"none\"\nuser = \"u\"\npassword = \"p\"\n[[watch]]\naccount = \"a{i}\"\ndeliver = {{ maildir = \"m{i}\" }}\n"
        ));
    }
    std::fs::write(&path, text).unwrap();
    // `inboxd status | head -0`: the reader is gone before the first line is written.
    let mut child = inboxd_bin()
        .args(["status", "-c"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("Broken pipe"), "{err}");
    assert!(out.status.success(), "{err}");
}

#[test]
fn handlers_never_see_inboxd_secrets_and_die_with_inboxd() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("h.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat >/dev/null\nenv > \"env.$INBOXD_UID\"\necho $$ > \"pid.$INBOXD_UID\"\n[ \"$INBOXD_UID\" = 2 ] && sleep 60\nexit 0\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\ndeliver = { exec = [\"./h.sh\"], pass_env = [\"WANTED_BY_HANDLER\"] }",
    );
    let text = std::fs::read_to_string(&cfg.path)
        .unwrap()
        .replace("password = \"alicepw\"", "password = { env = \"SEC_PW\" }");
    std::fs::write(&cfg.path, text).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(append(&dv, "INBOX", &["a", "b"]));
    let mut child = inboxd_bin()
        .args(["run", "-c"])
        .arg(&cfg.path)
        .env("SEC_PW", "alicepw")
        .env("WANTED_BY_HANDLER", "yes")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let pid_file = dir.path().join("pid.2");
    while std::fs::read_to_string(&pid_file).map_or(true, |p| p.trim().is_empty()) {
        assert!(std::time::Instant::now() < deadline, "handler never ran for uid 2");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let env = std::fs::read_to_string(dir.path().join("env.1")).unwrap();
    assert!(
        !env.contains("alicepw") && !env.contains("SEC_PW"),
        "secret in the handler's environment:\n{env}"
    );
    assert!(env.contains("WANTED_BY_HANDLER=yes"), "{env}");
    assert!(env.contains("INBOXD_KEY=") && env.contains("PATH="), "{env}");

    // inboxd dies hard while uid 2's handler runs: the handler must not live on beside the
    // next inboxd's re-delivery of the same message.
    let handler: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{handler}")).exists());
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let alive = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"));
    while alive(handler) {
        assert!(
            std::time::Instant::now() < deadline,
            "handler {handler} outlived inboxd"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_missing_handler_fails_check_and_the_start_instead_of_dead_lettering_mail() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\ndeliver = { exec = [\"./nope.sh\"] }",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(append(&dv, "INBOX", &["a"]));
    let out = inboxd_bin().args(["check", "-c"]).arg(&cfg.path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("target FAILED") && text.contains("nope.sh not found"),
        "{text}"
    );
    let out = inboxd_bin().args(["once", "-c"]).arg(&cfg.path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nope.sh not found"), "{err}");
    // Nothing was dead-lettered.
    let st = rt.block_on(inboxd::store::open(&cfg.state)).unwrap();
    let dead = rt
        .block_on(st.by_status(inboxd::store::DeliveryStatus::Dead, 10))
        .unwrap();
    assert!(dead.is_empty(), "{dead:?}");
}

#[test]
fn a_self_signed_ca_certificate_gets_a_clear_error_and_can_be_pinned() {
    let dv = inboxd_testbed::Dovecot::start_with(inboxd_testbed::Options {
        self_signed_ca: true,
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dv.ca_file().with_file_name("cert.pem");
    let cfg = config(&dv, dir.path(), "", "deliver = { maildir = \"out\" }");
    let text = std::fs::read_to_string(&cfg.path).unwrap();
    let with_ca = text.replace(&dv.ca_file().display().to_string(), &cert.display().to_string());
    std::fs::write(&cfg.path, &with_ca).unwrap();
    let out = inboxd_bin().args(["check", "-c"]).arg(&cfg.path).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("presents a CA certificate as its own"), "{report}");
    assert!(!report.contains("OtherError"), "{report}");
    let pin = report
        .split("tls_fingerprint = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no fingerprint in {report}"))
        .to_string();
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 95, "{pin}");

    let ca_line = format!("ca_file = \"{}\"", cert.display());
    let pinned = with_ca.replace(&ca_line, &format!("tls_fingerprint = \"{pin}\""));
    std::fs::write(&cfg.path, &pinned).unwrap();
    let out = inboxd_bin().args(["check", "-c"]).arg(&cfg.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Another certificate's fingerprint: the first byte changed, nothing else in the file.
    let first = if &pin[7..9] == "00" { "11" } else { "00" };
    let wrong_pin = format!("sha256:{first}{}", &pin[9..]);
    let wrong = pinned.replace(&pin, &wrong_pin);
    std::fs::write(&cfg.path, &wrong).unwrap();
    let out = inboxd_bin().args(["check", "-c"]).arg(&cfg.path).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && report.contains("not the one pinned"),
        "{report}"
    );
}

// Handler failures, seen through the binary: `status` shows them and `replay` re-delivers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_is_retried_blocks_later_messages_then_dead_letters_and_replays() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\nmax_attempts = 3\nretry_initial = \"100ms\"\nretry_max = \"200ms\"\ndeliver = { maildir = \"out\" }",
    );
    let st = store(&config).await;
    let rec = Recorder::default();
    rec.fail_uids.lock().unwrap().push(2);
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        st.clone(),
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    append(&dv, "INBOX", &["a", "bad", "c"]).await;
    // First failure: uid 1 is committed, uid 3 is not touched.
    wait_for(&mut ev, 20, |e| {
        matches!(
            e,
            Event::Failed {
                uid: 2,
                attempts: 1,
                ..
            }
        )
    })
    .await;
    let cp = st.checkpoint("t", "INBOX").await.unwrap().unwrap();
    assert_eq!(cp.last_uid, 1, "the checkpoint must stop before the failing message");
    assert_eq!(
        rec.uids(),
        vec![1],
        "no later message may be handled before the failing one"
    );
    let Event::DeadLettered { key, .. } =
        wait_for(&mut ev, 20, |e| matches!(e, Event::DeadLettered { uid: 2, .. })).await
    else {
        unreachable!()
    };
    wait_for(&mut ev, 20, |e| matches!(e, Event::Delivered { uid: 3, .. })).await;
    assert_eq!(
        *rec.attempts.lock().unwrap(),
        vec![1, 2, 2, 2, 3],
        "three attempts at uid 2, in order"
    );
    w.stop().await.unwrap();
    let dead = st.delivery(&key).await.unwrap().unwrap();
    assert_eq!((dead.status, dead.attempts), (DeliveryStatus::Dead, 3));
    assert!(
        dead.last_error.contains("told to fail uid 2") && dead.last_error.contains("stderr tail"),
        "{}",
        dead.last_error
    );

    // `status` shows it; `replay` delivers it (to the configured Maildir) and clears it.
    let status = inboxd_bin().args(["status", "-c"]).arg(&config.path).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("dead letters (1)") && text.contains(&key),
        "{text}"
    );
    let replay = inboxd_bin()
        .args(["replay", "-c"])
        .arg(&config.path)
        .arg(&key)
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    assert!(dir.path().join("out/new").join(&key).exists());
    assert_eq!(
        st.delivery(&key).await.unwrap().unwrap().status,
        DeliveryStatus::Delivered
    );
    let status = inboxd_bin().args(["status", "-c"]).arg(&config.path).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("dead letters (0)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_handler_failure_keeps_stderr_and_checkpoint() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\nmax_attempts = 2\nretry_initial = \"50ms\"\ndeliver = { exec = [\"sh\", \"-c\", \"echo cannot parse >&2; exit 7\"] }",
    );
    append(&dv, "INBOX", &["x"]).await;
    let out = inboxd_bin().args(["once", "-c"]).arg(&config.path).output().unwrap();
    assert!(!out.status.success(), "a dead letter makes `once` fail");
    let st = store(&config).await;
    let dead = st.by_status(DeliveryStatus::Dead, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].last_error.contains("exit status: 7") && dead[0].last_error.contains("cannot parse"),
        "{}",
        dead[0].last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_post_actions_refused_for_good() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    append(&dv, "INBOX", &["a", "b"]).await;
    // A typo: the folder does not exist, so MOVE gets `NO [TRYCREATE]`.
    let cfg = config(
        &dv,
        dir.path(),
        "",
        "start = \"all\"\nafter = \"move:Archiv\"\ndeliver = { exec = [\"true\"] }",
    );
    let once = inboxd_bin().args(["once", "-c"]).arg(&cfg.path).output().unwrap();
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    let status = inboxd_bin().args(["status", "-c"]).arg(&cfg.path).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("post-actions not done (2)") && text.contains("failed: ") && text.contains("TRYCREATE"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_route_dry_runs_the_rules_and_status_lists_what_was_skipped() {
    let dv = dovecot();
    append_raw(&dv, "INBOX", &[invoice(1), newsletter(2), personal(3)]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dv,
        dir.path(),
        "\n[targets.archive]\nmaildir = \"archive\"\n\n[targets.rest]\nmaildir = \"rest\"\n",
        r#"start = "all"
after = "seen"
else = "rest"

[[watch.rule]]
name = "invoices"
from = "*@vendor.example"
has_attachment = true
deliver = "archive"
after = "flag:Invoice"

[[watch.rule]]
name = "newsletters"
header = { "List-Id" = "*<news.vendor.example>" }
deliver = "skip"
"#,
    );
    let once = inboxd_bin().args(["once", "-c"]).arg(&config.path).output().unwrap();
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    let status = inboxd_bin().args(["status", "-c"]).arg(&config.path).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("skipped by the routing (newest 1):")
            && status.contains("uid 2  skipped by rule \"newsletters\""),
        "{status}"
    );

    append_raw(&dv, "INBOX", &[invoice(4)]).await;
    let out = inboxd_bin()
        .args(["check", "--route", "3", "-c"])
        .arg(&config.path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("target archive ok") && text.contains("target rest ok"),
        "{text}"
    );
    assert!(text.contains("routing of the newest 3 message(s)"), "{text}");
    for expected in [
        "uid 2  from news@vendor.example  \"News 2\"",
        "->  rule \"newsletters\": skip",
        "uid 3  from ann@example.com  \"Question 3\"",
        "->  else: rest (after: seen)",
        "uid 4  from billing@vendor.example  \"Invoice 4\"",
        "->  rule \"invoices\": archive (after: flag:Invoice)",
    ] {
        assert!(text.contains(expected), "{expected}\n{text}");
    }
    // The rule's post-action replaced the watch's for uid 1 (flagged, not seen). A dry run
    // delivers and changes nothing: uid 4 is still new and unflagged.
    assert_eq!(std::fs::read_dir(dir.path().join("archive/new")).unwrap().count(), 1);
    let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
    s.select("INBOX").await.unwrap();
    assert_eq!(s.search("UNSEEN").await.unwrap(), [1, 2, 4]);
    assert_eq!(s.search("KEYWORD Invoice").await.unwrap(), [1]);
    s.logout().await;
}

#[test]
fn completions_and_the_man_page_come_from_the_command_definition() {
    let run = |args: &[&str]| {
        let out = inboxd_bin().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    for sub in ["run", "once", "check", "status", "replay", "completions", "man"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    assert!(bash.contains("--route"), "subcommand options are completed too");
    // bash itself accepts the script.
    let mut check = std::process::Command::new("bash")
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check.stdin.take().unwrap().write_all(bash.as_bytes()).unwrap();
    assert!(check.wait().unwrap().success(), "bash -n refused the completion script");
    assert!(run(&["completions", "zsh"]).starts_with("#compdef inboxd"));
    assert!(run(&["completions", "fish"]).contains("complete -c inboxd"));
    let man = run(&["man"]);
    assert!(man.contains(".TH inboxd 1"), "{man}");
    for sub in ["run", "once", "check", "status", "replay"] {
        assert!(man.contains(sub), "the man page lacks {sub}");
    }
    assert!(
        inboxd_bin()
            .args(["completions", "tcsh"])
            .output()
            .unwrap()
            .status
            .code()
            == Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_shows_progress_as_a_bar_on_a_terminal_and_a_summary_otherwise() {
    let dv = dovecot();
    let msgs: Vec<Vec<u8>> = (0..300)
        .map(|i| inboxd_testbed::sample_message(i, &format!("p{i}"), 2000))
        .collect();
    dv.drop_messages("alice", "INBOX", &msgs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let out = inboxd_bin().args(["once", "-c"]).arg(&cfg.path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("caught up: 300 message(s)"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no terminal codes when stderr is not a terminal"
    );

    // On a terminal (a pseudo-terminal from `script`): the bar, ending at 300/300.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_inboxd"));
    let out = std::process::Command::new("script")
        .args(["-qec"])
        .arg(format!("{} once -c {}", bin.display(), cfg.path.display()))
        .arg("/dev/null")
        .output()
        .expect("script (util-linux)");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("300/300 messages"), "{tty}");
}

#[test]
fn a_stop_reaches_a_watch_that_is_still_connecting() {
    // A server that accepts the connection and never greets: the watch sits in its greeting
    // deadline (a minute here) when SIGTERM comes; it must not wait that minute out.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(conns);
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inboxd.toml");
    std::fs::write(
        &path,
        format!(
            "[accounts.a]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nuser = \"u\"\npassword = \"p\"\ntimeouts = {{ greeting = \"60s\" }}\n\n[[watch]]\naccount = \"a\"\ndeliver = {{ maildir = \"m\" }}\n"
        ),
    )
    .unwrap();
    let mut daemon = inboxd_bin()
        .args(["run", "-c"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let asked = std::time::Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "the stop waited for the greeting deadline: {:?}",
        asked.elapsed()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_are_named_as_people_read_them() {
    let dv = dovecot();
    let names = ["Entwürfe", "Входящие", "受信箱", "With space", "Q\"uote & more"];
    let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
    for (i, name) in names.iter().enumerate() {
        s.create(name).await.unwrap();
        s.append(name, &inboxd_testbed::sample_message(i, name, 200))
            .await
            .unwrap();
    }
    // On the wire, and so on the server, the names are modified UTF-7.
    let listed = s.folders().await.unwrap();
    for name in names {
        assert!(listed.iter().any(|(n, _)| n == name), "{name} in {listed:?}");
    }
    s.logout().await;
    let on_disk: Vec<String> = std::fs::read_dir(dv.maildir("alice"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        on_disk.iter().any(|n| n.ends_with("Entw&APw-rfe")) && on_disk.iter().any(|n| n.ends_with("Q\"uote &- more")),
        "{on_disk:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(
        config(
            &dv,
            dir.path(),
            "",
            "folder = \"INBOX\"\ndeliver = { maildir = \"inbox\" }",
        )
        .path,
    )
    .unwrap();
    for (i, name) in names.iter().enumerate() {
        text.push_str(&format!(
            "\n[[watch]]\naccount = \"t\"\nfolder = {}\nstart = \"all\"\ndeliver = {{ maildir = \"m{i}\" }}\n",
            toml_string(name)
        ));
    }
    let path = dir.path().join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    let out = inboxd_bin().args(["once", "-c"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..names.len() {
        assert_eq!(
            std::fs::read_dir(dir.path().join(format!("m{i}/new"))).unwrap().count(),
            1
        );
    }
    // `check` lists the folders readably; `status` names the watches so.
    let out = inboxd_bin().args(["check", "-c"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\"Entwürfe\"") && text.contains("\"受信箱\""), "{text}");
    let out = inboxd_bin().args(["status", "-c"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("t/Входящие") && text.contains("t/With space"), "{text}");
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[test]
fn postgres_state_runs_each_watch_in_one_process_at_a_time_and_never_shows_its_password() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    let db = inboxd_testbed::PgDatabase::create().unwrap();
    // Trust authentication on loopback ignores the password; inboxd must still never show it.
    let url = db.url().replacen("postgres@", "postgres:sekret-pw@", 1);
    assert!(url.contains("sekret-pw"), "{url}");
    let cfg = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let text = std::fs::read_to_string(&cfg.path)
        .unwrap()
        .replace("state = \"state.db\"", &format!("state = \"{url}\""));
    std::fs::write(&cfg.path, text).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(append(&dv, "INBOX", &["a", "b"]));
    let count = || std::fs::read_dir(dir.path().join("out/new")).map_or(0, |d| d.count());
    let first = inboxd_bin()
        .args(["run", "-c"])
        .arg(&cfg.path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count() < 2 {
        assert!(std::time::Instant::now() < deadline, "messages not delivered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = inboxd_bin().args(["once", "-c"]).arg(&cfg.path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second process was allowed: {err}");
    let owner = format!("inboxd {} on", first.id());
    assert!(
        err.contains("watch t/INBOX is owned by") && err.contains(&owner),
        "{err}"
    );
    assert!(!err.contains("sekret-pw") && err.contains("postgres:***@"), "{err}");
    let status = inboxd_bin().args(["status", "-c"]).arg(&cfg.path).output().unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(
        !shown.contains("sekret-pw") && shown.contains("postgres:***@"),
        "{shown}"
    );
    // Who owns the watch, and under which epoch.
    assert!(
        shown.contains(&format!("t/INBOX  {owner}")) && shown.contains("epoch 1"),
        "{shown}"
    );
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let ended = first.wait_with_output().unwrap();
    assert!(ended.status.success());
    let log = String::from_utf8_lossy(&ended.stderr);
    assert!(!log.contains("sekret-pw"), "{log}");
    // The state is in PostgreSQL, and the lock went with the process.
    assert_eq!(db.sql("SELECT last_uid FROM checkpoints").unwrap(), "2");
    assert!(!dir.path().join("state.db").exists());
    rt.block_on(append(&dv, "INBOX", &["c"]));
    let out = inboxd_bin().args(["once", "-c"]).arg(&cfg.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(), 3);
    assert_eq!(
        db.sql("SELECT COUNT(*) FROM deliveries WHERE status = 'delivered'")
            .unwrap(),
        "3"
    );
}

/// `inboxd run` with JSON logs; its log lines, as they come.
fn run_with_json_logs(config: &std::path::Path) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = inboxd_bin()
        .args(["run", "--log-format", "json", "-c"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

#[test]
fn watch_starts_are_staggered_as_configured() {
    let dv = dovecot();
    let folders = ["INBOX", "S1", "S2", "S3", "S4", "S5", "S6", "S7"];
    for f in &folders[1..] {
        dv.drop_messages("alice", f, &[inboxd_testbed::sample_message(0, f, 100)])
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &dv,
        dir.path(),
        "",
        "folder = \"INBOX\"\ndeliver = { maildir = \"out\" }",
    );
    let mut text = std::fs::read_to_string(&cfg.path).unwrap().replace(
        "state = \"state.db\"",
        "state = \"state.db\"\n[limits]\nstart_stagger = \"400ms\"",
    );
    for f in &folders[1..] {
        text.push_str(&format!(
            "\n[[watch]]\naccount = \"t\"\nfolder = \"{f}\"\ndeliver = {{ maildir = \"out\" }}\n"
        ));
    }
    std::fs::write(&cfg.path, text).unwrap();
    let started = std::time::Instant::now();
    let (mut child, lines) = run_with_json_logs(&cfg.path);
    let mut connected = Vec::new();
    while connected.len() < folders.len() {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("every watch connects");
        if line.contains("\"message\":\"connected\"") {
            connected.push(started.elapsed());
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // Four start at once; each of the other four at least half the stagger after the one
    // before it.
    let spread = connected[7] - connected[0];
    assert!(
        spread >= std::time::Duration::from_millis(4 * 200),
        "watches connected at {connected:?}"
    );
}

#[test]
fn a_pattern_watch_follows_folders_as_they_come_and_go() {
    let dv = dovecot();
    // Maildir++ on this Dovecot: `.` is the hierarchy delimiter.
    for f in ["Support.A", "Support.B", "Sales.X"] {
        dv.drop_messages("alice", f, &[inboxd_testbed::sample_message(0, f, 100)])
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &dv,
        dir.path(),
        "",
        "folder = \"INBOX\"\ndeliver = { maildir = \"inbox\" }",
    );
    let mut text = std::fs::read_to_string(&cfg.path).unwrap();
    text.push_str(
        "\n[[watch]]\naccount = \"t\"\nfolders = \"Support.*\"\nrescan = \"1s\"\nstart = \"all\"\ndeliver = { maildir = \"out\" }\n",
    );
    std::fs::write(&cfg.path, text).unwrap();
    let out = inboxd_bin().args(["check", "-c"]).arg(&cfg.path).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("pattern \"Support.*\": 2 folder(s): \"Support.A\", \"Support.B\""),
        "{shown}"
    );
    let (mut child, rx) = run_with_json_logs(&cfg.path);
    let delivered = || std::fs::read_dir(dir.path().join("out/new")).map_or(0, |d| d.count());
    let wait = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while delivered() < n {
            assert!(std::time::Instant::now() < deadline, "{} of {n} delivered", delivered());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // The two matching folders, not Sales.X.
    wait(2);
    // A folder created while running is watched from its first message.
    dv.drop_messages("alice", "Support.C", &[inboxd_testbed::sample_message(1, "c", 100)])
        .unwrap();
    wait(3);
    // A deleted folder's watch stops.
    std::fs::remove_dir_all(dv.maildir("alice").join(".Support.A")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the deleted folder's watch did not stop");
        if line.contains("no longer matches") && line.contains("t/Support.A") {
            break;
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert_eq!(delivered(), 3);
    let keys: Vec<String> = std::fs::read_dir(dir.path().join("out/new"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    // `status` shows the pattern as the folders it watched.
    let out = inboxd_bin().args(["status", "-c"]).arg(&cfg.path).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    for f in ["t/Support.A", "t/Support.B", "t/Support.C"] {
        assert!(shown.contains(f), "{f} missing: {shown}");
    }
    assert!(!shown.contains("Sales.X") && !shown.contains("Support.*"), "{shown}");
}

/// The same with PostgreSQL state and two instances: the pattern's folders are shared out as
/// watches of their own, each under a lease; a folder created while running is taken by one of
/// them, a deleted one's watch stops, and every message reaches the program once.
#[test]
fn a_pattern_watch_on_postgresql_is_shared_by_the_instances() {
    let dv = dovecot();
    let db = inboxd_testbed::PgDatabase::create().unwrap();
    for f in ["Support.A", "Support.B", "Sales.X"] {
        dv.drop_messages("alice", f, &[inboxd_testbed::sample_message(0, f, 100)])
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.log");
    let cfg = config(
        &dv,
        dir.path(),
        "",
        "folder = \"INBOX\"\ndeliver = { maildir = \"inbox\" }",
    );
    let mut text = std::fs::read_to_string(&cfg.path).unwrap().replace(
        "state = \"state.db\"",
        &format!("state = \"{}\"\nlease_ttl = \"2s\"", db.url()),
    );
    text.push_str(&format!(
        "\n[[watch]]\naccount = \"t\"\nfolders = \"Support.*\"\nrescan = \"1s\"\nstart = \"all\"\ndeliver = {{ exec = [\"sh\", \"-c\", \"echo \\\"$INBOXD_KEY\\\" >> {}\"] }}\n",
        keys.display()
    ));
    std::fs::write(&cfg.path, text).unwrap();
    let (mut first, rx1) = run_with_json_logs(&cfg.path);
    let (mut second, rx2) = run_with_json_logs(&cfg.path);
    let delivered = || -> Vec<String> {
        std::fs::read_to_string(&keys)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let wait = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while delivered().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?} of {n} delivered",
                delivered()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // The two matching folders, not Sales.X.
    wait(2);
    dv.drop_messages("alice", "Support.C", &[inboxd_testbed::sample_message(1, "c", 100)])
        .unwrap();
    wait(3);
    std::fs::remove_dir_all(dv.maildir("alice").join(".Support.A")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut logs = [Vec::new(), Vec::new()];
    let stopped = |logs: &[Vec<String>; 2]| {
        logs.iter()
            .flatten()
            .any(|l| l.contains("no longer matches") && l.contains("t/Support.A"))
    };
    while !stopped(&logs) {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted folder's watch did not stop"
        );
        for (log, rx) in logs.iter_mut().zip([&rx1, &rx2]) {
            log.extend(rx.try_iter());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for child in [&first, &second] {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    assert!(first.wait().unwrap().success());
    assert!(second.wait().unwrap().success());
    // Both instances watched: four watches (INBOX and the three folders) share out two each.
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.iter().any(|l| l.contains("lease taken")),
            "instance {i} took no lease: {log:?}"
        );
    }
    let mut got = delivered();
    assert_eq!(got.len(), 3, "{got:?}");
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 3, "a message reached the program twice");
    // `status` shows which instance had each folder's lease.
    let out = inboxd_bin().args(["status", "-c"]).arg(&cfg.path).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    for f in ["t/Support.A", "t/Support.B", "t/Support.C"] {
        assert!(shown.contains(f), "{f} missing: {shown}");
    }
    assert!(!shown.contains("Sales.X"), "{shown}");
    // `once` takes each matching folder under a lease of its own: nothing new, nothing again.
    let once = inboxd_bin().args(["once", "-c"]).arg(&cfg.path).output().unwrap();
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    assert_eq!(delivered().len(), 3);
}

/// `check` says what `notify = true` will do against this server (Dovecot offers NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_whether_notify_is_served() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    config(&dv, dir.path(), "notify = true", "deliver = { maildir = \"m\" }");
    let out = inboxd_bin()
        .args(["check", "-c"])
        .arg(dir.path().join("inboxd.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("notify: the server offers NOTIFY"), "{text}");
}
