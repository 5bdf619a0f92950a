//! Three `inboxd run` processes sharing 30 watches through leases on a PostgreSQL database of
//! their own, with a real Dovecot, a Maildir and an `exec` target: what `tests/cluster.rs`
//! and `benches/failover.rs` both drive.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use inboxd_testbed::{Dovecot, Options, PgDatabase};

use super::support::inboxd_bin;

/// Watches (folders `F00`..`F29`) of the cluster.
pub const WATCHES: usize = 30;

pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

pub struct Cluster {
    pub dir: PathBuf,
    pub db: PgDatabase,
    pub configs: Vec<PathBuf>,
    pub children: Vec<Option<Child>>,
    /// How long `wait_shares` waits before it fails.
    pub patience: Duration,
}

impl Cluster {
    pub fn start(&mut self, i: usize) {
        let log = std::fs::File::create(self.dir.join(format!("instance{i}.log"))).unwrap();
        let child = inboxd_bin()
            .args(["run", "-c"])
            .arg(&self.configs[i])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().unwrap().id()
    }

    pub fn signal(&self, i: usize, sig: i32) {
        unsafe { libc::kill(self.pid(i) as i32, sig) };
    }

    pub fn kill(&mut self, i: usize) {
        self.signal(i, libc::SIGKILL);
        self.children[i].take().unwrap().wait().unwrap();
    }

    pub fn terminate(&mut self, i: usize) {
        self.signal(i, libc::SIGTERM);
        let status = self.children[i].take().unwrap().wait().unwrap();
        assert!(status.success(), "instance {i} ended with {status}");
    }

    /// Live leases per owner pid.
    pub fn owners(&self) -> BTreeMap<u32, Vec<String>> {
        let rows = self
            .db
            .sql("SELECT owner, folder FROM leases WHERE owner IS NOT NULL AND expires_at > now() ORDER BY folder")
            // No table yet: no instance has migrated the database so far.
            .unwrap_or_default();
        let mut by: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for line in rows.lines().filter(|l| !l.is_empty()) {
            let (owner, folder) = line.split_once('|').unwrap();
            let pid = owner.split('-').next().unwrap().parse().unwrap();
            by.entry(pid).or_default().push(folder.to_string());
        }
        by
    }

    /// When `pid` took each watch it holds now (unix seconds, the database's clock: this
    /// machine's).
    pub fn acquired(&self, pid: u32) -> HashMap<String, f64> {
        let rows = self
            .db
            .sql(&format!(
                "SELECT folder, EXTRACT(EPOCH FROM acquired_at) FROM leases WHERE owner LIKE '{pid}-%' AND expires_at > now()"
            ))
            .unwrap();
        rows.lines()
            .filter_map(|l| l.split_once('|'))
            .map(|(f, t)| (f.to_string(), t.parse().unwrap()))
            .collect()
    }

    /// Runs by `pid` after `since` of watches it held before (`folders`) that no lease of it
    /// covers: it had lost the watch, and delivered anyway.
    pub fn stale_runs(&self, runs: &[Run], pid: u32, since: f64, folders: &HashSet<String>) -> Vec<Run> {
        let now_held = self.acquired(pid);
        runs.iter()
            .filter(|r| r.1 == pid && r.0 > since && folders.contains(&r.2))
            .filter(|r| now_held.get(&r.2).is_none_or(|&taken| r.0 < taken))
            .cloned()
            .collect()
    }

    /// Waits until the live instances hold `shares` watches each (in any order).
    pub fn wait_shares(&self, shares: &[usize], what: &str) -> Duration {
        let t = Instant::now();
        loop {
            let owners = self.owners();
            let mut got: Vec<usize> = owners.values().map(Vec::len).collect();
            got.sort_unstable();
            let mut want = shares.to_vec();
            want.sort_unstable();
            if got == want {
                return t.elapsed();
            }
            assert!(t.elapsed() < self.patience, "{what}: shares {got:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Drops messages into the folders, as an MDA would; remembers every one.
pub struct Mail {
    pub dv: Arc<Dovecot>,
    pub sent: Arc<AtomicUsize>,
}

impl Mail {
    pub fn drop_one(&self, folder: usize) {
        let n = self.sent.fetch_add(1, Ordering::SeqCst);
        let msg = inboxd_testbed::sample_message(n, "cluster", 300);
        self.dv
            .drop_message_with("alice", &format!("F{folder:02}"), n, msg.len() as u64, |f| {
                f.write_all(&msg)
            })
            .unwrap();
    }

    pub fn burst(&self, n: usize) {
        for i in 0..n {
            self.drop_one(i % WATCHES);
        }
    }
}

/// One `exec` run: (unix time, inboxd's pid, folder, key).
pub type Run = (f64, u32, String, String);

pub fn exec_runs(log: &Path) -> Vec<Run> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split(' ');
            Some((
                p.next()?.parse().ok()?,
                p.next()?.parse().ok()?,
                p.next()?.to_string(),
                p.next()?.to_string(),
            ))
        })
        .collect()
}

/// An instance's config: the 30 watches of the cluster on `state`, each into the shared
/// Maildir `out` and an `exec` that appends `<unix time> <inboxd's pid> <folder> <key>` to `log`.
pub fn instance_config(state: &str, ttl: Duration, dv: &Dovecot, log: &Path) -> String {
    let mut watches = String::new();
    for f in 0..WATCHES {
        watches.push_str(&format!(
            "[[watch]]\naccount = \"t\"\nfolder = \"F{f:02}\"\nstart = \"all\"\ndeliver = [\"box\", \"log\"]\n\n"
        ));
    }
    format!(
        r#"state = "{state}"
lease_ttl = "{ttl}s"

[accounts.t]
host = "127.0.0.1"
port = {port}
tls = "starttls"
ca_file = "{ca}"
user = "alice"
password = "alicepw"
reconnect = [ {{ every = "500ms" }} ]

[targets.box]
maildir = "out"

[targets.log]
exec = ["sh", "-c", "echo $(date +%s.%N) $PPID $INBOXD_FOLDER $INBOXD_KEY >> {log}"]

{watches}"#,
        ttl = ttl.as_secs(),
        port = dv.port,
        ca = dv.ca_file().display(),
        log = log.display(),
    )
}

/// A cluster ready to start: a Dovecot whose 30 folders hold a message each, the instances'
/// configs on `db` (`url_for(i, url)` gives instance `i` its URL), the shared Maildir and the
/// `exec` log in `dir`.
pub struct Bed {
    pub dv: Arc<Dovecot>,
    pub dir: tempfile::TempDir,
    pub mail: Mail,
    pub log: PathBuf,
    pub cluster: Cluster,
}

pub fn bed(ttl: Duration, patience: Duration, db: PgDatabase, url_for: impl Fn(usize, &str) -> String) -> Bed {
    let dv = Arc::new(
        Dovecot::start_with(Options {
            // A stopped instance keeps its IMAP sessions while another takes its watches.
            max_userip_connections: Some(200),
            ..Options::default()
        })
        .expect("dovecot (scripts/install-deps installs it)"),
    );
    let dir = tempfile::tempdir().unwrap();
    let mail = Mail {
        dv: dv.clone(),
        sent: Arc::new(AtomicUsize::new(0)),
    };
    // Every folder exists, with one message, before the instances start.
    for f in 0..WATCHES {
        mail.drop_one(f);
    }
    let log = dir.path().join("exec.log");
    let configs = (0..3)
        .map(|i| {
            let path = dir.path().join(format!("instance{i}.toml"));
            std::fs::write(&path, instance_config(&url_for(i, db.url()), ttl, &dv, &log)).unwrap();
            path
        })
        .collect();
    let cluster = Cluster {
        dir: dir.path().to_path_buf(),
        db,
        configs,
        children: vec![None, None, None],
        patience,
    };
    Bed {
        dv,
        dir,
        mail,
        log,
        cluster,
    }
}
