//! The `inboxd` command line: errors an operator sees, secrets they must never see.

mod support;

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
    let st = rt.block_on(inboxd::store::SqliteStore::open(&cfg.state)).unwrap();
    use inboxd::store::Store;
    let cp = rt.block_on(st.checkpoint("t", "INBOX")).unwrap().unwrap();
    assert_eq!(cp.last_uid, 2);
}
