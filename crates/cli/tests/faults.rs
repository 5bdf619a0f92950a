//! The fault-injection suite: inboxd (the real binary, `inboxd run`) watches a real Dovecot
//! through a fault proxy while faults are injected, and every message sent must end up in the
//! Maildir exactly once.
//!
//! Short mode (the default, in CI): one run of each fault kind. Soak mode:
//! `INBOXD_FAULT_RUNS=121 cargo test --release -p inboxd-cli --test faults -- --nocapture` (seed with
//! `INBOXD_FAULT_SEED`, limit kinds with `INBOXD_FAULT_KINDS=Freeze,Reset`). Each run prints a line; the suite prints a table of injected faults vs
//! messages sent / delivered / lost / duplicated.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use inboxd_testbed::Dovecot;
use support::faultproxy::{FaultProxy, Kill};
use support::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    Freeze,
    Reset,
    Close,
    Delay,
    Throttle,
    CutAfter,
    NeverGreet,
    DovecotRestartInIdle,
    DovecotRestartInFetch,
    SigkillInBurst,
    UidValidityReset,
}

const KINDS: &[Fault] = &[
    Fault::Freeze,
    Fault::Reset,
    Fault::Close,
    Fault::Delay,
    Fault::Throttle,
    Fault::CutAfter,
    Fault::NeverGreet,
    Fault::DovecotRestartInIdle,
    Fault::DovecotRestartInFetch,
    Fault::SigkillInBurst,
    Fault::UidValidityReset,
];

enum KeepDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl KeepDir {
    fn path(&self) -> &Path {
        match self {
            KeepDir::Temp(t) => t.path(),
            KeepDir::Kept(p) => p,
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    runs: u32,
    sent: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    settle_ms_max: u128,
    /// Connection failures inboxd logged: shows the fault took effect.
    failures: usize,
}

struct Daemon {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: &Path) -> Daemon {
        let err = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = inboxd_bin()
            .args(["--log", "inboxd=debug", "run", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Daemon {
            child,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
        }
    }
    fn sigkill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Daemon::start(&self.config, &self.log);
    }
    fn failures(&self) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |l| l.matches("watch failed").count())
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn message(run: u64, i: usize, size: usize) -> Vec<u8> {
    let mut m =
        format!("From: f@example.com\r\nSubject: f{i}\r\nMessage-ID: <{run}-{i}@fault.test>\r\n\r\n").into_bytes();
    while m.len() < size {
        m.extend_from_slice(b"fault injection payload 0123456789 abcdefghijklmnopqrstuvwxyz\r\n");
    }
    m
}

/// Message-ID -> number of files holding it.
fn delivered(maildir: &Path) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for sub in ["new", "cur"] {
        let Ok(dir) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for e in dir.flatten() {
            let Ok(bytes) = std::fs::read(e.path()) else { continue };
            if let Some(mid) = inboxd::message::message_id(&bytes) {
                *seen.entry(mid).or_insert(0) += 1;
            }
        }
    }
    seen
}

async fn send(dv: &Dovecot, folder: &str, msgs: &[Vec<u8>], rng: &mut fastrand::Rng) {
    let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
    for m in msgs {
        s.append(folder, m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(rng.u64(5..60))).await;
    }
    s.logout().await;
}

type Outcome = (usize, usize, usize, usize, u128, usize);

async fn run_one(fault: Fault, run: u64, rng: &mut fastrand::Rng) -> Outcome {
    let mut dv = dovecot();
    let folder = if fault == Fault::UidValidityReset {
        "Work"
    } else {
        "INBOX"
    };
    if folder != "INBOX" {
        imap(&dv, &format!("CREATE {folder}")).await;
    }
    let proxy = FaultProxy::start(dv.port).await;
    let dir = tempfile::tempdir().unwrap();
    if std::env::var("INBOXD_FAULT_KEEP").is_ok() {
        eprintln!("run {run}: keeping {}", dir.path().display());
    }
    let dir = if std::env::var("INBOXD_FAULT_KEEP").is_ok() {
        KeepDir::Kept(dir.keep())
    } else {
        KeepDir::Temp(dir)
    };
    let cfg = dir.path().join("inboxd.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"state = "state.db"
[accounts.f]
host = "127.0.0.1"
port = {port}
tls = "starttls"
ca_file = "{ca}"
user = "alice"
password = "alicepw"
reconnect = [ {{ every = "250ms" }} ]
stable_after = "2s"
timeouts = {{ connect = "2s", tls = "2s", greeting = "2s", login = "3s", command = "4s", done = "2s", idle_silence = "3s" }}
[[watch]]
account = "f"
folder = "{folder}"
start = "all"
batch_size = {batch}
deliver = {{ maildir = "out" }}
"#,
            port = proxy.port,
            ca = dv.ca_file().display(),
            batch = rng.usize(3..60),
        ),
    )
    .unwrap();
    let maildir = dir.path().join("out");
    let mut daemon = Daemon::start(&cfg, &dir.path().join("inboxd.log"));
    let n = rng.usize(20..40);
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| message(run, i, rng.usize(200..30_000))).collect();
    let half = n / 2;
    send(&dv, folder, &msgs[..half], rng).await;

    let hold = Duration::from_millis(rng.u64(500..4000));
    match fault {
        Fault::Freeze => {
            // Longer than idle_silence (3 s) + done (2 s): the watchdog must notice the silence,
            // give up on the frozen connection and get through once the proxy thaws.
            proxy.freeze();
            tokio::time::sleep(Duration::from_millis(rng.u64(6000..9000))).await;
            proxy.thaw();
        }
        Fault::Reset => proxy.kill(Kill::Reset),
        Fault::Close => proxy.kill(Kill::Close),
        Fault::Delay => {
            proxy.delay(rng.u64(50..400));
            send(&dv, folder, &msgs[half..half + 2], rng).await;
            tokio::time::sleep(hold).await;
            proxy.delay(0);
        }
        Fault::Throttle => {
            proxy.throttle(rng.u64(5_000..50_000));
            send(&dv, folder, &msgs[half..half + 2], rng).await;
            tokio::time::sleep(hold).await;
            proxy.throttle(0);
        }
        Fault::CutAfter => {
            proxy.cut_after(rng.i64(10..20_000));
            send(&dv, folder, &msgs[half..half + 2], rng).await;
            tokio::time::sleep(hold).await;
            proxy.cut_after(-1);
        }
        Fault::NeverGreet => {
            proxy.hang(true);
            proxy.kill(Kill::Close);
            tokio::time::sleep(hold.max(Duration::from_secs(3))).await;
            proxy.hang(false);
            proxy.kill(Kill::Close);
        }
        Fault::DovecotRestartInIdle => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            dv.stop();
            tokio::time::sleep(hold).await;
            dv.restart().unwrap();
        }
        Fault::DovecotRestartInFetch => {
            // A backlog big enough that the restart lands in the middle of the catch-up.
            let backlog: Vec<Vec<u8>> = (0..10).map(|i| message(run, 1000 + i, 400_000)).collect();
            send(&dv, folder, &backlog, rng).await;
            tokio::time::sleep(Duration::from_millis(rng.u64(0..150))).await;
            dv.stop();
            tokio::time::sleep(hold / 2).await;
            dv.restart().unwrap();
            let mut all = msgs.clone();
            all.extend(backlog);
            return finish(&dv, folder, &all[half..], all.len(), &maildir, daemon, rng).await;
        }
        Fault::SigkillInBurst => {
            // The second half arrives as a burst while inboxd is SIGKILLed three times.
            let account = dv.account("alice");
            let burst = msgs[half..].to_vec();
            let sender = tokio::spawn(async move {
                let mut s = inboxd::imap::Session::open(&account).await.unwrap();
                for m in burst {
                    s.append("INBOX", &m).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                s.logout().await;
            });
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(rng.u64(50..600))).await;
                daemon.sigkill_and_restart();
            }
            sender.await.unwrap();
        }
        Fault::UidValidityReset => {
            wait_until(&maildir, half, Duration::from_secs(30)).await;
            imap(&dv, "DELETE Work").await;
            imap(&dv, "CREATE Work").await;
            // Dovecot briefly answers "Mailbox was deleted under us" to an APPEND right after.
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The old messages come back with the recreated folder, plus new ones.
            send(&dv, folder, &msgs[..half], rng).await;
        }
    }
    proxy.heal();
    finish(&dv, folder, &msgs[half..], n, &maildir, daemon, rng).await
}

async fn wait_until(maildir: &Path, unique: usize, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if delivered(maildir).len() >= unique {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn finish(
    dv: &Dovecot,
    folder: &str,
    rest: &[Vec<u8>],
    total: usize,
    maildir: &Path,
    daemon: Daemon,
    rng: &mut fastrand::Rng,
) -> Outcome {
    // Some kinds already sent a couple of the second half during the fault.
    let already: std::collections::HashSet<String> = {
        let mut s = inboxd::imap::Session::open(&dv.account("alice")).await.unwrap();
        s.select(folder).await.unwrap();
        let uids = s.search("ALL").await.unwrap();
        let mut ids = std::collections::HashSet::new();
        for m in s.fetch(&uids, u64::MAX).await.unwrap() {
            if let Some(id) = inboxd::message::message_id(&m.body) {
                ids.insert(id);
            }
        }
        s.logout().await;
        ids
    };
    let todo: Vec<Vec<u8>> = rest
        .iter()
        .filter(|m| !already.contains(&inboxd::message::message_id(m).unwrap()))
        .cloned()
        .collect();
    send(dv, folder, &todo, rng).await;
    let t = Instant::now();
    wait_until(maildir, total, Duration::from_secs(60)).await;
    let settle = t.elapsed().as_millis();
    // Give late duplicates a chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let failures = daemon.failures();
    daemon.stop();
    let seen = delivered(maildir);
    let unique = seen.len();
    let duplicated: usize = seen.values().map(|c| c - 1).sum();
    (
        total,
        unique,
        total.saturating_sub(unique),
        duplicated,
        settle,
        failures,
    )
}

#[test]
fn faults_lose_nothing_and_repeat_nothing() {
    // INBOXD_FAULT_KINDS=Freeze,Reset limits the kinds (by name).
    let only = std::env::var("INBOXD_FAULT_KINDS").unwrap_or_default();
    let kinds: Vec<Fault> = KINDS
        .iter()
        .copied()
        .filter(|k| only.is_empty() || only.split(',').any(|o| o == format!("{k:?}")))
        .collect();
    assert!(!kinds.is_empty(), "INBOXD_FAULT_KINDS names no known fault: {only}");
    let runs: usize = std::env::var("INBOXD_FAULT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(kinds.len());
    let seed: u64 = std::env::var("INBOXD_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261126);
    let mut rng = fastrand::Rng::with_seed(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut table: std::collections::BTreeMap<Fault, Row> = Default::default();
    for run in 0..runs {
        let fault = kinds[run % kinds.len()];
        let (sent, got, lost, dup, settle, failures) =
            rt.block_on(run_one(fault, seed.wrapping_add(run as u64), &mut rng));
        eprintln!(
            "run {run:>3} {:<22} sent {sent:>3} delivered {got:>3} lost {lost} duplicated {dup} settle {settle} ms, {failures} connection failure(s)",
            format!("{fault:?}")
        );
        let row = table.entry(fault).or_default();
        row.runs += 1;
        row.sent += sent;
        row.delivered += got;
        row.lost += lost;
        row.duplicated += dup;
        row.settle_ms_max = row.settle_ms_max.max(settle);
        row.failures += failures;
    }
    eprintln!("\nseed {seed}, {runs} runs");
    eprintln!(
        "{:<22} {:>5} {:>6} {:>10} {:>5} {:>11} {:>12} {:>9}",
        "fault", "runs", "sent", "delivered", "lost", "duplicated", "settle max", "failures"
    );
    let mut total = Row::default();
    for (fault, r) in &table {
        eprintln!(
            "{:<22} {:>5} {:>6} {:>10} {:>5} {:>11} {:>9} ms {:>9}",
            format!("{fault:?}"),
            r.runs,
            r.sent,
            r.delivered,
            r.lost,
            r.duplicated,
            r.settle_ms_max,
            r.failures
        );
        total.runs += r.runs;
        total.sent += r.sent;
        total.delivered += r.delivered;
        total.lost += r.lost;
        total.duplicated += r.duplicated;
    }
    eprintln!(
        "{:<22} {:>5} {:>6} {:>10} {:>5} {:>11}",
        "total", total.runs, total.sent, total.delivered, total.lost, total.duplicated
    );
    assert_eq!(
        (total.lost, total.duplicated),
        (0, 0),
        "messages lost or duplicated under faults (seed {seed})"
    );
}
