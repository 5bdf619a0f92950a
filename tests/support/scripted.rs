//! A socket-level scripted IMAP server for what Dovecot will not do: end a session with
//! `* BYE Session invalidated - AccessTokenExpired` (as Exchange Online does) in IDLE or in the
//! middle of a FETCH, and refuse a token with the XOAUTH2 error challenge. It speaks just
//! enough IMAP for inboxd's watcher, over plain TCP on loopback.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use inboxd::config::Config;
use inboxd::watcher::{Event, Mode, Watcher};

use super::{Recorder, store};

#[derive(Default)]
pub struct State {
    pub messages: Vec<(u32, Vec<u8>)>,
    /// Every bearer token presented, in order.
    pub tokens: Vec<String>,
    pub connections: u32,
    /// Send BYE AccessTokenExpired this long into the next IDLE (once).
    pub bye_in_idle: Option<Duration>,
    /// End the next IDLE this long into it with its tagged OK, without waiting for DONE, as a
    /// server may (once).
    pub end_idle_in: Option<Duration>,
    /// Send BYE AccessTokenExpired instead of the bodies of the next body FETCH (once).
    pub bye_in_fetch: bool,
    /// Send BYE instead of the bodies of the body FETCH that comes once this many bodies were
    /// sent (once).
    pub bye_after_bodies: Option<u32>,
    /// Refuse the next AUTHENTICATE with the XOAUTH2 error challenge (once).
    pub refuse_next_auth: bool,
    /// How many bodies were sent.
    pub bodies_sent: u32,
    /// Complete the next SELECT with `OK [READ-WRITE]– x`: a multi-byte character right after
    /// `]`, which panics imap-proto 0.17 (once).
    pub hostile_select: bool,
    /// Answer the next UID FETCH with Exchange's throttling BAD and this hint (once).
    pub throttle_ms: Option<u64>,
    /// Leave UIDNEXT out of SELECT (always); STATUS still reports it.
    pub no_uidnext: bool,
    /// Put non-ASCII text in human-readable responses (always).
    pub non_ascii: bool,
    /// Stop answering in the middle of the next body literal (once).
    pub stall_in_literal: bool,
    /// Commands received, in order (tags stripped).
    pub commands: Vec<String>,
    /// Refuse the next SELECTs with `NO [<code>] temporary trouble` (one per entry); an entry
    /// `BAD <text>` is answered `BAD <text>`, then BYE and a closed connection (Exchange).
    pub select_refusals: Vec<String>,
    /// Add these UIDs (far above UIDNEXT, with bodies) to every UID FETCH answer.
    pub bogus_uids: Vec<u32>,
    /// Answer body fetches of these UIDs with `(UID n FLAGS ())`, no body (always).
    pub no_body: Vec<u32>,
    /// These UIDs are listed by `UID FETCH n:* (UID RFC822.SIZE)` but gone by the body FETCH
    /// and from SEARCH (expunged in between).
    pub vanish: Vec<u32>,
    /// Send message bodies at this many bytes per second (0: as fast as possible).
    pub body_rate: u64,
    /// Answer the next body fetch with a literal announced at 536,000,000 bytes (once).
    pub huge_literal: bool,
    /// Answer the next body fetch with a line that never ends (once, 4 MiB of it).
    pub endless_line: bool,
    /// Send each body FETCH response this many times.
    pub repeat_fetch: u32,
    /// Answer the next body fetch with a response that cannot be parsed, holding this text.
    pub garbage_fetch: Option<String>,
    /// Report this RFC822.SIZE for every message, whatever its real size.
    pub lie_size: Option<u32>,
    /// Refuse every LOGIN with this text (e.g. `[AUTHENTICATIONFAILED] Authentication failed.`).
    pub refuse_login: Option<String>,
    /// LOGIN commands received.
    pub logins: u32,
    /// Answer a partial fetch (`BODY.PEEK[]<off.len>`) with the whole message (always).
    pub ignore_partial: bool,
    /// Partial fetches received.
    pub partial_fetches: u32,
    /// Never answer DONE: the server freezes as IDLE ends (always).
    pub freeze_at_done: bool,
    /// Capabilities advertised after login besides the usual ones (e.g. `UTF8=ACCEPT`).
    pub extra_caps: String,
    /// Answer ENABLE with BAD (always).
    pub refuse_enable: bool,
    /// Listings (`UID FETCH ... (UID RFC822.SIZE ...)`) received.
    pub listings: u32,
    /// Answer the listing with this number (counting from 1) with BYE and close (once).
    pub bye_at_listing: Option<u32>,
    /// Answer every body fetch with `NO <text>` while set (Gmail over its bandwidth limits).
    pub refuse_fetch: Option<String>,
    /// Before answering a SELECT, wait up to 300 ms for the client's next command: one sent
    /// without waiting for the SELECT's answer counts in `pipelined_after_select` (always).
    pub watch_pipelining: bool,
    /// SELECTs the client followed with a command before they were answered.
    pub pipelined_after_select: u32,
    /// DONEs (ending an IDLE) the client followed with a command before they were answered
    /// (counted with `watch_pipelining`).
    pub pipelined_after_done: u32,
    /// Run a listing and a FETCH pipelined after it together, as Dovecot does: the listing's
    /// tagged OK comes after the next FETCH's responses (always).
    pub parallel_fetches: bool,
    /// Lines sent in the next IDLE right after the EXISTS that announces new mail (an
    /// EXPUNGE, Dovecot's `* NO` for a folder deleted under the session).
    pub after_exists_in_idle: Vec<String>,
}

#[derive(Clone)]
pub struct Scripted {
    pub state: Arc<Mutex<State>>,
    pub port: u16,
    news: Arc<Notify>,
}

impl Scripted {
    pub async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = Scripted {
            state: Arc::new(Mutex::new(State::default())),
            port,
            news: Arc::new(Notify::new()),
        };
        let server = s.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let _ = server.serve(sock).await;
                });
            }
        });
        s
    }

    pub fn add_message(&self, subject: &str) {
        let mut st = self.state.lock().unwrap();
        let uid = st.messages.len() as u32 + 1;
        st.messages.push((
            uid,
            format!("Subject: {subject}\r\nMessage-ID: <{uid}@scripted>\r\n\r\nbody\r\n").into_bytes(),
        ));
        drop(st);
        self.news.notify_waiters();
    }

    /// Adds a message of about `size` bytes.
    pub fn add_message_sized(&self, subject: &str, size: usize) {
        let mut st = self.state.lock().unwrap();
        let uid = st.messages.len() as u32 + 1;
        let mut body = format!("Subject: {subject}\r\nMessage-ID: <{uid}@scripted>\r\n\r\n").into_bytes();
        while body.len() < size {
            body.extend_from_slice(b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstu\r\n");
        }
        st.messages.push((uid, body));
        drop(st);
        self.news.notify_waiters();
    }

    /// Wakes an idling client without adding a message (an unsolicited EXISTS of the same
    /// count), so the client resyncs and meets the `n:*` answer below n.
    pub fn add_message_silently_none(&self) {
        self.news.notify_waiters();
    }

    /// With `watch_pipelining`: whether the client sent its next command within 300 ms,
    /// without waiting for the answer to the one just read.
    async fn pipelined(&self, r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> bool {
        if !self.state.lock().unwrap().watch_pipelining {
            return false;
        }
        let next = tokio::time::timeout(Duration::from_millis(300), r.fill_buf()).await;
        next.is_ok_and(|b| b.is_ok_and(|b| !b.is_empty()))
    }

    async fn serve(&self, sock: TcpStream) -> std::io::Result<()> {
        self.state.lock().unwrap().connections += 1;
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 IDLE] scripted server ready\r\n")
            .await?;
        let mut line = String::new();
        // The message count this client last saw (at SELECT or a FETCH): messages that arrive
        // later are announced when it enters IDLE, as a real server does.
        let mut seen_count = 0usize;
        // A listing's tagged OK held back by `parallel_fetches`, sent after the responses of
        // the command that follows it.
        let mut held_ok: Option<String> = None;
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let mut parts = line.trim_end().splitn(3, ' ');
            let (tag, cmd, rest) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or("").to_ascii_uppercase(),
                parts.next().unwrap_or(""),
            );
            let non_ascii = {
                let mut st = self.state.lock().unwrap();
                st.commands.push(format!("{cmd} {rest}"));
                st.non_ascii
            };
            if non_ascii {
                w.write_all("* OK [ALERT] Wartungsfenster heute Nacht – café ☕\r\n".as_bytes())
                    .await?;
            }
            if let Some(ok) = held_ok.take_if(|_| cmd != "UID") {
                w.write_all(ok.as_bytes()).await?;
            }
            match cmd.as_str() {
                "CAPABILITY" => {
                    let extra = self.state.lock().unwrap().extra_caps.clone();
                    w.write_all(
                        format!("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 IDLE {extra}\r\n{tag} OK done\r\n").as_bytes(),
                    )
                    .await?
                }
                "ENABLE" if self.state.lock().unwrap().refuse_enable => {
                    w.write_all(format!("{tag} BAD unknown command\r\n").as_bytes()).await?
                }
                "AUTHENTICATE" => {
                    w.write_all(b"+ \r\n").await?;
                    let mut resp = String::new();
                    r.read_line(&mut resp).await?;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(resp.trim())
                        .unwrap_or_default();
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    let token = text
                        .split("auth=Bearer ")
                        .nth(1)
                        .and_then(|t| t.split('\x01').next())
                        .unwrap_or("")
                        .to_string();
                    let refuse = {
                        let mut st = self.state.lock().unwrap();
                        st.tokens.push(token);
                        std::mem::take(&mut st.refuse_next_auth)
                    };
                    if refuse {
                        let challenge = base64::engine::general_purpose::STANDARD.encode(
                            r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office365.com/.default"}"#,
                        );
                        w.write_all(format!("+ {challenge}\r\n").as_bytes()).await?;
                        let mut empty = String::new();
                        r.read_line(&mut empty).await?;
                        w.write_all(format!("{tag} NO AUTHENTICATE failed.\r\n").as_bytes())
                            .await?;
                    } else {
                        w.write_all(format!("{tag} OK AUTHENTICATE completed.\r\n").as_bytes())
                            .await?;
                    }
                }
                "SELECT" => {
                    let refusal = {
                        let mut st = self.state.lock().unwrap();
                        if st.select_refusals.is_empty() {
                            None
                        } else {
                            Some(st.select_refusals.remove(0))
                        }
                    };
                    if let Some(bad) = refusal.as_deref().and_then(|r| r.strip_prefix("BAD ")) {
                        w.write_all(format!("{tag} BAD {bad}\r\n* BYE Connection closed. 14\r\n").as_bytes())
                            .await?;
                        return Ok(());
                    }
                    if let Some(code) = refusal {
                        w.write_all(format!("{tag} NO [{code}] temporary trouble\r\n").as_bytes())
                            .await?;
                        continue;
                    }
                    let (n, next, hostile, no_next) = {
                        let mut st = self.state.lock().unwrap();
                        (
                            st.messages.len(),
                            st.messages.last().map_or(1, |m| m.0 + 1),
                            std::mem::take(&mut st.hostile_select),
                            st.no_uidnext,
                        )
                    };
                    seen_count = n;
                    if self.pipelined(&mut r).await {
                        self.state.lock().unwrap().pipelined_after_select += 1;
                    }
                    let mut out = format!("* {n} EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 42] UIDs valid\r\n");
                    if !no_next {
                        out.push_str(&format!("* OK [UIDNEXT {next}] Predicted next UID\r\n"));
                    }
                    if hostile {
                        out.push_str(&format!("{tag} OK [READ-WRITE]– x\r\n"));
                    } else {
                        out.push_str(&format!("{tag} OK [READ-WRITE] SELECT completed.\r\n"));
                    }
                    w.write_all(out.as_bytes()).await?;
                }
                "STATUS" => {
                    let next = self.state.lock().unwrap().messages.last().map_or(1, |m| m.0 + 1);
                    w.write_all(
                        format!("* STATUS INBOX (UIDNEXT {next})\r\n{tag} OK STATUS completed.\r\n").as_bytes(),
                    )
                    .await?;
                }
                "LOGIN" => {
                    let refusal = {
                        let mut st = self.state.lock().unwrap();
                        st.logins += 1;
                        st.refuse_login.clone()
                    };
                    if let Some(text) = refusal {
                        w.write_all(format!("{tag} NO {text}\r\n").as_bytes()).await?;
                        continue;
                    }
                    let text = if non_ascii {
                        "Logged in – go ahead!"
                    } else {
                        "Logged in"
                    };
                    w.write_all(format!("{tag} OK {text}\r\n").as_bytes()).await?;
                }
                "UID" => {
                    let mut p = rest.splitn(3, ' ');
                    let (sub, set, query) = (
                        p.next().unwrap_or("").to_ascii_uppercase(),
                        p.next().unwrap_or(""),
                        p.next().unwrap_or(""),
                    );
                    let throttle = if sub == "FETCH" {
                        self.state.lock().unwrap().throttle_ms.take()
                    } else {
                        None
                    };
                    if let Some(ms) = throttle {
                        w.write_all(
                            format!("{tag} BAD Request is throttled. Suggested Backoff Time: {ms} milliseconds\r\n")
                                .as_bytes(),
                        )
                        .await?;
                        continue;
                    }
                    if sub == "SEARCH" {
                        // Only `UID SEARCH UID <set>` is understood.
                        let uids: Vec<String> = {
                            let st = self.state.lock().unwrap();
                            let max = st.messages.last().map_or(0, |m| m.0);
                            let set = query.trim_start_matches("UID ").trim();
                            st.messages
                                .iter()
                                .filter(|(uid, _)| in_set(set, *uid, max) && !st.vanish.contains(uid))
                                .map(|(uid, _)| uid.to_string())
                                .collect()
                        };
                        w.write_all(format!("* SEARCH {}\r\n", uids.join(" ")).trim_end().as_bytes())
                            .await?;
                        w.write_all(b"\r\n").await?;
                    }
                    if sub == "FETCH" {
                        let body_fetch = query.contains("BODY.PEEK[]");
                        if !body_fetch {
                            let bye = {
                                let mut st = self.state.lock().unwrap();
                                st.listings += 1;
                                let n = st.listings;
                                st.bye_at_listing.take_if(|at| *at == n).is_some()
                            };
                            if bye {
                                w.write_all(b"* BYE going away during a listing\r\n").await?;
                                return Ok(());
                            }
                        }
                        let refusal = self.state.lock().unwrap().refuse_fetch.clone();
                        if let Some(text) = refusal.filter(|_| body_fetch) {
                            w.write_all(format!("{tag} NO {text}\r\n").as_bytes()).await?;
                            continue;
                        }
                        let (no_body, rate) = {
                            let st = self.state.lock().unwrap();
                            (st.no_body.clone(), st.body_rate)
                        };
                        let msgs: Vec<(usize, u32, Vec<u8>)> = {
                            let st = self.state.lock().unwrap();
                            seen_count = st.messages.len();
                            let max = st.messages.last().map_or(0, |m| m.0);
                            let mut v: Vec<(usize, u32, Vec<u8>)> = st
                                .messages
                                .iter()
                                .enumerate()
                                .filter(|(_, (uid, _))| in_set(set, *uid, max))
                                .filter(|(_, (uid, _))| !(body_fetch && st.vanish.contains(uid)))
                                .map(|(i, (u, b))| (i + 1, *u, b.clone()))
                                .collect();
                            for &bogus in &st.bogus_uids {
                                v.push((
                                    st.messages.len().max(1),
                                    bogus,
                                    format!("Subject: bogus {bogus}\r\n\r\nx\r\n").into_bytes(),
                                ));
                            }
                            v
                        };
                        // `BODY.PEEK[]<offset.length>`: answer that piece, as `BODY[]<offset>`
                        // (unless told to ignore the range, as a broken server might).
                        let range = query
                            .split_once("BODY.PEEK[]<")
                            .and_then(|(_, r)| r.split_once('>'))
                            .and_then(|(r, _)| r.split_once('.'))
                            .and_then(|(o, l)| Some((o.parse::<usize>().ok()?, l.parse::<usize>().ok()?)));
                        let mut label = "BODY[]".to_string();
                        let mut msgs = msgs;
                        if let Some((off, len)) = range {
                            let mut st = self.state.lock().unwrap();
                            st.partial_fetches += 1;
                            if !st.ignore_partial {
                                label = format!("BODY[]<{off}>");
                                for m in &mut msgs {
                                    let end = (off + len).min(m.2.len());
                                    m.2 = m.2[off.min(end)..end].to_vec();
                                }
                            }
                        }
                        if body_fetch {
                            let (huge, endless, garbage) = {
                                let mut st = self.state.lock().unwrap();
                                (
                                    std::mem::take(&mut st.huge_literal),
                                    std::mem::take(&mut st.endless_line),
                                    st.garbage_fetch.take(),
                                )
                            };
                            if let Some((seq, uid, _)) = msgs.first() {
                                if huge {
                                    w.write_all(
                                        format!("* {seq} FETCH (UID {uid} BODY[] {{536000000}}\r\n").as_bytes(),
                                    )
                                    .await?;
                                    for _ in 0..64 {
                                        if w.write_all(&[b'Z'; 65536]).await.is_err() {
                                            return Ok(());
                                        }
                                    }
                                    return Ok(());
                                }
                                if endless {
                                    w.write_all(format!("* {seq} FETCH (UID {uid} FLAGS (").as_bytes())
                                        .await?;
                                    for _ in 0..64 {
                                        if w.write_all(&[b'A'; 65536]).await.is_err() {
                                            return Ok(());
                                        }
                                    }
                                    return Ok(());
                                }
                                if let Some(text) = garbage {
                                    w.write_all(
                                        format!("* {seq} FETCH (UID {uid} BODY[] \"{text}\" ((( ]]] \x01\r\n")
                                            .as_bytes(),
                                    )
                                    .await?;
                                    w.write_all(format!("{tag} OK UID completed.\r\n").as_bytes()).await?;
                                    continue;
                                }
                            }
                        }
                        let repeat = self.state.lock().unwrap().repeat_fetch.max(1);
                        if body_fetch && repeat > 1 {
                            for (seq, uid, body) in &msgs {
                                let head = format!("* {seq} FETCH (UID {uid} {label} {{{}}}\r\n", body.len());
                                for _ in 0..repeat {
                                    w.write_all(head.as_bytes()).await?;
                                    w.write_all(body).await?;
                                    w.write_all(b")\r\n").await?;
                                }
                            }
                            self.state.lock().unwrap().bodies_sent += msgs.len() as u32;
                            w.write_all(format!("{tag} OK UID completed.\r\n").as_bytes()).await?;
                            continue;
                        }
                        if body_fetch && (!no_body.is_empty() || rate > 0) {
                            for (seq, uid, body) in &msgs {
                                if no_body.contains(uid) {
                                    w.write_all(format!("* {seq} FETCH (UID {uid} FLAGS ())\r\n").as_bytes())
                                        .await?;
                                    continue;
                                }
                                w.write_all(
                                    format!("* {seq} FETCH (UID {uid} {label} {{{}}}\r\n", body.len()).as_bytes(),
                                )
                                .await?;
                                if rate > 0 {
                                    let step = (rate / 10).max(1) as usize;
                                    for part in body.chunks(step) {
                                        w.write_all(part).await?;
                                        tokio::time::sleep(Duration::from_millis(100)).await;
                                    }
                                } else {
                                    w.write_all(body).await?;
                                }
                                w.write_all(b")\r\n").await?;
                            }
                            self.state.lock().unwrap().bodies_sent += msgs.len() as u32;
                            w.write_all(format!("{tag} OK UID completed.\r\n").as_bytes()).await?;
                            continue;
                        }
                        if body_fetch {
                            let bye = {
                                let mut st = self.state.lock().unwrap();
                                let after = st.bye_after_bodies == Some(st.bodies_sent);
                                if after {
                                    st.bye_after_bodies = None;
                                }
                                std::mem::take(&mut st.bye_in_fetch) || after
                            };
                            if bye && !msgs.is_empty() {
                                w.write_all(b"* BYE Session invalidated - AccessTokenExpired\r\n")
                                    .await?;
                                return Ok(());
                            }
                            let stall = std::mem::take(&mut self.state.lock().unwrap().stall_in_literal);
                            if stall && !msgs.is_empty() {
                                let (seq, uid, body) = &msgs[0];
                                w.write_all(
                                    format!("* {seq} FETCH (UID {uid} {label} {{{}}}\r\n", body.len()).as_bytes(),
                                )
                                .await?;
                                w.write_all(&body[..body.len() / 2]).await?;
                                // Silence, with the connection open, until the client gives up.
                                let mut sink = String::new();
                                while r.read_line(&mut sink).await.unwrap_or(0) > 0 {}
                                return Ok(());
                            }
                            for (seq, uid, body) in &msgs {
                                w.write_all(
                                    format!("* {seq} FETCH (UID {uid} {label} {{{}}}\r\n", body.len()).as_bytes(),
                                )
                                .await?;
                                w.write_all(body).await?;
                                w.write_all(b")\r\n").await?;
                            }
                            self.state.lock().unwrap().bodies_sent += msgs.len() as u32;
                        } else {
                            let lie = self.state.lock().unwrap().lie_size;
                            for (seq, uid, body) in &msgs {
                                let size = lie.unwrap_or(body.len() as u32);
                                // Gmail's ids (above 2^53, as Gmail's are) and labels, when asked.
                                let gmail = if query.contains("X-GM-MSGID") {
                                    format!(
                                        " X-GM-MSGID {} X-GM-THRID {} X-GM-LABELS (\\Inbox \"Kunden/M&APw-ller\" Important)",
                                        1_700_000_000_000_000_000u64 + u64::from(*uid),
                                        1_600_000_000_000_000_000u64 + u64::from(*uid / 2)
                                    )
                                } else {
                                    String::new()
                                };
                                w.write_all(
                                    format!("* {seq} FETCH (UID {uid} RFC822.SIZE {size}{gmail})\r\n").as_bytes(),
                                )
                                .await?;
                            }
                            // A FETCH pipelined after the listing runs with it.
                            if self.state.lock().unwrap().parallel_fetches && !r.buffer().is_empty() {
                                held_ok = Some(format!("{tag} OK UID completed.\r\n"));
                                continue;
                            }
                        }
                    }
                    if let Some(ok) = held_ok.take() {
                        w.write_all(ok.as_bytes()).await?;
                    }
                    w.write_all(format!("{tag} OK UID completed.\r\n").as_bytes()).await?;
                }
                "IDLE" => {
                    w.write_all(b"+ idling\r\n").await?;
                    let bye = self.state.lock().unwrap().bye_in_idle.take();
                    let end = self.state.lock().unwrap().end_idle_in.take();
                    let mut done = String::new();
                    let news = self.news.notified();
                    tokio::pin!(news);
                    let (now, extra) = {
                        let mut st = self.state.lock().unwrap();
                        let now = st.messages.len();
                        // Mail added before this IDLE armed `news` is announced here, with the
                        // lines meant to follow its EXISTS (else they came an IDLE late).
                        let extra = if now > seen_count {
                            std::mem::take(&mut st.after_exists_in_idle)
                        } else {
                            Vec::new()
                        };
                        (now, extra)
                    };
                    if now > seen_count {
                        w.write_all(exists_with(now, extra).as_bytes()).await?;
                    }
                    let sleep = tokio::time::sleep(bye.unwrap_or(Duration::from_secs(3600)));
                    tokio::pin!(sleep);
                    let ending = tokio::time::sleep(end.unwrap_or(Duration::from_secs(3600)));
                    tokio::pin!(ending);
                    tokio::select! {
                        _ = &mut sleep, if bye.is_some() => {
                            w.write_all(b"* BYE Session invalidated - AccessTokenExpired\r\n").await?;
                            return Ok(());
                        }
                        _ = &mut ending, if end.is_some() => {
                            w.write_all(format!("{tag} OK IDLE terminated (server side)\r\n").as_bytes()).await?;
                            continue;
                        }
                        _ = &mut news => {
                            let (n, extra) = {
                                let mut st = self.state.lock().unwrap();
                                (st.messages.len(), std::mem::take(&mut st.after_exists_in_idle))
                            };
                            w.write_all(exists_with(n, extra).as_bytes()).await?;
                            r.read_line(&mut done).await?;
                        }
                        _ = r.read_line(&mut done) => {}
                    }
                    if self.state.lock().unwrap().freeze_at_done {
                        // Frozen, with the connection open, until the client gives up.
                        let mut sink = String::new();
                        while r.read_line(&mut sink).await.unwrap_or(0) > 0 {}
                        return Ok(());
                    }
                    if self.pipelined(&mut r).await {
                        self.state.lock().unwrap().pipelined_after_done += 1;
                    }
                    w.write_all(format!("{tag} OK Idle completed.\r\n").as_bytes()).await?;
                }
                "LOGOUT" => {
                    w.write_all(format!("* BYE bye\r\n{tag} OK LOGOUT completed.\r\n").as_bytes())
                        .await?;
                    return Ok(());
                }
                "" => return Ok(()),
                _ => w.write_all(format!("{tag} OK done\r\n").as_bytes()).await?,
            }
        }
    }
}

fn in_set(set: &str, uid: u32, max: u32) -> bool {
    set.split(',').any(|part| {
        let mut ends = part.split(':');
        let a = ends.next().unwrap_or("");
        let parse = |s: &str| if s == "*" { max } else { s.parse().unwrap_or(0) };
        match ends.next() {
            Some(b) => {
                let (x, y) = (parse(a), parse(b));
                (x.min(y)..=x.max(y)).contains(&uid)
            }
            None => parse(a) == uid,
        }
    })
}

/// One account on the scripted server (reconnecting every 200 ms) and one watch of INBOX into
/// a Maildir; the extras are TOML lines (`watch_extra` may add further `[[watch]]` tables).
pub fn config_with(dir: &Path, port: u16, account_extra: &str, watch_extra: &str) -> Config {
    let text = format!(
        r#"state = "state.db"
[accounts.s]
host = "127.0.0.1"
port = {port}
tls = "none"
user = "u"
password = "p"
reconnect = [ {{ every = "200ms" }} ]
{account_extra}
[[watch]]
account = "s"
deliver = {{ maildir = "out" }}
{watch_extra}
"#
    );
    let path = dir.join("inboxd.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

pub async fn watch(config: &Config) -> (Watcher, Recorder, tokio::sync::broadcast::Receiver<Event>) {
    let rec = Recorder::default();
    let w = Watcher::with_handler(
        config.watches[0].clone(),
        store(config).await,
        Box::new(rec.clone()),
        Mode::Forever,
    );
    let ev = w.subscribe();
    (w, rec, ev)
}

/// `* n EXISTS` and the lines meant to follow it, as one write.
fn exists_with(n: usize, extra: Vec<String>) -> String {
    let mut out = format!("* {n} EXISTS\r\n");
    for line in extra {
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}
