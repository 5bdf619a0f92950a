//! The same scenarios against every real IMAP server the test bed can run: Dovecot, Cyrus IMAP
//! 3.6 and Courier-IMAP 5 (each in its own folder on free loopback ports). Backlog in order, live mail through
//! IDLE, polling, a server restart, a folder deleted and created again (a new UIDVALIDITY) and
//! every post-action, checked on the server over IMAP, not through the server's own tools, so
//! that one scenario fits every server.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use inboxd::config::{Account, Config};
use inboxd::imap::Session;
use inboxd::watcher::{Event, Mode, Watcher};
use inboxd_testbed::{Courier, Cyrus, Dovecot};
use support::{Recorder, wait_delivered, wait_for, wait_state};

/// What a scenario needs of a server.
trait Server {
    fn name(&self) -> &'static str;
    fn account(&self) -> Account;
    fn port(&self) -> u16;
    /// The account's user (its password is `alicepw` on every server).
    fn user(&self) -> String {
        "alice".into()
    }
    /// The account's `tls` and `ca_file` lines.
    fn tls(&self) -> String {
        format!("tls = \"starttls\"\nca_file = \"{}\"", self.ca_file().display())
    }
    fn ca_file(&self) -> PathBuf;
    /// Whether the server offers UTF8=ACCEPT, so that folder names travel as UTF-8 (Courier).
    fn utf8(&self) -> bool {
        false
    }
    /// Whether folder names may hold `"` and `\\` (Cyrus refuses them: "Invalid mailbox name").
    fn quotes_in_names(&self) -> bool {
        true
    }
    /// A folder's full name: Cyrus keeps a user's folders below INBOX, with `/`.
    fn folder(&self, name: &str) -> String;
    fn stop(&mut self);
    fn restart(&mut self);
}

impl Server for Dovecot {
    fn name(&self) -> &'static str {
        "dovecot"
    }
    fn account(&self) -> Account {
        Dovecot::account(self, "alice")
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn ca_file(&self) -> PathBuf {
        Dovecot::ca_file(self)
    }
    fn folder(&self, name: &str) -> String {
        name.to_string()
    }
    fn stop(&mut self) {
        Dovecot::stop(self)
    }
    fn restart(&mut self) {
        Dovecot::restart(self).unwrap()
    }
}

impl Server for Courier {
    fn name(&self) -> &'static str {
        "courier"
    }
    fn account(&self) -> Account {
        Courier::account(self)
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn user(&self) -> String {
        self.user.clone()
    }
    fn utf8(&self) -> bool {
        true
    }
    fn tls(&self) -> String {
        // No STARTTLS in this Courier: plain, on loopback only.
        "tls = \"none\"".into()
    }
    fn ca_file(&self) -> PathBuf {
        PathBuf::new()
    }
    fn folder(&self, name: &str) -> String {
        format!("INBOX.{name}")
    }
    fn stop(&mut self) {
        Courier::stop(self)
    }
    fn restart(&mut self) {
        Courier::restart(self).unwrap()
    }
}

impl Server for Cyrus {
    fn name(&self) -> &'static str {
        "cyrus"
    }
    fn account(&self) -> Account {
        Cyrus::account(self, "alice")
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn ca_file(&self) -> PathBuf {
        Cyrus::ca_file(self)
    }
    fn folder(&self, name: &str) -> String {
        format!("INBOX/{name}")
    }
    fn quotes_in_names(&self) -> bool {
        false
    }
    fn stop(&mut self) {
        Cyrus::stop(self)
    }
    fn restart(&mut self) {
        Cyrus::restart(self).unwrap()
    }
}

/// A config watching `folder` into a Maildir; `account_extra` and `watch_extra` are TOML lines.
fn config(s: &dyn Server, dir: &Path, account_extra: &str, folder: &str, watch_extra: &str) -> Config {
    let folder = folder.replace('\\', "\\\\").replace('"', "\\\"");
    let text = format!(
        "state = \"state.db\"\n[accounts.t]\nhost = \"127.0.0.1\"\nport = {}\n{}\nuser = \"{}\"\npassword = \"alicepw\"\nreconnect = [ {{ every = \"200ms\" }} ]\n{account_extra}\n\n[[watch]]\naccount = \"t\"\nfolder = \"{folder}\"\n{watch_extra}\ndeliver = {{ maildir = \"out\" }}\n",
        s.port(),
        s.tls(),
        s.user()
    );
    let path = dir.join("inboxd.toml");
    std::fs::write(&path, &text).unwrap();
    Config::load(&path).unwrap()
}

async fn session(s: &dyn Server) -> Session {
    Session::open(&s.account())
        .await
        .unwrap_or_else(|e| panic!("{}: login: {e}", s.name()))
}

async fn append(s: &dyn Server, folder: &str, subjects: &[&str]) {
    let mut imap = session(s).await;
    for (i, subject) in subjects.iter().enumerate() {
        imap.append(folder, &inboxd_testbed::sample_message(i, subject, 300))
            .await
            .unwrap_or_else(|e| panic!("{}: APPEND to {folder}: {e}", s.name()));
    }
    imap.logout().await;
}

async fn run(s: &dyn Server, command: &str) {
    let mut imap = session(s).await;
    imap.run(command)
        .await
        .unwrap_or_else(|e| panic!("{}: {command}: {e}", s.name()));
    imap.logout().await;
}

/// The UIDs in `folder` matching a SEARCH `query`.
async fn search(s: &dyn Server, folder: &str, query: &str) -> Vec<u32> {
    let mut imap = session(s).await;
    imap.select(folder).await.unwrap();
    let uids = imap.search(query).await.unwrap();
    imap.logout().await;
    uids
}

fn watcher(config: &Config, rec: &Recorder, mode: Mode) -> impl std::future::Future<Output = Watcher> {
    let (watch, rec) = (config.watches[0].clone(), rec.clone());
    let state = config.state.clone();
    async move {
        let store = inboxd::store::open(&state).await.unwrap();
        Watcher::with_handler(watch, store, Box::new(rec), mode)
    }
}

/// A backlog comes in UID order, then mail appended while the watch is in IDLE.
async fn backlog_then_live(s: &dyn Server) {
    let folder = s.folder("Backlog");
    run(s, &format!("CREATE \"{folder}\"")).await;
    append(s, &folder, &["b1", "b2", "b3"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(s, dir.path(), "", &folder, "start = \"all\"");
    let rec = Recorder::default();
    let w = watcher(&config, &rec, Mode::Forever).await;
    let mut ev = w.subscribe();
    wait_delivered(&mut ev, 3, 20).await;
    wait_state(&w, "idle").await;
    append(s, &folder, &["live1", "live2"]).await;
    wait_delivered(&mut ev, 2, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), ["b1", "b2", "b3", "live1", "live2"], "{}", s.name());
    let uids = rec.uids();
    assert!(uids.windows(2).all(|p| p[0] < p[1]), "{}: {uids:?}", s.name());
}

/// Without IDLE (`poll_interval` and the IDLE capability ignored by config), new mail is
/// found by polling.
async fn polled(s: &dyn Server) {
    let folder = s.folder("Polled");
    run(s, &format!("CREATE \"{folder}\"")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(s, dir.path(), "poll_interval = \"300ms\"\nidle = false", &folder, "");
    let rec = Recorder::default();
    let w = watcher(&config, &rec, Mode::Forever).await;
    let mut ev = w.subscribe();
    wait_state(&w, "polling").await;
    append(s, &folder, &["polled"]).await;
    wait_delivered(&mut ev, 1, 20).await;
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), ["polled"], "{}", s.name());
}

/// The server stops and starts again: what arrived is delivered after the reconnect, nothing
/// twice.
async fn restart(s: &mut dyn Server) {
    let folder = s.folder("Restart");
    run(s, &format!("CREATE \"{folder}\"")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(s, dir.path(), "", &folder, "");
    let rec = Recorder::default();
    let w = watcher(&config, &rec, Mode::Forever).await;
    let mut ev = w.subscribe();
    wait_state(&w, "idle").await;
    append(s, &folder, &["before"]).await;
    wait_delivered(&mut ev, 1, 20).await;
    s.stop();
    wait_for(&mut ev, 20, |e| matches!(e, Event::Disconnected { error: Some(_), .. })).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.restart();
    append(s, &folder, &["during", "after"]).await;
    wait_delivered(&mut ev, 2, 30).await;
    assert!(w.health().reconnects >= 1, "{}", s.name());
    w.stop().await.unwrap();
    assert_eq!(rec.subjects(), ["before", "during", "after"], "{}", s.name());
}

/// The folder is deleted and created again with the old message and a new one: a new
/// UIDVALIDITY; by default the old message is recognised and only the new one delivered.
async fn recreated_folder(s: &dyn Server) {
    let folder = s.folder("Work");
    run(s, &format!("CREATE \"{folder}\"")).await;
    let old = inboxd_testbed::sample_message(1, "old", 300);
    let mut imap = session(s).await;
    imap.append(&folder, &old).await.unwrap();
    imap.logout().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(s, dir.path(), "", &folder, "start = \"all\"");
    let rec = Recorder::default();
    watcher(&config, &rec, Mode::Once).await.join().await.unwrap();
    assert_eq!(rec.subjects(), ["old"], "{}", s.name());
    let before = {
        let mut imap = session(s).await;
        let st = imap.select(&folder).await.unwrap();
        imap.logout().await;
        st.uidvalidity
    };
    run(s, &format!("DELETE \"{folder}\"")).await;
    run(s, &format!("CREATE \"{folder}\"")).await;
    let mut imap = session(s).await;
    imap.append(&folder, &old).await.unwrap();
    imap.append(&folder, &inboxd_testbed::sample_message(2, "new", 300))
        .await
        .unwrap();
    let after = imap.select(&folder).await.unwrap().uidvalidity;
    imap.logout().await;
    assert_ne!(before, after, "{}: the recreated folder kept its UIDVALIDITY", s.name());
    let w = watcher(&config, &rec, Mode::Once).await;
    let mut ev = w.subscribe();
    w.join().await.unwrap();
    assert_eq!(rec.subjects(), ["old", "new"], "{}", s.name());
    let mut saw_change = false;
    while let Ok(e) = ev.try_recv() {
        saw_change |= matches!(e, Event::UidValidityChanged { .. });
    }
    assert!(saw_change, "{}", s.name());
}

/// Every post-action, checked on the server.
async fn post_actions(s: &dyn Server) {
    let done = s.folder("Done");
    run(s, &format!("CREATE \"{done}\"")).await;
    for (i, after) in ["seen", "flag:$Processed", "move:DONE", "delete"]
        .into_iter()
        .enumerate()
    {
        let after = after.replace("DONE", &done);
        let folder = s.folder(&format!("Post{i}"));
        run(s, &format!("CREATE \"{folder}\"")).await;
        append(s, &folder, &[&after]).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config(
            s,
            dir.path(),
            "",
            &folder,
            &format!("start = \"all\"\nafter = \"{after}\""),
        );
        let rec = Recorder::default();
        watcher(&config, &rec, Mode::Once).await.join().await.unwrap();
        assert_eq!(rec.subjects(), [after.as_str()], "{}", s.name());
        let uid = rec.uids()[0];
        let what = format!("{}: after = {after}", s.name());
        match i {
            0 => assert_eq!(search(s, &folder, "SEEN").await, [uid], "{what}"),
            1 => assert_eq!(search(s, &folder, "KEYWORD $Processed").await, [uid], "{what}"),
            2 => {
                assert!(search(s, &folder, "ALL").await.is_empty(), "{what}: still there");
                assert_eq!(search(s, &done, "ALL").await.len(), 1, "{what}: not in {done}");
            }
            _ => assert!(search(s, &folder, "ALL").await.is_empty(), "{what}: not expunged"),
        }
    }
}

/// Folders named as people read them: created, filled and watched by their readable names,
/// which keys and events carry; on the wire modified UTF-7, or UTF-8 where the server offers
/// UTF8=ACCEPT (Courier). Another client that did not enable UTF-8 sees the same folders in
/// modified UTF-7: the server stored the names right either way.
async fn international_folder_names(s: &dyn Server) {
    let mut names = vec!["Entwürfe", "Входящие", "受信箱", "Q&A Notes"];
    if s.quotes_in_names() {
        names.push("Say \"hi\" \\ bye");
    }
    let mut imap = session(s).await;
    let utf8 = imap.utf8_names();
    assert_eq!(utf8, s.utf8(), "{}: folder names as UTF-8", s.name());
    for (i, name) in names.iter().enumerate() {
        let folder = s.folder(name);
        imap.create(&folder)
            .await
            .unwrap_or_else(|e| panic!("{}: CREATE {folder}: {e}", s.name()));
        // An ASCII subject: Cyrus rewrites 8-bit header bytes (`munge8bit`).
        imap.append(&folder, &inboxd_testbed::sample_message(i, &format!("intl{i}"), 200))
            .await
            .unwrap_or_else(|e| panic!("{}: APPEND {folder}: {e}", s.name()));
    }
    let listed: Vec<String> = imap.folders().await.unwrap().into_iter().map(|(n, _)| n).collect();
    imap.logout().await;
    for (i, name) in names.into_iter().enumerate() {
        let folder = s.folder(name);
        assert!(listed.contains(&folder), "{}: {folder} not in {listed:?}", s.name());
        let dir = tempfile::tempdir().unwrap();
        let config = config(s, dir.path(), "", &folder, "start = \"all\"");
        let rec = Recorder::default();
        watcher(&config, &rec, Mode::Once).await.join().await.unwrap();
        assert_eq!(rec.subjects(), [format!("intl{i}")], "{}: {folder}", s.name());
    }
    // What a client that never enabled UTF-8 sees: the names in modified UTF-7.
    let mut raw = RawList::login(s).await;
    let wire = raw.list().await;
    assert!(
        wire.is_ascii(),
        "{}: 8-bit names to a client without UTF8=ACCEPT: {wire}",
        s.name()
    );
    assert!(wire.contains("Entw&APw-rfe"), "{}: {wire}", s.name());
    println!(
        "{}: UTF8=ACCEPT {}",
        s.name(),
        if utf8 { "enabled" } else { "not offered: modified UTF-7" }
    );
}

/// A bare client that logs in and lists, without enabling anything.
struct RawList(tokio::io::BufReader<tokio::net::TcpStream>);

impl RawList {
    async fn login(s: &dyn Server) -> RawList {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", s.port())).await.unwrap();
        let mut r = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        r.get_mut()
            .write_all(format!("a LOGIN {} alicepw\r\n", s.user()).as_bytes())
            .await
            .unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            if line.starts_with("a ") {
                assert!(line.starts_with("a OK"), "{}: {line}", s.name());
                break;
            }
        }
        RawList(r)
    }

    async fn list(&mut self) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        self.0.get_mut().write_all(b"b LIST \"\" \"*\"\r\n").await.unwrap();
        let mut out = String::new();
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).await.unwrap();
            if line.starts_with("b ") {
                return out;
            }
            out.push_str(&line);
        }
    }
}

async fn every_scenario(s: &mut dyn Server) {
    international_folder_names(s).await;
    backlog_then_live(s).await;
    polled(s).await;
    recreated_folder(s).await;
    post_actions(s).await;
    restart(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_passes_every_scenario() {
    let mut dv = support::dovecot();
    every_scenario(&mut dv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cyrus_passes_every_scenario() {
    let mut cyrus = Cyrus::start().expect("start cyrus (scripts/install-deps installs it)");
    every_scenario(&mut cyrus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_passes_every_scenario() {
    let mut courier = Courier::start().expect("start courier (scripts/install-deps installs it)");
    every_scenario(&mut courier).await;
}
