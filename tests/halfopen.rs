//! A true half-open connection: nftables drops every packet of the watcher's connection on
//! loopback, so the kernel stops ACKing and the watcher, silent in IDLE, hears nothing. Only TCP
//! keepalive / `TCP_USER_TIMEOUT` can notice. (A userspace proxy cannot produce this: the kernel
//! would keep ACKing.) The test re-runs itself inside a private network namespace
//! (`unshare --net`), so its rules touch nothing else on the machine. Needs root, `unshare`, `ip`
//! and `nft`; skipped with a message otherwise.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use inboxd::watcher::{Event, Mode, Watcher};
use support::*;

/// The nftables table of one test, removed on drop even if the test fails.
struct Blackhole {
    table: String,
}

impl Blackhole {
    fn drop_port(port: u16) -> Blackhole {
        let table = format!("inboxd_halfopen_{port}");
        let nft = |args: &str| {
            let ok = Command::new("nft")
                .args(args.split(' '))
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "nft {args}");
        };
        nft(&format!("add table inet {table}"));
        nft(&format!(
            "add chain inet {table} in {{ type filter hook input priority -10 ; }}"
        ));
        nft(&format!("add rule inet {table} in iif lo tcp dport {port} drop"));
        nft(&format!("add rule inet {table} in iif lo tcp sport {port} drop"));
        Blackhole { table }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

fn can_run() -> Result<(), String> {
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("nft is not installed (scripts/install-deps installs nftables as root)".into()),
    }
}

const NAME: &str = "a_half_open_connection_is_detected_by_keepalive_and_recovered";

#[test]
fn a_half_open_connection_is_detected_by_keepalive_and_recovered() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED {NAME}: {why}");
        return;
    }
    if std::env::var("INBOXD_IN_NETNS").is_ok() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(half_open());
        return;
    }
    // Re-run this very test inside a private network namespace with its own loopback.
    let me = std::env::current_exe().unwrap();
    let script = format!(
        "ip link set lo up && exec \"{}\" --exact {NAME} --nocapture",
        me.display()
    );
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .env("INBOXD_IN_NETNS", "1")
        .output();
    match out {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for line in text
                .lines()
                .filter(|l| l.contains("half-open") || l.contains("panicked") || l.contains("SKIPPED"))
            {
                eprintln!("{line}");
            }
            assert!(out.status.success(), "inside the network namespace:\n{text}");
            assert!(text.contains("half-open connection detected after"), "{text}");
        }
        Err(e) => eprintln!("SKIPPED {NAME}: cannot run unshare: {e}"),
    }
}

async fn half_open() {
    let dv = dovecot();
    let dir = tempfile::tempdir().unwrap();
    // The silence watchdog is set far away, so that only the kernel can notice.
    let config = config(
        &dv,
        dir.path(),
        "reconnect = [ { every = \"500ms\" } ]\ntimeouts = { keepalive = \"2s\", idle_silence = \"10m\", connect = \"2s\" }",
        "deliver = { maildir = \"out\" }",
    );
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(&config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let mut ev = w.subscribe();
    wait_for(&mut ev, 20, |e| matches!(e, Event::CaughtUp { .. })).await;
    wait_state(&w, "idle").await;

    let hole = Blackhole::drop_port(dv.port);
    let cut = Instant::now();
    let e = wait_for(&mut ev, 60, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    let detected = cut.elapsed();
    eprintln!(
        "half-open connection detected after {:.2} s ({e:?})",
        detected.as_secs_f64()
    );
    assert!(
        detected >= Duration::from_secs(2),
        "the first keepalive probe is due after 2 s: {detected:?}"
    );
    drop(hole);

    append(&dv, "INBOX", &["after-heal"]).await;
    wait_delivered(&mut ev, 1, 30).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), vec!["after-heal"]);
}
