//! Shared helpers for the integration tests: a Dovecot per test, configs written as TOML (so
//! the config path is exercised too), a recording handler, and event waits with deadlines.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use inboxd::config::Config;
use inboxd::handler::{Handler, HandlerError, Message};
use inboxd::imap::Session;
use inboxd::store::Store;
use inboxd::watcher::Event;
use inboxd_testbed::{self as testbed, Dovecot};
use tokio::sync::broadcast;

/// A loopback port nobody listens on right now (for a server the test starts), outside the
/// ephemeral range that outgoing connections take theirs from.
pub fn free_port() -> u16 {
    testbed::free_port().expect("a free test port")
}

pub fn dovecot() -> Dovecot {
    Dovecot::start().expect("start dovecot (is dovecot-imapd installed? scripts/test installs it)")
}

/// A config for `alice` on the instance; `account_extra` and `watch_extra` are TOML lines.
pub fn config(dv: &Dovecot, dir: &Path, account_extra: &str, watch_extra: &str) -> Config {
    let text = format!(
        r#"state = "state.db"
[accounts.t]
host = "127.0.0.1"
port = {port}
tls = "starttls"
ca_file = "{ca}"
user = "alice"
password = "alicepw"
{account_extra}

[[watch]]
account = "t"
{watch_extra}
"#,
        port = dv.port,
        ca = dv.ca_file().display(),
    );
    let path = dir.join("inboxd.toml");
    std::fs::write(&path, &text).unwrap();
    Config::load(&path).unwrap()
}

pub async fn store(config: &Config) -> Arc<dyn Store> {
    inboxd::store::open(&config.state).await.unwrap()
}

/// (uid, key, raw bytes) of a handled message.
pub type Seen = (u32, String, Vec<u8>);

/// Records what it was handed; can be told to fail on given UIDs.
#[derive(Clone, Default)]
pub struct Recorder {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub fail_uids: Arc<Mutex<Vec<u32>>>,
    pub attempts: Arc<Mutex<Vec<u32>>>,
}

impl Recorder {
    pub fn uids(&self) -> Vec<u32> {
        self.seen.lock().unwrap().iter().map(|(u, _, _)| *u).collect()
    }
    pub fn subjects(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, b)| {
                let s = String::from_utf8_lossy(b);
                s.lines()
                    .find_map(|l| l.strip_prefix("Subject: "))
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .collect()
    }
}

impl Handler for Recorder {
    fn deliver<'a>(&'a mut self, m: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.attempts.lock().unwrap().push(m.uid);
            if self.fail_uids.lock().unwrap().contains(&m.uid) {
                return Err(HandlerError::new(format!("told to fail uid {}", m.uid)).with_output("stderr tail"));
            }
            let body = m
                .body
                .to_vec()
                .map_err(|e| HandlerError::new(format!("reading the body: {e}")))?;
            self.seen.lock().unwrap().push((m.uid, m.key.to_string(), body));
            Ok(())
        })
    }
}

pub async fn append(dv: &Dovecot, folder: &str, subjects: &[&str]) {
    let mut s = Session::open(&dv.account("alice")).await.unwrap();
    for (i, subj) in subjects.iter().enumerate() {
        s.append(folder, &testbed::sample_message(i, subj, 300)).await.unwrap();
    }
    s.logout().await;
}

pub async fn append_raw(dv: &Dovecot, folder: &str, messages: &[Vec<u8>]) {
    let mut s = Session::open(&dv.account("alice")).await.unwrap();
    for m in messages {
        s.append(folder, m).await.unwrap();
    }
    s.logout().await;
}

pub async fn imap(dv: &Dovecot, cmd: &str) {
    let mut s = Session::open(&dv.account("alice")).await.unwrap();
    s.run(cmd).await.unwrap();
    s.logout().await;
}

/// Waits for an event matching `pred`, failing the test after `secs`.
pub async fn wait_for(events: &mut broadcast::Receiver<Event>, secs: u64, pred: impl Fn(&Event) -> bool) -> Event {
    let seen = std::sync::Mutex::new(Vec::new());
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(e) => seen.lock().unwrap().push(e),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no matching event within {secs}s; saw {:?}", seen.lock().unwrap()))
}

pub async fn wait_delivered(events: &mut broadcast::Receiver<Event>, n: usize, secs: u64) -> Vec<u32> {
    let mut uids = Vec::new();
    while uids.len() < n {
        if let Event::Delivered { uid, .. } = wait_for(events, secs, |e| matches!(e, Event::Delivered { .. })).await {
            uids.push(uid);
        }
    }
    uids
}

/// The `inboxd` binary (tests of the `inboxd-cli` crate only, where Cargo builds it).
pub fn inboxd_bin() -> std::process::Command {
    match option_env!("CARGO_BIN_EXE_inboxd") {
        Some(path) => std::process::Command::new(path),
        None => panic!("only the tests of crates/cli run the binary"),
    }
}

/// Waits until the watcher reports `state`, failing the test after 10 s.
pub async fn wait_state(w: &inboxd::watcher::Watcher, state: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.health().state != state {
        assert!(
            std::time::Instant::now() < deadline,
            "state is {:?}, expected {state:?}",
            w.health().state
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub mod faultproxy;
pub mod oauth;
pub mod scripted;

/// A backlog delivered across a target's outage: starts `config`'s first watch, lets it catch
/// up the first half of `msgs` (already in INBOX), calls `outage(false)` (the target goes
/// away), appends the second half, waits for the watch to report a failure naming `target`,
/// calls `outage(true)` (the target is back), waits until everything is caught up. Returns
/// the number of dead letters (a busy target must cause none).
pub async fn backlog_across_outage(
    dv: &Dovecot,
    config: &Config,
    msgs: &[Vec<u8>],
    target: &str,
    mut outage: impl FnMut(bool),
) -> u64 {
    let half = msgs.len() / 2;
    let w = inboxd::watcher::Watcher::start(
        config.watches[0].clone(),
        store(config).await,
        inboxd::watcher::Mode::Forever,
    )
    .unwrap();
    let mut ev = w.subscribe();
    wait_for(
        &mut ev,
        60,
        |e| matches!(e, Event::CaughtUp { last_uid, .. } if *last_uid == half as u32),
    )
    .await;
    outage(false);
    append_raw(dv, "INBOX", &msgs[half..]).await;
    let e = wait_for(&mut ev, 60, |e| {
        matches!(e, Event::Failed { .. } | Event::Disconnected { error: Some(_), .. })
    })
    .await;
    assert!(format!("{e:?}").contains(target), "{e:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    outage(true);
    let all = msgs.len() as u32;
    wait_for(
        &mut ev,
        120,
        |e| matches!(e, Event::CaughtUp { last_uid, .. } if *last_uid == all),
    )
    .await;
    let dead = w.health().dead_lettered;
    w.stop().await.unwrap();
    dead
}

/// An invoice from `billing@vendor.example` with a PDF attached (for routing tests).
pub fn invoice(n: usize) -> Vec<u8> {
    format!(
        "From: Billing <billing@vendor.example>\r\nTo: invoices@us.example\r\nSubject: Invoice {n}\r\nMessage-ID: <inv.{n}@vendor.example>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nattached\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"i{n}.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n"
    )
    .into_bytes()
}

/// A newsletter with a `List-Id`.
pub fn newsletter(n: usize) -> Vec<u8> {
    format!(
        "From: News <news@vendor.example>\r\nTo: invoices@us.example\r\nSubject: News {n}\r\nList-Id: Vendor news\r\n <news.vendor.example>\r\nMessage-ID: <news.{n}@vendor.example>\r\n\r\nread me\r\n"
    )
    .into_bytes()
}

/// A personal message from `Ann@Example.COM`.
pub fn personal(n: usize) -> Vec<u8> {
    format!(
        "From: Ann <Ann@Example.COM>\r\nTo: invoices@us.example\r\nSubject: Question {n}\r\nMessage-ID: <q.{n}@example.com>\r\n\r\nhello\r\n"
    )
    .into_bytes()
}
