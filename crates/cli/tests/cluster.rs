//! Three `inboxd run` processes share 30 watches through leases on a PostgreSQL database of
//! the test's own, with a real Dovecot, a Maildir and an `exec` target, while mail flows: one
//! is SIGKILLed during a burst, one is SIGSTOPped past its lease and continued, one is cut off
//! from PostgreSQL (its connections go through a proxy the test cuts), then all three are
//! restarted one after another. Lost: 0. Maildir: each message once. `exec`: a message runs
//! again only if it was in flight when its instance was killed, stopped or cut off; and never
//! by an instance that no longer held the watch.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "../../../tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{Mail, Run, WATCHES, exec_runs, now};
use inboxd_testbed::{Dovecot, PgDatabase};
use support::inboxd_bin;

const TTL: Duration = Duration::from_secs(2);

/// A TCP proxy to PostgreSQL that the test can cut: every connection through it is shut and
/// new ones are closed at once, until it is restored.
struct PgProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl PgProxy {
    fn start(upstream: &str) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, k, upstream) = (cut.clone(), conns.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut list = k.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        PgProxy { port, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Runs under a lost lease: at most the one delivery per watch that was in flight (past its
/// lease check) when its instance was paused or cut off.
fn assert_at_most_one_in_flight_per_watch(stale: &[Run], who: &str) {
    let mut per_folder: HashMap<&str, usize> = HashMap::new();
    for r in stale {
        *per_folder.entry(r.2.as_str()).or_default() += 1;
    }
    assert!(
        per_folder.values().all(|&n| n <= 1),
        "{who} delivered under a lost lease: {stale:?}"
    );
    if !stale.is_empty() {
        println!(
            "{who}: {} delivery(ies) in flight finished after losing the lease",
            stale.len()
        );
    }
}

#[test]
fn three_instances_share_thirty_watches_through_kills_stops_and_a_cut_off_database() {
    let proxy = PgProxy::start("127.0.0.1:5432");
    let cluster::Bed {
        dv,
        dir,
        mail,
        log,
        mut cluster,
    } = cluster::bed(TTL, Duration::from_secs(30), PgDatabase::create().unwrap(), |i, url| {
        // The third instance reaches PostgreSQL through the proxy.
        if i == 2 {
            url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1)
        } else {
            url.to_string()
        }
    });
    for i in 0..3 {
        cluster.start(i);
    }
    let settled = cluster.wait_shares(&[10, 10, 10], "three instances start");
    println!("three instances hold 10 watches each {settled:.1?} after the start");

    // Mail flows from here to the end.
    let flowing = Arc::new(AtomicBool::new(true));
    let flow = {
        let (mail, flowing) = (
            Mail {
                dv: dv.clone(),
                sent: mail.sent.clone(),
            },
            flowing.clone(),
        );
        std::thread::spawn(move || {
            let mut f = 0;
            while flowing.load(Ordering::SeqCst) {
                mail.drop_one(f % WATCHES);
                f += 7;
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };

    // 1. SIGKILL during a burst.
    let owners = cluster.owners();
    let killed_pid = cluster.pid(0);
    let killed_folders: HashSet<String> = owners[&killed_pid].iter().cloned().collect();
    mail.burst(150);
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = now();
    cluster.kill(0);
    let took = cluster.wait_shares(&[15, 15], "after the kill");
    println!("SIGKILL: the two others hold 15 each {took:.1?} after the kill");
    let deadline = Instant::now() + Duration::from_secs(20);
    let failover = loop {
        let first = exec_runs(&log)
            .into_iter()
            .filter(|r| r.0 > killed_at && r.1 != killed_pid && killed_folders.contains(&r.2))
            .map(|r| r.0)
            .fold(f64::INFINITY, f64::min);
        if first.is_finite() {
            break first - killed_at;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery from the killed instance's folders"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "failover after SIGKILL: {failover:.2} s to the first delivery by a new owner (lease_ttl {} s)",
        TTL.as_secs()
    );
    cluster.start(0);
    cluster.wait_shares(&[10, 10, 10], "the killed instance back");

    // 2. SIGSTOP past the lease, then SIGCONT.
    let stopped_pid = cluster.pid(1);
    let stopped_folders: HashSet<String> = cluster.owners()[&stopped_pid].iter().cloned().collect();
    cluster.signal(1, libc::SIGSTOP);
    // Mail for its watches while it sleeps: on waking, its sessions hear of it.
    for folder in &stopped_folders {
        for _ in 0..3 {
            mail.drop_one(folder[1..].parse().unwrap());
        }
    }
    cluster.wait_shares(&[15, 15], "while one instance is stopped");
    std::thread::sleep(Duration::from_millis(500));
    let continued_at = now();
    cluster.signal(1, libc::SIGCONT);
    cluster.wait_shares(&[10, 10, 10], "the stopped instance continued");
    // After the wake it may run a watch again only under a lease it took anew, but for the
    // delivery it was in the middle of when it was stopped (its lease check had passed).
    std::thread::sleep(Duration::from_secs(1));
    let stale = cluster.stale_runs(&exec_runs(&log), stopped_pid, continued_at, &stopped_folders);
    assert_at_most_one_in_flight_per_watch(&stale, "the woken instance");

    // 3. One instance cut off from PostgreSQL past its lease.
    let cut_pid = cluster.pid(2);
    let cut_folders: HashSet<String> = cluster.owners()[&cut_pid].iter().cloned().collect();
    let cut_at = now();
    proxy.cut();
    cluster.wait_shares(&[15, 15], "while one instance is cut off");
    std::thread::sleep(TTL);
    proxy.restore();
    cluster.wait_shares(&[10, 10, 10], "the cut-off instance back");
    std::thread::sleep(Duration::from_secs(1));
    // Its lease expired in the database at the latest a TTL after the cut.
    let stale = cluster.stale_runs(&exec_runs(&log), cut_pid, cut_at + TTL.as_secs_f64(), &cut_folders);
    assert_at_most_one_in_flight_per_watch(&stale, "the cut-off instance");

    // 4. A rolling restart.
    for i in 0..3 {
        cluster.terminate(i);
        cluster.start(i);
        cluster.wait_shares(&[10, 10, 10], "rolling restart");
    }

    flowing.store(false, Ordering::SeqCst);
    flow.join().unwrap();
    let sent = mail.sent.load(Ordering::SeqCst);
    let maildir = dir.path().join("out/new");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = std::fs::read_dir(&maildir).map_or(0, |d| d.count());
        let keys: HashSet<String> = exec_runs(&log).into_iter().map(|r| r.3).collect();
        if delivered == sent && keys.len() == sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lost: {sent} sent, {delivered} in the Maildir, {} run by exec",
            keys.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let runs = exec_runs(&log);
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for r in &runs {
        *per_key.entry(r.3.as_str()).or_default() += 1;
    }
    let repeated = runs.len() - per_key.len();
    println!(
        "{sent} messages sent; {} in the Maildir (each once: the key is its file name); exec ran {} times, {repeated} of them again",
        std::fs::read_dir(&maildir).unwrap().count(),
        runs.len()
    );
    // In flight at most: one message per watch of the instance killed, stopped or cut off.
    assert!(repeated <= 30, "{repeated} repeated exec runs");
    for r in &runs {
        assert!(r.3.len() > 10, "{r:?}");
    }
    drop(cluster);
}

#[test]
fn a_reload_in_a_cluster_gives_back_removed_watches_and_takes_new_ones() {
    let dv = Dovecot::start().expect("dovecot");
    let dir = tempfile::tempdir().unwrap();
    let db = PgDatabase::create().unwrap();
    for f in ["R1", "R2", "R3"] {
        dv.drop_messages("alice", f, &[inboxd_testbed::sample_message(0, f, 100)])
            .unwrap();
    }
    let text = |folders: &[&str]| {
        let mut t = format!(
            "state = \"{}\"\nlease_ttl = \"3s\"\n[accounts.t]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\nuser = \"alice\"\npassword = \"alicepw\"\n",
            db.url(),
            dv.port,
            dv.ca_file().display()
        );
        for f in folders {
            t.push_str(&format!(
                "[[watch]]\naccount = \"t\"\nfolder = \"{f}\"\nstart = \"all\"\ndeliver = {{ maildir = \"out\" }}\n"
            ));
        }
        t
    };
    let path = dir.path().join("inboxd.toml");
    std::fs::write(&path, text(&["R1", "R2"])).unwrap();
    let mut child = inboxd_bin()
        .args(["run", "-c"])
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let leased = || {
        db.sql("SELECT folder FROM leases WHERE owner IS NOT NULL AND expires_at > now() ORDER BY folder")
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let wait = |want: &[&str]| {
        let t = Instant::now();
        while leased() != want {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "leases {:?}, want {want:?}",
                leased()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait(&["R1", "R2"]);
    let delivered = || std::fs::read_dir(dir.path().join("out/new")).map_or(0, |d| d.count());
    let wait_delivered = |n: usize| {
        let t = Instant::now();
        while delivered() < n {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{} of {n} delivered",
                delivered()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // R1's and R2's messages first.
    wait_delivered(2);
    // R1 goes, R3 comes: the lease of R1 is given back at once, R3's taken.
    std::fs::write(&path, text(&["R2", "R3"])).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait(&["R2", "R3"]);
    wait_delivered(3);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // Leaving gave every lease back.
    assert!(leased().is_empty(), "{:?}", leased());
}
