//! inboxd as a systemd service: the `Type=notify` protocol over a real notify socket (READY once
//! the watch started, STATUS, WATCHDOG pings, STOPPING), a password from a systemd credential,
//! and the hardened unit in contrib/systemd checked by `systemd-analyze verify`.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// Datagrams received on the socket until `until` holds for one or `secs` pass.
fn receive(sock: &UnixDatagram, secs: u64, until: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = until(&text);
            got.push(text);
            if done {
                return got;
            }
        }
    }
    panic!("no matching notification within {secs}s; got {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_speaks_the_notify_protocol_and_reads_a_credential() {
    let dv = dovecot();
    append(&dv, "INBOX", &["one"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    // The password comes from $CREDENTIALS_DIRECTORY, as LoadCredential= provides it.
    let text = std::fs::read_to_string(&cfg.path).unwrap().replace(
        "password = \"alicepw\"",
        "password = { credential = \"imap-password\" }",
    );
    std::fs::write(&cfg.path, text).unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("imap-password"), "alicepw\n").unwrap();

    let socket = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let daemon = inboxd_bin()
        .args(["run", "-c"])
        .arg(&cfg.path)
        .env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "400000")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let got = receive(&sock, 30, |m| m.contains("READY=1"));
    let ready = got.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=1 watch: 1 "), "{ready}");
    // Logged in with the credential: the message was delivered.
    for _ in 0..100 {
        if std::fs::read_dir(dir.path().join("out/new")).is_ok_and(|d| d.count() == 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_dir(dir.path().join("out/new")).unwrap().count(), 1);
    // Watchdog pings, every WATCHDOG_USEC/2.
    let pings = receive(&sock, 10, {
        let seen = std::sync::atomic::AtomicUsize::new(0);
        move |m| m.trim() == "WATCHDOG=1" && seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2
    });
    assert!(
        pings.iter().filter(|m| m.trim() == "WATCHDOG=1").count() >= 3,
        "{pings:?}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    receive(&sock, 10, |m| m.contains("STOPPING=1"));
    let out = daemon.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("alicepw"));
}

/// `systemd-analyze verify` of a unit, with ExecStart pointing at the test's binary (verify
/// checks that the program exists): its complaints, empty when the unit is clean.
fn verify(unit_text: &str, dir: &std::path::Path) -> String {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_inboxd"));
    let unit = dir.join("inboxd.service");
    std::fs::write(&unit, unit_text.replace("/usr/bin/inboxd", &bin.display().to_string())).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    format!(
        "{}{}{}",
        if out.status.success() { "" } else { "failed\n" },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_contrib_unit_passes_systemd_analyze_verify_and_its_config_loads() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/systemd/inboxd.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec=") && unit.contains("LoadCredential="));
    let dir = tempfile::tempdir().unwrap();
    let complaints = verify(&unit, dir.path());
    assert!(complaints.trim().is_empty(), "{complaints}");
    // The check can fail: a misspelt directive is reported.
    let broken = unit.replace("ProtectSystem=strict", "ProtectSytem=strict");
    assert!(
        verify(&broken, dir.path()).contains("ProtectSytem"),
        "systemd-analyze did not notice a typo"
    );
    // The example config beside the unit is valid.
    let example = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/systemd/inboxd.toml"
    ));
    let config = inboxd::config::Config::load(example).unwrap();
    assert_eq!(
        config.state.file(),
        Some(std::path::Path::new("/var/lib/inboxd/inboxd.db"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_carry_journald_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let dv = dovecot();
    append(&dv, "INBOX", &["one"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dv, dir.path(), "", "start = \"all\"\ndeliver = { maildir = \"out\" }");
    let run = |journal: bool, format: &str| {
        let log = dir.path().join(format!("stderr-{journal}-{format}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        // systemd names the stream it connected; a stale value (another stream) is ignored.
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let out = inboxd_bin()
            .args(["--log-format", format, "once", "-c"])
            .arg(&cfg.path)
            .env("JOURNAL_STREAM", stream)
            .stderr(file)
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::read_to_string(&log).unwrap()
    };
    let plain = run(true, "plain");
    let line = plain.lines().find(|l| l.contains("caught up")).unwrap();
    assert!(line.starts_with("<6>") && line.contains("INFO"), "{plain}");
    let json = run(true, "json");
    let line = json.lines().find(|l| l.contains("caught up")).unwrap();
    let body = line.strip_prefix("<6>").unwrap_or_else(|| panic!("{json}"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(body).unwrap()["level"],
        "INFO"
    );
    let elsewhere = run(false, "plain");
    assert!(!elsewhere.contains("<6>"), "{elsewhere}");
}
