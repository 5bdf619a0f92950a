//! Benchmarks against a local Dovecot, printed as figures (never asserted):
//!
//! (a) new-mail latency, APPEND done -> handler started, p50/p99, next to a raw IDLE client's
//!     latency (Dovecot's own floor) measured on the same messages in the same run;
//! (b) catch-up of a 10,000-message backlog (~5 KB each) into a Maildir, messages/s and MB/s,
//!     next to a raw `UID FETCH 1:* BODY.PEEK[]` read of the same folder;
//! (c) one large message (100 MB, then 1 GB) delivered into a Maildir by a separate process
//!     running `inboxd once` (this binary re-executed, so its memory is the daemon's alone):
//!     peak RSS and throughput, next to a raw `UID FETCH n BODY.PEEK[]` read of it.
//!
//! (d) catch-up of 10,000 x 5 KB into each target (NATS JetStream, Redis stream, webhook), as
//!     `inboxd.message.v1` JSON, next to a minimal raw client of the same target fed the same
//!     messages' bytes (NATS: publish all, acks awaited per 200; Redis: one XADD at a time;
//!     webhook: one POST at a time on a kept-alive connection), each against a server of its own.
//!
//!
//! (e) many watches in one process: N IDLE watches over implicit TLS (one per folder, in a
//!     process of its own: this binary re-executed), against the same with one watch: RSS per
//!     watched mailbox above the one-watch process, idle CPU over 10 s, time until all are
//!     idle with the staggered start, and new-mail latency (APPEND OK -> file in the Maildir)
//!     into random folders, next to the one-watch process's.
//!
//! Run: `cargo bench --bench throughput` (env: INBOXD_BENCH_MESSAGES=200,
//! INBOXD_BENCH_BACKLOG=10000, INBOXD_BENCH_LARGE_MB=100,1000, INBOXD_BENCH_TARGETS=10000,
//! INBOXD_BENCH_ONLY=nats,redis,webhook, INBOXD_BENCH_WATCHES=1000;
//! 0 skips a part; INBOXD_BENCH_EXEC_ONLY=1 runs only (a)'s exec part, on Dovecot;
//! INBOXD_BENCH_TAP=1 puts (a)'s exec clients behind relays to print their own times).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use inboxd::config::{Account, Config, TlsMode};
use inboxd::handler::{Handler, HandlerError, Message};
use inboxd::imap::Session;
use inboxd::watcher::{Event, Mode, Watcher};
use inboxd_testbed::{self as testbed, Dovecot};
use tokio::sync::mpsc;

/// A minimal blocking IMAP client on a plain loopback socket: the floor to compare against.
struct Raw {
    r: BufReader<TcpStream>,
    w: TcpStream,
    tag: u32,
}

impl Raw {
    fn connect(dv: &Dovecot) -> Raw {
        Raw::connect_port(dv.port, "alice")
    }

    /// Logs in as `user` (password `alicepw`, as on every test bed server).
    fn connect_port(port: u16, user: &str) -> Raw {
        Raw::connect_as(port, user, "alicepw")
    }

    fn connect_as(port: u16, user: &str, password: &str) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut raw = Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            tag: 0,
        };
        raw.line();
        raw.cmd(&format!("LOGIN {user} {password}"));
        raw
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "server closed");
        l
    }

    /// Sends a command and reads to its tagged response, skipping literals; returns the bytes
    /// of literal data seen.
    fn cmd(&mut self, c: &str) -> u64 {
        self.cmd_into(c, &mut std::io::sink())
    }

    /// Appends a message to a folder (a synchronizing literal), to its tagged OK.
    fn append(&mut self, folder: &str, msg: &[u8]) {
        self.tag += 1;
        let tag = format!("R{}", self.tag);
        write!(self.w, "{tag} APPEND \"{folder}\" {{{}}}\r\n", msg.len()).unwrap();
        let go = self.line();
        assert!(go.starts_with('+'), "APPEND: {go}");
        self.w.write_all(msg).unwrap();
        self.w.write_all(b"\r\n").unwrap();
        loop {
            let l = self.line();
            if l.starts_with(&tag) {
                assert!(l[tag.len()..].trim_start().starts_with("OK"), "APPEND: {l}");
                return;
            }
        }
    }

    /// As `cmd`, handing each literal to `each` as it arrives.
    fn cmd_each(&mut self, c: &str, mut each: impl FnMut(Vec<u8>)) {
        self.cmd_with(c, |r, n| {
            let mut buf = vec![0; n as usize];
            r.read_exact(&mut buf).unwrap();
            each(buf);
        });
    }

    /// As `cmd`, writing literal data to `out`.
    fn cmd_into(&mut self, c: &str, out: &mut dyn Write) -> u64 {
        let mut bytes = 0u64;
        self.cmd_with(c, |r, n| {
            std::io::copy(&mut r.take(n), out).unwrap();
            bytes += n;
        });
        bytes
    }

    /// Sends a command in one write and reads to its tagged answer (literals skipped): the
    /// time it took if the answer was OK.
    fn timed(&mut self, c: &str) -> Option<f64> {
        self.tag += 1;
        let tag = format!("R{}", self.tag);
        let t = Instant::now();
        self.w.write_all(format!("{tag} {c}\r\n").as_bytes()).unwrap();
        loop {
            let l = self.line();
            if let Some(n) = l
                .trim_end()
                .strip_suffix('}')
                .and_then(|x| x.rsplit('{').next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink()).unwrap();
                continue;
            }
            if l.starts_with(&tag) {
                let ok = l[tag.len()..].trim_start().starts_with("OK");
                return ok.then(|| t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }

    /// Sends a command and reads to its tagged OK; `literal` reads each literal of `n` bytes.
    fn cmd_with(&mut self, c: &str, mut literal: impl FnMut(&mut BufReader<TcpStream>, u64)) {
        self.tag += 1;
        let tag = format!("R{}", self.tag);
        write!(self.w, "{tag} {c}\r\n").unwrap();
        loop {
            let l = self.line();
            if let Some(n) = l
                .trim_end()
                .strip_suffix('}')
                .and_then(|x| x.rsplit('{').next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                literal(&mut self.r, n);
                continue;
            }
            if l.starts_with(&tag) {
                assert!(l[tag.len()..].trim_start().starts_with("OK"), "{c}: {l}");
                return;
            }
        }
    }
}

struct Signal(mpsc::UnboundedSender<(u32, Instant)>);

impl Handler for Signal {
    fn deliver<'a>(&'a mut self, m: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        let _ = self.0.send((m.uid, Instant::now()));
        Box::pin(async { Ok(()) })
    }
}

/// `list_window = N` for (b) and (d) from `INBOXD_BENCH_LIST_WINDOW` (to compare listing
/// windows with one listing of the whole backlog, in separate runs); else the default.
fn list_window() -> String {
    match std::env::var("INBOXD_BENCH_LIST_WINDOW") {
        Ok(n) => format!("list_window = {n}\n"),
        Err(_) => String::new(),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn config(dv: &Dovecot, dir: &std::path::Path, watch: &str) -> Config {
    config_on(dv.port, "alice", dir, watch)
}

fn config_on(port: u16, user: &str, dir: &std::path::Path, watch: &str) -> Config {
    let text = format!(
        "state = \"state.db\"\n[accounts.b]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nuser = \"{user}\"\npassword = \"alicepw\"\n[[watch]]\naccount = \"b\"\n{watch}\n"
    );
    let p = dir.join("inboxd.toml");
    std::fs::write(&p, text).unwrap();
    Config::load(&p).unwrap()
}

/// (a) on every server the test bed can start: Dovecot, and Cyrus and Courier where they are
/// installed and this is root.
async fn latency(n: usize) {
    println!("(a) new-mail latency, APPEND OK -> handler started, {n} messages, plain loopback");
    let dv = Dovecot::start().unwrap();
    // INBOXD_BENCH_EXEC_ONLY=1: the exec part alone (what the issue's goal is measured on).
    if std::env::var("INBOXD_BENCH_EXEC_ONLY").is_ok_and(|v| v == "1") {
        exec_latency_on(dv.port, n).await;
        command_times(dv.port, "alice");
        return;
    }
    latency_on("Dovecot", dv.port, "alice", n).await;
    exec_latency_on(dv.port, n.min(100)).await;
    drop(dv);
    match testbed::cyrus_available() {
        Ok(()) => {
            let cyrus = testbed::Cyrus::start().unwrap();
            latency_on("Cyrus (idled)", cyrus.port, "alice", n).await;
        }
        Err(why) => println!("    Cyrus: not measured: {why}"),
    }
    match testbed::courier_available() {
        Ok(()) => {
            let courier = testbed::Courier::start().unwrap();
            latency_on("Courier (IDLE checks every 1 s)", courier.port, &courier.user, n).await;
        }
        Err(why) => println!("    Courier: not measured: {why}"),
    }
}

async fn latency_on(server: &str, port: u16, user: &str, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_on(port, user, dir.path(), "deliver = { maildir = \"out\" }");
    let store = inboxd::store::open(&cfg.state).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let w = Watcher::with_handler(cfg.watches[0].clone(), store, Box::new(Signal(tx)), Mode::Forever);
    let mut ev = w.subscribe();
    while !matches!(ev.recv().await, Ok(Event::CaughtUp { .. })) {}

    // The raw IDLE client runs on its own thread and reports when it saw each EXISTS.
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel();
    raw_idle(port, user, "INBOX", move || raw_tx.send(Instant::now()).is_ok());

    let mut account = Account::new(
        "s",
        "127.0.0.1",
        port,
        TlsMode::None,
        user,
        inboxd::secret::SecretSource::Literal(inboxd::secret::Secret::new("alicepw")),
    );
    account.timeouts.command = Duration::from_secs(30);
    let mut sender = Session::open(&account).await.unwrap();
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for i in 0..n {
        let msg = testbed::sample_message(i, "latency", 1000);
        sender.append("INBOX", &msg).await.unwrap();
        let done = Instant::now();
        let (_, handled) = rx.recv().await.unwrap();
        let seen = raw_rx.recv().await.unwrap();
        ours.push(handled.duration_since(done).as_secs_f64() * 1e3);
        floor.push(seen.duration_since(done).as_secs_f64() * 1e3);
        // Let Dovecot's 500 ms notify timer (and Cyrus's idled) settle: independent samples,
        // at a random phase of a polling server's 1-second check (inboxd enters IDLE anew
        // after each delivery, the raw client stays in it: a fixed spacing would favour one).
        tokio::time::sleep(Duration::from_millis(600 + fastrand::u64(..1000))).await;
    }
    sender.logout().await;
    w.stop().await.unwrap();
    let (o50, o99, f50, f99) = (
        pct(&mut ours, 0.5),
        pct(&mut ours, 0.99),
        pct(&mut floor, 0.5),
        pct(&mut floor, 0.99),
    );
    println!("    {server}");
    println!("    inboxd      p50 {o50:8.2} ms   p99 {o99:8.2} ms");
    println!("    raw IDLE    p50 {f50:8.2} ms   p99 {f99:8.2} ms   (the server's floor: EXISTS seen)");
    println!("    overhead    p50 {:8.2} ms   p99 {:8.2} ms", o50 - f50, o99 - f99);
    command_times(port, user);
}

/// What each command of the wake path costs on this server (median of 20, a raw client with
/// the folder selected, each command in one write): where a wake's time goes on the server's
/// side, and what a STATUS of the selected folder would cost in place of a SELECT.
fn command_times(port: u16, user: &str) {
    let mut raw = Raw::connect_port(port, user);
    raw.cmd("SELECT INBOX");
    let mut time = |c: &str| {
        let mut v: Vec<f64> = (0..20).filter_map(|_| raw.timed(c)).collect();
        if v.is_empty() {
            "refused".to_string()
        } else {
            format!("{:.2} ms", pct(&mut v, 0.5))
        }
    };
    let select = time("SELECT INBOX");
    let status = time("STATUS INBOX (UIDNEXT UIDVALIDITY)");
    let noop = time("NOOP");
    let list = time("UID FETCH * (UID RFC822.SIZE INTERNALDATE FLAGS)");
    let fetch = time("UID FETCH * (UID BODY.PEEK[])");
    // Last: it leaves the folder selected read-only.
    let examine = time("EXAMINE INBOX");
    println!(
        "    commands    SELECT {select}, EXAMINE {examine}, STATUS (UIDNEXT UIDVALIDITY) of the selected folder {status}, NOOP {noop}, listing of the newest message {list}, its body {fetch}"
    );
}

/// Unix time in microseconds: the probe program and the bench compare it across processes.
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// `--probe FILE --notify PORT`: the `exec` handler of (a)'s second part. Notes when it
/// started, tells the bench with a datagram to PORT (so the bench waits without polling the
/// file, which took CPU from the client measured), then reads the message (as a handler would).
fn probe(file: &std::path::Path, notify: Option<u16>) {
    let at = unix_micros();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap();
    writeln!(f, "{at}").unwrap();
    drop(f);
    if let Some(port) = notify {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"x", ("127.0.0.1", port)).unwrap();
    }
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
}

/// A socket the probes' datagrams come to (see [`probe`]).
async fn probe_socket() -> (tokio::net::UdpSocket, u16) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// Waits for a probe's datagram on `s`, at most 20 s; false if none came.
async fn probed(s: &tokio::net::UdpSocket) -> bool {
    let mut b = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(20), s.recv(&mut b))
        .await
        .is_ok()
}

/// Whether (a)'s exec part runs inboxd and fetchmail behind [`exists_tap`] relays
/// (`INBOXD_BENCH_TAP=1`) to print their own times: the relay adds its hops to their path
/// (not to the raw clients'), so by default they talk to the server directly.
fn tapped() -> bool {
    std::env::var("INBOXD_BENCH_TAP").is_ok_and(|v| v == "1")
}

fn probes(file: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// (a) with an `exec` handler (this binary's `--probe`): APPEND OK -> the program started,
/// next to the raw IDLE client and to what starting the same program with the message on its
/// stdin costs a trivial parent (this bench, `std::process::Command`), per message.
async fn exec_latency_on(port: u16, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.log");
    let exe = std::env::current_exe().unwrap();
    let (probed_socket, notify) = probe_socket().await;
    // With INBOXD_BENCH_TAP=1, inboxd and fetchmail each talk to the server through a tap
    // that notes when an EXISTS passes to them in IDLE: the program's start minus that is the
    // client's own time, free of how late the server told this session rather than another.
    let (tap_port, mut tap) = exists_tap(port).await;
    config_on(
        if tapped() { tap_port } else { port },
        "alice",
        dir.path(),
        &format!(
            "folder = \"Exec\"\ndeliver = {{ exec = [\"{}\", \"--probe\", \"{}\", \"--notify\", \"{notify}\"] }}",
            exe.display(),
            file.display()
        ),
    );
    let mut account = Account::new(
        "s",
        "127.0.0.1",
        port,
        TlsMode::None,
        "alice",
        inboxd::secret::SecretSource::Literal(inboxd::secret::Secret::new("alicepw")),
    );
    account.timeouts.command = Duration::from_secs(30);
    let mut sender = Session::open(&account).await.unwrap();
    let _ = sender.create("Exec").await;
    // inboxd in a process of its own, as `inboxd run` (the bench's runtime also carries the
    // sender and the taps).
    let mut daemon = ChildRun::start(&exe, &dir.path().join("inboxd.toml"));

    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel();
    raw_idle(port, "alice", "Exec", move || raw_tx.send(unix_micros()).is_ok());
    // A second raw client on the same folder: how far two identical sessions are told apart by
    // the server (the noise in any comparison of two sessions' latencies).
    let (raw2_tx, mut raw2_rx) = mpsc::unbounded_channel();
    raw_idle(port, "alice", "Exec", move || raw2_tx.send(unix_micros()).is_ok());
    let mut twin = Vec::new();
    // fetchmail, the peer, in IDLE on a folder of its own with the same program as its MDA;
    // messages alternate between the two folders, each with a raw IDLE client of its own.
    let mut peer = Fetchmail::start(port, dir.path(), &exe, &mut sender).await;
    let notify_arg = notify.to_string();
    let trivial = dir.path().join("trivial.log");
    let (mut ours, mut floor, mut start, mut diffs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut own = Vec::new();
    for i in 0..n {
        if let Some(p) = peer.as_mut() {
            p.sample(&mut sender, i).await;
            tokio::time::sleep(Duration::from_millis(600 + fastrand::u64(..1000))).await;
        }
        let msg = testbed::sample_message(i, "exec latency", 1000);
        while tap.try_recv().is_ok() {}
        sender.append("Exec", &msg).await.unwrap();
        let done = unix_micros();
        assert!(probed(&probed_socket).await, "the exec handler did not run");
        let started = probes(&file)[i];
        let seen = raw_rx.recv().await.unwrap();
        let seen2 = raw2_rx.recv().await.unwrap();
        twin.push((seen2 as f64 - seen as f64) / 1e3);
        ours.push(started.saturating_sub(done) as f64 / 1e3);
        floor.push(seen.saturating_sub(done) as f64 / 1e3);
        diffs.push((started as f64 - seen as f64) / 1e3);
        if tapped()
            && let Ok(Some(told)) = tokio::time::timeout(Duration::from_secs(5), tap.recv()).await
        {
            own.push(started.saturating_sub(told) as f64 / 1e3);
        }
        // The same program started by a trivial parent, the message on its stdin.
        let before = unix_micros();
        let mut child = std::process::Command::new(&exe)
            .arg("--probe")
            .arg(&trivial)
            .args(["--notify", &notify_arg])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&msg).unwrap();
        child.wait().unwrap();
        assert!(probed(&probed_socket).await);
        start.push(probes(&trivial)[i].saturating_sub(before) as f64 / 1e3);
        tokio::time::sleep(Duration::from_millis(600 + fastrand::u64(..1000))).await;
    }
    sender.logout().await;
    daemon.stop();
    let (o50, o99, f50, f99, s50, s99) = (
        pct(&mut ours, 0.5),
        pct(&mut ours, 0.99),
        pct(&mut floor, 0.5),
        pct(&mut floor, 0.99),
        pct(&mut start, 0.5),
        pct(&mut start, 0.99),
    );
    println!("    Dovecot, exec handler (APPEND OK -> the program started), {n} messages");
    println!("    inboxd      p50 {o50:8.2} ms   p99 {o99:8.2} ms");
    println!("    raw IDLE    p50 {f50:8.2} ms   p99 {f99:8.2} ms   (EXISTS seen)");
    println!("    exec start  p50 {s50:8.2} ms   p99 {s99:8.2} ms   (the same program started by a trivial parent)");
    println!(
        "    overhead    p50 {:8.2} ms, of which beyond starting the program {:.2} ms (goal: at most 1 ms)",
        o50 - f50,
        o50 - f50 - s50
    );
    println!(
        "                (per message, program started minus EXISTS seen by the raw client: p50 {:.2} ms)",
        pct(&mut diffs, 0.5)
    );
    let mut spread: Vec<f64> = twin.iter().map(|d| d.abs()).collect();
    println!(
        "    a second raw IDLE client on the same folder: EXISTS seen {:+.2} ms after the first at the median (|difference| p50 {:.2}, p90 {:.2} ms)",
        pct(&mut twin, 0.5),
        pct(&mut spread, 0.5),
        pct(&mut spread, 0.9)
    );
    let (w50, w99) = if own.is_empty() {
        println!(
            "    inboxd and fetchmail talk to the server directly (INBOXD_BENCH_TAP=1: through relays, to print their own times)"
        );
        (f64::NAN, f64::NAN)
    } else {
        let (w50, w99) = (pct(&mut own, 0.5), pct(&mut own, 0.99));
        println!(
            "    inboxd's own: EXISTS passed to it in IDLE (through a relay) -> the program started: p50 {w50:.2} ms, p99 {w99:.2} ms; beyond starting the program {:.2} ms",
            w50 - s50
        );
        (w50, w99)
    };
    match peer {
        Some(mut p) => {
            let (p50, p99, r50, r99) = (
                pct(&mut p.seen, 0.5),
                pct(&mut p.seen, 0.99),
                pct(&mut p.floor, 0.5),
                pct(&mut p.floor, 0.99),
            );
            let over: Vec<f64> = p.seen.iter().zip(&p.floor).map(|(a, b)| a - b).collect();
            println!(
                "    fetchmail   p50 {p50:8.2} ms   p99 {p99:8.2} ms   (IDLE, the same program as its mda, alternate messages)"
            );
            println!("    raw IDLE    p50 {r50:8.2} ms   p99 {r99:8.2} ms   (on fetchmail's folder)");
            println!(
                "    overhead    p50 {:8.2} ms (fetchmail) vs {:.2} ms (inboxd)   [{} samples each]",
                p50 - r50,
                o50 - f50,
                over.len()
            );
            println!(
                "                (per message: p50 {:.2} ms (fetchmail) vs {:.2} ms (inboxd))",
                pct(&mut p.diffs, 0.5),
                pct(&mut diffs, 0.5)
            );
            if !p.own.is_empty() {
                let (q50, q99) = (pct(&mut p.own, 0.5), pct(&mut p.own, 0.99));
                println!(
                    "    own time (EXISTS passed in IDLE -> program started): fetchmail p50 {q50:.2} / p99 {q99:.2} ms, inboxd p50 {w50:.2} / p99 {w99:.2} ms"
                );
            }
            p.stop();
        }
        None => println!("    fetchmail: not measured (scripts/install-deps installs it)"),
    }
}

/// A TCP relay to the server on `server` that sends, on the returned channel, the time each
/// chunk holding `EXISTS` passes to a client that is in IDLE (it sent `IDLE` and not yet
/// `DONE`); an EXISTS answering a SELECT is not news. One relay per client, each connection
/// forwarded as it comes.
async fn exists_tap(server: u16) -> (u16, mpsc::UnboundedReceiver<u64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", server)).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let idling = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            let up = idling.clone();
            tokio::spawn(pump(cr, uw, move |chunk| {
                if chunk.windows(6).any(|w| w.eq_ignore_ascii_case(b" IDLE\r")) {
                    up.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                if chunk.windows(4).any(|w| w.eq_ignore_ascii_case(b"DONE")) {
                    up.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }));
            let tx = tx.clone();
            tokio::spawn(pump(ur, cw, move |chunk| {
                if idling.load(std::sync::atomic::Ordering::SeqCst) && chunk.windows(6).any(|w| w == b"EXISTS") {
                    let _ = tx.send(unix_micros());
                }
            }));
        }
    });
    (port, rx)
}

/// Copies `from` to `to` until either ends, showing each chunk to `look` before it passes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut look: impl FnMut(&[u8]),
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        look(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// fetchmail 6 in IDLE (`-N -d`, `idle`, `keep`) on folder `Fetchmail`, with the bench's
/// `--probe` as its MDA (fetchmail runs an MDA through `/bin/sh`, as its users configure it).
struct Fetchmail {
    child: std::process::Child,
    probes: std::path::PathBuf,
    probed: tokio::net::UdpSocket,
    raw: mpsc::UnboundedReceiver<u64>,
    seen: Vec<f64>,
    floor: Vec<f64>,
    diffs: Vec<f64>,
    tap: mpsc::UnboundedReceiver<u64>,
    own: Vec<f64>,
    n: usize,
}

impl Fetchmail {
    async fn start(
        server: u16,
        dir: &std::path::Path,
        exe: &std::path::Path,
        sender: &mut Session,
    ) -> Option<Fetchmail> {
        use std::os::unix::fs::PermissionsExt;
        if std::process::Command::new("fetchmail")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_err()
        {
            return None;
        }
        let _ = sender.create("Fetchmail").await;
        let (tap_port, tap) = exists_tap(server).await;
        let port = if tapped() { tap_port } else { server };
        let (probed, notify) = probe_socket().await;
        let home = dir.join("fetchmail");
        std::fs::create_dir_all(&home).unwrap();
        let probes = home.join("probe.log");
        let rc = home.join("fetchmailrc");
        std::fs::write(
            &rc,
            format!(
                "set no bouncemail\nset no syslog\npoll 127.0.0.1 with proto IMAP port {port} auth password\n  user \"alice\" there with password \"alicepw\"\n  folder \"Fetchmail\" keep idle sslproto ''\n  mda \"{} --probe {} --notify {notify}\"\n",
                exe.display(),
                probes.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
        let child = std::process::Command::new("fetchmail")
            .args(["-N", "-d", "300", "-f"])
            .arg(&rc)
            .arg("--pidfile")
            .arg(home.join("fetchmail.pid"))
            .env("HOME", &home)
            .env("FETCHMAILHOME", &home)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(home.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let (tx, raw) = mpsc::unbounded_channel();
        raw_idle(server, "alice", "Fetchmail", move || tx.send(unix_micros()).is_ok());
        let mut p = Fetchmail {
            child,
            probes,
            probed,
            raw,
            seen: Vec::new(),
            floor: Vec::new(),
            diffs: Vec::new(),
            tap,
            own: Vec::new(),
            n: 0,
        };
        // A first message shows fetchmail is up and idling (it enters IDLE again after it).
        p.sample(sender, usize::MAX).await;
        p.seen.clear();
        p.floor.clear();
        p.diffs.clear();
        p.own.clear();
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(p)
    }

    async fn sample(&mut self, sender: &mut Session, i: usize) {
        let msg = testbed::sample_message(i.min(1_000_000), "fetchmail latency", 1000);
        while self.tap.try_recv().is_ok() {}
        sender.append("Fetchmail", &msg).await.unwrap();
        let done = unix_micros();
        if !probed(&self.probed).await {
            let log = std::fs::read_to_string(self.probes.with_file_name("stderr.log")).unwrap_or_default();
            panic!("fetchmail did not run its mda: {log}");
        }
        let started = probes(&self.probes)[self.n];
        self.n += 1;
        let seen = self.raw.recv().await.unwrap();
        self.seen.push(started.saturating_sub(done) as f64 / 1e3);
        self.floor.push(seen.saturating_sub(done) as f64 / 1e3);
        self.diffs.push((started as f64 - seen as f64) / 1e3);
        if tapped()
            && let Ok(Some(told)) = tokio::time::timeout(Duration::from_secs(5), self.tap.recv()).await
        {
            self.own.push(started.saturating_sub(told) as f64 / 1e3);
        }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn catch_up(n: usize) {
    let dv = Dovecot::start().unwrap();
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| testbed::sample_message(i, "backlog", 5000)).collect();
    let total: usize = msgs.iter().map(Vec::len).sum();
    dv.drop_messages("alice", "INBOX", &msgs).unwrap();
    // Index the folder once so neither reader pays for Dovecot's first scan.
    let mut raw = Raw::connect(&dv);
    let t = Instant::now();
    raw.cmd("SELECT INBOX");
    let index = t.elapsed();
    let t = Instant::now();
    let bytes = raw.cmd("UID FETCH 1:* BODY.PEEK[]");
    let raw_time = t.elapsed().as_secs_f64();
    raw.cmd("LOGOUT");
    assert_eq!(bytes as usize, total);

    // INBOXD_BENCH_CATCHUP_BATCH: the watch's batch_size here (500 unless set).
    let catch_up_batch: usize = std::env::var("INBOXD_BENCH_CATCHUP_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &dv,
        dir.path(),
        &format!(
            "start = \"all\"\nbatch_size = {catch_up_batch}\n{}deliver = {{ maildir = \"out\" }}",
            list_window()
        ),
    );
    let store = inboxd::store::open(&cfg.state).await.unwrap();
    let t = Instant::now();
    Watcher::start(cfg.watches[0].clone(), store, Mode::Once)
        .unwrap()
        .join()
        .await
        .unwrap();
    let ours = t.elapsed().as_secs_f64();
    let delivered = std::fs::read_dir(dir.path().join("out/new")).unwrap().count();
    assert_eq!(delivered, n);

    // The durability alone: the same messages written as files, each fsynced, in 16 threads,
    // then renamed into new/ and new/ fsynced (as inboxd's flush does it), no IMAP and no bookkeeping: the floor of any
    // delivery into a Maildir that keeps "every file on disk before the checkpoint moves".
    let floor_dir = tempfile::tempdir().unwrap();
    let (tmp, new) = (floor_dir.path().join("tmp"), floor_dir.path().join("new"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    let t = Instant::now();
    let chunk = msgs.len().div_ceil(16).max(1);
    std::thread::scope(|scope| {
        for (c, part) in msgs.chunks(chunk).enumerate() {
            let tmp = &tmp;
            scope.spawn(move || {
                for (i, m) in part.iter().enumerate() {
                    let mut f = std::fs::File::create(tmp.join(format!("{c}-{i}"))).unwrap();
                    f.write_all(m).unwrap();
                    f.sync_all().unwrap();
                }
            });
        }
    });
    for (c, part) in msgs.chunks(chunk).enumerate() {
        for i in 0..part.len() {
            let name = format!("{c}-{i}");
            std::fs::rename(tmp.join(&name), new.join(&name)).unwrap();
        }
    }
    std::fs::File::open(&new).unwrap().sync_all().unwrap();
    let durable = t.elapsed().as_secs_f64();

    let mb = total as f64 / 1e6;
    println!(
        "(b) catch-up of {n} messages ({mb:.1} MB) into a Maildir (fsync per file, per batch dir fsync + checkpoint commit; batch_size {catch_up_batch}, INBOXD_BENCH_CATCHUP_BATCH changes it)"
    );
    println!(
        "    inboxd      {ours:7.3} s   {:9.0} msg/s   {:7.1} MB/s   ({:.0} % of the raw read; {})",
        n as f64 / ours,
        mb / ours,
        100.0 * raw_time / ours,
        match list_window().trim() {
            "" => "list_window = 1000, the default".to_string(),
            set => set.to_string(),
        }
    );
    println!(
        "    raw FETCH   {raw_time:7.3} s   {:9.0} msg/s   {:7.1} MB/s   (pipelined UID FETCH 1:* BODY.PEEK[], no writes)",
        n as f64 / raw_time,
        mb / raw_time
    );
    println!(
        "    write+fsync {durable:7.3} s   {:9.0} msg/s   (the same files written and fsynced in 16 threads, then renamed, no IMAP; measured after inboxd: inboxd at {:.0} % of its rate)",
        n as f64 / durable,
        100.0 * durable / ours
    );
    println!(
        "    (Dovecot's first SELECT indexed the folder in {:.3} s, not counted)",
        index.as_secs_f64()
    );
}

/// Writes a message of exactly `len` bytes: a header, then 76-character text lines.
fn write_large(f: &mut std::fs::File, n: usize, len: u64) -> std::io::Result<()> {
    let mut head = format!(
        "From: sender@example.com\r\nTo: alice@example.com\r\nSubject: large {n}\r\nMessage-ID: <large.{n}@inboxd.test>\r\n\r\n"
    )
    .into_bytes();
    let line = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/ABCDEFGHIJKL\r\n";
    let mut block = Vec::with_capacity(1 << 20);
    while block.len() + line.len() <= 1 << 20 {
        block.extend_from_slice(line);
    }
    let mut left = len;
    let first = head.len().min(left as usize);
    f.write_all(&head[..first])?;
    left -= first as u64;
    head.clear();
    while left > 0 {
        let n = block.len().min(left as usize);
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Runs a child process to its end; returns its wall time and the peak RSS (bytes) it reported
/// for itself (its `VmHWM` after exec: `wait4`'s `ru_maxrss` would count the pages it shared
/// with this process between fork and exec).
fn run_measured(mut cmd: std::process::Command) -> (f64, u64) {
    let t = Instant::now();
    let out = cmd.stderr(std::process::Stdio::inherit()).output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "child failed: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {text:?}"));
    (secs, kb * 1024)
}

fn large(mbs: &[u64]) {
    println!(
        "(c) one large message into a Maildir, `inboxd once` in a process of its own (spool_above 1 MiB, {} MiB pieces)",
        inboxd::watcher::SPOOL_CHUNK >> 20
    );
    for &mb in mbs {
        // A Dovecot of its own per message: uid 1, nothing else in the folder.
        let dv = Dovecot::start().unwrap();
        let len = mb * 1_000_000;
        dv.drop_message_with("alice", "INBOX", 0, len, |f| write_large(f, 0, len))
            .unwrap();
        // The raw reader first (it also lets Dovecot index the message), then inboxd, then
        // the raw reader again: the better raw time is the baseline. The second baseline is
        // the same raw read written to a file and fsynced: the floor of any delivery to disk.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let raw_read = |to_file: bool| {
            let mut raw = Raw::connect(&dv);
            raw.cmd("SELECT INBOX");
            let t = Instant::now();
            let bytes = if to_file {
                let path = dir.path().join("raw");
                let mut f = std::fs::File::create(&path).unwrap();
                let n = raw.cmd_into("UID FETCH 1 BODY.PEEK[]", &mut f);
                f.sync_all().unwrap();
                drop(f);
                std::fs::remove_file(&path).unwrap();
                n
            } else {
                raw.cmd("UID FETCH 1 BODY.PEEK[]")
            };
            let secs = t.elapsed().as_secs_f64();
            raw.cmd("LOGOUT");
            assert_eq!(bytes, len);
            secs
        };
        let raw1 = raw_read(false);
        let disk1 = raw_read(true);
        // The same read in inboxd's pieces: what the pieces cost the server.
        let pieces = {
            let mut raw = Raw::connect(&dv);
            raw.cmd("SELECT INBOX");
            let t = Instant::now();
            let (mut off, piece) = (0u64, u64::from(inboxd::watcher::SPOOL_CHUNK));
            loop {
                let n = raw.cmd(&format!("UID FETCH 1 BODY.PEEK[]<{off}.{piece}>"));
                off += n;
                if n < piece {
                    break;
                }
            }
            raw.cmd("LOGOUT");
            assert_eq!(off, len);
            t.elapsed().as_secs_f64()
        };
        let cfg = config(
            &dv,
            dir.path(),
            "start = \"all\"\nmax_message_size = \"2GB\"\ndeliver = { maildir = \"out\" }",
        );
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.arg("--child-once").arg(&cfg.path);
        let (ours, rss) = run_measured(cmd);
        let raw = raw1.min(raw_read(false));
        let disk = disk1.min(raw_read(true));
        let files: Vec<u64> = std::fs::read_dir(dir.path().join("out/new"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        assert_eq!(files, vec![len], "the Maildir holds {files:?}");
        let mbytes = len as f64 / 1e6;
        println!(
            "    {mb:5} MB   inboxd (process start to exit) {ours:6.2} s {:7.1} MB/s   peak RSS {:6.1} MiB",
            mbytes / ours,
            rss as f64 / (1 << 20) as f64,
        );
        println!(
            "             raw read             {raw:6.2} s {:7.1} MB/s   (inboxd at {:.0} %)",
            mbytes / raw,
            100.0 * raw / ours
        );
        println!(
            "             raw read in pieces   {pieces:6.2} s {:7.1} MB/s   (the same read as {} MiB partial fetches)",
            mbytes / pieces,
            inboxd::watcher::SPOOL_CHUNK >> 20
        );
        println!(
            "             raw read + write + fsync {disk:6.2} s {:7.1} MB/s   (inboxd at {:.0} %)",
            mbytes / disk,
            100.0 * disk / ours
        );
    }
}

/// A webhook receiver that answers 204 and counts, for (d).
async fn sink() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |_body: axum::body::Bytes| {
            let c = c.clone();
            async move {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, count)
}

async fn targets(n: usize) {
    let dv = Dovecot::start().unwrap();
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| testbed::sample_message(i, "target", 5000)).collect();
    dv.drop_messages("alice", "INBOX", &msgs).unwrap();
    let mut raw = Raw::connect(&dv);
    raw.cmd("SELECT INBOX");
    // What reading the messages from IMAP costs at all: a bound for any IMAP-fed target.
    let t = Instant::now();
    raw.cmd("UID FETCH 1:* (UID RFC822.SIZE INTERNALDATE FLAGS)");
    let raw_list = t.elapsed().as_secs_f64();
    let t = Instant::now();
    raw.cmd("UID FETCH 1:* BODY.PEEK[]");
    let raw_read = t.elapsed().as_secs_f64();
    raw.cmd("LOGOUT");
    println!(
        "(d) catch-up of {n} x 5 KB into each target as JSON, next to a raw client of the target fed the same bytes"
    );
    println!(
        "    reading them from Dovecot with a raw pipelined client: listing {raw_list:.2} s + bodies {raw_read:.2} s = {:.2} s",
        raw_list + raw_read
    );
    let batch: usize = std::env::var("INBOXD_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    println!("    (batch_size {batch}; INBOXD_BENCH_BATCH changes it)");
    let run = |deliver: String| {
        let dv = &dv;
        async move {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(
                dv,
                dir.path(),
                &format!(
                    "start = \"all\"\nbatch_size = {batch}\n{}deliver = {deliver}",
                    list_window()
                ),
            );
            let store = inboxd::store::open(&cfg.state).await.unwrap();
            let t = Instant::now();
            let dead = Watcher::start(cfg.watches[0].clone(), store, Mode::Once)
                .unwrap()
                .join()
                .await
                .unwrap();
            assert_eq!(dead, 0);
            t.elapsed().as_secs_f64()
        }
    };
    let line = |name: &str, ours: f64, raw: f64| {
        println!(
            "    {name:8} inboxd {ours:6.2} s {:7.0} msg/s   raw {raw:6.2} s {:7.0} msg/s   (inboxd at {:.0} % of raw)",
            n as f64 / ours,
            n as f64 / raw,
            100.0 * raw / ours
        );
    };

    let only = std::env::var("INBOXD_BENCH_ONLY").unwrap_or_default();
    let wanted = |kind: &str| only.is_empty() || only.split(',').any(|k| k.trim() == kind);

    // NATS JetStream.
    if wanted("nats") {
        let nats = testbed::Nats::start().unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        for name in ["RAW", "INBOXD"] {
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.into(),
                subjects: vec![format!("{}.>", name.to_lowercase())],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let t = Instant::now();
        for (chunk_no, chunk) in msgs.chunks(200).enumerate() {
            let mut acks = Vec::new();
            for (i, m) in chunk.iter().enumerate() {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", format!("raw-{chunk_no}-{i}").as_str());
                acks.push(js.publish_with_headers("raw.x", h, m.clone().into()).await.unwrap());
            }
            for a in acks {
                a.await.unwrap();
            }
        }
        let raw_nats = t.elapsed().as_secs_f64();
        // A minimal raw client doing inboxd's whole job: one pipelined UID FETCH read on a
        // thread of its own, each body published as it arrives, acks awaited per 200; no JSON,
        // no checkpoint, no durability.
        let t = Instant::now();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(400);
        let reader = {
            let port = dv.port;
            std::thread::spawn(move || {
                let mut raw = Raw::connect_port(port, "alice");
                raw.cmd("SELECT INBOX");
                raw.cmd_each("UID FETCH 1:* BODY.PEEK[]", |m| tx.blocking_send(m).unwrap());
                raw.cmd("LOGOUT");
            })
        };
        let mut acks = Vec::new();
        let mut i = 0usize;
        while let Some(m) = rx.recv().await {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("pipe-{i}").as_str());
            i += 1;
            acks.push(js.publish_with_headers("raw.y", h, m.into()).await.unwrap());
            if acks.len() == 200 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks {
            a.await.unwrap();
        }
        reader.join().unwrap();
        assert_eq!(i, n);
        let raw_pipe = t.elapsed().as_secs_f64();
        let ours = run(format!(
            "{{ nats = \"{}\", subject = \"inboxd.{{account}}\" }}",
            nats.url()
        ))
        .await;
        line("nats", ours, raw_nats);
        println!(
            "    nats     raw IMAP-to-NATS client (pipelined FETCH read on a thread, each body published as it arrives): {raw_pipe:.2} s {:.0} msg/s (inboxd at {:.0} % of it)",
            n as f64 / raw_pipe,
            100.0 * raw_pipe / ours
        );
        // The same bytes as the raw client publishes (the message, not its JSON envelope).
        let ours_raw = run(format!(
            "{{ nats = \"{}\", subject = \"inboxd.{{account}}\", format = \"raw\" }}",
            nats.url()
        ))
        .await;
        line("nats/raw", ours_raw, raw_nats);
    }

    // Redis stream.
    if wanted("redis") {
        let redis = testbed::Redis::start().unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let t = Instant::now();
        for (i, m) in msgs.iter().enumerate() {
            let _: String = redis::cmd("XADD")
                .arg("raw")
                .arg("*")
                .arg("key")
                .arg(i)
                .arg("payload")
                .arg(m.as_slice())
                .query_async(&mut c)
                .await
                .unwrap();
        }
        let raw_redis = t.elapsed().as_secs_f64();
        let ours = run(format!("{{ redis = \"{}\" }}", redis.url())).await;
        line("redis", ours, raw_redis);
    }

    // Webhook.
    if wanted("webhook") {
        let (url, count) = sink().await;
        let http = reqwest::Client::new();
        let t = Instant::now();
        for m in &msgs {
            let r = http.post(&url).body(m.clone()).send().await.unwrap();
            assert!(r.status().is_success());
        }
        let raw_hook = t.elapsed().as_secs_f64();
        let ours = run(format!("{{ webhook = \"{url}\" }}")).await;
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 2 * n);
        line("webhook", ours, raw_hook);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--probe") {
        let notify = args
            .iter()
            .position(|a| a == "--notify")
            .map(|j| args[j + 1].parse().unwrap());
        probe(std::path::Path::new(&args[i + 1]), notify);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--child-run") {
        child_run(std::path::Path::new(&args[i + 1]));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--child-once") {
        // The daemon's `once`, alone in this process, for (c).
        let cfg = Config::load(std::path::Path::new(&args[i + 1])).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        // What `inboxd once` runs for one watch.
        rt.block_on(async {
            let store = inboxd::store::open(&cfg.state).await.unwrap();
            let dead = Watcher::start(cfg.watches[0].clone(), store, Mode::Once)
                .unwrap()
                .join()
                .await
                .unwrap();
            assert_eq!(dead, 0);
        });
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        print!(
            "{}",
            status
                .lines()
                .filter(|l| l.starts_with("VmHWM:"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        return;
    }
    if !testbed::available() {
        eprintln!("dovecot is not installed; run scripts/install-deps");
        std::process::exit(1);
    }
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = env("INBOXD_BENCH_MESSAGES", 200);
        if n > 0 {
            latency(n).await;
        }
        let n = env("INBOXD_BENCH_BACKLOG", 10_000);
        if n > 0 {
            catch_up(n).await;
        }
    });
    let large_mb: Vec<u64> = std::env::var("INBOXD_BENCH_LARGE_MB")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .filter(|&x| x > 0)
        .collect();
    if !large_mb.is_empty() {
        large(&large_mb);
    }
    let n = env("INBOXD_BENCH_TARGETS", 10_000);
    if n > 0 {
        rt.block_on(targets(n));
    }
    let n = env("INBOXD_BENCH_WATCHES", 1000);
    if n > 0 {
        many(n);
    }
}

/// For (e): what `inboxd run` does with every watch of the config (staggered start), in this
/// process alone; prints `IDLE <seconds>` once every watch is idle, then runs until killed.
fn child_run(config: &std::path::Path) {
    inboxd::process::raise_open_files_limit();
    let cfg = Config::load(config).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = inboxd::store::open(&cfg.state).await.unwrap();
        let t = Instant::now();
        let mut watchers = Vec::new();
        for (i, w) in cfg.watches.iter().enumerate() {
            if i >= 4 {
                tokio::time::sleep(cfg.start_stagger.mul_f64(0.5 + fastrand::f64())).await;
            }
            watchers.push(Watcher::start(w.clone(), store.clone(), Mode::Forever).unwrap());
        }
        loop {
            if watchers.iter().all(|w| w.health().state == "idle") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("IDLE {:.2}", t.elapsed().as_secs_f64());
        std::future::pending::<()>().await;
    });
}

/// [`child_run`] in a child process, started and waited for until its watches are idle;
/// killed on [`ChildRun::stop`].
struct ChildRun(std::process::Child);

impl ChildRun {
    fn start(exe: &std::path::Path, config: &std::path::Path) -> ChildRun {
        let mut child = std::process::Command::new(exe)
            .arg("--child-run")
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("IDLE"), "inboxd did not become idle: {line:?}");
        ChildRun(child)
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (utime + stime) of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of stat(5), counted after the command name (which starts at 3).
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One run of (e) with `watches` watches: (seconds until all idle, RSS KiB when idle, idle
/// CPU % of one core, new-mail latencies in ms).
/// A raw client in IDLE on `folder`: the instant it sees the next EXISTS comes on the
/// returned channel (the floor for new-mail latency on this server, under its current load).
fn raw_idle_on(dv: &Dovecot, user: &str, password: &str, folder: &str) -> std::sync::mpsc::Receiver<Instant> {
    let (tx, rx) = std::sync::mpsc::channel();
    // One EXISTS, then the connection is dropped (which ends the session).
    raw_idle_as(dv.port, user, password, folder, move || {
        let _ = tx.send(Instant::now());
        false
    });
    rx
}

/// How (e) lays its mailboxes out: folders of one user, or one INBOX per user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Folders,
    Users,
    /// As `Folders`, with `notify = true` on the account: one NOTIFY session for all.
    Notify,
}

impl Layout {
    /// Mailbox `i`: (user, password, folder).
    fn mailbox(self, i: usize) -> (String, String, String) {
        match self {
            Layout::Folders | Layout::Notify => ("alice".into(), "alicepw".into(), format!("W{i:04}")),
            Layout::Users => (
                testbed::extra_user(i as u32),
                testbed::EXTRA_PASSWORD.into(),
                "INBOX".into(),
            ),
        }
    }
}

/// A raw client in IDLE on `folder`, on a thread of its own: `on_exists` at each EXISTS, until
/// it returns false or the connection ends.
fn raw_idle(port: u16, user: &str, folder: &str, on_exists: impl FnMut() -> bool + Send + 'static) {
    raw_idle_as(port, user, "alicepw", folder, on_exists)
}

/// As [`raw_idle`], logging in with `password`.
fn raw_idle_as(
    port: u16,
    user: &str,
    password: &str,
    folder: &str,
    mut on_exists: impl FnMut() -> bool + Send + 'static,
) {
    let mut raw = Raw::connect_as(port, user, password);
    raw.cmd(&format!("SELECT {folder}"));
    raw.tag += 1;
    write!(raw.w, "R{} IDLE\r\n", raw.tag).unwrap();
    assert!(raw.line().starts_with('+'));
    std::thread::spawn(move || {
        loop {
            let mut l = String::new();
            if raw.r.read_line(&mut l).unwrap_or(0) == 0 {
                return;
            }
            if l.contains("EXISTS") && !on_exists() {
                return;
            }
        }
    });
}

/// What one run of (e) measured.
struct ManyRun {
    idle_after: f64,
    rss: u64,
    idle_cpu: f64,
    /// The process's sessions to the server once all were idle.
    sessions: usize,
    lat: Vec<f64>,
    floor: Vec<f64>,
}

fn many_run(dv: &Dovecot, layout: Layout, watches: usize, samples: usize) -> ManyRun {
    let dir = tempfile::tempdir().unwrap();
    let mut text = "state = \"state.db\"\n[limits]\nstart_stagger = \"10ms\"\n".to_string();
    let account = |name: &str, user: &str, password: &str| {
        format!(
            "[accounts.{name}]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"implicit\"\nca_file = \"{}\"\nuser = \"{user}\"\npassword = \"{password}\"\n",
            dv.tls_port,
            dv.ca_file().display()
        )
    };
    match layout {
        Layout::Folders => text.push_str(&account("b", "alice", "alicepw")),
        Layout::Notify => text.push_str(&format!("{}notify = true\n", account("b", "alice", "alicepw"))),
        Layout::Users => {}
    }
    for i in 0..watches {
        let (user, password, folder) = layout.mailbox(i);
        let name = match layout {
            Layout::Folders | Layout::Notify => "b".to_string(),
            Layout::Users => {
                text.push_str(&account(&user, &user, &password));
                user.clone()
            }
        };
        text.push_str(&format!(
            "[[watch]]\naccount = \"{name}\"\nfolder = \"{folder}\"\ndeliver = {{ maildir = \"out\" }}\n"
        ));
    }
    let path = dir.path().join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--child-run")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let idle_after: f64 = line.trim().strip_prefix("IDLE ").unwrap().parse().unwrap();
    // Let start-up garbage settle, then measure memory and a quiet 10 s.
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_kib(pid);
    let sessions = testbed::established_to(dv.tls_port);
    let c0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(10));
    let idle_cpu = (cpu_seconds(pid) - c0) / 10.0 * 100.0;
    // New mail into random watched folders, one at a time.
    let inbox = dir.path().join("out/new");
    let (mut lat, mut floor) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let (user, password, folder) = layout.mailbox(fastrand::usize(..watches));
        let mut raw = Raw::connect_as(dv.port, &user, &password);
        // A raw client idles on the same folder: Dovecot's own delay under this load.
        let seen = raw_idle_on(dv, &user, &password, &folder);
        // A quiet moment first: right after a change, Dovecot may tell an idling client of
        // the next one at once, which would make the later samples of a single folder cheaper.
        std::thread::sleep(Duration::from_millis(700));
        let before = std::fs::read_dir(&inbox).map_or(0, |d| d.count());
        let msg = testbed::sample_message(100_000 + i, "many", 500);
        raw.append(&folder, &msg);
        let t = Instant::now();
        while std::fs::read_dir(&inbox).map_or(0, |d| d.count()) == before {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no delivery into {user}/{folder}"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        raw.cmd("LOGOUT");
        let exists = seen
            .recv_timeout(Duration::from_secs(20))
            .expect("the raw IDLE client saw no EXISTS");
        floor.push(exists.saturating_duration_since(t).as_secs_f64() * 1000.0);
    }
    let _ = child.kill();
    let _ = child.wait();
    ManyRun {
        idle_after,
        rss,
        idle_cpu,
        sessions,
        lat,
        floor,
    }
}

fn many(n: usize) {
    let dv = Dovecot::start_with(testbed::Options {
        max_userip_connections: Some(n as u32 + 16),
        sessions: Some(2 * n as u32 + 16),
        extra_users: n as u32,
        ..testbed::Options::default()
    })
    .unwrap();
    for i in 0..n {
        for layout in [Layout::Folders, Layout::Users] {
            let (user, _, folder) = layout.mailbox(i);
            dv.drop_messages(&user, &folder, &[testbed::sample_message(i, "seed", 200)])
                .unwrap();
        }
    }
    let samples = 20;
    let layouts = [
        (Layout::Folders, "one user's folders, one watch per folder"),
        (Layout::Users, "one INBOX per Dovecot user, one account each"),
        (
            Layout::Notify,
            "one user's folders, notify = true: one NOTIFY session, a session per wake",
        ),
    ];
    // INBOXD_BENCH_LAYOUTS=folders,users,notify picks layouts.
    let only = std::env::var("INBOXD_BENCH_LAYOUTS").unwrap_or_else(|_| "folders,users,notify".into());
    for (layout, what) in layouts {
        let name = format!("{layout:?}").to_lowercase();
        if !only.split(',').any(|l| l.trim() == name) {
            continue;
        }
        println!("(e) {n} watches over TLS in one process ({what}, start_stagger 10 ms), next to one watch");
        let mut one = many_run(&dv, layout, 1, samples);
        let mut all = many_run(&dv, layout, n, samples);
        for (label, r) in [("1 watch     ", &mut one), (&format!("{n} watches"), &mut all)] {
            println!(
                "    {label} RSS {:7.1} MiB   sessions {:4}   idle CPU {:5.2} %   idle after {:5.2} s   latency p50 {:7.1} ms  p99 {:7.1} ms   (raw IDLE on the same folder p50 {:7.1} ms  p99 {:7.1} ms)",
                r.rss as f64 / 1024.0,
                r.sessions,
                r.idle_cpu,
                r.idle_after,
                pct(&mut r.lat, 0.5),
                pct(&mut r.lat, 0.99),
                pct(&mut r.floor, 0.5),
                pct(&mut r.floor, 0.99)
            );
        }
        println!(
            "    per watched mailbox above the one-watch process: {:.1} KiB",
            (all.rss.saturating_sub(one.rss)) as f64 / (n - 1).max(1) as f64
        );
    }
}
