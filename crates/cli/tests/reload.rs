//! Live reload: `inboxd run` re-reads its config on SIGHUP (and `inboxd reload`) while mail
//! flows. Watches added start, removed ones stop after the delivery in flight, changed ones
//! restart, untouched ones keep going; an invalid config is refused and the running one stays.
//! Counted over a real Dovecot: nothing lost, nothing repeated, into a Maildir and into a
//! program that logs every key it is handed (a program cannot drop repeats itself).

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// The config, with `work` watching the Work folder or not, and `batch` for INBOX.
fn write(dv: &inboxd_testbed::Dovecot, dir: &Path, work: bool, batch: u32) -> std::path::PathBuf {
    let log = dir.join("keys.log");
    let targets = format!(
        "\n[targets.box]\nmaildir = \"out\"\n\n[targets.log]\nexec = [\"sh\", \"-c\", \"cat >/dev/null; echo \\\"$INBOXD_KEY\\\" >> {}\"]\n",
        log.display()
    );
    let cfg = config(
        dv,
        dir,
        &targets,
        &format!("start = \"all\"\nbatch_size = {batch}\ndeliver = [\"box\", \"log\"]"),
    );
    if work {
        let mut text = std::fs::read_to_string(&cfg.path).unwrap();
        text.push_str(
            "\n[[watch]]\naccount = \"t\"\nfolder = \"Work\"\nstart = \"all\"\ndeliver = [\"box\", \"log\"]\n",
        );
        std::fs::write(&cfg.path, text).unwrap();
    }
    cfg.path
}

fn keys(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("keys.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_repeatedly_while_mail_flows_loses_and_repeats_nothing() {
    let dv = dovecot();
    imap(&dv, "CREATE Work").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dv, dir.path(), false, 200);
    let stderr = std::fs::File::create(dir.path().join("inboxd.log")).unwrap();
    let mut daemon = inboxd_bin()
        .args(["run", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();

    let n = 120;
    let account = dv.account("alice");
    let sender = tokio::spawn(async move {
        let mut s = inboxd::imap::Session::open(&account).await.unwrap();
        for i in 0..n {
            let m = inboxd_testbed::sample_message(i, &format!("r{i}"), 800);
            s.append("INBOX", &m).await.unwrap();
            s.append("Work", &m).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        s.logout().await;
    });
    let hup = |pid: u32| {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    };
    // Add the Work watch, change INBOX's, refuse a broken config, remove Work, add it again:
    // by signal and by `inboxd reload`.
    let steps: [(&str, Option<(bool, u32)>); 6] = [
        ("signal", Some((true, 200))),
        ("command", Some((true, 7))),
        ("signal", None),
        ("command", Some((false, 7))),
        ("signal", Some((true, 50))),
        ("command", Some((true, 50))),
    ];
    for (how, config) in steps {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match config {
            Some((work, batch)) => {
                write(&dv, dir.path(), work, batch);
            }
            None => std::fs::write(&path, "[[watch]]\naccount = \"nobody\"\n").unwrap(),
        }
        if how == "signal" || config.is_none() {
            hup(daemon.id());
        } else {
            let out = inboxd_bin().args(["reload", "-c"]).arg(&path).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {}", daemon.id())));
        }
        if config.is_none() {
            // The running config stays; the next step writes a valid one again.
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(daemon.try_wait().unwrap().is_none(), "a broken config stopped inboxd");
        }
    }
    sender.await.unwrap();
    // Everything arrives: n messages from each folder, each handed to the program once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while keys(dir.path()).len() < 2 * n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("inboxd.log")).unwrap();
    let all = keys(dir.path());
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &all {
        *counts.entry(k.as_str()).or_default() += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "handed over twice: {repeated:?}");
    assert_eq!(counts.len(), 2 * n, "lost messages\n{log}");
    let files = std::fs::read_dir(dir.path().join("out/new")).unwrap().count();
    assert_eq!(files, 2 * n);
    assert!(log.contains("reload refused: the config does not load"), "{log}");
    assert_eq!(log.matches("config reloaded").count(), 5, "{log}");
}
