//! Failover times of a cluster: three `inboxd run` processes share 30 watches through leases on
//! PostgreSQL (a database of the run's own) over one Dovecot. An instance is SIGKILLed, or
//! SIGSTOPped, and a message is dropped into each of its folders at that moment; the failover
//! time is from the signal to the first delivery of such a message by another instance. It is
//! bound by the lease's TTL: the new owner may not take a watch before the old lease expired,
//! a TTL after its holder's last renewal (which came up to a third of a TTL before the signal).
//! Each round ends with the instance back and the shares even again.
//!
//! Run: `cargo bench -p inboxd-cli --bench failover` (env: INBOXD_BENCH_FAILOVER_TTLS=2,15 the
//! lease TTLs in seconds, INBOXD_BENCH_FAILOVER_ROUNDS=3 per signal and TTL). Needs PostgreSQL
//! on 127.0.0.1:5432 (`.ci/run` starts it) and Dovecot (`scripts/install-deps`).

#[path = "../tests/common/cluster.rs"]
mod cluster;
#[path = "../../../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cluster::{WATCHES, exec_runs, now};
use inboxd_testbed::PgDatabase;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let ttls: Vec<u64> = env("INBOXD_BENCH_FAILOVER_TTLS", "2,15")
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .filter(|&t| t > 0)
        .collect();
    let rounds: usize = env("INBOXD_BENCH_FAILOVER_ROUNDS", "3").parse().unwrap_or(3);
    println!(
        "(f) failover: 3 instances, {WATCHES} watches on PostgreSQL leases; from the signal to the first delivery by a new owner, {rounds} round(s) each"
    );
    for ttl in ttls {
        run(Duration::from_secs(ttl), rounds);
    }
}

fn run(ttl: Duration, rounds: usize) {
    // Every part lives to the end of the run (the Dovecot and the folder most of all).
    let cluster::Bed {
        dv: _dv,
        dir: _dir,
        mail,
        log,
        mut cluster,
    } = cluster::bed(
        ttl,
        Duration::from_secs(30).max(ttl * 5),
        PgDatabase::create().expect("PostgreSQL on 127.0.0.1:5432"),
        |_, url| url.to_string(),
    );
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.wait_shares(&[10, 10, 10], "three instances start");
    let mut times = [
        (libc::SIGKILL, "SIGKILL", Vec::new()),
        (libc::SIGSTOP, "SIGSTOP", Vec::new()),
    ];
    for round in 0..rounds {
        for (signal, _, took) in times.iter_mut() {
            let i = round % 3;
            let pid = cluster.pid(i);
            let folders: HashSet<String> = cluster.owners()[&pid].iter().cloned().collect();
            let at = now();
            cluster.signal(i, *signal);
            for f in &folders {
                mail.drop_one(f[1..].parse().unwrap());
            }
            let deadline = Instant::now() + ttl * 3 + Duration::from_secs(30);
            let first = loop {
                let first = exec_runs(&log)
                    .into_iter()
                    .filter(|r| r.0 > at && r.1 != pid && folders.contains(&r.2))
                    .map(|r| r.0)
                    .fold(f64::INFINITY, f64::min);
                if first.is_finite() {
                    break first;
                }
                assert!(Instant::now() < deadline, "no new owner delivered from {folders:?}");
                std::thread::sleep(Duration::from_millis(20));
            };
            took.push(first - at);
            if *signal == libc::SIGKILL {
                if let Some(mut c) = cluster.children[i].take() {
                    let _ = c.wait();
                }
                cluster.start(i);
            } else {
                cluster.signal(i, libc::SIGCONT);
            }
            cluster.wait_shares(&[10, 10, 10], "the instance back");
        }
    }
    for (_, name, took) in &mut times {
        took.sort_by(|a, b| a.total_cmp(b));
        let shown: Vec<String> = took.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "    lease_ttl {:>3} s  {name}: failover {} s (median {:.2} s, max {:.2} s; the lease expires a TTL after its last renewal)",
            ttl.as_secs(),
            shown.join(" "),
            took[took.len() / 2],
            took[took.len() - 1]
        );
    }
}
